//! Metrics of a layer's output for fitting codebooks: a codebook's subvectors `x` meet the
//! weight rows `W_c`, so an error `e` in them moves the layer's output by `eᵀW_c`, of squared
//! size `eᵀAe` with `A = W_c W_cᵀ`. Factoring `A = LᵀL` turns that error into the plain squared
//! error of the mapped subvectors `z = L x`: the hash tree splits and k-means clusters there
//! (`lut.tree_splits`, `lut.argmin_metric`), and an argmin codebook clustered there encodes as
//! `argmin_k ‖L(x − p_k)‖² = argmin_k pₖᵀApₖ − 2 x·(A pₖ)`, a Euclidean argmin's work with the
//! prototypes `A pₖ` and the norms `pₖᵀApₖ` ([`encoder_form`]).

use super::Subspaces;
use rayon::prelude::*;

/// `L` (`s × s`, row-major, upper triangular) with `A = LᵀL` for the symmetric `s × s` matrix
/// whose lower triangle `a` holds (overwritten), after adding `10⁻⁴` of its mean diagonal to
/// the diagonal (so a singular `A`, e.g. a padded subspace's zero rows, still factors); None
/// when its trace is not positive and finite.
pub fn metric_factor(a: &mut [f64], s: usize) -> Option<Vec<f32>> {
    let trace: f64 = (0..s).map(|i| a[i * s + i]).sum();
    if !(trace > 0.0 && trace.is_finite()) {
        return None;
    }
    for i in 0..s {
        a[i * s + i] += 1e-4 * trace / s as f64;
    }
    if !cholesky(a, s) {
        return None;
    }
    // L = Rᵀ
    let mut l = vec![0f32; s * s];
    for i in 0..s {
        for j in 0..=i {
            l[j * s + i] = a[i * s + j] as f32;
        }
    }
    Some(l)
}

/// From this size on, [`cholesky`] computes the rows below each pivot in parallel.
const PAR_ROWS: usize = 64;

/// Cholesky in place: the lower triangle of the symmetric positive definite `d × d` matrix `a`
/// (row-major) becomes `R`, lower triangular, with `A = R Rᵀ` (the strict upper triangle is
/// left as it was). False when a pivot is not positive (or NaN): `A` is not positive definite.
/// Each entry subtracts its products in the order of their index, whether the rows run in
/// parallel or not, so the factor is the same bits either way.
pub fn cholesky(a: &mut [f64], d: usize) -> bool {
    for j in 0..d {
        let (upto, below) = a.split_at_mut((j + 1) * d);
        let row_j = &mut upto[j * d..];
        let mut pivot = row_j[j];
        for v in &row_j[..j] {
            pivot -= v * v;
        }
        if pivot.is_nan() || pivot <= 0.0 {
            return false;
        }
        let dj = pivot.sqrt();
        row_j[j] = dj;
        let row_j = &*row_j;
        let update = |row_i: &mut [f64]| {
            let mut v = row_i[j];
            for p in 0..j {
                v -= row_i[p] * row_j[p];
            }
            row_i[j] = v / dj;
        };
        if d >= PAR_ROWS {
            below.par_chunks_mut(d).for_each(update);
        } else {
            below.chunks_mut(d).for_each(update);
        }
    }
    true
}

/// The rows `x` (`n × s`) mapped by `L` (`s × s`, row-major): `z = L x` per row.
pub fn map_rows(x: &[f32], s: usize, l: &[f32]) -> Vec<f32> {
    let mut z = vec![0f32; x.len()];
    for (zr, xr) in z.chunks_mut(s).zip(x.chunks(s)) {
        for (i, zi) in zr.iter_mut().enumerate() {
            *zi = l[i * s..(i + 1) * s]
                .iter()
                .zip(xr)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32;
        }
    }
    z
}

/// Prototypes `z` (`[k][s]`, in the space `z = L x`) back in the subvectors' space: `p = L⁻¹z`
/// per prototype (`L` upper triangular with a non-zero diagonal, as [`metric_factor`] makes it).
/// A cluster's mean there is the mean of its subvectors.
pub fn unmap_rows(z: &[f32], s: usize, l: &[f32]) -> Vec<f32> {
    let mut x = vec![0f32; z.len()];
    let mut acc = vec![0f64; s];
    for (xr, zr) in x.chunks_mut(s).zip(z.chunks(s)) {
        for i in (0..s).rev() {
            let mut v = zr[i] as f64;
            for j in i + 1..s {
                v -= l[i * s + j] as f64 * acc[j];
            }
            acc[i] = v / l[i * s + i] as f64;
        }
        xr.iter_mut().zip(&acc).for_each(|(o, &v)| *o = v as f32);
    }
    x
}

/// Argmin prototypes `z` (`[k][s]`) learned in the space `z = L x` as the encoder reads the
/// subvectors `x` themselves: prototypes `Lᵀz` and norms `‖z‖²`, so that
/// `argmin_k norms[k] − 2 x·(Lᵀz_k) = argmin_k ‖L x − z_k‖²`.
pub fn encoder_form(z: &[f32], s: usize, l: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut q = vec![0f32; z.len()];
    for (qr, zr) in q.chunks_mut(s).zip(z.chunks(s)) {
        for (j, o) in qr.iter_mut().enumerate() {
            *o = (0..=j).map(|i| l[i * s + j] as f64 * zr[i] as f64).sum::<f64>() as f32;
        }
    }
    let norms = z
        .chunks(s)
        .map(|r| r.iter().map(|&v| v as f64 * v as f64).sum::<f64>() as f32)
        .collect();
    (q, norms)
}

