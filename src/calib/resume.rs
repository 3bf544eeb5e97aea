//! Calibration runs that resume where the previous layer's stopped.
//!
//! The `lut` pass collects each layer's rows by running the calibration images through the
//! graph approximated so far (and through the exact one): run from the images, that is the
//! whole prefix again for every layer, a cost that grows with the square of the depth. All
//! layers draw their images as prefixes of one random order ([`super::Sample`]), so a graph's
//! activations at a *cut* (the values computed before a layer that later nodes read) can be
//! kept for the images run so far, and the next layer's run starts there: each image goes
//! through the model about once per pass.
//!
//! The cut after layer `i` is the closure of the nodes its input activation depends on, taken
//! together with the previous cut's (a branch already passed stays passed). Rewriting layer
//! `i` or a later one touches only its `Im2Col → MatMul` chain, never those nodes, so the kept
//! values stay valid in the graph the next layer sees (checked by node name; a mismatch runs
//! from the images). A cut is kept only when every value of it is `f32` with the images' batch
//! dimension leading and all of them fit in [`BUDGET`] bytes; otherwise the next run starts
//! from the images. Images past the kept ones run from the images too. The compile report
//! counts, per layer, the images whose run resumed (`images_resumed`), and a note says when no
//! layer's did.
//!
//! A resumed run computes what a run from the images computes, with the same kernels: on the
//! ResNet-18/16 fixture every collected value is bit-identical (tested through the `lut`
//! pass's loop). Were a fusion ever to differ across a cut, the values would differ by float
//! rounding; which runs resume depends only on the graph, the sample sizes and the budget,
//! never on timing or threads, so compiled files stay deterministic either way.

use super::plan_graph;
use crate::error::Result;
use crate::interp::Plan;
use crate::ir::{Dim, Graph, Op, Outlet, Tensor};
use ndarray::{ArrayD, Axis, IxDyn, Slice};
use petgraph::stable_graph::NodeIndex;
use std::collections::{BTreeMap, BTreeSet};

/// Most bytes of activations kept per graph (a run that moves the cut holds the old and the
/// new values: twice this at most).
pub const BUDGET: usize = 512 << 20;

/// The nodes before a cut (Const nodes excluded), with their names.
type Done = BTreeMap<NodeIndex, String>;

/// A graph's values at a cut for the first `n` images of the calibration order.
pub struct Resume {
    /// The nodes before the cut, checked by name before resuming.
    done: Done,
    /// The cut's values (their nodes are in `done`) and their data `[n, …]`.
    at: Vec<Outlet>,
    data: Vec<ArrayD<f32>>,
    n: usize,
    budget: usize,
    /// Of the images the last run collected rows from, how many it resumed from a cut
    /// (the rest ran from the images), for the compile report.
    pub last_resumed: usize,
}

impl Default for Resume {
    fn default() -> Resume {
        Resume::with_budget(BUDGET)
    }
}

/// One calibration run of a graph over `order[..n]` images, resuming from a [`Resume`].
pub(super) struct Runs {
    /// Runs from the kept values (images `..resumed`), when there are some.
    from_cut: Option<Plan<'static>>,
    pub resumed: usize,
    /// Runs from the images (images `resumed..total`), when there are some.
    from_images: Option<Plan<'static>>,
    /// The new cut's values, after the wanted ones in each run's outputs (empty: none kept),
    /// and their data `[total, …]` as the runs fill it.
    next: Vec<Outlet>,
    next_data: Vec<ArrayD<f32>>,
    next_done: Done,
    budget: usize,
    /// Images the run covers: the wanted ones and, when a new cut is kept, the ones kept before.
    pub total: usize,
}

impl Resume {
    /// Nothing kept yet; cuts kept while their values fit `budget` bytes ([`BUDGET`] by default).
    pub fn with_budget(budget: usize) -> Resume {
        Resume {
            done: Done::new(),
            at: Vec::new(),
            data: Vec::new(),
            n: 0,
            budget,
            last_resumed: 0,
        }
    }

