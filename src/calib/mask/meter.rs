//! Measuring a model against the target: metrics, validation sets, the points of the path.

use super::report::PathPoint;
use crate::error::{Error, Result};
use crate::ir::{cost, Graph, Tensor};
use crate::passes::mask::Options;
use ndarray::{ArrayD, Axis};

/// The target the options ask for, by precedence: `max_accuracy_drop`, `target_reduction`,
/// `max_expected_drop` (with `min_logit_cosine` when given, and `expected_drop_margin`), else
/// `min_logit_cosine` (0.99 when absent).
#[derive(Clone, Copy, Debug)]
pub(super) enum Goal {
    Accuracy(f64),
    Reduction(f64),
    /// At most this many points expected lost, plus `margin` standard errors of that estimate
    /// ([`PathPoint::expected_drop_bound`]); with a logit cosine floor when given.
    ExpectedDrop {
        drop: f64,
        cosine: Option<f64>,
        margin: f64,
    },
    Cosine(f64),
}

impl Goal {
    pub(super) fn of(o: &Options) -> Goal {
        match (o.max_accuracy_drop, o.target_reduction, o.max_expected_drop) {
            (Some(d), ..) => Goal::Accuracy(d),
            (_, Some(t), _) => Goal::Reduction(t),
            (_, _, Some(e)) => Goal::ExpectedDrop {
                drop: e,
                cosine: o.min_logit_cosine,
                margin: o.expected_drop_margin,
            },
            _ => Goal::Cosine(o.min_logit_cosine.unwrap_or(0.99)),
        }
    }

    /// The metric the target is on, higher is better: images right, expected drop (negated)
    /// or logit similarity.
    pub(super) fn quality(self, p: &PathPoint) -> f64 {
        match self {
            Goal::Accuracy(_) => p.correct.map_or(p.logit_cosine, |c| c as f64),
            Goal::ExpectedDrop { margin, .. } => -p.expected_drop_bound(margin),
            Goal::Reduction(_) | Goal::Cosine(_) => p.logit_cosine,
        }
    }

    /// Whether `p` meets a target read on logits alone (an accuracy target needs the
    /// validation set: [`Meter::met`]; a reduction target is never "met").
    pub(super) fn met_on_logits(self, p: &PathPoint) -> bool {
        match self {
            Goal::Accuracy(_) | Goal::Reduction(_) => false,
            Goal::ExpectedDrop { drop, cosine, margin } => {
                p.expected_drop_bound(margin) <= drop && cosine.is_none_or(|c| p.logit_cosine >= c)
            }
            Goal::Cosine(c) => p.logit_cosine >= c,
        }
    }

    pub(super) fn metric(self) -> &'static str {
        match self {
            Goal::Accuracy(_) => "accuracy",
            Goal::ExpectedDrop { .. } => "expected_drop",
            Goal::Reduction(_) | Goal::Cosine(_) => "logit_cosine",
        }
    }

    pub(super) fn target(self) -> String {
        match self {
            Goal::Accuracy(d) => format!("max_accuracy_drop {d} points"),
            Goal::Reduction(t) => format!("target_reduction {t}"),
            Goal::ExpectedDrop { drop, cosine, margin } => {
                let margin = match margin {
                    0.0 => String::new(),
                    m => format!(" ({m} standard error(s) of margin)"),
                };
                match cosine {
                    Some(c) => format!("max_expected_drop {drop} points{margin} and min_logit_cosine {c}"),
                    None => format!("max_expected_drop {drop} points{margin}"),
                }
            }
            Goal::Cosine(c) => format!("min_logit_cosine {c}"),
        }
    }

    /// `p` against `q` on this metric, for a note: its name and the two values.
    pub(super) fn compare(self, p: &PathPoint, q: &PathPoint) -> (&'static str, String) {
        match (self, p.accuracy, q.accuracy) {
            (Goal::Accuracy(_), Some(a), Some(b)) => ("accuracy", format!("{:.2}% vs {:.2}%", a * 100.0, b * 100.0)),
            (Goal::ExpectedDrop { .. }, ..) => (
                "expected drop",
                format!(
                    "{:.2} ± {:.2} vs {:.2} ± {:.2} points",
                    p.expected_drop, p.expected_drop_se, q.expected_drop, q.expected_drop_se
                ),
            ),
            _ => (
                "logit cosine",
                format!("{:.5} vs {:.5}", p.logit_cosine, q.logit_cosine),
            ),
        }
    }
}

