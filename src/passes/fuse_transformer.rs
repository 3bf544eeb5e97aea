//! `fuse-transformer`: the opset-13 decompositions exporters write for a transformer's
//! LayerNorm and GELU become the single ops (`LayerNormalization`, `Gelu`), as ONNX Runtime's
//! LayerNorm and GELU fusions do when it opens a model. One pass over the kernels instead of
//! nine (LayerNorm) or five (GELU), and no intermediate tensors.
//!
//! * LayerNorm: `d = x − ReduceMean(x)`, `d / Sqrt(ReduceMean(Pow(d, 2)) + ε)`, then optionally
//!   `· γ` and `+ β` (constants of the last axis' size) → `LayerNormalization(x, γ, β)` over the
//!   last axis with `ε`. Both means over the last axis only, `keepdims`; `Pow(d, 2)` or `d · d`.
//! * GELU: `x · 0.5 · (1 + Erf(x / √2))` with the three factors multiplied in any order (the
//!   legacy exporter writes `(x · (1 + erf)) · 0.5`, dynamo `x · (0.5 · (1 + erf))`), `x · (1/√2)`
//!   for the division → `Gelu(x)`.
//!
//! A match needs every constant to be what the pattern says (0.5 and 1 exactly, √2 and 1/√2 to
//! f32 rounding, ε a non-negative scalar) and every intermediate value used only inside the
//! pattern; anything else is left as written. MatMuls are untouched, so the `lut` pass finds
//! the same layers before or after this pass.

use super::{Pass, PassCx};
use crate::error::Result;
use crate::ir::op::{Binary, Op, Unary};
use crate::ir::{Graph, Outlet, Tensor};
use petgraph::stable_graph::NodeIndex;

pub struct FuseTransformer;

impl Pass for FuseTransformer {
    fn name(&self) -> &'static str {
        "fuse-transformer"
    }
    fn run(&self, graph: &mut Graph, cx: &mut PassCx) -> Result<()> {
        let order = graph.topo_order()?;
        let (mut norms, mut gelus) = (0, 0);
        for &n in &order {
            if !graph.g.contains_node(n) {
                continue;
            }
            let fused = match graph.node(n).op {
                Op::ReduceMean { .. } => match match_layer_norm(graph, n) {
                    Some(m) => {
                        apply_layer_norm(graph, m)?;
                        norms += 1;
                        true
                    }
                    None => false,
                },
                Op::Unary(Unary::Erf) => match match_gelu(graph, n) {
                    Some((x, out)) => {
                        let name = format!("{}/gelu", graph.node(n).name);
                        let gelu = graph.add_op(&name, Op::Unary(Unary::Gelu { tanh: false }), &[x]);
                        graph.replace_uses(out, gelu);
                        gelus += 1;
                        true
                    }
                    None => false,
                },
                _ => false,
            };
            if fused {
                // the pattern's nodes, so none of them is matched again
                graph.remove_dead();
            }
        }
        if norms + gelus > 0 {
            cx.notes.push(format!(
                "fuse-transformer: {norms} LayerNorm and {gelus} GELU decompositions fused"
            ));
        }
        Ok(())
    }
}

/// The value of a one-element f32 constant.
fn scalar(graph: &Graph, o: Outlet) -> Option<f32> {
    let t = graph.const_value(o)?;
    match &**t {
        Tensor::F32(a) if a.len() == 1 => a.iter().next().copied(),
        _ => None,
    }
}

/// The single node that reads `o` (not a graph output), if there is exactly one.
fn only_consumer(graph: &Graph, o: Outlet) -> Option<NodeIndex> {
    graph.has_single_use(o).then(|| graph.consumers(o)[0].0)
}

/// The inputs of a binary op node, if `n` is that op.
fn binary(graph: &Graph, n: NodeIndex, op: Binary) -> Option<(Outlet, Outlet)> {
    match graph.node(n).op {
        Op::Binary(b) if b == op => match graph.inputs_of(n)[..] {
            [a, b] => Some((a, b)),
            _ => None,
        },
        _ => None,
    }
}

/// The other operand of a commutative binary node `n` that reads `o`.
fn other_operand(graph: &Graph, n: NodeIndex, op: Binary, o: Outlet) -> Option<Outlet> {
    let (a, b) = binary(graph, n, op)?;
    match (a == o, b == o) {
        (true, false) => Some(b),
        (false, true) => Some(a),
        _ => None,
    }
}

/// True if `n` is a `ReduceMean` over the last axis only, keeping it, of a value of known rank.
fn mean_of_last_axis(graph: &Graph, n: NodeIndex) -> Option<Outlet> {
    let Op::ReduceMean {
        axes: Some(axes),
        keepdims: true,
    } = &graph.node(n).op
    else {
        return None;
    };
    let x = *graph.inputs_of(n).first()?;
    let rank = graph.fact(x)?.shape.len() as i64;
    (rank >= 1 && axes.len() == 1 && (axes[0] == -1 || axes[0] == rank - 1)).then_some(x)
}

/// A matched LayerNorm decomposition.
struct LayerNormMatch {
    x: Outlet,
    epsilon: f32,
    /// The last axis' size.
    d: usize,
    gamma: Option<Outlet>,
    beta: Option<Outlet>,
    /// The value the fused op replaces.
    out: Outlet,
    name: String,
}

