//! Shape inference: every value gets a dtype and a shape whose only unknown may be the batch.
//! Small integer values (shapes) are propagated symbolically so Reshape targets built from
//! `Shape` of a batch-dynamic tensor still give a static output shape.

use super::fact::{dims_product, Dim, Fact};
use super::graph::Graph;
use super::op::{Binary, Conv, Encoder, Op, PqEncode};
use super::tensor::DType;
use crate::error::{Error, Result};

/// Re-infer every node's output facts in topological order. Input nodes keep their facts.
pub fn infer_graph(graph: &mut Graph) -> Result<()> {
    for n in graph.topo_order()? {
        if matches!(graph.node(n).op, Op::Input) {
            continue;
        }
        let ins = graph.inputs_of(n);
        let mut facts = Vec::with_capacity(ins.len());
        for o in &ins {
            let node = graph.node(n);
            let f = graph
                .fact(*o)
                .ok_or_else(|| Error::node(&node.name, node.op.name(), "an input has no inferred shape"))?;
            facts.push(f.clone());
        }
        let node = graph.node(n);
        let out = infer_op(&node.op, &facts).map_err(|e| Error::node(&node.name, node.op.name(), e.to_string()))?;
        for (v, f) in graph.node_mut(n).outputs.iter_mut().zip(out) {
            v.fact = Some(f);
        }
    }
    Ok(())
}

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Other(msg.into()))
}

/// Resolve a possibly negative ONNX axis against a rank.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    if axis < -r || axis >= r.max(1) {
        return err(format!("axis {axis} out of range for rank {rank}"));
    }
    Ok(if axis < 0 { axis + r } else { axis } as usize)
}

fn product_dim(dims: &[Dim]) -> Result<Dim> {
    match dims_product(dims) {
        Some((k, 0)) => Ok(Dim::Known(k)),
        Some((k, 1)) => Ok(Dim::Batch(k)),
        Some(_) => err("shape has the batch symbol twice in one product"),
        None => err("the product of the dimensions overflows"),
    }
}

/// `a + b` on dimensions, checked.
fn add_dims(a: i64, b: i64) -> Result<i64> {
    a.checked_add(b)
        .ok_or_else(|| Error::Other(format!("dimension {a} + {b} overflows")))
}

/// Every output must be a tensor tabconv could allocate: no negative dimension, and (with the
/// batch taken as 1) no more bytes than the per-tensor limit of [`crate::limits`].
fn check_fact_size(f: &Fact) -> Result<()> {
    let dims: Vec<usize> = f
        .shape
        .iter()
        .map(|d| {
            let v = match *d {
                Dim::Known(v) | Dim::Batch(v) => v,
            };
            usize::try_from(v).map_err(|_| Error::Other(format!("negative dimension in {}", f.shape_string())))
        })
        .collect::<Result<_>>()?;
    crate::limits::check_shape(&dims, f.dtype.size_of(), &format!("output {}", f.shape_string()))?;
    Ok(())
}

pub fn broadcast(a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>> {
    let r = a.len().max(b.len());
    let mut out = Vec::with_capacity(r);
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            Dim::Known(1)
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            Dim::Known(1)
        };
        out.push(match (da, db) {
            (x, y) if x == y => x,
            (Dim::Known(1), y) => y,
            (x, Dim::Known(1)) => x,
            (x, y) => return err(format!("cannot broadcast dimension {x} with {y}")),
        });
    }
    Ok(out)
}

fn spatial(f: &Fact, what: &str) -> Result<[usize; 2]> {
    if f.rank() != 4 {
        return err(format!("{what} expects a 4-D NCHW input, got {}", f.shape_string()));
    }
    match (f.shape[2], f.shape[3]) {
        (Dim::Known(h), Dim::Known(w)) => Ok([h as usize, w as usize]),
        _ => err("spatial dimensions must be known"),
    }
}

fn spatial_nhwc(f: &Fact, what: &str) -> Result<[usize; 2]> {
    if f.rank() != 4 {
        return err(format!("{what} expects a 4-D NHWC input, got {}", f.shape_string()));
    }
    match (f.shape[1], f.shape[2]) {
        (Dim::Known(h), Dim::Known(w)) => Ok([h as usize, w as usize]),
        _ => err("spatial dimensions must be known"),
    }
}

