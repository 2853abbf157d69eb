//! The checks shared by the subcommands: inputs that exist and read, output folders that can be
//! written, option values in range. They run while raw arguments become a job, before any work.

use std::path::Path;

use anyhow::{bail, Result};
use registration::features::ObeliskFeatures;
use registration::{Grid, Volume};

use crate::io::{self, Format, IoError};
use crate::pipeline::FeatureKind;

/// An input that exists and has a format we read: a file, or a folder (a DICOM series).
pub fn check_input(path: &Path) -> Result<(), IoError> {
    if !path.exists() {
        return Err(IoError::new(path, "file not found"));
    }
    Format::of(path)?;
    Ok(())
}

/// An input file that exists and is a file, whatever its format (transforms, point lists).
pub fn check_exists(path: &Path) -> Result<(), IoError> {
    if !path.exists() {
        return Err(IoError::new(path, "file not found"));
    }
    if path.is_dir() {
        return Err(IoError::new(path, "is a folder, not a file"));
    }
    Ok(())
}

/// The trained model behind `--features obelisk`: `--model DIR`, else the embedded default
/// model; `--model` is refused with other features.
pub fn load_model(features: FeatureKind, model: Option<&Path>) -> Result<Option<ObeliskFeatures>> {
    Ok(match (features, model) {
        (FeatureKind::Obelisk, None) => Some(ObeliskFeatures::embedded()?),
        (FeatureKind::Obelisk, Some(dir)) => Some(ObeliskFeatures::load(dir)?),
        (_, Some(_)) => bail!("--model is only used with --features obelisk"),
        (_, None) => None,
    })
}

/// Registration needs two 2D or two 3D images.
pub fn same_dimensionality(a: &Path, ga: &registration::Grid, b: &Path, gb: &registration::Grid) -> Result<()> {
    let dim = |g: &registration::Grid| if g.is_2d() { 2 } else { 3 };
    if ga.is_2d() != gb.is_2d() {
        bail!(
            "{} is {}D but {} is {}D: register images of the same dimensionality",
            a.display(),
            dim(ga),
            b.display(),
            dim(gb)
        );
    }
    Ok(())
}

/// Fraction of the fixed image's voxels (on a lattice of at most ~16³ samples) that lie inside
/// the moving image's field of view, both placed by their headers.
pub fn overlap_fraction(fixed: &registration::Grid, moving: &registration::Grid) -> f64 {
    use registration::Space;
    let shape = fixed.shape();
    let step = shape.map(|n| n.div_ceil(16).max(1));
    let (mut inside, mut total) = (0usize, 0usize);
    for k in (0..shape[2]).step_by(step[2]) {
        for j in (0..shape[1]).step_by(step[1]) {
            for i in (0..shape[0]).step_by(step[0]) {
                let w = fixed.map([i as f64, j as f64, k as f64], Space::Voxel, Space::Ras);
                let v = moving.map(w, Space::Ras, Space::Voxel);
                inside += moving.contains_voxel(v) as usize;
                total += 1;
            }
        }
    }
    inside as f64 / total as f64
}

/// Creates `dir` if needed and checks that new files can be made there.
pub fn prepare_out_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("{}: output path exists and is not a folder", dir.display());
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("{}: cannot create the output folder: {e}", dir.display()))?;
    Ok(())
}

/// A weight or width that must be a finite number >= 0.
pub fn non_negative(name: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        bail!("{name} must be a finite number >= 0, got {v}");
    }
    Ok(())
}

/// A count that must be at least 1.
pub fn at_least_one(name: &str, n: usize) -> Result<()> {
    if n == 0 {
        bail!("{name} must be at least 1");
    }
    Ok(())
}

fn dims(g: &Grid) -> &'static str {
    if g.is_2d() {
        "2D"
    } else {
        "3D"
    }
}

/// Reads a metric mask and measures how much of its image it covers (logged unless `quiet`):
/// a mask that cannot be read, holds NaN or covers none of the image is an error.
pub fn read_mask(path: &Path, image: &Grid, image_path: &Path, quiet: bool) -> Result<(Volume, f64)> {
    mask_for(io::read_image(path)?, path, image, image_path, quiet)
}

/// [`read_mask`] of a mask already read (or handed over in memory under the name `path`).
pub fn mask_for(mask: Volume, path: &Path, image: &Grid, image_path: &Path, quiet: bool) -> Result<(Volume, f64)> {
    if mask.grid.is_2d() != image.is_2d() {
        return Err(IoError::new(
            path,
            format!("is a {} mask for the {} image {}", dims(&mask.grid), dims(image), image_path.display()),
        )
        .into());
    }
    let coverage = registration::method::mask_coverage(&mask, image);
    if coverage <= 0.0 {
        return Err(IoError::new(
            path,
            format!(
                "the mask holds no voxel of {} (all zero, or it lies elsewhere in the world)",
                image_path.display()
            ),
        )
        .into());
    }
    if !quiet {
        eprintln!("mask {}: {:.1}% of {}", path.display(), 100.0 * coverage, image_path.display());
    }
    Ok((mask, coverage))
}
