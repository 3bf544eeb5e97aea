//! What each fuzz target does with its input (docs/FUZZING.md). The bytes are written to a file
//! and handed to the same functions the CLI calls on a file (`model::load`, `data::read_f32`,
//! `dataset::load_images`, `Pipeline::parse`, …), so every check on the way from a path is
//! fuzzed too. Each function returns the error messages it met (an error is a fine outcome); a
//! panic, a hang or an allocation beyond the limits is a finding.
//!
//! `tests/fuzz_regressions.rs` includes this file (`#[path]`) and replays the committed crash
//! inputs through exactly these functions on stable Rust.

/// The ONNX builders of the tests (`tests/common/build.rs`), for the small model below.
#[path = "../../tests/common/build.rs"]
#[allow(dead_code)]
mod build;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tabconv::ir::{cost, dump::dump, DType, Dim, Graph, Tensor};
use tabconv::passes::pipeline::{PassSpec, Pipeline};
use tabconv::passes::{manager::run_pipeline, PassCx};

/// The per-tensor limit while fuzzing (`TABCONV_MAX_TENSOR_BYTES`): a hostile file may make
/// tabconv allocate up to the limit, which at the default 4 GiB is above libFuzzer's RSS limit.
pub const MAX_TENSOR_BYTES: u64 = 64 << 20;
/// Graph inputs with more elements than this (all inputs together) are not run.
const MAX_INPUT_ELEMS: usize = 1 << 16;
/// Models that cost more than this many multiply-adds, lookups and comparisons per image are
/// imported but not run: a valid model may ask for any amount of arithmetic, which is not a
/// finding, only a slow input.
const MAX_RUN_WORK: u64 = 20_000_000;
/// Pipelines with more passes or more iterations than this are parsed but not run, for the same
/// reason.
const MAX_PIPELINE_PASSES: usize = 12;
const MAX_PIPELINE_ITERS: usize = 64;

/// Set the limits for this process (once, before anything reads them): the per-tensor limit and
/// one worker thread (the fuzzer runs one job per core).
fn init() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        std::env::set_var(tabconv::limits::MAX_TENSOR_BYTES_ENV, MAX_TENSOR_BYTES.to_string());
        std::env::set_var("RAYON_NUM_THREADS", "1");
    });
}

/// The folder the inputs are written to: one per process, under the system temp folder.
pub fn work_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("tabconv-fuzz-")
            .tempdir()
            .expect("a temp folder for the fuzz inputs")
            .keep()
    })
}

/// Write `data` as `name` in the target's own sub-folder (so external-data references of a model
/// can only find the model itself).
fn put(target: &str, name: &str, data: &[u8]) -> PathBuf {
    init();
    let dir = work_dir().join(target);
    std::fs::create_dir_all(&dir).expect("the fuzz work folder is writable");
    let path = dir.join(name);
    std::fs::write(&path, data).expect("the fuzz work folder is writable");
    path
}

fn note<T>(errors: &mut Vec<String>, r: tabconv::Result<T>) -> Option<T> {
    r.map_err(|e| errors.push(e.to_string())).ok()
}

/// ONNX import (decode, external data, opset forms, constant folding, shape inference, verify),
/// then what `tabconv inspect` computes from the graph.
pub fn onnx_import(data: &[u8]) -> Vec<String> {
    let path = put("onnx", "model.onnx", data);
    let mut errors = Vec::new();
    if let Some(g) = note(&mut errors, tabconv::model::load(&path)) {
        inspect(&g, &path, &mut errors);
    }
    errors
}

/// `.tcv` read (format version, `ai.tabconv` ops, no external data), inspect, then a run on a
/// small input: the tabconv kernels read tables and codebooks straight from the file.
pub fn tcv_read(data: &[u8]) -> Vec<String> {
    let path = put("tcv", "model.tcv", data);
    let mut errors = Vec::new();
    note(&mut errors, tabconv::onnx::tcv::read_pipeline(&path));
    if let Some(g) = note(&mut errors, tabconv::model::load(&path)) {
        inspect(&g, &path, &mut errors);
        run_small(&g, 1, &mut errors);
    }
    errors
}

