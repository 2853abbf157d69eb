//! Sampling a volume at displaced points `base + u · L` of a dense displacement `u`: the points
//! and the trilinear sampler in one op, differentiable in `u`.
//!
//! As candle ops the points cost a reshape, a transposed matrix product and a broadcast sum
//! forward, and as many full-size temporaries again backward; here they are formed on the fly
//! by the sampler's forward and its backward maps the point gradient straight back to `u`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::sample::{self, Dims, Interpolation, Padding, Real};
use super::{bail, slice_of};

const CHUNK: usize = 4096;

#[derive(Debug, Clone)]
enum Data {
    F32 { moving: Arc<Vec<f32>>, base: Arc<Vec<f32>>, lin: [f32; 9] },
    F64 { moving: Arc<Vec<f64>>, base: Arc<Vec<f64>>, lin: [f64; 9] },
}

/// A volume `(1, C, D, H, W)` sampled (trilinearly, with `padding`) at `base + u · lin` for a
/// displacement `u` `(1, 3, …)` of `P` values per component: the points `(P, 3)` are `base`
/// plus the displacement's `(P, 3)` transpose times the `(3, 3)` matrix `lin` (row-major).
#[derive(Debug, Clone)]
pub struct DisplacedSampler {
    data: Data,
    channels: usize,
    dims: Dims,
    points: usize,
    padding: Padding,
}

fn points_of<T: Real>(u: &[T], base: &[T], lin: &[T; 9]) -> Vec<T> {
    let np = base.len() / 3;
    let mut p = vec![T::zero(); 3 * np];
    p.par_chunks_mut(3 * CHUNK).enumerate().for_each(|(ci, ch)| {
        for (q, o) in ch.chunks_mut(3).enumerate() {
            let v = ci * CHUNK + q;
            let (a, b, c) = (u[v], u[np + v], u[2 * np + v]);
            for k in 0..3 {
                o[k] = base[3 * v + k] + (a * lin[k] + b * lin[3 + k] + c * lin[6 + k]);
            }
        }
    });
    p
}

/// The displacement gradient `(3, P)` from the point gradient `(P, 3)`.
fn displacement_grad<T: Real>(gp: &[T], lin: &[T; 9]) -> Vec<T> {
    let np = gp.len() / 3;
    let mut g = vec![T::zero(); 3 * np];
    for (r, gr) in g.chunks_mut(np.max(1)).enumerate() {
        gr.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, o)| {
            for (q, x) in o.iter_mut().enumerate() {
                let v = ci * CHUNK + q;
                *x = lin[3 * r] * gp[3 * v] + lin[3 * r + 1] * gp[3 * v + 1] + lin[3 * r + 2] * gp[3 * v + 2];
            }
        });
    }
    g
}

impl DisplacedSampler {
    /// `moving` `(1, C, D, H, W)`, `base` `(1, P, 3)` normalised points, `lin` `(3, 3)`; all of
    /// `moving`'s precision (f32 or f64).
    pub fn new(moving: &Tensor, base: &Tensor, lin: &Tensor, padding: Padding) -> candle_core::Result<Self> {
        let (b, c, d, h, w) = moving.dims5()?;
        let (bb, np, three) = base.dims3()?;
        if b != 1 || bb != 1 || three != 3 || lin.dims() != [3, 3] {
            return bail(format!(
                "displaced sampler: moving {:?}, base {:?}, matrix {:?}",
                moving.dims(),
                base.dims(),
                lin.dims()
            ));
        }
        if d * h * w == 0 {
            return bail("displaced sampler: empty volume");
        }
        let data = match moving.dtype() {
            DType::F32 => {
                let l: Vec<f32> = lin.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                Data::F32 {
                    moving: moving.flatten_all()?.to_vec1::<f32>()?.into(),
                    base: base.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.into(),
                    lin: std::array::from_fn(|i| l[i]),
                }
            }
            DType::F64 => {
                let l: Vec<f64> = lin.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
                Data::F64 {
                    moving: moving.flatten_all()?.to_vec1::<f64>()?.into(),
                    base: base.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?.into(),
                    lin: std::array::from_fn(|i| l[i]),
                }
            }
            _ => return bail("displaced sampler supports f32 and f64"),
        };
        Ok(Self { data, channels: c, dims: Dims { d, h, w }, points: np, padding })
    }

