//! Gradients of the graph's elementwise, shape and transformer ops, for the global stage
//! ([`super::global`]): given an op's input values, its output value and `d loss / d output`,
//! `d loss / d input` for each input asked for. Ops that need a window map (`Im2Col`,
//! pooling) and the LUT layers themselves are differentiated in `global.rs`.
//!
//! Every gradient here is checked against finite differences through a whole network in
//! `tests/learn.rs` (LeNet-5 for the CNN ops, the fixture ViT for the transformer ones).

use crate::error::{Error, Result};
use crate::interp::eval::matmul_op;
use crate::interp::kernels::elementwise::erf;
use crate::ir::infer::norm_axis;
use crate::ir::op::{Binary, Op, Unary};
use crate::ir::Tensor;
use ndarray::{ArrayD, Axis, IxDyn, Zip};
use std::sync::Arc;

/// `d loss / d input i` for each `i` with `want[i]`; `Ok(None)` when the op has no gradient
/// here (the caller names it). `x` are the op's input values, `y` its first output.
pub fn input_grads(
    op: &Op,
    x: &[Arc<Tensor>],
    y: &ArrayD<f32>,
    gy: ArrayD<f32>,
    want: &[bool],
) -> Result<Option<Vec<Option<ArrayD<f32>>>>> {
    let f = |i: usize| -> Result<&ArrayD<f32>> { x[i].as_f32() };
    let mut out: Vec<Option<ArrayD<f32>>> = vec![None; x.len()];
    let only_first = want.iter().skip(1).all(|w| !w);
    match op {
        Op::Unary(u) if only_first => out[0] = unary(*u, f(0)?, y, &gy),
        Op::Binary(b) => {
            for i in 0..2 {
                if want[i] {
                    let Some(g) = binary(*b, i, f(0)?, f(1)?, y, &gy) else {
                        return Ok(None);
                    };
                    out[i] = Some(unbroadcast(&g, x[i].shape()));
                }
            }
        }
        Op::Sum => {
            for (i, o) in out.iter_mut().enumerate() {
                if want[i] {
                    *o = Some(unbroadcast(&gy, x[i].shape()));
                }
            }
        }
        Op::Expand if only_first => out[0] = Some(unbroadcast(&gy, x[0].shape())),
        Op::Transpose { perm } if only_first => {
            let nd = gy.ndim();
            let perm: Vec<usize> = perm.clone().unwrap_or_else(|| (0..nd).rev().collect());
            let mut inv = vec![0; nd];
            perm.iter().enumerate().for_each(|(i, &p)| inv[p] = i);
            out[0] = Some(gy.permuted_axes(IxDyn(&inv)).as_standard_layout().into_owned());
        }
        Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze { .. } | Op::Unsqueeze { .. } if only_first => {
            out[0] = Some(reshaped(gy, x[0].shape())?);
        }
        Op::MatMul => {
            let (a, b) = (f(0)?, f(1)?);
            if a.ndim() < 2 || b.ndim() < 2 {
                return Ok(None);
            }
            if want[0] {
                out[0] = Some(unbroadcast(&matmul_op(&gy, &swap_last(b))?, a.shape()));
            }
            if want[1] {
                out[1] = Some(unbroadcast(&matmul_op(&swap_last(a), &gy)?, b.shape()));
            }
        }
        Op::Softmax { axis, log } if only_first => {
            let ax = Axis(norm_axis(*axis, y.ndim())?);
            out[0] = Some(if *log {
                let s = gy.sum_axis(ax).insert_axis(ax);
                &gy - &(y.mapv(f32::exp) * &s)
            } else {
                let s = (&gy * y).sum_axis(ax).insert_axis(ax);
                y * &(&gy - &s)
            });
        }
        Op::LayerNorm { axis, epsilon } if only_first => {
            out[0] = Some(layer_norm(f(0)?, f(1)?, *axis, *epsilon, &gy)?);
        }
        // keepdims or not, the gradient's values are the same: read in the kept shape
        Op::ReduceMean { axes, .. } if only_first => {
            let xs = x[0].shape();
            let mut axes: Vec<usize> = match axes {
                Some(a) => a.iter().map(|&v| norm_axis(v, xs.len())).collect::<Result<_>>()?,
                None => (0..xs.len()).collect(),
            };
            // as the forward: an axis named twice is reduced once
            axes.sort_unstable();
            axes.dedup();
            let kept: Vec<usize> = (0..xs.len())
                .map(|i| if axes.contains(&i) { 1 } else { xs[i] })
                .collect();
            let count: usize = axes.iter().map(|&a| xs[a]).product();
            let g = reshaped(gy, &kept)? / count.max(1) as f32;
            let full = g.broadcast(IxDyn(xs)).ok_or_else(|| bad("broadcast"))?;
            out[0] = Some(full.to_owned());
        }
        Op::Gather { axis } if only_first => {
            let ax = norm_axis(*axis, x[0].shape().len())?;
            out[0] = Some(gather(x[0].shape(), ax, &x[1].to_i64_vec()?, &gy)?);
        }
        Op::Slice {
            starts,
            ends,
            axes,
            steps,
        } if only_first => {
            let xs = x[0].shape();
            let mut picks: Vec<Option<Vec<usize>>> = vec![None; xs.len()];
            for (i, &a) in axes.iter().enumerate() {
                let a = norm_axis(a, xs.len())?;
                picks[a] = Some(crate::ir::infer::slice_indices(
                    xs[a] as i64,
                    starts[i],
                    ends[i],
                    steps[i],
                )?);
            }
            out[0] = Some(slice(xs, &picks, &gy));
        }
        Op::Concat { axis } => {
            let ax = norm_axis(*axis, gy.ndim())?;
            let mut off = 0;
            for (i, o) in out.iter_mut().enumerate() {
                let len = x[i].shape()[ax];
                if want[i] {
                    *o = Some(gy.slice_axis(Axis(ax), (off..off + len).into()).to_owned());
                }
                off += len;
            }
        }
        Op::GlobalPool { max } if only_first => out[0] = Some(global_pool(f(0)?, *max, &gy)?),
        _ => return Ok(None),
    }
    Ok(Some(out))
}

