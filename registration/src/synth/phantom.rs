//! The analytic abdominal phantom: implicit shapes in RAS millimetres, evaluated at continuous
//! points.
//!
//! Axes follow RAS: `+x` towards the patient's **right**, `+y` anterior, `+z` superior; the
//! body's long axis is `z` and its centre sits at the origin. So the liver has `x > 0`, the
//! spleen `x < 0` and `y < 0`. Every organ is a signed distance function (SDF, negative inside)
//! built from ellipsoids and variable-radius capsules, evaluated in a per-organ frame that is
//! jittered per subject (position, size, pose) and bent by a smooth sinusoidal domain warp.
//! Where shapes overlap, a fixed anatomical priority decides (see [`Phantom::classify`]).

use std::f64::consts::TAU;

use super::rng::{derive, value_noise, SplitMix64};
use super::Modality;

type V3 = [f64; 3];

#[inline]
fn sub(a: V3, b: V3) -> V3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}
#[inline]
fn dot(a: V3, b: V3) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}
#[inline]
fn norm(a: V3) -> f64 {
    dot(a, a).sqrt()
}

/// Cheap ellipsoid SDF (Quilez): exact on the surface, a fair distance estimate near it.
#[inline]
fn ellipsoid(q: V3, r: V3) -> f64 {
    let k0 = norm([q[0] / r[0], q[1] / r[1], q[2] / r[2]]);
    let k1 = norm([q[0] / (r[0] * r[0]), q[1] / (r[1] * r[1]), q[2] / (r[2] * r[2])]);
    if k1 < 1e-12 {
        -r[0].min(r[1]).min(r[2])
    } else {
        k0 * (k0 - 1.0) / k1
    }
}

/// Distance estimate to a chain of capsules whose radius varies linearly along each segment.
fn tube(p: V3, pts: &[(V3, f64)]) -> f64 {
    let mut best = f64::INFINITY;
    for w in pts.windows(2) {
        let ((a, ra), (b, rb)) = (w[0], w[1]);
        let ab = sub(b, a);
        let t = (dot(sub(p, a), ab) / dot(ab, ab).max(1e-12)).clamp(0.0, 1.0);
        let c = [a[0] + t * ab[0], a[1] + t * ab[1], a[2] + t * ab[2]];
        best = best.min(norm(sub(p, c)) - (ra + t * (rb - ra)));
    }
    best
}

/// Polynomial smooth minimum: a union that blends over `k` mm instead of leaving a crease.
#[inline]
fn smin(a: f64, b: f64, k: f64) -> f64 {
    let h = (k - (a - b).abs()).max(0.0) / k;
    a.min(b) - h * h * k * 0.25
}

/// Rotation `Rz(az) · Ry(ay) · Rx(ax)`, returned transposed (rows are the local axes), so that
/// `local = R^T (p − c)`.
fn rotation_t(az: f64, ay: f64, ax: f64) -> [V3; 3] {
    let (cz, sz, cy, sy, cx, sx) = (az.cos(), az.sin(), ay.cos(), ay.sin(), ax.cos(), ax.sin());
    let r = [
        [cz * cy, cz * sy * sx - sz * cx, cz * sy * cx + sz * sx],
        [sz * cy, sz * sy * sx + cz * cx, sz * sy * cx - cz * sx],
        [-sy, cy * sx, cy * cx],
    ];
    [[r[0][0], r[1][0], r[2][0]], [r[0][1], r[1][1], r[2][1]], [r[0][2], r[1][2], r[2][2]]]
}

/// A smooth random domain warp `q + Σ a_j sin(k_j · q + φ_j)`. Each term's slope `|a||k|` is
/// kept ≤ 0.3 so that the warped shapes stay simple (no self-overlap).
#[derive(Debug, Clone, PartialEq)]
struct Warp {
    terms: Vec<(V3, f64, V3)>,
}

impl Warp {
    fn random(rng: &mut SplitMix64, scale_mm: f64) -> Self {
        let terms = (0..3)
            .map(|_| {
                let wavelength = scale_mm * rng.uniform(1.3, 2.6);
                let k = rng.unit_vector().map(|v| v * TAU / wavelength);
                let amp = 0.3 * wavelength / TAU * rng.uniform(0.3, 1.0);
                (k, rng.uniform(0.0, TAU), rng.unit_vector().map(|v| v * amp))
            })
            .collect();
        Self { terms }
    }

