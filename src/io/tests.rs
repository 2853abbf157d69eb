use std::path::{Path, PathBuf};

use nalgebra::{Matrix3, Matrix4, Rotation3};
use registration::{DisplacementField, Grid, Labels, Volume};

use super::nifti::{write_raw, DataType};
use super::*;

pub(super) fn oblique() -> Grid {
    let r = Rotation3::from_euler_angles(0.3, -0.2, 0.7).into_inner();
    Grid::from_parts([7, 5, 4], [0.8, 1.3, 2.5], [-12.0, 40.0, 7.5], r).unwrap()
}

/// Oblique with a left-handed voxel axis order (negative determinant: qfac = −1).
pub(super) fn flipped() -> Grid {
    let r =
        Rotation3::from_euler_angles(-0.1, 0.4, 0.2).into_inner() * Matrix3::from_diagonal(&[1.0, 1.0, -1.0].into());
    Grid::from_parts([6, 5, 3], [1.1, 0.9, 3.0], [5.0, -7.0, 2.0], r).unwrap()
}

fn ramp(grid: &Grid) -> Volume {
    let n = grid.num_voxels();
    Volume::new(grid.clone(), 1, (0..n).map(|x| x as f32 * 0.5 - 3.0).collect()).unwrap()
}

fn tmp(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

fn close_affine(a: &Matrix4<f64>, b: &Matrix4<f64>, tol: f64) -> bool {
    (a - b).abs().max() < tol
}

fn patch(path: &Path, offset: usize, bytes: &[u8]) {
    let mut d = std::fs::read(path).unwrap();
    d[offset..offset + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, d).unwrap();
}

pub(super) fn err_of<T: std::fmt::Debug>(r: Result<T, IoError>, path: &Path) -> String {
    let e = r.unwrap_err().to_string();
    assert!(e.starts_with(&path.display().to_string()), "error does not start with the path: {e}");
    e
}

#[test]
fn volume_round_trip_nii_and_gz() {
    let dir = tempfile::tempdir().unwrap();
    for g in [oblique(), flipped()] {
        let v = ramp(&g);
        for name in ["a.nii", "a.nii.gz"] {
            let p = tmp(&dir, name);
            write_volume(&p, &v).unwrap();
            let r = read_volume(&p).unwrap();
            assert_eq!(r.data, v.data);
            assert!(r.grid.same_as(&v.grid, 1e-5), "{:?} vs {:?}", r.grid, v.grid);
            std::fs::remove_file(&p).unwrap();
        }
    }
}

/// The qform we write decodes to the same affine as the sform (both orientations' handedness).
#[test]
fn qform_alone_gives_the_same_affine() {
    let dir = tempfile::tempdir().unwrap();
    for g in [oblique(), flipped()] {
        let p = tmp(&dir, "q.nii");
        write_volume(&p, &ramp(&g)).unwrap();
        patch(&p, 254, &0i16.to_le_bytes());
        let r = read_volume(&p).unwrap();
        assert!(close_affine(r.grid.affine(), g.affine(), 1e-5), "{}\nvs\n{}", r.grid.affine(), g.affine());
        // neither form: the pixdim diagonal
        patch(&p, 252, &0i16.to_le_bytes());
        let r = read_volume(&p).unwrap();
        let s = g.spacing();
        let want = Matrix4::from_diagonal(&[s[0], s[1], s[2], 1.0].into());
        assert!(close_affine(r.grid.affine(), &want, 1e-5));
    }
}

#[test]
fn all_datatypes_with_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let g = Grid::from_spacing([3, 2, 2], [1.0, 2.0, 3.0], [0.0; 3]).unwrap();
    let vals: Vec<i64> = vec![0, 1, 2, 3, 7, 9, 11, 20, 33, 50, 64, 100];
    let cases: Vec<(DataType, Vec<u8>)> = vec![
        (DataType::U8, vals.iter().map(|&v| v as u8).collect()),
        (DataType::I8, vals.iter().map(|&v| -(v as i8)).collect::<Vec<i8>>().iter().map(|&v| v as u8).collect()),
        (DataType::I16, vals.iter().flat_map(|&v| (-(v as i16)).to_le_bytes()).collect()),
        (DataType::U16, vals.iter().flat_map(|&v| (v as u16).to_le_bytes()).collect()),
        (DataType::I32, vals.iter().flat_map(|&v| (-(v as i32)).to_le_bytes()).collect()),
        (DataType::U32, vals.iter().flat_map(|&v| (v as u32).to_le_bytes()).collect()),
        (DataType::I64, vals.iter().flat_map(|&v| (-v).to_le_bytes()).collect()),
        (DataType::F32, vals.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect()),
        (DataType::F64, vals.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect()),
    ];
    for (t, bytes) in cases {
        let signed = matches!(t, DataType::I8 | DataType::I16 | DataType::I32 | DataType::I64);
        let sign = if signed { -1.0 } else { 1.0 };
        let p = tmp(&dir, "t.nii");
        write_raw(&p, &[3, 2, 2], t, &g, &bytes).unwrap();
        let r = read_volume(&p).unwrap();
        let want: Vec<f32> = vals.iter().map(|&v| sign * v as f32).collect();
        assert_eq!(r.data, want, "{t:?}");
        // slope 2, intercept −1
        patch(&p, 112, &2f32.to_le_bytes());
        patch(&p, 116, &(-1f32).to_le_bytes());
        let r = read_volume(&p).unwrap();
        assert_eq!(r.data, want.iter().map(|v| 2.0 * v - 1.0).collect::<Vec<_>>(), "{t:?} scaled");
        // slope 0 means no scaling
        patch(&p, 112, &0f32.to_le_bytes());
        assert_eq!(read_volume(&p).unwrap().data, want, "{t:?} slope 0");
    }
}

