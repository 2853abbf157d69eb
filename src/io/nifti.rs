//! NIfTI-1 (`.nii`, `.nii.gz`) reading and writing.
//!
//! The header is parsed and validated by hand rather than through the `nifti` crate so that a
//! corrupt file is rejected before any data are allocated, and so that `qform` decoding cannot
//! panic (the crate's `qform_affine()` can, on a negative pixdim or a bad qfac).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use nalgebra::{Matrix3, Matrix4};
use registration::grid::MAX_VOXELS;
use registration::{DisplacementField, Grid, Labels, Volume};

use super::atomic::write_atomic;
use super::{raster, IoError};

const HEADER_LEN: usize = 348;
/// Header, then the 4-byte "no extensions" flag.
const VOX_OFFSET: usize = 352;
/// NIFTI_INTENT_VECTOR: what ITK writes for displacement fields.
pub const INTENT_VECTOR: i16 = 1007;

/// On-disk voxel types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl DataType {
    fn from_code(code: i16) -> Option<Self> {
        Some(match code {
            2 => Self::U8,
            256 => Self::I8,
            4 => Self::I16,
            512 => Self::U16,
            8 => Self::I32,
            768 => Self::U32,
            1024 => Self::I64,
            1280 => Self::U64,
            16 => Self::F32,
            64 => Self::F64,
            _ => return None,
        })
    }

    fn code(self) -> i16 {
        match self {
            Self::U8 => 2,
            Self::I8 => 256,
            Self::I16 => 4,
            Self::U16 => 512,
            Self::I32 => 8,
            Self::U32 => 768,
            Self::I64 => 1024,
            Self::U64 => 1280,
            Self::F32 => 16,
            Self::F64 => 64,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 => 1,
            Self::I16 | Self::U16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }

    pub(super) fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F64)
    }
}

/// The parts of a validated header that reading needs.
#[derive(Debug, Clone)]
pub struct Header {
    /// `dim[1..=7]`, entries past `dim[0]` set to 1.
    pub dims: [usize; 7],
    pub ndim: usize,
    pub datatype: DataType,
    pub intent_code: i16,
    big_endian: bool,
    vox_offset: usize,
    slope: f64,
    inter: f64,
    pub grid: Grid,
}

impl Header {
    /// Values per spatial volume times the higher dimensions.
    fn total(&self) -> usize {
        self.dims.iter().product()
    }
}

struct Raw<'a> {
    b: &'a [u8; HEADER_LEN],
    big: bool,
}

impl Raw<'_> {
    fn i16(&self, o: usize) -> i16 {
        let a = [self.b[o], self.b[o + 1]];
        if self.big {
            i16::from_be_bytes(a)
        } else {
            i16::from_le_bytes(a)
        }
    }
    fn i32(&self, o: usize) -> i32 {
        let a = [self.b[o], self.b[o + 1], self.b[o + 2], self.b[o + 3]];
        if self.big {
            i32::from_be_bytes(a)
        } else {
            i32::from_le_bytes(a)
        }
    }
    fn f32(&self, o: usize) -> f64 {
        f32::from_bits(self.i32(o) as u32) as f64
    }
}

fn is_gz(path: &Path) -> bool {
    path.to_string_lossy().to_ascii_lowercase().ends_with(".gz")
}

fn read_error(path: &Path, e: std::io::Error, what: &str) -> IoError {
    raster::read_error(path, e, what, is_gz(path).then_some("gzip"))
}

/// Where a reader's bytes come from: the file at its path, or bytes already in memory (then the
/// path only names them in messages, and its extension still says whether they are gzipped).
#[derive(Clone, Copy)]
enum Source<'a> {
    File,
    Bytes(&'a [u8]),
}

