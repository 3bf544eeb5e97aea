//! `channels-last`: keep activations channels-last (`[N, H, W, C]`) wherever the ops that read
//! them are faster that way: LUT layers, exact convolutions and pooling.
//!
//! A LUT convolution's `LutMatMul` writes `[N, oh·ow, M]`: channels-last rows. The
//! `conv-to-im2col` form turns that back into NCHW (`Transpose(0,2,1) → Reshape`) only for the
//! next layer's encoder to read windows out of NCHW again. This pass gives every such value a
//! channels-last twin `[N, H, W, C]` (a free `Reshape` of the LUT output), carries the twin
//! through elementwise ops (`Relu`, `Clip`, the residual `Add`, …, a BatchNorm that could not
//! be folded as a per-channel `Mul` and `Add`, a channel `Concat`), and lets each conv
//! `PQEncode` read the twin directly (`layout=nhwc`), where its channel-lane kernel loads the
//! channels of a pixel as one contiguous vector. `GlobalAveragePool` of a twin becomes a
//! `ReduceMean` over H and W.
//!
//! Exact convolutions (group 1 or depthwise, constant weights) become channels-last `Conv`s
//! (`ai.tabconv.NhwcConv`, the direct kernel in `interp::kernels::direct`), reading a twin, or
//! a `Transpose(0,2,3,1)` of an NCHW value at the edge (e.g. the graph input); pooling of a
//! twin becomes channels-last pooling; a residual `Add` and then a `Relu` that are the only
//! consumers of a channels-last conv or of a LUT layer are fused into its epilogue. Every other consumer (`Flatten`, grouped convs, graph outputs, …) reads an
//! NCHW value made by one `Transpose(0,3,1,2)` of the twin at the edge, so no elementwise op
//! runs twice. LUT layers give the same numbers (the same rows give the same codes); exact
//! convolutions sum in a different order (within float rounding of the NCHW kernel).

use super::{Pass, PassCx};
use crate::error::Result;
use crate::ir::op::{Binary, Conv, Op, Pool, Unary};
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
    if !matches!(graph.node(lut.node).op, Op::LutMatMul { relu: false }) {
        return None;
    }
    let rows = graph.fact(lut)?;
    let [c, h, w] = chw(graph, Outlet::new(reshape, 0))?;
    let ok =
        rows.rank() == 3 && rows.shape[1].known() == Some((h * w) as i64) && rows.shape[2].known() == Some(c as i64);
    ok.then_some(lut)
}

/// Whether the direct channels-last kernel runs this Conv: constant 4-D weights, a known-size
/// input, and group 1 or depthwise.
fn direct_conv(graph: &Graph, n: NodeIndex, c: &Conv) -> bool {
    let ins = graph.inputs_of(n);
    let (Some(&[ch, _, _]), Some(w)) = (ins.first().and_then(|&x| chw(graph, x)).as_ref(), ins.get(1)) else {
        return false;
    };
    let Some(ws) = graph.const_value(*w).map(|t| t.shape().to_vec()) else {
        return false;
    };
    let fits = match c.group {
        1 => ws.len() == 4 && ws[1] == ch,
        g => g == ch && ws.len() == 4 && ws[0] == ch && ws[1] == 1,
    };
    !c.nhwc && !c.relu && fits && ws[2..] == c.window.kernel
}

/// Fold what only a channels-last conv's or a LUT layer's output feeds into its epilogue: a
/// residual `Add` of another computed value (it becomes the conv's input 3 / the
/// `LutMatMul`'s input 4), then a `Relu` — or, after a conv, a `Clip(0, max)` (ReLU6: a ReLU
/// capped at `max`). A `LutMatMul` is seen through the twin `Reshape` this pass gave it (its
/// only reader).
fn fuse_epilogues(graph: &mut Graph) {
    let nodes: Vec<NodeIndex> = graph
        .g
        .node_indices()
        .filter(|&n| match &graph.node(n).op {
            Op::Conv(c) => c.nhwc && !c.relu,
            Op::LutMatMul { relu } => !relu && graph.inputs_of(n).len() == 4,
            _ => false,
        })
        .collect();
    for n in nodes {
        let is_lut = matches!(graph.node(n).op, Op::LutMatMul { .. });
        // the value the epilogue's readers see
        let out = if is_lut {
            match sole_user(graph, Outlet::new(n, 0)) {
                Some(r) if matches!(graph.node(r).op, Op::Reshape { .. }) => Outlet::new(r, 0),
                _ => continue,
            }
        } else {
            Outlet::new(n, 0)
        };
        let ins = graph.inputs_of(n);
        if let Some((add, other)) = residual_add(graph, out) {
            if is_lut {
                graph.set_input(n, 4, other);
            } else if ins.len() <= 3 {
                if ins.len() < 3 {
                    let m = graph.const_value(ins[1]).map(|w| w.shape()[0]).unwrap_or(0);
                    let name = format!("{}/zero_bias", graph.node(n).name);
                    let zero = graph.add_const(&name, Tensor::f32(&[m], vec![0.0; m]).expect("1-D"));
                    graph.set_input(n, 2, zero);
                }
                graph.set_input(n, 3, other);
            } else {
                continue;
            }
            graph.replace_uses(Outlet::new(add, 0), out);
            // the folded Add has no reader left; drop it so `out` has one user again
            graph.g.remove_node(add);
        }
        let Some(user) = sole_user(graph, out) else {
            continue;
        };
        // a Clip whose lower bound is +0 is a ReLU capped at its upper bound (none when +inf)
        let cap = match graph.node(user).op {
            Op::Unary(Unary::Relu) => f32::INFINITY,
            Op::Unary(Unary::Clip { min, max }) if !is_lut && min.to_bits() == 0 && max > 0.0 => max,
            _ => continue,
        };
        match &mut graph.node_mut(n).op {
            Op::Conv(c) => {
                c.relu = true;
                c.relu_max = Some(cap).filter(|m| m.is_finite());
            }
            Op::LutMatMul { relu } => *relu = true,
            _ => unreachable!("filtered above"),
        }
        graph.replace_uses(Outlet::new(user, 0), out);
    }
}

