//! `obelisk batch`: the same outputs as `register`, resumable after a kill, shards that partition
//! the pairs, failures that stop only their pair, and atlas features computed once without
//! changing a byte.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{fails, obelisk, ok, ok_json, s};
use serde_json::Value;

/// Registration options that keep each pair under a second; the tests compare runs made with
/// the same options, so fewer iterations lose nothing.
const FAST: [&str; 5] = ["--no-pictures", "--iterations", "8", "--threads", "2"];

/// `subjects` phantoms and `pairs` pairs of 24³ voxels in `dir/data`.
fn cohort(dir: &Path, subjects: usize, pairs: usize) -> PathBuf {
    let data = dir.join("data");
    #[rustfmt::skip]
    ok(&["synth", "--out", s(&data), "--subjects", &subjects.to_string(), "--pairs", &pairs.to_string(),
        "--size", "24,24,24", "--spacing", "14,14,14", "--seed", "3", "--quiet"]);
    data
}

/// A pair CSV in `data` (paths relative to it) with a row per (name, fixed, moving) file stems.
fn pairs_csv(data: &Path, file: &str, rows: &[(&str, &str, &str)]) -> PathBuf {
    let mut text = String::from("name,fixed,moving\n");
    for (name, f, m) in rows {
        text.push_str(&format!("{name},{f}.nii.gz,{m}.nii.gz\n"));
    }
    let path = data.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

/// The synthetic pairs with their labels and truth fields, as a CSV.
fn synth_pairs_csv(data: &Path, n: usize) -> PathBuf {
    let mut text = String::from("fixed,moving,fixed_labels,moving_labels,truth,name\n");
    for i in 0..n {
        let p = format!("pair_{i:03}");
        text.push_str(&format!(
            "{p}_fixed.nii.gz,{p}_moving.nii.gz,{p}_fixed_labels.nii.gz,{p}_moving_labels.nii.gz,{p}_truth.nii.gz,p{i}\n"
        ));
    }
    let path = data.join("pairs.csv");
    std::fs::write(&path, text).unwrap();
    path
}

/// A temporary folder with `n` synthetic pairs listed in a CSV: (folder, data, CSV, output).
fn synth_batch(n: usize) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = cohort(dir.path(), 1, n);
    let csv = synth_pairs_csv(&data, n);
    let out = dir.path().join("out");
    (dir, data, csv, out)
}

fn batch(list: &Path, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["batch", s(list), "--out", s(out)];
    args.extend(FAST);
    args.extend(extra);
    ok_json(&args)
}