fn open<'a>(path: &Path, src: Source<'a>) -> Result<(Box<dyn Read + 'a>, Option<u64>), IoError> {
    let (reader, len): (Box<dyn Read + 'a>, u64) = match src {
        Source::File => {
            let f = File::open(path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => IoError::new(path, "file not found"),
                _ => IoError::new(path, format!("cannot open: {e}")),
            })?;
            let len = f.metadata().map(|m| m.len()).map_err(|e| IoError::new(path, format!("cannot open: {e}")))?;
            (Box::new(BufReader::new(f)), len)
        }
        Source::Bytes(b) => (Box::new(b), b.len() as u64),
    };
    if is_gz(path) {
        Ok((Box::new(MultiGzDecoder::new(BufReader::new(reader))), None))
    } else {
        Ok((reader, Some(len)))
    }
}

/// Parses and validates a header; `file_len` (uncompressed files only) bounds the data size.
fn parse_header(path: &Path, b: &[u8; HEADER_LEN], file_len: Option<u64>) -> Result<Header, IoError> {
    let err = |m: String| IoError::new(path, m);
    let le = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let be = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let big = match (le, be) {
        (348, _) => false,
        (_, 348) => true,
        (540, _) | (_, 540) => return Err(err("NIfTI-2 files are not supported (convert to NIfTI-1)".into())),
        _ => return Err(err(format!("not a NIfTI-1 file (sizeof_hdr is {le}, expected 348)"))),
    };
    let r = Raw { b, big };
    match &b[344..348] {
        b"n+1\0" => {}
        b"ni1\0" => return Err(err("a .hdr/.img pair is not supported; use a single .nii or .nii.gz file".into())),
        m => return Err(err(format!("bad NIfTI magic {:?} (expected \"n+1\")", String::from_utf8_lossy(m)))),
    }
    let ndim = r.i16(40);
    if !(1..=7).contains(&ndim) {
        return Err(err(format!("dim[0] is {ndim}; must be 1..7")));
    }
    let ndim = ndim as usize;
    let mut dims = [1usize; 7];
    for (a, d) in dims.iter_mut().enumerate().take(ndim) {
        let v = r.i16(42 + 2 * a);
        if v < 1 {
            return Err(err(format!("dim[{}] is {v}; dimensions must be positive", a + 1)));
        }
        *d = v as usize;
    }
    let total = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).filter(|&n| n <= MAX_VOXELS);
    let Some(total) = total else {
        return Err(err(format!("dimensions {:?} are absurdly large", &dims[..ndim])));
    };
    let code = r.i16(70);
    let datatype =
        DataType::from_code(code).ok_or_else(|| err(format!("unsupported or invalid datatype code {code}")))?;
    let bitpix = r.i16(72);
    if bitpix != 0 && bitpix as usize != 8 * datatype.size() {
        return Err(err(format!("bitpix {bitpix} does not match datatype {datatype:?}")));
    }
    let vox = r.f32(108);
    if !((0.0..=1e9).contains(&vox) && vox.fract() == 0.0) {
        return Err(err(format!("invalid vox_offset {vox}")));
    }
    // 0 happens in files from careless writers; the data then follow the 352-byte preamble
    let vox_offset = if vox < HEADER_LEN as f64 { VOX_OFFSET } else { vox as usize };
    let data_len = (total as u64) * datatype.size() as u64;
    if let Some(len) = file_len {
        if len < vox_offset as u64 + data_len {
            return Err(err(format!(
                "file is truncated: {len} bytes, but the header needs {} ({}x{datatype:?} from offset {vox_offset})",
                vox_offset as u64 + data_len,
                total
            )));
        }
    }
    let (mut slope, mut inter) = (r.f32(112), r.f32(116));
    if !(slope.is_finite() && slope != 0.0) {
        slope = 1.0;
        inter = 0.0;
    }
    if !inter.is_finite() {
        inter = 0.0;
    }
    let affine = header_affine(&r, ndim).map_err(err)?;
    let grid = Grid::new([dims[0], dims[1], dims[2]], affine)
        .map_err(|e| err(format!("invalid orientation in the header: {e}")))?;
    Ok(Header { dims, ndim, datatype, intent_code: r.i16(68), big_endian: big, vox_offset, slope, inter, grid })
}