/// Channels-last Conv: group 1 or depthwise (`group = C = M`, weight `[C, 1, kh, kw]`).
fn nhwc_conv(c: &crate::ir::op::Conv, x: &Fact, w: &Fact) -> Result<Fact> {
    let hw = spatial_nhwc(x, "Conv")?;
    let (ws, ch) = match (w.concrete_shape(), x.shape[3].known()) {
        (Some(ws), Some(ch)) if ws.len() == 4 && !ws.contains(&0) => (ws, ch as usize),
        _ => {
            return err("channels-last Conv needs a known 4-D weight with no empty dimension and a known channel count")
        }
    };
    let ok = match c.group {
        1 => ws[1] == ch,
        g => g == ch && ws[0] == ch && ws[1] == 1,
    };
    if !ok || ws[2] != c.window.kernel[0] || ws[3] != c.window.kernel[1] {
        return err(format!(
            "channels-last Conv (group {}) does not fit weight {ws:?} and input {}",
            c.group,
            x.shape_string()
        ));
    }
    let g = c.window.resolve(hw)?;
    Ok(Fact::new(
        DType::F32,
        vec![
            x.shape[0],
            Dim::Known(g.out[0] as i64),
            Dim::Known(g.out[1] as i64),
            Dim::Known(ws[0] as i64),
        ],
    ))
}

/// A `Conv`'s output fact: NCHW, or channels-last with its fused bias, ReLU and residual.
fn conv(c: &Conv, ins: &[Fact]) -> Result<Fact> {
    need(ins, 2)?;
    let (x, w) = (&ins[0], &ins[1]);
    if c.nhwc {
        let out = nhwc_conv(c, x, w)?;
        if let Some(b) = ins.get(2) {
            if b.rank() != 1 || b.shape[0] != out.shape[3] {
                return err(format!(
                    "bias {} does not fit {} output channels",
                    b.shape_string(),
                    out.shape[3]
                ));
            }
        }
        if let Some(r) = ins.get(3) {
            if r.shape != out.shape {
                return err(format!(
                    "residual {} does not match the output {}",
                    r.shape_string(),
                    out.shape_string()
                ));
            }
        }
        return Ok(out);
    }
    if c.relu || ins.len() > 3 {
        return err("a fused ReLU or residual needs the channels-last Conv");
    }
    let hw = spatial(x, "Conv")?;
    let ws = w.concrete_shape().unwrap_or_default();
    if ws.len() != 4 || ws.contains(&0) {
        return err(format!(
            "weight must be 4-D with no empty dimension, got {}",
            w.shape_string()
        ));
    }
    if [ws[2], ws[3]] != c.window.kernel {
        return err(format!(
            "kernel_shape {:?} does not match weight {}",
            c.window.kernel,
            w.shape_string()
        ));
    }
    if c.group == 0 || !ws[0].is_multiple_of(c.group) {
        return err(format!(
            "{} output channels do not split into {} groups",
            ws[0], c.group
        ));
    }
    if let Some(b) = ins.get(2) {
        if b.concrete_shape() != Some(vec![ws[0]]) {
            return err(format!(
                "bias {} does not match {} output channels",
                b.shape_string(),
                ws[0]
            ));
        }
    }
    let wc = (ws[1] as i64)
        .checked_mul(c.group as i64)
        .ok_or_else(|| Error::Other("channel count overflows".into()))?;
    if x.shape[1] != Dim::Known(wc) {
        return err(format!(
            "input has {} channels but weight {} with group {} expects {wc}",
            x.shape[1],
            w.shape_string(),
            c.group
        ));
    }
    let g = c.window.resolve(hw)?;
    Ok(Fact::new(
        DType::F32,
        vec![
            x.shape[0],
            w.shape[0],
            Dim::Known(g.out[0] as i64),
            Dim::Known(g.out[1] as i64),
        ],
    ))
}

