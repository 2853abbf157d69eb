//! `obelisk warp`: resample a moving image (or label map) through a displacement field or a
//! chain of transforms.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail};
use clap::{Args, ValueEnum};
use registration::warp::{warp_labels, warp_labels_linear, warp_volume, Interpolation, Padding};
use serde_json::json;

use crate::cli::transforms::{check_transforms, read_chain, reference_grid};
use crate::cli::validate::check_input;
use crate::cli::Output;
use crate::io::{self, atomic::check_output, describe_grid, Format, IoError, GRID_TOL};

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  obelisk warp --moving moving.nii.gz --field reg/field.nii.gz --out warped.nii.gz
  obelisk warp --moving moving_seg.nii.gz --field reg/field.nii.gz --out seg.nii.gz --labels \\
      --reference fixed.nii.gz
  obelisk warp --moving moving.nii.gz --reference fixed.nii.gz --out warped.nii.gz \\
      --transform ants1Warp.nii.gz --transform ants0GenericAffine.mat
  obelisk warp --moving moving.nii.gz --reference fixed.nii.gz --out warped.nii.gz \
      --transform reg/field_deformable.nii.gz --transform reg/affine.mat
  obelisk warp --moving moving_seg.nii.gz --field reg/field.nii.gz --out seg.nii.gz \\
      --interpolation label

The field may come from obelisk, ANTs (*Warp.nii.gz) or elastix/transformix (deformation
field): ITK convention, LPS millimetres on the fixed grid. --transform takes ITK/ANTs
transforms (.tfm, .txt, .mat affines, displacement fields) listed as antsApplyTransforms -t
lists them: a point of the reference grid goes through the first one listed first, then the
next (the last one listed is the first applied to the moving image).")]
pub struct WarpArgs {
    /// Image (or label map with --labels) to resample (.nii, .nii.gz, .png, .nrrd, .nhdr, .mha, .mhd or a DICOM folder).
    #[arg(long)]
    pub moving: PathBuf,
    /// Displacement field in the ITK convention (LPS mm, on the fixed grid): .nii, .nii.gz, .nrrd,
    /// .nhdr, .mha or .mhd.
    /// The output lies on its grid.
    #[arg(long, required_unless_present = "transforms", conflicts_with = "transforms")]
    pub field: Option<PathBuf>,
    /// A transform from the reference's space to the moving image's (.tfm, .txt, .mat or a
    /// displacement field); repeat for a chain, in antsApplyTransforms' -t order. Needs
    /// --reference.
    #[arg(long = "transform", value_name = "FILE", requires = "reference")]
    pub transforms: Vec<PathBuf>,
    /// Output file; it lies on the field's grid (or the reference's with --transform).
    #[arg(long)]
    pub out: PathBuf,
    /// The moving file is a label map: nearest-neighbour resampling, integer output.
    #[arg(long)]
    pub labels: bool,
    /// How values between voxels are found: `linear` (images; the default), `nearest`, or
    /// `label` (label maps: every label's indicator resampled linearly, then the most likely
    /// label, for smoother boundaries than nearest) [default: nearest with --labels].
    #[arg(long, value_enum)]
    pub interpolation: Option<WarpInterpolation>,
    /// Fixed image: checked to lie on the field's grid; with --transform, the output's grid.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Overwrite --out if it exists (never an input).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WarpInterpolation {
    Linear,
    Nearest,
    Label,
}

/// A validated warp job.
#[derive(Debug)]
pub struct WarpJob {
    moving: PathBuf,
    field: Option<PathBuf>,
    transforms: Vec<PathBuf>,
    out: PathBuf,
    interpolation: WarpInterpolation,
    labels: bool,
    reference: Option<PathBuf>,
}

impl WarpJob {
    /// Checks files, formats and the output location without reading any image data.
    pub fn from_args(a: WarpArgs) -> anyhow::Result<Self> {
        let mut inputs = vec![a.moving.as_path()];
        inputs.extend(a.field.as_deref());
        inputs.extend(a.reference.as_deref());
        for p in &inputs {
            check_input(p)?;
        }
        if let Some(f) = &a.field {
            io::check_field_format(f)?;
        }
        match (&a.field, a.transforms.is_empty(), &a.reference) {
            (None, true, _) => bail!("give a --field or one or more --transform"),
            (Some(_), false, _) => bail!("give either --field or --transform, not both"),
            (None, false, None) => bail!("--transform needs --reference (the grid of the output)"),
            _ => {}
        }
        check_transforms(&a.transforms)?;
        inputs.extend(a.transforms.iter().map(|p| p.as_path()));
        let interpolation = match (a.labels, a.interpolation) {
            (true, Some(WarpInterpolation::Linear)) => {
                bail!("--labels resamples label maps by nearest neighbour or --interpolation label, not linear")
            }
            (true, None) => WarpInterpolation::Nearest,
            (_, Some(i)) => i,
            (false, None) => WarpInterpolation::Linear,
        };
        Format::of_output(&a.out)?;
        check_output(&a.out, &inputs, a.force)?;
        Ok(Self {
            moving: a.moving,
            field: a.field,
            transforms: a.transforms,
            out: a.out,
            labels: a.labels || interpolation == WarpInterpolation::Label,
            interpolation,
            reference: a.reference,
        })
    }

    pub fn run(&self, out: Output) -> anyhow::Result<()> {
        let t = Instant::now();
        let field = match &self.field {
            Some(path) => {
                let field = io::read_field(path)?;
                if let Some(r) = &self.reference {
                    let grid = reference_grid(r)?;
                    if !grid.same_as(&field.grid, GRID_TOL) {
                        return Err(IoError::new(
                            r,
                            format!(
                                "reference grid ({}) differs from the grid of the field {} ({})",
                                describe_grid(&grid),
                                path.display(),
                                describe_grid(&field.grid)
                            ),
                        )
                        .into());
                    }
                }
                field
            }
            None => {
                let r = self.reference.as_deref().ok_or_else(|| anyhow!("--transform needs --reference"))?;
                read_chain(&self.transforms)?.to_field(&reference_grid(r)?)?
            }
        };
        match (self.labels, self.interpolation) {
            (true, WarpInterpolation::Label) => {
                let moving = io::read_label_map(&self.moving)?;
                io::write_label_map(&self.out, &warp_labels_linear(&moving, &field))?;
            }
            (true, _) => {
                let moving = io::read_label_map(&self.moving)?;
                io::write_label_map(&self.out, &warp_labels(&moving, &field))?;
            }
            (false, i) => {
                let interp =
                    if i == WarpInterpolation::Nearest { Interpolation::Nearest } else { Interpolation::Linear };
                let moving = io::read_image(&self.moving)?;
                io::write_image(&self.out, &warp_volume(&moving, &field, interp, Padding::Extent))?;
            }
        }
        let summary = json!({
            "out": self.out,
            "moving": self.moving,
            "field": self.field,
            "transforms": self.transforms,
            "labels": self.labels,
            "interpolation": self.interpolation,
            "grid": describe_grid(&field.grid),
            "seconds": t.elapsed().as_secs_f64(),
        });
        out.finish(&summary, || eprintln!("wrote {} ({})", self.out.display(), describe_grid(&field.grid)))
    }
}
