//! The global stage: distil the exact model's logits through the whole approximated network.
//!
//! Every LUT layer (`PqEncode` → `LutMatMul`) becomes trainable at once — its tables (float,
//! int8 fake-quantized in the forward pass, straight-through), its per-output offset, and its
//! encoder (prototypes or tree thresholds, straight-through soft assignment as in
//! [`super::learn`]; pixel codebooks as every tap's copy of each group's encoder, moved
//! together) — and they are learned together by Adam on minibatches of calibration
//! images, against the KL divergence between the exact model's output distribution and the
//! approximated one's. Gradients flow backward through the ops between LUT layers: exact
//! `Im2Col` + `MatMul` layers and pooling here, the elementwise, shape and transformer ops
//! (attention's two-operand MatMuls, Softmax, LayerNorm, GELU, Gather, Concat, Slice, …) in
//! [`super::grad`]; shape sub-graphs (`Shape` and what it feeds) carry none. An op it cannot
//! differentiate on that path ends the stage with a note, leaving the model as it was.
//!
//! One image in eight is held out; the parameters kept are those of the epoch (or the start)
//! with the lowest held-out divergence among those that agree with the exact model's top-1
//! class on at least as many held-out images as the start ([`better`]): a lower divergence
//! alone can come with fewer agreements (measured on the ResNet-18/16 fixture: 0.208 → 0.183
//! while agreement fell 89.45 → 88.67 % and test accuracy 85.26 → 83.95 %). Same inputs and
//! seed → the same parameters, at any thread count.

use super::fit;
use super::grad;
use super::learn::{self, Adam, Encoding, Problem, RowEpilogue};
use crate::error::{Error, Result};
use crate::interp::eval::eval_op;
use crate::ir::op::{Encoder, Op, PoolKind, Window};
use crate::ir::{DType, Graph, Outlet, Tensor};
use crate::pq::rng::Rng;
use crate::pq::{quant, Subspaces};
use ndarray::{ArrayD, Axis, IxDyn};
use petgraph::stable_graph::NodeIndex;
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Epochs, Adam step size (relative to each parameter group's scale), soft-assignment
    /// temperature and minibatch size, here in images.
    pub steps: learn::Options,
    /// Calibration images used (sampled).
    pub max_images: usize,
    /// How the step size moves from `steps.lr` over the stage's minibatch steps.
    pub schedule: Schedule,
}

/// A step-size schedule (`lut`'s `global_schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// `lr` throughout.
    Constant,
    /// From `lr` down to zero along a half cosine, so the last epochs settle instead of
    /// jumping between codes.
    Cosine,
}

/// What the stage did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    /// Mean KL divergence (nats) from the exact model's outputs on held-out images.
    pub kl_before: f64,
    pub kl_after: f64,
    /// Held-out images whose top-1 class agrees with the exact model's.
    pub agree_before: f64,
    pub agree_after: f64,
    pub best_epoch: usize,
    /// Held-out divergence and agreement after each epoch (the learning curve).
    pub epochs: Vec<EpochPoint>,
    pub images: usize,
    pub seconds: f64,
}

/// The held-out measures after one epoch of the global stage.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct EpochPoint {
    pub kl: f64,
    pub agree: f64,
}

/// One trainable LUT layer.
struct Unit {
    enc_node: NodeIndex,
    lut_node: NodeIndex,
    /// The encoder's data input (an image for a windowed encoder, else rows).
    input: Outlet,
    window: Option<Window>,
    /// Pixel codebooks: the number of channel groups `G`. The unit then holds one codebook per
    /// tap and group (`c = tap·G + g`, the codes' order), rows in tap-major order, and each
    /// group's copies move by their summed gradient, so they stay equal (as in
    /// [`learn::Problem::shared`]).
    groups: Option<usize>,
    sub: Subspaces,
    k: usize,
    m: usize,
    relu: bool,
    enc: Encoding,
    /// The int8 encoder's input scale (`PqEncode::act_scale`).
    act_scale: Option<f32>,
    /// `[c][k][m]`, dequantized without the per-(codebook, output) midpoints.
    tables: Vec<f32>,
    /// `[m]`: the midpoints' sum and the bias.
    offset: Vec<f32>,
    temps: Vec<f32>,
    /// Step sizes: tables, offset, encoder parameters (per codebook).
    lr_t: f32,
    lr_e: Vec<f32>,
    adam: [Adam; 3],
}

/// A unit's input rows, per codebook, and the window map they were read through.
type UnitRows = (Vec<Vec<f32>>, Option<Arc<Vec<u32>>>);

/// Per-batch values of a unit needed by its backward pass.
struct UnitFwd {
    xs: Vec<Vec<f32>>,
    codes: Vec<u8>,
    out_pre: Vec<f32>,
    tq: Vec<f32>,
    /// Where each row element came from in the input (`src + 1`, 0 = padding), per image.
    map: Option<Arc<Vec<u32>>>,
    in_shape: Vec<usize>,
}

/// Why the stage cannot run (its one caller, the `lut` pass, notes it as skipped).
fn stop(what: String) -> Error {
    Error::Other(what)
}

fn f32_of(t: &Tensor) -> Result<&ArrayD<f32>> {
    t.as_f32()
}

