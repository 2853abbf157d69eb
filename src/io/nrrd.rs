//! NRRD: `.nrrd` (header and data in one file) and `.nhdr` (the header names its `data file`).
//!
//! Read: encodings raw and gzip, either endianness, (u)int8/16/32/64, float and double, 2 or 3
//! domain axes plus at most one axis of vector components (the one whose `space directions`
//! entry is `none`, or, without space directions, whose `kinds` entry is not a domain kind).
//! Geometry follows ITK's `NrrdImageIO`: directions and origin in a right-anterior-superior
//! space are turned into LPS, in left-anterior-superior only x flips, and every other space
//! (`left-posterior-superior`, `scanner-xyz`, `3D-right-handed`, ...) is taken as LPS. Without
//! `space directions` the axes are `spacings` (1 where missing) along x, y, z; without `space
//! origin` the origin is 0. As in ITK, vector values are not reoriented.
//!
//! Written: one `.nrrd` file, gzip, little-endian, in `left-posterior-superior` space (2D images
//! in the plane z = 0 as `space dimension: 2`, as ITK writes them).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use flate2::write::GzEncoder;
use registration::Grid;

use super::atomic::write_atomic;
use super::nifti::DataType;
use super::raster::{self, Block, Codec, Header, Layout, Payload};
use super::IoError;

/// Headers are a few hundred bytes; this bounds what a file without a blank line costs.
const MAX_HEADER: u64 = 1 << 20;

fn open(path: &Path, what: &str) -> Result<File, IoError> {
    File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => IoError::new(path, format!("{what}file not found")),
        _ => IoError::new(path, format!("cannot open {what}: {e}")),
    })
}

/// The header's lines and its length in bytes (through the blank line that ends it, or the
/// whole file for a detached header).
fn header_lines(path: &Path) -> Result<(Vec<String>, u64), IoError> {
    let mut r = BufReader::new(open(path, "")?).take(MAX_HEADER);
    let (mut lines, mut len) = (Vec::new(), 0u64);
    loop {
        let mut line = Vec::new();
        let n = r.read_until(b'\n', &mut line).map_err(|e| IoError::new(path, format!("cannot read: {e}")))?;
        len += n as u64;
        if n == 0 {
            if len >= MAX_HEADER {
                return Err(IoError::new(path, "header does not end within 1 MiB (no blank line)"));
            }
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        if lines.is_empty() && !(text.starts_with("NRRD000") && text.len() == 8) {
            return Err(IoError::new(path, "not a NRRD file (it does not start with the NRRD000x magic)"));
        }
        if text.is_empty() {
            break;
        }
        lines.push(text.to_string());
    }
    if lines.is_empty() {
        return Err(IoError::new(path, "file is empty (no NRRD header)"));
    }
    Ok((lines, len))
}

fn datatype(name: &str) -> Option<DataType> {
    Some(match name {
        "signed char" | "int8" | "int8_t" => DataType::I8,
        "uchar" | "unsigned char" | "uint8" | "uint8_t" => DataType::U8,
        "short" | "short int" | "signed short" | "signed short int" | "int16" | "int16_t" => DataType::I16,
        "ushort" | "unsigned short" | "unsigned short int" | "uint16" | "uint16_t" => DataType::U16,
        "int" | "signed int" | "int32" | "int32_t" => DataType::I32,
        "uint" | "unsigned int" | "uint32" | "uint32_t" => DataType::U32,
        "longlong"
        | "long long"
        | "long long int"
        | "signed long long"
        | "signed long long int"
        | "int64"
        | "int64_t" => DataType::I64,
        "ulonglong" | "unsigned long long" | "unsigned long long int" | "uint64" | "uint64_t" => DataType::U64,
        "float" => DataType::F32,
        "double" => DataType::F64,
        _ => return None,
    })
}

fn type_name(t: DataType) -> &'static str {
    match t {
        DataType::I8 => "int8",
        DataType::U8 => "uint8",
        DataType::I16 => "int16",
        DataType::U16 => "uint16",
        DataType::I32 => "int32",
        DataType::U32 => "uint32",
        DataType::I64 => "int64",
        DataType::U64 => "uint64",
        DataType::F32 => "float",
        DataType::F64 => "double",
    }
}

