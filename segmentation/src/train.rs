//! Training and evaluation on in-memory tensors (no file I/O).
//!
//! OBELISK-Net trains on points at random continuous coordinates across images (labels by nearest
//! neighbour) with per-point affine warps of its kernel; the U-Net on random patches; the hybrid
//! OBELISK-Net on whole volumes (its offsets are in units of the volume's extent, so a patch
//! would change what they mean). All use
//! class-weighted cross-entropy over the hardest fraction of points/voxels (OHEM) and Adam with
//! exponential learning-rate decay.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::model::{Model, Network};
use crate::nn::{trainable_vars, Rng};
use crate::obelisk::random_affines;
use crate::{Error, Result};

/// Training options; the defaults follow the MIDL/journal recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub lr: f64,
    /// Learning rate multiplier applied every `decay_every` iterations.
    pub lr_decay: f64,
    /// Iterations between decays; 0 means once per epoch.
    pub decay_every: usize,
    /// Decoupled (AdamW) weight decay; at 1e-5 it is practically the reference's L2 term.
    pub weight_decay: f64,
    /// Fraction of points/voxels, hardest by cross-entropy, that enter the loss.
    pub ohem_fraction: f64,
    /// Class weight of the background (label 0); the others are sqrt(1/frequency), mean 1.
    pub background_weight: f64,
    /// Images per iteration.
    pub batch_size: usize,
    /// Random points per image and iteration (OBELISK-Net).
    pub points_per_image: usize,
    /// Patch size `(d, h, w)` (U-Net); clipped to the smallest training image.
    pub patch_size: [usize; 3],
    /// Std of the per-point kernel warp `A = I + N(0, σ²)` (OBELISK-Net); 0 disables it.
    pub affine_sigma: f64,
    pub epochs: usize,
    pub iters_per_epoch: usize,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 0.002,
            lr_decay: 0.99,
            decay_every: 0,
            weight_decay: 1e-5,
            ohem_fraction: 0.25,
            background_weight: 0.5,
            batch_size: 3,
            points_per_image: 256,
            patch_size: [48; 3],
            affine_sigma: 0.2,
            epochs: 50,
            iters_per_epoch: 192,
            seed: 0,
        }
    }
}

/// Reported to the progress callback after every iteration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// 1-based.
    pub iteration: usize,
    pub total: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    /// Training points (OBELISK-Net) or voxels (U-Net) per second in this iteration.
    pub samples_per_sec: f64,
}

/// One training image: normalised (and for OBELISK-Net pre-smoothed) input, labels.
struct Prepared {
    input: Tensor,
    labels: Vec<u32>,
    dims: [usize; 3],
}

/// The network input and targets of one iteration.
pub struct Batch {
    kind: BatchKind,
    labels: Vec<u32>,
}

