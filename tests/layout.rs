//! The `channels-last` pass: LUT layers, exact convolutions and pooling chain without
//! transposes, every other consumer still gets NCHW, LUT numbers do not change by a single bit
//! (exact convolutions stay within float rounding), and the layout survives a `.tcv` round trip.
//! A small residual CNN is built in the test so every case the pass handles appears: a conv
//! feeding a conv, a residual `Add`, a `Relu` read by a conv and by `MaxPool`, and a
//! `GlobalAveragePool` head over a 3×3 map; once with every conv as lookups, once exact (then
//! the `Relu`s and the residual `Add`s fold into the convs).
//! (That the channels-last mean has GlobalAveragePool's bits is checked directly in
//! `kernels::shape_ops`: through the LUT classifier here a last-bit difference would not show.)

mod common;
use common::*;
use ndarray::{ArrayD, IxDyn};
use tabconv::interp::run;
use tabconv::ir::op::{Binary, Conv, Padding, Pool, PoolKind, Unary, Window};
use tabconv::ir::{dump::dump, Graph, Op, Outlet, Tensor};
use tabconv::onnx::tcv;
use tabconv::passes::{manager::run_pipeline, pipeline::Pipeline, PassCx};
use tabconv::pq::rng::Rng;

fn win(k: usize, stride: usize, pad: usize) -> Window {
    Window {
        kernel: [k, k],
        strides: [stride, stride],
        dilations: [1, 1],
        padding: Padding::Explicit([pad; 4]),
        ceil_mode: false,
    }
}

/// x [N,3,6,6] → conv a (3→16) → relu r1 → conv b (16→16) → add(r1) → relu r2
///   → maxpool (exact consumer of r2) ↘
///   → conv c (16→24, 1×1 stride 2) → relu → add(maxpool via conv d 16→24 1×1) → relu
///   → global average pool → flatten → gemm (24→5)
fn residual_net() -> Graph {
    let mut rng = Rng::new(9);
    let (mut g, x) = graph_with_input([3, 6, 6]);
    let mut conv = |g: &mut Graph, name: &str, x: Outlet, cin: usize, cout: usize, w: Window| {
        let k = w.kernel[0];
        let scale = 1.0 / ((cin * k * k) as f32).sqrt();
        let wv: Vec<f32> = (0..cout * cin * k * k)
            .map(|_| (rng.next_f64() as f32 - 0.5) * 2.0 * scale)
            .collect();
        let bv: Vec<f32> = (0..cout).map(|_| rng.next_f64() as f32 * 0.1).collect();
        let wc = g.add_const(&format!("{name}.w"), Tensor::f32(&[cout, cin, k, k], wv).unwrap());
        let bc = g.add_const(&format!("{name}.b"), Tensor::f32(&[cout], bv).unwrap());
        g.add_op(name, Op::Conv(Conv::nchw(w, 1)), &[x, wc, bc])
    };
    let a = conv(&mut g, "a", x, 3, 16, win(3, 1, 1));
    let r1 = g.add_op("r1", Op::Unary(Unary::Relu), &[a]);
    let b = conv(&mut g, "b", r1, 16, 16, win(3, 1, 1));
    let s1 = g.add_op("s1", Op::Binary(Binary::Add), &[b, r1]);
    let r2 = g.add_op("r2", Op::Unary(Unary::Relu), &[s1]);
    let mp = g.add_op(
        "mp",
        Op::Pool(Pool {
            kind: PoolKind::Max,
            window: win(2, 2, 0),
            nhwc: false,
        }),
        &[r2],
    );
    let c = conv(&mut g, "c", r2, 16, 24, win(1, 2, 0));
    let r3 = g.add_op("r3", Op::Unary(Unary::Relu), &[c]);
    let d = conv(&mut g, "d", mp, 16, 24, win(1, 1, 0));
    let s2 = g.add_op("s2", Op::Binary(Binary::Add), &[r3, d]);
    let r4 = g.add_op("r4", Op::Unary(Unary::Relu), &[s2]);
    let gap = g.add_op("gap", Op::GlobalPool { max: false }, &[r4]);
    let fl = g.add_op("flat", Op::Flatten { axis: 1 }, &[gap]);
    let wv: Vec<f32> = (0..24 * 5).map(|_| rng.next_f64() as f32 - 0.5).collect();
    let wf = g.add_const("fc.w", Tensor::f32(&[24, 5], wv).unwrap());
    let y = g.add_op("fc", Op::MatMul, &[fl, wf]);
    g.outputs.push(("y".into(), y));
    tabconv::ir::infer::infer_graph(&mut g).unwrap();
    g
}

