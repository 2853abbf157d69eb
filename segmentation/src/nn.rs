//! Building blocks shared by the networks: a seeded variable store (candle cannot seed its CPU
//! RNG), a small deterministic PRNG and the 3D convolution layer.

use candle_core::{DType, Device, Module, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::ops::conv3d;

/// SplitMix64: small, fast and reproducible on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n - 1)
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// FNV-1a: a name hash that, unlike `DefaultHasher`, is fixed across Rust releases.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// A [`VarMap`] whose random initialisations come from a seed. Each variable's stream is derived
/// from the seed and its name, so values do not depend on construction order.
struct SeededVarMap {
    map: VarMap,
    seed: u64,
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some(v) = self.map.data().lock().unwrap().get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", v.shape())
            }
            return Ok(v.as_tensor().clone());
        }
        let mut rng = Rng::new(self.seed ^ fnv1a(name));
        let n = s.elem_count();
        let var = match h {
            Init::Const(_) => h.var(s.clone(), dtype, dev)?,
            Init::Randn { mean, stdev } => {
                let v: Vec<f64> = (0..n).map(|_| mean + stdev * rng.normal()).collect();
                Var::from_tensor(&Tensor::from_vec(v, s.clone(), dev)?.to_dtype(dtype)?)?
            }
            Init::Uniform { lo, up } => {
                let v: Vec<f64> = (0..n).map(|_| lo + (up - lo) * rng.uniform()).collect();
                Var::from_tensor(&Tensor::from_vec(v, s.clone(), dev)?.to_dtype(dtype)?)?
            }
            Init::Kaiming { .. } => candle_core::bail!("{name}: use Randn with an explicit std for seeded init"),
        };
        let t = var.as_tensor().clone();
        self.map.data().lock().unwrap().insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        match self.map.data().lock().unwrap().get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("{name} not in the VarMap"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.data().lock().unwrap().contains_key(name)
    }
}

/// A `VarBuilder` that creates missing variables in `map` with seeded random values.
pub fn seeded_var_builder(map: &VarMap, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(SeededVarMap { map: map.clone(), seed }), dtype, device.clone())
}

/// Xavier/Glorot normal initialisation for a conv weight `(Cout, Cin/groups, k...)` as PyTorch
/// computes the fans (`fan_out` uses the full `Cout`), with `gain`.
pub fn xavier_normal(shape: &[usize], gain: f64) -> Init {
    let rf: usize = shape[2..].iter().product();
    let (fan_in, fan_out) = (shape[1] * rf, shape[0] * rf);
    Init::Randn { mean: 0.0, stdev: gain * (2.0 / (fan_in + fan_out) as f64).sqrt() }
}

/// Options of [`Conv3d`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv3dConfig {
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
    pub padding: [usize; 3],
    pub groups: usize,
    /// A bias is redundant before batch norm, hence optional.
    pub bias: bool,
}

impl Default for Conv3dConfig {
    fn default() -> Self {
        Self { kernel: [1; 3], stride: [1; 3], padding: [0; 3], groups: 1, bias: true }
    }
}

impl Conv3dConfig {
    /// A `k³` kernel with "same" padding at the given stride.
    pub fn cube(k: usize, stride: usize, bias: bool) -> Self {
        Self { kernel: [k; 3], stride: [stride; 3], padding: [k / 2; 3], groups: 1, bias }
    }
}

/// A 3D convolution layer: weight `(Cout, Cin/groups, kd, kh, kw)` (Xavier normal, gain √2 as the
/// reference code), zero-initialised bias.
#[derive(Debug, Clone)]
pub struct Conv3d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv3dConfig,
}

impl Conv3d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        cfg: Conv3dConfig,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if cfg.groups == 0 || !in_channels.is_multiple_of(cfg.groups) || !out_channels.is_multiple_of(cfg.groups) {
            candle_core::bail!("conv3d: {in_channels}→{out_channels} not divisible by {} groups", cfg.groups)
        }
        let [kd, kh, kw] = cfg.kernel;
        let shape = [out_channels, in_channels / cfg.groups, kd, kh, kw];
        let weight = vb.get_with_hints(shape.to_vec(), "weight", xavier_normal(&shape, 2f64.sqrt()))?;
        let bias = if cfg.bias { Some(vb.get_with_hints(out_channels, "bias", Init::Const(0.0))?) } else { None };
        Ok(Self { weight, bias, cfg })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Applies the layer to `(B, Cin, P)` point features (a 1x1x1 kernel only).
    pub fn forward_points(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, p) = x.dims3()?;
        let y = self.forward(&x.reshape((b, c, p, 1, 1))?)?;
        let co = y.dim(1)?;
        y.reshape((b, co, p))
    }
}

impl Module for Conv3d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = conv3d(x, &self.weight, self.cfg.stride, self.cfg.padding, self.cfg.groups)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Number of trainable scalars in `map` (batch-norm running statistics excluded).
pub fn count_parameters(map: &VarMap) -> usize {
    map.data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
        .map(|(_, v)| v.elem_count())
        .sum()
}

/// The trainable variables of `map`, in name order (deterministic optimiser state layout).
pub fn trainable_vars(map: &VarMap) -> Vec<Var> {
    let data = map.data().lock().unwrap();
    let mut names: Vec<&String> =
        data.keys().filter(|k| !k.ends_with("running_mean") && !k.ends_with("running_var")).collect();
    names.sort();
    names.into_iter().map(|k| data[k].clone()).collect()
}