/// A `PqEncode`'s codes: one per codebook (per tap and channel group for pixel codebooks) and
/// row, after checking the encoder's parameters against the rows it reads.
fn pq_encode(p: &PqEncode, ins: &[Fact]) -> Result<Fact> {
    need(ins, 1)?;
    let rows_fact;
    let x = match &p.window {
        Some(w) => {
            let mut x = ins[0].clone();
            if p.nhwc {
                if x.rank() != 4 {
                    return err(format!("an NHWC input must have rank 4, got {}", x.shape_string()));
                }
                let [n, h, w, c] = [0, 1, 2, 3].map(|i| x.shape[i]);
                x.shape = vec![n, c, h, w];
            }
            rows_fact = infer_op(&Op::Im2Col(w.clone()), &[x])?.remove(0);
            &rows_fact
        }
        None => &ins[0],
    };
    let d = x
        .shape
        .last()
        .and_then(|d| d.known())
        .ok_or_else(|| Error::Other("row length must be known".into()))?;
    // pixel codebooks: the row of one output pixel is `taps` pixels of `d / taps` channels
    let taps = match (&p.window, p.pixel) {
        (Some(w), true) => (w.kernel[0] * w.kernel[1]) as i64,
        (None, true) => return err("pixel codebooks need a window"),
        _ => 1,
    };
    let c = ((d / taps) as usize).div_ceil(p.subspace.max(1)) as i64;
    let shape_of = |i: usize| ins.get(i).and_then(|f| f.concrete_shape());
    match p.encoder {
        Encoder::Argmin => {
            need(ins, 2)?;
            match shape_of(1).as_deref() {
                Some(&[pc, k, s]) if pc as i64 == c && s == p.subspace && (1..=256).contains(&k) => {
                    // optional norms `[C, K]`
                    if ins.len() > 3 {
                        return err(format!("an argmin encoder takes at most 3 inputs, got {}", ins.len()));
                    }
                    match (ins.len(), shape_of(2).as_deref()) {
                        (2, _) => {}
                        (_, Some(&[nc, nk])) if nc as i64 == c && nk == k => {}
                        (_, Some(other)) => return err(format!("norms must be [{c}, {k}], got {other:?}")),
                        (_, None) => return err(format!("norms must be a [{c}, {k}] tensor of known shape")),
                    }
                }
                other => {
                    return err(format!(
                        "prototypes must be [{c}, K≤256, {}], got {other:?}",
                        p.subspace
                    ))
                }
            }
        }
        Encoder::Tree => {
            need(ins, 3)?;
            match (shape_of(1).as_deref(), shape_of(2).as_deref()) {
                (Some(&[dc, depth]), Some(&[tc, nodes]))
                    if dc as i64 == c && tc as i64 == c && (1..=8).contains(&depth) && nodes == (1 << depth) - 1 => {}
                other => {
                    return err(format!(
                        "tree must be split dims [{c}, depth≤8] and thresholds [{c}, 2^depth−1], got {other:?}"
                    ))
                }
            }
        }
    }
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("rank ≥ 1") = Dim::Known(taps * c);
    Ok(Fact::new(DType::U8, shape))
}

/// A `LutMatMul`'s output: `M` values per row of codes, after checking tables, scale, offset
/// and the optional residual.
fn lut_matmul(ins: &[Fact]) -> Result<Fact> {
    if !(4..=5).contains(&ins.len()) {
        return err(format!("needs 4 or 5 inputs, got {}", ins.len()));
    }
    let (codes, t) = (&ins[0], &ins[1]);
    if codes.dtype != DType::U8 {
        return err(format!("codes must be u8, got {}", codes.dtype));
    }
    let ts = t.concrete_shape().unwrap_or_default();
    let c = codes.shape.last().and_then(|d| d.known());
    let ok = ts.len() == 3
        && Some(ts[0] as i64) == c
        && (1..=256).contains(&ts[2])
        && matches!(t.dtype, DType::I8 | DType::F32);
    if !ok {
        return err(format!(
            "tables must be i8 or f32 [C={c:?}, M, K≤256], got {}",
            t.shape_string()
        ));
    }
    for (i, what) in [(2, "scale"), (3, "offset")] {
        if ins[i].concrete_shape() != Some(vec![ts[1]]) || ins[i].dtype != DType::F32 {
            return err(format!("{what} must be f32 [{}], got {}", ts[1], ins[i].shape_string()));
        }
    }
    let mut shape = codes.shape.clone();
    *shape.last_mut().expect("rank ≥ 1") = Dim::Known(ts[1] as i64);
    if let Some(r) = ins.get(4) {
        let n = |s: &[Dim]| s.iter().map(|d| d.known()).product::<Option<i64>>();
        if r.dtype != DType::F32 || n(&r.shape).zip(n(&shape)).is_some_and(|(a, b)| a != b) {
            return err(format!(
                "the residual must be f32 with as many values as the output, got {} {}",
                r.dtype,
                r.shape_string()
            ));
        }
    }
    Ok(Fact::new(DType::F32, shape))
}

fn same(f: &Fact) -> Fact {
    Fact::new(f.dtype, f.shape.clone())
}

/// Output facts of one op given its input facts; every output is checked to be allocatable
/// ([`crate::limits`]).
pub fn infer_op(op: &Op, ins: &[Fact]) -> Result<Vec<Fact>> {
    let out = infer_op_unchecked(op, ins)?;
    for f in &out {
        check_fact_size(f)?;
    }
    Ok(out)
}

fn need(ins: &[Fact], n: usize) -> Result<()> {
    if ins.len() < n {
        return err(format!("expects at least {n} inputs, got {}", ins.len()));
    }
    Ok(())
}

