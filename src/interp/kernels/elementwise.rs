//! Elementwise kernels: activations (in place), broadcasting arithmetic, BatchNorm, Softmax.

use crate::bail;
use crate::error::Result;
use crate::ir::op::{Binary, Unary};
use ndarray::{ArrayD, Axis, Zip};

use super::multiversion;

const PAR_MIN: usize = 1 << 15;

pub fn apply_unary(u: Unary, data: &mut [f32]) {
    // One loop per operation (the match outside it), so each loop vectorises: with the match
    // inside, a ReLU ran at about 1 ns per value.
    match u {
        Unary::Identity => {}
        Unary::Relu => each(data, super::relu),
        Unary::LeakyRelu { alpha } => each(data, move |v| if v >= 0.0 { v } else { alpha * v }),
        Unary::Sigmoid => each(data, |v| 1.0 / (1.0 + (-v).exp())),
        Unary::Tanh => each(data, f32::tanh),
        Unary::HardSigmoid { alpha, beta } => each(data, move |v| (alpha * v + beta).clamp(0.0, 1.0)),
        Unary::HardSwish => each(data, |v| v * (v / 6.0 + 0.5).clamp(0.0, 1.0)),
        Unary::Clip { min, max } => each(data, move |v| v.max(min).min(max)),
        Unary::Erf | Unary::Gelu { tanh: false } => {
            // compiled per SIMD level, so the rational approximation vectorises
            let gelu = u != Unary::Erf;
            if data.len() >= PAR_MIN && super::team::threads() > 1 {
                super::team::for_chunks(data, 8192, |_, c| erf_slice(c, gelu));
            } else {
                erf_slice(data, gelu);
            }
        }
        Unary::Sqrt => each(data, f32::sqrt),
        Unary::Exp => each(data, f32::exp),
        Unary::Neg => each(data, |v| -v),
        Unary::Gelu { tanh: true } => {
            // √(2/π)
            const C: f32 = 0.797_884_6;
            each(data, |v| 0.5 * v * (1.0 + (C * (v + 0.044715 * v * v * v)).tanh()))
        }
    }
}

/// `f` on every value in place, in parallel chunks for large slices.
fn each(data: &mut [f32], f: impl Fn(f32) -> f32 + Sync + Send) {
    if data.len() >= PAR_MIN && super::team::threads() > 1 {
        super::team::for_chunks(data, 8192, |_, c| c.iter_mut().for_each(|v| *v = f(*v)));
    } else {
        data.iter_mut().for_each(|v| *v = f(*v));
    }
}

multiversion! {
    /// `erf` of each value in place, or with `gelu` the exact GELU `0.5·x·(1 + erf(x/√2))`
    /// (the product order of the `Gelu` op: `(0.5·x)·(1 + erf(x·(1/√2)))`).
    fn erf_slice(data: &mut [f32], gelu: bool) {
        if gelu {
            data.iter_mut()
                .for_each(|v| *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2)));
        } else {
            data.iter_mut().for_each(|v| *v = erf(*v));
        }
    }
}

/// `erf` in single precision without branches or `exp`, so a loop of it vectorises: the
/// rational approximation of Eigen's and XLA's float `erf` (odd degree-13 numerator over even
/// degree-8 denominator on `[-4, 4]`, where `|erf| < 1` in f32), absolute error below 5e-7.
#[inline(always)]
pub fn erf(v: f32) -> f32 {
    const A: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ];
    const B: [f32; 5] = [
        -1.456_607_2e-5,
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329e-3,
        -1.426_474e-2,
    ];
    let x = v.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = A[1..].iter().fold(A[0], |p, &c| p * x2 + c) * x;
    let q = B[1..].iter().fold(B[0], |q, &c| q * x2 + c);
    (p / q).clamp(-1.0, 1.0)
}

