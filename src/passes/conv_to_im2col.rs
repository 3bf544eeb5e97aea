//! `conv-to-im2col`: every ungrouped Conv with a constant weight becomes explicit IR nodes
//! `Im2Col → MatMul(W as (C·kh·kw)×M) → Add(bias) → Transpose → Reshape(NCHW)`, so the matrix
//! multiplication the lookup-table pass replaces is visible. Grouped and depthwise convolutions
//! are left as Conv (each group's MatMul would be tiny: `C/g·kh·kw` rows, e.g. 9 for a 3×3
//! depthwise conv, too short to split into codebooks), and the skip is noted in the report.
//! Kernel rows and columns that only ever meet padding (a 3×3 conv on a 1×1 map, or with
//! stride 2 on a 2×2 one: [`crate::ir::window::pruned_taps`]) are dropped first, with a note: the MatMul has only
//! the taps that touch the image, so the lookups replace (and the cost counts) the layer the
//! interpreter and ONNX Runtime run, not nine times its work.

use super::{Pass, PassCx};
use crate::error::{Error, Result};
use crate::ir::op::{Binary, Op};
use crate::ir::window::{pruned_weights, spatial};
use crate::ir::{Graph, Outlet, Tensor};
use petgraph::stable_graph::NodeIndex;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// Leave convolutions with fewer multiply-accumulates per image than this as Conv.
    #[serde(default)]
    pub min_macs: u64,
}

pub struct ConvToIm2col(pub Options);

impl Pass for ConvToIm2col {
    fn name(&self) -> &'static str {
        "conv-to-im2col"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).expect("options serialise")
    }
    fn run(&self, graph: &mut Graph, cx: &mut PassCx) -> Result<()> {
        let convs: Vec<NodeIndex> = graph
            .g
            .node_indices()
            .filter(|&n| matches!(graph.node(n).op, Op::Conv(_)))
            .collect();
        // each conv's input size and multiply-adds, read before any rewrite (the nodes a
        // rewrite adds have no facts until the graph is inferred again)
        let sizes: Vec<(Option<[usize; 2]>, u64)> = convs
            .iter()
            .map(|&n| match &graph.node(n).op {
                Op::Conv(c) => (
                    graph
                        .fact(graph.inputs_of(n)[0])
                        .and_then(|f| spatial(&f.shape, c.nhwc)),
                    crate::ir::cost::node_macs(graph, n),
                ),
                _ => (None, 0),
            })
            .collect();
        for (n, (hw, macs)) in convs.into_iter().zip(sizes) {
            let node = graph.node(n);
            let Op::Conv(conv) = node.op.clone() else {
                unreachable!()
            };
            let name = node.name.clone();
            if conv.group != 1 {
                cx.notes
                    .push(format!("conv-to-im2col: left {name} as Conv (group={})", conv.group));
                continue;
            }
            if macs < self.0.min_macs {
                cx.notes
                    .push(format!("conv-to-im2col: left {name} as Conv (below min_macs)"));
                continue;
            }
            let ins = graph.inputs_of(n);
            let Some(w) = graph.const_value(ins[1]).cloned() else {
                cx.notes
                    .push(format!("conv-to-im2col: left {name} as Conv (weight is not constant)"));
                continue;
            };
            let out_fact = graph
                .fact(Outlet::new(n, 0))
                .cloned()
                .ok_or_else(|| Error::node(&name, "Conv", "output shape unknown"))?;
            let (m, oh, ow) = match out_fact.shape[1..] {
                [m, oh, ow] => (m, oh, ow),
                _ => return Err(Error::node(&name, "Conv", "output is not 4-D")),
            };
            let w = w.as_f32()?;
            // kernel rows/columns that only ever meet padding (a 3×3 conv on a 1×1 map) are
            // dropped: the lookups (and the cost) see the layer the interpreter runs
            let mut conv = conv;
            let pruned = match hw.filter(|_| w.ndim() == 4) {
                Some(hw) => {
                    let ws = w.shape();
                    let data = w.as_standard_layout();
                    let data = data.as_slice().expect("standard layout");
                    pruned_weights(&conv, hw, data, ws)
                        .map_err(|e| Error::node(&name, "Conv", e.to_string()))?
                        .map(|(small, sliced)| {
                            let kept = small.window.kernel;
                            cx.notes.push(format!(
                                "conv-to-im2col: {name}: {}×{} kernel taps that only meet padding on a {}×{} input dropped ({}×{} kept)",
                                ws[2], ws[3], hw[0], hw[1], kept[0], kept[1]
                            ));
                            conv = small;
                            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[ws[0], ws[1], kept[0], kept[1]]), sliced)
                                .expect("sliced taps fill the kernel")
                        })
                }
                None => None,
            };
            let w = pruned.as_ref().unwrap_or(w);
            let k: usize = w.shape()[1..].iter().product();
            let wm = w
                .to_shape((w.shape()[0], k))
                .map_err(|e| Error::node(&name, "Conv", e.to_string()))?
                .t()
                .as_standard_layout()
                .into_owned()
                .into_dyn();
            let cols = graph.add_op(&format!("{name}/im2col"), Op::Im2Col(conv.window.clone()), &[ins[0]]);
            let wc = graph.add_const(&format!("{name}/weight_km"), Tensor::F32(wm));
            let mut y = graph.add_op(&format!("{name}/matmul"), Op::MatMul, &[cols, wc]);
            if let Some(b) = ins.get(2) {
                y = graph.add_op(&format!("{name}/bias"), Op::Binary(Binary::Add), &[y, *b]);
            }
            let yt = graph.add_op(
                &format!("{name}/to_nchw"),
                Op::Transpose {
                    perm: Some(vec![0, 2, 1]),
                },
                &[y],
            );
            let dims: Vec<i64> = [m, oh, ow].iter().map(|d| d.known().unwrap_or(-1)).collect();
            let shape = graph.add_const(&format!("{name}/nchw_shape"), Tensor::i64_vec([vec![0], dims].concat()));
            let out = graph.add_op(
                &format!("{name}/reshape"),
                Op::Reshape { allowzero: false },
                &[yt, shape],
            );
            graph.replace_uses(Outlet::new(n, 0), out);
            graph.g.remove_node(n);
        }
        graph.remove_dead();
        Ok(())
    }
}
