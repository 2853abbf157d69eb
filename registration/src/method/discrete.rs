//! The discrete displacement search as the start of the first deformable level.

use candle_core::{Device, Tensor};

use super::masks::{mask_on, Masks, MovingMask};
use super::pyramid::{Level, MovingLevel};
use crate::discrete::{discrete_search, DiscreteConfig, LevelMaps};
use crate::loss::overlap_mask;
use crate::transform::{Affine, DenseDisplacement, SamplingPlan};
use crate::Result;

/// The search's outcome on one level.
pub(crate) struct DiscreteStart {
    /// The displacement on the level grid (moving LPS mm, added after the affine map).
    pub displacement: DenseDisplacement,
    /// Mean patch cost at zero displacement and at the result.
    pub cost_before: f64,
    pub cost_after: f64,
    /// Fraction of fixed points inside the moving data.
    pub overlap: f64,
}

/// The discrete search's field on the level grid of `fl`, sampling the moving level `ml` at the
/// fixed points mapped by `affine` (`plan`); patches count only over fixed voxels inside both
/// `masks`.
pub(crate) fn discrete_start(
    fl: &Level,
    ml: &MovingLevel,
    plan: &SamplingPlan,
    affine: &Affine,
    masks: &Masks,
    cfg: &DiscreteConfig,
) -> Result<DiscreteStart> {
    let warped = ml.sample(&plan.base)?;
    let mut valid: Vec<bool> = overlap_mask(&plan.base, ml.grid().dhw())?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|m| m > 0.5)
        .collect();
    if let Some(m) = masks.fixed {
        valid.iter_mut().zip(mask_on(m, &fl.grid)).for_each(|(v, w)| *v &= w >= 0.5);
    }
    if let Some(m) = MovingMask::new(masks, ml.grid())? {
        let held = m.held(&plan.base)?.flatten_all()?.to_vec1::<f32>()?;
        valid.iter_mut().zip(held).for_each(|(v, w)| *v &= w > 0.5);
    }
    let fixed: Vec<f32> = fl.tensor.flatten_all()?.to_vec1()?;
    let warped: Vec<f32> = warped.flatten_all()?.to_vec1()?;
    let channels = fixed.len() / plan.points;
    let maps = LevelMaps { shape: fl.grid.shape(), channels, fixed: &fixed, warped: &warped, valid: &valid };
    let r = discrete_search(&maps, cfg);
    // a step of δ fixed-level voxels moves the fixed point by L·δ mm, hence its image under the
    // affine map by A·L·δ: the displacement is added after the affine map, in moving space
    let m = affine.matrix.fixed_view::<3, 3>(0, 0)
        * fl.grid.matrix(crate::Space::Voxel, crate::Space::Lps).fixed_view::<3, 3>(0, 0);
    let n = plan.points;
    let mut u = vec![0f32; 3 * n];
    for (v, d) in r.displacement.iter().enumerate() {
        for a in 0..3 {
            u[a * n + v] = (0..3).map(|b| m[(a, b)] * d[b] as f64).sum::<f64>() as f32;
        }
    }
    let (d, h, w) = fl.grid.dhw();
    let tensor = Tensor::from_vec(u, (1, 3, d, h, w), &Device::Cpu)?;
    let overlap = valid.iter().filter(|&&v| v).count() as f64 / valid.len().max(1) as f64;
    Ok(DiscreteStart {
        displacement: DenseDisplacement { grid: fl.grid.clone(), tensor },
        cost_before: r.cost_before,
        cost_after: r.cost_after,
        overlap,
    })
}
