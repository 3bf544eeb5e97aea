#![no_main]
//! `cargo +nightly fuzz run cifar` (docs/FUZZING.md); the work is in `tabconv_fuzz::cifar`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tabconv_fuzz::cifar(data);
});
