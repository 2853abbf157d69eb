//! Differentiable sampling of 3D volumes at continuous points (candle has no `grid_sample`).
//!
//! [`grid_sample`] takes a `(B, C, D, H, W)` volume and `(B, P, 3)` points in normalised
//! coordinates (`x` along `W`, `y` along `H`, `z` along `D`; `-1`/`+1` are the centres of the
//! first/last voxel, i.e. `align_corners = true`) and returns `(B, C, P)`. Its backward reaches
//! both the volume and the points. The same per-point kernels serve plain-Rust callers
//! (warping whole images) through [`sample_point`].

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use super::{bail, slice_of};

/// How values between voxel centres are obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interpolation {
    /// Trilinear; differentiable in the points.
    Linear,
    /// Nearest voxel (halves round up, as ITK does); for label maps. Zero gradient in the points.
    Nearest,
}

/// What a sample outside the voxel centres' hull sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Padding {
    /// Zero outside the volume; values fade to zero over the outermost half voxel and beyond.
    Zeros,
    /// The nearest border value, everywhere outside.
    Border,
    /// The border value up to half a voxel beyond the outer voxel centres (the image's physical
    /// extent), zero further out: ITK's resampling convention.
    Extent,
}

/// Taps of one axis: always two `(index, weight, d weight / d x)`. A tap that falls outside the
/// volume keeps a valid index with zero weight, so the gather loops have a fixed trip count and
/// no branches (the volume must hold finite values, which the readers guarantee).
#[derive(Clone, Copy)]
pub(crate) struct Taps<T> {
    pub idx: [usize; 2],
    pub w: [T; 2],
    pub dw: [T; 2],
}

/// The sampler's scalar: `f32` or `f64` with the primitive casts it needs. `num_traits`'
/// checked conversions cost more than the interpolation itself.
pub trait Real: Float + Send + Sync + 'static {
    /// `self as i64` (saturating).
    fn trunc_i64(self) -> i64;
    fn of_i64(i: i64) -> Self;
    fn of_f64(v: f64) -> Self;
}

macro_rules! impl_real {
    ($($t:ty),*) => {$(
        impl Real for $t {
            #[inline(always)]
            fn trunc_i64(self) -> i64 {
                self as i64
            }
            #[inline(always)]
            fn of_i64(i: i64) -> Self {
                i as $t
            }
            #[inline(always)]
            fn of_f64(v: f64) -> Self {
                v as $t
            }
        }
    )*};
}
impl_real!(f32, f64);

/// `floor` by truncating conversion: without SSE4.1 (the x86-64 baseline) `f32::floor` is a
/// libm call, and the sampler takes three floors per point. Only called on values already
/// range-checked to fit an `i64`.
#[inline(always)]
fn floor<T: Real>(v: T) -> T {
    let i = v.trunc_i64();
    T::of_i64(if T::of_i64(i) > v { i - 1 } else { i })
}

#[inline(always)]
pub(crate) fn axis_taps<T: Real>(x: T, len: usize, interp: Interpolation, pad: Padding) -> Taps<T> {
    let (zero, one) = (T::zero(), T::one());
    let last = T::of_i64(len as i64 - 1);
    // strictly inside, every padding mode agrees: the common case takes no other branch
    if interp == Interpolation::Linear && x > zero && x < last {
        let i0 = x.trunc_i64();
        let f = x - T::of_i64(i0);
        let i0 = i0 as usize;
        return Taps { idx: [i0, i0 + 1], w: [one - f, f], dw: [-one, one] };
    }
    let none = Taps { idx: [0; 2], w: [zero; 2], dw: [zero; 2] };
    let (half, huge) = (T::of_f64(0.5), T::of_f64(1e15));
    if !x.is_finite() || (pad == Padding::Extent && (x < -half || x >= last + half)) {
        return none;
    }
    match interp {
        Interpolation::Nearest => {
            let r = if x.abs() < huge { floor(x + half) } else { x };
            let i = match pad {
                Padding::Zeros if r < zero || r > last => return none,
                Padding::Zeros => r,
                _ => r.max(zero).min(last),
            };
            let i = i.trunc_i64() as usize;
            Taps { idx: [i, i], w: [one, zero], dw: [zero; 2] }
        }
        Interpolation::Linear => match pad {
            Padding::Zeros => {
                // range check in float first: a far-away point must not overflow an index
                if x.abs() > huge {
                    return none;
                }
                let f0 = floor(x);
                if f0 < -one || f0 > last {
                    return none;
                }
                let f = x - f0;
                let (lo, hi) = (f0 >= zero, f0 < last);
                let i0 = f0.max(zero).trunc_i64() as usize;
                let i1 = if lo && hi { i0 + 1 } else { i0 };
                let pick = |ok: bool, v: T| if ok { v } else { zero };
                Taps { idx: [i0, i1], w: [pick(lo, one - f), pick(hi, f)], dw: [pick(lo, -one), pick(hi, one)] }
            }
            Padding::Border | Padding::Extent => {
                let g = if x > zero && x < last { one } else { zero };
                let xc = x.max(zero).min(last);
                let f0 = floor(xc);
                let f = xc - f0;
                let i0 = f0.trunc_i64() as usize;
                Taps { idx: [i0, (i0 + 1).min(len - 1)], w: [one - f, f], dw: [-g, g] }
            }
        },
    }
}

