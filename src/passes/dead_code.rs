//! `dead-code`: forward Identity nodes to their input, then remove every node no graph output
//! depends on (graph inputs are kept).

use super::{Pass, PassCx};
use crate::error::Result;
use crate::ir::op::Unary;
use crate::ir::{Graph, Op, Outlet};

pub struct DeadCode;

impl Pass for DeadCode {
    fn name(&self) -> &'static str {
        "dead-code"
    }
    fn run(&self, graph: &mut Graph, _cx: &mut PassCx) -> Result<()> {
        let identities: Vec<_> = graph
            .g
            .node_indices()
            .filter(|&n| matches!(graph.node(n).op, Op::Unary(Unary::Identity)))
            .collect();
        for n in identities {
            let src = graph.inputs_of(n)[0];
            graph.replace_uses(Outlet::new(n, 0), src);
        }
        graph.remove_dead();
        Ok(())
    }
}
