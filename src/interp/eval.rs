//! Evaluation of one op on concrete tensors: the single place that maps IR ops to kernels.
//! Used by the interpreter and by constant folding.

use super::kernels::{conv, direct, elementwise as ew, encode, gemm, lut, pool, shape_ops as so};
use crate::bail;
use crate::error::Result;
use crate::ir::op::{Encoder, Gemm, Op};
use crate::ir::tensor::dispatch;
use crate::ir::{DType, Tensor};
use ndarray::{ArrayD, IxDyn};
use std::mem::MaybeUninit;
use std::sync::Arc;

/// Take ownership of a tensor, copying only if it is still shared.
fn owned(t: Arc<Tensor>) -> Tensor {
    Arc::try_unwrap(t).unwrap_or_else(|a| (*a).clone())
}

fn f32_std(t: &Tensor) -> Result<std::borrow::Cow<'_, [f32]>> {
    let a = t.as_f32()?;
    Ok(match a.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(a.iter().copied().collect()),
    })
}

fn shape4(t: &Tensor, what: &str) -> Result<[usize; 4]> {
    match t.shape() {
        &[n, c, h, w] => Ok([n, c, h, w]),
        s => bail!("{what} expects a 4-D NCHW input, got shape {s:?}"),
    }
}

/// Per-node state a [`crate::interp::Plan`] keeps across runs: what a kernel derives from the
/// node's constant inputs (codebooks in the encoder's layout, transposed tables), built on first use.
pub type Cache = std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>;

pub fn eval_op(op: &Op, args: Vec<Arc<Tensor>>) -> Result<Vec<Tensor>> {
    eval_op_cached(op, args, None)
}

/// [`eval_op`] with the node's [`Cache`] (only for nodes whose inputs after the first are constants).
pub fn eval_op_cached(op: &Op, mut args: Vec<Arc<Tensor>>, cache: Option<&Cache>) -> Result<Vec<Tensor>> {
    let arity = |n: usize, args: &[Arc<Tensor>]| -> Result<()> {
        if args.len() < n {
            bail!("expects {n} inputs, got {}", args.len());
        }
        Ok(())
    };
    let out = match op {
        Op::Input => bail!("graph inputs are not evaluated"),
        Op::Const(t) => (**t).clone(),
        Op::Conv(c) if c.nhwc => {
            arity(2, &args)?;
            conv_nhwc(c, args, cache)?
        }
        Op::Conv(c) => {
            arity(2, &args)?;
            conv_nchw(c, &args, cache)?
        }
        Op::Split { axis, sizes } => {
            arity(1, &args)?;
            let a = so::norm_axis(*axis, args[0].shape().len())?;
            if args[0].shape()[a] != sizes.iter().sum::<usize>() {
                bail!(
                    "split sizes {sizes:?} do not add up to axis {a} of {:?}",
                    args[0].shape()
                );
            }
            let mut start = 0;
            let mut outs = Vec::with_capacity(sizes.len());
            for &s in sizes {
                let r = start..start + s;
                outs.push(dispatch!(&*args[0], x => wrap(x.slice_axis(ndarray::Axis(a), r.clone().into()).as_standard_layout().into_owned())));
                start += s;
            }
            return Ok(outs);
        }
        Op::Im2Col(w) => {
            arity(1, &args)?;
            Tensor::F32(conv::im2col_rows(&f32_std(&args[0])?, shape4(&args[0], "Im2Col")?, w)?)
        }
        Op::PqEncode(p) => {
            arity(2, &args)?;
            pq_encode(p, &args, cache)?
        }
        Op::LutMatMul { relu } => lut_matmul(*relu, &args, cache)?,
        Op::BatchNorm { epsilon } => {
            arity(5, &args)?;
            let p: Vec<Vec<f32>> = args[1..5]
                .iter()
                .map(|t| Ok(f32_std(t)?.into_owned()))
                .collect::<Result<_>>()?;
            let mut x = so::standard(owned(args.swap_remove(0)).into_f32()?);
            let shape = x.shape().to_vec();
            if shape.len() < 2 || p.iter().any(|v| v.len() != shape[1]) {
                bail!("parameters do not match input {:?}", shape);
            }
            ew::batchnorm(
                x.as_slice_mut().expect("standard"),
                &shape,
                [&p[0], &p[1], &p[2], &p[3]],
                *epsilon,
            );
            Tensor::F32(x)
        }
        Op::Unary(u) => {
            arity(1, &args)?;
            let mut x = so::standard(owned(args.swap_remove(0)).into_f32()?);
            ew::apply_unary(*u, x.as_slice_mut().expect("standard"));
            Tensor::F32(x)
        }
        Op::Binary(b) => {
            arity(2, &args)?;
            let mut rhs = args.pop().unwrap();
            let mut lhs = args.pop().unwrap();
            // `bias + x` as `x + bias` (exactly the same sums and products), so the larger
            // operand is the one worked in place
            let commutes = matches!(b, crate::ir::op::Binary::Add | crate::ir::op::Binary::Mul);
            if commutes
                && lhs.len() < rhs.len()
                && ew::broadcast_shape(lhs.shape(), rhs.shape()).is_ok_and(|s| s == rhs.shape())
            {
                std::mem::swap(&mut lhs, &mut rhs);
            }
            match (&*lhs, &*rhs) {
                // `lhs` is moved into the kernel (no copy when this was its last use: in place).
                (Tensor::F32(_), Tensor::F32(_)) => {
                    Tensor::F32(ew::binary_f32(*b, owned(lhs).into_f32()?, rhs.as_f32()?)?)
                }
                (Tensor::I64(l), Tensor::I64(r)) => Tensor::I64(ew::binary_int(*b, l, r)?),
                (Tensor::I32(l), Tensor::I32(r)) => Tensor::I32(ew::binary_int(*b, l, r)?),
                (l, r) => bail!("unsupported operand types {} and {}", l.dtype(), r.dtype()),
            }
        }
        Op::Equal | Op::Where | Op::Expand | Op::LayerNorm { .. } => transformer_op(op, args)?,
        Op::Sum => {
            arity(1, &args)?;
            let mut acc = owned(args.remove(0)).into_f32()?;
            for t in &args {
                acc = ew::binary_f32(crate::ir::op::Binary::Add, acc, t.as_f32()?)?;
            }
            Tensor::F32(acc)
        }
        Op::Pool(p) if p.nhwc => {
            arity(1, &args)?;
            let (out, shape) = pool::pool2d_nhwc(&f32_std(&args[0])?, shape4(&args[0], "pooling")?, p)?;
            Tensor::f32(&shape, out)?
        }
        Op::Pool(p) => {
            arity(1, &args)?;
            Tensor::F32(pool::pool2d(&f32_std(&args[0])?, shape4(&args[0], "pooling")?, p)?)
        }
        Op::GlobalPool { max } => {
            arity(1, &args)?;
            if args[0].shape().len() < 3 {
                bail!("expects an N×C×spatial input, got {:?}", args[0].shape());
            }
            Tensor::F32(pool::global_pool(&f32_std(&args[0])?, args[0].shape(), *max))
        }
        Op::Lrn {
            size,
            alpha,
            beta,
            bias,
        } => {
            arity(1, &args)?;
            if args[0].shape().len() < 2 {
                bail!("expects an N×C×… input");
            }
            Tensor::F32(pool::lrn(
                &f32_std(&args[0])?,
                args[0].shape(),
                *size,
                *alpha,
                *beta,
                *bias,
            ))
        }
        Op::Concat { axis } => {
            arity(1, &args)?;
            let ax = so::norm_axis(*axis, args[0].shape().len())?;
            macro_rules! cat {
                ($v:ident) => {{
                    let parts: Vec<&ArrayD<_>> = args
                        .iter()
                        .map(|t| match &**t {
                            Tensor::$v(a) => Ok(a),
                            o => bail!("Concat inputs have different types ({})", o.dtype()),
                        })
                        .collect::<Result<_>>()?;
                    Tensor::$v(so::concat(&parts, ax)?)
                }};
            }
            match &*args[0] {
                Tensor::F32(_) => cat!(F32),
                Tensor::I64(_) => cat!(I64),
                Tensor::I32(_) => cat!(I32),
                t => bail!("Concat of {} tensors is not supported", t.dtype()),
            }
        }
        Op::Flatten { axis } => {
            arity(1, &args)?;
            let s = args[0].shape();
            let a = if *axis < 0 { *axis + s.len() as i64 } else { *axis } as usize;
            if a > s.len() {
                bail!("axis {axis} out of range for rank {}", s.len());
            }
            let shape = [s[..a].iter().product(), s[a..].iter().product()];
            reshape_any(owned(args.swap_remove(0)), &shape)?
        }
        Op::Reshape { allowzero } => {
            arity(2, &args)?;
            let target = so::reshape_target(args[0].shape(), &args[1].to_i64_vec()?, *allowzero)?;
            reshape_any(owned(args.swap_remove(0)), &target)?
        }
        Op::Squeeze { axes } => {
            arity(1, &args)?;
            let s = args[0].shape().to_vec();
            let drop: Vec<usize> = match axes {
                Some(a) => a.iter().map(|&x| so::norm_axis(x, s.len())).collect::<Result<_>>()?,
                None => (0..s.len()).filter(|&i| s[i] == 1).collect(),
            };
            if let Some(&d) = drop.iter().find(|&&d| s[d] != 1) {
                bail!("cannot squeeze axis {d} of size {}", s[d]);
            }
            let shape: Vec<usize> = s
                .iter()
                .enumerate()
                .filter(|(i, _)| !drop.contains(i))
                .map(|(_, d)| *d)
                .collect();
            reshape_any(owned(args.swap_remove(0)), &shape)?
        }
        Op::Unsqueeze { axes } => {
            arity(1, &args)?;
            let r = args[0].shape().len() + axes.len();
            let mut norm: Vec<usize> = axes.iter().map(|&a| so::norm_axis(a, r)).collect::<Result<_>>()?;
            norm.sort();
            let mut shape = args[0].shape().to_vec();
            for a in norm {
                shape.insert(a, 1);
            }
            reshape_any(owned(args.swap_remove(0)), &shape)?
        }
        Op::Transpose { perm } => {
            arity(1, &args)?;
            let r = args[0].shape().len();
            let p: Vec<usize> = perm.clone().unwrap_or_else(|| (0..r).rev().collect());
            let mut check = p.clone();
            check.sort();
            if check != (0..r).collect::<Vec<_>>() {
                bail!("perm {p:?} is not a permutation of rank {r}");
            }
            dispatch!(owned(args.swap_remove(0)), a => wrap(so::transpose(a, &p)))
        }
        Op::Gemm(g) => {
            arity(2, &args)?;
            let packed = match cache {
                Some(c) => gemm_packed(g, &args, c)?,
                None => None,
            };
            match packed {
                Some(out) => Tensor::F32(out),
                None => Tensor::F32(gemm_op(g, &args)?),
            }
        }
        Op::MatMul => {
            arity(2, &args)?;
            let packed = match cache {
                Some(c) => matmul_packed_b(&args, c)?,
                None => None,
            };
            match packed {
                Some(out) => Tensor::F32(out),
                None => Tensor::F32(matmul_op(args[0].as_f32()?, args[1].as_f32()?)?),
            }
        }
        Op::Softmax { axis, log } => {
            arity(1, &args)?;
            let ax = so::norm_axis(*axis, args[0].shape().len())?;
            let x = so::standard(owned(args.swap_remove(0)).into_f32()?);
            Tensor::F32(ew::softmax(x, ax, *log))
        }
        Op::Slice {
            starts,
            ends,
            axes,
            steps,
        } => {
            arity(1, &args)?;
            let r = args[0].shape().len();
            let mut picks: Vec<Option<Vec<usize>>> = vec![None; r];
            for (i, &ax) in axes.iter().enumerate() {
                let a = so::norm_axis(ax, r)?;
                picks[a] = Some(crate::ir::infer::slice_indices(
                    args[0].shape()[a] as i64,
                    starts[i],
                    ends[i],
                    steps[i],
                )?);
            }
            dispatch!(&*args[0], a => {
                let mut cur = a.clone();
                for (ax, p) in picks.iter().enumerate() {
                    if let Some(p) = p {
                        cur = cur.select(ndarray::Axis(ax), p);
                    }
                }
                wrap(cur)
            })
        }
        Op::ReduceMean { axes, keepdims } => {
            arity(1, &args)?;
            let r = args[0].shape().len();
            let ax: Vec<usize> = match axes {
                Some(a) => a.iter().map(|&x| so::norm_axis(x, r)).collect::<Result<_>>()?,
                None => (0..r).collect(),
            };
            Tensor::F32(so::reduce_mean(args[0].as_f32()?, &ax, *keepdims)?)
        }
        Op::Pad { pads, value } => {
            arity(1, &args)?;
            match &*args[0] {
                Tensor::F32(a) => Tensor::F32(so::pad(a, pads, *value)?),
                Tensor::I64(a) => Tensor::I64(so::pad(a, pads, *value as i64)?),
                t => bail!("Pad of {} tensors is not supported", t.dtype()),
            }
        }
        Op::Shape { start, end } => {
            arity(1, &args)?;
            let s = args[0].shape();
            let r = s.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let (a, b) = (clamp(*start), clamp(end.unwrap_or(r)));
            Tensor::i64_vec(if a < b {
                s[a..b].iter().map(|&d| d as i64).collect()
            } else {
                vec![]
            })
        }
        Op::Gather { axis } => {
            arity(2, &args)?;
            let ax = so::norm_axis(*axis, args[0].shape().len())?;
            let idx = args[1].to_i64_vec()?;
            let ishape = args[1].shape().to_vec();
            dispatch!(&*args[0], a => wrap(so::gather(a, ax, &idx, &ishape)?))
        }
        Op::Cast { to } => {
            arity(1, &args)?;
            args[0].cast(*to)
        }
        Op::ConstantOfShape { value } => {
            arity(1, &args)?;
            let shape: Vec<usize> = args[0]
                .to_i64_vec()?
                .into_iter()
                .map(|d| usize::try_from(d).map_err(|_| crate::error::Error::Other(format!("negative dimension {d}"))))
                .collect::<Result<_>>()?;
            crate::limits::check_shape(&shape, value.dtype().size_of(), "ConstantOfShape output")?;
            match value.dtype() {
                DType::I64 => Tensor::I64(ArrayD::from_elem(IxDyn(&shape), value.to_i64_vec()?[0])),
                DType::I32 => Tensor::I32(ArrayD::from_elem(IxDyn(&shape), value.to_i64_vec()?[0] as i32)),
                _ => Tensor::F32(ArrayD::from_elem(IxDyn(&shape), value.to_f32_vec()[0])),
            }
        }
    };
    Ok(vec![out])
}

