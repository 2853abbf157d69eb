//! Multi-atlas label propagation with the library API: three synthetic atlases (other anatomies)
//! are registered to a target, their label maps warped onto it and fused by a majority vote and
//! by the locally weighted vote of `registration::fusion`.
//!
//! `cargo run --release --example label_propagation`

use registration::features::{FeatureExtractor, MindConfig, MindSsc};
use registration::fusion::{local_distance, majority_vote, weighted_vote};
use registration::method::{register_features, silent, FeaturePair, Masks, MethodConfig, Start};
use registration::metrics::dice_per_label;
use registration::synth::{generate_subjects, SynthConfig};
use registration::warp::{warp_labels, warp_volume, Interpolation, Padding};
use registration::Labels;

fn mean_dice(reference: &Labels, l: &Labels) -> Result<f64, registration::Error> {
    let d = dice_per_label(reference, l)?;
    Ok(d.iter().map(|x| x.1).sum::<f64>() / d.len() as f64)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = SynthConfig { size: [48; 3], spacing: [7.0; 3], seed: 3, ..Default::default() };
    let subjects = generate_subjects(&cfg, 4)?;
    let (target, target_labels) = &subjects[0];
    let mind = MindSsc::for_grid(MindConfig::default(), &target.grid);
    let tf = mind.extract_canonical(target)?;
    let config = MethodConfig { start: Start::Com, ..Default::default() };

    let (mut warped, mut distances) = (Vec::new(), Vec::new());
    for (i, (image, labels)) in subjects.iter().enumerate().skip(1) {
        let af = mind.extract_canonical(image)?;
        let pair = FeaturePair {
            fixed: target,
            moving: image,
            fixed_features: &tf,
            moving_features: &af,
            labels: None,
            moving_points: None,
            masks: Masks::default(),
        };
        let aligned = register_features(&pair, &config, &mut silent())?;
        let field = &aligned.registration.field;
        let w = warp_labels(labels, field);
        println!("atlas {i}: mean Dice {:.3} after registration", mean_dice(target_labels, &w)?);
        // the weighted vote compares the target with the warped atlas image, feature by feature
        let wf = mind.extract_canonical(&warp_volume(image, field, Interpolation::Linear, Padding::Extent))?;
        distances.push(local_distance(&tf, &wf, 4.0)?);
        warped.push(w);
    }
    let majority = majority_vote(&warped)?;
    let weighted = weighted_vote(&warped, &distances)?;
    println!("majority vote:         mean Dice {:.3}", mean_dice(target_labels, &majority)?);
    println!("locally weighted vote: mean Dice {:.3}", mean_dice(target_labels, &weighted)?);

    let out = std::env::temp_dir().join("obelisk-examples");
    std::fs::create_dir_all(&out)?;
    obelisk::io::write_labels(&out.join("propagated_labels.nii.gz"), &weighted)?;
    println!("fused labels in {}", out.join("propagated_labels.nii.gz").display());
    Ok(())
}