#[test]
fn corrupt_headers_are_rejected_without_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "c.nii");
    let fresh = || write_volume(&p, &ramp(&oblique())).unwrap();
    fresh();
    patch(&p, 344, b"xyz\0");
    assert!(err_of(read_volume(&p), &p).contains("magic"));
    fresh();
    patch(&p, 0, &100i32.to_le_bytes());
    assert!(err_of(read_volume(&p), &p).contains("sizeof_hdr"));
    fresh();
    patch(&p, 44, &0i16.to_le_bytes());
    assert!(err_of(read_volume(&p), &p).contains("positive"));
    fresh();
    patch(&p, 40, &9i16.to_le_bytes());
    assert!(err_of(read_volume(&p), &p).contains("dim[0]"));
    fresh();
    patch(&p, 70, &77i16.to_le_bytes());
    assert!(err_of(read_volume(&p), &p).contains("datatype"));
    fresh();
    // huge dims in a small file: rejected from the file length, nothing allocated
    for (k, d) in [32000i16, 32000, 32000].iter().enumerate() {
        patch(&p, 42 + 2 * k, &d.to_le_bytes());
    }
    assert!(err_of(read_volume(&p), &p).contains("absurdly"));
    fresh();
    patch(&p, 42, &300i16.to_le_bytes());
    assert!(err_of(read_volume(&p), &p).contains("truncated"));
    fresh();
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 10).unwrap();
    assert!(err_of(read_volume(&p), &p).contains("truncated"));
    let q = tmp(&dir, "missing.nii");
    assert!(err_of(read_volume(&q), &q).contains("not found"));
}

#[test]
fn truncated_and_corrupt_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "c.nii.gz");
    write_volume(&p, &ramp(&oblique())).unwrap();
    let full = std::fs::read(&p).unwrap();
    std::fs::write(&p, &full[..full.len() / 2]).unwrap();
    assert!(err_of(read_volume(&p), &p).contains("truncated gzip"));
    std::fs::write(&p, &full[..full.len() - 4]).unwrap();
    err_of(read_volume(&p), &p);
    let mut bad = full.clone();
    let m = bad.len() / 2;
    bad[m] ^= 0xff;
    std::fs::write(&p, &bad).unwrap();
    err_of(read_volume(&p), &p);
    std::fs::write(&p, b"not gzip at all").unwrap();
    err_of(read_volume(&p), &p);
}

#[test]
fn non_finite_and_4d_images() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "n.nii");
    let mut v = ramp(&oblique());
    v.data[3] = f32::NAN;
    write_volume(&p, &v).unwrap();
    assert!(err_of(read_volume(&p), &p).contains("NaN"));
    assert!(nifti::read_volume_unchecked(&p, false).unwrap().data[3].is_nan());
    let g = oblique();
    let two = Volume::new(g.clone(), 2, (0..2 * g.num_voxels()).map(|x| x as f32).collect()).unwrap();
    write_volume(&p, &two).unwrap();
    assert!(err_of(read_volume(&p), &p).contains("4D"));
    let r = read_volume_channels(&p).unwrap();
    assert_eq!((r.channels, &r.data), (2, &two.data));
    assert!(r.grid.same_as(&g, 1e-5));
}

