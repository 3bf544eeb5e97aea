//! Hostile inputs (issue 10): external data confined to the model's folder, allocations bounded
//! by the bytes present or a documented limit, and malformed models reported as errors naming
//! the file, node, op and problem — never a panic.

mod common;
use common::build::*;
use common::fixture;
use std::path::{Path, PathBuf};
use tabconv::ir::Tensor;
use tabconv::onnx::pb;

/// `y = x · W` with `W` (f32 [4, 2]) stored externally with the given entries.
fn external_model(dir: &Path, entries: &[(&str, &str)]) -> PathBuf {
    let m = model(
        vec![node("MatMul", "mm", &["x", "W"], &["y"], vec![])],
        vec![vi("x", &[-1, 4])],
        vec![vi("y", &[-1, 2])],
        vec![tensor_external("W", &[4, 2], entries)],
        17,
    );
    let p = dir.join("model.onnx");
    write(&p, &m);
    p
}

fn weights_bytes() -> Vec<u8> {
    (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect()
}

fn load_err(p: &Path) -> String {
    match tabconv::model::load(p) {
        Ok(_) => panic!("{} should be refused", p.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(msg.contains(n), "error should mention {n:?}: {msg}");
    }
}

#[test]
fn external_data_inside_the_folder_loads_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = vec![0xAAu8; 16];
    bytes.extend(weights_bytes());
    std::fs::write(dir.path().join("w.bin"), &bytes).unwrap();
    let p = external_model(dir.path(), &[("location", "w.bin"), ("offset", "16"), ("length", "32")]);
    let g = tabconv::model::load(&p).unwrap();
    let x = Tensor::f32(&[1, 4], vec![1.0, 0.0, 0.0, 1.0]).unwrap();
    let y = tabconv::interp::run(&g, vec![x]).unwrap();
    // rows 0 and 3 of W = [[0, 1], [2, 3], [4, 5], [6, 7]]: only offset..offset+length was read
    assert_eq!(
        y[0].as_f32().unwrap().iter().copied().collect::<Vec<_>>(),
        vec![6.0, 8.0]
    );
}

#[test]
fn external_data_in_a_subfolder_and_through_an_inside_symlink_loads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/w.bin"), weights_bytes()).unwrap();
    let p = external_model(dir.path(), &[("location", "sub/../sub/w.bin")]);
    tabconv::model::load(&p).unwrap();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(dir.path().join("sub/w.bin"), dir.path().join("link.bin")).unwrap();
        let p = external_model(dir.path(), &[("location", "link.bin")]);
        tabconv::model::load(&p).unwrap();
    }
}

#[test]
fn external_data_outside_the_folder_is_refused() {
    let outer = tempfile::tempdir().unwrap();
    let secret = outer.path().join("secret.bin");
    std::fs::write(&secret, weights_bytes()).unwrap();
    let dir = outer.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    let abs = secret.to_str().unwrap().to_string();
    let cases: Vec<(String, &str)> = vec![
        (abs, "absolute"),
        ("../secret.bin".into(), "outside the model's folder"),
        ("sub/../../secret.bin".into(), "outside the model's folder"),
        ("/dev/zero".into(), "absolute"),
        ("".into(), "empty"),
    ];
    for (loc, why) in cases {
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let p = external_model(&dir, &[("location", &loc)]);
        let e = load_err(&p);
        assert_mentions(&e, &["model.onnx", "initializer 'W'", why]);
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&secret, dir.join("escape.bin")).unwrap();
        let p = external_model(&dir, &[("location", "escape.bin")]);
        assert_mentions(
            &load_err(&p),
            &[
                "model.onnx",
                "initializer 'W'",
                "escape.bin",
                "outside the model's folder",
            ],
        );
        std::os::unix::fs::symlink("/dev/zero", dir.join("zero.bin")).unwrap();
        let p = external_model(&dir, &[("location", "zero.bin")]);
        assert_mentions(
            &load_err(&p),
            &["initializer 'W'", "zero.bin", "outside the model's folder"],
        );
    }
}

#[test]
fn external_data_that_is_not_a_regular_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("weights")).unwrap();
    let p = external_model(dir.path(), &[("location", "weights")]);
    assert_mentions(
        &load_err(&p),
        &["model.onnx", "initializer 'W'", "'weights'", "not a regular file"],
    );
    #[cfg(unix)]
    {
        // a FIFO inside the folder: refused before anything is opened (opening it would block)
        let fifo = dir.path().join("pipe.bin");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let p = external_model(dir.path(), &[("location", "pipe.bin")]);
        assert_mentions(&load_err(&p), &["initializer 'W'", "not a regular file"]);
    }
}

/// External-data entries of a tensor: `(key, value)` pairs.
type Entries<'a> = &'a [(&'a str, &'a str)];

