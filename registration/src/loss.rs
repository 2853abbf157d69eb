//! Registration objectives: feature dissimilarity and the B-spline smoothness penalty.

use candle_core::{Tensor, D};
use segmentation::ops;

use crate::Result;

/// Mean absolute difference between fixed and warped feature vectors over the points where
/// `mask` is 1 (the overlap of the two fields of view).
///
/// `fixed`, `warped`: `(1, C, P)`; `mask`: `(1, 1, P)` of 0/1.
pub fn masked_l1(fixed: &Tensor, warped: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let c = fixed.dim(1)? as f64;
    let count = mask.sum_all()?.to_scalar::<f32>()? as f64;
    let diff = (fixed - warped)?.abs()?.broadcast_mul(mask)?;
    Ok((diff.sum_all()? / (c * count.max(1.0)))?)
}

/// Penalty on the difference between a displacement and its cubic B-spline smoothed version:
/// zero for any affine field, growing with high-frequency content (the OBELISK registration
/// regulariser).
#[derive(Debug, Clone, Copy)]
pub struct BsplinePenalty {
    /// Knot spacing of the smoothing spline, in control-grid voxels, per axis `(d, h, w)`.
    pub width: [f64; 3],
    /// Millimetres per control-grid voxel: the penalty is measured in voxels so that its weight
    /// does not depend on the image's spacing.
    pub voxel_mm: f64,
}

impl BsplinePenalty {
    /// `mean(((u − S·u) / voxel)²)` for `u` of shape `(1, 3, d, h, w)`.
    pub fn eval(&self, u: &Tensor) -> Result<Tensor> {
        let s = ops::bspline_smooth3d(u, self.width)?;
        let r = ((u - s)? / self.voxel_mm)?;
        Ok(r.sqr()?.mean_all()?)
    }
}

/// Diffusion regulariser `mean(|∇u|²)` of `u` `(1, 3, d, h, w)` by forward differences in
/// control-grid voxels (displacements in units of `voxel_mm`). Unlike the B-spline penalty it
/// also charges smooth drift, which keeps featureless regions (air) from wandering.
pub fn diffusion(u: &Tensor, voxel_mm: f64) -> Result<Tensor> {
    let u = (u / voxel_mm)?;
    let mut total: Option<Tensor> = None;
    for axis in 2..5 {
        let n = u.dim(axis)?;
        if n < 2 {
            continue;
        }
        let d = (u.narrow(axis, 1, n - 1)? - u.narrow(axis, 0, n - 1)?)?.sqr()?.mean_all()?;
        total = Some(match total {
            Some(t) => (t + d)?,
            None => d,
        });
    }
    Ok(match total {
        Some(t) => t,
        None => Tensor::zeros((), u.dtype(), u.device())?,
    })
}

/// Fraction of sampled points inside the moving image's extent (half a voxel beyond its outer
/// centres), from moving-normalised points `(1, P, 3)` and the moving shape `(d, h, w)`.
pub fn overlap_mask(points: &Tensor, dhw: (usize, usize, usize)) -> Result<Tensor> {
    let (d, h, w) = dhw;
    let lim = [w, h, d].map(|n| if n > 1 { 1.0 + 1.0 / (n as f64 - 1.0) } else { f64::INFINITY });
    let lim_t = Tensor::from_vec(lim.map(|v| v.min(1e30) as f32).to_vec(), (1, 1, 3), points.device())?;
    let inside = points.abs()?.broadcast_le(&lim_t)?.to_dtype(candle_core::DType::F32)?;
    Ok(inside.min(D::Minus1)?.unsqueeze(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn penalty_is_zero_for_affine_fields_and_positive_otherwise() {
        let (d, h, w) = (6, 7, 9);
        let mut v = Vec::new();
        for c in 0..3 {
            for k in 0..d {
                for j in 0..h {
                    for i in 0..w {
                        v.push((0.5 * i as f32 - 0.2 * j as f32 + 0.1 * (c + 1) as f32 * k as f32) + c as f32);
                    }
                }
            }
        }
        let u = Tensor::from_vec(v, (1, 3, d, h, w), &Device::Cpu).unwrap();
        let p = BsplinePenalty { width: [2.0; 3], voxel_mm: 2.0 };
        assert!(p.eval(&u).unwrap().to_scalar::<f32>().unwrap() < 1e-10);
        let bumpy = u.affine(1.0, 0.0).unwrap().sin().unwrap();
        assert!(p.eval(&bumpy).unwrap().to_scalar::<f32>().unwrap() > 1e-3);
    }

    #[test]
    fn l1_counts_only_the_overlap() {
        let dev = Device::Cpu;
        let f = Tensor::new(&[[[1f32, 2.0, 3.0]]], &dev).unwrap();
        let w = Tensor::new(&[[[0f32, 2.0, 100.0]]], &dev).unwrap();
        let m = Tensor::new(&[[[1f32, 1.0, 0.0]]], &dev).unwrap();
        assert!((masked_l1(&f, &w, &m).unwrap().to_scalar::<f32>().unwrap() - 0.5).abs() < 1e-6);
        let pts = Tensor::new(&[[[0f32, 0.0, 0.0], [1.2, 0.0, 0.0], [1.05, -1.0, 1.0]]], &dev).unwrap();
        let mask: Vec<f32> = overlap_mask(&pts, (5, 5, 11)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(mask, vec![1.0, 0.0, 1.0]);
    }
}
