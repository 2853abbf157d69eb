//! Command-line front end: arguments are parsed raw by clap, then validated into a job before
//! any work starts.

pub mod features;
pub mod propagate;
pub mod register;
pub mod synth;
pub mod tools;
pub mod train;
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
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register a moving image to a fixed image (3D NIfTI or 2D PNG).
    Register(register::RegisterArgs),
    /// Label an image by registering atlases to it and fusing their warped label maps.
    Propagate(propagate::PropagateArgs),
    /// Write the feature maps that drive registration (MIND-SSC, intensity, OBELISK) as NIfTI.
    Features(features::FeaturesArgs),
    /// Apply a displacement field (ITK convention) to an image or label map.
    Warp(warp::WarpArgs),
    /// Generate synthetic abdominal phantoms and pairs with ground-truth fields.
    Synth(synth::SynthArgs),
    /// Dice, HD95, Jacobian statistics and endpoint error of a registration.
    Eval(tools::EvalArgs),
    /// Draw a deformed grid (and Jacobian map) of a displacement field.
    Grid(tools::GridArgs),
    /// Draw axial, coronal and sagittal slices of an image with label contours.
    View(tools::ViewArgs),
    /// Train a segmentation model (OBELISK-Net or U-Net) on a dataset.json, optionally with k-fold CV.
    Train(train::TrainArgs),
    /// Segment an image with a trained model; the label map lies on the image's grid.
    Segment(train::SegmentArgs),
    /// Generate a synthetic pair, register it and write every output and picture.
    Demo(tools::DemoArgs),
}

/// Sets up the global thread pool and runs the chosen command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow::anyhow!("cannot set up {n} threads: {e}"))?;
    }
    match cli.command {
        Command::Warp(args) => {
            let job = warp::WarpJob::from_args(args)?;
            job.run(cli.quiet)
        }
        Command::Register(args) => register::run(args, cli.quiet),
        Command::Propagate(args) => propagate::run(args, cli.quiet),
        Command::Features(args) => features::run(args, cli.quiet),
        Command::Synth(args) => synth::run(args, cli.quiet),
        Command::Eval(args) => tools::eval(args, cli.quiet),
        Command::Grid(args) => tools::grid(args, cli.quiet),
        Command::Demo(args) => tools::demo(args, cli.quiet),
        Command::View(args) => tools::view(args, cli.quiet),
        Command::Train(args) => train::train(args, cli.quiet),
        Command::Segment(args) => train::segment(args, cli.quiet),
    }
}
