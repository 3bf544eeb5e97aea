//! Learning one LUT layer by gradient descent (Adam, minibatches, fixed seed) against the exact
//! model, starting from the fitted codebooks and ridge-refit tables.
//!
//! Forward, on a minibatch of calibration rows: every codebook encodes its subvector *hard*
//! (argmin over the prototypes, or the hash tree's comparisons) and the layer output is the sum
//! of the selected entries of the **int8 fake-quantized** tables, exactly what the interpreter
//! computes. Then the row-wise [`RowEpilogue`] (bias, ReLU/Clip, residual Adds: the ops between
//! this layer and the end of its block) gives the activation compared with the exact model's.
//! Loss: mean squared error.
//!
//! Backward:
//! - tables: the gradient of the hard lookups (each row adds its output gradient to the entries
//!   it selected), passed through the quantization unchanged (straight-through);
//! - encoder: straight-through soft assignment (LUT-NN). The gradient reaches the prototypes
//!   through `softmax_k(−‖x − p_k‖² / t)`, and the tree's thresholds through leaf probabilities
//!   that multiply `σ((x_dim − θ)/t)` or `1 − σ(…)` along each path (Stella Nera's relaxation).
//!   The temperature `t` is fixed per codebook (and tree level) at the start: `temperature`
//!   times the mean gap between the nearest and the second nearest prototype, or the mean
//!   distance of a row's value to its node's threshold.
//!
//! Some rows are held out ([`Problem::held_out`]: with `lut.hold_out`, the rows of one
//! calibration image in eight, which the codebooks and the tables' refit never saw; otherwise
//! one row in eight of those fitted on); the parameters kept are those of the epoch (or the
//! start) with the lowest held-out error, so learning never makes a layer worse on its
//! held-out rows. Results are bit-identical for the same inputs and seed at any thread count:
//! codebooks are processed in parallel but every sum runs in a fixed order.

use crate::interp::kernels::elementwise::exp;
use crate::interp::kernels::encode_i8::{quantize, valid_act_scale, Quant};
use crate::pq::rng::Rng;
use crate::pq::Subspaces;
use ndarray::{ArrayView2, ArrayViewMut2};
use rayon::prelude::*;

/// How one codebook encodes, over all codebooks.
#[derive(Clone, Debug, PartialEq)]
pub enum Encoding {
    /// Prototypes `[c][k][s]`.
    Argmin { protos: Vec<f32> },
    /// Split dimension per level `[c][depth]` and thresholds in heap order `[c][k − 1]`.
    Tree { dims: Vec<usize>, thresholds: Vec<f32> },
}

/// An elementwise step after the layer, in the layer's row layout `rows × m`.
#[derive(Clone, Debug)]
pub enum RowStep {
    Relu,
    Clip(f32, f32),
    /// Add a runtime value (a residual), given in row layout.
    Add(Vec<f32>),
}

/// What follows the layer up to the end of its block, as row-wise operations.
#[derive(Clone, Debug, Default)]
pub struct RowEpilogue {
    /// Added to every row first (the layer's bias); empty for none.
    pub bias: Vec<f32>,
    pub steps: Vec<RowStep>,
}

/// The learning problem of one layer.
pub struct Problem<'a> {
    /// Rows of the layer input, one `rows × s` block per codebook (zero-padded subvectors).
    pub xs: &'a [Vec<f32>],
    pub rows: usize,
    pub sub: Subspaces,
    pub k: usize,
    pub m: usize,
    /// Target activation `rows × m` (after the epilogue).
    pub target: &'a [f32],
    pub epilogue: &'a RowEpilogue,
    /// The int8 argmin encoder's input scale: the hard forward encodes as it does
    /// ([`crate::interp::kernels::encode_i8`]), so learning keeps what the int8 codes do best.
    pub act_scale: Option<f32>,
    /// Codebooks `c` and `c'` with `c % g == c' % g` share their encoder (pixel codebooks: one
    /// per channel group, serving every tap): their prototypes or thresholds start equal, and
    /// each step moves them all by their summed gradient, so they stay equal. None: all apart.
    pub shared: Option<usize>,
    /// The last `held_out` rows are held out: never trained on, they judge each epoch. They
    /// should be rows the start was not fitted on either, or the start, fitted to them, is
    /// hard to beat there (on ResNet-18/16 at 64 codes no layer's learning was kept when the
    /// held-out rows had been in the tables' refit). 0: one row in eight, drawn at random.
    pub held_out: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    pub epochs: usize,
    /// Stop once this many epochs in a row have not lowered the held-out error (0 = run every
    /// epoch): the parameters kept are the best epoch's either way.
    pub patience: usize,
    /// Adam step size, relative to each parameter group's scale (tables: their RMS; prototypes
    /// and thresholds: the RMS of their codebook's inputs).
    pub lr: f32,
    pub temperature: f32,
    pub batch: usize,
}

/// What learning did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Relative RMS error of the activation on the held-out rows, before and after.
    pub before: f64,
    pub after: f64,
    /// Epoch whose parameters were kept (0 = the starting point).
    pub best_epoch: usize,
    pub steps: usize,
}

/// Learn `enc` and `tables` (`[c][k][m]`, f32; fake-quantized to int8 in the forward pass) in place.
pub fn learn(p: &Problem, enc: &mut Encoding, tables: &mut [f32], o: &Options, seed: u64) -> Outcome {
    let c_n = p.sub.count();
    assert_eq!(p.xs.len(), c_n);
    assert_eq!(tables.len(), c_n * p.k * p.m);
    let mut rng = Rng::derive(seed, &[0x1ea4]);
    let (hold, mut train): (Vec<usize>, Vec<usize>) = match p.held_out.min(p.rows) {
        0 => {
            let mut order: Vec<usize> = (0..p.rows).collect();
            shuffle(&mut order, &mut rng);
            let n_hold = (p.rows / 8).max(1).min(p.rows);
            let (hold, train) = order.split_at(n_hold);
            (hold.to_vec(), train.to_vec())
        }
        h => ((p.rows - h..p.rows).collect(), (0..p.rows - h).collect()),
    };
    let hold = &hold[..];
    let temps = temperatures(p, enc, o.temperature);
    let qx = quantized_inputs(p, enc);
    let qx = qx.as_deref();
    let before = error(p, enc, tables, hold, qx);
    let mut best = (before, 0usize, enc.clone(), tables.to_vec());
    if train.is_empty() || o.epochs == 0 || o.batch == 0 {
        return Outcome {
            before,
            after: before,
            ..Outcome::default()
        };
    }
    // tables that start at zero still move: their scale is at least the target's per codebook
    let scale_t = rms(tables).max(rms(p.target) / c_n as f32).max(1e-12);
    let scale_x: Vec<f32> = p.xs.iter().map(|x| rms(x).max(1e-12)).collect();
    let mut adam_t = Adam::new(tables.len());
    let mut adam_e = Adam::new(match enc {
        Encoding::Argmin { protos } => protos.len(),
        Encoding::Tree { thresholds, .. } => thresholds.len(),
    });
    let mut per_param_e = encoder_lr(p, enc, &scale_x, o.lr);
    if let Some(g) = p.shared {
        tie(&mut per_param_e, c_n, g, true);
    }
    let mut steps = 0;
    for epoch in 1..=o.epochs {
        shuffle(&mut train, &mut rng);
        for batch in train.chunks(o.batch) {
            let (g_t, mut g_e) = gradients(p, enc, tables, &temps, batch, qx);
            if let Some(g) = p.shared {
                tie(&mut g_e, c_n, g, false);
            }
            steps += 1;
            adam_t.step(tables, &g_t, |_| o.lr * scale_t);
            match enc {
                Encoding::Argmin { protos } => adam_e.step(protos, &g_e, |i| per_param_e[i]),
                Encoding::Tree { thresholds, .. } => adam_e.step(thresholds, &g_e, |i| per_param_e[i]),
            }
        }
        let e = error(p, enc, tables, hold, qx);
        if e < best.0 {
            best = (e, epoch, enc.clone(), tables.to_vec());
        } else if o.patience > 0 && epoch - best.1 >= o.patience {
            break;
        }
    }
    let (after, best_epoch, e, t) = best;
    *enc = e;
    tables.copy_from_slice(&t);
    Outcome {
        before,
        after,
        best_epoch,
        steps,
    }
}

