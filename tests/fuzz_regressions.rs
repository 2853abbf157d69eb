//! Inputs found by the fuzz targets in `fuzz/` (and the bugs the bad-input corpus found in the
//! same loaders), kept as ordinary tests: each must be rejected cleanly, without panicking or
//! allocating what the input claims.

use std::path::Path;

use obelisk::cli::train::MAX_LABEL;
use obelisk::io::dataset::Dataset;
use obelisk::io::nifti::from_bytes;
use segmentation::Model;

/// Runs all three NIfTI readers on `bytes`, plain and as if gzipped; returns whether any read.
fn nifti(bytes: &[u8]) -> bool {
    let mut any = false;
    for name in ["case.nii", "case.nii.gz"] {
        let name = Path::new(name);
        any |= from_bytes::read_volume(name, bytes).is_ok();
        any |= from_bytes::read_labels(name, bytes).is_ok();
        any |= from_bytes::read_field(name, bytes).is_ok();
    }
    any
}

/// A minimal valid little-endian header for a `dims` float32 image, data not included.
fn header(dims: &[i16]) -> Vec<u8> {
    let mut h = vec![0u8; 352];
    h[0..4].copy_from_slice(&348i32.to_le_bytes());
    h[40..42].copy_from_slice(&(dims.len() as i16).to_le_bytes());
    for (a, d) in dims.iter().enumerate() {
        h[42 + 2 * a..44 + 2 * a].copy_from_slice(&d.to_le_bytes());
    }
    h[70..72].copy_from_slice(&16i16.to_le_bytes());
    h[72..74].copy_from_slice(&32i16.to_le_bytes());
    // 1 mm voxels: without qform or sform, pixdim is all the geometry there is
    for a in 1..=3 {
        h[76 + 4 * a..80 + 4 * a].copy_from_slice(&1f32.to_le_bytes());
    }
    h[108..112].copy_from_slice(&352f32.to_le_bytes());
    h[344..348].copy_from_slice(b"n+1\0");
    h
}

#[test]
fn nifti_headers() {
    assert!(!nifti(b""));
    assert!(!nifti(&[0u8; 348]));
    // a header alone, promising 2·10⁹ voxels: rejected without allocating them
    assert!(!nifti(&header(&[2000, 2000, 500])));
    let mut ok = header(&[2, 2, 1]);
    ok.extend_from_slice(&[0u8; 16]);
    assert!(from_bytes::read_volume(Path::new("a.nii"), &ok).is_ok());
    // a zero voxel size with no form to fall back on is refused, not taken as 1 mm
    ok[80..84].copy_from_slice(&0f32.to_le_bytes());
    let e = from_bytes::read_volume(Path::new("a.nii"), &ok).unwrap_err().to_string();
    assert!(e.starts_with("a.nii: pixdim[1] is 0"), "{e}");
}

#[test]
fn dataset_json() {
    let p = Path::new("/data/dataset.json");
    assert!(Dataset::parse(p, "").is_err());
    assert!(Dataset::parse(p, "[1]").is_err());
    assert!(Dataset::parse(p, r#"{"training": [{"label": "b"}]}"#).is_err());
    // a label id of 4·10⁹ is only a map entry here; training refuses ids above MAX_LABEL before
    // it allocates one output channel per id
    let huge = r#"{"labels": {"4294967295": "x"}, "training": [{"image": "a", "label": "b"}]}"#;
    assert!(Dataset::parse(p, huge).unwrap().labels.keys().any(|&k| k > MAX_LABEL));
    let ok = Dataset::parse(p, r#"{"training": [{"image": "a.nii", "label": "b.nii"}]}"#).unwrap();
    assert_eq!(ok.training[0].image, Path::new("/data/a.nii"));
}

#[test]
fn model_config() {
    let base = serde_json::json!({
        "architecture": {"name": "obelisk_net", "in_channels": 1, "num_classes": 2, "kernels": 16, "groups": 4,
                         "hidden": 8, "mid": 8, "growth": 4, "dense_layers": 1, "pool_kernel": [1, 1, 1],
                         "grid_divisor": 4, "offset_std": 0.05, "feature_layer": "Mid"},
        "input_norm": {"scale": 0.002, "offset": 0.0},
        "num_classes": 2,
        "features": {"layer": "mid", "channels": 8, "stride": 4},
    });
    assert!(Model::parse_config(&base.to_string()).is_ok());
    // sizes that would allocate terabytes, overflow while counting channels, or cannot build
    for (key, value) in [
        ("kernels", serde_json::json!(1u64 << 40)),
        ("dense_layers", serde_json::json!(u64::MAX)),
        ("growth", serde_json::json!(u64::MAX)),
        ("groups", serde_json::json!(0)),
        ("groups", serde_json::json!(3)),
        ("hidden", serde_json::json!(0)),
        ("pool_kernel", serde_json::json!([0, 1, 1])),
        ("grid_divisor", serde_json::json!(0)),
        ("offset_std", serde_json::json!(-1.0)),
    ] {
        let mut c = base.clone();
        c["architecture"][key] = value;
        let err = Model::parse_config(&c.to_string()).expect_err(key);
        assert!(!err.to_string().is_empty());
    }
    let mut c = base.clone();
    c["input_norm"]["scale"] = serde_json::json!(1e300 * 1e10);
    assert!(Model::parse_config(&c.to_string()).is_err());
    let unet = |channels: serde_json::Value| {
        serde_json::json!({
            "architecture": {"name": "unet", "in_channels": 1, "num_classes": 2, "channels": channels},
            "input_norm": {"scale": 0.002, "offset": 0.0},
            "num_classes": 2,
            "features": {"layer": "decoder0", "channels": 4, "stride": 1},
        })
        .to_string()
    };
    assert!(Model::parse_config(&unet(serde_json::json!([4, 8]))).is_ok());
    assert!(Model::parse_config(&unet(serde_json::json!([]))).is_err());
    assert!(Model::parse_config(&unet(serde_json::json!([4, 1u64 << 40]))).is_err());
}
