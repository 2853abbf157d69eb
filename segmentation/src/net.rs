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
    /// Kernel elements of the OBELISK layer (offset pairs when `binary`).
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
    /// Two offsets per kernel element and the difference of their samples (the MIDL network);
    /// false: one offset and its plain sample (the single-offset ablation). Configs saved
    /// before the option existed are binary.
    #[serde(default = "binary_default")]
    pub binary: bool,
    /// Millimetres per normalised offset unit. `None` (the segmentation models): offsets are
    /// fractions of the input's extent, so a kernel reaches further in a larger field of view.
    /// `Some(h)` (registration feature models): offsets are scaled to each input's extent and
    /// spacing, so a kernel covers the same anatomy in a 180 mm head and a 400 mm abdomen.
    #[serde(default)]
    pub offset_unit_mm: Option<f64>,
    /// See [`ObeliskConfig::self_similarity`].
    #[serde(default)]
    pub self_similarity: bool,
}

fn binary_default() -> bool {
    true
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
            binary: true,
            offset_unit_mm: None,
            self_similarity: false,
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

    /// Per-axis `(x, y, z)` factors that turn the learned offsets into normalised offsets of an
    /// input of `size` `(D, H, W)` voxels of `spacing` mm (`(D, H, W)` order), for models with
    /// [`Self::offset_unit_mm`]; `None` otherwise. A normalised unit spans `(n − 1)/2` voxels.
    pub fn offset_scale(&self, size: [usize; 3], spacing: [f64; 3]) -> Option<[f64; 3]> {
        let unit = self.offset_unit_mm?;
        // (x, y, z) = (W, H, D); an axis of one voxel has no extent to scale to
        Some([2, 1, 0].map(|a| if size[a] > 1 { 2.0 * unit / ((size[a] - 1) as f64 * spacing[a]) } else { 1.0 }))
    }

    /// The grid size for an input of `size` `(D, H, W)`.
    pub fn grid_size(&self, size: [usize; 3]) -> [usize; 3] {
        size.map(|n| (n / self.grid_divisor.max(1)).max(1))
    }
}

fn bn(c: usize, vb: VarBuilder) -> candle_core::Result<BatchNorm> {
    bn_with(c, true, vb)
}

/// Batch norm without the learnable scale and shift, for layers whose output only feeds linear
/// layers: a following 1x1x1 conv with a bias absorbs them exactly (`W(γx̂ + β) + b`), and a
/// following batch norm cancels them.
fn bn_plain(c: usize, vb: VarBuilder) -> candle_core::Result<BatchNorm> {
    bn_with(c, false, vb)
}

fn bn_with(c: usize, affine: bool, vb: VarBuilder) -> candle_core::Result<BatchNorm> {
    // PyTorch's defaults (eps 1e-5, momentum 0.1), as the reference trained with
    batch_norm(c, BatchNormConfig { eps: 1e-5, remove_mean: true, affine, momentum: 0.1 }, vb)
}

/// One dense layer: optional BN → 1x1x1 conv → ReLU; its output is concatenated to its input.
#[derive(Debug, Clone)]
struct DenseLayer {
    bn: Option<BatchNorm>,
    conv: Conv3d,
}

/// A block of 1x1x1 dense layers (`dense{i}.bn`, `dense{i}.conv`), each adding `growth` channels.
#[derive(Debug, Clone)]
struct DenseBlock {
    layers: Vec<DenseLayer>,
}

impl DenseBlock {
    /// `first_bn`: whether the first layer normalises its input (not when it already is);
    /// `compact`: batch norms without scale/shift and convs with a bias (see [`ObeliskNet`]).
    fn new(
        channels: usize,
        growth: usize,
        n: usize,
        first_bn: bool,
        compact: bool,
        vb: &VarBuilder,
    ) -> candle_core::Result<Self> {
        let conv_cfg = Conv3dConfig { bias: compact, ..Default::default() };
        let mut layers = Vec::with_capacity(n);
        for i in 0..n {
            let c = channels + i * growth;
            let vbi = vb.pp(format!("dense{i}"));
            let bn = if i > 0 || first_bn { Some(bn_with(c, !compact, vbi.pp("bn"))?) } else { None };
            layers.push(DenseLayer { bn, conv: Conv3d::new(c, growth, conv_cfg, vbi.pp("conv"))? });
        }
        Ok(Self { layers })
    }