fn infer_op_unchecked(op: &Op, ins: &[Fact]) -> Result<Vec<Fact>> {
    let f = match op {
        Op::Input => return err("Input facts are declared, not inferred"),
        Op::Const(t) => Fact::of_tensor(t),
        Op::Conv(c) => conv(c, ins)?,
        Op::Im2Col(w) => {
            need(ins, 1)?;
            let x = &ins[0];
            let g = w.resolve(spatial(x, "Im2Col")?)?;
            let c = x.shape[1]
                .known()
                .ok_or_else(|| Error::Other("channels must be known".into()))?;
            let overflow = || Error::Other("the im2col matrix size overflows".into());
            let cols = (w.kernel[0] as i64)
                .checked_mul(w.kernel[1] as i64)
                .and_then(|k| k.checked_mul(c))
                .ok_or_else(overflow)?;
            let rows = (g.out[0] as i64).checked_mul(g.out[1] as i64).ok_or_else(overflow)?;
            Fact::new(DType::F32, vec![x.shape[0], Dim::Known(rows), Dim::Known(cols)])
        }
        Op::PqEncode(p) => pq_encode(p, ins)?,
        Op::LutMatMul { .. } => lut_matmul(ins)?,
        Op::BatchNorm { .. } => {
            need(ins, 5)?;
            let c = ins[0].shape.get(1).copied();
            for p in &ins[1..5] {
                if p.rank() != 1 || Some(p.shape[0]) != c {
                    return err(format!(
                        "parameter {} does not match {} channels of input {}",
                        p.shape_string(),
                        c.map(|d| d.to_string()).unwrap_or_default(),
                        ins[0].shape_string()
                    ));
                }
            }
            same(&ins[0])
        }
        Op::Unary(_) => {
            need(ins, 1)?;
            same(&ins[0])
        }
        Op::Lrn { size, .. } => {
            need(ins, 1)?;
            if *size == 0 {
                return err("size must be at least 1");
            }
            if ins[0].rank() < 2 {
                return err(format!("expects an N×C×… input, got {}", ins[0].shape_string()));
            }
            if ins[0].shape[1..].contains(&Dim::Known(0)) {
                return err(format!("cannot normalise an empty input {}", ins[0].shape_string()));
            }
            same(&ins[0])
        }
        Op::Softmax { axis, .. } => {
            need(ins, 1)?;
            norm_axis(*axis, ins[0].rank())?;
            same(&ins[0])
        }
        Op::Binary(b) => {
            need(ins, 2)?;
            if ins[0].dtype != ins[1].dtype {
                return err(format!("operand types differ: {} vs {}", ins[0].dtype, ins[1].dtype));
            }
            let mut f = Fact::new(ins[0].dtype, broadcast(&ins[0].shape, &ins[1].shape)?);
            f.value = fold_int_binary(*b, &ins[0], &ins[1]);
            f
        }
        Op::Equal => {
            need(ins, 2)?;
            if ins[0].dtype != ins[1].dtype {
                return err(format!("operand types differ: {} vs {}", ins[0].dtype, ins[1].dtype));
            }
            let mut f = Fact::new(DType::Bool, broadcast(&ins[0].shape, &ins[1].shape)?);
            f.value = fold_equal(&ins[0], &ins[1]);
            f
        }
        Op::Where => {
            need(ins, 3)?;
            if ins[0].dtype != DType::Bool {
                return err(format!("the condition must be bool, got {}", ins[0].dtype));
            }
            if ins[1].dtype != ins[2].dtype {
                return err(format!("operand types differ: {} vs {}", ins[1].dtype, ins[2].dtype));
            }
            let shape = broadcast(&broadcast(&ins[0].shape, &ins[1].shape)?, &ins[2].shape)?;
            let mut f = Fact::new(ins[1].dtype, shape);
            f.value = fold_where(ins);
            f
        }
        Op::Expand => {
            need(ins, 2)?;
            if ins[1].rank() != 1 || !matches!(ins[1].dtype, DType::I64 | DType::I32) {
                return err(format!(
                    "the shape must be a 1-D integer tensor, got {} {}",
                    ins[1].dtype,
                    ins[1].shape_string()
                ));
            }
            let target = ins[1]
                .value
                .clone()
                .ok_or_else(|| Error::Other("the target shape is not known statically".into()))?;
            if let Some(d) = target.iter().find(|d| matches!(d, Dim::Known(v) if *v < 0)) {
                return err(format!("negative dimension {d} in the target shape"));
            }
            Fact::new(ins[0].dtype, broadcast(&ins[0].shape, &target)?)
        }
        Op::LayerNorm { axis, .. } => {
            need(ins, 2)?;
            let a = norm_axis(*axis, ins[0].rank())?;
            if ins[0].dtype != DType::F32 {
                return err(format!("expects f32, got {}", ins[0].dtype));
            }
            let norm = &ins[0].shape[a..];
            for (i, what) in [(1, "scale"), (2, "bias")] {
                if let Some(p) = ins.get(i) {
                    let ok = match (dims_product(norm), dims_product(&p.shape)) {
                        (Some((k, 0)), Some((kp, 0))) => k == kp,
                        _ => false,
                    };
                    if !ok {
                        return err(format!(
                            "{what} {} does not match the normalised axes of {}",
                            p.shape_string(),
                            ins[0].shape_string()
                        ));
                    }
                }
            }
            same(&ins[0])
        }
        Op::Sum => {
            need(ins, 1)?;
            let mut shape = ins[0].shape.clone();
            for i in &ins[1..] {
                shape = broadcast(&shape, &i.shape)?;
            }
            Fact::new(ins[0].dtype, shape)
        }
        Op::Pool(p) if p.nhwc => {
            need(ins, 1)?;
            let s = &ins[0].shape;
            let hw = spatial_nhwc(&ins[0], "pooling")?;
            let g = p.window.resolve(hw)?;
            Fact::new(
                DType::F32,
                vec![s[0], Dim::Known(g.out[0] as i64), Dim::Known(g.out[1] as i64), s[3]],
            )
        }
        Op::Pool(p) => {
            need(ins, 1)?;
            let g = p.window.resolve(spatial(&ins[0], "pooling")?)?;
            let s = &ins[0].shape;
            Fact::new(
                DType::F32,
                vec![s[0], s[1], Dim::Known(g.out[0] as i64), Dim::Known(g.out[1] as i64)],
            )
        }
        Op::GlobalPool { .. } => {
            need(ins, 1)?;
            let s = &ins[0].shape;
            if s.len() < 3 {
                return err("global pooling needs an N×C×spatial input");
            }
            if s[2..].contains(&Dim::Known(0)) {
                return err(format!(
                    "cannot pool over the empty spatial extent of {}",
                    ins[0].shape_string()
                ));
            }
            let mut out = s[..2].to_vec();
            out.extend(std::iter::repeat_n(Dim::Known(1), s.len() - 2));
            Fact::new(DType::F32, out)
        }
        Op::Concat { axis } => {
            need(ins, 1)?;
            let a = norm_axis(*axis, ins[0].rank())?;
            let mut shape = ins[0].shape.clone();
            for i in &ins[1..] {
                if i.rank() != shape.len() {
                    return err("Concat inputs have different ranks");
                }
                for (d, (x, y)) in shape.iter_mut().zip(&i.shape).enumerate() {
                    if d == a {
                        *x = match (*x, *y) {
                            (Dim::Known(p), Dim::Known(q)) => Dim::Known(add_dims(p, q)?),
                            (Dim::Batch(p), Dim::Batch(q)) => Dim::Batch(add_dims(p, q)?),
                            _ => return err("cannot concatenate a batch dimension with a fixed one"),
                        };
                    } else if x != y {
                        return err(format!("Concat inputs differ on axis {d}: {x} vs {y}"));
                    }
                }
            }
            let mut f = Fact::new(ins[0].dtype, shape);
            if ins.iter().all(|i| i.value.is_some() && i.rank() == 1) {
                f.value = Some(ins.iter().flat_map(|i| i.value.clone().unwrap()).collect());
            }
            f
        }
        Op::Flatten { axis } => {
            need(ins, 1)?;
            let r = ins[0].rank();
            let a = if *axis < 0 {
                (*axis + r as i64) as usize
            } else {
                *axis as usize
            };
            if a > r {
                return err(format!("axis {axis} out of range for rank {r}"));
            }
            let s = &ins[0].shape;
            Fact::new(ins[0].dtype, vec![product_dim(&s[..a])?, product_dim(&s[a..])?])
        }
        Op::Reshape { allowzero } => {
            need(ins, 2)?;
            let target = ins[1]
                .value
                .clone()
                .ok_or_else(|| Error::Other("the target shape is not known statically".to_string()))?;
            let mut f = Fact::new(ins[0].dtype, reshape_dims(&ins[0].shape, &target, *allowzero)?);
            if f.rank() <= 1 {
                f.value = ins[0].value.clone();
            }
            f
        }
        Op::Transpose { perm } => {
            need(ins, 1)?;
            let r = ins[0].rank();
            let p: Vec<usize> = perm.clone().unwrap_or_else(|| (0..r).rev().collect());
            let mut sorted = p.clone();
            sorted.sort();
            if sorted != (0..r).collect::<Vec<_>>() {
                return err(format!("perm {p:?} is not a permutation of rank {r}"));
            }
            Fact::new(ins[0].dtype, p.iter().map(|&i| ins[0].shape[i]).collect())
        }
        Op::Squeeze { axes } => {
            need(ins, 1)?;
            let s = &ins[0].shape;
            let drop: Vec<usize> = match axes {
                Some(a) => a.iter().map(|&x| norm_axis(x, s.len())).collect::<Result<_>>()?,
                None => (0..s.len()).filter(|&i| s[i] == Dim::Known(1)).collect(),
            };
            for &d in &drop {
                if s[d] != Dim::Known(1) {
                    return err(format!("cannot squeeze axis {d} of size {}", s[d]));
                }
            }
            let mut f = Fact::new(
                ins[0].dtype,
                s.iter()
                    .enumerate()
                    .filter(|(i, _)| !drop.contains(i))
                    .map(|(_, d)| *d)
                    .collect(),
            );
            f.value = ins[0].value.clone();
            f
        }
        Op::Unsqueeze { axes } => {
            need(ins, 1)?;
            let r = ins[0].rank() + axes.len();
            let mut norm: Vec<usize> = axes.iter().map(|&a| norm_axis(a, r)).collect::<Result<_>>()?;
            norm.sort();
            let mut shape = ins[0].shape.clone();
            for a in norm {
                shape.insert(a, Dim::Known(1));
            }
            let mut f = Fact::new(ins[0].dtype, shape);
            f.value = ins[0].value.clone();
            f
        }
        Op::Gemm(g) => {
            need(ins, 2)?;
            let (a, b) = (&ins[0], &ins[1]);
            if a.rank() != 2 || b.rank() != 2 {
                return err(format!(
                    "Gemm needs 2-D inputs, got {} and {}",
                    a.shape_string(),
                    b.shape_string()
                ));
            }
            let (m, ka) = if g.trans_a {
                (a.shape[1], a.shape[0])
            } else {
                (a.shape[0], a.shape[1])
            };
            let (kb, n) = if g.trans_b {
                (b.shape[1], b.shape[0])
            } else {
                (b.shape[0], b.shape[1])
            };
            if ka != kb {
                return err(format!("inner dimensions differ: {ka} vs {kb}"));
            }
            let out = vec![m, n];
            if ins.len() > 2 {
                broadcast(&out, &ins[2].shape)?;
            }
            Fact::new(DType::F32, out)
        }
        Op::MatMul => {
            need(ins, 2)?;
            Fact::new(DType::F32, matmul_shape(&ins[0].shape, &ins[1].shape)?)
        }
        Op::ReduceMean { axes, keepdims } => {
            need(ins, 1)?;
            let s = &ins[0].shape;
            let red: Vec<usize> = match axes {
                Some(a) => a.iter().map(|&x| norm_axis(x, s.len())).collect::<Result<_>>()?,
                None => (0..s.len()).collect(),
            };
            if let Some(&a) = red.iter().find(|&&a| s[a] == Dim::Known(0)) {
                return err(format!("cannot average over axis {a} of length 0"));
            }
            let shape = s
                .iter()
                .enumerate()
                .filter_map(|(i, d)| match (red.contains(&i), keepdims) {
                    (true, true) => Some(Dim::Known(1)),
                    (true, false) => None,
                    (false, _) => Some(*d),
                })
                .collect();
            Fact::new(ins[0].dtype, shape)
        }
        Op::Pad { pads, .. } => {
            need(ins, 1)?;
            let s = &ins[0].shape;
            if pads.len() != 2 * s.len() {
                return err(format!("{} pads for a rank-{} input", pads.len(), s.len()));
            }
            let mut out = s.clone();
            for (i, d) in out.iter_mut().enumerate() {
                let add = add_dims(pads[i], pads[i + s.len()])?;
                *d = match *d {
                    Dim::Known(v) if add_dims(v, add)? >= 0 => Dim::Known(v + add),
                    Dim::Batch(k) if add == 0 => Dim::Batch(k),
                    _ => return err(format!("invalid pads {pads:?} for {}", ins[0].shape_string())),
                };
            }
            Fact::new(ins[0].dtype, out)
        }
        Op::Split { axis, sizes } => {
            need(ins, 1)?;
            if ins[0].rank() == 0 {
                return err("cannot split a rank-0 tensor");
            }
            let a = norm_axis(*axis, ins[0].rank())?;
            let total = sizes
                .iter()
                .try_fold(0usize, |t, &s| t.checked_add(s))
                .filter(|&t| t <= i64::MAX as usize)
                .ok_or_else(|| Error::Other(format!("split sizes {sizes:?} overflow")))?;
            if ins[0].shape[a] != Dim::Known(total as i64) {
                return err(format!(
                    "split sizes {sizes:?} do not add up to axis {a} of {}",
                    ins[0].shape_string()
                ));
            }
            return Ok(sizes
                .iter()
                .map(|&s| {
                    let mut shape = ins[0].shape.clone();
                    shape[a] = Dim::Known(s as i64);
                    Fact::new(ins[0].dtype, shape)
                })
                .collect());
        }
        Op::Slice {
            starts,
            ends,
            axes,
            steps,
        } => {
            need(ins, 1)?;
            let mut shape = ins[0].shape.clone();
            let mut value = ins[0].value.clone();
            for (i, &ax) in axes.iter().enumerate() {
                let a = norm_axis(ax, shape.len())?;
                let n = match shape[a] {
                    Dim::Known(n) => n,
                    Dim::Batch(_) if starts[i] == 0 && ends[i] >= i32::MAX as i64 && steps[i] == 1 => continue,
                    Dim::Batch(_) => return err("cannot slice the batch dimension"),
                };
                let idx = slice_indices(n, starts[i], ends[i], steps[i])?;
                shape[a] = Dim::Known(idx.len() as i64);
                if let (Some(v), 0) = (&value, a) {
                    value = idx.iter().map(|&j| v.get(j).copied()).collect();
                }
            }
            let mut f = Fact::new(ins[0].dtype, shape);
            if ins[0].rank() == 1 {
                f.value = value;
            }
            f
        }
        Op::Shape { start, end } => {
            need(ins, 1)?;
            let r = ins[0].rank() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let (s, e) = (clamp(*start), clamp(end.unwrap_or(r)));
            let dims = if s < e { ins[0].shape[s..e].to_vec() } else { vec![] };
            let mut f = Fact::known(DType::I64, &[dims.len()]);
            f.value = Some(dims);
            f
        }
        Op::Gather { axis } => {
            need(ins, 2)?;
            let (d, idx) = (&ins[0], &ins[1]);
            if d.rank() == 0 {
                return err("cannot gather from a rank-0 tensor");
            }
            let a = norm_axis(*axis, d.rank())?;
            let mut shape = d.shape[..a].to_vec();
            shape.extend(idx.shape.iter().copied());
            shape.extend(d.shape[a + 1..].iter().copied());
            let mut f = Fact::new(d.dtype, shape);
            if let (Some(dv), Some(iv), 1) = (&d.value, &idx.value, d.rank()) {
                let n = dv.len() as i64;
                f.value = iv
                    .iter()
                    .map(|i| match i {
                        Dim::Known(i) if (-n..n).contains(i) => Some(dv[(if *i < 0 { i + n } else { *i }) as usize]),
                        _ => None,
                    })
                    .collect();
            }
            f
        }
        Op::Cast { to } => {
            need(ins, 1)?;
            let mut f = Fact::new(*to, ins[0].shape.clone());
            if *to != DType::F32 && ins[0].dtype != DType::F32 {
                f.value = ins[0].value.clone();
            }
            f
        }
        Op::ConstantOfShape { value } => {
            need(ins, 1)?;
            let shape = ins[0]
                .value
                .clone()
                .ok_or_else(|| Error::Other("the output shape is not known statically".into()))?;
            Fact::new(value.dtype(), shape)
        }
    };
    Ok(vec![f])
}

