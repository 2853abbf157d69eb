//! End to end: synth → train (with cross-validation) → segment → register with the trained
//! model's OBELISK features, on a tiny cohort so that it runs in seconds.

mod common;

use common::{fails, obelisk, ok, ok_json, s};
use obelisk::io;

#[test]
fn synth_train_segment_register() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let model = dir.path().join("model");
    #[rustfmt::skip]
    ok(&["synth", "--out", s(&data), "--subjects", "3", "--pairs", "1", "--size", "32,32,32",
         "--spacing", "10,10,10", "--seed", "5", "--quiet"]);
    let ds = data.join("dataset.json");

    let err = fails(&["train", "--dataset", s(&ds), "--out", s(&model), "--folds", "4"]);
    assert!(err.contains("--folds"), "{err}");

    #[rustfmt::skip]
    let out = obelisk(&["train", "--dataset", s(&ds), "--out", s(&model), "--iterations", "10",
                        "--folds", "3", "--log-every", "5"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // progress lines every 5 iterations: 2 per fold and 2 for the final model
    assert_eq!(stderr.lines().filter(|l| l.contains("iteration")).count(), 8, "{stderr}");
    for f in ["model.safetensors", "config.json", "cv.json", "cv.md"] {
        assert!(model.join(f).is_file(), "{f} missing");
    }
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["label_names"][1], "liver");
    assert_eq!(config["num_classes"], 10);
    let cv: serde_json::Value = serde_json::from_slice(&std::fs::read(model.join("cv.json")).unwrap()).unwrap();
    assert_eq!(cv["folds"].as_array().unwrap().len(), 3);
    assert!(cv["folds"][0]["dice"]["liver"].is_number(), "{cv}");
    let md = std::fs::read_to_string(model.join("cv.md")).unwrap();
    assert!(md.contains("| liver |") && md.contains("fold 3"), "{md}");
    // a second run without --force must not clobber the model
    let err = fails(&["train", "--dataset", s(&ds), "--out", s(&model), "--iterations", "1"]);
    assert!(err.contains("already exists"), "{err}");

    let image = data.join("subject_000_image.nii.gz");
    let seg = dir.path().join("seg.nii.gz");
    let summary = ok_json(&["segment", "--model", s(&model), "--image", s(&image), "--out", s(&seg)]);
    assert_eq!(summary["shape"], serde_json::json!([32, 32, 32]));
    let missing = dir.path().join("no_model");
    let err =
        fails(&["segment", "--model", s(&missing), "--image", s(&image), "--out", s(&dir.path().join("x.nii.gz"))]);
    assert!(err.contains("no_model"), "{err}");
    let labels = io::read_label_map(&seg).unwrap();
    let grid = io::read_grid(&image).unwrap();
    assert!(labels.grid.same_as(&grid, io::GRID_TOL));
    assert!(labels.data.iter().all(|&l| l < 10));

    let reg = dir.path().join("reg");
    let (fixed, moving) = (data.join("pair_000_fixed.nii.gz"), data.join("pair_000_moving.nii.gz"));
    #[rustfmt::skip]
    let err = fails(&["register", "--fixed", s(&fixed), "--moving", s(&moving), "--out", s(&reg), "--model", s(&model)]);
    assert!(err.contains("--features obelisk"), "{err}");
    #[rustfmt::skip]
    ok(&["register", "--fixed", s(&fixed), "--moving", s(&moving), "--out", s(&reg), "--features", "obelisk",
         "--model", s(&model), "--no-pictures", "--iterations", "20", "--quiet"]);
    // the stride-4 features must not be shrunk again by the pyramid (they were, to 2³ voxels
    // with no overlap at all, before the shrink factors were divided by the feature stride)
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(reg.join("metrics.json")).unwrap()).unwrap();
    for st in m["stages"].as_array().unwrap() {
        assert!(st["overlap"].as_f64().unwrap() > 0.5, "{st}");
    }
    let field = io::read_field(&reg.join("field.nii.gz")).unwrap();
    assert!(field.grid.same_as(&io::read_grid(&fixed).unwrap(), io::GRID_TOL));
    assert!(field.data.iter().all(|v| v.is_finite()));
}

