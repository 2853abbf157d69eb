//! Times MIND-SSC (radius 2, dilation 2) on a 128³ volume.
//!
//! `cargo run --release -p obelisk-registration --example mind_bench [size] [repeats]`

use std::time::Instant;

use registration::features::{FeatureExtractor, MindConfig, MindSsc};
use registration::{Grid, Volume};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(128);
    let repeats: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let grid = Grid::from_spacing([size; 3], [1.0; 3], [0.0; 3])?;
    // A smooth blob plus deterministic texture, so the descriptor has structure to work on.
    let c = size as f32 / 2.0;
    let mut data = Vec::with_capacity(grid.num_voxels());
    for k in 0..size {
        for j in 0..size {
            for i in 0..size {
                let (x, y, z) = (i as f32 - c, j as f32 - c, k as f32 - c);
                let r2 = (x * x + y * y + z * z) / (c * c);
                let texture = ((i * 7 + j * 13 + k * 29) % 17) as f32 / 17.0;
                data.push(100.0 * (-4.0 * r2).exp() + 5.0 * texture);
            }
        }
    }
    let image = Volume::new(grid, 1, data)?;
    let mind = MindSsc::new(MindConfig::default());
    let mut times = Vec::new();
    let mut checksum = 0.0f64;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let f = mind.extract(&image)?;
        times.push(t.elapsed().as_secs_f64());
        checksum = f.data.iter().map(|&v| f64::from(v)).sum();
    }
    times.sort_by(f64::total_cmp);
    println!(
        "MIND-SSC {size}^3, {} channels, {} threads: best {:.3} s, median {:.3} s over {} runs (checksum {checksum:.3})",
        mind.channels(),
        rayon::current_num_threads(),
        times[0],
        times[times.len() / 2],
        times.len()
    );
    Ok(())
}