/// Voxel → RAS: sform when its code is set, else qform, else the pixdim diagonal, whose entries
/// must then be positive for the axes the image has: with no form to fall back on, a zero or NaN
/// voxel size leaves the geometry unknown, and guessing 1 mm would silently misplace the image.
fn header_affine(r: &Raw, ndim: usize) -> Result<Matrix4<f64>, String> {
    let pix = |a: usize| r.f32(76 + 4 * a);
    let positive = |v: f64| if v.is_finite() && v > 0.0 { v } else { 1.0 };
    let mut m = Matrix4::identity();
    if r.i16(254) > 0 {
        for row in 0..3 {
            for col in 0..4 {
                m[(row, col)] = r.f32(280 + 16 * row + 4 * col);
            }
        }
    } else if r.i16(252) > 0 {
        let (b, c, d) = (r.f32(256), r.f32(260), r.f32(264));
        let rot = quaternion_matrix(b, c, d);
        let qfac = if pix(0) < 0.0 { -1.0 } else { 1.0 };
        let scale = Matrix3::from_diagonal(&nalgebra::Vector3::new(
            positive(pix(1)),
            positive(pix(2)),
            qfac * positive(pix(3)),
        ));
        m.fixed_view_mut::<3, 3>(0, 0).copy_from(&(rot * scale));
        for row in 0..3 {
            m[(row, 3)] = r.f32(268 + 4 * row);
        }
    } else {
        for a in 0..3 {
            let p = pix(a + 1);
            if a < ndim && !(p.is_finite() && p > 0.0) {
                return Err(format!(
                    "pixdim[{}] is {p} and the header has neither qform nor sform: the voxel size is unknown",
                    a + 1
                ));
            }
            m[(a, a)] = positive(p);
        }
    }
    Ok(m)
}

/// The rotation of NIfTI's quaternion (b, c, d), `a` implied; as in nifti1_io's
/// `nifti_quatern_to_mat44`, a slightly non-unit quaternion is renormalised.
fn quaternion_matrix(b: f64, c: f64, d: f64) -> Matrix3<f64> {
    let (mut a, mut b, mut c, mut d) = (1.0 - (b * b + c * c + d * d), b, c, d);
    if a < 1e-7 {
        let n = 1.0 / (b * b + c * c + d * d).sqrt();
        if n.is_finite() {
            b *= n;
            c *= n;
            d *= n;
        }
        a = 0.0;
    } else {
        a = a.sqrt();
    }
    Matrix3::new(
        a * a + b * b - c * c - d * d,
        2.0 * (b * c - a * d),
        2.0 * (b * d + a * c),
        2.0 * (b * c + a * d),
        a * a + c * c - b * b - d * d,
        2.0 * (c * d - a * b),
        2.0 * (b * d - a * c),
        2.0 * (c * d + a * b),
        a * a + d * d - c * c - b * b,
    )
}

/// Reads only the header's grid (validated as for reading the data).
pub fn read_grid(path: &Path) -> Result<Grid, IoError> {
    let (mut reader, file_len) = open(path, Source::File)?;
    let mut hb = [0u8; HEADER_LEN];
    reader.read_exact(&mut hb).map_err(|e| read_error(path, e, "header"))?;
    Ok(parse_header(path, &hb, file_len)?.grid)
}

