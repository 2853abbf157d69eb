//! The deformable levels: a dense displacement (or velocity) on a control grid per level,
//! coarse to fine, under the L1 feature difference plus the B-spline and diffusion penalties.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use segmentation::ops::{self, grid_sample, DisplacedSampler, Interpolation, Padding, SampledL1};

use super::discrete::discrete_start;
use super::masks::{fixed_weights, moving_valid, Masks, MovingMask};
use super::optimise::{optimise, Epsilon, Schedule};
use super::pyramid::{Level, MovingLevel};
use super::{LossRecord, MethodConfig, Observer, Parameterisation, PointFeatures, Similarity, Stage, StageReport};
use crate::loss::{local_ncc, masked_l1, overlap_mask, BsplinePenalty, Regulariser};
use crate::transform::{Affine, DenseDisplacement, SamplingPlan};
use crate::{Grid, Result, Volume};

/// What the deformable levels found.
pub(crate) struct Deformation {
    /// The displacement (after the affine map) on the last level's control grid.
    pub displacement: DenseDisplacement,
    /// The displacement the first gradient level started from, when the discrete search ran
    /// (exponentiated as a velocity in velocity mode, as the optimisation sees it).
    pub discrete_start: Option<DenseDisplacement>,
    /// The loss of every iteration, level after level.
    pub losses: Vec<LossRecord>,
    /// The discrete search's report, then one per level.
    pub stages: Vec<StageReport>,
}

/// The displacement of the optimised variable `v` on `grid`: itself, or its exponential.
fn displacement(p: Parameterisation, v: &Tensor, grid: &Grid) -> Result<Tensor> {
    match p {
        Parameterisation::Velocity { squarings } => DenseDisplacement::exponentiate(v, grid, squarings),
        Parameterisation::Displacement => Ok(v.clone()),
    }
}