/// numpy-broadcasting arithmetic. Same-shape operands are combined in place into `a`.
pub fn binary_f32(op: Binary, mut a: ArrayD<f32>, b: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    let f = move |x: f32, y: f32| match op {
        Binary::Add => x + y,
        Binary::Sub => x - y,
        Binary::Mul => x * y,
        Binary::Div => x / y,
        Binary::Pow => pow(x, y),
    };
    if a.shape() == b.shape() {
        if let (Some(x), Some(y)) = (a.as_slice_mut(), b.as_slice()) {
            // Same shape, both contiguous (residual adds): one pass, split only when large.
            if x.len() >= PAR_MIN {
                super::team::for_chunks(x, 8192, |i, x| apply_same(x, &y[i * 8192..][..x.len()], op));
            } else {
                apply_same(x, y, op);
            }
            return Ok(a);
        }
    }
    if let Some(block) = contiguous_broadcast(a.shape(), b.shape()) {
        if let (Some(x), Some(y)) = (a.as_slice_mut(), b.as_slice()) {
            // A bias or scale over the trailing axes, or one value per row (a mean, a variance):
            // the same arithmetic per element as the general path, in contiguous blocks.
            match block {
                Block::Trailing => apply_trailing(x, y, op),
                Block::PerRow(n) => apply_per_row(x, y, n, op),
            }
            return Ok(a);
        }
    }
    if a.shape() == b.shape() || b.broadcast(a.raw_dim()).is_some() {
        let bb = b.broadcast(a.raw_dim()).expect("checked above");
        Zip::from(&mut a).and(&bb).par_for_each(|x, &y| *x = f(*x, y));
        return Ok(a);
    }
    broadcast_with(&a, b, f)
}

multiversion! {
    /// `x[i] = x[i] op y[i]`.
    fn apply_same(x: &mut [f32], y: &[f32], op: Binary) {
        same_op(x, y, op)
    }
}

multiversion! {
    /// `y` (a bias or scale) applied to each block of `y.len()` values of `x`.
    fn apply_trailing(x: &mut [f32], y: &[f32], op: Binary) {
        x.chunks_exact_mut(y.len().max(1)).for_each(|x| same_op(x, y, op))
    }
}

multiversion! {
    /// `y[r]` (a mean, a variance) applied to the `r`-th run of `n` values of `x`.
    fn apply_per_row(x: &mut [f32], y: &[f32], n: usize, op: Binary) {
        x.chunks_exact_mut(n.max(1)).zip(y).for_each(|(x, &v)| scalar_op(x, v, op))
    }
}

/// `x[i] = x[i] op y[i]`; `x^2` as `x·x` (what ONNX Runtime computes for the exponent 2).
#[inline(always)]
fn same_op(x: &mut [f32], y: &[f32], op: Binary) {
    match op {
        Binary::Add => x.iter_mut().zip(y).for_each(|(a, b)| *a += b),
        Binary::Sub => x.iter_mut().zip(y).for_each(|(a, b)| *a -= b),
        Binary::Mul => x.iter_mut().zip(y).for_each(|(a, b)| *a *= b),
        Binary::Div => x.iter_mut().zip(y).for_each(|(a, b)| *a /= b),
        Binary::Pow => x.iter_mut().zip(y).for_each(|(a, &b)| *a = pow(*a, b)),
    }
}

/// `x[i] = x[i] op v`.
#[inline(always)]
fn scalar_op(x: &mut [f32], v: f32, op: Binary) {
    match op {
        Binary::Add => x.iter_mut().for_each(|a| *a += v),
        Binary::Sub => x.iter_mut().for_each(|a| *a -= v),
        Binary::Mul => x.iter_mut().for_each(|a| *a *= v),
        Binary::Div => x.iter_mut().for_each(|a| *a /= v),
        Binary::Pow if v == 2.0 => x.iter_mut().for_each(|a| *a *= *a),
        Binary::Pow => x.iter_mut().for_each(|a| *a = a.powf(v)),
    }
}

#[inline(always)]
fn pow(x: f32, y: f32) -> f32 {
    if y == 2.0 {
        x * x
    } else {
        x.powf(y)
    }
}

enum Block {
    /// `b` covers the trailing axes of `a`: apply it to each block of `b.len()` values.
    Trailing,
    /// `b` holds one value per run of this many values of `a` (its trailing axes are 1).
    PerRow(usize),
}

/// How `b` broadcasts onto `a` (output shape `a`) when it does so in contiguous blocks.
fn contiguous_broadcast(a: &[usize], b: &[usize]) -> Option<Block> {
    if b.len() > a.len() {
        return None;
    }
    if b.iter().all(|&d| d == 1) {
        return Some(Block::PerRow(a.iter().product()));
    }
    let lead = b.iter().take_while(|&&d| d == 1).count();
    let bt = &b[lead..];
    if a.ends_with(bt) {
        return Some(Block::Trailing);
    }
    // same rank, b = a's leading axes then 1s
    if b.len() == a.len() {
        let k = b.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
        if b[..k] == a[..k] {
            return Some(Block::PerRow(a[k..].iter().product()));
        }
    }
    None
}

