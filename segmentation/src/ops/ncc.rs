//! Masked local normalised cross-correlation (ANTs' CC metric) as one fused op.
//!
//! Composed of candle ops, the loss filters six masked products with three separable box
//! filters each and combines them in some twenty elementwise ops, every one a full-size
//! temporary kept for the backward pass. Here the six window sums come from running sums along
//! each axis (O(N) for any radius, the ends replicated exactly as [`super::box_filter3d`] does),
//! a slice at a time (the products and in-plane sums of one slice stay in cache; each output
//! slice sums its window of planes and is combined at once), the voxelwise combination and its
//! derivative in that same pass, and the backward applies the transposed box filter to three
//! coefficient maps the same way: the analytic gradient of the same loss.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::sample::Real;
use super::{bail, slice_of};

/// Added to the window weight (the box mean of the mask) before dividing by it.
pub const NCC_EPS: f64 = 1e-5;

/// `acc += k · x`, elementwise.
fn add(acc: &mut [f64], x: &[f64], k: f64) {
    acc.iter_mut().zip(x).for_each(|(a, &v)| *a += k * v);
}

/// Sums of rows `[i0, i0 + rows)` of an `(n, inner)` array (row `i` is `row(i)`) over a
/// `(2r + 1)`-row window into `d`: the ends replicated (`transpose = false`), or the transpose
/// of that operator.
fn window_rows<'a>(
    row: impl Fn(usize) -> &'a [f64],
    d: &mut [f64],
    n: usize,
    inner: usize,
    r: usize,
    i0: usize,
    transpose: bool,
) {
    let rows = d.len() / inner;
    if rows == 1 {
        // one output row (a slice of the z pass): summed in place
        d.fill(0.0);
        if !transpose {
            for t in 0..=2 * r {
                add(d, row((i0 + t).saturating_sub(r).min(n - 1)), 1.0);
            }
        } else {
            for i in i0.saturating_sub(r)..=(i0 + r).min(n - 1) {
                add(d, row(i), 1.0);
            }
            end_taps(&row, d, n, r, i0);
        }
        return;
    }
    let mut acc = vec![0.0f64; inner];
    if !transpose {
        for t in 0..=2 * r {
            let i = (i0 + t).saturating_sub(r).min(n - 1);
            add(&mut acc, row(i), 1.0);
        }
        for (j, out) in d.chunks_mut(inner).enumerate() {
            out.copy_from_slice(&acc);
            if j + 1 < rows {
                let i = i0 + j;
                let (enter, leave) = (row((i + 1 + r).min(n - 1)), row(i.saturating_sub(r)));
                acc.iter_mut().zip(enter).zip(leave).for_each(|((a, &x), &y)| *a += x - y);
            }
        }
    } else {
        for i in i0.saturating_sub(r)..=(i0 + r).min(n - 1) {
            add(&mut acc, row(i), 1.0);
        }
        for (j, out) in d.chunks_mut(inner).enumerate() {
            let i = i0 + j;
            out.copy_from_slice(&acc);
            end_taps(&row, out, n, r, i);
            if j + 1 < rows {
                if i + 1 + r < n {
                    add(&mut acc, row(i + 1 + r), 1.0);
                }
                if i >= r {
                    add(&mut acc, row(i - r), -1.0);
                }
            }
        }
    }
}

/// The transposed window's replicated taps beyond the ends, which all land on the end rows:
/// added to output row `i` when it is the first or the last.
fn end_taps<'a>(row: &impl Fn(usize) -> &'a [f64], out: &mut [f64], n: usize, r: usize, i: usize) {
    if i == 0 {
        for q in 0..r.min(n) {
            add(out, row(q), (r - q) as f64);
        }
    }
    if i == n - 1 {
        for q in n.saturating_sub(r)..n {
            add(out, row(q), (q + r + 1 - n) as f64);
        }
    }
}