impl Unit {
    fn from_graph(graph: &Graph, lut: NodeIndex) -> Result<Option<Unit>> {
        let Op::LutMatMul { relu } = graph.node(lut).op else {
            return Ok(None);
        };
        let ins = graph.inputs_of(lut);
        let enc_node = ins[0].node;
        let Op::PqEncode(pe) = &graph.node(enc_node).op else {
            return Ok(None);
        };
        let eins = graph.inputs_of(enc_node);
        if pe.encoder == Encoder::Argmin && eins.len() > 2 {
            return Err(stop(
                "it does not learn argmin codebooks fitted in a metric: set lut.argmin_metric=input to run it".into(),
            ));
        }
        if pe.nhwc || ins.len() != 4 {
            return Ok(None);
        }
        let cv = |o: Outlet| {
            graph
                .const_value(o)
                .cloned()
                .ok_or_else(|| stop("non-constant LUT parameter".into()))
        };
        let (tables, scale, offset) = (cv(ins[1])?, cv(ins[2])?, cv(ins[3])?);
        let &[c_n, m, k] = tables.shape() else {
            return Ok(None);
        };
        let scale = scale.to_f32_vec();
        // only layers whose parameters fit together (as the `lut` pass writes them) are trained
        if scale.len() != m || offset.len() != m || k < 2 || m == 0 || c_n == 0 || pe.subspace == 0 {
            return Ok(None);
        }
        let mut t_ckm = vec![0f32; c_n * k * m];
        let tv = tables.to_f32_vec();
        for c in 0..c_n {
            for mi in 0..m {
                for kk in 0..k {
                    t_ckm[(c * k + kk) * m + mi] = tv[(c * m + mi) * k + kk] * scale[mi];
                }
            }
        }
        let s = pe.subspace;
        // pixel codebooks: every tap's copy of each group's encoder
        let taps = match (&pe.window, pe.pixel) {
            (Some(w), true) => w.kernel[0] * w.kernel[1],
            (None, true) => return Ok(None),
            (_, false) => 1,
        };
        if taps == 0 || c_n % taps != 0 {
            return Ok(None);
        }
        let enc = match (pe.encoder, eins.len()) {
            (Encoder::Argmin, 2) => Encoding::Argmin {
                protos: cv(eins[1])?.to_f32_vec(),
            },
            (Encoder::Tree, 3) if k.is_power_of_two() => Encoding::Tree {
                dims: cv(eins[1])?.to_i64_vec()?.iter().map(|&d| d.max(0) as usize).collect(),
                thresholds: cv(eins[2])?.to_f32_vec(),
            },
            _ => return Ok(None),
        };
        let enc = if pe.pixel { fit::per_tap(&enc, taps) } else { enc };
        let fits = match &enc {
            Encoding::Argmin { protos } => protos.len() == c_n * k * s,
            Encoding::Tree { dims, thresholds } => {
                let depth = k.trailing_zeros() as usize;
                dims.len() == c_n * depth && dims.iter().all(|&d| d < s) && thresholds.len() == c_n * (k - 1)
            }
        };
        if !fits {
            return Ok(None);
        }
        Ok(Some(Unit {
            enc_node,
            lut_node: lut,
            input: eins[0],
            window: pe.window.clone(),
            groups: pe.pixel.then_some(c_n / taps),
            sub: Subspaces { d: c_n * s, s },
            k,
            m,
            relu,
            enc,
            act_scale: pe.act_scale,
            tables: t_ckm,
            offset: offset.to_f32_vec(),
            temps: Vec::new(),
            lr_t: 0.0,
            lr_e: Vec::new(),
            adam: [Adam::new(0), Adam::new(0), Adam::new(0)],
        }))
    }

    fn enc_params(&self) -> &[f32] {
        match &self.enc {
            Encoding::Argmin { protos } => protos,
            Encoding::Tree { thresholds, .. } => thresholds,
        }
    }

    /// Rows `n_rows × d` of the encoder's input (`d` may be shorter than `c·s`: the last
    /// codebook zero-padded), per codebook.
    fn rows(&self, x: &ArrayD<f32>, maps: &mut Maps) -> Result<UnitRows> {
        let x = x.as_standard_layout();
        let data = x.as_slice().expect("standard layout");
        let (rows, d, map) = match &self.window {
            Some(w) => {
                let &[n, c, h, wd] = x.shape() else {
                    return Err(stop("a windowed encoder needs an NCHW input".into()));
                };
                let map = maps.get(w, c, [h, wd], self.groups.is_some())?;
                let d = c * w.kernel[0] * w.kernel[1];
                let p = map.len() / d;
                let per = c * h * wd;
                let mut rows = vec![0f32; n * p * d];
                rows.par_chunks_mut(p * d).enumerate().for_each(|(i, r)| {
                    let img = &data[i * per..(i + 1) * per];
                    for (v, &src) in r.iter_mut().zip(map.iter()) {
                        *v = if src == 0 { 0.0 } else { img[src as usize - 1] };
                    }
                });
                (rows, d, Some(map))
            }
            None => {
                let d = *x.shape().last().unwrap_or(&1);
                (data.to_vec(), d, None)
            }
        };
        let n_rows = rows.len() / d.max(1);
        let sub = Subspaces { d, s: self.sub.s };
        if sub.count() != self.sub.count() {
            return Err(stop(format!(
                "rows of {d} values do not fit {} codebooks",
                self.sub.count()
            )));
        }
        let xs = (0..sub.count())
            .map(|c| crate::pq::gather_subspace(&rows, n_rows, sub, c))
            .collect();
        Ok((xs, map))
    }

    fn problem<'a>(&self, xs: &'a [Vec<f32>], rows: usize, empty: &'a RowEpilogue) -> Problem<'a> {
        Problem {
            xs,
            rows,
            sub: self.sub,
            k: self.k,
            m: self.m,
            target: &[],
            epilogue: empty,
            act_scale: self.act_scale,
            shared: None,
            held_out: 0,
        }
    }

