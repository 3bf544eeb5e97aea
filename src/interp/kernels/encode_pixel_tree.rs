//! The hash-tree encoder of pixel codebooks (`PqEncode` with `pixel` and the tree encoder on a
//! channels-last input): 16 pixels in the lanes at AVX-512, 8 at AVX2. Each pixel's channels are one row;
//! the 16 pixels' rows are transposed in registers, 16 channels at a time, so one register
//! holds one channel of every pixel, and each codebook's tree is walked for the 16 pixels at
//! once: per level the node's threshold picked from the codebook's (at most 15) thresholds by
//! `vpermps` (at AVX2 from two registers of 8 and a blend on the last level), one compare, the
//! index doubled and the bit added. The codes are transposed back and stored a pixel's run at
//! a time. The same comparisons as [`crate::pq::tree::encode`]
//! (`x > threshold`, false for NaN), so the same codes.
//!
//! Before this kernel the pixel trees ran the window encoder's planar path over 1×1 windows:
//! every input row copied into planes, one channel per plane, then walked per row
//! (`encode::tree`). Other shapes (trees deeper than 4 levels, codebooks whose channels do not
//! divide the lanes) and the scalar level still do.

use super::Simd;

/// A pixel-lane kernel: `(trees, x, out)`, as `x86::tile512` takes them.
type TileKernel = unsafe fn(&PixelTree, &[f32], &mut [u8]);

/// A layer's hash-tree pixel codebooks in the kernel's layout.
pub struct PixelTree {
    /// Codebooks, channels per codebook, tree depth.
    c_n: usize,
    s: usize,
    depth: usize,
    /// `[c][depth]`: the channel each level compares, within the codebook.
    dims: Vec<usize>,
    /// `[c][16]`: the codebook's `2^depth − 1` thresholds, zero-padded to 16.
    thresholds: Vec<f32>,
}

impl PixelTree {
    /// Trees of `depth` levels over rows of `d` channels cut into codebooks of `s`
    /// (`dims`: `[c][depth]`, each below `s`; `thresholds`: `[c][2^depth − 1]`), when the kernel
    /// at AVX-512 serves them ([`fits`](Self::fits)).
    pub fn new(d: usize, s: usize, depth: usize, dims: &[usize], thresholds: &[f32]) -> Option<PixelTree> {
        if !Self::fits(Simd::Avx512, d, s, depth) {
            return None;
        }
        let (c_n, nodes) = (d / s, (1usize << depth) - 1);
        if dims.len() != c_n * depth || thresholds.len() != c_n * nodes || dims.iter().any(|&v| v >= s) {
            return None;
        }
        let mut padded = vec![0f32; c_n * 16];
        for (p, t) in padded.chunks_exact_mut(16).zip(thresholds.chunks_exact(nodes.max(1))) {
            p[..nodes].copy_from_slice(&t[..nodes]);
        }
        Some(PixelTree {
            c_n,
            s,
            depth,
            dims: dims.to_vec(),
            thresholds: padded,
        })
    }

    /// Whether the kernel at `level` serves trees of `depth` levels over rows of `d` channels in
    /// codebooks of `s`: AVX-512 or AVX2, `depth ≤ 4`, `s` dividing the level's lanes (16 or 8)
    /// and `d` a whole number of codebooks.
    pub fn fits(level: Simd, d: usize, s: usize, depth: usize) -> bool {
        let lanes = match level {
            Simd::Avx512 => 16,
            Simd::Avx2 => 8,
            Simd::Scalar => return false,
        };
        cfg!(target_arch = "x86_64") && depth <= 4 && (1..=lanes).contains(&s) && lanes % s == 0 && d.is_multiple_of(s)
    }

    /// Codebooks per pixel.
    pub fn codebooks(&self) -> usize {
        self.c_n
    }

