//! Fitting one layer's lookups, for the `lut` pass (which decides what each layer gets, in a
//! [`Plan`], and rewrites the graph): its calibration rows ([`gather`]), codebooks (k-means++
//! or MADDNESS hash trees, in the output's metric where asked: [`metric`]), tables
//! `prototype · W` refit by ridge least squares against the exact outputs, gradient learning
//! ([`learn`]), int8 quantization, and the error measured on the calibration rows.

use crate::calib::epilogue::{self, Step};
use crate::calib::learn::{self, Encoding, RowEpilogue, RowStep};
use crate::calib::{self, Layout, Resume, Sample};
use crate::error::Result;
use crate::interp::kernels::encode::{encode_argmin, encode_tree, squared_norms};
use crate::ir::op::{Encoder, Op, Window};
use crate::ir::{Graph, Outlet, Tensor};
use crate::passes::lut::{EncoderChoice, LayerReport, LearnMode, LearnReport, Metric, Options, TableType};
use crate::passes::PassCx;
use crate::pq::{self, kmeans, metric, quant, refit, rng::Rng, tree, Subspaces};
use ndarray::{ArrayD, IxDyn};
use petgraph::stable_graph::NodeIndex;
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

/// One layer's calibration data.
pub struct Data {
    /// Input rows `rows × d` and the exact layer output `rows × m` (bias excluded).
    pub x: Vec<f32>,
    pub d: usize,
    pub y: Vec<f32>,
    pub rows: usize,
    /// For `learn: block`: the exact activation at the end of the block (`rows × m`) and the
    /// row-wise ops that lead there.
    pub block: Option<(Vec<f32>, RowEpilogue)>,
    /// The images the rows come from, and how many of them the run of the approximated graph
    /// resumed from the previous layer's kept activations.
    pub images: usize,
    pub resumed: usize,
    /// Per row, the image it comes from (its rank among the images by index).
    pub row_images: Vec<u32>,
}

impl Data {
    /// The rows of one image in eight (drawn by `seed`; with fewer than 8 images, one row in
    /// eight) moved after the others, in order otherwise, and how many they are. The layer is
    /// fitted on the others and its learning judged on them: rows of images the codebooks and
    /// the tables' refit never saw (neighbouring pixels of one image are alike, so rows drawn
    /// one by one would measure the fit on near-copies of its own rows). None held out (0)
    /// below 16 rows.
    fn hold_out(mut self, seed: u64) -> (Data, usize) {
        let rows = self.rows;
        if rows < 16 {
            return (self, 0);
        }
        let mut rng = Rng::derive(seed, &[0x401d]);
        let n_img = self.row_images.iter().max().map_or(0, |&i| i as usize + 1);
        let held: Vec<bool> = if n_img >= 8 {
            let mut img = vec![false; n_img];
            for i in rng.sample_indices(n_img, n_img / 8) {
                img[i] = true;
            }
            self.row_images.iter().map(|&i| img[i as usize]).collect()
        } else {
            let mut row = vec![false; rows];
            for r in rng.sample_indices(rows, rows / 8) {
                row[r] = true;
            }
            row
        };
        let order: Vec<usize> = (0..rows)
            .filter(|&r| !held[r])
            .chain((0..rows).filter(|&r| held[r]))
            .collect();
        let n_held = held.iter().filter(|&&h| h).count();
        let permute = |v: &mut Vec<f32>| {
            let w = v.len() / rows;
            *v = order
                .iter()
                .flat_map(|&r| v[r * w..(r + 1) * w].iter().copied())
                .collect();
        };
        permute(&mut self.x);
        permute(&mut self.y);
        if let Some((target, epi)) = &mut self.block {
            permute(target);
            for step in &mut epi.steps {
                if let RowStep::Add(v) = step {
                    permute(v);
                }
            }
        }
        self.row_images = order.iter().map(|&r| self.row_images[r]).collect();
        (self, n_held)
    }
}

/// What the `lut` pass decided for one layer: the weight its lookups replace and how its rows
/// split into codebooks.
pub struct Plan<'a> {
    /// The MatMul, and the rows it reads.
    pub node: NodeIndex,
    pub input: Outlet,
    /// The MatMul's name (notes, report).
    pub name: &'a str,
    /// `conv`, `fc` or `token` (report).
    pub kind: &'static str,
    /// The weight `d × m`, row-major.
    pub w: &'a [f32],
    pub m: usize,
    /// A conv's kernel `[kh, kw]` (the int8 encoder's kernel serves some window codebooks).
    pub window: Option<[usize; 2]>,
    /// Pixel codebooks ([`Options::pixel_subspace`]): `(taps, channels per codebook)`.
    pub pixel: Option<(usize, usize)>,
    /// Values per codebook otherwise (before clamping to the row length).
    pub subspace: usize,
    /// The layer's rows are the model's input, only moved, padded or scaled (the stem): its
    /// codebooks fit on the input's error ([`Metric`]).
    pub stem: bool,
}