    /// The layer's output on `x`: hard codes (what the interpreter computes), or with `soft`
    /// the soft assignment's expected output (smooth: what the encoder's gradient is exact for,
    /// used to check gradients by finite differences).
    fn forward(
        &self,
        x: &ArrayD<f32>,
        out_shape: &[usize],
        maps: &mut Maps,
        soft: bool,
    ) -> Result<(ArrayD<f32>, UnitFwd)> {
        let (xs, map) = self.rows(x, maps)?;
        let n_rows = xs[0].len() / self.sub.s;
        let empty = RowEpilogue::default();
        let p = self.problem(&xs, n_rows, &empty);
        let all: Vec<usize> = (0..n_rows).collect();
        let codes = learn::hard_codes(&p, &self.enc, &all);
        let tq = learn::fake_quant(&self.tables, self.sub.count(), self.k, self.m);
        let mut z = if soft {
            self.soft_lookup(&p, &tq)
        } else {
            learn::lookup(&codes, n_rows, self.sub.count(), self.k, self.m, &tq)
        };
        z.par_chunks_mut(self.m)
            .for_each(|r| r.iter_mut().zip(&self.offset).for_each(|(a, b)| *a += b));
        let pre = z.clone();
        if self.relu {
            z.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        let y = ArrayD::from_shape_vec(IxDyn(out_shape), z).map_err(|e| stop(format!("LUT output shape: {e}")))?;
        Ok((
            y,
            UnitFwd {
                xs,
                codes,
                out_pre: pre,
                tq,
                map,
                in_shape: x.shape().to_vec(),
            },
        ))
    }

    fn soft_lookup(&self, p: &Problem, tq: &[f32]) -> Vec<f32> {
        let (k, m) = (self.k, self.m);
        let all: Vec<usize> = (0..p.rows).collect();
        let mut z = vec![0f32; p.rows * m];
        for c in 0..self.sub.count() {
            let a = learn::soft(p, &self.enc, &self.temps, c, &all);
            for i in 0..p.rows {
                for kk in 0..k {
                    let w = a[i * k + kk];
                    let t = &tq[(c * k + kk) * m..(c * k + kk + 1) * m];
                    z[i * m..(i + 1) * m].iter_mut().zip(t).for_each(|(v, e)| *v += w * e);
                }
            }
        }
        z
    }

    /// Parameter gradients (tables, offset, encoder) and, if `want_dx`, the input gradient.
    fn backward(
        &self,
        f: &UnitFwd,
        g_out: &ArrayD<f32>,
        want_dx: bool,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Option<ArrayD<f32>>) {
        let (c_n, k, m, s) = (self.sub.count(), self.k, self.m, self.sub.s);
        let g_out = g_out.as_standard_layout();
        let mut g: Vec<f32> = g_out.as_slice().expect("standard layout").to_vec();
        if self.relu {
            g.iter_mut().zip(&f.out_pre).for_each(|(g, p)| {
                if *p <= 0.0 {
                    *g = 0.0
                }
            });
        }
        let n = g.len() / m;
        let mut g_off = vec![0f32; m];
        for r in g.chunks(m) {
            g_off.iter_mut().zip(r).for_each(|(a, b)| *a += b);
        }
        let empty = RowEpilogue::default();
        let p = self.problem(&f.xs, n, &empty);
        let all: Vec<usize> = (0..n).collect();
        let per_c: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..c_n)
            .into_par_iter()
            .map(|c| {
                let mut gt = vec![0f32; k * m];
                for i in 0..n {
                    let e = f.codes[i * c_n + c] as usize;
                    gt[e * m..(e + 1) * m]
                        .iter_mut()
                        .zip(&g[i * m..(i + 1) * m])
                        .for_each(|(a, b)| *a += b);
                }
                let h = learn::assignment_grad(&self.enc, &g, n, m, k, &f.tq[c * k * m..(c + 1) * k * m]);
                let mut gx = if want_dx { vec![0f32; n * s] } else { Vec::new() };
                let ge = match &self.enc {
                    Encoding::Argmin { protos } => {
                        let a = learn::soft(&p, &self.enc, &self.temps, c, &all);
                        let gxo = want_dx.then_some(&mut gx[..]);
                        learn::argmin_backward(&p, protos, self.temps[c], c, &all, &a, &h, gxo)
                    }
                    Encoding::Tree { dims, thresholds } => {
                        let depth = k.trailing_zeros() as usize;
                        let sig = learn::tree_sig(&p, dims, thresholds, &self.temps, c, &all);
                        let dc = &dims[c * depth..(c + 1) * depth];
                        let gxo = want_dx.then_some((&mut gx[..], dc, s));
                        learn::tree_backward(k, &self.temps[c * depth..(c + 1) * depth], n, &sig, &h, gxo)
                    }
                };
                (gt, ge, gx)
            })
            .collect();
        let mut gt = Vec::with_capacity(c_n * k * m);
        let mut ge = Vec::new();
        let mut gxs = Vec::new();
        for (a, b, c) in per_c {
            gt.extend(a);
            ge.extend(b);
            gxs.push(c);
        }
        // pixel codebooks: a group's encoder is one parameter read by every tap's copy, so its
        // gradient is the copies' sum, in every copy
        if let Some(g) = self.groups {
            learn::tie(&mut ge, c_n, g, false);
        }
        let dx = want_dx.then(|| self.input_grad(f, &gxs, n));
        (gt, g_off, ge, dx)
    }

