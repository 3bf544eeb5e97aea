//! Data-movement ops, generic over the element type: reshape, transpose, concat, pad, gather,
//! and the mean reduction.

use crate::bail;
use crate::error::Result;
use ndarray::{ArrayD, Axis, IxDyn, Slice};

pub use crate::ir::infer::norm_axis;

/// `a` in standard layout: itself when it already is, without a copy
/// (`a.as_standard_layout().into_owned()` copies even then: it clones the view it borrows).
pub fn standard<T: Clone>(a: ArrayD<T>) -> ArrayD<T> {
    if a.is_standard_layout() {
        a
    } else {
        a.as_standard_layout().into_owned()
    }
}

/// Reshape to a concrete shape (data kept when already in standard layout).
pub fn reshape<T: Clone>(a: ArrayD<T>, shape: &[usize]) -> Result<ArrayD<T>> {
    let from = a.shape().to_vec();
    let a = standard(a);
    a.into_shape_with_order(IxDyn(shape))
        .map_err(|_| crate::error::Error::Other(format!("cannot reshape {from:?} into {shape:?}")))
}

/// Resolve an ONNX Reshape target (`0` copies, `-1` infers) against a concrete input shape.
pub fn reshape_target(input: &[usize], target: &[i64], allowzero: bool) -> Result<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            0 if !allowzero => out.push(
                *input
                    .get(i)
                    .ok_or_else(|| crate::error::Error::Other(format!("0 at {i} has no input dim")))?,
            ),
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            t if t >= 0 => out.push(t as usize),
            t => bail!("invalid reshape target {target:?} (entry {t})"),
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            bail!("cannot reshape {input:?} into {target:?}");
        }
        out[i] = total / known;
    } else if known != total {
        bail!("cannot reshape {input:?} into {target:?}");
    }
    Ok(out)
}

pub fn transpose<T: Copy + Default>(a: ArrayD<T>, perm: &[usize]) -> ArrayD<T> {
    let s = a.shape().to_vec();
    let shape: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
    let a = standard(a);
    let src = a.as_slice().expect("standard layout");
    let out = permute(src, &s, perm);
    ArrayD::from_shape_vec(IxDyn(&shape), out).expect("transpose output size")
}

/// The elements of a row-major tensor of shape `shape` with its axes permuted (`out` axis `i`
/// is input axis `perm[i]`), written in the output's row-major order. Axes that stay adjacent
/// are merged first; a swap of the last two (merged) axes — the layout conversions, attention's
/// `Kᵀ` — is a batch of blocked 2-D transposes, a permutation that keeps the last axis copies
/// contiguous runs, any other gathers with strides.
pub fn permute<T: Copy + Default>(src: &[T], shape: &[usize], perm: &[usize]) -> Vec<T> {
    let r = shape.len();
    let mut in_strides = vec![1usize; r];
    for i in (0..r.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * shape[i + 1];
    }
    // output axes as (size, input stride), size-1 axes dropped, then merged where an output
    // axis steps exactly over the next one in the input
    let mut dims: Vec<(usize, usize)> = Vec::with_capacity(r);
    for &p in perm {
        if shape[p] == 1 {
            continue;
        }
        match dims.last_mut() {
            Some(last) if last.1 == in_strides[p] * shape[p] => {
                last.0 *= shape[p];
                last.1 = in_strides[p];
            }
            _ => dims.push((shape[p], in_strides[p])),
        }
    }
    let total: usize = shape.iter().product();
    if total == 0 {
        return Vec::new();
    }
    match *dims.as_slice() {
        [] | [(_, 1)] => return src[..total].to_vec(),
        // [rows, cols] → [cols, rows], possibly in contiguous batches
        [(cols, 1), (rows, c)] if c == cols => return batched_transpose(src, 1, rows, cols),
        [(lead, ls), (cols, 1), (rows, c)] if c == cols && ls == rows * cols => {
            return batched_transpose(src, lead, rows, cols)
        }
        _ => {}
    }
    let (inner, inner_stride) = *dims.last().expect("at least one axis");
    let outer = &dims[..dims.len() - 1];
    let mut out = Vec::with_capacity(total);
    let mut idx = vec![0usize; outer.len()];
    let mut base = 0usize;
    loop {
        if inner_stride == 1 {
            out.extend_from_slice(&src[base..base + inner]);
        } else {
            out.extend((0..inner).map(|j| src[base + j * inner_stride]));
        }
        // odometer over the outer axes
        let mut ax = outer.len();
        loop {
            if ax == 0 {
                return out;
            }
            ax -= 1;
            idx[ax] += 1;
            base += outer[ax].1;
            if idx[ax] < outer[ax].0 {
                break;
            }
            base -= outer[ax].1 * outer[ax].0;
            idx[ax] = 0;
        }
    }
}

