//! Arbitrary bytes through the NIfTI readers (image, label map, field), plain and gzipped: any
//! outcome but a panic, an abort or an unbounded allocation is fine.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use obelisk::io::nifti::from_bytes;

fuzz_target!(|data: &[u8]| {
    for name in ["fuzz.nii", "fuzz.nii.gz"] {
        let name = Path::new(name);
        if let Ok(v) = from_bytes::read_volume(name, data) {
            assert_eq!(v.data.len(), v.channels * v.grid.num_voxels());
        }
        if let Ok(l) = from_bytes::read_labels(name, data) {
            assert_eq!(l.data.len(), l.grid.num_voxels());
        }
        if let Ok(f) = from_bytes::read_field(name, data) {
            assert_eq!(f.data.len(), 3 * f.grid.num_voxels());
        }
    }
});
