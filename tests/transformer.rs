//! Beyond convolutions (issue 12): the ViT and MLP fixtures (fixtures/vit.py) from both
//! exporters run exactly (against the stored ONNX Runtime outputs, at batch 1, 5 and 64), the
//! exact pipeline keeps their outputs and is snapshotted, a `.tcv` round trip keeps them, and the
//! `lut` pass turns every linear layer on token rows `[N, T, D]` into lookups while the attention
//! MatMuls of two computed operands stay exact and are counted as exact work.

mod common;
use common::*;
use ndarray::{s, Axis};
use tabconv::interp::run;
use tabconv::ir::{cost, dump::dump, Graph, Op, Tensor};
use tabconv::onnx::tcv;
use tabconv::passes::{manager::run_pipeline, pipeline::Pipeline, PassCx};

/// `(summary key, model file)`
const MODELS: &[(&str, &str)] = &[
    ("vit_mnist", "models/vit_mnist.onnx"),
    ("vit_mnist_dynamo", "models/vit_mnist_dynamo.onnx"),
    ("vit_fmnist", "models/vit_fmnist.onnx"),
    ("vit_fmnist_dynamo", "models/vit_fmnist_dynamo.onnx"),
    ("mlp_mnist", "models/mlp_mnist.onnx"),
];

/// The fixture ViT: 3 blocks of 4 heads over 16 patches + the class token, width 64.
const LAYERS: usize = 3;
const HEADS: usize = 4;
const TOKENS: usize = 17;
const HEAD_DIM: usize = 16;

fn max_abs_diff(a: &ndarray::ArrayD<f32>, b: &ndarray::ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn exact_runs_match_onnx_runtime_at_batch_1_5_and_64() {
    for (name, model) in MODELS {
        let x = npy(&format!("expected/{name}_input.npy"));
        let want = npy(&format!("expected/{name}_ort.npy"));
        let g = tabconv::onnx::load_model(&fixture(model)).unwrap_or_else(|e| panic!("{name}: {e}"));
        for n in [1, 5, 64] {
            let xb = x.slice_axis(Axis(0), (0..n).into()).to_owned();
            let out = as_f32(&run(&g, vec![Tensor::F32(xb)]).unwrap_or_else(|e| panic!("{name} batch {n}: {e}"))[0]);
            let wb = want.slice_axis(Axis(0), (0..n).into()).to_owned();
            let e = max_abs_diff(&out, &wb);
            assert!(
                e <= 1e-4,
                "{name} at batch {n}: max abs difference {e:e} from ONNX Runtime"
            );
        }
        // as `tabconv run` runs it (the run rewrites), and in ONNX Runtime's top-1 agreement
        let (fast, _) = run_ours_optimized(&fixture(model), std::slice::from_ref(&x)).unwrap();
        let e = max_abs_diff(&as_f32(&fast[0]), &want);
        assert!(e <= 1e-4, "{name} with the run rewrites: {e:e}");
    }
}

#[test]
fn both_exporters_give_the_operators_issue_12_names() {
    // what each exporter wrote, so the exact runs above cover these forms
    let ops = |model: &str| -> Vec<String> {
        let m = tabconv::onnx::proto::read_model_proto(&fixture(model)).unwrap();
        m.graph.unwrap().node.iter().map(|n| n.op_type.clone()).collect()
    };
    let legacy = ops("models/vit_mnist.onnx");
    for op in [
        "ReduceMean",
        "Pow",
        "Sqrt",
        "Erf",
        "Softmax",
        "Equal",
        "Where",
        "Expand",
        "Transpose",
    ] {
        assert!(legacy.iter().any(|o| o == op), "the legacy export has no {op}");
    }
    assert!(
        !legacy.iter().any(|o| o == "LayerNormalization"),
        "opset 13 has no LayerNormalization"
    );
    let dynamo = ops("models/vit_mnist_dynamo.onnx");
    for op in ["LayerNormalization", "Erf", "Softmax", "Expand"] {
        assert!(dynamo.iter().any(|o| o == op), "the dynamo export has no {op}");
    }
}

#[test]
fn exact_pipeline_snapshots_outputs_and_tcv_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    for (name, model) in [MODELS[0], MODELS[1], MODELS[4]] {
        let (g, dumps) = compile_exact(model);
        for (i, (pass, text)) in dumps.iter().enumerate() {
            insta::assert_snapshot!(format!("{name}__{i}_{pass}"), text);
        }
        let yaml = Pipeline::find("exact").unwrap().to_yaml();
        let bytes = tcv::encode(&g, &yaml).unwrap();
        assert_eq!(
            bytes,
            tcv::encode(&compile_exact(model).0, &yaml).unwrap(),
            "{name}: two compiles differ"
        );
        let p = dir.path().join(format!("{name}.tcv"));
        tcv::write_tcv(&g, &yaml, &p).unwrap();
        let back = tcv::read_tcv(&p).unwrap();
        assert_eq!(
            dump(&back).unwrap(),
            dump(&g).unwrap(),
            "{name}: IR → .tcv → IR changed the graph"
        );
        let x = npy(&format!("expected/{name}_input.npy"));
        let out = as_f32(&run(&back, vec![Tensor::F32(x)]).unwrap()[0]);
        let e = max_abs_diff(&out, &npy(&format!("expected/{name}_ort.npy")));
        assert!(
            e <= 1e-4,
            "{name}: the compiled .tcv differs from ONNX Runtime by {e:e}"
        );
    }
}

