//! OBELISK-Net in candle: the differentiable sampling ops it needs, the networks and their
//! trainer. No file I/O: callers hand in tensors.

pub mod model;
pub mod net;
pub mod nn;
pub mod obelisk;
pub mod ops;
pub mod train;

/// Errors of the segmentation library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model: {0}")]
    Model(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
