//! Exact layers after lookups (`lut.compensate`): a layer the `lut` pass keeps exact reads the
//! activations the lookups before it approximated. Its weight is refit by ridge regression so
//! that on those inputs it gives what the exact model's layer gives on the exact ones, pulled
//! towards the trained weight; with an intercept, the shift goes to its bias. The change is kept
//! only where it lowers the error on rows held out of the fit.

use crate::interp::kernels::gemm::{matmul, Mat};
use crate::pq::metric::cholesky;
use rayon::prelude::*;

/// A refit weight, the shift for the bias, and the relative error on the held-out rows.
pub struct Refit {
    /// `d × m`, row-major.
    pub w: Vec<f32>,
    /// Added to the bias (zeros without an intercept).
    pub shift: Vec<f32>,
    pub before: f64,
    pub after: f64,
}

/// One row in this many is held out of the fit.
const HOLD_EVERY: usize = 8;

/// Refit `w0` (`d × m`) on input rows `x` (`rows × d`, as the approximated graph gives them)
/// against outputs `y` (`rows × m`, the exact model's, bias excluded): `w0 + Δ` with
/// `Δ = argmin ‖X Δ − (Y − X W₀)‖² + λ‖Δ‖²`, `λ = ridge · tr(XᵀX) / d` (centred when
/// `intercept`, the means' difference going to `shift`). None when the held-out error does not
/// fall, the rows are too few, or the system is not positive definite.
#[allow(clippy::too_many_arguments)]
pub fn refit_weight(
    x: &[f32],
    rows: usize,
    d: usize,
    y: &[f32],
    m: usize,
    w0: &[f32],
    ridge: f32,
    intercept: bool,
) -> Option<Refit> {
    let fit: Vec<usize> = (0..rows).filter(|r| r % HOLD_EVERY != 0).collect();
    let held: Vec<usize> = (0..rows).filter(|r| r % HOLD_EVERY == 0).collect();
    if fit.len() < 2 * d.min(64) || held.is_empty() {
        return None;
    }
    let pick = |src: &[f32], idx: &[usize], w: usize| -> Vec<f32> {
        idx.iter()
            .flat_map(|&r| src[r * w..(r + 1) * w].iter().copied())
            .collect()
    };
    let (xf, yf) = (pick(x, &fit, d), pick(y, &fit, m));
    let n = fit.len();
    // residuals of the trained weight on the approximated inputs
    let mut r = product(&xf, n, d, w0, m);
    r.iter_mut().zip(&yf).for_each(|(r, y)| *r = y - *r);
    let mean = |a: &[f32], w: usize| -> Vec<f64> {
        let mut s = vec![0f64; w];
        a.chunks(w)
            .for_each(|row| row.iter().zip(&mut s).for_each(|(v, s)| *s += *v as f64));
        s.iter_mut().for_each(|s| *s /= n as f64);
        s
    };
    let (mx, mr) = match intercept {
        true => (mean(&xf, d), mean(&r, m)),
        false => (vec![0f64; d], vec![0f64; m]),
    };
    let mut xc = xf;
    xc.chunks_mut(d)
        .for_each(|row| row.iter_mut().zip(&mx).for_each(|(v, u)| *v -= *u as f32));
    r.chunks_mut(m)
        .for_each(|row| row.iter_mut().zip(&mr).for_each(|(v, u)| *v -= *u as f32));
    // normal equations (XᵀX + λI) Δ = Xᵀ R
    let xt = Mat::row_major(&xc, d).transposed();
    let mut g = vec![0f32; d * d];
    matmul(d, d, n, xt, Mat::row_major(&xc, d), &mut g, d, false, 1.0, true);
    let mut b = vec![0f32; d * m];
    matmul(d, m, n, xt, Mat::row_major(&r, m), &mut b, m, false, 1.0, true);
    let mut a: Vec<f64> = g.iter().map(|&v| v as f64).collect();
    let trace: f64 = (0..d).map(|i| a[i * d + i]).sum();
    if !(trace > 0.0 && trace.is_finite()) {
        return None;
    }
    let lambda = ridge as f64 * trace / d as f64;
    (0..d).for_each(|i| a[i * d + i] += lambda);
    let delta = cholesky_solve(&mut a, d, &b, m)?;
    let w: Vec<f32> = w0.iter().zip(&delta).map(|(w, dl)| (*w as f64 + dl) as f32).collect();
    let shift: Vec<f32> = (0..m)
        .map(|j| (mr[j] - (0..d).map(|i| mx[i] * delta[i * m + j]).sum::<f64>()) as f32)
        .collect();
    // the held-out rows: relative error before and after
    let (xh, yh) = (pick(x, &held, d), pick(y, &held, m));
    let err = |w: &[f32], shift: &[f32]| -> f64 {
        let p = product(&xh, held.len(), d, w, m);
        let (mut e, mut t) = (0f64, 0f64);
        for (pr, yr) in p.chunks(m).zip(yh.chunks(m)) {
            for j in 0..m {
                let diff = (pr[j] + shift[j] - yr[j]) as f64;
                e += diff * diff;
                t += (yr[j] as f64).powi(2);
            }
        }
        (e / t.max(1e-30)).sqrt()
    };
    let before = err(w0, &vec![0f32; m]);
    let after = err(&w, &shift);
    (after < before && w.iter().chain(&shift).all(|v| v.is_finite())).then_some(Refit {
        w,
        shift,
        before,
        after,
    })
}