fn images(n: usize, seed: u64) -> ArrayD<f32> {
    let mut rng = Rng::new(seed);
    ArrayD::from_shape_vec(
        IxDyn(&[n, 3, 6, 6]),
        (0..n * 108).map(|_| rng.next_f64() as f32).collect(),
    )
    .unwrap()
}

/// The residual net as lookups over per-channel window codebooks, with or without the layout pass.
fn compile(layout: bool) -> Graph {
    compile_with(layout, 0)
}

/// [`compile`] with pixel codebooks of `pixel` channels (0: per-channel window codebooks), the
/// argmin codebooks past the stem fitted in the output's metric (with norms).
fn compile_with(layout: bool, pixel: usize) -> Graph {
    let mut g = residual_net();
    let text = format!(
        "name: t\npasses:\n  - conv-to-im2col:\n  - constant-fold:\n  - lut:\n      encoder: argmin\n      subspace: 0\n      pixel_subspace: {pixel}\n      argmin_metric: output\n{}  - dead-code:\n",
        if layout { "  - channels-last:\n" } else { "" }
    );
    let mut cx = PassCx {
        calib: Some(images(256, 1)),
        ..Default::default()
    };
    run_pipeline(&mut g, &Pipeline::parse(&text, "test").unwrap(), &mut cx, |_, _| Ok(())).unwrap();
    g
}

fn count(g: &Graph, pred: impl Fn(&Op) -> bool) -> usize {
    g.topo_order()
        .unwrap()
        .into_iter()
        .filter(|&n| pred(&g.node(n).op))
        .count()
}

