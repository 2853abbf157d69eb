//! Applying a displacement field: `warped(x) = moving(x + u(x))` on the field's (fixed) grid.
//!
//! Points are mapped in LPS millimetres through both grids' affines, so the moving image may
//! have any grid. With [`Padding::Extent`] and linear interpolation this reproduces ITK's
//! `ResampleImageFilter` with a `DisplacementFieldTransform` and default value 0.

use nalgebra::Matrix4;
use rayon::prelude::*;
use segmentation::ops::{sample_point, Dims};
pub use segmentation::ops::{Interpolation, Padding};

use crate::grid::{in_extent, Space};
use crate::{DisplacementField, Labels, Volume};

/// Maps fixed voxel `(i, j, k)` with displacement `u` to a moving voxel coordinate:
/// `moving_vox = M · (fixed_vox, 1) + L · u` where `M` composes fixed voxel → LPS → moving voxel
/// and `L` is the linear part of LPS → moving voxel.
struct Mapping {
    m: Matrix4<f64>,
    l: Matrix4<f64>,
}

impl Mapping {
    fn new(field: &DisplacementField, moving: &crate::Grid) -> Self {
        let to_moving = moving.matrix(Space::Lps, Space::Voxel);
        let m = to_moving * field.grid.matrix(Space::Voxel, Space::Lps);
        let mut l = to_moving;
        l.fixed_view_mut::<3, 1>(0, 3).fill(0.0);
        Self { m, l }
    }

    #[inline]
    fn at(&self, i: usize, j: usize, k: usize, u: [f32; 3]) -> [f64; 3] {
        let (m, l) = (&self.m, &self.l);
        let (x, y, z) = (i as f64, j as f64, k as f64);
        let (ux, uy, uz) = (u[0] as f64, u[1] as f64, u[2] as f64);
        // round-off in the composed affines must not turn an exact voxel hit into a blend with
        // its neighbour (a zero field has to return the image exactly)
        let snap = |v: f64| {
            let r = v.round();
            if (v - r).abs() < 1e-6 {
                r
            } else {
                v
            }
        };
        [0, 1, 2].map(|r| {
            snap(
                m[(r, 0)] * x
                    + m[(r, 1)] * y
                    + m[(r, 2)] * z
                    + m[(r, 3)]
                    + l[(r, 0)] * ux
                    + l[(r, 1)] * uy
                    + l[(r, 2)] * uz,
            )
        })
    }
}

/// Resamples every channel of `moving` through `field`; the result lies on the field's grid.
pub fn warp_volume(moving: &Volume, field: &DisplacementField, interp: Interpolation, padding: Padding) -> Volume {
    let map = Mapping::new(field, &moving.grid);
    let [nx, ny, nz] = field.grid.shape();
    let (d, h, w) = moving.grid.dhw();
    let dims = Dims { d, h, w };
    let rows = ny * nz;
    let mut out = vec![0.0f32; moving.channels * nx * rows];
    out.par_chunks_mut(nx).enumerate().for_each(|(r, o)| {
        let (c, row) = (r / rows, r % rows);
        let (j, k) = (row % ny, row / ny);
        let src = moving.channel(c);
        for (i, v) in o.iter_mut().enumerate() {
            let p = map.at(i, j, k, field.at(row * nx + i));
            *v = sample_point(src, dims, [p[0] as f32, p[1] as f32, p[2] as f32], interp, padding);
        }
    });
    Volume { grid: field.grid.clone(), channels: moving.channels, data: out }
}