/// `n` row-major `[rows, cols]` matrices → their transposes: 8 × 8 register transposes at AVX2
/// for 4-byte elements (the layout conversions of f32 activations), else in 16×16 blocks.
fn batched_transpose<T: Copy + Default>(src: &[T], n: usize, rows: usize, cols: usize) -> Vec<T> {
    batched_transpose_at(super::Simd::detect(), src, n, rows, cols)
}

/// [`batched_transpose`] with `level`'s kernel (the same elements at every level: data movement).
fn batched_transpose_at<T: Copy + Default>(
    level: super::Simd,
    src: &[T],
    n: usize,
    rows: usize,
    cols: usize,
) -> Vec<T> {
    if rows == 1 || cols == 1 {
        return src.to_vec();
    }
    let mut out = vec![T::default(); src.len()];
    let simd = level >= super::Simd::Avx2 && level.supported() && std::mem::size_of::<T>() == 4;
    for (s, d) in src
        .chunks_exact(rows * cols)
        .zip(out.chunks_exact_mut(rows * cols))
        .take(n)
    {
        // the whole 8 × 8 blocks with registers, the rest below element by element
        let (r8, c8) = if simd { (rows / 8 * 8, cols / 8 * 8) } else { (0, 0) };
        #[cfg(target_arch = "x86_64")]
        if r8 > 0 && c8 > 0 {
            // SAFETY: AVX2 checked above; T is 4 bytes, and the kernel moves 4-byte values with
            // unaligned loads and stores inside the `rows × cols` matrices `s` and `d`.
            unsafe { transpose8::blocks(s.as_ptr().cast(), d.as_mut_ptr().cast(), rows, cols, r8, c8) }
        }
        // the rest: the columns right of the blocks, then the rows below them
        transpose_region(s, d, rows, cols, 0..rows, c8..cols);
        transpose_region(s, d, rows, cols, r8..rows, 0..c8);
    }
    out
}