    #[inline]
    fn apply(&self, q: V3) -> V3 {
        let mut out = q;
        for (k, ph, a) in &self.terms {
            let s = (dot(*k, q) + ph).sin();
            out = [out[0] + a[0] * s, out[1] + a[1] * s, out[2] + a[2] * s];
        }
        out
    }
}

/// A jittered organ frame: centre, pose, optional left-right mirror, warp and a bounding radius
/// used to skip the organ far from it.
#[derive(Debug, Clone, PartialEq)]
struct Frame {
    centre: V3,
    rot_t: [V3; 3],
    mirror: bool,
    warp: Warp,
    bound: f64,
}

impl Frame {
    /// `None` when `p` is beyond the bounding sphere (then the organ cannot contain it).
    #[inline]
    fn local(&self, p: V3) -> Option<V3> {
        let mut d = sub(p, self.centre);
        if dot(d, d) > self.bound * self.bound {
            return None;
        }
        if self.mirror {
            d[0] = -d[0];
        }
        let q = [dot(self.rot_t[0], d), dot(self.rot_t[1], d), dot(self.rot_t[2], d)];
        Some(self.warp.apply(q))
    }
}

/// Tissue classes; their intensities depend on the modality (see [`tissue_value`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tissue {
    Air,
    Lung,
    Fat,
    Muscle,
    CorticalBone,
    Marrow,
    Disc,
    Csf,
    Liver,
    Spleen,
    KidneyCortex,
    KidneyMedulla,
    StomachWall,
    StomachFluid,
    StomachGas,
    Pancreas,
    ArterialBlood,
    VenousBlood,
    Bile,
    Bowel,
}

/// `(base, texture amplitude)` of a tissue: CT in Hounsfield units, MR as T1-weighted relative
/// intensities on `0..1000`.
pub fn tissue_value(t: Tissue, m: Modality) -> (f64, f64) {
    use Tissue::*;
    match m {
        Modality::Ct => match t {
            Air | StomachGas => (-1000.0, 0.0),
            Lung => (-850.0, 40.0),
            Fat => (-100.0, 12.0),
            Muscle => (50.0, 8.0),
            CorticalBone => (700.0, 60.0),
            Marrow => (400.0, 60.0),
            Disc => (80.0, 8.0),
            Csf => (15.0, 3.0),
            Liver => (60.0, 7.0),
            Spleen => (50.0, 5.0),
            KidneyCortex => (42.0, 4.0),
            KidneyMedulla => (28.0, 4.0),
            StomachWall => (45.0, 5.0),
            StomachFluid => (10.0, 4.0),
            Pancreas => (40.0, 8.0),
            ArterialBlood => (150.0, 6.0),
            VenousBlood => (100.0, 6.0),
            Bile => (8.0, 3.0),
            Bowel => (30.0, 15.0),
        },
        Modality::Mr => match t {
            Air | StomachGas => (0.0, 0.0),
            Lung => (30.0, 10.0),
            Fat => (900.0, 40.0),
            Muscle => (350.0, 25.0),
            CorticalBone => (60.0, 10.0),
            Marrow => (600.0, 50.0),
            Disc => (300.0, 20.0),
            Csf => (150.0, 10.0),
            Liver => (500.0, 25.0),
            Spleen => (380.0, 20.0),
            KidneyCortex => (450.0, 15.0),
            KidneyMedulla => (300.0, 15.0),
            StomachWall => (400.0, 20.0),
            StomachFluid => (150.0, 10.0),
            Pancreas => (550.0, 25.0),
            ArterialBlood => (100.0, 10.0),
            VenousBlood => (120.0, 10.0),
            Bile => (200.0, 10.0),
            Bowel => (320.0, 40.0),
        },
    }
}

/// What a point is: tissue, label, and a distance estimate (mm) to the nearest boundary
/// considered while classifying it, which tells the renderer where supersampling is needed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub tissue: Tissue,
    pub label: u32,
    pub edge: f64,
}

#[derive(Debug, Clone, PartialEq)]
struct Body {
    a: f64,
    b_ant: f64,
    b_post: f64,
    exponent: f64,
    harmonics: Vec<(f64, f64)>,
    z_wave: (f64, f64, f64),
    fat: f64,
    fat_ant: f64,
    muscle: f64,
}

