//! The int8 encoder of pixel codebooks (`PqEncode` with `pixel` and `act_scale` on a
//! channels-last input): each pixel's channels are one row, quantized as
//! [`encode_i8`](super::encode_i8) quantizes (7-bit inputs, int8 prototypes, exact integer
//! distances, so every level gives the codes of [`Quant::nearest`]), 16 pixels at once.
//! The argmin is the maximum over the prototypes of `(dot − hn) << 4 | (15 − k)` (the largest
//! `dot − hn`, ties to the lowest `k`).
//!
//! The kernels put pixels in the lanes (`tile_vnni`: 16 per register, AVX-512 VNNI;
//! `tile_avx2`: 8): the pixels' input words are transposed in registers so one
//! register holds one word of every pixel, each prototype word is broadcast, and the running
//! maximum needs no reduction across lanes; the codes are transposed (or packed) back. Per
//! codebook and prototype that is one `vpdpbusd` (or `vpmaddubsw` + `vpmaddwd`) per 4
//! channels, a shift, an or and a max, over 16 (8) pixels at once. The earlier kernels put a codebook's 16
//! prototypes in the lanes and reduced across them for every pixel (`row_vnni`,
//! `row_avx2`, kept for codebooks of 12 or more than 16 channels): on ResNet-18 w64
//! the pixel-lane kernel took the int8 pixel encoders from 16 % to 7 % of a 64-image run.
//! Codebooks of 4, 8, … channels that tile the pixel and `K = 16` take the kernels; other
//! shapes the reference.

use super::encode_i8::{quantize_into, vnni, Quant};
use super::Simd;

/// Prototypes per codebook the kernels serve.
const K: usize = 16;

/// Pixels quantized at once, and in the lanes of `tile_vnni`.
const TILE: usize = 16;

/// A pixel-lane kernel: `(xq, d, rows, words, neg_hn, out)`, as `x86::tile_vnni` takes them.
type TileKernel = unsafe fn(&[u8], usize, usize, &[i32], &[i32], &mut [u8]);

/// A layer's pixel codebooks in the kernels' layout.
pub struct PixelQuant {
    quant: Quant,
    /// Codebooks and channels per codebook.
    c_n: usize,
    s: usize,
    /// `[c][word][k]`: prototype `k`'s bytes `4·word .. 4·word + 4` of codebook `c`, packed.
    words: Vec<i32>,
    /// `[c][k]`: `−hn`.
    neg_hn: Vec<i32>,
}