/// `d[c][r] = s[r][c]` for `r` in `rs`, `c` in `cs` (`s` is `rows × cols`, `d` `cols × rows`),
/// in 16 × 16 blocks written as runs of output rows.
fn transpose_region<T: Copy>(
    s: &[T],
    d: &mut [T],
    rows: usize,
    cols: usize,
    rs: std::ops::Range<usize>,
    cs: std::ops::Range<usize>,
) {
    const B: usize = 16;
    for r0 in rs.clone().step_by(B) {
        let rb = B.min(rs.end - r0);
        for c0 in cs.clone().step_by(B) {
            let cb = B.min(cs.end - c0);
            for (c, drow) in d[c0 * rows..].chunks_mut(rows).take(cb).enumerate() {
                let col = &s[r0 * cols + c0 + c..];
                for (r, o) in drow[r0..r0 + rb].iter_mut().enumerate() {
                    *o = col[r * cols];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod transpose8 {
    use std::arch::x86_64::*;

    /// `d[c][r] = s[r][c]` for `r < r8`, `c < c8` (multiples of 8) of a row-major
    /// `rows × cols` matrix `s` into the `cols × rows` matrix `d`, 8 × 8 at a time; columns in
    /// strips of 64 so the 64 output rows being written stay in cache.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn blocks(s: *const f32, d: *mut f32, rows: usize, cols: usize, r8: usize, c8: usize) {
        for cs in (0..c8).step_by(64) {
            for r0 in (0..r8).step_by(8) {
                for c0 in (cs..c8.min(cs + 64)).step_by(8) {
                    block(s.add(r0 * cols + c0), cols, d.add(c0 * rows + r0), rows);
                }
            }
        }
    }

    /// One 8 × 8 block: rows `ls` apart in, rows `ld` apart out.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn block(s: *const f32, ls: usize, d: *mut f32, ld: usize) {
        let r: [__m256i; 8] = std::array::from_fn(|i| _mm256_loadu_si256(s.add(i * ls).cast()));
        for (j, v) in crate::interp::kernels::transpose8_epi32(r).into_iter().enumerate() {
            _mm256_storeu_si256(d.add(j * ld).cast(), v);
        }
    }
}

/// ONNX `Expand`: `a` broadcast with `shape` (bidirectionally: a 1 in `shape` keeps `a`'s size).
pub fn expand<T: Clone>(a: &ArrayD<T>, shape: &[i64]) -> Result<ArrayD<T>> {
    let target: Vec<usize> = shape
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| {
                crate::error::Error::Other(format!("negative dimension {d} in the Expand shape {shape:?}"))
            })
        })
        .collect::<Result<_>>()?;
    let out = super::elementwise::broadcast_shape(a.shape(), &target)?;
    crate::limits::check_shape(&out, std::mem::size_of::<T>(), "Expand output")?;
    let v = a
        .broadcast(IxDyn(&out))
        .ok_or_else(|| crate::error::Error::Other(format!("cannot expand {:?} to {shape:?}", a.shape())))?;
    Ok(v.as_standard_layout().into_owned())
}

/// Concatenation along `axis`, in standard layout whatever the parts' layouts (later kernels
/// take the output as one slice).
pub fn concat<T: Clone>(parts: &[&ArrayD<T>], axis: usize) -> Result<ArrayD<T>> {
    let first = parts
        .first()
        .ok_or_else(|| crate::error::Error::Other("Concat of no inputs".into()))?;
    let r = first.ndim();
    if axis >= r {
        bail!("Concat axis {axis} out of range for rank {r}");
    }
    let mut shape = first.shape().to_vec();
    shape[axis] = 0;
    for p in parts {
        let ps = p.shape();
        if ps.len() != r || (0..r).any(|i| i != axis && ps[i] != first.shape()[i]) {
            bail!(
                "Concat: shapes {:?} and {:?} differ outside axis {axis}",
                first.shape(),
                ps
            );
        }
        shape[axis] += ps[axis];
    }
    crate::limits::check_shape(&shape, std::mem::size_of::<T>(), "Concat output")?;
    let outer: usize = shape[..axis].iter().product();
    let std: Vec<_> = parts.iter().map(|p| p.as_standard_layout()).collect();
    let runs: Vec<usize> = std.iter().map(|p| p.len().checked_div(outer).unwrap_or(0)).collect();
    let mut out = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        for (p, &run) in std.iter().zip(&runs) {
            out.extend_from_slice(&p.as_slice().expect("standard layout")[o * run..(o + 1) * run]);
        }
    }
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), out).expect("concat output size"))
}

