//! Pipelines behind the subcommands: image pair registration with all its outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use registration::compose::{invert, remainder_after, InverseResidual, INVERSE_ITERATIONS};
use registration::features::{FeatureExtractor, IntensityFeatures, MindConfig, MindSsc, ObeliskFeatures};
use registration::init::SearchResult;
use registration::method::{
    register_pair_sharing, AffineStart, Features, ImagePair, Masks, MethodConfig, Observer, Role, SharedFeatures,
    SimilarityChoice, Stage, StageReport, Start,
};
use registration::metrics::{dice_per_label_masked, jacobian, RegistrationMetrics};
use registration::transform::{Affine, DenseDisplacement};
use registration::warp::{coverage, warp_labels, warp_volume};
use registration::{DisplacementField, Labels, Volume};
use segmentation::ops::{Interpolation, Padding};
use serde::Serialize;

use crate::io;
use crate::pictures::{self, SliceSpec};

/// Which features drive the registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureKind {
    /// MIND-SSC self-similarity context (12 channels; 4 in 2D); contrast-robust, needs no training.
    Mind,
    /// The robustly normalised intensity (same modality only).
    Intensity,
    /// Learned OBELISK features of a trained model (the embedded default model, or `--model DIR`),
    /// on the network's coarse grid.
    Obelisk,
}

impl FeatureKind {
    /// The extractor for images on `grid`; OBELISK features use `model`, else the embedded one.
    pub fn extractor(
        self,
        grid: &registration::Grid,
        model: Option<&ObeliskFeatures>,
    ) -> Result<Box<dyn FeatureExtractor>> {
        Ok(match self {
            FeatureKind::Mind => Box::new(MindSsc::for_grid(MindConfig::default(), grid)),
            FeatureKind::Intensity => Box::new(IntensityFeatures),
            FeatureKind::Obelisk => Box::new(match model {
                Some(m) => m.clone(),
                None => ObeliskFeatures::embedded()?,
            }),
        })
    }
}

/// A validated registration job: every input exists and reads, the output folder is writable.
pub struct RegisterJob {
    pub fixed_path: PathBuf,
    pub moving_path: PathBuf,
    pub fixed: Volume,
    pub moving: Volume,
    pub fixed_labels: Option<Labels>,
    pub moving_labels: Option<Labels>,
    pub truth: Option<DisplacementField>,
    /// Metric masks (`--fixed-mask`, `--moving-mask`), each with the fraction of its image it
    /// covers.
    pub fixed_mask: Option<(Volume, f64)>,
    pub moving_mask: Option<(Volume, f64)>,
    pub label_names: BTreeMap<u32, String>,
    pub out: PathBuf,
    pub features: FeatureKind,
    /// The trained model behind [`FeatureKind::Obelisk`], loaded while validating.
    pub model: Option<ObeliskFeatures>,
    /// Deformable levels evaluate the model at the sampled points (`--exact`).
    pub exact: bool,
    /// The method's options, its start among them.
    pub config: MethodConfig,
    pub pictures: bool,
    pub slice: SliceSpec,
    pub force: bool,
    pub quiet: bool,
    /// Also write the inverse field on the moving grid (`--inverse`).
    pub inverse: bool,
}