/// The first output of `graph` for images `x` (run as [`crate::calib::plan`] leaves it).
pub(super) fn logits(graph: &Graph, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    let plan = crate::calib::output_plan(graph)?;
    let mut parts = Vec::new();
    for chunk in x.axis_chunks_iter(Axis(0), 64) {
        parts.push(plan.run(vec![Tensor::F32(chunk.to_owned())])?.remove(0).into_f32()?);
    }
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    ndarray::concatenate(Axis(0), &views).map_err(|e| Error::Other(e.to_string()))
}

/// Mean over images of the cosine between their logit vectors.
pub(super) fn mean_cosine(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
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
///
/// Returned with one standard error of it, in points, as an estimate of the drop expected on
/// new images of the same kind: the standard deviation of the per-image losses
/// (each image's probability moved off the exact model's top class, 0 where the two models
/// agree) over `sqrt(n)`. With few images it is large: on sets of 256 training images it had
/// never seen, a compiled ResNet-18/16 fixture's expected drop read 0.40–2.06 points, 0.89 on
/// average with a standard deviation of 0.38.
pub(super) fn expected_drop(a: &ArrayD<f32>, b: &ArrayD<f32>) -> (f64, f64) {
    let n = a.shape()[0].max(1);
    let per = a.len() / n;
    if per == 0 {
        return (0.0, 0.0);
    }
    let (a, b) = (a.as_standard_layout(), b.as_standard_layout());
    let (a, b) = (a.as_slice().unwrap(), b.as_slice().unwrap());
    let probabilities = a
        .chunks(per)
        .all(|r| r.iter().all(|&v| (0.0..=1.0).contains(&v)) && (r.iter().sum::<f32>() - 1.0).abs() < 1e-3);
    let argmax = |r: &[f32]| (0..r.len()).fold(0, |m, j| if r[j] > r[m] { j } else { m });
    let (mut lost, mut squares) = (0.0, 0.0);
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
        let l = p(ia) - p(ib);
        lost += l;
        squares += l * l;
    }
    let (nf, mean) = (n as f64, lost / n as f64);
    let var = (squares / nf - mean * mean).max(0.0);
    (100.0 * mean, 100.0 * (var / nf).sqrt())
}

/// Per validation image, whether `graph` classifies it correctly.
pub(super) fn right(graph: &Graph, x: &ArrayD<f32>, labels: &[i64]) -> Result<Vec<bool>> {
    let out = logits(graph, x)?;
    let pred = crate::model::argmax_rows(&out);
    Ok(pred.iter().zip(labels).map(|(p, l)| p == l).collect())
}

