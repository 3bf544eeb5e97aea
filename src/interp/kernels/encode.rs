//! PQ encoders: map each row's subvectors to prototype indices.
//! - argmin: nearest prototype by `‖x−p‖² = ‖x‖² − 2x·p + ‖p‖²`; the `x·p` products for all
//!   rows of a block come from one GEMM per codebook (‖x‖² is constant per row and dropped);
//! - tree: `depth` comparisons per codebook (MADDNESS hash tree).
//!
//! Ties go to the lowest prototype index.

use super::gemm::{matmul, Mat};
use crate::pq::Subspaces;
use rayon::prelude::*;

const BLOCK: usize = 256;

/// `x`: `rows × d` row-major; `protos`: `[c][k][s]`; `codes`: `rows × c`.
pub fn encode_argmin(x: &[f32], rows: usize, sub: Subspaces, k: usize, protos: &[f32], codes: &mut [u8]) {
    let (d, s, c_n) = (sub.d, sub.s, sub.count());
    assert_eq!(x.len(), rows * d);
    assert_eq!(protos.len(), c_n * k * s);
    assert_eq!(codes.len(), rows * c_n);
    let norms: Vec<f32> = protos.chunks(s).map(|p| p.iter().map(|v| v * v).sum()).collect();
    codes
        .par_chunks_mut(BLOCK * c_n)
        .enumerate()
        .for_each_init(Vec::new, |dots, (bi, out)| {
            let r0 = bi * BLOCK;
            let n = out.len() / c_n;
            dots.resize(n * k, 0.0);
            for c in 0..c_n {
                let r = sub.range(c);
                let a = Mat {
                    data: &x[r0 * d + r.start..],
                    rs: d,
                    cs: 1,
                };
                let p = Mat::row_major(&protos[c * k * s..(c + 1) * k * s], s).transposed();
                matmul(n, k, r.len(), a, p, dots, k, false, 1.0, false);
                let pn = &norms[c * k..(c + 1) * k];
                for i in 0..n {
                    let row = &dots[i * k..(i + 1) * k];
                    let mut best = (0usize, f32::INFINITY);
                    for j in 0..k {
                        let dist = pn[j] - 2.0 * row[j];
                        if dist < best.1 {
                            best = (j, dist);
                        }
                    }
                    out[i * c_n + c] = best.0 as u8;
                }
            }
        });
}

/// `dims`: `[c][depth]` split offsets within each subspace; `thresholds`: `[c][k−1]` heap order.
pub fn encode_tree(
    x: &[f32],
    rows: usize,
    sub: Subspaces,
    depth: usize,
    dims: &[usize],
    thresholds: &[f32],
    codes: &mut [u8],
) {
    let (d, c_n) = (sub.d, sub.count());
    let nodes = (1usize << depth) - 1;
    assert_eq!(dims.len(), c_n * depth);
    assert_eq!(thresholds.len(), c_n * nodes);
    assert_eq!(codes.len(), rows * c_n);
    codes.par_chunks_mut(BLOCK * c_n).enumerate().for_each(|(bi, out)| {
        for (i, row_codes) in out.chunks_mut(c_n).enumerate() {
            let row = &x[(bi * BLOCK + i) * d..][..d];
            for (c, code) in row_codes.iter_mut().enumerate() {
                let base = c * sub.s;
                let dm = &dims[c * depth..(c + 1) * depth];
                let th = &thresholds[c * nodes..(c + 1) * nodes];
                let mut idx = 0usize;
                for (l, &dim) in dm.iter().enumerate() {
                    // padded dimensions read as 0
                    let v = row.get(base + dim).copied().unwrap_or(0.0);
                    idx = 2 * idx + (v > th[(1 << l) - 1 + idx]) as usize;
                }
                *code = idx as u8;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pq::rng::Rng;

    #[test]
    fn argmin_matches_brute_force() {
        let mut rng = Rng::new(11);
        for &(rows, d, s, k) in &[(700usize, 20usize, 9usize, 16usize), (33, 8, 4, 256), (5, 3, 4, 16)] {
            let sub = Subspaces { d, s };
            let c_n = sub.count();
            let x: Vec<f32> = (0..rows * d).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
            let mut protos: Vec<f32> = (0..c_n * k * s).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
            // padded dims of the last codebook are zero, as the pass produces them
            for kk in 0..k {
                for j in sub.range(c_n - 1).len()..s {
                    protos[((c_n - 1) * k + kk) * s + j] = 0.0;
                }
            }
            let mut codes = vec![0u8; rows * c_n];
            encode_argmin(&x, rows, sub, k, &protos, &mut codes);
            for r in 0..rows {
                for c in 0..c_n {
                    let xr = &x[r * d..(r + 1) * d];
                    let dist = |j: usize| -> f64 {
                        (0..s)
                            .map(|t| {
                                let xv = xr.get(c * s + t).copied().filter(|_| c * s + t < d).unwrap_or(0.0) as f64;
                                (xv - protos[(c * k + j) * s + t] as f64).powi(2)
                            })
                            .sum()
                    };
                    let got = codes[r * c_n + c] as usize;
                    let best = (0..k).map(dist).fold(f64::INFINITY, f64::min);
                    assert!(
                        dist(got) <= best + 1e-4,
                        "row {r} codebook {c}: {} vs best {best}",
                        dist(got)
                    );
                }
            }
        }
    }

    #[test]
    fn tree_matches_reference_walk() {
        let mut rng = Rng::new(5);
        let sub = Subspaces { d: 10, s: 4 };
        let rows = 300;
        let x: Vec<f32> = (0..rows * 10).map(|_| rng.next_f64() as f32).collect();
        let c_n = sub.count();
        let dims: Vec<usize> = (0..c_n * 4).map(|i| i % if i / 4 == c_n - 1 { 2 } else { 4 }).collect();
        let thr: Vec<f32> = (0..c_n * 15).map(|_| rng.next_f64() as f32).collect();
        let mut codes = vec![0u8; rows * c_n];
        encode_tree(&x, rows, sub, 4, &dims, &thr, &mut codes);
        for r in 0..rows {
            for c in 0..c_n {
                let mut sv = [0f32; 4];
                for (j, col) in sub.range(c).enumerate() {
                    sv[j] = x[r * 10 + col];
                }
                let want = crate::pq::tree::encode(&sv, &dims[c * 4..c * 4 + 4], &thr[c * 15..c * 15 + 15]);
                assert_eq!(codes[r * c_n + c] as usize, want);
            }
        }
    }
}
