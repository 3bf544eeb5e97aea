//! The int8 argmin encoder (`PqEncode` with `act_scale`, LUT-NN's quantized encoder): inputs
//! become 7-bit unsigned integers, prototypes int8 per codebook, and the distances are exact
//! i32 sums, so every SIMD level, row layout and thread count gives the same codes by
//! construction. Definition ([`Quant`] is the reference):
//! - an input value `v` reads as `q(v) = clamp(round_half_even(v · (1/act_scale)), 0, 127)`
//!   (NaN → 0; inputs are meant to be non-negative, as after a ReLU: negatives read as 0);
//! - codebook `c`: `sp = max |p| / 127` over its prototypes, `pq = round(p / sp)` in
//!   `[−127, 127]`;
//! - `hn[c][k] = round(sp · Σ pq² / (2·act_scale))`, clamped to `[0, 2²³]`;
//! - code = `argmin_k hn[c][k] − Σ q(x)·pq[c][k]`, ties to the lowest `k`:
//!   the f32 argmin `‖p‖²/2 − x·p` in units of `act_scale · sp`.
//!
//! The channel-lane kernels (a channels-last 3×3-like convolution, one codebook per input
//! channel, `k = 16`) first write each band of input rows as "tap words": per (input row,
//! output column, channel) the 4 bytes `q(x)` of the kernel row's `kw ≤ 4` taps. A kernel row of
//! 16 channels is then one 64-byte load, and one `vpdpbusd` (AVX-512 VNNI) or `vpmaddubsw` +
//! `vpmaddwd` (AVX2; exact since `2·127·127 < 2¹⁵`) does its multiply-adds for one prototype.
//! The argmin keeps `(sum << 4) | (15 − k)` per lane and takes the maximum: one instruction per
//! prototype instead of a compare and two blends. At AVX2 the shift is free: `vpmaddwd` by 16
//! instead of 1 and sums that start at the key of `−hn`, so one `vpmaxsd` per prototype is the
//! whole argmin (with two pixels of 4 prototypes in registers, no spills). On Zen 3 this made the
//! whole encoder (quantization and tap words included) 2.6–2.9× faster at stride 1 and 1.9× at
//! stride 2 than the earlier three-pixel kernel (`quantized_encode_throughput`, same run).

use super::encode::Rows;
use super::Simd;
use crate::pq::Subspaces;
use std::cell::RefCell;

/// Largest quantized input value (7 bits: `vpmaddubsw` pairs cannot saturate).
const QMAX: f32 = 127.0;
/// Largest half norm kept: distances stay exact in f32 (the standard ONNX form) and below
/// `2³¹` after the 4-bit index shift.
const HN_MAX: f64 = (1u32 << 23) as f64;
/// Channels per lane group, and the `k` the channel-lane kernels take.
const CL: usize = 16;
const K: usize = 16;
/// Most kernel rows the channel-lane kernel lists per output row.
const MAX_KH: usize = 16;

/// Whether `act_scale` can scale the int8 encoder's inputs: a positive normal float whose
/// inverse is finite.
pub fn valid_act_scale(act_scale: f32) -> bool {
    act_scale.is_normal() && act_scale > 0.0 && (1.0 / act_scale).is_finite()
}

/// `q(v)` for `inv = 1/act_scale` (see the module doc).
#[inline(always)]
pub fn quantize(v: f32, inv: f32) -> u8 {
    // NaN stays NaN through `clamp` and converts to 0 (the kernels' `vmaxps` returns the 0)
    (v * inv).clamp(0.0, QMAX).round_ties_even() as u8
}

/// A layer's int8 codebooks: the reference encoder, and what the kernels are built from.
pub struct Quant {
    k: usize,
    s: usize,
    inv: f32,
    /// `[c][k][s]`
    pq: Vec<i8>,
    /// `[c][k]`
    hn: Vec<i32>,
}

impl Quant {
    /// Quantize prototypes `[c][k][s]` for inputs scaled by `act_scale` ([`valid_act_scale`]).
    pub fn new(protos: &[f32], k: usize, s: usize, act_scale: f32) -> Quant {
        Quant::with_norms(protos, None, k, s, act_scale)
    }

    /// [`Quant::new`] for the codes `argmin_k norms[c][k] − 2 x·p_k` when `norms` (`[c][k]`) is
    /// given: `hn[c][k] = round((norms[c][k] − low) / (2·act_scale·sp))`, `low` the least finite
    /// norm of the codebook (0 if none; taking it off changes no code), `sp` read as 1 when the
    /// prototypes are all 0, clamped as above (non-finite values read as `2²³`).
    pub fn with_norms(protos: &[f32], norms: Option<&[f32]>, k: usize, s: usize, act_scale: f32) -> Quant {
        assert!(valid_act_scale(act_scale), "act_scale {act_scale}");
        assert!(k > 0 && s > 0 && protos.len().is_multiple_of(k * s));
        assert!(norms.is_none_or(|n| n.len() * s == protos.len()));
        let mut pq = Vec::with_capacity(protos.len());
        let mut hn = Vec::with_capacity(protos.len() / s);
        for (c, cb) in protos.chunks(k * s).enumerate() {
            let max = cb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let sp = max / QMAX;
            let given = norms.map(|n| &n[c * k..(c + 1) * k]);
            // the least finite norm (0 if none); prototypes all 0: the norms alone decide
            let low = given.map_or(0.0, |n| {
                let m = n
                    .iter()
                    .filter(|v| v.is_finite())
                    .fold(f64::INFINITY, |m, &v| m.min(v as f64));
                if m.is_finite() {
                    m
                } else {
                    0.0
                }
            });
            let unit = if sp > 0.0 { sp as f64 } else { 1.0 };
            for (kk, p) in cb.chunks(s).enumerate() {
                let q: Vec<i8> = p
                    .iter()
                    .map(|&v| {
                        if sp > 0.0 {
                            (v / sp).round().clamp(-QMAX, QMAX) as i8
                        } else {
                            0
                        }
                    })
                    .collect();
                let h = match given {
                    Some(n) => ((n[kk] as f64 - low) / (2.0 * act_scale as f64 * unit)).round(),
                    None => {
                        let sq: i64 = q.iter().map(|&v| v as i64 * v as i64).sum();
                        (sp as f64 * sq as f64 / (2.0 * act_scale as f64)).round()
                    }
                };
                hn.push(if h.is_finite() {
                    h.clamp(0.0, HN_MAX) as i32
                } else {
                    HN_MAX as i32
                });
                pq.extend(q);
            }
        }
        Quant {
            k,
            s,
            inv: 1.0 / act_scale,
            pq,
            hn,
        }
    }

    /// The integer prototypes `[c][k][s]`.
    pub fn protos(&self) -> &[i8] {
        &self.pq
    }

    /// The integer half norms `hn`, `[c][k]`.
    pub fn half_norms(&self) -> &[i32] {
        &self.hn
    }

    /// `1/act_scale`, as [`quantize`] takes it.
    pub fn inv(&self) -> f32 {
        self.inv
    }

    /// The code of codebook `c` for one row's subvector `x` (`s` values; shorter: the rest read
    /// as 0).
    pub fn nearest(&self, c: usize, x: &[f32]) -> u8 {
        // quantized once, not once per prototype (`quantize` rounds through a libm call on
        // baseline x86-64)
        let mut buf = [0u8; 64];
        if x.len() <= buf.len() {
            for (q, &v) in buf.iter_mut().zip(x) {
                *q = quantize(v, self.inv);
            }
            self.nearest_quantized(c, &buf[..x.len()])
        } else {
            let xq: Vec<u8> = x.iter().map(|&v| quantize(v, self.inv)).collect();
            self.nearest_quantized(c, &xq)
        }
    }

