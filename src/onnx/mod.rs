//! ONNX (and, later, `.tcv`) reading: protobuf decoding through `tract_onnx::pb` (prost
//! messages), external tensor data, and import into the IR with opset quirks resolved.

pub mod attrs;
pub mod export;
pub mod import;
pub mod lower;
pub mod proto;
pub mod tcv;

pub use import::{import_model, load_model};
