//! Evaluation metrics for registration results: label overlap (Dice), surface distance (HD95),
//! regularity of the transform (Jacobian determinant, SDlogJ, folding) and endpoint error.
//!
//! Conventions follow Learn2Reg where it has one; deviations are documented on each function.

use std::collections::BTreeMap;

use nalgebra::{Matrix3, Vector3};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{DisplacementField, Error, Grid, Labels, Result, Space, Volume};

/// Two grids count as the same lattice when their affines agree to this many mm.
const GRID_TOL_MM: f64 = 1e-4;

/// Voxels per parallel work item; fixed, so that floating-point sums are independent of the
/// number of threads.
const BLOCK: usize = 1 << 14;

/// Learn2Reg's lower clip of Jacobian determinants before taking logarithms.
pub const LOG_J_FLOOR: f64 = 1e-9;

fn same_grid(a: &Grid, b: &Grid, what: &str) -> Result<()> {
    if a.same_as(b, GRID_TOL_MM) {
        Ok(())
    } else {
        Err(Error::GridMismatch { what: what.to_string(), a: a.shape(), b: b.shape() })
    }
}

fn check_mask(mask: Option<&[bool]>, n: usize) -> Result<()> {
    match mask {
        Some(m) if m.len() != n => Err(Error::Data(format!("mask has {} values, the grid has {n} voxels", m.len()))),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Dice

/// Dice `2|A∩B| / (|A| + |B|)` for every non-zero label present in `a` or `b`, sorted by label.
/// Errors if the label maps are on different grids.
pub fn dice_per_label(a: &Labels, b: &Labels) -> Result<Vec<(u32, f64)>> {
    dice_impl(a, b, None)
}

/// [`dice_per_label`] restricted to voxels where `mask` is true (e.g. the part of the fixed image
/// that the moving image covers); labels are those present in `a` or `b` inside the mask.
pub fn dice_per_label_masked(a: &Labels, b: &Labels, mask: &[bool]) -> Result<Vec<(u32, f64)>> {
    dice_impl(a, b, Some(mask))
}

fn dice_impl(a: &Labels, b: &Labels, mask: Option<&[bool]>) -> Result<Vec<(u32, f64)>> {
    same_grid(&a.grid, &b.grid, "label maps")?;
    check_mask(mask, a.data.len())?;
    // Per label: [voxels in a, voxels in b, voxels in both]. Integer counts, so the parallel
    // reduction is exact.
    let counts = a
        .data
        .par_chunks(BLOCK)
        .zip(b.data.par_chunks(BLOCK))
        .enumerate()
        .map(|(blk, (ca, cb))| {
            let mut m: BTreeMap<u32, [u64; 3]> = BTreeMap::new();
            for (t, (&la, &lb)) in ca.iter().zip(cb).enumerate() {
                if (la == 0 && lb == 0) || mask.is_some_and(|m| !m[blk * BLOCK + t]) {
                    continue;
                }
                if la != 0 {
                    m.entry(la).or_default()[0] += 1;
                }
                if lb != 0 {
                    m.entry(lb).or_default()[1] += 1;
                }
                if la == lb {
                    m.entry(la).or_default()[2] += 1;
                }
            }
            m
        })
        .reduce(BTreeMap::new, |mut x, y| {
            for (l, c) in y {
                let e = x.entry(l).or_default();
                (0..3).for_each(|i| e[i] += c[i]);
            }
            x
        });
    Ok(counts.into_iter().map(|(l, [na, nb, both])| (l, 2.0 * both as f64 / (na + nb) as f64)).collect())
}

// ---------------------------------------------------------------------------------------------
// Surface distance

/// The 95th percentile of the symmetric surface distance (mm) between `label` in `a` and in `b`:
/// the distances from every surface voxel of each to the nearest surface voxel of the other,
/// pooled, and the 95th percentile taken with linear interpolation (as MedPy's `hd95`).
///
/// Surface voxels are label voxels with a 6-neighbour outside the label; outside the grid counts
/// as outside, and on a one-voxel-deep (2D) grid only the in-plane neighbours are considered.
/// Distances come from an exact Euclidean distance transform that uses the grid's voxel spacing
/// (the axes are treated as orthogonal; shear in the affine is ignored). `None` if the label is
/// absent from either map.
pub fn hd95_mm(a: &Labels, b: &Labels, label: u32) -> Result<Option<f64>> {
    same_grid(&a.grid, &b.grid, "label maps")?;
    let shape = a.grid.shape();
    let sa = surface(&a.data, shape, label);
    let sb = surface(&b.data, shape, label);
    let (Some(ba), Some(bb)) = (bounding_box(&sa, shape), bounding_box(&sb, shape)) else {
        return Ok(None);
    };
    // All surface voxels lie in the union of the two boxes, and an EDT restricted to a box that
    // holds every feature is exact inside it: crop to keep many-label evaluations cheap.
    let lo = [0, 1, 2].map(|i| ba.0[i].min(bb.0[i]));
    let hi = [0, 1, 2].map(|i| ba.1[i].max(bb.1[i]));
    let crop = |m: &[bool]| crop_box(m, shape, lo, hi);
    let (ca, cb) = (crop(&sa), crop(&sb));
    let cshape = [0, 1, 2].map(|i| hi[i] - lo[i] + 1);
    let spacing = a.grid.spacing();
    let da = edt_squared(&ca, cshape, spacing);
    let db = edt_squared(&cb, cshape, spacing);
    let mut d: Vec<f64> = ca
        .iter()
        .zip(&db)
        .filter(|(&s, _)| s)
        .map(|(_, &v)| v)
        .chain(cb.iter().zip(&da).filter(|(&s, _)| s).map(|(_, &v)| v))
        .map(f64::sqrt)
        .collect();
    Ok(Some(percentile(&mut d, 95.0)))
}

/// Label voxels with a 6-neighbour (4-neighbour on a 2D grid) outside the label or the grid.
fn surface(labels: &[u32], shape: [usize; 3], label: u32) -> Vec<bool> {
    let [nx, ny, nz] = shape;
    let mut out = vec![false; labels.len()];
    out.par_chunks_mut(nx * ny).enumerate().for_each(|(k, slice)| {
        for j in 0..ny {
            for i in 0..nx {
                let v = (k * ny + j) * nx + i;
                if labels[v] != label {
                    continue;
                }
                let inside = |ok: bool, w: usize| ok && labels[w] == label;
                let interior = inside(i > 0, v.wrapping_sub(1))
                    && inside(i + 1 < nx, v + 1)
                    && inside(j > 0, v.wrapping_sub(nx))
                    && inside(j + 1 < ny, v + nx)
                    && (nz == 1 || (inside(k > 0, v.wrapping_sub(nx * ny)) && inside(k + 1 < nz, v + nx * ny)));
                slice[j * nx + i] = !interior;
            }
        }
    });
    out
}

type Box3 = ([usize; 3], [usize; 3]);

fn bounding_box(m: &[bool], shape: [usize; 3]) -> Option<Box3> {
    let [nx, ny, _] = shape;
    m.par_iter()
        .enumerate()
        .filter(|(_, &s)| s)
        .map(|(v, _)| {
            let p = [v % nx, (v / nx) % ny, v / (nx * ny)];
            (p, p)
        })
        .reduce_with(|(a0, a1), (b0, b1)| ([0, 1, 2].map(|i| a0[i].min(b0[i])), [0, 1, 2].map(|i| a1[i].max(b1[i]))))
}

fn crop_box(m: &[bool], shape: [usize; 3], lo: [usize; 3], hi: [usize; 3]) -> Vec<bool> {
    let [nx, ny, _] = shape;
    let mut out = Vec::with_capacity((0..3).map(|i| hi[i] - lo[i] + 1).product());
    for k in lo[2]..=hi[2] {
        for j in lo[1]..=hi[1] {
            out.extend_from_slice(&m[(k * ny + j) * nx + lo[0]..=(k * ny + j) * nx + hi[0]]);
        }
    }
    out
}

/// Squared Euclidean distance (mm²) from every voxel to the nearest `true` voxel, by the
/// Felzenszwalb–Huttenlocher separable transform with per-axis spacing; infinite if there is
/// no feature voxel.
pub fn edt_squared(feature: &[bool], shape: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let [nx, ny, nz] = shape;
    let mut d: Vec<f64> = feature.iter().map(|&f| if f { 0.0 } else { f64::INFINITY }).collect();
    // x: contiguous lines.
    d.par_chunks_mut(nx).for_each_init(Envelope::default, |env, line| {
        let f = line.to_vec();
        env.transform(&f, spacing[0], line);
    });
    // y: columns within each slice.
    if ny > 1 {
        d.par_chunks_mut(nx * ny).for_each_init(Envelope::default, |env, slice| {
            let (mut f, mut g) = (vec![0.0; ny], vec![0.0; ny]);
            for i in 0..nx {
                (0..ny).for_each(|j| f[j] = slice[j * nx + i]);
                env.transform(&f, spacing[1], &mut g);
                (0..ny).for_each(|j| slice[j * nx + i] = g[j]);
            }
        });
    }
    // z: lines cross every slice, so each work item (one row j) returns its results and they
    // are scattered back afterwards.
    if nz > 1 {
        let plane = nx * ny;
        let rows: Vec<Vec<f64>> = (0..ny)
            .into_par_iter()
            .map_init(Envelope::default, |env, j| {
                let mut res = vec![0.0; nz * nx];
                let (mut f, mut g) = (vec![0.0; nz], vec![0.0; nz]);
                for i in 0..nx {
                    (0..nz).for_each(|k| f[k] = d[k * plane + j * nx + i]);
                    env.transform(&f, spacing[2], &mut g);
                    (0..nz).for_each(|k| res[k * nx + i] = g[k]);
                }
                res
            })
            .collect();
        for (j, res) in rows.iter().enumerate() {
            for k in 0..nz {
                d[k * plane + j * nx..][..nx].copy_from_slice(&res[k * nx..][..nx]);
            }
        }
    }
    d
}

/// Scratch space for the 1D lower envelope of parabolas.
#[derive(Default)]
struct Envelope {
    v: Vec<usize>,
    z: Vec<f64>,
}

impl Envelope {
    /// `out[q] = min_p (q·s − p·s)² + f[p]`; infinite `f[p]` are not features.
    fn transform(&mut self, f: &[f64], s: f64, out: &mut [f64]) {
        let (v, z) = (&mut self.v, &mut self.z);
        v.clear();
        z.clear();
        for (q, &fq) in f.iter().enumerate() {
            if !fq.is_finite() {
                continue;
            }
            let xq = q as f64 * s;
            // Pop parabolas that the new one hides, then record where it takes over.
            while let Some(&p) = v.last() {
                let xp = p as f64 * s;
                let cross = ((fq + xq * xq) - (f[p] + xp * xp)) / (2.0 * (xq - xp));
                if cross <= *z.last().expect("z tracks v") {
                    v.pop();
                    z.pop();
                } else {
                    v.push(q);
                    z.push(cross);
                    break;
                }
            }
            if v.is_empty() {
                v.push(q);
                z.push(f64::NEG_INFINITY);
            }
        }
        if v.is_empty() {
            out.fill(f64::INFINITY);
            return;
        }
        let mut k = 0;
        for (q, o) in out.iter_mut().enumerate() {
            let xq = q as f64 * s;
            while k + 1 < v.len() && z[k + 1] < xq {
                k += 1;
            }
            let dx = xq - v[k] as f64 * s;
            *o = dx * dx + f[v[k]];
        }
    }
}

/// Percentile `p` (%) with linear interpolation between order statistics (NumPy's default).
/// Sorts `values`; NaN for an empty slice.
fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.par_sort_unstable_by(f64::total_cmp);
    let rank = p / 100.0 * (values.len() - 1) as f64;
    let k = rank.floor() as usize;
    let f = rank - k as f64;
    let next = values[(k + 1).min(values.len() - 1)];
    values[k] + f * (next - values[k])
}

// ---------------------------------------------------------------------------------------------
// Jacobian

/// Determinant of the Jacobian of `x ↦ x + u(x)`, i.e. `det(I + ∇u)`, at every voxel of the
/// field's grid. `u` is in LPS mm and `∇` is taken with respect to LPS world coordinates: the
/// voxel-index derivatives (central differences inside, one-sided at the borders, zero along an
/// axis of length 1) are mapped through the inverse of the grid's voxel → LPS matrix, so the
/// grid's spacing and direction are accounted for.
pub fn jacobian_determinant(field: &DisplacementField) -> Volume {
    let grid = &field.grid;
    let [nx, ny, nz] = grid.shape();
    let n = grid.num_voxels();
    let lin: Matrix3<f64> = grid.matrix(Space::Voxel, Space::Lps).fixed_view::<3, 3>(0, 0).into_owned();
    let inv = lin.try_inverse().expect("grid affines are validated as invertible");
    let u = &field.data;
    let strides = [1, nx, nx * ny];
    let extents = [nx, ny, nz];
    let mut det = vec![0f32; n];
    det.par_chunks_mut(nx * ny).enumerate().for_each(|(k, slice)| {
        for j in 0..ny {
            for i in 0..nx {
                let v = (k * ny + j) * nx + i;
                let pos = [i, j, k];
                // g[(c, a)] = ∂u_c / ∂(voxel index a)
                let mut g = Matrix3::zeros();
                for a in 0..3 {
                    let (na, st, p) = (extents[a], strides[a], pos[a]);
                    if na == 1 {
                        continue;
                    }
                    let (lo, hi, h) = if p == 0 {
                        (v, v + st, 1.0)
                    } else if p == na - 1 {
                        (v - st, v, 1.0)
                    } else {
                        (v - st, v + st, 2.0)
                    };
                    for c in 0..3 {
                        g[(c, a)] = (f64::from(u[c * n + hi]) - f64::from(u[c * n + lo])) / h;
                    }
                }
                slice[j * nx + i] = (Matrix3::identity() + g * inv).determinant() as f32;
            }
        }
    });
    Volume { grid: grid.clone(), channels: 1, data: det }
}

/// Summary of a Jacobian determinant map.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct JacobianStats {
    /// Standard deviation (population) of `ln det` over voxels with `det > 0`, dets clipped to
    /// at least [`LOG_J_FLOOR`] as Learn2Reg does. Unlike Learn2Reg, non-positive dets are left
    /// out rather than clipped to the floor (they would dominate the spread); they are counted
    /// in `fraction_nonpositive` instead. NaN if no voxel has `det > 0`.
    pub sd_log_j: f64,
    /// Fraction of voxels with `det ≤ 0` (folding).
    pub fraction_nonpositive: f64,
    pub min: f64,
    pub max: f64,
}

