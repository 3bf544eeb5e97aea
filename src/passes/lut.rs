//! `lut`: replace every MatMul with a constant weight (the ones `conv-to-im2col` and
//! `gemm-to-matmul` produce) by product-quantized table lookups:
//! `MatMul(x, W)` → `LutMatMul(PQEncode(x, codebooks), tables, scale, offset)`.
//!
//! For each layer, in topological order:
//! 1. rows of the layer's input are sampled from the calibration set, computed by the graph as
//!    already approximated upstream (**progressive calibration**, TabConv's key trick), and the
//!    exact model's output of the same layer on the same rows is kept as the target;
//! 2. each codebook (`subspace` consecutive values of a row; for a conv, one input channel's
//!    `kh·kw` window by default) learns `k` prototypes with k-means++ (argmin encoder) or a
//!    MADDNESS hash tree (tree encoder);
//! 3. tables `T[c][m][k] = prototype · W` are optionally **refit** by ridge least squares so the
//!    summed lookups best match the exact outputs, then quantized to int8 (or kept f32).
//!
//! The bias stays an exact Add after the lookups.

use super::{Pass, PassCx};
use crate::error::{Error, Result};
use crate::interp::kernels::encode::{encode_argmin, encode_tree};
use crate::interp::Plan;
use crate::ir::op::{Encoder, Op, PqEncode};
use crate::ir::{Graph, Outlet, Tensor};
use crate::pq::{self, kmeans, quant, refit, rng::Rng, tree, Subspaces};
use ndarray::{ArrayD, Axis, IxDyn};
use petgraph::stable_graph::NodeIndex;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderChoice {
    Argmin,
    Tree,
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableType {
    I8,
    F32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// Values per codebook for convolutions; 0 = one codebook per input channel (`kh·kw`), or
    /// per kernel row (`kw`) for windows larger than 3×3.
    pub subspace: usize,
    /// Values per codebook for fully connected layers.
    pub fc_subspace: usize,
    /// Values per codebook for linear layers on token rows (`[N, T, D]` inputs, `T > 1`, no
    /// window: transformer projections and MLPs); 0 = `fc_subspace`.
    pub token_subspace: usize,
    /// Prototypes per codebook (16 = 4-bit codes; up to 256).
    pub k: usize,
    /// `argmin`, `tree`, or `auto`: argmin where its `K·S` MACs per codebook are small next to
    /// the layer's own work (`M ≥ 4·K` outputs), the comparison-only tree elsewhere.
    pub encoder: EncoderChoice,
    /// Refit tables by ridge least squares against the exact layer outputs.
    pub refit: bool,
    /// Ridge strength, relative to the average code frequency; pulls towards `prototype · W`.
    pub ridge: f32,
    pub refit_iters: usize,
    pub tables: TableType,
    /// Calibration rows sampled per layer (for k-means, trees and refit).
    pub max_rows: usize,
    pub kmeans_iters: usize,
    /// Learn each layer from the outputs of the already-approximated layers before it.
    pub progressive: bool,
    /// Leave layers with fewer multiply-accumulates per image than this exact.
    pub min_macs: u64,
    /// Layers (MatMul node names, `*` wildcards allowed) to leave exact.
    pub keep_exact: Vec<String>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            subspace: 0,
            fc_subspace: 4,
            token_subspace: 0,
            k: 16,
            encoder: EncoderChoice::Auto,
            refit: true,
            ridge: 0.1,
            refit_iters: 20,
            tables: TableType::I8,
            max_rows: 16384,
            kmeans_iters: 20,
            progressive: true,
            min_macs: 0,
            keep_exact: Vec::new(),
        }
    }
}

/// Enough to put a replaced layer back exactly as `conv-to-im2col`/`gemm-to-matmul` left it.
#[derive(Clone, Debug)]
pub struct ExactLayer {
    /// Name of the MatMul that was replaced.
    pub matmul: String,
    pub weight_name: String,
    pub weight: std::sync::Arc<Tensor>,
    /// Name of the Im2Col the encoder absorbed (its window is on the PQEncode node).
    pub im2col: Option<String>,
    /// `(Add node, bias constant, bias)` folded into the LUT offset.
    pub bias: Option<(String, String, std::sync::Arc<Tensor>)>,
}