    /// Scatter the per-codebook row gradients back to the encoder's input.
    fn input_grad(&self, f: &UnitFwd, gxs: &[Vec<f32>], n: usize) -> ArrayD<f32> {
        let s = self.sub.s;
        let d = match &f.map {
            Some(_) => f.in_shape[1] * self.window.as_ref().map_or(1, |w| w.kernel[0] * w.kernel[1]),
            None => *f.in_shape.last().unwrap_or(&1),
        };
        let mut rows = vec![0f32; n * d];
        for (c, gx) in gxs.iter().enumerate() {
            let r = self.sub.range(c);
            let r = r.start.min(d)..r.end.min(d);
            for i in 0..n {
                rows[i * d + r.start..i * d + r.end].copy_from_slice(&gx[i * s..i * s + r.len()]);
            }
        }
        match &f.map {
            None => ArrayD::from_shape_vec(IxDyn(&f.in_shape), rows).expect("same size"),
            Some(map) => {
                let per: usize = f.in_shape[1..].iter().product();
                let images = f.in_shape[0];
                let per_rows = map.len();
                let mut out = vec![0f32; images * per];
                out.par_chunks_mut(per).enumerate().for_each(|(i, o)| {
                    for (&src, &v) in map.iter().zip(&rows[i * per_rows..(i + 1) * per_rows]) {
                        if src != 0 {
                            o[src as usize - 1] += v;
                        }
                    }
                });
                ArrayD::from_shape_vec(IxDyn(&f.in_shape), out).expect("same size")
            }
        }
    }

    fn init_training(&mut self, x: &ArrayD<f32>, tau: f32, lr: f32, maps: &mut Maps) -> Result<()> {
        let (xs, _) = self.rows(x, maps)?;
        let n_rows = xs[0].len() / self.sub.s;
        let empty = RowEpilogue::default();
        let p = self.problem(&xs, n_rows, &empty);
        self.temps = learn::temperatures(&p, &self.enc, tau);

        let per_c = self.enc_params().len() / self.sub.count();
        self.lr_t = lr * learn::rms(&self.tables).max(1e-12);
        self.lr_e = (0..self.enc_params().len())
            .map(|i| lr * learn::rms(&xs[i / per_c]).max(1e-12))
            .collect();
        if let Some(g) = self.groups {
            learn::tie(&mut self.lr_e, self.sub.count(), g, true);
        }
        self.adam = [
            Adam::new(self.tables.len()),
            Adam::new(self.m),
            Adam::new(self.enc_params().len()),
        ];
        Ok(())
    }

    /// One Adam step, the step sizes scaled by `f` (the schedule's factor).
    fn step(&mut self, gt: &[f32], goff: &[f32], ge: &[f32], f: f32) {
        let (lt, le) = (f * self.lr_t, &self.lr_e);
        self.adam[0].step(&mut self.tables, gt, |_| lt);
        self.adam[1].step(&mut self.offset, goff, |_| lt);
        let e = match &mut self.enc {
            Encoding::Argmin { protos } => protos,
            Encoding::Tree { thresholds, .. } => thresholds,
        };
        self.adam[2].step(e, ge, |i| f * le[i]);
    }

    /// Write the learned parameters back: int8 tables, scale, offset, encoder.
    fn store(&self, graph: &mut Graph) {
        let (c_n, k, m) = (self.sub.count(), self.k, self.m);
        let mut t_cmk = vec![0f32; c_n * m * k];
        for c in 0..c_n {
            for kk in 0..k {
                for mi in 0..m {
                    t_cmk[(c * m + mi) * k + kk] = self.tables[(c * k + kk) * m + mi];
                }
            }
        }
        let q = quant::quantize(&t_cmk, c_n, m, k);
        let offset: Vec<f32> = q.offset.iter().zip(&self.offset).map(|(a, b)| a + b).collect();
        let ins = graph.inputs_of(self.lut_node);
        let set = |graph: &mut Graph, o: Outlet, t: Tensor| graph.node_mut(o.node).op = Op::Const(Arc::new(t));
        set(
            graph,
            ins[1],
            Tensor::I8(ArrayD::from_shape_vec(IxDyn(&[c_n, m, k]), q.q).expect("size")),
        );
        set(graph, ins[2], Tensor::f32(&[m], q.scale).expect("size"));
        set(graph, ins[3], Tensor::f32(&[m], offset).expect("size"));
        let eins = graph.inputs_of(self.enc_node);
        // pixel codebooks: the first tap's copies (all equal)
        let (enc, c_e) = match self.groups {
            Some(g) => (fit::first_codebooks(&self.enc, g, k, self.sub.s), g),
            None => (self.enc.clone(), c_n),
        };
        match enc {
            Encoding::Argmin { protos } => set(
                graph,
                eins[1],
                Tensor::f32(&[c_e, k, self.sub.s], protos).expect("size"),
            ),
            Encoding::Tree { thresholds, .. } => {
                set(graph, eins[2], Tensor::f32(&[c_e, k - 1], thresholds).expect("size"))
            }
        }
    }
}

/// Window maps by window and image shape, built once per training run (every minibatch has the
/// same shapes).
#[derive(Default)]
struct Maps(HashMap<MapKey, Arc<Vec<u32>>>);

/// A window map's window (as text), channels, image size and row order (tap-major or not).
type MapKey = (String, usize, [usize; 2], bool);

impl Maps {
    /// `tap_major`: each row's values in the order `(tap, channel)` (pixel codebooks) instead of
    /// `Im2Col`'s `(channel, tap)`.
    fn get(&mut self, w: &Window, c: usize, hw: [usize; 2], tap_major: bool) -> Result<Arc<Vec<u32>>> {
        let key = (format!("{w:?}"), c, hw, tap_major);
        if let Some(m) = self.0.get(&key) {
            return Ok(m.clone());
        }
        let mut m = window_map(w, c, hw)?;
        if tap_major {
            let (taps, d) = (w.kernel[0] * w.kernel[1], c * w.kernel[0] * w.kernel[1]);
            m = fit::pixel_rows(&m, m.len() / d.max(1), d, taps);
        }
        let m = Arc::new(m);
        self.0.insert(key, m.clone());
        Ok(m)
    }
}