/// Constant padding; negative pads crop. `pads = [begin…, end…]`.
pub fn pad<T: Clone>(a: &ArrayD<T>, pads: &[i64], value: T) -> Result<ArrayD<T>> {
    let r = a.ndim();
    if pads.len() != 2 * r {
        bail!("{} pads for a rank-{r} tensor", pads.len());
    }
    let mut out_shape = Vec::with_capacity(r);
    for (i, &n) in a.shape().iter().enumerate() {
        let s = (n as i64).checked_add(pads[i]).and_then(|s| s.checked_add(pads[i + r]));
        match s {
            Some(s) if s >= 0 => out_shape.push(s as usize),
            Some(_) => bail!("pads {pads:?} remove more than the whole axis {i}"),
            None => bail!("pads {pads:?} overflow axis {i}"),
        }
    }
    crate::limits::check_shape(&out_shape, std::mem::size_of::<T>(), "Pad output")?;
    let mut out = ArrayD::from_elem(IxDyn(&out_shape), value);
    let src = a.slice_each_axis(|ax| {
        let i = ax.axis.index();
        let (b, e) = ((-pads[i]).max(0) as usize, (-pads[i + r]).max(0) as usize);
        Slice::from(b.min(ax.len)..ax.len.saturating_sub(e).max(b.min(ax.len)))
    });
    let mut dst = out.slice_each_axis_mut(|ax| {
        let i = ax.axis.index();
        let b = pads[i].max(0) as usize;
        Slice::from(b..b + src.shape()[i])
    });
    dst.assign(&src);
    Ok(out)
}

pub fn gather<T: Clone>(a: &ArrayD<T>, axis: usize, indices: &[i64], ishape: &[usize]) -> Result<ArrayD<T>> {
    let n = a.shape()[axis] as i64;
    let idx: Vec<usize> = indices
        .iter()
        .map(|&i| {
            let j = if i < 0 { i + n } else { i };
            if (0..n).contains(&j) {
                Ok(j as usize)
            } else {
                Err(crate::error::Error::Other(format!(
                    "index {i} out of range for axis of size {n}"
                )))
            }
        })
        .collect::<Result<_>>()?;
    let picked = a.select(Axis(axis), &idx);
    let mut shape = a.shape()[..axis].to_vec();
    shape.extend_from_slice(ishape);
    shape.extend_from_slice(&a.shape()[axis + 1..]);
    reshape(picked, &shape)
}

