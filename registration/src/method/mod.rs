//! The registration method as one API: frozen feature maps of a fixed and a moving image in, a
//! transform out.
//!
//! [`register_pair`] runs the whole method on two images: their features in one
//! [`FeatureFrame`], the start ([`Start`]: header, centre of mass, translation search or label
//! search, then the affine stage from the search's best distinct starts), the affine stage, the
//! discrete displacement search and the deformable levels, coarse to fine. Every stage minimises
//! the L1 distance between the fixed feature vectors and the moving feature maps sampled at the
//! transformed fixed points (over the overlap of the two fields of view) with Adam ([`optimise`]
//! holds the one loop); the deformable levels add a penalty on the difference between the field
//! and its B-spline-smoothed self and a diffusion term. [`register_features`] starts from
//! features already computed (propagation computes the target's once), [`register_from`] from a
//! given affine map.
//!
//! Progress is reported as typed [`Event`]s to an [`Observer`].

mod affine;
mod config;
mod deformable;
mod discrete;
mod events;
mod frame;
mod linearity;
mod masks;
mod optimise;
mod pyramid;
mod start;

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

pub use affine::{affine_stage, AffineOutcome};
pub use config::{AffineStartsConfig, LevelConfig, MethodConfig, Parameterisation, Similarity, Start};
pub use events::{silent, Event, LossRecord, Observer, Stage};
pub use frame::FeatureFrame;
pub use linearity::{linearity, SimilarityChoice};
pub use masks::{mask_coverage, mask_on, Masks};
pub use start::{centre_of_mass, label_start, AffineStart};

use crate::features::{FeatureExtractor, IntensityFeatures, ObeliskFeatures};
use crate::init::SearchResult;
use crate::transform::{Affine, DenseDisplacement};
use crate::{DisplacementField, Error, Grid, Labels, Result, Volume};

/// Moving-image features evaluated wherever the optimiser samples, instead of interpolated from
/// a precomputed map: the OBELISK paper's exact form, where the moving image itself is resampled
/// through the feature layer at the displaced coordinates.
pub trait PointFeatures {
    /// The image grid whose normalised coordinates [`PointFeatures::at`] takes.
    fn grid(&self) -> &Grid;
    fn channels(&self) -> usize;
    /// Features `(1, C, P)` at normalised points `(1, P, 3)` of [`PointFeatures::grid`],
    /// differentiable in the points.
    fn at(&self, points: &Tensor) -> Result<Tensor>;
}

/// How one stage went.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub name: Stage,
    pub iterations: usize,
    pub initial_loss: f64,
    /// Loss of the stage's result: the last iteration's, the affine stage's best iterate's.
    pub final_loss: f64,
    pub seconds: f64,
    pub feature_shape: [usize; 3],
    pub control_shape: [usize; 3],
    /// Fraction of fixed points that sample inside the moving image at the end.
    pub overlap: f64,
}

/// The transform found from a given start ([`register_from`]).
pub struct Registration {
    /// Full transform as an ITK displacement field on the requested output grid.
    pub field: DisplacementField,
    /// The affine part (fixed LPS → moving LPS).
    pub affine: Affine,
    /// The loss of every iteration of every stage.
    pub losses: Vec<LossRecord>,
    pub stages: Vec<StageReport>,
    /// The displacement (after `affine`, on the first level's control grid) that the first
    /// gradient level starts from when the discrete search ran: its result, exponentiated in
    /// velocity mode, where the search's displacement becomes the starting velocity. Kept so that
    /// the label-free start can be evaluated as the optimisation sees it.
    pub discrete_start: Option<DenseDisplacement>,
    /// What [`Similarity::Auto`] measured and chose, when it was configured and the maps held
    /// intensities to measure.
    pub similarity: Option<SimilarityChoice>,
}

/// The fixed and moving images of a registration, with their label maps where both are known
/// (needed by [`Start::Labels`]).
#[derive(Clone, Copy)]
pub struct ImagePair<'a> {
    pub fixed: &'a Volume,
    pub moving: &'a Volume,
    pub labels: Option<(&'a Labels, &'a Labels)>,
    /// Where the similarity is evaluated.
    pub masks: Masks<'a>,
}

/// What describes the images: an extractor, and for the exact mode the learned model evaluated
/// at the sampled points of the moving image.
#[derive(Clone, Copy)]
pub struct Features<'a> {
    pub extractor: &'a dyn FeatureExtractor,
    /// The deformable levels evaluate this model at the displaced points (the exact mode).
    pub exact: Option<&'a ObeliskFeatures>,
}

