//! What the `mask` pass reports: the path of measured points and each layer's decision.

use crate::ir::cost;
use serde::Serialize;

/// The `restored` label of the refine steps' last point when it is the model relearned after
/// them ([`MaskReport::refined`]).
pub const RELEARNED_AFTER_REFINING: &str = "(relearned after refining)";

/// The `restored` label of a confirmation point (suffix, after the layer's name) where a
/// refine step's change was undone: the layer back as it was before.
pub(super) const UNDO_REFINE: &str = " as before refine";

/// The `restored` label of a confirmation point where the relearning after refining was undone.
pub(super) const UNDO_RELEARN: &str = "(refined model, not relearned)";

/// The `restored` label of a confirmation point (suffix, after the layer's name) where a layer
/// restored to confirm was given back as lookups (`confirm_give_back`).
pub(super) const GIVEN_BACK: &str = " given back";

/// The `restored` label of a point of [`MaskReport::pruned_after_relearning`] that is the model
/// relearned after the layers before it were put back (`relearn_rounds`).
pub const RELEARNED_AGAIN: &str = "(relearned again)";

/// The `restored` label (prefix, before the number of restores kept) of a point of
/// [`MaskReport::relearned_path`]: the model relearned with the walk's first restores.
pub const RELEARNED_PREFIX: &str = "(relearned with the walk's first restores: ";

/// One point of the greedy path: after restoring `restored` layers.
#[derive(Clone, Debug, Serialize)]
pub struct PathPoint {
    pub restored: Option<String>,
    pub reduction_everything_counted: f64,
    pub reduction_lookups_only: f64,
    pub logit_cosine: f64,
    /// Top-1 points expected lost on the measured images, without labels ([`expected_drop`]).
    pub expected_drop: f64,
    /// One standard error of `expected_drop`, in points, as an estimate of the drop on new images.
    pub expected_drop_se: f64,
    /// Top-1 accuracy on the validation set (`correct` / its size), when there is one.
    pub accuracy: Option<f64>,
    /// Validation images classified correctly, when there is a validation set.
    pub correct: Option<usize>,
    /// One standard error of the accuracy drop against the exact model on the validation set,
    /// in points ([`drop_standard_error`]): how far the drop measured on these images may lie
    /// from the drop on new ones.
    pub drop_se: Option<f64>,
}

impl PathPoint {
    /// The expected drop with `margin` standard errors added: what an `expected_drop_margin`
    /// target holds to the budget.
    pub fn expected_drop_bound(&self, margin: f64) -> f64 {
        self.expected_drop + margin * self.expected_drop_se
    }
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
    /// With `relearn_path`: one point per prefix of the walk's restores relearned, in the order
    /// the bisection tried them (labelled [`RELEARNED_PREFIX`] and the prefix's length).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub relearned_path: Vec<PathPoint>,
    /// The model after relearning its tables, when it was kept (it replaced the chosen point;
    /// with `relearn_path`, the shortest prefix's relearned model that met the target).
    /// `None` without relearning or when relearning did not help (the chosen point was kept).
    pub final_point: Option<PathPoint>,
    /// With `prune`, after a relearned model was kept: a point per layer the walk restored that
    /// was then put back as lookups (each meeting the target), in order, and with
    /// `relearn_rounds` a point labelled [`RELEARNED_AGAIN`] per relearning kept between them;
    /// the last is the model the refine steps start from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pruned_after_relearning: Vec<PathPoint>,
    /// With `refine_pixel` / `coarsen_pixel` / `refine_encoder` / `refine_window` / `refine_k` /
    /// `refine_subspace`: a point per layer refitted (argmin lookups made pixel-codebook or tree
    /// lookups, exact layers made lookups over window codebooks, with more prototypes or over
    /// smaller codebooks), each meeting the target,
    /// in order, then (with `relearn`, when it is kept: no worse, target met) one for the model
    /// relearned through the final mix, `restored` "(relearned after refining)"; the last is
    /// the model kept (unless `confirmation` undid changes or restored layers after it:
    /// [`MaskReport::kept`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refined: Vec<PathPoint>,
    /// With `confirm`: the model the steps above chose, measured on the held-out images
    /// (validation images, or for an expected-drop target calibration images), and what that
    /// changed.
    pub confirmation: Option<Confirmation>,
    /// The point of the model written, [`MaskReport::kept`], for readers of the JSON report.
    pub kept_point: Option<PathPoint>,
}

/// The held-out check of an accuracy or expected-drop target (`confirm`). Every point above is
/// measured on the images the steps chose on (their count in `measured_on`); these points on the
/// held-out ones: for an accuracy target their accuracy on the held-out validation images (their
/// logit measures, as every point's, on the calibration images chosen on), for an expected-drop
/// target their logit measures on the held-out calibration images.
#[derive(Clone, Debug, Serialize)]
pub struct Confirmation {
    /// Images held out: validation images for an accuracy target, calibration images (measured
    /// on logits) for an expected-drop target.
    pub images: usize,
    /// The exact model's accuracy on them, when they are labelled.
    pub exact_accuracy: Option<f64>,
    /// The model the steps above kept, then one point per refine change undone and per layer
    /// restored because the target was missed on these images (`restored` names it), then
    /// (`confirm_give_back`) one per restored layer given back as lookups; the last is the model
    /// kept.
    pub points: Vec<PathPoint>,
    /// How many of the points after the first undid refine steps (they come first; then those
    /// that restored layers).
    pub undone: usize,
    /// How many of the last points gave a restored layer back as lookups (`confirm_give_back`).
    pub given_back: usize,
    /// When layers were restored: the model kept, measured on the images the rest chose on
    /// (what [`MaskReport::kept`] returns then).
    pub chosen_on: Option<PathPoint>,
}

impl MaskReport {
    /// The point of the model kept, on the images the pass chose on: after a
    /// confirmation that undid refine changes or restored layers, that model; else the last refine step (a layer
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

    /// The relearnings `relearn_rounds` kept between put-backs: the points of
    /// [`MaskReport::pruned_after_relearning`] labelled [`RELEARNED_AGAIN`] (the others are
    /// layers put back).
    pub fn relearned_again(&self) -> usize {
        self.pruned_after_relearning
            .iter()
            .filter(|p| p.restored.as_deref() == Some(RELEARNED_AGAIN))
            .count()
    }
}
