//! A trained model as a folder: `model.safetensors` (the weights, batch-norm statistics
//! included) and `config.json` (architecture, sizes, input normalisation, labels, and which layer
//! serves as registration features). Also loadable from bytes, so a binary can embed one.

use std::path::Path;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::net::{HybridNet, HybridNetConfig, ObeliskNet, ObeliskNetConfig, UNet3d, UNetConfig};
use crate::nn::{count_parameters, seeded_var_builder};
use crate::ops::{grid_sample, Interpolation, Padding};
use crate::{Error, Result};

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
/// Models in this project hold well under a million weights; a config implying more than this
/// is corrupt or hostile, and refused before anything is allocated (2^27 f32 = 512 MiB).
pub const MAX_PARAMETERS: u64 = 1 << 27;

/// Network architecture with its sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum Architecture {
    ObeliskNet(ObeliskNetConfig),
    Unet(UNetConfig),
    Hybrid(HybridNetConfig),
}

/// Input normalisation `x · scale + offset` applied to raw intensities (`HU / 500`: scale 0.002,
/// offset 0; `HU / 1024 + 1`: scale 1/1024, offset 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InputNorm {
    pub scale: f64,
    pub offset: f64,
    /// The consumer maps each image by its own 0.5 and 99.5 percentiles onto `[0, 1]` before
    /// `scale` and `offset`: models trained on randomised contrasts see no absolute intensities.
    #[serde(default)]
    pub robust: bool,
}

impl Default for InputNorm {
    fn default() -> Self {
        Self { scale: 1.0 / 500.0, offset: 0.0, robust: false }
    }
}

/// The registration feature layer, as recorded for consumers of a saved model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpec {
    pub layer: String,
    pub channels: usize,
    /// Voxel stride of the feature grid relative to the input.
    pub stride: usize,
}

/// Everything `config.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub input_norm: InputNorm,
    pub num_classes: usize,
    /// One name per class, background first (may be empty).
    #[serde(default)]
    pub label_names: Vec<String>,
    pub features: FeatureSpec,
}

impl ModelConfig {
    /// A consistent config for `architecture` (classes and feature spec derived from it).
    pub fn new(architecture: Architecture, input_norm: InputNorm, label_names: Vec<String>) -> Self {
        let (num_classes, features) = match &architecture {
            Architecture::ObeliskNet(c) => (
                c.num_classes,
                FeatureSpec {
                    layer: format!("{:?}", c.feature_layer).to_lowercase(),
                    channels: c.feature_channels(),
                    stride: c.grid_divisor,
                },
            ),
            Architecture::Unet(c) => (
                c.num_classes,
                FeatureSpec { layer: "decoder0".into(), channels: c.channels.first().copied().unwrap_or(0), stride: 1 },
            ),
            Architecture::Hybrid(c) => {
                (c.num_classes, FeatureSpec { layer: "decoder_half".into(), channels: c.decoder[1], stride: 2 })
            }
        };
        Self { architecture, input_norm, num_classes, label_names, features }
    }

    /// An upper bound on the number of weights, or `None` when it overflows: a config file is
    /// untrusted input, and building its network allocates them all.
    pub fn parameter_bound(&self) -> Option<u64> {
        let m = |a: usize, b: usize| (a as u64).checked_mul(b as u64);
        let sum = |v: &[Option<u64>]| v.iter().try_fold(0u64, |acc, x| acc.checked_add((*x)?));
        match &self.architecture {
            Architecture::ObeliskNet(c) => {
                let dense = c.dense_channels_checked()?;
                let layers: Vec<Option<u64>> =
                    (0..c.dense_layers).map(|i| m(c.mid.checked_add(i.checked_mul(c.growth)?)?, c.growth)).collect();
                sum(&[
                    m(c.kernels, if c.binary { 6 } else { 3 }),
                    m(c.in_channels.checked_mul(c.kernels)?, c.hidden),
                    m(c.hidden, c.mid),
                    sum(&layers),
                    m(dense, c.num_classes.checked_add(4)?),
                    m(c.hidden.checked_add(c.mid)?, 4),
                ])
            }
            Architecture::Unet(c) => {
                let mut parts = vec![m(*c.channels.first()?, c.num_classes.checked_add(1)?)];
                let mut prev = c.in_channels;
                for (i, &ch) in c.channels.iter().enumerate() {
                    parts.push(m(27, prev).and_then(|x| x.checked_mul(ch as u64)));
                    parts.push(m(27, ch).and_then(|x| x.checked_mul(ch as u64)));
                    if let Some(&next) = c.channels.get(i + 1) {
                        parts.push(m(27, ch.checked_add(next)?).and_then(|x| x.checked_mul(ch as u64)));
                    }
                    parts.push(m(ch, 12));
                    prev = ch;
                }
                sum(&parts)
            }
            Architecture::Hybrid(c) => {
                // a loose bound (every layer as wide as the widest): it only guards allocation
                let widest = [c.in_channels, c.hidden, c.branch_out, c.num_classes]
                    .into_iter()
                    .chain(c.encoder)
                    .chain(c.decoder)
                    .try_fold(c.dense_layers.checked_mul(c.growth)?.checked_add(c.hidden)?, |a, b| Some(a.max(b)))?;
                let kernels = c.kernels1.checked_add(c.kernels2)?;
                sum(&[
                    m(27 * 16, widest).and_then(|x| x.checked_mul(widest as u64)),
                    m(kernels, widest.checked_mul(widest)?.checked_add(6)?),
                    m(c.dense_layers.checked_add(2)?, widest).and_then(|x| x.checked_mul(widest as u64)),
                ])
            }
        }
    }

