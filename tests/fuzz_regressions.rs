//! Fuzz regressions (docs/FUZZING.md): every input the fuzz campaign found a crash, hang or
//! allocation with is committed under `tests/fuzz_regressions/<target>/` and replayed here, on
//! stable Rust, through the fuzz targets' own code (`fuzz/src/lib.rs`, included below): it must
//! now end in errors (or succeed), never panic, and where the fix made a specific error, the
//! error must name the problem.

#[path = "../fuzz/src/lib.rs"]
mod entry;

use std::path::Path;

/// What replaying an input must give: no error at all, or an error containing this text.
#[derive(Debug)]
enum Expect {
    Ok,
    Error(&'static str),
}

/// `(target, file, expected)`: every file under `tests/fuzz_regressions/` is listed here.
const CASES: &[(&str, &str, Expect)] = &[
    ("onnx_import", "conv_same_upper.onnx", Expect::Ok),
    (
        "onnx_import",
        "truncated.onnx",
        Expect::Error("not a valid ONNX protobuf"),
    ),
    ("run", "conv_same_upper.onnx", Expect::Ok),
    ("tcv_read", "conv_valid_tree.tcv", Expect::Ok),
    ("tcv_read", "gemm_argmin_f32.tcv", Expect::Ok),
    ("tcv_read", "plain_onnx.tcv", Expect::Error("not a .tcv file")),
    (
        "npy",
        "gzipped_f32.npy",
        Expect::Error("not an integer label .npy array"),
    ),
    ("idx", "images3.gz", Expect::Error("IDX labels must be 1-D")),
    ("idx", "labels1", Expect::Error("IDX images must be 3-D or 4-D")),
    ("cifar", "cifar10_two_records", Expect::Ok),
    ("cifar", "cifar100_two_records", Expect::Ok),
    ("pipeline_yaml", "exact.yaml", Expect::Ok),
    ("pipeline_yaml", "quick_lut.yaml", Expect::Ok),
];

fn replay(target: &str, data: &[u8]) -> Vec<String> {
    match target {
        "onnx_import" => entry::onnx_import(data),
        "tcv_read" => entry::tcv_read(data),
        "run" => entry::run(data),
        "npy" => entry::npy(data),
        "idx" => entry::idx(data),
        "cifar" => entry::cifar(data),
        "pipeline_yaml" => entry::pipeline_yaml(data),
        other => panic!("no fuzz target {other}"),
    }
}

#[test]
fn fuzz_crash_inputs_replay_without_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    // every committed input has a case, and every case its input
    let mut files = Vec::new();
    for target in std::fs::read_dir(&root).unwrap() {
        let target = target.unwrap();
        for f in std::fs::read_dir(target.path()).unwrap() {
            let name = f.unwrap().file_name().to_string_lossy().into_owned();
            files.push((target.file_name().to_string_lossy().into_owned(), name));
        }
    }
    files.sort();
    let mut listed: Vec<(String, String)> = CASES.iter().map(|(t, f, _)| (t.to_string(), f.to_string())).collect();
    listed.sort();
    assert_eq!(
        files, listed,
        "tests/fuzz_regressions/ and CASES must list the same inputs"
    );
    let mut failures = Vec::new();
    for (target, file, expect) in CASES {
        let data = std::fs::read(root.join(target).join(file)).unwrap();
        let errors = match std::panic::catch_unwind(|| replay(target, &data)) {
            Ok(e) => e,
            Err(_) => {
                failures.push(format!("{target}/{file}: panicked (message above)"));
                continue;
            }
        };
        let ok = match expect {
            Expect::Ok => errors.is_empty(),
            Expect::Error(text) => errors.iter().any(|e| e.contains(text)),
        };
        if !ok {
            failures.push(format!("{target}/{file}: expected {expect:?}, got {errors:?}"));
        }
    }
    let _ = std::fs::remove_dir_all(entry::work_dir());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