/// `Equal` on known shape values. The batch is at least 1, so it never equals a value ≤ 0, and
/// `k·N = j·N` exactly when `k = j`; other comparisons with the batch are unknown.
fn fold_equal(a: &Fact, b: &Fact) -> Option<Vec<Dim>> {
    let (av, bv) = (a.value.as_ref()?, b.value.as_ref()?);
    let n = av.len().max(bv.len());
    if !(av.len() == n || av.len() == 1) || !(bv.len() == n || bv.len() == 1) || a.rank() > 1 || b.rank() > 1 {
        return None;
    }
    (0..n)
        .map(|i| {
            let x = av[if av.len() == 1 { 0 } else { i }];
            let y = bv[if bv.len() == 1 { 0 } else { i }];
            let eq = match (x, y) {
                (Dim::Known(p), Dim::Known(q)) | (Dim::Batch(p), Dim::Batch(q)) => p == q,
                (Dim::Batch(_), Dim::Known(q)) | (Dim::Known(q), Dim::Batch(_)) if q <= 0 => false,
                _ => return None,
            };
            Some(Dim::Known(eq as i64))
        })
        .collect()
}

/// `Where` on known shape values (rank ≤ 1, lengths 1 or n).
fn fold_where(ins: &[Fact]) -> Option<Vec<Dim>> {
    let vals: Vec<&Vec<Dim>> = ins[..3].iter().map(|f| f.value.as_ref()).collect::<Option<_>>()?;
    if ins[..3].iter().any(|f| f.rank() > 1) {
        return None;
    }
    let n = vals.iter().map(|v| v.len()).max()?;
    if vals.iter().any(|v| v.len() != n && v.len() != 1) {
        return None;
    }
    let at = |v: &Vec<Dim>, i: usize| v[if v.len() == 1 { 0 } else { i }];
    (0..n)
        .map(|i| match at(vals[0], i) {
            Dim::Known(0) => Some(at(vals[2], i)),
            Dim::Known(_) => Some(at(vals[1], i)),
            Dim::Batch(_) => None,
        })
        .collect()
}