/// Integer arithmetic as ONNX Runtime computes it: two's-complement wrapping, division
/// truncating toward zero (`MIN / -1` wraps to `MIN`); division by zero is an error.
pub trait WrappingInt: Copy + Send + Sync + PartialEq + PartialOrd + Default {
    fn apply(op: Binary, x: Self, y: Self) -> Self;
}
macro_rules! wrapping_int {
    ($($t:ty),*) => {$(
        impl WrappingInt for $t {
            fn apply(op: Binary, x: Self, y: Self) -> Self {
                match op {
                    Binary::Add => x.wrapping_add(y),
                    Binary::Sub => x.wrapping_sub(y),
                    Binary::Mul => x.wrapping_mul(y),
                    Binary::Div => x.wrapping_div(y),
                    // a negative exponent is refused by `binary_int`
                    Binary::Pow => x.wrapping_pow(u32::try_from(y).unwrap_or(u32::MAX)),
                }
            }
        }
    )*};
}
wrapping_int!(i64, i32);

pub fn binary_int<T: WrappingInt>(op: Binary, a: &ArrayD<T>, b: &ArrayD<T>) -> Result<ArrayD<T>> {
    if op == Binary::Div && b.iter().any(|&v| v == T::default()) {
        bail!("integer division by zero");
    }
    if op == Binary::Pow && b.iter().any(|&v| v < T::default()) {
        bail!("integer Pow with a negative exponent");
    }
    broadcast_with(a, b, move |x, y| T::apply(op, x, y))
}

fn broadcast_with<T: Copy + Send + Sync, F: Fn(T, T) -> T + Sync>(
    a: &ArrayD<T>,
    b: &ArrayD<T>,
    f: F,
) -> Result<ArrayD<T>> {
    let shape = broadcast_shape(a.shape(), b.shape())?;
    let (Some(av), Some(bv)) = (a.broadcast(shape.clone()), b.broadcast(shape.clone())) else {
        bail!("cannot broadcast {:?} with {:?}", a.shape(), b.shape());
    };
    Ok(Zip::from(&av).and(&bv).map_collect(|&x, &y| f(x, y)))
}

pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
            let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
            match (da, db) {
                (x, y) if x == y => Ok(x),
                (1, y) => Ok(y),
                (x, 1) => Ok(x),
                (x, y) => Err(crate::error::Error::Other(format!(
                    "cannot broadcast {a:?} with {b:?} ({x} vs {y})"
                ))),
            }
        })
        .collect()
}

/// Inference BatchNorm's per-channel `(scale, shift)`: `y = x · s + t` (the kernel below, and
/// the `channels-last` pass's `Mul` and `Add`, which must give its bits).
pub fn batchnorm_affine([scale, bias, mean, var]: [&[f32]; 4], eps: f32) -> (Vec<f32>, Vec<f32>) {
    (0..scale.len())
        .map(|i| {
            let s = scale[i] / (var[i] + eps).sqrt();
            (s, bias[i] - mean[i] * s)
        })
        .unzip()
}

/// Inference BatchNorm on `[N, C, …]`: one scale and shift per channel, applied in place.
pub fn batchnorm(x: &mut [f32], shape: &[usize], params: [&[f32]; 4], eps: f32) {
    let c = shape[1];
    let plane: usize = shape[2..].iter().product();
    let (s, t) = batchnorm_affine(params, eps);
    super::team::for_chunks(x, plane.max(1), |i, p| {
        let ch = i % c;
        p.iter_mut().for_each(|v| *v = *v * s[ch] + t[ch]);
    });
}

/// ONNX `Equal` with numpy broadcasting.
pub fn equal<T: Copy + PartialEq + Send + Sync>(a: &ArrayD<T>, b: &ArrayD<T>) -> Result<ArrayD<bool>> {
    let shape = broadcast_shape(a.shape(), b.shape())?;
    let (Some(av), Some(bv)) = (a.broadcast(shape.clone()), b.broadcast(shape.clone())) else {
        bail!("cannot broadcast {:?} with {:?}", a.shape(), b.shape());
    };
    Ok(Zip::from(&av).and(&bv).map_collect(|x, y| x == y))
}

