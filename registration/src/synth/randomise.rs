//! Domain-randomised image pairs from real label maps (SynthSeg-style), for learning
//! registration features that hold across contrasts.
//!
//! A [`LabelSubject`] is a label map (optionally with the unlabelled voxels split into intensity
//! classes of its own image, so that fat, air and bone outside the labelled organs form
//! structures too) on an isotropic grid in RAS voxel order, the order in which registration
//! presents images to feature extractors. [`random_pair`] cuts two patches of the same anatomy
//! related by a known random map `ψ` (affine and elastic) and renders each with its own random
//! contrast: per-class Gaussian intensities, blur, a smooth multiplicative bias field, noise and
//! a gamma curve. Every number is a function of the seed only.

use rayon::prelude::*;

use super::rng::{derive, normal_pair, SplitMix64};
use crate::{Error, Grid, Labels, Result, Volume};

/// Options of [`random_pair`]. Lengths in patch voxels unless named `_mm`.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomiseConfig {
    /// Patch edge (voxels).
    pub patch: usize,
    /// Range of the patch spacing (mm).
    pub spacing_mm: [f64; 2],
    /// Largest rotation of `ψ` about each axis (degrees).
    pub rotation_deg: f64,
    /// Largest relative scaling of `ψ` per axis.
    pub scaling: f64,
    /// Largest standard deviation of the elastic displacement's control values.
    pub elastic: f64,
    /// Control points per axis of the elastic displacement.
    pub elastic_control: usize,
    /// Largest standard deviation of the intensity noise within a class (of a `[0, 1]` range).
    pub class_noise: f64,
    /// Largest Gaussian blur sigma.
    pub blur: f64,
    /// Largest standard deviation of the log bias field.
    pub bias: f64,
    /// Standard deviation of the log gamma exponent.
    pub gamma: f64,
    /// Probability that both images share their class intensities (a same-modality pair).
    pub same_contrast: f64,
}

impl Default for RandomiseConfig {
    fn default() -> Self {
        Self {
            patch: 40,
            spacing_mm: [1.8, 3.4],
            rotation_deg: 10.0,
            scaling: 0.08,
            elastic: 2.5,
            elastic_control: 5,
            class_noise: 0.06,
            blur: 1.0,
            bias: 0.3,
            gamma: 0.3,
            same_contrast: 0.4,
        }
    }
}

/// A label map prepared for randomisation: isotropic, RAS voxel order, classes `0..classes`.
#[derive(Debug, Clone)]
pub struct LabelSubject {
    /// `[nx, ny, nz]`.
    pub shape: [usize; 3],
    /// Isotropic spacing (mm).
    pub spacing: f64,
    /// Class per voxel, x fastest.
    pub classes: Vec<u16>,
    /// Number of classes.
    pub num_classes: usize,
    /// The original label per voxel (0 = unlabelled), for Dice on generated pairs.
    pub labels: Vec<u32>,
    /// Voxels with an original label, from which patch centres are drawn.
    foreground: Vec<u32>,
}

