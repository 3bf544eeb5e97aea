//! The refine steps: single layers fitted again (pixel or window codebooks, tree encoders,
//! smaller codebooks).

use super::exact_in;
use super::meter::Meter;
use super::report::{LayerDecision, PathPoint};
use super::time_model::{layer_cost, layer_cost_as};
use super::walk::{most_saved_first, named, unprofitable};
use crate::error::Result;
use crate::ir::Graph;
use crate::passes::analysis::LutLayers;
use crate::passes::lut::Lut;
use crate::passes::mask::{restore, Mask};
use crate::passes::{Pass, PassCx};

impl Mask {
    /// The options of the `lut` pass a relearn or refine runs with: the pipeline's for the mask
    /// pass when it gives them, else those of the `lut` run before it.
    pub(super) fn lut_options(&self, record: &LutLayers) -> crate::passes::lut::Options {
        self.0.lut.clone().unwrap_or_else(|| record.options.clone())
    }

    /// With `refine_pixel`: each layer left as argmin lookups over window codebooks, most
    /// encoding operations first, fitted again over pixel codebooks where they fit, kept as
    /// below. With `coarsen_pixel`: each layer left as lookups over pixel codebooks of fewer
    /// channels, most lookups first, fitted again over pixel codebooks of that many channels,
    /// kept as below. With `refine_window`: each layer left exact for its damage whose lookups were over
    /// pixel codebooks, most operations saved first, fitted again over window codebooks, kept as
    /// with `refine_subspace` (which then skips the layers it made lookups). With
    /// `refine_encoder`: each layer left as argmin lookups, most encoding operations
    /// first, fitted again by the `lut` pass alone with the hash-tree encoder (comparisons only)
    /// through the model as it stands, and kept so when the target still holds and `time_model`
    /// does not price the new lookups slower than the old. Then, with `refine_k`, and after it
    /// with `refine_subspace` (each skipping the layers made lookups before it): each layer left
    /// exact for its damage (not for speed, not by `keep_exact`), most operations saved first,
    /// fitted again with `refine_k` prototypes per codebook, or over codebooks of
    /// `refine_subspace` values, and kept as lookups when the target still holds and (with
    /// `restore_unprofitable`) `time_model` does not price them above the exact layer. One
    /// `lut` fit and one measure per layer tried.
    pub(super) fn refine(
        &self,
        mut current: Graph,
        luts: &[String],
        decisions: &mut [LayerDecision],
        record: &LutLayers,
        meter: &Meter,
        cx: &mut PassCx,
    ) -> Result<Refined> {
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
        // the argmin LUT layers, most encoding operations first
        let mut argmin: Vec<usize> = (0..decisions.len())
            .filter(|&i| decisions[i].chosen == "lut" && decisions[i].lut_cost.encode_macs > 0)
            .filter(|&i| lut_names[i].is_some())
            .collect();
        argmin.sort_by(|&a, &b| {
            let e = |i: usize| decisions[i].lut_cost.encode_macs;
            e(b).cmp(&e(a)).then(a.cmp(&b))
        });
        if o.refine_pixel > 0 {
            // the convolutions over window codebooks (`try_variant` asks whether pixel
            // codebooks fit)
            let window = argmin.iter().filter(|&&i| {
                decisions[i].kind == "conv"
                    && lut_names[i]
                        .as_deref()
                        .is_some_and(|n| pixel_channels(&current, n).is_none())
            });
            trials.extend(window.map(|&i| (i, Variant::Pixel(o.refine_pixel))));
        }
        if o.coarsen_pixel > 0 {
            // the layers over pixel codebooks of fewer channels, most lookups first
            let mut pixel: Vec<usize> = (0..decisions.len())
                .filter(|&i| decisions[i].chosen == "lut")
                .filter(|&i| {
                    let channels = lut_names[i].as_deref().and_then(|n| pixel_channels(&current, n));
                    channels.is_some_and(|c| c < o.coarsen_pixel)
                })
                .collect();
            pixel.sort_by(|&a, &b| {
                let l = |i: usize| decisions[i].lut_cost.lookups;
                l(b).cmp(&l(a)).then(a.cmp(&b))
            });
            trials.extend(pixel.into_iter().map(|i| (i, Variant::Pixel(o.coarsen_pixel))));
        }
        if o.refine_encoder {
            trials.extend(argmin.iter().map(|&i| (i, Variant::Tree)));
        }
        // the layers left exact for their damage: not by `decide_first` (by override or for
        // speed); the encoder trials above leave exact layers as they are
        let left: Vec<usize> = (0..decisions.len())
            .filter(|&i| {
                let d = &decisions[i];
                let for_speed = o.restore_unprofitable && unprofitable(d.ops_saved, d.est_speedup);
                d.chosen == "exact" && !for_speed && !named(&o.keep_exact, &d.layer, &luts[i])
            })
            .collect();
        let left = most_saved_first(left, decisions);
        if o.refine_window {
            // those whose lookups were over pixel codebooks
            let pixel = left
                .iter()
                .filter(|&&i| record.report_of(&decisions[i].layer).is_some_and(|r| r.pixel));
            trials.extend(pixel.map(|&i| (i, Variant::Window)));
        }
        if o.refine_k > 0 {
            trials.extend(left.iter().map(|&i| (i, Variant::Codes(o.refine_k))));
        }
        if o.refine_subspace > 0 {
            trials.extend(left.iter().map(|&i| (i, Variant::Subspace(o.refine_subspace))));
        }
        if trials.is_empty() {
            // nothing to refit (e.g. `refine_window` on a model without pixel codebooks): the
            // model and the records stay as they are
            drop(records);
            cx.analyses.lut = relearned;
            return Ok(Refined::default());
        }
        let mut out = Refined::default();
        let bar = crate::cli::progress(trials.len(), "mask refine");
        let mut made_pixel = Vec::new();
        let mut fits = Vec::new();
        for (i, v) in trials {
            bar.inc(1);
            if matches!(v, Variant::Tree) && made_pixel.contains(&i)
                || matches!(v, Variant::Subspace(_) | Variant::Codes(_)) && decisions[i].chosen == "lut"
            {
                continue;
            }
            let before = (current.clone(), decisions[i].clone());
            if let Some((g, p, name, fit)) =
                self.try_variant(&current, i, v, &lut_names, &records, decisions, record, meter, cx, &bar)?
            {
                (current, lut_names[i]) = (g, Some(name));
                if matches!(v, Variant::Pixel(_)) {
                    made_pixel.push(i);
                }
                out.points.push(p);
                out.choices
                    .push(v.layer_override(&decisions[i].layer, &self.lut_options(record).layers));
                out.steps.push(RefineStep {
                    before: before.0,
                    change: Some((i, before.1)),
                    what: v.describe(),
                });
                fits.push(fit);
            }
        }
        bar.finish_and_clear();
        // the record of the refined model: the one it started from with the refined layers'
        // fits added, so later steps (relearning, the confirmation) find every layer's lookups
        drop(records);
        let mut rec = relearned.unwrap_or_else(|| LutLayers::new(self.lut_options(record)));
        for f in fits {
            rec.absorb(f);
        }
        cx.analyses.lut = Some(rec);
        out.model = Some(current);
        Ok(out)
    }

