//! Reading and writing images, label maps and displacement fields.
//!
//! Every error names the file it concerns ([`IoError`]'s message starts with the path), and
//! every write is atomic ([`atomic::write_atomic`]).

pub mod atomic;
pub mod dataset;
pub mod nifti;
pub mod png;
pub mod points;
pub mod transform_files;

use std::path::{Path, PathBuf};

use registration::{Grid, Labels, Volume};

pub use nifti::{read_field, read_labels, read_volume, read_volume_channels, write_field, write_labels, write_volume};

/// A file-level failure; `Display` is `"<path>: <problem>"`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {msg}", path.display())]
pub struct IoError {
    pub path: PathBuf,
    pub msg: String,
}

impl IoError {
    pub fn new(path: &Path, msg: impl Into<String>) -> Self {
        Self { path: path.to_path_buf(), msg: msg.into() }
    }
}

/// File formats, told apart by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Nifti,
    Png,
}

impl Format {
    pub fn of(path: &Path) -> Result<Self, IoError> {
        let name = path.to_string_lossy().to_ascii_lowercase();
        if name.ends_with(".nii") || name.ends_with(".nii.gz") {
            Ok(Self::Nifti)
        } else if name.ends_with(".png") {
            Ok(Self::Png)
        } else {
            Err(IoError::new(path, "unknown file type; expected .nii, .nii.gz or .png"))
        }
    }
}

/// Reads a single-channel image (NIfTI or PNG); NaN/Inf voxels are an error.
pub fn read_image(path: &Path) -> Result<Volume, IoError> {
    match Format::of(path)? {
        Format::Nifti => nifti::read_volume(path),
        Format::Png => png::read_png(path),
    }
}

/// Writes an image (NIfTI as float32; PNG as described in [`png::write_png`]).
pub fn write_image(path: &Path, v: &Volume) -> Result<(), IoError> {
    match Format::of(path)? {
        Format::Nifti => nifti::write_volume(path, v),
        Format::Png => png::write_png(path, v),
    }
}

/// The grid of an image or label map without reading its voxels.
pub fn read_grid(path: &Path) -> Result<Grid, IoError> {
    match Format::of(path)? {
        Format::Nifti => nifti::read_grid(path),
        Format::Png => png::read_png_grid(path),
    }
}

/// Reads a label map (NIfTI or PNG).
pub fn read_label_map(path: &Path) -> Result<Labels, IoError> {
    match Format::of(path)? {
        Format::Nifti => nifti::read_labels(path),
        Format::Png => png::read_png_labels(path),
    }
}

/// Writes a label map (NIfTI or PNG).
pub fn write_label_map(path: &Path, l: &Labels) -> Result<(), IoError> {
    match Format::of(path)? {
        Format::Nifti => nifti::write_labels(path, l),
        Format::Png => png::write_png_labels(path, l),
    }
}

/// Tolerance (mm, on affine entries) for "the same grid": headers store the affine as float32.
pub const GRID_TOL: f64 = 1e-4;

/// Reads a label map that must lie on `image_grid` (the grid of `image_path`).
pub fn read_labels_for(path: &Path, image_grid: &Grid, image_path: &Path) -> Result<Labels, IoError> {
    let l = read_label_map(path)?;
    if !l.grid.same_as(image_grid, GRID_TOL) {
        return Err(IoError::new(
            path,
            format!(
                "label map's grid {} does not match the grid of {} ({})",
                describe_grid(&l.grid),
                image_path.display(),
                describe_grid(image_grid)
            ),
        ));
    }
    Ok(l)
}

/// Shape and spacing, for messages.
pub fn describe_grid(g: &Grid) -> String {
    let s = g.spacing();
    let o = g.origin_ras();
    format!(
        "shape {:?}, spacing [{:.4}, {:.4}, {:.4}] mm, origin RAS [{:.4}, {:.4}, {:.4}]",
        g.shape(),
        s[0],
        s[1],
        s[2],
        o[0],
        o[1],
        o[2]
    )
}

#[cfg(test)]
mod tests;