/// Sizes of one sampled volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub d: usize,
    pub h: usize,
    pub w: usize,
}

impl Dims {
    pub fn len(&self) -> usize {
        self.d * self.h * self.w
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Normalised → voxel scale per axis (x, y, z): `(N − 1) / 2`.
    pub(crate) fn half_extent<T: Real>(&self) -> [T; 3] {
        [self.w, self.h, self.d].map(|n| T::from(n as f64 - 1.0).unwrap() / T::from(2.0).unwrap())
    }
}

#[inline(always)]
pub(crate) fn all_taps<T: Real>(p: [T; 3], dims: Dims, interp: Interpolation, pad: Padding) -> [Taps<T>; 3] {
    [axis_taps(p[0], dims.w, interp, pad), axis_taps(p[1], dims.h, interp, pad), axis_taps(p[2], dims.d, interp, pad)]
}

/// The eight corners of a point's taps: the voxel's index in a `(D, H, W)` volume, its weight,
/// and the weight's derivatives along x, y and z. Every trilinear loop of the samplers walks
/// these, in this order.
#[inline(always)]
pub(crate) fn corners<T: Real>(taps: &[Taps<T>; 3], dims: Dims) -> [(usize, T, [T; 3]); 8] {
    let [tx, ty, tz] = taps;
    std::array::from_fn(|k| {
        let (a, bb, cc) = (k >> 2, (k >> 1) & 1, k & 1);
        let i = (tz.idx[a] * dims.h + ty.idx[bb]) * dims.w + tx.idx[cc];
        let (wz, wy) = (tz.w[a], ty.w[bb]);
        let d = [wz * wy * tx.dw[cc], wz * ty.dw[bb] * tx.w[cc], tz.dw[a] * wy * tx.w[cc]];
        (i, wz * wy * tx.w[cc], d)
    })
}

/// Samples one channel (`D·H·W` values) at a point given in **voxel** coordinates `(x, y, z)`.
#[inline]
pub fn sample_point<T: Real>(vol: &[T], dims: Dims, p: [T; 3], interp: Interpolation, pad: Padding) -> T {
    gather(vol, dims, &all_taps(p, dims, interp, pad))
}

/// Gradient (voxel units) of `Σ_ch go[ch] · sample_ch` at the taps' point, for a channels-last
/// volume: one dot product over the channels per corner, then the corner's weight derivatives.
#[inline(always)]
fn gather_grad<T: Real>(vol: &[T], dims: Dims, taps: &[Taps<T>; 3], go: &[T]) -> [T; 3] {
    let c = go.len();
    let mut g = [T::zero(); 3];
    for (i, _, d) in corners(taps, dims) {
        let s = vol[i * c..][..c].iter().zip(go).fold(T::zero(), |acc, (&v, &g)| acc + v * g);
        for a in 0..3 {
            g[a] = g[a] + d[a] * s;
        }
    }
    g
}

const CHUNK: usize = 4096;

/// The trilinear taps of a point (voxel coordinates `x, y, z`) with border padding, as
/// [`axis_taps`] gives them but in the form of one first corner and a step to the second
/// along each axis (zero where the point is at or beyond an end), for interpolation by three
/// rounds of lerps instead of eight weighted corners.
#[derive(Clone, Copy)]
pub(crate) struct BorderTaps<T> {
    i: usize,
    step: [usize; 3],
    f: [T; 3],
    /// Strictly inside along each axis: where the weights have a nonzero derivative.
    inside: [bool; 3],
    /// Every coordinate finite (a non-finite one samples zero, as the general sampler does).
    finite: bool,
}

#[inline(always)]
fn border_axis<T: Real>(x: T, n: usize) -> (usize, usize, T, bool) {
    let last = T::of_i64(n as i64 - 1);
    if x > T::zero() && x < last {
        let i0 = x.trunc_i64();
        return (i0 as usize, 1, x - T::of_i64(i0), true);
    }
    (if x >= last { n - 1 } else { 0 }, 0, T::zero(), false)
}

#[inline(always)]
pub(crate) fn border_taps<T: Real>(x: [T; 3], dims: Dims) -> BorderTaps<T> {
    let (ix, sx, fx, ox) = border_axis(x[0], dims.w);
    let (iy, sy, fy, oy) = border_axis(x[1], dims.h);
    let (iz, sz, fz, oz) = border_axis(x[2], dims.d);
    BorderTaps {
        i: (iz * dims.h + iy) * dims.w + ix,
        step: [sx, sy * dims.w, sz * dims.w * dims.h],
        f: [fx, fy, fz],
        inside: [ox, oy, oz],
        finite: x.iter().all(|v| v.is_finite()),
    }
}

impl<T: Real> BorderTaps<T> {
    /// The eight corners of one channel `vol` (`D·H·W`), `x` fastest.
    #[inline(always)]
    fn corners(&self, vol: &[T]) -> [T; 8] {
        let [sx, sy, sz] = self.step;
        let i = self.i;
        [
            vol[i],
            vol[i + sx],
            vol[i + sy],
            vol[i + sy + sx],
            vol[i + sz],
            vol[i + sz + sx],
            vol[i + sz + sy],
            vol[i + sz + sy + sx],
        ]
    }