/// How a layer's rows are encoded, as [`split`] decides from its plan, options and rows.
struct Split<'x> {
    /// The rows the encoder reads: the layer's, or for pixel codebooks the `rows · taps`
    /// pixels they hold (`enc_rows` of them).
    x: Cow<'x, [f32]>,
    enc_rows: usize,
    /// The encoder's codebooks, and how many taps read each (pixel codebooks; else 1).
    sub: Subspaces,
    taps: usize,
    encoder: Encoder,
    /// The int8 argmin encoder's input scale (None: the f32 encoder).
    act_scale: Option<f32>,
    /// Per codebook, the metric of its output error where it fits in one (empty: none).
    metrics: Vec<Option<Vec<f32>>>,
}

impl Split<'_> {
    /// The lookups' codebooks.
    fn lookups(&self) -> usize {
        self.sub.count() * self.taps
    }

    /// The metrics of argmin codebooks fitted in one (some codebook has one): they are
    /// encoded and learned in its space. Empty otherwise.
    fn argmin_metrics(&self) -> &[Option<Vec<f32>>] {
        match self.encoder {
            Encoder::Argmin if self.metrics.iter().any(Option::is_some) => &self.metrics,
            _ => &[],
        }
    }

    /// The encoder's codes of the rows under `enc`, as the interpreter computes them.
    fn encode(&self, enc: &Encoding, k: usize) -> Vec<u8> {
        encode_rows(
            &self.x,
            self.enc_rows,
            self.sub,
            k,
            enc,
            self.argmin_metrics(),
            self.act_scale,
        )
    }
}

/// The encoder's rows, codebooks, encoder, int8 scale and metrics for layer `p`.
fn split<'x>(p: &Plan, data: &'x Data, o: &Options) -> Split<'x> {
    let (rows, d, m, k) = (data.rows, data.d, p.m, o.k);
    // pixel codebooks: encode the rows' `taps` pixels (rows · taps pixel rows of `d / taps`
    // channels) and look up `taps` times as many codebooks
    let (x, enc_rows, sub) = match p.pixel {
        Some((taps, g)) => (
            Cow::Owned(pixel_rows(&data.x, rows, d, taps)),
            rows * taps,
            Subspaces { d: d / taps, s: g },
        ),
        None => (
            Cow::Borrowed(&data.x[..]),
            rows,
            Subspaces {
                d,
                s: p.subspace.clamp(1, d),
            },
        ),
    };
    let s = sub.s;
    let encoder = match o.encoder {
        EncoderChoice::Argmin => Encoder::Argmin,
        EncoderChoice::Tree => Encoder::Tree,
        EncoderChoice::Auto if m >= 4 * k => Encoder::Argmin,
        EncoderChoice::Auto => Encoder::Tree,
    };
    let act_scale = match (encoder, p.window) {
        // the int8 pixel kernels (`encode_pixel`): 16 prototypes, codebooks of whole words
        _ if p.pixel.is_some() => match encoder {
            Encoder::Argmin if o.int8_encoder && k == 16 && s.is_multiple_of(4) && s <= 64 => int8_act_scale(&data.x),
            _ => None,
        },
        (Encoder::Argmin, Some([kh, kw])) if o.int8_encoder && k == 16 && kw <= 4 && s == kh * kw && s <= 64 => {
            int8_act_scale(&data.x)
        }
        _ => None,
    };
    // the metric of each codebook's output error, where the codebooks fit in it
    let metrics = match (encoder, p.pixel) {
        (_, Some(_)) => Vec::new(),
        _ if p.stem => Vec::new(),
        (Encoder::Tree, None) if o.tree_splits == Metric::Output => metric::output_metrics(p.w, m, sub),
        // (the global stage learns argmin codebooks only in the Euclidean form)
        (Encoder::Argmin, None) if o.argmin_metric == Metric::Output && o.global_epochs == 0 => {
            metric::output_metrics(p.w, m, sub)
        }
        _ => Vec::new(),
    };
    Split {
        x,
        enc_rows,
        sub,
        taps: p.pixel.map_or(1, |q| q.0),
        encoder,
        act_scale,
        metrics,
    }
}

