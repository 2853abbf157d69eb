//! `obelisk train` (segmentation model from a dataset.json, optional k-fold cross-validation) and
//! `obelisk segment` (full-volume inference with a trained model).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};
use registration::{Labels, Volume};
use segmentation::model::{CONFIG_FILE, WEIGHTS_FILE};
use segmentation::{
    Architecture, HybridNetConfig, InputNorm, Model, ModelConfig, ObeliskNetConfig, TrainConfig, UNetConfig,
};
use serde::Serialize;

use crate::cli::validate::{at_least_one, check_input, prepare_out_dir};
use crate::cli::Output;
use crate::io::{self, atomic::check_output, atomic::write_atomic, dataset::Dataset};
use crate::progress::Progress;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchArg {
    /// OBELISK-Net: sparse learned offsets on a quarter-resolution grid (its features drive
    /// `register --features obelisk`).
    Obelisk,
    /// OBELISK-Net at the size of the MIDL paper: 1024 offset pairs, 1x1x1 layers 1024→256→128,
    /// a dense block of four layers growing by 32 (129,672 parameters with 8 classes; about
    /// 257 more per class). Slower to train than the compact `obelisk`.
    #[value(name = "obelisk-midl")]
    #[serde(rename = "obelisk-midl")]
    ObeliskMidl,
    /// A small 3D U-Net (full-resolution features).
    Unet,
    /// Hybrid OBELISK-Net (journal version): a few 3x3x3 convs, two OBELISK layers and a small
    /// decoder; trains on whole volumes (half-resolution features).
    Hybrid,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  obelisk synth --out cohort/ --subjects 4 --size 64,64,64 --spacing 5,5,5
  obelisk train --dataset cohort/dataset.json --out model/
  obelisk train --dataset cohort/dataset.json --out model/ --arch unet --iterations 500 --seed 2
  obelisk train --dataset cohort/dataset.json --out cv/ --folds 4
  obelisk train --dataset cohort/dataset.json --out hybrid/ --arch hybrid
  obelisk train --dataset cohort/dataset.json --out midl/ --arch obelisk-midl --iterations 1500

Reads a dataset description in the Learn2Reg schema (e.g. AbdomenCTCT_dataset.json as
published, or the dataset.json of obelisk synth; see docs/dataset-json.md): the training entries
that have a label map (paths relative to the JSON's folder) and the labels map. Writes model.safetensors
and config.json (with the label names) into --out; with --folds K also cv.json and cv.md with
the Dice of every label in every held-out fold, then trains the saved model on all subjects.")]
pub struct TrainArgs {
    /// dataset.json listing training images and label maps.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Model folder to write (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = ArchArg::Obelisk)]
    pub arch: ArchArg,
    /// Training iterations (batches).
    #[arg(long, default_value_t = 200)]
    pub iterations: usize,
    /// Seed of the weight initialisation and of the sampling of training points, from the
    /// global `--seed` (default 0).
    #[arg(skip = 0u64)]
    pub seed: u64,
    /// K-fold cross-validation before the final training (2 ≤ K ≤ number of subjects).
    #[arg(long)]
    pub folds: Option<usize>,
    /// Iterations between progress lines on stderr.
    #[arg(long, default_value_t = 25)]
    pub log_every: usize,
    /// Overwrite existing outputs.
    #[arg(long)]
    pub force: bool,
    /// Ablation: no random affine transform of the sampling coordinates (OBELISK architectures;
    /// the U-Net and the hybrid net train without it anyway).
    #[arg(long)]
    pub no_augmentation: bool,
    /// Ablation: the loss over every point or voxel instead of the hardest 25 % (the U-Net's
    /// recipe counts every voxel anyway).
    #[arg(long)]
    pub no_ohem: bool,
    /// Ablation: one learned offset per kernel element and its plain sample instead of the
    /// difference of two samples (`--arch obelisk` and `obelisk-midl` only).
    #[arg(long)]
    pub single_offset: bool,
}

/// The ablations of `obelisk train` (all off by default).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Ablations {
    pub no_augmentation: bool,
    pub no_ohem: bool,
    pub single_offset: bool,
}

/// One training subject as read from disk.
pub struct Subject {
    pub image_path: PathBuf,
    pub image: Tensor,
    pub labels: Tensor,
}

/// A validated training job: data read, label names known, outputs writable.
pub struct TrainJob {
    pub subjects: Vec<Subject>,
    pub label_names: Vec<String>,
    pub arch: ArchArg,
    pub iterations: usize,
    pub seed: u64,
    pub folds: Option<usize>,
    pub log_every: usize,
    pub out: PathBuf,
    pub input_norm: InputNorm,
    pub ablations: Ablations,
}

fn volume_tensor(v: &Volume) -> Result<Tensor> {
    let (d, h, w) = v.grid.dhw();
    Ok(Tensor::from_slice(&v.data, (1, 1, d, h, w), &Device::Cpu)?)
}

/// Input normalisation that maps the 0.5 and 99.5 percentiles of the training intensities to
/// −1 and 1, so that CT (HU) and MR (arbitrary units) cohorts train alike.
fn robust_norm(images: &[Volume]) -> InputNorm {
    let mut all: Vec<f32> = images.iter().flat_map(|v| v.data.iter().step_by(7).copied()).collect();
    all.sort_by(f32::total_cmp);
    let at = |p: f64| f64::from(all[((all.len() - 1) as f64 * p).round() as usize]);
    let (lo, hi) = (at(0.005), at(0.995));
    if hi > lo {
        InputNorm { scale: 2.0 / (hi - lo), offset: -(hi + lo) / (hi - lo), robust: false }
    } else {
        InputNorm { scale: 1.0, offset: -lo, robust: false }
    }
}

impl TrainArgs {
    pub fn into_job(self) -> Result<TrainJob> {
        at_least_one("--iterations", self.iterations)?;
        at_least_one("--log-every", self.log_every)?;
        if self.single_offset && !matches!(self.arch, ArchArg::Obelisk | ArchArg::ObeliskMidl) {
            bail!("--single-offset applies to --arch obelisk and obelisk-midl only");
        }
        let ds = Dataset::load(&self.dataset)?;
        let json = self.dataset.display();
        let labelled = ds.labelled_training();
        if labelled.is_empty() {
            bail!("{json}: no training entry has a label map (\"training\": [{{\"image\": ..., \"label\": ...}}])");
        }
        if let Some(k) = self.folds {
            if k < 2 || k > labelled.len() {
                bail!("--folds must be between 2 and the number of labelled subjects ({}), got {k}", labelled.len());
            }
        }
        ds.check_files(labelled.iter().flat_map(|s| s.files()))?;
        let max_named = ds.labels.keys().copied().max().unwrap_or(0);
        if max_named > MAX_LABEL {
            bail!("{json}: label id {max_named} is larger than {MAX_LABEL}, the most a model can be trained for");
        }
        let mut max_label = max_named;
        let mut volumes = Vec::new();
        let mut raw = Vec::new();
        for s in &labelled {
            let (ip, lp) = (s.image.clone(), s.label.clone().expect("labelled"));
            check_input(&ip)?;
            check_input(&lp)?;
            let img = io::read_image(&ip)?;
            let lab = io::read_labels_for(&lp, &img.grid, &ip)?;
            let m = lab.data.iter().copied().max().unwrap_or(0);
            if !ds.labels.is_empty() && m > max_named {
                bail!("{}: label {m} is not in the labels map of {json}", lp.display());
            }
            if m > MAX_LABEL {
                bail!("{}: label {m} is larger than {MAX_LABEL}, the most a model can be trained for", lp.display());
            }
            max_label = max_label.max(m);
            raw.push((ip, lab));
            volumes.push(img);
        }
        if max_label == 0 {
            bail!("{json}: the label maps hold no foreground");
        }
        let label_names: Vec<String> = (0..=max_label)
            .map(|i| {
                ds.labels.get(&i).cloned().unwrap_or_else(|| {
                    if i == 0 {
                        "background".into()
                    } else {
                        format!("label_{i}")
                    }
                })
            })
            .collect();
        let input_norm = robust_norm(&volumes);
        let mut subjects = Vec::new();
        for ((image_path, lab), img) in raw.into_iter().zip(&volumes) {
            let (d, h, w) = lab.grid.dhw();
            let labels = Tensor::from_vec(lab.data, (d, h, w), &Device::Cpu)?;
            subjects.push(Subject { image_path, image: volume_tensor(img)?, labels });
        }
        prepare_out_dir(&self.out)?;
        let mut planned = vec![self.out.join(WEIGHTS_FILE), self.out.join(CONFIG_FILE)];
        if self.folds.is_some() {
            planned.extend([self.out.join("cv.json"), self.out.join("cv.md")]);
        }
        let inputs: Vec<&Path> = std::iter::once(self.dataset.as_path()).collect();
        for p in &planned {
            check_output(p, &inputs, self.force)?;
        }
        Ok(TrainJob {
            subjects,
            label_names,
            arch: self.arch,
            iterations: self.iterations,
            seed: self.seed,
            folds: self.folds,
            log_every: self.log_every,
            out: self.out,
            input_norm,
            ablations: Ablations {
                no_augmentation: self.no_augmentation,
                no_ohem: self.no_ohem,
                single_offset: self.single_offset,
            },
        })
    }
}

/// The largest label id a model can be trained for: one output channel per id up to it.
pub const MAX_LABEL: u32 = 1000;

/// Per-label Dice of one cross-validation fold (mean over its held-out subjects).
#[derive(Debug, Serialize)]
pub struct FoldReport {
    pub fold: usize,
    pub train: Vec<PathBuf>,
    pub test: Vec<PathBuf>,
    /// Label name → Dice; null where the label is absent from truth and prediction.
    pub dice: BTreeMap<String, Option<f64>>,
    pub mean_dice: Option<f64>,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct CvReport {
    pub folds: Vec<FoldReport>,
    /// Label name → mean Dice over the folds.
    pub mean: BTreeMap<String, Option<f64>>,
    pub mean_dice: Option<f64>,
}

/// What `obelisk train` did: the saved model and, with --folds, the cross-validation.
#[derive(Debug, Serialize)]
pub struct TrainReport {
    pub out: PathBuf,
    pub arch: ArchArg,
    pub parameters: usize,
    pub subjects: usize,
    pub iterations: usize,
    pub seed: u64,
    /// Training loss at the last iteration of the final model (trained on every subject).
    pub final_loss: f64,
    /// Training time of the final model (cross-validation folds not included).
    pub seconds: f64,
    pub cv: Option<CvReport>,
}

/// The training options `obelisk train` uses for `arch`, with the ablations applied (OHEM keeps
/// every point, augmentation draws no affine).
fn recipe(arch: ArchArg, iterations: usize, seed: u64, a: Ablations) -> TrainConfig {
    let base = TrainConfig {
        lr: 0.005,
        // the learning rate decays to 0.99^50 ≈ 0.6 of its start over the run
        lr_decay: 0.99,
        decay_every: (iterations / 50).max(1),
        batch_size: 2,
        points_per_image: 512,
        patch_size: [32; 3],
        epochs: 1,
        iters_per_epoch: iterations,
        seed,
        ..TrainConfig::default()
    };
    let base = match arch {
        // The U-Net's loss covers every voxel of its patches, at twice the step. With the
        // hardest quarter only (the OBELISK recipe) it learned far slower on dense patches:
        // 3 synthetic subjects (48³ at 7 mm), 150 iterations, mean Dice on them 0.21–0.26
        // against 0.38–0.40 over every voxel; 0.63–0.65 after 300 iterations at step 0.01.
        ArchArg::Unet => TrainConfig { lr: 0.01, ohem_fraction: 1.0, ..base },
        _ => base,
    };
    TrainConfig {
        ohem_fraction: if a.no_ohem { 1.0 } else { base.ohem_fraction },
        affine_sigma: if a.no_augmentation { 0.0 } else { base.affine_sigma },
        ..base
    }
}

fn mean(v: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.into_iter().filter(|x| x.is_finite()).fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

impl TrainJob {
    pub fn model_config(&self) -> ModelConfig {
        let classes = self.label_names.len();
        // small enough for CPU training of a handful of subjects in about a minute; the feature
        // grid keeps the reference's quarter resolution
        let arch = match self.arch {
            ArchArg::Obelisk => Architecture::ObeliskNet(ObeliskNetConfig {
                num_classes: classes,
                kernels: 128,
                groups: 4,
                hidden: 64,
                mid: 32,
                growth: 16,
                dense_layers: 2,
                pool_kernel: [3, 3, 3],
                binary: !self.ablations.single_offset,
                ..Default::default()
            }),
            ArchArg::ObeliskMidl => Architecture::ObeliskNet(ObeliskNetConfig {
                num_classes: classes,
                binary: !self.ablations.single_offset,
                ..Default::default()
            }),
            ArchArg::Unet => {
                Architecture::Unet(UNetConfig { num_classes: classes, channels: vec![8, 16, 32], ..Default::default() })
            }
            ArchArg::Hybrid => Architecture::Hybrid(HybridNetConfig { num_classes: classes, ..Default::default() }),
        };
        ModelConfig::new(arch, self.input_norm, self.label_names.clone())
    }

    fn train_config(&self) -> TrainConfig {
        recipe(self.arch, self.iterations, self.seed, self.ablations)
    }

    /// Trains a fresh model on `subset` of the subjects; also gives the last training loss.
    fn train_on(&self, subset: &[usize], label: &str, quiet: bool) -> Result<(Model, f64)> {
        let model = Model::new(self.model_config(), self.seed, &Device::Cpu)?;
        let data: Vec<(Tensor, Tensor)> =
            subset.iter().map(|&i| (self.subjects[i].image.clone(), self.subjects[i].labels.clone())).collect();
        let every = self.log_every;
        let bars = Progress::new(quiet);
        let prefix = if label.is_empty() { "training" } else { label.trim_end() };
        let bar = bars.bar(self.iterations as u64, prefix, "it");
        let mut last_loss = f64::NAN;
        segmentation::train(&model, &data, self.train_config(), &mut |p| {
            last_loss = p.loss;
            if bars.visible() {
                bar.set_length(p.total as u64);
                bar.set_position(p.iteration as u64);
                bar.set_message(format!("loss {:.4}", p.loss));
            } else if !quiet && (p.iteration % every == 0 || p.iteration == p.total) {
                eprintln!("{label}iteration {:>5}/{}  loss {:.4}  lr {:.5}", p.iteration, p.total, p.loss, p.lr);
            }
        })?;
        bar.finish_and_clear();
        Ok((model, last_loss))
    }

    pub fn run(&self, quiet: bool) -> Result<TrainReport> {
        let names = &self.label_names[1..];
        let cv = match self.folds {
            Some(k) => {
                let mut folds = Vec::new();
                for (f, (train, test)) in segmentation::kfold(self.subjects.len(), k)?.into_iter().enumerate() {
                    let t = Instant::now();
                    let (model, _) = self.train_on(&train, &format!("fold {}/{k}  ", f + 1), quiet)?;
                    let mut per_label: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
                    for &i in &test {
                        let s = &self.subjects[i];
                        let d = segmentation::evaluate_dice(&model, &s.image, &s.labels)
                            .with_context(|| format!("evaluating on {}", s.image_path.display()))?;
                        for (acc, v) in per_label.iter_mut().zip(d) {
                            acc.push(v);
                        }
                    }
                    let dice: BTreeMap<String, Option<f64>> =
                        names.iter().zip(&per_label).map(|(n, v)| (n.clone(), mean(v.iter().copied()))).collect();
                    let report = FoldReport {
                        fold: f + 1,
                        train: train.iter().map(|&i| self.subjects[i].image_path.clone()).collect(),
                        test: test.iter().map(|&i| self.subjects[i].image_path.clone()).collect(),
                        mean_dice: mean(dice.values().flatten().copied()),
                        dice,
                        seconds: t.elapsed().as_secs_f64(),
                    };
                    if !quiet {
                        eprintln!("fold {}/{k}: mean Dice {:.3}", f + 1, report.mean_dice.unwrap_or(f64::NAN));
                    }
                    folds.push(report);
                }
                let mean_by_label: BTreeMap<String, Option<f64>> = names
                    .iter()
                    .map(|n| (n.clone(), mean(folds.iter().filter_map(|f| f.dice.get(n).copied().flatten()))))
                    .collect();
                let report =
                    CvReport { mean_dice: mean(mean_by_label.values().flatten().copied()), mean: mean_by_label, folds };
                let json = serde_json::to_string_pretty(&report)?;
                write_atomic(&self.out.join("cv.json"), |f| std::io::Write::write_all(f, json.as_bytes()))?;
                let md = cv_markdown(&report, names);
                write_atomic(&self.out.join("cv.md"), |f| std::io::Write::write_all(f, md.as_bytes()))?;
                Some(report)
            }
            None => None,
        };
        let all: Vec<usize> = (0..self.subjects.len()).collect();
        let t = Instant::now();
        let (model, final_loss) = self.train_on(&all, "", quiet)?;
        let seconds = t.elapsed().as_secs_f64();
        save_model(&model, &self.out)?;
        Ok(TrainReport {
            out: self.out.clone(),
            arch: self.arch,
            parameters: model.num_parameters(),
            subjects: self.subjects.len(),
            iterations: self.iterations,
            seed: self.seed,
            final_loss,
            seconds,
            cv,
        })
    }
}

/// The cross-validation table: one row per label, one column per fold, then the mean.
pub fn cv_markdown(r: &CvReport, names: &[String]) -> String {
    let cell = |v: Option<f64>| v.map_or("–".to_string(), |d| format!("{d:.3}"));
    let mut s = String::from("| label |");
    for f in &r.folds {
        s.push_str(&format!(" fold {} |", f.fold));
    }
    s.push_str(" mean |\n|---|");
    s.push_str(&"---:|".repeat(r.folds.len() + 1));
    s.push('\n');
    for n in names {
        s.push_str(&format!("| {n} |"));
        for f in &r.folds {
            s.push_str(&format!(" {} |", cell(f.dice.get(n).copied().flatten())));
        }
        s.push_str(&format!(" {} |\n", cell(r.mean.get(n).copied().flatten())));
    }
    s.push_str("| **mean** |");
    for f in &r.folds {
        s.push_str(&format!(" {} |", cell(f.mean_dice)));
    }
    s.push_str(&format!(" {} |\n", cell(r.mean_dice)));
    s
}

/// Writes the model folder, each file atomically (a crash never leaves weights that disagree
/// with a complete config).
pub fn save_model(model: &Model, dir: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(&model.config)?;
    let weights = model.weights_to_bytes()?;
    write_atomic(&dir.join(WEIGHTS_FILE), |f| std::io::Write::write_all(f, &weights))?;
    write_atomic(&dir.join(CONFIG_FILE), |f| std::io::Write::write_all(f, json.as_bytes()))?;
    Ok(())
}

pub fn train(args: TrainArgs, out: Output) -> Result<()> {
    let job = args.into_job()?;
    let t = Instant::now();
    let report = job.run(out.silent())?;
    out.finish(&report, || {
        if let Some(cv) = &report.cv {
            print!("{}", cv_markdown(cv, &job.label_names[1..]));
        }
        println!(
            "trained on {} subject(s) in {:.1} s; model ({} parameters) in {}",
            job.subjects.len(),
            t.elapsed().as_secs_f64(),
            report.parameters,
            job.out.display()
        );
    })
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  obelisk segment --model model/ --image ct.nii.gz --out ct_seg.nii.gz
  obelisk segment --model model/ --image slice.png --out slice_seg.png

The label map lies on the image's grid: the network's output is upsampled to the image shape.")]
pub struct SegmentArgs {
    /// Model folder written by obelisk train.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Image to segment (.nii, .nii.gz, .png, .nrrd, .nhdr, .mha, .mhd or a DICOM folder).
    #[arg(long)]
    pub image: PathBuf,
    /// Label map to write (.nii, .nii.gz, .nrrd, .mha; .png for 2D).
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite an existing output.
    #[arg(long)]
    pub force: bool,
}

pub fn segment(args: SegmentArgs, out: Output) -> Result<()> {
    check_input(&args.image)?;
    io::Format::of_output(&args.out)?;
    check_output(&args.out, &[&args.image], args.force)?;
    if !args.model.is_dir() {
        bail!("{}: model folder not found", args.model.display());
    }
    let model = Model::load(&args.model, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{}: cannot load the model: {e}", args.model.display()))?;
    let img = io::read_image(&args.image)?;
    let t = Instant::now();
    let pred = segmentation::evaluate(&model, &volume_tensor(&img)?)
        .with_context(|| format!("segmenting {}", args.image.display()))?;
    let labels = Labels::new(img.grid.clone(), pred)?;
    io::write_label_map(&args.out, &labels)?;
    let seconds = t.elapsed().as_secs_f64();
    let present: Vec<String> = labels
        .ids()
        .into_iter()
        .filter(|&i| i != 0)
        .map(|i| model.config.label_names.get(i as usize).cloned().unwrap_or_else(|| i.to_string()))
        .collect();
    let summary = serde_json::json!({
        "out": args.out,
        "image": args.image,
        "model": args.model,
        "labels": present,
        "shape": img.grid.shape(),
        "seconds": seconds,
    });
    out.finish(&summary, || println!("wrote {} in {seconds:.1} s; labels: {}", args.out.display(), present.join(", ")))
}

#[cfg(test)]
mod tests {
    use registration::Grid;

    use super::*;

    #[test]
    fn recipes_per_architecture_and_ablation() {
        let none = Ablations::default();
        let o = recipe(ArchArg::Obelisk, 1000, 3, none);
        assert_eq!((o.ohem_fraction, o.lr, o.iters_per_epoch, o.seed, o.decay_every), (0.25, 0.005, 1000, 3, 20));
        assert!(o.affine_sigma > 0.0);
        let u = recipe(ArchArg::Unet, 1000, 3, none);
        assert_eq!((u.ohem_fraction, u.lr), (1.0, 0.01));
        let ab = Ablations { no_ohem: true, no_augmentation: true, single_offset: false };
        let o = recipe(ArchArg::Obelisk, 1000, 3, ab);
        assert_eq!((o.ohem_fraction, o.affine_sigma), (1.0, 0.0));
        assert_eq!(recipe(ArchArg::Hybrid, 10, 0, none).ohem_fraction, 0.25);
    }

    #[test]
    fn robust_norm_maps_the_percentiles_to_plus_minus_one() {
        let grid = Grid::from_spacing([10, 10, 10], [1.0; 3], [0.0; 3]).unwrap();
        let mut data: Vec<f32> = (0..1000).map(|v| v as f32 * 0.5 - 100.0).collect();
        data[3] = 1e7; // one outlier must not set the scale
        let n = robust_norm(&[Volume::new(grid.clone(), 1, data).unwrap()]);
        let f = |x: f64| x * n.scale + n.offset;
        assert!((f(150.0)).abs() < 0.05, "{n:?}");
        assert!(f(-100.0) < -0.9 && f(-100.0) > -1.1 && f(399.5) > 0.9 && f(399.5) < 1.1, "{n:?}");
        let flat = robust_norm(&[Volume::new(grid, 1, vec![7.0; 1000]).unwrap()]);
        assert_eq!(7.0 * flat.scale + flat.offset, 0.0);
    }

    #[test]
    fn cv_table_has_a_row_per_label_and_marks_absent_labels() {
        let names = vec!["liver".to_string(), "spleen".to_string()];
        let fold = |i: usize, l: f64, s: Option<f64>| FoldReport {
            fold: i,
            train: vec![],
            test: vec![],
            dice: [("liver".to_string(), Some(l)), ("spleen".to_string(), s)].into_iter().collect(),
            mean_dice: mean([Some(l), s].into_iter().flatten()),
            seconds: 0.0,
        };
        let r = CvReport {
            folds: vec![fold(1, 0.5, None), fold(2, 0.7, Some(0.2))],
            mean: [("liver".to_string(), Some(0.6)), ("spleen".to_string(), Some(0.2))].into_iter().collect(),
            mean_dice: Some(0.4),
        };
        let md = cv_markdown(&r, &names);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "| label | fold 1 | fold 2 | mean |");
        assert_eq!(lines[2], "| liver | 0.500 | 0.700 | 0.600 |");
        assert_eq!(lines[3], "| spleen | – | 0.200 | 0.200 |");
        assert_eq!(lines[4], "| **mean** | 0.500 | 0.450 | 0.400 |");
        assert_eq!(mean([f64::NAN, 1.0, 3.0]), Some(2.0));
        assert_eq!(mean([f64::NAN]), None);
    }
}