impl LabelSubject {
    /// `labels` resampled (nearest) to `spacing` mm in RAS voxel order. With `image` (on the
    /// label map's grid), unlabelled voxels are split into `background_classes` intensity
    /// quantiles of the image; without, they form one class.
    pub fn new(labels: &Labels, image: Option<&Volume>, spacing: f64, background_classes: usize) -> Result<Self> {
        if let Some(img) = image {
            if !img.grid.same_as(&labels.grid, 1e-3) {
                return Err(Error::GridMismatch {
                    what: "the label map and its image".into(),
                    a: labels.grid.shape(),
                    b: img.grid.shape(),
                });
            }
            img.check_finite()?;
        }
        if !(spacing > 0.0 && spacing.is_finite()) {
            return Err(Error::Data(format!("randomisation spacing must be positive, got {spacing}")));
        }
        let lab = labels.to_volume().to_canonical();
        let img = image.map(|i| i.to_canonical());
        let src = lab.grid.spacing();
        let from = lab.grid.shape();
        let shape = [0, 1, 2].map(|a| ((from[a] as f64 * src[a] / spacing).round() as usize).max(1));
        if shape.iter().product::<usize>() > 1 << 27 {
            return Err(Error::Data(format!("a label map of {shape:?} voxels at {spacing} mm is too large")));
        }
        // nearest source voxel of each target voxel, per axis
        let index: Vec<Vec<usize>> = (0..3)
            .map(|a| (0..shape[a]).map(|i| (((i as f64 + 0.5) * spacing / src[a]) as usize).min(from[a] - 1)).collect())
            .collect();
        let at = |i: usize, j: usize, k: usize| (index[2][k] * from[1] + index[1][j]) * from[0] + index[0][i];
        let n: usize = shape.iter().product();
        let src_of = |v: usize| at(v % shape[0], (v / shape[0]) % shape[1], v / (shape[0] * shape[1]));
        let raw: Vec<u32> = (0..n).map(|v| lab.data[src_of(v)] as u32).collect();
        let mut ids: Vec<u32> = raw.iter().copied().filter(|&l| l != 0).collect();
        ids.sort_unstable();
        ids.dedup();
        let bg = if img.is_some() { background_classes.max(1) } else { 1 };
        let num_classes = ids.len() + bg;
        if num_classes > u16::MAX as usize {
            return Err(Error::Data(format!("{num_classes} classes are too many to randomise")));
        }
        let mut classes: Vec<u16> =
            raw.iter().map(|&l| if l == 0 { 0 } else { (bg + ids.binary_search(&l).unwrap_or(0)) as u16 }).collect();
        if let Some(img) = &img {
            let values: Vec<f32> = (0..n).filter(|&v| raw[v] == 0).map(|v| img.data[src_of(v)]).collect();
            if !values.is_empty() && bg > 1 {
                let mut sorted = values.clone();
                sorted.sort_by(f32::total_cmp);
                let cuts: Vec<f32> = (1..bg).map(|q| sorted[q * (sorted.len() - 1) / bg]).collect();
                for v in 0..n {
                    if raw[v] == 0 {
                        let x = img.data[src_of(v)];
                        classes[v] = cuts.iter().filter(|&&c| x > c).count() as u16;
                    }
                }
            }
        }
        let foreground: Vec<u32> = (0..n as u32).filter(|&v| raw[v as usize] != 0).collect();
        if foreground.is_empty() {
            return Err(Error::Data("the label map has no labelled voxel".into()));
        }
        Ok(Self { shape, spacing, classes, num_classes, labels: raw, foreground })
    }

    /// The class and label at continuous voxel `p` (nearest; outside: class 0, label 0).
    fn at(&self, p: [f64; 3]) -> (u16, u32) {
        let mut idx = 0;
        for a in (0..3).rev() {
            let i = p[a].round();
            if i < 0.0 || i >= self.shape[a] as f64 {
                return (0, 0);
            }
            idx = idx * self.shape[a] + i as usize;
        }
        (self.classes[idx], self.labels[idx])
    }
}

/// A 3D map in patch voxels: `ψ(j) = c + M (j − c) + e(j)` with `e` trilinear in a control grid.
#[derive(Debug, Clone)]
pub struct PatchMap {
    centre: f64,
    matrix: [[f64; 3]; 3],
    elastic: ControlGrid,
}

impl PatchMap {
    /// `ψ(j)`: the point of patch A that corresponds to voxel `j` of patch B.
    pub fn apply(&self, j: [f64; 3]) -> [f64; 3] {
        let c = self.centre;
        let d = [j[0] - c, j[1] - c, j[2] - c];
        let e = self.elastic.at(j);
        [0, 1, 2].map(|r| c + (0..3).map(|k| self.matrix[r][k] * d[k]).sum::<f64>() + e[r])
    }
}

/// Vectors on a `control³` lattice spanning an `n³` patch, interpolated trilinearly.
#[derive(Debug, Clone)]
struct ControlGrid {
    control: usize,
    /// `control³` vectors, x fastest.
    values: Vec<[f64; 3]>,
    patch: usize,
}

