//! Model-zoo style CNNs at opset 7–9 (fixtures/zoo, built by fixtures/zoo.py): ResNet-50, VGG,
//! SqueezeNet, ShuffleNet, DenseNet, Inception and AlexNet idioms, against ONNX Runtime outputs
//! (batch 1 and, where the model has a dynamic batch, batch 3) and against tract.

mod common;
use common::*;

#[test]
fn zoo_models_match_onnx_runtime_and_tract() {
    let m = manifest("zoo/manifest.json");
    assert!(m.cases.len() >= 7, "expected the seven zoo-style models");
    for case in &m.cases {
        let inputs: Vec<_> = case.inputs.iter().map(|p| npy(p)).collect();
        let ours = run_ours(&fixture(&case.model), &inputs).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        for (o, want) in ours.iter().zip(&case.outputs) {
            let e = rel_err(&as_f32(o), &npy(want));
            assert!(e <= 1e-4, "{}: error {e:e} vs ONNX Runtime", case.name);
        }
        if !case.name.ends_with("_b3") {
            let theirs = run_tract(&fixture(&case.model), &inputs);
            let e = rel_err(&as_f32(&ours[0]), &theirs[0]);
            assert!(e <= 1e-4, "{}: error {e:e} vs tract", case.name);
        }
    }
}
