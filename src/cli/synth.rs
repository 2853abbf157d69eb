//! `obelisk synth`: synthetic abdominal phantoms with ground-truth deformations, and `obelisk demo`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use registration::synth::{self, phantom::LABEL_NAMES, Modality, SynthConfig};
use serde_json::json;

use crate::cli::validate::prepare_out_dir;
use crate::cli::Output;
use crate::io::{self, atomic::check_output};
use crate::progress::Progress;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModalityArg {
    Ct,
    Mr,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  obelisk synth --out cohort/ --subjects 10 --seed 1
  obelisk synth --out pairs/ --subjects 2 --pairs 2 --size 64,64,64 --spacing 5,5,5

Writes subject_NNN_image.nii.gz / subject_NNN_labels.nii.gz, with --pairs also
pair_NNN_{fixed,moving}[_labels].nii.gz and pair_NNN_truth.nii.gz (ITK displacement field,
LPS mm on the fixed grid), and dataset.json (Learn2Reg-style). Labels: 1 liver, 2 spleen,
3 kidney_right, 4 kidney_left, 5 stomach, 6 pancreas, 7 aorta, 8 gallbladder, 9 spine.")]
pub struct SynthArgs {
    /// Output folder (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of subjects (different anatomies).
    #[arg(long, default_value_t = 1)]
    pub subjects: usize,
    /// Number of registration pairs with known ground-truth fields.
    #[arg(long, default_value_t = 0)]
    pub pairs: usize,
    /// Cohort seed, from the global `--seed` (default 0): the same seed gives byte-identical files.
    #[arg(skip = 0u64)]
    pub seed: u64,
    /// Grid size nx,ny,nz.
    #[arg(long, value_delimiter = ',', default_values_t = [96usize, 96, 96])]
    pub size: Vec<usize>,
    /// Voxel spacing in mm: sx,sy,sz.
    #[arg(long, value_delimiter = ',', default_values_t = [3.5f64, 3.5, 3.5])]
    pub spacing: Vec<f64>,
    #[arg(long, value_enum, default_value_t = ModalityArg::Ct)]
    pub modality: ModalityArg,
    /// Largest displacement of the ground-truth fields (mm).
    #[arg(long, default_value_t = 10.0)]
    pub max_displacement: f64,
    /// Overwrite existing outputs.
    #[arg(long)]
    pub force: bool,
}

impl SynthArgs {
    pub fn config(&self) -> Result<SynthConfig> {
        if self.size.len() != 3 || self.spacing.len() != 3 {
            bail!("--size and --spacing take three comma-separated values, e.g. 96,96,96");
        }
        let size = [self.size[0], self.size[1], self.size[2]];
        let spacing = [self.spacing[0], self.spacing[1], self.spacing[2]];
        if size.iter().any(|n| !(8..=1024).contains(n)) {
            bail!("--size must be between 8 and 1024 voxels per axis, got {size:?}");
        }
        if spacing.iter().any(|s| !(s.is_finite() && *s >= 0.1 && *s <= 20.0)) {
            bail!("--spacing must be between 0.1 and 20 mm, got {spacing:?}");
        }
        if !(self.max_displacement.is_finite() && self.max_displacement >= 0.0 && self.max_displacement <= 100.0) {
            bail!("--max-displacement must be between 0 and 100 mm");
        }
        if self.subjects == 0 && self.pairs == 0 {
            bail!("nothing to do: --subjects and --pairs are both 0");
        }
        if self.subjects > 1000 || self.pairs > 1000 {
            bail!("at most 1000 subjects and pairs");
        }
        Ok(SynthConfig {
            size,
            spacing,
            modality: match self.modality {
                ModalityArg::Ct => Modality::Ct,
                ModalityArg::Mr => Modality::Mr,
            },
            seed: self.seed,
            max_displacement_mm: self.max_displacement,
            ..Default::default()
        })
    }
}

fn name(prefix: &str, i: usize, what: &str) -> String {
    format!("{prefix}_{i:03}_{what}.nii.gz")
}

/// Writes the cohort and pairs; returns the dataset description.
pub fn write_dataset(
    cfg: &SynthConfig,
    out: &Path,
    subjects: usize,
    pairs: usize,
    force: bool,
    progress: &Progress,
) -> Result<serde_json::Value> {
    prepare_out_dir(out)?;
    let mut planned = Vec::new();
    for i in 0..subjects {
        planned.push(name("subject", i, "image"));
        planned.push(name("subject", i, "labels"));
    }
    for i in 0..pairs {
        for w in ["fixed", "fixed_labels", "moving", "moving_labels", "truth"] {
            planned.push(name("pair", i, w));
        }
    }
    planned.push("dataset.json".into());
    for p in &planned {
        check_output(&out.join(p), &[], force)?;
    }
    let mut training = Vec::new();
    let bar = progress.bar((subjects + pairs) as u64, "synth", "subjects and pairs");
    for i in 0..subjects {
        let (img, lab) = synth::render(&cfg.phantom(i as u64), &cfg.grid()?);
        io::write_volume(&out.join(name("subject", i, "image")), &img)?;
        io::write_labels(&out.join(name("subject", i, "labels")), &lab)?;
        training.push(json!({"image": format!("./{}", name("subject", i, "image")), "label": format!("./{}", name("subject", i, "labels"))}));
        bar.inc(1);
    }
    let mut reg_pairs = Vec::new();
    for i in 0..pairs {
        let p = synth::make_pair(cfg, i as u64)?;
        io::write_volume(&out.join(name("pair", i, "fixed")), &p.fixed)?;
        io::write_labels(&out.join(name("pair", i, "fixed_labels")), &p.fixed_labels)?;
        io::write_volume(&out.join(name("pair", i, "moving")), &p.moving)?;
        io::write_labels(&out.join(name("pair", i, "moving_labels")), &p.moving_labels)?;
        io::write_field(&out.join(name("pair", i, "truth")), &p.truth)?;
        reg_pairs.push(json!({
            "fixed": format!("./{}", name("pair", i, "fixed")),
            "moving": format!("./{}", name("pair", i, "moving")),
            "fixed_label": format!("./{}", name("pair", i, "fixed_labels")),
            "moving_label": format!("./{}", name("pair", i, "moving_labels")),
            "truth_field": format!("./{}", name("pair", i, "truth")),
        }));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let labels: serde_json::Map<String, serde_json::Value> =
        LABEL_NAMES.iter().enumerate().map(|(i, n)| (i.to_string(), json!(n))).collect();
    let ds = json!({
        "name": "obelisk-synthetic",
        "description": "Synthetic abdominal phantoms generated by `obelisk synth`",
        "tensorImageSize": {"0": "3D"},
        "modality": {"0": match cfg.modality { Modality::Ct => "CT", Modality::Mr => "MR" }},
        "labels": labels,
        "tensorImageShape": {"0": cfg.size},
        "tensorSize": cfg.size,
        "spacing": cfg.spacing,
        "seed": cfg.seed,
        "numTraining": subjects,
        "training": training,
        "numPairs": pairs,
        "registration_val": reg_pairs,
    });
    let text = serde_json::to_string_pretty(&ds)?;
    io::atomic::write_atomic(&out.join("dataset.json"), |f| std::io::Write::write_all(f, text.as_bytes()))?;
    Ok(ds)
}

pub fn run(args: SynthArgs, out: Output) -> Result<()> {
    let cfg = args.config()?;
    let t = std::time::Instant::now();
    write_dataset(&cfg, &args.out, args.subjects, args.pairs, args.force, &Progress::new(out.silent()))?;
    let seconds = t.elapsed().as_secs_f64();
    let summary = json!({
        "out": args.out,
        "dataset": args.out.join("dataset.json"),
        "subjects": args.subjects,
        "pairs": args.pairs,
        "shape": cfg.size,
        "spacing_mm": cfg.spacing,
        "seed": cfg.seed,
        "seconds": seconds,
    });
    out.finish(&summary, || {
        println!(
            "wrote {} subject(s) and {} pair(s) to {} in {seconds:.1} s",
            args.subjects,
            args.pairs,
            args.out.display(),
        )
    })
}
