//! Initial placement of the moving image by an exhaustive translation search.
//!
//! Headers of scans from different sources need not place them anywhere near each other, and a
//! thin slab (say 20 slices) has a centre of mass far from the atlas anatomy it shows, so neither
//! "trust the headers" nor "align the centres of mass" gives the optimiser a start it can
//! converge from. [`search_translation`] instead tries every translation `t` (fixed LPS `x` ↦
//! moving `x + t`) over the whole range in which the two fields of view overlap, and scores each
//! by the mean L1 feature difference over the overlap only:
//!
//! 1. Both feature maps are area-downsampled to about [`SearchConfig::coarse_mm`] per voxel, per
//!    axis by that axis' spacing, but never below [`SearchConfig::min_slices`] voxels, so that a
//!    thin slab keeps a few slices.
//! 2. Translations on a lattice of [`SearchConfig::step_voxels`] coarse voxels covering, per LPS
//!    axis, `min(moving) − max(fixed) ..= max(moving) − min(fixed)` are scored in parallel.
//!    Translations that overlap less than [`SearchConfig::min_overlap`] of the largest overlap the fields of view can reach are
//!    rejected: the mean over a sliver of overlap is noisy and would often win by chance.
//! 3. The best [`SearchConfig::refine_candidates`] lattice points that are not neighbours of a
//!    better one are refined by a pattern search with halving steps on the coarse maps, and the
//!    best [`SearchConfig::fine_candidates`] of those again on maps at about
//!    [`SearchConfig::fine_mm`]; the best of these wins.
//!
//! Every score is a sequential sum in a fixed order and ties are broken by the candidate's
//! position in the lattice, so the result does not depend on the number of threads.

use candle_core::{Device, Tensor};
use nalgebra::{Matrix3, Vector3};
use rayon::prelude::*;
use segmentation::ops;
use serde::Serialize;

use crate::{Error, Grid, Result, Space, Volume};

/// Options of [`search_translation`]. The defaults suit abdominal CT/MR at 0.7–6 mm.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SearchConfig {
    /// Voxel size (mm) of the global search's feature maps; default 10 mm: coarse enough for the
    /// whole overlap range to be searched in about a second, fine enough to tell organs apart.
    pub coarse_mm: f64,
    /// Voxel size (mm) of the maps the best candidates are finally refined on; default 7 mm:
    /// below that an evaluation over two whole scans gets slow, and the optimiser that follows
    /// needs a start within a few millimetres only.
    pub fine_mm: f64,
    /// Lattice step of the global search in coarse voxels; default 2. The refinement starts at
    /// half this step, so the true optimum only needs to be in a good candidate's basin.
    pub step_voxels: f64,
    /// How many of the best lattice points are refined on the coarse maps; default 5.
    pub refine_candidates: usize,
    /// How many of the best coarse-refined candidates are refined again on the fine maps;
    /// default 2.
    pub fine_candidates: usize,
    /// Smallest overlap, as a fraction of the largest overlap the two fields of view can reach
    /// (at most the smaller image's volume), a translation must give to
    /// be considered; default 0.5.
    pub min_overlap: f64,
    /// Downsampling keeps at least this many voxels along every axis (fewer only where the image
    /// has fewer); default 4.
    pub min_slices: usize,
    /// How a translation is scored over the overlap; default [`SearchScore::L1`].
    pub score: SearchScore,
}

/// The score [`search_translation`] minimises over the overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchScore {
    /// Mean absolute feature difference: for image features.
    L1,
    /// One minus the soft Dice `2 Σ f·m / Σ (f + m)`: for one-hot label maps, where L1 would
    /// reward matching background with background.
    Dice,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            coarse_mm: 10.0,
            fine_mm: 7.0,
            step_voxels: 2.0,
            refine_candidates: 5,
            fine_candidates: 2,
            min_overlap: 0.5,
            min_slices: 4,
            score: SearchScore::L1,
        }
    }
}

/// Outcome of [`search_translation`].
#[derive(Debug, Clone, Serialize)]
pub struct SearchResult {
    /// The best translation (LPS mm): fixed `x` corresponds to moving `x + t`.
    pub translation_mm: [f64; 3],
    /// Its mean L1 feature difference over the overlap, on the refinement maps.
    pub score: f64,
    /// Its overlap as a fraction of the largest reachable overlap.
    pub overlap_fraction: f64,
    /// Every candidate refined on the coarse maps, `(translation, coarse score)`, best first.
    pub candidates: Vec<([f64; 3], f64)>,
    /// Number of translations scored, both stages together.
    pub evaluations: usize,
}

