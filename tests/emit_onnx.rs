//! `tabconv-compile --emit onnx`: the compiled model as standard ONNX runs in tract (here) and
//! ONNX Runtime (docs) and gives the interpreter's outputs on the `.tcv` of the same compile.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// `tabconv-compile MODEL -o OUT ARGS…`, which must succeed.
fn compile_cli(model: &str, out: &Path, args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_tabconv-compile"))
        .args([fixture(model).to_str().unwrap(), "-o", out.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The default pipeline's masking off: every layer stays lookups.
const ALL_LUT: [&str; 6] = [
    "--set",
    "mask.min_logit_cosine=0",
    "--set",
    "mask.max_expected_drop=null",
    "--set",
    "mask.restore_unprofitable=false",
];

fn compile(out: &Path, extra: &[&str]) {
    let calib = fixture("data/mnist_calib.npy");
    let args = [
        &["--calib", calib.to_str().unwrap()][..],
        // every layer as lookups: conv (im2col rows) and fc layers, argmin and tree encoders
        &ALL_LUT,
        extra,
    ]
    .concat();
    compile_cli("models/lenet5.onnx", out, &args);
}

#[test]
fn lowered_model_runs_in_tract_with_the_interpreters_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let x = npy("expected/lenet5_input.npy");
    // fc_subspace 3 does not divide fc1's 400 inputs: the last codebook is zero-padded;
    // pixel codebooks (conv2): the padded input's pixels encoded, their codes gathered per tap
    for extra in [
        &[][..],
        &["--set", "lut.fc_subspace=3"][..],
        &["--set", "lut.pixel_subspace=3"][..],
    ] {
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

/// Pixel codebooks on padded 3×3 convolutions (ResNet-18/16, every layer as lookups): the
/// lowered model pads the input, encodes its pixels (the padding's read the all-zero pixel's
/// codes, as the interpreter's taps outside the image do) and gathers them per tap; tract runs
/// it with the interpreter's outputs on the `.tcv`.
#[test]
fn lowered_pixel_codebooks_run_in_tract_with_the_interpreters_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let calib = fixture("data/fmnist_calib.npy");
    let args = [
        &[
            "--calib",
            calib.to_str().unwrap(),
            "--set",
            "lut.pixel_subspace=8",
            "--set",
            "lut.learn=none",
            "--set",
            "lut.max_rows=2048",
        ][..],
        &ALL_LUT,
    ]
    .concat();
    let (tcv, onnx) = (dir.path().join("r.tcv"), dir.path().join("r.onnx"));
    compile_cli("models/resnet18_fmnist.onnx", &tcv, &args);
    compile_cli(
        "models/resnet18_fmnist.onnx",
        &onnx,
        &[&args[..], &["--emit", "onnx"]].concat(),
    );
    let back = tabconv::onnx::tcv::read_tcv(&tcv).unwrap();
    let pixel = back
        .g
        .node_indices()
        .filter(|&n| matches!(&back.node(n).op, tabconv::ir::op::Op::PqEncode(p) if p.pixel))
        .count();
    assert!(
        pixel >= 10,
        "the 3×3 layers of 16+ channels get pixel codebooks ({pixel})"
    );
    let x = npy("data/fmnist_test.npy");
    let x = x.slice(ndarray::s![..32, .., .., ..]).to_owned().into_dyn();
    let ours = as_f32(&run_ours(&tcv, std::slice::from_ref(&x)).unwrap()[0]);
    let theirs = &run_tract(&onnx, std::slice::from_ref(&x))[0];
    let e = rel_err(&ours, theirs);
    assert!(e <= 1e-4, "tract on the lowered model vs the interpreter: {e:e}");
}

/// A transformer's GELU, fused by `fuse-transformer` into `Gelu` (standard only from opset 20),
/// is one `ai.tabconv` node in the `.tcv` (so reading it back gives the same graph) and
/// Mul/Erf/Add in `--emit onnx`, which tract runs with the interpreter's outputs on the `.tcv`;
/// `LayerNormalization` (opset 17) is standard in both. A `.tcv` declaring `ai.tabconv` opset 3
/// cannot hold the `Gelu`.
#[test]
fn fused_gelu_is_one_tcv_node_and_standard_operators_in_emitted_onnx() {
    use tabconv::onnx::proto::read_model_proto;
    let dir = tempfile::tempdir().unwrap();
    let (tcv, onnx) = (dir.path().join("vit.tcv"), dir.path().join("vit.onnx"));
    compile_cli("models/vit_mnist.onnx", &tcv, &["--pipeline", "exact"]);
    compile_cli(
        "models/vit_mnist.onnx",
        &onnx,
        &["--pipeline", "exact", "--emit", "onnx"],
    );
    let count = |p: &Path, domain: &str, op: &str| {
        let g = read_model_proto(p).unwrap().graph.unwrap();
        g.node.iter().filter(|n| n.domain == domain && n.op_type == op).count()
    };
    // the fixture ViT: 3 blocks, each with two LayerNorms and one GELU, and a final LayerNorm
    assert_eq!(count(&tcv, "ai.tabconv", "Gelu"), 3);
    assert_eq!(count(&tcv, "", "Erf"), 0);
    assert_eq!(count(&tcv, "", "LayerNormalization"), 7);
    let lowered = read_model_proto(&onnx).unwrap().graph.unwrap();
    assert!(
        lowered.node.iter().all(|n| n.domain.is_empty()),
        "only standard operators"
    );
    assert_eq!(count(&onnx, "", "Erf"), 3);
    assert_eq!(count(&onnx, "", "LayerNormalization"), 7);

    let back = tabconv::onnx::tcv::read_tcv(&tcv).unwrap();
    assert_eq!(
        back.g.node_weights().filter(|n| n.op.name() == "Gelu").count(),
        3,
        "the .tcv reads back with its Gelus fused"
    );
    let x = npy("expected/vit_mnist_input.npy");
    let ours = as_f32(&run_ours(&tcv, std::slice::from_ref(&x)).unwrap()[0]);
    let theirs = &run_tract(&onnx, std::slice::from_ref(&x))[0];
    let e = rel_err(&ours, theirs);
    assert!(
        e <= 1e-4,
        "tract on the lowered ViT vs the interpreter on the .tcv: {e:e}"
    );
    let e = rel_err(&ours, &npy("expected/vit_mnist_ort.npy"));
    assert!(e <= 1e-4, "the .tcv vs ONNX Runtime on the original: {e:e}");

    // the same file declaring ai.tabconv opset 3, before Gelu was an ai.tabconv op
    let e = read_as_opset(&tcv, 3, dir.path());
    assert!(e.contains("Gelu needs ai.tabconv opset 4"), "{e}");
}

/// The error of reading `tcv` rewritten to declare `ai.tabconv` opset `v` (in `dir`).
fn read_as_opset(tcv: &Path, v: i64, dir: &Path) -> String {
    let mut m = tabconv::onnx::proto::read_model_proto(tcv).unwrap();
    for o in m.opset_import.iter_mut().filter(|o| o.domain == "ai.tabconv") {
        o.version = v;
    }
    let old = dir.join(format!("opset{v}.tcv"));
    std::fs::write(&old, prost::Message::encode_to_vec(&m)).unwrap();
    tabconv::onnx::tcv::read_tcv(&old).unwrap_err().to_string()
}

/// NIN's ReLU6 (`Clip(0, 6)` after its third conv) is fused into that channels-last conv as a
/// capped ReLU: no `Clip` is left in the `.tcv`, one `NhwcConv` carries `activation_max` = 6
/// and reads back with it, and the `.tcv` still gives ONNX Runtime's outputs. A `.tcv`
/// declaring `ai.tabconv` opset 5 cannot hold the attribute.
#[test]
fn relu6_is_fused_into_the_channels_last_conv() {
    use tabconv::onnx::proto::read_model_proto;
    let dir = tempfile::tempdir().unwrap();
    let tcv = dir.path().join("nin.tcv");
    compile_cli("models/nin.onnx", &tcv, &["--pipeline", "exact"]);
    let g = read_model_proto(&tcv).unwrap().graph.unwrap();
    assert_eq!(
        g.node.iter().filter(|n| n.op_type == "Clip").count(),
        0,
        "the Clip is fused"
    );
    let capped: Vec<f32> = g
        .node
        .iter()
        .filter(|n| n.op_type == "NhwcConv")
        .flat_map(|n| n.attribute.iter().filter(|a| a.name == "activation_max").map(|a| a.f))
        .collect();
    assert_eq!(capped, [6.0]);

    let back = tabconv::onnx::tcv::read_tcv(&tcv).unwrap();
    let caps: Vec<Option<f32>> = back
        .g
        .node_weights()
        .filter_map(|n| match &n.op {
            tabconv::ir::op::Op::Conv(c) => Some(c.relu_max),
            _ => None,
        })
        .filter(Option::is_some)
        .collect();
    assert_eq!(caps, [Some(6.0)], "the .tcv reads back with the cap");
    let x = npy("expected/nin_input.npy");
    let ours = as_f32(&run_ours(&tcv, std::slice::from_ref(&x)).unwrap()[0]);
    let e = rel_err(&ours, &npy("expected/nin_ort.npy"));
    assert!(e <= 1e-4, "the .tcv vs ONNX Runtime on the original: {e:e}");

    let e = read_as_opset(&tcv, 5, dir.path());
    assert!(e.contains("'activation_max' needs ai.tabconv opset 6"), "{e}");
    // a cap that is not a positive finite float is an error, not a silent clamp
    for bad in [-1.0, 0.0, f32::NAN, f32::INFINITY] {
        let mut m = read_model_proto(&tcv).unwrap();
        let g = m.graph.as_mut().unwrap();
        for a in g.node.iter_mut().flat_map(|n| n.attribute.iter_mut()) {
            if a.name == "activation_max" {
                a.f = bad;
            }
        }
        let p = dir.path().join("bad_cap.tcv");
        std::fs::write(&p, prost::Message::encode_to_vec(&m)).unwrap();
        let e = tabconv::onnx::tcv::read_tcv(&p).unwrap_err().to_string();
        assert!(
            e.contains("activation_max must be a positive finite float"),
            "{bad}: {e}"
        );
    }
}
