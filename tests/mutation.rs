//! Mutation test (issue 10): seeded truncations, byte flips and structural edits of every fixture
//! model (and of a small compiled `.tcv` with `ai.tabconv` ops), each imported, shape-inferred,
//! run on a small input, compiled with the `exact` pipeline and run again, under `catch_unwind`.
//! An error is the expected outcome; a panic fails the test, listing the mutation that caused it.
//! Fixed seed and counts: the same cases every run, bounded in time (about a second).

mod common;
use common::fixture;
use prost::Message;
use std::path::Path;
use std::sync::Mutex;
use tabconv::ir::{Dim, Tensor};
use tabconv::onnx::pb;

/// SplitMix64: the test's own deterministic stream.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

const SEED: u64 = 0x7ab_c04e;
const TRUNCATIONS: usize = 6;
const FLIPS: usize = 10;
const STRUCTURAL: usize = 60;
/// Inputs larger than this are not run (a mutated input shape may be huge); import and shape
/// inference still are.
const MAX_INPUT_ELEMS: usize = 1 << 20;

const OPS: &[&str] = &[
    "Relu",
    "Conv",
    "MaxPool",
    "AveragePool",
    "Add",
    "Div",
    "Reshape",
    "Gemm",
    "MatMul",
    "Concat",
    "Flatten",
    "Softmax",
    "Pad",
    "Split",
    "Gather",
    "Transpose",
    "Slice",
    "ReduceMean",
    "LRN",
    "ConstantOfShape",
    "Cast",
    "Squeeze",
    "Unsqueeze",
    "BatchNormalization",
    "GlobalAveragePool",
    "Clip",
    "Shape",
    "Identity",
    "Sum",
];
const EXTREMES: &[i64] = &[0, -1, 2, 1 << 40, i64::MAX, i64::MIN, -(1 << 40)];

/// One structural edit of the model; returns what it did.
fn edit(m: &mut pb::ModelProto, rng: &mut Rng) -> String {
    let g = m.graph.as_mut().expect("fixtures have a graph");
    let nn = g.node.len();
    let ni = rng.below(nn);
    match rng.below(11) {
        0 if nn > 0 => {
            let n = &mut g.node[ni];
            if n.input.is_empty() {
                return "no-op".into();
            }
            let i = rng.below(n.input.len());
            n.input.remove(i);
            format!("node {ni} ({}) loses input {i}", n.op_type)
        }
        1 if nn > 0 => {
            let n = &mut g.node[ni];
            if rng.below(2) == 0 {
                n.input.clear();
                format!("node {ni} ({}) loses all inputs", n.op_type)
            } else {
                n.output.clear();
                format!("node {ni} ({}) loses its outputs", n.op_type)
            }
        }
        2 if !g.initializer.is_empty() => {
            let t = rng.below(g.initializer.len());
            let init = &mut g.initializer[t];
            if init.dims.is_empty() {
                init.dims.push(*rng.pick(EXTREMES));
                return format!("initializer {} gains a dim", init.name);
            }
            let d = rng.below(init.dims.len());
            init.dims[d] = *rng.pick(EXTREMES);
            format!("initializer {} dim {d} = {}", init.name, init.dims[d])
        }
        3 => {
            use pb::tensor_shape_proto::dimension::Value;
            let Some(input) = g.input.first_mut() else {
                return "no-op".into();
            };
            let Some(pb::type_proto::Value::TensorType(tt)) = input.r#type.as_mut().and_then(|t| t.value.as_mut())
            else {
                return "no-op".into();
            };
            let Some(shape) = tt.shape.as_mut() else {
                return "no-op".into();
            };
            if shape.dim.is_empty() {
                return "no-op".into();
            }
            let d = rng.below(shape.dim.len());
            let v = *rng.pick(&[0, -3, 1 << 40, 1, 3]);
            shape.dim[d].value = Some(Value::DimValue(v));
            format!("graph input dim {d} = {v}")
        }
        4 if nn > 0 => {
            let n = &mut g.node[ni];
            if n.attribute.is_empty() {
                return "no-op".into();
            }
            let a = rng.below(n.attribute.len());
            let at = &mut n.attribute[a];
            // move the value to a field of another type, as a confused writer would
            let (ty, what) = match at.r#type {
                2 => (1, "INT -> FLOAT"),
                1 => (2, "FLOAT -> INT"),
                7 => (2, "INTS -> INT"),
                3 => (7, "STRING -> INTS"),
                _ => (3, "-> STRING"),
            };
            at.f = at.i as f32;
            at.i = at.ints.first().copied().unwrap_or(at.f as i64);
            at.r#type = ty;
            format!("node {ni} ({}) attribute '{}' {what}", n.op_type, at.name)
        }
        5 if nn > 0 => {
            let op = *rng.pick(OPS);
            let n = &mut g.node[ni];
            let was = std::mem::replace(&mut n.op_type, op.to_string());
            format!("node {ni} {was} -> {op}")
        }
        6 if nn > 0 => {
            let n = &mut g.node[ni];
            if n.attribute.is_empty() {
                return "no-op".into();
            }
            let a = rng.below(n.attribute.len());
            let v = *rng.pick(EXTREMES);
            let at = &mut n.attribute[a];
            at.i = v;
            at.ints.iter_mut().for_each(|x| *x = v);
            format!("node {ni} ({}) attribute '{}' = {v}", n.op_type, at.name)
        }
        7 if !g.initializer.is_empty() => {
            let t = rng.below(g.initializer.len());
            let init = &mut g.initializer[t];
            let keep = rng.below(init.raw_data.len() + 1);
            init.raw_data.truncate(keep);
            format!("initializer {} raw data cut to {keep} bytes", init.name)
        }
        8 if !g.initializer.is_empty() => {
            let t = rng.below(g.initializer.len());
            format!("initializer {} removed", g.initializer.remove(t).name)
        }
        9 => {
            if rng.below(2) == 0 {
                g.output.clear();
                "graph outputs removed".into()
            } else {
                g.output.iter_mut().for_each(|o| o.name = "nowhere".into());
                "graph output renamed".into()
            }
        }
        _ if nn > 1 => {
            let j = rng.below(nn);
            g.node.swap(ni, j);
            format!("nodes {ni} and {j} swapped")
        }
        _ => "no-op".into(),
    }
}

