//! Where the optimisation starts: the header, the centres of mass, the translation search
//! (on features or label maps), and the competition of the search's best starts through the
//! affine stage.

use rayon::prelude::*;
use serde::Serialize;

use super::affine::{affine_stage, AffineOutcome};
use super::{silent, FeaturePair, MethodConfig, Start};
use crate::features::{FeatureExtractor, IntensityFeatures};
use crate::init::{search_translation, SearchConfig, SearchResult, SearchScore};
use crate::transform::{grid_points_lps, Affine};
use crate::{Error, Labels, Result, Space, Volume};

/// A start of the affine stage and the loss the stage ended at.
#[derive(Debug, Clone, Serialize)]
pub struct AffineStart {
    pub translation_mm: [f64; 3],
    pub affine_loss: f64,
}

/// Where the moving image was placed before the optimisation.
pub struct Placement {
    /// The translation search's outcome ([`Start::Search`], [`Start::Labels`]).
    pub search: Option<SearchResult>,
    /// The translation kept (LPS mm): fixed `x` corresponds to moving `x + t`.
    pub translation_mm: [f64; 3],
    /// The search's starts the affine stage was run from and the loss each ended at; empty
    /// where there was one start.
    pub affine_starts: Vec<AffineStart>,
    /// The affine stage already run from the kept start, when starts competed.
    pub affine: Option<AffineOutcome>,
}

/// Intensity-weighted centre of mass (LPS mm) of the robustly normalised image.
pub fn centre_of_mass(v: &Volume) -> Result<[f64; 3]> {
    let w = IntensityFeatures.extract(v)?;
    let pts = grid_points_lps(&v.grid);
    let mut acc = [0.0f64; 4];
    for (p, &m) in pts.iter().zip(&w.data) {
        let m = m as f64;
        for a in 0..3 {
            acc[a] += m * p[a];
        }
        acc[3] += m;
    }
    if acc[3] <= 0.0 {
        return Ok(v.grid.map(v.grid.center_ras(), Space::Ras, Space::Lps));
    }
    Ok([acc[0] / acc[3], acc[1] / acc[3], acc[2] / acc[3]])
}

/// Translation that best lines up the shared structures of two label maps, found by the same
/// search as the feature-driven start (one channel per shared label).
pub fn label_start(fixed: &Labels, moving: &Labels, search: &SearchConfig) -> Result<SearchResult> {
    let shared = fixed.shared_ids(moving);
    if shared.is_empty() {
        return Err(Error::NoOverlap("the label start: the two label maps share no label id".into()));
    }
    let cfg = SearchConfig { score: SearchScore::Dice, ..search.clone() };
    search_translation(&fixed.one_hot(&shared), &moving.one_hot(&shared), &cfg)
}

/// The search's result first, then its other refined candidates that lie more than a coarse
/// voxel from every start kept and scored within `score_ratio` of the best candidate, up to `n`
/// in all.
fn distinct_starts(r: &SearchResult, n: usize, score_ratio: f64, far_mm: f64) -> Vec<[f64; 3]> {
    let best = r.candidates.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
    let mut v = vec![r.translation_mm];
    for (t, score) in &r.candidates {
        if v.len() >= n {
            break;
        }
        let close = *score <= score_ratio * best;
        if close && v.iter().all(|s| (0..3).map(|a| (s[a] - t[a]).powi(2)).sum::<f64>().sqrt() > far_mm) {
            v.push(*t);
        }
    }
    v
}

