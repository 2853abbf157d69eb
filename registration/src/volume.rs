//! Images, label maps and displacement fields: data on a [`Grid`].

use crate::{Error, Grid, Result};

/// A (multi-channel) image: `f32` data laid out `(C, D, H, W)`, `i` fastest.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    pub grid: Grid,
    pub channels: usize,
    pub data: Vec<f32>,
}

impl Volume {
    pub fn new(grid: Grid, channels: usize, data: Vec<f32>) -> Result<Self> {
        if channels == 0 || data.len() != channels * grid.num_voxels() {
            return Err(Error::Data(format!(
                "volume data has {} values; grid {:?} with {channels} channel(s) needs {}",
                data.len(),
                grid.shape(),
                channels * grid.num_voxels()
            )));
        }
        Ok(Self { grid, channels, data })
    }

    /// A single-channel volume of zeros.
    pub fn zeros(grid: Grid) -> Self {
        let n = grid.num_voxels();
        Self { grid, channels: 1, data: vec![0.0; n] }
    }

    /// The data of channel `c`.
    pub fn channel(&self, c: usize) -> &[f32] {
        let n = self.grid.num_voxels();
        &self.data[c * n..(c + 1) * n]
    }

    /// Flat index of voxel `(i, j, k)` within a channel.
    pub fn index(&self, i: usize, j: usize, k: usize) -> usize {
        let [nx, ny, _] = self.grid.shape();
        (k * ny + j) * nx + i
    }

    /// Errors if any value is NaN or infinite, naming how many.
    pub fn check_finite(&self) -> Result<()> {
        let bad = self.data.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(Error::Data(format!("{bad} voxel value(s) are NaN or infinite")));
        }
        Ok(())
    }

    /// Minimum and maximum over all channels.
    pub fn range(&self) -> (f32, f32) {
        self.data.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
    }
}

/// An integer label map on a grid (0 = background).
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    pub grid: Grid,
    pub data: Vec<u32>,
}

impl Labels {
    pub fn new(grid: Grid, data: Vec<u32>) -> Result<Self> {
        if data.len() != grid.num_voxels() {
            return Err(Error::Data(format!(
                "label data has {} values; grid {:?} needs {}",
                data.len(),
                grid.shape(),
                grid.num_voxels()
            )));
        }
        Ok(Self { grid, data })
    }

    /// Sorted distinct non-zero labels.
    pub fn ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.data.iter().copied().filter(|&l| l != 0).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// A copy with every label not in `keep` (sorted) set to background.
    pub fn keep_only(&self, keep: &[u32]) -> Labels {
        let data = self.data.iter().map(|&l| if keep.binary_search(&l).is_ok() { l } else { 0 }).collect();
        Labels { grid: self.grid.clone(), data }
    }

    /// Sorted non-zero labels present in both maps.
    pub fn shared_ids(&self, other: &Labels) -> Vec<u32> {
        let theirs = other.ids();
        self.ids().into_iter().filter(|l| theirs.binary_search(l).is_ok()).collect()
    }

    /// One channel per label of `ids`: 1 inside the label, 0 elsewhere (a feature map in which
    /// two label maps can be compared by the same code as image features).
    pub fn one_hot(&self, ids: &[u32]) -> Volume {
        let n = self.data.len();
        let mut data = vec![0.0f32; ids.len() * n];
        for (c, &id) in ids.iter().enumerate() {
            for (d, &l) in data[c * n..(c + 1) * n].iter_mut().zip(&self.data) {
                *d = if l == id { 1.0 } else { 0.0 };
            }
        }
        Volume { grid: self.grid.clone(), channels: ids.len(), data }
    }

    /// The labels as a float volume (for sampling).
    pub fn to_volume(&self) -> Volume {
        Volume { grid: self.grid.clone(), channels: 1, data: self.data.iter().map(|&l| l as f32).collect() }
    }
}

/// A dense displacement field in the ITK convention: sampled on the fixed grid, components
/// `(x, y, z)` in LPS millimetres, channel-major `(3, D, H, W)`; the fixed point `x` maps to the
/// moving point `x + u(x)`.
#[derive(Debug, Clone, PartialEq)]
pub struct DisplacementField {
    pub grid: Grid,
    pub data: Vec<f32>,
}

impl DisplacementField {
    pub fn new(grid: Grid, data: Vec<f32>) -> Result<Self> {
        if data.len() != 3 * grid.num_voxels() {
            return Err(Error::Data(format!(
                "displacement field has {} values; grid {:?} needs 3 x {}",
                data.len(),
                grid.shape(),
                grid.num_voxels()
            )));
        }
        Ok(Self { grid, data })
    }

    pub fn zeros(grid: Grid) -> Self {
        let n = 3 * grid.num_voxels();
        Self { grid, data: vec![0.0; n] }
    }

    /// Displacement (LPS mm) at voxel index `v`.
    pub fn at(&self, v: usize) -> [f32; 3] {
        let n = self.grid.num_voxels();
        [self.data[v], self.data[n + v], self.data[2 * n + v]]
    }
}
