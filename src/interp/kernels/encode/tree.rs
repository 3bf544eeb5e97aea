//! Hash-tree (MADDNESS) encoding of channels-last convolution rows, one SIMD lane per output
//! pixel (16 at AVX-512, 8 at AVX2).
//!
//! Every lane of a tile compares the same window column of its own pixel, so the tile's values
//! of one column are `lanes` pixels of one channel. A channels-last image holds those `C`
//! values apart; each band of input rows is therefore first copied into a planar layout —
//! per (input row, channel, column phase) the row's values with the padding as zeros — where
//! they are one contiguous load (the column phase `u mod stride` splits strided windows so
//! that consecutive pixels stay consecutive). The copy is a 16×16 in-register transpose per
//! 16 pixels and 16 channels at AVX-512. Each node's threshold comes from a permute of the
//! codebook's thresholds (`level_threshold`), and the codes of 16 codebooks are assembled
//! in registers and written as 16-byte runs per pixel. The AVX-512 row kernel is compiled per
//! tree depth and walks 8 trees at a time (independent dependency chains).
//!
//! Same comparisons as [`super::tree_tile`] (`x > t`, `NaN` goes left, values outside the
//! image are 0), so the same codes at every level and on any thread count.

use super::{Rows, Simd};
use std::cell::RefCell;

/// A conv's hash trees as [`tree_nhwc`] reads them, built once per node.
pub(super) struct PixelTree {
    /// Codebooks (before the padding of `taps` and `th`).
    c_n: usize,
    depth: usize,
    kernel: [usize; 2],
    /// The thresholds of each codebook, `th_stride` apart, and 16 values past the last: the
    /// first 16 are one vector (unused lanes: +inf), the node of levels 0–3 picked by a permute
    /// (at AVX-512 from 16 values loaded at the level's first node); deeper levels (up to depth
    /// 8, K = 256) permute or gather theirs.
    th: Vec<f32>,
    th_stride: usize,
    /// Per codebook and level: the window column compared, as (channel, i, j), or None when it
    /// lies past the last subspace's end (it reads as 0). Codebooks past the last, to a
    /// multiple of [`TREES`], repeat the last one's.
    taps: Vec<Option<(usize, usize, usize)>>,
}

pub(super) fn pixel_tree(
    sub: crate::pq::Subspaces,
    depth: usize,
    dims: &[usize],
    thr: &[f32],
    [kh, kw]: [usize; 2],
) -> Option<PixelTree> {
    if depth > 8 {
        return None;
    }
    let c_n = sub.count();
    let nodes = (1 << depth) - 1;
    let th_stride = (nodes + 1).max(16);
    // codebooks past the last, to a multiple of TREES (the AVX-512 kernel walks them without
    // storing their codes): the last one's taps, thresholds +inf
    let c_pad = c_n.next_multiple_of(TREES);
    let last = |c: usize| c.min(c_n.saturating_sub(1));
    // (16 more at the end: the kernels load 16 thresholds from each level's first node)
    let mut th = vec![f32::INFINITY; c_pad * th_stride + 16];
    for c in 0..c_n {
        th[c * th_stride..c * th_stride + nodes].copy_from_slice(&thr[c * nodes..(c + 1) * nodes]);
    }
    let taps = (0..c_pad * depth)
        .map(|cl| {
            let (c, lev) = (last(cl / depth), cl % depth);
            let col = c * sub.s + dims[c * depth + lev];
            (col < sub.d).then(|| (col / (kh * kw), col / kw % kh, col % kw))
        })
        .collect();
    Some(PixelTree {
        c_n,
        depth,
        kernel: [kh, kw],
        th,
        th_stride,
        taps,
    })
}

/// Trees the AVX-512 row kernel walks together.
const TREES: usize = 8;

/// Planar scratch per band: about this many bytes of input rows at most (plus one zero row;
/// a band has at least one output row's input rows, whatever their size).
const BAND_BYTES: usize = 256 << 10;

