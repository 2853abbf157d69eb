//! Jobs that would not fit in memory are refused before any work starts, with a hint.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use common::{fails, s};
use obelisk::io;
use registration::{Grid, Volume};

fn image(p: &Path, shape: [usize; 3]) {
    let g = Grid::from_spacing(shape, [2.0; 3], [0.0; 3]).unwrap();
    let n = g.num_voxels();
    io::write_volume(p, &Volume::new(g, 1, (0..n).map(|i| (i % 7) as f32).collect()).unwrap()).unwrap();
}

#[test]
fn a_tiny_limit_refuses_registration_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (f, m) = (dir.path().join("f.nii.gz"), dir.path().join("m.nii.gz"));
    image(&f, [20, 20, 20]);
    image(&m, [20, 20, 20]);
    let out = dir.path().join("out");
    let err = fails(&["register", "--fixed", s(&f), "--moving", s(&m), "--out", s(&out), "--max-memory", "1M"]);
    assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1, "{err}");
    assert!(err.contains("needs about") && err.contains("more than 1.0 MiB (--max-memory)"), "{err}");
    assert!(err.contains("downsample") && err.contains(s(&f)), "{err}");
    assert!(!out.exists(), "the output folder was created");
    let err = fails(&["register", "--fixed", s(&f), "--moving", s(&m), "--out", s(&out), "--max-memory", "lots"]);
    assert!(err.contains("--max-memory") && err.contains("lots"), "{err}");
}

/// A header promising 2·10⁹ voxels (the data need not exist: only the header is read before the
/// refusal).
#[test]
fn an_absurd_size_is_refused_from_the_header_alone() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.nii");
    image(&small, [4, 4, 4]);
    let mut header = std::fs::read(&small).unwrap()[..352].to_vec();
    for (a, d) in [2000i16, 2000, 500].iter().enumerate() {
        header[42 + 2 * a..44 + 2 * a].copy_from_slice(&d.to_le_bytes());
    }
    let huge = dir.path().join("huge.nii.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&header).unwrap();
    std::fs::write(&huge, gz.finish().unwrap()).unwrap();
    let out = dir.path().join("out");
    let t = Instant::now();
    #[rustfmt::skip]
    let err = fails(&["register", "--fixed", s(&huge), "--moving", s(&huge), "--out", s(&out),
                      "--max-memory", "64G"]);
    assert!(t.elapsed().as_secs() < 10, "took {:?}", t.elapsed());
    assert!(err.contains("needs about") && err.contains("[2000, 2000, 500]") && err.contains(s(&huge)), "{err}");
    assert!(!out.exists());
}