/// Per image `[C, H, W]` → the `Im2Col` rows `[oh·ow, C·kh·kw]`: for each row element the
/// index + 1 of the input element it reads, 0 for padding.
pub fn window_map(w: &Window, c: usize, hw: [usize; 2]) -> Result<Vec<u32>> {
    let per = c * hw[0] * hw[1];
    if per >= 1 << 24 {
        return Err(stop("an image too large to map exactly".into()));
    }
    let geo = w.resolve(hw)?;
    let x: Vec<f32> = (1..=per).map(|i| i as f32).collect();
    let (p, d) = (geo.out[0] * geo.out[1], c * w.kernel[0] * w.kernel[1]);
    let mut cols = vec![0f32; p * d];
    crate::interp::kernels::im2col::im2col(&x, c, hw, w, &geo, &mut cols);
    let mut map = vec![0u32; p * d];
    for j in 0..d {
        for q in 0..p {
            map[q * d + j] = cols[j * p + q] as u32;
        }
    }
    Ok(map)
}

/// The approximated network as a differentiable function of its LUT layers' parameters.
struct Net<'g> {
    graph: &'g Graph,
    /// Nodes the output depends on, in topological order.
    order: Vec<NodeIndex>,
    units: Vec<Unit>,
    unit_of: HashMap<NodeIndex, usize>,
    /// Nodes whose output depends on some trainable parameter.
    trainable_below: std::collections::HashSet<NodeIndex>,
    output: Outlet,
    maps: Maps,
    /// LUT layers output their soft assignment's expectation (gradient checks only).
    soft: bool,
}

type Values = HashMap<Outlet, Arc<Tensor>>;

