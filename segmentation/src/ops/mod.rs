//! Differentiable low-level ops that candle lacks: 3D grid sampling and separable axis filters
//! (average pooling, trilinear resizing, B-spline smoothing), 3D convolution and the fused local NCC loss. Each has a CPU forward and a
//! backward pass checked against finite differences.

pub mod axis;
pub mod conv3d;
pub mod displaced;
pub mod kernel_sample;
pub mod ncc;
pub mod sample;

pub use axis::{
    avg_pool3d, box_filter3d, bspline_smooth3d, resize, resize_trilinear, resize_trilinear_aligned, AxisOperator,
    Boundary,
};
pub use conv3d::{conv3d, unfold3d, ConvGeometry};
pub use displaced::{DisplacedSampler, SquaringStep};
pub use kernel_sample::{kernel_sample, kernel_sample_grid};
pub use ncc::local_ncc;
pub use sample::{grid_sample, sample_point, Dims, Interpolation, Padding, SampledL1};

pub(crate) fn bail<T>(msg: impl Into<String>) -> candle_core::Result<T> {
    Err(candle_core::Error::Msg(msg.into()))
}

/// The contiguous slice a layout points at.
pub(crate) fn slice_of<'a, T>(v: &'a [T], l: &candle_core::Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail("op needs a contiguous tensor"),
    }
}

#[cfg(test)]
mod tests;
