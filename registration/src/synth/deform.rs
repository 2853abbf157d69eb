//! Analytic ground-truth deformations: a sum of Gaussian bumps in RAS millimetres.
//!
//! Being analytic, the displacement and its gradient are exact at any point, so the moving image
//! can be rendered through the exact inverse map instead of resampling a rendered image twice.

use rayon::prelude::*;

use super::rng::SplitMix64;
use crate::{DisplacementField, Grid, Space};

/// Bound on the spectral norm of `∇u` (checked through the larger Frobenius norm). Below 1 the
/// map `ψ ↦ y − u(ψ)` is a contraction, so `φ(x) = x + u(x)` is a global diffeomorphism
/// (`det(I + ∇u) ≥ (1 − L)³ > 0`) and the fixed-point inversion converges; 0.5 leaves margin
/// for the gradient between the voxel centres where it is checked.
pub const MAX_GRADIENT_NORM: f64 = 0.5;

#[derive(Debug, Clone, PartialEq)]
struct Bump {
    centre: [f64; 3],
    inv_two_sigma2: f64,
    amp: [f64; 3],
}

/// `u(x) = Σ_k a_k exp(−|x − c_k|² / 2σ_k²)`, RAS millimetres.
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianDeformation {
    bumps: Vec<Bump>,
    max_gradient: f64,
}

impl GaussianDeformation {
    /// Draws `n` bumps with widths in `sigma_mm` centred inside `region` (RAS box `[lo, hi]`),
    /// then scales them so that the largest displacement over `grid`'s voxel centres is
    /// `max_displacement_mm`, unless that would break [`MAX_GRADIENT_NORM`], in which case the
    /// field is scaled down further.
    pub fn random(
        seed: u64,
        n: usize,
        sigma_mm: [f64; 2],
        region: [[f64; 3]; 2],
        grid: &Grid,
        max_displacement_mm: f64,
    ) -> Self {
        let mut rng = SplitMix64::new(seed);
        let bumps = (0..n)
            .map(|_| {
                let centre = [0, 1, 2].map(|a| rng.uniform(region[0][a], region[1][a]));
                let sigma = rng.uniform(sigma_mm[0], sigma_mm[1].max(sigma_mm[0]));
                let dir = rng.unit_vector();
                let mag = rng.uniform(0.4, 1.0);
                Bump { centre, inv_two_sigma2: 0.5 / (sigma * sigma), amp: dir.map(|d| d * mag) }
            })
            .collect();
        let mut def = Self { bumps, max_gradient: 0.0 };
        let (max_u, max_grad) = def.extremes(grid);
        let mut scale = if max_u > 0.0 { max_displacement_mm.max(0.0) / max_u } else { 0.0 };
        if scale * max_grad > MAX_GRADIENT_NORM {
            scale = MAX_GRADIENT_NORM / max_grad;
        }
        for b in &mut def.bumps {
            b.amp = b.amp.map(|a| a * scale);
        }
        def.max_gradient = scale * max_grad;
        def
    }

    /// Largest Frobenius norm of `∇u` over the voxel centres of the grid the field was drawn on.
    pub fn max_gradient(&self) -> f64 {
        self.max_gradient
    }

    /// Largest `|u|` and largest Frobenius norm of `∇u` over the voxel centres of `grid`.
    pub fn extremes(&self, grid: &Grid) -> (f64, f64) {
        let [nx, ny, nz] = grid.shape();
        let m = grid.matrix(Space::Voxel, Space::Ras);
        (0..nz)
            .into_par_iter()
            .map(|k| {
                let mut acc = (0.0f64, 0.0f64);
                for j in 0..ny {
                    for i in 0..nx {
                        let p = crate::grid::apply(&m, [i as f64, j as f64, k as f64]);
                        let (u, g) = self.displacement_and_gradient(p);
                        let un = (u[0] * u[0] + u[1] * u[1] + u[2] * u[2]).sqrt();
                        let gn = g.iter().flatten().map(|v| v * v).sum::<f64>().sqrt();
                        acc = (acc.0.max(un), acc.1.max(gn));
                    }
                }
                acc
            })
            .reduce(|| (0.0, 0.0), |a, b| (a.0.max(b.0), a.1.max(b.1)))
    }