/// Statistics of a determinant map (from [`jacobian_determinant`]) over the voxels where `mask`
/// is true (all voxels without a mask). Errors if the mask selects nothing.
pub fn jacobian_stats(det: &Volume, mask: Option<&[bool]>) -> Result<JacobianStats> {
    check_mask(mask, det.data.len())?;
    let sel = |blk: usize, t: usize| mask.is_none_or(|m| m[blk * BLOCK + t]);
    // Per block: count, non-positive count, positive count, Σ log j, min, max.
    let parts: Vec<(u64, u64, u64, f64, f64, f64)> = det
        .data
        .par_chunks(BLOCK)
        .enumerate()
        .map(|(blk, c)| {
            let mut acc = (0u64, 0u64, 0u64, 0f64, f64::INFINITY, f64::NEG_INFINITY);
            for (t, &d) in c.iter().enumerate() {
                if !sel(blk, t) {
                    continue;
                }
                let d = f64::from(d);
                acc.0 += 1;
                if d > 0.0 {
                    acc.2 += 1;
                    acc.3 += d.max(LOG_J_FLOOR).ln();
                } else {
                    acc.1 += 1;
                }
                acc.4 = acc.4.min(d);
                acc.5 = acc.5.max(d);
            }
            acc
        })
        .collect();
    let count: u64 = parts.iter().map(|p| p.0).sum();
    if count == 0 {
        return Err(Error::Data("Jacobian statistics over an empty mask".into()));
    }
    let nonpos: u64 = parts.iter().map(|p| p.1).sum();
    let npos: u64 = parts.iter().map(|p| p.2).sum();
    let mean_log = parts.iter().map(|p| p.3).sum::<f64>() / npos as f64;
    // Second pass for the variance: numerically safer than Σx² − n·mean².
    let ss: f64 = det
        .data
        .par_chunks(BLOCK)
        .enumerate()
        .map(|(blk, c)| {
            c.iter()
                .enumerate()
                .filter(|&(t, &d)| sel(blk, t) && d > 0.0)
                .map(|(_, &d)| (f64::from(d).max(LOG_J_FLOOR).ln() - mean_log).powi(2))
                .sum::<f64>()
        })
        .collect::<Vec<_>>()
        .iter()
        .sum();
    Ok(JacobianStats {
        sd_log_j: if npos > 0 { (ss / npos as f64).sqrt() } else { f64::NAN },
        fraction_nonpositive: nonpos as f64 / count as f64,
        min: parts.iter().map(|p| p.4).fold(f64::INFINITY, f64::min),
        max: parts.iter().map(|p| p.5).fold(f64::NEG_INFINITY, f64::max),
    })
}

