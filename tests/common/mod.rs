//! Helpers shared by the end-to-end tests: run the binary, demand success or failure.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;
use std::process::{Command, Output};

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

pub fn fails(args: &[&str]) -> String {
    let out = obelisk(args);
    assert!(!out.status.success(), "obelisk {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
