//! Priority masking: the greedy restores the most damaging layer first, overrides are honoured,
//! restored layers are exactly the original ones, and masking everything gives the original model.

mod common;
use common::*;
use ndarray::{ArrayD, IxDyn};
use tabconv::interp::run;
use tabconv::ir::{dump::dump, DType, Dim, Fact, Graph, Op, Outlet, Tensor};
use tabconv::passes::mask::{RELEARNED_AGAIN, RELEARNED_PREFIX};
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

/// The masking scenarios below were set up (their layers' damage, the targets between them) on
/// codebooks fitted on every calibration row: `hold_out: false` keeps those fits.
fn pipeline(mask: &str) -> Pipeline {
    let text = format!(
        "name: t\npasses:\n  - lut:\n      encoder: argmin\n      fc_subspace: 4\n      refit: false\n      hold_out: false\n  - mask:\n      relearn: false\n      restore_unprofitable: false\n{mask}  - dead-code:\n"
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
    assert!(
        report.confirmation.is_none(),
        "only accuracy and expected-drop targets are confirmed"
    );
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
fn layer_names_that_match_nothing_are_noted() {
    let (g, calib) = two_layers();
    let text = "name: t\npasses:\n  - lut:\n      encoder: argmin\n      fc_subspace: 4\n      refit: false\n      keep_exact: [eesy, 'ha*']\n      layers: [{name: 'e*', encoder: tree}, {name: '/conv9/*', subspace: 2}]\n  - mask:\n      relearn: false\n      min_logit_cosine: 0\n      keep_exact: [easy, esay]\n      force_lut: ['*/lut', hrad]\n  - dead-code:\n";
    let mut g = g.clone();
    let mut cx = PassCx {
        calib: Some(calib),
        ..Default::default()
    };
    let report = run_pipeline(&mut g, &Pipeline::parse(text, "test").unwrap(), &mut cx, |_, _| Ok(())).unwrap();
    let mut noted: Vec<&str> = report
        .notes
        .iter()
        .filter(|n| n.contains("names no"))
        .map(|n| n.split('"').nth(1).unwrap())
        .collect();
    noted.sort_unstable();
    // `ha*` kept `hard` exact in the lut pass, so mask's `*/lut` names `easy/lut` only
    assert_eq!(noted, ["/conv9/*", "eesy", "esay", "hrad"], "{:?}", report.notes);
    let m = report.mask.expect("mask ran");
    assert_eq!(m.layers.len(), 1, "only easy became lookups");
    assert_eq!(
        m.layers[0].chosen, "exact",
        "mask's keep_exact names easy by its MatMul"
    );
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

/// `put_back` is `restore`'s inverse: every LUT layer of LeNet-5 (convolutions whose encoders
/// absorbed an Im2Col, fully connected layers with a bias), restored and put back from the
/// all-LUT graph, gives that graph node for node and its outputs bit for bit; put back into the
/// exact graph one at a time, each gives the outputs of the all-LUT graph with only it restored
/// the other way round (only that layer approximated).
#[test]
fn put_back_is_the_inverse_of_restore() {
    use tabconv::passes::mask::{put_back, restore};
    let mut g = tabconv::onnx::load_model(&fixture("models/lenet5.onnx")).unwrap();
    let text = "name: t\npasses:\n  - fold-batchnorm:\n  - gemm-to-matmul:\n  - conv-to-im2col:\n  - constant-fold:\n  - lut:\n      max_rows: 512\n      learn: none\n";
    let calib = npy("data/mnist_calib.npy");
    let calib = calib.slice(ndarray::s![..64, .., .., ..]).to_owned().into_dyn();
    let mut cx = PassCx {
        calib: Some(calib.clone()),
        ..Default::default()
    };
    run_pipeline(&mut g, &Pipeline::parse(text, "t").unwrap(), &mut cx, |_, _| Ok(())).unwrap();
    let record = cx.analyses.lut.take().expect("the lut pass ran");
    let luts = record.live(&g);
    assert_eq!(luts.len(), 5, "two convolutions and three fully connected layers");
    let x = calib.slice(ndarray::s![..8, .., .., ..]).to_owned().into_dyn();
    let out = |g: &Graph| {
        let mut g = g.clone();
        tabconv::ir::infer::infer_graph(&mut g).unwrap();
        as_f32(&run(&g, vec![Tensor::F32(x.clone())]).unwrap()[0])
    };
    let bits = |a: &ArrayD<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let mut exact = g.clone();
    for n in &luts {
        restore(&mut exact, n, record.exact(n).unwrap()).unwrap();
    }
    assert!(exact.g.node_weights().all(|n| !matches!(n.op, Op::LutMatMul { .. })));
    let mut back = exact.clone();
    for n in &luts {
        let mut one = exact.clone();
        put_back(&mut one, &g, n, record.exact(n).unwrap()).unwrap();
        let mut all_but = g.clone();
        for m in luts.iter().filter(|m| *m != n) {
            restore(&mut all_but, m, record.exact(m).unwrap()).unwrap();
        }
        assert_eq!(bits(&out(&one)), bits(&out(&all_but)), "{n} alone as lookups");
        put_back(&mut back, &g, n, record.exact(n).unwrap()).unwrap();
    }
    let infer = |g: &mut Graph| tabconv::ir::infer::infer_graph(g).unwrap();
    infer(&mut back);
    infer(&mut g);
    assert_eq!(
        dump(&back).unwrap(),
        dump(&g).unwrap(),
        "every layer put back: the all-LUT graph"
    );
    assert_eq!(bits(&out(&back)), bits(&out(&g)));
    // a layer that is already lookups has no MatMul to replace: a clear error, not a panic
    let e = put_back(&mut back, &g, &luts[0], record.exact(&luts[0]).unwrap()).unwrap_err();
    assert!(e.to_string().contains("MatMul"), "{e}");
}

/// Top-1 points `b` is expected to lose against `a` with each image's label drawn from `a`'s
/// softmax, and one standard error of it (written out here, independently of the pass).
fn expected_drop(a: &ArrayD<f32>, b: &ArrayD<f32>) -> (f64, f64) {
    let (n, k) = (a.shape()[0], a.shape()[1]);
    let losses: Vec<f64> = (0..n)
        .map(|i| {
            let row = |m: &ArrayD<f32>| (0..k).map(|j| m[[i, j]] as f64).collect::<Vec<_>>();
            let (x, y) = (row(a), row(b));
            let top = |r: &[f64]| (0..k).fold(0, |m, j| if r[j] > r[m] { j } else { m });
            let (ia, ib) = (top(&x), top(&y));
            let z: f64 = x.iter().map(|v| (v - x[ia]).exp()).sum();
            if ia == ib {
                0.0
            } else {
                (1.0 - (x[ib] - x[ia]).exp()) / z
            }
        })
        .collect();
    let mean = losses.iter().sum::<f64>() / n as f64;
    let var = losses.iter().map(|l| l * l).sum::<f64>() / n as f64 - mean * mean;
    (100.0 * mean, 100.0 * (var.max(0.0) / n as f64).sqrt())
}

/// An expected-drop target chooses on half of the held-out calibration images and confirms
/// on the other half (`confirm`), restoring layers while the kept model's drop there (plus
/// `expected_drop_margin` standard errors) exceeds the budget; the readings reported are the
/// compiled model's on each half.
#[test]
fn expected_drop_target_confirms_on_held_out_calibration_images() {
    let (g, calib) = two_layers();
    // both layers as lookups read 9.9 points on the images chosen on and 10.05 on those held out
    let (out, m) = compile(
        &g,
        &calib,
        "      max_expected_drop: 10.0\n      expected_drop_margin: 0\n      samples: 750\n",
    );
    // 3000 images: the last quarter (750) held out of learning and measured, every second one
    // of those held out of the choices as well
    let c = m.confirmation.as_ref().expect("an expected-drop target is confirmed");
    assert_eq!((c.images, c.exact_accuracy), (375, None));
    assert!(
        m.measured_on
            .starts_with("375 of the 750 held-out calibration images (the other 375 held out to confirm)"),
        "{}",
        m.measured_on
    );
    let held = tabconv::passes::mask::confirm_split(750, 0.5);
    let part = |h: bool| {
        let rows: Vec<usize> = (0..750).filter(|&i| held[i] == h).map(|i| 2250 + i).collect();
        calib.select(ndarray::Axis(0), &rows)
    };
    for (h, p) in [(true, c.points.last().unwrap()), (false, m.kept())] {
        reads_as_computed(&g, &out, &part(h), p);
    }
    // the walk kept both layers as lookups on the images chosen on; they missed the budget on
    // the held-out ones, and confirm restored one, which meets it there
    assert_eq!(m.path.len(), 1, "nothing restored where chosen: {:?}", m.path);
    assert!(
        m.path[0].expected_drop <= 10.0 && c.points[0].expected_drop > 10.0,
        "{c:?}"
    );
    assert_eq!(c.points.len(), 2, "{c:?}");
    assert!(c.points[1].expected_drop <= 10.0);
    let restored: Vec<_> = m.layers.iter().filter(|d| d.chosen == "exact").collect();
    assert_eq!(restored.len(), 1);
    assert!(
        restored[0]
            .why
            .starts_with("restored to confirm: on the 375 held-out calibration images expected drop "),
        "{}",
        restored[0].why
    );
    // a margin of 1.5 standard errors: both layers' 9.9 ± 1.3 points are past the budget where
    // chosen, one layer's reading plus its margin is within it
    let (_, m) = compile(
        &g,
        &calib,
        "      max_expected_drop: 10.0\n      expected_drop_margin: 1.5\n      samples: 750\n",
    );
    let bound = |p: &tabconv::passes::mask::PathPoint| p.expected_drop + 1.5 * p.expected_drop_se;
    assert_eq!(m.path.len(), 2, "{:?}", m.path);
    assert!(m.path[0].expected_drop <= 10.0 && bound(&m.path[0]) > 10.0 && bound(&m.path[1]) <= 10.0);
    assert!(m.target.contains("1.5 standard error(s) of margin"), "{}", m.target);
    // with confirm 0 every measured image is chosen on and nothing is confirmed
    let (_, m) = compile(
        &g,
        &calib,
        "      max_expected_drop: 10.0\n      confirm: 0\n      samples: 750\n",
    );
    assert!(m.confirmation.is_none());
    assert_eq!(m.measured_on, "750 held-out calibration images");
}

/// When the quarter held out of learning is too few to confirm on (here 750 of 3000 images for
/// a budget of 0.45 points: 375 held out would weigh 0.27 points each, more than half the
/// budget), the mask measures the last 1024: the 750 and the 274 learned on just before them.
/// The confirmation holds out 512 of them, all among the 750 no table saw (spread evenly
/// through them), and the readings reported are the compiled model's on the images so chosen.
#[test]
fn a_small_calibration_set_lends_the_mask_images_learned_on() {
    let (g, calib) = two_layers();
    let (out, m) = compile(&g, &calib, "      max_expected_drop: 0.45\n");
    assert_eq!(
        m.measured_on,
        "512 of the 1024 calibration images, 274 of them also learned on (the other 512 held out to confirm)"
    );
    let c = m.confirmation.as_ref().expect("confirmed");
    assert_eq!(c.images, 512);
    // images 1976..2250 were learned on, 2250..3000 not; 512 of the 750 held out, image
    // 2250 + j when ⌊(j + 1)·512/750⌋ > ⌊j·512/750⌋
    let held: Vec<usize> = (0..750usize)
        .filter(|j| (j + 1) * 512 / 750 > j * 512 / 750)
        .map(|j| 2250 + j)
        .collect();
    let chosen: Vec<usize> = (1976..3000).filter(|i| !held.contains(i)).collect();
    assert_eq!((held.len(), chosen.len()), (512, 512));
    for (rows, p) in [(&held, c.points.last().unwrap()), (&chosen, m.kept())] {
        reads_as_computed(&g, &out, &calib.select(ndarray::Axis(0), rows), p);
    }
}

/// The expected drop and its standard error reported in `p` are those of the compiled model
/// `out` against the exact `g` on images `x`, computed independently.
fn reads_as_computed(g: &Graph, out: &Graph, x: &ArrayD<f32>, p: &tabconv::passes::mask::PathPoint) {
    let mut out = out.clone();
    tabconv::ir::infer::infer_graph(&mut out).unwrap();
    let logits = |g: &Graph| as_f32(&run(g, vec![Tensor::F32(x.clone())]).unwrap()[0]);
    let (drop, se) = expected_drop(&logits(g), &logits(&out));
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * (1.0 + b.abs());
    assert!(
        close(p.expected_drop, drop) && close(p.expected_drop_se, se),
        "reported {} ± {}, computed {drop} ± {se}",
        p.expected_drop,
        p.expected_drop_se
    );
}

/// A holdout longer than the images measured (set by a caller, or sized for another mask
/// pass): the last ones are measured, those no table saw, and the count learned on follows.
#[test]
fn the_last_held_out_images_are_measured() {
    let (g, calib) = two_layers();
    let mut g = g.clone();
    let mut cx = PassCx {
        calib: Some(calib.slice_axis(ndarray::Axis(0), (0..2250).into()).to_owned()),
        holdout: Some(calib.clone()),
        holdout_learned: 2500,
        ..Default::default()
    };
    let report = run_pipeline(
        &mut g,
        &pipeline("      max_expected_drop: 10.0\n      samples: 1000\n"),
        &mut cx,
        |_, _| Ok(()),
    )
    .unwrap();
    // images 2000..3000 measured, the first 500 of them learned on; the 500 unseen confirm
    assert_eq!(
        report.mask.unwrap().measured_on,
        "500 of the 1000 calibration images, 500 of them also learned on (the other 500 held out to confirm)"
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
        val: Some((vx.clone(), vy.clone())),
        ..Default::default()
    };
    let report = run_pipeline(&mut g, &p, &mut cx, |_, _| Ok(())).unwrap();
    let m = report.mask.unwrap();
    let exact = m.exact_accuracy.unwrap();
    let kept = m.kept();
    if report
        .notes
        .iter()
        .any(|n| n.contains("relearning the tables did not help"))
    {
        assert!(m.final_point.is_none(), "a rejected relearned model is not reported");
    }
    // `confirm` (0.5 by default) chose on every second image and held out the others
    let held = tabconv::passes::mask::confirm_split(vy.len(), 0.5);
    assert_eq!(held.iter().filter(|&&h| h).count(), 500);
    assert!(
        m.measured_on
            .starts_with("500 validation images (500 more held out to confirm; logits on "),
        "{}",
        m.measured_on
    );
    let c = m.confirmation.as_ref().expect("an accuracy target is confirmed");
    assert_eq!(c.images, 500);
    assert!((exact - kept.accuracy.unwrap()) * 100.0 <= 0.5 + 1e-9 || m.layers.iter().all(|d| d.chosen == "exact"));
    // the accuracies reported for the kept model are the compiled model's, on each half
    let original = tabconv::onnx::load_model(&fixture("models/lenet5.onnx")).unwrap();
    let (got, want) = (predictions(&g, &vx), predictions(&original, &vx));
    let on = |part: bool, of: &[i64]| -> Vec<bool> {
        (0..vy.len())
            .filter(|&i| held[i] == part)
            .map(|i| of[i] == vy[i])
            .collect()
    };
    let count = |r: &[bool]| r.iter().filter(|&&r| r).count();
    assert_eq!(kept.correct, Some(count(&on(false, &got))));
    assert_eq!(exact, count(&on(false, &want)) as f64 / 500.0);
    let last = c.points.last().unwrap();
    assert_eq!(last.correct, Some(count(&on(true, &got))));
    assert_eq!(c.exact_accuracy, Some(count(&on(true, &want)) as f64 / 500.0));
    // the budget holds on the held-out images (or every layer is exact)
    assert!(
        (c.exact_accuracy.unwrap() - last.accuracy.unwrap()) * 100.0 <= 0.5 + 1e-9
            || m.layers.iter().all(|d| d.chosen == "exact")
    );
    // its drop's standard error is taken against the original model's predictions (here the
    // kept model agrees with it on every image, so it is 0; the value for a model that
    // disagrees is checked in an_accuracy_drop_of_exactly_the_budget_is_accepted)
    let se = tabconv::passes::mask::drop_standard_error(&on(false, &want), &on(false, &got));
    assert_eq!(kept.drop_se, Some(se));
    let se = tabconv::passes::mask::drop_standard_error(&on(true, &want), &on(true, &got));
    assert_eq!(last.drop_se, Some(se));
    // without labels the accuracy target is refused
    let mut g = tabconv::onnx::load_model(&fixture("models/lenet5.onnx")).unwrap();
    let mut cx = PassCx {
        calib: Some(npy("data/mnist_calib.npy")),
        ..Default::default()
    };
    let e = run_pipeline(&mut g, &p, &mut cx, |_, _| Ok(())).unwrap_err();
    assert!(e.to_string().contains("--val"), "{e}");
}

/// The two-layer model after the `lut` pass alone, its pass context (what `mask` reads), and
/// the images it was calibrated on.
fn approximated() -> (Graph, PassCx, ArrayD<f32>) {
    let (mut g, calib) = two_layers();
    let mut cx = PassCx {
        calib: Some(calib.clone()),
        ..Default::default()
    };
    // (fitted on every row, as [`pipeline`])
    let p = Pipeline::parse(
        "name: t\npasses:\n  - lut:\n      encoder: argmin\n      fc_subspace: 4\n      refit: false\n      hold_out: false\n",
        "t",
    )
    .unwrap();
    run_pipeline(&mut g, &p, &mut cx, |_, _| Ok(())).unwrap();
    let record = cx.analyses.lut.as_ref().expect("the lut pass ran");
    assert_eq!(record.live(&g).len(), 2, "both layers became lookups");
    (g, cx, calib)
}

/// `g` with the LUT layers of these MatMuls put back.
fn with_exact(g: &Graph, cx: &PassCx, layers: &[&str]) -> Graph {
    let mut g = g.clone();
    for (lut, ex) in cx.analyses.lut.as_ref().expect("the lut pass ran").layers() {
        if layers.contains(&ex.matmul.as_str()) {
            tabconv::passes::mask::restore(&mut g, lut, ex).unwrap();
        }
    }
    tabconv::ir::infer::infer_graph(&mut g).unwrap();
    g
}

fn predictions(g: &Graph, x: &ArrayD<f32>) -> Vec<i64> {
    tabconv::model::argmax_rows(&as_f32(&run(g, vec![Tensor::F32(x.clone())]).unwrap()[0]))
}

/// Run only `mask` (with these options) after [`approximated`], validating on `val`.
fn mask_only(
    g: &Graph,
    cx: PassCx,
    val: (ArrayD<f32>, Vec<i64>),
    options: &str,
) -> (Graph, tabconv::passes::mask::MaskReport, Vec<String>) {
    let mut g = g.clone();
    let mut cx = PassCx { val: Some(val), ..cx };
    let p = Pipeline::parse(&format!("name: t\npasses:\n  - mask:\n{options}"), "t").unwrap();
    let report = run_pipeline(&mut g, &p, &mut cx, |_, _| Ok(())).unwrap();
    (g, report.mask.expect("mask ran"), report.notes)
}

/// A class none of `avoid` predicts (the model has 4 outputs).
fn other_class(avoid: &[i64]) -> i64 {
    (0..4).find(|c| !avoid.contains(c)).unwrap()
}

/// [`approximated`] and, of its calibration images, the exact model's predictions and the images
/// the lookups classify differently and the same (at least 1 and 199).
#[allow(clippy::type_complexity)]
fn disagreeing() -> (Graph, PassCx, ArrayD<f32>, Vec<i64>, Vec<usize>, Vec<usize>) {
    let (g, cx, calib) = approximated();
    let exact = predictions(&with_exact(&g, &cx, &["easy", "hard"]), &calib);
    let lut = predictions(&g, &calib);
    let differ: Vec<usize> = (0..exact.len()).filter(|&i| exact[i] != lut[i]).collect();
    let agree: Vec<usize> = (0..exact.len()).filter(|&i| exact[i] == lut[i]).collect();
    assert!(
        !differ.is_empty() && agree.len() >= 199,
        "the constructed model must have both"
    );
    (g, cx, calib, exact, differ, agree)
}

/// A drop of exactly the budget meets `max_accuracy_drop`: 0.5 points is one image of 200
/// (91.0 → 90.5 %), which `(0.91 - 0.905) * 100 <= 0.5` refused in floating point.
#[test]
fn an_accuracy_drop_of_exactly_the_budget_is_accepted() {
    let (g, cx, calib, exact, differ, agree) = disagreeing();
    // 200 images: 1 the lookups get wrong and the exact model right, 181 both get right, 18 both
    // get wrong
    let mut rows = vec![differ[0]];
    let mut labels = vec![exact[differ[0]]];
    for (k, &i) in agree.iter().take(199).enumerate() {
        rows.push(i);
        labels.push(if k < 181 { exact[i] } else { other_class(&[exact[i]]) });
    }
    let x = calib.select(ndarray::Axis(0), &rows);
    let (e, k) = std::hint::black_box((182.0f64, 181.0f64));
    assert!(
        (e / 200.0 - k / 200.0) * 100.0 > 0.5,
        "the case float comparison gets wrong"
    );
    let options =
        "      confirm: 0\n      max_accuracy_drop: 0.5\n      relearn: false\n      restore_unprofitable: false\n";
    let (_, m, notes) = mask_only(&g, cx, (x.clone(), labels.clone()), options);
    assert_eq!(m.exact_accuracy, Some(0.91));
    // one image of 200 lost, none gained: the drop's standard error is
    // sqrt((1/200 − 1/200²)/200), about the whole budget, and the compile says so
    let se = 100.0 * ((1.0 / 200.0 - 1.0 / 40000.0) / 200.0f64).sqrt();
    assert!((m.path[0].drop_se.unwrap() - se).abs() < 1e-9, "{:?}", m.path[0]);
    assert!(
        notes.iter().any(|n| n.contains("standard error of 0.50 points")),
        "{notes:?}"
    );
    assert!(
        m.measured_on.starts_with("200 validation images (logits on "),
        "the accuracy is taken on the validation set: {}",
        m.measured_on
    );
    assert_eq!(m.path[0].correct, Some(181), "{:?}", m.path[0]);
    assert_eq!(m.path.len(), 1, "nothing restored: {:?}", m.path);
    assert!(m
        .layers
        .iter()
        .all(|d| d.chosen == "lut" && d.why.contains("target met")));
    // one image more than the budget is refused
    let (g, cx, _) = approximated();
    let options =
        "      confirm: 0\n      max_accuracy_drop: 0.49\n      relearn: false\n      restore_unprofitable: false\n";
    let (_, m, _) = mask_only(&g, cx, (x, labels), options);
    assert!(
        m.path.len() > 1,
        "0.49 points is less than one image of 200: {:?}",
        m.path
    );
}

/// `confirm`: a model that meets the budget on the images chosen on but not on the held-out
/// ones gets layers restored until it does there. Here every second image (those chosen on)
/// both models get right, and of the other 100 the lookups get one wrong that the exact model
/// gets right: 1 point lost, twice the budget.
#[test]
fn held_out_images_confirm_the_choice() {
    let (g, cx, calib, exact, differ, agree) = disagreeing();
    // image 1 (held out) is the one lost; the rest agree and are labelled as predicted
    let mut rows = vec![agree[0], differ[0]];
    rows.extend(&agree[1..199]);
    let labels: Vec<i64> = rows.iter().map(|&i| exact[i]).collect();
    let held = tabconv::passes::mask::confirm_split(200, 0.5);
    assert!(held[1] && !held[0] && held.iter().filter(|&&h| h).count() == 100);
    let x = calib.select(ndarray::Axis(0), &rows);
    let options = "      max_accuracy_drop: 0.5\n      relearn: false\n      restore_unprofitable: false\n";
    let (got, m, _) = mask_only(&g, cx, (x.clone(), labels.clone()), options);
    assert!(
        m.measured_on.starts_with("100 validation images (100 more held out"),
        "{}",
        m.measured_on
    );
    // chosen on the other half: nothing lost there, nothing restored
    assert_eq!(
        (m.path.len(), m.path[0].correct, m.exact_accuracy),
        (1, Some(100), Some(1.0))
    );
    let c = m.confirmation.as_ref().expect("confirmed");
    assert_eq!((c.images, c.exact_accuracy), (100, Some(1.0)));
    assert_eq!(c.points[0].correct, Some(99), "{:?}", c.points);
    // restored until none of the held-out images is lost (0.5 of 100 images allows none)
    let last = c.points.last().unwrap();
    assert!(c.points.len() >= 2 && last.correct == Some(100), "{:?}", c.points);
    let restored: Vec<&str> = m
        .layers
        .iter()
        .filter(|d| d.chosen == "exact" && d.why.starts_with("restored to confirm"))
        .map(|d| d.layer.as_str())
        .collect();
    assert_eq!(restored.len(), c.points.len() - 1, "{:?}", m.layers);
    // restored most damage per operation saved first
    let mut greedy: Vec<&tabconv::passes::mask::LayerDecision> = m.layers.iter().collect();
    greedy.sort_by(|a, b| b.damage_per_mop_saved.total_cmp(&a.damage_per_mop_saved));
    let order: Vec<Option<&str>> = c.points[1..].iter().map(|p| p.restored.as_deref()).collect();
    let want: Vec<Option<&str>> = greedy[..order.len()].iter().map(|d| Some(d.layer.as_str())).collect();
    assert_eq!(order, want, "{:?}", m.layers);
    // the model written is the one confirmed: it gets the lost image right, and the chosen-on
    // half is measured again for it
    assert_eq!(predictions(&got, &x)[1], exact[differ[0]]);
    let kept = m.kept();
    assert!(c.chosen_on.is_some() && kept.correct == Some(100), "{kept:?}");
    // the JSON report carries it
    assert_eq!(format!("{:?}", m.kept_point), format!("{:?}", Some(kept)));
    assert!(kept.restored.as_deref().unwrap().contains("to confirm"), "{kept:?}");
    // `force_lut` keeps a layer from confirm's restores: here the first in greedy order
    let first = greedy[0].layer.clone();
    let (g2, cx2, _) = approximated();
    let options = format!(
        "      max_accuracy_drop: 0.5\n      force_lut: [{first}]\n      relearn: false\n      restore_unprofitable: false\n"
    );
    let (got2, m2, notes) = mask_only(&g2, cx2, (x.clone(), labels.clone()), &options);
    let c2 = m2.confirmation.as_ref().unwrap();
    let forced = m2.layers.iter().find(|d| d.layer == first).unwrap();
    assert_eq!(forced.chosen, "lut", "{:?}", m2.layers);
    assert!(c2.points.iter().all(|p| p.restored.as_deref() != Some(first.as_str())));
    // restoring the other layer alone does not win the image back: the best point on the
    // held-out images is the model as chosen, and the restore is undone (as in the walk)
    assert_eq!(
        (c2.points.len(), c2.points[0].correct),
        (1, Some(99)),
        "{:?}",
        c2.points
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("misses the target (max_accuracy_drop 0.5 points)")),
        "{notes:?}"
    );
    let other = m2.layers.iter().find(|d| d.layer != first).unwrap();
    assert!(
        other.chosen == "lut"
            && other
                .why
                .starts_with("kept as LUT: restoring it to confirm did not help"),
        "{other:?}"
    );
    assert_eq!(
        predictions(&got2, &x),
        predictions(&g, &x),
        "the all-LUT model is written"
    );
    // without confirm the same images choose the all-LUT model
    let (g, cx, _) = approximated();
    let options =
        "      confirm: 0\n      max_accuracy_drop: 0.5\n      relearn: false\n      restore_unprofitable: false\n";
    let (_, m, _) = mask_only(&g, cx, (x, labels), options);
    assert!(
        m.confirmation.is_none() && m.path[0].correct == Some(199),
        "{:?}",
        m.path
    );
    assert!(m.layers.iter().all(|d| d.chosen == "lut"), "{:?}", m.layers);
}

/// `confirm_give_back`: after confirm restored both layers to win back a held-out image, the
/// first restored is tried as lookups again and left so, since restoring the second alone wins
/// it back. The image and its label are picked so: the exact model and the model with only the
/// second layer exact (in greedy order) get it right, the lookups and the model with only the
/// first exact get it wrong. Without the option both stay exact.
#[test]
fn confirm_gives_back_a_restore_the_target_holds_without() {
    let (g, cx, calib, _, _, agree) = disagreeing();
    let options = "      max_accuracy_drop: 0.5\n      relearn: false\n      restore_unprofitable: false\n";
    // the greedy order ranks layers on logits of calibration images, not on `--val`
    let labels: Vec<i64> = predictions(&g, &calib)[..200].to_vec();
    let x = calib.slice(ndarray::s![..200, ..]).to_owned().into_dyn();
    let (_, m, _) = mask_only(&g, cx, (x, labels), options);
    let mut greedy: Vec<&tabconv::passes::mask::LayerDecision> = m.layers.iter().collect();
    greedy.sort_by(|a, b| b.damage_per_mop_saved.total_cmp(&a.damage_per_mop_saved));
    let (first, second) = (greedy[0].layer.clone(), greedy[1].layer.clone());
    let (g, cx, _) = approximated();
    let p = |layers: &[&str]| predictions(&with_exact(&g, &cx, layers), &calib);
    let (exact, lut) = (p(&[&first, &second]), predictions(&g, &calib));
    let (first_only, second_only) = (p(&[&first]), p(&[&second]));
    let i = (0..exact.len())
        .find(|&i| second_only[i] == exact[i] && first_only[i] != exact[i] && lut[i] != exact[i])
        .expect("the constructed case needs an image only the second layer's restore wins back");
    // image 1 (held out) is that one; the rest every model gets right
    let right: Vec<usize> = agree
        .into_iter()
        .filter(|&a| first_only[a] == exact[a] && second_only[a] == exact[a])
        .collect();
    let mut rows = vec![right[0], i];
    rows.extend(&right[1..199]);
    assert_eq!(rows.len(), 200);
    let labels: Vec<i64> = rows.iter().map(|&r| exact[r]).collect();
    let x = calib.select(ndarray::Axis(0), &rows);
    let reference = with_exact(&g, &cx, &[&second]);
    let (got, m, _) = mask_only(
        &g,
        cx,
        (x.clone(), labels.clone()),
        &format!("{options}      confirm_give_back: true\n"),
    );
    let c = m.confirmation.as_ref().expect("confirmed");
    let steps: Vec<&str> = c.points.iter().map(|p| p.restored.as_deref().unwrap_or("")).collect();
    let back = format!("{first} given back");
    assert_eq!(
        steps,
        ["", first.as_str(), second.as_str(), back.as_str()],
        "{:?}",
        c.points
    );
    assert_eq!((c.undone, c.given_back), (0, 1));
    let correct: Vec<Option<usize>> = c.points.iter().map(|p| p.correct).collect();
    assert_eq!(correct, [Some(99), Some(99), Some(100), Some(100)], "{:?}", c.points);
    let d = |m: &tabconv::passes::mask::MaskReport, l: &str| m.layers.iter().find(|d| d.layer == l).unwrap().clone();
    assert_eq!(d(&m, &second).chosen, "exact");
    let given = d(&m, &first);
    assert!(
        given.chosen == "lut" && given.why.starts_with("restored to confirm, then given back"),
        "{given:?}"
    );
    // the model written is the one with only the second layer exact: the first as lookups
    let luts: Vec<&str> = got
        .g
        .node_weights()
        .filter(|n| matches!(n.op, Op::LutMatMul { .. }))
        .map(|n| n.name.as_str())
        .collect();
    assert!(luts.len() == 1 && luts[0].starts_with(first.as_str()), "{luts:?}");
    assert_eq!(predictions(&got, &calib), predictions(&reference, &calib));
    // without the option both stay exact
    let (g2, cx2, _) = approximated();
    let (_, m2, _) = mask_only(&g2, cx2, (x, labels), options);
    let c2 = m2.confirmation.as_ref().unwrap();
    assert_eq!((c2.points.len(), c2.given_back), (3, 0), "{:?}", c2.points);
    assert!(m2.layers.iter().all(|d| d.chosen == "exact"), "{:?}", m2.layers);
}

/// When no point of the greedy path meets the target, the best one seen is kept, not the last:
/// here restoring `easy` (the only layer `force_lut` leaves to restore) loses images.
#[test]
fn the_best_point_of_a_non_monotonic_path_is_kept() {
    let (g, cx, calib) = approximated();
    let e = predictions(&with_exact(&g, &cx, &["easy", "hard"]), &calib);
    let a = predictions(&g, &calib); // the starting point: both layers lookups
    let b = predictions(&with_exact(&g, &cx, &["easy"]), &calib); // after restoring easy
                                                                  // labels making restoring easy lose images, and the exact model better than both points
    let (mut lost_by_restoring, mut exact_only) = (0, 0);
    let labels: Vec<i64> = (0..e.len())
        .map(|i| {
            if e[i] == a[i] && a[i] != b[i] {
                lost_by_restoring += 1;
                a[i]
            } else if a[i] == b[i] && e[i] != a[i] {
                exact_only += 1;
                e[i]
            } else if e[i] == a[i] && a[i] == b[i] {
                e[i]
            } else {
                other_class(&[e[i], a[i], b[i]])
            }
        })
        .collect();
    assert!(
        lost_by_restoring > 0 && exact_only > 0,
        "the constructed model must have both kinds of image: {lost_by_restoring}, {exact_only}"
    );
    let options = "      confirm: 0\n      max_accuracy_drop: 0\n      force_lut: [hard]\n      relearn: false\n      restore_unprofitable: false\n";
    let (out, m, _) = mask_only(&g, cx, (calib.clone(), labels), options);
    assert_eq!(m.path.len(), 2, "{:?}", m.path);
    let (p0, p1) = (m.path[0].correct.unwrap(), m.path[1].correct.unwrap());
    assert_eq!(p0 - p1, lost_by_restoring, "restoring easy lost those images");
    assert_eq!(m.chosen_point, 0, "the better point is kept: {:?}", m.path);
    let easy = m.layers.iter().find(|d| d.layer == "easy").unwrap();
    assert_eq!(easy.chosen, "lut", "{}", easy.why);
    assert!(easy.why.contains("worse than"), "{}", easy.why);
    assert_eq!(predictions(&out, &calib), a, "the model kept is the starting point");
    assert!(dump(&out).unwrap().contains("\"easy/lut\""));
}

/// `prune` puts back a layer the greedy path restored when the target holds without it: with
/// labels that only the layer restored second matters for, the path restores both layers
/// (the first alone is not enough) and pruning then puts the first back as lookups.
#[test]
fn prune_puts_back_a_restore_the_target_does_not_need() {
    let (g, cx, calib) = approximated();
    // the greedy order: damage alone does not depend on the labels
    let (_, m, _) = mask_only(
        &g,
        cx,
        (calib.clone(), vec![0; calib.shape()[0]]),
        "      min_logit_cosine: 1\n      relearn: false\n      restore_unprofitable: false\n",
    );
    let first = m.path[1].restored.clone().expect("a restore");
    let second = m.path[2].restored.clone().expect("two restores");
    let (g, cx, _) = approximated();
    let e = predictions(&with_exact(&g, &cx, &["easy", "hard"]), &calib);
    let only_second = predictions(&with_exact(&g, &cx, &[second.as_str()]), &calib);
    let only_first = predictions(&with_exact(&g, &cx, &[first.as_str()]), &calib);
    let none = predictions(&g, &calib);
    // images where the model with only `second` exact is right whenever the exact one is;
    // elsewhere a class no model predicts (every model wrong)
    let (mut rows, mut labels) = (Vec::new(), Vec::new());
    let (mut first_needed, mut lut_wrong) = (0, 0);
    for i in 0..e.len() {
        let preds = [e[i], only_second[i], only_first[i], none[i]];
        if only_second[i] == e[i] {
            first_needed += usize::from(only_first[i] != e[i]);
            lut_wrong += usize::from(none[i] != e[i]);
            rows.push(i);
            labels.push(e[i]);
        } else if let Some(c) = (0..4).find(|c| !preds.contains(c)) {
            rows.push(i);
            labels.push(c);
        }
    }
    assert!(
        first_needed > 0 && lut_wrong > 0,
        "the constructed case needs images only the second restore fixes: {first_needed}, {lut_wrong}"
    );
    let x = calib.select(ndarray::Axis(0), &rows);
    let want = predictions(&with_exact(&g, &cx, &[second.as_str()]), &x);
    let options =
        "      confirm: 0\n      max_accuracy_drop: 0\n      relearn: false\n      restore_unprofitable: false\n";
    // prune is on by default
    let (out, m, _) = mask_only(&g, cx, (x.clone(), labels.clone()), options);
    assert_eq!(m.path.len(), 3, "both layers restored on the path: {:?}", m.path);
    assert_eq!(m.chosen_point, 2);
    assert_eq!(m.pruned.len(), 1, "{:?}", m.pruned);
    assert_eq!(
        m.pruned[0].restored.as_deref(),
        Some(format!("{first} back as lookups").as_str())
    );
    assert_eq!(m.pruned[0].correct, m.path[2].correct, "the target (no drop) still met");
    let choice = |n: &str| m.layers.iter().find(|d| d.layer == n).unwrap();
    assert_eq!(choice(&first).chosen, "lut", "{}", choice(&first).why);
    assert!(choice(&first).why.contains("prune"), "{}", choice(&first).why);
    assert_eq!(choice(&second).chosen, "exact");
    assert_eq!(
        predictions(&out, &x),
        want,
        "the model kept has only the second layer exact"
    );
    // without prune both stay exact
    let (g, cx, _) = approximated();
    let (_, m, _) = mask_only(
        &g,
        cx,
        (x.clone(), labels.clone()),
        &format!("{options}      prune: false\n"),
    );
    assert!(m.pruned.is_empty());
    assert!(m.layers.iter().all(|d| d.chosen == "exact"), "{:?}", m.layers);
    // a target no point meets (a reduction target restores while it allows): nothing to try,
    // and a note says so
    let (g, cx, _) = approximated();
    let options =
        "      target_reduction: 0.99\n      prune: true\n      relearn: false\n      restore_unprofitable: false\n";
    let (_, m, notes) = mask_only(&g, cx, (x, labels), options);
    assert!(m.pruned.is_empty());
    assert!(notes.iter().any(|n| n.contains("prune tried nothing")), "{notes:?}");
}

/// The relearned model is reported (`final_point`) only when it is kept; when it is worse on
/// the target's metric the greedy choice stays, and the report says so in a note only.
#[test]
fn only_a_kept_relearned_model_is_reported() {
    let (g, cx, calib) = approximated();
    let val_x = calib.slice(ndarray::s![..1000, ..]).to_owned().into_dyn();
    // what mask's relearning computes: the lut pass again, through the exact `easy`
    let greedy = with_exact(&g, &cx, &["easy"]);
    let mut relearned = with_exact(&g, &cx, &["easy", "hard"]);
    let relearn = Pipeline::parse(
        "name: t\npasses:\n  - lut:\n      encoder: argmin\n      fc_subspace: 4\n      refit: false\n      hold_out: false\n      keep_exact: [easy]\n",
        "t",
    )
    .unwrap();
    let mut rcx = PassCx {
        calib: Some(calib.clone()),
        ..Default::default()
    };
    run_pipeline(&mut relearned, &relearn, &mut rcx, |_, _| Ok(())).unwrap();
    let (pg, pr) = (predictions(&greedy, &val_x), predictions(&relearned, &val_x));
    assert!(pg != pr, "relearning must change some predictions for this test");
    let options = "      confirm: 0\n      max_accuracy_drop: 100\n      keep_exact: [easy]\n      relearn: true\n      restore_unprofitable: false\n";
    // labelled as the greedy model predicts: relearning can only lose images, and is rejected
    let (out, m, notes) = mask_only(&g, cx, (val_x.clone(), pg.clone()), options);
    assert!(
        m.final_point.is_none(),
        "a rejected model is not reported: {:?}",
        m.final_point
    );
    assert_eq!(m.path[m.chosen_point].accuracy, Some(1.0));
    assert!(
        notes
            .iter()
            .any(|n| n.contains("did not help") && n.contains("100.00%")),
        "{notes:?}"
    );
    assert_eq!(predictions(&out, &val_x), pg, "the greedy model is kept");
    // labelled as the relearned model predicts: it is kept and reported
    let (g, cx, _) = approximated();
    let (out, m, notes) = mask_only(&g, cx, (val_x.clone(), pr.clone()), options);
    let f = m.final_point.as_ref().expect("the kept relearned model is reported");
    assert_eq!(f.accuracy, Some(1.0));
    assert!(!notes.iter().any(|n| n.contains("did not help")), "{notes:?}");
    assert_eq!(predictions(&out, &val_x), pr, "the relearned model is kept");
}

/// After a kept relearning, prune runs again: a layer the walk restored goes back as its first
/// lookups when the relearned model leaves room for it. LeNet-5 with its fully connected layers
/// forced to stay lookups, so the walk can only restore the convolutions: relearning refits the
/// fully connected layers through the exact convolutions, and at a logit-cosine target near 0.97
/// the walk misses the target, relearning meets it and a convolution goes back as lookups. There
/// the written model has that layer as lookups, the last point is the one kept and meets the
/// target, and the layer's decision says why. With `relearn_rounds`, at 0.97 the tables
/// are relearned again after `conv1` went back: a relearned point follows a put-back, meets the
/// target, and appears only when rounds are allowed. (Seed 8: which layer goes back where
/// depends on the calibration images drawn and on the trees fitted to them; with the trees'
/// output-aware splits and beam search, seeds 0, 8 and 12 relearn again after a put-back at
/// 0.968–0.970, seeds 3, 5 and 15 only put layers back, at 0.966–0.972, the other seeds of
/// 0–15 neither, at 0.962–0.976 in steps of 0.002.)
#[test]
fn prune_runs_again_after_relearning() {
    let calib = npy("data/mnist_calib.npy");
    let (mut seen, mut rounds_seen) = (0, 0);
    for (target, rounds) in [0.968, 0.969, 0.97, 0.971].into_iter().flat_map(|t| [(t, 0), (t, 2)]) {
        let mut g = tabconv::onnx::load_model(&fixture("models/lenet5.onnx")).unwrap();
        let text = format!(
            "name: t\npasses:\n  - fold-batchnorm:\n  - gemm-to-matmul:\n  - conv-to-im2col:\n  - constant-fold:\n  - lut:\n      max_rows: 2048\n      learn: none\n      hold_out: false\n  - mask:\n      min_logit_cosine: {target}\n      restore_unprofitable: false\n      relearn_rounds: {rounds}\n      force_lut: ['/fc*']\n"
        );
        let mut cx = PassCx {
            calib: Some(calib.clone()),
            seed: 8,
            ..Default::default()
        };
        let report = run_pipeline(&mut g, &Pipeline::parse(&text, "t").unwrap(), &mut cx, |_, _| Ok(())).unwrap();
        let m = report.mask.expect("mask ran");
        let Some(last) = m.pruned_after_relearning.last() else {
            continue;
        };
        seen += 1;
        let f = m.final_point.as_ref().expect("only after a kept relearning");
        assert!(
            f.logit_cosine >= target && last.logit_cosine >= target,
            "{target}: {f:?} {last:?}"
        );
        assert!(
            last.reduction_everything_counted > f.reduction_everything_counted,
            "{target}"
        );
        let kept = m.kept();
        assert!(
            kept.restored == last.restored && kept.logit_cosine == last.logit_cosine,
            "{target}: the last point after relearning is the model kept"
        );
        for d in m.layers.iter().filter(|d| d.why.contains("put back after relearning")) {
            assert_eq!(d.chosen, "lut", "{target}: {d:?}");
            assert!(
                g.g.node_weights()
                    .any(|n| n.name.starts_with(&d.layer) && matches!(n.op, Op::LutMatMul { .. })),
                "{target}: {} is lookups in the written model",
                d.layer
            );
        }
        // a relearning between put-backs: only with rounds, after a put-back, meeting the target
        let again: Vec<usize> = (0..m.pruned_after_relearning.len())
            .filter(|&i| m.pruned_after_relearning[i].restored.as_deref() == Some(RELEARNED_AGAIN))
            .collect();
        assert!(again.len() <= rounds, "{target}: {again:?}");
        for &i in &again {
            assert!(i > 0, "{target}: relearned again before any put-back");
            assert!(m.pruned_after_relearning[i].logit_cosine >= target, "{target}");
        }
        rounds_seen += usize::from(!again.is_empty());
        assert_eq!(
            m.layers
                .iter()
                .filter(|d| d.why.contains("put back after relearning"))
                .count(),
            m.pruned_after_relearning.len() - again.len()
        );
    }
    assert!(seen > 0, "no target put a layer back after relearning");
    assert!(rounds_seen > 0, "no target relearned again after a put-back");
}

/// NIN (fitted lookups, no learning) masked to a logit cosine of 0.985, with and without
/// `relearn_path`.
fn nin_relearn_path(search: bool) -> (Graph, tabconv::passes::mask::MaskReport) {
    let mut g = tabconv::onnx::load_model(&fixture("models/nin.onnx")).unwrap();
    let text = format!(
        "name: t\npasses:\n  - fold-batchnorm:\n  - gemm-to-matmul:\n  - conv-to-im2col:\n  - constant-fold:\n  - lut:\n      max_rows: 2048\n      learn: none\n  - mask:\n      min_logit_cosine: 0.985\n      restore_unprofitable: false\n      confirm: 0\n      relearn_path: {search}\n"
    );
    let mut cx = PassCx {
        calib: Some(npy("data/mnist_calib.npy")),
        ..Default::default()
    };
    let report = run_pipeline(&mut g, &Pipeline::parse(&text, "t").unwrap(), &mut cx, |_, _| Ok(())).unwrap();
    (g, report.mask.expect("mask ran"))
}

/// `relearn_path` searches the greedy walk's restores for the shortest prefix whose relearned
/// model meets the target. On NIN the walk restores the small 1×1 layers first; relearning
/// refits the layers after each restored one on its exact output, so fewer restores meet the
/// target once relearned (here 6 of the walk's 8). The probes are a bisection: every prefix
/// shorter than the one kept misses the target, the kept one meets it and is the reported
/// relearned model; the walk's later restores are lookups in the written model, the model
/// keeps exactly the prefix exact, and it removes more arithmetic than the model prune and one
/// relearning keep without the search (48.2 % here; 58.4 % with it).
#[test]
fn relearn_path_keeps_the_shortest_relearned_prefix() {
    let (g, m) = nin_relearn_path(true);
    let restores = m.chosen_point;
    assert!(restores >= 2, "the walk restored {restores} layers: nothing to search");
    let prefix = |p: &tabconv::passes::mask::PathPoint| -> usize {
        let l = p.restored.as_deref().expect("a probe is labelled");
        let n = l.strip_prefix(RELEARNED_PREFIX).expect("the probe label");
        n.trim_end_matches(')').parse().expect("a prefix length")
    };
    let met: Vec<usize> = m
        .relearned_path
        .iter()
        .filter(|p| p.logit_cosine >= 0.985)
        .map(prefix)
        .collect();
    let kept = *met
        .iter()
        .min()
        .expect("some prefix shorter than the walk's meets the target");
    assert!(kept < restores);
    for p in &m.relearned_path {
        assert!(prefix(p) < restores, "the walk's own choice is not probed");
        if prefix(p) < kept {
            assert!(p.logit_cosine < 0.985, "a shorter prefix met the target: {p:?}");
        }
    }
    // the kept prefix is a boundary: the one just shorter was probed and missed
    if kept > 0 {
        assert!(
            m.relearned_path
                .iter()
                .any(|p| prefix(p) == kept - 1 && p.logit_cosine < 0.985),
            "{:?}",
            m.relearned_path
        );
    }
    // bisection: at most ceil(log2(restores + 1)) probes, each prefix once
    assert!(m.relearned_path.len() <= (usize::BITS - restores.leading_zeros()) as usize);
    let f = m
        .final_point
        .as_ref()
        .expect("the relearned prefix is the relearned model");
    assert_eq!(prefix(f), kept);
    assert!(f.logit_cosine >= 0.985);
    let exact: Vec<&str> = m
        .layers
        .iter()
        .filter(|d| d.chosen == "exact")
        .map(|d| d.layer.as_str())
        .collect();
    let searched: Vec<&str> = m
        .layers
        .iter()
        .filter(|d| d.why.starts_with("kept as LUT: relearned with the walk's first"))
        .map(|d| d.layer.as_str())
        .collect();
    assert_eq!(searched.len(), restores - kept, "{:?}", m.layers);
    assert_eq!(exact.len(), kept, "{exact:?}");
    for layer in &searched {
        assert!(
            g.g.node_weights()
                .any(|n| n.name.starts_with(layer) && matches!(n.op, Op::LutMatMul { .. })),
            "{layer} is lookups in the written model"
        );
    }
    for layer in &exact {
        assert!(
            !g.g.node_weights()
                .any(|n| n.name.starts_with(layer) && matches!(n.op, Op::LutMatMul { .. })),
            "{layer} is exact in the written model"
        );
    }
    let (_, plain) = nin_relearn_path(false);
    assert!(plain.relearned_path.is_empty());
    assert!(
        m.kept().reduction_everything_counted > plain.kept().reduction_everything_counted,
        "with the search {} removed, without {}",
        m.kept().reduction_everything_counted,
        plain.kept().reduction_everything_counted
    );
}

/// `refine_subspace` fits the layers the path left exact again over smaller codebooks and keeps
/// each one whose lookups still meet the target: both layers miss a logit cosine of 0.997 over
/// 4-value codebooks, so the path restores both and prune puts neither back; over 1-value
/// codebooks `easy` alone meets it (tried first: it saves more) and stays lookups, `hard` then
/// does not and stays exact. The kept model is the one reported, and meets the target.
#[test]
fn refine_makes_exact_layers_lookups_over_smaller_codebooks() {
    let (g, cx, calib) = approximated();
    let val_x = calib.slice(ndarray::s![..500, ..]).to_owned().into_dyn();
    let exact = with_exact(&g, &cx, &["easy", "hard"]);
    let labels = predictions(&exact, &val_x);
    let options = "      min_logit_cosine: 0.997\n      relearn: false\n      restore_unprofitable: false\n";
    let (out, m, _) = mask_only(
        &g,
        cx,
        (val_x.clone(), labels.clone()),
        &format!("{options}      refine_subspace: 1\n"),
    );
    assert_eq!(m.path.len(), 3, "both layers restored: {:?}", m.path);
    assert!(m.pruned.is_empty(), "{:?}", m.pruned);
    assert_eq!(m.refined.len(), 1, "{:?}", m.refined);
    assert_eq!(
        m.refined[0].restored.as_deref(),
        Some("easy as lookups over codebooks of 1")
    );
    assert!(m.kept().logit_cosine >= 0.997, "{:?}", m.kept());
    assert_eq!(
        m.kept().restored,
        m.refined[0].restored,
        "the refined model is the one kept"
    );
    let (easy, hard) = (choice_in(&m, "easy"), choice_in(&m, "hard"));
    assert_eq!(easy.chosen, "lut", "{}", easy.why);
    assert!(easy.why.contains("codebooks of 1"), "{}", easy.why);
    assert_eq!(hard.chosen, "exact", "{}", hard.why);
    // the graph kept: `easy` as lookups over 1-value codebooks (8 of them), `hard` a MatMul,
    // and its logits as close to the exact model's as reported (the first 256 calibration
    // images, which mask measures on)
    let encoders: Vec<usize> = out
        .topo_order()
        .unwrap()
        .into_iter()
        .filter_map(|n| match &out.node(n).op {
            Op::PqEncode(e) => Some(e.subspace),
            _ => None,
        })
        .collect();
    assert_eq!(encoders, vec![1], "one encoder, over 1-value codebooks");
    assert!(out.find("hard").is_some_and(|n| matches!(out.node(n).op, Op::MatMul)));
    let x = calib.slice(ndarray::s![..256, ..]).to_owned().into_dyn();
    let logits = |g: &Graph| as_f32(&run(g, vec![Tensor::F32(x.clone())]).unwrap()[0]);
    let (a, b) = (logits(&exact), logits(&out));
    let cos: f64 = a
        .outer_iter()
        .zip(b.outer_iter())
        .map(|(a, b)| {
            let dot: f64 = a.iter().zip(&b).map(|(p, q)| (p * q) as f64).sum();
            let n = |v: &ndarray::ArrayViewD<f32>| v.iter().map(|p| (p * p) as f64).sum::<f64>().sqrt();
            dot / (n(&a) * n(&b))
        })
        .sum::<f64>()
        / 256.0;
    assert!((cos - m.kept().logit_cosine).abs() < 1e-6, "{cos} vs {:?}", m.kept());
    // a target both meet over 1-value codebooks: `hard` is fitted through `easy`'s new lookups
    let (g, cx, _) = approximated();
    let loose = "      min_logit_cosine: 0.99\n      relearn: false\n      restore_unprofitable: false\n";
    let (out, m, _) = mask_only(
        &g,
        cx,
        (val_x.clone(), labels.clone()),
        &format!("{loose}      refine_subspace: 1\n"),
    );
    assert_eq!(m.path.len(), 3, "both layers restored: {:?}", m.path);
    let refined: Vec<_> = m.refined.iter().map(|p| p.restored.clone().unwrap()).collect();
    assert_eq!(
        refined,
        [
            "easy as lookups over codebooks of 1",
            "hard as lookups over codebooks of 1"
        ]
    );
    assert!(m.kept().logit_cosine >= 0.99, "{:?}", m.kept());
    assert!(m.layers.iter().all(|d| d.chosen == "lut"), "{:?}", m.layers);
    assert!(out.find("hard").is_none_or(|n| !matches!(out.node(n).op, Op::MatMul)));
    // after relearning `easy` (only `hard` restored), the refined `hard` is priced by its own
    // lookups: 8 one-value codebooks × 4 outputs per row, not `easy`'s 2 × 8 that the relearn
    // left in the pass context
    let (g, cx, _) = approximated();
    let relearn = "      min_logit_cosine: 0.95\n      relearn: true\n      restore_unprofitable: false\n      refine_subspace: 1\n";
    let (out, m, _) = mask_only(&g, cx, (val_x.clone(), labels.clone()), relearn);
    let restored: Vec<_> = m.path.iter().filter_map(|p| p.restored.clone()).collect();
    assert_eq!(restored, ["hard"], "{:?}", m.path);
    assert!(m.final_point.is_some(), "relearning kept");
    assert_eq!(choice_in(&m, "hard").chosen, "lut", "{}", choice_in(&m, "hard").why);
    assert_eq!(choice_in(&m, "hard").lut_cost.lookups, 8 * 4);
    // then every LUT layer relearned through the final mix, `hard` still over 1-value
    // codebooks (the refine's choice passed on to the lut pass), kept: it is better here
    let steps: Vec<_> = m.refined.iter().map(|p| p.restored.clone().unwrap()).collect();
    assert_eq!(
        steps,
        ["hard as lookups over codebooks of 1", "(relearned after refining)"]
    );
    assert!(m.refined[1].logit_cosine > m.refined[0].logit_cosine, "{:?}", m.refined);
    let subspaces: Vec<usize> = ["easy/pq_encode", "hard/pq_encode"]
        .iter()
        .map(|n| match &out.node(out.find(n).unwrap()).op {
            Op::PqEncode(e) => e.subspace,
            op => panic!("{op:?}"),
        })
        .collect();
    assert_eq!(subspaces, [4, 1]);
    // `easy` kept exact by the options (restored before the path, leaving its node without
    // facts): `hard`, fitted after it, is still refined
    let (g, cx, _) = approximated();
    let kept = "      min_logit_cosine: 0.995\n      keep_exact: [easy]\n      relearn: false\n      restore_unprofitable: false\n      refine_subspace: 1\n";
    let (_, m, _) = mask_only(&g, cx, (val_x.clone(), labels.clone()), kept);
    let refined: Vec<_> = m.refined.iter().map(|p| p.restored.clone().unwrap()).collect();
    assert_eq!(refined, ["hard as lookups over codebooks of 1"], "{:?}", m.path);
    assert_eq!(choice_in(&m, "easy").chosen, "exact");
    // off by default: both stay exact
    let (g, cx, _) = approximated();
    let (_, m, _) = mask_only(&g, cx, (val_x, labels), options);
    assert!(m.refined.is_empty());
    assert!(m.layers.iter().all(|d| d.chosen == "exact"), "{:?}", m.layers);
}

fn choice_in<'a>(m: &'a tabconv::passes::mask::MaskReport, layer: &str) -> &'a tabconv::passes::mask::LayerDecision {
    m.layers.iter().find(|d| d.layer == layer).unwrap()
}

