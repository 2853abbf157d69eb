//! The one optimisation loop: Adam on one variable, loss records, events, the non-finite check
//! and the convergence test, shared by the affine stage and the deformable levels.

use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use super::{Event, LossRecord, Observer, Stage};
use crate::{Error, Result};

/// Adam's epsilon.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Epsilon {
    /// Adam's usual tiny epsilon.
    Default,
    /// This fraction of the RMS of the first gradient. Adam rescales every gradient to unit
    /// size, so control points over featureless regions (air) random-walk on noise; an epsilon
    /// at a fraction of the first gradient's RMS turns those into small SGD steps instead.
    RelativeToFirstGradient(f64),
}

/// How a stage is optimised.
pub(crate) struct Schedule<F: Fn(usize) -> f64> {
    pub stage: Stage,
    pub iterations: usize,
    /// Stop when the loss improved by less than this fraction over 10 iterations.
    pub tolerance: f64,
    /// Adam's step at iteration `it`.
    pub learning_rate: F,
    pub epsilon: Epsilon,
    /// Keep the best iterate (and its loss) rather than the last.
    pub keep_best: bool,
}

/// What the loop did.
pub(crate) struct Optimised {
    /// The loss of every iteration.
    pub history: Vec<f64>,
    /// Fraction of points inside the moving extent at the last iteration.
    pub overlap: f64,
    /// The best iterate and its loss, with [`Schedule::keep_best`].
    pub best: Option<(f64, Tensor)>,
}

fn converged(hist: &[f64], tol: f64) -> bool {
    const WIN: usize = 10;
    if hist.len() < 2 * WIN {
        return false;
    }
    let (a, b) = (hist[hist.len() - 1 - WIN], hist[hist.len() - 1]);
    (a - b) / a.abs().max(1e-12) < tol
}

/// Minimises `loss(var) -> (loss, overlap fraction)` by Adam with `schedule`, recording every
/// iteration's loss in `records` and reporting it to `observer`.
pub(crate) fn optimise<F: Fn(usize) -> f64>(
    var: &Var,
    schedule: &Schedule<F>,
    mut loss: impl FnMut(&Tensor) -> Result<(Tensor, f64)>,
    records: &mut Vec<LossRecord>,
    observer: &mut dyn Observer,
) -> Result<Optimised> {
    let mut opt: Option<AdamW> = None;
    let mut out = Optimised { history: Vec::new(), overlap: 0.0, best: None };
    for it in 0..schedule.iterations {
        let (value, inside) = loss(var.as_tensor())?;
        let l = value.to_scalar::<f32>()? as f64;
        if !l.is_finite() {
            return Err(Error::NonFiniteLoss { stage: schedule.stage, iteration: it, value: l });
        }
        out.overlap = inside;
        let record = LossRecord { stage: schedule.stage, iteration: it, loss: l };
        records.push(record);
        observer.event(Event::Iteration(record));
        out.history.push(l);
        if schedule.keep_best && out.best.as_ref().is_none_or(|b| l < b.0) {
            out.best = Some((l, var.as_tensor().copy()?));
        }
        let grads = value.backward()?;
        let lr = (schedule.learning_rate)(it);
        let opt = match &mut opt {
            Some(o) => {
                o.set_learning_rate(lr);
                o
            }
            None => {
                let mut p = ParamsAdamW { lr, weight_decay: 0.0, ..Default::default() };
                if let Epsilon::RelativeToFirstGradient(f) = schedule.epsilon {
                    let g = grads.get(var.as_tensor()).map(|g| g.sqr()?.mean_all()?.to_scalar::<f32>()).transpose()?;
                    p.eps = (f * (g.unwrap_or(0.0) as f64).sqrt()).max(1e-12);
                }
                opt.insert(AdamW::new(vec![var.clone()], p)?)
            }
        };
        opt.step(&grads)?;
        if converged(&out.history, schedule.tolerance) {
            break;
        }
    }
    Ok(out)
}
