//! End-to-end tests of the subcommands on tiny generated data: outputs exist, read back with the
//! right geometry, `--json` parses, and reruns are byte-identical.

mod common;

use std::path::{Path, PathBuf};

use common::{fails, obelisk, ok, ok_json, s, tiny_pair};
use obelisk::io;

#[test]
fn synth_is_deterministic_and_writes_a_dataset() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let da = tiny_pair(a.path());
    let db = tiny_pair(b.path());
    let mut names: Vec<_> = std::fs::read_dir(&da).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names.len(), 8, "{names:?}");
    for n in &names {
        let (x, y) = (std::fs::read(da.join(n)).unwrap(), std::fs::read(db.join(n)).unwrap());
        assert!(x == y, "{n:?} differs between runs with the same seed");
    }
    let ds: serde_json::Value = serde_json::from_slice(&std::fs::read(da.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(ds["numPairs"], 1);
    assert_eq!(ds["labels"]["1"], "liver");
    // the writer's schema is the reader's: every listed file is there, pairs carry their extras
    let parsed = io::dataset::Dataset::load(&da.join("dataset.json")).unwrap();
    assert_eq!(parsed.tensor_image_shape, Some(vec![24, 24, 24]));
    let pair = &parsed.registration_val[0];
    assert_eq!(pair.truth_field.as_deref(), Some(da.join("pair_000_truth.nii.gz").as_path()));
    assert_eq!(pair.files().len(), 5);
    parsed.check_files(parsed.training.iter().flat_map(|s| s.files()).chain(pair.files())).unwrap();
    let img = io::read_image(&da.join("subject_000_image.nii.gz")).unwrap();
    let lab = io::read_label_map(&da.join("subject_000_labels.nii.gz")).unwrap();
    assert!(img.grid.same_as(&lab.grid, 1e-6));
    assert_eq!(img.grid.shape(), [24, 24, 24]);
    assert!((img.grid.spacing()[0] - 14.0).abs() < 1e-6);
    // a different seed gives different data
    let c = tempfile::tempdir().unwrap();
    let dc = c.path().join("d");
    let summary = ok_json(&[
        "synth",
        "--out",
        s(&dc),
        "--subjects",
        "1",
        "--size",
        "24,24,24",
        "--spacing",
        "14,14,14",
        "--seed",
        "4",
    ]);
    assert_eq!((summary["subjects"].as_u64(), summary["seed"].as_u64()), (Some(1), Some(4)));
    assert_ne!(
        std::fs::read(dc.join("subject_000_image.nii.gz")).unwrap(),
        std::fs::read(da.join("subject_000_image.nii.gz")).unwrap()
    );
}

#[test]
fn register_eval_grid_and_warp_work_together() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_pair(dir.path());
    let reg = dir.path().join("reg");
    let p = |n: &str| data.join(n);
    let fixed = p("pair_000_fixed.nii.gz");
    let (moving, fixed_labels, moving_labels, truth) = (
        p("pair_000_moving.nii.gz"),
        p("pair_000_fixed_labels.nii.gz"),
        p("pair_000_moving_labels.nii.gz"),
        p("pair_000_truth.nii.gz"),
    );
    let args = [
        "register",
        "--fixed",
        s(&fixed),
        "--moving",
        s(&moving),
        "--fixed-labels",
        s(&fixed_labels),
        "--moving-labels",
        s(&moving_labels),
        "--truth",
        s(&truth),
        "--out",
        s(&reg),
        "--iterations",
        "15",
        "--affine-iterations",
        "5",
        "--json",
    ];
    let json = ok(&args);
    let summary: serde_json::Value = serde_json::from_str(&json).expect("--json prints JSON");
    assert!(summary["metrics"]["mean_dice"].as_f64().unwrap() > 0.3);
    assert!(summary["metrics"]["endpoint_error"]["mean_mm"].as_f64().is_some());
    // the default initialisation is the translation search; fixed and moving share a grid here
    let search = &summary["init_search"];
    assert!(search["overlap_fraction"].as_f64().unwrap() > 0.9, "{search}");
    // the start kept is the search's best or one of its other candidates: the one the affine
    // stage ended lowest from
    let starts = summary["affine_starts"].as_array().unwrap();
    let chosen: Vec<f64> = (0..3).map(|a| summary["init_translation_mm"][a].as_f64().unwrap()).collect();
    assert!(chosen.iter().all(|t| t.abs() <= 14.0), "start {summary}");
    if starts.is_empty() {
        assert_eq!(summary["init_translation_mm"], search["translation_mm"]);
    } else {
        assert_eq!(starts[0]["translation_mm"], search["translation_mm"]);
        let loss = |s: &serde_json::Value| s["affine_loss"].as_f64().unwrap();
        let kept = starts.iter().find(|s| s["translation_mm"] == summary["init_translation_mm"]).expect("kept start");
        let lowest = starts.iter().map(loss).fold(f64::INFINITY, f64::min);
        assert!(loss(kept) <= lowest / 0.99, "{summary}");
    }
    assert!(summary["dice_after_affine"].as_f64().is_some(), "{summary}");
    assert!(summary["dice_after_discrete"].as_f64().is_some(), "{summary}");
    let fixed_img = io::read_image(&fixed).unwrap();
    let field = io::read_field(&reg.join("field.nii.gz")).unwrap();
    assert!(field.grid.same_as(&fixed_img.grid, 1e-4));
    let warped = io::read_image(&reg.join("warped.nii.gz")).unwrap();
    assert!(warped.grid.same_as(&fixed_img.grid, 1e-4));
    let wl = io::read_label_map(&reg.join("warped_labels.nii.gz")).unwrap();
    assert!(wl.grid.same_as(&fixed_img.grid, 1e-4));
    let png = image::open(reg.join("summary.png")).expect("summary.png is a PNG");
    assert!(png.width() > 1000 && png.height() > 600);
    let metrics: serde_json::Value = serde_json::from_slice(&std::fs::read(reg.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["metrics"], summary["metrics"]);

    // same inputs, same outputs
    let first = std::fs::read(reg.join("field.nii.gz")).unwrap();
    let again = obelisk(&args);
    assert!(!again.status.success(), "existing outputs are not overwritten without --force");
    let mut forced: Vec<&str> = args.to_vec();
    forced.push("--force");
    ok(&forced);
    assert!(first == std::fs::read(reg.join("field.nii.gz")).unwrap(), "rerun gave a different field");

    // eval agrees with register's Dice
    let ev = ok(&[
        "eval",
        "--fixed-labels",
        s(&p("pair_000_fixed_labels.nii.gz")),
        "--warped-labels",
        s(&reg.join("warped_labels.nii.gz")),
        "--field",
        s(&reg.join("field.nii.gz")),
        "--json",
    ]);
    let ev: serde_json::Value = serde_json::from_str(&ev).unwrap();
    assert!(
        (ev["mean_dice"].as_f64().unwrap() - summary["metrics"]["mean_dice"].as_f64().unwrap()).abs() < 1e-9,
        "eval {ev} register {summary}"
    );

    // warp with the written field reproduces register's warped labels
    let relabel = dir.path().join("relabel.nii.gz");
    let w = ok_json(&[
        "warp",
        "--moving",
        s(&p("pair_000_moving_labels.nii.gz")),
        "--field",
        s(&reg.join("field.nii.gz")),
        "--out",
        s(&relabel),
        "--labels",
    ]);
    assert_eq!(w["out"].as_str(), Some(s(&relabel)));
    assert_eq!(w["labels"], true);
    assert_eq!(io::read_label_map(&relabel).unwrap().data, wl.data);

    // pictures
    let grid_png = dir.path().join("pics/grid.png");
    let jac_png = dir.path().join("pics/jac.png");
    let g = ok_json(&[
        "grid",
        "--field",
        s(&reg.join("field.nii.gz")),
        "--image",
        s(&fixed),
        "--slice",
        "coronal",
        "--out",
        s(&grid_png),
        "--jacobian",
        s(&jac_png),
    ]);
    assert_eq!(g["jacobian"].as_str(), Some(s(&jac_png)));
    assert!(image::open(&grid_png).is_ok() && image::open(&jac_png).is_ok());
    let view_png = dir.path().join("pics/view.png");
    let v = ok_json(&["view", "--image", s(&fixed), "--labels", s(&fixed_labels), "--out", s(&view_png)]);
    assert_eq!(v["shape"], serde_json::json!([24, 24, 24]));
    assert_eq!(image::open(&view_png).unwrap().width(), 3 * 360);
}

#[test]
fn register_2d_png_pair() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (48u32, 40u32);
    let blob = |cx: f64, cy: f64| {
        image::ImageBuffer::from_fn(w, h, |x, y| {
            let r2 = (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2);
            image::Luma([(40.0 + 200.0 * (-r2 / 60.0).exp()) as u8])
        })
    };
    let (f, m) = (dir.path().join("f.png"), dir.path().join("m.png"));
    blob(22.0, 20.0).save(&f).unwrap();
    blob(25.0, 18.0).save(&m).unwrap();
    let out = dir.path().join("reg");
    ok(&["register", "--fixed", s(&f), "--moving", s(&m), "--out", s(&out), "--features", "intensity", "--quiet"]);
    let warped = io::read_image(&out.join("warped.png")).unwrap();
    assert!(warped.grid.is_2d());
    let field = io::read_field(&out.join("field.nii.gz")).unwrap();
    // the blob moved by (+3, -2) pixels; the field at its centre points there (LPS = pixel axes here)
    let v = (20 * w as usize) + 22;
    let u = field.at(v);
    assert!((u[0] - 3.0).abs() < 1.0 && (u[1] + 2.0).abs() < 1.0, "displacement at the blob {u:?}");
}

