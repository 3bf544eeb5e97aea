//! Per-node arithmetic cost (per image, batch bound to 1) and parameter counts.

use super::graph::Graph;
use super::op::Op;
use super::Fact;
use petgraph::stable_graph::NodeIndex;

fn elems(f: Option<&Fact>) -> u64 {
    f.map(|f| f.shape.iter().map(|d| d.bind(1).max(0) as u64).product())
        .unwrap_or(0)
}

/// Multiply-accumulates of one node for one image (0 for ops that do no MACs).
pub fn node_macs(graph: &Graph, n: NodeIndex) -> u64 {
    let node = graph.node(n);
    let ins = graph.inputs_of(n);
    let out = elems(node.outputs[0].fact.as_ref());
    let fact = |i: usize| ins.get(i).and_then(|o| graph.fact(*o));
    match &node.op {
        Op::Conv(_) => {
            let w = fact(1).and_then(|f| f.concrete_shape()).unwrap_or_default();
            out * w.iter().skip(1).product::<usize>() as u64
        }
        Op::Gemm(g) => {
            let a = fact(0).map(|f| f.shape.clone()).unwrap_or_default();
            let k = if g.trans_a { a.first() } else { a.get(1) };
            out * k.map(|d| d.bind(1) as u64).unwrap_or(0)
        }
        Op::MatMul => {
            let a = fact(0).map(|f| f.shape.clone()).unwrap_or_default();
            out * a.last().map(|d| d.bind(1) as u64).unwrap_or(0)
        }
        _ => 0,
    }
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
