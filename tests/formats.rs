//! NRRD, MetaImage and DICOM series against SimpleITK: what SimpleITK writes reads here with the
//! same geometry and voxels, what obelisk writes reads the same in SimpleITK, a SimpleITK field in
//! `.mha`/`.nrrd` warps like the `.nii.gz` one, and a broken file of each format fails cleanly.
//!
//! Needs the Python of `data-scripts/setup-venv.sh` (see `tests/common/mod.rs`); without one the
//! SimpleITK tests print SKIPPED, unless `OBELISK_REQUIRE_PYTHON=1`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use nalgebra::{Matrix3, Rotation3};
use obelisk::io;
use registration::grid::Space;
use registration::{DisplacementField, Grid, Labels, Volume};

mod common;
use common::{fails, python, s};

/// What SimpleITK reads from a file (see tests/python/formats_check.py).
#[derive(serde::Deserialize)]
struct Info {
    size: Vec<usize>,
    origin: Vec<f64>,
    spacing: Vec<f64>,
    /// Row-major.
    direction: Vec<f64>,
    components: usize,
    values: Vec<f64>,
}

fn py(python: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/formats_check.py");
    let out = Command::new(python).arg(script).args(args.iter().map(|a| a.as_ref())).output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn sitk_info(python: &Path, path: &Path) -> Info {
    let json = path.with_file_name(format!("{}.json", path.file_name().unwrap().to_string_lossy()));
    py(python, &[&"info", &path, &json]);
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

/// The largest difference between our grid and SimpleITK's origin, spacing and direction (LPS),
/// over the axes SimpleITK has (2 for a 2D image, whose third axis here is +z by convention).
fn geometry_diff(g: &Grid, info: &Info) -> f64 {
    let n = info.size.len();
    assert_eq!(&g.shape()[..n], &info.size[..], "shape");
    let m = g.matrix(Space::Voxel, Space::Lps);
    let spacing = g.spacing();
    let mut d = 0.0f64;
    for r in 0..n {
        d = d.max((m[(r, 3)] - info.origin[r]).abs());
        d = d.max((spacing[r] - info.spacing[r]).abs());
        for c in 0..n {
            d = d.max((m[(r, c)] / spacing[c] - info.direction[r * n + c]).abs());
        }
    }
    if n == 2 {
        for r in 0..2 {
            d = d.max(m[(r, 2)].abs()).max(m[(2, r)].abs());
        }
        d = d.max(m[(2, 3)].abs());
    }
    d
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "number of values");
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max)
}

/// Whether float32 values equal SimpleITK's: serde_json may parse a decimal 1 ulp off in f64,
/// never in f32.
fn same_f32(a: &[f32], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| x == y as f32)
}

fn max_rel_diff(a: &Volume, b: &Volume) -> f32 {
    let (lo, hi) = a.range();
    a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / (hi - lo)
}

/// Every NRRD and MetaImage flavour SimpleITK writes reads with SimpleITK's geometry and voxels.
#[test]
fn files_written_by_simpleitk() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    py(&python, &[&"make-images", &dir.path()]);
    let truth: BTreeMap<String, Info> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("truth.json")).unwrap()).unwrap();
    assert_eq!(truth.len(), 12);
    let mut worst = 0.0f64;
    for (name, info) in &truth {
        let p = dir.path().join(name);
        let v = io::read_image(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        let d = geometry_diff(&v.grid, info);
        assert!(d < 1e-5, "{name}: geometry differs from SimpleITK's by {d}");
        assert_eq!(io::read_grid(&p).unwrap(), v.grid, "{name}: grid from the header alone");
        // float32 holds the int16/uint16/uint8 values exactly, the float64 ones to 1e-7
        let dv = max_abs_diff(&v.data, &info.values);
        assert!(dv <= 1e-4, "{name}: voxels differ by {dv}");
        if !name.starts_with('f') {
            let l = io::read_label_map(&p);
            // the signed images hold negative values
            assert_eq!(l.is_ok(), name.starts_with('u'), "{name}: {l:?}");
        }
        worst = worst.max(d);
    }
    println!("max geometry difference to SimpleITK over {} files: {worst:.2e}", truth.len());
}

