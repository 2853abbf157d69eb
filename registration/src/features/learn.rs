//! Learning OBELISK registration features from domain-randomised pairs.
//!
//! The objective is the one registration needs, not segmentation: for a point `j` of patch B and
//! its true correspondence `ψ(j)` in patch A (see [`crate::synth::randomise`]), the L1 feature
//! difference must be smaller at `ψ(j)` than at points displaced from it by 1 to 4 voxels along
//! each axis. A softmax over the negated differences of these candidates, trained towards the
//! true one (InfoNCE with spatial negatives), shapes exactly the cost that the discrete search
//! and the gradient-based levels minimise. The two patches have independent random contrasts
//! (often), so the features must describe anatomy, not intensity.
//!
//! Batch norm (`bn2`, no affine) keeps every channel at unit variance over the batch, so the
//! features cannot collapse to a constant; the spatial negatives keep them from varying too
//! slowly.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use segmentation::{Architecture, InputNorm, Model, ModelConfig, Network, ObeliskFeatureLayer, ObeliskNetConfig};

use crate::synth::randomise::{random_pair, LabelSubject, RandomPair, RandomiseConfig};
use crate::synth::rng::{derive, SplitMix64};
use crate::{Error, Result};

/// Options of [`train_features`].
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureTraining {
    pub arch: ObeliskNetConfig,
    pub randomise: RandomiseConfig,
    pub iterations: usize,
    /// Points of patch B per iteration.
    pub points: usize,
    pub lr: f64,
    /// Softmax temperature on the mean absolute feature difference.
    pub temperature: f64,
    pub seed: u64,
}

/// The reference kernel scale (mm per normalised offset unit): half the extent of a default
/// training patch (40 voxels) at the middle of its spacing range.
pub const OFFSET_UNIT_MM: f64 = 50.0;

impl Default for FeatureTraining {
    fn default() -> Self {
        Self {
            arch: ObeliskNetConfig {
                in_channels: 1,
                num_classes: 2,
                kernels: 128,
                groups: 4,
                hidden: 64,
                mid: 16,
                growth: 8,
                dense_layers: 1,
                pool_kernel: [3, 3, 3],
                grid_divisor: 2,
                // about 7 mm: kernels start local and learn their reach
                offset_std: 0.15,
                feature_layer: ObeliskFeatureLayer::Mid,
                binary: true,
                offset_unit_mm: Some(OFFSET_UNIT_MM),
                self_similarity: true,
            },
            randomise: RandomiseConfig::default(),
            iterations: 2000,
            points: 512,
            lr: 2e-3,
            temperature: 0.1,
            seed: 0,
        }
    }
}

/// Candidate displacements (patch voxels) around the true correspondence; the first is zero.
fn candidates() -> Vec<[f64; 3]> {
    let mut v = vec![[0.0; 3]];
    for r in [1.0, 2.0, 4.0] {
        for a in 0..3 {
            for s in [-1.0, 1.0] {
                let mut d = [0.0; 3];
                d[a] = s * r;
                v.push(d);
            }
        }
    }
    v
}

/// Where one iteration samples: points of B and their candidates in A, normalised `(x, y, z)`.
struct Sample {
    b: Tensor,
    a: Tensor,
    points: usize,
}

/// Fraction of the training points drawn near label boundaries of B.
const EDGE_FRACTION: f64 = 0.75;

/// Voxels of an `n³` label patch with another label two voxels away along some axis.
fn edge_voxels(labels: &[u32], n: usize) -> Vec<usize> {
    let strides = [1, n, n * n];
    (0..labels.len())
        .filter(|&v| {
            let p = [v % n, (v / n) % n, v / (n * n)];
            (0..3).any(|a| {
                (p[a] >= 2 && labels[v - 2 * strides[a]] != labels[v])
                    || (p[a] + 2 < n && labels[v + 2 * strides[a]] != labels[v])
            })
        })
        .collect()
}

