//! Chains of transforms (affine maps and displacement fields), the dense field a chain amounts
//! to, and inverses by fixed-point iteration.
//!
//! Every transform maps a point of the space it is defined on (the fixed side) to the point of
//! the space it samples (the moving side), in LPS millimetres. A [`Chain`] lists transforms as
//! ITK's `CompositeTransform` and `antsApplyTransforms -t` do: the last one acts on a point
//! first.

use nalgebra::{Matrix3, Vector3};
use rayon::prelude::*;
use segmentation::ops::{sample_point, Dims, Interpolation, Padding};
use serde::Serialize;

use crate::grid::apply;
use crate::transform::{grid_points_lps, Affine};
use crate::{DisplacementField, Error, Grid, Result, Space};

/// Iterations of the fixed-point inversion per voxel (or point) by default: a contraction gains
/// a digit every few, and a voxel that stops improving stops early.
pub const INVERSE_ITERATIONS: usize = 50;

/// A displacement field that can be evaluated at any LPS point.
pub struct FieldSampler {
    field: DisplacementField,
    to_voxel: nalgebra::Matrix4<f64>,
    dims: Dims,
}

impl FieldSampler {
    pub fn new(field: DisplacementField) -> Self {
        let to_voxel = field.grid.matrix(Space::Lps, Space::Voxel);
        let (d, h, w) = field.grid.dhw();
        Self { field, to_voxel, dims: Dims { d, h, w } }
    }

    pub fn field(&self) -> &DisplacementField {
        &self.field
    }

    /// Whether `p` lies inside the field's extent (where ITK evaluates it).
    pub fn contains(&self, p: [f64; 3]) -> bool {
        self.field.grid.contains_voxel(apply(&self.to_voxel, p))
    }

    /// Trilinear displacement at `p`. [`Padding::Extent`] is ITK's `DisplacementFieldTransform`
    /// (zero beyond the field's extent); [`Padding::Border`] continues the field without a jump,
    /// which iterations need.
    pub fn at(&self, p: [f64; 3], padding: Padding) -> [f64; 3] {
        let v = apply(&self.to_voxel, p).map(|x| x as f32);
        let n = self.field.grid.num_voxels();
        [0, 1, 2].map(|a| {
            sample_point(&self.field.data[a * n..(a + 1) * n], self.dims, v, Interpolation::Linear, padding) as f64
        })
    }
}

/// One transform of a [`Chain`].
pub enum Step {
    Affine(Affine),
    Field(FieldSampler),
}

impl Step {
    fn apply(&self, p: [f64; 3], padding: Padding) -> [f64; 3] {
        match self {
            Step::Affine(a) => a.apply(p),
            Step::Field(f) => {
                let u = f.at(p, padding);
                [p[0] + u[0], p[1] + u[1], p[2] + u[2]]
            }
        }
    }
}

/// Transforms in ITK order: [`Chain::apply`] runs the last step first.
pub struct Chain {
    steps: Vec<Step>,
}

