//! `obelisk register`: deformable registration of an image pair.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use registration::features::ObeliskFeatures;
use registration::method::{MethodConfig, Parameterisation, Similarity, Start};

use crate::cli::validate::{
    check_input, load_model, non_negative, overlap_fraction, prepare_out_dir, read_mask, same_dimensionality,
};
use crate::cli::Output;
use crate::io::{self, atomic::check_output, IoError};
use crate::pictures::SliceSpec;
use crate::pipeline::{FeatureKind, RegisterJob, RegisterSummary};
use crate::progress::Progress;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  obelisk register --fixed f.nii.gz --moving m.nii.gz --out reg/
  obelisk register --fixed f.nii.gz --moving m.nii.gz --moving-labels m_seg.nii.gz \\
      --fixed-labels f_seg.nii.gz --features mind --out reg/ --json
  obelisk register --fixed a.png --moving b.png --out reg2d/
  obelisk register --fixed f.nii.gz --moving m.nii.gz --features obelisk --out reg/
  obelisk register --fixed f.nii.gz --moving m.nii.gz --features obelisk --model model/ --out reg/

Writes field.nii.gz (ITK convention: LPS mm on the fixed grid, usable by SimpleITK/ANTs; the
whole transform, affine included), affine.tfm and affine.mat (the affine stage's map as ITK and
ANTs read it), transform.h5 (ITK composite of the affine map and field_deformable.nii.gz,
the deformable remainder: `antsApplyTransforms -t field_deformable.nii.gz -t affine.mat`, as
for ANTs' own 1Warp/0GenericAffine pair, or `-t transform.h5`, is the whole transform), warped.nii.gz (or .png), warped_labels.*
with --moving-labels, inverse_field.nii.gz with --inverse, metrics.json, loss.csv and
summary.png.")]
pub struct RegisterArgs {
    /// Fixed (target) image (.nii, .nii.gz, .png, .nrrd, .nhdr, .mha, .mhd or a DICOM folder).
    #[arg(long)]
    pub fixed: PathBuf,
    /// Moving (source) image, resampled onto the fixed grid.
    #[arg(long)]
    pub moving: PathBuf,
    /// Label map of the fixed image, for Dice/HD95 in metrics.json.
    #[arg(long)]
    pub fixed_labels: Option<PathBuf>,
    /// Label map of the moving image, warped to warped_labels.*.
    #[arg(long)]
    pub moving_labels: Option<PathBuf>,
    /// Ground-truth field (ITK convention, on the fixed grid), for the endpoint error.
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// Metric mask of the fixed image (nonzero inside; any grid that overlaps it): only fixed
    /// voxels inside count in the similarity, as ANTs' and elastix's fixed masks.
    #[arg(long, value_name = "MASK")]
    pub fixed_mask: Option<PathBuf>,
    /// Metric mask of the moving image: fixed points that land outside it do not count.
    #[arg(long, value_name = "MASK")]
    pub moving_mask: Option<PathBuf>,
    /// Output folder (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub options: RegOptions,
    #[command(flatten)]
    pub outputs: OutputOptions,
    /// Overwrite existing outputs (never an input).
    #[arg(long)]
    pub force: bool,
}

/// What `register` (and `batch`, per pair) writes besides the transform, and its memory limit.
#[derive(Debug, Clone, Args)]
pub struct OutputOptions {
    /// Slice shown in summary.png: axial|coronal|sagittal[:INDEX].
    #[arg(long, default_value = "axial")]
    pub slice: SliceSpec,
    /// Do not draw summary.png.
    #[arg(long)]
    pub no_pictures: bool,
    /// Also write inverse_field.nii.gz: the inverse transform on the moving image's grid (moving
    /// → fixed points; warps the fixed image onto the moving grid), by fixed-point iteration;
    /// its residual goes into metrics.json.
    #[arg(long)]
    pub inverse: bool,
    /// Refuse to start when the estimated peak memory exceeds this (e.g. 8G, 512M); default:
    /// 75% of the machine's physical memory.
    #[arg(long, value_name = "SIZE", value_parser = crate::memory::parse_size)]
    pub max_memory: Option<u64>,
}

/// `--similarity`: what the deformable levels compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SimilarityKind {
    Auto,
    L1,
    Ncc,
    #[value(name = "l1+ncc")]
    L1Ncc,
}

