//! The networks: MIDL OBELISK-Net and a 3D U-Net baseline. Both take normalised
//! `(B, C, D, H, W)` input and return `(B, classes, D, H, W)` logits via `forward_t(x, train)`.

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::{batch_norm, BatchNorm, BatchNormConfig, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::nn::{Conv3d, Conv3dConfig};
use crate::obelisk::{regular_grid, ObeliskConfig, ObeliskLayer};
use crate::ops::{avg_pool3d, grid_sample, resize_trilinear, resize_trilinear_aligned, Interpolation, Padding};

/// Which intermediate OBELISK-Net layer serves as registration features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObeliskFeatureLayer {
    /// The `mid` channels after the second 1x1x1 layer and its batch norm (dense block input).
    Mid,
    /// The dense block output after its final batch norm (`mid + dense_layers·growth` channels).
    Dense,
}

/// Options of [`ObeliskNet`]; the defaults are the MIDL network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObeliskNetConfig {
    pub in_channels: usize,
    pub num_classes: usize,
    /// Offset pairs of the binary OBELISK layer.
    pub kernels: usize,
    /// Groups of the first 1x1x1 convolution.
    pub groups: usize,
    pub hidden: usize,
    pub mid: usize,
    pub growth: usize,
    pub dense_layers: usize,
    /// Pre-smoothing average pool kernel `(d, h, w)`, stride 1. The reference's (5, 5, 3) has the
    /// 3 along the slice axis, which is `d` here.
    pub pool_kernel: [usize; 3],
    /// The OBELISK grid is the input size divided by this (4: quarter resolution).
    pub grid_divisor: usize,
    pub offset_std: f64,
    pub feature_layer: ObeliskFeatureLayer,
}

impl Default for ObeliskNetConfig {
    fn default() -> Self {
        Self {
            in_channels: 1,
            num_classes: 8,
            kernels: 1024,
            groups: 4,
            hidden: 256,
            mid: 128,
            growth: 32,
            dense_layers: 4,
            pool_kernel: [3, 5, 5],
            grid_divisor: 4,
            offset_std: 0.05,
            feature_layer: ObeliskFeatureLayer::Mid,
        }
    }
}

impl ObeliskNetConfig {
    pub fn dense_channels(&self) -> usize {
        self.mid + self.dense_layers * self.growth
    }

    /// [`Self::dense_channels`], or `None` on overflow (sizes from an untrusted config file).
    pub fn dense_channels_checked(&self) -> Option<usize> {
        self.mid.checked_add(self.dense_layers.checked_mul(self.growth)?)
    }

    pub fn feature_channels(&self) -> usize {
        match self.feature_layer {
            ObeliskFeatureLayer::Mid => self.mid,
            ObeliskFeatureLayer::Dense => self.dense_channels(),
        }
    }

    /// The grid size for an input of `size` `(D, H, W)`.
    pub fn grid_size(&self, size: [usize; 3]) -> [usize; 3] {
        size.map(|n| (n / self.grid_divisor.max(1)).max(1))
    }
}

fn bn(c: usize, vb: VarBuilder) -> candle_core::Result<BatchNorm> {
    // PyTorch's defaults (eps 1e-5, momentum 0.1), as the reference trained with
    batch_norm(c, BatchNormConfig { eps: 1e-5, remove_mean: true, affine: true, momentum: 0.1 }, vb)
}

/// One dense layer: optional BN → 1x1x1 conv → ReLU; its output is concatenated to its input.
#[derive(Debug, Clone)]
struct DenseLayer {
    bn: Option<BatchNorm>,
    conv: Conv3d,
}

/// MIDL OBELISK-Net (see the crate reference notes): pooled input → binary OBELISK layer on a
/// coarse grid (with grouped 1x1x1 mixing) → BN → ReLU → 1x1x1 → BN → dense block of 1x1x1
/// layers → BN → 1x1x1 classifier → trilinear upsampling. Everything after the OBELISK sampling is
/// pointwise, so the network is evaluable at arbitrary points.
#[derive(Debug, Clone)]
pub struct ObeliskNet {
    obelisk: ObeliskLayer,
    bn1: BatchNorm,
    conv2: Conv3d,
    bn2: BatchNorm,
    dense: Vec<DenseLayer>,
    bn_out: BatchNorm,
    head: Conv3d,
    cfg: ObeliskNetConfig,
}

