//! Geometry, images, transforms, losses and the registration engine of obelisk.
//!
//! Low-level differentiable ops (grid sampling, filtering) live in the `segmentation` crate;
//! this crate adds physical space on top of them.

pub mod discrete;
pub mod engine;
pub mod features;
pub mod fusion;
pub mod grid;
pub mod init;
pub mod loss;
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
    #[error("registration: {0}")]
    Registration(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