#[test]
fn labels_read_write_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let g = oblique();
    let n = g.num_voxels();
    for scale in [1u32, 1000, 100_000] {
        let l = Labels::new(g.clone(), (0..n as u32).map(|x| (x % 7) * scale).collect()).unwrap();
        let p = tmp(&dir, "l.nii.gz");
        write_labels(&p, &l).unwrap();
        let r = read_labels(&p).unwrap();
        assert_eq!(r.data, l.data);
    }
    let p = tmp(&dir, "f.nii");
    let mut v = ramp(&g);
    assert!(err_of(
        read_labels({
            write_volume(&p, &v).unwrap();
            &p
        }),
        &p
    )
    .contains("negative"));
    v.data.iter_mut().for_each(|x| *x = x.abs());
    write_volume(&p, &v).unwrap();
    assert!(err_of(read_labels(&p), &p).contains("non-integer"));
    v.data.iter_mut().for_each(|x| *x = x.round());
    write_volume(&p, &v).unwrap();
    read_labels(&p).unwrap();
    // a label map must lie on its image's grid; the message names both files
    let img = tmp(&dir, "img.nii");
    write_volume(&img, &ramp(&flipped())).unwrap();
    let e = err_of(read_labels_for(&p, &read_image(&img).unwrap().grid, &img), &p);
    assert!(e.contains(&img.display().to_string()), "{e}");
    read_labels_for(&p, &g, &img).unwrap();
}

#[test]
fn fields_round_trip_3d_and_2d() {
    let dir = tempfile::tempdir().unwrap();
    let g = oblique();
    let n = g.num_voxels();
    let f = DisplacementField::new(g.clone(), (0..3 * n).map(|x| (x as f32).sin()).collect()).unwrap();
    let p = tmp(&dir, "w.nii.gz");
    write_field(&p, &f).unwrap();
    let r = read_field(&p).unwrap();
    assert_eq!(r.data, f.data);
    assert!(r.grid.same_as(&g, 1e-5));
    // an image is not a field, and a field is not an image
    assert!(err_of(read_volume(&p), &p).contains("vector"));
    let img = tmp(&dir, "i.nii");
    write_volume(&img, &ramp(&g)).unwrap();
    assert!(err_of(read_field(&img), &img).contains("not a displacement field"));

    let g2 = Grid::from_parts(
        [6, 4, 1],
        [0.7, 1.2, 1.0],
        [3.0, 4.0, 0.0],
        Rotation3::from_euler_angles(0.0, 0.0, 0.4).into_inner(),
    )
    .unwrap();
    let n2 = g2.num_voxels();
    let mut data: Vec<f32> = (0..3 * n2).map(|x| x as f32 * 0.1).collect();
    data[2 * n2..].fill(0.0);
    let f2 = DisplacementField::new(g2.clone(), data).unwrap();
    let p2 = tmp(&dir, "w2.nii");
    write_field(&p2, &f2).unwrap();
    assert_eq!(read_field(&p2).unwrap().data, f2.data);
    // dim[5] = 1 component: not a vector field
    patch(&p2, 42 + 2 * 4, &1i16.to_le_bytes());
    assert!(err_of(read_field(&p2), &p2).contains("not a displacement field"));
}

#[test]
fn png_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let g = png::png_grid(5, 3).unwrap();
    let v8 = Volume::new(g.clone(), 1, (0..15).map(|x| (x * 17) as f32).collect()).unwrap();
    let p = tmp(&dir, "a.png");
    write_image(&p, &v8).unwrap();
    assert_eq!(read_image(&p).unwrap(), v8);
    let v16 = Volume::new(g.clone(), 1, (0..15).map(|x| (x * 4000) as f32).collect()).unwrap();
    write_image(&p, &v16).unwrap();
    assert_eq!(read_image(&p).unwrap(), v16);
    let l = Labels::new(g.clone(), (0..15).map(|x| x * 300).collect()).unwrap();
    write_label_map(&p, &l).unwrap();
    assert_eq!(read_label_map(&p).unwrap(), l);
    // RGB becomes luminance
    let rgb =
        image::RgbImage::from_fn(2, 1, |x, _| if x == 0 { image::Rgb([255, 0, 0]) } else { image::Rgb([10, 10, 10]) });
    rgb.save(&p).unwrap();
    let r = read_image(&p).unwrap();
    assert!((r.data[0] - 0.299 * 255.0).abs() < 1e-3 && (r.data[1] - 10.0).abs() < 1e-3, "{:?}", r.data);
    assert!(err_of(read_label_map(&p), &p).contains("greyscale"));
    // 3D volumes do not fit a PNG
    assert!(err_of(write_image(&p, &ramp(&oblique())), &p).contains("2D"));
    std::fs::write(&p, b"\x89PNG\r\n\x1a\nbroken").unwrap();
    err_of(read_image(&p), &p);
}