#[derive(Debug, Clone, PartialEq)]
struct Spine {
    x0: f64,
    y0: f64,
    drift: (f64, f64, f64, f64),
    period: f64,
    phase: f64,
    disc: f64,
    body_r: [f64; 2],
    canal_r: f64,
}

/// A seeded analytic abdominal phantom. See the module documentation for the axes.
#[derive(Debug, Clone, PartialEq)]
pub struct Phantom {
    pub modality: Modality,
    /// Standard deviation of the acquisition noise added per voxel by the renderer (intensity
    /// units); `0` disables it.
    pub noise_sigma: f32,
    /// Sub-samples per axis the renderer averages in voxels that straddle a boundary.
    pub supersample: usize,
    seed: u64,
    texture_seed: u64,
    bowel_seed: u64,
    body: Body,
    spine: Spine,
    dome: [(f64, f64, f64); 2],
    rib_z0: f64,
    aorta: (f64, f64, f64),
    ivc: (f64, f64, [f64; 2]),
    liver: Frame,
    liver_left: (V3, V3),
    liver_right: V3,
    spleen: (Frame, V3),
    kidneys: [(Frame, V3); 2],
    stomach: (Frame, Vec<(V3, f64)>, f64),
    pancreas: (Frame, Vec<(V3, f64)>),
    gallbladder: (Frame, Vec<(V3, f64)>),
    heart: (V3, V3),
}

/// Label ids of the phantom's structures, `LABEL_NAMES[id]` (0 = background).
pub const LABEL_NAMES: [&str; 10] = [
    "background",
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "stomach",
    "pancreas",
    "aorta",
    "gallbladder",
    "spine",
];

pub const LIVER: u32 = 1;
pub const SPLEEN: u32 = 2;
pub const KIDNEY_RIGHT: u32 = 3;
pub const KIDNEY_LEFT: u32 = 4;
pub const STOMACH: u32 = 5;
pub const PANCREAS: u32 = 6;
pub const AORTA: u32 = 7;
pub const GALLBLADDER: u32 = 8;
pub const SPINE: u32 = 9;

