//! A process killed with SIGKILL halfway through writing leaves every output either absent or
//! complete under its final name: files are written to hidden temporary names and renamed.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use obelisk::io;

/// Checks every file under `dir`: hidden temporaries are allowed, everything else must read
/// back completely. Returns the number of finished outputs.
fn finished_outputs(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with(".obelisk-") {
            continue;
        }
        let ok = if name.ends_with(".json") {
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(&p).unwrap())
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else if name.contains("truth") {
            io::read_field(&p).map(|_| ()).map_err(|e| e.to_string())
        } else if name.contains("labels") {
            io::read_label_map(&p).map(|_| ()).map_err(|e| e.to_string())
        } else {
            io::read_image(&p).map(|_| ()).map_err(|e| e.to_string())
        };
        assert!(ok.is_ok(), "partial output under its final name: {}: {ok:?}", p.display());
        n += 1;
    }
    n
}

#[test]
fn sigkill_leaves_no_partial_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut mid_way = 0;
    for (i, delay_ms) in [0u64, 40, 120, 300].into_iter().enumerate() {
        let out = dir.path().join(format!("run{i}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_obelisk"))
            .args(["--quiet", "synth", "--out"])
            .arg(&out)
            .args(["--subjects", "6", "--pairs", "2", "--size", "48,48,48", "--spacing", "8,8,8", "--seed", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // wait for the first finished or temporary file, then kill after `delay_ms`
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60)
            && std::fs::read_dir(&out).map(|mut d| d.next().is_none()).unwrap_or(true)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL on Unix
        let status = child.wait().unwrap();
        let n = finished_outputs(&out);
        if !status.success() && n < 6 * 2 + 2 * 5 + 1 {
            mid_way += 1;
        }
    }
    // the kills must really have interrupted the runs for the test to mean anything
    assert!(mid_way >= 2, "only {mid_way} of 4 runs were killed mid-way");
}