/// Largest `--discrete-radius`: 13³ displacements per voxel of the first level.
const MAX_DISCRETE_RADIUS: usize = 6;

/// The registration options shared by `register` and `propagate`.
#[derive(Debug, Clone, Args)]
pub struct RegOptions {
    /// Features that drive the registration. `obelisk` without --model uses the embedded default
    /// model (trained on synthetic phantoms only; on real scans MIND-SSC registers better, see
    /// BENCHMARKS.md).
    #[arg(long, value_enum, default_value_t = FeatureKind::Mind)]
    pub features: FeatureKind,
    /// Trained model folder (from `obelisk train`) for --features obelisk, instead of the
    /// embedded default model.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// The method's parameters from a JSON file: the object that metrics.json records under
    /// `config`, any keys left out keeping their defaults (e.g. `{"smoothness": 2.0, "levels":
    /// [{"shrink": 4, "control_shrink": 2, "iterations": 80}]}`). --init, --iterations and
    /// --displacement still apply on top; the other tuning options conflict with it.
    #[arg(long, value_name = "FILE.json", conflicts_with_all = ["smoothness", "diffusion", "affine_iterations", "discrete_radius"])]
    pub method: Option<PathBuf>,
    /// Starting position of the moving image [default: search].
    #[arg(long, value_enum)]
    pub init: Option<Start>,
    /// What the deformable levels compare: `l1`, the L1 distance of the --features (MIND-SSC
    /// by default; contrast-robust); `ncc`, the local normalised cross-correlation of the
    /// intensities (ANTs' CC metric, with a last level at full resolution; one modality); `l1+ncc`,
    /// both (NCC at a tenth of the weight); `auto`, `ncc` where the intensities are linearly
    /// related after the affine stage, else `l1` (metrics.json records the measure and the
    /// choice). The start and affine stages always use the features. [default: auto with
    /// MIND-SSC features, l1 with learned ones]
    #[arg(long, value_enum)]
    pub similarity: Option<SimilarityKind>,
    /// Radius of the NCC window in voxels of each level (the window is 2N+1 wide).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub ncc_radius: usize,
    /// Weight of the B-spline smoothness penalty.
    #[arg(long, default_value_t = MethodConfig::default().smoothness)]
    pub smoothness: f64,
    /// Weight of the diffusion regulariser (squared field gradient) [default: 0.3 on 3D images,
    /// 0.1 on 2D ones].
    #[arg(long)]
    pub diffusion: Option<f64>,
    /// Iterations of the affine stage (0 skips it).
    #[arg(long, default_value_t = MethodConfig::default().affine_iterations)]
    pub affine_iterations: usize,
    /// Maximum iterations per deformable level.
    #[arg(long)]
    pub iterations: Option<usize>,
    /// Optimise the displacement itself instead of a stationary velocity field whose exponential
    /// (scaling and squaring) is the displacement (the default, which cannot fold): a little
    /// faster, but free to fold.
    #[arg(long)]
    pub displacement: bool,
    /// The default (kept for scripts written when it was an option).
    #[arg(long, hide = true, conflicts_with = "displacement")]
    pub diffeomorphic: bool,
    /// With --features obelisk: the OBELISK paper's exact form. The deformable levels pass the
    /// moving image through the feature layer at every displaced sampling point (full
    /// resolution, each iteration) instead of interpolating its precomputed coarse feature maps:
    /// slower, no interpolation of features.
    #[arg(long)]
    pub exact: bool,
    /// Discrete displacement search before the first deformable level: every displacement of
    /// up to N level voxels per axis (the first level's voxels are 4 image voxels) is scored per
    /// voxel, then made smooth by coupled convex optimisation, as deeds/convexAdam do; finds
    /// structures further off than a gradient step does. 0 skips it.
    #[arg(long, value_name = "N", default_value_t = MethodConfig::default().discrete.radius)]
    pub discrete_radius: usize,
}

