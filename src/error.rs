//! Typed errors at the boundaries (file I/O, ONNX import, graph verification, execution).
//! Every message names what failed: the file, the node and op, and what was wrong.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model file that could not be decoded or is structurally invalid.
    #[error("{path}: {msg}")]
    Model { path: PathBuf, msg: String },
    /// One or more ONNX ops tabconv does not implement, reported together.
    #[error("{path}: unsupported operator(s) (opset {opset}): {}", list.join("; "))]
    Unsupported {
        path: PathBuf,
        opset: i64,
        list: Vec<String>,
    },
    /// A problem tied to a single node of the graph.
    #[error("node {node} ({op}): {msg}")]
    Node { node: String, op: String, msg: String },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn node(node: impl Into<String>, op: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Node {
            node: node.into(),
            op: op.into(),
            msg: msg.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    /// This error, prefixed with the model file it happened in (a run-time error).
    pub fn in_model(self, path: impl Into<PathBuf>) -> Self {
        Error::Model {
            path: path.into(),
            msg: self.to_string(),
        }
    }
}

/// Shorthand for an error without a node attached yet (callers add node context).
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::Other(format!($($arg)*))) };
}