/// Equal, Where, Expand and LayerNormalization (the operators transformer encoders add).
fn transformer_op(op: &Op, mut args: Vec<Arc<Tensor>>) -> Result<Tensor> {
    let arity = |n: usize, args: &[Arc<Tensor>]| -> Result<()> {
        if args.len() < n {
            bail!("expects {n} inputs, got {}", args.len());
        }
        Ok(())
    };
    Ok(match op {
        Op::Equal => {
            arity(2, &args)?;
            Tensor::Bool(match (&*args[0], &*args[1]) {
                (Tensor::F32(a), Tensor::F32(b)) => ew::equal(a, b)?,
                (Tensor::I64(a), Tensor::I64(b)) => ew::equal(a, b)?,
                (Tensor::I32(a), Tensor::I32(b)) => ew::equal(a, b)?,
                (Tensor::Bool(a), Tensor::Bool(b)) => ew::equal(a, b)?,
                (a, b) => bail!("unsupported operand types {} and {}", a.dtype(), b.dtype()),
            })
        }
        Op::Where => {
            arity(3, &args)?;
            let Tensor::Bool(c) = &*args[0] else {
                bail!("the condition must be bool, got {}", args[0].dtype())
            };
            match (&*args[1], &*args[2]) {
                (Tensor::F32(a), Tensor::F32(b)) => Tensor::F32(ew::where_(c, a, b)?),
                (Tensor::I64(a), Tensor::I64(b)) => Tensor::I64(ew::where_(c, a, b)?),
                (Tensor::I32(a), Tensor::I32(b)) => Tensor::I32(ew::where_(c, a, b)?),
                (Tensor::Bool(a), Tensor::Bool(b)) => Tensor::Bool(ew::where_(c, a, b)?),
                (a, b) => bail!("unsupported operand types {} and {}", a.dtype(), b.dtype()),
            }
        }
        Op::Expand => {
            arity(2, &args)?;
            let shape = args[1].to_i64_vec()?;
            dispatch!(&*args[0], a => wrap(so::expand(a, &shape)?))
        }
        Op::LayerNorm { axis, epsilon } => {
            arity(2, &args)?;
            let s = args[0].shape().to_vec();
            let ax = so::norm_axis(*axis, s.len())?;
            let d: usize = s[ax..].iter().product();
            let scale = f32_std(&args[1])?.into_owned();
            let bias = args.get(2).map(|b| Ok(f32_std(b)?.into_owned())).transpose()?;
            if scale.len() != d || bias.as_ref().is_some_and(|b| b.len() != d) {
                bail!(
                    "scale {:?} and bias {:?} must hold the {d} values of the normalised axes of {s:?}",
                    args[1].shape(),
                    args.get(2).map(|b| b.shape().to_vec())
                );
            }
            let mut x = so::standard(owned(args.swap_remove(0)).into_f32()?);
            ew::layer_norm(
                x.as_slice_mut().expect("standard"),
                d,
                &scale,
                bias.as_deref(),
                *epsilon,
            );
            Tensor::F32(x)
        }
        _ => bail!("{} is not a transformer operator", op.name()),
    })
}

/// A Conv node's prepared state for one input size: the conv actually run (taps that only meet
/// padding dropped), its weights when they differ from the node's, and the weights packed per
/// group for the blocked GEMM.
struct ConvPrep {
    hw: [usize; 2],
    conv: crate::ir::op::Conv,
    weights: Option<Vec<f32>>,
    packed: Option<Vec<gemm::PackedA>>,
}

/// What a channels-last Conv prepares once per input size: taps that only see padding dropped
/// (as [`ConvPrep`]) and the weights packed for [`direct`].
struct NhwcPrep {
    hw: [usize; 2],
    conv: crate::ir::op::Conv,
    weights: direct::NhwcWeights,
}

/// The elements of `a` in logical order, without a copy when it owns exactly them.
fn into_vec(a: ArrayD<f32>) -> Vec<f32> {
    if a.is_standard_layout() {
        let len = a.len();
        let (v, off) = a.into_raw_vec_and_offset();
        if off.unwrap_or(0) == 0 && v.len() == len {
            return v;
        }
        let start = off.unwrap_or(0);
        return v[start..start + len].to_vec();
    }
    a.iter().copied().collect()
}

/// inputs: x `[N, H, W, C]`, weight `[M, C/group, kh, kw]`, [bias `[M]`], [residual `[N, oh, ow, M]`].
fn conv_nhwc(c: &crate::ir::op::Conv, mut args: Vec<Arc<Tensor>>, cache: Option<&Cache>) -> Result<Tensor> {
    let residual = match args.len() {
        4 => Some(owned(args.pop().expect("4 inputs")).into_f32()?),
        _ => None,
    };
    let xs = shape4(&args[0], "Conv")?;
    let ws = args[1].shape().to_vec();
    let [n, h, w, ch] = xs;
    let depthwise = c.group > 1;
    let fits = match depthwise {
        false => c.group == 1 && ws.len() == 4 && ws[1] == ch,
        true => c.group == ch && ws.len() == 4 && ws[0] == ch && ws[1] == 1,
    };
    if !fits || ws[2..] != c.window.kernel {
        bail!(
            "channels-last Conv (group {}) does not fit weight {ws:?} and input {xs:?}",
            c.group
        );
    }
    let bias = args.get(2).map(|b| f32_std(b)).transpose()?;
    if bias.as_ref().is_some_and(|b| b.len() != ws[0]) {
        bail!("bias has {} values for {} output channels", bias.unwrap().len(), ws[0]);
    }
    let hw = [h, w];
    let build = || -> Result<NhwcPrep> {
        let wdata = f32_std(&args[1])?;
        let (conv, sliced) = match crate::ir::window::pruned_weights(c, hw, &wdata, &ws)? {
            Some((small, sliced)) => (small, Some(sliced)),
            None => (c.clone(), None),
        };
        let wv = sliced.as_deref().unwrap_or(&wdata);
        let kernel = conv.window.kernel;
        let weights = match depthwise {
            false => direct::NhwcWeights::pack(wv, ws[0], ch, kernel, bias.as_deref()),
            true => direct::NhwcWeights::pack_depthwise(wv, ch, kernel, bias.as_deref()),
        };
        Ok(NhwcPrep { hw, conv, weights })
    };
    let mut slot = None;
    let mut prep: &NhwcPrep = cached(cache, build, &mut slot)?;
    let mut fresh = None;
    if prep.hw != hw {
        prep = fresh.insert(build()?);
    }
    let x = f32_std(&args[0])?;
    let epi = direct::Epilogue {
        residual: residual.map(into_vec),
        relu: c.relu,
        relu_max: c.relu_max,
    };
    let simd = super::kernels::Simd::detect();
    let (out, shape) = direct::conv_nhwc(&x, [n, h, w, ch], &prep.weights, &prep.conv, epi, simd)?;
    Tensor::f32(&shape, out)
}

/// A `LutMatMul` node's int8 tables in the layouts its kernels read, each built on first use
/// (the row-wise kernel's `[c][k][m]`, the VNNI kernel's quads).
#[derive(Default)]
struct LutTables {
    rowwise: std::sync::OnceLock<Vec<u8>>,
    quads: std::sync::OnceLock<Vec<i8>>,
}