impl<'g> Net<'g> {
    fn new(graph: &'g Graph) -> Result<Option<Net<'g>>> {
        let Some((_, output)) = graph.outputs.first().cloned() else {
            return Ok(None);
        };
        let topo = graph.topo_order()?;
        // ancestors of the output
        let mut needed = std::collections::HashSet::new();
        let mut stack = vec![output.node];
        while let Some(n) = stack.pop() {
            if needed.insert(n) {
                stack.extend(graph.inputs_of(n).iter().map(|o| o.node));
            }
        }
        let order: Vec<NodeIndex> = topo.into_iter().filter(|n| needed.contains(n)).collect();
        let mut units = Vec::new();
        let mut unit_of = HashMap::new();
        for &n in &order {
            if let Some(u) = Unit::from_graph(graph, n)? {
                // the codes must feed only this lookup
                if graph.consumers(Outlet::new(u.enc_node, 0)).len() == 1 {
                    unit_of.insert(n, units.len());
                    units.push(u);
                }
            }
        }
        if units.is_empty() {
            return Ok(None);
        }
        let mut trainable_below = std::collections::HashSet::new();
        for &n in &order {
            // shapes, indices and masks carry no gradient (a `Shape` of a LUT layer's output
            // feeds a `Reshape`'s target, not its data); codes do, into their lookups (a LUT
            // layer the stage does not train then stops it, as any op it cannot differentiate)
            let node = graph.node(n);
            let float = match node.op {
                Op::Shape { .. } => false,
                Op::PqEncode(_) => true,
                _ => node
                    .outputs
                    .first()
                    .and_then(|v| v.fact.as_ref())
                    .is_none_or(|f| f.dtype == DType::F32),
            };
            if unit_of.contains_key(&n)
                || (float && graph.inputs_of(n).iter().any(|o| trainable_below.contains(&o.node)))
            {
                trainable_below.insert(n);
            }
        }
        Ok(Some(Net {
            graph,
            order,
            units,
            unit_of,
            trainable_below,
            output,
            maps: Maps::default(),
            soft: false,
        }))
    }

    fn forward(&mut self, x: ArrayD<f32>) -> Result<(Values, Vec<Option<UnitFwd>>)> {
        let g = self.graph;
        let mut vals: Values = HashMap::new();
        let mut fwds: Vec<Option<UnitFwd>> = (0..self.units.len()).map(|_| None).collect();
        let input = Arc::new(Tensor::F32(x));
        for &n in &self.order {
            let node = g.node(n);
            let outs: Vec<Tensor> = match (&node.op, self.unit_of.get(&n)) {
                (Op::Input, _) => vec![(*input).clone()],
                (Op::Const(t), _) => {
                    vals.insert(Outlet::new(n, 0), t.clone());
                    continue;
                }
                (_, Some(&ui)) => {
                    let u = &self.units[ui];
                    let xin = vals[&u.input].clone();
                    let xin = f32_of(&xin)?;
                    let mut shape: Vec<usize> = match &u.window {
                        Some(w) => {
                            let geo = w.resolve([xin.shape()[2], xin.shape()[3]])?;
                            vec![xin.shape()[0], geo.out[0] * geo.out[1]]
                        }
                        None => xin.shape()[..xin.ndim() - 1].to_vec(),
                    };
                    shape.push(u.m);
                    let (y, f) = u.forward(xin, &shape, &mut self.maps, self.soft)?;
                    fwds[ui] = Some(f);
                    vec![Tensor::F32(y)]
                }
                (Op::PqEncode(_), None) if self.units.iter().any(|u| u.enc_node == n) => continue,
                (op, None) => {
                    let args: Vec<Arc<Tensor>> = g.inputs_of(n).iter().map(|o| vals[o].clone()).collect();
                    eval_op(op, args).map_err(|e| stop(format!("{} ({}): {e}", node.name, op.name())))?
                }
            };
            for (slot, t) in outs.into_iter().enumerate() {
                vals.insert(Outlet::new(n, slot), Arc::new(t));
            }
        }
        Ok((vals, fwds))
    }

    /// Accumulate parameter gradients for `d loss / d output = g_out`.
    #[allow(clippy::type_complexity)]
    fn backward(
        &mut self,
        vals: &Values,
        fwds: &[Option<UnitFwd>],
        g_out: ArrayD<f32>,
    ) -> Result<Vec<(Vec<f32>, Vec<f32>, Vec<f32>)>> {
        let g = self.graph;
        let mut grads: HashMap<Outlet, ArrayD<f32>> = HashMap::new();
        grads.insert(self.output, g_out);
        let mut pgrads: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = vec![Default::default(); self.units.len()];
        let wants = |o: &Outlet, tb: &std::collections::HashSet<NodeIndex>| tb.contains(&o.node);
        for &n in self.order.iter().rev() {
            if !self.trainable_below.contains(&n) {
                continue;
            }
            let node = g.node(n);
            if (1..node.outputs.len()).any(|slot| grads.contains_key(&Outlet::new(n, slot))) {
                return Err(stop(format!(
                    "cannot differentiate {} ({}) through an output other than its first",
                    node.op.name(),
                    node.name
                )));
            }
            let Some(gy) = grads.remove(&Outlet::new(n, 0)) else {
                continue;
            };
            let ins = g.inputs_of(n);
            if let Some(&ui) = self.unit_of.get(&n) {
                let u = &self.units[ui];
                let want_dx = wants(&u.input, &self.trainable_below);
                let f = fwds[ui].as_ref().expect("forward ran");
                let (gt, goff, ge, dx) = u.backward(f, &gy, want_dx);
                pgrads[ui] = (gt, goff, ge);
                if let Some(dx) = dx {
                    add_grad(&mut grads, u.input, dx);
                }
                continue;
            }
            let x = |i: usize| -> Result<&ArrayD<f32>> { f32_of(&vals[&ins[i]]) };
            let unsupported = || stop(format!("cannot differentiate {} ({})", node.op.name(), node.name));
            match &node.op {
                Op::Im2Col(w) => {
                    let xs = x(0)?.shape().to_vec();
                    let map = self.maps.get(w, xs[1], [xs[2], xs[3]], false)?;
                    add_grad(&mut grads, ins[0], scatter_rows(&gy, &map, &xs, None));
                }
                Op::Pool(p) if !p.nhwc => {
                    let xv = x(0)?;
                    let map = self.maps.get(&p.window, 1, [xv.shape()[2], xv.shape()[3]], false)?;
                    let gx = pool_backward(&node.op, p.kind.clone(), &p.window, &map, xv, &gy)?;
                    add_grad(&mut grads, ins[0], gx);
                }
                op => {
                    let args: Vec<Arc<Tensor>> = ins.iter().map(|o| vals[o].clone()).collect();
                    let want: Vec<bool> = ins.iter().map(|o| wants(o, &self.trainable_below)).collect();
                    let y = f32_of(&vals[&Outlet::new(n, 0)])?;
                    let gxs = grad::input_grads(op, &args, y, gy, &want)
                        .map_err(|e| stop(format!("{} ({}): {e}", node.name, op.name())))?
                        .ok_or_else(unsupported)?;
                    for (o, gx) in ins.iter().zip(gxs) {
                        if let Some(gx) = gx {
                            add_grad(&mut grads, *o, gx);
                        }
                    }
                }
            }
        }
        Ok(pgrads)
    }
}

fn add_grad(grads: &mut HashMap<Outlet, ArrayD<f32>>, o: Outlet, g: ArrayD<f32>) {
    match grads.get_mut(&o) {
        Some(acc) => *acc += &g,
        None => {
            grads.insert(o, g);
        }
    }
}

/// Scatter `Im2Col`-shaped row gradients `[N, P, d]` back to `[N, C, H, W]` through `map`,
/// each element weighted by `weight` (per row element) when given.
fn scatter_rows(gy: &ArrayD<f32>, map: &[u32], xs: &[usize], weight: Option<&[f32]>) -> ArrayD<f32> {
    let per: usize = xs[1..].iter().product();
    let gy = gy.as_standard_layout();
    let gs = gy.as_slice().expect("standard");
    let mut out = vec![0f32; xs[0] * per];
    out.par_chunks_mut(per).enumerate().for_each(|(i, o)| {
        let gi = &gs[i * map.len()..(i + 1) * map.len()];
        for (j, (&src, &v)) in map.iter().zip(gi).enumerate() {
            if src != 0 {
                o[src as usize - 1] += v * weight.map_or(1.0, |w| w[j]);
            }
        }
    });
    ArrayD::from_shape_vec(IxDyn(xs), out).expect("size")
}

/// Gradient of a 2-D pooling (NCHW) through its window map: max routes each output's
/// gradient to the first maximal input of its window; average spreads it with the weight
/// `1 / divisor`, read off the op itself applied to ones (`count_include_pad` and `ceil_mode`
/// included).
/// `map` is one channel's window map (rows `[P, kh·kw]`).
fn pool_backward(
    op: &Op,
    kind: PoolKind,
    w: &Window,
    map: &[u32],
    x: &ArrayD<f32>,
    gy: &ArrayD<f32>,
) -> Result<ArrayD<f32>> {
    let xs = x.shape().to_vec();
    let [nb, c, h, wd] = xs[..] else {
        return Err(stop("pooling needs an NCHW input".into()));
    };
    let kk = w.kernel[0] * w.kernel[1];
    let p = map.len() / kk;
    let gy = gy.as_standard_layout();
    let gys = gy.as_slice().expect("standard");
    let xsd = x.as_standard_layout();
    let xsl = xsd.as_slice().expect("standard");
    let avg_weight: Vec<f32> = match kind {
        PoolKind::Avg { .. } => {
            let ones = Tensor::f32(&[1, 1, h, wd], vec![1.0; h * wd])?;
            let r = eval_op(op, vec![Arc::new(ones)])?.remove(0).to_f32_vec();
            (0..p)
                .map(|q| {
                    let nonpad = map[q * kk..(q + 1) * kk].iter().filter(|&&s| s != 0).count().max(1);
                    r[q] / nonpad as f32
                })
                .collect()
        }
        PoolKind::Max => Vec::new(),
    };
    let mut gx = vec![0f32; nb * c * h * wd];
    gx.par_chunks_mut(h * wd).enumerate().for_each(|(i, gplane)| {
        let plane = &xsl[i * h * wd..(i + 1) * h * wd];
        let gp = &gys[i * p..(i + 1) * p];
        for q in 0..p {
            let win = &map[q * kk..(q + 1) * kk];
            match kind {
                PoolKind::Max => {
                    let mut best: Option<(f32, usize)> = None;
                    for &s in win.iter().filter(|&&s| s != 0) {
                        let v = plane[s as usize - 1];
                        if best.is_none_or(|(b, _)| v > b) {
                            best = Some((v, s as usize - 1));
                        }
                    }
                    if let Some((_, j)) = best {
                        gplane[j] += gp[q];
                    }
                }
                PoolKind::Avg { .. } => {
                    for &s in win.iter().filter(|&&s| s != 0) {
                        gplane[s as usize - 1] += gp[q] * avg_weight[q];
                    }
                }
            }
        }
    });
    Ok(ArrayD::from_shape_vec(IxDyn(&xs), gx).expect("size"))
}

/// Softmax of each row of `z` (`rows × classes`).
fn softmax_rows(z: &[f32], classes: usize) -> Vec<f64> {
    let mut p = vec![0f64; z.len()];
    for (zr, pr) in z.chunks(classes).zip(p.chunks_mut(classes)) {
        let mx = zr.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut s = 0.0;
        for (a, b) in zr.iter().zip(pr.iter_mut()) {
            *b = (*a as f64 - mx).exp();
            s += *b;
        }
        pr.iter_mut().for_each(|v| *v /= s);
    }
    p
}

/// `(mean KL(teacher ‖ student), images whose top-1 agrees, d KL / d student logits)`.
fn kl_loss(student: &ArrayD<f32>, teacher: &[f32]) -> (f64, usize, ArrayD<f32>) {
    let s = student.as_standard_layout();
    let z = s.as_slice().expect("standard");
    let b = student.shape()[0].max(1);
    let classes = z.len() / b;
    let (ps, pt) = (softmax_rows(z, classes), softmax_rows(teacher, classes));
    let mut kl = 0.0;
    let mut agree = 0;
    let mut g = vec![0f32; z.len()];
    for i in 0..b {
        let r = i * classes..(i + 1) * classes;
        for j in r.clone() {
            if pt[j] > 0.0 {
                kl += pt[j] * (pt[j].ln() - ps[j].max(1e-300).ln());
            }
            g[j] = ((ps[j] - pt[j]) / b as f64) as f32;
        }
        let am = |v: &[f32]| {
            v.iter()
                .enumerate()
                .fold(0, |best, (j, x)| if *x > v[best] { j } else { best })
        };
        agree += (am(&z[r.clone()]) == am(&teacher[r])) as usize;
    }
    (
        kl / b as f64,
        agree,
        ArrayD::from_shape_vec(IxDyn(student.shape()), g).expect("size"),
    )
}

/// Distil the exact model's outputs into `graph`'s LUT layers (see the module docs), calling
/// `on_epoch(epoch, point)` after each epoch (progress). Returns `None` when the graph has no
/// LUT layer to train.
pub fn distil(
    graph: &mut Graph,
    exact: &Graph,
    calib: &ArrayD<f32>,
    o: &Options,
    seed: u64,
    on_epoch: &mut dyn FnMut(usize, EpochPoint),
) -> Result<Option<Report>> {
    let start = std::time::Instant::now();
    let frozen = graph.clone();
    let Some(mut net) = Net::new(&frozen)? else {
        return Ok(None);
    };
    let mut rng = Rng::derive(seed, &[0x610b]);
    let n_all = calib.shape()[0];
    let chosen = rng.sample_indices(n_all, o.max_images.max(2));
    let images = calib.select(Axis(0), &chosen);
    let n = images.shape()[0];
    // the exact model's outputs
    let plan = super::output_plan(exact)?;
    let mut teacher: Vec<f32> = Vec::new();
    for chunk in images.axis_chunks_iter(Axis(0), 64) {
        let t = plan.run(vec![Tensor::F32(chunk.to_owned())])?.remove(0);
        teacher.extend(t.to_f32_vec());
    }
    let classes = teacher.len() / n.max(1);
    let mut order: Vec<usize> = (0..n).collect();
    learn::shuffle(&mut order, &mut rng);
    let n_hold = (n / 8).max(1);
    let (hold, train) = order.split_at(n_hold);
    let mut train = train.to_vec();
    let batch_of = |idx: &[usize]| -> (ArrayD<f32>, Vec<f32>) {
        let x = images.select(Axis(0), idx);
        let t = idx
            .iter()
            .flat_map(|&i| teacher[i * classes..(i + 1) * classes].iter().copied())
            .collect();
        (x, t)
    };
    // temperatures and step sizes from the first training batch
    {
        let (x, _) = batch_of(&train[..train.len().min(o.steps.batch.max(1))]);
        let (vals, _) = net.forward(x)?;
        let maps = &mut net.maps;
        for u in net.units.iter_mut() {
            let xin = f32_of(&vals[&u.input])?.clone();
            u.init_training(&xin, o.steps.temperature, o.steps.lr, maps)?;
        }
    }
    let evaluate = |net: &mut Net| -> Result<(f64, f64)> {
        let (mut kl, mut agree) = (0.0, 0usize);
        for chunk in hold.chunks(64) {
            let (x, t) = batch_of(chunk);
            let (vals, _) = net.forward(x)?;
            let out = f32_of(&vals[&net.output])?;
            let (k, a, _) = kl_loss(out, &t);
            kl += k * chunk.len() as f64;
            agree += a;
        }
        Ok((kl / hold.len() as f64, agree as f64 / hold.len() as f64))
    };
    let (kl0, agree0) = evaluate(&mut net)?;
    let snapshot = |net: &Net| -> Vec<(Vec<f32>, Vec<f32>, Encoding)> {
        net.units
            .iter()
            .map(|u| (u.tables.clone(), u.offset.clone(), u.enc.clone()))
            .collect()
    };
    let mut best = (kl0, agree0, 0usize, snapshot(&net));
    let mut epochs = Vec::with_capacity(o.steps.epochs);
    let batch = o.steps.batch.max(1);
    let total = (o.steps.epochs * train.len().div_ceil(batch)).max(1);
    let mut step = 0usize;
    for epoch in 1..=o.steps.epochs {
        learn::shuffle(&mut train, &mut rng);
        for b in train.chunks(batch) {
            let f = step_factor(o.schedule, step, total);
            step += 1;
            let (x, t) = batch_of(b);
            let (vals, fwds) = net.forward(x)?;
            let (_, _, g) = kl_loss(f32_of(&vals[&net.output])?, &t);
            let pg = net.backward(&vals, &fwds, g)?;
            for (u, (gt, goff, ge)) in net.units.iter_mut().zip(pg) {
                if !gt.is_empty() {
                    u.step(&gt, &goff, &ge, f);
                }
            }
        }
        let (kl, agree) = evaluate(&mut net)?;
        let point = EpochPoint { kl, agree };
        epochs.push(point);
        on_epoch(epoch, point);
        if better(point, best.0, agree0) {
            best = (kl, agree, epoch, snapshot(&net));
        }
    }
    let (kl, agree, best_epoch, params) = best;
    if best_epoch > 0 {
        for (u, (t, off, e)) in net.units.iter_mut().zip(params) {
            u.tables = t;
            u.offset = off;
            u.enc = e;
            u.store(graph);
        }
    }
    Ok(Some(Report {
        kl_before: kl0,
        kl_after: kl,
        agree_before: agree0,
        agree_after: agree,
        best_epoch,
        epochs,
        images: n,
        seconds: start.elapsed().as_secs_f64(),
    }))
}

/// Whether an epoch's held-out point replaces the best kept so far (divergence `best_kl`):
/// a lower divergence, with no fewer top-1 agreements than the start's `start_agree`.
pub fn better(p: EpochPoint, best_kl: f64, start_agree: f64) -> bool {
    p.kl < best_kl && p.agree >= start_agree
}

/// The schedule's factor on the step size at step `t` of `total`: 1 throughout, or for
/// `Cosine` falling from 1 at the first step along a half cosine towards 0 after the last.
pub fn step_factor(schedule: Schedule, t: usize, total: usize) -> f32 {
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * t as f64 / total.max(1) as f64).cos())) as f32,
    }
}