    /// The interpolated value of one channel `vol` (`D·H·W`).
    #[inline(always)]
    pub fn value(&self, vol: &[T]) -> T {
        if !self.finite {
            return T::zero();
        }
        let c = self.corners(vol);
        let [fx, fy, fz] = self.f;
        let l = |a: T, b: T, f: T| a + (b - a) * f;
        let (c00, c01, c10, c11) = (l(c[0], c[1], fx), l(c[2], c[3], fx), l(c[4], c[5], fx), l(c[6], c[7], fx));
        l(l(c00, c01, fy), l(c10, c11, fy), fz)
    }

    /// The value and its gradient in voxel units (x, y, z) of one channel `vol`.
    #[inline(always)]
    pub fn value_grad(&self, vol: &[T]) -> (T, [T; 3]) {
        let zero = T::zero();
        if !self.finite {
            return (zero, [zero; 3]);
        }
        let c = self.corners(vol);
        let [fx, fy, fz] = self.f;
        let l = |a: T, b: T, f: T| a + (b - a) * f;
        let (c00, c01, c10, c11) = (l(c[0], c[1], fx), l(c[2], c[3], fx), l(c[4], c[5], fx), l(c[6], c[7], fx));
        let (c0, c1) = (l(c00, c01, fy), l(c10, c11, fy));
        let gate = |ok: bool, g: T| if ok { g } else { zero };
        let dx = l(l(c[1] - c[0], c[3] - c[2], fy), l(c[5] - c[4], c[7] - c[6], fy), fz);
        let dy = l(c01 - c00, c11 - c10, fz);
        let dz = c1 - c0;
        (l(c0, c1, fz), [gate(self.inside[0], dx), gate(self.inside[1], dy), gate(self.inside[2], dz)])
    }

    /// Adds `g` times the interpolation weights to the eight corners of `acc` (`D·H·W`): the
    /// transpose of [`Self::value`].
    #[inline(always)]
    pub fn scatter(&self, acc: &mut [T], g: T) {
        if !self.finite {
            return;
        }
        let [sx, sy, sz] = self.step;
        let [fx, fy, fz] = self.f;
        let one = T::one();
        let (gz0, gz1) = (g * (one - fz), g * fz);
        let (g00, g01, g10, g11) = (gz0 * (one - fy), gz0 * fy, gz1 * (one - fy), gz1 * fy);
        let i = self.i;
        for (o, gg) in [(0, g00), (sy, g01), (sz, g10), (sz + sy, g11)] {
            acc[i + o] = acc[i + o] + gg * (one - fx);
            acc[i + o + sx] = acc[i + o + sx] + gg * fx;
        }
    }
}

#[inline(always)]
pub(crate) fn to_voxel<T: Real>(p: &[T], half: [T; 3]) -> [T; 3] {
    [(p[0] + T::one()) * half[0], (p[1] + T::one()) * half[1], (p[2] + T::one()) * half[2]]
}

/// A channels-last copy of `(B, C, V)` data (`c == 1` borrows): the C values of one voxel share
/// a cache line, so a point costs 8 cache misses instead of 8·C (the volume is read at scattered
/// positions).
fn channels_last<T: Real>(input: &[T], c: usize, vsz: usize) -> std::borrow::Cow<'_, [T]> {
    if c == 1 {
        return std::borrow::Cow::Borrowed(input);
    }
    let mut t = vec![T::zero(); input.len()];
    // parallel over voxel blocks (a batch of one volume must not run on one thread)
    // (one division per block, not per value: 64-bit divisions made this copy cost as much as
    // the sampling it serves)
    t.par_chunks_mut(CHUNK * c).enumerate().for_each(|(ci, tb)| {
        let first = ci * CHUNK;
        let mut q = 0;
        while q * c < tb.len() {
            let (bi, v0) = ((first + q) / vsz, (first + q) % vsz);
            // the run of voxels of this block that lie in volume `bi`
            let run = (vsz - v0).min(tb.len() / c - q);
            for ch in 0..c {
                let src = &input[(bi * c + ch) * vsz + v0..][..run];
                for (k, &x) in src.iter().enumerate() {
                    tb[(q + k) * c + ch] = x;
                }
            }
            q += run;
        }
    });
    std::borrow::Cow::Owned(t)
}