/// An image pair with its feature maps (from one extractor, in one [`FeatureFrame`]).
#[derive(Clone, Copy)]
pub struct FeaturePair<'a> {
    pub fixed: &'a Volume,
    pub moving: &'a Volume,
    pub fixed_features: &'a Volume,
    pub moving_features: &'a Volume,
    /// Fixed and moving label maps, where both are known (needed by [`Start::Labels`]).
    pub labels: Option<(&'a Labels, &'a Labels)>,
    /// The moving features at arbitrary points, for the exact mode.
    pub moving_points: Option<&'a dyn PointFeatures>,
    /// Where the similarity is evaluated.
    pub masks: Masks<'a>,
}

/// The feature maps an optimisation works on ([`register_from`]), on any grids (their headers
/// place them in the world).
#[derive(Clone, Copy)]
pub struct Maps<'a> {
    pub fixed: &'a Volume,
    pub moving: &'a Volume,
    /// With it, the deformable levels sample the moving features through it (at full
    /// resolution, at the displaced points) instead of interpolating the moving maps; the affine
    /// stage still uses the maps, whose values it reproduces at their grid points (the exact
    /// mode).
    pub exact: Option<&'a dyn PointFeatures>,
    /// Where the similarity is evaluated.
    pub masks: Masks<'a>,
    /// Fixed and moving maps that the deformable levels compare instead of the features (the
    /// intensities of [`Similarity::Ncc`]); the start and affine stages keep the features.
    pub deformable: Option<(&'a Volume, &'a Volume)>,
}

impl<'a> Maps<'a> {
    /// Two feature maps, no exact mode, no masks.
    pub fn new(fixed: &'a Volume, moving: &'a Volume) -> Self {
        Maps { fixed, moving, exact: None, masks: Masks::default(), deformable: None }
    }
}

/// Which image of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Fixed,
    Moving,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Fixed => "fixed",
            Role::Moving => "moving",
        })
    }
}

/// The outcome of the whole method.
pub struct Outcome {
    pub registration: Registration,
    /// The translation search's outcome ([`Start::Search`], [`Start::Labels`]).
    pub search: Option<SearchResult>,
    /// The translation the optimisation started from (LPS mm).
    pub start_translation_mm: [f64; 3],
    /// The search's starts the affine stage was run from, with its final loss; empty where
    /// there was one start.
    pub affine_starts: Vec<AffineStart>,
    /// The common isotropic spacing both images were resampled to for their features, when
    /// their spacings differ ([`FeatureFrame`]).
    pub feature_spacing_mm: Option<f64>,
    /// Seconds per step ("features", "initialisation", "optimisation").
    pub runtime_s: BTreeMap<String, f64>,
    /// The configuration as run (shrink factors adapted to the feature grid).
    pub config: MethodConfig,
}

/// Registers `pair.moving` to `pair.fixed`: features, start, affine, discrete and deformable
/// stages. The field lies on the fixed image's grid.
pub fn register_pair(
    pair: &ImagePair,
    features: &Features,
    config: &MethodConfig,
    observer: &mut dyn Observer,
) -> Result<Outcome> {
    register_pair_sharing(pair, features, config, observer, None)
}

/// Feature maps of one image that several registrations share, e.g. an atlas registered to a
/// cohort: described once per [`FeatureFrame`] (the frame depends on the partner's spacing)
/// instead of once per pair. The maps are exactly those [`register_pair`] computes, so sharing
/// them changes no result. The image in [`SharedFeatures::role`] and the extractor must be the
/// same in every pair the cache is passed with.
pub struct SharedFeatures {
    role: Role,
    maps: Vec<(FeatureFrame, Volume)>,
    points: Vec<(FeatureFrame, Box<dyn PointFeatures>)>,
}

