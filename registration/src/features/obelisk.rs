//! Learned OBELISK features for registration: a trained segmentation model, frozen, used as a
//! [`FeatureExtractor`]; either a model folder or the default model compiled into the library.

use std::path::Path;
use std::sync::Arc;

use super::FeatureExtractor;
use crate::{Error, Grid, Volume};
use candle_core::{Device, Tensor};
use nalgebra::Matrix4;

/// The default model, trained on synthetic phantoms only by `data-scripts/train-default-model.sh`
/// (which regenerates these files; see `models/default/heldout_dice.json` for its Dice).
const EMBEDDED_CONFIG: &str = include_str!("../../../models/default/config.json");
const EMBEDDED_WEIGHTS: &[u8] = include_bytes!("../../../models/default/model.safetensors");

/// How the embedded model is named in messages.
pub const EMBEDDED_SOURCE: &str = "embedded default model";

/// The frozen feature layer of a trained model (cheap to clone: the network is shared).
#[derive(Debug, Clone)]
pub struct ObeliskFeatures {
    inner: Arc<segmentation::FeatureExtractor>,
    /// The model folder, or [`EMBEDDED_SOURCE`].
    source: String,
}

impl ObeliskFeatures {
    /// Loads the model folder `dir` (`config.json` + `model.safetensors`); errors name the folder.
    pub fn load(dir: &Path) -> crate::Result<Self> {
        let model = |message: String| Error::Model { model: dir.display().to_string(), message };
        if !dir.is_dir() {
            return Err(model("model folder not found".into()));
        }
        let inner = segmentation::FeatureExtractor::load(dir, &Device::Cpu)
            .map_err(|e| model(format!("cannot load the model: {e}")))?;
        Ok(Self { inner: Arc::new(inner), source: dir.display().to_string() })
    }

    /// The default model compiled into the binary.
    pub fn embedded() -> crate::Result<Self> {
        let inner = segmentation::FeatureExtractor::load_from_bytes(EMBEDDED_CONFIG, EMBEDDED_WEIGHTS, &Device::Cpu)
            // only a build whose models/default does not match the model format can get here
            .map_err(|e| Error::Model {
                model: EMBEDDED_SOURCE.into(),
                message: format!("cannot be loaded ({e}); rerun data-scripts/train-default-model.sh and rebuild"),
            })?;
        Ok(Self { inner: Arc::new(inner), source: EMBEDDED_SOURCE.to_string() })
    }

    /// The model folder, or [`EMBEDDED_SOURCE`].
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Weights of the network.
    pub fn num_parameters(&self) -> usize {
        self.inner.model().num_parameters()
    }

    /// Voxel stride of the feature maps relative to the image.
    pub fn stride(&self) -> usize {
        self.inner.spec().stride
    }
}

/// OBELISK features of one image computed wherever they are asked for (the paper's exact
/// registration mode): the per-image work (normalising, smoothing) is done once.
pub struct ObeliskPointFeatures {
    inner: Arc<segmentation::FeatureExtractor>,
    grid: Grid,
    prepared: Tensor,
    spacing: [f64; 3],
}

/// `grid`'s spacing in the `(D, H, W)` order of the network's input.
fn dhw_spacing(grid: &Grid) -> [f64; 3] {
    let s = grid.spacing();
    [s[2], s[1], s[0]]
}

impl ObeliskFeatures {
    /// Point features of `image` (one channel), whose normalised coordinates the points use.
    /// Pass the image as it was presented to [`FeatureExtractor::extract`] (same voxel order and
    /// spacing), so that the values at the feature grid's points are those of the maps.
    pub fn at_points(&self, image: &Volume) -> crate::Result<ObeliskPointFeatures> {
        let prepared = self.run(image, |x| self.inner.prepare(x))?;
        Ok(ObeliskPointFeatures {
            inner: self.inner.clone(),
            grid: image.grid.clone(),
            prepared,
            spacing: dhw_spacing(&image.grid),
        })
    }

    /// `f` on the checked one-channel image as a `(1, 1, D, H, W)` tensor; errors name the model.
    fn run(&self, image: &Volume, f: impl FnOnce(&Tensor) -> segmentation::Result<Tensor>) -> crate::Result<Tensor> {
        if image.channels != 1 {
            return Err(Error::Data(format!("OBELISK features need a 1-channel image, got {}", image.channels)));
        }
        image.check_finite()?;
        let (d, h, w) = image.grid.dhw();
        let x = if self.inner.model().config.input_norm.robust {
            Tensor::from_vec(super::robust_unit(&image.data), (1, 1, d, h, w), &Device::Cpu)?
        } else {
            Tensor::from_slice(&image.data, (1, 1, d, h, w), &Device::Cpu)?
        };
        f(&x).map_err(|e| Error::Data(format!("OBELISK features (model {}): {e}", self.source)))
    }
}

impl crate::method::PointFeatures for ObeliskPointFeatures {
    fn grid(&self) -> &Grid {
        &self.grid
    }

    fn channels(&self) -> usize {
        self.inner.spec().channels
    }

