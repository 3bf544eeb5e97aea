//! `tabconv bench`: median latency per batch of our interpreter and, for ONNX models, of tract (in
//! process; built with the `tract` feature) and ONNX Runtime (`python3` with the `onnxruntime`
//! wheel, as a child process timed by the same loop) in the same run on the same input, so ratios
//! compare like with like. An engine that fails, or was not built, is reported with its reason;
//! the others still run.

use crate::error::{Error, Result};
use crate::interp::Plan;
use crate::ir::{Dim, Graph, Tensor};
use crate::pq::rng::Rng;
use ndarray::{ArrayD, IxDyn};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub engine: String,
    pub model: String,
    pub batch: usize,
    pub runs: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub images_per_second: f64,
    /// The fixed batch the engine ran the `batch` images in chunks of, when the model declares
    /// one that differs from `batch` (each timed run covers all `batch` images).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk: Option<usize>,
    /// The sub-batch tabconv ran the `batch` images in ([`crate::interp::split`]), when smaller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_batch: Option<usize>,
    /// Why this engine could not be timed (then the numbers are 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Timing {
    /// A row for an engine that failed.
    pub fn failed(engine: &str, model: &Path, batch: usize, why: String) -> Timing {
        Timing {
            engine: engine.into(),
            model: model.display().to_string(),
            batch,
            runs: 0,
            median_ms: 0.0,
            min_ms: 0.0,
            images_per_second: 0.0,
            chunk: None,
            sub_batch: None,
            error: Some(why),
        }
    }
}

/// A deterministic input batch of the model's declared input shape with `batch` images (values in
/// [0, 1)). A model with a fixed batch (see [`crate::interp::fixed_batch`]) gets `batch` images
/// too: the interpreter runs them in chunks.
pub fn synthetic_input(graph: &Graph, batch: usize) -> Result<ArrayD<f32>> {
    let fixed = crate::interp::fixed_batch(graph).is_some();
    let n = graph
        .inputs
        .first()
        .ok_or_else(|| Error::Other("model has no input".into()))?;
    let f = graph.node(*n).outputs[0]
        .fact
        .as_ref()
        .ok_or_else(|| Error::Other("input has no shape".into()))?;
    let shape: Vec<usize> = f
        .shape
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Known(_) if i == 0 && fixed => batch,
            Dim::Known(v) => *v as usize,
            Dim::Batch(k) => (*k as usize).saturating_mul(batch),
        })
        .collect();
    let mut rng = Rng::new(42);
    let len = crate::limits::check_shape(&shape, 4, &format!("a batch of {batch}"))?;
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), (0..len).map(|_| rng.next_f64() as f32).collect()).expect("size"))
}

/// Most timed runs of one engine and model (the times of 10⁵ runs take 0.8 MB).
const MAX_RUNS: usize = 100_000;

/// Time `f`: warmed up for two calls and a tenth of `budget` (at most 0.3 s, so that caches,
/// clocks and helper threads settle), then at least `min_runs` runs and about `budget` of wall
/// time. A fast model runs many thousands of times: a cap of 1000 runs had timed LeNet-5 at
/// batch 1 over 30 ms, and its median moved by half from one process to the next.
fn measure(mut f: impl FnMut() -> Result<()>, min_runs: usize, budget: Duration) -> Result<(usize, f64, f64)> {
    let warm = Instant::now();
    let mut calls = 0;
    while calls < 2 || warm.elapsed() < (budget / 10).min(Duration::from_millis(300)) {
        f()?;
        calls += 1;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_runs || (start.elapsed() < budget && times.len() < MAX_RUNS) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times.len(), times[times.len() / 2], times[0]))
}

fn timing(engine: &str, model: &Path, batch: usize, (runs, median, min): (usize, f64, f64)) -> Timing {
    Timing {
        engine: engine.into(),
        model: model.display().to_string(),
        batch,
        runs,
        median_ms: median,
        min_ms: min,
        images_per_second: batch as f64 / (median / 1e3),
        chunk: None,
        sub_batch: None,
        error: None,
    }
}

/// Our interpreter on `graph`.
pub fn bench_ours(graph: &Graph, model: &Path, batch: usize, min_runs: usize, budget: Duration) -> Result<Timing> {
    let x = synthetic_input(graph, batch)?;
    let plan = Plan::new(graph)?;
    let m = measure(|| plan.run(vec![Tensor::F32(x.clone())]).map(|_| ()), min_runs, budget)?;
    let mut t = timing("tabconv", model, batch, m);
    t.chunk = plan.fixed_batch().filter(|&b| b != batch);
    t.sub_batch = plan.sub_batch(batch).filter(|_| t.chunk.is_none());
    Ok(t)
}

