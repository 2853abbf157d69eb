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
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use flate2::write::ZlibEncoder;
use registration::{DisplacementField, Grid, Labels, Volume};

use super::atomic::write_atomic;
use super::nifti::DataType;
use super::raster::{self, Codec, Layout, Payload};
use super::IoError;

/// Headers are a few hundred bytes; this bounds what a file without `ElementDataFile` costs.
const MAX_HEADER: u64 = 1 << 20;

struct Header {
    /// Spatial sizes, 2 or 3 of them.
    dims: Vec<usize>,
    components: usize,
    datatype: DataType,
    codec: Codec,
    big_endian: bool,
    grid: Grid,
    data_file: PathBuf,
    /// Offset of the data in `data_file`; `None`: they are its last bytes (`HeaderSize = -1`).
    offset: Option<u64>,
}

impl Header {
    fn layout(&self) -> Layout {
        Layout {
            grid: self.grid.clone(),
            components: self.components,
            comp_stride: 1,
            float: matches!(self.datatype, DataType::F32 | DataType::F64),
        }
    }

    fn nbytes(&self) -> usize {
        self.dims.iter().product::<usize>() * self.components * self.datatype.size()
    }
}

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

fn parse(path: &Path) -> Result<Header, IoError> {
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
    let (data_file, offset) = if file.eq_ignore_ascii_case("LOCAL") {
        (path.to_path_buf(), Some(header_len))
    } else if file.starts_with("LIST") || file.contains('%') || file.split_whitespace().count() > 1 {
        return Err(err(format!("data split over several files (ElementDataFile = {file}) are not supported")));
    } else {
        let p = Path::new(file);
        let p = if p.is_absolute() { p.to_path_buf() } else { path.parent().unwrap_or(Path::new("")).join(p) };
        (p, if header_size == -1 { None } else { Some(header_size as u64) })
    };
    if offset.is_none() && codec != Codec::Raw {
        return Err(err("HeaderSize = -1 is only valid for uncompressed data".into()));
    }
    Ok(Header { dims, components, datatype, codec, big_endian: big_endian.unwrap_or(false), grid, data_file, offset })
}

/// The data file opened at the start of the block; checks that uncompressed data are all there.
fn locate(path: &Path, h: &Header) -> Result<BufReader<File>, IoError> {
    let what = if h.data_file == path { String::new() } else { format!("data file {}: ", h.data_file.display()) };
    let derr = |m: String| IoError::new(path, format!("{what}{m}"));
    let file = File::open(&h.data_file).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => derr("file not found".into()),
        _ => derr(format!("cannot open: {e}")),
    })?;
    let len = file.metadata().map_err(|e| derr(format!("cannot open: {e}")))?.len();
    let nbytes = h.nbytes() as u64;
    let offset = match h.offset {
        Some(o) => o,
        None => len
            .checked_sub(nbytes)
            .ok_or_else(|| derr(format!("file is truncated: {len} bytes, but the header needs {nbytes}")))?,
    };
    if h.codec == Codec::Raw && len < offset + nbytes {
        return Err(derr(format!(
            "file is truncated: {len} bytes, but the header needs {} ({nbytes} bytes of data from offset {offset})",
            offset + nbytes
        )));
    }
    if len < offset {
        return Err(derr(format!("file is truncated: {len} bytes, the data should start at {offset}")));
    }
    let mut r = BufReader::new(file);
    r.seek(SeekFrom::Start(offset)).map_err(|e| derr(format!("cannot read: {e}")))?;
    Ok(r)
}

fn read_data(path: &Path) -> Result<(Header, Vec<u8>), IoError> {
    let h = parse(path)?;
    let r = locate(path, &h)?;
    let bytes = raster::read_block(&h.data_file, r, h.codec, 0, h.nbytes()).map_err(|e| {
        if h.data_file == path {
            e
        } else {
            IoError::new(path, format!("data file {e}"))
        }
    })?;
    Ok((h, bytes))
}

/// The grid of a MetaImage, from its header (uncompressed data's size is checked too).
pub fn read_grid(path: &Path) -> Result<Grid, IoError> {
    let h = parse(path)?;
    locate(path, &h)?;
    Ok(h.grid)
}

