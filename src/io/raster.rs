//! What the NIfTI, NRRD, MetaImage and DICOM readers and writers share: ITK's LPS geometry,
//! voxel values turned into images, label maps and fields under the same checks, and compressed
//! streams read with messages a user can act on.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flate2::read::{MultiGzDecoder, ZlibDecoder};
use nalgebra::{Matrix3, Matrix4, Vector3};
use registration::grid::MAX_VOXELS;
use registration::{DisplacementField, Grid, Labels, Volume};

use super::nifti::DataType;
use super::IoError;

/// How hard writers compress: level 1, which NIfTI writing used before it was shared, trades
/// some size for speed.
pub(super) fn compression() -> flate2::Compression {
    flate2::Compression::new(1)
}

/// How the bytes of a voxel block are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Codec {
    Raw,
    Gzip,
    /// zlib (RFC 1950), as MetaImage writes; a gzip stream is recognised too, as MetaIO does.
    Zlib,
}

/// Turns read errors into messages a user can act on; `stream` names the decoder `e` came from
/// ("gzip", "zlib"), if any.
pub(super) fn read_error(path: &Path, e: std::io::Error, what: &str, stream: Option<&str>) -> IoError {
    let msg = match (e.kind(), stream) {
        (std::io::ErrorKind::UnexpectedEof, Some(z)) => format!("truncated {z} stream (while reading the {what})"),
        (std::io::ErrorKind::UnexpectedEof, None) => format!("file is truncated (while reading the {what})"),
        (std::io::ErrorKind::NotFound, _) => "file not found".to_string(),
        (std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData, Some(z)) => {
            format!("corrupt {z} stream ({e})")
        }
        _ => format!("cannot read the {what}: {e}"),
    };
    IoError::new(path, msg)
}

/// Reads `nbytes` of voxel data from `reader` (positioned at the block), decoding it by `codec`;
/// `skip` bytes of the decoded stream come first. The buffer grows with the data actually
/// present, so a header promising more than a compressed file holds costs no more memory than
/// the file does.
fn read_block(path: &Path, reader: impl Read, codec: Codec, skip: u64, nbytes: usize) -> Result<Vec<u8>, IoError> {
    let stream = match codec {
        Codec::Raw => None,
        Codec::Gzip => Some("gzip"),
        Codec::Zlib => Some("zlib"),
    };
    let mut reader: Box<dyn Read> = match codec {
        Codec::Raw => Box::new(reader),
        Codec::Gzip => Box::new(MultiGzDecoder::new(std::io::BufReader::new(reader))),
        Codec::Zlib => {
            let mut r = std::io::BufReader::new(reader);
            let head = std::io::BufRead::fill_buf(&mut r).map_err(|e| read_error(path, e, "voxel data", None))?;
            if head.starts_with(&[0x1f, 0x8b]) {
                Box::new(MultiGzDecoder::new(r))
            } else {
                Box::new(ZlibDecoder::new(r))
            }
        }
    };
    let skipped = std::io::copy(&mut (&mut reader).take(skip), &mut std::io::sink())
        .map_err(|e| read_error(path, e, "voxel data", stream))?;
    let mut bytes = Vec::new();
    (&mut reader).take(nbytes as u64).read_to_end(&mut bytes).map_err(|e| read_error(path, e, "voxel data", stream))?;
    if skipped < skip || bytes.len() < nbytes {
        return Err(read_error(path, std::io::ErrorKind::UnexpectedEof.into(), "voxel data", stream));
    }
    // a compressed stream is only verified (checksum, length) at its end, so read on to it
    if stream.is_some() {
        std::io::copy(&mut reader, &mut std::io::sink()).map_err(|e| read_error(path, e, "voxel data", stream))?;
    }
    Ok(bytes)
}

/// Where a header says its voxel block lies.
pub(super) struct Block {
    /// The data file: the header's own file when the data are attached.
    pub file: PathBuf,
    /// Where the data file's content starts (past the header when attached).
    pub start: u64,
    /// Lines to pass over from `start` (NRRD's `line skip`).
    pub line_skip: u64,
    /// Bytes of the decoded stream before the data; `None`: the data are the last bytes of a
    /// raw file.
    pub skip: Option<u64>,
    pub codec: Codec,
    pub nbytes: usize,
}

