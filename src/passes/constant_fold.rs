//! `constant-fold`: evaluate every node whose inputs are all constants (and `Shape` of a value
//! whose shape is fully known) and replace it by a constant. The importer does the same on the
//! fly; this pass catches what other rewrites expose.

use super::{Pass, PassCx};
use crate::error::{Error, Result};
use crate::interp::eval::eval_op;
use crate::ir::{Graph, Op, Outlet, Tensor};

pub struct ConstantFold;

impl Pass for ConstantFold {
    fn name(&self) -> &'static str {
        "constant-fold"
    }
    fn run(&self, graph: &mut Graph, _cx: &mut PassCx) -> Result<()> {
        for n in graph.topo_order()? {
            let node = graph.node(n);
            if matches!(node.op, Op::Input | Op::Const(_)) {
                continue;
            }
            let ins = graph.inputs_of(n);
            let folded = if let (Op::Shape { .. }, Some(shape)) = (
                &node.op,
                ins.first()
                    .and_then(|o| graph.fact(*o))
                    .and_then(|f| f.concrete_shape()),
            ) {
                let out = eval_op(
                    &node.op,
                    vec![std::sync::Arc::new(Tensor::F32(ndarray::ArrayD::zeros(
                        ndarray::IxDyn(&shape),
                    )))],
                );
                Some(out)
            } else if !ins.is_empty() && ins.iter().all(|o| graph.const_value(*o).is_some()) {
                let args = ins.iter().map(|o| graph.const_value(*o).unwrap().clone()).collect();
                Some(eval_op(&node.op, args))
            } else {
                None
            };
            if let Some(out) = folded {
                let t = out
                    .map_err(|e| Error::node(&node.name, node.op.name(), e.to_string()))?
                    .remove(0);
                let name = format!("{}.folded", node.name);
                let c = graph.add_const(&name, t);
                graph.replace_uses(Outlet::new(n, 0), c);
                graph.g.remove_node(n);
            }
        }
        graph.remove_dead();
        Ok(())
    }
}