/// Points per chunk in full-grid inference, bounding memory at `chunk × kernels × 2` samples.
const EVAL_CHUNK: usize = 8192;

impl ObeliskNet {
    pub fn new(vb: VarBuilder, cfg: ObeliskNetConfig) -> candle_core::Result<Self> {
        let obelisk = ObeliskLayer::new(
            vb.pp("obelisk"),
            ObeliskConfig {
                in_channels: cfg.in_channels,
                kernels: cfg.kernels,
                binary: true,
                out_channels: cfg.hidden,
                groups: cfg.groups,
                offset_std: cfg.offset_std,
                bias: false,
            },
        )?;
        let nobias = Conv3dConfig { bias: false, ..Default::default() };
        let bn1 = bn(cfg.hidden, vb.pp("bn1"))?;
        let conv2 = Conv3d::new(cfg.hidden, cfg.mid, nobias, vb.pp("conv2"))?;
        let bn2 = bn(cfg.mid, vb.pp("bn2"))?;
        let mut dense = Vec::with_capacity(cfg.dense_layers);
        for i in 0..cfg.dense_layers {
            let c = cfg.mid + i * cfg.growth;
            let vbi = vb.pp(format!("dense{i}"));
            // the first layer's input is already batch-normalised (bn2)
            let bn = if i > 0 { Some(bn(c, vbi.pp("bn"))?) } else { None };
            dense.push(DenseLayer { bn, conv: Conv3d::new(c, cfg.growth, nobias, vbi.pp("conv"))? });
        }
        let bn_out = bn(cfg.dense_channels(), vb.pp("bn_out"))?;
        let head = Conv3d::new(cfg.dense_channels(), cfg.num_classes, Conv3dConfig::default(), vb.pp("head"))?;
        Ok(Self { obelisk, bn1, conv2, bn2, dense, bn_out, head, cfg })
    }

    pub fn config(&self) -> &ObeliskNetConfig {
        &self.cfg
    }

    pub fn obelisk(&self) -> &ObeliskLayer {
        &self.obelisk
    }

    /// The pre-smoothing of the input (average pooling, stride 1, same size).
    pub fn smooth(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let k = self.cfg.pool_kernel;
        avg_pool3d(x, k, [1; 3], k.map(|k| k / 2))
    }

    /// OBELISK layer output at points of a **smoothed** input: `(B, hidden, P)` (before BN).
    pub fn sample_points(
        &self,
        smoothed: &Tensor,
        points: &Tensor,
        affine: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.obelisk.forward_points(smoothed, points, affine)
    }

    /// `(B, hidden, P)` OBELISK output → `(B, mid, P)` after `bn2`.
    fn trunk(&self, h: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let x = self.bn1.forward_t(h, train)?.relu()?;
        self.bn2.forward_t(&self.conv2.forward_points(&x)?, train)
    }

    /// `(B, mid, P)` → `(B, dense_channels, P)` after `bn_out`.
    fn dense_block(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for l in &self.dense {
            let y = match &l.bn {
                Some(bn) => bn.forward_t(&x, train)?,
                None => x.clone(),
            };
            let y = l.conv.forward_points(&y)?.relu()?;
            x = Tensor::cat(&[&x, &y], 1)?;
        }
        self.bn_out.forward_t(&x, train)
    }

    /// Class logits from the OBELISK output at points: `(B, hidden, P)` → `(B, classes, P)`. Split
    /// from the sampling so that a trainer can concatenate points of differently sized images
    /// before batch norm.
    pub fn head_t(&self, h: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let x = self.dense_block(&self.trunk(h, train)?, train)?;
        self.head.forward_points(&x)
    }

