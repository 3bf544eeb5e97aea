//! `mask`: priority masking. The `lut` pass approximated every eligible layer; this pass puts
//! exact layers back where accuracy needs them, under a target:
//! - `min_logit_cosine`: mean per-image cosine similarity between the model's logits and the
//!   exact model's, on calibration images (unlabelled);
//! - `max_expected_drop`: top-1 points expected lost, unlabelled ([`expected_drop`]);
//! - `max_accuracy_drop`: top-1 points lost on a labelled validation set (`--val`, `--val-labels`),
//!   compared in whole images so a drop of exactly the budget is accepted ([`within_drop`]);
//! - `target_reduction`: the fraction of arithmetic (encoding counted) that must be removed;
//!   as many layers as that allows are restored, most harmful first.
//!
//! Each LUT layer's damage is measured alone (only it approximated, everything else exact) as
//! `1 − logit cosine`, together with its layer-output cosine and the operations it saves. Layers
//! are restored greedily by damage per operation saved, re-measuring the whole model after each
//! restore (interactions show up there), until the target holds. A restore can make the model
//! worse, so the point kept is the first that meets the target or, when none does, the best seen
//! on the target's metric ([`best_point`]); later restores are undone. With `prune`, when that
//! point meets the target, each layer the path restored is tried back as lookups (most
//! operations saved first) and left so when the target still holds. With `relearn` the lookup
//! tables of the layers that stay approximated are then learned again with progressive
//! calibration through the chosen mix of exact and approximated layers; the relearned model is
//! kept (and reported as `final_point`) unless it is worse on the target's metric; with `prune`,
//! the layers the walk restored that are still exact are then tried back once more, as their
//! first lookups, into the relearned model (relearning refits the layers after a restored one on
//! its exact output, which often leaves room under the target). Then, when
//! asked, refine steps fit single layers again through the model as it stands and keep each
//! change that leaves the target met: `refine_encoder` (argmin lookups → hash-tree lookups),
//! then `refine_subspace` (exact layers → lookups over smaller codebooks).
//! `keep_exact` / `force_lut` (node names, `*` wildcards) override the choice.
//! With `max_accuracy_drop`, `confirm` (0.5 by default) holds a fraction of the validation
//! images out of all of that: every step chooses on the others, and a step is taken when it
//! looks good there, so the kept model's drop on them is biased low. The kept model is measured
//! once on the held-out images and, while its drop there exceeds the budget, its LUT layers are
//! restored — first those prune put back, latest first, then most damage per operation saved
//! first — each measured there ([`Confirmation`]).
//! `max_accuracy_drop`, `target_reduction` or `max_expected_drop`, when given, take precedence
//! over `min_logit_cosine` (the default pipeline's target).
//!
//! The calibration images measured on are [`PassCx::holdout`] when the compile set some aside
//! (it does when the pipeline learns tables before masking), so the tables were not fitted to
//! them; otherwise the first `samples` of [`PassCx::calib`].

use super::analysis::LutLayers;
use super::lut::{ExactLayer, Lut};
use super::{glob_match, Pass, PassCx};
use crate::error::{Error, Result};
use crate::interp::kernels::encode::TREE_IMAGE_LANES as IMAGE_LANES;
use crate::ir::op::{Binary, Encoder, Op, PqEncode};
use crate::ir::{cost, Graph, Outlet, Tensor};
use ndarray::{ArrayD, Axis};
use petgraph::stable_graph::NodeIndex;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// Target: mean logit cosine against the exact model on calibration images (default 0.99).
    pub min_logit_cosine: Option<f64>,
    /// Target: top-1 points the validation accuracy may fall below the exact model's (0..=100),
    /// compared in whole images: a drop of exactly this many points is accepted
    /// ([`within_drop`], relative tolerance [`DROP_TOLERANCE`]).
    pub max_accuracy_drop: Option<f64>,
    /// Target without labels: top-1 points the model is expected to lose on the measured
    /// calibration images, each image's label taken as distributed as the exact model predicts
    /// it ([`expected_drop`]). With `min_logit_cosine` also given, both must hold.
    pub max_expected_drop: Option<f64>,
    /// Target: fraction of arithmetic (encoding counted) that must stay removed (0..=1).
    pub target_reduction: Option<f64>,
    pub keep_exact: Vec<String>,
    pub force_lut: Vec<String>,
    /// Calibration images used to measure logit similarity.
    pub samples: usize,
    /// Relearn the remaining tables after the choice (progressive calibration through it).
    pub relearn: bool,
    /// With `relearn` and `prune`: when layers were put back into a relearned model, relearn
    /// the tables through the new mix and try the layers still exact back again, at most this
    /// many times, while the relearned model is no worse and layers come back (each time one
    /// more `lut` run and one more measure per layer still exact). 0 = relearn once.
    pub relearn_rounds: usize,
    /// Options for relearning and refining (default: those the `lut` pass ran with).
    pub lut: Option<super::lut::Options>,
    /// Restore layers whose lookups take longer than the exact layer (encoding counted, by
    /// `time_model`) before anything else: they lose accuracy and save nothing.
    pub restore_unprofitable: bool,
    /// Once the greedy path meets the target, put the layers it restored back as lookups one at
    /// a time, those saving the most operations first, keeping each that leaves the target met
    /// (the greedy order ranks layers by their damage alone; with later restores in, an early
    /// one can turn out unneeded). After a kept relearning, the layers still exact for their
    /// damage are tried back again, as their first lookups, into the relearned model (and
    /// again after each of `relearn_rounds`). One more measure per restored layer, each time.
    /// On by default.
    pub prune: bool,
    /// After the rest (0 = off): each layer left exact for its damage, most operations saved
    /// first, fitted again as lookups over codebooks of this many values (`lut`'s `subspace`
    /// and `fc_subspace`, e.g. 3: one codebook per kernel row of a 3×3 conv, three times the
    /// lookups of one per channel) through the model as it stands, and kept so when the target
    /// still holds (and, with `restore_unprofitable`, its lookups would not run slower than the
    /// exact layer). One `lut` fit and one measure per layer tried.
    pub refine_subspace: usize,
    /// After the rest, before `refine_subspace`: each layer left as argmin lookups, most
    /// encoding operations first, fitted again with the hash-tree encoder (a few comparisons per
    /// codebook and row instead of `K·S` multiply-adds) through the model as it stands, and kept
    /// so when the target still holds and `time_model` prices the new lookups no slower. One
    /// `lut` fit and one measure per layer tried.
    pub refine_encoder: bool,
    /// Cost of one encoding multiply-add, comparison, lookup-add and output value of the
    /// lookups relative to one exact multiply-add, used by `restore_unprofitable`.
    pub time_model: TimeModel,
    /// With `max_accuracy_drop`: the fraction of the validation images (`--val`, spread evenly:
    /// with 0.5 every second one, [`confirm_split`]) held out of every choice the pass makes and
    /// measured once at the end. Every step before chooses on the other images, so the kept
    /// model's drop there is biased low (each trial that happens to look good on them is
    /// kept); when the drop on the held-out images exceeds the budget, LUT layers are restored
    /// (first those prune put back, latest first; then most damage per operation saved first)
    /// until it holds on them ([`Confirmation`]).
    /// 0 = off (everything measured on all the validation images, as before 2026-12-02).
    pub confirm: f64,
}

/// Relative time of the operations of a LUT layer, one exact multiply-add = 1. The defaults
/// are the kernels' measured throughputs (docs/BENCHMARKS-avx512.md, one thread, batch 64, AVX-512
/// Zen 5): exact direct convolution ≈ 110 G multiply-adds/s, channel-lane argmin encoding
/// ≈ 40 G/s (its comparisons included; it fills 16 channels per vector, so a layer of `C`
/// channels pays for `⌈C/16⌉·16`), the int8 channel-lane encoder about twice that, argmin encoders that gather their rows (fully connected
/// layers, codebooks spanning channels) ≈ 8 G/s, hash-tree comparisons ≈ 2 G/s (one gather
/// per comparison) where rows are gathered (fully connected layers) and ≈ 8 G/s per filled lane
/// in the pixel-lane kernel of convolutions (planar copies of the input, one load per 16 pixels
/// of an output row, so a row of `ow < 16` pixels pays `16/ow` times as much: measured on AMD
/// Zen 4, where direct convolutions of 16–128 channels run at 55–78 G/s, per comparison and
/// filled lane 0.26–0.29 ns (16–18 of that machine's exact multiply-adds) for 3×3 codebooks and
/// 0.19–0.22 ns for 3-value ones, from 32- to 2-pixel-wide maps, the same per filled lane at
/// every width; 13–40 exact multiply-adds per comparison on NIN's layers, the low end for wide
/// windows, the high end for 1×1 convolutions; strided convolutions copy `stride_h · stride_w`
/// input pixels per output pixel into the planar layout and are priced that many times dearer,
/// measured 4.3–7.8 times on 3×3 stride-2 layers and 58 times on 1×1 stride-2 shortcuts with a
/// scalar scatter; since the copy deinterleaves stride 2 in registers and skips what no window
/// reads, 1.9–2.6 times on ResNet-18/16's 3×3 stride-2 layers and 4.8–39 times on its 1×1
/// stride-2 shortcuts of 8–2 codebooks, whose copy and per-pixel work outweigh their few
/// comparisons: still priced `stride_h · stride_w`), int8 lookup-adds
/// ≈ 250 G/s in the VNNI kernel plus ≈ 0.4 ns per output value (fitted on NIN's layers, from
/// 5 to 160 codebooks: a layer of few codebooks is dominated by its outputs; ≈ 115 G/s overall
/// in ResNet-18 w64 at batch 64; the AVX-512BW kernel without VNNI, ≈ 70 G/s, is not priced),
/// and ≈ 31 G/s at K = 256 (NIN's 5×5 layer: 160 codebooks, 48 outputs, 2 MB of tables; 3.3
/// exact multiply-adds per lookup once its outputs are priced). These are one machine's ratios:
/// on Zen 4, whose AVX-512 multiply-adds are half as wide, exact layers are relatively slower and
/// the int8 argmin encoder relatively faster (≈ 0.8 of that machine's exact multiply-adds per
/// multiply-add instead of 1.3), so a tree on 7-pixel-wide maps that this model prices 1.3×
/// faster than the int8 argmin encoder ran 1.26× slower there (ResNet-18 w64's layer1).
/// Counting operations alone (all weights 1) would keep layers as lookups that run slower than
/// the exact layer they replace (measured: a 1-channel stem as lookups ran 7×
/// slower than exact).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TimeModel {
    /// An argmin multiply-add in the channel-lane kernel (convolutions whose codebooks follow
    /// the input channels).
    pub encode_mac: f64,
    /// The same in the int8 channel-lane kernel (`encode_i8`).
    pub encode_mac_i8: f64,
    /// An argmin multiply-add of an encoder that gathers its rows.
    pub encode_mac_gather: f64,
    /// A hash-tree comparison of an encoder that gathers its rows.
    pub compare: f64,
    /// A hash-tree comparison in the pixel-lane kernel of convolutions, per filled lane at
    /// stride 1: output rows narrower than 16 pixels pay for the empty lanes too, strided
    /// convolutions `stride_h · stride_w` times as much (see [`TimeModel::time`]).
    pub compare_conv: f64,
    pub lookup: f64,
    /// A lookup-add with more than 16 prototypes per codebook (K = 256: 256-entry tables, the
    /// `vpermi2b` and row-wise kernels).
    pub lookup_k256: f64,
    /// An output value of the lookups (rows × outputs).
    pub output: f64,
    /// The images per run the lookups will see: from 16 images up, the tree kernel of
    /// convolutions fills its lanes with images, below it with the pixels of one output row, so
    /// rows narrower than 16 pixels leave lanes empty and are priced `16/ow` times as much.
    /// Large batches run in sub-batches sized by the graph's largest activation
    /// (`interp::split`; 16 images for the ResNets measured), and it is their size that counts.
    pub batch: usize,
}