impl Phantom {
    /// A random subject. Sizes scale with one body factor (±8 %) and every organ is jittered
    /// independently (≈ ±6 mm, ±12 % per axis, ±8° pose) on top of textbook positions.
    pub fn new(seed: u64, modality: Modality) -> Self {
        let mut r = SplitMix64::new(derive(seed, 1));
        let s = r.uniform(0.92, 1.08);
        let body = Body {
            a: s * r.uniform(132.0, 148.0),
            b_ant: s * r.uniform(92.0, 108.0),
            b_post: s * r.uniform(96.0, 106.0),
            exponent: r.uniform(2.2, 2.8),
            harmonics: (2..5).map(|_| (r.uniform(0.0, 0.025), r.uniform(0.0, TAU))).collect(),
            z_wave: (r.uniform(0.0, 0.04), r.uniform(250.0, 400.0), r.uniform(0.0, TAU)),
            fat: r.uniform(10.0, 22.0),
            fat_ant: r.uniform(0.0, 15.0),
            muscle: r.uniform(9.0, 14.0),
        };
        let spine = Spine {
            x0: r.jitter(3.0),
            y0: -body.b_post + s * r.uniform(68.0, 74.0),
            drift: (r.jitter(4.0), r.jitter(6.0), r.uniform(300.0, 500.0), r.uniform(0.0, TAU)),
            period: s * r.uniform(30.0, 36.0),
            phase: r.uniform(0.0, 1.0),
            disc: r.uniform(0.2, 0.28),
            body_r: [s * r.uniform(20.0, 24.0), s * r.uniform(15.0, 18.0)],
            canal_r: r.uniform(8.0, 10.0),
        };
        let dome_top = s * r.uniform(95.0, 115.0);
        let dome = [
            (s * 58.0 + r.jitter(8.0), dome_top + r.uniform(5.0, 15.0), r.uniform(90.0, 120.0)),
            (-s * 58.0 + r.jitter(8.0), dome_top, r.uniform(90.0, 120.0)),
        ];
        let rib_z0 = s * r.uniform(-25.0, 5.0);
        let (sx, sy) = (spine.x0, spine.y0);
        let aorta = (sx - s * 14.0 + r.jitter(3.0), sy + spine.body_r[1] + 13.0 + r.jitter(2.0), r.uniform(9.5, 12.5));
        let ivc =
            (sx + s * 24.0 + r.jitter(3.0), sy + spine.body_r[1] + 9.0, [r.uniform(10.0, 14.0), r.uniform(7.0, 10.0)]);

        let frame = |r: &mut SplitMix64, c: V3, rot: V3, mirror: bool, mean_r: f64, bound: f64| {
            let centre = [0, 1, 2].map(|a| s * c[a] + r.jitter(6.0));
            let rt = rotation_t(rot[0] + r.jitter(0.14), rot[1] + r.jitter(0.14), rot[2] + r.jitter(0.14));
            let warp = Warp::random(r, mean_r * s);
            // the warp displaces by at most Σ|a| ≤ 0.9 · 2.6 · mean_r / τ < 0.4 · mean_r
            Frame { centre, rot_t: rt, mirror, warp, bound: s * (bound * 1.12 + 0.4 * mean_r) + 10.0 }
        };
        let size = |r: &mut SplitMix64, v: V3| v.map(|x| s * x * r.uniform(0.88, 1.12));

        let liver = frame(&mut r, [46.0, 8.0, 46.0], [0.0; 3], false, 60.0, 140.0);
        let liver_right = size(&mut r, [62.0, 78.0, 70.0]);
        let liver_left = (
            [s * -66.0 + r.jitter(6.0), s * 28.0 + r.jitter(5.0), s * 16.0 + r.jitter(5.0)],
            size(&mut r, [48.0, 32.0, 28.0]),
        );
        let spleen = (
            frame(&mut r, [-82.0, -30.0, 52.0], [-0.7, 0.0, 0.15], true, 35.0, 62.0),
            size(&mut r, [20.0, 44.0, 55.0]),
        );
        let kidney = |r: &mut SplitMix64, side: f64, z: f64, mirror: bool| {
            let f = frame(r, [58.0 * side, sy / s + 8.0, z], [-0.5, -0.2, 0.0], mirror, 30.0, 58.0);
            (f, size(r, [30.0, 21.0, 55.0]))
        };
        let kidneys = [kidney(&mut r, 1.0, -32.0, false), kidney(&mut r, -1.0, -18.0, true)];
        // tube organs get their frame at the centroid of the centre line, so that the bounding
        // sphere is tight and the pose jitter turns them about their middle
        let tube_organ = |r: &mut SplitMix64, pts: &[(V3, f64)], mean_r: f64| -> (Frame, Vec<(V3, f64)>) {
            let n = pts.len() as f64;
            let c = [0, 1, 2].map(|a| pts.iter().map(|(p, _)| p[a]).sum::<f64>() / n);
            let bound = pts.iter().map(|(p, rad)| norm(sub(*p, c)) + rad).fold(0.0, f64::max);
            let f = frame(r, c, [0.0; 3], false, mean_r, bound);
            let rel =
                pts.iter().map(|&(p, rad)| (sub(p, c).map(|v| s * v + r.jitter(3.0)), s * rad * r.uniform(0.88, 1.12)));
            (f, rel.collect())
        };
        let (stomach_f, stomach_pts) = tube_organ(
            &mut r,
            &[
                ([-50.0, -8.0, 92.0], 32.0),
                ([-64.0, 12.0, 52.0], 32.0),
                ([-44.0, 40.0, 16.0], 26.0),
                ([-8.0, 52.0, 2.0], 19.0),
                ([22.0, 38.0, 2.0], 13.0),
            ],
            40.0,
        );
        // the gas-fluid level, relative to the centroid (y ≈ 27 mm): gas lies anteriorly
        let stomach = (stomach_f, stomach_pts, s * r.uniform(-5.0, 11.0));
        let (pancreas_f, pancreas_pts) = tube_organ(
            &mut r,
            &[
                ([24.0, 14.0, -12.0], 16.0),
                ([6.0, 28.0, -2.0], 12.0),
                ([-24.0, 22.0, 4.0], 11.0),
                ([-58.0, 6.0, 12.0], 9.0),
                ([-72.0, -6.0, 18.0], 7.5),
            ],
            25.0,
        );
        let (gb_f, gb_pts) = tube_organ(&mut r, &[([42.0, 52.0, -18.0], 14.0), ([30.0, 32.0, 10.0], 9.0)], 15.0);
        let heart = (
            [s * -20.0 + r.jitter(6.0), s * 30.0 + r.jitter(6.0), dome_top + s * 55.0],
            size(&mut r, [62.0, 45.0, 55.0]),
        );
        Self {
            modality,
            noise_sigma: match modality {
                Modality::Ct => 10.0,
                Modality::Mr => 12.0,
            },
            supersample: 2,
            seed,
            texture_seed: derive(seed, 2),
            bowel_seed: derive(seed, 3),
            body,
            spine,
            dome,
            rib_z0,
            aorta,
            ivc,
            liver,
            liver_left,
            liver_right,
            spleen,
            kidneys,
            stomach,
            pancreas: (pancreas_f, pancreas_pts),
            gallbladder: (gb_f, gb_pts),
            heart,
        }
    }

