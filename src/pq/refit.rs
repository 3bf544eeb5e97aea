//! Ridge refit of lookup tables: with `A` the one-hot encoding of the calibration rows' codes,
//! find tables `T` minimising `‖A·T − Y‖² + λ‖T − T₀‖²`, where `Y` is the exact layer's output
//! on those rows and `T₀` the plain `prototype · W` tables. Solved matrix-free by conjugate
//! gradients on the normal equations `(AᵀA + λI)·T = AᵀY + λT₀`, all outputs at once.
//! Deterministic: row chunks are fixed and partial sums are added in chunk order.

use rayon::prelude::*;

const CHUNK: usize = 1024;
/// Columns per block: `A·v` and `Aᵀ·u` run one block of 16 output columns at a time, so the
/// `c·k × 16` slice of the tables they read or accumulate stays in cache (the whole `c·k × m`
/// is 16 MB for a 512-channel layer) and the threads split the columns, not the rows.
const COLS: usize = 16;

/// The column blocks of an `_ × m` matrix: `(first column, width)`.
fn col_blocks(m: usize) -> Vec<(usize, usize)> {
    (0..m).step_by(COLS).map(|j0| (j0, COLS.min(m - j0))).collect()
}

/// `out[r][m] = Σ_c v[(c·k + code[r][c])][m]`
fn a_times(codes: &[u8], c: usize, k: usize, v: &[f32], m: usize, out: &mut [f32]) {
    let rows = out.len() / m;
    let blocks: Vec<Vec<f32>> = col_blocks(m)
        .into_par_iter()
        .map(|(j0, w)| {
            // v's block, contiguous `[c·k][COLS]`
            let mut vb = vec![[0f32; COLS]; c * k];
            for (i, b) in vb.iter_mut().enumerate() {
                b[..w].copy_from_slice(&v[i * m + j0..][..w]);
            }
            // rows are independent: split them too (a classifier has a single block)
            let mut ob = vec![0f32; rows * w];
            ob.par_chunks_mut(CHUNK * w).enumerate().for_each(|(ci, chunk)| {
                for (i, o) in chunk.chunks_mut(w).enumerate() {
                    let r = ci * CHUNK + i;
                    let mut acc = [0f32; COLS];
                    for (cc, &code) in codes[r * c..(r + 1) * c].iter().enumerate() {
                        let e = &vb[cc * k + code as usize];
                        for l in 0..COLS {
                            acc[l] += e[l];
                        }
                    }
                    o.copy_from_slice(&acc[..w]);
                }
            });
            ob
        })
        .collect();
    for ((j0, w), ob) in col_blocks(m).into_iter().zip(blocks) {
        for (o, b) in out.chunks_mut(m).zip(ob.chunks(w)) {
            o[j0..j0 + w].copy_from_slice(b);
        }
    }
}

/// `out[(c·k + j)][m] = Σ_{r: code[r][c] = j} u[r][m]`: per 1024-row chunk a partial sum in row
/// order, the partials added in chunk order (the same sums whatever the column blocking).
fn at_times(codes: &[u8], rows: usize, c: usize, k: usize, u: &[f32], m: usize, out: &mut [f32]) {
    let blocks: Vec<Vec<[f32; COLS]>> = col_blocks(m)
        .into_par_iter()
        .map(|(j0, w)| {
            let mut total = vec![[0f32; COLS]; c * k];
            let mut part = vec![[0f32; COLS]; c * k];
            for r0 in (0..rows).step_by(CHUNK) {
                part.iter_mut().for_each(|p| *p = [0.0; COLS]);
                for r in r0..(r0 + CHUNK).min(rows) {
                    let mut ur = [0f32; COLS];
                    ur[..w].copy_from_slice(&u[r * m + j0..][..w]);
                    for (cc, &code) in codes[r * c..(r + 1) * c].iter().enumerate() {
                        let g = &mut part[cc * k + code as usize];
                        for l in 0..COLS {
                            g[l] += ur[l];
                        }
                    }
                }
                for (t, p) in total.iter_mut().zip(&part) {
                    for l in 0..COLS {
                        t[l] += p[l];
                    }
                }
            }
            total
        })
        .collect();
    for ((j0, w), tb) in col_blocks(m).into_iter().zip(blocks) {
        for (o, t) in out.chunks_mut(m).zip(&tb) {
            o[j0..j0 + w].copy_from_slice(&t[..w]);
        }
    }
}

