//! Arbitrary text as a dataset.json: parsing must fail cleanly or give a consistent description.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use obelisk::io::dataset::Dataset;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(ds) = Dataset::parse(Path::new("/data/dataset.json"), text) {
        // every listed file resolves under the JSON's folder or is absolute
        for s in ds.training.iter().chain(&ds.test) {
            assert!(!s.image.as_os_str().is_empty());
        }
    }
});