/// ONNX `Where`: `x` where `cond`, else `y`, all three broadcast together.
pub fn where_<T: Copy + Send + Sync>(cond: &ArrayD<bool>, x: &ArrayD<T>, y: &ArrayD<T>) -> Result<ArrayD<T>> {
    let shape = broadcast_shape(&broadcast_shape(cond.shape(), x.shape())?, y.shape())?;
    let (Some(cv), Some(xv), Some(yv)) = (
        cond.broadcast(shape.clone()),
        x.broadcast(shape.clone()),
        y.broadcast(shape.clone()),
    ) else {
        bail!(
            "cannot broadcast {:?}, {:?} and {:?} together",
            cond.shape(),
            x.shape(),
            y.shape()
        );
    };
    Ok(Zip::from(&cv)
        .and(&xv)
        .and(&yv)
        .map_collect(|&c, &a, &b| if c { a } else { b }))
}

/// Layer normalisation of each row of `d = x.len() / rows` values, in place: `(x − mean) /
/// √(var + eps) · scale + bias` (mean and variance accumulated in f64, two passes, in
/// interleaved partial sums so the passes vectorise).
pub fn layer_norm(x: &mut [f32], d: usize, scale: &[f32], bias: Option<&[f32]>, eps: f32) {
    let d = d.max(1);
    if x.len() >= PAR_MIN {
        super::team::for_chunks(x, d * (4096 / d).max(1), |_, c| {
            layer_norm_chunk(c, d, scale, bias, eps)
        });
    } else {
        layer_norm_chunk(x, d, scale, bias, eps);
    }
}

multiversion! {
    /// [`layer_norm`] on whole rows.
    fn layer_norm_chunk(x: &mut [f32], d: usize, scale: &[f32], bias: Option<&[f32]>, eps: f32) {
        for r in x.chunks_mut(d) {
            let n = r.len() as f64;
            let mean = lane_sum::<8, f64>(r, |v| v as f64) / n;
            let var = lane_sum::<8, f64>(r, |v| {
                let t = v as f64 - mean;
                t * t
            }) / n;
            let inv = 1.0 / (var + eps as f64).sqrt();
            match bias {
                Some(b) => {
                    for ((v, &s), &b) in r.iter_mut().zip(scale).zip(b) {
                        *v = ((*v as f64 - mean) * inv) as f32 * s + b;
                    }
                }
                None => {
                    for (v, &s) in r.iter_mut().zip(scale) {
                        *v = ((*v as f64 - mean) * inv) as f32 * s;
                    }
                }
            }
        }
    }
}

/// Softmax (or log-softmax) along `axis`. Softmax over the last axis of a standard-layout
/// array runs row by row in place ([`softmax_rows`]).
pub fn softmax(mut x: ArrayD<f32>, axis: usize, log: bool) -> ArrayD<f32> {
    let d = x.shape().get(axis).copied().unwrap_or(1);
    if !log && axis + 1 == x.ndim() && d > 0 {
        if let Some(s) = x.as_slice_mut() {
            softmax_rows(s, d);
            return x;
        }
    }
    softmax_lanes(&mut x, axis, log);
    x
}

/// Softmax of each row of `d` values, in place: the row's maximum, then `exp(v − max)` (a
/// vectorised [`exp`]), then one multiplication by `1 / sum`.
pub fn softmax_rows(x: &mut [f32], d: usize) {
    let d = d.max(1);
    if x.len() >= PAR_MIN {
        super::team::for_chunks(x, d * (4096 / d).max(1), |_, c| softmax_chunk(c, d));
    } else {
        softmax_chunk(x, d);
    }
}

