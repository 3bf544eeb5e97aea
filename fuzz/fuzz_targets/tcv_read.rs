#![no_main]
//! `cargo +nightly fuzz run tcv_read` (docs/FUZZING.md); the work is in `tabconv_fuzz::tcv_read`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tabconv_fuzz::tcv_read(data);
});