/// Fixed axes with at least this many coarse voxels are subsampled by 2 for the lattice.
const LATTICE_SUBSAMPLE_FROM: usize = 16;

/// Feature maps `(C, D, H, W)` on a (downsampled) grid.
#[derive(Clone)]
struct Maps {
    grid: Grid,
    channels: usize,
    data: Vec<f32>,
}

/// Area-downsamples `v` to about `target_mm` per voxel along each axis, keeping at least
/// `min_slices` voxels per axis.
fn downsample(v: &Volume, target_mm: f64, min_slices: usize) -> Result<Maps> {
    let (sp, sh) = (v.grid.spacing(), v.grid.shape());
    let shape = [0, 1, 2].map(|a| {
        let f = ((target_mm / sp[a]).round() as usize).max(1);
        let f = f.min((sh[a] / min_slices.max(1)).max(1));
        sh[a].div_ceil(f)
    });
    if shape == sh {
        return Ok(Maps { grid: v.grid.clone(), channels: v.channels, data: v.data.clone() });
    }
    let (d, h, w) = v.grid.dhw();
    let t = Tensor::from_vec(v.data.clone(), (1, v.channels, d, h, w), &Device::Cpu)?;
    let grid = v.grid.resized(shape);
    let (d2, h2, w2) = grid.dhw();
    let data = ops::resize(&t, [d2, h2, w2])?.flatten_all()?.to_vec1::<f32>()?;
    Ok(Maps { grid, channels: v.channels, data })
}

/// Volume (mm³) of one voxel of `g`.
fn voxel_volume(g: &Grid) -> f64 {
    g.affine().fixed_view::<3, 3>(0, 0).determinant().abs()
}

/// LPS bounding box `(min, max)` of the physical extent of `g` (outer voxel faces).
fn extent_box(g: &Grid) -> ([f64; 3], [f64; 3]) {
    let sh = g.shape();
    let (mut lo, mut hi) = ([f64::INFINITY; 3], [f64::NEG_INFINITY; 3]);
    for c in 0..8 {
        let p = [0, 1, 2].map(|a| if c >> a & 1 == 1 { sh[a] as f64 - 0.5 } else { -0.5 });
        let q = g.map(p, Space::Voxel, Space::Lps);
        for a in 0..3 {
            lo[a] = lo[a].min(q[a]);
            hi[a] = hi[a].max(q[a]);
        }
    }
    (lo, hi)
}

/// One resolution of the search: fixed maps, moving maps and what scoring a translation needs.
struct SearchLevel {
    fixed_grid: Grid,
    moving_grid: Grid,
    channels: usize,
    /// Fixed features `(P, C)` and moving features `(D, H, W, C)`, channels interleaved.
    fixed_vm: Vec<f32>,
    moving_vm: Vec<f32>,
    /// Fixed voxel centres in moving voxel coordinates at `t = 0`.
    points: Vec<[f64; 3]>,
    /// Moving LPS → voxel linear part, to turn `t` into a voxel offset.
    lin: Matrix3<f64>,
    /// Volume one fixed point stands for, over the smaller image's volume.
    point_fraction: f64,
    min_overlap: f64,
    score: SearchScore,
}

impl SearchLevel {
    /// `stride`: every `stride[a]`-th fixed voxel along axis `a` is scored.
    fn new(
        fixed: Maps,
        moving: Maps,
        smaller_volume: f64,
        min_overlap: f64,
        score: SearchScore,
        stride: [usize; 3],
    ) -> Self {
        let m = moving.grid.matrix(Space::Lps, Space::Voxel) * fixed.grid.matrix(Space::Voxel, Space::Lps);
        let [nx, ny, nz] = fixed.grid.shape();
        let kept: Vec<usize> = (0..nz * ny * nx)
            .filter(|&v| v % nx % stride[0] == 0 && (v / nx) % ny % stride[1] == 0 && v / (nx * ny) % stride[2] == 0)
            .collect();
        let points = kept
            .iter()
            .map(|&v| crate::grid::apply(&m, [(v % nx) as f64, ((v / nx) % ny) as f64, (v / (nx * ny)) as f64]))
            .collect();
        let c = fixed.channels;
        let all = interleave(&fixed.data, c);
        let fixed_vm = kept.iter().flat_map(|&v| all[v * c..(v + 1) * c].iter().copied()).collect();
        let lin = moving.grid.matrix(Space::Lps, Space::Voxel).fixed_view::<3, 3>(0, 0).into_owned();
        // a scored point stands for the voxels skipped beside it
        let per_point = fixed.grid.num_voxels() as f64 / kept.len().max(1) as f64;
        let point_fraction = per_point * voxel_volume(&fixed.grid) / smaller_volume;
        Self {
            channels: c,
            fixed_vm,
            moving_vm: interleave(&moving.data, moving.channels),
            fixed_grid: fixed.grid,
            moving_grid: moving.grid,
            points,
            lin,
            point_fraction,
            min_overlap,
            score,
        }
    }

