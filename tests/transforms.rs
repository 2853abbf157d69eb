//! Transform files other tools read (ITK .tfm, ANTs .mat), inverse and composed fields, and
//! landmarks through transforms: cross-checked against SimpleITK where it can judge.
//!
//! The SimpleITK checks need the Python of `data-scripts/setup-venv.sh` (see `common::python`);
//! without one they print SKIPPED, unless `OBELISK_REQUIRE_PYTHON=1`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fails, oblique_grids, ok, ok_json, python, s, tiny_pair};
use nalgebra::{Matrix3, Rotation3};
use obelisk::io;
use obelisk::io::transform_files::{read_affines, write_affine};
use registration::compose::FieldSampler;
use registration::grid::Space;
use registration::transform::{grid_points_lps, Affine};
use registration::warp::Padding;
use registration::{DisplacementField, Grid, Labels, Volume};

fn py(python: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/transform_check.py");
    let out = Command::new(python).arg(script).args(args.iter().map(|a| a.as_ref())).output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// An image defined in LPS mm, so that any grid can hold it: a smooth background and blobs.
fn image(grid: &Grid, blob: impl Fn([f64; 3]) -> f64) -> Volume {
    let data = grid_points_lps(grid).into_iter().map(|p| blob(p) as f32).collect();
    Volume::new(grid.clone(), 1, data).unwrap()
}

fn phantom(grid: &Grid) -> Volume {
    image(grid, |p| {
        let b = (-((p[0] + 2.0).powi(2) + (p[1] - 1.0).powi(2) + (p[2] - 1.0).powi(2)) / 40.0).exp();
        300.0 * b + 40.0 * (0.35 * p[0]).sin() * (0.25 * p[1]).cos() + 5.0 * p[2] + 100.0
    })
}

/// The phantom on the oblique fixed and moving grids, written to `dir`: (grids, files).
fn phantom_pair(dir: &Path, two_d: bool) -> (Grid, Grid, PathBuf, PathBuf) {
    let (fixed, moving) = oblique_grids(two_d);
    let (f, m) = (dir.join("fixed.nii.gz"), dir.join("moving.nii.gz"));
    io::write_volume(&f, &phantom(&fixed)).unwrap();
    io::write_volume(&m, &phantom(&moving)).unwrap();
    (fixed, moving, f, m)
}

/// `obelisk warp` of `moving` onto the grid of `reference` through `transforms` (ANTs order).
fn warp_with(moving: &Path, reference: &Path, transforms: &[&Path], out: &Path) {
    let mut args = vec!["warp", "--quiet", "--moving", s(moving), "--reference", s(reference), "--out", s(out)];
    for t in transforms {
        args.extend(["--transform", s(t)]);
    }
    ok(&args);
}

fn centre_lps(g: &Grid) -> [f64; 3] {
    g.map(g.shape().map(|n| (n as f64 - 1.0) / 2.0), Space::Voxel, Space::Lps)
}

/// A rotation, scaling and shift, in the plane for 2D.
fn some_affine(two_d: bool) -> Affine {
    let r = if two_d {
        Rotation3::from_euler_angles(0.0, 0.0, 0.12).into_inner() * Matrix3::from_diagonal(&[1.08, 0.95, 1.0].into())
    } else {
        Rotation3::from_euler_angles(0.1, -0.07, 0.12).into_inner() * 1.06
    };
    let t = if two_d { [2.0, -1.5, 0.0] } else { [2.0, -1.5, 1.0] };
    Affine::about_centre(r, [1.0, -2.0, 0.0], t)
}

fn max_diff_rel(a: &Volume, b: &Volume) -> f32 {
    assert!(a.grid.same_as(&b.grid, 1e-4), "grids differ: {:?} vs {:?}", a.grid, b.grid);
    let (lo, hi) = a.range();
    a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / (hi - lo)
}

/// Our .tfm and .mat, read by SimpleITK, resample the moving image as `obelisk warp` does.
fn our_affine_files_resample_like_sitk(two_d: bool) {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (fixed, moving, f, m) = phantom_pair(d, two_d);
    let affine = some_affine(two_d);
    for name in ["affine.tfm", "affine.mat"] {
        let t = d.join(name);
        write_affine(&t, &affine, centre_lps(&fixed), two_d).unwrap();
        let (ours, theirs) = (d.join(format!("ours_{name}.nii.gz")), d.join(format!("sitk_{name}.nii.gz")));
        warp_with(&m, &f, &[&t], &ours);
        py(&python, &[&"resample", &m, &f, &t, &theirs]);
        let (a, b) = (io::read_image(&theirs).unwrap(), io::read_image(&ours).unwrap());
        let diff = max_diff_rel(&a, &b);
        println!("{name} ({}D): max abs difference to SimpleITK {diff:.2e} of the range", if two_d { 2 } else { 3 });
        assert!(diff < 1e-3, "{name}: obelisk vs SimpleITK: {diff}");
        // the transform must move things, or the comparison proves little
        let still = registration::warp::warp_volume(
            &phantom(&moving),
            &DisplacementField::zeros(fixed.clone()),
            registration::warp::Interpolation::Linear,
            Padding::Extent,
        );
        assert!(max_diff_rel(&b, &still) > 0.05, "transform too weak to test anything");
        // SimpleITK reads the parameters we wrote
        let info = d.join(format!("{name}.json"));
        py(&python, &[&"info", &t, &info]);
        let info = read_json(&info);
        let dim = if two_d { 2 } else { 3 };
        assert_eq!(info[0]["name"], "AffineTransform");
        let params: Vec<f64> = info[0]["parameters"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(params.len(), dim * dim + dim);
        for r in 0..dim {
            for c in 0..dim {
                assert!((params[r * dim + c] - affine.matrix[(r, c)]).abs() < 1e-12, "{name}: {params:?}");
            }
        }
    }
}

/// Our composite transform.h5 ([affine, field] on oblique grids), read by SimpleITK, resamples
/// as `obelisk warp` does with the same two transforms.
fn our_composite_h5_resamples_like_sitk(two_d: bool) {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (fixed, _, f, m) = phantom_pair(d, two_d);
    let affine = some_affine(two_d);
    let mut field = wavy_field(&fixed, 2.0);
    if two_d {
        let n = fixed.num_voxels();
        field.data[2 * n..].fill(0.0);
    }
    let (h5, t, u) = (d.join("t.h5"), d.join("a.tfm"), d.join("u.nii.gz"));
    io::transform_files::write_composite_h5(&h5, &affine, centre_lps(&fixed), &field).unwrap();
    write_affine(&t, &affine, centre_lps(&fixed), two_d).unwrap();
    io::write_field(&u, &field).unwrap();
    let (ours, theirs) = (d.join("ours.nii.gz"), d.join("sitk.nii.gz"));
    warp_with(&m, &f, &[&u, &t], &ours);
    py(&python, &[&"resample", &m, &f, &h5, &theirs]);
    let diff = max_diff_rel(&io::read_image(&theirs).unwrap(), &io::read_image(&ours).unwrap());
    println!("transform.h5 ({}D): max abs difference to SimpleITK {diff:.2e} of the range", if two_d { 2 } else { 3 });
    assert!(diff < 1e-3, "{diff}");
}

#[test]
fn our_composite_h5_resamples_like_sitk_3d() {
    our_composite_h5_resamples_like_sitk(false);
}

#[test]
fn our_composite_h5_resamples_like_sitk_2d() {
    our_composite_h5_resamples_like_sitk(true);
}

#[test]
fn our_affine_files_resample_like_sitk_3d() {
    our_affine_files_resample_like_sitk(false);
}

#[test]
fn our_affine_files_resample_like_sitk_2d() {
    our_affine_files_resample_like_sitk(true);
}

/// Affines that SimpleITK writes (with a centre) are read as SimpleITK reads them: images
/// resample alike and points map alike.
#[test]
fn sitk_written_affines_read_like_sitk() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for two_d in [false, true] {
        let (_, _, f, m) = phantom_pair(d, two_d);
        for ext in ["tfm", "mat"] {
            let tag = format!("{}d_{ext}", if two_d { 2 } else { 3 });
            let t = d.join(format!("sitk_{tag}.{ext}"));
            py(&python, &[&"write-affine", &t, &if two_d { "2" } else { "3" }]);
            let (ours, theirs) = (d.join(format!("ours_{tag}.nii.gz")), d.join(format!("sitk_{tag}.nii.gz")));
            warp_with(&m, &f, &[&t], &ours);
            py(&python, &[&"resample", &m, &f, &t, &theirs]);
            let diff = max_diff_rel(&io::read_image(&theirs).unwrap(), &io::read_image(&ours).unwrap());
            println!("SimpleITK-written {tag}: max abs difference {diff:.2e} of the range");
            assert!(diff < 1e-3, "{tag}: {diff}");
            // points
            let pts: Vec<[f64; 3]> =
                vec![[0.0, 0.0, 0.0], [10.0, -5.0, if two_d { 0.0 } else { 3.0 }], [-7.5, 2.25, 0.0]];
            let pj = d.join("pts.json");
            std::fs::write(&pj, serde_json::to_string(&pts).unwrap()).unwrap();
            let mapped = d.join("mapped.json");
            py(&python, &[&"map", &t, &pj, &mapped]);
            let theirs: Vec<Vec<f64>> = serde_json::from_value(read_json(&mapped)).unwrap();
            let a = &read_affines(&t).unwrap()[0];
            for (p, q) in pts.iter().zip(&theirs) {
                let ours = a.apply(*p);
                for k in 0..q.len() {
                    assert!((ours[k] - q[k]).abs() < 1e-9, "{tag}: {ours:?} vs {q:?}");
                }
            }
        }
    }
}

/// Mean and max of `|v(y) + u(y + v(y))|` (mm) over the voxels `y` of `inverse` whose
/// preimage lies inside `forward`.
fn residual(forward: &DisplacementField, inverse: &DisplacementField) -> (f64, f64) {
    let u = FieldSampler::new(forward.clone());
    let (mut sum, mut max, mut n) = (0.0, 0.0f64, 0);
    for (v, y) in grid_points_lps(&inverse.grid).into_iter().enumerate() {
        let w = inverse.at(v).map(|c| c as f64);
        let x = [y[0] + w[0], y[1] + w[1], y[2] + w[2]];
        if !u.contains(x) {
            continue;
        }
        let d = u.at(x, Padding::Extent);
        let r = ((w[0] + d[0]).powi(2) + (w[1] + d[1]).powi(2) + (w[2] + d[2]).powi(2)).sqrt();
        (sum, max, n) = (sum + r, max.max(r), n + 1);
    }
    assert!(n > inverse.grid.num_voxels() / 2, "only {n} voxels map inside");
    (sum / n as f64, max)
}

/// `register --inverse` on a registered pair: the affine files, an inverse that undoes the field
/// to well under a tenth of a voxel, and `invert`/`compose` agreeing with it.
#[test]
fn registered_pair_gets_transform_files_and_an_inverse() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = tiny_pair(d);
    let (f, m) = (data.join("pair_000_fixed.nii.gz"), data.join("pair_000_moving.nii.gz"));
    let reg = d.join("reg");
    let json = ok_json(&[
        "register",
        "--fixed",
        s(&f),
        "--moving",
        s(&m),
        "--out",
        s(&reg),
        "--iterations",
        "15",
        "--affine-iterations",
        "5",
        "--no-pictures",
        "--inverse",
    ]);
    let files: Vec<String> =
        json["files"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    for name in ["affine.tfm", "affine.mat", "inverse_field.nii.gz"] {
        assert!(files.iter().any(|p| p.ends_with(name)), "{name} not in {files:?}");
    }
    let field = io::read_field(&reg.join("field.nii.gz")).unwrap();
    let inverse = io::read_field(&reg.join("inverse_field.nii.gz")).unwrap();
    let moving_grid = io::read_grid(&m).unwrap();
    assert!(inverse.grid.same_as(&moving_grid, 1e-4));
    let voxel = field.grid.min_spacing();
    let (mean, max) = residual(&field, &inverse);
    let reported = &json["inverse"];
    println!(
        "register --inverse: residual mean {mean:.4} mm ({:.5} voxels), max {max:.4} mm; reported {reported}",
        mean / voxel
    );
    assert!(mean / voxel < 0.1, "mean residual {mean} mm");
    assert!((reported["mean_mm"].as_f64().unwrap() - mean).abs() < 0.02 * voxel, "{reported}");
    // the affine files hold the same map
    let (a, b) = (read_affines(&reg.join("affine.tfm")).unwrap(), read_affines(&reg.join("affine.mat")).unwrap());
    assert!((a[0].matrix - b[0].matrix).abs().max() < 1e-12);
    // the deformable remainder then the affine map, listed as ANTs lists 1Warp and
    // 0GenericAffine, is the whole field
    let (whole, parts) = (d.join("whole.nii.gz"), d.join("parts.nii.gz"));
    ok(&["warp", "--quiet", "--moving", s(&m), "--field", s(&reg.join("field.nii.gz")), "--out", s(&whole)]);
    let (am, fd) = (reg.join("affine.mat"), reg.join("field_deformable.nii.gz"));
    warp_with(&m, &f, &[&fd, &am], &parts);
    let diff = max_diff_rel(&io::read_image(&whole).unwrap(), &io::read_image(&parts).unwrap());
    assert!(diff < 1e-4, "affine.mat + field_deformable vs field: {diff}");
    // SimpleITK reads transform.h5 and the .tfm and resamples as obelisk does
    if let Some(python) = python() {
        for (name, transform) in [("h5", reg.join("transform.h5")), ("tfm", reg.join("affine.tfm"))] {
            let (theirs, ours) = (d.join(format!("sitk_{name}.nii.gz")), d.join(format!("ours_{name}.nii.gz")));
            py(&python, &[&"resample", &m, &f, &transform, &theirs]);
            let mine = if name == "h5" {
                whole.clone()
            } else {
                warp_with(&m, &f, &[&transform], &ours);
                ours
            };
            let diff = max_diff_rel(&io::read_image(&theirs).unwrap(), &io::read_image(&mine).unwrap());
            println!("registered pair: SimpleITK with {name} vs obelisk: max abs difference {diff:.2e} of the range");
            assert!(diff < 1e-3, "{name}: {diff}");
        }
    }

    // `invert` and `compose`: forward ∘ inverse is the identity where the preimage is inside
    let inv2 = d.join("inv2.nii.gz");
    let j = ok_json(&["invert", "--field", s(&reg.join("field.nii.gz")), "--reference", s(&m), "--out", s(&inv2)]);
    assert!(j["residual"]["mean_voxels"].as_f64().unwrap() < 0.1, "{j}");
    let inv2 = io::read_field(&inv2).unwrap();
    assert!(residual(&field, &inv2).0 / voxel < 0.1);
    let c = d.join("c.nii.gz");
    ok(&[
        "compose",
        "--quiet",
        "--field",
        s(&reg.join("inverse_field.nii.gz")),
        "--field",
        s(&reg.join("field.nii.gz")),
        "--out",
        s(&c),
    ]);
    let c = io::read_field(&c).unwrap();
    assert!(c.grid.same_as(&moving_grid, 1e-4));
    let u = FieldSampler::new(field.clone());
    let (mut sum, mut n) = (0.0, 0);
    for (v, y) in grid_points_lps(&c.grid).into_iter().enumerate() {
        let w = inverse.at(v).map(|x| x as f64);
        if u.contains([y[0] + w[0], y[1] + w[1], y[2] + w[2]]) {
            let r = c.at(v);
            sum += (r[0] as f64).hypot(r[1] as f64).hypot(r[2] as f64);
            n += 1;
        }
    }
    println!("compose(field, inverse): mean |u| {:.4} voxels over {n} voxels", sum / n as f64 / voxel);
    assert!(sum / n as f64 / voxel < 0.1);
}

/// A smooth displacement field (mm) on `grid`.
fn wavy_field(grid: &Grid, amp: f64) -> DisplacementField {
    let pts = grid_points_lps(grid);
    let n = pts.len();
    let mut data = vec![0.0f32; 3 * n];
    for (v, p) in pts.iter().enumerate() {
        let w = [(0.1 * p[1]).sin(), (0.08 * p[2] + 0.3).cos(), (0.09 * p[0]).sin()];
        for a in 0..3 {
            data[a * n + v] = (amp * w[a]) as f32;
        }
    }
    DisplacementField::new(grid.clone(), data).unwrap()
}

fn read_points(p: &Path) -> Vec<[f64; 3]> {
    io::points::PointSet::read(p).unwrap().points
}

fn close(a: [f64; 3], b: [f64; 3]) -> f64 {
    (0..3).map(|k| (a[k] - b[k]).powi(2)).sum::<f64>().sqrt()
}

/// A bright blob at `m0` in the moving image: the warped image puts it at `c` (its centroid);
/// `points` maps `c` to `m0`, `--direction moving-to-fixed` maps `m0` to `c`, for CSV and
/// .fcsv, and `eval` reports the TRE.
#[test]
fn points_land_where_the_warped_image_puts_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = Rotation3::from_euler_angles(0.1, -0.05, 0.2).into_inner();
    let fixed = Grid::from_parts([40, 36, 30], [1.1, 1.0, 1.3], [-20.0, -18.0, -19.0], r).unwrap();
    let moving = Grid::from_spacing([44, 40, 36], [1.0, 1.2, 1.1], [-22.0, -24.0, -20.0]).unwrap();
    let m0 = [3.0, -2.0, 4.0];
    let blob = image(&moving, |p| 1000.0 * (-close(p, m0).powi(2) / (2.0 * 2.0f64.powi(2))).exp());
    let (f, m) = (d.join("fixed.nii.gz"), d.join("moving.nii.gz"));
    io::write_volume(&f, &Volume::zeros(fixed.clone())).unwrap();
    io::write_volume(&m, &blob).unwrap();
    let (t, u) = (d.join("a.tfm"), d.join("u.nii.gz"));
    let a =
        Affine::about_centre(Rotation3::from_euler_angles(0.05, 0.1, -0.1).into_inner(), [0.0; 3], [4.0, -3.0, 2.0]);
    write_affine(&t, &a, [0.0; 3], false).unwrap();
    io::write_field(&u, &wavy_field(&fixed, 1.5)).unwrap();
    let chain = ["--transform", s(&t), "--transform", s(&u)];
    let w = d.join("warped.nii.gz");
    ok(&[&["warp", "--quiet", "--moving", s(&m), "--reference", s(&f), "--out", s(&w)][..], &chain[..]].concat());
    let warped = io::read_image(&w).unwrap();
    let (mut c, mut mass) = ([0.0; 3], 0.0);
    for (v, p) in grid_points_lps(&warped.grid).into_iter().enumerate() {
        let x = warped.data[v] as f64;
        if x > 10.0 {
            (0..3).for_each(|k| c[k] += x * p[k]);
            mass += x;
        }
    }
    let c = c.map(|x| x / mass);
    // ANTs CSV, LPS
    let (pin, pout) = (d.join("p.csv"), d.join("q.csv"));
    std::fs::write(&pin, format!("x,y,z,t,label\n{},{},{},0,7\n", c[0], c[1], c[2])).unwrap();
    ok(&[&["points", "--quiet", "--in", s(&pin), "--out", s(&pout)][..], &chain[..]].concat());
    let q = read_points(&pout)[0];
    println!("blob: centroid in the fixed image {c:?} maps to {q:?}, blob centre {m0:?}: {:.3} mm", close(q, m0));
    assert!(close(q, m0) < 0.25, "{q:?} vs {m0:?}");
    assert!(std::fs::read_to_string(&pout).unwrap().trim_end().ends_with(",0,7"));
    // the other way
    let (min, mout) = (d.join("m.csv"), d.join("mf.csv"));
    std::fs::write(&min, format!("x,y,z\n{},{},{}\n", m0[0], m0[1], m0[2])).unwrap();
    let j = ok_json(
        &[&["points", "--direction", "moving-to-fixed", "--in", s(&min), "--out", s(&mout)][..], &chain[..]].concat(),
    );
    assert!(j["inverse_residual_max_mm"].as_f64().unwrap() < 1e-4, "{j}");
    let back = read_points(&mout)[0];
    assert!(close(back, c) < 0.25, "{back:?} vs {c:?}");
    // Slicer, RAS
    let (fin, fout) = (d.join("p.fcsv"), d.join("q.fcsv"));
    std::fs::write(
        &fin,
        format!("# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\nvtkMRMLMarkupsFiducialNode_0,{},{},{},0,0,0,1,1,1,0,F-1,,\n", -c[0], -c[1], c[2]),
    )
    .unwrap();
    ok(&[&["points", "--quiet", "--in", s(&fin), "--out", s(&fout)][..], &chain[..]].concat());
    let text = std::fs::read_to_string(&fout).unwrap();
    assert!(text.contains(",F-1,,") && text.contains("# CoordinateSystem = RAS"), "{text}");
    assert!(close(read_points(&fout)[0], m0) < 0.25);
    // the target registration error of the landmark pair
    let mpts = d.join("m0.csv");
    std::fs::write(&mpts, format!("x,y,z\n{},{},{}\n", m0[0], m0[1], m0[2])).unwrap();
    let e = ok_json(&[&["eval", "--fixed-points", s(&pin), "--moving-points", s(&mpts)][..], &chain[..]].concat());
    println!("TRE {e}");
    assert!(e["after"]["mean_mm"].as_f64().unwrap() < 0.25 && e["before"]["mean_mm"].as_f64().unwrap() > 3.0, "{e}");
}

