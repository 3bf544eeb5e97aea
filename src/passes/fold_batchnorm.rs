//! `fold-batchnorm`: a BatchNormalization whose input comes only from a Conv, Gemm or MatMul
//! with constant weights is folded into those weights and bias (`s = γ/√(σ²+ε)`,
//! `W' = W·s` per output channel, `b' = (b−μ)·s + β`). A BatchNormalization with any other
//! producer is left as it is (the interpreter runs it exactly).

use super::{Pass, PassCx};
use crate::error::Result;
use crate::ir::op::{Binary, Op};
use crate::ir::{Graph, Outlet, Tensor};
use ndarray::{Axis, IxDyn};
use petgraph::stable_graph::NodeIndex;

pub struct FoldBatchnorm;

impl Pass for FoldBatchnorm {
    fn name(&self) -> &'static str {
        "fold-batchnorm"
    }
    fn run(&self, graph: &mut Graph, cx: &mut PassCx) -> Result<()> {
        let bns: Vec<NodeIndex> = graph
            .g
            .node_indices()
            .filter(|&n| matches!(graph.node(n).op, Op::BatchNorm { .. }))
            .collect();
        for bn in bns {
            if !fold_one(graph, bn)? {
                cx.notes.push(format!(
                    "fold-batchnorm: kept {} (its producer is not a Conv/Gemm/MatMul with constant weights used only here)",
                    graph.node(bn).name
                ));
            }
        }
        graph.remove_dead();
        Ok(())
    }
}

/// Per-channel scale `s` and shift `t` of an inference BatchNorm, if its parameters are constant.
fn bn_affine(graph: &Graph, bn: NodeIndex) -> Option<(Vec<f32>, Vec<f32>)> {
    let Op::BatchNorm { epsilon } = graph.node(bn).op else {
        return None;
    };
    let ins = graph.inputs_of(bn);
    let p: Vec<Vec<f32>> = ins[1..5]
        .iter()
        .map(|o| graph.const_value(*o).map(|t| t.to_f32_vec()))
        .collect::<Option<_>>()?;
    let s: Vec<f32> = p[0].iter().zip(&p[3]).map(|(g, v)| g / (v + epsilon).sqrt()).collect();
    let t: Vec<f32> = (0..s.len()).map(|i| p[1][i] - p[2][i] * s[i]).collect();
    Some((s, t))
}

fn fold_one(graph: &mut Graph, bn: NodeIndex) -> Result<bool> {
    let Some((s, t)) = bn_affine(graph, bn) else {
        return Ok(false);
    };
    let src = graph.inputs_of(bn)[0];
    if !graph.has_single_use(src) {
        return Ok(false);
    }
    let prod = src.node;
    let pins = graph.inputs_of(prod);
    let Some(w) = pins
        .get(1)
        .and_then(|o| graph.const_value(*o))
        .map(|w| w.as_f32().cloned())
    else {
        return Ok(false);
    };
    let mut w = w?;
    let name = graph.node(prod).name.clone();
    let bias_in = pins.get(2).and_then(|o| graph.const_value(*o)).map(|b| b.to_f32_vec());
    if pins.len() > 2 && bias_in.is_none() {
        return Ok(false);
    }
    let m = s.len();
    let out = match graph.node(prod).op.clone() {
        Op::Conv(_) => {
            if w.shape()[0] != m {
                return Ok(false);
            }
            for (i, mut row) in w.axis_iter_mut(Axis(0)).enumerate() {
                row.mapv_inplace(|v| v * s[i]);
            }
            let b = bias_in.unwrap_or_else(|| vec![0.0; m]);
            let nb: Vec<f32> = (0..m).map(|i| b[i] * s[i] + t[i]).collect();
            let wc = graph.add_const(&format!("{name}.weight_bn"), Tensor::F32(w));
            let bc = graph.add_const(&format!("{name}.bias_bn"), Tensor::f32(&[m], nb)?);
            graph.set_input(prod, 1, wc);
            graph.set_input(prod, 2, bc);
            Outlet::new(prod, 0)
        }
        Op::Gemm(mut g) => {
            // out[:, j] = alpha·(A·op(B))[:, j] + beta·C[j]; scale column j of op(B) and rebuild C.
            let col_axis = if g.trans_b { 0 } else { 1 };
            if w.ndim() != 2 || w.shape()[col_axis] != m {
                return Ok(false);
            }
            for (j, mut lane) in w.axis_iter_mut(Axis(col_axis)).enumerate() {
                lane.mapv_inplace(|v| v * s[j]);
            }
            let c = match pins.get(2).and_then(|o| graph.const_value(*o)) {
                Some(c) => match c.as_f32()?.broadcast(IxDyn(&[m])) {
                    Some(cb) => cb.iter().map(|v| v * g.beta).collect(),
                    None => return Ok(false), // C varies per row: cannot fold into a bias vector
                },
                None => vec![0.0; m],
            };
            let nc: Vec<f32> = (0..m).map(|j| c[j] * s[j] + t[j]).collect();
            g.beta = 1.0;
            graph.node_mut(prod).op = Op::Gemm(g);
            let wc = graph.add_const(&format!("{name}.weight_bn"), Tensor::F32(w));
            let cc = graph.add_const(&format!("{name}.bias_bn"), Tensor::f32(&[m], nc)?);
            graph.set_input(prod, 1, wc);
            graph.set_input(prod, 2, cc);
            Outlet::new(prod, 0)
        }
        Op::MatMul => {
            // BatchNorm's channel axis is 1; for a MatMul that is the last axis only when 2-D.
            if w.ndim() != 2 || w.shape()[1] != m || graph.fact(src).map(|f| f.rank()) != Some(2) {
                return Ok(false);
            }
            for (j, mut col) in w.axis_iter_mut(Axis(1)).enumerate() {
                col.mapv_inplace(|v| v * s[j]);
            }
            let wc = graph.add_const(&format!("{name}.weight_bn"), Tensor::F32(w));
            graph.set_input(prod, 1, wc);
            let tc = graph.add_const(&format!("{name}.shift_bn"), Tensor::f32(&[m], t)?);
            graph.add_op(
                &format!("{name}/bn_shift"),
                Op::Binary(Binary::Add),
                &[Outlet::new(prod, 0), tc],
            )
        }
        _ => return Ok(false),
    };
    graph.replace_uses(Outlet::new(bn, 0), out);
    graph.g.remove_node(bn);
    Ok(true)
}