/// What the pass did to one layer, for the compile report.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub node: String,
    pub kind: &'static str,
    pub d: usize,
    pub m: usize,
    pub codebooks: usize,
    pub subspace: usize,
    pub k: usize,
    pub encoder: Encoder,
    pub rows: usize,
    /// Relative RMS error of the layer output on the calibration rows (quantized tables).
    pub output_rel_error: f64,
    /// Cosine similarity of the layer output with the exact one on the calibration rows.
    pub output_cosine: f64,
    pub table_quant_rel_error: f64,
    pub seconds: f64,
    /// Of which: running the calibration images, learning codebooks, encoding + table fitting.
    pub seconds_collect: f64,
    pub seconds_learn: f64,
    pub seconds_refit: f64,
}

pub struct Lut(pub Options);

/// A MatMul the pass can replace: constant `[D, M]` weight, input rows of length D (an input
/// `[N, …, D]` gives `rows_per_image` = the product of the middle dimensions: the token rows of
/// a transformer's linear layers, the pixels of a conv).
struct Layer {
    node: NodeIndex,
    name: String,
    input: Outlet,
    w: ArrayD<f32>,
    /// Kernel `[kh, kw]` when the rows come from an Im2Col (a conv), else None.
    window: Option<[usize; 2]>,
    rows_per_image: usize,
}

fn eligible(graph: &Graph, min_macs: u64) -> Result<Vec<Layer>> {
    Ok(graph
        .topo_order()?
        .into_iter()
        .filter(|&n| crate::ir::cost::node_macs(graph, n) >= min_macs)
        .filter_map(|n| describe(graph, n))
        .collect())
}

/// The layer at MatMul node `n`, if it is one the pass can replace.
fn describe(graph: &Graph, n: NodeIndex) -> Option<Layer> {
    if !matches!(graph.node(n).op, Op::MatMul) {
        return None;
    }
    let ins = graph.inputs_of(n);
    let w = graph
        .const_value(ins[1])
        .and_then(|t| t.as_f32().ok())
        .filter(|w| w.ndim() == 2)?;
    let f = graph.fact(ins[0])?;
    if f.rank() < 2 {
        return None;
    }
    let rows_per_image = f.shape[1..f.rank() - 1]
        .iter()
        .map(|d| d.known().unwrap_or(1) as usize)
        .product();
    let window = match &graph.node(ins[0].node).op {
        Op::Im2Col(win) => Some(win.kernel),
        _ => None,
    };
    Some(Layer {
        node: n,
        name: graph.node(n).name.clone(),
        input: ins[0],
        w: w.clone(),
        window,
        rows_per_image,
    })
}

/// Run `graph` over the calibration images and keep the sampled rows of `outlet`
/// (rows are the flattened leading dimensions, `width` values each).
fn collect_rows(
    graph: &Graph,
    outlet: Outlet,
    calib: &ArrayD<f32>,
    rows_per_image: usize,
    idx: &[usize],
) -> Result<(Vec<f32>, usize)> {
    let plan = Plan::for_outlets(graph, &[outlet])?;
    let mut out = Vec::new();
    let mut width = 0;
    let mut next = 0usize;
    const CHUNK: usize = 64;
    for (ci, chunk) in calib.axis_chunks_iter(Axis(0), CHUNK).enumerate() {
        let start = ci * CHUNK * rows_per_image;
        let end = start + chunk.shape()[0] * rows_per_image;
        if next >= idx.len() {
            break;
        }
        if idx[next] >= end {
            continue;
        }
        let t = plan.run(vec![Tensor::F32(chunk.to_owned())])?.remove(0).into_f32()?;
        width = *t.shape().last().unwrap_or(&1);
        let t = t.as_standard_layout();
        let data = t.as_slice().expect("standard layout");
        while next < idx.len() && idx[next] < end {
            let r = idx[next] - start;
            out.extend_from_slice(&data[r * width..(r + 1) * width]);
            next += 1;
        }
    }
    Ok((out, width))
}

/// Codebooks learned for one layer.
enum Codebooks {
    Argmin {
        protos: Vec<f32>,
    },
    Tree {
        dims: Vec<usize>,
        thresholds: Vec<f32>,
        protos: Vec<f32>,
    },
}