/// `(x,y,z)` vectors and `none`s, as in `space directions` and `space origin`.
fn vectors(text: &str, what: &str) -> Result<Vec<Option<Vec<f64>>>, String> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("none") {
            out.push(None);
            rest = r.trim_start();
        } else if let Some(r) = rest.strip_prefix('(') {
            let end = r.find(')').ok_or_else(|| format!("{what}: unbalanced parenthesis in {text:?}"))?;
            let v = raster::numbers(&r[..end], what)?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(format!("{what}: non-finite value in {text:?}"));
            }
            out.push(Some(v));
            rest = r[end + 1..].trim_start();
        } else {
            return Err(format!("{what}: cannot parse {text:?} (expected vectors like (1,0,0) or none)"));
        }
    }
    Ok(out)
}

/// Kinds of axes that hold values of one sample rather than positions.
fn is_range_kind(kind: &str) -> bool {
    !matches!(kind, "domain" | "space" | "time" | "???" | "none" | "")
}

/// Parses and validates a header.
pub(super) fn parse(path: &Path) -> Result<Header, IoError> {
    let err = |m: String| IoError::new(path, m);
    let (lines, header_len) = header_lines(path)?;
    let mut fields: HashMap<String, String> = HashMap::new();
    for line in &lines[1..] {
        if line.starts_with('#') || line.contains(":=") {
            continue; // comments, key/value pairs
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(err(format!("malformed header line {line:?} (expected \"field: value\")")));
        };
        let key = key.trim().to_ascii_lowercase();
        // the spec's alternative spellings
        let key = match key.as_str() {
            "datafile" => "data file".to_string(),
            "lineskip" => "line skip".to_string(),
            "byteskip" => "byte skip".to_string(),
            _ => key,
        };
        if fields.insert(key.clone(), value.trim().to_string()).is_some() {
            return Err(err(format!("field \"{key}\" appears twice")));
        }
    }
    let get = |k: &str| fields.get(k).map(String::as_str);
    let need = |k: &str| get(k).ok_or_else(|| err(format!("missing required field \"{k}\"")));

    let dimension: usize =
        need("dimension")?.parse().map_err(|_| err(format!("invalid dimension {:?}", get("dimension"))))?;
    if !(1..=16).contains(&dimension) {
        return Err(err(format!("dimension {dimension} is out of range")));
    }
    let sizes = raster::sizes(need("sizes")?, "sizes").map_err(err)?;
    if sizes.len() != dimension {
        return Err(err(format!("sizes lists {} axes but dimension is {dimension}", sizes.len())));
    }
    let tname = need("type")?;
    let datatype = datatype(tname)
        .ok_or_else(|| err(format!("unsupported type {tname:?} (expected (u)int8/16/32/64, float or double)")))?;
    let codec = match need("encoding")? {
        "raw" => Codec::Raw,
        "gzip" | "gz" => Codec::Gzip,
        e => return Err(err(format!("unsupported encoding {e:?} (raw and gzip are read)"))),
    };
    let big_endian = match get("endian") {
        Some("little") => false,
        Some("big") => true,
        Some(e) => return Err(err(format!("invalid endian {e:?}"))),
        None if datatype.size() == 1 => false,
        None => return Err(err("missing required field \"endian\" (needed for multi-byte types)".into())),
    };

    // which axes hold positions and which one vector components
    let kinds: Option<Vec<String>> =
        get("kinds").map(|k| k.split_whitespace().map(|s| s.to_ascii_lowercase()).collect());
    if let Some(k) = &kinds {
        if k.len() != dimension {
            return Err(err(format!("kinds lists {} axes but dimension is {dimension}", k.len())));
        }
    }
    let directions = match get("space directions") {
        Some(d) => {
            let v = vectors(d, "space directions").map_err(err)?;
            if v.len() != dimension {
                return Err(err(format!("space directions lists {} axes but dimension is {dimension}", v.len())));
            }
            Some(v)
        }
        None => None,
    };
    let range: Vec<usize> = (0..dimension)
        .filter(|&a| match &directions {
            Some(d) => d[a].is_none(),
            None => kinds.as_ref().is_some_and(|k| is_range_kind(&k[a])),
        })
        .collect();
    if range.len() > 1 {
        return Err(err(format!(
            "{} axes of vector components (axes {range:?}); at most one is supported",
            range.len()
        )));
    }
    let comp_axis = range.first().copied();
    let domain: Vec<usize> = (0..dimension).filter(|a| Some(*a) != comp_axis).collect();
    if !(2..=3).contains(&domain.len()) {
        return Err(err(format!("{} spatial axes; 2D and 3D images are supported", domain.len())));
    }
    let shape = raster::shape(&sizes, &domain).map_err(err)?;

    let grid = geometry(path, &fields, directions.as_deref(), &domain, shape)?;

    let (file, start) = match get("data file") {
        Some(f) => {
            // the multi-file forms: "LIST" or "<printf pattern> <min> <max> <step> [<subdim>]"
            if f.contains('%') || f.starts_with("LIST") {
                return Err(err(format!("data split over several files (\"data file: {f}\") is not supported")));
            }
            (raster::beside(path, f), 0)
        }
        None => (path.to_path_buf(), header_len),
    };
    let skip = |k: &str, min: i64| -> Result<i64, IoError> {
        match get(k) {
            None => Ok(0),
            Some(v) => v.parse::<i64>().ok().filter(|&n| n >= min).ok_or_else(|| err(format!("invalid {k} {v:?}"))),
        }
    };
    let line_skip = skip("line skip", 0)? as u64;
    let byte_skip = skip("byte skip", -1)?;
    if byte_skip == -1 && codec != Codec::Raw {
        return Err(err("\"byte skip: -1\" is only valid with raw encoding".into()));
    }
    let nbytes = sizes.iter().product::<usize>() * datatype.size();
    let block = Block { file, start, line_skip, skip: u64::try_from(byte_skip).ok(), codec, nbytes };
    let layout = Layout {
        grid,
        components: comp_axis.map_or(1, |a| sizes[a]),
        comp_stride: comp_axis.map_or(1, |a| sizes[..a].iter().product()),
        float: datatype.is_float(),
    };
    Ok(Header { layout, datatype, big_endian, block })
}

