//! Direct convolution on channels-last activations (`[N, H, W, C]` in, `[N, oh, ow, M]` out),
//! without an im2col matrix.
//!
//! Output pixels are taken in raster order across the whole batch, `R` at a time; output
//! channels in blocks of 16 or 32 lanes. A tile keeps its `R × lanes` sums in registers and, for
//! every tap `(ky, kx)` and input channel, broadcasts one input value per pixel against one
//! weight vector. Weights are packed once per node as `[block][ky][kx][c][lanes]` (zero lanes
//! past `M`). Padding is written out, so the tile loop has no bounds checks: for a batch of at
//! least two images per thread, by each task into its thread's scratch, a group of images at a
//! time (about 256 KB, so the copy and the tiles' reads stay in L2); otherwise, and for the
//! one-input-channel row kernels, once per call for the whole batch. The 3×3 depthwise row
//! kernels instead read the unpadded input (zero row, border pixels with outside taps read as
//! zeros) because the copy cost as much as the convolution. Padded convolutions of a batch on
//! small maps take tiles of one output position across images instead
//! ([`conv_by_position`]), which skip the taps outside the image.
//!
//! Every output is `bias`, then one fused multiply-add per `(ky, kx, c)` in that order (the
//! position tiles leave out the taps outside the image; which path runs depends on the shape
//! and batch, never on the level), then the optional ReLU: the AVX-512, AVX2 and scalar paths
//! give bit-identical results, and so does any thread count (threads split tiles, never sums).
//!
//! Depthwise convolutions (`group = C = M`, [`NhwcWeights::pack_depthwise`]) run through the
//! same tiles (3×3 ones through row kernels), vectorized over channels; one-input-channel convs
//! through row kernels vectorized over output channels.

use super::aligned::AlignedF32;
use super::Simd;
use crate::error::Result;
use crate::ir::op::Conv;
use crate::ir::window::Geometry;
use rayon::prelude::*;

/// Lanes per packed block (the last block of a layer may be 16).
const BLOCK: usize = 32;
/// Multiply-adds from which a convolution splits among the team's threads (a quarter of
/// [`super::PAR_WORK`]: the team's helpers spin between loops, so a hand-off costs far less than
/// waking a rayon worker).
const TEAM_WORK: usize = 1 << 16;

/// Convolution weights packed for [`conv_nhwc`] (group 1) or [`depthwise_nhwc`].
pub struct NhwcWeights {
    /// Output channels.
    m: usize,
    /// Input channels per output (all of them for group 1, one for depthwise).
    c: usize,
    kernel: [usize; 2],
    /// `(first output channel, lanes)` of each block; lanes is 16 or 32.
    blocks: Vec<(usize, usize)>,
    /// Each block `[kh][kw][c][lanes]` after the previous; for depthwise one block `[kh][kw][Mp]`.
    /// 64-byte aligned (whole-vector loads never straddle cache lines).
    data: AlignedF32,
    /// Bias padded to the blocks' lanes (zeros when the node has none).
    bias: AlignedF32,
    depthwise: bool,
}

impl NhwcWeights {
    /// `w`: `[M, C, kh, kw]` (ONNX layout, group 1), `bias`: `[M]`.
    pub fn pack(w: &[f32], m: usize, c: usize, kernel: [usize; 2], bias: Option<&[f32]>) -> NhwcWeights {
        let [kh, kw] = kernel;
        let mut blocks = Vec::new();
        let mut oc = 0;
        while oc < m {
            let lanes = if m - oc > 16 { BLOCK } else { 16 };
            blocks.push((oc, lanes));
            oc += lanes;
        }
        let mp = oc;
        let mut data = Vec::with_capacity(mp * c * kh * kw);
        for &(oc0, lanes) in &blocks {
            for i in 0..kh {
                for j in 0..kw {
                    for ci in 0..c {
                        data.extend((oc0..oc0 + lanes).map(|o| {
                            if o < m {
                                w[((o * c + ci) * kh + i) * kw + j]
                            } else {
                                0.0
                            }
                        }));
                    }
                }
            }
        }
        NhwcWeights {
            m,
            c,
            kernel,
            blocks,
            data: data.as_slice().into(),
            bias: padded_bias(bias, m, mp).as_slice().into(),
            depthwise: false,
        }
    }

    /// `w`: `[C, 1, kh, kw]` of a depthwise convolution (`group = C = M`).
    pub fn pack_depthwise(w: &[f32], c: usize, kernel: [usize; 2], bias: Option<&[f32]>) -> NhwcWeights {
        let [kh, kw] = kernel;
        let cp = c.div_ceil(16) * 16;
        let mut data = AlignedF32::zeros(kh * kw * cp);
        for ci in 0..c {
            for t in 0..kh * kw {
                data[t * cp + ci] = w[ci * kh * kw + t];
            }
        }
        NhwcWeights {
            m: c,
            c: 1,
            kernel,
            blocks: vec![(0, cp)],
            data,
            bias: padded_bias(bias, c, cp).as_slice().into(),
            depthwise: true,
        }
    }

    pub fn is_depthwise(&self) -> bool {
        self.depthwise
    }
}

fn padded_bias(bias: Option<&[f32]>, m: usize, mp: usize) -> Vec<f32> {
    let mut b = vec![0f32; mp];
    if let Some(bias) = bias {
        b[..m].copy_from_slice(&bias[..m]);
    }
    b
}

/// The padded frame of a conv's input: `hp × wp` pixels, the input at `(top, left)`.
#[derive(Clone, Copy)]
struct Frame {
    hp: usize,
    wp: usize,
    top: usize,
    left: usize,
}

impl Frame {
    fn new([h, w]: [usize; 2], conv: &Conv, geo: &Geometry) -> Frame {
        let win = &conv.window;
        let need = |i: usize, o: usize, lo: usize, size: usize| {
            ((o.max(1) - 1) * win.strides[i] + win.extent(i)).max(lo + size)
        };
        Frame {
            hp: need(0, geo.out[0], geo.pads[0], h),
            wp: need(1, geo.out[1], geo.pads[1], w),
            top: geo.pads[0],
            left: geo.pads[1],
        }
    }

    /// Write the images `src` (`[k, h, w, c]`) padded into `dst` (`k · hp · wp · c` values):
    /// every value once, zeros only in the border (no memset of the whole buffer).
    fn write(&self, src: &[f32], [h, w, c]: [usize; 3], dst: &mut [std::mem::MaybeUninit<f32>]) {
        for (img, dst) in dst.chunks_mut(self.hp * self.wp * c).enumerate() {
            self.write_rows(&src[img * h * w * c..][..h * w * c], [h, w, c], 0, dst);
        }
    }

    /// Write the padded rows `y0..` of one image `src` (`[h, w, c]`) into `dst` (whole rows of
    /// `wp · c` values, at most `hp - y0` of them).
    fn write_rows(&self, src: &[f32], [h, w, c]: [usize; 3], y0: usize, dst: &mut [std::mem::MaybeUninit<f32>]) {
        let zero = std::mem::MaybeUninit::new(0f32);
        for (y, row) in (y0..).zip(dst.chunks_mut(self.wp * c)) {
            let Some(sy) = y.checked_sub(self.top).filter(|&sy| sy < h) else {
                row.fill(zero);
                continue;
            };
            let (l, rest) = row.split_at_mut(self.left * c);
            let (mid, r) = rest.split_at_mut(w * c);
            l.fill(zero);
            for (d, &v) in mid.iter_mut().zip(&src[sy * w * c..][..w * c]) {
                d.write(v);
            }
            r.fill(zero);
        }
    }
}

/// The whole batch padded in `f` (`[N, hp, wp, C]`), or `x` itself when nothing is padded.
/// Fewer images than threads (batch 1): each image's rows in bands on the team's threads.
fn pad_input<'a>(x: &'a [f32], [n, h, w, c]: [usize; 4], f: &Frame) -> std::borrow::Cow<'a, [f32]> {
    let (hp, wp) = (f.hp, f.wp);
    if hp == h && wp == w {
        return x.into();
    }
    let mut data: Vec<f32> = Vec::with_capacity(n * hp * wp * c);
    let image = hp * wp * c;
    let threads = super::team::threads();
    if n < threads && image >= PAD_SPLIT {
        let band = hp.div_ceil(threads);
        super::team::for_bands(
            &mut data.spare_capacity_mut()[..n * image],
            hp,
            wp * c,
            band,
            |img, y0, dst| f.write_rows(&x[img * h * w * c..][..h * w * c], [h, w, c], y0, dst),
        );
    } else {
        data.spare_capacity_mut()[..n * image]
            .par_chunks_mut(image)
            .with_min_len(super::min_chunks(image))
            .enumerate()
            .for_each(|(img, dst)| f.write(&x[img * h * w * c..][..h * w * c], [h, w, c], dst));
    }
    // SAFETY: `Frame::write` (or `write_rows`, over every row of every image) wrote every one
    // of the `n · hp · wp · c` values (each image's `hp` rows of `wp · c`: border rows zeroed,
    // other rows zeros | the input row | zeros; `need` keeps `left + w ≤ wp` and
    // `top + h ≤ hp`).
    unsafe { data.set_len(n * image) };
    data.into()
}

/// Floats of one padded image from which batch-1 padding is split among the threads.
const PAD_SPLIT: usize = 1 << 13;

/// Bytes of padded input a task copies at a time into its thread's [`PAD_SCRATCH`] when the
/// batch is padded in groups of images: a group stays in L2 from the copy to its last tile.
const GROUP_BYTES: usize = 1 << 18;

