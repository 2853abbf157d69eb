use candle_core::{Device, Tensor};
use segmentation::ops::{grid_sample, Interpolation, Padding};

use super::*;
use crate::transform::grid_points_lps;
use crate::Space;

/// A smooth test image: Gaussian blobs, evaluated at LPS points.
fn blobs(p: [f64; 3]) -> f64 {
    let centres = [
        ([10.0, 12.0, 8.0], 7.0, 1.0),
        ([-14.0, 4.0, -10.0], 9.0, 0.8),
        ([2.0, -16.0, 12.0], 6.0, 0.9),
        ([-6.0, -4.0, -2.0], 5.0, 0.7),
        ([16.0, -10.0, -14.0], 8.0, 0.6),
        ([-18.0, 18.0, 16.0], 7.0, 0.5),
    ];
    centres
        .iter()
        .map(|(c, s, a)| {
            let r2: f64 = (0..3).map(|i| (p[i] - c[i]).powi(2)).sum();
            a * (-r2 / (2.0 * s * s)).exp()
        })
        .sum()
}

fn grid() -> Grid {
    Grid::from_spacing([36, 36, 36], [2.0; 3], [-35.0, -35.0, -35.0]).unwrap()
}

fn render(g: &Grid, f: impl Fn([f64; 3]) -> f64 + Sync) -> Volume {
    let data = grid_points_lps(g).into_iter().map(|p| f(p) as f32).collect();
    Volume::new(g.clone(), 1, data).unwrap()
}

/// Mean endpoint error (mm) over the central part of the grid.
fn interior_epe(field: &DisplacementField, truth: impl Fn([f64; 3]) -> [f64; 3]) -> f64 {
    let g = &field.grid;
    let [nx, ny, nz] = g.shape();
    let (mut sum, mut n) = (0.0, 0);
    for k in nz / 4..3 * nz / 4 {
        for j in ny / 4..3 * ny / 4 {
            for i in nx / 4..3 * nx / 4 {
                let v = (k * ny + j) * nx + i;
                let p = g.map([i as f64, j as f64, k as f64], Space::Voxel, Space::Lps);
                let t = truth(p);
                let u = field.at(v);
                sum += (0..3).map(|a| (u[a] as f64 - t[a]).powi(2)).sum::<f64>().sqrt();
                n += 1;
            }
        }
    }
    sum / n as f64
}

/// No affine stage, and the two feature levels only: the test images are smooth blobs, whose
/// local NCC at full resolution (a 10 mm window over Gaussians of 5–9 mm) barely sees a shift.
fn quick() -> MethodConfig {
    let mut c = MethodConfig { affine_iterations: 0, ..Default::default() };
    c.levels.retain(|l| !l.intensities_only);
    c
}

#[test]
fn recovers_a_translation() {
    let g = grid();
    let t = [3.0, -2.0, 1.5];
    let fixed = render(&g, blobs);
    let moving = render(&g, |p| blobs([p[0] - t[0], p[1] - t[1], p[2] - t[2]]));
    let r = register_from(&Maps::new(&fixed, &moving), &g, &Affine::default(), &quick(), &mut silent()).unwrap();
    let epe = interior_epe(&r.field, |_| t);
    eprintln!("translation EPE {epe}");
    assert!(epe < 1.0, "EPE {epe} mm (voxel 2 mm)");
}