impl Default for TimeModel {
    fn default() -> TimeModel {
        TimeModel {
            encode_mac: 2.75,
            encode_mac_i8: 1.3,
            encode_mac_gather: 14.0,
            compare: 55.0,
            compare_conv: 16.0,
            lookup: 0.45,
            lookup_k256: 3.3,
            output: 40.0,
            batch: 1,
        }
    }
}

/// Lanes of the pixel-lane tree kernel the time model prices (AVX-512: 16 pixels per vector).
const LANES: usize = 16;

/// The `restored` label of the refine steps' last point when it is the model relearned after
/// them ([`MaskReport::refined`]).
pub const RELEARNED_AFTER_REFINING: &str = "(relearned after refining)";

/// The `restored` label of a point of [`MaskReport::pruned_after_relearning`] that is the model
/// relearned after the layers before it were put back (`relearn_rounds`).
pub const RELEARNED_AGAIN: &str = "(relearned again)";

impl TimeModel {
    /// Estimated time of `c` in exact multiply-adds. An argmin encoder's comparisons are part of
    /// its per-multiply-add rate; `compare_conv` (convolutions) and `compare` (gathered rows)
    /// price the hash tree's; `lookup` (`lookup_k256` for more than 16 prototypes) prices a
    /// lookup-add and `output` each output value the lookups produce (packing, the sums'
    /// transpose, the epilogue: these dominate layers of few codebooks). `enc` is the layer's
    /// encoder, `d` its row length, `k` its prototypes per codebook and `ow` the width of a
    /// convolution's output rows when known: below `batch` 16 the tree kernel fills one 16-lane
    /// vector per 16 pixels of an output row, so rows narrower than 16 pay for the empty lanes.
    pub fn time(&self, c: &cost::Cost, enc: &PqEncode, d: usize, k: usize, ow: Option<usize>) -> f64 {
        let compares = if c.encode_macs > 0 {
            0.0
        } else {
            c.encode_compares as f64
        };
        let codebooks = d.div_ceil(enc.subspace.max(1)).max(1) as f64;
        c.exact_macs as f64
            + self.encode_mac_rate(enc, d) * c.encode_macs as f64
            + if let Some(w) = &enc.window {
                let ow = match self.batch >= IMAGE_LANES {
                    true => LANES, // image lanes: every lane filled
                    false => ow.unwrap_or(LANES).max(1),
                };
                let stride = (w.strides[0] * w.strides[1]).max(1) as f64;
                self.compare_conv * stride * (ow.div_ceil(LANES) * LANES) as f64 / ow as f64
            } else {
                self.compare
            } * compares
            + (if k > 16 { self.lookup_k256 } else { self.lookup } + self.output / codebooks) * c.lookups as f64
    }
}

impl TimeModel {
    /// The time of one argmin multiply-add of `enc`: the channel-lane kernel's (its 16-channel
    /// vectors padded) when `enc` will run it, else a gathering encoder's.
    fn encode_mac_rate(&self, enc: &PqEncode, d: usize) -> f64 {
        let Some(w) = &enc.window else {
            return self.encode_mac_gather;
        };
        let [kh, kw] = w.kernel;
        let s = enc.subspace;
        if enc.encoder != Encoder::Argmin || !(s == kh * kw || (s == kw && kh > 1)) {
            return self.encode_mac_gather;
        }
        // a row is one pixel window: `C·kh·kw` values
        let channels = (d / (kh * kw).max(1)).max(1);
        let rate = match enc.act_scale {
            Some(_) if s == kh * kw && kw <= 4 && kh <= 16 => self.encode_mac_i8,
            _ => self.encode_mac,
        };
        rate * (channels.div_ceil(16) * 16) as f64 / channels as f64
    }
}

impl Default for Options {
    fn default() -> Options {
        Options {
            min_logit_cosine: None,
            max_accuracy_drop: None,
            max_expected_drop: None,
            target_reduction: None,
            keep_exact: Vec::new(),
            force_lut: Vec::new(),
            samples: 256,
            relearn: true,
            relearn_rounds: 2,
            lut: None,
            restore_unprofitable: true,
            prune: true,
            refine_subspace: 0,
            refine_encoder: false,
            time_model: TimeModel::default(),
            confirm: 0.5,
        }
    }
}

