#![no_main]
//! `cargo +nightly fuzz run onnx_import` (docs/FUZZING.md); the work is in `tabconv_fuzz::onnx_import`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tabconv_fuzz::onnx_import(data);
});