/// `train` reads a dataset laid out and described as Learn2Reg publishes it (imagesTr/,
/// labelsTr/, `{TASK}_dataset.json` with "./" paths, label names, test entries without files).
#[test]
fn train_reads_a_learn2reg_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let gen = dir.path().join("gen");
    #[rustfmt::skip]
    ok(&["synth", "--out", s(&gen), "--subjects", "2", "--size", "24,24,24", "--spacing", "14,14,14",
         "--seed", "2", "--quiet"]);
    let root = dir.path().join("AbdomenCTCT");
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    for i in 0..2 {
        let name = format!("AbdomenCTCT_{:04}_0000.nii.gz", i + 1);
        std::fs::rename(gen.join(format!("subject_{i:03}_image.nii.gz")), root.join("imagesTr").join(&name)).unwrap();
        std::fs::rename(gen.join(format!("subject_{i:03}_labels.nii.gz")), root.join("labelsTr").join(&name)).unwrap();
    }
    let names = ["background", "leber", "milz", "niere_r", "niere_l", "magen", "pankreas", "aorta", "galle", "ws"];
    let labels: serde_json::Map<String, serde_json::Value> =
        names.iter().enumerate().map(|(i, n)| (i.to_string(), serde_json::json!(n))).collect();
    let entry = |i: usize| {
        let n = format!("AbdomenCTCT_{i:04}_0000.nii.gz");
        serde_json::json!({"image": format!("./imagesTr/{n}"), "label": format!("./labelsTr/{n}")})
    };
    let json = serde_json::json!({
        "name": "AbdomenCTCT", "release": "1.1", "pairings": "unpaired",
        "provided_data": {"0": ["image", "label"]}, "registration_direction": {"fixed": 0, "moving": 0},
        "modality": {"0": "CT"}, "labels": labels, "tensorImageSize": {"0": "3D"},
        "tensorImageShape": {"0": [24, 24, 24]}, "numTraining": 2, "numTest": 1,
        "training": [entry(1), entry(2)],
        "test": [{"image": "./imagesTs/AbdomenCTCT_0031_0000.nii.gz"}],
        "registration_val": [{"fixed": "./imagesTr/AbdomenCTCT_0001_0000.nii.gz",
                              "moving": "./imagesTr/AbdomenCTCT_0002_0000.nii.gz"}],
    });
    let ds = root.join("AbdomenCTCT_dataset.json");
    std::fs::write(&ds, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let model = dir.path().join("model");
    let summary = ok_json(&["train", "--dataset", s(&ds), "--out", s(&model), "--iterations", "2"]);
    assert_eq!((summary["arch"].as_str(), summary["iterations"].as_u64()), (Some("obelisk"), Some(2)));
    assert!(summary["parameters"].as_u64().unwrap() < 10_000 && summary["cv"].is_null(), "{summary}");
    // the MIDL-size network: 129,672 parameters with 8 classes, 257 per class more
    let midl = dir.path().join("midl");
    let summary =
        ok_json(&["train", "--dataset", s(&ds), "--out", s(&midl), "--iterations", "2", "--arch", "obelisk-midl"]);
    assert_eq!(summary["arch"], "obelisk-midl");
    assert_eq!(summary["parameters"].as_u64(), Some(129_672 + 2 * 257), "{summary}");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["label_names"][1], "leber");
    assert_eq!(config["label_names"][9], "ws");

    let label = root.join("labelsTr/AbdomenCTCT_0002_0000.nii.gz");
    std::fs::remove_file(&label).unwrap();
    let err = fails(&["train", "--dataset", s(&ds), "--out", s(&model), "--iterations", "1", "--force"]);
    assert!(err.contains(&format!("{}: file not found (listed as training[1].label in", label.display())), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// `--arch hybrid`: trains on whole volumes, its config round-trips through segment, and its
/// half-resolution decoder features drive registration.
#[test]
fn hybrid_train_segment_register() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let model = dir.path().join("hybrid");
    #[rustfmt::skip]
    ok(&["synth", "--out", s(&data), "--subjects", "2", "--pairs", "1", "--size", "24,24,24",
         "--spacing", "12,12,12", "--seed", "3", "--quiet"]);
    #[rustfmt::skip]
    ok(&["train", "--dataset", s(&data.join("dataset.json")), "--out", s(&model), "--arch", "hybrid",
         "--iterations", "3", "--quiet"]);
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architecture"]["name"], "hybrid", "{config}");
    assert_eq!(config["features"]["stride"], 2, "{config}");
    let image = data.join("subject_000_image.nii.gz");
    let seg = dir.path().join("seg.nii.gz");
    ok(&["segment", "--model", s(&model), "--image", s(&image), "--out", s(&seg), "--quiet"]);
    let labels = io::read_label_map(&seg).unwrap();
    assert!(labels.grid.same_as(&io::read_grid(&image).unwrap(), io::GRID_TOL));
    let reg = dir.path().join("reg");
    let (fixed, moving) = (data.join("pair_000_fixed.nii.gz"), data.join("pair_000_moving.nii.gz"));
    #[rustfmt::skip]
    ok(&["register", "--fixed", s(&fixed), "--moving", s(&moving), "--out", s(&reg), "--features", "obelisk",
         "--model", s(&model), "--no-pictures", "--iterations", "10", "--quiet"]);
    let field = io::read_field(&reg.join("field.nii.gz")).unwrap();
    assert!(field.data.iter().all(|v| v.is_finite()));
}