/// What a registration wrote and measured.
#[derive(Debug, Clone, Serialize)]
pub struct RegisterSummary {
    pub out_dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub features: FeatureKind,
    /// The model behind OBELISK features: its folder, or the embedded default model.
    pub model: Option<String>,
    /// Whether the deformable levels evaluated the model at the sampled points (`--exact`).
    pub exact: bool,
    /// The common isotropic spacing both images were resampled to for their features, when
    /// their spacings differ ([`registration::method::FeatureFrame`]).
    pub feature_spacing_mm: Option<f64>,
    pub init: Start,
    pub init_translation_mm: [f64; 3],
    /// The translation search's outcome with `--init search`.
    pub init_search: Option<SearchResult>,
    /// Mean Dice with the headers' placement, over [`RegisterSummary::dice_scope`].
    pub dice_before: Option<f64>,
    /// Mean Dice after the initialisation (translation only), before any optimisation.
    pub dice_after_init: Option<f64>,
    /// Mean Dice after the affine stage, before the deformable ones.
    pub dice_after_affine: Option<f64>,
    /// Mean Dice after the discrete displacement search (the last label-free start, before the
    /// gradient-based levels), when it ran.
    pub dice_after_discrete: Option<f64>,
    /// The search's starts the affine stage was run from and the loss each ended at; the
    /// lowest (by a margin of 1 %; ties keep the search's best) was kept (`init_translation_mm`).
    pub affine_starts: Vec<AffineStart>,
    /// Where Dice (and HD95) are counted.
    pub dice_scope: &'static str,
    /// Label ids present in both label maps: the structures evaluated.
    pub shared_labels: Vec<u32>,
    /// Fraction of the fixed image's voxels that the registered moving image covers.
    pub overlap_fraction: f64,
    /// Fraction of the fixed / moving image inside its metric mask, where one was given.
    pub fixed_mask_coverage: Option<f64>,
    pub moving_mask_coverage: Option<f64>,
    pub metrics: RegistrationMetrics,
    /// How well inverse_field.nii.gz undoes field.nii.gz, when written (`--inverse`).
    pub inverse: Option<InverseResidual>,
    /// What `--similarity auto` measured and chose.
    pub similarity: Option<SimilarityChoice>,
    pub stages: Vec<StageReport>,
    pub runtime_s: BTreeMap<String, f64>,
    pub config: MethodConfig,
}

fn mean_dice(d: &[(u32, f64)]) -> Option<f64> {
    (!d.is_empty()).then(|| d.iter().map(|x| x.1).sum::<f64>() / d.len() as f64)
}

/// The affine stage's result as ITK (`.tfm`) and ANTs (`.mat`) read it.
const AFFINE_FILES: [&str; 2] = ["affine.tfm", "affine.mat"];

/// The whole transform as ITK's composite `[affine, deformable remainder]`, and the remainder
/// alone (on the fixed grid) for `antsApplyTransforms -t field_deformable.nii.gz -t affine.mat`.
const COMPOSITE_FILES: [&str; 2] = ["transform.h5", "field_deformable.nii.gz"];

/// What Dice is computed over when both label maps are given.
pub const DICE_SCOPE: &str = "structures present in both label maps, inside the overlap of the two fields of view";

/// Label maps reduced to the structures they share; Dice of a pair is counted inside the part
/// of the fixed image that the moving image covers (a slab cannot be blamed for what it does not
/// show, and an atlas structure absent from the target is not a registration error).
struct Evaluation {
    fixed: Labels,
    moving: Labels,
    shared: Vec<u32>,
}

impl Evaluation {
    fn new(fixed: &Labels, moving: &Labels) -> Self {
        let shared = fixed.shared_ids(moving);
        Self { fixed: fixed.keep_only(&shared), moving: moving.keep_only(&shared), shared }
    }

    /// The warped shared labels and the coverage mask of `field`.
    /// Mean Dice through `field` over the overlap; `None` when nothing shared is covered.
    fn mean_dice(&self, field: &DisplacementField, moving_grid: &registration::Grid) -> Result<Option<f64>> {
        let (w, mask) = (warp_labels(&self.moving, field), coverage(field, moving_grid));
        Ok(mean_dice(&dice_per_label_masked(&self.fixed, &w, &mask)?))
    }
}

impl RegisterJob {
    fn output_name(&self, out: &Path, stem: &str, image_like: bool) -> PathBuf {
        let png =
            image_like && self.fixed.grid.is_2d() && io::Format::of(&self.fixed_path).ok() == Some(io::Format::Png);
        out.join(if png { format!("{stem}.png") } else { format!("{stem}.nii.gz") })
    }

    /// The files this job will write, so that they can be checked before any work.
    pub fn planned_outputs(&self) -> Vec<PathBuf> {
        self.outputs_in(&self.out)
    }

    /// The files this job writes into `out`.
    pub fn outputs_in(&self, out: &Path) -> Vec<PathBuf> {
        let mut v = vec![out.join("field.nii.gz"), self.output_name(out, "warped", true), out.join("metrics.json")];
        v.push(out.join("loss.csv"));
        v.extend(AFFINE_FILES.iter().chain(&COMPOSITE_FILES).map(|f| out.join(f)));
        if self.inverse {
            v.push(out.join("inverse_field.nii.gz"));
        }
        if self.moving_labels.is_some() {
            v.push(self.output_name(out, "warped_labels", true));
        }
        if self.pictures {
            v.push(out.join("summary.png"));
        }
        v
    }

