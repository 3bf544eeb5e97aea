//! What follows a replaceable MatMul up to the end of its block: its constant bias, the layout
//! ops that turn its rows back into an image (`Transpose`, `Reshape`, `Flatten`), and the
//! elementwise ops after them (ReLU, Clip, the residual `Add` of another runtime value of the
//! same shape). BatchNorm is already folded into the weights. The chain stops at anything
//! else (pooling, a value used twice, a graph output, the next MatMul's Im2Col…).
//!
//! Elementwise ops commute with permutations, so the block's end value is computed row by row
//! in the layer's own layout once every value is read through the permutation the layout ops
//! apply. That permutation is found by running the layout ops on a one-image tensor of element
//! indices.

use crate::error::Result;
use crate::interp::eval::eval_op;
use crate::ir::op::{Binary, Op, Unary};
use crate::ir::{Graph, Outlet, Tensor};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub enum Step {
    Relu,
    Clip(f32, f32),
    /// Add `other` (same shape); `perm` places the layer's rows in its layout.
    Add {
        other: Outlet,
        perm: Vec<u32>,
    },
}

#[derive(Clone, Debug)]
pub struct Epilogue {
    /// The constant bias right after the MatMul (`m` values), if any.
    pub bias: Option<Vec<f32>>,
    pub steps: Vec<Step>,
    /// The block's end value (after the last elementwise step) and where the layer's rows sit
    /// in it.
    pub end: Outlet,
    pub end_perm: Vec<u32>,
}

/// Per image, where each element of the layer's layout went: `idx` holds, at each position of
/// the current layout, the index it came from.
fn perm_of(idx: &Tensor) -> Option<Vec<u32>> {
    let v = idx.to_f32_vec();
    let mut perm = vec![u32::MAX; v.len()];
    for (q, &src) in v.iter().enumerate() {
        let s = src as usize;
        if src < 0.0 || s >= perm.len() || perm[s] != u32::MAX {
            return None;
        }
        perm[s] = q as u32;
    }
    Some(perm)
}

/// The epilogue of the MatMul whose output is `mm_out` (`[N, …, m]`), or `None` when no
/// elementwise op follows it (the block ends at the layer, bias included).
pub fn find(graph: &Graph, mm_out: Outlet, m: usize) -> Result<Option<Epilogue>> {
    let Some(f) = graph.fact(mm_out) else {
        return Ok(None);
    };
    let Some(rest) = f.shape[1..].iter().map(|d| d.known()).collect::<Option<Vec<_>>>() else {
        return Ok(None);
    };
    let mut shape = vec![1usize];
    shape.extend(rest.iter().map(|&d| d as usize));
    let len: usize = shape.iter().product();
    if len >= 1 << 24 || shape.last() != Some(&m) {
        return Ok(None); // indices must stay exact in f32
    }
    let mut idx = Tensor::f32(&shape, (0..len).map(|i| i as f32).collect())?;
    let (mut cur, mut bias, mut steps, mut end) = (mm_out, None, Vec::new(), None);
    let mut moved = false; // a layout op has run: the bias can no longer be matched
    loop {
        if graph.outputs.iter().any(|(_, o)| *o == cur) {
            break;
        }
        let [(node, port)] = graph.consumers(cur)[..] else {
            break;
        };
        let ins = graph.inputs_of(node);
        let op = &graph.node(node).op;
        let n_steps = steps.len();
        match op {
            Op::Binary(Binary::Add) if ins.len() == 2 => {
                let other = ins[1 - port];
                match graph.const_value(other) {
                    Some(b) if !moved && bias.is_none() && steps.is_empty() && b.shape() == [m] => {
                        bias = Some(b.to_f32_vec());
                    }
                    Some(_) => break,
                    None => {
                        if graph.fact(other).map(|f| &f.shape) != graph.fact(cur).map(|f| &f.shape) {
                            break;
                        }
                        let Some(perm) = perm_of(&idx) else { break };
                        steps.push(Step::Add { other, perm });
                    }
                }
            }
            Op::Unary(Unary::Relu) => steps.push(Step::Relu),
            Op::Unary(Unary::Clip { min, max }) => steps.push(Step::Clip(*min, *max)),
            Op::Transpose { .. } | Op::Reshape { .. } | Op::Flatten { .. } if port == 0 => {
                let mut args = vec![Arc::new(idx.clone())];
                for o in &ins[1..] {
                    match graph.const_value(*o) {
                        Some(t) => args.push(t.clone()),
                        None => return Ok(finish(bias, steps, end)),
                    }
                }
                match eval_op(op, args) {
                    Ok(mut out) if !out.is_empty() => idx = out.remove(0),
                    _ => break,
                }
                moved = true;
            }
            _ => break,
        }
        cur = Outlet::new(node, 0);
        if steps.len() > n_steps {
            // an elementwise step: the block reaches at least this far
            match perm_of(&idx) {
                Some(perm) => end = Some((cur, perm)),
                None => break,
            }
        }
    }
    Ok(finish(bias, steps, end))
}

/// The epilogue up to the last elementwise step (`end`); layout ops after it are not part of it.
fn finish(bias: Option<Vec<f32>>, steps: Vec<Step>, end: Option<(Outlet, Vec<u32>)>) -> Option<Epilogue> {
    let (end, end_perm) = end?;
    Some(Epilogue {
        bias,
        steps,
        end,
        end_perm,
    })
}