impl Default for RegOptions {
    fn default() -> Self {
        let c = MethodConfig::default();
        Self {
            features: FeatureKind::Mind,
            model: None,
            method: None,
            init: None,
            smoothness: c.smoothness,
            diffusion: None,
            affine_iterations: c.affine_iterations,
            iterations: None,
            displacement: false,
            diffeomorphic: false,
            exact: false,
            discrete_radius: c.discrete.radius,
            similarity: None,
            ncc_radius: 2,
        }
    }
}

impl RegOptions {
    /// Checks the numbers, loads the model of `--features obelisk` and builds the engine's
    /// configuration.
    pub fn validate(&self) -> Result<(Option<ObeliskFeatures>, MethodConfig)> {
        let method = self.method.as_deref().map(read_method).transpose()?;
        self.validate_with(method)
    }

    /// [`RegOptions::validate`] with the method configuration already read (the `method` field
    /// is not read again): the Python package passes a dict's.
    pub fn validate_with(&self, method: Option<MethodConfig>) -> Result<(Option<ObeliskFeatures>, MethodConfig)> {
        non_negative("--smoothness", self.smoothness)?;
        if let Some(d) = self.diffusion {
            non_negative("--diffusion", d)?;
        }
        // (2N+1)³ cost maps of the first level are held at once
        if self.discrete_radius > MAX_DISCRETE_RADIUS {
            bail!("--discrete-radius must be at most {MAX_DISCRETE_RADIUS}, got {}", self.discrete_radius);
        }
        if self.ncc_radius == 0 {
            bail!("--ncc-radius must be at least 1");
        }
        if self.exact && self.similarity.is_some_and(|s| s != SimilarityKind::L1) {
            bail!("--exact evaluates learned features at the sampled points; it works with --similarity l1 only");
        }
        if self.exact && self.features != FeatureKind::Obelisk {
            bail!("--exact needs --features obelisk (it evaluates the learned feature layer at the sampled points)");
        }
        let model = load_model(self.features, self.model.as_deref())?;
        let from_method = method.is_some();
        let mut config = match method {
            Some(c) => c,
            None => {
                let mut c = MethodConfig {
                    smoothness: self.smoothness,
                    affine_iterations: self.affine_iterations,
                    ..Default::default()
                };
                c.discrete.radius = self.discrete_radius;
                if let Some(d) = self.diffusion {
                    (c.diffusion, c.diffusion_2d) = (d, d);
                }
                c
            }
        };
        if let Some(start) = self.init {
            config.start = start;
        }
        if self.displacement {
            config.parameterisation = Parameterisation::Displacement;
        }
        match self.similarity {
            // the method file's own choice stands unless the option asks for another
            None if from_method => {}
            // learned features are what the user asked the deformable levels to compare
            None if self.features != FeatureKind::Mind || self.exact => config.similarity = Similarity::L1,
            None | Some(SimilarityKind::Auto) => config.similarity = Similarity::auto(self.ncc_radius),
            Some(SimilarityKind::L1) => config.similarity = Similarity::L1,
            Some(SimilarityKind::Ncc) => config.similarity = Similarity::ncc(self.ncc_radius),
            Some(SimilarityKind::L1Ncc) => config.similarity = Similarity::l1_ncc(self.ncc_radius),
        }
        if let Some(n) = self.iterations {
            config.levels.iter_mut().for_each(|l| l.iterations = n);
        }
        Ok((model, config))
    }
}

