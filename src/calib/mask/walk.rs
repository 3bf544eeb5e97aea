//! Each layer's damage alone, the greedy walk of restores and the prune that puts layers back.

use super::meter::{best_point, logits, mean_cosine, Meter};
use super::refine::{try_back, Back};
use super::report::{LayerDecision, PathPoint};
use super::time_model::layer_cost;
use super::with_exact;
use crate::error::Result;
use crate::ir::{Graph, Outlet};
use crate::passes::analysis::LutLayers;
use crate::passes::glob_match;
use crate::passes::mask::{put_back, restore, Mask};
use crate::passes::PassCx;

impl Mask {
    /// Each LUT layer alone as lookups (everything else exact): its damage to the logits, what
    /// it saves, and the estimated speed of its lookups against the exact layer.
    pub(super) fn layers_alone(
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
    pub(super) fn decide_first(
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
    pub(super) fn walk(
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
                format!(
                    "  mask: restored {} (rank {rank}): {}, {:.1} % removed",
                    decisions[i].layer,
                    super::refine::readings(&point),
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
    pub(super) fn prune(
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
}

/// The greedy path's result: its points, the graph of the chosen one and its index.
pub(super) struct Walk {
    pub(super) path: Vec<PathPoint>,
    pub(super) graph: Graph,
    pub(super) chosen_point: usize,
    /// The layers (decision indices) restored up to the chosen point.
    pub(super) restored: Vec<usize>,
}

/// Layers in greedy order: most damage per operation saved first (ties in graph order).
pub(super) fn greedy_order(decisions: &[LayerDecision]) -> Vec<usize> {
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
pub(super) fn confirm_order(decisions: &[LayerDecision], undo: &[usize]) -> Vec<usize> {
    let rest = greedy_order(decisions).into_iter().filter(|i| !undo.contains(i));
    undo.iter().copied().chain(rest).collect()
}

/// Layers `order` sorted by operations saved, most first (ties in graph order): the order
/// prune and refine try them in.
pub(super) fn most_saved_first(mut order: Vec<usize>, decisions: &[LayerDecision]) -> Vec<usize> {
    order.sort_by(|&a, &b| decisions[b].ops_saved.cmp(&decisions[a].ops_saved).then(a.cmp(&b)));
    order
}

/// Whether lookups that save `ops_saved` operations and run `est_speedup` times as fast as the
/// exact layer are not worth keeping (`restore_unprofitable`).
pub(super) fn unprofitable(ops_saved: i64, est_speedup: f64) -> bool {
    ops_saved <= 0 || est_speedup <= 1.0
}

/// Whether a layer list of the options (`*` wildcards) names the layer, by its MatMul or its
/// `LutMatMul` name.
pub(super) fn named(patterns: &[String], matmul: &str, lut: &str) -> bool {
    patterns.iter().any(|g| glob_match(g, matmul) || glob_match(g, lut))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirm_undoes_the_layers_put_back_first_latest_first() {
        let d = |damage: f64| LayerDecision {
            layer: format!("l{damage}"),
            kind: "conv".into(),
            shape: [9, 4],
            layer_cosine: 0.9,
            exact_macs: 100,
            lut_cost: crate::ir::cost::Cost::default(),
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
}