    /// Names the image whose features failed by its file.
    fn name_image(&self, e: registration::Error) -> anyhow::Error {
        match e {
            registration::Error::Features { image, source } => {
                let path = match image {
                    Role::Fixed => &self.fixed_path,
                    Role::Moving => &self.moving_path,
                };
                anyhow::Error::new(*source).context(format!("features of {}", path.display()))
            }
            e => e.into(),
        }
    }

    /// Registers the pair and writes every output into the job's folder.
    pub fn run(&self, observer: &mut dyn Observer) -> Result<RegisterSummary> {
        self.run_sharing(observer, None)
    }

    /// [`RegisterJob::run`] with the features of the image that every pair of a batch shares
    /// (an atlas) taken from, or first computed into, `shared`.
    pub fn run_sharing(
        &self,
        observer: &mut dyn Observer,
        shared: Option<&mut SharedFeatures>,
    ) -> Result<RegisterSummary> {
        let registered = self.compute_sharing(observer, shared)?;
        self.write(&registered, &self.out)
    }

    /// Registers the pair and evaluates the result, writing nothing: the outputs stay in memory
    /// until [`RegisterJob::write`] (the Python package keeps them there for the caller).
    pub fn compute(&self, observer: &mut dyn Observer) -> Result<Registered> {
        self.compute_sharing(observer, None)
    }