/// Per-codebook values `v` (`c_n` equal blocks) of codebooks that share their encoder
/// ([`Problem::shared`]: `c % groups`) replaced by their sum (`mean`: their mean), the same
/// value in every copy.
pub(crate) fn tie(v: &mut [f32], c_n: usize, groups: usize, mean: bool) {
    let per = v.len() / c_n.max(1);
    let copies = c_n.div_ceil(groups.max(1)).max(1);
    for q in 0..groups.min(c_n) {
        for j in 0..per {
            let mut acc: f64 = (q..c_n).step_by(groups).map(|c| v[c * per + j] as f64).sum();
            if mean {
                acc /= copies as f64;
            }
            (q..c_n).step_by(groups).for_each(|c| v[c * per + j] = acc as f32);
        }
    }
}

/// Step size per encoder parameter: the learning rate times the RMS of its codebook's inputs.
fn encoder_lr(p: &Problem, enc: &Encoding, scale_x: &[f32], lr: f32) -> Vec<f32> {
    let per_c = match enc {
        Encoding::Argmin { .. } => p.k * p.sub.s,
        Encoding::Tree { .. } => p.k - 1,
    };
    (0..p.sub.count() * per_c).map(|i| lr * scale_x[i / per_c]).collect()
}

pub(crate) fn rms(v: &[f32]) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    ((v.iter().map(|&x| x as f64 * x as f64).sum::<f64>()) / v.len() as f64).sqrt() as f32
}

pub(crate) fn shuffle(v: &mut [usize], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}

/// Adam with bias correction.
pub(crate) struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    pub(crate) fn new(n: usize) -> Adam {
        Adam {
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }
    pub(crate) fn step(&mut self, w: &mut [f32], g: &[f32], lr: impl Fn(usize) -> f32) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        self.t += 1;
        let (c1, c2) = (1.0 - B1.powi(self.t), 1.0 - B2.powi(self.t));
        for i in 0..w.len() {
            self.m[i] = B1 * self.m[i] + (1.0 - B1) * g[i];
            self.v[i] = B2 * self.v[i] + (1.0 - B2) * g[i] * g[i];
            let (mh, vh) = (self.m[i] / c1, self.v[i] / c2);
            w[i] -= lr(i) * mh / (vh.sqrt() + 1e-20);
        }
    }
}

/// The tables as the interpreter sees them: int8 with one scale per output and one midpoint
/// per (codebook, output), dequantized (see `pq::quant`). `[c][k][m]` in and out.
pub fn fake_quant(t: &[f32], c_n: usize, k: usize, m: usize) -> Vec<f32> {
    assert_eq!(t.len(), c_n * k * m, "tables [c][k][m]");
    if t.is_empty() {
        return Vec::new();
    }
    // per codebook in parallel (a 512-codebook, 512-output layer's tables are 4 M entries,
    // quantized at every step); the per-output range is a maximum, the same whatever the order
    let per_c: Vec<(Vec<f32>, Vec<f32>)> = t
        .par_chunks(k * m)
        .map(|tc| {
            let (mut mid, mut range) = (vec![0f32; m], vec![0f32; m]);
            for mi in 0..m {
                let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
                for kk in 0..k {
                    let v = tc[kk * m + mi];
                    lo = lo.min(v);
                    hi = hi.max(v);
                }
                mid[mi] = lo + (hi - lo) / 2.0;
                range[mi] = hi - lo;
            }
            (mid, range)
        })
        .collect();
    let mut range = vec![0f32; m];
    for (_, r) in &per_c {
        range.iter_mut().zip(r).for_each(|(a, &b)| *a = a.max(b));
    }
    let scale: Vec<f32> = range.iter().map(|&r| if r > 0.0 { r / 254.0 } else { 1.0 }).collect();
    let mut out = vec![0f32; t.len()];
    out.par_chunks_mut(k * m)
        .zip(t.par_chunks(k * m))
        .zip(&per_c)
        .for_each(|((oc, tc), (mid, _))| {
            for (orow, trow) in oc.chunks_mut(m).zip(tc.chunks(m)) {
                for mi in 0..m {
                    let md = mid[mi];
                    let q = ((trow[mi] - md) / scale[mi]).round().clamp(-127.0, 127.0);
                    orow[mi] = scale[mi] * q + md;
                }
            }
        });
    out
}

/// Hard code of row `r` in codebook `c`.
fn hard_code(p: &Problem, enc: &Encoding, c: usize, r: usize) -> usize {
    let s = p.sub.s;
    let x = &p.xs[c][r * s..(r + 1) * s];
    match enc {
        Encoding::Argmin { protos } => {
            let mut best = (f32::INFINITY, 0);
            for kk in 0..p.k {
                let pk = &protos[(c * p.k + kk) * s..(c * p.k + kk + 1) * s];
                let d: f32 = x.iter().zip(pk).map(|(a, b)| (a - b) * (a - b)).sum();
                if d < best.0 {
                    best = (d, kk);
                }
            }
            best.1
        }
        Encoding::Tree { dims, thresholds } => {
            let depth = p.k.trailing_zeros() as usize;
            crate::pq::tree::encode(
                x,
                &dims[c * depth..(c + 1) * depth],
                &thresholds[c * (p.k - 1)..(c + 1) * (p.k - 1)],
            )
        }
    }
}

/// Codes `[rows][c]` of the given rows.
pub(crate) fn hard_codes(p: &Problem, enc: &Encoding, rows: &[usize]) -> Vec<u8> {
    hard_codes_q(p, enc, rows, None)
}

/// The rows' subvectors as the int8 argmin encoder reads them (`q(x)`, `[c][rows·s]`), when it
/// is the encoder. The inputs do not change while a layer learns: quantized once per run
/// instead of once per step (each `q` a rounding call).
pub(crate) fn quantized_inputs(p: &Problem, enc: &Encoding) -> Option<Vec<Vec<u8>>> {
    match (enc, p.act_scale) {
        (Encoding::Argmin { .. }, Some(a)) if valid_act_scale(a) => {
            let inv = 1.0 / a;
            Some(
                p.xs.par_iter()
                    .map(|x| x.iter().map(|&v| quantize(v, inv)).collect())
                    .collect(),
            )
        }
        _ => None,
    }
}

/// [`hard_codes`], reading the int8 encoder's inputs from `qx` ([`quantized_inputs`]) when given.
pub(crate) fn hard_codes_q(p: &Problem, enc: &Encoding, rows: &[usize], qx: Option<&[Vec<u8>]>) -> Vec<u8> {
    let c_n = p.sub.count();
    let s = p.sub.s;
    let quant = match (enc, p.act_scale) {
        (Encoding::Argmin { protos }, Some(a)) => Some(Quant::new(protos, p.k, s, a)),
        _ => None,
    };
    let per_c: Vec<Vec<u8>> = (0..c_n)
        .into_par_iter()
        .map(|c| match (&quant, qx) {
            (Some(q), Some(qx)) => {
                let mut codes = Vec::with_capacity(rows.len());
                q.nearest_quantized_rows(c, rows.iter().map(|&r| &qx[c][r * s..(r + 1) * s]), &mut codes);
                codes
            }
            (Some(q), None) => {
                let xq: Vec<u8> = rows
                    .iter()
                    .flat_map(|&r| q.quantized(&p.xs[c][r * s..(r + 1) * s]))
                    .collect();
                let mut codes = Vec::with_capacity(rows.len());
                q.nearest_quantized_rows(c, xq.chunks(s), &mut codes);
                codes
            }
            (None, _) => rows.iter().map(|&r| hard_code(p, enc, c, r) as u8).collect(),
        })
        .collect();
    let mut codes = vec![0u8; rows.len() * c_n];
    for (c, col) in per_c.iter().enumerate() {
        for (i, &v) in col.iter().enumerate() {
            codes[i * c_n + c] = v;
        }
    }
    codes
}