fn oblique() -> Grid {
    let r =
        Rotation3::from_euler_angles(0.25, -0.4, 0.9).into_inner() * Matrix3::from_diagonal(&[1.0, 1.0, -1.0].into());
    Grid::from_parts([9, 7, 5], [0.6, 1.7, 2.9], [-31.5, 12.0, 60.25], r).unwrap()
}

fn flat() -> Grid {
    let r = Rotation3::from_euler_angles(0.0, 0.0, -0.3).into_inner();
    Grid::from_parts([8, 6, 1], [0.9, 1.4, 1.0], [5.0, -3.0, 0.0], r).unwrap()
}

/// Volumes, label maps and fields obelisk writes as `.nrrd` and `.mha` read the same in
/// SimpleITK, 3D and 2D.
#[test]
fn files_written_by_obelisk() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut worst = 0.0f64;
    for (g, tag) in [(oblique(), "3d"), (flat(), "2d")] {
        let n = g.num_voxels();
        let v = Volume::new(g.clone(), 1, (0..n).map(|x| (x as f32 * 0.37).sin() * 100.0).collect()).unwrap();
        let l = Labels::new(g.clone(), (0..n as u32).map(|x| x % 5 * 300).collect()).unwrap();
        let comps = if g.is_2d() { 2 } else { 3 };
        let mut u: Vec<f32> = (0..3 * n).map(|x| (x as f32 * 0.11).cos() * 4.0).collect();
        u[comps * n..].fill(0.0);
        let f = DisplacementField::new(g.clone(), u).unwrap();
        for ext in ["nrrd", "mha"] {
            let pv = dir.path().join(format!("v{tag}.{ext}"));
            io::write_image(&pv, &v).unwrap();
            let info = sitk_info(&python, &pv);
            worst = worst.max(geometry_diff(&g, &info));
            assert_eq!(info.components, 1);
            assert!(same_f32(&v.data, &info.values), "{}", pv.display());

            let pl = dir.path().join(format!("l{tag}.{ext}"));
            io::write_label_map(&pl, &l).unwrap();
            let info = sitk_info(&python, &pl);
            worst = worst.max(geometry_diff(&g, &info));
            assert_eq!(l.data.iter().map(|&x| x as f64).collect::<Vec<_>>(), info.values, "{}", pl.display());

            let pf = dir.path().join(format!("f{tag}.{ext}"));
            io::write_field(&pf, &f).unwrap();
            let info = sitk_info(&python, &pf);
            worst = worst.max(geometry_diff(&g, &info));
            assert_eq!(info.components, comps, "{}", pf.display());
            // SimpleITK interleaves the components; ours are channel-major
            let interleaved: Vec<f32> =
                (0..n).flat_map(|i| (0..comps).map(|c| f.data[c * n + i]).collect::<Vec<_>>()).collect();
            assert!(same_f32(&interleaved, &info.values), "{}", pf.display());
        }
    }
    println!("max geometry difference, obelisk-written files read by SimpleITK: {worst:.2e}");
    assert!(worst < 1e-9, "{worst}");
}

/// A DICOM series SimpleITK wrote (oblique, anisotropic, rescaled int16, files out of slice
/// order) reads as SimpleITK's ImageSeriesReader reads it.
#[test]
fn dicom_series_written_by_simpleitk() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (series, nii, json) = (dir.path().join("series"), dir.path().join("sitk.nii.gz"), dir.path().join("sitk.json"));
    py(&python, &[&"make-dicom", &series, &nii, &json]);
    let info: Info = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let v = io::read_image(&series).unwrap();
    let d = geometry_diff(&v.grid, &info);
    println!("DICOM series: geometry difference to SimpleITK {d:.2e}");
    assert!(d < 1e-5, "geometry differs from SimpleITK's by {d}");
    assert!(same_f32(&v.data, &info.values));
    let theirs = io::read_image(&nii).unwrap();
    assert!(theirs.grid.same_as(&v.grid, 1e-5), "{:?} vs {:?}", theirs.grid, v.grid);
    assert_eq!(theirs.data, v.data);
    assert_eq!(io::read_grid(&series).unwrap(), v.grid);
    // the CLI takes the folder as an image: a zero field on its own grid (in double precision,
    // as .mha holds it) returns it unchanged
    let field = dir.path().join("zero.mha");
    io::write_field(&field, &DisplacementField::zeros(v.grid.clone())).unwrap();
    let out = dir.path().join("out.nrrd");
    common::ok(&["warp", "--quiet", "--moving", s(&series), "--field", s(&field), "--out", s(&out)]);
    let w = io::read_image(&out).unwrap();
    assert!(w.grid.same_as(&v.grid, 1e-9));
    let d = max_rel_diff(&v, &w);
    assert!(d < 1e-6, "zero field changed the series by {d} of its range");
}

