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

use super::analysis::LutLayers;
use super::{Pass, PassCx};
use crate::calib::fit::{fit_layer, gather, im2col_of, Fitted, Plan, Resumes};
use crate::calib::global::Schedule;
use crate::calib::learn::{self, Encoding};
use crate::calib::{self, Sample};
use crate::error::{Error, Result};
use crate::ir::op::{Encoder, Op, PqEncode, Window};
use crate::ir::{Graph, Outlet, Tensor};
use crate::pq::rng::Rng;
use ndarray::{ArrayD, IxDyn};
use petgraph::stable_graph::NodeIndex;
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderChoice {
    Argmin,
    Tree,
    Auto,
}

/// Where an encoder's fitting measures the squared error it reduces (a hash tree's splits,
/// k-means' clusters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// On the layer's output: the error `(x − μ)ᵀ A (x − μ)` of a bucket's or cluster's
    /// subvectors in the metric `A = W Wᵀ` of the weight rows they meet (window codebooks past
    /// the stem; the others keep `Input`).
    Output,
    /// On the subvectors themselves (MADDNESS's criterion).
    Input,
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
    /// Channels per *pixel codebook* for convolutions larger than 1×1 whose channels it divides
    /// (4 by default; 0 = off): each codebook covers that many channels of one input pixel and serves every
    /// tap of the window, so each pixel is encoded once (`K·C` multiply-adds per input pixel
    /// instead of `K·C·kh·kw` per output pixel) at `kh·kw·C / pixel_subspace` lookups per
    /// output; only layers whose taps mostly read the image take them. Gradient learning moves
    /// every tap's copy of a codebook together, and so does the global stage.
    /// A layer with its own `subspace` in `layers` keeps window codebooks.
    pub pixel_subspace: usize,
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
    /// `output` or `input`: where the hash trees' splits measure the error they reduce. On
    /// the output, a split goes where it moves the layer's result most, not where the inputs
    /// spread most (`input`, MADDNESS's criterion); the encoder's work is the same. `output`
    /// applies to window codebooks of layers past the stem (a layer reading the model's input
    /// keeps `input`: there it lowered the layer's error and cost ResNet-18/16 0.3–2.3 points
    /// of accuracy over three seeds), not to pixel codebooks (no gain measured).
    pub tree_splits: Metric,
    /// `output` or `input`: where k-means measures the argmin codebooks' error. On the output,
    /// each codebook clusters its subvectors in the metric `A = W Wᵀ` of the weight rows they
    /// meet and encodes the nearest prototype in it, as `argmin_k pᵀAp − 2 x·Ap` (the same
    /// work as the Euclidean argmin, with the norms `pᵀAp` stored beside the prototypes `A p`).
    /// It applies where `tree_splits` would (window codebooks past the stem), with the f32 and
    /// the int8 encoder (whose codes learning then does not mirror: it learns on the f32 ones),
    /// and not when the global stage runs (`global_epochs`; it learns argmin codebooks only in
    /// the Euclidean form).
    /// Not the default: on the fixtures the layers it reaches gained little, and through masking
    /// it removed less arithmetic at the same budget on most seeds measured (docs/RESULTS.md).
    pub argmin_metric: Metric,
    /// The int8 argmin encoder (7-bit inputs, int8 prototypes, exact integer distances) for the
    /// convolutions its channel-lane kernel serves: one codebook per input channel, kernel
    /// width ≤ 4, `k = 16`, inputs non-negative on every calibration row (after a ReLU).
    pub int8_encoder: bool,
    /// Refit tables by ridge least squares against the exact layer outputs.
    pub refit: bool,
    /// Ridge strength, relative to the average code frequency; pulls towards `prototype · W`.
    pub ridge: f32,
    /// Ridge strengths tried per layer: `ridge`, 4×, 16×, … (`ridge_steps` of them); the tables
    /// kept are those with the lowest error on the rows of the calibration images held out of
    /// the fit ([`Options::hold_out`]). 1: `ridge` alone. None: [`Options::ridge_strengths`].
    pub ridge_steps: Option<usize>,
    /// Hold the rows of one calibration image in eight out of each layer's fit (codebooks and
    /// refit): they choose the ridge strength and judge learning. Off: every row is fitted on,
    /// `ridge` alone is used, and learning holds out one row in eight of those. None:
    /// [`Options::holds_out`].
    pub hold_out: Option<bool>,
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
    /// Per-layer settings over the ones above: for each layer, the last entry whose `name`
    /// matches it (`*` wildcards allowed) sets its encoder, values per codebook, channels per
    /// pixel codebook and prototypes per codebook (each optional). The
    /// `mask` pass's refine steps record their per-layer choices here, so a later run of the
    /// pass (relearning) fits each layer as it was chosen.
    pub layers: Vec<LayerOverride>,
    /// After fitting, learn codebooks and tables by gradient descent (`calib::learn`):
    /// `none`, `layer` (reconstruct the layer's output) or `block` (reconstruct the activation
    /// at the end of its block: after the bias, ReLU/Clip and residual Add that follow).
    pub learn: LearnMode,
    /// Passes over the calibration rows when learning.
    pub epochs: usize,
    /// Learning stops once this many epochs in a row have not lowered the layer's held-out
    /// error (0 = every epoch runs). On the paper's ResNet-18 w64, 12 of 22 layers gained
    /// nothing over their fitted start in 6 epochs, and learning took 168 s of its 329 s
    /// default compile (82 s with a patience of 2).
    pub patience: usize,
    /// Adam step size, relative to the scale of each parameter group.
    pub lr: f32,
    /// Soft-assignment temperature, relative to each codebook's mean distance gap.
    pub temperature: f32,
    /// Rows per minibatch when learning.
    pub batch: usize,
    /// Epochs of the global stage (`calib::global`): after every layer is replaced, distil
    /// the exact model's outputs through the whole approximated network, all LUT layers at
    /// once; 0 = off.
    pub global_epochs: usize,
    /// Adam step size of the global stage, relative to each parameter group's scale.
    pub global_lr: f32,
    /// Soft-assignment temperature of the global stage (relative, as `temperature`); low, so
    /// the relaxed network whose gradients it follows stays close to the hard one.
    pub global_temperature: f32,
    /// Images per minibatch and calibration images used by the global stage.
    pub global_batch: usize,
    pub global_images: usize,
    /// How the global stage's step size moves over its steps from `global_lr`: `cosine`
    /// (down to zero along a half cosine) or `constant`.
    pub global_schedule: Schedule,
    /// Refit the weight (and bias) of each layer kept exact (`keep_exact`, and the layers the
    /// `mask` pass restores, when it relearns) that follows a replaced layer, by ridge
    /// regression from the approximated activations it reads to the exact model's output
    /// ([`calib::compensate`]), kept where it lowers the error on held-out rows.
    pub compensate: bool,
    /// Ridge strength of `compensate`, relative to the mean diagonal of the inputs' Gram matrix.
    pub compensate_ridge: f32,
}