/// NCC of the intensities recovers a translation between images of different gain and offset
/// (the L1 of their raw values would not), alone and beside the features' L1, and refuses
/// intensity maps off the features' grid.
#[test]
fn ncc_recovers_a_translation_across_a_linear_intensity_change() {
    let g = grid();
    let t = [3.0, -2.0, 1.5];
    let fixed = render(&g, blobs);
    let plain = render(&g, |p| blobs([p[0] - t[0], p[1] - t[1], p[2] - t[2]]));
    let moving = render(&g, |p| 2.0 * blobs([p[0] - t[0], p[1] - t[1], p[2] - t[2]]) + 0.5);
    // beside the L1, the features (here the plain images) must be comparable themselves
    for (similarity, features) in [(Similarity::ncc(2), &moving), (Similarity::l1_ncc(2), &plain)] {
        let cfg = MethodConfig { similarity, ..quick() };
        let maps = Maps { deformable: Some((&fixed, &moving)), ..Maps::new(&fixed, features) };
        let r = register_from(&maps, &g, &Affine::default(), &cfg, &mut silent()).unwrap();
        let epe = interior_epe(&r.field, |_| t);
        eprintln!("{similarity:?}: translation EPE {epe}");
        assert!(epe < 1.0, "{similarity:?}: EPE {epe} mm (voxel 2 mm)");
    }
    let coarse = Volume::zeros(g.resized([18, 18, 18]));
    let maps = Maps { deformable: Some((&coarse, &coarse)), ..Maps::new(&fixed, &moving) };
    let cfg = MethodConfig { similarity: Similarity::l1_ncc(2), ..quick() };
    let err = register_from(&maps, &g, &Affine::default(), &cfg, &mut silent()).err().expect("grid mismatch");
    assert!(matches!(err, Error::GridMismatch { .. }), "{err}");
}

/// The moving image sampled at the points themselves, as an exact feature source.
struct Sampled(Volume, Tensor);

impl PointFeatures for Sampled {
    fn grid(&self) -> &Grid {
        &self.0.grid
    }
    fn channels(&self) -> usize {
        self.0.channels
    }
    fn at(&self, points: &Tensor) -> Result<Tensor> {
        Ok(grid_sample(&self.1, points, Interpolation::Linear, Padding::Border)?)
    }
}

/// Exact sampling of a source that is the moving map itself must give the same registration
/// as interpolating the map, when no level downsamples (the maps are then the map itself).
#[test]
fn exact_mode_equals_map_mode_on_the_map_itself() {
    let g = grid();
    let t = [3.0, -2.0, 1.5];
    let fixed = render(&g, blobs);
    let moving = render(&g, |p| blobs([p[0] - t[0], p[1] - t[1], p[2] - t[2]]));
    let (d, h, w) = g.dhw();
    let tensor = Tensor::from_vec(moving.data.clone(), (1, 1, d, h, w), &Device::Cpu).unwrap();
    let exact = Sampled(moving.clone(), tensor);
    let cfg = MethodConfig {
        levels: vec![LevelConfig {
            shrink: 1,
            control_shrink: 3,
            iterations: 25,
            diffusion: None,
            intensities_only: false,
        }],
        ..Default::default()
    };
    let a = register_from(&Maps::new(&fixed, &moving), &g, &Affine::default(), &cfg, &mut silent()).unwrap();
    let b = register_from(
        &Maps { exact: Some(&exact), ..Maps::new(&fixed, &moving) },
        &g,
        &Affine::default(),
        &cfg,
        &mut silent(),
    )
    .unwrap();
    assert_eq!(a.losses.len(), b.losses.len());
    // the map mode's fused loss sums in another order than candle's ops: the same values up
    // to f32 round-off, which the iterations carry on
    for (i, (x, y)) in a.losses.iter().zip(&b.losses).enumerate() {
        let tol = if i < 3 { 1e-6 } else { 1e-3 };
        assert!((x.loss - y.loss).abs() <= tol * x.loss.abs().max(1e-6), "{x:?} vs {y:?}");
    }
    let diff = (0..g.num_voxels())
        .map(|v| (0..3).map(|c| (a.field.at(v)[c] - b.field.at(v)[c]).abs()).fold(0.0f32, f32::max))
        .fold(0.0f32, f32::max);
    // (round-off steers the two runs apart by hundredths of a millimetre over the level)
    assert!(diff < 0.05, "fields differ by {diff} mm");
    // and it registers: the deformable level lowered the loss
    let s = &b.stages[1];
    assert!(s.final_loss < 0.8 * s.initial_loss, "{:?}", b.stages);
    // a source with the wrong channel count is refused
    let two = Volume::new(g.clone(), 2, [moving.data.clone(), moving.data.clone()].concat()).unwrap();
    let t2 = Tensor::from_vec(two.data.clone(), (1, 2, d, h, w), &Device::Cpu).unwrap();
    let err = register_from(
        &Maps { exact: Some(&Sampled(two, t2)), ..Maps::new(&fixed, &moving) },
        &g,
        &Affine::default(),
        &cfg,
        &mut silent(),
    );
    assert!(matches!(err, Err(Error::ChannelMismatch { fixed: 1, moving: 2, .. })));
}

