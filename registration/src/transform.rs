//! Spatial transforms from the fixed to the moving image, in LPS world millimetres.
//!
//! A transform maps a fixed-space point `x` to the moving-space point where the moving image is
//! sampled ("pull back", ITK's convention). The dense part lives on a control grid and is
//! upsampled to wherever it is evaluated.

use candle_core::{DType, Device, Tensor};
use nalgebra::{Matrix3, Matrix4, Vector3};
use rayon::prelude::*;
use segmentation::ops;

use crate::{DisplacementField, Grid, Result, Space};

/// An affine map of LPS world points, `x ↦ M·x` (homogeneous 4x4).
#[derive(Debug, Clone, PartialEq)]
pub struct Affine {
    pub matrix: Matrix4<f64>,
}

impl Default for Affine {
    fn default() -> Self {
        Self { matrix: Matrix4::identity() }
    }
}

impl Affine {
    pub fn translation(t: [f64; 3]) -> Self {
        let mut m = Matrix4::identity();
        m.fixed_view_mut::<3, 1>(0, 3).copy_from(&Vector3::from(t));
        Self { matrix: m }
    }

    /// `x ↦ A·(x − c) + c + t`: a linear part acting about a centre, then a translation.
    pub fn about_centre(a: Matrix3<f64>, centre: [f64; 3], t: [f64; 3]) -> Self {
        let c = Vector3::from(centre);
        let off = c - a * c + Vector3::from(t);
        let mut m = Matrix4::identity();
        m.fixed_view_mut::<3, 3>(0, 0).copy_from(&a);
        m.fixed_view_mut::<3, 1>(0, 3).copy_from(&off);
        Self { matrix: m }
    }

    pub fn apply(&self, p: [f64; 3]) -> [f64; 3] {
        crate::grid::apply(&self.matrix, p)
    }

    /// The inverse map, `None` when the matrix is singular.
    pub fn inverse(&self) -> Option<Self> {
        self.matrix.try_inverse().map(|matrix| Self { matrix })
    }

    pub fn is_identity(&self) -> bool {
        (self.matrix - Matrix4::identity()).abs().max() < 1e-12
    }
}

/// LPS positions of every voxel centre of `grid`, `i` fastest.
pub fn grid_points_lps(grid: &Grid) -> Vec<[f64; 3]> {
    let m = grid.matrix(Space::Voxel, Space::Lps);
    let [nx, ny, nz] = grid.shape();
    (0..nz * ny)
        .into_par_iter()
        .flat_map_iter(|kj| {
            let (k, j) = (kj / ny, kj % ny);
            (0..nx).map(move |i| crate::grid::apply(&m, [i as f64, j as f64, k as f64]))
        })
        .collect()
}

/// What is needed to sample the moving image at `affine(x) + u(x)` for every voxel `x` of a
/// fixed-side grid: the moving-normalised coordinates of `affine(x)` and the linear map taking
/// LPS millimetre displacements to moving-normalised offsets.
pub struct SamplingPlan {
    /// `(1, P, 3)` moving-normalised coordinates of the affinely mapped fixed points.
    pub base: Tensor,
    /// `(3, 3)`, to right-multiply `(P, 3)` LPS displacements with.
    pub lin_t: Tensor,
    pub points: usize,
}

impl SamplingPlan {
    pub fn new(fixed: &Grid, moving: &Grid, affine: &Affine, device: &Device) -> Result<Self> {
        let m = moving.matrix(Space::Lps, Space::Normalised) * affine.matrix;
        let pts = grid_points_lps(fixed);
        let base: Vec<f32> = pts.iter().flat_map(|&p| crate::grid::apply(&m, p).map(|v| v as f32)).collect();
        let lin = moving.matrix(Space::Lps, Space::Normalised).fixed_view::<3, 3>(0, 0).transpose();
        let mut rm = [0f32; 9];
        for r in 0..3 {
            for c in 0..3 {
                rm[r * 3 + c] = lin[(r, c)] as f32;
            }
        }
        Ok(Self {
            base: Tensor::from_vec(base, (1, pts.len(), 3), device)?,
            lin_t: Tensor::from_vec(rm.to_vec(), (3, 3), device)?,
            points: pts.len(),
        })
    }

