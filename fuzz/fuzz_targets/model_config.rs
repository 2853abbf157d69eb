//! Arbitrary text as a model's config.json: a config that passes validation must build its
//! network without panicking or allocating beyond the parameter bound.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use segmentation::Model;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = Model::parse_config(text) {
        let model = Model::new(config, 0, &Device::Cpu).expect("a validated config builds");
        assert!(model.num_parameters() as u64 <= segmentation::model::MAX_PARAMETERS);
    }
});