multiversion! {
    /// [`softmax_rows`] on whole rows, a block of rows (about 4096 values, in L1) at a time:
    /// each row minus its maximum, then `exp` over the whole block in one loop — short rows
    /// (attention's 17 tokens) would otherwise leave a scalar tail of the costly `exp` per row —
    /// then each row times `1 / sum`. The same operations on each value as row by row.
    fn softmax_chunk(x: &mut [f32], d: usize) {
        for block in x.chunks_mut(d * (4096 / d).max(1)) {
            for r in block.chunks_mut(d) {
                let m = max_of(r);
                r.iter_mut().for_each(|v| *v -= m);
            }
            block.iter_mut().for_each(|v| *v = exp(*v));
            for r in block.chunks_mut(d) {
                let inv = 1.0 / sum_of(r);
                r.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }
}

/// Lanes of the partial sums and maxima below (a vector's worth, so the loops vectorise).
const LANES: usize = 16;

/// The largest value (NaN if any is NaN, −∞ for an empty slice).
#[inline(always)]
fn max_of(r: &[f32]) -> f32 {
    if r.len() < 2 * LANES {
        // a short row (attention's): one pass, no lanes to combine; rows overlap in the CPU
        let mut m = f32::NEG_INFINITY;
        let mut nan = false;
        for &v in r {
            nan |= v.is_nan();
            m = if v > m { v } else { m };
        }
        return if nan { f32::NAN } else { m };
    }
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut nan = false;
    let chunks = r.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            nan |= v.is_nan();
            *a = if v > *a { v } else { *a };
        }
    }
    for &v in rest {
        nan |= v.is_nan();
        acc[0] = if v > acc[0] { v } else { acc[0] };
    }
    if nan {
        return f32::NAN;
    }
    // halving: log2(LANES) steps of vector operations, not a chain of LANES
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] = if acc[i + w] > acc[i] { acc[i + w] } else { acc[i] };
        }
    }
    acc[0]
}

/// The sum: in order for a row shorter than two vectors, otherwise in `LANES` interleaved
/// partial sums, then those pairwise ([`lane_sum`]).
#[inline(always)]
fn sum_of(r: &[f32]) -> f32 {
    if r.len() < 2 * LANES {
        // a short row: in order (combining lanes would cost more than the adds)
        return r.iter().fold(0.0, |s, &v| s + v);
    }
    lane_sum::<LANES, f32>(r, |v| v)
}

/// `Σ f(v)` over `r` in `L` interleaved partial sums (so the loop vectorises), then those added
/// pairwise (`L` a power of two): a fixed order, whatever the vector width.
#[inline(always)]
pub(crate) fn lane_sum<const L: usize, T>(r: &[f32], f: impl Fn(f32) -> T) -> T
where
    T: Copy + Default + std::ops::AddAssign,
{
    let mut acc = [T::default(); L];
    let chunks = r.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(rest) {
        *a += f(v);
    }
    // halving: log2(L) steps of vector additions, not a chain of L
    let mut w = L;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0]
}

/// `e^v` in single precision without branches, so a loop of it vectorises (Cephes' `expf`:
/// `v = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, a degree-6 polynomial for `e^r`, `2^n` through the
/// exponent bits); relative error below 2e-7 on `[-87, 88]`, 0 below, `+∞` above, NaN kept.
#[inline(always)]
pub fn exp(v: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5, // Cephes 5.0000001e-1, the same f32
    ];
    let x = v.clamp(-87.336_55, 88.376_26);
    // round to nearest by the 1.5·2^23 trick (`round` would be a libm call in the loop)
    const SHIFT: f32 = 12_582_912.0;
    let n = (x * LOG2E + SHIFT) - SHIFT;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = P[1..].iter().fold(P[0], |p, &c| p * r + c);
    let e = p * r * r + r + 1.0;
    // `n` read from the rounded value's low mantissa bits (no saturating float → int conversion)
    let t = x * LOG2E + SHIFT;
    let scale = f32::from_bits(t.to_bits().wrapping_sub(SHIFT.to_bits()).wrapping_add(127) << 23);
    let y = e * scale;
    // selects, not branches (NaN fails every comparison and falls through to `v`)
    let y = if v > 88.376_26 { f32::INFINITY } else { y };
    let y = if v < -87.336_55 { 0.0 } else { y };
    if v.is_nan() {
        v
    } else {
        y
    }
}

fn softmax_lanes(x: &mut ArrayD<f32>, axis: usize, log: bool) {
    for mut lane in x.lanes_mut(Axis(axis)) {
        let m = lane.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = lane.iter().map(|v| (v - m).exp()).sum();
        if log {
            let lse = m + sum.ln();
            lane.iter_mut().for_each(|v| *v -= lse);
        } else {
            lane.iter_mut().for_each(|v| *v = (*v - m).exp() / sum);
        }
    }
}

