//! Max and average pooling over 2-D windows, global pooling, and LRN; one (image, channel)
//! plane per task.

use crate::error::Result;
use crate::ir::op::{Pool, PoolKind};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

pub fn pool2d(x: &[f32], shape: [usize; 4], pool: &Pool) -> Result<ArrayD<f32>> {
    let [n, c, h, w] = shape;
    let win = &pool.window;
    let geo = win.resolve([h, w])?;
    let [oh, ow] = geo.out;
    let [kh, kw] = win.kernel;
    let [sh, sw] = win.strides;
    let [dh, dw] = win.dilations;
    let (pt, pl, pb, pr) = (
        geo.pads[0] as isize,
        geo.pads[1] as isize,
        geo.pads[2] as isize,
        geo.pads[3] as isize,
    );
    let mut out = vec![0f32; n * c * oh * ow];
    let plane_work = oh * ow * win.kernel[0] * win.kernel[1];
    out.par_chunks_mut(oh * ow)
        .with_min_len(super::min_chunks(plane_work))
        .enumerate()
        .for_each(|(plane_idx, dst)| {
            let src = &x[plane_idx * h * w..(plane_idx + 1) * h * w];
            for y in 0..oh {
                for xo in 0..ow {
                    let y0 = (y * sh) as isize - pt;
                    let x0 = (xo * sw) as isize - pl;
                    let mut acc = match pool.kind {
                        PoolKind::Max => f32::NEG_INFINITY,
                        PoolKind::Avg { .. } => 0.0,
                    };
                    let (mut inside, mut in_padded) = (0usize, 0usize);
                    for i in 0..kh {
                        let sy = y0 + (i * dh) as isize;
                        if sy >= -pt && sy < h as isize + pb {
                            for j in 0..kw {
                                let sx = x0 + (j * dw) as isize;
                                if sx < -pl || sx >= w as isize + pr {
                                    continue;
                                }
                                in_padded += 1;
                                if sy < 0 || sy >= h as isize || sx < 0 || sx >= w as isize {
                                    continue;
                                }
                                inside += 1;
                                let v = src[sy as usize * w + sx as usize];
                                match pool.kind {
                                    PoolKind::Max => acc = acc.max(v),
                                    PoolKind::Avg { .. } => acc += v,
                                }
                            }
                        }
                    }
                    dst[y * ow + xo] = match pool.kind {
                        PoolKind::Max => acc,
                        PoolKind::Avg {
                            count_include_pad: true,
                        } => acc / in_padded.max(1) as f32,
                        PoolKind::Avg {
                            count_include_pad: false,
                        } => acc / inside.max(1) as f32,
                    };
                }
            }
        });
    Ok(ArrayD::from_shape_vec(IxDyn(&[n, c, oh, ow]), out).expect("pool output size"))
}

/// Global average or max over all spatial positions of each (image, channel).
pub fn global_pool(x: &[f32], shape: &[usize], max: bool) -> ArrayD<f32> {
    let plane: usize = shape[2..].iter().product();
    let out: Vec<f32> = x
        .par_chunks(plane.max(1))
        .with_min_len(super::min_chunks(plane))
        .map(|p| {
            if max {
                p.iter().copied().fold(f32::NEG_INFINITY, f32::max)
            } else {
                p.iter().sum::<f32>() / plane as f32
            }
        })
        .collect();
    let mut oshape = shape[..2].to_vec();
    oshape.extend(std::iter::repeat_n(1, shape.len() - 2));
    ArrayD::from_shape_vec(IxDyn(&oshape), out).expect("global pool output size")
}

