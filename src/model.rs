//! Loading a model file by extension.

use crate::error::{Error, Result};
use crate::ir::Graph;
use std::path::Path;

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