#[test]
fn help_lists_every_subcommand_with_examples() {
    let top = ok(&["--help"]);
    for cmd in [
        "register",
        "batch",
        "propagate",
        "features",
        "warp",
        "synth",
        "eval",
        "grid",
        "demo",
        "view",
        "train",
        "segment",
    ] {
        assert!(top.contains(cmd), "--help lacks {cmd}");
        let h = ok(&[cmd, "--help"]);
        assert!(h.contains("Example"), "{cmd} --help has no example");
    }
}

#[test]
fn bad_register_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_pair(dir.path());
    let out = obelisk(&[
        "register",
        "--fixed",
        s(&data.join("nope.nii.gz")),
        "--moving",
        s(&data.join("pair_000_moving.nii.gz")),
        "--out",
        s(&dir.path().join("r")),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.nii.gz") && !err.contains("panicked"), "{err}");
    // a missing label map stops the job before any output is written
    let out = obelisk(&[
        "register",
        "--fixed",
        s(&data.join("pair_000_fixed.nii.gz")),
        "--moving",
        s(&data.join("pair_000_moving.nii.gz")),
        "--fixed-labels",
        s(&dir.path().join("x.png")),
        "--out",
        s(&dir.path().join("r2")),
    ]);
    assert!(!out.status.success());
    assert!(!dir.path().join("r2/field.nii.gz").exists());
}

/// A 10-slice slab cut from pair 0's fixed subject (image and labels), its header moved 150 mm
/// right and 300 mm down (no overlap with the subject at all). Returns (slab, slab labels,
/// whole, whole labels, the shift in LPS mm, the whole image's spacing).
fn slab_case(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf, [f64; 3], [f64; 3]) {
    let data = tiny_pair(dir);
    let whole_path = data.join("pair_000_fixed.nii.gz");
    let whole_labels_path = data.join("pair_000_fixed_labels.nii.gz");
    let whole = io::read_image(&whole_path).unwrap();
    let whole_labels = io::read_label_map(&whole_labels_path).unwrap();
    let [nx, ny, _] = whole.grid.shape();
    let (z0, nz) = (7, 10);
    let shift_lps = [150.0, 0.0, -300.0];
    let mut affine = *whole.grid.affine();
    let start = affine.fixed_view::<3, 3>(0, 0) * nalgebra::Vector3::new(0.0, 0.0, z0 as f64);
    let shift_ras = nalgebra::Vector3::new(-shift_lps[0], -shift_lps[1], shift_lps[2]);
    let origin = affine.fixed_view::<3, 1>(0, 3) + start + shift_ras;
    affine.fixed_view_mut::<3, 1>(0, 3).copy_from(&origin);
    let grid = registration::Grid::new([nx, ny, nz], affine).unwrap();
    let cut = z0 * nx * ny..(z0 + nz) * nx * ny;
    let slab = registration::Volume::new(grid.clone(), 1, whole.data[cut.clone()].to_vec()).unwrap();
    let slab_labels = registration::Labels::new(grid, whole_labels.data[cut].to_vec()).unwrap();
    let slab_path = dir.join("slab.nii.gz");
    let slab_labels_path = dir.join("slab_labels.nii.gz");
    io::write_image(&slab_path, &slab).unwrap();
    io::write_label_map(&slab_labels_path, &slab_labels).unwrap();
    (slab_path, slab_labels_path, whole_path, whole_labels_path, shift_lps, whole.grid.spacing())
}

/// Registers the slab (fixed) and the whole subject (moving) with a few iterations; the JSON
/// summary.
fn register_slab(out: &Path, slab: &Path, whole: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "register",
        "--fixed",
        s(slab),
        "--moving",
        s(whole),
        "--out",
        s(out),
        "--iterations",
        "5",
        "--no-pictures",
        "--json",
    ];
    if !extra.contains(&"--affine-iterations") {
        args.extend_from_slice(&["--affine-iterations", "0"]);
    }
    args.extend_from_slice(extra);
    serde_json::from_str(&ok(&args)).unwrap()
}

