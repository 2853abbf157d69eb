//! The OBELISK layer's sampling as one differentiable op: the input sampled at `p + A_p·o_s` for
//! every point `p` and offset `o_s` (optionally with a per-point kernel warp `A_p`), the binary
//! difference taken, laid out as `(B, C·K, P)`.
//!
//! Built from candle tensor ops the same thing materialises `(B, P·S, 3)` coordinates and their
//! gradient several times (broadcast add, transpose, matmul, and a zero-filled accumulator plus an
//! add per node in candle's backprop); here the coordinates exist once per call and their gradient
//! is reduced straight to the offsets and the points. The trilinear sampling itself is
//! [`super::sample`]'s.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use super::sample::{
    axis_taps, backward_input, backward_points, gather, sample_point, to_voxel, Dims, Interpolation, Padding, Real,
    Taps,
};
use super::{bail, slice_of};

/// The op: `input (B, C, D, H, W)`, `points (B, P, 3)`, `offsets (S, 3)` → `(B, C·K, P)` with
/// `K = S/2` (binary: channel `c·K + k` is `x_c(p + A o_k) − x_c(p + A o_{K+k})`) or `K = S`.
#[derive(Debug, Clone)]
struct KernelSample {
    binary: bool,
    /// `(B, P, 3, 3)` per-point kernel warps, not differentiated (an augmentation).
    affine: Option<Tensor>,
}

/// Sizes of one call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    c: usize,
    dims: Dims,
    p: usize,
    s: usize,
    k: usize,
}

impl KernelSample {
    fn geometry(&self, li: &Layout, lp: &Layout, lo: &Layout) -> candle_core::Result<Geometry> {
        let (b, c, d, h, w) = match *li.dims() {
            [b, c, d, h, w] => (b, c, d, h, w),
            ref s => bail(format!("kernel sample: input must be (B, C, D, H, W), got {s:?}"))?,
        };
        let p = match *lp.dims() {
            [pb, p, 3] if pb == b => p,
            ref s => bail(format!("kernel sample: points must be ({b}, P, 3), got {s:?}"))?,
        };
        let s = match *lo.dims() {
            [s, 3] if s > 0 && (!self.binary || s % 2 == 0) => s,
            ref s => bail(format!("kernel sample: offsets must be (S, 3) with S even if binary, got {s:?}"))?,
        };
        if d * h * w == 0 {
            bail("kernel sample: empty input volume")?;
        }
        if let Some(a) = &self.affine {
            if a.dims() != [b, p, 3, 3] {
                bail(format!("kernel sample: affines must be ({b}, {p}, 3, 3), got {:?}", a.dims()))?;
            }
        }
        Ok(Geometry { b, c, dims: Dims { d, h, w }, p, s, k: if self.binary { s / 2 } else { s } })
    }

    fn affine_values<T: Float>(&self) -> candle_core::Result<Option<Vec<T>>> {
        match &self.affine {
            None => Ok(None),
            Some(a) => {
                let v: Vec<f64> = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
                Ok(Some(v.into_iter().map(|x| T::from(x).unwrap_or(T::zero())).collect()))
            }
        }
    }
}

/// One sampling position: `point + A · offset` (no warp: `point + offset`). Forward and backward
/// both go through it, so they see the same position to the last bit.
#[inline(always)]
fn kernel_position<T: Float>(pt: &[T], a: Option<&[T]>, o: &[T]) -> [T; 3] {
    let mut c = [T::zero(); 3];
    for r in 0..3 {
        let warped = match a {
            Some(a) => a[3 * r] * o[0] + a[3 * r + 1] * o[1] + a[3 * r + 2] * o[2],
            None => o[r],
        };
        c[r] = pt[r] + warped;
    }
    c
}

/// All sampling coordinates, `(B, P, S, 3)` flattened: `points[b, p] + A[b, p] · offsets[s]`.
fn coordinates<T: Float + Send + Sync>(g: Geometry, points: &[T], offsets: &[T], affine: Option<&[T]>) -> Vec<T> {
    let mut out = vec![T::zero(); g.b * g.p * g.s * 3];
    out.par_chunks_mut(g.s * 3).enumerate().for_each(|(bp, row)| {
        let pt = &points[3 * bp..3 * bp + 3];
        let a = affine.map(|a| &a[9 * bp..9 * bp + 9]);
        for (o, dst) in offsets.chunks_exact(3).zip(row.chunks_exact_mut(3)) {
            dst.copy_from_slice(&kernel_position(pt, a, o));
        }
    });
    out
}

