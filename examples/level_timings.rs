//! Per-iteration timings of the pieces of the full-resolution NCC level (the T1 -> Colin27
//! pair's 79x95x79 grid by default, control grid at half resolution), each forward on its own
//! and the backward of growing prefixes of the chain: where a level's time goes.
//! `cargo run --release --example level_timings -- [D H W]`

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use registration::loss::{local_ncc, BsplinePenalty, Regulariser};
use registration::transform::{Affine, DenseDisplacement, SamplingPlan};
use registration::Grid;
use segmentation::ops::{self, DisplacedSampler, Padding};

fn main() -> anyhow::Result<()> {
    // as the obelisk binary does (src/main.rs)
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: allocator parameters only, before any thread starts
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
    let a: Vec<usize> = std::env::args().skip(1).filter_map(|s| s.parse().ok()).collect();
    let [d, h, w] = if a.len() == 3 { [a[0], a[1], a[2]] } else { [79, 95, 79] };
    let dev = Device::Cpu;
    let grid = Grid::from_spacing([w, h, d], [2.0; 3], [0.0; 3])?;
    let cshape = grid.shape().map(|n| n.div_ceil(2));
    let cgrid = grid.resized(cshape);
    let plan = SamplingPlan::new(&grid, &grid, &Affine::default(), &dev)?;
    let n = d * h * w;
    let img = |s: f32| -> anyhow::Result<Tensor> {
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + s).sin() * 50.0 + (i % w) as f32).collect();
        Ok(Tensor::from_vec(v, (1, 1, d, h, w), &dev)?)
    };
    let (fixed, moving) = (img(0.0)?, img(1.0)?);
    let mask = Tensor::ones((1, 1, d, h, w), candle_core::DType::F32, &dev)?;
    let sampler = DisplacedSampler::new(&moving, &plan.base, &plan.lin_t, Padding::Border)?;
    let [cw, ch, cd] = cshape;
    let v0: Vec<f32> = (0..3 * cd * ch * cw).map(|i| (i as f32 * 0.01).sin()).collect();
    let v = Var::from_tensor(&Tensor::from_vec(v0, (1, 3, cd, ch, cw), &dev)?)?;
    let reg = Regulariser::new(&BsplinePenalty { width: [2.0; 3], voxel_mm: 4.0 }, 1.0, 1.0, [cd, ch, cw]);
    // one squaring step alone
    {
        let cplan = SamplingPlan::new(&cgrid, &cgrid, &Affine::default(), &dev)?;
        let step = ops::SquaringStep::new(&cplan.base, &cplan.lin_t, [cd, ch, cw])?;
        let u = (v.as_tensor() * 0.05)?;
        let clock = Instant::now();
        for _ in 0..60 {
            let _ = step.apply(&u)?;
        }
        let fwd = clock.elapsed().as_secs_f64() / 60.0;
        let uv = Var::from_tensor(&u)?;
        let clock = Instant::now();
        for _ in 0..60 {
            let _ = step.apply(uv.as_tensor())?.sum_all()?.backward()?;
        }
        let both = clock.elapsed().as_secs_f64() / 60.0;
        println!("one squaring step: fwd {:.2} ms, fwd+bwd {:.2} ms ({} points)", 1e3 * fwd, 1e3 * both, cd * ch * cw);
    }
    let reps = 10;
    let mut t = [0f64; 8];
    for _ in 0..reps {
        let mut clock = Instant::now();
        let mut lap = |k: usize| {
            t[k] += clock.elapsed().as_secs_f64();
            clock = Instant::now();
        };
        let u = DenseDisplacement::exponentiate(v.as_tensor(), &cgrid, 6)?;
        lap(0);
        let dense = ops::resize(&u, [d, h, w])?;
        lap(1);
        let warped = sampler.sample_as(&dense, fixed.shape().clone())?;
        lap(2);
        let m = sampler.inside(&dense)?;
        lap(3);
        let ncc = local_ncc(&fixed, &warped, &m.reshape((1, 1, d, h, w))?, 2)?;
        lap(4);
        let loss = (ncc + reg.eval(v.as_tensor())?)?;
        lap(5);
        let g = loss.backward()?;
        lap(6);
        let _ = g.get(v.as_tensor()).map(|g| g.sum_all());
        lap(7);
    }
    // backward of growing prefixes of the chain
    let mut tb = [0f64; 5];
    for _ in 0..reps {
        for (k, tb) in tb.iter_mut().enumerate() {
            let u = DenseDisplacement::exponentiate(v.as_tensor(), &cgrid, 6)?;
            let loss = match k {
                0 => u.sum_all()?,
                1 => ops::resize(&u, [d, h, w])?.sum_all()?,
                2 => sampler.sample_as(&ops::resize(&u, [d, h, w])?, fixed.shape().clone())?.sum_all()?,
                3 => {
                    let dense = ops::resize(&u, [d, h, w])?;
                    let warped = sampler.sample_as(&dense, fixed.shape().clone())?;
                    local_ncc(&fixed, &warped, &mask, 2)?
                }
                _ => reg.eval(v.as_tensor())?,
            };
            let clock = Instant::now();
            let _ = loss.backward()?;
            *tb += clock.elapsed().as_secs_f64();
        }
    }
    for (nm, s) in ["bwd exp", "bwd exp+resize", "bwd +sampler", "bwd +ncc", "bwd regularisers"].iter().zip(tb) {
        println!("{nm:16} {:7.1} ms", 1e3 * s / reps as f64);
    }
    let names = [
        "exp fwd",
        "resize fwd",
        "sampler fwd",
        "overlap",
        "ncc fwd",
        "regularisers fwd",
        "backward (all)",
        "(gradient read)",
    ];
    for (nm, s) in names.iter().zip(t) {
        println!("{nm:16} {:7.1} ms", 1e3 * s / reps as f64);
    }
    println!("total            {:7.1} ms per iteration at {d}x{h}x{w}", 1e3 * t.iter().sum::<f64>() / reps as f64);
    Ok(())
}
