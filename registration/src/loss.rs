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

/// The deformable levels' regularisers of a field `v` `(1, C, d, h, w)` on a control grid as one
/// op: `smoothness ·` [`BsplinePenalty::eval`] `+ diffusion ·` [`diffusion`], value and gradient
/// in one pass (in f64 accumulators). Composed of candle ops they are some twenty nodes, each
/// a temporary that the backward zero-fills and adds into, on every iteration of every level.
#[derive(Debug, Clone)]
pub struct Regulariser {
    /// The smoothing operator and its transpose per axis `(d, h, w)`; `None` leaves it alone.
    /// (Shared: every evaluation hands the op a copy.)
    smooth: std::sync::Arc<[Option<(ops::AxisOperator, ops::AxisOperator)>; 3]>,
    dims: [usize; 3],
    /// `smoothness / voxel²` and `diffusion / voxel²`.
    weights: (f64, f64),
}

impl Regulariser {
    /// For fields on a `(d, h, w)` control grid of `voxel_mm`.
    pub fn new(penalty: &BsplinePenalty, smoothness: f64, diffusion: f64, dims: [usize; 3]) -> Self {
        let smooth: [_; 3] = std::array::from_fn(|a| {
            let (n, w) = (dims[a], penalty.width[a]);
            (n > 1 && w > 0.0).then(|| {
                let op = ops::AxisOperator::bspline_smooth(n, w);
                let t = op.transpose();
                (op, t)
            })
        });
        let v2 = penalty.voxel_mm * penalty.voxel_mm;
        Self { smooth: smooth.into(), dims, weights: (smoothness / v2, diffusion / v2) }
    }

    /// The regularisers of `v` `(1, C, d, h, w)`, differentiable in `v`.
    pub fn eval(&self, v: &Tensor) -> Result<Tensor> {
        let [d, h, w] = self.dims;
        if !matches!(*v.dims(), [1, _, dd, hh, ww] if [dd, hh, ww] == [d, h, w]) {
            let msg = format!("regulariser for (1, C, {d}, {h}, {w}) fields, got {:?}", v.dims());
            return Err(candle_core::Error::Msg(msg).into());
        }
        let op = RegulariserOp { reg: self.clone(), grad: std::sync::Mutex::new(None) };
        Ok(v.contiguous()?.apply_op1_arc(std::sync::Arc::new(Box::new(op)))?)
    }

    /// The value and the gradient of `x` (`C` rows of `d·h·w`).
    fn value_grad(&self, x: &[f64]) -> (f64, Vec<f64>) {
        let [d, h, w] = self.dims;
        let nv = d * h * w;
        let c = x.len() / nv.max(1);
        let n = x.len() as f64;
        let (ws, wd) = self.weights;
        let mut grad = vec![0.0f64; x.len()];
        let mut value = 0.0;
        // (outer, inner) of axis a of (C, d, h, w)
        let geom =
            |a: usize| (c * self.dims[..a].iter().product::<usize>(), self.dims[a + 1..].iter().product::<usize>());
        if ws != 0.0 {
            let mut s = x.to_vec();
            for (a, op) in self.smooth.iter().enumerate() {
                if let Some((op, _)) = op {
                    let (o, i) = geom(a);
                    s = op.apply(&s, o, i);
                }
            }
            let r: Vec<f64> = x.iter().zip(&s).map(|(a, b)| a - b).collect();
            value += ws * r.iter().map(|v| v * v).sum::<f64>() / n;
            let mut t = r.clone();
            for (a, op) in self.smooth.iter().enumerate().rev() {
                if let Some((_, tr)) = op {
                    let (o, i) = geom(a);
                    t = tr.apply(&t, o, i);
                }
            }
            let k = 2.0 * ws / n;
            grad.par_iter_mut().zip(r.par_iter().zip(t.par_iter())).for_each(|(g, (r, t))| *g += k * (r - t));
        }
        if wd != 0.0 {
            for a in 0..3 {
                let len = self.dims[a];
                if len < 2 {
                    continue;
                }
                let (outer, inner) = geom(a);
                let m = (outer * (len - 1) * inner) as f64;
                let k = 2.0 * wd / m;
                let mut sum = 0.0;
                for o in 0..outer {
                    for j in 0..len - 1 {
                        let (p, q) = ((o * len + j) * inner, (o * len + j + 1) * inner);
                        for i in 0..inner {
                            let diff = x[q + i] - x[p + i];
                            sum += diff * diff;
                            grad[q + i] += k * diff;
                            grad[p + i] -= k * diff;
                        }
                    }
                }
                value += wd * sum / m;
            }
        }
        (value, grad)
    }
}

