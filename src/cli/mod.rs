//! Command-line front end: arguments are parsed raw by clap, then validated into a job before
//! any work starts.

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
    /// Apply a displacement field (ITK convention) to an image or label map.
    Warp(warp::WarpArgs),
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
    }
}
