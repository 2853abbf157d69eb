//! Feature maps as tensors at the resolutions the stages work on.

use candle_core::{Device, Tensor};
use segmentation::ops::{self, grid_sample, Interpolation, Padding};

use super::PointFeatures;
use crate::{Grid, Result, Volume};

/// A feature pyramid level: features as a `(1, C, D, H, W)` tensor on a grid resized from the
/// original.
pub(crate) struct Level {
    pub grid: Grid,
    pub tensor: Tensor,
}

impl Level {
    /// `v` area-resized to `shrink` times the finest spacing ([`Grid::level_shape`]).
    pub fn new(v: &Volume, shrink: usize) -> Result<Level> {
        let (d, h, w) = v.grid.dhw();
        let t = Tensor::from_vec(v.data.clone(), (1, v.channels, d, h, w), &Device::Cpu)?;
        let grid = v.grid.resized(v.grid.level_shape(shrink));
        let (d2, h2, w2) = grid.dhw();
        // detached: the maps are constants, and a tensor made by an op would otherwise draw every
        // backward pass through the sampler's input gradient and the resizing
        Ok(Level { tensor: ops::resize(&t, [d2, h2, w2])?.detach(), grid })
    }
}

/// Where a deformable level reads the moving features from.
pub(crate) enum MovingLevel<'a> {
    /// The moving maps resized to the level.
    Maps(Level),
    /// The features computed at the sampled points.
    Exact(&'a dyn PointFeatures),
}

impl MovingLevel<'_> {
    pub fn grid(&self) -> &Grid {
        match self {
            MovingLevel::Maps(l) => &l.grid,
            MovingLevel::Exact(e) => e.grid(),
        }
    }

    /// Features `(1, C, P)` at normalised points `(1, P, 3)` of [`Self::grid`].
    pub fn sample(&self, points: &Tensor) -> Result<Tensor> {
        match self {
            MovingLevel::Maps(l) => Ok(grid_sample(&l.tensor, points, Interpolation::Linear, Padding::Border)?),
            MovingLevel::Exact(e) => e.at(points),
        }
    }
}
