//! Synthetic multi-organ abdominal phantoms with ground-truth deformations.
//!
//! A [`Phantom`] is an analytic anatomy (implicit shapes in RAS mm, see [`phantom`]) drawn from a
//! seed; [`render`] samples it on a [`Grid`] with partial volume and acquisition noise.
//! [`make_pair`] adds a random diffeomorphic [`GaussianDeformation`] `u` and renders the moving
//! image through the exact inverse map, `moving(y) = phantom(ψ(y))` with `ψ = (id + u)⁻¹`, so
//! `moving(x + u(x)) = fixed(x)` holds without any image being interpolated twice. Everything is
//! a deterministic function of the seeds, independent of the thread count.

pub mod deform;
pub mod phantom;
pub mod randomise;
pub mod rng;

#[cfg(test)]
mod tests;

use rayon::prelude::*;

pub use deform::{GaussianDeformation, MAX_GRADIENT_NORM};
pub use phantom::{tissue_value, Hit, Phantom, Tissue, LABEL_NAMES};

use crate::{DisplacementField, Grid, Labels, Result, Space, Volume};
use rng::{derive, normal_pair};

/// Imaging modality of the rendered intensities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Modality {
    /// Hounsfield units (air −1000, fat ≈ −100, soft tissue 30–60, contrast aorta ≈ 150, bone 400–700).
    Ct,
    /// T1-weighted-like relative intensities on `0..1000` (fat bright, fluid and air dark);
    /// noise is Rician, as in magnitude images.
    Mr,
}

/// Settings for synthetic subjects and pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Grid shape `[nx, ny, nz]`.
    pub size: [usize; 3],
    /// Voxel spacing (mm). The default 3.5 mm over 96 voxels (336 mm) holds the whole body
    /// cross-section (about 300 × 210 mm at most) and liver dome to lower kidney poles.
    pub spacing: [f64; 3],
    pub modality: Modality,
    /// Cohort seed; subject `s` uses [`subject_seed`]`(seed, s)`.
    pub seed: u64,
    /// Largest displacement of the ground-truth field over the grid (mm). Reached exactly unless
    /// the field would then be steeper than [`MAX_GRADIENT_NORM`] (then it is scaled down).
    pub max_displacement_mm: f64,
    /// Number of Gaussian bumps in the ground-truth displacement.
    pub bumps: usize,
    /// Range of the bumps' standard deviations (mm).
    pub bump_sigma_mm: [f64; 2],
    /// Acquisition noise standard deviation; `None` takes the modality's default (CT 10 HU,
    /// MR 12).
    pub noise_sigma: Option<f32>,
    /// Sub-samples per axis for partial volume at tissue boundaries (1 = none).
    pub supersample: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            size: [96, 96, 96],
            spacing: [3.5, 3.5, 3.5],
            modality: Modality::Ct,
            seed: 0,
            max_displacement_mm: 10.0,
            bumps: 6,
            bump_sigma_mm: [30.0, 55.0],
            noise_sigma: None,
            supersample: 2,
        }
    }
}

impl SynthConfig {
    /// The axis-aligned RAS grid of `size` and `spacing` centred on the body (the origin).
    pub fn grid(&self) -> Result<Grid> {
        let origin = [0, 1, 2].map(|a| -0.5 * (self.size[a] as f64 - 1.0) * self.spacing[a]);
        Grid::from_spacing(self.size, self.spacing, origin)
    }

    /// The phantom of subject `subject` (noise level and supersampling from this config).
    pub fn phantom(&self, subject: u64) -> Phantom {
        let mut p = Phantom::new(subject_seed(self.seed, subject), self.modality);
        if let Some(s) = self.noise_sigma {
            p.noise_sigma = s.max(0.0);
        }
        p.supersample = self.supersample.max(1);
        p
    }
}

/// Seed of subject `subject` in the cohort with seed `cohort_seed`.
pub fn subject_seed(cohort_seed: u64, subject: u64) -> u64 {
    derive(cohort_seed, subject)
}

