//! Registration objectives: feature dissimilarity and the B-spline smoothness penalty.

use candle_core::Tensor;
use rayon::prelude::*;
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

/// Local normalised cross-correlation loss `1 − mean(cc)` of `fixed` and `warped` `(1, C, D, H,
/// W)`, channel by channel, over the voxels where `mask` `(1, 1, D, H, W)` is nonzero (weighted
/// by it). `cc = cov² / (var_f · var_w)` in a `(2r+1)` box around each voxel, as ANTs' CC
/// metric: the square makes it indifferent to the sign of the local contrast, so it tolerates
/// inverted tissue contrasts as long as they are locally linear. The window statistics are
/// weighted by the mask too: a window at the edge of the overlap would otherwise mix in the
/// padded values beyond the moving image, which pull the field towards the border. Flat windows
/// count as uncorrelated rather than dividing by zero. Computed by [`ops::local_ncc`].
pub fn local_ncc(fixed: &Tensor, warped: &Tensor, mask: &Tensor, radius: usize) -> Result<Tensor> {
    let (_, _, d, h, w) = fixed.dims5()?;
    // a window never reaches across an axis of length 1 (2D images)
    let r = [d, h, w].map(|n| if n > 1 { radius } else { 0 });
    // one fused op: running window sums forward, the analytic gradient backward
    Ok(ops::local_ncc(fixed, warped, mask, r)?)
}

/// Fraction of sampled points inside the moving image's extent (half a voxel beyond its outer
/// centres), from moving-normalised points `(1, P, 3)` and the moving shape `(d, h, w)`.
pub fn overlap_mask(points: &Tensor, dhw: (usize, usize, usize)) -> Result<Tensor> {
    let (d, h, w) = dhw;
    let lim = [w, h, d].map(|n| if n > 1 { 1.0 + 1.0 / (n as f64 - 1.0) } else { f64::INFINITY }.min(1e30) as f32);
    let (b, np, _) = points.dims3()?;
    // one pass in plain Rust: as candle ops, five full-size temporaries per call
    let p = points.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let inside: Vec<f32> = p
        .par_chunks(3)
        .map(|q| if q[0].abs() <= lim[0] && q[1].abs() <= lim[1] && q[2].abs() <= lim[2] { 1.0 } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(inside, (b, 1, np), points.device())?)
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

    /// A smooth random texture `(1, 1, d, h, w)`.
    fn texture(d: usize, h: usize, w: usize, seed: u32) -> Tensor {
        let v: Vec<f32> = (0..d * h * w)
            .map(|n| {
                let (i, j, k) = ((n % w) as f32, ((n / w) % h) as f32, (n / (w * h)) as f32);
                let s = seed as f32;
                (0.7 * i + s).sin() * (0.4 * j - 0.3 * s).cos() + (0.5 * k + 0.9 * j + s).sin()
            })
            .collect();
        Tensor::from_vec(v, (1, 1, d, h, w), &Device::Cpu).unwrap()
    }

    #[test]
    fn local_ncc_ignores_local_linear_intensity_changes_and_sees_misalignment() {
        let (d, h, w) = (8, 9, 10);
        let f = texture(d, h, w, 0);
        let ones = Tensor::ones((1, 1, d, h, w), candle_core::DType::F32, &Device::Cpu).unwrap();
        let ncc = |a: &Tensor, b: &Tensor, m: &Tensor| local_ncc(a, b, m, 2).unwrap().to_scalar::<f32>().unwrap();
        // a gain, an offset and an inverted contrast all correlate perfectly
        assert!(ncc(&f, &f.affine(2.5, 3.0).unwrap(), &ones) < 1e-3);
        assert!(ncc(&f, &f.affine(-0.5, 1.0).unwrap(), &ones) < 1e-3);
        // another texture does not
        let g = texture(d, h, w, 5);
        let far = ncc(&f, &g, &ones);
        assert!(far > 0.3, "unrelated textures: loss {far}");
        // only the masked voxels count: where the mask is zero a mismatch costs nothing
        let half: Vec<f32> = (0..d * h * w).map(|n| if n / (w * h) < d / 2 { 1.0 } else { 0.0 }).collect();
        let half = Tensor::from_vec(half, (1, 1, d, h, w), &Device::Cpu).unwrap();
        let top = f.narrow(2, 0, d / 2).unwrap();
        let mixed = Tensor::cat(&[&top, &g.narrow(2, d / 2, d - d / 2).unwrap()], 2).unwrap();
        assert!(ncc(&f, &mixed, &half) < ncc(&f, &mixed, &ones));
        // a 2D image (d = 1) has no window across the missing axis
        let flat = texture(1, 12, 11, 1);
        let ones2 = Tensor::ones((1, 1, 1, 12, 11), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(ncc(&flat, &flat.affine(3.0, -1.0).unwrap(), &ones2) < 1e-3);
    }

    #[test]
    fn the_displaced_samplers_inside_test_is_the_overlap_mask_of_its_points() {
        use segmentation::ops::{DisplacedSampler, Padding};
        let dev = Device::Cpu;
        let (d, h, w) = (4, 5, 6);
        let vol = Tensor::zeros((1, 1, d, h, w), candle_core::DType::F32, &dev).unwrap();
        let n = 50;
        // points spread beyond the extent along every axis
        let base: Vec<f32> = (0..3 * n).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 1.3).collect();
        let base = Tensor::from_vec(base, (1, n, 3), &dev).unwrap();
        let lin = Tensor::new(&[[0.1f32, 0.0, 0.02], [0.0, 0.12, 0.0], [0.01, 0.0, 0.15]], &dev).unwrap();
        let u: Vec<f32> = (0..3 * n).map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.2).collect();
        let u = Tensor::from_vec(u, (1, 3, n), &dev).unwrap();
        let s = DisplacedSampler::new(&vol, &base, &lin, Padding::Border).unwrap();
        let inside: Vec<f32> = s.inside(&u).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let expected: Vec<f32> =
            overlap_mask(&s.points(&u).unwrap(), (d, h, w)).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(inside, expected);
        let count = inside.iter().filter(|&&v| v == 1.0).count();
        assert!(count > 5 && count < n - 5, "{count} of {n} inside: the test must see both");
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