    /// `q(x)` of each value of `x`, as [`Quant::nearest`] reads it.
    pub fn quantized<'a>(&self, x: &'a [f32]) -> impl Iterator<Item = u8> + 'a {
        let inv = self.inv;
        x.iter().map(move |&v| quantize(v, inv))
    }

    /// [`Quant::nearest`] for a subvector already quantized (`q(x)` for this scale).
    pub fn nearest_quantized(&self, c: usize, xq: &[u8]) -> u8 {
        let mut best = (i64::MAX, 0);
        for kk in 0..self.k {
            let p = &self.pq[(c * self.k + kk) * self.s..][..self.s];
            let dot: i64 = xq.iter().zip(p).map(|(&q, &w)| (q as i32 * w as i32) as i64).sum();
            let d = self.hn[c * self.k + kk] as i64 - dot;
            if d < best.0 {
                best = (d, kk);
            }
        }
        best.1 as u8
    }

    /// [`Quant::nearest_quantized`] of codebook `c` for each of `rows` (subvectors `q(x)` of
    /// `s` values); the codes are appended to `out`. Sixteen rows at a time in lanes (as
    /// [`Quant::nearest_tile`]), the same codes as one row at a time.
    pub fn nearest_quantized_rows<'a>(&self, c: usize, rows: impl IntoIterator<Item = &'a [u8]>, out: &mut Vec<u8>) {
        let s = self.s;
        let mut rows = rows.into_iter();
        if s > 64 {
            out.extend(rows.map(|r| self.nearest_quantized(c, r)));
            return;
        }
        let mut tile = [[0i32; 16]; 64];
        loop {
            let mut n = 0;
            for (l, r) in rows.by_ref().take(16).enumerate() {
                for (t, &v) in r[..s].iter().enumerate() {
                    tile[t][l] = v as i32;
                }
                n = l + 1;
            }
            if n == 0 {
                return;
            }
            let codes = self.nearest_lanes(c, &tile[..s]);
            out.extend(codes[..n].iter().map(|&k| k as u8));
        }
    }

    /// The codes of codebook `c` for 16 quantized subvectors in lanes (`xq[tap][lane]`, `s ≤ 64`
    /// taps): `hn − dot` is below `2²³ + 64·127·127 < 2³¹`, exact in i32.
    #[inline(always)]
    fn nearest_lanes(&self, c: usize, xq: &[[i32; 16]]) -> [u32; 16] {
        let n = xq.len();
        let mut best_d = [i32::MAX; 16];
        let mut best_k = [0u32; 16];
        for kk in 0..self.k {
            let p = &self.pq[(c * self.k + kk) * self.s..][..n];
            let mut acc = [self.hn[c * self.k + kk]; 16];
            for (q, &w) in xq.iter().zip(p) {
                for l in 0..16 {
                    acc[l] -= q[l] * w as i32;
                }
            }
            for l in 0..16 {
                if acc[l] < best_d[l] {
                    best_d[l] = acc[l];
                    best_k[l] = kk as u32;
                }
            }
        }
        best_k
    }

    /// [`Quant::nearest`] of codebook `c` for 16 rows given as columns `xt[col][lane]`
    /// (codebooks past 64 values one row at a time).
    #[inline(always)]
    pub fn nearest_tile(&self, xt: &[[f32; 16]], sub: Subspaces, c: usize) -> [u32; 16] {
        let range = sub.range(c);
        if range.len() > 64 {
            return std::array::from_fn(|l| {
                let x: Vec<f32> = range.clone().map(|col| xt[col][l]).collect();
                self.nearest(c, &x) as u32
            });
        }
        let mut xq = [[0i32; 16]; 64];
        let n = range.len();
        for (q, col) in xq.iter_mut().zip(range.clone()) {
            for l in 0..16 {
                q[l] = quantize(xt[col][l], self.inv) as i32;
            }
        }
        self.nearest_lanes(c, &xq[..n])
    }
}

/// A 64-byte aligned vector: 16 lanes of 4 bytes (tap words, prototype words) or 16 i32.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct V64([i32; 16]);

/// The channel-lane layout of a convolution's int8 codebooks (one codebook per input channel,
/// `s = kh·kw`, `kw ≤ 4`, `k = 16`).
pub struct QuantLanes {
    channels: usize,
    kernel: [usize; 2],
    groups: usize,
    inv: f32,
    /// `[group][kernel row][k]`: lane `l` holds channel `16·group + l`'s prototype values of that
    /// kernel row, one byte per tap (bytes past `kw`: 0).
    pq: Vec<V64>,
    /// `[group][k]`: `−hn` per lane (missing channels: 0).
    init: Vec<V64>,
    /// `[group][k]`: the argmin key's start `16·(−hn) + 15 − k` per lane, for kernels that
    /// accumulate `16·dot` (see [`x86::nearest_avx2`]).
    keys: Vec<V64>,
}

impl QuantLanes {
    /// The layout for a channels-last convolution of `channels` input channels and kernel
    /// `[kh, kw]`, or None where the kernels do not apply.
    pub fn new(q: &Quant, sub: Subspaces, channels: usize, [kh, kw]: [usize; 2]) -> Option<QuantLanes> {
        if q.k != K || kw > 4 || kh > MAX_KH || sub.s != kh * kw || sub.d != channels * kh * kw || q.s != sub.s {
            return None;
        }
        let groups = channels.div_ceil(CL);
        let mut pq = vec![V64::default(); groups * kh * K];
        let mut init = vec![V64::default(); groups * K];
        for ch in 0..channels {
            let (g, l) = (ch / CL, ch % CL);
            for kk in 0..K {
                let p = &q.pq[(ch * K + kk) * q.s..][..q.s];
                for i in 0..kh {
                    let mut b = [0u8; 4];
                    for j in 0..kw {
                        b[j] = p[i * kw + j] as u8;
                    }
                    pq[(g * kh + i) * K + kk].0[l] = i32::from_le_bytes(b);
                }
                init[g * K + kk].0[l] = -q.hn[ch * K + kk];
            }
        }
        let keys = keys_of(&init);
        Some(QuantLanes {
            channels,
            kernel: [kh, kw],
            groups,
            inv: q.inv,
            pq,
            init,
            keys,
        })
    }

    pub fn channels(&self) -> usize {
        self.channels
    }
}

/// The argmin keys' starts `16·(−hn) + 15 − k` of `−hn` words `[..][k]` (see [`QuantLanes`]).
fn keys_of(init: &[V64]) -> Vec<V64> {
    init.iter()
        .enumerate()
        .map(|(i, v)| V64(v.0.map(|h| (h << 4) | (15 - (i % K) as i32))))
        .collect()
}

/// A band's quantized input rows (one image at a time), tap words, per image its first input
/// row and where its words start, and per output pixel where its words start and the kernel
/// rows inside the image.
type Scratch = (Vec<u8>, Vec<V64>, Vec<(usize, usize)>, Vec<(isize, u32, u32)>);

thread_local! {
    /// Each thread's scratch, reused across calls (a band is up to a few hundred KiB).
    static SCRATCH: RefCell<Scratch> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new(), Vec::new())) };
}

/// Encode channels-last conv rows with [`QuantLanes`] at `level`: `codes` is `rows × channels`.
/// Work is split into bands of output rows: runs of whole images for small maps, else parts of
/// one image (at least 4 bands per thread where the batch allows and there is more than one
/// thread, at most ~128 KiB of tap words each). Codes do not depend on the split.
pub fn encode_lanes(level: Simd, rows: &Rows, ql: &QuantLanes, codes: &mut [u8]) {
    let Rows::ConvNhwc { shape, geo, .. } = rows else {
        unreachable!("quantized channel lanes need channels-last rows")
    };
    let [n, ..] = *shape;
    let [oh, ow] = geo.out;
    let row_len = ow * ql.channels;
    if n == 0 || row_len == 0 || oh == 0 {
        return;
    }
    // on one thread bands only add halo rows (quantized and turned into words again)
    let tasks = match super::team::threads() {
        1 => 1,
        t => 4 * t,
    };
    // enough work per band to pay a hand-off (~1 µs): ≥ 128 Ki multiply-adds
    let per_row = row_len * K * ql.kernel[0] * ql.kernel[1];
    let min_rows = (1usize << 17).div_ceil(per_row);
    let run =
        |r0: usize, out: &mut [u8]| SCRATCH.with_borrow_mut(|scratch| encode_band(level, rows, ql, r0, out, scratch));
    // whole images per band: as few as give that work and ≥ 12 output pixels (the last group of
    // three repeats rows), so a band's tap words stay in cache
    let images = min_rows.div_ceil(oh).max(12usize.div_ceil(oh * ow));
    if images > 1 {
        let images = images.min(n);
        super::team::for_chunks(codes, images * oh * row_len, |t, out| run(t * images * oh, out));
    } else {
        // larger maps: bands of output rows within an image, at most ~128 KiB of tap words each
        let sh = match rows {
            Rows::ConvNhwc { win, .. } => win.strides[0].max(1),
            _ => 1,
        };
        let fit = ((128usize << 10) / (ow * ql.groups * 64 * sh)).max(1);
        let band = oh.div_ceil(tasks.div_ceil(n)).min(fit).max(min_rows).min(oh);
        super::team::for_bands(codes, oh, row_len, band, |img, r0, out| run(img * oh + r0, out));
    }
}