    /// One refine trial: layer `i` of `current` (exact, or lookups `lut_names[i]`, put back
    /// exact first) fitted again by the `lut` pass alone as `v` says, the other exact layers
    /// kept exact. Returns the model, its point and the layer's new `LutMatMul` name when it is
    /// kept (the decision updated), `None` (and a line saying why) when not.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn try_variant(
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
    ) -> Result<Option<(Graph, PathPoint, String, LutLayers)>> {
        cx.check_cancel()?;
        let o = &self.0;
        let layer = decisions[i].layer.clone();
        let was_lut = decisions[i].chosen == "lut";
        let mut opts = self.lut_options(record);
        let entry = v.layer_override(&layer, &opts.layers);
        opts.layers.push(entry);
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
        if let Variant::Pixel(g) = v {
            if !crate::passes::lut::pixel_fits(&trial, &layer, g) {
                cx.say(bar, || {
                    format!("  mask: refine left {layer} as it was: pixel codebooks of {g} channels do not fit it (a conv larger than 1x1, {g} dividing its channels, at least 60 % of its taps on the image)")
                });
                return Ok(None);
            }
        }
        // the record this run makes names the layer's new lookups (the first run's, set aside
        // by `run`, stays the report's)
        cx.analyses.lut = None;
        Lut(opts).run(&mut trial, cx)?;
        let fitted = cx.analyses.lut.take();
        let found = fitted.and_then(|r| r.live_lut_of(&trial, &layer).map(str::to_string).map(|n| (n, r)));
        let Some((lut_name, fitted)) = found else {
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
                    "  mask: refine left {layer} as it was: {what} the target is not met ({})",
                    readings(&point)
                )
            });
            return Ok(None);
        }
        cx.say(bar, || {
            format!(
                "  mask: refine made {layer} lookups {what}: {}, {:.1} % removed",
                readings(&point),
                100.0 * point.reduction_everything_counted
            )
        });
        let d = &mut decisions[i];
        d.chosen = "lut";
        d.why = format!("kept as LUT {what} by refine, the target still met ({})", d.why);
        (d.lut_cost, d.est_speedup, d.ops_saved) = (cost, est, ops_saved);
        Ok(Some((trial, point, lut_name, fitted)))
    }
}