/// Local response normalisation across channels (ONNX LRN).
pub fn lrn(x: &[f32], shape: &[usize], size: usize, alpha: f32, beta: f32, bias: f32) -> ArrayD<f32> {
    let c = shape[1];
    let plane: usize = shape[2..].iter().product();
    let lo = (size - 1) / 2;
    let hi = (size - 1).div_ceil(2);
    let mut out = vec![0f32; x.len()];
    let a = alpha / size as f32;
    out.par_chunks_mut(c * plane)
        .with_min_len(super::min_chunks(c * plane * size))
        .enumerate()
        .for_each(|(img, dst)| {
            let src = &x[img * c * plane..(img + 1) * c * plane];
            let mut sq = vec![0f32; plane];
            for ch in 0..c {
                let from = ch.saturating_sub(lo);
                let to = (ch + hi).min(c - 1);
                // the window's squares summed in channel order, a whole plane at a time (vectorises)
                sq.fill(0.0);
                for k in from..=to {
                    sq.iter_mut()
                        .zip(&src[k * plane..(k + 1) * plane])
                        .for_each(|(s, &v)| *s += v * v);
                }
                let (x, d) = (
                    &src[ch * plane..(ch + 1) * plane],
                    &mut dst[ch * plane..(ch + 1) * plane],
                );
                let base = sq.iter().map(|&s| bias + a * s);
                match beta {
                    // AlexNet's and GoogLeNet's 0.75 without `powf`: b^-0.75 = 1 / (√b · √√b)
                    0.75 => d.iter_mut().zip(x).zip(base).for_each(|((d, &x), b)| {
                        let r = b.sqrt();
                        *d = x / (r * r.sqrt());
                    }),
                    _ => d
                        .iter_mut()
                        .zip(x)
                        .zip(base)
                        .for_each(|((d, &x), b)| *d = x / b.powf(beta)),
                }
            }
        });
    ArrayD::from_shape_vec(IxDyn(shape), out).expect("lrn output size")
}

/// Per output index along one axis: the taps `lo..hi` that land inside the input, and how many
/// land inside the padded input (what `count_include_pad` counts).
fn axis_taps(
    out: usize,
    size: usize,
    k: usize,
    stride: usize,
    dil: usize,
    pad_lo: usize,
    pad_hi: usize,
) -> Vec<(usize, usize, usize)> {
    (0..out)
        .map(|o| {
            let at = |t: usize| (o * stride + t * dil) as isize - pad_lo as isize;
            let inside = |t: usize| at(t) >= 0 && at(t) < size as isize;
            let padded = (0..k)
                .filter(|&t| at(t) >= -(pad_lo as isize) && at(t) < (size + pad_hi) as isize)
                .count();
            let lo = (0..k).find(|&t| inside(t)).unwrap_or(k);
            let hi = (lo..k).find(|&t| !inside(t)).unwrap_or(k);
            (lo, hi.max(lo), padded)
        })
        .collect()
}

/// [`pool2d`] on channels-last data: `x` `[N, H, W, C]` → `[N, oh, ow, C]`, every tap a
/// contiguous run of C channels. Same taps, order and counts as [`pool2d`], so same results.
pub fn pool2d_nhwc(x: &[f32], shape: [usize; 4], pool: &Pool) -> Result<(Vec<f32>, [usize; 4])> {
    pool2d_nhwc_at(x, shape, pool, super::Simd::detect())
}

