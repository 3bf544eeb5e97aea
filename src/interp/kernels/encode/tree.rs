//! Hash-tree (MADDNESS) encoding of channels-last convolution rows, one SIMD lane per output
//! pixel (16 at AVX-512, 8 at AVX2).
//!
//! Every lane of a tile compares the same window column of its own pixel, so the tile's values
//! of one column are `lanes` pixels of one channel. A channels-last image holds those `C`
//! values apart; each band of input rows is therefore first copied into a planar layout —
//! per (padded input row, channel, column phase) the row's values with the padding as zeros —
//! where they are one contiguous load (the column phase `u mod stride` splits strided windows
//! so that consecutive pixels stay consecutive). The copy is a 16×16 in-register transpose per
//! 16 pixels and 16 channels at AVX-512. A tap's values for the next output row are then the
//! same number of planar rows further on, so one table of tap starts serves every row (unless
//! a tap lies past the last subspace and reads the zero row: then one table per row). Each
//! node's threshold comes from a permute of the codebook's thresholds (`level_threshold`),
//! and the codes of 16 codebooks are assembled in registers and written as 16-byte runs per
//! pixel. The AVX-512 row kernel is compiled per tree depth and walks 8 trees at a time
//! (independent dependency chains); rows of at most 8 or 4 pixels (the 8×8 and 4×4 maps of a
//! CIFAR-style network) fill its 16 lanes with 2 or 4 output rows, one load per row, where one
//! table serves every row. Batches of 16 images or more fill them with images instead
//! ([`image_lanes`]).
//!
//! Same comparisons as [`super::tree_tile`] (`x > t`, `NaN` goes left, values outside the
//! image are 0), so the same codes at every level and on any thread count.

use super::{Rows, Simd};
use crate::interp::kernels::aligned::AlignedF32;
use std::cell::RefCell;
use std::sync::Arc;

/// A conv's hash trees as [`tree_nhwc`] reads them, built once per node.
pub(super) struct PixelTree {
    /// Codebooks (before the padding of `taps` and `th`).
    c_n: usize,
    depth: usize,
    kernel: [usize; 2],
    /// The thresholds of each codebook, `th_stride` apart, each level on its own 64-byte lines
    /// ([`level_at`]: 16 values for each of levels 0–4, then 32, 64, 128; unused values +inf):
    /// every vector load of a level's thresholds is aligned (loads from each level's first
    /// node in node order straddled two cache lines).
    th: AlignedF32,
    th_stride: usize,
    /// Per codebook and level: the window column compared, as (channel, i, j), or None when it
    /// lies past the last subspace's end (it reads as 0). Codebooks past the last, to a
    /// multiple of [`TREES`], repeat the last one's.
    taps: Vec<Option<(usize, usize, usize)>>,
    /// The last [`Job::shifted`] table built and what it depends on (the width of one plane,
    /// column stride, column and row dilations and channels): a layer's calls share their
    /// shapes, and at batch 1 rebuilding it per call showed as 6 % of a ResNet-18/16 run's
    /// profile samples (`Vec` collection).
    shifted: std::sync::Mutex<Option<([usize; 5], Shifted)>>,
}

/// A [`Job::shifted`] table, shared by the calls of one shape.
type Shifted = Option<Arc<Vec<usize>>>;

impl PixelTree {
    /// [`Job::shifted`] for `key`: the cached table, or `build`'s (then cached).
    fn shifted(&self, key: [usize; 5], build: impl FnOnce() -> Option<Vec<usize>>) -> Shifted {
        // a poisoned lock only means another call panicked while building: rebuild
        let mut cache = self.shifted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, table)) = &*cache {
            if *k == key {
                return table.clone();
            }
        }
        let table = build().map(Arc::new);
        *cache = Some((key, table.clone()));
        table
    }
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
    // codebooks past the last, to a multiple of TREES (the AVX-512 kernel walks them without
    // storing their codes): the last one's taps, thresholds +inf
    let c_pad = c_n.next_multiple_of(TREES);
    let last = |c: usize| c.min(c_n.saturating_sub(1));
    let taps = (0..c_pad * depth)
        .map(|cl| {
            let (c, lev) = (last(cl / depth), cl % depth);
            let col = c * sub.s + dims[c * depth + lev];
            (col < sub.d).then(|| (col / (kh * kw), col / kw % kh, col % kw))
        })
        .collect();
    let th_stride = level_at(depth).max(16);
    let mut th = AlignedF32::zeros(c_pad * th_stride);
    th.fill(f32::INFINITY);
    for c in 0..c_n {
        for lev in 0..depth {
            let (first, dst) = ((1 << lev) - 1, c * th_stride + level_at(lev));
            th[dst..dst + (1 << lev)].copy_from_slice(&thr[c * nodes + first..][..1 << lev]);
        }
    }
    Some(PixelTree {
        c_n,
        depth,
        kernel: [kh, kw],
        th,
        th_stride,
        taps,
        shifted: std::sync::Mutex::new(None),
    })
}

