//! MetaImage: `.mha` (header and data in one file) and `.mhd` (the header names its
//! `ElementDataFile`, often `.raw` or `.zraw`).
//!
//! Read: `NDims` 2 or 3, `ElementNumberOfChannels` interleaved values per voxel (vector fields),
//! `CompressedData` (zlib, or gzip as MetaIO also accepts), `BinaryDataByteOrderMSB`, the
//! `MET_` integer types up to 64 bits, float and double. As in ITK's `MetaImageIO`, the
//! geometry is LPS: `TransformMatrix` lists the direction of each voxel axis in turn,
//! `Offset` is the position of the first voxel, `AnatomicalOrientation` is ignored.
//!
//! Written: one `.mha` file, zlib-compressed, little-endian.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use flate2::write::ZlibEncoder;

use super::atomic::write_atomic;
use super::nifti::DataType;
use super::raster::{self, Block, Codec, Header, Layout, Payload};
use super::IoError;

/// Headers are a few hundred bytes; this bounds what a file without `ElementDataFile` costs.
const MAX_HEADER: u64 = 1 << 20;

fn datatype(name: &str) -> Option<DataType> {
    Some(match name {
        "MET_UCHAR" => DataType::U8,
        "MET_CHAR" => DataType::I8,
        "MET_SHORT" => DataType::I16,
        "MET_USHORT" => DataType::U16,
        // MetaIO's LONG types are 32-bit on every platform
        "MET_INT" | "MET_LONG" => DataType::I32,
        "MET_UINT" | "MET_ULONG" => DataType::U32,
        "MET_LONG_LONG" => DataType::I64,
        "MET_ULONG_LONG" => DataType::U64,
        "MET_FLOAT" => DataType::F32,
        "MET_DOUBLE" => DataType::F64,
        _ => return None,
    })
}

fn type_name(t: DataType) -> &'static str {
    match t {
        DataType::U8 => "MET_UCHAR",
        DataType::I8 => "MET_CHAR",
        DataType::I16 => "MET_SHORT",
        DataType::U16 => "MET_USHORT",
        DataType::I32 => "MET_INT",
        DataType::U32 => "MET_UINT",
        DataType::I64 => "MET_LONG_LONG",
        DataType::U64 => "MET_ULONG_LONG",
        DataType::F32 => "MET_FLOAT",
        DataType::F64 => "MET_DOUBLE",
    }
}

/// The `Key = Value` fields up to and including `ElementDataFile`, which ends the header, and
/// the header's length in bytes.
fn fields(path: &Path) -> Result<(HashMap<String, String>, u64), IoError> {
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => IoError::new(path, "file not found"),
        _ => IoError::new(path, format!("cannot open: {e}")),
    })?;
    let mut r = BufReader::new(file).take(MAX_HEADER);
    let (mut fields, mut len) = (HashMap::new(), 0u64);
    loop {
        let mut line = Vec::new();
        let n = r.read_until(b'\n', &mut line).map_err(|e| IoError::new(path, format!("cannot read: {e}")))?;
        len += n as u64;
        if n == 0 {
            let what =
                if fields.is_empty() { "file is empty or not a MetaImage" } else { "header has no ElementDataFile" };
            return Err(IoError::new(
                path,
                format!("{what} (expected \"Key = Value\" lines ending with ElementDataFile)"),
            ));
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let Some((key, value)) = text.split_once('=') else {
            return Err(IoError::new(path, format!("not a MetaImage header line: {:?}", truncate(text))));
        };
        let key = canonical(key.trim());
        let done = key == "elementdatafile";
        if fields.insert(key.clone(), value.trim().to_string()).is_some() {
            return Err(IoError::new(path, format!("{key} appears twice")));
        }
        if done {
            return Ok((fields, len));
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(60).collect()
}

/// Lower-case key with MetaIO's synonyms folded.
fn canonical(key: &str) -> String {
    let k = key.to_ascii_lowercase();
    match k.as_str() {
        "position" | "origin" => "offset".into(),
        "rotation" | "orientation" => "transformmatrix".into(),
        "elementbyteordermsb" => "binarydatabyteordermsb".into(),
        _ => k,
    }
}

fn boolean(v: &str, key: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("{key} = {v:?} is neither True nor False")),
    }
}

