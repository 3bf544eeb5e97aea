//! Relearning the tables through the chosen mix.

use super::meter::Meter;
use super::report::{LayerDecision, PathPoint, RELEARNED_AFTER_REFINING, RELEARNED_AGAIN, RELEARNED_PREFIX};
use super::walk::Walk;
use crate::error::Result;
use crate::ir::Graph;
use crate::passes::analysis::LutLayers;
use crate::passes::lut::Lut;
use crate::passes::mask::Mask;
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