#[test]
fn external_data_length_and_offset_are_checked_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.bin"), weights_bytes()).unwrap();
    let cases: &[(Entries, &[&str])] = &[
        (
            &[("location", "w.bin"), ("length", "1099511627776")],
            &["length 1099511627776", "need 32 bytes"],
        ),
        (
            &[("location", "w.bin"), ("length", "16")],
            &["length 16", "need 32 bytes"],
        ),
        (
            &[("location", "w.bin"), ("offset", "8")],
            &["past the end of the file (32 bytes)"],
        ),
        (
            &[("location", "w.bin"), ("offset", "18446744073709551615")],
            &["past the end of the file"],
        ),
        (
            &[("location", "w.bin"), ("offset", "-4")],
            &["offset '-4' is not a non-negative integer"],
        ),
        (&[("offset", "0")], &["no location"]),
    ];
    for (entries, needles) in cases {
        let p = external_model(dir.path(), entries);
        let e = load_err(&p);
        assert_mentions(&e, &["model.onnx", "initializer 'W'"]);
        assert_mentions(&e, needles);
    }
    // 2^40 elements declared, 32 bytes present: refused from the sizes alone
    let m = model(
        vec![node("MatMul", "mm", &["x", "W"], &["y"], vec![])],
        vec![vi("x", &[-1, 4])],
        vec![vi("y", &[-1, 1 << 38])],
        vec![tensor_external("W", &[4, 1 << 38], &[("location", "w.bin")])],
        17,
    );
    let p = dir.path().join("huge.onnx");
    write(&p, &m);
    assert_mentions(
        &load_err(&p),
        &["huge.onnx", "initializer 'W'", "past the end of the file"],
    );
}

#[test]
fn tcv_files_never_read_external_data() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.bin"), weights_bytes()).unwrap();
    let mut m = model(
        vec![node("MatMul", "mm", &["x", "W"], &["y"], vec![])],
        vec![vi("x", &[-1, 4])],
        vec![vi("y", &[-1, 2])],
        vec![tensor_external("W", &[4, 2], &[("location", "w.bin")])],
        17,
    );
    m.metadata_props.push(pb::StringStringEntryProto {
        key: "tabconv.format_version".into(),
        value: "1".into(),
    });
    let p = dir.path().join("model.tcv");
    write(&p, &m);
    assert_mentions(
        &load_err(&p),
        &["model.tcv", "initializer 'W'", "external data", ".tcv"],
    );
    // the same file as .onnx is fine: the refusal is the .tcv rule, not the data
    let q = dir.path().join("same.onnx");
    write(&q, &m);
    tabconv::model::load(&q).unwrap();
}

#[test]
fn legit_external_data_fixture_still_loads() {
    let g = tabconv::model::load(&fixture("models/lenet5_dynamo.onnx")).unwrap();
    let x = common::npy("expected/lenet5_dynamo_input.npy");
    let want = common::npy("expected/lenet5_dynamo_ort.npy");
    let y = tabconv::interp::run(&g, vec![Tensor::F32(x)]).unwrap();
    assert!(common::rel_err(y[0].as_f32().unwrap(), &want) < 1e-4);
}

/// Import `m` (written as `case.onnx`) and return the error, which must name the file, the
/// node and its op.
fn import_err(m: &pb::ModelProto, node: &str, op: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("case.onnx");
    write(&p, m);
    let e = load_err(&p);
    assert_mentions(&e, &["case.onnx", &format!("node '{node}'"), &format!("({op}")]);
    e
}

fn one_node(n: pb::NodeProto, inits: Vec<pb::TensorProto>, opset: i64) -> pb::ModelProto {
    model(
        vec![n],
        vec![vi("x", &[-1, 3, 4, 4])],
        vec![vi("y", &[-1, 3, 4, 4])],
        inits,
        opset,
    )
}

#[test]
fn nodes_without_inputs_or_outputs_are_errors() {
    for op in [
        "Relu",
        "Identity",
        "Squeeze",
        "Pad",
        "Softmax",
        "ReduceMean",
        "Split",
        "Slice",
    ] {
        let e = import_err(&one_node(node(op, "n", &[], &["y"], vec![]), vec![], 13), "n", op);
        assert_mentions(&e, &["has no input"]);
    }
    let e = import_err(
        &one_node(node("Relu", "n", &["x"], &[], vec![]), vec![], 13),
        "n",
        "Relu",
    );
    assert_mentions(&e, &["has no output"]);
}

#[test]
fn empty_clip_and_pad_constants_are_errors() {
    let empty = tensor_f32("e", &[0], &[]);
    let clip = node("Clip", "c", &["x", "e"], &["y"], vec![]);
    let e = import_err(&one_node(clip, vec![empty.clone()], 13), "c", "Clip");
    assert_mentions(&e, &["min must hold one value, got 0"]);
    let pads = tensor_i64("p", &[8], &[0; 8]);
    let pad = node("Pad", "p0", &["x", "p", "e"], &["y"], vec![]);
    let e = import_err(&one_node(pad, vec![pads, empty], 13), "p0", "Pad");
    assert_mentions(&e, &["constant_value must hold one value, got 0"]);
}

