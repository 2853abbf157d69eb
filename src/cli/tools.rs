//! `obelisk demo`, `obelisk eval` and `obelisk grid`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use registration::metrics::{endpoint_error, jacobian, RegistrationMetrics};
use registration::synth::SynthConfig;
use registration::warp::coverage;
use serde_json::json;

use crate::cli::points::tre;
use crate::cli::register::{report, OutputOptions, RegOptions, RegisterArgs};
use crate::cli::synth::write_dataset;
use crate::cli::validate::{check_input, prepare_out_dir};
use crate::cli::Output;
use crate::io::{self, atomic::check_output, IoError};
use crate::pictures::{self, SliceSpec};
use crate::pipeline::save_png;
use crate::progress::Progress;
use registration::method::Start;

#[derive(Debug, Args)]
#[command(after_help = "Example:
  obelisk demo --out obelisk-demo

Generates a synthetic abdominal CT pair with a known deformation (seeded, so every run gives
the same files), registers it, and writes the field, warped image, propagated labels,
metrics.json and summary.png under OUT/registration.")]
pub struct DemoArgs {
    /// Output folder.
    #[arg(long, default_value = "obelisk-demo")]
    pub out: PathBuf,
    /// Seed of the generated pair, from the global `--seed` (default 7).
    #[arg(skip = 7u64)]
    pub seed: u64,
    /// Overwrite the outputs of an earlier demo.
    #[arg(long)]
    pub force: bool,
}