/// Resamples a label map through `field` by nearest neighbour (halves round up, as in ITK);
/// outside the moving image's extent the label is 0.
///
/// Looks labels up directly instead of through the float sampler so that labels above 2^24
/// stay exact.
pub fn warp_labels(moving: &Labels, field: &DisplacementField) -> Labels {
    let map = Mapping::new(field, &moving.grid);
    let [nx, ny, nz] = field.grid.shape();
    let [mx, my, mz] = moving.grid.shape();
    let pick = |x: f64, n: usize| in_extent(x, n).then(|| ((x + 0.5).floor() as usize).min(n - 1));
    let mut out = vec![0u32; nx * ny * nz];
    out.par_chunks_mut(nx).enumerate().for_each(|(row, o)| {
        let (j, k) = (row % ny, row / ny);
        for (i, v) in o.iter_mut().enumerate() {
            let p = map.at(i, j, k, field.at(row * nx + i));
            if let (Some(a), Some(b), Some(c)) = (pick(p[0], mx), pick(p[1], my), pick(p[2], mz)) {
                *v = moving.data[(c * my + b) * mx + a];
            }
        }
    });
    Labels { grid: field.grid.clone(), data: out }
}

/// Resamples a label map through `field` by linear interpolation of every label's indicator,
/// keeping the label of the largest weight (ties to the lower id): smoother boundaries than
/// nearest neighbour where the moving grid is coarser than the fixed one. Outside the moving
/// image's extent the label is 0; within half a voxel of its border the border voxels count,
/// as for images.
pub fn warp_labels_linear(moving: &Labels, field: &DisplacementField) -> Labels {
    let map = Mapping::new(field, &moving.grid);
    let [nx, ny, nz] = field.grid.shape();
    let [mx, my, mz] = moving.grid.shape();
    // the two voxels around `x` (clamped to the axis) and the weight of the second
    let taps = |x: f64, n: usize| {
        let xc = x.clamp(0.0, (n - 1) as f64);
        let i0 = xc.floor() as usize;
        (i0, (i0 + 1).min(n - 1), xc - i0 as f64)
    };
    let mut out = vec![0u32; nx * ny * nz];
    out.par_chunks_mut(nx).enumerate().for_each(|(row, o)| {
        let (j, k) = (row % ny, row / ny);
        for (i, v) in o.iter_mut().enumerate() {
            let p = map.at(i, j, k, field.at(row * nx + i));
            if !moving.grid.contains_voxel(p) {
                continue;
            }
            let [(a0, a1, fa), (b0, b1, fb), (c0, c1, fc)] = [taps(p[0], mx), taps(p[1], my), taps(p[2], mz)];
            // at most 8 distinct labels meet at a point
            let mut votes: [(u32, f64); 8] = [(0, 0.0); 8];
            let mut len = 0;
            for (c, wc) in [(c0, 1.0 - fc), (c1, fc)] {
                for (b, wb) in [(b0, 1.0 - fb), (b1, fb)] {
                    for (a, wa) in [(a0, 1.0 - fa), (a1, fa)] {
                        let w = wa * wb * wc;
                        if w <= 0.0 {
                            continue;
                        }
                        let label = moving.data[(c * my + b) * mx + a];
                        match votes[..len].iter_mut().find(|e| e.0 == label) {
                            Some(e) => e.1 += w,
                            None => {
                                votes[len] = (label, w);
                                len += 1;
                            }
                        }
                    }
                }
            }
            *v = votes[..len]
                .iter()
                .fold((0u32, f64::NEG_INFINITY), |best, &(l, w)| {
                    if w > best.1 + 1e-12 || ((w - best.1).abs() <= 1e-12 && l < best.0) {
                        (l, w)
                    } else {
                        best
                    }
                })
                .0;
        }
    });
    Labels { grid: field.grid.clone(), data: out }
}