/// One entry of [`Options::layers`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LayerOverride {
    /// MatMul node name, `*` wildcards allowed.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<EncoderChoice>,
    /// Values per codebook for this layer, whatever its kind (conv, fully connected, tokens).
    /// Window codebooks: the layer takes no pixel codebooks unless the entry also sets
    /// `pixel_subspace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subspace: Option<usize>,
    /// Channels per pixel codebook for this layer (0 = window codebooks), as
    /// [`Options::pixel_subspace`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_subspace: Option<usize>,
    /// Prototypes per codebook for this layer, as [`Options::k`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<usize>,
}

impl Options {
    /// The options `layer` (a MatMul node name) is fitted with: these, with the last matching
    /// entry of `layers` applied. An entry's `subspace`, or a pass-wide `subspace` above 0, asks
    /// for window codebooks: pixel codebooks then only where the entry itself gives
    /// `pixel_subspace` (so `--set lut.subspace=3` still means what it did before pixel
    /// codebooks became the default).
    pub fn for_layer(&self, layer: &str) -> Options {
        let mut o = self.clone();
        let (mut window_given, mut pixel_given) = (false, false);
        if let Some(l) = self.layers.iter().rev().find(|l| super::glob_match(&l.name, layer)) {
            if let Some(e) = l.encoder {
                o.encoder = e;
            }
            if let Some(s) = l.subspace {
                (o.subspace, o.fc_subspace, o.token_subspace) = (s, s, s);
                window_given = true;
            }
            if let Some(g) = l.pixel_subspace {
                o.pixel_subspace = g;
                pixel_given = true;
            }
            if let Some(k) = l.k {
                o.k = k;
            }
        }
        if (window_given || o.subspace > 0) && !pixel_given {
            o.pixel_subspace = 0;
        }
        o
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LearnMode {
    None,
    Layer,
    Block,
}

impl Options {
    /// The ridge strengths tried per layer ([`Options::ridge_steps`]); by default 4 above 16
    /// codes, where each table entry is fitted from few rows and overfits (at 64 codes and
    /// 16 384 rows the ResNet-18/16's block errors on held-out images read 1–56 % above those
    /// on the rows fitted on, median 14 %, and the strength chosen reached 6.4), 1 at 16 or
    /// fewer (on ResNet-18 w64 the search kept 0.1 or 0.4, and the layers took 1.3–2.3× their
    /// time, images held out as well).
    pub fn ridge_strengths(&self) -> usize {
        self.ridge_steps.unwrap_or(if self.k > 16 { 4 } else { 1 })
    }

    /// Whether layers hold calibration images out of their fit ([`Options::hold_out`]); by
    /// default above 16 codes, where the ridge strength chosen on them pays. At 16 codes the
    /// default pipeline's ResNet-18 w64 (MNIST, `max_accuracy_drop=0.5`) removed the same
    /// arithmetic (72.0 against 72.7 %, −0.21 against −0.22 points) in 1.9× the compile time:
    /// learning, now judged on images it did not fit, ran more epochs and the mask relearned
    /// more; the README demo removed 29.8 / 24.8 / 10.0 % on seeds 0–2 against 19.9 / 16.9 / 29.0 %.
    pub fn holds_out(&self) -> bool {
        self.hold_out.unwrap_or(self.k > 16)
    }
}

impl Default for Options {
    fn default() -> Options {
        Options {
            subspace: 0,
            pixel_subspace: 4,
            fc_subspace: 4,
            token_subspace: 0,
            k: 16,
            encoder: EncoderChoice::Auto,
            tree_splits: Metric::Output,
            argmin_metric: Metric::Input,
            int8_encoder: true,
            refit: true,
            ridge: 0.1,
            ridge_steps: None,
            hold_out: None,
            refit_iters: 20,
            tables: TableType::I8,
            max_rows: 16384,
            kmeans_iters: 20,
            progressive: true,
            min_macs: 0,
            keep_exact: Vec::new(),
            layers: Vec::new(),
            learn: LearnMode::Block,
            epochs: 6,
            patience: 2,
            lr: 0.01,
            temperature: 1.0,
            batch: 256,
            global_epochs: 0,
            global_lr: 0.003,
            global_temperature: 0.1,
            global_batch: 32,
            global_images: 2048,
            global_schedule: Schedule::Cosine,
            compensate: false,
            compensate_ridge: 0.01,
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
    /// Pixel codebooks ([`Options::pixel_subspace`]): `codebooks` counts each tap's.
    pub pixel: bool,
    pub k: usize,
    pub encoder: Encoder,
    /// The int8 argmin encoder's input scale (None: the f32 encoder).
    pub act_scale: Option<f32>,
    pub rows: usize,
    /// Rows of the calibration images held out of the fit (they judge the ridge strength and
    /// learning), and the ridge strength chosen.
    pub rows_held_out: usize,
    pub ridge: f32,
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
    /// Calibration images the rows come from, and how many of them the run of the graph
    /// approximated so far resumed from the previous layer's kept activations
    /// ([`calib::resume`]); the others ran through the whole prefix.
    pub images: usize,
    pub images_resumed: usize,
    /// What gradient learning did, when it ran.
    pub learn: Option<LearnReport>,
}

/// Gradient learning of one layer, for the compile report.
#[derive(Clone, Debug, Serialize)]
pub struct LearnReport {
    /// `layer` or `block` (`layer` when nothing elementwise follows the layer).
    pub objective: &'static str,
    /// Relative RMS error of the objective's activation on held-out calibration rows.
    pub error_before: f64,
    pub error_after: f64,
    pub best_epoch: usize,
    pub steps: usize,
    pub seconds: f64,
}

pub struct Lut(pub Options);

/// The start of the note that no calibration run resumed (given once per compile: the `mask`
/// pass's relearning runs the pass again).
const NO_RESUME: &str = "lut: no calibration run resumed from the previous layer's kept activations";

/// A MatMul the pass can replace: constant `[D, M]` weight, input rows of length D (an input
/// `[N, …, D]` gives `rows_per_image` = the product of the middle dimensions: the token rows of
/// a transformer's linear layers, the pixels of a conv).
struct Layer {
    node: NodeIndex,
    name: String,
    input: Outlet,
    /// The weight `[D, M]`, in standard layout.
    w: ArrayD<f32>,
    /// Kernel `[kh, kw]` when the rows come from an Im2Col (a conv), else None.
    window: Option<[usize; 2]>,
    /// The Im2Col's window when the rows come from one that nothing else reads (the encoder
    /// then reads its input: what pixel codebooks need).
    conv: Option<Window>,
    /// The share of the window's taps, over its output pixels, that read the image rather
    /// than padding (1 without a window or a known input size).
    inside: f64,
    rows_per_image: usize,
    /// Its rows are the model's input, only moved, padded or scaled on the way (the stem):
    /// its trees split and its k-means clusters on the input's error ([`Metric`]).
    stem: bool,
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
        .filter(|w| w.ndim() == 2)?
        .as_standard_layout()
        .into_owned();
    let f = graph.fact(ins[0])?;
    if f.rank() < 2 {
        return None;
    }
    let rows_per_image = f.shape[1..f.rank() - 1]
        .iter()
        .map(|d| d.known().unwrap_or(1) as usize)
        .product();
    let window = im2col_of(graph, ins[0]).map(|(_, win)| win.kernel);
    let conv = im2col_of(graph, ins[0])
        .filter(|_| graph.has_single_use(ins[0]))
        .map(|(_, win)| win.clone());
    let inside = im2col_of(graph, ins[0])
        .and_then(|(x, win)| {
            let hw = crate::ir::window::spatial(&graph.fact(x)?.shape, false)?;
            inside_share(win, hw)
        })
        .unwrap_or(1.0);
    Some(Layer {
        node: n,
        name: graph.node(n).name.clone(),
        input: ins[0],
        w,
        window,
        conv,
        inside,
        rows_per_image,
        stem: from_model_input(graph, ins[0]),
    })
}

/// Whether `o` is the model's input, reached through ops that only move, pad or scale its
/// values (Im2Col, Pad, reshapes, Transpose, Cast, arithmetic with a constant).
fn from_model_input(graph: &Graph, mut o: Outlet) -> bool {
    for _ in 0..64 {
        let ins = graph.inputs_of(o.node);
        o = match &graph.node(o.node).op {
            Op::Input => return true,
            Op::Im2Col(_)
            | Op::Pad { .. }
            | Op::Reshape { .. }
            | Op::Flatten { .. }
            | Op::Squeeze { .. }
            | Op::Unsqueeze { .. }
            | Op::Transpose { .. }
            | Op::Cast { .. } => ins[0],
            Op::Binary(_) if ins.len() == 2 => match (graph.const_value(ins[0]), graph.const_value(ins[1])) {
                (None, Some(_)) => ins[0],
                (Some(_), None) => ins[1],
                _ => return false,
            },
            _ => return false,
        };
    }
    false
}

/// Values per codebook for `layer` (before clamping to the row length).
fn subspace(layer: &Layer, o: &Options) -> usize {
    match layer.window {
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
}

/// `(taps, channels per codebook)` when `layer` gets pixel codebooks: a conv larger than 1×1
/// whose Im2Col the encoder can read, with `pixel_subspace` dividing its `d / taps` channels.
fn pixel_codebooks(layer: &Layer, o: &Options, d: usize) -> Option<(usize, usize)> {
    let taps = layer.conv.as_ref().map(|w| w.kernel[0] * w.kernel[1])?;
    let g = o.pixel_subspace;
    let fits = g > 0 && taps > 1 && d.is_multiple_of(taps) && (d / taps).is_multiple_of(g);
    (fits && layer.inside >= PIXEL_INSIDE).then_some((taps, g))
}

/// How `layer` is fitted under its options `o`: its weight and codebooks.
fn plan<'a>(layer: &'a Layer, o: &Options) -> Plan<'a> {
    let d = layer.w.shape()[0];
    Plan {
        node: layer.node,
        input: layer.input,
        name: &layer.name,
        kind: match (layer.window, layer.rows_per_image) {
            (Some(_), _) => "conv",
            (None, 0 | 1) => "fc",
            (None, _) => "token",
        },
        w: layer.w.as_slice().expect("standard layout"),
        m: layer.w.shape()[1],
        window: layer.window,
        pixel: pixel_codebooks(layer, o, d),
        subspace: subspace(layer, o),
        stem: layer.stem,
    }
}

/// Whether the MatMul named `layer` in `graph` would take pixel codebooks of `g` channels
/// (a conv larger than 1×1 whose Im2Col only it reads, `g` dividing its channels, taps mostly
/// inside the image): what the `mask` pass's `refine_pixel` asks before fitting one.
pub fn pixel_fits(graph: &Graph, layer: &str, g: usize) -> bool {
    let o = Options {
        pixel_subspace: g,
        ..Options::default()
    };
    graph
        .find(layer)
        .and_then(|n| describe(graph, n))
        .is_some_and(|l| pixel_codebooks(&l, &o, l.w.shape()[0]).is_some())
}

/// Pixel codebooks serve convolutions at least this share of whose taps read the image: on
/// ResNet-18 w64 (MNIST) they fit the 3×3 layers on 7×7 and 4×4 maps (82 % and 69 % inside)
/// with up to 14 % less output error than one codebook per channel (one equal), those on 2×2
/// maps (44 %) with 3–56 % more (taps on padding all read one code, and leave fewer codebooks informative).
const PIXEL_INSIDE: f64 = 0.6;

/// The share of `win`'s taps over its output pixels on an `hw` input that fall inside it.
fn inside_share(win: &Window, hw: [usize; 2]) -> Option<f64> {
    let geo = win.resolve(hw).ok()?;
    let axis = |a: usize| -> (usize, usize) {
        let inside = (0..geo.out[a])
            .flat_map(|o| (0..win.kernel[a]).map(move |i| o * win.strides[a] + i * win.dilations[a]))
            .filter(|&p| p >= geo.pads[a] && p - geo.pads[a] < hw[a])
            .count();
        (inside, geo.out[a] * win.kernel[a])
    };
    let ((ih, th), (iw, tw)) = (axis(0), axis(1));
    (th * tw > 0).then(|| (ih * iw) as f64 / (th * tw) as f64)
}

/// Replace the layer's MatMul (and the Im2Col and bias Add it absorbs) by PQEncode + LutMatMul;
/// returns the LutMatMul's name and how to put the exact layer back (for the `mask` pass).
fn rewrite(graph: &mut Graph, layer: &Layer, f: Fitted) -> Result<(String, ExactLayer)> {
    let (name, m, k) = (layer.name.clone(), layer.w.shape()[1], f.report.k);
    let (s, pixel) = (f.report.subspace, f.report.pixel);
    // prototypes: one set per pixel codebook, shared by the taps
    let c_n = match pixel {
        true => f.report.d / layer.conv.as_ref().map_or(1, |w| w.kernel[0] * w.kernel[1]) / s,
        false => f.report.codebooks,
    };
    let mm_out = Outlet::new(layer.node, 0);
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
    let (enc_input, window) = match im2col_of(graph, layer.input) {
        Some((input, w)) if graph.has_single_use(layer.input) => {
            exact_layer.im2col = Some(graph.node(layer.input.node).name.clone());
            (input, Some(w.clone()))
        }
        _ if pixel => return Err(Error::Other(format!("{name}: pixel codebooks need the Im2Col's input"))),
        _ => (layer.input, None),
    };
    let mut enc_args = vec![enc_input];
    match f.enc {
        Encoding::Argmin { protos } => {
            let t = Tensor::f32(&[c_n, k, s], protos)?;
            enc_args.push(graph.add_const(&format!("{name}/prototypes"), t));
            if let Some(norms) = f.norms {
                let t = Tensor::f32(&[c_n, k], norms)?;
                enc_args.push(graph.add_const(&format!("{name}/norms"), t));
            }
        }
        Encoding::Tree { dims, thresholds } => {
            let depth = k.trailing_zeros() as usize;
            let dims_t = Tensor::I64(
                ArrayD::from_shape_vec(IxDyn(&[c_n, depth]), dims.iter().map(|&v| v as i64).collect()).expect("size"),
            );
            enc_args.push(graph.add_const(&format!("{name}/split_dims"), dims_t));
            let thr = Tensor::f32(&[c_n, k - 1], thresholds)?;
            enc_args.push(graph.add_const(&format!("{name}/thresholds"), thr));
        }
    }
    let op = Op::PqEncode(PqEncode {
        subspace: s,
        encoder: f.encoder,
        window,
        nhwc: false,
        act_scale: f.act_scale,
        pixel,
    });
    let codes_out = graph.add_op(&format!("{name}/pq_encode"), op, &enc_args);
    // A constant bias Add right after the MatMul folds into the (exact, f32) offset.
    let mut out_value = mm_out;
    let mut offset = f.offset;
    if let Some((add, port, b)) = bias_add(graph, mm_out, m) {
        offset.iter_mut().zip(b.to_f32_vec()).for_each(|(o, v)| *o += v);
        out_value = Outlet::new(add, 0);
        let bias_node = graph.inputs_of(add)[port].node;
        exact_layer.bias = Some((graph.node(add).name.clone(), graph.node(bias_node).name.clone(), b));
    }
    let tc = graph.add_const(&format!("{name}/tables"), f.tables);
    let sc = graph.add_const(&format!("{name}/scale"), Tensor::f32(&[m], f.scale)?);
    let oc = graph.add_const(&format!("{name}/offset"), Tensor::f32(&[m], offset)?);
    let lut = graph.add_op(
        &format!("{name}/lut"),
        Op::LutMatMul { relu: false },
        &[codes_out, tc, sc, oc],
    );
    let lut_name = graph.node(lut.node).name.clone();
    graph.replace_uses(out_value, lut);
    graph.remove_dead();
    crate::ir::infer::infer_graph(graph)?;
    Ok((lut_name, exact_layer))
}

/// The constant bias Add right after MatMul output `mm_out` (`m` outputs), if there is one
/// and the MatMul's output is not a graph output: `(Add node, the bias's input port, bias)`.
fn bias_add(graph: &Graph, mm_out: Outlet, m: usize) -> Option<(NodeIndex, usize, std::sync::Arc<Tensor>)> {
    let [(add, _)] = graph.consumers(mm_out)[..] else {
        return None;
    };
    let add_ins = graph.inputs_of(add);
    let port = if add_ins[0] == mm_out { 1 } else { 0 };
    let b = add_ins.get(port).and_then(|o| graph.const_value(*o))?;
    let fits = matches!(graph.node(add).op, Op::Binary(crate::ir::op::Binary::Add))
        && b.shape() == [m]
        && !graph.outputs.iter().any(|(_, o)| *o == mm_out);
    fits.then(|| (add, port, b.clone()))
}

/// What compensating a kept layer reads besides the graph.
struct Compensate<'a> {
    exact: &'a Graph,
    calib: &'a ArrayD<f32>,
    order: &'a [usize],
}

impl Lut {
    /// `lut.compensate`: refit the weight (and bias) of `layer`, kept exact, from the
    /// activations the replaced layers before it give to the exact model's output.
    #[allow(clippy::too_many_arguments)]
    fn compensate(
        &self,
        graph: &mut Graph,
        c: &Compensate,
        layer: &Layer,
        ci: usize,
        resumes: &mut Resumes,
        cx: &mut PassCx,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        let o = &self.0;
        let t0 = Instant::now();
        let mut rng = Rng::derive(cx.seed, &[0xc0, ci as u64]);
        let sample = Sample::new(&mut rng, c.order, layer.rows_per_image, o.max_rows);
        let lo = Options {
            learn: LearnMode::None,
            ..o.for_layer(&layer.name)
        };
        let p = plan(layer, &lo);
        let data = gather(graph, c.exact, &p, &lo, c.calib, &sample, resumes, true)?;
        let (d, m) = (layer.w.shape()[0], layer.w.shape()[1]);
        let mm_out = Outlet::new(layer.node, 0);
        let bias = bias_add(graph, mm_out, m);
        let refit = crate::calib::compensate::refit_weight(
            &data.x,
            data.rows,
            d,
            &data.y,
            m,
            p.w,
            o.compensate_ridge,
            bias.is_some(),
        );
        let name = layer.name.clone();
        match refit {
            Some(r) => {
                let w = graph.add_const(&format!("{name}/compensated"), Tensor::f32(&[d, m], r.w)?);
                graph.set_input(layer.node, 1, w);
                if let Some((add, port, b)) = bias {
                    let nb: Vec<f32> = b.to_f32_vec().iter().zip(&r.shift).map(|(b, s)| b + s).collect();
                    let bc = graph.add_const(&format!("{name}/compensated_bias"), Tensor::f32(&[m], nb)?);
                    graph.set_input(add, port, bc);
                }
                graph.remove_dead();
                crate::ir::infer::infer_graph(graph)?;
                cx.say(bar, || {
                    format!(
                        "  lut: {name} kept exact, compensated: held-out rel err {:.4} → {:.4}, {:.2} s",
                        r.before,
                        r.after,
                        t0.elapsed().as_secs_f64()
                    )
                });
            }
            None => cx.say(bar, || {
                format!("  lut: {name} kept exact, not compensated (no held-out gain)")
            }),
        }
        Ok(())
    }
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
        check_options(o)?;
        let calib = cx.calib.clone().ok_or_else(|| {
            Error::Input("the lut pass learns from data: give calibration images with --calib X.npy".into())
        })?;
        let exact = graph.clone();
        // the pipeline's own run (mask's refits run with a record already there)
        if cx.analyses.lut.is_none() {
            note_unmatched(graph, o, &mut cx.notes)?;
        }
        let record = cx.analyses.lut.get_or_insert_with(|| LutLayers::new(o.clone()));
        record.options = o.clone();
        let kept = |name: &str| o.keep_exact.iter().any(|g| super::glob_match(g, name));
        let all = eligible(graph, o.min_macs)?;
        let n_images = calib.shape().first().copied().unwrap_or(0);
        if n_images == 0 {
            return Err(Error::Input("lut: the calibration set holds no images".into()));
        }
        let n_layers = all.iter().filter(|l| !kept(&l.name)).count();
        let bar = crate::cli::progress(n_layers, "lut");
        // every layer's images are a prefix of one order, so its runs resume from the last's
        let order = calib::order(&mut Rng::derive(cx.seed, &[0x0bde7]), n_images, o.max_rows);
        let mut resumes = Resumes::default();
        // images of the layers after the first whose runs resumed (0 for all: a note)
        let mut resumed = 0;
        // replaced layers so far, and layers kept exact that compensate
        let (mut li, mut ci) = (0, 0);
        for layer in all {
            cx.check_cancel()?;
            // Earlier rewrites may have replaced this layer's producer: re-read its input.
            let layer = describe(graph, layer.node).expect("a layer stays eligible until it is replaced");
            if kept(&layer.name) {
                if o.compensate && o.progressive && li > 0 {
                    let c = Compensate {
                        exact: &exact,
                        calib: &calib,
                        order: &order,
                    };
                    self.compensate(graph, &c, &layer, ci, &mut resumes, cx, &bar)?;
                    ci += 1;
                }
                continue;
            }
            bar.set_message(layer.name.clone());
            bar.inc(1);
            let start = Instant::now();
            let mut rng = Rng::derive(cx.seed, &[li as u64, 1]);
            let sample = Sample::new(&mut rng, &order, layer.rows_per_image, o.max_rows);
            let source = if o.progressive { &*graph } else { &exact };
            let lo = o.for_layer(&layer.name);
            let more = li + 1 < n_layers;
            let plan = plan(&layer, &lo);
            let data = gather(source, &exact, &plan, &lo, &calib, &sample, &mut resumes, more)?;
            let mut fitted = fit_layer(&plan, data, &lo, cx, li, start)?;
            let r = &mut fitted.report;
            r.seconds = start.elapsed().as_secs_f64();
            let report = r.clone();
            resumed += if li > 0 { report.images_resumed } else { 0 };
            let (lut_name, exact_layer) = rewrite(graph, &layer, fitted)?;
            cx.say(&bar, || progress_line(&report, li, n_layers));
            let record = cx.analyses.lut.get_or_insert_with(|| LutLayers::new(o.clone()));
            record.replaced(lut_name, exact_layer, report);
            li += 1;
        }
        bar.finish_and_clear();
        if n_layers > 1 && resumed == 0 && !cx.notes.iter().any(|n| n.starts_with(NO_RESUME)) {
            cx.notes.push(format!(
                "{NO_RESUME} (kept only when they are f32 with the images' batch dimension leading and fit {} MiB), so every layer ran its images through the whole prefix: calibration time grows with the square of the depth",
                calib::resume::BUDGET >> 20
            ));
        }
        graph.remove_dead();
        if o.global_epochs > 0 {
            let go = crate::calib::global::Options {
                steps: learn::Options {
                    epochs: o.global_epochs,
                    patience: 0, // the global stage runs every epoch (it keeps the best)
                    lr: o.global_lr,
                    temperature: o.global_temperature,
                    batch: o.global_batch,
                },
                max_images: o.global_images,
                schedule: o.global_schedule,
            };
            let seed = Rng::derive(cx.seed, &[0x610b]).next_u64();
            let bar = crate::cli::progress(o.global_epochs, "lut global");
            let mut on_epoch = |epoch: usize, p: crate::calib::global::EpochPoint| {
                bar.inc(1);
                cx.say(&bar, || {
                    format!(
                        "  lut global: epoch {epoch}/{}: KL {:.4}, top-1 agreement {:.2} % (held out)",
                        o.global_epochs,
                        p.kl,
                        100.0 * p.agree
                    )
                });
            };
            let distilled = crate::calib::global::distil(graph, &exact, &calib, &go, seed, &mut on_epoch);
            bar.finish_and_clear();
            match distilled {
                Ok(Some(r)) => {
                    cx.say(&bar, || {
                        format!(
                            "  lut global: KL {:.4} → {:.4}, top-1 agreement {:.2} % → {:.2} % (held out), epoch {} kept, {} images, {:.1} s",
                            r.kl_before,
                            r.kl_after,
                            100.0 * r.agree_before,
                            100.0 * r.agree_after,
                            r.best_epoch,
                            r.images,
                            r.seconds
                        )
                    });
                    cx.global = Some(r);
                }
                Ok(None) => {}
                Err(e) => cx.notes.push(format!("lut: global stage skipped: {e}")),
            }
            crate::ir::infer::infer_graph(graph)?;
        }
        Ok(())
    }
}

/// A note for each `keep_exact` pattern or `layers` entry that names no layer the pass could
/// replace (by its MatMul's name, as `tabconv-compile` lists the layers).
fn note_unmatched(graph: &Graph, o: &Options, notes: &mut Vec<String>) -> Result<()> {
    let all = eligible(graph, 0)?;
    let names: Vec<&str> = all.iter().map(|l| l.name.as_str()).collect();
    let lists = [
        (
            "keep_exact",
            o.keep_exact.iter().map(String::as_str).collect::<Vec<_>>(),
        ),
        ("layers", o.layers.iter().map(|l| l.name.as_str()).collect()),
    ];
    for (list, patterns) in lists {
        for p in super::unmatched(patterns, &names) {
            // once, though the mask pass's relearning runs this pass again
            let note = format!("lut: the {list} entry {p:?} names no layer this pass could replace");
            if !notes.contains(&note) {
                notes.push(note);
            }
        }
    }
    Ok(())
}

/// Whether `k` prototypes per codebook are possible: 2..=256, a power of two for the tree
/// encoder (`tree`: some layer may take it).
pub(crate) fn k_fits(k: usize, tree: bool) -> bool {
    (2..=256).contains(&k) && (!tree || k.is_power_of_two())
}

fn check_options(o: &Options) -> Result<()> {
    let tree_somewhere = o.encoder != EncoderChoice::Argmin
        || o.layers
            .iter()
            .any(|l| l.encoder.is_some_and(|e| e != EncoderChoice::Argmin));
    if !k_fits(o.k, tree_somewhere) {
        return Err(Error::Input(format!(
            "lut.k = {}: must be 2..=256 (a power of two for the tree encoder)",
            o.k
        )));
    }
    if let Some(l) = o
        .layers
        .iter()
        .find(|l| l.k.is_some_and(|k| !k_fits(k, tree_somewhere)))
    {
        return Err(Error::Input(format!(
            "lut.layers: the entry for {:?} sets k = {}: must be 2..=256 (a power of two for the tree encoder)",
            l.name,
            l.k.unwrap_or(0)
        )));
    }
    if let Some(l) = o.layers.iter().find(|l| l.subspace == Some(0)) {
        return Err(Error::Input(format!(
            "lut.layers: the entry for {:?} sets subspace 0: give at least 1 value per codebook",
            l.name
        )));
    }
    if !(o.compensate_ridge.is_finite() && o.compensate_ridge >= 0.0) {
        return Err(Error::Input(format!(
            "lut.compensate_ridge = {}: must be finite and ≥ 0",
            o.compensate_ridge
        )));
    }
    if let Some(n) = o.ridge_steps.filter(|n| !(1..=16).contains(n)) {
        return Err(Error::Input(format!(
            "lut.ridge_steps = {n}: must be 1 to 16 (ridge strengths tried per layer)"
        )));
    }
    if o.max_rows == 0 || o.fc_subspace == 0 || !o.ridge.is_finite() || o.ridge < 0.0 {
        return Err(Error::Input(format!(
            "lut: max_rows ({}) and fc_subspace ({}) must be at least 1 and ridge ({}) finite and ≥ 0",
            o.max_rows, o.fc_subspace, o.ridge
        )));
    }
    if o.learn != LearnMode::None
        && (o.batch == 0 || !(o.lr.is_finite() && o.lr > 0.0) || !(o.temperature.is_finite() && o.temperature > 0.0))
    {
        return Err(Error::Input(format!(
            "lut: learning needs batch ≥ 1 ({}), lr > 0 ({}) and temperature > 0 ({})",
            o.batch, o.lr, o.temperature
        )));
    }
    Ok(())
}

/// The line printed as each layer is done.
fn progress_line(r: &LayerReport, li: usize, n: usize) -> String {
    let learned = match &r.learn {
        Some(l) => format!(
            ", learned ({}) {:.4} → {:.4} in {:.2} s",
            l.objective, l.error_before, l.error_after, l.seconds
        ),
        None => String::new(),
    };
    format!(
        "  lut {}/{n}: {}: {}×{}, {} codebooks of {}, {}, rel err {:.4}, cosine {:.5}, ridge {}{learned}, {:.2} s",
        li + 1,
        r.node,
        r.d,
        r.m,
        r.codebooks,
        r.subspace,
        match (r.encoder, r.act_scale) {
            (Encoder::Argmin, None) => "argmin",
            (Encoder::Argmin, Some(_)) => "argmin int8",
            (Encoder::Tree, _) => "tree",
        },
        r.output_rel_error,
        r.output_cosine,
        r.ridge,
        r.seconds
    )
}

#[cfg(test)]
mod tests {
    use super::{LayerOverride, Options};