/// The forward pass straight into the layer layout `(B, C·K, P)`: one task per output row
/// `(b, c, k)` walks the points with that row's offset(s) fixed. No `(B, P, S, 3)` coordinates
/// are materialised (at 36³ points and 2048 offsets they would be 1.1 GB), and for points in
/// raster order (inference on a grid) consecutive samples of a row are neighbours in the volume.
fn forward_rows<T: Real>(
    g: Geometry,
    binary: bool,
    input: &[T],
    points: &[T],
    offsets: &[T],
    affine: Option<&[T]>,
) -> Vec<T> {
    let half = g.dims.half_extent::<T>();
    let vsz = g.dims.len();
    let (lin, pad) = (Interpolation::Linear, Padding::Zeros);
    let mut out = vec![T::zero(); g.b * g.c * g.k * g.p];
    out.par_chunks_mut(g.p.max(1)).enumerate().for_each(|(row, o)| {
        let (bc, k) = (row / g.k, row % g.k);
        let bi = bc / g.c;
        let vol = &input[bc * vsz..(bc + 1) * vsz];
        let first = &offsets[3 * k..3 * k + 3];
        let second = binary.then(|| &offsets[3 * (g.k + k)..3 * (g.k + k) + 3]);
        for (p, dst) in o.iter_mut().enumerate() {
            let bp = bi * g.p + p;
            let pt = &points[3 * bp..3 * bp + 3];
            let a = affine.map(|a| &a[9 * bp..9 * bp + 9]);
            let at = |o: &[T]| to_voxel(&kernel_position(pt, a, o), half);
            let mut v = sample_point(vol, g.dims, at(first), lin, pad);
            if let Some(second) = second {
                v = v - sample_point(vol, g.dims, at(second), lin, pad);
            }
            *dst = v;
        }
    });
    out
}

/// The layer-layout gradient `(B, C·K, P)` → per-sample gradient `(B, C, P·S)`.
fn to_sample_layout<T: Float + Send + Sync>(g: Geometry, binary: bool, grad: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); g.b * g.c * g.p * g.s];
    out.par_chunks_mut(g.p * g.s).enumerate().for_each(|(bc, o)| {
        let src = &grad[bc * g.k * g.p..(bc + 1) * g.k * g.p];
        for (p, row) in o.chunks_exact_mut(g.s).enumerate() {
            for k in 0..g.k {
                let v = src[k * g.p + p];
                row[k] = v;
                if binary {
                    row[g.k + k] = -v;
                }
            }
        }
    });
    out
}

impl CustomOp3 for KernelSample {
    fn name(&self) -> &'static str {
        "obelisk-kernel-sample"
    }

    fn cpu_fwd(
        &self,
        si: &CpuStorage,
        li: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
        so: &CpuStorage,
        lo: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geometry(li, lp, lo)?;
        macro_rules! run {
            ($x:expr, $p:expr, $o:expr) => {{
                let aff = self.affine_values()?;
                forward_rows(g, self.binary, slice_of($x, li)?, slice_of($p, lp)?, slice_of($o, lo)?, aff.as_deref())
            }};
        }
        let st = match (si, sp, so) {
            (CpuStorage::F32(x), CpuStorage::F32(p), CpuStorage::F32(o)) => CpuStorage::F32(run!(x, p, o)),
            (CpuStorage::F64(x), CpuStorage::F64(p), CpuStorage::F64(o)) => CpuStorage::F64(run!(x, p, o)),
            _ => bail("kernel sample: input, points and offsets must all be f32 or all f64")?,
        };
        Ok((st, Shape::from((g.b, g.c * g.k, g.p))))
    }

    fn bwd(
        &self,
        input: &Tensor,
        points: &Tensor,
        offsets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gi = if input.track_op() {
            let op = KernelSampleGrad { op: self.clone(), grad: grad.clone(), wrt_input: true };
            Some(input.apply_op3_no_bwd(points, offsets, &op)?)
        } else {
            None
        };
        let (gp, go) = if points.track_op() || offsets.track_op() {
            let op = KernelSampleGrad { op: self.clone(), grad, wrt_input: false };
            let packed = input.apply_op3_no_bwd(points, offsets, &op)?;
            let n = points.elem_count();
            let gp = packed.narrow(0, 0, n)?.reshape(points.shape())?;
            let go = packed.narrow(0, n, offsets.elem_count())?.reshape(offsets.shape())?;
            (points.track_op().then_some(gp), offsets.track_op().then_some(go))
        } else {
            (None, None)
        };
        Ok((gi, gp, go))
    }
}

/// Backward of [`KernelSample`] on `(input, points, offsets)`: the input gradient, or the points
/// and offsets gradients packed into one vector (points first).
struct KernelSampleGrad {
    op: KernelSample,
    grad: Tensor,
    wrt_input: bool,
}

