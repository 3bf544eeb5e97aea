//! Honest per-node cost (per image, batch bound to 1): exact multiply-accumulates, encoding work
//! (MACs for argmin encoders, comparisons for trees), table lookups (each followed by an add),
//! and the bytes of tables and prototypes. Encoding is never counted as free.

use super::graph::Graph;
use super::op::{Encoder, Op};
use super::Fact;
use petgraph::stable_graph::NodeIndex;
use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Cost {
    /// Exact multiply-accumulates (Conv, MatMul, Gemm; the per-output dequantisation of a LUT).
    pub exact_macs: u64,
    /// Multiply-accumulates spent by argmin encoders (`rows · C · K · S`).
    pub encode_macs: u64,
    /// Comparisons spent by encoders (`rows · C · depth` for trees, `rows · C · K` for argmin).
    pub encode_compares: u64,
    /// Table lookups; each is followed by one add (`rows · C · M`).
    pub lookups: u64,
    pub table_bytes: u64,
    pub prototype_bytes: u64,
}

/// Counts saturate at `u64::MAX` instead of overflowing: a hostile model can declare shapes
/// whose arithmetic does not fit 64 bits (each value fits the tensor limit, their products do
/// not), and `inspect` must still report it.
impl Cost {
    pub fn add(&mut self, o: &Cost) {
        self.exact_macs = self.exact_macs.saturating_add(o.exact_macs);
        self.encode_macs = self.encode_macs.saturating_add(o.encode_macs);
        self.encode_compares = self.encode_compares.saturating_add(o.encode_compares);
        self.lookups = self.lookups.saturating_add(o.lookups);
        self.table_bytes = self.table_bytes.saturating_add(o.table_bytes);
        self.prototype_bytes = self.prototype_bytes.saturating_add(o.prototype_bytes);
    }
    /// Arithmetic operations with everything counted: a MAC is 2 ops (multiply + add), a
    /// lookup-accumulate is 2 ops (load + add), a comparison is 1.
    pub fn ops_all(&self) -> u64 {
        [self.exact_macs, self.encode_macs, self.lookups]
            .iter()
            .fold(self.encode_compares, |a, &b| a.saturating_add(b.saturating_mul(2)))
    }
    /// The TabConv paper's convention: only the multiply-accumulates left exact are counted;
    /// encoding and lookups are treated as free.
    pub fn ops_lookups_only(&self) -> u64 {
        self.exact_macs.saturating_mul(2)
    }
}

/// The product of counts, saturating (see [`Cost`]).
fn product(v: impl IntoIterator<Item = u64>) -> u64 {
    v.into_iter().fold(1, u64::saturating_mul)
}

fn elems(f: Option<&Fact>) -> u64 {
    f.map(|f| product(f.shape.iter().map(|d| d.bind(1).max(0) as u64)))
        .unwrap_or(0)
}

/// Multiply-accumulates of one node for one image (0 for ops that do no MACs).
pub fn node_macs(graph: &Graph, n: NodeIndex) -> u64 {
    node_cost(graph, n).exact_macs
}