/// [`jacobian_determinant`] and its [`jacobian_stats`].
pub fn jacobian(field: &DisplacementField, mask: Option<&[bool]>) -> Result<(Volume, JacobianStats)> {
    let det = jacobian_determinant(field);
    let stats = jacobian_stats(&det, mask)?;
    Ok((det, stats))
}

// ---------------------------------------------------------------------------------------------
// Endpoint error

/// Endpoint error statistics in mm.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EndpointError {
    pub mean_mm: f64,
    /// 95th percentile (linear interpolation).
    pub p95_mm: f64,
    pub max_mm: f64,
}

/// `|u_a(x) − u_b(x)|` (mm) over the voxels where `mask` is true (all without a mask). The fields
/// must be on the same grid; errors if the mask selects nothing.
pub fn endpoint_error(a: &DisplacementField, b: &DisplacementField, mask: Option<&[bool]>) -> Result<EndpointError> {
    same_grid(&a.grid, &b.grid, "displacement fields")?;
    let n = a.grid.num_voxels();
    check_mask(mask, n)?;
    let mut e: Vec<f64> = (0..n)
        .into_par_iter()
        .filter(|&v| mask.is_none_or(|m| m[v]))
        .map(|v| {
            let (p, q) = (a.at(v), b.at(v));
            Vector3::from_fn(|c, _| f64::from(p[c]) - f64::from(q[c])).norm()
        })
        .collect();
    if e.is_empty() {
        return Err(Error::Data("endpoint error over an empty mask".into()));
    }
    // Block sums in a fixed order: thread-count independent.
    let sum: f64 = e.par_chunks(BLOCK).map(|c| c.iter().sum::<f64>()).collect::<Vec<_>>().iter().sum();
    let mean_mm = sum / e.len() as f64;
    let max_mm = e.iter().copied().fold(0.0, f64::max);
    let p95_mm = percentile(&mut e, 95.0);
    Ok(EndpointError { mean_mm, p95_mm, max_mm })
}