    /// Displacement `u(x)` in RAS millimetres.
    #[inline]
    pub fn displacement(&self, x: [f64; 3]) -> [f64; 3] {
        let mut u = [0.0; 3];
        for b in &self.bumps {
            let d = [x[0] - b.centre[0], x[1] - b.centre[1], x[2] - b.centre[2]];
            let g = (-(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]) * b.inv_two_sigma2).exp();
            for (ua, aa) in u.iter_mut().zip(b.amp) {
                *ua += aa * g;
            }
        }
        u
    }

    /// `u(x)` and its Jacobian `J[i][j] = ∂u_i / ∂x_j`.
    pub fn displacement_and_gradient(&self, x: [f64; 3]) -> ([f64; 3], [[f64; 3]; 3]) {
        let mut u = [0.0; 3];
        let mut jac = [[0.0; 3]; 3];
        for b in &self.bumps {
            let d = [x[0] - b.centre[0], x[1] - b.centre[1], x[2] - b.centre[2]];
            let g = (-(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]) * b.inv_two_sigma2).exp();
            for i in 0..3 {
                u[i] += b.amp[i] * g;
                for j in 0..3 {
                    jac[i][j] += -2.0 * b.inv_two_sigma2 * d[j] * b.amp[i] * g;
                }
            }
        }
        (u, jac)
    }

    /// `ψ(y) = φ⁻¹(y)` for `φ(x) = x + u(x)`: the fixed-point iteration `ψ ← y − u(ψ)`, a
    /// contraction because `|∇u| ≤ MAX_GRADIENT_NORM`. `guess` warm-starts it.
    pub fn inverse_from(&self, y: [f64; 3], guess: [f64; 3]) -> [f64; 3] {
        let mut x = guess;
        for _ in 0..100 {
            let u = self.displacement(x);
            let next = [y[0] - u[0], y[1] - u[1], y[2] - u[2]];
            let step = (0..3).map(|a| (next[a] - x[a]).abs()).fold(0.0, f64::max);
            x = next;
            if step < 1e-7 {
                break;
            }
        }
        x
    }

    /// `ψ(y)`, started from `y − u(y)`.
    pub fn inverse(&self, y: [f64; 3]) -> [f64; 3] {
        let u = self.displacement(y);
        self.inverse_from(y, [y[0] - u[0], y[1] - u[1], y[2] - u[2]])
    }

    /// The field sampled at `grid`'s voxel centres in the ITK convention (LPS millimetres:
    /// the RAS displacement with x and y negated).
    pub fn to_field(&self, grid: &Grid) -> DisplacementField {
        let [nx, ny, nz] = grid.shape();
        let n = grid.num_voxels();
        let m = grid.matrix(Space::Voxel, Space::Ras);
        let slices: Vec<Vec<[f32; 3]>> = (0..nz)
            .into_par_iter()
            .map(|k| {
                let mut out = Vec::with_capacity(nx * ny);
                for j in 0..ny {
                    for i in 0..nx {
                        let u = self.displacement(crate::grid::apply(&m, [i as f64, j as f64, k as f64]));
                        out.push([-u[0] as f32, -u[1] as f32, u[2] as f32]);
                    }
                }
                out
            })
            .collect();
        let mut data = vec![0.0f32; 3 * n];
        for (v, u) in slices.into_iter().flatten().enumerate() {
            data[v] = u[0];
            data[n + v] = u[1];
            data[2 * n + v] = u[2];
        }
        DisplacementField { grid: grid.clone(), data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> Grid {
        Grid::from_spacing([24, 20, 16], [6.0, 6.0, 6.0], [-69.0, -57.0, -45.0]).unwrap()
    }

    #[test]
    fn synth_deformation_scaling_inverse_and_gradient() {
        let g = grid();
        let def = GaussianDeformation::random(11, 6, [25.0, 45.0], [[-40.0; 3], [40.0; 3]], &g, 8.0);
        let (mu, mg) = def.extremes(&g);
        assert!((mu - 8.0).abs() < 1e-9, "{mu}");
        assert!(mg <= MAX_GRADIENT_NORM + 1e-12);
        for (t, y) in [[0.0, 0.0, 0.0], [13.0, -7.5, 22.0], [-30.0, 31.0, -5.0]].into_iter().enumerate() {
            let x = def.inverse(y);
            let u = def.displacement(x);
            assert!((0..3).all(|a| (x[a] + u[a] - y[a]).abs() < 1e-6), "case {t}");
            // analytic gradient vs central differences
            let (_, jac) = def.displacement_and_gradient(y);
            for j in 0..3 {
                let mut p = y;
                let mut q = y;
                p[j] += 1e-4;
                q[j] -= 1e-4;
                let (up, uq) = (def.displacement(p), def.displacement(q));
                for i in 0..3 {
                    assert!((jac[i][j] - (up[i] - uq[i]) / 2e-4).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn synth_deformation_is_scaled_down_when_too_steep() {
        let g = grid();
        // narrow bumps asked to move 40 mm would fold; the gradient cap must win
        let def = GaussianDeformation::random(3, 4, [8.0, 10.0], [[-30.0; 3], [30.0; 3]], &g, 40.0);
        let (mu, mg) = def.extremes(&g);
        assert!(mu < 40.0);
        assert!((mg - MAX_GRADIENT_NORM).abs() < 1e-9, "{mg}");
    }

    #[test]
    fn synth_field_is_lps() {
        let g = grid();
        let def = GaussianDeformation::random(5, 3, [30.0, 40.0], [[-20.0; 3], [20.0; 3]], &g, 5.0);
        let f = def.to_field(&g);
        let v = g.num_voxels() / 2 + 7;
        let [nx, ny, _] = g.shape();
        let (i, j, k) = (v % nx, (v / nx) % ny, v / (nx * ny));
        let u = def.displacement(g.map([i as f64, j as f64, k as f64], Space::Voxel, Space::Ras));
        let w = f.at(v);
        assert!((w[0] as f64 + u[0]).abs() < 1e-5 && (w[1] as f64 + u[1]).abs() < 1e-5);
        assert!((w[2] as f64 - u[2]).abs() < 1e-5);
    }
}
