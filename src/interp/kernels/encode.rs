//! PQ encoders: map each row's subvectors to prototype indices.
//! - argmin: nearest prototype by `‖x−p‖² = ‖x‖² − 2x·p + ‖p‖²` (‖x‖² is constant per row and
//!   dropped); the `x·p` products are a small GEMM computed tile by tile, one SIMD lane per row;
//! - tree: `depth` comparisons per codebook (MADDNESS hash tree).
//!
//! Rows come either from a row-major matrix or, for convolutions, straight from the NCHW input
//! (each row is the receptive field of one output position, gathered into a small tile in L1, so
//! the full im2col matrix is never built). Both give the same codes for the same rows.
//!
//! The code is compiled for AVX-512, AVX2 and baseline x86-64 and picked at run time. Rust never
//! contracts `a·b + c` into an FMA and every lane accumulates in the same order, so all variants
//! give bit-identical codes. Ties go to the lowest prototype index.

// Lane-indexed loops (`for l in 0..LANES`) are the point here: they vectorise across rows.
#![allow(clippy::needless_range_loop)]

use crate::ir::op::Window;
use crate::ir::window::Geometry;
use crate::pq::Subspaces;
use rayon::prelude::*;

/// Rows per parallel task.
const BLOCK: usize = 256;
/// Rows encoded together: one SIMD lane per row.
const LANES: usize = 16;

/// Where an encoder's rows come from.
pub enum Rows<'a> {
    /// Row-major `rows × d`.
    Matrix { x: &'a [f32], d: usize },
    /// The implicit im2col rows of an NCHW batch: row `n·oh·ow + y·ow + x` is the receptive field
    /// of output position `(y, x)` of image `n`, ordered `(c, i, j)`.
    Conv {
        x: &'a [f32],
        shape: [usize; 4],
        win: &'a Window,
        geo: Geometry,
    },
}