/// Runs every level of `cfg.levels` after `affine`, comparing `fixed` with `moving` (and, for
/// [`Similarity::Ncc`] beside the features, `intensities` on the same grids).
#[allow(clippy::too_many_arguments)]
pub(crate) fn deformable_levels(
    fixed: &Volume,
    moving: &Volume,
    intensities: Option<(&Volume, &Volume)>,
    exact: Option<&dyn PointFeatures>,
    masks: &Masks,
    affine: &Affine,
    cfg: &MethodConfig,
    observer: &mut dyn Observer,
) -> Result<Deformation> {
    let dev = Device::Cpu;
    let (mut losses, mut stages) = (Vec::new(), Vec::new());
    let mut discrete_found = None;
    // the optimised variable of the last level: the displacement, or the velocity
    let mut field: Option<DenseDisplacement> = None;
    let intensities_alone =
        matches!(cfg.similarity, Similarity::Ncc { features, .. } if features == 0.0 || intensities.is_none());
    for (li, level) in cfg.levels.iter().enumerate() {
        if level.intensities_only && !intensities_alone {
            continue;
        }
        let t0 = Instant::now();
        let stage = Stage::Deformable(li + 1);
        observer.event(super::Event::Started(stage));
        let fl = Level::new(fixed, level.shrink)?;
        let ml = match exact {
            Some(e) => MovingLevel::Exact(e),
            None => MovingLevel::Maps(Level::new(moving, level.shrink)?),
        };
        let moving_grid = ml.grid();
        let cshape = fl.grid.shape().map(|n| n.div_ceil(level.control_shrink.max(1)).max(1));
        let cgrid = fl.grid.resized(cshape);
        let plan = SamplingPlan::new(&fl.grid, moving_grid, affine, &dev)?;
        let init_u = match &field {
            Some(f) => f.resampled(&cgrid)?,
            None if cfg.discrete.radius > 0 => {
                let t0 = Instant::now();
                observer.event(super::Event::Started(Stage::Discrete));
                let found = discrete_start(&fl, &ml, &plan, affine, masks, &cfg.discrete)?;
                stages.push(StageReport {
                    name: Stage::Discrete,
                    iterations: cfg.discrete.coupling.len() + 1,
                    initial_loss: found.cost_before,
                    final_loss: found.cost_after,
                    seconds: t0.elapsed().as_secs_f64(),
                    feature_shape: fl.grid.shape(),
                    control_shape: fl.grid.shape(),
                    overlap: found.overlap,
                });
                let u = found.displacement.resampled(&cgrid)?;
                let start = displacement(cfg.parameterisation, &u.tensor, &cgrid)?;
                discrete_found = Some(DenseDisplacement { grid: cgrid.clone(), tensor: start });
                u
            }
            None => DenseDisplacement::zeros(cgrid.clone(), &dev)?,
        };
        let u = Var::from_tensor(&init_u.tensor)?;
        let spacing = fl.grid.min_spacing();
        let cspacing = cgrid.min_spacing();
        let base_diffusion = if fixed.grid.is_2d() { cfg.diffusion_2d } else { cfg.diffusion };
        let weight_diffusion = level.diffusion.unwrap_or(base_diffusion);
        let penalty = BsplinePenalty { width: [cfg.bspline_width; 3], voxel_mm: cspacing };
        let (cd, ch, cw) = cgrid.dhw();
        let regulariser = Regulariser::new(&penalty, cfg.smoothness, weight_diffusion.max(0.0), [cd, ch, cw]);
        let ffeat = fl.tensor.reshape((1, fixed.channels, plan.points))?;
        // (radius, weight, the intensity maps: the level's own maps when there are none beside)
        let (l1_weight, ncc) = match cfg.similarity {
            // (resolved before the levels run; without intensities to measure, the features)
            Similarity::L1 | Similarity::Auto { .. } => (1.0, None),
            Similarity::Ncc { radius, weight, features } => {
                let maps = match intensities {
                    Some((fi, mi)) => {
                        let (fil, mil) = (Level::new(fi, level.shrink)?, Level::new(mi, level.shrink)?);
                        if fil.grid.shape() != fl.grid.shape() || mil.grid.shape() != moving_grid.shape() {
                            return Err(crate::Error::GridMismatch {
                                what: "intensities and features of the NCC level".into(),
                                a: fil.grid.shape(),
                                b: fl.grid.shape(),
                            });
                        }
                        Some((fil, mil))
                    }
                    None => None,
                };
                (if intensities.is_some() { features } else { 0.0 }, Some((radius, weight, maps)))
            }
        };
        // L1 on the maps is fused into one op; the exact mode's point features and the NCC go
        // through candle ops, with the masks as tensors: one weight per fixed point, the moving
        // mask looked up per iteration
        let weights = fixed_weights(masks, &fl.grid);
        let similarity = match &ml {
            MovingLevel::Maps(l) if l1_weight > 0.0 => {
                Some(SampledL1::new(&l.tensor, &ffeat)?.with_masks(weights.clone(), moving_valid(masks, &l.grid))?)
            }
            _ => None,
        };
        let (mut fixed_w, mut moving_mask) = (None, None);
        if similarity.is_none() || ncc.is_some() {
            if let Some(w) = &weights {
                let w: Vec<f32> = w.iter().map(|&v| v as f32).collect();
                fixed_w = Some(Tensor::from_vec(w, (1, 1, plan.points), &dev)?);
            }
            moving_mask = MovingMask::new(masks, moving_grid)?;
        }
        // NCC alone on intensity maps samples them at the displaced points in one fused op (the
        // points never become a differentiable tensor)
        let displaced = match &ncc {
            Some((_, _, Some((_, mil)))) if l1_weight == 0.0 => {
                Some(DisplacedSampler::new(&mil.tensor, &plan.base, &plan.lin_t, Padding::Border)?)
            }
            _ => None,
        };
        let (d, h, w) = fl.grid.dhw();
        let schedule = Schedule {
            stage,
            iterations: level.iterations,
            tolerance: cfg.tolerance,
            learning_rate: |_| cfg.learning_rate * spacing,
            epsilon: Epsilon::RelativeToFirstGradient(cfg.adam_epsilon),
            keep_best: false,
        };
        let run = optimise(
            &u,
            &schedule,
            |v| {
                let dense = ops::resize(&displacement(cfg.parameterisation, v, &cgrid)?, [d, h, w])?;
                // the differentiable points, unless the fused sampler forms them itself
                let p = match &displaced {
                    Some(_) => None,
                    None => Some(plan.points_for(&dense)?),
                };
                let overlap = || -> Result<Tensor> {
                    let mut mask = match (&p, &displaced, &moving_mask) {
                        // (the points themselves are needed only to look the moving mask up)
                        (None, Some(s), None) => s.inside(&dense)?,
                        _ => {
                            let p = match (&p, &displaced) {
                                (Some(p), _) => p.detach(),
                                (None, Some(s)) => s.points(&dense)?,
                                (None, None) => unreachable!("points or a sampler"),
                            };
                            let mut mask = overlap_mask(&p, moving_grid.dhw())?;
                            if let Some(m) = &moving_mask {
                                mask = mask.broadcast_mul(&m.held(&p)?)?;
                            }
                            mask
                        }
                    };
                    if let Some(w) = &fixed_w {
                        mask = mask.broadcast_mul(w)?;
                    }
                    Ok(mask)
                };
                let (mut sim, mut inside) = (Tensor::zeros((), DType::F32, &dev)?, 1.0);
                if let (true, Some(p)) = (l1_weight > 0.0, &p) {
                    let (s, i) = match &similarity {
                        Some(s) => s.loss(p)?,
                        None => {
                            let mask = overlap()?;
                            let i = mask.mean_all()?.to_scalar::<f32>()? as f64;
                            (masked_l1(&ffeat, &ml.sample(p)?, &mask)?, i)
                        }
                    };
                    (sim, inside) = ((sim + (s * l1_weight)?)?, i);
                }
                if let Some((radius, weight, maps)) = &ncc {
                    let mask = overlap()?;
                    if l1_weight == 0.0 {
                        inside = mask.mean_all()?.to_scalar::<f32>()? as f64;
                    }
                    let (fixed_i, warped) = match (maps, &p, &displaced) {
                        (Some((fil, _)), _, Some(s)) => (&fil.tensor, s.sample_as(&dense, fil.tensor.shape().clone())?),
                        (Some((fil, mil)), Some(p), None) => {
                            (&fil.tensor, grid_sample(&mil.tensor, p, Interpolation::Linear, Padding::Border)?)
                        }
                        (None, Some(p), _) => (&fl.tensor, ml.sample(p)?),
                        (_, None, _) => unreachable!("the fused sampler serves intensity maps only"),
                    };
                    let warped =
                        if warped.shape() == fixed_i.shape() { warped } else { warped.reshape(fixed_i.shape())? };
                    let ncc = local_ncc(fixed_i, &warped, &mask.reshape((1, 1, d, h, w))?, *radius)?;
                    sim = (sim + (ncc * *weight)?)?;
                }
                Ok(((&sim + regulariser.eval(v)?)?, inside))
            },
            &mut losses,
            observer,
        )?;
        stages.push(StageReport {
            name: stage,
            iterations: run.history.len(),
            initial_loss: run.history.first().copied().unwrap_or(f64::NAN),
            final_loss: run.history.last().copied().unwrap_or(f64::NAN),
            seconds: t0.elapsed().as_secs_f64(),
            feature_shape: fl.grid.shape(),
            control_shape: cshape,
            overlap: run.overlap,
        });
        field = Some(DenseDisplacement { grid: cgrid, tensor: u.as_tensor().detach() });
    }
    let displacement = match field {
        Some(f) => DenseDisplacement { tensor: displacement(cfg.parameterisation, &f.tensor, &f.grid)?, ..f },
        None => DenseDisplacement::zeros(fixed.grid.resized([1, 1, 1]), &dev)?,
    };
    Ok(Deformation { displacement, discrete_start: discrete_found, losses, stages })
}
