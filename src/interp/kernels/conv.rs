//! 2-D convolution as im2col + GEMM, per image and per group. Images run in parallel when the
//! batch can keep every thread busy; otherwise the GEMM itself is parallel.

use super::gemm::{matmul, matmul_packed, Mat, PackedA};
use super::im2col::{im2col, im2col_strided};
use crate::error::Result;
use crate::ir::op::{Conv, Padding, Window};
#[cfg(test)]
use crate::ir::window::{pruned_taps, slice_taps};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

/// Outputs per image below which a batch shares one GEMM.
const MERGE_BELOW: usize = 1024;
/// Values of the shared im2col matrix at most (16 MiB).
const MERGE_COLS: usize = 4 << 20;

/// Output columns below which the packed GEMM is not used (its 32-column tiles would be mostly
/// masked off; the `gemm` crate handles narrow products better).
const PACKED_MIN_N: usize = 64;

/// Output channels per group below which the packed GEMM is not used (its 12-row blocks would
/// be mostly padding).
const PACKED_MIN_M: usize = 24;

/// The weights of each group packed for [`matmul_packed`], when this CPU has AVX-512 and the
/// groups are wide enough.
pub fn pack_weights(w: &[f32], m: usize, conv: &Conv, c: usize) -> Option<Vec<PackedA>> {
    let g = conv.group.max(1);
    let (mg, k) = (m / g, c / g * conv.window.kernel[0] * conv.window.kernel[1]);
    if !PackedA::supported() || super::Simd::detect() != super::Simd::Avx512 || mg < PACKED_MIN_M || w.len() < m * k {
        return None;
    }
    Some(
        (0..g)
            .map(|gi| PackedA::new(&w[gi * mg * k..(gi + 1) * mg * k], mg, k))
            .collect(),
    )
}