    /// Moving-normalised sampling points `(1, P, 3)` for a displacement `(1, 3, D, H, W)` in LPS
    /// mm laid out on the fixed-side grid of this plan.
    pub fn points_for(&self, disp: &Tensor) -> Result<Tensor> {
        let d = disp.reshape((3, self.points))?.t()?.matmul(&self.lin_t)?.unsqueeze(0)?;
        Ok(self.base.broadcast_add(&d)?)
    }
}

/// A dense displacement field (LPS mm) on a control grid, as a `(1, 3, d, h, w)` tensor.
#[derive(Debug, Clone)]
pub struct DenseDisplacement {
    pub grid: Grid,
    pub tensor: Tensor,
}

impl DenseDisplacement {
    pub fn zeros(grid: Grid, device: &Device) -> Result<Self> {
        let (d, h, w) = grid.dhw();
        Ok(Self { grid, tensor: Tensor::zeros((1, 3, d, h, w), DType::F32, device)? })
    }

    /// The field trilinearly resampled at the voxel centres of another grid (border values
    /// beyond the control grid), as a `(1, 3, d, h, w)` tensor.
    fn sample_on(&self, grid: &Grid) -> Result<Tensor> {
        let m = self.grid.matrix(Space::Lps, Space::Normalised);
        let pts: Vec<f32> =
            grid_points_lps(grid).into_iter().flat_map(|p| crate::grid::apply(&m, p).map(|v| v as f32)).collect();
        let n = grid.num_voxels();
        let pts = Tensor::from_vec(pts, (1, n, 3), self.tensor.device())?;
        let v = ops::grid_sample(&self.tensor, &pts, ops::Interpolation::Linear, ops::Padding::Border)?;
        let (d, h, w) = grid.dhw();
        Ok(v.reshape((1, 3, d, h, w))?)
    }

    /// The field resampled onto another grid.
    pub fn resampled(&self, grid: &Grid) -> Result<Self> {
        Ok(Self { grid: grid.clone(), tensor: self.sample_on(grid)? })
    }

    /// The displacement `exp(v) − id` of a stationary velocity field `v` `(1, 3, d, h, w)` (LPS
    /// mm on `grid`) by scaling and squaring: `v / 2^steps`, composed with itself `steps` times
    /// (`u ← u + u ∘ (id + u)`). Each small step is invertible, hence so is the result: it does
    /// not fold. Differentiable in `v`.
    pub fn exponentiate(velocity: &Tensor, grid: &Grid, steps: usize) -> Result<Tensor> {
        let plan = SamplingPlan::new(grid, grid, &Affine::default(), velocity.device())?;
        let mut u = (velocity / 2f64.powi(steps as i32))?;
        // each step `u + u(x + u)` as one fused op (points, sampler and sum)
        let (d, h, w) = grid.dhw();
        let step = ops::SquaringStep::new(&plan.base, &plan.lin_t, [d, h, w])?;
        for _ in 0..steps {
            // (no reshape between steps: each is a node whose gradient candle zero-fills and adds)
            u = step.apply(&u)?;
        }
        Ok(u)
    }

    /// The full transform `affine(x) + u(x) − x` as an ITK displacement field on `grid`.
    pub fn to_field(&self, affine: &Affine, grid: &Grid) -> Result<DisplacementField> {
        let mut data = self.sample_on(grid)?.flatten_all()?.to_vec1::<f32>()?;
        let n = grid.num_voxels();
        for (v, p) in grid_points_lps(grid).iter().enumerate() {
            let q = affine.apply(*p);
            for a in 0..3 {
                data[a * n + v] += (q[a] - p[a]) as f32;
            }
        }
        DisplacementField::new(grid.clone(), data)
    }
}
