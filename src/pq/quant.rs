//! int8 table quantization: one scale per output `m` (shared by all codebooks, so integer sums
//! stay meaningful) and one offset per (codebook, output), folded into a per-output offset.
//!
//! `T[c][m][k] ≈ scale[m] · q[c][m][k] + mid[c][m]`, `q ∈ [−127, 127]`, so
//! `Σ_c T[c][m][code_c] ≈ scale[m] · Σ_c q[c][m][code_c] + offset[m]` with
//! `offset[m] = Σ_c mid[c][m]`. Each entry's rounding error is at most `scale[m] / 2`.

pub struct QuantTables {
    /// `[c][m][k]`
    pub q: Vec<i8>,
    pub scale: Vec<f32>,
    pub offset: Vec<f32>,
    /// ‖dequantized − T‖ / ‖T‖ over all entries.
    pub rel_error: f64,
}

pub fn quantize(t: &[f32], c: usize, m: usize, k: usize) -> QuantTables {
    let mut mid = vec![0f32; c * m];
    let mut range = vec![0f32; m];
    for ci in 0..c {
        for mi in 0..m {
            let row = &t[(ci * m + mi) * k..(ci * m + mi + 1) * k];
            let lo = row.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            mid[ci * m + mi] = lo + (hi - lo) / 2.0;
            range[mi] = range[mi].max(hi - lo);
        }
    }
    let scale: Vec<f32> = range.iter().map(|&r| if r > 0.0 { r / 254.0 } else { 1.0 }).collect();
    let mut q = vec![0i8; t.len()];
    let (mut err2, mut norm2) = (0f64, 0f64);
    for ci in 0..c {
        for mi in 0..m {
            let base = (ci * m + mi) * k;
            let md = mid[ci * m + mi];
            for kk in 0..k {
                let v = t[base + kk];
                let qv = ((v - md) / scale[mi]).round().clamp(-127.0, 127.0);
                q[base + kk] = qv as i8;
                let deq = scale[mi] * qv + md;
                err2 += ((deq - v) as f64).powi(2);
                norm2 += (v as f64).powi(2);
            }
        }
    }
    let offset = (0..m)
        .map(|mi| (0..c).map(|ci| mid[ci * m + mi] as f64).sum::<f64>() as f32)
        .collect();
    QuantTables {
        q,
        scale,
        offset,
        rel_error: if norm2 > 0.0 { (err2 / norm2).sqrt() } else { 0.0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequantized_sums_are_within_the_rounding_bound() {
        let (c, m, k) = (5, 3, 16);
        let t: Vec<f32> = (0..c * m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let qt = quantize(&t, c, m, k);
        let codes = [3usize, 0, 15, 7, 9];
        for mi in 0..m {
            let exact: f32 = (0..c).map(|ci| t[(ci * m + mi) * k + codes[ci]]).sum();
            let acc: i32 = (0..c).map(|ci| qt.q[(ci * m + mi) * k + codes[ci]] as i32).sum();
            let approx = qt.scale[mi] * acc as f32 + qt.offset[mi];
            assert!(
                (approx - exact).abs() <= c as f32 * qt.scale[mi] / 2.0 + 1e-5,
                "{approx} vs {exact}"
            );
        }
        assert!(qt.rel_error < 0.01);
    }
}
