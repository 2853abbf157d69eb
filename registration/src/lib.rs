//! Geometry, images, transforms, losses, features and the registration method of obelisk
//! ([`method::register_pair`]).
//!
//! Low-level differentiable ops (grid sampling, filtering) live in the `segmentation` crate;
//! this crate adds physical space on top of them.

pub mod compose;
pub mod discrete;
pub mod features;
pub mod fusion;
pub mod grid;
pub mod init;
pub mod loss;
pub mod method;
pub mod metrics;
pub mod synth;
pub mod transform;
pub mod volume;
pub mod warp;

pub use grid::{Grid, Space};
pub use volume::{DisplacementField, Labels, Volume};

/// Errors of the registration library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("geometry: {0}")]
    Geometry(String),
    #[error("data: {0}")]
    Data(String),
    /// Two images, maps or fields that must lie on one grid do not.
    #[error("{what} are on different grids ({a:?} vs {b:?} voxels)")]
    GridMismatch { what: String, a: [usize; 3], b: [usize; 3] },
    /// Fixed and moving features of different channel counts.
    #[error("fixed features have {fixed} channels, the {what} {moving}")]
    ChannelMismatch { what: &'static str, fixed: usize, moving: usize },
    /// The loss stopped being a number.
    #[error("the loss became {value} in stage {stage} at iteration {iteration}; the inputs may hold extreme values")]
    NonFiniteLoss { stage: method::Stage, iteration: usize, value: f64 },
    /// The images (or label maps) cannot be brought to overlap.
    #[error("no overlap: {0}")]
    NoOverlap(String),
    /// Computing the features of one image of the pair failed.
    #[error("features of the {image} image: {source}")]
    Features { image: method::Role, source: Box<Error> },
    /// A trained model cannot be used.
    #[error("{model}: {message}")]
    Model { model: String, message: String },
    #[error("registration: {0}")]
    Registration(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
