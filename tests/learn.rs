//! `obelisk randomise` and `obelisk train-features` end to end: seeded outputs, truth fields that
//! bring the moving labels onto the fixed ones, and a learned model that `register` uses.

mod common;

use std::path::Path;

use common::{fails, ok, ok_json, s, tiny_pair};
use obelisk::io;

/// Fraction of the voxels where `warped` shows a structure (not background, which is also where
/// the map leaves the moving patch) that agree with `fixed`.
fn agreement(fixed: &Path, warped: &Path) -> (f64, usize) {
    let (f, w) = (io::read_label_map(fixed).unwrap(), io::read_label_map(warped).unwrap());
    let shown: Vec<(u32, u32)> = f.data.iter().zip(&w.data).filter(|(_, &b)| b != 0).map(|(&a, &b)| (a, b)).collect();
    (shown.iter().filter(|(a, b)| a == b).count() as f64 / shown.len().max(1) as f64, shown.len())
}

#[test]
fn randomised_pairs_are_seeded_and_their_truth_fields_align_the_labels() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_pair(dir.path());
    let (labels, image) = (data.join("subject_000_labels.nii.gz"), data.join("subject_000_image.nii.gz"));
    let subject = format!("{},{}", s(&labels), s(&image));
    let run = |out: &std::path::Path, seed: &str| {
        ok(&[
            "randomise",
            "--subject",
            &subject,
            "--out",
            s(out),
            "--pairs",
            "2",
            "--patch",
            "24",
            "--label-spacing",
            "10",
            "--seed",
            seed,
            "--quiet",
        ]);
    };
    let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
    run(&a, "4");
    run(&b, "4");
    run(&c, "5");
    for f in ["pair_000_fixed.nii.gz", "pair_001_moving.nii.gz", "pair_001_truth.nii.gz", "dataset.json"] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f} differs on rerun");
    }
    assert_ne!(
        std::fs::read(a.join("pair_000_fixed.nii.gz")).unwrap(),
        std::fs::read(c.join("pair_000_fixed.nii.gz")).unwrap()
    );

    for p in ["pair_000", "pair_001"] {
        let f = |k: &str| a.join(format!("{p}_{k}.nii.gz"));
        let warped = dir.path().join(format!("{p}_warped.nii.gz"));
        ok(&[
            "warp",
            "--moving",
            s(&f("moving_labels")),
            "--field",
            s(&f("truth")),
            "--labels",
            "--out",
            s(&warped),
            "--quiet",
        ]);
        let (through, shown) = agreement(&f("fixed_labels"), &warped);
        let (identity, _) = agreement(&f("fixed_labels"), &f("moving_labels"));
        assert!(shown > 24 * 24 * 24 / 4, "{p}: only {shown} voxels show a structure");
        assert!(
            through > 0.97 && through > identity,
            "{p}: agreement {identity:.3} -> {through:.3} through the truth field"
        );
    }
    // a second run refuses to overwrite, a missing label map is named
    let err = fails(&["randomise", "--subject", &subject, "--out", s(&a), "--pairs", "2", "--patch", "24"]);
    assert!(err.contains("exists"), "{err}");
    let err = fails(&["randomise", "--subject", "/nonexistent/labels.nii.gz", "--out", s(&c), "--force"]);
    assert!(err.contains("/nonexistent/labels.nii.gz"), "{err}");
}

#[test]
fn a_learned_feature_model_is_seeded_and_drives_registration() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_pair(dir.path());
    let subject = s(&data.join("subject_000_labels.nii.gz")).to_string();
    let train = |out: &std::path::Path| {
        ok(&[
            "train-features",
            "--subject",
            &subject,
            "--out",
            s(out),
            "--iterations",
            "6",
            "--points",
            "32",
            "--label-spacing",
            "10",
            "--seed",
            "2",
            "--quiet",
        ]);
    };
    let (m1, m2) = (dir.path().join("m1"), dir.path().join("m2"));
    train(&m1);
    train(&m2);
    let w = |m: &std::path::Path| std::fs::read(m.join("model.safetensors")).unwrap();
    assert_eq!(w(&m1), w(&m2), "same seed, same weights");
    let config = std::fs::read_to_string(m1.join("config.json")).unwrap();
    assert!(config.contains("\"offset_unit_mm\"") && config.contains("\"robust\": true"), "{config}");

    let out = dir.path().join("reg");
    let summary = ok_json(&[
        "register",
        "--fixed",
        s(&data.join("pair_000_fixed.nii.gz")),
        "--moving",
        s(&data.join("pair_000_moving.nii.gz")),
        "--features",
        "obelisk",
        "--model",
        s(&m1),
        "--out",
        s(&out),
        "--no-pictures",
    ]);
    assert!(out.join("field.nii.gz").exists(), "{summary}");
}
