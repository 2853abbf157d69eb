//! OBELISK-Net in candle: the differentiable sampling ops it needs, the networks and their
//! trainer. No file I/O beyond reading and writing model folders (`model`): callers hand in
//! tensors.

pub mod model;
pub mod net;
pub mod nn;
pub mod obelisk;
pub mod ops;
pub mod train;

pub use model::{Architecture, FeatureExtractor, FeatureSpec, InputNorm, Model, ModelConfig, Network};
pub use net::{HybridNet, HybridNetConfig, ObeliskFeatureLayer, ObeliskNet, ObeliskNetConfig, UNet3d, UNetConfig};
pub use nn::{Conv3d, Conv3dConfig};
pub use obelisk::{ObeliskConfig, ObeliskLayer};
pub use ops::conv3d;
pub use train::{evaluate, evaluate_dice, kfold, leave_one_out, train, Progress, TrainConfig, Trainer};

/// Errors of the segmentation library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model: {0}")]
    Model(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