/// One point of the greedy path: after restoring `restored` layers.
#[derive(Clone, Debug, Serialize)]
pub struct PathPoint {
    pub restored: Option<String>,
    pub reduction_everything_counted: f64,
    pub reduction_lookups_only: f64,
    pub logit_cosine: f64,
    /// Top-1 points expected lost on the measured images, without labels ([`expected_drop`]).
    pub expected_drop: f64,
    /// Top-1 accuracy on the validation set (`correct` / its size), when there is one.
    pub accuracy: Option<f64>,
    /// Validation images classified correctly, when there is a validation set.
    pub correct: Option<usize>,
    /// One standard error of the accuracy drop against the exact model on the validation set,
    /// in points ([`drop_standard_error`]): how far the drop measured on these images may lie
    /// from the drop on new ones.
    pub drop_se: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerDecision {
    pub layer: String,
    /// `conv` or `fc`, and the layer's `D × M` (row length × outputs).
    pub kind: String,
    pub shape: [usize; 2],
    /// Cosine of the layer's own output with the exact one (from the `lut` pass).
    pub layer_cosine: f64,
    pub exact_macs: u64,
    pub lut_cost: cost::Cost,
    pub ops_saved: i64,
    /// Estimated time of the exact layer over that of its lookups (`time_model`): > 1 means
    /// the lookups are faster.
    pub est_speedup: f64,
    /// Logit cosine with only this layer approximated.
    pub logit_cosine_alone: f64,
    pub damage_per_mop_saved: f64,
    pub chosen: &'static str,
    pub why: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MaskReport {
    pub metric: String,
    pub target: String,
    /// The images the target is measured on, e.g. "256 held-out calibration images", or for an
    /// accuracy target "2000 validation images (logits on 256 held-out calibration images)".
    pub measured_on: String,
    pub exact_accuracy: Option<f64>,
    pub layers: Vec<LayerDecision>,
    pub path: Vec<PathPoint>,
    /// Index into `path` of the chosen point (before relearning): the first point that meets
    /// the target, or when none does the best one on the target's metric ([`best_point`]).
    pub chosen_point: usize,
    /// With `prune`: a point per layer put back as lookups (each meeting the target), in order;
    /// the last is the model relearning starts from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<PathPoint>,
    /// The model after relearning its tables, when it was kept (it replaced the chosen point).
    /// `None` without relearning or when relearning did not help (the chosen point was kept).
    pub final_point: Option<PathPoint>,
    /// With `prune`, after a relearned model was kept: a point per layer the walk restored that
    /// was then put back as lookups (each meeting the target), in order, and with
    /// `relearn_rounds` a point labelled [`RELEARNED_AGAIN`] per relearning kept between them;
    /// the last is the model the refine steps start from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pruned_after_relearning: Vec<PathPoint>,
    /// With `refine_encoder` / `refine_subspace`: a point per layer refitted (argmin lookups made
    /// tree lookups, exact layers made lookups over smaller codebooks), each meeting the target,
    /// in order, then (with `relearn`, when it is kept: no worse, target met) one for the model
    /// relearned through the final mix, `restored` "(relearned after refining)"; the last is
    /// the model kept (unless `confirmation` restored layers after it: [`MaskReport::kept`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refined: Vec<PathPoint>,
    /// With `confirm`: the model the steps above chose, measured on the held-out validation
    /// images, and what that changed.
    pub confirmation: Option<Confirmation>,
    /// The point of the model written, [`MaskReport::kept`], for readers of the JSON report.
    pub kept_point: Option<PathPoint>,
}

/// The held-out check of an accuracy target (`confirm`). Every point above has its accuracy
/// measured on the other validation images (their count in `measured_on`); these points on the
/// held-out ones (their logit measures, as every point's, on the calibration images).
#[derive(Clone, Debug, Serialize)]
pub struct Confirmation {
    /// Held-out validation images.
    pub images: usize,
    /// The exact model's accuracy on them.
    pub exact_accuracy: f64,
    /// The model the steps above kept, then one point per layer restored because the drop on
    /// these images exceeded the budget (`restored` names it); the last is the model kept.
    pub points: Vec<PathPoint>,
    /// When layers were restored: the model kept, measured on the validation images the rest
    /// chose on (what [`MaskReport::kept`] returns then).
    pub chosen_on: Option<PathPoint>,
}

impl MaskReport {
    /// The point of the model kept, on the validation images the pass chose on: after a
    /// confirmation that restored layers, that model; else the last refine step (a layer
    /// refined, or the model relearned after them), else the last layer put back as lookups
    /// after relearning, else the relearned model when reported, else the last layer prune put
    /// back as lookups, else the walk's choice.
    pub fn kept(&self) -> &PathPoint {
        self.confirmation
            .as_ref()
            .and_then(|c| c.chosen_on.as_ref())
            .or(self.refined.last())
            .or(self.pruned_after_relearning.last())
            .or(self.final_point.as_ref())
            .or(self.pruned.last())
            .unwrap_or(&self.path[self.chosen_point])
    }
}

/// The target the options ask for, by precedence: `max_accuracy_drop`, `target_reduction`,
/// `max_expected_drop` (with `min_logit_cosine` when given), else `min_logit_cosine` (0.99 when
/// absent).
#[derive(Clone, Copy, Debug)]
enum Goal {
    Accuracy(f64),
    Reduction(f64),
    ExpectedDrop(f64, Option<f64>),
    Cosine(f64),
}

impl Goal {
    fn of(o: &Options) -> Goal {
        match (o.max_accuracy_drop, o.target_reduction, o.max_expected_drop) {
            (Some(d), ..) => Goal::Accuracy(d),
            (_, Some(t), _) => Goal::Reduction(t),
            (_, _, Some(e)) => Goal::ExpectedDrop(e, o.min_logit_cosine),
            _ => Goal::Cosine(o.min_logit_cosine.unwrap_or(0.99)),
        }
    }

    /// The metric the target is on, higher is better: images right, expected drop (negated)
    /// or logit similarity.
    fn quality(self, p: &PathPoint) -> f64 {
        match self {
            Goal::Accuracy(_) => p.correct.map_or(p.logit_cosine, |c| c as f64),
            Goal::ExpectedDrop(..) => -p.expected_drop,
            Goal::Reduction(_) | Goal::Cosine(_) => p.logit_cosine,
        }
    }

    fn metric(self) -> &'static str {
        match self {
            Goal::Accuracy(_) => "accuracy",
            Goal::ExpectedDrop(..) => "expected_drop",
            Goal::Reduction(_) | Goal::Cosine(_) => "logit_cosine",
        }
    }

    fn target(self) -> String {
        match self {
            Goal::Accuracy(d) => format!("max_accuracy_drop {d} points"),
            Goal::Reduction(t) => format!("target_reduction {t}"),
            Goal::ExpectedDrop(e, Some(c)) => format!("max_expected_drop {e} points and min_logit_cosine {c}"),
            Goal::ExpectedDrop(e, None) => format!("max_expected_drop {e} points"),
            Goal::Cosine(c) => format!("min_logit_cosine {c}"),
        }
    }

    /// `p` against `q` on this metric, for a note: its name and the two values.
    fn compare(self, p: &PathPoint, q: &PathPoint) -> (&'static str, String) {
        match (self, p.accuracy, q.accuracy) {
            (Goal::Accuracy(_), Some(a), Some(b)) => ("accuracy", format!("{:.2}% vs {:.2}%", a * 100.0, b * 100.0)),
            (Goal::ExpectedDrop(..), ..) => (
                "expected drop",
                format!("{:.2} vs {:.2} points", p.expected_drop, q.expected_drop),
            ),
            _ => (
                "logit cosine",
                format!("{:.5} vs {:.5}", p.logit_cosine, q.logit_cosine),
            ),
        }
    }
}

pub struct Mask(pub Options);

/// Put one LUT layer back as `Im2Col → MatMul → Add` (the exact form before `lut`).
pub fn restore(graph: &mut Graph, lut_name: &str, ex: &ExactLayer) -> Result<()> {
    let lut = graph
        .find(lut_name)
        .ok_or_else(|| Error::Other(format!("no LUT node {lut_name}")))?;
    let enc = graph.inputs_of(lut)[0].node;
    let Op::PqEncode(p) = graph.node(enc).op.clone() else {
        return Err(Error::node(
            lut_name,
            "LutMatMul",
            "its codes do not come from a PQEncode",
        ));
    };
    let mut x = graph.inputs_of(enc)[0];
    if let (Some(w), Some(name)) = (&p.window, &ex.im2col) {
        x = graph.add_op(name, Op::Im2Col(w.clone()), &[x]);
    }
    let wc = graph.add_const(&ex.weight_name, (*ex.weight).clone());
    let mut y = graph.add_op(&ex.matmul, Op::MatMul, &[x, wc]);
    if let Some((add, bias_name, b)) = &ex.bias {
        let bc = graph.add_const(bias_name, (**b).clone());
        y = graph.add_op(add, Op::Binary(Binary::Add), &[y, bc]);
    }
    graph.replace_uses(Outlet::new(lut, 0), y);
    graph.remove_dead();
    Ok(())
}

/// Put one exact layer of `graph` (`[Im2Col →] MatMul [→ Add]`, as [`restore`] leaves it) back
/// as the lookups `from` holds for it under the name `lut_name`: its `PQEncode` and `LutMatMul`
/// and their constants copied, reading what the exact layer read (the inverse of [`restore`]).
pub fn put_back(graph: &mut Graph, from: &Graph, lut_name: &str, ex: &ExactLayer) -> Result<()> {
    let missing = |what: &str, name: &str| Error::Other(format!("{lut_name}: no {what} {name} to put back as lookups"));
    let lut = from.find(lut_name).ok_or_else(|| missing("LUT node", lut_name))?;
    let enc = from.inputs_of(lut)[0].node;
    let Op::PqEncode(p) = &from.node(enc).op else {
        return Err(Error::node(
            lut_name,
            "LutMatMul",
            "its codes do not come from a PQEncode",
        ));
    };
    let mm = graph.find(&ex.matmul).ok_or_else(|| missing("MatMul", &ex.matmul))?;
    let mut x = graph.inputs_of(mm)[0];
    if p.window.is_some() {
        // the encoder reads the image the Im2Col read
        if !matches!(graph.node(x.node).op, Op::Im2Col(_)) {
            return Err(Error::node(
                &ex.matmul,
                "MatMul",
                "its input is not the Im2Col its lookups absorbed",
            ));
        }
        x = graph.inputs_of(x.node)[0];
    }
    let out = match &ex.bias {
        Some((add, ..)) => Outlet::new(graph.find(add).ok_or_else(|| missing("Add", add))?, 0),
        None => Outlet::new(mm, 0),
    };
    let copy_consts = |graph: &mut Graph, n: NodeIndex| -> Result<Vec<Outlet>> {
        from.inputs_of(n)[1..]
            .iter()
            .map(|o| match from.const_value(*o) {
                Some(t) => Ok(graph.add_const(&from.node(o.node).name, (**t).clone())),
                None => Err(Error::node(
                    &from.node(n).name,
                    from.node(n).op.name(),
                    "an input is not a constant",
                )),
            })
            .collect()
    };
    let mut enc_in = vec![x];
    enc_in.extend(copy_consts(graph, enc)?);
    let codes = graph.add_op(&from.node(enc).name, from.node(enc).op.clone(), &enc_in);
    let mut lut_in = vec![codes];
    lut_in.extend(copy_consts(graph, lut)?);
    let y = graph.add_op(lut_name, from.node(lut).op.clone(), &lut_in);
    graph.replace_uses(out, y);
    graph.remove_dead();
    Ok(())
}

/// The first output of `graph` for images `x` (run as [`crate::calib::plan`] leaves it).
fn logits(graph: &Graph, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    let plan = crate::calib::output_plan(graph)?;
    let mut parts = Vec::new();
    for chunk in x.axis_chunks_iter(Axis(0), 64) {
        parts.push(plan.run(vec![Tensor::F32(chunk.to_owned())])?.remove(0).into_f32()?);
    }
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    ndarray::concatenate(Axis(0), &views).map_err(|e| Error::Other(e.to_string()))
}

/// Mean over images of the cosine between their logit vectors.
fn mean_cosine(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    let n = a.shape()[0].max(1);
    let per = a.len() / n;
    let (a, b) = (a.as_standard_layout(), b.as_standard_layout());
    let (a, b) = (a.as_slice().unwrap(), b.as_slice().unwrap());
    (0..n)
        .map(|i| {
            let (x, y) = (&a[i * per..(i + 1) * per], &b[i * per..(i + 1) * per]);
            let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
            let nx: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
            let ny: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum::<f64>().sqrt();
            if nx == 0.0 && ny == 0.0 {
                1.0
            } else {
                dot / (nx * ny).max(1e-30)
            }
        })
        .sum::<f64>()
        / n as f64
}

/// The top-1 accuracy points `b` is expected to lose against `a` (the exact model's logits)
/// with no labels: each image's label is taken as distributed as the exact model predicts it
/// (its softmax, or its outputs as they are when they are already probabilities), so the exact
/// model is right with probability `p[argmax a]` and `b` with `p[argmax b]`. Unlike the logit
/// cosine this follows how ambiguous the images are: over the ResNet-18/16 fixture's 2000 test
/// images it read 0.56 points where 0.60 were lost on them.
fn expected_drop(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    let n = a.shape()[0].max(1);
    let per = a.len() / n;
    if per == 0 {
        return 0.0;
    }
    let (a, b) = (a.as_standard_layout(), b.as_standard_layout());
    let (a, b) = (a.as_slice().unwrap(), b.as_slice().unwrap());
    let probabilities = a
        .chunks(per)
        .all(|r| r.iter().all(|&v| (0.0..=1.0).contains(&v)) && (r.iter().sum::<f32>() - 1.0).abs() < 1e-3);
    let argmax = |r: &[f32]| (0..r.len()).fold(0, |m, j| if r[j] > r[m] { j } else { m });
    let mut lost = 0.0;
    for i in 0..n {
        let (x, y) = (&a[i * per..(i + 1) * per], &b[i * per..(i + 1) * per]);
        let (ia, ib) = (argmax(x), argmax(y));
        if ia == ib {
            continue;
        }
        let p = |j: usize| -> f64 {
            if probabilities {
                return x[j] as f64;
            }
            let top = x[ia] as f64;
            let z: f64 = x.iter().map(|&v| (v as f64 - top).exp()).sum();
            (x[j] as f64 - top).exp() / z
        };
        lost += p(ia) - p(ib);
    }
    100.0 * lost / n as f64
}

/// Per validation image, whether `graph` classifies it correctly.
fn right(graph: &Graph, x: &ArrayD<f32>, labels: &[i64]) -> Result<Vec<bool>> {
    let out = logits(graph, x)?;
    let pred = crate::model::argmax_rows(&out);
    Ok(pred.iter().zip(labels).map(|(p, l)| p == l).collect())
}

/// Images classified correctly, of per-image results from [`right`].
fn count_right(right: &[bool]) -> usize {
    right.iter().filter(|&&r| r).count()
}

/// One standard error, in points, of the accuracy drop from `exact` to `approx` (per image,
/// right or not) as an estimate of the drop on new images of the same kind: the paired
/// difference's, which only the images the two models disagree on carry — `b` right only
/// exactly, `c` right only approximately, `sqrt((b + c)/n − ((b − c)/n)²) / sqrt(n)`.
pub fn drop_standard_error(exact: &[bool], approx: &[bool]) -> f64 {
    let n = exact.len().min(approx.len());
    if n == 0 {
        return 0.0;
    }
    let (mut b, mut c) = (0usize, 0usize);
    for (&e, &a) in exact.iter().zip(approx) {
        match (e, a) {
            (true, false) => b += 1,
            (false, true) => c += 1,
            _ => {}
        }
    }
    let nf = n as f64;
    let mean = (b as f64 - c as f64) / nf;
    let var = ((b + c) as f64 / nf - mean * mean).max(0.0);
    100.0 * (var / nf).sqrt()
}

/// Relative slack of [`within_drop`]: far above the rounding of `drop / 100 · n`, far below
/// one sample in any validation set that fits in memory.
pub const DROP_TOLERANCE: f64 = 1e-9;

/// Whether `correct` of `n` validation images is within `drop` top-1 points of the exact
/// model's `exact_correct`. Compared in whole images: the budget is `drop / 100 · n` images
/// (with a relative slack of [`DROP_TOLERANCE`] for the rounding of that product), so a drop
/// of exactly the budget is accepted (0.5 points = 1 of 200 images: 91.0 → 90.5 % passes
/// `max_accuracy_drop: 0.5`).
pub fn within_drop(exact_correct: usize, correct: usize, n: usize, drop: f64) -> bool {
    let lost = exact_correct.saturating_sub(correct) as f64;
    lost <= drop / 100.0 * n as f64 * (1.0 + DROP_TOLERANCE)
}

/// The point to keep along a greedy path: the first (fewest restored layers) that `meets` the
/// target; when none does, the best by `quality` (the earliest of equals) — restoring a layer
/// can make the model worse, so the last point is not necessarily the best.
pub fn best_point<Q: PartialOrd>(
    path: &[PathPoint],
    meets: impl Fn(&PathPoint) -> bool,
    quality: impl Fn(&PathPoint) -> Q,
) -> usize {
    if let Some(i) = path.iter().position(&meets) {
        return i;
    }
    let mut best = 0;
    for (i, p) in path.iter().enumerate().skip(1) {
        if quality(p) > quality(&path[best]) {
            best = i;
        }
    }
    best
}

impl Pass for Mask {
    fn name(&self) -> &'static str {
        "mask"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).expect("options serialise")
    }
    fn run(&self, graph: &mut Graph, cx: &mut PassCx) -> Result<()> {
        // the lut pass's record, set aside while masking (relearning records the same layers
        // anew; the first run's record stays, its reports are the compile report's)
        let record = cx.analyses.lut.take();
        let none = LutLayers::new(Default::default());
        let done = self.mask(graph, cx, record.as_ref().unwrap_or(&none));
        cx.analyses.lut = record;
        done
    }
}

/// What every point of the masking path is measured against: the target, the source model's
/// arithmetic, the exact model's logits on the measured images, the validation images chosen on
/// and those held out to confirm the choice (`confirm`).
struct Meter {
    goal: Goal,
    source: cost::Cost,
    samples: ArrayD<f32>,
    ref_logits: ArrayD<f32>,
    val: Option<Labelled>,
    held_out: Option<Labelled>,
}

/// Labelled images and, per image, whether the exact model classifies it correctly.
struct Labelled {
    x: ArrayD<f32>,
    labels: Vec<i64>,
    exact_right: Vec<bool>,
}

impl Labelled {
    fn new(exact: &Graph, (x, labels): (ArrayD<f32>, Vec<i64>)) -> Result<Labelled> {
        let exact_right = right(exact, &x, &labels)?;
        Ok(Labelled { x, labels, exact_right })
    }