/// Per codebook of `sub` (window codebooks over the rows of the `d × m` weight `w`), the
/// factor `L` of the metric `A = LᵀL = W_c W_cᵀ`, `W_c` the weight rows its values meet: a
/// bucket's or cluster's error in it is the squared error its spread puts on the layer's
/// output. None (the subvectors' own error) where those rows are all zero or not
/// finite.
pub fn output_metrics(w: &[f32], m: usize, sub: Subspaces) -> Vec<Option<Vec<f32>>> {
    let s = sub.s;
    (0..sub.count())
        .into_par_iter()
        .map(|c| {
            let rows: Vec<&[f32]> = sub.range(c).map(|r| &w[r * m..(r + 1) * m]).collect();
            // the lower triangle; a padded codebook's missing rows stay 0
            let mut a = vec![0f64; s * s];
            for (i, ri) in rows.iter().enumerate() {
                for (j, rj) in rows[..=i].iter().enumerate() {
                    a[i * s + j] = ri.iter().zip(*rj).map(|(&x, &y)| x as f64 * y as f64).sum();
                }
            }
            metric_factor(&mut a, s)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pq::rng::Rng;

    #[test]
    fn metric_factor_maps_rows_to_their_norm_in_the_metric() {
        let mut rng = Rng::new(9);
        for (s, m) in [(1, 3), (4, 16), (5, 2), (9, 32)] {
            // A = W Wᵀ (lower triangle), W s × m; with m < s, A is singular (the jitter)
            let w: Vec<f64> = (0..s * m).map(|_| rng.next_f64() - 0.5).collect();
            let a_full: Vec<f64> = (0..s * s)
                .map(|ij| (0..m).map(|k| w[(ij / s) * m + k] * w[(ij % s) * m + k]).sum())
                .collect();
            let mut a: Vec<f64> = (0..s * s)
                .map(|ij| if ij % s <= ij / s { a_full[ij] } else { 0.0 })
                .collect();
            let l = metric_factor(&mut a, s).expect("positive trace");
            let trace: f64 = (0..s).map(|i| a_full[i * s + i]).sum();
            let x: Vec<f32> = (0..s * 7).map(|_| rng.next_f64() as f32 * 4.0 - 2.0).collect();
            for (row, z) in x.chunks(s).zip(map_rows(&x, s, &l).chunks(s)) {
                let q: f64 = (0..s * s)
                    .map(|ij| row[ij / s] as f64 * a_full[ij] * row[ij % s] as f64)
                    .sum::<f64>()
                    + 1e-4 * trace / s as f64 * row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
                let n: f64 = z.iter().map(|v| (*v as f64).powi(2)).sum();
                assert!(
                    (n - q).abs() <= 1e-4 * q.max(1e-3),
                    "s {s} m {m}: |Lx|² {n} against xᵀAx {q}"
                );
            }
            // L is upper triangular
            assert!((0..s).all(|i| (0..i).all(|j| l[i * s + j] == 0.0)));
        }
        assert_eq!(metric_factor(&mut [0.0; 4], 2), None);
        assert_eq!(metric_factor(&mut [f64::NAN, 0.0, 0.0, 1.0], 2), None);
    }

    #[test]
    fn the_encoder_form_finds_the_nearest_prototype_in_the_metric() {
        let mut rng = Rng::new(3);
        for s in [1, 4, 9] {
            let w: Vec<f64> = (0..s * 8).map(|_| rng.next_f64() - 0.5).collect();
            let mut a: Vec<f64> = (0..s * s)
                .map(|ij| match ij % s <= ij / s {
                    true => (0..8).map(|k| w[(ij / s) * 8 + k] * w[(ij % s) * 8 + k]).sum(),
                    false => 0.0,
                })
                .collect();
            let l = metric_factor(&mut a, s).unwrap();
            let z: Vec<f32> = (0..16 * s).map(|_| rng.next_f64() as f32 - 0.5).collect();
            // back and forth through L
            let p = unmap_rows(&z, s, &l);
            for (a, b) in map_rows(&p, s, &l).iter().zip(&z) {
                assert!((a - b).abs() < 1e-4, "L L⁻¹ z: {a} against {b}");
            }
            let (q, norms) = encoder_form(&z, s, &l);
            for _ in 0..200 {
                let x: Vec<f32> = (0..s).map(|_| rng.next_f64() as f32 - 0.5).collect();
                let zx = map_rows(&x, s, &l);
                let dist =
                    |k: usize| -> f64 { zx.iter().zip(&z[k * s..]).map(|(a, b)| ((a - b) as f64).powi(2)).sum() };
                let form = |k: usize| -> f64 {
                    norms[k] as f64
                        - 2.0
                            * x.iter()
                                .zip(&q[k * s..])
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                };
                let nearest = (0..16).min_by(|&i, &j| dist(i).total_cmp(&dist(j))).unwrap();
                let chosen = (0..16).min_by(|&i, &j| form(i).total_cmp(&form(j))).unwrap();
                // the same prototype, or one as near up to rounding
                assert!(dist(chosen) - dist(nearest) <= 1e-5 * dist(nearest).max(1e-3), "s {s}");
            }
        }
    }
}
