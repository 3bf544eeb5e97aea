//! The `mask` pass's search (the pass, its options and its graph rewrites are
//! [`crate::passes::mask`]): priority masking. The `lut` pass approximated every eligible layer;
//! masking puts exact layers back where accuracy needs them, under a target:
//! - `min_logit_cosine`: mean per-image cosine similarity between the model's logits and the
//!   exact model's, on calibration images (unlabelled);
//! - `max_expected_drop`: top-1 points expected lost, unlabelled ([`expected_drop`]), plus
//!   `expected_drop_margin` standard errors of that reading (1 by default: the steps keep what
//!   reads within the budget on the same images, so the reading of the kept model is biased low);
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
//! its exact output, which often leaves room under the target). With `relearn_path`, those two
//! steps give way, when it finds one, to the shortest prefix of the walk's restores whose
//! relearned model meets the target (a bisection, one `lut` run per probe). Then, when
//! asked, refine steps fit single layers again through the model as it stands and keep each
//! change that leaves the target met: `refine_pixel` (argmin lookups → lookups over pixel
//! codebooks), `coarsen_pixel` (pixel lookups → pixel lookups over more channels, fewer
//! lookups), `refine_encoder` (argmin lookups → hash-tree lookups), `refine_window`,
//! `refine_k` (exact layers → lookups with more prototypes per codebook), then
//! `refine_subspace` (exact layers → lookups over smaller codebooks).
//! `keep_exact` / `force_lut` (node names, `*` wildcards) override the choice.
//! With `max_accuracy_drop`, `confirm` (0.5 by default) holds a fraction of the validation
//! images out of all of that: every step chooses on the others, and a step is taken when it
//! looks good there, so the kept model's drop on them is biased low. The kept model is measured
//! once on the held-out images and, while its drop there exceeds the budget, its LUT layers are
//! restored — first those prune put back, latest first, then most damage per operation saved
//! first — each measured there ([`Confirmation`]); with `confirm_give_back`, each layer restored
//! before the last is then tried as lookups again and left so where the target still holds
//! there. With `max_expected_drop` it holds out a
//! fraction of the measured calibration images the same way, when one image there weighs at
//! most half the budget ([`confirms_expected_drop`]: 400 images for 0.5).
//! `max_accuracy_drop`, `target_reduction` or `max_expected_drop`, when given, take precedence
//! over `min_logit_cosine` (the default pipeline's target).
//!
//! The calibration images measured on are [`PassCx::holdout`] when the compile set some aside
//! (it does when the pipeline learns tables before masking), so the tables were not fitted to
//! them — except, for an expected-drop target whose held-out quarter of `--calib` is too few
//! to confirm on ([`Options::confirms_on`]), the images learned on just before it that the
//! compile lends the measures, up to `LEND_TO` in all ([`PassCx::holdout_learned`]; the
//! confirmation holds the unseen ones out first); otherwise the first `samples` of
//! [`PassCx::calib`] (`Options::measured_samples`).

mod confirm;
mod meter;
mod refine;
mod relearn;
mod report;
mod time_model;
mod walk;

use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::passes::analysis::LutLayers;
use crate::passes::lut::ExactLayer;
use crate::passes::mask::{restore, Mask, Options};
use crate::passes::PassCx;
use meter::{Goal, Meter};
use ndarray::{ArrayD, Axis};
use refine::Back;
use relearn::Stage;

pub use meter::{best_point, confirm_split, confirms_expected_drop, drop_standard_error, within_drop, DROP_TOLERANCE};
pub use report::{
    Confirmation, LayerDecision, MaskReport, PathPoint, RELEARNED_AFTER_REFINING, RELEARNED_AGAIN, RELEARNED_PREFIX,
};
pub use time_model::TimeModel;

