//! Priority masking: the greedy restores the most damaging layer first, overrides are honoured,
//! restored layers are exactly the original ones, and masking everything gives the original model.

mod common;
use common::*;
use ndarray::{ArrayD, IxDyn};
use tabconv::interp::run;
use tabconv::ir::{dump::dump, DType, Dim, Fact, Graph, Op, Outlet, Tensor};
use tabconv::passes::{manager::run_pipeline, pipeline::Pipeline, PassCx};
use tabconv::pq::rng::Rng;

/// x [N, 8] → "easy" MatMul (8→8) → "hard" MatMul (8→4), random weights. Each 4-value
/// subspace of the input is one of 8 patterns times one of 8 scales (64 distinct subvectors),
/// so neither layer is exact with 16 prototypes and their damages differ; the tests read the
/// measured damages rather than assuming which layer is worse.
fn two_layers() -> (Graph, ArrayD<f32>) {
    let mut rng = Rng::new(3);
    let mut g = Graph::new();
    let x = g.add_node("x", Op::Input, &[]);
    g.node_mut(x).outputs[0].fact = Some(Fact::new(DType::F32, vec![Dim::Batch(1), Dim::Known(8)]));
    g.inputs.push(x);
    let w1: Vec<f32> = (0..64).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
    let w2: Vec<f32> = (0..32).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
    let c1 = g.add_const("w1", Tensor::f32(&[8, 8], w1).unwrap());
    let h = g.add_op("easy", Op::MatMul, &[Outlet::new(x, 0), c1]);
    let c2 = g.add_const("w2", Tensor::f32(&[8, 4], w2).unwrap());
    let y = g.add_op("hard", Op::MatMul, &[h, c2]);
    g.outputs.push(("y".into(), y));
    tabconv::ir::infer::infer_graph(&mut g).unwrap();
    let pats: Vec<Vec<f32>> = (0..8)
        .map(|_| (0..4).map(|_| rng.next_f64() as f32).collect())
        .collect();
    let mut v = Vec::new();
    for _ in 0..3000 {
        for _ in 0..2 {
            let p = &pats[rng.below(8)];
            let scale = 1.0 + rng.below(8) as f32;
            v.extend(p.iter().map(|a| a * scale));
        }
    }
    (g, ArrayD::from_shape_vec(IxDyn(&[3000, 8]), v).unwrap())
}

fn pipeline(mask: &str) -> Pipeline {
    let text = format!(
        "name: t\npasses:\n  - lut:\n      encoder: argmin\n      fc_subspace: 4\n      refit: false\n  - mask:\n      relearn: false\n      restore_unprofitable: false\n{mask}  - dead-code:\n"
    );
    Pipeline::parse(&text, "test").unwrap()
}

fn compile(g: &Graph, calib: &ArrayD<f32>, mask: &str) -> (Graph, tabconv::passes::mask::MaskReport) {
    let mut g = g.clone();
    let mut cx = PassCx {
        calib: Some(calib.clone()),
        ..Default::default()
    };
    let report = run_pipeline(&mut g, &pipeline(mask), &mut cx, |_, _| Ok(())).unwrap();
    (g, report.mask.expect("mask ran"))
}

#[test]
fn greedy_restores_the_most_damaging_layer_first() {
    let (g, calib) = two_layers();
    let (_, report) = compile(&g, &calib, "      min_logit_cosine: 0.999999\n");
    let alone: Vec<(String, f64)> = report
        .layers
        .iter()
        .map(|d| (d.layer.clone(), d.logit_cosine_alone))
        .collect();
    let most_damaging = alone.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0.clone();
    let first = report.path[1].restored.clone().expect("something was restored");
    assert_eq!(
        first, most_damaging,
        "restored first: {first}; logit cosine of each layer alone: {alone:?}"
    );
    let damages: Vec<f64> = report.layers.iter().map(|d| 1.0 - d.logit_cosine_alone).collect();
    assert!(
        damages.iter().any(|&d| d > 1e-4),
        "the constructed model must have a damaging layer: {damages:?}"
    );
    // every restore raises the similarity towards 1
    assert!(report.path.last().unwrap().logit_cosine >= report.path[0].logit_cosine);
}

