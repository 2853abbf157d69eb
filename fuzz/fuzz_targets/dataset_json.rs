//! Arbitrary text as a dataset.json: parsing must fail cleanly or give a consistent description.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use obelisk::cli::train::{parse_dataset, MAX_LABEL};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(ds) = parse_dataset(Path::new("/data/dataset.json"), text) {
        assert!(!ds.entries.is_empty());
        assert!(ds.max_label <= MAX_LABEL);
        assert!(ds.names.keys().all(|&k| k <= ds.max_label));
    }
});