impl Chain {
    pub fn new(steps: Vec<Step>) -> Self {
        Self { steps }
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Maps a point through every step, fields evaluated as ITK does (zero beyond their extent).
    pub fn apply(&self, p: [f64; 3]) -> [f64; 3] {
        self.apply_with(p, Padding::Extent)
    }

    fn apply_with(&self, p: [f64; 3], padding: Padding) -> [f64; 3] {
        self.steps.iter().rev().fold(p, |q, s| s.apply(q, padding))
    }

    /// The product of the chain's affine steps: the part of the chain an inversion can undo
    /// exactly, leaving the fields to the iteration.
    pub fn linear_part(&self) -> Affine {
        let matrix = self.steps.iter().fold(nalgebra::Matrix4::identity(), |m, s| match s {
            Step::Affine(a) => m * a.matrix,
            Step::Field(_) => m,
        });
        Affine { matrix }
    }

    /// The whole chain as one ITK displacement field on `grid`: `u(x) = chain(x) − x`.
    pub fn to_field(&self, grid: &Grid) -> Result<DisplacementField> {
        let pts = grid_points_lps(grid);
        let moved: Vec<[f64; 3]> = pts.par_iter().map(|&p| self.apply(p)).collect();
        let n = pts.len();
        let mut data = vec![0.0f32; 3 * n];
        for (v, (p, q)) in pts.iter().zip(&moved).enumerate() {
            for a in 0..3 {
                data[a * n + v] = (q[a] - p[a]) as f32;
            }
        }
        DisplacementField::new(grid.clone(), data)
    }

    /// The point `x` with `chain(x) = y`, by [`solve`] around the chain's affine part, and its
    /// residual `|chain(x) − y|` (mm).
    pub fn invert_point(&self, y: [f64; 3], iterations: usize) -> Result<([f64; 3], f64)> {
        let a_inv = inverse_linear(&self.linear_part())?;
        Ok(solve(|x| self.apply_with(x, Padding::Border), &self.linear_part(), &a_inv, y, iterations, 1e-6))
    }
}

fn inverse_linear(a: &Affine) -> Result<Affine> {
    a.inverse().ok_or_else(|| Error::Geometry("the transform's affine part is singular".into()))
}

fn dist(a: [f64; 3], b: [f64; 3]) -> f64 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// Solves `forward(x) = y` by the fixed-point iteration `x ← A⁻¹ (y − r(x))`, where
/// `r(x) = forward(x) − A x` is what the affine map `a` leaves of the transform: with `A` the
/// identity this is the classic `v(y) = −u(y + v(y))`. It converges where `A⁻¹ r` contracts,
/// so the more of the transform `a` holds, the better; a step that would worsen the residual is
/// halved instead. Returns the best `x` and its residual `|forward(x) − y|` (mm).
pub fn solve(
    forward: impl Fn([f64; 3]) -> [f64; 3],
    a: &Affine,
    a_inv: &Affine,
    y: [f64; 3],
    iterations: usize,
    tolerance: f64,
) -> ([f64; 3], f64) {
    let mut x = a_inv.apply(y);
    let mut fx = forward(x);
    let mut res = dist(fx, y);
    let mut step = 1.0;
    for _ in 0..iterations {
        if res <= tolerance || step < 1e-3 {
            break;
        }
        let ax = a.apply(x);
        let target = a_inv.apply([0, 1, 2].map(|k| y[k] - (fx[k] - ax[k])));
        let cand = [0, 1, 2].map(|k| x[k] + step * (target[k] - x[k]));
        let fc = forward(cand);
        let rc = dist(fc, y);
        if rc < res {
            (x, fx, res) = (cand, fc, rc);
        } else {
            step *= 0.5;
        }
    }
    (x, res)
}

/// How well an inverse field `v` undoes its forward field `u`: `|v(y) + u(y + v(y))|` over the
/// voxels `y` of the inverse's grid whose preimage `y + v(y)` lies inside the forward field.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InverseResidual {
    pub mean_mm: f64,
    pub max_mm: f64,
    /// `mean_mm` in voxels of the forward field (its smallest spacing).
    pub mean_voxels: f64,
    /// Fraction of the inverse's voxels whose preimage lies outside the forward field: there
    /// the inverse continues the field's border values and is not counted.
    pub outside_fraction: f64,
    /// The iteration's limit per voxel.
    pub iterations: usize,
}

/// An inverse field and how well it inverts.
pub struct Inverse {
    pub field: DisplacementField,
    pub residual: InverseResidual,
}

