//! The interpreter: schedule once (topological order), then run with buffers freed after their
//! last use. Tensors whose last consumer is an elementwise op are updated in place.

pub mod eval;
pub mod kernels;

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

/// A compiled schedule for one graph.
pub struct Plan<'g> {
    graph: &'g Graph,
    steps: Vec<Step>,
    /// How many times each value is read (consumers + graph outputs).
    uses: Vec<usize>,
    inputs: Vec<usize>,
    outputs: Vec<usize>,
    /// Seconds and calls per op type, when profiling is on.
    profile: Option<std::sync::Mutex<Profile>>,
}

impl<'g> Plan<'g> {
    pub fn new(graph: &'g Graph) -> Result<Plan<'g>> {
        let outs: Vec<Outlet> = graph.outputs.iter().map(|(_, o)| *o).collect();
        Plan::for_outlets(graph, &outs)
    }

    /// A plan that computes only what `wanted` depends on and returns those values (used to
    /// read intermediate activations during calibration).
    pub fn for_outlets(graph: &'g Graph, wanted: &[Outlet]) -> Result<Plan<'g>> {
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
            let consts_after_first = graph
                .inputs_of(n)
                .iter()
                .skip(1)
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
        Ok(Plan {
            graph,
            steps,
            uses,
            inputs,
            outputs,
            profile: None,
        })
    }

    /// Record time per op type from now on (see [`Plan::profile`]).
    pub fn enable_profile(&mut self) {
        self.profile = Some(Default::default());
    }

    /// `(op type, seconds, calls)` recorded so far, most expensive first.
    pub fn profile(&self) -> Vec<(&'static str, f64, usize)> {
        let mut v: Vec<_> = self
            .profile
            .as_ref()
            .map(|p| {
                p.lock()
                    .expect("profile lock")
                    .by_op
                    .iter()
                    .map(|(k, (s, n))| (*k, *s, *n))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    /// `(node, op type, seconds, calls)` recorded so far, most expensive first.
    pub fn profile_nodes(&self) -> Vec<(String, &'static str, f64, usize)> {
        let mut v: Vec<_> = self
            .profile
            .as_ref()
            .map(|p| {
                p.lock()
                    .expect("profile lock")
                    .by_node
                    .iter()
                    .map(|(k, (op, s, n))| (k.clone(), *op, *s, *n))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
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

    /// Run on a batch. A model whose inputs declare a fixed batch `b` (see
    /// `onnx::import_model`) given `n ≠ b` images runs in chunks of `b` (the last one padded with
    /// zeros, whose outputs are dropped); the outputs are concatenated.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        match self.fixed_batch(&inputs) {
            Some(b) => self.run_chunked(inputs, b),
            None => self.run_once(inputs),
        }
    }

    /// The fixed batch `b` of every input, when the given tensors differ from it only there.
    fn fixed_batch(&self, inputs: &[Tensor]) -> Option<usize> {
        let mut batch = None;
        for (t, &n) in inputs.iter().zip(&self.graph.inputs) {
            let f = self.graph.node(n).outputs[0].fact.as_ref()?;
            let Some(Dim::Known(b)) = f.shape.first() else {
                return None;
            };
            let same_rest = t.shape().len() == f.rank()
                && t.shape()
                    .iter()
                    .zip(&f.shape)
                    .skip(1)
                    .all(|(&d, w)| w.known() == Some(d as i64));
            let n0 = *t.shape().first()?;
            if !same_rest || n0 == *b as usize || *b < 1 || batch.is_some_and(|x| x != *b) {
                return None;
            }
            batch = Some(*b);
        }
        batch.map(|b| b as usize)
    }

    fn run_chunked(&self, inputs: Vec<Tensor>, b: usize) -> Result<Vec<Tensor>> {
        let n = inputs.first().map_or(0, |t| t.shape()[0]);
        let mut parts: Vec<Vec<ndarray::ArrayD<f32>>> = Vec::new();
        for start in (0..n).step_by(b) {
            let take = b.min(n - start);
            let chunk: Vec<Tensor> = inputs
                .iter()
                .map(|t| {
                    let a = t.as_f32()?;
                    let mut shape = a.shape().to_vec();
                    shape[0] = b;
                    let mut c = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&shape));
                    c.slice_axis_mut(ndarray::Axis(0), (0..take).into())
                        .assign(&a.slice_axis(ndarray::Axis(0), (start..start + take).into()));
                    Ok(Tensor::F32(c))
                })
                .collect::<Result<_>>()?;
            let outs = self.run_once(chunk)?;
            let outs = outs
                .iter()
                .map(|o| {
                    let a = o.as_f32()?;
                    if a.shape().first() != Some(&b) {
                        return Err(Error::Input(format!(
                            "the model has a fixed batch of {b} and an output of shape {:?}: cannot split {n} images into batches",
                            a.shape()
                        )));
                    }
                    Ok(a.slice_axis(ndarray::Axis(0), (0..take).into()).to_owned())
                })
                .collect::<Result<Vec<_>>>()?;
            parts.push(outs);
        }
        let k = parts.first().map_or(0, Vec::len);
        (0..k)
            .map(|i| {
                let views: Vec<_> = parts.iter().map(|p| p[i].view()).collect();
                ndarray::concatenate(ndarray::Axis(0), &views)
                    .map(Tensor::F32)
                    .map_err(|e| Error::Other(format!("joining batches: {e}")))
            })
            .collect()
    }

    fn run_once(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        self.check_inputs(&inputs)?;
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

/// Convenience: schedule and run once.
pub fn run(graph: &Graph, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
    Plan::new(graph)?.run(inputs)
}
