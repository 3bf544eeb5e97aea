//! Numeric kernels. Kernels take slices and plain numbers, never the graph.

pub mod aligned;
pub mod conv;
pub mod direct;
pub mod elementwise;
pub mod encode;
pub mod encode_i8;
pub mod encode_pixel;
pub mod encode_pixel_tree;
pub mod gemm;
pub mod im2col;
pub mod lut;
pub mod pool;
pub mod shape_ops;
pub mod team;

/// An 8×8 transpose of 32-bit values in AVX2 registers: `r[i]` lane `j` becomes lane `i` of the
/// result's register `j` (unpack pairs, then pairs of pairs, then 128-bit lanes).
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn transpose8_epi32(r: [std::arch::x86_64::__m256i; 8]) -> [std::arch::x86_64::__m256i; 8] {
    use std::arch::x86_64::*;
    let t: [__m256i; 8] = std::array::from_fn(|i| {
        let (x, y) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_epi32(x, y)
        } else {
            _mm256_unpackhi_epi32(x, y)
        }
    });
    // u[4h + q]: column q (and q + 4 in the upper 128-bit lane) of rows 4h..4h+4
    let u: [__m256i; 8] = std::array::from_fn(|i| {
        let (h, q) = (i / 4, i % 4);
        let (x, y) = (t[4 * h + q / 2], t[4 * h + 2 + q / 2]);
        if q % 2 == 0 {
            _mm256_unpacklo_epi64(x, y)
        } else {
            _mm256_unpackhi_epi64(x, y)
        }
    });
    std::array::from_fn(|q| {
        if q < 4 {
            _mm256_permute2x128_si256::<0x20>(u[q], u[4 + q])
        } else {
            _mm256_permute2x128_si256::<0x31>(u[q - 4], u[q])
        }
    })
}

/// The 8-lane mask of the first `n` 32-bit lanes (all set: −1), for `vpmaskmovd` / `vmaskmovps`.
///
/// # Safety
/// AVX2; inlined into its callers (functions with AVX2), as the kernels' lane helpers are.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn lane_mask256(n: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// `2·idx + 1` in the lanes `gt` selects, `2·idx` elsewhere: a hash tree's step to the next
/// level. One masked `vpaddd` after the doubling; written out because LLVM turns the
/// intrinsic (`_mm512_mask_add_epi32(twice, gt, twice, one)`) into a mask-to-vector
/// `vpternlogd`, a shift and an OR — three instructions instead of one in the trees' innermost
/// loop (docs/RESULTS.md, "Zen 5, and the window tree encoder's steps").
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn tree_step(
    idx: std::arch::x86_64::__m512i,
    gt: std::arch::x86_64::__mmask16,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let (mut r, one) = (_mm512_add_epi32(idx, idx), _mm512_set1_epi32(1));
    // SAFETY: AVX-512F (the caller); registers only.
    unsafe {
        std::arch::asm!(
            "vpaddd {r}{{{k}}}, {r}, {one}",
            r = inout(zmm_reg) r,
            k = in(kreg) gt,
            one = in(zmm_reg) one,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    r
}

/// A 16×16 transpose of 32-bit values in AVX-512 registers: `r[i]` lane `j` becomes lane `i` of
/// the result's register `j` (unpack pairs, then pairs of pairs, then 128-bit lanes).
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn transpose16_epi32(r: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // rows i, i+1 interleaved by element pairs
    let t: [__m512i; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(a, b)
        } else {
            _mm512_unpackhi_epi32(a, b)
        }
    });
    // 4 rows interleaved: in each 128-bit lane, one column of rows 4q..4q + 4
    let u: [__m512i; 16] = std::array::from_fn(|i| {
        let (q, w) = (i / 4, i % 4);
        let (a, b) = (t[4 * q + w / 2], t[4 * q + 2 + w / 2]);
        if w % 2 == 0 {
            _mm512_unpacklo_epi64(a, b)
        } else {
            _mm512_unpackhi_epi64(a, b)
        }
    });
    // u[4q + w], 128-bit lane k: column 4k + w of rows 4q..4q + 4 → gather the four row groups
    // of each column
    let mut out = [_mm512_setzero_si512(); 16];
    for w in 0..4 {
        let (a, b, c, e) = (u[w], u[4 + w], u[8 + w], u[12 + w]);
        // lanes (k of a, k of b) for k = 0, 1 and 2, 3
        let ab01 = _mm512_shuffle_i32x4::<0x44>(a, b);
        let ab23 = _mm512_shuffle_i32x4::<0xee>(a, b);
        let ce01 = _mm512_shuffle_i32x4::<0x44>(c, e);
        let ce23 = _mm512_shuffle_i32x4::<0xee>(c, e);
        // column 4k + w: lanes (a_k, b_k, c_k, e_k)
        out[w] = _mm512_shuffle_i32x4::<0x88>(ab01, ce01);
        out[4 + w] = _mm512_shuffle_i32x4::<0xdd>(ab01, ce01);
        out[8 + w] = _mm512_shuffle_i32x4::<0x88>(ab23, ce23);
        out[12 + w] = _mm512_shuffle_i32x4::<0xdd>(ab23, ce23);
    }
    out
}