/// Issue 9 end to end: the slab is placed by the default `--init search` within a voxel.
#[test]
fn register_places_a_slab_with_an_unrelated_header() {
    let dir = tempfile::tempdir().unwrap();
    let (slab, _, whole, _, shift_lps, spacing) = slab_case(dir.path());
    let summary = register_slab(&dir.path().join("reg_slab"), &slab, &whole, &["--affine-iterations", "20"]);
    let search = &summary["init_search"];
    assert!(search["overlap_fraction"].as_f64().unwrap() > 0.9, "{search}");
    for a in 0..3 {
        // slab point x shows the subject's anatomy at x − shift
        let t = search["translation_mm"][a].as_f64().unwrap();
        assert!((t + shift_lps[a]).abs() <= spacing[a], "axis {a}: {search}");
        // scoring the search's other candidates by the affine stage keeps the right one
        let kept = summary["init_translation_mm"][a].as_f64().unwrap();
        assert!((kept + shift_lps[a]).abs() <= spacing[a], "axis {a}: {summary}");
    }
    // the affine stage arbitrates only between starts the search scored alike (within 1.25× of
    // its best candidate): a wrong start can reach a lower affine loss on a thin slab
    let starts = summary["affine_starts"].as_array().unwrap();
    assert!(starts.len() <= 3, "{summary}");
    let cands = search["candidates"].as_array().unwrap();
    let best = cands[0][1].as_f64().unwrap();
    for st in starts.iter().skip(1) {
        let c = cands.iter().find(|c| c[0] == st["translation_mm"]).expect("a start is a search candidate");
        assert!(c[1].as_f64().unwrap() <= 1.25 * best, "{summary}");
    }
}