/// Forward: input `(B, C, dims)`, points `(B, P, 3)` normalised → `(B, C, P)`.
pub fn forward<T: Real>(
    input: &[T],
    points: &[T],
    b: usize,
    c: usize,
    dims: Dims,
    interp: Interpolation,
    pad: Padding,
) -> Vec<T> {
    let np = points.len() / (3 * b.max(1));
    let half = dims.half_extent::<T>();
    let vsz = dims.len();
    let cl = channels_last(input, c, vsz);
    // each task owns one chunk of points and writes that range of every output channel row
    let nk = np.div_ceil(CHUNK);
    let mut out = vec![T::zero(); b * c * np];
    let mut groups: Vec<Vec<&mut [T]>> = (0..b * nk).map(|_| Vec::with_capacity(c)).collect();
    for (row, r) in out.chunks_mut(np.max(1)).enumerate() {
        for (k, piece) in r.chunks_mut(CHUNK).enumerate() {
            groups[(row / c) * nk + k].push(piece);
        }
    }
    groups.into_par_iter().enumerate().for_each(|(g, mut rows)| {
        let (bi, first) = (g / nk, (g % nk) * CHUNK);
        let vol = &cl[bi * vsz * c..(bi + 1) * vsz * c];
        let mut acc = vec![T::zero(); c];
        for q in 0..rows.first().map_or(0, |r| r.len()) {
            let gp = bi * np + first + q;
            let taps = all_taps(to_voxel(&points[3 * gp..3 * gp + 3], half), dims, interp, pad);
            acc.iter_mut().for_each(|a| *a = T::zero());
            gather_into(vol, dims, &taps, &mut acc);
            for (r, &v) in rows.iter_mut().zip(&acc) {
                r[q] = v;
            }
        }
    });
    out
}

/// Forward of one volume `(1, C, dims)` (linear) at normalised `points` `(P, 3)`: the samples
/// `(C, P)` as [`forward`] gives them, and beside them each sample's gradient with respect to its
/// normalised point, `(P, C, 3)`. The gradient reads the same eight corners as the value while
/// they are in cache, so a backward that needs it no longer walks the volume a second time.
pub(crate) fn forward_jacobian<T: Real>(
    input: &[T],
    points: &[T],
    c: usize,
    dims: Dims,
    pad: Padding,
) -> (Vec<T>, Vec<T>) {
    let np = points.len() / 3;
    let half = dims.half_extent::<T>();
    if c == 1 && pad == Padding::Border {
        // one intensity map, as the NCC level samples it: three rounds of lerps per point
        let mut values = vec![T::zero(); np];
        let mut jac = vec![T::zero(); 3 * np];
        values.par_chunks_mut(CHUNK).zip(jac.par_chunks_mut(3 * CHUNK)).enumerate().for_each(|(ci, (vals, jc))| {
            for (q, (val, j)) in vals.iter_mut().zip(jc.chunks_mut(3)).enumerate() {
                let p = &points[3 * (ci * CHUNK + q)..][..3];
                let (v, g) = border_taps(to_voxel(p, half), dims).value_grad(input);
                *val = v;
                for a in 0..3 {
                    j[a] = g[a] * half[a];
                }
            }
        });
        return (values, jac);
    }
    let cl = channels_last(input, c, dims.len());
    let mut values = vec![T::zero(); c * np];
    let mut jac = vec![T::zero(); 3 * c * np];
    // values are channels-first: each task fills its point range, then they are scattered
    let parts: Vec<Vec<T>> = jac
        .par_chunks_mut(3 * c * CHUNK)
        .enumerate()
        .map(|(ci, jc)| {
            let first = ci * CHUNK;
            let n = jc.len() / (3 * c);
            let mut vals = vec![T::zero(); n * c];
            for q in 0..n {
                let p = &points[3 * (first + q)..][..3];
                let taps = all_taps(to_voxel(p, half), dims, Interpolation::Linear, pad);
                let (val, j) = (&mut vals[q * c..][..c], &mut jc[q * 3 * c..][..3 * c]);
                for (i, w, d) in corners(&taps, dims) {
                    for (ch, &v) in cl[i * c..][..c].iter().enumerate() {
                        val[ch] = val[ch] + w * v;
                        for a in 0..3 {
                            j[3 * ch + a] = j[3 * ch + a] + d[a] * v;
                        }
                    }
                }
                for g in j.chunks_mut(3) {
                    for a in 0..3 {
                        g[a] = g[a] * half[a];
                    }
                }
            }
            vals
        })
        .collect();
    for (ci, part) in parts.iter().enumerate() {
        let n = part.len() / c;
        for ch in 0..c {
            for q in 0..n {
                values[ch * np + ci * CHUNK + q] = part[q * c + ch];
            }
        }
    }
    (values, jac)
}

/// Interpolates `out.len()` channels stored channels-last (`vol[voxel · C + c]`) and adds them
/// into `out`; one channel is the plain channel-major case.
#[inline(always)]
fn gather_into<T: Real>(vol: &[T], dims: Dims, taps: &[Taps<T>; 3], out: &mut [T]) {
    let c = out.len();
    for (i, w, _) in corners(taps, dims) {
        for (slot, &v) in out.iter_mut().zip(&vol[i * c..][..c]) {
            *slot = *slot + w * v;
        }
    }
}

#[inline]
pub(crate) fn gather<T: Real>(vol: &[T], dims: Dims, taps: &[Taps<T>; 3]) -> T {
    let mut acc = [T::zero()];
    gather_into(vol, dims, taps, &mut acc);
    acc[0]
}