    /// `(score, overlap fraction)` of translation `t`; the score is infinite where the overlap is
    /// too small.
    fn evaluate(&self, t: [f64; 3]) -> (f64, f64) {
        let off = self.lin * Vector3::from(t);
        let [nx, ny, nz] = self.moving_grid.shape();
        let c = self.channels;
        let lim = [nx, ny, nz].map(|n| n as f64 - 0.5);
        let mut warped = vec![0.0f32; c];
        let (mut sum, mut inter, mut count) = (0.0f64, 0.0f64, 0usize);
        for (v, p) in self.points.iter().enumerate() {
            let q = [p[0] + off[0], p[1] + off[1], p[2] + off[2]];
            // inside the moving image's extent, boundary included: lattice translations land
            // exactly on the extent's faces, where [`Grid::contains_voxel`]'s half-open rule
            // (ITK's, for resampling) would drop the outermost samples and move the best start
            if (0..3).any(|a| !(q[a] >= -0.5 && q[a] <= lim[a])) {
                continue;
            }
            trilinear(&self.moving_vm, [nx, ny, nz], c, q, &mut warped);
            let f = &self.fixed_vm[v * c..(v + 1) * c];
            match self.score {
                SearchScore::L1 => sum += f.iter().zip(&warped).map(|(a, b)| (a - b).abs()).sum::<f32>() as f64,
                SearchScore::Dice => {
                    inter += f.iter().zip(&warped).map(|(a, b)| a * b).sum::<f32>() as f64;
                    sum += f.iter().chain(&warped).sum::<f32>() as f64;
                }
            }
            count += 1;
        }
        let overlap = (count as f64 * self.point_fraction).min(1.0);
        if count == 0 || overlap < self.min_overlap {
            return (f64::INFINITY, overlap);
        }
        match self.score {
            SearchScore::L1 => (sum / (count * c) as f64, overlap),
            // nothing to overlap scores as badly as no overlap of what is there
            SearchScore::Dice => (if sum > 0.0 { 1.0 - 2.0 * inter / sum } else { 1.0 }, overlap),
        }
    }
}

/// Channel-interleaved `(D, H, W, C)` copy of channel-major `(C, D, H, W)` data.
fn interleave(data: &[f32], channels: usize) -> Vec<f32> {
    let n = data.len() / channels;
    (0..n * channels).map(|i| data[(i % channels) * n + i / channels]).collect()
}

/// Trilinear interpolation of all channels of voxel-major data at voxel point `q` (border
/// values outside), the same values as `segmentation::ops::sample_point` with linear
/// interpolation and border padding gives per channel. One set of weights serves every channel
/// and a voxel's channels share a cache line, which makes scoring several times faster than
/// sampling channel by channel.
fn trilinear(data: &[f32], shape: [usize; 3], channels: usize, q: [f64; 3], out: &mut [f32]) {
    let taps = [0, 1, 2].map(|a| {
        let x = q[a].clamp(0.0, (shape[a] - 1) as f64);
        let i0 = x.floor() as usize;
        let f = (x - i0 as f64) as f32;
        (i0, (i0 + 1).min(shape[a] - 1), f)
    });
    out.fill(0.0);
    for corner in 0..8 {
        let pick = |a: usize| if corner >> a & 1 == 1 { (taps[a].1, taps[a].2) } else { (taps[a].0, 1.0 - taps[a].2) };
        let ((i, wi), (j, wj), (k, wk)) = (pick(0), pick(1), pick(2));
        let w = wi * wj * wk;
        if w == 0.0 {
            continue;
        }
        let base = ((k * shape[1] + j) * shape[0] + i) * channels;
        for (o, &m) in out.iter_mut().zip(&data[base..base + channels]) {
            *o += w * m;
        }
    }
}