/// An NCHW `Conv` (`args`: input, weight, optional bias) through the blocked GEMM, the weights
/// packed (and taps that only ever see padding pruned) once per input size in the node's cache.
fn conv_nchw(c: &crate::ir::op::Conv, args: &[Arc<Tensor>], cache: Option<&Cache>) -> Result<Tensor> {
    if c.relu {
        bail!("a fused ReLU needs the channels-last Conv");
    }
    let xs = shape4(&args[0], "Conv")?;
    let w = &args[1];
    let ws = w.shape();
    if ws.len() != 4 || ws[1] * c.group != xs[1] || !ws[0].is_multiple_of(c.group) {
        bail!("weight {:?} with group {} does not fit input {:?}", ws, c.group, xs);
    }
    let bias = args.get(2).map(|b| f32_std(b)).transpose()?;
    if bias.as_ref().is_some_and(|b| b.len() != ws[0]) {
        bail!("bias has {} values for {} output channels", bias.unwrap().len(), ws[0]);
    }
    let wdata = f32_std(w)?;
    // What the node prepares once per input size: the kernel without taps that only ever
    // see padding (e.g. a 3×3 conv on a 1×1 input; a smaller kernel with adjusted padding
    // computes the same outputs) and the weights packed for the blocked GEMM.
    let hw = [xs[2], xs[3]];
    let build = || -> Result<ConvPrep> {
        let (conv, weights) = match crate::ir::window::pruned_weights(c, hw, &wdata, ws)? {
            Some((small, sliced)) => (small, Some(sliced)),
            None => (c.clone(), None),
        };
        let packed = conv::pack_weights(weights.as_deref().unwrap_or(&wdata), ws[0], &conv, xs[1]);
        Ok(ConvPrep {
            hw,
            conv,
            weights,
            packed,
        })
    };
    let mut slot = None;
    let mut prep: &ConvPrep = cached(cache, build, &mut slot)?;
    let mut fresh = None;
    if prep.hw != hw {
        prep = fresh.insert(build()?);
    }
    Ok(Tensor::F32(conv::conv2d(
        &f32_std(&args[0])?,
        xs,
        prep.weights.as_deref().unwrap_or(&wdata),
        ws[0],
        bias.as_deref(),
        &prep.conv,
        prep.packed.as_deref(),
    )?))
}

/// `LutMatMul`: the sums of each row's table entries (`args`: codes `[.., C]` u8, tables
/// `[C, M, K]` i8 or f32, scale and offset `[M]`, an optional residual), through the affine
/// epilogue (and the ReLU when `relu`); the i8 tables' kernel layouts kept in the node's cache.
fn lut_matmul(relu: bool, args: &[Arc<Tensor>], cache: Option<&Cache>) -> Result<Tensor> {
    if !(4..=5).contains(&args.len()) {
        bail!("LutMatMul needs 4 or 5 inputs, got {}", args.len());
    }
    let Tensor::U8(codes) = &*args[0] else {
        bail!("codes must be u8")
    };
    let codes = codes.as_standard_layout();
    let ts = args[1].shape().to_vec();
    let &[c, m, k] = ts.as_slice() else {
        bail!("tables must be [C, M, K], got {ts:?}")
    };
    if args[0].shape().last() != Some(&c) || args[2].len() != m || args[3].len() != m {
        bail!(
            "codes {:?}, tables {ts:?}, scale {:?} and offset {:?} do not fit together",
            args[0].shape(),
            args[2].shape(),
            args[3].shape()
        );
    }
    let rows = codes.len() / c.max(1);
    let codes = codes.as_slice().unwrap();
    if k <= 256 && codes.iter().fold(0u8, |a, &v| a.max(v)) as usize >= k {
        let bad = codes.iter().find(|&&v| v as usize >= k).expect("the max is one");
        bail!("code {bad} out of range for {k} prototypes");
    }
    let (scale, offset) = (f32_std(&args[2])?, f32_std(&args[3])?);
    let residual = args.get(4).map(|r| f32_std(r)).transpose()?;
    if let Some(r) = &residual {
        if r.len() != rows * m {
            bail!("the residual has {} values, the output {}", r.len(), rows * m);
        }
    }
    let epi = lut::Affine {
        scale: &scale[..m],
        offset: &offset[..m],
        residual: residual.as_deref(),
        relu,
    };
    let y = match &*args[1] {
        Tensor::I8(t) => {
            let t = t.as_standard_layout();
            let t = t.as_slice().unwrap();
            // the tables in the layouts the kernels read, built once per node
            let mut slot = None;
            let tables: &LutTables = cached(cache, || Ok(LutTables::default()), &mut slot)?;
            if lut::prefer_rowwise(rows, k, m) {
                let tt = tables.rowwise.get_or_init(|| lut::transpose_tables(t, c, m, k));
                let mut y = Vec::with_capacity(rows * m);
                let level = super::kernels::Simd::detect();
                lut::lut_i8_rowwise_then(
                    level,
                    codes,
                    rows,
                    c,
                    tt,
                    m,
                    k,
                    y.spare_capacity_mut(),
                    |r0, acc, out| epi.apply(r0, acc, out),
                );
                // SAFETY: `lut_i8_rowwise_then` hands every block of the first `rows · m`
                // values to the epilogue, which writes each of them.
                unsafe { y.set_len(rows * m) };
                y
            } else {
                // the epilogue runs on each block of sums while it is in cache, and
                // writes every output value: `y` needs no zeroing
                let mut y = Vec::with_capacity(rows * m);
                let quads = lut::wants_quads(k).then(|| tables.quads.get_or_init(|| lut::quad_tables(t, c, m, k)));
                let quads = quads.map(|q| &q[..]);
                lut::lut_i8_affine(codes, rows, c, t, quads, m, k, epi, y.spare_capacity_mut());
                // SAFETY: `lut_i8_affine` writes every one of the first `rows · m` values.
                unsafe { y.set_len(rows * m) };
                y
            }
        }
        Tensor::F32(t) => {
            let t = t.as_standard_layout();
            let mut sums = vec![0f32; rows * m];
            lut::lut_f32(codes, rows, c, t.as_slice().unwrap(), m, k, &mut sums);
            let mut y = Vec::with_capacity(rows * m);
            epi.apply(0, &sums, y.spare_capacity_mut());
            // SAFETY: the epilogue wrote every one of the `rows · m` values.
            unsafe { y.set_len(rows * m) };
            y
        }
        t => bail!("tables must be i8 or f32, got {}", t.dtype()),
    };
    let mut shape = args[0].shape().to_vec();
    *shape.last_mut().unwrap() = m;
    Ok(Tensor::F32(
        ArrayD::from_shape_vec(IxDyn(&shape), y).expect("output size"),
    ))
}

/// Get (or build on first use) a node's cached state of type `T`; without a cache, build it.
fn cached<'c, T: std::any::Any + Send + Sync>(
    cache: Option<&'c Cache>,
    build: impl FnOnce() -> Result<T>,
    owned_slot: &'c mut Option<T>,
) -> Result<&'c T> {
    match cache {
        Some(c) => {
            if c.get().is_none() {
                let v = build()?;
                let _ = c.set(Box::new(v));
            }
            c.get()
                .and_then(|b| b.downcast_ref::<T>())
                .ok_or_else(|| crate::error::Error::Other("node cache holds another type".into()))
        }
        None => Ok(owned_slot.insert(build()?)),
    }
}

fn pq_encode(p: &crate::ir::op::PqEncode, args: &[Arc<Tensor>], cache: Option<&Cache>) -> Result<Tensor> {
    if p.pixel {
        return pq_encode_pixels(p, args, cache);
    }
    let x = f32_std(&args[0])?;
    let (rows, mut shape, hint) = match &p.window {
        Some(w) => {
            let s4 = shape4(&args[0], "PQEncode")?;
            // channels-last [N, H, W, C] or NCHW: the same rows either way
            let (hw, channels) = if p.nhwc {
                ([s4[1], s4[2]], s4[3])
            } else {
                ([s4[2], s4[3]], s4[1])
            };
            let geo = w.resolve(hw)?;
            // one channel: NCHW is channels-last already, and the channels-last kernels apply
            let nhwc = p.nhwc || channels == 1;
            let (x, win) = (&x[..], w);
            let rows = if nhwc {
                let shape = [s4[0], hw[0], hw[1], channels];
                encode::Rows::ConvNhwc { x, shape, win, geo }
            } else {
                encode::Rows::Conv { x, shape: s4, win, geo }
            };
            let hint = nhwc.then_some((channels, w.kernel[0], w.kernel[1]));
            (rows, vec![s4[0], geo.out[0] * geo.out[1], 0], hint)
        }
        None => {
            let d = *args[0]
                .shape()
                .last()
                .ok_or_else(|| crate::error::Error::Other("rank-0 input".into()))?;
            (encode::Rows::Matrix { x: &x, d }, args[0].shape().to_vec(), None)
        }
    };
    let sub = crate::pq::Subspaces {
        d: rows.d(),
        s: p.subspace,
    };
    let build = || -> Result<encode::Prepared> {
        let c_n = sub.count();
        match p.encoder {
            Encoder::Argmin => {
                let protos = f32_std(&args[1])?;
                let ps = args[1].shape();
                if ps.len() != 3 || ps[0] != c_n || ps[2] != p.subspace || !(1..=256).contains(&ps[1]) {
                    bail!("prototypes {ps:?} do not fit {c_n} codebooks of {} values", p.subspace);
                }
                if let Some(a) = p.act_scale {
                    if !super::kernels::encode_i8::valid_act_scale(a) || p.subspace > 64 {
                        bail!("the int8 encoder needs a positive normal act_scale and a subspace of at most 64 values, got {a} and {}", p.subspace);
                    }
                }
                let norms = argmin_norms(args, c_n, ps[1])?;
                let cb = encode::Codebooks::Argmin {
                    k: ps[1],
                    protos: &protos,
                    act_scale: p.act_scale,
                    norms: norms.as_deref(),
                };
                Ok(encode::prepare(sub, &cb, hint))
            }
            Encoder::Tree => {
                let (depth, dims, thresholds) = tree_params(p, args, c_n)?;
                let cb = encode::Codebooks::Tree {
                    depth,
                    dims: &dims,
                    thresholds: &thresholds,
                };
                Ok(encode::prepare(sub, &cb, hint))
            }
        }
    };
    let mut slot = None;
    let prepared = cached(cache, build, &mut slot)?;
    let mut codes = vec![0u8; rows.count() * sub.count()];
    encode::encode_prepared(&rows, prepared, &mut codes);
    *shape.last_mut().unwrap() = sub.count();
    Ok(Tensor::U8(
        ArrayD::from_shape_vec(IxDyn(&shape), codes).expect("codes size"),
    ))
}

/// An argmin `PQEncode`'s optional norms (`args[2]`, `[c_n, k]`: the code is
/// `argmin_k norms[c][k] − 2 x·p_k`), checked.
fn argmin_norms(args: &[Arc<Tensor>], c_n: usize, k: usize) -> Result<Option<Vec<f32>>> {
    let Some(t) = args.get(2) else {
        return Ok(None);
    };
    if t.shape() != [c_n, k] {
        bail!("norms {:?} do not fit {c_n} codebooks of {k} prototypes", t.shape());
    }
    Ok(Some(f32_std(t)?.into_owned()))
}

/// A tree `PQEncode`'s depth, split channels (`args[1]`: `[c_n, depth]`, clamped into the
/// codebook) and thresholds (`args[2]`: `c_n · (2^depth − 1)` values), checked.
fn tree_params<'a>(
    p: &crate::ir::op::PqEncode,
    args: &'a [Arc<Tensor>],
    c_n: usize,
) -> Result<(usize, Vec<usize>, std::borrow::Cow<'a, [f32]>)> {
    if args.len() < 3 {
        bail!("expects 3 inputs, got {}", args.len());
    }
    let depth = args[1].shape().get(1).copied().unwrap_or(0);
    if args[1].shape() != [c_n, depth] || args[2].len() != c_n * ((1usize << depth.min(8)) - 1) || depth > 8 {
        bail!(
            "tree tensors {:?} / {:?} do not fit {c_n} codebooks",
            args[1].shape(),
            args[2].shape()
        );
    }
    let dims: Vec<usize> = args[1]
        .to_i64_vec()?
        .into_iter()
        .map(|v| v.clamp(0, p.subspace as i64 - 1) as usize)
        .collect();
    Ok((depth, dims, f32_std(&args[2])?))
}

