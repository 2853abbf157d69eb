//! Throughput of the 3D grid sampler: forward and backward, 4 channels, 64³ volume, 1M points.
//!
//! `cargo run --release -p obelisk-segmentation --example sample_bench [points] [repeats] [random|grid]`
//! (set RAYON_NUM_THREADS to fix the thread count). `random` scatters the points uniformly over
//! the volume (worst case: every point misses the cache); `grid` visits them in raster order
//! with a small jitter, as registration and OBELISK sampling do.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use segmentation::ops::{grid_sample, Interpolation, Padding};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let points: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1 << 20);
    let repeats: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let (c, n) = (4usize, 64usize);
    let dev = Device::Cpu;
    let vol = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, c, n, n, n), &dev)?)?;
    let grid_mode = args.get(3).map(|s| s == "grid").unwrap_or(false);
    let pts = if grid_mode {
        let side = (points as f64).cbrt().ceil() as usize;
        let lin = |i: usize| 2.0 * i as f32 / (side - 1).max(1) as f32 - 1.0;
        let mut v = Vec::with_capacity(points * 3);
        for p in 0..points {
            let (i, j, k) = (p % side, (p / side) % side, p / (side * side));
            v.extend_from_slice(&[lin(i), lin(j), lin(k)]);
        }
        let jitter = Tensor::rand(-0.01f32, 0.01, (1, points, 3), &dev)?;
        (Tensor::from_vec(v, (1, points, 3), &dev)? + jitter)?
    } else {
        Tensor::rand(-1.05f32, 1.05, (1, points, 3), &dev)?
    };
    let pts = Var::from_tensor(&pts)?;
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let t = Instant::now();
        let y = grid_sample(vol.as_tensor(), pts.as_tensor(), Interpolation::Linear, Padding::Zeros)?;
        fwd.push(t.elapsed().as_secs_f64());
        let loss = y.sum_all()?;
        let t = Instant::now();
        let g = loss.backward()?;
        bwd.push(t.elapsed().as_secs_f64());
        assert!(g.get(pts.as_tensor()).is_some() && g.get(vol.as_tensor()).is_some());
    }
    let (f, b) = (median(fwd), median(bwd));
    let work = (points * c) as f64;
    println!(
        "grid_sample f32, {c} channels, {n}^3 volume, {points} {} points, {} threads",
        if grid_mode { "raster-order" } else { "random" },
        rayon::current_num_threads()
    );
    println!("forward : {:.1} ms  = {:.1} M point·channels/s", f * 1e3, work / f / 1e6);
    println!("backward (points + volume): {:.1} ms  = {:.1} M point·channels/s", b * 1e3, work / b / 1e6);
    Ok(())
}