    /// Logits at arbitrary points of a normalised input: `(B, classes, P)`.
    pub fn forward_points_t(&self, x: &Tensor, points: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.head_t(&self.sample_points(&self.smooth(x)?, points, None)?, train)
    }

    /// Evaluates `f` on the coarse grid of `x`'s size in point chunks (eval mode: everything after
    /// the sampling is pointwise then) → `(B, C, d, h, w)`.
    fn on_grid(
        &self,
        smoothed: &Tensor,
        train: bool,
        f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, _, d, h, w) = smoothed.dims5()?;
        let size = self.cfg.grid_size([d, h, w]);
        let n: usize = size.iter().product();
        let grid = regular_grid(size, smoothed.dtype(), smoothed.device())?.unsqueeze(0)?.broadcast_as((b, n, 3))?;
        let chunk = if train { n } else { EVAL_CHUNK };
        let mut parts = Vec::new();
        for s in (0..n).step_by(chunk) {
            let pts = grid.narrow(1, s, chunk.min(n - s))?.contiguous()?;
            parts.push(f(&self.sample_points(smoothed, &pts, None)?)?);
        }
        let y = Tensor::cat(&parts, 2)?;
        let c = y.dim(1)?;
        y.reshape((b, c, size[0], size[1], size[2]))
    }

    /// Intermediate features for registration on the coarse grid, `(B, feature_channels, d, h, w)`
    /// (eval mode).
    pub fn features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.on_grid(&self.smooth(x)?, false, &|h| self.features_from_obelisk(h))
    }

    fn features_from_obelisk(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let m = self.trunk(h, false)?;
        match self.cfg.feature_layer {
            ObeliskFeatureLayer::Mid => Ok(m),
            ObeliskFeatureLayer::Dense => self.dense_block(&m, false),
        }
    }

    /// Registration features at arbitrary points of a **smoothed** input (see [`Self::smooth`]),
    /// `(B, feature_channels, P)`, differentiable in the points. Smooth once, then call this for
    /// every optimisation step.
    pub fn features_at_points_smoothed(&self, smoothed: &Tensor, points: &Tensor) -> candle_core::Result<Tensor> {
        self.features_from_obelisk(&self.sample_points(smoothed, points, None)?)
    }

    /// Registration features at arbitrary points of a normalised input.
    pub fn features_at_points(&self, x: &Tensor, points: &Tensor) -> candle_core::Result<Tensor> {
        self.features_at_points_smoothed(&self.smooth(x)?, points)
    }
}

impl ModuleT for ObeliskNet {
    /// Full-volume logits `(B, classes, D, H, W)`: the coarse grid, trilinearly upsampled.
    /// The grid spans the outer voxel centres (`align_corners = true`), so the upsampling uses the
    /// same convention; the reference mixed the two, shifting its output by up to half a cell.
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (_, _, d, h, w) = x.dims5()?;
        let y = self.on_grid(&self.smooth(x)?, train, &|o| self.head_t(o, train))?;
        resize_trilinear_aligned(&y, [d, h, w])
    }
}

/// Options of [`UNet3d`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub num_classes: usize,
    /// Channels per level, full resolution first; every level below the first halves the size
    /// by a stride-2 convolution.
    pub channels: Vec<usize>,
}

impl Default for UNetConfig {
    fn default() -> Self {
        // 5 levels × 2 + 4 decoder convs = 14 3x3x3 conv layers, 8 → 128 channels
        Self { in_channels: 1, num_classes: 8, channels: vec![8, 16, 32, 64, 128] }
    }
}

/// Conv 3x3x3 → BN → ReLU.
#[derive(Debug, Clone)]
struct ConvBnRelu {
    conv: Conv3d,
    bn: BatchNorm,
}

impl ConvBnRelu {
    fn new(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            conv: Conv3d::new(cin, cout, Conv3dConfig::cube(3, stride, false), vb.pp("conv"))?,
            bn: bn(cout, vb.pp("bn"))?,
        })
    }
}

impl ModuleT for ConvBnRelu {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.bn.forward_t(&self.conv.forward(x)?, train)?.relu()
    }
}

