//! DICOM series: a folder given where an image is expected holds the slices of one series.
//!
//! Every file in the folder (not its subfolders) that has the `DICM` signature is read; other
//! files are ignored. The slices must belong to one SeriesInstanceUID: a folder with several
//! series is refused with the list of them (with their descriptions and file counts), so that
//! nothing is picked silently; move each series into its own folder. Single-frame images with
//! one grey sample per pixel and native (uncompressed) pixel data are read; a compressed
//! transfer syntax is refused with its name.
//!
//! Geometry, as ITK's GDCM reader gives it (DICOM is LPS): slices are sorted by the projection
//! of ImagePositionPatient on the slice normal (the cross product of the ImageOrientationPatient
//! rows), `i` runs along the first row of ImageOrientationPatient with the second PixelSpacing
//! value, `j` along the second with the first, and `k` along the normal with the spacing of the
//! slice positions, which must be even (within 1% or 1 µm) and stack along the normal (no
//! gantry tilt). The first slice's position is the origin; a single slice is a 2D image whose
//! third axis has SpacingBetweenSlices, else SliceThickness, else 1 mm. RescaleSlope and
//! RescaleIntercept are applied slice by slice, into float32 (label maps are exact up to 2^24).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::mem::InMemElement;
use dicom_object::{DefaultDicomObject, OpenFileOptions, Tag};
use nalgebra::Vector3;
use registration::Grid;

use super::raster::{self, Decoded, Layout};
use super::IoError;

/// Transfer syntaxes whose pixel data are stored as plain samples.
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";

/// One file's attributes that matter here.
struct Slice {
    file: PathBuf,
    object: DefaultDicomObject,
    position: Vector3<f64>,
    row: Vector3<f64>,
    col: Vector3<f64>,
    /// Between rows, between columns (DICOM's order).
    pixel_spacing: [f64; 2],
    rows: usize,
    cols: usize,
    slope: f64,
    intercept: f64,
}