/// The MatMuls whose two operands are both computed at run time.
fn runtime_matmuls(g: &Graph) -> Vec<petgraph::stable_graph::NodeIndex> {
    g.g.node_indices()
        .filter(|&n| matches!(g.node(n).op, Op::MatMul))
        .filter(|&n| g.inputs_of(n).iter().all(|o| g.const_value(*o).is_none()))
        .collect()
}

#[test]
fn lut_turns_token_linear_layers_into_lookups_and_keeps_attention_exact() {
    let model = "models/vit_mnist.onnx";
    let calib = npy("data/mnist_calib.npy")
        .slice(s![..128, .., .., ..])
        .to_owned()
        .into_dyn();
    let mut g = tabconv::onnx::load_model(&fixture(model)).unwrap();
    let exact = g.clone();
    // attention: Q·Kᵀ and P·V per block, both operands computed
    let attention = runtime_matmuls(&g);
    assert_eq!(attention.len(), 2 * LAYERS, "Q·Kᵀ and P·V in each block");
    let attention_macs: u64 = attention.iter().map(|&n| cost::node_macs(&g, n)).sum();
    assert_eq!(
        attention_macs,
        (2 * LAYERS * HEADS * TOKENS * TOKENS * HEAD_DIM) as u64,
        "each attention MatMul counts its multiply-accumulates as exact work"
    );
    let pipeline = Pipeline::parse(
        "name: t\npasses:\n  - gemm-to-matmul:\n  - conv-to-im2col:\n  - lut:\n      max_rows: 2048\n      kmeans_iters: 8\n      refit_iters: 8\n",
        "test",
    )
    .unwrap();
    let mut cx = PassCx {
        calib: Some(calib),
        ..Default::default()
    };
    run_pipeline(&mut g, &pipeline, &mut cx, |_, _| Ok(())).unwrap();
    // every linear layer (qkv, proj, fc1, fc2 per block; patch embedding; head) became lookups,
    // learned on token rows: D = 64 or 128 values per row, T rows per image
    let layers = cx.analyses.lut.as_ref().expect("the lut pass ran").reports();
    assert_eq!(
        layers.len(),
        4 * LAYERS + 2,
        "{:?}",
        layers.iter().map(|l| &l.node).collect::<Vec<_>>()
    );
    for l in layers.iter().filter(|l| l.node.contains("blocks.")) {
        assert!(l.d == 64 || l.d == 128, "{}: row length {}", l.node, l.d);
        assert_eq!(l.kind, "token", "{}", l.node);
    }
    let luts: Vec<_> =
        g.g.node_indices()
            .filter(|&n| matches!(g.node(n).op, Op::LutMatMul { .. }))
            .collect();
    assert_eq!(luts.len(), 4 * LAYERS + 2);
    for &n in &luts {
        let f = g.node(n).outputs[0].fact.as_ref().unwrap();
        if g.node(n).name.contains("blocks.") {
            assert_eq!(f.rank(), 3, "{}: token rows keep [N, T, M]", g.node(n).name);
            assert_eq!(f.shape[1].known(), Some(TOKENS as i64));
        }
    }
    // the attention MatMuls are untouched and still counted as exact work
    let after = runtime_matmuls(&g);
    assert_eq!(after.len(), 2 * LAYERS);
    assert_eq!(
        after.iter().map(|&n| cost::node_macs(&g, n)).sum::<u64>(),
        attention_macs
    );
    let c = cost::graph_cost(&g);
    let luts_out: u64 = luts.iter().map(|&n| cost::node_cost(&g, n).exact_macs).sum();
    assert_eq!(
        c.exact_macs,
        attention_macs + luts_out,
        "exact work left: attention + dequantisation"
    );
    let (_, all) = cost::reduction(&cost::graph_cost(&exact), &c);
    assert!(all > 0.3, "everything counted, {:.1} % removed", 100.0 * all);
    // and the lookups model still classifies mostly like the exact one (every linear layer as
    // lookups keeps about 90 % of the accuracy on the full test set, docs/RESULTS.md; a broken
    // layer gives chance agreement)
    let x = npy("expected/vit_mnist_input.npy");
    let want = tabconv::model::argmax_rows(&as_f32(&run(&exact, vec![Tensor::F32(x.clone())]).unwrap()[0]));
    let got = tabconv::model::argmax_rows(&as_f32(&run(&g, vec![Tensor::F32(x)]).unwrap()[0]));
    let agree = want.iter().zip(&got).filter(|(a, b)| a == b).count();
    assert!(agree >= 48, "only {agree}/64 predictions agree with the exact model");
}

