//! `obelisk propagate`: multi-atlas label propagation. Every atlas image is registered to the
//! target, its label map warped onto the target grid (nearest neighbour), and the warped label
//! maps are fused by a vote.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{ArgAction, Args, ValueEnum};
use registration::features::{FeatureExtractor, ObeliskFeatures};
use registration::fusion::{local_distance, majority_vote, weighted_vote};
use registration::method::{register_features, FeatureFrame, FeaturePair, Masks, MethodConfig, StageReport, Start};
use registration::metrics::{dice_per_label, jacobian};
use registration::warp::{warp_labels, warp_volume, Interpolation, Padding};
use registration::{DisplacementField, Labels, Volume};
use serde::Serialize;

use crate::cli::register::RegOptions;
use crate::cli::validate::{check_input, non_negative, read_mask, same_dimensionality};
use crate::cli::Output;
use crate::io::{self, atomic::check_output, IoError};
use crate::pipeline::FeatureKind;
use crate::progress::Progress;

/// How the warped atlas label maps are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    /// One vote per atlas and voxel.
    Majority,
    /// Locally weighted vote: each atlas's vote weighted by its local similarity to the target.
    Weighted,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  obelisk propagate --target t.nii.gz --atlas a1.nii.gz a1_seg.nii.gz --out t_seg.nii.gz
  obelisk propagate --target t.nii.gz --atlas a1.nii.gz a1_seg.nii.gz --atlas a2.nii.gz a2_seg.nii.gz \\
      --atlas a3.nii.gz a3_seg.nii.gz --fusion majority --out t_seg.nii.gz
  obelisk propagate --target t.nii.gz --target-labels t_ref.nii.gz --atlas a.nii.gz a_seg.nii.gz \\
      --out t_seg.nii.gz --json

Each atlas image is registered to the target as by `obelisk register` (same --features, --init,
--iterations, ... options), its label map is warped onto the target grid by nearest neighbour,
and the warped label maps are fused:

  majority   the most frequent label per voxel;
  weighted   (default) locally weighted voting (Artaechevarria et al. 2009, Sabuncu et al. 2010):
             atlas i votes with weight w_i(x) = exp(-D_i(x) / h(x)), where D_i is the mean
             absolute difference between the target's features and the features of the warped
             atlas image (the --features of the registration), smoothed by a Gaussian of
             --fusion-sigma mm, and h(x) = min_i D_i(x) + eps (the per-voxel bandwidth of
             Coupe et al. 2011), so the best-matching atlas always gets weight exp(-1).

Ties go to the smallest label id. With one atlas the result is its warped label map. Writes
the fused label map (on the target grid) to --out and a report (files, registration losses,
folding and time per atlas; with --target-labels the Dice per label of every warped atlas and
of the fused map) to --report, by default next to --out as NAME.report.json.")]
pub struct PropagateArgs {
    /// Target image whose labels are wanted (.nii, .nii.gz, .png, .nrrd, .nhdr, .mha, .mhd or a DICOM folder).
    #[arg(long)]
    pub target: PathBuf,
    /// An atlas: its image and its label map (on the image's grid). Repeat for several atlases.
    #[arg(long, num_args = 2, value_names = ["IMAGE", "LABELS"], action = ArgAction::Append, required = true)]
    pub atlas: Vec<PathBuf>,
    /// Fused label map to write, on the target grid (.nii, .nii.gz, .nrrd, .mha; .png for 2D).
    #[arg(long)]
    pub out: PathBuf,
    /// Report to write (default: next to --out, NAME.report.json).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Reference labels of the target, for Dice in the report.
    #[arg(long)]
    pub target_labels: Option<PathBuf>,
    /// Metric mask of the target (nonzero inside): only target voxels inside count in the
    /// similarity of every atlas registration.
    #[arg(long, value_name = "MASK")]
    pub target_mask: Option<PathBuf>,
    /// How the warped atlas label maps are combined.
    #[arg(long, value_enum, default_value_t = Fusion::Weighted)]
    pub fusion: Fusion,
    /// Standard deviation (mm) of the Gaussian that smooths the local dissimilarity of --fusion weighted.
    #[arg(long, default_value_t = 4.0, value_name = "MM")]
    pub fusion_sigma: f64,
    #[command(flatten)]
    pub options: RegOptions,
    /// Overwrite existing outputs (never an input).
    #[arg(long)]
    pub force: bool,
}

/// One atlas, read and checked.
pub struct Atlas {
    pub image_path: PathBuf,
    pub labels_path: PathBuf,
    pub image: Volume,
    pub labels: Labels,
}