/// `refine_encoder` fits the layers left as argmin lookups again with the hash-tree encoder
/// (comparisons instead of multiply-adds) and keeps each whose model still meets the target:
/// under a loose target both become tree lookups, each step removing more arithmetic; under a
/// target between the two steps' logit cosines only `easy` (tried first: the same encoding
/// work, graph order) does; when the time model prices the trees slower, or without the
/// option, both stay argmin.
#[test]
fn refine_makes_argmin_lookups_tree_lookups_where_the_target_holds() {
    use tabconv::ir::op::Encoder::{Argmin, Tree};
    let encoders = |g: &Graph| -> Vec<tabconv::ir::op::Encoder> {
        ["easy/pq_encode", "hard/pq_encode"]
            .iter()
            .map(|n| match &g.node(g.find(n).expect("an encoder")).op {
                Op::PqEncode(e) => e.encoder,
                op => panic!("{n}: {op:?}"),
            })
            .collect()
    };
    let (g, cx, calib) = approximated();
    let val_x = calib.slice(ndarray::s![..500, ..]).to_owned().into_dyn();
    let labels = predictions(&with_exact(&g, &cx, &["easy", "hard"]), &val_x);
    let options = "      relearn: false\n      restore_unprofitable: false\n";
    let refine = format!("{options}      refine_encoder: true\n");
    let (out, m, _) = mask_only(
        &g,
        cx,
        (val_x.clone(), labels.clone()),
        &format!("      min_logit_cosine: 0.5\n{refine}"),
    );
    let steps: Vec<_> = m.refined.iter().map(|p| p.restored.clone().unwrap()).collect();
    assert_eq!(
        steps,
        [
            "easy as lookups with the tree encoder",
            "hard as lookups with the tree encoder"
        ]
    );
    assert_eq!(encoders(&out), [Tree, Tree]);
    let start = &m.path[m.chosen_point];
    let (c1, c2) = (m.refined[0].logit_cosine, m.refined[1].logit_cosine);
    let r = |p: &tabconv::passes::mask::PathPoint| p.reduction_everything_counted;
    assert!(
        r(start) < r(&m.refined[0]) && r(&m.refined[0]) < r(&m.refined[1]),
        "{m:?}"
    );
    for l in ["easy", "hard"] {
        let d = choice_in(&m, l);
        assert_eq!((d.chosen, d.lut_cost.encode_macs), ("lut", 0), "{d:?}");
        assert!(
            d.lut_cost.encode_compares > 0 && d.why.contains("tree encoder"),
            "{d:?}"
        );
    }
    // a target the first step meets and the second does not
    assert!(c2 < c1 && c1 < start.logit_cosine, "{c1} {c2} {start:?}");
    let (g, cx, _) = approximated();
    let mid = format!("      min_logit_cosine: {}\n{refine}", (c1 + c2) / 2.0);
    let (out, m, _) = mask_only(&g, cx, (val_x.clone(), labels.clone()), &mid);
    assert_eq!(m.refined.len(), 1, "{:?}", m.refined);
    assert_eq!(m.refined[0].logit_cosine, c1, "the same fit as above");
    assert_eq!(encoders(&out), [Tree, Argmin]);
    let hard = choice_in(&m, "hard");
    assert!(
        hard.lut_cost.encode_macs > 0 && !hard.why.contains("refine"),
        "{hard:?}"
    );
    // a time model that prices the trees' comparisons (gathered rows here) above the argmin
    // encoders' multiply-adds: no layer is made slower
    let (g, cx, _) = approximated();
    let slow = format!("      min_logit_cosine: 0.5\n{refine}      time_model:\n        compare: 1000\n");
    let (out, m, _) = mask_only(&g, cx, (val_x.clone(), labels.clone()), &slow);
    assert!(m.refined.is_empty(), "{:?}", m.refined);
    assert_eq!(encoders(&out), [Argmin, Argmin]);
    // off by default
    let (g, cx, _) = approximated();
    let (out, m, _) = mask_only(
        &g,
        cx,
        (val_x, labels),
        &format!("      min_logit_cosine: 0.5\n{options}"),
    );
    assert!(m.refined.is_empty());
    assert_eq!(encoders(&out), [Argmin, Argmin]);
}