impl Block {
    /// The data file opened at the block's start (past any line skip) and the decoded bytes to
    /// skip; checks that an uncompressed file holds all the data, so that a header cannot make
    /// us allocate more than the file has. Errors name `header`, and the data file too.
    fn locate(&self, header: &Path) -> Result<(BufReader<File>, u64), IoError> {
        let what = if self.file == header { String::new() } else { format!("data file {}: ", self.file.display()) };
        let err = |m: String| IoError::new(header, format!("{what}{m}"));
        let file = File::open(&self.file).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => err("file not found".into()),
            _ => err(format!("cannot open: {e}")),
        })?;
        let len = file.metadata().map_err(|e| err(format!("cannot open: {e}")))?.len();
        let mut r = BufReader::new(file);
        r.seek(SeekFrom::Start(self.start)).map_err(|e| err(format!("cannot read: {e}")))?;
        let mut pos = self.start;
        for _ in 0..self.line_skip {
            let n = r.skip_until(b'\n').map_err(|e| err(format!("cannot read: {e}")))?;
            if n == 0 {
                return Err(err(format!("file is truncated (fewer lines than the {} to skip)", self.line_skip)));
            }
            pos += n as u64;
        }
        let nbytes = self.nbytes as u64;
        let truncated = |need: u64| err(format!("file is truncated: {len} bytes, but the header needs {need}"));
        let skip = match self.skip {
            Some(s) => s,
            None => len.checked_sub(pos + nbytes).ok_or_else(|| truncated(pos + nbytes))?,
        };
        if self.codec == Codec::Raw && len < pos + skip + nbytes {
            return Err(truncated(pos + skip + nbytes));
        }
        if len < pos {
            return Err(truncated(pos));
        }
        Ok((r, skip))
    }

    /// Checks that the data file is there and, uncompressed, holds all the data.
    pub fn check(&self, header: &Path) -> Result<(), IoError> {
        self.locate(header).map(|_| ())
    }

    /// The block's bytes, decoded.
    pub fn read(&self, header: &Path) -> Result<Vec<u8>, IoError> {
        let (r, skip) = self.locate(header)?;
        read_block(&self.file, r, self.codec, skip, self.nbytes).map_err(|e| {
            if self.file == header {
                e
            } else {
                IoError::new(header, format!("data file {e}"))
            }
        })
    }
}

/// A data file named in a header: relative names are relative to the header's folder.
pub(super) fn beside(header: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        header.parent().unwrap_or(Path::new("")).join(p)
    }
}

/// A validated NRRD or MetaImage header: where the values go, how they are stored and where.
pub(super) struct Header {
    pub layout: Layout,
    pub datatype: DataType,
    pub big_endian: bool,
    pub block: Block,
}

impl Header {
    /// The grid, once the data file is known to be there (and, uncompressed, long enough).
    pub fn grid(self, path: &Path) -> Result<Grid, IoError> {
        self.block.check(path)?;
        Ok(self.layout.grid)
    }

    /// Reads the data.
    pub fn read(self, path: &Path) -> Result<Decoded, IoError> {
        let bytes = self.block.read(path)?;
        Ok(Decoded::encoded(self.layout, bytes, self.datatype, self.big_endian))
    }
}

/// `x_lps = −x_ras`, `y_lps = −y_ras`: its own inverse, so it converts both ways.
pub(super) fn flip_xy() -> Matrix4<f64> {
    Matrix4::from_diagonal(&nalgebra::Vector4::new(-1.0, -1.0, 1.0, 1.0))
}