/// Reads and validates the header, then streams the data through `convert` (already scaled by
/// scl_slope/inter). The buffer grows with the data actually present, so a header promising more
/// than a compressed file holds costs no more memory than the file does.
fn read_with<T>(
    path: &Path,
    src: Source,
    check: impl FnOnce(&Header) -> Result<(), String>,
    mut convert: impl FnMut(f64) -> Result<T, String>,
) -> Result<(Header, Vec<T>), IoError> {
    let (mut reader, file_len) = open(path, src)?;
    let mut hb = [0u8; HEADER_LEN];
    reader.read_exact(&mut hb).map_err(|e| read_error(path, e, "header"))?;
    let h = parse_header(path, &hb, file_len)?;
    check(&h).map_err(|m| IoError::new(path, m))?;
    let skip = (h.vox_offset - HEADER_LEN) as u64;
    let skipped = std::io::copy(&mut (&mut reader).take(skip), &mut std::io::sink())
        .map_err(|e| read_error(path, e, "header extensions"))?;
    if skipped < skip {
        return Err(read_error(path, std::io::ErrorKind::UnexpectedEof.into(), "header extensions"));
    }
    let nbytes = h.total() * h.datatype.size();
    let mut bytes = Vec::new();
    (&mut reader).take(nbytes as u64).read_to_end(&mut bytes).map_err(|e| read_error(path, e, "voxel data"))?;
    if bytes.len() < nbytes {
        return Err(read_error(path, std::io::ErrorKind::UnexpectedEof.into(), "voxel data"));
    }
    // a gzip stream is only verified (CRC, length) at its end, so read on to it
    if is_gz(path) {
        std::io::copy(&mut reader, &mut std::io::sink()).map_err(|e| read_error(path, e, "voxel data"))?;
    }
    let mut out = Vec::with_capacity(h.total());
    let size = h.datatype.size();
    let (slope, inter) = (h.slope, h.inter);
    for (idx, chunk) in bytes.chunks_exact(size).enumerate() {
        let v = decode(chunk, h.datatype, h.big_endian);
        out.push(convert(v * slope + inter).map_err(|m| IoError::new(path, format!("voxel {idx}: {m}")))?);
    }
    Ok((h, out))
}

pub(super) fn decode(c: &[u8], t: DataType, big: bool) -> f64 {
    macro_rules! num {
        ($ty:ty, $n:expr) => {{
            let mut a = [0u8; $n];
            a.copy_from_slice(c);
            (if big { <$ty>::from_be_bytes(a) } else { <$ty>::from_le_bytes(a) }) as f64
        }};
    }
    match t {
        DataType::U8 => c[0] as f64,
        DataType::I8 => c[0] as i8 as f64,
        DataType::I16 => num!(i16, 2),
        DataType::U16 => num!(u16, 2),
        DataType::I32 => num!(i32, 4),
        DataType::U32 => num!(u32, 4),
        DataType::I64 => num!(i64, 8),
        DataType::U64 => num!(u64, 8),
        DataType::F32 => num!(f32, 4),
        DataType::F64 => num!(f64, 8),
    }
}

fn describe_dims(h: &Header) -> String {
    format!("{:?}", &h.dims[..h.ndim])
}

/// Reads an image; higher dimensions (`dim[4]`, `dim[5]`) become channels only when
/// `allow_channels`, and must be 1 otherwise. Does not check for NaN/Inf.
pub fn read_volume_unchecked(path: &Path, allow_channels: bool) -> Result<Volume, IoError> {
    volume_from(path, Source::File, allow_channels)
}

fn volume_from(path: &Path, src: Source, allow_channels: bool) -> Result<Volume, IoError> {
    let (h, data) = read_with(
        path,
        src,
        |h| {
            let extra: usize = h.dims[3..].iter().product();
            if extra > 1 && !allow_channels {
                return Err(format!(
                    "has dimensions {} (4D or vector data); expected a single 3D or 2D image",
                    describe_dims(h)
                ));
            }
            Ok(())
        },
        |v| Ok(v as f32),
    )?;
    let channels = h.dims[3..].iter().product();
    Volume::new(h.grid, channels, data).map_err(|e| IoError::new(path, e.to_string()))
}

/// Reads a single-channel image and rejects NaN or infinite voxels.
pub fn read_volume(path: &Path) -> Result<Volume, IoError> {
    raster::checked(path, read_volume_unchecked(path, false)?)
}

/// Reads an image whose 4th and higher dimensions are channels; rejects NaN/Inf.
pub fn read_volume_channels(path: &Path) -> Result<Volume, IoError> {
    raster::checked(path, read_volume_unchecked(path, true)?)
}

