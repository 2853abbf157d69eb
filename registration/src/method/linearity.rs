//! Whether two images' intensities are linearly related: the measure behind
//! [`Similarity::Auto`]'s choice between local NCC of the intensities and the features' L1.
//!
//! Local NCC is invariant to a gain and an offset in each window and nothing more, so it suits
//! pairs where the moving intensity is, after alignment, close to a linear function of the
//! fixed one. The correlation ratio η² is the share of the moving intensities' variance that
//! *any* function of the fixed intensity explains, r² the share a linear function explains; on
//! images of one modality the two agree, while a non-monotonic contrast map (T1 → T2) leaves
//! η² high and r² low. Their ratio does not depend on how much of the variance either explains
//! (noise and residual misalignment lower both), which an absolute correlation threshold would.

use candle_core::Device;
use segmentation::ops::{grid_sample, Interpolation, Padding};
use serde::{Deserialize, Serialize};

use super::masks::{fixed_weights, moving_valid};
use super::pyramid::Level;
use super::{Masks, Similarity};
use crate::loss::overlap_mask;
use crate::transform::{Affine, SamplingPlan};
use crate::{Result, Volume};

/// Bins of the fixed intensity (by quantile) over which η² is computed.
const BINS: usize = 32;

/// What [`Similarity::Auto`] measured and chose.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SimilarityChoice {
    /// r² / η² of the intensities after the affine stage ([`linearity`]).
    pub linearity: f64,
    /// The threshold it was compared with.
    pub min_linearity: f64,
    /// What the deformable levels compared.
    pub chosen: Similarity,
}

/// r² / η² (in [0, 1], NaN without two distinct intensities in the overlap) of the fixed
/// intensities and the moving ones mapped through `affine`, over the fixed voxels (at `shrink`
/// times the finest spacing) that land inside the moving image and inside the masks.
pub fn linearity(fixed: &Volume, moving: &Volume, affine: &Affine, masks: &Masks, shrink: usize) -> Result<f64> {
    let (fl, ml) = (Level::new(fixed, shrink)?, Level::new(moving, shrink)?);
    let plan = SamplingPlan::new(&fl.grid, &ml.grid, affine, &Device::Cpu)?;
    let sampled = grid_sample(&ml.tensor, &plan.base, Interpolation::Linear, Padding::Border)?;
    let m: Vec<f32> = sampled.flatten_all()?.to_vec1()?;
    let inside: Vec<f32> = overlap_mask(&plan.base, ml.grid.dhw())?.flatten_all()?.to_vec1()?;
    let f: Vec<f32> = fl.tensor.flatten_all()?.to_vec1()?;
    let fw = fixed_weights(masks, &fl.grid);
    let held = match moving_valid(masks, &ml.grid) {
        // the moving mask at the nearest moving voxel, as the similarity counts it
        Some(valid) => {
            let mask = candle_core::Tensor::from_vec(
                valid.iter().map(|&v| if v { 1f32 } else { 0.0 }).collect::<Vec<_>>(),
                (1, 1, ml.grid.dhw().0, ml.grid.dhw().1, ml.grid.dhw().2),
                &Device::Cpu,
            )?;
            Some(
                grid_sample(&mask, &plan.base, Interpolation::Nearest, Padding::Zeros)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            )
        }
        None => None,
    };
    let pairs: Vec<(f64, f64)> = (0..f.len())
        .filter(|&i| {
            inside[i] > 0.5 && fw.as_ref().is_none_or(|w| w[i] >= 0.5) && held.as_ref().is_none_or(|h| h[i] > 0.5)
        })
        .map(|i| (f[i] as f64, m[i] as f64))
        .collect();
    Ok(ratio(&pairs))
}

/// r² / η² of `(x, y)` samples, η² over [`BINS`] quantile bins of `x` (ties in one bin).
pub fn ratio(pairs: &[(f64, f64)]) -> f64 {
    let n = pairs.len() as f64;
    if pairs.len() < 2 * BINS {
        return f64::NAN;
    }
    let (mx, my) = pairs.iter().fold((0.0, 0.0), |(a, b), &(x, y)| (a + x / n, b + y / n));
    let (mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0);
    for &(x, y) in pairs {
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
        sxy += (x - mx) * (y - my);
    }
    if sxx <= 0.0 || syy <= 0.0 {
        return f64::NAN;
    }
    let r2 = sxy * sxy / (sxx * syy);
    let mut xs: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    let edges: Vec<f64> = (1..BINS).map(|k| xs[k * (xs.len() - 1) / BINS]).collect();
    let (mut count, mut sum) = ([0.0f64; BINS], [0.0f64; BINS]);
    for &(x, y) in pairs {
        // the bin after every edge at or below x: equal values share a bin
        let b = edges.partition_point(|&e| e <= x).min(BINS - 1);
        count[b] += 1.0;
        sum[b] += y;
    }
    let between: f64 = (0..BINS).filter(|&b| count[b] > 0.0).map(|b| count[b] * (sum[b] / count[b] - my).powi(2)).sum();
    let eta2 = between / syy;
    if eta2 <= 0.0 {
        return f64::NAN;
    }
    (r2 / eta2).min(1.0)
}

/// The similarity `configured` stands for once the linearity is known: itself unless it is
/// [`Similarity::Auto`].
pub fn resolve(configured: Similarity, linearity: f64) -> Similarity {
    match configured {
        Similarity::Auto { radius, min_linearity } if linearity >= min_linearity => Similarity::ncc(radius),
        Similarity::Auto { .. } => Similarity::L1,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(map: impl Fn(f64) -> f64) -> Vec<(f64, f64)> {
        // a three-tissue image with noise: the contrast map decides the relation
        (0..3000)
            .map(|i| {
                let tissue = [20.0, 60.0, 100.0][i % 3];
                let noise = ((i * 7919) % 101) as f64 / 101.0 - 0.5;
                let x = tissue + 4.0 * noise;
                (x, map(tissue) + 3.0 * (((i * 104729) % 89) as f64 / 89.0 - 0.5))
            })
            .collect()
    }

    #[test]
    fn linear_contrasts_score_near_one_and_a_non_monotonic_one_low() {
        let same = ratio(&samples(|t| t));
        let inverted = ratio(&samples(|t| 200.0 - 1.5 * t));
        // T2-like: the middle tissue brightest
        let folded = ratio(&samples(|t| if t == 60.0 { 150.0 } else { 30.0 + 0.2 * t }));
        assert!(same > 0.95 && inverted > 0.95, "{same} {inverted}");
        assert!(folded < 0.3, "{folded}");
        assert!(ratio(&[(1.0, 2.0); 10]).is_nan());
    }

    #[test]
    fn resolve_keeps_explicit_choices() {
        let auto = Similarity::Auto { radius: 3, min_linearity: 0.85 };
        assert_eq!(resolve(auto, 0.9), Similarity::ncc(3));
        assert_eq!(resolve(auto, 0.5), Similarity::L1);
        assert_eq!(resolve(auto, f64::NAN), Similarity::L1);
        assert_eq!(resolve(Similarity::L1, 0.99), Similarity::L1);
    }
}