#[test]
fn channels_last_keeps_every_bit_and_drops_transposes() {
    let plain = compile(false);
    let cl = compile(true);
    let x = images(5, 2);
    let a = as_f32(&run(&plain, vec![Tensor::F32(x.clone())]).unwrap()[0]);
    let b = as_f32(&run(&cl, vec![Tensor::F32(x.clone())]).unwrap()[0]);
    assert_eq!(a, b, "same codes, same lookups, same bits");
    // one image: c and d have 9 rows, the row-wise lookup kernel's path (≤ 32 rows)
    let one = images(1, 3);
    let a1 = as_f32(&run(&plain, vec![Tensor::F32(one.clone())]).unwrap()[0]);
    let b1 = as_f32(&run(&cl, vec![Tensor::F32(one)]).unwrap()[0]);
    assert_eq!(a1, b1, "fused epilogues on the row-wise path");

    let transposes = |g: &Graph| count(g, |op| matches!(op, Op::Transpose { .. }));
    let nhwc_encoders = count(&cl, |op| matches!(op, Op::PqEncode(p) if p.nhwc));
    // a → b, r2 → c and mp → d: three 3-D → NCHW transposes before; after, none (MaxPool runs
    // channels-last too)
    assert_eq!(transposes(&plain), 4, "{}", dump(&plain).unwrap());
    assert_eq!(transposes(&cl), 0, "{}", dump(&cl).unwrap());
    assert_eq!(nhwc_encoders, 3, "b, c and d read channels-last input");
    assert_eq!(count(&cl, |op| matches!(op, Op::Pool(p) if p.nhwc)), 1);
    assert_eq!(
        count(&cl, |op| matches!(op, Op::GlobalPool { .. })),
        0,
        "GAP became ReduceMean"
    );
    // no elementwise op runs twice: each Relu and residual Add is a node or fused into the
    // epilogue of the LUT layer (or conv) it follows
    let relus = |g: &Graph| count(g, |op| matches!(op, Op::Unary(Unary::Relu)));
    let adds = |g: &Graph| count(g, |op| matches!(op, Op::Binary(Binary::Add)));
    let fused_relus = count(&cl, |op| matches!(op, Op::LutMatMul { relu: true }));
    let fused_adds = cl
        .topo_order()
        .unwrap()
        .into_iter()
        .filter(|&n| matches!(cl.node(n).op, Op::LutMatMul { .. }) && cl.inputs_of(n).len() == 5)
        .count();
    assert!(fused_relus > 0 && fused_adds > 0, "{}", dump(&cl).unwrap());
    assert_eq!(relus(&cl) + fused_relus, relus(&plain));
    assert_eq!(adds(&cl) + fused_adds, adds(&plain));

    // every ai.tabconv node says what it does (Netron shows node doc strings)
    let proto = tabconv::onnx::export::export_model(&cl, &[]).unwrap();
    let custom: Vec<_> = proto
        .graph
        .unwrap()
        .node
        .into_iter()
        .filter(|n| n.domain == "ai.tabconv")
        .collect();
    assert!(!custom.is_empty());
    for n in &custom {
        assert!(
            n.doc_string.starts_with("tabconv "),
            "{}: {:?}",
            n.op_type,
            n.doc_string
        );
    }

    // the layout attribute survives writing and reading a .tcv
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cl.tcv");
    tcv::write_tcv(&cl, "", &p).unwrap();
    let back = tcv::read_tcv(&p).unwrap();
    assert_eq!(dump(&back).unwrap(), dump(&cl).unwrap());
    let c = as_f32(&run(&back, vec![Tensor::F32(x)]).unwrap()[0]);
    assert_eq!(c, b);

    insta::assert_snapshot!("residual_after_channels_last", dump_without_hashes(&cl));
}

/// Pixel codebooks (the `lut` default): channels-last gives the same bits, with no transpose,
/// and each pixel encoder reads the channels-last activation.
#[test]
fn channels_last_keeps_the_bits_of_pixel_codebooks() {
    let (plain, cl) = (compile_with(false, 4), compile_with(true, 4));
    let pixel = |g: &Graph| count(g, |op| matches!(op, Op::PqEncode(p) if p.pixel));
    assert!(pixel(&cl) > 0, "{}", dump(&cl).unwrap());
    assert_eq!(pixel(&cl), pixel(&plain));
    assert_eq!(
        pixel(&cl),
        count(&cl, |op| matches!(op, Op::PqEncode(p) if p.pixel && p.nhwc)),
        "every pixel encoder reads channels-last input"
    );
    assert_eq!(
        count(&cl, |op| matches!(op, Op::Transpose { .. })),
        0,
        "{}",
        dump(&cl).unwrap()
    );
    for (n, seed) in [(5, 2), (1, 3)] {
        let x = images(n, seed);
        let a = as_f32(&run(&plain, vec![Tensor::F32(x.clone())]).unwrap()[0]);
        let b = as_f32(&run(&cl, vec![Tensor::F32(x)]).unwrap()[0]);
        assert_eq!(a, b, "{n} image(s): same codes, same lookups, same bits");
    }
}