    /// The seed the phantom was generated from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Noise-free intensity at a RAS point (mm), texture included.
    pub fn intensity_at(&self, p: [f64; 3]) -> f32 {
        self.value(self.classify(p).tissue, self.texture(p)) as f32
    }

    /// Label id at a RAS point (mm); see [`LABEL_NAMES`].
    pub fn label_at(&self, p: [f64; 3]) -> u32 {
        self.classify(p).label
    }

    /// Intensity of `tissue` under the texture value `tex ∈ [−1, 1]`.
    #[inline]
    pub fn value(&self, tissue: Tissue, tex: f64) -> f64 {
        let (base, amp) = tissue_value(tissue, self.modality);
        base + amp * tex
    }

    /// Smooth texture in `[−1, 1]` tied to anatomical position, so it moves with deformations.
    #[inline]
    pub fn texture(&self, p: V3) -> f64 {
        0.7 * value_noise(self.texture_seed, p.map(|v| v / 14.0))
            + 0.3 * value_noise(self.texture_seed ^ 1, p.map(|v| v / 5.0))
    }

    /// Radius of the body outline (before the layers) at height `z` in direction `(c, s)`.
    fn body_radius(&self, c: f64, s: f64, z: f64) -> f64 {
        let b = &self.body;
        let by = if s >= 0.0 { b.b_ant } else { b.b_post };
        let n = b.exponent;
        let base = ((c / b.a).abs().powf(n) + (s / by).abs().powf(n)).powf(-1.0 / n);
        // cos(mθ + φ) through complex powers of (c + is), avoiding atan2
        let (mut cm, mut sm) = (c, s);
        let mut modulation = 1.0 + b.z_wave.0 * (TAU * z / b.z_wave.1 + b.z_wave.2).sin();
        for (amp, ph) in &b.harmonics {
            (cm, sm) = (cm * c - sm * s, sm * c + cm * s);
            modulation += amp * (cm * ph.cos() - sm * ph.sin());
        }
        base * modulation
    }