/// [`pool2d_nhwc`] at a given SIMD level (every level gives the same bits; tests compare them).
pub fn pool2d_nhwc_at(x: &[f32], shape: [usize; 4], pool: &Pool, level: super::Simd) -> Result<(Vec<f32>, [usize; 4])> {
    assert!(level.supported(), "SIMD level {level:?} not supported by this CPU");
    let [n, h, w, c] = shape;
    let win = &pool.window;
    let geo = win.resolve([h, w])?;
    let [oh, ow] = geo.out;
    let ys = axis_taps(
        oh,
        h,
        win.kernel[0],
        win.strides[0],
        win.dilations[0],
        geo.pads[0],
        geo.pads[2],
    );
    let xs = axis_taps(
        ow,
        w,
        win.kernel[1],
        win.strides[1],
        win.dilations[1],
        geo.pads[1],
        geo.pads[3],
    );
    let mut out = vec![0f32; n * oh * ow * c];
    if out.is_empty() {
        return Ok((out, [n, oh, ow, c]));
    }
    let max = matches!(pool.kind, PoolKind::Max);
    let (sh, sw) = (win.strides[0], win.strides[1]);
    let (dh, dw) = (win.dilations[0], win.dilations[1]);
    let (pt, pl) = (geo.pads[0], geo.pads[1]);
    // tasks of about 4096 outputs, at least [`super::PAR_WORK`] of work each (on the team: the
    // convolutions around a pooling layer run on it, and its helpers spin between loops)
    let rows = (4096 / (ow * c).max(1)).max(1);
    let rows_per_task = rows * super::min_chunks(rows * ow * c * win.kernel[0] * win.kernel[1]);
    super::team::for_chunks(&mut out, rows_per_task * ow * c, |task, dst| {
        let mut sy = Vec::with_capacity(win.kernel[0]);
        for (k, drow) in dst.chunks_exact_mut(ow * c).enumerate() {
            let row = task * rows_per_task + k;
            let (img, y) = (row / oh, row % oh);
            let src = &x[img * h * w * c..(img + 1) * h * w * c];
            let (i0, i1, ipad) = ys[y];
            #[cfg(target_arch = "x86_64")]
            if level >= super::Simd::Avx2 {
                sy.clear();
                sy.extend((i0..i1).map(|i| y * sh + i * dh - pt));
                let geo = RowGeo {
                    w,
                    c,
                    kw: win.kernel[1],
                    sw,
                    dw,
                    pl,
                    max,
                    include_pad: matches!(
                        pool.kind,
                        PoolKind::Avg {
                            count_include_pad: true
                        }
                    ),
                };
                // SAFETY: the level was detected (AVX-512F, or AVX2); every tap in `xs` and
                // `sy` lies inside `src`.
                unsafe {
                    match level {
                        super::Simd::Avx512 => pool_row_avx512(src, &sy, ipad, &xs, &geo, drow),
                        _ if max => pool_row_avx2::<true>(src, &sy, ipad, &xs, &geo, drow),
                        _ => pool_row_avx2::<false>(src, &sy, ipad, &xs, &geo, drow),
                    }
                }
                continue;
            }
            for ((xo, acc), &(j0, j1, jpad)) in drow.chunks_exact_mut(c).enumerate().zip(&xs) {
                acc.fill(if max { f32::NEG_INFINITY } else { 0.0 });
                for i in i0..i1 {
                    let sy = y * sh + i * dh - pt;
                    for j in j0..j1 {
                        let sx = xo * sw + j * dw - pl;
                        let v = &src[(sy * w + sx) * c..][..c];
                        if max {
                            acc.iter_mut().zip(v).for_each(|(a, &v)| *a = a.max(v));
                        } else {
                            acc.iter_mut().zip(v).for_each(|(a, &v)| *a += v);
                        }
                    }
                }
                let count = match pool.kind {
                    PoolKind::Max => continue,
                    PoolKind::Avg {
                        count_include_pad: true,
                    } => ipad * jpad,
                    PoolKind::Avg {
                        count_include_pad: false,
                    } => (i1 - i0) * (j1 - j0),
                };
                let d = count.max(1) as f32;
                acc.iter_mut().for_each(|a| *a /= d);
            }
        }
    });
    Ok((out, [n, oh, ow, c]))
}

struct RowGeo {
    w: usize,
    c: usize,
    /// The window's width.
    kw: usize,
    sw: usize,
    dw: usize,
    pl: usize,
    max: bool,
    include_pad: bool,
}

impl RowGeo {
    /// An average window's divisor: its taps inside the image, or with `count_include_pad` its
    /// taps padding included (at least 1).
    fn count(&self, rows: usize, rows_pad: usize, cols: usize, cols_pad: usize) -> f32 {
        let d = if self.include_pad {
            rows_pad * cols_pad
        } else {
            rows * cols
        };
        d.max(1) as f32
    }
}

/// One output row of [`pool2d_nhwc`]: 16 channels per vector (a masked tail), the taps in the
/// same order. `max(v, acc)` keeps `acc` when `v` is NaN, as `f32::max` does.
///
/// # Safety
/// AVX-512F; the input rows `sy` and the columns of `xs` lie inside `src` (`[H, W, C]`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn pool_row_avx512(
    src: &[f32],
    sy: &[usize],
    ipad: usize,
    xs: &[(usize, usize, usize)],
    g: &RowGeo,
    drow: &mut [f32],
) {
    use std::arch::x86_64::*;
    let c = g.c;
    let init = _mm512_set1_ps(if g.max { f32::NEG_INFINITY } else { 0.0 });
    for (xo, &(j0, j1, jpad)) in xs.iter().enumerate() {
        let div = _mm512_set1_ps(g.count(sy.len(), ipad, j1 - j0, jpad));
        for c0 in (0..c).step_by(16) {
            let n = (c - c0).min(16);
            let mask = if n == 16 { u16::MAX } else { (1u16 << n) - 1 };
            let mut acc = init;
            for &y in sy {
                for j in j0..j1 {
                    let sx = xo * g.sw + j * g.dw - g.pl;
                    let v = _mm512_maskz_loadu_ps(mask, src.as_ptr().add((y * g.w + sx) * c + c0));
                    acc = if g.max {
                        _mm512_max_ps(v, acc)
                    } else {
                        _mm512_add_ps(acc, v)
                    };
                }
            }
            if !g.max {
                acc = _mm512_div_ps(acc, div);
            }
            _mm512_mask_storeu_ps(drow.as_mut_ptr().add(xo * c + c0), mask, acc);
        }
    }
}