/// Exact convolutions: every conv runs channels-last with its `Relu` and residual `Add` fused,
/// only the input needs a transpose, outputs stay within float rounding of the NCHW graph, and
/// the fused form survives a `.tcv` round trip.
#[test]
fn channels_last_exact_convs_fuse_relu_and_residual() {
    let plain = residual_net();
    let mut cl = residual_net();
    let text = "name: t\npasses:\n  - channels-last:\n  - dead-code:\n";
    let mut cx = PassCx::default();
    run_pipeline(&mut cl, &Pipeline::parse(text, "test").unwrap(), &mut cx, |_, _| Ok(())).unwrap();
    let x = images(5, 3);
    let a = as_f32(&run(&plain, vec![Tensor::F32(x.clone())]).unwrap()[0]);
    let b = as_f32(&run(&cl, vec![Tensor::F32(x.clone())]).unwrap()[0]);
    assert_eq!(a.shape(), b.shape());
    let err = a.iter().zip(b.iter()).fold(0f32, |e, (p, q)| e.max((p - q).abs()));
    assert!(err < 1e-5, "channels-last exact convs differ by {err}");

    let convs = |pred: &dyn Fn(&Conv) -> bool| count(&cl, |op| matches!(op, Op::Conv(c) if pred(c)));
    assert_eq!(convs(&|c| !c.nhwc), 0, "every conv runs channels-last");
    assert_eq!(
        convs(&|c| c.relu),
        4,
        "a, b (after r1's residual), c and d (after r3's) take their Relu"
    );
    let with_residual = cl
        .topo_order()
        .unwrap()
        .into_iter()
        .filter(|&n| matches!(cl.node(n).op, Op::Conv(_)) && cl.inputs_of(n).len() == 4)
        .count();
    assert_eq!(with_residual, 2, "b + r1 and d + r3 fold their Add");
    assert_eq!(count(&cl, |op| matches!(op, Op::Binary(Binary::Add))), 0);
    assert_eq!(count(&cl, |op| matches!(op, Op::Unary(Unary::Relu))), 0);
    assert_eq!(
        count(&cl, |op| matches!(op, Op::Transpose { .. })),
        1,
        "only the input is transposed"
    );

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("exact.tcv");
    tcv::write_tcv(&cl, "", &p).unwrap();
    let back = tcv::read_tcv(&p).unwrap();
    assert_eq!(dump(&back).unwrap(), dump(&cl).unwrap());
    let c = as_f32(&run(&back, vec![Tensor::F32(x)]).unwrap()[0]);
    assert_eq!(c, b);
    insta::assert_snapshot!("residual_exact_after_channels_last", dump_without_hashes(&cl));
}