#[cfg(test)]
mod erf_tests {
    /// The vectorisable `exp` against the standard library's over the range softmax uses and
    /// its edges.
    #[test]
    fn exp_matches_std() {
        let mut worst = 0f64;
        // the documented range: below it the result is 0 (checked after the loop)
        for i in -197_727..=200_000 {
            let x = i as f32 * 4.4e-4;
            let (got, want) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        for x in [-87.0f32, -50.0, 50.0, 88.0] {
            let (got, want) = (super::exp(x) as f64, (x as f64).exp());
            assert!(((got - want) / want).abs() < 3e-7, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(super::exp(-100.0), 0.0);
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(100.0), f32::INFINITY);
        assert!(super::exp(f32::NAN).is_nan());
    }

    /// Softmax over the last axis (row kernel) equals the general lane path.
    #[test]
    fn softmax_rows_matches_lanes() {
        let shape = [3usize, 5, 17];
        let data: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0)
            .collect();
        let x = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), data).unwrap();
        let fast = super::softmax(x.clone(), 2, false);
        let mut slow = x.clone();
        super::softmax_lanes(&mut slow, 2, false);
        for (a, b) in fast.iter().zip(slow.iter()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // a non-standard layout takes the lane path
        let t = x.permuted_axes(ndarray::IxDyn(&[2, 1, 0]));
        let f = super::softmax(t.clone(), 0, false);
        let mut g = t.to_owned();
        super::softmax_lanes(&mut g, 0, false);
        assert_eq!(f, g);
    }

    #[test]
    fn erf_matches_reference_values() {
        // erf to 10 digits (Abramowitz & Stegun, table 7.1); erf is odd and saturates at ±1
        for (x, want) in [
            (0.0f32, 0.0f64),
            (0.1, 0.112_462_916_0),
            (0.5, 0.520_499_877_8),
            (1.0, 0.842_700_792_9),
            (1.5, 0.966_105_146_5),
            (2.0, 0.995_322_265_0),
            (3.0, 0.999_977_909_5),
            (4.5, 1.0),
            (40.0, 1.0),
        ] {
            for (x, want) in [(x, want), (-x, -want)] {
                let got = super::erf(x) as f64;
                assert!((got - want).abs() < 5e-7, "erf({x}) = {got}, want {want}");
            }
        }
        assert!(super::erf(f32::NAN).is_nan());
    }
}

/// The kernels compiled per SIMD level by `multiversion!` give the same bits at every level the
/// CPU has (the project's rule for every kernel), and match a plain reference.
#[cfg(test)]
mod level_tests {
    use super::*;
    use crate::interp::kernels::{levels_checked, Simd};

