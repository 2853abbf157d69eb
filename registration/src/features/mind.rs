//! MIND-SSC: the modality independent neighbourhood descriptor with a self-similarity context
//! (Heinrich et al., MICCAI 2013), computed as convexAdam's `MINDSSC(img, radius, dilation)`.
//!
//! For a voxel `x`, each channel compares two image patches centred on two neighbours `x + d·p`
//! and `x + d·q` of the six-neighbourhood (`d` = dilation) that are `√2·d` apart; the patch SSD is
//! the squared difference image `(I(y + d·p) − I(y + d·q))²` averaged by a `(2r+1)³` box filter.
//! Per voxel, the minimum over the channels is subtracted and the result divided by the mean over
//! the channels (the "variance" estimate, clamped to `[0.001·V, 1000·V]` where `V` is that mean
//! averaged over the whole volume); the descriptor is `exp(−·)`. Because every step is a ratio of
//! squared differences, the descriptor is unchanged by `I → a·I + b`, which is what makes it usable
//! across modalities.
//!
//! Conventions, all as convexAdam:
//! - Shifts and filters use replicate padding (indices clamped to the volume).
//! - Offsets are in voxels: anisotropic spacing is not compensated, so on a 1×1×3 mm image the
//!   through-plane neighbours are three times further away in millimetres.
//! - The channel order is convexAdam's (its permutation to the order of the original C++ code),
//!   so descriptors are interchangeable with theirs.
//!
//! Channel count: 12 for volumes. For 2D images (depth 1) use [`MindSsc::planar`], which keeps the
//! 4 of the 12 pairs that lie in-plane (in the same relative order) and filters in-plane only: on a
//! one-slice volume the through-plane neighbours replicate the centre slice, so the other 8
//! channels would only duplicate in-plane differences.

use rayon::prelude::*;

use super::FeatureExtractor;
use crate::{Error, Grid, Result, Volume};

/// Parameters of MIND-SSC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MindConfig {
    /// Patch radius `r`: patches are `(2r+1)` voxels wide.
    pub radius: usize,
    /// Distance `d` (voxels) from the centre to the six neighbours; must be at least 1.
    pub dilation: usize,
}

impl Default for MindConfig {
    fn default() -> Self {
        Self { radius: 2, dilation: 2 }
    }
}

/// Six-neighbourhood as `(z, y, x)` unit offsets, in convexAdam's order.
const SIX: [[isize; 3]; 6] = [[-1, 0, 0], [0, 0, -1], [0, -1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]];

/// The 12 pairs of [`SIX`] at squared distance 2 in convexAdam's output channel order (its pair
/// list `[(1,0), (2,0), (2,1), (3,0), (3,2), (4,1), (4,2), (4,3), (5,0), (5,1), (5,3), (5,4)]`
/// permuted by `[6, 9, 10, 11, 8, 5, 2, 0, 1, 3, 4, 7]`).
const PAIRS_3D: [(usize, usize); 12] =
    [(4, 2), (5, 1), (5, 3), (5, 4), (5, 0), (4, 1), (2, 1), (1, 0), (2, 0), (3, 0), (3, 2), (4, 3)];

/// The in-plane pairs of [`PAIRS_3D`] (neither neighbour along z), same relative order.
const PAIRS_2D: [(usize, usize); 4] = [(5, 1), (5, 3), (2, 1), (3, 2)];

/// Cap on `(ssd − min) / variance` before `exp(−·)`: `exp(−80) ≈ 2e−35` is still a normal `f32`,
/// so descriptors stay in `(0, 1]` even where the variance clamp makes the ratio huge.
const MAX_EXPONENT: f32 = 80.0;

/// Voxels per parallel work item in the per-voxel passes (fixed, so sums do not depend on the
/// thread count).
const BLOCK: usize = 1 << 14;

/// The MIND-SSC feature extractor. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MindSsc {
    config: MindConfig,
    planar: bool,
}

impl MindSsc {
    /// MIND-SSC for volumes: 12 channels. Refuses images one voxel deep (use [`Self::planar`]).
    pub fn new(config: MindConfig) -> Self {
        Self { config, planar: false }
    }

    /// MIND-SSC for 2D images (depth 1): the 4 in-plane pairs, in-plane box filter.
    pub fn planar(config: MindConfig) -> Self {
        Self { config, planar: true }
    }

    /// The variant that suits images on `grid`: planar if the grid is one voxel deep.
    pub fn for_grid(config: MindConfig, grid: &Grid) -> Self {
        if grid.is_2d() {
            Self::planar(config)
        } else {
            Self::new(config)
        }
    }