/// A validated propagation job.
pub struct PropagateJob {
    pub target_path: PathBuf,
    pub target: Volume,
    pub target_labels_path: Option<PathBuf>,
    pub target_labels: Option<Labels>,
    /// `--target-mask` and the fraction of the target it covers.
    pub target_mask: Option<(Volume, f64)>,
    pub atlases: Vec<Atlas>,
    pub out: PathBuf,
    pub report: PathBuf,
    pub fusion: Fusion,
    pub fusion_sigma_mm: f64,
    pub features: FeatureKind,
    pub model: Option<ObeliskFeatures>,
    /// `--exact`: deformable levels evaluate the model at the sampled points.
    pub exact: bool,
    /// The method's options, its start among them.
    pub config: MethodConfig,
}

/// The report path next to `out`: `seg.nii.gz` → `seg.report.json`.
fn default_report(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    let stem = [".nii.gz", ".nii", ".png", ".nrrd", ".mha"]
        .iter()
        .find(|e| lower.ends_with(*e))
        .map_or(name.as_str(), |e| &name[..name.len() - e.len()]);
    out.with_file_name(format!("{stem}.report.json"))
}

impl PropagateArgs {
    /// Validates everything and reads the inputs; no output is written.
    pub fn into_job(self, quiet: bool) -> Result<PropagateJob> {
        if !self.atlas.len().is_multiple_of(2) {
            bail!("--atlas takes two paths: the atlas image and its label map");
        }
        let mut inputs: Vec<&Path> = vec![&self.target];
        inputs.extend(self.target_labels.as_deref());
        inputs.extend(self.target_mask.as_deref());
        inputs.extend(self.atlas.iter().map(PathBuf::as_path));
        for p in &inputs {
            check_input(p)?;
        }
        non_negative("--fusion-sigma", self.fusion_sigma)?;
        let (model, config) = self.options.validate()?;
        if config.start == Start::Labels && self.target_labels.is_none() {
            bail!("--init labels needs --target-labels (the atlases' labels are lined up with them)");
        }
        io::Format::of_output(&self.out)?;
        let report = self.report.clone().unwrap_or_else(|| default_report(&self.out));
        if !report.to_string_lossy().to_ascii_lowercase().ends_with(".json") {
            bail!("{}: the report must be a .json file", report.display());
        }
        check_output(&self.out, &inputs, self.force)?;
        check_output(&report, &inputs, self.force)?;
        // label maps are checked against their image's header first: a mismatch is reported
        // before any large file is read
        for pair in self.atlas.chunks(2) {
            let (img, lab) = (io::read_grid(&pair[0])?, io::read_grid(&pair[1])?);
            if !lab.same_as(&img, io::GRID_TOL) {
                return Err(IoError::new(
                    &pair[1],
                    format!(
                        "label map's grid {} does not match the grid of its atlas image {} ({})",
                        io::describe_grid(&lab),
                        pair[0].display(),
                        io::describe_grid(&img)
                    ),
                )
                .into());
            }
        }
        let target = io::read_image(&self.target)?;
        let target_labels =
            self.target_labels.as_ref().map(|p| io::read_labels_for(p, &target.grid, &self.target)).transpose()?;
        let target_mask =
            self.target_mask.as_ref().map(|p| read_mask(p, &target.grid, &self.target, quiet)).transpose()?;
        let mut atlases = Vec::new();
        for pair in self.atlas.chunks(2) {
            let image = io::read_image(&pair[0])?;
            same_dimensionality(&self.target, &target.grid, &pair[0], &image.grid)?;
            let labels = io::read_labels_for(&pair[1], &image.grid, &pair[0])?;
            atlases.push(Atlas { image_path: pair[0].clone(), labels_path: pair[1].clone(), image, labels });
        }
        Ok(PropagateJob {
            target_path: self.target,
            target,
            target_labels_path: self.target_labels,
            target_labels,
            target_mask,
            atlases,
            out: self.out,
            report,
            fusion: self.fusion,
            fusion_sigma_mm: self.fusion_sigma,
            features: self.options.features,
            model,
            exact: self.options.exact,
            config,
        })
    }
}

