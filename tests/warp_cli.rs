//! `obelisk warp` end to end on PNG images and label maps.

use std::process::Command;

use obelisk::io;
use registration::{DisplacementField, Labels, Volume};

fn run(args: &[&std::path::Path], flags: &[&str]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_obelisk"));
    cmd.args(["--threads", "2", "--quiet", "warp"]).args(flags);
    for (name, p) in ["--moving", "--field", "--out"].iter().zip(args) {
        cmd.arg(name).arg(p);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A PNG's grid is the identity in LPS, so +1 mm in LPS x reads the pixel one column to the right.
#[test]
fn png_with_2d_field_shifts_by_one_pixel() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (9, 6);
    let grid = io::png::png_grid(w, h).unwrap();
    let n = w * h;
    let img = Volume::new(grid.clone(), 1, (0..n).map(|x| (x * 4 % 251) as f32).collect()).unwrap();
    let labels = Labels::new(grid.clone(), (0..n as u32).map(|x| x % 7 * 40).collect()).unwrap();
    let (moving, moving_l) = (dir.path().join("m.png"), dir.path().join("l.png"));
    io::write_image(&moving, &img).unwrap();
    io::write_label_map(&moving_l, &labels).unwrap();
    let mut u = vec![0.0f32; 3 * n];
    u[..n].fill(1.0);
    u[n..2 * n].fill(-2.0);
    let field = dir.path().join("f.nii.gz");
    io::write_field(&field, &DisplacementField::new(grid, u).unwrap()).unwrap();
    let (out, out_l) = (dir.path().join("w.png"), dir.path().join("wl.nii.gz"));
    run(&[&moving, &field, &out], &[]);
    run(&[&moving_l, &field, &out_l], &["--labels"]);
    let warped = io::read_image(&out).unwrap();
    let warped_l = io::read_label_map(&out_l).unwrap();
    for j in 0..h {
        for i in 0..w {
            let v = j * w + i;
            let inside = i + 1 < w && j >= 2;
            let src = if inside { (j - 2) * w + i + 1 } else { 0 };
            let want = if inside { img.data[src] } else { 0.0 };
            assert_eq!(warped.data[v], want, "pixel ({i},{j})");
            assert_eq!(warped_l.data[v], if inside { labels.data[src] } else { 0 }, "label ({i},{j})");
        }
    }
}
