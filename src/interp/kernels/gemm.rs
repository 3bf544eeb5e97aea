//! Matrix multiplication through the `gemm` crate (blocked, SIMD with runtime CPU dispatch).
//! Strided operands make transposes free.

/// A read-only strided matrix view: element (i, j) is `data[i*rs + j*cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    pub fn row_major(data: &'a [f32], cols: usize) -> Mat<'a> {
        Mat { data, rs: cols, cs: 1 }
    }
    pub fn transposed(self) -> Mat<'a> {
        Mat {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `c[m×n] (row stride ldc) = (accumulate ? c : 0) + scale · a[m×k] · b[k×n]`.
/// `parallel` lets the GEMM split the work over rayon threads (leave it off when the caller
/// already parallelises over images).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    assert!(
        a.fits(m, k) && b.fits(k, n),
        "matmul operands smaller than their dimensions"
    );
    assert!(
        m == 0 || n == 0 || (m - 1) * ldc + n <= c.len(),
        "matmul output too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 && m * n * k >= 64 * 64 * 64 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above guarantee every index the GEMM touches is inside the slices;
    // `c` is exclusively borrowed and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_with_transposes_and_accumulate() {
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut c = vec![1.0f32; m * n];
        // b given as its transpose (n×k row-major)
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        matmul(
            m,
            n,
            k,
            Mat::row_major(&a, k),
            Mat::row_major(&bt, k).transposed(),
            &mut c,
            n,
            true,
            2.0,
            false,
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + 2.0 * (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f32>();
                assert!(
                    (c[i * n + j] - want).abs() < 1e-4,
                    "({i},{j}) {} vs {want}",
                    c[i * n + j]
                );
            }
        }
    }
}
