//! Bad input to `obelisk warp`: every case must fail with exit code ≠ 0, a one-line message on
//! stderr that names the offending file, no panic and no output file.

use std::path::{Path, PathBuf};
use std::process::Command;

use nalgebra::Rotation3;
use obelisk::io;
use registration::{DisplacementField, Grid, Volume};

fn grid() -> Grid {
    let r = Rotation3::from_euler_angles(0.1, 0.2, -0.3).into_inner();
    Grid::from_parts([8, 7, 5], [0.9, 1.2, 2.0], [1.0, -2.0, 3.0], r).unwrap()
}

struct Case {
    dir: tempfile::TempDir,
    moving: PathBuf,
    field: PathBuf,
    out: PathBuf,
}

fn case() -> Case {
    let dir = tempfile::tempdir().unwrap();
    let g = grid();
    let moving = dir.path().join("moving.nii.gz");
    let n = g.num_voxels();
    io::write_volume(&moving, &Volume::new(g.clone(), 1, (0..n).map(|x| x as f32).collect()).unwrap()).unwrap();
    let field = dir.path().join("field.nii.gz");
    io::write_field(&field, &DisplacementField::zeros(g)).unwrap();
    let out = dir.path().join("out.nii.gz");
    Case { dir, moving, field, out }
}

impl Case {
    /// Runs `obelisk warp` and checks the failure contract; `culprit` must appear in the message.
    fn fails(&self, extra: &[&str], culprit: &Path, expect: &str) {
        let before: Vec<_> = std::fs::read_dir(self.dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        let out = Command::new(env!("CARGO_BIN_EXE_obelisk"))
            .args(["warp", "--moving"])
            .arg(&self.moving)
            .arg("--field")
            .arg(&self.field)
            .arg("--out")
            .arg(&self.out)
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains(&culprit.display().to_string()), "does not name {}: {stderr}", culprit.display());
        assert!(stderr.contains(expect), "expected {expect:?}: {stderr}");
        assert!(!self.out.exists(), "output was written");
        let after: Vec<_> = std::fs::read_dir(self.dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(before.len(), after.len(), "stray files: {after:?}");
    }
}

#[test]
fn missing_file() {
    let mut c = case();
    c.moving = c.dir.path().join("nope.nii.gz");
    c.fails(&[], &c.moving.clone(), "not found");
}

#[test]
fn truncated_gzip() {
    let c = case();
    let bytes = std::fs::read(&c.moving).unwrap();
    std::fs::write(&c.moving, &bytes[..bytes.len() / 2]).unwrap();
    c.fails(&[], &c.moving, "truncated gzip");
}

fn rewrite_uncompressed(c: &mut Case, patch: impl FnOnce(&mut Vec<u8>)) {
    let v = io::read_image(&c.moving).unwrap();
    c.moving = c.dir.path().join("moving.nii");
    io::write_volume(&c.moving, &v).unwrap();
    let mut d = std::fs::read(&c.moving).unwrap();
    patch(&mut d);
    std::fs::write(&c.moving, d).unwrap();
}

#[test]
fn wrong_magic() {
    let mut c = case();
    rewrite_uncompressed(&mut c, |d| d[344..348].copy_from_slice(b"abc\0"));
    c.fails(&[], &c.moving, "magic");
}

#[test]
fn zero_dims() {
    let mut c = case();
    rewrite_uncompressed(&mut c, |d| d[44..46].copy_from_slice(&0i16.to_le_bytes()));
    c.fails(&[], &c.moving, "positive");
}

#[test]
fn nan_voxels() {
    let mut c = case();
    rewrite_uncompressed(&mut c, |d| d[352 + 8..352 + 12].copy_from_slice(&f32::NAN.to_le_bytes()));
    c.fails(&[], &c.moving, "NaN");
}

#[test]
fn field_with_wrong_components() {
    let c = case();
    let g = grid();
    // a 3-channel image is not a vector field: dim [4, X, Y, Z, 3]
    let n = g.num_voxels();
    io::write_volume(&c.field, &Volume::new(g, 3, vec![0.0; 3 * n]).unwrap()).unwrap();
    c.fails(&[], &c.field, "not a displacement field");
}

#[test]
fn reference_off_the_field_grid() {
    let c = case();
    let reference = c.dir.path().join("ref.nii");
    let g = Grid::from_spacing([8, 7, 5], [1.0; 3], [0.0; 3]).unwrap();
    io::write_volume(&reference, &Volume::zeros(g)).unwrap();
    c.fails(&["--reference", reference.to_str().unwrap()], &reference, "differs from the grid");
}

#[test]
fn missing_output_folder() {
    let mut c = case();
    c.out = c.dir.path().join("no/such/dir/out.nii.gz");
    c.fails(&[], &c.out.clone(), "does not exist");
}

#[test]
fn unwritable_output_folder() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = case();
    let ro = c.dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    // root ignores permission bits; /proc refuses new files to everyone
    let folder = if tempfile::tempfile_in(&ro).is_ok() { PathBuf::from("/proc") } else { ro };
    c.out = folder.join("out.nii.gz");
    c.fails(&[], &c.out.clone(), "not writable");
}

#[test]
fn output_is_an_input() {
    let mut c = case();
    c.out = c.moving.clone();
    let before = std::fs::read(&c.moving).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_obelisk"))
        .args(["warp", "--force", "--moving"])
        .arg(&c.moving)
        .arg("--field")
        .arg(&c.field)
        .arg("--out")
        .arg(&c.out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("overwrite the input"), "{stderr}");
    assert_eq!(std::fs::read(&c.moving).unwrap(), before);
}