#[test]
fn pad_axes_out_of_range_or_mismatched_are_errors() {
    let pads = tensor_i64("p", &[2], &[1, 1]);
    let v = tensor_f32("v", &[], &[0.0]);
    let axes = tensor_i64("a", &[1], &[5]);
    let pad = node("Pad", "p0", &["x", "p", "v", "a"], &["y"], vec![]);
    let e = import_err(&one_node(pad.clone(), vec![pads, v.clone(), axes], 18), "p0", "Pad");
    assert_mentions(&e, &["axis 5 out of range for rank 4"]);
    let pads = tensor_i64("p", &[3], &[1, 1, 1]);
    let axes = tensor_i64("a", &[1], &[1]);
    let e = import_err(&one_node(pad, vec![pads, v, axes], 18), "p0", "Pad");
    assert_mentions(&e, &["3 pads for 1 axes"]);
}

#[test]
fn lrn_size_zero_is_an_error() {
    let lrn = node("LRN", "l", &["x"], &["y"], vec![attr_int("size", 0)]);
    let e = import_err(&one_node(lrn, vec![], 13), "l", "LRN");
    assert_mentions(&e, &["size must be at least 1, got 0"]);
}

#[test]
fn conv_weights_that_do_not_fit_are_errors() {
    let conv = |w: pb::TensorProto, attrs| one_node(node("Conv", "c", &["x", "W"], &["y"], attrs), vec![w], 13);
    let e = import_err(&conv(tensor_f32("W", &[0, 3, 3, 3], &[]), vec![]), "c", "Conv");
    assert_mentions(&e, &["no empty dimension", "f32[0,3,3,3]"]);
    let w = tensor_f32("W", &[2, 3, 3, 3], &[0.5; 54]);
    let e = import_err(&conv(w.clone(), vec![attr_ints("kernel_shape", &[5, 5])]), "c", "Conv");
    assert_mentions(&e, &["kernel_shape [5, 5] does not match weight"]);
    let e = import_err(&conv(w.clone(), vec![attr_int("group", 3)]), "c", "Conv");
    assert_mentions(&e, &["2 output channels do not split into 3 groups"]);
    // an attribute of the wrong type is reported as such, not read as 0
    let e = import_err(&conv(w, vec![attr_float("group", 1.0)]), "c", "Conv");
    assert_mentions(&e, &["attribute 'group' is FLOAT, expected INT"]);
}

#[test]
fn integer_division_truncates_and_wraps_like_onnx_everywhere() {
    use tabconv::interp::eval::eval_op;
    use tabconv::ir::infer::infer_op;
    use tabconv::ir::op::{Binary, Op};
    use tabconv::ir::{Dim, Fact};
    let div = Op::Binary(Binary::Div);
    for (a, b, want) in [(-7i64, 2i64, -3i64), (7, -2, -3), (-7, -2, 3), (i64::MIN, -1, i64::MIN)] {
        let (ta, tb) = (Tensor::i64_vec(vec![a]), Tensor::i64_vec(vec![b]));
        let run = eval_op(&div, vec![ta.clone().into(), tb.clone().into()]).unwrap();
        assert_eq!(run[0].to_i64_vec().unwrap(), vec![want], "{a} / {b} at run time");
        let f = infer_op(&div, &[Fact::of_tensor(&ta), Fact::of_tensor(&tb)]).unwrap();
        // shape inference agrees, or leaves the value unknown on overflow
        if a.checked_div(b).is_some() {
            assert_eq!(f[0].value, Some(vec![Dim::Known(want)]), "{a} / {b} in shape inference");
        } else {
            assert_eq!(f[0].value, None);
        }
    }
    let zero = eval_op(
        &div,
        vec![Tensor::i64_vec(vec![1]).into(), Tensor::i64_vec(vec![0]).into()],
    );
    assert!(zero.unwrap_err().to_string().contains("division by zero"));
    // i64::MIN / -1 while importing (constant folding) is no panic either
    let m = model(
        vec![
            node("Div", "d", &["a", "b"], &["q"], vec![]),
            node("Cast", "c", &["q"], &["qf"], vec![attr_int("to", 1)]),
            node("Mul", "m", &["x", "qf"], &["y"], vec![]),
        ],
        vec![vi("x", &[-1, 1])],
        vec![vi("y", &[-1, 1])],
        vec![tensor_i64("a", &[1], &[i64::MIN]), tensor_i64("b", &[1], &[-1])],
        13,
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("div.onnx");
    write(&p, &m);
    let g = tabconv::model::load(&p).unwrap();
    let y = tabconv::interp::run(&g, vec![Tensor::f32(&[1, 1], vec![1.0]).unwrap()]).unwrap();
    assert_eq!(y[0].to_f32_vec(), vec![i64::MIN as f32]);
}

#[test]
fn cast_keeps_int64_precision() {
    let big = (1i64 << 53) + 1;
    let t = Tensor::i64_vec(vec![big, -big, i64::MAX]);
    assert_eq!(
        t.cast(tabconv::ir::DType::I32)
            .cast(tabconv::ir::DType::I64)
            .to_i64_vec()
            .unwrap()[0],
        1
    );
    let back = t.cast(tabconv::ir::DType::I64).to_i64_vec().unwrap();
    assert_eq!(back, vec![big, -big, i64::MAX]);
    let via_i32 = Tensor::I32(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[1]), -5)).cast(tabconv::ir::DType::I64);
    assert_eq!(via_i32.to_i64_vec().unwrap(), vec![-5]);
    // i64 → i32 wraps (ONNX Runtime's static_cast), it does not saturate through a float
    let wrapped = Tensor::i64_vec(vec![big])
        .cast(tabconv::ir::DType::I32)
        .to_i64_vec()
        .unwrap();
    assert_eq!(wrapped, vec![(big as i32) as i64]);
}

