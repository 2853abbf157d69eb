use nalgebra::{Matrix3, Rotation3};

use super::*;

fn grid(shape: [usize; 3], spacing: [f64; 3]) -> Grid {
    Grid::from_spacing(shape, spacing, [3.0, -7.0, 11.0]).unwrap()
}

/// Label map with `label` on the box `[lo, lo + size)` (voxel indices).
fn cube(g: &Grid, boxes: &[([usize; 3], [usize; 3], u32)]) -> Labels {
    let [nx, ny, nz] = g.shape();
    let mut data = vec![0; g.num_voxels()];
    for &(lo, size, label) in boxes {
        for k in lo[2]..(lo[2] + size[2]).min(nz) {
            for j in lo[1]..(lo[1] + size[1]).min(ny) {
                for i in lo[0]..(lo[0] + size[0]).min(nx) {
                    data[(k * ny + j) * nx + i] = label;
                }
            }
        }
    }
    Labels::new(g.clone(), data).unwrap()
}

fn field_from(g: &Grid, u: impl Fn([f64; 3]) -> [f64; 3]) -> DisplacementField {
    let [nx, ny, nz] = g.shape();
    let n = g.num_voxels();
    let mut data = vec![0f32; 3 * n];
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let v = (k * ny + j) * nx + i;
                let x = g.map([i as f64, j as f64, k as f64], Space::Voxel, Space::Lps);
                let d = u(x);
                (0..3).for_each(|c| data[c * n + v] = d[c] as f32);
            }
        }
    }
    DisplacementField::new(g.clone(), data).unwrap()
}

#[test]
fn identical_labels_give_dice_one_and_hd95_zero() {
    let g = grid([20, 18, 16], [1.0, 1.5, 2.0]);
    let l = cube(&g, &[([2, 3, 4], [8, 6, 5], 1), ([11, 2, 1], [5, 9, 9], 7)]);
    assert_eq!(dice_per_label(&l, &l).unwrap(), vec![(1, 1.0), (7, 1.0)]);
    assert_eq!(hd95_mm(&l, &l, 1).unwrap(), Some(0.0));
    assert_eq!(hd95_mm(&l, &l, 7).unwrap(), Some(0.0));
    assert_eq!(hd95_mm(&l, &l, 3).unwrap(), None);
}

#[test]
fn offset_cubes_have_known_dice_and_hd95() {
    let spacing = [1.5, 1.0, 2.5];
    let g = grid([30, 26, 24], spacing);
    let s = 10;
    for k in 1..4 {
        for axis in 0..3 {
            let mut lo = [6, 5, 4];
            let a = cube(&g, &[(lo, [s; 3], 3)]);
            lo[axis] += k;
            let b = cube(&g, &[(lo, [s; 3], 3)]);
            let dice = dice_per_label(&a, &b).unwrap();
            assert_eq!(dice.len(), 1);
            assert!((dice[0].1 - (s - k) as f64 / s as f64).abs() < 1e-12, "{dice:?}");
            let h = hd95_mm(&a, &b, 3).unwrap().unwrap();
            assert!((h - k as f64 * spacing[axis]).abs() < 1e-9, "k {k} axis {axis}: {h}");
        }
    }
}

#[test]
fn disjoint_and_one_sided_labels() {
    let g = grid([12, 12, 12], [1.0; 3]);
    let a = cube(&g, &[([0, 0, 0], [3, 3, 3], 1), ([6, 6, 6], [2, 2, 2], 2)]);
    let b = cube(&g, &[([0, 0, 0], [3, 3, 3], 2)]);
    assert_eq!(dice_per_label(&a, &b).unwrap(), vec![(1, 0.0), (2, 0.0)]);
    assert_eq!(hd95_mm(&a, &b, 1).unwrap(), None);
    // all distances between the 2³ cube at 6..8 and the 3³ cube at 0..3 are √(3·k²)-like; the
    // largest is from (7,7,7) to (0,0,0)
    let h = hd95_mm(&a, &b, 2).unwrap().unwrap();
    assert!(h > 3.0 * 3f64.sqrt() && h <= 7.0 * 3f64.sqrt(), "{h}");
    let other = cube(&grid([12, 12, 11], [1.0; 3]), &[]);
    assert!(matches!(dice_per_label(&a, &other), Err(Error::GridMismatch { b: [12, 12, 11], .. })));
    assert!(matches!(hd95_mm(&a, &other, 1), Err(Error::GridMismatch { .. })));
}

