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

    /// The same image stored in RAS voxel order ([`Grid::canonical`]): every voxel keeps its
    /// world position. Features whose channels refer to voxel directions (MIND-SSC's neighbour
    /// pairs, OBELISK's learned offsets) are only comparable between images stored alike; a
    /// clone when the image already is.
    pub fn to_canonical(&self) -> Volume {
        let (grid, r) = self.grid.canonical();
        if r.is_identity() {
            return self.clone();
        }
        let old = self.grid.shape();
        let [nx, ny, nz] = grid.shape();
        // old flat stride of each new axis, and the old offset of new voxel (0, 0, 0)
        let old_stride = [1, old[0], old[0] * old[1]];
        let mut step = [0isize; 3];
        let mut start = 0isize;
        for a in 0..3 {
            let s = old_stride[r.source[a]] as isize;
            if r.flip[a] {
                step[a] = -s;
                start += s * (old[r.source[a]] as isize - 1);
            } else {
                step[a] = s;
            }
        }
        let n = self.grid.num_voxels();
        let mut data = Vec::with_capacity(self.data.len());
        for c in 0..self.channels {
            let src = &self.data[c * n..(c + 1) * n];
            for k in 0..nz {
                for j in 0..ny {
                    let row = start + step[2] * k as isize + step[1] * j as isize;
                    data.extend((0..nx).map(|i| src[(row + step[0] * i as isize) as usize]));
                }
            }
        }
        Volume { grid, channels: self.channels, data }
    }

    /// The image over the same field of view with voxels of `spacing` mm along every axis: area
    /// averaging along axes that shrink, linear interpolation along axes that grow. A clone when
    /// the shape would not change.
    pub fn with_spacing(&self, spacing: f64) -> Result<Volume> {
        if !(spacing.is_finite() && spacing > 0.0) {
            return Err(Error::Data(format!("spacing must be a positive number of mm, got {spacing}")));
        }
        let (sp, sh) = (self.grid.spacing(), self.grid.shape());
        let shape = [0, 1, 2].map(|a| ((sh[a] as f64 * sp[a] / spacing).round() as usize).max(1));
        if shape == sh {
            return Ok(self.clone());
        }
        let grid = self.grid.resized(shape);
        let (d, h, w) = self.grid.dhw();
        let t = candle_core::Tensor::from_slice(&self.data, (1, self.channels, d, h, w), &candle_core::Device::Cpu)?;
        let (d2, h2, w2) = grid.dhw();
        let r = segmentation::ops::resize(&t, [d2, h2, w2])?;
        Volume::new(grid, self.channels, r.flatten_all()?.to_vec1()?)
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

#[cfg(test)]
mod tests {
    use nalgebra::Matrix3;

    use super::*;
    use crate::Space;

    /// Every voxel of the canonical copy holds the value the original holds at the same world
    /// position, and its axes run along +R, +A, +S.
    #[test]
    fn canonical_copy_keeps_world_positions_and_runs_ras() {
        // voxel axes: i → −A (posterior), j → +S... roughly, k → −R, with a small rotation
        let rot = nalgebra::Rotation3::from_euler_angles(0.1, -0.05, 0.08).into_inner();
        let dir = rot * Matrix3::new(0.0, 0.0, -1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 0.0);
        let grid = Grid::from_parts([5, 4, 3], [1.0, 2.0, 3.0], [10.0, -4.0, 7.0], dir).unwrap();
        let n = grid.num_voxels();
        let v = Volume::new(grid.clone(), 2, (0..2 * n).map(|x| x as f32).collect()).unwrap();
        let c = v.to_canonical();
        let [cx, cy, cz] = c.grid.shape();
        assert_eq!([cx, cy, cz], [3, 5, 4]);
        let d = c.grid.direction_ras();
        for a in 0..3 {
            assert!(d[(a, a)] > 0.9, "axis {a} of {d}");
        }
        for k in 0..cz {
            for j in 0..cy {
                for i in 0..cx {
                    let w = c.grid.map([i as f64, j as f64, k as f64], Space::Voxel, Space::Ras);
                    let o = grid.map(w, Space::Ras, Space::Voxel).map(|x| x.round() as usize);
                    for ch in 0..2 {
                        assert_eq!(c.data[ch * n + c.index(i, j, k)], v.data[ch * n + v.index(o[0], o[1], o[2])]);
                    }
                }
            }
        }
        // already canonical, and 2D images: unchanged
        assert_eq!(c.to_canonical(), c);
        let flat = Grid::from_parts([4, 3, 1], [1.0; 3], [0.0; 3], Matrix3::from_diagonal_element(-1.0)).unwrap();
        let img = Volume::zeros(flat);
        assert_eq!(img.to_canonical(), img);
    }

    #[test]
    fn resampling_to_a_spacing_keeps_the_field_of_view_and_constants() {
        let grid = Grid::from_spacing([12, 9, 4], [1.0, 1.0, 3.0], [5.0, -2.0, 1.0]).unwrap();
        let v = Volume::new(grid.clone(), 2, [vec![4.0; 432], (0..432).map(|x| x as f32).collect()].concat()).unwrap();
        let r = v.with_spacing(3.0).unwrap();
        assert_eq!(r.grid.shape(), [4, 3, 4]);
        assert!(r.grid.spacing().iter().all(|s| (s - 3.0).abs() < 1e-9));
        // same box: the outer voxel edges coincide
        let edge = |g: &Grid| g.map([-0.5, -0.5, -0.5], Space::Voxel, Space::Ras);
        assert!(edge(&r.grid).iter().zip(edge(&grid)).all(|(a, b)| (a - b).abs() < 1e-9));
        assert!(r.channel(0).iter().all(|&x| (x - 4.0).abs() < 1e-5));
        // the mean of a linear ramp survives area averaging
        let mean = |d: &[f32]| d.iter().map(|&x| x as f64).sum::<f64>() / d.len() as f64;
        assert!((mean(r.channel(1)) - mean(v.channel(1))).abs() < 1e-3);
        assert_eq!(r.with_spacing(3.0).unwrap(), r);
        assert!(v.with_spacing(0.0).is_err());
    }
}