#[test]
fn recovers_a_smooth_field() {
    let g = grid();
    // u(x) in LPS mm, smooth and small enough to invert by fixed-point iteration
    let u = |p: [f64; 3]| {
        [3.0 * (p[1] / 20.0).sin(), -2.5 * (p[2] / 18.0).cos() * (p[0] / 40.0).cos(), 2.0 * (p[0] / 22.0).sin()]
    };
    let inv = |y: [f64; 3]| {
        let mut x = y;
        for _ in 0..50 {
            let d = u(x);
            x = [y[0] - d[0], y[1] - d[1], y[2] - d[2]];
        }
        x
    };
    let fixed = render(&g, blobs);
    let moving = render(&g, |y| blobs(inv(y)));
    let r = register_from(&Maps::new(&fixed, &moving), &g, &Affine::default(), &quick(), &mut silent()).unwrap();
    let before = interior_epe(&DisplacementField::zeros(g.clone()), u);
    let epe = interior_epe(&r.field, u);
    eprintln!(
        "smooth EPE {epe} before {before} stages {:?}",
        r.stages.iter().map(|s| (s.iterations, s.final_loss)).collect::<Vec<_>>()
    );
    assert!(epe < 1.0 && epe < 0.4 * before, "EPE {epe} mm, before {before} mm (voxel 2 mm)");
}

#[test]
fn exponential_of_a_constant_velocity_is_that_translation_and_small_fields_pass_through() {
    let g = Grid::from_spacing([6, 5, 7], [2.0, 3.0, 1.5], [-5.0, 2.0, 0.0]).unwrap();
    let dev = Device::Cpu;
    let n = g.num_voxels();
    let t = [4.0f32, -3.0, 2.5];
    let v: Vec<f32> = t.iter().flat_map(|&c| std::iter::repeat_n(c, n)).collect();
    let v = Tensor::from_vec(v, (1, 3, 7, 5, 6), &dev).unwrap();
    let u = DenseDisplacement::exponentiate(&v, &g, 6).unwrap();
    let diff = (u - &v).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "{diff}");
    // exp(εw) = εw + O(ε²): the error shrinks quadratically
    let w: Vec<f32> = (0..3 * n).map(|i| (0.37 * i as f32).sin() * 3.0).collect();
    let w = Tensor::from_vec(w, (1, 3, 7, 5, 6), &dev).unwrap();
    let err = |eps: f64| {
        let small = (&w * eps).unwrap();
        let e = DenseDisplacement::exponentiate(&small, &g, 6).unwrap();
        (e - &small).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64
    };
    let (e2, e3) = (err(1e-2), err(1e-3));
    assert!(e2 > 0.0 && e2 < 1e-2 * 1e-2 * 20.0, "{e2}");
    assert!(e2 / e3 > 50.0, "not second order: {e2} vs {e3}");
}