/// Where a pass's calibration runs resume ([`calib::resume`]): in the graph approximated so
/// far and in the exact one.
#[derive(Default)]
pub struct Resumes {
    pub source: Resume,
    pub exact: Resume,
}

/// Collect layer `p`'s rows: its input from `source` (the graph approximated so far, or the
/// exact one), its exact output, and for `learn: block` the block's end and residuals. With
/// `more` (layers follow), both runs leave their values past the layer's input in `resumes`.
#[allow(clippy::too_many_arguments)]
pub fn gather(
    source: &Graph,
    exact: &Graph,
    p: &Plan,
    o: &Options,
    calib: &ArrayD<f32>,
    sample: &Sample,
    resumes: &mut Resumes,
    more: bool,
) -> Result<Data> {
    let m = p.m;
    let mm_out = Outlet::new(p.node, 0);
    let epi = match o.learn {
        LearnMode::Block => epilogue::find(source, mm_out, m)?,
        _ => None,
    };
    let mut want_exact = vec![(mm_out, Layout::Rows)];
    let mut want_src = vec![(p.input, Layout::Rows)];
    if let Some(e) = &epi {
        want_exact.push((
            e.end,
            Layout::Mapped {
                perm: e.end_perm.clone(),
                m,
            },
        ));
        for step in &e.steps {
            if let Step::Add { other, perm } = step {
                want_src.push((*other, Layout::Mapped { perm: perm.clone(), m }));
            }
        }
    }
    let advance = |g: &Graph| more.then(|| activation(g, p.node));
    let (ex, src) = if std::ptr::eq(source, exact) {
        // `progressive: false`: one run of the exact graph gives both
        let all: Vec<_> = want_exact.iter().chain(&want_src).cloned().collect();
        let mut ex = calib::collect(exact, calib, sample, &all, &mut resumes.exact, advance(exact))?;
        let src = ex.split_off(want_exact.len());
        (ex, src)
    } else {
        (
            calib::collect(exact, calib, sample, &want_exact, &mut resumes.exact, advance(exact))?,
            calib::collect(source, calib, sample, &want_src, &mut resumes.source, advance(source))?,
        )
    };
    let (mut ex, mut src) = (ex.into_iter(), src.into_iter());
    let (y, _) = ex.next().expect("requested");
    let (x, d) = src.next().expect("requested");
    let block = epi.map(|e| {
        let target = ex.next().expect("requested").0;
        let steps = e
            .steps
            .iter()
            .map(|s| match s {
                Step::Relu => RowStep::Relu,
                Step::Clip(lo, hi) => RowStep::Clip(*lo, *hi),
                Step::Add { .. } => RowStep::Add(src.next().expect("requested").0),
            })
            .collect();
        let bias = e.bias.unwrap_or_default();
        (target, RowEpilogue { bias, steps })
    });
    let resumed = if std::ptr::eq(source, exact) {
        resumes.exact.last_resumed
    } else {
        resumes.source.last_resumed
    };
    Ok(Data {
        x,
        d,
        y,
        rows: sample.rows.len(),
        block,
        images: sample.images.len(),
        resumed,
        row_images: sample
            .rows
            .iter()
            .map(|&r| (r / sample.rows_per_image) as u32)
            .collect(),
    })
}

/// The Im2Col producing a layer's `rows`, as its input and window, if one does (a conv).
pub fn im2col_of(graph: &Graph, rows: Outlet) -> Option<(Outlet, &Window)> {
    match &graph.node(rows.node).op {
        Op::Im2Col(win) => Some((graph.inputs_of(rows.node)[0], win)),
        _ => None,
    }
}

/// The activation MatMul `n`'s rows come from: its Im2Col's input for a conv, else its input.
fn activation(graph: &Graph, n: NodeIndex) -> Outlet {
    let rows = graph.inputs_of(n)[0];
    im2col_of(graph, rows).map_or(rows, |(input, _)| input)
}

/// A fitted (and maybe learned) layer, ready to replace the MatMul.
pub struct Fitted {
    pub encoder: Encoder,
    pub enc: Encoding,
    /// Argmin norms `[c][k]` ([`Codebooks::Argmin`](crate::interp::kernels::encode::Codebooks)),
    /// where the codebooks were fitted in a metric.
    pub norms: Option<Vec<f32>>,
    pub act_scale: Option<f32>,
    /// `[c][m][k]`
    pub tables: Tensor,
    pub scale: Vec<f32>,
    pub offset: Vec<f32>,
    pub report: LayerReport,
}