    /// Rejects configs whose recorded fields disagree with the architecture, and sizes that
    /// cannot build a network (zero channels, indivisible groups, more than [`MAX_PARAMETERS`]).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Model(m));
        match &self.architecture {
            Architecture::ObeliskNet(c) => {
                let sizes = [
                    ("in_channels", c.in_channels),
                    ("num_classes", c.num_classes),
                    ("kernels", c.kernels),
                    ("groups", c.groups),
                    ("hidden", c.hidden),
                    ("mid", c.mid),
                    ("grid_divisor", c.grid_divisor),
                ];
                if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
                    return bad(format!("{name} must be at least 1"));
                }
                if c.dense_layers > 0 && c.growth == 0 {
                    return bad("growth must be at least 1".into());
                }
                let cin = c.in_channels.saturating_mul(c.kernels);
                if !cin.is_multiple_of(c.groups) || !c.hidden.is_multiple_of(c.groups) {
                    return bad(format!("{} groups do not divide {cin} inputs and {} outputs", c.groups, c.hidden));
                }
                if c.pool_kernel.iter().any(|&k| k == 0 || k % 2 == 0 || k > 63) {
                    return bad(format!("pool_kernel {:?} must hold odd sizes 1..63", c.pool_kernel));
                }
                if c.grid_divisor > 64 {
                    return bad(format!("grid_divisor {} is larger than 64", c.grid_divisor));
                }
                if !(c.offset_std.is_finite() && c.offset_std >= 0.0) {
                    return bad(format!("offset_std {} must be finite and >= 0", c.offset_std));
                }
            }
            Architecture::Hybrid(c) => {
                let sizes = [c.in_channels, c.num_classes, c.kernels1, c.kernels2, c.hidden, c.groups, c.branch_out];
                if sizes.into_iter().chain(c.encoder).chain(c.decoder).any(|v| v == 0) {
                    return bad("every channel, kernel and group count must be at least 1".into());
                }
                if !(c.offset_std.is_finite() && c.offset_std >= 0.0 && c.leak.is_finite()) {
                    return bad(format!("offset_std {} and leak {} must be finite", c.offset_std, c.leak));
                }
            }
            Architecture::Unet(c) => {
                if c.in_channels == 0 || c.num_classes == 0 || c.channels.is_empty() || c.channels.contains(&0) {
                    return bad("in_channels, num_classes and every level's channels must be at least 1".into());
                }
                if c.channels.len() > 16 {
                    return bad(format!("{} levels; at most 16", c.channels.len()));
                }
            }
        }
        match self.parameter_bound() {
            Some(n) if n <= MAX_PARAMETERS => {}
            _ => return bad(format!("the architecture's sizes imply more than {MAX_PARAMETERS} weights")),
        }
        if !(self.input_norm.scale.is_finite() && self.input_norm.offset.is_finite()) {
            return bad("input_norm must hold finite numbers".into());
        }
        let want = ModelConfig::new(self.architecture.clone(), self.input_norm, self.label_names.clone());
        if want.num_classes != self.num_classes || want.features != self.features {
            return Err(Error::Model(format!(
                "config inconsistent: architecture implies {} classes and features {:?}, file says {} and {:?}",
                want.num_classes, want.features, self.num_classes, self.features
            )));
        }
        if !self.label_names.is_empty() && self.label_names.len() != self.num_classes {
            return Err(Error::Model(format!(
                "{} label names for {} classes",
                self.label_names.len(),
                self.num_classes
            )));
        }
        Ok(())
    }
}

