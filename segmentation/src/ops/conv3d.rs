//! 3D convolution (candle has none) as im2col + candle's matmul.
//!
//! Only the im2col step is a custom op; its backward is the adjoint scatter (col2im). The matmul,
//! the per-group split and the bias are ordinary candle ops, so autograd gives the weight and bias
//! gradients for free and the heavy lifting runs in candle's multi-threaded `gemm`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use super::{bail, slice_of};

/// Geometry of one im2col/col2im: input `(B, C, D, H, W)`, kernel, stride and zero padding per
/// axis `(d, h, w)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
    pub padding: [usize; 3],
}

impl ConvGeometry {
    /// Output size per axis for an input of `size` (`None` when the kernel does not fit).
    pub fn output_size(&self, size: [usize; 3]) -> Option<[usize; 3]> {
        let mut o = [0; 3];
        for a in 0..3 {
            let n = size[a] + 2 * self.padding[a];
            if n < self.kernel[a] || self.stride[a] == 0 {
                return None;
            }
            o[a] = (n - self.kernel[a]) / self.stride[a] + 1;
        }
        Some(o)
    }

    fn taps(&self) -> usize {
        self.kernel.iter().product()
    }

    /// Input index along one axis for output `o` and tap `t`, if inside the volume.
    #[inline]
    fn src(&self, axis: usize, o: usize, t: usize, n: usize) -> Option<usize> {
        let s = (o * self.stride[axis] + t) as isize - self.padding[axis] as isize;
        (s >= 0 && (s as usize) < n).then_some(s as usize)
    }
}

/// `(B, C, D, H, W)` → `(B, C·kd·kh·kw, Do·Ho·Wo)`; row `(c·kd + a)·kh·kw + b·kw + e`.
fn im2col<T: Float + Send + Sync>(x: &[T], b: usize, c: usize, size: [usize; 3], g: ConvGeometry) -> Vec<T> {
    let out = g.output_size(size).expect("checked by caller");
    let (l, k) = (out.iter().product::<usize>(), g.taps());
    let vol = size.iter().product::<usize>();
    let [_, h, w] = size;
    let mut col = vec![T::zero(); b * c * k * l];
    col.par_chunks_mut(l).enumerate().for_each(|(row, dst)| {
        let (plane, tap) = (row / k, row % k);
        let (ta, tb, te) = (tap / (g.kernel[1] * g.kernel[2]), (tap / g.kernel[2]) % g.kernel[1], tap % g.kernel[2]);
        let src = &x[plane * vol..(plane + 1) * vol];
        for od in 0..out[0] {
            let Some(sd) = g.src(0, od, ta, size[0]) else { continue };
            for oh in 0..out[1] {
                let Some(sh) = g.src(1, oh, tb, h) else { continue };
                let base = (sd * h + sh) * w;
                let drow = &mut dst[(od * out[1] + oh) * out[2]..(od * out[1] + oh + 1) * out[2]];
                for (ow, v) in drow.iter_mut().enumerate() {
                    if let Some(sw) = g.src(2, ow, te, w) {
                        *v = src[base + sw];
                    }
                }
            }
        }
    });
    col
}

/// The adjoint of [`im2col`]: scatters `(B, C·K, L)` back into `(B, C, D, H, W)`. One task per
/// `(b, c)` plane, taps summed in a fixed order, so the result does not depend on the thread count.
fn col2im<T: Float + Send + Sync>(col: &[T], b: usize, c: usize, size: [usize; 3], g: ConvGeometry) -> Vec<T> {
    let out = g.output_size(size).expect("checked by caller");
    let (l, k) = (out.iter().product::<usize>(), g.taps());
    let vol = size.iter().product::<usize>();
    let [_, h, w] = size;
    let mut x = vec![T::zero(); b * c * vol];
    x.par_chunks_mut(vol).enumerate().for_each(|(plane, dst)| {
        for tap in 0..k {
            let (ta, tb, te) =
                (tap / (g.kernel[1] * g.kernel[2]), (tap / g.kernel[2]) % g.kernel[1], tap % g.kernel[2]);
            let src = &col[(plane * k + tap) * l..(plane * k + tap + 1) * l];
            for od in 0..out[0] {
                let Some(sd) = g.src(0, od, ta, size[0]) else { continue };
                for oh in 0..out[1] {
                    let Some(sh) = g.src(1, oh, tb, h) else { continue };
                    let base = (sd * h + sh) * w;
                    let srow = &src[(od * out[1] + oh) * out[2]..(od * out[1] + oh + 1) * out[2]];
                    for (ow, &v) in srow.iter().enumerate() {
                        if let Some(sw) = g.src(2, ow, te, w) {
                            dst[base + sw] = dst[base + sw] + v;
                        }
                    }
                }
            }
        }
    });
    x
}

