//! The options of the whole method in one place: start, affine stage, discrete search,
//! deformable levels and regularisation.

use serde::{Deserialize, Serialize};

use crate::discrete::DiscreteConfig;
use crate::init::SearchConfig;

/// How the moving image is placed before optimisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Start {
    /// Trust the headers: world coordinates already correspond.
    None,
    /// Translate so that the intensity centres of mass coincide.
    Com,
    /// Search every translation over which the fields of view overlap, scored on coarse feature
    /// maps (finds a thin slab in a whole-body atlas whatever its header says).
    #[default]
    Search,
    /// The same search scored on the label maps' shared structures instead of image features
    /// (needs both label maps; a reference start for comparisons).
    Labels,
}

/// What the deformable levels optimise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Parameterisation {
    /// The displacement itself: a little faster, but free to fold.
    Displacement,
    /// A stationary velocity field whose exponential (scaling and squaring, the velocity
    /// divided by `2^squarings`) is the displacement: each small step is invertible, so the
    /// deformable part cannot fold.
    Velocity { squarings: usize },
}

impl Default for Parameterisation {
    fn default() -> Self {
        Parameterisation::Velocity { squarings: 6 }
    }
}

/// How the deformable levels compare the fixed features with the warped moving features.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Similarity {
    /// Mean absolute difference of the feature vectors: the OBELISK/MIND cost, suited to
    /// features made comparable across modalities.
    L1,
    /// Local normalised cross-correlation of the intensities in a `(2·radius+1)`-voxel box
    /// (ANTs' CC), scaled by `weight` against the regularisers, plus the features' L1 scaled by
    /// `features` (0: NCC alone): invariant to local linear intensity changes, for images of
    /// one modality.
    Ncc { radius: usize, weight: f64, features: f64 },
    /// Chosen per pair after the affine stage: [`Similarity::ncc`] where the intensities are
    /// linearly related ([`super::linearity`] at least `min_linearity`: one modality, or
    /// contrasts that differ by gain and offset), else [`Similarity::L1`] of the features. On
    /// the development corpus NCC (with its full-resolution level) was the more accurate on
    /// every pair of one modality (linearity 0.90–1.00) and on PD → T1 (0.87), the less
    /// accurate on T1 → T2-like (0.61); CT ↔ MR scored 0.08–0.20.
    Auto { radius: usize, min_linearity: f64 },
}

impl Default for Similarity {
    fn default() -> Self {
        Similarity::auto(2)
    }
}

impl Similarity {
    /// NCC of the intensities alone, at unit weight: on the development corpus's real T1 → T1
    /// brain pairs it beat MIND-SSC's L1 by 0.05-0.06 Dice, but lost on CT and multi-contrast
    /// pairs.
    pub fn ncc(radius: usize) -> Self {
        Similarity::Ncc { radius, weight: 1.0, features: 0.0 }
    }

    /// The features' L1 with NCC beside it at a tenth of its weight: a compromise that raised
    /// the corpus's mean Dice with MIND-SSC by 0.006 (and lost 0.01 on its T1/T2 and pure-shift
    /// pairs).
    pub fn l1_ncc(radius: usize) -> Self {
        Similarity::Ncc { radius, weight: 0.1, features: 1.0 }
    }

    /// [`Similarity::Auto`] with an NCC window of `radius` and the threshold chosen on the
    /// development corpus.
    pub fn auto(radius: usize) -> Self {
        Similarity::Auto { radius, min_linearity: 0.75 }
    }
}

/// One resolution level of the deformable stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelConfig {
    /// Feature maps are area-downsampled by this factor (relative to the finest spacing).
    pub shrink: usize,
    /// The control grid is this many times coarser than the level's feature grid.
    pub control_shrink: usize,
    /// Upper bound on Adam iterations (convergence may stop earlier).
    pub iterations: usize,
    /// This level's weight of the diffusion regulariser, instead of [`MethodConfig::diffusion`]
    /// (or `diffusion_2d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diffusion: Option<f64>,
    /// Run this level only when the similarity compares intensities alone (NCC without the
    /// features' L1): feature maps at full resolution cost many channels per voxel, the
    /// intensities one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub intensities_only: bool,
}

/// How the translation search's candidates become competing starts of the affine stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AffineStartsConfig {
    /// How many of the search's distinct starts the affine stage is run from (1: the best only).
    pub count: usize,
    /// Relative margin by which a later start's affine loss must beat the kept one's: from
    /// starts 30 mm apart the affine stage often converges to the same alignment, and which of
    /// two near-equal losses is lower is then noise.
    pub margin: f64,
    /// A candidate competes only if the search scored it within this factor of its best: the
    /// affine loss can be lowered by a wrong start whose affine map squeezes a thin slab onto
    /// whatever matches.
    pub score_ratio: f64,
}

impl Default for AffineStartsConfig {
    fn default() -> Self {
        Self { count: 3, margin: 0.01, score_ratio: 1.25 }
    }
}

