//! A corpus of broken inputs, generated here (nothing binary is committed), run through every
//! subcommand that reads that kind of file. Each run must fail with exit code 1 (not a panic's
//! 101), say "error:" and name the offending file, write no output, and leave the output folder
//! exactly as it was (a sentinel file keeps its bytes and modification time).

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use candle_core::Device;
use obelisk::io;
use registration::{DisplacementField, Grid, Labels, Volume};
use segmentation::{Architecture, InputNorm, Model, ModelConfig, ObeliskNetConfig};

/// What a slot of a subcommand expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Image,
    Labels,
    Field,
    Model,
    Dataset,
}

/// The good inputs every run starts from; one of them is replaced by a broken file.
struct Fixture {
    dir: PathBuf,
    fixed: PathBuf,
    moving: PathBuf,
    fixed_labels: PathBuf,
    moving_labels: PathBuf,
    field: PathBuf,
    model: PathBuf,
}

fn grid() -> Grid {
    Grid::from_spacing([16, 14, 12], [8.0, 8.0, 8.0], [-60.0, -50.0, -40.0]).unwrap()
}

fn blob(g: &Grid, centre: [f64; 3]) -> Volume {
    let [nx, ny, nz] = g.shape();
    let mut data = Vec::with_capacity(nx * ny * nz);
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let r2 =
                    (i as f64 - centre[0]).powi(2) + (j as f64 - centre[1]).powi(2) + (k as f64 - centre[2]).powi(2);
                data.push((100.0 + 900.0 * (-r2 / 12.0).exp()) as f32);
            }
        }
    }
    Volume::new(g.clone(), 1, data).unwrap()
}

fn labels_of(v: &Volume) -> Labels {
    Labels::new(v.grid.clone(), v.data.iter().map(|&x| u32::from(x > 500.0)).collect()).unwrap()
}

/// A small, untrained OBELISK-Net: loading and running it is all the bad-input cases need.
fn tiny_model() -> Model {
    let cfg = ObeliskNetConfig {
        kernels: 16,
        hidden: 8,
        mid: 8,
        growth: 4,
        dense_layers: 1,
        num_classes: 2,
        pool_kernel: [1, 1, 1],
        ..Default::default()
    };
    let names = vec!["background".to_string(), "blob".to_string()];
    Model::new(ModelConfig::new(Architecture::ObeliskNet(cfg), InputNorm::default(), names), 1, &Device::Cpu).unwrap()
}

fn fixture(dir: &Path) -> Fixture {
    let g = grid();
    let (f, m) = (blob(&g, [7.0, 7.0, 6.0]), blob(&g, [8.0, 6.5, 6.0]));
    let p = |n: &str| dir.join(n);
    io::write_volume(&p("fixed.nii.gz"), &f).unwrap();
    io::write_volume(&p("moving.nii.gz"), &m).unwrap();
    io::write_labels(&p("fixed_labels.nii.gz"), &labels_of(&f)).unwrap();
    io::write_labels(&p("moving_labels.nii.gz"), &labels_of(&m)).unwrap();
    io::write_field(&p("field.nii.gz"), &DisplacementField::zeros(g)).unwrap();
    obelisk::cli::train::save_model(&tiny_model(), &{
        std::fs::create_dir(p("model")).unwrap();
        p("model")
    })
    .unwrap();
    Fixture {
        dir: dir.to_path_buf(),
        fixed: p("fixed.nii.gz"),
        moving: p("moving.nii.gz"),
        fixed_labels: p("fixed_labels.nii.gz"),
        moving_labels: p("moving_labels.nii.gz"),
        field: p("field.nii.gz"),
        model: p("model"),
    }
}

// ---- the corpus -------------------------------------------------------------------------------

/// A broken input: the path to pass, the file the message must name, and a word of the problem.
struct Bad {
    arg: PathBuf,
    culprit: PathBuf,
    expect: &'static str,
}

impl Bad {
    fn file(p: PathBuf, expect: &'static str) -> Self {
        Self { arg: p.clone(), culprit: p, expect }
    }
}

type Maker = fn(&Fixture, &Path) -> Bad;
/// Makes a broken copy of a NIfTI file (first argument) in a folder (second).
type NiftiMaker = fn(&Path, &Path) -> Bad;

/// Cuts the last quarter off a file.
fn truncate(p: &Path) {
    let b = std::fs::read(p).unwrap();
    std::fs::write(p, &b[..b.len() * 3 / 4]).unwrap();
}

/// `.nii` copy of `src` with bytes patched by `patch`.
fn patched(src: &Path, at: &Path, patch: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let dst = at.with_extension("").with_extension("nii");
    let mut d = nii_bytes(src);
    patch(&mut d);
    std::fs::write(&dst, d).unwrap();
    dst
}