/// A BatchNorm (constant parameters) of a twin: `x · s + t` per channel, the last axis, with
/// the BatchNorm kernel's `s` and `t` (`batchnorm_affine`: the same products and sums).
fn batchnorm_twin(graph: &mut Graph, name: &str, x: Outlet, ins: &[Outlet], eps: f32) -> Option<Outlet> {
    let p: Vec<Vec<f32>> = ins[1..]
        .iter()
        .map(|&o| graph.const_value(o)?.as_f32().ok()?.as_slice().map(<[f32]>::to_vec))
        .collect::<Option<_>>()?;
    let c = p.first()?.len();
    let [channels, _, _] = chw(graph, ins[0])?;
    if p.len() != 4 || p.iter().any(|v| v.len() != c) || channels != c {
        return None;
    }
    let (s, t) = crate::interp::kernels::elementwise::batchnorm_affine([&p[0], &p[1], &p[2], &p[3]], eps);
    let s = graph.add_const(&format!("{name}/nhwc_scale"), Tensor::f32(&[c], s).ok()?);
    let t = graph.add_const(&format!("{name}/nhwc_shift"), Tensor::f32(&[c], t).ok()?);
    let mul = graph.add_op(&format!("{name}/nhwc_mul"), Op::Binary(Binary::Mul), &[x, s]);
    Some(graph.add_op(&format!("{name}/nhwc"), Op::Binary(Binary::Add), &[mul, t]))
}

/// When `o`'s only reader is an `Add` of `o` and another computed value of the same shape (the
/// twin `Add`s of this pass): that `Add` and the other value.
fn residual_add(graph: &Graph, o: Outlet) -> Option<(NodeIndex, Outlet)> {
    let user = sole_user(graph, o)?;
    if !matches!(graph.node(user).op, Op::Binary(Binary::Add)) {
        return None;
    }
    let add = graph.inputs_of(user);
    let other = add.iter().copied().find(|&x| x != o)?;
    let fits = add.len() == 2 && graph.const_value(other).is_none() && graph.fact(other) == graph.fact(o);
    fits.then_some((user, other))
}

/// The one node that reads `o` (through one port), unless `o` is also a graph output.
fn sole_user(graph: &Graph, o: Outlet) -> Option<NodeIndex> {
    match graph.consumers(o).as_slice() {
        [(user, _)] if !graph.outputs.iter().any(|(_, x)| *x == o) => Some(*user),
        _ => None,
    }
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
        // NCHW values whose twin is a Transpose of them (they stay as they are).
        let mut edge: std::collections::BTreeSet<Outlet> = Default::default();
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
                Op::Conv(c) if direct_conv(graph, n, &c) => {
                    let x = match t(&ins[0]) {
                        Some(x) => x,
                        None => {
                            let perm = Some(vec![0, 2, 3, 1]);
                            let src = graph.node(ins[0].node).name.clone();
                            let x = graph.add_op(&format!("{src}/to_nhwc"), Op::Transpose { perm }, &[ins[0]]);
                            twin.insert(ins[0], x);
                            edge.insert(ins[0]);
                            x
                        }
                    };
                    let mut args = ins.clone();
                    args[0] = x;
                    let op = Op::Conv(Conv { nhwc: true, ..c });
                    Some(graph.add_op(&format!("{name}/nhwc"), op, &args))
                }
                Op::BatchNorm { epsilon } => t(&ins[0]).and_then(|x| batchnorm_twin(graph, &name, x, &ins, epsilon)),
                // a channel concat of twins: their last axis
                Op::Concat { axis } if (axis == 1 || axis == -3) && chw(graph, out).is_some() => {
                    let xs: Option<Vec<Outlet>> = ins.iter().map(t).collect();
                    xs.map(|xs| graph.add_op(&format!("{name}/nhwc"), Op::Concat { axis: 3 }, &xs))
                }
                Op::Pool(p) if !p.nhwc => t(&ins[0]).map(|x| {
                    let op = Op::Pool(Pool { nhwc: true, ..p });
                    graph.add_op(&format!("{name}/nhwc"), op, &[x])
                }),
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
            if edge.contains(&orig) {
                continue;
            }
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
        fuse_epilogues(graph);
        graph.remove_dead();
        Ok(())
    }
}