/// Where level `lev`'s thresholds start among a tree's in [`PixelTree::th`] (also the
/// values that levels `0 .. lev` take): 16 for each level up to 4, then the level's nodes.
const fn level_at(lev: usize) -> usize {
    if lev <= 5 {
        16 * lev
    } else {
        80 + (1 << lev) - 32
    }
}

/// Trees the AVX-512 row kernel walks together.
const TREES: usize = 8;

/// Planar scratch per band: about this many bytes of input rows at most (plus one zero row;
/// a band has at least one output row's input rows, whatever their size).
const BAND_BYTES: usize = 256 << 10;

/// A thread's buffers for its bands, reused across bands and calls.
#[derive(Default)]
struct Scratch {
    /// The band's planar padded input rows (rounded up to whole vectors of rows), then the
    /// zero row.
    planes: Vec<f32>,
    /// 16 pixels' channels transposed (`[channel][pixel]`) and a zero-padded copy of the last
    /// pixels of a row ([`Job::fill_row`]).
    xt: Vec<[f32; 16]>,
    stage: Vec<f32>,
    /// Per codebook and level: where its tap's values start in `planes` for the current output
    /// row (its kernel row's start plus the tap's offset), so the kernels load without lookups;
    /// unused where one table serves every row (`Job::shifted`; the image-lane variant's starts
    /// of row 0, read from each row's base offset).
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
    let row_len = c_in * sw * qw;
    // the offset of a tap's first lane's value within a planar input row
    let offset = |ch: usize, j: usize| {
        let u = j * dw;
        (ch * sw + u % sw) * qw + u / sw
    };
    // per codebook and level, when no tap lies past the last subspace (the usual case): its
    // start from the planar row of the output row's kernel row 0
    let shifted = pt.shifted([qw, sw, dw, win.dilations[0], c_in], || {
        pt.taps
            .iter()
            .map(|t| t.map(|(ch, i, j)| i * win.dilations[0] * row_len + offset(ch, j)))
            .collect()
    });
    // else the kernel row of each tap (`kh`: none, it reads the zero row) and its offset
    let taps = match shifted {
        Some(_) => Vec::new(),
        None => pt
            .taps
            .iter()
            .map(|t| match *t {
                Some((ch, i, j)) => (i, offset(ch, j)),
                None => (win.kernel[0], 0),
            })
            .collect(),
    };
    let job = Job {
        x,
        hwc: [h, w, c_in],
        strides: win.strides,
        dilations: win.dilations,
        kernel: win.kernel,
        pads: [geo.pads[0], pl],
        out: geo.out,
        qw,
        row_len,
        taps,
        shifted,
        pt,
        c_n,
    };
    // output rows per band: the band's input rows within BAND_BYTES, and enough bands for
    // every thread when the batch is small
    let fixed = (win.kernel[0] - 1) * win.dilations[0] + 1;
    let per_row = win.strides[0];
    let fit = (BAND_BYTES / (4 * job.row_len).max(1)).saturating_sub(fixed) / per_row + 1;
    let spread = (n * oh).div_ceil(2 * super::super::team::threads()).max(1);
    // whole vectors of rows where a vector holds several (narrow rows at AVX-512)
    let per = 16 / job.lanes(level);
    let band = fit.min(spread).next_multiple_of(per).clamp(1, oh);
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
            zeroed(planes, size);
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
            s.row_codes.resize(IMAGES * ow * c_n, 0);
            // without taps past the last subspace (which read the zero row), every tap's start
            // moves by the same `sh` padded rows from one output row to the next: one table of
            // starts for row 0, read from the row's offset into the planes
            let shifts = taps.iter().all(|&(ri, _)| ri != usize::MAX);
            if shifts {
                s.at.clear();
                s.at.extend(taps.iter().map(|&(ri, start)| start + ri * qw * IMAGES));
            }
            for y in 0..oh {
                let base = if shifts {
                    y * sh * qw * IMAGES
                } else {
                    s.at.clear();
                    s.at.extend(taps.iter().map(|&(ri, start)| {
                        if ri == usize::MAX {
                            start
                        } else {
                            start + (y * sh + ri) * qw * IMAGES
                        }
                    }));
                    0
                };
                let planes = &planes[base..];
                // SAFETY: the caller detected `level` (AVX-512F, or AVX2); `at` has an entry per
                // codebook and level (asserted in `tree_nhwc`), each, from `planes` (offset by
                // `base`), a tap's start in its plane row (row `y·sh + i·dh < hp`, column
                // `(j·dw)/sw`) or the zero row, from which the `16·ow` virtual pixels read stay
                // within the plane row (`(j·dw)/sw + ow ≤ qw`) or the zero row (`16·ow` values).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match level {
                        Simd::Avx512 => {
                            let g = x86::Lanes::ROW;
                            x86::row_avx512(pt, IMAGES * ow, g, c_n, planes, &s.at, &mut s.row_codes)
                        }
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

/// `v` as `n` zeros (`fill` is a `memset`; `resize` alone zeroes new values through a loop of
/// 16-byte stores).
fn zeroed(v: &mut Vec<f32>, n: usize) {
    v.resize(n, 0.0);
    v.fill(0.0);
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
    /// offset within a planar input row (empty when `shifted` is given).
    taps: Vec<(usize, usize)>,
    /// When no tap lies past the last subspace (none reads the zero row): per codebook and
    /// level, its start from the planar row of the output row's kernel row 0 (`i·dh·row_len`
    /// plus its offset), which every output row reads from its own base offset.
    shifted: Shifted,
    pt: &'a PixelTree,
    c_n: usize,
}

impl Job<'_> {
    /// Pixel lanes per output row in a vector of the row kernel: 16, or at AVX-512 8 or 4 for
    /// rows of at most 8 or 4 pixels (two or four output rows per vector, whose taps are the
    /// same number of planar rows apart: possible when no tap reads the zero row).
    fn lanes(&self, level: Simd) -> usize {
        match self.out[1] {
            _ if level != Simd::Avx512 || self.shifted.is_none() => 16,
            0..=4 => 4,
            5..=8 => 8,
            _ => 16,
        }
    }

    /// Codes of output rows `ya ..` of image `img` (`out`: whole rows).
    fn band(&self, level: Simd, img: usize, ya: usize, out: &mut [u8], s: &mut Scratch) {
        let [h, w, c_in] = self.hwc;
        let (sh, kh, dh) = (self.strides[0], self.kernel[0], self.dilations[0]);
        let (ow, row_len) = (self.out[1], self.row_len);
        let row_codes = ow * self.c_n;
        let yb = ya + out.len() / row_codes;
        let lanes = self.lanes(level);
        let per = 16 / lanes;
        // the padded rows (top padding included) from `ya·sh` to the last one a window of the
        // band's rows reads, rounded up to whole vectors of `per` rows, then one zero row
        // (taps past the last subspace read it); rows outside the image stay zero
        let p0 = ya * sh;
        let np = (ya + (yb - ya).next_multiple_of(per) - 1) * sh + (kh - 1) * dh + 1 - p0;
        let Scratch {
            planes, xt, stage, at, ..
        } = s;
        zeroed(planes, (np + 1) * row_len);
        let image = &self.x[img * h * w * c_in..(img + 1) * h * w * c_in];
        let top = self.pads[0];
        let read = read_by_windows(p0 + np, ya..yb, sh, kh, dh);
        for r in 0..np {
            let pr = p0 + r;
            // rows no window reads stay zero (a 1×1 stride-2 conv reads every other row)
            if !read[pr] || pr < top || pr - top >= h {
                continue;
            }
            let iy = pr - top;
            let src = &image[iy * w * c_in..(iy + 1) * w * c_in];
            self.fill_row(level, src, &mut planes[r * row_len..(r + 1) * row_len], xt, stage);
        }
        let zero_row = np * row_len;
        for y in (ya..yb).step_by(per) {
            let rows = (yb - y).min(per);
            // output row y's kernel row i reads planar row (y − ya)·sh + i·dh
            let base = (y - ya) * sh * row_len;
            let (base, at): (usize, &[usize]) = match &self.shifted {
                Some(rel) => (base, &rel[..]),
                None => {
                    at.clear();
                    at.extend(
                        self.taps
                            .iter()
                            .map(|&(i, o)| if i < kh { base + i * dh * row_len + o } else { zero_row }),
                    );
                    (0, at)
                }
            };
            let codes = &mut out[(y - ya) * row_codes..(y - ya + rows) * row_codes];
            // SAFETY: the caller detected `level` (AVX-512F, or AVX2); `at` has an entry per
            // codebook and level (`taps`, the codebooks padded to a multiple of `TREES`:
            // asserted in `tree_nhwc`), each, from `planes` offset by `base`, the start of a
            // planar row (the zero row included, read by one row per vector only) plus the
            // tap's offset, and a tap's lanes end within its plane: the offset is the plane's
            // start plus at most `(kw − 1)·dw / sw`, and `x0 + 16 ≤ ow` rounded up to 16 (or
            // `lanes ≥ ow`), their sum below `qw`; the `per` rows of a vector are `sh` planar
            // rows apart, all within the `np` rows.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let planes = &planes[base..];
                match level {
                    Simd::Avx512 => {
                        let g = x86::Lanes {
                            lanes,
                            rows,
                            stride: sh * row_len,
                        };
                        x86::row_avx512(self.pt, ow, g, self.c_n, planes, at, codes)
                    }
                    _ => x86::row_avx2(self.pt, ow, self.c_n, planes, at, codes),
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
                        let (p0, p1) = ((ch * 2 + u % 2) * qw + u / 2, (ch * 2 + 1 - u % 2) * qw + u.div_ceil(2));
                        let (a, b) = dst.split_at_mut(p0.max(p1));
                        let (even, odd) = if p0 < p1 {
                            (&mut a[p0..p0 + 8], &mut b[..8])
                        } else {
                            (&mut b[..8], &mut a[p1..p1 + 8])
                        };
                        // SAFETY: AVX-512F detected.
                        unsafe { x86::deinterleave2_avx512(vals, even, odd) };
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
    use super::{level_at, PixelTree, TREES};
    use seq_macro::seq;
    use std::arch::x86_64::*;

    // the row kernel's unrolled loops (`seq!`) walk this many trees and at most 8 levels
    const _: () = assert!(TREES == 8);

    /// `vals`' even lanes into `even`, its odd lanes into `odd` (8 values each), stored from
    /// the register halves (through a 16-value array, 30 % of the band's profile samples at
    /// batch 1 sat on the loads right after its store: a store-forwarding stall, by the look
    /// of it).
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn deinterleave2_avx512(vals: &[f32; 16], even: &mut [f32], odd: &mut [f32]) {
        assert!(even.len() >= 8 && odd.len() >= 8);
        let idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        let d = _mm512_castps_pd(_mm512_permutexvar_ps(idx, _mm512_loadu_ps(vals.as_ptr())));
        _mm256_storeu_pd(even.as_mut_ptr().cast(), _mm512_castpd512_pd256(d));
        _mm256_storeu_pd(odd.as_mut_ptr().cast(), _mm512_extractf64x4_pd::<1>(d));
    }

    /// How the 16 lanes of a vector map to output pixels: `lanes` consecutive pixels of each
    /// of `16 / lanes` output rows (16: one row; 8 or 4: rows of at most that many pixels),
    /// `stride` values apart in the planes; `rows` of them are stored (the last vector of a
    /// band may hold fewer).
    #[derive(Clone, Copy)]
    pub(super) struct Lanes {
        pub lanes: usize,
        pub rows: usize,
        pub stride: usize,
    }

    impl Lanes {
        /// One row per vector.
        pub const ROW: Lanes = Lanes {
            lanes: 16,
            rows: 1,
            stride: 0,
        };
    }

    /// Codes of one output row (`out`: `ow × c_n`), or of `g.rows` rows of at most `g.lanes`
    /// pixels, from the planar band `planes`; `at[cl]` is where the values of codebook and
    /// level `cl`'s tap start for this (first) row (in its kernel row's planar input row, or in
    /// the zero row). The image-lane variant passes rows of `16 · ow` virtual pixels (pixel `x`
    /// of image `l` at `16·x + l`).
    ///
    /// # Safety
    /// AVX-512F; `at` has an entry per codebook and level, the codebooks padded to a multiple
    /// of [`TREES`] as [`PixelTree::taps`] is, each the start of a tap's values in `planes`
    /// from which `ow` rounded up to 16 values stay within its plane (`qw`); with several rows
    /// per vector (`g.lanes < 16`, `ow ≤ g.lanes`), the same `g.stride`, `2·g.stride`, … further
    /// on, for every row of the vector (`16 / g.lanes`), also in `planes`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn row_avx512(
        pt: &PixelTree,
        ow: usize,
        g: Lanes,
        c_n: usize,
        planes: &[f32],
        at: &[usize],
        out: &mut [u8],
    ) {
        macro_rules! by_depth {
            ($l:literal) => {
                match pt.depth {
                    0 => row512::<0, $l>,
                    1 => row512::<1, $l>,
                    2 => row512::<2, $l>,
                    3 => row512::<3, $l>,
                    4 => row512::<4, $l>,
                    5 => row512::<5, $l>,
                    6 => row512::<6, $l>,
                    7 => row512::<7, $l>,
                    8 => row512::<8, $l>,
                    d => unreachable!("trees of depth {d} are not built"),
                }
            };
        }
        let f = match g.lanes {
            16 => by_depth!(16),
            8 => by_depth!(8),
            4 => by_depth!(4),
            l => unreachable!("{l} lanes per row"),
        };
        f(pt, ow, g, c_n, planes, at, out)
    }

    /// 16 values: `L` from each of `16 / L` rows `stride` apart.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn load_lanes<const L: usize>(p: *const f32, stride: usize) -> __m512 {
        match L {
            16 => _mm512_loadu_ps(p),
            8 => _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                _mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps(p))),
                _mm256_castps_pd(_mm256_loadu_ps(p.add(stride))),
            )),
            _ => {
                let v = _mm512_castps128_ps512(_mm_loadu_ps(p));
                let v = _mm512_insertf32x4::<1>(v, _mm_loadu_ps(p.add(stride)));
                let v = _mm512_insertf32x4::<2>(v, _mm_loadu_ps(p.add(2 * stride)));
                _mm512_insertf32x4::<3>(v, _mm_loadu_ps(p.add(3 * stride)))
            }
        }
    }

    /// [`row_avx512`] for trees of `D` levels (each level's threshold pick known at compile
    /// time) and `L` lanes per row: per 16 pixels and 16 codebooks, eight trees walked together
    /// (independent dependency chains); codebooks past the last repeat it and are not stored.
    // `seq!` writes the first tree's offsets as `0 * D` and `0 * ths`
    #[allow(clippy::erasing_op, clippy::identity_op)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn row512<const D: usize, const L: usize>(
        pt: &PixelTree,
        ow: usize,
        g: Lanes,
        c_n: usize,
        planes: &[f32],
        at: &[usize],
        out: &mut [u8],
    ) {
        assert!(pt.depth == D && pt.th_stride == level_at(D).max(16) && at.len() >= c_n.next_multiple_of(TREES) * D);
        assert!(pt.th.len() >= c_n.next_multiple_of(TREES) * pt.th_stride);
        assert!(g.lanes == L && (L == 16 || (ow <= L && g.rows <= 16 / L)) && out.len() >= ow * c_n * g.rows);
        let (p, ths) = (planes.as_ptr(), level_at(D).max(16));
        let mut tile = [0u8; 256];
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
                    // unrolled by hand (levels and trees constants): as loops, LLVM kept `idx`
                    // on the stack, a store and a reload in every step's dependency chain
                    seq!(LEV in 0..8 {
                        if LEV < D {
                            seq!(R in 0..8 {
                                let xv = load_lanes::<L>(px.add(*taps.add(R * D + LEV)), g.stride);
                                let t = level_threshold::<D>(th.add(R * ths), LEV, idx[R]);
                                let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(xv, t);
                                idx[R] = crate::interp::kernels::tree_step(idx[R], gt);
                            });
                        }
                    });
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
                // lanes q·L .. q·L + lanes: pixels x0 .. of the vector's row q (one row at L = 16)
                for q in 0..g.rows {
                    let out = &mut out[((q * ow) + x0) * c_n + c0..];
                    store_codes(&tile, 64, q * L, lanes, cw, out, c_n);
                }
            }
        }
    }

    /// The threshold of each lane's node at level `lev` of a `D`-level tree (`idx`: the node's
    /// index within the level; `thc` the tree's thresholds as [`PixelTree::th`] lays them
    /// out, each level from a 64-byte boundary). Level 0 broadcasts its one threshold, levels
    /// 1–4 permute the level's 16 values, level 5 two registers (`vpermt2ps`), levels 6 and 7
    /// pairs of them blended on bits 5 and 6 of `idx` — the permutes keep a gather's latency
    /// out of each level's dependency on the previous one.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn level_threshold<const D: usize>(thc: *const f32, lev: usize, idx: __m512i) -> __m512 {
        let base = thc.add(level_at(lev));
        // 32 thresholds from base + 32·q, picked by bits 0–4 of idx
        let pair = |q: usize| {
            _mm512_permutex2var_ps(
                _mm512_load_ps(base.add(32 * q)),
                idx,
                _mm512_load_ps(base.add(32 * q + 16)),
            )
        };
        match lev {
            0 => _mm512_set1_ps(*thc),
            1..=4 => _mm512_permutexvar_ps(idx, _mm512_load_ps(base)),
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
    /// registers, `reg_bytes` each: lane `4k + i` at 16-byte lane `k` of register `i`), from
    /// lane `first` on, to `out` (pixel `l` at `l · c_n`).
    #[inline(always)]
    fn store_codes(tile: &[u8], reg_bytes: usize, first: usize, lanes: usize, cw: usize, out: &mut [u8], c_n: usize) {
        for l in 0..lanes {
            let t = first + l;
            let src = &tile[(t % 4) * reg_bytes + (t / 4) * 16..][..16];
            let dst = &mut out[l * c_n..];
            if cw == 16 {
                dst[..16].copy_from_slice(src);
            } else {
                dst[..cw].copy_from_slice(&src[..cw]);
            }
        }
    }

    /// [`row_avx512`] at AVX2: 8 pixels at a time, the thresholds of levels 0–3 from one 8-lane
    /// permute of the level's values, deeper levels' gathered.
    ///
    /// # Safety
    /// AVX2 and FMA; as [`row_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_avx2(pt: &PixelTree, ow: usize, c_n: usize, planes: &[f32], at: &[usize], out: &mut [u8]) {
        let depth = pt.depth;
        // every codebook's levels lie in `th`, each level from a 64-byte boundary
        assert!(pt.th_stride == level_at(depth).max(16) && pt.th.len() >= c_n * pt.th_stride);
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
                    let mut idx = [_mm256_setzero_si256(); 4];
                    for lev in 0..depth {
                        for r in 0..4 {
                            let cl = cs[r] * depth + lev;
                            let xv = _mm256_loadu_ps(p.add(*at.get_unchecked(cl) + x0));
                            // the node's threshold (`idx`: its index within the level): levels
                            // 0..3 (at most 8 nodes) from one permute, deeper levels' gathered
                            let tl = th[r].add(level_at(lev));
                            let t = if lev <= 3 {
                                _mm256_permutevar8x32_ps(_mm256_load_ps(tl), idx[r])
                            } else {
                                _mm256_i32gather_ps::<4>(tl, idx[r])
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
                store_codes(&tile, 32, 0, lanes, cw, &mut out[(x0 * c_n + c0)..], c_n);
            }
        }
    }
}
