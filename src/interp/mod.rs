//! The interpreter: schedule once (topological order), then run with buffers freed after their
//! last use. Tensors whose last consumer is an elementwise op are updated in place.

pub mod eval;
pub mod kernels;
pub mod split;

use crate::error::{Error, Result};
use crate::ir::{Dim, Graph, Op, Outlet, Tensor};
use petgraph::stable_graph::NodeIndex;
use std::collections::HashMap;
use std::sync::Arc;

struct Step {
    node: NodeIndex,
    /// Value ids of the inputs, by port.
    args: Vec<usize>,
    /// Value id of each output slot.
    outs: Vec<usize>,
    /// What the kernel derives once from the node's constant inputs (see [`eval::Cache`]);
    /// `None` when an input after the first is computed at run time.
    cache: Option<eval::Cache>,
}

/// Seconds and calls per op type and per node.
#[derive(Default)]
struct Profile {
    by_op: std::collections::BTreeMap<&'static str, (f64, usize)>,
    by_node: std::collections::BTreeMap<String, (&'static str, f64, usize)>,
}

/// The graph a plan runs: borrowed, or shared so that the plan can outlive the caller's
/// borrow (a loaded model that keeps its plan and the caches built on its first run).
enum GraphRef<'g> {
    Borrowed(&'g Graph),
    Shared(Arc<Graph>),
}

impl std::ops::Deref for GraphRef<'_> {
    type Target = Graph;
    fn deref(&self) -> &Graph {
        match self {
            GraphRef::Borrowed(g) => g,
            GraphRef::Shared(g) => g,
        }
    }
}

/// A compiled schedule for one graph.
pub struct Plan<'g> {
    graph: GraphRef<'g>,
    steps: Vec<Step>,
    /// How many times each value is read (consumers + graph outputs).
    uses: Vec<usize>,
    inputs: Vec<usize>,
    outputs: Vec<usize>,
    /// Seconds and calls per op type, when profiling is on.
    profile: Option<std::sync::Mutex<Profile>>,
    /// How a larger batch is split ([`split::sub_batch`]).
    sub_batch: Option<split::SubBatch>,
}

impl<'g> Plan<'g> {
    pub fn new(graph: &'g Graph) -> Result<Plan<'g>> {
        Plan::for_outlets(graph, &graph.output_outlets())
    }

    /// A plan that holds its graph (see [`Plan::new`]), so that it can be kept — with what its
    /// steps cache on the first run — as long as the caller likes.
    pub fn owning(graph: Arc<Graph>) -> Result<Plan<'static>> {
        let outs = graph.output_outlets();
        Plan::schedule(GraphRef::Shared(graph), &outs)
    }

    /// A plan that computes only what `wanted` depends on and returns those values (used to
    /// read intermediate activations during calibration).
    pub fn for_outlets(graph: &'g Graph, wanted: &[Outlet]) -> Result<Plan<'g>> {
        Plan::schedule(GraphRef::Borrowed(graph), wanted)
    }

    /// The graph this plan runs.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    fn schedule(graph_ref: GraphRef<'g>, wanted: &[Outlet]) -> Result<Plan<'g>> {
        let graph: &Graph = &graph_ref;
        let mut needed: std::collections::HashSet<NodeIndex> = graph.inputs.iter().copied().collect();
        let mut stack: Vec<NodeIndex> = wanted.iter().map(|o| o.node).collect();
        while let Some(n) = stack.pop() {
            if needed.insert(n) {
                stack.extend(
                    graph
                        .inputs_of(n)
                        .iter()
                        .map(|o| o.node)
                        .filter(|m| !needed.contains(m)),
                );
            }
        }
        let order: Vec<NodeIndex> = graph.topo_order()?.into_iter().filter(|n| needed.contains(n)).collect();
        let mut ids: HashMap<Outlet, usize> = HashMap::new();
        let mut steps = Vec::with_capacity(order.len());
        let mut uses = Vec::new();
        for n in order {
            let outs: Vec<usize> = (0..graph.node(n).outputs.len())
                .map(|slot| {
                    ids.insert(Outlet::new(n, slot), uses.len());
                    uses.push(0);
                    uses.len() - 1
                })
                .collect();
            let args: Vec<usize> = graph.inputs_of(n).iter().map(|o| ids[o]).collect();
            for &a in &args {
                uses[a] += 1;
            }
            // The inputs a kernel prepares from: all after the first, except a channels-last
            // Conv's residual (input 3) and a LutMatMul's (input 4).
            let prepared = match &graph.node(n).op {
                Op::Conv(c) if c.nhwc => 2,
                Op::LutMatMul { .. } => 3,
                _ => usize::MAX,
            };
            let consts_after_first = graph
                .inputs_of(n)
                .iter()
                .skip(1)
                .take(prepared)
                .all(|o| matches!(graph.node(o.node).op, Op::Const(_)));
            let cache = consts_after_first.then(eval::Cache::new);
            steps.push(Step {
                node: n,
                args,
                outs,
                cache,
            });
        }
        let outputs: Vec<usize> = wanted.iter().map(|o| ids[o]).collect();
        for &o in &outputs {
            uses[o] += 1;
        }
        let inputs = graph.inputs.iter().map(|n| ids[&Outlet::new(*n, 0)]).collect();
        let sub_batch = split::sub_batch(graph, wanted);
        Ok(Plan {
            graph: graph_ref,
            steps,
            uses,
            inputs,
            outputs,
            profile: None,
            sub_batch,
        })
    }