/// A method configuration file (`--method`): JSON, unknown keys and out-of-range values refused
/// with the file's name.
fn read_method(path: &Path) -> Result<MethodConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| IoError::new(path, format!("cannot be read: {e}")))?;
    parse_method(&text, path)
}

/// A method configuration from JSON text (a `--method` file's, or the Python package's dict),
/// its errors naming `path`.
pub fn parse_method(text: &str, path: &Path) -> Result<MethodConfig> {
    let c: MethodConfig =
        serde_json::from_str(text).map_err(|e| IoError::new(path, format!("is not a method configuration: {e}")))?;
    let bad = |what: &str| -> anyhow::Error { IoError::new(path, what.to_string()).into() };
    if c.levels.iter().any(|l| l.shrink == 0 || l.control_shrink == 0) {
        return Err(bad("a level's shrink and control_shrink must be at least 1"));
    }
    if c.affine_shrink == 0 {
        return Err(bad("affine_shrink must be at least 1"));
    }
    if !c.affine_max_spacing_mm.is_finite() || c.affine_max_spacing_mm <= 0.0 {
        return Err(bad("affine_max_spacing_mm must be a positive number of millimetres"));
    }
    if let Similarity::Auto { radius, min_linearity } = c.similarity {
        if radius == 0 || !(0.0..=1.0).contains(&min_linearity) {
            return Err(bad("similarity auto needs radius >= 1 and min_linearity in [0, 1]"));
        }
    }
    if c.discrete.radius > MAX_DISCRETE_RADIUS {
        return Err(bad(&format!("discrete.radius must be at most {MAX_DISCRETE_RADIUS}")));
    }
    let mut finite =
        vec![c.smoothness, c.diffusion, c.diffusion_2d, c.bspline_width, c.learning_rate, c.adam_epsilon, c.tolerance];
    finite.extend(c.levels.iter().filter_map(|l| l.diffusion));
    if finite.iter().any(|v| !v.is_finite() || *v < 0.0) {
        return Err(bad(
            "smoothness, diffusion, bspline_width, learning_rate, adam_epsilon and tolerance must be finite and >= 0",
        ));
    }
    Ok(c)
}

/// The checks of a pair of images (read, or handed over in memory under the names `fixed_name`
/// and `moving_name`) against each other: the same dimensionality, and with `--init none`
/// fields of view that overlap as their headers place them.
pub fn check_pair(
    fixed_name: &Path,
    fixed: &registration::Grid,
    moving_name: &Path,
    moving: &registration::Grid,
    config: &MethodConfig,
) -> Result<()> {
    same_dimensionality(fixed_name, fixed, moving_name, moving)?;
    if config.start == Start::None && overlap_fraction(fixed, moving) == 0.0 {
        bail!(
            "{} does not overlap {} in world coordinates ({} vs {}); with --init none the headers must \
             place them together (--init search finds the offset)",
            moving_name.display(),
            fixed_name.display(),
            io::describe_grid(moving),
            io::describe_grid(fixed)
        );
    }
    Ok(())
}

/// Refuses a registration whose estimated peak memory exceeds `max_memory` (default: 75% of
/// the machine's memory), from the grids alone.
pub fn check_memory(
    options: &RegOptions,
    config: &MethodConfig,
    model: Option<&ObeliskFeatures>,
    (fixed_name, fg): (&Path, &registration::Grid),
    (moving_name, mg): (&Path, &registration::Grid),
    max_memory: Option<u64>,
) -> Result<()> {
    let extractor = options.features.extractor(fg, model)?;
    let (stride, extra) = match model {
        // the weights, plus the activations of one inference chunk of points
        Some(m) => (m.stride(), 4 * m.num_parameters() as u64 + (256 << 20)),
        None => (1, 0),
    };
    // the finest level that compares intensities by local NCC
    let ncc_shrink = match config.similarity {
        // the automatic choice may pick NCC
        Similarity::Ncc { .. } | Similarity::Auto { .. } => config.levels.iter().map(|l| l.shrink).min(),
        Similarity::L1 => None,
    };
    let need = crate::memory::register_estimate(
        fg,
        mg,
        extractor.channels(),
        stride,
        extra,
        options.discrete_radius,
        ncc_shrink,
    );
    crate::memory::Limit::new(max_memory).check(
        need,
        &format!(
            "registering {} ({:?} voxels) to {} ({:?} voxels) with {} features",
            moving_name.display(),
            mg.shape(),
            fixed_name.display(),
            fg.shape(),
            extractor.name()
        ),
        "downsample the images (half the resolution needs about 1/8 of the memory)",
    )
}

