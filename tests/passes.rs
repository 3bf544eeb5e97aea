//! Every pass of passes/exact.yaml on every fixture model: an insta snapshot of the IR after
//! each pass, and the interpreter's outputs before and after each pass equal within 1e-4.
//! Plus `.tcv` round trips (IR → .tcv → IR gives the same dump) and byte-identical compiles.

mod common;
use common::*;
use tabconv::interp::run;
use tabconv::ir::{dump::dump, Tensor};
use tabconv::onnx::tcv;
use tabconv::passes::{manager::run_pipeline, pipeline::Pipeline, PassCx};

const MODELS: &[(&str, &str)] = &[
    ("lenet5", "models/lenet5.onnx"),
    ("lenet5_dynamo", "models/lenet5_dynamo.onnx"),
    ("nin", "models/nin.onnx"),
    ("resnet18_fmnist", "models/resnet18_fmnist.onnx"),
];

#[test]
fn snapshots_after_each_exact_pass() {
    for (name, model) in MODELS {
        let (_, dumps) = compile_exact(model);
        for (i, (pass, text)) in dumps.iter().enumerate() {
            insta::assert_snapshot!(format!("{name}__{i}_{pass}"), text);
        }
    }
}

#[test]
fn every_exact_pass_preserves_outputs() {
    for (name, model) in MODELS {
        let x = npy(&format!("expected/{name}_input.npy"));
        let x = x.slice(ndarray::s![..16, .., .., ..]).to_owned().into_dyn();
        let mut g = tabconv::onnx::load_model(&fixture(model)).unwrap();
        let reference = as_f32(&run(&g, vec![Tensor::F32(x.clone())]).unwrap()[0]);
        let pipeline = Pipeline::find("exact").unwrap();
        run_pipeline(&mut g, &pipeline, &mut PassCx::default(), |pass, g| {
            let out = as_f32(&run(g, vec![Tensor::F32(x.clone())])?[0]);
            let e = rel_err(&out, &reference);
            assert!(e <= 1e-4, "{name}: after {pass} the output moved by {e:e}");
            Ok(())
        })
        .unwrap();
        // the exact pipeline really rewrote the model: convs lowered (the snapshots show it),
        // folded back and run channels-last
        let text = dump(&g).unwrap();
        assert!(!text.contains("Im2Col("), "{name}: a lowered Conv was not folded back");
        assert!(text.contains("layout=nhwc"), "{name}: no channels-last Conv");
        assert!(!text.contains("BatchNormalization("), "{name}: BatchNorm left unfolded");
        assert!(!text.contains("Gemm("), "{name}: Gemm left");
    }
}

#[test]
fn tcv_round_trip_and_determinism() {
    let dir = tempfile::tempdir().unwrap();
    for (name, model) in MODELS {
        let (g, _) = compile_exact(model);
        let yaml = Pipeline::find("exact").unwrap().to_yaml();
        let bytes = tcv::encode(&g, &yaml).unwrap();
        let (g2, _) = compile_exact(model);
        assert_eq!(bytes, tcv::encode(&g2, &yaml).unwrap(), "{name}: two compiles differ");
        let p = dir.path().join(format!("{name}.tcv"));
        tcv::write_tcv(&g, &yaml, &p).unwrap();
        let back = tcv::read_tcv(&p).unwrap();
        assert_eq!(
            dump(&back).unwrap(),
            dump(&g).unwrap(),
            "{name}: IR → .tcv → IR changed the graph"
        );
        assert_eq!(tcv::read_pipeline(&p).unwrap().as_deref(), Some(yaml.as_str()));
        // and it still computes what ONNX Runtime computes
        let x = npy(&format!("expected/{name}_input.npy"));
        let out = as_f32(&run(&back, vec![Tensor::F32(x)]).unwrap()[0]);
        let e = rel_err(&out, &npy(&format!("expected/{name}_ort.npy")));
        assert!(e <= 1e-4, "{name}: compiled .tcv differs from ONNX Runtime by {e:e}");
    }
}