/// LeNet-5 through the default pipeline's rewrites, `lut` (argmin) and a `mask` pass with
/// these options; the compiled graph and the mask report.
fn lenet_masked(mask: &str) -> (Graph, tabconv::passes::mask::MaskReport) {
    lenet_masked_with("      encoder: argmin\n", mask)
}

/// [`lenet_masked`] with these `lut` options.
fn lenet_masked_with(lut: &str, mask: &str) -> (Graph, tabconv::passes::mask::MaskReport) {
    lenet_target(lut, &format!("      min_logit_cosine: 0.5\n{mask}"))
}

/// [`lenet_masked_with`] with the mask's target among `mask`.
fn lenet_target(lut: &str, mask: &str) -> (Graph, tabconv::passes::mask::MaskReport) {
    let mut g = tabconv::onnx::load_model(&fixture("models/lenet5.onnx")).unwrap();
    let text = format!(
        "name: t\npasses:\n  - fold-batchnorm:\n  - gemm-to-matmul:\n  - conv-to-im2col:\n  - constant-fold:\n  - lut:\n{lut}  - mask:\n      relearn: false\n      restore_unprofitable: false\n{mask}  - dead-code:\n"
    );
    let p = Pipeline::parse(&text, "test").unwrap();
    let mut cx = PassCx {
        calib: Some(npy("data/mnist_calib.npy")),
        ..Default::default()
    };
    let report = run_pipeline(&mut g, &p, &mut cx, |_, _| Ok(())).unwrap();
    (g, report.mask.expect("mask ran"))
}