/// Integer arithmetic on known shape values (e.g. `Shape * 2`), when both sides are known.
fn fold_int_binary(op: Binary, a: &Fact, b: &Fact) -> Option<Vec<Dim>> {
    if a.dtype == DType::F32 {
        return None;
    }
    let (av, bv) = (a.value.as_ref()?, b.value.as_ref()?);
    let n = av.len().max(bv.len());
    if !(av.len() == n || av.len() == 1) || !(bv.len() == n || bv.len() == 1) {
        return None;
    }
    (0..n)
        .map(|i| {
            let x = av[if av.len() == 1 { 0 } else { i }];
            let y = bv[if bv.len() == 1 { 0 } else { i }];
            // Integer division truncates toward zero, as ONNX (and the interpreter) do; an
            // overflow leaves the value unknown.
            match (op, x, y) {
                (Binary::Add, Dim::Known(p), Dim::Known(q)) => p.checked_add(q).map(Dim::Known),
                (Binary::Sub, Dim::Known(p), Dim::Known(q)) => p.checked_sub(q).map(Dim::Known),
                (Binary::Mul, Dim::Known(p), Dim::Known(q)) => p.checked_mul(q).map(Dim::Known),
                (Binary::Mul, Dim::Batch(p), Dim::Known(q)) | (Binary::Mul, Dim::Known(q), Dim::Batch(p)) => {
                    p.checked_mul(q).filter(|&k| k > 0).map(Dim::Batch)
                }
                (Binary::Div, Dim::Known(p), Dim::Known(q)) => p.checked_div(q).map(Dim::Known),
                (Binary::Div, Dim::Batch(p), Dim::Known(q)) if q > 0 && p % q == 0 => Some(Dim::Batch(p / q)),
                _ => None,
            }
        })
        .collect()
}

