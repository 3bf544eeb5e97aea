//! Ridge refit of lookup tables: with `A` the one-hot encoding of the calibration rows' codes,
//! find tables `T` minimising `‖A·T − Y‖² + λ‖T − T₀‖²`, where `Y` is the exact layer's output
//! on those rows and `T₀` the plain `prototype · W` tables. Solved matrix-free by conjugate
//! gradients on the normal equations `(AᵀA + λI)·T = AᵀY + λT₀`, all outputs at once.
//! Deterministic: row chunks are fixed and partial sums are added in chunk order.

use rayon::prelude::*;

const CHUNK: usize = 1024;

/// `out[r][m] = Σ_c v[(c·k + code[r][c])][m]`
fn a_times(codes: &[u8], c: usize, k: usize, v: &[f32], m: usize, out: &mut [f32]) {
    out.par_chunks_mut(CHUNK * m).enumerate().for_each(|(ci, block)| {
        for (i, o) in block.chunks_mut(m).enumerate() {
            let r = ci * CHUNK + i;
            o.fill(0.0);
            for cc in 0..c {
                let row = &v[(cc * k + codes[r * c + cc] as usize) * m..][..m];
                o.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        }
    });
}

/// `out[(c·k + j)][m] = Σ_{r: code[r][c] = j} u[r][m]`
fn at_times(codes: &[u8], rows: usize, c: usize, k: usize, u: &[f32], m: usize, out: &mut [f32]) {
    let partials: Vec<Vec<f32>> = (0..rows.div_ceil(CHUNK))
        .into_par_iter()
        .map(|ci| {
            let mut g = vec![0f32; c * k * m];
            for r in ci * CHUNK..((ci + 1) * CHUNK).min(rows) {
                let ur = &u[r * m..(r + 1) * m];
                for cc in 0..c {
                    let row = &mut g[(cc * k + codes[r * c + cc] as usize) * m..][..m];
                    row.iter_mut().zip(ur).for_each(|(a, b)| *a += b);
                }
            }
            g
        })
        .collect();
    out.fill(0.0);
    for p in partials {
        out.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
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

/// Refit tables in place. `t` is `[(c·k)][m]` (row = codebook entry), starting at `T₀`.
/// `lambda` is relative to the average entry frequency (`rows / k`).
#[allow(clippy::too_many_arguments)]
pub fn ridge_refit(
    codes: &[u8],
    rows: usize,
    c: usize,
    k: usize,
    y: &[f32],
    m: usize,
    lambda: f32,
    iters: usize,
    t: &mut [f32],
) {
    let lam = lambda * rows as f32 / k as f32;
    let t0 = t.to_vec();
    let n = c * k * m;
    let mut at = vec![0f32; rows * m];
    let mut g = vec![0f32; n];
    // r = AᵀY + λT₀ − (AᵀA + λI)T
    let mut rhs = vec![0f32; n];
    at_times(codes, rows, c, k, y, m, &mut rhs);
    rhs.iter_mut().zip(&t0).for_each(|(r, x)| *r += lam * x);
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

    #[test]
    fn refit_recovers_tables_that_generated_the_targets() {
        let (rows, c, k, m) = (3000, 4, 16, 3);
        let mut rng = Rng::new(7);
        let codes: Vec<u8> = (0..rows * c).map(|_| rng.below(k) as u8).collect();
        let truth: Vec<f32> = (0..c * k * m).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let mut y = vec![0f32; rows * m];
        a_times(&codes, c, k, &truth, m, &mut y);
        let mut t = vec![0f32; c * k * m];
        ridge_refit(&codes, rows, c, k, &y, m, 1e-6, 60, &mut t);
        let mut fit = vec![0f32; rows * m];
        a_times(&codes, c, k, &t, m, &mut fit);
        let err: f32 = fit.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(err < 1e-3, "max error {err}");
    }
}