    /// `(B, C, …)` with `C = channels` → `(B, channels + n·growth, …)`; any trailing shape.
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for l in &self.layers {
            let y = match &l.bn {
                Some(bn) => bn.forward_t(&x, train)?,
                None => x.clone(),
            };
            let y = pointwise(&l.conv, &y)?.relu()?;
            x = Tensor::cat(&[&x, &y], 1)?;
        }
        Ok(x)
    }
}

/// In eval mode nothing is differentiated through a layer's output (registration differentiates
/// only in the sampling points, on detached feature maps), yet the weights are variables, so
/// candle would keep every intermediate of the forward pass alive in the graph: 1.26 GB for
/// OBELISK-Net at 144³. Cutting the graph frees each layer's intermediates as it finishes.
fn eval_detach(y: Tensor, train: bool) -> Tensor {
    if train {
        y
    } else {
        y.detach()
    }
}

/// A 1x1x1 conv on `(B, C, P)` points or `(B, C, D, H, W)` volumes.
fn pointwise(conv: &Conv3d, x: &Tensor) -> candle_core::Result<Tensor> {
    if x.rank() == 3 {
        conv.forward_points(x)
    } else {
        conv.forward(x)
    }
}

/// MIDL OBELISK-Net (see the crate reference notes): pooled input → binary OBELISK layer on a
/// coarse grid (with grouped 1x1x1 mixing) → BN → ReLU → 1x1x1 → BN → dense block of 1x1x1
/// layers → BN → 1x1x1 classifier → trilinear upsampling. Everything after the OBELISK sampling is
/// pointwise, so the network is evaluable at arbitrary points.
///
/// Compact form: the batch norms that feed only linear layers (`bn2`, the dense block's and
/// `bn_out`) have no scale/shift; the dense convolutions carry a bias instead, which spans the
/// same functions. With the MIDL sizes and 8 classes that is 129,672 trainable parameters
/// (the reference, with affine batch norms everywhere, has 131,464; both have the 129,024
/// offsets and conv weights that the paper counts).
#[derive(Debug, Clone)]
pub struct ObeliskNet {
    obelisk: ObeliskLayer,
    bn1: BatchNorm,
    conv2: Conv3d,
    bn2: BatchNorm,
    dense: DenseBlock,
    bn_out: BatchNorm,
    head: Conv3d,
    cfg: ObeliskNetConfig,
}

/// Points per chunk in full-grid inference, bounding memory at `chunk × kernels` sampled values
/// (8192 × 1024 × 4 bytes = 32 MB with the MIDL sizes; 233 MB peak at 144³); fewer, larger chunks
/// spend less time in per-op overhead (144³: 3.9 s with 2048, 3.5 s with 8192).
const EVAL_CHUNK: usize = 8192;

impl ObeliskNet {
    pub fn new(vb: VarBuilder, cfg: ObeliskNetConfig) -> candle_core::Result<Self> {
        let obelisk = ObeliskLayer::new(
            vb.pp("obelisk"),
            ObeliskConfig {
                in_channels: cfg.in_channels,
                kernels: cfg.kernels,
                binary: cfg.binary,
                out_channels: cfg.hidden,
                groups: cfg.groups,
                offset_std: cfg.offset_std,
                bias: false,
                self_similarity: cfg.self_similarity,
            },
        )?;
        let nobias = Conv3dConfig { bias: false, ..Default::default() };
        let bn1 = bn(cfg.hidden, vb.pp("bn1"))?;
        let conv2 = Conv3d::new(cfg.hidden, cfg.mid, nobias, vb.pp("conv2"))?;
        let bn2 = bn_plain(cfg.mid, vb.pp("bn2"))?;
        // the first layer's input is already batch-normalised (bn2)
        let dense = DenseBlock::new(cfg.mid, cfg.growth, cfg.dense_layers, false, true, &vb)?;
        let bn_out = bn_plain(cfg.dense_channels(), vb.pp("bn_out"))?;
        let head = Conv3d::new(cfg.dense_channels(), cfg.num_classes, Conv3dConfig::default(), vb.pp("head"))?;
        Ok(Self { obelisk, bn1, conv2, bn2, dense, bn_out, head, cfg })
    }

    pub fn config(&self) -> &ObeliskNetConfig {
        &self.cfg
    }

    pub fn obelisk(&self) -> &ObeliskLayer {
        &self.obelisk
    }