/// The uncompressed NIfTI bytes of a (possibly gzipped) file written by obelisk.
fn nii_bytes(src: &Path) -> Vec<u8> {
    use std::io::Read;
    let raw = std::fs::read(src).unwrap();
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).unwrap();
    out
}

fn put_i16(d: &mut [u8], at: usize, v: i16) {
    d[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_f32(d: &mut [u8], at: usize, v: f32) {
    d[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// The image the slot's kind starts from: labels are broken starting from a label map, fields
/// from a field, everything else from the fixed image.
fn source(f: &Fixture, kind: Kind) -> &Path {
    match kind {
        Kind::Labels => &f.fixed_labels,
        Kind::Field => &f.field,
        _ => &f.fixed,
    }
}

/// Header-level damage that every NIfTI reader must reject, whatever the file holds.
fn nifti_cases() -> Vec<(&'static str, NiftiMaker)> {
    vec![
        ("missing", |_, at| Bad::file(at.join("nope.nii.gz"), "not found")),
        ("empty", |_, at| {
            let p = at.join("empty.nii");
            std::fs::write(&p, b"").unwrap();
            Bad::file(p, "truncated")
        }),
        ("truncated gzip", |src, at| {
            let p = at.join("trunc.nii.gz");
            let b = std::fs::read(src).unwrap();
            std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            Bad::file(p, "truncated gzip")
        }),
        ("gzip name, plain data", |src, at| {
            let p = at.join("plain.nii.gz");
            std::fs::write(&p, nii_bytes(src)).unwrap();
            Bad::file(p, "gzip")
        }),
        ("truncated data", |src, at| {
            let p = at.join("short.nii");
            let b = nii_bytes(src);
            std::fs::write(&p, &b[..b.len() - 3]).unwrap();
            Bad::file(p, "truncated")
        }),
        ("bad magic", |src, at| {
            Bad::file(patched(src, &at.join("magic"), |d| d[344..348].copy_from_slice(b"xyz\0")), "magic")
        }),
        ("header size", |src, at| {
            Bad::file(patched(src, &at.join("hsize"), |d| d[0..4].copy_from_slice(&300i32.to_le_bytes())), "348")
        }),
        ("dim[0] = 0", |src, at| Bad::file(patched(src, &at.join("dim0"), |d| put_i16(d, 40, 0)), "dim[0]")),
        ("zero dim", |src, at| Bad::file(patched(src, &at.join("zero"), |d| put_i16(d, 42, 0)), "positive")),
        ("negative dim", |src, at| Bad::file(patched(src, &at.join("neg"), |d| put_i16(d, 44, -7)), "positive")),
        ("huge dims", |src, at| {
            Bad::file(
                patched(src, &at.join("huge"), |d| (0..3).for_each(|a| put_i16(d, 42 + 2 * a, 32767))),
                "absurdly large",
            )
        }),
        ("large dims, small file", |src, at| {
            Bad::file(
                patched(src, &at.join("large"), |d| (0..3).for_each(|a| put_i16(d, 42 + 2 * a, 500))),
                "truncated",
            )
        }),
        ("vox_offset past EOF", |src, at| {
            Bad::file(patched(src, &at.join("voxoff"), |d| put_f32(d, 108, 1.0e6)), "truncated")
        }),
        ("negative vox_offset", |src, at| {
            Bad::file(patched(src, &at.join("voxneg"), |d| put_f32(d, 108, -4.0)), "vox_offset")
        }),
        ("unsupported datatype", |src, at| {
            Bad::file(patched(src, &at.join("dtype"), |d| put_i16(d, 70, 128)), "datatype")
        }),
        ("bitpix mismatch", |src, at| Bad::file(patched(src, &at.join("bitpix"), |d| put_i16(d, 72, 3)), "bitpix")),
        ("NaN orientation", |src, at| {
            Bad::file(patched(src, &at.join("nansform"), |d| put_f32(d, 280, f32::NAN)), "orientation")
        }),
        ("singular orientation", |src, at| {
            Bad::file(
                patched(src, &at.join("singular"), |d| (280..328).step_by(4).for_each(|o| put_f32(d, o, 0.0))),
                "orientation",
            )
        }),
    ]
}

fn image_cases() -> Vec<(&'static str, Maker)> {
    vec![
        ("NaN voxel", |f, at| Bad::file(patched(&f.fixed, &at.join("nan"), |d| put_f32(d, 352 + 40, f32::NAN)), "NaN")),
        ("Inf voxel", |f, at| {
            Bad::file(patched(&f.fixed, &at.join("inf"), |d| put_f32(d, 352 + 4, f32::INFINITY)), "infinite")
        }),
        ("4D image", |_, at| {
            let p = at.join("four_d.nii.gz");
            let g = grid();
            io::write_volume(&p, &Volume::new(g.clone(), 2, vec![1.0; 2 * g.num_voxels()]).unwrap()).unwrap();
            Bad::file(p, "4D")
        }),
        ("5D image", |f, _| Bad::file(f.field.clone(), "4D")),
        ("corrupt PNG", |_, at| {
            let p = at.join("corrupt.png");
            let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
            b.extend_from_slice(&[0, 0, 0, 13, b'I', b'H', b'D', b'R', 0, 0, 0, 9, 0xff, 0xff]);
            std::fs::write(&p, b).unwrap();
            Bad::file(p, "PNG")
        }),
        ("not a PNG", |_, at| {
            let p = at.join("text.png");
            std::fs::write(&p, b"hello").unwrap();
            Bad::file(p, "PNG")
        }),
        ("unknown extension", |_, at| {
            let p = at.join("image.tif");
            std::fs::write(&p, b"II*\0").unwrap();
            Bad::file(p, "unknown file type")
        }),
        ("MetaImage without data", |_, at| {
            let p = at.join("image.mha");
            std::fs::write(&p, b"ObjectType = Image").unwrap();
            Bad::file(p, "ElementDataFile")
        }),
        ("truncated NRRD", |f, at| {
            let p = at.join("short.nrrd");
            io::write_image(&p, &io::read_image(&f.fixed).unwrap()).unwrap();
            truncate(&p);
            Bad::file(p, "truncated")
        }),
        ("vector NRRD", |f, at| {
            let p = at.join("vector.nrrd");
            io::write_field(&p, &io::read_field(&f.field).unwrap()).unwrap();
            Bad::file(p, "vector image")
        }),
        ("folder without DICOM", |_, at| {
            let p = at.join("series");
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("notes.txt"), "no images here").unwrap();
            Bad::file(p, "no DICOM files")
        }),
        ("folder", |_, at| {
            let p = at.join("folder.nii.gz");
            std::fs::create_dir(&p).unwrap();
            Bad::file(p, "folder")
        }),
    ]
}

fn label_cases() -> Vec<(&'static str, Maker)> {
    vec![
        ("non-integer float labels", |_, at| {
            let p = at.join("float_labels.nii.gz");
            let g = grid();
            io::write_volume(&p, &Volume::new(g.clone(), 1, vec![0.5; g.num_voxels()]).unwrap()).unwrap();
            Bad::file(p, "non-integer")
        }),
        ("negative labels", |_, at| {
            let p = at.join("neg_labels.nii.gz");
            let g = grid();
            io::write_volume(&p, &Volume::new(g.clone(), 1, vec![-1.0; g.num_voxels()]).unwrap()).unwrap();
            Bad::file(p, "negative")
        }),
        ("NaN labels", |_, at| {
            let src = at.join("fl.nii.gz");
            io::write_volume(&src, &Volume::new(grid(), 1, vec![1.0; grid().num_voxels()]).unwrap()).unwrap();
            Bad::file(patched(&src, &at.join("nan_labels"), |d| put_f32(d, 352, f32::NAN)), "NaN")
        }),
        ("labels off the image grid", |_, at| {
            let p = at.join("other_grid_labels.nii.gz");
            let g = Grid::from_spacing([16, 14, 11], [8.0; 3], [-60.0, -50.0, -40.0]).unwrap();
            io::write_labels(&p, &Labels::new(g.clone(), vec![1; g.num_voxels()]).unwrap()).unwrap();
            Bad::file(p, "grid")
        }),
        ("4D labels", |f, _| Bad::file(f.field.clone(), "expected a 3D")),
    ]
}

fn field_cases() -> Vec<(&'static str, Maker)> {
    vec![
        ("3-channel image as field", |_, at| {
            let p = at.join("three.nii.gz");
            let g = grid();
            io::write_volume(&p, &Volume::new(g.clone(), 3, vec![0.0; 3 * g.num_voxels()]).unwrap()).unwrap();
            Bad::file(p, "not a displacement field")
        }),
        ("2-component 3D field", |f, at| {
            Bad::file(patched(&f.field, &at.join("two_comp"), |d| put_i16(d, 50, 2)), "not a displacement field")
        }),
        ("scalar image as field", |f, _| Bad::file(f.fixed.clone(), "not a displacement field")),
        ("integer field", |_, at| {
            let p = at.join("int_field.nii");
            let g = grid();
            let [nx, ny, nz] = g.shape();
            let data = vec![0u8; 3 * g.num_voxels()];
            io::nifti::write_raw(&p, &[nx, ny, nz, 1, 3], io::nifti::DataType::U8, &g, &data).unwrap();
            Bad::file(p, "datatype")
        }),
        ("NaN field", |f, at| {
            Bad::file(patched(&f.field, &at.join("nan_field"), |d| put_f32(d, 352 + 8, f32::NAN)), "NaN")
        }),
        ("truncated MetaImage field", |f, at| {
            let p = at.join("short_field.mha");
            io::write_field(&p, &io::read_field(&f.field).unwrap()).unwrap();
            truncate(&p);
            Bad::file(p, "truncated")
        }),
        ("field as PNG", |_, at| {
            let p = at.join("field.png");
            image::GrayImage::new(4, 4).save(&p).unwrap();
            Bad::file(p, "")
        }),
    ]
}

fn model_cases() -> Vec<(&'static str, Maker)> {
    fn copy_model(f: &Fixture, at: &Path, name: &str) -> PathBuf {
        let d = at.join(name);
        std::fs::create_dir(&d).unwrap();
        for e in std::fs::read_dir(&f.model).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    }
    fn broken(f: &Fixture, at: &Path, file: &str, bytes: &[u8], expect: &'static str) -> Bad {
        let d = copy_model(f, at, &format!("model_{}", file.replace('.', "_")));
        std::fs::write(d.join(file), bytes).unwrap();
        Bad { culprit: d.join(file), arg: d, expect }
    }
    vec![
        ("missing model folder", |_, at| Bad::file(at.join("no_model"), "not found")),
        ("model is a file", |f, _| Bad::file(f.fixed.clone(), "folder")),
        ("corrupt safetensors", |f, at| {
            broken(f, at, "model.safetensors", b"\x08\0\0\0\0\0\0\0{garbage", "safetensors")
        }),
        ("truncated safetensors", |f, at| {
            let b = std::fs::read(f.model.join("model.safetensors")).unwrap();
            broken(f, at, "model.safetensors", &b[..b.len() / 2], "safetensors")
        }),
        ("corrupt config", |f, at| broken(f, at, "config.json", b"{\"architecture\": ", "config.json")),
        ("config of another schema", |f, at| broken(f, at, "config.json", b"{\"layers\": 3}", "config.json")),
        ("config with absurd sizes", |f, at| {
            let mut c: serde_json::Value =
                serde_json::from_slice(&std::fs::read(f.model.join("config.json")).unwrap()).unwrap();
            c["architecture"]["kernels"] = serde_json::json!(1u64 << 40);
            broken(f, at, "config.json", c.to_string().as_bytes(), "config.json")
        }),
        ("inconsistent config", |f, at| {
            let mut c: serde_json::Value =
                serde_json::from_slice(&std::fs::read(f.model.join("config.json")).unwrap()).unwrap();
            c["num_classes"] = serde_json::json!(7);
            broken(f, at, "config.json", c.to_string().as_bytes(), "config.json")
        }),
        ("weights of another model", |f, at| {
            let mut c: serde_json::Value =
                serde_json::from_slice(&std::fs::read(f.model.join("config.json")).unwrap()).unwrap();
            c["architecture"]["hidden"] = serde_json::json!(12);
            broken(f, at, "config.json", c.to_string().as_bytes(), "shape")
        }),
        ("missing weights", |f, at| {
            let d = copy_model(f, at, "model_noweights");
            std::fs::remove_file(d.join("model.safetensors")).unwrap();
            Bad { culprit: d.join("model.safetensors"), arg: d, expect: "" }
        }),
    ]
}

fn dataset_cases() -> Vec<(&'static str, Maker)> {
    fn ds(at: &Path, name: &str, v: serde_json::Value) -> PathBuf {
        let p = at.join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p
    }
    fn entry(at: &Path, name: &str, image: &Path, label: &Path) -> PathBuf {
        ds(
            at,
            name,
            serde_json::json!({"labels": {"0": "background", "1": "blob"},
                               "training": [{"image": image, "label": label}]}),
        )
    }
    vec![
        ("missing dataset", |_, at| Bad::file(at.join("nope.json"), "not found")),
        ("corrupt JSON", |_, at| {
            let p = at.join("corrupt.json");
            std::fs::write(&p, b"{\"training\": [").unwrap();
            Bad::file(p, "dataset")
        }),
        ("JSON of another schema", |_, at| {
            Bad::file(ds(at, "schema.json", serde_json::json!({"images": []})), "training")
        }),
        ("empty training list", |_, at| Bad::file(ds(at, "empty.json", serde_json::json!({"training": []})), "empty")),
        ("missing image", |f, at| {
            let missing = f.dir.join("no_such_image.nii.gz");
            Bad { arg: entry(at, "missing_img.json", &missing, &f.fixed_labels), culprit: missing, expect: "not found" }
        }),
        ("missing label map", |f, at| {
            let missing = f.dir.join("no_such_labels.nii.gz");
            Bad { arg: entry(at, "missing_lab.json", &f.fixed, &missing), culprit: missing, expect: "not found" }
        }),
        ("corrupt image", |f, at| {
            let p = at.join("trunc_img.nii.gz");
            let b = std::fs::read(&f.fixed).unwrap();
            std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            Bad { arg: entry(at, "corrupt_img.json", &p, &f.fixed_labels), culprit: p, expect: "truncated" }
        }),
        ("labels off the image grid", |f, at| {
            let p = at.join("grid_lab.nii.gz");
            let g = Grid::from_spacing([16, 14, 11], [8.0; 3], [0.0; 3]).unwrap();
            io::write_labels(&p, &Labels::new(g.clone(), vec![1; g.num_voxels()]).unwrap()).unwrap();
            Bad { arg: entry(at, "grid_lab.json", &f.fixed, &p), culprit: p, expect: "grid" }
        }),
        ("label not in the labels map", |f, at| {
            let p = at.join("big_lab.nii.gz");
            let g = grid();
            io::write_labels(&p, &Labels::new(g.clone(), vec![5; g.num_voxels()]).unwrap()).unwrap();
            Bad { arg: entry(at, "big_lab.json", &f.fixed, &p), culprit: p, expect: "not in the labels map" }
        }),
    ]
}

// ---- subcommands and their input slots -------------------------------------------------------

/// One input of one subcommand: the command line with `bad` in that slot, writing into `out`
/// (a folder that holds only the sentinel).
struct Slot {
    name: &'static str,
    kind: Kind,
    args: fn(&Fixture, &Path, &Path) -> Vec<OsString>,
}

/// (slot, case) pairs where the "broken" file is valid input: `warp --labels` resamples a label
/// map from any grid.
const VALID: &[(&str, &str)] = &[("warp --moving --labels", "labels off the image grid")];

fn os(v: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    v.iter().map(|s| s.as_ref().to_os_string()).collect()
}

fn propagate(
    out: &Path,
    target: &Path,
    atlas: &Path,
    atlas_labels: &Path,
    extra: &[&dyn AsRef<std::ffi::OsStr>],
) -> Vec<OsString> {
    let mut a = os(&[
        &"propagate",
        &"--target",
        &target,
        &"--atlas",
        &atlas,
        &atlas_labels,
        &"--out",
        &out.join("p.nii.gz"),
        &"--iterations",
        &"3",
        &"--affine-iterations",
        &"0",
    ]);
    a.extend(os(extra));
    a
}

fn register(out: &Path, fixed: &Path, moving: &Path, extra: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    let mut a = os(&[
        &"register",
        &"--fixed",
        &fixed,
        &"--moving",
        &moving,
        &"--out",
        &out,
        &"--iterations",
        &"3",
        &"--affine-iterations",
        &"0",
        &"--no-pictures",
    ]);
    a.extend(os(extra));
    a
}

fn slots() -> Vec<Slot> {
    vec![
        Slot { name: "register --fixed", kind: Kind::Image, args: |f, b, o| register(o, b, &f.moving, &[]) },
        Slot { name: "register --moving", kind: Kind::Image, args: |f, b, o| register(o, &f.fixed, b, &[]) },
        Slot {
            name: "register --fixed-labels",
            kind: Kind::Labels,
            args: |f, b, o| register(o, &f.fixed, &f.moving, &[&"--fixed-labels", &b]),
        },
        Slot {
            name: "register --moving-labels",
            kind: Kind::Labels,
            args: |f, b, o| register(o, &f.fixed, &f.moving, &[&"--moving-labels", &b]),
        },
        Slot {
            name: "register --truth",
            kind: Kind::Field,
            args: |f, b, o| register(o, &f.fixed, &f.moving, &[&"--truth", &b]),
        },
        Slot {
            name: "register --model",
            kind: Kind::Model,
            args: |f, b, o| register(o, &f.fixed, &f.moving, &[&"--features", &"obelisk", &"--model", &b]),
        },
        Slot {
            name: "warp --moving",
            kind: Kind::Image,
            args: |f, b, o| os(&[&"warp", &"--moving", &b, &"--field", &f.field, &"--out", &o.join("w.nii.gz")]),
        },
        Slot {
            name: "warp --moving --labels",
            kind: Kind::Labels,
            args: |f, b, o| {
                os(&[&"warp", &"--labels", &"--moving", &b, &"--field", &f.field, &"--out", &o.join("w.nii.gz")])
            },
        },
        Slot {
            name: "warp --field",
            kind: Kind::Field,
            args: |f, b, o| os(&[&"warp", &"--moving", &f.moving, &"--field", &b, &"--out", &o.join("w.nii.gz")]),
        },
        Slot {
            name: "warp --reference",
            kind: Kind::Image,
            args: |f, b, o| {
                os(&[
                    &"warp",
                    &"--moving",
                    &f.moving,
                    &"--field",
                    &f.field,
                    &"--reference",
                    &b,
                    &"--out",
                    &o.join("w.nii.gz"),
                ])
            },
        },
        Slot {
            name: "eval --fixed-labels",
            kind: Kind::Labels,
            args: |f, b, _| os(&[&"eval", &"--fixed-labels", &b, &"--warped-labels", &f.moving_labels]),
        },
        Slot {
            name: "eval --warped-labels",
            kind: Kind::Labels,
            args: |f, b, _| os(&[&"eval", &"--fixed-labels", &f.fixed_labels, &"--warped-labels", &b]),
        },
        Slot {
            name: "eval --field",
            kind: Kind::Field,
            args: |f, b, _| {
                os(&[&"eval", &"--fixed-labels", &f.fixed_labels, &"--warped-labels", &f.moving_labels, &"--field", &b])
            },
        },
        Slot {
            name: "eval --truth",
            kind: Kind::Field,
            args: |f, b, _| {
                os(&[
                    &"eval",
                    &"--fixed-labels",
                    &f.fixed_labels,
                    &"--warped-labels",
                    &f.moving_labels,
                    &"--field",
                    &f.field,
                    &"--truth",
                    &b,
                ])
            },
        },
        Slot {
            name: "grid --field",
            kind: Kind::Field,
            args: |_, b, o| os(&[&"grid", &"--field", &b, &"--out", &o.join("g.png"), &"--jacobian", &o.join("j.png")]),
        },
        Slot {
            name: "grid --image",
            kind: Kind::Image,
            args: |f, b, o| os(&[&"grid", &"--field", &f.field, &"--image", &b, &"--out", &o.join("g.png")]),
        },
        Slot {
            name: "view --image",
            kind: Kind::Image,
            args: |_, b, o| os(&[&"view", &"--image", &b, &"--out", &o.join("v.png")]),
        },
        Slot {
            name: "view --labels",
            kind: Kind::Labels,
            args: |f, b, o| os(&[&"view", &"--image", &f.fixed, &"--labels", &b, &"--out", &o.join("v.png")]),
        },
        Slot {
            name: "segment --image",
            kind: Kind::Image,
            args: |f, b, o| os(&[&"segment", &"--model", &f.model, &"--image", &b, &"--out", &o.join("s.nii.gz")]),
        },
        Slot {
            name: "segment --model",
            kind: Kind::Model,
            args: |f, b, o| os(&[&"segment", &"--model", &b, &"--image", &f.fixed, &"--out", &o.join("s.nii.gz")]),
        },
        Slot {
            name: "propagate --target",
            kind: Kind::Image,
            args: |f, b, o| propagate(o, b, &f.moving, &f.moving_labels, &[]),
        },
        Slot {
            name: "propagate --atlas IMAGE",
            kind: Kind::Image,
            args: |f, b, o| propagate(o, &f.fixed, b, &f.moving_labels, &[]),
        },
        Slot {
            name: "propagate --atlas LABELS",
            kind: Kind::Labels,
            args: |f, b, o| propagate(o, &f.fixed, &f.moving, b, &[]),
        },
        Slot {
            name: "propagate --target-labels",
            kind: Kind::Labels,
            args: |f, b, o| propagate(o, &f.fixed, &f.moving, &f.moving_labels, &[&"--target-labels", &b]),
        },
        Slot {
            name: "propagate --model",
            kind: Kind::Model,
            args: |f, b, o| {
                propagate(o, &f.fixed, &f.moving, &f.moving_labels, &[&"--features", &"obelisk", &"--model", &b])
            },
        },
        Slot {
            name: "features --image",
            kind: Kind::Image,
            args: |_, b, o| os(&[&"features", &"--image", &b, &"--out", &o.join("f.nii.gz")]),
        },
        Slot {
            name: "features --model",
            kind: Kind::Model,
            args: |f, b, o| {
                os(&[
                    &"features",
                    &"--image",
                    &f.fixed,
                    &"--features",
                    &"obelisk",
                    &"--model",
                    &b,
                    &"--out",
                    &o.join("f.nii.gz"),
                ])
            },
        },
        Slot {
            name: "train --dataset",
            kind: Kind::Dataset,
            args: |_, b, o| os(&[&"train", &"--dataset", &b, &"--out", &o, &"--iterations", &"1"]),
        },
    ]
}

/// The sentinel's bytes and modification time, and the folder's listing.
fn snapshot(out: &Path) -> (Vec<u8>, SystemTime, Vec<PathBuf>) {
    let s = out.join("sentinel.txt");
    let mut names: Vec<PathBuf> = std::fs::read_dir(out).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    (std::fs::read(&s).unwrap(), std::fs::metadata(&s).unwrap().modified().unwrap(), names)
}

/// Runs one case and returns a description of every broken promise (empty when all held).
fn check(f: &Fixture, slot: &Slot, case: &str, bad: &Bad, out: &Path) -> Vec<String> {
    check_args(slot, case, bad, out, (slot.args)(f, &bad.arg, out))
}

fn check_args(slot: &Slot, case: &str, bad: &Bad, out: &Path, args: Vec<OsString>) -> Vec<String> {
    let before = snapshot(out);
    let res = Command::new(env!("CARGO_BIN_EXE_obelisk")).arg("--quiet").args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr).trim_end().to_string();
    let mut problems = Vec::new();
    let mut fail = |m: String| problems.push(format!("[{}] {case}: {m}\n    stderr: {stderr}", slot.name));
    if res.status.code() != Some(1) {
        fail(format!("exit status {:?}, expected 1", res.status.code()));
    }
    if stderr.contains("panicked") {
        fail("panicked".into());
    }
    if !stderr.starts_with("error: ") || stderr.lines().count() != 1 {
        fail("not a one-line error".into());
    }
    if !stderr.contains(&bad.culprit.display().to_string()) {
        fail(format!("does not name {}", bad.culprit.display()));
    }
    if !stderr.contains(bad.expect) {
        fail(format!("does not say {:?}", bad.expect));
    }
    if snapshot(out) != before {
        fail(format!("output folder changed: {:?}", snapshot(out).2));
    }
    problems
}

fn run_kind(kinds: &[Kind]) {
    let tmp = tempfile::tempdir().unwrap();
    let f = fixture(tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("sentinel.txt"), b"untouched").unwrap();
    let mut problems = Vec::new();
    let mut runs = 0;
    for slot in slots().iter().filter(|s| kinds.contains(&s.kind)) {
        let mut cases: Vec<(String, Bad)> = Vec::new();
        let at = tmp.path().join(format!("bad_{runs}"));
        std::fs::create_dir(&at).unwrap();
        let src = source(&f, slot.kind).to_path_buf();
        if matches!(slot.kind, Kind::Image | Kind::Labels | Kind::Field) {
            for (i, (name, make)) in nifti_cases().into_iter().enumerate() {
                let sub = at.join(format!("n{i}"));
                std::fs::create_dir(&sub).unwrap();
                cases.push((name.to_string(), make(&src, &sub)));
            }
        }
        let specific = match slot.kind {
            Kind::Image => image_cases(),
            Kind::Labels => label_cases(),
            Kind::Field => field_cases(),
            Kind::Model => model_cases(),
            Kind::Dataset => dataset_cases(),
        };
        for (i, (name, make)) in specific.into_iter().enumerate() {
            let sub = at.join(format!("s{i}"));
            std::fs::create_dir(&sub).unwrap();
            cases.push((name.to_string(), make(&f, &sub)));
        }
        for (name, bad) in cases.iter().filter(|(n, _)| !VALID.contains(&(slot.name, n.as_str()))) {
            problems.extend(check(&f, slot, name, bad, &out));
            runs += 1;
            // a run that broke the contract must not spoil the next ones
            for e in std::fs::read_dir(&out).unwrap() {
                let p = e.unwrap().path();
                if p.file_name().unwrap() != "sentinel.txt" {
                    let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{} of {runs} runs broke the contract:\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn broken_images() {
    run_kind(&[Kind::Image]);
}

#[test]
fn broken_label_maps() {
    run_kind(&[Kind::Labels]);
}

#[test]
fn broken_fields() {
    run_kind(&[Kind::Field]);
}

#[test]
fn broken_models() {
    run_kind(&[Kind::Model]);
}

#[test]
fn broken_datasets() {
    run_kind(&[Kind::Dataset]);
}

/// Files that are each valid but do not fit together, or that are degenerate.
#[test]
fn inputs_that_do_not_fit_together() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fixture(tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("sentinel.txt"), b"untouched").unwrap();
    let p = |n: &str| tmp.path().join(n);

    // the moving image 10 m away: no translation lets the two overlap
    let far = p("far.nii.gz");
    let fg = Grid::from_spacing([16, 14, 12], [8.0; 3], [10_000.0, -50.0, -40.0]).unwrap();
    io::write_volume(&far, &blob(&fg, [8.0, 6.5, 6.0])).unwrap();
    // a truth field on another grid than the fixed image
    let off = p("off_grid_field.nii.gz");
    io::write_field(&off, &DisplacementField::zeros(Grid::from_spacing([16, 14, 12], [7.0; 3], [0.0; 3]).unwrap()))
        .unwrap();
    // a 2D image against a 3D one
    let flat = p("flat.png");
    image::GrayImage::from_fn(16, 14, |x, y| image::Luma([(x * 8 + y) as u8])).save(&flat).unwrap();

    let mut problems = Vec::new();
    let mut case = |name: &'static str, args: Vec<OsString>, culprit: &Path, expect: &'static str| {
        let slot = Slot { name, kind: Kind::Image, args: |_, _, _| Vec::new() };
        let bad = Bad { arg: PathBuf::new(), culprit: culprit.to_path_buf(), expect };
        problems.extend(check_args(&slot, name, &bad, &out, args));
    };
    // (--init com and search move the moving image onto the fixed one, whatever the headers say)
    case("no overlap", register(&out, &f.fixed, &far, &[&"--init", &"none"]), &far, "overlap");
    case("truth off the fixed grid", register(&out, &f.fixed, &f.moving, &[&"--truth", &off]), &off, "grid");
    case("2D against 3D", register(&out, &flat, &f.moving, &[]), &flat, "2D");
    #[rustfmt::skip]
    case("eval truth off the field grid",
         os(&[&"eval", &"--fixed-labels", &f.fixed_labels, &"--warped-labels", &f.moving_labels, &"--field", &f.field,
              &"--truth", &off]),
         &off, "grid");
    #[rustfmt::skip]
    case("eval field off the label grid",
         os(&[&"eval", &"--fixed-labels", &f.fixed_labels, &"--warped-labels", &f.moving_labels, &"--field", &off]),
         &off, "grid");
    #[rustfmt::skip]
    case("grid image off the field grid",
         os(&[&"grid", &"--field", &off, &"--image", &f.fixed, &"--out", &out.join("g.png")]),
         &f.fixed, "grid");
    #[rustfmt::skip]
    case("warp reference off the field grid",
         os(&[&"warp", &"--moving", &f.moving, &"--field", &off, &"--reference", &f.fixed, &"--out", &out.join("w.nii")]),
         &f.fixed, "grid");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Volumes one voxel thick along some axis are legal; every command either handles them or
/// refuses them cleanly, and never panics.
#[test]
fn one_voxel_thick_volumes() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fixture(tmp.path());
    let mut problems = Vec::new();
    for (i, shape) in [[1, 14, 12], [16, 1, 12], [16, 14, 1], [1, 1, 12], [1, 1, 1]].into_iter().enumerate() {
        let g = Grid::from_spacing(shape, [8.0; 3], [0.0; 3]).unwrap();
        let (a, b) = (tmp.path().join(format!("thin{i}_a.nii.gz")), tmp.path().join(format!("thin{i}_b.nii.gz")));
        io::write_volume(&a, &blob(&g, [0.0, 5.0, 5.0])).unwrap();
        io::write_volume(&b, &blob(&g, [0.0, 6.0, 5.0])).unwrap();
        let labels = tmp.path().join(format!("thin{i}_l.nii.gz"));
        io::write_labels(&labels, &labels_of(&io::read_image(&a).unwrap())).unwrap();
        let out = tmp.path().join(format!("out{i}"));
        let field = out.join("field.nii.gz");
        let runs: Vec<(&str, Vec<OsString>)> = vec![
            ("register", register(&out, &a, &b, &[&"--moving-labels", &labels, &"--fixed-labels", &labels])),
            ("view", os(&[&"view", &"--image", &a, &"--labels", &labels, &"--out", &out.join("v.png")])),
            ("segment", os(&[&"segment", &"--model", &f.model, &"--image", &a, &"--out", &out.join("s.nii.gz")])),
            ("grid", os(&[&"grid", &"--field", &field, &"--image", &a, &"--out", &out.join("g.png")])),
            ("warp", os(&[&"warp", &"--moving", &b, &"--field", &field, &"--out", &out.join("w.nii.gz")])),
            ("eval", os(&[&"eval", &"--fixed-labels", &labels, &"--warped-labels", &labels, &"--field", &field])),
        ];
        for (name, args) in runs {
            let res = Command::new(env!("CARGO_BIN_EXE_obelisk")).arg("--quiet").args(&args).output().unwrap();
            let stderr = String::from_utf8_lossy(&res.stderr);
            let ok = match res.status.code() {
                Some(0) => true,
                // a refusal is fine when it is a clean one-line error about an input
                Some(1) => {
                    stderr.starts_with("error: ")
                        && stderr.trim_end().lines().count() == 1
                        && (stderr.contains(a.to_str().unwrap()) || stderr.contains(field.to_str().unwrap()))
                }
                _ => false,
            };
            if !ok || stderr.contains("panicked") {
                problems.push(format!("{name} on {shape:?}: {:?} {stderr}", res.status.code()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