impl ControlGrid {
    /// `control³` normal vectors of standard deviation `sigma`, from `seed`.
    fn random(control: usize, patch: usize, sigma: [f64; 3], seed: u64) -> Self {
        let values = (0..control.pow(3))
            .map(|v| {
                let (a, b) = normal_pair(seed, 2 * v as u64);
                let (c, _) = normal_pair(seed, 2 * v as u64 + 1);
                [a * sigma[0], b * sigma[1], c * sigma[2]]
            })
            .collect();
        Self { control, values, patch }
    }

    fn at(&self, j: [f64; 3]) -> [f64; 3] {
        let m = self.control;
        let scale = (m - 1) as f64 / (self.patch - 1).max(1) as f64;
        let t = j.map(|v| (v * scale).clamp(0.0, (m - 1) as f64));
        let i0 = t.map(|v| (v.floor() as usize).min(m.saturating_sub(2)));
        let f = [0, 1, 2].map(|a| t[a] - i0[a] as f64);
        let mut out = [0.0; 3];
        for corner in 0..8 {
            let o = [corner & 1, (corner >> 1) & 1, (corner >> 2) & 1];
            let w: f64 = (0..3).map(|a| if o[a] == 1 { f[a] } else { 1.0 - f[a] }).product();
            let idx = ((i0[2] + o[2]) * m + i0[1] + o[1]) * m + i0[0] + o[0];
            for (r, v) in out.iter_mut().enumerate() {
                *v += w * self.values[idx][r];
            }
        }
        out
    }
}

/// Two renderings of one anatomy: patch A, and patch B whose voxel `j` shows A's point `ψ(j)`.
#[derive(Debug, Clone)]
pub struct RandomPair {
    /// Patch edge (voxels); both patches are `patch³`, x fastest.
    pub patch: usize,
    /// Patch spacing (mm).
    pub spacing_mm: f64,
    /// Intensities in `[0, 1]`.
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    /// The original labels shown in each patch.
    pub labels_a: Vec<u32>,
    pub labels_b: Vec<u32>,
    pub map: PatchMap,
}

impl RandomPair {
    /// A grid for the patches: RAS-aligned, `spacing_mm`, origin at 0.
    pub fn grid(&self) -> Result<Grid> {
        Grid::from_spacing([self.patch; 3], [self.spacing_mm; 3], [0.0; 3])
    }
}

/// A random pair from `subject` (see the module docs); a function of `seed` only.
pub fn random_pair(subject: &LabelSubject, seed: u64, cfg: &RandomiseConfig) -> RandomPair {
    let mut rng = SplitMix64::new(seed);
    let n = cfg.patch.max(2);
    let spacing_mm = rng.uniform(cfg.spacing_mm[0], cfg.spacing_mm[1].max(cfg.spacing_mm[0]));
    let zoom = spacing_mm / subject.spacing;
    let fg = subject.foreground[(rng.next_u64() % subject.foreground.len() as u64) as usize] as usize;
    let [sx, sy, _] = subject.shape;
    let centre_voxel = [fg % sx, (fg / sx) % sy, fg / (sx * sy)].map(|v| v as f64);
    let c = (n - 1) as f64 / 2.0;
    // patch A voxel -> subject voxel
    let to_subject = |i: [f64; 3]| [0, 1, 2].map(|a| centre_voxel[a] + zoom * (i[a] - c));

    let map = {
        let deg = cfg.rotation_deg.to_radians();
        let angles = [rng.jitter(deg), rng.jitter(deg), rng.jitter(deg)];
        let scales = [rng.jitter(cfg.scaling), rng.jitter(cfg.scaling), rng.jitter(cfg.scaling)].map(|s| 1.0 + s);
        let r = rotation(angles);
        let matrix = [0, 1, 2].map(|i| [0, 1, 2].map(|k| r[i][k] * scales[k]));
        let sigma = rng.uniform(0.0, cfg.elastic);
        let elastic = ControlGrid::random(cfg.elastic_control.max(2), n, [sigma; 3], rng.next_u64());
        PatchMap { centre: c, matrix, elastic }
    };

    let voxels = n * n * n;
    let coord = |v: usize| [(v % n) as f64, ((v / n) % n) as f64, (v / (n * n)) as f64];
    let (cls_a, labels_a): (Vec<u16>, Vec<u32>) =
        (0..voxels).into_par_iter().map(|v| subject.at(to_subject(coord(v)))).unzip();
    let (cls_b, labels_b): (Vec<u16>, Vec<u32>) =
        (0..voxels).into_par_iter().map(|v| subject.at(to_subject(map.apply(coord(v))))).unzip();

    let contrast_a = Contrast::draw(&mut rng, subject.num_classes, cfg);
    let mut contrast_b = Contrast::draw(&mut rng, subject.num_classes, cfg);
    if rng.uniform(0.0, 1.0) < cfg.same_contrast {
        contrast_b.means.clone_from(&contrast_a.means);
        contrast_b.stds.clone_from(&contrast_a.stds);
    }
    let a = contrast_a.render(&cls_a, n, derive(seed, 1));
    let b = contrast_b.render(&cls_b, n, derive(seed, 2));
    RandomPair { patch: n, spacing_mm, a, b, labels_a, labels_b, map }
}