/// One band of output rows: `r0 ..` counted across images (`image · oh + oy`), as many as
/// `out` holds. Each image's input rows that the band reads are quantized and turned into tap
/// words once; then pixels are encoded a few at a time ([`encode_pixels`]), kernel rows outside
/// the image reading a zero word.
fn encode_band(level: Simd, rows: &Rows, ql: &QuantLanes, r0: usize, out: &mut [u8], scratch: &mut Scratch) {
    let Rows::ConvNhwc { x, shape, win, geo } = rows else {
        unreachable!("quantized channel lanes need channels-last rows")
    };
    let [_, h, w, ch] = *shape;
    let [oh, ow] = geo.out;
    let [kh, kw] = ql.kernel;
    let (sh, dh, ph) = (win.strides[0], win.dilations[0], geo.pads[0]);
    let r1 = r0 + out.len() / (ow * ch);
    let g_n = ql.groups;
    let geom = TapGeom {
        w,
        ch,
        ow,
        kw,
        sw: win.strides[1],
        dw: win.dilations[1],
        pw: geo.pads[1],
        groups: g_n,
    };
    let (quantized, words, images, pixels) = scratch;
    images.clear();
    // The buffers only grow (no zeroing pass): `tap_words` writes every word, `quantize_rows`
    // every byte of the channels (other lanes' codes are dropped).
    let mut n_words = 0;
    // per image of the band: its first input row read and where its words start
    for img in r0 / oh..r1.div_ceil(oh) {
        let (oy0, oy1) = (r0.max(img * oh) - img * oh, r1.min((img + 1) * oh) - img * oh);
        let lo = (oy0 * sh).saturating_sub(ph).min(h);
        let hi = (((oy1 - 1) * sh + (kh - 1) * dh + 1).saturating_sub(ph)).min(h).max(lo);
        images.push((lo, n_words));
        let nq = (hi - lo) * w * g_n * CL;
        if quantized.len() < nq {
            quantized.resize(nq, 0);
        }
        quantize_rows(
            level,
            &x[img * h * w * ch..(img + 1) * h * w * ch],
            lo,
            hi,
            geom,
            ql.inv,
            &mut quantized[..nq],
        );
        let nw = (hi - lo) * ow * g_n;
        if words.len() < n_words + nw + g_n {
            words.resize(n_words + nw + g_n, V64::default());
        }
        tap_words(
            level,
            &quantized[..nq],
            hi - lo,
            geom,
            &mut words[n_words..n_words + nw],
        );
        n_words += nw;
    }
    // zero words for kernel rows outside the image, one per channel group (group g reads
    // `zero + g`, as it reads `o + g` for a pixel's word `o`)
    let zero = n_words;
    words[zero..zero + g_n].fill(V64::default());
    let words = &words[..zero + g_n];
    // per output pixel of the band: the word of kernel row 0 (group 0; it may lie above the
    // image) and the kernel rows inside the image
    let step = dh * ow * g_n;
    pixels.clear();
    let (mut img, mut oy) = (r0 / oh, r0 % oh);
    for _ in r0..r1 {
        let (lo, base) = images[img - r0 / oh];
        let iy0 = (oy * sh) as isize - ph as isize;
        let i_lo = if iy0 >= 0 {
            0
        } else {
            ((-iy0) as usize).div_ceil(dh).min(kh)
        };
        let i_hi = if iy0 < h as isize {
            ((h as isize - iy0) as usize).div_ceil(dh).min(kh)
        } else {
            0
        };
        let row = base as isize + (iy0 - lo as isize) * (ow * g_n) as isize;
        pixels.extend((0..ow).map(|ox| (row + (ox * g_n) as isize, i_lo as u32, i_hi as u32)));
        oy += 1;
        if oy == oh {
            (img, oy) = (img + 1, 0);
        }
    }
    let band = Band { words, zero, step, ch };
    #[cfg(target_arch = "x86_64")]
    match level {
        // SAFETY (all three): the level (and VNNI) was detected, so the CPU has the kernel's
        // instructions; `encode_pixels` checks the offsets the kernels read unchecked.
        Simd::Avx512 if vnni() => return unsafe { encode_pixels::<3>(&band, pixels, ql, out, x86::nearest3_vnni) },
        // AVX2 is implied by the AVX-512 level
        Simd::Avx512 | Simd::Avx2 => {
            return unsafe { encode_pixels::<2>(&band, pixels, ql, out, x86::nearest_avx2::<2>) }
        }
        Simd::Scalar => {}
    }
    // SAFETY: the portable kernel; `encode_pixels` checks the offsets.
    unsafe { encode_pixels::<3>(&band, pixels, ql, out, nearest_scalar::<3>) }
}

/// A band's tap words as the pixel kernels read them: the words, the zero words' offset (one
/// per group), the word step between kernel rows, the input channels.
struct Band<'a> {
    words: &'a [V64],
    zero: usize,
    step: usize,
    ch: usize,
}

/// One channel group's int8 codebooks in [`QuantLanes`]' layout: prototype words
/// `[kernel row][k]`, `−hn` and the keys `16·(−hn) + 15 − k`, `[k]`.
#[derive(Clone, Copy)]
struct GroupQ<'a> {
    pq: &'a [V64],
    init: &'a [V64],
    keys: &'a [V64],
}

/// A pixel kernel: the codes of `P` pixels for one channel group, from `lines` (kernel rows
/// `i` and each pixel's word for it, a zero word where the kernel row is outside the image);
/// group `g` reads word `o + g` for a line's word `o`. Pixel `r`'s 16 codes go to
/// `dst + r·stride` (straight into the output: returned by value they would take a round trip
/// through the stack and a copy per group).
type Nearest<const P: usize> = unsafe fn(&[V64], &[(usize, [usize; P])], usize, GroupQ, *mut u8, usize);

/// Encode a band's `pixels` (their word of kernel row 0, group 0, and the kernel rows inside
/// the image) `P` at a time in row order (across output rows and images, so narrow maps waste
/// no lanes), every channel group by `nearest`; codes into `out` (`pixels × ch`).
///
/// # Safety
/// The CPU has `nearest`'s instructions.
unsafe fn encode_pixels<const P: usize>(
    band: &Band,
    pixels: &[(isize, u32, u32)],
    ql: &QuantLanes,
    out: &mut [u8],
    nearest: Nearest<P>,
) {
    let (words, kh, g_n) = (band.words, ql.kernel[0], ql.groups);
    let n_pos = pixels.len();
    // reused across pixels (only their first `kh` / `n_l` entries are read): no per-pixel
    // initialisation of the whole arrays
    let mut at = [[None; P]; MAX_KH];
    let mut lines = [(0usize, [0usize; P]); MAX_KH];
    for p0 in (0..n_pos).step_by(P) {
        // P pixels; a last, partial group repeats its last
        let px: [_; P] = std::array::from_fn(|q| pixels[(p0 + q).min(n_pos - 1)]);
        // per kernel row: each pixel's word (of group 0), or None outside the image
        at[..kh].fill([None; P]);
        for (q, &(row, i_lo, i_hi)) in px.iter().enumerate() {
            for (i, a) in at.iter_mut().enumerate().take(i_hi as usize).skip(i_lo as usize) {
                a[q] = Some((row + (i * band.step) as isize) as usize);
            }
        }
        let mut n_l = 0;
        for (i, a) in at.iter().enumerate().take(kh) {
            if a.iter().any(Option::is_some) {
                lines[n_l] = (i, a.map(|o| o.unwrap_or(band.zero)));
                n_l += 1;
            }
        }
        let lines = &lines[..n_l];
        // every group's words (offset + g) lie in `words`
        assert!(lines
            .iter()
            .all(|&(i, a)| i < kh && a.iter().all(|&o| o + g_n <= words.len())));
        // all P pixels in `out`: whole groups' codes go straight there
        let whole = p0 + P <= n_pos;
        assert!(!whole || (p0 + P) * band.ch <= out.len());
        for g in 0..g_n {
            let q = GroupQ {
                pq: &ql.pq[g * kh * K..(g + 1) * kh * K],
                init: &ql.init[g * K..(g + 1) * K],
                keys: &ql.keys[g * K..(g + 1) * K],
            };
            let width = (band.ch - g * CL).min(CL);
            if whole && width == CL {
                // SAFETY: asserted above: each line's kernel row is < kh (inside `pq`), its
                // words plus g are inside `words`, and the P pixels' runs are inside `out`; a
                // whole group (`width == CL`) ends within its pixel's `ch` codes; the caller
                // guarantees the instructions.
                unsafe { nearest(words, lines, g, q, out.as_mut_ptr().add(p0 * band.ch + g * CL), band.ch) };
                continue;
            }
            // a partial group (its 16 bytes would run into the next pixel's codes) or the
            // last pixels of the band: through a buffer
            let mut codes = [[0u8; CL]; P];
            // SAFETY: as above, and `codes` holds P runs of 16 bytes.
            unsafe { nearest(words, lines, g, q, codes.as_mut_ptr().cast(), CL) };
            for (q, code) in codes.iter().enumerate().take(n_pos - p0) {
                let o = (p0 + q) * band.ch + g * CL;
                out[o..o + width].copy_from_slice(&code[..width]);
            }
        }
    }
}

/// Where a band's tap words come from (see [`tap_words`]).
#[derive(Clone, Copy)]
struct TapGeom {
    w: usize,
    ch: usize,
    ow: usize,
    kw: usize,
    sw: usize,
    dw: usize,
    pw: usize,
    groups: usize,
}

