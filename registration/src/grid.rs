//! Image geometry: one type that owns a sampling lattice in physical space.
//!
//! Four coordinate systems meet here, and [`Grid::matrix`] is the one place that maps between
//! them:
//! - `Voxel`: continuous voxel indices `(i, j, k)`; `i` runs fastest in memory (NIfTI order).
//! - `Ras`: NIfTI world millimetres (`world = affine · (i, j, k, 1)`).
//! - `Lps`: ITK world millimetres (`x_lps = −x_ras`, `y_lps = −y_ras`, `z_lps = z_ras`).
//! - `Normalised`: the sampler's `[-1, 1]` cube, corner-aligned (`-1` is the centre of the first
//!   voxel, `+1` the centre of the last); an axis of length 1 maps to `0`.
//!
//! Data laid out as `(C, D, H, W)` has `W = nx` (index `i`), `H = ny`, `D = nz`.

use nalgebra::{Matrix3, Matrix4, Vector3, Vector4};

use crate::Error;

/// A coordinate system a point can be expressed in. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    Voxel,
    Ras,
    Lps,
    Normalised,
}

/// Upper bound on voxels in one grid (2^31): far above any scan we expect, low enough that a
/// corrupt header cannot make us try to allocate terabytes.
pub const MAX_VOXELS: usize = 1 << 31;

/// A regular lattice: shape `[nx, ny, nz]` and the voxel → RAS affine.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    shape: [usize; 3],
    affine: Matrix4<f64>,
}

fn ras_lps() -> Matrix4<f64> {
    Matrix4::from_diagonal(&Vector4::new(-1.0, -1.0, 1.0, 1.0))
}

