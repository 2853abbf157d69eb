//! End-to-end tests of `obelisk propagate` and `obelisk features` on tiny synthetic data.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use common::{fails, ok, ok_json, s};
use obelisk::io;

/// Two synthetic pairs (two anatomies), 32³ at 9 mm.
fn tiny_pairs(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    ok(&[
        "synth",
        "--out",
        s(&data),
        "--pairs",
        "2",
        "--subjects",
        "0",
        "--size",
        "32,32,32",
        "--spacing",
        "9,9,9",
        "--seed",
        "5",
        "--max-displacement",
        "30",
        "--quiet",
    ]);
    data
}

/// Few iterations and a centre-of-mass start keep each registration to a second or two.
const FAST: [&str; 9] =
    ["--init", "com", "--iterations", "30", "--affine-iterations", "10", "--quiet", "--threads", "2"];

fn propagate(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["propagate".into()];
    v.extend(extra.iter().map(|x| x.to_string()));
    v.extend(FAST.iter().map(|x| x.to_string()));
    v
}

fn run_ok(args: &[String]) -> String {
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn mean_dice(report: &serde_json::Value) -> f64 {
    report["mean_dice"].as_f64().expect("a mean Dice")
}

/// The NIfTI-1 header's `dim` array of a .nii.gz file.
fn dims(path: &Path) -> Vec<i16> {
    let mut gz = flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap());
    let mut h = vec![0u8; 348];
    gz.read_exact(&mut h).unwrap();
    let d: Vec<i16> = (0..8).map(|i| i16::from_le_bytes([h[40 + 2 * i], h[41 + 2 * i]])).collect();
    d[1..=d[0] as usize].to_vec()
}

#[test]
fn propagate_one_and_two_atlases() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_pairs(dir.path());
    let p = |n: &str| s(&data.join(n)).to_string();
    let target = p("pair_000_fixed.nii.gz");
    let target_labels = p("pair_000_fixed_labels.nii.gz");
    let out1 = dir.path().join("one.nii.gz");
    let same = ["--atlas".to_string(), p("pair_000_moving.nii.gz"), p("pair_000_moving_labels.nii.gz")];
    let other = ["--atlas".to_string(), p("pair_001_fixed.nii.gz"), p("pair_001_fixed_labels.nii.gz")];

    // one atlas: the same anatomy, deformed
    let mut args = propagate(&["--target", &target, "--target-labels", &target_labels, "--out", s(&out1), "--json"]);
    args.extend(same.iter().cloned());
    let report: serde_json::Value = serde_json::from_str(&run_ok(&args)).expect("--json prints JSON");
    let on_disk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("one.report.json")).unwrap()).unwrap();
    assert_eq!(report, on_disk);
    let target_img = io::read_image(Path::new(&target)).unwrap();
    let fused = io::read_label_map(&out1).unwrap();
    assert!(fused.grid.same_as(&target_img.grid, 1e-4));
    assert_eq!(dims(&out1), vec![32, 32, 32]);
    // the datatype code (uint8 = 2) says integer labels
    let mut h = vec![0u8; 72];
    flate2::read::GzDecoder::new(std::fs::File::open(&out1).unwrap()).read_exact(&mut h).unwrap();
    assert_eq!(i16::from_le_bytes([h[70], h[71]]), 2);
    let atlases = report["atlases"].as_array().unwrap();
    assert_eq!(atlases.len(), 1);
    assert!(atlases[0]["registration"]["stages"].as_array().unwrap().len() >= 2);
    assert!(atlases[0]["registration"]["folding_fraction"].as_f64().unwrap() < 0.01);
    // registration must have improved on the unregistered overlap
    let before = ok(&[
        "eval",
        "--fixed-labels",
        &target_labels,
        "--warped-labels",
        &p("pair_000_moving_labels.nii.gz"),
        "--json",
    ]);
    let before = mean_dice(&serde_json::from_str(&before).unwrap());
    let after = mean_dice(&report["fused"]);
    assert_eq!(after, mean_dice(&atlases[0]), "one atlas: the fused map is the warped atlas");
    assert!(after > 0.7 && after > before + 0.02, "mean Dice {before:.3} -> {after:.3}");

    // refuses to overwrite without --force, before any work, and leaves the output alone
    let bytes = std::fs::read(&out1).unwrap();
    let err = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("one.nii.gz") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&out1).unwrap(), bytes);

    // two atlases: the deformed twin (good) and another anatomy (worse). A majority vote of two
    // breaks every disagreement towards the smaller label; the locally weighted vote follows the
    // atlas that matches the target locally, so it must stay close to the good atlas.
    let mut fused_dice = Vec::new();
    for fusion in ["majority", "weighted"] {
        let out = dir.path().join(format!("two_{fusion}.nii.gz"));
        let mut args =
            propagate(&["--target", &target, "--target-labels", &target_labels, "--out", s(&out), "--fusion", fusion]);
        args.extend(same.iter().cloned());
        args.extend(other.iter().cloned());
        run_ok(&args);
        let fused = io::read_label_map(&out).unwrap();
        assert!(fused.grid.same_as(&target_img.grid, 1e-4));
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("two_{fusion}.report.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(report["fusion"], fusion);
        let per_atlas: Vec<f64> = report["atlases"].as_array().unwrap().iter().map(mean_dice).collect();
        assert_eq!(per_atlas.len(), 2);
        assert_eq!(per_atlas[0], after, "the same registration as with one atlas");
        assert!(per_atlas[1] < per_atlas[0], "{per_atlas:?}");
        assert!(report["fused"]["dice"]["1"].as_f64().is_some(), "Dice per label");
        fused_dice.push(mean_dice(&report["fused"]));
    }
    // same inputs, same labels, byte for byte
    let again = dir.path().join("again.nii.gz");
    let mut args = propagate(&["--target", &target, "--out", s(&again)]);
    args.extend(same.iter().cloned());
    args.extend(other.iter().cloned());
    run_ok(&args);
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(dir.path().join("two_weighted.nii.gz")).unwrap());
    let (majority, weighted) = (fused_dice[0], fused_dice[1]);
    assert!(weighted > majority + 0.05 && weighted > after - 0.03, "majority {majority:.3}, weighted {weighted:.3}");
}