/// A grid from ITK-style geometry in LPS: one vector per voxel axis (direction times spacing)
/// and the position of the first voxel, each with one entry per axis of the space (2 or 3).
/// A 2D image in a 2D space lies in the plane z = 0 with a unit third axis along +z, as ITK's
/// 2D images do when they meet 3D ones; a 2D image in 3D space gets a unit third axis along the
/// normal of its plane.
pub(super) fn grid_from_lps(
    path: &Path,
    shape: [usize; 3],
    axes: &[Vec<f64>],
    origin: &[f64],
) -> Result<Grid, IoError> {
    let space = origin.len();
    if !(2..=3).contains(&space) || !(2..=3).contains(&axes.len()) || axes.iter().any(|a| a.len() != space) {
        return Err(IoError::new(path, format!("{}D axes in a {space}D space are not supported", axes.len())));
    }
    if axes.len() > space {
        return Err(IoError::new(path, format!("a {}D image cannot lie in a {space}D space", axes.len())));
    }
    let pad = |v: &[f64]| Vector3::new(v[0], v[1], v.get(2).copied().unwrap_or(0.0));
    let (a, b) = (pad(&axes[0]), pad(&axes[1]));
    let c = match axes.get(2) {
        Some(c) => pad(c),
        None => a.cross(&b).try_normalize(0.0).unwrap_or(Vector3::z()),
    };
    let mut lps = Matrix4::identity();
    lps.fixed_view_mut::<3, 3>(0, 0).copy_from(&Matrix3::from_columns(&[a, b, c]));
    lps.fixed_view_mut::<3, 1>(0, 3).copy_from(&pad(origin));
    Grid::new(shape, flip_xy() * lps).map_err(|e| IoError::new(path, format!("invalid geometry in the header: {e}")))
}

/// ITK's view of a grid, for writers: the voxel axes (direction times spacing) and the origin in
/// LPS, with two entries each when the grid is a 2D image in the plane z = 0 with a unit third
/// axis along +z (what a 2D ITK image becomes here, so that ITK reads it back as 2D), else three.
pub(super) struct LpsGeometry {
    pub axes: Vec<Vec<f64>>,
    pub origin: Vec<f64>,
}

impl LpsGeometry {
    pub fn of(grid: &Grid) -> Self {
        let m = flip_xy() * grid.affine();
        let col = |c: usize| vec![m[(0, c)], m[(1, c)], m[(2, c)]];
        let zero = |r: usize, c: usize| m[(r, c)].abs() < 1e-9;
        let flat = grid.is_2d()
            && zero(2, 0)
            && zero(2, 1)
            && zero(2, 3)
            && zero(0, 2)
            && zero(1, 2)
            && (m[(2, 2)] - 1.0).abs() < 1e-9;
        let n = if flat { 2 } else { 3 };
        let mut axes: Vec<Vec<f64>> = (0..n).map(col).collect();
        axes.iter_mut().for_each(|a| a.truncate(n));
        let mut origin = col(3);
        origin.truncate(n);
        Self { axes, origin }
    }

    /// Sizes of the spatial axes written.
    pub fn dims(&self, grid: &Grid) -> Vec<usize> {
        grid.shape()[..self.axes.len()].to_vec()
    }
}

/// Where a reader's voxel values sit and what they may become.
pub(super) struct Layout {
    pub grid: Grid,
    /// Values per voxel (1 for a plain image).
    pub components: usize,
    /// Distance, in values, between successive components of one voxel: 1 when they are
    /// interleaved (ITK's vector images), the number of voxels when channel-major.
    pub comp_stride: usize,
    /// Whether the file stores floating-point values (a displacement field must).
    pub float: bool,
}

impl Layout {
    fn single(&self, path: &Path, what: &str) -> Result<(), IoError> {
        if self.components != 1 {
            return Err(IoError::new(
                path,
                format!("has {} values per voxel (a vector image); expected a single-channel {what}", self.components),
            ));
        }
        Ok(())
    }
}

/// What a reader found, before it becomes an image, label map or field.
pub(super) struct Decoded {
    layout: Layout,
    samples: Samples,
}

enum Samples {
    /// A block of on-disk samples.
    Encoded { bytes: Vec<u8>, datatype: DataType, big_endian: bool },
    /// Values already decoded and rescaled, as float32 (exact for whole numbers up to 2^24) to
    /// halve what a large series costs while it is assembled.
    Values(Vec<f32>),
}

impl Decoded {
    pub fn encoded(layout: Layout, bytes: Vec<u8>, datatype: DataType, big_endian: bool) -> Self {
        Self { layout, samples: Samples::Encoded { bytes, datatype, big_endian } }
    }

