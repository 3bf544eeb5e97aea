//! `tabconv bench`: median latency per batch of our interpreter and, for ONNX models, of tract in
//! the same process and run, so ratios compare like with like.

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
}

/// A deterministic input batch of the model's declared input shape (values in [0, 1)).
pub fn synthetic_input(graph: &Graph, batch: usize) -> Result<ArrayD<f32>> {
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
        .map(|d| match d {
            Dim::Known(v) => *v as usize,
            Dim::Batch(k) => *k as usize * batch,
        })
        .collect();
    let mut rng = Rng::new(42);
    let len = shape.iter().product();
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), (0..len).map(|_| rng.next_f64() as f32).collect()).expect("size"))
}

/// Time `f` after `warmup` calls: at least `min_runs` runs and about `budget` of wall time.
fn measure(mut f: impl FnMut() -> Result<()>, min_runs: usize, budget: Duration) -> Result<(usize, f64, f64)> {
    for _ in 0..2 {
        f()?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_runs || (start.elapsed() < budget && times.len() < 1000) {
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
    }
}

/// Our interpreter on `graph`.
pub fn bench_ours(graph: &Graph, model: &Path, batch: usize, min_runs: usize, budget: Duration) -> Result<Timing> {
    let x = synthetic_input(graph, batch)?;
    let plan = Plan::new(graph)?;
    let m = measure(|| plan.run(vec![Tensor::F32(x.clone())]).map(|_| ()), min_runs, budget)?;
    Ok(timing("tabconv", model, batch, m))
}

/// Seconds per op type over `runs` runs of our interpreter (where the time goes).
pub fn profile_ours(graph: &Graph, batch: usize, runs: usize) -> Result<Vec<(&'static str, f64, usize)>> {
    let x = synthetic_input(graph, batch)?;
    let mut plan = Plan::new(graph)?;
    plan.run(vec![Tensor::F32(x.clone())])?;
    plan.enable_profile();
    for _ in 0..runs {
        plan.run(vec![Tensor::F32(x.clone())])?;
    }
    Ok(plan.profile())
}

/// tract (optimized plan for this batch size) on the same ONNX file and input.
pub fn bench_tract(graph: &Graph, model: &Path, batch: usize, min_runs: usize, budget: Duration) -> Result<Timing> {
    use tract_onnx::prelude::*;
    let x = synthetic_input(graph, batch)?;
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
        || plan.run(tvec!(input.clone())).map(|_| ()).map_err(terr),
        min_runs,
        budget,
    )?;
    Ok(timing("tract", model, batch, m))
}
