//! Transform files that ITK, SimpleITK, ANTs and Slicer read and write: ITK's text format
//! (`.tfm`, `.txt`), ITK's MATLAB 4 files (`.mat`, as ANTs' `0GenericAffine.mat`) and
//! displacement fields.
//!
//! ITK's affine parameters are the matrix (row-major) and a translation, its fixed parameters
//! the centre `c`: `x ↦ A (x − c) + c + t`, on LPS points, from the fixed to the moving image.
//! 2D transforms (`_2_2`) act on the plane of a one-voxel-deep grid and leave `z` alone.

use std::path::Path;

use nalgebra::{Matrix3, Vector3};
use registration::compose::{FieldSampler, Step};
use registration::transform::Affine;
use registration::{DisplacementField, Space};

use super::atomic::write_atomic;
use super::IoError;

/// Larger transform files than this are not text or MATLAB transforms (an affine is ~300 bytes).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// How a transform file is stored, told by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransformFormat {
    /// ITK's "Insight Transform File V1.0" text.
    Text,
    /// ITK's MatlabTransformIO: MATLAB level 4 vectors.
    Matlab,
    /// A displacement field image (ITK convention).
    Field,
}

impl TransformFormat {
    pub fn of(path: &Path) -> Result<Self, IoError> {
        let name = path.to_string_lossy().to_ascii_lowercase();
        if name.ends_with(".tfm") || name.ends_with(".txt") {
            Ok(Self::Text)
        } else if name.ends_with(".mat") {
            Ok(Self::Matlab)
        } else if name.ends_with(".h5") || name.ends_with(".hdf5") {
            Err(IoError::new(
                path,
                "HDF5 transforms are not read; convert it with SimpleITK (ReadTransform, then WriteTransform to \
                 .tfm for affines, or TransformToDisplacementField for the rest)",
            ))
        } else if super::check_field_format(path).is_ok() {
            Ok(Self::Field)
        } else {
            Err(IoError::new(
                path,
                "unknown transform file type; expected .tfm or .txt (ITK text), .mat (ITK/ANTs MATLAB) or a \
                 displacement field (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd)",
            ))
        }
    }
}

/// One transform as ITK names and parameterises it.
#[derive(Debug, Clone, PartialEq)]
struct ItkTransform {
    name: String,
    parameters: Vec<f64>,
    fixed: Vec<f64>,
}

/// `AffineTransform_double_3_3` → (`AffineTransform`, 3).
fn split_name(name: &str) -> Option<(&str, usize)> {
    let mut parts = name.rsplitn(4, '_');
    let (out, inp, precision, base) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if out != inp || !matches!(precision, "double" | "float") {
        return None;
    }
    let dim = match out {
        "2" => 2,
        "3" => 3,
        _ => return None,
    };
    Some((base, dim))
}

impl ItkTransform {
    /// `affine` with its centre `centre` (LPS mm), `_2_2` when `two_d` (the plane of `centre`).
    fn from_affine(affine: &Affine, centre: [f64; 3], two_d: bool) -> Self {
        let m = &affine.matrix;
        let dim = if two_d { 2 } else { 3 };
        // in 2D, the plane's z folds into the offset
        let offset: Vec<f64> = (0..dim).map(|r| m[(r, 3)] + if two_d { m[(r, 2)] * centre[2] } else { 0.0 }).collect();
        let mut parameters: Vec<f64> = (0..dim).flat_map(|r| (0..dim).map(move |c| m[(r, c)])).collect();
        for r in 0..dim {
            let ac: f64 = (0..dim).map(|c| m[(r, c)] * centre[c]).sum();
            parameters.push(offset[r] - centre[r] + ac);
        }
        Self { name: format!("AffineTransform_double_{dim}_{dim}"), parameters, fixed: centre[..dim].to_vec() }
    }

