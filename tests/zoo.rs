//! Model-zoo style CNNs at opset 7–9 (fixtures/zoo, built by fixtures/zoo.py): ResNet-50, VGG,
//! SqueezeNet, ShuffleNet, DenseNet, Inception and AlexNet idioms, against ONNX Runtime outputs
//! (batch 1 and, where the model has a dynamic batch, batch 3) and against tract, as written
//! and after the run rewrites (channels-last convs, depthwise and fused epilogues included).

mod common;
use common::*;
use std::path::PathBuf;

#[test]
fn zoo_models_match_onnx_runtime_and_tract() {
    let m = manifest("zoo/manifest.json");
    assert!(m.cases.len() >= 7, "expected the seven zoo-style models");
    for case in &m.cases {
        let inputs: Vec<_> = case.inputs.iter().map(|p| npy(p)).collect();
        let ours = run_ours(&fixture(&case.model), &inputs).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let (fast, _) = run_ours_optimized(&fixture(&case.model), &inputs).unwrap();
        assert_eq!(ours.len(), case.outputs.len(), "{}: output count", case.name);
        assert_eq!(fast.len(), case.outputs.len(), "{}: output count", case.name);
        for ((o, f), want) in ours.iter().zip(&fast).zip(&case.outputs) {
            let e = rel_err(&as_f32(o), &npy(want));
            assert!(e <= 1e-4, "{}: error {e:e} vs ONNX Runtime", case.name);
            let e = rel_err(&as_f32(f), &npy(want));
            assert!(
                e <= 1e-4,
                "{} with the run rewrites: error {e:e} vs ONNX Runtime",
                case.name
            );
        }
        if !case.name.ends_with("_b3") {
            let theirs = run_tract(&fixture(&case.model), &inputs);
            let e = rel_err(&as_f32(&ours[0]), &theirs[0]);
            assert!(e <= 1e-4, "{}: error {e:e} vs tract", case.name);
        }
    }
}

/// Full-size torchvision architectures exported at opset 9 (`python fixtures/zoo.py --full`,
/// about 1 GB, not committed). Opt-in: `TABCONV_ZOO_FULL=/tmp/zoo_full cargo test --release
/// --test zoo -- --ignored --nocapture`.
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