    /// Classifies a RAS point. Priority: outside → spine → paraspinal muscles → body wall
    /// (fat, muscle, ribs) → thorax above the diaphragm → aorta → kidneys → psoas → gallbladder →
    /// pancreas → spleen → liver → IVC → stomach → bowel and mesenteric fat.
    pub fn classify(&self, p: V3) -> Hit {
        let mut edge = f64::INFINITY;
        let hit = |tissue: Tissue, label: u32, edge: f64| Hit { tissue, label, edge };
        let [x, y, z] = p;

        // body outline and layers, in polar form about the body axis
        let rho = (x * x + y * y).sqrt().max(1e-9);
        let (c, s) = (x / rho, y / rho);
        let r_out = self.body_radius(c, s, z);
        let d_out = rho - r_out;
        edge = edge.min(d_out.abs());
        if d_out > 0.0 {
            return hit(Tissue::Air, 0, edge);
        }

        // spine: vertebral bodies and discs stacked along z, canal and posterior arch behind
        let sp = &self.spine;
        let (a1, a2, lam, ph) = sp.drift;
        let w = TAU * z / lam + ph;
        let (cx, cy) = (sp.x0 + a1 * w.sin(), sp.y0 + a2 * (w + 1.0).sin());
        let (lx, ly) = (x - cx, y - cy);
        let phase = (z / sp.period + sp.phase).rem_euclid(1.0);
        let seg_edge = (phase.min(1.0 - phase)).min((phase - sp.disc).abs()) * sp.period;
        let in_disc = phase < sp.disc;
        let vb = ellipsoid([lx, ly, 0.0], [sp.body_r[0], sp.body_r[1], 1.0]);
        let canal_y = -sp.body_r[1] - sp.canal_r - 1.0;
        let dc = (lx * lx + (ly - canal_y) * (ly - canal_y)).sqrt();
        let d_canal = dc - sp.canal_r;
        let d_ring = (dc - sp.canal_r - 3.0).abs() - 3.5;
        let arch = d_ring;
        let spinous = tube([lx, ly, 0.0], &[([0.0, canal_y - 10.0, 0.0], 5.5), ([0.0, canal_y - 24.0, 0.0], 4.0)]);
        let transverse = tube(
            [lx.abs(), ly, 0.0],
            &[([8.0, canal_y + 2.0, 0.0], 5.0), ([sp.body_r[0] + 20.0, canal_y + 4.0, 0.0], 3.5)],
        );
        let posterior = arch.min(spinous).min(transverse);
        edge = edge.min(vb.abs()).min(d_canal.abs());
        if vb < 0.0 {
            edge = edge.min(seg_edge);
            let t = if in_disc {
                Tissue::Disc
            } else if vb > -2.5 {
                Tissue::CorticalBone
            } else {
                Tissue::Marrow
            };
            return hit(t, SPINE, edge.min((vb + 2.5).abs()));
        }
        if d_canal < 0.0 {
            return hit(Tissue::Csf, 0, edge);
        }
        edge = edge.min(posterior.abs());
        if posterior < 0.0 {
            edge = edge.min(seg_edge);
            if !in_disc {
                return hit(Tissue::CorticalBone, SPINE, edge);
            }
        }

        // paraspinal muscles either side of the spinous processes
        let ps = ellipsoid([lx.abs() - 30.0, ly - canal_y + 8.0, 0.0], [22.0, 19.0, 1.0]);
        edge = edge.min(ps.abs());
        if ps < 0.0 {
            return hit(Tissue::Muscle, 0, edge);
        }

        // subcutaneous fat (thicker anteriorly), then the muscle wall with ribs
        let fat = self.body.fat + self.body.fat_ant * s.max(0.0);
        let d_fat = d_out + fat;
        edge = edge.min(d_fat.abs());
        if d_fat > 0.0 {
            return hit(Tissue::Fat, 0, edge);
        }
        let d_cav = d_fat + self.body.muscle;
        edge = edge.min(d_cav.abs());
        if d_cav > 0.0 {
            let zr = z - 0.45 * y;
            if zr > self.rib_z0 && lx.abs() > 30.0 {
                let f = ((zr - self.rib_z0) / 26.0).rem_euclid(1.0);
                let e = (f.min(1.0 - f)).min((f - 0.38).abs()) * 26.0 / 1.1;
                edge = edge.min(e).min((zr - self.rib_z0).abs() / 1.1);
                if f < 0.38 {
                    return hit(Tissue::CorticalBone, 0, edge);
                }
            }
            return hit(Tissue::Muscle, 0, edge);
        }

        // aorta: a tube along z, continuing into the thorax
        let (ax, ay, ar) = self.aorta;
        let da = ((x - ax - (cx - sp.x0)).powi(2) + (y - ay - (cy - sp.y0)).powi(2)).sqrt() - ar;
        edge = edge.min(da.abs());
        if da < 0.0 {
            return hit(Tissue::ArterialBlood, AORTA, edge);
        }

        // thorax above the diaphragm domes: heart or lung
        let dome = |(x0, top, rc): (f64, f64, f64)| {
            let r2 = (x - x0).powi(2) + y * y;
            top - r2 / (2.0 * rc) - 0.25 * (-y).max(0.0)
        };
        let zd = dome(self.dome[0]).max(dome(self.dome[1]));
        let d_dia = (z - zd) / 1.5;
        edge = edge.min(d_dia.abs());
        if d_dia > 0.0 {
            let (hc, hr) = self.heart;
            let dh = ellipsoid(sub(p, hc), hr);
            edge = edge.min(dh.abs());
            return hit(if dh < 0.0 { Tissue::Muscle } else { Tissue::Lung }, 0, edge);
        }
        // organs below hug the diaphragm and the abdominal wall
        let clip = d_cav.max(d_dia * 1.5);

        for (side, (f, r)) in self.kidneys.iter().enumerate() {
            if let Some(q) = f.local(p) {
                // a medial notch (the hilum) turns the ellipsoid into a bean
                let notch = ellipsoid([q[0] + r[0] * 1.15, q[1], q[2]], [r[0] * 0.55, r[1] * 0.8, r[2] * 0.35]);
                let d = ellipsoid(q, *r).max(-notch).max(clip);
                edge = edge.min(d.abs());
                if d < 0.0 {
                    let label = if side == 0 { KIDNEY_RIGHT } else { KIDNEY_LEFT };
                    let sinus = ellipsoid([q[0] + r[0] * 0.45, q[1], q[2]], [r[0] * 0.4, r[1] * 0.45, r[2] * 0.6]);
                    let cortex = d + 6.0;
                    edge = edge.min(sinus.abs()).min(cortex.abs());
                    let t = if sinus < 0.0 {
                        Tissue::Fat
                    } else if cortex > 0.0 {
                        Tissue::KidneyCortex
                    } else {
                        Tissue::KidneyMedulla
                    };
                    return hit(t, label, edge);
                }
            }
        }

        // psoas muscles: thickening downwards beside the vertebral bodies
        let pr = (8.0 + 0.15 * (10.0 - z).max(0.0)).min(24.0);
        let dps = ((lx.abs() - sp.body_r[0] - pr + 2.0).powi(2) + (ly - 2.0).powi(2)).sqrt() - pr;
        edge = edge.min(dps.abs());
        if dps < 0.0 {
            return hit(Tissue::Muscle, 0, edge);
        }

        let (gf, gp) = &self.gallbladder;
        if let Some(q) = gf.local(p) {
            let d = tube(q, gp).max(clip);
            edge = edge.min(d.abs());
            if d < 0.0 {
                return hit(Tissue::Bile, GALLBLADDER, edge);
            }
        }
        let (pf, pp) = &self.pancreas;
        if let Some(q) = pf.local(p) {
            let d = tube(q, pp).max(clip);
            edge = edge.min(d.abs());
            if d < 0.0 {
                return hit(Tissue::Pancreas, PANCREAS, edge);
            }
        }
        let (sf, sr) = &self.spleen;
        if let Some(q) = sf.local(p) {
            let d = ellipsoid(q, *sr).max(clip);
            edge = edge.min(d.abs());
            if d < 0.0 {
                return hit(Tissue::Spleen, SPLEEN, edge);
            }
        }
        if let Some(q) = self.liver.local(p) {
            let right = ellipsoid(q, self.liver_right);
            let left = ellipsoid(sub(q, self.liver_left.0), self.liver_left.1);
            let d = smin(right, left, 25.0).max(clip);
            edge = edge.min(d.abs());
            if d < 0.0 {
                return hit(Tissue::Liver, LIVER, edge);
            }
        }
        let (ix, iy, ir) = self.ivc;
        let di = ellipsoid([x - ix - (cx - sp.x0), y - iy - (cy - sp.y0), 0.0], [ir[0], ir[1], 1.0]);
        edge = edge.min(di.abs());
        if di < 0.0 {
            return hit(Tissue::VenousBlood, 0, edge);
        }
        let (stf, stp, air_level) = &self.stomach;
        if let Some(q) = stf.local(p) {
            let d = tube(q, stp).max(clip);
            edge = edge.min(d.abs());
            if d < 0.0 {
                let wall = d + 4.0;
                let gas = q[1] - air_level;
                edge = edge.min(wall.abs());
                let t = if wall > 0.0 {
                    Tissue::StomachWall
                } else {
                    edge = edge.min(gas.abs());
                    if gas > 0.0 {
                        Tissue::StomachGas
                    } else {
                        Tissue::StomachFluid
                    }
                };
                return hit(t, STOMACH, edge);
            }
        }

        // everything else in the cavity: bowel loops in mesenteric fat, with a few gas pockets
        let n = value_noise(self.bowel_seed, p.map(|v| v / 22.0))
            + 0.5 * value_noise(self.bowel_seed ^ 7, p.map(|v| v / 9.0));
        // a typical |∇n| (the worst case is ≈ 0.26/mm): underestimating the distance only costs
        // supersampling, so a typical slope keeps most of the cavity on the fast path
        let slope = 0.1;
        if n > 0.05 {
            edge = edge.min((n - 0.05) / slope);
            if n > 0.95 {
                edge = edge.min((n - 0.95) / slope);
                return hit(Tissue::StomachGas, 0, edge);
            }
            edge = edge.min((0.95 - n) / slope);
            return hit(Tissue::Bowel, 0, edge);
        }
        edge = edge.min((0.05 - n) / slope);
        hit(Tissue::Fat, 0, edge)
    }
}
