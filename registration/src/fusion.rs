//! Multi-atlas label fusion: several atlas label maps, already warped onto the target grid, are
//! combined into one label map by a (weighted) vote per voxel.
//!
//! - **Majority vote**: every atlas has one vote per voxel.
//! - **Locally weighted vote** (Artaechevarria et al., IEEE TMI 2009; Sabuncu et al., IEEE TMI
//!   2010): atlas `i`'s vote at `x` is weighted by `w_i(x) = exp(−D_i(x) / h(x))`, where `D_i` is
//!   the local dissimilarity between the target and the warped atlas image ([`local_distance`]:
//!   the mean absolute feature difference, Gaussian-smoothed), and `h(x) = min_i D_i(x) + ε` the
//!   per-voxel bandwidth of non-local patch fusion (Coupé et al., NeuroImage 2011): the best-matching
//!   atlas always gets `e^−1`, the others less the worse they match, whatever the scale of the
//!   features. `ε` is 10⁻³ of the mean dissimilarity, so that perfectly matching regions do not
//!   divide by zero.
//!
//! Ties (equal summed weight) go to the smallest label id, so the result never depends on the
//! thread count or on hash order.

use rayon::prelude::*;
use segmentation::ops::axis::{AxisOperator, Boundary};

use crate::{Error, Labels, Result, Volume};

/// Grids this close (mm, affine entries) count as the same lattice.
const GRID_TOL_MM: f64 = 1e-4;

/// Fraction of the mean dissimilarity added to the per-voxel bandwidth.
const BANDWIDTH_EPS: f64 = 1e-3;

/// Voxels per parallel work item: fixed, so that sums do not depend on the thread count.
const BLOCK: usize = 1 << 14;

/// Per voxel, the label with the most votes (ties: the smallest label). All candidates must lie
/// on the same grid.
pub fn majority_vote(candidates: &[Labels]) -> Result<Labels> {
    vote(candidates, None)
}

/// The locally weighted vote described in the module documentation. `distances[i]` is the
/// one-channel dissimilarity map of atlas `i` ([`local_distance`]) on the candidates' grid.
pub fn weighted_vote(candidates: &[Labels], distances: &[Volume]) -> Result<Labels> {
    if distances.len() != candidates.len() {
        return Err(Error::Data(format!("{} label maps but {} dissimilarity maps", candidates.len(), distances.len())));
    }
    for (i, d) in distances.iter().enumerate() {
        if d.channels != 1 || !d.grid.same_as(&candidates[0].grid, GRID_TOL_MM) {
            return Err(Error::Geometry(format!(
                "dissimilarity map {i} must have one channel on the label maps' grid {:?}, got {} channel(s) on {:?}",
                candidates[0].grid.shape(),
                d.channels,
                d.grid.shape()
            )));
        }
        if d.data.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err(Error::Data(format!("dissimilarity map {i} holds negative, NaN or infinite values")));
        }
    }
    vote(candidates, Some(distances))
}

fn vote(candidates: &[Labels], distances: Option<&[Volume]>) -> Result<Labels> {
    let first = candidates.first().ok_or_else(|| Error::Data("label fusion needs at least one label map".into()))?;
    for (i, c) in candidates.iter().enumerate() {
        if !c.grid.same_as(&first.grid, GRID_TOL_MM) {
            return Err(Error::GridMismatch {
                what: format!("label maps 0 and {i}"),
                a: first.grid.shape(),
                b: c.grid.shape(),
            });
        }
    }
    let eps = match distances {
        Some(ds) => {
            let sums: Vec<f64> = ds
                .iter()
                .map(|d| d.data.par_chunks(BLOCK).map(|b| b.iter().map(|&v| f64::from(v)).sum::<f64>()).sum())
                .collect();
            let mean = sums.iter().sum::<f64>() / (ds.len() * first.data.len()).max(1) as f64;
            (BANDWIDTH_EPS * mean).max(f64::from(f32::MIN_POSITIVE))
        }
        None => 0.0,
    };
    let n = candidates.len();
    let mut out = vec![0u32; first.data.len()];
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, chunk)| {
        // (label, summed weight), few entries: a linear scan beats a map
        let mut tally: Vec<(u32, f64)> = Vec::with_capacity(n);
        let mut weights = vec![1.0f64; n];
        for (o, v) in chunk.iter_mut().enumerate() {
            let x = b * BLOCK + o;
            if let Some(ds) = distances {
                let h = ds.iter().map(|d| f64::from(d.data[x])).fold(f64::INFINITY, f64::min) + eps;
                for (w, d) in weights.iter_mut().zip(ds) {
                    *w = (-f64::from(d.data[x]) / h).exp();
                }
            }
            tally.clear();
            for (c, &w) in candidates.iter().zip(&weights) {
                let l = c.data[x];
                match tally.iter_mut().find(|t| t.0 == l) {
                    Some(t) => t.1 += w,
                    None => tally.push((l, w)),
                }
            }
            *v = tally.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0))).map(|t| t.0).unwrap_or(0);
        }
    });
    Labels::new(first.grid.clone(), out)
}