/// The caller names the stage, the node and the op.
fn bad(what: &str) -> Error {
    Error::Other(format!("backward: {what}"))
}

fn reshaped(g: ArrayD<f32>, shape: &[usize]) -> Result<ArrayD<f32>> {
    g.as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(shape))
        .map_err(|e| bad(&e.to_string()))
}

/// The last two axes swapped, in standard layout.
fn swap_last(a: &ArrayD<f32>) -> ArrayD<f32> {
    let mut v = a.view();
    let n = v.ndim();
    v.swap_axes(n - 2, n - 1);
    v.as_standard_layout().into_owned()
}

/// Sum `g` down to `shape` (undo numpy broadcasting).
pub fn unbroadcast(g: &ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    let mut g = g.clone();
    while g.ndim() > shape.len() {
        g = g.sum_axis(Axis(0));
    }
    for (ax, &d) in shape.iter().enumerate() {
        if d == 1 && g.shape()[ax] != 1 {
            g = g.sum_axis(Axis(ax)).insert_axis(Axis(ax));
        }
    }
    g
}

fn unary(u: Unary, x: &ArrayD<f32>, y: &ArrayD<f32>, gy: &ArrayD<f32>) -> Option<ArrayD<f32>> {
    let by_x = |d: &dyn Fn(f32) -> f32| Zip::from(gy).and(x).map_collect(|&g, &x| g * d(x));
    let by_y = |d: &dyn Fn(f32) -> f32| Zip::from(gy).and(y).map_collect(|&g, &y| g * d(y));
    Some(match u {
        Unary::Relu => by_y(&|y| (y > 0.0) as u8 as f32),
        Unary::LeakyRelu { alpha } => by_x(&|x| if x > 0.0 { 1.0 } else { alpha }),
        Unary::Clip { min, max } => by_x(&|x| (x > min && x < max) as u8 as f32),
        Unary::Identity => gy.clone(),
        Unary::Sigmoid => by_y(&|y| y * (1.0 - y)),
        Unary::Tanh => by_y(&|y| 1.0 - y * y),
        Unary::HardSigmoid { alpha, beta } => by_x(&|x| {
            let t = alpha * x + beta;
            if t > 0.0 && t < 1.0 {
                alpha
            } else {
                0.0
            }
        }),
        Unary::HardSwish => by_x(&|x| {
            if x <= -3.0 {
                0.0
            } else if x >= 3.0 {
                1.0
            } else {
                (2.0 * x + 3.0) / 6.0
            }
        }),
        Unary::Erf => by_x(&|x| std::f32::consts::FRAC_2_SQRT_PI * (-x * x).exp()),
        Unary::Sqrt => by_y(&|y| 0.5 / y),
        Unary::Exp => by_y(&|y| y),
        Unary::Neg => -gy,
        Unary::Gelu { tanh: false } => by_x(&|x| {
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * x * x).exp() * 0.398_942_3; // 1 / √(2π)
            cdf + x * pdf
        }),
        Unary::Gelu { tanh: true } => by_x(&|x| {
            const C: f32 = 0.797_884_6; // √(2/π)
            let t = (C * (x + 0.044715 * x * x * x)).tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * x * x)
        }),
    })
}