/// `--init labels` lines up the shared structures, and Dice is reported over the structures
/// both maps hold, inside the overlap: before (headers: no overlap at all), after the start, after
/// the registration.
#[test]
fn init_labels_and_dice_over_the_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let (slab, slab_labels, whole, whole_labels, shift_lps, spacing) = slab_case(dir.path());
    let err = fails(&[
        "register",
        "--fixed",
        s(&slab),
        "--moving",
        s(&whole),
        "--out",
        s(&dir.path().join("x")),
        "--init",
        "labels",
    ]);
    assert!(err.contains("--init labels needs"), "{err}");
    let labels = ["--fixed-labels", s(&slab_labels), "--moving-labels", s(&whole_labels)];
    let mut extra = vec!["--init", "labels"];
    extra.extend_from_slice(&labels);
    let summary = register_slab(&dir.path().join("reg_labels"), &slab, &whole, &extra);
    let search = &summary["init_search"];
    for a in 0..3 {
        let t = search["translation_mm"][a].as_f64().unwrap();
        assert!((t + shift_lps[a]).abs() <= spacing[a], "axis {a}: {search}");
    }
    assert!(summary["dice_scope"].as_str().unwrap().contains("inside the overlap"), "{summary}");
    assert!(summary["dice_before"].is_null(), "no overlap before: {summary}");
    assert!(summary["dice_after_init"].as_f64().unwrap() > 0.8, "{summary}");
    assert!(summary["metrics"]["mean_dice"].as_f64().unwrap() > 0.7, "{summary}");
    let shared = summary["shared_labels"].as_array().unwrap();
    let in_slab = io::read_label_map(&slab_labels).unwrap().ids();
    assert_eq!(shared.len(), in_slab.len(), "{summary}");
    assert!(summary["overlap_fraction"].as_f64().unwrap() > 0.9, "{summary}");

    // `obelisk eval --moving-labels` counts the same way as the registration's report
    let reg = dir.path().join("reg_labels");
    let eval: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--fixed-labels",
        s(&slab_labels),
        "--warped-labels",
        s(&reg.join("warped_labels.nii.gz")),
        "--field",
        s(&reg.join("field.nii.gz")),
        "--moving-labels",
        s(&whole_labels),
        "--json",
    ]))
    .unwrap();
    let (a, b) = (eval["mean_dice"].as_f64().unwrap(), summary["metrics"]["mean_dice"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-9, "eval {a} vs register {b}");
}