    /// The codes `[rows][c]` of `rows` pixels of `d = c·s` channels each (`x`, row-major);
    /// the kernel must serve `level` ([`fits`](Self::fits)).
    pub fn encode(&self, level: Simd, x: &[f32], codes: &mut [u8]) {
        let d = self.c_n * self.s;
        assert!(
            Self::fits(level, d, self.s, self.depth),
            "the pixel tree kernel does not serve {level:?} here"
        );
        assert!(self.c_n > 0 && codes.len().is_multiple_of(self.c_n) && x.len() == codes.len() / self.c_n * d);
        let (kernel, lanes) = self.tile_kernel(level);
        // bands of at least 512 pixels' codebooks (a few microseconds) across the team; a
        // pixel's codes do not depend on its band
        let band = 512usize.div_ceil(self.c_n).next_multiple_of(16);
        super::team::for_chunks(codes, band * self.c_n, |t, out| {
            let x = &x[t * band * d..][..out.len() / self.c_n * d];
            for (x, out) in x.chunks(lanes * d).zip(out.chunks_mut(lanes * self.c_n)) {
                // SAFETY: the level's features detected by the caller (`fits`); `x` holds the
                // `out.len() / c_n ≤ lanes` pixels' rows of `d` channels, and the trees fit.
                unsafe { kernel(self, x, out) }
            }
        });
    }

    /// The kernel for `level` and this depth, with the pixels it takes at once.
    fn tile_kernel(&self, level: Simd) -> (TileKernel, usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let kernel: TileKernel = match (level, self.depth) {
                (Simd::Avx512, 0) => x86::tile512::<0>,
                (Simd::Avx512, 1) => x86::tile512::<1>,
                (Simd::Avx512, 2) => x86::tile512::<2>,
                (Simd::Avx512, 3) => x86::tile512::<3>,
                (Simd::Avx512, _) => x86::tile512::<4>,
                (_, 0) => x86::tile256::<0>,
                (_, 1) => x86::tile256::<1>,
                (_, 2) => x86::tile256::<2>,
                (_, 3) => x86::tile256::<3>,
                (_, _) => x86::tile256::<4>,
            };
            (kernel, if level == Simd::Avx512 { 16 } else { 8 })
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("`fits` serves no level off x86-64 ({level:?})")
    }