/// How far a mutated model got.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Reached {
    ImportError,
    Imported,
    RunError,
    Ran,
}

/// Import, infer and (when the input is small) run the model at `path`; panics propagate.
fn exercise(path: &Path) -> Reached {
    let Ok(g) = tabconv::model::load(path) else {
        return Reached::ImportError;
    };
    let Some(&input) = g.inputs.first() else {
        return Reached::Imported;
    };
    let Some(f) = g.node(input).outputs[0].fact.clone() else {
        return Reached::Imported;
    };
    let shape: Vec<usize> = f
        .shape
        .iter()
        .map(|d| match d {
            Dim::Known(v) => *v as usize,
            Dim::Batch(k) => *k as usize,
        })
        .collect();
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n.is_none_or(|n| n > MAX_INPUT_ELEMS) || g.inputs.len() != 1 {
        return Reached::Imported;
    }
    let data: Vec<f32> = (0..n.unwrap()).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
    let x = Tensor::f32(&shape, data).unwrap();
    let ran = tabconv::interp::run(&g, vec![x.clone()]);
    // an empty batch and a batch of 2 take other paths (no rows; fixed-batch chunks)
    for b in [0, 2] {
        let mut s = shape.clone();
        if let Some(first) = s.first_mut() {
            *first *= b;
        }
        let n: usize = s.iter().product();
        let x = Tensor::f32(&s, (0..n).map(|i| (i % 7) as f32 / 7.0).collect()).unwrap();
        let _ = tabconv::interp::run(&g, vec![x]);
    }
    // the exact pipeline's rewrites must cope with whatever imported, too
    let mut compiled = g;
    let pipeline = tabconv::passes::pipeline::Pipeline::find("exact").unwrap();
    let mut cx = tabconv::passes::PassCx::default();
    if tabconv::passes::manager::run_pipeline(&mut compiled, &pipeline, &mut cx, |_, _| Ok(())).is_ok() {
        let _ = tabconv::interp::run(&compiled, vec![x]);
    }
    match ran {
        Ok(_) => Reached::Ran,
        Err(_) => Reached::RunError,
    }
}