/// A 3D U-Net: per level two 3x3x3 conv/BN/ReLU blocks (the first strided below the top level),
/// trilinear upsampling + skip concatenation + one block per decoder level, 1x1x1 classifier.
#[derive(Debug, Clone)]
pub struct UNet3d {
    encoder: Vec<[ConvBnRelu; 2]>,
    decoder: Vec<ConvBnRelu>,
    head: Conv3d,
    cfg: UNetConfig,
}

impl UNet3d {
    pub fn new(vb: VarBuilder, cfg: UNetConfig) -> candle_core::Result<Self> {
        let ch = &cfg.channels;
        if ch.is_empty() {
            candle_core::bail!("unet: no levels")
        }
        let mut encoder = Vec::new();
        for (i, &c) in ch.iter().enumerate() {
            let (cin, stride) = if i == 0 { (cfg.in_channels, 1) } else { (ch[i - 1], 2) };
            let v = vb.pp(format!("enc{i}"));
            encoder.push([ConvBnRelu::new(cin, c, stride, v.pp("a"))?, ConvBnRelu::new(c, c, 1, v.pp("b"))?]);
        }
        let decoder = (0..ch.len() - 1)
            .map(|i| ConvBnRelu::new(ch[i + 1] + ch[i], ch[i], 1, vb.pp(format!("dec{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let head = Conv3d::new(ch[0], cfg.num_classes, Conv3dConfig::default(), vb.pp("head"))?;
        Ok(Self { encoder, decoder, head, cfg })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// The last decoder output (full resolution, `channels[0]` channels), the registration features.
    pub fn features_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut skips = Vec::new();
        let mut y = x.clone();
        for [a, b] in &self.encoder {
            y = b.forward_t(&a.forward_t(&y, train)?, train)?;
            skips.push(y.clone());
        }
        for i in (0..self.decoder.len()).rev() {
            let s = &skips[i];
            let (_, _, d, h, w) = s.dims5()?;
            let up = resize_trilinear(&y, [d, h, w])?;
            y = self.decoder[i].forward_t(&Tensor::cat(&[&up, s], 1)?, train)?;
        }
        Ok(y)
    }

    pub fn features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.features_t(x, false)
    }

    /// Features sampled (trilinearly) at arbitrary points, `(B, channels[0], P)`.
    pub fn features_at_points(&self, x: &Tensor, points: &Tensor) -> candle_core::Result<Tensor> {
        grid_sample(&self.features(x)?, points, Interpolation::Linear, Padding::Border)
    }
}

impl ModuleT for UNet3d {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.head.forward(&self.features_t(x, train)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, ModuleT, Tensor};
    use candle_nn::VarMap;

    use super::*;
    use crate::nn::{count_parameters, seeded_var_builder, Rng};

    fn input(size: [usize; 3], seed: u64) -> Tensor {
        let mut r = Rng::new(seed);
        let n: usize = size.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.uniform() as f32).collect();
        Tensor::from_vec(v, (1, 1, size[0], size[1], size[2]), &Device::Cpu).unwrap()
    }

    #[test]
    fn midl_obelisk_net_parameter_count() {
        let map = VarMap::new();
        let vb = seeded_var_builder(&map, 0, DType::F32, &Device::Cpu);
        let _ = ObeliskNet::new(vb, ObeliskNetConfig::default()).unwrap();
        let total = count_parameters(&map);
        // the reference's netCount: offsets + conv/linear weights, no BN affine, no bias
        let data = map.data().lock().unwrap();
        let weights: usize = data
            .iter()
            .filter(|(k, _)| k.ends_with("weight") && !k.contains("bn") || k.ends_with("offsets"))
            .map(|(_, v)| v.elem_count())
            .sum();
        println!("OBELISK-Net (8 classes): {total} trainable parameters, {weights} offsets + conv weights");
        assert_eq!(total, 131_464, "matches the MIDL reference exactly");
        assert!(weights < 130_000);
    }

    #[test]
    fn obelisk_net_shapes_and_points_match_grid() {
        let map = VarMap::new();
        let vb = seeded_var_builder(&map, 1, DType::F32, &Device::Cpu);
        let cfg = ObeliskNetConfig {
            kernels: 16,
            hidden: 16,
            mid: 8,
            growth: 4,
            dense_layers: 2,
            num_classes: 3,
            ..Default::default()
        };
        let net = ObeliskNet::new(vb, cfg.clone()).unwrap();
        let x = input([9, 12, 10], 2);
        let y = net.forward_t(&x, false).unwrap();
        assert_eq!(y.dims(), &[1, 3, 9, 12, 10]);
        let f = net.features(&x).unwrap();
        assert_eq!(f.dims(), &[1, 8, 2, 3, 2]);
        let g = regular_grid([2, 3, 2], DType::F32, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let fp = net.features_at_points(&x, &g).unwrap();
        let diff = (f.flatten_from(2).unwrap() - fp).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        let dense = ObeliskNet::new(
            seeded_var_builder(&map, 1, DType::F32, &Device::Cpu),
            ObeliskNetConfig { feature_layer: ObeliskFeatureLayer::Dense, ..cfg },
        )
        .unwrap();
        assert_eq!(dense.features(&x).unwrap().dim(1).unwrap(), 16);
    }

    #[test]
    fn unet_shapes_and_layer_count() {
        let map = VarMap::new();
        let vb = seeded_var_builder(&map, 1, DType::F32, &Device::Cpu);
        let net = UNet3d::new(vb, UNetConfig { num_classes: 2, channels: vec![2, 4, 4, 4, 8], ..Default::default() })
            .unwrap();
        let convs = map
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, v)| k.ends_with("conv.weight") && v.rank() == 5 && v.dim(2).unwrap() == 3)
            .count();
        assert_eq!(convs, 14);
        let x = input([11, 9, 16], 3);
        assert_eq!(net.forward_t(&x, true).unwrap().dims(), &[1, 2, 11, 9, 16]);
        assert_eq!(net.features(&x).unwrap().dims(), &[1, 2, 11, 9, 16]);
    }
}

#[cfg(test)]
mod grad_tests {
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::VarMap;

