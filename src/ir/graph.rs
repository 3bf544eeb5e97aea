//! The graph: a petgraph `StableDiGraph` whose edges carry the producer's output slot and the
//! consumer's input port. A value is an [`Outlet`] `(node, slot)`.
//!
//! Invariants (checked by [`Graph::verify`]): every node's input ports are 0..n without gaps or
//! duplicates, edges point at existing output slots, the graph is acyclic, graph outputs name
//! existing outlets, and every Input node is listed in `inputs`.

use super::fact::Fact;
use super::op::Op;
use crate::error::{Error, Result};
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Outlet {
    pub node: NodeIndex,
    pub slot: usize,
}

impl Outlet {
    pub fn new(node: NodeIndex, slot: usize) -> Outlet {
        Outlet { node, slot }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wire {
    pub src_slot: usize,
    pub dst_port: usize,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub op: Op,
    /// One per output slot: the value's name (from ONNX) and its inferred fact.
    pub outputs: Vec<Value>,
}

#[derive(Clone, Debug)]
pub struct Value {
    pub name: String,
    pub fact: Option<Fact>,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub g: StableDiGraph<Node, Wire>,
    /// Input nodes in declaration order.
    pub inputs: Vec<NodeIndex>,
    /// Named graph outputs.
    pub outputs: Vec<(String, Outlet)>,
    /// Free-form key/values carried to `.tcv` metadata (opset of the source, producer, …).
    pub metadata: BTreeMap<String, String>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Add a node wired to `inputs` (port i ← inputs[i]) with `n_outputs` unnamed output values.
    pub fn add_node(&mut self, name: &str, op: Op, inputs: &[Outlet]) -> NodeIndex {
        let n_out = op.num_outputs();
        let outputs = (0..n_out)
            .map(|i| Value {
                name: if i == 0 {
                    name.to_string()
                } else {
                    format!("{name}:{i}")
                },
                fact: None,
            })
            .collect();
        let idx = self.g.add_node(Node {
            name: name.to_string(),
            op,
            outputs,
        });
        for (port, src) in inputs.iter().enumerate() {
            self.g.add_edge(
                src.node,
                idx,
                Wire {
                    src_slot: src.slot,
                    dst_port: port,
                },
            );
        }
        idx
    }

    pub fn node(&self, n: NodeIndex) -> &Node {
        &self.g[n]
    }

    /// The values of the graph outputs, in order.
    pub fn output_outlets(&self) -> Vec<Outlet> {
        self.outputs.iter().map(|(_, o)| *o).collect()
    }
    pub fn node_mut(&mut self, n: NodeIndex) -> &mut Node {
        &mut self.g[n]
    }

    /// The node's inputs ordered by port.
    pub fn inputs_of(&self, n: NodeIndex) -> Vec<Outlet> {
        let mut v: Vec<(usize, Outlet)> = self
            .g
            .edges_directed(n, Direction::Incoming)
            .map(|e| (e.weight().dst_port, Outlet::new(e.source(), e.weight().src_slot)))
            .collect();
        v.sort_by_key(|(p, _)| *p);
        v.into_iter().map(|(_, o)| o).collect()
    }

    /// Consumers of an outlet as `(node, port)`, sorted for determinism.
    pub fn consumers(&self, o: Outlet) -> Vec<(NodeIndex, usize)> {
        let mut v: Vec<(NodeIndex, usize)> = self
            .g
            .edges_directed(o.node, Direction::Outgoing)
            .filter(|e| e.weight().src_slot == o.slot)
            .map(|e| (e.target(), e.weight().dst_port))
            .collect();
        v.sort();
        v
    }

    pub fn fact(&self, o: Outlet) -> Option<&Fact> {
        self.g[o.node].outputs.get(o.slot)?.fact.as_ref()
    }

    /// The constant tensor behind an outlet, if it is produced by a Const node.
    pub fn const_value(&self, o: Outlet) -> Option<&std::sync::Arc<super::Tensor>> {
        match &self.g[o.node].op {
            Op::Const(t) => Some(t),
            _ => None,
        }
    }

    /// Redirect every consumer of `from` (and graph outputs) to `to`.
    pub fn replace_uses(&mut self, from: Outlet, to: Outlet) {
        let edges: Vec<_> = self
            .g
            .edges_directed(from.node, Direction::Outgoing)
            .filter(|e| e.weight().src_slot == from.slot)
            .map(|e| (e.id(), e.target(), e.weight().dst_port))
            .collect();
        for (id, target, port) in edges {
            self.g.remove_edge(id);
            self.g.add_edge(
                to.node,
                target,
                Wire {
                    src_slot: to.slot,
                    dst_port: port,
                },
            );
        }
        for (_, o) in self.outputs.iter_mut() {
            if *o == from {
                *o = to;
            }
        }
    }

    /// Canonical topological order: depth-first from the graph outputs (in order), visiting a
    /// node's inputs by port before the node itself; then graph inputs, then anything
    /// unreachable by node index. It depends only on the graph's structure and names, never on
    /// insertion order, so dumps and written files are stable across equivalent rewrites.
    pub fn topo_order(&self) -> Result<Vec<NodeIndex>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Open,
            Done,
        }
        let mut mark: std::collections::HashMap<NodeIndex, Mark> = std::collections::HashMap::new();
        let mut order = Vec::with_capacity(self.g.node_count());
        let mut roots: Vec<NodeIndex> = self.outputs.iter().map(|(_, o)| o.node).collect();
        roots.extend(self.inputs.iter().copied());
        roots.extend(self.g.node_indices());
        for root in roots {
            if mark.contains_key(&root) {
                continue;
            }
            // (node, inputs already pushed?)
            let mut stack = vec![(root, false)];
            while let Some((n, expanded)) = stack.pop() {
                if expanded {
                    mark.insert(n, Mark::Done);
                    order.push(n);
                    continue;
                }
                match mark.get(&n) {
                    Some(Mark::Done) => continue,
                    Some(Mark::Open) => {
                        return Err(Error::Other(format!(
                            "graph has a cycle through node {}",
                            self.g[n].name
                        )))
                    }
                    None => {}
                }
                mark.insert(n, Mark::Open);
                stack.push((n, true));
                for o in self.inputs_of(n).iter().rev() {
                    match mark.get(&o.node) {
                        Some(Mark::Done) => {}
                        Some(Mark::Open) => {
                            return Err(Error::Other(format!(
                                "graph has a cycle through nodes {} and {}",
                                self.g[n].name, self.g[o.node].name
                            )))
                        }
                        None => stack.push((o.node, false)),
                    }
                }
            }
        }
        Ok(order)
    }