pub fn demo(args: DemoArgs, out: Output) -> Result<()> {
    let quiet = out.silent();
    let data = args.out.join("data");
    let cfg = SynthConfig { size: [80, 80, 80], spacing: [4.2, 4.2, 4.2], seed: args.seed, ..Default::default() };
    if !quiet {
        println!(
            "generating a synthetic CT pair ({}^3 voxels, {} mm) in {}",
            cfg.size[0],
            cfg.spacing[0],
            data.display()
        );
    }
    write_dataset(&cfg, &data, 0, 1, args.force, &Progress::new(quiet))?;
    let reg = RegisterArgs {
        fixed: data.join("pair_000_fixed.nii.gz"),
        moving: data.join("pair_000_moving.nii.gz"),
        fixed_labels: Some(data.join("pair_000_fixed_labels.nii.gz")),
        moving_labels: Some(data.join("pair_000_moving_labels.nii.gz")),
        truth: Some(data.join("pair_000_truth.nii.gz")),
        fixed_mask: None,
        moving_mask: None,
        out: args.out.join("registration"),
        options: RegOptions { init: Some(Start::None), affine_iterations: 0, ..Default::default() },
        outputs: OutputOptions {
            slice: SliceSpec { axis: pictures::Axis::Coronal, index: None },
            no_pictures: false,
            inverse: false,
            max_memory: None,
        },
        force: args.force,
    };
    if !quiet {
        println!("registering moving -> fixed with MIND-SSC features");
    }
    let job = reg.into_job(quiet)?;
    let mut bars = Progress::new(quiet).registration(&job.config);
    let summary = job.run(&mut bars)?;
    bars.finish();
    report(&summary, out)
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  obelisk eval --fixed-labels fixed_seg.nii.gz --warped-labels reg/warped_labels.nii.gz \\
      --field reg/field.nii.gz --json
  obelisk eval --fixed-points fixed.csv --moving-points moving.csv --field reg/field.nii.gz

With --fixed-points and --moving-points (corresponding landmarks, row by row; .csv LPS or
.fcsv), the fixed points go through the field (fixed -> moving) and the target registration
error is their distance to the moving points.")]
pub struct EvalArgs {
    /// Reference label map (on the fixed grid).
    #[arg(long, required_unless_present = "fixed_points")]
    pub fixed_labels: Option<PathBuf>,
    /// Warped moving label map (on the fixed grid).
    #[arg(long, required_unless_present = "fixed_points")]
    pub warped_labels: Option<PathBuf>,
    /// Landmarks of the fixed image (.csv, .fcsv), for the target registration error.
    #[arg(long, requires = "moving_points", conflicts_with_all = ["fixed_labels", "warped_labels", "truth", "moving_labels"])]
    pub fixed_points: Option<PathBuf>,
    /// The corresponding landmarks of the moving image, in the same order.
    #[arg(long, requires = "fixed_points")]
    pub moving_points: Option<PathBuf>,
    /// With the landmarks: a transform instead of --field (.tfm, .txt, .mat, field); repeat for
    /// a chain, in antsApplyTransforms' -t order.
    #[arg(long = "transform", value_name = "FILE", requires = "fixed_points", conflicts_with = "field")]
    pub transforms: Vec<PathBuf>,
    /// Displacement field, for Jacobian statistics.
    #[arg(long)]
    pub field: Option<PathBuf>,
    /// Ground-truth field, for the endpoint error (needs --field).
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// The moving label map before warping (needs --field): Dice and HD95 are then counted over
    /// the structures present in both label maps, inside the part of the fixed image that the
    /// moving image covers through the field (as `obelisk register` reports them).
    #[arg(long)]
    pub moving_labels: Option<PathBuf>,
}

fn eval_points(args: &EvalArgs, fixed: &Path, moving: &Path, out: Output) -> Result<()> {
    let r = tre(fixed, moving, &args.field, &args.transforms)?;
    out.finish(&r, || {
        println!("{} landmark pairs      mean    median     max (mm)", r.after.points);
        for (name, t) in [("before", &r.before), ("after", &r.after)] {
            println!("  {name:<18} {:>8.3}  {:>8.3}  {:>8.3}", t.mean_mm, t.median_mm, t.max_mm);
        }
    })
}

pub fn eval(args: EvalArgs, out: Output) -> Result<()> {
    if let (Some(f), Some(m)) = (&args.fixed_points, &args.moving_points) {
        return eval_points(&args, f, m, out);
    }
    let (Some(fixed_labels), Some(warped_labels)) = (&args.fixed_labels, &args.warped_labels) else {
        bail!("eval needs --fixed-labels and --warped-labels, or --fixed-points and --moving-points");
    };
    for p in
        [Some(fixed_labels), Some(warped_labels), args.field.as_ref(), args.truth.as_ref(), args.moving_labels.as_ref()]
            .into_iter()
            .flatten()
    {
        check_input(p)?;
    }
    if args.truth.is_some() && args.field.is_none() {
        bail!("--truth needs --field");
    }
    if args.moving_labels.is_some() && args.field.is_none() {
        bail!("--moving-labels needs --field (the overlap is where the field maps into the moving image)");
    }
    let fixed = io::read_label_map(fixed_labels)?;
    let warped = io::read_labels_for(warped_labels, &fixed.grid, fixed_labels)?;
    let field = match &args.field {
        Some(p) => {
            let f = io::read_field(p)?;
            if !f.grid.same_as(&fixed.grid, io::GRID_TOL) {
                return Err(IoError::new(
                    p,
                    format!(
                        "field grid ({}) differs from the grid of {} ({})",
                        io::describe_grid(&f.grid),
                        fixed_labels.display(),
                        io::describe_grid(&fixed.grid)
                    ),
                )
                .into());
            }
            f
        }
        None => registration::DisplacementField::zeros(fixed.grid.clone()),
    };
    let (fixed, warped, mask) = match &args.moving_labels {
        Some(p) => {
            if !field.grid.same_as(&fixed.grid, io::GRID_TOL) {
                let fp = args.field.as_deref().unwrap_or(p);
                let msg = format!("does not lie on the grid of {}", fixed_labels.display());
                return Err(IoError::new(fp, msg).into());
            }
            let moving = io::read_label_map(p)?;
            let shared = fixed.shared_ids(&moving);
            (fixed.keep_only(&shared), warped.keep_only(&shared), Some(coverage(&field, &moving.grid)))
        }
        None => (fixed, warped, None),
    };
    let mut m = RegistrationMetrics::evaluate(&fixed, &warped, &field, &BTreeMap::new(), mask.as_deref())?;
    if let (Some(t), Some(fp)) = (&args.truth, &args.field) {
        let truth = io::read_field(t)?;
        if !truth.grid.same_as(&field.grid, io::GRID_TOL) {
            return Err(IoError::new(t, format!("does not lie on the grid of {}", fp.display())).into());
        }
        m = m.with_endpoint_error(endpoint_error(&field, &truth, None)?);
    }
    out.finish(&m, || {
        println!("label      Dice   HD95 mm");
        for l in &m.labels {
            println!("{:>5}  {:>8.4}  {:>8}", l.label, l.dice, l.hd95_mm.map_or("-".into(), |h| format!("{h:.2}")));
        }
        if let Some(d) = m.mean_dice {
            println!(" mean  {d:>8.4}");
        }
        if args.field.is_some() {
            println!(
                "folding {:.4}%  SDlogJ {:.4}  det J in [{:.3}, {:.3}]",
                100.0 * m.folding_fraction,
                m.sd_log_j.unwrap_or(f64::NAN),
                m.jacobian_min,
                m.jacobian_max
            );
        }
        if let Some(e) = &m.endpoint_error {
            println!("endpoint error: mean {:.3} mm, p95 {:.3} mm, max {:.3} mm", e.mean_mm, e.p95_mm, e.max_mm);
        }
    })
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  obelisk grid --field reg/field.nii.gz --image fixed.nii.gz --slice coronal --out grid.png
  obelisk grid --field reg/field.nii.gz --slice axial:40 --out grid.png --jacobian jac.png")]
pub struct GridArgs {
    /// Displacement field (ITK convention).
    #[arg(long)]
    pub field: PathBuf,
    /// Image on the field's grid to draw under the grid (usually the fixed image).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Slice: axial|coronal|sagittal[:INDEX].
    #[arg(long, default_value = "axial")]
    pub slice: SliceSpec,
    /// Voxels between grid lines.
    #[arg(long, default_value_t = 4)]
    pub step: usize,
    /// Output PNG of the deformed grid.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the Jacobian determinant map (with colour bar) to this PNG.
    #[arg(long)]
    pub jacobian: Option<PathBuf>,
    #[arg(long)]
    pub force: bool,
}

pub fn grid(args: GridArgs, out: Output) -> Result<()> {
    let mut inputs = vec![args.field.as_path()];
    inputs.extend(args.image.as_deref());
    for p in &inputs {
        check_input(p)?;
    }
    for o in [Some(&args.out), args.jacobian.as_ref()].into_iter().flatten() {
        if io::Format::of(o)? != io::Format::Png {
            return Err(IoError::new(o, "pictures are written as .png").into());
        }
        if let Some(parent) = o.parent().filter(|p| !p.as_os_str().is_empty()) {
            prepare_out_dir(parent)?;
        }
        check_output(o, &inputs, args.force)?;
    }
    let field = io::read_field(&args.field)?;
    let image = args.image.as_ref().map(|p| io::read_image(p)).transpose()?;
    if let (Some(img), Some(p)) = (&image, &args.image) {
        if !img.grid.same_as(&field.grid, io::GRID_TOL) {
            return Err(
                IoError::new(p, format!("does not lie on the grid of the field {}", args.field.display())).into()
            );
        }
    }
    let pic = pictures::grid_picture(image.as_ref(), &field, args.slice, args.step)?;
    save_png(&args.out, &pic)?;
    if let Some(j) = &args.jacobian {
        let (det, _) = jacobian(&field, None)?;
        save_png(j, &pictures::jacobian_picture(&det, args.slice)?)?;
    }
    let summary = json!({"out": args.out, "jacobian": args.jacobian, "field": args.field, "image": args.image});
    out.finish(&summary, || {
        println!("wrote {}", args.out.display());
        if let Some(j) = &args.jacobian {
            println!("wrote {}", j.display());
        }
    })
}

#[derive(Debug, Args)]
#[command(after_help = "Example:
  obelisk view --image ct.nii.gz --labels ct_seg.nii.gz --out ct.png

Draws axial, coronal and sagittal slices through the middle of the image, with label contours.")]
pub struct ViewArgs {
    /// Image to show (.nii, .nii.gz, .png, .nrrd, .nhdr, .mha, .mhd or a DICOM folder).
    #[arg(long)]
    pub image: PathBuf,
    /// Label map on the image's grid, drawn as contours.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub force: bool,
}

pub fn view(args: ViewArgs, out: Output) -> Result<()> {
    let mut inputs = vec![args.image.as_path()];
    inputs.extend(args.labels.as_deref());
    for p in &inputs {
        check_input(p)?;
    }
    if io::Format::of(&args.out)? != io::Format::Png {
        return Err(IoError::new(&args.out, "pictures are written as .png").into());
    }
    check_output(&args.out, &inputs, args.force)?;
    let image = io::read_image(&args.image)?;
    let labels = args.labels.as_ref().map(|p| io::read_labels_for(p, &image.grid, &args.image)).transpose()?;
    let name = args.image.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let sp = image.grid.spacing();
    let heading = format!("{name} · {:?} voxels · {:.2}×{:.2}×{:.2} mm", image.grid.shape(), sp[0], sp[1], sp[2]);
    save_png(&args.out, &pictures::overview_picture(&image, labels.as_ref(), &heading)?)?;
    let summary = json!({"out": args.out, "image": args.image, "labels": args.labels, "shape": image.grid.shape()});
    out.finish(&summary, || println!("wrote {}", args.out.display()))
}