    /// The same network with its offsets multiplied per axis by `scale` `(x, y, z)` (see
    /// [`ObeliskNetConfig::offset_scale`]); gradients still reach the learned offsets.
    pub fn with_offset_scale(&self, scale: [f64; 3]) -> candle_core::Result<Self> {
        Ok(Self { obelisk: self.obelisk.with_offset_scale(scale)?, ..self.clone() })
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
        self.bn_out.forward_t(&self.dense.forward_t(x, train)?, train)
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
        let y = if train {
            let grid =
                regular_grid(size, smoothed.dtype(), smoothed.device())?.unsqueeze(0)?.broadcast_as((b, n, 3))?;
            f(&self.sample_points(smoothed, &grid.contiguous()?, None)?)?
        } else {
            let mut parts = Vec::new();
            for s in (0..n).step_by(EVAL_CHUNK) {
                let h = self.obelisk.forward_grid_run(smoothed, size, s, EVAL_CHUNK.min(n - s))?;
                parts.push(f(&h)?.detach());
            }
            Tensor::cat(&parts, 2)?
        };
        let c = y.dim(1)?;
        y.reshape((b, c, size[0], size[1], size[2]))
    }

    /// Intermediate features for registration on the coarse grid, `(B, feature_channels, d, h, w)`
    /// (eval mode).
    pub fn features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.on_grid(&self.smooth(x)?, false, &|h| self.features_from_obelisk(h))
    }

    fn features_from_obelisk(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        self.features_from_samples_t(h, false)
    }

    /// Registration features from the OBELISK layer's output `(B, hidden, P)` at points (see
    /// [`Self::sample_points`]); `train`: batch statistics, as a feature trainer needs.
    pub fn features_from_samples_t(&self, h: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let m = self.trunk(h, train)?;
        match self.cfg.feature_layer {
            ObeliskFeatureLayer::Mid => Ok(m),
            ObeliskFeatureLayer::Dense => self.dense_block(&m, train),
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

/// Conv 3x3x3 → BN → ReLU (leaky when `leak > 0`).
#[derive(Debug, Clone)]
struct ConvBnRelu {
    conv: Conv3d,
    bn: BatchNorm,
    leak: f64,
}

impl ConvBnRelu {
    fn new(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::leaky(cin, cout, stride, 0.0, vb)
    }

    fn leaky(cin: usize, cout: usize, stride: usize, leak: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            conv: Conv3d::new(cin, cout, Conv3dConfig::cube(3, stride, false), vb.pp("conv"))?,
            bn: bn(cout, vb.pp("bn"))?,
            leak,
        })
    }
}

impl ModuleT for ConvBnRelu {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.bn.forward_t(&self.conv.forward(x)?, train)?;
        let y = if self.leak > 0.0 { candle_nn::ops::leaky_relu(&y, self.leak)? } else { y.relu()? };
        Ok(eval_detach(y, train))
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

/// Options of [`HybridNet`]; the defaults are the journal's VISCERAL hybrid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HybridNetConfig {
    pub in_channels: usize,
    pub num_classes: usize,
    /// Encoder channels: full resolution, half resolution (two convs), quarter resolution.
    pub encoder: [usize; 3],
    /// Offsets of OBELISK layer 1 (samples the full-resolution encoder channels on the quarter grid).
    pub kernels1: usize,
    /// Offsets of OBELISK layer 2 (samples the smoothed input on the eighth grid).
    pub kernels2: usize,
    /// Channels after each OBELISK layer's grouped 1x1x1 conv (the dense block input).
    pub hidden: usize,
    pub groups: usize,
    pub growth: usize,
    pub dense_layers: usize,
    /// Channels each OBELISK branch hands to the decoder.
    pub branch_out: usize,
    /// Decoder channels at quarter and half resolution (the half-resolution ones are the
    /// registration features).
    pub decoder: [usize; 2],
    pub offset_std: f64,
    /// Negative slope of the leaky ReLUs of the convolutional layers.
    pub leak: f64,
}

impl Default for HybridNetConfig {
    fn default() -> Self {
        Self {
            in_channels: 1,
            num_classes: 8,
            encoder: [4, 16, 32],
            kernels1: 128,
            kernels2: 512,
            hidden: 128,
            groups: 4,
            growth: 32,
            dense_layers: 3,
            branch_out: 32,
            decoder: [32, 32],
            offset_std: 0.05,
            leak: 0.05,
        }
    }
}