impl Pass for Lut {
    fn name(&self) -> &'static str {
        "lut"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).expect("options serialise")
    }
    fn run(&self, graph: &mut Graph, cx: &mut PassCx) -> Result<()> {
        let o = &self.0;
        if !(2..=256).contains(&o.k) || (o.encoder != EncoderChoice::Argmin && !o.k.is_power_of_two()) {
            return Err(Error::Input(format!(
                "lut.k = {}: must be 2..=256 (a power of two for the tree encoder)",
                o.k
            )));
        }
        if o.max_rows == 0 || o.fc_subspace == 0 || !o.ridge.is_finite() || o.ridge < 0.0 {
            return Err(Error::Input(format!(
                "lut: max_rows ({}) and fc_subspace ({}) must be at least 1 and ridge ({}) finite and ≥ 0",
                o.max_rows, o.fc_subspace, o.ridge
            )));
        }
        let calib = cx.calib.clone().ok_or_else(|| {
            Error::Input("the lut pass learns from data: give calibration images with --calib X.npy".into())
        })?;
        let exact = graph.clone();
        cx.lut_options = Some(o.clone());
        let layers: Vec<Layer> = eligible(graph, o.min_macs)?
            .into_iter()
            .filter(|l| !o.keep_exact.iter().any(|g| super::glob_match(g, &l.name)))
            .collect();
        let n_images = calib.shape().first().copied().unwrap_or(0);
        if n_images == 0 {
            return Err(Error::Input("lut: the calibration set holds no images".into()));
        }
        let (bar, n_layers) = (crate::cli::progress(layers.len(), "lut"), layers.len());
        for (li, layer) in layers.into_iter().enumerate() {
            bar.set_message(layer.name.clone());
            bar.inc(1);
            // Earlier rewrites may have replaced this layer's producer: re-read its input.
            let layer = describe(graph, layer.node).expect("a layer stays eligible until it is replaced");
            let start = Instant::now();
            // Rows come from a random subset of images big enough to offer 4× the rows needed,
            // so early layers (many rows per image) do not run the whole calibration set.
            let mut rng = Rng::derive(cx.seed, &[li as u64, 1]);
            let n_used = o
                .max_rows
                .saturating_mul(4)
                .div_ceil(layer.rows_per_image.max(1))
                .clamp(1, n_images);
            let images = rng.sample_indices(n_images, n_used);
            let subset = calib.select(Axis(0), &images);
            let idx = rng.sample_indices(n_used * layer.rows_per_image, o.max_rows);
            let mm_out = Outlet::new(layer.node, 0);
            let (y, m) = collect_rows(&exact, mm_out, &subset, layer.rows_per_image, &idx)?;
            let source = if o.progressive { &*graph } else { &exact };
            let (x, d) = collect_rows(source, layer.input, &subset, layer.rows_per_image, &idx)?;
            let t_collect = start.elapsed().as_secs_f64();
            let rows = idx.len();
            let s = match layer.window {
                // one codebook per input channel; windows larger than 3×3 get one per kernel row
                Some([kh, kw]) if o.subspace == 0 => match kh * kw {
                    1 => o.fc_subspace, // a 1×1 conv is a fully connected layer per pixel
                    2..=9 => kh * kw,
                    _ => kw,
                },
                Some(_) => o.subspace,
                None if layer.rows_per_image > 1 && o.token_subspace > 0 => o.token_subspace,
                None => o.fc_subspace,
            }
            .clamp(1, d);
            let sub = Subspaces { d, s };
            let c_n = sub.count();
            let k = o.k;
            let encoder = match o.encoder {
                EncoderChoice::Argmin => Encoder::Argmin,
                EncoderChoice::Tree => Encoder::Tree,
                EncoderChoice::Auto if layer.w.shape()[1] >= 4 * k => Encoder::Argmin,
                EncoderChoice::Auto => Encoder::Tree,
            };
            // 1. codebooks, one per subspace, in parallel (each has its own RNG stream)
            let learned: Vec<(Codebooks, Option<usize>)> = (0..c_n)
                .into_par_iter()
                .map(|c| {
                    let data = pq::gather_subspace(&x, rows, sub, c);
                    match encoder {
                        Encoder::Argmin => {
                            let mut rng = Rng::derive(cx.seed, &[li as u64, 2, c as u64]);
                            let km = kmeans::kmeans(&data, s, k, o.kmeans_iters, &mut rng);
                            (Codebooks::Argmin { protos: km.centroids }, km.distinct)
                        }
                        Encoder::Tree => {
                            let t = tree::learn(&data, s, k.trailing_zeros() as usize);
                            (
                                Codebooks::Tree {
                                    dims: t.dims,
                                    thresholds: t.thresholds,
                                    protos: t.prototypes,
                                },
                                None,
                            )
                        }
                    }
                })
                .collect();
            let few: Vec<String> = learned
                .iter()
                .enumerate()
                .filter_map(|(c, (_, d))| d.map(|d| format!("{c}:{d}")))
                .collect();
            if !few.is_empty() {
                cx.notes.push(format!(
                    "lut: {}: {} codebook(s) had fewer distinct calibration rows than k={k} (codebook:distinct {})",
                    layer.name,
                    few.len(),
                    few.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            let t_learn = start.elapsed().as_secs_f64();
            // 2. encode the calibration rows
            let mut codes = vec![0u8; rows * c_n];
            let (protos, enc_inputs): (Vec<f32>, Vec<Tensor>) = match encoder {
                Encoder::Argmin => {
                    let protos: Vec<f32> = learned
                        .iter()
                        .flat_map(|(cb, _)| match cb {
                            Codebooks::Argmin { protos } => protos.clone(),
                            Codebooks::Tree { .. } => unreachable!(),
                        })
                        .collect();
                    encode_argmin(&x, rows, sub, k, &protos, &mut codes);
                    let t = Tensor::f32(&[c_n, k, s], protos.clone())?;
                    (protos, vec![t])
                }
                Encoder::Tree => {
                    let (mut dims, mut thr, mut protos) = (vec![], vec![], vec![]);
                    for (cb, _) in &learned {
                        let Codebooks::Tree {
                            dims: d,
                            thresholds: t,
                            protos: p,
                        } = cb
                        else {
                            unreachable!()
                        };
                        dims.extend(d.iter().copied());
                        thr.extend(t.iter().copied());
                        protos.extend(p.iter().copied());
                    }
                    let depth = k.trailing_zeros() as usize;
                    encode_tree(&x, rows, sub, depth, &dims, &thr, &mut codes);
                    let dims_t = Tensor::I64(
                        ArrayD::from_shape_vec(IxDyn(&[c_n, depth]), dims.iter().map(|&v| v as i64).collect())
                            .expect("size"),
                    );
                    (protos, vec![dims_t, Tensor::f32(&[c_n, k - 1], thr)?])
                }
            };
            // 3. tables: prototype · W, then ridge refit against the exact outputs
            let w = layer.w.as_standard_layout();
            let t_cmk = pq::plain_tables(&protos, sub, k, w.as_slice().unwrap(), m);
            let t_cmk = if o.refit {
                let mut t = transpose_blocks(&t_cmk, c_n, m, k);
                refit::ridge_refit(&codes, rows, c_n, k, &y, m, o.ridge, o.refit_iters, &mut t);
                transpose_blocks(&t, c_n, k, m)
            } else {
                t_cmk
            };
            let t_refit = start.elapsed().as_secs_f64();
            let (tables, scale, offset, qerr) = match o.tables {
                TableType::I8 => {
                    let q = quant::quantize(&t_cmk, c_n, m, k);
                    let tq = Tensor::I8(ArrayD::from_shape_vec(IxDyn(&[c_n, m, k]), q.q).expect("size"));
                    (tq, q.scale, q.offset, q.rel_error)
                }
                TableType::F32 => (Tensor::f32(&[c_n, m, k], t_cmk)?, vec![1.0; m], vec![0.0; m], 0.0),
            };
            // 4. how close the layer now is, on its calibration rows
            let scale_t = Tensor::f32(&[m], scale)?;
            let codes_t = Tensor::U8(ArrayD::from_shape_vec(IxDyn(&[rows, c_n]), codes).expect("size"));
            let args = [
                codes_t,
                tables.clone(),
                scale_t.clone(),
                Tensor::f32(&[m], offset.clone())?,
            ];
            let approx = crate::interp::eval::eval_op(
                &Op::LutMatMul { relu: false },
                args.into_iter().map(std::sync::Arc::new).collect(),
            )?
            .remove(0)
            .into_f32()?;
            let (rel, cos) = compare(approx.as_slice().unwrap(), &y);
            // 5. rewrite the graph, remembering how to put the exact layer back (the `mask` pass)
            let name = layer.name.clone();
            let weight_out = graph.inputs_of(layer.node)[1];
            let mut exact_layer = ExactLayer {
                matmul: name.clone(),
                weight_name: graph.node(weight_out.node).name.clone(),
                weight: graph
                    .const_value(weight_out)
                    .expect("eligible layers have constant weights")
                    .clone(),
                im2col: None,
                bias: None,
            };
            // Read a conv's rows straight from its input instead of a materialised Im2Col.
            let (enc_input, window) = match &graph.node(layer.input.node).op {
                Op::Im2Col(w) if graph.has_single_use(layer.input) => {
                    exact_layer.im2col = Some(graph.node(layer.input.node).name.clone());
                    (graph.inputs_of(layer.input.node)[0], Some(w.clone()))
                }
                _ => (layer.input, None),
            };
            let mut enc_args = vec![enc_input];
            for (i, t) in enc_inputs.into_iter().enumerate() {
                let what = if encoder == Encoder::Argmin {
                    "prototypes"
                } else {
                    ["split_dims", "thresholds"][i]
                };
                enc_args.push(graph.add_const(&format!("{name}/{what}"), t));
            }
            let op = Op::PqEncode(PqEncode {
                subspace: s,
                encoder,
                window,
                nhwc: false,
            });
            let codes_out = graph.add_op(&format!("{name}/pq_encode"), op, &enc_args);
            // A constant bias Add right after the MatMul folds into the (exact, f32) offset.
            let mut out_value = mm_out;
            let mut offset = offset;
            if let [(add, _)] = graph.consumers(mm_out)[..] {
                let add_ins = graph.inputs_of(add);
                let other = if add_ins[0] == mm_out {
                    add_ins.get(1)
                } else {
                    add_ins.first()
                };
                if let (Op::Binary(crate::ir::op::Binary::Add), Some(b)) =
                    (&graph.node(add).op, other.and_then(|o| graph.const_value(*o)))
                {
                    if b.shape() == [m] && !graph.outputs.iter().any(|(_, o)| *o == mm_out) {
                        offset.iter_mut().zip(b.to_f32_vec()).for_each(|(o, v)| *o += v);
                        out_value = Outlet::new(add, 0);
                        let bias_node = other.expect("matched above").node;
                        exact_layer.bias = Some((
                            graph.node(add).name.clone(),
                            graph.node(bias_node).name.clone(),
                            b.clone(),
                        ));
                    }
                }
            }
            let tc = graph.add_const(&format!("{name}/tables"), tables);
            let sc = graph.add_const(&format!("{name}/scale"), scale_t);
            let oc = graph.add_const(&format!("{name}/offset"), Tensor::f32(&[m], offset)?);
            let lut = graph.add_op(
                &format!("{name}/lut"),
                Op::LutMatMul { relu: false },
                &[codes_out, tc, sc, oc],
            );
            cx.exact_layers.insert(graph.node(lut.node).name.clone(), exact_layer);
            graph.replace_uses(out_value, lut);
            graph.remove_dead();
            crate::ir::infer::infer_graph(graph)?;
            cx.say(&bar, || {
                format!(
                    "  lut {}/{}: {name}: {d}×{m}, {c_n} codebooks of {s}, {}, rel err {rel:.4}, cosine {cos:.5}, {:.2} s",
                    li + 1,
                    n_layers,
                    match encoder {
                        Encoder::Argmin => "argmin",
                        Encoder::Tree => "tree",
                    },
                    start.elapsed().as_secs_f64()
                )
            });
            cx.lut_layers.push(LayerReport {
                node: name,
                kind: match (layer.window, layer.rows_per_image) {
                    (Some(_), _) => "conv",
                    (None, 1) => "fc",
                    (None, _) => "token",
                },
                d,
                m,
                codebooks: c_n,
                subspace: s,
                k,
                encoder,
                rows,
                output_rel_error: rel,
                output_cosine: cos,
                table_quant_rel_error: qerr,
                seconds: start.elapsed().as_secs_f64(),
                seconds_collect: t_collect,
                seconds_learn: t_learn - t_collect,
                seconds_refit: t_refit - t_learn,
            });
        }
        bar.finish_and_clear();
        graph.remove_dead();
        Ok(())
    }
}

/// `(‖a − b‖ / ‖b‖, cos(a, b))`
fn compare(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut e, mut nb, mut na, mut dot) = (0f64, 0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        e += (x - y) * (x - y);
        nb += y * y;
        na += x * x;
        dot += x * y;
    }
    ((e / nb.max(1e-30)).sqrt(), dot / (na.sqrt() * nb.sqrt()).max(1e-30))
}

/// Transpose each of the `c` consecutive `rows × cols` blocks of `t`: turns tables `[c][m][k]`
/// into the refit's entry-major `[c][k][m]` (one row per codebook entry) and back.
fn transpose_blocks(t: &[f32], c: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; t.len()];
    for ci in 0..c {
        let base = ci * rows * cols;
        for r in 0..rows {
            for q in 0..cols {
                out[base + q * rows + r] = t[base + r * cols + q];
            }
        }
    }
    out
}