#[test]
fn velocity_mode_recovers_a_large_swirl_without_folding() {
    let g = grid();
    // a rotation of up to ~40° about the z axis inside a 20 mm radius: a displacement that a
    // weakly penalised plain field tends to fold on
    let angle = |r: f64| 0.7 * (-r * r / (2.0 * 14.0 * 14.0)).exp();
    let swirl = |p: [f64; 3], sign: f64| {
        let a = sign * angle((p[0] * p[0] + p[1] * p[1]).sqrt());
        let (c, s) = (a.cos(), a.sin());
        [c * p[0] - s * p[1], s * p[0] + c * p[1], p[2]]
    };
    let fixed = render(&g, blobs);
    // moving(swirl(x)) = fixed(x): the moving image is the fixed one swirled forward
    let moving = render(&g, |y| blobs(swirl(y, -1.0)));
    let cfg = MethodConfig {
        parameterisation: Parameterisation::Velocity { squarings: 6 },
        smoothness: 0.1,
        diffusion: 0.0,
        levels: vec![
            LevelConfig { shrink: 2, control_shrink: 2, iterations: 120, diffusion: None, intensities_only: false },
            LevelConfig { shrink: 1, control_shrink: 2, iterations: 60, diffusion: None, intensities_only: false },
        ],
        ..quick()
    };
    let r = register_from(&Maps::new(&fixed, &moving), &g, &Affine::default(), &cfg, &mut silent()).unwrap();
    let truth = |p: [f64; 3]| {
        let q = swirl(p, 1.0);
        [q[0] - p[0], q[1] - p[1], q[2] - p[2]]
    };
    let before = interior_epe(&DisplacementField::zeros(g.clone()), truth);
    let epe = interior_epe(&r.field, truth);
    let (_, j) = crate::metrics::jacobian(&r.field, None).unwrap();
    eprintln!("swirl EPE {epe} before {before}, folding {}, det J min {}", j.fraction_nonpositive, j.min);
    assert!(epe < 0.5 * before, "EPE {epe} mm, before {before} mm");
    assert_eq!(j.fraction_nonpositive, 0.0, "det J min {}", j.min);
}