/// Import → shape inference → run at batch 1 as imported, then the rewrites `tabconv run`
/// applies to a `.onnx` (`model::optimize_for_run`) and a run at batch 2 (fixed-batch models
/// run in chunks).
pub fn run(data: &[u8]) -> Vec<String> {
    let path = put("run", "model.onnx", data);
    let mut errors = Vec::new();
    let Some(g) = note(&mut errors, tabconv::model::load(&path)) else {
        return errors;
    };
    run_small(&g, 1, &mut errors);
    let mut optimized = g;
    if note(&mut errors, tabconv::model::optimize_for_run(&mut optimized)).is_some() {
        run_small(&optimized, 2, &mut errors);
    }
    errors
}

/// `.npy` through every reader that takes one: inputs, labels, any-dtype tensors, and the
/// dataset loader (`--inputs`, `--calib`, `--val`) with `--normalize` and `--pad`.
pub fn npy(data: &[u8]) -> Vec<String> {
    let path = put("npy", "x.npy", data);
    let mut errors = Vec::new();
    note(&mut errors, tabconv::data::read_f32(&path));
    note(&mut errors, tabconv::data::read_labels(&path));
    note(&mut errors, tabconv::data::read_tensor(&path));
    datasets(&path, &mut errors);
    errors
}

/// MNIST-style IDX files (gzipped or not) as images and as labels.
pub fn idx(data: &[u8]) -> Vec<String> {
    let path = put("idx", "images-idx3-ubyte", data);
    let mut errors = Vec::new();
    datasets(&path, &mut errors);
    errors
}

/// CIFAR-10/100 binary batches. The first byte picks the file name (`data_batch_1.bin` is read
/// as CIFAR-10 when the length allows both, `train.bin` as CIFAR-100) and whether the rest is
/// cut to whole records (bit 1: 3073-byte, else 3074-byte ones; bit 7: left as it is), so most
/// inputs get past the length check.
pub fn cifar(data: &[u8]) -> Vec<String> {
    let Some((&how, rest)) = data.split_first() else {
        return Vec::new();
    };
    let name = if how & 1 == 0 { "data_batch_1.bin" } else { "train.bin" };
    let record = if how & 2 == 0 { 3073 } else { 3074 };
    let keep = if how & 0x80 == 0 {
        rest.len() / record * record
    } else {
        rest.len()
    };
    let path = put("cifar", name, &rest[..keep]);
    let mut errors = Vec::new();
    datasets(&path, &mut errors);
    errors
}

/// A pipeline file: parse (typed options, unknown keys refused), the normalised YAML stored in
/// every `.tcv` must parse back to itself, and a pipeline of bounded size runs on a small model
/// with calibration and labelled validation images (so `lut` and `mask` options are validated
/// and used), its result written as a `.tcv`, read back and run.
pub fn pipeline_yaml(data: &[u8]) -> Vec<String> {
    init();
    let Ok(text) = std::str::from_utf8(data) else {
        return vec!["not UTF-8".into()];
    };
    let mut errors = Vec::new();
    let Some(pipeline) = note(&mut errors, Pipeline::parse(text, "fuzz.yaml")) else {
        return errors;
    };
    let yaml = pipeline.to_yaml();
    let back = Pipeline::parse(&yaml, "normalised")
        .unwrap_or_else(|e| panic!("the normalised pipeline does not parse back: {e}\n{yaml}"));
    assert_eq!(back.to_yaml(), yaml, "normalising the pipeline is not stable");
    if !bounded(&pipeline) {
        return errors;
    }
    let (mut g, calib, val) = small_model();
    let mut cx = PassCx {
        calib: Some(calib),
        val: Some(val),
        ..Default::default()
    };
    let ran = run_pipeline(&mut g, &pipeline, &mut cx, |_, g| dump(g).map(drop));
    if note(&mut errors, ran).is_none() {
        return errors;
    }
    let path = work_dir().join("pipeline").join("compiled.tcv");
    std::fs::create_dir_all(path.parent().expect("has a parent")).expect("the fuzz work folder is writable");
    if note(&mut errors, tabconv::onnx::tcv::write_tcv(&g, &yaml, &path)).is_some() {
        if let Some(g) = note(&mut errors, tabconv::model::load(&path)) {
            run_small(&g, 3, &mut errors);
        }
    }
    errors
}

