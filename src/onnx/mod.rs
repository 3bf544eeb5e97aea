//! ONNX and `.tcv` reading and writing: the protobuf messages (`pb`, declared with prost),
//! decoding with external tensor data, import into the IR with opset quirks resolved, and export.

pub mod attrs;
pub mod export;
pub mod import;
pub mod lower;
pub mod pb;
pub mod proto;
pub mod tcv;

pub use import::{import_model, load_model};