/// The models to mutate: (file name, bytes, files that must sit next to it).
fn targets(dir: &Path) -> Vec<(String, Vec<u8>, Vec<std::path::PathBuf>)> {
    let mut out = Vec::new();
    let mut models: Vec<_> = std::fs::read_dir(fixture("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    models.sort();
    assert!(models.len() >= 5, "fixture models missing");
    for p in models {
        let data = p.with_extension("onnx.data");
        let side = if data.exists() { vec![data] } else { vec![] };
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        out.push((name, std::fs::read(&p).unwrap(), side));
    }
    out.push(("lenet5_lut.tcv".into(), compiled_tcv(dir), vec![]));
    out
}

/// A small LUT model with every `ai.tabconv` op (both encoders, channels-last), compiled quickly.
fn compiled_tcv(dir: &Path) -> Vec<u8> {
    use tabconv::passes::{manager::run_pipeline, pipeline::Pipeline, PassCx};
    let mut g = tabconv::onnx::load_model(&fixture("models/lenet5.onnx")).unwrap();
    let text = "name: quick\npasses:\n  - fold-batchnorm:\n  - gemm-to-matmul:\n  - conv-to-im2col:\n  - constant-fold:\n  \
                - lut:\n      max_rows: 256\n      kmeans_iters: 2\n      refit: false\n      k: 16\n  - dead-code:\n  - channels-last:\n";
    let p = Pipeline::parse(text, "quick").unwrap();
    let calib = common::npy("data/mnist_calib.npy");
    let calib = calib.slice_axis(ndarray::Axis(0), (0..32).into()).to_owned();
    let mut cx = PassCx {
        calib: Some(calib),
        ..Default::default()
    };
    run_pipeline(&mut g, &p, &mut cx, |_, _| Ok(())).unwrap();
    let bytes = tabconv::onnx::tcv::encode(&g, &p.to_yaml()).unwrap();
    let path = dir.join("check.tcv");
    std::fs::write(&path, &bytes).unwrap();
    let ops: String = tabconv::ir::dump::dump(&tabconv::model::load(&path).unwrap()).unwrap();
    for op in ["PQEncode", "LutMatMul"] {
        assert!(ops.contains(op), "the compiled model should hold {op}");
    }
    bytes
}

/// The mutated variants of one model: (description, bytes).
fn variants(bytes: &[u8], rng: &mut Rng) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for _ in 0..TRUNCATIONS {
        let at = rng.below(bytes.len());
        out.push((format!("truncated at {at}"), bytes[..at].to_vec()));
    }
    for _ in 0..FLIPS {
        let mut b = bytes.to_vec();
        let k = 1 + rng.below(8);
        let mut at = Vec::new();
        for _ in 0..k {
            let i = rng.below(b.len());
            b[i] ^= 1 << rng.below(8);
            at.push(i);
        }
        out.push((format!("bits flipped at {at:?}"), b));
    }
    let model = pb::ModelProto::decode(bytes).expect("fixtures decode");
    for _ in 0..STRUCTURAL {
        let mut m = model.clone();
        let edits: Vec<String> = (0..1 + rng.below(2)).map(|_| edit(&mut m, rng)).collect();
        out.push((edits.join(", "), m.encode_to_vec()));
    }
    out
}

#[test]
fn mutated_models_give_errors_not_panics() {
    // Small per-tensor limit: a mutation may not make the test allocate gigabytes.
    std::env::set_var(tabconv::limits::MAX_TENSOR_BYTES_ENV, (64u64 << 20).to_string());
    let last_panic: &'static Mutex<String> = Box::leak(Box::new(Mutex::new(String::new())));
    std::panic::set_hook(Box::new(move |info| {
        *last_panic.lock().unwrap() = info.to_string();
    }));
    // the harness itself: a panic is caught and its message recorded
    assert!(std::panic::catch_unwind(|| panic!("probe")).is_err());
    assert!(last_panic.lock().unwrap().contains("probe"));
    let dir = tempfile::tempdir().unwrap();
    let start = std::time::Instant::now();
    let mut rng = Rng(SEED);
    let mut failures = Vec::new();
    let mut cases = 0;
    let mut reached = std::collections::BTreeMap::<Reached, usize>::new();
    for (name, bytes, side) in targets(dir.path()) {
        let case_dir = dir.path().join(name.replace('.', "_"));
        std::fs::create_dir_all(&case_dir).unwrap();
        for s in &side {
            std::fs::copy(s, case_dir.join(s.file_name().unwrap())).unwrap();
        }
        let path = case_dir.join(&name);
        for (what, b) in variants(&bytes, &mut rng) {
            std::fs::write(&path, &b).unwrap();
            cases += 1;
            match std::panic::catch_unwind(|| exercise(&path)) {
                Ok(r) => *reached.entry(r).or_default() += 1,
                Err(_) => failures.push(format!("{name}: {what}: {}", last_panic.lock().unwrap())),
            }
        }
    }
    let _ = std::panic::take_hook();
    eprintln!(
        "{cases} mutated models in {:.1} s: {reached:?}",
        start.elapsed().as_secs_f64()
    );
    assert!(cases >= 8 * (TRUNCATIONS + FLIPS + STRUCTURAL));
    // the mutations must reach the interpreter often, or the test checks only the decoder
    let deep = reached.get(&Reached::RunError).unwrap_or(&0) + reached.get(&Reached::Ran).unwrap_or(&0);
    assert!(deep * 10 >= cases, "too few mutated models got to run: {reached:?}");
    assert!(
        failures.is_empty(),
        "{} panics:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
