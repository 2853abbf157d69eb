//! Image features that registration compares instead of raw intensities.
//!
//! A [`FeatureExtractor`] turns one image into a multi-channel [`Volume`]; the similarity term
//! then compares the fixed image's features with the warped moving image's features channel by
//! channel. Features that are robust to contrast differences (MIND-SSC) let a plain SSD/L1 cost
//! work across modalities.

pub mod learn;
pub mod mind;
pub mod obelisk;

pub use mind::{MindConfig, MindSsc};
pub use obelisk::{ObeliskFeatures, ObeliskPointFeatures, EMBEDDED_SOURCE};

use rayon::prelude::*;

use crate::{Error, Result, Volume};

/// Something that maps an image to feature maps for registration.
pub trait FeatureExtractor: Send + Sync {
    /// A short name for logs and reports.
    fn name(&self) -> &str;
    /// Number of channels [`extract`](Self::extract) returns.
    fn channels(&self) -> usize;
    /// Feature maps of `image` on `image.grid` (or a downsampled grid; say which via the returned
    /// Volume's grid).
    fn extract(&self, image: &Volume) -> Result<Volume>;

    /// Feature maps of `image` stored in RAS voxel order ([`Volume::to_canonical`]): the form to
    /// compare between images. MIND-SSC's channels and OBELISK's offsets refer to voxel
    /// directions, so an LPS-stored CT and an RAS-stored one would otherwise compare mismatched
    /// channels.
    fn extract_canonical(&self, image: &Volume) -> Result<Volume> {
        self.extract(&image.to_canonical())
    }
}

/// Lower and upper percentile (in %) that [`IntensityFeatures`] maps to 0 and 1.
pub const ROBUST_PERCENTILES: (f64, f64) = (0.5, 99.5);

/// The image itself, robustly normalised: values are clipped to the 0.5–99.5 percentile range
/// of the image and mapped linearly onto `[0, 1]`. Clipping at percentiles rather than at the
/// minimum and maximum keeps a few outliers (metal, air, hot pixels) from squashing the contrast
/// of the tissue. One channel on the image's own grid; a constant image maps to all zeros.
#[derive(Debug, Clone, Copy, Default)]
pub struct IntensityFeatures;

impl FeatureExtractor for IntensityFeatures {
    fn name(&self) -> &str {
        "intensity"
    }

    fn channels(&self) -> usize {
        1
    }

    fn extract(&self, image: &Volume) -> Result<Volume> {
        if image.channels != 1 {
            return Err(Error::Data(format!("intensity features need a 1-channel image, got {}", image.channels)));
        }
        image.check_finite()?;
        Volume::new(image.grid.clone(), 1, robust_unit(&image.data))
    }
}

/// `data` clipped to its [`ROBUST_PERCENTILES`] and mapped linearly onto `[0, 1]` (all zeros
/// when constant): the intensities of [`IntensityFeatures`], and what feature models trained on
/// randomised contrasts see.
pub fn robust_unit(data: &[f32]) -> Vec<f32> {
    let (lo, hi) = percentiles(data, ROBUST_PERCENTILES.0, ROBUST_PERCENTILES.1);
    let range = hi - lo;
    if range > 0.0 {
        data.par_iter().map(|&v| ((f64::from(v) - lo) / range).clamp(0.0, 1.0) as f32).collect()
    } else {
        vec![0.0; data.len()]
    }
}

/// Two percentiles (in %) of finite, non-empty data, interpolated linearly between order
/// statistics (NumPy's default), computed by selection rather than a full sort.
fn percentiles(data: &[f32], p_lo: f64, p_hi: f64) -> (f64, f64) {
    let mut v = data.to_vec();
    let n = v.len();
    let mut at = |p: f64| -> f64 {
        let rank = p / 100.0 * (n - 1) as f64;
        let k = rank.floor() as usize;
        let f = rank - k as f64;
        let (_, &mut a, rest) = v.select_nth_unstable_by(k, f32::total_cmp);
        // The (k+1)-th order statistic is the smallest value above position k.
        let b = rest.iter().copied().fold(f32::INFINITY, f32::min);
        let b = if k + 1 < n { b } else { a };
        f64::from(a) + f * (f64::from(b) - f64::from(a))
    };
    (at(p_lo), at(p_hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Grid;

    #[test]
    fn percentiles_match_numpy_linear() {
        let data: Vec<f32> = (0..201).rev().map(|v| v as f32).collect();
        let (lo, hi) = percentiles(&data, 0.5, 99.5);
        assert!((lo - 1.0).abs() < 1e-9 && (hi - 199.0).abs() < 1e-9, "{lo} {hi}");
        let (lo, hi) = percentiles(&[3.0, 1.0], 25.0, 100.0);
        assert!((lo - 1.5).abs() < 1e-9 && (hi - 3.0).abs() < 1e-9, "{lo} {hi}");
    }

    #[test]
    fn intensity_features_clip_outliers_and_scale() {
        let grid = Grid::from_spacing([20, 10, 5], [1.0; 3], [0.0; 3]).unwrap();
        let mut data: Vec<f32> = (0..1000).map(|v| v as f32).collect();
        data[17] = 1e6; // an outlier must not decide the scale
        let img = Volume::new(grid, 1, data).unwrap();
        let f = IntensityFeatures.extract(&img).unwrap();
        assert_eq!(f.channels, IntensityFeatures.channels());
        let (lo, hi) = f.range();
        assert_eq!((lo, hi), (0.0, 1.0));
        assert_eq!(f.data[17], 1.0);
        // the percentiles of 0..999 (one value replaced) are 4.995 and 995.005: 500 is mid-range
        assert!((f.data[500] - 0.5).abs() < 1e-4, "{}", f.data[500]);
        assert_eq!(f.data[3], 0.0);
        let c = Volume::new(img.grid.clone(), 1, vec![5.0; 1000]).unwrap();
        assert!(IntensityFeatures.extract(&c).unwrap().data.iter().all(|&v| v == 0.0));
        let two = Volume::new(img.grid.clone(), 2, vec![0.0; 2000]).unwrap();
        assert!(IntensityFeatures.extract(&two).is_err());
    }
}
