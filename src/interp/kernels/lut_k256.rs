//! `k == 256` lookup kernel: AVX-512 VBMI `vpermi2b`.
//!
//! A 256-entry int8 table row is four zmm registers. `vpermi2b` looks up 64 bytes in a
//! 128-entry table held in two registers (index bits 0–6; bit 7 ignored); with merge masking it
//! keeps the *index* byte where its mask bit is clear. So a full 256-entry lookup of the codes `x`
//! is two chained instructions and no blend:
//!
//! ```text
//! r = vpermi2b{!bit7(x)}(T[0..64], x, T[64..128])    // codes < 128 looked up, others keep x
//! r = vpermi2b{ bit7(x)}(T[128..192], r, T[192..256]) // codes ≥ 128 (their index still in r)
//! ```
//!
//! The bit-7 masks are computed once per block of packed codes (`vpmovb2m`) and reused by every
//! output. The two codebooks of a pair are then summed exactly as in the `k == 16` kernels (the
//! `x86` module of `lut.rs`): the codes are arranged so that one byte blend puts a row's two
//! values side by side, and `vpmaddubsw` with all-ones weights adds them into an i16 lane.
//! Packed layout of a block of `R = 64` rows, per codebook pair `j` (`H = 32`):
//!
//! | byte      | `x0` (codebook 2j) | `x1` (codebook 2j+1) |
//! |-----------|--------------------|----------------------|
//! | `2i`      | row `i`            | row `i + H`          |
//! | `2i + 1`  | row `i + H`        | row `i`              |
//!
//! With `lo = T_2j[x0]`, `hi = T_2j+1[x1]`: `blend(odd; lo, hi)` holds row `i`'s two values in
//! bytes `2i, 2i+1`, `blend(odd; hi, lo)` row `i + H`'s. Padding rows get code 0 (their outputs
//! are dropped); an odd last codebook's partner is looked up in an all-zero table.
//!
//! Overflow: as for `k == 16`, an i16 lane that has summed `p ≤ 128` pairs is within
//! `[-256·p, 254·p]`; the accumulators are flushed to i32 after at most [`FLUSH_PAIRS`] pairs.
//!
//! Loop order: the tables are the big operand (`c·m·256` bytes). For each output and codebook
//! pair, the pair's eight table registers are loaded once and used for every block of rows of
//! the call (up to [`RB_MAX`] blocks, 256 rows), whose i16 sums stay in registers.

use std::arch::x86_64::*;

/// Rows per block.
pub(super) const R: usize = 64;
/// Blocks of rows sharing one load of a pair's tables (their sums stay in registers).
pub(super) const RB_MAX: usize = 4;
/// Codebook pairs summed in i16 before a flush to i32 (`FLUSH_PAIRS · 256 ≤ 32768`).
const FLUSH_PAIRS: usize = 64;
const _: () = assert!(FLUSH_PAIRS >= 1 && FLUSH_PAIRS * 256 <= 32768);

/// The table of the missing partner of an odd last codebook.
static ZERO_TABLE: [i8; 256] = [0; 256];

/// Bytes of one pair of a packed block: `x0` then `x1`.
const PAIR_BYTES: usize = 2 * R;

/// Packs a block of `nb <= 64` rows (`codes`: `nb × c`) into `dst` (`ceil(c/2) × 128` bytes) and
/// the bit-7 masks of its `x0`/`x1` vectors into `masks` (`ceil(c/2) × 2`).
#[target_feature(enable = "avx2,avx512f,avx512bw")]
fn pack(codes: &[u8], nb: usize, c: usize, dst: &mut [u8], masks: &mut [u64]) {
    let np = c.div_ceil(2);
    assert!(nb <= R && codes.len() == nb * c && dst.len() == np * PAIR_BYTES && masks.len() == 2 * np);
    dst.fill(0);
    for (i, row) in codes.chunks_exact(c).enumerate() {
        // byte of row i in x0 (codebook 2j) and in x1 (codebook 2j+1)
        let (e, o) = if i < R / 2 {
            (2 * i, 2 * i + 1)
        } else {
            (2 * (i - R / 2) + 1, 2 * (i - R / 2))
        };
        for (pair, d) in row.chunks(2).zip(dst.chunks_exact_mut(PAIR_BYTES)) {
            d[e] = pair[0];
            if let Some(&v) = pair.get(1) {
                d[R + o] = v;
            }
        }
    }
    for (v, m) in dst.chunks_exact(R).zip(masks.iter_mut()) {
        // SAFETY: v is 64 bytes.
        *m = _mm512_movepi8_mask(unsafe { _mm512_loadu_si512(v.as_ptr().cast()) });
    }
}

/// A 256-entry lookup of the 64 codes `x` (bit-7 mask `hi`) in the table `t` (four registers).
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vbmi")]
#[inline]
fn lookup(t: &[__m512i; 4], x: __m512i, hi: __mmask64) -> __m512i {
    let r = _mm512_mask2_permutex2var_epi8(t[0], x, !hi, t[1]);
    _mm512_mask2_permutex2var_epi8(t[2], r, hi, t[3])
}

/// The four registers of a 256-byte table row.
///
/// # Safety
/// `p` points to 256 readable bytes.
#[target_feature(enable = "avx2,avx512f")]
#[inline]
unsafe fn table(p: *const i8) -> [__m512i; 4] {
    // SAFETY: guaranteed by the caller.
    std::array::from_fn(|q| unsafe { _mm512_loadu_si512(p.add(64 * q).cast()) })
}