/// The grid, with the space's axes turned into LPS as ITK does.
fn geometry(
    path: &Path,
    fields: &HashMap<String, String>,
    directions: Option<&[Option<Vec<f64>>]>,
    domain: &[usize],
    shape: [usize; 3],
) -> Result<Grid, IoError> {
    let err = |m: String| IoError::new(path, m);
    let space = fields.get("space").map(|s| s.to_ascii_lowercase());
    let flip: [f64; 3] = match space.as_deref() {
        Some("right-anterior-superior" | "ras") => [-1.0, -1.0, 1.0],
        Some("left-anterior-superior" | "las") => [-1.0, 1.0, 1.0],
        Some(s) if s.ends_with("-time") || s.ends_with("-lpst") || s.ends_with("-rast") || s.ends_with("-last") => {
            return Err(err(format!("space {s:?} has a time axis; 2D and 3D images are supported")))
        }
        Some("left-posterior-superior" | "lps" | "scanner-xyz" | "3d-right-handed" | "3d-left-handed") | None => {
            [1.0; 3]
        }
        Some(s) => return Err(err(format!("unknown space {s:?}"))),
    };
    let space_dim = match (&space, fields.get("space dimension")) {
        (Some(_), Some(_)) => return Err(err("both \"space\" and \"space dimension\" are given".into())),
        (Some(_), None) => Some(3),
        (None, Some(d)) => Some(d.parse::<usize>().map_err(|_| err(format!("invalid space dimension {d:?}")))?),
        (None, None) => None,
    };
    let oriented = |v: &[f64]| -> Vec<f64> { v.iter().zip(flip).map(|(x, f)| x * f).collect() };
    let (axes, origin) = match directions {
        Some(d) => {
            let sd =
                space_dim.ok_or_else(|| err("\"space directions\" without \"space\" or \"space dimension\"".into()))?;
            let mut axes = Vec::new();
            for &a in domain {
                let Some(v) = d[a].as_ref() else {
                    return Err(err(format!("axis {a} has no space direction")));
                };
                if v.len() != sd {
                    return Err(err(format!("space direction {v:?} does not have {sd} components")));
                }
                axes.push(oriented(v));
            }
            let origin = match fields.get("space origin") {
                Some(o) => match vectors(o, "space origin").map_err(err)?.as_slice() {
                    [Some(v)] if v.len() == sd => oriented(v),
                    _ => return Err(err(format!("space origin {o:?} is not one vector of {sd} components"))),
                },
                None => vec![0.0; sd],
            };
            (axes, origin)
        }
        None => {
            let n = domain.len();
            let spacings = match fields.get("spacings") {
                Some(s) => {
                    let v: Vec<f64> = s
                        .split_whitespace()
                        .map(|t| if t.eq_ignore_ascii_case("nan") { Ok(f64::NAN) } else { t.parse() })
                        .collect::<Result<_, _>>()
                        .map_err(|_| err(format!("invalid spacings {s:?}")))?;
                    if v.len() != fields.get("sizes").map_or(0, |z| z.split_whitespace().count()) {
                        return Err(err(format!("spacings {s:?} do not list every axis")));
                    }
                    domain.iter().map(|&a| if v[a].is_nan() { 1.0 } else { v[a] }).collect()
                }
                None => vec![1.0; n],
            };
            let axes = (0..n)
                .map(|i| {
                    let mut v = vec![0.0; n];
                    v[i] = spacings[i];
                    v
                })
                .collect();
            (axes, vec![0.0; n])
        }
    };
    raster::grid_from_lps(path, shape, &axes, &origin)
}