thread_local! {
    /// A group of padded images ([`conv_nhwc`]), reused from call to call.
    static PAD_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where the tile kernels read and write.
#[derive(Clone)]
struct Layout {
    /// Input channels of the packed weights (per output for depthwise: 1).
    c: usize,
    kernel: [usize; 2],
    /// The taps the group-1 tile kernels run, `[[first, count]; 2]` along y and x (the whole
    /// kernel, except for tiles of pixels at one output position, which skip the taps outside
    /// the image: [`conv_by_position`]); a pixel's offset is that of its first tap.
    win: [[usize; 2]; 2],
    /// Input offset (floats) between taps along y and x.
    tap: [usize; 2],
    /// Output channels.
    m: usize,
    /// Output floats between a tile's pixels (`m`, or a whole image's for tiles of one output
    /// position across images).
    out_px: usize,
    /// Add the output buffer's values (the residual) to the sums before the ReLU.
    accumulate: bool,
    /// The ReLU and its upper bound (`+inf` for a plain ReLU, `max` for a fused `Clip(0, max)`):
    /// `min(max(v, 0), cap)`, which for a plain ReLU is `max(v, 0)` bit for bit.
    relu_cap: Option<f32>,
}

impl Layout {
    /// The scalar epilogue's activation (the SIMD stores apply the same `max`, then `min`).
    #[inline(always)]
    fn act(&self, v: f32) -> f32 {
        match self.relu_cap {
            Some(cap) => super::relu(v).min(cap),
            None => v,
        }
    }
}

/// What follows the sums of a channels-last conv.
#[derive(Default)]
pub struct Epilogue {
    /// `[N, oh, ow, M]` added to the output (a residual `Add` fused into the conv); its buffer
    /// becomes the output.
    pub residual: Option<Vec<f32>>,
    pub relu: bool,
    /// With `relu`: the output also capped at this value (a fused `Clip(0, max)`).
    pub relu_max: Option<f32>,
}

/// Group-1 or depthwise convolution, channels-last. `x`: `[N, H, W, C]`; returns `[N, oh, ow, M]`:
/// `relu(bias + Σ x·w + residual)`.
pub fn conv_nhwc(
    x: &[f32],
    xshape: [usize; 4],
    wts: &NhwcWeights,
    conv: &Conv,
    epi: Epilogue,
    simd: Simd,
) -> Result<(Vec<f32>, [usize; 4])> {
    let [n, h, w, c] = xshape;
    if xshape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(x.len()) {
        crate::bail!("conv input has {} values, not the {xshape:?} of its shape", x.len());
    }
    let geo = conv.window.resolve([h, w])?;
    let [oh, ow] = geo.out;
    let m = wts.m;
    let [sh, sw] = conv.window.strides;
    let [dh, dw] = conv.window.dilations;
    debug_assert_eq!(wts.c, if wts.depthwise { 1 } else { c });
    let pixels = n * oh * ow;
    // The output: the residual's buffer (the kernels add it), or fresh memory that the kernels
    // below write in full (every pixel's `m` values) before `Output::finish` marks it written.
    let mut out = match epi.residual {
        Some(r) if r.len() == pixels * m => Output { v: r, fresh: false },
        Some(r) => crate::bail!("residual has {} values, the output {}", r.len(), pixels * m),
        None => Output {
            v: Vec::with_capacity(pixels * m),
            fresh: true,
        },
    };
    let outp = out.ptr();
    let mut lay = Layout {
        c: wts.c,
        kernel: wts.kernel,
        win: [[0, wts.kernel[0]], [0, wts.kernel[1]]],
        tap: [0, dw * c],
        m,
        out_px: m,
        accumulate: !out.fresh,
        relu_cap: epi.relu.then(|| epi.relu_max.unwrap_or(f32::INFINITY)),
    };
    #[cfg(target_arch = "x86_64")]
    if simd >= Simd::Avx2 && wts.depthwise && wts.kernel == [3, 3] {
        depthwise3_rows(simd, x, xshape, &geo, conv, wts, &lay, outp);
        // SAFETY: every row of every image was computed above.
        return Ok((unsafe { out.finish(pixels * m) }, [n, oh, ow, m]));
    }
    let frame = Frame::new([h, w], conv, &geo);
    let padded = frame.hp != h || frame.wp != w;
    lay.tap[0] = dh * frame.wp * c;
    // Input offsets of the window corners of output pixels `q0..q0 + r` (the pixel `last`
    // repeated past the end), and their stride when evenly spaced (else 0): a 1×1 conv reads
    // the whole batch as one run of pixels, a tile inside one output row is evenly spaced, any
    // other tile takes one division, then counters.
    let pointwise = !padded && wts.kernel == [1, 1] && [sh, sw] == [1, 1];
    let offsets = |q0: usize, rows: usize, offs: &mut [usize]| -> usize {
        let r = offs.len();
        if pointwise && rows == r {
            offs.iter_mut().enumerate().for_each(|(i, o)| *o = (q0 + i) * c);
            return c;
        }
        let (mut img, rest) = (q0 / (oh * ow), q0 % (oh * ow));
        let (mut y, mut xo) = (rest / ow, rest % ow);
        if rows == r && xo + r <= ow && r > 1 {
            let first = ((img * frame.hp + y * sh) * frame.wp + xo * sw) * c;
            offs.iter_mut().enumerate().for_each(|(i, o)| *o = first + i * sw * c);
            return sw * c;
        }
        for o in offs[..rows].iter_mut() {
            *o = ((img * frame.hp + y * sh) * frame.wp + xo * sw) * c;
            xo += 1;
            if xo == ow {
                xo = 0;
                y += 1;
                if y == oh {
                    y = 0;
                    img += 1;
                }
            }
        }
        let last = offs[rows - 1];
        offs[rows..].fill(last);
        0
    };
    #[cfg(target_arch = "x86_64")]
    if c == 1 && !wts.depthwise && simd >= Simd::Avx2 {
        one_channel_rows(
            simd,
            &pad_input(x, xshape, &frame),
            n,
            &frame,
            conv,
            [oh, ow],
            wts,
            &lay,
            outp,
        );
        // SAFETY: every row of every image was computed.
        return Ok((unsafe { out.finish(pixels * m) }, [n, oh, ow, m]));
    }
    // the level's tile; a raster of pixels takes 8 instead of 10 where that computes fewer
    // (a 1×1 convolution keeps the level's: `pointwise_runs` takes whole tiles of 10)
    let level_r = tile_pixels(simd, wts, pixels);
    let r = match pointwise {
        true => level_r,
        false => least_waste(simd, pixels, level_r),
    };
    // (an empty image has no tap to read: the padded path writes its bias outputs)
    if padded
        && !wts.depthwise
        && n >= POSITION_MIN_N
        && h * w > 0
        && taps_inside(&geo, conv, [h, w]) <= POSITION_MAX_INSIDE
    {
        conv_by_position(
            simd,
            x,
            xshape,
            &geo,
            conv,
            wts,
            &lay,
            least_waste(simd, n, level_r),
            outp,
        );
        // SAFETY: every output position of every image was computed.
        return Ok((unsafe { out.finish(pixels * m) }, [n, oh, ow, m]));
    }
    // a 1×1 convolution: whole tiles in one call per 32-lane block (AVX2: per 16 lanes)
    #[cfg(target_arch = "x86_64")]
    let runs = pointwise
        && matches!(c, 16 | 32 | 64 | 128 | 256)
        && match simd {
            Simd::Avx512 => r == 10 && wts.blocks.iter().all(|b| b.1 == 32),
            Simd::Avx2 => r == 6,
            Simd::Scalar => false,
        };
    #[cfg(not(target_arch = "x86_64"))]
    let runs = false;
    // Tiles `t0..t1` of the pixels `q_lo..q_hi` (tile `t` from pixel `q_lo + t·r`), the input
    // `src` holding the padded images from `img0` on.
    let run = |src: &[f32], img0: usize, (q_lo, q_hi): (usize, usize), (t0, t1): (usize, usize), blocks: Range| {
        let mut offs = [0usize; MAX_R];
        // SAFETY: `out` holds `pixels × m` floats; tasks write disjoint tiles (`runs` only
        // when nothing is padded: one task list from pixel 0).
        #[cfg(target_arch = "x86_64")]
        let t0 = if runs {
            debug_assert!(q_lo == 0 && img0 == 0, "whole-batch tiles only");
            unsafe { pointwise_runs(simd, src, (t0, t1.min(q_hi / r)), wts, blocks.clone(), &lay, outp.get()) }
        } else {
            t0
        };
        // The full-size tiles in chunks: one call per chunk runs every tile's blocks with the
        // tile kernel inlined (a call per tile and block through `tile`, with its offsets, took
        // about 3 % of ResNet-18/16's time at AVX2 and 2 % at AVX-512 more, in `perf`).
        #[cfg(target_arch = "x86_64")]
        if !wts.depthwise && chunked(simd, r) {
            let mut chunk = [[0usize; MAX_R]; CHUNK];
            let (mut rows, mut uniform) = ([0usize; CHUNK], [0usize; CHUNK]);
            for c0 in (t0..t1).step_by(CHUNK) {
                let n = (t1 - c0).min(CHUNK);
                for k in 0..n {
                    let q0 = q_lo + (c0 + k) * r;
                    rows[k] = r.min(q_hi - q0);
                    uniform[k] = offsets(q0 - img0 * oh * ow, rows[k], &mut chunk[k][..r]);
                }
                let tiles = (&chunk[..n], &uniform[..n], &rows[..n]);
                // SAFETY: as for `tile` below, tile by tile: each writes its own pixels.
                unsafe {
                    run_chunk(
                        simd,
                        src,
                        tiles,
                        r,
                        wts,
                        blocks.clone(),
                        &lay,
                        outp.get().add((q_lo + c0 * r) * m),
                    )
                };
            }
            return;
        }
        for t in t0..t1 {
            // A partial last tile repeats its last pixel; only `rows` pixels are stored.
            let q0 = q_lo + t * r;
            let rows = r.min(q_hi - q0);
            offsets(q0 - img0 * oh * ow, rows, &mut offs[..r]);
            // SAFETY: each tile writes its own pixels `q0..q0 + rows` of `out`, which holds
            // `pixels × m` floats; the offsets are window corners inside the padded images
            // of `src`.
            unsafe {
                tile(
                    simd,
                    src,
                    &offs[..r],
                    rows,
                    wts,
                    blocks.clone(),
                    &lay,
                    outp.get().add(q0 * m),
                )
            };
        }
    };
    let threads = super::team::threads();
    let nb = wts.blocks.len();
    let work = pixels * m * lay.c * lay.kernel[0] * lay.kernel[1];
    let big = work >= TEAM_WORK;
    let image = frame.hp * frame.wp * c;
    if padded && (n >= 2 * threads || (n > 1 && !big)) {
        // Padded in groups of images, each by the task that convolves it, into its thread's
        // scratch: the copy and the tiles' reads stay in L2 (a whole padded batch would not).
        // A group ends in a partial tile unless its pixels are a multiple of the tile's: on
        // small maps the group is rounded down to such a multiple when it holds one.
        let step = r / gcd(r, oh * ow);
        let fit = (GROUP_BYTES / (image * 4)).clamp(1, n.div_ceil(threads));
        let group = if fit >= step { fit / step * step } else { fit };
        for_tasks(n.div_ceil(group), work, |k| {
            let imgs = k * group..((k + 1) * group).min(n);
            let len = imgs.len() * image;
            PAD_SCRATCH.with_borrow_mut(|scratch| {
                scratch.clear();
                scratch.reserve(len);
                let src = &x[imgs.start * h * w * c..imgs.end * h * w * c];
                frame.write(src, [h, w, c], &mut scratch.spare_capacity_mut()[..len]);
                // SAFETY: `Frame::write` wrote all `len` values (see `pad_input`).
                unsafe { scratch.set_len(len) };
                let q = (imgs.start * oh * ow, imgs.end * oh * ow);
                run(scratch, imgs.start, q, (0, (q.1 - q.0).div_ceil(r)), 0..nb);
            });
        });
        // SAFETY: every group's tiles (so every pixel) were computed above.
        return Ok((unsafe { out.finish(pixels * m) }, [n, oh, ow, m]));
    }
    let tiles = pixels.div_ceil(r);
    // Weights larger than the input (a deep layer at batch 1: 590 KB of 3×3×128×128 against
    // 18 KB of padded 4×4 map): each thread takes a share of the output channel blocks, so it
    // reads only those weights; split by tiles, every thread streams all of them through its
    // L2 (on a 512 KB L2 the layer ran slower on two threads than on one).
    let input_len = if padded { n * image } else { x.len() };
    let weighty = wts.data.len() > input_len && nb.is_multiple_of(threads);
    // The team's tasks. By tiles: one run of consecutive tiles per thread (on a Zen 1 at batch
    // 1, ResNet-18/16's layer1, 32×32 pixels, 16 channels, tasks of 8 tiles claimed in turn took
    // 0.077 ms on two threads and halves 0.062, 0.115 ms on one; each thread reads only its
    // part of the map). Fewer tiles than threads (a deep layer at batch 1), or weights larger
    // than the input: shares of the output channel blocks. Else one task of everything.
    let by_tiles = threads > 1 && big && tiles >= threads && !weighty;
    let per = tiles.div_ceil(threads);
    let parts = match by_tiles {
        true => tiles.div_ceil(per),
        false if threads > 1 && big && nb > 1 => threads.min(nb),
        false => 1,
    };
    let task = |k: usize| match by_tiles {
        true => ((k * per, ((k + 1) * per).min(tiles)), 0..nb),
        false => ((0, tiles), k * nb / parts..(k + 1) * nb / parts),
    };
    if padded && n == 1 && parts > 1 {
        // One image on the team: each task pads the rows its tiles read (all of them when it
        // takes a share of the channel blocks) into its thread's scratch, so there is no
        // padding before the loop (on one thread, or in a loop of its own) and each thread
        // reads its padded rows from its own cache.
        let extent = conv.window.extent(0);
        super::team::for_each(parts, |k| {
            let (t, blocks) = task(k);
            // the padded rows of output rows y0..=y1
            let (y0, y1) = (t.0 * r / ow, ((t.1 * r).min(pixels) - 1) / ow);
            let rows = y0 * sh..(y1 * sh + extent).min(frame.hp);
            PAD_SCRATCH.with_borrow_mut(|scratch| {
                // rows outside `rows` keep earlier values, which this task's tiles never read
                if scratch.len() < image {
                    scratch.resize(image, 0.0);
                }
                let dst = &mut scratch[rows.start * frame.wp * c..rows.end * frame.wp * c];
                // SAFETY: `MaybeUninit<f32>` has `f32`'s layout; only floats are written.
                let dst = unsafe { &mut *(dst as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
                frame.write_rows(x, [h, w, c], rows.start, dst);
                run(&scratch[..image], 0, (0, pixels), t, blocks);
            });
        });
    } else {
        let xdata = pad_input(x, xshape, &frame);
        super::team::for_each(parts, |k| {
            let (t, blocks) = task(k);
            run(&xdata, 0, (0, pixels), t, blocks)
        });
    }
    // SAFETY: every tile (so every pixel) was computed above.
    Ok((unsafe { out.finish(pixels * m) }, [n, oh, ow, m]))
}

/// The whole tiles `t0..t1` of a 1×1 convolution (10 pixels each at AVX-512, 6 at AVX2, `c`
/// floats apart) over its weight blocks `blocks`, one `x86::tile512_run` call per 32-lane block
/// or one `x86::tile256_run` per 16 lanes; returns the first tile left for the general path (a
/// partial last tile).
///
/// # Safety
/// `simd` detected and not scalar; `c` is 16, 32, 64, 128 or 256, at AVX-512 every block 32
/// lanes; `dst` holds the output's `pixels × m` floats and no other task writes tiles `t0..t1`.
#[cfg(target_arch = "x86_64")]
unsafe fn pointwise_runs(
    simd: Simd,
    x: &[f32],
    (t0, t1): (usize, usize),
    wts: &NhwcWeights,
    blocks: Range,
    lay: &Layout,
    dst: *mut f32,
) -> usize {
    let (c, m) = (lay.c, lay.m);
    if t1 <= t0 {
        return t0;
    }
    let (x, n) = (x.as_ptr(), t1 - t0);
    for &(oc0, lanes) in &wts.blocks[blocks] {
        let (w, b) = (wts.data.as_ptr().add(oc0 * c), wts.bias.as_ptr().add(oc0));
        if simd == Simd::Avx512 {
            const R: usize = 10;
            let (d, valid) = (dst.add(t0 * R * m + oc0), m.saturating_sub(oc0).min(32));
            let first = t0 * R * c;
            match c {
                16 => x86::tile512_run::<R, 16>(x, first, n, w, b, lay, d, valid),
                32 => x86::tile512_run::<R, 32>(x, first, n, w, b, lay, d, valid),
                64 => x86::tile512_run::<R, 64>(x, first, n, w, b, lay, d, valid),
                128 => x86::tile512_run::<R, 128>(x, first, n, w, b, lay, d, valid),
                _ => x86::tile512_run::<R, 256>(x, first, n, w, b, lay, d, valid),
            }
            continue;
        }
        const R: usize = 6;
        for (half, valid) in halves(oc0, lanes, m) {
            let (d, first) = (dst.add(t0 * R * m + oc0 + half), t0 * R * c);
            let (w, b) = ((w.add(half), lanes), b.add(half));
            match c {
                16 => x86::tile256_run::<R, 16>(x, first, n, w, b, lay, d, valid),
                32 => x86::tile256_run::<R, 32>(x, first, n, w, b, lay, d, valid),
                64 => x86::tile256_run::<R, 64>(x, first, n, w, b, lay, d, valid),
                128 => x86::tile256_run::<R, 128>(x, first, n, w, b, lay, d, valid),
                _ => x86::tile256_run::<R, 256>(x, first, n, w, b, lay, d, valid),
            }
        }
    }
    t1
}

const MAX_R: usize = 24;

/// Batches from which a padded convolution may run [`conv_by_position`] (at least a full
/// tile at every level, so every level takes the same path).
const POSITION_MIN_N: usize = 16;
/// ... when at most this share of its taps lies inside the image (small maps: a 3×3 layer
/// on 16×16 has 92 %, on 4×4 69 %, on 2×2 44 %).
const POSITION_MAX_INSIDE: f64 = 0.95;

/// Pixels per tile for `count` pixels (of a raster, or images at one position of
/// [`conv_by_position`]): at AVX-512 with 32-lane blocks 8 or 10, whichever computes fewer
/// pixels in all (a last, partial tile computes a whole one: a 4×4 map at batch 1 is two
/// tiles of 8, not 10 + 6 computing 20; 16 images two tiles of 8); else the level's tile `r`.
fn least_waste(simd: Simd, count: usize, r: usize) -> usize {
    match simd {
        Simd::Avx512 if r == 10 => {
            let waste = |t: usize| count.div_ceil(t) * t - count;
            if waste(8) < waste(10) {
                8
            } else {
                10
            }
        }
        _ => r,
    }
}

/// The taps `[first, count]` of kernel axis `i` inside an input of `size` for the output
/// coordinate `o`.
fn taps_at(conv: &Conv, geo: &Geometry, i: usize, o: usize, size: usize) -> [usize; 2] {
    let (s, d, k) = (conv.window.strides[i], conv.window.dilations[i], conv.window.kernel[i]);
    // input coordinate of tap t: o·s + t·d − pad
    let start = o * s;
    let pad = geo.pads[i];
    let first = pad.saturating_sub(start).div_ceil(d).min(k);
    let end = (size + pad).saturating_sub(start).div_ceil(d).min(k);
    [first, end.saturating_sub(first)]
}

/// The share of a convolution's taps (over all output pixels) inside the image.
fn taps_inside(geo: &Geometry, conv: &Conv, [h, w]: [usize; 2]) -> f64 {
    let [oh, ow] = geo.out;
    let along = |i: usize, o: usize, size: usize| (0..o).map(|p| taps_at(conv, geo, i, p, size)[1]).sum::<usize>();
    let inside = along(0, oh, h) * along(1, ow, w);
    inside as f64 / ((oh * ow * conv.window.kernel[0] * conv.window.kernel[1]).max(1)) as f64
}

/// A padded group-1 convolution of a batch, tiles of one output position across images: all
/// pixels of a tile share the taps inside the image, and the others are skipped instead of
/// multiplied by the padding's zeros (on the small maps of late layers they are a third of the
/// taps or more; ONNX Runtime's per-layer times on such layers were 12–17 % below ours before). The input is first copied
/// position-major (`[h, w, n, c]`, unpadded), so a tile's pixels are `c` floats apart, as in a
/// row of the raster-order tiles; the same sums, in the same order, as the padded path
/// without its zero terms.
#[allow(clippy::too_many_arguments)]
fn conv_by_position(
    simd: Simd,
    x: &[f32],
    [n, h, w, c]: [usize; 4],
    geo: &Geometry,
    conv: &Conv,
    wts: &NhwcWeights,
    lay: &Layout,
    r: usize,
    outp: SendPtr,
) {
    let [oh, ow] = geo.out;
    let m = lay.m;
    let [dh, dw] = conv.window.dilations;
    let groups = n.div_ceil(r);
    let work = n * oh * ow * m * lay.c * lay.kernel[0] * lay.kernel[1];
    // the chunk kernels below take every tile of at least 6 pixels; `tile` only scalar ones
    debug_assert!(
        simd == Simd::Scalar || matches!(r, 6 | 8 | 10 | 16),
        "tile of {r} at {simd:?}"
    );
    // `[h, w, n, c]`: each task copies the images' pixels of some input positions
    let len = n * h * w * c;
    let mut xt: Vec<f32> = Vec::with_capacity(len);
    let xtp = SendPtr(xt.spare_capacity_mut().as_mut_ptr().cast());
    for_tasks(h, n * h * w * c, |iy| {
        for ix in 0..w {
            for img in 0..n {
                let src = &x[((img * h + iy) * w + ix) * c..][..c];
                // SAFETY: position (iy, ix), image img: its own `c` values of the `len`
                let dst = unsafe { xtp.get().add(((iy * w + ix) * n + img) * c) };
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, c) };
            }
        }
    });
    // SAFETY: every (position, image) was copied above: all `len` values.
    unsafe { xt.set_len(len) };
    let x: &[f32] = &xt;
    // a task: one position's tiles, or part of them when there are fewer positions than
    // about two tasks per thread (a deep layer's 1×1 or 2×2 map)
    let positions = oh * ow;
    let parts = (2 * super::team::threads()).div_ceil(positions).min(groups).max(1);
    let per = groups.div_ceil(parts);
    for_tasks(positions * parts, work, |task| {
        let (pos, part) = (task / parts, task % parts);
        let own = part * per..((part + 1) * per).min(groups);
        let (oy, ox) = (pos / ow, pos % ow);
        let [ty, tx] = [taps_at(conv, geo, 0, oy, h), taps_at(conv, geo, 1, ox, w)];
        let lay = Layout {
            win: [ty, tx],
            tap: [dh * w * n * c, dw * n * c],
            out_px: oh * ow * m,
            ..lay.clone()
        };
        // the first tap inside the image (any offset when there is none: nothing is read)
        let first = if ty[1] > 0 && tx[1] > 0 {
            let iy = oy * conv.window.strides[0] + ty[0] * dh - geo.pads[0];
            let ix = ox * conv.window.strides[1] + tx[0] * dw - geo.pads[1];
            (iy * w + ix) * n * c
        } else {
            0
        };
        let dst = outp.get().wrapping_add(pos * m);
        let tile_offs = |g: usize| -> ([usize; MAX_R], usize) {
            let rows = r.min(n - g * r);
            let offs = std::array::from_fn(|k| (g * r + k.min(rows - 1)) * c + first);
            (offs, rows)
        };
        #[cfg(target_arch = "x86_64")]
        if chunked(simd, r) {
            // A last tile of at most 4 images runs as a small tile (`tile_blocks256`,
            // `tile_blocks`) instead of a full one repeating its last image: at AVX2, 16 images
            // are 6 + 6 + 4, and computing 6 for the 4 cost an eighth of the layer.
            let mut own = own;
            let last = own.clone().last().map(|g| (g, tile_offs(g)));
            if let Some((last, (offs, rows))) = last.filter(|(_, (_, rows))| *rows <= 4) {
                own.end = last;
                // SAFETY: as for the chunks below; a tile of `rows` ≤ 4 images.
                unsafe {
                    tile(
                        simd,
                        x,
                        &offs[..rows],
                        rows,
                        wts,
                        0..wts.blocks.len(),
                        &lay,
                        dst.add(last * r * lay.out_px),
                    )
                };
            }
            let mut chunk = [[0usize; MAX_R]; CHUNK];
            let (mut rows, mut uniform) = ([0usize; CHUNK], [0usize; CHUNK]);
            for g0 in own.clone().step_by(CHUNK) {
                let k = (own.end - g0).min(CHUNK);
                for j in 0..k {
                    (chunk[j], rows[j]) = tile_offs(g0 + j);
                    // a full tile's pixels are `c` apart (a last, partial one repeats its last)
                    uniform[j] = if rows[j] == r { c } else { 0 };
                }
                let tiles = (&chunk[..k], &uniform[..k], &rows[..k]);
                // SAFETY: the level was detected; each tile's offsets are first taps inside
                // its images, the window's taps stay inside them; each writes its own images'
                // pixel at `pos` (`out_px` apart), which the output holds.
                unsafe {
                    run_chunk(
                        simd,
                        x,
                        tiles,
                        r,
                        wts,
                        0..wts.blocks.len(),
                        &lay,
                        dst.add(g0 * r * lay.out_px),
                    )
                };
            }
            return;
        }
        for g in own {
            let (offs, rows) = tile_offs(g);
            // SAFETY: as above, one tile at a time.
            unsafe {
                tile(
                    simd,
                    x,
                    &offs[..r],
                    rows,
                    wts,
                    0..wts.blocks.len(),
                    &lay,
                    dst.add(g * r * lay.out_px),
                )
            };
        }
    });
}

/// Whether [`run_chunk`] takes full tiles of `r` pixels at `simd` (group-1 convolutions).
#[cfg(target_arch = "x86_64")]
fn chunked(simd: Simd, r: usize) -> bool {
    matches!((simd, r), (Simd::Avx2, 6) | (Simd::Avx512, 8 | 10 | 16))
}

/// A chunk of full tiles of `r` pixels ([`chunked`]) by [`x86::tiles256`] or [`x86::tiles512`].
///
/// # Safety
/// `simd` was detected; as [`tile`] for each tile (tile `k` writes from `dst + r·k·out_px`).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_chunk(
    simd: Simd,
    x: &[f32],
    tiles: x86::Tiles,
    r: usize,
    wts: &NhwcWeights,
    blocks: Range,
    lay: &Layout,
    dst: *mut f32,
) {
    match simd {
        Simd::Avx2 => x86::tiles256(x.as_ptr(), tiles, wts, blocks, lay, dst),
        _ => x86::tiles512(x.as_ptr(), tiles, r, wts, blocks, lay, dst),
    }
}