/// Apply the epilogue to the pre-activation `z` (`rows × m`, rows given by index into the
/// problem) in place; returns the mask of elements whose gradient passes (ReLU/Clip active).
fn epilogue_forward(p: &Problem, rows: &[usize], z: &mut [f32]) -> Vec<bool> {
    let m = p.m;
    let ep = p.epilogue;
    let mut pass = vec![true; z.len()];
    for (i, &r) in rows.iter().enumerate() {
        let zr = &mut z[i * m..(i + 1) * m];
        let pr = &mut pass[i * m..(i + 1) * m];
        if !ep.bias.is_empty() {
            zr.iter_mut().zip(&ep.bias).for_each(|(v, b)| *v += b);
        }
        for step in &ep.steps {
            match step {
                RowStep::Relu => zr.iter_mut().zip(pr.iter_mut()).for_each(|(v, q)| {
                    if *v <= 0.0 {
                        *v = 0.0;
                        *q = false;
                    }
                }),
                RowStep::Clip(lo, hi) => zr.iter_mut().zip(pr.iter_mut()).for_each(|(v, q)| {
                    if *v <= *lo || *v >= *hi {
                        *v = v.clamp(*lo, *hi);
                        *q = false;
                    }
                }),
                RowStep::Add(res) => zr.iter_mut().zip(&res[r * m..(r + 1) * m]).for_each(|(v, a)| *v += a),
            }
        }
    }
    pass
}

/// Sum of the selected entries of the (fake-quantized) tables, `rows × m`.
pub(crate) fn lookup(codes: &[u8], n: usize, c_n: usize, k: usize, m: usize, tq: &[f32]) -> Vec<f32> {
    let mut z = vec![0f32; n * m];
    z.par_chunks_mut(m).enumerate().for_each(|(i, zr)| {
        for c in 0..c_n {
            let e = codes[i * c_n + c] as usize;
            let t = &tq[(c * k + e) * m..(c * k + e + 1) * m];
            zr.iter_mut().zip(t).for_each(|(a, b)| *a += b);
        }
    });
    z
}

/// Relative RMS error of the activation on `rows` (hard encoding, quantized tables; the int8
/// encoder's inputs read from `qx`, [`quantized_inputs`], when given).
fn error(p: &Problem, enc: &Encoding, tables: &[f32], rows: &[usize], qx: Option<&[Vec<u8>]>) -> f64 {
    let c_n = p.sub.count();
    let tq = fake_quant(tables, c_n, p.k, p.m);
    let codes = hard_codes_q(p, enc, rows, qx);
    let mut z = lookup(&codes, rows.len(), c_n, p.k, p.m, &tq);
    epilogue_forward(p, rows, &mut z);
    let (mut e, mut n) = (0f64, 0f64);
    for (i, &r) in rows.iter().enumerate() {
        for (a, b) in z[i * p.m..(i + 1) * p.m].iter().zip(&p.target[r * p.m..(r + 1) * p.m]) {
            e += ((a - b) as f64).powi(2);
            n += (*b as f64).powi(2);
        }
    }
    (e / n.max(1e-30)).sqrt()
}

/// Per-codebook temperatures: argmin `[c]`, tree `[c][level]`.
pub(crate) fn temperatures(p: &Problem, enc: &Encoding, tau: f32) -> Vec<f32> {
    let c_n = p.sub.count();
    let s = p.sub.s;
    let per_c: Vec<Vec<f32>> = (0..c_n)
        .into_par_iter()
        .map(|c| match enc {
            Encoding::Argmin { protos } => {
                let mut gap = 0f64;
                for r in 0..p.rows {
                    let x = &p.xs[c][r * s..(r + 1) * s];
                    let (mut d1, mut d2) = (f32::INFINITY, f32::INFINITY);
                    for kk in 0..p.k {
                        let pk = &protos[(c * p.k + kk) * s..(c * p.k + kk + 1) * s];
                        let d: f32 = x.iter().zip(pk).map(|(a, b)| (a - b) * (a - b)).sum();
                        if d < d1 {
                            d2 = d1;
                            d1 = d;
                        } else if d < d2 {
                            d2 = d;
                        }
                    }
                    gap += (d2 - d1) as f64;
                }
                vec![(tau as f64 * gap / p.rows.max(1) as f64).max(1e-12) as f32]
            }
            Encoding::Tree { dims, thresholds } => {
                let depth = p.k.trailing_zeros() as usize;
                // mean distance to the node's threshold, over the rows whose node has a finite
                // one (a node that could not split holds +inf)
                let (mut dist, mut count) = (vec![0f64; depth], vec![0usize; depth]);
                for r in 0..p.rows {
                    let x = &p.xs[c][r * s..(r + 1) * s];
                    let mut idx = 0;
                    for l in 0..depth {
                        let node = (1 << l) - 1 + idx;
                        let v = x[dims[c * depth + l]];
                        let th = thresholds[c * (p.k - 1) + node];
                        if th.is_finite() {
                            dist[l] += (v - th).abs() as f64;
                            count[l] += 1;
                        }
                        idx = 2 * idx + (v > th) as usize;
                    }
                }
                dist.iter()
                    .zip(&count)
                    .map(|(d, &n)| (tau as f64 * d / n.max(1) as f64).max(1e-12) as f32)
                    .collect()
            }
        })
        .collect();
    per_c.concat()
}

/// `1 / (1 + e^−z)` through the interpreter's branch-free `exp` (a loop of it vectorises, where
/// libm's `expf` is a call per value), 0 below `1e-30` (a node whose threshold could not split
/// holds +∞: its σ is 0, and no subnormal number slows what follows).
#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    let y = 1.0 / (1.0 + exp(-z));
    if y < 1e-30 {
        0.0
    } else {
        y
    }
}

/// The subvectors `s` wide of `rows` (shuffled minibatch rows, scattered through `x`), copied
/// side by side. A copy loop this small keeps many of their cache misses in flight; the
/// arithmetic over each row (`k·s` multiply-adds) let the processor wait for them one row at a
/// time (most of `soft`'s time on the ResNet-18/16 fixture).
fn gather_rows(x: &[f32], s: usize, rows: &[usize]) -> Vec<f32> {
    // a copy of a length known when compiling is a few moves; of a length known only when
    // running, a call to memmove per row
    fn go<const S: usize>(x: &[f32], rows: &[usize], out: &mut [f32]) {
        for (o, &r) in out.chunks_exact_mut(S).zip(rows) {
            o.copy_from_slice(&x[r * S..(r + 1) * S]);
        }
    }
    let mut out = vec![0f32; rows.len() * s];
    match s {
        4 => go::<4>(x, rows, &mut out),
        9 => go::<9>(x, rows, &mut out),
        _ => {
            for (o, &r) in out.chunks_exact_mut(s.max(1)).zip(rows) {
                o.copy_from_slice(&x[r * s..(r + 1) * s]);
            }
        }
    }
    out
}

/// Soft assignment of `n` rows to the `k` codes of codebook `c`, `n × k` (the tree's backward
/// pass reads its node probabilities, [`tree_sig`]).
pub(crate) fn soft(p: &Problem, enc: &Encoding, temps: &[f32], c: usize, rows: &[usize]) -> Vec<f32> {
    let (s, k) = (p.sub.s, p.k);
    let mut a = vec![0f32; rows.len() * k];
    match enc {
        Encoding::Argmin { protos } => {
            let xg = gather_rows(&p.xs[c], s, rows);
            let t = temps[c];
            // prototypes `[tap][k]`: each row's k squared distances add up tap by tap in lanes
            // (each lane in the order of a sum over the taps, so the same bits)
            let cb = &protos[c * k * s..(c + 1) * k * s];
            let pt: Vec<f32> = (0..s * k).map(|i| cb[(i % k) * s + i / k]).collect();
            for (i, x) in xg.chunks_exact(s).enumerate() {
                let ar = &mut a[i * k..(i + 1) * k];
                for (&xv, pr) in x.iter().zip(pt.chunks_exact(k)) {
                    for (v, &pv) in ar.iter_mut().zip(pr) {
                        let d = xv - pv;
                        *v += d * d;
                    }
                }
                ar.iter_mut().for_each(|v| *v = -*v / t);
                let mx = ar.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                ar.iter_mut().for_each(|v| *v = exp(*v - mx));
                ar.iter().for_each(|v| sum += v);
                ar.iter_mut().for_each(|v| *v /= sum);
            }
            a
        }
        Encoding::Tree { dims, thresholds } => {
            let n = rows.len();
            let sig = tree_sig(p, dims, thresholds, temps, c, rows);
            let reach = tree_reach(k, n, &sig);
            for (leaf, col) in reach[(k - 1) * n..].chunks_exact(n.max(1)).enumerate() {
                for (i, &v) in col.iter().enumerate() {
                    a[i * k + leaf] = v;
                }
            }
            a
        }
    }
}