/// Reads a label map: integer values ≥ 0 (a float file must hold whole numbers).
pub fn read_labels(path: &Path) -> Result<Labels, IoError> {
    labels_from(path, Source::File)
}

fn labels_from(path: &Path, src: Source) -> Result<Labels, IoError> {
    let (h, data) = read_with(
        path,
        src,
        |h| {
            if h.dims[3..].iter().product::<usize>() > 1 {
                return Err(format!("label map has dimensions {}; expected a 3D or 2D image", describe_dims(h)));
            }
            Ok(())
        },
        raster::label_value,
    )?;
    Labels::new(h.grid, data).map_err(|e| IoError::new(path, e.to_string()))
}

/// Reads a displacement field in the ITK convention: dim `[5, X, Y, Z, 1, 3]` (or
/// `[5, X, Y, 1, 1, 2]` for 2D, whose z component becomes 0), components in LPS mm.
pub fn read_field(path: &Path) -> Result<DisplacementField, IoError> {
    field_from(path, Source::File)
}

fn field_from(path: &Path, src: Source) -> Result<DisplacementField, IoError> {
    let (h, data) = read_with(
        path,
        src,
        |h| {
            if !h.datatype.is_float() {
                return Err(format!("displacement field has datatype {:?}; expected float32 or float64", h.datatype));
            }
            let comps = h.dims[4];
            let want = if h.dims[2] == 1 { [2, 3] } else { [3, 3] };
            if h.ndim != 5 || h.dims[3] != 1 || !want.contains(&comps) || h.dims[5..].iter().any(|&d| d != 1) {
                return Err(format!(
                    "is not a displacement field: dimensions {}, expected [X, Y, Z, 1, 3] (or [X, Y, 1, 1, 2] in 2D)",
                    describe_dims(h)
                ));
            }
            Ok(())
        },
        |v| if v.is_finite() { Ok(v as f32) } else { Err("displacement field holds NaN or infinite values".into()) },
    )?;
    let n = h.grid.num_voxels();
    let mut data = data;
    // the component is the slowest dimension on disk, so the data are already channel-major
    data.resize(3 * n, 0.0);
    DisplacementField::new(h.grid, data).map_err(|e| IoError::new(path, e.to_string()))
}

/// The readers on bytes in memory, for the fuzz targets: `name` stands for the file in
/// messages and, by its extension, says whether the bytes are gzipped.
#[doc(hidden)]
pub mod from_bytes {
    use super::*;

    pub fn read_volume(name: &Path, bytes: &[u8]) -> Result<Volume, IoError> {
        raster::checked(name, volume_from(name, Source::Bytes(bytes), true)?)
    }

    pub fn read_labels(name: &Path, bytes: &[u8]) -> Result<Labels, IoError> {
        labels_from(name, Source::Bytes(bytes))
    }

    pub fn read_field(name: &Path, bytes: &[u8]) -> Result<DisplacementField, IoError> {
        field_from(name, Source::Bytes(bytes))
    }
}

/// What to put in the header besides geometry.
struct Out<'a> {
    dims: &'a [usize],
    datatype: DataType,
    intent_code: i16,
    grid: &'a Grid,
}