/// The tiny pair's fixed, moving and label files, and `register` on them with `extra` options
/// (`--json` summary parsed).
fn tiny_register(data: &Path) -> impl Fn(&Path, &[&str]) -> serde_json::Value {
    let p = |n: &str| s(&data.join(format!("pair_000_{n}.nii.gz"))).to_string();
    let [fixed, moving, fixed_labels, moving_labels] = ["fixed", "moving", "fixed_labels", "moving_labels"].map(p);
    move |out: &Path, extra: &[&str]| {
        #[rustfmt::skip]
        let mut args = vec!["register", "--fixed", &fixed, "--moving", &moving, "--fixed-labels", &fixed_labels,
            "--moving-labels", &moving_labels, "--out", s(out), "--no-pictures", "--json"];
        args.extend(extra);
        serde_json::from_str::<serde_json::Value>(&ok(&args)).unwrap()
    }
}

/// With no `--model`, `--features obelisk` registers with the model compiled into the binary
/// (the same result as `--model models/default`, byte for byte); `--model DIR` still overrides it.
#[test]
fn obelisk_features_default_to_the_embedded_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_pair(dir.path());
    let p = |n: &str| s(&data.join(format!("pair_000_{n}.nii.gz"))).to_string();
    let [fixed, moving] = ["fixed", "moving"].map(p);
    let reg = tiny_register(&data);
    let register =
        |out: &Path, extra: &[&str]| reg(out, &[&["--features", "obelisk", "--iterations", "10"], extra].concat());
    let (embedded, folder) = (dir.path().join("embedded"), dir.path().join("folder"));
    let summary = register(&embedded, &[]);
    assert_eq!(summary["features"], "obelisk");
    assert_eq!(summary["model"], "embedded default model");
    assert!(summary["metrics"]["mean_dice"].as_f64().unwrap() > 0.3, "{summary}");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
    let summary = register(&folder, &["--model", s(&models)]);
    assert_eq!(summary["model"].as_str(), Some(s(&models)));
    let field = std::fs::read(embedded.join("field.nii.gz")).unwrap();
    assert_eq!(field, std::fs::read(folder.join("field.nii.gz")).unwrap(), "embedded model != models/default");

    // the paper's exact form: the moving image through the feature layer at the sampled points
    let exact = dir.path().join("exact");
    let summary = register(&exact, &["--exact"]);
    assert_eq!(summary["exact"], true, "{summary}");
    assert!(summary["metrics"]["mean_dice"].as_f64().unwrap() > 0.3, "{summary}");
    assert_ne!(field, std::fs::read(exact.join("field.nii.gz")).unwrap(), "--exact changed nothing");
    #[rustfmt::skip]
    let err = fails(&["register", "--fixed", &fixed, "--moving", &moving, "--exact", "--out",
        s(&dir.path().join("reg3"))]);
    assert!(err.contains("--exact needs --features obelisk"), "{err}");

    let missing = dir.path().join("no_model");
    #[rustfmt::skip]
    let err = fails(&["register", "--fixed", &fixed, "--moving", &moving, "--features", "obelisk", "--model",
        s(&missing), "--out", s(&dir.path().join("reg2"))]);
    assert!(err.contains("no_model") && err.contains("not found"), "{err}");
}

/// The README's main job: a seeded pair registered end to end, every output written, the
/// summary on stdout as JSON, and Dice improved by the registration.
#[test]
fn demo_writes_every_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let summary = ok_json(&["demo", "--out", s(&out)]);
    let reg = out.join("registration");
    for f in ["field.nii.gz", "warped.nii.gz", "warped_labels.nii.gz", "metrics.json", "loss.csv", "summary.png"] {
        assert!(reg.join(f).is_file(), "{f} missing");
    }
    let (before, after) = (summary["dice_before"].as_f64().unwrap(), summary["metrics"]["mean_dice"].as_f64().unwrap());
    assert!(after > before + 0.02, "Dice {before} -> {after}");
    let err = fails(&["demo", "--out", s(&out)]);
    assert!(err.contains("already exists"), "{err}");
}

