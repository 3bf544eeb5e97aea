//! tabconv: compile ONNX CNNs into product-quantized table-lookup models.
//!
//! Data flow: `onnx` (decode + import) → `ir::Graph` → `passes` → `interp` (execute).
//! See docs/ARCHITECTURE.md for the map of modules and their invariants.
//!
//! # Example: compile a model, save it, run it
//!
//! What `tabconv-compile model.onnx -o model.tcv --calib images.npy --set …` and `tabconv run`
//! do, from Rust (this example runs as a test):
//!
//! ```
//! use ndarray::{s, Axis};
//! use tabconv::interp::Plan;
//! use tabconv::ir::Tensor;
//! use tabconv::passes::{manager::run_pipeline, pipeline::Pipeline, PassCx};
//!
//! # fn main() -> tabconv::Result<()> {
//! // An ONNX model (external data is read from the model's own folder only).
//! let mut graph = tabconv::model::load("fixtures/models/lenet5.onnx".as_ref())?;
//! // The built-in default pipeline (passes/tabconv.yaml), with an option as `--set` gives it:
//! // keep layers as lookups while the logits keep a mean cosine of 0.99 with the exact model's.
//! let mut pipeline = Pipeline::find("tabconv")?;
//! pipeline.set("mask.min_logit_cosine=0.99")?;
//! // Calibration images, as the model reads them: float32 [N, 1, 28, 28].
//! let images = tabconv::data::read_f32("fixtures/data/mnist_calib.npy".as_ref())?;
//! let mut cx = PassCx {
//!     calib: Some(images.slice_axis(Axis(0), (0..128).into()).to_owned()),
//!     ..Default::default()
//! };
//! let report = run_pipeline(&mut graph, &pipeline, &mut cx, |_pass, _graph| Ok(()))?;
//! println!("{} LUT layers, {} → {} nodes", report.lut_layers.len(), report.nodes_before, report.nodes_after);
//!
//! // Save the compiled model, load it back as `tabconv run` does, and run a batch of 4.
//! let dir = std::env::temp_dir().join(format!("tabconv-example-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).map_err(|e| tabconv::Error::io(&dir, e))?;
//! let path = dir.join("lenet5.tcv");
//! tabconv::onnx::tcv::write_tcv(&graph, &pipeline.to_yaml(), &path)?;
//! let model = tabconv::model::load_for_run(&path)?;
//! let plan = Plan::new(&model)?;
//! let batch = images.slice(s![0..4, .., .., ..]).to_owned().into_dyn();
//! let outputs = plan.run(vec![Tensor::F32(batch)])?;
//! let logits = outputs[0].as_f32()?;
//! assert_eq!(logits.shape(), &[4, 10]);
//! let predicted = tabconv::model::argmax_rows(logits);
//! println!("classes of the first 4 images: {predicted:?}");
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```

pub mod alloc;
/// The unit tests allocate as the binaries do (blocks of 4 KiB or more on 64-byte boundaries),
/// so the kernels' throughput measurements — `#[ignore]`d tests that `docs/bench.sh` runs, never
/// CI — time the alignment the binaries run with. (Their times still vary by up to a third from
/// one process to the next on a shared VM: compare the fastest of several processes.)
#[cfg(test)]
#[global_allocator]
static ALLOC: alloc::CacheAligned = alloc::CacheAligned;
pub mod bench;
pub mod calib;
pub mod cli;
pub mod compile;
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