/// The ablation switches reach the model and the trainer: each changes the training, a
/// single-offset model has one offset per kernel element (3 parameters fewer each, saved as such
/// and loaded back), and `--single-offset` is refused where there is no OBELISK layer.
#[test]
fn train_ablations_change_the_model_and_the_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    #[rustfmt::skip]
    ok(&["synth", "--out", s(&data), "--subjects", "2", "--size", "32,32,32", "--spacing", "10,10,10",
         "--seed", "6", "--quiet"]);
    let ds = data.join("dataset.json");
    let train = |name: &str, extra: &[&str]| -> serde_json::Value {
        let out = dir.path().join(name);
        let mut args = vec!["train", "--dataset", s(&ds), "--out", s(&out), "--iterations", "6"];
        args.extend_from_slice(extra);
        ok_json(&args)
    };
    let base = train("base", &[]);
    let loss = |v: &serde_json::Value| v["final_loss"].as_f64().unwrap();
    for flag in ["--no-augmentation", "--no-ohem", "--single-offset"] {
        let r = train(flag.trim_start_matches('-'), &[flag]);
        assert_ne!(loss(&r), loss(&base), "{flag} left the training unchanged");
    }
    let single = dir.path().join("single-offset");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(single.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architecture"]["binary"], false, "{config}");
    let kernels = config["architecture"]["kernels"].as_u64().unwrap();
    let p = |v: &serde_json::Value| v["parameters"].as_u64().unwrap();
    let single_report = train("single-again", &["--single-offset"]);
    assert_eq!(p(&base) - p(&single_report), 3 * kernels);
    let image = data.join("subject_000_image.nii.gz");
    ok(&[
        "segment",
        "--model",
        s(&single),
        "--image",
        s(&image),
        "--out",
        s(&dir.path().join("seg.nii.gz")),
        "--quiet",
    ]);
    let err =
        fails(&["train", "--dataset", s(&ds), "--out", s(&dir.path().join("u")), "--arch", "unet", "--single-offset"]);
    assert!(err.contains("--single-offset"), "{err}");
}