/// Whether running the pipeline is bounded work (see [`MAX_PIPELINE_ITERS`]).
fn bounded(p: &Pipeline) -> bool {
    let lut_ok =
        |o: &tabconv::passes::lut::Options| o.kmeans_iters <= MAX_PIPELINE_ITERS && o.refit_iters <= MAX_PIPELINE_ITERS;
    p.passes.len() <= MAX_PIPELINE_PASSES
        && p.passes.iter().all(|s| match s {
            PassSpec::Lut(Some(o)) => lut_ok(o),
            PassSpec::Mask(Some(m)) => m.lut.as_ref().is_none_or(lut_ok),
            _ => true,
        })
}

/// Everything `tabconv inspect` derives from a graph.
fn inspect(g: &Graph, path: &Path, errors: &mut Vec<String>) {
    note(errors, dump(g));
    let _ = tabconv::model::batch_note(g, path);
    if let Some(order) = note(errors, g.topo_order()) {
        let mut total = cost::Cost::default();
        for n in order {
            total.add(&cost::node_cost(g, n));
        }
        let (a, b) = cost::reduction(&cost::graph_cost(g), &total);
        assert!(!a.is_nan() && !b.is_nan(), "reductions of a graph against itself");
    }
    let _ = (cost::param_count(g), cost::weight_bytes(g));
}

/// Run `g` on `batch` images of deterministic values (some NaN and infinite) when its inputs
/// are small and it is cheap enough (see [`MAX_RUN_WORK`]).
fn run_small(g: &Graph, batch: usize, errors: &mut Vec<String>) {
    let c = cost::graph_cost(g);
    let work = [c.exact_macs, c.encode_macs, c.encode_compares, c.lookups]
        .iter()
        .try_fold(0u64, |a, &b| a.checked_add(b));
    if work.is_none_or(|w| w.saturating_mul(batch as u64) > MAX_RUN_WORK) {
        return;
    }
    let Some(inputs) = inputs(g, batch) else {
        return;
    };
    note(errors, tabconv::interp::run(g, inputs));
}

/// One tensor per graph input at `batch`, or `None` when a shape is unknown or too large.
fn inputs(g: &Graph, batch: usize) -> Option<Vec<Tensor>> {
    let mut total = 0usize;
    g.inputs
        .iter()
        .map(|&n| {
            let f = g.node(n).outputs.first()?.fact.as_ref()?;
            let shape = f
                .shape
                .iter()
                .map(|d| match *d {
                    Dim::Known(v) => usize::try_from(v).ok(),
                    Dim::Batch(k) => usize::try_from(k).ok()?.checked_mul(batch),
                })
                .collect::<Option<Vec<usize>>>()?;
            let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
            total = total.checked_add(n).filter(|&t| t <= MAX_INPUT_ELEMS)?;
            Some(tensor(f.dtype, &shape, n))
        })
        .collect()
}

fn tensor(dtype: DType, shape: &[usize], n: usize) -> Tensor {
    use ndarray::{ArrayD, IxDyn};
    fn arr<T>(shape: &[usize], n: usize, f: impl Fn(usize) -> T) -> ArrayD<T> {
        ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(f).collect()).expect("n is the shape's size")
    }
    let small = |i: usize| (i % 5) as i64 - 1;
    match dtype {
        DType::F32 => Tensor::F32(arr(shape, n, |i| match i % 29 {
            27 => f32::NAN,
            28 => f32::INFINITY,
            _ => ((i * 37 % 17) as f32 - 8.0) / 8.0,
        })),
        DType::I64 => Tensor::I64(arr(shape, n, small)),
        DType::I32 => Tensor::I32(arr(shape, n, |i| small(i) as i32)),
        DType::U8 => Tensor::U8(arr(shape, n, |i| (i % 5) as u8)),
        DType::I8 => Tensor::I8(arr(shape, n, |i| small(i) as i8)),
        DType::Bool => Tensor::Bool(arr(shape, n, |i| i % 2 == 0)),
    }
}