/// `refine_pixel` fits the convolutions left as argmin lookups over window codebooks again
/// over pixel codebooks where they fit, and keeps each whose model still meets the target and
/// whose lookups the time model prices no slower: on LeNet-5 with 3 channels per codebook,
/// conv2 (6 input channels) becomes pixel lookups (each input value encoded once, not once per
/// tap) and the model removes more arithmetic; conv1 (one channel) and the fully connected
/// layers are left as they were; the refit keeps the user's `lut.layers` entry for the layer;
/// a time model pricing pixel encoding far above the window's keeps conv2 as it was; off by
/// default.
#[test]
fn refine_makes_window_lookups_pixel_lookups_where_they_fit() {
    let pixel = |g: &Graph| -> Vec<String> {
        g.topo_order()
            .unwrap()
            .into_iter()
            .filter(|&n| matches!(&g.node(n).op, Op::PqEncode(p) if p.pixel))
            .map(|n| g.node(n).name.clone())
            .collect()
    };
    let conv2 = "/conv2/Conv/matmul";
    let (out, m) = lenet_masked("      refine_pixel: 3\n");
    let steps: Vec<_> = m.refined.iter().map(|p| p.restored.clone().unwrap()).collect();
    assert_eq!(
        steps,
        [format!("{conv2} as lookups over pixel codebooks of 3 channels")]
    );
    assert_eq!(pixel(&out), [format!("{conv2}/pq_encode")]);
    let d = choice_in(&m, conv2);
    assert_eq!(d.chosen, "lut", "{d:?}");
    assert!(d.why.contains("pixel codebooks"), "{}", d.why);
    let start = &m.path[m.chosen_point];
    let r = |p: &tabconv::passes::mask::PathPoint| p.reduction_everything_counted;
    assert!(r(start) < r(&m.refined[0]), "{start:?} {:?}", m.refined[0]);
    assert!(m.kept().logit_cosine >= 0.5, "{:?}", m.kept());
    for l in m.layers.iter().filter(|d| d.layer != conv2) {
        assert!(!l.why.contains("refine"), "{l:?}");
    }
    // what the layer encodes: each of its input values once, K multiply-adds each
    let enc = out.find(&format!("{conv2}/pq_encode")).unwrap();
    let input = out.fact(out.inputs_of(enc)[0]).unwrap().shape.clone();
    let values: u64 = input[1..].iter().map(|d| d.known().unwrap() as u64).product();
    assert_eq!(d.lut_cost.encode_macs, values * 16, "{d:?}");
    // the refit keeps the user's own entry for the layer: `auto` would give conv2 (16 outputs,
    // fewer than 4·K) the tree encoder, the entry keeps it argmin, and so does its pixel refit
    let (out, m) = lenet_masked_with(
        "      encoder: auto\n      layers: [{name: '/conv2/*', encoder: argmin}]\n",
        "      refine_pixel: 3\n",
    );
    assert_eq!(m.refined.len(), 1, "{:?}", m.refined);
    let enc = out.find(&format!("{conv2}/pq_encode")).unwrap();
    assert!(
        matches!(&out.node(enc).op, Op::PqEncode(p) if p.pixel && p.encoder == tabconv::ir::op::Encoder::Argmin),
        "{:?}",
        out.node(enc).op
    );
    // priced slower than the window codebooks: kept as it was
    let slow =
        "      refine_pixel: 3\n      time_model:\n        encode_mac_pixel: 1000\n        encode_mac_pixel_i8: 1000\n";
    let (out, m) = lenet_masked(slow);
    assert!(m.refined.is_empty(), "{:?}", m.refined);
    assert!(pixel(&out).is_empty());
    // off by default
    let (out, m) = lenet_masked("");
    assert!(m.refined.is_empty() && pixel(&out).is_empty());
}

