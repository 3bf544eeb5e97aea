//! Hostile inputs (issue 10): external data confined to the model's folder, allocations bounded
//! by the bytes present or a documented limit, and malformed models reported as errors naming
//! the file, node, op and problem — never a panic.

mod common;
use common::build::*;
use common::fixture;
use std::path::{Path, PathBuf};
use tabconv::ir::Tensor;

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

#[test]
fn external_data_length_and_offset_are_checked_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.bin"), weights_bytes()).unwrap();
    let cases: &[(&[(&str, &str)], &[&str])] = &[
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
    m.metadata_props.push(tract_onnx::pb::StringStringEntryProto {
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
