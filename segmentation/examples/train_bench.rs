//! Times the segmentation networks on synthetic data (release build; set RAYON_NUM_THREADS).
//!
//! `cargo run --release -p obelisk-segmentation --example train_bench -- MODE [--size N]`
//!
//! - `step` (default; N = 64): one OBELISK-Net training step (MIDL configuration, 8 classes) on a
//!   fixed batch of 3 images × 256 points with kernel warps σ = 0.2; the median of 10 steps. The
//!   same step in PyTorch: `data-scripts/torch-bench/run.sh`.
//! - `memory` (N = 144): 20 OBELISK-Net training iterations on 3 images of N³ (data preparation
//!   included), then the process's peak resident memory.
//! - `infer` (N = 144): full-volume inference (normalise, forward, argmax) of an N³ image with
//!   OBELISK-Net, the MIDL comparison U-Net (14 convs, 8–128 channels) and the hybrid
//!   OBELISK-Net, each the best of `--runs` (3) runs, then the peak resident memory; `--only
//!   obelisk|u-net|hybrid` times one of them.

use std::time::Instant;

use candle_core::{Device, Tensor};
use segmentation::train::sphere_problem;
use segmentation::{
    evaluate, Architecture, HybridNetConfig, InputNorm, Model, ModelConfig, ObeliskNetConfig, TrainConfig, Trainer,
    UNetConfig,
};

/// Peak resident set size of this process in MB (Linux `VmHWM`).
fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU time (user + system) of this process in seconds, all threads (Linux `/proc/self/stat`,
/// clock ticks of 10 ms): a measure of work that, unlike wall time, does not grow when other
/// processes compete for the cores.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // fields after the parenthesised command name; utime and stime are fields 14 and 15
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn model(arch: Architecture) -> segmentation::Result<Model> {
    Model::new(ModelConfig::new(arch, InputNorm::default(), vec![]), 0, &Device::Cpu)
}

fn obelisk() -> segmentation::Result<Model> {
    model(Architecture::ObeliskNet(ObeliskNetConfig::default()))
}

fn images(n: usize) -> segmentation::Result<Vec<(Tensor, Tensor)>> {
    (0..3).map(|s| sphere_problem(n, s, &Device::Cpu)).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn step(n: usize) -> segmentation::Result<()> {
    let model = obelisk()?;
    println!("OBELISK-Net: {} parameters, {} threads", model.num_parameters(), rayon::current_num_threads());
    let data = images(n)?;
    let mut trainer = Trainer::new(&model, &data, TrainConfig::default())?;
    let batch = trainer.sample_batch()?;
    // warm-up (allocations, thread pool)
    for _ in 0..2 {
        trainer.step_on(&batch)?;
    }
    let mut times = Vec::new();
    let steps = 10;
    let cpu0 = cpu_seconds();
    for _ in 0..steps {
        let t0 = Instant::now();
        trainer.step_on(&batch)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let cpu = cpu_seconds().zip(cpu0).map_or(f64::NAN, |(b, a)| (b - a) / steps as f64);
    let (lo, hi) = (times.iter().copied().fold(f64::MAX, f64::min), times.iter().copied().fold(0.0, f64::max));
    println!(
        "training step ({} points, {n}³ images): median {:.1} ms (min {:.1}, max {:.1}, {steps} steps), CPU time {:.1} ms/step",
        batch.len(),
        median(times) * 1e3,
        lo * 1e3,
        hi * 1e3,
        cpu * 1e3
    );
    Ok(())
}

fn memory(n: usize) -> segmentation::Result<()> {
    let model = obelisk()?;
    let data = images(n)?;
    let t0 = Instant::now();
    let cfg = TrainConfig { epochs: 1, iters_per_epoch: 20, ..Default::default() };
    let losses = segmentation::train(&model, &data, cfg, &mut |_| {})?;
    println!(
        "OBELISK-Net training, 3 images of {n}³, 20 iterations: {:.1} s (loss {:.3}), peak RSS {:.0} MB",
        t0.elapsed().as_secs_f64(),
        losses[0],
        peak_rss_mb().unwrap_or(f64::NAN)
    );
    Ok(())
}

fn infer(n: usize, runs: usize, only: Option<&str>) -> segmentation::Result<()> {
    let (img, _) = sphere_problem(n, 0, &Device::Cpu)?;
    let nets = [
        ("OBELISK-Net", Architecture::ObeliskNet(ObeliskNetConfig::default())),
        ("U-Net", Architecture::Unet(UNetConfig::default())),
        ("hybrid OBELISK-Net", Architecture::Hybrid(HybridNetConfig::default())),
    ];
    for (name, arch) in nets {
        if only.is_some_and(|o| !name.to_lowercase().starts_with(o)) {
            continue;
        }
        let m = model(arch)?;
        let mut best = f64::MAX;
        for _ in 0..runs.max(1) {
            let t0 = Instant::now();
            let labels = evaluate(&m, &img)?;
            best = best.min(t0.elapsed().as_secs_f64());
            assert_eq!(labels.len(), n * n * n);
        }
        println!(
            "inference {n}³ {name:<19} ({:>6} parameters): {:>6.0} ms, peak RSS so far {:.0} MB",
            m.num_parameters(),
            best * 1e3,
            peak_rss_mb().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("step");
    let opt = |name: &str| -> Result<Option<&String>, String> {
        match args.iter().position(|a| a == name) {
            Some(i) => args.get(i + 1).map(Some).ok_or(format!("{name} needs a value")),
            None => Ok(None),
        }
    };
    let size = opt("--size")?.map(|v| v.parse::<usize>()).transpose()?;
    let runs = opt("--runs")?.map(|v| v.parse::<usize>()).transpose()?.unwrap_or(3);
    let only = opt("--only")?.map(String::as_str);
    match mode {
        "step" => step(size.unwrap_or(64))?,
        "memory" => memory(size.unwrap_or(144))?,
        "infer" => infer(size.unwrap_or(144), runs, only)?,
        other => return Err(format!("unknown mode {other:?} (step, memory, infer)").into()),
    }
    Ok(())
}
