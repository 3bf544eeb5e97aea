//! What `tabconv-compile` does, as one library call (the binary and the Python binding use it):
//! load an ONNX model, run a pipeline with calibration and validation data, write the `.tcv`
//! atomically (see [`crate::output`]) and report what happened.

use crate::dataset::{Images, Labelled, Labels, Preprocess};
use crate::error::{Error, Result};
use crate::ir::cost::{self, Cost};
use crate::ir::Graph;
use crate::output::Pending;
use crate::passes::manager::{run_pipeline, CompileReport};
use crate::passes::pipeline::{PassSpec, Pipeline};
use crate::passes::PassCx;
use ndarray::ArrayD;
use std::io::Write;
use std::path::PathBuf;

/// What a compile writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Emit {
    /// A `.tcv`, for tabconv's interpreter.
    Tcv,
    /// Standard ONNX: lookups lowered to MatMul/ArgMin/Gather/ReduceSum (see
    /// [`crate::onnx::lower`]); runs in ONNX Runtime and tract, not channels-last.
    Onnx,
}

impl Emit {
    /// The pipeline as it runs for this output: channels-last ops have no standard ONNX form, so
    /// `Onnx` drops the `channels-last` pass.
    pub fn adapt(self, pipeline: &mut Pipeline) {
        if self == Emit::Onnx {
            pipeline.passes.retain(|p| !matches!(p, PassSpec::ChannelsLast(_)));
        }
    }
}

/// One compile: `tabconv-compile MODEL -o OUTPUT --pipeline … --calib … --val … --val-labels …`.
pub struct Job {
    pub model: PathBuf,
    pub output: PathBuf,
    /// With its `--set` options applied.
    pub pipeline: Pipeline,
    pub emit: Emit,
    /// Calibration images (needed by pipelines that learn tables).
    pub calib: Option<Images>,
    /// Labelled validation images (accuracy-driven masking), with `val_labels`.
    pub val: Option<Images>,
    pub val_labels: Option<Labels>,
    /// `--normalize` / `--pad`, applied to `calib` and `val`.
    pub pre: Preprocess,
    /// Seed for everything random in the passes.
    pub seed: u64,
    /// Print progress on stderr as the compile goes: the note about a declared fixed batch, the
    /// pipeline, each pass, each layer learned, each masking step (see [`PassCx::verbose`]).
    pub verbose: bool,
    /// Set it to stop the compile at its next check ([`PassCx::cancel`]); no output is left.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// A finished compile: the `.tcv` is written.
#[derive(Debug)]
pub struct Compiled {
    pub model: PathBuf,
    pub output: PathBuf,
    pub output_bytes: usize,
    pub pipeline_yaml: String,
    /// The job's seed: with the model, the pipeline and the images, all a rerun needs to
    /// give the same bytes.
    pub seed: u64,
    pub report: CompileReport,
    /// Per image, of the model as loaded and as compiled.
    pub cost_before: Cost,
    pub cost_after: Cost,
    pub source_weight_bytes: u64,
}

impl Compiled {
    /// Arithmetic removed: (lookups only, everything counted), see [`cost::reduction`].
    pub fn reductions(&self) -> (f64, f64) {
        cost::reduction(&self.cost_before, &self.cost_after)
    }

