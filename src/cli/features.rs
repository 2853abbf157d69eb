//! `obelisk features`: the feature maps that drive registration, written as a multi-channel NIfTI.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use crate::cli::validate::{check_input, load_model};
use crate::cli::Output;
use crate::io::{self, atomic::check_output};
use crate::pipeline::FeatureKind;
use crate::progress::Progress;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  obelisk features --image ct.nii.gz --out ct_mind.nii.gz
  obelisk features --image ct.nii.gz --features intensity --out ct_norm.nii.gz
  obelisk features --image ct.nii.gz --features obelisk --out ct_obelisk.nii.gz
  obelisk features --image ct.nii.gz --features obelisk --model model/ --out ct_obelisk.nii.gz

Writes float32 NIfTI with dimensions X,Y,Z,1,C (one channel per feature) and the affine of the
grid the features lie on: the image's grid for mind (12 channels, 4 for a 2D image) and
intensity (1 channel, robustly normalised to [0, 1]); the network's coarse grid for obelisk
(stride 4; voxel centres at the align-corners positions of the image's extent), so the maps
overlay the image in any viewer.")]
pub struct FeaturesArgs {
    /// Image to describe (.nii, .nii.gz, .png, .nrrd, .nhdr, .mha, .mhd or a DICOM folder).
    #[arg(long)]
    pub image: PathBuf,
    /// Which features.
    #[arg(long, value_enum, default_value_t = FeatureKind::Mind)]
    pub features: FeatureKind,
    /// Trained model folder (from `obelisk train`) for --features obelisk, instead of the
    /// embedded default model.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Feature maps to write (.nii or .nii.gz).
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite an existing output (never the input).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: FeaturesArgs, out: Output) -> Result<()> {
    check_input(&args.image)?;
    if io::Format::of(&args.out)? != io::Format::Nifti {
        bail!("{}: feature maps are written as NIfTI (.nii or .nii.gz)", args.out.display());
    }
    check_output(&args.out, &[&args.image], args.force)?;
    let model = load_model(args.features, args.model.as_deref())?;
    let image = io::read_image(&args.image)?;
    let t = Instant::now();
    let extractor = args.features.extractor(&image.grid, model.as_ref())?;
    let spin = Progress::new(out.silent()).spinner(&format!("{} features", extractor.name()));
    let f = extractor.extract_canonical(&image).with_context(|| format!("features of {}", args.image.display()))?;
    spin.finish_and_clear();
    io::nifti::write_channels(&args.out, &f)?;
    let seconds = t.elapsed().as_secs_f64();
    let summary = json!({
        "out": args.out,
        "image": args.image,
        "features": extractor.name(),
        "channels": f.channels,
        "shape": f.grid.shape(),
        "spacing_mm": f.grid.spacing(),
        "seconds": seconds,
    });
    out.finish(&summary, || {
        println!(
            "wrote {}: {} channel(s) of {} features on {} in {seconds:.1} s",
            args.out.display(),
            f.channels,
            extractor.name(),
            io::describe_grid(&f.grid),
        )
    })
}
