#![no_main]
//! `cargo +nightly fuzz run npy` (docs/FUZZING.md); the work is in `tabconv_fuzz::npy`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tabconv_fuzz::npy(data);
});
