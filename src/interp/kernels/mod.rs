//! Numeric kernels. Kernels take slices and plain numbers, never the graph.

pub mod conv;
pub mod elementwise;
pub mod encode;
pub mod gemm;
pub mod im2col;
pub mod lut;
pub mod pool;
pub mod shape_ops;
