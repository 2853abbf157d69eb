//! `obelisk randomise` (domain-randomised pairs with known correspondence from real label maps)
//! and `obelisk train-features` (a registration feature model learned from such pairs).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use registration::features::learn::{train_features, FeatureTraining};
use registration::synth::randomise::{random_pair, LabelSubject, RandomPair, RandomiseConfig};
use registration::synth::rng::derive;
use registration::{DisplacementField, Labels, Volume};
use segmentation::model::{CONFIG_FILE, WEIGHTS_FILE};
use serde::Serialize;

use crate::cli::validate::{at_least_one, check_input, prepare_out_dir};
use crate::cli::Output;
use crate::io::{self, atomic::check_output, atomic::write_atomic};
use crate::progress::Progress;

/// The label maps (and images) to randomise, shared by both commands.
#[derive(Debug, Args)]
pub struct SubjectArgs {
    /// A label map, optionally with its image after a comma (`LABELS,IMAGE`, same grid): the
    /// image's intensities split the unlabelled voxels into classes (air, fat, bone, ...).
    /// Repeat for more subjects.
    #[arg(long = "subject", value_name = "LABELS[,IMAGE]", required = true)]
    pub subjects: Vec<String>,
    /// Spacing (mm) the label maps are resampled to before patches are cut.
    #[arg(long, default_value_t = 2.0)]
    pub label_spacing: f64,
    /// Intensity classes of the unlabelled voxels of subjects given with an image.
    #[arg(long, default_value_t = 4)]
    pub background_classes: usize,
}

impl SubjectArgs {
    /// Reads and prepares every subject; errors name the file.
    fn load(&self) -> Result<Vec<LabelSubject>> {
        if !(self.label_spacing > 0.0 && self.label_spacing <= 20.0) {
            bail!("--label-spacing must be in (0, 20] mm, got {}", self.label_spacing);
        }
        at_least_one("--background-classes", self.background_classes)?;
        let mut out = Vec::new();
        for s in self.split() {
            let labels_path = &s[0];
            check_input(labels_path)?;
            let labels = io::read_label_map(labels_path)?;
            let image = match s.get(1) {
                Some(p) => {
                    check_input(p)?;
                    let img = io::read_image(p)?;
                    // the same check (and message) as every other label map beside its image
                    io::read_labels_for(labels_path, &img.grid, p)?;
                    Some(img)
                }
                None => None,
            };
            let subject = LabelSubject::new(&labels, image.as_ref(), self.label_spacing, self.background_classes)
                .with_context(|| format!("{}", labels_path.display()))?;
            out.push(subject);
        }
        Ok(out)
    }

    /// Each subject's label map and optional image.
    fn split(&self) -> Vec<Vec<PathBuf>> {
        self.subjects.iter().map(|s| s.splitn(2, ',').map(PathBuf::from).collect()).collect()
    }