    pub fn config(&self) -> MindConfig {
        self.config
    }

    pub fn is_planar(&self) -> bool {
        self.planar
    }

    fn pairs(&self) -> &'static [(usize, usize)] {
        if self.planar {
            &PAIRS_2D
        } else {
            &PAIRS_3D
        }
    }
}

impl FeatureExtractor for MindSsc {
    fn name(&self) -> &str {
        if self.planar {
            "mind-ssc-2d"
        } else {
            "mind-ssc"
        }
    }

    fn channels(&self) -> usize {
        self.pairs().len()
    }

    /// Features on `image.grid` (full resolution).
    fn extract(&self, image: &Volume) -> Result<Volume> {
        if image.channels != 1 {
            return Err(Error::Data(format!("MIND-SSC needs a 1-channel image, got {}", image.channels)));
        }
        if self.config.dilation == 0 {
            return Err(Error::Data("MIND-SSC dilation must be at least 1".into()));
        }
        if self.planar != image.grid.is_2d() {
            return Err(Error::Data(format!(
                "{} cannot describe an image of shape {:?}; use MindSsc::for_grid",
                self.name(),
                image.grid.shape()
            )));
        }
        image.check_finite()?;
        let data = mind_ssc(&image.data, image.grid.shape(), self.config, self.pairs());
        Volume::new(image.grid.clone(), self.channels(), data)
    }
}

/// The descriptor, channel-major `(C, D, H, W)`.
fn mind_ssc(img: &[f32], shape: [usize; 3], cfg: MindConfig, pairs: &[(usize, usize)]) -> Vec<f32> {
    let n = img.len();
    let nc = pairs.len();
    let d = cfg.dilation as isize;
    let mut out = vec![0f32; nc * n];
    let mut tmp_a = vec![0f32; n];
    let mut tmp_b = vec![0f32; n];
    // Patch SSD per channel, written straight into the output to keep one volume per channel.
    for (c, &(p, q)) in pairs.iter().enumerate() {
        let p = SIX[p].map(|v| v * d);
        let q = SIX[q].map(|v| v * d);
        let dst = &mut out[c * n..(c + 1) * n];
        sq_diff_box_x(img, shape, p, q, cfg.radius, &mut tmp_b);
        if shape[2] > 1 {
            box_y(&tmp_b, shape, cfg.radius, &mut tmp_a);
            box_z(&tmp_a, shape, cfg.radius, dst);
        } else {
            box_y(&tmp_b, shape, cfg.radius, dst);
        }
    }
    drop((tmp_a, tmp_b));

    // Per-voxel minimum and mean over channels after subtracting it.
    let mut mins = vec![0f32; n];
    let mut var = vec![0f32; n];
    let ssd = &out;
    // Block by block, channel by channel: contiguous slices, so the loops vectorise.
    mins.par_chunks_mut(BLOCK).zip(var.par_chunks_mut(BLOCK)).enumerate().for_each(|(b, (mn, vr))| {
        let len = mn.len();
        let chan = |c: usize| &ssd[c * n + b * BLOCK..][..len];
        mn.copy_from_slice(chan(0));
        for c in 1..nc {
            mn.iter_mut().zip(chan(c)).for_each(|(m, &v)| *m = m.min(v));
        }
        vr.fill(0.0);
        for c in 0..nc {
            vr.iter_mut().zip(chan(c)).zip(mn.iter()).for_each(|((s, &v), &m)| *s += v - m);
        }
        vr.iter_mut().for_each(|v| *v /= nc as f32);
    });
    // Volume-wide mean of the variance, summed in fixed blocks so it is thread-count independent.
    let mean_var = var.par_chunks(BLOCK).map(|c| c.iter().map(|&v| f64::from(v)).sum::<f64>()).collect::<Vec<_>>();
    let mean_var = (mean_var.iter().sum::<f64>() / n as f64) as f32;
    let (lo, hi) = (mean_var * 0.001, mean_var * 1000.0);
    // Store 1/variance; a zero variance (flat neighbourhood in a flat image) means every channel
    // equals the minimum, so the ratio is 0 and the descriptor 1.
    var.par_iter_mut().for_each(|v| {
        let c = v.clamp(lo, hi);
        *v = if c > 0.0 { 1.0 / c } else { 0.0 };
    });
    out.par_chunks_mut(n).for_each(|ch| {
        ch.par_chunks_mut(BLOCK).enumerate().for_each(|(b, blk)| {
            let range = b * BLOCK..b * BLOCK + blk.len();
            for ((v, &m), &iv) in blk.iter_mut().zip(&mins[range.clone()]).zip(&var[range]) {
                *v = (-((*v - m) * iv).min(MAX_EXPONENT)).exp();
            }
        });
    });
    out
}