    /// [`RegisterJob::compute`] with an atlas's shared features (see [`RegisterJob::run_sharing`]).
    pub fn compute_sharing(
        &self,
        observer: &mut dyn Observer,
        shared: Option<&mut SharedFeatures>,
    ) -> Result<Registered> {
        let t0 = Instant::now();
        let extractor = self.features.extractor(&self.fixed.grid, self.model.as_ref())?;
        let pair = ImagePair {
            fixed: &self.fixed,
            moving: &self.moving,
            labels: self.fixed_labels.as_ref().zip(self.moving_labels.as_ref()),
            masks: Masks {
                fixed: self.fixed_mask.as_ref().map(|m| &m.0),
                moving: self.moving_mask.as_ref().map(|m| &m.0),
            },
        };
        let features = Features { extractor: extractor.as_ref(), exact: self.model.as_ref().filter(|_| self.exact) };
        let outcome =
            register_pair_sharing(&pair, &features, &self.config, observer, shared).map_err(|e| self.name_image(e))?;
        let mut runtime = outcome.runtime_s;
        let (reg, init_t) = (outcome.registration, outcome.start_translation_mm);

        let t3 = Instant::now();
        let warped = warp_volume(&self.moving, &reg.field, Interpolation::Linear, Padding::Extent);
        let warped_labels = self.moving_labels.as_ref().map(|l| warp_labels(l, &reg.field));
        let identity = DisplacementField::zeros(self.fixed.grid.clone());
        let overlap = coverage(&reg.field, &self.moving.grid);
        let overlap_fraction = overlap.iter().filter(|&&c| c).count() as f64 / overlap.len().max(1) as f64;
        let eval = match (&self.fixed_labels, &self.moving_labels) {
            (Some(f), Some(m)) => Some(Evaluation::new(f, m)),
            _ => None,
        };
        let (mut dice_before, mut dice_after_init, mut dice_after_affine, mut dice_after_discrete) =
            (None, None, None, None);
        if let Some(e) = &eval {
            dice_before = e.mean_dice(&identity, &self.moving.grid)?;
            let through = |d: &DenseDisplacement, a: &Affine| -> Result<Option<f64>> {
                e.mean_dice(&d.to_field(a, &self.fixed.grid)?, &self.moving.grid)
            };
            let zero = DenseDisplacement::zeros(self.fixed.grid.clone(), &candle_core::Device::Cpu)?;
            dice_after_init = through(&zero, &Affine::translation(init_t))?;
            if reg.stages.iter().any(|s| s.name == Stage::Affine) {
                dice_after_affine = through(&zero, &reg.affine)?;
            }
            if let Some(d) = &reg.discrete_start {
                dice_after_discrete = through(d, &reg.affine)?;
            }
        }
        let metrics = match (&eval, &warped_labels) {
            // nearest-neighbour warping commutes with dropping labels: restrict, do not warp again
            (Some(e), Some(w)) => RegistrationMetrics::evaluate(
                &e.fixed,
                &w.keep_only(&e.shared),
                &reg.field,
                &self.label_names,
                Some(&overlap),
            )?,
            _ => {
                let (_, j) = jacobian(&reg.field, None)?;
                RegistrationMetrics {
                    labels: vec![],
                    mean_dice: None,
                    sd_log_j: j.sd_log_j.is_finite().then_some(j.sd_log_j),
                    folding_fraction: j.fraction_nonpositive,
                    jacobian_min: j.min,
                    jacobian_max: j.max,
                    endpoint_error: None,
                }
            }
        };
        let metrics = match &self.truth {
            Some(t) => metrics.with_endpoint_error(registration::metrics::endpoint_error(&reg.field, t, None)?),
            None => metrics,
        };
        runtime.insert("evaluation".to_string(), t3.elapsed().as_secs_f64());
        // the inverse is part of the result, not of writing it: computed here so that the
        // outputs written later (any number of times) are the same
        let inverse = if self.inverse {
            let t = Instant::now();
            let inv = invert(&reg.field, &reg.affine, &self.moving.grid, INVERSE_ITERATIONS)?;
            runtime.insert("inverse".to_string(), t.elapsed().as_secs_f64());
            Some(inv)
        } else {
            None
        };
        runtime.insert("total".to_string(), t0.elapsed().as_secs_f64());

        let summary = RegisterSummary {
            out_dir: PathBuf::new(),
            files: Vec::new(),
            features: self.features,
            model: match self.features {
                FeatureKind::Obelisk => Some(
                    self.model.as_ref().map_or(registration::features::EMBEDDED_SOURCE, |m| m.source()).to_string(),
                ),
                _ => None,
            },
            exact: self.exact,
            fixed_mask_coverage: self.fixed_mask.as_ref().map(|m| m.1),
            moving_mask_coverage: self.moving_mask.as_ref().map(|m| m.1),
            feature_spacing_mm: outcome.feature_spacing_mm,
            init: self.config.start,
            init_translation_mm: init_t,
            init_search: outcome.search,
            dice_before,
            dice_after_init,
            dice_after_affine,
            dice_after_discrete,
            affine_starts: outcome.affine_starts,
            dice_scope: if eval.is_some() { DICE_SCOPE } else { "no label maps given" },
            shared_labels: eval.map(|e| e.shared).unwrap_or_default(),
            overlap_fraction,
            metrics,
            inverse: inverse.as_ref().map(|i| i.residual.clone()),
            similarity: reg.similarity,
            stages: reg.stages,
            runtime_s: runtime,
            config: outcome.config,
        };
        Ok(Registered {
            field: reg.field,
            affine: reg.affine,
            losses: reg.losses,
            warped,
            warped_labels,
            inverse_field: inverse.map(|i| i.field),
            extractor_name: extractor.name().to_string(),
            summary,
        })
    }