impl SharedFeatures {
    /// An empty cache for the image that is the `role` of every pair.
    pub fn new(role: Role) -> Self {
        Self { role, maps: Vec::new(), points: Vec::new() }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// How often the shared image was described: once per frame met so far.
    pub fn extractions(&self) -> usize {
        self.maps.len()
    }

    fn maps(&self, frame: &FeatureFrame) -> Option<&Volume> {
        self.maps.iter().find(|(f, _)| f == frame).map(|(_, v)| v)
    }

    fn points(&self, frame: &FeatureFrame) -> Option<&dyn PointFeatures> {
        self.points.iter().find(|(f, _)| f == frame).map(|(_, p)| p.as_ref())
    }
}

/// [`register_pair`], taking the features of the image in `shared`'s role from `shared`
/// (computed there on first use in each frame).
pub fn register_pair_sharing(
    pair: &ImagePair,
    features: &Features,
    config: &MethodConfig,
    observer: &mut dyn Observer,
    shared: Option<&mut SharedFeatures>,
) -> Result<Outcome> {
    let t0 = Instant::now();
    observer.event(Event::Started(Stage::Features));
    let frame = FeatureFrame::for_images(&[pair.fixed, pair.moving]);
    let of = |role: Role| move |e: Error| Error::Features { image: role, source: Box::new(e) };
    let image = |role: Role| match role {
        Role::Fixed => pair.fixed,
        Role::Moving => pair.moving,
    };
    let shared = match shared {
        Some(s) => {
            if s.maps(&frame).is_none() {
                let maps = frame.extract(features.extractor, image(s.role)).map_err(of(s.role))?;
                s.maps.push((frame, maps));
            }
            if let (Role::Moving, Some(model), None) = (s.role, features.exact, s.points(&frame)) {
                let points = frame.point_features(model, pair.moving).map_err(of(Role::Moving))?;
                s.points.push((frame, points));
            }
            Some(&*s)
        }
        None => None,
    };
    let of_role = |role: Role| shared.filter(|s| s.role == role);
    let (own_fixed, own_moving, own_points);
    let ff = match of_role(Role::Fixed).and_then(|s| s.maps(&frame)) {
        Some(v) => v,
        None => {
            own_fixed = frame.extract(features.extractor, pair.fixed).map_err(of(Role::Fixed))?;
            &own_fixed
        }
    };
    let mf = match of_role(Role::Moving).and_then(|s| s.maps(&frame)) {
        Some(v) => v,
        None => {
            own_moving = frame.extract(features.extractor, pair.moving).map_err(of(Role::Moving))?;
            &own_moving
        }
    };
    let points = match (features.exact, of_role(Role::Moving).and_then(|s| s.points(&frame))) {
        (None, _) => None,
        (Some(_), Some(p)) => Some(p),
        (Some(model), None) => {
            own_points = frame.point_features(model, pair.moving).map_err(of(Role::Moving))?;
            Some(own_points.as_ref())
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let fp = FeaturePair {
        fixed: pair.fixed,
        moving: pair.moving,
        fixed_features: ff,
        moving_features: mf,
        labels: pair.labels,
        moving_points: points,
        masks: pair.masks,
    };
    let mut outcome = register_features(&fp, config, observer)?;
    outcome.runtime_s.insert("features".to_string(), seconds);
    Ok(outcome)
}

/// [`register_pair`] on features already computed, in the frame of the pair's images.
pub fn register_features(pair: &FeaturePair, config: &MethodConfig, observer: &mut dyn Observer) -> Result<Outcome> {
    let mut runtime = BTreeMap::new();
    let frame = FeatureFrame::for_images(&[pair.fixed, pair.moving]);
    let working = frame.working_spacing(pair.fixed);
    // NCC compares intensities in the features' frame; the levels count from their grid
    let intensities = match config.similarity {
        Similarity::Ncc { .. } | Similarity::Auto { .. } => {
            let of = |role: Role| move |e: Error| Error::Features { image: role, source: Box::new(e) };
            let fi = frame.extract(&IntensityFeatures, pair.fixed).map_err(of(Role::Fixed))?;
            let mi = frame.extract(&IntensityFeatures, pair.moving).map_err(of(Role::Moving))?;
            Some((fi, mi))
        }
        Similarity::L1 => None,
    };
    let mut adapted = config.for_features(working, &pair.fixed_features.grid);
    match (&intensities, config.similarity) {
        // the levels count from one grid: features on a coarser grid than the intensities
        // (OBELISK's stride) keep their L1
        (Some((fi, _)), Similarity::Auto { .. }) if fi.grid != pair.fixed_features.grid => {
            adapted.similarity = Similarity::L1
        }
        (Some((fi, _)), _) => adapted.levels = config.for_features(working, &fi.grid).levels,
        (None, _) => {}
    }
    let intensities = intensities.filter(|_| adapted.similarity != Similarity::L1);
    let config = adapted;
    let t1 = Instant::now();
    observer.event(Event::Started(Stage::Start));
    let placement = start::place(pair, &config)?;
    runtime.insert("initialisation".to_string(), t1.elapsed().as_secs_f64());

    let t2 = Instant::now();
    let (from, run_config) = match &placement.affine {
        Some(a) => (a.affine.clone(), MethodConfig { affine_iterations: 0, ..config.clone() }),
        None => (Affine::translation(placement.translation_mm), config.clone()),
    };
    let maps = Maps {
        fixed: pair.fixed_features,
        moving: pair.moving_features,
        exact: pair.moving_points,
        masks: pair.masks,
        deformable: intensities.as_ref().map(|(f, m)| (f, m)),
    };
    let mut reg = register_from(&maps, &pair.fixed.grid, &from, &run_config, observer)?;
    if let Some(a) = placement.affine {
        reg.stages.insert(0, a.report);
        reg.losses.splice(0..0, a.losses);
    }
    runtime.insert("optimisation".to_string(), t2.elapsed().as_secs_f64());
    let mut config = config;
    if let Some(choice) = &reg.similarity {
        // as run: rerunning this configuration repeats the choice
        config.similarity = choice.chosen;
    }
    Ok(Outcome {
        registration: reg,
        search: placement.search,
        start_translation_mm: placement.translation_mm,
        affine_starts: placement.affine_starts,
        feature_spacing_mm: frame.spacing,
        runtime_s: runtime,
        config,
    })
}

/// The optimisation of `maps` from the affine map `start` (`config.start` is not used): the
/// affine stage (unless `config.affine_iterations` is 0), the discrete search and the
/// deformable levels. The transform is returned as a displacement field on `output_grid`
/// (normally the fixed image's grid).
pub fn register_from(
    maps: &Maps,
    output_grid: &Grid,
    start: &Affine,
    config: &MethodConfig,
    observer: &mut dyn Observer,
) -> Result<Registration> {
    let (fixed, moving) = (maps.fixed, maps.moving);
    same_channels(fixed, moving)?;
    if let Some(e) = maps.exact {
        if e.channels() != fixed.channels {
            return Err(Error::ChannelMismatch {
                what: "moving point features",
                fixed: fixed.channels,
                moving: e.channels(),
            });
        }
    }
    let mut losses = Vec::new();
    let mut stages = Vec::new();
    let mut affine = start.clone();
    if config.affine_iterations > 0 {
        observer.event(Event::Started(Stage::Affine));
        let a = affine_stage(fixed, moving, &maps.masks, start, config, observer)?;
        affine = a.affine;
        losses.extend(a.losses);
        stages.push(a.report);
    }
    // the automatic similarity, decided on the intensities as the affine stage aligned them
    let (resolved, choice);
    let config = match (config.similarity, maps.deformable) {
        (Similarity::Auto { min_linearity, .. }, deformable) => {
            let l = match deformable {
                Some((fi, mi)) => linearity::linearity(fi, mi, &affine, &maps.masks, 1)?,
                None => f64::NAN,
            };
            let chosen = linearity::resolve(config.similarity, l);
            choice = deformable.map(|_| SimilarityChoice { linearity: l, min_linearity, chosen });
            resolved = MethodConfig { similarity: chosen, ..config.clone() };
            &resolved
        }
        _ => {
            choice = None;
            config
        }
    };
    // NCC alone compares the intensities only; beside the features' L1 it needs both
    let (f, m, intensities) = match (maps.deformable, config.similarity) {
        (Some((fi, mi)), Similarity::Ncc { features: 0.0, .. }) => (fi, mi, None),
        (extra, _) => (fixed, moving, extra),
    };
    if let Some((fi, mi)) = intensities {
        same_channels(fi, mi)?;
    }
    let exact = if std::ptr::eq(f, fixed) { maps.exact } else { None };
    let d = deformable::deformable_levels(f, m, intensities, exact, &maps.masks, &affine, config, observer)?;
    losses.extend(d.losses);
    stages.extend(d.stages);
    let field = d.displacement.to_field(&affine, output_grid)?;
    Ok(Registration { field, affine, losses, stages, discrete_start: d.discrete_start, similarity: choice })
}

pub(crate) fn same_channels(fixed: &Volume, moving: &Volume) -> Result<()> {
    if fixed.channels != moving.channels {
        return Err(Error::ChannelMismatch { what: "moving features", fixed: fixed.channels, moving: moving.channels });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