    /// Every input path, so that no output overwrites one.
    fn paths(&self) -> Vec<PathBuf> {
        self.split().into_iter().flatten().collect()
    }
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  obelisk randomise --subject ct_a_labels.nii.gz,ct_a.nii.gz --out pairs/ --pairs 8 --seed 3
  obelisk randomise --subject aal.nii.gz --subject dk_1_labels.nii.gz --out pairs/ --pairs 4

Each pair shows one patch of a subject's anatomy twice: the moving image (patch A) and the fixed
image (patch B, whose voxel j shows A's point psi(j) for a random affine-plus-elastic psi), each
with its own random contrast (per-label Gaussian intensities, blur, bias field, noise, gamma),
as in SynthSeg. Writes pair_NNN_{fixed,moving}.nii.gz, their label maps, pair_NNN_truth.nii.gz
(the fixed -> moving displacement, ITK convention, for --truth) and a dataset.json that lists the
pairs under registration_val. Subjects are used in turn. Same --seed, same bytes.")]
pub struct RandomiseArgs {
    #[command(flatten)]
    pub subjects: SubjectArgs,
    /// Folder to write (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of pairs.
    #[arg(long, default_value_t = 4)]
    pub pairs: usize,
    /// Patch edge (voxels).
    #[arg(long, default_value_t = 64)]
    pub patch: usize,
    /// From the global --seed (default 0).
    #[arg(skip = 0u64)]
    pub seed: u64,
    /// Overwrite existing outputs.
    #[arg(long)]
    pub force: bool,
}

/// The fixed → moving displacement of a pair on the fixed grid (LPS mm): `(ψ(j) − j)·spacing`
/// in the RAS-aligned patch frame, x and y negated.
fn truth_field(pair: &RandomPair) -> Result<DisplacementField> {
    let grid = pair.grid()?;
    let n = pair.patch;
    let voxels = n * n * n;
    let mut data = vec![0f32; 3 * voxels];
    for v in 0..voxels {
        let j = [(v % n) as f64, ((v / n) % n) as f64, (v / (n * n)) as f64];
        let i = pair.map.apply(j);
        let ras = [0, 1, 2].map(|a| (i[a] - j[a]) * pair.spacing_mm);
        for (c, val) in [-ras[0], -ras[1], ras[2]].into_iter().enumerate() {
            data[c * voxels + v] = val as f32;
        }
    }
    Ok(DisplacementField::new(grid, data)?)
}

#[derive(Serialize)]
struct PairEntry {
    fixed: String,
    moving: String,
    fixed_label: String,
    moving_label: String,
    truth_field: String,
    name: String,
}

pub fn randomise(args: RandomiseArgs, out: Output) -> Result<()> {
    let subjects = args.subjects.load()?;
    at_least_one("--pairs", args.pairs)?;
    if !(8..=256).contains(&args.patch) {
        bail!("--patch must be between 8 and 256 voxels, got {}", args.patch);
    }
    prepare_out_dir(&args.out)?;
    let names: Vec<String> = (0..args.pairs).map(|p| format!("pair_{p:03}")).collect();
    let files = |name: &str| {
        ["fixed", "moving", "fixed_labels", "moving_labels", "truth"].map(|k| format!("{name}_{k}.nii.gz"))
    };
    let paths = args.subjects.paths();
    let inputs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    for name in &names {
        for f in files(name) {
            check_output(&args.out.join(f), &inputs, args.force)?;
        }
    }
    let dataset_path = args.out.join("dataset.json");
    check_output(&dataset_path, &inputs, args.force)?;

    let cfg = RandomiseConfig { patch: args.patch, ..Default::default() };
    let progress = Progress::new(out.silent());
    let bar = progress.bar(args.pairs as u64, "randomise", "pairs");
    let mut entries = Vec::new();
    for (p, name) in names.iter().enumerate() {
        let pair = random_pair(&subjects[p % subjects.len()], derive(args.seed, p as u64), &cfg);
        let grid = pair.grid()?;
        let [fixed, moving, fixed_labels, moving_labels, truth] = files(name);
        io::write_image(&args.out.join(&fixed), &Volume::new(grid.clone(), 1, pair.b.clone())?)?;
        io::write_image(&args.out.join(&moving), &Volume::new(grid.clone(), 1, pair.a.clone())?)?;
        io::write_label_map(&args.out.join(&fixed_labels), &Labels::new(grid.clone(), pair.labels_b.clone())?)?;
        io::write_label_map(&args.out.join(&moving_labels), &Labels::new(grid, pair.labels_a.clone())?)?;
        io::write_field(&args.out.join(&truth), &truth_field(&pair)?)?;
        let rel = |f: &str| format!("./{f}");
        entries.push(PairEntry {
            fixed: rel(&fixed),
            moving: rel(&moving),
            fixed_label: rel(&fixed_labels),
            moving_label: rel(&moving_labels),
            truth_field: rel(&truth),
            name: name.clone(),
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let dataset = serde_json::json!({
        "name": "obelisk randomise",
        "description": "domain-randomised pairs from label maps (obelisk randomise)",
        "seed": args.seed,
        "registration_val": entries,
    });
    write_atomic(&dataset_path, |f| Ok(serde_json::to_writer_pretty(f, &dataset)?))?;
    if out.json {
        println!("{}", serde_json::json!({ "out": args.out, "pairs": args.pairs, "seed": args.seed }));
    } else if !out.quiet {
        println!("wrote {} pairs and {}", args.pairs, dataset_path.display());
    }
    Ok(())
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  obelisk train-features --subject ct_b_labels.nii.gz,ct_b.nii.gz --subject dk_1_labels.nii.gz --out feat/
  obelisk register --fixed F --moving M --features obelisk --model feat/ --out reg/

Learns OBELISK features for registration from label maps alone: each iteration draws a
randomised pair (see obelisk randomise) and trains the features so that, at 512 points, the
true correspondence has a smaller L1 feature difference than points 1-4 voxels away (softmax
over the candidates). Offsets are physical (50 mm per normalised unit) and input intensities
are normalised per image, so the model applies to any spacing and contrast. Writes
model.safetensors and config.json for register --model. Same --seed, same bytes.")]
pub struct TrainFeaturesArgs {
    #[command(flatten)]
    pub subjects: SubjectArgs,
    /// Model folder to write (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 2000)]
    pub iterations: usize,
    /// Points per iteration.
    #[arg(long, default_value_t = 512)]
    pub points: usize,
    /// Iterations between progress lines.
    #[arg(long, default_value_t = 100)]
    pub log_every: usize,
    /// From the global --seed (default 0).
    #[arg(skip = 0u64)]
    pub seed: u64,
    /// Overwrite existing outputs.
    #[arg(long)]
    pub force: bool,
}

pub fn train(args: TrainFeaturesArgs, out: Output) -> Result<()> {
    let subjects = args.subjects.load()?;
    at_least_one("--iterations", args.iterations)?;
    if !(16..=65536).contains(&args.points) {
        bail!("--points must be between 16 and 65536, got {}", args.points);
    }
    prepare_out_dir(&args.out)?;
    let paths = args.subjects.paths();
    let inputs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    for f in [WEIGHTS_FILE, CONFIG_FILE] {
        check_output(&args.out.join(f), &inputs, args.force)?;
    }
    let cfg =
        FeatureTraining { iterations: args.iterations, points: args.points, seed: args.seed, ..Default::default() };
    let t0 = Instant::now();
    let progress = Progress::new(out.silent());
    let bar = progress.bar(args.iterations as u64, "train-features", "iterations");
    let (mut loss, mut acc, mut count) = (0.0, 0.0, 0usize);
    let every = args.log_every.max(1);
    let model = train_features(&subjects, &cfg, &mut |p| {
        (loss, acc, count) = (loss + p.loss, acc + p.accuracy, count + 1);
        if (p.iteration + 1) % every == 0 {
            progress.println(&format!(
                "iteration {:>6}  loss {:.4}  correspondence found {:.1}%",
                p.iteration + 1,
                loss / count as f64,
                100.0 * acc / count as f64
            ));
            (loss, acc, count) = (0.0, 0.0, 0);
        }
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    model.save(&args.out).with_context(|| format!("writing the model to {}", args.out.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    if out.json {
        println!(
            "{}",
            serde_json::json!({ "out": args.out, "iterations": args.iterations, "seconds": secs,
                "parameters": model.num_parameters() })
        );
    } else if !out.quiet {
        println!("trained {} parameters in {:.1} s; model in {}", model.num_parameters(), secs, args.out.display());
    }
    Ok(())
}