fn vector(v: &[f64]) -> String {
    format!("({})", raster::joined(v, ","))
}

/// The header of an attached, gzip-compressed, little-endian file.
fn header(p: &Payload) -> String {
    let g = &p.geometry;
    let mut sizes = p.dims.clone();
    let mut dirs: Vec<String> = g.axes.iter().map(|a| vector(a)).collect();
    let mut kinds = vec!["domain"; p.dims.len()];
    if p.components > 1 {
        sizes.insert(0, p.components);
        dirs.insert(0, "none".into());
        kinds.insert(0, "vector");
    }
    let join = |v: &[String]| v.join(" ");
    let space =
        if g.axes.len() == 2 { "space dimension: 2".to_string() } else { "space: left-posterior-superior".into() };
    format!(
        "NRRD0004\n# Complete NRRD file format specification at:\n# http://teem.sourceforge.net/nrrd/format.html\n\
         type: {}\ndimension: {}\n{space}\nsizes: {}\nspace directions: {}\nkinds: {}\nendian: little\n\
         encoding: gzip\nspace origin: {}\n\n",
        type_name(p.datatype),
        sizes.len(),
        join(&sizes.iter().map(usize::to_string).collect::<Vec<_>>()),
        join(&dirs),
        kinds.join(" "),
        vector(&g.origin),
    )
}