/// The im2col custom op; `adjoint` turns it into col2im (its own backward).
#[derive(Debug, Clone, Copy)]
struct Im2Col {
    geom: ConvGeometry,
    /// For col2im: the `(B, C, D, H, W)` shape to scatter back into.
    adjoint: Option<[usize; 5]>,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        if self.adjoint.is_some() {
            "col2im-3d"
        } else {
            "im2col-3d"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geom;
        let (b, c, size) = match self.adjoint {
            Some([b, c, d, h, w]) => (b, c, [d, h, w]),
            None => match *l.dims() {
                [b, c, d, h, w] => (b, c, [d, h, w]),
                ref s => bail(format!("conv3d: input must be (B, C, D, H, W), got {s:?}"))?,
            },
        };
        let Some(out) = g.output_size(size) else {
            return bail(format!("conv3d: kernel {:?} does not fit input {size:?}", g.kernel));
        };
        let (k, lo) = (g.taps(), out.iter().product::<usize>());
        if self.adjoint.is_some() && l.dims() != [b, c * k, lo] {
            bail(format!("col2im: expected ({b}, {}, {lo}), got {:?}", c * k, l.dims()))?;
        }
        macro_rules! run {
            ($v:expr) => {{
                let v = slice_of($v, l)?;
                match self.adjoint {
                    Some(_) => col2im(v, b, c, size, g),
                    None => im2col(v, b, c, size, g),
                }
            }};
        }
        let st = match s {
            CpuStorage::F32(v) => CpuStorage::F32(run!(v)),
            CpuStorage::F64(v) => CpuStorage::F64(run!(v)),
            _ => bail("conv3d supports f32 and f64")?,
        };
        let shape = match self.adjoint {
            Some(s) => Shape::from(s.to_vec()),
            None => Shape::from((b, c * k, lo)),
        };
        Ok((st, shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let t = match self.adjoint {
            // col2im's adjoint is im2col; second-order use only, so no further backward
            Some(_) => grad.apply_op1_no_bwd(&Im2Col { geom: self.geom, adjoint: None })?,
            None => {
                let s: [usize; 5] = arg.dims().try_into().map_err(|_| candle_core::Error::Msg("rank".into()))?;
                grad.apply_op1(Im2Col { geom: self.geom, adjoint: Some(s) })?
            }
        };
        Ok(Some(t))
    }
}

/// Differentiable im2col: `(B, C, D, H, W)` → `(B, C·kd·kh·kw, Do·Ho·Wo)`.
pub fn unfold3d(x: &Tensor, geom: ConvGeometry) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Im2Col { geom, adjoint: None })
}

/// 3D cross-correlation (PyTorch's `conv3d`): `x (B, Cin, D, H, W)`, `w (Cout, Cin/groups, kd, kh,
/// kw)` → `(B, Cout, Do, Ho, Wo)`, zero padding. Differentiable in `x` and `w`. Add a bias with
/// `broadcast_add` of a `(1, Cout, 1, 1, 1)` tensor.
pub fn conv3d(
    x: &Tensor,
    w: &Tensor,
    stride: [usize; 3],
    padding: [usize; 3],
    groups: usize,
) -> candle_core::Result<Tensor> {
    let (b, cin, d, h, wd) = x.dims5()?;
    let (cout, cin_g, kd, kh, kw) = w.dims5()?;
    if groups == 0 || !cin.is_multiple_of(groups) || !cout.is_multiple_of(groups) || cin_g * groups != cin {
        bail(format!("conv3d: {cin} input / {cout} output channels, weight {:?}, groups {groups}", w.dims()))?;
    }
    if !matches!(x.dtype(), DType::F32 | DType::F64) || x.dtype() != w.dtype() {
        bail("conv3d: input and weight must both be f32 or both f64")?;
    }
    let geom = ConvGeometry { kernel: [kd, kh, kw], stride, padding };
    let Some(out) = geom.output_size([d, h, wd]) else {
        return bail(format!("conv3d: kernel {:?} does not fit input {:?}", geom.kernel, [d, h, wd]));
    };
    let l = out.iter().product::<usize>();
    let k = geom.taps();
    // a 1x1x1 stride-1 convolution needs no unfolding: it is a matmul over channels
    let col = if geom.kernel == [1, 1, 1] && stride == [1, 1, 1] && padding == [0, 0, 0] {
        x.reshape((b, cin, l))?
    } else {
        unfold3d(x, geom)?
    };
    let wm = w.reshape((cout, cin_g * k))?;
    let (og, rows) = (cout / groups, cin_g * k);
    let y = if groups == 1 {
        wm.broadcast_matmul(&col)?
    } else {
        let parts = (0..groups)
            .map(|g| {
                let cg = col.narrow(1, g * rows, rows)?.contiguous()?;
                wm.narrow(0, g * og, og)?.broadcast_matmul(&cg)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)?
    };
    y.reshape((b, cout, out[0], out[1], out[2]))
}