/// A NIfTI-1 header (little-endian) with the grid's affine as sform (code 1, scanner) and, when
/// the affine is a rotation times a scaling, also as qform (code 1).
fn build_header(o: &Out) -> Result<[u8; VOX_OFFSET], String> {
    let mut b = [0u8; VOX_OFFSET];
    let put_i16 = |b: &mut [u8], off: usize, v: i16| b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    let put_f32 = |b: &mut [u8], off: usize, v: f64| b[off..off + 4].copy_from_slice(&(v as f32).to_le_bytes());
    b[0..4].copy_from_slice(&348i32.to_le_bytes());
    b[38] = b'r';
    put_i16(&mut b, 40, o.dims.len() as i16);
    for a in 0..7 {
        let d = o.dims.get(a).copied().unwrap_or(1);
        let d = i16::try_from(d).map_err(|_| format!("dimension {d} exceeds NIfTI-1's limit of 32767"))?;
        put_i16(&mut b, 42 + 2 * a, d);
    }
    put_i16(&mut b, 68, o.intent_code);
    put_i16(&mut b, 70, o.datatype.code());
    put_i16(&mut b, 72, 8 * o.datatype.size() as i16);
    let spacing = o.grid.spacing();
    let mut pix = [1.0f64; 8];
    pix[1..4].copy_from_slice(&spacing);
    let a = o.grid.affine();
    let lin = a.fixed_view::<3, 3>(0, 0).into_owned();
    let quat = rotation_quaternion(&lin, spacing);
    if let Some((_, qfac)) = quat {
        pix[0] = qfac;
    }
    for (k, p) in pix.iter().enumerate() {
        put_f32(&mut b, 76 + 4 * k, *p);
    }
    put_f32(&mut b, 108, VOX_OFFSET as f64);
    put_f32(&mut b, 112, 1.0);
    b[123] = 2; // xyzt_units: NIFTI_UNITS_MM
    let desc = b"obelisk";
    b[148..148 + desc.len()].copy_from_slice(desc);
    if let Some((q, _)) = quat {
        put_i16(&mut b, 252, 1);
        for (k, v) in [q[0], q[1], q[2], a[(0, 3)], a[(1, 3)], a[(2, 3)]].iter().enumerate() {
            put_f32(&mut b, 256 + 4 * k, *v);
        }
    }
    put_i16(&mut b, 254, 1);
    for row in 0..3 {
        for col in 0..4 {
            put_f32(&mut b, 280 + 16 * row + 4 * col, a[(row, col)]);
        }
    }
    if o.intent_code == INTENT_VECTOR {
        b[328..328 + 6].copy_from_slice(b"vector");
    }
    b[344..348].copy_from_slice(b"n+1\0");
    Ok(b)
}

/// Quaternion (b, c, d) and qfac of `lin = R · diag(spacing) · diag(1, 1, qfac)`, or `None` when
/// `lin` has shear (then only the sform can hold it). As nifti1_io's `nifti_mat44_to_quatern`.
fn rotation_quaternion(lin: &Matrix3<f64>, spacing: [f64; 3]) -> Option<([f64; 3], f64)> {
    let mut r =
        lin * Matrix3::from_diagonal(&nalgebra::Vector3::new(1.0 / spacing[0], 1.0 / spacing[1], 1.0 / spacing[2]));
    if (r.transpose() * r - Matrix3::identity()).abs().max() > 1e-5 {
        return None;
    }
    let qfac = if r.determinant() < 0.0 {
        r.column_mut(2).neg_mut();
        -1.0
    } else {
        1.0
    };
    let (r11, r12, r13) = (r[(0, 0)], r[(0, 1)], r[(0, 2)]);
    let (r21, r22, r23) = (r[(1, 0)], r[(1, 1)], r[(1, 2)]);
    let (r31, r32, r33) = (r[(2, 0)], r[(2, 1)], r[(2, 2)]);
    let trace = r11 + r22 + r33 + 1.0;
    let (a, b, c, d);
    if trace > 0.5 {
        a = 0.5 * trace.sqrt();
        b = 0.25 * (r32 - r23) / a;
        c = 0.25 * (r13 - r31) / a;
        d = 0.25 * (r21 - r12) / a;
    } else {
        let xd = 1.0 + r11 - (r22 + r33);
        let yd = 1.0 + r22 - (r11 + r33);
        let zd = 1.0 + r33 - (r11 + r22);
        if xd > 1.0 {
            b = 0.5 * xd.sqrt();
            c = 0.25 * (r12 + r21) / b;
            d = 0.25 * (r13 + r31) / b;
            a = 0.25 * (r32 - r23) / b;
        } else if yd > 1.0 {
            c = 0.5 * yd.sqrt();
            b = 0.25 * (r12 + r21) / c;
            d = 0.25 * (r23 + r32) / c;
            a = 0.25 * (r13 - r31) / c;
        } else {
            d = 0.5 * zd.sqrt();
            b = 0.25 * (r13 + r31) / d;
            c = 0.25 * (r23 + r32) / d;
            a = 0.25 * (r21 - r12) / d;
        }
    }
    let s = if a < 0.0 { -1.0 } else { 1.0 };
    Some(([s * b, s * c, s * d], qfac))
}

