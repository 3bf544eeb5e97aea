//! Relearning the tables through the chosen mix, and the held-out confirmation.

use super::exact_in;
use super::meter::{best_point, Goal, Meter};
use super::refine::RefineStep;
use super::report::{
    Confirmation, LayerDecision, PathPoint, RELEARNED_AFTER_REFINING, RELEARNED_AGAIN, RELEARNED_PREFIX, UNDO_REFINE,
    UNDO_RELEARN,
};
use super::walk::{confirm_order, named, Walk};
use crate::error::Result;
use crate::ir::Graph;
use crate::passes::analysis::LutLayers;
use crate::passes::lut::Lut;
use crate::passes::mask::{restore, Mask};
use crate::passes::{Pass, PassCx};

impl Mask {
    /// With `relearn`: the tables of the layers left as lookups learned again through the
    /// chosen mix of exact and LUT layers (the `lut` pass re-run on the exact model with the
    /// restored layers kept exact; after refining, the refined layers fitted as the refine steps
    /// chose), and its point — unless it is worse than the `chosen` point on the target's
    /// metric, or (after put-backs or refining) misses the target: then `None` and a note, and
    /// the model before it stays.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn relearn(
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

impl Mask {
    /// With `relearn_path` (and `relearn`), when the walk's chosen point meets the target: the
    /// shortest prefix of the walk's restores whose relearned model meets it, found by bisection
    /// over the prefix lengths shorter than the walk's (0 up to one less than the restores made;
    /// the walk's own choice is relearned by the usual step when no shorter prefix meets it).
    /// Each probe relearns the tables with that prefix (and the layers decided exact before the
    /// walk) kept exact — one `lut` run, its global stage included — and measures the model
    /// (`probes`, in order). The walk ranks layers by their damage through lookups fitted to the
    /// all-LUT prefix; a global stage co-adapts the lookups, and relearning through a mix refits
    /// the layers after a restore, so fewer restores often meet the target once relearned.
    /// Returns the probes and, when one with fewer restores than the walk's met the target, the
    /// shortest such model and its point; the restores after that prefix are then decided as
    /// lookups (the lut record of that probe, and its global stage's report, left in `cx`).
    /// Assumes the relearned quality grows with the prefix, as bisection does: a prefix it
    /// skips may meet the target too.
    pub(super) fn relearn_path(
        &self,
        exact: &Graph,
        walk: &Walk,
        decisions: &mut [LayerDecision],
        record: &LutLayers,
        meter: &Meter,
        cx: &mut PassCx,
    ) -> Result<PathSearch> {
        let o = &self.0;
        let restores = walk.restored.len();
        if !(o.relearn && o.relearn_path) || restores == 0 || !meter.met(&walk.path[walk.chosen_point]) {
            return Ok(PathSearch::default());
        }
        // layers exact before the walk: overrides, and (restore_unprofitable) those priced slower
        let before: Vec<String> = decisions
            .iter()
            .enumerate()
            .filter(|(i, d)| d.chosen == "exact" && !walk.restored.contains(i))
            .map(|(_, d)| d.layer.clone())
            .collect();
        let (prior, prior_global) = (cx.analyses.lut.take(), cx.global.take());
        let (mut lo, mut hi) = (0, restores);
        let (mut probes, mut best) = (Vec::new(), None);
        let bar = crate::cli::progress(restores.ilog2() as usize + 1, "mask relearn_path");
        while lo < hi {
            cx.check_cancel()?;
            bar.inc(1);
            let mid = (lo + hi) / 2;
            let mut opts = self.lut_options(record);
            opts.keep_exact.extend(before.iter().cloned());
            opts.keep_exact
                .extend(walk.restored[..mid].iter().map(|&i| decisions[i].layer.clone()));
            let mut relearned = exact.clone();
            cx.analyses.lut = None;
            Lut(opts).run(&mut relearned, cx)?;
            let p = meter.measure(&relearned, Some(format!("{RELEARNED_PREFIX}{mid})")))?;
            cx.say(&bar, || {
                format!(
                    "  mask: relearned with the walk's first {mid} of {restores} restores: {}, {:.1} % removed",
                    super::refine::readings(&p),
                    100.0 * p.reduction_everything_counted
                )
            });
            probes.push(p.clone());
            // each probe's record and global stage: the kept one's stay
            let (rec, global) = (cx.analyses.lut.take(), cx.global.take());
            if meter.met(&p) {
                hi = mid;
                best = Some((relearned, p, mid, rec, global));
            } else {
                lo = mid + 1;
            }
        }
        bar.finish_and_clear();
        let Some((graph, point, prefix, rec, global)) = best else {
            (cx.analyses.lut, cx.global) = (prior, prior_global);
            return Ok(PathSearch { probes, kept: None });
        };
        (cx.analyses.lut, cx.global) = (rec, global.or(prior_global));
        for &i in &walk.restored[prefix..] {
            let d = &mut decisions[i];
            d.chosen = "lut";
            d.why = format!(
                "kept as LUT: relearned with the walk's first {prefix} of {restores} restores, the target holds without restoring it (relearn_path; the walk had {})",
                d.why.trim_start_matches("restored: ")
            );
        }
        Ok(PathSearch {
            probes,
            kept: Some((graph, point)),
        })
    }
}

/// What [`Mask::relearn_path`] found: a point per probe, and the model kept with its point.
#[derive(Default)]
pub(super) struct PathSearch {
    pub(super) probes: Vec<PathPoint>,
    pub(super) kept: Option<(Graph, PathPoint)>,
}

/// Which model [`Mask::relearn`] relearns.
#[derive(Clone, Copy)]
pub(super) enum Stage<'a> {
    /// The model the walk and prune chose.
    Chosen,
    /// The relearned model with layers put back (`relearn_rounds`).
    Again,
    /// The model after the refine steps, with the per-layer choices they made.
    Refined(&'a [crate::passes::lut::LayerOverride]),
}

impl Mask {
    /// With images held out to confirm (`confirm`: validation images for an accuracy target,
    /// measured calibration images for an expected-drop one): the model as chosen measured on
    /// them and, while it misses the target there, the refine steps' changes undone, latest
    /// first (each layer back as it was before, `refined`), then its LUT layers restored one at
    /// a time — first those in `undo` (the layers prune put back, latest first: the decisions made closest to
    /// the budget), then the others most damage per operation saved first (`force_lut` layers
    /// stay) — each measured on them; the
    /// model is left at the first point that meets the budget there. Then, when layers were
    /// restored, the model kept measured on the images the rest chose on. A layer's lookups are
    /// found by the record of the last `lut` run over the whole model (a relearn's, else the
    /// first's); a layer whose live lookups neither names (refined, not relearned) stays as it is.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn confirm(
        &self,
        current: &mut Graph,
        cx: &mut PassCx,
        record: &LutLayers,
        luts: &[String],
        meter: &Meter,
        decisions: &mut [LayerDecision],
        (refined, undo): (Vec<RefineStep>, &[usize]),
    ) -> Result<Option<Confirmation>> {
        let Some((n_held, kind)) = meter.held_out_images() else {
            return Ok(None);
        };
        let mut points = vec![meter.measure_held_out(current, None)?];
        let undone = undo_refined(current, cx, meter, decisions, refined, &mut points, (n_held, kind))?;
        // the model as chosen (or as before refine) and the restores made, to go back to the
        // best point
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
            cx.say(&bar, || held_line(meter, &format!("restored {}", d.layer), &p));
            let d = &mut decisions[i];
            d.chosen = "exact";
            d.why = format!(
                "restored to confirm: on the {n_held} held-out {kind} images {} ({}; {})",
                held_reading(meter, &was),
                meter.goal.target(),
                d.why
            );
            points.push(p);
        }
        bar.finish_and_clear();
        cx.analyses.lut = relearned;
        if !meter.met_held_out(points.last().expect("one point")) {
            // as in the walk: a restore can make the model worse, so keep the best point there
            // (from the model the restores started on: refine's undone changes stay undone)
            let best = best_point(&points[undone..], |p| meter.met_held_out(p), |p| meter.quality(p));
            cx.notes.push(format!(
                "mask: on the {n_held} held-out {kind} images the model misses the target ({}) with every layer confirm could restore restored (force_lut, or lookups no lut record names, keep the rest); kept the best of those points ({} restored)",
                meter.goal.target(),
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
            points.truncate(undone + best + 1);
        }
        let chosen_on = match points.len() {
            1 => None,
            n => Some(meter.measure(current, Some(format!("(after {} step(s) to confirm)", n - 1)))?),
        };
        if let Some(p) = chosen_on.as_ref().filter(|p| !meter.met(p)) {
            cx.notes.push(format!(
                "mask: after the steps to confirm, the model misses the target on the {kind} images chosen on ({})",
                reading(meter.goal, p, meter.exact_correct().map(|c| meter.accuracy(c)))
            ));
        }
        Ok(Some(Confirmation {
            images: n_held,
            exact_accuracy: meter.held_out.as_ref().map(|h| h.accuracy(h.exact_correct())),
            points,
            undone,
            chosen_on,
        }))
    }
}

/// The confirmation's first steps: while the model misses the target on the held-out images,
/// the refine steps' changes undone, latest first (each layer back as it was before, its
/// decision with it), each measured there (`points`). Returns how many were undone.
fn undo_refined(
    current: &mut Graph,
    cx: &mut PassCx,
    meter: &Meter,
    decisions: &mut [LayerDecision],
    refined: Vec<RefineStep>,
    points: &mut Vec<PathPoint>,
    (n_held, kind): (usize, &str),
) -> Result<usize> {
    let mut undone = 0;
    for step in refined.into_iter().rev() {
        cx.check_cancel()?;
        let was = points.last().expect("starts with one point").clone();
        if meter.met_held_out(&was) {
            break;
        }
        *current = step.before;
        let Some((i, decision)) = step.change else {
            // the relearning after refining, undone alone
            let p = meter.measure_held_out(current, Some(UNDO_RELEARN.into()))?;
            cx.say(&indicatif::ProgressBar::hidden(), || {
                held_line(meter, "undid the relearning after refining", &p)
            });
            points.push(p);
            undone += 1;
            continue;
        };
        let layer = decision.layer.clone();
        let p = meter.measure_held_out(current, Some(format!("{layer}{UNDO_REFINE}")))?;
        cx.say(&indicatif::ProgressBar::hidden(), || {
            held_line(meter, &format!("put {layer} back as before refine ({})", step.what), &p)
        });
        let d = &mut decisions[i];
        *d = decision;
        d.why = format!(
            "{} (refined {} and undone to confirm: on the {n_held} held-out {kind} images {})",
            d.why,
            step.what,
            held_reading(meter, &was)
        );
        points.push(p);
        undone += 1;
    }
    Ok(undone)
}

/// The progress line of a confirmation step: what it did, and its point on the held-out images.
fn held_line(meter: &Meter, did: &str, p: &PathPoint) -> String {
    format!(
        "  mask: {did} to confirm: {} on the held-out images, {:.1} % removed",
        held_reading(meter, p),
        100.0 * p.reduction_everything_counted
    )
}

/// What a point measured on the held-out images reads on the target's metric, for a note.
fn held_reading(meter: &Meter, p: &PathPoint) -> String {
    reading(
        meter.goal,
        p,
        meter.held_out.as_ref().map(|h| h.accuracy(h.exact_correct())),
    )
}

/// What `p` reads on the target's metric: its accuracy against the exact model's (`exact`, on
/// the same images), else its expected drop.
fn reading(goal: Goal, p: &PathPoint, exact: Option<f64>) -> String {
    match (goal, p.accuracy, exact) {
        (Goal::Accuracy(_), Some(a), Some(e)) => {
            format!("accuracy {:.2}% against the exact model's {:.2}%", 100.0 * a, 100.0 * e)
        }
        (Goal::Accuracy(_), Some(a), None) => format!("accuracy {:.2}%", 100.0 * a),
        _ => format!(
            "expected drop {:.2} ± {:.2} points, logit cosine {:.5}",
            p.expected_drop, p.expected_drop_se, p.logit_cosine
        ),
    }
}