#[test]
fn masked_dice_only_counts_masked_voxels() {
    let g = grid([10, 4, 4], [1.0; 3]);
    // a covers x in 0..6, b covers x in 2..10 (label 5) and a stray label 9 at x = 9
    let a = cube(&g, &[([0, 0, 0], [6, 4, 4], 5)]);
    let mut b = cube(&g, &[([2, 0, 0], [8, 4, 4], 5)]);
    let [nx, _, _] = g.shape();
    for v in 0..b.data.len() {
        if v % nx == 9 {
            b.data[v] = 9;
        }
    }
    let mask: Vec<bool> = (0..g.num_voxels()).map(|v| v % nx < 5).collect();
    // inside x < 5: a has 5 columns, b has 3 (x = 2..5), overlap 3 → 2·3/(5+3)
    let d = dice_per_label_masked(&a, &b, &mask).unwrap();
    assert_eq!(d, vec![(5, 0.75)]);
    let full = dice_per_label(&a, &b).unwrap();
    assert_eq!(full[0], (5, 2.0 * 4.0 / (6.0 + 7.0)));
    assert_eq!(full[1], (9, 0.0));
    assert!(dice_per_label_masked(&a, &b, &mask[1..]).is_err());
}

#[test]
fn hd95_on_a_2d_grid_uses_in_plane_surfaces() {
    let g = grid([20, 20, 1], [0.5, 0.5, 3.0]);
    let a = cube(&g, &[([4, 4, 0], [8, 8, 1], 1)]);
    let b = cube(&g, &[([6, 4, 0], [8, 8, 1], 1)]);
    assert_eq!(hd95_mm(&a, &b, 1).unwrap(), Some(1.0));
}

#[test]
fn edt_matches_brute_force_with_anisotropic_spacing() {
    let shape = [9, 7, 6];
    let spacing = [0.7, 1.3, 2.1];
    let n = shape.iter().product::<usize>();
    let feature: Vec<bool> = (0..n).map(|v| (v * 7919 + 13) % 37 == 0).collect();
    let d = edt_squared(&feature, shape, spacing);
    let pos = |v: usize| [v % shape[0], (v / shape[0]) % shape[1], v / (shape[0] * shape[1])];
    for (v, &dv) in d.iter().enumerate() {
        let p = pos(v);
        let best = (0..n)
            .filter(|&w| feature[w])
            .map(|w| {
                let q = pos(w);
                (0..3).map(|a| ((p[a] as f64 - q[a] as f64) * spacing[a]).powi(2)).sum::<f64>()
            })
            .fold(f64::INFINITY, f64::min);
        assert!((dv - best).abs() < 1e-9, "voxel {p:?}: {dv} vs {best}");
    }
    assert!(edt_squared(&vec![false; n], shape, spacing).iter().all(|v| v.is_infinite()));
}

#[test]
fn identity_field_has_unit_jacobian() {
    let g = grid([8, 7, 6], [1.0, 2.0, 3.0]);
    let (det, stats) = jacobian(&DisplacementField::zeros(g), None).unwrap();
    assert!(det.data.iter().all(|&d| d == 1.0));
    assert_eq!(stats, JacobianStats { sd_log_j: 0.0, fraction_nonpositive: 0.0, min: 1.0, max: 1.0 });
}