/// The network behind a [`Model`].
#[derive(Debug, Clone)]
pub enum Network {
    // boxed: the OBELISK-Net holds many more layers than the U-Net
    Obelisk(Box<ObeliskNet>),
    UNet(UNet3d),
    Hybrid(Box<HybridNet>),
}

/// A network with its variables and config.
pub struct Model {
    pub config: ModelConfig,
    pub varmap: VarMap,
    pub net: Network,
    device: Device,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Model {
    /// A freshly initialised model (f32), weights drawn from `seed`.
    pub fn new(config: ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, DType::F32, device);
        let net = match &config.architecture {
            Architecture::ObeliskNet(c) => Network::Obelisk(Box::new(ObeliskNet::new(vb, c.clone())?)),
            Architecture::Unet(c) => Network::UNet(UNet3d::new(vb, c.clone())?),
            Architecture::Hybrid(c) => Network::Hybrid(Box::new(HybridNet::new(vb, c.clone())?)),
        };
        Ok(Self { config, varmap, net, device: device.clone() })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn num_parameters(&self) -> usize {
        count_parameters(&self.varmap)
    }

    /// Raw intensities → network input.
    pub fn normalise(&self, raw: &Tensor) -> Result<Tensor> {
        let n = self.config.input_norm;
        Ok(raw.to_dtype(DType::F32)?.affine(n.scale, n.offset)?)
    }

    /// Logits `(B, classes, D, H, W)` of a normalised input.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(match &self.net {
            Network::Obelisk(n) => n.forward_t(x, train)?,
            Network::UNet(n) => n.forward_t(x, train)?,
            Network::Hybrid(n) => n.forward_t(x, train)?,
        })
    }

    /// Registration features of a normalised input, `(B, C, d, h, w)`.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.net {
            Network::Obelisk(n) => n.features(x)?,
            Network::UNet(n) => n.features(x)?,
            Network::Hybrid(n) => n.features(x)?,
        })
    }

    /// Registration features at normalised points `(B, P, 3)` of a normalised input, `(B, C, P)`.
    pub fn features_at_points(&self, x: &Tensor, points: &Tensor) -> Result<Tensor> {
        Ok(match &self.net {
            Network::Obelisk(n) => n.features_at_points(x, points)?,
            Network::UNet(n) => n.features_at_points(x, points)?,
            Network::Hybrid(n) => n.features_at_points(x, points)?,
        })
    }

    /// The weights as safetensors bytes.
    pub fn weights_to_bytes(&self) -> Result<Vec<u8>> {
        let data = self.varmap.data().lock().unwrap();
        let tensors: Vec<(&String, &Tensor)> = data.iter().map(|(k, v)| (k, v.as_tensor())).collect();
        safetensors::serialize(tensors, None).map_err(|e| Error::Model(format!("serialising weights: {e}")))
    }

    /// Writes `config.json` and `model.safetensors` into `dir` (created if missing).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let io = |e: std::io::Error| Error::Model(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        let json = serde_json::to_string_pretty(&self.config).map_err(|e| Error::Model(e.to_string()))?;
        write_renamed(&dir.join(WEIGHTS_FILE), &self.weights_to_bytes()?).map_err(io)?;
        write_renamed(&dir.join(CONFIG_FILE), json.as_bytes()).map_err(io)?;
        Ok(())
    }

    /// Loads a model folder written by [`Model::save`]; every error names the file at fault.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let (cfg_path, weights_path) = (dir.join(CONFIG_FILE), dir.join(WEIGHTS_FILE));
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let cfg = read(&cfg_path)
            .and_then(|b| String::from_utf8(b).map_err(|e| format!("{}: {e}", cfg_path.display())))
            .map_err(Error::Model)?;
        let weights = read(&weights_path).map_err(Error::Model)?;
        Self::load_named(&cfg, &weights, &cfg_path.display().to_string(), &weights_path.display().to_string(), device)
    }

    /// Loads from a `config.json` string and safetensors bytes (e.g. `include_bytes!`). Every
    /// variable must be present with the right shape; extra tensors are an error too.
    pub fn load_from_bytes(config_json: &str, safetensors: &[u8], device: &Device) -> Result<Self> {
        Self::load_named(config_json, safetensors, CONFIG_FILE, WEIGHTS_FILE, device)
    }

    /// Parses and checks a `config.json` string (sizes included) without building the network.
    pub fn parse_config(config_json: &str) -> Result<ModelConfig> {
        let config: ModelConfig = serde_json::from_str(config_json).map_err(|e| Error::Model(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// [`Model::load_from_bytes`] with the names the messages give the two files.
    fn load_named(
        config_json: &str,
        safetensors: &[u8],
        cfg_name: &str,
        w_name: &str,
        device: &Device,
    ) -> Result<Self> {
        let msg = |e: Error| match e {
            Error::Model(m) => m,
            e => e.to_string(),
        };
        let config = Self::parse_config(config_json).map_err(|e| Error::Model(format!("{cfg_name}: {}", msg(e))))?;
        let model = Model::new(config, 0, device).map_err(|e| Error::Model(format!("{cfg_name}: {}", msg(e))))?;
        let tensors = candle_core::safetensors::load_buffer(safetensors, device)
            .map_err(|e| Error::Model(format!("{w_name}: {e}")))?;
        let data = model.varmap.data().lock().unwrap();
        for (name, var) in data.iter() {
            let t = tensors.get(name).ok_or_else(|| {
                Error::Model(format!("{w_name}: missing tensor {name} (do the weights belong to {cfg_name}?)"))
            })?;
            if t.shape() != var.shape() {
                return Err(Error::Model(format!(
                    "{w_name}: tensor {name} has shape {:?}, but {cfg_name} implies {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        if let Some(extra) = tensors.keys().find(|k| !data.contains_key(*k)) {
            return Err(Error::Model(format!(
                "{w_name}: unexpected tensor {extra} (do the weights belong to {cfg_name}?)"
            )));
        }
        drop(data);
        Ok(model)
    }
}

/// Writes `path` under a hidden temporary name in the same folder, then renames it into place, so
/// that a crash never leaves a partial file under the final name.
fn write_renamed(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".obelisk-{name}.{}.tmp", std::process::id()));
    let res = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    match res.and_then(|_| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// A frozen model used only for its registration features; takes raw intensities.
#[derive(Debug)]
pub struct FeatureExtractor {
    model: Model,
}

impl FeatureExtractor {
    pub fn new(model: Model) -> Self {
        Self { model }
    }

    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Ok(Self::new(Model::load(dir, device)?))
    }

    pub fn load_from_bytes(config_json: &str, safetensors: &[u8], device: &Device) -> Result<Self> {
        Ok(Self::new(Model::load_from_bytes(config_json, safetensors, device)?))
    }

    pub fn spec(&self) -> &FeatureSpec {
        &self.model.config.features
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Features of a raw `(1, 1, D, H, W)` volume: `(1, C, d, h, w)`, no gradient tracking.
    /// `spacing` (mm, `(D, H, W)` order) places the offsets of models with physical offsets.
    pub fn features(&self, volume: &Tensor, spacing: Option<[f64; 3]>) -> Result<Tensor> {
        let x = self.model.normalise(volume)?;
        Ok(match (&self.model.net, self.offset_scale(&x, spacing)?) {
            (Network::Obelisk(n), Some(s)) => n.with_offset_scale(s)?.features(&x)?,
            _ => self.model.features(&x)?,
        }
        .detach())
    }

    /// The offset factors for a volume of `x`'s size and `spacing`, where the model has
    /// physical offsets (see [`ObeliskNetConfig::offset_scale`]).
    fn offset_scale(&self, x: &Tensor, spacing: Option<[f64; 3]>) -> Result<Option<[f64; 3]>> {
        let (_, _, d, h, w) = x.dims5()?;
        Ok(match (&self.model.config.architecture, spacing) {
            (Architecture::ObeliskNet(c), Some(s)) => c.offset_scale([d, h, w], s),
            _ => None,
        })
    }

    /// Features at normalised points `(1, P, 3)` of a raw volume, `(1, C, P)`, differentiable in
    /// the points.
    pub fn features_at_points(&self, volume: &Tensor, points: &Tensor, spacing: Option<[f64; 3]>) -> Result<Tensor> {
        self.features_at_prepared_points(&self.prepare(volume)?, points, spacing)
    }

    /// The per-volume work of [`Self::features_at_points`], done once: for OBELISK-Net the
    /// normalised, smoothed input; for the U-Net and the hybrid their feature map.
    pub fn prepare(&self, volume: &Tensor) -> Result<Tensor> {
        let x = self.model.normalise(volume)?.detach();
        Ok(match &self.model.net {
            Network::Obelisk(n) => n.smooth(&x)?,
            Network::UNet(n) => n.features(&x)?.detach(),
            Network::Hybrid(n) => n.features(&x)?.detach(),
        })
    }

    /// Features at normalised points `(1, P, 3)` of a volume passed through [`Self::prepare`],
    /// `(1, C, P)`, differentiable in the points (for iterative registration).
    pub fn features_at_prepared_points(
        &self,
        prepared: &Tensor,
        points: &Tensor,
        spacing: Option<[f64; 3]>,
    ) -> Result<Tensor> {
        let p = points.to_dtype(DType::F32)?;
        Ok(match &self.model.net {
            Network::Obelisk(n) => match self.offset_scale(prepared, spacing)? {
                Some(s) => n.with_offset_scale(s)?.features_at_points_smoothed(prepared, &p)?,
                None => n.features_at_points_smoothed(prepared, &p)?,
            },
            Network::UNet(_) | Network::Hybrid(_) => grid_sample(prepared, &p, Interpolation::Linear, Padding::Border)?,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::nn::Rng;

    fn small_obelisk() -> ModelConfig {
        let c = ObeliskNetConfig {
            kernels: 8,
            hidden: 8,
            mid: 8,
            growth: 4,
            dense_layers: 2,
            num_classes: 3,
            ..Default::default()
        };
        ModelConfig::new(Architecture::ObeliskNet(c), InputNorm::default(), vec!["bg".into(), "a".into(), "b".into()])
    }

    pub(crate) fn small_hybrid() -> HybridNetConfig {
        HybridNetConfig {
            encoder: [2, 4, 4],
            kernels1: 4,
            kernels2: 8,
            hidden: 8,
            groups: 2,
            growth: 4,
            dense_layers: 2,
            branch_out: 4,
            decoder: [4, 4],
            num_classes: 2,
            ..Default::default()
        }
    }

    fn volume() -> Tensor {
        let mut r = Rng::new(9);
        let v: Vec<f32> = (0..8 * 9 * 10).map(|_| (r.uniform() * 1000.0 - 500.0) as f32).collect();
        Tensor::from_vec(v, (1, 1, 8, 9, 10), &Device::Cpu).unwrap()
    }

    #[test]
    fn save_and_reload_is_bit_identical() {
        let dir = std::env::temp_dir().join(format!("obelisk-seg-model-{}", std::process::id()));
        for cfg in [
            small_obelisk(),
            ModelConfig::new(
                Architecture::Unet(UNetConfig { channels: vec![2, 4], num_classes: 2, ..Default::default() }),
                InputNorm { scale: 1.0 / 1024.0, offset: 1.0, robust: false },
                vec![],
            ),
            ModelConfig::new(Architecture::Hybrid(small_hybrid()), InputNorm::default(), vec![]),
        ] {
            let m = Model::new(cfg, 7, &Device::Cpu).unwrap();
            // change running statistics so that they must round-trip too
            m.forward_t(&m.normalise(&volume()).unwrap(), true).unwrap();
            m.save(&dir).unwrap();
            let r = Model::load(&dir, &Device::Cpu).unwrap();
            assert_eq!(r.config, m.config);
            let x = m.normalise(&volume()).unwrap();
            let a: Vec<f32> = m.forward_t(&x, false).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = r.forward_t(&x, false).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b);
            let fe = FeatureExtractor::load(&dir, &Device::Cpu).unwrap();
            let f = fe.features(&volume(), None).unwrap();
            assert_eq!(f.dim(1).unwrap(), fe.spec().channels);
            // prepared and one-shot point evaluation agree
            let pts = Tensor::new(&[[[0.1f32, -0.2, 0.3], [0.5, 0.5, -0.7]]], &Device::Cpu).unwrap();
            let a = fe.features_at_points(&volume(), &pts, None).unwrap();
            let b = fe.features_at_prepared_points(&fe.prepare(&volume()).unwrap(), &pts, None).unwrap();
            assert_eq!(a.dims(), &[1, fe.spec().channels, 2]);
            assert_eq!(
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// With physical offsets a kernel covers the same millimetres whatever the field of view:
    /// a pattern padded by a wide empty margin has the same features at its voxels.
    #[test]
    fn physical_offsets_do_not_depend_on_the_field_of_view() {
        let mut cfg = small_obelisk();
        let Architecture::ObeliskNet(c) = &mut cfg.architecture else { unreachable!() };
        c.pool_kernel = [1, 1, 1];
        c.offset_std = 0.1;
        // a smooth pattern on 9³ voxels of 2 mm, and the same pattern inside 25³ voxels
        let pattern =
            |i: usize, j: usize, k: usize| ((i as f32 * 0.7).sin() + (j as f32 * 0.4).cos() * k as f32) * 100.0;
        let (small, big, pad) = (9usize, 25usize, 8usize);
        let vol = |n: usize, shift: usize| {
            let mut v = vec![0f32; n * n * n];
            for k in 0..small {
                for j in 0..small {
                    for i in 0..small {
                        v[((k + shift) * n + j + shift) * n + i + shift] = pattern(i, j, k);
                    }
                }
            }
            Tensor::from_vec(v, (1, 1, n, n, n), &Device::Cpu).unwrap()
        };
        // the centre voxel of the small volume in both volumes' normalised coordinates
        let centre = |n: usize, shift: usize| {
            let c = 2.0 * (shift + small / 2) as f32 / (n - 1) as f32 - 1.0;
            Tensor::new(&[[[c, c, c]]], &Device::Cpu).unwrap()
        };
        let at = |fe: &FeatureExtractor, n: usize, shift: usize| -> Vec<f32> {
            let p = centre(n, shift);
            let f = fe.features_at_points(&vol(n, shift), &p, Some([2.0; 3])).unwrap();
            f.flatten_all().unwrap().to_vec1().unwrap()
        };
        let dir = std::env::temp_dir().join(format!("obelisk-physical-{}", std::process::id()));
        for unit in [None, Some(2.0)] {
            let mut cfg = cfg.clone();
            let Architecture::ObeliskNet(c) = &mut cfg.architecture else { unreachable!() };
            c.offset_unit_mm = unit;
            Model::new(cfg, 3, &Device::Cpu).unwrap().save(&dir).unwrap();
            let fe = FeatureExtractor::load(&dir, &Device::Cpu).unwrap();
            let (a, b) = (at(&fe, small, 0), at(&fe, big, pad));
            let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
            match unit {
                Some(_) => assert!(diff <= 1e-4 * scale.max(1.0), "physical offsets: {a:?} vs {b:?}"),
                None => assert!(diff > 1e-2 * scale, "normalised offsets should differ: {a:?} vs {b:?}"),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn broken_model_files_give_errors() {
        let m = Model::new(small_obelisk(), 1, &Device::Cpu).unwrap();
        let json = serde_json::to_string(&m.config).unwrap();
        let w = m.weights_to_bytes().unwrap();
        assert!(Model::load_from_bytes(&json, &w, &Device::Cpu).is_ok());
        assert!(Model::load_from_bytes("{ not json", &w, &Device::Cpu).is_err());
        assert!(Model::load_from_bytes(&json, &w[..w.len() / 2], &Device::Cpu).is_err());
        assert!(Model::load_from_bytes(&json, b"", &Device::Cpu).is_err());
        // a config whose sizes do not match the weights
        let other = small_obelisk();
        let mut c2 = other.clone();
        if let Architecture::ObeliskNet(a) = &mut c2.architecture {
            a.hidden = 12;
        }
        let c2 = ModelConfig::new(c2.architecture, other.input_norm, other.label_names);
        assert!(Model::load_from_bytes(&serde_json::to_string(&c2).unwrap(), &w, &Device::Cpu).is_err());
        // inconsistent recorded feature spec
        let mut c3 = m.config.clone();
        c3.features.channels += 1;
        assert!(Model::load_from_bytes(&serde_json::to_string(&c3).unwrap(), &w, &Device::Cpu).is_err());
        // missing folder / file
        let dir = std::env::temp_dir().join(format!("obelisk-seg-missing-{}", std::process::id()));
        assert!(Model::load(&dir, &Device::Cpu).is_err());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(CONFIG_FILE), &json).unwrap();
        assert!(Model::load(&dir, &Device::Cpu).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
