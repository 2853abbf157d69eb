//! Command-line front end: arguments are parsed raw by clap, then validated into a job before
//! any work starts.

pub mod batch;
pub mod features;
pub mod learn;
pub mod points;
pub mod propagate;
pub mod register;
pub mod synth;
pub mod tools;
pub mod train;
pub mod transforms;
pub mod validate;
pub mod warp;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "obelisk", version, about = "Deformable medical image registration")]
pub struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Print nothing but errors.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Print a machine-readable summary of the command as JSON on stdout (and nothing else
    /// there); progress and messages are hidden as with --quiet.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seed of the random number generators: the synthetic data of `synth` (default 0) and
    /// `demo` (default 7), weight initialisation and sampling of `train` (default 0). The other
    /// commands draw no random numbers and give byte-identical outputs without it.
    #[arg(long, global = true)]
    pub seed: Option<u64>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register a moving image to a fixed image (3D NIfTI or 2D PNG).
    Register(register::RegisterArgs),
    /// Register every pair of a CSV or dataset.json, resumably, one folder per pair (shardable
    /// over a Slurm job array).
    Batch(batch::BatchArgs),
    /// Label an image by registering atlases to it and fusing their warped label maps.
    Propagate(propagate::PropagateArgs),
    /// Write the feature maps that drive registration (MIND-SSC, intensity, OBELISK) as NIfTI.
    Features(features::FeaturesArgs),
    /// Apply a displacement field (ITK convention) or ITK/ANTs transforms to an image or label map.
    Warp(warp::WarpArgs),
    /// Invert a displacement field (fixed-point iteration; the residual is printed).
    Invert(transforms::InvertArgs),
    /// Compose displacement fields and affine transforms (antsApplyTransforms order) into one field.
    Compose(transforms::ComposeArgs),
    /// Map landmarks (ANTs .csv, Slicer .fcsv) through a transform, fixed -> moving.
    Points(points::PointsArgs),
    /// Generate synthetic abdominal phantoms and pairs with ground-truth fields.
    Synth(synth::SynthArgs),
    /// Dice, HD95, Jacobian statistics, endpoint error and landmark error (TRE) of a registration.
    Eval(tools::EvalArgs),
    /// Draw a deformed grid (and Jacobian map) of a displacement field.
    Grid(tools::GridArgs),
    /// Draw axial, coronal and sagittal slices of an image with label contours.
    View(tools::ViewArgs),
    /// Domain-randomised image pairs with known correspondence from real label maps.
    Randomise(learn::RandomiseArgs),
    /// Learn OBELISK registration features from randomised pairs of real label maps.
    TrainFeatures(learn::TrainFeaturesArgs),
    /// Train a segmentation model (OBELISK-Net or U-Net) on a dataset.json, optionally with k-fold CV.
    Train(train::TrainArgs),
    /// Segment an image with a trained model; the label map lies on the image's grid.
    Segment(train::SegmentArgs),
    /// Generate a synthetic pair, register it and write every output and picture.
    Demo(tools::DemoArgs),
}

/// Where a command's summary goes: human text, JSON on stdout, or nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct Output {
    pub quiet: bool,
    pub json: bool,
}

impl Output {
    /// True when human-readable text and progress must stay hidden.
    pub fn silent(&self) -> bool {
        self.quiet || self.json
    }

    /// Prints `summary` as JSON with --json; otherwise prints the human text of `human` unless
    /// --quiet.
    pub fn finish<T: serde::Serialize>(&self, summary: &T, human: impl FnOnce()) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(summary)?);
        } else if !self.quiet {
            human();
        }
        Ok(())
    }
}

/// Sets up the global thread pool and runs the chosen command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        validate::at_least_one("--threads", n)?;
    }
    let n = cli.threads.unwrap_or(0);
    // (the main thread's 8 MiB, not a spawned thread's 2 MiB: the command runs on a worker)
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .stack_size(8 << 20)
        .build_global()
        .map_err(|e| anyhow::anyhow!("cannot set up {n} threads: {e}"))?;
    // The command runs on one of the pool's threads: every parallel loop it starts (thousands
    // per registration) is then shared with the other workers in place, where from outside
    // the pool each one was handed over and waited for across threads.
    rayon::scope(|_| dispatch(cli))
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let out = Output { quiet: cli.quiet, json: cli.json };
    match cli.command {
        Command::Warp(args) => {
            let job = warp::WarpJob::from_args(args)?;
            job.run(out)
        }
        Command::Invert(args) => transforms::invert(args, out),
        Command::Compose(args) => transforms::compose(args, out),
        Command::Points(args) => points::points(args, out),
        Command::Register(args) => register::run(args, out),
        Command::Batch(args) => batch::run(args, out),
        Command::Propagate(args) => propagate::run(args, out),
        Command::Features(args) => features::run(args, out),
        Command::Synth(mut args) => {
            args.seed = cli.seed.unwrap_or(args.seed);
            synth::run(args, out)
        }
        Command::Eval(args) => tools::eval(args, out),
        Command::Grid(args) => tools::grid(args, out),
        Command::Demo(mut args) => {
            args.seed = cli.seed.unwrap_or(args.seed);
            tools::demo(args, out)
        }
        Command::View(args) => tools::view(args, out),
        Command::Train(mut args) => {
            args.seed = cli.seed.unwrap_or(args.seed);
            train::train(args, out)
        }
        Command::Segment(args) => train::segment(args, out),
        Command::Randomise(mut args) => {
            args.seed = cli.seed.unwrap_or(args.seed);
            learn::randomise(args, out)
        }
        Command::TrainFeatures(mut args) => {
            args.seed = cli.seed.unwrap_or(args.seed);
            learn::train(args, out)
        }
    }
}
