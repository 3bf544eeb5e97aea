//! Runs a pipeline: after every pass, shapes are re-inferred and the graph verified; a failure
//! names the pass (and its position) that broke the graph. Each pass is timed and summarised
//! (nodes added/removed, MACs before/after) for the compile report.

use super::pipeline::{PassSpec, Pipeline};
use super::PassCx;
use crate::error::{Error, Result};
use crate::ir::{cost, infer::infer_graph, Graph, Op};
use ndarray::{ArrayD, Axis};
use serde::Serialize;
use std::collections::BTreeSet;
use std::time::Instant;

/// When the pipeline learns tables and then masks, the last quarter of the calibration images
/// (at most [`super::mask::Options::measured_samples`]: 1024 for the default unlabelled target,
/// 256 for the others) is held out from learning for the mask to measure on
/// ([`PassCx::holdout`]); with fewer than 16 images everything is used for both.
fn split_holdout(x: ArrayD<f32>, pipeline: &Pipeline) -> (ArrayD<f32>, Option<ArrayD<f32>>) {
    let learns = pipeline.passes.iter().any(|p| matches!(p, PassSpec::Lut(_)));
    let samples = pipeline.passes.iter().find_map(|p| match p {
        PassSpec::Mask(o) => Some(
            o.as_ref()
                .map_or(super::mask::Options::default().measured_samples(), |o| {
                    o.measured_samples()
                }),
        ),
        _ => None,
    });
    let n = x.shape()[0];
    let Some(samples) = samples.filter(|_| learns && n >= 16) else {
        return (x, None);
    };
    let h = (n / 4).min(samples.max(1));
    let fit = x.slice_axis(Axis(0), (0..n - h).into()).to_owned();
    let holdout = x.slice_axis(Axis(0), (n - h..n).into()).to_owned();
    (fit, Some(holdout))
}

#[derive(Clone, Debug, Serialize)]
pub struct PassReport {
    pub pass: String,
    pub params: serde_json::Value,
    pub millis: f64,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub added: usize,
    pub removed: usize,
    pub macs_before: u64,
    pub macs_after: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompileReport {
    pub pipeline: String,
    pub passes: Vec<PassReport>,
    pub notes: Vec<String>,
    pub lut_layers: Vec<super::lut::LayerReport>,
    pub mask: Option<super::mask::MaskReport>,
    /// The `lut` pass's global distillation stage, when it ran (the last run, e.g. the mask
    /// pass's relearning).
    pub global: Option<crate::calib::global::Report>,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub macs_before: u64,
    pub macs_after: u64,
}

/// Total MACs per image over all nodes.
pub fn total_macs(graph: &Graph) -> u64 {
    graph.g.node_indices().map(|n| cost::node_macs(graph, n)).sum()
}

fn names(graph: &Graph) -> BTreeSet<String> {
    graph
        .g
        .node_weights()
        .filter(|n| !matches!(n.op, Op::Input | Op::Const(_)))
        .map(|n| n.name.clone())
        .collect()
}

/// Run `pipeline` on `graph`. `after_each(pass_name, graph)` is called after every pass (used by
/// `--dump-after`).
pub fn run_pipeline(
    graph: &mut Graph,
    pipeline: &Pipeline,
    cx: &mut PassCx,
    mut after_each: impl FnMut(&str, &Graph) -> Result<()>,
) -> Result<CompileReport> {
    let (nodes_before, macs_before) = (graph.op_count(), total_macs(graph));
    // a holdout the caller set stays as it is
    if cx.holdout.is_none() {
        if let Some(x) = cx.calib.take() {
            let (fit, holdout) = split_holdout(x, pipeline);
            cx.calib = Some(fit);
            cx.holdout = holdout;
        }
    }
    let mut passes = Vec::new();
    for (i, pass) in pipeline.build().iter().enumerate() {
        let label = format!("pass '{}' (#{} of pipeline '{}')", pass.name(), i + 1, pipeline.name);
        let before = names(graph);
        let (n0, m0) = (graph.op_count(), total_macs(graph));
        let start = Instant::now();
        cx.check_cancel()?;
        pass.run(graph, cx)
            .map_err(|e| Error::Other(format!("{label} failed: {e}")))?;
        infer_graph(graph).map_err(|e| Error::Other(format!("{label} broke shape inference: {e}")))?;
        graph
            .verify()
            .map_err(|e| Error::Other(format!("{label} broke the graph: {e}")))?;
        let millis = start.elapsed().as_secs_f64() * 1e3;
        let after = names(graph);
        passes.push(PassReport {
            pass: pass.name().to_string(),
            params: pass.params(),
            millis,
            nodes_before: n0,
            nodes_after: graph.op_count(),
            added: after.difference(&before).count(),
            removed: before.difference(&after).count(),
            macs_before: m0,
            macs_after: total_macs(graph),
        });
        if cx.verbose {
            let p = passes.last().expect("just pushed");
            eprintln!(
                "  pass {:<18} {:>10.1} ms   nodes {} → {}   MACs/image {} → {}",
                p.pass, p.millis, p.nodes_before, p.nodes_after, p.macs_before, p.macs_after
            );
        }
        after_each(pass.name(), graph)?;
    }
    Ok(CompileReport {
        pipeline: pipeline.name.clone(),
        passes,
        notes: cx.notes.clone(),
        lut_layers: cx
            .analyses
            .lut
            .as_ref()
            .map(|l| l.reports().to_vec())
            .unwrap_or_default(),
        mask: cx.mask.clone(),
        global: cx.global.clone(),
        nodes_before,
        nodes_after: graph.op_count(),
        macs_before,
        macs_after: total_macs(graph),
    })
}