/// Up to `count` points of B (away from the edges) whose correspondences and candidates lie in A.
fn sample_points(pair: &RandomPair, count: usize, seed: u64, device: &Device) -> Result<Option<Sample>> {
    let n = pair.patch as f64;
    let cands = candidates();
    let margin = 1.0;
    let inside = |p: [f64; 3]| p.iter().all(|&x| x >= margin && x <= n - 1.0 - margin);
    let norm = |p: [f64; 3]| p.map(|x| (2.0 * x / (n - 1.0) - 1.0) as f32);
    let mut rng = SplitMix64::new(seed);
    let edges = edge_voxels(&pair.labels_b, pair.patch);
    let (mut b, mut a) = (Vec::with_capacity(count * 3), Vec::with_capacity(count * cands.len() * 3));
    let mut found = 0;
    for _ in 0..count * 4 {
        if found == count {
            break;
        }
        // most points near a boundary: inside a uniform region no feature can tell where it is
        let j = if !edges.is_empty() && rng.uniform(0.0, 1.0) < EDGE_FRACTION {
            let v = edges[(rng.next_u64() % edges.len() as u64) as usize];
            let p = [v % pair.patch, (v / pair.patch) % pair.patch, v / (pair.patch * pair.patch)];
            p.map(|x| (x as f64 + rng.jitter(0.5)).clamp(margin, n - 1.0 - margin))
        } else {
            [0, 1, 2].map(|_| rng.uniform(margin, n - 1.0 - margin))
        };
        let i = pair.map.apply(j);
        let all: Vec<[f64; 3]> = cands.iter().map(|d| [i[0] + d[0], i[1] + d[1], i[2] + d[2]]).collect();
        if !all.iter().all(|&p| inside(p)) {
            continue;
        }
        b.extend(norm(j));
        all.into_iter().for_each(|p| a.extend(norm(p)));
        found += 1;
    }
    if found < count / 4 {
        return Ok(None);
    }
    Ok(Some(Sample {
        b: Tensor::from_vec(b, (1, found, 3), device)?,
        a: Tensor::from_vec(a, (1, found * cands.len(), 3), device)?,
        points: found,
    }))
}

/// Progress of [`train_features`] after an iteration.
#[derive(Debug, Clone, Copy)]
pub struct FeatureProgress {
    pub iteration: usize,
    pub loss: f64,
    /// Fraction of points whose true correspondence had the smallest difference.
    pub accuracy: f64,
}

