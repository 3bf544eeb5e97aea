//! Sub-batches (`interp::split`): a batch run in pieces, one or several at a time, gives every
//! image the bits the whole batch gives it, for exact models, fixed-size pieces and a short last
//! one, at 1 and 2 threads, and for a model whose layers are lookups.

mod common;
use common::*;
use ndarray::{s, ArrayD};
use tabconv::interp::split::SubBatch;
use tabconv::interp::Plan;
use tabconv::ir::{Graph, Op, Tensor};
use tabconv::passes::{manager::run_pipeline, pipeline::Pipeline, PassCx};

fn run(g: &Graph, x: &ArrayD<f32>, split: Option<SubBatch>, threads: usize) -> ArrayD<f32> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let mut plan = Plan::new(g).unwrap();
    plan.set_sub_batch(split);
    let n = x.shape()[0];
    if let Some(s) = split {
        let size = pool.install(|| plan.sub_batch(n)).expect("the batch is split");
        assert_eq!(size, s.cache, "sub-batch size");
    }
    let out = pool.install(|| plan.run(vec![Tensor::F32(x.clone())])).unwrap();
    out.into_iter().next().unwrap().into_f32().unwrap()
}

fn same_bits(g: &Graph, x: &ArrayD<f32>, name: &str) {
    let whole = run(g, x, None, 1);
    assert_eq!(whole.shape()[0], x.shape()[0]);
    // 40 images: sub-batches of 16, 16 and 8 (in order at 1 thread, side by side at 2)
    // Without AVX2 a Gemm takes the `gemm` crate, whose kernels change with the number of
    // rows: there only float rounding may differ.
    let exact_bits = tabconv::interp::kernels::gemm::PackedA::supported();
    for (cache, threads) in [(16, 1), (16, 2), (8, 2), (1, 1)] {
        let split = run(g, x, Some(SubBatch { cache, rows: 1 }), threads);
        let differ = whole
            .iter()
            .zip(&split)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        if exact_bits {
            assert_eq!(
                differ, 0,
                "{name}: sub-batches of {cache} on {threads} thread(s) changed {differ} values"
            );
        } else {
            assert!(rel_err(&whole, &split) <= 1e-5, "{name}: sub-batches of {cache}");
        }
    }
}

fn images(file: &str) -> ArrayD<f32> {
    npy(file).slice(s![..40, .., .., ..]).to_owned().into_dyn()
}

#[test]
fn exact_models_give_each_image_the_same_bits_in_sub_batches() {
    for (model, data) in [
        ("lenet5", "data/mnist_test.npy"),
        ("nin", "data/mnist_test.npy"),
        ("mobilenet_fmnist", "data/fmnist_test.npy"),
        ("resnet18_fmnist", "data/fmnist_test.npy"),
    ] {
        let g = tabconv::model::load_for_run(&fixture(&format!("models/{model}.onnx"))).unwrap();
        let plan = Plan::new(&g).unwrap();
        assert!(plan.sub_batch(64).is_some(), "{model}: a batch of 64 is split");
        same_bits(&g, &images(data), model);
    }
}

#[test]
fn lookup_models_with_an_exact_head_give_each_image_the_same_bits_in_sub_batches() {
    let mut g = tabconv::model::load(&fixture("models/lenet5.onnx")).unwrap();
    // the 10-class head stays an exact MatMul (the shape a masked model restores)
    let text = "name: t\npasses:\n  - fold-batchnorm:\n  - gemm-to-matmul:\n  - conv-to-im2col:\n  - lut:\n      learn: none\n      keep_exact: [\"*fc3*\"]\n  - im2col-to-conv:\n  - channels-last:\n  - dead-code:\n";
    let mut cx = PassCx {
        calib: Some(
            npy("data/mnist_calib.npy")
                .slice(s![..64, .., .., ..])
                .to_owned()
                .into_dyn(),
        ),
        ..Default::default()
    };
    run_pipeline(&mut g, &Pipeline::parse(text, "t").unwrap(), &mut cx, |_, _| Ok(())).unwrap();
    let order = g.topo_order().unwrap();
    let luts = order
        .iter()
        .filter(|&&n| matches!(g.node(n).op, Op::LutMatMul { .. }))
        .count();
    let matmuls = order.iter().filter(|&&n| matches!(g.node(n).op, Op::MatMul)).count();
    assert_eq!((luts, matmuls), (4, 1), "four layers as lookups, the head exact");
    same_bits(&g, &images("data/mnist_test.npy"), "lenet5 as lookups");
}

#[test]
fn models_whose_activations_fit_in_cache_run_whole() {
    // the MLP's largest value is its 784-pixel input: 64 images fit in cache together (and its
    // layers have one row per image)
    let g = tabconv::model::load_for_run(&fixture("models/mlp_mnist.onnx")).unwrap();
    assert_eq!(Plan::new(&g).unwrap().sub_batch(64), None);
}
