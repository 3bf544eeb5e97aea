//! Full-size torchvision architectures exported at opset 9 (`python fixtures/zoo.py --full`,
//! about 1 GB, not committed). Opt-in: `TABCONV_ZOO_FULL=/tmp/zoo_full cargo test --release
//! --test zoo_full -- --ignored --nocapture`.

mod common;
use common::*;
use std::path::PathBuf;

#[test]
#[ignore]
fn torchvision_models_match_onnx_runtime() {
    let dir = PathBuf::from(std::env::var("TABCONV_ZOO_FULL").unwrap_or_else(|_| "/tmp/zoo_full".into()));
    let m: Manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).expect("manifest")).unwrap();
    for case in &m.cases {
        let file = |p: &str| dir.join(std::path::Path::new(p).file_name().unwrap());
        let inputs: Vec<_> = case
            .inputs
            .iter()
            .map(|p| tabconv::data::read_f32(&file(p)).unwrap())
            .collect();
        let t = std::time::Instant::now();
        let ours = run_ours(&file(&case.model), &inputs).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let want = tabconv::data::read_f32(&file(&case.outputs[0])).unwrap();
        let e = rel_err(&as_f32(&ours[0]), &want);
        println!(
            "{:<22} opset {:?}: error {e:.2e} vs ONNX Runtime ({:.2} s incl. load)",
            case.name,
            case.opset,
            t.elapsed().as_secs_f64()
        );
        assert!(e <= 1e-4, "{}: error {e:e}", case.name);
    }
}
