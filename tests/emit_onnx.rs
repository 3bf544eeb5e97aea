//! `tabconv-compile --emit onnx`: the compiled model as standard ONNX runs in tract (here) and
//! ONNX Runtime (docs) and gives the interpreter's outputs on the `.tcv` of the same compile.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn compile(out: &Path, extra: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_tabconv-compile"))
        .args([
            fixture("models/lenet5.onnx").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .args(["--calib", fixture("data/mnist_calib.npy").to_str().unwrap()])
        // every layer as lookups: conv (im2col rows) and fc layers, argmin and tree encoders
        .args([
            "--set",
            "mask.min_logit_cosine=0",
            "--set",
            "mask.restore_unprofitable=false",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn lowered_model_runs_in_tract_with_the_interpreters_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let x = npy("expected/lenet5_input.npy");
    // fc_subspace 3 does not divide fc1's 400 inputs: the last codebook is zero-padded
    for extra in [&[][..], &["--set", "lut.fc_subspace=3"][..]] {
        let (tcv, onnx) = (dir.path().join("m.tcv"), dir.path().join("m.onnx"));
        compile(&tcv, extra);
        compile(&onnx, &[extra, &["--emit", "onnx"]].concat());
        let proto = tabconv::onnx::proto::read_model_proto(&onnx).unwrap();
        let g = proto.graph.unwrap();
        assert!(g.node.iter().all(|n| n.domain.is_empty()), "only standard operators");
        for op in ["ArgMin", "Greater", "Gather", "ReduceSum"] {
            assert!(
                g.node.iter().any(|n| n.op_type == op),
                "{op}: both encoders and the lookups are lowered"
            );
        }
        let ours = as_f32(&run_ours(&tcv, std::slice::from_ref(&x)).unwrap()[0]);
        let theirs = &run_tract(&onnx, std::slice::from_ref(&x))[0];
        assert_eq!(ours.shape(), theirs.shape());
        let e = rel_err(&ours, theirs);
        assert!(
            e <= 1e-4,
            "{extra:?}: tract on the lowered model vs the interpreter: {e:e}"
        );
        let top1 = |a: &ndarray::ArrayD<f32>| tabconv::model::argmax_rows(a);
        assert_eq!(top1(&ours), top1(theirs), "{extra:?}: same top-1");
    }
}
