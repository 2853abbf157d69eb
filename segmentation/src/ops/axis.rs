//! Separable linear operators along one tensor axis, with backward: average pooling, trilinear
//! resizing and B-spline smoothing are all built from this one op.
//!
//! An [`AxisOperator`] is a sparse `m × n` matrix applied along an axis: `y[j] = Σ w · x[s]`.
//! Its backward is the transpose, which is again an `AxisOperator`, so forward and backward share
//! one kernel.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use super::{bail, slice_of};

/// How a filter sees samples beyond the ends of the axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    /// Zeros (average pooling with `count_include_pad = true`).
    Zero,
    /// Odd reflection about the end sample (`x[-m] = 2·x[0] − x[m]`): a symmetric filter then
    /// leaves linear (hence affine) signals unchanged, up to the ends.
    Linear,
    /// Repeat the end sample.
    Replicate,
}

/// A sparse `m × n` operator: `rows[j]` lists `(source index, weight)`.
#[derive(Debug, Clone, PartialEq)]
pub struct AxisOperator {
    pub n_in: usize,
    pub rows: Vec<Vec<(usize, f64)>>,
}

impl AxisOperator {
    pub fn n_out(&self) -> usize {
        self.rows.len()
    }

    /// The transpose (`n × m`).
    pub fn transpose(&self) -> AxisOperator {
        let mut rows = vec![Vec::new(); self.n_in];
        for (j, row) in self.rows.iter().enumerate() {
            for &(s, w) in row {
                rows[s].push((j, w));
            }
        }
        for r in rows.iter_mut() {
            merge(r);
        }
        AxisOperator { n_in: self.n_out(), rows }
    }

    /// A correlation with `kernel` (centred at `kernel.len() / 2` unless `padding` says where the
    /// first tap sits), output `j` at input `j·stride − padding + t`.
    pub fn filter(n: usize, kernel: &[f64], stride: usize, padding: usize, boundary: Boundary) -> AxisOperator {
        let k = kernel.len();
        let stride = stride.max(1);
        let span = (n + 2 * padding).saturating_sub(k);
        let m = if n + 2 * padding >= k { span / stride + 1 } else { 0 };
        let rows = (0..m)
            .map(|j| {
                let mut row = Vec::with_capacity(k + 2);
                for (t, &w) in kernel.iter().enumerate() {
                    let s = (j * stride + t) as isize - padding as isize;
                    reflect(s, n, w, boundary, &mut row);
                }
                merge(&mut row);
                row
            })
            .collect();
        AxisOperator { n_in: n, rows }
    }

    /// Average pooling (zeros outside, divided by the full kernel size, as PyTorch's default).
    pub fn avg_pool(n: usize, kernel: usize, stride: usize, padding: usize) -> AxisOperator {
        let k = vec![1.0 / kernel as f64; kernel];
        Self::filter(n, &k, stride, padding, Boundary::Zero)
    }

    /// Linear interpolation of `n` samples at the `m` source positions `src(j)` (clamped to the
    /// ends).
    fn linear_at(n: usize, m: usize, src: impl Fn(usize) -> f64) -> AxisOperator {
        let rows = (0..m)
            .map(|j| {
                let x = src(j).clamp(0.0, (n - 1) as f64);
                let i0 = (x.floor() as usize).min(n - 1);
                let i1 = (i0 + 1).min(n - 1);
                let f = x - i0 as f64;
                let mut row = vec![(i0, 1.0 - f), (i1, f)];
                merge(&mut row);
                row
            })
            .collect();
        AxisOperator { n_in: n, rows }
    }

    /// Linear resizing to `m` samples with `align_corners = false` (PyTorch's `interpolate`).
    pub fn resize_linear(n: usize, m: usize) -> AxisOperator {
        let scale = n as f64 / m as f64;
        Self::linear_at(n, m, |j| (j as f64 + 0.5) * scale - 0.5)
    }

    /// Linear resizing to `m` samples with `align_corners = true`: the first and last samples of
    /// input and output coincide (the convention of the OBELISK sampling grid).
    pub fn resize_linear_aligned(n: usize, m: usize) -> AxisOperator {
        Self::linear_at(n, m, |j| if m > 1 { j as f64 * (n - 1) as f64 / (m - 1) as f64 } else { 0.0 })
    }

    /// Area-weighted resizing to `m` samples: output `j` averages the input over the interval it
    /// covers (`[j·n/m, (j+1)·n/m)` in voxel-edge units). Anti-aliased downsampling whose sample
    /// positions match [`AxisOperator::resize_linear`]'s.
    pub fn resize_area(n: usize, m: usize) -> AxisOperator {
        let scale = n as f64 / m as f64;
        let rows = (0..m)
            .map(|j| {
                let (lo, hi) = (j as f64 * scale, (j + 1) as f64 * scale);
                let mut row = Vec::new();
                let mut i = lo.floor() as usize;
                while (i as f64) < hi && i < n {
                    let overlap = (hi.min(i as f64 + 1.0) - lo.max(i as f64)).max(0.0);
                    if overlap > 0.0 {
                        row.push((i, overlap / scale));
                    }
                    i += 1;
                }
                merge(&mut row);
                row
            })
            .collect();
        AxisOperator { n_in: n, rows }
    }