/// Gradient with respect to the normalised points: `(B, P, 3)`.
#[allow(clippy::too_many_arguments)] // mirrors `forward`'s flat-slice signature
pub fn backward_points<T: Real>(
    input: &[T],
    points: &[T],
    grad: &[T],
    b: usize,
    c: usize,
    dims: Dims,
    interp: Interpolation,
    pad: Padding,
) -> Vec<T> {
    let np = points.len() / (3 * b.max(1));
    let mut out = vec![T::zero(); points.len()];
    if interp == Interpolation::Nearest {
        return out;
    }
    let half = dims.half_extent::<T>();
    let vsz = dims.len();
    let cl = channels_last(input, c, vsz);
    out.par_chunks_mut(3 * CHUNK).enumerate().for_each(|(ci, o)| {
        let first = ci * CHUNK;
        let mut go = vec![T::zero(); c];
        for (q, g3) in o.chunks_mut(3).enumerate() {
            let gp = first + q;
            let (bi, p) = (gp / np, gp % np);
            for (ch, g) in go.iter_mut().enumerate() {
                *g = grad[(bi * c + ch) * np + p];
            }
            let taps = all_taps(to_voxel(&points[3 * gp..3 * gp + 3], half), dims, interp, pad);
            let g = gather_grad(&cl[bi * vsz * c..(bi + 1) * vsz * c], dims, &taps, &go);
            for a in 0..3 {
                g3[a] = g[a] * half[a];
            }
        }
    });
    out
}

/// Gradient with respect to the input volume: `(B, C, dims)` (a scatter of the output gradient).
/// Summation order is fixed by the problem size, not the thread count, so results are
/// reproducible across `--threads`.
pub fn backward_input<T: Real>(
    points: &[T],
    grad: &[T],
    b: usize,
    c: usize,
    dims: Dims,
    interp: Interpolation,
    pad: Padding,
) -> Vec<T> {
    let np = points.len() / (3 * b.max(1));
    let half = dims.half_extent::<T>();
    let vsz = dims.len();
    let scatter = |out: &mut [T], bi: usize, ch: usize, range: std::ops::Range<usize>| {
        for p in range {
            let go = grad[(bi * c + ch) * np + p];
            if go == T::zero() {
                continue;
            }
            let gp = bi * np + p;
            let pt = to_voxel(&points[3 * gp..3 * gp + 3], half);
            for (i, w, _) in corners(&all_taps(pt, dims, interp, pad), dims) {
                out[i] = out[i] + go * w;
            }
        }
    };
    let mut out = vec![T::zero(); b * c * vsz];
    const SPLIT: usize = 4;
    if b * c >= SPLIT || np < SPLIT * CHUNK {
        out.par_chunks_mut(vsz).enumerate().for_each(|(row, o)| scatter(o, row / c, row % c, 0..np));
    } else {
        // few volumes, many points: private accumulators per point range, summed in order
        for (row, o) in out.chunks_mut(vsz).enumerate() {
            let step = np.div_ceil(SPLIT);
            let parts: Vec<Vec<T>> = (0..SPLIT)
                .into_par_iter()
                .map(|s| {
                    let mut acc = vec![T::zero(); vsz];
                    scatter(&mut acc, row / c, row % c, s * step..((s + 1) * step).min(np));
                    acc
                })
                .collect();
            for part in parts {
                o.iter_mut().zip(part).for_each(|(a, v)| *a = *a + v);
            }
        }
    }
    out
}

/// The candle op behind [`grid_sample`].
#[derive(Debug, Clone, Copy)]
pub struct GridSample {
    pub interp: Interpolation,
    pub padding: Padding,
}

struct Shapes {
    b: usize,
    c: usize,
    dims: Dims,
    np: usize,
}

fn shapes(l1: &Layout, l2: &Layout) -> candle_core::Result<Shapes> {
    let (b, c, d, h, w) = match *l1.dims() {
        [b, c, d, h, w] => (b, c, d, h, w),
        ref s => bail(format!("grid_sample: input must be (B, C, D, H, W), got {s:?}"))?,
    };
    let np = match *l2.dims() {
        [pb, np, 3] if pb == b => np,
        ref s => bail(format!("grid_sample: points must be ({b}, P, 3), got {s:?}"))?,
    };
    if d * h * w == 0 {
        bail("grid_sample: empty input volume")?;
    }
    Ok(Shapes { b, c, dims: Dims { d, h, w }, np })
}

impl CustomOp2 for GridSample {
    fn name(&self) -> &'static str {
        "grid-sample-3d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let sh = shapes(l1, l2)?;
        let out_shape = Shape::from((sh.b, sh.c, sh.np));
        let st = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(p)) => CpuStorage::F32(forward(
                slice_of(a, l1)?,
                slice_of(p, l2)?,
                sh.b,
                sh.c,
                sh.dims,
                self.interp,
                self.padding,
            )),
            (CpuStorage::F64(a), CpuStorage::F64(p)) => CpuStorage::F64(forward(
                slice_of(a, l1)?,
                slice_of(p, l2)?,
                sh.b,
                sh.c,
                sh.dims,
                self.interp,
                self.padding,
            )),
            _ => bail("grid_sample: input and points must both be f32 or both f64")?,
        };
        Ok((st, out_shape))
    }

    fn bwd(
        &self,
        input: &Tensor,
        points: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gi = if input.track_op() {
            Some(input.apply_op3_no_bwd(points, &grad, &GridSampleGrad { op: *self, wrt_points: false })?)
        } else {
            None
        };
        let gp = if points.track_op() && self.interp == Interpolation::Linear {
            Some(input.apply_op3_no_bwd(points, &grad, &GridSampleGrad { op: *self, wrt_points: true })?)
        } else {
            None
        };
        Ok((gi, gp))
    }
}

