//! A deterministic, human-readable text form of the graph: topological order, values renumbered
//! `%0…%n`, one node per line with op, operands, attributes, node name and output type.
//! Tensors print as `dtype[shape] #hash`, never as raw weights. Used by `tabconv inspect` and
//! by snapshot tests.

use super::graph::{Graph, Outlet};
use super::op::Op;
use crate::error::Result;
use std::collections::HashMap;
use std::fmt::Write;

pub fn dump(graph: &Graph) -> Result<String> {
    let order = graph.topo_order()?;
    let mut ids: HashMap<Outlet, usize> = HashMap::new();
    let mut next = 0usize;
    let mut s = String::new();
    for n in &order {
        let node = graph.node(*n);
        let outs: Vec<String> = (0..node.outputs.len())
            .map(|slot| {
                ids.insert(Outlet::new(*n, slot), next);
                next += 1;
                format!("%{}", next - 1)
            })
            .collect();
        let ty: Vec<String> = node
            .outputs
            .iter()
            .map(|v| v.fact.as_ref().map(|f| f.shape_string()).unwrap_or_else(|| "?".into()))
            .collect();
        match &node.op {
            Op::Input => {
                let _ = writeln!(s, "input {} = \"{}\" : {}", outs.join(", "), node.name, ty.join(", "));
            }
            Op::Const(t) => {
                let _ = writeln!(s, "{} = Const {} \"{}\"", outs.join(", "), t.summary(), node.name);
            }
            op => {
                let args: Vec<String> = graph
                    .inputs_of(*n)
                    .iter()
                    .map(|o| ids.get(o).map(|i| format!("%{i}")).unwrap_or_else(|| "%?".into()))
                    .collect();
                let attrs = op.attrs();
                let _ = writeln!(
                    s,
                    "{} = {}({}){}{} \"{}\" : {}",
                    outs.join(", "),
                    op.name(),
                    args.join(", "),
                    if attrs.is_empty() { "" } else { " " },
                    attrs,
                    node.name,
                    ty.join(", ")
                );
            }
        }
    }
    for (name, o) in &graph.outputs {
        let id = ids.get(o).map(|i| format!("%{i}")).unwrap_or_else(|| "%?".into());
        let _ = writeln!(s, "output \"{name}\" = {id}");
    }
    Ok(s)
}