impl Grid {
    /// A grid from its shape `[nx, ny, nz]` and voxel → RAS affine.
    pub fn new(shape: [usize; 3], affine: Matrix4<f64>) -> Result<Self, Error> {
        if shape.contains(&0) {
            return Err(Error::Geometry(format!("grid has a zero dimension: {shape:?}")));
        }
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= MAX_VOXELS)
            .ok_or_else(|| Error::Geometry(format!("grid {shape:?} is absurdly large")))?;
        debug_assert!(n > 0);
        if affine.iter().any(|v| !v.is_finite()) {
            return Err(Error::Geometry("affine has non-finite entries".into()));
        }
        let bottom = affine.fixed_view::<1, 4>(3, 0);
        if (bottom - nalgebra::RowVector4::new(0.0, 0.0, 0.0, 1.0)).abs().max() > 1e-9 {
            return Err(Error::Geometry("affine's last row is not (0, 0, 0, 1)".into()));
        }
        let lin = affine.fixed_view::<3, 3>(0, 0).into_owned();
        let det = lin.determinant();
        let scale = lin.column_iter().map(|c| c.norm()).fold(0.0, f64::max);
        if det.is_nan() || det.abs() <= 1e-12 * scale.powi(3).max(1e-300) {
            return Err(Error::Geometry("affine is singular (zero spacing or collinear axes)".into()));
        }
        Ok(Self { shape, affine })
    }

    /// An axis-aligned RAS grid with the given spacing (mm) whose first voxel centre is `origin_ras`.
    pub fn from_spacing(shape: [usize; 3], spacing: [f64; 3], origin_ras: [f64; 3]) -> Result<Self, Error> {
        Self::from_parts(shape, spacing, origin_ras, Matrix3::identity())
    }

    /// A grid from spacing, RAS origin and a direction matrix whose columns are the RAS unit
    /// vectors of the voxel axes.
    pub fn from_parts(
        shape: [usize; 3],
        spacing: [f64; 3],
        origin_ras: [f64; 3],
        direction: Matrix3<f64>,
    ) -> Result<Self, Error> {
        if spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::Geometry(format!("spacing must be positive, got {spacing:?}")));
        }
        let lin = direction * Matrix3::from_diagonal(&Vector3::from(spacing));
        let mut a = Matrix4::identity();
        a.fixed_view_mut::<3, 3>(0, 0).copy_from(&lin);
        a.fixed_view_mut::<3, 1>(0, 3).copy_from(&Vector3::from(origin_ras));
        Self::new(shape, a)
    }

    /// Shape `[nx, ny, nz]`.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Shape as candle's `(D, H, W)`.
    pub fn dhw(&self) -> (usize, usize, usize) {
        (self.shape[2], self.shape[1], self.shape[0])
    }

    pub fn num_voxels(&self) -> usize {
        self.shape.iter().product()
    }

    /// A 2D image is a grid one voxel deep.
    pub fn is_2d(&self) -> bool {
        self.shape[2] == 1
    }

    /// Voxel → RAS affine.
    pub fn affine(&self) -> &Matrix4<f64> {
        &self.affine
    }

    /// Voxel spacing in mm along `i, j, k`.
    pub fn spacing(&self) -> [f64; 3] {
        let l = self.linear();
        [l.column(0).norm(), l.column(1).norm(), l.column(2).norm()]
    }

    /// The smallest voxel spacing (mm): the resolution the pyramid counts from.
    pub fn min_spacing(&self) -> f64 {
        self.spacing().iter().cloned().fold(f64::INFINITY, f64::min)
    }

    /// Shape of a pyramid level `shrink` times coarser than the finest spacing: each axis is
    /// shrunk by the factor that brings its spacing nearest to `shrink` times the finest one, so
    /// anisotropic grids become about isotropic (never below one voxel).
    pub fn level_shape(&self, shrink: usize) -> [usize; 3] {
        let (sp, smin) = (self.spacing(), self.min_spacing());
        [0, 1, 2].map(|a| {
            let f = ((shrink as f64 * smin / sp[a]).round() as usize).max(1);
            self.shape[a].div_ceil(f).max(1)
        })
    }

    /// Whether a continuous voxel index lies inside the grid's extent: half a voxel beyond the
    /// outer voxel centres on every axis, where resampling with ITK's convention still has data.
    /// The one rule for "inside the image" in voxel units; the samplers of `segmentation::ops`
    /// and [`crate::loss::overlap_mask`] apply the same extent to normalised coordinates.
    pub fn contains_voxel(&self, v: [f64; 3]) -> bool {
        (0..3).all(|a| in_extent(v[a], self.shape[a]))
    }

    /// RAS position of voxel (0, 0, 0).
    pub fn origin_ras(&self) -> [f64; 3] {
        [self.affine[(0, 3)], self.affine[(1, 3)], self.affine[(2, 3)]]
    }

    /// Columns: RAS unit vectors of the voxel axes (may include shear for non-orthogonal affines).
    pub fn direction_ras(&self) -> Matrix3<f64> {
        let s = self.spacing();
        self.linear() * Matrix3::from_diagonal(&Vector3::new(1.0 / s[0], 1.0 / s[1], 1.0 / s[2]))
    }

    fn linear(&self) -> Matrix3<f64> {
        self.affine.fixed_view::<3, 3>(0, 0).into_owned()
    }

    /// Homogeneous matrix mapping a point in `from` to `to`; every conversion in the toolkit
    /// goes through here.
    pub fn matrix(&self, from: Space, to: Space) -> Matrix4<f64> {
        let to_voxel = |s: Space| -> Matrix4<f64> {
            match s {
                Space::Voxel => Matrix4::identity(),
                Space::Ras => self.affine.try_inverse().expect("affine validated as invertible"),
                Space::Lps => self.affine.try_inverse().expect("affine validated as invertible") * ras_lps(),
                Space::Normalised => self.normalised_to_voxel(),
            }
        };
        let from_voxel = |s: Space| -> Matrix4<f64> {
            match s {
                Space::Voxel => Matrix4::identity(),
                Space::Ras => self.affine,
                Space::Lps => ras_lps() * self.affine,
                Space::Normalised => {
                    self.normalised_to_voxel().try_inverse().unwrap_or_else(|| self.voxel_to_normalised_degenerate())
                }
            }
        };
        from_voxel(to) * to_voxel(from)
    }

    /// Maps one point between coordinate systems.
    pub fn map(&self, p: [f64; 3], from: Space, to: Space) -> [f64; 3] {
        apply(&self.matrix(from, to), p)
    }

    /// Normalised → voxel: `i = (n + 1) / 2 · (N − 1)`. Singular for an axis of length 1, where
    /// every normalised value lands on voxel 0.
    fn normalised_to_voxel(&self) -> Matrix4<f64> {
        let mut m = Matrix4::identity();
        for a in 0..3 {
            let h = (self.shape[a] as f64 - 1.0) / 2.0;
            m[(a, a)] = h;
            m[(a, 3)] = h;
        }
        m
    }

    fn voxel_to_normalised_degenerate(&self) -> Matrix4<f64> {
        let mut m = Matrix4::identity();
        for a in 0..3 {
            let n = self.shape[a] as f64;
            if n > 1.0 {
                m[(a, a)] = 2.0 / (n - 1.0);
                m[(a, 3)] = -1.0;
            } else {
                m[(a, a)] = 0.0;
                m[(a, 3)] = 0.0;
            }
        }
        m
    }

    /// A grid over the same field of view with `factor`-times coarser voxels (per axis; an axis of
    /// length 1 stays 1). Coarse voxel `c` sits at fine voxel `f·c + (f − 1)/2`, like average pooling.
    pub fn downsampled(&self, factor: [usize; 3]) -> Grid {
        let mut shape = [0; 3];
        let mut m = Matrix4::identity();
        for a in 0..3 {
            let f = if self.shape[a] == 1 { 1 } else { factor[a].max(1) };
            shape[a] = self.shape[a].div_ceil(f);
            m[(a, a)] = f as f64;
            m[(a, 3)] = (f as f64 - 1.0) / 2.0;
        }
        Grid { shape, affine: self.affine * m }
    }

    /// A grid over the same field of view with the given shape, voxel centres placed as
    /// trilinear resizing with `align_corners = false` places them.
    pub fn resized(&self, shape: [usize; 3]) -> Grid {
        let mut m = Matrix4::identity();
        for a in 0..3 {
            let s = self.shape[a] as f64 / shape[a] as f64;
            m[(a, a)] = s;
            m[(a, 3)] = 0.5 * s - 0.5;
        }
        Grid { shape, affine: self.affine * m }
    }

    /// Same lattice within tolerance (mm on the affine entries): fields and label maps must sit on
    /// their image's grid.
    pub fn same_as(&self, other: &Grid, tol: f64) -> bool {
        self.shape == other.shape && (self.affine - other.affine).abs().max() <= tol
    }

    /// RAS corners of the field of view's voxel centres (8 points).
    pub fn corners_ras(&self) -> Vec<[f64; 3]> {
        let mut out = Vec::with_capacity(8);
        for c in 0..8 {
            let p = [0, 1, 2].map(|a| if c >> a & 1 == 1 { (self.shape[a] - 1) as f64 } else { 0.0 });
            out.push(self.map(p, Space::Voxel, Space::Ras));
        }
        out
    }

    /// RAS position of the centre of the field of view.
    pub fn center_ras(&self) -> [f64; 3] {
        let c = [0, 1, 2].map(|a| (self.shape[a] as f64 - 1.0) / 2.0);
        self.map(c, Space::Voxel, Space::Ras)
    }

    /// The axis permutation and flips that make the voxel axes run closest to R, A and S, and the
    /// grid they give: the same voxel centres in the same places, stored in RAS order. 2D grids
    /// (one voxel deep) keep their axes.
    pub fn canonical(&self) -> (Grid, Reorientation) {
        let d = self.direction_ras();
        let mut r = Reorientation { source: [0, 1, 2], flip: [false; 3] };
        if !self.is_2d() {
            // greedy on the largest direction cosine: each world axis takes the voxel axis most
            // aligned with it (as nibabel's io_orientation, without its shear handling)
            let mut free_world = vec![0, 1, 2];
            let mut free_voxel = vec![0, 1, 2];
            while !free_world.is_empty() {
                let (mut bw, mut bv, mut best) = (0, 0, -1.0);
                for &w in &free_world {
                    for &v in &free_voxel {
                        if d[(w, v)].abs() > best {
                            (bw, bv, best) = (w, v, d[(w, v)].abs());
                        }
                    }
                }
                r.source[bw] = bv;
                r.flip[bw] = d[(bw, bv)] < 0.0;
                free_world.retain(|&w| w != bw);
                free_voxel.retain(|&v| v != bv);
            }
        }
        // old voxel index o = M · new voxel index n
        let mut m = Matrix4::zeros();
        m[(3, 3)] = 1.0;
        let mut shape = [0; 3];
        for w in 0..3 {
            let v = r.source[w];
            shape[w] = self.shape[v];
            m[(v, w)] = if r.flip[w] { -1.0 } else { 1.0 };
            m[(v, 3)] = if r.flip[w] { (self.shape[v] - 1) as f64 } else { 0.0 };
        }
        (Grid { shape, affine: self.affine * m }, r)
    }
}