/// [`pool_row_avx512`] at AVX2: 8 channels per vector, the same taps in the same order, so the
/// same bits. A pixel whose 2 × 2 or 3 × 3 window lies whole inside the image takes its taps
/// from a fixed-size array (the tap loop unrolled: a load and a max or add per tap); others
/// one at a time.
///
/// # Safety
/// AVX2; the input rows `sy` and the columns of `xs` lie inside `src` (`[H, W, C]`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pool_row_avx2<const MAX: bool>(
    src: &[f32],
    sy: &[usize],
    ipad: usize,
    xs: &[(usize, usize, usize)],
    g: &RowGeo,
    drow: &mut [f32],
) {
    let c = g.c;
    let mut wide = Vec::new();
    let mut xo = 0;
    while xo < xs.len() {
        let (j0, j1, jpad) = xs[xo];
        let whole = |t: &(usize, usize, usize)| t.0 == 0 && t.1 == g.kw;
        if whole(&xs[xo]) && matches!((sy.len(), g.kw), (2, 2) | (3, 3)) {
            // a run of pixels whose windows lie whole inside the image
            let run = xs[xo..].iter().take_while(|t| whole(t)).count();
            let div = g.count(sy.len(), ipad, g.kw, jpad);
            match g.kw {
                2 => fixed_run::<MAX, 2, 2>(src, [sy[0], sy[1]], xo..xo + run, g, div, drow),
                _ => fixed_run::<MAX, 3, 3>(src, [sy[0], sy[1], sy[2]], xo..xo + run, g, div, drow),
            }
            xo += run;
            continue;
        }
        let div = g.count(sy.len(), ipad, j1 - j0, jpad);
        let tap = |y: usize, j: usize| (y * g.w + xo * g.sw + j * g.dw - g.pl) * c;
        wide.clear();
        wide.extend(
            sy.iter()
                .flat_map(|&y| (j0..j1).map(move |j| (y, j)))
                .map(|(y, j)| tap(y, j)),
        );
        pixel_avx2::<MAX>(src, &wide, div, c, xo * c, drow);
        xo += 1;
    }
}

/// Pixels `pixels` of a row of [`pool_row_avx2`] whose `KH × KW` windows (input rows `sy`) lie
/// whole inside the image, with the taps in the order of [`pixel_avx2`].
///
/// # Safety
/// AVX2; as [`pool_row_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fixed_run<const MAX: bool, const KH: usize, const KW: usize>(
    src: &[f32],
    sy: [usize; KH],
    pixels: std::ops::Range<usize>,
    g: &RowGeo,
    div: f32,
    drow: &mut [f32],
) {
    use std::arch::x86_64::*;
    let c = g.c;
    let rows: [*const f32; KH] = std::array::from_fn(|i| src.as_ptr().add(sy[i] * g.w * c));
    let (step, dwc) = (g.sw * c, g.dw * c);
    // the furthest float a pixel's last vector may read (its last tap's channels and the lanes past them)
    let reach = |xo: usize, c0: usize| (sy[KH - 1] * g.w + xo * g.sw + (KW - 1) * g.dw - g.pl) * c + c0 + 8;
    let init = _mm256_set1_ps(if MAX { f32::NEG_INFINITY } else { 0.0 });
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let divv = _mm256_set1_ps(div);
    for xo in pixels {
        let col = xo * step - g.pl * c;
        let at = xo * c;
        for c0 in (0..c).step_by(8) {
            let n = (c - c0).min(8);
            let plain = n == 8 || reach(xo, c0) <= src.len();
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane);
            let mut acc = init;
            for r in rows {
                for j in 0..KW {
                    acc = tap8::<MAX>(acc, r.add(col + j * dwc + c0), plain, mask);
                }
            }
            if !MAX {
                acc = _mm256_div_ps(acc, divv);
            }
            store8(drow, at + c0, n, mask, acc);
        }
    }
}

/// One output pixel of [`pool_row_avx2`]: the taps at `offs` (in order) of each 8-channel
/// vector, stored at `at` of `drow`; `div`: an average's divisor.
///
/// # Safety
/// AVX2; `offs[t] + c` lies inside `src`, `at + c` inside `drow`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn pixel_avx2<const MAX: bool>(src: &[f32], offs: &[usize], div: f32, c: usize, at: usize, drow: &mut [f32]) {
    use std::arch::x86_64::*;
    let init = _mm256_set1_ps(if MAX { f32::NEG_INFINITY } else { 0.0 });
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let furthest = offs.iter().copied().max().unwrap_or(0);
    for c0 in (0..c).step_by(8) {
        let n = (c - c0).min(8);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane);
        // lanes past `n` read from inside `src` are computed and not stored (AMD's masked
        // loads and stores cost several times a plain one)
        let plain = n == 8 || furthest + c0 + 8 <= src.len();
        let mut acc = init;
        for &o in offs {
            acc = tap8::<MAX>(acc, src.as_ptr().add(o + c0), plain, mask);
        }
        if !MAX {
            acc = _mm256_div_ps(acc, _mm256_set1_ps(div));
        }
        store8(drow, at + c0, n, mask, acc);
    }
}