/// A thread's buffers for its bands, reused across bands and calls.
#[derive(Default)]
struct Scratch {
    /// The band's planar input rows, then the zero row.
    planes: Vec<f32>,
    /// 16 pixels' channels transposed (`[channel][pixel]`) and a zero-padded copy of the last
    /// pixels of a row ([`Job::fill_row`]).
    xt: Vec<[f32; 16]>,
    stage: Vec<f32>,
    /// Per kernel row of the output row (and one more for missing taps): where its planar
    /// input row starts.
    row_at: Vec<usize>,
    /// Per codebook and level: where its tap's values start in `planes` for the current output
    /// row (its kernel row's start plus the tap's offset), so the kernels load without lookups.
    at: Vec<usize>,
    /// The image-lane variant's codes of one output row, `16 · ow` virtual pixels.
    row_codes: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Hash-tree encoding of channels-last conv rows ([`PixelTree`]): `codes` is `rows × c_n`.
/// Returns false (nothing written) where it does not apply: not channels-last rows of the
/// prepared kernel, below AVX2 (`level`), or nothing to encode. The trees' taps must lie in
/// the rows (`encode_prepared` asserts `sub.d == C·kh·kw`).
pub(super) fn tree_nhwc(level: Simd, rows: &Rows, pt: &PixelTree, c_n: usize, codes: &mut [u8]) -> bool {
    let Rows::ConvNhwc { x, shape, win, geo } = rows else {
        return false;
    };
    let [n, h, w, c_in] = *shape;
    let [oh, ow] = geo.out;
    if level < Simd::Avx2 || win.kernel != pt.kernel || n * oh * ow == 0 || c_n == 0 {
        return false;
    }
    // the kernels index the per-row tap starts (one per codebook and level) unchecked
    assert_eq!(pt.c_n, c_n, "hash trees for {} codebooks, not {c_n}", pt.c_n);
    assert_eq!(pt.taps.len(), c_n.next_multiple_of(TREES) * pt.depth);
    if n >= IMAGES && ow < 16 && image_lanes(level, rows, pt, c_n, codes) {
        return true;
    }
    let [sw, dw] = [win.strides[1], win.dilations[1]];
    let (pl, kw) = (geo.pads[1], win.kernel[1]);
    // plane width: every lane's column (pixels rounded up to 16) and every input column (at
    // stride 1, whole 16-pixel runs: `fill_row` stores them whole)
    let qw = (ow.next_multiple_of(16) + (kw - 1) * dw / sw + 1).max((w - 1 + pl) / sw + 1);
    // (at stride 2, whole 16-pixel runs deinterleaved into two phases: 8 values each)
    let qw = match sw {
        1 => qw.max(w.next_multiple_of(16) + pl),
        2 => qw.max((w.next_multiple_of(16) + pl) / 2 + 1),
        _ => qw,
    };
    // per codebook and level: the kernel row of its tap (`kh`: none, it reads the zero row)
    // and the offset of the first lane's value within a planar input row
    let taps = pt
        .taps
        .iter()
        .map(|t| match *t {
            Some((ch, i, j)) => {
                let u = j * dw;
                (i, (ch * sw + u % sw) * qw + u / sw)
            }
            None => (win.kernel[0], 0),
        })
        .collect();
    let job = Job {
        x,
        hwc: [h, w, c_in],
        strides: win.strides,
        dilations: win.dilations,
        kernel: win.kernel,
        pads: [geo.pads[0], pl],
        out: geo.out,
        qw,
        row_len: c_in * sw * qw,
        taps,
        pt,
        c_n,
    };
    // output rows per band: the band's input rows within BAND_BYTES, and enough bands for
    // every thread when the batch is small
    let fixed = (win.kernel[0] - 1) * win.dilations[0] + 1;
    let per_row = win.strides[0];
    let fit = (BAND_BYTES / (4 * job.row_len).max(1)).saturating_sub(fixed) / per_row + 1;
    let spread = (n * oh).div_ceil(2 * super::super::team::threads()).max(1);
    let band = fit.min(spread).clamp(1, oh);
    let row_codes = ow * c_n;
    super::super::team::for_bands(codes, oh, row_codes, band, |img, r0, out| {
        SCRATCH.with_borrow_mut(|s| job.band(level, img, r0, out, s))
    });
    true
}

/// Images per group of the image-lane variant ([`image_lanes`]): one lane per image; calls with
/// at least this many images use it on narrow rows (the `mask` pass's time model prices that).
pub(crate) const IMAGES: usize = 16;

/// The largest planar copy of one group of images the image-lane variant makes (bytes); larger
/// layers keep pixel lanes.
const IMAGE_PLANES_BYTES: usize = 16 << 20;

/// The image-lane variant of [`tree_nhwc`] for output rows narrower than a vector (`ow < 16`,
/// where pixel lanes stay partly empty: a 7-pixel row fills 7 of 16) and batches of at least
/// [`IMAGES`]: each group of 16 images is copied into planes `[channel][column phase][padded
/// row][column][image]`, so the 16 images' values of one window column of one pixel are one
/// contiguous vector, every lane filled at any map size. Pixel `x` of an output row then sits
/// `16·x` values after the row's tap starts, so the pixel-lane row kernels run unchanged on
/// rows of `16 · ow` virtual pixels, whose codes are scattered to the images' rows. Same
/// comparisons, so the same codes. Returns false (nothing written) when a group's planes would
/// exceed [`IMAGE_PLANES_BYTES`].
fn image_lanes(level: Simd, rows: &Rows, pt: &PixelTree, c_n: usize, codes: &mut [u8]) -> bool {
    let Rows::ConvNhwc { x, shape, win, geo } = rows else {
        return false;
    };
    let [_, h, w, c] = *shape;
    let [oh, ow] = geo.out;
    let ([sh, sw], [dh, dw], [kh, kw]) = (win.strides, win.dilations, win.kernel);
    let (top, left) = (geo.pads[0], geo.pads[1]);
    // padded rows the windows read, and values per (row, phase) plane row
    let hp = (oh - 1) * sh + (kh - 1) * dh + 1;
    let qw = ow + (kw - 1) * dw / sw;
    let plane = hp * qw * IMAGES;
    let zero = c * sw * plane;
    let size = zero + ow * IMAGES;
    if size.saturating_mul(4) > IMAGE_PLANES_BYTES {
        return false;
    }
    // per codebook and level: its kernel row's offset in padded rows and its tap's start in
    // the output row's first padded row (`usize::MAX`: past the last subspace, reads zeros)
    let taps: Vec<(usize, usize)> = pt
        .taps
        .iter()
        .map(|t| match *t {
            Some((ch, i, j)) => {
                let u = j * dw;
                (i * dh, (ch * sw + u % sw) * plane + (u / sw) * IMAGES)
            }
            None => (usize::MAX, zero),
        })
        .collect();
    // the padded rows and columns some window reads
    let row_read = read_by_windows(hp, 0..oh, sh, kh, dh);
    let col_read = read_by_windows(w + left, 0..ow, sw, kw, dw);
    let per_image = oh * ow * c_n;
    super::super::team::for_chunks(codes, IMAGES * per_image, |g, out| {
        SCRATCH.with_borrow_mut(|s| {
            let images = out.len() / per_image;
            let Scratch { planes, xt, stage, .. } = s;
            planes.clear();
            planes.resize(size, 0.0);
            // the 16 images' channels of one pixel (images past the batch's last: zeros)
            stage.clear();
            stage.resize(IMAGES * c, 0.0);
            xt.resize(c, [0.0; IMAGES]);
            // fill: input pixel (iy, ix) of image l at padded row iy + top, column ix + left
            // (only those some window reads: a 1×1 stride-2 conv reads one pixel in four)
            for iy in 0..h.min(hp.saturating_sub(top)) {
                let yy = iy + top;
                if !row_read[yy] {
                    continue;
                }
                for ix in 0..w {
                    let u = ix + left;
                    if u / sw >= qw {
                        break;
                    }
                    if !col_read[u] {
                        continue;
                    }
                    for l in 0..images {
                        let src = &x[(((g * IMAGES + l) * h + iy) * w + ix) * c..][..c];
                        stage[l * c..(l + 1) * c].copy_from_slice(src);
                    }
                    transpose_images(level, stage, c, xt);
                    let at = (u % sw) * plane + yy * qw * IMAGES + (u / sw) * IMAGES;
                    for (ch, vals) in xt.iter().enumerate() {
                        planes[ch * sw * plane + at..][..IMAGES].copy_from_slice(vals);
                    }
                }
            }
            s.at.resize(taps.len(), 0);
            s.row_codes.resize(IMAGES * ow * c_n, 0);
            for y in 0..oh {
                for (a, &(ri, start)) in s.at.iter_mut().zip(&taps) {
                    *a = if ri == usize::MAX {
                        start
                    } else {
                        start + (y * sh + ri) * qw * IMAGES
                    };
                }
                // SAFETY: the caller detected `level` (AVX-512F, or AVX2); `at` has an entry per
                // codebook and level (asserted in `tree_nhwc`), each a tap's start in its
                // plane row (row `y·sh + i·dh < hp`, column `(j·dw)/sw`) or the zero row, from
                // which the `16·ow` virtual pixels read stay within the plane row
                // (`(j·dw)/sw + ow ≤ qw`) or the zero row (`16·ow` values).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match level {
                        Simd::Avx512 => x86::row_avx512(pt, IMAGES * ow, c_n, planes, &s.at, &mut s.row_codes),
                        _ => x86::row_avx2(pt, IMAGES * ow, c_n, planes, &s.at, &mut s.row_codes),
                    }
                }
                for l in 0..images {
                    for px in 0..ow {
                        let dst = ((l * oh + y) * ow + px) * c_n;
                        let src = (px * IMAGES + l) * c_n;
                        out[dst..dst + c_n].copy_from_slice(&s.row_codes[src..src + c_n]);
                    }
                }
            }
        })
    });
    true
}

