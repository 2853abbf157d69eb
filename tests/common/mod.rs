//! Helpers shared by the end-to-end tests: run the binary, demand success or failure.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nalgebra::Rotation3;
use registration::Grid;

pub fn obelisk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_obelisk")).args(args).output().expect("the obelisk binary runs")
}

pub fn ok(args: &[&str]) -> String {
    let out = obelisk(args);
    assert!(
        out.status.success(),
        "obelisk {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `obelisk ARGS --json`, which must succeed and print one JSON document on stdout.
pub fn ok_json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = ok(&a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("obelisk {a:?}: stdout is not JSON ({e}): {out}"))
}

pub fn fails(args: &[&str]) -> String {
    let out = obelisk(args);
    assert!(!out.status.success(), "obelisk {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The Python with SimpleITK, numpy and nibabel for the cross-checks: `$OBELISK_PYTHON`, else
/// `.venv/bin/python` (made by `data-scripts/setup-venv.sh`). Without one the caller skips with
/// a printed SKIPPED, unless `OBELISK_REQUIRE_PYTHON=1` (CI), where this panics.
pub fn python() -> Option<PathBuf> {
    let candidate = match std::env::var_os("OBELISK_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
    };
    if candidate.exists() {
        return Some(candidate);
    }
    if std::env::var("OBELISK_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("OBELISK_REQUIRE_PYTHON=1 but no Python at {} (run data-scripts/setup-venv.sh)", candidate.display());
    }
    println!("SKIPPED: no Python at {} (run data-scripts/setup-venv.sh or set OBELISK_PYTHON)", candidate.display());
    None
}

/// A tiny synthetic pair (24³ at 14 mm covers the phantom's body coarsely); returns its folder.
pub fn tiny_pair(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    ok(&[
        "synth",
        "--out",
        s(&data),
        "--subjects",
        "1",
        "--pairs",
        "1",
        "--size",
        "24,24,24",
        "--spacing",
        "14,14,14",
        "--seed",
        "3",
        "--quiet",
    ]);
    data
}

/// Fixed and moving grids: oblique, anisotropic, different from each other.
pub fn oblique_grids(two_d: bool) -> (Grid, Grid) {
    if two_d {
        let rf = Rotation3::from_euler_angles(0.0, 0.0, 0.35).into_inner();
        let rm = Rotation3::from_euler_angles(0.0, 0.0, -0.2).into_inner();
        (
            Grid::from_parts([30, 24, 1], [0.9, 1.3, 1.0], [-12.0, -14.0, 0.0], rf).unwrap(),
            Grid::from_parts([34, 30, 1], [1.1, 0.8, 1.0], [-16.0, -10.0, 0.0], rm).unwrap(),
        )
    } else {
        let rf = Rotation3::from_euler_angles(0.2, -0.15, 0.3).into_inner();
        let rm = Rotation3::from_euler_angles(-0.1, 0.1, -0.25).into_inner();
        (
            Grid::from_parts([22, 18, 10], [0.9, 1.3, 2.2], [-10.0, -12.0, -9.0], rf).unwrap(),
            Grid::from_parts([24, 22, 14], [1.1, 0.8, 1.7], [-12.0, -9.0, -11.0], rm).unwrap(),
        )
    }
}