/// ONNX Reshape on symbolic dims: `0` copies the input dim (unless allowzero), `-1` is inferred.
pub fn reshape_dims(input: &[Dim], target: &[Dim], allowzero: bool) -> Result<Vec<Dim>> {
    let mut out = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, t) in target.iter().enumerate() {
        match t {
            Dim::Known(0) if !allowzero => out.push(
                *input
                    .get(i)
                    .ok_or_else(|| Error::Other(format!("0 at position {i} has no input dim to copy")))?,
            ),
            Dim::Known(-1) => {
                if infer_at.replace(i).is_some() {
                    return err("more than one -1 in the target shape");
                }
                out.push(Dim::Known(1));
            }
            Dim::Known(v) if *v < 0 => return err(format!("invalid target dimension {v}")),
            d => out.push(*d),
        }
    }
    let overflow = || {
        Error::Other(format!(
            "reshaping {input:?} to {target:?}: the element count overflows"
        ))
    };
    let (kin, pin) = dims_product(input).ok_or_else(overflow)?;
    let (kout, pout) = dims_product(&out).ok_or_else(overflow)?;
    match infer_at {
        Some(i) => {
            if kout == 0 || kin % kout != 0 || pin < pout || pin - pout > 1 {
                return err(format!("cannot infer -1 reshaping {input:?} to {target:?}"));
            }
            out[i] = if pin == pout {
                Dim::Known(kin / kout)
            } else {
                Dim::Batch(kin / kout)
            };
        }
        None => {
            if (kin, pin) != (kout, pout) {
                let s = |d: &[Dim]| d.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
                return err(format!("cannot reshape [{}] into [{}]", s(input), s(&out)));
            }
        }
    }
    Ok(out)
}

