//! Reading and writing images, label maps and displacement fields.
//!
//! Every error names the file it concerns ([`IoError`]'s message starts with the path), and
//! every write is atomic ([`atomic::write_atomic`]).

pub mod atomic;
pub mod dataset;
pub mod dicom;
pub mod metaimage;
pub mod nifti;
pub mod nrrd;
pub mod png;
pub mod points;
mod raster;
pub mod transform_files;

use std::path::{Path, PathBuf};

use raster::Payload;
use registration::{DisplacementField, Grid, Labels, Volume};

pub use nifti::{read_labels, read_volume, read_volume_channels, write_labels, write_volume};

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

/// File formats, told apart by extension; a folder is a DICOM series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Nifti,
    Png,
    /// `.nrrd`, or `.nhdr` with a detached data file (read only).
    Nrrd,
    /// `.mha`, or `.mhd` with a detached data file (read only).
    MetaImage,
    /// A folder holding one DICOM series (read only).
    Dicom,
}

impl Format {
    /// The format of an input.
    pub fn of(path: &Path) -> Result<Self, IoError> {
        if path.is_dir() {
            return Ok(Self::Dicom);
        }
        let name = path.to_string_lossy().to_ascii_lowercase();
        if name.ends_with(".nii") || name.ends_with(".nii.gz") {
            Ok(Self::Nifti)
        } else if name.ends_with(".png") {
            Ok(Self::Png)
        } else if name.ends_with(".nrrd") || name.ends_with(".nhdr") {
            Ok(Self::Nrrd)
        } else if name.ends_with(".mha") || name.ends_with(".mhd") {
            Ok(Self::MetaImage)
        } else {
            Err(IoError::new(
                path,
                "unknown file type; expected .nii, .nii.gz, .png, .nrrd, .nhdr, .mha, .mhd or a DICOM folder",
            ))
        }
    }

    /// The format of an output: formats we write as a single file.
    pub fn of_output(path: &Path) -> Result<Self, IoError> {
        let name = path.to_string_lossy().to_ascii_lowercase();
        if name.ends_with(".nhdr") || name.ends_with(".mhd") {
            return Err(IoError::new(path, "detached headers are read, not written; write .nrrd or .mha instead"));
        }
        match Self::of(path)? {
            Self::Dicom => {
                Err(IoError::new(path, "is a folder; DICOM is read, not written (write .nii.gz, .nrrd or .mha)"))
            }
            f => Ok(f),
        }
    }
}

/// Reads a single-channel image (NIfTI, PNG, NRRD, MetaImage or a DICOM folder); NaN/Inf voxels
/// are an error.
pub fn read_image(path: &Path) -> Result<Volume, IoError> {
    match Format::of(path)? {
        Format::Nifti => nifti::read_volume(path),
        Format::Png => png::read_png(path),
        f => decoded(path, f)?.volume(path),
    }
}

/// The values of a NRRD, MetaImage or DICOM input, before they become an image, label map or
/// field.
fn decoded(path: &Path, format: Format) -> Result<raster::Decoded, IoError> {
    match format {
        Format::Nrrd => nrrd::parse(path)?.read(path),
        Format::MetaImage => metaimage::parse(path)?.read(path),
        Format::Dicom => dicom::read(path),
        Format::Nifti | Format::Png => Err(IoError::new(path, "not a NRRD, MetaImage or DICOM input")),
    }
}

/// Writes an image (NIfTI, NRRD and MetaImage as float32; PNG as described in
/// [`png::write_png`]).
pub fn write_image(path: &Path, v: &Volume) -> Result<(), IoError> {
    match Format::of_output(path)? {
        Format::Nifti => nifti::write_volume(path, v),
        Format::Png => png::write_png(path, v),
        Format::Nrrd => nrrd::write(path, &Payload::volume(v)),
        Format::MetaImage => metaimage::write(path, &Payload::volume(v)),
        Format::Dicom => Err(IoError::new(path, "DICOM is read, not written")),
    }
}

/// The grid of an image or label map without reading its voxels.
pub fn read_grid(path: &Path) -> Result<Grid, IoError> {
    match Format::of(path)? {
        Format::Nifti => nifti::read_grid(path),
        Format::Png => png::read_png_grid(path),
        Format::Nrrd => nrrd::parse(path)?.grid(path),
        Format::MetaImage => metaimage::parse(path)?.grid(path),
        Format::Dicom => dicom::read_grid(path),
    }
}

/// Reads a label map.
pub fn read_label_map(path: &Path) -> Result<Labels, IoError> {
    match Format::of(path)? {
        Format::Nifti => nifti::read_labels(path),
        Format::Png => png::read_png_labels(path),
        f => decoded(path, f)?.labels(path),
    }
}

/// Writes a label map (NIfTI, PNG, NRRD or MetaImage).
pub fn write_label_map(path: &Path, l: &Labels) -> Result<(), IoError> {
    match Format::of_output(path)? {
        Format::Nifti => nifti::write_labels(path, l),
        Format::Png => png::write_png_labels(path, l),
        Format::Nrrd => nrrd::write(path, &Payload::labels(l)),
        Format::MetaImage => metaimage::write(path, &Payload::labels(l)),
        Format::Dicom => Err(IoError::new(path, "DICOM is read, not written")),
    }
}

/// Fails unless `path` names a format that holds displacement fields.
pub fn check_field_format(path: &Path) -> Result<(), IoError> {
    match Format::of(path)? {
        Format::Nifti | Format::Nrrd | Format::MetaImage => Ok(()),
        Format::Png | Format::Dicom => Err(IoError::new(path, FIELD_FORMATS)),
    }
}

const FIELD_FORMATS: &str = "a displacement field is a .nii, .nii.gz, .nrrd, .nhdr, .mha or .mhd file";

/// Reads a displacement field (ITK convention: vectors in LPS mm) from NIfTI, NRRD or MetaImage.
pub fn read_field(path: &Path) -> Result<DisplacementField, IoError> {
    match Format::of(path)? {
        Format::Nifti => nifti::read_field(path),
        f @ (Format::Nrrd | Format::MetaImage) => decoded(path, f)?.field(path),
        Format::Png | Format::Dicom => Err(IoError::new(path, FIELD_FORMATS)),
    }
}

/// Writes a displacement field as ITK does (NIfTI, NRRD or MetaImage).
pub fn write_field(path: &Path, f: &DisplacementField) -> Result<(), IoError> {
    match Format::of_output(path)? {
        Format::Nifti => nifti::write_field(path, f),
        Format::Nrrd => nrrd::write(path, &Payload::field(f)),
        Format::MetaImage => metaimage::write(path, &Payload::field(f)),
        Format::Png | Format::Dicom => Err(IoError::new(path, FIELD_FORMATS)),
    }
}

/// Tolerance (mm, on affine entries) for "the same grid": headers store the affine as float32.
pub const GRID_TOL: f64 = 1e-4;

/// Reads a label map that must lie on `image_grid` (the grid of `image_path`).
pub fn read_labels_for(path: &Path, image_grid: &Grid, image_path: &Path) -> Result<Labels, IoError> {
    labels_for(read_label_map(path)?, path, image_grid, image_path)
}

/// A label map (read from `path`, or handed over in memory under that name) that must lie on
/// `image_grid` (the grid of `image_path`).
pub fn labels_for(l: Labels, path: &Path, image_grid: &Grid, image_path: &Path) -> Result<Labels, IoError> {
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
