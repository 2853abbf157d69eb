//! `obelisk points`: landmarks through a transform, and the target registration error that
//! `obelisk eval` reports for corresponding landmark lists.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use registration::compose::{Chain, INVERSE_ITERATIONS};
use serde::Serialize;
use serde_json::json;

use crate::cli::transforms::{check_transforms, read_chain};
use crate::cli::validate::check_exists;
use crate::cli::Output;
use crate::io::atomic::check_output;
use crate::io::points::{PointSet, PointsFormat};
use crate::io::IoError;

/// Which way points go through a fixed → moving transform.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// A fixed-space point x goes to x + u(x) in the moving space (ITK's and ANTs' convention).
    #[default]
    FixedToMoving,
    /// A moving-space point y goes to the x with x + u(x) = y, found per point by the
    /// fixed-point iteration (residual reported).
    MovingToFixed,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  obelisk points --field reg/field.nii.gz --in fixed_landmarks.csv --out in_moving.csv
  obelisk points --transform reg/affine.mat --in fixed.fcsv --out moving.fcsv
  obelisk points --field reg/field.nii.gz --direction moving-to-fixed --in m.csv --out f.csv

Direction: register writes fixed -> moving transforms (ITK's convention, the one that
resamples the moving image onto the fixed grid). Through them a point x of the FIXED image
goes to x + u(x) in the MOVING image: the same as antsApplyTransformsToPoints, which for the
other direction needs the inverse (here --direction moving-to-fixed, or a field from
`obelisk invert` / `register --inverse`).

Files: ANTs CSV (a header line naming x,y,z[,t,label,...], LPS mm) or Slicer .fcsv (RAS, or
LPS when its '# CoordinateSystem' line says so). The output has the input's format, lines and
other columns; only the coordinates change.")]
pub struct PointsArgs {
    /// Displacement field (ITK convention), fixed → moving.
    #[arg(long, required_unless_present = "transforms", conflicts_with = "transforms")]
    pub field: Option<PathBuf>,
    /// Transform (.tfm, .txt, .mat or a displacement field); repeat for a chain, in
    /// antsApplyTransforms' -t order (a point goes through the first one listed first).
    #[arg(long = "transform", value_name = "FILE")]
    pub transforms: Vec<PathBuf>,
    /// Points to map: .csv (ANTs, LPS) or .fcsv (Slicer).
    #[arg(long = "in", value_name = "POINTS")]
    pub input: PathBuf,
    /// Output point file, of the same type as --in.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t)]
    pub direction: Direction,
    /// Overwrite --out if it exists (never an input).
    #[arg(long)]
    pub force: bool,
}

/// The transform files of `--field`/`--transform`, checked.
fn transform_files(field: &Option<PathBuf>, transforms: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = field.iter().chain(transforms).cloned().collect();
    if files.is_empty() {
        bail!("give a --field or one or more --transform");
    }
    check_transforms(&files)?;
    Ok(files)
}

/// Points through `chain` in `direction`; with the largest inversion residual (mm) when
/// inverting.
fn map_points(chain: &Chain, points: &[[f64; 3]], direction: Direction) -> Result<(Vec<[f64; 3]>, Option<f64>)> {
    Ok(match direction {
        Direction::FixedToMoving => (points.iter().map(|&p| chain.apply(p)).collect(), None),
        Direction::MovingToFixed => {
            let mut out = Vec::with_capacity(points.len());
            let mut worst = 0.0f64;
            for &p in points {
                let (x, res) = chain.invert_point(p, INVERSE_ITERATIONS)?;
                worst = worst.max(res);
                out.push(x);
            }
            (out, Some(worst))
        }
    })
}

pub fn points(a: PointsArgs, out: Output) -> Result<()> {
    let t = Instant::now();
    let files = transform_files(&a.field, &a.transforms)?;
    check_exists(&a.input)?;
    if PointsFormat::of(&a.out)? != PointsFormat::of(&a.input)? {
        return Err(IoError::new(&a.out, "points are written in the type they were read (.csv or .fcsv)").into());
    }
    let mut inputs: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    inputs.push(&a.input);
    check_output(&a.out, &inputs, a.force)?;
    let set = PointSet::read(&a.input)?;
    let chain = read_chain(&files)?;
    let (moved, residual) = map_points(&chain, &set.points, a.direction)?;
    set.write(&a.out, &moved)?;
    let summary = json!({
        "out": a.out,
        "in": a.input,
        "transforms": files,
        "direction": a.direction,
        "points": moved.len(),
        "inverse_residual_max_mm": residual,
        "seconds": t.elapsed().as_secs_f64(),
    });
    out.finish(&summary, || {
        if let Some(r) = residual {
            println!("largest inversion residual {r:.2e} mm");
        }
        println!("wrote {} points to {}", moved.len(), a.out.display());
    })
}

/// Distances between corresponding landmarks (mm).
#[derive(Debug, Clone, Serialize)]
pub struct Tre {
    pub points: usize,
    pub mean_mm: f64,
    pub median_mm: f64,
    pub max_mm: f64,
}

impl Tre {
    fn of(a: &[[f64; 3]], b: &[[f64; 3]]) -> Self {
        let mut d: Vec<f64> =
            a.iter().zip(b).map(|(p, q)| (0..3).map(|k| (p[k] - q[k]).powi(2)).sum::<f64>().sqrt()).collect();
        d.sort_by(f64::total_cmp);
        let n = d.len();
        let median = if n % 2 == 1 { d[n / 2] } else { 0.5 * (d[n / 2 - 1] + d[n / 2]) };
        Self { points: n, mean_mm: d.iter().sum::<f64>() / n as f64, median_mm: median, max_mm: d[n - 1] }
    }
}

/// The target registration error of fixed landmarks mapped through the transform against
/// their moving counterparts (row by row), and the distance before any transform.
#[derive(Debug, Clone, Serialize)]
pub struct TreReport {
    pub before: Tre,
    pub after: Tre,
}

/// TRE of `fixed_points` (through `field`/`transforms`, fixed → moving) against `moving_points`.
pub fn tre(
    fixed_points: &Path,
    moving_points: &Path,
    field: &Option<PathBuf>,
    transforms: &[PathBuf],
) -> Result<TreReport> {
    let files = transform_files(field, transforms)?;
    check_exists(fixed_points)?;
    check_exists(moving_points)?;
    let (f, m) = (PointSet::read(fixed_points)?, PointSet::read(moving_points)?);
    if f.points.len() != m.points.len() {
        return Err(IoError::new(
            moving_points,
            format!("holds {} points but {} holds {}", m.points.len(), fixed_points.display(), f.points.len()),
        )
        .into());
    }
    let (mapped, _) = map_points(&read_chain(&files)?, &f.points, Direction::FixedToMoving)?;
    Ok(TreReport { before: Tre::of(&f.points, &m.points), after: Tre::of(&mapped, &m.points) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tre_statistics() {
        let a = [[0.0; 3], [0.0; 3], [0.0; 3], [0.0; 3]];
        let b = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 10.0]];
        let t = Tre::of(&a, &b);
        assert_eq!((t.points, t.mean_mm, t.median_mm, t.max_mm), (4, 4.0, 2.5, 10.0));
    }
}