/// The image and label readers, as `--inputs` / `--calib` / `--val` and `--labels` use them.
fn datasets(path: &Path, errors: &mut Vec<String>) {
    use tabconv::dataset::{load_images, load_labels, Preprocess};
    note(errors, load_images(path, Preprocess::default()));
    let pre = Preprocess {
        normalize: Some((0.5, 0.25)),
        pad: 2,
        pad_value: 0.0,
    };
    note(errors, load_images(path, pre));
    note(errors, load_labels(path));
}

/// A small CNN with every kind of layer the passes rewrite (BatchNorm, Conv, Gemm; large enough
/// for `lut` and `mask` to find layers), 32 calibration images and 32 labelled ones.
#[allow(clippy::type_complexity)]
fn small_model() -> (Graph, ndarray::ArrayD<f32>, (ndarray::ArrayD<f32>, Vec<i64>)) {
    static MODEL: OnceLock<Graph> = OnceLock::new();
    let g = MODEL.get_or_init(|| {
        let path = work_dir().join("small_cnn.onnx");
        std::fs::write(&path, small_cnn_onnx()).expect("the fuzz work folder is writable");
        tabconv::model::load(&path).expect("the small CNN imports")
    });
    let images = |seed: usize| {
        let v = (0..32 * 2 * 6 * 6)
            .map(|i| ((i * 7919 + seed) % 101) as f32 / 50.0 - 1.0)
            .collect();
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[32, 2, 6, 6]), v).expect("fits")
    };
    let labels = (0..32).map(|i| i % 4).collect();
    (g.clone(), images(1), (images(2), labels))
}

/// x [N,2,6,6] → Conv 3×3 (8 channels, padded) → BatchNormalization → Relu → MaxPool 2×2 →
/// Flatten → Gemm (72 → 4).
fn small_cnn_onnx() -> Vec<u8> {
    use build::{attr_ints, model, node, tensor_f32, vi};
    use prost::Message;
    let weights = |name: &str, dims: &[i64]| {
        let n: i64 = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i * 31 % 23) as f32 - 11.0) / 11.0).collect();
        tensor_f32(name, dims, &v)
    };
    let fill = |name: &str, v: f32| tensor_f32(name, &[8], &[v; 8]);
    let window = |k: i64, pads: &[i64], strides: &[i64]| {
        vec![
            attr_ints("kernel_shape", &[k, k]),
            attr_ints("pads", pads),
            attr_ints("strides", strides),
        ]
    };
    let nodes = vec![
        node(
            "Conv",
            "conv",
            &["x", "w", "b"],
            &["conv"],
            window(3, &[1, 1, 1, 1], &[1, 1]),
        ),
        node(
            "BatchNormalization",
            "bn",
            &["conv", "scale", "shift", "mean", "var"],
            &["bn"],
            vec![],
        ),
        node("Relu", "relu", &["bn"], &["relu"], vec![]),
        node(
            "MaxPool",
            "pool",
            &["relu"],
            &["pool"],
            window(2, &[0, 0, 0, 0], &[2, 2]),
        ),
        node("Flatten", "flat", &["pool"], &["flat"], vec![]),
        node("Gemm", "y", &["flat", "fc_w", "fc_b"], &["y"], vec![]),
    ];
    let initializer = vec![
        weights("w", &[8, 2, 3, 3]),
        weights("b", &[8]),
        fill("scale", 1.5),
        fill("shift", 0.1),
        fill("mean", 0.2),
        fill("var", 2.0),
        weights("fc_w", &[72, 4]),
        weights("fc_b", &[4]),
    ];
    model(
        nodes,
        vec![vi("x", &[-1, 2, 6, 6])],
        vec![vi("y", &[-1, 4])],
        initializer,
        13,
    )
    .encode_to_vec()
}