/// Pair name → status in a summary.
fn statuses(summary: &Value) -> BTreeMap<String, String> {
    summary["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["status"].as_str().unwrap().to_string()))
        .collect()
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn batch_writes_what_register_writes_byte_for_byte() {
    let (dir, data, csv, out) = synth_batch(3);
    let summary = batch(&csv, &out, &[]);
    assert_eq!((summary["done"].as_u64(), summary["failed"].as_u64()), (Some(3), Some(0)), "{summary}");
    assert!(summary["shared_features"].is_null());
    let on_disk: Value = serde_json::from_slice(&std::fs::read(out.join("batch.json")).unwrap()).unwrap();
    assert_eq!(statuses(&on_disk), statuses(&summary));
    let csv_summary = std::fs::read_to_string(out.join("batch.csv")).unwrap();
    assert_eq!(csv_summary.lines().count(), 4, "{csv_summary}");
    for i in 0..3 {
        let p = format!("pair_{i:03}");
        let pair_out = out.join(format!("p{i}"));
        let reg = dir.path().join(format!("reg{i}"));
        let f = |n: &str| data.join(format!("{p}_{n}.nii.gz")).to_string_lossy().into_owned();
        let [fixed, moving, fixed_labels, moving_labels, truth] =
            ["fixed", "moving", "fixed_labels", "moving_labels", "truth"].map(f);
        #[rustfmt::skip]
        let mut args = vec!["register", "--fixed", &fixed, "--moving", &moving, "--fixed-labels", &fixed_labels,
            "--moving-labels", &moving_labels, "--truth", &truth, "--out", s(&reg), "--quiet"];
        args.extend(FAST);
        ok(&args);
        for file in ["field.nii.gz", "warped.nii.gz", "warped_labels.nii.gz", "transform.h5", "affine.tfm"] {
            assert!(
                std::fs::read(reg.join(file)).unwrap() == std::fs::read(pair_out.join(file)).unwrap(),
                "{p}: {file} differs from register's"
            );
        }
        let metrics: Value = serde_json::from_slice(&std::fs::read(pair_out.join("metrics.json")).unwrap()).unwrap();
        let row = &summary["pairs"][i];
        assert_eq!(row["mean_dice"], metrics["metrics"]["mean_dice"]);
        assert_eq!(row["endpoint_error_mm"], metrics["metrics"]["endpoint_error"]["mean_mm"]);
        assert!(pair_out.join("done.json").is_file());
    }
}

#[test]
fn killed_batch_resumes_with_only_the_unfinished_pairs() {
    let (_dir, _, csv, out) = synth_batch(4);
    // full iterations: each pair takes long enough to be caught halfway
    let mut child = Command::new(env!("CARGO_BIN_EXE_obelisk"))
        .args(["batch", s(&csv), "--out", s(&out), "--no-pictures", "--threads", "2", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = out.join("p0/done.json");
    let t = Instant::now();
    while !first.exists() && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let finished: Vec<String> =
        (0..4).map(|i| format!("p{i}")).filter(|p| out.join(p).join("done.json").exists()).collect();
    assert!(finished.contains(&"p0".to_string()), "the first pair finished before the kill");
    assert!(finished.len() < 4, "the kill came too late to interrupt the batch: {finished:?}");
    let stamps: Vec<SystemTime> = finished.iter().map(|p| mtime(&out.join(p).join("field.nii.gz"))).collect();

    let mut args = vec!["batch", s(&csv), "--out", s(&out), "--no-pictures", "--threads", "2"];
    let summary = ok_json(&args);
    for (name, status) in statuses(&summary) {
        let want = if finished.contains(&name) { "skipped" } else { "done" };
        assert_eq!(status, want, "{name}: {summary}");
        assert!(out.join(&name).join("done.json").is_file());
    }
    for (p, t) in finished.iter().zip(&stamps) {
        assert_eq!(mtime(&out.join(p).join("field.nii.gz")), *t, "{p} was written again");
    }
    // a pair whose marker is gone counts as unfinished and is the only one redone
    std::fs::remove_file(out.join("p2/done.json")).unwrap();
    let summary = ok_json(&args);
    let redone: Vec<String> = statuses(&summary).into_iter().filter(|(_, s)| s == "done").map(|(n, _)| n).collect();
    assert_eq!(redone, ["p2"]);
    // other settings than the outputs were made with are refused, unless --force redoes them
    args.extend(["--iterations", "8"]);
    let err = fails(&args);
    assert!(err.contains("pairs.csv: line 2:") && err.contains("other settings") && err.contains("--force"), "{err}");
    args.push("--force");
    let summary = ok_json(&args);
    assert_eq!(summary["done"].as_u64(), Some(4), "{summary}");
}

#[test]
fn shards_partition_the_pairs_and_slurm_arrays_pick_the_same() {
    let (_dir, _, csv, out) = synth_batch(3);
    let one = batch(&csv, &out, &["--shard", "1/2"]);
    let two = batch(&csv, &out, &["--shard", "2/2"]);
    let (a, b) = (statuses(&one), statuses(&two));
    assert_eq!(a.keys().collect::<Vec<_>>(), ["p0", "p2"]);
    assert_eq!(b.keys().collect::<Vec<_>>(), ["p1"]);
    assert!(a.values().chain(b.values()).all(|s| s == "done"));
    assert!(out.join("batch.shard-1-of-2.json").is_file() && out.join("batch.shard-2-of-2.json").is_file());
    assert!(!out.join("batch.json").exists());
    // array tasks 0 and 1 (--array=0-1), and 5 and 6 (--array=5-6), are shards 1/2 and 2/2
    for (id, min, shard) in [("0", "0", &a), ("1", "0", &b), ("5", "5", &a), ("6", "5", &b)] {
        let mut args = vec!["batch", s(&csv), "--out", s(&out), "--json"];
        args.extend(FAST);
        let run = Command::new(env!("CARGO_BIN_EXE_obelisk"))
            .args(&args)
            .env("SLURM_ARRAY_TASK_ID", id)
            .env("SLURM_ARRAY_TASK_COUNT", "2")
            .env("SLURM_ARRAY_TASK_MIN", min)
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let v: Value = serde_json::from_slice(&run.stdout).unwrap();
        assert_eq!(v["shard_source"], "slurm");
        let got = statuses(&v);
        assert_eq!(got.keys().collect::<Vec<_>>(), shard.keys().collect::<Vec<_>>(), "task {id} from {min}");
        assert!(got.values().all(|s| s == "skipped"), "task {id}: {v}");
    }
}

#[test]
fn a_failing_pair_fails_the_batch_but_not_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let data = cohort(dir.path(), 1, 3);
    let csv = synth_pairs_csv(&data, 3);
    // a download cut short: the header reads, the voxel data ends early
    let broken = data.join("pair_001_moving.nii.gz");
    let bytes = std::fs::read(&broken).unwrap();
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("out");
    let mut args = vec!["batch", s(&csv), "--out", s(&out), "--json"];
    args.extend(FAST);
    let run = obelisk(&args);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("1 of 3 pairs failed") && !err.contains("panicked"), "{err}");
    let summary: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(
        statuses(&summary),
        BTreeMap::from([("p0".into(), "done".into()), ("p1".into(), "failed".into()), ("p2".into(), "done".into())])
    );
    let why = summary["pairs"][1]["error"].as_str().unwrap();
    assert!(why.contains("pair_001_moving.nii.gz") && why.contains("line 3"), "{why}");
    assert!(!out.join("p1/done.json").exists() && out.join("p2/done.json").is_file());
    let csv_summary = std::fs::read_to_string(out.join("batch.csv")).unwrap();
    assert!(csv_summary.contains("1,p1,failed,") && csv_summary.contains("pair_001_moving.nii.gz"), "{csv_summary}");
    // a rerun retries the failed pair only
    let run = obelisk(&args);
    assert_eq!(run.status.code(), Some(1));
    let summary: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(statuses(&summary)["p0"], "skipped");
    assert_eq!(statuses(&summary)["p1"], "failed");
}

/// Every file of `a`'s pair folders equals `b`'s, except the ones that hold run times.
fn same_outputs(a: &Path, b: &Path, names: &[&str]) {
    for n in names {
        for file in ["field.nii.gz", "warped.nii.gz", "transform.h5", "affine.mat", "loss.csv"] {
            let (x, y) = (a.join(n).join(file), b.join(n).join(file));
            assert!(
                std::fs::read(&x).unwrap() == std::fs::read(&y).unwrap(),
                "{} differs from {}",
                x.display(),
                y.display()
            );
        }
    }
}

#[test]
fn atlas_features_are_computed_once_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = cohort(dir.path(), 4, 0);
    // an atlas registered to a cohort: the same moving image everywhere
    let rows = [
        ("a1", "subject_001_image", "subject_000_image"),
        ("a2", "subject_002_image", "subject_000_image"),
        ("a3", "subject_003_image", "subject_000_image"),
    ];
    let to_cohort = pairs_csv(&data, "atlas.csv", &rows);
    let shared = batch(&to_cohort, &dir.path().join("shared"), &[]);
    assert_eq!(shared["shared_features"]["role"], "moving", "{shared}");
    assert_eq!(shared["shared_features"]["extractions"], 1);
    let apart = batch(&to_cohort, &dir.path().join("apart"), &["--no-shared-features"]);
    assert!(apart["shared_features"].is_null());
    same_outputs(&dir.path().join("shared"), &dir.path().join("apart"), &["a1", "a2", "a3"]);
    // a cohort registered to an atlas: the same fixed image
    let rows = [("c1", "subject_000_image", "subject_001_image"), ("c2", "subject_000_image", "subject_002_image")];
    let to_atlas = pairs_csv(&data, "cohort.csv", &rows);
    let shared = batch(&to_atlas, &dir.path().join("shared_fixed"), &[]);
    assert_eq!(shared["shared_features"]["role"], "fixed", "{shared}");
    batch(&to_atlas, &dir.path().join("apart_fixed"), &["--no-shared-features"]);
    same_outputs(&dir.path().join("shared_fixed"), &dir.path().join("apart_fixed"), &["c1", "c2"]);
}

#[test]
fn bad_lists_fail_before_any_work_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = cohort(dir.path(), 2, 0);
    let out = dir.path().join("out");
    let write = |name: &str, text: &str| {
        let p = data.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let try_list = |list: &Path, want: &[&str]| {
        let err = fails(&["batch", s(list), "--out", s(&out)]);
        for w in want {
            assert!(err.contains(w), "{}: {err} lacks {w:?}", list.display());
        }
        assert!(!err.contains("panicked"), "{err}");
        // nothing was registered
        let pairs = std::fs::read_dir(&out).map(|d| d.flatten().filter(|e| e.path().is_dir()).count()).unwrap_or(0);
        assert_eq!(pairs, 0, "{}: a pair folder was made", list.display());
    };
    let good = "subject_000_image.nii.gz,subject_001_image.nii.gz";
    let list = write("no_moving.csv", "fixed,labels\nsubject_000_image.nii.gz,x\n");
    try_list(&list, &["no_moving.csv: line 1: unknown column \"labels\""]);
    let list = write("no_moving2.csv", "fixed,name\nsubject_000_image.nii.gz,x\n");
    try_list(&list, &["no_moving2.csv: line 1:", "no \"moving\" column"]);
    let list = write("missing.csv", &format!("fixed,moving\n{good}\nsubject_000_image.nii.gz,gone.nii.gz\n"));
    try_list(&list, &["missing.csv: line 3: moving:", "gone.nii.gz: file not found"]);
    let list = write("short.csv", &format!("fixed,moving\n{good}\n\nsubject_001_image.nii.gz\n"));
    try_list(&list, &["short.csv: line 4: 1 cells, but the header names 2 columns"]);
    let list = write("twice.csv", &format!("fixed,moving,name\n{good},x\n{good},x\n"));
    try_list(&list, &["twice.csv: line 3: pair name \"x\" is also the name of line 2"]);
    let list = write("unreadable.csv", "fixed,moving\nsubject_000_image.nii.gz,unreadable.csv\n");
    try_list(&list, &["unreadable.csv: line 2: moving:", "unknown file type"]);
    std::fs::write(data.join("empty.nii.gz"), b"").unwrap();
    let list = write("empty.csv", &format!("fixed,moving\n{good}\nsubject_000_image.nii.gz,empty.nii.gz\n"));
    try_list(&list, &["empty.csv: line 3: moving:", "empty.nii.gz"]);
    let list =
        write("d.json", r#"{"registration_val": [{"fixed": "subject_000_image.nii.gz", "moving": "nope.nii.gz"}]}"#);
    try_list(&list, &["d.json: registration_val[0]: moving:", "nope.nii.gz: file not found"]);
    // synth without --pairs lists subjects only
    try_list(&data.join("dataset.json"), &["no pairs under \"registration_val\""]);
    let list = write("unlabelled.csv", &format!("fixed,moving\n{good}\n"));
    let err = fails(&["batch", s(&list), "--out", s(&out), "--init", "labels"]);
    assert!(err.contains("unlabelled.csv: line 2: --init labels needs"), "{err}");
    let err = fails(&["batch", s(&data.join("nothing.csv")), "--out", s(&out)]);
    assert!(err.contains("nothing.csv: file not found"), "{err}");
    let err = fails(&["batch", s(&list), "--out", s(&out), "--shard", "3/2"]);
    assert!(err.contains("--shard"), "{err}");
}