/// `coarsen_pixel` fits the layers left as lookups over pixel codebooks of fewer channels
/// again over pixel codebooks of that many: LeNet-5's conv2 over 3-channel codebooks (two per
/// tap) becomes one 6-channel codebook per tap, half the lookups and the same encoding work,
/// and the model removes more arithmetic; under a target between the two fits' logit cosines it
/// stays as it was; off by default.
#[test]
fn coarsen_halves_the_lookups_of_pixel_layers() {
    let conv2 = "/conv2/Conv/matmul";
    let lut = "      encoder: argmin\n      pixel_subspace: 3\n";
    let others = "      keep_exact: ['/conv1/*', '/fc*']\n";
    let channels = |g: &Graph| -> Option<usize> {
        let enc = g.find(&format!("{conv2}/pq_encode"))?;
        match &g.node(enc).op {
            Op::PqEncode(p) if p.pixel => Some(p.subspace),
            _ => None,
        }
    };
    let (out, before) = lenet_target(lut, &format!("      min_logit_cosine: 0.5\n{others}"));
    assert_eq!(channels(&out), Some(3));
    assert!(before.refined.is_empty(), "off by default: {:?}", before.refined);
    let (out, m) = lenet_target(
        lut,
        &format!("      min_logit_cosine: 0.5\n{others}      coarsen_pixel: 6\n"),
    );
    let steps: Vec<_> = m.refined.iter().map(|p| p.restored.clone().unwrap()).collect();
    assert_eq!(
        steps,
        [format!("{conv2} as lookups over pixel codebooks of 6 channels")]
    );
    assert_eq!(channels(&out), Some(6));
    let (old, new) = (choice_in(&before, conv2), choice_in(&m, conv2));
    assert_eq!(new.chosen, "lut", "{new:?}");
    assert_eq!(2 * new.lut_cost.lookups, old.lut_cost.lookups, "{old:?} {new:?}");
    assert_eq!(new.lut_cost.encode_macs, old.lut_cost.encode_macs, "{old:?} {new:?}");
    let r = |p: &tabconv::passes::mask::PathPoint| p.reduction_everything_counted;
    assert!(r(before.kept()) < r(m.kept()), "{:?} {:?}", before.kept(), m.kept());
    // a target the coarser codebooks miss: conv2 stays over 3 channels
    let (c3, c6) = (before.kept().logit_cosine, m.refined[0].logit_cosine);
    assert!(c6 < c3, "the case needs the finer codebooks to fit better: {c3} {c6}");
    let target = format!("      min_logit_cosine: {}\n{others}", (c3 + c6) / 2.0);
    let (out, m) = lenet_target(lut, &format!("{target}      coarsen_pixel: 6\n"));
    assert!(m.refined.is_empty(), "{:?}", m.refined);
    assert_eq!(channels(&out), Some(3));
    assert_eq!(choice_in(&m, conv2).chosen, "lut");
}

