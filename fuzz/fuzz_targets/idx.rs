#![no_main]
//! `cargo +nightly fuzz run idx` (docs/FUZZING.md); the work is in `tabconv_fuzz::idx`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tabconv_fuzz::idx(data);
});