/// A displacement field SimpleITK writes as `.mha` or `.nrrd` warps exactly as its `.nii.gz`
/// twin, and as SimpleITK resamples with it.
#[test]
fn simpleitk_fields_in_every_format_warp_alike() {
    let Some(python) = python() else { return };
    let itk = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/itk_check.py");
    let run = |args: &[&dyn AsRef<std::ffi::OsStr>]| {
        let out = Command::new(&python).arg(&itk).args(args.iter().map(|a| a.as_ref())).output().unwrap();
        assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    };
    let dir = tempfile::tempdir().unwrap();
    let g = oblique();
    let n = g.num_voxels();
    let phantom: Vec<f32> = (0..n)
        .map(|v| {
            let [i, j, k] = [v % 9, v / 9 % 7, v / 63];
            (i as f32 * 0.7).sin() * 50.0 + (j as f32 * 0.5).cos() * 30.0 + k as f32 * 10.0 + 100.0
        })
        .collect();
    let (fixed, moving) = (dir.path().join("fixed.nii.gz"), dir.path().join("moving.mha"));
    io::write_image(&fixed, &Volume::new(g.clone(), 1, phantom.clone()).unwrap()).unwrap();
    io::write_image(&moving, &Volume::new(g, 1, phantom).unwrap()).unwrap();
    let mut outs = Vec::new();
    for ext in ["nii.gz", "mha", "nrrd"] {
        let field = dir.path().join(format!("field.{ext}"));
        run(&[&"make-field", &fixed, &field, &"5", &"3.0"]);
        let out = dir.path().join(format!("warped_{}.nii.gz", ext.replace('.', "_")));
        common::ok(&[
            "warp",
            "--quiet",
            "--moving",
            s(&moving),
            "--field",
            s(&field),
            "--reference",
            s(&fixed),
            "--out",
            s(&out),
        ]);
        outs.push(io::read_image(&out).unwrap());
        if ext == "mha" {
            let theirs = dir.path().join("sitk.nii.gz");
            run(&[&"resample", &moving, &fixed, &field, &theirs]);
            let d = max_rel_diff(&io::read_image(&theirs).unwrap(), &outs[1]);
            println!(".mha field: max difference to SimpleITK {d:.2e} of the range");
            assert!(d < 1e-3, "{d}");
        }
    }
    // the same field: NIfTI stores its grid in float32, the others in double precision
    for (o, ext) in outs[1..].iter().zip(["mha", "nrrd"]) {
        assert!(o.grid.same_as(&outs[0].grid, 1e-4), ".{ext}");
        let d = max_rel_diff(&outs[0], o);
        println!(".{ext} field vs .nii.gz: max difference {d:.2e} of the range");
        assert!(d < 1e-4, ".{ext} field warps differently from .nii.gz: {d}");
    }
    assert_eq!(outs[1], outs[2], ".mha and .nrrd fields hold the same doubles");
}