/// How [`Grid::canonical`] reorders voxels: new axis `a` is old axis `source[a]`, reversed where
/// `flip[a]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reorientation {
    pub source: [usize; 3],
    pub flip: [bool; 3],
}

impl Reorientation {
    pub fn is_identity(&self) -> bool {
        self.source == [0, 1, 2] && self.flip == [false; 3]
    }
}

/// ITK's extent test for a continuous index along an axis of `n` voxels: `x` in
/// `[-0.5, n - 0.5)` ([`Grid::contains_voxel`]).
pub fn in_extent(x: f64, n: usize) -> bool {
    x.is_finite() && x >= -0.5 && x < n as f64 - 0.5
}

/// Applies a homogeneous 4x4 matrix to a 3D point.
pub fn apply(m: &Matrix4<f64>, p: [f64; 3]) -> [f64; 3] {
    let v = m * Vector4::new(p[0], p[1], p[2], 1.0);
    [v[0], v[1], v[2]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oblique() -> Grid {
        let r = nalgebra::Rotation3::from_euler_angles(0.3, -0.2, 0.7).into_inner();
        Grid::from_parts([20, 13, 7], [0.8, 1.3, 2.5], [-12.0, 40.0, 7.5], r).unwrap()
    }

    fn close(a: [f64; 3], b: [f64; 3], tol: f64) -> bool {
        (0..3).all(|i| (a[i] - b[i]).abs() < tol)
    }

    #[test]
    fn voxel_world_round_trip() {
        let g = oblique();
        let p = [3.25, 11.0, 5.5];
        for s in [Space::Ras, Space::Lps, Space::Normalised] {
            let q = g.map(p, Space::Voxel, s);
            assert!(close(g.map(q, s, Space::Voxel), p, 1e-9), "{s:?}");
        }
        let ras = g.map(p, Space::Voxel, Space::Ras);
        let lps = g.map(p, Space::Voxel, Space::Lps);
        assert!(close(lps, [-ras[0], -ras[1], ras[2]], 1e-12));
        assert!(close(g.map(ras, Space::Ras, Space::Lps), lps, 1e-9));
    }

    #[test]
    fn voxel_to_ras_is_the_affine() {
        let g = oblique();
        let a = g.affine();
        let p = [1.0, 2.0, 3.0];
        let expect = [0, 1, 2].map(|r| a[(r, 0)] + 2.0 * a[(r, 1)] + 3.0 * a[(r, 2)] + a[(r, 3)]);
        assert!(close(g.map(p, Space::Voxel, Space::Ras), expect, 1e-12));
        assert!(close(g.spacing(), [0.8, 1.3, 2.5], 1e-12));
        assert!(close(g.origin_ras(), [-12.0, 40.0, 7.5], 1e-12));
    }

    #[test]
    fn normalised_is_corner_aligned() {
        let g = oblique();
        assert!(close(g.map([0.0, 0.0, 0.0], Space::Voxel, Space::Normalised), [-1.0; 3], 1e-12));
        assert!(close(g.map([19.0, 12.0, 6.0], Space::Voxel, Space::Normalised), [1.0; 3], 1e-12));
        assert!(close(g.map([0.0, 0.0, 0.0], Space::Normalised, Space::Voxel), [9.5, 6.0, 3.0], 1e-12));
    }

    #[test]
    fn flat_axis_maps_to_zero() {
        let g = Grid::from_spacing([5, 4, 1], [1.0, 1.0, 1.0], [0.0; 3]).unwrap();
        assert!(g.is_2d());
        let n = g.map([4.0, 3.0, 0.0], Space::Voxel, Space::Normalised);
        assert!(close(n, [1.0, 1.0, 0.0], 1e-12));
        assert!(close(g.map(n, Space::Normalised, Space::Voxel), [4.0, 3.0, 0.0], 1e-12));
    }

    #[test]
    fn downsampled_and_resized_keep_the_field_of_view() {
        let g = oblique();
        let c = g.downsampled([2, 2, 2]);
        assert_eq!(c.shape(), [10, 7, 4]);
        // coarse voxel 0 is the centre of fine voxels 0 and 1
        assert!(close(c.map([0.0; 3], Space::Voxel, Space::Ras), g.map([0.5; 3], Space::Voxel, Space::Ras), 1e-9));
        let r = g.resized([40, 26, 14]);
        // the outer voxel faces coincide
        let face = g.map([-0.5; 3], Space::Voxel, Space::Ras);
        assert!(close(r.map([-0.5; 3], Space::Voxel, Space::Ras), face, 1e-9));
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(Grid::from_spacing([0, 3, 3], [1.0; 3], [0.0; 3]).is_err());
        assert!(Grid::from_spacing([3, 3, 3], [1.0, 0.0, 1.0], [0.0; 3]).is_err());
        assert!(Grid::from_spacing([1 << 20, 1 << 20, 1 << 20], [1.0; 3], [0.0; 3]).is_err());
        let mut a = Matrix4::identity();
        a[(0, 0)] = f64::NAN;
        assert!(Grid::new([2, 2, 2], a).is_err());
    }
}