/// Reduces coordinate gradients `(B, P, S, 3)` to the points `(B, P, 3)` (sum over the kernel)
/// and the offsets `(S, 3)` (`Σ_{b,p} A_bpᵀ · g`); every sum runs in a fixed order.
fn reduce_coordinate_grads<T: Float + Send + Sync>(g: Geometry, cg: &[T], affine: Option<&[T]>) -> Vec<T> {
    let np = g.b * g.p;
    let mut out = vec![T::zero(); np * 3 + g.s * 3];
    let (gp, go) = out.split_at_mut(np * 3);
    gp.par_chunks_mut(3).enumerate().for_each(|(bp, acc)| {
        for c in cg[bp * g.s * 3..(bp + 1) * g.s * 3].chunks_exact(3) {
            for a in 0..3 {
                acc[a] = acc[a] + c[a];
            }
        }
    });
    go.par_chunks_mut(3).enumerate().for_each(|(s, acc)| {
        for bp in 0..np {
            let c = &cg[(bp * g.s + s) * 3..(bp * g.s + s) * 3 + 3];
            match affine {
                // d(A o)/d o = Aᵀ
                Some(a) => {
                    let a = &a[9 * bp..9 * bp + 9];
                    for col in 0..3 {
                        acc[col] = acc[col] + a[col] * c[0] + a[3 + col] * c[1] + a[6 + col] * c[2];
                    }
                }
                None => {
                    for r in 0..3 {
                        acc[r] = acc[r] + c[r];
                    }
                }
            }
        }
    });
    out
}

impl CustomOp3 for KernelSampleGrad {
    fn name(&self) -> &'static str {
        "obelisk-kernel-sample-grad"
    }

    fn cpu_fwd(
        &self,
        si: &CpuStorage,
        li: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
        so: &CpuStorage,
        lo: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.op.geometry(li, lp, lo)?;
        let binary = self.op.binary;
        let (lin, pad) = (Interpolation::Linear, Padding::Zeros);
        let (gs, gl) = self.grad.storage_and_layout();
        macro_rules! run {
            ($x:expr, $p:expr, $o:expr, $variant:ident) => {{
                let aff = self.op.affine_values()?;
                let coords = coordinates(g, slice_of($p, lp)?, slice_of($o, lo)?, aff.as_deref());
                let grad = match &*gs {
                    candle_core::Storage::Cpu(CpuStorage::$variant(v)) => to_sample_layout(g, binary, slice_of(v, gl)?),
                    _ => bail("kernel sample backward: gradient of another dtype or device")?,
                };
                if self.wrt_input {
                    backward_input(&coords, &grad, g.b, g.c, g.dims, lin, pad)
                } else {
                    let cg = backward_points(slice_of($x, li)?, &coords, &grad, g.b, g.c, g.dims, lin, pad);
                    reduce_coordinate_grads(g, &cg, aff.as_deref())
                }
            }};
        }
        let (st, n) = match (si, sp, so) {
            (CpuStorage::F32(x), CpuStorage::F32(p), CpuStorage::F32(o)) => {
                let v = run!(x, p, o, F32);
                let n = v.len();
                (CpuStorage::F32(v), n)
            }
            (CpuStorage::F64(x), CpuStorage::F64(p), CpuStorage::F64(o)) => {
                let v = run!(x, p, o, F64);
                let n = v.len();
                (CpuStorage::F64(v), n)
            }
            _ => bail("kernel sample backward: mixed dtypes")?,
        };
        let shape = if self.wrt_input { li.shape().clone() } else { Shape::from(n) };
        Ok((st, shape))
    }
}

/// OBELISK kernel sampling: `input (B, C, D, H, W)` at `points (B, P, 3) + A·offsets (S, 3)`
/// (normalised, `align_corners = true`, zero padding) → `(B, C·K, P)`, channel `c·K + k`;
/// `binary` takes `K = S/2` differences `o_k − o_{K+k}`. `affine (B, P, 3, 3)` warps each point's
/// kernel. Differentiable in the input, the points and the offsets.
pub fn kernel_sample(
    input: &Tensor,
    points: &Tensor,
    offsets: &Tensor,
    affine: Option<&Tensor>,
    binary: bool,
) -> candle_core::Result<Tensor> {
    let dt = input.dtype();
    if !matches!(dt, DType::F32 | DType::F64) {
        bail("kernel sample supports f32 and f64")?;
    }
    let affine = affine.map(|a| a.to_dtype(dt)?.contiguous()).transpose()?;
    let points = points.to_dtype(dt)?.contiguous()?;
    let offsets = offsets.to_dtype(dt)?.contiguous()?;
    input.contiguous()?.apply_op3(&points, &offsets, KernelSample { binary, affine })
}

/// Position of grid index `i` of `n` on the `align_corners = true` lattice of `[-1, 1]` (the
/// values of `crate::obelisk::regular_grid`).
fn grid_axis(n: usize, i: usize) -> f64 {
    if n > 1 {
        -1.0 + 2.0 * i as f64 / (n - 1) as f64
    } else {
        0.0
    }
}

