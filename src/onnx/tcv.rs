//! The `.tcv` file: an ONNX `ModelProto` (so Netron and the `onnx` package open it) with
//! tabconv's ops in the `ai.tabconv` domain, tables as initializers, and the format version and
//! producing pipeline in `metadata_props`. See docs/TCV-FORMAT.md.

use super::export::export_model;
use super::import::import_model_from;
use super::proto::read_model_proto;
use crate::error::{Error, Result};
use crate::ir::Graph;
use prost::Message;
use std::path::Path;

pub const FORMAT_VERSION: u32 = 1;
pub const KEY_VERSION: &str = "tabconv.format_version";
pub const KEY_PIPELINE: &str = "tabconv.pipeline";

/// Encode the graph as `.tcv` bytes. Deterministic: the same graph gives the same bytes.
pub fn encode(graph: &Graph, pipeline_yaml: &str) -> Result<Vec<u8>> {
    let mut meta: Vec<(String, String)> = vec![
        (KEY_VERSION.into(), FORMAT_VERSION.to_string()),
        (KEY_PIPELINE.into(), pipeline_yaml.to_string()),
    ];
    meta.extend(graph.metadata.iter().map(|(k, v)| (format!("tabconv.{k}"), v.clone())));
    Ok(export_model(graph, &meta)?.encode_to_vec())
}

/// Write atomically (see [`crate::output`]).
pub use crate::output::write_atomic;

pub fn write_tcv(graph: &Graph, pipeline_yaml: &str, path: &Path) -> Result<()> {
    write_atomic(path, &encode(graph, pipeline_yaml)?)
}

/// Read a `.tcv`, validating the format version and the `ai.tabconv` ops.
pub fn read_tcv(path: &Path) -> Result<Graph> {
    let model = read_model_proto(path)?;
    let merr = |msg: String| Error::Model { path: path.into(), msg };
    let meta = |k: &str| {
        model
            .metadata_props
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.clone())
    };
    let version = meta(KEY_VERSION).ok_or_else(|| {
        merr(format!(
            "not a .tcv file (no '{KEY_VERSION}' metadata); compile it with tabconv-compile"
        ))
    })?;
    match version.parse::<u32>() {
        Ok(v) if (1..=FORMAT_VERSION).contains(&v) => {}
        Ok(v) => {
            return Err(merr(format!(
                "format version {v} is newer than this tabconv understands ({FORMAT_VERSION})"
            )))
        }
        Err(_) => return Err(merr(format!("invalid format version '{version}'"))),
    }
    let mut graph = import_model_from(&model, path, false)?;
    graph.metadata.clear();
    for e in &model.metadata_props {
        if let Some(k) = e.key.strip_prefix("tabconv.") {
            if e.key != KEY_VERSION && e.key != KEY_PIPELINE {
                graph.metadata.insert(k.to_string(), e.value.clone());
            }
        }
    }
    Ok(graph)
}

/// The pipeline YAML recorded in a `.tcv`.
pub fn read_pipeline(path: &Path) -> Result<Option<String>> {
    let model = read_model_proto(path)?;
    Ok(model
        .metadata_props
        .iter()
        .find(|e| e.key == KEY_PIPELINE)
        .map(|e| e.value.clone()))
}