/// The inverse of the transform `x ↦ x + u(x)` of `field`, as an ITK displacement field on
/// `grid` (mapping its points back into the field's space), by [`solve`] with `affine` as the
/// part undone exactly: the registration's affine map, or [`fit_affine`] of the field.
pub fn invert(field: &DisplacementField, affine: &Affine, grid: &Grid, iterations: usize) -> Result<Inverse> {
    let a_inv = inverse_linear(affine)?;
    let sampler = FieldSampler::new(field.clone());
    let forward = |x: [f64; 3]| {
        let u = sampler.at(x, Padding::Border);
        [x[0] + u[0], x[1] + u[1], x[2] + u[2]]
    };
    let tolerance = 1e-4 * field.grid.min_spacing();
    let pts = grid_points_lps(grid);
    let solved: Vec<([f64; 3], f64, bool)> = pts
        .par_iter()
        .map(|&y| {
            let (x, res) = solve(forward, affine, &a_inv, y, iterations, tolerance);
            (x, res, sampler.contains(x))
        })
        .collect();
    let n = pts.len();
    let mut data = vec![0.0f32; 3 * n];
    let (mut sum, mut max, mut inside) = (0.0, 0.0f64, 0usize);
    for (v, (y, (x, res, ok))) in pts.iter().zip(&solved).enumerate() {
        for a in 0..3 {
            data[a * n + v] = (x[a] - y[a]) as f32;
        }
        if *ok {
            sum += res;
            max = max.max(*res);
            inside += 1;
        }
    }
    let mean = if inside > 0 { sum / inside as f64 } else { f64::NAN };
    Ok(Inverse {
        field: DisplacementField::new(grid.clone(), data)?,
        residual: InverseResidual {
            mean_mm: mean,
            max_mm: max,
            mean_voxels: mean / field.grid.min_spacing(),
            outside_fraction: 1.0 - inside as f64 / n.max(1) as f64,
            iterations,
        },
    })
}

/// The field `w` (on the grid of `field`) with `x + u(x) = A(x + w(x))`: what the transform of
/// `field` leaves after `affine`, so that the chain `[affine, w]` (ITK order: `w` acts first) is
/// the whole transform, as ANTs and ITK composite files hold it.
pub fn remainder_after(field: &DisplacementField, affine: &Affine) -> Result<DisplacementField> {
    let l_inv = affine
        .matrix
        .fixed_view::<3, 3>(0, 0)
        .try_inverse()
        .ok_or_else(|| Error::Geometry("the affine map is singular".into()))?;
    let n = field.grid.num_voxels();
    let mut data = vec![0.0f32; 3 * n];
    for (v, p) in grid_points_lps(&field.grid).into_iter().enumerate() {
        let u = field.at(v);
        let q = affine.apply(p);
        let w = l_inv * Vector3::from([0, 1, 2].map(|a| p[a] + u[a] as f64 - q[a]));
        for a in 0..3 {
            data[a * n + v] = w[a] as f32;
        }
    }
    DisplacementField::new(field.grid.clone(), data)
}

