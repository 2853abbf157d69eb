//! Cross-checks against SimpleITK and nibabel (the acceptance criterion for ITK compatibility).
//!
//! Needs a Python with SimpleITK, numpy and nibabel: `$OBELISK_PYTHON`, else `.venv/bin/python`
//! (made by `data-scripts/setup-venv.sh`). Without one the tests print SKIPPED, unless
//! `OBELISK_REQUIRE_PYTHON=1` (CI), where they fail.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use nalgebra::{Matrix4, Rotation3};
use obelisk::io;
use registration::grid::Space;
use registration::{DisplacementField, Grid, Volume};

mod common;
use common::{oblique_grids, python};

fn py(python: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/itk_check.py");
    let out = Command::new(python).arg(script).args(args.iter().map(|a| a.as_ref())).output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn obelisk(args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let out = Command::new(env!("CARGO_BIN_EXE_obelisk")).args(args.iter().map(|a| a.as_ref())).output().unwrap();
    assert!(out.status.success(), "obelisk failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A smooth image with structure at several scales, defined in RAS mm so that any grid can hold it.
fn phantom(grid: &Grid) -> Volume {
    let [nx, ny, nz] = grid.shape();
    let mut data = Vec::with_capacity(grid.num_voxels());
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let p = grid.map([i as f64, j as f64, k as f64], Space::Voxel, Space::Ras);
                let blob = (-((p[0] - 2.0).powi(2) + (p[1] + 1.0).powi(2) + (p[2] - 1.0).powi(2)) / 40.0).exp();
                let v = 300.0 * blob + 40.0 * (0.35 * p[0]).sin() * (0.25 * p[1]).cos() + 5.0 * p[2] + 100.0;
                data.push(v as f32);
            }
        }
    }
    Volume::new(grid.clone(), 1, data).unwrap()
}

fn max_diff_rel(a: &Volume, b: &Volume) -> f32 {
    assert_eq!(a.data.len(), b.data.len());
    let (lo, hi) = a.range();
    a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / (hi - lo)
}

/// (a) a field written by SimpleITK, applied by obelisk and by SimpleITK.
fn sitk_field_applied_by_both(two_d: bool) {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (fixed, moving) = oblique_grids(two_d);
    let (f, m) = (dir.path().join("fixed.nii.gz"), dir.path().join("moving.nii.gz"));
    io::write_volume(&f, &phantom(&fixed)).unwrap();
    io::write_volume(&m, &phantom(&moving)).unwrap();
    let field = dir.path().join("field.nii.gz");
    py(&python, &[&"make-field", &f, &field, &"3", &"4.0"]);
    let (ours, theirs) = (dir.path().join("ours.nii.gz"), dir.path().join("sitk.nii.gz"));
    obelisk(&[&"warp", &"--quiet", &"--moving", &m, &"--field", &field, &"--reference", &f, &"--out", &ours]);
    py(&python, &[&"resample", &m, &f, &field, &theirs]);
    let (a, b) = (io::read_image(&theirs).unwrap(), io::read_image(&ours).unwrap());
    assert!(a.grid.same_as(&b.grid, 1e-4), "grids differ: {:?} vs {:?}", a.grid, b.grid);
    let d = max_diff_rel(&a, &b);
    // the field must actually move things, or the comparison proves little
    let identity = registration::warp::warp_volume(
        &phantom(&moving),
        &DisplacementField::zeros(fixed.clone()),
        registration::warp::Interpolation::Linear,
        registration::warp::Padding::Extent,
    );
    assert!(max_diff_rel(&b, &identity) > 0.05, "field too weak to test anything");
    println!("max abs difference to SimpleITK: {d:.2e} of the intensity range");
    assert!(d < 1e-3, "obelisk vs SimpleITK: max |diff| = {d} of the range");
}

#[test]
fn sitk_field_3d() {
    sitk_field_applied_by_both(false);
}

#[test]
fn sitk_field_2d() {
    sitk_field_applied_by_both(true);
}

