//! Drawing a deformation: the ground-truth field of a synthetic pair as a deformed grid over the
//! fixed image, and its Jacobian determinant as a colour map.
//!
//! `cargo run --release --example draw_grid`

use obelisk::pictures::{grid_picture, jacobian_picture, Axis, SliceSpec};
use obelisk::pipeline::save_png;
use registration::metrics::jacobian;
use registration::synth::{make_pair, SynthConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg =
        SynthConfig { size: [64; 3], spacing: [5.0; 3], seed: 2, max_displacement_mm: 20.0, ..Default::default() };
    let pair = make_pair(&cfg, 0)?;
    let (det, stats) = jacobian(&pair.truth, None)?;
    println!(
        "truth field: Jacobian determinant {:.3} .. {:.3}, folding {:.4}%, SDlogJ {:.3}",
        stats.min,
        stats.max,
        100.0 * stats.fraction_nonpositive,
        stats.sd_log_j
    );
    let out = std::env::temp_dir().join("obelisk-examples");
    std::fs::create_dir_all(&out)?;
    let slice = SliceSpec { axis: Axis::Coronal, index: None };
    // a line every 3 voxels (15 mm)
    save_png(&out.join("grid.png"), &grid_picture(Some(&pair.fixed), &pair.truth, slice, 3)?)?;
    save_png(&out.join("jacobian.png"), &jacobian_picture(&det, slice)?)?;
    println!("wrote {} and {}", out.join("grid.png").display(), out.join("jacobian.png").display());
    Ok(())
}