fn write_nifti(path: &Path, o: &Out, data: &[u8]) -> Result<(), IoError> {
    let header = build_header(o).map_err(|m| IoError::new(path, m))?;
    write_atomic(path, |w| {
        if is_gz(path) {
            let mut gz = GzEncoder::new(w, raster::compression());
            gz.write_all(&header)?;
            gz.write_all(data)?;
            gz.finish()?;
        } else {
            w.write_all(&header)?;
            w.write_all(data)?;
        }
        Ok(())
    })
}

/// `dim[1..]` of an image: a 2D grid is written with `dim[0] = 2`, because ITK reads a 3D header
/// with one slice as a 3D image, which then does not combine with 2D fields.
fn spatial_dims(g: &Grid) -> Vec<usize> {
    let [nx, ny, nz] = g.shape();
    if nz == 1 {
        vec![nx, ny]
    } else {
        vec![nx, ny, nz]
    }
}

/// Writes an image as float32 (`.nii` or `.nii.gz` by extension); several channels go to `dim[4]`.
pub fn write_volume(path: &Path, v: &Volume) -> Result<(), IoError> {
    write_float(path, v, 3)
}

/// Writes feature maps as float32 with the channels in `dim[5]` (`X, Y, Z, 1, C`: NIfTI keeps
/// `dim[4]` for time and `dim[5]` for the components of a voxel); one channel gives a plain image.
pub fn write_channels(path: &Path, v: &Volume) -> Result<(), IoError> {
    write_float(path, v, 4)
}

/// Float32 data, channels (if more than one) in `dim[channel_dim + 1]`.
fn write_float(path: &Path, v: &Volume, channel_dim: usize) -> Result<(), IoError> {
    let mut dims = spatial_dims(&v.grid);
    if v.channels > 1 {
        dims.resize(channel_dim, 1);
        dims.push(v.channels);
    }
    let bytes: Vec<u8> = v.data.iter().flat_map(|x| x.to_le_bytes()).collect();
    write_nifti(path, &Out { dims: &dims, datatype: DataType::F32, intent_code: 0, grid: &v.grid }, &bytes)
}

/// Writes a label map in the smallest unsigned type that holds its largest label.
pub fn write_labels(path: &Path, l: &Labels) -> Result<(), IoError> {
    let (datatype, bytes) = raster::label_bytes(l);
    write_nifti(path, &Out { dims: &spatial_dims(&l.grid), datatype, intent_code: 0, grid: &l.grid }, &bytes)
}

/// Writes a displacement field the way ITK does: float32, intent vector, dim `[5, X, Y, Z, 1, 3]`
/// (`[5, X, Y, 1, 1, 2]` on a 2D grid, which ITK reads as a 2D field), affine = the grid's.
pub fn write_field(path: &Path, f: &DisplacementField) -> Result<(), IoError> {
    let [nx, ny, nz] = f.grid.shape();
    let comps = if f.grid.is_2d() { 2 } else { 3 };
    let n = f.grid.num_voxels();
    let bytes: Vec<u8> = f.data[..comps * n].iter().flat_map(|x| x.to_le_bytes()).collect();
    let dims = [nx, ny, nz, 1, comps];
    write_nifti(path, &Out { dims: &dims, datatype: DataType::F32, intent_code: INTENT_VECTOR, grid: &f.grid }, &bytes)
}

/// Writes raw values with an arbitrary on-disk type; for tests of the reader.
#[doc(hidden)]
pub fn write_raw(path: &Path, dims: &[usize], datatype: DataType, grid: &Grid, data: &[u8]) -> Result<(), IoError> {
    write_nifti(path, &Out { dims, datatype, intent_code: 0, grid }, data)
}