/// Options of the whole registration method ([`super::register_pair`]). The defaults suit
/// abdominal CT/MR at 1.5–3 mm (the pairs they were chosen on are listed in BENCHMARKS.md).
///
/// Deserialises from the JSON that `metrics.json` records under `config` (`register
/// --method FILE`), keys left out keeping their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodConfig {
    /// How the moving image is placed before optimisation.
    pub start: Start,
    /// The translation search behind [`Start::Search`] (and, scored by Dice, [`Start::Labels`]).
    pub search: SearchConfig,
    /// The affine stage's competing starts.
    pub affine_starts: AffineStartsConfig,
    /// Iterations of the affine stage (0 skips it).
    pub affine_iterations: usize,
    /// Feature downsampling of the affine stage.
    pub affine_shrink: usize,
    /// Largest feature spacing (mm) of the affine stage: on coarse images `affine_shrink` is
    /// reduced to stay at or below it. At 4.2 mm a shrink of 4 left 17 mm voxels, where the
    /// affine stage lowered its own loss while it moved synthetic pairs off their true
    /// alignment (Dice 0.895 → 0.877, endpoint error +1 mm); at shrink 2 it kept them.
    pub affine_max_spacing_mm: f64,
    /// Factor on the affine stage's Adam step per iteration: on coarse maps the L1 landscape is
    /// rough, and at a constant step Adam hops around the minimum.
    pub affine_lr_decay: f64,
    pub levels: Vec<LevelConfig>,
    /// The similarity of the deformable levels (the start, affine and discrete stages use L1).
    pub similarity: Similarity,
    /// Weight of the B-spline penalty.
    pub smoothness: f64,
    /// Weight of the diffusion regulariser (squared gradient of the field) on 3D images.
    pub diffusion: f64,
    /// The same weight on 2D images: on the corpus's 2D slices (1 mm pixels) 0.1 against 0.3
    /// raised Dice by 0.07-0.09, while the 3D pairs lost endpoint accuracy with it.
    pub diffusion_2d: f64,
    /// Knot spacing of the penalty's B-spline in control-grid voxels.
    pub bspline_width: f64,
    /// Adam step in voxels of the level's feature grid.
    pub learning_rate: f64,
    /// Adam's epsilon of the deformable levels, relative to the RMS of the first gradient.
    pub adam_epsilon: f64,
    /// Stop a stage when the loss improved by less than this fraction over 10 iterations.
    pub tolerance: f64,
    /// What the deformable levels optimise.
    pub parameterisation: Parameterisation,
    /// Discrete displacement search that starts the first deformable level (radius 0: off).
    pub discrete: DiscreteConfig,
}

impl Default for MethodConfig {
    fn default() -> Self {
        Self {
            start: Start::Search,
            search: SearchConfig::default(),
            affine_starts: AffineStartsConfig::default(),
            affine_iterations: 60,
            affine_shrink: 4,
            affine_max_spacing_mm: 12.0,
            affine_lr_decay: 0.96,
            levels: vec![
                LevelConfig { shrink: 4, control_shrink: 2, iterations: 80, diffusion: None, intensities_only: false },
                LevelConfig { shrink: 2, control_shrink: 2, iterations: 80, diffusion: None, intensities_only: false },
                // a stiffer diffusion at full resolution: at the default weight NCC folded 0.13 % of
                // CT A ← CT B and 0.01 % of T1 → Colin27; at 1.0 no corpus pair folds and the
                // corpus mean held (0.7825 vs 0.7823; T1 → Colin27 lost 0.02, PD → T1 gained 0.02)
                LevelConfig {
                    shrink: 1,
                    control_shrink: 2,
                    iterations: 30,
                    diffusion: Some(1.0),
                    intensities_only: true,
                },
            ],
            similarity: Similarity::default(),
            smoothness: 1.0,
            diffusion: 0.3,
            diffusion_2d: 0.1,
            bspline_width: 2.0,
            learning_rate: 0.3,
            tolerance: 1e-4,
            adam_epsilon: 0.1,
            parameterisation: Parameterisation::default(),
            discrete: DiscreteConfig::default(),
        }
    }
}

impl MethodConfig {
    /// The most iterations `stage` can run, for progress bars.
    pub fn max_iterations(&self, stage: super::Stage) -> usize {
        match stage {
            super::Stage::Affine => self.affine_iterations,
            super::Stage::Deformable(k) => self.levels.get(k.wrapping_sub(1)).map_or(0, |l| l.iterations),
            super::Stage::Discrete => self.discrete.coupling.len() + 1,
            super::Stage::Features | super::Stage::Start => 0,
        }
    }

    /// The pyramid's shrink factors apply to the feature grid. Features that lie on a coarser
    /// grid than the image they were computed from (OBELISK: stride 4) would otherwise be shrunk
    /// twice, down to a handful of voxels, so the factors are divided by the features' own
    /// stride over `working_mm`, the spacing of that image.
    pub fn for_features(&self, working_mm: f64, features: &crate::Grid) -> MethodConfig {
        let stride = (features.min_spacing() / working_mm).round().max(1.0) as usize;
        let mut c = self.clone();
        let coarsest = (self.affine_max_spacing_mm / features.min_spacing()).floor().max(1.0) as usize;
        c.affine_shrink = (c.affine_shrink / stride).clamp(1, coarsest);
        for l in &mut c.levels {
            l.shrink = (l.shrink / stride).max(1);
        }
        c
    }
}