/// In-plane `(h, w)` window sums of one slice's channels-last `(h, w, k)` data `x` (every value
/// of `x` overwritten with the result); `scratch` (as long as `x`) holds the intermediate.
fn plane_sums(x: &mut [f64], scratch: &mut [f64], h: usize, w: usize, k: usize, r: [usize; 2], transpose: bool) {
    let row = w * k;
    for (src, dst) in x.chunks(row).zip(scratch.chunks_mut(row)) {
        window_rows(|i| &src[i * k..(i + 1) * k], dst, w, k, r[1], 0, transpose);
    }
    let scratch = &*scratch;
    window_rows(|i| &scratch[i * row..(i + 1) * row], x, h, row, r[0], 0, transpose);
}

/// Window sums of per-slice channels-last `(H, W, k)` planes over all three axes: the in-plane
/// sums of each slice in place (in cache, one task per slice), then each output slice as the
/// sum of its window of planes, handed in parallel to `out(z, sums)`; its results in slice
/// order. (The three axis passes over the whole volume this replaces each read and wrote every
/// value, costing more in memory traffic than in arithmetic; per-slice buffers, filled as they
/// are made, also spare the zeroing of whole-volume ones.)
fn slab_sums<R: Send>(
    mut planes: Vec<Vec<f64>>,
    dims: [usize; 3],
    k: usize,
    radius: [usize; 3],
    transpose: bool,
    out: impl Fn(usize, &[f64]) -> R + Sync,
) -> Vec<R> {
    let [d, h, w] = dims;
    let plane = h * w * k;
    planes.par_iter_mut().for_each_init(
        || vec![0.0f64; plane],
        |scratch, p| plane_sums(p, scratch, h, w, k, [radius[1], radius[2]], transpose),
    );
    let planes = &planes;
    (0..d)
        .into_par_iter()
        .map_init(
            || vec![0.0f64; plane],
            |sums, z| {
                window_rows(|i| &planes[i], sums, d, plane, radius[0], z, transpose);
                out(z, sums)
            },
        )
        .collect()
}

/// The forward result that the backward needs: per voxel and channel, the derivatives of
/// `m · cc` with respect to the three window means that hold the warped image, channels-last,
/// one buffer per slice.
struct Coefficients {
    slices: Vec<Vec<f64>>,
}

/// The loss `1 − Σ m·cc / max(C·Σ m, 1)` and, when asked, the coefficients of its gradient.
fn forward<T: Real>(
    warped: &[T],
    fixed: &[T],
    mask: &[T],
    c: usize,
    dims: [usize; 3],
    radius: [usize; 3],
    keep: bool,
) -> (f64, Option<Coefficients>) {
    let nv = dims.iter().product::<usize>();
    let [d, h, w] = dims;
    let hw = h * w;
    let k = 1 + 5 * c;
    let f64_of = |v: T| v.to_f64().unwrap_or(f64::NAN);
    // the masked products per slice, channels-last: m, then per channel f·m, w·m, f·w·m, f²·m,
    // w²·m
    let planes: Vec<Vec<f64>> = (0..d)
        .into_par_iter()
        .map(|z| {
            let mut p = Vec::with_capacity(hw * k);
            for v in z * hw..(z + 1) * hw {
                let m = f64_of(mask[v]);
                p.push(m);
                for ch in 0..c {
                    let (f, w) = (f64_of(fixed[ch * nv + v]), f64_of(warped[ch * nv + v]));
                    p.extend([f * m, w * m, f * w * m, f * f * m, w * w * m]);
                }
            }
            p
        })
        .collect();
    let scale = 1.0 / radius.iter().map(|&r| (2 * r + 1) as f64).product::<f64>();
    let cc_sum = |s: &[f64], co: Option<&mut [f64]>, m: f64| -> f64 {
        let cnt = s[0] * scale + NCC_EPS;
        let mut total = 0.0;
        let mut co = co;
        for ch in 0..c {
            let w = &s[1 + 5 * ch..6 + 5 * ch];
            let (mf, mw) = (w[0] * scale / cnt, w[1] * scale / cnt);
            let cross = w[2] * scale / cnt - mf * mw;
            let vf = (w[3] * scale / cnt - mf * mf).max(0.0);
            let vw_raw = w[4] * scale / cnt - mw * mw;
            let vw = vw_raw.max(0.0);
            let den = vf * vw + NCC_EPS * NCC_EPS;
            total += cross * cross / den;
            if let Some(co) = co.as_deref_mut() {
                // d cc / d cross and d cc / d var_w (relu' = 1 at 0, as candle's)
                let p = 2.0 * cross / den;
                let qv = if vw_raw >= 0.0 { -cross * cross * vf / (den * den) } else { 0.0 };
                let o = &mut co[3 * ch..3 * ch + 3];
                o[0] = m * (-p * mf - 2.0 * qv * mw) / cnt;
                o[1] = m * p / cnt;
                o[2] = m * qv / cnt;
            }
        }
        total * m
    };
    let slices = slab_sums(planes, dims, k, radius, false, |z, sums| {
        let mut co = if keep { vec![0.0f64; hw * 3 * c] } else { Vec::new() };
        let mut t = 0.0;
        for (q, s) in sums.chunks(k).enumerate() {
            let m = f64_of(mask[z * hw + q]);
            t += if keep { cc_sum(s, Some(&mut co[q * 3 * c..(q + 1) * 3 * c]), m) } else { cc_sum(s, None, m) };
        }
        (t, co)
    });
    let total: f64 = slices.iter().map(|(t, _)| t).sum();
    let coef = keep.then(|| Coefficients { slices: slices.into_iter().map(|(_, co)| co).collect() });
    let weight: f64 = mask.iter().map(|&m| f64_of(m)).sum::<f64>() * c as f64;
    let loss = 1.0 - total / weight.max(1.0);
    (loss, coef)
}