/// Searches the translation that best aligns `moving_feat` to `fixed_feat` over the whole range
/// where their fields of view overlap. See the module documentation.
///
/// Feature volumes may lie on any grids, far apart in the world; they must have the same
/// number of channels. Errs if no translation gives the required overlap.
pub fn search_translation(fixed_feat: &Volume, moving_feat: &Volume, cfg: &SearchConfig) -> Result<SearchResult> {
    crate::method::same_channels(fixed_feat, moving_feat)?;
    let positive = |x: f64| x.is_finite() && x > 0.0;
    let valid = positive(cfg.coarse_mm)
        && positive(cfg.fine_mm)
        && positive(cfg.step_voxels)
        && (0.0..=1.0).contains(&cfg.min_overlap);
    if !valid {
        return Err(Error::Registration(format!("invalid translation search settings: {cfg:?}")));
    }
    let vf = voxel_volume(&fixed_feat.grid) * fixed_feat.grid.num_voxels() as f64;
    let vm = voxel_volume(&moving_feat.grid) * moving_feat.grid.num_voxels() as f64;
    // The largest overlap the two boxes can have at all: a slab 500 mm wide can never lie half
    // inside an abdomen 360 mm wide, so "half the smaller image" would reject every placement.
    let (flo0, fhi0) = extent_box(&fixed_feat.grid);
    let (mlo0, mhi0) = extent_box(&moving_feat.grid);
    let reachable: f64 = (0..3).map(|a| (fhi0[a] - flo0[a]).min(mhi0[a] - mlo0[a]).max(0.0)).product();
    let smaller = vf.min(vm).min(reachable).max(f64::MIN_POSITIVE);
    let min_slices = cfg.min_slices.max(1);

    let (fixed_coarse, moving_coarse) =
        (downsample(fixed_feat, cfg.coarse_mm, min_slices)?, downsample(moving_feat, cfg.coarse_mm, min_slices)?);
    // The lattice only ranks translations 2 coarse voxels apart for the refinement, which scores
    // every voxel: every other voxel along the axes long enough ranks them as well, at an eighth
    // of the cost (the lattice was a third of the search's time).
    let stride = fixed_coarse.grid.shape().map(|n| if n >= LATTICE_SUBSAMPLE_FROM { 2 } else { 1 });
    let lattice_level =
        SearchLevel::new(fixed_coarse.clone(), moving_coarse.clone(), smaller, cfg.min_overlap, cfg.score, stride);
    let coarse = SearchLevel::new(fixed_coarse, moving_coarse, smaller, cfg.min_overlap, cfg.score, [1; 3]);
    let min_sp = |g: &Grid| g.spacing().into_iter().fold(f64::INFINITY, f64::min);
    let step = cfg.step_voxels * min_sp(&coarse.fixed_grid).max(min_sp(&coarse.moving_grid));

    // The lattice, centred on the middle of each axis' range, minus the translations whose
    // bounding boxes already overlap too little (a bound on the true overlap, so none is lost).
    let (flo, fhi) = extent_box(&fixed_feat.grid);
    let (mlo, mhi) = extent_box(&moving_feat.grid);
    let axis = |a: usize| -> Vec<f64> {
        let (lo, hi) = (mlo[a] - fhi[a], mhi[a] - flo[a]);
        let n = ((hi - lo) / (2.0 * step)).ceil() as i64;
        (-n..=n).map(|i| 0.5 * (lo + hi) + i as f64 * step).collect()
    };
    let (ax, ay, az) = (&axis(0), &axis(1), &axis(2));
    let box_overlap = |t: [f64; 3]| -> f64 {
        (0..3).map(|a| (fhi[a].min(mhi[a] - t[a]) - flo[a].max(mlo[a] - t[a])).max(0.0)).product()
    };
    let lattice: Vec<[f64; 3]> = az
        .iter()
        .flat_map(|&z| ay.iter().flat_map(move |&y| ax.iter().map(move |&x| [x, y, z])))
        .filter(|&t| box_overlap(t) >= cfg.min_overlap * smaller)
        .collect();
    let scores: Vec<f64> = lattice.par_iter().map(|&t| lattice_level.evaluate(t).0).collect();
    drop(lattice_level);
    let mut order: Vec<usize> = (0..lattice.len()).filter(|&i| scores[i].is_finite()).collect();
    if order.is_empty() {
        return Err(Error::NoOverlap(format!(
            "no translation overlaps {:.0}% of the smaller image; the fields of view cannot be aligned by the search",
            100.0 * cfg.min_overlap
        )));
    }
    order.sort_by(|&i, &j| scores[i].total_cmp(&scores[j]).then(i.cmp(&j)));
    // Neighbours of a good lattice point are usually next best and lie in its basin: refining
    // them too would spend the candidates on one basin.
    let mut starts: Vec<[f64; 3]> = Vec::new();
    for &i in &order {
        if starts.len() >= cfg.refine_candidates.max(1) {
            break;
        }
        let t = lattice[i];
        if starts.iter().all(|s| (0..3).any(|a| (s[a] - t[a]).abs() > 1.5 * step)) {
            starts.push(t);
        }
    }
    let mut evaluations = lattice.len();

    // Stage 2 on the coarse maps, where an evaluation is cheap: every start down to half a
    // coarse voxel, where the fine stage takes over (a quarter voxel more cost a third of the
    // search and moved no start by more than the fine stage corrects).
    let coarse_voxel = min_sp(&coarse.fixed_grid).min(min_sp(&coarse.moving_grid));
    let mut refined: Vec<([f64; 3], f64, f64)> = Vec::new();
    for &t in &starts {
        let (t, sc, ov, n) = refine(&coarse, t, 0.5 * step, 0.5 * coarse_voxel);
        evaluations += n;
        refined.push((t, sc, ov));
    }
    drop(coarse);
    // stable sort: equal scores keep the lattice ranking
    refined.sort_by(|a, b| a.1.total_cmp(&b.1));
    // several starts may climb to the same optimum: keep it once
    let mut unique: Vec<([f64; 3], f64, f64)> = Vec::new();
    for r in refined {
        if unique.iter().all(|u| (0..3).any(|a| (u.0[a] - r.0[a]).abs() > 1e-6)) {
            unique.push(r);
        }
    }
    if !unique[0].1.is_finite() {
        return Err(Error::NoOverlap("every refined translation lost the required overlap".into()));
    }

    // Stage 3 on the fine maps, for the best few only: a fine evaluation costs as much as
    // (coarse / fine)³ coarse ones, which for two whole scans is most of the search's time.
    // The fixed points are subsampled as for the lattice: the moving maps stay fine, so each
    // score still sees 7 mm detail, and the step (5 mm) is what limits the precision.
    let fixed_fine = downsample(fixed_feat, cfg.fine_mm, min_slices)?;
    let stride = fixed_fine.grid.shape().map(|n| if n >= LATTICE_SUBSAMPLE_FROM { 2 } else { 1 });
    let fine = SearchLevel::new(
        fixed_fine,
        downsample(moving_feat, cfg.fine_mm, min_slices)?,
        smaller,
        cfg.min_overlap,
        cfg.score,
        stride,
    );
    // stop at half a fine voxel: the optimiser that follows resolves the rest
    let smallest = 0.5 * min_sp(&fine.fixed_grid).min(min_sp(&fine.moving_grid));
    let mut best: Option<([f64; 3], f64, f64)> = None;
    for r in unique.iter().filter(|r| r.1.is_finite()).take(cfg.fine_candidates.max(1)) {
        let (t, sc, ov, n) = refine(&fine, r.0, 0.5 * coarse_voxel, smallest);
        evaluations += n;
        if best.is_none_or(|b| sc < b.1) {
            best = Some((t, sc, ov));
        }
    }
    let (translation_mm, score, overlap_fraction) = best.expect("the first candidate has a finite score");
    if !score.is_finite() {
        return Err(Error::NoOverlap("every refined translation lost the required overlap".into()));
    }
    Ok(SearchResult {
        translation_mm,
        score,
        overlap_fraction,
        candidates: unique.iter().map(|r| (r.0, r.1)).collect(),
        evaluations,
    })
}