/// A truncated or broken input of each new format: non-zero exit, a message naming the file, no
/// panic, no output.
#[test]
fn broken_inputs_fail_cleanly_in_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let g = oblique();
    let n = g.num_voxels();
    let v = Volume::new(g.clone(), 1, (0..n).map(|x| x as f32).collect()).unwrap();
    let field = dir.path().join("zero.nii.gz");
    io::write_field(&field, &DisplacementField::zeros(g)).unwrap();
    let cut = |p: &Path, keep: f64| {
        let b = std::fs::read(p).unwrap();
        std::fs::write(p, &b[..(b.len() as f64 * keep) as usize]).unwrap();
    };
    let mut cases: Vec<(std::path::PathBuf, std::path::PathBuf, &str)> = Vec::new();
    for name in ["t.nrrd", "t.mha"] {
        let p = dir.path().join(name);
        io::write_image(&p, &v).unwrap();
        cut(&p, 0.8);
        cases.push((p.clone(), p, "truncated"));
    }
    // detached headers with short data files, raw and compressed
    let raw: Vec<u8> = v.data.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(dir.path().join("t.raw"), &raw[..raw.len() - 4]).unwrap();
    let nhdr = dir.path().join("t.nhdr");
    std::fs::write(
        &nhdr,
        "NRRD0004\ntype: float\ndimension: 3\nsizes: 9 7 5\nendian: little\nencoding: raw\ndata file: t.raw\n",
    )
    .unwrap();
    cases.push((nhdr.clone(), nhdr, "truncated"));
    let mhd = dir.path().join("t.mhd");
    std::fs::write(
        &mhd,
        "NDims = 3\nDimSize = 9 7 5\nElementType = MET_FLOAT\nCompressedData = True\nElementDataFile = t.raw\n",
    )
    .unwrap();
    cases.push((mhd.clone(), mhd, "corrupt zlib"));
    let unknown = dir.path().join("enc.nrrd");
    std::fs::write(&unknown, "NRRD0004\ntype: float\ndimension: 3\nsizes: 9 7 5\nendian: little\nencoding: bzip2\n\n")
        .unwrap();
    cases.push((unknown.clone(), unknown, "encoding"));
    let mut cases_dicom = Vec::new();
    // a DICOM folder that holds no DICOM, and a field given as a folder
    let empty = dir.path().join("empty_series");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "nothing").unwrap();
    cases_dicom.push((empty.clone(), empty.clone(), "no DICOM files"));
    for (moving, culprit, expect) in cases.iter().chain(&cases_dicom) {
        let out = dir.path().join("out.nii.gz");
        let err = fails(&["warp", "--moving", s(moving), "--field", s(&field), "--out", s(&out)]);
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains(&culprit.display().to_string()), "does not name {}: {err}", culprit.display());
        assert!(err.contains(expect), "expected {expect:?}: {err}");
        assert!(!out.exists());
    }
    let moving = dir.path().join("ok.nii.gz");
    io::write_image(&moving, &v).unwrap();
    let out = dir.path().join("out.nii.gz");
    let err = fails(&["warp", "--moving", s(&moving), "--field", s(&empty), "--out", s(&out)]);
    assert!(err.contains("displacement field is a"), "{err}");
    let err = fails(&["warp", "--moving", s(&moving), "--field", s(&field), "--out", s(&dir.path().join("o.mhd"))]);
    assert!(err.contains("o.mhd") && err.contains(".mha"), "{err}");
}

/// A manual check on ITK's example data (Debian's `insighttoolkit5-examples`, unpacked by
/// `data-scripts/fetch_corpus.sh` under `data/cache/corpus-src/itk/`): every NRRD and
/// MetaImage there that SimpleITK reads as a scalar image reads here with its geometry and
/// voxels. Run with `OBELISK_ITK_EXAMPLES=<the Data folder> cargo test --test formats -- --ignored`.
#[test]
#[ignore = "needs ITK's example data: set OBELISK_ITK_EXAMPLES"]
fn itk_example_data() {
    let Some(python) = python() else { return };
    let Some(dir) = std::env::var_os("OBELISK_ITK_EXAMPLES") else {
        println!("SKIPPED: OBELISK_ITK_EXAMPLES is not set");
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| io::Format::of(p).is_ok_and(|f| matches!(f, io::Format::Nrrd | io::Format::MetaImage)))
        .collect();
    names.sort();
    let (mut checked, mut worst) = (0, 0.0f64);
    for p in &names {
        let json = scratch.path().join("info.json");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/formats_check.py");
        let out = Command::new(&python).arg(script).arg("info").arg(p).arg(&json).output().unwrap();
        if !out.status.success() {
            println!("{}: SimpleITK cannot read it either", p.display());
            continue;
        }
        let info: Info = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        match io::read_image(p) {
            Ok(v) => {
                let d = geometry_diff(&v.grid, &info);
                let dv = max_abs_diff(&v.data, &info.values);
                println!("{}: geometry {d:.1e}, voxels {dv:.1e}", p.display());
                assert!(d < 1e-5 && dv < 1e-3, "{}: differs from SimpleITK", p.display());
                worst = worst.max(d);
                checked += 1;
            }
            Err(e) => {
                println!("{e}");
                assert!(info.components > 1 || info.size.len() > 3, "{}: SimpleITK reads a scalar image", p.display());
            }
        }
    }
    println!("{checked} of {} files read as SimpleITK reads them; max geometry difference {worst:.1e}", names.len());
}
