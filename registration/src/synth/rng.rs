//! Small seeded randomness: a SplitMix64 stream for drawing parameters, and stateless hashes
//! for per-voxel noise and value noise. Stateless hashing keeps rendered data independent of how
//! rayon splits the work, so results depend on the seed only, never on the thread count.

/// SplitMix64 finaliser: a good 64-bit mixing function (Steele, Lea & Flood 2014).
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derives an independent seed from a parent seed and a stream tag.
#[inline]
pub fn derive(seed: u64, tag: u64) -> u64 {
    mix64(seed ^ mix64(tag.wrapping_add(0x9E37_79B9_7F4A_7C15)))
}

/// Uniform in `[0, 1)` from the top 53 bits of a hash.
#[inline]
pub fn unit(h: u64) -> f64 {
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Two independent standard normal deviates for voxel `index` of stream `seed` (Box–Muller).
#[inline]
pub fn normal_pair(seed: u64, index: u64) -> (f64, f64) {
    let h1 = mix64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let h2 = mix64(h1 ^ 0xD1B5_4A32_D192_ED03);
    // 1 - unit is in (0, 1], so the logarithm is finite
    let r = (-2.0 * (1.0 - unit(h1)).ln()).sqrt();
    let t = std::f64::consts::TAU * unit(h2);
    (r * t.cos(), r * t.sin())
}

/// A sequential SplitMix64 generator for drawing phantom and deformation parameters.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * unit(self.next_u64())
    }

    /// Uniform in `[-a, a)`: a symmetric jitter.
    pub fn jitter(&mut self, a: f64) -> f64 {
        self.uniform(-a, a)
    }

    /// A uniformly distributed unit vector.
    pub fn unit_vector(&mut self) -> [f64; 3] {
        let z = self.uniform(-1.0, 1.0);
        let t = self.uniform(0.0, std::f64::consts::TAU);
        let r = (1.0 - z * z).max(0.0).sqrt();
        [r * t.cos(), r * t.sin(), z]
    }
}

/// Smooth 3D value noise in `[-1, 1]`: random values on an integer lattice, blended with a
/// C1 smoothstep. Deterministic in `(seed, p)`; used for texture and bowel loops.
pub fn value_noise(seed: u64, p: [f64; 3]) -> f64 {
    let f = [p[0].floor(), p[1].floor(), p[2].floor()];
    let t = [p[0] - f[0], p[1] - f[1], p[2] - f[2]].map(|t| t * t * (3.0 - 2.0 * t));
    let base = [f[0] as i64, f[1] as i64, f[2] as i64];
    let lattice = |dx: i64, dy: i64, dz: i64| -> f64 {
        let h = mix64(
            seed ^ ((base[0] + dx) as u64).wrapping_mul(0x8CB9_2BA7_2F3D_8DD7)
                ^ ((base[1] + dy) as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
                ^ ((base[2] + dz) as u64).wrapping_mul(0xA076_1D64_78BD_642F),
        );
        2.0 * unit(h) - 1.0
    };
    let lerp = |a: f64, b: f64, t: f64| a + (b - a) * t;
    let mut acc = [0.0; 4];
    for (n, a) in acc.iter_mut().enumerate() {
        let (dy, dz) = ((n & 1) as i64, (n >> 1) as i64);
        *a = lerp(lattice(0, dy, dz), lattice(1, dy, dz), t[0]);
    }
    lerp(lerp(acc[0], acc[1], t[1]), lerp(acc[2], acc[3], t[1]), t[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synth_rng_is_seeded_and_roughly_uniform() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        let mut c = SplitMix64::new(8);
        let xs: Vec<f64> = (0..10_000).map(|_| a.uniform(0.0, 1.0)).collect();
        assert!(xs.iter().all(|&x| x == b.uniform(0.0, 1.0)));
        assert!(xs.iter().any(|&x| x != c.uniform(0.0, 1.0)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        let ns: Vec<f64> = (0..10_000u64).map(|i| normal_pair(3, i).0).collect();
        let m = ns.iter().sum::<f64>() / ns.len() as f64;
        let v = ns.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / ns.len() as f64;
        assert!(m.abs() < 0.05 && (v - 1.0).abs() < 0.05, "{m} {v}");
    }

    #[test]
    fn synth_value_noise_is_bounded_and_continuous() {
        let mut prev = value_noise(1, [0.0, 0.3, -2.7]);
        for i in 1..2000 {
            let x = i as f64 * 0.003;
            let v = value_noise(1, [x, 0.3 + x, -2.7 - 0.5 * x]);
            assert!((-1.0..=1.0).contains(&v));
            assert!((v - prev).abs() < 0.02, "jump at {x}");
            prev = v;
        }
    }
}
