//! Loading a model file by extension.

use crate::dataset::Labelled;
use crate::error::{Error, Result};
use crate::interp::Plan;
use crate::ir::{Graph, Tensor};
use ndarray::Axis;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub fn load(path: &Path) -> Result<Graph> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("onnx") => crate::onnx::load_model(path),
        Some("tcv") => crate::onnx::tcv::read_tcv(path),
        _ => Err(Error::Input(format!(
            "{}: unknown model type (expected a .onnx or .tcv file)",
            path.display()
        ))),
    }
}

/// Load a model to run it. A `.onnx` gets the execution rewrites ONNX Runtime also makes when
/// it opens a model ([`optimize_for_run`]); a `.tcv` runs as compiled.
pub fn load_for_run(path: &Path) -> Result<Graph> {
    let mut graph = load(path)?;
    if path.extension().is_some_and(|e| e == "onnx") {
        optimize_for_run(&mut graph).map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    }
    Ok(graph)
}

/// The rewrites that make an ONNX model fast to interpret without changing what it computes:
/// BatchNorm folded into the convolutions before it, convolutions and pooling channels-last
/// with ReLU fused, decomposed LayerNorm and GELU fused into their ops (outputs within float
/// rounding of the model as written).
pub fn optimize_for_run(graph: &mut Graph) -> Result<()> {
    let yaml = "name: run\npasses:\n  - fold-batchnorm:\n  - fuse-transformer:\n  - channels-last:\n  - dead-code:\n";
    let pipeline = crate::passes::pipeline::Pipeline::parse(yaml, "the built-in run rewrites")?;
    let mut cx = crate::passes::PassCx::default();
    crate::passes::manager::run_pipeline(graph, &pipeline, &mut cx, |_, _| Ok(()))?;
    Ok(())
}

/// A model loaded to run (`tabconv run | eval`, the Python binding): the graph after
/// [`load_for_run`], scheduled once (the plan keeps what its steps derive on the first run), and
/// the file it came from, which run-time errors name.
pub struct Runner {
    path: PathBuf,
    plan: Plan<'static>,
}

/// What `tabconv eval --json` prints.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    pub model: PathBuf,
    /// Top-1 accuracy, a fraction.
    pub accuracy: f64,
    pub correct: usize,
    pub samples: usize,
    pub batch: usize,
    pub seconds: f64,
    pub images_per_second: f64,
}

impl Runner {
    pub fn load(path: &Path) -> Result<Runner> {
        let plan = Plan::owning(Arc::new(load_for_run(path)?))?;
        Ok(Runner {
            path: path.to_path_buf(),
            plan,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn graph(&self) -> &Graph {
        self.plan.graph()
    }

    /// The note about a declared fixed batch ([`batch_note`]).
    pub fn batch_note(&self) -> Option<String> {
        batch_note(self.graph(), &self.path)
    }

    /// Run on a batch (see [`Plan::run`]); errors name the model file.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        self.plan.run(inputs).map_err(|e| e.in_model(&self.path))
    }

    /// Top-1 accuracy of the first output against the labels, running `batch` images at a time;
    /// `on_batch` is called after each batch (a progress bar).
    pub fn evaluate(&self, data: &Labelled, batch: usize, mut on_batch: impl FnMut()) -> Result<Evaluation> {
        check_batch(batch)?;
        let start = Instant::now();
        let mut correct = 0usize;
        for (chunk, labels) in data
            .images()
            .axis_chunks_iter(Axis(0), batch)
            .zip(data.labels().chunks(batch))
        {
            let out = self.run(vec![Tensor::F32(chunk.to_owned())])?;
            let first = out
                .first()
                .ok_or_else(|| Error::Other(format!("{}: the model has no output", self.path.display())))?;
            let pred = argmax_rows(first.as_f32()?);
            if pred.len() != labels.len() {
                return Err(Error::Other(format!(
                    "{}: the first output gives {} rows for {} images",
                    self.path.display(),
                    pred.len(),
                    labels.len()
                )));
            }
            correct += pred.iter().zip(labels).filter(|(p, l)| p == l).count();
            on_batch();
        }
        let seconds = start.elapsed().as_secs_f64();
        let samples = data.labels().len();
        Ok(Evaluation {
            model: self.path.clone(),
            accuracy: correct as f64 / samples as f64,
            correct,
            samples,
            batch,
            seconds,
            images_per_second: samples as f64 / seconds,
        })
    }
}

/// A batch size from a flag or an argument must be at least 1 (its upper bound is the
/// per-tensor limit, checked where a batch is allocated).
pub fn check_batch(batch: usize) -> Result<()> {
    if batch == 0 {
        return Err(Error::Input("--batch 0: a batch holds at least one image".into()));
    }
    Ok(())
}

/// Index of the largest value of each row of a `[N, classes…]` output.
pub fn argmax_rows(t: &ndarray::ArrayD<f32>) -> Vec<i64> {
    let n = t.shape().first().copied().unwrap_or(0);
    let per = t.len().checked_div(n).unwrap_or(0);
    let data: Vec<f32> = t.iter().copied().collect();
    (0..n)
        .map(|i| {
            let row = &data[i * per..(i + 1) * per];
            let mut best = 0;
            for (j, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = j;
                }
            }
            best as i64
        })
        .collect()
}

/// The fixed batch the model's source file declares, when it declares one (graph metadata
/// `batch`, see `onnx::import::BATCH_KEY`): `symbolic (declared B)` or `fixed B`.
pub fn declared_batch(graph: &crate::ir::Graph) -> Option<usize> {
    let v = graph.metadata.get(crate::onnx::import::BATCH_KEY)?;
    let digits: String = v.chars().filter(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The one line the CLI prints about a declared fixed batch, if the model file has one: an ONNX
/// file whose batch was made symbolic, or any model that still runs in chunks of its fixed batch.
pub fn batch_note(graph: &crate::ir::Graph, path: &Path) -> Option<String> {
    let b = declared_batch(graph)?;
    let input = graph
        .inputs
        .first()
        .map(|&n| graph.node(n).name.clone())
        .unwrap_or_default();
    let symbolic = graph
        .metadata
        .get(crate::onnx::import::BATCH_KEY)
        .is_some_and(|v| v.starts_with("symbolic"));
    let onnx = path.extension().is_some_and(|e| e == "onnx");
    match (symbolic, onnx) {
        (true, true) => Some(format!(
            "note: input '{input}' declares a fixed batch of {b}; treating the batch as symbolic"
        )),
        (true, false) => None,
        (false, _) => Some(format!(
            "note: input '{input}' declares a fixed batch of {b} that the graph depends on; \
             other batch sizes run in chunks of {b}"
        )),
    }
}