    fn n(&self) -> usize {
        self.labels.len()
    }

    /// Images the exact model classifies correctly.
    fn exact_correct(&self) -> usize {
        count_right(&self.exact_right)
    }

    /// `g`'s images right, accuracy and drop standard error against the exact model.
    fn score(&self, g: &Graph) -> Result<(usize, f64, f64)> {
        let r = right(g, &self.x, &self.labels)?;
        let correct = count_right(&r);
        Ok((
            correct,
            self.accuracy(correct),
            drop_standard_error(&self.exact_right, &r),
        ))
    }

    /// The accuracy of `correct` of these images right.
    fn accuracy(&self, correct: usize) -> f64 {
        correct as f64 / self.n().max(1) as f64
    }

    fn within(&self, p: &PathPoint, drop: f64) -> bool {
        within_drop(self.exact_correct(), p.correct.unwrap_or(0), self.n(), drop)
    }
}

/// Which validation images are held out to confirm an accuracy target (`true`), for `n` images
/// and a `fraction` of them: image `i` when `⌊(i + 1)·fraction⌋ > ⌊i·fraction⌋`, spread evenly
/// through the set (0.5: every second image, the first kept for choosing), so a set sorted by
/// class gives both parts every class.
pub fn confirm_split(n: usize, fraction: f64) -> Vec<bool> {
    (0..n)
        .map(|i| ((i + 1) as f64 * fraction).floor() > (i as f64 * fraction).floor())
        .collect()
}

impl Meter {
    fn new(
        goal: Goal,
        exact: &Graph,
        samples: ArrayD<f32>,
        val: Option<(ArrayD<f32>, Vec<i64>)>,
        confirm: f64,
    ) -> Result<Meter> {
        let (val, held_out) = match val {
            Some((x, labels)) if matches!(goal, Goal::Accuracy(_)) && confirm > 0.0 => {
                let out = confirm_split(labels.len(), confirm);
                let pick = |held: bool| -> (ArrayD<f32>, Vec<i64>) {
                    let rows: Vec<usize> = (0..labels.len()).filter(|&i| out[i] == held).collect();
                    (x.select(Axis(0), &rows), rows.iter().map(|&i| labels[i]).collect())
                };
                let (chosen, held) = (pick(false), pick(true));
                if chosen.1.is_empty() || held.1.is_empty() {
                    (Some((x, labels)), None)
                } else {
                    (Some(chosen), Some(held))
                }
            }
            v => (v, None),
        };
        Ok(Meter {
            goal,
            source: cost::Cost {
                exact_macs: cost::graph_cost(exact).exact_macs,
                ..Default::default()
            },
            ref_logits: logits(exact, &samples)?,
            val: val.map(|v| Labelled::new(exact, v)).transpose()?,
            held_out: held_out.map(|v| Labelled::new(exact, v)).transpose()?,
            samples,
        })
    }

    /// Validation images (those chosen on) the exact model classifies correctly.
    fn exact_correct(&self) -> Option<usize> {
        self.val.as_ref().map(Labelled::exact_correct)
    }

    fn n_val(&self) -> usize {
        self.val.as_ref().map_or(0, Labelled::n)
    }

    /// The validation accuracy of `correct` images right.
    fn accuracy(&self, correct: usize) -> f64 {
        self.val.as_ref().map_or(correct as f64, |v| v.accuracy(correct))
    }

    /// `g`'s reductions, logit measures and validation accuracy, after restoring `restored`.
    fn measure(&self, g: &Graph, restored: Option<String>) -> Result<PathPoint> {
        self.measure_on(g, restored, self.val.as_ref())
    }

    /// [`Meter::measure`] with the accuracy on the held-out validation images.
    fn measure_held_out(&self, g: &Graph, restored: Option<String>) -> Result<PathPoint> {
        self.measure_on(g, restored, self.held_out.as_ref())
    }

    fn measure_on(&self, g: &Graph, restored: Option<String>, val: Option<&Labelled>) -> Result<PathPoint> {
        let mut g = g.clone();
        crate::ir::infer::infer_graph(&mut g)?;
        let (l, a) = cost::reduction(&self.source, &cost::graph_cost(&g));
        let scored = val.map(|v| v.score(&g)).transpose()?;
        let out = logits(&g, &self.samples)?;
        Ok(PathPoint {
            restored,
            reduction_everything_counted: a,
            reduction_lookups_only: l,
            logit_cosine: mean_cosine(&out, &self.ref_logits),
            expected_drop: expected_drop(&self.ref_logits, &out),
            accuracy: scored.map(|s| s.1),
            correct: scored.map(|s| s.0),
            drop_se: scored.map(|s| s.2),
        })
    }

    /// Whether `p` meets the target. A reduction target is never "met": layers are restored
    /// while the reduction allows (checked by [`Mask::walk`]).
    fn met(&self, p: &PathPoint) -> bool {
        match self.goal {
            Goal::Accuracy(drop) => self.val.as_ref().is_some_and(|v| v.within(p, drop)),
            Goal::Reduction(_) => false,
            Goal::ExpectedDrop(drop, cos) => p.expected_drop <= drop && cos.is_none_or(|c| p.logit_cosine >= c),
            Goal::Cosine(c) => p.logit_cosine >= c,
        }
    }

    /// Whether a point measured by [`Meter::measure_held_out`] meets the accuracy target.
    fn met_held_out(&self, p: &PathPoint) -> bool {
        match (self.goal, &self.held_out) {
            (Goal::Accuracy(drop), Some(v)) => v.within(p, drop),
            _ => true,
        }
    }

    fn quality(&self, p: &PathPoint) -> f64 {
        self.goal.quality(p)
    }
}

/// The greedy path's result: its points, the graph of the chosen one and its index.
struct Walk {
    path: Vec<PathPoint>,
    graph: Graph,
    chosen_point: usize,
    /// The layers (decision indices) restored up to the chosen point.
    restored: Vec<usize>,
}

fn check_ranges(o: &Options) -> Result<()> {
    for (name, v, range) in [
        ("min_logit_cosine", o.min_logit_cosine, -1.0..=1.0),
        ("max_accuracy_drop", o.max_accuracy_drop, 0.0..=100.0),
        ("max_expected_drop", o.max_expected_drop, 0.0..=100.0),
        ("target_reduction", o.target_reduction, 0.0..=1.0),
    ] {
        if let Some(v) = v.filter(|v| !range.contains(v)) {
            return Err(Error::Input(format!(
                "mask.{name} = {v}: must be within {}..={}",
                range.start(),
                range.end()
            )));
        }
    }
    if !(0.0..1.0).contains(&o.confirm) {
        return Err(Error::Input(format!(
            "mask.confirm = {}: must be within 0..1 (the fraction of --val held out to confirm; 0 = off)",
            o.confirm
        )));
    }
    Ok(())
}

fn check_targets(o: &Options, has_val: bool) -> Result<()> {
    if o.max_accuracy_drop.is_some() && !has_val {
        return Err(Error::Input(
            "mask.max_accuracy_drop needs a labelled validation set: --val X --val-labels Y".into(),
        ));
    }
    if o.max_accuracy_drop.is_some() && o.target_reduction.is_some() {
        return Err(Error::Input(
            "mask: give max_accuracy_drop or target_reduction, not both".into(),
        ));
    }
    Ok(())
}

/// The images the logit measures are taken on — held-out calibration images when the compile
/// set some aside, else the ones learned on, at most `samples` — and how the report names them.
fn measured_images(cx: &PassCx, o: &Options) -> Result<(ArrayD<f32>, String)> {
    let held_out = cx.holdout.is_some();
    let calib = cx
        .holdout
        .as_ref()
        .or(cx.calib.as_ref())
        .ok_or_else(|| Error::Input("the mask pass measures on --calib images".into()))?;
    let samples = calib.select(
        Axis(0),
        &(0..calib.shape()[0].min(o.samples.max(1))).collect::<Vec<_>>(),
    );
    let logit_images = format!(
        "{} {} images",
        samples.shape()[0],
        if held_out {
            "held-out calibration"
        } else {
            "calibration (learned on)"
        }
    );
    Ok((samples, logit_images))
}

/// How the report names the images the target is measured on: for an accuracy target the
/// validation images chosen on (and those held out to confirm), else `logit_images`.
fn measured_on(meter: &Meter, logit_images: &str) -> String {
    match (meter.goal, &meter.val, &meter.held_out) {
        (Goal::Accuracy(_), Some(v), Some(h)) => format!(
            "{} validation images ({} more held out to confirm; logits on {logit_images})",
            v.n(),
            h.n()
        ),
        // the accuracy is taken on --val; the logit measures (damage alone, cosines) on the rest
        (Goal::Accuracy(_), Some(v), None) => format!("{} validation images (logits on {logit_images})", v.n()),
        _ => logit_images.to_string(),
    }
}

/// Layers in greedy order: most damage per operation saved first (ties in graph order).
fn greedy_order(decisions: &[LayerDecision]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..decisions.len()).collect();
    order.sort_by(|&a, &b| {
        decisions[b]
            .damage_per_mop_saved
            .total_cmp(&decisions[a].damage_per_mop_saved)
            .then(a.cmp(&b))
    });
    order
}

/// The order `confirm` restores layers in: `undo` first, then the rest as [`greedy_order`].
fn confirm_order(decisions: &[LayerDecision], undo: &[usize]) -> Vec<usize> {
    let rest = greedy_order(decisions).into_iter().filter(|i| !undo.contains(i));
    undo.iter().copied().chain(rest).collect()
}