/// `d (a ∘ b) / d input i · gy`, before unbroadcasting.
fn binary(
    b: Binary,
    i: usize,
    a: &ArrayD<f32>,
    c: &ArrayD<f32>,
    y: &ArrayD<f32>,
    gy: &ArrayD<f32>,
) -> Option<ArrayD<f32>> {
    Some(match (b, i) {
        (Binary::Add, _) | (Binary::Sub, 0) => gy.clone(),
        (Binary::Sub, _) => -gy,
        (Binary::Mul, 0) => gy * c,
        (Binary::Mul, _) => gy * a,
        (Binary::Div, 0) => gy / c,
        (Binary::Div, _) => -(gy * y) / c,
        // d a^c / d a = c · a^(c−1)
        (Binary::Pow, 0) => Zip::from(gy)
            .and_broadcast(a)
            .and_broadcast(c)
            .map_collect(|&g, &a, &c| g * c * a.powf(c - 1.0)),
        (Binary::Pow, _) => {
            let lna = a.mapv(f32::ln);
            gy * y * &lna
        }
    })
}

/// Layer normalisation's input gradient (scale constant): with `x̂` the normalised row and
/// `ĝ = gy · scale`, `dx = (ĝ − mean ĝ − x̂ · mean(ĝ x̂)) / σ`.
fn layer_norm(x: &ArrayD<f32>, scale: &ArrayD<f32>, axis: i64, eps: f32, gy: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    let shape = x.shape().to_vec();
    let ax = norm_axis(axis, shape.len())?;
    let d: usize = shape[ax..].iter().product::<usize>().max(1);
    let scale = scale.as_standard_layout();
    let scale = scale.as_slice().expect("standard");
    if scale.len() != d {
        return Err(bad("scale size"));
    }
    let x = x.as_standard_layout();
    let gy = gy.as_standard_layout();
    let mut gx = vec![0f32; x.len()];
    let rows = x.as_slice().expect("standard").chunks(d);
    let grows = gy.as_slice().expect("standard").chunks(d);
    for ((r, g), o) in rows.zip(grows).zip(gx.chunks_mut(d)) {
        let n = d as f64;
        let mean = r.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps as f64).sqrt();
        let (mut mg, mut mgx) = (0f64, 0f64);
        for j in 0..d {
            let gh = g[j] as f64 * scale[j] as f64;
            mg += gh;
            mgx += gh * (r[j] as f64 - mean) * inv;
        }
        let (mg, mgx) = (mg / n, mgx / n);
        for j in 0..d {
            let xh = (r[j] as f64 - mean) * inv;
            let gh = g[j] as f64 * scale[j] as f64;
            o[j] = ((gh - mg - xh * mgx) * inv) as f32;
        }
    }
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), gx).expect("size"))
}

/// `Gather` along `ax`: the output's gradient added back at the rows it was taken from.
fn gather(xs: &[usize], ax: usize, idx: &[i64], gy: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    let outer: usize = xs[..ax].iter().product();
    let inner: usize = xs[ax + 1..].iter().product();
    let n = xs[ax] as i64;
    let gy = gy.as_standard_layout();
    let gs = gy.as_slice().expect("standard");
    if gs.len() != outer * idx.len() * inner {
        return Err(bad("gradient size"));
    }
    let mut gx = vec![0f32; xs.iter().product()];
    for o in 0..outer {
        for (j, &i) in idx.iter().enumerate() {
            let i = if i < 0 { i + n } else { i };
            if !(0..n).contains(&i) {
                return Err(bad("index out of range"));
            }
            let src = &gs[(o * idx.len() + j) * inner..][..inner];
            let dst = &mut gx[(o * xs[ax] + i as usize) * inner..][..inner];
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        }
    }
    Ok(ArrayD::from_shape_vec(IxDyn(xs), gx).expect("size"))
}

/// `Slice`: the output's gradient written back at the picked positions (`None`: whole axis).
fn slice(xs: &[usize], picks: &[Option<Vec<usize>>], gy: &ArrayD<f32>) -> ArrayD<f32> {
    let mut gx = ArrayD::<f32>::zeros(IxDyn(xs));
    let mut at = vec![0usize; xs.len()];
    for (idx, &g) in gy.indexed_iter() {
        for (a, p) in picks.iter().enumerate() {
            at[a] = match p {
                Some(p) => p[idx[a]],
                None => idx[a],
            };
        }
        gx[IxDyn(&at)] += g;
    }
    gx
}