#[test]
fn linear_field_has_constant_jacobian_in_world_space() {
    let a = Matrix3::new(0.10, -0.05, 0.02, 0.03, -0.20, 0.04, -0.06, 0.01, 0.15);
    let expect = (Matrix3::identity() + a).determinant();
    let oblique = Grid::from_parts(
        [14, 11, 9],
        [0.8, 1.7, 2.6],
        [-20.0, 35.0, 12.0],
        Rotation3::from_euler_angles(0.4, -0.3, 0.9).into_inner(),
    )
    .unwrap();
    for g in [grid([10, 9, 8], [1.0; 3]), oblique] {
        let u = field_from(&g, |x| {
            let y = a * Vector3::from(x);
            [y[0], y[1], y[2]]
        });
        let (det, stats) = jacobian(&u, None).unwrap();
        for &d in &det.data {
            assert!((f64::from(d) - expect).abs() < 1e-4, "{d} vs {expect}");
        }
        assert!(stats.sd_log_j < 1e-4);
        assert_eq!(stats.fraction_nonpositive, 0.0);
    }
    // A field that is linear in voxel indices but not in world space would give a different
    // answer on the oblique grid: check that the voxel-space shortcut is indeed wrong there.
    assert!(
        ((Matrix3::identity() + a * Matrix3::from_diagonal(&Vector3::new(0.8, 1.7, 2.6))).determinant() - expect).abs()
            > 1e-2
    );
}

#[test]
fn folding_field_is_detected() {
    let g = grid([40, 6, 5], [1.0; 3]);
    // u_x = 6·sin(2πx/20): du/dx = 1.88·cos(·) < −1 on part of each period.
    let u = field_from(&g, |x| [6.0 * (2.0 * std::f64::consts::PI * x[0] / 20.0).sin(), 0.0, 0.0]);
    let (_, s) = jacobian(&u, None).unwrap();
    assert!(s.fraction_nonpositive > 0.1 && s.fraction_nonpositive < 0.6, "{s:?}");
    assert!(s.min < 0.0 && s.max > 2.0 && s.sd_log_j.is_finite() && s.sd_log_j > 0.0, "{s:?}");
}

#[test]
fn jacobian_stats_follow_the_definition() {
    let g = grid([5, 1, 1], [1.0; 3]);
    let e = std::f32::consts::E;
    let det = Volume::new(g, 1, vec![1.0, e, 1.0 / e, -1.0, 0.0]).unwrap();
    let s = jacobian_stats(&det, None).unwrap();
    assert!((s.sd_log_j - (2.0f64 / 3.0).sqrt()).abs() < 1e-6, "{s:?}");
    assert_eq!(s.fraction_nonpositive, 0.4);
    assert_eq!((s.min, s.max), (-1.0, f64::from(e)));
    let m = jacobian_stats(&det, Some(&[true, false, false, true, false])).unwrap();
    assert_eq!((m.sd_log_j, m.fraction_nonpositive, m.min, m.max), (0.0, 0.5, -1.0, 1.0));
    assert!(jacobian_stats(&det, Some(&[false; 5])).is_err());
    assert!(jacobian_stats(&Volume::new(det.grid.clone(), 1, vec![-1.0; 5]).unwrap(), None).unwrap().sd_log_j.is_nan());
}

