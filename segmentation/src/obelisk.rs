//! The OBELISK layer: sparse deformable convolution with learned, shared sampling offsets.
//!
//! For every output point `p` (a regular grid or arbitrary points) and every kernel element `k`
//! the input is sampled trilinearly at `p + o_k` (normalised `[-1, 1]` coordinates,
//! `align_corners = true`, zero padding). The binary variant samples two offsets per element and
//! takes the difference. Channel `c·K + k` of the sampled stack then goes through a grouped
//! 1x1x1 convolution.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::nn::{Conv3d, Conv3dConfig};
#[cfg(test)]
use crate::ops::{grid_sample, Interpolation, Padding};
use crate::ops::{kernel_sample, kernel_sample_grid};

/// Options of [`ObeliskLayer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObeliskConfig {
    pub in_channels: usize,
    /// Kernel elements `K` (offset pairs when `binary`).
    pub kernels: usize,
    /// Feature = sample(p + o1) − sample(p + o2) (MIDL OBELISK-Net).
    pub binary: bool,
    pub out_channels: usize,
    /// Groups of the 1x1x1 convolution that mixes the `C·K` sampled channels.
    pub groups: usize,
    /// Std of the normal offset initialisation, in normalised units.
    pub offset_std: f64,
    /// A bias is redundant when batch norm follows.
    pub bias: bool,
    /// Binary only: each difference `d` becomes the self-similarity `exp(−d²/V)`, `V` the mean
    /// `d²` over the point's kernel (+ a noise floor), as MIND-SSC does with fixed offsets. The
    /// response no longer depends on the contrast, only on which samples look alike, so features
    /// learned on randomised contrasts hold on CT and MR.
    #[serde(default)]
    pub self_similarity: bool,
}

/// The noise floor of the self-similarity's local variance, for inputs on `[0, 1]`: differences
/// of about 0.01 count as noise in flat regions instead of being stretched to unit contrast.
const SELF_SIMILARITY_FLOOR: f64 = 1e-4;

impl Default for ObeliskConfig {
    fn default() -> Self {
        Self {
            in_channels: 1,
            kernels: 1024,
            binary: true,
            out_channels: 256,
            groups: 4,
            offset_std: 0.05,
            bias: false,
            self_similarity: false,
        }
    }
}

/// A regular grid of `size = (d, h, w)` points over `[-1, 1]³` (`align_corners = true`), as
/// `(d·h·w, 3)` `(x, y, z)` rows in `z`-major order, so that `(…, P)` outputs reshape to
/// `(…, d, h, w)`.
pub fn regular_grid(size: [usize; 3], dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let axis = |n: usize, i: usize| if n > 1 { -1.0 + 2.0 * i as f64 / (n - 1) as f64 } else { 0.0 };
    let [d, h, w] = size;
    let mut v = Vec::with_capacity(d * h * w * 3);
    for k in 0..d {
        for j in 0..h {
            for i in 0..w {
                v.extend_from_slice(&[axis(w, i), axis(h, j), axis(d, k)]);
            }
        }
    }
    Tensor::from_vec(v, (d * h * w, 3), device)?.to_dtype(dtype)
}

/// The OBELISK layer (see the module docs).
#[derive(Debug, Clone)]
pub struct ObeliskLayer {
    /// `(S, 3)` offsets, `S = K` or `2K` (first half `o1`, second half `o2`).
    offsets: Tensor,
    conv: Conv3d,
    cfg: ObeliskConfig,
}

impl ObeliskLayer {
    pub fn new(vb: VarBuilder, cfg: ObeliskConfig) -> candle_core::Result<Self> {
        let s = cfg.kernels * if cfg.binary { 2 } else { 1 };
        let offsets = vb.get_with_hints((s, 3), "offsets", Init::Randn { mean: 0.0, stdev: cfg.offset_std })?;
        let conv = Conv3d::new(
            cfg.in_channels * cfg.kernels,
            cfg.out_channels,
            Conv3dConfig { groups: cfg.groups, bias: cfg.bias, ..Default::default() },
            vb.pp("conv"),
        )?;
        Ok(Self { offsets, conv, cfg })
    }

    pub fn config(&self) -> &ObeliskConfig {
        &self.cfg
    }

    /// The same layer with its offsets multiplied per axis by `scale` `(x, y, z)`; the scaled
    /// offsets are computed from the learned ones, so gradients still reach them.
    pub fn with_offset_scale(&self, scale: [f64; 3]) -> candle_core::Result<Self> {
        let s = Tensor::new(&[scale], self.offsets.device())?.to_dtype(self.offsets.dtype())?;
        Ok(Self { offsets: self.offsets.broadcast_mul(&s)?, ..self.clone() })
    }