/// An OBELISK layer on a regular grid → ReLU → BN'd dense block of 1x1x1 layers → BN → 1x1x1 →
/// ReLU.
#[derive(Debug, Clone)]
struct ObeliskBranch {
    obelisk: ObeliskLayer,
    dense: DenseBlock,
    bn_out: BatchNorm,
    out: Conv3d,
}

impl ObeliskBranch {
    fn new(in_channels: usize, kernels: usize, cfg: &HybridNetConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let obelisk = ObeliskLayer::new(
            vb.pp("obelisk"),
            ObeliskConfig {
                in_channels,
                kernels,
                binary: false,
                out_channels: cfg.hidden,
                groups: cfg.groups,
                offset_std: cfg.offset_std,
                bias: false,
                self_similarity: false,
            },
        )?;
        let dense = DenseBlock::new(cfg.hidden, cfg.growth, cfg.dense_layers, true, false, &vb)?;
        let c = cfg.hidden + cfg.dense_layers * cfg.growth;
        let bn_out = bn(c, vb.pp("bn_out"))?;
        let out = Conv3d::new(c, cfg.branch_out, Conv3dConfig { bias: false, ..Default::default() }, vb.pp("out"))?;
        Ok(Self { obelisk, dense, bn_out, out })
    }

    /// `(B, branch_out, size)` from `x` sampled on a regular grid of `size`.
    fn forward_t(&self, x: &Tensor, size: [usize; 3], train: bool) -> candle_core::Result<Tensor> {
        let h = self.obelisk.forward_grid(x, size)?.relu()?;
        let h = self.bn_out.forward_t(&self.dense.forward_t(&h, train)?, train)?;
        Ok(eval_detach(self.out.forward(&h)?.relu()?, train))
    }
}

/// The journal's hybrid OBELISK-Net: a small convolutional encoder (full → half → quarter
/// resolution), two OBELISK branches (the full-resolution encoder channels sampled on the quarter
/// grid; the smoothed input on the eighth grid), and a decoder that concatenates them with the
/// encoder features at quarter and half resolution, then a 1x1x1 classifier and trilinear
/// upsampling. Strided convs give `ceil(n/2)` maps whose outer voxels sit at (or, for even sizes,
/// one voxel inside) the outer input voxels, so maps are resized with `align_corners = true` as the
/// OBELISK grids are placed.
#[derive(Debug, Clone)]
pub struct HybridNet {
    enc0: ConvBnRelu,
    enc1: ConvBnRelu,
    enc11: ConvBnRelu,
    enc2: ConvBnRelu,
    branch1: ObeliskBranch,
    branch2: ObeliskBranch,
    dec_quarter: ConvBnRelu,
    dec_half: ConvBnRelu,
    head: Conv3d,
    cfg: HybridNetConfig,
}

impl HybridNet {
    pub fn new(vb: VarBuilder, cfg: HybridNetConfig) -> candle_core::Result<Self> {
        let [e0, e1, e2] = cfg.encoder;
        let [d0, d1] = cfg.decoder;
        let l = cfg.leak;
        Ok(Self {
            enc0: ConvBnRelu::leaky(cfg.in_channels, e0, 1, l, vb.pp("enc0"))?,
            enc1: ConvBnRelu::leaky(e0, e1, 2, l, vb.pp("enc1"))?,
            enc11: ConvBnRelu::leaky(e1, e1, 1, l, vb.pp("enc11"))?,
            enc2: ConvBnRelu::leaky(e1, e2, 2, l, vb.pp("enc2"))?,
            branch1: ObeliskBranch::new(e0, cfg.kernels1, &cfg, vb.pp("branch1"))?,
            branch2: ObeliskBranch::new(cfg.in_channels, cfg.kernels2, &cfg, vb.pp("branch2"))?,
            dec_quarter: ConvBnRelu::leaky(e2 + cfg.branch_out, d0, 1, l, vb.pp("dec_quarter"))?,
            dec_half: ConvBnRelu::leaky(d0 + cfg.branch_out + e1, d1, 1, l, vb.pp("dec_half"))?,
            head: Conv3d::new(d1, cfg.num_classes, Conv3dConfig::default(), vb.pp("head"))?,
            cfg,
        })
    }