impl RegisterArgs {
    /// Estimates the job's peak memory from the headers alone and refuses it when over the limit.
    fn check_memory(&self, model: Option<&ObeliskFeatures>, config: &MethodConfig) -> Result<()> {
        let (fg, mg) = (io::read_grid(&self.fixed)?, io::read_grid(&self.moving)?);
        check_memory(&self.options, config, model, (&self.fixed, &fg), (&self.moving, &mg), self.outputs.max_memory)
    }

    /// Validates everything and reads the inputs; no output is written.
    pub fn into_job(self, quiet: bool) -> Result<RegisterJob> {
        let (model, config) = self.options.validate()?;
        self.into_job_with(model, config, quiet)
    }

    /// [`RegisterArgs::into_job`] with the options already validated into `model` and `config`
    /// (a batch validates them once for all its pairs).
    pub fn into_job_with(
        self,
        model: Option<ObeliskFeatures>,
        config: MethodConfig,
        quiet: bool,
    ) -> Result<RegisterJob> {
        let mut inputs: Vec<&Path> = vec![&self.fixed, &self.moving];
        inputs.extend(self.fixed_labels.as_deref());
        inputs.extend(self.moving_labels.as_deref());
        inputs.extend(self.truth.as_deref());
        inputs.extend(self.fixed_mask.as_deref());
        inputs.extend(self.moving_mask.as_deref());
        for p in &inputs {
            check_input(p)?;
        }
        if config.start == Start::Labels && (self.fixed_labels.is_none() || self.moving_labels.is_none()) {
            bail!("--init labels needs --fixed-labels and --moving-labels");
        }
        self.check_memory(model.as_ref(), &config)?;
        prepare_out_dir(&self.out)?;
        let fixed = io::read_image(&self.fixed)?;
        let moving = io::read_image(&self.moving)?;
        check_pair(&self.fixed, &fixed.grid, &self.moving, &moving.grid, &config)?;
        let fixed_labels =
            self.fixed_labels.as_ref().map(|p| io::read_labels_for(p, &fixed.grid, &self.fixed)).transpose()?;
        let moving_labels =
            self.moving_labels.as_ref().map(|p| io::read_labels_for(p, &moving.grid, &self.moving)).transpose()?;
        let fixed_mask = self.fixed_mask.as_ref().map(|p| read_mask(p, &fixed.grid, &self.fixed, quiet)).transpose()?;
        let moving_mask =
            self.moving_mask.as_ref().map(|p| read_mask(p, &moving.grid, &self.moving, quiet)).transpose()?;
        let truth = match &self.truth {
            Some(p) => {
                let t = io::read_field(p)?;
                if !t.grid.same_as(&fixed.grid, io::GRID_TOL) {
                    return Err(IoError::new(
                        p,
                        format!("the truth field does not lie on the grid of {}", self.fixed.display()),
                    )
                    .into());
                }
                Some(t)
            }
            None => None,
        };
        let job = RegisterJob {
            fixed_path: self.fixed.clone(),
            moving_path: self.moving.clone(),
            fixed,
            moving,
            fixed_labels,
            moving_labels,
            truth,
            fixed_mask,
            moving_mask,
            label_names: BTreeMap::new(),
            out: self.out.clone(),
            features: self.options.features,
            model,
            exact: self.options.exact,
            config,
            pictures: !self.outputs.no_pictures,
            slice: self.outputs.slice,
            force: self.force,
            quiet,
            inverse: self.outputs.inverse,
        };
        for out in job.planned_outputs() {
            check_output(&out, &inputs, self.force)?;
        }
        Ok(job)
    }
}