#[test]
fn endpoint_error_statistics() {
    let g = grid([10, 10, 1], [1.0; 3]);
    let zero = DisplacementField::zeros(g.clone());
    let c = field_from(&g, |_| [3.0, -4.0, 0.0]);
    let e = endpoint_error(&zero, &c, None).unwrap();
    assert_eq!(e, EndpointError { mean_mm: 5.0, p95_mm: 5.0, max_mm: 5.0 });
    // errors 0..99 along the voxel index: mean 49.5, p95 94.05, max 99
    let n = g.num_voxels();
    let mut data = vec![0f32; 3 * n];
    (0..n).for_each(|v| data[2 * n + v] = v as f32);
    let ramp = DisplacementField::new(g.clone(), data).unwrap();
    let e = endpoint_error(&ramp, &zero, None).unwrap();
    assert!((e.mean_mm - 49.5).abs() < 1e-9 && (e.p95_mm - 94.05).abs() < 1e-9 && e.max_mm == 99.0, "{e:?}");
    let mask: Vec<bool> = (0..n).map(|v| v < 10).collect();
    let e = endpoint_error(&ramp, &zero, Some(&mask)).unwrap();
    assert!((e.mean_mm - 4.5).abs() < 1e-9 && e.max_mm == 9.0, "{e:?}");
    let off = endpoint_error(&ramp, &DisplacementField::zeros(grid([10, 10, 2], [1.0; 3])), None);
    assert!(matches!(off, Err(Error::GridMismatch { b: [10, 10, 2], .. })), "{off:?}");
}

#[test]
fn registration_metrics_evaluate_and_serialise() {
    let g = grid([16, 16, 12], [1.0, 1.0, 2.0]);
    let a = cube(&g, &[([2, 2, 2], [6, 6, 6], 1), ([9, 9, 2], [5, 5, 5], 2)]);
    let b = cube(&g, &[([3, 2, 2], [6, 6, 6], 1), ([9, 9, 2], [5, 5, 5], 2)]);
    let names = BTreeMap::from([(1, "liver".to_string())]);
    let field = DisplacementField::zeros(g.clone());
    let m = RegistrationMetrics::evaluate(&a, &b, &field, &names, None)
        .unwrap()
        .with_endpoint_error(endpoint_error(&field, &field, None).unwrap());
    assert_eq!(m.labels.len(), 2);
    assert_eq!(m.labels[0].name.as_deref(), Some("liver"));
    assert_eq!(m.labels[1].name, None);
    assert!((m.labels[0].dice - 5.0 / 6.0).abs() < 1e-12);
    assert_eq!(m.labels[0].hd95_mm, Some(1.0));
    assert_eq!((m.labels[1].dice, m.labels[1].hd95_mm), (1.0, Some(0.0)));
    assert!((m.mean_dice.unwrap() - (5.0 / 6.0 + 1.0) / 2.0).abs() < 1e-12);
    assert_eq!((m.sd_log_j, m.folding_fraction), (Some(0.0), 0.0));
    let json = serde_json::to_string(&m).unwrap();
    let mut back: RegistrationMetrics = serde_json::from_str(&json).unwrap();
    // serde_json's default float parsing may differ from the printed value in the last bit
    assert!((back.mean_dice.unwrap() - m.mean_dice.unwrap()).abs() < 1e-12);
    back.mean_dice = m.mean_dice;
    assert_eq!(back, m);

    // A mask that hides the shifted part: label 1 then agrees exactly where it is visible.
    let mask: Vec<bool> = (0..g.num_voxels()).map(|v| (3..8).contains(&(v % 16))).collect();
    let m = RegistrationMetrics::evaluate(&a, &b, &field, &names, Some(&mask)).unwrap();
    assert_eq!((m.labels[0].dice, m.labels[0].hd95_mm), (1.0, Some(0.0)));
}

#[test]
fn statistics_are_independent_of_thread_count() {
    let g = grid([41, 37, 29], [1.0, 1.1, 1.9]);
    let u = field_from(&g, |x| [2.0 * (x[0] * 0.3).sin(), (x[1] * 0.2 + x[2] * 0.1).cos(), 0.5 * (x[2] * 0.4).sin()]);
    let mask: Vec<bool> = (0..g.num_voxels()).map(|v| v % 7 != 3).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let (det, j) = jacobian(&u, Some(&mask)).unwrap();
            let e = endpoint_error(&u, &DisplacementField::zeros(g.clone()), Some(&mask)).unwrap();
            (det.data, j, e)
        })
    };
    assert_eq!(run(1), run(3));
}