    /// Awkward values (signed zeros, infinities, NaN, subnormals, erf's clamp and exp's range
    /// edges) then a deterministic spread, `n` in all.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let special = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            4.0,
            -4.5,
            88.5,
            -90.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-40,
            -3e-39,
            f32::MAX,
        ];
        let mut r = crate::pq::rng::Rng::new(seed);
        (0..n)
            .map(|i| match special.get(i) {
                Some(&v) if seed.is_multiple_of(2) => v,
                _ => (r.next_f64() as f32 - 0.5) * 12.0,
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// `f` run at every level on a copy of `x`; every level's bits equal the scalar level's,
    /// which are returned.
    fn same_at_every_level(what: &str, levels: &[Simd], x: &[f32], f: impl Fn(Simd, &mut [f32])) -> Vec<f32> {
        let mut want = x.to_vec();
        f(Simd::Scalar, &mut want);
        for &level in levels {
            let mut got = x.to_vec();
            f(level, &mut got);
            assert_eq!(bits(&got), bits(&want), "{what}: {} differs from scalar", level.name());
        }
        want
    }

    const OPS: [Binary; 5] = [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div, Binary::Pow];

    fn reference_op(op: Binary, x: f32, y: f32) -> f32 {
        match op {
            Binary::Add => x + y,
            Binary::Sub => x - y,
            Binary::Mul => x * y,
            Binary::Div => x / y,
            Binary::Pow => pow(x, y),
        }
    }

    #[test]
    fn multiversion_kernels_are_bit_identical_across_simd_levels() {
        let levels = levels_checked("multiversion_kernels_are_bit_identical_across_simd_levels");
        // lengths around the vector widths and the 16-lane partial sums
        for n in [1usize, 7, 8, 15, 16, 17, 33, 64, 100, 1027] {
            let x = values(n, n as u64 * 2);
            for gelu in [false, true] {
                let got = same_at_every_level(&format!("erf_slice n={n} gelu={gelu}"), &levels, &x, |l, v| {
                    erf_slice::at(l, v, gelu)
                });
                for (&v, &g) in x.iter().zip(&got) {
                    let want = if gelu {
                        0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2))
                    } else {
                        erf(v)
                    };
                    assert_eq!(g.to_bits(), want.to_bits(), "erf_slice({v}) gelu={gelu}");
                }
            }
            let y = values(n, n as u64 * 2 + 1);
            let mut y2 = y.clone();
            y2[0] = 2.0; // the Pow-by-2 case
            for op in OPS {
                for y in [&y, &y2] {
                    let got = same_at_every_level(&format!("apply_same {op:?} n={n}"), &levels, &x, |l, v| {
                        apply_same::at(l, v, y, op)
                    });
                    for ((&a, &b), &g) in x.iter().zip(y).zip(&got) {
                        assert_eq!(g.to_bits(), reference_op(op, a, b).to_bits(), "{a} {op:?} {b}");
                    }
                }
                // a bias of 4 or 17 values over rows of that length; one value per row of 4 or 17
                for k in [4usize, 17] {
                    let xs = values(k * n, n as u64);
                    let got =
                        same_at_every_level(&format!("apply_trailing {op:?} n={n} k={k}"), &levels, &xs, |l, v| {
                            apply_trailing::at(l, v, &y2[..k.min(n)], op)
                        });
                    let yb = &y2[..k.min(n)];
                    for (i, (&a, &g)) in xs.iter().zip(&got).enumerate().take(xs.len() / yb.len() * yb.len()) {
                        let b = yb[i % yb.len()];
                        assert_eq!(g.to_bits(), reference_op(op, a, b).to_bits(), "trailing {a} {op:?} {b}");
                    }
                    let got =
                        same_at_every_level(&format!("apply_per_row {op:?} n={n} k={k}"), &levels, &xs, |l, v| {
                            apply_per_row::at(l, v, &y2, k, op)
                        });
                    for (i, (&a, &g)) in xs.iter().zip(&got).enumerate() {
                        let b = y2[i / k];
                        let want = match op {
                            // a scalar exponent other than 2 is `powf` itself
                            Binary::Pow if b != 2.0 => a.powf(b),
                            _ => reference_op(op, a, b),
                        };
                        assert_eq!(g.to_bits(), want.to_bits(), "per row {a} {op:?} {b}");
                    }
                }
            }
        }
        // rows of d values: LayerNorm (with and without a bias) and softmax
        for d in [1usize, 5, 8, 16, 17, 64, 100] {
            let rows = 9;
            let mut x = values(rows * d, d as u64 * 2 + 1);
            x.iter_mut().for_each(|v| *v = v.clamp(-30.0, 30.0));
            let scale = values(d, 7);
            let bias = values(d, 9);
            for b in [Some(&bias[..]), None] {
                let got = same_at_every_level(&format!("layer_norm_chunk d={d}"), &levels, &x, |l, v| {
                    layer_norm_chunk::at(l, v, d, &scale, b, 1e-5)
                });
                for (r, (xr, gr)) in x.chunks(d).zip(got.chunks(d)).enumerate() {
                    let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                    let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                    for (j, (&v, &g)) in xr.iter().zip(gr).enumerate() {
                        let want =
                            (v as f64 - mean) / (var + 1e-5).sqrt() * scale[j] as f64 + b.map_or(0.0, |b| b[j] as f64);
                        let tol = 1e-5 * (1.0 + want.abs());
                        assert!(
                            (g as f64 - want).abs() <= tol,
                            "layer norm row {r} [{j}]: {g} vs {want}"
                        );
                    }
                }
            }
            let got = same_at_every_level(&format!("softmax_chunk d={d}"), &levels, &x, |l, v| {
                softmax_chunk::at(l, v, d)
            });
            for (xr, gr) in x.chunks(d).zip(got.chunks(d)) {
                let m = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let sum: f64 = xr.iter().map(|&v| (v as f64 - m).exp()).sum();
                for (&v, &g) in xr.iter().zip(gr) {
                    let want = (v as f64 - m).exp() / sum;
                    assert!((g as f64 - want).abs() <= 1e-6, "softmax {g} vs {want}");
                }
            }
        }
    }
}
