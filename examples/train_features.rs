//! Training a (tiny) OBELISK-Net on synthetic subjects and registering with its learned
//! features: the segmentation network's OBELISK layer becomes the feature extractor of
//! `register --features obelisk`.
//!
//! `cargo run --release --example train_features`

use std::time::Instant;

use candle_core::{Device, Tensor};
use registration::features::{FeatureExtractor, ObeliskFeatures};
use registration::method::{register_features, silent, FeaturePair, Masks, MethodConfig, Start};
use registration::metrics::dice_per_label;
use registration::synth::{generate_subjects, make_pair, phantom::LABEL_NAMES, SynthConfig};
use registration::warp::warp_labels;
use registration::DisplacementField;
use segmentation::{Architecture, InputNorm, Model, ModelConfig, ObeliskNetConfig, TrainConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = SynthConfig { size: [48; 3], spacing: [7.0; 3], seed: 21, ..Default::default() };
    let dev = Device::Cpu;
    let data: Vec<(Tensor, Tensor)> = generate_subjects(&cfg, 3)?
        .into_iter()
        .map(|(img, lab)| {
            let (d, h, w) = img.grid.dhw();
            Ok((Tensor::from_vec(img.data, (1, 1, d, h, w), &dev)?, Tensor::from_vec(lab.data, (d, h, w), &dev)?))
        })
        .collect::<candle_core::Result<_>>()?;

    // a small network: 64 offset pairs, a quarter-resolution feature grid
    let net = ObeliskNetConfig {
        num_classes: LABEL_NAMES.len(),
        kernels: 64,
        hidden: 32,
        mid: 16,
        growth: 8,
        dense_layers: 1,
        pool_kernel: [3, 3, 3],
        ..Default::default()
    };
    let names = LABEL_NAMES.iter().map(|s| s.to_string()).collect();
    // CT in HU: -1000..1000 onto about -1..1
    let norm = InputNorm { scale: 1.0 / 1000.0, offset: 0.0, robust: false };
    let model = Model::new(ModelConfig::new(Architecture::ObeliskNet(net), norm, names), 0, &dev)?;
    let train = TrainConfig {
        lr: 0.005,
        batch_size: 2,
        points_per_image: 512,
        iters_per_epoch: 150,
        epochs: 1,
        ..Default::default()
    };
    let t = Instant::now();
    let mut losses = Vec::new();
    segmentation::train(&model, &data, train, &mut |p| losses.push(p.loss))?;
    println!(
        "trained {} iterations on {} subjects in {:.1} s: loss {:.3} -> {:.3}",
        losses.len(),
        data.len(),
        t.elapsed().as_secs_f64(),
        losses[..10].iter().sum::<f64>() / 10.0,
        losses[losses.len() - 10..].iter().sum::<f64>() / 10.0
    );

    let dir = std::env::temp_dir().join("obelisk-examples").join("model");
    model.save(&dir)?;
    let features = ObeliskFeatures::load(&dir)?;

    // a pair of a subject the network has not seen
    let pair = make_pair(&SynthConfig { seed: 22, max_displacement_mm: 15.0, ..cfg }, 0)?;
    let (ff, mf) = (features.extract_canonical(&pair.fixed)?, features.extract_canonical(&pair.moving)?);
    println!(
        "OBELISK features: {} channels on a {:?} grid (image {:?})",
        ff.channels,
        ff.grid.shape(),
        pair.fixed.grid.shape()
    );
    let p = FeaturePair {
        fixed: &pair.fixed,
        moving: &pair.moving,
        fixed_features: &ff,
        moving_features: &mf,
        labels: None,
        moving_points: None,
        masks: Masks::default(),
    };
    let config = MethodConfig { start: Start::None, ..Default::default() };
    let aligned = register_features(&p, &config, &mut silent())?;
    let mean = |d: Vec<(u32, f64)>| d.iter().map(|x| x.1).sum::<f64>() / d.len() as f64;
    let identity = DisplacementField::zeros(pair.fixed.grid.clone());
    let before = mean(dice_per_label(&pair.fixed_labels, &warp_labels(&pair.moving_labels, &identity))?);
    let after =
        mean(dice_per_label(&pair.fixed_labels, &warp_labels(&pair.moving_labels, &aligned.registration.field))?);
    println!("registration with the learned features: mean Dice {before:.3} -> {after:.3}");
    println!("model in {}", dir.display());
    Ok(())
}