#[test]
fn overrides_are_honoured() {
    let (g, calib) = two_layers();
    let (out, report) = compile(
        &g,
        &calib,
        "      min_logit_cosine: 0.999999\n      keep_exact: [easy]\n      force_lut: [hard]\n",
    );
    let choice = |n: &str| report.layers.iter().find(|d| d.layer == n).unwrap().chosen;
    assert_eq!(choice("easy"), "exact");
    assert_eq!(
        choice("hard"),
        "lut",
        "force_lut wins even though the target is not met"
    );
    let text = dump(&out).unwrap();
    assert!(text.contains("\"easy\""), "easy is a MatMul again:\n{text}");
    assert!(text.contains("\"hard/lut\""));
}

#[test]
fn restored_layers_are_the_original_ones() {
    let mut g = tabconv::onnx::load_model(&fixture("models/resnet18_fmnist.onnx")).unwrap();
    let mut exact = g.clone();
    run_pipeline(
        &mut exact,
        &Pipeline::find("exact").unwrap(),
        &mut PassCx::default(),
        |_, _| Ok(()),
    )
    .unwrap();
    // approximate every layer, then mask everything back
    let text = "name: t\npasses:\n  - fold-batchnorm:\n  - gemm-to-matmul:\n  - conv-to-im2col:\n  - constant-fold:\n  - lut:\n      encoder: tree\n      max_rows: 512\n  - mask:\n      keep_exact: ['*']\n      relearn: false\n  - im2col-to-conv:\n  - channels-last:\n  - dead-code:\n";
    let calib = npy("data/fmnist_calib.npy");
    let calib = calib.slice(ndarray::s![..64, .., .., ..]).to_owned().into_dyn();
    let mut cx = PassCx {
        calib: Some(calib),
        ..Default::default()
    };
    run_pipeline(&mut g, &Pipeline::parse(text, "t").unwrap(), &mut cx, |_, _| Ok(())).unwrap();
    assert_eq!(
        dump(&g).unwrap(),
        dump(&exact).unwrap(),
        "masking everything rebuilds the exact graph node for node"
    );
    let x = npy("expected/resnet18_fmnist_input.npy");
    let a = as_f32(&run(&g, vec![Tensor::F32(x.clone())]).unwrap()[0]);
    let b = as_f32(&run(&exact, vec![Tensor::F32(x.clone())]).unwrap()[0]);
    assert_eq!(a, b, "bit-identical to the exact pipeline");
    assert!(
        rel_err(&a, &npy("expected/resnet18_fmnist_ort.npy")) <= 1e-4,
        "and to the original model"
    );
}

#[test]
fn accuracy_target_uses_validation_labels() {
    let mut g = tabconv::onnx::load_model(&fixture("models/lenet5.onnx")).unwrap();
    let mut p = Pipeline::find("tabconv").unwrap();
    p.set("mask.max_accuracy_drop=0.5").unwrap();
    let x = npy("data/mnist_test.npy");
    let y = tabconv::data::read_labels(&fixture("data/mnist_test_labels.npy")).unwrap();
    let (vx, vy) = (
        x.slice(ndarray::s![..1000, .., .., ..]).to_owned().into_dyn(),
        y[..1000].to_vec(),
    );
    let mut cx = PassCx {
        calib: Some(npy("data/mnist_calib.npy")),
        val: Some((vx, vy)),
        ..Default::default()
    };
    let report = run_pipeline(&mut g, &p, &mut cx, |_, _| Ok(())).unwrap();
    let m = report.mask.unwrap();
    let exact = m.exact_accuracy.unwrap();
    let chosen = m.final_point.as_ref().unwrap_or(&m.path[m.chosen_point]);
    assert!((exact - chosen.accuracy.unwrap()) * 100.0 <= 0.5 + 1e-9 || m.path.len() == 1 + m.layers.len());
    // without labels the accuracy target is refused
    let mut g = tabconv::onnx::load_model(&fixture("models/lenet5.onnx")).unwrap();
    let mut cx = PassCx {
        calib: Some(npy("data/mnist_calib.npy")),
        ..Default::default()
    };
    let e = run_pipeline(&mut g, &p, &mut cx, |_, _| Ok(())).unwrap_err();
    assert!(e.to_string().contains("--val"), "{e}");
}