/// The 16-lane halves of the weight block at output channel `oc0` (`lanes` wide) that hold
/// output channels, each with how many: AVX2 runs a 32-lane block 16 lanes at a time.
#[cfg(target_arch = "x86_64")]
fn halves(oc0: usize, lanes: usize, m: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..lanes)
        .step_by(16)
        .map(move |h| (h, m.saturating_sub(oc0 + h).min(16)))
        .filter(|&(_, valid)| valid > 0)
}
/// Full tiles per [`x86::tiles512`] or [`x86::tiles256`] call, at most.
#[cfg(target_arch = "x86_64")]
const CHUNK: usize = 16;

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

type Range = std::ops::Range<usize>;

/// Run `f` on tasks `0..n` (of `work` multiply-adds in all): on the [`super::team`] when there
/// is enough work, else in order on this thread (no hand-off for work too small to split).
fn for_tasks(n: usize, work: usize, f: impl Fn(usize) + Sync + Send) {
    if work >= TEAM_WORK {
        super::team::for_each(n, f);
    } else {
        (0..n).for_each(f);
    }
}

/// The output buffer of [`conv_nhwc`].
struct Output {
    v: Vec<f32>,
    /// Not yet written (its capacity is the output), else it holds the residual.
    fresh: bool,
}

impl Output {
    fn ptr(&mut self) -> SendPtr {
        SendPtr(match self.fresh {
            true => self.v.spare_capacity_mut().as_mut_ptr().cast(),
            false => self.v.as_mut_ptr(),
        })
    }
    /// # Safety
    /// When fresh, all `len` values were written through [`Output::ptr`].
    unsafe fn finish(mut self, len: usize) -> Vec<f32> {
        if self.fresh {
            // SAFETY: the capacity is `len` and the caller wrote every value.
            unsafe { self.v.set_len(len) };
        }
        self.v
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tasks write disjoint pixels.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Pixels per tile at this level.
fn tile_pixels(simd: Simd, wts: &NhwcWeights, pixels: usize) -> usize {
    match simd {
        Simd::Avx512 if wts.depthwise => 8,
        // fewer pixels than a tile (a deep layer at batch 1): tiles of at most 4 over several
        // channel blocks (`tile512_blocks`) rather than a 10-pixel tile mostly repeating its last
        Simd::Avx512 if pixels < 10 => pixels.min(4),
        Simd::Avx512 if wts.blocks.iter().any(|b| b.1 == 32) => 10,
        Simd::Avx512 => 16,
        Simd::Avx2 if wts.depthwise => 4,
        // likewise (`tile_blocks256`)
        Simd::Avx2 if pixels < 6 => pixels.min(4),
        Simd::Avx2 => 6,
        Simd::Scalar => 4,
    }
}

/// One tile: pixels at input offsets `offs` (as many as the level's tile), every output
/// channel block; the first `rows` pixels are stored. At AVX-512 and AVX2 only depthwise tiles
/// and small ones (at most 4 pixels) come here: full tiles run in chunks ([`x86::tiles512`],
/// [`x86::tiles256`]).
///
/// # Safety
/// `offs` are window corners inside `x`; `dst` is valid for `rows × m` floats.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    simd: Simd,
    x: &[f32],
    offs: &[usize],
    rows: usize,
    wts: &NhwcWeights,
    blocks: Range,
    lay: &Layout,
    dst: *mut f32,
) {
    let xp = x.as_ptr();
    #[cfg(target_arch = "x86_64")]
    if !wts.depthwise && simd != Simd::Scalar {
        // a full tile here would leave pixels of a fresh output unwritten (see `tile_pixels`)
        assert!(offs.len() <= 4, "full tiles run in chunks");
        return match simd {
            Simd::Avx512 => tile_blocks(xp, offs, rows, wts, blocks, lay, dst),
            _ => tile_blocks256(xp, offs, rows, wts, blocks, lay, dst),
        };
    }
    for &(oc0, lanes) in &wts.blocks[blocks] {
        // every block before this one has `oc0` lanes in all
        let w = wts.data.as_ptr().add(oc0 * lay.c * lay.kernel[0] * lay.kernel[1]);
        let b = wts.bias.as_ptr().add(oc0);
        let d = dst.add(oc0);
        let valid = lay.m.saturating_sub(oc0).min(lanes);
        match simd {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => x86::depthwise512::<8>(xp, offs, rows, w, lanes, b, lay, d, valid),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => x86::depthwise256::<4>(xp, offs, rows, w, lanes, b, lay, d, valid),
            _ if wts.depthwise => depthwise_scalar(xp, offs, rows, w, lanes, b, lay, d, valid),
            _ => tile_scalar(xp, offs, rows, w, lanes, b, lay, d, valid),
        }
    }
}

/// Where a small tile's step over the weight blocks starts ([`each_block`]).
#[derive(Clone, Copy)]
struct BlockAt {
    /// The block's packed weights; the next block is `blk` floats after.
    w: *const f32,
    blk: usize,
    bias: *const f32,
    /// The block's first output channel of the tile's first pixel.
    dst: *mut f32,
    /// Output channels from the block's first on that exist.
    valid: usize,
    lanes: usize,
    /// 32-lane blocks from this one on (within the range): how many a step may take at once.
    whole: usize,
}

/// The blocks `blocks` of `wts` in steps: `step` starts at a block and returns how many it did.
///
/// # Safety
/// `dst` is valid for the tile's rows of `lay.m` floats.
#[cfg(target_arch = "x86_64")]
unsafe fn each_block(
    wts: &NhwcWeights,
    blocks: Range,
    lay: &Layout,
    dst: *mut f32,
    mut step: impl FnMut(BlockAt) -> usize,
) {
    let blk = 32 * lay.c * lay.kernel[0] * lay.kernel[1];
    let full = wts.blocks.iter().take_while(|b| b.1 == 32).count().min(blocks.end);
    let mut b = blocks.start;
    while b < blocks.end {
        let (oc0, lanes) = wts.blocks[b];
        b += step(BlockAt {
            w: wts.data.as_ptr().add(b * blk),
            blk,
            bias: wts.bias.as_ptr().add(oc0),
            dst: dst.add(oc0),
            valid: lay.m.saturating_sub(oc0),
            lanes,
            whole: full.saturating_sub(b),
        });
    }
}

/// A tile of at most 4 pixels, every output channel block: 32-lane blocks taken several at a
/// time by [`x86::tile512_blocks`] (about 8 independent sums, so the multiply-add latency is
/// hidden even for one pixel), a last 16-lane block by [`x86::tile512`].
///
/// # Safety
/// AVX-512F; as [`tile`].
#[cfg(target_arch = "x86_64")]
unsafe fn tile_blocks(
    x: *const f32,
    offs: &[usize],
    rows: usize,
    wts: &NhwcWeights,
    blocks: Range,
    lay: &Layout,
    dst: *mut f32,
) {
    each_block(wts, blocks, lay, dst, |b| {
        let a = (x, offs, rows, (b.w, 32, b.blk), b.bias, lay, b.dst, b.valid);
        match (offs.len(), b.whole) {
            (1, 4..) => x86::tile512_blocks::<1, 8>(a),
            (1, 2..) => x86::tile512_blocks::<1, 4>(a),
            (1, 1) => x86::tile512_blocks::<1, 2>(a),
            (2, 4..) => x86::tile512_blocks::<2, 8>(a),
            (2, 2..) => x86::tile512_blocks::<2, 4>(a),
            (2, 1) => x86::tile512_blocks::<2, 2>(a),
            (3, 2..) => x86::tile512_blocks::<3, 4>(a),
            (3, 1) => x86::tile512_blocks::<3, 2>(a),
            (_, 2..) => x86::tile512_blocks::<4, 4>(a),
            (_, 1) => x86::tile512_blocks::<4, 2>(a),
            (r, _) => {
                // the last block, of 16 lanes
                debug_assert_eq!(b.lanes, 16);
                let a = (x, offs, rows, (b.w, b.lanes, 0), b.bias, lay, b.dst, b.valid.min(16));
                match r {
                    1 => x86::tile512::<1, 1, 0>(a),
                    2 => x86::tile512::<2, 1, 0>(a),
                    3 => x86::tile512::<3, 1, 0>(a),
                    _ => x86::tile512::<4, 1, 0>(a),
                }
                1
            }
        }
    })
}

/// [`tile_blocks`] at AVX2: a tile of at most 4 pixels, 8 to 12 independent sums of 8 lanes
/// (of the 16 registers): two 32-lane blocks at a time for one pixel, one block for 2 or 3
/// pixels, two tiles of 2 pixels for 4, half a block at a time for a last 16-lane block.
///
/// # Safety
/// AVX2 and FMA; as [`tile`].
#[cfg(target_arch = "x86_64")]
unsafe fn tile_blocks256(
    x: *const f32,
    offs: &[usize],
    rows: usize,
    wts: &NhwcWeights,
    blocks: Range,
    lay: &Layout,
    dst: *mut f32,
) {
    each_block(wts, blocks, lay, dst, |b| {
        let (r, wb) = (offs.len(), (b.w, 32, b.blk));
        match b.whole {
            2.. if r == 1 => {
                x86::tile256::<1, 8, 0>((x, offs, rows, wb, b.bias, lay, b.dst, b.valid));
                return 2;
            }
            1.. => {
                let v = b.valid.min(32);
                match r {
                    1 => x86::tile256::<1, 4, 0>((x, offs, rows, wb, b.bias, lay, b.dst, v)),
                    2 => x86::tile256::<2, 4, 0>((x, offs, rows, wb, b.bias, lay, b.dst, v)),
                    3 => x86::tile256::<3, 4, 0>((x, offs, rows, wb, b.bias, lay, b.dst, v)),
                    _ => {
                        x86::tile256::<2, 4, 0>((x, &offs[..2], rows.min(2), wb, b.bias, lay, b.dst, v));
                        if rows > 2 {
                            let d = b.dst.add(2 * lay.out_px);
                            x86::tile256::<2, 4, 0>((x, &offs[2..], rows - 2, wb, b.bias, lay, d, v));
                        }
                    }
                }
            }
            // the last block, of 16 lanes
            0 => {
                let (wb, v) = ((b.w, b.lanes, 0), b.valid.min(16));
                match r {
                    1 => x86::tile256::<1, 2, 0>((x, offs, rows, wb, b.bias, lay, b.dst, v)),
                    2 => x86::tile256::<2, 2, 0>((x, offs, rows, wb, b.bias, lay, b.dst, v)),
                    3 => x86::tile256::<3, 2, 0>((x, offs, rows, wb, b.bias, lay, b.dst, v)),
                    _ => x86::tile256::<4, 2, 0>((x, offs, rows, wb, b.bias, lay, b.dst, v)),
                }
            }
        }
        1
    })
}

/// Scalar reference: the same sums in the same order as the SIMD tiles.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_scalar(
    x: *const f32,
    offs: &[usize],
    rows: usize,
    w: *const f32,
    nb: usize,
    bias: *const f32,
    lay: &Layout,
    dst: *mut f32,
    valid: usize,
) {
    let kw = lay.kernel[1];
    let [[y0, ny], [x0, nx]] = lay.win;
    for (r, &o) in offs[..rows].iter().enumerate() {
        for l in 0..valid {
            let mut acc = *bias.add(l);
            for i in 0..ny {
                for j in 0..nx {
                    let xr = x.add(o + i * lay.tap[0] + j * lay.tap[1]);
                    let wr = w.add(((y0 + i) * kw + x0 + j) * lay.c * nb + l);
                    for ci in 0..lay.c {
                        acc = (*xr.add(ci)).mul_add(*wr.add(ci * nb), acc);
                    }
                }
            }
            let p = dst.add(r * lay.out_px + l);
            if lay.accumulate {
                acc += *p;
            }
            *p = lay.act(acc);
        }
    }
}

/// Scalar depthwise: channel `l` reads input channel `l`.
#[allow(clippy::too_many_arguments)]
unsafe fn depthwise_scalar(
    x: *const f32,
    offs: &[usize],
    rows: usize,
    w: *const f32,
    nb: usize,
    bias: *const f32,
    lay: &Layout,
    dst: *mut f32,
    valid: usize,
) {
    let [kh, kw] = lay.kernel;
    for (r, &o) in offs[..rows].iter().enumerate() {
        for l in 0..valid {
            let mut acc = *bias.add(l);
            for i in 0..kh {
                for j in 0..kw {
                    let xv = *x.add(o + i * lay.tap[0] + j * lay.tap[1] + l);
                    acc = xv.mul_add(*w.add((i * kw + j) * nb + l), acc);
                }
            }
            let p = dst.add(r * lay.m + l);
            if lay.accumulate {
                acc += *p;
            }
            *p = lay.act(acc);
        }
    }
}