    pub fn values(layout: Layout, values: Vec<f32>) -> Self {
        Self { layout, samples: Samples::Values(values) }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = f64> + '_> {
        match &self.samples {
            Samples::Encoded { bytes, datatype, big_endian } => {
                let (t, big) = (*datatype, *big_endian);
                Box::new(bytes.chunks_exact(t.size()).map(move |c| super::nifti::decode(c, t, big)))
            }
            Samples::Values(v) => Box::new(v.iter().map(|&x| x as f64)),
        }
    }

    /// A single-channel image; NaN or infinite values are an error.
    pub fn volume(self, path: &Path) -> Result<Volume, IoError> {
        let l = &self.layout;
        l.single(path, "image")?;
        let mut data = Vec::with_capacity(l.grid.num_voxels());
        data.extend(self.iter().map(|v| v as f32));
        let v = Volume::new(l.grid.clone(), 1, data).map_err(|e| IoError::new(path, e.to_string()))?;
        checked(path, v)
    }

    /// A label map: whole numbers ≥ 0.
    pub fn labels(self, path: &Path) -> Result<Labels, IoError> {
        let l = &self.layout;
        l.single(path, "label map")?;
        let mut data = Vec::with_capacity(l.grid.num_voxels());
        for (idx, v) in self.iter().enumerate() {
            data.push(label_value(v).map_err(|m| IoError::new(path, format!("voxel {idx}: {m}")))?);
        }
        Labels::new(l.grid.clone(), data).map_err(|e| IoError::new(path, e.to_string()))
    }

    /// A displacement field in the ITK convention: floating-point vectors of 3 components (2 on
    /// a 2D grid, whose z component becomes 0), LPS mm.
    pub fn field(self, path: &Path) -> Result<DisplacementField, IoError> {
        let l = &self.layout;
        let want: &[usize] = if l.grid.is_2d() { &[2, 3] } else { &[3] };
        if !want.contains(&l.components) {
            return Err(IoError::new(
                path,
                format!(
                    "is not a displacement field: {} value(s) per voxel on a {:?} grid, expected vectors of {}",
                    l.components,
                    l.grid.shape(),
                    if l.grid.is_2d() { "2 or 3" } else { "3" }
                ),
            ));
        }
        if !l.float {
            return Err(IoError::new(path, "displacement field holds integers; expected float32 or float64"));
        }
        let n = l.grid.num_voxels();
        let (c, stride) = (l.components, l.comp_stride);
        let mut data = vec![0.0f32; 3 * n];
        for (idx, v) in self.iter().enumerate().take(c * n) {
            if !v.is_finite() {
                return Err(IoError::new(
                    path,
                    format!("voxel {idx}: displacement field holds NaN or infinite values"),
                ));
            }
            // idx = (outer · c + comp) · stride + inner, with the voxel at outer · stride + inner
            let (inner, rest) = (idx % stride, idx / stride);
            let (comp, outer) = (rest % c, rest / c);
            data[comp * n + outer * stride + inner] = v as f32;
        }
        DisplacementField::new(l.grid.clone(), data).map_err(|e| IoError::new(path, e.to_string()))
    }
}

/// Rejects NaN or infinite voxels, naming the file.
pub(super) fn checked(path: &Path, v: Volume) -> Result<Volume, IoError> {
    v.check_finite().map_err(|e| IoError::new(path, e.to_string().trim_start_matches("data: ").to_string()))?;
    Ok(v)
}

/// A voxel value as a label, or why it cannot be one.
pub(super) fn label_value(v: f64) -> Result<u32, String> {
    if !v.is_finite() {
        Err("label map holds NaN or infinite values".into())
    } else if v.fract() != 0.0 {
        Err(format!("label map holds the non-integer value {v}"))
    } else if v < 0.0 {
        Err(format!("label map holds the negative value {v}"))
    } else if v > u32::MAX as f64 {
        Err(format!("label {v} is too large"))
    } else {
        Ok(v as u32)
    }
}