/// `x · w` for `x` `n × d` and `w` `d × m`, row-major.
fn product(x: &[f32], n: usize, d: usize, w: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    matmul(
        n,
        m,
        d,
        Mat::row_major(x, d),
        Mat::row_major(w, m),
        &mut out,
        m,
        false,
        1.0,
        true,
    );
    out
}

/// Solve `A X = B` for symmetric positive definite `A` (`d × d`, overwritten by its Cholesky
/// factor, [`cholesky`]) and `B` `d × m`; None when `A` is not positive definite.
fn cholesky_solve(a: &mut [f64], d: usize, b: &[f32], m: usize) -> Option<Vec<f64>> {
    if !cholesky(a, d) {
        return None;
    }
    // forward then back substitution, each column of B on its own
    let a = &*a;
    let cols: Vec<Vec<f64>> = (0..m)
        .into_par_iter()
        .map(|c| {
            let mut col = vec![0f64; d];
            for i in 0..d {
                let s = b[i * m + c] as f64 - (0..i).map(|p| a[i * d + p] * col[p]).sum::<f64>();
                col[i] = s / a[i * d + i];
            }
            for i in (0..d).rev() {
                let s = col[i] - (i + 1..d).map(|p| a[p * d + i] * col[p]).sum::<f64>();
                col[i] = s / a[i * d + i];
            }
            col
        })
        .collect();
    Some((0..d).flat_map(|i| cols.iter().map(move |col| col[i])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pq::rng::Rng;

    fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect()
    }

    /// Random inputs `rows × d`, weight `d × m` and the exact outputs.
    fn layer(seed: u64, rows: usize, d: usize, m: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut rng = Rng::new(seed);
        let x = random(&mut rng, rows * d);
        let w0 = random(&mut rng, d * m);
        let y = product(&x, rows, d, &w0, m);
        (x, w0, y)
    }

    /// Inputs distorted by a fixed affine map (what lookups upstream might do, systematically):
    /// the refit undoes most of it, the intercept taking the offset, on rows it never saw.
    #[test]
    fn undoes_an_affine_distortion_of_the_inputs() {
        let (rows, d, m) = (4000, 12, 5);
        let (x, w0, y) = layer(7, rows, d, m);
        // x̃ = 0.8 x + 0.1 x_{next} + 0.3
        let xt: Vec<f32> = x
            .chunks(d)
            .flat_map(|r| (0..d).map(move |i| 0.8 * r[i] + 0.1 * r[(i + 1) % d] + 0.3))
            .collect();
        let r = refit_weight(&xt, rows, d, &y, m, &w0, 1e-6, true).expect("a gain");
        // the same distortion on too few rows for the weight's inputs (17 fitted for 12 inputs)
        assert!(refit_weight(&xt[..20 * d], 20, d, &y[..20 * m], m, &w0, 1e-6, true).is_none());
        assert!(r.before > 0.3, "the distortion moves the output: {}", r.before);
        assert!(r.after < 0.01 * r.before, "{} -> {}", r.before, r.after);
        assert!(r.shift.iter().any(|s| s.abs() > 0.05), "the offset went to the bias");
        // without an intercept the offset cannot be undone exactly
        let no = refit_weight(&xt, rows, d, &y, m, &w0, 1e-6, false).expect("a gain");
        assert!(no.shift.iter().all(|&s| s == 0.0));
        assert!(no.after > 5.0 * r.after, "{} vs {}", no.after, r.after);
    }

    /// Inputs as the exact model's: nothing to compensate, the weight stays.
    #[test]
    fn leaves_exact_inputs_alone() {
        let (rows, d, m) = (800, 6, 3);
        let (x, w0, y) = layer(3, rows, d, m);
        assert!(refit_weight(&x, rows, d, &y, m, &w0, 0.01, true).is_none());
    }

    /// The solver against a system with a known solution.
    #[test]
    fn cholesky_solves() {
        let d = 5;
        let mut rng = Rng::new(11);
        let g = random(&mut rng, d * d);
        // A = GᵀG + I (positive definite), X known, B = A X
        let mut a = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                a[i * d + j] = (0..d).map(|p| g[p * d + i] as f64 * g[p * d + j] as f64).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        let x: Vec<f64> = (0..d * 2).map(|v| v as f64 - 3.0).collect();
        let b: Vec<f32> = (0..d)
            .flat_map(|i| {
                let (a, x) = (&a, &x);
                (0..2).map(move |c| (0..d).map(|p| a[i * d + p] * x[p * 2 + c]).sum::<f64>() as f32)
            })
            .collect();
        let got = cholesky_solve(&mut a.clone(), d, &b, 2).unwrap();
        for (g, w) in got.iter().zip(&x) {
            assert!((g - w).abs() < 1e-4, "{g} vs {w}");
        }
        // not positive definite
        let mut neg = vec![0f64; d * d];
        (0..d).for_each(|i| neg[i * d + i] = -1.0);
        assert!(cholesky_solve(&mut neg, d, &b, 2).is_none());
    }
}