/// How one atlas's registration went.
#[derive(Debug, Serialize)]
pub struct AtlasRegistration {
    pub init_translation_mm: [f64; 3],
    pub stages: Vec<StageReport>,
    /// The last stage's final loss.
    pub final_loss: f64,
    pub folding_fraction: f64,
    pub sd_log_j: Option<f64>,
    pub jacobian_min: f64,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct AtlasReport {
    pub image: PathBuf,
    pub labels: PathBuf,
    pub registration: AtlasRegistration,
    /// Overlap of the warped atlas labels with --target-labels.
    #[serde(flatten)]
    pub overlap: Overlap,
}

/// Dice per label against --target-labels and its mean (both absent without reference labels).
#[derive(Debug, Default, Serialize)]
pub struct Overlap {
    pub dice: Option<BTreeMap<u32, f64>>,
    pub mean_dice: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct FusedReport {
    #[serde(flatten)]
    pub overlap: Overlap,
    pub labels: Vec<u32>,
}

/// Everything `propagate` wrote and measured (the report file).
#[derive(Debug, Serialize)]
pub struct PropagateReport {
    pub target: PathBuf,
    pub target_labels: Option<PathBuf>,
    pub out: PathBuf,
    pub report: PathBuf,
    pub features: FeatureKind,
    pub init: Start,
    pub fusion: Fusion,
    pub fusion_sigma_mm: Option<f64>,
    pub atlases: Vec<AtlasReport>,
    pub fused: FusedReport,
    pub config: MethodConfig,
    pub runtime_s: BTreeMap<String, f64>,
}

fn overlap(reference: Option<&Labels>, l: &Labels) -> Result<Overlap> {
    let Some(r) = reference else { return Ok(Overlap::default()) };
    let d = dice_per_label(r, l)?;
    let mean_dice = (!d.is_empty()).then(|| d.iter().map(|x| x.1).sum::<f64>() / d.len() as f64);
    Ok(Overlap { dice: Some(d.into_iter().collect()), mean_dice })
}

impl PropagateJob {
    pub fn run(&self, progress: &Progress) -> Result<PropagateReport> {
        let t0 = Instant::now();
        let mut runtime = BTreeMap::new();
        let extractor = self.features.extractor(&self.target.grid, self.model.as_ref())?;
        let spin = progress.spinner("features of the target");
        let images: Vec<&Volume> = std::iter::once(&self.target).chain(self.atlases.iter().map(|a| &a.image)).collect();
        let frame = FeatureFrame::for_images(&images);
        let tf = frame
            .extract(extractor.as_ref(), &self.target)
            .with_context(|| format!("features of {}", self.target_path.display()))?;
        spin.finish_and_clear();
        runtime.insert("target features".to_string(), t0.elapsed().as_secs_f64());

        let n = self.atlases.len();
        let bar = progress.bar(n as u64, "atlases", "atlases");
        let mut warped = Vec::with_capacity(n);
        let mut distances = Vec::new();
        let mut reports = Vec::with_capacity(n);
        let mut config_run = self.config.clone();
        let identity = DisplacementField::zeros(self.target.grid.clone());
        for (i, atlas) in self.atlases.iter().enumerate() {
            let t = Instant::now();
            bar.set_message(atlas.image_path.display().to_string());
            let af = frame
                .extract(extractor.as_ref(), &atlas.image)
                .with_context(|| format!("features of {}", atlas.image_path.display()))?;
            let points = match self.model.as_ref().filter(|_| self.exact) {
                Some(m) => Some(
                    frame
                        .point_features(m, &atlas.image)
                        .with_context(|| format!("features of {}", atlas.image_path.display()))?,
                ),
                None => None,
            };
            let mut stage_bars = progress.registration(&self.config);
            let pair = FeaturePair {
                fixed: &self.target,
                moving: &atlas.image,
                fixed_features: &tf,
                moving_features: &af,
                labels: self.target_labels.as_ref().map(|t| (t, &atlas.labels)),
                moving_points: points.as_deref(),
                masks: Masks { fixed: self.target_mask.as_ref().map(|m| &m.0), moving: None },
            };
            let aligned = register_features(&pair, &self.config, &mut stage_bars).with_context(|| {
                format!("registering {} to {}", atlas.image_path.display(), self.target_path.display())
            })?;
            stage_bars.finish();
            drop(af);
            let field = &aligned.registration.field;
            let labels = warp_labels(&atlas.labels, field);
            if self.fusion == Fusion::Weighted && n > 1 {
                distances.push(self.dissimilarity(extractor.as_ref(), frame, &tf, &atlas.image, field, &identity)?);
            }
            let (_, j) = jacobian(field, None)?;
            let overlap = overlap(self.target_labels.as_ref(), &labels)?;
            let stages = aligned.registration.stages;
            reports.push(AtlasReport {
                image: atlas.image_path.clone(),
                labels: atlas.labels_path.clone(),
                registration: AtlasRegistration {
                    init_translation_mm: aligned.start_translation_mm,
                    final_loss: stages.last().map_or(f64::NAN, |s| s.final_loss),
                    stages,
                    folding_fraction: j.fraction_nonpositive,
                    sd_log_j: j.sd_log_j.is_finite().then_some(j.sd_log_j),
                    jacobian_min: j.min,
                    seconds: t.elapsed().as_secs_f64(),
                },
                overlap,
            });
            config_run = aligned.config;
            warped.push(labels);
            progress.println(&atlas_line(i, n, &reports[i]));
            bar.inc(1);
        }
        bar.finish_and_clear();
        runtime.insert("registration".to_string(), t0.elapsed().as_secs_f64() - runtime["target features"]);

        let t = Instant::now();
        let fused = match (self.fusion, n) {
            (_, 1) => warped.pop().expect("one atlas"),
            (Fusion::Majority, _) => majority_vote(&warped)?,
            (Fusion::Weighted, _) => weighted_vote(&warped, &distances)?,
        };
        runtime.insert("fusion".to_string(), t.elapsed().as_secs_f64());
        let fused_overlap = overlap(self.target_labels.as_ref(), &fused)?;
        io::write_label_map(&self.out, &fused)?;
        runtime.insert("total".to_string(), t0.elapsed().as_secs_f64());
        let report = PropagateReport {
            target: self.target_path.clone(),
            target_labels: self.target_labels_path.clone(),
            out: self.out.clone(),
            report: self.report.clone(),
            features: self.features,
            init: self.config.start,
            fusion: self.fusion,
            fusion_sigma_mm: (self.fusion == Fusion::Weighted).then_some(self.fusion_sigma_mm),
            atlases: reports,
            fused: FusedReport { overlap: fused_overlap, labels: fused.ids() },
            config: config_run,
            runtime_s: runtime,
        };
        let json = serde_json::to_string_pretty(&report)?;
        io::atomic::write_atomic(&self.report, |f| std::io::Write::write_all(f, json.as_bytes()))?;
        Ok(report)
    }