/// Backward of [`GridSample`], applied to `(input, points, grad_out)`.
struct GridSampleGrad {
    op: GridSample,
    wrt_points: bool,
}

impl CustomOp3 for GridSampleGrad {
    fn name(&self) -> &'static str {
        "grid-sample-3d-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let sh = shapes(l1, l2)?;
        let (GridSample { interp, padding }, wrt) = (self.op, self.wrt_points);
        let shape = if wrt { l2.shape().clone() } else { l1.shape().clone() };
        macro_rules! run {
            ($a:expr, $p:expr, $g:expr) => {{
                let (a, p, g) = (slice_of($a, l1)?, slice_of($p, l2)?, slice_of($g, l3)?);
                if wrt {
                    backward_points(a, p, g, sh.b, sh.c, sh.dims, interp, padding)
                } else {
                    backward_input(p, g, sh.b, sh.c, sh.dims, interp, padding)
                }
            }};
        }
        let st = match (s1, s2, s3) {
            (CpuStorage::F32(a), CpuStorage::F32(p), CpuStorage::F32(g)) => CpuStorage::F32(run!(a, p, g)),
            (CpuStorage::F64(a), CpuStorage::F64(p), CpuStorage::F64(g)) => CpuStorage::F64(run!(a, p, g)),
            _ => bail("grid_sample backward: mixed dtypes")?,
        };
        Ok((st, shape))
    }
}

/// Samples `input` `(B, C, D, H, W)` at normalised `points` `(B, P, 3)` → `(B, C, P)`.
pub fn grid_sample(
    input: &Tensor,
    points: &Tensor,
    interp: Interpolation,
    padding: Padding,
) -> candle_core::Result<Tensor> {
    let points = if points.dtype() != input.dtype() { points.to_dtype(input.dtype())? } else { points.clone() };
    if !matches!(input.dtype(), DType::F32 | DType::F64) {
        bail("grid_sample supports f32 and f64")?;
    }
    input.contiguous()?.apply_op2(&points.contiguous()?, GridSample { interp, padding })
}

/// Moving and fixed data of [`SampledL1`], channels-last, in the tensors' precision.
#[derive(Debug, Clone)]
enum L1Data {
    F32 { moving: std::sync::Arc<Vec<f32>>, fixed: std::sync::Arc<Vec<f32>> },
    F64 { moving: std::sync::Arc<Vec<f64>>, fixed: std::sync::Arc<Vec<f64>> },
}

/// The registration similarity `mean |fixed − moving(p)|` over channels and over the points
/// inside the moving image's extent (half a voxel beyond its outer centres), with the moving
/// maps sampled trilinearly (border padding): `grid_sample`, the overlap mask and a masked L1
/// fused into one pass over the points. Composed of candle ops, the same loss allocates and
/// walks a `(C, P)` tensor about ten times per iteration on one thread; fused, it is one
/// parallel pass forward and one backward, which made it the cheap part of an iteration.
/// Differentiable in the points only (the maps are frozen).
#[derive(Debug, Clone)]
pub struct SampledL1 {
    data: L1Data,
    dims: Dims,
    channels: usize,
    points: usize,
    masks: L1Masks,
}

/// Masks of [`SampledL1`]: a weight per fixed point, and the moving voxels that count (a point
/// whose nearest moving voxel is outside counts as outside the extent).
#[derive(Debug, Clone, Default)]
struct L1Masks {
    fixed: Option<std::sync::Arc<Vec<f64>>>,
    moving: Option<std::sync::Arc<Vec<bool>>>,
}

impl L1Masks {
    #[inline(always)]
    fn weight(&self, point: usize) -> f64 {
        self.fixed.as_ref().map_or(1.0, |w| w[point])
    }

    /// Whether the moving mask (if any) holds the voxel nearest to voxel-space point `v`.
    #[inline(always)]
    fn moving_holds<T: Real>(&self, v: [T; 3], dims: Dims) -> bool {
        let Some(m) = &self.moving else {
            return true;
        };
        let near = |x: T, n: usize| (x.to_f64().unwrap_or(0.0).round().max(0.0) as usize).min(n - 1);
        m[(near(v[2], dims.d) * dims.h + near(v[1], dims.h)) * dims.w + near(v[0], dims.w)]
    }
}

/// `|p| ≤ 1 + 1/(n − 1)` per axis: inside the physical extent of `dims` (normalised points).
#[inline(always)]
fn inside_extent<T: Real>(p: &[T], lim: [T; 3]) -> bool {
    p[0].abs() <= lim[0] && p[1].abs() <= lim[1] && p[2].abs() <= lim[2]
}

fn extent_limits<T: Real>(dims: Dims) -> [T; 3] {
    [dims.w, dims.h, dims.d].map(|n| if n > 1 { T::of_f64(1.0 + 1.0 / (n as f64 - 1.0)) } else { T::infinity() })
}