    /// The transform as an affine map of 3D LPS points; `Ok(None)` for a composite's header.
    fn to_affine(&self) -> Result<Option<Affine>, String> {
        let (base, dim) = split_name(&self.name).ok_or_else(|| {
            format!("transform type {:?} is not of the form Name_double_3_3 (or _float_, _2_2)", self.name)
        })?;
        if let Some(bad) = self.parameters.iter().chain(&self.fixed).find(|v| !v.is_finite()) {
            return Err(format!("{} has a non-finite parameter ({bad})", self.name));
        }
        let count = |what: &str, got: usize, want: &[usize]| {
            if want.contains(&got) {
                Ok(())
            } else {
                Err(format!("{} needs {} {what}, the file has {got}", self.name, want[0]))
            }
        };
        let mut lin = Matrix3::identity();
        let mut t = Vector3::zeros();
        let mut c = Vector3::zeros();
        match base {
            "CompositeTransform" => return Ok(None),
            "AffineTransform" | "MatrixOffsetTransformBase" => {
                count("parameters", self.parameters.len(), &[dim * dim + dim])?;
                count("fixed parameters (the centre)", self.fixed.len(), &[dim, 0])?;
                for r in 0..dim {
                    for col in 0..dim {
                        lin[(r, col)] = self.parameters[r * dim + col];
                    }
                    t[r] = self.parameters[dim * dim + r];
                    c[r] = self.fixed.get(r).copied().unwrap_or(0.0);
                }
            }
            "TranslationTransform" => {
                count("parameters", self.parameters.len(), &[dim])?;
                for r in 0..dim {
                    t[r] = self.parameters[r];
                }
            }
            "IdentityTransform" => {}
            _ => {
                return Err(format!(
                    "transform type {base} is not supported (obelisk reads AffineTransform, \
                     MatrixOffsetTransformBase, TranslationTransform, IdentityTransform and CompositeTransforms of \
                     them, and displacement fields as images)"
                ))
            }
        }
        Ok(Some(Affine::about_centre(lin, c.into(), t.into())))
    }
}

/// The affine maps of a list of ITK transforms, in ITK order (a composite's header dropped).
fn affines(path: &Path, list: &[ItkTransform]) -> Result<Vec<Affine>, IoError> {
    let mut out = Vec::new();
    for t in list {
        if let Some(a) = t.to_affine().map_err(|m| IoError::new(path, m))? {
            out.push(a);
        }
    }
    if out.is_empty() {
        return Err(IoError::new(path, "holds no transform"));
    }
    Ok(out)
}

fn format_values(v: &[f64]) -> String {
    // `{:?}` is the shortest text that reads back to the same double
    v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(" ")
}

fn text(list: &[ItkTransform]) -> String {
    let mut s = String::from("#Insight Transform File V1.0\n");
    for (i, t) in list.iter().enumerate() {
        s.push_str(&format!(
            "#Transform {i}\nTransform: {}\nParameters: {}\nFixedParameters: {}\n",
            t.name,
            format_values(&t.parameters),
            format_values(&t.fixed)
        ));
    }
    s
}

fn parse_text(path: &Path, s: &str) -> Result<Vec<ItkTransform>, IoError> {
    let err = |line: usize, m: String| IoError::new(path, format!("line {line}: {m}"));
    let mut list: Vec<ItkTransform> = Vec::new();
    for (no, line) in s.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(err(no, format!("expected 'Key: values', found {line:?}")));
        };
        let numbers = || -> Result<Vec<f64>, IoError> {
            value
                .split_whitespace()
                .map(|w| w.parse::<f64>().map_err(|_| err(no, format!("{w:?} is not a number"))))
                .collect()
        };
        match key.trim() {
            "Transform" => {
                list.push(ItkTransform { name: value.trim().to_string(), parameters: vec![], fixed: vec![] })
            }
            "Parameters" | "FixedParameters" => {
                let Some(t) = list.last_mut() else {
                    return Err(err(no, format!("{} before any 'Transform:' line", key.trim())));
                };
                if key.trim() == "Parameters" {
                    t.parameters = numbers()?;
                } else {
                    t.fixed = numbers()?;
                }
            }
            other => return Err(err(no, format!("unknown key {other:?}"))),
        }
    }
    if list.is_empty() {
        return Err(IoError::new(path, "not an ITK transform file (no 'Transform:' line)"));
    }
    Ok(list)
}