impl Mask {
    fn mask(&self, graph: &mut Graph, cx: &mut PassCx, record: &LutLayers) -> Result<()> {
        let o = &self.0;
        check_ranges(o)?;
        let luts = record.live(graph);
        if luts.is_empty() {
            cx.notes
                .push("mask: no LUT layers to mask (run the lut pass first)".into());
            return Ok(());
        }
        let (samples, logit_images) = measured_images(cx, o)?;
        check_targets(o, cx.val.is_some())?;
        let names: Vec<&str> = luts
            .iter()
            .flat_map(|n| [n.as_str(), record.exact(n).map_or(n.as_str(), |e| e.matmul.as_str())])
            .collect();
        for (list, patterns) in [("keep_exact", &o.keep_exact), ("force_lut", &o.force_lut)] {
            for p in super::unmatched(patterns.iter().map(String::as_str), &names) {
                cx.notes
                    .push(format!("mask: the {list} entry {p:?} names no LUT layer"));
            }
        }
        // the exact reference: every layer restored
        let mut exact = with_exact(graph, record, &luts)?;
        crate::ir::infer::infer_graph(&mut exact)?;
        let meter = Meter::new(Goal::of(o), &exact, samples, cx.val.clone(), o.confirm)?;
        if let (Goal::Accuracy(_), true, None) = (meter.goal, o.confirm > 0.0, &meter.held_out) {
            cx.notes.push(format!(
                "mask: confirm {} of {} validation images leaves no image to hold out or none to choose on: everything is chosen on all of them, unconfirmed",
                o.confirm,
                meter.n_val()
            ));
        }
        let bar = crate::cli::progress(2 * luts.len(), "mask");
        let mut decisions = self.layers_alone(graph, cx, record, &luts, &meter, &bar)?;
        let mut current = graph.clone();
        self.decide_first(&mut current, record, &luts, &mut decisions)?;
        let walk = self.walk(current, cx, record, &luts, &meter, &mut decisions, &bar)?;
        bar.finish_and_clear();
        let pruned = self.prune(None, graph, cx, record, &luts, &meter, &mut decisions, &walk)?;
        let chosen = pruned.points.last().unwrap_or(&walk.path[walk.chosen_point]);
        let (current, final_point) =
            match self.relearn(&exact, chosen, &decisions, record, &meter, cx, Stage::Chosen)? {
                Some((relearned, p)) => (relearned, Some(p)),
                None => (pruned.model.unwrap_or_else(|| walk.graph.clone()), None),
            };
        let mut again = match &final_point {
            Some(p) if meter.met(p) => {
                self.prune(Some(current), graph, cx, record, &luts, &meter, &mut decisions, &walk)?
            }
            _ => Back {
                model: Some(current),
                ..Back::default()
            },
        };
        // relearn_rounds: while layers come back, relearn through the new mix and prune again
        let mut fresh = !again.layers.is_empty();
        for _ in 0..o.relearn_rounds {
            let last = match again.points.last() {
                Some(p) if fresh => p.clone(),
                _ => break,
            };
            let Some((g, p)) = self.relearn(&exact, &last, &decisions, record, &meter, cx, Stage::Again)? else {
                break;
            };
            let more = self.prune(Some(g), graph, cx, record, &luts, &meter, &mut decisions, &walk)?;
            fresh = !more.layers.is_empty();
            again.points.push(p);
            again.points.extend(more.points);
            again.layers.extend(more.layers);
            again.model = more.model;
        }
        let current = again.model.expect("prune with a relearned model keeps one");
        let kept = again.points.last().or(final_point.as_ref()).unwrap_or(chosen);
        let (mut current, mut refined, choices) = match (o.refine_encoder || o.refine_subspace > 0) && meter.met(kept) {
            true => self.refine(current, &luts, &mut decisions, record, &meter, cx)?,
            false => (current, Vec::new(), Vec::new()),
        };
        if let Some(last) = refined.last().cloned() {
            // the refined layers' new lookups were fitted through the others as they stood;
            // relearn all of them through the final mix
            if let Some((g, p)) =
                self.relearn(&exact, &last, &decisions, record, &meter, cx, Stage::Refined(&choices))?
            {
                current = g;
                refined.push(p);
            }
        }
        // confirm undoes the last decisions first: the layers put back, latest first
        let undo: Vec<usize> = again
            .layers
            .iter()
            .rev()
            .chain(pruned.layers.iter().rev())
            .copied()
            .collect();
        let confirmation = self.confirm(&mut current, cx, record, &luts, &meter, &mut decisions, &undo)?;
        *graph = current;
        let mut report = MaskReport {
            metric: meter.goal.metric().into(),
            target: meter.goal.target(),
            measured_on: measured_on(&meter, &logit_images),
            exact_accuracy: meter.exact_correct().map(|c| meter.accuracy(c)),
            layers: decisions,
            path: walk.path,
            chosen_point: walk.chosen_point,
            pruned: pruned.points,
            final_point,
            pruned_after_relearning: again.points,
            refined,
            confirmation,
            kept_point: None,
        };
        report.kept_point = Some(report.kept().clone());
        // the last measure of the kept model: on the held-out images when there are some
        let kept_se = match &report.confirmation {
            Some(c) => c
                .points
                .last()
                .and_then(|p| p.drop_se)
                .map(|se| (se, c.images, " held-out")),
            None => report.kept().drop_se.map(|se| (se, meter.n_val(), "")),
        };
        cx.mask = Some(report);
        if let (Goal::Accuracy(budget), Some((se, n, held))) = (meter.goal, kept_se) {
            if se > budget / 2.0 {
                cx.notes.push(format!(
                    "mask: the accuracy drop is measured on {n}{held} validation images, with a standard error of {se:.2} points for the kept model: the {budget}-point budget may not hold on new images (more validation images narrow it)"
                ));
            }
        }
        Ok(())
    }

    /// Each LUT layer alone as lookups (everything else exact): its damage to the logits, what
    /// it saves, and the estimated speed of its lookups against the exact layer.
    fn layers_alone(
        &self,
        graph: &Graph,
        cx: &PassCx,
        record: &LutLayers,
        luts: &[String],
        meter: &Meter,
        bar: &indicatif::ProgressBar,
    ) -> Result<Vec<LayerDecision>> {
        let o = &self.0;
        let mut decisions = Vec::new();
        for n in luts {
            bar.inc(1);
            let ex = record.exact(n)?;
            let lut = graph.find(n).expect("present");
            let d = ex.weight.shape()[0];
            let rows_m = graph
                .fact(Outlet::new(lut, 0))
                .map(|f| f.shape.iter().map(|d| d.bind(1) as u64).product::<u64>())
                .unwrap_or(0);
            let exact_macs = rows_m * d as u64;
            let (lut_cost, est_speedup) = layer_cost(graph, n, &o.time_model, d, exact_macs)?;
            let ops_saved = 2 * exact_macs as i64 - lut_cost.ops_all() as i64;
            let alone = with_exact(graph, record, luts.iter().filter(|o| *o != n))?;
            let cos = mean_cosine(&logits(&alone, &meter.samples)?, &meter.ref_logits);
            cx.say(bar, || {
                format!("  mask: {} alone as lookups: logit cosine {cos:.5}", ex.matmul)
            });
            let lr = record.report_of(&ex.matmul);
            decisions.push(LayerDecision {
                layer: ex.matmul.clone(),
                kind: lr.map(|l| l.kind.to_string()).unwrap_or_default(),
                shape: [ex.weight.shape()[0], ex.weight.shape()[1]],
                layer_cosine: lr.map(|l| l.output_cosine).unwrap_or(f64::NAN),
                exact_macs,
                est_speedup,
                lut_cost,
                ops_saved,
                logit_cosine_alone: cos,
                damage_per_mop_saved: (1.0 - cos) / (ops_saved.max(1) as f64 / 1e6),
                chosen: "lut",
                why: String::new(),
            });
        }
        Ok(decisions)
    }

    /// The decisions made before the greedy path: `keep_exact` / `force_lut` overrides, then
    /// (with `restore_unprofitable`) layers whose lookups save nothing or run slower.
    fn decide_first(
        &self,
        current: &mut Graph,
        record: &LutLayers,
        luts: &[String],
        decisions: &mut [LayerDecision],
    ) -> Result<()> {
        let o = &self.0;
        for (i, n) in luts.iter().enumerate() {
            let name = &decisions[i].layer;
            if named(&o.keep_exact, name, n) {
                restore(current, n, record.exact(n)?)?;
                decisions[i].chosen = "exact";
                decisions[i].why = "keep_exact override".into();
            } else if named(&o.force_lut, name, n) {
                decisions[i].why = "force_lut override".into();
            }
        }
        if !o.restore_unprofitable {
            return Ok(());
        }
        for (d, n) in decisions.iter_mut().zip(luts) {
            if unprofitable(d.ops_saved, d.est_speedup) && d.why.is_empty() {
                restore(current, n, record.exact(n)?)?;
                d.chosen = "exact";
                d.why = if d.ops_saved <= 0 {
                    format!(
                        "restored: its lookups cost {:.3} Mops more than the exact layer",
                        -d.ops_saved as f64 / 1e6
                    )
                } else {
                    format!(
                        "restored: its lookups would take {:.2}x the exact layer's time (time_model)",
                        1.0 / d.est_speedup
                    )
                };
            }
        }
        Ok(())
    }

    /// Restore the undecided layers in greedy order, measuring the whole model after each,
    /// until the target holds; keep the first point that meets it or else the best one
    /// ([`best_point`]), undoing the restores after it.
    #[allow(clippy::too_many_arguments)]
    fn walk(
        &self,
        mut current: Graph,
        cx: &PassCx,
        record: &LutLayers,
        luts: &[String],
        meter: &Meter,
        decisions: &mut [LayerDecision],
        bar: &indicatif::ProgressBar,
    ) -> Result<Walk> {
        let o = &self.0;
        let mut path = vec![meter.measure(&current, None)?];
        // the best point so far and its graph (see `best_point`), and what each point restored
        let (mut best, mut best_graph) = (0, current.clone());
        let mut restored_at: Vec<(usize, usize)> = Vec::new(); // (decision, rank) per point 1..
        let mut rank = 0;
        for i in greedy_order(decisions) {
            cx.check_cancel()?;
            if !decisions[i].why.is_empty() {
                continue; // decided by an override or as unprofitable
            }
            rank += 1;
            bar.inc(1);
            if meter.met(path.last().expect("starts with one point")) {
                decisions[i].why = format!("kept as LUT: target met (priority rank {rank})");
                continue;
            }
            let mut trial = current.clone();
            restore(&mut trial, &luts[i], record.exact(&luts[i])?)?;
            let point = meter.measure(&trial, Some(decisions[i].layer.clone()))?;
            if let Some(t) = o.target_reduction {
                if point.reduction_everything_counted < t {
                    decisions[i].why =
                        format!("kept as LUT: restoring would drop the reduction below {t} (rank {rank})");
                    continue;
                }
            }
            cx.say(bar, || {
                let acc = point
                    .accuracy
                    .map(|a| format!("accuracy {:.2} %, ", 100.0 * a))
                    .unwrap_or_default();
                format!(
                    "  mask: restored {} (rank {rank}): {acc}logit cosine {:.5}, expected drop {:.2} points, {:.1} % removed",
                    decisions[i].layer,
                    point.logit_cosine,
                    point.expected_drop,
                    100.0 * point.reduction_everything_counted
                )
            });
            path.push(point);
            restored_at.push((i, rank));
            current = trial;
            decisions[i].chosen = "exact";
            decisions[i].why = format!(
                "restored: damage per Mop saved {:.3e}, logit cosine alone {:.4} (rank {rank})",
                decisions[i].damage_per_mop_saved, decisions[i].logit_cosine_alone
            );
            // no earlier point met the target (the loop stops restoring at one that does)
            let last = path.len() - 1;
            if meter.met(&path[last]) || meter.quality(&path[last]) > meter.quality(&path[best]) {
                (best, best_graph) = (last, current.clone());
            }
        }
        let chosen_point = best_point(&path, |p| meter.met(p), |p| meter.quality(p));
        debug_assert_eq!(chosen_point, best, "the running best is the best point");
        if chosen_point + 1 < path.len() {
            // the restores after the chosen point made things worse: undo them
            current = best_graph;
            let kept = &path[chosen_point];
            let at = |p: &PathPoint| match p.accuracy {
                Some(a) if o.max_accuracy_drop.is_some() => format!("accuracy {:.2}%", a * 100.0),
                _ => format!("logit cosine {:.5}", p.logit_cosine),
            };
            for (k, &(i, rank)) in restored_at.iter().enumerate().skip(chosen_point) {
                decisions[i].chosen = "lut";
                decisions[i].why = format!(
                    "kept as LUT: the target was not met and restoring up to it (rank {rank}) gave {}, \
                     worse than {} with fewer layers restored",
                    at(&path[k + 1]),
                    at(kept)
                );
            }
        }
        Ok(Walk {
            restored: restored_at[..chosen_point].iter().map(|&(i, _)| i).collect(),
            path,
            graph: current,
            chosen_point,
        })
    }