impl SampledL1 {
    /// `moving` `(1, C, D, H, W)`, `fixed` `(1, C, P)`: the maps of one registration level.
    pub fn new(moving: &Tensor, fixed: &Tensor) -> candle_core::Result<Self> {
        let (b, c, d, h, w) = moving.dims5()?;
        let (fb, fc, np) = fixed.dims3()?;
        if b != 1 || fb != 1 || fc != c || moving.dtype() != fixed.dtype() {
            return bail(format!(
                "sampled L1: moving {:?} {:?} and fixed {:?} {:?} do not match",
                moving.dims(),
                moving.dtype(),
                fixed.dims(),
                fixed.dtype()
            ));
        }
        let dims = Dims { d, h, w };
        // the fixed features as (P, C): a point's channels side by side, like the moving voxel's
        let fixed_pc = fixed.squeeze(0)?.t()?.contiguous()?;
        let data = match moving.dtype() {
            DType::F32 => L1Data::F32 {
                moving: channels_last(&moving.flatten_all()?.to_vec1::<f32>()?, c, dims.len()).into_owned().into(),
                fixed: fixed_pc.flatten_all()?.to_vec1::<f32>()?.into(),
            },
            DType::F64 => L1Data::F64 {
                moving: channels_last(&moving.flatten_all()?.to_vec1::<f64>()?, c, dims.len()).into_owned().into(),
                fixed: fixed_pc.flatten_all()?.to_vec1::<f64>()?.into(),
            },
            _ => return bail("sampled L1 supports f32 and f64"),
        };
        Ok(Self { data, dims, channels: c, points: np, masks: L1Masks::default() })
    }

    /// Restricts the loss to a fixed mask, as a weight per fixed point in `[0, 1]` (`P` values),
    /// and to a moving mask (`D·H·W` values of the moving maps' grid, true where voxels count):
    /// a point counts with its weight, and only where it lands inside the moving extent on a
    /// moving voxel of the mask. Both stay constant under differentiation, as the extent does.
    pub fn with_masks(mut self, fixed: Option<Vec<f64>>, moving: Option<Vec<bool>>) -> candle_core::Result<Self> {
        if let Some(w) = &fixed {
            if w.len() != self.points {
                return bail(format!("sampled L1: {} fixed mask weights for {} points", w.len(), self.points));
            }
        }
        if let Some(m) = &moving {
            if m.len() != self.dims.len() {
                return bail(format!("sampled L1: moving mask of {} voxels for maps of {}", m.len(), self.dims.len()));
            }
        }
        self.masks = L1Masks { fixed: fixed.map(Into::into), moving: moving.map(Into::into) };
        Ok(self)
    }

    /// The loss (a scalar tensor, differentiable in `points`) at normalised `points` `(1, P, 3)`
    /// of the moving maps, and the fraction of points inside the moving extent. The count of
    /// inside points normalises the loss as a constant, as a detached mask would.
    pub fn loss(&self, points: &Tensor) -> candle_core::Result<(Tensor, f64)> {
        if points.dims() != [1, self.points, 3] {
            return bail(format!("sampled L1: points {:?}, expected (1, {}, 3)", points.dims(), self.points));
        }
        let points = points.contiguous()?;
        let flat = points.flatten_all()?;
        let inside = match &self.data {
            L1Data::F32 { .. } => count_inside(&flat.to_dtype(DType::F32)?.to_vec1::<f32>()?, self.dims, &self.masks),
            L1Data::F64 { .. } => count_inside(&flat.to_dtype(DType::F64)?.to_vec1::<f64>()?, self.dims, &self.masks),
        };
        // the weighted count of inside points; below one point's worth, the loss is a sum
        let norm = 1.0 / (self.channels as f64 * inside.max(1.0));
        let points = match &self.data {
            L1Data::F32 { .. } => points.to_dtype(DType::F32)?,
            L1Data::F64 { .. } => points.to_dtype(DType::F64)?,
        };
        let loss = points.apply_op1(SampledL1Op { l1: self.clone(), norm })?;
        Ok((loss, inside / self.points.max(1) as f64))
    }
}

/// The weighted count of points that count ([`sample_inside`]), in chunks summed in order.
fn count_inside<T: Real>(points: &[T], dims: Dims, masks: &L1Masks) -> f64 {
    let lim = extent_limits::<T>(dims);
    let half = dims.half_extent::<T>();
    let partial: Vec<f64> = points
        .par_chunks(3 * CHUNK)
        .enumerate()
        .map(|(ci, ch)| {
            ch.chunks(3)
                .enumerate()
                .filter(|(_, p)| inside_extent(p, lim) && masks.moving_holds(to_voxel(p, half), dims))
                .map(|(q, _)| masks.weight(ci * CHUNK + q))
                .sum::<f64>()
        })
        .collect();
    partial.into_iter().sum()
}