// stream tags for seeds derived from a subject's seed
const NOISE_FIXED: u64 = 0x10;
const NOISE_MOVING: u64 = 0x11;
const DEFORMATION: u64 = 0x12;

/// Renders a phantom on a grid (in parallel; the result does not depend on the thread count):
/// intensities with partial volume (`phantom.supersample`³ sub-points in voxels near a boundary,
/// texture from the voxel centre) plus seeded noise; labels are the phantom's label at each voxel
/// centre, the same points the truth field is sampled at.
pub fn render(phantom: &Phantom, grid: &Grid) -> (Volume, Labels) {
    let identity = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    render_mapped(phantom, grid, derive(phantom.seed(), NOISE_FIXED), 1.0, |y| y, |_| identity)
}

/// Renders `phantom(map(y))`: `map(y)` takes a world point to the anatomical point shown there,
/// and `jacobian(map(y))` gives the derivative of `map` there. Sub-samples of a voxel use the
/// first-order expansion about its centre: exact for the identity, and for a Gaussian-bump
/// inverse off by `|o|²·|∇²u|` (≲ 0.05 mm), which only shifts partial-volume weights, while it
/// saves an iterative inversion per sub-sample. `stretch` bounds how much `map` can lengthen
/// distances, which widens the band where supersampling is needed.
fn render_mapped<F, J>(
    phantom: &Phantom,
    grid: &Grid,
    noise_seed: u64,
    stretch: f64,
    map: F,
    jacobian: J,
) -> (Volume, Labels)
where
    F: Fn([f64; 3]) -> [f64; 3] + Sync,
    J: Fn([f64; 3]) -> [[f64; 3]; 3] + Sync,
{
    let [nx, ny, nz] = grid.shape();
    let m = grid.matrix(Space::Voxel, Space::Ras);
    let ss = phantom.supersample.max(1);
    // sub-voxel offsets in world mm, centred in the voxel
    let offsets: Vec<[f64; 3]> = (0..ss * ss * ss)
        .map(|n| {
            let f = |t: usize| (t as f64 + 0.5) / ss as f64 - 0.5;
            let v = [f(n % ss), f((n / ss) % ss), f(n / (ss * ss))];
            [0, 1, 2].map(|r| m[(r, 0)] * v[0] + m[(r, 1)] * v[1] + m[(r, 2)] * v[2])
        })
        .collect();
    let half_diag = 0.5 * grid.spacing().iter().map(|s| s * s).sum::<f64>().sqrt();
    // classification edges are distance estimates, not bounds: keep a safety factor
    let margin = 1.25 * stretch * half_diag;
    let sigma = phantom.noise_sigma as f64;
    let slices: Vec<(Vec<f32>, Vec<u32>)> = (0..nz)
        .into_par_iter()
        .map(|k| {
            let mut vals = Vec::with_capacity(nx * ny);
            let mut labs = Vec::with_capacity(nx * ny);
            for j in 0..ny {
                for i in 0..nx {
                    let w = crate::grid::apply(&m, [i as f64, j as f64, k as f64]);
                    let a = map(w);
                    let hit = phantom.classify(a);
                    let tex = phantom.texture(a);
                    let mut v = if hit.edge > margin || ss == 1 {
                        phantom.value(hit.tissue, tex)
                    } else {
                        let jac = jacobian(a);
                        let sum: f64 = offsets
                            .iter()
                            .map(|o| {
                                let d = jac.map(|row| row[0] * o[0] + row[1] * o[1] + row[2] * o[2]);
                                phantom.value(phantom.classify([a[0] + d[0], a[1] + d[1], a[2] + d[2]]).tissue, tex)
                            })
                            .sum();
                        sum / offsets.len() as f64
                    };
                    if sigma > 0.0 {
                        let index = ((k * ny + j) * nx + i) as u64;
                        let (n1, n2) = normal_pair(noise_seed, index);
                        v = match phantom.modality {
                            Modality::Ct => v + sigma * n1,
                            Modality::Mr => ((v + sigma * n1).powi(2) + (sigma * n2).powi(2)).sqrt(),
                        };
                    }
                    vals.push(v as f32);
                    labs.push(hit.label);
                }
            }
            (vals, labs)
        })
        .collect();
    let mut data = Vec::with_capacity(grid.num_voxels());
    let mut labels = Vec::with_capacity(grid.num_voxels());
    for (v, l) in slices {
        data.extend(v);
        labels.extend(l);
    }
    (Volume { grid: grid.clone(), channels: 1, data }, Labels { grid: grid.clone(), data: labels })
}