enum BatchKind {
    /// Per image: index, points `(1, P, 3)`, optional affines `(1, P, 3, 3)`.
    Points(Vec<(usize, Tensor, Option<Tensor>)>),
    /// `(B, 1, d, h, w)` patches.
    Patches(Tensor),
    /// Whole images by index.
    Volumes(Vec<usize>),
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Class weights `sqrt(1 / frequency)` normalised to mean 1, background set to
/// `background_weight` (absent classes count as one voxel so that the weights stay finite).
pub fn class_weights(labels: &[&[u32]], num_classes: usize, background_weight: f64) -> Vec<f64> {
    let mut count = vec![0usize; num_classes];
    for l in labels {
        for &v in l.iter() {
            if (v as usize) < num_classes {
                count[v as usize] += 1;
            }
        }
    }
    let mut w: Vec<f64> = count.iter().map(|&c| (1.0 / c.max(1) as f64).sqrt()).collect();
    let mean = w.iter().sum::<f64>() / num_classes as f64;
    w.iter_mut().for_each(|v| *v /= mean);
    if let Some(b) = w.first_mut() {
        *b = background_weight;
    }
    w
}

/// Class-weighted cross-entropy over the `fraction` of rows with the highest cross-entropy:
/// `logits (N, classes)`, `labels` of length `N`. Weighted mean, as PyTorch's weighted NLL.
pub fn ohem_cross_entropy(logits: &Tensor, labels: &[u32], weights: &[f64], fraction: f64) -> Result<Tensor> {
    let (n, c) = logits.dims2()?;
    if labels.len() != n || weights.len() != c || n == 0 {
        return Err(Error::Model(format!("loss: {n}x{c} logits, {} labels, {} weights", labels.len(), weights.len())));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= c) {
        return Err(Error::Model(format!("label {bad} ≥ {c} classes")));
    }
    let dev = logits.device();
    let idx = Tensor::from_slice(labels, (n, 1), dev)?;
    let nll = candle_nn::ops::log_softmax(logits, D::Minus1)?.gather(&idx, 1)?.squeeze(1)?.neg()?;
    let ce: Vec<f32> = nll.to_dtype(DType::F32)?.to_vec1()?;
    let k = ((fraction * n as f64).ceil() as usize).clamp(1, n);
    let mut order: Vec<u32> = (0..n as u32).collect();
    // stable, NaN-safe descending order: ties keep index order (determinism)
    order.sort_by(|&a, &b| ce[b as usize].total_cmp(&ce[a as usize]));
    order.truncate(k);
    let w: Vec<f32> = order.iter().map(|&i| weights[labels[i as usize] as usize] as f32).collect();
    let wsum: f32 = w.iter().sum();
    let sel = nll.index_select(&Tensor::from_vec(order, k, dev)?, 0)?;
    let w = Tensor::from_vec(w, k, dev)?.to_dtype(sel.dtype())?;
    Ok(((sel * w)?.sum_all()? / wsum.max(f32::MIN_POSITIVE) as f64)?)
}

/// Runs the optimisation for a [`Model`] on `(image (1, 1, D, H, W) raw, labels (D, H, W) u32)`.
pub struct Trainer<'a> {
    model: &'a Model,
    cfg: TrainConfig,
    data: Vec<Prepared>,
    weights: Vec<f64>,
    opt: AdamW,
    rng: Rng,
    patch: [usize; 3],
    iteration: usize,
}

impl<'a> Trainer<'a> {
    pub fn new(model: &'a Model, data: &[(Tensor, Tensor)], cfg: TrainConfig) -> Result<Self> {
        if data.is_empty() || cfg.batch_size == 0 {
            return Err(Error::Model("training needs at least one image and a batch size ≥ 1".into()));
        }
        let mut prepared = Vec::with_capacity(data.len());
        for (i, (img, lab)) in data.iter().enumerate() {
            let (b, c, d, h, w) = img.dims5()?;
            if b != 1 || c != 1 || lab.dims() != [d, h, w] {
                return Err(Error::Model(format!("sample {i}: image {:?} / labels {:?}", img.dims(), lab.dims())));
            }
            let x = model.normalise(img)?;
            let input = match &model.net {
                Network::Obelisk(n) => n.smooth(&x)?,
                Network::UNet(_) | Network::Hybrid(_) => x,
            };
            let labels: Vec<u32> = lab.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
            prepared.push(Prepared { input: input.detach(), labels, dims: [d, h, w] });
        }
        let lab: Vec<&[u32]> = prepared.iter().map(|p| p.labels.as_slice()).collect();
        let weights = class_weights(&lab, model.config.num_classes, cfg.background_weight);
        let mut patch = cfg.patch_size;
        for p in &prepared {
            for (s, &n) in patch.iter_mut().zip(&p.dims) {
                *s = (*s).min(n).max(1);
            }
        }
        let params = ParamsAdamW { lr: cfg.lr, weight_decay: cfg.weight_decay, ..Default::default() };
        let opt = AdamW::new(trainable_vars(&model.varmap), params)?;
        Ok(Self { model, rng: Rng::new(cfg.seed), cfg, data: prepared, weights, opt, patch, iteration: 0 })
    }

    pub fn class_weights(&self) -> &[f64] {
        &self.weights
    }

    pub fn total_iterations(&self) -> usize {
        self.cfg.epochs * self.cfg.iters_per_epoch
    }

    fn lr_at(&self, iteration: usize) -> f64 {
        let every = if self.cfg.decay_every == 0 { self.cfg.iters_per_epoch.max(1) } else { self.cfg.decay_every };
        self.cfg.lr * self.cfg.lr_decay.powi((iteration / every) as i32)
    }