/// Writes one attached, gzip-compressed `.nrrd` file.
pub(super) fn write(path: &Path, p: &Payload) -> Result<(), IoError> {
    if !path.to_string_lossy().to_ascii_lowercase().ends_with(".nrrd") {
        return Err(IoError::new(path, "NRRD is written as one .nrrd file (not a detached .nhdr)"));
    }
    let head = header(p);
    write_atomic(path, |w| {
        w.write_all(head.as_bytes())?;
        let mut gz = GzEncoder::new(w, raster::compression());
        gz.write_all(&p.bytes)?;
        gz.finish()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use nalgebra::Matrix3;

    use super::*;
    use crate::io::tests::err_of;
    use crate::io::{read_field, read_grid, read_image as read_volume, read_label_map as read_labels};

    /// A header with `fields` (then a blank line) followed by `data`.
    fn file(path: &Path, fields: &str, data: &[u8]) {
        let mut f = File::create(path).unwrap();
        write!(f, "NRRD0004\n# a comment\nkey:=value\n{fields}\n\n").unwrap();
        f.write_all(data).unwrap();
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn detached_big_endian_gzip_ras() {
        let dir = tempfile::tempdir().unwrap();
        let vals: Vec<i16> = (0..24).map(|x| x * 3 - 30).collect();
        let mut data = b"junk line\n".to_vec();
        data.extend(gz(&[&[9u8, 9, 9][..], &vals.iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<_>>()].concat()));
        std::fs::write(dir.path().join("d.raw.gz"), data).unwrap();
        let h = dir.path().join("d.nhdr");
        std::fs::write(
            &h,
            "NRRD0005\ntype: short\ndimension: 3\nspace: right-anterior-superior\nsizes: 4 3 2\n\
             space directions: (0,2,0) (1.5,0,0) (0,0,3)\nendian: big\nencoding: gzip\n\
             space origin: (10,20,30)\nline skip: 1\nbyte skip: 3\ndata file: d.raw.gz\n",
        )
        .unwrap();
        let v = read_volume(&h).unwrap();
        assert_eq!(v.data, vals.iter().map(|&x| x as f32).collect::<Vec<_>>());
        // RAS as written: the affine is the header's
        let a = v.grid.affine();
        let want = Matrix3::new(0.0, 1.5, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0);
        assert!((a.fixed_view::<3, 3>(0, 0) - want).abs().max() < 1e-12, "{a}");
        assert_eq!(v.grid.origin_ras(), [10.0, 20.0, 30.0]);
    }

    /// Raw data at the end of the file (byte skip −1), spacings instead of space directions, and
    /// vector components on the last axis, told by kinds.
    #[test]
    fn spacings_byte_skip_and_last_vector_axis() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.nrrd");
        let n = 6;
        let vals: Vec<f64> = (0..3 * n).map(|x| x as f64).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let data = [b"padding".to_vec(), bytes].concat();
        file(
            &p,
            "type: double\ndimension: 4\nsizes: 3 2 1 3\nspacings: 2 3 4 nan\nkinds: domain domain domain vector\n\
             endian: little\nencoding: raw\nbyte skip: -1\n",
            &data,
        );
        let f = read_field(&p).unwrap();
        assert_eq!(f.data, vals.iter().map(|&x| x as f32).collect::<Vec<_>>());
        let s = f.grid.spacing();
        assert_eq!(s, [2.0, 3.0, 4.0]);
        assert_eq!(f.grid.affine()[(0, 0)], -2.0, "x is L in LPS, so −R");
    }

    #[test]
    fn bad_headers_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.nrrd");
        let ok = "type: uint8\ndimension: 2\nsizes: 3 2\nencoding: raw";
        let cases: Vec<(String, Vec<u8>, &str)> = vec![
            (ok.into(), vec![1, 2, 3, 4, 5], "truncated"),
            (ok.replace("raw", "bzip2"), vec![0; 6], "encoding"),
            (ok.replace("uint8", "block"), vec![0; 6], "type"),
            (ok.replace("uint8", "float"), vec![0; 24], "endian"),
            (ok.replace("sizes: 3 2\n", ""), vec![0; 6], "sizes"),
            (ok.replace("sizes: 3 2", "sizes: 3 0"), vec![0; 6], "positive"),
            (ok.replace("sizes: 3 2", "sizes: 300000 300000"), vec![0; 6], "absurdly large"),
            (ok.replace("dimension: 2", "dimension: 4").replace("3 2", "3 2 2 2"), vec![0; 24], "spatial axes"),
            (ok.replace("raw", "gzip"), gz(&[1, 2, 3])[..10].to_vec(), "gzip"),
            (ok.replace("raw", "gzip"), gz(&[1, 2, 3]), "truncated"),
            (format!("{ok}\nspace dimension: 2\nspace directions: (1,0) (0,0)"), vec![0; 6], "singular"),
            (format!("{ok}\nspace dimension: 2\nspace directions: none none"), vec![0; 6], "at most one"),
            (format!("{ok}\nspace directions: (1,0) (0,1)"), vec![0; 6], "space dimension"),
            (format!("{ok}\nspace: right-anterior-superior-time"), vec![0; 6], "time"),
            (format!("{ok}\ndata file: missing.raw"), vec![], "missing.raw: file not found"),
            (format!("{ok}\ndata file: f%03d.raw 1 3 1"), vec![], "several files"),
            (format!("{ok}\nsizes: 3 2"), vec![0; 6], "twice"),
            (
                "type: float\ndimension: 2\nsizes: 2 1\nendian: little\nencoding: raw".into(),
                [1f32.to_le_bytes(), f32::NAN.to_le_bytes()].concat(),
                "NaN",
            ),
        ];
        for (fields, data, expect) in cases {
            file(&p, &fields, &data);
            let e = err_of(read_volume(&p), &p);
            assert!(e.contains(expect), "{fields:?}: expected {expect:?} in {e}");
        }
        std::fs::write(&p, b"P5 not nrrd\n").unwrap();
        assert!(err_of(read_grid(&p), &p).contains("not a NRRD"));
        std::fs::write(&p, b"").unwrap();
        assert!(err_of(read_grid(&p), &p).contains("empty"));
        assert!(err_of(read_volume(&dir.path().join("none.nrrd")), &dir.path().join("none.nrrd")).contains("not found"));
        // labels must be whole numbers; a field must hold floats
        file(
            &p,
            "type: float\ndimension: 2\nsizes: 2 1\nendian: little\nencoding: raw",
            &[0.5f32.to_le_bytes(), 1f32.to_le_bytes()].concat(),
        );
        assert!(err_of(read_labels(&p), &p).contains("non-integer"));
        file(
            &p,
            "type: short\ndimension: 3\nsizes: 3 2 1\nkinds: vector domain domain\nendian: little\nencoding: raw",
            &[0; 12],
        );
        assert!(err_of(read_field(&p), &p).contains("integers"));
    }
}
