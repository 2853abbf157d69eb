//! `obelisk warp`: resample a moving image (or label map) through a displacement field.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use registration::warp::{warp_labels, warp_volume, Interpolation, Padding};
use serde_json::json;

use crate::cli::validate::check_input;
use crate::cli::Output;
use crate::io::{self, atomic::check_output, describe_grid, Format, IoError, GRID_TOL};

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  obelisk warp --moving moving.nii.gz --field reg/field.nii.gz --out warped.nii.gz
  obelisk warp --moving moving_seg.nii.gz --field reg/field.nii.gz --out seg.nii.gz --labels \\
      --reference fixed.nii.gz

The field may come from obelisk, ANTs (*Warp.nii.gz) or elastix/transformix (deformation
field): ITK convention, LPS millimetres on the fixed grid.")]
pub struct WarpArgs {
    /// Image (or label map with --labels) to resample (.nii, .nii.gz, .png, .nrrd, .nhdr, .mha, .mhd or a DICOM folder).
    #[arg(long)]
    pub moving: PathBuf,
    /// Displacement field in the ITK convention (LPS mm, on the fixed grid): .nii, .nii.gz, .nrrd, .nhdr, .mha or .mhd.
    #[arg(long)]
    pub field: PathBuf,
    /// Output file; it lies on the field's grid.
    #[arg(long)]
    pub out: PathBuf,
    /// The moving file is a label map: nearest-neighbour resampling, integer output.
    #[arg(long)]
    pub labels: bool,
    /// Fixed image; checked to lie on the field's grid.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Overwrite --out if it exists (never an input).
    #[arg(long)]
    pub force: bool,
}

/// A validated warp job.
#[derive(Debug)]
pub struct WarpJob {
    moving: PathBuf,
    field: PathBuf,
    out: PathBuf,
    labels: bool,
    reference: Option<PathBuf>,
}

impl WarpJob {
    /// Checks files, formats and the output location without reading any image data.
    pub fn from_args(a: WarpArgs) -> anyhow::Result<Self> {
        let mut inputs = vec![a.moving.as_path(), a.field.as_path()];
        inputs.extend(a.reference.as_deref());
        for p in &inputs {
            check_input(p)?;
        }
        io::check_field_format(&a.field)?;
        Format::of_output(&a.out)?;
        check_output(&a.out, &inputs, a.force)?;
        Ok(Self { moving: a.moving, field: a.field, out: a.out, labels: a.labels, reference: a.reference })
    }

    pub fn run(&self, out: Output) -> anyhow::Result<()> {
        let t = Instant::now();
        let field = io::read_field(&self.field)?;
        if let Some(r) = &self.reference {
            // read in full, not just the header: a truncated or corrupt reference is an error too
            let grid = io::read_image(r)?.grid;
            if !grid.same_as(&field.grid, GRID_TOL) {
                return Err(IoError::new(
                    r,
                    format!(
                        "reference grid ({}) differs from the grid of the field {} ({})",
                        describe_grid(&grid),
                        self.field.display(),
                        describe_grid(&field.grid)
                    ),
                )
                .into());
            }
        }
        if self.labels {
            let moving = io::read_label_map(&self.moving)?;
            let warped = warp_labels(&moving, &field);
            io::write_label_map(&self.out, &warped)?;
        } else {
            let moving = io::read_image(&self.moving)?;
            let warped = warp_volume(&moving, &field, Interpolation::Linear, Padding::Extent);
            io::write_image(&self.out, &warped)?;
        }
        let summary = json!({
            "out": self.out,
            "moving": self.moving,
            "field": self.field,
            "labels": self.labels,
            "grid": describe_grid(&field.grid),
            "seconds": t.elapsed().as_secs_f64(),
        });
        out.finish(&summary, || eprintln!("wrote {} ({})", self.out.display(), describe_grid(&field.grid)))
    }
}