    /// Smoothing by a cubic B-spline of `width` samples between knots (stride 1, linear
    /// extrapolation at the ends): the field's B-spline approximation used by the penalty.
    pub fn bspline_smooth(n: usize, width: f64) -> AxisOperator {
        let r = (2.0 * width).ceil() as isize;
        let mut kernel: Vec<f64> = (-r..=r).map(|t| cubic_bspline(t as f64 / width)).collect();
        let sum: f64 = kernel.iter().sum();
        kernel.iter_mut().for_each(|w| *w /= sum);
        Self::filter(n, &kernel, 1, r as usize, Boundary::Linear)
    }

    /// Applies the operator along the middle axis of `(outer, n, inner)` data.
    pub fn apply<T: Float + Send + Sync>(&self, x: &[T], outer: usize, inner: usize) -> Vec<T> {
        let (n, m) = (self.n_in, self.n_out());
        let rows: Vec<Vec<(usize, T)>> =
            self.rows.iter().map(|r| r.iter().map(|&(s, w)| (s, T::from(w).unwrap())).collect()).collect();
        let mut y = vec![T::zero(); outer * m * inner];
        let line = |o: usize, j: usize, dst: &mut [T]| {
            let base = o * n * inner;
            for &(s, w) in &rows[j] {
                let src = &x[base + s * inner..base + (s + 1) * inner];
                dst.iter_mut().zip(src).for_each(|(d, &v)| *d = *d + w * v);
            }
        };
        if inner == 1 {
            // the last axis: each output is a short dot product over one contiguous line, and
            // the per-output slice bookkeeping of `line` would cost more than the arithmetic
            let lines = (4096 / m.max(1)).max(1);
            y.par_chunks_mut(m * lines).zip(x.par_chunks(n * lines)).for_each(|(dst, src)| {
                for (d, s) in dst.chunks_mut(m).zip(src.chunks(n)) {
                    for (o, row) in d.iter_mut().zip(&rows) {
                        *o = row.iter().fold(T::zero(), |acc, &(i, w)| acc + w * s[i]);
                    }
                }
            });
        } else if inner >= 64 {
            y.par_chunks_mut(inner).enumerate().for_each(|(r, dst)| line(r / m, r % m, dst));
        } else if m * inner > 0 {
            y.par_chunks_mut(m * inner).enumerate().for_each(|(o, dst)| {
                for (j, d) in dst.chunks_mut(inner).enumerate() {
                    line(o, j, d);
                }
            });
        }
        y
    }
}

fn reflect(s: isize, n: usize, w: f64, boundary: Boundary, row: &mut Vec<(usize, f64)>) {
    let last = n as isize - 1;
    if (0..=last).contains(&s) {
        row.push((s as usize, w));
        return;
    }
    match boundary {
        Boundary::Zero => {}
        Boundary::Replicate => row.push((s.clamp(0, last) as usize, w)),
        Boundary::Linear => {
            let (edge, mirror) = if s < 0 { (0, -s) } else { (last, 2 * last - s) };
            row.push((edge as usize, 2.0 * w));
            row.push((mirror.clamp(0, last) as usize, -w));
        }
    }
}

fn merge(row: &mut Vec<(usize, f64)>) {
    row.sort_by_key(|e| e.0);
    let mut out: Vec<(usize, f64)> = Vec::with_capacity(row.len());
    for &(s, w) in row.iter() {
        match out.last_mut() {
            Some(l) if l.0 == s => l.1 += w,
            _ => out.push((s, w)),
        }
    }
    out.retain(|e| e.1 != 0.0);
    *row = out;
}

/// The centred cubic B-spline basis function.
pub fn cubic_bspline(t: f64) -> f64 {
    let a = t.abs();
    if a < 1.0 {
        (4.0 - 6.0 * a * a + 3.0 * a * a * a) / 6.0
    } else if a < 2.0 {
        (2.0 - a).powi(3) / 6.0
    } else {
        0.0
    }
}

/// The candle op: an [`AxisOperator`] applied along `axis`, with its transpose as backward.
#[derive(Debug, Clone)]
pub struct AxisLinear {
    pub axis: usize,
    pub op: Arc<AxisOperator>,
    pub transpose: Arc<AxisOperator>,
}