/// Images classified correctly, of per-image results from [`right`].
pub(super) fn count_right(right: &[bool]) -> usize {
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

/// What every point of the masking path is measured against: the target, the source model's
/// arithmetic, the exact model's logits on the measured images, the validation images chosen on
/// and those held out to confirm the choice (`confirm`).
pub(super) struct Meter {
    pub(super) goal: Goal,
    pub(super) source: cost::Cost,
    pub(super) samples: ArrayD<f32>,
    pub(super) ref_logits: ArrayD<f32>,
    pub(super) val: Option<Labelled>,
    pub(super) held_out: Option<Labelled>,
    /// For an expected-drop target with `confirm`: the measured calibration images held out of
    /// every choice, and the exact model's logits on them.
    pub(super) held_logits: Option<(ArrayD<f32>, ArrayD<f32>)>,
}

/// Labelled images and, per image, whether the exact model classifies it correctly.
pub(super) struct Labelled {
    pub(super) x: ArrayD<f32>,
    pub(super) labels: Vec<i64>,
    pub(super) exact_right: Vec<bool>,
}

impl Labelled {
    pub(super) fn new(exact: &Graph, (x, labels): (ArrayD<f32>, Vec<i64>)) -> Result<Labelled> {
        let exact_right = right(exact, &x, &labels)?;
        Ok(Labelled { x, labels, exact_right })
    }

    pub(super) fn n(&self) -> usize {
        self.labels.len()
    }

    /// Images the exact model classifies correctly.
    pub(super) fn exact_correct(&self) -> usize {
        count_right(&self.exact_right)
    }

    /// `g`'s images right, accuracy and drop standard error against the exact model.
    pub(super) fn score(&self, g: &Graph) -> Result<(usize, f64, f64)> {
        let r = right(g, &self.x, &self.labels)?;
        let correct = count_right(&r);
        Ok((
            correct,
            self.accuracy(correct),
            drop_standard_error(&self.exact_right, &r),
        ))
    }

    /// The accuracy of `correct` of these images right.
    pub(super) fn accuracy(&self, correct: usize) -> f64 {
        correct as f64 / self.n().max(1) as f64
    }

    pub(super) fn within(&self, p: &PathPoint, drop: f64) -> bool {
        within_drop(self.exact_correct(), p.correct.unwrap_or(0), self.n(), drop)
    }
}

/// Whether an expected-drop target of `drop` points measured on `n` images holds a `fraction`
/// of them out to confirm: only when one image's loss weighs at most half the budget there
/// (`drop / 2` points: 400 held-out images for 0.5). On fewer, a single image the model gets
/// less sure of decides the confirmation, which then restores layers one after another until
/// that image alone turns back (ResNet-18 w64 with 128 held out: 9 layers, 59.5 → 36.4 %
/// removed, for one image).
pub fn confirms_expected_drop(n: usize, fraction: f64, drop: f64) -> bool {
    split_rows(n, fraction).is_some_and(|(_, held)| weighs_little(held.len(), drop))
}

/// Whether one image of `held` weighs at most half of a `drop`-point budget.
fn weighs_little(held: usize, drop: f64) -> bool {
    100.0 / held as f64 <= drop / 2.0
}

/// The rows of `n` images chosen on and those held out to confirm ([`confirm_split`]), when
/// `fraction` leaves some in both.
fn split_rows(n: usize, fraction: f64) -> Option<(Vec<usize>, Vec<usize>)> {
    if fraction <= 0.0 {
        return None;
    }
    let (chosen, held) = chosen_and_held(&confirm_split(n, fraction));
    (!chosen.is_empty() && !held.is_empty()).then_some((chosen, held))
}

/// The rows not flagged (chosen on) and those flagged (held out).
fn chosen_and_held(held: &[bool]) -> (Vec<usize>, Vec<usize>) {
    let (h, c): (Vec<usize>, Vec<usize>) = (0..held.len()).partition(|&i| held[i]);
    (c, h)
}

/// [`split_rows`] for measured images whose first `learned` were also learned on: as many held
/// out to confirm, the images no table saw first (spread evenly through them), then images
/// learned on (likewise). Images learned on read a model's loss lower than new ones, so the
/// confirmation should see as few of them as it can.
fn split_fresh_first(n: usize, learned: usize, fraction: f64) -> Option<(Vec<usize>, Vec<usize>)> {
    let (chosen, held) = split_rows(n, fraction)?;
    if learned == 0 || learned >= n {
        return Some((chosen, held));
    }
    let (h, fresh) = (held.len(), n - learned);
    let hf = h.min(fresh);
    let out: Vec<bool> = spread(learned, h - hf).into_iter().chain(spread(fresh, hf)).collect();
    Some(chosen_and_held(&out))
}

/// `h ≤ n` of `n` flags set, spread evenly: flag `j` when `⌊(j + 1)·h/n⌋ > ⌊j·h/n⌋`.
fn spread(n: usize, h: usize) -> Vec<bool> {
    (0..n).map(|j| (j + 1) * h / n > j * h / n).collect()
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
    pub(super) fn new(
        goal: Goal,
        exact: &Graph,
        samples: ArrayD<f32>,
        learned: usize,
        val: Option<(ArrayD<f32>, Vec<i64>)>,
        confirm: f64,
    ) -> Result<Meter> {
        let (val, held_out) = match val {
            Some((x, labels)) if matches!(goal, Goal::Accuracy(_)) => match split_rows(labels.len(), confirm) {
                Some(parts) => {
                    let pick = |rows: &[usize]| -> (ArrayD<f32>, Vec<i64>) {
                        (x.select(Axis(0), rows), rows.iter().map(|&i| labels[i]).collect())
                    };
                    (Some(pick(&parts.0)), Some(pick(&parts.1)))
                }
                None => (Some((x, labels)), None),
            },
            v => (v, None),
        };
        // an expected-drop target confirms on a share of the measured images, as an accuracy
        // target does on the validation images
        let (samples, held_logits) = match (goal, split_fresh_first(samples.shape()[0], learned, confirm)) {
            (Goal::ExpectedDrop { drop, .. }, Some((chosen, held))) if weighs_little(held.len(), drop) => {
                let held = samples.select(Axis(0), &held);
                let reference = logits(exact, &held)?;
                (samples.select(Axis(0), &chosen), Some((held, reference)))
            }
            _ => (samples, None),
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
            held_logits,
            samples,
        })
    }

    /// Validation images (those chosen on) the exact model classifies correctly.
    pub(super) fn exact_correct(&self) -> Option<usize> {
        self.val.as_ref().map(Labelled::exact_correct)
    }

    /// The images the logit measures are taken on.
    pub(super) fn n_samples(&self) -> usize {
        self.samples.shape()[0]
    }

    pub(super) fn n_val(&self) -> usize {
        self.val.as_ref().map_or(0, Labelled::n)
    }

    /// The validation accuracy of `correct` images right.
    pub(super) fn accuracy(&self, correct: usize) -> f64 {
        self.val.as_ref().map_or(correct as f64, |v| v.accuracy(correct))
    }

    /// `g`'s reductions, logit measures and validation accuracy, after restoring `restored`.
    pub(super) fn measure(&self, g: &Graph, restored: Option<String>) -> Result<PathPoint> {
        self.measure_on(g, restored, self.val.as_ref())
    }

    /// [`Meter::measure`] on the images held out to confirm: the held-out validation images'
    /// accuracy, or for an expected-drop target the logit measures on the held-out calibration
    /// images.
    pub(super) fn measure_held_out(&self, g: &Graph, restored: Option<String>) -> Result<PathPoint> {
        match &self.held_logits {
            Some((x, reference)) => self.measure_with(g, restored, None, x, reference),
            None => self.measure_on(g, restored, self.held_out.as_ref()),
        }
    }

    pub(super) fn measure_on(&self, g: &Graph, restored: Option<String>, val: Option<&Labelled>) -> Result<PathPoint> {
        self.measure_with(g, restored, val, &self.samples, &self.ref_logits)
    }

    fn measure_with(
        &self,
        g: &Graph,
        restored: Option<String>,
        val: Option<&Labelled>,
        samples: &ArrayD<f32>,
        reference: &ArrayD<f32>,
    ) -> Result<PathPoint> {
        let mut g = g.clone();
        crate::ir::infer::infer_graph(&mut g)?;
        let (l, a) = cost::reduction(&self.source, &cost::graph_cost(&g));
        let scored = val.map(|v| v.score(&g)).transpose()?;
        let out = logits(&g, samples)?;
        let (expected_drop, expected_drop_se) = expected_drop(reference, &out);
        Ok(PathPoint {
            restored,
            reduction_everything_counted: a,
            reduction_lookups_only: l,
            logit_cosine: mean_cosine(&out, reference),
            expected_drop,
            expected_drop_se,
            accuracy: scored.map(|s| s.1),
            correct: scored.map(|s| s.0),
            drop_se: scored.map(|s| s.2),
        })
    }

    /// Whether `p` meets the target. A reduction target is never "met": layers are restored
    /// while the reduction allows (checked by [`Mask::walk`]).
    pub(super) fn met(&self, p: &PathPoint) -> bool {
        match self.goal {
            Goal::Accuracy(drop) => self.val.as_ref().is_some_and(|v| v.within(p, drop)),
            g => g.met_on_logits(p),
        }
    }

    /// Whether a point measured by [`Meter::measure_held_out`] meets the target (true when
    /// nothing is held out).
    pub(super) fn met_held_out(&self, p: &PathPoint) -> bool {
        match (self.goal, &self.held_out, &self.held_logits) {
            (Goal::Accuracy(drop), Some(v), _) => v.within(p, drop),
            (g @ Goal::ExpectedDrop { .. }, _, Some(_)) => g.met_on_logits(p),
            _ => true,
        }
    }

    /// Images held out to confirm the choice, and what they are.
    pub(super) fn held_out_images(&self) -> Option<(usize, &'static str)> {
        match (&self.held_out, &self.held_logits) {
            (Some(v), _) => Some((v.n(), "validation")),
            (_, Some((x, _))) => Some((x.shape()[0], "calibration")),
            _ => None,
        }
    }

    pub(super) fn quality(&self, p: &PathPoint) -> f64 {
        self.goal.quality(p)
    }
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
            expected_drop_se: 0.0,
            accuracy: Some(correct as f64 / 1000.0),
            correct: Some(correct),
            drop_se: None,
        }
    }

    #[test]
    fn the_expected_drop_is_the_exact_models_probability_moved_off_its_top_class() {
        let a = ArrayD::from_shape_vec(vec![2, 3], vec![2.0f32, 1.0, 0.0, 0.0, 0.0, 3.0]).unwrap();
        assert_eq!(expected_drop(&a, &a), (0.0, 0.0));
        // image 0 moves from class 0 to class 1: it loses p0(0) − p0(1) (as a share of 2 images)
        let b = ArrayD::from_shape_vec(vec![2, 3], vec![1.0f32, 2.0, 0.0, 0.0, 0.0, 3.0]).unwrap();
        let z: f64 = [2.0f64, 1.0, 0.0].iter().map(|v| v.exp()).sum();
        let l = (2f64.exp() - 1f64.exp()) / z;
        let (drop, se) = expected_drop(&a, &b);
        assert!((drop - 100.0 * l / 2.0).abs() < 1e-6, "{drop}");
        // losses l and 0: standard deviation l/2, over sqrt(2)
        assert!((se - 100.0 * l / 2.0 / 2f64.sqrt()).abs() < 1e-6, "{se}");
        // outputs that are already probabilities are taken as they are
        let p = ArrayD::from_shape_vec(vec![1, 3], vec![0.5f32, 0.3, 0.2]).unwrap();
        let q = ArrayD::from_shape_vec(vec![1, 3], vec![0.1f32, 0.2, 0.7]).unwrap();
        let (drop, se) = expected_drop(&p, &q);
        assert!((drop - 30.0).abs() < 1e-4 && se == 0.0, "{drop} {se}");
    }

    /// Measured images that mix images learned on (first) with images no table saw: the
    /// confirmation holds out as many as without the mix, the unseen ones first; without a mix
    /// (none or all learned on) the split is the plain one.
    #[test]
    fn confirmation_holds_out_the_images_no_table_saw_first() {
        // the README's case with 1024 calibration images: 768 learned on, 256 not
        let (chosen, held) = split_fresh_first(1024, 768, 0.5).unwrap();
        assert_eq!((chosen.len(), held.len()), (512, 512));
        assert!((768..1024).all(|i| held.contains(&i)), "every unseen image held out");
        assert!(chosen.iter().all(|&i| i < 768));
        // the learned ones held out are spread through them: every third
        let learned_held: Vec<usize> = held.iter().copied().filter(|&i| i < 768).collect();
        assert_eq!(learned_held.len(), 256);
        assert!(learned_held.windows(2).all(|w| w[1] - w[0] == 3), "{learned_held:?}");
        // more unseen images than held out: only unseen ones, spread through them
        let (chosen, held) = split_fresh_first(1024, 100, 0.5).unwrap();
        assert_eq!(held.len(), 512);
        assert!(held.iter().all(|&i| i >= 100) && (0..100).all(|i| chosen.contains(&i)));
        assert!(held.windows(2).all(|w| (1..=2).contains(&(w[1] - w[0]))));
        // no mix: the plain split, every second image
        for learned in [0, 1024, 2000] {
            assert_eq!(split_fresh_first(1024, learned, 0.5), split_rows(1024, 0.5));
        }
        assert_eq!(split_fresh_first(7, 3, 0.0), None);
        // the held-out count never depends on the mix
        for (n, l, f) in [(9usize, 4usize, 0.5), (1000, 999, 0.3), (5, 1, 0.8)] {
            let (c, h) = split_fresh_first(n, l, f).unwrap();
            let (c0, h0) = split_rows(n, f).unwrap();
            assert_eq!((c.len(), h.len()), (c0.len(), h0.len()), "{n} {l} {f}");
            let mut all: Vec<usize> = c.iter().chain(&h).copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..n).collect::<Vec<_>>());
        }
    }

    /// An expected-drop target confirms on a held-out share only where one image there weighs
    /// at most half the budget; by default it measures up to 4096 images, the other targets 256.
    #[test]
    fn expected_drop_targets_measure_more_images_and_confirm_where_one_image_weighs_little() {
        // 512 held out: one image is 0.195 points; 400: exactly 0.25; 399 and 128: more
        assert!(confirms_expected_drop(1024, 0.5, 0.5));
        assert!(confirms_expected_drop(800, 0.5, 0.5));
        assert!(!confirms_expected_drop(798, 0.5, 0.5));
        assert!(!confirms_expected_drop(256, 0.5, 0.5));
        assert!(confirms_expected_drop(256, 0.5, 1.6));
        assert!(!confirms_expected_drop(1, 0.5, 100.0));
        let o = |f: fn(&mut Options)| {
            let mut o = Options::default();
            f(&mut o);
            o.measured_samples(784)
        };
        assert_eq!(o(|_| {}), 256);
        assert_eq!(o(|o| o.max_expected_drop = Some(0.5)), 4096);
        // 64 MiB of images: fewer large ones, never fewer than 1024
        let unlabelled = Options {
            max_expected_drop: Some(0.5),
            ..Options::default()
        };
        let big = |values: usize| unlabelled.measured_samples(values);
        assert_eq!(
            (big(3 * 32 * 32), big(3 * 64 * 64), big(3 * 224 * 224)),
            (4096, 1365, 1024)
        );
        assert_eq!(
            o(|o| {
                o.max_expected_drop = Some(0.5);
                o.max_accuracy_drop = Some(0.5)
            }),
            256
        );
        assert_eq!(
            o(|o| {
                o.max_expected_drop = Some(0.5);
                o.samples = 100
            }),
            100
        );
    }

    /// The same losses on four times the images: the same drop, half the standard error.
    #[test]
    fn the_expected_drops_standard_error_falls_with_the_square_root_of_the_images() {
        let rows = |n: usize, moved: &[usize]| {
            let mut v = Vec::new();
            for i in 0..n {
                v.extend(if moved.contains(&i) {
                    [1.0f32, 2.0, 0.0]
                } else {
                    [2.0, 1.0, 0.0]
                });
            }
            ArrayD::from_shape_vec(vec![n, 3], v).unwrap()
        };
        let (d1, se1) = expected_drop(&rows(10, &[]), &rows(10, &[3]));
        let (d4, se4) = expected_drop(&rows(40, &[]), &rows(40, &[3, 13, 23, 33]));
        assert!((d1 - d4).abs() < 1e-9 && d1 > 0.0);
        assert!((se1 / se4 - 2.0).abs() < 1e-9, "{se1} {se4}");
    }

    /// An expected-drop target holds the reading plus `margin` standard errors to the budget
    /// (and the cosine floor when given); 0 holds the reading alone.
    #[test]
    fn an_expected_drop_target_adds_its_margin_of_standard_errors() {
        let goal = |margin| Goal::ExpectedDrop {
            drop: 0.5,
            cosine: Some(0.99),
            margin,
        };
        let p = PathPoint {
            expected_drop: 0.3,
            expected_drop_se: 0.15,
            logit_cosine: 0.995,
            ..point(0)
        };
        assert!(goal(0.0).met_on_logits(&p) && goal(1.0).met_on_logits(&p) && !goal(1.5).met_on_logits(&p));
        let dissimilar = PathPoint {
            logit_cosine: 0.98,
            ..p.clone()
        };
        assert!(!goal(0.0).met_on_logits(&dissimilar));
        assert!(goal(1.0).quality(&p) > goal(2.0).quality(&p));
        let o = Options {
            max_expected_drop: Some(0.5),
            expected_drop_margin: 2.0,
            ..Options::default()
        };
        assert!(matches!(Goal::of(&o), Goal::ExpectedDrop { margin, .. } if margin == 2.0));
    }

    /// The time model prices a convolution's tree comparisons at `compare_conv` and a gathered
    /// one's at `compare`, each lookup at `lookup` plus `output / codebooks` (one output value
    /// per codebooks' lookups), and an argmin's multiply-adds at its kernel's rate.
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
