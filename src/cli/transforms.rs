//! `obelisk invert` and `obelisk compose`, and the transform lists (`--transform`) that `warp`,
//! `points` and `eval` take.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use registration::compose::{fit_affine, invert as invert_field, Chain, InverseResidual, Step, INVERSE_ITERATIONS};
use registration::Grid;
use serde_json::json;

use crate::cli::validate::{check_exists, check_input};
use crate::cli::Output;
use crate::io::transform_files::{read_steps, TransformFormat};
use crate::io::{self, atomic::check_output, describe_grid, Format};

/// Checks that each transform file exists and is of a kind that can be read.
pub fn check_transforms(files: &[PathBuf]) -> Result<()> {
    for f in files {
        check_exists(f)?;
        TransformFormat::of(f)?;
    }
    Ok(())
}

/// Reads transform files listed as `antsApplyTransforms -t` lists them into one chain: a point
/// goes through the first file first (`-t 1Warp.nii.gz -t 0GenericAffine.mat` maps `x` to
/// `A(W(x))`; in image terms the last one listed moves the image first). ITK's composites are
/// listed the other way round, so the files are reversed; a composite file keeps its own order.
pub fn read_chain(files: &[PathBuf]) -> Result<Chain> {
    let mut steps = Vec::new();
    for f in files.iter().rev() {
        steps.extend(read_steps(f)?);
    }
    Ok(Chain::new(steps))
}

/// The grid of an image read in full: a truncated or corrupt reference is an error too.
pub fn reference_grid(path: &Path) -> Result<Grid> {
    Ok(io::read_image(path)?.grid)
}

fn check_field_output(out: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    io::check_field_format(out)?;
    Format::of_output(out)?;
    check_output(out, inputs, force)?;
    Ok(())
}

#[derive(Debug, Args)]
#[command(after_help = "Example:
  obelisk invert --field reg/field.nii.gz --reference moving.nii.gz --out reg/inverse.nii.gz

The inverse maps points of the reference (usually the moving image) back to the field's space:
warping the fixed image with it brings the fixed image onto the moving grid. It is found by the
fixed-point iteration x <- A^-1 (y - r(x)), with A the affine map closest to the field and r the
rest (v(y) = -u(y + v(y)) when A is the identity); the residual |v(y) + u(y + v(y))| is printed
over the voxels whose preimage lies inside the field.")]
pub struct InvertArgs {
    /// Displacement field to invert (ITK convention): .nii or .nii.gz.
    #[arg(long)]
    pub field: PathBuf,
    /// Image whose grid the inverse lies on (usually the moving image).
    #[arg(long)]
    pub reference: PathBuf,
    /// Output field (.nii or .nii.gz).
    #[arg(long)]
    pub out: PathBuf,
    /// Iterations per voxel.
    #[arg(long, default_value_t = INVERSE_ITERATIONS)]
    pub iterations: usize,
    /// Overwrite --out if it exists (never an input).
    #[arg(long)]
    pub force: bool,
}

/// Prints an inversion's residual, for people.
pub fn describe_residual(r: &InverseResidual) -> String {
    format!(
        "inverse residual: mean {:.4} mm ({:.4} voxels), max {:.4} mm; {:.1}% of the voxels map outside the field",
        r.mean_mm,
        r.mean_voxels,
        r.max_mm,
        100.0 * r.outside_fraction
    )
}

pub fn invert(a: InvertArgs, out: Output) -> Result<()> {
    let t = Instant::now();
    let inputs = [a.field.as_path(), a.reference.as_path()];
    for p in inputs {
        check_input(p)?;
    }
    io::check_field_format(&a.field)?;
    crate::cli::validate::at_least_one("--iterations", a.iterations)?;
    check_field_output(&a.out, &inputs, a.force)?;
    let field = io::read_field(&a.field)?;
    let grid = reference_grid(&a.reference)?;
    let inv = invert_field(&field, &fit_affine(&field), &grid, a.iterations)?;
    io::write_field(&a.out, &inv.field)?;
    let summary = json!({
        "out": a.out,
        "field": a.field,
        "reference": a.reference,
        "grid": describe_grid(&grid),
        "residual": inv.residual,
        "seconds": t.elapsed().as_secs_f64(),
    });
    out.finish(&summary, || {
        println!("{}", describe_residual(&inv.residual));
        println!("wrote {}", a.out.display());
    })
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  obelisk compose --field fixed_to_mid.nii.gz --field mid_to_moving.nii.gz --out fixed_to_moving.nii.gz
  obelisk compose --field reg/field_deformable.nii.gz --field reg/affine.mat \\
      --reference fixed.nii.gz --out total.nii.gz

antsApplyTransforms' -t order: a point goes through the first one listed first, so
C(x) = B(A(x)) for --field A --field B (ANTs' -t 1Warp.nii.gz -t 0GenericAffine.mat is
--field 1Warp.nii.gz --field 0GenericAffine.mat). The result lies on the grid of the first
displacement field listed (the space the composition starts from) unless --reference gives one.")]
pub struct ComposeArgs {
    /// Displacement field, .tfm or .mat transform; two or more, in antsApplyTransforms' order.
    #[arg(long = "field", value_name = "TRANSFORM", required = true, alias = "transform")]
    pub fields: Vec<PathBuf>,
    /// Image whose grid the composed field lies on.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Output field (.nii or .nii.gz).
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite --out if it exists (never an input).
    #[arg(long)]
    pub force: bool,
}

pub fn compose(a: ComposeArgs, out: Output) -> Result<()> {
    let t = Instant::now();
    if a.fields.len() < 2 {
        bail!("compose needs at least two --field transforms");
    }
    check_transforms(&a.fields)?;
    let mut inputs: Vec<&Path> = a.fields.iter().map(|p| p.as_path()).collect();
    if let Some(r) = &a.reference {
        check_input(r)?;
        inputs.push(r);
    }
    check_field_output(&a.out, &inputs, a.force)?;
    let chain = read_chain(&a.fields)?;
    let grid = match &a.reference {
        Some(r) => reference_grid(r)?,
        None => match chain.steps().iter().rev().find_map(|s| match s {
            Step::Field(f) => Some(f.field().grid.clone()),
            Step::Affine(_) => None,
        }) {
            Some(g) => g,
            None => bail!("only affine transforms given: --reference must name the grid of the composed field"),
        },
    };
    let field = chain.to_field(&grid)?;
    io::write_field(&a.out, &field)?;
    let summary = json!({
        "out": a.out,
        "fields": a.fields,
        "grid": describe_grid(&grid),
        "seconds": t.elapsed().as_secs_f64(),
    });
    out.finish(&summary, || println!("wrote {} ({})", a.out.display(), describe_grid(&grid)))
}