/// Prints the summary of a registration: JSON, or one screen of text.
pub fn report(s: &RegisterSummary, out: Output) -> Result<()> {
    out.finish(s, || print_summary(s))
}

fn print_summary(s: &RegisterSummary) {
    if let Some(r) = &s.init_search {
        let t = r.translation_mm;
        println!(
            "  {:<14} offset ({:.1}, {:.1}, {:.1}) mm  score {:.4}  overlap {:>5.1}%  {} translations",
            "init search",
            t[0],
            t[1],
            t[2],
            r.score,
            100.0 * r.overlap_fraction,
            r.evaluations
        );
    }
    for (i, a) in s.affine_starts.iter().enumerate() {
        let t = a.translation_mm;
        let kept = if t == s.init_translation_mm { "  (kept)" } else { "" };
        println!(
            "  {:<14} offset ({:.1}, {:.1}, {:.1}) mm  affine loss {:.4}{kept}",
            format!("start {}", i + 1),
            t[0],
            t[1],
            t[2],
            a.affine_loss
        );
    }
    if let Some(c) = &s.similarity {
        let chosen = match c.chosen {
            Similarity::Ncc { .. } => "local NCC of the intensities",
            _ => "L1 of the features",
        };
        let rel = if c.linearity >= c.min_linearity { ">=" } else { "<" };
        println!(
            "  similarity     {chosen}: intensity linearity {:.3} {rel} {:.2} after the affine stage",
            c.linearity, c.min_linearity
        );
    }
    for st in &s.stages {
        println!(
            "  {:<14} {:>4} it  loss {:.4} -> {:.4}  overlap {:>5.1}%  {:.2} s",
            st.name,
            st.iterations,
            st.initial_loss,
            st.final_loss,
            100.0 * st.overlap,
            st.seconds
        );
    }
    if let Some(a) = s.metrics.mean_dice {
        let f = |d: Option<f64>| d.map_or("-".to_string(), |v| format!("{v:.3}"));
        let affine = s.dice_after_affine.map_or(String::new(), |d| format!(" -> {d:.3} after affine"));
        let discrete = s.dice_after_discrete.map_or(String::new(), |d| format!(" -> {d:.3} after discrete search"));
        println!(
            "mean Dice of {} shared structures inside the overlap: {} before -> {} after init{affine}{discrete} -> {a:.3}",
            s.shared_labels.len(),
            f(s.dice_before),
            f(s.dice_after_init),
        );
    }
    if let Some(r) = &s.inverse {
        println!("{}", crate::cli::transforms::describe_residual(r));
    }
    if let Some(e) = &s.metrics.endpoint_error {
        println!("endpoint error vs truth: mean {:.2} mm, p95 {:.2} mm", e.mean_mm, e.p95_mm);
    }
    println!(
        "folding {:.4}%  SDlogJ {:.3}  total {:.1} s",
        100.0 * s.metrics.folding_fraction,
        s.metrics.sd_log_j.unwrap_or(f64::NAN),
        s.runtime_s.get("total").copied().unwrap_or(f64::NAN)
    );
    println!("outputs in {}:", s.out_dir.display());
    for f in &s.files {
        println!("  {}", f.display());
    }
}

pub fn run(args: RegisterArgs, out: Output) -> Result<()> {
    let job = args.into_job(out.silent())?;
    let mut bars = Progress::new(out.silent()).registration(&job.config);
    if !out.silent() {
        bars = bars.log_every(20);
    }
    let summary = job.run(&mut bars)?;
    bars.finish();
    report(&summary, out)
}