impl Rows<'_> {
    pub fn d(&self) -> usize {
        match self {
            Rows::Matrix { d, .. } => *d,
            Rows::Conv { shape, win, .. } => shape[1] * win.kernel[0] * win.kernel[1],
        }
    }
    pub fn count(&self) -> usize {
        match self {
            Rows::Matrix { x, d } => x.len() / d.max(&1),
            Rows::Conv { shape, geo, .. } => shape[0] * geo.out[0] * geo.out[1],
        }
    }
    /// Copy columns `cols` of rows `r0 .. r0 + lanes` into `xt[column][lane]`; lanes past
    /// `lanes` repeat the last row.
    #[inline(always)]
    fn fill(&self, r0: usize, lanes: usize, cols: impl Iterator<Item = usize> + Clone, xt: &mut [[f32; LANES]]) {
        match self {
            Rows::Matrix { x, d } => {
                for l in 0..LANES {
                    let r = r0 + l.min(lanes - 1);
                    let row = &x[r * d..(r + 1) * d];
                    for j in cols.clone() {
                        xt[j][l] = row[j];
                    }
                }
            }
            Rows::Conv { x, shape, win, geo } => {
                let [_, c_in, h, w] = *shape;
                let [kh, kw] = win.kernel;
                let p = geo.out[0] * geo.out[1];
                let (mut img, mut y0, mut x0) = ([0usize; LANES], [0isize; LANES], [0isize; LANES]);
                for l in 0..LANES {
                    let r = r0 + l.min(lanes - 1);
                    let pos = r % p;
                    img[l] = r / p;
                    y0[l] = ((pos / geo.out[1]) * win.strides[0]) as isize - geo.pads[0] as isize;
                    x0[l] = ((pos % geo.out[1]) * win.strides[1]) as isize - geo.pads[1] as isize;
                }
                // All lanes on one output row with unit stride: each tile column is a contiguous run.
                let run = lanes == LANES
                    && win.strides[1] == 1
                    && img.iter().all(|&i| i == img[0])
                    && y0.iter().all(|&y| y == y0[0])
                    && x0.windows(2).all(|p| p[1] == p[0] + 1);
                for cj in cols {
                    let (c, i, j) = (cj / (kh * kw), cj / kw % kh, cj % kw);
                    let col = &mut xt[cj];
                    let (dy, dx) = ((i * win.dilations[0]) as isize, (j * win.dilations[1]) as isize);
                    let (iy, ix) = (y0[0] + dy, x0[0] + dx);
                    if run && iy >= 0 && iy < h as isize && ix >= 0 && ix + LANES as isize <= w as isize {
                        let start = ((img[0] * c_in + c) * h + iy as usize) * w + ix as usize;
                        col.copy_from_slice(&x[start..start + LANES]);
                        continue;
                    }
                    for l in 0..LANES {
                        let (iy, ix) = (y0[l] + dy, x0[l] + dx);
                        let inside = iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize;
                        col[l] = if inside {
                            x[((img[l] * c_in + c) * h + iy as usize) * w + ix as usize]
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// The codebooks of one layer.
pub enum Codebooks<'a> {
    /// `protos`: `[c][k][s]`
    Argmin { k: usize, protos: &'a [f32] },
    /// `dims`: `[c][depth]` split offsets within each subspace; `thresholds`: `[c][2^depth − 1]`
    /// in heap order.
    Tree {
        depth: usize,
        dims: &'a [usize],
        thresholds: &'a [f32],
    },
}

/// Encode every row: `codes` is `rows × c` (one byte per code).
pub fn encode(rows: &Rows, sub: Subspaces, cb: &Codebooks, codes: &mut [u8]) {
    let c_n = sub.count();
    assert_eq!(sub.d, rows.d(), "row length does not match the subspaces");
    assert_eq!(codes.len(), rows.count() * c_n);
    let prepared = match cb {
        Codebooks::Argmin { k, protos } => {
            assert_eq!(protos.len(), c_n * k * sub.s);
            Prepared::Argmin {
                k: *k,
                pt: protos.to_vec(),
                norms: protos.chunks(sub.s).map(|p| p.iter().map(|v| v * v).sum()).collect(),
            }
        }
        Codebooks::Tree {
            depth,
            dims,
            thresholds,
        } => {
            assert_eq!(dims.len(), c_n * depth);
            assert_eq!(thresholds.len(), c_n * ((1 << depth) - 1));
            assert!(dims.iter().all(|&d| d < sub.s), "split dimension outside its subspace");
            let mut cols: Vec<usize> = (0..c_n)
                .flat_map(|c| dims[c * depth..(c + 1) * depth].iter().map(move |&d| c * sub.s + d))
                .filter(|&col| col < sub.d)
                .collect();
            cols.sort_unstable();
            cols.dedup();
            Prepared::Tree {
                depth: *depth,
                dims,
                thresholds,
                cols,
            }
        }
    };
    let job = Job {
        rows,
        sub,
        prepared: &prepared,
    };
    codes.par_chunks_mut(BLOCK * c_n).enumerate().for_each(|(bi, out)| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                return unsafe { encode_avx512(&job, bi * BLOCK, out) };
            }
            if is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                return unsafe { encode_avx2(&job, bi * BLOCK, out) };
            }
        }
        encode_block(&job, bi * BLOCK, out)
    });
}

enum Prepared<'a> {
    Argmin {
        k: usize,
        pt: Vec<f32>,
        norms: Vec<f32>,
    },
    /// `cols`: the row columns the trees compare (the only ones gathered).
    Tree {
        depth: usize,
        dims: &'a [usize],
        thresholds: &'a [f32],
        cols: Vec<usize>,
    },
}

struct Job<'a> {
    rows: &'a Rows<'a>,
    sub: Subspaces,
    prepared: &'a Prepared<'a>,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn encode_avx512(job: &Job, r0: usize, out: &mut [u8]) {
    encode_block(job, r0, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn encode_avx2(job: &Job, r0: usize, out: &mut [u8]) {
    encode_block(job, r0, out)
}

#[inline(always)]
fn encode_block(job: &Job, r0: usize, out: &mut [u8]) {
    let sub = job.sub;
    let c_n = sub.count();
    let n = out.len() / c_n;
    let mut xt = vec![[0f32; LANES]; sub.d];
    for g in (0..n).step_by(LANES) {
        let lanes = (n - g).min(LANES);
        match job.prepared {
            Prepared::Argmin { .. } => job.rows.fill(r0 + g, lanes, 0..sub.d, &mut xt),
            Prepared::Tree { cols, .. } => job.rows.fill(r0 + g, lanes, cols.iter().copied(), &mut xt),
        }
        for c in 0..c_n {
            let code = match job.prepared {
                Prepared::Argmin { k, pt, norms } => argmin_tile(&xt, sub, c, *k, pt, norms),
                Prepared::Tree {
                    depth,
                    dims,
                    thresholds,
                    ..
                } => tree_tile(&xt, sub, c, *depth, dims, thresholds),
            };
            for l in 0..lanes {
                out[(g + l) * c_n + c] = code[l] as u8;
            }
        }
    }
}

/// Nearest prototype of codebook `c` for each lane's row.
#[inline(always)]
fn argmin_tile(xt: &[[f32; LANES]], sub: Subspaces, c: usize, k: usize, protos: &[f32], norms: &[f32]) -> [u32; LANES] {
    let mut best_d = [f32::INFINITY; LANES];
    let mut best_k = [0u32; LANES];
    let range = sub.range(c);
    for kk in 0..k {
        let p = &protos[(c * k + kk) * sub.s..(c * k + kk + 1) * sub.s];
        let mut acc = [0f32; LANES];
        for (pj, col) in p.iter().zip(range.clone()) {
            let xc = &xt[col];
            for l in 0..LANES {
                acc[l] += xc[l] * pj;
            }
        }
        let norm = norms[c * k + kk];
        for l in 0..LANES {
            let dist = norm - 2.0 * acc[l];
            let better = dist < best_d[l];
            best_d[l] = if better { dist } else { best_d[l] };
            best_k[l] = if better { kk as u32 } else { best_k[l] };
        }
    }
    best_k
}

/// Leaf of codebook `c`'s tree for each lane's row (padded dimensions read as 0).
#[inline(always)]
fn tree_tile(xt: &[[f32; LANES]], sub: Subspaces, c: usize, depth: usize, dims: &[usize], thr: &[f32]) -> [u32; LANES] {
    let nodes = (1 << depth) - 1;
    let th = &thr[c * nodes..(c + 1) * nodes];
    let mut idx = [0u32; LANES];
    for lev in 0..depth {
        let col = c * sub.s + dims[c * depth + lev];
        let base = (1u32 << lev) - 1;
        let zero = [0f32; LANES];
        let xc = if col < sub.d { &xt[col] } else { &zero };
        for l in 0..LANES {
            idx[l] = 2 * idx[l] + (xc[l] > th[(base + idx[l]) as usize]) as u32;
        }
    }
    idx
}

/// Convenience: argmin encoding of row-major rows.
pub fn encode_argmin(x: &[f32], rows: usize, sub: Subspaces, k: usize, protos: &[f32], codes: &mut [u8]) {
    assert_eq!(x.len(), rows * sub.d);
    encode(
        &Rows::Matrix { x, d: sub.d },
        sub,
        &Codebooks::Argmin { k, protos },
        codes,
    )
}

/// Convenience: tree encoding of row-major rows.
#[allow(clippy::too_many_arguments)]
pub fn encode_tree(
    x: &[f32],
    rows: usize,
    sub: Subspaces,
    depth: usize,
    dims: &[usize],
    thresholds: &[f32],
    codes: &mut [u8],
) {
    assert_eq!(x.len(), rows * sub.d);
    encode(
        &Rows::Matrix { x, d: sub.d },
        sub,
        &Codebooks::Tree {
            depth,
            dims,
            thresholds,
        },
        codes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::op::Padding;
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
        let dims: Vec<usize> = (0..c_n * 4).map(|i| i % 4).collect();
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

    #[test]
    fn conv_rows_encode_like_materialized_im2col_rows() {
        let wide = Window {
            kernel: [3, 3],
            strides: [1, 1],
            dilations: [1, 1],
            padding: Padding::Explicit([1; 4]),
            ceil_mode: false,
        };
        conv_case([2, 2, 9, 40], wide);
        let odd = Window {
            kernel: [3, 2],
            strides: [2, 1],
            dilations: [1, 2],
            padding: Padding::Explicit([1, 0, 2, 1]),
            ceil_mode: false,
        };
        conv_case([2, 3, 7, 6], odd);
    }

    fn conv_case(shape: [usize; 4], win: Window) {
        let mut rng = Rng::new(8);
        let x: Vec<f32> = (0..shape.iter().product()).map(|_| rng.next_f64() as f32).collect();
        let geo = win.resolve([shape[2], shape[3]]).unwrap();
        let rows = crate::interp::kernels::conv::im2col_rows(&x, shape, &win).unwrap();
        let d = shape[1] * win.kernel[0] * win.kernel[1];
        let sub = Subspaces { d, s: 6 };
        let (k, c_n) = (16, sub.count());
        let protos: Vec<f32> = (0..c_n * k * 6).map(|_| rng.next_f64() as f32).collect();
        let n_rows = rows.len() / d;
        let mut a = vec![0u8; n_rows * c_n];
        let mut b = vec![0u8; n_rows * c_n];
        encode_argmin(rows.as_slice().unwrap(), n_rows, sub, k, &protos, &mut a);
        encode(
            &Rows::Conv {
                x: &x,
                shape,
                win: &win,
                geo,
            },
            sub,
            &Codebooks::Argmin { k, protos: &protos },
            &mut b,
        );
        assert_eq!(a, b);
        let dims: Vec<usize> = (0..c_n * 4).map(|i| (i * 5) % 6).collect();
        let thr: Vec<f32> = (0..c_n * 15).map(|_| rng.next_f64() as f32).collect();
        let tree = Codebooks::Tree {
            depth: 4,
            dims: &dims,
            thresholds: &thr,
        };
        encode_tree(rows.as_slice().unwrap(), n_rows, sub, 4, &dims, &thr, &mut a);
        encode(
            &Rows::Conv {
                x: &x,
                shape,
                win: &win,
                geo,
            },
            sub,
            &tree,
            &mut b,
        );
        assert_eq!(a, b);
    }
}