/// (b) a field obelisk writes, read and applied by SimpleITK, matches obelisk's own warp.
fn obelisk_field_applied_by_sitk(two_d: bool) {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (fixed, moving) = oblique_grids(two_d);
    let (f, m) = (dir.path().join("fixed.nii"), dir.path().join("moving.nii"));
    io::write_volume(&f, &phantom(&fixed)).unwrap();
    io::write_volume(&m, &phantom(&moving)).unwrap();
    // a rotation about the field of view's centre plus a shift, expressed as a displacement in LPS
    let [nx, ny, nz] = fixed.shape();
    let n = fixed.num_voxels();
    let c = fixed.center_ras();
    let rot = Rotation3::from_euler_angles(0.0, 0.0, 0.12);
    let mut data = vec![0.0f32; 3 * n];
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let v = (k * ny + j) * nx + i;
                let p = fixed.map([i as f64, j as f64, k as f64], Space::Voxel, Space::Ras);
                let d = nalgebra::Vector3::new(p[0] - c[0], p[1] - c[1], p[2] - c[2]);
                let q = rot * d - d + nalgebra::Vector3::new(1.5, -2.0, if two_d { 0.0 } else { 0.7 });
                // RAS → LPS: x and y change sign
                data[v] = -q[0] as f32;
                data[n + v] = -q[1] as f32;
                data[2 * n + v] = q[2] as f32;
            }
        }
    }
    let field = dir.path().join("field.nii.gz");
    io::write_field(&field, &DisplacementField::new(fixed.clone(), data).unwrap()).unwrap();
    let (ours, theirs) = (dir.path().join("ours.nii"), dir.path().join("sitk.nii"));
    obelisk(&[&"warp", &"--moving", &m, &"--field", &field, &"--out", &ours]);
    py(&python, &[&"resample", &m, &f, &field, &theirs]);
    let d = max_diff_rel(&io::read_image(&theirs).unwrap(), &io::read_image(&ours).unwrap());
    println!("max abs difference to SimpleITK: {d:.2e} of the intensity range");
    assert!(d < 1e-3, "obelisk vs SimpleITK on obelisk's field: max |diff| = {d} of the range");
}

#[test]
fn obelisk_field_3d() {
    obelisk_field_applied_by_sitk(false);
}

#[test]
fn obelisk_field_2d() {
    obelisk_field_applied_by_sitk(true);
}

#[derive(serde::Deserialize)]
struct NibInfo {
    affine: Vec<Vec<f64>>,
    data: Vec<f64>,
}

fn nib_info(python: &Path, path: &Path) -> NibInfo {
    let json = path.with_extension("json");
    py(python, &[&"nib-info", &path, &json]);
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

fn affine_of(info: &NibInfo) -> Matrix4<f64> {
    Matrix4::from_fn(|r, c| info.affine[r][c])
}

/// (c) a zero field returns the input exactly, with the affine nibabel reads from the input.
#[test]
fn zero_field_is_identity_for_nibabel() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    for two_d in [false, true] {
        let (fixed, _) = oblique_grids(two_d);
        let input = dir.path().join(if two_d { "in2.nii.gz" } else { "in3.nii.gz" });
        let img = phantom(&fixed);
        io::write_volume(&input, &img).unwrap();
        let field = dir.path().join("zero.nii.gz");
        io::write_field(&field, &DisplacementField::zeros(fixed.clone())).unwrap();
        let out = dir.path().join(if two_d { "out2.nii.gz" } else { "out3.nii.gz" });
        obelisk(&[&"warp", &"--force", &"--moving", &input, &"--field", &field, &"--out", &out]);
        let (a, b) = (nib_info(&python, &input), nib_info(&python, &out));
        assert_eq!(a.data, b.data, "zero field changed voxel values");
        // serde_json may parse a decimal 1 ulp off in f64, never in f32
        assert_eq!(a.data.iter().map(|&v| v as f32).collect::<Vec<_>>(), img.data);
        assert_eq!(a.affine, b.affine);
        // and nibabel reads the affine we meant to write
        assert!((affine_of(&a) - fixed.affine()).abs().max() < 1e-5, "{} vs {}", affine_of(&a), fixed.affine());
    }
}

/// Our reader agrees with nibabel on files nibabel wrote (int16, slope/inter, qform only, qfac −1;
/// little- and big-endian).
#[test]
fn reads_what_nibabel_writes() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    for (name, endianness) in [("le.nii.gz", "<"), ("be.nii", ">")] {
        let p = dir.path().join(name);
        let json = dir.path().join("nib.json");
        py(&python, &[&"nib-make", &p, &json, &endianness]);
        let info: NibInfo = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        let v = io::read_image(&p).unwrap();
        assert_eq!(v.data, info.data.iter().map(|&x| x as f32).collect::<Vec<_>>(), "{name}");
        let a = affine_of(&info);
        assert!((v.grid.affine() - a).abs().max() < 1e-5, "{name}: {} vs {a}", v.grid.affine());
    }
}