/// A registration pair with its ground truth: `moving(x + u(x)) ≈ fixed(x)` for the fixed-grid
/// point `x`, with `u` = `truth` (ITK convention: LPS mm on the fixed grid).
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticPair {
    pub fixed: Volume,
    pub fixed_labels: Labels,
    pub moving: Volume,
    pub moving_labels: Labels,
    pub truth: DisplacementField,
    /// The analytic deformation behind `truth` (RAS mm), exact between voxel centres.
    pub deformation: GaussianDeformation,
}

/// Subject `subject` of `cfg`'s cohort as a fixed image plus a moving image of the same anatomy
/// deformed by a random smooth diffeomorphism. Fixed and moving share `cfg.grid()`; their noise
/// is independent. The fixed image equals subject `subject` of [`generate_subjects`].
pub fn make_pair(cfg: &SynthConfig, subject: u64) -> Result<SyntheticPair> {
    let grid = cfg.grid()?;
    let phantom = cfg.phantom(subject);
    let (fixed, fixed_labels) = render(&phantom, &grid);
    // bump centres inside the abdomen, where the organs are, and within the field of view
    let corners = grid.corners_ras();
    let mut region: [[f64; 3]; 2] = [[-100.0, -70.0, -110.0], [100.0, 70.0, 110.0]];
    for a in 0..3 {
        let lo = corners.iter().map(|c| c[a]).fold(f64::INFINITY, f64::min);
        let hi = corners.iter().map(|c| c[a]).fold(f64::NEG_INFINITY, f64::max);
        region[0][a] = region[0][a].max(lo);
        region[1][a] = region[1][a].min(hi).max(region[0][a]);
    }
    let deformation = GaussianDeformation::random(
        derive(phantom.seed(), DEFORMATION),
        cfg.bumps,
        cfg.bump_sigma_mm,
        region,
        &grid,
        cfg.max_displacement_mm,
    );
    // ψ is (1 − L)⁻¹-Lipschitz for |∇u| ≤ L (measured at voxel centres; a little slack for
    // the gradient in between)
    let stretch = 1.0 / (1.0 - (deformation.max_gradient() + 0.05).min(MAX_GRADIENT_NORM));
    let (moving, moving_labels) = render_mapped(
        &phantom,
        &grid,
        derive(phantom.seed(), NOISE_MOVING),
        stretch,
        |y| deformation.inverse(y),
        |x| {
            // ∇ψ(y) = (I + ∇u(x))⁻¹ at x = ψ(y)
            let (_, g) = deformation.displacement_and_gradient(x);
            let m = nalgebra::Matrix3::from_fn(|r, c| g[r][c] + if r == c { 1.0 } else { 0.0 });
            let inv = m.try_inverse().unwrap_or_else(nalgebra::Matrix3::identity);
            [0, 1, 2].map(|r| [inv[(r, 0)], inv[(r, 1)], inv[(r, 2)]])
        },
    );
    let truth = deformation.to_field(&grid);
    Ok(SyntheticPair { fixed, fixed_labels, moving, moving_labels, truth, deformation })
}

/// `n` different subjects (inter-subject variation: one [`Phantom`] each, seeds from `cfg.seed`)
/// rendered on `cfg.grid()`.
pub fn generate_subjects(cfg: &SynthConfig, n: usize) -> Result<Vec<(Volume, Labels)>> {
    let grid = cfg.grid()?;
    Ok((0..n as u64).map(|s| render(&cfg.phantom(s), &grid)).collect())
}
