//! PNG as 2D images: one slice, 1 mm pixels, `i` along columns and `j` down the rows.
//!
//! The grid's RAS affine is `diag(−1, −1, 1)`: identity in LPS, which is how ITK reads a PNG, so a
//! field made by ITK-based tools for a PNG sits on the same grid as the one we give it.
//!
//! Grey values are stored as they are, not rescaled, so integer intensities and labels survive a
//! round trip: 8-bit when every value lies in `[0, 255]`, otherwise 16-bit; values are rounded and
//! clamped to `[0, 65535]`.

use std::path::Path;

use image::{DynamicImage, ImageBuffer, Luma};
use nalgebra::Matrix4;
use registration::{Grid, Labels, Volume};

use super::atomic::write_atomic;
use super::IoError;

/// The grid of a `w × h` PNG.
pub fn png_grid(w: usize, h: usize) -> Result<Grid, registration::Error> {
    Grid::new([w, h, 1], Matrix4::from_diagonal(&nalgebra::Vector4::new(-1.0, -1.0, 1.0, 1.0)))
}

fn decode(path: &Path) -> Result<DynamicImage, IoError> {
    if !path.exists() {
        return Err(IoError::new(path, "file not found"));
    }
    let reader = image::ImageReader::open(path).map_err(|e| IoError::new(path, format!("cannot open: {e}")))?;
    let mut reader = reader.with_guessed_format().map_err(|e| IoError::new(path, format!("cannot read: {e}")))?;
    if reader.format() != Some(image::ImageFormat::Png) {
        return Err(IoError::new(path, "not a PNG file"));
    }
    // bounds decoder allocations by the same voxel limit as NIfTI headers
    let mut limits = image::Limits::default();
    limits.max_alloc = Some((registration::grid::MAX_VOXELS as u64).min(1 << 32));
    reader.limits(limits);
    reader.decode().map_err(|e| IoError::new(path, format!("invalid PNG: {e}")))
}

/// The grid of a PNG file, from its header alone.
pub fn read_png_grid(path: &Path) -> Result<Grid, IoError> {
    if !path.exists() {
        return Err(IoError::new(path, "file not found"));
    }
    let reader = image::ImageReader::open(path).map_err(|e| IoError::new(path, format!("cannot open: {e}")))?;
    let (w, h) = reader.into_dimensions().map_err(|e| IoError::new(path, format!("invalid PNG: {e}")))?;
    png_grid(w as usize, h as usize).map_err(|e| IoError::new(path, e.to_string()))
}

/// Reads a PNG as grey values: 8/16-bit grey directly, RGB(A) as Rec. 601 luminance; alpha is
/// ignored.
pub fn read_png(path: &Path) -> Result<Volume, IoError> {
    let img = decode(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = match &img {
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().map(|&v| v as f32).collect(),
        DynamicImage::ImageLumaA8(b) => b.pixels().map(|p| p.0[0] as f32).collect(),
        DynamicImage::ImageLuma16(b) => b.as_raw().iter().map(|&v| v as f32).collect(),
        DynamicImage::ImageLumaA16(b) => b.pixels().map(|p| p.0[0] as f32).collect(),
        DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_) => {
            img.to_rgb8().pixels().map(|p| luminance(p.0.map(|c| c as f32))).collect()
        }
        _ => img.to_rgb16().pixels().map(|p| luminance(p.0.map(|c| c as f32))).collect(),
    };
    let grid = png_grid(w, h).map_err(|e| IoError::new(path, e.to_string()))?;
    Volume::new(grid, 1, data).map_err(|e| IoError::new(path, e.to_string()))
}

fn luminance([r, g, b]: [f32; 3]) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

/// Reads a greyscale PNG of integer labels.
pub fn read_png_labels(path: &Path) -> Result<Labels, IoError> {
    let img = decode(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<u32> = match &img {
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().map(|&v| v as u32).collect(),
        DynamicImage::ImageLuma16(b) => b.as_raw().iter().map(|&v| v as u32).collect(),
        _ => return Err(IoError::new(path, "a PNG label map must be 8- or 16-bit greyscale without alpha")),
    };
    let grid = png_grid(w, h).map_err(|e| IoError::new(path, e.to_string()))?;
    Labels::new(grid, data).map_err(|e| IoError::new(path, e.to_string()))
}

fn check_2d(path: &Path, grid: &Grid, channels: usize) -> Result<(u32, u32), IoError> {
    let [w, h, d] = grid.shape();
    if d != 1 || channels != 1 {
        return Err(IoError::new(
            path,
            format!("PNG holds one 2D slice; this image is {w}x{h}x{d} with {channels} channel(s)"),
        ));
    }
    Ok((w as u32, h as u32))
}

fn save<P: image::Pixel<Subpixel = S> + image::PixelWithColorType, S: image::Primitive>(
    path: &Path,
    buf: ImageBuffer<P, Vec<S>>,
) -> Result<(), IoError>
where
    [S]: image::EncodableLayout,
{
    write_atomic(path, |w| buf.write_to(w, image::ImageFormat::Png).map_err(std::io::Error::other))
}

/// Writes a single-channel 2D image as grey PNG (depth and rounding: see the module docs).
pub fn write_png(path: &Path, v: &Volume) -> Result<(), IoError> {
    let (w, h) = check_2d(path, &v.grid, v.channels)?;
    if v.data.iter().any(|x| !x.is_finite()) {
        return Err(IoError::new(path, "image holds NaN or infinite values"));
    }
    let (lo, hi) = v.range();
    if lo >= 0.0 && hi <= 255.0 {
        let px: Vec<u8> = v.data.iter().map(|&x| x.round() as u8).collect();
        save(path, ImageBuffer::<Luma<u8>, _>::from_raw(w, h, px).expect("size checked"))
    } else {
        let px: Vec<u16> = v.data.iter().map(|&x| x.round().clamp(0.0, 65535.0) as u16).collect();
        save(path, ImageBuffer::<Luma<u16>, _>::from_raw(w, h, px).expect("size checked"))
    }
}

/// Writes a 2D label map as 8- or 16-bit grey PNG; labels above 65535 do not fit.
pub fn write_png_labels(path: &Path, l: &Labels) -> Result<(), IoError> {
    let (w, h) = check_2d(path, &l.grid, 1)?;
    let max = l.data.iter().copied().max().unwrap_or(0);
    if max <= 255 {
        let px: Vec<u8> = l.data.iter().map(|&x| x as u8).collect();
        save(path, ImageBuffer::<Luma<u8>, _>::from_raw(w, h, px).expect("size checked"))
    } else if max <= 65535 {
        let px: Vec<u16> = l.data.iter().map(|&x| x as u16).collect();
        save(path, ImageBuffer::<Luma<u16>, _>::from_raw(w, h, px).expect("size checked"))
    } else {
        Err(IoError::new(path, format!("label {max} does not fit a 16-bit PNG")))
    }
}