    /// Draws the next iteration's images, points/patches and labels from the trainer's RNG.
    pub fn sample_batch(&mut self) -> Result<Batch> {
        let dev = self.model.device().clone();
        let picks: Vec<usize> = (0..self.cfg.batch_size).map(|_| self.rng.below(self.data.len())).collect();
        let mut labels = Vec::new();
        let kind = match &self.model.net {
            Network::Obelisk(_) => {
                let np = self.cfg.points_per_image.max(1);
                let mut items = Vec::with_capacity(picks.len());
                for &i in &picks {
                    let [d, h, w] = self.data[i].dims;
                    let mut pts = Vec::with_capacity(np * 3);
                    for _ in 0..np {
                        let p = [0; 3].map(|_| 2.0 * self.rng.uniform() - 1.0);
                        // nearest voxel, halves rounding up as the Nearest sampler
                        let v =
                            |x: f64, n: usize| (((x + 1.0) * 0.5 * (n - 1) as f64 + 0.5).floor() as usize).min(n - 1);
                        labels.push(self.data[i].labels[(v(p[2], d) * h + v(p[1], h)) * w + v(p[0], w)]);
                        pts.extend(p.map(|x| x as f32));
                    }
                    let pts = Tensor::from_vec(pts, (1, np, 3), &dev)?;
                    let aff = if self.cfg.affine_sigma > 0.0 {
                        Some(random_affines(1, np, self.cfg.affine_sigma, &mut self.rng, &dev)?)
                    } else {
                        None
                    };
                    items.push((i, pts, aff));
                }
                BatchKind::Points(items)
            }
            Network::UNet(_) => {
                let [pd, ph, pw] = self.patch;
                let mut xs = Vec::with_capacity(picks.len());
                for &i in &picks {
                    let p = &self.data[i];
                    let [d, h, w] = p.dims;
                    let o = [d - pd, h - ph, w - pw].map(|m| self.rng.below(m + 1));
                    xs.push(p.input.narrow(2, o[0], pd)?.narrow(3, o[1], ph)?.narrow(4, o[2], pw)?);
                    for z in 0..pd {
                        for y in 0..ph {
                            let row = ((o[0] + z) * h + o[1] + y) * w + o[2];
                            labels.extend_from_slice(&p.labels[row..row + pw]);
                        }
                    }
                }
                BatchKind::Patches(Tensor::cat(&xs, 0)?)
            }
            Network::Hybrid(_) => {
                for &i in &picks {
                    labels.extend_from_slice(&self.data[i].labels);
                }
                BatchKind::Volumes(picks)
            }
        };
        Ok(Batch { kind, labels })
    }

    /// The OHEM loss of the current weights on `batch` (train-mode batch norm).
    pub fn loss(&self, batch: &Batch) -> Result<Tensor> {
        let logits = match (&self.model.net, &batch.kind) {
            (Network::Obelisk(net), BatchKind::Points(items)) => {
                let mut hs = Vec::with_capacity(items.len());
                for (i, pts, aff) in items {
                    hs.push(net.sample_points(&self.data[*i].input, pts, aff.as_ref())?);
                }
                // all points of the batch share one set of batch-norm statistics
                let y = net.head_t(&Tensor::cat(&hs, 2)?, true)?;
                y.squeeze(0)?.t()?
            }
            (Network::UNet(net), BatchKind::Patches(x)) => voxel_rows(&candle_core::ModuleT::forward_t(net, x, true)?)?,
            (Network::Hybrid(net), BatchKind::Volumes(picks)) => {
                let dims = self.data[picks[0]].dims;
                if picks.iter().all(|&i| self.data[i].dims == dims) {
                    let xs: Vec<&Tensor> = picks.iter().map(|&i| &self.data[i].input).collect();
                    voxel_rows(&candle_core::ModuleT::forward_t(net.as_ref(), &Tensor::cat(&xs, 0)?, true)?)?
                } else {
                    // images of different sizes: one forward pass (and batch-norm batch) each
                    let mut rows = Vec::with_capacity(picks.len());
                    for &i in picks {
                        rows.push(voxel_rows(&candle_core::ModuleT::forward_t(
                            net.as_ref(),
                            &self.data[i].input,
                            true,
                        )?)?);
                    }
                    Tensor::cat(&rows, 0)?
                }
            }
            _ => return Err(Error::Model("batch drawn for another network".into())),
        };
        ohem_cross_entropy(&logits.contiguous()?, &batch.labels, &self.weights, self.cfg.ohem_fraction)
    }