    /// Images whose values at the cut are kept.
    pub fn kept(&self) -> usize {
        self.n
    }

    /// Plan a run of `graph` computing `wanted` for `n_used` images, moving the cut past
    /// `advance` (None: keep no cut, e.g. after the last layer).
    pub(super) fn plan(
        &self,
        graph: &Graph,
        wanted: &[Outlet],
        n_used: usize,
        advance: Option<Outlet>,
    ) -> Result<Runs> {
        let valid = self.valid_in(graph);
        let resumed = if valid { self.n } else { 0 };
        let (mut next, mut next_done) = match advance {
            Some(a) => self.cut_after(graph, a, valid),
            None => (Vec::new(), Done::new()),
        };
        // kept only when every value has the batch leading and all fit the budget
        let shapes: Option<Vec<Vec<usize>>> = next.iter().map(|o| per_image(graph, *o)).collect();
        let bytes = shapes.as_ref().map(|v| {
            v.iter()
                .map(|s| s.iter().product::<usize>())
                .fold(0usize, usize::saturating_add)
                .saturating_mul(n_used.max(resumed))
                .saturating_mul(4)
        });
        if bytes.is_none_or(|b| b > self.budget) {
            (next, next_done) = (Vec::new(), Done::new());
        }
        let outs: Vec<Outlet> = wanted.iter().chain(&next).copied().collect();
        // a cut the plan cannot be built from runs from the images, as without one
        let from_cut = (resumed > 0).then(|| self.segment(graph, &outs)).flatten();
        let resumed = if from_cut.is_some() { resumed } else { 0 };
        let total = if next.is_empty() { n_used } else { n_used.max(resumed) };
        // without a new cut, only the wanted images run
        let resumed = resumed.min(total);
        let next_data = match next.is_empty() {
            true => Vec::new(),
            false => shapes
                .unwrap_or_default()
                .iter()
                .map(|s| ArrayD::zeros(IxDyn(&[&[total], &s[..]].concat())))
                .collect(),
        };
        Ok(Runs {
            from_cut,
            resumed,
            from_images: (total > resumed).then(|| super::plan(graph, &outs)).transpose()?,
            next,
            next_data,
            next_done,
            budget: self.budget,
            total,
        })
    }

    /// Whether the kept values are values of `graph`: every node before the cut (the cut's
    /// values' among them) is still there under the same name.
    fn valid_in(&self, graph: &Graph) -> bool {
        self.n > 0
            && self
                .done
                .iter()
                .all(|(&n, name)| graph.g.node_weight(n).is_some_and(|w| &w.name == name))
    }

    /// The cut past `advance`: the nodes it depends on with those before the kept cut (when
    /// `valid` in `graph`), and the values of those nodes read by the others (or graph
    /// outputs), in node order.
    fn cut_after(&self, graph: &Graph, advance: Outlet, valid: bool) -> (Vec<Outlet>, Done) {
        let mut done: BTreeSet<NodeIndex> = match valid {
            true => self.done.keys().copied().collect(),
            false => BTreeSet::new(),
        };
        let mut stack = vec![advance.node];
        while let Some(n) = stack.pop() {
            if matches!(graph.node(n).op, Op::Const(_)) || !done.insert(n) {
                continue;
            }
            stack.extend(graph.inputs_of(n).iter().map(|o| o.node));
        }
        let mut at = BTreeSet::new();
        for &n in &done {
            for (slot, _) in graph.node(n).outputs.iter().enumerate() {
                let o = Outlet::new(n, slot);
                let read_after = graph.consumers(o).iter().any(|(c, _)| !done.contains(c))
                    || graph.outputs.iter().any(|(_, g)| *g == o);
                if read_after {
                    at.insert(o);
                }
            }
        }
        let done = done.into_iter().map(|n| (n, graph.node(n).name.clone())).collect();
        (at.into_iter().collect(), done)
    }