/// Stores a volume's voxels in LPS order (x and y reversed, the header adjusted): the same image
/// in the world, as scanners and ITK write it.
fn to_lps<T: Copy>(grid: &registration::Grid, data: &[T]) -> (registration::Grid, Vec<T>) {
    let [nx, ny, nz] = grid.shape();
    let mut flip = nalgebra::Matrix4::identity();
    flip[(0, 0)] = -1.0;
    flip[(1, 1)] = -1.0;
    flip[(0, 3)] = (nx - 1) as f64;
    flip[(1, 3)] = (ny - 1) as f64;
    let g = registration::Grid::new([nx, ny, nz], grid.affine() * flip).unwrap();
    let mut out = Vec::with_capacity(data.len());
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                out.push(data[(k * ny + (ny - 1 - j)) * nx + (nx - 1 - i)]);
            }
        }
    }
    (g, out)
}

/// The voxel order a file is stored in does not change the registration: MIND-SSC's channels
/// refer to voxel directions, so the features of an LPS-stored moving image are computed in RAS
/// order like the fixed image's. (Compared raw, the two would pair mismatched channels: on the
/// TotalSegmentator pairs that lowered Dice from 0.39 to 0.29 instead of raising it to 0.51.)
#[test]
fn lps_stored_moving_image_registers_like_the_ras_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_pair(dir.path());
    let p = |n: &str| data.join(format!("pair_000_{n}.nii.gz"));
    let moving = io::read_image(&p("moving")).unwrap();
    let labels = io::read_label_map(&p("moving_labels")).unwrap();
    let (g, v) = to_lps(&moving.grid, &moving.data);
    let (gl, l) = to_lps(&labels.grid, &labels.data);
    let (lps, lps_labels) = (dir.path().join("moving_lps.nii.gz"), dir.path().join("moving_lps_labels.nii.gz"));
    io::write_image(&lps, &registration::Volume::new(g, 1, v).unwrap()).unwrap();
    io::write_label_map(&lps_labels, &registration::Labels::new(gl, l).unwrap()).unwrap();
    let (fixed, fixed_labels) = (p("fixed"), p("fixed_labels"));
    let run = |out: &str, m: &Path, ml: &Path| {
        let out = dir.path().join(out);
        #[rustfmt::skip]
        let args = ["register", "--fixed", s(&fixed), "--moving", s(m), "--fixed-labels", s(&fixed_labels),
            "--moving-labels", s(ml), "--out", s(&out), "--iterations", "15", "--affine-iterations", "5",
            "--no-pictures"];
        ok_json(&args)
    };
    let ras = run("ras", &p("moving"), &p("moving_labels"));
    let lps = run("lps", &lps, &lps_labels);
    let dice = |s: &serde_json::Value| s["metrics"]["mean_dice"].as_f64().unwrap();
    assert!((dice(&ras) - dice(&lps)).abs() < 1e-3, "RAS {} vs LPS {}", dice(&ras), dice(&lps));
    assert_eq!(ras["init_search"]["translation_mm"], lps["init_search"]["translation_mm"]);
}

/// `--fixed-mask` / `--moving-mask`: the coverage is reported, a mask over the whole image
/// registers exactly as no mask, a mask of part of the fixed image changes the result, and a
/// mask that is empty, unreadable or of the wrong dimensionality stops the job before any
/// output, naming the mask.
#[test]
fn metric_masks() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_pair(dir.path());
    let (fixed, moving) = (data.join("pair_000_fixed.nii.gz"), data.join("pair_000_moving.nii.gz"));
    let img = io::read_image(&fixed).unwrap();
    let n = img.grid.num_voxels();
    let write = |name: &str, f: &dyn Fn(usize) -> f32| {
        let p = dir.path().join(name);
        io::write_volume(&p, &registration::Volume::new(img.grid.clone(), 1, (0..n).map(f).collect()).unwrap())
            .unwrap();
        p
    };
    let full = write("full.nii.gz", &|_| 1.0);
    let half = write("half.nii.gz", &|v| (v % 24 < 12) as u8 as f32);
    let empty = write("empty.nii.gz", &|_| 0.0);
    let run = |out: &str, extra: &[&str]| {
        let o = dir.path().join(out);
        let mut a = vec!["register", "--fixed", s(&fixed), "--moving", s(&moving), "--out", s(&o), "--no-pictures"];
        a.extend_from_slice(extra);
        let j = ok_json(&a);
        (std::fs::read(o.join("field.nii.gz")).unwrap(), j)
    };
    let (plain, _) = run("plain", &[]);
    let (whole, j) = run("whole", &["--fixed-mask", s(&full), "--moving-mask", s(&full)]);
    assert_eq!(j["fixed_mask_coverage"].as_f64(), Some(1.0));
    assert_eq!(plain, whole, "a mask over everything changes nothing");
    let (halved, j) = run("half", &["--fixed-mask", s(&half)]);
    let c = j["fixed_mask_coverage"].as_f64().unwrap();
    assert!((c - 0.5).abs() < 0.01, "coverage {c}");
    assert!(j["moving_mask_coverage"].is_null());
    assert_ne!(plain, halved, "half a mask changes the field");

    let png = dir.path().join("m.png");
    image::GrayImage::from_pixel(4, 4, image::Luma([255])).save(&png).unwrap();
    for (mask, expect) in [(&empty, "holds no voxel"), (&png, "2D mask"), (&dir.path().join("no.nii.gz"), "not found")]
    {
        let out = dir.path().join("bad");
        let err = fails(&[
            "register",
            "--fixed",
            s(&fixed),
            "--moving",
            s(&moving),
            "--out",
            s(&out),
            "--moving-mask",
            s(mask),
        ]);
        assert!(err.contains(s(mask)) && err.contains(expect) && !err.contains("panicked"), "{err}");
        assert!(!out.join("field.nii.gz").exists());
    }
}

