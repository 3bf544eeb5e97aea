#![no_main]
//! `cargo +nightly fuzz run run` (docs/FUZZING.md); the work is in `tabconv_fuzz::run`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tabconv_fuzz::run(data);
});
