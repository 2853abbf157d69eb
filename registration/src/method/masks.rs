//! Metric masks: where the similarity is evaluated, as ANTs' and elastix's fixed and moving
//! masks. A fixed voxel outside the fixed mask does not count; a fixed point whose image lands
//! outside the moving mask counts as outside the moving image.

use crate::warp::{warp_volume, Interpolation, Padding};
use crate::{DisplacementField, Grid, Result, Volume};

/// Masks of the fixed and the moving image, each on any grid (its own image's, normally):
/// nonzero voxels are inside, as in ITK.
#[derive(Clone, Copy, Default)]
pub struct Masks<'a> {
    pub fixed: Option<&'a Volume>,
    pub moving: Option<&'a Volume>,
}

/// `mask` (nonzero inside) on `grid`: the fraction of each voxel inside, by linear
/// interpolation of the binarised mask (0 outside its extent).
pub fn mask_on(mask: &Volume, grid: &Grid) -> Vec<f32> {
    let binary = Volume {
        grid: mask.grid.clone(),
        channels: 1,
        data: mask.channel(0).iter().map(|&v| if v != 0.0 { 1.0 } else { 0.0 }).collect(),
    };
    warp_volume(&binary, &DisplacementField::zeros(grid.clone()), Interpolation::Linear, Padding::Extent).data
}

/// The fixed mask as a weight per voxel of `grid` (`None` without a mask).
pub(crate) fn fixed_weights(masks: &Masks, grid: &Grid) -> Option<Vec<f64>> {
    masks.fixed.map(|m| mask_on(m, grid).into_iter().map(f64::from).collect())
}

/// The voxels of `grid` that the moving mask holds (at least half inside; `None` without a
/// mask).
pub(crate) fn moving_valid(masks: &Masks, grid: &Grid) -> Option<Vec<bool>> {
    masks.moving.map(|m| mask_on(m, grid).into_iter().map(|v| v >= 0.5).collect())
}

/// Fraction of `grid`'s voxels inside `mask`, for the log.
pub fn mask_coverage(mask: &Volume, grid: &Grid) -> f64 {
    let on = mask_on(mask, grid);
    on.iter().map(|&v| v as f64).sum::<f64>() / on.len().max(1) as f64
}

/// The moving mask on a moving grid, resampled once and looked up at sampled points.
pub(crate) struct MovingMask(candle_core::Tensor);

impl MovingMask {
    /// `None` without a moving mask.
    pub fn new(masks: &Masks, grid: &Grid) -> Result<Option<Self>> {
        let Some(m) = masks.moving else {
            return Ok(None);
        };
        let (d, h, w) = grid.dhw();
        Ok(Some(Self(candle_core::Tensor::from_vec(mask_on(m, grid), (1, 1, d, h, w), &candle_core::Device::Cpu)?)))
    }

    /// 1 where the mask holds the moving voxel nearest to each normalised point `(1, P, 3)` of
    /// the grid, else 0: `(1, 1, P)`, constant under differentiation.
    pub fn held(&self, points: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        let s = segmentation::ops::grid_sample(&self.0, &points.detach(), Interpolation::Nearest, Padding::Zeros)?;
        Ok(s.ge(0.5)?.to_dtype(candle_core::DType::F32)?)
    }
}