    /// The local dissimilarity between the target and the warped atlas image, on the target grid.
    fn dissimilarity(
        &self,
        extractor: &dyn FeatureExtractor,
        frame: FeatureFrame,
        target_features: &Volume,
        atlas: &Volume,
        field: &DisplacementField,
        identity: &DisplacementField,
    ) -> Result<Volume> {
        let warped = warp_volume(atlas, field, Interpolation::Linear, Padding::Extent);
        let wf = frame.extract(extractor, &warped).context("features of the warped atlas")?;
        let d = local_distance(target_features, &wf, self.fusion_sigma_mm)?;
        // features on a coarser grid (OBELISK) give a coarser map; the vote is on the target grid
        Ok(if d.grid.same_as(&self.target.grid, io::GRID_TOL) {
            d
        } else {
            warp_volume(&d, identity, Interpolation::Linear, Padding::Border)
        })
    }
}

fn atlas_line(i: usize, n: usize, r: &AtlasReport) -> String {
    let name = r.image.file_name().map_or_else(|| r.image.display().to_string(), |s| s.to_string_lossy().into());
    let first = r.registration.stages.first().map_or(f64::NAN, |s| s.initial_loss);
    let mut line = format!(
        "atlas {}/{n} {name}: loss {first:.4} -> {:.4}  folding {:.4}%  {:.1} s",
        i + 1,
        r.registration.final_loss,
        100.0 * r.registration.folding_fraction,
        r.registration.seconds
    );
    if let Some(d) = r.overlap.mean_dice {
        line.push_str(&format!("  mean Dice {d:.3}"));
    }
    line
}

pub fn run(args: PropagateArgs, out: Output) -> Result<()> {
    let job = args.into_job(out.silent())?;
    let report = job.run(&Progress::new(out.silent()))?;
    out.finish(&report, || {
        let n = report.atlases.len();
        let vote = match report.fusion {
            Fusion::Majority => "majority",
            Fusion::Weighted => "locally weighted",
        };
        let what = if n == 1 { "1 atlas, no fusion".to_string() } else { format!("{n} atlases, {vote} vote") };
        match report.fused.overlap.mean_dice {
            Some(d) => println!("fused label map ({what}): mean Dice {d:.3}"),
            None => println!("fused label map ({what})"),
        }
        println!("wrote {} and {}", report.out.display(), report.report.display());
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lies_next_to_the_output() {
        assert_eq!(default_report(Path::new("a/seg.nii.gz")), PathBuf::from("a/seg.report.json"));
        assert_eq!(default_report(Path::new("seg.NII")), PathBuf::from("seg.report.json"));
        assert_eq!(default_report(Path::new("x/s.png")), PathBuf::from("x/s.report.json"));
    }
}