    /// The reference codes: [`crate::pq::tree::encode`] per pixel and codebook.
    #[cfg(test)]
    fn reference(&self, x: &[f32], codes: &mut [u8]) {
        let (s, depth, nodes) = (self.s, self.depth, (1usize << self.depth) - 1);
        for (row, out) in x.chunks_exact(self.c_n * s).zip(codes.chunks_exact_mut(self.c_n)) {
            for (c, code) in out.iter_mut().enumerate() {
                let dims = &self.dims[c * depth..(c + 1) * depth];
                let thr = &self.thresholds[c * 16..c * 16 + nodes];
                *code = crate::pq::tree::encode(&row[c * s..(c + 1) * s], dims, thr) as u8;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::PixelTree;
    use crate::interp::kernels::{lane_mask256, transpose16_epi32, transpose8_epi32};
    use std::arch::x86_64::*;

    /// The codes of `out.len() / c_n ≤ 16` pixels (`x`: their rows of `c_n·s` channels), trees
    /// of `D` levels.
    ///
    /// # Safety
    /// AVX-512F; `t` as [`PixelTree::new`] checks it, of depth `D`, `x` holding the pixels' rows.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile512<const D: usize>(t: &PixelTree, x: &[f32], out: &mut [u8]) {
        let (c_n, s) = (t.c_n, t.s);
        let d = c_n * s;
        let rows = out.len() / c_n;
        assert!(rows <= 16 && x.len() == rows * d && t.dims.len() == c_n * D && t.thresholds.len() == c_n * 16);
        let mut codes = [_mm512_setzero_si512(); 16];
        for ch0 in (0..d).step_by(16) {
            // the 16 pixels' channels ch0 .. ch0 + 16 (those past d read as 0), one per register
            let w = (d - ch0).min(16);
            let mask = ((1u32 << w) - 1) as __mmask16;
            let v = transpose16_epi32(std::array::from_fn(|p| {
                if p < rows {
                    // SAFETY: pixel p's channels ch0 .. ch0 + w lie in `x`.
                    unsafe { _mm512_castps_si512(_mm512_maskz_loadu_ps(mask, x.as_ptr().add(p * d + ch0))) }
                } else {
                    _mm512_setzero_si512()
                }
            }));
            // the codebooks of these channels (s divides 16: none straddles two chunks)
            for c in ch0 / s..(ch0 + w) / s {
                let thr = _mm512_loadu_ps(t.thresholds.as_ptr().add(16 * c));
                let mut idx = _mm512_setzero_si512();
                for l in 0..D {
                    let xv = _mm512_castsi512_ps(v[c * s + t.dims[c * D + l] - ch0]);
                    let node = _mm512_add_epi32(idx, _mm512_set1_epi32((1 << l) - 1));
                    let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(xv, _mm512_permutexvar_ps(node, thr));
                    idx = crate::interp::kernels::tree_step(idx, gt);
                }
                codes[c % 16] = idx;
                if c % 16 == 15 || c + 1 == c_n {
                    // the codes of codebooks c0 ..= c, a pixel's run per register
                    let (c0, cn) = (c - c % 16, c % 16 + 1);
                    let per_pixel = transpose16_epi32(codes);
                    let omask = ((1u32 << cn) - 1) as __mmask16;
                    for (p, code) in per_pixel.iter().enumerate().take(rows) {
                        // SAFETY: pixel p's codes c0 .. c0 + cn lie in `out`.
                        unsafe {
                            _mm512_mask_cvtepi32_storeu_epi8(out.as_mut_ptr().add(p * c_n + c0).cast(), omask, *code)
                        };
                    }
                }
            }
        }
    }

    /// [`tile512`] at AVX2: `out.len() / c_n ≤ 8` pixels, chunks of 8 channels; a node's
    /// threshold from the low (nodes 0–7) or the high register (8–14), blended on the last level.
    ///
    /// # Safety
    /// AVX2; `t` as [`PixelTree::new`] checks it with `s` dividing 8, of depth `D`, `x` holding
    /// the pixels' rows.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tile256<const D: usize>(t: &PixelTree, x: &[f32], out: &mut [u8]) {
        let (c_n, s) = (t.c_n, t.s);
        let d = c_n * s;
        let rows = out.len() / c_n;
        assert!(
            rows <= 8 && 8 % s == 0 && x.len() == rows * d && t.dims.len() == c_n * D && t.thresholds.len() == c_n * 16
        );
        let seven = _mm256_set1_epi32(7);
        let mut codes = [_mm256_setzero_si256(); 8];
        let mut bytes = [0i32; 8];
        for ch0 in (0..d).step_by(8) {
            let w = (d - ch0).min(8);
            let v = transpose8_epi32(std::array::from_fn(|p| {
                if p < rows {
                    // SAFETY: pixel p's channels ch0 .. ch0 + w lie in `x`.
                    unsafe { _mm256_maskload_epi32(x.as_ptr().add(p * d + ch0).cast(), lane_mask256(w)) }
                } else {
                    _mm256_setzero_si256()
                }
            }));
            for c in ch0 / s..(ch0 + w) / s {
                let lo = _mm256_loadu_ps(t.thresholds.as_ptr().add(16 * c));
                let hi = _mm256_loadu_ps(t.thresholds.as_ptr().add(16 * c + 8));
                let mut idx = _mm256_setzero_si256();
                for l in 0..D {
                    let xv = _mm256_castsi256_ps(v[c * s + t.dims[c * D + l] - ch0]);
                    let node = _mm256_add_epi32(idx, _mm256_set1_epi32((1 << l) - 1));
                    // `vpermps` reads the node's low 3 bits; nodes past 7 only on level 3
                    let mut thr = _mm256_permutevar8x32_ps(lo, node);
                    if l == 3 {
                        let high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(node, seven));
                        thr = _mm256_blendv_ps(thr, _mm256_permutevar8x32_ps(hi, node), high);
                    }
                    // all ones where greater: subtracting adds the bit
                    let gt = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(xv, thr));
                    idx = _mm256_sub_epi32(_mm256_add_epi32(idx, idx), gt);
                }
                codes[c % 8] = idx;
                if c % 8 == 7 || c + 1 == c_n {
                    let (c0, cn) = (c - c % 8, c % 8 + 1);
                    let per_pixel = transpose8_epi32(codes);
                    for (p, code) in per_pixel.iter().enumerate().take(rows) {
                        // SAFETY: `bytes` holds 8 i32.
                        unsafe { _mm256_storeu_si256(bytes.as_mut_ptr().cast(), *code) };
                        for (o, &b) in out[p * c_n + c0..][..cn].iter_mut().zip(&bytes) {
                            *o = b as u8;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pq::rng::Rng;

    /// The kernel gives the reference's codes ([`crate::pq::tree::encode`] per codebook) at
    /// AVX-512 and AVX2 (where this CPU has them), on one thread and on two (bands of pixels),
    /// for trees of 1 to 4 levels over codebooks of 1, 2, 4, 8 and 16 channels (16: AVX-512
    /// only), rows of fewer channels than a register and of several chunks, more than 16
    /// codebooks (several transposes of codes), a partial last tile; inputs equal to a
    /// threshold (not greater: the lower branch), NaN (never greater) and infinities.
    #[test]
    fn the_kernel_gives_the_reference_codes() {
        let levels = crate::interp::kernels::levels_checked("the pixel tree kernel gives the reference codes");
        let mut rng = Rng::new(5);
        let pools = [1, 2].map(|t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap());
        for (d, s, depth) in [
            (16, 4, 4),
            (8, 4, 4),
            (4, 4, 3),
            (64, 4, 4),
            (48, 8, 4),
            (32, 16, 2),
            (72, 2, 4),
            (20, 1, 1),
            (128, 4, 4),
            (12, 4, 4),
        ] {
            let c_n = d / s;
            let nodes = (1usize << depth) - 1;
            let dims: Vec<usize> = (0..c_n * depth).map(|_| rng.below(s)).collect();
            // thresholds from a few values, which the inputs also take (ties)
            let grid = |r: &mut Rng| (r.below(9) as f32 - 4.0) * 0.25;
            let thresholds: Vec<f32> = (0..c_n * nodes).map(|_| grid(&mut rng)).collect();
            let tree = PixelTree::new(d, s, depth, &dims, &thresholds).expect("the kernel serves these trees");
            for pixels in [1, 8, 16, 37, 1000] {
                let x: Vec<f32> = (0..pixels * d)
                    .map(|i| match i % 97 {
                        13 => f32::NAN,
                        31 => f32::INFINITY,
                        59 => f32::NEG_INFINITY,
                        _ => grid(&mut rng) + if rng.below(2) == 0 { 0.0 } else { 0.1 },
                    })
                    .collect();
                let mut want = vec![0u8; pixels * c_n];
                tree.reference(&x, &mut want);
                let distinct: std::collections::BTreeSet<u8> = want.iter().copied().collect();
                assert!(
                    pixels < 37 || distinct.len() > depth,
                    "{d}/{s}/{depth}: the codes vary ({distinct:?})"
                );
                for &level in levels.iter().filter(|&&l| PixelTree::fits(l, d, s, depth)) {
                    for pool in &pools {
                        let mut got = vec![0u8; pixels * c_n];
                        pool.install(|| tree.encode(level, &x, &mut got));
                        assert_eq!(
                            got, want,
                            "{level:?}: {d} channels in codebooks of {s}, depth {depth}, {pixels} pixels"
                        );
                    }
                }
            }
        }
    }

    /// Trees the kernel does not serve are refused (the caller takes the window encoder's path).
    #[test]
    fn other_trees_are_refused() {
        assert!(
            PixelTree::new(12, 3, 4, &[0; 16], &[0.0; 60]).is_none(),
            "3 does not divide 16"
        );
        assert!(PixelTree::new(16, 4, 5, &[0; 20], &[0.0; 124]).is_none(), "5 levels");
        assert!(
            PixelTree::new(18, 4, 4, &[0; 16], &[0.0; 60]).is_none(),
            "a partial codebook"
        );
        assert!(
            PixelTree::new(16, 4, 4, &[4; 16], &[0.0; 60]).is_none(),
            "a channel past the codebook"
        );
        assert!(PixelTree::new(16, 4, 4, &[0; 15], &[0.0; 60]).is_none(), "too few dims");
        assert!(PixelTree::new(16, 0, 4, &[], &[]).is_none(), "empty codebooks");
        assert!(
            !PixelTree::fits(Simd::Avx2, 32, 16, 4),
            "16 channels a codebook at AVX2"
        );
        assert!(!PixelTree::fits(Simd::Scalar, 16, 4, 4), "the scalar level");
    }
}
