//! Times OBELISK-Net (MIDL configuration, 8 classes) on synthetic data: one training step on a
//! fixed batch (3 images × 256 points, kernel warps σ = 0.2) and full-volume inference.
//!
//! `cargo run --release -p obelisk-segmentation --example train_bench`

use std::time::Instant;

use candle_core::Device;
use segmentation::train::sphere_problem;
use segmentation::{evaluate, Architecture, InputNorm, Model, ModelConfig, ObeliskNetConfig, TrainConfig, Trainer};

fn main() -> segmentation::Result<()> {
    let dev = Device::Cpu;
    let cfg = ModelConfig::new(Architecture::ObeliskNet(ObeliskNetConfig::default()), InputNorm::default(), vec![]);
    let model = Model::new(cfg, 0, &dev)?;
    println!("OBELISK-Net: {} parameters, {} threads", model.num_parameters(), rayon::current_num_threads());
    let data: Vec<_> = (0..3).map(|s| sphere_problem(64, s, &dev)).collect::<segmentation::Result<_>>()?;
    let mut trainer = Trainer::new(&model, &data, TrainConfig::default())?;
    let batch = trainer.sample_batch()?;
    // warm-up (allocations, thread pool)
    for _ in 0..2 {
        trainer.step_on(&batch)?;
    }
    let n = 10;
    let t0 = Instant::now();
    for _ in 0..n {
        trainer.step_on(&batch)?;
    }
    let step = t0.elapsed().as_secs_f64() / n as f64;
    println!("training step ({} points): {:.1} ms, {:.0} points/s", batch.len(), step * 1e3, batch.len() as f64 / step);
    let t0 = Instant::now();
    let labels = evaluate(&model, &data[0].0)?;
    println!("inference 64³ (16³ grid, {} voxels): {:.0} ms", labels.len(), t0.elapsed().as_secs_f64() * 1e3);
    Ok(())
}