/// Per-column dot products over the `n × m` matrices.
fn col_dots(a: &[f32], b: &[f32], m: usize) -> Vec<f64> {
    let mut d = vec![0f64; m];
    for (ra, rb) in a.chunks(m).zip(b.chunks(m)) {
        for j in 0..m {
            d[j] += ra[j] as f64 * rb[j] as f64;
        }
    }
    d
}

/// The rows a refit fits: their codes (`rows × c`, codes `< k`) and the exact outputs
/// `y` (`rows × m`).
pub struct Fit<'a> {
    pub codes: &'a [u8],
    pub rows: usize,
    pub c: usize,
    pub k: usize,
    pub y: &'a [f32],
    pub m: usize,
}

/// Refit tables in place. `t` is `[(c·k)][m]` (row = codebook entry), starting at `T₀`.
/// `lambda` is relative to the average entry frequency (`rows / k`).
pub fn ridge_refit(fit: &Fit, lambda: f32, iters: usize, t: &mut [f32]) {
    let t0 = t.to_vec();
    ridge_refit_from(fit, lambda, iters, &t0, t);
}

/// The held-out rows a refit is judged on: their codes (`rows × c`) and exact outputs
/// (`rows × m`).
pub struct Held<'a> {
    pub codes: &'a [u8],
    pub y: &'a [f32],
}

/// Relative RMS error `‖a − b‖ / ‖b‖`.
fn rel_error(a: &[f32], b: &[f32]) -> f64 {
    let (mut e, mut n) = (0f64, 0f64);
    for (a, b) in a.iter().zip(b) {
        e += ((a - b) as f64).powi(2);
        n += (*b as f64).powi(2);
    }
    (e / n.max(1e-30)).sqrt()
}

/// [`ridge_refit`] at each strength of `lambdas`, strongest first, each solve after the first
/// starting from the previous one's tables (the prior stays `t`'s tables on entry; with half
/// the steps from there, the ResNet-18/16's held-out errors rose by up to 3 %); the tables kept
/// are those with the lowest relative RMS error on the `held` rows, which the refit never sees.
/// Returns the chosen strength's index and its held-out error. With `K` codes, a codebook's
/// tables have `K` entries per output fitted from `rows / K` rows each: at 64 codes the deep
/// layers' refits fit their rows' noise unless the prior holds them (on the ResNet-18/16 at
/// 16 384 rows, the block errors on held-out images read 1–56 % above those on the rows fitted
/// on, median 14 %).
pub fn ridge_refit_select(fit: &Fit, lambdas: &[f32], iters: usize, held: Held, t: &mut [f32]) -> (usize, f64) {
    let (c, k, m) = (fit.c, fit.k, fit.m);
    let prior = t.to_vec();
    let n_held = held.y.len() / m.max(1);
    let mut out = vec![0f32; n_held * m];
    let mut best: Option<(f64, usize, Vec<f32>)> = None;
    let mut order: Vec<usize> = (0..lambdas.len()).collect();
    order.sort_by(|&a, &b| lambdas[b].total_cmp(&lambdas[a]));
    for i in order {
        ridge_refit_from(fit, lambdas[i], iters, &prior, t);
        a_times(held.codes, c, k, t, m, &mut out);
        // (a non-finite error ranks last)
        let err = Some(rel_error(&out, held.y))
            .filter(|v| v.is_finite())
            .unwrap_or(f64::INFINITY);
        if best.as_ref().is_none_or(|b| err < b.0) {
            best = Some((err, i, t.to_vec()));
        }
    }
    match best {
        Some((err, i, tb)) => {
            t.copy_from_slice(&tb);
            (i, err)
        }
        None => (0, f64::NAN),
    }
}