#[test]
fn reductions_splits_and_gathers_that_cannot_be_done_are_errors() {
    let empty = tensor_f32("e", &[2, 0], &[]);
    let rm = node("ReduceMean", "r", &["e"], &["y"], vec![attr_ints("axes", &[1])]);
    let e = import_err(&one_node(rm, vec![empty], 13), "r", "ReduceMean");
    assert_mentions(&e, &["cannot average over axis 1 of length 0"]);
    let scalar = tensor_f32("s", &[], &[1.0]);
    let idx = tensor_i64("i", &[], &[0]);
    let g = node("Gather", "g", &["s", "i"], &["y"], vec![]);
    let e = import_err(&one_node(g, vec![scalar.clone(), idx], 13), "g", "Gather");
    assert_mentions(&e, &["rank-0"]);
    let sp = node("Split", "sp", &["s"], &["y"], vec![attr_ints("split", &[1])]);
    let e = import_err(&one_node(sp, vec![scalar], 11), "sp", "Split");
    assert_mentions(&e, &["rank-0"]);
}

#[test]
fn a_model_path_that_is_not_a_regular_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("folder.onnx");
    std::fs::create_dir(&d).unwrap();
    assert_mentions(&load_err(&d), &["folder.onnx", "not a regular file"]);
}

#[test]
fn a_graph_without_outputs_is_an_error() {
    let m = model(
        vec![node("Relu", "r", &["x"], &["y"], vec![])],
        vec![vi("x", &[-1, 3])],
        vec![],
        vec![],
        13,
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("noout.onnx");
    write(&p, &m);
    assert_mentions(&load_err(&p), &["noout.onnx", "no outputs"]);
}

#[test]
fn pq_encode_without_inputs_in_a_tcv_is_an_error() {
    let mut m = model(
        vec![pb::NodeProto {
            domain: "ai.tabconv".into(),
            ..node(
                "PQEncode",
                "enc",
                &[],
                &["y"],
                vec![attr_int("subspace", 4), {
                    let mut a = attr_int("encoder", 0);
                    a.r#type = 3;
                    a.s = b"argmin".to_vec();
                    a
                }],
            )
        }],
        vec![vi("x", &[-1, 4])],
        vec![vi("y", &[-1, 1])],
        vec![],
        17,
    );
    m.opset_import.push(pb::OperatorSetIdProto {
        domain: "ai.tabconv".into(),
        version: 1,
    });
    m.metadata_props.push(pb::StringStringEntryProto {
        key: "tabconv.format_version".into(),
        value: "1".into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("enc.tcv");
    write(&p, &m);
    assert_mentions(
        &load_err(&p),
        &["enc.tcv", "node 'enc'", "PQEncode", "expects at least 1 inputs"],
    );
}

#[test]
fn huge_windows_pads_and_shapes_are_errors_not_allocations() {
    let pool = |attrs| one_node(node("MaxPool", "mp", &["x"], &["y"], attrs), vec![], 13);
    let big = i64::MAX;
    let e = import_err(
        &pool(vec![
            attr_ints("kernel_shape", &[5, 5]),
            attr_ints("dilations", &[i64::MAX, 1]),
        ]),
        "mp",
        "MaxPool",
    );
    assert_mentions(&e, &["overflows"]);
    let e = import_err(
        &pool(vec![
            attr_ints("kernel_shape", &[1, 1]),
            attr_ints("pads", &[big, big, big, big]),
        ]),
        "mp",
        "MaxPool",
    );
    assert_mentions(&e, &["overflows"]);
    let e = import_err(
        &pool(vec![
            attr_ints("kernel_shape", &[1, 1]),
            attr_ints("pads", &[1 << 40, 0, 0, 0]),
            attr_ints("strides", &[1 << 40, 1]),
        ]),
        "mp",
        "MaxPool",
    );
    assert_mentions(&e, &["exceeds"]);
    let shape = tensor_i64("s", &[2], &[1 << 20, 1 << 20]);
    let cos = node("ConstantOfShape", "k", &["s"], &["y"], vec![]);
    let e = import_err(&one_node(cos, vec![shape], 13), "k", "ConstantOfShape");
    assert_mentions(&e, &["byte limit per tensor"]);
    let neg = tensor_i64("s", &[2], &[4, -3]);
    let cos = node("ConstantOfShape", "k", &["s"], &["y"], vec![]);
    let e = import_err(&one_node(cos, vec![neg], 13), "k", "ConstantOfShape");
    assert_mentions(&e, &["negative dimension"]);
    let pads = tensor_i64("p", &[8], &[0, 0, 1 << 40, 0, 0, 0, 0, 0]);
    let pad = node("Pad", "p0", &["x", "p"], &["y"], vec![]);
    let e = import_err(&one_node(pad, vec![pads], 13), "p0", "Pad");
    assert_mentions(&e, &["byte limit per tensor"]);
    let pads = tensor_i64("p", &[8], &[0, 0, i64::MAX, 0, 0, 0, i64::MAX, 0]);
    let pad = node("Pad", "p0", &["x", "p"], &["y"], vec![]);
    let e = import_err(&one_node(pad, vec![pads], 13), "p0", "Pad");
    assert_mentions(&e, &["overflows"]);
}

fn tabconv_env(bin: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = std::process::Command::new(bin);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("runs")
}

/// A clean failure: exit code 1 (not a panic's 101, not an abort), naming what was wrong.
fn assert_clean_failure(out: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected a clean error exit: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert_mentions(&err, needles);
}

/// An `.npy` header for float32 `shape`, followed by `data_bytes` zero bytes.
fn npy_with_header(shape: &str, data_bytes: usize) -> Vec<u8> {
    let mut h = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h.as_bytes());
    b.extend(std::iter::repeat_n(0u8, data_bytes));
    b
}

const TABCONV: &str = env!("CARGO_BIN_EXE_tabconv");
const COMPILE: &str = env!("CARGO_BIN_EXE_tabconv-compile");

#[test]
fn npy_headers_are_checked_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let lenet = fixture("models/lenet5.onnx");
    let out = dir.path().join("y.npy");
    for (shape, bytes, needle) in [
        ("(1099511627776,)", 64, "byte limit per tensor"),
        ("(1024, 1024, 1024, 1024, 1024)", 64, "byte limit per tensor"),
        (
            "(2, 1, 28, 28)",
            100,
            "the header promises [2, 1, 28, 28] (6272 bytes of data), the file holds 100",
        ),
    ] {
        let p = dir.path().join("x.npy");
        std::fs::write(&p, npy_with_header(shape, bytes)).unwrap();
        let args = [
            "run",
            lenet.to_str().unwrap(),
            "--input",
            p.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ];
        assert_clean_failure(&tabconv_env(TABCONV, &args, &[]), &["x.npy", needle]);
        assert!(!out.exists());
        // in-process too
        let e = tabconv::data::read_f32(&p).unwrap_err().to_string();
        assert_mentions(&e, &[needle]);
    }
}

#[test]
fn idx_cifar_gzip_and_pad_sizes_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let lenet = fixture("models/lenet5.onnx");
    let labels = fixture("data/mnist_test_labels.npy");
    let eval = |inputs: &Path, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["eval", lenet.to_str().unwrap(), "--inputs", inputs.to_str().unwrap()];
        args.extend(["--labels", labels.to_str().unwrap()]);
        args.extend(extra);
        tabconv_env(TABCONV, &args, env)
    };
    // IDX dimensions whose product overflows or exceeds the limit
    let idx = dir.path().join("imgs-idx3-ubyte");
    let mut b = vec![0u8, 0, 8, 3];
    for d in [u32::MAX, u32::MAX, u32::MAX] {
        b.extend(d.to_be_bytes());
    }
    std::fs::write(&idx, &b).unwrap();
    assert_clean_failure(
        &eval(&idx, &[], &[]),
        &["imgs-idx3-ubyte", "IDX header", "byte limit per tensor"],
    );
    // a gzip bomb: 8 MB of zeros in a few kB, under a 1 MB limit
    let small = [("TABCONV_MAX_TENSOR_BYTES", "1000000")];
    let bomb = dir.path().join("bomb-idx3-ubyte.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut raw = vec![0u8, 0, 8, 3];
    for d in [10_000u32, 28, 28] {
        raw.extend(d.to_be_bytes());
    }
    std::io::Write::write_all(&mut gz, &raw).unwrap();
    std::io::Write::write_all(&mut gz, &vec![0u8; 8 << 20]).unwrap();
    std::fs::write(&bomb, gz.finish().unwrap()).unwrap();
    assert!(std::fs::metadata(&bomb).unwrap().len() < 100_000);
    assert_clean_failure(
        &eval(&bomb, &[], &small),
        &["bomb-idx3-ubyte.gz", "decompresses to more than"],
    );
    // CIFAR records beyond the limit
    let cifar = dir.path().join("data_batch_1.bin");
    std::fs::write(&cifar, vec![1u8; 3073 * 100]).unwrap();
    assert_clean_failure(
        &eval(&cifar, &[], &small),
        &["data_batch_1.bin", "CIFAR images", "byte limit"],
    );
    // --pad that would allocate terabytes, or overflow
    let x = fixture("data/mnist_test.npy");
    assert_clean_failure(&eval(&x, &["--pad", "1000000"], &[]), &["--pad 1000000", "byte limit"]);
    let huge = usize::MAX.to_string();
    assert_clean_failure(&eval(&x, &["--pad", &huge], &[]), &["overflows"]);
}