    fn at(&self, points: &Tensor) -> crate::Result<Tensor> {
        self.inner
            .features_at_prepared_points(&self.prepared, points, Some(self.spacing))
            .map_err(|e| Error::Registration(format!("OBELISK point features: {e}")))
    }
}

/// The lattice of a feature map of shape `feature_shape` (`[nx, ny, nz]`) computed from an image
/// on `image`. The network samples its feature grid at `align_corners = true` positions of the
/// `[-1, 1]` cube, so feature voxel `c` sits at image voxel `c·(N−1)/(n−1)` per axis (and at the
/// centre `(N−1)/2` for an axis of one feature voxel).
pub fn feature_grid(image: &Grid, feature_shape: [usize; 3]) -> Result<Grid, Error> {
    let shape = image.shape();
    let mut m = Matrix4::identity();
    for a in 0..3 {
        let (big, small) = (shape[a] as f64, feature_shape[a] as f64);
        if feature_shape[a] > 1 {
            m[(a, a)] = (big - 1.0) / (small - 1.0);
        } else {
            // one sample at the centre; the spacing only needs to be non-zero and stands for the
            // whole extent the sample summarises
            m[(a, a)] = big.max(1.0);
            m[(a, 3)] = (big - 1.0) / 2.0;
        }
    }
    Grid::new(feature_shape, image.affine() * m)
}

impl FeatureExtractor for ObeliskFeatures {
    fn name(&self) -> &str {
        "obelisk"
    }

    fn channels(&self) -> usize {
        self.inner.spec().channels
    }

    fn extract(&self, image: &Volume) -> crate::Result<Volume> {
        let f = self.run(image, |x| self.inner.features(x, Some(dhw_spacing(&image.grid))))?;
        let (_, c, fd, fh, fw) = f.dims5()?;
        let data: Vec<f32> = f.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        Volume::new(feature_grid(&image.grid, [fw, fh, fd])?, c, data)
    }
}

#[cfg(test)]
mod tests {
    use crate::Space;
    use segmentation::{Architecture, InputNorm, Model, ModelConfig, ObeliskNetConfig};

    use super::*;

    #[test]
    fn feature_grid_maps_corners_to_corners() {
        let img = Grid::from_spacing([33, 17, 9], [2.0, 3.0, 4.0], [10.0, -5.0, 7.0]).unwrap();
        let f = feature_grid(&img, [8, 4, 1]).unwrap();
        let last = img.map([32.0, 16.0, 4.0], Space::Voxel, Space::Ras);
        let flast = f.map([7.0, 3.0, 0.0], Space::Voxel, Space::Ras);
        for a in 0..3 {
            assert!((last[a] - flast[a]).abs() < 1e-9, "{last:?} vs {flast:?}");
        }
        assert_eq!(f.map([0.0; 3], Space::Voxel, Space::Ras)[0], img.origin_ras()[0]);
        assert!((f.spacing()[0] - 2.0 * 32.0 / 7.0).abs() < 1e-9);
    }