/// Local dissimilarity of two feature maps on the same grid: the mean absolute difference over
/// the channels at each voxel, smoothed by a Gaussian of standard deviation `sigma_mm` (per axis
/// in voxels of that axis's spacing; replicate padding; no smoothing along an axis one voxel
/// long or for `sigma_mm = 0`). One channel on the features' grid.
pub fn local_distance(a: &Volume, b: &Volume, sigma_mm: f64) -> Result<Volume> {
    if a.channels != b.channels {
        return Err(Error::ChannelMismatch { what: "compared features", fixed: a.channels, moving: b.channels });
    }
    if !a.grid.same_as(&b.grid, GRID_TOL_MM) {
        return Err(Error::GridMismatch { what: "compared feature maps".into(), a: a.grid.shape(), b: b.grid.shape() });
    }
    if !(sigma_mm.is_finite() && sigma_mm >= 0.0) {
        return Err(Error::Data(format!("smoothing sigma must be a finite number >= 0 mm, got {sigma_mm}")));
    }
    let n = a.grid.num_voxels();
    let c = a.channels.max(1);
    let mut d = vec![0.0f32; n];
    d.par_chunks_mut(BLOCK).enumerate().for_each(|(blk, out)| {
        for (o, v) in out.iter_mut().enumerate() {
            let x = blk * BLOCK + o;
            let s: f32 = (0..a.channels).map(|ch| (a.data[ch * n + x] - b.data[ch * n + x]).abs()).sum();
            *v = s / c as f32;
        }
    });
    let smoothed = gaussian_smooth(&d, a.grid.shape(), a.grid.spacing(), sigma_mm);
    Volume::new(a.grid.clone(), 1, smoothed)
}