/// Kernel taps that only ever meet padding (a 3×3 conv on a 1×1 map, or with stride 2 on a 2×2
/// one) are dropped by `conv-to-im2col`: the MatMul the lookups would replace has only the
/// taps that touch the image, the cost counts only those (before and after), and the outputs
/// stay the same through every exact pass.
#[test]
fn taps_that_only_meet_padding_are_dropped() {
    use tabconv::ir::cost::graph_cost;
    use tabconv::ir::op::{Conv, Padding, Window};
    use tabconv::ir::Op;
    let win = |stride: usize| Window {
        kernel: [3, 3],
        strides: [stride, stride],
        dilations: [1, 1],
        padding: Padding::Explicit([1; 4]),
        ceil_mode: false,
    };
    let mut rng = tabconv::pq::rng::Rng::new(4);
    let (mut g, mut y) = graph_with_input([8, 2, 2]);
    // (input channels, output channels, stride): on 2×2 every tap is used; stride 2 on 2×2
    // gives 1×1 and uses 2×2 taps; on 1×1 only the centre
    for (i, &(cin, cout, stride)) in [(8usize, 16usize, 1usize), (16, 16, 2), (16, 12, 1)].iter().enumerate() {
        let wv: Vec<f32> = (0..cout * cin * 9).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let w = g.add_const(&format!("w{i}"), Tensor::f32(&[cout, cin, 3, 3], wv).unwrap());
        y = g.add_op(&format!("conv{i}"), Op::Conv(Conv::nchw(win(stride), 1)), &[y, w]);
    }
    g.outputs.push(("y".into(), y));
    tabconv::ir::infer::infer_graph(&mut g).unwrap();
    let macs = 8 * 9 * 16 * 4 + 16 * 4 * 16 + 16 * 12;
    // `min_macs` compares each conv's pruned count, also for a conv fed by one rewritten
    // before it: conv2 (192 multiply-adds; 1728 with all nine taps) stays a Conv, conv1 (1024)
    // does not
    let mut small = g.clone();
    let mut cx = PassCx::default();
    let yaml = "name: t\npasses:\n  - conv-to-im2col:\n      min_macs: 1000\n";
    run_pipeline(&mut small, &Pipeline::parse(yaml, "test").unwrap(), &mut cx, |_, _| {
        Ok(())
    })
    .unwrap();
    let left: Vec<&String> = cx.notes.iter().filter(|n| n.contains("below min_macs")).collect();
    assert!(left.len() == 1 && left[0].contains("conv2"), "{:?}", cx.notes);
    assert_eq!(graph_cost(&g).exact_macs, macs as u64, "the original's count");
    let x = ndarray::ArrayD::from_shape_vec(
        ndarray::IxDyn(&[3, 8, 2, 2]),
        (0..96).map(|_| rng.next_f64() as f32).collect(),
    )
    .unwrap();
    let reference = as_f32(&run(&g, vec![Tensor::F32(x.clone())]).unwrap()[0]);
    let mut cx = PassCx::default();
    let mut lowered = None;
    run_pipeline(&mut g, &Pipeline::find("exact").unwrap(), &mut cx, |pass, g| {
        let out = as_f32(&run(g, vec![Tensor::F32(x.clone())])?[0]);
        assert!(rel_err(&out, &reference) <= 1e-5, "after {pass}");
        assert_eq!(
            graph_cost(g).exact_macs,
            macs as u64,
            "after {pass}: {}",
            tabconv::ir::dump::dump(g).unwrap()
        );
        if pass == "conv-to-im2col" {
            lowered = Some(g.clone());
        }
        Ok(())
    })
    .unwrap();
    // the MatMuls' weights: C·kh·kw rows of the taps kept
    let lowered = lowered.unwrap();
    let mut rows: Vec<usize> = lowered
        .g
        .node_indices()
        .filter(|&n| matches!(lowered.node(n).op, Op::MatMul))
        .map(|n| lowered.const_value(lowered.inputs_of(n)[1]).unwrap().shape()[0])
        .collect();
    rows.sort();
    assert_eq!(rows, [16, 64, 72]);
    let dropped: Vec<&String> = cx.notes.iter().filter(|n| n.contains("only meet padding")).collect();
    assert_eq!(dropped.len(), 2, "{:?}", cx.notes);
    assert!(
        dropped[0].contains("conv1") && dropped[0].contains("(2×2 kept)"),
        "{dropped:?}"
    );
    assert!(
        dropped[1].contains("conv2") && dropped[1].contains("(1×1 kept)"),
        "{dropped:?}"
    );
}
