//! Shared helpers for integration tests: fixture paths, manifests, comparisons, tract runs.
#![allow(dead_code)]

pub mod build;

use ndarray::ArrayD;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tabconv::ir::Tensor;

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel)
}

pub fn npy(rel: &str) -> ArrayD<f32> {
    tabconv::data::read_f32(&fixture(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[derive(Deserialize, Debug)]
pub struct Case {
    pub name: String,
    pub model: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    #[serde(default)]
    pub opset: Option<i64>,
    #[serde(default)]
    pub ops: Vec<String>,
    #[serde(default)]
    pub note: String,
}

#[derive(Deserialize, Debug)]
pub struct Manifest {
    pub cases: Vec<Case>,
}

pub fn manifest(rel: &str) -> Manifest {
    let text = std::fs::read_to_string(fixture(rel)).expect("manifest");
    serde_json::from_str(&text).expect("manifest json")
}

/// Max |a-b| relative to max(1, max|b|): the "error relative to output scale" used everywhere.
pub fn rel_err(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape(), "shape mismatch");
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter().zip(b.iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Run an ONNX file with tract at the given concrete input shapes.
pub fn run_tract(model: &Path, inputs: &[ArrayD<f32>]) -> Vec<ArrayD<f32>> {
    use tract_onnx::prelude::*;
    // Declared input facts (possibly with a symbolic batch) are kept: overriding them clashes
    // with the symbolic value_info the dynamo exporter writes for intermediate values.
    let m = tract_onnx::onnx().model_for_path(model).expect("tract loads the model");
    let plan = m
        .into_optimized()
        .expect("tract optimizes")
        .into_runnable()
        .expect("runnable");
    let ins: TVec<TValue> = inputs
        .iter()
        .map(|x| {
            let data: Vec<f32> = x.iter().copied().collect();
            tract_onnx::prelude::Tensor::from_shape(x.shape(), &data)
                .unwrap()
                .into()
        })
        .collect();
    plan.run(ins)
        .expect("tract runs")
        .iter()
        .map(|t| {
            let t = t.cast_to::<f32>().unwrap();
            let v = t.to_plain_array_view::<f32>().unwrap();
            ArrayD::from_shape_vec(t.shape(), v.iter().copied().collect()).unwrap()
        })
        .collect()
}

pub fn run_ours(model: &Path, inputs: &[ArrayD<f32>]) -> Result<Vec<Tensor>, tabconv::Error> {
    let g = tabconv::model::load(model)?;
    tabconv::interp::run(&g, inputs.iter().cloned().map(Tensor::F32).collect())
}

/// [`run_ours`] after the execution rewrites `tabconv run` applies to a `.onnx`
/// (`model::load_for_run`: BatchNorm folded, channels-last convs with fused epilogues), and how
/// many convs those rewrites made channels-last.
pub fn run_ours_optimized(model: &Path, inputs: &[ArrayD<f32>]) -> Result<(Vec<Tensor>, usize), tabconv::Error> {
    let g = tabconv::model::load_for_run(model)?;
    let nhwc = g
        .topo_order()?
        .into_iter()
        .filter(|&n| matches!(&g.node(n).op, tabconv::ir::Op::Conv(c) if c.nhwc))
        .count();
    Ok((
        tabconv::interp::run(&g, inputs.iter().cloned().map(Tensor::F32).collect())?,
        nhwc,
    ))
}

pub fn as_f32(t: &Tensor) -> ArrayD<f32> {
    t.cast(tabconv::ir::DType::F32).into_f32().unwrap()
}

/// The IR dump with tensor hashes replaced by `#HASH`: table contents depend on floating-point
/// details of the machine, the structure must not.
pub fn dump_without_hashes(g: &tabconv::ir::Graph) -> String {
    tabconv::ir::dump::dump(g)
        .unwrap()
        .split('#')
        .enumerate()
        .map(|(i, part)| {
            if i == 0 {
                part.to_string()
            } else {
                format!("#HASH{}", &part[8.min(part.len())..])
            }
        })
        .collect()
}

/// `model` (relative to `fixtures/`) through the `exact` pipeline, with the IR dumped after the
/// import and after every pass (for snapshots).
pub fn compile_exact(model: &str) -> (tabconv::ir::Graph, Vec<(String, String)>) {
    use tabconv::ir::dump::dump;
    use tabconv::passes::{manager::run_pipeline, pipeline::Pipeline, PassCx};
    let mut g = tabconv::onnx::load_model(&fixture(model)).unwrap();
    let pipeline = Pipeline::find("exact").unwrap();
    let mut dumps = vec![("import".to_string(), dump(&g).unwrap())];
    run_pipeline(&mut g, &pipeline, &mut PassCx::default(), |pass, g| {
        dumps.push((pass.to_string(), dump(g)?));
        Ok(())
    })
    .unwrap();
    (g, dumps)
}

/// A graph whose one input `x` is `f32[N, C, H, W]` for `chw`, and that input's outlet.
pub fn graph_with_input(chw: [i64; 3]) -> (tabconv::ir::Graph, tabconv::ir::Outlet) {
    use tabconv::ir::{DType, Dim, Fact, Graph, Op, Outlet};
    let mut g = Graph::new();
    let x = g.add_node("x", Op::Input, &[]);
    let dims = [Dim::Batch(1)].into_iter().chain(chw.map(Dim::Known)).collect();
    g.node_mut(x).outputs[0].fact = Some(Fact::new(DType::F32, dims));
    g.inputs.push(x);
    (g, Outlet::new(x, 0))
}