impl PixelQuant {
    /// `quant` for rows of `d` channels cut into codebooks of `s`.
    pub fn new(quant: Quant, d: usize, s: usize, k: usize) -> PixelQuant {
        let c_n = d.div_ceil(s.max(1));
        let (mut words, mut neg_hn) = (Vec::new(), Vec::new());
        if k == K && s.is_multiple_of(4) && d == c_n * s {
            let (pq, hn) = (quant.protos(), quant.half_norms());
            for c in 0..c_n {
                for w in 0..s / 4 {
                    for kk in 0..K {
                        let b = &pq[(c * K + kk) * s + 4 * w..][..4];
                        words.push(i32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]));
                    }
                }
                neg_hn.extend(hn[c * K..(c + 1) * K].iter().map(|&h| -h));
            }
        }
        PixelQuant {
            quant,
            c_n,
            s,
            words,
            neg_hn,
        }
    }

    /// Whether the kernels serve these codebooks (else every level runs the reference).
    pub fn kernels(&self) -> bool {
        !self.words.is_empty()
    }

    /// The codes `[rows][c]` of `rows` pixels of `d` channels each (`x`, row-major).
    pub fn encode(&self, level: Simd, x: &[f32], codes: &mut [u8]) {
        let d = self.c_n * self.s;
        let rows = codes.len() / self.c_n.max(1);
        assert!(x.len() >= rows * d || !self.kernels());
        if !self.kernels() || level == Simd::Scalar {
            let d = x.len() / rows.max(1);
            for (r, out) in codes.chunks_exact_mut(self.c_n).enumerate() {
                let row = &x[r * d..(r + 1) * d];
                for (c, code) in out.iter_mut().enumerate() {
                    let hi = ((c + 1) * self.s).min(d);
                    *code = self.quant.nearest(c, &row[c * self.s..hi]);
                }
            }
            return;
        }
        // bands of pixels across the team, each worth a hand-off (≥ 128 Ki multiply-adds);
        // a pixel's codes do not depend on the band it is in
        let band = (1usize << 17).div_ceil(d * K).next_multiple_of(TILE);
        super::team::for_chunks(codes, band * self.c_n, |t, out| {
            self.encode_rows(level, &x[t * band * d..], out)
        });
    }

    /// The kernels' codes of the pixels `codes` holds, from the start of `x`: tiles of
    /// [`TILE`] pixels quantized at once, then for codebooks of 4, 8 or 16 channels the pixels
    /// in the lanes (`tile_vnni` at AVX-512 VNNI, else `tile_avx2` on each half of the tile),
    /// for other codebooks one pixel at a time.
    fn encode_rows(&self, level: Simd, x: &[f32], codes: &mut [u8]) {
        let d = self.c_n * self.s;
        let tile = self.tile_kernel(level);
        let mut xq = vec![0u8; TILE * d];
        for (rows, out) in x.chunks(TILE * d).zip(codes.chunks_mut(TILE * self.c_n)) {
            let n = out.len() / self.c_n;
            quantize_into(level, &rows[..n * d], self.quant.inv(), &mut xq);
            match tile {
                Some((kernel, lanes)) => {
                    for (xq, out) in xq.chunks(lanes * d).zip(out.chunks_mut(lanes * self.c_n)) {
                        // SAFETY: the level's features detected (`tile_kernel`); `xq` holds
                        // `lanes` rows of `d` bytes (the first `out.len() / c_n` this tile's),
                        // the layout `c_n·s/4` words of 16 lanes.
                        unsafe { kernel(xq, d, out.len() / self.c_n, &self.words, &self.neg_hn, out) }
                    }
                }
                None => {
                    for (xq, out) in xq.chunks_exact(d).zip(out.chunks_exact_mut(self.c_n)) {
                        self.row(level, xq, out)
                    }
                }
            }
        }
    }

    /// The pixel-lane kernel for `level` and these codebooks, with the pixels it takes at once:
    /// `tile_vnni` (16) at AVX-512 VNNI, else `tile_avx2` (8), for codebooks of 4, 8 or 16
    /// channels; none otherwise.
    fn tile_kernel(&self, level: Simd) -> Option<(TileKernel, usize)> {
        #[cfg(target_arch = "x86_64")]
        {
            let vnni = level == Simd::Avx512 && vnni();
            let kernel: TileKernel = match (vnni, level, self.s / 4) {
                (true, _, 1) => x86::tile_vnni::<1>,
                (true, _, 2) => x86::tile_vnni::<2>,
                (true, _, 4) => x86::tile_vnni::<4>,
                (false, Simd::Avx2 | Simd::Avx512, 1) => x86::tile_avx2::<1>,
                (false, Simd::Avx2 | Simd::Avx512, 2) => x86::tile_avx2::<2>,
                (false, Simd::Avx2 | Simd::Avx512, 4) => x86::tile_avx2::<4>,
                _ => return None,
            };
            Some((kernel, if vnni { 16 } else { 8 }))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = level;
            None
        }
    }

    /// One quantized pixel's codes, one codebook after another.
    fn row(&self, level: Simd, xq: &[u8], out: &mut [u8]) {
        match level {
            // SAFETY: AVX-512 VNNI and BW detected; `xq` holds the `c_n·s` row bytes and
            // the layout `c_n·s/4` words of 16 lanes.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 if vnni() => unsafe { x86::row_vnni(xq, &self.words, &self.neg_hn, self.s / 4, out) },
            // SAFETY: AVX2 detected (the level, or AVX-512 without VNNI); as above.
            #[cfg(target_arch = "x86_64")]
            _ => unsafe { x86::row_avx2(xq, &self.words, &self.neg_hn, self.s / 4, out) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no SIMD level off x86-64"),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::interp::kernels::{lane_mask256, transpose16_epi32, transpose8_epi32};
    use std::arch::x86_64::*;

    /// One pixel's codes: per codebook the 16 prototypes' `dot − hn` in the lanes, then the
    /// lane of the largest key `(dot − hn) << 4 | (15 − k)`.
    ///
    /// # Safety
    /// AVX-512F, BW and VNNI; `xq` holds `out.len() · 4·wpc` bytes, `words` `out.len() · wpc`
    /// runs of 16 words and `neg_hn` `16 · out.len()` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn row_vnni(xq: &[u8], words: &[i32], neg_hn: &[i32], wpc: usize, out: &mut [u8]) {
        let lanes = _mm512_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        let (x, w, h) = (xq.as_ptr(), words.as_ptr(), neg_hn.as_ptr());
        let key = |c: usize| {
            let mut acc = _mm512_loadu_si512(h.add(16 * c).cast());
            for j in 0..wpc {
                let xw = _mm512_set1_epi32(x.add(4 * (c * wpc + j)).cast::<i32>().read_unaligned());
                acc = _mm512_dpbusd_epi32(acc, xw, _mm512_loadu_si512(w.add(16 * (c * wpc + j)).cast()));
            }
            _mm512_or_si512(_mm512_slli_epi32(acc, 4), lanes)
        };
        // four codebooks' maxima at once: halve each key into a 256-bit half, pair the halves
        // of two keys, then of the pairs, so each 128-bit block holds one codebook's 4 partial
        // maxima, finished inside the block
        let mut c = 0;
        let mut maxima = [0i32; 16];
        while c + 4 <= out.len() {
            let (k0, k1, k2, k3) = (key(c), key(c + 1), key(c + 2), key(c + 3));
            let t01 = _mm512_max_epi32(
                _mm512_shuffle_i64x2::<0b01_00_01_00>(k0, k1),
                _mm512_shuffle_i64x2::<0b11_10_11_10>(k0, k1),
            );
            let t23 = _mm512_max_epi32(
                _mm512_shuffle_i64x2::<0b01_00_01_00>(k2, k3),
                _mm512_shuffle_i64x2::<0b11_10_11_10>(k2, k3),
            );
            let u = _mm512_max_epi32(
                _mm512_shuffle_i64x2::<0b10_00_10_00>(t01, t23),
                _mm512_shuffle_i64x2::<0b11_01_11_01>(t01, t23),
            );
            let v = _mm512_max_epi32(u, _mm512_shuffle_epi32::<0b01_00_11_10>(u));
            let v = _mm512_max_epi32(v, _mm512_shuffle_epi32::<0b10_11_00_01>(v));
            _mm512_storeu_si512(maxima.as_mut_ptr().cast(), v);
            for q in 0..4 {
                out[c + q] = (15 - (maxima[4 * q] & 15)) as u8;
            }
            c += 4;
        }
        for (c, code) in out.iter_mut().enumerate().skip(c) {
            *code = (15 - (_mm512_reduce_max_epi32(key(c)) & 15)) as u8;
        }
    }

    /// The codes of `rows ≤ 16` pixels (quantized, `d` bytes apart in `xq`, which holds 16
    /// such rows) in the lanes: per chunk of 16 input words (`16 / W` codebooks of `W` words)
    /// the 16 pixels' words are transposed so each register holds one word of every pixel,
    /// then per codebook and prototype `k` one `vpdpbusd` against the broadcast prototype
    /// word (per word of the codebook) and a running maximum of the key
    /// `(dot − hn) << 4 | (15 − k)`, as [`row_vnni`] keys the lanes; the chunk's codes are
    /// transposed back and stored as bytes, a pixel's run at a time.
    ///
    /// # Safety
    /// AVX-512F, BW and VNNI; `xq` holds `16·d` bytes, `d = out.len() / rows · 4·W`; `words`
    /// and `neg_hn` as [`row_vnni`] with `wpc = W`, which divides 16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_vnni<const W: usize>(
        xq: &[u8],
        d: usize,
        rows: usize,
        words: &[i32],
        neg_hn: &[i32],
        out: &mut [u8],
    ) {
        let c_n = d / (4 * W);
        debug_assert!(xq.len() >= 16 * d && out.len() == rows * c_n && rows <= 16 && 16 % W == 0);
        let (x, wd, h) = (xq.as_ptr(), words.as_ptr(), neg_hn.as_ptr());
        let fifteen = _mm512_set1_epi32(15);
        let mut c0 = 0;
        while c0 < c_n {
            let cn = (16 / W).min(c_n - c0);
            let wmask = ((1u32 << (cn * W)) - 1) as __mmask16;
            let t = transpose16_epi32(std::array::from_fn(|p| {
                // SAFETY: row p's words c0·W .. (c0 + cn)·W lie in `xq`.
                unsafe { _mm512_maskz_loadu_epi32(wmask, x.add(p * d + 4 * W * c0).cast()) }
            }));
            let mut codes = [_mm512_setzero_si512(); 16];
            for (q, code) in codes.iter_mut().enumerate().take(cn) {
                let c = c0 + q;
                let mut best = _mm512_set1_epi32(i32::MIN);
                for k in 0..16 {
                    let mut acc = _mm512_set1_epi32(*h.add(16 * c + k));
                    for j in 0..W {
                        let pw = _mm512_set1_epi32(*wd.add(16 * (c * W + j) + k));
                        acc = _mm512_dpbusd_epi32(acc, t[q * W + j], pw);
                    }
                    let key = _mm512_or_si512(_mm512_slli_epi32(acc, 4), _mm512_set1_epi32(15 - k as i32));
                    best = _mm512_max_epi32(best, key);
                }
                *code = _mm512_andnot_si512(best, fifteen);
            }
            let codes = transpose16_epi32(codes);
            let omask = ((1u32 << cn) - 1) as __mmask16;
            for (p, code) in codes.iter().enumerate().take(rows) {
                _mm512_mask_cvtepi32_storeu_epi8(out.as_mut_ptr().add(p * c_n + c0).cast(), omask, *code);
            }
            c0 += cn;
        }
    }

    /// [`tile_vnni`] at AVX2: 8 pixels in the lanes, chunks of 8 input words, per prototype
    /// `vpmaddubsw` + `vpmaddwd` as [`row_avx2`]; the codes of 4 codebooks are packed into
    /// the bytes of one word per pixel, a pixel's (up to) 8 codes into one 64-bit value, of
    /// which the chunk's codebooks are stored.
    ///
    /// # Safety
    /// AVX2; `xq` holds `8·d` bytes, `d = out.len() / rows · 4·W`, `rows ≤ 8`; `words` and
    /// `neg_hn` as [`row_vnni`] with `wpc = W`, which divides 8.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tile_avx2<const W: usize>(
        xq: &[u8],
        d: usize,
        rows: usize,
        words: &[i32],
        neg_hn: &[i32],
        out: &mut [u8],
    ) {
        let c_n = d / (4 * W);
        debug_assert!(xq.len() >= 8 * d && out.len() == rows * c_n && rows <= 8 && 8 % W == 0);
        let (x, wd, h) = (xq.as_ptr(), words.as_ptr(), neg_hn.as_ptr());
        let (fifteen, ones) = (_mm256_set1_epi32(15), _mm256_set1_epi16(1));
        let mut c0 = 0;
        while c0 < c_n {
            let cn = (8 / W).min(c_n - c0);
            let nw = cn * W;
            let t = transpose8_epi32(std::array::from_fn(|p| {
                // SAFETY: row p's words c0·W .. (c0 + cn)·W lie in `xq`.
                unsafe {
                    let at = x.add(p * d + 4 * W * c0);
                    match nw {
                        8 => _mm256_loadu_si256(at.cast()),
                        _ => _mm256_maskload_epi32(at.cast(), lane_mask256(nw)),
                    }
                }
            }));
            let mut codes = [_mm256_setzero_si256(); 8];
            for (q, code) in codes.iter_mut().enumerate().take(cn) {
                let c = c0 + q;
                let mut best = _mm256_set1_epi32(i32::MIN);
                for k in 0..16 {
                    let mut acc = _mm256_set1_epi32(*h.add(16 * c + k));
                    for j in 0..W {
                        let pw = _mm256_set1_epi32(*wd.add(16 * (c * W + j) + k));
                        let prod = _mm256_maddubs_epi16(t[q * W + j], pw);
                        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(prod, ones));
                    }
                    let key = _mm256_or_si256(_mm256_slli_epi32(acc, 4), _mm256_set1_epi32(15 - k as i32));
                    best = _mm256_max_epi32(best, key);
                }
                *code = _mm256_andnot_si256(best, fifteen);
            }
            // bytes q of codebooks 4h + q in word h of each pixel, then per pixel its two words
            let pack = |c: &[__m256i]| {
                let lo = _mm256_or_si256(c[0], _mm256_slli_epi32(c[1], 8));
                let hi = _mm256_or_si256(_mm256_slli_epi32(c[2], 16), _mm256_slli_epi32(c[3], 24));
                _mm256_or_si256(lo, hi)
            };
            let (w0, w1) = (pack(&codes[..4]), pack(&codes[4..]));
            let mut px = [0u64; 8];
            // 64-bit lanes: pixels 0, 1, 4, 5 from the low interleave, 2, 3, 6, 7 from the high
            _mm256_storeu_si256(px.as_mut_ptr().cast(), _mm256_unpacklo_epi32(w0, w1));
            _mm256_storeu_si256(px.as_mut_ptr().add(4).cast(), _mm256_unpackhi_epi32(w0, w1));
            for (p, at) in [0, 1, 4, 5, 2, 3, 6, 7].into_iter().enumerate() {
                if p < rows {
                    let bytes = px[at].to_le_bytes();
                    let dst = &mut out[p * c_n + c0..][..cn];
                    match cn {
                        8 => dst.copy_from_slice(&bytes),
                        _ => dst.copy_from_slice(&bytes[..cn]),
                    }
                }
            }
            c0 += cn;
        }
    }

    /// [`row_vnni`] at AVX2: the 16 lanes as two halves of 8; `vpmaddubsw` adds two
    /// products of at most 127·127 per 16-bit lane, below `i16::MAX`, so no saturation.
    ///
    /// # Safety
    /// AVX2; as [`row_vnni`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn row_avx2(xq: &[u8], words: &[i32], neg_hn: &[i32], wpc: usize, out: &mut [u8]) {
        let lanes = [
            _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8),
            _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0),
        ];
        let ones = _mm256_set1_epi16(1);
        let (x, w, h) = (xq.as_ptr(), words.as_ptr(), neg_hn.as_ptr());
        for (c, code) in out.iter_mut().enumerate() {
            let mut acc = [
                _mm256_loadu_si256(h.add(16 * c).cast()),
                _mm256_loadu_si256(h.add(16 * c + 8).cast()),
            ];
            for j in 0..wpc {
                let xw = _mm256_set1_epi32(x.add(4 * (c * wpc + j)).cast::<i32>().read_unaligned());
                let at = w.add(16 * (c * wpc + j));
                for (half, a) in acc.iter_mut().enumerate() {
                    let p = _mm256_maddubs_epi16(xw, _mm256_loadu_si256(at.add(8 * half).cast()));
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(p, ones));
                }
            }
            let key = |half: usize| _mm256_or_si256(_mm256_slli_epi32(acc[half], 4), lanes[half]);
            let m = _mm256_max_epi32(key(0), key(1));
            let m = _mm256_max_epi32(m, _mm256_permute2x128_si256(m, m, 1));
            let m = _mm256_max_epi32(m, _mm256_shuffle_epi32(m, 0b01_00_11_10));
            let m = _mm256_max_epi32(m, _mm256_shuffle_epi32(m, 0b10_11_00_01));
            *code = (15 - (_mm256_cvtsi256_si32(m) & 15)) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pq::rng::Rng;

    /// Every level, on one thread and on two (300 pixels of 64 channels are three bands; they
    /// run inline when another test holds the team),
    /// gives the reference's codes ([`Quant::nearest`] per codebook), on inputs with
    /// negatives, zeros, values past the 127 clamp and NaN, for codebooks of 4, 8 and 16
    /// channels (the pixel-lane kernels: whole and partial chunks of codebooks, a partial
    /// last tile of pixels) and of 12 and 32 (the per-pixel kernels); codes vary, and a
    /// prototype equal to an earlier one never wins (ties go to the lower index).
    #[test]
    fn every_level_gives_the_reference_codes() {
        let mut rng = Rng::new(3);
        let pools = [1, 2].map(|t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap());
        for (d, s) in [
            (64, 8),
            (48, 4),
            (32, 16),
            (48, 12),
            (64, 32),
            (56, 8),
            (24, 4),
            (80, 4),
            (128, 4),
            (96, 16),
        ] {
            let mut protos: Vec<f32> = (0..(d / s) * K * s)
                .map(|_| rng.next_f64() as f32 * 3.0 - 0.5)
                .collect();
            // prototype 5 of every codebook is prototype 2 again: a tie, to the lower index
            for c in 0..d / s {
                protos.copy_within((c * K + 2) * s..(c * K + 3) * s, (c * K + 5) * s);
            }
            let rows = 300;
            let mut x: Vec<f32> = (0..rows * d).map(|_| rng.next_f64() as f32 * 2.5 - 0.3).collect();
            x[5] = f32::NAN;
            x[70] = 1e9;
            x[71] = -1e9;
            let pq = PixelQuant::new(Quant::new(&protos, K, s, 0.02), d, s, K);
            assert!(pq.kernels());
            let mut want = vec![0u8; rows * (d / s)];
            pq.encode(Simd::Scalar, &x, &mut want);
            let distinct: std::collections::BTreeSet<u8> = want.iter().copied().collect();
            assert!(distinct.len() >= 8, "{d}/{s}: codes vary ({distinct:?})");
            assert!(
                distinct.contains(&2) && !distinct.contains(&5),
                "{d}/{s}: ties ({distinct:?})"
            );
            for level in Simd::available() {
                for pool in &pools {
                    let mut got = vec![0u8; want.len()];
                    pool.install(|| pq.encode(level, &x, &mut got));
                    let threads = pool.current_num_threads();
                    assert_eq!(got, want, "{d}/{s} at {}, {threads} threads", level.name());
                }
            }
        }
    }
}
