//! Sampling a volume at displaced points `base + u · L` of a dense displacement `u`: the points
//! and the trilinear sampler in one op, differentiable in `u`.
//!
//! As candle ops the points cost a reshape, a transposed matrix product and a broadcast sum
//! forward, and as many full-size temporaries again backward; here they are formed on the fly
//! by the sampler's forward and its backward maps the point gradient straight back to `u`.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::sample::{self, border_taps, BorderTaps, Dims, Padding, Real};
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

/// The point `base + u · lin` of point `v` of a `(3, P)` displacement `u`.
#[inline(always)]
fn point_at<T: Real>(u: &[T], base: &[T], lin: &[T; 9], v: usize) -> [T; 3] {
    let np = base.len() / 3;
    let (a, b, c) = (u[v], u[np + v], u[2 * np + v]);
    std::array::from_fn(|k| base[3 * v + k] + (a * lin[k] + b * lin[3 + k] + c * lin[6 + k]))
}

fn points_of<T: Real>(u: &[T], base: &[T], lin: &[T; 9]) -> Vec<T> {
    let np = base.len() / 3;
    let mut p = vec![T::zero(); 3 * np];
    p.par_chunks_mut(3 * CHUNK).enumerate().for_each(|(ci, ch)| {
        for (q, o) in ch.chunks_mut(3).enumerate() {
            o.copy_from_slice(&point_at(u, base, lin, ci * CHUNK + q));
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

    /// 1 where the displaced point `base + u · lin` lies inside the volume's extent (half a
    /// voxel beyond the outer voxel centres; any distance along an axis of length 1), else 0:
    /// `(1, 1, P)` f32, constant. The test of `registration`'s `overlap_mask` on [`Self::points`]
    /// (the same f32 comparison), without forming the points.
    pub fn inside(&self, u: &Tensor) -> candle_core::Result<Tensor> {
        self.check(u)?;
        let Dims { d, h, w } = self.dims;
        let lim = [w, h, d].map(|n| if n > 1 { 1.0 + 1.0 / (n as f64 - 1.0) } else { f64::INFINITY }.min(1e30) as f32);
        fn run<T: Real>(u: &[T], base: &[T], lin: &[T; 9], lim: [f32; 3]) -> Vec<f32> {
            let np = base.len() / 3;
            let mut out = vec![0f32; np];
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, o)| {
                for (q, x) in o.iter_mut().enumerate() {
                    let p = point_at(u, base, lin, ci * CHUNK + q);
                    let ok = (0..3).all(|k| p[k].to_f32().is_some_and(|p| p.abs() <= lim[k]));
                    *x = if ok { 1.0 } else { 0.0 };
                }
            });
            out
        }
        let uf = u.detach().contiguous()?.flatten_all()?;
        let m = match &self.data {
            Data::F32 { base, lin, .. } => run(&uf.to_dtype(DType::F32)?.to_vec1::<f32>()?, base, lin, lim),
            Data::F64 { base, lin, .. } => run(&uf.to_dtype(DType::F64)?.to_vec1::<f64>()?, base, lin, lim),
        };
        Tensor::from_vec(m, (1, 1, self.points), u.device())
    }

    /// The volume at the displaced points, `(1, C, P)`, differentiable in `u`.
    pub fn sample(&self, u: &Tensor) -> candle_core::Result<Tensor> {
        self.sample_as(u, (1, self.channels, self.points).into())
    }

    /// [`Self::sample`] laid out as `shape` (`C·P` values, e.g. `(1, C, D, H, W)` when the
    /// points are a grid's voxels): a reshape afterwards would be another full-size node of
    /// the graph, whose gradient candle zero-fills and adds on every backward pass.
    pub fn sample_as(&self, u: &Tensor, shape: Shape) -> candle_core::Result<Tensor> {
        self.check(u)?;
        if shape.elem_count() != self.channels * self.points {
            return bail(format!(
                "displaced sampler: shape {shape:?} for {} channels of {} points",
                self.channels, self.points
            ));
        }
        let op = DisplacedOp { sampler: self.clone(), jacobian: Mutex::new(None), shape };
        u.contiguous()?.apply_op1_arc(Arc::new(Box::new(op)))
    }
}

/// The per-point sample gradients the forward computed, `(P, C, 3)`, in either precision.
enum Jacobian {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// One application of a [`DisplacedSampler`]: the forward keeps each sample's gradient with
/// respect to its point, which the backward then only weighs by the incoming gradient.
struct DisplacedOp {
    sampler: DisplacedSampler,
    jacobian: Mutex<Option<Jacobian>>,
    shape: Shape,
}

/// `d loss / d u` `(3, P)` from the incoming gradient `(C, P)` and the sample gradients `(P, C,
/// 3)` with respect to the normalised points.
fn weigh<T: Real>(jac: &[T], grad: &[T], c: usize, lin: &[T; 9]) -> Vec<T> {
    let np = grad.len() / c.max(1);
    let mut gp = vec![T::zero(); 3 * np];
    gp.par_chunks_mut(3 * CHUNK).enumerate().for_each(|(ci, o)| {
        for (q, g3) in o.chunks_mut(3).enumerate() {
            let v = ci * CHUNK + q;
            for ch in 0..c {
                let (go, j) = (grad[ch * np + v], &jac[(v * c + ch) * 3..][..3]);
                for a in 0..3 {
                    g3[a] = g3[a] + go * j[a];
                }
            }
        }
    });
    displacement_grad(&gp, lin)
}

impl CustomOp1 for DisplacedOp {
    fn name(&self) -> &'static str {
        "displaced-sample"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let sp = &self.sampler;
        let (c, dims, pad) = (sp.channels, sp.dims, sp.padding);
        let (st, jac) = match (s, &sp.data) {
            (CpuStorage::F32(u), Data::F32 { moving, base, lin }) => {
                let p = points_of(slice_of(u, l)?, base, lin);
                let (v, j) = sample::forward_jacobian(moving, &p, c, dims, pad);
                (CpuStorage::F32(v), Jacobian::F32(j))
            }
            (CpuStorage::F64(u), Data::F64 { moving, base, lin }) => {
                let p = points_of(slice_of(u, l)?, base, lin);
                let (v, j) = sample::forward_jacobian(moving, &p, c, dims, pad);
                (CpuStorage::F64(v), Jacobian::F64(j))
            }
            _ => return bail("displaced sampler: displacement and volume differ in precision"),
        };
        *self.jacobian.lock().unwrap_or_else(|e| e.into_inner()) = Some(jac);
        Ok((st, self.shape.clone()))
    }

    fn bwd(&self, u: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let sp = &self.sampler;
        let (c, dims, pad) = (sp.channels, sp.dims, sp.padding);
        let grad = grad.contiguous()?.flatten_all()?;
        let kept = self.jacobian.lock().unwrap_or_else(|e| e.into_inner()).take();
        // a second backward recomputes what the first one took
        let recompute = || -> candle_core::Result<Jacobian> {
            let uf = u.flatten_all()?;
            Ok(match &sp.data {
                Data::F32 { moving, base, lin } => {
                    let p = points_of(&uf.to_vec1::<f32>()?, base, lin);
                    Jacobian::F32(sample::forward_jacobian(moving, &p, c, dims, pad).1)
                }
                Data::F64 { moving, base, lin } => {
                    let p = points_of(&uf.to_vec1::<f64>()?, base, lin);
                    Jacobian::F64(sample::forward_jacobian(moving, &p, c, dims, pad).1)
                }
            })
        };
        let jac = match kept {
            Some(j) => j,
            None => recompute()?,
        };
        let g = match (&sp.data, jac) {
            (Data::F32 { lin, .. }, Jacobian::F32(j)) => weigh(&j, &grad.to_vec1::<f32>()?, c, lin),
            (Data::F64 { lin, .. }, Jacobian::F64(j)) => {
                return Ok(Some(Tensor::from_vec(weigh(&j, &grad.to_vec1::<f64>()?, c, lin), u.shape(), u.device())?))
            }
            _ => return bail("displaced sampler: gradient and volume differ in precision"),
        };
        Ok(Some(Tensor::from_vec(g, u.shape(), u.device())?))
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

    /// The trilinear taps of the point `base + u · lin` of voxel `v` of a `(3, P)` displacement.
    #[inline(always)]
    fn taps_at<T: Real>(&self, u: &[T], base: &[T], lin: &[T; 9], half: [T; 3], v: usize) -> BorderTaps<T> {
        border_taps(sample::to_voxel(&point_at(u, base, lin, v), half), self.dims)
    }

    /// `u + u(base + u · lin)` in one pass over the points, reading the three channel rows of `u`
    /// where they lie (the composed sampler first copied them channels-last, into fresh
    /// buffers, on every one of the six steps of every iteration), each by three rounds of lerps.
    fn run_fwd<T: Real>(&self, u: &[T], base: &[T]) -> Vec<T> {
        let lin = self.lin.map(T::of_f64);
        let (np, dims) = (base.len() / 3, self.dims);
        let half = dims.half_extent::<T>();
        let mut out = vec![T::zero(); 3 * np];
        let (o0, rest) = out.split_at_mut(np);
        let (o1, o2) = rest.split_at_mut(np);
        o0.par_chunks_mut(CHUNK).zip(o1.par_chunks_mut(CHUNK)).zip(o2.par_chunks_mut(CHUNK)).enumerate().for_each(
            |(ci, ((r0, r1), r2))| {
                for q in 0..r0.len() {
                    let v = ci * CHUNK + q;
                    let t = self.taps_at(u, base, &lin, half, v);
                    let acc: [T; 3] = std::array::from_fn(|ch| t.value(&u[ch * np..(ch + 1) * np]));
                    r0[q] = u[v] + acc[0];
                    r1[q] = u[np + v] + acc[1];
                    r2[q] = u[2 * np + v] + acc[2];
                }
            },
        );
        out
    }

    /// The step's backward in one pass over the points: each point's gradient through the
    /// sampled field's values (scattered to the corners, into one private accumulator per
    /// quarter of the points, summed in order whatever the thread count) and through its own
    /// position (gathered), then the identity.
    fn run_bwd<T: Real>(&self, u: &[T], base: &[T], g: &[T]) -> Vec<T> {
        const PARTS: usize = 4;
        let lin = self.lin.map(T::of_f64);
        let (np, dims) = (base.len() / 3, self.dims);
        let half = dims.half_extent::<T>();
        let step = np.div_ceil(PARTS).max(1);
        let mut through_points = vec![T::zero(); 3 * np];
        let parts: Vec<Vec<T>> = through_points
            .par_chunks_mut(3 * step)
            .enumerate()
            .map(|(part, tp)| {
                let mut acc = vec![T::zero(); 3 * np];
                for (q, o) in tp.chunks_mut(3).enumerate() {
                    let v = part * step + q;
                    let t = self.taps_at(u, base, &lin, half, v);
                    let mut gp = [T::zero(); 3];
                    for ch in 0..3 {
                        let go = g[ch * np + v];
                        let (_, d) = t.value_grad(&u[ch * np..(ch + 1) * np]);
                        gp = [gp[0] + d[0] * go, gp[1] + d[1] * go, gp[2] + d[2] * go];
                        t.scatter(&mut acc[ch * np..(ch + 1) * np], go);
                    }
                    let gp = [gp[0] * half[0], gp[1] * half[1], gp[2] * half[2]];
                    for (r, x) in o.iter_mut().enumerate() {
                        *x = lin[3 * r] * gp[0] + lin[3 * r + 1] * gp[1] + lin[3 * r + 2] * gp[2];
                    }
                }
                acc
            })
            .collect();
        // (P, 3) → (3, P), then the three terms, as the composed ops add them
        let mut out = vec![T::zero(); 3 * np];
        for (ch, row) in out.chunks_mut(np.max(1)).enumerate() {
            row.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, o)| {
                for (q, x) in o.iter_mut().enumerate() {
                    let v = ci * CHUNK + q;
                    let j = ch * np + v;
                    let through_values = parts.iter().fold(T::zero(), |s, p| s + p[j]);
                    *x = g[j] + (through_values + through_points[3 * v + ch]);
                }
            });
        }
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