    /// Record time per op type from now on (see [`Plan::profile`]).
    pub fn enable_profile(&mut self) {
        self.profile = Some(Default::default());
    }

    /// `(op type, seconds, calls)` recorded so far, most expensive first.
    pub fn profile(&self) -> Vec<(&'static str, f64, usize)> {
        self.profile_rows(|p| p.by_op.iter().map(|(k, &(s, n))| (*k, s, n)).collect(), |r| r.1)
    }

    /// `(node, op type, seconds, calls)` recorded so far, most expensive first.
    pub fn profile_nodes(&self) -> Vec<(String, &'static str, f64, usize)> {
        self.profile_rows(
            |p| p.by_node.iter().map(|(k, &(op, s, n))| (k.clone(), op, s, n)).collect(),
            |r| r.2,
        )
    }

    fn profile_rows<R>(&self, rows: impl Fn(&Profile) -> Vec<R>, secs: impl Fn(&R) -> f64) -> Vec<R> {
        let mut v = self
            .profile
            .as_ref()
            .map(|p| rows(&p.lock().expect("profile lock")))
            .unwrap_or_default();
        v.sort_by(|a, b| secs(b).total_cmp(&secs(a)));
        v
    }

    /// Check the runtime inputs against the declared input facts (the batch may be anything).
    fn check_inputs(&self, inputs: &[Tensor]) -> Result<()> {
        if inputs.len() != self.inputs.len() {
            return Err(Error::Input(format!(
                "the model has {} input(s), {} given",
                self.inputs.len(),
                inputs.len()
            )));
        }
        for (t, &n) in inputs.iter().zip(&self.graph.inputs) {
            let node = self.graph.node(n);
            let Some(f) = node.outputs[0].fact.as_ref() else {
                continue;
            };
            let ok = t.dtype() == f.dtype
                && t.shape().len() == f.rank()
                && t.shape().iter().zip(&f.shape).all(|(&d, want)| match want {
                    Dim::Known(k) => d as i64 == *k,
                    Dim::Batch(_) => true,
                });
            if !ok {
                return Err(Error::Input(format!(
                    "input '{}' expects {}, got {}{:?}",
                    node.name,
                    f.shape_string(),
                    t.dtype(),
                    t.shape()
                )));
            }
        }
        Ok(())
    }

