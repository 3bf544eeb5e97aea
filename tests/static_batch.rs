//! Models that declare a fixed batch of 1 (`torch.onnx.export` without dynamic axes), from both
//! exporters: the batch becomes symbolic when the graph allows it, otherwise inputs run in
//! chunks of the fixed size; run, eval-style batches, calibration and bench all see every image.
//! Fixtures: `fixtures/static_batch.py` (ONNX Runtime references, one image at a time).

mod common;
use common::*;
use ndarray::Axis;
use tabconv::interp::{run, Plan};
use tabconv::ir::{Dim, Tensor};
use tabconv::onnx::{batch_note, import::BATCH_KEY};
use tabconv::passes::{manager::run_pipeline, pipeline::Pipeline, PassCx};

fn leading(g: &tabconv::ir::Graph) -> Dim {
    g.node(g.inputs[0]).outputs[0].fact.as_ref().unwrap().shape[0]
}

#[test]
fn both_exporters_get_a_symbolic_batch_and_match_ort() {
    let x = npy("expected/static_input.npy");
    assert_eq!(x.shape()[0], 4);
    for name in ["legacy", "dynamo"] {
        let g = tabconv::model::load(&fixture(&format!("models/static_{name}.onnx"))).unwrap();
        assert_eq!(leading(&g), Dim::Batch(1), "{name}");
        assert_eq!(
            g.metadata.get(BATCH_KEY).map(String::as_str),
            Some("symbolic (declared 1)")
        );
        assert!(batch_note(&g).unwrap().contains("symbolic"));
        // one batch of 4, not four runs: the plan's input accepts it as is
        let y = as_f32(&run(&g, vec![Tensor::F32(x.clone())]).unwrap()[0]);
        let want = npy(&format!("expected/static_{name}_ort.npy"));
        assert!(rel_err(&y, &want) < 1e-4, "{name}: {}", rel_err(&y, &want));
    }
}

#[test]
fn a_graph_that_needs_its_batch_runs_in_chunks() {
    let x = npy("expected/static_input.npy");
    let g = tabconv::model::load(&fixture("models/static_mixed.onnx")).unwrap();
    assert_eq!(
        leading(&g),
        Dim::Known(1),
        "the graph reshapes the one image's channels into rows"
    );
    assert_eq!(g.metadata.get(BATCH_KEY).map(String::as_str), Some("fixed 1"));
    let y = as_f32(&run(&g, vec![Tensor::F32(x.clone())]).unwrap()[0]);
    assert_eq!(y.shape(), [4, 10]);
    let want = npy("expected/static_mixed_ort.npy");
    assert!(rel_err(&y, &want) < 1e-4, "{}", rel_err(&y, &want));
    // chunking is exactly running each image alone
    for i in 0..4 {
        let xi = x.index_axis(Axis(0), i).insert_axis(Axis(0)).to_owned();
        let yi = as_f32(&run(&g, vec![Tensor::F32(xi)]).unwrap()[0]);
        assert_eq!(yi.index_axis(Axis(0), 0), y.index_axis(Axis(0), i), "image {i}");
    }
    // an odd count pads the last chunk and drops its outputs
    let three = x.slice_axis(Axis(0), (0..3).into()).to_owned();
    let y3 = as_f32(&run(&g, vec![Tensor::F32(three)]).unwrap()[0]);
    assert_eq!(y3, y.slice_axis(Axis(0), (0..3).into()));
}

#[test]
fn calibration_with_many_images_works_on_static_exports() {
    let calib = npy("data/mnist_calib.npy");
    assert!(calib.shape()[0] > 1);
    let pipeline = Pipeline::find("tabconv").unwrap();
    for name in ["legacy", "dynamo", "mixed"] {
        let mut g = tabconv::model::load(&fixture(&format!("models/static_{name}.onnx"))).unwrap();
        let mut cx = PassCx {
            calib: Some(calib.clone()),
            ..Default::default()
        };
        run_pipeline(&mut g, &pipeline, &mut cx, |_, _| Ok(())).unwrap_or_else(|e| panic!("{name}: {e}"));
        let x = npy("expected/static_input.npy");
        let y = as_f32(&run(&g, vec![Tensor::F32(x)]).unwrap()[0]);
        assert_eq!(y.shape(), [4, 10], "{name}");
    }
}

#[test]
fn bench_times_the_batch_it_reports() {
    let g = tabconv::model::load(&fixture("models/static_mixed.onnx")).unwrap();
    let x = tabconv::bench::synthetic_input(&g, 8).unwrap();
    assert_eq!(x.shape()[0], 8, "eight images even though the model fixes one");
    let out = Plan::new(&g).unwrap().run(vec![Tensor::F32(x)]).unwrap();
    assert_eq!(out[0].shape()[0], 8, "every image ran");
    assert_eq!(tabconv::bench::fixed_batch(&g), Some(1));
    let t = tabconv::bench::bench_ours(
        &g,
        &fixture("models/static_mixed.onnx"),
        8,
        5,
        std::time::Duration::from_millis(50),
    )
    .unwrap();
    assert_eq!(t.batch, 8);
}
