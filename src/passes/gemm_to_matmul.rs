//! `gemm-to-matmul`: `Gemm(A, B, C)` with a constant B becomes `MatMul(A', α·op(B)) + β·C`
//! (`A' = Aᵀ` through a Transpose node when transA), so every fully-connected layer reaches the
//! lookup-table pass as a plain `[rows × K] · [K × N]` MatMul with a constant right operand.

use super::{Pass, PassCx};
use crate::error::Result;
use crate::ir::op::{Binary, Op};
use crate::ir::{Graph, Outlet, Tensor};
use petgraph::stable_graph::NodeIndex;

pub struct GemmToMatmul;

impl Pass for GemmToMatmul {
    fn name(&self) -> &'static str {
        "gemm-to-matmul"
    }
    fn run(&self, graph: &mut Graph, cx: &mut PassCx) -> Result<()> {
        let gemms: Vec<NodeIndex> = graph
            .g
            .node_indices()
            .filter(|&n| matches!(graph.node(n).op, Op::Gemm(_)))
            .collect();
        for n in gemms {
            let Op::Gemm(g) = graph.node(n).op.clone() else {
                unreachable!()
            };
            let name = graph.node(n).name.clone();
            let ins = graph.inputs_of(n);
            let Some(b) = graph.const_value(ins[1]).cloned() else {
                cx.notes
                    .push(format!("gemm-to-matmul: left {name} as Gemm (B is not constant)"));
                continue;
            };
            let b = b.as_f32()?;
            let b = if g.trans_b { b.t().to_owned() } else { b.clone() };
            let b = b.mapv(|v| v * g.alpha).as_standard_layout().into_owned();
            let mut a = ins[0];
            if g.trans_a {
                a = graph.add_op(
                    &format!("{name}/transpose_a"),
                    Op::Transpose { perm: Some(vec![1, 0]) },
                    &[a],
                );
            }
            let bc = graph.add_const(&format!("{name}/weight_kn"), Tensor::F32(b));
            let mut y = graph.add_op(&format!("{name}/matmul"), Op::MatMul, &[a, bc]);
            if let (Some(c), true) = (ins.get(2).and_then(|o| graph.const_value(*o)).cloned(), g.beta != 0.0) {
                let cc = graph.add_const(&format!("{name}/bias"), Tensor::F32(c.as_f32()?.mapv(|v| v * g.beta)));
                y = graph.add_op(&format!("{name}/bias_add"), Op::Binary(Binary::Add), &[y, cc]);
            } else if let (Some(c), true) = (ins.get(2), g.beta != 0.0) {
                let y2 = if g.beta == 1.0 {
                    *c
                } else {
                    let beta = graph.add_const(&format!("{name}/beta"), Tensor::scalar_f32(g.beta));
                    graph.add_op(&format!("{name}/beta_c"), Op::Binary(Binary::Mul), &[*c, beta])
                };
                y = graph.add_op(&format!("{name}/bias_add"), Op::Binary(Binary::Add), &[y, y2]);
            }
            graph.replace_uses(Outlet::new(n, 0), y);
            graph.g.remove_node(n);
        }
        graph.remove_dead();
        Ok(())
    }
}