/// 3×3 depthwise convolution a whole output row per call, straight from the unpadded input:
/// tap rows in the padding read a shared row of zeros, border pixels' taps outside the row
/// read as zeros (the same sums as on the padded input). No padded copy of the activation.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn depthwise3_rows(
    simd: Simd,
    x: &[f32],
    [n, h, w, c]: [usize; 4],
    geo: &Geometry,
    conv: &Conv,
    wts: &NhwcWeights,
    lay: &Layout,
    outp: SendPtr,
) {
    let [oh, ow] = geo.out;
    let win = &conv.window;
    let (top, left) = (geo.pads[0], geo.pads[1]);
    let zeros = vec![0f32; w * c];
    let m = lay.m;
    let rows_out = n * oh;
    let per = (1usize << 14).div_ceil(ow * m * 9).max(1);
    let work = rows_out * ow * m * 9;
    let (sw, dw) = (win.strides[1], win.dilations[1]);
    // output pixels xa..xb read only columns inside the row
    let xb = (w + left).checked_sub(2 * dw + 1).map_or(0, |l| (l / sw + 1).min(ow));
    let xa = left.div_ceil(sw).min(xb);
    for_tasks(rows_out.div_ceil(per), work, |t| {
        for row in t * per..((t + 1) * per).min(rows_out) {
            let (img, y) = (row / oh, row % oh);
            let tap_row = |i: usize| {
                (y * win.strides[0] + i * win.dilations[0])
                    .checked_sub(top)
                    .filter(|&r| r < h)
            };
            let g = x86::DwRow {
                rows: std::array::from_fn(|i| match tap_row(i) {
                    Some(r) => x[(img * h + r) * w * c..].as_ptr(),
                    None => zeros.as_ptr(),
                }),
                left,
                w,
                sw,
                dw,
                c,
                interior: (xa, xb),
            };
            // SAFETY: the level was detected (AVX-512F, or AVX2 and FMA); each row pointer has
            // `w × c` floats (an input row or the zero row), the kernels read only columns
            // inside it, and `out` holds `ow × m` floats at the row's offset (rows are disjoint).
            unsafe {
                let dst = outp.get().add(row * ow * m);
                match simd {
                    Simd::Avx512 => x86::dw3_row_avx512(&g, ow, wts, lay, dst),
                    _ => x86::dw3_row_avx2(&g, ow, wts, lay, dst),
                }
            }
        }
    });
}

/// A convolution of one input channel (a network's first layer) over `n` images padded into
/// `frame` (`xdata`), a whole output row per call: with at most 8 outputs at stride 1,
/// vectorized over output pixels; otherwise over output channels with each input value
/// broadcast (no offset table, no transposition). Writes every output row through `outp`
/// (`n · oh · ow · m` floats); `simd` must be a level this CPU has (AVX2 and FMA at least).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn one_channel_rows(
    simd: Simd,
    xdata: &[f32],
    n: usize,
    frame: &Frame,
    conv: &Conv,
    [oh, ow]: [usize; 2],
    wts: &NhwcWeights,
    lay: &Layout,
    outp: SendPtr,
) {
    let ([sh, sw], [dh, dw]) = (conv.window.strides, conv.window.dilations);
    let m = lay.m;
    let narrow = m <= 8 && sw == 1 && dw == 1;
    let rows_out = n * oh;
    let row_work = ow * m * wts.kernel[0] * wts.kernel[1];
    let per = (1usize << 14).div_ceil(row_work).max(1);
    for_tasks(rows_out.div_ceil(per), rows_out * row_work, |t| {
        for row in t * per..((t + 1) * per).min(rows_out) {
            let (img, y) = (row / oh, row % oh);
            let src = (img * frame.hp + y * sh) * frame.wp;
            // SAFETY: the caller detected the level (AVX-512F, or AVX2 and FMA); the row's
            // windows lie in the padded image and `outp` holds `ow × m` floats at the row's
            // offset (rows are disjoint).
            unsafe {
                let dst = outp.get().add(row * ow * m);
                match (simd, narrow) {
                    (Simd::Avx512, true) => x86::row_c1_avx512(xdata, src, frame.wp, dh, ow, wts, lay, dst),
                    (_, true) => x86::row_c1_avx2(xdata, src, frame.wp, dh, ow, wts, lay, dst),
                    (_, false) => row_c1_channels(simd, xdata, src, sw, ow, wts, lay, dst),
                }
            };
        }
    });
}