/// `--interpolation label` gives labels of the input and the identity on a zero field.
#[test]
fn label_interpolation_warps_label_maps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (fixed, moving) = oblique_grids(false);
    let labels = Labels::new(
        moving.clone(),
        grid_points_lps(&moving)
            .into_iter()
            .map(|p| {
                if close(p, [0.0; 3]) < 6.0 {
                    3
                } else if p[0] > 2.0 {
                    9
                } else {
                    0
                }
            })
            .collect(),
    )
    .unwrap();
    let (l, z, u) = (d.join("l.nii.gz"), d.join("zero.nii.gz"), d.join("u.nii.gz"));
    io::write_labels(&l, &labels).unwrap();
    io::write_field(&z, &DisplacementField::zeros(moving.clone())).unwrap();
    io::write_field(&u, &wavy_field(&fixed, 2.0)).unwrap();
    let same = d.join("same.nii.gz");
    ok(&["warp", "--quiet", "--moving", s(&l), "--field", s(&z), "--out", s(&same), "--interpolation", "label"]);
    // (the grids agree to the headers' float precision)
    assert!(io::read_labels(&same).unwrap().data == labels.data);
    let w = d.join("w.nii.gz");
    ok(&[
        "warp",
        "--quiet",
        "--moving",
        s(&l),
        "--field",
        s(&u),
        "--out",
        s(&w),
        "--labels",
        "--interpolation",
        "label",
    ]);
    let w = io::read_labels(&w).unwrap();
    assert!(w.data.iter().all(|l| [0, 3, 9].contains(l)));
    assert_eq!(w.ids(), vec![3, 9]);
    let err = fails(&[
        "warp",
        "--moving",
        s(&l),
        "--field",
        s(&u),
        "--out",
        s(&d.join("x.nii.gz")),
        "--labels",
        "--interpolation",
        "linear",
    ]);
    assert!(err.contains("--labels"), "{err}");
}