struct RegulariserOp {
    reg: Regulariser,
    /// The forward's gradient, until the backward takes it.
    grad: std::sync::Mutex<Option<Vec<f64>>>,
}

impl candle_core::CustomOp1 for RegulariserOp {
    fn name(&self) -> &'static str {
        "regulariser"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        let x: Vec<f64> = match s {
            S::F32(v) => v[l.start_offset()..][..l.shape().elem_count()].iter().map(|&v| v as f64).collect(),
            S::F64(v) => v[l.start_offset()..][..l.shape().elem_count()].to_vec(),
            _ => return Err(candle_core::Error::Msg("regulariser supports f32 and f64".into())),
        };
        let (value, grad) = self.reg.value_grad(&x);
        *self.grad.lock().unwrap_or_else(|e| e.into_inner()) = Some(grad);
        let out = match s {
            S::F32(_) => S::F32(vec![value as f32]),
            _ => S::F64(vec![value]),
        };
        Ok((out, candle_core::Shape::from(())))
    }

    fn bwd(&self, v: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let scale = grad.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let kept = self.grad.lock().unwrap_or_else(|e| e.into_inner()).take();
        // a second backward recomputes what the first one took
        let g = match kept {
            Some(g) => g,
            None => self.reg.value_grad(&v.to_dtype(candle_core::DType::F64)?.flatten_all()?.to_vec1::<f64>()?).1,
        };
        let g: Vec<f64> = g.into_iter().map(|x| x * scale).collect();
        Tensor::from_vec(g, v.shape(), v.device())?.to_dtype(v.dtype()).map(Some)
    }
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
    fn the_fused_regulariser_is_the_composed_one_with_its_gradient() {
        use candle_core::{DType, Var};
        let dev = Device::Cpu;
        for (dims, width) in [([4usize, 5, 6], 2.0), ([1, 7, 5], 1.5)] {
            let [d, h, w] = dims;
            let n = 3 * d * h * w;
            let x: Vec<f64> = (0..n).map(|i| ((i * 7919 % 97) as f64 / 97.0 - 0.5) * 3.0).collect();
            let v = Tensor::from_vec(x, (1, 3, d, h, w), &dev).unwrap();
            let penalty = BsplinePenalty { width: [width; 3], voxel_mm: 2.5 };
            let (s, k) = (1.3, 0.7);
            let reg = Regulariser::new(&penalty, s, k, dims);
            let composed = |v: &Tensor| {
                ((penalty.eval(v).unwrap() * s).unwrap() + (diffusion(v, 2.5).unwrap() * k).unwrap()).unwrap()
            };
            let (va, vb) = (Var::from_tensor(&v).unwrap(), Var::from_tensor(&v).unwrap());
            let (a, b) = (reg.eval(va.as_tensor()).unwrap(), composed(vb.as_tensor()));
            let (a_val, b_val) = (a.to_scalar::<f64>().unwrap(), b.to_scalar::<f64>().unwrap());
            assert!(b_val > 0.1 && (a_val - b_val).abs() < 1e-12 * b_val, "{a_val} vs {b_val}");
            let ga =
                a.backward().unwrap().get(va.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let gb =
                b.backward().unwrap().get(vb.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let gmax = gb.iter().fold(0.0f64, |m, g| m.max(g.abs()));
            assert!(ga.iter().zip(&gb).all(|(a, b)| (a - b).abs() < 1e-12 * gmax.max(1.0)));
            // and against finite differences of the fused value itself
            let value = |x: &Tensor| reg.eval(x).unwrap().to_scalar::<f64>().unwrap();
            let flat = v.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for i in (0..n).step_by(7) {
                let at = |e: f64| {
                    let mut y = flat.clone();
                    y[i] += e;
                    value(&Tensor::from_vec(y, (1, 3, d, h, w), &dev).unwrap())
                };
                let fd = (at(1e-5) - at(-1e-5)) / 2e-5;
                assert!((fd - ga[i]).abs() < 1e-6 * gmax.max(1.0), "element {i}: {fd} vs {}", ga[i]);
            }
            // f32 fields as the levels hold them
            let r32 = reg.eval(&v.to_dtype(DType::F32).unwrap()).unwrap().to_scalar::<f32>().unwrap() as f64;
            assert!((r32 - a_val).abs() < 1e-5 * a_val);
        }
        let reg = Regulariser::new(&BsplinePenalty { width: [2.0; 3], voxel_mm: 1.0 }, 1.0, 1.0, [2, 3, 4]);
        assert!(reg.eval(&Tensor::zeros((1, 3, 2, 3, 5), DType::F32, &dev).unwrap()).is_err());
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
