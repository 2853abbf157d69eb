//! Same inputs, `--seed` and `--threads` → byte-identical outputs, for every command that makes
//! data. The only exception are the wall-clock timings recorded in metrics.json and cv.json,
//! which are removed before comparing.

mod common;

use std::path::Path;

use common::{ok, s};

/// Every file under `dir`, relative name → bytes (JSON with its timing fields removed).
fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&p).unwrap();
        let bytes = if name.ends_with(".json") { without_timings(&bytes) } else { bytes };
        out.push((name, bytes));
    }
    out.sort();
    out
}

fn without_timings(json: &[u8]) -> Vec<u8> {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("runtime_s");
                m.remove("seconds");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v: serde_json::Value = serde_json::from_slice(json).unwrap();
    strip(&mut v);
    serde_json::to_vec(&v).unwrap()
}

fn same(a: &Path, b: &Path) {
    let (x, y) = (contents(a), contents(b));
    assert_eq!(x.iter().map(|e| &e.0).collect::<Vec<_>>(), y.iter().map(|e| &e.0).collect::<Vec<_>>());
    for ((name, p), (_, q)) in x.iter().zip(&y) {
        assert!(p == q, "{name} differs between {} and {}", a.display(), b.display());
    }
}

fn synth(out: &Path, threads: &str, subjects: &str) {
    #[rustfmt::skip]
    ok(&["--threads", threads, "--quiet", "synth", "--out", s(out), "--subjects", subjects, "--pairs", "1",
         "--size", "24,24,24", "--spacing", "12,12,12", "--seed", "9"]);
}

#[test]
fn synth_is_deterministic_across_thread_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    synth(&a, "1", "2");
    synth(&b, "2", "2");
    same(&a, &b);
}

#[test]
fn register_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synth(&data, "2", "1");
    // every run writes to the same folder, then moves it aside: metrics.json records the paths
    let out = dir.path().join("out");
    let run = |name: &str, threads: &str| {
        #[rustfmt::skip]
        ok(&["--threads", threads, "--quiet", "register",
             "--fixed", s(&data.join("pair_000_fixed.nii.gz")), "--moving", s(&data.join("pair_000_moving.nii.gz")),
             "--fixed-labels", s(&data.join("pair_000_fixed_labels.nii.gz")),
             "--moving-labels", s(&data.join("pair_000_moving_labels.nii.gz")),
             "--out", s(&out), "--iterations", "8", "--affine-iterations", "4"]);
        let kept = dir.path().join(name);
        std::fs::rename(&out, &kept).unwrap();
        kept
    };
    let a = run("a", "2");
    let b = run("b", "2");
    same(&a, &b);
    let c = run("c", "1");
    same(&a, &c);
}

#[test]
fn train_and_segment_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synth(&data, "2", "2");
    let ds = data.join("dataset.json");
    let image = data.join("subject_000_image.nii.gz");
    let run = |name: &str, threads: &str| {
        let model = dir.path().join(format!("model_{name}"));
        #[rustfmt::skip]
        ok(&["--threads", threads, "--quiet", "train", "--dataset", s(&ds), "--out", s(&model),
             "--iterations", "4", "--seed", "11", "--folds", "2"]);
        let seg = dir.path().join(format!("seg_{name}"));
        std::fs::create_dir(&seg).unwrap();
        #[rustfmt::skip]
        ok(&["--threads", threads, "--quiet", "segment", "--model", s(&model), "--image", s(&image),
             "--out", s(&seg.join("labels.nii.gz"))]);
        (model, seg)
    };
    let (ma, sa) = run("a", "2");
    let (mb, sb) = run("b", "2");
    same(&ma, &mb);
    same(&sa, &sb);
    let (mc, sc) = run("c", "1");
    same(&ma, &mc);
    same(&sa, &sc);
}