/// `scale · d loss / d warped`, `(C, D, H, W)` flattened.
#[allow(clippy::too_many_arguments)]
fn backward<T: Real>(
    coef: Coefficients,
    warped: &[T],
    fixed: &[T],
    mask: &[T],
    c: usize,
    dims: [usize; 3],
    radius: [usize; 3],
    scale: f64,
) -> Vec<T> {
    let nv = dims.iter().product::<usize>();
    let weight: f64 = mask.iter().map(|&m| m.to_f64().unwrap_or(f64::NAN)).sum::<f64>() * c as f64;
    let box_scale = 1.0 / radius.iter().map(|&r| (2 * r + 1) as f64).product::<f64>();
    // loss = 1 − Σ m·cc / weight
    let factor = -scale * box_scale / weight.max(1.0);
    let hw = dims[1] * dims[2];
    let to_f64 = |v: T| v.to_f64().unwrap_or(0.0);
    // channels-last per slice, as the slices come
    let slices = slab_sums(coef.slices, dims, 3 * c, radius, true, |z, t| {
        let mut o = Vec::with_capacity(hw * c);
        for q in 0..hw {
            let v = z * hw + q;
            let m = to_f64(mask[v]);
            for ch in 0..c {
                let s = &t[q * 3 * c + 3 * ch..][..3];
                let (fv, wv) = (to_f64(fixed[ch * nv + v]), to_f64(warped[ch * nv + v]));
                o.push(T::of_f64(factor * m * (s[0] + fv * s[1] + 2.0 * wv * s[2])));
            }
        }
        o
    });
    if c == 1 || nv == 0 {
        return slices.concat();
    }
    let mut out = vec![T::zero(); nv * c];
    for (ch, o) in out.chunks_mut(nv).enumerate() {
        o.par_chunks_mut(hw).zip(slices.par_iter()).for_each(|(o, g)| {
            for (q, x) in o.iter_mut().enumerate() {
                *x = g[q * c + ch];
            }
        });
    }
    out
}

/// The candle op behind [`local_ncc`]: `(warped, fixed, mask)` → the scalar loss,
/// differentiable in `warped` only.
struct LocalNccOp {
    radius: [usize; 3],
    /// The forward's gradient coefficients, until the backward takes them.
    coefficients: Mutex<Option<Coefficients>>,
}

struct Geometry {
    c: usize,
    dims: [usize; 3],
}