    use super::*;
    use crate::nn::{seeded_var_builder, Rng};

    /// The registration engine optimises point positions through `features_at_points`: its
    /// gradient in the points must be right (f64, central differences).
    #[test]
    fn feature_gradient_in_points_matches_finite_differences() {
        let map = VarMap::new();
        let vb = seeded_var_builder(&map, 4, DType::F64, &Device::Cpu);
        let cfg = ObeliskNetConfig {
            kernels: 8,
            hidden: 8,
            mid: 4,
            growth: 4,
            dense_layers: 2,
            num_classes: 2,
            offset_std: 0.3,
            feature_layer: ObeliskFeatureLayer::Dense,
            ..Default::default()
        };
        let net = ObeliskNet::new(vb, cfg).unwrap();
        let mut r = Rng::new(1);
        let x: Vec<f64> = (0..7 * 8 * 9).map(|_| r.uniform()).collect();
        let x = net.smooth(&Tensor::from_vec(x, (1, 1, 7, 8, 9), &Device::Cpu).unwrap()).unwrap();
        let p0: Vec<f64> = (0..15).map(|_| 1.4 * r.uniform() - 0.7).collect();
        let f = |p: &Tensor| net.features_at_points_smoothed(&x, p).unwrap().sqr().unwrap().sum_all().unwrap();
        let var = Var::from_vec(p0.clone(), (1, 5, 3), &Device::Cpu).unwrap();
        let g: Vec<f64> = f(var.as_tensor())
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let eps = 1e-6;
        for i in 0..p0.len() {
            let at = |d: f64| {
                let mut q = p0.clone();
                q[i] += d;
                f(&Tensor::from_vec(q, (1, 5, 3), &Device::Cpu).unwrap()).to_scalar::<f64>().unwrap()
            };
            let num = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!((num - g[i]).abs() < 1e-5 * (1.0 + num.abs()), "point coord {i}: {num} vs {}", g[i]);
        }
    }
}
