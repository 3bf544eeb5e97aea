//! Product quantization: learning codebooks (k-means++ prototypes or a MADDNESS-style hash
//! tree), fitting lookup tables (plain `prototype · W` or ridge-refit against exact outputs) and
//! quantizing them to int8. Pure numerics over slices; the `lut` pass drives it.

pub mod kmeans;
pub mod metric;
pub mod quant;
pub mod refit;
pub mod rng;
pub mod tree;

/// Subspace layout of a row of length `d` split into codebooks of `s` values (last one padded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subspaces {
    pub d: usize,
    pub s: usize,
}

impl Subspaces {
    pub fn count(&self) -> usize {
        self.d.div_ceil(self.s)
    }
    /// Column range of codebook `c` (the last one may be shorter than `s`).
    pub fn range(&self, c: usize) -> std::ops::Range<usize> {
        c * self.s..((c + 1) * self.s).min(self.d)
    }
}

/// Copy the columns of codebook `c` out of row-major `rows × d` data, zero-padded to `s`.
pub fn gather_subspace(x: &[f32], rows: usize, sub: Subspaces, c: usize) -> Vec<f32> {
    let r = sub.range(c);
    let mut out = vec![0f32; rows * sub.s];
    for i in 0..rows {
        out[i * sub.s..i * sub.s + r.len()].copy_from_slice(&x[i * sub.d + r.start..i * sub.d + r.end]);
    }
    out
}

/// Plain tables `T[c][m][k] = Σ_s P[c][k][s] · W[c·S + s][m]` for a `d × m` weight.
pub fn plain_tables(protos: &[f32], sub: Subspaces, k: usize, w: &[f32], m: usize) -> Vec<f32> {
    let c_n = sub.count();
    let mut t = vec![0f32; c_n * m * k];
    for c in 0..c_n {
        let r = sub.range(c);
        for kk in 0..k {
            let p = &protos[(c * k + kk) * sub.s..(c * k + kk + 1) * sub.s];
            for mi in 0..m {
                let mut acc = 0f64;
                for (j, col) in r.clone().enumerate() {
                    acc += p[j] as f64 * w[col * m + mi] as f64;
                }
                t[(c * m + mi) * k + kk] = acc as f32;
            }
        }
    }
    t
}