/// A DenseNet step: two convs concatenated along the channels, a BatchNorm that cannot fold into
/// a conv before it (it follows the Concat), a Relu and a conv, then the Concat again with the
/// conv's output. Channels-last carries the Concat (last axis) and the BatchNorm (a per-channel
/// `Mul` and `Add`) so no Transpose runs between the convs, and the outputs stay those of the
/// NCHW graph.
#[test]
fn channels_last_carries_concat_and_batchnorm() {
    let mut rng = Rng::new(12);
    let (mut g, x) = graph_with_input([3, 6, 6]);
    let mut vals =
        |n: usize, lo: f32, hi: f32| -> Vec<f32> { (0..n).map(|_| lo + (hi - lo) * rng.next_f64() as f32).collect() };
    let mut conv = |g: &mut Graph, name: &str, x: Outlet, cin: usize, cout: usize| {
        let wc = g.add_const(
            &format!("{name}.w"),
            Tensor::f32(&[cout, cin, 3, 3], vals(cout * cin * 9, -0.3, 0.3)).unwrap(),
        );
        g.add_op(name, Op::Conv(Conv::nchw(win(3, 1, 1), 1)), &[x, wc])
    };
    let a = conv(&mut g, "a", x, 3, 8);
    let b = conv(&mut g, "b", x, 3, 4);
    let cat = g.add_op("cat", Op::Concat { axis: 1 }, &[a, b]);
    let mut rng2 = Rng::new(13);
    let mut p = |n: usize, lo: f32, hi: f32| -> Tensor {
        Tensor::f32(&[n], (0..n).map(|_| lo + (hi - lo) * rng2.next_f64() as f32).collect()).unwrap()
    };
    let bn_in: Vec<Outlet> = [
        ("scale", p(12, 0.5, 1.5)),
        ("bias", p(12, -0.2, 0.2)),
        ("mean", p(12, -0.1, 0.1)),
        ("var", p(12, 0.5, 2.0)),
    ]
    .into_iter()
    .map(|(n, t)| g.add_const(&format!("bn.{n}"), t))
    .collect();
    let bn = g.add_op(
        "bn",
        Op::BatchNorm { epsilon: 1e-5 },
        &[cat, bn_in[0], bn_in[1], bn_in[2], bn_in[3]],
    );
    let r = g.add_op("r", Op::Unary(Unary::Relu), &[bn]);
    let c = conv(&mut g, "c", r, 12, 6);
    let out = g.add_op("out", Op::Concat { axis: 1 }, &[cat, c]);
    g.outputs.push(("y".into(), out));
    tabconv::ir::infer::infer_graph(&mut g).unwrap();

    let plain = g.clone();
    let text = "name: t\npasses:\n  - channels-last:\n  - dead-code:\n";
    run_pipeline(
        &mut g,
        &Pipeline::parse(text, "test").unwrap(),
        &mut PassCx::default(),
        |_, _| Ok(()),
    )
    .unwrap();
    assert_eq!(
        count(&g, |op| matches!(op, Op::BatchNorm { .. })),
        0,
        "the BatchNorm runs channels-last"
    );
    assert_eq!(
        count(&g, |op| matches!(op, Op::Transpose { .. })),
        2,
        "the input in, the output out; none between the convs"
    );
    assert_eq!(count(&g, |op| matches!(op, Op::Concat { axis: 3 })), 2);
    let x = ArrayD::from_shape_vec(IxDyn(&[3, 3, 6, 6]), vals(3 * 108, -1.0, 1.0)).unwrap();
    let want = as_f32(&run(&plain, vec![Tensor::F32(x.clone())]).unwrap()[0]);
    let got = as_f32(&run(&g, vec![Tensor::F32(x)]).unwrap()[0]);
    assert_eq!(want.shape(), got.shape());
    let err = want.iter().zip(got.iter()).fold(0f32, |e, (p, q)| e.max((p - q).abs()));
    assert!(err < 1e-5, "channels-last differs by {err}");
}

/// The int8 argmin encoders (`act_scale`: 3×3 convs with one codebook per channel on
/// non-negative inputs) lower to standard ONNX that tract runs with the interpreter's outputs:
/// their distances are integer sums, exact in float32.
#[test]
fn int8_encoders_lower_to_standard_onnx() {
    let plain = compile(false);
    let int8 = count(&plain, |op| matches!(op, Op::PqEncode(p) if p.act_scale.is_some()));
    assert_eq!(
        int8,
        2,
        "a (on the image) and b (after a Relu): {}",
        dump(&plain).unwrap()
    );
    // calibrated on one thread: the same scales, prototypes and tables (the dump hashes them)
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| compile(false));
    assert_eq!(dump(&one).unwrap(), dump(&plain).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.onnx");
    std::fs::write(&p, tabconv::onnx::lower::encode(&plain, "").unwrap()).unwrap();
    let x = images(7, 4);
    let ours = as_f32(&run(&plain, vec![Tensor::F32(x.clone())]).unwrap()[0]);
    let theirs = &run_tract(&p, &[x])[0];
    let e = rel_err(&ours, theirs);
    assert!(e <= 1e-5, "tract on the lowered model vs the interpreter: {e:e}");

    // `act_scale` survives a .tcv round trip, needs ai.tabconv opset 5, and must be positive
    let t = dir.path().join("m.tcv");
    tcv::write_tcv(&plain, "", &t).unwrap();
    assert_eq!(dump(&tcv::read_tcv(&t).unwrap()).unwrap(), dump(&plain).unwrap());
    let proto = tabconv::onnx::proto::read_model_proto(&t).unwrap();
    let bad = |edit: &dyn Fn(&mut tabconv::onnx::pb::ModelProto)| {
        let mut m = proto.clone();
        edit(&mut m);
        let f = dir.path().join("bad.tcv");
        std::fs::write(&f, prost::Message::encode_to_vec(&m)).unwrap();
        tcv::read_tcv(&f).unwrap_err().to_string()
    };
    let e = bad(&|m| {
        for o in m.opset_import.iter_mut().filter(|o| o.domain == "ai.tabconv") {
            o.version = 4;
        }
    });
    assert!(e.contains("'act_scale' needs ai.tabconv opset 5"), "{e}");
    for v in [-1.0, 0.0, f32::NAN, f32::INFINITY, 1e-40] {
        let e = bad(&|m| {
            let g = m.graph.as_mut().unwrap();
            for a in g.node.iter_mut().flat_map(|n| n.attribute.iter_mut()) {
                if a.name == "act_scale" {
                    a.f = v;
                }
            }
        });
        assert!(
            e.contains("act_scale must be a positive finite float") && e.contains("pq_encode"),
            "{v}: {e}"
        );
    }
}