    /// Writes the outputs of `r` (a result of this job's [`RegisterJob::compute`]) into `out`,
    /// metrics.json last, and returns the summary it holds.
    pub fn write(&self, r: &Registered, out: &Path) -> Result<RegisterSummary> {
        let t4 = Instant::now();
        let mut files = Vec::new();
        let field_path = out.join("field.nii.gz");
        io::write_field(&field_path, &r.field)?;
        files.push(field_path);
        // centred on the fixed image, as ANTs centres the affine maps it writes
        let centre = self.fixed.grid.map(
            self.fixed.grid.shape().map(|n| (n as f64 - 1.0) / 2.0),
            registration::Space::Voxel,
            registration::Space::Lps,
        );
        for name in AFFINE_FILES {
            let p = out.join(name);
            io::transform_files::write_affine(&p, &r.affine, centre, self.fixed.grid.is_2d())?;
            files.push(p);
        }
        let remainder = remainder_after(&r.field, &r.affine)?;
        let [h5, deformable] = COMPOSITE_FILES.map(|f| out.join(f));
        io::transform_files::write_composite_h5(&h5, &r.affine, centre, &remainder)?;
        io::write_field(&deformable, &remainder)?;
        files.extend([h5, deformable]);
        if let Some(inv) = &r.inverse_field {
            let p = out.join("inverse_field.nii.gz");
            io::write_field(&p, inv)?;
            files.push(p);
        }
        let warped_path = self.output_name(out, "warped", true);
        io::write_image(&warped_path, &r.warped)?;
        files.push(warped_path);
        if let Some(w) = &r.warped_labels {
            let p = self.output_name(out, "warped_labels", true);
            io::write_label_map(&p, w)?;
            files.push(p);
        }
        let loss_path = out.join("loss.csv");
        let mut csv = String::from("stage,iteration,loss\n");
        for l in &r.losses {
            csv.push_str(&format!("{},{},{}\n", l.stage, l.iteration, l.loss));
        }
        io::atomic::write_atomic(&loss_path, |f| std::io::Write::write_all(f, csv.as_bytes()))?;
        files.push(loss_path);
        let s = &r.summary;
        if self.pictures {
            let (jac, _) = jacobian(&r.field, None)?;
            let identity = DisplacementField::zeros(self.fixed.grid.clone());
            let before = warp_volume(&self.moving, &identity, Interpolation::Linear, Padding::Extent);
            let labels_before = self.moving_labels.as_ref().map(|l| warp_labels(l, &identity));
            let heading = match (s.dice_before, s.metrics.mean_dice) {
                (Some(b), Some(a)) => format!(
                    "{} features · mean Dice {b:.3} → {a:.3} · folding {:.3}% · SDlogJ {:.3}",
                    r.extractor_name,
                    100.0 * s.metrics.folding_fraction,
                    s.metrics.sd_log_j.unwrap_or(f64::NAN)
                ),
                _ => format!(
                    "{} features · folding {:.3}% · SDlogJ {:.3}",
                    r.extractor_name,
                    100.0 * s.metrics.folding_fraction,
                    s.metrics.sd_log_j.unwrap_or(f64::NAN)
                ),
            };
            let sheet = pictures::summary_sheet(
                &pictures::Summary {
                    fixed: &self.fixed,
                    moving_before: &before,
                    warped: &r.warped,
                    fixed_labels: self.fixed_labels.as_ref(),
                    moving_labels_before: labels_before.as_ref(),
                    warped_labels: r.warped_labels.as_ref(),
                    field: &r.field,
                    jacobian: &jac,
                    losses: &r.losses,
                    heading,
                },
                self.slice,
            )?;
            let p = out.join("summary.png");
            save_png(&p, &sheet)?;
            files.push(p);
        }
        let mut summary = s.clone();
        let writing = t4.elapsed().as_secs_f64();
        summary.runtime_s.insert("writing".to_string(), writing);
        *summary.runtime_s.entry("total".to_string()).or_insert(0.0) += writing;
        summary.out_dir = out.to_path_buf();
        summary.files = files;
        let mpath = out.join("metrics.json");
        let json = serde_json::to_string_pretty(&summary)?;
        io::atomic::write_atomic(&mpath, |f| std::io::Write::write_all(f, json.as_bytes()))?;
        Ok(summary)
    }
}

/// A registration computed by [`RegisterJob::compute`], before its outputs are written.
pub struct Registered {
    /// The whole transform (affine included), ITK convention, on the fixed grid.
    pub field: DisplacementField,
    /// The affine stage's map (fixed LPS → moving LPS).
    pub affine: Affine,
    pub losses: Vec<registration::method::LossRecord>,
    /// The moving image resampled onto the fixed grid (linear).
    pub warped: Volume,
    /// The moving label map resampled onto the fixed grid (nearest), when given.
    pub warped_labels: Option<Labels>,
    /// The inverse field on the moving grid, with `--inverse`.
    pub inverse_field: Option<DisplacementField>,
    extractor_name: String,
    /// What metrics.json will hold, less `out_dir`, `files` and the writing time.
    pub summary: RegisterSummary,
}

/// Writes an RGB picture atomically.
pub fn save_png(path: &Path, img: &image::RgbImage) -> Result<()> {
    io::atomic::write_atomic(path, |f| {
        img.write_to(&mut std::io::BufWriter::new(f), image::ImageFormat::Png).map_err(std::io::Error::other)
    })?;
    Ok(())
}