    /// A plan computing `outs` from the kept values: `graph` with every kept value an input,
    /// cut down to what `outs` need; None when something they need lies before the cut
    /// elsewhere than in its values, or the plan cannot be built.
    fn segment(&self, graph: &Graph, outs: &[Outlet]) -> Option<Plan<'static>> {
        let mut g = super::with_outputs(graph, outs);
        let old_inputs = std::mem::take(&mut g.inputs);
        for (i, o) in self.at.iter().enumerate() {
            let fact = graph.fact(*o).cloned();
            let n = g.add_node(&g.unique_name(&format!("calib.cut.{i}")), Op::Input, &[]);
            g.node_mut(n).outputs[0].fact = fact;
            g.replace_uses(*o, Outlet::new(n, 0));
            g.inputs.push(n);
        }
        g.remove_dead();
        if old_inputs.iter().any(|&n| g.g.node_weight(n).is_some()) {
            return None;
        }
        plan_graph(g).ok()
    }
}

/// The shape per image of `o` when it is `f32` with the images' batch dimension leading (as the
/// graph's first input has it: symbolic, or a fixed batch of 1), else None. A fixed batch `B >
/// 1` is a graph whose images may mix within a group of `B` (`Plan::run` runs it in padded
/// groups), so its values are not per image.
fn per_image(graph: &Graph, o: Outlet) -> Option<Vec<usize>> {
    let f = graph.fact(o)?;
    let input = graph
        .inputs
        .first()
        .and_then(|&n| graph.node(n).outputs[0].fact.as_ref())?;
    let lead = f.shape.first()?;
    let per_image_batch = matches!(lead, Dim::Batch(1) | Dim::Known(1));
    if f.dtype != crate::ir::DType::F32 || f.rank() < 2 || Some(lead) != input.shape.first() || !per_image_batch {
        return None;
    }
    f.shape[1..].iter().map(|d| usize::try_from(d.known()?).ok()).collect()
}

impl Runs {
    /// Run images `start..end` of `order` (`calib` rows): from the kept values where they cover
    /// them, else from the images. Returns the wanted values and keeps the new cut's.
    pub(super) fn run(
        &mut self,
        resume: &Resume,
        calib: &ArrayD<f32>,
        order: &[usize],
        (start, end): (usize, usize),
    ) -> Result<Vec<Tensor>> {
        let mut values = match (&self.from_cut, &self.from_images) {
            (Some(plan), _) if end <= self.resumed => {
                let inputs = resume
                    .data
                    .iter()
                    .map(|d| Tensor::F32(d.slice_axis(Axis(0), Slice::from(start..end)).to_owned()))
                    .collect();
                plan.run(inputs)?
            }
            (_, Some(plan)) => {
                let images = calib.select(Axis(0), &order[start..end]);
                plan.run(vec![Tensor::F32(images)])?
            }
            _ => unreachable!("images past `resumed` only run when there is a plan from the images"),
        };
        let kept = values.split_off(values.len() - self.next.len());
        for (t, d) in kept.into_iter().zip(&mut self.next_data) {
            let t = t.into_f32()?;
            d.slice_axis_mut(Axis(0), Slice::from(start..end)).assign(&t);
        }
        Ok(values)
    }

    /// Whether every image must run (the new cut needs them all), not only those with rows.
    pub(super) fn keeps_cut(&self) -> bool {
        !self.next.is_empty()
    }

    /// The resume point after this run.
    pub(super) fn finish(self) -> Resume {
        if self.next.is_empty() {
            return Resume::with_budget(self.budget);
        }
        Resume {
            done: self.next_done,
            at: self.next,
            data: self.next_data,
            n: self.total,
            budget: self.budget,
            last_resumed: 0,
        }
    }
}