    /// With `prune`, when the walk's chosen point meets the target (`relearned` = `None`): each
    /// layer the walk restored, most operations saved first, put back as lookups (the model
    /// rebuilt from the all-LUT `all_lut` with the other exact layers restored) and kept so when
    /// the target still holds; the model is returned when some layer was put back.
    ///
    /// Once a relearned model is kept and meets the target (`relearned` = `Some`): relearning
    /// lowers the damage of the layers it refits, so the budget the walk spent may have room
    /// again. Each layer the walk restored that is still exact, most operations saved first, is
    /// put back into the relearned model as the lookups the `lut` pass first fitted
    /// ([`put_back`] from `all_lut`: fitted through the all-LUT prefix, as above) and kept so
    /// when the target still holds; the model kept is returned (the relearned one when none).
    ///
    /// One measure per layer tried; a point per layer put back.
    #[allow(clippy::too_many_arguments)]
    fn prune(
        &self,
        relearned: Option<Graph>,
        all_lut: &Graph,
        cx: &mut PassCx,
        record: &LutLayers,
        luts: &[String],
        meter: &Meter,
        decisions: &mut [LayerDecision],
        walk: &Walk,
    ) -> Result<Back> {
        if !self.0.prune {
            return Ok(Back {
                model: relearned,
                ..Back::default()
            });
        }
        let Some(relearned) = relearned else {
            if !meter.met(&walk.path[walk.chosen_point]) {
                cx.notes.push(format!(
                    "mask: prune tried nothing: no point of the greedy path meets the target ({})",
                    meter.goal.target()
                ));
                return Ok(Back::default());
            }
            let order = most_saved_first(walk.restored.clone(), decisions);
            return try_back(
                order,
                ("", "by prune"),
                None,
                cx,
                meter,
                decisions,
                |i, decisions, _| {
                    let others = (0..luts.len()).filter(|&j| j != i && decisions[j].chosen == "exact");
                    with_exact(all_lut, record, others.map(|j| &luts[j]))
                },
            );
        };
        let left: Vec<usize> = walk
            .restored
            .iter()
            .copied()
            .filter(|&i| decisions[i].chosen == "exact")
            .collect();
        let order = most_saved_first(left, decisions);
        let what = (" after relearning", "after relearning (its first fit)");
        let start = Some(relearned);
        try_back(order, what, start, cx, meter, decisions, |i, _, model| {
            let mut trial = model.expect("starts from the relearned model").clone();
            put_back(&mut trial, all_lut, &luts[i], record.exact(&luts[i])?)?;
            Ok(trial)
        })
    }

    /// With `relearn`: the tables of the layers left as lookups learned again through the
    /// chosen mix of exact and LUT layers (the `lut` pass re-run on the exact model with the
    /// restored layers kept exact; after refining, the refined layers fitted as the refine steps
    /// chose), and its point — unless it is worse than the `chosen` point on the target's
    /// metric, or (after put-backs or refining) misses the target: then `None` and a note, and
    /// the model before it stays.
    #[allow(clippy::too_many_arguments)]
    fn relearn(
        &self,
        exact: &Graph,
        chosen: &PathPoint,
        decisions: &[LayerDecision],
        record: &LutLayers,
        meter: &Meter,
        cx: &mut PassCx,
        stage: Stage,
    ) -> Result<Option<(Graph, PathPoint)>> {
        let o = &self.0;
        if !o.relearn {
            return Ok(None);
        }
        let keep: Vec<String> = decisions
            .iter()
            .filter(|d| d.chosen == "exact")
            .map(|d| d.layer.clone())
            .collect();
        // the options the lut pass ran with, unless the pipeline gives others for relearning
        let mut lut_opts = self.lut_options(record);
        lut_opts.keep_exact.extend(keep);
        if let Stage::Refined(refined) = stage {
            lut_opts.layers.extend(refined.iter().cloned());
        }
        let mut relearned = exact.clone();
        // (a relearn after refining leaves its record in the context; `run` restores the first)
        Lut(lut_opts).run(&mut relearned, cx)?;
        let (label, after, kept) = match stage {
            Stage::Chosen => ("(relearned)", "", "the greedy result"),
            Stage::Again => (RELEARNED_AGAIN, " after put-backs", "the model with them"),
            Stage::Refined(_) => (RELEARNED_AFTER_REFINING, " after refining", "the refined model"),
        };
        let p = meter.measure(&relearned, Some(label.into()))?;
        // after put-backs or refining, the relearned model must also meet the target (the
        // model before it does)
        if meter.quality(&p) >= meter.quality(chosen) && (matches!(stage, Stage::Chosen) || meter.met(&p)) {
            return Ok(Some((relearned, p)));
        }
        let (now, was) = meter.goal.compare(&p, chosen);
        cx.notes.push(format!(
            "mask: relearning the tables{after} did not help ({now} {was}); kept {kept}"
        ));
        Ok(None)
    }
}

/// Which model [`Mask::relearn`] relearns.
#[derive(Clone, Copy)]
enum Stage<'a> {
    /// The model the walk and prune chose.
    Chosen,
    /// The relearned model with layers put back (`relearn_rounds`).
    Again,
    /// The model after the refine steps, with the per-layer choices they made.
    Refined(&'a [super::lut::LayerOverride]),
}

impl Mask {
    /// With held-out validation images (`confirm`): the model as chosen measured on them and,
    /// while its drop there exceeds the budget, its LUT layers restored one at a time — first
    /// those in `undo` (the layers prune put back, latest first: the decisions made closest to
    /// the budget), then the others most damage per operation saved first (`force_lut` layers
    /// stay) — each measured on them; the
    /// model is left at the first point that meets the budget there. Then, when layers were
    /// restored, the model kept measured on the images the rest chose on. A layer's lookups are
    /// found by the record of the last `lut` run over the whole model (a relearn's, else the
    /// first's); a layer whose live lookups neither names (refined, not relearned) stays as it is.
    #[allow(clippy::too_many_arguments)]
    fn confirm(
        &self,
        current: &mut Graph,
        cx: &mut PassCx,
        record: &LutLayers,
        luts: &[String],
        meter: &Meter,
        decisions: &mut [LayerDecision],
        undo: &[usize],
    ) -> Result<Option<Confirmation>> {
        let (Some(held), Goal::Accuracy(budget)) = (&meter.held_out, meter.goal) else {
            return Ok(None);
        };
        let mut points = vec![meter.measure_held_out(current, None)?];
        // the model as chosen and the restores made, to go back to the best point
        let (start, mut restores) = (current.clone(), Vec::new());
        // the record of the model as it stands: the last relearn's when one ran, else the lut
        // pass's (set back by `run`)
        let relearned = cx.analyses.lut.take();
        let records: Vec<&LutLayers> = relearned.iter().chain([record]).collect();
        let order = confirm_order(decisions, undo);
        let bar = crate::cli::progress(order.len(), "mask confirm");
        for i in order {
            cx.check_cancel()?;
            bar.inc(1);
            if meter.met_held_out(points.last().expect("starts with one point")) {
                break;
            }
            let d = &decisions[i];
            if d.chosen != "lut" || named(&self.0.force_lut, &d.layer, &luts[i]) {
                continue;
            }
            let Some(name) = records.iter().find_map(|r| r.live_lut_of(current, &d.layer)) else {
                continue;
            };
            let ex = exact_in(&records, name)?;
            let was = points.last().expect("one point").clone();
            restore(current, name, ex)?;
            restores.push((name.to_string(), ex.clone(), i, decisions[i].why.clone()));
            let p = meter.measure_held_out(current, Some(d.layer.clone()))?;
            cx.say(&bar, || {
                format!(
                    "  mask: restored {} to confirm: accuracy {:.2} % on the held-out images, {:.1} % removed",
                    d.layer,
                    100.0 * p.accuracy.unwrap_or(0.0),
                    100.0 * p.reduction_everything_counted
                )
            });
            let d = &mut decisions[i];
            d.chosen = "exact";
            d.why = format!(
                "restored to confirm: on the {} held-out validation images the model got {} fewer right than the exact model's {} (budget {budget} points; {})",
                held.n(),
                held.exact_correct() as i64 - was.correct.unwrap_or(0) as i64,
                held.exact_correct(),
                d.why
            );
            points.push(p);
        }
        bar.finish_and_clear();
        cx.analyses.lut = relearned;
        if !meter.met_held_out(points.last().expect("one point")) {
            // as in the walk: a restore can make the model worse, so keep the best point there
            let best = best_point(&points, |p| meter.met_held_out(p), |p| p.correct.unwrap_or(0));
            cx.notes.push(format!(
                "mask: on the {} held-out validation images the model misses the {budget}-point budget with every layer confirm could restore restored (force_lut, or lookups no lut record names, keep the rest); kept the best of those points ({} restored)",
                held.n(),
                best
            ));
            *current = start;
            for (name, ex, ..) in &restores[..best] {
                restore(current, name, ex)?;
            }
            for (_, _, i, why) in &restores[best..] {
                decisions[*i].chosen = "lut";
                decisions[*i].why = format!("kept as LUT: restoring it to confirm did not help ({why})");
            }
            points.truncate(best + 1);
        }
        let chosen_on = match points.len() {
            1 => None,
            n => Some(meter.measure(current, Some(format!("(after restoring {} to confirm)", n - 1)))?),
        };
        if let Some(p) = chosen_on.as_ref().filter(|p| !meter.met(p)) {
            cx.notes.push(format!(
                "mask: after the restores to confirm, the model misses the budget on the validation images chosen on ({:.2}% against the exact model's {:.2}%)",
                100.0 * p.accuracy.unwrap_or(0.0),
                100.0 * meter.exact_correct().map_or(0.0, |c| meter.accuracy(c))
            ));
        }
        Ok(Some(Confirmation {
            images: held.n(),
            exact_accuracy: held.accuracy(held.exact_correct()),
            points,
            chosen_on,
        }))
    }
}

impl Mask {
    /// The options of the `lut` pass a relearn or refine runs with: the pipeline's for the mask
    /// pass when it gives them, else those of the `lut` run before it.
    fn lut_options(&self, record: &LutLayers) -> super::lut::Options {
        self.0.lut.clone().unwrap_or_else(|| record.options.clone())
    }

    /// With `refine_encoder`: each layer left as argmin lookups, most encoding operations
    /// first, fitted again by the `lut` pass alone with the hash-tree encoder (comparisons only)
    /// through the model as it stands, and kept so when the target still holds and `time_model`
    /// does not price the new lookups slower than the old. Then, with `refine_subspace`: each
    /// layer left exact for its damage (not for speed, not by `keep_exact`), most operations
    /// saved first, fitted again over codebooks of `refine_subspace` values, and kept as
    /// lookups when the target still holds and (with `restore_unprofitable`) `time_model` does
    /// not price them above the exact layer. One `lut` fit and one measure per layer tried.
    fn refine(
        &self,
        mut current: Graph,
        luts: &[String],
        decisions: &mut [LayerDecision],
        record: &LutLayers,
        meter: &Meter,
        cx: &mut PassCx,
    ) -> Result<(Graph, Vec<PathPoint>, Vec<super::lut::LayerOverride>)> {
        let o = &self.0;
        // the record of the model as it stands: relearning's when it ran, else the lut pass's
        let relearned = cx.analyses.lut.take();
        let records: Vec<&LutLayers> = relearned.iter().chain([record]).collect();
        let mut lut_names: Vec<Option<String>> = decisions
            .iter()
            .map(|d| {
                records
                    .iter()
                    .find_map(|r| r.live_lut_of(&current, &d.layer))
                    .map(str::to_string)
            })
            .collect();
        let mut trials: Vec<(usize, Variant)> = Vec::new();
        if o.refine_encoder {
            // the argmin LUT layers, most encoding operations first
            let mut argmin: Vec<usize> = (0..decisions.len())
                .filter(|&i| decisions[i].chosen == "lut" && decisions[i].lut_cost.encode_macs > 0)
                .filter(|&i| lut_names[i].is_some())
                .collect();
            argmin.sort_by(|&a, &b| {
                let e = |i: usize| decisions[i].lut_cost.encode_macs;
                e(b).cmp(&e(a)).then(a.cmp(&b))
            });
            trials.extend(argmin.into_iter().map(|i| (i, Variant::Tree)));
        }
        if o.refine_subspace > 0 {
            // the layers left exact for their damage: not by `decide_first` (by override or for
            // speed); the encoder trials above leave exact layers as they are
            let left: Vec<usize> = (0..decisions.len())
                .filter(|&i| {
                    let d = &decisions[i];
                    let for_speed = o.restore_unprofitable && unprofitable(d.ops_saved, d.est_speedup);
                    d.chosen == "exact" && !for_speed && !named(&o.keep_exact, &d.layer, &luts[i])
                })
                .collect();
            let order = most_saved_first(left, decisions);
            trials.extend(order.into_iter().map(|i| (i, Variant::Subspace(o.refine_subspace))));
        }
        let (mut points, mut choices) = (Vec::new(), Vec::new());
        let bar = crate::cli::progress(trials.len(), "mask refine");
        for (i, v) in trials {
            bar.inc(1);
            if let Some((g, p, name)) =
                self.try_variant(&current, i, v, &lut_names, &records, decisions, record, meter, cx, &bar)?
            {
                (current, lut_names[i]) = (g, Some(name));
                points.push(p);
                choices.push(v.layer_override(&decisions[i].layer));
            }
        }
        bar.finish_and_clear();
        Ok((current, points, choices))
    }

