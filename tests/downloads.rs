//! The data downloaders (`data-scripts/download.py`) against a server on 127.0.0.1: resume after a
//! truncated download, checksum mismatch, nothing fetched twice, unpacked Learn2Reg data read by
//! `obelisk train`. The cases live in `tests/python/test_download.py`; no internet is needed.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn downloaders_against_a_loopback_server() {
    let Some(python) = common::python() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python)
        .args(["-m", "unittest", "-v", "tests/python/test_download.py"])
        .current_dir(root)
        .env("OBELISK_BIN", env!("CARGO_BIN_EXE_obelisk"))
        .env_remove("OBELISK_DOWNLOAD_BASE_URL")
        .output()
        .expect("python runs");
    let log = String::from_utf8_lossy(&out.stderr);
    println!("{log}");
    assert!(out.status.success(), "downloader tests failed:\n{log}");
    assert!(log.contains("Ran 6 tests"), "{log}");
}