/// numpy `matmul` shape rules (1-D operands promoted and the added axis removed).
pub fn matmul_shape(a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>> {
    if a.is_empty() || b.is_empty() {
        return err("MatMul operands must have rank ≥ 1");
    }
    let a2: Vec<Dim> = if a.len() == 1 {
        vec![Dim::Known(1), a[0]]
    } else {
        a.to_vec()
    };
    let b2: Vec<Dim> = if b.len() == 1 {
        vec![b[0], Dim::Known(1)]
    } else {
        b.to_vec()
    };
    let (m, ka) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (kb, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if ka != kb {
        return err(format!("inner dimensions differ: {ka} vs {kb}"));
    }
    let mut out = broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2])?;
    if a.len() > 1 {
        out.push(m);
    }
    if b.len() > 1 {
        out.push(n);
    }
    Ok(out)
}

/// The indices an ONNX Slice selects on an axis of length `n` (clamping rules of the spec).
pub fn slice_indices(n: i64, start: i64, end: i64, step: i64) -> Result<Vec<usize>> {
    if step == 0 {
        return err("slice step must not be 0");
    }
    let norm = |v: i64| if v < 0 { v + n } else { v };
    let (s, e) = if step > 0 {
        (norm(start).clamp(0, n), norm(end).clamp(0, n))
    } else {
        (norm(start).clamp(-1, n - 1), norm(end).clamp(-1, n - 1))
    };
    // the count first (checked), so a huge axis of an empty tensor allocates nothing absurd
    let span = if step > 0 { e - s } else { s - e };
    let count = if span <= 0 {
        0
    } else {
        (span as u64).div_ceil(step.unsigned_abs()) as usize
    };
    crate::limits::check_len(count, std::mem::size_of::<usize>(), "Slice indices")?;
    Ok((0..count).map(|j| (s + j as i64 * step) as usize).collect())
}