/// MATLAB 4 type code of little-endian, column-wise, double-precision, numeric data.
const MAT4_LE_DOUBLE: i32 = 0;

fn mat4_record(out: &mut Vec<u8>, name: &str, values: &[f64]) {
    for v in [MAT4_LE_DOUBLE, values.len() as i32, 1, 0, name.len() as i32 + 1] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn matlab(list: &[ItkTransform]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in list {
        mat4_record(&mut out, &t.name, &t.parameters);
        mat4_record(&mut out, "fixed", &t.fixed);
    }
    out
}

/// The named vectors of a MATLAB 4 file, in order.
fn parse_mat4(path: &Path, b: &[u8]) -> Result<Vec<(String, Vec<f64>)>, IoError> {
    let err = |m: String| IoError::new(path, m);
    if b.starts_with(b"MATLAB 5.0") || b.starts_with(b"MATLAB 7.3") {
        return Err(err("a MATLAB 5/7 file; ITK and ANTs transforms are MATLAB 4 files".into()));
    }
    let mut records = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let Some(h) = b.get(at..at + 20) else {
            return Err(err(format!("truncated MATLAB 4 header at byte {at}")));
        };
        let word = |i: usize, big: bool| {
            let w = [h[4 * i], h[4 * i + 1], h[4 * i + 2], h[4 * i + 3]];
            if big {
                i32::from_be_bytes(w)
            } else {
                i32::from_le_bytes(w)
            }
        };
        // the type's thousands digit says the byte order; it must agree with how it reads
        let big = match (word(0, false), word(0, true)) {
            (t, _) if (0..1000).contains(&t) => false,
            (_, t) if (1000..2000).contains(&t) => true,
            _ => return Err(err(format!("not a MATLAB 4 file (bad type code at byte {at})"))),
        };
        let [ty, rows, cols, imag, namlen] = [0, 1, 2, 3, 4].map(|i| word(i, big));
        let (structure, precision, kind) = ((ty / 100) % 10, (ty / 10) % 10, ty % 10);
        if structure != 0 || kind != 0 || imag != 0 {
            return Err(err(format!("MATLAB 4 record at byte {at} is not a real numeric matrix (type {ty})")));
        }
        let size = match precision {
            0 => 8,
            1 => 4,
            _ => return Err(err(format!("MATLAB 4 record at byte {at} is neither double nor single precision"))),
        };
        if !(1..=4096).contains(&namlen) || rows < 0 || cols < 0 {
            return Err(err(format!("corrupt MATLAB 4 header at byte {at}")));
        }
        let n = rows as usize * cols as usize;
        let name_at = at + 20;
        let data_at = name_at + namlen as usize;
        let end = data_at + n * size;
        if end > b.len() {
            return Err(err(format!("truncated MATLAB 4 record at byte {at} ({n} values announced)")));
        }
        if cols != 1 && n > 0 {
            return Err(err(format!("MATLAB 4 record at byte {at} is a {rows}x{cols} matrix; ITK stores vectors")));
        }
        let raw_name = &b[name_at..data_at];
        let name = String::from_utf8_lossy(raw_name.split(|&c| c == 0).next().unwrap_or(raw_name)).into_owned();
        let values = b[data_at..end]
            .chunks_exact(size)
            .map(|c| match (size, big) {
                (8, false) => f64::from_le_bytes(c.try_into().unwrap()),
                (8, true) => f64::from_be_bytes(c.try_into().unwrap()),
                (_, false) => f32::from_le_bytes(c.try_into().unwrap()) as f64,
                (_, true) => f32::from_be_bytes(c.try_into().unwrap()) as f64,
            })
            .collect();
        records.push((name, values));
        at = end;
    }
    Ok(records)
}