/// What the refine steps made: the model (`None` when they did not run), a point per layer
/// changed, the per-layer choices for the `lut` pass's `layers`, and how to undo each change.
#[derive(Default)]
pub(super) struct Refined {
    pub(super) model: Option<Graph>,
    pub(super) points: Vec<PathPoint>,
    pub(super) choices: Vec<crate::passes::lut::LayerOverride>,
    pub(super) steps: Vec<RefineStep>,
}

/// One change a refine step kept (or the relearning after them): the model before it and,
/// for a layer refitted, its index in the decisions and its decision before.
pub(super) struct RefineStep {
    pub(super) before: Graph,
    pub(super) change: Option<(usize, LayerDecision)>,
    /// What the step fitted the layer as ([`Variant::describe`]), or "relearned after refining".
    pub(super) what: String,
}

/// Each layer of `order` (decision indices) tried back as lookups: `trial(i, decisions, model)`
/// builds the model with it back (`model`: the last one kept, else `start`), kept when the
/// target still holds (its decision then says so: "put back {by}"). Returns the last model kept
/// (else `start`) and, per layer put back, its point and index ([`Back`]). `what` = (the
/// points' and progress lines' suffix, how the decision says it was put back).
#[allow(clippy::too_many_arguments)]
pub(super) fn try_back(
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
pub(super) struct Back {
    pub(super) model: Option<Graph>,
    pub(super) points: Vec<PathPoint>,
    pub(super) layers: Vec<usize>,
}

/// A point's readings for a progress line: its accuracy (with labels), logit cosine and
/// expected drop.
pub(super) fn readings(p: &PathPoint) -> String {
    let acc = p
        .accuracy
        .map(|a| format!("accuracy {:.2} %, ", 100.0 * a))
        .unwrap_or_default();
    format!(
        "{acc}logit cosine {:.5}, expected drop {:.2} points",
        p.logit_cosine, p.expected_drop
    )
}

/// The line of a refine trial whose lookups the time model prices slower than the old ones.
pub(super) fn slower_line(layer: &str, what: &str, est: f64, old_est: f64) -> String {
    format!(
        "  mask: refine left {layer} as it was: {what} its lookups would run slower ({:.2}x the exact layer's time against {:.2}x, time_model)",
        1.0 / est,
        1.0 / old_est
    )
}

/// What a refine trial fits a layer as.
#[derive(Clone, Copy)]
pub(super) enum Variant {
    /// Codebooks of this many values.
    Subspace(usize),
    /// The hash-tree encoder.
    Tree,
    /// Pixel codebooks of this many channels.
    Pixel(usize),
    /// Window codebooks (no pixel codebooks).
    Window,
    /// This many prototypes per codebook.
    Codes(usize),
}

/// The channels per codebook when `LutMatMul` node `lut` of `graph` reads the codes of pixel
/// codebooks, `None` when it does not.
fn pixel_channels(graph: &Graph, lut: &str) -> Option<usize> {
    let n = graph.find(lut)?;
    let codes = graph.inputs_of(n)[0];
    match &graph.node(codes.node).op {
        crate::ir::Op::PqEncode(p) if p.pixel => Some(p.subspace),
        _ => None,
    }
}

impl Variant {
    /// The `lut.layers` entry for `layer` fitted as this: the last of `entries` matching it
    /// (the user's settings for it), with this variant's setting changed.
    pub(super) fn layer_override(
        self,
        layer: &str,
        entries: &[crate::passes::lut::LayerOverride],
    ) -> crate::passes::lut::LayerOverride {
        let mut l = entries
            .iter()
            .rev()
            .find(|l| crate::passes::glob_match(&l.name, layer))
            .cloned()
            .unwrap_or(crate::passes::lut::LayerOverride {
                name: String::new(),
                encoder: None,
                subspace: None,
                pixel_subspace: None,
                k: None,
            });
        l.name = layer.to_string();
        match self {
            Variant::Subspace(s) => l.subspace = Some(s),
            Variant::Tree => l.encoder = Some(crate::passes::lut::EncoderChoice::Tree),
            Variant::Pixel(g) => l.pixel_subspace = Some(g),
            Variant::Window => l.pixel_subspace = Some(0),
            Variant::Codes(k) => l.k = Some(k),
        }
        l
    }
    pub(super) fn describe(self) -> String {
        match self {
            Variant::Subspace(s) => format!("over codebooks of {s}"),
            Variant::Tree => "with the tree encoder".into(),
            Variant::Pixel(g) => format!("over pixel codebooks of {g} channels"),
            Variant::Window => "over window codebooks".into(),
            Variant::Codes(k) => format!("with {k} codes per codebook"),
        }
    }
}