    pub fn config(&self) -> &HybridNetConfig {
        &self.cfg
    }

    /// The half-resolution decoder output, `(B, decoder[1], ⌈D/2⌉, ⌈H/2⌉, ⌈W/2⌉)`: the registration
    /// features.
    pub fn features_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let dims = |t: &Tensor| -> candle_core::Result<[usize; 3]> {
            let (_, _, d, h, w) = t.dims5()?;
            Ok([d, h, w])
        };
        let smoothed = avg_pool3d(x, [3; 3], [1; 3], [1; 3])?;
        let x1 = self.enc0.forward_t(x, train)?;
        let x2 = self.enc11.forward_t(&self.enc1.forward_t(&x1, train)?, train)?;
        let x4 = self.enc2.forward_t(&x2, train)?;
        let (half, quarter) = (dims(&x2)?, dims(&x4)?);
        let eighth = quarter.map(|n| n.div_ceil(2));
        let o1 = resize_trilinear_aligned(&self.branch1.forward_t(&x1, quarter, train)?, half)?;
        let o2 = resize_trilinear_aligned(&self.branch2.forward_t(&smoothed, eighth, train)?, quarter)?;
        let y = self.dec_quarter.forward_t(&Tensor::cat(&[&x4, &o2], 1)?, train)?;
        let y = resize_trilinear_aligned(&y, half)?;
        self.dec_half.forward_t(&Tensor::cat(&[&y, &o1, &x2], 1)?, train)
    }

    pub fn features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.features_t(x, false)
    }

    /// Features sampled (trilinearly) at arbitrary points, `(B, decoder[1], P)`.
    pub fn features_at_points(&self, x: &Tensor, points: &Tensor) -> candle_core::Result<Tensor> {
        grid_sample(&self.features(x)?, points, Interpolation::Linear, Padding::Border)
    }
}

impl ModuleT for HybridNet {
    /// Full-volume logits `(B, classes, D, H, W)`: classified at half resolution, upsampled.
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (_, _, d, h, w) = x.dims5()?;
        resize_trilinear_aligned(&self.head.forward(&self.features_t(x, train)?)?, [d, h, w])
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
        assert_eq!(weights, 129_024, "the MIDL reference's offsets and conv weights");
        // + bn1's scale/shift (512) + the dense and head biases (4·32 + 8)
        assert_eq!(total, 129_672);
        assert!(total < 130_000, "the MIDL paper's bound");
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
    fn hybrid_parameter_count_and_shapes() {
        let map = VarMap::new();
        let _ = HybridNet::new(seeded_var_builder(&map, 0, DType::F32, &Device::Cpu), HybridNetConfig::default());
        let total = count_parameters(&map);
        println!("hybrid OBELISK-Net (8 classes): {total} trainable parameters");
        // the journal's "~230k": 128 + 512 offsets, the convs and batch norms of models.py
        assert!((220_000..240_000).contains(&total), "{total}");

        let map = VarMap::new();
        let cfg = HybridNetConfig {
            encoder: [2, 4, 6],
            kernels1: 8,
            kernels2: 16,
            hidden: 8,
            groups: 2,
            growth: 4,
            dense_layers: 2,
            branch_out: 4,
            decoder: [6, 5],
            num_classes: 3,
            ..Default::default()
        };
        let net = HybridNet::new(seeded_var_builder(&map, 1, DType::F32, &Device::Cpu), cfg).unwrap();
        // odd and even sizes: the strided maps are ceil(n/2) and ceil(n/4)
        let x = input([13, 16, 9], 4);
        assert_eq!(net.forward_t(&x, true).unwrap().dims(), &[1, 3, 13, 16, 9]);
        assert_eq!(net.forward_t(&x, false).unwrap().dims(), &[1, 3, 13, 16, 9]);
        let f = net.features(&x).unwrap();
        assert_eq!(f.dims(), &[1, 5, 7, 8, 5]);
        // features at the feature grid's own points reproduce the map
        let g = regular_grid([7, 8, 5], DType::F32, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let fp = net.features_at_points(&x, &g).unwrap();
        let diff = (f.flatten_from(2).unwrap() - fp).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        let two = Tensor::cat(&[&x, &input([13, 16, 9], 5)], 0).unwrap();
        assert_eq!(net.forward_t(&two, true).unwrap().dims(), &[2, 3, 13, 16, 9]);
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