#[test]
fn grid_from_the_header_alone() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "g.nii.gz");
    write_volume(&p, &ramp(&flipped())).unwrap();
    assert!(read_grid(&p).unwrap().same_as(&flipped(), 1e-5));
    let q = tmp(&dir, "g.png");
    write_image(&q, &Volume::zeros(png::png_grid(4, 3).unwrap())).unwrap();
    assert_eq!(read_grid(&q).unwrap(), png::png_grid(4, 3).unwrap());
}

/// Without qform or sform the pixdim diagonal is all the geometry there is: a zero or NaN voxel
/// size on an axis the image has is an error naming the file, not a silent 1 mm.
#[test]
fn unusable_pixdim_without_forms_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "p.nii");
    for (axis, bad) in [(1usize, 0.0f32), (2, f32::NAN), (3, -2.0)] {
        write_volume(&p, &ramp(&oblique())).unwrap();
        patch(&p, 252, &0i16.to_le_bytes());
        patch(&p, 254, &0i16.to_le_bytes());
        patch(&p, 76 + 4 * axis, &bad.to_le_bytes());
        let e = err_of(read_volume(&p), &p);
        assert!(e.contains(&format!("pixdim[{axis}]")) && e.contains("neither qform nor sform"), "{e}");
        assert!(err_of(read_grid(&p), &p).contains("pixdim"));
    }
    // a 2D image's unused third pixdim does not matter
    let g = Grid::from_spacing([4, 3, 1], [0.5, 0.7, 1.0], [0.0; 3]).unwrap();
    write_volume(&p, &ramp(&g)).unwrap();
    patch(&p, 254, &0i16.to_le_bytes());
    patch(&p, 252, &0i16.to_le_bytes());
    patch(&p, 76 + 12, &0f32.to_le_bytes());
    let s = read_volume(&p).unwrap().grid.spacing();
    assert!((s[0] - 0.5).abs() + (s[1] - 0.7).abs() + (s[2] - 1.0).abs() < 1e-6, "{s:?}");
}

/// Images, label maps and fields written as `.nrrd` and `.mha` read back exactly, on oblique,
/// left-handed and 2D grids; a 2D grid is written as ITK writes 2D images.
#[test]
fn nrrd_and_metaimage_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let flat = Grid::from_parts(
        [6, 4, 1],
        [0.7, 1.1, 1.0],
        [3.0, -2.0, 0.0],
        Rotation3::from_euler_angles(0.0, 0.0, 0.4).into_inner(),
    )
    .unwrap();
    for name in ["a.nrrd", "a.mha"] {
        let p = tmp(&dir, name);
        for g in [oblique(), flipped(), flat.clone()] {
            let n = g.num_voxels();
            let v = ramp(&g);
            write_image(&p, &v).unwrap();
            let r = read_image(&p).unwrap();
            assert_eq!(r.data, v.data);
            assert!(r.grid.same_as(&g, 1e-12), "{name}: {:?} vs {g:?}", r.grid);
            assert_eq!(read_grid(&p).unwrap(), r.grid);
            let l = Labels::new(g.clone(), (0..n as u32).map(|x| x * 100_000).collect()).unwrap();
            write_label_map(&p, &l).unwrap();
            assert_eq!(read_label_map(&p).unwrap(), l);
            let mut u: Vec<f32> = (0..3 * n).map(|x| x as f32 * 0.1).collect();
            if g.is_2d() {
                u[2 * n..].fill(0.0);
            }
            let f = DisplacementField::new(g.clone(), u).unwrap();
            write_field(&p, &f).unwrap();
            assert_eq!(read_field(&p).unwrap(), f);
            assert!(err_of(read_image(&p), &p).contains("vector image"), "{name}: a field is not an image");
        }
        let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()[..200]).into_owned();
        let two_d = if name.ends_with("nrrd") { "space dimension: 2" } else { "NDims = 2" };
        assert!(text.contains(two_d), "{text}");
    }
    for name in ["a.nhdr", "a.mhd"] {
        let p = tmp(&dir, name);
        assert!(err_of(write_image(&p, &ramp(&oblique())), &p).contains("detached headers are read, not written"));
    }
}
