//! Named analyses: what a pass knows about the graph it rewrote that the graph itself no longer
//! says, recorded for the passes after it. Each analysis is one type with one writer; readers
//! ask it questions about the current graph instead of reading loose fields of
//! [`PassCx`](super::PassCx).

use super::lut::{ExactLayer, LayerReport, Options};
use crate::error::{Error, Result};
use crate::ir::Graph;
use std::collections::BTreeMap;

/// The analyses of the graph being compiled.
#[derive(Default)]
pub struct Analyses {
    /// Written by `lut`; read by `mask` (which restores and relearns layers) and the compile
    /// report. `None` until a `lut` pass ran.
    pub lut: Option<LutLayers>,
}

/// The layers the `lut` pass replaced by lookups: how to put each exact layer back (its weight,
/// bias and im2col are gone from the graph), what fitting it measured, and the options it ran
/// with. Several `lut` runs add to one record.
pub struct LutLayers {
    /// The options of the latest `lut` run (the `mask` pass relearns with them unless it is given
    /// its own).
    pub options: Options,
    /// Per `LutMatMul` node, by name.
    exact: BTreeMap<String, ExactLayer>,
    /// Per layer replaced, in the order they were replaced (the compile report's `lut_layers`).
    reports: Vec<LayerReport>,
}

impl LutLayers {
    pub fn new(options: Options) -> LutLayers {
        LutLayers {
            options,
            exact: BTreeMap::new(),
            reports: Vec::new(),
        }
    }

    /// Records that `LutMatMul` node `lut` replaced the exact layer `exact`, fitted as `report`.
    pub fn replaced(&mut self, lut: String, exact: ExactLayer, report: LayerReport) {
        self.exact.insert(lut, exact);
        self.reports.push(report);
    }

    /// Adds what `other` recorded (a `lut` run over single layers) to this record.
    pub fn absorb(&mut self, other: LutLayers) {
        self.exact.extend(other.exact);
        self.reports.extend(other.reports);
    }

    /// The `LutMatMul` nodes of this record still in `graph` (a later pass may have restored or
    /// removed some), by name in sorted order.
    pub fn live(&self, graph: &Graph) -> Vec<String> {
        self.exact.keys().filter(|n| graph.find(n).is_some()).cloned().collect()
    }

    /// How to put back the exact layer of `LutMatMul` node `lut`.
    pub fn exact(&self, lut: &str) -> Result<&ExactLayer> {
        self.exact
            .get(lut)
            .ok_or_else(|| Error::Other(format!("{lut}: not a LUT layer the lut pass recorded")))
    }

    /// The `LutMatMul` node of this record that replaced the layer whose MatMul was `matmul`
    /// and is still in `graph`.
    pub fn live_lut_of(&self, graph: &Graph, matmul: &str) -> Option<&str> {
        self.exact
            .iter()
            .find(|(n, ex)| ex.matmul == matmul && graph.find(n).is_some())
            .map(|(n, _)| n.as_str())
    }

    /// Every recorded `LutMatMul` node and its exact layer, by name.
    pub fn layers(&self) -> impl Iterator<Item = (&str, &ExactLayer)> {
        self.exact.iter().map(|(n, e)| (n.as_str(), e))
    }

    /// The fitting reports, in the order the layers were replaced.
    pub fn reports(&self) -> &[LayerReport] {
        &self.reports
    }

    /// The latest fitting report of the layer whose `MatMul` was `matmul`.
    pub fn report_of(&self, matmul: &str) -> Option<&LayerReport> {
        self.reports.iter().rev().find(|l| l.node == matmul)
    }
}