/// The IR after `fuse-transformer` alone on an imported model, and how many of each op remain.
fn fused(model: &str, edit: impl FnOnce(&mut Graph)) -> (Graph, String) {
    let mut g = tabconv::onnx::load_model(&fixture(model)).unwrap();
    edit(&mut g);
    let pipeline = Pipeline::parse("name: fuse\npasses:\n  - fuse-transformer:\n", "test").unwrap();
    run_pipeline(&mut g, &pipeline, &mut PassCx::default(), |_, _| Ok(())).unwrap();
    let text = dump(&g).unwrap();
    (g, text)
}

fn count_ops(g: &Graph, name: &str) -> usize {
    g.g.node_weights().filter(|n| n.op.name() == name).count()
}

/// `fuse-transformer` turns both exporters' decompositions into `LayerNormalization` and `Gelu`
/// (7 LayerNorms — two per block and the final one — and one GELU per block), leaves nothing of
/// them behind, keeps the outputs within 1e-4 of ONNX Runtime at batch 1 and 64, and gives the
/// same bits at 1 and 2 threads.
#[test]
fn fuse_transformer_fuses_layer_norm_and_gelu_of_both_exporters() {
    for (name, model) in [MODELS[0], MODELS[1]] {
        let (g, text) = fused(model, |_| {});
        insta::assert_snapshot!(format!("fuse_transformer__{name}"), text);
        assert_eq!(count_ops(&g, "LayerNormalization"), 2 * LAYERS + 1, "{name}");
        assert_eq!(count_ops(&g, "Gelu"), LAYERS, "{name}");
        for gone in ["ReduceMean", "Pow", "Sqrt", "Erf"] {
            assert_eq!(count_ops(&g, gone), 0, "{name}: a {gone} is left");
        }
        let x = npy(&format!("expected/{name}_input.npy"));
        let want = npy(&format!("expected/{name}_ort.npy"));
        for n in [1, 64] {
            let xb = x.slice_axis(Axis(0), (0..n).into()).to_owned();
            let out = as_f32(&run(&g, vec![Tensor::F32(xb.clone())]).unwrap()[0]);
            let e = max_abs_diff(&out, &want.slice_axis(Axis(0), (0..n).into()).to_owned());
            assert!(e <= 1e-4, "{name} fused, batch {n}: {e:e} from ONNX Runtime");
            let threads = |t: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
                pool.install(|| as_f32(&run(&g, vec![Tensor::F32(xb.clone())]).unwrap()[0]))
            };
            assert_eq!(
                threads(1),
                threads(2),
                "{name} fused, batch {n}: 1 and 2 threads differ"
            );
        }
    }
}

/// A decomposition whose constants are not the pattern's stays as written: a GELU with 0.4 for
/// 0.5, a LayerNorm whose second mean is over another axis, one whose epsilon is a vector; a
/// one-element epsilon of shape `[1]` still fuses.
#[test]
fn fuse_transformer_leaves_near_misses_alone() {
    let set = |g: &mut Graph, node: &str, t: Tensor| {
        let n = g.find(node).unwrap_or_else(|| panic!("no node {node}"));
        g.node_mut(n).op = Op::Const(std::sync::Arc::new(t));
    };
    let (g, _) = fused("models/vit_mnist.onnx", |g| {
        set(g, "/blocks.0/Constant_2_output_0", Tensor::f32(&[], vec![0.4]).unwrap());
        let n = g.find("/blocks.1/ln1/ReduceMean_1").unwrap();
        g.node_mut(n).op = Op::ReduceMean {
            axes: Some(vec![1]),
            keepdims: true,
        };
        set(
            g,
            "/blocks.2/ln2/Constant_1_output_0",
            Tensor::f32(&[1], vec![1e-5]).unwrap(),
        );
        // one epsilon per token: still a valid graph (`[N, 17, 1] + [17, 1]`), not a LayerNorm's
        set(
            g,
            "/norm/Constant_1_output_0",
            Tensor::f32(&[TOKENS, 1], vec![1e-5; TOKENS]).unwrap(),
        );
    });
    assert_eq!(count_ops(&g, "Gelu"), LAYERS - 1);
    assert_eq!(count_ops(&g, "Erf"), 1);
    // a one-element epsilon is still a scalar; one per token is not
    assert_eq!(count_ops(&g, "LayerNormalization"), 2 * LAYERS + 1 - 2);
    assert!(g.find("/blocks.1/ln1/Sqrt").is_some() && g.find("/norm/Sqrt").is_some());
}