    /// A layer's entry sets its prototypes per codebook; an entry's `k` is checked as the
    /// pass-wide one (a power of two for the tree encoder).
    #[test]
    fn a_layer_entry_sets_k() {
        let entry = |k| LayerOverride {
            name: "/a*".into(),
            encoder: None,
            subspace: None,
            pixel_subspace: None,
            k: Some(k),
        };
        let o = Options {
            layers: vec![entry(64)],
            ..Options::default()
        };
        assert_eq!((o.for_layer("/a/b").k, o.for_layer("/c").k), (64, 16));
        assert!(super::check_options(&o).is_ok());
        let e = super::check_options(&Options {
            layers: vec![entry(48)],
            ..Options::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("\"/a*\" sets k = 48"), "{e}");
    }

    /// Pixel codebooks (4 by default) give way to window codebooks wherever a `subspace` is
    /// asked for (pass-wide above 0, or in the layer's entry, 0 included), unless the entry
    /// itself gives `pixel_subspace`.
    #[test]
    fn a_subspace_asks_for_window_codebooks() {
        let entry = |subspace, pixel_subspace| LayerOverride {
            name: "/a*".into(),
            encoder: None,
            subspace,
            pixel_subspace,
            k: None,
        };
        let with = |subspace, layers: Vec<LayerOverride>| Options {
            subspace,
            layers,
            ..Options::default()
        };
        let pixel = |o: Options, layer: &str| o.for_layer(layer).pixel_subspace;
        assert_eq!(pixel(Options::default(), "/a"), 4);
        assert_eq!(pixel(with(3, vec![]), "/a"), 0, "pass-wide subspace");
        assert_eq!(pixel(with(0, vec![entry(Some(0), None)]), "/a"), 0, "entry subspace 0");
        assert_eq!(pixel(with(0, vec![entry(Some(0), None)]), "/b"), 4, "other layers");
        assert_eq!(
            pixel(with(3, vec![entry(None, Some(8))]), "/a"),
            8,
            "entry pixel_subspace"
        );
        assert_eq!(pixel(with(0, vec![entry(Some(9), Some(0))]), "/a"), 0);
        let o = with(3, vec![entry(Some(9), Some(8))]).for_layer("/a");
        assert_eq!((o.subspace, o.pixel_subspace), (9, 8), "both given: both kept");
    }
}

/// Calibration runs resumed at a cut ([`calib::resume`]) against runs from the images, through
/// the pass's own progressive loop on the ResNet-18/16 fixture (residual blocks: cuts of two
/// values, shortcuts, strided convolutions, the classifier on a flattened value).
#[cfg(test)]
mod resume_tests {
    use super::*;
    use crate::calib::fit::Data;
    use crate::calib::learn::RowStep;
    use crate::calib::Resume;
    use crate::passes::{manager::run_pipeline, pipeline::PassSpec, pipeline::Pipeline};
    use ndarray::Axis;