/// Argmin codebooks fitted in the output metric (`argmin_metric: output`) carry their norms
/// as a third `PQEncode` input: through the layout pass, a `.tcv` round trip (which needs
/// ai.tabconv opset 8) and the lowering to standard ONNX (tract on it gives the interpreter's
/// outputs; b's int8 encoder lowers with its norms too), the codes stay those of the norms.
#[test]
fn metric_encoders_keep_their_norms_everywhere() {
    for layout in [false, true] {
        let g = compile(layout);
        let with_norms = g
            .topo_order()
            .unwrap()
            .into_iter()
            .filter(|&n| matches!(g.node(n).op, Op::PqEncode(_)) && g.inputs_of(n).len() == 3)
            .count();
        // b (the int8 encoder), c and d (1×1 convs over 16 channels, 4 per codebook) and fc;
        // not a, which reads the image (the stem)
        assert_eq!(with_norms, 4, "layout {layout}: {}", dump(&g).unwrap());
        let x = images(5, 8);
        let ours = as_f32(&run(&g, vec![Tensor::F32(x.clone())]).unwrap()[0]);
        let dir = tempfile::tempdir().unwrap();
        if !layout {
            let p = dir.path().join("m.onnx");
            std::fs::write(&p, tabconv::onnx::lower::encode(&g, "").unwrap()).unwrap();
            let e = rel_err(&ours, &run_tract(&p, std::slice::from_ref(&x))[0]);
            assert!(e <= 1e-5, "tract on the lowered model vs the interpreter: {e:e}");
        }
        let t = dir.path().join("m.tcv");
        tcv::write_tcv(&g, "", &t).unwrap();
        let back = tcv::read_tcv(&t).unwrap();
        assert_eq!(dump(&back).unwrap(), dump(&g).unwrap());
        assert_eq!(as_f32(&run(&back, vec![Tensor::F32(x)]).unwrap()[0]), ours);
        let mut proto = tabconv::onnx::proto::read_model_proto(&t).unwrap();
        for o in proto.opset_import.iter_mut().filter(|o| o.domain == "ai.tabconv") {
            o.version = 7;
        }
        std::fs::write(&t, prost::Message::encode_to_vec(&proto)).unwrap();
        let e = tcv::read_tcv(&t).unwrap_err().to_string();
        assert!(e.contains("norms (a third input) need ai.tabconv opset 8"), "{e}");
        // norms of the wrong shape (the same number of values, transposed) are named as such
        for o in proto.opset_import.iter_mut().filter(|o| o.domain == "ai.tabconv") {
            o.version = 8;
        }
        let norms = proto
            .graph
            .as_mut()
            .unwrap()
            .initializer
            .iter_mut()
            .find(|t| t.name.ends_with("/norms") && t.dims[0] != t.dims[1]);
        let norms = norms.expect("norms are stored");
        norms.dims.reverse();
        std::fs::write(&t, prost::Message::encode_to_vec(&proto)).unwrap();
        let e = tcv::read_tcv(&t).unwrap_err().to_string();
        assert!(e.contains("norms must be [") && e.contains("pq_encode"), "{e}");
    }
}