/// Trains a feature model on pairs drawn from `subjects` in turn; deterministic in `cfg.seed`.
pub fn train_features(
    subjects: &[LabelSubject],
    cfg: &FeatureTraining,
    progress: &mut dyn FnMut(&FeatureProgress),
) -> Result<Model> {
    if subjects.is_empty() {
        return Err(Error::Data("feature training needs at least one label map".into()));
    }
    let device = Device::Cpu;
    let norm = InputNorm { scale: 1.0, offset: 0.0, robust: true };
    let config = ModelConfig::new(Architecture::ObeliskNet(cfg.arch.clone()), norm, vec![]);
    let model = Model::new(config, cfg.seed, &device).map_err(|e| Error::Registration(e.to_string()))?;
    let Network::Obelisk(net) = &model.net else { unreachable!("an OBELISK-Net config builds an OBELISK-Net") };
    let params = ParamsAdamW { lr: cfg.lr, weight_decay: 0.0, ..Default::default() };
    let mut opt = AdamW::new(segmentation::nn::trainable_vars(&model.varmap), params)?;
    let k = candidates().len();
    for it in 0..cfg.iterations {
        // a step down for the last fifth
        opt.set_learning_rate(if it * 5 >= cfg.iterations * 4 { cfg.lr * 0.2 } else { cfg.lr });
        let subject = &subjects[it % subjects.len()];
        let pair = random_pair(subject, derive(cfg.seed, 2 * it as u64), &cfg.randomise);
        let Some(s) = sample_points(&pair, cfg.points, derive(cfg.seed, 2 * it as u64 + 1), &device)? else {
            continue;
        };
        let n = pair.patch;
        let volume = |v: &[f32]| Tensor::from_slice(v, (1, 1, n, n, n), &device);
        let scale = cfg.arch.offset_scale([n; 3], [pair.spacing_mm; 3]).unwrap_or([1.0; 3]);
        let scaled = net.with_offset_scale(scale)?;
        let hb = scaled.sample_points(&net.smooth(&volume(&pair.b)?)?, &s.b, None)?;
        let ha = scaled.sample_points(&net.smooth(&volume(&pair.a)?)?, &s.a, None)?;
        let f = net.features_from_samples_t(&Tensor::cat(&[&hb, &ha], 2)?, true)?;
        let c = f.dim(1)?;
        let fb = f.narrow(2, 0, s.points)?.unsqueeze(3)?;
        let fa = f.narrow(2, s.points, s.points * k)?.reshape((1, c, s.points, k))?;
        // (1, points, k) mean absolute differences
        let diff = fa.broadcast_sub(&fb)?.abs()?.mean(1)?;
        let logp = candle_nn::ops::log_softmax(&diff.affine(-1.0 / cfg.temperature, 0.0)?, D::Minus1)?;
        let loss = logp.narrow(2, 0, 1)?.mean_all()?.neg()?;
        opt.backward_step(&loss)?;
        let best = diff.argmin(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
        let accuracy = best.iter().filter(|&&b| b == 0).count() as f64 / best.len().max(1) as f64;
        let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss.is_finite() {
            return Err(Error::Registration(format!("feature training diverged at iteration {it}")));
        }
        progress(&FeatureProgress { iteration: it, loss, accuracy });
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Grid, Labels};

    fn subject() -> LabelSubject {
        let grid = Grid::from_spacing([32, 32, 32], [2.0; 3], [0.0; 3]).unwrap();
        let data = (0..32 * 32 * 32)
            .map(|v: usize| {
                let (i, j, k) = (v % 32, (v / 32) % 32, v / 1024);
                // blocks of varied sizes: a structure to describe at every point
                (((i / 5) * 7 + (j / 4) * 3 + (k / 6) * 5) % 9) as u32
            })
            .collect();
        LabelSubject::new(&Labels::new(grid, data).unwrap(), None, 2.0, 1).unwrap()
    }

    fn small() -> FeatureTraining {
        let mut cfg = FeatureTraining { iterations: 30, points: 64, ..Default::default() };
        cfg.arch.kernels = 16;
        cfg.arch.hidden = 16;
        cfg.arch.mid = 8;
        cfg.randomise.patch = 20;
        cfg
    }

    /// The plumbing of correspondences: when B is A (no map, same contrast, only its own noise),
    /// even untrained features are closest at the true point.
    #[test]
    fn untrained_features_find_the_correspondence_of_an_identical_pair() {
        let mut cfg = small();
        cfg.iterations = 3;
        cfg.randomise = RandomiseConfig {
            patch: 20,
            rotation_deg: 0.0,
            scaling: 0.0,
            elastic: 0.0,
            same_contrast: 1.0,
            ..Default::default()
        };
        let mut log = Vec::new();
        train_features(&[subject()], &cfg, &mut |p| log.push(*p)).unwrap();
        // chance is 1/19 and a loss of ln 19 = 2.94; the noise of the renderings blurs ±1 voxel
        let chance = 1.0 / candidates().len() as f64;
        assert!(log[0].accuracy > 3.0 * chance && log[0].loss < 0.8 * (1.0 / chance).ln(), "{:?}", log[0]);
    }

    #[test]
    fn training_is_seeded_and_learns_to_find_correspondences() {
        let s = vec![subject()];
        let mut log = Vec::new();
        let a = train_features(&s, &small(), &mut |p| log.push(*p)).unwrap();
        let b = train_features(&s, &small(), &mut |_| {}).unwrap();
        assert_eq!(a.weights_to_bytes().unwrap(), b.weights_to_bytes().unwrap());
        let first: f64 = log[..5].iter().map(|p| p.loss).sum::<f64>() / 5.0;
        let last: f64 = log[log.len() - 5..].iter().map(|p| p.loss).sum::<f64>() / 5.0;
        assert!(last < first, "loss {first} -> {last}");
        assert!(a.config.input_norm.robust);
    }
}