/// Index table `clamp(i + s, 0, n − 1)` for `i in 0..n`.
fn clamped(n: usize, s: isize) -> Vec<usize> {
    (0..n as isize).map(|i| (i + s).clamp(0, n as isize - 1) as usize).collect()
}

/// `(I(x + p) − I(x + q))²` with replicate padding (offsets `(z, y, x)` in voxels), averaged
/// over `[i − r, i + r]` along x. Fused so the squared differences never leave a row buffer.
fn sq_diff_box_x(img: &[f32], shape: [usize; 3], p: [isize; 3], q: [isize; 3], r: usize, out: &mut [f32]) {
    let [nx, ny, nz] = shape;
    let w = 1.0 / (2 * r + 1) as f32;
    let (xp, xq) = (clamped(nx, p[2]), clamped(nx, q[2]));
    let (yp, yq) = (clamped(ny, p[1]), clamped(ny, q[1]));
    let (zp, zq) = (clamped(nz, p[0]), clamped(nz, q[0]));
    // Where neither x shift is clamped the rows are plain offset slices, which vectorises; the
    // few border voxels go through the index tables.
    let lo = (-p[2].min(q[2])).clamp(0, nx as isize) as usize;
    let hi = (nx as isize - p[2].max(q[2]).max(0)).clamp(lo as isize, nx as isize) as usize;
    out.par_chunks_mut(nx * ny).enumerate().for_each_init(
        || vec![0f32; nx + 2 * r],
        |padded, (k, slice)| {
            for (j, row) in slice.chunks_mut(nx).enumerate() {
                let a = &img[(zp[k] * ny + yp[j]) * nx..][..nx];
                let b = &img[(zq[k] * ny + yq[j]) * nx..][..nx];
                let diff = &mut padded[r..r + nx];
                for i in (0..lo).chain(hi..nx) {
                    let t = a[xp[i]] - b[xq[i]];
                    diff[i] = t * t;
                }
                if hi > lo {
                    let a = &a[(lo as isize + p[2]) as usize..][..hi - lo];
                    let b = &b[(lo as isize + q[2]) as usize..][..hi - lo];
                    diff[lo..hi].iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&x, &y))| {
                        let t = x - y;
                        *o = t * t;
                    });
                }
                // Replicate padding for the box filter, then 2r+1 shifted copies summed in a fixed
                // order (vectorised, and a voxel's value does not depend on where it sits).
                let (first, last) = (padded[r], padded[r + nx - 1]);
                padded[..r].fill(first);
                padded[r + nx..].fill(last);
                sum_rows(row, (0..=2 * r).map(|t| &padded[t..t + nx]), w);
            }
        },
    );
}

/// Mean over `[j − r, j + r]` along y (whole rows at a time, so the inner loop vectorises).
fn box_y(src: &[f32], shape: [usize; 3], r: usize, dst: &mut [f32]) {
    let [nx, ny, _] = shape;
    let w = 1.0 / (2 * r + 1) as f32;
    let last = ny as isize - 1;
    let r = r as isize;
    dst.par_chunks_mut(nx * ny).zip(src.par_chunks(nx * ny)).for_each(|(o, s)| {
        for (j, row) in o.chunks_mut(nx).enumerate() {
            sum_rows(row, (j as isize - r..=j as isize + r).map(|t| &s[t.clamp(0, last) as usize * nx..][..nx]), w);
        }
    });
}

/// Mean over `[k − r, k + r]` along z, one output slice per work item.
fn box_z(src: &[f32], shape: [usize; 3], r: usize, dst: &mut [f32]) {
    let [nx, ny, nz] = shape;
    let plane = nx * ny;
    let w = 1.0 / (2 * r + 1) as f32;
    let last = nz as isize - 1;
    let r = r as isize;
    dst.par_chunks_mut(plane).enumerate().for_each(|(k, o)| {
        sum_rows(o, (k as isize - r..=k as isize + r).map(|t| &src[t.clamp(0, last) as usize * plane..][..plane]), w);
    });
}