    /// One refine trial: layer `i` of `current` (exact, or lookups `lut_names[i]`, put back
    /// exact first) fitted again by the `lut` pass alone as `v` says, the other exact layers
    /// kept exact. Returns the model, its point and the layer's new `LutMatMul` name when it is
    /// kept (the decision updated), `None` (and a line saying why) when not.
    #[allow(clippy::too_many_arguments)]
    fn try_variant(
        &self,
        current: &Graph,
        i: usize,
        v: Variant,
        lut_names: &[Option<String>],
        records: &[&LutLayers],
        decisions: &mut [LayerDecision],
        record: &LutLayers,
        meter: &Meter,
        cx: &mut PassCx,
        bar: &indicatif::ProgressBar,
    ) -> Result<Option<(Graph, PathPoint, String)>> {
        cx.check_cancel()?;
        let o = &self.0;
        let layer = decisions[i].layer.clone();
        let was_lut = decisions[i].chosen == "lut";
        let mut opts = self.lut_options(record);
        opts.layers.push(v.layer_override(&layer));
        // this layer alone: no global stage over every LUT layer
        opts.global_epochs = 0;
        let others = decisions.iter().filter(|d| d.chosen == "exact" && d.layer != layer);
        opts.keep_exact.extend(others.map(|d| d.layer.clone()));
        let what = v.describe();
        let (d, macs) = (decisions[i].shape[0], decisions[i].exact_macs);
        let old_est = decisions[i].est_speedup;
        if let (Variant::Tree, Some(name)) = (v, lut_names[i].as_deref().filter(|_| was_lut)) {
            // priced before fitting: a tree the time model calls slower is not fitted at all
            let (_, est) = layer_cost_as(current, name, &o.time_model, d, macs, true)?;
            if est < old_est {
                cx.say(bar, || slower_line(&layer, &what, est, old_est));
                return Ok(None);
            }
        }
        let mut trial = current.clone();
        if was_lut {
            let name = lut_names[i].as_deref().expect("a LUT layer's name is known");
            let ex = exact_in(records, name)?;
            restore(&mut trial, name, ex)?;
        }
        // (restores leave their nodes without facts; the lut pass reads the layers' shapes)
        crate::ir::infer::infer_graph(&mut trial)?;
        // the record this run makes names the layer's new lookups (the first run's, set aside
        // by `run`, stays the report's)
        cx.analyses.lut = None;
        Lut(opts).run(&mut trial, cx)?;
        let fitted = cx.analyses.lut.take();
        let lut_name = fitted
            .as_ref()
            .and_then(|r| r.live_lut_of(&trial, &layer))
            .map(str::to_string);
        let Some(lut_name) = lut_name else {
            cx.say(bar, || {
                format!("  mask: refine left {layer} as it was: the lut pass kept it exact {what} (its options, e.g. min_macs)")
            });
            return Ok(None);
        };
        let (cost, est) = layer_cost(&trial, &lut_name, &o.time_model, d, macs)?;
        let ops_saved = 2 * macs as i64 - cost.ops_all() as i64;
        if was_lut && est < old_est {
            cx.say(bar, || slower_line(&layer, &what, est, old_est));
            return Ok(None);
        }
        if !was_lut && o.restore_unprofitable && unprofitable(ops_saved, est) {
            cx.say(bar, || {
                format!("  mask: refine left {layer} as it was: {what} its lookups would not pay ({ops_saved} operations saved, {:.2}x its time)", 1.0 / est)
            });
            return Ok(None);
        }
        let point = meter.measure(&trial, Some(format!("{layer} as lookups {what}")))?;
        if !meter.met(&point) {
            cx.say(bar, || {
                format!(
                    "  mask: refine left {layer} as it was: {what} the target is not met (logit cosine {:.5})",
                    point.logit_cosine
                )
            });
            return Ok(None);
        }
        cx.say(bar, || {
            format!(
                "  mask: refine made {layer} lookups {what}: logit cosine {:.5}, {:.1} % removed",
                point.logit_cosine,
                100.0 * point.reduction_everything_counted
            )
        });
        let d = &mut decisions[i];
        d.chosen = "lut";
        d.why = format!("kept as LUT {what} by refine, the target still met ({})", d.why);
        (d.lut_cost, d.est_speedup, d.ops_saved) = (cost, est, ops_saved);
        Ok(Some((trial, point, lut_name)))
    }
}

/// Each layer of `order` (decision indices) tried back as lookups: `trial(i, decisions, model)`
/// builds the model with it back (`model`: the last one kept, else `start`), kept when the
/// target still holds (its decision then says so: "put back {by}"). Returns the last model kept
/// (else `start`) and, per layer put back, its point and index ([`Back`]). `what` = (the
/// points' and progress lines' suffix, how the decision says it was put back).
#[allow(clippy::too_many_arguments)]
fn try_back(
    order: Vec<usize>,
    (suffix, by): (&str, &str),
    start: Option<Graph>,
    cx: &mut PassCx,
    meter: &Meter,
    decisions: &mut [LayerDecision],
    mut trial: impl FnMut(usize, &[LayerDecision], Option<&Graph>) -> Result<Graph>,
) -> Result<Back> {
    let bar = crate::cli::progress(order.len(), &format!("mask prune{suffix}"));
    let mut back = Back {
        model: start,
        ..Back::default()
    };
    for i in order {
        cx.check_cancel()?;
        bar.inc(1);
        let g = trial(i, decisions, back.model.as_ref())?;
        let point = meter.measure(&g, Some(format!("{} back as lookups{suffix}", decisions[i].layer)))?;
        if !meter.met(&point) {
            continue;
        }
        cx.say(&bar, || {
            format!(
                "  mask: put {} back as lookups{suffix}: logit cosine {:.5}, {:.1} % removed",
                decisions[i].layer,
                point.logit_cosine,
                100.0 * point.reduction_everything_counted
            )
        });
        decisions[i].chosen = "lut";
        decisions[i].why = format!(
            "kept as LUT: put back {by}, the target still met ({})",
            decisions[i].why
        );
        back.points.push(point);
        back.layers.push(i);
        back.model = Some(g);
    }
    bar.finish_and_clear();
    Ok(back)
}

/// What [`try_back`] put back: the last model kept (else the one it started from), and per
/// layer put back, in order, its point and its index in the decisions.
#[derive(Default)]
struct Back {
    model: Option<Graph>,
    points: Vec<PathPoint>,
    layers: Vec<usize>,
}

/// The line of a refine trial whose lookups the time model prices slower than the old ones.
fn slower_line(layer: &str, what: &str, est: f64, old_est: f64) -> String {
    format!(
        "  mask: refine left {layer} as it was: {what} its lookups would run slower ({:.2}x the exact layer's time against {:.2}x, time_model)",
        1.0 / est,
        1.0 / old_est
    )
}

/// What a refine trial fits a layer as.
#[derive(Clone, Copy)]
enum Variant {
    /// Codebooks of this many values.
    Subspace(usize),
    /// The hash-tree encoder.
    Tree,
}

impl Variant {
    fn layer_override(self, layer: &str) -> super::lut::LayerOverride {
        let mut l = super::lut::LayerOverride {
            name: layer.to_string(),
            encoder: None,
            subspace: None,
        };
        match self {
            Variant::Subspace(s) => l.subspace = Some(s),
            Variant::Tree => l.encoder = Some(super::lut::EncoderChoice::Tree),
        }
        l
    }
    fn describe(self) -> String {
        match self {
            Variant::Subspace(s) => format!("over codebooks of {s}"),
            Variant::Tree => "with the tree encoder".into(),
        }
    }
}

/// Layers `order` sorted by operations saved, most first (ties in graph order): the order
/// prune and refine try them in.
fn most_saved_first(mut order: Vec<usize>, decisions: &[LayerDecision]) -> Vec<usize> {
    order.sort_by(|&a, &b| decisions[b].ops_saved.cmp(&decisions[a].ops_saved).then(a.cmp(&b)));
    order
}

/// Whether lookups that save `ops_saved` operations and run `est_speedup` times as fast as the
/// exact layer are not worth keeping (`restore_unprofitable`).
fn unprofitable(ops_saved: i64, est_speedup: f64) -> bool {
    ops_saved <= 0 || est_speedup <= 1.0
}

/// Whether a layer list of the options (`*` wildcards) names the layer, by its MatMul or its
/// `LutMatMul` name.
fn named(patterns: &[String], matmul: &str, lut: &str) -> bool {
    patterns.iter().any(|g| glob_match(g, matmul) || glob_match(g, lut))
}

/// The cost of LUT layer `lut` (its lookups and encoding; rows of `d` values) in `graph` and the
/// estimated speed of the exact layer's `exact_macs` against it by `tm` (> 1: the lookups are
/// faster).
fn layer_cost(graph: &Graph, lut: &str, tm: &TimeModel, d: usize, exact_macs: u64) -> Result<(cost::Cost, f64)> {
    layer_cost_as(graph, lut, tm, d, exact_macs, false)
}

/// [`layer_cost`], or with `as_tree` the cost of the same lookups with a hash-tree encoder of
/// the same codebooks instead of its argmin one (`log2 K` comparisons per codebook and row
/// instead of `K·S` multiply-adds and `K` comparisons), to price a refit before running it.
fn layer_cost_as(
    graph: &Graph,
    lut: &str,
    tm: &TimeModel,
    d: usize,
    exact_macs: u64,
    as_tree: bool,
) -> Result<(cost::Cost, f64)> {
    let node = graph.find(lut).expect("a live LUT layer");
    let enc = graph.inputs_of(node)[0].node;
    let Op::PqEncode(enc_op) = &graph.node(enc).op else {
        return Err(Error::Other(format!(
            "{lut}: a LutMatMul whose codes do not come from a PQEncode"
        )));
    };
    let mut enc_op = enc_op.clone();
    // prototypes per codebook: the tables are [C, M, K]
    let k = graph
        .const_value(graph.inputs_of(node)[1])
        .and_then(|t| t.shape().get(2).copied())
        .unwrap_or(16);
    let mut c = cost::node_cost(graph, node);
    let mut e = cost::node_cost(graph, enc);
    if as_tree && e.encode_macs > 0 {
        // argmin: `K` comparisons per codebook and row
        e.encode_compares = e.encode_compares / k as u64 * u64::from(k.max(2).ilog2());
        e.encode_macs = 0;
        (enc_op.encoder, enc_op.act_scale) = (Encoder::Tree, None);
    }
    c.add(&e);
    // a convolution's output width, from its input's facts
    let ow = enc_op.window.as_ref().and_then(|w| {
        let f = graph.fact(graph.inputs_of(enc)[0])?;
        let dims: Vec<usize> = f.shape.iter().map(|d| d.bind(1).max(0) as usize).collect();
        let hw = match (enc_op.nhwc, dims.as_slice()) {
            (false, [_, _, h, w]) | (true, [_, h, w, _]) => [*h, *w],
            _ => return None,
        };
        w.resolve(hw).ok().map(|g| g.out[1])
    });
    let est = exact_macs as f64 / tm.time(&c, &enc_op, d, k, ow).max(1.0);
    Ok((c, est))
}