/// The moving maps (channels-last) at normalised point `p` into `m`, and the taps used; `None`
/// outside the extent `lim`, where `m` is left as it was.
#[inline(always)]
fn sample_inside<T: Real>(
    moving: &[T],
    dims: Dims,
    half: [T; 3],
    lim: [T; 3],
    masks: &L1Masks,
    p: &[T],
    m: &mut [T],
) -> Option<[Taps<T>; 3]> {
    if !inside_extent(p, lim) {
        return None;
    }
    let v = to_voxel(p, half);
    if !masks.moving_holds(v, dims) {
        return None;
    }
    let taps = all_taps(v, dims, Interpolation::Linear, Padding::Border);
    m.iter_mut().for_each(|v| *v = T::zero());
    gather_into(moving, dims, &taps, m);
    Some(taps)
}

/// Σ over inside points and channels of `|f − m(p)|`, in chunks summed in order (the same
/// result for any thread count).
fn sampled_l1_forward<T: Real>(moving: &[T], fixed: &[T], points: &[T], c: usize, dims: Dims, masks: &L1Masks) -> f64 {
    let half = dims.half_extent::<T>();
    let lim = extent_limits::<T>(dims);
    let partial: Vec<f64> = points
        .par_chunks(3 * CHUNK)
        .enumerate()
        .map(|(ci, pts)| {
            let mut m = vec![T::zero(); c];
            let mut sum = 0.0f64;
            for (q, p) in pts.chunks(3).enumerate() {
                if sample_inside(moving, dims, half, lim, masks, p, &mut m).is_none() {
                    continue;
                }
                let f = &fixed[(ci * CHUNK + q) * c..][..c];
                let s = f.iter().zip(&m).fold(T::zero(), |acc, (&a, &b)| acc + (a - b).abs());
                sum += masks.weight(ci * CHUNK + q) * s.to_f64().unwrap_or(f64::NAN);
            }
            sum
        })
        .collect();
    partial.into_iter().sum()
}

/// `scale · d/dp Σ |f − m(p)|` for every point `(P, 3)` (zero outside the extent).
fn sampled_l1_backward<T: Real>(
    moving: &[T],
    fixed: &[T],
    points: &[T],
    c: usize,
    dims: Dims,
    masks: &L1Masks,
    scale: T,
) -> Vec<T> {
    let half = dims.half_extent::<T>();
    let lim = extent_limits::<T>(dims);
    let mut out = vec![T::zero(); points.len()];
    out.par_chunks_mut(3 * CHUNK).zip(points.par_chunks(3 * CHUNK)).enumerate().for_each(|(ci, (o, pts))| {
        let (mut m, mut go) = (vec![T::zero(); c], vec![T::zero(); c]);
        for (q, (g3, p)) in o.chunks_mut(3).zip(pts.chunks(3)).enumerate() {
            let Some(taps) = sample_inside(moving, dims, half, lim, masks, p, &mut m) else {
                continue;
            };
            let f = &fixed[(ci * CHUNK + q) * c..][..c];
            let scale = scale * T::of_f64(masks.weight(ci * CHUNK + q));
            // d|f − m|/dm = −sign(f − m)
            for ((g, &a), &b) in go.iter_mut().zip(f).zip(&m) {
                *g = if a > b {
                    -scale
                } else if a < b {
                    scale
                } else {
                    T::zero()
                };
            }
            let g = gather_grad(moving, dims, &taps, &go);
            for a in 0..3 {
                g3[a] = g[a] * half[a];
            }
        }
    });
    out
}

/// The candle op behind [`SampledL1::loss`]: points `(1, P, 3)` → scalar.
struct SampledL1Op {
    l1: SampledL1,
    norm: f64,
}

impl candle_core::CustomOp1 for SampledL1Op {
    fn name(&self) -> &'static str {
        "sampled-l1"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (c, dims) = (self.l1.channels, self.l1.dims);
        let st = match (s, &self.l1.data) {
            (CpuStorage::F32(p), L1Data::F32 { moving, fixed }) => {
                let sum = sampled_l1_forward(moving, fixed, slice_of(p, l)?, c, dims, &self.l1.masks);
                CpuStorage::F32(vec![(sum * self.norm) as f32])
            }
            (CpuStorage::F64(p), L1Data::F64 { moving, fixed }) => CpuStorage::F64(vec![
                sampled_l1_forward(moving, fixed, slice_of(p, l)?, c, dims, &self.l1.masks) * self.norm,
            ]),
            _ => return bail("sampled L1: points and maps differ in precision"),
        };
        Ok((st, Shape::from(())))
    }

    fn bwd(&self, points: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()? * self.norm;
        let (c, dims) = (self.l1.channels, self.l1.dims);
        let shape = points.shape().clone();
        let out = match &self.l1.data {
            L1Data::F32 { moving, fixed } => {
                let p = points.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(
                    sampled_l1_backward(moving, fixed, &p, c, dims, &self.l1.masks, g as f32),
                    shape,
                    points.device(),
                )?
            }
            L1Data::F64 { moving, fixed } => {
                let p = points.flatten_all()?.to_vec1::<f64>()?;
                Tensor::from_vec(
                    sampled_l1_backward(moving, fixed, &p, c, dims, &self.l1.masks, g),
                    shape,
                    points.device(),
                )?
            }
        };
        Ok(Some(out))
    }
}