// ---------------------------------------------------------------------------------------------
// Report

/// Metrics of one label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelMetrics {
    pub label: u32,
    pub name: Option<String>,
    pub dice: f64,
    /// `None` if the label is missing from one of the maps.
    pub hd95_mm: Option<f64>,
}

/// Everything we report about one registration; serialises to JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrationMetrics {
    pub labels: Vec<LabelMetrics>,
    /// Mean Dice over `labels`; `None` without labels.
    pub mean_dice: Option<f64>,
    /// See [`JacobianStats::sd_log_j`]; `None` if no voxel has a positive determinant.
    pub sd_log_j: Option<f64>,
    /// Fraction of voxels with a non-positive Jacobian determinant.
    pub folding_fraction: f64,
    pub jacobian_min: f64,
    pub jacobian_max: f64,
    /// Against a reference field, when one is known (synthetic tests).
    pub endpoint_error: Option<EndpointError>,
}

impl RegistrationMetrics {
    /// Compares the fixed labels with the warped moving labels (same grid) and summarises the
    /// field's Jacobian (on the field's grid). `names` maps label ids to names where known.
    ///
    /// With a `mask` (on the label grid, e.g. where the moving image covers the fixed one) Dice
    /// is the masked Dice and HD95 is computed on both label maps with voxels outside the mask set
    /// to background, so that a truncated field of view cuts both surfaces alike; the Jacobian
    /// statistics use the mask too when the field shares the label grid.
    pub fn evaluate(
        fixed: &Labels,
        warped: &Labels,
        field: &DisplacementField,
        names: &BTreeMap<u32, String>,
        mask: Option<&[bool]>,
    ) -> Result<Self> {
        let dice = dice_impl(fixed, warped, mask)?;
        let restrict = |l: &Labels| match mask {
            Some(m) => Labels {
                grid: l.grid.clone(),
                data: l.data.iter().zip(m).map(|(&v, &keep)| if keep { v } else { 0 }).collect(),
            },
            None => l.clone(),
        };
        let (f, w) = (restrict(fixed), restrict(warped));
        let labels = dice
            .iter()
            .map(|&(label, dice)| {
                Ok(LabelMetrics { label, name: names.get(&label).cloned(), dice, hd95_mm: hd95_mm(&f, &w, label)? })
            })
            .collect::<Result<Vec<_>>>()?;
        let mean_dice = (!labels.is_empty()).then(|| labels.iter().map(|l| l.dice).sum::<f64>() / labels.len() as f64);
        let field_mask = mask.filter(|_| field.grid.same_as(&fixed.grid, GRID_TOL_MM));
        let (_, j) = jacobian(field, field_mask)?;
        Ok(Self {
            labels,
            mean_dice,
            sd_log_j: j.sd_log_j.is_finite().then_some(j.sd_log_j),
            folding_fraction: j.fraction_nonpositive,
            jacobian_min: j.min,
            jacobian_max: j.max,
            endpoint_error: None,
        })
    }

    /// Adds the endpoint error against a reference field.
    pub fn with_endpoint_error(mut self, epe: EndpointError) -> Self {
        self.endpoint_error = Some(epe);
        self
    }
}

#[cfg(test)]
mod tests;