    /// Run on a batch. A graph whose inputs declare a fixed batch `B` (see
    /// `onnx::import::BATCH_KEY`) given `n ≠ B` images runs them in chunks of `B` (the last one
    /// padded with zeros, whose outputs are dropped) and concatenates the outputs along axis 0.
    ///
    /// Otherwise a batch larger than the graph's sub-batch ([`split::sub_batch`]: the graph
    /// computes each image on its own and its activations are large) runs in sub-batches that
    /// keep the activations in cache, in parallel across the threads.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if let Some(b) = self.fixed_batch_of(&inputs) {
            return self.run_chunked(inputs, b);
        }
        let n = inputs.first().and_then(|t| t.shape().first().copied()).unwrap_or(0);
        match self.sub_batch(n) {
            Some(s) => {
                // the plan's inputs are f32 with the batch leading (`split::sub_batch`): inputs
                // that match them can be cut along axis 0
                self.check_inputs(&inputs)?;
                // profiled runs go one sub-batch at a time, so op times stay wall-clock times
                split::run_split(inputs, s, self.profile.is_some(), |x| self.run_once(x))
            }
            None => self.run_once(inputs),
        }
    }

    /// Set how [`Plan::run`] splits batches (`None`: run them whole), in place of what the graph
    /// suggested ([`split::sub_batch`]).
    pub fn set_sub_batch(&mut self, s: Option<split::SubBatch>) {
        self.sub_batch = s;
    }

    /// Images per sub-batch [`Plan::run`] runs `n` images in; `None` when it runs them whole.
    pub fn sub_batch(&self, n: usize) -> Option<usize> {
        self.sub_batch.and_then(|s| s.size(n))
    }

    /// The fixed leading dimension `B` the graph's inputs declare (all the same, rank ≥ 2), if
    /// they do.
    pub fn fixed_batch(&self) -> Option<usize> {
        fixed_batch(&self.graph)
    }

    /// `Some(B)` when the inputs should run in chunks: the graph declares a fixed batch `B` and
    /// the given tensors match the declared shapes except for the same leading `n ≠ B`.
    fn fixed_batch_of(&self, inputs: &[Tensor]) -> Option<usize> {
        let b = self.fixed_batch()?;
        let n = inputs.first()?.shape().first().copied()?;
        if n == b || inputs.len() != self.graph.inputs.len() {
            return None;
        }
        for (t, &id) in inputs.iter().zip(&self.graph.inputs) {
            let f = self.graph.node(id).outputs[0].fact.as_ref()?;
            let fits = t.dtype() == f.dtype
                && t.shape().len() == f.rank()
                && t.shape()[0] == n
                && t.shape()[1..]
                    .iter()
                    .zip(&f.shape[1..])
                    .all(|(&d, w)| w.known() == Some(d as i64));
            if !fits {
                return None;
            }
        }
        Some(b)
    }

    fn run_chunked(&self, inputs: Vec<Tensor>, b: usize) -> Result<Vec<Tensor>> {
        use ndarray::{ArrayD, Axis, IxDyn, Slice};
        let n = inputs[0].shape()[0];
        if n == 0 {
            return Err(Error::Input(format!(
                "no images given (the model runs in batches of its fixed batch {b})"
            )));
        }
        let mut parts: Vec<Vec<ArrayD<f32>>> = Vec::new();
        for start in (0..n).step_by(b) {
            let take = b.min(n - start);
            let chunk = inputs
                .iter()
                .map(|t| {
                    let a = t.as_f32()?;
                    let rows = a.slice_axis(Axis(0), Slice::from(start..start + take));
                    if take == b {
                        return Ok(Tensor::F32(rows.to_owned()));
                    }
                    let mut shape = a.shape().to_vec();
                    shape[0] = b;
                    let mut padded = ArrayD::<f32>::zeros(IxDyn(&shape));
                    padded.slice_axis_mut(Axis(0), Slice::from(0..take)).assign(&rows);
                    Ok(Tensor::F32(padded))
                })
                .collect::<Result<Vec<_>>>()?;
            let outs = self.run_once(chunk)?;
            let outs = outs
                .into_iter()
                .enumerate()
                .map(|(i, o)| {
                    let a = o.into_f32()?;
                    if a.ndim() == 0 || a.shape()[0] != b {
                        let name = self.output_name(i);
                        return Err(Error::Input(format!(
                            "the model declares a fixed batch of {b} and output '{name}' has shape {:?},                              which does not lead with that batch: cannot run {n} images in batches of {b};                              give exactly {b}",
                            a.shape()
                        )));
                    }
                    Ok(if take == b {
                        a
                    } else {
                        a.slice_axis(Axis(0), Slice::from(0..take)).to_owned()
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            parts.push(outs);
        }
        split::join(&parts, &format!("batches of {b}"))
    }

    /// The name of output `i` of this plan (the graph output's name, or the node's).
    fn output_name(&self, i: usize) -> String {
        let id = self.outputs[i];
        if let Some((name, _)) = self.graph.outputs.iter().find(|(_, o)| self.value_id(*o) == Some(id)) {
            return name.clone();
        }
        self.steps
            .iter()
            .find(|s| s.outs.contains(&id))
            .map(|s| self.graph.node(s.node).name.clone())
            .unwrap_or_default()
    }

    fn value_id(&self, o: Outlet) -> Option<usize> {
        self.steps
            .iter()
            .find(|s| s.node == o.node)
            .and_then(|s| s.outs.get(o.slot).copied())
    }

    /// The batch the inputs carry: the first dimension declared `k·N`, divided by `k` (1 when no
    /// input has a symbolic batch).
    fn batch_of(&self, inputs: &[Tensor]) -> usize {
        for (t, &n) in inputs.iter().zip(&self.graph.inputs) {
            let Some(f) = self.graph.node(n).outputs[0].fact.as_ref() else {
                continue;
            };
            for (&d, want) in t.shape().iter().zip(&f.shape) {
                if let Dim::Batch(k) = *want {
                    return d / (k.max(1) as usize);
                }
            }
        }
        1
    }

    /// Refuse, before running it, a node whose outputs at this batch would exceed the per-tensor
    /// limit of [`crate::limits`] (shape inference checked them at batch 1).
    fn check_output_sizes(&self, n: NodeIndex, batch: usize) -> Result<()> {
        let node = self.graph.node(n);
        for v in &node.outputs {
            let Some(f) = v.fact.as_ref() else { continue };
            let dims: Vec<usize> = f
                .shape
                .iter()
                .map(|d| match *d {
                    Dim::Known(v) => v.max(0) as usize,
                    Dim::Batch(k) => (k.max(0) as usize).saturating_mul(batch),
                })
                .collect();
            // the message is formatted only for a shape over the limit (this runs for every node)
            if crate::limits::check_shape(&dims, f.dtype.size_of(), "output").is_err() {
                crate::limits::check_shape(&dims, f.dtype.size_of(), &format!("output at batch {batch}"))
                    .map_err(|e| Error::node(&node.name, node.op.name(), e.to_string()))?;
            }
        }
        Ok(())
    }

    fn run_once(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        self.check_inputs(&inputs)?;
        let batch = self.batch_of(&inputs);
        let mut values: Vec<Option<Arc<Tensor>>> = vec![None; self.uses.len()];
        let mut left = self.uses.clone();
        for (t, &id) in inputs.into_iter().zip(&self.inputs) {
            values[id] = Some(Arc::new(t));
        }
        for step in &self.steps {
            let node = self.graph.node(step.node);
            match &node.op {
                Op::Input => continue,
                Op::Const(t) => {
                    values[step.outs[0]] = Some(t.clone());
                    continue;
                }
                _ => {}
            }
            self.check_output_sizes(step.node, batch)?;
            let mut args = Vec::with_capacity(step.args.len());
            for &a in &step.args {
                left[a] -= 1;
                let v = if left[a] == 0 {
                    values[a].take()
                } else {
                    values[a].clone()
                };
                args.push(v.ok_or_else(|| Error::node(&node.name, node.op.name(), "input value missing"))?);
            }
            let t0 = self.profile.as_ref().map(|_| std::time::Instant::now());
            let outs = eval::eval_op_cached(&node.op, args, step.cache.as_ref())
                .map_err(|e| Error::node(&node.name, node.op.name(), e.to_string()))?;
            if let (Some(p), Some(t0)) = (&self.profile, t0) {
                let secs = t0.elapsed().as_secs_f64();
                let mut p = p.lock().expect("profile lock");
                let e = p.by_op.entry(node.op.name()).or_default();
                e.0 += secs;
                e.1 += 1;
                let e = p.by_node.entry(node.name.clone()).or_insert((node.op.name(), 0.0, 0));
                e.1 += secs;
                e.2 += 1;
            }
            for (t, &id) in outs.into_iter().zip(&step.outs) {
                if self.uses[id] > 0 {
                    values[id] = Some(Arc::new(t));
                }
            }
        }
        self.outputs
            .iter()
            .map(|&id| {
                let v = values[id]
                    .clone()
                    .ok_or_else(|| Error::Other("graph output was not computed".into()))?;
                Ok(Arc::try_unwrap(v).unwrap_or_else(|a| (*a).clone()))
            })
            .collect()
    }
}

/// The fixed leading dimension `B` every input of `graph` declares (rank ≥ 2, all the same), if
/// they do; such a graph runs other batch sizes in chunks of `B` (see [`Plan::run`]).
pub fn fixed_batch(graph: &Graph) -> Option<usize> {
    let mut batch = None;
    for &n in &graph.inputs {
        let f = graph.node(n).outputs[0].fact.as_ref()?;
        let b = match f.shape.first() {
            Some(Dim::Known(b)) if *b > 0 && f.rank() >= 2 => *b as usize,
            _ => return None,
        };
        if batch.replace(b).is_some_and(|prev| prev != b) {
            return None;
        }
    }
    batch
}

/// Convenience: schedule and run once.
pub fn run(graph: &Graph, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
    Plan::new(graph)?.run(inputs)
}
