//! The held-out confirmation: the model the other steps chose measured on images none of them
//! saw, and while it misses the target there, refine steps undone and LUT layers restored.

use super::exact_in;
use super::meter::{best_point, Goal, Meter};
use super::refine::RefineStep;
use super::report::{Confirmation, LayerDecision, PathPoint, GIVEN_BACK, UNDO_REFINE, UNDO_RELEARN};
use super::walk::{confirm_order, most_saved_first, named};
use crate::error::Result;
use crate::ir::Graph;
use crate::passes::analysis::LutLayers;
use crate::passes::lut::ExactLayer;
use crate::passes::mask::{restore, Mask};
use crate::passes::PassCx;

impl Mask {
    /// With images held out to confirm (`confirm`: validation images for an accuracy target,
    /// measured calibration images for an expected-drop one): the model as chosen measured on
    /// them and, while it misses the target there, the refine steps' changes undone, latest
    /// first (each layer back as it was before, `refined`), then its LUT layers restored one at
    /// a time — first those in `undo` (the layers prune put back, latest first: the decisions made closest to
    /// the budget), then the others most damage per operation saved first (`force_lut` layers
    /// stay) — each measured on them; the
    /// model is left at the first point that meets the budget there. With `confirm_give_back`,
    /// the layers restored before the last are then tried as lookups again ([`Mask::give_back`]).
    /// Then, when layers were restored, the model kept measured on the images the rest chose on. A layer's lookups are
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
        let (start, mut restores): (Graph, Vec<Restore>) = (current.clone(), Vec::new());
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
            restores.push(Restore {
                lut: name.to_string(),
                exact: ex.clone(),
                decision: i,
                why: decisions[i].why.clone(),
            });
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
            *current = rebuilt(&start, &restores, |r| r < best)?;
            for r in &restores[best..] {
                decisions[r.decision].chosen = "lut";
                decisions[r.decision].why = format!("kept as LUT: restoring it to confirm did not help ({})", r.why);
            }
            points.truncate(undone + best + 1);
        }
        let mut given_back = 0;
        if self.0.confirm_give_back && restores.len() > 1 && meter.met_held_out(points.last().expect("one point")) {
            given_back = self.give_back(
                current,
                &start,
                &restores,
                meter,
                decisions,
                &mut points,
                cx,
                (n_held, kind),
            )?;
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
            given_back,
            chosen_on,
        }))
    }
}

/// A layer `confirm` restored.
struct Restore {
    /// Its `LutMatMul` node's name.
    lut: String,
    /// The exact layer put in its place.
    exact: ExactLayer,
    /// Its decision's index.
    decision: usize,
    /// The decision's reason before it was restored.
    why: String,
}

/// `start` with the restores `keep` names (by their index in `restores`) made again, in order.
fn rebuilt(start: &Graph, restores: &[Restore], keep: impl Fn(usize) -> bool) -> Result<Graph> {
    let mut g = start.clone();
    for (_, r) in restores.iter().enumerate().filter(|(i, _)| keep(*i)) {
        restore(&mut g, &r.lut, &r.exact)?;
    }
    Ok(g)
}

impl Mask {
    /// `confirm_give_back`, after restores made the model meet the target on the held-out images:
    /// each layer restored before the last, most operations saved first (ties in graph order),
    /// tried as lookups again (the model rebuilt from `start` with the other restores kept) and
    /// left so when the target still holds there. The fixed order restores layers that barely
    /// move the held-out reading (on the ResNet-18/16 one restore lowered it); this takes them
    /// back. It chooses on the held-out images, so their reading of the model kept is biased low
    /// as the others' is: only a test set tells. Returns how many were given back (their points
    /// pushed on `points`).
    #[allow(clippy::too_many_arguments)]
    fn give_back(
        &self,
        current: &mut Graph,
        start: &Graph,
        restores: &[Restore],
        meter: &Meter,
        decisions: &mut [LayerDecision],
        points: &mut Vec<PathPoint>,
        cx: &mut PassCx,
        (n_held, kind): (usize, &str),
    ) -> Result<usize> {
        let mut kept = vec![true; restores.len()];
        let tried: Vec<usize> = restores[..restores.len() - 1].iter().map(|r| r.decision).collect();
        let mut given = 0;
        for i in most_saved_first(tried, decisions) {
            let r = restores
                .iter()
                .position(|x| x.decision == i)
                .expect("one restore per decision");
            cx.check_cancel()?;
            kept[r] = false;
            let g = rebuilt(start, restores, |j| kept[j])?;
            let why = &restores[r].why;
            let layer = decisions[i].layer.clone();
            let p = meter.measure_held_out(&g, Some(format!("{layer}{GIVEN_BACK}")))?;
            let met = meter.met_held_out(&p);
            cx.say(&indicatif::ProgressBar::hidden(), || {
                let then = if met { "given back" } else { "stays exact" };
                held_line(meter, &format!("tried {layer} as lookups again"), &p) + ": " + then
            });
            if !met {
                kept[r] = true;
                continue;
            }
            let d = &mut decisions[i];
            d.chosen = "lut";
            d.why = format!(
                "restored to confirm, then given back: on the {n_held} held-out {kind} images {} without it ({why})",
                held_reading(meter, &p)
            );
            *current = g;
            points.push(p);
            given += 1;
        }
        Ok(given)
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