/// `confirm` undoes the refine steps' changes before it restores layers, latest first: the
/// tree lookups `refine_encoder` makes here get every image chosen on right but lose one held
/// out (1 point of 100, twice the budget), so the confirmation puts the refined layers back to
/// their argmin lookups, latest first, until none is lost there, and restores no layer.
#[test]
fn confirm_undoes_refine_steps_first() {
    let (g, cx, calib) = approximated();
    let exact_model = with_exact(&g, &cx, &["easy", "hard"]);
    let exact = predictions(&exact_model, &calib);
    let argmin = predictions(&g, &calib);
    let loose = "      relearn: false\n      restore_unprofitable: false\n      refine_encoder: true\n";
    // the two refine steps' models, fitted as in the run below (the fits do not depend on the
    // target): both layers trees, and `easy` alone (a target between the two steps' cosines)
    let val = (
        calib.slice(ndarray::s![..500, ..]).to_owned().into_dyn(),
        exact[..500].to_vec(),
    );
    let (both, m, _) = mask_only(&g, cx, val.clone(), &format!("      min_logit_cosine: 0.5\n{loose}"));
    assert_eq!(m.refined.len(), 2, "{:?}", m.refined);
    let mid = (m.refined[0].logit_cosine + m.refined[1].logit_cosine) / 2.0;
    let (g1, cx1, _) = approximated();
    let (easy, m1, _) = mask_only(&g1, cx1, val, &format!("      min_logit_cosine: {mid}\n{loose}"));
    assert_eq!(m1.refined.len(), 1, "{:?}", m1.refined);
    let (both_p, easy_p) = (predictions(&both, &calib), predictions(&easy, &calib));
    let all: Vec<usize> = (0..exact.len())
        .filter(|&i| argmin[i] == exact[i] && both_p[i] == exact[i] && easy_p[i] == exact[i])
        .collect();
    let lost: Vec<usize> = (0..exact.len())
        .filter(|&i| argmin[i] == exact[i] && both_p[i] != exact[i])
        .collect();
    assert!(all.len() >= 199 && !lost.is_empty(), "the constructed case needs both");
    // image 1 (held out) is the one the trees lose; the others every model gets right
    let mut rows = vec![all[0], lost[0]];
    rows.extend(&all[1..199]);
    let labels: Vec<i64> = rows.iter().map(|&i| exact[i]).collect();
    let x = calib.select(ndarray::Axis(0), &rows);
    let (g2, cx2, _) = approximated();
    let (got, m, _) = mask_only(
        &g2,
        cx2,
        (x.clone(), labels),
        &format!("      max_accuracy_drop: 0.5\n{loose}"),
    );
    assert_eq!(
        m.refined.len(),
        2,
        "both trees kept on the images chosen on: {:?}",
        m.refined
    );
    let c = m.confirmation.as_ref().expect("confirmed");
    assert_eq!(c.points[0].correct, Some(99), "{:?}", c.points);
    let last = c.points.last().unwrap();
    assert_eq!(last.correct, Some(100), "{:?}", c.points);
    // each step after the first undoes one refine change, `hard`'s (the latest) first
    let steps: Vec<&str> = c.points[1..].iter().map(|p| p.restored.as_deref().unwrap()).collect();
    let want = ["hard as before refine", "easy as before refine"];
    assert_eq!(steps, want[..steps.len()], "{:?}", c.points);
    // `easy`'s tree alone loses the image or not: the undoing stops where none is lost
    assert_eq!(steps.len(), if easy_p[lost[0]] == exact[lost[0]] { 1 } else { 2 });
    assert_eq!(c.undone, steps.len(), "every step undid a refine change");
    for d in &m.layers {
        assert_eq!(d.chosen, "lut", "no layer restored: {d:?}");
        let undone = steps.iter().any(|s| s.starts_with(d.layer.as_str()));
        assert_eq!(d.why.contains("undone to confirm"), undone, "{d:?}");
    }
    // the model written is the one confirmed
    let pred = predictions(&got, &x);
    assert_eq!(pred[1], exact[lost[0]]);
    let undone_all = steps.len() == 2;
    let reference = if undone_all { &g } else { &easy };
    assert_eq!(pred, predictions(reference, &x));
}