/// `x`: `[N, C, H, W]` (standard layout), `w`: `[M, C/group, kh, kw]`, `bias`: `[M]`; `packed`:
/// the same weights from [`pack_weights`] (then the blocked GEMM runs).
pub fn conv2d(
    x: &[f32],
    xshape: [usize; 4],
    w: &[f32],
    m: usize,
    bias: Option<&[f32]>,
    conv: &Conv,
    packed: Option<&[PackedA]>,
) -> Result<ArrayD<f32>> {
    let [n, c, h, wd] = xshape;
    let win = &conv.window;
    let geo = win.resolve([h, wd])?;
    let g = conv.group;
    let (cg, mg) = (c / g, m / g);
    let [kh, kw] = win.kernel;
    let k = cg * kh * kw;
    let p = geo.out[0] * geo.out[1];
    let pointwise = k == cg
        && win.strides == [1, 1]
        && geo.pads == [0; 4]
        && matches!(win.padding, Padding::Explicit(_) | Padding::Valid);
    let mut out = vec![0f32; n * m * p];
    // Small outputs: one GEMM over several images (their columns side by side) keeps the GEMM
    // wide where per-image GEMMs would be a few columns each.
    if g == 1 && n > 1 && p < MERGE_BELOW {
        let per = (MERGE_COLS / (k * p).max(1)).clamp(1, n);
        let mut cols = Vec::new();
        let mut tmp = Vec::new();
        for i0 in (0..n).step_by(per) {
            let nb = per.min(n - i0);
            let np = nb * p;
            cols.resize(k * np, 0.0);
            tmp.resize(m * np, 0.0);
            for b in 0..nb {
                let xi = &x[(i0 + b) * c * h * wd..(i0 + b + 1) * c * h * wd];
                im2col_strided(xi, c, [h, wd], win, &geo, &mut cols[b * p..], np);
            }
            if let Some(bias) = bias {
                for (row, &bv) in tmp.chunks_mut(np).zip(bias) {
                    row.fill(bv);
                }
            }
            match packed.filter(|_| np >= PACKED_MIN_N) {
                Some(pa) => matmul_packed(&pa[0], np, &cols, &mut tmp, bias.is_some(), true),
                None => matmul(
                    m,
                    np,
                    k,
                    Mat::row_major(w, k),
                    Mat::row_major(&cols, np),
                    &mut tmp,
                    np,
                    bias.is_some(),
                    1.0,
                    true,
                ),
            }
            for (mi, row) in tmp.chunks(np).enumerate() {
                for b in 0..nb {
                    out[((i0 + b) * m + mi) * p..][..p].copy_from_slice(&row[b * p..(b + 1) * p]);
                }
            }
        }
        return Ok(ArrayD::from_shape_vec(IxDyn(&[n, m, geo.out[0], geo.out[1]]), out).expect("conv output size"));
    }
    let image = |img: usize, dst: &mut [f32], cols: &mut Vec<f32>, parallel_gemm: bool| {
        let xi = &x[img * c * h * wd..(img + 1) * c * h * wd];
        for gi in 0..g {
            let xg = &xi[gi * cg * h * wd..(gi + 1) * cg * h * wd];
            let b: &[f32] = if pointwise {
                xg
            } else {
                cols.resize(k * p, 0.0);
                im2col(xg, cg, [h, wd], win, &geo, cols);
                cols
            };
            let dst_g = &mut dst[gi * mg * p..(gi + 1) * mg * p];
            if let Some(bias) = bias {
                for (row, &bv) in dst_g.chunks_mut(p).zip(&bias[gi * mg..(gi + 1) * mg]) {
                    row.fill(bv);
                }
            }
            if let Some(pa) = packed.filter(|_| p >= PACKED_MIN_N) {
                matmul_packed(&pa[gi], p, b, dst_g, bias.is_some(), parallel_gemm);
                continue;
            }
            let wg = Mat::row_major(&w[gi * mg * k..(gi + 1) * mg * k], k);
            matmul(
                mg,
                p,
                k,
                wg,
                Mat::row_major(b, p),
                dst_g,
                p,
                bias.is_some(),
                1.0,
                parallel_gemm,
            );
        }
    };
    if n >= rayon::current_num_threads() && n > 1 {
        out.par_chunks_mut(m * p)
            .enumerate()
            .for_each_init(Vec::new, |cols, (img, dst)| image(img, dst, cols, false));
    } else {
        let mut cols = Vec::new();
        for (img, dst) in out.chunks_mut(m * p).enumerate() {
            image(img, dst, &mut cols, true);
        }
    }
    Ok(ArrayD::from_shape_vec(IxDyn(&[n, m, geo.out[0], geo.out[1]]), out).expect("conv output size"))
}

