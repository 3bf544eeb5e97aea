//! The intermediate representation: graph, ops, tensors, facts, shape inference and the dump.

pub mod cost;
pub mod dump;
pub mod fact;
pub mod graph;
pub mod infer;
pub mod op;
pub mod tensor;
pub mod window;

pub use fact::{Dim, Fact};
pub use graph::{Graph, Node, Outlet, Value, Wire};
pub use op::Op;
pub use tensor::{DType, Tensor};
