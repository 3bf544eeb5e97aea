//! Models whose ONNX file fixes the batch (`torch.onnx.export` without `dynamic_axes`): the
//! importer makes the batch symbolic when the graph allows it, and otherwise the interpreter runs
//! other batch sizes in chunks of the fixed batch (fixtures: fixtures/static_batch.py).

mod common;
use common::*;
use ndarray::{ArrayD, Axis, IxDyn, Slice};
use std::process::Command;
use tabconv::interp::Plan;
use tabconv::ir::{DType, Dim, Fact, Graph, Op, Tensor};

/// Files whose batch of 1 becomes symbolic (the ViTs: attention's reshapes and transposes,
/// which move the batch to axis 1, and a class token concatenated to the batch's tokens).
const SYMBOLIC: [&str; 4] = [
    "static_legacy",
    "static_dynamo",
    "static_vit_legacy",
    "static_vit_dynamo",
];
const ALL: [&str; 5] = [
    "static_legacy",
    "static_dynamo",
    "static_mixed",
    "static_vit_legacy",
    "static_vit_dynamo",
];

fn load(name: &str) -> Graph {
    tabconv::model::load(&fixture(&format!("models/{name}.onnx"))).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn input_dim0(g: &Graph) -> Dim {
    g.node(g.inputs[0]).outputs[0].fact.as_ref().unwrap().shape[0]
}

fn rows(x: &ArrayD<f32>, r: std::ops::Range<usize>) -> ArrayD<f32> {
    x.slice_axis(Axis(0), Slice::from(r)).to_owned()
}

fn run1(g: &Graph, x: ArrayD<f32>) -> Result<ArrayD<f32>, tabconv::Error> {
    Plan::new(g)?.run(vec![Tensor::F32(x)])?.remove(0).into_f32()
}

/// The first `n` MNIST test images and labels, written as `.npy` files in `dir`.
fn mnist_subset(dir: &std::path::Path, n: usize) -> (std::path::PathBuf, std::path::PathBuf, Vec<i64>) {
    let x = rows(&npy("data/mnist_test.npy"), 0..n);
    let labels = tabconv::data::read_labels(&fixture("data/mnist_test_labels.npy")).unwrap()[..n].to_vec();
    let (xp, yp) = (dir.join("x.npy"), dir.join("y.npy"));
    tabconv::data::write_npy(&xp, &Tensor::F32(x)).unwrap();
    tabconv::data::write_npy(&yp, &Tensor::i64_vec(labels.clone())).unwrap();
    (xp, yp, labels)
}

#[test]
fn exported_static_batch_becomes_symbolic_and_a_batch_dependent_graph_stays_fixed() {
    for name in SYMBOLIC {
        let g = load(name);
        assert_eq!(
            g.metadata.get("batch").map(String::as_str),
            Some("symbolic (declared 1)"),
            "{name}"
        );
        assert_eq!(input_dim0(&g), Dim::Batch(1), "{name}");
        let out = g.fact(g.outputs[0].1).unwrap();
        assert_eq!(out.shape_string(), "f32[N,10]", "{name}");
        assert_eq!(tabconv::interp::fixed_batch(&g), None, "{name}");
    }
    let g = load("static_mixed");
    assert_eq!(g.metadata.get("batch").map(String::as_str), Some("fixed 1"));
    assert_eq!(input_dim0(&g), Dim::Known(1));
    assert_eq!(tabconv::interp::fixed_batch(&g), Some(1));
    // Files that declare a symbolic batch are imported as before, without the key.
    let g = tabconv::model::load(&fixture("models/lenet5.onnx")).unwrap();
    assert!(!g.metadata.contains_key("batch"));
}

#[test]
fn four_images_match_onnx_runtime() {
    let x = npy("expected/static_input.npy");
    assert_eq!(x.shape()[0], 4);
    for name in ALL {
        let g = load(name);
        let got = run1(&g, x.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = npy(&format!("expected/{name}_ort.npy"));
        let err = rel_err(&got, &want);
        assert!(err <= 1e-4, "{name}: error {err} against ONNX Runtime");
    }
}

#[test]
fn cli_run_prints_the_note_and_matches_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    for (name, note) in [
        (
            "static_dynamo",
            "declares a fixed batch of 1; treating the batch as symbolic",
        ),
        (
            "static_mixed",
            "declares a fixed batch of 1 that the graph depends on; other batch sizes run in chunks of 1",
        ),
    ] {
        let y = dir.path().join(format!("{name}.npy"));
        let out = Command::new(env!("CARGO_BIN_EXE_tabconv"))
            .args(["run", fixture(&format!("models/{name}.onnx")).to_str().unwrap()])
            .args(["--input", fixture("expected/static_input.npy").to_str().unwrap()])
            .args(["--output", y.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        assert_eq!(stderr.lines().filter(|l| l.starts_with("note:")).count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("note: input 'input' {note}")),
            "{name}: {stderr}"
        );
        let got = tabconv::data::read_f32(&y).unwrap();
        assert!(
            rel_err(&got, &npy(&format!("expected/{name}_ort.npy"))) <= 1e-4,
            "{name}"
        );
    }
}

#[test]
fn batch_dependent_model_runs_many_images_in_chunks_like_one_by_one() {
    let g = load("static_mixed");
    let x = rows(&npy("data/mnist_test.npy"), 0..7);
    let all = run1(&g, x.clone()).unwrap();
    assert_eq!(all.shape(), &[7, 10]);
    for i in 0..7 {
        let one = run1(&g, rows(&x, i..i + 1)).unwrap();
        assert_eq!(rows(&all, i..i + 1), one, "image {i}");
    }
}

/// `[B, 3] · W` with a fixed batch `B`, and a second output that mixes the batch into one row.
fn fixed_batch_graph(b: i64, mixing_output: bool) -> (Graph, ArrayD<f32>) {
    let mut g = Graph::new();
    let x = g.add_node("x", Op::Input, &[]);
    g.node_mut(x).outputs[0].fact = Some(Fact::new(DType::F32, vec![Dim::Known(b), Dim::Known(3)]));
    g.inputs.push(x);
    let w = ArrayD::from_shape_vec(IxDyn(&[3, 2]), vec![1.0, -2.0, 0.5, 3.0, -1.0, 0.25]).unwrap();
    let wc = g.add_const("w", Tensor::F32(w.clone()));
    let y = g.add_op("mm", Op::MatMul, &[tabconv::ir::Outlet::new(x, 0), wc]);
    g.outputs.push(("y".into(), y));
    if mixing_output {
        let shape = g.add_const("shape", Tensor::i64_vec(vec![1, -1]));
        let r = g.add_op("mix", Op::Reshape { allowzero: false }, &[y, shape]);
        let t = g.add_op("t", Op::Transpose { perm: None }, &[r]);
        g.outputs.push(("mixed".into(), t));
    }
    tabconv::ir::infer::infer_graph(&mut g).unwrap();
    g.verify().unwrap();
    (g, w)
}

#[test]
fn fixed_batch_above_one_pads_the_last_chunk_and_drops_the_padding() {
    let (g, w) = fixed_batch_graph(2, false);
    let x = ArrayD::from_shape_fn(IxDyn(&[5, 3]), |i| (i[0] * 3 + i[1]) as f32 * 0.5 - 2.0);
    let got = run1(&g, x.clone()).unwrap();
    let x2 = x.into_dimensionality::<ndarray::Ix2>().unwrap();
    let w2 = w.into_dimensionality::<ndarray::Ix2>().unwrap();
    assert_eq!(got, x2.dot(&w2).into_dyn());
}

#[test]
fn output_without_the_fixed_batch_leading_is_a_clear_error() {
    let (g, _) = fixed_batch_graph(2, true);
    let plan = Plan::new(&g).unwrap();
    // Exactly the fixed batch runs as is.
    let outs = plan.run(vec![Tensor::F32(ArrayD::ones(IxDyn(&[2, 3])))]).unwrap();
    assert_eq!(outs[1].shape(), &[4, 1]);
    let err = plan
        .run(vec![Tensor::F32(ArrayD::ones(IxDyn(&[4, 3])))])
        .unwrap_err()
        .to_string();
    for needle in ["fixed batch of 2", "output 'mixed'", "[4, 1]", "cannot run 4 images"] {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    // Other shape mismatches are still reported as before.
    let err = plan
        .run(vec![Tensor::F32(ArrayD::ones(IxDyn(&[4, 5])))])
        .unwrap_err()
        .to_string();
    assert!(err.contains("input 'x' expects f32[2,3]"), "{err}");
}

#[test]
fn graphs_that_work_across_the_batch_are_not_per_image() {
    let per_image = |op: Op| {
        let mut g = Graph::new();
        let x = g.add_node("x", Op::Input, &[]);
        g.node_mut(x).outputs[0].fact = Some(Fact::new(DType::F32, vec![Dim::Batch(1), Dim::Known(3)]));
        g.inputs.push(x);
        let y = g.add_op("op", op, &[tabconv::ir::Outlet::new(x, 0)]);
        g.outputs.push(("y".into(), y));
        tabconv::ir::infer::infer_graph(&mut g).unwrap();
        tabconv::onnx::import::batch_is_per_image(&g)
    };
    assert!(per_image(Op::Softmax { axis: 1, log: false }).is_ok());
    let e = per_image(Op::Softmax { axis: 0, log: false }).unwrap_err();
    assert!(e.contains("across the batch axis (axis 0)"), "{e}");
    // a value may hold the batch elsewhere, an output must lead with it
    let e = per_image(Op::Transpose { perm: None }).unwrap_err();
    assert!(e.contains("does not lead with the batch"), "{e}");
    // `[N, 3]` transposed to `[3, N]`, then `op`, then (when it keeps the shape) back
    let moved = |op: Op, back: bool| {
        let mut g = Graph::new();
        let x = g.add_node("x", Op::Input, &[]);
        g.node_mut(x).outputs[0].fact = Some(Fact::new(DType::F32, vec![Dim::Batch(1), Dim::Known(3)]));
        g.inputs.push(x);
        let t = g.add_op("t", Op::Transpose { perm: None }, &[tabconv::ir::Outlet::new(x, 0)]);
        let mut ins = vec![t];
        if let Op::Reshape { .. } = op {
            ins.push(g.add_const("target", Tensor::i64_vec(vec![-1, 3])));
        }
        let mut y = g.add_op("op", op, &ins);
        if back {
            y = g.add_op("back", Op::Transpose { perm: None }, &[y]);
        }
        g.outputs.push(("y".into(), y));
        tabconv::ir::infer::infer_graph(&mut g).unwrap();
        tabconv::onnx::import::batch_is_per_image(&g)
    };
    assert!(moved(Op::Softmax { axis: 0, log: false }, true).is_ok());
    let e = moved(Op::Softmax { axis: 1, log: false }, true).unwrap_err();
    assert!(
        e.contains("'op'") && e.contains("across the batch axis (axis 1)"),
        "{e}"
    );
    // `[3, N] → [N, 3]` by a reshape mixes the images' values
    let e = moved(Op::Reshape { allowzero: false }, false).unwrap_err();
    assert!(e.contains("'op' (Reshape) works across the batch axis"), "{e}");
    let e = per_image(Op::ReduceMean {
        axes: Some(vec![0]),
        keepdims: true,
    })
    .unwrap_err();
    assert!(e.contains("f32[1,3]"), "{e}");

    // x · N (the batch size as a value) is 1·x in the file: not per image.
    let mut g = Graph::new();
    let x = g.add_node("x", Op::Input, &[]);
    g.node_mut(x).outputs[0].fact = Some(Fact::new(DType::F32, vec![Dim::Batch(1), Dim::Known(3)]));
    g.inputs.push(x);
    let x = tabconv::ir::Outlet::new(x, 0);
    let shape = g.add_op("shape", Op::Shape { start: 0, end: Some(1) }, &[x]);
    let n = g.add_op("n", Op::Cast { to: DType::F32 }, &[shape]);
    let y = g.add_op("scaled", Op::Binary(tabconv::ir::op::Binary::Mul), &[x, n]);
    g.outputs.push(("y".into(), y));
    tabconv::ir::infer::infer_graph(&mut g).unwrap();
    let e = tabconv::onnx::import::batch_is_per_image(&g).unwrap_err();
    assert!(e.contains("'n'"), "{e}");
}

#[test]
fn eval_takes_many_images_in_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (xp, yp, labels) = mnist_subset(dir.path(), 100);
    for name in ALL {
        let model = fixture(&format!("models/{name}.onnx"));
        let out = Command::new(env!("CARGO_BIN_EXE_tabconv"))
            .args(["eval", model.to_str().unwrap(), "--json", "--batch", "64"])
            .args(["--inputs", xp.to_str().unwrap(), "--labels", yp.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
        assert_eq!(v["samples"], 100);
        // The same count as running the images one at a time.
        let g = load(name);
        let x = tabconv::data::read_f32(&xp).unwrap();
        let correct = (0..100)
            .filter(|&i| {
                let y = run1(&g, rows(&x, i..i + 1)).unwrap();
                tabconv::model::argmax_rows(&y)[0] == labels[i]
            })
            .count();
        assert_eq!(v["correct"], correct, "{name}");
        if name != "static_mixed" {
            assert!(correct >= 90, "{name}: {correct}/100");
        }
    }
}

#[test]
fn compile_calibrates_on_many_images_and_the_tcv_keeps_the_batch_handling() {
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib.npy");
    tabconv::data::write_npy(&calib, &Tensor::F32(rows(&npy("data/mnist_calib.npy"), 0..48))).unwrap();
    let x = npy("expected/static_input.npy");
    for name in ALL {
        let tcv = dir.path().join(format!("{name}.tcv"));
        let out = Command::new(env!("CARGO_BIN_EXE_tabconv-compile"))
            .arg(fixture(&format!("models/{name}.onnx")))
            .args(["-o", tcv.to_str().unwrap(), "--calib", calib.to_str().unwrap()])
            // these small layers run faster exact: keep them as lookups anyway, to test them;
            // fitted on 36 images, they reach a logit cosine of about 0.98 on the 12 held out
            .args(["--set", "mask.restore_unprofitable=false"])
            .args(["--set", "mask.min_logit_cosine=0.95"])
            .args(["--set", "mask.max_expected_drop=null"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        assert!(
            stderr.contains("note: input 'input' declares a fixed batch of 1"),
            "{name}: {stderr}"
        );
        let g = tabconv::model::load(&tcv).unwrap();
        let lut = g
            .topo_order()
            .unwrap()
            .into_iter()
            .filter(|&n| matches!(g.node(n).op, Op::LutMatMul { .. }))
            .count();
        assert!(lut > 0, "{name}: no layer became a table lookup");
        let fixed = name == "static_mixed";
        assert_eq!(tabconv::interp::fixed_batch(&g), fixed.then_some(1), "{name}");
        let y = run1(&g, x.clone()).unwrap();
        assert_eq!(y.shape(), &[4, 10], "{name}");
        // The four images at once give what each gives alone.
        for i in 0..4 {
            let one = run1(&g, rows(&x, i..i + 1)).unwrap();
            assert!(rel_err(&rows(&y, i..i + 1), &one) <= 1e-5, "{name}: image {i}");
        }
        // The approximation keeps the exact model's predictions on these images (not the ViTs:
        // every linear layer of theirs as lookups, fitted on 48 images, is too rough for that).
        if !name.starts_with("static_vit") {
            let want = npy(&format!("expected/{name}_ort.npy"));
            assert_eq!(
                tabconv::model::argmax_rows(&y),
                tabconv::model::argmax_rows(&want),
                "{name}"
            );
        }
    }
}

/// One timer's row after a short timing.
fn timed(t: tabconv::bench::Timer) -> tabconv::bench::Timing {
    let rows = tabconv::bench::interleave(vec![t], std::time::Duration::from_millis(1), 1);
    let row = rows.into_iter().next().unwrap();
    assert!(row.error.is_none() && row.runs >= 1, "{row:?}");
    row
}

#[test]
fn bench_reports_the_batch_that_ran() {
    use tabconv::bench::{profile_ours, synthetic_input, time_ours};
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let mixed = fixture("models/static_mixed.onnx");
    let g = load("static_mixed");
    assert_eq!(synthetic_input(&g, 6).unwrap().shape(), &[6, 1, 28, 28]);
    let t = timed(time_ours(&g, &mixed, 6, &pool).unwrap());
    assert_eq!((t.batch, t.chunk), (6, Some(1)));
    // Six images really ran: every op was called once per image per run.
    let (by_op, _) = profile_ours(&g, 6, 2).unwrap();
    let conv_calls = by_op.iter().find(|(op, _, _)| *op == "Conv").map(|p| p.2);
    assert_eq!(conv_calls, Some(2 * 6));
    tract_runs_in_chunks_of_one(&g, &mixed, 6);

    // A symbolic batch runs whole; tract runs the file, which fixes the batch, in chunks.
    let legacy = fixture("models/static_legacy.onnx");
    let g = load("static_legacy");
    let t = timed(time_ours(&g, &legacy, 6, &pool).unwrap());
    assert_eq!((t.batch, t.chunk), (6, None));
    let (by_op, _) = profile_ours(&g, 6, 2).unwrap();
    let conv_calls = by_op.iter().find(|(op, _, _)| *op == "Conv").map(|p| p.2);
    assert_eq!(conv_calls, Some(2 * 2), "two convs, one call each per run");
    tract_runs_in_chunks_of_one(&g, &legacy, 6);

    // `--profile` runs for about `--seconds`, between 5 and the cap, and reports the runs it
    // profiled (the per-run times divide by it).
    use tabconv::bench::profile_for;
    for (max_runs, seconds, want) in [(1000, 0.0, Some(5)), (7, 1e9, Some(7)), (1000, 1e9, Some(1000))] {
        let ((by_op, _), runs) = profile_for(&g, 6, max_runs, seconds).unwrap();
        let conv_calls = by_op.iter().find(|(op, _, _)| *op == "Conv").map(|p| p.2);
        assert_eq!((Some(runs), conv_calls), (want, want.map(|r| 2 * r)));
    }
}

/// `bench`'s tract column runs the file as declared (batch 1), `batch` images in chunks of one;
/// without the `tract` feature it is the "not built" error the CLI reports as the engine's failure.
fn tract_runs_in_chunks_of_one(g: &Graph, model: &std::path::Path, batch: usize) {
    let t = tabconv::bench::time_tract(g, model, batch);
    #[cfg(feature = "tract")]
    assert_eq!(t.map(timed).map(|r| (r.batch, r.chunk)).unwrap(), (batch, Some(1)));
    #[cfg(not(feature = "tract"))]
    assert_eq!(t.unwrap_err().to_string(), tabconv::bench::TRACT_NOT_BUILT);
}

#[test]
fn default_pipeline_calibrates_on_many_images_in_process() {
    use tabconv::passes::{manager::run_pipeline, pipeline::Pipeline, PassCx};
    let calib = rows(&npy("data/mnist_calib.npy"), 0..128);
    let pipeline = Pipeline::find("tabconv").unwrap();
    let x = npy("expected/static_input.npy");
    for name in ALL {
        let mut g = load(name);
        let mut cx = PassCx {
            calib: Some(calib.clone()),
            ..Default::default()
        };
        run_pipeline(&mut g, &pipeline, &mut cx, |_, _| Ok(())).unwrap_or_else(|e| panic!("{name}: {e}"));
        let y = run1(&g, x.clone()).unwrap();
        assert_eq!(y.shape(), &[4, 10], "{name}");
    }
}

/// A graph of a fixed batch above one keeps no activations between its layers (its images may
/// mix within a batch), so no calibration run resumes: every layer reports none resumed and a
/// note says so. With a symbolic batch the second layer's run resumes from the first's cut.
#[test]
fn calibration_runs_resume_only_where_activations_can_be_kept() {
    use tabconv::passes::{manager::run_pipeline, pipeline::Pipeline, PassCx};
    let mut rng = tabconv::pq::rng::Rng::new(9);
    let calib = ArrayD::from_shape_fn(IxDyn(&[64, 8]), |_| rng.next_f64() as f32);
    let pipeline = Pipeline::parse(
        "name: t\npasses:\n  - lut:\n      min_macs: 0\n      learn: none\n      fc_subspace: 4\n",
        "test",
    )
    .unwrap();
    for (lead, resumes) in [(Dim::Known(2), false), (Dim::Batch(1), true)] {
        let mut g = Graph::new();
        let x = g.add_node("x", Op::Input, &[]);
        g.node_mut(x).outputs[0].fact = Some(Fact::new(DType::F32, vec![lead, Dim::Known(8)]));
        g.inputs.push(x);
        let mut h = tabconv::ir::Outlet::new(x, 0);
        for (i, m) in [8usize, 4].into_iter().enumerate() {
            let w = ArrayD::from_shape_fn(IxDyn(&[8, m]), |_| rng.next_f64() as f32 - 0.5);
            let wc = g.add_const(&format!("w{i}"), Tensor::F32(w));
            h = g.add_op(&format!("mm{i}"), Op::MatMul, &[h, wc]);
        }
        g.outputs.push(("y".into(), h));
        tabconv::ir::infer::infer_graph(&mut g).unwrap();
        let mut cx = PassCx {
            calib: Some(calib.clone()),
            ..Default::default()
        };
        let report = run_pipeline(&mut g, &pipeline, &mut cx, |_, _| Ok(())).unwrap();
        let layers = &report.lut_layers;
        assert_eq!(layers.len(), 2, "{lead:?}");
        assert!(layers.iter().all(|l| l.images == 64), "{lead:?}");
        assert_eq!(layers[0].images_resumed, 0, "nothing before the first layer");
        assert_eq!(layers[1].images_resumed, if resumes { 64 } else { 0 }, "{lead:?}");
        let noted = report
            .notes
            .iter()
            .any(|n| n.starts_with("lut: no calibration run resumed"));
        assert_eq!(noted, !resumes, "{lead:?}: {:?}", report.notes);
    }
}