/// The exact layer behind the lookups `name`, from the first of `records` that has it.
fn exact_in<'a>(records: &[&'a LutLayers], name: &str) -> Result<&'a ExactLayer> {
    records
        .iter()
        .find_map(|r| r.exact(name).ok())
        .ok_or_else(|| Error::Other(format!("{name}: no exact layer recorded")))
}

/// `graph` with the LUT layers `layers` (their `LutMatMul` names) put back exact.
fn with_exact<'a>(graph: &Graph, record: &LutLayers, layers: impl IntoIterator<Item = &'a String>) -> Result<Graph> {
    let mut g = graph.clone();
    for n in layers {
        restore(&mut g, n, record.exact(n)?)?;
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(correct: usize) -> PathPoint {
        PathPoint {
            restored: None,
            reduction_everything_counted: 0.0,
            reduction_lookups_only: 0.0,
            logit_cosine: 0.0,
            expected_drop: 0.0,
            accuracy: Some(correct as f64 / 1000.0),
            correct: Some(correct),
            drop_se: None,
        }
    }

    #[test]
    fn the_expected_drop_is_the_exact_models_probability_moved_off_its_top_class() {
        let a = ArrayD::from_shape_vec(vec![2, 3], vec![2.0f32, 1.0, 0.0, 0.0, 0.0, 3.0]).unwrap();
        assert_eq!(expected_drop(&a, &a), 0.0);
        // image 0 moves from class 0 to class 1: it loses p0(0) − p0(1) (as a share of 2 images)
        let b = ArrayD::from_shape_vec(vec![2, 3], vec![1.0f32, 2.0, 0.0, 0.0, 0.0, 3.0]).unwrap();
        let z: f64 = [2.0f64, 1.0, 0.0].iter().map(|v| v.exp()).sum();
        let want = 100.0 * (2f64.exp() - 1f64.exp()) / z / 2.0;
        assert!((expected_drop(&a, &b) - want).abs() < 1e-6, "{}", expected_drop(&a, &b));
        // outputs that are already probabilities are taken as they are
        let p = ArrayD::from_shape_vec(vec![1, 3], vec![0.5f32, 0.3, 0.2]).unwrap();
        let q = ArrayD::from_shape_vec(vec![1, 3], vec![0.1f32, 0.2, 0.7]).unwrap();
        assert!((expected_drop(&p, &q) - 30.0).abs() < 1e-4);
    }

    /// The time model prices a convolution's tree comparisons at `compare_conv` and a gathered
    /// one's at `compare`, each lookup at `lookup` plus `output / codebooks` (one output value
    /// per codebooks' lookups), and an argmin's multiply-adds at its kernel's rate.
    #[test]
    fn time_model_prices_each_kernel() {
        let tm = TimeModel::default();
        let window = crate::ir::op::Window {
            kernel: [5, 5],
            strides: [1, 1],
            dilations: [1, 1],
            padding: crate::ir::op::Padding::Explicit([2, 2, 2, 2]),
            ceil_mode: false,
        };
        let tree = |window| PqEncode {
            subspace: 5,
            encoder: Encoder::Tree,
            window,
            nhwc: false,
            act_scale: None,
        };
        // 160 codebooks of 5 values (d = 800), 1000 rows, 48 outputs, depth 4
        let c = cost::Cost {
            exact_macs: 7,
            encode_compares: 1000 * 160 * 4,
            lookups: 1000 * 160 * 48,
            ..Default::default()
        };
        let lookups = (tm.lookup + tm.output / 160.0) * c.lookups as f64;
        let conv = tm.time(&c, &tree(Some(window.clone())), 800, 16, Some(32));
        assert!(
            (conv - (7.0 + tm.compare_conv * 640_000.0 + lookups)).abs() < 1e-6,
            "{conv}"
        );
        // output rows of 7 pixels fill 7 of the pixel-lane kernel's 16 lanes; of 20, 20 of 32;
        // at stride 2, 4 input pixels per output pixel
        let mut strided = window.clone();
        strided.strides = [2, 2];
        for (w, ow, pad) in [(&window, 7, 16.0 / 7.0), (&window, 20, 1.6), (&strided, 32, 4.0)] {
            let narrow = tm.time(&c, &tree(Some(w.clone())), 800, 16, Some(ow));
            let want = 7.0 + tm.compare_conv * pad * 640_000.0 + lookups;
            assert!((narrow - want).abs() < 1e-6, "{ow}: {narrow} vs {want}");
        }
        // priced for batch 64, the image lanes are full at any width (not at any stride)
        let tm64 = TimeModel { batch: 64, ..tm };
        for (w, ow, pad) in [(&window, 7, 1.0), (&strided, 3, 4.0)] {
            let narrow = tm64.time(&c, &tree(Some(w.clone())), 800, 16, Some(ow));
            let want = 7.0 + tm.compare_conv * pad * 640_000.0 + lookups;
            assert!((narrow - want).abs() < 1e-6, "{ow}: {narrow} vs {want}");
        }
        let fc = tm.time(&c, &tree(None), 800, 16, None);
        assert!((fc - (7.0 + tm.compare * 640_000.0 + lookups)).abs() < 1e-6, "{fc}");
        // 256 prototypes: the wide tables' rate
        let wide = tm.time(&c, &tree(None), 800, 256, None);
        let lookups256 = (tm.lookup_k256 + tm.output / 160.0) * c.lookups as f64;
        assert!(
            (wide - (7.0 + tm.compare * 640_000.0 + lookups256)).abs() < 1e-6,
            "{wide}"
        );
        // an argmin's comparisons are part of its multiply-add rate; int8 where its kernel runs
        // (kernel width ≤ 4, one codebook per channel), at the padded 16-channel rate
        let mut w3 = window;
        w3.kernel = [3, 3];
        let argmin = |act_scale| PqEncode {
            subspace: 9,
            encoder: Encoder::Argmin,
            window: Some(w3.clone()),
            nhwc: true,
            act_scale,
        };
        let c = cost::Cost {
            encode_macs: 1000,
            encode_compares: 50,
            ..Default::default()
        };
        // 8 channels (d = 72): 16-lane vectors half full, twice the rate per multiply-add
        assert!((tm.time(&c, &argmin(None), 72, 16, Some(7)) - 2.0 * tm.encode_mac * 1000.0).abs() < 1e-6);
        assert!((tm.time(&c, &argmin(Some(0.1)), 72, 16, Some(7)) - 2.0 * tm.encode_mac_i8 * 1000.0).abs() < 1e-6);
    }

    #[test]
    fn confirm_undoes_the_layers_put_back_first_latest_first() {
        let d = |damage: f64| LayerDecision {
            layer: format!("l{damage}"),
            kind: "conv".into(),
            shape: [9, 4],
            layer_cosine: 0.9,
            exact_macs: 100,
            lut_cost: cost::Cost::default(),
            ops_saved: 50,
            est_speedup: 2.0,
            logit_cosine_alone: 0.99,
            damage_per_mop_saved: damage,
            chosen: "lut",
            why: String::new(),
        };
        let decisions: Vec<_> = [0.3, 0.1, 0.5, 0.2, 0.4].into_iter().map(d).collect();
        // most damage first
        assert_eq!(greedy_order(&decisions), [2, 4, 0, 3, 1]);
        assert_eq!(confirm_order(&decisions, &[]), [2, 4, 0, 3, 1]);
        // put back: 1 then 3 by prune, 0 after relearning → undone 0, 3, 1, then the rest
        assert_eq!(confirm_order(&decisions, &[0, 3, 1]), [0, 3, 1, 2, 4]);
    }

    #[test]
    fn the_drop_standard_error_is_the_paired_one() {
        let (t, f) = (true, false);
        // one image each way out of 4: mean 0, variance 1/2
        let se = drop_standard_error(&[t, t, f, f], &[t, f, t, f]);
        assert!((se - 100.0 * (0.5f64 / 4.0).sqrt()).abs() < 1e-9, "{se}");
        // 10 of 100 lost, none gained: variance 0.1 − 0.01
        let exact = vec![t; 100];
        let approx: Vec<bool> = (0..100).map(|i| i >= 10).collect();
        assert!((drop_standard_error(&exact, &approx) - 3.0).abs() < 1e-9);
        // agreement carries no error, whatever the accuracy
        assert_eq!(drop_standard_error(&[t, f, f], &[t, f, f]), 0.0);
        assert_eq!(drop_standard_error(&[], &[]), 0.0);
    }

    #[test]
    fn held_out_images_are_spread_through_the_set() {
        let at = |n, f| -> Vec<usize> {
            let held = confirm_split(n, f);
            (0..n).filter(|&i| held[i]).collect()
        };
        assert_eq!(at(8, 0.5), [1, 3, 5, 7]);
        assert_eq!(at(9, 0.25), [3, 7]);
        assert_eq!(at(10, 0.3), [3, 6, 9]);
        assert!(at(10, 0.0).is_empty());
        // about the fraction asked, whatever the size
        for (n, f) in [(2000, 0.5), (1999, 0.25), (7, 0.9)] {
            let k = at(n, f).len() as f64;
            assert!((k - n as f64 * f).abs() <= 1.0, "{k} of {n} at {f}");
        }
    }

    #[test]
    fn a_drop_of_exactly_the_budget_is_within_it() {
        // what comparing accuracies in floating point refused
        let (exact, kept) = std::hint::black_box((182.0f64, 181.0f64));
        assert!((exact / 200.0 - kept / 200.0) * 100.0 > 0.5);
        assert!(within_drop(182, 181, 200, 0.5));
        assert!(!within_drop(182, 180, 200, 0.5));
        assert!(!within_drop(182, 181, 200, 0.49));
        assert!(within_drop(7, 9, 10, 0.0), "gaining accuracy is within any budget");
        assert!(within_drop(7, 7, 10, 0.0) && !within_drop(7, 6, 10, 0.0));
        // every exact budget of whole images is met, and one image more is not
        for n in [1usize, 3, 7, 200, 999, 10_000, 123_457] {
            for lost in 0..=n.min(5) {
                let drop = lost as f64 * 100.0 / n as f64;
                assert!(within_drop(n, n - lost, n, drop), "{lost} of {n} at {drop} points");
                if lost < n {
                    assert!(!within_drop(n, n - lost - 1, n, drop), "{} of {n}", lost + 1);
                }
            }
        }
    }

    #[test]
    fn the_point_kept_is_the_first_that_meets_the_target_or_the_best() {
        // restoring a layer lowered accuracy 87.9 → 86.7 % (the path)
        let path = [point(860), point(879), point(867), point(870)];
        let correct = |p: &PathPoint| p.correct;
        assert_eq!(
            best_point(&path, |_| false, correct),
            1,
            "none meets: the best, not the last"
        );
        assert_eq!(
            best_point(&path, |p| p.correct >= Some(867), correct),
            1,
            "the first that meets"
        );
        let path = [point(860), point(879), point(867), point(890)];
        assert_eq!(best_point(&path, |p| p.correct >= Some(885), correct), 3);
        assert_eq!(
            best_point(&[point(5), point(5)], |_| false, correct),
            0,
            "ties: fewer restores"
        );
        assert_eq!(best_point(&[point(5)], |_| false, correct), 0);
    }
}