    /// The learned offsets `(S, 3)` in normalised `(x, y, z)`.
    pub fn offsets(&self) -> &Tensor {
        &self.offsets
    }

    /// The sampled stack before the 1x1x1 convolution: `x (B, C, D, H, W)`, `points (B, P, 3)`
    /// → `(B, C·K, P)`. `affine`, `(B, P, 3, 3)`, warps each point's kernel (`A·o`), used as
    /// training-time augmentation.
    pub fn sample(&self, x: &Tensor, points: &Tensor, affine: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, c, _, _, _) = x.dims5()?;
        let pb = points.dim(0)?;
        if pb != b || c != self.cfg.in_channels {
            candle_core::bail!("obelisk: input {:?} / points {:?} do not match the layer", x.dims(), points.dims())
        }
        self.respond(kernel_sample(x, points, &self.offsets, affine, self.cfg.binary)?)
    }

    /// The sampled stack `(B, C·K, P)` as the 1x1x1 convolution takes it (see
    /// [`ObeliskConfig::self_similarity`]).
    fn respond(&self, stack: Tensor) -> candle_core::Result<Tensor> {
        if !(self.cfg.self_similarity && self.cfg.binary) {
            return Ok(stack);
        }
        let d2 = stack.sqr()?;
        let v = (d2.mean_keepdim(1)? + SELF_SIMILARITY_FLOOR)?;
        d2.broadcast_div(&v)?.neg()?.exp()
    }

    /// Layer output at arbitrary points: `(B, P, 3)` → `(B, out_channels, P)`.
    pub fn forward_points(&self, x: &Tensor, points: &Tensor, affine: Option<&Tensor>) -> candle_core::Result<Tensor> {
        self.conv.forward_points(&self.sample(x, points, affine)?)
    }

    /// Layer output at the points `start..start + len` (raster order) of the regular grid of
    /// `size = (d, h, w)`, `(B, out_channels, len)`: inference only (no gradient), several times
    /// cheaper per sample than [`Self::forward_points`] at those points.
    pub fn forward_grid_run(
        &self,
        x: &Tensor,
        size: [usize; 3],
        start: usize,
        len: usize,
    ) -> candle_core::Result<Tensor> {
        let (_, c, _, _, _) = x.dims5()?;
        if c != self.cfg.in_channels {
            candle_core::bail!("obelisk: input {:?} does not match the layer", x.dims())
        }
        self.conv.forward_points(&self.respond(kernel_sample_grid(
            x,
            size,
            start,
            len,
            &self.offsets,
            self.cfg.binary,
        )?)?)
    }

    /// Layer output on a regular grid of `size = (d, h, w)`: `(B, out_channels, d, h, w)`.
    pub fn forward_grid(&self, x: &Tensor, size: [usize; 3]) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let g = regular_grid(size, x.dtype(), x.device())?;
        let pts = g.unsqueeze(0)?.broadcast_as((b, size.iter().product(), 3))?.contiguous()?;
        let y = self.forward_points(x, &pts, None)?;
        y.reshape((b, self.cfg.out_channels, size[0], size[1], size[2]))
    }
}