/// The codebook pairs `p0..p1` of output `mi` for `RB` blocks of rows, added into `acc` (block
/// `rb`'s 64 sums of this output at `acc[rb·acc_stride..][..64]`).
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vbmi")]
#[allow(clippy::too_many_arguments)]
fn output<const RB: usize>(
    packed: &[u8],
    masks: &[u64],
    np: usize,
    tables: &[i8],
    c: usize,
    m: usize,
    mi: usize,
    (p0, p1): (usize, usize),
    acc: &mut [i32],
    acc_stride: usize,
) {
    const ODD: __mmask64 = 0xAAAA_AAAA_AAAA_AAAA;
    assert!(p0 <= p1 && p1 <= np && np == c.div_ceil(2) && p1 - p0 <= FLUSH_PAIRS && mi < m);
    assert!(packed.len() >= RB * np * PAIR_BYTES && masks.len() >= RB * np * 2);
    assert!(tables.len() == c * m * 256 && acc.len() >= (RB - 1) * acc_stride + R);
    let ones = _mm512_set1_epi8(1);
    let mut a = [_mm512_setzero_si512(); RB];
    let mut b = [_mm512_setzero_si512(); RB];
    for j in p0..p1 {
        // SAFETY: codebook 2j < c (j < np), so its row of output mi is inside `tables`; the
        // partner's too when 2j + 1 < c, else the zero table.
        let (t, u) = unsafe {
            let tl = tables.as_ptr().add((2 * j * m + mi) * 256);
            let th = if 2 * j + 1 < c {
                tables.as_ptr().add(((2 * j + 1) * m + mi) * 256)
            } else {
                ZERO_TABLE.as_ptr()
            };
            (table(tl), table(th))
        };
        for rb in 0..RB {
            let at = (rb * np + j) * PAIR_BYTES;
            // SAFETY: at + 128 <= RB·np·128 <= packed.len().
            let (x0, x1) = unsafe {
                let p = packed.as_ptr().add(at);
                (_mm512_loadu_si512(p.cast()), _mm512_loadu_si512(p.add(R).cast()))
            };
            let mk = (rb * np + j) * 2;
            let lo = lookup(&t, x0, masks[mk]);
            let hi = lookup(&u, x1, masks[mk + 1]);
            a[rb] = _mm512_add_epi16(a[rb], _mm512_maddubs_epi16(ones, _mm512_mask_blend_epi8(ODD, lo, hi)));
            b[rb] = _mm512_add_epi16(b[rb], _mm512_maddubs_epi16(ones, _mm512_mask_blend_epi8(ODD, hi, lo)));
        }
    }
    for rb in 0..RB {
        let rows = [
            _mm512_cvtepi16_epi32(_mm512_castsi512_si256(a[rb])),
            _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64::<1>(a[rb])),
            _mm512_cvtepi16_epi32(_mm512_castsi512_si256(b[rb])),
            _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64::<1>(b[rb])),
        ];
        for (d, v) in acc[rb * acc_stride..][..R].chunks_exact_mut(16).zip(rows) {
            // SAFETY: d is 16 i32.
            unsafe {
                let p = d.as_mut_ptr().cast();
                _mm512_storeu_si512(p, _mm512_add_epi32(_mm512_loadu_si512(p), v));
            }
        }
    }
}

/// VBMI kernel over `nr` rows (`codes`: `nr × c`, codes any byte; `tables`: `[c][m][256]`;
/// `out`: `nr × m`). `packed`, `masks` and `acc` are scratch.
///
/// # Safety
/// The CPU supports AVX2, AVX-512F/BW and AVX-512 VBMI.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn vbmi_i8(
    codes: &[u8],
    nr: usize,
    c: usize,
    tables: &[i8],
    m: usize,
    out: &mut [i32],
    packed: &mut Vec<u8>,
    masks: &mut Vec<u64>,
    acc: &mut Vec<i32>,
) {
    assert!(codes.len() == nr * c && tables.len() == c * m * 256 && out.len() == nr * m && c >= 1);
    let np = c.div_ceil(2);
    let nsb = nr.div_ceil(R);
    packed.resize(nsb * np * PAIR_BYTES, 0);
    masks.resize(nsb * np * 2, 0);
    for (sb, (dst, mk)) in packed
        .chunks_exact_mut(np * PAIR_BYTES)
        .zip(masks.chunks_exact_mut(np * 2))
        .enumerate()
    {
        let nb = (nr - sb * R).min(R);
        // SAFETY: the caller guarantees the instruction set.
        unsafe { pack(&codes[sb * R * c..(sb * R + nb) * c], nb, c, dst, mk) };
    }
    acc.clear();
    acc.resize(nsb * m * R, 0);
    let stride = m * R;
    for p0 in (0..np).step_by(FLUSH_PAIRS) {
        let p1 = (p0 + FLUSH_PAIRS).min(np);
        for mi in 0..m {
            for sb0 in (0..nsb).step_by(RB_MAX) {
                let rb = (nsb - sb0).min(RB_MAX);
                let pk = &packed[sb0 * np * PAIR_BYTES..];
                let mk = &masks[sb0 * np * 2..];
                let ac = &mut acc[sb0 * stride + mi * R..];
                let ps = (p0, p1);
                // SAFETY: the caller guarantees the instruction set.
                unsafe {
                    match rb {
                        4 => output::<4>(pk, mk, np, tables, c, m, mi, ps, ac, stride),
                        3 => output::<3>(pk, mk, np, tables, c, m, mi, ps, ac, stride),
                        2 => output::<2>(pk, mk, np, tables, c, m, mi, ps, ac, stride),
                        1 => output::<1>(pk, mk, np, tables, c, m, mi, ps, ac, stride),
                        _ => unreachable!(),
                    }
                }
            }
        }
    }
    for (acc, out) in acc.chunks_exact(stride).zip(out.chunks_mut(R * m)) {
        // SAFETY: the caller guarantees AVX2.
        unsafe { super::x86::store_rows(acc, R, m, out.len() / m, out) };
    }
}