/// Per padded position `0..len` (rows or columns, the padding before the input included),
/// whether a window of outputs `outs` reads it: output `o` reads `o·s + i·d` for its `k` taps.
fn read_by_windows(len: usize, outs: std::ops::Range<usize>, s: usize, k: usize, d: usize) -> Vec<bool> {
    let mut read = vec![false; len];
    for o in outs {
        for i in 0..k {
            if let Some(r) = read.get_mut(o * s + i * d) {
                *r = true;
            }
        }
    }
    read
}

/// `xt[ch][l] = stage[l·c + ch]`: 16 images' `c` channels transposed (AVX-512, 16 channels or
/// more: in registers).
fn transpose_images(level: Simd, stage: &[f32], c: usize, xt: &mut [[f32; IMAGES]]) {
    #[cfg(target_arch = "x86_64")]
    if level == Simd::Avx512 && c >= 16 {
        // SAFETY: AVX-512F detected; `stage` holds 16 rows of `c ≥ 16` values, `xt` `c` columns.
        unsafe { super::x86::transpose16_avx512(stage, c, xt) };
        return;
    }
    let _ = level;
    for (ch, col) in xt.iter_mut().enumerate().take(c) {
        for (l, v) in col.iter_mut().enumerate() {
            *v = stage[l * c + ch];
        }
    }
}