/// Where our interpreter's time goes over `runs` runs: seconds per op type, and per node.
pub type ProfileResult = (Vec<(&'static str, f64, usize)>, Vec<(String, &'static str, f64, usize)>);

/// Seconds per op type and per node over `runs` runs of our interpreter.
pub fn profile_ours(graph: &Graph, batch: usize, runs: usize) -> Result<ProfileResult> {
    let x = synthetic_input(graph, batch)?;
    let mut plan = Plan::new(graph)?;
    plan.run(vec![Tensor::F32(x.clone())])?;
    plan.enable_profile();
    for _ in 0..runs {
        plan.run(vec![Tensor::F32(x.clone())])?;
    }
    Ok((plan.profile(), plan.profile_nodes()))
}

/// Why there is no tract column in a build without the `tract` feature.
pub const TRACT_NOT_BUILT: &str = "not built (rebuild with --features tract)";

/// tract (optimized plan for this batch size) on the same ONNX file and input.
#[cfg(feature = "tract")]
pub fn bench_tract(graph: &Graph, model: &Path, batch: usize, min_runs: usize, budget: Duration) -> Result<Timing> {
    use tract_onnx::prelude::*;
    // The ONNX file may declare a fixed batch even when our import made it symbolic: tract runs
    // the file as declared, `batch` images in chunks of that size.
    let chunk = crate::model::declared_batch(graph).filter(|&b| b != batch);
    let x = synthetic_input(graph, chunk.unwrap_or(batch))?;
    let runs = chunk.map_or(1, |b| batch.div_ceil(b));
    let terr = |e: TractError| Error::Other(format!("tract: {e}"));
    let plan = tract_onnx::onnx()
        .model_for_path(model)
        .map_err(terr)?
        .with_input_fact(0, f32::fact(x.shape()).into())
        .map_err(terr)?
        .into_optimized()
        .map_err(terr)?
        .into_runnable()
        .map_err(terr)?;
    let data: Vec<f32> = x.iter().copied().collect();
    let input: TValue = tract_onnx::prelude::Tensor::from_shape(x.shape(), &data)
        .map_err(terr)?
        .into();
    let m = measure(
        || {
            for _ in 0..runs {
                plan.run(tvec!(input.clone())).map_err(terr)?;
            }
            Ok(())
        },
        min_runs,
        budget,
    )?;
    let mut t = timing("tract", model, batch, m);
    t.chunk = chunk;
    Ok(t)
}

/// tract is an optional dependency (the `tract` feature): without it this is the error
/// [`TRACT_NOT_BUILT`], reported like any engine that fails.
#[cfg(not(feature = "tract"))]
pub fn bench_tract(_: &Graph, _: &Path, _: usize, _: usize, _: Duration) -> Result<Timing> {
    Err(Error::Other(TRACT_NOT_BUILT.into()))
}

/// The ONNX Runtime timing script (run by `python3`; see [`bench_ort`]).
const ORT_SCRIPT: &str = include_str!("bench_ort.py");

/// ONNX Runtime on the same ONNX file and the same input: `python3` runs [`ORT_SCRIPT`], which
/// times `InferenceSession.run` with `threads` intra-op threads and the same warm-up, run count
/// and budget as [`measure`]. Fails (with the reason) when python3 or onnxruntime is missing or
/// ORT rejects the model.
pub fn bench_ort(
    graph: &Graph,
    model: &Path,
    batch: usize,
    threads: usize,
    min_runs: usize,
    budget: Duration,
) -> Result<Timing> {
    let x = synthetic_input(graph, batch)?;
    let dir = tempfile::tempdir().map_err(|e| Error::Other(format!("temp dir: {e}")))?;
    let input = dir.path().join("input.npy");
    crate::data::write_npy(&input, &Tensor::F32(x))?;
    let script = dir.path().join("bench_ort.py");
    std::fs::write(&script, ORT_SCRIPT).map_err(|e| Error::io(&script, e))?;
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(model)
        .arg(&input)
        .arg(threads.to_string())
        .arg(budget.as_secs_f64().to_string())
        .arg(min_runs.to_string())
        .output()
        .map_err(|e| Error::Other(format!("onnxruntime: cannot start python3: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| {
            Error::Other(format!(
                "onnxruntime: the timing script printed no result (exit {}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
            ))
        })?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(Error::Other(e.to_string()));
    }
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0);
    let engine = match v.get("version").and_then(|x| x.as_str()) {
        Some(ver) => format!("ort {ver}"),
        None => "ort".into(),
    };
    let mut t = timing(
        &engine,
        model,
        batch,
        (num("runs") as usize, num("median_ms"), num("min_ms")),
    );
    t.chunk = v.get("chunk").and_then(|c| c.as_u64()).map(|c| c as usize);
    Ok(t)
}
