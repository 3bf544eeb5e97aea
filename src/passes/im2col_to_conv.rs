//! `im2col-to-conv`: the inverse of `conv-to-im2col` for layers that stayed exact. The chain
//! `Im2Col → MatMul(W) → [Add(b)] → Transpose(0,2,1) → Reshape(NCHW)` becomes one `Conv` again,
//! which the interpreter runs as a direct im2col+GEMM per image with no intermediate
//! `[N, oh·ow, C·kh·kw]` matrix or transpose. Put it after `lut`/`mask` so exact layers keep
//! the fast path; approximated layers (PQEncode/LutMatMul) are not touched.

use super::{Pass, PassCx};
use crate::error::Result;
use crate::ir::op::{Binary, Conv, Op};
use crate::ir::{Graph, Outlet, Tensor};
use petgraph::stable_graph::NodeIndex;

pub struct Im2colToConv;

/// The producer of `o` if `o` has exactly one use.
fn single_producer(graph: &Graph, o: Outlet) -> Option<NodeIndex> {
    graph.has_single_use(o).then_some(o.node)
}

fn fold_one(graph: &mut Graph, reshape: NodeIndex) -> Option<()> {
    let rins = graph.inputs_of(reshape);
    let tr = single_producer(graph, rins[0])?;
    if !matches!(&graph.node(tr).op, Op::Transpose { perm: Some(p) } if p == &[0, 2, 1]) {
        return None;
    }
    let mut cur = single_producer(graph, graph.inputs_of(tr)[0])?;
    let mut bias = None;
    if let Op::Binary(Binary::Add) = graph.node(cur).op {
        let ins = graph.inputs_of(cur);
        bias = Some(graph.const_value(ins[1])?.clone());
        cur = single_producer(graph, ins[0])?;
    }
    if !matches!(graph.node(cur).op, Op::MatMul) {
        return None;
    }
    let mins = graph.inputs_of(cur);
    let w = graph.const_value(mins[1])?.as_f32().ok()?.clone();
    let im = single_producer(graph, mins[0])?;
    let Op::Im2Col(win) = graph.node(im).op.clone() else {
        return None;
    };
    let x = graph.inputs_of(im)[0];
    let c = graph.fact(x)?.shape.get(1)?.known()? as usize;
    let (k, m) = (w.shape()[0], w.shape()[1]);
    if k != c * win.kernel[0] * win.kernel[1] || bias.as_ref().is_some_and(|b| b.shape() != [m]) {
        return None;
    }
    // the target must be the conv's own output shape (batch copied)
    let out_fact = graph.fact(Outlet::new(reshape, 0))?.clone();
    if out_fact.rank() != 4 || out_fact.shape[1].known()? as usize != m {
        return None;
    }
    let wt = w
        .t()
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order(vec![m, c, win.kernel[0], win.kernel[1]])
        .ok()?;
    let mm_name = graph.node(cur).name.clone();
    let base = mm_name.strip_suffix("/matmul").unwrap_or(&mm_name).to_string();
    let wc = graph.add_const(&format!("{base}.weight"), Tensor::F32(wt.into_dyn()));
    let mut args = vec![x, wc];
    if let Some(b) = bias {
        args.push(graph.add_const(&format!("{base}.bias"), (*b).clone()));
    }
    let conv = graph.add_op(&base, Op::Conv(Conv::nchw(win, 1)), &args);
    graph.replace_uses(Outlet::new(reshape, 0), conv);
    Some(())
}

impl Pass for Im2colToConv {
    fn name(&self) -> &'static str {
        "im2col-to-conv"
    }
    fn run(&self, graph: &mut Graph, _cx: &mut PassCx) -> Result<()> {
        let reshapes: Vec<NodeIndex> = graph
            .topo_order()?
            .into_iter()
            .filter(|&n| matches!(graph.node(n).op, Op::Reshape { .. }))
            .collect();
        for r in reshapes {
            if graph.g.contains_node(r) && fold_one(graph, r).is_some() {
                graph.remove_dead();
            }
        }
        Ok(())
    }
}