/// The int8 pixel encoder's codebooks for prototypes `args[1]` `[⌈ch/s⌉, K, s]` (and norms `args[2]`, if any).
fn pixel_quant(
    p: &crate::ir::op::PqEncode,
    args: &[Arc<Tensor>],
    act_scale: f32,
    ch: usize,
) -> Result<super::kernels::encode_pixel::PixelQuant> {
    use super::kernels::encode_i8::{valid_act_scale, Quant};
    let (s, ps) = (p.subspace, args[1].shape());
    let c_n = ch.div_ceil(s.max(1));
    if ps.len() != 3 || ps[0] != c_n || ps[2] != s || !(1..=256).contains(&ps[1]) {
        bail!("prototypes {ps:?} do not fit {c_n} pixel codebooks of {s} channels");
    }
    if !valid_act_scale(act_scale) || s > 64 {
        bail!("the int8 encoder needs a positive normal act_scale and a subspace of at most 64 values, got {act_scale} and {s}");
    }
    let norms = argmin_norms(args, c_n, ps[1])?;
    let quant = Quant::with_norms(&f32_std(&args[1])?, norms.as_deref(), ps[1], s, act_scale);
    Ok(super::kernels::encode_pixel::PixelQuant::new(quant, ch, s, ps[1]))
}

/// A pixel encoder of [`pq_encode_pixels`] (the int8 or the tree kernel), prepared once per
/// node: with its codebooks per pixel, the codes of an all-zero pixel (for taps in the
/// padding) encoded by it, and the input channels it was prepared for.
struct PixelEncoder<E> {
    enc: E,
    codebooks: usize,
    zero: Vec<u8>,
    ch: usize,
}

impl<E: Send + Sync + 'static> PixelEncoder<E> {
    /// The codes of the `rows` pixels `x` (`ch` channels each) and those of an all-zero pixel,
    /// by `encode` with the encoder `build` prepares (with its codebooks per pixel): built once
    /// and kept in the node's cache when it has one. An input of another channel count than the
    /// cached encoder was prepared for is an error.
    #[allow(clippy::too_many_arguments)]
    fn codes<'c>(
        cache: Option<&'c Cache>,
        slot: &'c mut Option<Self>,
        x: &[f32],
        rows: usize,
        ch: usize,
        build: impl FnOnce() -> Result<(E, usize)>,
        encode: impl Fn(&E, &[f32], &mut [u8]),
    ) -> Result<(Vec<u8>, &'c [u8])> {
        let run = |enc: &E, c_n: usize, x: &[f32], rows: usize| {
            let mut codes = vec![0u8; rows * c_n];
            encode(enc, x, &mut codes);
            codes
        };
        let prepare = || -> Result<Self> {
            let (enc, codebooks) = build()?;
            let zero = run(&enc, codebooks, &vec![0.0; ch], 1);
            Ok(PixelEncoder {
                enc,
                codebooks,
                zero,
                ch,
            })
        };
        let pe = cached(cache, prepare, slot)?;
        if pe.ch != ch {
            bail!(
                "the node's encoder was prepared for {} input channels, this input has {ch}",
                pe.ch
            );
        }
        Ok((run(&pe.enc, pe.codebooks, x, rows), &pe.zero))
    }
}

/// Pixel codebooks (`PqEncode::pixel`): every input pixel encoded once (the same op over a 1×1
/// window, so the same kernels and codebook cache; the int8 encoder on channels-last inputs by
/// [`encode_pixel`](super::kernels::encode_pixel)), an all-zero pixel for the taps outside the
/// image, then each output pixel's codes gathered tap by tap.
fn pq_encode_pixels(p: &crate::ir::op::PqEncode, args: &[Arc<Tensor>], cache: Option<&Cache>) -> Result<Tensor> {
    use crate::ir::op::Window;
    let Some(w) = &p.window else {
        bail!("pixel codebooks need a window")
    };
    let s4 = shape4(&args[0], "PQEncode")?;
    let (n, [h, wd], ch) = match p.nhwc {
        true => (s4[0], [s4[1], s4[2]], s4[3]),
        false => (s4[0], [s4[2], s4[3]], s4[1]),
    };
    if ch == 0 {
        bail!("pixel codebooks need at least one input channel");
    }
    let geo = w.resolve([h, wd])?;
    let one = crate::ir::op::PqEncode {
        window: Some(Window::pointwise()),
        pixel: false,
        ..p.clone()
    };
    use super::kernels::{encode_pixel_tree::PixelTree, Simd};
    let level = Simd::detect();
    let depth = args.get(1).and_then(|t| t.shape().get(1).copied()).unwrap_or(0);
    let rows = n * h * wd;
    let (mut quant_slot, mut tree_slot) = (None, None);
    let (codes, zero): (_, std::borrow::Cow<[u8]>) = match (p.act_scale, p.nhwc, p.encoder) {
        // the int8 encoder on channels-last pixels: its own kernels
        (Some(a), true, Encoder::Argmin) => {
            let build = || Ok((pixel_quant(p, args, a, ch)?, ch.div_ceil(p.subspace.max(1))));
            let encode =
                |pq: &super::kernels::encode_pixel::PixelQuant, x: &[f32], c: &mut [u8]| pq.encode(level, x, c);
            let x = f32_std(&args[0])?;
            let (codes, zero) = PixelEncoder::codes(cache, &mut quant_slot, &x, rows, ch, build, encode)?;
            (codes, zero.into())
        }
        // the tree encoder on channels-last pixels: its own kernel where it serves the level and
        // the trees, else the window encoder's path below
        (_, true, Encoder::Tree) if PixelTree::fits(level, ch, p.subspace, depth) => {
            let build = || -> Result<_> {
                let (depth, dims, thresholds) = tree_params(p, args, ch / p.subspace)?;
                let t = PixelTree::new(ch, p.subspace, depth, &dims, &thresholds)
                    .ok_or_else(|| crate::error::Error::Other("pixel trees do not fit their kernel".into()))?;
                let c_n = t.codebooks();
                Ok((t, c_n))
            };
            let encode = |t: &PixelTree, x: &[f32], c: &mut [u8]| t.encode(level, x, c);
            let x = f32_std(&args[0])?;
            let (codes, zero) = PixelEncoder::codes(cache, &mut tree_slot, &x, rows, ch, build, encode)?;
            (codes, zero.into())
        }
        _ => {
            let u8s = |t: Tensor| match t {
                Tensor::U8(a) => Ok(a.into_raw_vec_and_offset().0),
                t => Err(crate::error::Error::Other(format!(
                    "codes must be u8, got {}",
                    t.dtype()
                ))),
            };
            let zero_shape: &[usize] = if p.nhwc { &[1, 1, 1, ch] } else { &[1, ch, 1, 1] };
            let mut zargs = args.to_vec();
            zargs[0] = Arc::new(Tensor::f32(zero_shape, vec![0.0; ch])?);
            (
                u8s(pq_encode(&one, args, cache)?)?,
                u8s(pq_encode(&one, &zargs, cache)?)?.into(),
            )
        }
    };
    let px = PixelCodes {
        codes: &codes,
        zero: &zero,
        n,
        hw: [h, wd],
    };
    gather_taps(px, w, &geo)
}

/// Each output pixel's codes, tap by tap (`[n, oh·ow, kh·kw·g]`), from the codes of the input
/// pixels `codes` (`[n][h·w][g]`; `zero`: the `g` codes of an all-zero pixel, for taps outside
/// the image). A kernel row whose taps all read the image is one run of `kw·g` input codes when
/// the window is not dilated along x: it is copied whole ([`copy_codes`]), so the gather costs a
/// few vector moves per output pixel rather than a `memcpy` call per tap (with one call per
/// tap, ResNet-18/16's eight pixel encoders took 9.3 ms of a 64-image run, more than the exact
/// convolutions they replace; 5.2 ms with the runs, Intel AVX-512, one thread). The copies are
/// worked out from two small per-axis tap tables as they are made (a list of them, built per
/// call, cost as much as the copies at batch 1), and bands of output rows are split across the
/// team: at batch 1 the gather was a single-threaded 9 % of ResNet-18/16's run. Most windows
/// take [`gather_padded`] instead, where no tap is tested.
fn gather_taps(px: PixelCodes, w: &crate::ir::op::Window, geo: &crate::ir::window::Geometry) -> Result<Tensor> {
    let (n, g, [kh, kw], [oh, ow]) = (px.n, px.zero.len(), w.kernel, geo.out);
    // the codes (and the per-axis tap tables) within the tensor limit: a crafted window (large
    // pads and kernel on a small map) must not overflow or allocate without bound
    crate::limits::check_shape(&[n, oh, ow, kh, kw, g], 1, "PQEncode pixel codes")?;
    crate::limits::check_shape(&[oh.max(ow), kh.max(kw)], 16, "PQEncode tap tables")?;
    let row = kh * kw * g;
    let len = n * oh * ow * row;
    let shape = [n, oh * ow, row];
    if len == 0 {
        return Ok(Tensor::U8(
            ArrayD::from_shape_vec(IxDyn(&shape), Vec::new()).expect("codes size"),
        ));
    }
    // every byte is written below (`gather_padded`, or `Taps::rows`), so the codes need no zeroing (which took a
    // fifth of the gather on ResNet-18 w64); debug builds (the tests) fill them first with a
    // value no code of 16 prototypes takes, so a byte left unwritten shows
    let mut out = Vec::with_capacity(len);
    if cfg!(debug_assertions) {
        out.resize(len, UNWRITTEN);
        out.clear();
    }
    let dst = &mut out.spare_capacity_mut()[..len];
    if !gather_padded(&px, w, geo, dst) {
        gather_tables(&px, w, geo, dst);
    }
    // SAFETY: `gather_padded` (when it returns true) or `gather_tables` wrote every byte of the
    // first `len`.
    unsafe { out.set_len(len) };
    Ok(Tensor::U8(
        ArrayD::from_shape_vec(IxDyn(&shape), out).expect("codes size"),
    ))
}