    /// Remove nodes that no graph output depends on (Input nodes are kept).
    pub fn remove_dead(&mut self) -> usize {
        let mut live = std::collections::HashSet::new();
        let mut stack: Vec<NodeIndex> = self.outputs.iter().map(|(_, o)| o.node).collect();
        stack.extend(self.inputs.iter().copied());
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(self.g.neighbors_directed(n, Direction::Incoming));
            }
        }
        let dead: Vec<NodeIndex> = self.g.node_indices().filter(|n| !live.contains(n)).collect();
        for n in &dead {
            self.g.remove_node(*n);
        }
        dead.len()
    }

    /// A node name not used yet, derived from `base`.
    pub fn unique_name(&self, base: &str) -> String {
        let taken: std::collections::HashSet<&str> = self.g.node_weights().map(|n| n.name.as_str()).collect();
        if !taken.contains(base) {
            return base.to_string();
        }
        (1..)
            .map(|i| format!("{base}.{i}"))
            .find(|n| !taken.contains(n.as_str()))
            .expect("some suffix is free")
    }

    /// Add a constant node (fact filled in) under a unique name derived from `name`.
    pub fn add_const(&mut self, name: &str, t: super::Tensor) -> Outlet {
        let name = self.unique_name(name);
        let fact = Fact::of_tensor(&t);
        let n = self.add_node(&name, Op::Const(std::sync::Arc::new(t)), &[]);
        self.g[n].outputs[0].fact = Some(fact);
        Outlet::new(n, 0)
    }

    /// Add an op node under a unique name derived from `name`.
    pub fn add_op(&mut self, name: &str, op: Op, inputs: &[Outlet]) -> Outlet {
        let name = self.unique_name(name);
        Outlet::new(self.add_node(&name, op, inputs), 0)
    }

    /// Rewire input `port` of `node` to read `src`.
    pub fn set_input(&mut self, node: NodeIndex, port: usize, src: Outlet) {
        let old: Vec<_> = self
            .g
            .edges_directed(node, Direction::Incoming)
            .filter(|e| e.weight().dst_port == port)
            .map(|e| e.id())
            .collect();
        for e in old {
            self.g.remove_edge(e);
        }
        self.g.add_edge(
            src.node,
            node,
            Wire {
                src_slot: src.slot,
                dst_port: port,
            },
        );
    }

    /// Drop input ports `>= n` of `node`.
    pub fn truncate_inputs(&mut self, node: NodeIndex, n: usize) {
        let old: Vec<_> = self
            .g
            .edges_directed(node, Direction::Incoming)
            .filter(|e| e.weight().dst_port >= n)
            .map(|e| e.id())
            .collect();
        for e in old {
            self.g.remove_edge(e);
        }
    }

    /// True if the outlet is read by exactly one node port and is not a graph output.
    pub fn has_single_use(&self, o: Outlet) -> bool {
        self.consumers(o).len() == 1 && !self.outputs.iter().any(|(_, x)| *x == o)
    }

    /// Number of nodes that compute something (not inputs or constants).
    pub fn op_count(&self) -> usize {
        self.g
            .node_weights()
            .filter(|n| !matches!(n.op, Op::Input | Op::Const(_)))
            .count()
    }

    /// Find a node by its name.
    pub fn find(&self, name: &str) -> Option<NodeIndex> {
        self.g.node_indices().find(|&n| self.g[n].name == name)
    }

    /// Structural verification; returns every problem found, not just the first.
    pub fn verify(&self) -> Result<()> {
        let mut errs = Vec::new();
        for n in self.g.node_indices() {
            let node = &self.g[n];
            let mut ports: Vec<usize> = self
                .g
                .edges_directed(n, Direction::Incoming)
                .map(|e| e.weight().dst_port)
                .collect();
            ports.sort();
            if ports.iter().enumerate().any(|(i, &p)| i != p) {
                errs.push(format!(
                    "node {} ({}): input ports {:?} have gaps or duplicates",
                    node.name,
                    node.op.name(),
                    ports
                ));
            }
            for e in self.g.edges_directed(n, Direction::Incoming) {
                if e.weight().src_slot >= self.g[e.source()].outputs.len() {
                    errs.push(format!(
                        "node {} ({}): port {} reads missing output slot {} of {}",
                        node.name,
                        node.op.name(),
                        e.weight().dst_port,
                        e.weight().src_slot,
                        self.g[e.source()].name
                    ));
                }
            }
            if matches!(node.op, Op::Input) && !self.inputs.contains(&n) {
                errs.push(format!("node {}: Input node not listed as graph input", node.name));
            }
        }
        for (name, o) in &self.outputs {
            if !self.g.contains_node(o.node) || o.slot >= self.g[o.node].outputs.len() {
                errs.push(format!("graph output {name} points at a missing value"));
            }
        }
        for i in &self.inputs {
            if !self.g.contains_node(*i) {
                errs.push("a graph input node was removed".to_string());
            }
        }
        if let Err(e) = self.topo_order() {
            errs.push(e.to_string());
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(Error::Other(format!(
                "graph verification failed:\n  {}",
                errs.join("\n  ")
            )))
        }
    }
}