    fn check(&self, u: &Tensor) -> candle_core::Result<()> {
        if u.elem_count() != 3 * self.points || u.dims().first() != Some(&1) || u.dims().get(1) != Some(&3) {
            return bail(format!("displaced sampler: displacement {:?} for {} points", u.dims(), self.points));
        }
        Ok(())
    }

    /// The sampling points `(1, P, 3)` for displacement `u` (not differentiable).
    pub fn points(&self, u: &Tensor) -> candle_core::Result<Tensor> {
        self.check(u)?;
        let u = u.detach().contiguous()?.flatten_all()?;
        let p = match &self.data {
            Data::F32 { base, lin, .. } => Tensor::from_vec(
                points_of(&u.to_dtype(DType::F32)?.to_vec1::<f32>()?, base, lin),
                (1, self.points, 3),
                u.device(),
            )?,
            Data::F64 { base, lin, .. } => Tensor::from_vec(
                points_of(&u.to_dtype(DType::F64)?.to_vec1::<f64>()?, base, lin),
                (1, self.points, 3),
                u.device(),
            )?,
        };
        Ok(p)
    }

    /// The volume at the displaced points, `(1, C, P)`, differentiable in `u`.
    pub fn sample(&self, u: &Tensor) -> candle_core::Result<Tensor> {
        self.check(u)?;
        u.contiguous()?.apply_op1(self.clone())
    }
}

impl CustomOp1 for DisplacedSampler {
    fn name(&self) -> &'static str {
        "displaced-sample"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, dims, pad) = (self.channels, self.dims, self.padding);
        let st = match (s, &self.data) {
            (CpuStorage::F32(u), Data::F32 { moving, base, lin }) => {
                let p = points_of(slice_of(u, l)?, base, lin);
                CpuStorage::F32(sample::forward(moving, &p, 1, c, dims, Interpolation::Linear, pad))
            }
            (CpuStorage::F64(u), Data::F64 { moving, base, lin }) => {
                let p = points_of(slice_of(u, l)?, base, lin);
                CpuStorage::F64(sample::forward(moving, &p, 1, c, dims, Interpolation::Linear, pad))
            }
            _ => return bail("displaced sampler: displacement and volume differ in precision"),
        };
        Ok((st, Shape::from((1, c, self.points))))
    }

    fn bwd(&self, u: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (c, dims, pad) = (self.channels, self.dims, self.padding);
        let grad = grad.contiguous()?.flatten_all()?;
        let uf = u.flatten_all()?;
        macro_rules! run {
            ($t:ty, $moving:expr, $base:expr, $lin:expr) => {{
                let p = points_of(&uf.to_vec1::<$t>()?, $base, $lin);
                let gp = sample::backward_points(
                    $moving,
                    &p,
                    &grad.to_vec1::<$t>()?,
                    1,
                    c,
                    dims,
                    Interpolation::Linear,
                    pad,
                );
                Tensor::from_vec(displacement_grad(&gp, $lin), u.shape(), u.device())?
            }};
        }
        let g = match &self.data {
            Data::F32 { moving, base, lin } => run!(f32, moving, base, lin),
            Data::F64 { moving, base, lin } => run!(f64, moving, base, lin),
        };
        Ok(Some(g))
    }
}

/// One scaling-and-squaring step `u ↦ u + u(base + u · lin)` of a displacement `(1, 3, D, H,
/// W)` sampled on its own grid (trilinear, border padding), as one op: the composition of
/// candle ops it replaces (points, sampler, sum) holds about ten temporaries per step, and the
/// exponential takes six steps every iteration.
#[derive(Debug, Clone)]
pub struct SquaringStep {
    base: Arc<Vec<f64>>,
    base32: Arc<Vec<f32>>,
    lin: [f64; 9],
    dims: Dims,
}

