#![no_main]
//! `cargo +nightly fuzz run pipeline_yaml` (docs/FUZZING.md); the work is in `tabconv_fuzz::pipeline_yaml`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tabconv_fuzz::pipeline_yaml(data);
});
