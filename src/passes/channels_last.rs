//! `channels-last`: keep the activations between LUT layers in the layout the lookups produce.
//!
//! A LUT convolution's `LutMatMul` writes `[N, oh·ow, M]`: channels-last rows. The
//! `conv-to-im2col` form turns that back into NCHW (`Transpose(0,2,1) → Reshape`) only for the
//! next layer's encoder to read windows out of NCHW again. This pass gives every such value a
//! channels-last twin `[N, H, W, C]` (a free `Reshape` of the LUT output), carries the twin
//! through elementwise ops (`Relu`, `Clip`, the residual `Add`, …), and lets each conv
//! `PQEncode` read the twin directly (`layout=nhwc`), where its channel-lane kernel loads the
//! channels of a pixel as one contiguous vector. `GlobalAveragePool` of a twin becomes a
//! `ReduceMean` over H and W. Every other consumer (exact `Conv`, pooling, `Flatten`, graph
//! outputs) reads an NCHW value made by one `Transpose(0,3,1,2)` of the twin at the edge, so
//! no elementwise op runs twice. Numbers are unchanged: the same rows give the same codes.

use super::{Pass, PassCx};
use crate::error::Result;
use crate::ir::op::Op;
use crate::ir::{Graph, Outlet, Tensor};
use petgraph::stable_graph::NodeIndex;
use std::collections::BTreeMap;

pub struct ChannelsLast;

/// `(N-symbolic) [N, C, H, W]` → `(C, H, W)` when the value is a known-size 4-D NCHW tensor.
fn chw(graph: &Graph, o: Outlet) -> Option<[usize; 3]> {
    let f = graph.fact(o)?;
    if f.rank() != 4 {
        return None;
    }
    let d = |i: usize| f.shape[i].known().map(|v| v as usize);
    Some([d(1)?, d(2)?, d(3)?])
}

/// The `LutMatMul` output behind `Reshape(Transpose(0,2,1)(lut))` → NCHW, if `reshape` is that.
fn lut_rows(graph: &Graph, reshape: NodeIndex) -> Option<Outlet> {
    let tr = graph.inputs_of(reshape).first()?.node;
    if !matches!(&graph.node(tr).op, Op::Transpose { perm: Some(p) } if p == &[0, 2, 1]) {
        return None;
    }
    let lut = *graph.inputs_of(tr).first()?;
    if !matches!(graph.node(lut.node).op, Op::LutMatMul) {
        return None;
    }
    let rows = graph.fact(lut)?;
    let [c, h, w] = chw(graph, Outlet::new(reshape, 0))?;
    let ok =
        rows.rank() == 3 && rows.shape[1].known() == Some((h * w) as i64) && rows.shape[2].known() == Some(c as i64);
    ok.then_some(lut)
}

fn i64s(v: &[usize]) -> Tensor {
    Tensor::i64_vec(v.iter().map(|&x| x as i64).collect())
}

impl Pass for ChannelsLast {
    fn name(&self) -> &'static str {
        "channels-last"
    }
    fn run(&self, graph: &mut Graph, _cx: &mut PassCx) -> Result<()> {
        // NCHW value → its channels-last twin.
        let mut twin: BTreeMap<Outlet, Outlet> = BTreeMap::new();
        for n in graph.topo_order()? {
            let out = Outlet::new(n, 0);
            let ins = graph.inputs_of(n);
            let name = graph.node(n).name.clone();
            let t = |o: &Outlet| twin.get(o).copied();
            let made = match graph.node(n).op.clone() {
                Op::Reshape { .. } => lut_rows(graph, n).map(|lut| {
                    let [c, h, w] = chw(graph, out).expect("checked by lut_rows");
                    let shape = graph.add_const(&format!("{name}/nhwc_shape"), i64s(&[0, h, w, c]));
                    graph.add_op(&format!("{name}/nhwc"), Op::Reshape { allowzero: false }, &[lut, shape])
                }),
                Op::Unary(u) => t(&ins[0]).map(|x| graph.add_op(&format!("{name}/nhwc"), Op::Unary(u), &[x])),
                Op::Binary(b) if ins.len() == 2 && chw(graph, out).is_some() => {
                    let scalar = |o: &Outlet| graph.const_value(*o).is_some_and(|v| v.len() == 1);
                    let same = graph.fact(ins[0]) == graph.fact(ins[1]);
                    match (t(&ins[0]), t(&ins[1])) {
                        (Some(a), Some(c)) if same => Some([a, c]),
                        (Some(a), None) if scalar(&ins[1]) => Some([a, ins[1]]),
                        (None, Some(c)) if scalar(&ins[0]) => Some([ins[0], c]),
                        _ => None,
                    }
                    .map(|args| graph.add_op(&format!("{name}/nhwc"), Op::Binary(b), &args))
                }
                _ => None,
            };
            if let Some(m) = made {
                twin.insert(out, m);
                continue;
            }
            // Consumers that read the twin instead.
            let Some(x) = ins.first().and_then(|o| twin.get(o).copied()) else {
                continue;
            };
            match graph.node(n).op.clone() {
                Op::PqEncode(mut p) if p.window.is_some() && !p.nhwc => {
                    p.nhwc = true;
                    graph.node_mut(n).op = Op::PqEncode(p);
                    graph.set_input(n, 0, x);
                }
                Op::GlobalPool { max: false } => {
                    let [c, _, _] = chw(graph, ins[0]).expect("twins are 4-D");
                    let mean = graph.add_op(
                        &format!("{name}/nhwc"),
                        Op::ReduceMean {
                            axes: Some(vec![1, 2]),
                            keepdims: false,
                        },
                        &[x],
                    );
                    let shape = graph.add_const(&format!("{name}/nchw_shape"), i64s(&[0, c, 1, 1]));
                    let nchw = graph.add_op(
                        &format!("{name}/nchw"),
                        Op::Reshape { allowzero: false },
                        &[mean, shape],
                    );
                    graph.replace_uses(out, nchw);
                }
                _ => {}
            }
        }
        // Whatever still reads an NCHW value gets it from the twin, so the NCHW chain dies.
        for (orig, tw) in twin {
            let is_output = graph.outputs.iter().any(|(_, o)| *o == orig);
            if graph.g.contains_node(orig.node) && (!graph.consumers(orig).is_empty() || is_output) {
                let name = format!("{}/to_nchw", graph.node(orig.node).name);
                let back = graph.add_op(
                    &name,
                    Op::Transpose {
                        perm: Some(vec![0, 3, 1, 2]),
                    },
                    &[tw],
                );
                graph.replace_uses(orig, back);
            }
        }
        graph.remove_dead();
        Ok(())
    }
}