/// Work (multiply-adds, or values read and written) below which a kernel call stays on one
/// thread: handing work to another thread costs microseconds, more than a small layer at batch
/// 1 takes (LeNet's layers are each under 0.2 M multiply-adds).
pub const PAR_WORK: usize = 1 << 18;

/// ReLU as every kernel computes it: `v` when `v > 0`, else `+0` (NaN and zeros of either sign
/// included), which is what `vmaxps(v, 0)` returns; `f32::max` leaves the sign of a zero
/// unspecified, so paths and SIMD levels could differ on it.
#[inline(always)]
pub fn relu(v: f32) -> f32 {
    if v > 0.0 {
        v
    } else {
        0.0
    }
}

/// The least number of chunks of `per_chunk` work each a parallel job should take (rayon's
/// `with_min_len`), so no job holds less than [`PAR_WORK`] and a small call is not split at all.
pub fn min_chunks(per_chunk: usize) -> usize {
    PAR_WORK.div_ceil(per_chunk.max(1))
}

/// A function whose body is plain Rust written to vectorise (loops over chunks of
/// [`elementwise`]'s lane count, no carried float sums), compiled three times — for AVX-512,
/// for AVX2+FMA and for the baseline — and dispatched on [`Simd::detect`]. The body uses no
/// fused multiply-add (Rust never contracts `a * b + c`), so every level gives the same bits;
/// a module of the function's name holds `at(level, …)`, the function at a given level, for the
/// tests that check this.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            $name::at($crate::interp::kernels::Simd::detect(), $($a),*)
        }
        // the function at one SIMD level (a function and a module may share a name)
        #[allow(dead_code)]
        $vis mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[inline(always)]
            fn inner($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn v512($($a: $t),*) $(-> $r)? {
                inner($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v256($($a: $t),*) $(-> $r)? {
                inner($($a),*)
            }
            /// The function compiled for `level`, which this CPU must support (checked).
            #[inline]
            pub fn at(level: $crate::interp::kernels::Simd, $($a: $t),*) $(-> $r)? {
                assert!(level.supported(), "SIMD level {} is not available on this CPU", level.name());
                match level {
                    // SAFETY: checked above that this CPU has the level's features.
                    #[cfg(target_arch = "x86_64")]
                    $crate::interp::kernels::Simd::Avx512 => unsafe { v512($($a),*) },
                    // SAFETY: as above.
                    #[cfg(target_arch = "x86_64")]
                    $crate::interp::kernels::Simd::Avx2 => unsafe { v256($($a),*) },
                    _ => inner($($a),*),
                }
            }
        }
    };
}
pub(crate) use multiversion;

/// A SIMD level of the hand-written kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    Scalar,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512F with AVX2 and FMA (and BW where a kernel checks for it).
    Avx512,
}