impl SquaringStep {
    /// `base` `(1, P, 3)`: the normalised points of the grid's voxels; `lin` `(3, 3)`: the map
    /// from displacements to normalised offsets; `dims` `(d, h, w)` with `d·h·w = P`.
    pub fn new(base: &Tensor, lin: &Tensor, dims: [usize; 3]) -> candle_core::Result<Self> {
        let [d, h, w] = dims;
        if base.dims() != [1, d * h * w, 3] || lin.dims() != [3, 3] || d * h * w == 0 {
            return bail(format!("squaring step: base {:?}, matrix {:?} for {dims:?}", base.dims(), lin.dims()));
        }
        let b: Vec<f64> = base.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let l: Vec<f64> = lin.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let base32 = base.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self { base: b.into(), base32: base32.into(), lin: std::array::from_fn(|i| l[i]), dims: Dims { d, h, w } })
    }

    /// `u + u(base + u · lin)`, differentiable in `u`.
    pub fn apply(&self, u: &Tensor) -> candle_core::Result<Tensor> {
        let [d, h, w] = [self.dims.d, self.dims.h, self.dims.w];
        if u.dims() != [1, 3, d, h, w] {
            return bail(format!("squaring step: displacement {:?} for {:?}", u.dims(), [d, h, w]));
        }
        u.contiguous()?.apply_op1(self.clone())
    }

    fn run_fwd<T: Real>(&self, u: &[T], base: &[T]) -> Vec<T> {
        let lin = self.lin.map(T::of_f64);
        let p = points_of(u, base, &lin);
        let mut s = sample::forward(u, &p, 1, 3, self.dims, Interpolation::Linear, Padding::Border);
        s.iter_mut().zip(u).for_each(|(s, &u)| *s = u + *s);
        s
    }

    fn run_bwd<T: Real>(&self, u: &[T], base: &[T], g: &[T]) -> Vec<T> {
        let lin = self.lin.map(T::of_f64);
        let (pad, lin_i) = (Padding::Border, Interpolation::Linear);
        let p = points_of(u, base, &lin);
        // through the sampled volume, through the points, and the identity
        let gi = sample::backward_input(&p, g, 1, 3, self.dims, lin_i, pad);
        let gp = sample::backward_points(u, &p, g, 1, 3, self.dims, lin_i, pad);
        let mut out = displacement_grad(&gp, &lin);
        out.par_iter_mut().zip(gi.par_iter().zip(g.par_iter())).for_each(|(o, (&a, &b))| *o = b + (a + *o));
        out
    }
}

impl CustomOp1 for SquaringStep {
    fn name(&self) -> &'static str {
        "squaring-step"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let st = match s {
            CpuStorage::F32(u) => CpuStorage::F32(self.run_fwd(slice_of(u, l)?, &self.base32)),
            CpuStorage::F64(u) => CpuStorage::F64(self.run_fwd(slice_of(u, l)?, &self.base)),
            _ => return bail("squaring step supports f32 and f64"),
        };
        Ok((st, l.shape().clone()))
    }

    fn bwd(&self, u: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?.flatten_all()?;
        let uf = u.flatten_all()?;
        let g = match u.dtype() {
            DType::F32 => self.run_bwd(&uf.to_vec1::<f32>()?, &self.base32, &grad.to_vec1::<f32>()?),
            DType::F64 => {
                return Tensor::from_vec(
                    self.run_bwd(&uf.to_vec1::<f64>()?, &self.base, &grad.to_vec1::<f64>()?),
                    u.shape(),
                    u.device(),
                )
                .map(Some)
            }
            _ => return bail("squaring step supports f32 and f64"),
        };
        Ok(Some(Tensor::from_vec(g, u.shape(), u.device())?))
    }
}