/// Broken or unknown transform and point files stop the command with a one-line error naming
/// the file, before anything is written.
#[test]
fn bad_transform_and_point_files_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (fixed, _) = oblique_grids(false);
    let f = d.join("fixed.nii.gz");
    io::write_volume(&f, &phantom(&fixed)).unwrap();
    let out = d.join("out.nii.gz");
    let cases: &[(&str, &[u8], &str)] = &[
        ("garbage.tfm", b"not a transform\n", "expected 'Key: values'"),
        ("short.tfm", b"#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\nParameters: 1 0 0\nFixedParameters: 0 0 0\n", "needs 12 parameters"),
        ("bspline.tfm", b"Transform: BSplineTransform_double_3_3\nParameters: 0\nFixedParameters: 0\n", "not supported"),
        ("cut.mat", b"\0\0\0\0\x0c\0\0\0\x01\0\0\0\0\0\0\0\x1b\0\0\0AffineTrans", "truncated MATLAB 4 record"),
        ("v5.mat", b"MATLAB 5.0 MAT-file, Platform: GLNXA64", "MATLAB 5/7"),
        ("x.xfm", b"", "unknown transform file type"),
        ("c.h5", b"\x89HDF", "HDF5"),
        ("bad.nii.gz", b"nope", "gzip"),
    ];
    for (name, bytes, want) in cases {
        let t = d.join(name);
        std::fs::write(&t, bytes).unwrap();
        let err = fails(&["warp", "--moving", s(&f), "--transform", s(&t), "--reference", s(&f), "--out", s(&out)]);
        assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1, "{name}: {err}");
        assert!(err.contains(s(&t)) && err.contains(want), "{name}: {err}");
        assert!(!out.exists());
    }
    let missing = d.join("missing.tfm");
    let err = fails(&["warp", "--moving", s(&f), "--transform", s(&missing), "--reference", s(&f), "--out", s(&out)]);
    assert!(err.contains(s(&missing)) && err.contains("not found"), "{err}");
    let err = fails(&["warp", "--moving", s(&f), "--transform", s(&d.join("garbage.tfm")), "--out", s(&out)]);
    assert!(err.contains("--reference"), "{err}");
    // points
    let t = d.join("ok.tfm");
    write_affine(&t, &Affine::default(), [0.0; 3], false).unwrap();
    let bad = d.join("bad.csv");
    std::fs::write(&bad, "x,y,z\n1,2,oops\n").unwrap();
    let err = fails(&["points", "--transform", s(&t), "--in", s(&bad), "--out", s(&d.join("q.csv"))]);
    assert!(err.contains(s(&bad)) && err.contains("line 2"), "{err}");
    let err = fails(&["points", "--transform", s(&t), "--in", s(&bad), "--out", s(&d.join("q.fcsv"))]);
    assert!(err.contains("same type") || err.contains("type they were read"), "{err}");
    let err = fails(&["compose", "--field", s(&t), "--out", s(&out)]);
    assert!(err.contains("at least two"), "{err}");
    let err = fails(&["compose", "--field", s(&t), "--field", s(&t), "--out", s(&out)]);
    assert!(err.contains("--reference"), "{err}");
}