/// Parses and validates a header.
pub(super) fn parse(path: &Path) -> Result<Header, IoError> {
    let err = |m: String| IoError::new(path, m);
    let (fields, header_len) = fields(path)?;
    let get = |k: &str| fields.get(k).map(String::as_str);
    let need = |k: &str, name: &str| get(k).ok_or_else(|| err(format!("missing required field {name}")));
    if let Some(t) = get("objecttype") {
        if !t.eq_ignore_ascii_case("image") {
            return Err(err(format!("ObjectType = {t} (only images are read)")));
        }
    }
    let ndims: usize = need("ndims", "NDims")?.parse().map_err(|_| err(format!("invalid NDims {:?}", get("ndims"))))?;
    if !(2..=3).contains(&ndims) {
        return Err(err(format!("NDims = {ndims}; 2D and 3D images are supported")));
    }
    let dims = raster::sizes(need("dimsize", "DimSize")?, "DimSize").map_err(err)?;
    if dims.len() != ndims {
        return Err(err(format!("DimSize lists {} sizes but NDims is {ndims}", dims.len())));
    }
    let components = match get("elementnumberofchannels") {
        None => 1,
        Some(c) => match c.parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => n,
            _ => return Err(err(format!("invalid ElementNumberOfChannels {c:?}"))),
        },
    };
    let mut all = dims.clone();
    all.push(components);
    let shape = raster::shape(&all, &(0..ndims).collect::<Vec<_>>()).map_err(err)?;
    let tname = need("elementtype", "ElementType")?;
    let datatype = datatype(tname).ok_or_else(|| {
        err(format!(
            "unsupported ElementType {tname} (expected MET_(U)CHAR/SHORT/INT/LONG/LONG_LONG, MET_FLOAT or MET_DOUBLE)"
        ))
    })?;
    if let Some(b) = get("binarydata") {
        if !boolean(b, "BinaryData").map_err(err)? {
            return Err(err("ASCII data (BinaryData = False) are not supported".into()));
        }
    }
    let big_endian =
        get("binarydatabyteordermsb").map(|b| boolean(b, "BinaryDataByteOrderMSB")).transpose().map_err(err)?;
    let compressed = get("compresseddata").map(|b| boolean(b, "CompressedData")).transpose().map_err(err)?;
    let codec = if compressed == Some(true) { Codec::Zlib } else { Codec::Raw };

    let vector = |k: &str, name: &str, n: usize, default: Vec<f64>| -> Result<Vec<f64>, IoError> {
        match get(k) {
            None => Ok(default),
            Some(v) => {
                let x = raster::numbers(v, name).map_err(err)?;
                if x.len() != n || x.iter().any(|v| !v.is_finite()) {
                    return Err(err(format!("{name} = {v:?} is not {n} finite numbers")));
                }
                Ok(x)
            }
        }
    };
    let spacing = match get("elementspacing") {
        Some(_) => vector("elementspacing", "ElementSpacing", ndims, vec![])?,
        None => vector("elementsize", "ElementSize", ndims, vec![1.0; ndims])?,
    };
    if spacing.iter().any(|&s| s <= 0.0) {
        return Err(err(format!("ElementSpacing {spacing:?} must be positive")));
    }
    let origin = vector("offset", "Offset", ndims, vec![0.0; ndims])?;
    let identity: Vec<f64> = (0..ndims * ndims).map(|i| if i % (ndims + 1) == 0 { 1.0 } else { 0.0 }).collect();
    let m = vector("transformmatrix", "TransformMatrix", ndims * ndims, identity)?;
    let axes: Vec<Vec<f64>> =
        (0..ndims).map(|a| m[a * ndims..(a + 1) * ndims].iter().map(|d| d * spacing[a]).collect()).collect();
    let grid = raster::grid_from_lps(path, shape, &axes, &origin)?;

    let file = need("elementdatafile", "ElementDataFile")?;
    let header_size = match get("headersize") {
        None => 0,
        Some(h) => {
            h.parse::<i64>().ok().filter(|&n| n >= -1).ok_or_else(|| err(format!("invalid HeaderSize {h:?}")))?
        }
    };
    let (data_file, start) = if file.eq_ignore_ascii_case("LOCAL") {
        (path.to_path_buf(), Some(header_len))
    } else if file.starts_with("LIST") || file.contains('%') {
        return Err(err(format!("data split over several files (ElementDataFile = {file}) are not supported")));
    } else {
        (raster::beside(path, file), u64::try_from(header_size).ok())
    };
    if start.is_none() && codec != Codec::Raw {
        return Err(err("HeaderSize = -1 is only valid for uncompressed data".into()));
    }
    let nbytes = dims.iter().product::<usize>() * components * datatype.size();
    // HeaderSize counts bytes of the file, before any decompression
    let block =
        Block { file: data_file, start: start.unwrap_or(0), line_skip: 0, skip: start.map(|_| 0), codec, nbytes };
    let layout = Layout { grid, components, comp_stride: 1, float: datatype.is_float() };
    Ok(Header { layout, datatype, big_endian: big_endian.unwrap_or(false), block })
}