/// A check of the whole backward pass (tests): with every LUT layer in its soft, smooth form
/// (see [`Unit::forward`]), the analytic gradient of the divergence on `images` w.r.t. one
/// offset of each LUT layer (the one with the largest gradient) next to its central finite
/// difference with step `h`. Returns `(analytic, numeric)` per LUT layer, in graph order.
pub fn check_gradients(
    graph: &Graph,
    exact: &Graph,
    images: &ArrayD<f32>,
    temperature: f32,
    h: f32,
) -> Result<Vec<(f64, f64)>> {
    let Some(mut net) = Net::new(graph)? else {
        return Ok(Vec::new());
    };
    let teacher = crate::interp::run(exact, vec![Tensor::F32(images.clone())])?
        .remove(0)
        .to_f32_vec();
    let (vals, _) = net.forward(images.clone())?;
    let maps = &mut net.maps;
    for u in net.units.iter_mut() {
        let xin = f32_of(&vals[&u.input])?.clone();
        u.init_training(&xin, temperature, 1e-3, maps)?;
    }
    net.soft = true;
    let (vals, fwds) = net.forward(images.clone())?;
    let (_, _, g) = kl_loss(f32_of(&vals[&net.output])?, &teacher);
    let pg = net.backward(&vals, &fwds, g)?;
    let mut out = Vec::new();
    for (ui, (_, goff, _)) in pg.iter().enumerate() {
        let j = (0..goff.len())
            .max_by(|&a, &b| goff[a].abs().total_cmp(&goff[b].abs()))
            .unwrap_or(0);
        let mut loss_at = |delta: f32| -> Result<f64> {
            net.units[ui].offset[j] += delta;
            let (v, _) = net.forward(images.clone())?;
            net.units[ui].offset[j] -= delta;
            Ok(kl_loss(f32_of(&v[&net.output])?, &teacher).0)
        };
        let numeric = (loss_at(h)? - loss_at(-h)?) / (2.0 * h as f64);
        // a layer no gradient reached has an empty one: 0 next to its finite difference
        out.push((goff.get(j).copied().unwrap_or(0.0) as f64, numeric));
    }
    Ok(out)
}

/// The model's output on `images` as the stage computes it (every LUT layer in Rust on its
/// rows, hard codes), for tests to hold against the interpreter's. `None` when it has no
/// trainable LUT layer.
pub fn stage_forward(graph: &Graph, images: &ArrayD<f32>) -> Result<Option<ArrayD<f32>>> {
    let Some(mut net) = Net::new(graph)? else {
        return Ok(None);
    };
    let (vals, _) = net.forward(images.clone())?;
    Ok(Some(f32_of(&vals[&net.output])?.clone()))
}