/// [`ridge_refit`] towards the tables `t0`, starting from `t`'s.
fn ridge_refit_from(fit: &Fit, lambda: f32, iters: usize, t0: &[f32], t: &mut [f32]) {
    let &Fit {
        codes,
        rows,
        c,
        k,
        y,
        m,
    } = fit;
    let lam = lambda * rows as f32 / k as f32;
    let n = c * k * m;
    let mut at = vec![0f32; rows * m];
    let mut g = vec![0f32; n];
    // r = AᵀY + λT₀ − (AᵀA + λI)T
    let mut rhs = vec![0f32; n];
    at_times(codes, rows, c, k, y, m, &mut rhs);
    rhs.iter_mut().zip(t0).for_each(|(r, x)| *r += lam * x);
    let apply = |v: &[f32], out: &mut [f32], at: &mut [f32]| {
        a_times(codes, c, k, v, m, at);
        at_times(codes, rows, c, k, at, m, out);
        out.iter_mut().zip(v).for_each(|(o, x)| *o += lam * x);
    };
    apply(t, &mut g, &mut at);
    let mut r: Vec<f32> = rhs.iter().zip(&g).map(|(a, b)| a - b).collect();
    let mut p = r.clone();
    let mut rs = col_dots(&r, &r, m);
    let mut ap = vec![0f32; n];
    for _ in 0..iters {
        apply(&p, &mut ap, &mut at);
        let pap = col_dots(&p, &ap, m);
        let alpha: Vec<f32> = (0..m)
            .map(|j| if pap[j] > 0.0 { (rs[j] / pap[j]) as f32 } else { 0.0 })
            .collect();
        for i in 0..n {
            let j = i % m;
            t[i] += alpha[j] * p[i];
            r[i] -= alpha[j] * ap[i];
        }
        let rs_new = col_dots(&r, &r, m);
        let beta: Vec<f32> = (0..m)
            .map(|j| if rs[j] > 0.0 { (rs_new[j] / rs[j]) as f32 } else { 0.0 })
            .collect();
        for i in 0..n {
            p[i] = r[i] + beta[i % m] * p[i];
        }
        rs = rs_new;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pq::rng::Rng;

    /// The row-major forms the column-blocked products replaced: the blocked ones must give
    /// the same bits (each sum in the same order), so refit tables do not move with the
    /// blocking.
    fn a_times_rows(codes: &[u8], c: usize, k: usize, v: &[f32], m: usize, out: &mut [f32]) {
        for (r, o) in out.chunks_mut(m).enumerate() {
            o.fill(0.0);
            for cc in 0..c {
                let row = &v[(cc * k + codes[r * c + cc] as usize) * m..][..m];
                o.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        }
    }

    fn at_times_rows(codes: &[u8], rows: usize, c: usize, k: usize, u: &[f32], m: usize, out: &mut [f32]) {
        out.fill(0.0);
        for r0 in (0..rows).step_by(CHUNK) {
            let mut g = vec![0f32; c * k * m];
            for r in r0..(r0 + CHUNK).min(rows) {
                for cc in 0..c {
                    let row = &mut g[(cc * k + codes[r * c + cc] as usize) * m..][..m];
                    row.iter_mut().zip(&u[r * m..(r + 1) * m]).for_each(|(a, b)| *a += b);
                }
            }
            out.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        }
    }

    #[test]
    fn column_blocked_products_give_the_row_major_bits() {
        let mut rng = Rng::new(3);
        // widths below, at and past one block, a partial last block; rows past one chunk
        for (rows, c, k, m) in [(2500, 5, 16, 37), (1030, 3, 8, 16), (700, 2, 4, 5), (2049, 4, 16, 64)] {
            let codes: Vec<u8> = (0..rows * c).map(|_| rng.below(k) as u8).collect();
            let v: Vec<f32> = (0..c * k * m).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let u: Vec<f32> = (0..rows * m).map(|_| rng.next_f64() as f32 * 3.0 - 1.0).collect();
            let (mut a, mut b) = (vec![f32::NAN; rows * m], vec![1f32; rows * m]);
            a_times(&codes, c, k, &v, m, &mut a);
            a_times_rows(&codes, c, k, &v, m, &mut b);
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "A·v, {rows}×{c}×{k}×{m}"
            );
            let (mut a, mut b) = (vec![f32::NAN; c * k * m], vec![1f32; c * k * m]);
            at_times(&codes, rows, c, k, &u, m, &mut a);
            at_times_rows(&codes, rows, c, k, &u, m, &mut b);
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "Aᵀ·u, {rows}×{c}×{k}×{m}"
            );
        }
    }

    /// Few noisy rows per table entry: the selection keeps, of the strengths tried, the tables
    /// whose held-out error is lowest (each strength's solve alone, from the prior, checked),
    /// and that is a stronger ridge than the weakest, which fits the noise.
    #[test]
    fn the_refit_keeps_the_strength_best_on_held_out_rows() {
        let (rows, held, c, k, m) = (600, 300, 6, 16, 4);
        let mut rng = Rng::new(11);
        let codes: Vec<u8> = (0..(rows + held) * c).map(|_| rng.below(k) as u8).collect();
        let truth: Vec<f32> = (0..c * k * m).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let mut y = vec![0f32; (rows + held) * m];
        a_times(&codes, c, k, &truth, m, &mut y);
        y.iter_mut().for_each(|v| *v += 2.0 * (rng.next_f64() as f32 - 0.5));
        // the prior: the truth, blurred
        let prior: Vec<f32> = truth.iter().map(|t| 0.7 * t).collect();
        let lambdas = [0.01, 0.1, 1.0, 10.0];
        let (fit_codes, fit_y) = (&codes[..rows * c], &y[..rows * m]);
        let fit = Fit {
            codes: fit_codes,
            rows,
            c,
            k,
            y: fit_y,
            m,
        };
        let held_err = |t: &[f32]| {
            let mut out = vec![0f32; held * m];
            a_times(&codes[rows * c..], c, k, t, m, &mut out);
            rel_error(&out, &y[rows * m..])
        };
        let alone: Vec<f64> = lambdas
            .iter()
            .map(|&l| {
                let mut t = prior.clone();
                ridge_refit(&fit, l, 20, &mut t);
                held_err(&t)
            })
            .collect();
        let mut t = prior.clone();
        let h = Held {
            codes: &codes[rows * c..],
            y: &y[rows * m..],
        };
        let (i, err) = ridge_refit_select(&fit, &lambdas, 20, h, &mut t);
        assert!(
            (held_err(&t) - err).abs() < 1e-9,
            "the tables kept are the ones measured"
        );
        assert!(i > 0, "held-out errors {alone:?}: the weakest ridge chosen");
        // warm-started solves land where solves from the prior do (20 CG steps: near, not equal)
        let best = alone.iter().cloned().fold(f64::INFINITY, f64::min);
        assert!(
            err <= best * 1.01,
            "chosen {err} (strength {}) vs the best alone {best}: {alone:?}",
            lambdas[i]
        );
        assert!(err < alone[0] * 0.95, "chosen {err} vs the weakest {}", alone[0]);
    }

    #[test]
    fn refit_recovers_tables_that_generated_the_targets() {
        let (rows, c, k, m) = (3000, 4, 16, 3);
        let mut rng = Rng::new(7);
        let codes: Vec<u8> = (0..rows * c).map(|_| rng.below(k) as u8).collect();
        let truth: Vec<f32> = (0..c * k * m).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let mut y = vec![0f32; rows * m];
        a_times(&codes, c, k, &truth, m, &mut y);
        let mut t = vec![0f32; c * k * m];
        let fit = Fit {
            codes: &codes,
            rows,
            c,
            k,
            y: &y,
            m,
        };
        ridge_refit(&fit, 1e-6, 60, &mut t);
        let mut got = vec![0f32; rows * m];
        a_times(&codes, c, k, &t, m, &mut got);
        let err: f32 = got.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(err < 1e-3, "max error {err}");
    }
}