/// `GlobalAveragePool` / `GlobalMaxPool` over `[N, C, H, W]`.
fn global_pool(x: &ArrayD<f32>, max: bool, gy: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    let [nb, c, h, w] = x.shape()[..] else {
        return Err(bad("needs an NCHW input"));
    };
    let gyv = gy.as_standard_layout();
    let gys = gyv.as_slice().expect("standard");
    let xs = x.as_standard_layout();
    let xsl = xs.as_slice().expect("standard");
    let mut gx = vec![0f32; nb * c * h * w];
    for (i, gplane) in gx.chunks_mut(h * w).enumerate() {
        if max {
            let plane = &xsl[i * h * w..(i + 1) * h * w];
            let am = plane
                .iter()
                .enumerate()
                .fold(0, |b, (j, v)| if *v > plane[b] { j } else { b });
            gplane[am] = gys[i];
        } else {
            gplane.iter_mut().for_each(|v| *v = gys[i] / (h * w) as f32);
        }
    }
    Ok(ArrayD::from_shape_vec(IxDyn(&[nb, c, h, w]), gx).expect("size"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::eval::eval_op;

    /// `loss = Σ w · op(x)` for random `x` and `w`: the analytic gradient of every float input
    /// against central differences, element by element (f64 accumulation of f32 ops).
    fn check(op: Op, inputs: Vec<Tensor>, want: &[bool]) {
        let mut rng = crate::pq::rng::Rng::new(11);
        let args: Vec<Arc<Tensor>> = inputs.into_iter().map(Arc::new).collect();
        let y = eval_op(&op, args.clone()).unwrap().remove(0);
        let y = y.as_f32().unwrap().clone();
        let w = y.mapv(|_| rng.next_f64() as f32 * 2.0 - 1.0);
        let grads = input_grads(&op, &args, &y, w.clone(), want)
            .unwrap()
            .expect("differentiable");
        let loss = |args: Vec<Arc<Tensor>>| -> f64 {
            let y = eval_op(&op, args).unwrap().remove(0);
            y.as_f32()
                .unwrap()
                .iter()
                .zip(w.iter())
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum()
        };
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else {
                assert!(!want[i], "{op:?}: input {i} wanted but no gradient");
                continue;
            };
            assert_eq!(g.shape(), args[i].shape(), "{op:?} input {i}");
            let x = args[i].as_f32().unwrap();
            for (j, gv) in g.iter().enumerate() {
                let h = 1e-2f32;
                let at = |d: f32| {
                    let mut xs = x.clone();
                    xs.as_slice_mut().unwrap()[j] += d;
                    let mut a = args.clone();
                    a[i] = Arc::new(Tensor::F32(xs));
                    loss(a)
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
                assert!(
                    (*gv as f64 - numeric).abs() <= 2e-3 + 1e-2 * numeric.abs(),
                    "{op:?} input {i} element {j}: analytic {gv} vs numeric {numeric}"
                );
            }
        }
    }

    fn rand(shape: &[usize], seed: u64, lo: f32, hi: f32) -> Tensor {
        let mut rng = crate::pq::rng::Rng::new(seed);
        let n = shape.iter().product();
        Tensor::f32(shape, (0..n).map(|_| lo + (hi - lo) * rng.next_f64() as f32).collect()).unwrap()
    }

    #[test]
    fn unary_gradients_match_central_differences() {
        // away from the kinks: |x| in [0.1, 2] or [3.1, 5] (HardSwish's and HardSigmoid's flat
        // parts), the sign from a second draw
        let x = |far: bool| {
            let t = if far {
                rand(&[2, 7], 3, 3.1, 5.0)
            } else {
                rand(&[2, 7], 3, 0.1, 2.0)
            };
            let s = rand(&[2, 7], 4, -1.0, 1.0);
            let v: Vec<f32> = t
                .to_f32_vec()
                .iter()
                .zip(s.to_f32_vec())
                .map(|(a, s)| a.copysign(s))
                .collect();
            Tensor::f32(&[2, 7], v).unwrap()
        };
        for u in [
            Unary::Relu,
            Unary::LeakyRelu { alpha: 0.1 },
            Unary::Sigmoid,
            Unary::Tanh,
            Unary::HardSigmoid { alpha: 0.2, beta: 0.5 },
            Unary::HardSwish,
            Unary::Clip { min: -1.0, max: 1.0 },
            Unary::Identity,
            Unary::Erf,
            Unary::Exp,
            Unary::Neg,
            Unary::Gelu { tanh: false },
            Unary::Gelu { tanh: true },
        ] {
            for far in [false, true] {
                check(Op::Unary(u), vec![x(far)], &[true]);
            }
        }
        check(Op::Unary(Unary::Sqrt), vec![rand(&[3, 4], 5, 0.5, 2.0)], &[true]);
    }

    #[test]
    fn binary_matmul_and_reduction_gradients_match_central_differences() {
        let pos = |shape: &[usize], seed| rand(shape, seed, 0.5, 2.0);
        let sym = |shape: &[usize], seed| rand(shape, seed, -1.0, 1.0);
        for b in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div, Binary::Pow] {
            // the second input broadcast, the first, and both at once
            check(Op::Binary(b), vec![pos(&[2, 3, 4], 1), pos(&[3, 1], 2)], &[true, true]);
            check(Op::Binary(b), vec![pos(&[4], 1), pos(&[3, 4], 2)], &[true, true]);
            check(Op::Binary(b), vec![pos(&[3, 1], 1), pos(&[1, 4], 2)], &[true, true]);
        }
        check(Op::Sum, vec![pos(&[2, 3], 1), pos(&[3], 2)], &[true, true]);
        // batched, a 2-D weight, a 2-D first operand broadcast over the second's batch
        for (a, b) in [
            (vec![2, 3, 4, 5], vec![2, 3, 5, 2]),
            (vec![2, 4, 5], vec![5, 3]),
            (vec![4, 5], vec![3, 5, 2]),
        ] {
            check(Op::MatMul, vec![sym(&a, 1), sym(&b, 2)], &[true, true]);
        }
        for log in [false, true] {
            for axis in [-1, 1] {
                check(Op::Softmax { axis, log }, vec![rand(&[2, 3, 4], 3, -2.0, 2.0)], &[true]);
            }
        }
        let ln = |axis| Op::LayerNorm { axis, epsilon: 1e-5 };
        let x = || rand(&[2, 3, 4], 3, -2.0, 2.0);
        let (scale, bias) = (rand(&[4], 4, 0.5, 1.5), sym(&[4], 5));
        check(ln(-1), vec![x(), scale, bias], &[true, false, false]);
        // normalised over the last two axes
        check(ln(1), vec![x(), rand(&[3, 4], 4, 0.5, 1.5)], &[true, false]);
        for keepdims in [false, true] {
            // an axis named twice is reduced once, as in the forward
            for axes in [Some(vec![-1, 0]), Some(vec![1, -2]), None] {
                check(Op::ReduceMean { axes, keepdims }, vec![sym(&[2, 3, 4], 6)], &[true]);
            }
        }
        for max in [false, true] {
            check(Op::GlobalPool { max }, vec![sym(&[2, 3, 2, 2], 7)], &[true]);
        }
    }

    #[test]
    fn shape_op_gradients_match_central_differences() {
        let x = || rand(&[2, 5, 3], 8, -1.0, 1.0);
        let idx = |v: Vec<i64>, shape: &[usize]| Tensor::I64(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap());
        // repeated and negative indices accumulate
        check(
            Op::Gather { axis: 1 },
            vec![x(), idx(vec![0, -1, 0, 2], &[2, 2])],
            &[true, false],
        );
        check(Op::Gather { axis: 0 }, vec![x(), idx(vec![1], &[])], &[true, false]);
        check(
            Op::Slice {
                starts: vec![4, 0],
                ends: vec![0, 3],
                axes: vec![1, -1],
                steps: vec![-2, 2],
            },
            vec![x()],
            &[true],
        );
        check(
            Op::Concat { axis: 1 },
            vec![x(), rand(&[2, 1, 3], 9, -1.0, 1.0), x()],
            &[true, false, true],
        );
        check(
            Op::Concat { axis: -2 },
            vec![rand(&[2, 1, 3], 9, -1.0, 1.0), x()],
            &[true, true],
        );
        check(
            Op::Transpose {
                perm: Some(vec![2, 0, 1]),
            },
            vec![x()],
            &[true],
        );
        check(
            Op::Reshape { allowzero: false },
            vec![x(), idx(vec![6, -1], &[2])],
            &[true, false],
        );
        check(
            Op::Expand,
            vec![rand(&[1, 3], 10, -1.0, 1.0), idx(vec![4, 2, 3], &[3])],
            &[true, false],
        );
    }
}