/// The affine map closest (least squares over the field's voxels) to the transform
/// `x ↦ x + u(x)`. On a 2D grid the out-of-plane part stays the identity.
pub fn fit_affine(field: &DisplacementField) -> Affine {
    let pts = grid_points_lps(&field.grid);
    let n = pts.len() as f64;
    let c = pts.iter().fold(Vector3::zeros(), |s, p| s + Vector3::from(*p)) / n;
    let (mut m, mut cross, mut t) = (Matrix3::zeros(), Matrix3::zeros(), Vector3::zeros());
    for (v, p) in pts.iter().enumerate() {
        let d = Vector3::from(*p) - c;
        let u = Vector3::from(field.at(v).map(|x| x as f64));
        m += d * d.transpose();
        cross += u * d.transpose();
        t += u;
    }
    // a flat grid leaves `m` singular along its normal: the pseudo-inverse fits nothing there
    let b = match m.pseudo_inverse(1e-9 * m.abs().max().max(1e-300)) {
        Ok(pinv) => cross * pinv,
        Err(_) => Matrix3::zeros(),
    };
    Affine::about_centre(Matrix3::identity() + b, c.into(), (t / n).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oblique() -> Grid {
        let r = nalgebra::Rotation3::from_euler_angles(0.3, -0.2, 0.7).into_inner();
        Grid::from_parts([14, 12, 9], [1.5, 1.8, 2.5], [-12.0, 4.0, 7.5], r).unwrap()
    }

    /// A smooth displacement (mm) plus an affine part, on `grid`.
    fn field(grid: &Grid, affine: &Affine, amp: f64) -> DisplacementField {
        let pts = grid_points_lps(grid);
        let n = pts.len();
        let mut data = vec![0.0f32; 3 * n];
        for (v, p) in pts.iter().enumerate() {
            let q = affine.apply(*p);
            let w = [(0.2 * p[1]).sin(), (0.15 * p[2] + 0.3).cos(), (0.1 * p[0]).sin()];
            for a in 0..3 {
                data[a * n + v] = (q[a] - p[a] + amp * w[a]) as f32;
            }
        }
        DisplacementField::new(grid.clone(), data).unwrap()
    }

    fn tilt() -> Affine {
        let r = nalgebra::Rotation3::from_euler_angles(0.05, 0.1, -0.08).into_inner();
        Affine::about_centre(r * 1.05, [-3.0, 8.0, 12.0], [2.0, -1.5, 3.0])
    }

    #[test]
    fn fitted_affine_recovers_an_affine_field() {
        let g = oblique();
        let a = tilt();
        let fit = fit_affine(&field(&g, &a, 0.0));
        assert!((fit.matrix - a.matrix).abs().max() < 1e-4, "{} vs {}", fit.matrix, a.matrix);
        // a flat grid: the out-of-plane row and column stay the identity's
        let flat = Grid::from_spacing([20, 16, 1], [1.0, 1.2, 1.0], [0.0; 3]).unwrap();
        let shift = Affine::about_centre(
            Matrix3::new(1.1, 0.1, 0.0, -0.05, 0.95, 0.0, 0.0, 0.0, 1.0),
            [-10.0, -9.0, 0.0],
            [1.0, 2.0, 0.0],
        );
        let fit = fit_affine(&field(&flat, &shift, 0.0));
        assert!((fit.matrix - shift.matrix).abs().max() < 1e-4, "{}", fit.matrix);
    }

    #[test]
    fn inverse_undoes_the_field() {
        let g = oblique();
        let a = tilt();
        let f = field(&g, &a, 1.5);
        for affine in [a.clone(), fit_affine(&f)] {
            let inv = invert(&f, &affine, &g, 50).unwrap();
            let r = &inv.residual;
            assert!(r.mean_mm < 1e-3 && r.max_mm < 1e-2, "{r:?}");
            assert!(r.outside_fraction > 0.0 && r.outside_fraction < 0.9, "{r:?}");
            // the chain [forward, inverse] is the identity where the preimage lies inside
            let chain =
                Chain::new(vec![Step::Field(FieldSampler::new(f.clone())), Step::Field(FieldSampler::new(inv.field))]);
            let sampler = FieldSampler::new(f.clone());
            for y in grid_points_lps(&g).into_iter().step_by(7) {
                let back = Chain::new(vec![Step::Field(FieldSampler::new(f.clone()))]).invert_point(y, 50).unwrap();
                if sampler.contains(back.0) {
                    assert!(dist(chain.apply(y), y) < 1e-2, "{y:?}");
                    assert!(back.1 < 1e-4);
                }
            }
        }
    }

    #[test]
    fn affine_and_remainder_chain_to_the_whole_field() {
        let g = oblique();
        let a = tilt();
        let f = field(&g, &a, 1.5);
        let w = remainder_after(&f, &a).unwrap();
        let chain = Chain::new(vec![Step::Affine(a), Step::Field(FieldSampler::new(w))]);
        let whole = chain.to_field(&g).unwrap();
        let worst = whole.data.iter().zip(&f.data).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-4, "{worst}");
    }

    #[test]
    fn chain_runs_the_last_step_first_and_matches_its_field() {
        let g = oblique();
        let shift = Affine::translation([5.0, 0.0, 0.0]);
        let scale = Affine::about_centre(Matrix3::identity() * 2.0, [0.0; 3], [0.0; 3]);
        let chain = Chain::new(vec![Step::Affine(scale.clone()), Step::Affine(shift.clone())]);
        // scale(shift(p))
        assert_eq!(chain.apply([1.0, 2.0, 3.0]), [12.0, 4.0, 6.0]);
        assert_eq!(chain.linear_part().apply([1.0, 2.0, 3.0]), [12.0, 4.0, 6.0]);
        let f = field(&g, &Affine::default(), 2.0);
        let one = Chain::new(vec![Step::Field(FieldSampler::new(f.clone()))]).to_field(&g).unwrap();
        let worst = one.data.iter().zip(&f.data).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-4, "{worst}");
        // beyond the field's extent a field step is the identity, as in ITK
        let far = [1e3, 1e3, 1e3];
        assert_eq!(Chain::new(vec![Step::Field(FieldSampler::new(f))]).apply(far), far);
    }
}