/// Separable Gaussian smoothing of one channel (x fastest), truncated at 3 σ.
fn gaussian_smooth(data: &[f32], shape: [usize; 3], spacing: [f64; 3], sigma_mm: f64) -> Vec<f32> {
    let [nx, ny, nz] = shape;
    let mut x = data.to_vec();
    for axis in 0..3 {
        let len = shape[axis];
        let sigma = sigma_mm / spacing[axis];
        if len < 2 || sigma < 1e-3 {
            continue;
        }
        let r = (3.0 * sigma).ceil() as usize;
        let mut kernel: Vec<f64> =
            (0..=2 * r).map(|t| (-((t as f64 - r as f64) / sigma).powi(2) / 2.0).exp()).collect();
        let sum: f64 = kernel.iter().sum();
        kernel.iter_mut().for_each(|w| *w /= sum);
        let op = AxisOperator::filter(len, &kernel, 1, r, Boundary::Replicate);
        let (outer, inner) = match axis {
            0 => (ny * nz, 1),
            1 => (nz, nx),
            _ => (1, nx * ny),
        };
        x = op.apply(&x, outer, inner);
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Grid;

    fn grid(shape: [usize; 3]) -> Grid {
        Grid::from_spacing(shape, [2.0, 2.0, 3.0], [0.0; 3]).unwrap()
    }

    fn labels(g: &Grid, v: &[u32]) -> Labels {
        Labels::new(g.clone(), v.to_vec()).unwrap()
    }

    #[test]
    fn majority_vote_counts_and_breaks_ties_towards_the_smallest_label() {
        let g = grid([4, 1, 1]);
        let a = labels(&g, &[1, 2, 3, 0]);
        let b = labels(&g, &[1, 5, 4, 7]);
        let c = labels(&g, &[2, 5, 9, 7]);
        let m = majority_vote(&[a.clone(), b.clone(), c.clone()]).unwrap();
        assert_eq!(m.data, vec![1, 5, 3, 7]);
        // two atlases disagreeing everywhere: the smaller label wins, whatever the order
        assert_eq!(majority_vote(&[a.clone(), c.clone()]).unwrap().data, vec![1, 2, 3, 0]);
        assert_eq!(majority_vote(&[c, a.clone()]).unwrap().data, vec![1, 2, 3, 0]);
        assert_eq!(majority_vote(std::slice::from_ref(&a)).unwrap().data, a.data);
        assert!(matches!(majority_vote(&[]), Err(Error::Data(_))));
        let off = majority_vote(&[a, labels(&grid([2, 2, 1]), &[0; 4])]);
        assert!(matches!(off, Err(Error::GridMismatch { a: [4, 1, 1], b: [2, 2, 1], .. })), "{off:?}");
    }

    #[test]
    fn weighted_vote_follows_the_better_matching_atlas() {
        let g = grid([3, 1, 1]);
        let a = labels(&g, &[1, 1, 1]);
        let b = labels(&g, &[2, 2, 2]);
        let c = labels(&g, &[2, 2, 2]);
        let dist = |v: [f32; 3]| Volume::new(g.clone(), 1, v.to_vec()).unwrap();
        // voxel 0: atlas a matches far better than b and c (weights e^-1 vs 2·e^-10);
        // voxel 1: all match equally well, so the majority (2) wins;
        // voxel 2: a is slightly better, but not enough to outvote two atlases
        let d = [dist([0.1, 0.5, 1.0]), dist([1.0, 0.5, 1.2]), dist([1.0, 0.5, 1.2])];
        let w = weighted_vote(&[a.clone(), b.clone(), c.clone()], &d).unwrap();
        assert_eq!(w.data, vec![1, 2, 2]);
        // the vote only depends on ratios of dissimilarities
        let scaled: Vec<Volume> =
            d.iter().map(|v| Volume::new(g.clone(), 1, v.data.iter().map(|x| x * 1000.0).collect()).unwrap()).collect();
        assert_eq!(weighted_vote(&[a.clone(), b.clone(), c.clone()], &scaled).unwrap().data, w.data);
        // all-zero dissimilarity degrades to a plain majority vote
        let zero = vec![dist([0.0; 3]); 3];
        assert_eq!(weighted_vote(&[a.clone(), b.clone(), c.clone()], &zero).unwrap().data, vec![2, 2, 2]);
        assert!(weighted_vote(&[a.clone(), b.clone()], &d).is_err());
        assert!(weighted_vote(&[a, b], &[dist([0.0; 3]), dist([-1.0, 0.0, 0.0])]).is_err());
    }

    #[test]
    fn local_distance_is_the_smoothed_mean_absolute_difference() {
        let g = grid([9, 7, 5]);
        let n = g.num_voxels();
        let a = Volume::new(g.clone(), 2, (0..2 * n).map(|i| (i % 13) as f32).collect()).unwrap();
        let mut b = a.clone();
        b.data[..n].iter_mut().for_each(|v| *v += 3.0);
        b.data[n..].iter_mut().for_each(|v| *v -= 1.0);
        // a constant difference stays constant under any normalised smoothing
        for sigma in [0.0, 2.0, 7.0] {
            let d = local_distance(&a, &b, sigma).unwrap();
            assert_eq!(d.channels, 1);
            assert!(d.data.iter().all(|v| (v - 2.0).abs() < 1e-5), "sigma {sigma}");
        }
        // a single differing voxel spreads out to its neighbours
        let mut c = a.clone();
        let centre = (2 * 7 + 3) * 9 + 4;
        c.data[centre] += 8.0;
        let sharp = local_distance(&a, &c, 0.0).unwrap();
        assert_eq!(sharp.data[centre], 4.0);
        let smooth = local_distance(&a, &c, 2.0).unwrap();
        assert!(smooth.data[centre] < 4.0 && smooth.data[centre] > 0.1);
        assert!(smooth.data[centre + 1] > 0.0 && smooth.data[centre + 1] < smooth.data[centre]);
        let other = Volume::new(grid([9, 7, 4]), 2, vec![0.0; 2 * 9 * 7 * 4]).unwrap();
        assert!(matches!(local_distance(&a, &other, 1.0), Err(Error::GridMismatch { .. })));
        let one = Volume::new(g.clone(), 1, vec![0.0; n]).unwrap();
        assert!(matches!(local_distance(&a, &one, 1.0), Err(Error::ChannelMismatch { fixed: 2, moving: 1, .. })));
        assert!(local_distance(&a, &b, f64::NAN).is_err());
    }
}