impl Mask {
    pub(crate) fn mask(&self, graph: &mut Graph, cx: &mut PassCx, record: &LutLayers) -> Result<()> {
        let o = &self.0;
        check_ranges(o)?;
        let luts = record.live(graph);
        if luts.is_empty() {
            cx.notes
                .push("mask: no LUT layers to mask (run the lut pass first)".into());
            return Ok(());
        }
        let (samples, logit_images, learned, measured_most) = measured_images(cx, o)?;
        check_targets(o, cx.val.is_some())?;
        let names: Vec<&str> = luts
            .iter()
            .flat_map(|n| [n.as_str(), record.exact(n).map_or(n.as_str(), |e| e.matmul.as_str())])
            .collect();
        for (list, patterns) in [("keep_exact", &o.keep_exact), ("force_lut", &o.force_lut)] {
            for p in crate::passes::unmatched(patterns.iter().map(String::as_str), &names) {
                cx.notes
                    .push(format!("mask: the {list} entry {p:?} names no LUT layer"));
            }
        }
        // the exact reference: every layer restored
        let mut exact = with_exact(graph, record, &luts)?;
        crate::ir::infer::infer_graph(&mut exact)?;
        let meter = Meter::new(Goal::of(o), &exact, samples, learned, cx.val.clone(), o.confirm)?;
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
        // relearn_path: the shortest prefix of the walk's restores that meets the target once
        // relearned replaces prune's put-backs and the relearning of the walk's choice
        let searched = self.relearn_path(&exact, &walk, &mut decisions, record, &meter, cx)?;
        let (pruned, current, final_point) = match searched.kept {
            Some((relearned, p)) => (Back::default(), relearned, Some(p)),
            None => {
                let mut pruned = self.prune(None, graph, cx, record, &luts, &meter, &mut decisions, &walk)?;
                let chosen = pruned.points.last().unwrap_or(&walk.path[walk.chosen_point]);
                match self.relearn(&exact, chosen, &decisions, record, &meter, cx, Stage::Chosen)? {
                    Some((relearned, p)) => (pruned, relearned, Some(p)),
                    None => {
                        let model = pruned.model.take().unwrap_or_else(|| walk.graph.clone());
                        (pruned, model, None)
                    }
                }
            }
        };
        let chosen = pruned.points.last().unwrap_or(&walk.path[walk.chosen_point]);
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
        let steps = match (o.refine_pixel > 0
            || o.coarsen_pixel > 0
            || o.refine_window
            || o.refine_encoder
            || o.refine_k > 0
            || o.refine_subspace > 0)
            && meter.met(kept)
        {
            true => self.refine(current.clone(), &luts, &mut decisions, record, &meter, cx)?,
            false => refine::Refined::default(),
        };
        let (mut current, mut refined, choices) = (steps.model.unwrap_or(current), steps.points, steps.choices);
        let mut refine_steps = steps.steps;
        if let Some(last) = refined.last().cloned() {
            // the refined layers' new lookups were fitted through the others as they stood;
            // relearn all of them through the final mix
            if let Some((g, p)) =
                self.relearn(&exact, &last, &decisions, record, &meter, cx, Stage::Refined(&choices))?
            {
                // the confirmation undoes the relearning first: a step of its own
                refine_steps.push(refine::RefineStep {
                    before: std::mem::replace(&mut current, g),
                    change: None,
                    what: "relearned after refining".into(),
                });
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
        let confirmation = self.confirm(
            &mut current,
            cx,
            record,
            &luts,
            &meter,
            &mut decisions,
            (refine_steps, &undo),
        )?;
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
            relearned_path: searched.probes,
            final_point,
            pruned_after_relearning: again.points,
            refined,
            confirmation,
            kept_point: None,
        };
        report.kept_point = Some(report.kept().clone());
        cx.notes
            .extend(reading_notes(&report, &meter, o, &logit_images, measured_most));
        cx.mask = Some(report);
        Ok(())
    }
}

/// Notes on how well the kept model's last reading (on the held-out images when it was
/// confirmed) pins the budget: a standard error large against it, an expected drop not
/// confirmed. `samples`: the most images the target measures on these images.
fn reading_notes(report: &MaskReport, meter: &Meter, o: &Options, logit_images: &str, samples: usize) -> Vec<String> {
    let kept = report.kept();
    let (last, held) = match &report.confirmation {
        Some(c) => (c.points.last().unwrap_or(kept), Some(c.images)),
        None => (kept, None),
    };
    match meter.goal {
        Goal::Accuracy(budget) => {
            let (n, on) = held.map_or((meter.n_val(), ""), |n| (n, " held-out"));
            last.drop_se
                .filter(|&se| se > budget / 2.0)
                .map(|se| format!(
                    "mask: the accuracy drop is measured on {n}{on} validation images, with a standard error of {se:.2} points for the kept model: the {budget}-point budget may not hold on new images (more validation images narrow it)"
                ))
                .into_iter()
                .collect()
        }
        Goal::ExpectedDrop { drop, margin, .. } => {
            let on = held.map_or(logit_images.to_string(), |n| {
                format!("{n} calibration images held out to confirm")
            });
            let unconfirmed = o.confirm > 0.0 && held.is_none();
            let se = last.expected_drop_se;
            if se <= drop / 4.0 && !unconfirmed {
                return Vec::new();
            }
            vec![format!(
                "mask: the expected drop is read on {on}, with a standard error of {se:.2} points for the kept model ({margin} of them added before holding it to the {drop}-point budget){}; more images measured narrow it (the mask measures the last quarter of --calib, held out of learning, up to {samples} images (mask.samples); when that is too few to confirm on, it borrows the images learned on last, at least {} in all)",
                if unconfirmed {
                    ", not confirmed on a held-out share (too few images: one would weigh more than half the budget there; 200/budget needed)"
                } else {
                    ""
                },
                crate::passes::mask::LEND_TO
            )]
        }
        _ => Vec::new(),
    }
}

fn check_ranges(o: &Options) -> Result<()> {
    for (name, v, range) in [
        ("min_logit_cosine", o.min_logit_cosine, -1.0..=1.0),
        ("max_accuracy_drop", o.max_accuracy_drop, 0.0..=100.0),
        ("max_expected_drop", o.max_expected_drop, 0.0..=100.0),
        ("expected_drop_margin", Some(o.expected_drop_margin), 0.0..=10.0),
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
    if o.refine_k != 0 && !crate::passes::lut::k_fits(o.refine_k, true) {
        return Err(Error::Input(format!(
            "mask.refine_k = {}: must be 0 (off) or a power of two in 2..=256 (the tree encoder's prototypes)",
            o.refine_k
        )));
    }
    if !(0.0..1.0).contains(&o.confirm) {
        return Err(Error::Input(format!(
            "mask.confirm = {}: must be within 0..1 (the fraction of --val, or of the measured calibration images, held out to confirm; 0 = off)",
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
/// set some aside, else the ones learned on, at most `samples` —, how the report names them,
/// how many of them (the first) were also learned on when the held-out ones are a mix
/// ([`PassCx::holdout_learned`]; 0 otherwise), and the most the target measures.
fn measured_images(cx: &PassCx, o: &Options) -> Result<(ArrayD<f32>, String, usize, usize)> {
    let held_out = cx.holdout.is_some();
    let calib = cx
        .holdout
        .as_ref()
        .or(cx.calib.as_ref())
        .ok_or_else(|| Error::Input("the mask pass measures on --calib images".into()))?;
    let len = calib.shape()[0];
    let values = calib.len() / len.max(1);
    let most = o.measured_samples(values).max(1);
    let n = len.min(most);
    // held-out images: the last (those learned on come first); else the first of --calib
    let first = if held_out { len - n } else { 0 };
    let samples = calib.select(Axis(0), &(first..first + n).collect::<Vec<_>>());
    let learned = if held_out {
        cx.holdout_learned.saturating_sub(first).min(n)
    } else {
        0
    };
    let logit_images = match (held_out, learned) {
        (false, _) => format!("{n} calibration images (learned on)"),
        (true, 0) => format!("{n} held-out calibration images"),
        (true, l) => format!("{n} calibration images, {l} of them also learned on"),
    };
    Ok((samples, logit_images, learned, most))
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
        (Goal::ExpectedDrop { .. }, ..) => match meter.held_out_images() {
            Some((n, _)) => format!(
                "{} of the {logit_images} (the other {n} held out to confirm)",
                meter.n_samples()
            ),
            None => logit_images.to_string(),
        },
        _ => logit_images.to_string(),
    }
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