/// What writers store: the spatial sizes, values per voxel (interleaved, ITK's order), the
/// on-disk type and the little-endian bytes.
pub(super) struct Payload {
    pub geometry: LpsGeometry,
    pub dims: Vec<usize>,
    pub components: usize,
    pub datatype: DataType,
    pub bytes: Vec<u8>,
}

impl Payload {
    /// Float32; several channels become interleaved vectors.
    pub fn volume(v: &Volume) -> Self {
        let n = v.grid.num_voxels();
        let mut bytes = Vec::with_capacity(4 * v.data.len());
        for i in 0..n {
            for c in 0..v.channels {
                bytes.extend_from_slice(&v.data[c * n + i].to_le_bytes());
            }
        }
        let geometry = LpsGeometry::of(&v.grid);
        Self { dims: geometry.dims(&v.grid), geometry, components: v.channels, datatype: DataType::F32, bytes }
    }

    /// The smallest unsigned type that holds the largest label.
    pub fn labels(l: &Labels) -> Self {
        let (datatype, bytes) = label_bytes(l);
        let geometry = LpsGeometry::of(&l.grid);
        Self { dims: geometry.dims(&l.grid), geometry, components: 1, datatype, bytes }
    }

    /// Float32 vectors: 2 components on a grid written as 2D, else 3.
    pub fn field(f: &DisplacementField) -> Self {
        let geometry = LpsGeometry::of(&f.grid);
        let comps = geometry.axes.len();
        let n = f.grid.num_voxels();
        let mut bytes = Vec::with_capacity(4 * comps * n);
        for i in 0..n {
            for c in 0..comps {
                bytes.extend_from_slice(&f.data[c * n + i].to_le_bytes());
            }
        }
        Self { dims: geometry.dims(&f.grid), geometry, components: comps, datatype: DataType::F32, bytes }
    }
}

/// Little-endian labels in the smallest unsigned type that holds the largest one.
pub(super) fn label_bytes(l: &Labels) -> (DataType, Vec<u8>) {
    let max = l.data.iter().copied().max().unwrap_or(0);
    if max <= u8::MAX as u32 {
        (DataType::U8, l.data.iter().map(|&x| x as u8).collect())
    } else if max <= u16::MAX as u32 {
        (DataType::U16, l.data.iter().flat_map(|&x| (x as u16).to_le_bytes()).collect())
    } else {
        (DataType::U32, l.data.iter().flat_map(|&x| x.to_le_bytes()).collect())
    }
}

/// Numbers for a text header: shortest round-trip form, exponent for extreme magnitudes (which
/// `strtod` reads, as ITK's readers use).
pub(super) fn joined(v: &[f64], sep: &str) -> String {
    v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(sep)
}

/// Parses whitespace- or comma-separated numbers, naming `what` in the error.
pub(super) fn numbers(text: &str, what: &str) -> Result<Vec<f64>, String> {
    text.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<f64>().map_err(|_| format!("{what}: {s:?} is not a number")))
        .collect()
}

/// Parses positive sizes, at most `MAX_VOXELS` each.
pub(super) fn sizes(text: &str, what: &str) -> Result<Vec<usize>, String> {
    text.split_whitespace()
        .map(|s| match s.parse::<u64>() {
            Ok(0) => Err(format!("{what}: sizes must be positive, got 0")),
            Ok(n) if n as u128 <= MAX_VOXELS as u128 => Ok(n as usize),
            Ok(n) => Err(format!("{what}: {n} is absurdly large")),
            Err(_) => Err(format!("{what}: {s:?} is not a size")),
        })
        .collect()
}

/// The spatial shape `[nx, ny, nz]` (a 2D image has nz = 1) of an image whose axes have `sizes`
/// (`spatial` of them spatial, the rest vector components); errors when the values add up to an
/// absurd number, so that a header cannot make us allocate terabytes.
pub(super) fn shape(sizes: &[usize], spatial: &[usize]) -> Result<[usize; 3], String> {
    sizes
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_VOXELS)
        .ok_or_else(|| format!("sizes {sizes:?} are absurdly large"))?;
    let d = |i: usize| spatial.get(i).map_or(1, |&a| sizes[a]);
    Ok([d(0), d(1), d(2)])
}