/// `R = Rz · Ry · Rx` for angles `(x, y, z)` in radians.
fn rotation(a: [f64; 3]) -> [[f64; 3]; 3] {
    let (sx, cx) = a[0].sin_cos();
    let (sy, cy) = a[1].sin_cos();
    let (sz, cz) = a[2].sin_cos();
    let rx = [[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]];
    let ry = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]];
    let rz = [[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]];
    let mul = |p: [[f64; 3]; 3], q: [[f64; 3]; 3]| {
        [0, 1, 2].map(|i| [0, 1, 2].map(|k| (0..3).map(|j| p[i][j] * q[j][k]).sum::<f64>()))
    };
    mul(rz, mul(ry, rx))
}

/// One random contrast.
#[derive(Debug, Clone)]
struct Contrast {
    means: Vec<f64>,
    stds: Vec<f64>,
    blur: f64,
    bias: f64,
    noise: f64,
    gamma: f64,
}

impl Contrast {
    fn draw(rng: &mut SplitMix64, classes: usize, cfg: &RandomiseConfig) -> Self {
        let means = (0..classes).map(|_| rng.uniform(0.0, 1.0)).collect();
        let stds = (0..classes).map(|_| rng.uniform(0.0, cfg.class_noise)).collect();
        let blur = rng.uniform(0.0, cfg.blur);
        let bias = rng.uniform(0.0, cfg.bias);
        let noise = rng.uniform(0.0, 0.03);
        let gamma = (cfg.gamma * normal_pair(rng.next_u64(), 0).0).exp();
        Self { means, stds, blur, bias, noise, gamma }
    }

    /// The patch of classes `cls` (`n³`) in this contrast, mapped onto `[0, 1]`.
    fn render(&self, cls: &[u16], n: usize, seed: u64) -> Vec<f32> {
        let mut x: Vec<f64> = cls
            .par_iter()
            .enumerate()
            .map(|(v, &c)| self.means[c as usize] + self.stds[c as usize] * normal_pair(seed, v as u64).0)
            .collect();
        if self.blur > 0.05 {
            blur(&mut x, n, self.blur);
        }
        // a smooth multiplicative bias: the log of its first component on a 4³ lattice
        let field = ControlGrid::random(4, n, [self.bias, 0.0, 0.0], derive(seed, 7));
        let noise_seed = derive(seed, 11);
        x.par_iter_mut().enumerate().for_each(|(v, val)| {
            let p = [(v % n) as f64, ((v / n) % n) as f64, (v / (n * n)) as f64];
            *val = *val * field.at(p)[0].exp() + self.noise * normal_pair(noise_seed, v as u64).0;
        });
        let data: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        crate::features::robust_unit(&data).into_iter().map(|v| v.powf(self.gamma as f32)).collect()
    }
}