/// The tree's node probabilities `σ((x_dim − θ)/t)` of codebook `c` for `rows`, node-major
/// (`(k − 1) × n`, heap order), so every loop runs along the rows and vectorizes.
pub(crate) fn tree_sig(
    p: &Problem,
    dims: &[usize],
    thresholds: &[f32],
    temps: &[f32],
    c: usize,
    rows: &[usize],
) -> Vec<f32> {
    let (s, k, n) = (p.sub.s, p.k, rows.len());
    let depth = k.trailing_zeros() as usize;
    let x = &p.xs[c];
    // the value each level splits on, per row
    let cols: Vec<Vec<f32>> = (0..depth)
        .map(|l| {
            let d = dims[c * depth + l];
            rows.iter().map(|&r| x[r * s + d]).collect()
        })
        .collect();
    let mut sig = vec![0f32; (k - 1) * n];
    for (node, out) in sig.chunks_exact_mut(n.max(1)).enumerate().take(k - 1) {
        let l = tree_level(node);
        let (th, t) = (thresholds[c * (k - 1) + node], temps[c * depth + l]);
        sigmoids(out, &cols[l], th, t);
    }
    sig
}

/// `out[i] = σ((v[i] − th)/t)`. Compiled for AVX2 too, where the machine has it (8 lanes
/// instead of the baseline build's 4): the same adds, products, divisions and selects at any
/// width (no fused multiply-adds), so the same bits.
fn sigmoids(out: &mut [f32], v: &[f32], th: f32, t: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above)
        return unsafe { sigmoids_avx2(out, v, th, t) };
    }
    sigmoids_any(out, v, th, t)
}

/// [`sigmoids`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sigmoids_avx2(out: &mut [f32], v: &[f32], th: f32, t: f32) {
    sigmoids_any(out, v, th, t)
}

#[inline(always)]
fn sigmoids_any(out: &mut [f32], v: &[f32], th: f32, t: f32) {
    out.iter_mut().zip(v).for_each(|(o, &v)| *o = sigmoid((v - th) / t));
}

/// Reach probability of every tree node (heap order, leaves at `k − 1..`), node-major
/// (`(2k − 1) × n`), from the node probabilities `sig` ([`tree_sig`]).
fn tree_reach(k: usize, n: usize, sig: &[f32]) -> Vec<f32> {
    let mut reach = vec![0f32; (2 * k - 1) * n];
    tree_reach_into(k, sig, n, 0..n, &mut reach, n);
    reach
}

/// [`tree_reach`] of the rows `rows` of `sig` (node-major, `n` rows a node) into `reach`
/// (node-major, `stride` rows a node, the first `rows.len()` of each written).
#[inline(always)]
fn tree_reach_into(k: usize, sig: &[f32], n: usize, rows: std::ops::Range<usize>, reach: &mut [f32], stride: usize) {
    let nt = rows.len();
    reach[..nt].fill(1.0);
    for node in 0..k - 1 {
        let (head, tail) = reach.split_at_mut((2 * node + 1) * stride);
        let pr = &head[node * stride..node * stride + nt];
        let (left, right) = tail[..2 * stride].split_at_mut(stride);
        let sg = &sig[node * n..(node + 1) * n][rows.clone()];
        for i in 0..nt {
            left[i] = pr[i] * (1.0 - sg[i]);
            right[i] = pr[i] * sg[i];
        }
    }
}

/// Gradients of the minibatch loss w.r.t. the tables and the encoder's parameters.
fn gradients(
    p: &Problem,
    enc: &Encoding,
    tables: &[f32],
    temps: &[f32],
    rows: &[usize],
    qx: Option<&[Vec<u8>]>,
) -> (Vec<f32>, Vec<f32>) {
    let (c_n, k, m) = (p.sub.count(), p.k, p.m);
    let n = rows.len();
    let tq = fake_quant(tables, c_n, k, m);
    let codes = hard_codes_q(p, enc, rows, qx);
    let mut z = lookup(&codes, n, c_n, k, m, &tq);
    let pass = epilogue_forward(p, rows, &mut z);
    // d loss / d pre-activation (mean squared error over n·m elements)
    let norm = 2.0 / (n * m) as f32;
    let mut g = vec![0f32; n * m];
    for (i, &r) in rows.iter().enumerate() {
        for j in 0..m {
            let e = i * m + j;
            if pass[e] {
                g[e] = norm * (z[e] - p.target[r * m + j]);
            }
        }
    }
    let per_c: Vec<(Vec<f32>, Vec<f32>)> = (0..c_n)
        .into_par_iter()
        .map(|c| {
            // tables: hard lookups
            let mut gt = vec![0f32; k * m];
            for i in 0..n {
                let e = codes[i * c_n + c] as usize;
                gt[e * m..(e + 1) * m]
                    .iter_mut()
                    .zip(&g[i * m..(i + 1) * m])
                    .for_each(|(a, b)| *a += b);
            }
            // encoder: d loss / d soft assignment = g · T_cᵀ
            let h = assignment_grad(enc, &g, n, m, k, &tq[c * k * m..(c + 1) * k * m]);
            let ge = match enc {
                Encoding::Argmin { protos } => {
                    let a = soft(p, enc, temps, c, rows);
                    argmin_backward(p, protos, temps[c], c, rows, &a, &h, None)
                }
                Encoding::Tree { dims, thresholds } => {
                    let depth = k.trailing_zeros() as usize;
                    let sig = tree_sig(p, dims, thresholds, temps, c, rows);
                    tree_backward(k, &temps[c * depth..(c + 1) * depth], n, &sig, &h, None)
                }
            };
            (gt, ge)
        })
        .collect();
    let (gt, ge): (Vec<Vec<f32>>, Vec<Vec<f32>>) = per_c.into_iter().unzip();
    (gt.concat(), ge.concat())
}

/// `h = d loss / d soft assignment = g · T_cᵀ` of one codebook (`g`: `n × m` output gradient,
/// `t`: its `k × m` tables), laid out as the encoder's backward pass reads it: `n × k` for
/// [`argmin_backward`], `k × n` (leaf-major) for [`tree_backward`].
pub(crate) fn assignment_grad(enc: &Encoding, g: &[f32], n: usize, m: usize, k: usize, t: &[f32]) -> Vec<f32> {
    let mut h = vec![0f32; n * k];
    let gv = ArrayView2::from_shape((n, m), g).expect("shape");
    let tv = ArrayView2::from_shape((k, m), t).expect("shape");
    match enc {
        Encoding::Argmin { .. } => {
            let mut hv = ArrayViewMut2::from_shape((n, k), &mut h).expect("shape");
            ndarray::linalg::general_mat_mul(1.0, &gv, &tv.t(), 0.0, &mut hv);
        }
        Encoding::Tree { .. } => {
            let mut hv = ArrayViewMut2::from_shape((k, n), &mut h).expect("shape");
            ndarray::linalg::general_mat_mul(1.0, &tv, &gv.t(), 0.0, &mut hv);
        }
    }
    h
}

/// Prototype gradient of codebook `c` (`k × s`) from `h = d loss / d soft assignment`, and when
/// `gx` is given (`n × s`), the gradient w.r.t. the rows' subvectors (straight-through).
#[allow(clippy::too_many_arguments)]
pub(crate) fn argmin_backward(
    p: &Problem,
    protos: &[f32],
    t: f32,
    c: usize,
    rows: &[usize],
    a: &[f32],
    h: &[f32],
    mut gx: Option<&mut [f32]>,
) -> Vec<f32> {
    let (s, k) = (p.sub.s, p.k);
    let mut gp = vec![0f32; k * s];
    let xg = gather_rows(&p.xs[c], s, rows);
    for (i, x) in xg.chunks_exact(s).enumerate() {
        let (ar, hr) = (&a[i * k..(i + 1) * k], &h[i * k..(i + 1) * k]);
        let mean: f32 = ar.iter().zip(hr).map(|(a, h)| a * h).sum();
        for kk in 0..k {
            // d loss / d logit_k, logit = −‖x − p‖²/t; d logit / d p = 2 (x − p)/t = −d logit / d x
            let u = ar[kk] * (hr[kk] - mean) * 2.0 / t;
            if u == 0.0 {
                continue;
            }
            let pk = &protos[(c * k + kk) * s..(c * k + kk + 1) * s];
            for j in 0..s {
                gp[kk * s + j] += u * (x[j] - pk[j]);
            }
            if let Some(gx) = gx.as_deref_mut() {
                for j in 0..s {
                    gx[i * s + j] -= u * (x[j] - pk[j]);
                }
            }
        }
    }
    gp
}