/// One output row of a single-input-channel conv, vectorized over output channels: per block
/// of the packed weights, `R` pixels at a time (then fewer), each input value broadcast against
/// the tap's weight vectors. Same sums in the same order as [`tile_scalar`].
///
/// # Safety
/// `simd` detected (AVX-512F, or AVX2 and FMA); `x[src..]` is the row's first window corner,
/// pixels `sw` floats apart, every window inside `x`; `dst` valid for `ow × m` floats.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn row_c1_channels(
    simd: Simd,
    x: &[f32],
    src: usize,
    sw: usize,
    ow: usize,
    wts: &NhwcWeights,
    lay: &Layout,
    dst: *mut f32,
) {
    let xp = x.as_ptr().add(src);
    let mut wofs = 0;
    for &(oc0, lanes) in &wts.blocks {
        let w = wts.data.as_ptr().add(wofs);
        wofs += lanes * lay.kernel[0] * lay.kernel[1];
        let a = x86::Px {
            x: xp,
            sw,
            w,
            lanes,
            bias: wts.bias.as_ptr().add(oc0),
            dst: dst.add(oc0),
            valid: lay.m.saturating_sub(oc0).min(lanes),
        };
        match (simd, lanes) {
            (Simd::Avx512, 32) => {
                // equal tiles of at most 12 pixels where the width allows (14 = 7 + 7, not
                // 12 + 1 + 1: single pixels wait on their chains of dependent multiply-adds)
                let x0 = match ow / ow.div_ceil(12) {
                    10 => x86::px512::<10, 2>(&a, lay, 0, ow),
                    7 => x86::px512::<7, 2>(&a, lay, 0, ow),
                    6 => x86::px512::<6, 2>(&a, lay, 0, ow),
                    _ => x86::px512::<12, 2>(&a, lay, 0, ow),
                };
                let x0 = x86::px512::<4, 2>(&a, lay, x0, ow);
                x86::px512::<1, 2>(&a, lay, x0, ow);
            }
            (Simd::Avx512, _) => {
                // equal tiles of at most 16 pixels where the width allows (28 = 14 + 14, not
                // 16 + 4 + 4 + 4: a 4-pixel tile waits on its chains of dependent multiply-adds)
                let x0 = match ow / ow.div_ceil(16) {
                    14 => x86::px512::<14, 1>(&a, lay, 0, ow),
                    12 => x86::px512::<12, 1>(&a, lay, 0, ow),
                    10 => x86::px512::<10, 1>(&a, lay, 0, ow),
                    7 => x86::px512::<7, 1>(&a, lay, 0, ow),
                    _ => x86::px512::<16, 1>(&a, lay, 0, ow),
                };
                let x0 = x86::px512::<4, 1>(&a, lay, x0, ow);
                x86::px512::<1, 1>(&a, lay, x0, ow);
            }
            _ => {
                for half in (0..lanes).step_by(16) {
                    let h = x86::Px {
                        w: a.w.add(half),
                        bias: a.bias.add(half),
                        dst: a.dst.add(half),
                        valid: a.valid.saturating_sub(half).min(16),
                        ..a
                    };
                    if h.valid > 0 {
                        // the pixels left after the 6-pixel tiles in tiles of 4 and 2: a single
                        // pixel's two chains of dependent multiply-adds wait on their latency
                        let x0 = x86::px256::<6>(&h, lay, 0, ow);
                        let x0 = x86::px256::<4>(&h, lay, x0, ow);
                        let x0 = x86::px256::<2>(&h, lay, x0, ow);
                        x86::px256::<1>(&h, lay, x0, ow);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Layout;
    use crate::interp::kernels::lane_mask256;
    use std::arch::x86_64::*;

    /// The activation of a whole-vector store ([`whole512`], [`whole256`]): none, ReLU, or
    /// ReLU capped (a fused `Clip`).
    const NO_ACT: u8 = 0;
    const RELU: u8 = 1;
    const RELU_CAPPED: u8 = 2;

    /// `$f::<R, V, ACC, ACT>(args…)` with `lay`'s residual and activation as the constants
    /// `ACC` and `ACT`, chosen once per tile (see [`store512`]).
    macro_rules! whole_store {
        ($lay:expr, $f:ident::<$r:ident, $v:ident>($($arg:expr),*)) => {
            match ($lay.accumulate, $lay.relu_cap) {
                (false, None) => $f::<$r, $v, false, NO_ACT>($($arg),*),
                (false, Some(c)) if c.is_finite() => $f::<$r, $v, false, RELU_CAPPED>($($arg),*),
                (false, Some(_)) => $f::<$r, $v, false, RELU>($($arg),*),
                (true, None) => $f::<$r, $v, true, NO_ACT>($($arg),*),
                (true, Some(c)) if c.is_finite() => $f::<$r, $v, true, RELU_CAPPED>($($arg),*),
                (true, Some(_)) => $f::<$r, $v, true, RELU>($($arg),*),
            }
        };
    }

    /// `R` pixels × `V` vectors of 16 output channels.
    #[target_feature(enable = "avx512f,avx2,fma")]
    /// `S > 0`: the pixels are `S` floats apart (`offs[0] + r·S`, one row of the image), so
    /// every input load is one base pointer plus a constant: no per-pixel pointers to spill.
    pub unsafe fn tile512<const R: usize, const V: usize, const S: usize>(a: Args) {
        tile512_inline::<R, V, S>(a)
    }

    /// A tile kernel's arguments ([`tile512`], [`tile256`]): the input, the window corners of
    /// the tile's pixels, how many pixels to store, the weights `(w, nb, blk)` (a block's
    /// packed weights, its lanes, the floats to the next block), the bias, the layout, the
    /// output of the first pixel's first channel, and the output channels that exist.
    pub type Args<'a> = (
        *const f32,
        &'a [usize],
        usize,
        (*const f32, usize, usize),
        *const f32,
        &'a Layout,
        *mut f32,
        usize,
    );

    /// [`tile512`]'s body, inlined where it is called (in a function with AVX-512F).
    #[inline(always)]
    unsafe fn tile512_inline<const R: usize, const V: usize, const S: usize>(
        (x, offs, rows, (w, nb, blk), bias, lay, dst, valid): Args,
    ) {
        debug_assert_eq!(offs.len(), R);
        let kw = lay.kernel[1];
        let [[y0, ny], [x0, nx]] = lay.win;
        let c = lay.c;
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for v in 0..V {
            let b = _mm512_loadu_ps(bias.add(16 * v));
            for a in acc.iter_mut() {
                a[v] = b;
            }
        }
        let mut px = [x; R];
        for (p, &o) in px.iter_mut().zip(offs) {
            *p = x.add(o);
        }
        let base = x.add(offs[0]);
        // Taps along x are contiguous with the channels when not dilated: one run of nx·c.
        let (runs, run) = if lay.tap[1] == c { (1, nx * c) } else { (nx, c) };
        for i in 0..ny {
            for j in 0..runs {
                let t = i * lay.tap[0] + j * lay.tap[1];
                let wk = w.add(((y0 + i) * kw + x0 + j) * c * nb);
                for ci in 0..run {
                    // vector `v`: lanes `16·(v % 2)..` of block `v / 2` (blocks `blk` apart)
                    let wv: [__m512; V] =
                        std::array::from_fn(|v| _mm512_loadu_ps(wk.add((v / 2) * blk + ci * nb + 16 * (v % 2))));
                    for r in 0..R {
                        let p = if S > 0 { base.add(r * S) } else { px[r] };
                        let b = _mm512_set1_ps(*p.add(t + ci));
                        for v in 0..V {
                            acc[r][v] = _mm512_fmadd_ps(b, wv[v], acc[r][v]);
                        }
                    }
                }
            }
        }
        store512(acc, rows, lay, dst, valid);
    }

    /// `tiles` whole tiles of `R` pixels `S` floats apart (a 1×1 convolution's pixels, one
    /// after the other from input offset `first`), one 32-lane weight block: [`tile512`] in a
    /// loop, without a call and an offset table per tile.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile512_run<const R: usize, const S: usize>(
        x: *const f32,
        first: usize,
        tiles: usize,
        w: *const f32,
        bias: *const f32,
        lay: &Layout,
        dst: *mut f32,
        valid: usize,
    ) {
        for t in 0..tiles {
            let offs: [usize; R] = std::array::from_fn(|i| first + (t * R + i) * S);
            tile512::<R, 2, S>((x, &offs, R, (w, 32, 0), bias, lay, dst.add(t * R * lay.m), valid));
        }
    }

    /// Tiles of a chunk: each one's pixel offsets (the first `R` used), the offsets' spacing
    /// when uniform (else 0; [`tiles256`] does not use it), and its pixels to store.
    pub type Tiles<'a> = (&'a [[usize; super::MAX_R]], &'a [usize], &'a [usize]);

    /// 6-pixel tiles (tile `k` stores from pixel `6·k` of `dst`) over the weight blocks
    /// `blocks`, 16 lanes at a time: [`tile256`] inlined in one loop instead of a call per tile
    /// and 16 lanes.
    ///
    /// # Safety
    /// AVX2 and FMA; as [`super::tile`] for each tile.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tiles256(
        x: *const f32,
        (offs, _, rows): Tiles,
        wts: &super::NhwcWeights,
        blocks: super::Range,
        lay: &Layout,
        dst: *mut f32,
    ) {
        let taps = lay.c * lay.kernel[0] * lay.kernel[1];
        for (k, (offs, &rows)) in offs.iter().zip(rows).enumerate() {
            let (offs, d) = (&offs[..6], dst.add(6 * k * lay.out_px));
            for &(oc0, lanes) in &wts.blocks[blocks.clone()] {
                let w = wts.data.as_ptr().add(oc0 * taps);
                for (half, valid) in super::halves(oc0, lanes, lay.m) {
                    let (w, b) = ((w.add(half), lanes, 0), wts.bias.as_ptr().add(oc0 + half));
                    tile256_inline::<6, 2, 0>((x, offs, rows, w, b, lay, d.add(oc0 + half), valid));
                }
            }
        }
    }

    /// [`tiles256`] at AVX-512: tiles of `r` pixels, [`tile512`] inlined with the offsets'
    /// spacing as a constant where uniform (for the spacings of 3×3 and 1×1 layers of 16-256
    /// channels that each shape meets). One vector of 16 channels per pixel: 32-lane blocks
    /// take 8 or 10 pixels × 2 vectors (`least_waste`), 16-lane blocks 16 pixels (`r` = 16, every block 16 lanes)
    /// or the layer's 10 × 1 vector; two vectors per pixel at 16 pixels would spill registers,
    /// and more pixels spill their input pointers.
    ///
    /// # Safety
    /// AVX-512F; as [`super::tile`] for each tile.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn tiles512(
        x: *const f32,
        (offs, uniform, rows): Tiles,
        r: usize,
        wts: &super::NhwcWeights,
        blocks: super::Range,
        lay: &Layout,
        dst: *mut f32,
    ) {
        let taps = lay.c * lay.kernel[0] * lay.kernel[1];
        for (k, offs) in offs.iter().enumerate() {
            let d = dst.add(r * k * lay.out_px);
            for &(oc0, lanes) in &wts.blocks[blocks.clone()] {
                let w = (wts.data.as_ptr().add(oc0 * taps), lanes, 0);
                let (b, d, valid) = (
                    wts.bias.as_ptr().add(oc0),
                    d.add(oc0),
                    lay.m.saturating_sub(oc0).min(lanes),
                );
                // (r, v, spacing): the spacings each shape meets (r = 16 only up to 64
                // channels, a 16-lane block in an r = 10 layer from 64 channels on)
                let a = (x, &offs[..r], rows[k], w, b, lay, d, valid);
                match (r, lanes, uniform[k]) {
                    // 8 pixels ([`super::least_waste`]): raster tiles, or one position across images
                    (8, 32, 16) => tile512_inline::<8, 2, 16>(a),
                    (8, 32, 32) => tile512_inline::<8, 2, 32>(a),
                    (8, 32, 64) => tile512_inline::<8, 2, 64>(a),
                    (8, 32, 128) => tile512_inline::<8, 2, 128>(a),
                    (8, 32, 256) => tile512_inline::<8, 2, 256>(a),
                    (8, 32, _) => tile512_inline::<8, 2, 0>(a),
                    (8, _, _) => tile512_inline::<8, 1, 0>(a),
                    (16, _, 16) => tile512_inline::<16, 1, 16>(a),
                    (16, _, 32) => tile512_inline::<16, 1, 32>(a),
                    (16, _, 64) => tile512_inline::<16, 1, 64>(a),
                    (16, _, _) => tile512_inline::<16, 1, 0>(a),
                    (_, 32, 16) => tile512_inline::<10, 2, 16>(a),
                    (_, 32, 32) => tile512_inline::<10, 2, 32>(a),
                    (_, 32, 64) => tile512_inline::<10, 2, 64>(a),
                    (_, 32, 128) => tile512_inline::<10, 2, 128>(a),
                    (_, 32, 256) => tile512_inline::<10, 2, 256>(a),
                    (_, 32, _) => tile512_inline::<10, 2, 0>(a),
                    (_, _, 64) => tile512_inline::<10, 1, 64>(a),
                    (_, _, 128) => tile512_inline::<10, 1, 128>(a),
                    (_, _, 256) => tile512_inline::<10, 1, 256>(a),
                    _ => tile512_inline::<10, 1, 0>(a),
                }
            }
        }
    }

    /// [`tile512_run`] at AVX2: whole tiles of `R` pixels × 16 lanes of one weight block (`nb`
    /// lanes wide).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile256_run<const R: usize, const S: usize>(
        x: *const f32,
        first: usize,
        tiles: usize,
        (w, nb): (*const f32, usize),
        bias: *const f32,
        lay: &Layout,
        dst: *mut f32,
        valid: usize,
    ) {
        for t in 0..tiles {
            let offs: [usize; R] = std::array::from_fn(|i| first + (t * R + i) * S);
            tile256::<R, 2, S>((x, &offs, R, (w, nb, 0), bias, lay, dst.add(t * R * lay.m), valid));
        }
    }

    /// [`tile512`] over `V / 2` consecutive 32-lane weight blocks at once (each `blk` floats
    /// after the previous), for tiles of at most 4 pixels: `R × V` independent sums, the same
    /// sums in the same order; returns the blocks done.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn tile512_blocks<const R: usize, const V: usize>(a: Args) -> usize {
        tile512::<R, V, 0>(a);
        V / 2
    }

    /// The stores' activation ([`Layout::act`] on 16 lanes): `max(s, 0)`, then `min(·, cap)` when
    /// the cap is finite (a fused `Clip`).
    #[inline(always)]
    unsafe fn act512(s: __m512, relu_cap: Option<f32>) -> __m512 {
        match relu_cap {
            None => s,
            Some(cap) => {
                let s = _mm512_max_ps(s, _mm512_setzero_ps());
                if cap.is_finite() {
                    _mm512_min_ps(s, _mm512_set1_ps(cap))
                } else {
                    s
                }
            }
        }
    }

    /// [`act512`] on 8 lanes.
    #[inline(always)]
    unsafe fn act256(s: __m256, relu_cap: Option<f32>) -> __m256 {
        match relu_cap {
            None => s,
            Some(cap) => {
                let s = _mm256_max_ps(s, _mm256_setzero_ps());
                if cap.is_finite() {
                    _mm256_min_ps(s, _mm256_set1_ps(cap))
                } else {
                    s
                }
            }
        }
    }

    /// The epilogue of `rows` pixels × `V` vectors of 16 channels: residual, ReLU, the `valid`
    /// channels stored (a masked store only for a partial vector).
    #[inline(always)]
    unsafe fn store512<const R: usize, const V: usize>(
        acc: [[__m512; V]; R],
        rows: usize,
        lay: &Layout,
        dst: *mut f32,
        valid: usize,
    ) {
        debug_assert!(rows <= R);
        if valid >= 16 * V {
            // whole vectors: the epilogue's choices made once per tile (tested per vector,
            // they kept the sums in a stack array; fastest of 4 processes each, 1×1 convs of
            // 16 and 32 channels: 15 and 28 % of the time at AVX2, 6 % at AVX-512)
            let cap = lay.relu_cap.unwrap_or(0.0);
            return whole_store!(lay, whole512::<R, V>(acc, rows, lay.out_px, dst, cap));
        }
        // the array taken whole, `rows` counted by the iterator (a runtime slice `acc[..rows]`
        // makes LLVM keep the sums in a stack array, stored to after every multiply-add)
        for (r, a) in acc.iter().take(rows).enumerate() {
            for (v, &s) in a.iter().enumerate() {
                let n = valid.saturating_sub(16 * v).min(16);
                let p = dst.add(r * lay.out_px + 16 * v);
                let mask = ((1u32 << n) - 1) as u16;
                let s = if lay.accumulate {
                    _mm512_add_ps(s, _mm512_maskz_loadu_ps(mask, p))
                } else {
                    s
                };
                let s = act512(s, lay.relu_cap);
                if n == 16 {
                    _mm512_storeu_ps(p, s);
                } else if n > 0 {
                    _mm512_mask_storeu_ps(p, mask, s);
                }
            }
        }
    }

    /// [`store512`] of whole vectors: `ACC` adds the residual, `ACT` is [`RELU`] or
    /// [`RELU_CAPPED`] at `cap` (the same operations in the same order as the general path).
    #[inline(always)]
    unsafe fn whole512<const R: usize, const V: usize, const ACC: bool, const ACT: u8>(
        acc: [[__m512; V]; R],
        rows: usize,
        out_px: usize,
        dst: *mut f32,
        cap: f32,
    ) {
        let (zero, capv) = (_mm512_setzero_ps(), _mm512_set1_ps(cap));
        for (r, a) in acc.iter().enumerate() {
            if r >= rows {
                break;
            }
            for (v, &s) in a.iter().enumerate() {
                let p = dst.add(r * out_px + 16 * v);
                let s = if ACC { _mm512_add_ps(s, _mm512_loadu_ps(p)) } else { s };
                let s = if ACT != NO_ACT { _mm512_max_ps(s, zero) } else { s };
                let s = if ACT == RELU_CAPPED { _mm512_min_ps(s, capv) } else { s };
                _mm512_storeu_ps(p, s);
            }
        }
    }

    /// One block of [`super::row_c1_channels`]: input row, weights, bias and output of the block.
    #[derive(Clone, Copy)]
    pub struct Px {
        pub x: *const f32,
        /// Floats between consecutive output pixels' windows.
        pub sw: usize,
        pub w: *const f32,
        /// The block's lanes (the weights' tap stride).
        pub lanes: usize,
        pub bias: *const f32,
        pub dst: *mut f32,
        /// Output channels of the block that exist.
        pub valid: usize,
    }

    /// Pixels `x0..` of the row, `R` at a time while `R` remain, `V` vectors of 16 channels;
    /// returns the first pixel not done.
    ///
    /// # Safety
    /// AVX-512F; as [`super::row_c1_channels`].
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn px512<const R: usize, const V: usize>(a: &Px, lay: &Layout, mut x0: usize, ow: usize) -> usize {
        let [kh, kw] = lay.kernel;
        while x0 + R <= ow {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            for v in 0..V {
                let b = _mm512_loadu_ps(a.bias.add(16 * v));
                for r in acc.iter_mut() {
                    r[v] = b;
                }
            }
            let base = a.x.add(x0 * a.sw);
            for i in 0..kh {
                for j in 0..kw {
                    let t = i * lay.tap[0] + j * lay.tap[1];
                    let wk = a.w.add((i * kw + j) * a.lanes);
                    let wv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(wk.add(16 * v)));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let b = _mm512_set1_ps(*base.add(r * a.sw + t));
                        for v in 0..V {
                            acc[v] = _mm512_fmadd_ps(b, wv[v], acc[v]);
                        }
                    }
                }
            }
            store512(acc, R, lay, a.dst.add(x0 * lay.m), a.valid);
            x0 += R;
        }
        x0
    }

    /// [`px512`] at AVX2: `R` pixels × 16 channels (two vectors).
    ///
    /// # Safety
    /// AVX2 and FMA; `a.valid ≤ 16`; as [`super::row_c1_channels`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn px256<const R: usize>(a: &Px, lay: &Layout, mut x0: usize, ow: usize) -> usize {
        let [kh, kw] = lay.kernel;
        while x0 + R <= ow {
            let b = [_mm256_loadu_ps(a.bias), _mm256_loadu_ps(a.bias.add(8))];
            let mut acc = [b; R];
            let base = a.x.add(x0 * a.sw);
            for i in 0..kh {
                for j in 0..kw {
                    let t = i * lay.tap[0] + j * lay.tap[1];
                    let wk = a.w.add((i * kw + j) * a.lanes);
                    let wv = [_mm256_loadu_ps(wk), _mm256_loadu_ps(wk.add(8))];
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let b = _mm256_broadcast_ss(&*base.add(r * a.sw + t));
                        for v in 0..2 {
                            acc[v] = _mm256_fmadd_ps(b, wv[v], acc[v]);
                        }
                    }
                }
            }
            store256(acc, R, lay, a.dst.add(x0 * lay.m), a.valid);
            x0 += R;
        }
        x0
    }

    /// One output row of a single-input-channel conv with at most 8 outputs (stride 1 along
    /// x): 16 output pixels per vector, one running sum per output channel, every tap a contiguous load of the input
    /// row times a broadcast weight. Same sums in the same order as the tiles, then the
    /// epilogue per output value.
    ///
    /// # Safety
    /// AVX-512F; `x[src..]` is the first padded input row of the output row (row stride `wp`,
    /// rows `dh` apart per tap), every window inside `x`; `dst` valid for `ow × m` floats.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn row_c1_avx512(
        x: &[f32],
        src: usize,
        wp: usize,
        dh: usize,
        ow: usize,
        wts: &super::NhwcWeights,
        lay: &Layout,
        dst: *mut f32,
    ) {
        const N: usize = 8;
        let [kh, kw] = wts.kernel;
        let m = lay.m;
        debug_assert!(m <= N);
        let lanes = wts.blocks[0].1;
        let (w, bias) = (wts.data.as_ptr(), wts.bias.as_ptr());
        let mut tmp = [[0f32; 16]; N];
        for x0 in (0..ow).step_by(16) {
            let n = (ow - x0).min(16);
            let mask = if n == 16 { u16::MAX } else { (1u16 << n) - 1 };
            // N ≥ m sums (the packed weights and bias are zero past m): a constant count keeps
            // them in registers.
            let mut acc = [_mm512_setzero_ps(); N];
            for (oc, a) in acc.iter_mut().enumerate() {
                *a = _mm512_set1_ps(*bias.add(oc));
            }
            for i in 0..kh {
                let row = x.as_ptr().add(src + i * dh * wp + x0);
                for j in 0..kw {
                    let xv = _mm512_maskz_loadu_ps(mask, row.add(j));
                    let wt = w.add((i * kw + j) * lanes);
                    for (oc, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(xv, _mm512_set1_ps(*wt.add(oc)), *a);
                    }
                }
            }
            if n == 16 {
                // the 16 pixels as two halves of 8
                let lo = acc.map(|a| _mm512_castps512_ps256(a));
                let hi = acc.map(|a| _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))));
                store_pixels8(lo, 8, (ow - x0) * m, lay, dst.add(x0 * m));
                store_pixels8(hi, 8, (ow - x0 - 8) * m, lay, dst.add((x0 + 8) * m));
                continue;
            }
            for (t, a) in tmp.iter_mut().zip(&acc).take(m) {
                _mm512_storeu_ps(t.as_mut_ptr(), *a);
            }
            store_pixels(&tmp[..m], n, lay, dst.add(x0 * m));
        }
    }

    /// Where one output row of a 3×3 depthwise conv reads: the three input rows of its taps
    /// (a row of zeros where a tap row falls in the padding) and the columns.
    pub struct DwRow {
        pub rows: [*const f32; 3],
        /// Left padding, input width, stride and dilation along x, in pixels.
        pub left: usize,
        pub w: usize,
        pub sw: usize,
        pub dw: usize,
        /// Channels (the pixel stride).
        pub c: usize,
        /// The output pixels `xa..xb` whose three taps all lie inside the row.
        pub interior: (usize, usize),
    }

    impl DwRow {
        /// Input offset of tap column `j` of output pixel `xo`, if inside the row.
        #[inline(always)]
        fn col(&self, xo: usize, j: usize) -> Option<usize> {
            (xo * self.sw + j * self.dw)
                .checked_sub(self.left)
                .filter(|&x| x < self.w)
                .map(|x| x * self.c)
        }
    }

    /// 3×3 depthwise over one output row: tiles of `R` pixels × `V` blocks of 16 channels with
    /// `R·V = 8` independent sums (a narrow row takes more channel blocks at once), smaller
    /// tiles for what is left; border pixels one at a time with their outside taps read as
    /// zeros. Every output is `bias`, then the 9 taps in order (as [`depthwise512`] on the
    /// padded input).
    ///
    /// # Safety
    /// AVX-512F; `g.rows` valid for `g.w × g.c` floats; `dst` valid for `ow × m` floats.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn dw3_row_avx512(g: &DwRow, ow: usize, wts: &super::NhwcWeights, lay: &Layout, dst: *mut f32) {
        let k = Dw {
            g,
            w: wts.data.as_ptr(),
            nb: wts.blocks[0].1,
            bias: wts.bias.as_ptr(),
            dst,
        };
        let blocks = lay.m.div_ceil(16);
        if g.dw == 1 && (g.sw == 1 || g.sw == 2) {
            return k.sweep_row(ow, blocks, lay);
        }
        let (xa, xb) = g.interior;
        for xo in 0..xa {
            k.edge(xo, blocks, lay);
        }
        let mut x0 = xa;
        while x0 < xb {
            let r = match xb - x0 {
                8.. => 8,
                4..=7 => 4,
                2..=3 => 2,
                _ => 1,
            };
            let mut b = 0;
            while b < blocks {
                b += match (r, blocks - b) {
                    (8, _) => k.tile::<8, 1, false>(x0, b, lay),
                    (4, 2..) => k.tile::<4, 2, false>(x0, b, lay),
                    (4, _) => k.tile::<4, 1, false>(x0, b, lay),
                    (2, 4..) => k.tile::<2, 4, false>(x0, b, lay),
                    (2, 2..) => k.tile::<2, 2, false>(x0, b, lay),
                    (2, _) => k.tile::<2, 1, false>(x0, b, lay),
                    (_, 8..) => k.tile::<1, 8, false>(x0, b, lay),
                    (_, 4..) => k.tile::<1, 4, false>(x0, b, lay),
                    (_, 2..) => k.tile::<1, 2, false>(x0, b, lay),
                    _ => k.tile::<1, 1, false>(x0, b, lay),
                };
            }
            x0 += r;
        }
        for xo in xb.max(xa)..ow {
            k.edge(xo, blocks, lay);
        }
    }

    /// Where [`dw3_row_avx512`] reads and writes.
    struct Dw<'a> {
        g: &'a DwRow,
        w: *const f32,
        /// The packed weights' tap stride.
        nb: usize,
        bias: *const f32,
        dst: *mut f32,
    }

    impl Dw<'_> {
        /// A border pixel, every channel block.
        #[inline(always)]
        unsafe fn edge(&self, xo: usize, blocks: usize, lay: &Layout) {
            let mut b = 0;
            while b < blocks {
                b += match blocks - b {
                    8.. => self.tile::<1, 8, true>(xo, b, lay),
                    4..=7 => self.tile::<1, 4, true>(xo, b, lay),
                    2..=3 => self.tile::<1, 2, true>(xo, b, lay),
                    _ => self.tile::<1, 1, true>(xo, b, lay),
                };
            }
        }
        /// Pixels `x0..x0 + R`, channel blocks `b0..b0 + V` (`EDGE`: taps outside the row read
        /// as zeros); returns `V`.
        #[inline(always)]
        unsafe fn tile<const R: usize, const V: usize, const EDGE: bool>(
            &self,
            x0: usize,
            b0: usize,
            lay: &Layout,
        ) -> usize {
            let g = self.g;
            let masks = Self::masks::<V>(b0, lay);
            let mut acc: [[__m512; V]; R] = [std::array::from_fn(|v| _mm512_loadu_ps(self.bias.add((b0 + v) * 16))); R];
            let step = g.sw * g.c;
            let zero = _mm512_setzero_ps();
            for t in 0..9 {
                let col = match EDGE {
                    true => g.col(x0, t % 3),
                    false => Some((x0 * g.sw + (t % 3) * g.dw - g.left) * g.c),
                };
                let px = col.map(|o| g.rows[t / 3].add(o + b0 * 16));
                for v in 0..V {
                    let wv = _mm512_loadu_ps(self.w.add(t * self.nb + (b0 + v) * 16));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xv = match px {
                            Some(px) => _mm512_maskz_loadu_ps(masks[v], px.add(r * step + 16 * v)),
                            None => zero,
                        };
                        a[v] = _mm512_fmadd_ps(xv, wv, a[v]);
                    }
                }
            }
            self.store(&acc, &masks, x0, b0, lay);
            V
        }

        /// The channel masks of blocks `b0..b0 + V` (the last block of a layer may be partial).
        #[inline(always)]
        fn masks<const V: usize>(b0: usize, lay: &Layout) -> [u16; V] {
            std::array::from_fn(|v| {
                let l0 = (b0 + v) * 16;
                ((1u32 << lay.m.saturating_sub(l0).min(16)) - 1) as u16
            })
        }

        /// Sums of pixels `x0..x0 + R`, blocks `b0..b0 + V`: residual, ReLU, store. Its own
        /// epilogue rather than `store512`'s: going through `store512` measured about 5 %
        /// slower on MobileNet at batch 1.
        #[inline(always)]
        unsafe fn store<const R: usize, const V: usize>(
            &self,
            acc: &[[__m512; V]; R],
            masks: &[u16; V],
            x0: usize,
            b0: usize,
            lay: &Layout,
        ) {
            for (r, a) in acc.iter().enumerate() {
                for (v, &s) in a.iter().enumerate() {
                    let p = self.dst.add((x0 + r) * lay.m + (b0 + v) * 16);
                    let s = if lay.accumulate {
                        _mm512_add_ps(s, _mm512_maskz_loadu_ps(masks[v], p))
                    } else {
                        s
                    };
                    let s = act512(s, lay.relu_cap);
                    if masks[v] == u16::MAX {
                        _mm512_storeu_ps(p, s);
                    } else {
                        _mm512_mask_storeu_ps(p, masks[v], s);
                    }
                }
            }
        }

        /// Stride 1 or 2, no dilation: the row in near-equal tiles of at most 8 pixels (14 → 7 +
        /// 7), each [`sweep`] over as many channel blocks as keep about 8 sums.
        #[inline(always)]
        unsafe fn sweep_row(&self, ow: usize, blocks: usize, lay: &Layout) {
            let (xa, xb) = self.g.interior;
            let tiles = ow.div_ceil(8);
            let mut x0 = 0;
            for t in 0..tiles {
                let r = (ow - x0).div_ceil(tiles - t);
                let edge = x0 < xa || x0 + r > xb;
                let mut b = 0;
                while b < blocks {
                    b += match (self.g.sw, edge) {
                        (1, false) => self.sweep_tile::<1, false>(r, x0, b, blocks - b, lay),
                        (1, true) => self.sweep_tile::<1, true>(r, x0, b, blocks - b, lay),
                        (_, false) => self.sweep_tile::<2, false>(r, x0, b, blocks - b, lay),
                        (_, true) => self.sweep_tile::<2, true>(r, x0, b, blocks - b, lay),
                    };
                }
                x0 += r;
            }
        }

        /// [`sweep`] for `r ≤ 8` pixels from `x0` and blocks from `b0` (`left` remain); returns
        /// the blocks done.
        #[inline(always)]
        unsafe fn sweep_tile<const S: usize, const EDGE: bool>(
            &self,
            r: usize,
            x0: usize,
            b0: usize,
            left: usize,
            lay: &Layout,
        ) -> usize {
            type Tile = unsafe fn((&Dw, usize, usize, &Layout)) -> usize;
            let f: Tile = match (r, left) {
                (8, _) => sweep::<8, 1, S, EDGE>,
                (7, _) => sweep::<7, 1, S, EDGE>,
                (6, _) => sweep::<6, 1, S, EDGE>,
                (5, _) => sweep::<5, 1, S, EDGE>,
                (4, 2..) => sweep::<4, 2, S, EDGE>,
                (4, _) => sweep::<4, 1, S, EDGE>,
                (3, 2..) => sweep::<3, 2, S, EDGE>,
                (3, _) => sweep::<3, 1, S, EDGE>,
                (2, 2..) => sweep::<2, 2, S, EDGE>,
                (2, _) => sweep::<2, 1, S, EDGE>,
                (_, 2..) => sweep::<1, 2, S, EDGE>,
                _ => sweep::<1, 1, S, EDGE>,
            };
            // through a pointer: inlined into the row loop, the many tile forms kept their sums
            // on the stack
            std::hint::black_box(f)((self, x0, b0, lay))
        }
    }

    /// `R` pixels × `V` channel blocks of a 3×3 depthwise row at stride `S`, no dilation, by
    /// input columns: each input vector is loaded once and multiplied into the (up to 3)
    /// outputs whose window holds it, with the 9 × `V` weight vectors in registers (stride 1:
    /// 3 loads per output instead of 9). `EDGE`: columns outside the row are zero vectors.
    /// The taps still reach each output in order `(ky, kx)`, so the sums are those of
    /// [`Dw::tile`]. Compiled apart from the row loop: inlined there, the many tile forms kept
    /// their sums on the stack.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline(never)]
    unsafe fn sweep<const R: usize, const V: usize, const S: usize, const EDGE: bool>(
        (k, x0, b0, lay): (&Dw, usize, usize, &Layout),
    ) -> usize {
        let g = k.g;
        let masks = Dw::masks::<V>(b0, lay);
        let mut acc: [[__m512; V]; R] = [std::array::from_fn(|v| _mm512_loadu_ps(k.bias.add((b0 + v) * 16))); R];
        let zero = _mm512_setzero_ps();
        // input column of the tile's first tap (negative inside the left padding)
        let first = (x0 * S) as isize - g.left as isize;
        for i in 0..3 {
            let row = g.rows[i].add(b0 * 16);
            let wv: [[__m512; V]; 3] = std::array::from_fn(|j| {
                std::array::from_fn(|v| _mm512_loadu_ps(k.w.add((3 * i + j) * k.nb + (b0 + v) * 16)))
            });
            // the tile's input column `q`, block `v`
            let load = |q: usize, v: usize| {
                let xi = first + q as isize;
                match !EDGE || (xi >= 0 && (xi as usize) < g.w) {
                    true => _mm512_maskz_loadu_ps(masks[v], row.add(xi as usize * g.c + 16 * v)),
                    false => zero,
                }
            };
            if S == 1 {
                for q in 0..R + 2 {
                    for v in 0..V {
                        let xv = load(q, v);
                        for j in 0..3 {
                            if q >= j && q - j < R {
                                acc[q - j][v] = _mm512_fmadd_ps(xv, wv[j][v], acc[q - j][v]);
                            }
                        }
                    }
                }
            } else {
                // Stride 2 by output pixel (a loop LLVM unrolls, unlike one over 2R + 1
                // columns): column 2p is tap 0 of pixel p and tap 2 of pixel p - 1, column
                // 2p + 1 tap 1 of pixel p.
                for p in 0..R {
                    for v in 0..V {
                        let e = load(2 * p, v);
                        if p > 0 {
                            acc[p - 1][v] = _mm512_fmadd_ps(e, wv[2][v], acc[p - 1][v]);
                        }
                        acc[p][v] = _mm512_fmadd_ps(e, wv[0][v], acc[p][v]);
                        acc[p][v] = _mm512_fmadd_ps(load(2 * p + 1, v), wv[1][v], acc[p][v]);
                    }
                }
                for v in 0..V {
                    acc[R - 1][v] = _mm512_fmadd_ps(load(2 * R, v), wv[2][v], acc[R - 1][v]);
                }
            }
        }
        k.store(&acc, &masks, x0, b0, lay);
        V
    }

    /// [`dw3_row_avx512`] at AVX2: tiles of `R` pixels × `V` blocks of 8 channels with `R·V = 8`
    /// independent sums (4 × 2 across a wide row; a narrow row — 7 or 4 pixels at MobileNet's
    /// last stages — takes more channel blocks at once instead of one pixel's chain of 9
    /// dependent multiply-adds), border pixels one at a time with their outside taps read as
    /// zeros; the same sums in the same order. At most 16 channels: [`dw3_row_avx2_narrow`].
    ///
    /// # Safety
    /// AVX2 and FMA; otherwise as [`dw3_row_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dw3_row_avx2(g: &DwRow, ow: usize, wts: &super::NhwcWeights, lay: &Layout, dst: *mut f32) {
        if lay.m <= 16 {
            return dw3_row_avx2_narrow(g, ow, wts, lay, dst);
        }
        let k = Dw {
            g,
            w: wts.data.as_ptr(),
            nb: wts.blocks[0].1,
            bias: wts.bias.as_ptr(),
            dst,
        };
        // whole blocks of 8 channels in tiles; a partial last block alone, with masked loads
        let (full, part) = (lay.m / 8, !lay.m.is_multiple_of(8));
        let (xa, xb) = g.interior;
        for xo in (0..xa).chain(xb.max(xa)..ow) {
            let mut b = 0;
            while b < full {
                b += match full - b {
                    8.. => k.tile256::<1, 8, true, false>(xo, b, lay),
                    4..=7 => k.tile256::<1, 4, true, false>(xo, b, lay),
                    2..=3 => k.tile256::<1, 2, true, false>(xo, b, lay),
                    _ => k.tile256::<1, 1, true, false>(xo, b, lay),
                };
            }
            if part {
                k.tile256::<1, 1, true, true>(xo, full, lay);
            }
        }
        let mut x0 = xa;
        while x0 < xb {
            let r = match xb - x0 {
                4.. => 4,
                2..=3 => 2,
                _ => 1,
            };
            let mut b = 0;
            while b < full {
                b += match (r, full - b) {
                    (4, 2..) => k.tile256::<4, 2, false, false>(x0, b, lay),
                    (4, _) => k.tile256::<4, 1, false, false>(x0, b, lay),
                    (2, 4..) => k.tile256::<2, 4, false, false>(x0, b, lay),
                    (2, 2..) => k.tile256::<2, 2, false, false>(x0, b, lay),
                    (2, _) => k.tile256::<2, 1, false, false>(x0, b, lay),
                    (_, 8..) => k.tile256::<1, 8, false, false>(x0, b, lay),
                    (_, 4..) => k.tile256::<1, 4, false, false>(x0, b, lay),
                    (_, 2..) => k.tile256::<1, 2, false, false>(x0, b, lay),
                    _ => k.tile256::<1, 1, false, false>(x0, b, lay),
                };
            }
            if part {
                match r {
                    4 => k.tile256::<4, 1, false, true>(x0, full, lay),
                    2 => k.tile256::<2, 1, false, true>(x0, full, lay),
                    _ => k.tile256::<1, 1, false, true>(x0, full, lay),
                };
            }
            x0 += r;
        }
    }

    /// [`dw3_row_avx2`] for at most 16 channels: per block of 8 channels, its 9 weight vectors
    /// held in registers across the row, 4 pixels at a time (one load per multiply-add; the
    /// tiles' weight loads measured 13 % slower at 16 channels, 28 × 28, stride 2), border and
    /// remaining pixels one at a time; the same sums in the same order.
    ///
    /// # Safety
    /// As [`dw3_row_avx2`].
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dw3_row_avx2_narrow(g: &DwRow, ow: usize, wts: &super::NhwcWeights, lay: &Layout, dst: *mut f32) {
        const R: usize = 4;
        let m = lay.m;
        let nb = wts.blocks[0].1;
        let (w, bias) = (wts.data.as_ptr(), wts.bias.as_ptr());
        let (xa, xb) = g.interior;
        let (step, tap) = (g.sw * g.c, g.dw * g.c);
        for l0 in (0..m).step_by(8) {
            // lanes `l0 .. l0 + n`; the weights and bias are padded, the input and output not
            let k = Lanes8::new((m - l0).min(8));
            let wv: [__m256; 9] = std::array::from_fn(|t| _mm256_loadu_ps(w.add(t * nb + l0)));
            let b = _mm256_loadu_ps(bias.add(l0));
            for xo in (0..xa).chain(xb.max(xa)..ow) {
                // a border pixel: taps outside the row read as zeros
                let mut a = b;
                for (t, &wt) in wv.iter().enumerate() {
                    let xv = match g.col(xo, t % 3) {
                        Some(o) => k.load(g.rows[t / 3].add(o + l0)),
                        None => _mm256_setzero_ps(),
                    };
                    a = _mm256_fmadd_ps(xv, wt, a);
                }
                k.store(dst.add(xo * m + l0), a, lay);
            }
            let mut x0 = xa;
            while x0 < xb {
                let r = if xb - x0 >= R { R } else { 1 };
                let mut acc = [b; R];
                let first = (x0 * g.sw - g.left) * g.c + l0;
                for (t, &wt) in wv.iter().enumerate() {
                    let px = g.rows[t / 3].add(first + (t % 3) * tap);
                    for (i, a) in acc.iter_mut().enumerate().take(r) {
                        *a = _mm256_fmadd_ps(k.load(px.add(i * step)), wt, *a);
                    }
                }
                for (i, a) in acc.into_iter().enumerate().take(r) {
                    k.store(dst.add((x0 + i) * m + l0), a, lay);
                }
                x0 += r;
            }
        }
    }

    impl Dw<'_> {
        /// [`Dw::tile`] at AVX2: pixels `x0..x0 + R`, blocks `b0..b0 + V` of 8 channels (`EDGE`:
        /// taps outside the row read as zeros; `PART`: the blocks are the partial last one, read
        /// and written through lane masks, else whole blocks, no masks); returns `V`.
        #[inline(always)]
        unsafe fn tile256<const R: usize, const V: usize, const EDGE: bool, const PART: bool>(
            &self,
            x0: usize,
            b0: usize,
            lay: &Layout,
        ) -> usize {
            let g = self.g;
            // lanes of each block that exist; the weights and bias are padded, the input and
            // output not
            let lanes: [Lanes8; V] = std::array::from_fn(|v| match PART {
                true => Lanes8::new(lay.m.saturating_sub((b0 + v) * 8).min(8)),
                false => Lanes8::full(),
            });
            let mut acc: [[__m256; V]; R] = [std::array::from_fn(|v| _mm256_loadu_ps(self.bias.add((b0 + v) * 8))); R];
            let step = g.sw * g.c;
            for t in 0..9 {
                let col = match EDGE {
                    true => g.col(x0, t % 3),
                    false => Some((x0 * g.sw + (t % 3) * g.dw - g.left) * g.c),
                };
                let px = col.map(|o| g.rows[t / 3].add(o + b0 * 8));
                for (v, l) in lanes.iter().enumerate() {
                    let wv = _mm256_loadu_ps(self.w.add(t * self.nb + (b0 + v) * 8));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xv = match px {
                            Some(px) => l.load(px.add(r * step + 8 * v)),
                            None => _mm256_setzero_ps(),
                        };
                        a[v] = _mm256_fmadd_ps(xv, wv, a[v]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                for (v, (&s, l)) in a.iter().zip(&lanes).enumerate() {
                    l.store(self.dst.add((x0 + r) * lay.m + (b0 + v) * 8), s, lay);
                }
            }
            V
        }
    }

    /// The first `n ≤ 8` lanes of AVX2 loads and stores.
    struct Lanes8 {
        n: usize,
        mask: __m256i,
    }

    impl Lanes8 {
        #[inline(always)]
        unsafe fn new(n: usize) -> Lanes8 {
            Lanes8 {
                n,
                mask: lane_mask256(n),
            }
        }
        /// Eight lanes (no mask: plain loads and stores).
        #[inline(always)]
        unsafe fn full() -> Lanes8 {
            Lanes8 {
                n: 8,
                mask: _mm256_setzero_si256(),
            }
        }
        #[inline(always)]
        unsafe fn load(&self, p: *const f32) -> __m256 {
            if self.n == 8 {
                _mm256_loadu_ps(p)
            } else {
                _mm256_maskload_ps(p, self.mask)
            }
        }
        /// The epilogue: residual, ReLU, store.
        #[inline(always)]
        unsafe fn store(&self, p: *mut f32, s: __m256, lay: &Layout) {
            let s = if lay.accumulate {
                _mm256_add_ps(s, self.load(p))
            } else {
                s
            };
            let s = act256(s, lay.relu_cap);
            if self.n == 8 {
                _mm256_storeu_ps(p, s)
            } else {
                _mm256_maskstore_ps(p, self.mask, s)
            }
        }
    }

    /// [`row_c1_avx512`] at AVX2 for at most 8 outputs: 8 pixels per vector, the same sums in
    /// the same order.
    ///
    /// # Safety
    /// AVX2 and FMA; `m ≤ 8`; otherwise as [`row_c1_avx512`].
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn row_c1_avx2(
        x: &[f32],
        src: usize,
        wp: usize,
        dh: usize,
        ow: usize,
        wts: &super::NhwcWeights,
        lay: &Layout,
        dst: *mut f32,
    ) {
        // one instance per output count: only the `m` sums are computed and kept in registers
        match lay.m {
            1 => row_c1_avx2_m::<1>(x, src, wp, dh, ow, wts, lay, dst),
            2 => row_c1_avx2_m::<2>(x, src, wp, dh, ow, wts, lay, dst),
            3 => row_c1_avx2_m::<3>(x, src, wp, dh, ow, wts, lay, dst),
            4 => row_c1_avx2_m::<4>(x, src, wp, dh, ow, wts, lay, dst),
            5 => row_c1_avx2_m::<5>(x, src, wp, dh, ow, wts, lay, dst),
            6 => row_c1_avx2_m::<6>(x, src, wp, dh, ow, wts, lay, dst),
            7 => row_c1_avx2_m::<7>(x, src, wp, dh, ow, wts, lay, dst),
            8 => row_c1_avx2_m::<8>(x, src, wp, dh, ow, wts, lay, dst),
            m => unreachable!("row_c1_avx2 computes 1 to 8 outputs, not {m}"),
        }
    }

    /// [`row_c1_avx2`] for `M = lay.m` outputs. Inputs are read 8 at a time without a mask
    /// wherever the 8 values lie inside `x` (lanes past the row's end are computed and not
    /// stored): AMD's masked loads and stores cost several times a plain one.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn row_c1_avx2_m<const M: usize>(
        x: &[f32],
        src: usize,
        wp: usize,
        dh: usize,
        ow: usize,
        wts: &super::NhwcWeights,
        lay: &Layout,
        dst: *mut f32,
    ) {
        let [kh, kw] = wts.kernel;
        debug_assert_eq!(lay.m, M);
        let lanes = wts.blocks[0].1;
        let (w, bias) = (wts.data.as_ptr(), wts.bias.as_ptr());
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for x0 in (0..ow).step_by(8) {
            let n = (ow - x0).min(8);
            // the last value a plain load of the tile's last tap would read
            let plain = src + (kh - 1) * dh * wp + x0 + kw - 1 + 8 <= x.len();
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane);
            let mut acc = [_mm256_setzero_ps(); 8];
            for (oc, a) in acc.iter_mut().enumerate().take(M) {
                *a = _mm256_set1_ps(*bias.add(oc));
            }
            for i in 0..kh {
                let row = x.as_ptr().add(src + i * dh * wp + x0);
                for j in 0..kw {
                    let xv = if plain {
                        _mm256_loadu_ps(row.add(j))
                    } else {
                        _mm256_maskload_ps(row.add(j), mask)
                    };
                    let wt = w.add((i * kw + j) * lanes);
                    for (oc, a) in acc.iter_mut().enumerate().take(M) {
                        *a = _mm256_fmadd_ps(xv, _mm256_set1_ps(*wt.add(oc)), *a);
                    }
                }
            }
            // later tiles of the row overwrite what a plain store spills past pixel n
            store_pixels8(acc, n, (ow - x0) * M, lay, dst.add(x0 * M));
        }
    }

    /// [`store_pixels`] of `n ≤ 8` pixels at `m = lay.m ≤ 8` channels (`acc[oc]`: channel
    /// `oc` of the 8 pixels; the sums past `m` and `n` are not stored): one register transpose,
    /// then a vector per pixel, the same values. Without a residual, a pixel is stored as a
    /// whole vector when its 8 lanes end within `room` floats of `dst`: its lanes past `m` land
    /// on later pixels, stored after it (by this call up to `n × m`, by the caller's later
    /// calls up to `room`).
    ///
    /// # Safety
    /// AVX2; `dst` valid for `room ≥ n × m` floats.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store_pixels8(acc: [__m256; 8], n: usize, room: usize, lay: &Layout, dst: *mut f32) {
        let m = lay.m;
        let px = crate::interp::kernels::transpose8_epi32(acc.map(|a| _mm256_castps_si256(a)));
        let mask = lane_mask256(m);
        for (p, &v) in px.iter().enumerate().take(n) {
            let d = dst.add(p * m);
            let mut v = _mm256_castsi256_ps(v);
            if m == 8 || (!lay.accumulate && p * m + 8 <= room) {
                if lay.accumulate {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(d));
                }
                _mm256_storeu_ps(d, act256(v, lay.relu_cap));
            } else {
                if lay.accumulate {
                    v = _mm256_add_ps(v, _mm256_maskload_ps(d, mask));
                }
                _mm256_maskstore_ps(d, mask, act256(v, lay.relu_cap));
            }
        }
    }

    /// The epilogue of the one-input-channel row kernels: `tmp[oc][p]` (output channel `oc` of
    /// pixel `p`, `n` pixels) into channels-last `dst`, plus the residual already there, ReLU.
    ///
    /// # Safety
    /// `dst` valid for `n × tmp.len()` floats.
    #[inline(always)]
    unsafe fn store_pixels<const L: usize>(tmp: &[[f32; L]], n: usize, lay: &Layout, dst: *mut f32) {
        let m = tmp.len();
        for p in 0..n {
            let d = dst.add(p * m);
            for (oc, t) in tmp.iter().enumerate() {
                let mut v = t[p];
                if lay.accumulate {
                    v += *d.add(oc);
                }
                *d.add(oc) = lay.act(v);
            }
        }
    }

    /// Depthwise: `R` pixels, channels 16 at a time.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn depthwise512<const R: usize>(
        x: *const f32,
        offs: &[usize],
        rows: usize,
        w: *const f32,
        nb: usize,
        bias: *const f32,
        lay: &Layout,
        dst: *mut f32,
        valid: usize,
    ) {
        debug_assert_eq!(offs.len(), R);
        let [kh, kw] = lay.kernel;
        for l0 in (0..valid).step_by(16) {
            let n = (valid - l0).min(16);
            let mask = ((1u32 << n) - 1) as u16;
            let mut acc = [_mm512_loadu_ps(bias.add(l0)); R];
            for i in 0..kh {
                for j in 0..kw {
                    let t = i * lay.tap[0] + j * lay.tap[1] + l0;
                    let wv = _mm512_loadu_ps(w.add((i * kw + j) * nb + l0));
                    for r in 0..R {
                        let xv = _mm512_maskz_loadu_ps(mask, x.add(offs[r] + t));
                        acc[r] = _mm512_fmadd_ps(xv, wv, acc[r]);
                    }
                }
            }
            // not `acc[..rows]` (see `store512`)
            for (r, &s) in acc.iter().take(rows).enumerate() {
                let p = dst.add(r * lay.m + l0);
                let s = if lay.accumulate {
                    _mm512_add_ps(s, _mm512_maskz_loadu_ps(mask, p))
                } else {
                    s
                };
                let s = act512(s, lay.relu_cap);
                _mm512_mask_storeu_ps(p, mask, s);
            }
        }
    }

    /// `R` pixels × `V` vectors of 8 output channels: vector `v` holds lanes `8·(v % 4)..` of
    /// weight block `v / 4` (blocks `blk` floats apart, `nb` lanes each; one block when `V ≤ 4`).
    /// `S > 0`: the pixels are `S` floats apart, as in [`tile512`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile256<const R: usize, const V: usize, const S: usize>(a: Args) {
        tile256_inline::<R, V, S>(a)
    }

    /// [`tile256`]'s body, inlined where it is called (in a function with AVX2 and FMA).
    #[inline(always)]
    unsafe fn tile256_inline<const R: usize, const V: usize, const S: usize>(
        (x, offs, rows, (w, nb, blk), bias, lay, dst, valid): Args,
    ) {
        debug_assert_eq!(offs.len(), R);
        let kw = lay.kernel[1];
        let [[y0, ny], [x0, nx]] = lay.win;
        let c = lay.c;
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for v in 0..V {
            let b = _mm256_loadu_ps(bias.add(8 * v));
            for a in acc.iter_mut() {
                a[v] = b;
            }
        }
        let mut px = [x; R];
        for (p, &o) in px.iter_mut().zip(offs) {
            *p = x.add(o);
        }
        let base = x.add(offs[0]);
        // Taps along x are contiguous with the channels when not dilated: one run of nx·c.
        let (runs, run) = if lay.tap[1] == c { (1, nx * c) } else { (nx, c) };
        for i in 0..ny {
            for j in 0..runs {
                let t = i * lay.tap[0] + j * lay.tap[1];
                let wk = w.add(((y0 + i) * kw + x0 + j) * c * nb);
                // one input channel's multiply-adds, as a macro: written as a closure called
                // four times, LLVM left it out of line with every intrinsic a call (0.6 GMAC/s)
                macro_rules! step {
                    ($ci:expr) => {{
                        let ci = $ci;
                        let wv: [__m256; V] =
                            std::array::from_fn(|v| _mm256_loadu_ps(wk.add((v / 4) * blk + ci * nb + 8 * (v % 4))));
                        for r in 0..R {
                            let p = if S > 0 { base.add(r * S) } else { px[r] };
                            let b = _mm256_broadcast_ss(&*p.add(t + ci));
                            for v in 0..V {
                                acc[r][v] = _mm256_fmadd_ps(b, wv[v], acc[r][v]);
                            }
                        }
                    }};
                }
                // unrolled by 4: fewer loop instructions beside the multiply-adds (1-3 % in
                // direct_throughput at AVX2, alternated runs)
                let mut ci = 0;
                while ci + 4 <= run {
                    step!(ci);
                    step!(ci + 1);
                    step!(ci + 2);
                    step!(ci + 3);
                    ci += 4;
                }
                while ci < run {
                    step!(ci);
                    ci += 1;
                }
            }
        }
        store256(acc, rows, lay, dst, valid);
    }

    /// The epilogue of `rows` pixels × `V` vectors of 8 channels: residual, ReLU, the `valid`
    /// channels stored.
    #[inline(always)]
    unsafe fn store256<const R: usize, const V: usize>(
        acc: [[__m256; V]; R],
        rows: usize,
        lay: &Layout,
        dst: *mut f32,
        valid: usize,
    ) {
        debug_assert!(rows <= R);
        if valid >= 8 * V {
            // whole vectors (see `store512`)
            let cap = lay.relu_cap.unwrap_or(0.0);
            return whole_store!(lay, whole256::<R, V>(acc, rows, lay.out_px, dst, cap));
        }
        // the array taken whole, `rows` counted by the iterator (a runtime slice `acc[..rows]`
        // makes LLVM keep the sums in a stack array, stored to after every multiply-add)
        for (r, a) in acc.iter().take(rows).enumerate() {
            for (v, &s) in a.iter().enumerate() {
                let n = valid.saturating_sub(8 * v).min(8);
                let p = dst.add(r * lay.out_px + 8 * v);
                let s = if lay.accumulate {
                    _mm256_add_ps(s, _mm256_maskload_ps(p, lane_mask256(n)))
                } else {
                    s
                };
                let s = act256(s, lay.relu_cap);
                if n == 8 {
                    _mm256_storeu_ps(p, s);
                } else if n > 0 {
                    _mm256_maskstore_ps(p, lane_mask256(n), s);
                }
            }
        }
    }

    /// [`store256`] of whole vectors ([`whole512`] on 8 lanes).
    #[inline(always)]
    unsafe fn whole256<const R: usize, const V: usize, const ACC: bool, const ACT: u8>(
        acc: [[__m256; V]; R],
        rows: usize,
        out_px: usize,
        dst: *mut f32,
        cap: f32,
    ) {
        let (zero, capv) = (_mm256_setzero_ps(), _mm256_set1_ps(cap));
        for (r, a) in acc.iter().enumerate() {
            if r >= rows {
                break;
            }
            for (v, &s) in a.iter().enumerate() {
                let p = dst.add(r * out_px + 8 * v);
                let s = if ACC { _mm256_add_ps(s, _mm256_loadu_ps(p)) } else { s };
                let s = if ACT != NO_ACT { _mm256_max_ps(s, zero) } else { s };
                let s = if ACT == RELU_CAPPED { _mm256_min_ps(s, capv) } else { s };
                _mm256_storeu_ps(p, s);
            }
        }
    }

    /// Depthwise: `R` pixels, channels 8 at a time.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn depthwise256<const R: usize>(
        x: *const f32,
        offs: &[usize],
        rows: usize,
        w: *const f32,
        nb: usize,
        bias: *const f32,
        lay: &Layout,
        dst: *mut f32,
        valid: usize,
    ) {
        debug_assert_eq!(offs.len(), R);
        let [kh, kw] = lay.kernel;
        for l0 in (0..valid).step_by(8) {
            let n = (valid - l0).min(8);
            let mask = lane_mask256(n);
            let mut acc = [_mm256_loadu_ps(bias.add(l0)); R];
            for i in 0..kh {
                for j in 0..kw {
                    let t = i * lay.tap[0] + j * lay.tap[1] + l0;
                    let wv = _mm256_loadu_ps(w.add((i * kw + j) * nb + l0));
                    for r in 0..R {
                        let xv = if n == 8 {
                            _mm256_loadu_ps(x.add(offs[r] + t))
                        } else {
                            _mm256_maskload_ps(x.add(offs[r] + t), mask)
                        };
                        acc[r] = _mm256_fmadd_ps(xv, wv, acc[r]);
                    }
                }
            }
            // not `acc[..rows]` (see `store512`)
            for (r, &s) in acc.iter().take(rows).enumerate() {
                let p = dst.add(r * lay.m + l0);
                let lanes = Lanes8 { n, mask };
                lanes.store(p, s, lay);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::kernels::conv::conv2d;
    use crate::ir::op::{Padding, Window};
    use crate::pq::rng::Rng;

    fn conv(k: usize, stride: usize, dil: usize, pad: [usize; 4], group: usize) -> Conv {
        Conv::nchw(
            Window {
                kernel: [k, k],
                strides: [stride, stride],
                dilations: [dil, dil],
                padding: Padding::Explicit(pad),
                ceil_mode: false,
            },
            group,
        )
    }

    /// Every level gives the same bits as the scalar reference, the reference matches the NCHW
    /// im2col + GEMM convolution, and a fused ReLU is the ReLU of the output.
    #[test]
    fn direct_conv_matches_the_reference_at_every_level() {
        let mut rng = Rng::new(11);
        let levels = crate::interp::kernels::levels_checked("direct_conv_matches_the_reference_at_every_level");
        // (n, c, hw, m, k, stride, dilation, pads, depthwise)
        type Case = (usize, usize, [usize; 2], usize, usize, usize, usize, [usize; 4], bool);
        let cases: &[Case] = &[
            (2, 3, [9, 7], 16, 3, 1, 1, [1; 4], false),
            (1, 5, [6, 6], 40, 3, 2, 1, [1, 0, 1, 2], false),
            (3, 16, [5, 5], 32, 1, 1, 1, [0; 4], false),
            // 1×1 runs of whole tiles over several 32-lane blocks, a partial last tile
            (2, 32, [7, 7], 64, 1, 1, 1, [0; 4], false),
            (1, 64, [4, 6], 96, 1, 1, 1, [0; 4], false),
            // 1×1 runs with a 16-lane last block, partly valid (AVX2: per 16 lanes)
            (1, 16, [5, 5], 40, 1, 1, 1, [0; 4], false),
            (2, 128, [3, 5], 56, 1, 1, 1, [0; 4], false),
            (1, 1, [12, 12], 6, 5, 1, 1, [0; 4], false),
            (2, 1, [7, 13], 5, 3, 1, 1, [1; 4], false),
            (2, 1, [9, 37], 16, 3, 1, 1, [1, 2, 0, 1], false),
            (1, 1, [8, 20], 3, 3, 2, 1, [1; 4], false),
            // one input channel, ≤ 8 outputs: whole vectors of pixels stored through a register
            // transpose (8 and 7 channels: 16 + 16 + 2 and 16 + 1 pixels a row)
            (2, 1, [5, 34], 8, 3, 1, 1, [1; 4], false),
            (1, 1, [4, 18], 7, 3, 1, 1, [0, 1, 0, 1], false),
            // and 1, 2 and 4 channels (one kernel instance per count at AVX2): a row of 19 =
            // 8 + 8 + 3 pixels, of 9 = 8 + 1 (the last tile's reads past the input masked)
            (2, 1, [6, 19], 2, 3, 1, 1, [1; 4], false),
            (1, 1, [5, 9], 4, 5, 1, 1, [2; 4], false),
            (2, 1, [4, 10], 1, 3, 1, 1, [0; 4], false),
            (2, 1, [9, 30], 16, 3, 2, 1, [1; 4], false),
            (1, 1, [15, 15], 64, 7, 2, 1, [3; 4], false),
            (2, 1, [6, 11], 40, 3, 1, 2, [2, 1, 2, 0], false),
            // one input channel over 32-lane blocks in equal tiles: rows of 14 = 7 + 7 (a
            // stride-2 stem), 13 = 6 + 6 + 1, 20 = 10 + 10
            (2, 1, [5, 28], 64, 3, 2, 1, [1; 4], false),
            (1, 1, [3, 13], 40, 3, 1, 1, [1; 4], false),
            (1, 1, [3, 20], 64, 3, 1, 1, [1; 4], false),
            (2, 8, [7, 9], 70, 3, 1, 2, [2; 4], false),
            (1, 4, [1, 1], 24, 3, 1, 1, [1; 4], false),
            // fewer pixels than a tile (1–9): several 32-lane blocks at once, a 16-lane last one
            (1, 8, [2, 2], 80, 3, 1, 1, [1; 4], false),
            (1, 5, [3, 3], 200, 3, 2, 1, [1; 4], false),
            (2, 3, [1, 1], 130, 1, 1, 1, [0; 4], false),
            (1, 7, [3, 1], 64, 3, 1, 1, [1; 4], false),
            (3, 6, [3, 1], 96, 3, 2, 1, [1; 4], false),
            (1, 9, [3, 3], 160, 3, 1, 1, [1; 4], false),
            // one pixel over three 32-lane blocks and a 16-lane one (two blocks at a time at AVX2)
            (1, 6, [1, 1], 112, 3, 1, 1, [1; 4], false),
            // 5 pixels: at AVX2 a tile of 4 (two of 2 per block) and one of a single pixel
            (1, 12, [5, 1], 72, 3, 1, 1, [1; 4], false),
            // one pixel, large enough to split its channel blocks across threads
            (1, 64, [1, 1], 200, 3, 1, 1, [1; 4], false),
            (2, 19, [6, 5], 19, 3, 1, 1, [1; 4], true),
            (2, 16, [28, 28], 16, 3, 2, 1, [1; 4], true),
            (1, 33, [5, 20], 33, 3, 1, 2, [2, 1, 0, 2], true),
            (1, 8, [3, 1], 8, 3, 1, 1, [1; 4], true),
            (1, 24, [4, 2], 24, 3, 2, 1, [0, 0, 2, 2], true),
            (1, 5, [2, 9], 5, 3, 3, 1, [2, 2, 2, 2], true),
            (1, 40, [7, 7], 40, 5, 2, 1, [2; 4], true),
            // narrow rows, many channel blocks: the wide channel tiles of the 3×3 row kernels
            (2, 70, [4, 4], 70, 3, 1, 1, [1; 4], true),
            (1, 130, [7, 7], 130, 3, 2, 1, [1; 4], true),
            (1, 64, [5, 3], 64, 3, 1, 1, [1; 4], true),
            // rows split into unequal tiles (17 = 6 + 6 + 5; 15 = 8 + 7), both edges padded or not
            (1, 20, [3, 17], 20, 3, 1, 1, [1; 4], true),
            (1, 48, [5, 30], 48, 3, 2, 1, [0, 1, 1, 0], true),
            // batch 1, a padded image whose tiles split across the threads, each task padding
            // the rows it reads (a 4×4 map below: its channel blocks split, each task padding all)
            (1, 32, [20, 19], 24, 3, 1, 1, [1, 2, 1, 0], false),
            // raster tiles of 8 at AVX-512 (fewer pixels computed than tiles of 10): a 4×4 map
            // at batch 1 (two full tiles), 12 pixels (a full tile and a partial one)
            (1, 32, [4, 4], 64, 3, 1, 1, [1; 4], false),
            (1, 16, [3, 4], 48, 3, 1, 1, [1; 4], false),
            // padded in groups of images: one image per group (a partial tile at each group's
            // end), several per group (tiles crossing images inside a group)
            (3, 64, [24, 24], 32, 3, 1, 1, [1; 4], false),
            (4, 32, [13, 13], 32, 3, 1, 1, [1; 4], false),
            (5, 16, [9, 11], 16, 3, 2, 1, [1, 0, 2, 1], false),
            // tiles of one output position across images (`conv_by_position`): small maps,
            // partial last tiles (17, 20 images), dilation, strides, asymmetric pads, a 5×5
            // kernel, a 16-lane last block, and positions with no tap inside the image
            (16, 16, [4, 4], 32, 3, 1, 1, [1; 4], false),
            (17, 24, [2, 3], 40, 3, 1, 2, [2, 1, 2, 1], false),
            (20, 8, [5, 5], 64, 3, 2, 1, [1, 0, 2, 1], false),
            (16, 5, [1, 1], 16, 3, 1, 1, [1; 4], false),
            (16, 4, [2, 2], 16, 3, 1, 1, [3; 4], false),
            (18, 12, [3, 3], 48, 5, 1, 1, [2; 4], false),
            // one position: its tiles split into tasks (8 images per tile at AVX-512)
            (24, 40, [1, 1], 64, 3, 1, 1, [1; 4], false),
        ];
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        // outputs above the cap the epilogue cases use, over all cases (the cap must bite)
        let mut capped = 0;
        for &(n, c, [h, w], m, k, s, d, pads, dw) in cases {
            let cv = conv(k, s, d, pads, if dw { c } else { 1 });
            let xs = [n, c, h, w];
            let x: Vec<f32> = (0..n * c * h * w).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let wc = if dw { 1 } else { c };
            let wt: Vec<f32> = (0..m * wc * k * k).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let b: Vec<f32> = (0..m).map(|i| i as f32 * 0.1 - 1.0).collect();
            let reference = conv2d(&x, xs, &wt, m, Some(&b), &cv, None).unwrap();
            let xn = crate::interp::kernels::to_nhwc(&x, xs);
            let packed = match dw {
                false => NhwcWeights::pack(&wt, m, c, [k, k], Some(&b)),
                true => NhwcWeights::pack_depthwise(&wt, c, [k, k], Some(&b)),
            };
            let (scalar, shape) =
                conv_nhwc(&xn, [n, h, w, c], &packed, &cv, Epilogue::default(), Simd::Scalar).unwrap();
            let rs = reference.shape();
            assert_eq!(shape, [rs[0], rs[2], rs[3], rs[1]]);
            let want = crate::interp::kernels::to_nhwc(reference.as_slice().unwrap(), [rs[0], rs[1], rs[2], rs[3]]);
            assert_eq!(scalar.len(), want.len());
            let err = scalar.iter().zip(&want).fold(0f32, |e, (a, b)| e.max((a - b).abs()));
            assert!(err < 1e-4, "case c={c} m={m} k={k}: {err}");
            // one thread splits the batch into other groups and tasks, two threads pad a single
            // image's rows in each task: the same bits
            for pool in [&one, &two] {
                let (got, _) = pool
                    .install(|| conv_nhwc(&xn, [n, h, w, c], &packed, &cv, Epilogue::default(), Simd::Scalar))
                    .unwrap();
                assert!(got.iter().zip(&scalar).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
            let res: Vec<f32> = (0..scalar.len()).map(|_| rng.next_f64() as f32 - 0.5).collect();
            capped += scalar.iter().filter(|&&v| v > 0.3).count();
            for &level in &levels {
                let cases = [(false, false), (true, false), (false, true), (true, true)];
                // a ReLU capped at 0.3 (a fused `Clip(0, 0.3)`), below many of these outputs
                for ((relu, add), cap) in cases.into_iter().flat_map(|e| [(e, None), (e, Some(0.3f32))]) {
                    let epi = Epilogue {
                        residual: add.then(|| res.clone()),
                        relu,
                        relu_max: cap,
                    };
                    // (on two threads, whatever the machine: batch 1 padded in the tasks)
                    let (got, _) = two
                        .install(|| conv_nhwc(&xn, [n, h, w, c], &packed, &cv, epi, level))
                        .unwrap();
                    // The unfused graph: Add, then Relu (or Clip(0, cap), which needs `relu`).
                    let expect: Vec<f32> = scalar
                        .iter()
                        .zip(&res)
                        .map(|(&v, &r)| if add { v + r } else { v })
                        .map(|v| if relu { crate::interp::kernels::relu(v) } else { v })
                        .map(|v| match cap {
                            Some(cap) if relu => v.min(cap),
                            _ => v,
                        })
                        .collect();
                    assert_eq!(got.len(), expect.len());
                    let same = got.iter().zip(&expect).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{} differs (c={c} m={m} k={k} relu={relu} residual={add} cap={cap:?})",
                        level.name()
                    );
                }
            }
        }
        assert!(
            capped > 100,
            "only {capped} outputs above the cap: the capped cases check little"
        );
        // an input shorter than its shape says: an error, not a read past its end
        let cv = conv(3, 1, 1, [1; 4], 1);
        let packed = NhwcWeights::pack(&[0.5; 4 * 2 * 9], 4, 2, [3, 3], None);
        let err = conv_nhwc(
            &[1.0; 2 * 4 * 4 * 2 - 1],
            [2, 4, 4, 2],
            &packed,
            &cv,
            Epilogue::default(),
            Simd::Scalar,
        )
        .unwrap_err();
        assert!(err.to_string().contains("63 values"), "{err}");
    }

    /// Throughput of the 3×3 depthwise kernel on MobileNet-like layers (a measurement, not a
    /// test) that `docs/bench.sh` runs: `cargo test --release --lib depthwise_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn depthwise_throughput() {
        let mut rng = Rng::new(5);
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        for &(n, c, hw, s) in &[
            (8, 32, 14, 1),
            (1, 32, 14, 1),
            (4, 16, 28, 2),
            (64, 16, 28, 2),
            (64, 32, 14, 1),
            (64, 32, 14, 2),
            (64, 64, 7, 1),
            (64, 64, 7, 2),
            (64, 128, 4, 1),
        ] {
            let cv = conv(3, s, 1, [1; 4], c);
            let x: Vec<f32> = (0..n * c * hw * hw).map(|_| rng.next_f64() as f32).collect();
            let wt: Vec<f32> = (0..c * 9).map(|_| rng.next_f64() as f32).collect();
            let packed = NhwcWeights::pack_depthwise(&wt, c, [3, 3], None);
            let o = (hw - 1) / s + 1;
            let macs = (n * o * o * c * 9) as f64;
            for simd in [Simd::detect(), Simd::Avx2] {
                let best = one.install(|| {
                    (0..20).fold(f64::MAX, |best, _| {
                        let t = std::time::Instant::now();
                        let epi = Epilogue {
                            residual: None,
                            relu: true,
                            relu_max: None,
                        };
                        std::hint::black_box(conv_nhwc(&x, [n, hw, hw, c], &packed, &cv, epi, simd).unwrap());
                        best.min(t.elapsed().as_secs_f64())
                    })
                });
                eprintln!(
                    "dw n={n} c={c} {hw}x{hw} s={s}: {:.3} ms, {:.1} GMAC/s ({})",
                    best * 1e3,
                    macs / best / 1e9,
                    simd.name()
                );
            }
        }
    }

    /// Throughput of the direct kernel on ResNet-like layers (a measurement, not a test):
    /// `cargo test --release --lib direct_throughput -- --ignored --nocapture`; `TC_SIMD=avx2`
    /// times the AVX2 tiles on an AVX-512 machine.
    #[test]
    #[ignore]
    fn direct_throughput() {
        let mut rng = Rng::new(3);
        let reps = std::env::var("TC_REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
        for &(n, c, hw, m, k, st) in &[
            (64, 1, 28, 6, 5, 1),
            (64, 1, 28, 16, 3, 1),
            (1, 1, 28, 16, 3, 1),
            // ResNet-18 w64 (TabConv variant) stem: one channel, 64 outputs, stride 2
            (64, 1, 28, 64, 3, 2),
            (1, 1, 28, 64, 3, 2),
            (64, 6, 12, 16, 5, 1),
            (64, 16, 28, 16, 3, 1),
            (64, 16, 32, 16, 3, 1),
            (64, 32, 14, 32, 3, 1),
            (64, 64, 7, 64, 3, 1),
            (16, 64, 7, 64, 3, 1),
            (4, 64, 7, 64, 3, 1),
            (16, 32, 16, 32, 3, 1),
            (4, 32, 16, 32, 3, 1),
            (16, 16, 32, 16, 3, 1),
            (4, 16, 32, 16, 3, 1),
            (16, 128, 4, 128, 3, 1),
            (16, 64, 8, 64, 3, 1),
            // ResNet-18 w64 layer1.0 conv1: stride 2 (input copied with its padding)
            (64, 64, 14, 64, 3, 2),
            (1, 64, 28, 64, 3, 1),
            (64, 96, 14, 192, 5, 1),
            (64, 192, 7, 192, 1, 1),
            // MobileNet fixture's pointwise layers
            (64, 16, 14, 32, 1, 1),
            (64, 32, 14, 32, 1, 1),
            (64, 32, 7, 64, 1, 1),
            (64, 64, 7, 64, 1, 1),
            (64, 64, 4, 128, 1, 1),
            (64, 128, 4, 128, 1, 1),
            (1, 32, 14, 32, 1, 1),
            (1, 128, 4, 128, 1, 1),
            // ResNet-18 w64 (TabConv variant) at batch 1: layers 1-3
            (1, 64, 7, 64, 3, 1),
            (1, 128, 4, 128, 3, 1),
            (1, 256, 2, 256, 3, 1),
            // ResNet-18/16 (Fashion-MNIST, padded to 32×32) layer1 at batch 1 (its layer4 is
            // the 4×4 case above)
            (1, 16, 32, 16, 3, 1),
        ] {
            let name = format!("n={n} c={c} {hw}x{hw} m={m} k={k} s={st}");
            if std::env::var("TC_ONLY").is_ok_and(|f| !name.contains(&f)) {
                continue;
            }
            let cv = conv(k, st, 1, if k == 5 { [0; 4] } else { [k / 2; 4] }, 1);
            let x: Vec<f32> = (0..n * c * hw * hw).map(|_| rng.next_f64() as f32).collect();
            let wt: Vec<f32> = (0..m * c * k * k).map(|_| rng.next_f64() as f32).collect();
            let packed = NhwcWeights::pack(&wt, m, c, [k, k], None);
            let simd = match std::env::var("TC_SIMD").as_deref() {
                Ok("avx2") => Simd::Avx2,
                _ => Simd::detect(),
            };
            let o = if k == 5 { hw - 4 } else { (hw - 1) / st + 1 };
            let macs = (n * o * o * m * c * k * k) as f64;
            let threads = std::env::var("TC_THREADS")
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(1);
            let one = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let best = one.install(|| {
                let mut best = f64::MAX;
                for _ in 0..if n == 1 { 2000 } else { reps } {
                    let t = std::time::Instant::now();
                    let epi = Epilogue {
                        residual: None,
                        relu: true,
                        relu_max: None,
                    };
                    let out = conv_nhwc(&x, [n, hw, hw, c], &packed, &cv, epi, simd).unwrap();
                    best = best.min(t.elapsed().as_secs_f64());
                    std::hint::black_box(out);
                }
                best
            });
            eprintln!(
                "{name}: {:.4} ms, {:.1} GMAC/s ({}, {threads} thread(s))",
                best * 1e3,
                macs / best / 1e9,
                simd.name()
            );
        }
    }
}