/// [`gather_taps`] through per-axis tap tables, into `out` (`[n][oh·ow][kh·kw·g]`, every byte
/// written).
fn gather_tables(
    px: &PixelCodes,
    w: &crate::ir::op::Window,
    geo: &crate::ir::window::Geometry,
    out: &mut [MaybeUninit<u8>],
) {
    let &PixelCodes {
        codes,
        zero,
        hw: [h, wd],
        ..
    } = px;
    let (g, [kh, kw], [oh, ow]) = (zero.len(), w.kernel, geo.out);
    let row = kh * kw * g;
    // each output row's and column's tap sources, the same for every image (None: outside)
    let axis = |a: usize, n_out: usize, k: usize, len: usize| -> Vec<Option<usize>> {
        (0..n_out * k)
            .map(|ot| {
                (ot / k * w.strides[a] + ot % k * w.dilations[a])
                    .checked_sub(geo.pads[a])
                    .filter(|&v| v < len)
            })
            .collect()
    };
    let (ys, xs) = (axis(0, oh, kh, h), axis(1, ow, kw, wd));
    // per output column: the first input column of its taps when they are one run inside the image
    let runs: Vec<Option<usize>> = (0..ow)
        .map(|ox| {
            let t = &xs[ox * kw..(ox + 1) * kw];
            match (t[0], t[kw - 1]) {
                (Some(x0), Some(x1)) if w.dilations[1] == 1 && x1 == x0 + kw - 1 => Some(x0),
                _ => None,
            }
        })
        .collect();
    let zeros = zero.repeat(kw);
    // the interior columns: runs, one stride apart
    let lo = runs.iter().position(Option::is_some).unwrap_or(ow);
    let at = |ox: usize| runs[lo].map(|x0| x0 + (ox - lo) * w.strides[1]);
    let hi = (lo..ow).find(|&ox| runs[ox] != at(ox)).unwrap_or(ow);
    let t = Taps {
        g,
        kw,
        kh,
        wd,
        sx: w.strides[1],
        ys: &ys,
        xs: &xs,
        runs: &runs,
        interior: (lo, hi),
        zero,
        zeros: &zeros,
    };
    // bands of about 1024 copies (a few microseconds), each worth a hand-off
    let band = 1024usize.div_ceil(ow * kh);
    // `for_bands` hands out every row of every image, and `Taps::rows` writes each byte of its
    // rows (every kernel row of every output pixel: a run, a zero run, or tap by tap)
    super::kernels::team::for_bands(out, oh, ow * row, band, |img, oy0, dst| {
        gather_rows(&t, kw * g, &codes[img * h * wd * g..(img + 1) * h * wd * g], oy0, dst)
    });
}

/// The codes of every input pixel of `n` images of `hw` pixels (`codes`: `[n][h·w][g]`), and
/// those of an all-zero pixel (`zero`: `g`), for the taps outside the image.
#[derive(Clone, Copy)]
struct PixelCodes<'a> {
    codes: &'a [u8],
    zero: &'a [u8],
    n: usize,
    hw: [usize; 2],
}

/// [`gather_taps`] through padded images: each image's pixel codes copied once into an image
/// bordered with the zero pixel's codes, so that every kernel row of every output pixel is one
/// run of `kw·g` codes inside it and no tap needs a test (on small maps most output pixels
/// touch the border: 12 of a 4×4 map's 16, where the tap-by-tap path branches per tap). For
/// windows not dilated along x whose padded image is no larger than the codes gathered from
/// it (so the copy costs at most as much as the gather); false, writing nothing, otherwise.
/// Writes every byte of `out` (`[n][oh·ow][kh·kw·g]`) when it returns true.
fn gather_padded(
    px: &PixelCodes,
    w: &crate::ir::op::Window,
    geo: &crate::ir::window::Geometry,
    out: &mut [MaybeUninit<u8>],
) -> bool {
    let &PixelCodes {
        codes,
        zero,
        n,
        hw: [h, wd],
    } = px;
    let g = zero.len();
    let ([kh, kw], [oh, ow], [sy, sx], dy) = (w.kernel, geo.out, w.strides, w.dilations[0]);
    let (pt, pl) = (geo.pads[0], geo.pads[1]);
    let sizes_fit = n * oh * ow * kh * kw * g == out.len() && codes.len() == n * h * wd * g;
    if w.dilations[1] != 1 || h * wd * g == 0 || !sizes_fit {
        return false;
    }
    // the padded extents: the image and every tap (a crafted window's strides, dilations and
    // pads may overflow them: then the tap tables' path; once the size test passes, every
    // product below is at most the gathered codes' count, which the caller checked)
    let extent = |img: usize, pad: usize, taps: [usize; 3]| -> Option<usize> {
        let [n_out, stride, reach] = taps;
        let last = (n_out - 1).checked_mul(stride)?.checked_add(reach)?;
        Some(pad.checked_add(img)?.max(last))
    };
    let (Some(hp), Some(wp)) = (
        extent(h, pt, [oh, sy, (kh - 1).saturating_mul(dy).saturating_add(1)]),
        extent(wd, pl, [ow, sx, kw]),
    ) else {
        return false;
    };
    let per_image = oh * ow * kh * kw * g;
    if hp
        .checked_mul(wp)
        .and_then(|v| v.checked_mul(g))
        .is_none_or(|v| v > per_image)
    {
        return false;
    }
    let row_bytes = wp * g;
    let zeros = zero.repeat(wp);
    let mut padded = Vec::with_capacity(n * hp * row_bytes);
    for src in codes.chunks_exact(h * wd * g) {
        for y in 0..hp {
            match y.checked_sub(pt).filter(|&iy| iy < h) {
                Some(iy) => {
                    padded.extend_from_slice(&zeros[..pl * g]);
                    padded.extend_from_slice(&src[iy * wd * g..(iy + 1) * wd * g]);
                    padded.extend_from_slice(&zeros[(pl + wd) * g..]);
                }
                None => padded.extend_from_slice(&zeros),
            }
        }
    }
    let p = Padded {
        run: kw * g,
        kh,
        ow,
        step: sx * g,
        sy,
        dy,
        row_bytes,
    };
    let (row, image) = (kh * kw * g, hp * row_bytes);
    let band = 1024usize.div_ceil(ow * kh);
    super::kernels::team::for_bands(out, oh, ow * row, band, |img, oy0, dst| {
        gather_rows(&p, kw * g, &padded[img * image..(img + 1) * image], oy0, dst)
    });
    true
}

/// A gather's copies of whole output rows of one image, from that image's codes.
trait GatherRows {
    /// Output rows `oy0..` (`dst`, whole rows, every byte written) from `src`; `R`: the length
    /// of a kernel row's run (`kw·g`) when known, else 0.
    fn rows<const R: usize>(&self, src: &[u8], oy0: usize, dst: &mut [MaybeUninit<u8>]);
}

/// `t.rows` with the usual runs (3 taps of 4-32 codes, `run` bytes) copied in moves of a known
/// size.
#[inline(always)]
fn gather_rows(t: &impl GatherRows, run: usize, src: &[u8], oy0: usize, dst: &mut [MaybeUninit<u8>]) {
    match run {
        12 => t.rows::<12>(src, oy0, dst),
        24 => t.rows::<24>(src, oy0, dst),
        48 => t.rows::<48>(src, oy0, dst),
        96 => t.rows::<96>(src, oy0, dst),
        _ => t.rows::<0>(src, oy0, dst),
    }
}

/// The geometry of [`gather_padded`]'s copies: codes per kernel row's run (`kw·g`), kernel
/// rows, output width, codes between neighbouring output pixels' runs (`sx·g`), the stride and
/// dilation along y, bytes per padded row.
struct Padded {
    run: usize,
    kh: usize,
    ow: usize,
    step: usize,
    sy: usize,
    dy: usize,
    row_bytes: usize,
}

impl GatherRows for Padded {
    /// The codes of output rows `oy0..` of one image (`dst`, whole rows) from its padded image
    /// `src`, every byte written; `R`: the run's length (`kw·g`) when known, else 0.
    #[inline(always)]
    fn rows<const R: usize>(&self, src: &[u8], oy0: usize, dst: &mut [MaybeUninit<u8>]) {
        let (run, kh, ow, step) = (self.run, self.kh, self.ow, self.step);
        for (o, oy) in dst.chunks_exact_mut(ow * kh * run).zip(oy0..) {
            let starts = |k: usize| (oy * self.sy + k * self.dy) * self.row_bytes;
            // every run lies in this image: its last, at `starts(kh - 1) + (ow - 1)·sx·g`,
            // ends by `hp·wp·g` as `hp` and `wp` were sized
            assert!(starts(kh - 1) + (ow - 1) * step + run <= src.len());
            if R > 0 && kh == 3 {
                // SAFETY: the runs read as just checked; `o` holds the row's `ow` pixels of
                // 3 runs of `R` bytes.
                unsafe { interior::<R, 3>(src.as_ptr(), [0, 1, 2].map(starts), step, o.as_mut_ptr().cast(), ow) };
                continue;
            }
            for (ox, px) in o.chunks_exact_mut(kh * run).enumerate() {
                for (k, d) in px.chunks_exact_mut(run).enumerate() {
                    let at = starts(k) + ox * step;
                    copy_codes(d, &src[at..at + run]);
                }
            }
        }
    }
}

/// What a debug build's gather fills its codes with before writing them.
const UNWRITTEN: u8 = 0xA5;

/// The tap tables of [`gather_taps`].
struct Taps<'a> {
    g: usize,
    kw: usize,
    kh: usize,
    /// the input's width, the window's stride along it
    wd: usize,
    sx: usize,
    /// per output row, its `kh` input rows (None: outside)
    ys: &'a [Option<usize>],
    /// per output column, its `kw` input columns
    xs: &'a [Option<usize>],
    /// per output column, its first input column when its taps are one run inside the image
    runs: &'a [Option<usize>],
    /// the interior columns `lo..hi`: each has a run, `sx` input columns after the last
    interior: (usize, usize),
    zero: &'a [u8],
    /// `kw` zero pixels
    zeros: &'a [u8],
}