    /// The same values, bit for bit (a resumed run only starts later in the same graph).
    fn same(what: &str, a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
            panic!("{what}: value {i} is {} one way, {} the other", a[i], b[i]);
        }
    }

    /// The same rows, bit for bit: input, exact output, and the block's end and residuals.
    fn same_data(what: &str, a: &Data, b: &Data) {
        assert_eq!((a.rows, a.d), (b.rows, b.d), "{what}");
        same(&format!("{what} input"), &a.x, &b.x);
        same(&format!("{what} output"), &a.y, &b.y);
        match (&a.block, &b.block) {
            (Some((ta, ra)), Some((tb, rb))) => {
                same(&format!("{what} block end"), ta, tb);
                for (sa, sb) in ra.steps.iter().zip(&rb.steps) {
                    if let (RowStep::Add(xa), RowStep::Add(xb)) = (sa, sb) {
                        same(&format!("{what} residual"), xa, xb);
                    }
                }
            }
            (None, None) => {}
            _ => panic!("{what}: a block one way and not the other"),
        }
    }

    #[test]
    fn resumed_runs_give_the_rows_of_runs_from_the_images() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let mut graph = crate::onnx::load_model(&root.join("models/resnet18_fmnist.onnx")).unwrap();
        // the default pipeline up to the lut pass
        let mut pipeline = Pipeline::find("tabconv").unwrap();
        let lut_at = pipeline
            .passes
            .iter()
            .position(|p| matches!(p, PassSpec::Lut(_)))
            .unwrap();
        pipeline.passes.truncate(lut_at);
        run_pipeline(&mut graph, &pipeline, &mut PassCx::default(), |_, _| Ok(())).unwrap();
        let all = crate::data::read_f32(&root.join("data/fmnist_calib.npy")).unwrap();
        // 150 images: the order's prefixes grow 2 → 8 → 32 → 128 → 150 images over the
        // layers (32×32 to 4×4 maps, then one row per image), resumed in chunks of 64
        let calib = all.slice_axis(Axis(0), ndarray::Slice::from(0..150)).to_owned();
        let o = Options {
            max_rows: 256,
            learn: LearnMode::Block,
            kmeans_iters: 2,
            ..Options::default()
        };
        let fit = Options {
            learn: LearnMode::None,
            ..o.clone()
        };
        let exact = graph.clone();
        let layers = eligible(&graph, 0).unwrap();
        let n_layers = layers.len();
        assert!(n_layers >= 20, "{n_layers} layers");
        let order = calib::order(&mut Rng::new(5), 150, o.max_rows);
        let mut resumes = Resumes::default();
        let mut no_room = Resumes {
            source: Resume::with_budget(0),
            exact: Resume::with_budget(0),
        };
        let mut cx = PassCx {
            calib: Some(calib.clone()),
            ..PassCx::default()
        };
        let (mut resumed, mut all_images) = (0, 0);
        for (li, layer) in layers.into_iter().enumerate() {
            let layer = describe(&graph, layer.node).unwrap();
            let sample = Sample::new(&mut Rng::new(li as u64), &order, layer.rows_per_image, o.max_rows);
            let kept = (resumes.source.kept(), resumes.exact.kept());
            let more = li + 1 < n_layers;
            let p = plan(&layer, &o);
            let a = gather(&graph, &exact, &p, &o, &calib, &sample, &mut resumes, more).unwrap();
            // from the images, with nothing kept
            let fresh = |source: &Graph, sample: &Sample| {
                gather(source, &exact, &p, &o, &calib, sample, &mut Resumes::default(), false).unwrap()
            };
            let b = fresh(&graph, &sample);
            // `progressive: false` (the exact graph as the source): the one run that serves both
            // gives what two runs (a copy of it as the source) give
            let one = fresh(&exact, &sample);
            same_data(
                &format!("{}, progressive false:", layer.name),
                &one,
                &fresh(&exact.clone(), &sample),
            );
            // a budget no cut fits: nothing kept, every run from the images, the same rows
            let z = gather(&graph, &exact, &p, &o, &calib, &sample, &mut no_room, more).unwrap();
            assert_eq!((no_room.source.kept(), no_room.exact.kept()), (0, 0));
            same(&format!("{} input, no cut kept", layer.name), &z.x, &b.x);
            if kept.0 > 0 && kept.1 > 0 {
                resumed += 1;
            }
            // the images counted as resumed: those of the sample the kept cut covered
            assert_eq!(a.images, sample.images.len());
            assert_eq!(a.resumed, kept.0.min(sample.images.len()), "{}", layer.name);
            assert_eq!((b.resumed, z.resumed), (0, 0), "{}", layer.name);
            // past every layer but the last, both graphs keep a cut for at least the layer's images
            if more {
                assert!(resumes.source.kept() >= sample.images.len(), "{}", layer.name);
                assert!(resumes.exact.kept() >= sample.images.len(), "{}", layer.name);
            }
            same_data(&format!("{}, resumed:", layer.name), &a, &b);
            // with every image drawn, the order they run in does not change the rows
            if sample.images.len() == order.len() {
                let reversed: Vec<usize> = order.iter().rev().copied().collect();
                let sample = Sample::new(&mut Rng::new(li as u64), &reversed, layer.rows_per_image, o.max_rows);
                let c = fresh(&graph, &sample);
                same(&format!("{} input, images reversed", layer.name), &c.x, &b.x);
                same(&format!("{} output, images reversed", layer.name), &c.y, &b.y);
                all_images += 1;
            }
            let fitted = fit_layer(&plan(&layer, &fit), b, &fit, &mut cx, li, Instant::now()).unwrap();
            rewrite(&mut graph, &layer, fitted).unwrap();
        }
        // every layer after the first resumed in both graphs
        assert_eq!(resumed, n_layers - 1);
        assert!(all_images >= 1, "no layer drew every image");
    }
}