/// Separable Gaussian blur of an `n³` volume (x fastest), clamped ends.
fn blur(x: &mut [f64], n: usize, sigma: f64) {
    let r = (3.0 * sigma).ceil() as isize;
    let w: Vec<f64> = (-r..=r).map(|d| (-(d * d) as f64 / (2.0 * sigma * sigma)).exp()).collect();
    let sum: f64 = w.iter().sum();
    let w: Vec<f64> = w.iter().map(|v| v / sum).collect();
    for axis in 0..3 {
        let stride = [1, n, n * n][axis];
        let src = x.to_vec();
        x.par_iter_mut().enumerate().for_each(|(v, out)| {
            let i = ((v / stride) % n) as isize;
            *out = w
                .iter()
                .enumerate()
                .map(|(t, wt)| {
                    let k = (i + t as isize - r).clamp(0, n as isize - 1);
                    wt * src[(v as isize + (k - i) * stride as isize) as usize]
                })
                .sum();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 30 × 28 × 26 map of nested boxes at 2 × 2 × 3 mm with an image whose background has
    /// two intensities.
    fn subject() -> (Labels, Volume) {
        let grid = Grid::from_spacing([30, 28, 26], [2.0, 2.0, 3.0], [5.0, -3.0, 1.0]).unwrap();
        let mut labels = Vec::new();
        let mut image = Vec::new();
        for k in 0..26 {
            for j in 0..28 {
                for i in 0..30 {
                    let inner = (8..22).contains(&i) && (8..20).contains(&j) && (6..20).contains(&k);
                    let core = (12..18).contains(&i) && (12..16).contains(&j) && (10..16).contains(&k);
                    labels.push(if core {
                        7
                    } else if inner {
                        3
                    } else {
                        0
                    });
                    image.push(if i < 15 { -1000.0 } else { 40.0 });
                }
            }
        }
        (Labels::new(grid.clone(), labels).unwrap(), Volume::new(grid, 1, image).unwrap())
    }

    #[test]
    fn subjects_get_classes_for_labels_and_background_intensities() {
        let (l, img) = subject();
        let s = LabelSubject::new(&l, Some(&img), 2.0, 2).unwrap();
        assert_eq!(s.shape, [30, 28, 39]);
        assert_eq!(s.num_classes, 4);
        let mut seen: Vec<u16> = s.classes.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, vec![0, 1, 2, 3]);
        let plain = LabelSubject::new(&l, None, 2.0, 2).unwrap();
        assert_eq!(plain.num_classes, 3);
        assert!(LabelSubject::new(&Labels::new(l.grid.clone(), vec![0; l.data.len()]).unwrap(), None, 2.0, 1).is_err());
    }

    #[test]
    fn pairs_are_seeded_and_b_shows_a_through_the_map() {
        let (l, img) = subject();
        let s = LabelSubject::new(&l, Some(&img), 2.0, 2).unwrap();
        let cfg = RandomiseConfig { patch: 24, ..Default::default() };
        let p = random_pair(&s, 5, &cfg);
        let q = random_pair(&s, 5, &cfg);
        assert_eq!(p.a, q.a);
        assert_eq!(p.b, q.b);
        assert_ne!(random_pair(&s, 6, &cfg).a, p.a);
        assert!(p.a.iter().chain(&p.b).all(|v| (0.0..=1.0).contains(v)));
        // labels of B at j equal labels of A at ψ(j) wherever ψ(j) lands on a voxel centre's
        // neighbourhood far from a boundary: count agreement at the rounded point
        let n = p.patch;
        let (mut agree, mut total) = (0, 0);
        for v in (0..n * n * n).step_by(7) {
            let j = [(v % n) as f64, ((v / n) % n) as f64, (v / (n * n)) as f64];
            let i = p.map.apply(j).map(|x| x.round());
            if i.iter().all(|&x| x >= 0.0 && x < n as f64) {
                let w = (i[2] as usize * n + i[1] as usize) * n + i[0] as usize;
                total += 1;
                agree += usize::from(p.labels_a[w] == p.labels_b[v]);
            }
        }
        assert!(total > 100 && agree as f64 > 0.9 * total as f64, "{agree} of {total}");
    }
}