/// The names of the DICOM files in `dir`, sorted; files without the `DICM` signature are left
/// out.
fn dicom_files(dir: &Path) -> Result<Vec<PathBuf>, IoError> {
    let entries = std::fs::read_dir(dir).map_err(|e| IoError::new(dir, format!("cannot list the folder: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| IoError::new(dir, format!("cannot list the folder: {e}")))?;
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let mut magic = [0u8; 132];
        let ok = std::fs::File::open(&path).and_then(|mut f| f.read_exact(&mut magic)).is_ok();
        if ok && &magic[128..] == b"DICM" {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(IoError::new(dir, "folder holds no DICOM files (none with the DICM signature)"));
    }
    Ok(files)
}

fn open(file: &Path, pixels: bool) -> Result<DefaultDicomObject, IoError> {
    let opts = OpenFileOptions::new();
    let opts = if pixels { opts } else { opts.read_until(tags::PIXEL_DATA) };
    opts.open_file(file).map_err(|e| IoError::new(file, format!("invalid DICOM file: {e}")))
}

fn element<'a>(obj: &'a DefaultDicomObject, file: &Path, tag: Tag, name: &str) -> Result<&'a InMemElement, IoError> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .ok_or_else(|| IoError::new(file, format!("has no {name}; not a cross-sectional image")))
}

fn text(obj: &DefaultDicomObject, tag: Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok().flatten()?;
    Some(e.to_str().ok()?.trim().trim_end_matches('\0').to_string())
}

fn floats(obj: &DefaultDicomObject, file: &Path, tag: Tag, name: &str, n: usize) -> Result<Vec<f64>, IoError> {
    let v = element(obj, file, tag, name)?
        .to_multi_float64()
        .map_err(|e| IoError::new(file, format!("invalid {name}: {e}")))?;
    if v.len() != n || v.iter().any(|x| !x.is_finite()) {
        return Err(IoError::new(file, format!("{name} {v:?} is not {n} finite numbers")));
    }
    Ok(v)
}

fn uint(obj: &DefaultDicomObject, file: &Path, tag: Tag, name: &str) -> Result<usize, IoError> {
    element(obj, file, tag, name)?
        .to_int::<u32>()
        .map(|v| v as usize)
        .map_err(|e| IoError::new(file, format!("invalid {name}: {e}")))
}

fn optional_float(obj: &DefaultDicomObject, file: &Path, tag: Tag, name: &str) -> Result<Option<f64>, IoError> {
    match obj.element_opt(tag).ok().flatten() {
        None => Ok(None),
        Some(e) if e.to_str().map(|s| s.trim().is_empty()).unwrap_or(false) => Ok(None),
        Some(e) => match e.to_float64() {
            Ok(v) if v.is_finite() => Ok(Some(v)),
            _ => Err(IoError::new(file, format!("invalid {name} {:?}", e.to_str().unwrap_or_default()))),
        },
    }
}

fn slice(file: PathBuf, object: DefaultDicomObject) -> Result<Slice, IoError> {
    let f = file.as_path();
    let p = floats(&object, f, tags::IMAGE_POSITION_PATIENT, "ImagePositionPatient", 3)?;
    let o = floats(&object, f, tags::IMAGE_ORIENTATION_PATIENT, "ImageOrientationPatient", 6)?;
    let s = floats(&object, f, tags::PIXEL_SPACING, "PixelSpacing", 2)?;
    let (row, col) = (Vector3::new(o[0], o[1], o[2]), Vector3::new(o[3], o[4], o[5]));
    if (row.norm() - 1.0).abs() > 1e-3 || (col.norm() - 1.0).abs() > 1e-3 || row.dot(&col).abs() > 1e-3 {
        return Err(IoError::new(f, format!("ImageOrientationPatient {o:?} is not two orthogonal unit vectors")));
    }
    if s.iter().any(|&v| v <= 0.0) {
        return Err(IoError::new(f, format!("PixelSpacing {s:?} must be positive")));
    }
    let slope = optional_float(&object, f, tags::RESCALE_SLOPE, "RescaleSlope")?.unwrap_or(1.0);
    let intercept = optional_float(&object, f, tags::RESCALE_INTERCEPT, "RescaleIntercept")?.unwrap_or(0.0);
    Ok(Slice {
        rows: uint(&object, f, tags::ROWS, "Rows")?,
        cols: uint(&object, f, tags::COLUMNS, "Columns")?,
        position: Vector3::new(p[0], p[1], p[2]),
        row: row.normalize(),
        col: col.normalize(),
        pixel_spacing: [s[0], s[1]],
        slope,
        intercept,
        file,
        object,
    })
}

/// The files of the one series in `dir`, opened (with their pixel data when `pixels`).
fn series(dir: &Path, pixels: bool) -> Result<Vec<(PathBuf, DefaultDicomObject)>, IoError> {
    let mut by_uid: BTreeMap<String, Vec<(PathBuf, DefaultDicomObject)>> = BTreeMap::new();
    for file in dicom_files(dir)? {
        let obj = open(&file, pixels)?;
        // DICOMDIRs, reports, presentation states: no image to read
        if obj.element_opt(tags::ROWS).ok().flatten().is_none() {
            continue;
        }
        let uid = text(&obj, tags::SERIES_INSTANCE_UID).unwrap_or_default();
        by_uid.entry(uid).or_default().push((file, obj));
    }
    if by_uid.len() > 1 {
        let list: Vec<String> = by_uid
            .iter()
            .map(|(uid, files)| {
                let desc = text(&files[0].1, tags::SERIES_DESCRIPTION).filter(|d| !d.is_empty());
                let desc = desc.map_or(String::new(), |d| format!(" \"{d}\""));
                let uid = if uid.is_empty() { "(none)" } else { uid };
                format!("{uid}{desc} ({} files, e.g. {})", files.len(), files[0].0.display())
            })
            .collect();
        return Err(IoError::new(
            dir,
            format!("folder holds {} DICOM series; put each in its own folder: {}", by_uid.len(), list.join("; ")),
        ));
    }
    by_uid.into_values().next().ok_or_else(|| IoError::new(dir, "folder holds no DICOM images"))
}

/// The slices sorted along their normal, and the grid they span.
fn stack(dir: &Path, pixels: bool) -> Result<(Vec<Slice>, Grid), IoError> {
    let mut slices = series(dir, pixels)?.into_iter().map(|(f, o)| slice(f, o)).collect::<Result<Vec<_>, _>>()?;
    let first = &slices[0];
    let (row, col) = (first.row, first.col);
    let normal = row.cross(&col);
    for s in &slices[1..] {
        let differs = (s.row - row).abs().max() > 1e-4 || (s.col - col).abs().max() > 1e-4;
        if differs {
            return Err(IoError::new(
                &s.file,
                format!("ImageOrientationPatient differs from that of {}", first.file.display()),
            ));
        }
        let spacing_differs =
            (0..2).any(|a| (s.pixel_spacing[a] - first.pixel_spacing[a]).abs() > 1e-4 * first.pixel_spacing[a]);
        if (s.rows, s.cols) != (first.rows, first.cols) || spacing_differs {
            return Err(IoError::new(
                &s.file,
                format!("size or PixelSpacing differs from that of {}", first.file.display()),
            ));
        }
    }
    slices.sort_by(|a, b| a.position.dot(&normal).total_cmp(&b.position.dot(&normal)));
    let n = slices.len();
    let along: Vec<f64> = slices.iter().map(|s| s.position.dot(&normal)).collect();
    let gap = if n > 1 {
        (along[n - 1] - along[0]) / (n - 1) as f64
    } else {
        let thickness =
            optional_float(&slices[0].object, &slices[0].file, tags::SPACING_BETWEEN_SLICES, "SpacingBetweenSlices")?
                .or(optional_float(&slices[0].object, &slices[0].file, tags::SLICE_THICKNESS, "SliceThickness")?);
        thickness.filter(|&t| t > 0.0).unwrap_or(1.0)
    };
    let between = |w: &[Slice], msg: String| {
        IoError::new(dir, format!("{} and {} {msg}", w[0].file.display(), w[1].file.display()))
    };
    // duplicates first: they also make the gaps uneven, but this is the message that helps
    if let Some(w) = slices.windows(2).find(|w| (w[1].position - w[0].position).dot(&normal) < 1e-4) {
        let msg =
            "lie at the same position: several acquisitions (echoes, time points) in one series are not supported";
        return Err(between(w, msg.into()));
    }
    let tol = (0.01 * gap).max(1e-3);
    for w in slices.windows(2) {
        let step = w[1].position - w[0].position;
        let d = step.dot(&normal);
        if (d - gap).abs() > tol {
            let msg = format!(
                "are {d:.4} mm apart, but the series' mean is {gap:.4} mm: uneven slice spacing (missing slices?)"
            );
            return Err(between(w, msg));
        }
        if (step - d * normal).norm() > tol {
            let msg = "do not stack along the normal of their planes (gantry tilt?); resample the series first";
            return Err(between(w, msg.into()));
        }
    }
    let f = &slices[0];
    let axes = [row * f.pixel_spacing[1], col * f.pixel_spacing[0], normal * gap].map(|v| v.as_slice().to_vec());
    let shape = raster::shape(&[f.cols, f.rows, n], &[0, 1, 2]).map_err(|m| IoError::new(dir, m))?;
    let grid = raster::grid_from_lps(dir, shape, &axes, f.position.as_slice())?;
    Ok((slices, grid))
}

/// The grid of the series in `dir`, from the headers alone.
pub(super) fn read_grid(dir: &Path) -> Result<Grid, IoError> {
    Ok(stack(dir, false)?.1)
}

/// The rescaled values of one slice, row by row.
fn pixels(s: &Slice) -> Result<Vec<f32>, IoError> {
    let f = s.file.as_path();
    let ts = s.object.meta().transfer_syntax().trim_end_matches('\0').trim();
    let big = match ts {
        IMPLICIT_LE | EXPLICIT_LE => false,
        EXPLICIT_BE => true,
        other => {
            let name = dicom_transfer_syntax_name(other);
            return Err(IoError::new(
                f,
                format!(
                    "transfer syntax {other}{name} is compressed or not supported; decompress the series first (e.g. gdcmconv --raw)"
                ),
            ));
        }
    };
    // an absent or unreadable optional attribute takes its default
    let opt = |tag: Tag| -> Option<usize> {
        s.object.element_opt(tag).ok().flatten().and_then(|e| e.to_int::<u32>().ok()).map(|v| v as usize)
    };
    let frames = text(&s.object, tags::NUMBER_OF_FRAMES).and_then(|t| t.parse::<usize>().ok()).unwrap_or(1);
    if frames != 1 {
        return Err(IoError::new(f, format!("multi-frame images ({frames} frames) are not supported")));
    }
    if opt(tags::SAMPLES_PER_PIXEL).unwrap_or(1) != 1 {
        return Err(IoError::new(f, "only greyscale images (SamplesPerPixel = 1) are supported"));
    }
    let allocated = uint(&s.object, f, tags::BITS_ALLOCATED, "BitsAllocated")?;
    let stored = opt(tags::BITS_STORED).unwrap_or(allocated);
    let high = opt(tags::HIGH_BIT).unwrap_or(stored.saturating_sub(1));
    let signed = opt(tags::PIXEL_REPRESENTATION) == Some(1);
    if !matches!(allocated, 8 | 16 | 32) || stored == 0 || stored > allocated || high + 1 < stored || high >= allocated
    {
        return Err(IoError::new(
            f,
            format!("unsupported sample layout: BitsAllocated {allocated}, BitsStored {stored}, HighBit {high}"),
        ));
    }
    let value = element(&s.object, f, tags::PIXEL_DATA, "PixelData")?.value();
    let Some(prim) = value.primitive() else {
        return Err(IoError::new(f, "pixel data are encapsulated (compressed); decompress the series first"));
    };
    let bytes = file_bytes(prim, big);
    let (step, count) = (allocated / 8, s.rows * s.cols);
    if bytes.len() < count * step {
        return Err(IoError::new(
            f,
            format!(
                "pixel data are truncated: {} bytes for {} x {} samples of {allocated} bits",
                bytes.len(),
                s.cols,
                s.rows
            ),
        ));
    }
    let shift = high + 1 - stored;
    let mask = if stored == 64 { u64::MAX } else { (1u64 << stored) - 1 };
    Ok(bytes[..count * step]
        .chunks_exact(step)
        .map(|c| {
            let mut raw = 0u64;
            for (i, &b) in c.iter().enumerate() {
                let at = if big { step - 1 - i } else { i };
                raw |= (b as u64) << (8 * at);
            }
            let v = (raw >> shift) & mask;
            let v = if signed && v >> (stored - 1) & 1 == 1 { v as i64 - (1i64 << stored) } else { v as i64 };
            (v as f64 * s.slope + s.intercept) as f32
        })
        .collect())
}

/// The pixel data as stored in the file: dicom-object decodes OW and other word values into
/// native numbers, which are turned back into the file's byte order.
fn file_bytes(v: &dicom_core::PrimitiveValue, big: bool) -> Vec<u8> {
    use dicom_core::PrimitiveValue as P;
    macro_rules! bytes {
        ($vals:expr) => {
            $vals.iter().flat_map(|x| if big { x.to_be_bytes().to_vec() } else { x.to_le_bytes().to_vec() }).collect()
        };
    }
    match v {
        P::U8(b) => b.to_vec(),
        P::U16(w) => bytes!(w),
        P::I16(w) => bytes!(w),
        P::U32(w) => bytes!(w),
        P::I32(w) => bytes!(w),
        P::F32(w) => bytes!(w),
        _ => v.to_bytes().into_owned(),
    }
}

fn dicom_transfer_syntax_name(uid: &str) -> String {
    let name = match uid {
        "1.2.840.10008.1.2.1.99" => "Deflated Explicit VR Little Endian",
        "1.2.840.10008.1.2.4.50" => "JPEG Baseline",
        "1.2.840.10008.1.2.4.51" => "JPEG Extended",
        "1.2.840.10008.1.2.4.57" | "1.2.840.10008.1.2.4.70" => "JPEG Lossless",
        "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81" => "JPEG-LS",
        "1.2.840.10008.1.2.4.90" | "1.2.840.10008.1.2.4.91" => "JPEG 2000",
        "1.2.840.10008.1.2.5" => "RLE Lossless",
        _ => return String::new(),
    };
    format!(" ({name})")
}

/// Reads the series in `dir`: every voxel's rescaled value, slice after slice.
pub(super) fn read(dir: &Path) -> Result<Decoded, IoError> {
    let (slices, grid) = stack(dir, true)?;
    let mut values = Vec::with_capacity(grid.num_voxels());
    // each slice's file is dropped once its pixels are copied out
    for s in slices {
        values.extend(pixels(&s)?);
    }
    Ok(Decoded::values(Layout { grid, components: 1, comp_stride: 1, float: false }, values))
}

#[cfg(test)]
mod tests {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
    use registration::Space;

    use super::*;
    use crate::io::{read_image as read_volume, read_label_map as read_labels};

    /// One slice of a series: `values` row by row, stored as int16 with slope 2, intercept −10.
    struct Spec<'a> {
        series: &'a str,
        position: [f64; 3],
        orientation: [f64; 6],
        ts: &'a str,
        values: Vec<i16>,
    }

    fn ds(v: &[f64]) -> PrimitiveValue {
        PrimitiveValue::Strs(v.iter().map(|x| format!("{x}")).collect())
    }

    fn write(path: &Path, s: &Spec) {
        let mut o = InMemDicomObject::new_empty();
        let mut put = |tag, vr, v: PrimitiveValue| {
            o.put(DataElement::new(tag, vr, v));
        };
        put(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.2".into());
        put(tags::SERIES_INSTANCE_UID, VR::UI, s.series.into());
        put(tags::SERIES_DESCRIPTION, VR::LO, format!("series {}", s.series).into());
        put(tags::IMAGE_POSITION_PATIENT, VR::DS, ds(&s.position));
        put(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, ds(&s.orientation));
        put(tags::PIXEL_SPACING, VR::DS, ds(&[0.5, 0.75]));
        put(tags::RESCALE_SLOPE, VR::DS, "2".into());
        put(tags::RESCALE_INTERCEPT, VR::DS, "-10".into());
        put(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16));
        put(tags::ROWS, VR::US, PrimitiveValue::from(2u16));
        put(tags::COLUMNS, VR::US, PrimitiveValue::from(3u16));
        put(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16));
        put(tags::BITS_STORED, VR::US, PrimitiveValue::from(12u16));
        put(tags::HIGH_BIT, VR::US, PrimitiveValue::from(11u16));
        put(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(1u16));
        // 12-bit two's complement in the low bits, garbage above them, as some scanners store
        let words: Vec<u16> = s.values.iter().map(|&v| (v as u16 & 0x0fff) | 0x5000).collect();
        put(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(words.into()));
        let meta = FileMetaTableBuilder::new()
            .transfer_syntax(s.ts)
            .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.2")
            .media_storage_sop_instance_uid(format!("1.2.3.{}", s.position[2].abs() as u32));
        o.with_meta(meta).unwrap().write_to_file(path).unwrap();
    }

    const AXIAL: [f64; 6] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];

    /// Three slices written out of order; positions along −z as the normal points, with x, y
    /// shifted to test that the in-plane origin comes from the first slice.
    fn series(dir: &Path, zs: &[f64], ts: &str) {
        for (i, &z) in zs.iter().enumerate() {
            let values: Vec<i16> = (0..6).map(|v| v + 10 * z as i16).collect();
            let spec = Spec { series: "1.2.3", position: [-5.0, 7.0, z], orientation: AXIAL, ts, values };
            write(&dir.join(format!("IM{:03}", (i * 7) % zs.len())), &spec);
        }
    }

    #[test]
    fn reads_a_series_sorted_and_rescaled() {
        let dir = tempfile::tempdir().unwrap();
        series(dir.path(), &[4.0, -2.0, 1.0], IMPLICIT_LE);
        std::fs::write(dir.path().join("README.txt"), "not DICOM").unwrap();
        let v = read_volume(dir.path()).unwrap();
        assert_eq!(v.grid.shape(), [3, 2, 3]);
        assert_eq!(v.grid.spacing(), [0.75, 0.5, 3.0]);
        assert_eq!(v.grid.map([0.0; 3], Space::Voxel, Space::Lps), [-5.0, 7.0, -2.0]);
        assert_eq!(v.grid.map([1.0, 1.0, 1.0], Space::Voxel, Space::Lps), [-4.25, 7.5, 1.0]);
        // sorted along +z, values rescaled: 2 · (v + 10 z) − 10
        let want: Vec<f32> =
            [-2.0f32, 1.0, 4.0].iter().flat_map(|z| (0..6).map(move |v| 2.0 * (v as f32 + 10.0 * z) - 10.0)).collect();
        assert_eq!(v.data, want);
        assert_eq!(read_grid(dir.path()).unwrap(), v.grid);
        assert!(read_labels(dir.path()).unwrap_err().to_string().contains("negative"));
    }

    #[test]
    fn explicit_vr_both_endians() {
        for ts in [EXPLICIT_LE, EXPLICIT_BE] {
            let dir = tempfile::tempdir().unwrap();
            series(dir.path(), &[0.0, 2.5], ts);
            let v = read_volume(dir.path()).unwrap();
            assert_eq!(v.data[..6], [-10.0, -8.0, -6.0, -4.0, -2.0, 0.0], "{ts}");
            assert_eq!(v.grid.spacing()[2], 2.5);
        }
    }

    #[test]
    fn oblique_orientation_gives_the_normal_as_third_axis() {
        let dir = tempfile::tempdir().unwrap();
        let (c, s) = (0.8f64, 0.6f64);
        let o = [c, s, 0.0, 0.0, 0.0, -1.0]; // a tilted coronal-ish plane
        let n = Vector3::new(c, s, 0.0).cross(&Vector3::new(0.0, 0.0, -1.0));
        for k in 0..3 {
            let p = Vector3::new(1.0, 2.0, 3.0) + n * (2.0 * k as f64);
            let spec =
                Spec { series: "9", position: [p.x, p.y, p.z], orientation: o, ts: EXPLICIT_LE, values: vec![1; 6] };
            write(&dir.path().join(format!("s{k}")), &spec);
        }
        let g = read_grid(dir.path()).unwrap();
        let m = g.matrix(Space::Voxel, Space::Lps);
        let k = Vector3::new(m[(0, 2)], m[(1, 2)], m[(2, 2)]);
        assert!((k - 2.0 * n).norm() < 1e-9, "{m}");
        assert!((g.map([0.0; 3], Space::Voxel, Space::Lps)[0] - 1.0).abs() < 1e-12);
    }

    fn err(dir: &Path) -> String {
        let e = read_volume(dir).unwrap_err().to_string();
        assert!(e.starts_with(&dir.display().to_string()), "{e}");
        e
    }

    #[test]
    fn bad_series() {
        // uneven gaps
        let dir = tempfile::tempdir().unwrap();
        series(dir.path(), &[0.0, 1.0, 3.0], IMPLICIT_LE);
        assert!(err(dir.path()).contains("uneven slice spacing"));
        // two slices at one position
        let dir = tempfile::tempdir().unwrap();
        series(dir.path(), &[0.0, 1.0], IMPLICIT_LE);
        let spec = Spec {
            series: "1.2.3",
            position: [-5.0, 7.0, 1.0],
            orientation: AXIAL,
            ts: IMPLICIT_LE,
            values: vec![0; 6],
        };
        write(&dir.path().join("dup"), &spec);
        assert!(err(dir.path()).contains("same position"));
        // two series
        let dir = tempfile::tempdir().unwrap();
        series(dir.path(), &[0.0, 1.0], IMPLICIT_LE);
        let spec =
            Spec { series: "4.5.6", position: [0.0; 3], orientation: AXIAL, ts: IMPLICIT_LE, values: vec![0; 6] };
        write(&dir.path().join("other"), &spec);
        let e = err(dir.path());
        assert!(e.contains("2 DICOM series") && e.contains("1.2.3") && e.contains("4.5.6"), "{e}");
        // gantry tilt
        let dir = tempfile::tempdir().unwrap();
        for k in 0..3 {
            let spec = Spec {
                series: "1",
                position: [0.0, 0.5 * k as f64, 2.0 * k as f64],
                orientation: AXIAL,
                ts: IMPLICIT_LE,
                values: vec![0; 6],
            };
            write(&dir.path().join(format!("t{k}")), &spec);
        }
        assert!(err(dir.path()).contains("gantry tilt"));
        // compressed transfer syntax: refused by name, naming the file
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec {
            series: "1",
            position: [0.0; 3],
            orientation: AXIAL,
            ts: "1.2.840.10008.1.2.4.50",
            values: vec![0; 6],
        };
        write(&dir.path().join("z"), &spec);
        let e = err(dir.path());
        assert!(e.contains("JPEG Baseline") && e.contains("decompress"), "{e}");
        // truncated file
        let dir = tempfile::tempdir().unwrap();
        series(dir.path(), &[0.0, 1.0], IMPLICIT_LE);
        let f = dir.path().join("IM000");
        let b = std::fs::read(&f).unwrap();
        std::fs::write(&f, &b[..b.len() - 5]).unwrap();
        let e = err(dir.path());
        assert!(e.contains("IM000"), "{e}");
        // empty folder, missing geometry
        let dir = tempfile::tempdir().unwrap();
        assert!(err(dir.path()).contains("no DICOM files"));
    }
}