impl Simd {
    /// The best level this CPU supports, capped by `TABCONV_SIMD` (`scalar`, `avx2`, `avx512`)
    /// when set: how an AVX-512 machine times the AVX2 kernels (results are the same).
    #[inline]
    pub fn detect() -> Simd {
        let best = if Simd::Avx512.supported() {
            Simd::Avx512
        } else if Simd::Avx2.supported() {
            Simd::Avx2
        } else {
            Simd::Scalar
        };
        best.min(Simd::cap())
    }

    /// The `TABCONV_SIMD` cap (read once; unset or unknown: no cap).
    pub fn cap() -> Simd {
        static CAP: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *CAP.get_or_init(|| match std::env::var("TABCONV_SIMD").as_deref() {
            Ok("scalar") => Simd::Scalar,
            Ok("avx2") => Simd::Avx2,
            _ => Simd::Avx512,
        })
    }

    /// The level's name in reports ("scalar", "avx2", "avx512").
    pub fn name(self) -> &'static str {
        match self {
            Simd::Scalar => "scalar",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
        }
    }

    /// Every level this CPU supports, scalar first.
    pub fn available() -> Vec<Simd> {
        [Simd::Scalar, Simd::Avx2, Simd::Avx512]
            .into_iter()
            .filter(|s| s.supported())
            .collect()
    }

    #[inline]
    pub fn supported(self) -> bool {
        match self {
            Simd::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// Which of `all` a kernel test runs — those `supported` on this CPU — printed once under the
/// test's name with those it cannot check here, so a log shows what each test covered.
#[cfg(test)]
pub(crate) fn report_checked<T: Copy>(
    test: &str,
    what: &str,
    all: &[T],
    supported: impl Fn(T) -> bool,
    name: impl Fn(T) -> &'static str,
) -> Vec<T> {
    let (ran, missing): (Vec<T>, Vec<T>) = all.iter().partition(|&&x| supported(x));
    let names = |v: &[T]| v.iter().map(|&x| name(x)).collect::<Vec<_>>();
    eprintln!(
        "{test}: checked {what} {:?}; not available on this CPU, not checked: {:?}",
        names(&ran),
        names(&missing)
    );
    ran
}

/// NCHW → NHWC copy of a batch (the kernel tests' channels-last inputs).
#[cfg(test)]
pub(crate) fn to_nhwc(x: &[f32], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for i in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                out[(i * h * w + p) * c + ch] = x[(i * c + ch) * h * w + p];
            }
        }
    }
    out
}

/// The SIMD levels a kernel test runs at: every level this CPU has ([`report_checked`]).
#[cfg(test)]
pub(crate) fn levels_checked(test: &str) -> Vec<Simd> {
    let all = [Simd::Scalar, Simd::Avx2, Simd::Avx512];
    report_checked(test, "at SIMD levels", &all, Simd::supported, Simd::name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel tests run every kernel at every level this CPU has; say which ran and which
    /// could not (a CI log then shows what a machine did not cover, instead of silence).
    #[test]
    fn report_simd_levels_checked() {
        let all = [Simd::Scalar, Simd::Avx2, Simd::Avx512];
        let (ran, missing): (Vec<Simd>, Vec<Simd>) = all.into_iter().partition(|s| s.supported());
        let lut: Vec<&str> = lut::LutKernel::available().iter().map(|k| k.name()).collect();
        eprintln!(
            "kernel tests ran at SIMD levels {:?}; not available on this CPU, not checked: {:?}; \
             LUT kernels checked: {lut:?}; packed GEMM (AVX-512 or AVX2) checked: {}",
            ran.iter().map(|s| s.name()).collect::<Vec<_>>(),
            missing.iter().map(|s| s.name()).collect::<Vec<_>>(),
            gemm::PackedA::supported()
        );
        assert_eq!(Simd::available(), ran);
        assert!(ran.contains(&Simd::detect()));
    }
}