/// `refine_window` fits the layers left exact for their damage whose lookups were over pixel
/// codebooks again over window codebooks: LeNet-5's conv2 over one 6-channel pixel codebook
/// per tap reads a lower logit cosine alone than over its window codebooks, so under a target
/// between the two (the other layers kept exact) the walk restores it and refine makes it
/// window lookups; with the option off it stays exact.
#[test]
fn refine_makes_exact_pixel_layers_window_lookups() {
    let conv2 = "/conv2/Conv/matmul";
    let others = "      keep_exact: ['/conv1/*', '/fc*']\n";
    let alone = |pixel: usize| {
        let (_, m) = lenet_masked_with(
            &format!("      encoder: argmin\n      pixel_subspace: {pixel}\n"),
            others,
        );
        choice_in(&m, conv2).logit_cosine_alone
    };
    let (pixel, window) = (alone(6), alone(0));
    assert!(
        pixel < window,
        "the case needs window codebooks to fit better: {pixel} {window}"
    );
    let target = format!("      min_logit_cosine: {}\n{others}", (pixel + window) / 2.0);
    let lut = "      encoder: argmin\n      pixel_subspace: 6\n";
    let (out, m) = lenet_target(lut, &format!("{target}      refine_window: true\n"));
    let steps: Vec<_> = m.refined.iter().map(|p| p.restored.clone().unwrap()).collect();
    assert_eq!(
        steps,
        [format!("{conv2} as lookups over window codebooks")],
        "{:?}",
        m.path
    );
    let d = choice_in(&m, conv2);
    assert_eq!(d.chosen, "lut", "{d:?}");
    let enc = out.find(&format!("{conv2}/pq_encode")).expect("conv2 as lookups");
    assert!(
        matches!(&out.node(enc).op, Op::PqEncode(p) if !p.pixel),
        "{:?}",
        out.node(enc).op
    );
    assert!(m.kept().logit_cosine >= (pixel + window) / 2.0, "{:?}", m.kept());
    // without the option (on by default) the walk's restore stays
    let (out, m) = lenet_target(lut, &format!("{target}      refine_window: false\n"));
    assert!(m.refined.is_empty(), "{:?}", m.refined);
    assert_eq!(choice_in(&m, conv2).chosen, "exact");
    assert!(out.find(&format!("{conv2}/pq_encode")).is_none());
}