/// `--method FILE.json`: the configuration metrics.json records reproduces the run, a partial
/// file keeps the defaults of the keys it leaves out, and a bad file is refused by name.
#[test]
fn method_file_round_trips_through_metrics_json() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_pair(dir.path());
    let (fixed, moving) = (data.join("pair_000_fixed.nii.gz"), data.join("pair_000_moving.nii.gz"));
    let run = |out: &str, extra: &[&str]| {
        let o = dir.path().join(out);
        let mut a = vec!["register", "--fixed", s(&fixed), "--moving", s(&moving), "--out", s(&o), "--no-pictures"];
        a.extend_from_slice(extra);
        let j = ok_json(&a);
        (std::fs::read(o.join("field.nii.gz")).unwrap(), j)
    };
    let (plain, j) = run("plain", &["--smoothness", "2"]);
    let recorded = dir.path().join("recorded.json");
    std::fs::write(&recorded, serde_json::to_string(&j["config"]).unwrap()).unwrap();
    let (again, _) = run("again", &["--method", s(&recorded)]);
    assert_eq!(plain, again, "metrics.json's config reproduces the field");
    let partial = dir.path().join("partial.json");
    std::fs::write(&partial, r#"{"smoothness": 2.0}"#).unwrap();
    let (p, jp) = run("partial", &["--method", s(&partial)]);
    assert_eq!(plain, p);
    assert_eq!(jp["config"], j["config"]);

    let bad = dir.path().join("bad.json");
    for (text, expect) in
        [(r#"{"smoothnes": 2.0}"#, "unknown field"), (r#"{"affine_shrink": 0}"#, "at least 1"), ("[", "not a method")]
    {
        std::fs::write(&bad, text).unwrap();
        let o = dir.path().join("bad");
        let err =
            fails(&["register", "--fixed", s(&fixed), "--moving", s(&moving), "--out", s(&o), "--method", s(&bad)]);
        assert!(err.contains(s(&bad)) && err.contains(expect) && !err.contains("panicked"), "{err}");
        assert!(!o.join("field.nii.gz").exists());
    }
    let err = fails(&[
        "register",
        "--fixed",
        s(&fixed),
        "--moving",
        s(&moving),
        "--out",
        s(&dir.path().join("c")),
        "--method",
        s(&partial),
        "--smoothness",
        "3",
    ]);
    assert!(err.contains("cannot be used with"), "{err}");
}

/// The default `--similarity auto` compares intensities by NCC (with the full-resolution level)
/// on a pair of one contrast, and the MIND-SSC features on the same pair with the moving
/// image in a non-monotonic, MR-like contrast; metrics.json records
/// the measure and the choice, and its config the similarity that ran.
#[test]
fn similarity_auto_chooses_by_linearity() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_pair(dir.path());
    let moving = data.join("pair_000_moving.nii.gz");
    let mut folded = obelisk::io::read_image(&moving).unwrap();
    // an MR-like contrast of the CT phantom (HU): air dark, fat brightest, soft tissue mid, bone dark
    for v in folded.data.iter_mut() {
        *v = match *v {
            x if x < -500.0 => 0.0,
            x if x < -30.0 => 1.0,
            x if x < 150.0 => 0.5,
            _ => 0.1,
        };
    }
    let folded_path = data.join("pair_000_folded.nii.gz");
    obelisk::io::write_image(&folded_path, &folded).unwrap();
    let p = |n: &str| s(&data.join(format!("pair_000_{n}.nii.gz"))).to_string();
    let [fixed, moving, folded] = ["fixed", "moving", "folded"].map(p);
    let run = |name: &str, moving: &str| -> serde_json::Value {
        let out = dir.path().join(name);
        ok(&[
            "register",
            "--fixed",
            &fixed,
            "--moving",
            moving,
            "--out",
            s(&out),
            "--no-pictures",
            "--iterations",
            "10",
        ]);
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap()
    };
    let stages =
        |m: &serde_json::Value| m["stages"].as_array().unwrap().iter().filter(|s| s["name"] == "deformable-3").count();
    let same = run("same", &moving);
    assert_eq!(same["similarity"]["chosen"]["kind"], "ncc", "{}", same["similarity"]);
    assert!(same["similarity"]["linearity"].as_f64().unwrap() > 0.9, "{}", same["similarity"]);
    assert_eq!(same["config"]["similarity"]["kind"], "ncc");
    assert_eq!(stages(&same), 1, "the full-resolution level runs with NCC");
    let other = run("folded", &folded);
    assert_eq!(other["similarity"]["chosen"]["kind"], "l1", "{}", other["similarity"]);
    assert!(other["similarity"]["linearity"].as_f64().unwrap() < 0.75, "{}", other["similarity"]);
    assert_eq!(other["config"]["similarity"]["kind"], "l1");
    assert_eq!(stages(&other), 0, "no full-resolution level with the features");
}

/// `--similarity ncc` and `l1+ncc` register (recorded in metrics.json's config, reruns
/// byte-identical), and so does the shipped full-resolution preset; `--exact` beside NCC and a zero window are refused.
#[test]
fn similarity_option_runs_ncc() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_pair(dir.path());
    let p = |n: &str| s(&data.join(format!("pair_000_{n}.nii.gz"))).to_string();
    let [fixed, moving] = ["fixed", "moving"].map(p);
    let reg = tiny_register(&data);
    let register = |out: &Path, extra: &[&str]| reg(out, &[&["--iterations", "20"], extra].concat());
    for (name, kind) in [("ncc", 0.0), ("l1+ncc", 1.0)] {
        let out = dir.path().join(name.replace('+', "_"));
        let summary = register(&out, &["--similarity", name, "--ncc-radius", "1"]);
        let metrics: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
        let sim = &metrics["config"]["similarity"];
        assert_eq!(sim["kind"], "ncc", "{sim}");
        assert_eq!(sim["radius"], 1, "{sim}");
        assert_eq!(sim["features"].as_f64(), Some(kind), "{sim}");
        // the 14 mm pair starts at Dice 0.91 and leaves NCC windows a few voxels: it must not
        // break, accuracy is the library test's
        let after = summary["metrics"]["mean_dice"].as_f64().unwrap();
        assert!(after > 0.85, "{name}: Dice {after}");
        let again = dir.path().join(format!("{}_again", name.replace('+', "_")));
        register(&again, &["--similarity", name, "--ncc-radius", "1"]);
        assert_eq!(
            std::fs::read(out.join("field.nii.gz")).unwrap(),
            std::fs::read(again.join("field.nii.gz")).unwrap(),
            "{name}: reruns differ"
        );
    }
    // the shipped full-resolution preset, as the README gives it
    let preset = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/methods/ncc-full-resolution.json");
    let out = dir.path().join("preset");
    register(&out, &["--method", s(&preset)]);
    let metrics: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["config"]["similarity"]["kind"], "ncc");
    assert_eq!(metrics["config"]["levels"].as_array().map(Vec::len), Some(3));
    assert_eq!(metrics["stages"].as_array().unwrap().iter().filter(|s| s["name"] == "deformable-3").count(), 1);
    #[rustfmt::skip]
    let err = fails(&["register", "--fixed", &fixed, "--moving", &moving, "--features", "obelisk", "--exact",
        "--similarity", "ncc", "--out", s(&dir.path().join("bad"))]);
    assert!(err.contains("--similarity l1"), "{err}");
    #[rustfmt::skip]
    let err = fails(&["register", "--fixed", &fixed, "--moving", &moving, "--similarity", "ncc", "--ncc-radius",
        "0", "--out", s(&dir.path().join("bad2"))]);
    assert!(err.contains("--ncc-radius"), "{err}");
}
