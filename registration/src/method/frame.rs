//! How the images of one registration (or one propagation) are presented to the feature
//! extractor, so that their features compare.

use super::PointFeatures;
use crate::features::{FeatureExtractor, ObeliskFeatures};
use crate::{Result, Volume};

/// The images' common presentation: stored in RAS voxel order
/// ([`FeatureExtractor::extract_canonical`]) and, where their spacings differ, resampled to one
/// isotropic spacing. MIND-SSC's neighbourhoods and OBELISK's offsets are counted in voxels, so a
/// 3 mm CT and a 1×1×2 mm CT would otherwise be described at three times different scales.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureFrame {
    /// The common isotropic spacing (mm); `None` when the images already share one spacing.
    pub spacing: Option<f64>,
}

impl FeatureFrame {
    /// The frame for images compared with each other: the coarsest of their mean spacings
    /// (geometric mean over the axes), so no image is described at a finer scale than its data
    /// hold. 2D images keep their grids.
    pub fn for_images(images: &[&Volume]) -> Self {
        let Some(first) = images.first().map(|v| v.grid.spacing()) else { return Self { spacing: None } };
        let same = |a: [f64; 3]| (0..3).all(|i| (a[i] - first[i]).abs() <= 0.01 * a[i].max(first[i]));
        if images.iter().any(|v| v.grid.is_2d()) || images.iter().all(|v| same(v.grid.spacing())) {
            return Self { spacing: None };
        }
        let mean = |v: &&Volume| v.grid.spacing().iter().product::<f64>().cbrt();
        Self { spacing: images.iter().map(mean).reduce(f64::max) }
    }

    /// The spacing the pyramid counts from for a pair in this frame: the frame's, else the
    /// fixed image's finest (a 1 mm slab resampled to 3 mm for its features keeps its 12 mm and
    /// 6 mm levels).
    pub fn working_spacing(&self, fixed: &Volume) -> f64 {
        self.spacing.unwrap_or(fixed.grid.min_spacing())
    }

    /// `image` as the extractor sees it in this frame: resampled if needed, in RAS voxel order.
    pub fn image(&self, image: &Volume) -> Result<Volume> {
        Ok(match self.spacing {
            Some(s) => image.with_spacing(s)?.to_canonical(),
            None => image.to_canonical(),
        })
    }

    /// Features of `image` in this frame.
    pub fn extract(&self, extractor: &dyn FeatureExtractor, image: &Volume) -> Result<Volume> {
        extractor.extract(&self.image(image)?)
    }

    /// The exact mode's point features of `image` in this frame, from `model`.
    pub fn point_features(&self, model: &ObeliskFeatures, image: &Volume) -> Result<Box<dyn PointFeatures>> {
        Ok(Box::new(model.at_points(&self.image(image)?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::IntensityFeatures;
    use crate::Grid;

    fn image(shape: [usize; 3], spacing: [f64; 3]) -> Volume {
        Volume::zeros(Grid::from_spacing(shape, spacing, [0.0; 3]).unwrap())
    }

    #[test]
    fn feature_frame_resamples_only_images_of_different_spacing() {
        let a = image([10, 10, 10], [3.0; 3]);
        let b = image([40, 40, 15], [1.0, 1.0, 2.0]);
        assert_eq!(FeatureFrame::for_images(&[&a, &image([5, 6, 7], [3.0, 3.0, 3.01])]).spacing, None);
        assert_eq!(FeatureFrame::for_images(&[&b, &b]).spacing, None);
        let s = FeatureFrame::for_images(&[&b, &a]).spacing.unwrap();
        assert!((s - 3.0).abs() < 1e-12, "the coarser image's spacing: {s}");
        let f = FeatureFrame { spacing: Some(s) }.extract(&IntensityFeatures, &b).unwrap();
        assert_eq!(f.grid.shape(), [13, 13, 10]);
        let flat = image([8, 8, 1], [1.0; 3]);
        assert_eq!(FeatureFrame::for_images(&[&flat, &image([4, 4, 1], [2.0; 3])]).spacing, None);
    }
}