pub fn reduce_mean(a: &ArrayD<f32>, axes: &[usize], keepdims: bool) -> Result<ArrayD<f32>> {
    let mut sorted = axes.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if let Some(&ax) = sorted.iter().find(|&&ax| a.shape().get(ax).is_none_or(|&n| n == 0)) {
        bail!("cannot average over axis {ax} of shape {:?}", a.shape());
    }
    // The spatial mean of a channels-last batch (what `channels-last` turns GlobalAveragePool
    // into): one sum per channel in (y, x) order, divided once, the same bits as GlobalAveragePool.
    if let (4, [1, 2], false, Some(x)) = (a.ndim(), sorted.as_slice(), keepdims, a.as_slice()) {
        let [n, h, w, c] = [a.shape()[0], a.shape()[1], a.shape()[2], a.shape()[3]];
        let plane = h * w;
        let mut out = Vec::with_capacity(n * c);
        // `Iterator::sum`'s starting value, so each channel's sum is the one `sum()` gives
        let zero: f32 = std::iter::empty::<f32>().sum();
        let mut acc = vec![zero; c];
        for img in x.chunks((plane * c).max(1)).take(n) {
            acc.fill(zero);
            // pixel by pixel, all channels at once (vectorizes), in (y, x) order per channel
            for px in img.chunks_exact(c.max(1)) {
                for (a, &v) in acc.iter_mut().zip(px) {
                    *a += v;
                }
            }
            out.extend(acc.iter().map(|&a| a / plane as f32));
        }
        return Ok(ArrayD::from_shape_vec(ndarray::IxDyn(&[n, c]), out).expect("reduce_mean output size"));
    }
    // Trailing axes of a standard-layout tensor: one contiguous run per output, summed in 16
    // lanes (vectorizes) that are then added pairwise.
    let rank = a.ndim();
    let trailing = sorted.iter().enumerate().all(|(i, &ax)| ax == rank - sorted.len() + i);
    if let (true, Some(x)) = (trailing && !sorted.is_empty(), a.as_slice()) {
        let run: usize = a.shape()[rank - sorted.len()..].iter().product();
        let out: Vec<f32> = x
            .chunks_exact(run)
            .map(|r| super::elementwise::lane_sum::<16, f32>(r, |v| v) / run as f32)
            .collect();
        let mut shape = a.shape()[..rank - sorted.len()].to_vec();
        if keepdims {
            shape.resize(rank, 1);
        }
        return Ok(ArrayD::from_shape_vec(IxDyn(&shape), out).expect("reduce_mean output size"));
    }
    let mut out = a.clone();
    for &ax in sorted.iter().rev() {
        out = out
            .mean_axis(Axis(ax))
            .ok_or_else(|| crate::error::Error::Other(format!("cannot average over empty axis {ax}")))?;
        if keepdims {
            out.insert_axis_inplace(Axis(ax));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// `standard` keeps an array already in standard layout (the same buffer, no copy: the
    /// elementwise ops, Softmax and LayerNorm work in place on what it returns) and copies any
    /// other into standard layout with the same elements.
    #[test]
    fn standard_copies_only_what_is_not_in_standard_layout() {
        let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 3]), (0..6).map(|v| v as f32).collect()).unwrap();
        let p = a.as_ptr();
        let kept = super::standard(a.clone());
        let same = super::standard(a);
        assert_eq!(same.as_ptr(), p, "an array in standard layout is returned as it is");
        let t = super::standard(kept.reversed_axes());
        assert!(t.is_standard_layout());
        assert_eq!(t.shape(), &[3, 2]);
        assert_eq!(t.as_slice().unwrap(), &[0., 3., 1., 4., 2., 5.]);
    }

    /// `permute` (merged axes, batched 2-D blocks, contiguous runs, strided gathers) equals
    /// ndarray's permuted view copied, for every permutation of ranks 1–5 with sizes including 1.
    #[test]
    fn permute_matches_ndarray_for_every_permutation() {
        fn perms(r: usize) -> Vec<Vec<usize>> {
            if r == 0 {
                return vec![vec![]];
            }
            let mut out = vec![];
            for p in perms(r - 1) {
                for i in 0..=p.len() {
                    let mut q = p.clone();
                    q.insert(i, r - 1);
                    out.push(q);
                }
            }
            out
        }
        for shape in [
            vec![5],
            vec![3, 4],
            vec![2, 17, 16],
            vec![2, 1, 3, 5],
            vec![2, 3, 1, 4, 5],
            vec![4, 17, 3, 4, 16],
        ] {
            let n: usize = shape.iter().product();
            let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), (0..n as i64).collect()).unwrap();
            for p in perms(shape.len()) {
                let want = a
                    .clone()
                    .permuted_axes(ndarray::IxDyn(&p))
                    .as_standard_layout()
                    .into_owned();
                let got = super::transpose(a.clone(), &p);
                assert_eq!(got, want, "shape {shape:?} perm {p:?}");
            }
        }
    }

    /// Batched 2-D transposes of 4-byte elements (f32 and i32: the 8 × 8 register blocks at
    /// AVX2 and up, with partial blocks at both edges) equal the naive transpose at every level.
    #[test]
    fn batched_transpose_matches_naive_at_every_level() {
        let levels = crate::interp::kernels::levels_checked("batched_transpose_matches_naive_at_every_level");
        for &(n, rows, cols) in &[
            (1, 784, 8),
            (2, 8, 784),
            (3, 17, 24),
            (1, 70, 130),
            (2, 9, 9),
            (1, 8, 8),
            (1, 16, 3),
            (2, 64, 200),
        ] {
            let src: Vec<f32> = (0..n * rows * cols).map(|i| i as f32 * 0.5 - 3.0).collect();
            let ints: Vec<i32> = (0..n * rows * cols).map(|i| i as i32 * 7 - 11).collect();
            let want = |i: usize| {
                let (b, rest) = (i / (rows * cols), i % (rows * cols));
                let (c, r) = (rest / rows, rest % rows);
                b * rows * cols + r * cols + c
            };
            for &level in &levels {
                let got = super::batched_transpose_at(level, &src, n, rows, cols);
                let got_i = super::batched_transpose_at(level, &ints, n, rows, cols);
                for i in 0..src.len() {
                    assert_eq!(got[i], src[want(i)], "{} ({n},{rows},{cols}) at {i}", level.name());
                    assert_eq!(
                        got_i[i],
                        ints[want(i)],
                        "{} i32 ({n},{rows},{cols}) at {i}",
                        level.name()
                    );
                }
            }
        }
    }

    /// A mean over trailing axes (summed in lanes) equals ndarray's mean over each axis, with
    /// and without the kept axes, for runs shorter and longer than the lanes and every axis.
    #[test]
    fn trailing_mean_matches_axis_by_axis() {
        use ndarray::{ArrayD, Axis, IxDyn};
        for (shape, axes) in [
            (vec![8, 784], vec![1]),
            (vec![2, 3, 5, 7], vec![2, 3]),
            (vec![3, 17], vec![0, 1]),
            (vec![4, 9], vec![1]),
        ] {
            let n: usize = shape.iter().product();
            let a = ArrayD::from_shape_vec(
                IxDyn(&shape),
                (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect(),
            )
            .unwrap();
            for keepdims in [false, true] {
                let got = super::reduce_mean(&a, &axes, keepdims).unwrap();
                let mut want = a.clone();
                for &ax in axes.iter().rev() {
                    want = want.mean_axis(Axis(ax)).unwrap();
                    if keepdims {
                        want.insert_axis_inplace(Axis(ax));
                    }
                }
                assert_eq!(got.shape(), want.shape(), "{shape:?} {axes:?} keepdims {keepdims}");
                for (g, w) in got.iter().zip(want.iter()) {
                    assert!((g - w).abs() < 1e-5, "{shape:?} {axes:?}: {g} vs {w}");
                }
            }
        }
    }

    /// Concat of parts in any layout writes the standard-layout result.
    #[test]
    fn concat_of_transposed_parts_is_standard() {
        let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[3, 2]), (0..6).collect::<Vec<i64>>()).unwrap();
        let at = a.clone().reversed_axes();
        let b = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 1]), vec![7i64, 8]).unwrap();
        let c = super::concat(&[&at, &b], 1).unwrap();
        assert!(c.is_standard_layout());
        assert_eq!(c.as_slice().unwrap(), &[0, 2, 4, 7, 1, 3, 5, 8]);
        assert!(super::concat(&[&a, &b], 1).is_err());
        assert!(super::concat(&[&a, &b], 5).is_err());
    }

    /// The channels-last spatial mean gives GlobalAveragePool's bits on maps whose size is not a
    /// power of two (where dividing twice would round differently).
    #[test]
    fn channels_last_mean_equals_global_average_pool() {
        let (n, c, h, w) = (2, 5, 7, 3);
        let nchw: Vec<f32> = (0..n * c * h * w)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut nhwc = vec![0f32; nchw.len()];
        for i in 0..n {
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        nhwc[((i * h + y) * w + x) * c + ch] = nchw[((i * c + ch) * h + y) * w + x];
                    }
                }
            }
        }
        let gap = super::super::pool::global_pool(&nchw, &[n, c, h, w], false);
        let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[n, h, w, c]), nhwc).unwrap();
        let mean = super::reduce_mean(&a, &[1, 2], false).unwrap();
        assert_eq!(mean.shape(), [n, c]);
        let gap: Vec<u32> = gap.iter().map(|v| v.to_bits()).collect();
        let mean: Vec<u32> = mean.iter().map(|v| v.to_bits()).collect();
        assert_eq!(mean, gap);
    }
}