/// Per-point affine kernel augmentation `A = I + σ·N(0, 1)` (3x3), `(B, P, 3, 3)`.
pub fn random_affines(
    b: usize,
    p: usize,
    sigma: f64,
    rng: &mut crate::nn::Rng,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut v = Vec::with_capacity(b * p * 9);
    for _ in 0..b * p {
        for r in 0..3 {
            for c in 0..3 {
                v.push(if r == c { 1.0 } else { 0.0 } + sigma * rng.normal());
            }
        }
    }
    Tensor::from_vec(v, (b, p, 3, 3), device)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarMap;

    use super::*;
    use crate::nn::{seeded_var_builder, Rng};

    fn layer(binary: bool, seed: u64) -> (ObeliskLayer, VarMap) {
        let map = VarMap::new();
        let vb = seeded_var_builder(&map, seed, DType::F64, &Device::Cpu);
        let cfg = ObeliskConfig {
            in_channels: 2,
            kernels: 6,
            binary,
            out_channels: 4,
            groups: 2,
            offset_std: 0.2,
            bias: true,
            self_similarity: false,
        };
        (ObeliskLayer::new(vb, cfg).unwrap(), map)
    }

    /// The self-similarity response depends only on which samples look alike: a gain, an offset
    /// and an inverted contrast give the same output (the noise floor aside).
    #[test]
    fn self_similarity_ignores_gain_offset_and_inversion() {
        let map = VarMap::new();
        let vb = seeded_var_builder(&map, 5, DType::F64, &Device::Cpu);
        let cfg = ObeliskConfig {
            in_channels: 2,
            kernels: 6,
            binary: true,
            out_channels: 4,
            groups: 2,
            offset_std: 0.1,
            bias: true,
            self_similarity: true,
        };
        let l = ObeliskLayer::new(vb, cfg).unwrap();
        // inside, so that no sample meets the zero padding (which an offset would change)
        let pts = Tensor::new(&[[[0.1f64, -0.3, 0.2], [-0.2, 0.2, 0.0], [0.3, 0.3, -0.3]]], &Device::Cpu).unwrap();
        let x = image(9).affine(100.0, 0.0).unwrap();
        let out =
            |x: &Tensor| l.forward_points(x, &pts, None).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let a = out(&x);
        for y in [x.affine(3.0, 50.0).unwrap(), x.affine(-1.0, 0.0).unwrap()] {
            let b = out(&y);
            let diff = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
            assert!(diff < 1e-5, "{a:?} vs {b:?}");
        }
        // without it, the output follows the contrast
        let (plain, _) = layer(true, 5);
        let o =
            |x: &Tensor| plain.forward_points(x, &pts, None).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_ne!(o(&x), o(&x.affine(-1.0, 0.0).unwrap()));
    }

    fn image(seed: u64) -> Tensor {
        let mut r = Rng::new(seed);
        let v: Vec<f64> = (0..2 * 5 * 6 * 7).map(|_| r.uniform()).collect();
        Tensor::from_vec(v, (1, 2, 5, 6, 7), &Device::Cpu).unwrap()
    }

    #[test]
    fn same_seed_same_offsets_and_different_seed_differs() {
        let (a, _) = layer(true, 3);
        let (b, _) = layer(true, 3);
        let (c, _) = layer(true, 4);
        let v = |l: &ObeliskLayer| l.offsets().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(v(&a), v(&b));
        assert_ne!(v(&a), v(&c));
        assert_eq!(a.offsets().dims(), &[12, 3]);
    }

    /// The stack follows the definition: channel `c·K + k` = x_c(p + o1_k) − x_c(p + o2_k).
    #[test]
    fn binary_sampling_matches_definition_and_grid_matches_points() {
        let (l, _) = layer(true, 1);
        let x = image(2);
        let pts = Tensor::new(&[[[0.1f64, -0.3, 0.5], [-0.9, 0.2, 0.0]]], &Device::Cpu).unwrap();
        let s: Vec<Vec<f64>> = l.sample(&x, &pts, None).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let off: Vec<Vec<f64>> = l.offsets().to_vec2().unwrap();
        for c in 0..2 {
            for k in 0..6 {
                for (p, row) in s[c * 6 + k].iter().enumerate() {
                    let pv: Vec<f64> = pts.get(0).unwrap().get(p).unwrap().to_vec1().unwrap();
                    let at = |o: &[f64]| {
                        let q: Vec<f64> = (0..3).map(|a| pv[a] + o[a]).collect();
                        let qt = Tensor::from_vec(q, (1, 1, 3), &Device::Cpu).unwrap();
                        let v = grid_sample(&x.narrow(1, c, 1).unwrap(), &qt, Interpolation::Linear, Padding::Zeros);
                        v.unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()[0]
                    };
                    let want = at(&off[k]) - at(&off[6 + k]);
                    assert!((row - want).abs() < 1e-12);
                }
            }
        }
        // identity affines change nothing
        let eye = Tensor::eye(3, DType::F64, &Device::Cpu).unwrap().broadcast_as((1, 2, 3, 3)).unwrap();
        let a = l.forward_points(&x, &pts, None).unwrap();
        let b = l.forward_points(&x, &pts, Some(&eye)).unwrap();
        assert!((a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() < 1e-14);
        // the grid output equals the point output at the grid's points
        let g = l.forward_grid(&x, [2, 3, 4]).unwrap();
        assert_eq!(g.dims(), &[1, 4, 2, 3, 4]);
        let gp = regular_grid([2, 3, 4], DType::F64, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let p = l.forward_points(&x, &gp, None).unwrap();
        let diff = (g.flatten_from(2).unwrap() - p).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-14);
    }

    #[test]
    fn offsets_receive_gradients_through_affine_warp() {
        let (l, map) = layer(false, 5);
        let x = image(6);
        let pts = Tensor::new(&[[[0.1f64, -0.3, 0.5], [0.4, 0.2, -0.6]]], &Device::Cpu).unwrap();
        let mut r = Rng::new(1);
        let a = random_affines(1, 2, 0.2, &mut r, &Device::Cpu).unwrap();
        let y = l.forward_points(&x, &pts, Some(&a)).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let vars = map.data().lock().unwrap();
        let off = g.get(vars["offsets"].as_tensor()).expect("offsets get a gradient");
        assert!(off.abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() > 0.0);
    }
}