fn match_layer_norm(graph: &Graph, mean: NodeIndex) -> Option<LayerNormMatch> {
    let x = mean_of_last_axis(graph, mean)?;
    let d = usize::try_from(graph.fact(x)?.shape.last()?.known()?).ok()?;
    let sub = only_consumer(graph, Outlet::new(mean, 0))?;
    let (sx, sm) = binary(graph, sub, Binary::Sub)?;
    if sx != x || sm != Outlet::new(mean, 0) {
        return None;
    }
    let diff = Outlet::new(sub, 0);
    // `diff` feeds exactly the square and the division
    let users = graph.consumers(diff);
    if users.len() != 2 || graph.output_outlets().contains(&diff) {
        return None;
    }
    let is_square = |n: NodeIndex| match graph.node(n).op {
        Op::Binary(Binary::Pow) => {
            let ins = graph.inputs_of(n);
            ins.len() == 2 && ins[0] == diff && scalar(graph, ins[1]) == Some(2.0)
        }
        Op::Binary(Binary::Mul) => graph.inputs_of(n) == [diff, diff],
        _ => false,
    };
    let (sq, div) = match (users[0].0, users[1].0) {
        (a, b) if is_square(a) => (a, b),
        (a, b) if is_square(b) => (b, a),
        _ => return None,
    };
    if users[0].0 == users[1].0 {
        // `d · d` is one node reading `diff` twice: the division is elsewhere
        return None;
    }
    let var = only_consumer(graph, Outlet::new(sq, 0))?;
    if mean_of_last_axis(graph, var)? != Outlet::new(sq, 0) {
        return None;
    }
    let add = only_consumer(graph, Outlet::new(var, 0))?;
    let epsilon = scalar(graph, other_operand(graph, add, Binary::Add, Outlet::new(var, 0))?)?;
    if epsilon.is_nan() || epsilon < 0.0 {
        return None;
    }
    let sqrt = only_consumer(graph, Outlet::new(add, 0))?;
    if graph.node(sqrt).op != Op::Unary(Unary::Sqrt) {
        return None;
    }
    if only_consumer(graph, Outlet::new(sqrt, 0))? != div
        || binary(graph, div, Binary::Div)? != (diff, Outlet::new(sqrt, 0))
    {
        return None;
    }
    // optional affine: `· γ`, then `+ β`, each a constant of the last axis' size
    let per_feature = |o: Outlet| {
        graph
            .const_value(o)
            .is_some_and(|t| t.dtype() == crate::ir::DType::F32 && t.shape() == [d])
    };
    let mut out = Outlet::new(div, 0);
    let (mut gamma, mut beta) = (None, None);
    if let Some(mul) = only_consumer(graph, out) {
        if let Some(g) = other_operand(graph, mul, Binary::Mul, out).filter(|&g| per_feature(g)) {
            gamma = Some(g);
            out = Outlet::new(mul, 0);
            if let Some(add) = only_consumer(graph, out) {
                if let Some(b) = other_operand(graph, add, Binary::Add, out).filter(|&b| per_feature(b)) {
                    beta = Some(b);
                    out = Outlet::new(add, 0);
                }
            }
        }
    }
    Some(LayerNormMatch {
        x,
        epsilon,
        d,
        gamma,
        beta,
        out,
        name: graph.node(mean).name.clone(),
    })
}

fn apply_layer_norm(graph: &mut Graph, m: LayerNormMatch) -> Result<()> {
    let gamma = match m.gamma {
        Some(g) => g,
        None => graph.add_const(&format!("{}/ones", m.name), Tensor::f32(&[m.d], vec![1.0; m.d])?),
    };
    let mut inputs = vec![m.x, gamma];
    inputs.extend(m.beta);
    let op = Op::LayerNorm {
        axis: -1,
        epsilon: m.epsilon,
    };
    let ln = graph.add_op(&format!("{}/layer_norm", m.name), op, &inputs);
    graph.replace_uses(m.out, ln);
    Ok(())
}

/// A GELU decomposition around the `Erf` node `erf`: its input `x` and the value it replaces.
fn match_gelu(graph: &Graph, erf: NodeIndex) -> Option<(Outlet, Outlet)> {
    const SQRT_2: f32 = std::f32::consts::SQRT_2;
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let close = |v: f32, want: f32| (v - want).abs() <= 2.0 * f32::EPSILON * want;
    let scaled = *graph.inputs_of(erf).first()?;
    let scale = only_consumer(graph, scaled)
        .filter(|&n| n == erf)
        .map(|_| scaled.node)?;
    let x = match binary(graph, scale, Binary::Div) {
        Some((x, c)) if scalar(graph, c).is_some_and(|c| close(c, SQRT_2)) => x,
        _ => {
            let (a, b) = binary(graph, scale, Binary::Mul)?;
            match (scalar(graph, a), scalar(graph, b)) {
                (_, Some(c)) if close(c, FRAC_1_SQRT_2) => a,
                (Some(c), _) if close(c, FRAC_1_SQRT_2) => b,
                _ => return None,
            }
        }
    };
    let e = Outlet::new(erf, 0);
    let add = only_consumer(graph, e)?;
    if scalar(graph, other_operand(graph, add, Binary::Add, e)?)? != 1.0 {
        return None;
    }
    let one_plus = Outlet::new(add, 0);
    let m1 = only_consumer(graph, one_plus)?;
    let other = other_operand(graph, m1, Binary::Mul, one_plus)?;
    let half = |o: Outlet| scalar(graph, o) == Some(0.5);
    let m1o = Outlet::new(m1, 0);
    if half(other) || other == x {
        // (0.5 · (1 + erf)) · x  or  (x · (1 + erf)) · 0.5
        let m2 = only_consumer(graph, m1o)?;
        let last = other_operand(graph, m2, Binary::Mul, m1o)?;
        let ok = if half(other) { last == x } else { half(last) };
        return ok.then_some((x, Outlet::new(m2, 0)));
    }
    // (x · 0.5) · (1 + erf)
    let h = other.node;
    let hx = other_operand(graph, h, Binary::Mul, x)?;
    (half(hx) && only_consumer(graph, other) == Some(m1)).then_some((x, m1o))
}