fn geometry(lw: &Layout, lf: &Layout, lm: &Layout) -> candle_core::Result<Geometry> {
    let (c, dims) = match *lw.dims() {
        [1, c, d, h, w] => (c, [d, h, w]),
        ref s => return bail(format!("local NCC: images must be (1, C, D, H, W), got {s:?}")),
    };
    if lf.dims() != lw.dims() {
        return bail(format!("local NCC: fixed {:?} and warped {:?} differ", lf.dims(), lw.dims()));
    }
    if lm.dims() != [1, 1, dims[0], dims[1], dims[2]] {
        return bail(format!("local NCC: mask {:?} for images {:?}", lm.dims(), lw.dims()));
    }
    Ok(Geometry { c, dims })
}

impl CustomOp3 for LocalNccOp {
    fn name(&self) -> &'static str {
        "local-ncc"
    }

    fn cpu_fwd(
        &self,
        sw: &CpuStorage,
        lw: &Layout,
        sf: &CpuStorage,
        lf: &Layout,
        sm: &CpuStorage,
        lm: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = geometry(lw, lf, lm)?;
        let (loss, coef) = match (sw, sf, sm) {
            (CpuStorage::F32(w), CpuStorage::F32(f), CpuStorage::F32(m)) => {
                let (loss, coef) =
                    forward(slice_of(w, lw)?, slice_of(f, lf)?, slice_of(m, lm)?, g.c, g.dims, self.radius, true);
                (CpuStorage::F32(vec![loss as f32]), coef)
            }
            (CpuStorage::F64(w), CpuStorage::F64(f), CpuStorage::F64(m)) => {
                let (loss, coef) =
                    forward(slice_of(w, lw)?, slice_of(f, lf)?, slice_of(m, lm)?, g.c, g.dims, self.radius, true);
                (CpuStorage::F64(vec![loss]), coef)
            }
            _ => return bail("local NCC: images and mask must all be f32 or all f64"),
        };
        *self.coefficients.lock().unwrap_or_else(|e| e.into_inner()) = coef;
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        warped: &Tensor,
        fixed: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let scale = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let (_, c, d, h, w) = warped.dims5()?;
        let dims = [d, h, w];
        let taken = self.coefficients.lock().unwrap_or_else(|e| e.into_inner()).take();
        macro_rules! run {
            ($t:ty) => {{
                let w = warped.flatten_all()?.to_vec1::<$t>()?;
                let f = fixed.flatten_all()?.to_vec1::<$t>()?;
                let m = mask.flatten_all()?.to_vec1::<$t>()?;
                // a second backward recomputes what the first one took
                let coef = match taken {
                    Some(co) => co,
                    None => forward(&w, &f, &m, c, dims, self.radius, true).1.expect("kept"),
                };
                Tensor::from_vec(
                    backward(coef, &w, &f, &m, c, dims, self.radius, scale),
                    warped.shape(),
                    warped.device(),
                )?
            }};
        }
        let g = match warped.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            _ => return bail("local NCC supports f32 and f64"),
        };
        Ok((Some(g), None, None))
    }
}

/// Local normalised cross-correlation loss `1 − mean(cc)` of `fixed` and `warped` `(1, C, D, H,
/// W)`, channel by channel, weighted by `mask` `(1, 1, D, H, W)` (constant under
/// differentiation): `cc = cov² / (var_f · var_w + ε²)` from masked means over a `(2r + 1)` box
/// per axis `(d, h, w)` (ends replicated), each mean divided by the box mean of the mask plus
/// [`NCC_EPS`]; the variances clamped at zero. Differentiable in `warped`; the window sums are
/// accumulated in f64 whatever the tensors' precision.
pub fn local_ncc(fixed: &Tensor, warped: &Tensor, mask: &Tensor, radius: [usize; 3]) -> candle_core::Result<Tensor> {
    let dt = warped.dtype();
    if !matches!(dt, DType::F32 | DType::F64) {
        return bail("local NCC supports f32 and f64");
    }
    let fixed = fixed.detach().to_dtype(dt)?.contiguous()?;
    let mask = mask.detach().to_dtype(dt)?.contiguous()?;
    let op = LocalNccOp { radius, coefficients: Mutex::new(None) };
    warped.contiguous()?.apply_op3_arc(&fixed, &mask, Arc::new(Box::new(op)))
}
