//! Smoke run of the peer benchmark (`data-scripts/bench/run_bench.py --smoke`): one tiny synthetic
//! pair, obelisk (MIND-SSC, intensity) and SimpleITK demons, every field evaluated by
//! `obelisk warp` + `obelisk eval`.
//!
//! Needs a Python with SimpleITK, numpy and nibabel: `$OBELISK_PYTHON`, else `.venv/bin/python`
//! (made by `data-scripts/setup-venv.sh`). Without one the test prints SKIPPED, unless
//! `OBELISK_REQUIRE_PYTHON=1` (CI), where it fails.

mod common;

use std::path::Path;
use std::process::Command;

use common::python;
use serde_json::Value;

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// Runs `run_bench.py --smoke EXTRA...` into a temporary folder; returns it and results.json.
fn smoke(python: &Path, extra: &[&str]) -> (tempfile::TempDir, Value) {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("data-scripts/bench/run_bench.py");
    let out = Command::new(python)
        .arg(script)
        .args(["--smoke", "--obelisk", env!("CARGO_BIN_EXE_obelisk"), "--out"])
        .arg(dir.path())
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "run_bench.py --smoke {extra:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Value = serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
    (dir, results)
}

#[test]
fn smoke_benchmark_evaluates_every_tool_alike() {
    let Some(python) = python() else { return };
    let (dir, results) = smoke(&python, &[]);
    let rows = results["registration"]["rows"].as_array().unwrap();
    let row = |tool: &str| {
        rows.iter().find(|r| r["tool"] == tool).unwrap_or_else(|| panic!("no row for {tool} in {rows:?}")).clone()
    };
    let identity = num(&row("identity"), "mean_dice");
    let truth = row("truth");
    // the evaluation itself: the true field must beat the identity by a clear margin and match
    // itself exactly, or the warp/eval chain (or a field convention) is broken
    assert!(num(&truth, "mean_dice") > identity + 0.05, "truth {truth} vs identity {identity}");
    assert!(num(&truth, "epe_mean_mm") < 1e-3, "{truth}");
    for tool in ["obelisk-mind", "obelisk-intensity", "sitk-demons"] {
        let r = row(tool);
        assert_eq!(r["status"], "ok", "{r}");
        assert!(num(&r, "wall_s") > 0.0 && num(&r, "peak_rss_mb") > 1.0, "{r}");
        assert!(num(&r, "epe_mean_mm").is_finite() && num(&r, "sd_log_j").is_finite(), "{r}");
        assert!((0.0..=100.0).contains(&num(&r, "overlap_percent")), "{r}");
        // every tool registers the pair at least roughly: a field in the wrong convention
        // (e.g. RAS instead of LPS) would land below the identity
        assert!(num(&r, "mean_dice") > identity, "{tool}: {r} vs identity {identity}");
    }
    let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    assert!(md.contains("| obelisk-mind |") && md.contains("| sitk-demons |"), "{md}");
}

/// `--start labels`: the label start is computed, evaluated as its own reference row, and handed
/// to every tool (obelisk `--init labels`, sitk-demons `--init-translation`), which must not end
/// below it (a translation composed the wrong way round would).
#[test]
fn smoke_benchmark_with_the_label_start() {
    let Some(python) = python() else { return };
    let (dir, results) = smoke(&python, &["--start", "labels"]);
    assert_eq!(results["start"], "labels", "{results}");
    let starts = results["starts"].as_object().unwrap();
    assert_eq!(starts.len(), 1, "{starts:?}");
    let st = starts.values().next().unwrap();
    let t = st["translation_mm"].as_array().unwrap();
    assert!(t.len() == 3 && t.iter().all(|v| v.as_f64().is_some_and(f64::is_finite)), "{st}");
    let rows = results["registration"]["rows"].as_array().unwrap();
    let row = |tool: &str| {
        rows.iter().find(|r| r["tool"] == tool).unwrap_or_else(|| panic!("no row for {tool} in {rows:?}")).clone()
    };
    assert!(rows.iter().all(|r| r["tool"] != "identity"), "the label start replaces the identity row");
    let start = num(&row("label start"), "mean_dice");
    assert!((num(st, "mean_dice") - start).abs() < 1e-12, "{st} vs {start}");
    for tool in ["obelisk-mind", "obelisk-intensity", "sitk-demons"] {
        let r = row(tool);
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["start"], "labels", "{r}");
        assert!(num(&r, "mean_dice") > start - 0.05, "{tool}: {r} vs label start {start}");
    }
    let md = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    assert!(md.contains("Start: **labels**") && md.contains("| label start |"), "{md}");
}
