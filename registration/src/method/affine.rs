//! The affine stage: 12 parameters by Adam on coarse feature maps.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use nalgebra::Matrix4;
use segmentation::ops::SampledL1;

use super::masks::{fixed_weights, moving_valid, Masks};
use super::optimise::{optimise, Epsilon, Schedule};
use super::pyramid::Level;
use super::{same_channels, LossRecord, MethodConfig, Observer, Stage, StageReport};
use crate::transform::{grid_points_lps, Affine, SamplingPlan};
use crate::{Result, Volume};

/// Outcome of [`affine_stage`].
pub struct AffineOutcome {
    /// The optimised affine map (fixed LPS → moving LPS).
    pub affine: Affine,
    pub report: StageReport,
    /// The loss of every iteration.
    pub losses: Vec<LossRecord>,
}

fn dist(a: [f64; 3], b: [f64; 3]) -> f64 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// The affine stage alone, starting from `init` (the similarity restricted to `masks`): 12 parameters by Adam on the features
/// downsampled by `cfg.affine_shrink`, for up to `cfg.affine_iterations` iterations. Its final
/// loss (mean L1 over the overlap, of the best iterate) scores a start: the method runs it from
/// several candidate translations and keeps the best.
pub fn affine_stage(
    fixed: &Volume,
    moving: &Volume,
    masks: &Masks,
    init: &Affine,
    cfg: &MethodConfig,
    observer: &mut dyn Observer,
) -> Result<AffineOutcome> {
    same_channels(fixed, moving)?;
    let dev = Device::Cpu;
    let mut losses = Vec::new();
    let t0 = Instant::now();
    let fl = Level::new(fixed, cfg.affine_shrink)?;
    let ml = Level::new(moving, cfg.affine_shrink)?;
    let plan = SamplingPlan::new(&fl.grid, &ml.grid, init, &dev)?;
    let pts = grid_points_lps(&fl.grid);
    let centre = fl.grid.map(fl.grid.center_ras(), crate::Space::Ras, crate::Space::Lps);
    let radius = fl.grid.corners_ras().iter().map(|c| dist(*c, fl.grid.center_ras())).fold(1.0, f64::max);
    // fixed point in homogeneous, centred, radius-scaled form: all 12 parameters in mm
    let xc: Vec<f32> = pts
        .iter()
        .flat_map(|p| [0, 1, 2].map(|a| ((p[a] - centre[a]) / radius) as f32).into_iter().chain([1.0f32]))
        .collect();
    let xc = Tensor::from_vec(xc, (pts.len(), 4), &dev)?;
    let params = Var::zeros((3, 4), DType::F32, &dev)?;
    let spacing = fl.grid.min_spacing();
    let ffeat = fl.tensor.reshape((1, fixed.channels, plan.points))?;
    let similarity = SampledL1::new(&ml.tensor, &ffeat)?
        .with_masks(fixed_weights(masks, &fl.grid), moving_valid(masks, &ml.grid))?;
    let schedule = Schedule {
        stage: Stage::Affine,
        iterations: cfg.affine_iterations,
        tolerance: cfg.tolerance,
        learning_rate: |it: usize| cfg.learning_rate * spacing * cfg.affine_lr_decay.powi(it as i32),
        epsilon: Epsilon::Default,
        // Adam's first steps move every parameter by a full step whatever its gradient, and the
        // loss keeps hopping on coarse maps: the best iterate, not the last, is the result (and
        // its loss the score by which starts are compared)
        keep_best: true,
    };
    let run = optimise(
        &params,
        &schedule,
        |p| {
            let disp = xc.matmul(&p.t()?)?; // (P, 3) mm
            let points = plan.base.broadcast_add(&disp.matmul(&plan.lin_t)?.unsqueeze(0)?)?;
            Ok(similarity.loss(&points)?)
        },
        &mut losses,
        observer,
    )?;
    let (best_loss, best_params) = match run.best {
        Some((l, p)) => (l, p),
        None => (f64::NAN, params.as_tensor().clone()),
    };
    let pm: Vec<f32> = best_params.flatten_all()?.to_vec1()?;
    let mut delta = Matrix4::zeros();
    for r in 0..3 {
        for c in 0..3 {
            delta[(r, c)] = pm[r * 4 + c] as f64 / radius;
        }
        delta[(r, 3)] = pm[r * 4 + 3] as f64 - (0..3).map(|c| pm[r * 4 + c] as f64 * centre[c] / radius).sum::<f64>();
    }
    let report = StageReport {
        name: Stage::Affine,
        iterations: run.history.len(),
        initial_loss: run.history.first().copied().unwrap_or(f64::NAN),
        final_loss: best_loss,
        seconds: t0.elapsed().as_secs_f64(),
        feature_shape: fl.grid.shape(),
        control_shape: [1, 1, 1],
        overlap: run.overlap,
    };
    Ok(AffineOutcome { affine: Affine { matrix: init.matrix + delta }, report, losses })
}