/// `[N, C, H, W]` → `[N, oh·ow, C·kh·kw]`: each row one receptive field (the Im2Col op).
pub fn im2col_rows(x: &[f32], xshape: [usize; 4], win: &Window) -> Result<ArrayD<f32>> {
    let [n, c, h, w] = xshape;
    let geo = win.resolve([h, w])?;
    let k = c * win.kernel[0] * win.kernel[1];
    let p = geo.out[0] * geo.out[1];
    let mut out = vec![0f32; n * p * k];
    out.par_chunks_mut((p * k).max(1))
        .enumerate()
        .for_each_init(Vec::new, |cols, (img, dst)| {
            cols.resize(k * p, 0.0);
            im2col(&x[img * c * h * w..(img + 1) * c * h * w], c, [h, w], win, &geo, cols);
            // cols is (k × p); the op's rows are its columns.
            for (kk, col_row) in cols.chunks(p.max(1)).enumerate() {
                for (pp, &v) in col_row.iter().enumerate() {
                    dst[pp * k + kk] = v;
                }
            }
        });
    Ok(ArrayD::from_shape_vec(IxDyn(&[n, p, k]), out).expect("im2col output size"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pq::rng::Rng;

    /// Dropping the taps that only meet padding gives the same outputs.
    #[test]
    fn pruned_taps_give_the_same_outputs() {
        let mut rng = Rng::new(6);
        let mut pruned = 0;
        for &(hw, k, stride, dil, pad) in &[
            ([1, 1], 3, 1, 1, 1),
            ([2, 2], 3, 2, 1, 1),
            ([2, 3], 3, 1, 1, 1),
            ([1, 4], 3, 1, 2, 2),
            ([2, 2], 5, 1, 1, 2),
            ([7, 7], 3, 1, 1, 1),
        ] {
            let conv = Conv {
                window: Window {
                    kernel: [k, k],
                    strides: [stride, stride],
                    dilations: [dil, dil],
                    padding: Padding::Explicit([pad; 4]),
                    ceil_mode: false,
                },
                group: 1,
                nhwc: false,
                relu: false,
                relu_max: None,
            };
            let (n, c, m) = (3, 5, 4);
            let xs = [n, c, hw[0], hw[1]];
            let x: Vec<f32> = (0..xs.iter().product()).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let ws = [m, c, k, k];
            let w: Vec<f32> = (0..ws.iter().product()).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let b: Vec<f32> = (0..m).map(|i| i as f32).collect();
            let full = conv2d(&x, xs, &w, m, Some(&b), &conv, None).unwrap();
            let Some((small, first)) = pruned_taps(&conv, hw).unwrap() else {
                assert!(hw == [7, 7] || hw == [2, 3], "{hw:?} uses every tap");
                continue;
            };
            pruned += 1;
            let ws2 = slice_taps(&w, &ws, first, small.window.kernel);
            let got = conv2d(&x, xs, &ws2, m, Some(&b), &small, None).unwrap();
            assert_eq!(got.shape(), full.shape());
            let err = got.iter().zip(full.iter()).fold(0f32, |e, (a, b)| e.max((a - b).abs()));
            assert!(err < 1e-5, "{hw:?} k={k} s={stride} d={dil}: {err}");
        }
        assert_eq!(pruned, 4);
    }

    /// The packed blocked GEMM path gives the same outputs as the `gemm` crate path, per image
    /// and with the batch merged into one GEMM, grouped too.
    #[test]
    fn packed_weights_give_the_same_outputs() {
        if !PackedA::supported() || crate::interp::kernels::Simd::detect() != crate::interp::kernels::Simd::Avx512 {
            eprintln!(
                "packed_weights_give_the_same_outputs: packed conv not checked: no AVX-512F (or TABCONV_SIMD caps it)"
            );
            return;
        }
        eprintln!("packed_weights_give_the_same_outputs: checked the packed conv (AVX-512F)");
        let mut rng = Rng::new(8);
        for &(n, c, hw, m, k, group) in &[
            (3, 8, 9, 32, 3, 1),
            (1, 16, 40, 48, 3, 1),
            (2, 8, 6, 48, 1, 2),
            (5, 4, 2, 24, 3, 1),
        ] {
            let conv = Conv {
                window: Window {
                    kernel: [k, k],
                    strides: [1, 1],
                    dilations: [1, 1],
                    padding: Padding::Explicit([k / 2; 4]),
                    ceil_mode: false,
                },
                group,
                nhwc: false,
                relu: false,
                relu_max: None,
            };
            let xs = [n, c, hw, hw];
            let x: Vec<f32> = (0..xs.iter().product()).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let w: Vec<f32> = (0..m * c / group * k * k)
                .map(|_| rng.next_f64() as f32 - 0.5)
                .collect();
            let b: Vec<f32> = (0..m).map(|i| i as f32 * 0.1).collect();
            let plain = conv2d(&x, xs, &w, m, Some(&b), &conv, None).unwrap();
            let packed = pack_weights(&w, m, &conv, c).expect("wide enough to pack");
            let fast = conv2d(&x, xs, &w, m, Some(&b), &conv, Some(&packed)).unwrap();
            let err = fast
                .iter()
                .zip(plain.iter())
                .fold(0f32, |e, (a, b)| e.max((a - b).abs()));
            assert!(err < 1e-4, "n={n} c={c} hw={hw} m={m} k={k} g={group}: {err}");
        }
    }
}