/// Places the moving image by `cfg.start`. The translation search ranks starts on 7–10 mm maps
/// and by translation alone; patients lying differently can put the right start second. The
/// affine stage run from each of the search's best distinct starts, scored by its final loss,
/// settles it at little cost (the affine stage is a small part of a registration).
/// `cfg` is the configuration as run (adapted to the feature grid).
pub(crate) fn place(pair: &FeaturePair, cfg: &MethodConfig) -> Result<Placement> {
    let mut search = None;
    let mut starts = Vec::new();
    let translation_mm = match cfg.start {
        Start::None => [0.0; 3],
        Start::Com => {
            let (cf, cm) = (centre_of_mass(pair.fixed)?, centre_of_mass(pair.moving)?);
            [cm[0] - cf[0], cm[1] - cf[1], cm[2] - cf[2]]
        }
        Start::Search | Start::Labels => {
            let r = match (cfg.start, pair.labels) {
                (Start::Labels, Some((f, m))) => label_start(f, m, &cfg.search)?,
                (Start::Labels, None) => {
                    return Err(Error::Registration("the label start needs the label maps of both images".into()))
                }
                _ => {
                    let r = search_translation(pair.fixed_features, pair.moving_features, &cfg.search)?;
                    let s = &cfg.affine_starts;
                    starts = distinct_starts(&r, s.count, s.score_ratio, cfg.search.coarse_mm);
                    r
                }
            };
            let t = r.translation_mm;
            search = Some(r);
            t
        }
    };
    let mut placement = Placement { search, translation_mm, affine_starts: Vec::new(), affine: None };
    if starts.len() > 1 && cfg.affine_iterations > 0 {
        // the starts are independent and the affine stage is mostly candle's one-threaded small
        // ops: side by side they take about half the time; each gives the same result on any
        // number of threads
        let (fixed, moving, masks) = (pair.fixed_features, pair.moving_features, pair.masks);
        let outcomes: Vec<_> = starts
            .par_iter()
            .map(|&t| affine_stage(fixed, moving, &masks, &Affine::translation(t), cfg, &mut silent()))
            .collect();
        for (&t, a) in starts.iter().zip(outcomes) {
            let a = a?;
            placement.affine_starts.push(AffineStart { translation_mm: t, affine_loss: a.report.final_loss });
            // another start must end clearly lower; ties keep the search's best
            let kept = placement
                .affine
                .as_ref()
                .map_or(f64::INFINITY, |p| (1.0 - cfg.affine_starts.margin) * p.report.final_loss);
            if a.report.final_loss < kept {
                placement.translation_mm = t;
                placement.affine = Some(a);
            }
        }
    }
    Ok(placement)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_starts_keep_the_best_and_skip_near_duplicates() {
        let r = SearchResult {
            translation_mm: [0.0, 0.0, 1.0],
            score: 0.1,
            overlap_fraction: 1.0,
            candidates: vec![
                ([0.0, 0.0, 0.0], 0.1),
                ([0.0, 0.0, 9.0], 0.11),
                ([0.0, 30.0, 0.0], 0.12),
                ([0.0, 31.0, 0.0], 0.121),
                ([50.0, 0.0, 0.0], 0.2),
                ([40.0, 0.0, 0.0], 0.124),
            ],
            evaluations: 0,
        };
        // (50, 0, 0) scored twice the best: no competitor
        assert_eq!(distinct_starts(&r, 3, 1.25, 10.0), vec![[0.0, 0.0, 1.0], [0.0, 30.0, 0.0], [40.0, 0.0, 0.0]]);
        assert_eq!(distinct_starts(&r, 1, 1.25, 10.0), vec![[0.0, 0.0, 1.0]]);
        let far_worse = SearchResult { candidates: vec![([0.0; 3], 0.1), ([0.0, 0.0, 30.0], 0.13)], ..r };
        assert_eq!(distinct_starts(&far_worse, 3, 1.25, 10.0), vec![[0.0, 0.0, 1.0]]);
    }

    #[test]
    fn label_start_without_shared_labels_is_no_overlap() {
        let g = crate::Grid::from_spacing([4, 4, 4], [1.0; 3], [0.0; 3]).unwrap();
        let a = Labels::new(g.clone(), vec![1; 64]).unwrap();
        let b = Labels::new(g, vec![2; 64]).unwrap();
        assert!(matches!(label_start(&a, &b, &SearchConfig::default()), Err(Error::NoOverlap(_))));
    }
}
