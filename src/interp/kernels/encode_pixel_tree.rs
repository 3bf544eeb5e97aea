//! The hash-tree encoder of pixel codebooks (`PqEncode` with `pixel` and the tree encoder on a
//! channels-last input) at AVX-512: 16 pixels in the lanes. Each pixel's channels are one row;
//! the 16 pixels' rows are transposed in registers, 16 channels at a time, so one register
//! holds one channel of every pixel, and each codebook's tree is walked for the 16 pixels at
//! once: per level the node's threshold picked from the codebook's (at most 15) thresholds by
//! `vpermps`, one compare, the index doubled and the bit added. The codes are transposed back
//! and stored a pixel's run at a time. The same comparisons as [`crate::pq::tree::encode`]
//! (`x > threshold`, false for NaN), so the same codes.
//!
//! Before this kernel the pixel trees ran the window encoder's planar path over 1×1 windows:
//! every input row copied into planes, one channel per plane, then walked per row
//! (`encode::tree`). Other levels and shapes (trees deeper than 4 levels, codebooks whose
//! channels do not divide 16) still do.

use super::Simd;

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
    /// serves them: `depth ≤ 4`, `s` dividing 16 and `d` a whole number of codebooks.
    pub fn new(d: usize, s: usize, depth: usize, dims: &[usize], thresholds: &[f32]) -> Option<PixelTree> {
        let c_n = d.checked_div(s)?;
        let nodes = (1usize << depth.min(4)) - 1;
        if !Self::fits(d, s, depth)
            || dims.len() != c_n * depth
            || thresholds.len() != c_n * nodes
            || dims.iter().any(|&v| v >= s)
        {
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

    /// Whether the kernel serves trees of `depth` levels over rows of `d` channels in codebooks
    /// of `s`: `depth ≤ 4`, `s` dividing 16 and `d` a whole number of codebooks.
    pub fn fits(d: usize, s: usize, depth: usize) -> bool {
        depth <= 4 && (1..=16).contains(&s) && 16 % s == 0 && d.is_multiple_of(s)
    }

    /// Codebooks per pixel.
    pub fn codebooks(&self) -> usize {
        self.c_n
    }

    /// Whether `level` runs the kernel (AVX-512; other levels take the window encoder's path).
    pub fn serves(level: Simd) -> bool {
        cfg!(target_arch = "x86_64") && level == Simd::Avx512
    }

    /// The codes `[rows][c]` of `rows` pixels of `d = c·s` channels each (`x`, row-major);
    /// `level` must be one the kernel [`serves`](Self::serves).
    pub fn encode(&self, level: Simd, x: &[f32], codes: &mut [u8]) {
        assert!(Self::serves(level), "the pixel tree kernel needs AVX-512");
        let d = self.c_n * self.s;
        assert!(self.c_n > 0 && codes.len().is_multiple_of(self.c_n) && x.len() == codes.len() / self.c_n * d);
        // bands of at least 512 pixels' codebooks (a few microseconds) across the team; a
        // pixel's codes do not depend on its band
        let band = 512usize.div_ceil(self.c_n).next_multiple_of(16);
        super::team::for_chunks(codes, band * self.c_n, |t, out| {
            let x = &x[t * band * d..][..out.len() / self.c_n * d];
            for (x, out) in x.chunks(16 * d).zip(out.chunks_mut(16 * self.c_n)) {
                // SAFETY: AVX-512F (`serves`); `x` holds the `out.len() / c_n ≤ 16` pixels'
                // rows of `d` channels, and the trees fit the kernel (`new`).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match self.depth {
                        0 => x86::tile512::<0>(self, x, out),
                        1 => x86::tile512::<1>(self, x, out),
                        2 => x86::tile512::<2>(self, x, out),
                        3 => x86::tile512::<3>(self, x, out),
                        _ => x86::tile512::<4>(self, x, out),
                    }
                };
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (x, out);
            }
        });
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
    use crate::interp::kernels::transpose16_epi32;
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
        let one = _mm512_set1_epi32(1);
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
                    let twice = _mm512_add_epi32(idx, idx);
                    idx = _mm512_mask_add_epi32(twice, gt, twice, one);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pq::rng::Rng;

    /// The kernel gives the reference's codes ([`crate::pq::tree::encode`] per codebook), on
    /// one thread and on two (bands of pixels), for trees of 1 to 4 levels over codebooks of
    /// 1, 2, 4, 8 and 16 channels, rows of fewer than 16 channels and of several chunks, more
    /// than 16 codebooks (two transposes of codes), a partial last tile; inputs equal to a
    /// threshold (not greater: the lower branch), NaN (never greater) and infinities.
    #[test]
    fn the_kernel_gives_the_reference_codes() {
        if !PixelTree::serves(Simd::detect()) {
            return; // no AVX-512 here: the pixel trees take the window encoder's path
        }
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
        ] {
            let c_n = d / s;
            let nodes = (1usize << depth) - 1;
            let dims: Vec<usize> = (0..c_n * depth).map(|_| rng.below(s)).collect();
            // thresholds from a few values, which the inputs also take (ties)
            let grid = |r: &mut Rng| (r.below(9) as f32 - 4.0) * 0.25;
            let thresholds: Vec<f32> = (0..c_n * nodes).map(|_| grid(&mut rng)).collect();
            let tree = PixelTree::new(d, s, depth, &dims, &thresholds).expect("the kernel serves these trees");
            for pixels in [1, 16, 37, 1000] {
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
                for pool in &pools {
                    let mut got = vec![0u8; pixels * c_n];
                    pool.install(|| tree.encode(Simd::Avx512, &x, &mut got));
                    assert_eq!(
                        got, want,
                        "{d} channels in codebooks of {s}, depth {depth}, {pixels} pixels"
                    );
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
    }
}
