//! The int8 encoder of pixel codebooks (`PqEncode` with `pixel` and `act_scale` on a
//! channels-last input): each pixel's channels are one row, quantized once as
//! [`encode_i8`](super::encode_i8) quantizes (7-bit inputs, int8 prototypes, exact integer
//! distances, so every level gives the codes of [`Quant::nearest`]), and each codebook's
//! 16 prototypes sit in the lanes of one vector: per 4 channels of a codebook one `vpdpbusd`
//! (AVX-512 VNNI) or `vpmaddubsw` + `vpmaddwd` over two 8-lane halves (AVX2) against the
//! broadcast input word, then the argmin as the maximum over the lanes of
//! `(hn-less dot << 4) | (15 − k)` (the largest `dot − hn`, ties to the lowest `k`).
//! Codebooks of 4, 8, … channels that tile the pixel and `K = 16` take the kernels; other
//! shapes the reference.

use super::encode_i8::{quantize_into, vnni, Quant};
use super::Simd;

/// Prototypes per codebook the kernels serve.
const K: usize = 16;

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
        let band = (1usize << 17).div_ceil(d * K).max(1);
        super::team::for_chunks(codes, band * self.c_n, |t, out| {
            self.encode_rows(level, &x[t * band * d..], out)
        });
    }

    /// The kernels' codes of the pixels `codes` holds, from the start of `x`.
    fn encode_rows(&self, level: Simd, x: &[f32], codes: &mut [u8]) {
        let d = self.c_n * self.s;
        let mut xq = vec![0u8; d.div_ceil(16) * 16];
        for (row, out) in x.chunks_exact(d).zip(codes.chunks_exact_mut(self.c_n)) {
            quantize_into(level, row, self.quant.inv(), &mut xq);
            match level {
                // SAFETY: AVX-512 VNNI and BW detected; `xq` holds the `c_n·s` row bytes and
                // the layout `c_n·s/4` words of 16 lanes.
                #[cfg(target_arch = "x86_64")]
                Simd::Avx512 if vnni() => unsafe { x86::row_vnni(&xq, &self.words, &self.neg_hn, self.s / 4, out) },
                // SAFETY: AVX2 detected (the level, or AVX-512 without VNNI); as above.
                #[cfg(target_arch = "x86_64")]
                _ => unsafe { x86::row_avx2(&xq, &self.words, &self.neg_hn, self.s / 4, out) },
                #[cfg(not(target_arch = "x86_64"))]
                _ => unreachable!("no SIMD level off x86-64"),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
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
    /// negatives, zeros, values past the 127 clamp and NaN, for codebooks of 4 and 8
    /// channels; codes vary.
    #[test]
    fn every_level_gives_the_reference_codes() {
        let mut rng = Rng::new(3);
        let pools = [1, 2].map(|t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap());
        for (d, s) in [(64, 8), (48, 4), (32, 16), (56, 8), (24, 4)] {
            let protos: Vec<f32> = (0..(d / s) * K * s)
                .map(|_| rng.next_f64() as f32 * 3.0 - 0.5)
                .collect();
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