/// The level of a tree node in heap order (the root 0 at level 0, nodes 1–2 at level 1, …).
fn tree_level(node: usize) -> usize {
    (usize::BITS - 1 - (node + 1).leading_zeros()) as usize
}

/// Threshold gradient of one codebook (`k − 1`, heap order) from its node probabilities `sig`
/// (node-major, `(k − 1) × n`: [`tree_sig`]) and `h = d loss / d leaf probability`
/// (leaf-major, `k × n`: [`assignment_grad`]); `temps` per level. When `gx` is given (`n × s`,
/// with the codebook's split dimension per level in `dims`), also the gradient w.r.t. the rows'
/// subvectors: `dσ/dx = −dσ/dθ`. Node-major, every loop runs along the rows; each threshold's
/// sum over the rows is kept in 8 fixed lanes, so its bits do not depend on the vector width.
/// Compiled for AVX2 too, where the machine has it, with the same bits (as [`sigmoids`]).
pub(crate) fn tree_backward(k: usize, temps: &[f32], n: usize, sig: &[f32], h: &[f32], gx: Gx) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above)
        return unsafe { tree_backward_avx2(k, temps, n, sig, h, gx) };
    }
    tree_backward_any(k, temps, n, sig, h, gx)
}

/// [`tree_backward`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tree_backward_avx2(k: usize, temps: &[f32], n: usize, sig: &[f32], h: &[f32], gx: Gx) -> Vec<f32> {
    tree_backward_any(k, temps, n, sig, h, gx)
}

/// The input gradient's buffer `n × s`, with the split dimension per level.
type Gx<'a> = Option<(&'a mut [f32], &'a [usize], usize)>;