/// Fit codebooks and tables for one layer, learn them if asked, quantize, and measure.
pub fn fit_layer(p: &Plan, data: Data, o: &Options, cx: &mut PassCx, li: usize, start: Instant) -> Result<Fitted> {
    let (rows, m, k) = (data.rows, p.m, o.k);
    // codebooks and tables fitted on `fit_n` rows, learning judged on the rest
    let (data, held) = match o.holds_out() {
        true => data.hold_out(Rng::derive(cx.seed, &[li as u64, 5]).next_u64()),
        false => (data, 0),
    };
    let fit_n = rows - held;
    let t_collect = start.elapsed().as_secs_f64();
    let sp = split(p, &data, o);
    let (sub, c_n) = (sp.sub, sp.lookups());
    let xs: Vec<Vec<f32>> = (0..sub.count())
        .map(|c| pq::gather_subspace(&sp.x, sp.enc_rows, sub, c))
        .collect();
    // argmin codebooks in a metric fit and learn on their rows mapped into it
    let mapped: Option<Vec<Vec<f32>>> = (!sp.argmin_metrics().is_empty()).then(|| {
        xs.par_iter()
            .zip(sp.argmin_metrics())
            .map(|(x, l)| l.as_ref().map_or_else(|| x.clone(), |l| metric::map_rows(x, sub.s, l)))
            .collect()
    });
    let fit_rows = mapped.as_ref().unwrap_or(&xs);
    // 1. codebooks
    let fit_n_enc = fit_n * sp.taps;
    let fit_prefix: Vec<&[f32]> = fit_rows.iter().map(|x| &x[..fit_n_enc * sub.s]).collect();
    let (mut enc, protos, few) = fit_codebooks(&fit_prefix, sub, k, sp.encoder, &sp.metrics, o, cx.seed, li);
    if !few.is_empty() {
        cx.notes.push(format!(
            "lut: {}: {} codebook(s) had fewer distinct calibration rows than k={k} (codebook:distinct {})",
            p.name,
            few.len(),
            few.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    let t_learn = start.elapsed().as_secs_f64();
    // 2. tables `[c][k][m]`: prototype · W, then ridge refit against the exact outputs
    let (mut t_ckm, ridge) = start_tables(p, &sp, &enc, &protos, &data, fit_n, o);
    let t_refit = start.elapsed().as_secs_f64();
    // 3. gradient learning against the layer's output or its block's end
    let learn = (o.learn != LearnMode::None).then(|| {
        let seed = Rng::derive(cx.seed, &[li as u64, 3]).next_u64();
        learn_layer(&sp, fit_rows, &data, held, o, m, &mut enc, &mut t_ckm, seed)
    });
    // 4. quantize, and measure the layer output on its calibration rows
    let t_cmk = transpose_blocks(&t_ckm, c_n, k, m);
    let (tables, scale, offset, qerr) = match o.tables {
        TableType::I8 => {
            let q = quant::quantize(&t_cmk, c_n, m, k);
            let tq = Tensor::I8(ArrayD::from_shape_vec(IxDyn(&[c_n, m, k]), q.q).expect("size"));
            (tq, q.scale, q.offset, q.rel_error)
        }
        TableType::F32 => (Tensor::f32(&[c_n, m, k], t_cmk)?, vec![1.0; m], vec![0.0; m], 0.0),
    };
    let codes = sp.encode(&enc, k);
    let args = [
        Tensor::U8(ArrayD::from_shape_vec(IxDyn(&[rows, c_n]), codes).expect("size")),
        tables.clone(),
        Tensor::f32(&[m], scale.clone())?,
        Tensor::f32(&[m], offset.clone())?,
    ];
    let approx =
        crate::interp::eval::eval_op(&Op::LutMatMul { relu: false }, args.into_iter().map(Arc::new).collect())?
            .remove(0)
            .into_f32()?;
    let (rel, cos) = compare(approx.as_slice().expect("standard layout"), &data.y);
    let report = LayerReport {
        node: p.name.to_string(),
        kind: p.kind,
        d: data.d,
        m,
        codebooks: c_n,
        subspace: sub.s,
        pixel: p.pixel.is_some(),
        k,
        encoder: sp.encoder,
        act_scale: sp.act_scale,
        rows,
        rows_held_out: held,
        ridge,
        output_rel_error: rel,
        output_cosine: cos,
        table_quant_rel_error: qerr,
        seconds: 0.0,
        seconds_collect: t_collect,
        seconds_learn: t_learn - t_collect,
        seconds_refit: t_refit - t_learn,
        images: data.images,
        images_resumed: data.resumed,
        learn,
    };
    // argmin codebooks in a metric: as the encoder reads the subvectors
    let (enc, norms) = match enc {
        Encoding::Argmin { protos } if !sp.argmin_metrics().is_empty() => {
            let (q, norms) = encoder_form(&protos, sub, k, sp.argmin_metrics());
            (Encoding::Argmin { protos: q }, Some(norms))
        }
        enc => (enc, None),
    };
    Ok(Fitted {
        encoder: sp.encoder,
        enc,
        norms,
        act_scale: sp.act_scale,
        tables,
        scale,
        offset,
        report,
    })
}

/// The tables `[c][k][m]` the layer starts from: each prototype (`protos`: the subvectors'
/// prototypes) times the weight rows it meets, refit by ridge least squares against the exact
/// outputs of the first `fit_n` rows when asked (on the codes of `enc`), at the ridge strength
/// (returned) that does best on the rows after them ([`Options::ridge_steps`]).
fn start_tables(
    p: &Plan,
    sp: &Split,
    enc: &Encoding,
    protos: &[f32],
    data: &Data,
    fit_n: usize,
    o: &Options,
) -> (Vec<f32>, f32) {
    let (d, m, k, s) = (data.d, p.m, o.k, sp.sub.s);
    let plain = match p.pixel {
        // every tap's codebooks are the pixel codebooks, over the weight rows in tap-major order
        Some((taps, _)) => pq::plain_tables(
            &protos.repeat(taps),
            Subspaces { d, s },
            k,
            &tap_major(p.w, d, taps, m),
            m,
        ),
        None => pq::plain_tables(protos, sp.sub, k, p.w, m),
    };
    let c_n = sp.lookups();
    let mut t_ckm = transpose_blocks(&plain, c_n, m, k);
    let mut ridge = o.ridge;
    if o.refit {
        let codes = sp.encode(enc, k);
        let fit = refit::Fit {
            codes: &codes[..fit_n * c_n],
            rows: fit_n,
            c: c_n,
            k,
            y: &data.y[..fit_n * m],
            m,
        };
        if o.ridge_strengths() > 1 && fit_n < data.rows {
            let lambdas: Vec<f32> = (0..o.ridge_strengths())
                .map(|i| o.ridge * 4f32.powi(i as i32))
                .collect();
            let held = refit::Held {
                codes: &codes[fit_n * c_n..],
                y: &data.y[fit_n * m..],
            };
            let (i, _) = refit::ridge_refit_select(&fit, &lambdas, o.refit_iters, held, &mut t_ckm);
            ridge = lambdas[i];
        } else {
            refit::ridge_refit(&fit, o.ridge, o.refit_iters, &mut t_ckm);
        }
    }
    (t_ckm, ridge)
}

/// Gradient learning of the layer's codebooks `enc` and tables `t_ckm` ([`learn`]) against its
/// output or its block's end, from the layer's rows (`fit_rows`: in their codebooks' metric's
/// space where they have one): trained on the rows the codebooks and tables were fitted on,
/// judged on the last `held` rows, held out of that fit ([`Data::hold_out`]).
#[allow(clippy::too_many_arguments)]
fn learn_layer(
    sp: &Split,
    fit_rows: &[Vec<f32>],
    data: &Data,
    held: usize,
    o: &Options,
    m: usize,
    enc: &mut Encoding,
    t_ckm: &mut [f32],
    seed: u64,
) -> LearnReport {
    let t0 = Instant::now();
    let (rows, d, k, s) = (data.rows, data.d, o.k, sp.sub.s);
    let empty = RowEpilogue::default();
    let (objective, target, epilogue) = match &data.block {
        Some((t, e)) => ("block", &t[..], e),
        None => ("layer", &data.y[..], &empty),
    };
    // pixel codebooks learn as every tap's codebooks over the rows' tap-major pixels, each
    // tap's copy of a pixel codebook moved together (`shared`)
    let (lsub, lxs, groups) = match sp.taps {
        1 => (sp.sub, Cow::Borrowed(fit_rows), None),
        taps => {
            let lsub = Subspaces { d, s };
            let lxs = (0..sp.lookups())
                .map(|c| pq::gather_subspace(&sp.x, rows, lsub, c))
                .collect();
            *enc = per_tap(enc, taps);
            (lsub, Cow::Owned(lxs), Some(sp.sub.count()))
        }
    };
    let problem = learn::Problem {
        xs: &lxs,
        rows,
        sub: lsub,
        k,
        m,
        target,
        epilogue,
        // in a metric's space learning takes the f32 codes, not the int8 encoder's (the
        // final codes and the measured error are the int8 encoder's)
        act_scale: sp.act_scale.filter(|_| sp.argmin_metrics().is_empty()),
        shared: groups,
        held_out: held,
    };
    let lo = learn::Options {
        epochs: o.epochs,
        patience: o.patience,
        lr: o.lr,
        temperature: o.temperature,
        batch: o.batch,
    };
    let out = learn::learn(&problem, enc, t_ckm, &lo, seed);
    if let Some(g) = groups {
        *enc = first_codebooks(enc, g, k, s);
    }
    LearnReport {
        objective,
        error_before: out.before,
        error_after: out.after,
        best_epoch: out.best_epoch,
        steps: out.steps,
        seconds: t0.elapsed().as_secs_f64(),
    }
}

/// Pixel codebooks' encoder as every tap's codebooks (`taps` copies, tap-major).
pub(crate) fn per_tap(enc: &Encoding, taps: usize) -> Encoding {
    match enc {
        Encoding::Argmin { protos } => Encoding::Argmin {
            protos: protos.repeat(taps),
        },
        Encoding::Tree { dims, thresholds } => Encoding::Tree {
            dims: dims.repeat(taps),
            thresholds: thresholds.repeat(taps),
        },
    }
}

/// The first `g` codebooks of `enc` (the inverse of [`per_tap`] once the copies are equal).
pub(crate) fn first_codebooks(enc: &Encoding, g: usize, k: usize, s: usize) -> Encoding {
    match enc {
        Encoding::Argmin { protos } => Encoding::Argmin {
            protos: protos[..g * k * s].to_vec(),
        },
        Encoding::Tree { dims, thresholds } => Encoding::Tree {
            dims: dims[..g * k.trailing_zeros() as usize].to_vec(),
            thresholds: thresholds[..g * (k - 1)].to_vec(),
        },
    }
}

/// Im2Col rows `rows × d` (row layout `(c, tap)`) as the `rows · taps` pixels they hold
/// (`(row, tap)` order, `d / taps` channels each): what pixel codebooks encode. Values or, for
/// the global stage, the window map's source indices.
pub(crate) fn pixel_rows<T: Copy + Default + Send + Sync>(x: &[T], rows: usize, d: usize, taps: usize) -> Vec<T> {
    let ch = d / taps;
    let mut out = vec![T::default(); rows * d];
    out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, r)| {
        for c in 0..ch {
            for t in 0..taps {
                o[t * ch + c] = r[c * taps + t];
            }
        }
    });
    out
}

/// The `d × m` weight's rows in tap-major order (`(tap, c)` from `(c, tap)`), as pixel
/// codebooks' lookups meet them.
fn tap_major(w: &[f32], d: usize, taps: usize, m: usize) -> Vec<f32> {
    let ch = d / taps;
    let mut out = vec![0f32; d * m];
    for c in 0..ch {
        for t in 0..taps {
            out[(t * ch + c) * m..(t * ch + c + 1) * m].copy_from_slice(&w[(c * taps + t) * m..(c * taps + t + 1) * m]);
        }
    }
    out
}

/// Codebooks fitted to each codebook's rows `xs` (k-means++ or a hash tree per codebook, in
/// parallel, each with its own RNG stream, in the codebook's metric where `metrics` gives one:
/// see [`metric`]; argmin codebooks get their rows already mapped into it), the subvectors'
/// prototypes (for argmin in a metric, its prototypes mapped back), and the codebooks that saw
/// fewer distinct rows than `k`.
#[allow(clippy::too_many_arguments)]
fn fit_codebooks(
    xs: &[&[f32]],
    sub: Subspaces,
    k: usize,
    encoder: Encoder,
    metrics: &[Option<Vec<f32>>],
    o: &Options,
    seed: u64,
    li: usize,
) -> (Encoding, Vec<f32>, Vec<String>) {
    let s = sub.s;
    let depth = k.trailing_zeros() as usize;
    // per codebook: prototypes, tree split dims and thresholds, distinct rows when fewer than k
    type Fit = (Vec<f32>, Vec<usize>, Vec<f32>, Option<usize>);
    let learned: Vec<Fit> = xs
        .par_iter()
        .enumerate()
        .map(|(c, data)| match encoder {
            Encoder::Argmin => {
                let mut rng = Rng::derive(seed, &[li as u64, 2, c as u64]);
                let km = kmeans::kmeans(data, s, k, o.kmeans_iters, &mut rng);
                (km.centroids, vec![], vec![], km.distinct)
            }
            Encoder::Tree => {
                let t = match metrics.get(c).and_then(Option::as_ref) {
                    Some(l) => tree::learn_in(data, s, depth, &metric::map_rows(data, s, l), s),
                    None => tree::learn(data, s, depth),
                };
                (t.prototypes, t.dims, t.thresholds, None)
            }
        })
        .collect();
    let few = learned
        .iter()
        .enumerate()
        .filter_map(|(c, l)| l.3.map(|d| format!("{c}:{d}")))
        .collect();
    // the subvectors' prototypes, for the plain tables (argmin in a metric: from its space)
    let plain: Vec<f32> = learned
        .iter()
        .enumerate()
        .flat_map(|(c, l)| match (encoder, metrics.get(c).and_then(Option::as_ref)) {
            (Encoder::Argmin, Some(m)) => metric::unmap_rows(&l.0, s, m),
            _ => l.0.clone(),
        })
        .collect();
    let protos: Vec<f32> = learned.iter().flat_map(|l| l.0.iter().copied()).collect();
    let enc = match encoder {
        Encoder::Argmin => Encoding::Argmin { protos: protos.clone() },
        Encoder::Tree => Encoding::Tree {
            dims: learned.iter().flat_map(|l| l.1.iter().copied()).collect(),
            thresholds: learned.iter().flat_map(|l| l.2.iter().copied()).collect(),
        },
    };
    (enc, plain, few)
}

/// Codes `rows × c` of the rows under `enc` (`act_scale`: the int8 argmin encoder's; argmin
/// prototypes in the spaces of `metrics` when it is not empty), as the interpreter's encoder
/// computes them.
#[allow(clippy::too_many_arguments)]
fn encode_rows(
    x: &[f32],
    rows: usize,
    sub: Subspaces,
    k: usize,
    enc: &Encoding,
    metrics: &[Option<Vec<f32>>],
    act_scale: Option<f32>,
) -> Vec<u8> {
    let mut codes = vec![0u8; rows * sub.count()];
    match enc {
        Encoding::Argmin { protos } if !metrics.is_empty() => {
            let (q, norms) = encoder_form(protos, sub, k, metrics);
            encode_argmin(x, rows, sub, k, &q, Some(&norms), act_scale, &mut codes)
        }
        Encoding::Argmin { protos } => encode_argmin(x, rows, sub, k, protos, None, act_scale, &mut codes),
        Encoding::Tree { dims, thresholds } => {
            encode_tree(x, rows, sub, k.trailing_zeros() as usize, dims, thresholds, &mut codes)
        }
    }
    codes
}

/// Argmin prototypes `protos` (`[c][k][s]`) in the spaces of `metrics` as the encoder reads
/// the subvectors: prototypes and norms ([`metric::encoder_form`]; a codebook without a metric:
/// its own prototypes and their squared norms).
fn encoder_form(protos: &[f32], sub: Subspaces, k: usize, metrics: &[Option<Vec<f32>>]) -> (Vec<f32>, Vec<f32>) {
    let s = sub.s;
    let (mut q, mut norms) = (Vec::with_capacity(protos.len()), Vec::with_capacity(protos.len() / s));
    for (c, cb) in protos.chunks(k * s).enumerate() {
        match metrics.get(c).and_then(Option::as_ref) {
            Some(l) => {
                let (qc, nc) = metric::encoder_form(cb, s, l);
                q.extend(qc);
                norms.extend(nc);
            }
            None => {
                q.extend_from_slice(cb);
                norms.extend(squared_norms(cb, s));
            }
        }
    }
    (q, norms)
}

/// The int8 encoder's input scale for calibration inputs `x`: their 99.99th percentile over
/// 127 (a few larger values saturate rather than coarsen every other), or None when some input
/// is negative or not finite (the encoder reads negatives as 0) or the scale would be 0 or
/// subnormal (inputs all 0 or tiny).
fn int8_act_scale(x: &[f32]) -> Option<f32> {
    if x.iter().any(|v| !(*v >= 0.0 && v.is_finite())) {
        return None;
    }
    // a deterministic sample of at most 1 Mi values
    let step = x.len().div_ceil(1 << 20).max(1);
    let mut v: Vec<f32> = x.iter().step_by(step).copied().filter(|&v| v > 0.0).collect();
    if v.is_empty() {
        return None;
    }
    let at = ((v.len() as f64 * 0.9999) as usize).min(v.len() - 1);
    let (_, q, _) = v.select_nth_unstable_by(at, f32::total_cmp);
    Some(*q / 127.0).filter(|&a| crate::interp::kernels::encode_i8::valid_act_scale(a))
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

#[cfg(test)]
mod tests {
    use super::{int8_act_scale, Data};
    use crate::calib::learn::{RowEpilogue, RowStep};

    /// `rows_of[i]` rows of image `i`, every value naming its row.
    fn tagged(rows_of: &[usize]) -> Data {
        let row_images: Vec<u32> = rows_of
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| vec![i as u32; n])
            .collect();
        let rows = row_images.len();
        let val = |w: usize, tag: f32| -> Vec<f32> { (0..rows * w).map(|i| (i / w) as f32 + tag).collect() };
        Data {
            x: val(3, 0.0),
            d: 3,
            y: val(2, 0.25),
            rows,
            block: Some((
                val(2, 0.5),
                RowEpilogue {
                    bias: vec![1.0, 2.0],
                    steps: vec![RowStep::Relu, RowStep::Add(val(2, 0.75))],
                },
            )),
            images: rows_of.len(),
            resumed: 0,
            row_images,
        }
    }

    /// Held-out rows are whole images (about one in eight), moved after the others; every
    /// row-wise array moves with them, the others keep their order; the same seed draws the same.
    #[test]
    fn held_out_rows_are_whole_images_moved_last_with_every_array() {
        let rows_of: Vec<usize> = (0..40).map(|i| 3 + i % 7).collect();
        let (d, held) = tagged(&rows_of).hold_out(9);
        let n_img_held = d.row_images[d.rows - held..]
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        assert_eq!(n_img_held, 5, "40 images: 5 held out");
        // the row each position now holds, read from x; the others agree
        let src: Vec<usize> = (0..d.rows).map(|r| d.x[r * 3] as usize).collect();
        for (r, &s) in src.iter().enumerate() {
            assert_eq!(d.x[r * 3 + 2], s as f32);
            assert_eq!(d.y[r * 2 + 1], s as f32 + 0.25);
            let (t, e) = d.block.as_ref().unwrap();
            assert_eq!(t[r * 2], s as f32 + 0.5);
            let RowStep::Add(v) = &e.steps[1] else { panic!("step") };
            assert_eq!(v[r * 2 + 1], s as f32 + 0.75);
        }
        let original = tagged(&rows_of).row_images;
        assert!(src.iter().enumerate().all(|(r, &s)| d.row_images[r] == original[s]));
        // no image on both sides; each side in the original order
        let (fit, hold) = src.split_at(d.rows - held);
        let held_imgs: Vec<u32> = hold.iter().map(|&s| original[s]).collect();
        assert!(fit.iter().all(|&s| !held_imgs.contains(&original[s])));
        assert!(fit.windows(2).all(|w| w[0] < w[1]) && hold.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(src.len(), original.len());
        let (again, held_again) = tagged(&rows_of).hold_out(9);
        assert_eq!((again.x, held_again), (d.x.clone(), held));
        assert_ne!(tagged(&rows_of).hold_out(10).0.x, d.x, "another seed, other images");
        // fewer than 8 images: rows one by one; fewer than 16 rows: none
        let (few, h) = tagged(&[10, 10, 10]).hold_out(1);
        assert_eq!((h, few.rows), (3, 30));
        assert_eq!(tagged(&[5, 5, 5]).hold_out(1).1, 0);
    }

    /// The int8 encoder's scale: the 99.99th percentile over 127; none for negative or
    /// non-finite inputs, or where the scale would not be a normal float (tiny inputs).
    #[test]
    fn int8_scales() {
        let x: Vec<f32> = (0..100_000).map(|i| (i % 1000) as f32 / 1000.0).collect();
        let a = int8_act_scale(&x).unwrap();
        assert!((a * 127.0 - 0.999).abs() < 1e-6, "{a}");
        assert_eq!(int8_act_scale(&[0.5, -0.1, 0.2]), None);
        assert_eq!(int8_act_scale(&[0.5, f32::NAN]), None);
        assert_eq!(int8_act_scale(&[0.0; 8]), None);
        assert_eq!(int8_act_scale(&[1e-44; 8]), None);
        assert_eq!(int8_act_scale(&[1e-38; 8]), None);
    }
}