    /// A feature map of a bright blob must peak where the blob is, in world coordinates. With a
    /// stride of 4 the align-corners placement and an average-pooling placement differ by
    /// several voxels near the far corner, where the blob sits.
    #[test]
    fn features_of_a_blob_peak_at_the_blob() {
        let dir = std::env::temp_dir().join(format!("obelisk-feat-test-{}", std::process::id()));
        let cfg = ObeliskNetConfig {
            kernels: 16,
            hidden: 8,
            mid: 8,
            growth: 4,
            dense_layers: 1,
            num_classes: 2,
            pool_kernel: [1, 1, 1],
            grid_divisor: 4,
            ..Default::default()
        };
        let model =
            Model::new(ModelConfig::new(Architecture::ObeliskNet(cfg), InputNorm::default(), vec![]), 3, &Device::Cpu)
                .unwrap();
        // First offsets of each pair at the point itself, second ones far outside (zero padding):
        // every sampled channel is then the intensity at the point, and (eval-mode batch norm
        // being affine, ReLU of a multiple of a non-negative input being linear) every feature
        // channel is an affine function of the intensity, extreme where the image is brightest.
        {
            let data = model.varmap.data().lock().unwrap();
            let (_, var) = data.iter().find(|(k, _)| k.ends_with("offsets")).unwrap();
            let s = var.dims()[0];
            let mut o = vec![0f32; s * 3];
            o[s / 2 * 3..].iter_mut().for_each(|v| *v = 5.0);
            var.set(&Tensor::from_vec(o, (s, 3), &Device::Cpu).unwrap()).unwrap();
        }
        model.save(&dir).unwrap();
        let fe = ObeliskFeatures::load(&dir).unwrap();
        let grid = Grid::from_spacing([30, 26, 22], [2.0, 2.5, 3.0], [-20.0, 4.0, 9.0]).unwrap();
        // feature voxel (5, 4, 3) of the 7 x 6 x 5 feature grid
        let blob_vox = [5.0 * 29.0 / 6.0, 4.0 * 25.0 / 5.0, 3.0 * 21.0 / 4.0];
        let blob = grid.map(blob_vox, Space::Voxel, Space::Ras);
        let mut data = Vec::new();
        for k in 0..22 {
            for j in 0..26 {
                for i in 0..30 {
                    let p = grid.map([i as f64, j as f64, k as f64], Space::Voxel, Space::Ras);
                    let r2: f64 = (0..3).map(|a| (p[a] - blob[a]).powi(2)).sum();
                    data.push((1000.0 * (-r2 / (2.0 * 6.0f64.powi(2))).exp()) as f32);
                }
            }
        }
        let img = Volume::new(grid.clone(), 1, data).unwrap();
        let f = fe.extract(&img).unwrap();
        assert_eq!(f.channels, fe.channels());
        assert_eq!(f.grid.shape(), [7, 6, 5]);
        let n = f.grid.num_voxels();
        let spread = |c: usize| {
            let ch = &f.data[c * n..(c + 1) * n];
            let (lo, hi) = ch.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            hi - lo
        };
        let c = (0..f.channels).max_by(|&a, &b| spread(a).total_cmp(&spread(b))).unwrap();
        assert!(spread(c) > 0.0);
        let ch = &f.data[c * n..(c + 1) * n];
        // the background dominates the mean, so the blob is the value farthest from it
        let mean = ch.iter().sum::<f32>() / n as f32;
        let best = (0..n).max_by(|&a, &b| (ch[a] - mean).abs().total_cmp(&(ch[b] - mean).abs())).unwrap();
        let [nx, ny, _] = f.grid.shape();
        let v = [(best % nx) as f64, ((best / nx) % ny) as f64, (best / (nx * ny)) as f64];
        assert_eq!(v, [5.0, 4.0, 3.0]);
        let at = f.grid.map(v, Space::Voxel, Space::Ras);
        let dist = (0..3).map(|a| (at[a] - blob[a]).powi(2)).sum::<f64>().sqrt();
        assert!(dist < 1e-3, "peak at {at:?}, blob at {blob:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The exact mode's point features, evaluated at the feature grid's voxels, are the maps
    /// `extract` computes: same coordinates, same values.
    #[test]
    fn point_features_at_the_feature_grid_equal_the_maps() {
        use crate::method::PointFeatures;
        let fe = ObeliskFeatures::embedded().unwrap();
        let grid = Grid::from_spacing([28, 24, 20], [4.0, 3.0, 5.0], [3.0, -7.0, 2.0]).unwrap();
        let data = (0..grid.num_voxels()).map(|i| ((i * 7919 % 211) as f32 - 100.0) * 8.0).collect();
        let img = Volume::new(grid.clone(), 1, data).unwrap();
        let maps = fe.extract(&img).unwrap();
        let pf = fe.at_points(&img).unwrap();
        assert_eq!(pf.channels(), maps.channels);
        let to_norm = img.grid.matrix(Space::Lps, Space::Normalised) * maps.grid.matrix(Space::Voxel, Space::Lps);
        let [nx, ny, nz] = maps.grid.shape();
        let pts: Vec<f32> = (0..nx * ny * nz)
            .flat_map(|v| {
                let p = [(v % nx) as f64, ((v / nx) % ny) as f64, (v / (nx * ny)) as f64];
                crate::grid::apply(&to_norm, p).map(|c| c as f32)
            })
            .collect();
        let n = nx * ny * nz;
        let at = pf.at(&Tensor::from_vec(pts, (1, n, 3), &Device::Cpu).unwrap()).unwrap();
        let at: Vec<f32> = at.flatten_all().unwrap().to_vec1().unwrap();
        let scale = maps.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = at.iter().zip(&maps.data).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-4 * scale.max(1.0), "max difference {diff} (scale {scale})");
    }

    /// The compiled-in model loads and describes an image with the channels and stride its
    /// config promises.
    #[test]
    fn embedded_model_gives_features_of_its_configured_shape() {
        let fe = ObeliskFeatures::embedded().unwrap();
        let config: serde_json::Value = serde_json::from_str(EMBEDDED_CONFIG).unwrap();
        let channels = config["features"]["channels"].as_u64().unwrap() as usize;
        let stride = config["features"]["stride"].as_u64().unwrap() as usize;
        assert!(channels > 0);
        assert_eq!(fe.channels(), channels);
        assert_eq!(fe.stride(), stride);
        assert_eq!(fe.source(), EMBEDDED_SOURCE);
        let grid = Grid::from_spacing([32, 24, 16], [4.0; 3], [0.0; 3]).unwrap();
        let data = (0..grid.num_voxels()).map(|i| ((i % 97) as f32 - 48.0) * 20.0).collect();
        let f = fe.extract(&Volume::new(grid, 1, data).unwrap()).unwrap();
        assert_eq!(f.channels, channels);
        assert_eq!(f.grid.shape(), [32 / stride, 24 / stride, 16 / stride]);
        assert!(f.data.iter().all(|v| v.is_finite()));
        assert!(f.data.iter().any(|&v| v != f.data[0]), "constant features");
    }
}