#[inline(always)]
fn tree_backward_any(k: usize, temps: &[f32], n: usize, sig: &[f32], h: &[f32], gx: Gx) -> Vec<f32> {
    // rows in tiles (a multiple of 8), so each tile's reach and node values stay in cache
    // (a whole minibatch's are (2k − 1)·n values each: 3 MB at k = 64 and 6272 rows)
    const TILE: usize = 512;
    let mut gth = vec![0f32; k - 1];
    if n == 0 {
        return gth;
    }
    // each threshold's sum in 8 lanes over the rows in order, across tiles, added at the end
    // (not `lane_sum`'s pairwise halving, which would change the learned bits of the runs
    // measured in docs/RESULTS.md)
    let mut lanes = vec![[0f32; 8]; k - 1];
    // the input gradient per level (each level splits on one dimension), scattered at the end
    let depth = k.trailing_zeros() as usize;
    let mut gcol = vec![0f32; if gx.is_some() { depth * n } else { 0 }];
    let tile = TILE.min(n);
    let (mut reach, mut v, mut d) = (
        vec![0f32; (2 * k - 1) * tile],
        vec![0f32; (2 * k - 1) * tile],
        vec![0f32; tile],
    );
    for start in (0..n).step_by(TILE) {
        let nt = TILE.min(n - start);
        let rows = start..start + nt;
        tree_reach_into(k, sig, n, rows.clone(), &mut reach, tile);
        // value of each node: the expected `h` below it
        for leaf in 0..k {
            v[(k - 1 + leaf) * tile..(k - 1 + leaf) * tile + nt]
                .copy_from_slice(&h[leaf * n..(leaf + 1) * n][rows.clone()]);
        }
        for node in (0..k - 1).rev() {
            let (head, tail) = v.split_at_mut((2 * node + 1) * tile);
            let (l, r) = tail[..2 * tile].split_at(tile);
            let vn = &mut head[node * tile..node * tile + nt];
            let sg = &sig[node * n..(node + 1) * n][rows.clone()];
            let pr = &reach[node * tile..node * tile + nt];
            let level = tree_level(node);
            let t = temps[level];
            for i in 0..nt {
                vn[i] = sg[i] * r[i] + (1.0 - sg[i]) * l[i];
            }
            let d = &mut d[..nt];
            for i in 0..nt {
                // d loss / d σ = reach · (V_right − V_left); d σ / d θ = −σ(1 − σ)/t
                d[i] = pr[i] * (r[i] - l[i]) * sg[i] * (1.0 - sg[i]) / t;
            }
            let lanes = &mut lanes[node];
            let mut chunks = d.chunks_exact(8);
            for ch in &mut chunks {
                lanes.iter_mut().zip(ch).for_each(|(a, b)| *a += b);
            }
            // only the last tile can leave a remainder
            lanes.iter_mut().zip(chunks.remainder()).for_each(|(a, b)| *a += b);
            if !gcol.is_empty() {
                gcol[level * n..(level + 1) * n][rows.clone()]
                    .iter_mut()
                    .zip(d.iter())
                    .for_each(|(a, b)| *a += b);
            }
        }
    }
    for (g, lanes) in gth.iter_mut().zip(&lanes) {
        *g -= lanes.iter().sum::<f32>();
    }
    if let Some((gx, dims, s)) = gx {
        for (col, &dim) in gcol.chunks_exact(n).zip(dims) {
            for (i, &g) in col.iter().enumerate() {
                gx[i * s + dim] += g;
            }
        }
    }
    gth
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small problem with a ReLU and a residual in its epilogue.
    struct Case {
        xs: Vec<Vec<f32>>,
        target: Vec<f32>,
        ep: RowEpilogue,
        sub: Subspaces,
        m: usize,
        k: usize,
        rows: usize,
    }

    impl Case {
        fn problem(&self) -> Problem<'_> {
            Problem {
                xs: &self.xs,
                rows: self.rows,
                sub: self.sub,
                k: self.k,
                m: self.m,
                target: &self.target,
                epilogue: &self.ep,
                act_scale: None,
                shared: None,
                held_out: 0,
            }
        }
    }

    /// The node-major backward pass of the tree gives the per-row walk's threshold and input
    /// gradients (the walk it replaced: each row's reach down the tree, then its values back up).
    #[test]
    fn tree_backward_matches_the_per_row_walk() {
        let (k, n, s) = (16usize, 37usize, 4usize);
        let mut rng = Rng::new(3);
        let sig_rows: Vec<f32> = (0..n * (k - 1)).map(|_| rng.next_f64() as f32).collect();
        let h_rows: Vec<f32> = (0..n * k).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let temps = [0.3f32, 0.5, 0.7, 0.9];
        let dims = [1usize, 3, 1, 0]; // a dimension split at two levels
        let (mut want_th, mut want_x) = (vec![0f32; k - 1], vec![0f32; n * s]);
        let (mut v, mut reach) = (vec![0f32; 2 * k - 1], vec![0f32; 2 * k - 1]);
        for i in 0..n {
            let sr = &sig_rows[i * (k - 1)..(i + 1) * (k - 1)];
            reach[0] = 1.0;
            for node in 0..k - 1 {
                reach[2 * node + 1] = reach[node] * (1.0 - sr[node]);
                reach[2 * node + 2] = reach[node] * sr[node];
            }
            v[k - 1..].copy_from_slice(&h_rows[i * k..(i + 1) * k]);
            for node in (0..k - 1).rev() {
                let (l, r, sg) = (v[2 * node + 1], v[2 * node + 2], sr[node]);
                v[node] = sg * r + (1.0 - sg) * l;
                let level = tree_level(node);
                let d = reach[node] * (r - l) * sg * (1.0 - sg) / temps[level];
                want_th[node] -= d;
                want_x[i * s + dims[level]] += d;
            }
        }
        // the same values node-major (`sig`) and leaf-major (`h`)
        let sig: Vec<f32> = (0..(k - 1) * n).map(|j| sig_rows[(j % n) * (k - 1) + j / n]).collect();
        let h: Vec<f32> = (0..k * n).map(|j| h_rows[(j % n) * k + j / n]).collect();
        let mut gx = vec![0f32; n * s];
        let gth = tree_backward(k, &temps, n, &sig, &h, Some((&mut gx, &dims, s)));
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()));
        assert!(close(&gth, &want_th), "{gth:?} vs {want_th:?}");
        assert!(close(&gx, &want_x), "{gx:?} vs {want_x:?}");
        assert!(
            want_x.iter().filter(|v| **v != 0.0).count() >= 3 * n,
            "three dimensions get gradient"
        );
    }

    /// The tree's soft assignment compiled for AVX2 gives the bits of the baseline build
    /// (sigmoids of every magnitude, saturated ones and ±∞ included; the backward pass with a
    /// row count that leaves a remainder of every vector width).
    #[test]
    fn the_trees_avx2_build_gives_the_same_bits() {
        let (k, n, s) = (64usize, 103usize, 4usize);
        let mut rng = Rng::new(5);
        let mut v: Vec<f32> = (0..n).map(|_| (rng.next_f64() as f32 - 0.5) * 40.0).collect();
        v[..3].copy_from_slice(&[f32::INFINITY, f32::NEG_INFINITY, 0.0]);
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        sigmoids(&mut a, &v, 0.25, 0.1);
        sigmoids_any(&mut b, &v, 0.25, 0.1);
        assert_eq!(
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert!(a.contains(&0.0) && a.contains(&1.0), "saturated values checked");
        let sig: Vec<f32> = (0..(k - 1) * n).map(|_| rng.next_f64() as f32).collect();
        let h: Vec<f32> = (0..k * n).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let temps = [0.3f32, 0.5, 0.7, 0.9, 0.2, 0.1];
        let dims = [1usize, 3, 1, 0, 2, 3];
        let (mut gx_a, mut gx_b) = (vec![0f32; n * s], vec![0f32; n * s]);
        let ga = tree_backward(k, &temps, n, &sig, &h, Some((&mut gx_a, &dims, s)));
        let gb = tree_backward_any(k, &temps, n, &sig, &h, Some((&mut gx_b, &dims, s)));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ga), bits(&gb));
        assert_eq!(bits(&gx_a), bits(&gx_b));
        assert!(
            ga.iter().all(|g| *g != 0.0),
            "every threshold has a gradient to compare"
        );
    }

    /// The backward pass before it ran in tiles of rows: every node over all rows at once.
    fn tree_backward_untiled(k: usize, temps: &[f32], n: usize, sig: &[f32], h: &[f32]) -> Vec<f32> {
        let mut gth = vec![0f32; k - 1];
        let reach = tree_reach(k, n, sig);
        let mut v = vec![0f32; (2 * k - 1) * n];
        v[(k - 1) * n..].copy_from_slice(&h[..k * n]);
        let mut d = vec![0f32; n];
        for node in (0..k - 1).rev() {
            let (head, tail) = v.split_at_mut((2 * node + 1) * n);
            let (l, r) = tail[..2 * n].split_at(n);
            let vn = &mut head[node * n..(node + 1) * n];
            let (sg, pr) = (&sig[node * n..(node + 1) * n], &reach[node * n..(node + 1) * n]);
            let t = temps[tree_level(node)];
            for i in 0..n {
                vn[i] = sg[i] * r[i] + (1.0 - sg[i]) * l[i];
                d[i] = pr[i] * (r[i] - l[i]) * sg[i] * (1.0 - sg[i]) / t;
            }
            let mut lanes = [0f32; 8];
            let mut chunks = d.chunks_exact(8);
            for ch in &mut chunks {
                lanes.iter_mut().zip(ch).for_each(|(a, b)| *a += b);
            }
            lanes.iter_mut().zip(chunks.remainder()).for_each(|(a, b)| *a += b);
            gth[node] -= lanes.iter().sum::<f32>();
        }
        gth
    }

    /// Rows in tiles give the bits of the whole minibatch at once (three tiles, the last
    /// leaving a remainder of the 8 lanes).
    #[test]
    fn the_tiled_tree_backward_gives_the_untiled_bits() {
        let (k, n) = (32usize, 1100usize);
        let mut rng = Rng::new(9);
        let sig: Vec<f32> = (0..(k - 1) * n).map(|_| rng.next_f64() as f32).collect();
        let h: Vec<f32> = (0..k * n).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let temps = [0.3f32, 0.5, 0.7, 0.9, 0.2];
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let want = tree_backward_untiled(k, &temps, n, &sig, &h);
        assert_eq!(bits(&tree_backward_any(k, &temps, n, &sig, &h, None)), bits(&want));
        assert_eq!(bits(&tree_backward(k, &temps, n, &sig, &h, None)), bits(&want));
        assert!(want.iter().all(|g| *g != 0.0));
    }

    /// The sigmoid saturates to exact 0 and 1.
    #[test]
    fn sigmoid_saturates() {
        assert_eq!(sigmoid(f32::NEG_INFINITY), 0.0);
        assert_eq!(sigmoid(-80.0), 0.0);
        assert_eq!(sigmoid(f32::INFINITY), 1.0);
        assert_eq!(sigmoid(0.0), 0.5);
        assert!((sigmoid(1.0) - 0.731_058_6).abs() < 1e-7);
    }

    /// The soft assignment's distances, added up tap by tap for all prototypes side by side,
    /// are bit for bit the per-prototype sums of squared differences (then `−d/t`, softmax).
    #[test]
    fn soft_assignment_matches_the_per_prototype_formula() {
        let c = case(16, 100, 9);
        let p = c.problem();
        let (k, s) = (16, c.sub.s);
        let mut rng = Rng::new(6);
        let protos: Vec<f32> = (0..c.sub.count() * k * s)
            .map(|_| rng.next_f64() as f32 * 3.0)
            .collect();
        let enc = Encoding::Argmin { protos: protos.clone() };
        let temps: Vec<f32> = (0..c.sub.count()).map(|i| 0.3 + i as f32).collect();
        let rows: Vec<usize> = (0..c.rows).rev().step_by(3).collect();
        for cb in 0..c.sub.count() {
            let a = soft(&p, &enc, &temps, cb, &rows);
            for (i, &r) in rows.iter().enumerate() {
                let x = &c.xs[cb][r * s..(r + 1) * s];
                let mut want: Vec<f32> = (0..k)
                    .map(|kk| {
                        let pk = &protos[(cb * k + kk) * s..(cb * k + kk + 1) * s];
                        -x.iter().zip(pk).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / temps[cb]
                    })
                    .collect();
                let mx = want.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                want.iter_mut().for_each(|v| {
                    *v = exp(*v - mx);
                    sum += *v;
                });
                want.iter_mut().for_each(|v| *v /= sum);
                let got = &a[i * k..(i + 1) * k];
                assert!(
                    got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()),
                    "codebook {cb} row {r}: {got:?} vs {want:?}"
                );
            }
        }
    }

    /// With an int8 encoder's input scale, the hard forward gives the codes the interpreter
    /// will compute (`encode_argmin` with that scale), not the f32 argmin's.
    #[test]
    fn hard_codes_follow_the_int8_encoder() {
        let c = case(16, 400, 9);
        let mut p = c.problem();
        let mut rng = Rng::new(4);
        let protos: Vec<f32> = (0..c.sub.count() * 16 * c.sub.s)
            .map(|_| rng.next_f64() as f32)
            .collect();
        let enc = Encoding::Argmin { protos: protos.clone() };
        let rows: Vec<usize> = (0..c.rows).collect();
        let x: Vec<f32> = rows
            .iter()
            .flat_map(|&r| {
                c.xs.iter()
                    .flat_map(move |xc| xc[r * c.sub.s..(r + 1) * c.sub.s].iter().copied())
            })
            .collect();
        let (mut f32_codes, mut int8_codes) = (vec![0u8; x.len() / c.sub.s], vec![0u8; x.len() / c.sub.s]);
        let sub = Subspaces {
            d: c.sub.count() * c.sub.s,
            s: c.sub.s,
        };
        crate::interp::kernels::encode::encode_argmin(&x, c.rows, sub, 16, &protos, None, None, &mut f32_codes);
        // a coarse scale, so that the two encoders disagree on some rows
        let scale = 0.05;
        crate::interp::kernels::encode::encode_argmin(&x, c.rows, sub, 16, &protos, None, Some(scale), &mut int8_codes);
        assert_ne!(f32_codes, int8_codes, "the case must tell the encoders apart");
        p.act_scale = Some(scale);
        assert_eq!(hard_codes(&p, &enc, &rows), int8_codes);
        // and the same codes from the inputs quantized once, as learning reads them
        let qx = quantized_inputs(&p, &enc).expect("an int8 argmin encoder");
        let some: Vec<usize> = rows.iter().copied().filter(|r| r % 3 != 1).collect();
        let want: Vec<u8> = some
            .iter()
            .flat_map(|&r| int8_codes[r * c.sub.count()..(r + 1) * c.sub.count()].iter().copied())
            .collect();
        assert_eq!(hard_codes_q(&p, &enc, &some, Some(&qx)), want);
    }

    fn case(k: usize, rows: usize, seed: u64) -> Case {
        let (xs, target, ep, sub, m) = problem(k, rows, seed);
        Case {
            xs,
            target,
            ep,
            sub,
            m,
            k,
            rows,
        }
    }

    fn problem(k: usize, rows: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<f32>, RowEpilogue, Subspaces, usize) {
        let sub = Subspaces { d: 6, s: 3 };
        let m = 4;
        let mut rng = Rng::new(seed);
        let mut f = || rng.next_f64() as f32 * 2.0 - 1.0;
        let xs: Vec<Vec<f32>> = (0..sub.count())
            .map(|_| (0..rows * sub.s).map(|_| f()).collect())
            .collect();
        let target: Vec<f32> = (0..rows * m).map(|_| f().max(0.0)).collect();
        let res: Vec<f32> = (0..rows * m).map(|_| 0.3 * f()).collect();
        let ep = RowEpilogue {
            bias: vec![0.1, -0.2, 0.05, 0.0],
            steps: vec![RowStep::Add(res), RowStep::Relu],
        };
        let _ = k;
        (xs, target, ep, sub, m)
    }

    /// The soft-path loss whose gradient the encoder receives: the epilogue's mask and the hard
    /// forward's output gradient held fixed, `Σ g · (soft output)`.
    fn soft_objective(p: &Problem, enc: &Encoding, tq: &[f32], temps: &[f32], rows: &[usize], g: &[f32]) -> f64 {
        let (k, m) = (p.k, p.m);
        let mut total = 0f64;
        for c in 0..p.sub.count() {
            let a = soft(p, enc, temps, c, rows);
            for i in 0..rows.len() {
                for kk in 0..k {
                    for j in 0..m {
                        total += (a[i * k + kk] * tq[(c * k + kk) * m + j] * g[i * m + j]) as f64;
                    }
                }
            }
        }
        total
    }

    /// Output gradient of the hard forward (what `gradients` computes before the encoder part).
    fn output_grad(p: &Problem, enc: &Encoding, tables: &[f32], rows: &[usize]) -> Vec<f32> {
        let tq = fake_quant(tables, p.sub.count(), p.k, p.m);
        let codes = hard_codes(p, enc, rows);
        let mut z = lookup(&codes, rows.len(), p.sub.count(), p.k, p.m, &tq);
        let pass = epilogue_forward(p, rows, &mut z);
        let norm = 2.0 / (rows.len() * p.m) as f32;
        (0..z.len())
            .map(|e| {
                let (i, j) = (e / p.m, e % p.m);
                if pass[e] {
                    norm * (z[e] - p.target[rows[i] * p.m + j])
                } else {
                    0.0
                }
            })
            .collect()
    }

    fn check_encoder_gradient(enc: Encoding, k: usize) {
        let rows = 40;
        let cs = case(k, rows, 3);
        let (sub, m) = (cs.sub, cs.m);
        let p = cs.problem();
        let mut rng = Rng::new(11);
        let tables: Vec<f32> = (0..sub.count() * k * m).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let idx: Vec<usize> = (0..rows).collect();
        let temps = temperatures(&p, &enc, 1.0);
        let (_, ge) = gradients(&p, &enc, &tables, &temps, &idx, None);
        let g = output_grad(&p, &enc, &tables, &idx);
        let tq = fake_quant(&tables, sub.count(), k, m);
        let params = |e: &Encoding| match e {
            Encoding::Argmin { protos } => protos.clone(),
            Encoding::Tree { thresholds, .. } => thresholds.clone(),
        };
        let with = |v: Vec<f32>| match &enc {
            Encoding::Argmin { .. } => Encoding::Argmin { protos: v },
            Encoding::Tree { dims, .. } => Encoding::Tree {
                dims: dims.clone(),
                thresholds: v,
            },
        };
        let base = params(&enc);
        let mut checked = 0;
        for i in 0..base.len() {
            let h = 1e-3f32;
            let (mut up, mut dn) = (base.clone(), base.clone());
            up[i] += h;
            dn[i] -= h;
            let fd = (soft_objective(&p, &with(up), &tq, &temps, &idx, &g)
                - soft_objective(&p, &with(dn), &tq, &temps, &idx, &g))
                / (2.0 * h as f64);
            let an = ge[i] as f64;
            assert!(
                (fd - an).abs() <= 2e-3 * fd.abs().max(an.abs()).max(1e-3),
                "parameter {i}: finite difference {fd} vs analytic {an}"
            );
            checked += (an.abs() > 1e-6) as usize;
        }
        assert!(
            checked > base.len() / 2,
            "most gradients should be non-zero ({checked})"
        );
    }

    #[test]
    fn prototype_gradient_matches_finite_differences() {
        let k = 4;
        let mut rng = Rng::new(5);
        let protos = (0..2 * k * 3).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
        check_encoder_gradient(Encoding::Argmin { protos }, k);
    }

    #[test]
    fn threshold_gradient_matches_finite_differences() {
        let k = 8;
        let mut rng = Rng::new(6);
        let thresholds = (0..2 * (k - 1)).map(|_| rng.next_f64() as f32 - 0.5).collect();
        check_encoder_gradient(
            Encoding::Tree {
                dims: vec![0, 2, 1, 1, 0, 2],
                thresholds,
            },
            k,
        );
    }

    #[test]
    fn table_gradient_matches_finite_differences() {
        // the hard forward is piecewise linear in the tables: finite differences of the loss
        // (float tables, away from ReLU kinks) equal the straight-through table gradient
        let (k, rows) = (4, 30);
        let cs = case(k, rows, 9);
        let (sub, m, target) = (cs.sub, cs.m, cs.target.as_slice());
        let p = cs.problem();
        let mut rng = Rng::new(2);
        let enc = Encoding::Argmin {
            protos: (0..sub.count() * k * 3).map(|_| rng.next_f64() as f32 - 0.5).collect(),
        };
        let tables: Vec<f32> = (0..sub.count() * k * m).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let idx: Vec<usize> = (0..rows).collect();
        let codes = hard_codes(&p, &enc, &idx);
        let loss = |t: &[f32]| {
            let mut z = lookup(&codes, rows, sub.count(), k, m, t);
            epilogue_forward(&p, &idx, &mut z);
            z.iter().zip(target).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / (rows * m) as f64
        };
        // the analytic gradient, on the unquantized tables
        let norm = 2.0 / (rows * m) as f32;
        let mut z = lookup(&codes, rows, sub.count(), k, m, &tables);
        let pass = epilogue_forward(&p, &idx, &mut z);
        let mut an = vec![0f64; tables.len()];
        for i in 0..rows {
            for c in 0..sub.count() {
                let e = codes[i * sub.count() + c] as usize;
                for j in 0..m {
                    if pass[i * m + j] {
                        an[(c * k + e) * m + j] += (norm * (z[i * m + j] - target[i * m + j])) as f64;
                    }
                }
            }
        }
        for i in 0..tables.len() {
            let h = 1e-3f32;
            let (mut up, mut dn) = (tables.clone(), tables.clone());
            up[i] += h;
            dn[i] -= h;
            let fd = (loss(&up) - loss(&dn)) / (2.0 * h as f64);
            assert!((fd - an[i]).abs() < 1e-3, "entry {i}: {fd} vs {}", an[i]);
        }
        // and `gradients` computes the same thing (through the fake quantization)
        let temps = temperatures(&p, &enc, 1.0);
        let (gt, _) = gradients(&p, &enc, &tables, &temps, &idx, None);
        let tq = fake_quant(&tables, sub.count(), k, m);
        let mut zq = lookup(&codes, rows, sub.count(), k, m, &tq);
        let pq = epilogue_forward(&p, &idx, &mut zq);
        for (i, g) in gt.iter().enumerate() {
            let (c, e, j) = (i / (k * m), (i / m) % k, i % m);
            let want: f32 = (0..rows)
                .filter(|&r| codes[r * sub.count() + c] as usize == e && pq[r * m + j])
                .map(|r| norm * (zq[r * m + j] - target[r * m + j]))
                .sum();
            assert!((g - want).abs() < 1e-5, "entry {i}: {g} vs {want}");
        }
    }

    #[test]
    fn learning_lowers_the_error_and_is_deterministic() {
        // targets made by a hidden layer the initial tables do not know
        let (k, rows) = (8, 2000);
        let (xs, _, ep, sub, m) = problem(k, rows, 21);
        let mut rng = Rng::new(4);
        let w: Vec<f32> = (0..sub.d * m).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let mut target = vec![0f32; rows * m];
        for r in 0..rows {
            for j in 0..m {
                let mut v = ep.bias[j];
                for c in 0..sub.count() {
                    for q in 0..sub.s {
                        v += xs[c][r * sub.s + q] * w[(c * sub.s + q) * m + j];
                    }
                }
                if let RowStep::Add(res) = &ep.steps[0] {
                    v += res[r * m + j];
                }
                target[r * m + j] = v.max(0.0);
            }
        }
        let p = Problem {
            xs: &xs,
            rows,
            sub,
            k,
            m,
            target: &target,
            epilogue: &ep,
            act_scale: None,
            shared: None,
            held_out: 0,
        };
        let protos: Vec<f32> = (0..sub.count() * k * sub.s)
            .map(|_| rng.next_f64() as f32 - 0.5)
            .collect();
        let tables = vec![0f32; sub.count() * k * m];
        let o = Options {
            epochs: 10,
            patience: 0,
            lr: 0.02,
            temperature: 1.0,
            batch: 128,
        };
        let run = || {
            let mut enc = Encoding::Argmin { protos: protos.clone() };
            let mut t = tables.clone();
            let out = learn(&p, &mut enc, &mut t, &o, 42);
            (out, enc, t)
        };
        let (out, enc, t) = run();
        assert!(out.after < 0.6 * out.before, "{out:?}");
        assert!(out.best_epoch > 0);
        let (out2, enc2, t2) = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(run);
        assert_eq!((out, &enc, &t), (out2, &enc2, &t2));
        // patience: with a zero step nothing improves, and learning stops after `patience`
        // epochs; without it every epoch runs
        let per_epoch = out.steps / o.epochs;
        let still = Options {
            lr: 0.0,
            patience: 2,
            ..o.clone()
        };
        let (mut enc, mut t) = (Encoding::Argmin { protos: protos.clone() }, tables.clone());
        let s = learn(&p, &mut enc, &mut t, &still, 42);
        assert_eq!((s.best_epoch, s.steps), (0, 2 * per_epoch), "{s:?}");
        let all = Options { patience: 0, ..still };
        let (mut enc, mut t) = (Encoding::Argmin { protos: protos.clone() }, tables.clone());
        assert_eq!(learn(&p, &mut enc, &mut t, &all, 42).steps, o.epochs * per_epoch);
    }

    /// With `held_out`, the last rows judge learning: the error reported before learning is
    /// the start's error on exactly those rows (not on a random draw), and the other rows are
    /// the ones trained on (as many minibatch steps as they fill).
    #[test]
    fn the_last_rows_are_the_held_out_ones() {
        let (xs, target, epi, sub, m) = problem(16, 400, 3);
        let k = 16;
        let p = Problem {
            xs: &xs,
            rows: 400,
            sub,
            k,
            m,
            target: &target,
            epilogue: &epi,
            act_scale: None,
            shared: None,
            held_out: 50,
        };
        let mut rng = Rng::new(5);
        let protos: Vec<f32> = (0..sub.count() * k * sub.s)
            .map(|_| rng.next_f64() as f32 - 0.5)
            .collect();
        let mut enc = Encoding::Argmin { protos };
        let mut t: Vec<f32> = (0..sub.count() * k * m)
            .map(|_| 0.1 * (rng.next_f64() as f32 - 0.5))
            .collect();
        let last: Vec<usize> = (350..400).collect();
        let first: Vec<usize> = (0..50).collect();
        let (on_last, on_first) = (error(&p, &enc, &t, &last, None), error(&p, &enc, &t, &first, None));
        assert_ne!(on_last, on_first);
        let o = Options {
            epochs: 1,
            patience: 0,
            lr: 0.01,
            temperature: 1.0,
            batch: 64,
        };
        let out = learn(&p, &mut enc, &mut t, &o, 1);
        assert_eq!(out.before, on_last);
        assert_eq!(out.steps, 350usize.div_ceil(64), "350 rows trained on");
    }

    /// Codebooks that share their encoder (`shared`, pixel codebooks' taps) start equal and end
    /// equal, bit for bit, while learning still lowers the error; the same start without
    /// sharing drifts apart (so the check can fail), for prototypes and tree thresholds.
    #[test]
    fn shared_codebooks_move_together() {
        let (k, rows) = (8, 1500);
        let (xs, _, ep, sub, m) = problem(k, rows, 5);
        let mut rng = Rng::new(9);
        let w: Vec<f32> = (0..sub.d * m).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let target: Vec<f32> = (0..rows * m)
            .map(|i| {
                let (r, j) = (i / m, i % m);
                let v: f32 = (0..sub.d)
                    .map(|q| xs[q / sub.s][r * sub.s + q % sub.s] * w[q * m + j])
                    .sum();
                (v + ep.bias[j]).max(0.0)
            })
            .collect();
        let per = k * sub.s;
        let one: Vec<f32> = (0..per).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let thr: Vec<f32> = (0..k - 1).map(|i| i as f32 / k as f32 - 0.4).collect();
        let depth = k.trailing_zeros() as usize;
        let o = Options {
            epochs: 6,
            patience: 0,
            lr: 0.02,
            temperature: 1.0,
            batch: 128,
        };
        for tree in [false, true] {
            let start = match tree {
                false => Encoding::Argmin { protos: one.repeat(2) },
                true => Encoding::Tree {
                    dims: (0..depth).map(|l| l % sub.s).collect::<Vec<_>>().repeat(2),
                    thresholds: thr.repeat(2),
                },
            };
            let halves = |e: &Encoding| match e {
                Encoding::Argmin { protos } => (protos[..per].to_vec(), protos[per..].to_vec()),
                Encoding::Tree { thresholds, .. } => (thresholds[..k - 1].to_vec(), thresholds[k - 1..].to_vec()),
            };
            for shared in [Some(1), None] {
                let p = Problem {
                    xs: &xs,
                    rows,
                    sub,
                    k,
                    m,
                    target: &target,
                    epilogue: &ep,
                    act_scale: None,
                    shared,
                    held_out: 0,
                };
                let (mut enc, mut t) = (start.clone(), vec![0f32; sub.count() * k * m]);
                let out = learn(&p, &mut enc, &mut t, &o, 7);
                assert!(
                    out.best_epoch > 0 && out.after < out.before,
                    "tree {tree}, {shared:?}: {out:?}"
                );
                let (a, b) = halves(&enc);
                assert_ne!(a, halves(&start).0, "tree {tree}, {shared:?}: the encoder moved");
                match shared {
                    Some(_) => assert_eq!(a, b, "tree {tree}: shared codebooks stay equal"),
                    None => assert_ne!(a, b, "tree {tree}: codebooks apart drift apart"),
                }
            }
        }
    }
}