/// Reads a single-channel image; NaN or infinite values are an error.
pub fn read_volume(path: &Path) -> Result<Volume, IoError> {
    let (h, bytes) = read_data(path)?;
    raster::volume(path, h.layout(), raster::samples(&bytes, h.datatype, h.big_endian))
}

/// Reads a label map: whole numbers ≥ 0.
pub fn read_labels(path: &Path) -> Result<Labels, IoError> {
    let (h, bytes) = read_data(path)?;
    raster::labels(path, h.layout(), raster::samples(&bytes, h.datatype, h.big_endian))
}

/// Reads a displacement field (`ElementNumberOfChannels` = 3, or 2 in 2D; LPS mm).
pub fn read_field(path: &Path) -> Result<DisplacementField, IoError> {
    let (h, bytes) = read_data(path)?;
    raster::field(path, h.layout(), raster::samples(&bytes, h.datatype, h.big_endian))
}

fn write(path: &Path, p: &Payload) -> Result<(), IoError> {
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

/// Writes an image as float32 (several channels as interleaved vectors).
pub fn write_volume(path: &Path, v: &Volume) -> Result<(), IoError> {
    write(path, &Payload::volume(v))
}

/// Writes a label map in the smallest unsigned type that holds its largest label.
pub fn write_labels(path: &Path, l: &Labels) -> Result<(), IoError> {
    write(path, &Payload::labels(l))
}

/// Writes a displacement field as ITK does: float32 vectors, `ElementNumberOfChannels` = 3.
pub fn write_field(path: &Path, f: &DisplacementField) -> Result<(), IoError> {
    write(path, &Payload::field(f))
}

#[cfg(test)]
mod tests {
    use nalgebra::{Matrix3, Rotation3};

    use super::*;

    fn oblique() -> Grid {
        let r = Rotation3::from_euler_angles(-0.3, 0.2, 0.5).into_inner()
            * Matrix3::from_diagonal(&[1.0, -1.0, 1.0].into());
        Grid::from_parts([5, 4, 3], [0.8, 1.3, 2.5], [-12.0, 40.0, 7.5], r).unwrap()
    }

    fn flat() -> Grid {
        super::super::png::png_grid(5, 3).unwrap()
    }

    fn err_of<T: std::fmt::Debug>(r: Result<T, IoError>, path: &Path) -> String {
        let e = r.unwrap_err().to_string();
        assert!(e.starts_with(&path.display().to_string()), "error does not start with the path: {e}");
        e
    }

    fn file(path: &Path, fields: &str, data: &[u8]) {
        std::fs::write(path, [format!("ObjectType = Image\n{fields}\n").as_bytes(), data].concat()).unwrap();
    }

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.mha");
        for g in [oblique(), flat()] {
            let n = g.num_voxels();
            let v = Volume::new(g.clone(), 1, (0..n).map(|x| x as f32 * 0.25 - 3.0).collect()).unwrap();
            write_volume(&p, &v).unwrap();
            let r = read_volume(&p).unwrap();
            assert_eq!(r.data, v.data);
            assert!(r.grid.same_as(&g, 1e-12), "{:?} vs {g:?}", r.grid);
            assert_eq!(read_grid(&p).unwrap(), r.grid);
            let l = Labels::new(g.clone(), (0..n as u32).map(|x| x * 100_000).collect()).unwrap();
            write_labels(&p, &l).unwrap();
            assert_eq!(read_labels(&p).unwrap(), l);
            let mut u: Vec<f32> = (0..3 * n).map(|x| x as f32 * 0.1).collect();
            if g.is_2d() {
                u[2 * n..].fill(0.0);
            }
            let f = DisplacementField::new(g.clone(), u).unwrap();
            write_field(&p, &f).unwrap();
            assert_eq!(read_field(&p).unwrap(), f);
        }
        let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()[..150]).into_owned();
        assert!(text.contains("NDims = 2") && text.contains("CompressedData = True"), "{text}");
        let mhd = dir.path().join("a.mhd");
        assert!(err_of(write_volume(&mhd, &Volume::zeros(flat())), &mhd).contains(".mha"));
    }

    /// A detached big-endian file with a header to skip, synonyms and the axis order of
    /// TransformMatrix (one axis after the other).
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
