//! Bad input must give a named error and a non-zero exit, never a panic, and leave no output.

mod common;
use common::fixture;
use prost::Message;
use std::path::Path;
use std::process::{Command, Output};
use tabconv::onnx::pb;

fn tabconv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tabconv"))
        .args(args)
        .output()
        .expect("runs")
}

fn assert_fails(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert_eq!(
        out.status.code(),
        Some(1),
        "a clean error exit, not a panic (101): {err}"
    );
    assert!(!err.contains("panicked"), "panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}: {err}");
    }
}

fn run_to(model: &Path, dir: &Path) -> (Output, std::path::PathBuf) {
    let out = dir.join("y.npy");
    let o = tabconv(&[
        "run",
        model.to_str().unwrap(),
        "--input",
        fixture("expected/lenet5_input.npy").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    (o, out)
}

#[test]
fn truncated_model_is_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("models/lenet5.onnx")).unwrap();
    let p = dir.path().join("trunc.onnx");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let (o, out) = run_to(&p, dir.path());
    assert_fails(&o, &["trunc.onnx", "truncated or corrupt"]);
    assert!(!out.exists(), "no partial output");
}

#[test]
fn garbage_bytes_are_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("garbage.onnx");
    let junk: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&p, junk).unwrap();
    let (o, _) = run_to(&p, dir.path());
    assert_fails(&o, &["garbage.onnx"]);
}

#[test]
fn missing_external_data_is_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("lenet5_dynamo.onnx");
    std::fs::copy(fixture("models/lenet5_dynamo.onnx"), &p).unwrap();
    let (o, _) = run_to(&p, dir.path());
    assert_fails(
        &o,
        &["lenet5_dynamo.onnx", "external data file", "lenet5_dynamo.onnx.data"],
    );
}

/// A one-node model with an op tabconv does not know, built directly with the prost messages.
fn unknown_op_model(path: &Path) {
    let vi = |name: &str| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto {
                    dim: [1i64, 1, 28, 28]
                        .iter()
                        .map(|&d| pb::tensor_shape_proto::Dimension {
                            denotation: String::new(),
                            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                        })
                        .collect(),
                }),
            })),
        }),
        doc_string: String::new(),
    };
    let node = |op: &str, name: &str, i: &str, o: &str| pb::NodeProto {
        input: vec![i.into()],
        output: vec![o.into()],
        name: name.into(),
        op_type: op.into(),
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(pb::GraphProto {
            node: vec![
                node("FancyAttention", "attn0", "x", "h"),
                node("Einsum", "einsum0", "h", "y"),
            ],
            name: "g".into(),
            input: vec![vi("x")],
            output: vec![vi("y")],
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(path, model.encode_to_vec()).unwrap();
}

#[test]
fn unsupported_ops_are_listed_together() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("unknown.onnx");
    unknown_op_model(&p);
    let (o, _) = run_to(&p, dir.path());
    assert_fails(
        &o,
        &[
            "unknown.onnx",
            "opset 17",
            "FancyAttention",
            "attn0",
            "Einsum",
            "einsum0",
        ],
    );
}

#[test]
fn unsupported_mode_names_node_and_op() {
    let o = tabconv(&["inspect", fixture("ops/pad_opset13_reflect.onnx").to_str().unwrap()]);
    assert_fails(&o, &["pad_opset13_reflect.onnx", "Pad", "reflect"]);
}

#[test]
fn wrong_input_shape_is_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.npy");
    let bad = tabconv::ir::Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[2, 1, 32, 32])));
    tabconv::data::write_npy(&x, &bad).unwrap();
    let out = dir.path().join("y.npy");
    let o = tabconv(&[
        "run",
        fixture("models/lenet5.onnx").to_str().unwrap(),
        "--input",
        x.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_fails(&o, &["input 'input' expects f32[N,1,28,28]", "[2, 1, 32, 32]"]);
    assert!(!out.exists());
}

#[test]
fn missing_files_are_named() {
    let o = tabconv(&["inspect", "/nonexistent/model.onnx"]);
    assert_fails(&o, &["/nonexistent/model.onnx"]);
    let o = tabconv(&[
        "eval",
        fixture("models/lenet5.onnx").to_str().unwrap(),
        "--inputs",
        "/nonexistent/x.npy",
        "--labels",
        "/nonexistent/y.npy",
    ]);
    assert_fails(&o, &["/nonexistent/x.npy"]);
}