fn parse_matlab(path: &Path, b: &[u8]) -> Result<Vec<ItkTransform>, IoError> {
    let records = parse_mat4(path, b)?;
    if records.is_empty() {
        return Err(IoError::new(path, "empty file"));
    }
    records
        .chunks(2)
        .map(|pair| match pair {
            [(name, parameters), (fixed_name, fixed)] if fixed_name == "fixed" => {
                Ok(ItkTransform { name: name.clone(), parameters: parameters.clone(), fixed: fixed.clone() })
            }
            _ => Err(IoError::new(
                path,
                format!("the vector {:?} is not followed by its 'fixed' parameters, as ITK writes them", pair[0].0),
            )),
        })
        .collect()
}

fn read_small(path: &Path) -> Result<Vec<u8>, IoError> {
    let meta = std::fs::metadata(path).map_err(|e| IoError::new(path, format!("cannot be read: {e}")))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(IoError::new(path, format!("{} bytes is too large for an affine transform file", meta.len())));
    }
    std::fs::read(path).map_err(|e| IoError::new(path, format!("cannot be read: {e}")))
}

/// The affine maps of a `.tfm`/`.txt` or `.mat` file, in ITK order (one, or a composite's).
pub fn read_affines(path: &Path) -> Result<Vec<Affine>, IoError> {
    let bytes = read_small(path)?;
    let list = match TransformFormat::of(path)? {
        TransformFormat::Text => {
            let s = std::str::from_utf8(&bytes).map_err(|_| IoError::new(path, "not a text file"))?;
            parse_text(path, s)?
        }
        TransformFormat::Matlab => parse_matlab(path, &bytes)?,
        TransformFormat::Field => return Err(IoError::new(path, "is a displacement field, not an affine transform")),
    };
    affines(path, &list)
}

/// The steps of a transform file of any supported kind, in ITK order.
pub fn read_steps(path: &Path) -> Result<Vec<Step>, IoError> {
    Ok(match TransformFormat::of(path)? {
        TransformFormat::Field => vec![Step::Field(FieldSampler::new(super::read_field(path)?))],
        _ => read_affines(path)?.into_iter().map(Step::Affine).collect(),
    })
}

/// Writes `affine` (fixed LPS → moving LPS) as ITK text (`.tfm`, `.txt`) or MATLAB 4 (`.mat`),
/// centred on `centre` (LPS mm, usually the fixed image's centre, as ANTs does); 2D
/// (`AffineTransform_double_2_2`, in the plane of `centre`) when `two_d`.
pub fn write_affine(path: &Path, affine: &Affine, centre: [f64; 3], two_d: bool) -> Result<(), IoError> {
    let list = [ItkTransform::from_affine(affine, centre, two_d)];
    let bytes = match TransformFormat::of(path)? {
        TransformFormat::Text => text(&list).into_bytes(),
        TransformFormat::Matlab => matlab(&list),
        TransformFormat::Field => return Err(IoError::new(path, "an affine is written as .tfm, .txt or .mat")),
    };
    write_atomic(path, |w| std::io::Write::write_all(w, &bytes))
}

/// ITK's `DisplacementFieldTransform` parameters of `field`: the vectors voxel by voxel (`i`
/// fastest), then the fixed parameters size, origin, spacing and direction (row-major), LPS.
fn displacement_field_transform(field: &DisplacementField) -> ItkTransform {
    let g = &field.grid;
    let dim = if g.is_2d() { 2 } else { 3 };
    let n = g.num_voxels();
    let parameters = (0..n).flat_map(|v| (0..dim).map(move |a| field.data[a * n + v] as f64)).collect();
    let origin = g.map([0.0; 3], Space::Voxel, Space::Lps);
    let to_lps = Matrix3::from_diagonal(&Vector3::new(-1.0, -1.0, 1.0)) * g.direction_ras();
    let mut fixed: Vec<f64> = g.shape()[..dim].iter().map(|&s| s as f64).collect();
    fixed.extend_from_slice(&origin[..dim]);
    fixed.extend_from_slice(&g.spacing()[..dim]);
    fixed.extend((0..dim).flat_map(|r| (0..dim).map(move |c| to_lps[(r, c)])));
    ItkTransform { name: format!("DisplacementFieldTransform_double_{dim}_{dim}"), parameters, fixed }
}

