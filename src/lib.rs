//! tabconv: compile ONNX CNNs into product-quantized table-lookup models.
//!
//! Data flow: `onnx` (decode + import) → `ir::Graph` → `passes` → `interp` (execute).
//! See docs/ARCHITECTURE.md for the map of modules and their invariants.

pub mod bench;
pub mod cli;
pub mod data;
pub mod dataset;
pub mod error;
pub mod interp;
pub mod ir;
pub mod limits;
pub mod model;
pub mod onnx;
pub mod output;
pub mod passes;
pub mod plot;
pub mod pq;

pub use error::{Error, Result};