impl AxisLinear {
    pub fn new(axis: usize, op: AxisOperator) -> Self {
        let transpose = Arc::new(op.transpose());
        Self { axis, op: Arc::new(op), transpose }
    }
}

impl CustomOp1 for AxisLinear {
    fn name(&self) -> &'static str {
        "axis-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.dims();
        if self.axis >= dims.len() || dims[self.axis] != self.op.n_in {
            bail(format!("axis op: axis {} of {dims:?} must have length {}", self.axis, self.op.n_in))?;
        }
        let outer: usize = dims[..self.axis].iter().product();
        let inner: usize = dims[self.axis + 1..].iter().product();
        let mut out_dims = dims.to_vec();
        out_dims[self.axis] = self.op.n_out();
        let st = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.op.apply(slice_of(v, layout)?, outer, inner)),
            CpuStorage::F64(v) => CpuStorage::F64(self.op.apply(slice_of(v, layout)?, outer, inner)),
            _ => bail("axis op supports f32 and f64")?,
        };
        Ok((st, Shape::from(out_dims)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let t = AxisLinear { axis: self.axis, op: self.transpose.clone(), transpose: self.op.clone() };
        Ok(Some(grad.contiguous()?.apply_op1(t)?))
    }
}

/// Applies `op` along `axis` of `x` (differentiable).
pub fn along_axis(x: &Tensor, axis: usize, op: AxisOperator) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(AxisLinear::new(axis, op))
}

/// Applies, along each spatial axis `a` of `(B, C, D, H, W)` (0 = D), the operator `op(a, n)`
/// builds for that axis's current length `n`; `None` leaves the axis alone.
fn per_axis(x: &Tensor, op: impl Fn(usize, usize) -> Option<AxisOperator>) -> candle_core::Result<Tensor> {
    let mut y = x.clone();
    for a in 0..3 {
        if let Some(o) = op(a, y.dims()[2 + a]) {
            y = along_axis(&y, 2 + a, o)?;
        }
    }
    Ok(y)
}

/// 3D average pooling of `(B, C, D, H, W)` with per-axis `(d, h, w)` kernel, stride and padding.
pub fn avg_pool3d(
    x: &Tensor,
    kernel: [usize; 3],
    stride: [usize; 3],
    padding: [usize; 3],
) -> candle_core::Result<Tensor> {
    per_axis(x, |a, n| Some(AxisOperator::avg_pool(n, kernel[a], stride[a], padding[a])))
}

/// Mean over a `(2r+1)`-sample box centred on each sample of `(B, C, D, H, W)`, per axis `(d,
/// h, w)` radius, the ends replicated: a local mean that keeps the shape and, unlike zero
/// padding, maps an affine function of a signal to the same affine function of its mean.
pub fn box_filter3d(x: &Tensor, radius: [usize; 3]) -> candle_core::Result<Tensor> {
    per_axis(x, |a, n| {
        (radius[a] > 0).then(|| {
            let k = 2 * radius[a] + 1;
            AxisOperator::filter(n, &vec![1.0 / k as f64; k], 1, radius[a], Boundary::Replicate)
        })
    })
}

/// Trilinear resizing of `(B, C, D, H, W)` to `(d, h, w)` (`align_corners = false`).
pub fn resize_trilinear(x: &Tensor, size: [usize; 3]) -> candle_core::Result<Tensor> {
    per_axis(x, |a, n| (n != size[a]).then(|| AxisOperator::resize_linear(n, size[a])))
}

/// Trilinear resizing of `(B, C, D, H, W)` to `(d, h, w)` with `align_corners = true`.
pub fn resize_trilinear_aligned(x: &Tensor, size: [usize; 3]) -> candle_core::Result<Tensor> {
    per_axis(x, |a, n| (n != size[a]).then(|| AxisOperator::resize_linear_aligned(n, size[a])))
}

/// Resizing of `(B, C, D, H, W)` to `(d, h, w)` on the `align_corners = false` lattice: linear
/// interpolation along axes that grow, area averaging along axes that shrink.
pub fn resize(x: &Tensor, size: [usize; 3]) -> candle_core::Result<Tensor> {
    per_axis(x, |a, n| match n.cmp(&size[a]) {
        std::cmp::Ordering::Less => Some(AxisOperator::resize_linear(n, size[a])),
        std::cmp::Ordering::Greater => Some(AxisOperator::resize_area(n, size[a])),
        std::cmp::Ordering::Equal => None,
    })
}

/// Cubic B-spline smoothing of `(B, C, D, H, W)` with knot spacing `width` (in samples) per axis
/// `(d, h, w)`; axes of length 1 are left alone.
pub fn bspline_smooth3d(x: &Tensor, width: [f64; 3]) -> candle_core::Result<Tensor> {
    per_axis(x, |a, n| (n > 1 && width[a] > 0.0).then(|| AxisOperator::bspline_smooth(n, width[a])))
}