/// `out = w · Σ rows`, summed in iteration order.
fn sum_rows<'a>(out: &mut [f32], rows: impl Iterator<Item = &'a [f32]>, w: f32) {
    out.fill(0.0);
    for row in rows {
        out.iter_mut().zip(row).for_each(|(o, &v)| *o += v);
    }
    out.iter_mut().for_each(|o| *o *= w);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hash noise in [0, 1) of integer coordinates: translating the coordinates translates the
    /// image exactly.
    fn noise(i: i64, j: i64, k: i64) -> f32 {
        let mut h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (j as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
            ^ (k as u64).wrapping_mul(0x1656_67B1_9E37_79F9);
        h ^= h >> 29;
        h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 32;
        (h >> 40) as f32 / (1u64 << 24) as f32
    }

    fn image(shape: [usize; 3], shift: [i64; 3], f: impl Fn(f32) -> f32) -> Volume {
        let grid = Grid::from_spacing(shape, [1.0, 1.2, 2.0], [0.0; 3]).unwrap();
        let mut data = Vec::with_capacity(grid.num_voxels());
        for k in 0..shape[2] as i64 {
            for j in 0..shape[1] as i64 {
                for i in 0..shape[0] as i64 {
                    // Blocky noise (2-voxel cells) so neighbouring patches are partly similar.
                    let (a, b, c) = ((i - shift[0]).div_euclid(2), (j - shift[1]).div_euclid(2), (k - shift[2]));
                    data.push(f(noise(a, b, c.div_euclid(2)) + 0.3 * noise(i - shift[0], j - shift[1], c)));
                }
            }
        }
        Volume::new(grid, 1, data).unwrap()
    }

    /// The definition, evaluated voxel by voxel with clamped indices.
    fn naive(img: &Volume, cfg: MindConfig, pairs: &[(usize, usize)]) -> Vec<f32> {
        let [nx, ny, nz] = img.grid.shape();
        let n = img.grid.num_voxels();
        let at = |z: isize, y: isize, x: isize| {
            let c = |v: isize, m: usize| v.clamp(0, m as isize - 1) as usize;
            img.data[(c(z, nz) * ny + c(y, ny)) * nx + c(x, nx)] as f64
        };
        let (r, d) = (cfg.radius as isize, cfg.dilation as isize);
        let rz = if nz > 1 { r } else { 0 };
        let mut ssd = vec![0f64; pairs.len() * n];
        for z in 0..nz as isize {
            for y in 0..ny as isize {
                for x in 0..nx as isize {
                    let v = (z as usize * ny + y as usize) * nx + x as usize;
                    for (c, &(p, q)) in pairs.iter().enumerate() {
                        let (p, q) = (SIX[p], SIX[q]);
                        let mut s = 0.0;
                        let mut cnt = 0.0;
                        for oz in -rz..=rz {
                            for oy in -r..=r {
                                for ox in -r..=r {
                                    let c3 = |v: isize, m: usize| v.clamp(0, m as isize - 1);
                                    let (cz, cy, cx) = (c3(z + oz, nz), c3(y + oy, ny), c3(x + ox, nx));
                                    let a = at(cz + d * p[0], cy + d * p[1], cx + d * p[2]);
                                    let b = at(cz + d * q[0], cy + d * q[1], cx + d * q[2]);
                                    s += (a - b) * (a - b);
                                    cnt += 1.0;
                                }
                            }
                        }
                        ssd[c * n + v] = s / cnt;
                    }
                }
            }
        }
        let nc = pairs.len();
        let mut mins = vec![0.0; n];
        let mut vars = vec![0.0; n];
        for v in 0..n {
            mins[v] = (0..nc).map(|c| ssd[c * n + v]).fold(f64::INFINITY, f64::min);
            vars[v] = (0..nc).map(|c| ssd[c * n + v] - mins[v]).sum::<f64>() / nc as f64;
        }
        let g = vars.iter().sum::<f64>() / n as f64;
        (0..nc * n).map(|i| (-(ssd[i] - mins[i % n]) / vars[i % n].clamp(g * 0.001, g * 1000.0)).exp() as f32).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn pairs_are_the_twelve_edges_at_squared_distance_two() {
        let mut seen = Vec::new();
        for &(p, q) in &PAIRS_3D {
            let d2: isize = (0..3).map(|a| (SIX[p][a] - SIX[q][a]).pow(2)).sum();
            assert_eq!(d2, 2);
            let key = (p.min(q), p.max(q));
            assert!(!seen.contains(&key));
            seen.push(key);
        }
        for pair in PAIRS_2D {
            assert!(PAIRS_3D.contains(&pair));
            assert!(SIX[pair.0][0] == 0 && SIX[pair.1][0] == 0);
        }
    }

    #[test]
    fn matches_the_definition_3d_and_2d() {
        for cfg in [MindConfig::default(), MindConfig { radius: 1, dilation: 1 }] {
            let img = image([11, 9, 7], [0; 3], |v| v);
            let m = MindSsc::new(cfg);
            let f = m.extract(&img).unwrap();
            assert_eq!(f.channels, 12);
            assert_eq!(f.channels, m.channels());
            let e = max_diff(&f.data, &naive(&img, cfg, &PAIRS_3D));
            assert!(e < 1e-4, "{cfg:?}: {e}");

            let img2 = image([13, 10, 1], [0; 3], |v| v);
            let m2 = MindSsc::for_grid(cfg, &img2.grid);
            let f2 = m2.extract(&img2).unwrap();
            assert_eq!((f2.channels, m2.channels()), (4, 4));
            let e = max_diff(&f2.data, &naive(&img2, cfg, &PAIRS_2D));
            assert!(e < 1e-4, "2d {cfg:?}: {e}");
        }
    }

    #[test]
    fn output_is_in_unit_interval_and_constant_image_is_flat() {
        let img = image([16, 12, 10], [0; 3], |v| v * 1000.0);
        let f = MindSsc::new(MindConfig::default()).extract(&img).unwrap();
        assert!(f.data.iter().all(|&v| v > 0.0 && v <= 1.0));
        assert!(f.data.iter().any(|&v| v < 0.5), "descriptor should not be trivially 1");
        let c = Volume::new(img.grid.clone(), 1, vec![42.0; img.grid.num_voxels()]).unwrap();
        let f = MindSsc::new(MindConfig::default()).extract(&c).unwrap();
        assert!(f.data.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn invariant_to_intensity_shift_and_scale() {
        let cfg = MindConfig::default();
        let a = MindSsc::new(cfg).extract(&image([20, 18, 12], [0; 3], |v| v)).unwrap();
        for (s, o) in [(3.5, -40.0), (-0.02, 7.0)] {
            let b = MindSsc::new(cfg).extract(&image([20, 18, 12], [0; 3], |v| s * v + o)).unwrap();
            let e = max_diff(&a.data, &b.data);
            assert!(e < 1e-4, "a = {s}, b = {o}: {e}");
        }
    }

    #[test]
    fn translated_image_gives_translated_features() {
        let cfg = MindConfig::default();
        let shape = [26, 24, 22];
        let t = [3i64, -2, 2];
        let a = MindSsc::new(cfg).extract(&image(shape, [0; 3], |v| v)).unwrap();
        let b = MindSsc::new(cfg).extract(&image(shape, t, |v| v)).unwrap();
        // Away from the borders (shift + dilation + radius) the descriptor only sees the shifted
        // content; the volume-wide variance clamp does not bind on this image.
        let m = (cfg.radius + cfg.dilation) as i64 + 3;
        let n = a.grid.num_voxels();
        let mut checked = 0;
        for k in m..shape[2] as i64 - m {
            for j in m..shape[1] as i64 - m {
                for i in m..shape[0] as i64 - m {
                    let vb = b.index(i as usize, j as usize, k as usize);
                    let va = a.index((i - t[0]) as usize, (j - t[1]) as usize, (k - t[2]) as usize);
                    for c in 0..12 {
                        let (x, y) = (a.data[c * n + va], b.data[c * n + vb]);
                        assert!((x - y).abs() < 1e-5, "channel {c} at {i},{j},{k}: {x} vs {y}");
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 500);
        // and the features do differ from the untranslated ones there
        assert!(max_diff(&a.data, &b.data) > 0.1);
    }

    #[test]
    fn independent_of_thread_count() {
        // Larger than one work block, so the volume-wide mean is a sum of several partials.
        let img = image([40, 36, 30], [0; 3], |v| v);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| MindSsc::new(MindConfig::default()).extract(&img).unwrap())
        };
        assert_eq!(run(1).data, run(3).data);
    }

    #[test]
    fn rejects_mismatched_inputs() {
        let vol = image([8, 8, 8], [0; 3], |v| v);
        let flat = image([8, 8, 1], [0; 3], |v| v);
        assert!(MindSsc::planar(MindConfig::default()).extract(&vol).is_err());
        assert!(MindSsc::new(MindConfig::default()).extract(&flat).is_err());
        assert!(MindSsc::new(MindConfig { radius: 1, dilation: 0 }).extract(&vol).is_err());
        let mut bad = vol.clone();
        bad.data[3] = f32::NAN;
        assert!(MindSsc::new(MindConfig::default()).extract(&bad).is_err());
    }
}