pub fn node_cost(graph: &Graph, n: NodeIndex) -> Cost {
    let node = graph.node(n);
    let ins = graph.inputs_of(n);
    let out = elems(node.outputs[0].fact.as_ref());
    let fact = |i: usize| ins.get(i).and_then(|o| graph.fact(*o));
    let bytes = |i: usize| {
        ins.get(i)
            .and_then(|o| graph.const_value(*o))
            .map(|t| t.byte_len() as u64)
            .unwrap_or(0)
    };
    let mut c = Cost::default();
    match &node.op {
        Op::Conv(conv) => {
            let w = fact(1).and_then(|f| f.concrete_shape()).unwrap_or_default();
            // taps that only ever meet padding are not arithmetic (the interpreter never runs
            // them, `conv-to-im2col` drops them; ONNX Runtime's time on such layers suggests it
            // skips them too): a 3×3 conv on a 1×1 map costs what a 1×1 one does
            let kept = fact(0)
                .and_then(|f| super::window::spatial(&f.shape, conv.nhwc))
                .filter(|_| w.len() == 4)
                .and_then(|hw| super::window::pruned_taps(conv, hw).ok().flatten())
                .map(|(small, _)| small.window.kernel);
            let taps = match kept {
                Some([kh, kw]) => vec![w[1] as u64, kh as u64, kw as u64],
                None => w.iter().skip(1).map(|&d| d as u64).collect(),
            };
            c.exact_macs = product(taps.into_iter().chain([out]));
        }
        Op::Gemm(g) => {
            let a = fact(0).map(|f| f.shape.clone()).unwrap_or_default();
            let k = if g.trans_a { a.first() } else { a.get(1) };
            c.exact_macs = out.saturating_mul(k.map(|d| d.bind(1).max(0) as u64).unwrap_or(0));
        }
        Op::MatMul => {
            let a = fact(0).map(|f| f.shape.clone()).unwrap_or_default();
            c.exact_macs = out.saturating_mul(a.last().map(|d| d.bind(1).max(0) as u64).unwrap_or(0));
        }
        Op::PqEncode(p) => {
            // out = rows · C; pixel codebooks encode each input pixel once, the rows gather
            // its codes: as if out were pixels · codebooks
            let shape = fact(1).and_then(|f| f.concrete_shape()).unwrap_or_default();
            let out = match (p.pixel, fact(0).map(|f| f.shape.as_slice())) {
                (true, Some(x @ [_, _, _, _])) => {
                    let ch = x[if p.nhwc { 3 } else { 1 }].bind(1).max(0) as u64;
                    (elems(fact(0)) / ch.max(1)).saturating_mul(ch.div_ceil(p.subspace.max(1) as u64))
                }
                _ => out,
            };
            match p.encoder {
                Encoder::Argmin => {
                    let k = shape.get(1).copied().unwrap_or(0) as u64;
                    c.encode_macs = product([out, k, p.subspace as u64]);
                    c.encode_compares = out.saturating_mul(k);
                    // the prototypes, and their norms where given
                    c.prototype_bytes = bytes(1).saturating_add(bytes(2));
                }
                Encoder::Tree => {
                    c.encode_compares = out.saturating_mul(shape.get(1).copied().unwrap_or(0) as u64);
                    c.prototype_bytes = bytes(1).saturating_add(bytes(2));
                }
            }
        }
        Op::LutMatMul { .. } => {
            // out = rows · M; each output sums C lookups, then one scale multiply-add
            let cb = fact(1)
                .and_then(|f| f.concrete_shape())
                .and_then(|s| s.first().copied())
                .unwrap_or(0);
            c.lookups = out.saturating_mul(cb as u64);
            c.exact_macs = out;
            c.table_bytes = bytes(1).saturating_add(bytes(2)).saturating_add(bytes(3));
        }
        _ => {}
    }
    c
}

/// Sum over all nodes.
pub fn graph_cost(graph: &Graph) -> Cost {
    let mut t = Cost::default();
    for n in graph.g.node_indices() {
        t.add(&node_cost(graph, n));
    }
    t
}

/// Number of f32 parameters held in constants.
pub fn param_count(graph: &Graph) -> u64 {
    graph
        .g
        .node_weights()
        .filter_map(|n| match &n.op {
            Op::Const(t) if t.dtype() == super::DType::F32 => Some(t.len() as u64),
            _ => None,
        })
        .sum()
}

/// Bytes of the f32 weights that feed exact Conv/MatMul/Gemm nodes.
pub fn weight_bytes(graph: &Graph) -> u64 {
    graph
        .g
        .node_indices()
        .filter(|&n| matches!(graph.node(n).op, Op::Conv(_) | Op::MatMul | Op::Gemm(_)))
        .filter_map(|n| {
            graph
                .inputs_of(n)
                .get(1)
                .and_then(|o| graph.const_value(*o))
                .map(|t| t.byte_len() as u64)
        })
        .sum()
}

/// Fraction of arithmetic removed, `(lookups only, everything counted)`, relative to `before`
/// (the exact model).
pub fn reduction(before: &Cost, after: &Cost) -> (f64, f64) {
    let base = before.ops_all().max(1) as f64;
    (
        1.0 - after.ops_lookups_only() as f64 / base,
        1.0 - after.ops_all() as f64 / base,
    )
}