    /// One optimiser step on `batch`; returns the loss before the update.
    pub fn step_on(&mut self, batch: &Batch) -> Result<f64> {
        self.opt.set_learning_rate(self.lr_at(self.iteration));
        let loss = self.loss(batch)?;
        self.opt.backward_step(&loss)?;
        self.iteration += 1;
        Ok(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }

    /// Runs all `epochs × iters_per_epoch` iterations; returns the mean loss of each epoch.
    pub fn run(&mut self, progress: &mut dyn FnMut(&Progress)) -> Result<Vec<f64>> {
        let total = self.total_iterations();
        let mut epoch_losses = Vec::with_capacity(self.cfg.epochs);
        let mut acc = 0.0;
        while self.iteration < total {
            let t0 = Instant::now();
            let batch = self.sample_batch()?;
            let lr = self.lr_at(self.iteration);
            let loss = self.step_on(&batch)?;
            acc += loss;
            let it = self.iteration;
            let epoch = (it - 1) / self.cfg.iters_per_epoch.max(1);
            let rate = batch.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            progress(&Progress { iteration: it, total, epoch, loss, lr, samples_per_sec: rate });
            if it.is_multiple_of(self.cfg.iters_per_epoch.max(1)) || it == total {
                let n = (it - 1) % self.cfg.iters_per_epoch.max(1) + 1;
                epoch_losses.push(acc / n as f64);
                acc = 0.0;
            }
        }
        Ok(epoch_losses)
    }
}

/// Logits `(B, C, D, H, W)` → one row per voxel `(B·D·H·W, C)`, in label order.
fn voxel_rows(y: &Tensor) -> Result<Tensor> {
    let (b, c, d, h, w) = y.dims5()?;
    Ok(y.reshape((b, c, d * h * w))?.transpose(1, 2)?.reshape((b * d * h * w, c))?)
}

/// Trains `model` in place; see [`Trainer::run`].
pub fn train(
    model: &Model,
    data: &[(Tensor, Tensor)],
    cfg: TrainConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Vec<f64>> {
    Trainer::new(model, data, cfg)?.run(progress)
}

/// Full-volume label map of a raw `(1, 1, D, H, W)` image (argmax of the logits, eval mode), in
/// `D, H, W` order.
pub fn evaluate(model: &Model, image: &Tensor) -> Result<Vec<u32>> {
    let y = model.forward_t(&model.normalise(image)?, false)?;
    Ok(y.argmax(1)?.flatten_all()?.to_vec1()?)
}

/// Dice per foreground label `1..num_classes` of the model's segmentation of `image` against
/// `labels (D, H, W)`; NaN where a label is absent from both.
pub fn evaluate_dice(model: &Model, image: &Tensor, labels: &Tensor) -> Result<Vec<f64>> {
    let pred = evaluate(model, image)?;
    let truth: Vec<u32> = labels.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
    if pred.len() != truth.len() {
        return Err(Error::Model(format!("{} predicted vs {} true labels", pred.len(), truth.len())));
    }
    Ok(dice(&pred, &truth, model.config.num_classes))
}

fn dice(pred: &[u32], truth: &[u32], num_classes: usize) -> Vec<f64> {
    (1..num_classes as u32)
        .map(|l| {
            let (mut inter, mut a, mut b) = (0usize, 0usize, 0usize);
            for (&p, &t) in pred.iter().zip(truth) {
                a += (p == l) as usize;
                b += (t == l) as usize;
                inter += (p == l && t == l) as usize;
            }
            if a + b == 0 {
                f64::NAN
            } else {
                2.0 * inter as f64 / (a + b) as f64
            }
        })
        .collect()
}

/// Deterministic `k`-fold split of `0..n` into contiguous, balanced test folds; returns
/// `(train, test)` index lists. `k = n` is leave-one-out.
pub fn kfold(n: usize, k: usize) -> Result<Vec<(Vec<usize>, Vec<usize>)>> {
    if k < 2 || k > n {
        return Err(Error::Model(format!("{k}-fold split of {n} items")));
    }
    Ok((0..k)
        .map(|f| {
            let (train, test): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| i * k / n != f);
            (train, test)
        })
        .collect())
}

/// Leave-one-out split of `0..n`.
pub fn leave_one_out(n: usize) -> Result<Vec<(Vec<usize>, Vec<usize>)>> {
    kfold(n, n)
}

/// A two-class test problem: a bright ball in a darker, noisy `n³` volume (raw intensities,
/// HU-like), with its label map. Used by tests and benchmarks.
pub fn sphere_problem(n: usize, seed: u64, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut rng = Rng::new(seed);
    let c = (n as f64 - 1.0) / 2.0 + (rng.uniform() - 0.5);
    let r = n as f64 * (0.25 + 0.1 * rng.uniform());
    let (mut img, mut lab) = (Vec::with_capacity(n * n * n), Vec::with_capacity(n * n * n));
    for z in 0..n {
        for y in 0..n {
            for x in 0..n {
                let d2 = [x, y, z].iter().map(|&v| (v as f64 - c).powi(2)).sum::<f64>();
                let inside = d2 < r * r;
                lab.push(inside as u32);
                img.push((if inside { 200.0 } else { -150.0 } + 60.0 * rng.normal()) as f32);
            }
        }
    }
    Ok((Tensor::from_vec(img, (1, 1, n, n, n), device)?, Tensor::from_vec(lab, (n, n, n), device)?))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::{Architecture, InputNorm, ModelConfig};
    use crate::net::{ObeliskNetConfig, UNetConfig};

    fn small_obelisk(seed: u64) -> Model {
        let c = ObeliskNetConfig {
            kernels: 32,
            hidden: 16,
            mid: 16,
            growth: 8,
            dense_layers: 2,
            num_classes: 2,
            pool_kernel: [3, 3, 3],
            ..Default::default()
        };
        Model::new(ModelConfig::new(Architecture::ObeliskNet(c), InputNorm::default(), vec![]), seed, &Device::Cpu)
            .unwrap()
    }

    fn data() -> Vec<(Tensor, Tensor)> {
        (0..2).map(|s| sphere_problem(16, s, &Device::Cpu).unwrap()).collect()
    }

    fn cfg() -> TrainConfig {
        TrainConfig {
            batch_size: 2,
            points_per_image: 128,
            epochs: 1,
            iters_per_epoch: 3,
            seed: 11,
            ..Default::default()
        }
    }

    fn weights(m: &Model) -> Vec<(String, Vec<f32>)> {
        let d = m.varmap.data().lock().unwrap();
        let mut v: Vec<_> =
            d.iter().map(|(k, t)| (k.clone(), t.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn one_step_lowers_the_loss_obelisk_and_unet() {
        let m = small_obelisk(1);
        let mut t = Trainer::new(&m, &data(), TrainConfig { lr: 0.01, ..cfg() }).unwrap();
        let b = t.sample_batch().unwrap();
        let before = t.step_on(&b).unwrap();
        let after = t.loss(&b).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!(after < before, "OBELISK-Net: {before} → {after}");

        let u = UNetConfig { num_classes: 2, channels: vec![2, 4, 4], ..Default::default() };
        let m =
            Model::new(ModelConfig::new(Architecture::Unet(u), InputNorm::default(), vec![]), 1, &Device::Cpu).unwrap();
        let mut t = Trainer::new(&m, &data(), TrainConfig { lr: 0.01, patch_size: [8; 3], ..cfg() }).unwrap();
        let b = t.sample_batch().unwrap();
        assert_eq!(b.len(), 2 * 512);
        let before = t.step_on(&b).unwrap();
        let after = t.loss(&b).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!(after < before, "U-Net: {before} → {after}");

        let h = crate::model::tests::small_hybrid();
        let m = Model::new(ModelConfig::new(Architecture::Hybrid(h), InputNorm::default(), vec![]), 1, &Device::Cpu)
            .unwrap();
        let mut t = Trainer::new(&m, &data(), TrainConfig { lr: 0.01, ..cfg() }).unwrap();
        let b = t.sample_batch().unwrap();
        assert_eq!(b.len(), 2 * 16 * 16 * 16, "whole volumes");
        let before = t.step_on(&b).unwrap();
        let after = t.loss(&b).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!(after < before, "hybrid: {before} → {after}");
    }

    #[test]
    fn same_seed_same_weights_after_training() {
        let run = |seed: u64| {
            let m = small_obelisk(3);
            let mut seen = Vec::new();
            train(&m, &data(), TrainConfig { seed, ..cfg() }, &mut |p| seen.push(p.iteration)).unwrap();
            assert_eq!(seen, vec![1, 2, 3]);
            weights(&m)
        };
        let a = run(5);
        assert_eq!(a, run(5));
        assert_ne!(a, run(6));
        assert_ne!(a, weights(&small_obelisk(3)), "training changed the weights");
    }

    #[test]
    fn obelisk_net_learns_a_sphere() {
        // 24³ so that the quarter-resolution grid (6³) can resolve the ball
        let m = small_obelisk(2);
        let d: Vec<_> = (0..3).map(|s| sphere_problem(24, s, &Device::Cpu).unwrap()).collect();
        let c = TrainConfig { lr: 0.01, epochs: 8, iters_per_epoch: 10, affine_sigma: 0.1, ..cfg() };
        let losses = train(&m, &d, c, &mut |_| {}).unwrap();
        assert!(losses[7] < 0.5 * losses[0], "{losses:?}");
        let (img, lab) = sphere_problem(24, 7, &Device::Cpu).unwrap();
        let dsc = evaluate_dice(&m, &img, &lab).unwrap();
        assert!(dsc[0] > 0.75, "Dice on an unseen image {dsc:?}");
    }

    #[test]
    fn class_weights_follow_the_recipe() {
        // frequencies 0.64, 0.32, 0.04 → sqrt(1/f) ∝ 1.25, 1.768, 5.0
        let mut l = vec![0u32; 64];
        l.extend(vec![1u32; 32]);
        l.extend(vec![2u32; 4]);
        let w = class_weights(&[&l], 3, 0.5);
        let raw = [1.25f64, 1.25 * 2f64.sqrt(), 5.0];
        let mean = raw.iter().sum::<f64>() / 3.0;
        assert_eq!(w[0], 0.5);
        assert!((w[1] - raw[1] / mean).abs() < 1e-12 && (w[2] - raw[2] / mean).abs() < 1e-12);
    }

    #[test]
    fn ohem_keeps_the_hardest_points() {
        // rows 1 and 3 are wrong with high confidence; at fraction 0.5 only they count
        let logits = Tensor::new(&[[4f32, 0.0], [4.0, 0.0], [0.0, 4.0], [0.0, 4.0]], &Device::Cpu).unwrap();
        let labels = [0u32, 1, 1, 0];
        let l = ohem_cross_entropy(&logits, &labels, &[1.0, 1.0], 0.5).unwrap().to_scalar::<f32>().unwrap();
        let hard = (1.0 + 4f32.exp()).ln();
        assert!((l - hard).abs() < 1e-5, "{l} vs {hard}");
        // weights: weighted mean over the kept rows
        let l = ohem_cross_entropy(&logits, &labels, &[3.0, 1.0], 1.0).unwrap().to_scalar::<f32>().unwrap();
        let easy = (1.0 + (-4f32).exp()).ln();
        let want = (3.0 * easy + hard + easy + 3.0 * hard) / 8.0;
        assert!((l - want).abs() < 1e-5);
        assert!(ohem_cross_entropy(&logits, &[0, 1, 2, 0], &[1.0, 1.0], 0.5).is_err());
    }

    #[test]
    fn folds_partition_the_indices() {
        let f = kfold(10, 4).unwrap();
        assert_eq!(f.len(), 4);
        let mut all: Vec<usize> = f.iter().flat_map(|(_, t)| t.clone()).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        for (tr, te) in &f {
            assert_eq!(tr.len() + te.len(), 10);
            assert!(te.len() == 2 || te.len() == 3);
            assert!(tr.iter().all(|i| !te.contains(i)));
        }
        let loo = leave_one_out(5).unwrap();
        assert_eq!(loo[2], (vec![0, 1, 3, 4], vec![2]));
        assert!(kfold(3, 4).is_err());
        assert_eq!(dice(&[1, 1, 0, 2], &[1, 0, 0, 2], 3), vec![2.0 / 3.0, 1.0]);
    }
}