    /// The JSON report (`tabconv-compile --report`).
    pub fn json(&self) -> serde_json::Value {
        let (lookups, all) = self.reductions();
        serde_json::json!({
            "model": self.model,
            "output": self.output,
            "output_bytes": self.output_bytes,
            "pipeline_yaml": self.pipeline_yaml,
            "seed": self.seed,
            "report": self.report,
            "cost_before": self.cost_before,
            "cost_after": self.cost_after,
            "reduction_lookups_only": lookups,
            "reduction_everything_counted": all,
            "source_weight_bytes": self.source_weight_bytes,
        })
    }
}

/// Run `job`. The output's temp file is created first, so an unwritable folder fails before the
/// work, and nothing appears at `job.output` unless the compile succeeds. `after_each(pass,
/// graph)` is called after every pass (`--dump-after`); an error it returns stops the compile.
pub fn compile(mut job: Job, after_each: impl FnMut(&str, &Graph) -> Result<()>) -> Result<Compiled> {
    job.emit.adapt(&mut job.pipeline);
    let mut output = Pending::create(&job.output)?;
    let mut graph = crate::onnx::load_model(&job.model)?;
    check_inputs(&job)?;
    let note = crate::model::batch_note(&graph, &job.model);
    if let Some(note) = note.filter(|_| job.verbose) {
        eprintln!("{note}");
    }
    let cost_before = cost::graph_cost(&graph);
    let source_weight_bytes = cost::weight_bytes(&graph);
    let metadata = [
        ("source_exact_macs", cost_before.exact_macs.to_string()),
        ("source_weight_bytes", source_weight_bytes.to_string()),
    ];
    graph.metadata.extend(metadata.map(|(k, v)| (k.to_string(), v)));
    let mut cx = PassCx {
        seed: job.seed,
        verbose: job.verbose,
        cancel: job.cancel.clone(),
        ..Default::default()
    };
    if let Some(images) = job.calib {
        let name = images.name();
        cx.calib = Some(check_images(images.load(job.pre)?, &name, &graph)?);
    }
    if let (Some(images), Some(labels)) = (job.val, job.val_labels) {
        let name = images.name();
        let (x, y) = Labelled::load(images, labels, job.pre)?.into_parts();
        cx.val = Some((check_images(x, &name, &graph)?, y));
    }
    if job.verbose {
        let names: Vec<&str> = job.pipeline.build().iter().map(|p| p.name()).collect();
        let (model, pipeline) = (job.model.display(), &job.pipeline.name);
        eprintln!("{model}: pipeline '{pipeline}' ({})", names.join(" → "));
    }
    let report = run_pipeline(&mut graph, &job.pipeline, &mut cx, after_each)?;
    let pipeline_yaml = job.pipeline.to_yaml();
    let bytes = match job.emit {
        Emit::Tcv => crate::onnx::tcv::encode(&graph, &pipeline_yaml)?,
        Emit::Onnx => crate::onnx::lower::encode(&graph, &pipeline_yaml)?,
    };
    output.file().write_all(&bytes).map_err(|e| Error::io(&job.output, e))?;
    output.commit()?;
    Ok(Compiled {
        model: job.model,
        output: job.output,
        output_bytes: bytes.len(),
        pipeline_yaml,
        seed: job.seed,
        report,
        cost_before,
        cost_after: cost::graph_cost(&graph),
        source_weight_bytes,
    })
}

/// What the pipeline's passes need from the job, checked once the model loads and before any
/// other work (a missing validation set would otherwise surface only after the minutes the
/// `lut` pass takes).
fn check_inputs(job: &Job) -> Result<()> {
    let passes = job.pipeline.build();
    let has = |name: &str| passes.iter().find(|p| p.name() == name).map(|p| p.params());
    if has("lut").is_some() && job.calib.is_none() {
        return Err(Error::Input(format!(
            "pipeline '{}' learns lookup tables (pass 'lut'): give calibration images with --calib X.npy (or use --pipeline exact)",
            job.pipeline.name
        )));
    }
    if job.val.is_some() != job.val_labels.is_some() {
        return Err(Error::Input(
            "--val and --val-labels go together: give both or neither".into(),
        ));
    }
    let needs_val = has("mask").is_some_and(|p| !p["max_accuracy_drop"].is_null());
    if needs_val && job.val.is_none() {
        return Err(Error::Input(
            "mask.max_accuracy_drop measures accuracy: give labelled validation images with --val X.npy --val-labels Y.npy".into(),
        ));
    }
    Ok(())
}

/// Calibration and validation images must be there, be finite and fit the model's (first)
/// input; `name` (their file) names them in the error.
fn check_images(x: ArrayD<f32>, name: &str, graph: &Graph) -> Result<ArrayD<f32>> {
    if x.is_empty() || x.shape().first().is_none_or(|&n| n == 0) {
        return Err(Error::Input(format!("{name}: the calibration set is empty")));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::Input(format!("{name}: value #{i} is not finite (NaN or Inf)")));
    }
    let input = graph.inputs.first().map(|n| graph.node(*n));
    if let Some(f) = input.and_then(|n| n.outputs[0].fact.as_ref()) {
        let fits = x.ndim() == f.rank()
            && x.shape()
                .iter()
                .zip(&f.shape)
                .skip(1)
                .all(|(&d, want)| want.known().is_none_or(|k| k == d as i64));
        if !fits {
            return Err(Error::Input(format!(
                "{name}: calibration shape {:?} does not fit the model input {}",
                x.shape(),
                f.shape_string()
            )));
        }
    }
    Ok(x)
}