/// `refine_k` fits the layers the path left exact again with more prototypes per codebook and
/// keeps each whose model still meets the target. The two-layer model's inputs are 64 distinct
/// 4-value vectors per codebook: 16 prototypes cannot hold them, 64 can. At a logit cosine of
/// 0.997 the path restores both layers and prune puts neither back; with `refine_k: 64`,
/// `easy` over 64 codes meets the target and stays lookups (prototypes and tables of 64 entries
/// per codebook), `hard` (whose inputs are not 64 vectors) does not and stays exact, and the
/// kept model is the refined one. Without `refine_k` both stay exact.
#[test]
fn refine_makes_exact_layers_lookups_with_more_codes() {
    let (g, cx, calib) = approximated();
    let val_x = calib.slice(ndarray::s![..500, ..]).to_owned().into_dyn();
    let exact = with_exact(&g, &cx, &["easy", "hard"]);
    let labels = predictions(&exact, &val_x);
    let options = "      min_logit_cosine: 0.997\n      relearn: false\n      restore_unprofitable: false\n";
    let (g0, cx0, _) = approximated();
    let (_, plain, _) = mask_only(&g0, cx0, (val_x.clone(), labels.clone()), options);
    assert!(plain.refined.is_empty(), "{:?}", plain.refined);
    assert_eq!(
        plain.kept().reduction_everything_counted,
        0.0,
        "both exact without refine_k"
    );
    let (out, m, _) = mask_only(&g, cx, (val_x, labels), &format!("{options}      refine_k: 64\n"));
    assert_eq!(m.path.len(), 3, "both layers restored: {:?}", m.path);
    let refined: Vec<_> = m.refined.iter().map(|p| p.restored.clone().unwrap()).collect();
    assert_eq!(refined, ["easy as lookups with 64 codes per codebook"]);
    assert_eq!(
        m.kept().restored,
        m.refined[0].restored,
        "the refined model is the one kept"
    );
    assert!(m.kept().logit_cosine >= 0.997, "{:?}", m.kept());
    let (easy, hard) = (choice_in(&m, "easy"), choice_in(&m, "hard"));
    assert_eq!(easy.chosen, "lut", "{}", easy.why);
    assert!(easy.why.contains("64 codes"), "{}", easy.why);
    assert_eq!(hard.chosen, "exact", "{}", hard.why);
    // easy's prototypes [c][k][s] and tables [c][m][k] hold 64 entries per codebook
    let shapes = |name: &str| -> Vec<Vec<usize>> {
        let n = out.find(name).expect("present");
        out.inputs_of(n)
            .into_iter()
            .filter_map(|i| out.const_value(i).map(|t| t.shape().to_vec()))
            .collect()
    };
    assert_eq!(shapes("easy/pq_encode")[0], [2, 64, 4]);
    assert_eq!(shapes("easy/lut")[0], [2, 8, 64]);
    assert!(out.find("hard").is_some_and(|n| matches!(out.node(n).op, Op::MatMul)));
}

/// The time model prices lookups with more than 16 prototypes and fewer than 16 outputs at the
/// scalar kernel's rate (`lookup_scalar`), which `LutMatMul` runs there: the two-layer model's
/// layers (8 and 4 outputs) at 64 codes are estimated slower with the default price than
/// with `lookup_scalar` set to the row-wise price, and at 16 codes the price does not apply.
#[test]
fn few_outputs_at_64_codes_are_priced_as_the_scalar_kernel() {
    let (g, calib) = two_layers();
    let est = |k: usize, scalar: Option<f64>| -> Vec<f64> {
        let mut g = g.clone();
        let tm = scalar.map_or(String::new(), |s| {
            format!("      time_model:\n        lookup_scalar: {s}\n")
        });
        let text = format!(
            "name: t\npasses:\n  - lut:\n      encoder: argmin\n      fc_subspace: 4\n      refit: false\n      learn: none\n      k: {k}\n  - mask:\n      min_logit_cosine: 0.0\n      relearn: false\n      restore_unprofitable: false\n{tm}"
        );
        let mut cx = PassCx {
            calib: Some(calib.clone()),
            ..Default::default()
        };
        let report = run_pipeline(&mut g, &Pipeline::parse(&text, "t").unwrap(), &mut cx, |_, _| Ok(())).unwrap();
        report
            .mask
            .expect("mask ran")
            .layers
            .iter()
            .map(|d| d.est_speedup)
            .collect()
    };
    let (scalar, rowwise) = (est(64, None), est(64, Some(3.3)));
    assert_eq!(scalar.len(), 2);
    for (s, r) in scalar.iter().zip(&rowwise) {
        assert!(s < r, "{scalar:?} vs {rowwise:?}");
    }
    assert_eq!(est(16, None), est(16, Some(3.3)), "16 codes run a shuffle kernel");
}

/// `refine_k` must be 0 or a power of two in 2..=256: the mask pass says so before it
/// measures anything (not from a refit of some layer after the walk).
#[test]
fn refine_k_is_checked_up_front() {
    let (mut g, mut cx, _) = approximated();
    for k in [1, 48, 512] {
        let p = Pipeline::parse(
            &format!("name: t\npasses:\n  - mask:\n      min_logit_cosine: 0.99\n      refine_k: {k}\n"),
            "t",
        )
        .unwrap();
        let e = run_pipeline(&mut g, &p, &mut cx, |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains(&format!("mask.refine_k = {k}")), "{e}");
    }
}