/// Per-label Dice printed by `obelisk eval --json`.
fn eval_dice(fixed_labels: &Path, warped: &Path) -> BTreeMap<u64, f64> {
    let out = Command::new(env!("CARGO_BIN_EXE_obelisk"))
        .args(["eval", "--json", "--fixed-labels"])
        .arg(fixed_labels)
        .arg("--warped-labels")
        .arg(warped)
        .output()
        .unwrap();
    assert!(out.status.success(), "obelisk eval failed: {}", String::from_utf8_lossy(&out.stderr));
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    m["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["label"].as_u64().unwrap(), l["dice"].as_f64().unwrap()))
        .collect()
}

/// Acceptance of `obelisk synth`: the moving labels of a ground-truth pair, warped back with the
/// truth field by `obelisk warp` and by SimpleITK (nearest neighbour), cover the fixed labels.
#[test]
fn synth_truth_field_warps_labels_back_in_obelisk_and_sitk() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pair");
    #[rustfmt::skip]
    obelisk(&[&"synth", &"--quiet", &"--out", &data, &"--subjects", &"0", &"--pairs", &"1",
              &"--size", &"96,88,96", &"--spacing", &"2.5,2.5,2.5", &"--max-displacement", &"12", &"--seed", &"1"]);
    let p = |n: &str| data.join(format!("pair_000_{n}.nii.gz"));
    let (ours, theirs) = (dir.path().join("ours.nii.gz"), dir.path().join("sitk.nii.gz"));
    #[rustfmt::skip]
    obelisk(&[&"warp", &"--quiet", &"--labels", &"--moving", &p("moving_labels"), &"--field", &p("truth"),
              &"--out", &ours]);
    py(&python, &[&"resample-labels", &p("moving_labels"), &p("fixed"), &p("truth"), &theirs]);
    let before = eval_dice(&p("fixed_labels"), &p("moving_labels"));
    let mean = |d: &BTreeMap<u64, f64>| d.values().sum::<f64>() / d.len() as f64;
    for (who, warped) in [("obelisk warp", &ours), ("SimpleITK", &theirs)] {
        let after = eval_dice(&p("fixed_labels"), warped);
        println!("{who}: mean Dice {:.4} -> {:.4}, per label {after:?}", mean(&before), mean(&after));
        assert_eq!(after.len(), 9, "{who}: {after:?}");
        for (&id, &d) in &after {
            // liver, spleen, kidneys, stomach; thin structures lose more to half-voxel boundary
            // shifts of nearest-neighbour sampling (see registration's synth tests)
            let bound = if id <= 5 { 0.95 } else { 0.85 };
            assert!(d > bound, "{who}: label {id} Dice {d:.3} (before {:.3})", before[&id]);
        }
        assert!(mean(&after) > mean(&before) + 0.03, "{who}: {:.3} -> {:.3}", mean(&before), mean(&after));
    }
    // and the two resamplers agree almost everywhere (ties at exact half-voxel positions aside)
    let (a, b) = (io::read_label_map(&ours).unwrap(), io::read_label_map(&theirs).unwrap());
    let differ = a.data.iter().zip(&b.data).filter(|(x, y)| x != y).count();
    assert!((differ as f64) < 1e-3 * a.data.len() as f64, "{differ} of {} voxels differ", a.data.len());
}

#[derive(serde::Deserialize)]
struct NibSummary {
    affine: Vec<Vec<f64>>,
    shape: Vec<usize>,
    sum: f64,
    counts: BTreeMap<String, usize>,
}

/// The TotalSegmentator subjects that `data-scripts/fetch_totalseg.sh` writes read the same in
/// nibabel and in obelisk: affine, shape, intensities, label voxel counts. Needs `data/totalseg`
/// (skipped otherwise).
#[test]
fn totalseg_outputs_read_alike_in_nibabel_and_obelisk() {
    let Some(python) = python() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/totalseg");
    if !root.join("dataset.json").is_file() {
        println!("SKIPPED: no {} (run data-scripts/fetch_totalseg.sh)", root.display());
        return;
    }
    // its dataset.json is read by the one dataset reader, with every listed file present
    let ds = io::dataset::Dataset::load(&root.join("dataset.json")).unwrap();
    assert_eq!((ds.labelled_training().len(), ds.registration_val.len(), ds.labels[&1].as_str()), (3, 4, "liver"));
    ds.check_files(
        ds.training.iter().flat_map(|s| s.files()).chain(ds.registration_val.iter().flat_map(|p| p.files())),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for subject in ["ct_a", "ct_b", "mr_c"] {
        let (img_path, lab_path) =
            (root.join(format!("{subject}.nii.gz")), root.join(format!("{subject}_labels.nii.gz")));
        let summary = |p: &Path| -> NibSummary {
            let json = dir.path().join("summary.json");
            py(&python, &[&"nib-summary", &p, &json]);
            serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
        };
        let (ni, nl) = (summary(&img_path), summary(&lab_path));
        let img = io::read_image(&img_path).unwrap();
        let lab = io::read_labels_for(&lab_path, &img.grid, &img_path).unwrap();
        for (what, n) in [("image", &ni), ("labels", &nl)] {
            let a = Matrix4::from_fn(|r, c| n.affine[r][c]);
            assert!((img.grid.affine() - a).abs().max() < 1e-4, "{subject} {what}: {} vs {a}", img.grid.affine());
            assert_eq!(n.shape, img.grid.shape().to_vec(), "{subject} {what}");
        }
        let sum: f64 = img.data.iter().map(|&v| f64::from(v)).sum();
        assert!((sum - ni.sum).abs() <= 1e-6 * ni.sum.abs().max(1.0), "{subject}: {sum} vs {}", ni.sum);
        let mut counts = BTreeMap::new();
        for &l in &lab.data {
            *counts.entry(l.to_string()).or_insert(0usize) += 1;
        }
        assert_eq!(counts, nl.counts, "{subject}: label voxel counts");
        assert!(nl.counts.len() > 15, "{subject}: {} labels", nl.counts.len());
    }
}