impl GatherRows for Taps<'_> {
    /// The codes of output rows `oy0..` of one image (`dst`, whole rows) from its input pixels'
    /// codes `src`; `R`: the length of a kernel row's run (`kw·g`) when known, else 0.
    #[inline(always)]
    fn rows<const R: usize>(&self, src: &[u8], oy0: usize, dst: &mut [MaybeUninit<u8>]) {
        let (g, kw, kh, wd) = (self.g, self.kw, self.kh, self.wd);
        let run = if R > 0 { R } else { kw * g };
        let row = kh * run;
        let copy = |d: &mut [MaybeUninit<u8>], s: &[u8]| match R {
            0 => copy_codes(d, &s[..d.len()]),
            _ => copy_codes(&mut d[..R], &s[..R]),
        };
        let ow = self.runs.len();
        for (o, oy) in dst.chunks_exact_mut(row * ow).zip(oy0..) {
            let ys = &self.ys[oy * kh..(oy + 1) * kh];
            // a row whose kernel rows all read the image: its interior pixels by `interior`
            let (lo, hi) = match ys.iter().all(Option::is_some) {
                true if R > 0 && kh == 3 => self.interior,
                _ => (0, 0),
            };
            if hi > lo {
                let x0 = self.runs[lo].expect("interior pixels have runs");
                let starts: [usize; 3] = std::array::from_fn(|k| (ys[k].expect("inside") * wd + x0) * g);
                let step = self.sx * g;
                // every run lies in this image's codes: its last pixel's, at
                // `(y·wd + x)·g .. (y·wd + x + kw)·g` with `x + kw ≤ wd` and `y < h`
                assert!(starts.iter().all(|s| s + (hi - lo - 1) * step + R <= src.len()));
                // SAFETY: the reads as just checked; `o` holds the `hi - lo` pixels from `lo`.
                unsafe {
                    interior::<R, 3>(
                        src.as_ptr(),
                        starts,
                        step,
                        o[lo * row..hi * row].as_mut_ptr().cast(),
                        hi - lo,
                    )
                };
            }
            let edges = (0..lo).chain(hi.max(lo)..ow);
            for ox in edges {
                let (px, r, xs) = (
                    &mut o[ox * row..(ox + 1) * row],
                    self.runs[ox],
                    &self.xs[ox * kw..(ox + 1) * kw],
                );
                for (d, y) in px.chunks_exact_mut(run).zip(ys) {
                    match (*y, r) {
                        (None, _) => copy(d, self.zeros),
                        (Some(y), Some(x0)) => copy(d, &src[(y * wd + x0) * g..]),
                        (Some(y), None) => {
                            for (d, x) in d.chunks_exact_mut(g).zip(xs) {
                                copy_codes(d, x.map_or(self.zero, |x| &src[(y * wd + x) * g..][..g]))
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `n` output pixels' codes, `KH` runs of `R` bytes each: pixel `i`'s kernel row `k` from
/// `src + starts[k] + i·step`, to `dst + (i·KH + k)·R`.
///
/// # Safety
/// Every run read lies in one allocation with `src`, and `dst` holds `n·KH·R` bytes apart from it.
#[inline(always)]
unsafe fn interior<const R: usize, const KH: usize>(
    src: *const u8,
    starts: [usize; KH],
    step: usize,
    dst: *mut u8,
    n: usize,
) {
    for i in 0..n {
        for (k, s) in starts.iter().enumerate() {
            // SAFETY: forwarded from the caller.
            unsafe { std::ptr::copy_nonoverlapping(src.add(s + i * step), dst.add((i * KH + k) * R), R) };
        }
    }
}

/// `dst.copy_from_slice(src)` for the few bytes of a tap's or a kernel row's codes, in fixed-size
/// moves (two overlapping ones when the length is not a multiple) instead of a `memcpy` call.
#[inline(always)]
fn copy_codes(dst: &mut [MaybeUninit<u8>], src: &[u8]) {
    let n = dst.len();
    assert_eq!(n, src.len(), "as many codes as places");
    #[inline(always)]
    fn mv<const B: usize>(dst: &mut [MaybeUninit<u8>], src: &[u8], at: usize) {
        let (d, s) = (&mut dst[at..at + B], &src[at..at + B]);
        // SAFETY: both slices hold `B` bytes (checked by the indexing), in distinct buffers.
        unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), d.as_mut_ptr().cast::<u8>(), B) };
    }
    match n {
        0..4 => {
            for (d, &s) in dst.iter_mut().zip(src) {
                d.write(s);
            }
        }
        4..8 => {
            mv::<4>(dst, src, 0);
            mv::<4>(dst, src, n - 4);
        }
        8..16 => {
            mv::<8>(dst, src, 0);
            mv::<8>(dst, src, n - 8);
        }
        _ => {
            for at in (0..n - 16).step_by(16) {
                mv::<16>(dst, src, at);
            }
            mv::<16>(dst, src, n - 16);
        }
    }
}

/// Wrap an array back into the matching tensor variant.
trait Wrap {
    fn wrap(self) -> Tensor;
}
macro_rules! impl_wrap {
    ($t:ty, $v:ident) => {
        impl Wrap for ArrayD<$t> {
            fn wrap(self) -> Tensor {
                Tensor::$v(self)
            }
        }
    };
}
impl_wrap!(f32, F32);
impl_wrap!(i64, I64);
impl_wrap!(i32, I32);
impl_wrap!(u8, U8);
impl_wrap!(i8, I8);
impl_wrap!(bool, Bool);
fn wrap<A: Wrap>(a: A) -> Tensor {
    a.wrap()
}

fn reshape_any(t: Tensor, shape: &[usize]) -> Result<Tensor> {
    dispatch!(t, a => Ok(wrap(so::reshape(a, shape)?)))
}

/// `alpha · op(A) · op(B) + beta · C`, with C broadcast to the output.
fn gemm_op(g: &Gemm, args: &[Arc<Tensor>]) -> Result<ArrayD<f32>> {
    let (a, b) = (args[0].as_f32()?, args[1].as_f32()?);
    if a.ndim() != 2 || b.ndim() != 2 {
        bail!("Gemm needs 2-D inputs, got {:?} and {:?}", a.shape(), b.shape());
    }
    let (a, b) = (a.as_standard_layout(), b.as_standard_layout());
    let (ar, ac) = (a.shape()[0], a.shape()[1]);
    let (br, bc) = (b.shape()[0], b.shape()[1]);
    let (m, k) = if g.trans_a { (ac, ar) } else { (ar, ac) };
    let (kb, n) = if g.trans_b { (bc, br) } else { (br, bc) };
    if k != kb {
        bail!(
            "inner dimensions differ: A {:?} B {:?} (transA={}, transB={})",
            a.shape(),
            b.shape(),
            g.trans_a,
            g.trans_b
        );
    }
    let mut out = ArrayD::<f32>::zeros(IxDyn(&[m, n]));
    let has_c = args.len() > 2 && g.beta != 0.0;
    if has_c {
        let c = args[2].as_f32()?;
        let cb = c
            .broadcast(IxDyn(&[m, n]))
            .ok_or_else(|| crate::error::Error::Other(format!("C {:?} does not broadcast to [{m}, {n}]", c.shape())))?;
        out.zip_mut_with(&cb, |o, &v| *o = g.beta * v);
    }
    let am = Mat::row_major(a.as_slice().unwrap(), ac);
    let bm = Mat::row_major(b.as_slice().unwrap(), bc);
    let am = if g.trans_a { am.transposed() } else { am };
    let bm = if g.trans_b { bm.transposed() } else { bm };
    gemm::matmul(m, n, k, am, bm, out.as_slice_mut().unwrap(), n, has_c, g.alpha, true);
    Ok(out)
}

/// What a `Gemm` with constant `B` and `C` prepares once for the packed blocked GEMM: `α·op(B)`
/// as a `k × n` matrix packed in column panels ([`gemm::PackedB`]: a transposed weight, as
/// `torch.nn.Linear` exports it, transposed and packed once here instead of read with strides
/// on every call) and `β·C` as one row.
struct GemmPrep {
    b: gemm::PackedB,
    bias: Option<Vec<f32>>,
}

/// `Gemm` through [`gemm::matmul_packed`] with the node's prepared weight ([`GemmPrep`]): the
/// output starts as the bias row, then the product is accumulated. `None` where that path does
/// not apply (no AVX-512, `transA`, a `C` that is not one row), and the caller takes the
/// general one. Any number of rows and columns: each row's sums are the same whatever the rows
/// around it, so an image gets the same bits in any batch (the `gemm` crate's kernels, the
/// general path, change with the number of rows).
fn gemm_packed(g: &Gemm, args: &[Arc<Tensor>], cache: &Cache) -> Result<Option<ArrayD<f32>>> {
    let (a, b) = (args[0].as_f32()?, args[1].as_f32()?);
    if g.trans_a || a.ndim() != 2 || b.ndim() != 2 || !gemm::PackedA::supported() {
        return Ok(None);
    }
    let (m, k) = (a.shape()[0], a.shape()[1]);
    let (kb, n) = match g.trans_b {
        true => (b.shape()[1], b.shape()[0]),
        false => (b.shape()[0], b.shape()[1]),
    };
    let c = match args.get(2) {
        Some(c) if g.beta != 0.0 => Some(c.as_f32()?),
        _ => None,
    };
    if k != kb || c.is_some_and(|c| c.broadcast(IxDyn(&[1, n])).is_none()) {
        return Ok(None);
    }
    let build = || -> Result<GemmPrep> {
        let bt = if g.trans_b { b.t() } else { b.view() };
        let bias = c.map(|c| {
            let row = c.broadcast(IxDyn(&[1, n])).expect("checked above");
            row.iter().map(|&v| g.beta * v).collect()
        });
        let b: Vec<f32> = bt.iter().map(|&v| g.alpha * v).collect();
        Ok(GemmPrep {
            b: gemm::PackedB::new(&b, k, n),
            bias,
        })
    };
    let mut slot = None;
    let prep: &GemmPrep = cached(Some(cache), build, &mut slot)?;
    let mut out = ArrayD::<f32>::zeros(IxDyn(&[m, n]));
    let o = out.as_slice_mut().expect("standard layout");
    if let Some(row) = &prep.bias {
        o.chunks_exact_mut(n).for_each(|r| r.copy_from_slice(row));
    }
    let a = a.as_standard_layout();
    let a = a.as_slice().expect("standard layout");
    gemm::matmul_rows_packed_b(a, m, &prep.b, o, prep.bias.is_some(), true);
    Ok(Some(out))
}

/// `MatMul` of `[.., m, k]` by a constant `[k, n]` (a node cache: the weight is constant) with
/// the weight packed once ([`gemm::PackedB`]), all leading rows as one GEMM: the bits of
/// [`matmul_op`]'s path for that case. `None` where it does not apply (other ranks, no AVX2).
fn matmul_packed_b(args: &[Arc<Tensor>], cache: &Cache) -> Result<Option<ArrayD<f32>>> {
    let (a, b) = (args[0].as_f32()?, args[1].as_f32()?);
    if a.ndim() < 2 || b.ndim() != 2 || !gemm::PackedA::supported() {
        return Ok(None);
    }
    let (k, n) = (b.shape()[0], b.shape()[1]);
    if a.shape()[a.ndim() - 1] != k || k == 0 {
        return Ok(None);
    }
    let build = || -> Result<gemm::PackedB> {
        let b = b.as_standard_layout();
        Ok(gemm::PackedB::new(b.as_slice().expect("standard layout"), k, n))
    };
    let mut slot = None;
    let pb: &gemm::PackedB = cached(Some(cache), build, &mut slot)?;
    let mut shape = a.shape().to_vec();
    *shape.last_mut().expect("rank ≥ 2") = n;
    let mut out = ArrayD::<f32>::zeros(IxDyn(&shape));
    let a = a.as_standard_layout();
    let rows = a.len() / k;
    let o = out.as_slice_mut().expect("standard layout");
    gemm::matmul_rows_packed_b(a.as_slice().expect("standard layout"), rows, pb, o, false, true);
    Ok(Some(out))
}

use gemm::Mat;

/// numpy `matmul` with batch broadcasting and 1-D promotion.
pub fn matmul_op(a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    if a.ndim() == 0 || b.ndim() == 0 {
        bail!("MatMul operands must have rank ≥ 1");
    }
    let a2 = if a.ndim() == 1 {
        a.view().insert_axis(ndarray::Axis(0))
    } else {
        a.view()
    };
    let b2 = if b.ndim() == 1 {
        b.view().insert_axis(ndarray::Axis(1))
    } else {
        b.view()
    };
    let (m, k) = (a2.shape()[a2.ndim() - 2], a2.shape()[a2.ndim() - 1]);
    let (kb, n) = (b2.shape()[b2.ndim() - 2], b2.shape()[b2.ndim() - 1]);
    if k != kb {
        bail!("inner dimensions differ: {:?} × {:?}", a.shape(), b.shape());
    }
    if b.ndim() == 2 && a.ndim() >= 2 {
        // [.., m, k] × [k, n]: one GEMM over all leading rows, no copies of b.
        let a_std = a.as_standard_layout();
        let b_std = b.as_standard_layout();
        let rows = a.len() / k.max(1);
        let mut shape = a.shape().to_vec();
        *shape.last_mut().unwrap() = n;
        let mut out = ArrayD::<f32>::zeros(IxDyn(&shape));
        let (asl, bsl) = (a_std.as_slice().unwrap(), b_std.as_slice().unwrap());
        // both operands read in place (at AVX2 and above)
        gemm::matmul(
            rows,
            n,
            k,
            Mat::row_major(asl, k),
            Mat::row_major(bsl, n),
            out.as_slice_mut().unwrap(),
            n,
            false,
            1.0,
            true,
        );
        return Ok(out);
    }
    let batch = ew::broadcast_shape(&a2.shape()[..a2.ndim() - 2], &b2.shape()[..b2.ndim() - 2])?;
    let mut full_a = batch.clone();
    full_a.extend([m, k]);
    let mut full_b = batch.clone();
    full_b.extend([k, n]);
    // operands already in this shape and layout are read in place
    let (ab, bb) = (
        a2.broadcast(IxDyn(&full_a)).expect("checked"),
        b2.broadcast(IxDyn(&full_b)).expect("checked"),
    );
    let (av, bv) = (ab.as_standard_layout(), bb.as_standard_layout());
    let nb: usize = batch.iter().product();
    let mut out_shape = batch.clone();
    out_shape.extend([m, n]);
    crate::limits::check_shape(&out_shape, 4, "MatMul output")?;
    let mut out = ArrayD::<f32>::zeros(IxDyn(&out_shape));
    let (asl, bsl, osl) = (
        av.as_slice().expect("standard layout"),
        bv.as_slice().expect("standard layout"),
        out.as_slice_mut().expect("standard layout"),
    );
    // one product per matrix (attention's heads: many small ones), through the blocked GEMM
    // where it applies; matrices in parallel when there are threads and enough work, each
    // summed the same way either way
    let par = nb == 1;
    let one = |i: usize, o: &mut [f32]| {
        let (ai, bi) = (&asl[i * m * k..(i + 1) * m * k], &bsl[i * k * n..(i + 1) * k * n]);
        gemm::matmul(
            m,
            n,
            k,
            Mat::row_major(ai, k),
            Mat::row_major(bi, n),
            o,
            n,
            false,
            1.0,
            par,
        );
    };
    if m * n > 0 {
        if super::kernels::team::threads() > 1 && nb > 1 && nb * m * n * k >= 1 << 16 {
            super::kernels::team::for_chunks(osl, m * n, one);
        } else {
            osl.chunks_mut(m * n).enumerate().for_each(|(i, o)| one(i, o));
        }
    }
    let mut final_shape = batch;
    if a.ndim() > 1 {
        final_shape.push(m);
    }
    if b.ndim() > 1 {
        final_shape.push(n);
    }
    so::reshape(out, &final_shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pixel codebooks: the codes of every tap of every output pixel are the codes of the
    /// input pixel there, computed here from the same encoder over a 1×1 window on the input
    /// zero-padded by hand, so taps outside the image read an all-zero pixel; the channels-last
    /// input gives the same codes. Odd sizes, strides, dilation, a channel count the codebooks
    /// do not divide (7 in codebooks of 3), whole 4-byte words (8 in codebooks of 4: the int8
    /// pixel kernels run), both encoders and the int8 one; 1 to 32 codebooks per pixel, so kernel
    /// rows of 3 to 256 bytes of codes (the gather's fixed-size moves: 12, 24, 48 and 96 bytes,
    /// on both paths); through padded images, and through the tap tables where x is dilated or
    /// the padded image would hold more codes than are gathered (strides longer than the
    /// kernel). On two threads a 40×37 map is gathered in bands of output rows (9 rows of a 3×3
    /// window).
    #[test]
    fn pixel_codebooks_gather_each_pixels_codes_per_tap() {
        for (c, s) in [(7, 3), (8, 4), (4, 4), (16, 4), (32, 4), (64, 4), (128, 4)] {
            pixel_codebooks_case(c, s, [5, 6]);
        }
        let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        two.install(|| pixel_codebooks_case(16, 4, [40, 37]));
    }

    /// A window of explicit pads, without ceil mode.
    fn test_window(
        kernel: [usize; 2],
        strides: [usize; 2],
        dilations: [usize; 2],
        pads: [usize; 4],
    ) -> crate::ir::op::Window {
        crate::ir::op::Window {
            kernel,
            strides,
            dilations,
            padding: crate::ir::op::Padding::Explicit(pads),
            ceil_mode: false,
        }
    }

    /// A pixel-codebook encoder over an input with no channels (a crafted file's constant) is
    /// an error, not a panic, at every encoder.
    #[test]
    fn pixel_codebooks_refuse_an_input_without_channels() {
        use crate::ir::op::PqEncode;
        let window = test_window([3, 3], [1, 1], [1, 1], [1; 4]);
        for act_scale in [None, Some(0.02)] {
            let op = Op::PqEncode(PqEncode {
                subspace: 4,
                encoder: Encoder::Argmin,
                window: Some(window.clone()),
                nhwc: true,
                act_scale,
                pixel: true,
            });
            let x = Arc::new(Tensor::f32(&[1, 3, 3, 0], vec![]).unwrap());
            let protos = Arc::new(Tensor::f32(&[0, 16, 4], vec![]).unwrap());
            let e = eval_op(&op, vec![x, protos]).unwrap_err();
            assert!(e.to_string().contains("input channel"), "{act_scale:?}: {e}");
        }
    }

    /// A crafted window over no images (huge padding on a 1×1 map: 20 001² output pixels)
    /// gives its empty codes at once: nothing is listed or allocated per output pixel (a copy
    /// list built per call once took 6 GB and 19 s here).
    #[test]
    fn pixel_codebooks_over_no_images() {
        use crate::ir::op::PqEncode;
        let window = test_window([1, 1], [1, 1], [1, 1], [10_000; 4]);
        let op = Op::PqEncode(PqEncode {
            subspace: 4,
            encoder: Encoder::Argmin,
            window: Some(window),
            nhwc: true,
            act_scale: None,
            pixel: true,
        });
        let x = Arc::new(Tensor::f32(&[0, 1, 1, 4], vec![]).unwrap());
        let protos = Arc::new(Tensor::f32(&[1, 16, 4], vec![0.5; 64]).unwrap());
        let codes = eval_op(&op, vec![x, protos]).unwrap();
        assert_eq!(codes[0].shape(), &[0, 20_001 * 20_001, 1]);
    }

    fn pixel_codebooks_case(c: usize, s: usize, [h, w]: [usize; 2]) {
        use crate::ir::op::{PqEncode, Window};
        let (n, k): (usize, usize) = (2, 16);
        let g = c.div_ceil(s);
        let x: Vec<f32> = (0..n * c * h * w)
            .map(|i| ((i * 2654435761usize) % 1000) as f32 / 250.0 - 1.0)
            .collect();
        let x = Tensor::f32(&[n, c, h, w], x).unwrap();
        let protos: Vec<f32> = (0..g * k * s)
            .map(|i| ((i * 40503) % 997) as f32 / 250.0 - 2.0)
            .collect();
        let protos = Arc::new(Tensor::f32(&[g, k, s], protos).unwrap());
        let depth = 4;
        let dims = Arc::new(Tensor::I64(
            ArrayD::from_shape_vec(IxDyn(&[g, depth]), (0..g * depth).map(|i| (i % s) as i64).collect()).unwrap(),
        ));
        let thr = Arc::new(Tensor::f32(&[g, 15], (0..g * 15).map(|i| (i % 7) as f32 / 4.0 - 0.75).collect()).unwrap());
        for (win, pads) in [
            (([3, 3], [1, 1], [1, 1]), [1, 1, 1, 1]),
            (([3, 2], [2, 1], [1, 2]), [0, 2, 1, 0]),
            // strided runs, whole kernel rows in the padding, a kernel wider than the image
            (([3, 3], [2, 2], [1, 1]), [1, 1, 1, 1]),
            (([3, 3], [1, 1], [1, 1]), [2, 2, 2, 2]),
            (([1, 8], [1, 1], [1, 1]), [0, 1, 0, 1]),
            // dilated along y only (padded images), strided along x only
            (([3, 3], [1, 2], [2, 1]), [2, 1, 2, 1]),
            // strides longer than the kernel: the padded image holds more codes than are
            // gathered from it, so the tap tables' path (3×3: its runs of 12-96 bytes, and on
            // the 40×37 map its interior rows)
            (([2, 2], [3, 3], [1, 1]), [1, 1, 1, 1]),
            (([3, 3], [4, 4], [1, 1]), [1, 1, 1, 1]),
        ] {
            let window = test_window(win.0, win.1, win.2, pads);
            // the int8 encoder too: channels-last pixels take its own kernels (`encode_pixel`),
            // which the reference here (the generic path, NCHW) must agree with exactly
            for (encoder, act_scale) in [
                (Encoder::Argmin, None),
                (Encoder::Argmin, Some(0.025f32)),
                (Encoder::Tree, None),
            ] {
                let params: Vec<Arc<Tensor>> = match encoder {
                    Encoder::Argmin => vec![protos.clone()],
                    Encoder::Tree => vec![dims.clone(), thr.clone()],
                };
                let op = |window: Window, pixel, nhwc| {
                    Op::PqEncode(PqEncode {
                        subspace: s,
                        encoder,
                        window: Some(window),
                        nhwc,
                        act_scale,
                        pixel,
                    })
                };
                let cached_with = |x: Tensor, op: &Op, cache: Option<&Cache>| {
                    let args = [vec![Arc::new(x)], params.clone()].concat();
                    match eval_op_cached(op, args, cache).unwrap().remove(0) {
                        Tensor::U8(a) => a,
                        t => panic!("codes of type {}", t.dtype()),
                    }
                };
                let with = |x: Tensor, op: &Op| cached_with(x, op, None);
                let codes = with(x.clone(), &op(window.clone(), true, false));
                let distinct: std::collections::BTreeSet<u8> = codes.iter().copied().collect();
                assert!(
                    distinct.len() >= 4,
                    "{encoder:?} {act_scale:?}: the codes vary ({distinct:?})"
                );
                // the reference: every pixel of the padded input encoded, then gathered
                let (hp, wp) = (h + pads[0] + pads[2], w + pads[1] + pads[3]);
                let xs = x.as_f32().unwrap();
                let padded = ArrayD::from_shape_fn(IxDyn(&[n, c, hp, wp]), |i| {
                    let (y, xx) = (i[2].checked_sub(pads[0]), i[3].checked_sub(pads[1]));
                    match (y.filter(|&y| y < h), xx.filter(|&v| v < w)) {
                        (Some(y), Some(v)) => xs[[i[0], i[1], y, v]],
                        _ => 0.0,
                    }
                });
                let one = Window::pointwise();
                let all = with(Tensor::F32(padded), &op(one, false, false));
                let geo = window.resolve([h, w]).unwrap();
                let [oh, ow] = geo.out;
                let [kh, kw] = window.kernel;
                assert_eq!(codes.shape(), [n, oh * ow, kh * kw * g]);
                for img in 0..n {
                    for (oy, ox) in (0..oh).flat_map(|y| (0..ow).map(move |x| (y, x))) {
                        for (i, j) in (0..kh).flat_map(|i| (0..kw).map(move |j| (i, j))) {
                            let y = oy * window.strides[0] + i * window.dilations[0];
                            let xx = ox * window.strides[1] + j * window.dilations[1];
                            for q in 0..g {
                                assert_eq!(
                                    codes[[img, oy * ow + ox, (i * kw + j) * g + q]],
                                    all[[img, y * wp + xx, q]],
                                    "{encoder:?} {win:?}: image {img}, pixel ({oy}, {ox}), tap ({i}, {j}), codebook {q}"
                                );
                            }
                        }
                    }
                }
                let nhwc = Tensor::F32(
                    xs.view()
                        .permuted_axes(vec![0, 2, 3, 1])
                        .as_standard_layout()
                        .into_owned(),
                );
                assert_eq!(
                    with(nhwc.clone(), &op(window.clone(), true, true)),
                    codes,
                    "channels-last: the same codes"
                );
                // through a node's cache, which keeps the kernels and the zero pixel's codes
                // across runs: built on another input (the negated one), then reused, each
                // run's codes those of the uncached encoder
                let cache = Cache::new();
                let Tensor::F32(a) = &nhwc else { unreachable!() };
                let negated = Tensor::F32(a.mapv(|v| -v));
                let nhwc_op = op(window.clone(), true, true);
                let first = cached_with(negated.clone(), &nhwc_op, Some(&cache));
                assert_eq!(
                    first,
                    with(negated, &nhwc_op),
                    "{encoder:?} {act_scale:?} {win:?}: cached, built"
                );
                let again = cached_with(nhwc.clone(), &nhwc_op, Some(&cache));
                assert_eq!(again, codes, "{encoder:?} {act_scale:?} {win:?}: cached, reused");
                // the int8 kernels' cache refuses an input of another channel count (an
                // error, not a stale kernel's panic)
                if act_scale.is_some() && encoder == Encoder::Argmin {
                    let wider = Arc::new(Tensor::f32(&[n, h, w, c + 1], vec![0.5; n * h * w * (c + 1)]).unwrap());
                    let args = [vec![wider], params.clone()].concat();
                    let e = eval_op_cached(&nhwc_op, args, Some(&cache)).unwrap_err();
                    assert!(e.to_string().contains("prepared for"), "{e}");
                }
            }
        }
    }

    /// A `LutMatMul` node with a cache builds its kernels' table layouts once and reuses them:
    /// few rows (the row-wise kernel's `[c][k][m]` tables), then many (the VNNI kernel's quads,
    /// where the CPU has it), then few again on the same cache all give `relu(scale·sum +
    /// offset)` of the exact integer sums, computed here by hand.
    #[test]
    fn cached_lut_matmul_matches_the_uncached_one() {
        let (c, m, k) = (37, 70, 16);
        let t: Vec<i8> = (0..c * m * k).map(|i| ((i * 7919) % 256) as u8 as i8).collect();
        let tables = Arc::new(Tensor::I8(
            ArrayD::from_shape_vec(IxDyn(&[c, m, k]), t.clone()).unwrap(),
        ));
        let sc: Vec<f32> = (0..m).map(|i| 0.01 + i as f32 * 1e-3).collect();
        let of: Vec<f32> = (0..m).map(|i| i as f32 - 30.0).collect();
        let scale = Arc::new(Tensor::f32(&[m], sc.clone()).unwrap());
        let offset = Arc::new(Tensor::f32(&[m], of.clone()).unwrap());
        let cache = Cache::new();
        for rows in [3, 300, 5, 129] {
            let codes: Vec<u8> = (0..rows * c).map(|i| ((i * 31 + i / 7) % k) as u8).collect();
            // the exact integer sums, then scale · sum + offset and the ReLU
            let want: Vec<u32> = (0..rows * m)
                .map(|i| {
                    let (r, mi) = (i / m, i % m);
                    let sum: i32 = (0..c)
                        .map(|ci| t[(ci * m + mi) * k + codes[r * c + ci] as usize] as i32)
                        .sum();
                    let y = sc[mi] * sum as f32 + of[mi];
                    if y > 0.0 { y } else { 0.0 }.to_bits()
                })
                .collect();
            let codes = Arc::new(Tensor::U8(ArrayD::from_shape_vec(IxDyn(&[rows, c]), codes).unwrap()));
            let args = vec![codes, tables.clone(), scale.clone(), offset.clone()];
            let got = eval_op_cached(&Op::LutMatMul { relu: true }, args, Some(&cache)).unwrap();
            let got: Vec<u32> = got[0].as_f32().unwrap().iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "rows={rows}");
        }
    }

    /// The lookups' epilogue (SIMD-compiled, one pass per row) gives `relu(scale·sum + offset +
    /// residual)` evaluated in that order, bit for bit, for int8 and f32 sums, with and without
    /// residual and ReLU, from any first row.
    #[test]
    fn lut_epilogue_computes_scale_offset_residual_relu_in_order() {
        let (rows, m, r0) = (7, 37, 3);
        let v = |i: usize, k: usize| (((i * 7919 + k * 104_729) % 2001) as f32 - 1000.0) / 37.0;
        let mut scale: Vec<f32> = (0..m).map(|i| v(i, 1) / 50.0).collect();
        let mut offset: Vec<f32> = (0..m).map(|i| v(i, 2)).collect();
        // zeros of both signs: a negative zero out of the sums (0 · negative sum − 0) that the
        // ReLU makes +0
        (scale[1], offset[1], scale[2], offset[2]) = (0.0, -0.0, -0.0, 0.0);
        let residual: Vec<f32> = (0..(r0 + rows) * m).map(|i| v(i, 3)).collect();
        let sums: Vec<i32> = (0..rows * m).map(|i| v(i, 4) as i32 * 13).collect();
        let sums_f32: Vec<f32> = (0..rows * m).map(|i| v(i, 5) * 3.1).collect();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for relu in [false, true] {
            for res in [None, Some(&residual[..])] {
                let epi = lut::Affine {
                    scale: &scale,
                    offset: &offset,
                    residual: res,
                    relu,
                };
                let want = |a: &dyn Fn(usize) -> f32| -> Vec<f32> {
                    (0..rows * m)
                        .map(|i| {
                            let mut y = scale[i % m] * a(i) + offset[i % m];
                            if let Some(r) = res {
                                y += r[r0 * m + i];
                            }
                            if relu && y.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
                                y = 0.0;
                            }
                            y
                        })
                        .collect()
                };
                let run = |f: &dyn Fn(&mut [std::mem::MaybeUninit<f32>])| -> Vec<f32> {
                    let mut got = vec![std::mem::MaybeUninit::new(f32::NAN); rows * m];
                    f(&mut got);
                    // SAFETY: initialised above (and every value rewritten by the epilogue).
                    got.iter().map(|g| unsafe { g.assume_init() }).collect()
                };
                let got = run(&|out| epi.apply(r0, &sums, out));
                assert_eq!(
                    bits(&got),
                    bits(&want(&|i| sums[i] as f32)),
                    "i32, relu {relu}, residual {}",
                    res.is_some()
                );
                let got = run(&|out| epi.apply(r0, &sums_f32, out));
                assert_eq!(
                    bits(&got),
                    bits(&want(&|i| sums_f32[i])),
                    "f32, relu {relu}, residual {}",
                    res.is_some()
                );
            }
        }
    }

    /// A tensor of `shape` with values spread over [-2, 2) by `seed`.
    fn spread(shape: &[usize], seed: usize) -> Arc<Tensor> {
        let len = shape.iter().product::<usize>();
        let v = (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 - 500.0) / 250.0)
            .collect();
        Arc::new(Tensor::f32(shape, v).unwrap())
    }

    /// A `MatMul` by a constant 2-D weight with a node cache (the weight packed once) gives the
    /// bits of the uncached path, on the first run and after; other weight ranks build no cache.
    #[test]
    fn cached_matmul_matches_the_uncached_one() {
        let t = spread;
        // a constant [k, n] weight times activations of rank 2 and 3 (rows past a 12-row block,
        // columns past a 32-column panel); a 3-D weight keeps the general path
        for (a_shape, b_shape) in [
            (vec![13, 37], vec![37, 40]),
            (vec![2, 7, 37], vec![37, 10]),
            (vec![1, 37], vec![37, 33]),
            (vec![2, 5, 37], vec![2, 37, 8]),
        ] {
            let args = vec![t(&a_shape, 1), t(&b_shape, 2)];
            let want = eval_op_cached(&Op::MatMul, args.clone(), None).unwrap();
            let cache = Cache::new();
            for _ in 0..2 {
                let got = eval_op_cached(&Op::MatMul, args.clone(), Some(&cache)).unwrap();
                let (got, want) = (got[0].as_f32().unwrap(), want[0].as_f32().unwrap());
                assert_eq!(got.shape(), want.shape());
                assert!(
                    got.iter().zip(want.iter()).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{a_shape:?} × {b_shape:?}: the packed weight changed the bits"
                );
            }
            let packed = gemm::PackedA::supported() && b_shape.len() == 2;
            assert_eq!(cache.get().is_some(), packed, "{a_shape:?} × {b_shape:?}");
        }
    }

    /// A `Gemm` with constant `B` and `C` through the prepared packed path (a node cache, as a
    /// plan runs it) equals the general path, for both weight layouts, α and β, and the row
    /// shapes `C` takes, at any number of rows and columns (a 10-class head too); a `C` with one
    /// value per row takes the general path. Each row gets the same bits in any batch.
    #[test]
    fn cached_gemm_matches_the_general_path() {
        let t = spread;
        let k = 37;
        for (m, n) in [1, 4, 13, 64].into_iter().flat_map(|m| [(m, 10), (m, 40)]) {
            for trans_b in [false, true] {
                for (alpha, beta) in [(1.0, 1.0), (0.5, 2.0), (1.0, 0.0)] {
                    for c_shape in [vec![n], vec![1, n], vec![], vec![m, 1]] {
                        let g = Gemm {
                            alpha,
                            beta,
                            trans_a: false,
                            trans_b,
                        };
                        let b = if trans_b { t(&[n, k], 2) } else { t(&[k, n], 2) };
                        let args = vec![t(&[m, k], 1), b, t(&c_shape, 3)];
                        let want = gemm_op(&g, &args).unwrap();
                        let cache = Cache::new();
                        for _ in 0..2 {
                            let got = eval_op_cached(&Op::Gemm(g.clone()), args.clone(), Some(&cache)).unwrap();
                            let got = got[0].as_f32().unwrap();
                            let e = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                            assert!(e < 1e-4, "m={m} transB={trans_b} α={alpha} β={beta} C{c_shape:?}: {e}");
                        }
                        let packed = gemm::PackedA::supported() && (c_shape != [m, 1] || beta == 0.0 || m == 1);
                        assert_eq!(cache.get().is_some(), packed, "m={m} C{c_shape:?} β={beta}");
                        if packed && c_shape != [m, 1] {
                            // the first row alone gives the first row's bits
                            let one = vec![
                                Arc::new(Tensor::F32(
                                    args[0]
                                        .as_f32()
                                        .unwrap()
                                        .slice(ndarray::s![..1, ..])
                                        .to_owned()
                                        .into_dyn(),
                                )),
                                args[1].clone(),
                                args[2].clone(),
                            ];
                            let alone = eval_op_cached(&Op::Gemm(g.clone()), one, Some(&Cache::new())).unwrap();
                            let (alone, got) = (
                                alone[0].as_f32().unwrap(),
                                eval_op_cached(&Op::Gemm(g.clone()), args.clone(), Some(&cache)).unwrap(),
                            );
                            let got = got[0].as_f32().unwrap();
                            assert!(
                                alone.iter().zip(got.iter()).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "m={m} n={n}: row 0 alone differs"
                            );
                        }
                    }
                }
            }
        }
        // large enough to split over threads: the same bits at 1 and 2 threads
        let g = Gemm {
            alpha: 1.0,
            beta: 1.0,
            trans_a: false,
            trans_b: true,
        };
        let args = vec![t(&[64, 300], 4), t(&[256, 300], 5), t(&[256], 6)];
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let cache = Cache::new();
            pool.install(|| eval_op_cached(&Op::Gemm(g.clone()), args.clone(), Some(&cache)).unwrap())
        };
        assert_eq!(run(1), run(2), "1 and 2 threads differ");
    }
}
