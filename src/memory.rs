//! Memory budgets: a job's peak memory is estimated from its grid sizes before any work starts,
//! and a job that would not fit `--max-memory` is refused with a hint instead of being killed by
//! the kernel halfway (or thrashing the machine).

use registration::Grid;

/// Fraction of the physical memory a job may use by default: the rest is for the system and
/// whatever else runs beside it.
pub const DEFAULT_FRACTION: f64 = 0.75;

/// Bytes of physical memory, from `/proc/meminfo` (Linux); `None` elsewhere or when unreadable.
pub fn physical_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut parts = line.split_whitespace().skip(1);
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => n.checked_mul(1024),
        _ => None,
    }
}

/// The limit a job runs under: `--max-memory` when given, else [`DEFAULT_FRACTION`] of the
/// physical memory, else (physical memory unknown) none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub bytes: Option<u64>,
    /// Whether the limit came from `--max-memory` (for the message).
    pub explicit: bool,
}

impl Limit {
    pub fn new(max_memory: Option<u64>) -> Self {
        match max_memory {
            Some(b) => Self { bytes: Some(b), explicit: true },
            None => Self { bytes: physical_memory().map(|m| (m as f64 * DEFAULT_FRACTION) as u64), explicit: false },
        }
    }

    /// Refuses a job that needs `need` bytes when that exceeds the limit; `what` describes the
    /// job and `hint` how to make it smaller.
    pub fn check(&self, need: u64, what: &str, hint: &str) -> anyhow::Result<()> {
        let Some(limit) = self.bytes else { return Ok(()) };
        if need <= limit {
            return Ok(());
        }
        let source = if self.explicit {
            "--max-memory".to_string()
        } else {
            format!("the default limit, {:.0}% of this machine's memory", 100.0 * DEFAULT_FRACTION)
        };
        anyhow::bail!(
            "{what} needs about {} of memory, more than {} ({source}); pass a larger --max-memory if the \
             machine has it, or {hint}",
            format_size(need),
            format_size(limit)
        )
    }
}

/// Parses `--max-memory`: a number of bytes with an optional unit (K, M, G, T; binary, with or
/// without "iB"/"B"), e.g. `512M`, `8G`, `1.5GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("{s:?} is not a size such as 512M or 8G"))?;
    let shift = match unit.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G or T)")),
    };
    let bytes = value * (1u64 << shift) as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{s:?} is not a usable memory size"));
    }
    Ok(bytes as u64)
}

/// `1.5 GiB`-style rendering.
pub fn format_size(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Fixed cost of the process: code, thread stacks, allocator slack, pictures.
const BASE: u64 = 64 << 20;

/// Peak memory of `obelisk register` for images on `fixed` and `moving` with `channels` feature
/// channels on a grid `stride` times coarser than the image's (MIND-SSC: 12 at stride 1,
/// intensity: 1; learned OBELISK features: the model's channels at its stride, with `extra`
/// bytes for the network and its activations).
///
/// Per image voxel: the image (f32) and its feature maps, counted twice because extraction holds
/// its inputs and outputs at once (MIND: the patch distances beside the descriptor). Per fixed
/// voxel on top: the dense field in f32 and f64, the warped image and labels, the Jacobian map
/// and the encoder's output buffers, 64 bytes in all. Measured peaks stay below this (README:
/// 128³ pair 482 MiB measured, 592 MiB estimated; 256³ pair 3.5 GiB measured, 4.2 GiB estimated).
/// The discrete search of radius `discrete_radius` holds one f32 cost per displacement and
/// first-level voxel (a 4× coarser grid: 1/64 of the fixed voxels). A local-NCC level at
/// `ncc_shrink` times the finest spacing adds [`NCC_LEVEL_BYTES`] per voxel of its grid.
pub fn register_estimate(
    fixed: &Grid,
    moving: &Grid,
    channels: usize,
    stride: usize,
    extra: u64,
    discrete_radius: usize,
    ncc_shrink: Option<usize>,
) -> u64 {
    let per_image = 4 + (2 * 4 * channels as u64).div_ceil((stride.max(1) as u64).pow(3));
    let (nf, nm) = (fixed.num_voxels() as u64, moving.num_voxels() as u64);
    let displacements = (2 * discrete_radius as u64 + 1).pow(3);
    let discrete = if discrete_radius > 0 { (nf / 64 + 1).saturating_mul(displacements).saturating_mul(4) } else { 0 };
    let ncc = ncc_shrink.map_or(0, |s| (nf / (s.max(1) as u64).pow(3)).saturating_mul(NCC_LEVEL_BYTES));
    BASE.saturating_add((nf.saturating_add(nm)).saturating_mul(per_image))
        .saturating_add(nf.saturating_mul(64))
        .saturating_add(discrete)
        .saturating_add(ncc)
        .saturating_add(extra)
}

/// Bytes per voxel of a local-NCC deformable level's grid on top of [`register_estimate`]'s
/// per-voxel terms: the fused loss's six f64 window sums and their copy while filtering (96),
/// its three f64 gradient coefficients (24), the level's intensity maps, points, warped image,
/// mask and their gradients (about 40), and the level's feature maps, which the default levels
/// never hold at full resolution. Measured (abdominal CT A, 122×101×112, full-resolution NCC
/// preset): 578 MB peak for 442 MB without this term.
pub const NCC_LEVEL_BYTES: u64 = 192;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("2 kb").unwrap(), 2048);
        for bad in ["", "G", "-1G", "1X", "1e400", "0"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(100), "100 B");
    }

    #[test]
    fn discrete_search_memory_is_counted() {
        let g = Grid::from_spacing([256, 256, 256], [1.0; 3], [0.0; 3]).unwrap();
        let off = register_estimate(&g, &g, 12, 1, 0, 0, None);
        // 13³ costs for each of 256³/64 first-level voxels: about 2.2 GB on top
        let r6 = register_estimate(&g, &g, 12, 1, 0, 6, None);
        assert_eq!(r6 - off, (256u64.pow(3) / 64 + 1) * 13u64.pow(3) * 4);
        assert!(register_estimate(&g, &g, 12, 1, 0, 2, None) > off);
        // a full-resolution NCC level costs 8× what one at half resolution does
        let ncc1 = register_estimate(&g, &g, 12, 1, 0, 0, Some(1)) - off;
        assert_eq!(ncc1, 256u64.pow(3) * NCC_LEVEL_BYTES);
        assert_eq!(register_estimate(&g, &g, 12, 1, 0, 0, Some(2)) - off, ncc1 / 8);
    }

    #[test]
    fn meminfo() {
        assert_eq!(parse_meminfo("MemTotal:       24576000 kB\nMemFree: 1 kB\n"), Some(24576000 * 1024));
        assert_eq!(parse_meminfo("nothing"), None);
        assert_eq!(parse_meminfo("MemTotal: lots"), None);
    }

    #[test]
    fn refusal_names_the_flag_and_a_hint() {
        let l = Limit { bytes: Some(1 << 20), explicit: true };
        assert!(l.check(1 << 20, "x", "y").is_ok());
        let e = l.check(3 << 20, "registering a.nii", "downsample").unwrap_err().to_string();
        assert!(e.contains("3.0 MiB") && e.contains("--max-memory") && e.contains("downsample"), "{e}");
        assert!(Limit { bytes: None, explicit: false }.check(u64::MAX, "x", "y").is_ok());
    }
}