/// The reported discrete start is what the gradient levels start from: with no gradient
/// iterations the result is that start, in diffeomorphic mode (the search's displacement
/// exponentiated as a velocity) and in plain mode alike.
#[test]
fn discrete_start_is_the_start_of_the_gradient_levels() {
    let g = grid();
    let swirl = |p: [f64; 3]| {
        let a = -0.6 * (-(p[0] * p[0] + p[1] * p[1]) / (2.0 * 14.0 * 14.0)).exp();
        [a.cos() * p[0] - a.sin() * p[1], a.sin() * p[0] + a.cos() * p[1], p[2]]
    };
    let fixed = render(&g, blobs);
    let moving = render(&g, |y| blobs(swirl(y)));
    for parameterisation in [Parameterisation::default(), Parameterisation::Displacement] {
        let cfg = MethodConfig {
            parameterisation,
            levels: vec![LevelConfig {
                shrink: 2,
                control_shrink: 2,
                iterations: 0,
                diffusion: None,
                intensities_only: false,
            }],
            ..quick()
        };
        let r = register_from(&Maps::new(&fixed, &moving), &g, &Affine::default(), &cfg, &mut silent()).unwrap();
        let start = r.discrete_start.expect("the discrete search runs by default").to_field(&r.affine, &g).unwrap();
        let moved = (0..g.num_voxels()).map(|v| start.at(v).iter().map(|x| x.abs()).fold(0.0f32, f32::max));
        assert!(moved.fold(0.0f32, f32::max) > 1.0, "the search found no displacement to compare");
        let diff = (0..g.num_voxels())
            .flat_map(|v| (0..3).map(move |a| (v, a)))
            .map(|(v, a)| (start.at(v)[a] - r.field.at(v)[a]).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{parameterisation:?}: start and result differ by {diff} mm");
    }
}

#[test]
fn affine_stage_recovers_a_scaling_and_shift() {
    let g = grid();
    let a = Affine::about_centre(
        nalgebra::Matrix3::from_diagonal(&nalgebra::Vector3::new(1.06, 0.95, 1.0)),
        [0.0; 3],
        [2.0, 1.0, -2.0],
    );
    let inv = a.matrix.try_inverse().unwrap();
    let fixed = render(&g, blobs);
    let moving = render(&g, |y| blobs(crate::grid::apply(&inv, y)));
    let cfg = MethodConfig { levels: vec![], affine_iterations: 150, ..Default::default() };
    let r = register_from(&Maps::new(&fixed, &moving), &g, &Affine::default(), &cfg, &mut silent()).unwrap();
    let epe = interior_epe(&r.field, |p| {
        let q = a.apply(p);
        [q[0] - p[0], q[1] - p[1], q[2] - p[2]]
    });
    eprintln!("affine EPE {epe}");
    assert!(epe < 1.0, "affine EPE {epe} mm");
}

/// A loss that stops being a number is reported with its stage and iteration.
#[test]
fn a_non_finite_loss_names_its_stage_and_iteration() {
    let g = grid();
    let fixed = render(&g, blobs);
    let mut moving = fixed.clone();
    moving.data.iter_mut().for_each(|v| *v = f32::NAN);
    let cfg = MethodConfig { affine_iterations: 5, ..Default::default() };
    let err = register_from(&Maps::new(&fixed, &moving), &g, &Affine::default(), &cfg, &mut silent());
    assert!(matches!(err, Err(Error::NonFiniteLoss { stage: Stage::Affine, iteration: 0, .. })), "{:?}", err.err());
    let err = register_from(&Maps::new(&fixed, &moving), &g, &Affine::default(), &quick(), &mut silent());
    let e = err.err().expect("a NaN loss must fail");
    assert!(matches!(e, Error::NonFiniteLoss { stage: Stage::Deformable(1), iteration: 0, .. }), "{e:?}");
    assert!(e.to_string().contains("deformable-1"), "{e}");
}

/// The whole method on images: features that cannot be computed name the image, and a run
/// reports its stages as typed events in order.
#[test]
fn register_pair_reports_typed_events_and_names_the_failing_image() {
    let g = grid();
    let fixed = render(&g, blobs);
    let t = [3.0, -2.0, 1.5];
    let moving = render(&g, |p| blobs([p[0] - t[0], p[1] - t[1], p[2] - t[2]]));
    let extractor = crate::features::IntensityFeatures;
    let features = Features { extractor: &extractor, exact: None };
    let cfg = MethodConfig {
        start: Start::Com,
        affine_iterations: 10,
        levels: vec![LevelConfig {
            shrink: 2,
            control_shrink: 2,
            iterations: 10,
            diffusion: None,
            intensities_only: false,
        }],
        ..Default::default()
    };
    let mut events = Vec::new();
    let pair = ImagePair { fixed: &fixed, moving: &moving, labels: None, masks: Masks::default() };
    let out = register_pair(&pair, &features, &cfg, &mut |e| events.push(e)).unwrap();
    let started: Vec<Stage> = events
        .iter()
        .filter_map(|e| match e {
            Event::Started(s) => Some(*s),
            Event::Iteration(_) => None,
        })
        .collect();
    assert_eq!(started, vec![Stage::Features, Stage::Start, Stage::Affine, Stage::Deformable(1), Stage::Discrete]);
    let iterations = events.iter().filter(|e| matches!(e, Event::Iteration(_))).count();
    assert_eq!(iterations, out.registration.losses.len());
    let names: Vec<String> = out.registration.stages.iter().map(|s| s.name.to_string()).collect();
    assert_eq!(names, ["affine", "discrete", "deformable-1"]);
    assert!(out.runtime_s.contains_key("features") && out.runtime_s.contains_key("optimisation"));

    let two = Volume::new(g.clone(), 2, [moving.data.clone(), moving.data.clone()].concat()).unwrap();
    let bad = ImagePair { fixed: &fixed, moving: &two, labels: None, masks: Masks::default() };
    let err = register_pair(&bad, &features, &cfg, &mut silent());
    assert!(matches!(err, Err(Error::Features { image: Role::Moving, .. })), "{:?}", err.err());
}