struct Job<'a> {
    x: &'a [f32],
    hwc: [usize; 3],
    strides: [usize; 2],
    dilations: [usize; 2],
    kernel: [usize; 2],
    /// top, left
    pads: [usize; 2],
    out: [usize; 2],
    /// Values per (row, channel, phase) plane.
    qw: usize,
    /// Values per planar input row: `C · stride_x · qw`.
    row_len: usize,
    /// Per codebook and level: the kernel row of its tap (`kh` when it reads zeros) and its
    /// offset within a planar input row.
    taps: Vec<(usize, usize)>,
    pt: &'a PixelTree,
    c_n: usize,
}

impl Job<'_> {
    /// Codes of output rows `ya ..` of image `img` (`out`: whole rows).
    fn band(&self, level: Simd, img: usize, ya: usize, out: &mut [u8], s: &mut Scratch) {
        let [h, w, c_in] = self.hwc;
        let sh = self.strides[0];
        let yb = ya + out.len() / (self.out[1] * self.c_n);
        let top = (ya * sh) as isize - self.pads[0] as isize;
        let bottom = ((yb - 1) * sh + (self.kernel[0] - 1) * self.dilations[0]) as isize - self.pads[0] as isize;
        let lo = top.clamp(0, h as isize) as usize;
        let hi = (bottom + 1).clamp(0, h as isize) as usize;
        let nrows = hi.max(lo) - lo;
        // the band's rows, then one zero row (padding rows and missing taps read it)
        let Scratch {
            planes,
            xt,
            stage,
            row_at,
            at,
            ..
        } = s;
        planes.clear();
        planes.resize((nrows + 1) * self.row_len, 0.0);
        let image = &self.x[img * h * w * c_in..(img + 1) * h * w * c_in];
        let top_pad = self.pads[0];
        let read = read_by_windows(hi + top_pad, ya..yb, sh, self.kernel[0], self.dilations[0]);
        for r in 0..nrows {
            if !read[lo + r + top_pad] {
                // its planes stay zero, unread (a 1×1 stride-2 conv reads every other row)
                continue;
            }
            let src = &image[(lo + r) * w * c_in..(lo + r + 1) * w * c_in];
            self.fill_row(
                level,
                src,
                &mut planes[r * self.row_len..(r + 1) * self.row_len],
                xt,
                stage,
            );
        }
        let zero_row = nrows * self.row_len;
        let (kh, dh) = (self.kernel[0], self.dilations[0]);
        let row_codes = self.out[1] * self.c_n;
        row_at.clear();
        row_at.resize(kh + 1, zero_row);
        for (k, y) in (ya..yb).enumerate() {
            let y0 = (y * sh) as isize - self.pads[0] as isize;
            for (i, start) in row_at[..kh].iter_mut().enumerate() {
                let iy = y0 + (i * dh) as isize;
                *start = if iy >= lo as isize && iy < hi as isize {
                    (iy as usize - lo) * self.row_len
                } else {
                    zero_row
                };
            }
            at.clear();
            at.extend(self.taps.iter().map(|&(i, o)| row_at[i] + o));
            let row = &mut out[k * row_codes..(k + 1) * row_codes];
            // SAFETY: the caller detected `level` (AVX-512F, or AVX2); `at` has an entry per
            // codebook and level (`taps`, the codebooks padded to a multiple of `TREES`:
            // asserted in `tree_nhwc`), each the start of a planar row in `planes` (the zero row
            // included) plus the tap's
            // offset, and a tap's lanes end within its plane: the offset is the plane's start
            // plus at most `(kw − 1)·dw / sw`, and `x0 + 16 ≤ ow` rounded up to 16, their sum
            // below `qw`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                match level {
                    Simd::Avx512 => x86::row_avx512(self.pt, self.out[1], self.c_n, planes, at, row),
                    _ => x86::row_avx2(self.pt, self.out[1], self.c_n, planes, at, row),
                }
            }
        }
    }

    /// Copies one channels-last input row (`w × C`) into its planes (`dst`, zeroed): value
    /// `(ix, ch)` at plane `(ch, u mod sw)`, position `u / sw`, with `u = ix + pad_left`.
    fn fill_row(&self, level: Simd, src: &[f32], dst: &mut [f32], xt: &mut Vec<[f32; 16]>, stage: &mut Vec<f32>) {
        let [_, w, c] = self.hwc;
        let (sw, qw, pl) = (self.strides[1], self.qw, self.pads[1]);
        #[cfg(target_arch = "x86_64")]
        if level == Simd::Avx512 && c >= 16 {
            xt.resize(c, [0.0; 16]);
            for ix0 in (0..w).step_by(16) {
                let n = (w - ix0).min(16);
                let pixels = if n == 16 {
                    &src[ix0 * c..(ix0 + 16) * c]
                } else {
                    // the last pixels, zero-padded to 16 (the zeros land in the right padding)
                    stage.resize(16 * c, 0.0);
                    stage[..n * c].copy_from_slice(&src[ix0 * c..]);
                    stage[n * c..].fill(0.0);
                    &stage[..16 * c]
                };
                // SAFETY: AVX-512F detected; 16 pixels of `c` values; `xt` has `c` columns.
                unsafe { super::x86::transpose16_avx512(pixels, c, xt) };
                for (ch, vals) in xt.iter().enumerate() {
                    if sw == 1 {
                        // qw ≥ w rounded up to 16, plus pad_left: the 16 values fit
                        dst[ch * qw + ix0 + pl..][..16].copy_from_slice(vals);
                    } else if sw == 2 {
                        // even lanes to one phase, odd to the other: 8 values each from
                        // column (ix0 + pl) / 2 (+ 1 for the second phase when ix0 + pl is
                        // odd); qw ≥ (w rounded up to 16 + pl) / 2 + 1: they fit
                        let u = ix0 + pl;
                        // SAFETY: AVX-512F detected.
                        let d = unsafe { x86::deinterleave2_avx512(vals) };
                        let (p0, p1) = ((ch * 2 + u % 2) * qw + u / 2, (ch * 2 + 1 - u % 2) * qw + u.div_ceil(2));
                        dst[p0..p0 + 8].copy_from_slice(&d[..8]);
                        dst[p1..p1 + 8].copy_from_slice(&d[8..]);
                    } else {
                        for (l, &v) in vals[..n].iter().enumerate() {
                            let u = ix0 + l + pl;
                            dst[(ch * sw + u % sw) * qw + u / sw] = v;
                        }
                    }
                }
            }
            return;
        }
        let _ = (level, xt, stage);
        for (ch, planes) in dst.chunks_exact_mut(sw * qw).enumerate().take(c) {
            let column = src[ch..].iter().step_by(c);
            if sw == 1 {
                for (d, &v) in planes[pl..pl + w].iter_mut().zip(column) {
                    *d = v;
                }
            } else {
                for (ix, &v) in column.enumerate() {
                    let u = ix + pl;
                    planes[(u % sw) * qw + u / sw] = v;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PixelTree, TREES};
    use std::arch::x86_64::*;

    /// `vals`' even lanes, then its odd lanes.
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn deinterleave2_avx512(vals: &[f32; 16]) -> [f32; 16] {
        let idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        let mut out = [0.0; 16];
        _mm512_storeu_ps(
            out.as_mut_ptr(),
            _mm512_permutexvar_ps(idx, _mm512_loadu_ps(vals.as_ptr())),
        );
        out
    }

    /// Codes of one output row (`out`: `ow × c_n`) from the planar band `planes`; `at[cl]` is
    /// where the values of codebook and level `cl`'s tap start for this row (in its kernel
    /// row's planar input row, or in the zero row). The image-lane variant passes rows of
    /// `16 · ow` virtual pixels (pixel `x` of image `l` at `16·x + l`).
    ///
    /// # Safety
    /// AVX-512F; `at` has an entry per codebook and level, the codebooks padded to a multiple
    /// of [`TREES`] as [`PixelTree::taps`] is, each the start of a tap's values in `planes`
    /// from which `ow` rounded up to 16 values stay within its plane (`qw`).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn row_avx512(
        pt: &PixelTree,
        ow: usize,
        c_n: usize,
        planes: &[f32],
        at: &[usize],
        out: &mut [u8],
    ) {
        let f = match pt.depth {
            0 => row512::<0>,
            1 => row512::<1>,
            2 => row512::<2>,
            3 => row512::<3>,
            4 => row512::<4>,
            5 => row512::<5>,
            6 => row512::<6>,
            7 => row512::<7>,
            8 => row512::<8>,
            d => unreachable!("trees of depth {d} are not built"),
        };
        f(pt, ow, c_n, planes, at, out)
    }

    /// [`row_avx512`] for trees of `D` levels (each level's threshold pick known at compile
    /// time): per 16 pixels and 16 codebooks, eight trees walked together (independent
    /// dependency chains); codebooks past the last repeat it and are not stored.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn row512<const D: usize>(
        pt: &PixelTree,
        ow: usize,
        c_n: usize,
        planes: &[f32],
        at: &[usize],
        out: &mut [u8],
    ) {
        assert!(pt.depth == D && pt.th_stride == (1 << D).max(16) && at.len() >= c_n.next_multiple_of(TREES) * D);
        assert!(pt.th.len() >= c_n.next_multiple_of(TREES) * pt.th_stride + 16);
        let (p, ths) = (planes.as_ptr(), (1 << D).max(16));
        let mut tile = [0u8; 256];
        let one = _mm512_set1_epi32(1);
        for x0 in (0..ow).step_by(16) {
            let lanes = (ow - x0).min(16);
            let px = p.add(x0);
            for c0 in (0..c_n).step_by(16) {
                let cw = (c_n - c0).min(16);
                // words[q] lane l: the codes of codebooks c0 + 4q .. c0 + 4q + 4 of pixel l
                let mut words = [_mm512_setzero_si512(); 4];
                for h in 0..cw.div_ceil(TREES) {
                    // the group's taps and thresholds (codebooks past the last are padded)
                    let c = c0 + TREES * h;
                    let taps = at.as_ptr().add(c * D);
                    let th = pt.th.as_ptr().add(c * ths);
                    let mut idx = [_mm512_setzero_si512(); TREES];
                    for lev in 0..D {
                        for r in 0..TREES {
                            let xv = _mm512_loadu_ps(px.add(*taps.add(r * D + lev)));
                            let t = level_threshold::<D>(th.add(r * ths), lev, idx[r]);
                            let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(xv, t);
                            let twice = _mm512_add_epi32(idx[r], idx[r]);
                            idx[r] = _mm512_mask_add_epi32(twice, gt, twice, one);
                        }
                    }
                    for q in 0..TREES / 4 {
                        let i = &idx[4 * q..];
                        words[2 * h + q] = _mm512_or_si512(
                            _mm512_or_si512(i[0], _mm512_slli_epi32::<8>(i[1])),
                            _mm512_or_si512(_mm512_slli_epi32::<16>(i[2]), _mm512_slli_epi32::<24>(i[3])),
                        );
                    }
                }
                // 4×4 dword transpose in each 128-bit lane k: register i holds pixel 4k + i's
                // 16 codes
                let a = _mm512_unpacklo_epi32(words[0], words[1]);
                let b = _mm512_unpackhi_epi32(words[0], words[1]);
                let e = _mm512_unpacklo_epi32(words[2], words[3]);
                let f = _mm512_unpackhi_epi32(words[2], words[3]);
                let regs = [
                    _mm512_unpacklo_epi64(a, e),
                    _mm512_unpackhi_epi64(a, e),
                    _mm512_unpacklo_epi64(b, f),
                    _mm512_unpackhi_epi64(b, f),
                ];
                for (i, r) in regs.into_iter().enumerate() {
                    _mm512_storeu_si512(tile.as_mut_ptr().add(64 * i).cast(), r);
                }
                store_codes(&tile, 64, lanes, cw, &mut out[(x0 * c_n + c0)..], c_n);
            }
        }
    }

    /// The threshold of each lane's node at level `lev` of a `D`-level tree (`idx`: the node's
    /// index within the level; `thc` the tree's thresholds, 16 values readable from each level's
    /// first node). Level 0 broadcasts its one threshold, levels 1–4 permute 16 values loaded
    /// at the level's first node, level 5 two registers (`vpermt2ps`), levels 6 and 7 pairs of
    /// them blended on bits 5 and 6 of `idx` — the permutes keep a gather's latency out of each
    /// level's dependency on the previous one.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn level_threshold<const D: usize>(thc: *const f32, lev: usize, idx: __m512i) -> __m512 {
        let base = thc.add((1 << lev) - 1);
        // 32 thresholds from base + 32·q, picked by bits 0–4 of idx
        let pair = |q: usize| {
            _mm512_permutex2var_ps(
                _mm512_loadu_ps(base.add(32 * q)),
                idx,
                _mm512_loadu_ps(base.add(32 * q + 16)),
            )
        };
        match lev {
            0 => _mm512_set1_ps(*thc),
            1..=4 => _mm512_permutexvar_ps(idx, _mm512_loadu_ps(base)),
            5 => pair(0),
            _ => {
                let b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
                let lo = _mm512_mask_blend_ps(b5, pair(0), pair(1));
                if lev == 6 {
                    return lo;
                }
                let hi = _mm512_mask_blend_ps(b5, pair(2), pair(3));
                let b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
                _mm512_mask_blend_ps(b6, lo, hi)
            }
        }
    }

    /// Writes the codes of `lanes` pixels × `cw` codebooks from `tile` (the four transposed
    /// registers, `reg_bytes` each: pixel `4k + i` at 16-byte lane `k` of register `i`) to `out`
    /// (pixel `l` at `l · c_n`).
    #[inline(always)]
    fn store_codes(tile: &[u8], reg_bytes: usize, lanes: usize, cw: usize, out: &mut [u8], c_n: usize) {
        for l in 0..lanes {
            let src = &tile[(l % 4) * reg_bytes + (l / 4) * 16..][..16];
            let dst = &mut out[l * c_n..];
            if cw == 16 {
                dst[..16].copy_from_slice(src);
            } else {
                dst[..cw].copy_from_slice(&src[..cw]);
            }
        }
    }

    /// [`row_avx512`] at AVX2: 8 pixels at a time, the thresholds of levels 0–2 from one 8-lane
    /// permute, level 3's from two and a blend, deeper levels' gathered.
    ///
    /// # Safety
    /// AVX2 and FMA; as [`row_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_avx2(pt: &PixelTree, ow: usize, c_n: usize, planes: &[f32], at: &[usize], out: &mut [u8]) {
        let depth = pt.depth;
        let p = planes.as_ptr();
        let mut tile = [0u8; 128];
        for x0 in (0..ow).step_by(8) {
            let lanes = (ow - x0).min(8);
            for c0 in (0..c_n).step_by(16) {
                let cw = (c_n - c0).min(16);
                let mut words = [_mm256_setzero_si256(); 4];
                for (q, word) in words.iter_mut().enumerate().take(cw.div_ceil(4)) {
                    let cs: [usize; 4] = std::array::from_fn(|r| (c0 + 4 * q + r).min(c_n - 1));
                    let th: [*const f32; 4] = std::array::from_fn(|r| pt.th.as_ptr().add(cs[r] * pt.th_stride));
                    let lo: [__m256; 4] = std::array::from_fn(|r| _mm256_loadu_ps(th[r]));
                    let hi: [__m256; 4] = std::array::from_fn(|r| _mm256_loadu_ps(th[r].add(8)));
                    let mut idx = [_mm256_setzero_si256(); 4];
                    for lev in 0..depth {
                        let first = _mm256_set1_epi32((1 << lev) - 1);
                        for r in 0..4 {
                            let cl = cs[r] * depth + lev;
                            let xv = _mm256_loadu_ps(p.add(*at.get_unchecked(cl) + x0));
                            let node = _mm256_add_epi32(idx[r], first);
                            // the node's threshold: levels 0..2 (nodes 0..6) from `lo` alone,
                            // level 3 (nodes 7..14) from `lo` or `hi`, deeper levels' gathered
                            let t = if lev < 3 {
                                _mm256_permutevar8x32_ps(lo[r], node)
                            } else if lev == 3 {
                                let high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(node, _mm256_set1_epi32(7)));
                                _mm256_blendv_ps(
                                    _mm256_permutevar8x32_ps(lo[r], node),
                                    _mm256_permutevar8x32_ps(hi[r], node),
                                    high,
                                )
                            } else {
                                _mm256_i32gather_ps::<4>(th[r], node)
                            };
                            // greater: all ones (−1), so 2·idx − mask adds the bit
                            let gt = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(xv, t));
                            idx[r] = _mm256_sub_epi32(_mm256_add_epi32(idx[r], idx[r]), gt);
                        }
                    }
                    *word = _mm256_or_si256(
                        _mm256_or_si256(idx[0], _mm256_slli_epi32::<8>(idx[1])),
                        _mm256_or_si256(_mm256_slli_epi32::<16>(idx[2]), _mm256_slli_epi32::<24>(idx[3])),
                    );
                }
                let a = _mm256_unpacklo_epi32(words[0], words[1]);
                let b = _mm256_unpackhi_epi32(words[0], words[1]);
                let e = _mm256_unpacklo_epi32(words[2], words[3]);
                let f = _mm256_unpackhi_epi32(words[2], words[3]);
                let regs = [
                    _mm256_unpacklo_epi64(a, e),
                    _mm256_unpackhi_epi64(a, e),
                    _mm256_unpacklo_epi64(b, f),
                    _mm256_unpackhi_epi64(b, f),
                ];
                for (i, r) in regs.into_iter().enumerate() {
                    _mm256_storeu_si256(tile.as_mut_ptr().add(32 * i).cast(), r);
                }
                store_codes(&tile, 32, lanes, cw, &mut out[(x0 * c_n + c0)..], c_n);
            }
        }
    }
}