/// Quantize input rows `lo..hi` of one channels-last image into `q`: per pixel a run of
/// `16·groups ≥ ch` bytes, `q(x)` then bytes of the lanes past the last channel, left as they
/// were (zeros at AVX-512): every lane is one channel throughout, and those lanes' codes are
/// dropped.
fn quantize_rows(level: Simd, image: &[f32], lo: usize, hi: usize, t: TapGeom, inv: f32, q: &mut [u8]) {
    let stride = t.groups * CL;
    let run = &image[lo * t.w * t.ch..hi * t.w * t.ch];
    #[cfg(target_arch = "x86_64")]
    if t.ch == stride && level >= Simd::Avx2 {
        // whole channel groups: the pixels' values and their bytes are one run each
        match level {
            // SAFETY: AVX-512F detected (the level); `q` holds as many bytes as `run` values.
            Simd::Avx512 => unsafe { x86::quantize512(run, inv, q) },
            // SAFETY: AVX2 detected (the level); as above.
            _ => unsafe { x86::quantize_avx2(run, inv, q) },
        }
        return;
    }
    for (px, out) in run.chunks_exact(t.ch).zip(q.chunks_exact_mut(stride)) {
        #[cfg(target_arch = "x86_64")]
        match level {
            // SAFETY: AVX-512F detected (the level); `out` holds `16·groups ≥ ch` bytes.
            Simd::Avx512 => unsafe { x86::quantize512(px, inv, out) },
            // SAFETY: AVX2 detected (the level); as above.
            Simd::Avx2 => unsafe { x86::quantize_avx2(px, inv, out) },
            Simd::Scalar => out.iter_mut().zip(px).for_each(|(o, &v)| *o = quantize(v, inv)),
        }
        #[cfg(target_arch = "x86_64")]
        continue;
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = level;
            out.iter_mut().zip(px).for_each(|(o, &v)| *o = quantize(v, inv));
        }
    }
}