/// `acc` with the 8 floats at `p` taken in: their maximum (keeping `acc` where a value is NaN,
/// as `f32::max` does) or their sum; a masked load unless `plain` (lanes outside `mask` read 0).
///
/// # Safety
/// AVX2; the 8 floats at `p` readable (`plain`), or those of `mask`'s lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn tap8<const MAX: bool>(
    acc: std::arch::x86_64::__m256,
    p: *const f32,
    plain: bool,
    mask: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let v = if plain {
        _mm256_loadu_ps(p)
    } else {
        _mm256_maskload_ps(p, mask)
    };
    if MAX {
        _mm256_max_ps(v, acc)
    } else {
        _mm256_add_ps(acc, v)
    }
}

/// The first `n ≤ 8` lanes of `acc` into `drow` at `at`: a plain store where its 8 lanes lie
/// inside `drow` (lanes past `n` land on channels of a later pixel of the row, stored after
/// this one), else a masked one (`mask`: lanes `< n`).
///
/// # Safety
/// AVX2; `at + n` lies inside `drow`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store8(
    drow: &mut [f32],
    at: usize,
    n: usize,
    mask: std::arch::x86_64::__m256i,
    acc: std::arch::x86_64::__m256,
) {
    use std::arch::x86_64::*;
    let dst = drow.as_mut_ptr().add(at);
    if n == 8 || at + 8 <= drow.len() {
        _mm256_storeu_ps(dst, acc);
    } else {
        _mm256_maskstore_ps(dst, mask, acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::op::{Padding, Window};

    /// Channels-last pooling gives [`pool2d`]'s bits: padding, ceil mode, dilation, both
    /// average counts.
    #[test]
    fn channels_last_pooling_equals_nchw_pooling() {
        let levels = crate::interp::kernels::levels_checked("channels_last_pooling_equals_nchw_pooling");
        let (n, c, h, w) = (2, 21, 7, 6); // 21 channels: whole vectors and a tail at every level
        let x: Vec<f32> = (0..n * c * h * w)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 9.0)
            .collect();
        let mut xn = vec![0f32; x.len()];
        for i in 0..n {
            for ch in 0..c {
                for p in 0..h * w {
                    xn[(i * h * w + p) * c + ch] = x[(i * c + ch) * h * w + p];
                }
            }
        }
        let kinds = [
            PoolKind::Max,
            PoolKind::Avg {
                count_include_pad: true,
            },
            PoolKind::Avg {
                count_include_pad: false,
            },
        ];
        let mut checked = 0;
        for kind in kinds {
            for &(k, s, d, pad, ceil) in &[
                (2, 2, 1, 0, false),
                (3, 2, 1, 1, true),
                (3, 1, 2, 2, false),
                (3, 3, 1, 1, true),
            ] {
                let pool = Pool {
                    kind: kind.clone(),
                    window: Window {
                        kernel: [k, k],
                        strides: [s, s],
                        dilations: [d, d],
                        padding: Padding::Explicit([pad, pad, pad + 1, pad]),
                        ceil_mode: ceil,
                    },
                    nhwc: true,
                };
                let want = pool2d(&x, [n, c, h, w], &pool).unwrap();
                for &level in &levels {
                    let (got, shape) = pool2d_nhwc_at(&xn, [n, h, w, c], &pool, level).unwrap();
                    let ws = want.shape();
                    assert_eq!(shape, [ws[0], ws[2], ws[3], ws[1]]);
                    for i in 0..n {
                        for ch in 0..c {
                            for p in 0..ws[2] * ws[3] {
                                let a = want.as_slice().unwrap()[(i * c + ch) * ws[2] * ws[3] + p];
                                let b = got[(i * ws[2] * ws[3] + p) * c + ch];
                                assert_eq!(
                                    a.to_bits(),
                                    b.to_bits(),
                                    "{kind:?} k={k} s={s} d={d} pad={pad} ceil={ceil} {level:?}"
                                );
                            }
                        }
                    }
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 12);
    }
}