/// Writes one zlib-compressed `.mha` file.
pub(super) fn write(path: &Path, p: &Payload) -> Result<(), IoError> {
    if !path.to_string_lossy().to_ascii_lowercase().ends_with(".mha") {
        return Err(IoError::new(path, "MetaImage is written as one .mha file (not a detached .mhd)"));
    }
    // the header states the compressed size, so the data are compressed first
    let mut z = ZlibEncoder::new(Vec::new(), raster::compression());
    z.write_all(&p.bytes).and_then(|_| z.flush()).map_err(|e| IoError::new(path, format!("cannot compress: {e}")))?;
    let data = z.finish().map_err(|e| IoError::new(path, format!("cannot compress: {e}")))?;
    let g = &p.geometry;
    let n = g.axes.len();
    let list = |v: &[f64]| raster::joined(v, " ");
    let spacing: Vec<f64> = g.axes.iter().map(|a| a.iter().map(|x| x * x).sum::<f64>().sqrt()).collect();
    let matrix: Vec<f64> = g.axes.iter().zip(&spacing).flat_map(|(a, s)| a.iter().map(move |x| x / s)).collect();
    let mut head = format!(
        "ObjectType = Image\nNDims = {n}\nBinaryData = True\nBinaryDataByteOrderMSB = False\nCompressedData = True\n\
         CompressedDataSize = {}\nTransformMatrix = {}\nOffset = {}\nCenterOfRotation = {}\nElementSpacing = {}\n\
         DimSize = {}\n",
        data.len(),
        list(&matrix),
        list(&g.origin),
        list(&vec![0.0; n]),
        list(&spacing),
        p.dims.iter().map(usize::to_string).collect::<Vec<_>>().join(" "),
    );
    if p.components > 1 {
        head.push_str(&format!("ElementNumberOfChannels = {}\n", p.components));
    }
    head.push_str(&format!("ElementType = {}\nElementDataFile = LOCAL\n", type_name(p.datatype)));
    write_atomic(path, |w| {
        w.write_all(head.as_bytes())?;
        w.write_all(&data)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tests::err_of;
    use crate::io::{read_field, read_grid, read_image as read_volume, read_label_map as read_labels};

    fn file(path: &Path, fields: &str, data: &[u8]) {
        std::fs::write(path, [format!("ObjectType = Image\n{fields}\n").as_bytes(), data].concat()).unwrap();
    }

    #[test]
    fn detached_big_endian_with_header_size() {
        let dir = tempfile::tempdir().unwrap();
        let vals: Vec<i32> = (0..12).map(|x| x * 1000 - 5000).collect();
        let data = [vec![7u8; 5], vals.iter().flat_map(|v| v.to_be_bytes()).collect()].concat();
        std::fs::write(dir.path().join("d.raw"), data).unwrap();
        let h = dir.path().join("d.mhd");
        std::fs::write(
            &h,
            "NDims = 3\nDimSize = 3 2 2\nElementType = MET_LONG\nElementByteOrderMSB = True\n\
             Orientation = 0 1 0 -1 0 0 0 0 1\nPosition = 1 2 3\nElementSpacing = 0.5 2 4\nHeaderSize = 5\n\
             ElementDataFile = d.raw\n",
        )
        .unwrap();
        let v = read_volume(&h).unwrap();
        assert_eq!(v.data, vals.iter().map(|&x| x as f32).collect::<Vec<_>>());
        // axis i runs along LPS +y (RAS −y), j along LPS −x (RAS +x)
        let m = v.grid.matrix(registration::Space::Voxel, registration::Space::Lps);
        assert!((m.fixed_view::<3, 1>(0, 0) - nalgebra::Vector3::new(0.0, 0.5, 0.0)).norm() < 1e-12, "{m}");
        assert!((m.fixed_view::<3, 1>(0, 1) - nalgebra::Vector3::new(-2.0, 0.0, 0.0)).norm() < 1e-12, "{m}");
        assert_eq!(v.grid.origin_ras(), [-1.0, -2.0, 3.0]);
    }

    #[test]
    fn bad_headers_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.mha");
        let ok = "NDims = 2\nDimSize = 3 2\nElementType = MET_UCHAR\nElementDataFile = LOCAL";
        let z = |d: &[u8]| {
            let mut e = ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(d).unwrap();
            e.finish().unwrap()
        };
        let cases: Vec<(String, Vec<u8>, &str)> = vec![
            (ok.into(), vec![1, 2, 3, 4, 5], "truncated"),
            (ok.replace("MET_UCHAR", "MET_STRING"), vec![0; 6], "ElementType"),
            (ok.replace("DimSize = 3 2\n", ""), vec![0; 6], "DimSize"),
            (ok.replace("ElementDataFile = LOCAL", ""), vec![], "ElementDataFile"),
            (ok.replace("3 2", "3 -2"), vec![0; 6], "DimSize"),
            (ok.replace("3 2", "100000 100000"), vec![0; 6], "absurdly large"),
            (ok.replace("NDims = 2", "NDims = 4"), vec![0; 6], "NDims"),
            (format!("CompressedData = True\n{ok}"), z(&[1, 2, 3, 4, 5, 6])[..6].to_vec(), "truncated zlib"),
            (format!("CompressedData = True\n{ok}"), z(&[1, 2, 3]), "truncated"),
            (format!("CompressedData = True\n{ok}"), vec![1, 2, 3, 4, 5, 6, 7, 8], "corrupt"),
            (format!("TransformMatrix = 1 0 1 0\n{ok}"), vec![0; 6], "singular"),
            (format!("ElementSpacing = 1 0\n{ok}"), vec![0; 6], "positive"),
            (format!("Offset = 1 nan\n{ok}"), vec![0; 6], "Offset"),
            (format!("BinaryData = False\n{ok}"), vec![0; 6], "ASCII"),
            (ok.replace("LOCAL", "missing.raw"), vec![], "missing.raw: file not found"),
            (ok.replace("LOCAL", "LIST"), vec![], "several files"),
            (
                "NDims = 2\nDimSize = 2 1\nElementType = MET_DOUBLE\nElementDataFile = LOCAL".into(),
                [1f64.to_le_bytes(), f64::INFINITY.to_le_bytes()].concat(),
                "infinite",
            ),
        ];
        for (fields, data, expect) in cases {
            file(&p, &fields, &data);
            let e = err_of(read_volume(&p), &p);
            assert!(e.contains(expect), "{fields:?}: expected {expect:?} in {e}");
        }
        std::fs::write(&p, b"\x89PNG\r\n\x1a\n").unwrap();
        err_of(read_grid(&p), &p);
        std::fs::write(&p, b"").unwrap();
        assert!(err_of(read_grid(&p), &p).contains("empty"));
        file(
            &p,
            "NDims = 2\nDimSize = 3 1\nElementNumberOfChannels = 3\nElementType = MET_FLOAT\nElementDataFile = LOCAL",
            &[0; 36],
        );
        assert!(err_of(read_volume(&p), &p).contains("vector image"));
        assert!(err_of(read_labels(&p), &p).contains("vector image"));
        assert_eq!(read_field(&p).unwrap().data.len(), 9);
    }
}