/// The tap words of input rows `lo..hi` of one channels-last image (every word of `words`
/// written), from their quantized values `q` ([`quantize_rows`]): word `[(iy − lo)·ow + ox][group][lane]` holds byte `j < kw` =
/// `q(x[iy][ox·sw − pw + j·dw][c])` for channel `c = 16·group + lane` (0 outside the image;
/// past the last channel, whatever `q` holds there).
fn tap_words(level: Simd, q: &[u8], rows: usize, t: TapGeom, words: &mut [V64]) {
    let stride = t.groups * CL;
    for iy in 0..rows {
        let row = &q[iy * t.w * stride..(iy + 1) * t.w * stride];
        for ox in 0..t.ow {
            let out = &mut words[(iy * t.ow + ox) * t.groups..][..t.groups];
            // the taps inside the image, as (byte shift, pixel offset)
            let mut taps = [(0u32, 0usize); 4];
            let mut n_t = 0;
            for j in 0..t.kw {
                let ix = (ox * t.sw + j * t.dw) as isize - t.pw as isize;
                if ix >= 0 && (ix as usize) < t.w {
                    taps[n_t] = (8 * j as u32, ix as usize * stride);
                    n_t += 1;
                }
            }
            let taps = &taps[..n_t];
            #[cfg(target_arch = "x86_64")]
            match level {
                // SAFETY: AVX-512F detected (the level); every tap's run of `stride` bytes
                // lies in `row`, and `out` holds the `groups` words.
                Simd::Avx512 => unsafe { x86::words_avx512(row, taps, out) },
                // SAFETY: AVX2 detected (the level); as above.
                Simd::Avx2 => unsafe { x86::words_avx2(row, taps, out) },
                Simd::Scalar => {}
            }
            #[cfg(target_arch = "x86_64")]
            if level != Simd::Scalar {
                continue;
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = level;
            for (g, word) in out.iter_mut().enumerate() {
                let mut acc = [0u32; CL];
                for &(shift, at) in taps {
                    let px = &row[at + g * CL..][..CL];
                    for l in 0..CL {
                        acc[l] |= (px[l] as u32) << shift;
                    }
                }
                *word = V64(acc.map(|v| v as i32));
            }
        }
    }
}

/// The portable pixel kernel ([`Nearest`]), the reference the SIMD kernels match: per pixel
/// and prototype, `−hn` plus the exact dot product, keyed `(sum << 4) | (15 − k)`, the largest
/// key wins (ties: the lowest `k`).
///
/// # Safety
/// Every line's `(i + 1)·K <= q.pq.len()` and offsets `o + g < words.len()` (the SIMD kernels
/// index without bounds checks; this one checks); `dst + r·stride` holds 16 bytes for every
/// pixel `r < P`.
unsafe fn nearest_scalar<const P: usize>(
    words: &[V64],
    lines: &[(usize, [usize; P])],
    g: usize,
    q: GroupQ,
    dst: *mut u8,
    stride: usize,
) {
    for r in 0..P {
        // SAFETY: the caller's promise.
        let out = unsafe { std::slice::from_raw_parts_mut(dst.add(r * stride), CL) };
        let mut best = [i32::MIN; CL];
        for kk in 0..K {
            let mut acc = q.init[kk].0;
            for &(i, at) in lines {
                let (x, p) = (words[at[r] + g].0, q.pq[i * K + kk].0);
                for l in 0..CL {
                    let (xb, pb) = (x[l].to_le_bytes(), p[l].to_le_bytes());
                    for b in 0..4 {
                        acc[l] += xb[b] as i32 * pb[b] as i8 as i32;
                    }
                }
            }
            for l in 0..CL {
                best[l] = best[l].max((acc[l] << 4) | (15 - kk as i32));
            }
        }
        for l in 0..CL {
            out[l] = (15 - (best[l] & 15)) as u8;
        }
    }
}

/// [`quantize`] of every value of `px` into `out` (`px.len()` rounded up to 16 bytes), at
/// `level`: the same bytes at every level.
pub(crate) fn quantize_into(level: Simd, px: &[f32], inv: f32, out: &mut [u8]) {
    assert!(out.len() >= px.len().div_ceil(CL) * CL);
    match level {
        // SAFETY: AVX-512F detected (the level); `out` holds `px.len()` rounded up to 16 bytes.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { x86::quantize512(px, inv, out) },
        // SAFETY: AVX2 detected (the level); as above.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { x86::quantize_avx2(px, inv, out) },
        _ => out.iter_mut().zip(px).for_each(|(o, &v)| *o = quantize(v, inv)),
    }
}

/// Whether the CPU has AVX-512 VNNI (and BW), read once.
pub(crate) fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *V.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512bw")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // running sums indexed by prototype and row
mod x86 {
    use super::{GroupQ, CL, K, V64};
    use std::arch::x86_64::*;

    /// [`quantize_avx512`], by [`quantize_avx512bw`] where the CPU has AVX-512BW.
    ///
    /// # Safety
    /// AVX-512F; as [`quantize_avx512`].
    pub(super) unsafe fn quantize512(px: &[f32], inv: f32, out: &mut [u8]) {
        match std::arch::is_x86_feature_detected!("avx512bw") {
            true => quantize_avx512bw(px, inv, out),
            false => quantize_avx512(px, inv, out),
        }
    }

    /// [`quantize_avx512`] 64 values at a time as [`quantize_avx2`] does (`min(127, v·inv)`,
    /// `vcvtps2dq`, saturating packs that take negatives and NaN to 0, then one `vpermd` to
    /// undo the packs' 128-bit interleave): the same bytes in about half the instructions; the
    /// rest by [`quantize_avx512`].
    ///
    /// # Safety
    /// AVX-512F and BW; as [`quantize_avx512`].
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_avx512bw(px: &[f32], inv: f32, out: &mut [u8]) {
        let (inv_v, top) = (_mm512_set1_ps(inv), _mm512_set1_ps(127.0));
        // after the packs block L holds values 4L.. of each of the four vectors in turn
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        let whole = px.len() / (4 * CL) * (4 * CL);
        for (p, o) in px[..whole].chunks_exact(4 * CL).zip(out.chunks_exact_mut(4 * CL)) {
            let q = |i: usize| {
                let v = _mm512_mul_ps(_mm512_loadu_ps(p.as_ptr().add(i * CL)), inv_v);
                _mm512_cvtps_epi32(_mm512_min_ps(top, v))
            };
            let lo = _mm512_packs_epi32(q(0), q(1));
            let hi = _mm512_packs_epi32(q(2), q(3));
            let b = _mm512_permutexvar_epi32(order, _mm512_packus_epi16(lo, hi));
            _mm512_storeu_si512(o.as_mut_ptr().cast(), b);
        }
        quantize_avx512(&px[whole..], inv, &mut out[whole..]);
    }

    /// [`super::quantize`] of `px` into `out`, 16 values at a time: `vmaxps` returns its second
    /// operand (0) for a NaN, `vcvtps2dq` rounds half to even.
    ///
    /// # Safety
    /// AVX-512F; `out` holds `px.len()` rounded up to 16 bytes.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quantize_avx512(px: &[f32], inv: f32, out: &mut [u8]) {
        let (inv, zero, top) = (_mm512_set1_ps(inv), _mm512_setzero_ps(), _mm512_set1_ps(127.0));
        for (c0, o) in (0..px.len()).step_by(CL).zip(out.chunks_exact_mut(CL)) {
            let m: __mmask16 = if px.len() - c0 >= CL {
                0xffff
            } else {
                (1 << (px.len() - c0)) - 1
            };
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, px.as_ptr().add(c0)), inv);
            let v = _mm512_min_ps(_mm512_max_ps(v, zero), top);
            _mm_storeu_si128(o.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
        }
    }

    /// [`quantize_avx512`] at AVX2, 32 values at a time (then 16): `min(127, v·inv)` (a NaN
    /// stays NaN: `vminps` returns its second operand for one), `vcvtps2dq` (half to even; NaN,
    /// −∞ and large negatives give `i32::MIN`), then the saturating packs to i16 and to u8 take
    /// every negative (NaN included) to 0 — no clamp at 0 needed. A partial last run is done
    /// by [`super::quantize`].
    ///
    /// # Safety
    /// AVX2; as [`quantize_avx512`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_avx2(px: &[f32], inv: f32, out: &mut [u8]) {
        let (inv_v, top) = (_mm256_set1_ps(inv), _mm256_set1_ps(127.0));
        let q = |at: usize| {
            _mm256_cvtps_epi32(_mm256_min_ps(
                top,
                _mm256_mul_ps(_mm256_loadu_ps(px.as_ptr().add(at)), inv_v),
            ))
        };
        // the packs interleave 4-value runs per 128-bit lane: dwords back in order
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let full = px.len() / CL * CL;
        let mut c0 = 0;
        while c0 + 2 * CL <= full {
            let ab = _mm256_packs_epi32(q(c0), q(c0 + 8));
            let cd = _mm256_packs_epi32(q(c0 + 16), q(c0 + 24));
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
            _mm256_storeu_si256(out.as_mut_ptr().add(c0).cast(), bytes);
            c0 += 2 * CL;
        }
        if c0 < full {
            let ab = _mm256_packs_epi32(q(c0), q(c0 + 8));
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, ab), order);
            _mm_storeu_si128(out.as_mut_ptr().add(c0).cast(), _mm256_castsi256_si128(bytes));
        }
        for (o, &v) in out[full..].iter_mut().zip(&px[full..]) {
            *o = super::quantize(v, inv);
        }
    }

    /// [`words_avx512`] at AVX2: each group's word as two 8-lane halves.
    ///
    /// # Safety
    /// AVX2; as [`words_avx512`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn words_avx2(row: &[u8], taps: &[(u32, usize)], out: &mut [V64]) {
        let p = row.as_ptr();
        for (g, word) in out.iter_mut().enumerate() {
            let dst = (word as *mut V64).cast::<__m256i>();
            for half in 0..2 {
                let mut acc = _mm256_setzero_si256();
                for &(shift, at) in taps {
                    let b = _mm_loadl_epi64(p.add(at + g * CL + 8 * half).cast());
                    let v = _mm256_sll_epi32(_mm256_cvtepu8_epi32(b), _mm_cvtsi32_si128(shift as i32));
                    acc = _mm256_or_si256(acc, v);
                }
                _mm256_store_si256(dst.add(half), acc);
            }
        }
    }

    /// [`super::tap_words`]' words of one output column: per group, each tap's 16 bytes
    /// widened to 32-bit lanes, shifted to the tap's byte and merged.
    ///
    /// # Safety
    /// AVX-512F; `row[at + 16·g ..][..16]` in bounds for every tap and group of `out`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn words_avx512(row: &[u8], taps: &[(u32, usize)], out: &mut [V64]) {
        let p = row.as_ptr();
        for (g, word) in out.iter_mut().enumerate() {
            let mut acc = _mm512_setzero_si512();
            for &(shift, at) in taps {
                let b = _mm_loadu_si128(p.add(at + g * CL).cast());
                let v = _mm512_sll_epi32(_mm512_cvtepu8_epi32(b), _mm_cvtsi32_si128(shift as i32));
                acc = _mm512_or_si512(acc, v);
            }
            _mm512_store_si512((word as *mut V64).cast(), acc);
        }
    }

    /// [`super::nearest_scalar`] with `vpdpbusd`: 8 prototypes × 3 rows of running sums at a time,
    /// each starting at `−hn`; per prototype the key `(sum << 4) | (15 − k)` and a maximum.
    ///
    /// # Safety
    /// AVX-512F/BW/VNNI; line offsets plus `g` inside `words`, kernel rows inside `pq`, 16
    /// bytes at `dst + r·stride` for each pixel `r`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn nearest3_vnni(
        words: &[V64],
        lines: &[(usize, [usize; 3])],
        g: usize,
        q: GroupQ,
        dst: *mut u8,
        stride: usize,
    ) {
        let (wp, pp, ip) = (words.as_ptr(), q.pq.as_ptr(), q.init.as_ptr());
        let mut best = [_mm512_set1_epi32(i32::MIN); 3];
        for kb in (0..K).step_by(8) {
            let mut acc = [[_mm512_setzero_si512(); 8]; 3];
            for j in 0..8 {
                let h = _mm512_load_si512(ip.add(kb + j).cast());
                acc[0][j] = h;
                acc[1][j] = h;
                acc[2][j] = h;
            }
            for &(i, at) in lines {
                let v0 = _mm512_load_si512(wp.add(at[0] + g).cast());
                let v1 = _mm512_load_si512(wp.add(at[1] + g).cast());
                let v2 = _mm512_load_si512(wp.add(at[2] + g).cast());
                let row = pp.add(i * K + kb);
                for j in 0..8 {
                    let p = _mm512_load_si512(row.add(j).cast());
                    acc[0][j] = _mm512_dpbusd_epi32(acc[0][j], v0, p);
                    acc[1][j] = _mm512_dpbusd_epi32(acc[1][j], v1, p);
                    acc[2][j] = _mm512_dpbusd_epi32(acc[2][j], v2, p);
                }
            }
            for (acc, best) in acc.iter().zip(best.iter_mut()) {
                for (j, a) in acc.iter().enumerate() {
                    let key = _mm512_or_si512(_mm512_slli_epi32::<4>(*a), _mm512_set1_epi32(15 - (kb + j) as i32));
                    *best = _mm512_max_epi32(*best, key);
                }
            }
        }
        for (r, b) in best.into_iter().enumerate() {
            let code = _mm512_sub_epi32(_mm512_set1_epi32(15), _mm512_and_si512(b, _mm512_set1_epi32(15)));
            _mm_storeu_si128(dst.add(r * stride).cast(), _mm512_cvtepi32_epi8(code));
        }
    }

    /// The pixel kernel at AVX2 for `P` pixels: per 8-lane half, 4 prototypes × `P` pixels of
    /// running sums at a time (`P = 2`: 8 of the 16 registers, no spills), `vpmaddubsw` then
    /// `vpmaddwd` by 16 (exact: 7-bit inputs), so that each sum starting at its key
    /// `16·(−hn) + 15 − k` ends as [`super::nearest_scalar`]'s key and one maximum per
    /// prototype takes the argmin.
    ///
    /// # Safety
    /// AVX2; line offsets plus `g` inside `words`, kernel rows inside `q.pq`, 16 bytes at
    /// `dst + r·stride` for each pixel `r`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn nearest_avx2<const P: usize>(
        words: &[V64],
        lines: &[(usize, [usize; P])],
        g: usize,
        q: GroupQ,
        dst: *mut u8,
        stride: usize,
    ) {
        const H: usize = 8;
        let (wp, pp, kp) = (
            words.as_ptr().cast::<i32>(),
            q.pq.as_ptr().cast::<i32>(),
            q.keys.as_ptr().cast::<i32>(),
        );
        let sixteen = _mm256_set1_epi16(16);
        // each pixel's 8 codes per half in the low bytes, stored as one 16-byte run at the end
        // (two 8-byte stores read back as 16 bytes stall store forwarding)
        let mut halves = [[_mm_setzero_si128(); 2]; P];
        for half in 0..CL / H {
            let o = half * H;
            let mut best = [_mm256_set1_epi32(i32::MIN); P];
            for kb in (0..K).step_by(4) {
                let mut acc = [[_mm256_setzero_si256(); 4]; P];
                for j in 0..4 {
                    let key = _mm256_load_si256(kp.add((kb + j) * CL + o).cast());
                    for a in acc.iter_mut() {
                        a[j] = key;
                    }
                }
                for &(i, at) in lines {
                    let v: [__m256i; P] =
                        std::array::from_fn(|r| _mm256_load_si256(wp.add((at[r] + g) * CL + o).cast()));
                    let row = pp.add((i * K + kb) * CL + o);
                    for j in 0..4 {
                        let p = _mm256_load_si256(row.add(j * CL).cast());
                        for (a, v) in acc.iter_mut().zip(&v) {
                            let d = _mm256_madd_epi16(_mm256_maddubs_epi16(*v, p), sixteen);
                            a[j] = _mm256_add_epi32(a[j], d);
                        }
                    }
                }
                for (acc, best) in acc.iter().zip(best.iter_mut()) {
                    for a in acc {
                        *best = _mm256_max_epi32(*best, *a);
                    }
                }
            }
            let fifteen = _mm256_set1_epi32(15);
            for (h, b) in halves.iter_mut().zip(best) {
                let code = _mm256_sub_epi32(fifteen, _mm256_and_si256(b, fifteen));
                // 8 codes of 0..=15: pack the low bytes
                let w = _mm256_packs_epi32(code, code);
                let bytes = _mm256_packus_epi16(w, w);
                let lo = _mm256_castsi256_si128(bytes);
                let hi = _mm256_extracti128_si256::<1>(bytes);
                h[half] = _mm_unpacklo_epi32(lo, hi);
            }
        }
        for (r, [lo, hi]) in halves.into_iter().enumerate() {
            _mm_storeu_si128(dst.add(r * stride).cast(), _mm_unpacklo_epi64(lo, hi));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::kernels::conv::im2col_rows;
    use crate::interp::kernels::encode::{encode_argmin, encode_prepared, prepare, Codebooks};
    use crate::ir::op::{Padding, Window};
    use crate::pq::rng::Rng;

    fn window(kernel: [usize; 2], stride: usize, dil: usize, pad: usize) -> Window {
        Window {
            kernel,
            strides: [stride; 2],
            dilations: [dil; 2],
            padding: Padding::Explicit([pad; 4]),
            ceil_mode: false,
        }
    }

    /// Inputs with exact zeros, negatives, values past the scale's range (infinities and
    /// floats past every integer range included), halfway points (round half to even) and a
    /// NaN.
    fn inputs(rng: &mut Rng, len: usize, act_scale: f32) -> Vec<f32> {
        (0..len)
            .map(|i| match i % 23 {
                0 => 0.0,
                1 => -(rng.next_f64() as f32),
                2 => 200.0 * act_scale,
                3 => (rng.next_f64() * 40.0).floor() as f32 * act_scale + 0.5 * act_scale,
                // beyond every integer range, both ways
                4 if i % 2 == 0 => f32::INFINITY,
                4 => -1e30,
                5 if i % 2 == 0 => f32::NEG_INFINITY,
                5 => 3e38,
                _ if i == len / 2 => f32::NAN,
                _ => rng.next_f64() as f32 * 100.0 * act_scale,
            })
            .collect()
    }

    /// `quantize_into` gives the bytes of [`quantize`] at every level, for runs from 1 to 200
    /// values (the 64-value packs, their 16-value tail and a partial last vector), from three
    /// offsets (0, 1 and 63 values in).
    #[test]
    fn quantize_into_matches_the_reference_at_every_level() {
        let levels = crate::interp::kernels::levels_checked("quantize_into_matches_the_reference_at_every_level");
        let mut rng = Rng::new(5);
        let act_scale = 0.05;
        let x = inputs(&mut rng, 263, act_scale);
        assert!(x.iter().any(|v| v.is_nan()));
        for len in 1..=200 {
            for start in [0, 1, 63] {
                let px = &x[start..start + len];
                let want: Vec<u8> = px.iter().map(|&v| quantize(v, 1.0 / act_scale)).collect();
                for &level in &levels {
                    let mut out = vec![0xAAu8; len.div_ceil(CL) * CL];
                    quantize_into(level, px, 1.0 / act_scale, &mut out);
                    assert_eq!(&out[..len], &want[..], "{len} values from {start} at {}", level.name());
                }
            }
        }
    }

    /// The channel-lane kernels, at every SIMD level and on one or two threads, give the codes
    /// of the reference [`Quant::nearest`] on the im2col rows, for strides, dilations, padding,
    /// kernels narrower than 4, partial channel groups, output widths not a multiple of 3, bands
    /// within an image and across images.
    #[test]
    fn quantized_lanes_match_the_reference() {
        let levels = crate::interp::kernels::levels_checked("quantized_lanes_match_the_reference");
        let mut rng = Rng::new(21);
        let cases = [
            ([2usize, 16usize, 7usize, 7usize], window([3, 3], 1, 1, 1)),
            ([1, 20, 9, 8], window([3, 3], 2, 1, 1)),
            ([3, 37, 6, 5], window([3, 3], 1, 2, 2)),
            ([2, 5, 5, 7], window([2, 4], 1, 1, 0)),
            ([1, 33, 4, 4], window([1, 3], 1, 1, 1)),
            ([2, 64, 3, 3], window([3, 3], 1, 1, 1)),
            // many small maps: bands of whole images, triples straddling rows and images
            ([13, 20, 2, 3], window([3, 3], 1, 1, 1)),
            ([9, 16, 3, 3], window([3, 3], 2, 1, 1)),
            ([7, 16, 1, 1], window([3, 3], 1, 1, 1)),
            // more than 4 channel groups, the last partial
            ([1, 100, 5, 6], window([3, 3], 1, 1, 1)),
        ];
        // pools kept across the cases: each thread's scratch then holds the previous case's
        // values (its buffers only grow), which must never leak into the codes
        let pools = [1, 2].map(|t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap());
        for (ci, (shape, win)) in cases.into_iter().enumerate() {
            let [n, c, h, w] = shape;
            let act_scale = 0.03;
            let x = inputs(&mut rng, n * c * h * w, act_scale);
            let geo = win.resolve([h, w]).unwrap();
            let s = win.kernel[0] * win.kernel[1];
            let sub = Subspaces { d: c * s, s };
            let protos: Vec<f32> = (0..c * K * s).map(|_| rng.next_f64() as f32 * 3.0 - 0.5).collect();
            // every other case with norms of its own (a metric's encoder)
            let norms: Vec<f32> = (0..c * K).map(|_| rng.next_f64() as f32 * 4.0).collect();
            let norms = (ci % 2 == 1).then_some(&norms[..]);
            let q = Quant::with_norms(&protos, norms, K, s, act_scale);
            let rows = im2col_rows(&x, shape, &win).unwrap();
            let rows = rows.as_slice().unwrap();
            let n_rows = rows.len() / sub.d;
            let want: Vec<u8> = (0..n_rows)
                .flat_map(|r| (0..c).map(move |cb| (r, cb)))
                .map(|(r, cb)| q.nearest(cb, &rows[r * sub.d + cb * s..][..s]))
                .collect();
            // the generic path (matrix rows) is the reference too
            let mut b = vec![0u8; want.len()];
            encode_argmin(rows, n_rows, sub, K, &protos, norms, Some(act_scale), &mut b);
            assert_eq!(b, want, "{shape:?} matrix rows");
            let xh = crate::interp::kernels::to_nhwc(&x, shape);
            let nhwc = Rows::ConvNhwc {
                x: &xh,
                shape: [n, h, w, c],
                win: &win,
                geo,
            };
            let ql = QuantLanes::new(&q, sub, c, win.kernel).expect("lanes apply");
            for &lv in &levels {
                for pool in &pools {
                    let mut got = vec![0u8; want.len()];
                    pool.install(|| encode_lanes(lv, &nhwc, &ql, &mut got));
                    let threads = pool.current_num_threads();
                    assert_eq!(got, want, "{shape:?} {:?} {lv:?} {threads} threads", win.kernel);
                }
            }
            // and through `prepare`, as the interpreter calls it
            let cb = Codebooks::Argmin {
                k: K,
                protos: &protos,
                act_scale: Some(act_scale),
                norms,
            };
            let prepared = prepare(sub, &cb, Some((c, win.kernel[0], win.kernel[1])));
            let mut got = vec![0u8; want.len()];
            encode_prepared(&nhwc, &prepared, &mut got);
            assert_eq!(got, want, "{shape:?} prepared");
        }
    }

    /// The quantized encoder is the f32 argmin up to rounding: on random data nearly every
    /// code agrees, and where they differ the f32 distances of the two prototypes are close.
    #[test]
    fn quantized_codes_follow_the_float_argmin() {
        let mut rng = Rng::new(5);
        let (rows, s, c_n) = (2000, 9, 4);
        let sub = Subspaces { d: s * c_n, s };
        let x: Vec<f32> = (0..rows * sub.d)
            .map(|_| (rng.next_f64() as f32 - 0.2).max(0.0))
            .collect();
        let protos: Vec<f32> = (0..c_n * K * s).map(|_| rng.next_f64() as f32 * 0.8).collect();
        let (mut a, mut b) = (vec![0u8; rows * c_n], vec![0u8; rows * c_n]);
        encode_argmin(&x, rows, sub, K, &protos, None, None, &mut a);
        encode_argmin(&x, rows, sub, K, &protos, None, Some(0.8 / 127.0), &mut b);
        let dist = |r: usize, c: usize, k: usize| -> f32 {
            let xv = &x[r * sub.d + c * s..][..s];
            let p = &protos[(c * K + k) * s..][..s];
            xv.iter().zip(p).map(|(u, v)| (u - v) * (u - v)).sum()
        };
        let mut differ = 0;
        for r in 0..rows {
            for c in 0..c_n {
                let (ka, kb) = (a[r * c_n + c] as usize, b[r * c_n + c] as usize);
                if ka != kb {
                    differ += 1;
                    let (da, db) = (dist(r, c, ka), dist(r, c, kb));
                    assert!(db - da < 0.05 * da.max(0.1), "row {r} codebook {c}: {da} vs {db}");
                }
            }
        }
        eprintln!("{differ} of {} codes differ", rows * c_n);
        assert!(differ * 50 < rows * c_n, "{differ} of {} codes differ", rows * c_n);
    }

    /// Given norms (a metric's encoder) replace the prototypes' own: the half norms follow the
    /// documented formula, the kernels give the reference's codes, and those agree with the f32
    /// `argmin norms − 2 x·p` up to near ties.
    #[test]
    fn norms_replace_the_prototypes_own() {
        let mut rng = Rng::new(8);
        let (rows, s, c_n) = (2000, 9, 4);
        let sub = Subspaces { d: s * c_n, s };
        let x: Vec<f32> = (0..rows * sub.d)
            .map(|_| (rng.next_f64() as f32 - 0.2).max(0.0))
            .collect();
        let protos: Vec<f32> = (0..c_n * K * s).map(|_| rng.next_f64() as f32 * 0.8 - 0.2).collect();
        let norms: Vec<f32> = (0..c_n * K).map(|_| rng.next_f64() as f32 * 2.0 - 0.5).collect();
        let act_scale = 0.8 / 127.0;
        let q = Quant::with_norms(&protos, Some(&norms), K, s, act_scale);
        for c in 0..c_n {
            let sp = protos[c * K * s..(c + 1) * K * s]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()))
                / 127.0;
            let low = norms[c * K..(c + 1) * K].iter().fold(f32::INFINITY, |m, &v| m.min(v)) as f64;
            for k in 0..K {
                let want = ((norms[c * K + k] as f64 - low) / (2.0 * act_scale as f64 * sp as f64)).round();
                assert_eq!(q.half_norms()[c * K + k], want as i32, "codebook {c} prototype {k}");
            }
        }
        let (mut a, mut b) = (vec![0u8; rows * c_n], vec![0u8; rows * c_n]);
        encode_argmin(&x, rows, sub, K, &protos, Some(&norms), None, &mut a);
        encode_argmin(&x, rows, sub, K, &protos, Some(&norms), Some(act_scale), &mut b);
        let dist = |r: usize, c: usize, k: usize| -> f32 {
            let xv = &x[r * sub.d + c * s..][..s];
            let p = &protos[(c * K + k) * s..][..s];
            norms[c * K + k] - 2.0 * xv.iter().zip(p).map(|(u, v)| u * v).sum::<f32>()
        };
        let mut differ = 0;
        for r in 0..rows {
            for c in 0..c_n {
                let want = q.nearest(c, &x[r * sub.d + c * s..][..s]);
                assert_eq!(
                    b[r * c_n + c],
                    want,
                    "row {r} codebook {c}: kernel against the reference"
                );
                let (ka, kb) = (a[r * c_n + c] as usize, b[r * c_n + c] as usize);
                if ka != kb {
                    differ += 1;
                    let (da, db) = (dist(r, c, ka), dist(r, c, kb));
                    assert!(db - da < 0.05, "row {r} codebook {c}: {da} vs {db}");
                }
            }
        }
        assert!(differ * 50 < rows * c_n, "{differ} of {} codes differ", rows * c_n);
    }

    /// Ties go to the lowest index and NaN inputs read as 0, in the reference and the kernels.
    #[test]
    fn ties_and_nan_inputs() {
        let s = 9;
        // prototype 0 is far (and sets the scale: 1.27 / 127 = 0.01), 1 and 2 are 0.2 in every
        // value, 3 and 4 are 0.3, the rest 1.0: a row of 0.25 is as far from 0.2 as from 0.3
        let value = |kk: usize| match kk {
            0 => 1.27,
            1 | 2 => 0.2,
            3 | 4 => 0.3,
            _ => 1.0,
        };
        let protos: Vec<f32> = (0..K).flat_map(|kk| std::iter::repeat_n(value(kk), s)).collect();
        let q = Quant::new(&protos, K, s, 0.01);
        assert_eq!(q.nearest(0, &[0.25; 9]), 1);
        assert_eq!(q.nearest(0, &[0.0; 9]), 1);
        assert_eq!(q.nearest(0, &[f32::NAN; 9]), 1);
        assert_eq!(q.nearest(0, &[0.31; 9]), 3);
        let win = window([3, 3], 1, 1, 0);
        let geo = win.resolve([3, 3]).unwrap();
        let protos16: Vec<f32> = (0..16).flat_map(|_| protos.iter().copied()).collect();
        let q16 = Quant::new(&protos16, K, s, 0.01);
        let ql = QuantLanes::new(&q16, Subspaces { d: 16 * s, s }, 16, [3, 3]).unwrap();
        for lv in crate::interp::kernels::levels_checked("ties_and_nan_inputs") {
            for (v, want) in [(0.25, 1u8), (f32::NAN, 1), (0.31, 3)] {
                let x = vec![v; 9 * 16];
                let rows = Rows::ConvNhwc {
                    x: &x,
                    shape: [1, 3, 3, 16],
                    win: &win,
                    geo,
                };
                let mut got = vec![9u8; 16];
                encode_lanes(lv, &rows, &ql, &mut got);
                assert_eq!(got, vec![want; 16], "{lv:?} {v}");
            }
        }
    }

    /// Sixteen rows at a time in lanes give the codes one row at a time gives: random and
    /// extreme inputs, ties (repeated prototypes: the lower index), codebooks of 1 to 64 values
    /// and the one-row fallback past 64, row lists that end in a partial group of 16 and repeat
    /// rows, `k` of 16, 256 and 5.
    #[test]
    fn rows_in_lanes_match_one_row_at_a_time() {
        let mut rng = Rng::new(11);
        for (k, s) in [
            (16usize, 9usize),
            (16, 1),
            (16, 4),
            (256, 9),
            (5, 25),
            (16, 64),
            (16, 70),
        ] {
            let c_n = 3;
            let mut protos: Vec<f32> = (0..c_n * k * s).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
            // prototype 1 repeats prototype 0 in every codebook, both near 0: rows of zeros
            // (every 7th row below) tie between them, and the lower index wins
            for c in 0..c_n {
                let (a, b) = protos[c * k * s..].split_at_mut(s);
                a.iter_mut().for_each(|v| *v *= 0.01);
                b[..s].copy_from_slice(a);
            }
            let q = Quant::new(&protos, k, s, 1.0 / 127.0);
            let n_rows = 53;
            let xq: Vec<u8> = (0..n_rows * s)
                .map(|i| match (i / s % 7, i % 7) {
                    (0, _) => 0,
                    (_, 0) => 127,
                    (_, 1) => 0,
                    _ => (rng.next_f64() * 128.0) as u8,
                })
                .collect();
            let rows: Vec<usize> = (0..40).map(|i| (i * 17 + 3) % n_rows).chain([0, 0, 52]).collect();
            for c in 0..c_n {
                let mut got = Vec::new();
                q.nearest_quantized_rows(c, rows.iter().map(|&r| &xq[r * s..(r + 1) * s]), &mut got);
                let want: Vec<u8> = rows
                    .iter()
                    .map(|&r| q.nearest_quantized(c, &xq[r * s..(r + 1) * s]))
                    .collect();
                assert_eq!(got, want, "k {k} s {s} codebook {c}");
                assert!(
                    rows.iter().zip(&got).any(|(&r, &g)| r % 7 == 0 && g == 0),
                    "k {k} s {s}: no tie tested"
                );
            }
        }
    }

    /// Sixteen rows as columns give the codes of [`Quant::nearest`] row by row, for codebooks of
    /// 9, 64 and (one row at a time) 81 values: an 81-value codebook read only its first 64
    /// values before.
    #[test]
    fn tiles_match_one_row_at_a_time() {
        let mut rng = Rng::new(17);
        for s in [9usize, 64, 81] {
            let (c_n, d) = (2, 2 * s);
            let protos: Vec<f32> = (0..c_n * K * s).map(|_| rng.next_f64() as f32).collect();
            let q = Quant::new(&protos, K, s, 1.0 / 127.0);
            // codebook 1's values of each row: 0.5, then a prototype's last 8 values, which a
            // codebook read only in part would not see
            let rows: Vec<Vec<f32>> = (0..16)
                .map(|l| {
                    let p = &protos[(K + l % K) * s..][..s];
                    let mut x: Vec<f32> = (0..s).map(|_| rng.next_f64() as f32).collect();
                    x.extend(p.iter().enumerate().map(|(t, &v)| if t + 8 >= s { v } else { 0.5 }));
                    x
                })
                .collect();
            let xt: Vec<[f32; 16]> = (0..d).map(|col| std::array::from_fn(|l| rows[l][col])).collect();
            let sub = Subspaces { d, s };
            for c in 0..c_n {
                let got = q.nearest_tile(&xt, sub, c);
                let want: Vec<u32> = rows
                    .iter()
                    .map(|r| q.nearest(c, &r[c * s..(c + 1) * s]) as u32)
                    .collect();
                assert_eq!(got.to_vec(), want, "s {s} codebook {c}");
            }
        }
    }

    /// The tap-word kernels (AVX-512, AVX2) give the portable words on random bytes, for 1 to 9
    /// channel groups and every set of taps a kernel row of width ≤ 4 can have inside the image
    /// (each present or not, at shuffled pixels). (Words by merge-masked `vpermb` per tap over
    /// runs of 4 groups, AVX-512 VBMI, measured 7-8% slower for the whole encoder on Zen 4 at
    /// batch 1 and 64, and were dropped.)
    #[test]
    fn tap_word_kernels_agree() {
        let mut rng = Rng::new(8);
        for groups in 1..=9 {
            let stride = groups * CL;
            let row: Vec<u8> = (0..6 * stride).map(|_| (rng.next_f64() * 256.0) as u8).collect();
            for present in 0u32..16 {
                let taps: Vec<(u32, usize)> = (0..4u32)
                    .filter(|j| present >> j & 1 == 1)
                    .map(|j| (8 * j, ((j as usize * 5 + groups) % 6) * stride))
                    .collect();
                let mut want = vec![V64::default(); groups];
                for (g, word) in want.iter_mut().enumerate() {
                    for &(shift, at) in &taps {
                        for l in 0..CL {
                            word.0[l] |= (row[at + g * CL + l] as i32) << shift;
                        }
                    }
                }
                #[cfg(target_arch = "x86_64")]
                {
                    type Words = unsafe fn(&[u8], &[(u32, usize)], &mut [V64]);
                    let check = |name: &str, f: Words| {
                        // words no kernel wrote would show
                        let mut got = vec![V64(std::array::from_fn(|l| l as i32 - 7)); groups];
                        // SAFETY: every tap's run of `stride` bytes lies in `row`; the caller
                        // checked the instructions.
                        unsafe { f(&row, &taps, &mut got) };
                        let lanes = |w: &[V64]| w.iter().map(|v| v.0).collect::<Vec<_>>();
                        assert_eq!(lanes(&got), lanes(&want), "{name}, {groups} groups, taps {present:04b}");
                    };
                    if Simd::Avx2.supported() {
                        check("avx2", x86::words_avx2);
                    }
                    if Simd::Avx512.supported() {
                        check("avx512", x86::words_avx512);
                    }
                }
            }
        }
    }

    /// Every SIMD pixel kernel (AVX-512 VNNI for 3 pixels, AVX2 for 2 and 3) gives the scalar
    /// one's codes on random words and prototypes, a tie between two prototypes included (the
    /// lower index wins), for channel groups 0 and 1. (Keys by one `vpshldd` instead of a shift
    /// and an or measured 7% slower on Zen 5 and about 10% on Zen 4, and were dropped.)
    #[test]
    fn pixel_kernels_agree() {
        let mut rng = Rng::new(5);
        let word = |f: &mut dyn FnMut() -> u8| V64(std::array::from_fn(|_| i32::from_le_bytes([f(), f(), f(), f()])));
        let words: Vec<V64> = (0..40).map(|_| word(&mut || (rng.next_f64() * 128.0) as u8)).collect();
        let mut rng = Rng::new(6);
        let kh = 3;
        let mut pq: Vec<V64> = (0..kh * K)
            .map(|_| word(&mut || ((rng.next_f64() * 255.0) as i32 - 127) as i8 as u8))
            .collect();
        let mut init: Vec<V64> = (0..K)
            .map(|_| V64(std::array::from_fn(|_| -((rng.next_f64() * 60_000.0) as i32))))
            .collect();
        // prototypes 3 and 4 identical: every lane ties between them
        for i in 0..kh {
            pq[i * K + 4] = pq[i * K + 3];
        }
        init[4] = init[3];
        let lines = [(0, [1, 5, 9]), (2, [3, 3, 38]), (1, [0, 20, 7])];
        let keys = keys_of(&init);
        let q = GroupQ {
            pq: &pq,
            init: &init,
            keys: &keys,
        };
        /// A kernel's codes for `P` pixels, returned.
        ///
        /// # Safety
        /// The CPU has `f`'s instructions; the lines' offsets plus g lie inside `words`, their
        /// kernel rows inside `q`.
        unsafe fn codes<const P: usize>(
            f: Nearest<P>,
            words: &[V64],
            lines: &[(usize, [usize; P])],
            g: usize,
            q: GroupQ,
        ) -> [[u8; CL]; P] {
            let mut out = [[0u8; CL]; P];
            // SAFETY: the caller's promise; `out` holds P runs of 16 bytes.
            unsafe { f(words, lines, g, q, out.as_mut_ptr().cast(), CL) };
            out
        }
        for g in [0, 1] {
            // SAFETY: every offset plus g is below 40 and every kernel row below kh.
            unsafe {
                let want = codes(nearest_scalar, &words, &lines, g, q);
                assert!(
                    want.iter().all(|r| r.iter().all(|&c| c != 4)),
                    "a tie goes to the lower index"
                );
                #[cfg(target_arch = "x86_64")]
                {
                    if Simd::Avx2.supported() {
                        assert_eq!(codes(x86::nearest_avx2, &words, &lines, g, q), want, "avx2, 3 pixels");
                        let two: Vec<_> = lines.iter().map(|&(i, a)| (i, [a[0], a[2]])).collect();
                        assert_eq!(
                            codes(x86::nearest_avx2, &words, &two, g, q),
                            [want[0], want[2]],
                            "avx2, 2 pixels"
                        );
                    }
                    if vnni() {
                        assert_eq!(codes(x86::nearest3_vnni, &words, &lines, g, q), want, "vnni");
                    }
                }
            }
        }
    }

    /// Encoding throughput of the f32 and the int8 channel-lane encoders on the same layers
    /// (`--release --ignored --nocapture`), not a check.
    #[test]
    #[ignore]
    fn quantized_encode_throughput() {
        let mut rng = Rng::new(3);
        let cases = [
            (64usize, 64usize, 7usize, 1usize),
            (64, 64, 14, 1),
            (64, 64, 28, 2),
            (64, 128, 7, 1),
            (1, 64, 14, 1),
            // the sub-batches of 16 images the interpreter runs a batch of 64 in
            (16, 64, 7, 1),
            (16, 128, 4, 1),
            // batch 1: ResNet-18's layers 1-3 on MNIST (7×7, 4×4, 2×2 maps)
            (1, 64, 7, 1),
            (1, 128, 4, 1),
            (1, 128, 4, 2),
            (1, 256, 2, 1),
        ];
        // TABCONV_CASE=i: only case i; TABCONV_REPS=r: r times the repetitions (for a profile,
        // or for A/B runs of two builds taking turns on a VM whose speed drifts)
        let only: Option<usize> = std::env::var("TABCONV_CASE").ok().and_then(|v| v.parse().ok());
        let scale: usize = std::env::var("TABCONV_REPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        for &(n, c, hw, stride) in cases
            .iter()
            .enumerate()
            .filter(|(i, _)| only.is_none_or(|o| o == *i))
            .map(|(_, c)| c)
        {
            let win = window([3, 3], stride, 1, 1);
            let x: Vec<f32> = (0..n * c * hw * hw).map(|_| rng.next_f64() as f32).collect();
            let geo = win.resolve([hw, hw]).unwrap();
            let sub = Subspaces { d: c * 9, s: 9 };
            let protos: Vec<f32> = (0..sub.d * K).map(|_| rng.next_f64() as f32).collect();
            let rows = Rows::ConvNhwc {
                x: &x,
                shape: [n, hw, hw, c],
                win: &win,
                geo,
            };
            let mut line = format!("n={n} c={c} hw={hw} s={stride}:");
            let macs = rows.count() * sub.d * K;
            let mut codes = vec![0u8; rows.count() * c];
            let mut time = |f: &mut dyn FnMut(&mut [u8])| {
                f(&mut codes);
                let reps = 20 * 64 / n * scale;
                let mut times: Vec<f64> = (0..5)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        for _ in 0..reps {
                            f(&mut codes);
                        }
                        t.elapsed().as_secs_f64() / reps as f64
                    })
                    .collect();
                times.sort_by(f64::total_cmp);
                format!("{:.2} µs ({:.1} GMAC/s)", times[2] * 1e6, macs as f64 / times[2] / 1e9)
            };
            let cb = Codebooks::Argmin {
                k: K,
                protos: &protos,
                act_scale: None,
                norms: None,
            };
            let prepared = prepare(sub, &cb, Some((c, 3, 3)));
            line += &format!(
                " f32 ({}): {}",
                Simd::detect().name(),
                time(&mut |out| encode_prepared(&rows, &prepared, out))
            );
            let q = Quant::new(&protos, K, 9, 1.0 / 127.0);
            let ql = QuantLanes::new(&q, sub, c, [3, 3]).unwrap();
            for lv in Simd::available().into_iter().filter(|l| *l != Simd::Scalar) {
                line += &format!(
                    " | int8 ({}): {}",
                    lv.name(),
                    time(&mut |out| encode_lanes(lv, &rows, &ql, out))
                );
            }
            eprintln!("{line}");
        }
    }
}