#[test]
fn propagate_rejects_bad_inputs_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_pairs(dir.path());
    let other = dir.path().join("other");
    ok(&["synth", "--out", s(&other), "--subjects", "1", "--size", "20,20,20", "--spacing", "9,9,9", "--quiet"]);
    let p = |n: &str| s(&data.join(n)).to_string();
    let wrong = s(&other.join("subject_000_labels.nii.gz")).to_string();
    let out = dir.path().join("seg.nii.gz");
    let target = p("pair_000_fixed.nii.gz");
    let atlas = p("pair_000_moving.nii.gz");
    let err = fails(&["propagate", "--target", &target, "--atlas", &atlas, &wrong, "--out", s(&out)]);
    assert!(err.contains(&wrong) && err.contains("grid"), "{err}");
    assert!(err.lines().count() == 1, "one line: {err}");
    assert!(!out.exists());
    let missing = p("nope.nii.gz");
    let err = fails(&["propagate", "--target", &target, "--atlas", &atlas, &missing, "--out", s(&out)]);
    assert!(err.contains("nope.nii.gz") && err.contains("not found"), "{err}");
    let err = fails(&[
        "propagate",
        "--target",
        &target,
        "--atlas",
        &atlas,
        &p("pair_000_moving_labels.nii.gz"),
        "--out",
        s(&dir.path().join("missing/seg.nii.gz")),
    ]);
    assert!(err.contains("does not exist"), "{err}");
    let err = fails(&["propagate", "--target", &target, "--atlas", &atlas, "--out", s(&out)]);
    assert!(err.contains("LABELS") || err.contains("2 values"), "{err}");
    assert!(!dir.path().join("seg.report.json").exists());
}

#[test]
fn features_writes_channels_on_the_feature_grid() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    ok(&["synth", "--out", s(&data), "--subjects", "1", "--size", "20,18,16", "--spacing", "9,8,7", "--quiet"]);
    let image = data.join("subject_000_image.nii.gz");
    let grid = io::read_image(&image).unwrap().grid;
    for (kind, channels) in [("mind", 12), ("intensity", 1)] {
        let out = dir.path().join(format!("{kind}.nii.gz"));
        ok(&["features", "--image", s(&image), "--features", kind, "--out", s(&out), "--quiet"]);
        let f = io::read_volume_channels(&out).unwrap();
        assert_eq!(f.channels, channels);
        assert!(f.grid.same_as(&grid, 1e-4), "{kind}: features lie on the image grid");
        let want: Vec<i16> = if channels > 1 { vec![20, 18, 16, 1, channels as i16] } else { vec![20, 18, 16] };
        assert_eq!(dims(&out), want);
        if kind == "intensity" {
            assert!(f.data.iter().all(|v| (0.0..=1.0).contains(v)));
        }
        let err = fails(&["features", "--image", s(&image), "--features", kind, "--out", s(&out)]);
        assert!(err.contains("already exists"), "{err}");
    }
    // without --model the embedded default model serves (32 channels on its stride-4 grid)
    let learned = dir.path().join("o.nii");
    let summary = ok_json(&["features", "--image", s(&image), "--features", "obelisk", "--out", s(&learned)]);
    assert_eq!(summary["features"], "obelisk");
    let f = io::read_volume_channels(&learned).unwrap();
    assert_eq!(f.channels, 32);
    let (fs, is) = (f.grid.shape(), grid.shape());
    assert!((0..3).all(|a| (is[a] / 4..=is[a].div_ceil(4)).contains(&fs[a])), "{fs:?} for {is:?}");
    let err = fails(&[
        "features",
        "--image",
        s(&image),
        "--features",
        "obelisk",
        "--model",
        s(&dir.path().join("missing")),
        "--out",
        s(&dir.path().join("o2.nii")),
    ]);
    assert!(err.contains("missing"), "{err}");
    let err = fails(&["features", "--image", s(&image), "--out", s(&dir.path().join("f.png"))]);
    assert!(err.contains("NIfTI"), "{err}");
}