/// Which voxels of the field's (fixed) grid the moving image covers through `field`: where
/// both images have data, the only place a registration can be judged.
pub fn coverage(field: &DisplacementField, moving: &crate::Grid) -> Vec<bool> {
    let map = Mapping::new(field, moving);
    let [nx, ny, nz] = field.grid.shape();
    let mut out = vec![false; nx * ny * nz];
    out.par_chunks_mut(nx).enumerate().for_each(|(row, o)| {
        let (j, k) = (row % ny, row / ny);
        for (i, v) in o.iter_mut().enumerate() {
            let p = map.at(i, j, k, field.at(row * nx + i));
            *v = moving.contains_voxel(p);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Grid;

    fn oblique() -> Grid {
        let r = nalgebra::Rotation3::from_euler_angles(0.3, -0.2, 0.7).into_inner();
        Grid::from_parts([11, 9, 6], [0.8, 1.3, 2.5], [-12.0, 40.0, 7.5], r).unwrap()
    }

    fn ramp(grid: &Grid) -> Volume {
        let [nx, ny, nz] = grid.shape();
        let mut data = Vec::new();
        for c in 0..2 {
            for k in 0..nz {
                for j in 0..ny {
                    for i in 0..nx {
                        data.push((c * 100 + 7 * i + 3 * j * j + 11 * k) as f32 + 0.25 * ((i * j) % 5) as f32);
                    }
                }
            }
        }
        Volume::new(grid.clone(), 2, data).unwrap()
    }

    #[test]
    fn coverage_is_where_the_displaced_point_lies_inside_the_moving_extent() {
        let g = oblique();
        let [nx, ny, nz] = g.shape();
        assert!(coverage(&DisplacementField::zeros(g.clone()), &g).iter().all(|&c| c));
        // three voxels along the grid's first axis, in LPS mm
        let step = g.map([3.0, 0.0, 0.0], crate::Space::Voxel, crate::Space::Lps);
        let o = g.map([0.0, 0.0, 0.0], crate::Space::Voxel, crate::Space::Lps);
        let n = g.num_voxels();
        let mut data = vec![0.0f32; 3 * n];
        for a in 0..3 {
            data[a * n..(a + 1) * n].fill((step[a] - o[a]) as f32);
        }
        let cov = coverage(&DisplacementField::new(g.clone(), data).unwrap(), &g);
        for (v, &c) in cov.iter().enumerate() {
            assert_eq!(c, v % nx + 3 < nx, "voxel {v}");
        }
        assert_eq!(cov.iter().filter(|&&c| c).count(), (nx - 3) * ny * nz);
    }

    #[test]
    fn zero_field_is_identity_exactly() {
        let g = oblique();
        let v = ramp(&g);
        let f = DisplacementField::zeros(g.clone());
        for interp in [Interpolation::Linear, Interpolation::Nearest] {
            let w = warp_volume(&v, &f, interp, Padding::Extent);
            assert_eq!(w, v, "{interp:?}");
        }
        let l = Labels::new(g.clone(), (0..g.num_voxels() as u32).map(|x| x * 1_000_003).collect()).unwrap();
        assert_eq!(warp_labels(&l, &f), l);
    }

    /// Linear label warping is the argmax of the linearly warped one-hot maps, and agrees with
    /// nearest neighbour on whole-voxel shifts and the identity.
    #[test]
    fn linear_labels_are_the_argmax_of_warped_indicators() {
        let g = oblique();
        let n = g.num_voxels();
        let l = Labels::new(g.clone(), (0..n).map(|v| ((v * 7) % 5) as u32 * 3).collect()).unwrap();
        let f = DisplacementField::zeros(g.clone());
        assert_eq!(warp_labels_linear(&l, &f), l);
        // a smooth sub-voxel field
        let mut data = vec![0.0f32; 3 * n];
        for v in 0..n {
            data[v] = 0.6 * ((v % 11) as f32 / 11.0);
            data[n + v] = -0.4;
            data[2 * n + v] = 0.3 * ((v % 5) as f32 / 5.0);
        }
        let f = DisplacementField::new(g.clone(), data).unwrap();
        let soft = warp_labels_linear(&l, &f);
        // background is a label like any other here
        let ids = [vec![0], l.ids()].concat();
        let hot = l.one_hot(&ids);
        let warped = warp_volume(&hot, &f, Interpolation::Linear, Padding::Extent);
        let inside = coverage(&f, &g);
        for (v, &covered) in inside.iter().enumerate() {
            if !covered {
                assert_eq!(soft.data[v], 0);
                continue;
            }
            let w: Vec<f32> = (0..ids.len()).map(|c| warped.channel(c)[v]).collect();
            let best = w.iter().cloned().fold(f32::MIN, f32::max);
            let got = ids.iter().position(|&id| id == soft.data[v]).unwrap();
            assert!(w[got] >= best - 1e-5, "voxel {v}: {w:?} picked {}", soft.data[v]);
        }
    }

    /// A field of one voxel step along each axis (in LPS mm) shifts the image by whole voxels.
    #[test]
    fn translation_field_shifts_the_image() {
        let g = oblique();
        let v = ramp(&g);
        let step = [1i64, -1, 1];
        let p0 = g.map([0.0; 3], Space::Voxel, Space::Lps);
        let p1 = g.map(step.map(|s| s as f64), Space::Voxel, Space::Lps);
        let u = [0, 1, 2].map(|a| (p1[a] - p0[a]) as f32);
        let n = g.num_voxels();
        let mut data = vec![0.0; 3 * n];
        for (a, ua) in u.iter().enumerate() {
            data[a * n..(a + 1) * n].fill(*ua);
        }
        let f = DisplacementField::new(g.clone(), data).unwrap();
        let w = warp_volume(&v, &f, Interpolation::Linear, Padding::Extent);
        let lab = Labels::new(g.clone(), (0..n as u32).collect()).unwrap();
        let wl = warp_labels(&lab, &f);
        let [nx, ny, nz] = g.shape();
        for c in 0..2 {
            for k in 0..nz {
                for j in 0..ny {
                    for i in 0..nx {
                        let src = [i as i64 + step[0], j as i64 + step[1], k as i64 + step[2]];
                        let inside = (0..3).all(|a| src[a] >= 0 && src[a] < g.shape()[a] as i64);
                        let got = w.channel(c)[v.index(i, j, k)];
                        let want = if inside {
                            v.channel(c)[v.index(src[0] as usize, src[1] as usize, src[2] as usize)]
                        } else {
                            0.0
                        };
                        assert!((got - want).abs() < 1e-3, "c{c} ({i},{j},{k}): {got} vs {want}");
                        if c == 0 {
                            let want_l =
                                if inside { v.index(src[0] as usize, src[1] as usize, src[2] as usize) } else { 0 };
                            assert_eq!(wl.data[v.index(i, j, k)], want_l as u32);
                        }
                    }
                }
            }
        }
    }

    /// The moving image on another grid: identity field samples the moving image at the fixed
    /// voxel centres' physical positions.
    #[test]
    fn different_moving_grid_goes_through_physical_space() {
        let fixed = oblique();
        let moving = Grid::from_spacing([60, 50, 50], [0.7, 0.9, 1.1], [-40.0, 15.0, -20.0]).unwrap();
        // a linear function of RAS position is reproduced exactly by trilinear interpolation
        let f = |p: [f64; 3]| (0.5 * p[0] - 0.25 * p[1] + 0.125 * p[2]) as f32;
        let [nx, ny, nz] = moving.shape();
        let mut data = Vec::new();
        for k in 0..nz {
            for j in 0..ny {
                for i in 0..nx {
                    data.push(f(moving.map([i as f64, j as f64, k as f64], Space::Voxel, Space::Ras)));
                }
            }
        }
        let mv = Volume::new(moving.clone(), 1, data).unwrap();
        let w = warp_volume(&mv, &DisplacementField::zeros(fixed.clone()), Interpolation::Linear, Padding::Extent);
        let [fx, fy, fz] = fixed.shape();
        let mut checked = 0;
        for k in 0..fz {
            for j in 0..fy {
                for i in 0..fx {
                    let p = fixed.map([i as f64, j as f64, k as f64], Space::Voxel, Space::Ras);
                    let q = moving.map(p, Space::Ras, Space::Voxel);
                    if (0..3).all(|a| q[a] >= 0.0 && q[a] <= (moving.shape()[a] - 1) as f64) {
                        let got = w.data[w.index(i, j, k)];
                        assert!((got - f(p)).abs() < 1e-3, "({i},{j},{k}) {got} vs {}", f(p));
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 100, "only {checked} voxels inside");
    }
}