/// Writes the composite transform `[affine, field]` (ITK order: the field acts first, on the
/// points of its grid, then the affine map) as ITK's HDF5TransformIO does:
/// `/TransformGroup/N/{TransformType, TransformFixedParameters, TransformParameters}`.
/// `sitk.ReadTransform` and `antsApplyTransforms` read it.
pub fn write_composite_h5(
    path: &Path,
    affine: &Affine,
    centre: [f64; 3],
    field: &DisplacementField,
) -> Result<(), IoError> {
    let two_d = field.grid.is_2d();
    let dim = if two_d { 2 } else { 3 };
    let list = [ItkTransform::from_affine(affine, centre, two_d), displacement_field_transform(field)];
    // ITK reads the type names into an ASCII variable-length string: HDF5 has no conversion
    // from the UTF-8 strings the builder writes by default
    let ascii = || hdf5_pure::Datatype::VariableLength {
        is_string: true,
        padding: Some(hdf5_pure::StringPadding::NullTerminate),
        charset: Some(hdf5_pure::CharacterSet::Ascii),
        base_type: Box::new(hdf5_pure::make_u8_type()),
    };
    let mut file = hdf5_pure::FileBuilder::new();
    let mut group = file.create_group("TransformGroup");
    let composite = format!("CompositeTransform_double_{dim}_{dim}");
    let mut head = group.create_group("0");
    head.create_dataset("TransformType").with_vlen_strings(&[&composite]).with_dtype(ascii());
    group.add_group(head.finish());
    for (i, t) in list.iter().enumerate() {
        let mut g = group.create_group(&(i + 1).to_string());
        g.create_dataset("TransformType").with_vlen_strings(&[&t.name]).with_dtype(ascii());
        g.create_dataset("TransformFixedParameters").with_f64_data(&t.fixed);
        g.create_dataset("TransformParameters").with_f64_data(&t.parameters);
        group.add_group(g.finish());
    }
    file.add_group(group.finish());
    let bytes = file.finish().map_err(|e| IoError::new(path, format!("cannot encode HDF5: {e}")))?;
    write_atomic(path, |w| std::io::Write::write_all(w, &bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn affine() -> Affine {
        let r = nalgebra::Rotation3::from_euler_angles(0.1, -0.2, 0.3).into_inner();
        Affine::about_centre(r * 1.1, [3.0, -4.0, 5.0], [1.5, 2.5, -3.5])
    }

    #[test]
    fn text_and_matlab_round_trip_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let a = affine();
        for name in ["a.tfm", "a.txt", "a.mat"] {
            let p = dir.path().join(name);
            write_affine(&p, &a, [10.0, 20.0, -30.0], false).unwrap();
            let back = read_affines(&p).unwrap();
            assert_eq!(back.len(), 1);
            assert!((back[0].matrix - a.matrix).abs().max() < 1e-12, "{name}: {}", back[0].matrix);
        }
        let s = std::fs::read_to_string(dir.path().join("a.tfm")).unwrap();
        assert!(s.starts_with("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"));
        // ITK's MatlabTransformIO layout: two little-endian double vectors, type name then "fixed"
        let b = std::fs::read(dir.path().join("a.mat")).unwrap();
        assert_eq!(b.len(), 20 + 27 + 12 * 8 + 20 + 6 + 3 * 8);
        assert_eq!(&b[..20], &[0, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 27, 0, 0, 0]);
        assert_eq!(&b[20..47], b"AffineTransform_double_3_3\0");
    }

    #[test]
    fn two_d_transforms_act_in_the_plane() {
        let dir = tempfile::tempdir().unwrap();
        let a = Affine::about_centre(
            Matrix3::new(0.9, -0.2, 0.0, 0.25, 1.05, 0.0, 0.0, 0.0, 1.0),
            [4.0, 5.0, 0.0],
            [3.0, -2.0, 0.0],
        );
        let p = dir.path().join("a.mat");
        write_affine(&p, &a, [1.0, 2.0, 0.0], true).unwrap();
        let back = read_affines(&p).unwrap();
        assert!((back[0].matrix - a.matrix).abs().max() < 1e-12);
        let s = text(&[ItkTransform::from_affine(&a, [1.0, 2.0, 0.0], true)]);
        assert!(s.contains("AffineTransform_double_2_2\nParameters: 0.9 -0.2 0.25 1.05 "), "{s}");
    }

    #[test]
    fn reads_what_itk_and_ants_write() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.tfm");
        std::fs::write(
            &p,
            "#Insight Transform File V1.0\n#Transform 0\nTransform: CompositeTransform_double_3_3\n\
             #Transform 1\nTransform: MatrixOffsetTransformBase_float_3_3\n\
             Parameters: 1 0 0 0 1 0 0 0 1 1e1 0 0\nFixedParameters: 0 0 0\n\
             #Transform 2\nTransform: TranslationTransform_double_3_3\nParameters: 0 2 0\nFixedParameters:\n",
        )
        .unwrap();
        let a = read_affines(&p).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].apply([0.0; 3]), [10.0, 0.0, 0.0]);
        assert_eq!(a[1].apply([0.0; 3]), [0.0, 2.0, 0.0]);
        // single precision, big-endian MATLAB 4 (type 1010)
        let mut b = Vec::new();
        for (name, vals) in [
            ("AffineTransform_float_3_3", vec![2.0f32, 0., 0., 0., 2., 0., 0., 0., 2., 1., 1., 1.]),
            ("fixed", vec![1.0, 1.0, 1.0]),
        ] {
            for v in [1010i32, vals.len() as i32, 1, 0, name.len() as i32 + 1] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            for v in vals {
                b.extend_from_slice(&v.to_be_bytes());
            }
        }
        let m = dir.path().join("ants.mat");
        std::fs::write(&m, &b).unwrap();
        let a = read_affines(&m).unwrap();
        // 2 (x − 1) + 1 + 1
        assert_eq!(a[0].apply([0.0; 3]), [0.0, 0.0, 0.0]);
        assert_eq!(a[0].apply([1.0, 2.0, 3.0]), [2.0, 4.0, 6.0]);
    }

    #[test]
    fn bad_files_are_named_and_explained() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(&str, &[u8], &str)] = &[
            ("a.tfm", b"hello\n", "expected 'Key: values'"),
            ("b.tfm", b"#Insight Transform File V1.0\n", "no 'Transform:' line"),
            ("c.tfm", b"Transform: AffineTransform_double_3_3\nParameters: 1 2 3\n", "needs 12 parameters"),
            ("d.tfm", b"Transform: BSplineTransform_double_3_3\nParameters: 1\n", "not supported"),
            ("e.tfm", b"Transform: AffineTransform_double_3_3\nParameters: 1 0 0 0 1 0 0 0 1 0 0 x\n", "not a number"),
            ("f.tfm", b"Transform: AffineTransform_double_3_3\nParameters: 1 0 0 0 1 0 0 0 1 0 0 NaN\n", "non-finite"),
            ("g.tfm", b"Transform: Affine\n", "not of the form"),
            ("h.mat", b"MATLAB 5.0 MAT-file, written by scipy", "MATLAB 5/7"),
            ("i.mat", b"\0\0\0\0\x0c\0\0\0", "truncated MATLAB 4 header"),
            ("j.mat", b"", "empty file"),
            ("k.mat", b"\0\0\0\0\x0c\0\0\0\x01\0\0\0\0\0\0\0\x06\0\0\0fixed\0", "truncated MATLAB 4 record"),
        ];
        for (name, bytes, want) in cases {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            let e = read_affines(&p).unwrap_err().to_string();
            assert!(e.starts_with(&p.display().to_string()) && e.contains(want), "{name}: {e}");
        }
        let e = read_steps(&dir.path().join("x.h5")).err().unwrap().to_string();
        assert!(e.contains("HDF5"), "{e}");
        let e = read_steps(&dir.path().join("x.csv")).err().unwrap().to_string();
        assert!(e.contains("unknown transform file type"), "{e}");
    }
}