/// Pattern search from `t`: move to the best of the 26 neighbours at distance `step` while that
/// improves, then halve the step, down to `smallest`. Returns `(t, score, overlap, evaluations)`.
fn refine(level: &SearchLevel, t: [f64; 3], step: f64, smallest: f64) -> ([f64; 3], f64, f64, usize) {
    /// Bound on moves per step size: a start in the right basin needs one or two.
    const MAX_MOVES: usize = 4;
    let (mut best, (mut score, mut overlap)) = (t, level.evaluate(t));
    let mut evaluations = 1;
    let mut s = step;
    while s >= smallest {
        for _ in 0..MAX_MOVES {
            let neighbours: Vec<[f64; 3]> = (0..27)
                .filter(|&n| n != 13)
                .map(|n| [n % 3, (n / 3) % 3, n / 9].map(|d| d as f64 - 1.0))
                .map(|d| [0, 1, 2].map(|a| best[a] + d[a] * s))
                .collect();
            let scored: Vec<(f64, f64)> = neighbours.par_iter().map(|&q| level.evaluate(q)).collect();
            evaluations += neighbours.len();
            // first strictly best in a fixed order: independent of the thread count
            let mut pick = None;
            for (i, &(sc, ov)) in scored.iter().enumerate() {
                if sc < score {
                    (score, overlap, pick) = (sc, ov, Some(i));
                }
            }
            match pick {
                Some(i) => best = neighbours[i],
                None => break,
            }
        }
        s *= 0.5;
    }
    (best, score, overlap, evaluations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{FeatureExtractor, MindConfig, MindSsc};
    use crate::synth::{self, rng::SplitMix64, SynthConfig};
    use std::time::Instant;

    const SPACING: f64 = 6.0;

    /// A whole synthetic subject (48³ voxels of 6 mm).
    fn subject() -> (SynthConfig, Volume) {
        let cfg = SynthConfig { size: [48, 48, 48], spacing: [SPACING; 3], ..Default::default() };
        let (whole, _) = synth::render(&cfg.phantom(0), &cfg.grid().unwrap());
        (cfg, whole)
    }

    /// A 10-slice slab of the subject at a random height whose header is shifted by
    /// `shift_lps`, with noise independent of the whole subject's (rendered on its own grid).
    fn slab(cfg: &SynthConfig, seed: u64, shift_lps: [f64; 3]) -> Volume {
        slab_with_labels(cfg, seed, shift_lps).0
    }

    /// [`slab`] and its label map (on the same moved grid).
    fn slab_with_labels(cfg: &SynthConfig, seed: u64, shift_lps: [f64; 3]) -> (Volume, crate::Labels) {
        let grid = cfg.grid().unwrap();
        let phantom = cfg.phantom(0);
        let z0 = 5 + (SplitMix64::new(seed).next_u64() % 30) as usize;
        let o = grid.origin_ras();
        let at = |shift_ras: [f64; 3]| {
            let origin = [o[0] + shift_ras[0], o[1] + shift_ras[1], o[2] + z0 as f64 * SPACING + shift_ras[2]];
            Grid::from_spacing([48, 48, 10], [SPACING; 3], origin).unwrap()
        };
        let (slab, labels) = synth::render(&phantom, &at([0.0; 3]));
        let moved = at([-shift_lps[0], -shift_lps[1], shift_lps[2]]);
        (Volume::new(moved.clone(), 1, slab.data).unwrap(), crate::Labels::new(moved, labels.data).unwrap())
    }

    fn mind(v: &Volume) -> Volume {
        MindSsc::new(MindConfig::default()).extract(v).unwrap()
    }

    fn assert_near(found: [f64; 3], truth: [f64; 3], what: &str) {
        let err = (0..3).map(|a| (found[a] - truth[a]).abs()).fold(0.0, f64::max);
        assert!(err <= SPACING, "{what}: found {found:?}, truth {truth:?} (error {err:.1} mm)");
    }

    /// The acceptance test: a slab with a header far off is found within one voxel,
    /// as fixed and as moving image.
    #[test]
    fn finds_a_thin_slab_with_an_unrelated_header() {
        let shift = [150.0, 0.0, -300.0];
        let (cfg, whole) = subject();
        let wf = mind(&whole);
        for seed in [1, 2] {
            let sf = mind(&slab(&cfg, seed, shift));
            let search = SearchConfig::default();
            let t0 = Instant::now();
            // slab fixed: slab point x shows the anatomy at x − shift in the whole subject
            let r = search_translation(&sf, &wf, &search).unwrap();
            eprintln!("seed {seed} slab→whole {:?} in {:.2} s", r, t0.elapsed().as_secs_f64());
            assert_near(r.translation_mm, shift.map(|s| -s), "slab fixed");
            assert!(r.overlap_fraction > 0.9, "{r:?}");
            let t0 = Instant::now();
            let r = search_translation(&wf, &sf, &search).unwrap();
            eprintln!("seed {seed} whole→slab {:?} in {:.2} s", r, t0.elapsed().as_secs_f64());
            assert_near(r.translation_mm, shift, "slab moving");
            assert!(r.overlap_fraction > 0.9, "{r:?}");
        }
    }

    /// Label maps scored by soft Dice: the slab's structures are found in the whole subject,
    /// also with the whole subject as the fixed image, where most of the overlap is background in
    /// both maps (which L1 would reward wherever the slab lands outside the organs).
    #[test]
    fn dice_score_places_a_slab_of_labels() {
        let shift = [150.0, 0.0, -300.0];
        let (cfg, _) = subject();
        let (_, whole) = synth::render(&cfg.phantom(0), &cfg.grid().unwrap());
        let (_, slab_labels) = slab_with_labels(&cfg, 3, shift);
        let ids = whole.shared_ids(&slab_labels);
        let search = SearchConfig { score: SearchScore::Dice, ..Default::default() };
        let r = search_translation(&whole.one_hot(&ids), &slab_labels.one_hot(&ids), &search).unwrap();
        assert_near(r.translation_mm, shift, "labels, slab moving");
        assert!(r.score < 0.2, "{r:?}");
    }

    #[test]
    fn trilinear_matches_the_sampler() {
        use segmentation::ops::{sample_point, Dims, Interpolation, Padding};
        let (shape, c) = ([5, 4, 3], 3);
        let mut r = SplitMix64::new(7);
        let data: Vec<f32> = (0..60 * c).map(|_| r.uniform(-1.0, 1.0) as f32).collect();
        let vm = interleave(&data, c);
        let dims = Dims { d: 3, h: 4, w: 5 };
        let mut out = vec![0.0; c];
        for q in [[0.0, 0.0, 0.0], [3.3, 2.7, 1.2], [-0.4, 3.4, 2.49], [4.0, 0.5, 0.0], [1.9, 1.1, 1.8]] {
            trilinear(&vm, shape, c, q, &mut out);
            for (ch, &o) in out.iter().enumerate() {
                let p = q.map(|x| x as f32);
                let e = sample_point(&data[ch * 60..(ch + 1) * 60], dims, p, Interpolation::Linear, Padding::Border);
                assert!((o - e).abs() < 1e-5, "{q:?} channel {ch}: {o} vs {e}");
            }
        }
    }

    #[test]
    fn overlap_requirement_and_bad_input() {
        // an x-thin and a z-thin slab overlap at most 10·48·10 voxels, 21% of either: the
        // requirement is relative to that reachable overlap, so such pairs are still searched
        let g = |shape: [usize; 3]| Grid::from_spacing(shape, [SPACING; 3], [0.0; 3]).unwrap();
        let noise = |grid: Grid, seed: u64| {
            let mut r = SplitMix64::new(seed);
            let data = (0..grid.num_voxels()).map(|_| r.uniform(0.0, 1.0) as f32).collect();
            Volume::new(grid, 1, data).unwrap()
        };
        let (a, b) = (noise(g([10, 48, 48]), 1), noise(g([48, 48, 10]), 2));
        let cfg = SearchConfig::default();
        let r = search_translation(&a, &b, &cfg).unwrap();
        assert!(r.overlap_fraction >= 0.5 && r.overlap_fraction <= 1.0 + 1e-9, "{r:?}");
        // the same answer on one thread
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let one = pool.install(|| search_translation(&a, &b, &cfg)).unwrap();
        assert_eq!((one.translation_mm, one.score, one.candidates), (r.translation_mm, r.score, r.candidates));
        let two = Volume::new(b.grid.clone(), 2, [b.data.clone(), b.data.clone()].concat()).unwrap();
        let mismatch = search_translation(&a, &two, &cfg);
        assert!(matches!(mismatch, Err(Error::ChannelMismatch { fixed: 1, moving: 2, .. })), "{mismatch:?}");
        let bad = SearchConfig { step_voxels: 0.0, ..Default::default() };
        assert!(matches!(search_translation(&a, &b, &bad), Err(Error::Registration(_))));
    }
}