#[test]
fn batch_seconds_and_pass_options_from_flags_are_checked() {
    let lenet = fixture("models/lenet5.onnx");
    let m = lenet.to_str().unwrap();
    let x = fixture("data/mnist_test.npy");
    let y = fixture("data/mnist_test_labels.npy");
    let eval0 = [
        "eval",
        m,
        "--inputs",
        x.to_str().unwrap(),
        "--labels",
        y.to_str().unwrap(),
        "--batch",
        "0",
    ];
    assert_clean_failure(&tabconv_env(TABCONV, &eval0, &[]), &["--batch 0"]);
    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", m, "--no-ort", "--no-tract"];
        args.extend(extra);
        tabconv_env(TABCONV, &args, &[])
    };
    assert_clean_failure(&bench(&["--batch", "0"]), &["--batch 0"]);
    assert_clean_failure(
        &bench(&["--batch", "1099511627776"]),
        &["a batch of 1099511627776", "byte limit"],
    );
    assert_clean_failure(&bench(&["--threads", "100000"]), &["--threads 100000"]);
    for s in ["inf", "NaN", "-1", "0"] {
        assert_clean_failure(&bench(&[&format!("--seconds={s}")]), &["--seconds"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.tcv");
    let calib = fixture("data/mnist_calib.npy");
    for set in ["lut.max_rows=0", "lut.fc_subspace=0"] {
        let args = [
            m,
            "-o",
            out.to_str().unwrap(),
            "--calib",
            calib.to_str().unwrap(),
            "--set",
            set,
        ];
        assert_clean_failure(&tabconv_env(COMPILE, &args, &[]), &["must be at least 1"]);
        assert!(!out.exists());
    }
}

#[test]
fn inspect_of_a_tcv_without_source_cost_says_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = tabconv::onnx::load_model(&fixture("models/lenet5.onnx")).unwrap();
    let bare = dir.path().join("bare.tcv");
    std::fs::write(&bare, tabconv::onnx::tcv::encode(&g, "").unwrap()).unwrap();
    g.metadata.insert("source_exact_macs".into(), "1000000".into());
    let known = dir.path().join("known.tcv");
    std::fs::write(&known, tabconv::onnx::tcv::encode(&g, "").unwrap()).unwrap();
    let inspect = |p: &Path, json: bool| {
        let mut args = vec!["inspect", p.to_str().unwrap()];
        if json {
            args.push("--json");
        }
        let o = tabconv_env(TABCONV, &args, &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let text = inspect(&bare, false);
    assert_mentions(&text, &["exact source: unknown", "reduction: unknown"]);
    let v: serde_json::Value = serde_json::from_str(&inspect(&bare, true)).unwrap();
    assert!(
        v["source_exact_macs"].is_null() && v["reduction_lookups_only"].is_null(),
        "{v}"
    );
    let text = inspect(&known, false);
    assert_mentions(&text, &["exact source: 1000000 MACs"]);
    assert!(!text.contains("unknown"));
    let v: serde_json::Value = serde_json::from_str(&inspect(&known, true)).unwrap();
    assert_eq!(v["source_exact_macs"], 1000000);
}

#[test]
fn outputs_too_large_at_the_runtime_batch_are_refused_before_running() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(
        vec![node("MatMul", "mm", &["x", "W"], &["y"], vec![])],
        vec![vi("x", &[-1, 4])],
        vec![vi("y", &[-1, 256])],
        vec![tensor_f32("W", &[4, 256], &[0.25; 1024])],
        17,
    );
    let p = dir.path().join("wide.onnx");
    write(&p, &m);
    let limit = [("TABCONV_MAX_TENSOR_BYTES", "100000")];
    let run = |n: usize| {
        let x = dir.path().join("x.npy");
        let t = Tensor::f32(&[n, 4], vec![1.0; n * 4]).unwrap();
        tabconv::data::write_npy(&x, &t).unwrap();
        let y = dir.path().join("y.npy");
        let args = [
            "run",
            p.to_str().unwrap(),
            "--input",
            x.to_str().unwrap(),
            "--output",
            y.to_str().unwrap(),
        ];
        (tabconv_env(TABCONV, &args, &limit), y)
    };
    // 10 images: 10 KB of output, under the 100 kB limit
    let (o, y) = run(10);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(tabconv::data::read_f32(&y).unwrap().shape(), &[10, 256]);
    std::fs::remove_file(&y).unwrap();
    // 200 images: 200 kB, refused before the MatMul allocates it
    let (o, y) = run(200);
    assert_clean_failure(
        &o,
        &["wide.onnx", "node mm (MatMul)", "output at batch 200", "byte limit"],
    );
    assert!(!y.exists());
}

#[test]
fn mask_targets_out_of_range_are_errors() {
    use tabconv::passes::{pipeline::Pipeline, PassCx};
    for (set, needle) in [
        ("target_reduction: 1.5", "mask.target_reduction = 1.5"),
        ("min_logit_cosine: .nan", "mask.min_logit_cosine = NaN"),
        ("max_accuracy_drop: -1", "mask.max_accuracy_drop = -1"),
        ("confirm: 1", "mask.confirm = 1"),
        ("confirm: .nan", "mask.confirm = NaN"),
    ] {
        let text = format!("name: m\npasses:\n  - mask:\n      {set}\n");
        let p = Pipeline::parse(&text, "m").unwrap();
        let mut g = tabconv::onnx::load_model(&fixture("models/lenet5.onnx")).unwrap();
        let e = p.build()[0]
            .run(&mut g, &mut PassCx::default())
            .unwrap_err()
            .to_string();
        assert_mentions(&e, &[needle]);
    }
}

/// Ops on an empty intermediate (a Slice that keeps no channel, or no row) give a result or an
/// error, never a panic; and a batch of 0 images runs.
#[test]
fn empty_intermediates_do_not_panic() {
    let cases: Vec<(&str, Vec<pb::AttributeProto>)> = vec![
        ("LRN", vec![attr_int("size", 3)]),
        (
            "MaxPool",
            vec![attr_ints("kernel_shape", &[2, 2]), attr_ints("pads", &[1, 1, 1, 1])],
        ),
        ("AveragePool", vec![attr_ints("kernel_shape", &[2, 2])]),
        ("GlobalAveragePool", vec![]),
        ("GlobalMaxPool", vec![]),
        ("Softmax", vec![attr_int("axis", 1)]),
        ("Relu", vec![]),
        ("Flatten", vec![]),
        ("Transpose", vec![]),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut ran = 0;
    for (axis, (op, attrs)) in [1i64, 2].into_iter().flat_map(|a| cases.iter().map(move |c| (a, c))) {
        let m = model(
            vec![
                node("Slice", "s", &["x", "st", "en", "ax"], &["e"], vec![]),
                node(op, "op", &["e"], &["y"], attrs.clone()),
            ],
            vec![vi("x", &[-1, 3, 4, 4])],
            vec![vi("y", &[-1, 3, 4, 4])],
            vec![
                tensor_i64("st", &[1], &[0]),
                tensor_i64("en", &[1], &[0]),
                tensor_i64("ax", &[1], &[axis]),
            ],
            13,
        );
        let p = dir.path().join("empty.onnx");
        write(&p, &m);
        let Ok(g) = tabconv::model::load(&p) else { continue };
        for n in [0, 2] {
            let x = Tensor::f32(&[n, 3, 4, 4], vec![0.5; n * 48]).unwrap();
            ran += tabconv::interp::run(&g, vec![x]).is_ok() as usize;
        }
    }
    assert!(ran >= 20, "most cases import and run on empty values ({ran})");
    // a convolution over rows that are all padding, and a product over an empty inner dimension
    let conv = model(
        vec![
            node("Slice", "s", &["x", "st", "en", "ax"], &["e"], vec![]),
            node("Conv", "c", &["e", "W"], &["y"], vec![attr_ints("pads", &[1, 0, 1, 0])]),
        ],
        vec![vi("x", &[-1, 3, 4, 4])],
        vec![vi("y", &[-1, 2, 2, 4])],
        vec![
            tensor_i64("st", &[1], &[0]),
            tensor_i64("en", &[1], &[0]),
            tensor_i64("ax", &[1], &[2]),
            tensor_f32("W", &[2, 3, 1, 1], &[1.0; 6]),
        ],
        13,
    );
    let matmul = model(
        vec![
            node("Slice", "s", &["x", "st", "en", "ax"], &["e"], vec![]),
            node("MatMul", "m", &["e", "W"], &["y"], vec![]),
        ],
        vec![vi("x", &[-1, 3])],
        vec![vi("y", &[-1, 2])],
        vec![
            tensor_i64("st", &[1], &[0]),
            tensor_i64("en", &[1], &[0]),
            tensor_i64("ax", &[1], &[1]),
            tensor_f32("W", &[0, 2], &[]),
        ],
        13,
    );
    for (m, shape, want) in [(conv, vec![3, 4, 4], vec![2, 2, 2, 4]), (matmul, vec![3], vec![2, 2])] {
        let p = dir.path().join("empty2.onnx");
        write(&p, &m);
        let g = tabconv::model::load(&p).unwrap();
        let mut s = vec![2];
        s.extend(shape);
        let n = s.iter().product();
        let y = tabconv::interp::run(&g, vec![Tensor::f32(&s, vec![1.0; n]).unwrap()]).unwrap();
        assert_eq!(y[0].shape(), want.as_slice());
        assert!(
            y[0].to_f32_vec().iter().all(|&v| v == 0.0),
            "only padding / an empty sum"
        );
    }
}

/// Declared shapes whose cost does not fit 64 bits (each tensor within a raised limit: a
/// `[2^30, 2^30]` MatMul is 2^90 multiply-adds): `inspect` reports saturated counts instead of
/// overflowing.
#[test]
fn costs_beyond_64_bits_saturate() {
    let dir = tempfile::tempdir().unwrap();
    let n = 1i64 << 30;
    let m = model(
        vec![node("MatMul", "mm", &["a", "b"], &["y"], vec![])],
        vec![vi("a", &[n, n]), vi("b", &[n, n])],
        vec![vi("y", &[n, n])],
        vec![],
        17,
    );
    let p = dir.path().join("huge.onnx");
    write(&p, &m);
    let limit = (1u64 << 62).to_string();
    let o = tabconv_env(
        TABCONV,
        &["inspect", p.to_str().unwrap(), "--json"],
        &[(tabconv::limits::MAX_TENSOR_BYTES_ENV, limit.as_str())],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["macs_per_image"], u64::MAX, "{}", v["total"]);
    assert_eq!(v["ops_all"], u64::MAX);
}

#[test]
fn transformer_ops_that_cannot_be_done_are_errors() {
    // input x: f32[N, 3, 4, 4]
    let ln = |inits: Vec<pb::TensorProto>, attrs| {
        one_node(
            node("LayerNormalization", "ln", &["x", "S", "B"], &["y"], attrs),
            inits,
            17,
        )
    };
    let e = import_err(
        &ln(
            vec![tensor_f32("S", &[3], &[1.0; 3]), tensor_f32("B", &[4], &[0.0; 4])],
            vec![],
        ),
        "ln",
        "LayerNormalization",
    );
    assert_mentions(&e, &["scale f32[3] does not match the normalised axes"]);
    let e = import_err(
        &ln(
            vec![tensor_f32("S", &[4], &[1.0; 4]), tensor_f32("B", &[4], &[0.0; 4])],
            vec![attr_int("stash_type", 0)],
        ),
        "ln",
        "LayerNormalization",
    );
    assert_mentions(&e, &["stash_type"]);
    // normalising over the batch axis works across images: an error, not a guess
    let e = import_err(
        &ln(
            vec![tensor_f32("S", &[4], &[1.0; 4]), tensor_f32("B", &[4], &[0.0; 4])],
            vec![attr_int("axis", 7)],
        ),
        "ln",
        "LayerNormalization",
    );
    assert_mentions(&e, &["axis 7 out of range for rank 4"]);
    let gelu = one_node(
        node("Gelu", "g", &["x"], &["y"], vec![attr_string("approximate", "cubic")]),
        vec![],
        20,
    );
    assert_mentions(
        &import_err(&gelu, "g", "Gelu"),
        &["approximate must be 'none' or 'tanh'"],
    );
    let expand = |shape: &[i64]| {
        one_node(
            node("Expand", "e", &["x", "s"], &["y"], vec![]),
            vec![tensor_i64("s", &[shape.len() as i64], shape)],
            13,
        )
    };
    assert_mentions(
        &import_err(&expand(&[2, 3, 5, 4]), "e", "Expand"),
        &["cannot broadcast dimension"],
    );
    assert_mentions(
        &import_err(&expand(&[1, -2, 1, 1]), "e", "Expand"),
        &["negative dimension"],
    );
    assert_mentions(
        &import_err(&expand(&[1 << 40, 1, 1, 1, 1]), "e", "Expand"),
        &["1099511627776"],
    );
    let wh = one_node(node("Where", "w", &["x", "x", "x"], &["y"], vec![]), vec![], 16);
    assert_mentions(&import_err(&wh, "w", "Where"), &["the condition must be bool, got f32"]);
    let eq = one_node(
        node("Equal", "q", &["x", "k"], &["y"], vec![]),
        vec![tensor_i64("k", &[1], &[1])],
        13,
    );
    assert_mentions(&import_err(&eq, "q", "Equal"), &["operand types differ: f32 vs i64"]);
    // a negative integer exponent is refused at run time, like division by zero
    use tabconv::interp::eval::eval_op;
    use tabconv::ir::op::{Binary, Op};
    let e = eval_op(
        &Op::Binary(Binary::Pow),
        vec![Tensor::i64_vec(vec![2]).into(), Tensor::i64_vec(vec![-1]).into()],
    )
    .unwrap_err();
    assert_mentions(&e.to_string(), &["negative exponent"]);
}