/// Forward-only kernel sampling at a run of points of a regular grid (see [`kernel_sample_grid`]).
#[derive(Debug, Clone)]
struct KernelSampleGrid {
    binary: bool,
    /// Grid size `(d, h, w)`.
    size: [usize; 3],
    start: usize,
    len: usize,
}

impl KernelSampleGrid {
    fn rows<T: Real>(&self, g: Geometry, input: &[T], offsets: &[T]) -> Vec<T> {
        let half = g.dims.half_extent::<T>();
        let [gd, gh, gw] = self.size;
        let (lin, pad) = (Interpolation::Linear, Padding::Zeros);
        // per axis, the taps of every grid index shifted by one offset: on a grid the position is
        // separable, so each sample needs no floor, clamp or branch of its own
        let taps = |o: &[T]| -> [Vec<Taps<T>>; 3] {
            let axis = |n: usize, len: usize, a: usize| -> Vec<Taps<T>> {
                (0..n)
                    .map(|i| axis_taps((T::of_f64(grid_axis(n, i)) + o[a] + T::one()) * half[a], len, lin, pad))
                    .collect()
            };
            [axis(gw, g.dims.w, 0), axis(gh, g.dims.h, 1), axis(gd, g.dims.d, 2)]
        };
        let vsz = g.dims.len();
        let mut out = vec![T::zero(); g.b * g.c * g.k * self.len];
        out.par_chunks_mut(self.len.max(1)).enumerate().for_each(|(row, o)| {
            let (bc, k) = (row / g.k, row % g.k);
            let vol = &input[bc * vsz..(bc + 1) * vsz];
            let first = taps(&offsets[3 * k..3 * k + 3]);
            let second = self.binary.then(|| taps(&offsets[3 * (g.k + k)..3 * (g.k + k) + 3]));
            for (q, dst) in o.iter_mut().enumerate() {
                let p = self.start + q;
                let (i, j, l) = (p % gw, (p / gw) % gh, p / (gw * gh));
                let mut v = gather(vol, g.dims, &[first[0][i], first[1][j], first[2][l]]);
                if let Some(s) = &second {
                    v = v - gather(vol, g.dims, &[s[0][i], s[1][j], s[2][l]]);
                }
                *dst = v;
            }
        });
        out
    }
}

impl CustomOp2 for KernelSampleGrid {
    fn name(&self) -> &'static str {
        "obelisk-kernel-sample-grid"
    }

    fn cpu_fwd(
        &self,
        si: &CpuStorage,
        li: &Layout,
        so: &CpuStorage,
        lo: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, d, h, w) = match *li.dims() {
            [b, c, d, h, w] => (b, c, d, h, w),
            ref s => bail(format!("kernel sample grid: input must be (B, C, D, H, W), got {s:?}"))?,
        };
        let s = match *lo.dims() {
            [s, 3] if s > 0 && (!self.binary || s % 2 == 0) => s,
            ref s => bail(format!("kernel sample grid: offsets must be (S, 3) with S even if binary, got {s:?}"))?,
        };
        let n: usize = self.size.iter().product();
        if d * h * w == 0 || self.start + self.len > n {
            bail(format!("kernel sample grid: points {}..{} of a grid of {n}", self.start, self.start + self.len))?;
        }
        let k = if self.binary { s / 2 } else { s };
        let g = Geometry { b, c, dims: Dims { d, h, w }, p: self.len, s, k };
        let st = match (si, so) {
            (CpuStorage::F32(x), CpuStorage::F32(o)) => {
                CpuStorage::F32(self.rows(g, slice_of(x, li)?, slice_of(o, lo)?))
            }
            (CpuStorage::F64(x), CpuStorage::F64(o)) => {
                CpuStorage::F64(self.rows(g, slice_of(x, li)?, slice_of(o, lo)?))
            }
            _ => bail("kernel sample grid: input and offsets must both be f32 or both f64")?,
        };
        Ok((st, Shape::from((b, c * k, self.len))))
    }
}

/// [`kernel_sample`] at the points `start..start + len` (raster order, `w` fastest) of the regular
/// `align_corners = true` grid of `size = (d, h, w)`, with no kernel warp: the same values, several
/// times fewer operations per sample. Inference only: it has no backward pass (train through
/// [`kernel_sample`]).
pub fn kernel_sample_grid(
    input: &Tensor,
    size: [usize; 3],
    start: usize,
    len: usize,
    offsets: &Tensor,
    binary: bool,
) -> candle_core::Result<Tensor> {
    let dt = input.dtype();
    if !matches!(dt, DType::F32 | DType::F64) {
        bail("kernel sample supports f32 and f64")?;
    }
    let offsets = offsets.to_dtype(dt)?.contiguous()?.detach();
    input.contiguous()?.detach().apply_op2_no_bwd(&offsets, &KernelSampleGrid { binary, size, start, len })
}
