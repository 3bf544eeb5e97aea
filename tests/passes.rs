//! Every pass of passes/exact.yaml on every fixture model: an insta snapshot of the IR after
//! each pass, and the interpreter's outputs before and after each pass equal within 1e-4.
//! Plus `.tcv` round trips (IR → .tcv → IR gives the same dump) and byte-identical compiles.

mod common;
use common::*;
use tabconv::interp::run;
use tabconv::ir::{dump::dump, Tensor};
use tabconv::onnx::tcv;
use tabconv::passes::{manager::run_pipeline, pipeline::Pipeline, PassCx};

const MODELS: &[(&str, &str)] = &[
    ("lenet5", "models/lenet5.onnx"),
    ("lenet5_dynamo", "models/lenet5_dynamo.onnx"),
    ("nin", "models/nin.onnx"),
    ("resnet18_fmnist", "models/resnet18_fmnist.onnx"),
];

#[test]
fn snapshots_after_each_exact_pass() {
    for (name, model) in MODELS {
        let (_, dumps) = compile_exact(model);
        for (i, (pass, text)) in dumps.iter().enumerate() {
            insta::assert_snapshot!(format!("{name}__{i}_{pass}"), text);
        }
    }
}

#[test]
fn every_exact_pass_preserves_outputs() {
    for (name, model) in MODELS {
        let x = npy(&format!("expected/{name}_input.npy"));
        let x = x.slice(ndarray::s![..16, .., .., ..]).to_owned().into_dyn();
        let mut g = tabconv::onnx::load_model(&fixture(model)).unwrap();
        let reference = as_f32(&run(&g, vec![Tensor::F32(x.clone())]).unwrap()[0]);
        let pipeline = Pipeline::find("exact").unwrap();
        run_pipeline(&mut g, &pipeline, &mut PassCx::default(), |pass, g| {
            let out = as_f32(&run(g, vec![Tensor::F32(x.clone())])?[0]);
            let e = rel_err(&out, &reference);
            assert!(e <= 1e-4, "{name}: after {pass} the output moved by {e:e}");
            Ok(())
        })
        .unwrap();
        // the exact pipeline really rewrote the model: convs lowered (the snapshots show it),
        // folded back and run channels-last
        let text = dump(&g).unwrap();
        assert!(!text.contains("Im2Col("), "{name}: a lowered Conv was not folded back");
        assert!(text.contains("layout=nhwc"), "{name}: no channels-last Conv");
        assert!(!text.contains("BatchNormalization("), "{name}: BatchNorm left unfolded");
        assert!(!text.contains("Gemm("), "{name}: Gemm left");
    }
}

#[test]
fn tcv_round_trip_and_determinism() {
    let dir = tempfile::tempdir().unwrap();
    for (name, model) in MODELS {
        let (g, _) = compile_exact(model);
        let yaml = Pipeline::find("exact").unwrap().to_yaml();
        let bytes = tcv::encode(&g, &yaml).unwrap();
        let (g2, _) = compile_exact(model);
        assert_eq!(bytes, tcv::encode(&g2, &yaml).unwrap(), "{name}: two compiles differ");
        let p = dir.path().join(format!("{name}.tcv"));
        tcv::write_tcv(&g, &yaml, &p).unwrap();
        let back = tcv::read_tcv(&p).unwrap();
        assert_eq!(
            dump(&back).unwrap(),
            dump(&g).unwrap(),
            "{name}: IR → .tcv → IR changed the graph"
        );
        assert_eq!(tcv::read_pipeline(&p).unwrap().as_deref(), Some(yaml.as_str()));
        // and it still computes what ONNX Runtime computes
        let x = npy(&format!("expected/{name}_input.npy"));
        let out = as_f32(&run(&back, vec![Tensor::F32(x)]).unwrap()[0]);
        let e = rel_err(&out, &npy(&format!("expected/{name}_ort.npy")));
        assert!(e <= 1e-4, "{name}: compiled .tcv differs from ONNX Runtime by {e:e}");
    }
}
