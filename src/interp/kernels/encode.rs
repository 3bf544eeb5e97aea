//! PQ encoders: map each row's subvectors to prototype indices.
//! - argmin: nearest prototype by `‖x−p‖² = ‖x‖² − 2x·p + ‖p‖²` (‖x‖² is constant per row and
//!   dropped); the `x·p` products are a small GEMM computed tile by tile, one SIMD lane per row;
//! - tree: `depth` comparisons per codebook (MADDNESS hash tree).
//!
//! Rows come either from a row-major matrix or, for convolutions, straight from the NCHW input
//! (each row is the receptive field of one output position, gathered into a small tile in L1, so
//! the full im2col matrix is never built). Both give the same codes for the same rows.
//!
//! The code is compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at run time. Every
//! product is accumulated with a fused multiply-add (`f32::mul_add`: one rounding on every path,
//! a library call on CPUs without FMA) and every lane accumulates in the same order, so all variants
//! give bit-identical codes. Ties go to the lowest prototype index.

// Lane-indexed loops (`for l in 0..LANES`) are the point here: they vectorise across rows.
#![allow(clippy::needless_range_loop)]

use super::aligned::AlignedF32;
use super::encode_i8::{self, Quant, QuantLanes};
use super::Simd;
use crate::ir::op::Window;
use crate::ir::window::Geometry;
use crate::pq::Subspaces;
/// Images per call from which the tree kernel of convolutions fills its lanes with images on
/// output rows narrower than a vector.
pub(crate) use tree::IMAGES as TREE_IMAGE_LANES;
use tree::{pixel_tree, tree_nhwc, PixelTree};

mod tree;

/// Rows per parallel task.
const BLOCK: usize = 256;
/// Rows encoded together: one SIMD lane per row.
const LANES: usize = 16;

/// Where an encoder's rows come from.
pub enum Rows<'a> {
    /// Row-major `rows × d`.
    Matrix { x: &'a [f32], d: usize },
    /// The implicit im2col rows of an NCHW batch: row `n·oh·ow + y·ow + x` is the receptive field
    /// of output position `(y, x)` of image `n`, ordered `(c, i, j)`.
    Conv {
        x: &'a [f32],
        shape: [usize; 4],
        win: &'a Window,
        geo: Geometry,
    },
    /// The same rows read from a channels-last `[N, H, W, C]` batch (`shape` is NHWC); columns
    /// keep the `(c, i, j)` order, so codes equal those of the NCHW form.
    ConvNhwc {
        x: &'a [f32],
        shape: [usize; 4],
        win: &'a Window,
        geo: Geometry,
    },
}

impl Rows<'_> {
    pub fn d(&self) -> usize {
        match self {
            Rows::Matrix { d, .. } => *d,
            Rows::Conv { shape, win, .. } => shape[1] * win.kernel[0] * win.kernel[1],
            Rows::ConvNhwc { shape, win, .. } => shape[3] * win.kernel[0] * win.kernel[1],
        }
    }
    pub fn count(&self) -> usize {
        match self {
            Rows::Matrix { x, d } => x.len() / d.max(&1),
            Rows::Conv { shape, geo, .. } | Rows::ConvNhwc { shape, geo, .. } => shape[0] * geo.out[0] * geo.out[1],
        }
    }
    /// Row `r` of a channels-last convolution into `out` (the `(c, i, j)` columns of
    /// [`Rows::fill`], zeros where a tap meets padding); false for other rows.
    fn row_nhwc(&self, r: usize, out: &mut Vec<f32>) -> bool {
        let Rows::ConvNhwc { x, shape, win, geo } = self else {
            return false;
        };
        let [_, h, w, c_in] = *shape;
        let [kh, kw] = win.kernel;
        let p = geo.out[0] * geo.out[1];
        let (img, pos) = (r / p, r % p);
        let y0 = ((pos / geo.out[1]) * win.strides[0]) as isize - geo.pads[0] as isize;
        let x0 = ((pos % geo.out[1]) * win.strides[1]) as isize - geo.pads[1] as isize;
        out.clear();
        out.resize(c_in * kh * kw, 0.0);
        for i in 0..kh {
            let iy = y0 + (i * win.dilations[0]) as isize;
            for j in 0..kw {
                let ix = x0 + (j * win.dilations[1]) as isize;
                if iy < 0 || iy >= h as isize || ix < 0 || ix >= w as isize {
                    continue;
                }
                let px = &x[((img * h + iy as usize) * w + ix as usize) * c_in..][..c_in];
                for (c, &v) in px.iter().enumerate() {
                    out[(c * kh + i) * kw + j] = v;
                }
            }
        }
        true
    }

    /// Rows that are contiguous runs of `d` values, `d` apart (a matrix; a channels-last 1×1
    /// convolution of stride 1 without padding, whose rows are its pixels).
    fn contiguous(&self) -> Option<(&[f32], usize)> {
        match self {
            Rows::Matrix { x, d } => Some((x, *d)),
            Rows::ConvNhwc { x, shape, win, geo } => {
                let plain = win.kernel == [1, 1] && win.strides == [1, 1] && geo.pads[..2] == [0, 0];
                (plain && geo.out == [shape[1], shape[2]]).then_some((x, shape[3]))
            }
            Rows::Conv { .. } => None,
        }
    }

    /// Copy columns `cols` of rows `r0 .. r0 + lanes` into `xt[column][lane]`; lanes past
    /// `lanes` repeat the last row. `avx512`: the level in use is AVX-512 (the caller looks
    /// once per block of tiles). Not `#[inline(always)]`: inlined into the dispatch wrappers
    /// it made the AVX2 tiles of a 512-value row 20× slower when they were the portable loop
    /// (ResNet-18 w64's 1×1 layer4 encoders at batch 1: 0.32 ms instead of 0.016; the
    /// hand-written `argmin_tile_avx2` since kept its speed inlined or not, at batch 64).
    fn fill(
        &self,
        avx512: bool,
        r0: usize,
        lanes: usize,
        cols: impl Iterator<Item = usize> + Clone,
        xt: &mut [[f32; LANES]],
    ) {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = avx512;
        if let Some((x, d)) = self.contiguous() {
            #[cfg(target_arch = "x86_64")]
            if avx512 && lanes == LANES && d >= 16 {
                // every column, 16 at a time by an in-register transpose (the few the tree reads
                // come along: they are all in `xt`)
                // SAFETY: AVX-512F detected; rows `r0..r0 + 16` of `d` values lie in `x`.
                unsafe { x86::transpose16_avx512(&x[r0 * d..(r0 + LANES) * d], d, xt) };
                return;
            }
            for l in 0..LANES {
                let r = r0 + l.min(lanes - 1);
                let row = &x[r * d..(r + 1) * d];
                for j in cols.clone() {
                    xt[j][l] = row[j];
                }
            }
            return;
        }
        match self {
            Rows::Matrix { .. } => unreachable!("contiguous"),
            Rows::Conv { x, shape, win, geo } => {
                let [_, c_in, h, w] = *shape;
                let [kh, kw] = win.kernel;
                let p = geo.out[0] * geo.out[1];
                let (mut img, mut y0, mut x0) = ([0usize; LANES], [0isize; LANES], [0isize; LANES]);
                for l in 0..LANES {
                    let r = r0 + l.min(lanes - 1);
                    let pos = r % p;
                    img[l] = r / p;
                    y0[l] = ((pos / geo.out[1]) * win.strides[0]) as isize - geo.pads[0] as isize;
                    x0[l] = ((pos % geo.out[1]) * win.strides[1]) as isize - geo.pads[1] as isize;
                }
                // All lanes on one output row with unit stride: each tile column is a contiguous run.
                let run = lanes == LANES
                    && win.strides[1] == 1
                    && img.iter().all(|&i| i == img[0])
                    && y0.iter().all(|&y| y == y0[0])
                    && x0.windows(2).all(|p| p[1] == p[0] + 1);
                for cj in cols {
                    let (c, i, j) = (cj / (kh * kw), cj / kw % kh, cj % kw);
                    let col = &mut xt[cj];
                    let (dy, dx) = ((i * win.dilations[0]) as isize, (j * win.dilations[1]) as isize);
                    let (iy, ix) = (y0[0] + dy, x0[0] + dx);
                    if run && iy >= 0 && iy < h as isize && ix >= 0 && ix + LANES as isize <= w as isize {
                        let start = ((img[0] * c_in + c) * h + iy as usize) * w + ix as usize;
                        col.copy_from_slice(&x[start..start + LANES]);
                        continue;
                    }
                    for l in 0..LANES {
                        let (iy, ix) = (y0[l] + dy, x0[l] + dx);
                        let inside = iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize;
                        col[l] = if inside {
                            x[((img[l] * c_in + c) * h + iy as usize) * w + ix as usize]
                        } else {
                            0.0
                        };
                    }
                }
            }
            Rows::ConvNhwc { x, shape, win, geo } => {
                let [_, h, w, c_in] = *shape;
                let [kh, kw] = win.kernel;
                let p = geo.out[0] * geo.out[1];
                // Per lane: the image's first element and the window's top-left corner.
                let (mut base, mut y0, mut x0) = ([0usize; LANES], [0isize; LANES], [0isize; LANES]);
                for l in 0..LANES {
                    let r = r0 + l.min(lanes - 1);
                    let pos = r % p;
                    base[l] = r / p * h * w * c_in;
                    y0[l] = ((pos / geo.out[1]) * win.strides[0]) as isize - geo.pads[0] as isize;
                    x0[l] = ((pos % geo.out[1]) * win.strides[1]) as isize - geo.pads[1] as isize;
                }
                for cj in cols {
                    let (c, i, j) = (cj / (kh * kw), cj / kw % kh, cj % kw);
                    let (dy, dx) = ((i * win.dilations[0]) as isize, (j * win.dilations[1]) as isize);
                    let col = &mut xt[cj];
                    for l in 0..LANES {
                        let (iy, ix) = (y0[l] + dy, x0[l] + dx);
                        let inside = iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize;
                        col[l] = if inside {
                            x[base[l] + (iy as usize * w + ix as usize) * c_in + c]
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// The codebooks of one layer.
pub enum Codebooks<'a> {
    /// `protos`: `[c][k][s]`; with `act_scale`, the int8 encoder of [`super::encode_i8`].
    /// `norms` (`[c][k]`): the code is `argmin_k norms[k] − 2 x·p_k`; None: `norms[k] = ‖p_k‖²`
    /// (the nearest prototype). Given, they let the prototypes and norms of a metric
    /// `(x − p)ᵀA(x − p)` be encoded as `A p` and `pᵀAp`.
    Argmin {
        k: usize,
        protos: &'a [f32],
        act_scale: Option<f32>,
        norms: Option<&'a [f32]>,
    },
    /// `dims`: `[c][depth]` split offsets within each subspace; `thresholds`: `[c][2^depth − 1]`
    /// in heap order.
    Tree {
        depth: usize,
        dims: &'a [usize],
        thresholds: &'a [f32],
    },
}

/// Encode every row: `codes` is `rows × c` (one byte per code).
pub fn encode(rows: &Rows, sub: Subspaces, cb: &Codebooks, codes: &mut [u8]) {
    let prepared = prepare(sub, cb, None);
    encode_prepared(rows, &prepared, codes)
}

/// A layer's codebooks in the layouts the kernels read, built once per layer ([`prepare`]) and
/// reused across runs.
pub struct Prepared {
    sub: Subspaces,
    kind: Kind,
    /// The channel-lane layout for channels-last convolutions (see [`ChannelLanes`]).
    lanes: Option<ChannelLanes>,
    /// The pixel-lane tree tables for channels-last convolutions (see [`PixelTree`]).
    pixel_tree: Option<PixelTree>,
    /// The int8 channel-lane layout for channels-last convolutions (see [`QuantLanes`]).
    qlanes: Option<QuantLanes>,
    /// f32 argmin codebooks of 16 prototypes transposed `[c][s][16]` (one prototype per lane),
    /// for encoding rows one at a time where a 16-row tile would mostly repeat its last row
    /// ([`ROWWISE_BELOW`]).
    row_protos: Option<Vec<f32>>,
    /// The same codebooks with one codebook per lane, for rows one at a time at AVX-512 where
    /// the subspaces tile the row exactly (see [`x86::argmin_cols16_avx512`]).
    col_protos: Option<ColProtos>,
}

/// f32 argmin codebooks of 16 prototypes, 16 codebooks to a group, lane `l` of a group holding
/// codebook `16·group + l` (past the last codebook: zeros): prototypes `[group][k][s][16]`,
/// half norms `[group][k][16]`.
struct ColProtos {
    protos: Vec<f32>,
    half: Vec<f32>,
}

impl ColProtos {
    fn new(sub: Subspaces, pt: &[f32], norms: &[f32]) -> ColProtos {
        let (c_n, s) = (sub.count(), sub.s);
        let groups = c_n.div_ceil(16);
        let mut protos = vec![0f32; groups * 16 * s * 16];
        let mut half = vec![0f32; groups * 16 * 16];
        for c in 0..c_n {
            let (g, l) = (c / 16, c % 16);
            for kk in 0..16 {
                for j in 0..s {
                    protos[((g * 16 + kk) * s + j) * 16 + l] = pt[(c * 16 + kk) * s + j];
                }
                half[(g * 16 + kk) * 16 + l] = norms[c * 16 + kk] * 0.5;
            }
        }
        ColProtos { protos, half }
    }
}

enum Kind {
    Argmin {
        k: usize,
        pt: Vec<f32>,
        norms: Vec<f32>,
        /// The int8 encoder, when the codebooks have an input scale.
        quant: Option<Quant>,
    },
    /// `cols`: the row columns the trees compare (the only ones gathered).
    Tree {
        depth: usize,
        dims: Vec<usize>,
        thresholds: Vec<f32>,
        cols: Vec<usize>,
    },
}

/// Channels per lane group of the channel-lane encoder.
const CL: usize = 16;
/// Largest subspace the channel-lane encoder handles (values kept in registers per row).
const CL_MAX_S: usize = 49;

/// Argmin codebooks of a convolution whose codebooks follow the input channels — one codebook
/// per channel (`s = kh·kw`, `families = 1`) or per (channel, kernel row) (`s = kw`,
/// `families = kh`) — laid out so that one SIMD lane serves one channel: with a channels-last
/// input the `CL` channels of a pixel are one contiguous load, nothing is gathered, and the
/// codes of `CL` codebooks come out together.
struct ChannelLanes {
    channels: usize,
    families: usize,
    /// `[family][channel group][s][k][CL]` (missing channels: zeros), 64-byte aligned: the
    /// kernels load it a vector at a time.
    pt: AlignedF32,
    /// `‖p‖² / 2`, `[family][channel group][k][CL]`.
    half_norms: AlignedF32,
}

/// What the caller knows about a convolution's rows: `(channels, kh, kw)` of a channels-last
/// input, so [`prepare`] can build the channel-lane layout when the codebooks allow it.
pub type ChannelHint = (usize, usize, usize);

/// Build the kernels' layout of a layer's codebooks (`hint`: see [`ChannelHint`]).
pub fn prepare(sub: Subspaces, cb: &Codebooks, hint: Option<ChannelHint>) -> Prepared {
    let c_n = sub.count();
    let kind = match cb {
        Codebooks::Argmin {
            k,
            protos,
            act_scale,
            norms,
        } => {
            assert_eq!(protos.len(), c_n * k * sub.s);
            assert!(norms.is_none_or(|n| n.len() == c_n * k));
            Kind::Argmin {
                k: *k,
                pt: protos.to_vec(),
                norms: match norms {
                    Some(n) => n.to_vec(),
                    None => squared_norms(protos, sub.s),
                },
                quant: act_scale.map(|a| Quant::with_norms(protos, *norms, *k, sub.s, a)),
            }
        }
        Codebooks::Tree {
            depth,
            dims,
            thresholds,
        } => {
            assert_eq!(dims.len(), c_n * depth);
            assert_eq!(thresholds.len(), c_n * ((1 << depth) - 1));
            assert!(dims.iter().all(|&d| d < sub.s), "split dimension outside its subspace");
            let mut cols: Vec<usize> = (0..c_n)
                .flat_map(|c| dims[c * depth..(c + 1) * depth].iter().map(move |&d| c * sub.s + d))
                .filter(|&col| col < sub.d)
                .collect();
            cols.sort_unstable();
            cols.dedup();
            Kind::Tree {
                depth: *depth,
                dims: dims.to_vec(),
                thresholds: thresholds.to_vec(),
                cols,
            }
        }
    };
    let lanes = match (&kind, hint) {
        (
            Kind::Argmin {
                k,
                pt,
                norms,
                quant: None,
            },
            Some((channels, kh, kw)),
        ) => channel_lanes(sub, *k, pt, norms, channels, kh, kw),
        _ => None,
    };
    let qlanes = match (&kind, hint) {
        (Kind::Argmin { quant: Some(q), .. }, Some((channels, kh, kw))) => QuantLanes::new(q, sub, channels, [kh, kw]),
        _ => None,
    };
    let pixel_tree = match (&kind, hint) {
        (
            Kind::Tree {
                depth,
                dims,
                thresholds,
                ..
            },
            Some((_, kh, kw)),
        ) => pixel_tree(sub, *depth, dims, thresholds, [kh, kw]),
        _ => None,
    };
    // (only where the row path can run: AVX-512 or AVX2, and not a layer of the channel-lane
    // kernel)
    let row_path = cfg!(target_arch = "x86_64") && Simd::detect() >= Simd::Avx2 && lanes.is_none();
    let row_protos = match &kind {
        Kind::Argmin {
            k: 16, pt, quant: None, ..
        } if row_path => Some(
            (0..c_n)
                .flat_map(|c| (0..sub.s).flat_map(move |j| (0..16).map(move |kk| pt[(c * 16 + kk) * sub.s + j])))
                .collect(),
        ),
        _ => None,
    };
    let col_protos = match &kind {
        Kind::Argmin {
            k: 16,
            pt,
            norms,
            quant: None,
            ..
        } if row_path && Simd::detect() == Simd::Avx512 && sub.d == c_n * sub.s && sub.s <= COLS_MAX_S => {
            Some(ColProtos::new(sub, pt, norms))
        }
        _ => None,
    };
    Prepared {
        sub,
        kind,
        lanes,
        pixel_tree,
        qlanes,
        row_protos,
        col_protos,
    }
}

fn channel_lanes(
    sub: Subspaces,
    k: usize,
    pt: &[f32],
    norms: &[f32],
    channels: usize,
    kh: usize,
    kw: usize,
) -> Option<ChannelLanes> {
    let families = if sub.s == kh * kw {
        1
    } else if sub.s == kw && kh > 1 {
        kh
    } else {
        return None;
    };
    if sub.d != channels * kh * kw || sub.s > CL_MAX_S || !k.is_multiple_of(KB) {
        return None;
    }
    let s = sub.s;
    let groups = channels.div_ceil(CL);
    let mut lpt = AlignedF32::zeros(families * groups * k * s * CL);
    let mut lnorms = AlignedF32::zeros(families * groups * k * CL);
    for f in 0..families {
        for ch in 0..channels {
            let (g, l) = (ch / CL, ch % CL);
            let cb = ch * families + f;
            for kk in 0..k {
                for t in 0..s {
                    lpt[(((f * groups + g) * s + t) * k + kk) * CL + l] = pt[(cb * k + kk) * s + t];
                }
                lnorms[((f * groups + g) * k + kk) * CL + l] = norms[cb * k + kk] * 0.5;
            }
        }
    }
    Some(ChannelLanes {
        channels,
        families,
        pt: lpt,
        half_norms: lnorms,
    })
}

/// Encode every row with codebooks from [`prepare`]: `codes` is `rows × c`.
pub fn encode_prepared(rows: &Rows, prepared: &Prepared, codes: &mut [u8]) {
    let sub = prepared.sub;
    let c_n = sub.count();
    assert_eq!(sub.d, rows.d(), "row length does not match the subspaces");
    assert_eq!(codes.len(), rows.count() * c_n);
    if let (Some(ql), Rows::ConvNhwc { shape, .. }) = (&prepared.qlanes, rows) {
        if ql.channels() == shape[3] {
            return encode_i8::encode_lanes(Simd::detect(), rows, ql, codes);
        }
    }
    if let (Some(cl), Rows::ConvNhwc { shape, .. }) = (&prepared.lanes, rows) {
        if cl.channels == shape[3] {
            let Kind::Argmin { k, .. } = prepared.kind else {
                unreachable!("channel lanes are built for argmin codebooks only")
            };
            // Rows per task: at least 128 Ki multiply-adds (a hand-off costs ~1 µs), and at most
            // 4 tasks per thread. Codes do not depend on the split.
            let per_row = (c_n * k * sub.s).max(1);
            let n_rows = rows.count();
            let per_thread = n_rows.div_ceil(4 * super::team::threads()).max(1);
            let block = (1usize << 17).div_ceil(per_row).max(per_thread).min(n_rows.max(1));
            let level = Simd::detect();
            return super::team::for_chunks(codes, block * c_n, |bi, out| {
                channel_rows(level, rows, cl, k, bi * block, out)
            });
        }
    }
    if let Some(pt) = &prepared.pixel_tree {
        if tree_nhwc(Simd::detect(), rows, pt, c_n, codes) {
            return;
        }
    }
    let job = Job { rows, prepared };
    super::team::for_chunks(codes, BLOCK * c_n, |bi, out| {
        dispatch_simd!(encode_block(&job, bi * BLOCK, out))
    });
}

/// Runs a `#[inline(always)]` kernel call compiled for AVX-512, AVX2 or baseline x86-64 (picked
/// at run time; results are identical, see the module doc).
macro_rules! dispatch_simd {
    ($call:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            match $crate::interp::kernels::Simd::detect() {
                // SAFETY: `Simd::detect` checked AVX-512F, AVX2 and FMA.
                $crate::interp::kernels::Simd::Avx512 => unsafe { avx512(|| $call) },
                // SAFETY: `Simd::detect` checked AVX2 and FMA.
                $crate::interp::kernels::Simd::Avx2 => unsafe { avx2(|| $call) },
                $crate::interp::kernels::Simd::Scalar => $call,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $call
        }
    }};
}
pub(crate) use dispatch_simd;

struct Job<'a> {
    rows: &'a Rows<'a>,
    prepared: &'a Prepared,
}

/// Prototypes per block of the channel-lane kernel: their `KB` running sums stay in registers.
const KB: usize = 16;

/// Channel-lane argmin encoding of rows `r0 ..` of a channels-last convolution (`out`: their
/// codes). For each row, family and group of `CL` channels: load the `s` window values of the
/// `CL` channels (zeros outside the image), accumulate `x·p` for `KB` prototypes at a time, and
/// keep the nearest per lane — the same arithmetic in the same order as [`argmin_tile`].
#[inline(always)]
fn channel_rows(level: Simd, rows: &Rows, cl: &ChannelLanes, k: usize, r0: usize, out: &mut [u8]) {
    let Rows::ConvNhwc { x, shape, win, .. } = rows else {
        unreachable!("channel lanes need channels-last rows")
    };
    let ch = shape[3];
    let [kh, kw] = win.kernel;
    let c_n = cl.channels * cl.families;
    let s = if cl.families == 1 { kh * kw } else { kw };
    let groups = ch.div_ceil(CL);
    #[cfg(target_arch = "x86_64")]
    match level {
        // SAFETY: the level was detected, so the CPU has its instructions; see `pairs`.
        // three rows share each prototype load (24 running sums); on maps narrower than 4
        // pixels, groups of three straddle image rows and images (more taps to cover): two
        Simd::Avx512 if geo_width(rows) >= 4 => {
            return unsafe { rows_n(x86::nearest_n_avx512::<3>, rows, cl, k, r0, out) }
        }
        // SAFETY: as above.
        Simd::Avx512 => return unsafe { rows_n(x86::nearest_n_avx512::<2>, rows, cl, k, r0, out) },
        // SAFETY: as above.
        Simd::Avx2 => return unsafe { rows_n(x86::nearest_n_avx2::<2>, rows, cl, k, r0, out) },
        Simd::Scalar => {}
    }
    let mut xs = [[0f32; CL]; CL_MAX_S];
    let mut taps = [0usize; CL_MAX_S];
    // Channel groups outside, rows inside: one group's prototypes stay in L1 across the rows.
    for f in 0..cl.families {
        for g in 0..groups {
            let c0 = g * CL;
            let width = (ch - c0).min(CL);
            let fg = f * groups + g;
            let pt = &cl.pt[fg * s * k * CL..(fg + 1) * s * k * CL];
            let hn = &cl.half_norms[fg * k * CL..(fg + 1) * k * CL];
            for (ri, codes) in out.chunks_mut(c_n).enumerate() {
                let mut offs = [None; CL_MAX_S];
                window_taps(rows, cl.families, f, r0 + ri, &mut offs[..s]);
                // taps outside the image contribute exact zeros: skipped
                let mut n_t = 0;
                for (t, o) in offs[..s].iter().enumerate() {
                    let Some(o) = *o else { continue };
                    let at = o + c0;
                    let v = &mut xs[n_t];
                    if width == CL {
                        *v = x[at..at + CL].try_into().expect("CL values");
                    } else {
                        *v = [0.0; CL];
                        v[..width].copy_from_slice(&x[at..at + width]);
                    }
                    taps[n_t] = t;
                    n_t += 1;
                }
                let best = nearest_in_lanes_at(level, &xs[..n_t], &taps[..n_t], pt, hn, k);
                for l in 0..width {
                    codes[(c0 + l) * cl.families + f] = best[l];
                }
            }
        }
    }
}

/// The output width of conv rows (1 for a matrix).
fn geo_width(rows: &Rows) -> usize {
    match rows {
        Rows::Conv { geo, .. } | Rows::ConvNhwc { geo, .. } => geo.out[1],
        Rows::Matrix { .. } => 1,
    }
}

/// The windows of channels-last conv rows in row order, family `f` (see [`ChannelLanes`]):
/// one division to find the first row, then counters.
struct RowWindows {
    /// Per tap of the family: its kernel row and column, and its offset from tap (0, 0).
    taps: Vec<(usize, usize, isize)>,
    hw: [usize; 2],
    ch: usize,
    out: [usize; 2],
    strides: [usize; 2],
    dil: [usize; 2],
    pads: [usize; 2],
    kernel: [usize; 2],
}

/// An output position `(image, y, x)`.
struct RowPos([usize; 3]);

/// One row's window: the offset of tap (0, 0) (outside the image at the border) and the kernel
/// rows and columns inside the image.
#[derive(Clone, Copy)]
struct RowWindow {
    base: isize,
    rows: (usize, usize),
    cols: (usize, usize),
}

impl RowWindow {
    fn inside(&self, i: usize, j: usize) -> bool {
        (self.rows.0..self.rows.1).contains(&i) && (self.cols.0..self.cols.1).contains(&j)
    }
    /// The offset of the tap `o` floats from tap (0, 0), for a tap inside the image.
    fn at(&self, o: isize) -> usize {
        (self.base + o) as usize
    }
}

impl RowWindows {
    fn new(rows: &Rows, families: usize, f: usize) -> RowWindows {
        let Rows::ConvNhwc { shape, win, geo, .. } = rows else {
            unreachable!("windows of channels-last rows")
        };
        let [_, h, w, ch] = *shape;
        let [kh, kw] = win.kernel;
        let [dh, dw] = win.dilations;
        let tap = |i: usize, j: usize| (i, j, ((i * dh * w + j * dw) * ch) as isize);
        let taps = match families {
            1 => (0..kh * kw).map(|t| tap(t / kw, t % kw)).collect(),
            _ => (0..kw).map(|j| tap(f, j)).collect(),
        };
        RowWindows {
            taps,
            hw: [h, w],
            ch,
            out: geo.out,
            strides: win.strides,
            dil: win.dilations,
            pads: [geo.pads[0], geo.pads[1]],
            kernel: win.kernel,
        }
    }
    fn start(&self, r: usize) -> RowPos {
        let p = self.out[0] * self.out[1];
        RowPos([r / p, r % p / self.out[1], r % self.out[1]])
    }
    fn advance(&self, pos: &mut RowPos) {
        let [img, y, x] = &mut pos.0;
        *x += 1;
        if *x == self.out[1] {
            *x = 0;
            *y += 1;
            if *y == self.out[0] {
                *y = 0;
                *img += 1;
            }
        }
    }
    fn window(&self, pos: &RowPos) -> RowWindow {
        let [img, y, x] = pos.0;
        // kernel indices `i` with `0 ≤ c0 + i·d < size`
        let span = |c0: isize, d: usize, size: usize, k: usize| {
            let d = d as isize;
            let lo = if c0 >= 0 { 0 } else { (-c0 + d - 1) / d };
            let hi = if (size as isize) > c0 {
                (size as isize - c0 + d - 1) / d
            } else {
                0
            };
            (lo.min(k as isize) as usize, hi.clamp(0, k as isize) as usize)
        };
        let y0 = (y * self.strides[0]) as isize - self.pads[0] as isize;
        let x0 = (x * self.strides[1]) as isize - self.pads[1] as isize;
        let [h, w] = self.hw;
        RowWindow {
            base: (((img * h) as isize + y0) * w as isize + x0) * self.ch as isize,
            rows: span(y0, self.dil[0], h, self.kernel[0]),
            cols: span(x0, self.dil[1], w, self.kernel[1]),
        }
    }
}

/// For row `r` of channels-last conv rows and family `f` (see [`ChannelLanes`]): the offset of
/// each window tap's pixel (its channel 0) in the image, `None` for taps outside it.
fn window_taps(rows: &Rows, families: usize, f: usize, r: usize, offs: &mut [Option<usize>]) {
    let Rows::ConvNhwc { shape, win, geo, .. } = rows else {
        unreachable!("window taps of channels-last rows")
    };
    let [_, h, w, ch] = *shape;
    let kw = win.kernel[1];
    let p = geo.out[0] * geo.out[1];
    let (img, pos) = (r / p, r % p);
    let y0 = ((pos / geo.out[1]) * win.strides[0]) as isize - geo.pads[0] as isize;
    let x0 = ((pos % geo.out[1]) * win.strides[1]) as isize - geo.pads[1] as isize;
    for (t, o) in offs.iter_mut().enumerate() {
        let (i, j) = if families == 1 { (t / kw, t % kw) } else { (f, t) };
        let iy = y0 + (i * win.dilations[0]) as isize;
        let ix = x0 + (j * win.dilations[1]) as isize;
        let inside = iy >= 0 && iy < h as isize && ix >= 0 && ix < w as isize;
        *o = inside.then(|| ((img * h + iy as usize) * w + ix as usize) * ch);
    }
}

/// One window tap of `N` rows as [`x86::nearest_n_avx512`] reads it: the tap's index, and per
/// row the offset of its pixel (channel 0) and a lane mask (`0` where the tap is outside the
/// image: the row reads zeros there).
#[derive(Clone, Copy)]
struct RowsTap<const N: usize> {
    t: u32,
    mask: [u16; N],
    off: [usize; N],
}

/// A channel-lane kernel for `N` rows at once ([`x86::nearest_n_avx512`],
/// [`x86::nearest_n_avx2`]).
#[cfg(target_arch = "x86_64")]
type NearestN<const N: usize> = unsafe fn(&[f32], &[RowsTap<N>], u16, &[f32], &[f32], usize) -> [[u8; CL]; N];

/// [`channel_rows`] with a SIMD kernel for `N` rows, which reads each tap's channels straight
/// from the image and shares every prototype load between the rows. A group of rows' taps is
/// listed once per chunk of rows and reused for every channel group; taps outside the image for
/// all its rows are left out (they contribute exact zeros). Same codes.
///
/// # Safety
/// The CPU must have the instructions `nearest` is compiled for.
#[cfg(target_arch = "x86_64")]
unsafe fn rows_n<const N: usize>(
    nearest: NearestN<N>,
    rows: &Rows,
    cl: &ChannelLanes,
    k: usize,
    r0: usize,
    out: &mut [u8],
) {
    let Rows::ConvNhwc { x, shape, win, .. } = rows else {
        unreachable!("channel lanes need channels-last rows")
    };
    let ch = shape[3];
    let [kh, kw] = win.kernel;
    let c_n = cl.channels * cl.families;
    let s = if cl.families == 1 { kh * kw } else { kw };
    let groups = ch.div_ceil(CL);
    let n_rows = out.len() / c_n.max(1);
    const CHUNK: usize = 32;
    // the chunk's groups of N rows: their taps, and where each group's list starts
    let mut taps: Vec<RowsTap<N>> = Vec::with_capacity(CHUNK.div_ceil(N) * s);
    let mut starts = Vec::with_capacity(CHUNK.div_ceil(N) + 1);
    for f in 0..cl.families {
        let windows = RowWindows::new(rows, cl.families, f);
        let mut pos = windows.start(r0);
        let mut wins = [windows.window(&pos); CHUNK];
        // Rows in chunks, channel groups inside: a chunk's taps are listed once and one
        // group's prototypes stay in L1 across the chunk.
        for q0 in (0..n_rows).step_by(CHUNK) {
            let qn = CHUNK.min(n_rows - q0);
            for w in wins.iter_mut().take(qn) {
                *w = windows.window(&pos);
                windows.advance(&mut pos);
            }
            taps.clear();
            starts.clear();
            for ri in (0..qn).step_by(N) {
                // a last, partial group repeats its last row
                let ws: [&RowWindow; N] = std::array::from_fn(|q| &wins[(ri + q).min(qn - 1)]);
                starts.push(taps.len());
                for (t, &(i, j, o)) in windows.taps.iter().enumerate() {
                    let inside: [bool; N] = std::array::from_fn(|q| ws[q].inside(i, j));
                    if inside.contains(&true) {
                        taps.push(RowsTap {
                            t: t as u32,
                            mask: inside.map(|v| if v { u16::MAX } else { 0 }),
                            off: std::array::from_fn(|q| if inside[q] { ws[q].at(o) } else { 0 }),
                        });
                    }
                }
            }
            starts.push(taps.len());
            for g in 0..groups {
                let c0 = g * CL;
                let width = (ch - c0).min(CL);
                let mask = if width == CL { u16::MAX } else { (1u16 << width) - 1 };
                let fg = f * groups + g;
                let pt = &cl.pt[fg * s * k * CL..(fg + 1) * s * k * CL];
                let hn = &cl.half_norms[fg * k * CL..(fg + 1) * k * CL];
                let base = &x[c0..];
                for (pi, ri) in (0..qn).step_by(N).enumerate() {
                    let list = &taps[starts[pi]..starts[pi + 1]];
                    // SAFETY: the caller guarantees the instructions; offsets and masks come
                    // from the rows' windows (inside the image), `k` is a multiple of KB.
                    let codes = unsafe { nearest(base, list, mask, pt, hn, k) };
                    for (q, code) in codes.iter().enumerate().take(qn - ri) {
                        let ro = (q0 + ri + q) * c_n;
                        if cl.families == 1 {
                            // one codebook per channel: the group's codes are contiguous
                            out[ro + c0..ro + c0 + width].copy_from_slice(&code[..width]);
                        } else {
                            for l in 0..width {
                                out[ro + (c0 + l) * cl.families + f] = code[l];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Per lane, the index of the prototype minimising `‖p‖²/2 − x·p` (ties: lowest index), at a
/// given SIMD level. `xs[i]` holds the lanes' values of window tap `taps[i]` (taps left out
/// contribute nothing); `pt`: `[s][k][CL]`, `hn`: `[k][CL]`; `k` a multiple of `KB`. The SIMD
/// versions compute the same fused multiply-adds in the same order and compare prototypes in
/// increasing order, so every level returns the same codes (tests compare them).
#[inline(always)]
fn nearest_in_lanes_at(level: Simd, xs: &[[f32; CL]], taps: &[usize], pt: &[f32], hn: &[f32], k: usize) -> [u8; CL] {
    let s = pt.len() / (k * CL).max(1);
    assert!(xs.len() == taps.len() && taps.iter().all(|&t| t < s));
    assert!(hn.len() >= k * CL && k.is_multiple_of(KB) && k <= 256);
    assert!(level.supported(), "SIMD level {level:?} not supported by this CPU");
    #[cfg(target_arch = "x86_64")]
    match level {
        // SAFETY: the level is supported (asserted); the asserts above bound every load.
        Simd::Avx512 => return unsafe { x86::nearest_avx512(xs, taps, pt, hn, k) },
        // SAFETY: as above.
        Simd::Avx2 => return unsafe { x86::nearest_avx2(xs, taps, pt, hn, k) },
        Simd::Scalar => {}
    }
    let mut best_d = [f32::INFINITY; CL];
    let mut best_k = [0u8; CL];
    for kk in 0..k {
        let mut acc = [0f32; CL];
        for (&t, xv) in taps.iter().zip(xs) {
            let row = &pt[(t * k + kk) * CL..(t * k + kk + 1) * CL];
            for l in 0..CL {
                acc[l] = xv[l].mul_add(row[l], acc[l]);
            }
        }
        let h = &hn[kk * CL..(kk + 1) * CL];
        for l in 0..CL {
            let dist = h[l] - acc[l];
            if dist < best_d[l] {
                best_d[l] = dist;
                best_k[l] = kk as u8;
            }
        }
    }
    best_k
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// [`super::tree_tile`] of codebooks `cs` with the 16 lanes in one vector: each level
    /// gathers the lanes' thresholds and compares (`x > t`, false for NaN, as the scalar walk).
    ///
    /// # Safety
    /// AVX-512F; `thr` holds the `2^depth - 1` thresholds and `dims` the `depth` dimensions of
    /// every codebook in `cs`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tree_tiles_avx512<const G: usize>(
        xt: &[[f32; LANES]],
        sub: Subspaces,
        cs: [usize; G],
        depth: usize,
        dims: &[usize],
        thr: &[f32],
    ) -> [[u32; LANES]; G] {
        let nodes = (1 << depth) - 1;
        let mut idx = [_mm512_setzero_si512(); G];
        for lev in 0..depth {
            for (i, &c) in idx.iter_mut().zip(&cs) {
                let col = c * sub.s + dims[c * depth + lev];
                let x = if col < sub.d {
                    _mm512_loadu_ps(xt[col].as_ptr())
                } else {
                    _mm512_setzero_ps()
                };
                let base = thr.as_ptr().add(c * nodes + (1 << lev) - 1);
                // a level of at most 16 nodes from one vector (its 16 floats lie inside the
                // codebook's thresholds when the tree has 31 nodes or more), else a gather
                let t = if lev <= 4 && depth >= 5 {
                    _mm512_permutexvar_ps(*i, _mm512_loadu_ps(base))
                } else {
                    _mm512_i32gather_ps::<4>(*i, base.cast())
                };
                let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, t);
                *i = crate::interp::kernels::tree_step(*i, gt);
            }
        }
        idx.map(|i| {
            let mut out = [0u32; LANES];
            _mm512_storeu_si512(out.as_mut_ptr().cast(), i);
            out
        })
    }

    /// [`tree_tiles_avx512`] in two 8-lane halves.
    ///
    /// # Safety
    /// AVX2; as [`tree_tiles_avx512`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tree_tiles_avx2<const G: usize>(
        xt: &[[f32; LANES]],
        sub: Subspaces,
        cs: [usize; G],
        depth: usize,
        dims: &[usize],
        thr: &[f32],
    ) -> [[u32; LANES]; G] {
        let nodes = (1 << depth) - 1;
        let mut idx = [[_mm256_setzero_si256(); 2]; G];
        for lev in 0..depth {
            for (ic, &c) in idx.iter_mut().zip(&cs) {
                let col = c * sub.s + dims[c * depth + lev];
                let base = thr.as_ptr().add(c * nodes + (1 << lev) - 1);
                // a level of at most 32 nodes from its vectors of 8 (permutes, blends on the
                // index's bits 3 and 4) when they lie inside the codebook's thresholds, else a
                // gather (slower on Zen 3: the K = 256 ViT's encoding took 6.1 ms at batch 64 with
                // every level gathered, 3.3 ms so)
                let vecs = (1usize << lev).div_ceil(8);
                let small = vecs <= 4 && (1 << lev) - 1 + 8 * vecs <= nodes;
                let level: [__m256; 4] = std::array::from_fn(|v| {
                    if small && v < vecs {
                        _mm256_loadu_ps(base.add(8 * v))
                    } else {
                        _mm256_setzero_ps()
                    }
                });
                for (h, i) in ic.iter_mut().enumerate() {
                    let x = if col < sub.d {
                        _mm256_loadu_ps(xt[col].as_ptr().add(8 * h))
                    } else {
                        _mm256_setzero_ps()
                    };
                    let t = if small {
                        let pick = |v: usize| _mm256_permutevar8x32_ps(level[v], *i);
                        let bit3 = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(*i));
                        match vecs {
                            1 => pick(0),
                            2 => _mm256_blendv_ps(pick(0), pick(1), bit3),
                            _ => {
                                let bit4 = _mm256_castsi256_ps(_mm256_slli_epi32::<27>(*i));
                                let lo = _mm256_blendv_ps(pick(0), pick(1), bit3);
                                let hi = _mm256_blendv_ps(pick(2), pick(3), bit3);
                                _mm256_blendv_ps(lo, hi, bit4)
                            }
                        }
                    } else {
                        _mm256_i32gather_ps::<4>(base, *i)
                    };
                    // all ones where x > t: subtracting it adds the bit
                    let gt = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(x, t));
                    *i = _mm256_sub_epi32(_mm256_add_epi32(*i, *i), gt);
                }
            }
        }
        idx.map(|[a, b]| {
            let mut out = [0u32; LANES];
            _mm256_storeu_si256(out.as_mut_ptr().cast(), a);
            _mm256_storeu_si256(out.as_mut_ptr().add(8).cast(), b);
            out
        })
    }

    /// [`super::argmin_tile`] for one row, the 16 prototypes of codebook `c` in the lanes
    /// (`pr`: `[c][s][16]`): per prototype the same chain of multiply-adds over the codebook's
    /// columns and the same `‖p‖²/2 − x·p`; the first lane holding the smallest distance below
    /// +∞ (NaN never counts) is the code the tile's strict `<` in prototype order keeps, 0 when
    /// there is none.
    ///
    /// # Safety
    /// AVX-512F; `row` holds the columns of `sub.range(c)`, `pr` `16·s` values per codebook
    /// up to `c`, `norms` 16 per codebook up to `c`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn argmin_row16_avx512(
        row: &[f32],
        sub: super::Subspaces,
        c: usize,
        pr: &[f32],
        norms: &[f32],
    ) -> u8 {
        let p = pr[c * sub.s * 16..(c + 1) * sub.s * 16].as_ptr();
        let mut acc = _mm512_setzero_ps();
        for (j, &x) in row[sub.range(c)].iter().enumerate() {
            acc = _mm512_fmadd_ps(_mm512_set1_ps(x), _mm512_loadu_ps(p.add(16 * j)), acc);
        }
        let half = _mm512_mul_ps(
            _mm512_loadu_ps(norms[c * 16..(c + 1) * 16].as_ptr()),
            _mm512_set1_ps(0.5),
        );
        let dist = _mm512_sub_ps(half, acc);
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(dist, _mm512_set1_ps(f32::INFINITY));
        if below == 0 {
            return 0;
        }
        let min = _mm512_mask_reduce_min_ps(below, dist);
        let at = _mm512_mask_cmp_ps_mask::<_CMP_EQ_OQ>(below, dist, _mm512_set1_ps(min));
        at.trailing_zeros() as u8
    }

    /// [`argmin_row16_avx512`] for 16 codebooks at a time, one per lane (a deep 1×1 layer at
    /// batch 1 has hundreds of codebooks of a few values, and one codebook per call spends its
    /// time in each call's reduction: ResNet-18 w64's layer-4 rows of 128 codebooks of 4 values
    /// took 1.0-1.4 µs that way and 0.66-0.84 µs this way, one thread on Zen 4): per lane the
    /// same multiply-adds in the same order, the same half norms and strict comparisons in
    /// prototype order as [`super::argmin_tile`], so the same codes.
    ///
    /// # Safety
    /// AVX-512F; `cp` built for `sub`, whose `codes.len()` subspaces tile `row` exactly
    /// (`row.len() >= codes.len() · s`), `s <= COLS_MAX_S`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn argmin_cols16_avx512(
        row: &[f32],
        sub: super::Subspaces,
        cp: &super::ColProtos,
        codes: &mut [u8],
    ) {
        let s = sub.s;
        for (g, out) in codes.chunks_mut(16).enumerate() {
            // the row's values transposed to lanes (a gather per value was slower)
            let mut xt = [[0f32; 16]; super::COLS_MAX_S];
            for (l, v) in row[g * 16 * s..][..out.len() * s].chunks_exact(s).enumerate() {
                for (j, &v) in v.iter().enumerate() {
                    xt[j][l] = v;
                }
            }
            let mut x = [_mm512_setzero_ps(); super::COLS_MAX_S];
            for (x, xt) in x.iter_mut().zip(&xt).take(s) {
                *x = _mm512_loadu_ps(xt.as_ptr());
            }
            let p = cp.protos[g * 16 * s * 16..(g + 1) * 16 * s * 16].as_ptr();
            let h = cp.half[g * 256..(g + 1) * 256].as_ptr();
            let mut best_d = _mm512_set1_ps(f32::INFINITY);
            let mut best_k = _mm512_setzero_si512();
            // 8 prototypes at a time: 8 independent chains of multiply-adds
            for kb in (0..16).step_by(8) {
                let mut acc = [_mm512_setzero_ps(); 8];
                for (j, x) in x.iter().enumerate().take(s) {
                    for (q, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(*x, _mm512_loadu_ps(p.add(((kb + q) * s + j) * 16)), *a);
                    }
                }
                for (q, a) in acc.into_iter().enumerate() {
                    let dist = _mm512_sub_ps(_mm512_loadu_ps(h.add((kb + q) * 16)), a);
                    let better = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(dist, best_d);
                    best_d = _mm512_mask_mov_ps(best_d, better, dist);
                    best_k = _mm512_mask_mov_epi32(best_k, better, _mm512_set1_epi32((kb + q) as i32));
                }
            }
            let mut b = [0u8; 16];
            _mm_storeu_si128(b.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(best_k));
            out.copy_from_slice(&b[..out.len()]);
        }
    }

    /// [`argmin_row16_avx512`] in two 8-lane halves (prototypes 0-7 and 8-15): the same
    /// multiply-add chains, half norms and choice (NaN distances count as +∞; the first lane
    /// equal to the minimum wins; 0 when none is below +∞).
    ///
    /// # Safety
    /// AVX2 and FMA; as [`argmin_row16_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn argmin_row16_avx2(
        row: &[f32],
        sub: super::Subspaces,
        c: usize,
        pr: &[f32],
        norms: &[f32],
    ) -> u8 {
        let p = pr[c * sub.s * 16..(c + 1) * sub.s * 16].as_ptr();
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (j, &x) in row[sub.range(c)].iter().enumerate() {
            let x = _mm256_set1_ps(x);
            lo = _mm256_fmadd_ps(x, _mm256_loadu_ps(p.add(16 * j)), lo);
            hi = _mm256_fmadd_ps(x, _mm256_loadu_ps(p.add(16 * j + 8)), hi);
        }
        let n = norms[c * 16..(c + 1) * 16].as_ptr();
        let half = _mm256_set1_ps(0.5);
        let inf = _mm256_set1_ps(f32::INFINITY);
        let dist = [(lo, 0), (hi, 8)].map(|(acc, o)| {
            let d = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(n.add(o)), half), acc);
            // (NaN becomes +∞: `min` returns its second operand when either is NaN)
            _mm256_min_ps(d, inf)
        });
        let min = _mm256_min_ps(dist[0], dist[1]);
        let min = _mm256_min_ps(min, _mm256_permute2f128_ps::<1>(min, min));
        let min = _mm256_min_ps(min, _mm256_permute_ps::<0b01_00_11_10>(min));
        let min = _mm256_min_ps(min, _mm256_permute_ps::<0b10_11_00_01>(min));
        if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(min, inf)) == 0 {
            return 0;
        }
        let at = |d: __m256| _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(d, min)) as u32;
        (at(dist[0]) | at(dist[1]) << 8).trailing_zeros() as u8
    }

    /// [`super::argmin_tile`] with the 16 lanes in one vector (LLVM vectorised the portable
    /// loop poorly, half of it in scalar and 128-bit operations): the same products, sums,
    /// half norms and strict comparisons in the same order, so the same codes.
    ///
    /// # Safety
    /// AVX-512F; `xt` holds the columns of codebook `c`, `protos` and `norms` its `k` prototypes.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn argmin_tile_avx512(
        xt: &[[f32; 16]],
        sub: super::Subspaces,
        c: usize,
        k: usize,
        protos: &[f32],
        norms: &[f32],
    ) -> [u32; 16] {
        let range = sub.range(c);
        let cols = &xt[range.clone()];
        let mut best_d = _mm512_set1_ps(f32::INFINITY);
        let mut best_k = _mm512_setzero_si512();
        let p = |kk: usize| protos[(c * k + kk) * sub.s..].as_ptr();
        let mut kk = 0;
        // 8 prototypes at a time: 8 independent chains of multiply-adds (one prototype's is
        // only `s` long and would wait on its own latency), compared in index order after
        while kk + 8 <= k {
            let mut acc = [_mm512_setzero_ps(); 8];
            for (j, col) in cols.iter().enumerate() {
                let x = _mm512_loadu_ps(col.as_ptr());
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(x, _mm512_set1_ps(*p(kk + q).add(j)), *a);
                }
            }
            for (q, a) in acc.into_iter().enumerate() {
                let dist = _mm512_sub_ps(_mm512_set1_ps(norms[c * k + kk + q] * 0.5), a);
                let better = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(dist, best_d);
                best_d = _mm512_mask_mov_ps(best_d, better, dist);
                best_k = _mm512_mask_mov_epi32(best_k, better, _mm512_set1_epi32((kk + q) as i32));
            }
            kk += 8;
        }
        for kk in kk..k {
            let mut acc = _mm512_setzero_ps();
            for (j, col) in cols.iter().enumerate() {
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(col.as_ptr()), _mm512_set1_ps(*p(kk).add(j)), acc);
            }
            let dist = _mm512_sub_ps(_mm512_set1_ps(norms[c * k + kk] * 0.5), acc);
            let better = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(dist, best_d);
            best_d = _mm512_mask_mov_ps(best_d, better, dist);
            best_k = _mm512_mask_mov_epi32(best_k, better, _mm512_set1_epi32(kk as i32));
        }
        let mut out = [0u32; 16];
        _mm512_storeu_si512(out.as_mut_ptr().cast(), best_k);
        out
    }

    /// The sizes [`argmin_tiles16_avx512`] and [`argmin_tiles16_avx2`] read and write.
    fn tiles16_fit(xt: &[[f32; 16]], c_n: usize, s: usize, protos: &[f32], norms: &[f32], rows: usize, out: &[u8]) {
        assert!(xt.len() >= c_n * s && protos.len() >= c_n * 16 * s && norms.len() >= c_n * 16);
        assert!(rows <= 16 && out.len() >= rows * c_n);
    }

    /// [`super::argmin_tile`] of every codebook at once, for 16 prototypes of `S` values per
    /// codebook (`c_n` codebooks tiling the row): the argmin in four chains of four prototypes
    /// (chain `q`: prototypes `4q .. 4q + 4` in order), advanced together one prototype per
    /// step (four independent sums per step, the same products and sums in the same order as
    /// the portable tile), then merged pairwise, the later chain taken only when strictly
    /// nearer. A chain keeps the first of its nearest prototypes below +∞ (NaN and +∞ distances
    /// never win, −∞ does, as in the sequential scan), so the merges give the sequential
    /// scan's code; its chains are four compares long instead of sixteen. The codes
    /// of 16 codebooks are transposed in registers and stored a row's run at a time (`out`:
    /// `rows` rows of `c_n` codes). On ResNet-18 w64's 1×1 `layer4` encoders (16 rows, 128
    /// codebooks of 4 values) one codebook per call took about 9 µs.
    ///
    /// # Safety
    /// AVX-512F; `xt` holds `c_n·S` columns, `protos` `c_n·16·S` values, `norms` `c_n·16`;
    /// `out` holds `rows·c_n` bytes, `rows ≤ 16`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn argmin_tiles16_avx512<const S: usize>(
        xt: &[[f32; 16]],
        c_n: usize,
        protos: &[f32],
        norms: &[f32],
        rows: usize,
        out: &mut [u8],
    ) {
        tiles16_fit(xt, c_n, S, protos, norms, rows, out);
        let inf = _mm512_set1_ps(f32::INFINITY);
        let (xp, pp, np) = (xt.as_ptr(), protos.as_ptr(), norms.as_ptr());
        let mut c0 = 0;
        while c0 < c_n {
            let cn = 16.min(c_n - c0);
            let mut codes = [_mm512_setzero_si512(); 16];
            for (q, code) in codes.iter_mut().enumerate().take(cn) {
                let c = c0 + q;
                let x: [__m512; S] = std::array::from_fn(|j| _mm512_loadu_ps(xp.add(c * S + j).cast()));
                let mut best = [(inf, _mm512_setzero_si512()); 4];
                for step in 0..4 {
                    for (chain, (best_d, best_k)) in best.iter_mut().enumerate() {
                        let kk = 4 * chain + step;
                        let p = pp.add((c * 16 + kk) * S);
                        let mut acc = _mm512_setzero_ps();
                        for (j, x) in x.iter().enumerate() {
                            acc = _mm512_fmadd_ps(*x, _mm512_set1_ps(*p.add(j)), acc);
                        }
                        let d = _mm512_sub_ps(_mm512_set1_ps(*np.add(c * 16 + kk) * 0.5), acc);
                        let better = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(d, *best_d);
                        *best_d = _mm512_mask_mov_ps(*best_d, better, d);
                        *best_k = _mm512_mask_mov_epi32(*best_k, better, _mm512_set1_epi32(kk as i32));
                    }
                }
                let merge = |(ad, ak): (__m512, __m512i), (bd, bk): (__m512, __m512i)| {
                    let later = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(bd, ad);
                    (_mm512_mask_mov_ps(ad, later, bd), _mm512_mask_mov_epi32(ak, later, bk))
                };
                *code = merge(merge(best[0], best[1]), merge(best[2], best[3])).1;
            }
            let codes = crate::interp::kernels::transpose16_epi32(codes);
            let omask = ((1u32 << cn) - 1) as __mmask16;
            for (l, code) in codes.iter().enumerate().take(rows) {
                _mm512_mask_cvtepi32_storeu_epi8(out.as_mut_ptr().add(l * c_n + c0).cast(), omask, *code);
            }
            c0 += cn;
        }
    }

    /// [`super::argmin_tile`] at AVX2, written out as [`argmin_tile_avx512`] is (the portable
    /// loop's vectorisation at AVX2 depended on what was inlined around it: 5-20x slower after
    /// unrelated changes, see `Rows::fill`): the 16 lanes in two 8-lane halves, 4 prototypes at
    /// a time (8 running sums, 2 row values and a broadcast in the 16 registers), the same
    /// products, sums, half norms and strict comparisons in prototype order, so the same codes.
    ///
    /// # Safety
    /// AVX2 and FMA; `xt` holds the columns of codebook `c`, `protos` and `norms` its `k`
    /// prototypes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn argmin_tile_avx2(
        xt: &[[f32; 16]],
        sub: super::Subspaces,
        c: usize,
        k: usize,
        protos: &[f32],
        norms: &[f32],
    ) -> [u32; 16] {
        let cols = &xt[sub.range(c)];
        let mut best_d = [_mm256_set1_ps(f32::INFINITY); 2];
        let mut best_k = [_mm256_setzero_ps(); 2];
        let p = |kk: usize| protos[(c * k + kk) * sub.s..].as_ptr();
        let keep = |best_d: &mut [__m256; 2], best_k: &mut [__m256; 2], acc: [__m256; 2], kk: usize| {
            let half = _mm256_set1_ps(norms[c * k + kk] * 0.5);
            let code = _mm256_castsi256_ps(_mm256_set1_epi32(kk as i32));
            for h in 0..2 {
                let dist = _mm256_sub_ps(half, acc[h]);
                let better = _mm256_cmp_ps::<_CMP_LT_OQ>(dist, best_d[h]);
                best_d[h] = _mm256_blendv_ps(best_d[h], dist, better);
                best_k[h] = _mm256_blendv_ps(best_k[h], code, better);
            }
        };
        let mut kk = 0;
        while kk + 4 <= k {
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            for (j, col) in cols.iter().enumerate() {
                let x = [_mm256_loadu_ps(col.as_ptr()), _mm256_loadu_ps(col.as_ptr().add(8))];
                for (q, a) in acc.iter_mut().enumerate() {
                    let pj = _mm256_broadcast_ss(&*p(kk + q).add(j));
                    a[0] = _mm256_fmadd_ps(x[0], pj, a[0]);
                    a[1] = _mm256_fmadd_ps(x[1], pj, a[1]);
                }
            }
            for (q, a) in acc.into_iter().enumerate() {
                keep(&mut best_d, &mut best_k, a, kk + q);
            }
            kk += 4;
        }
        for kk in kk..k {
            let mut a = [_mm256_setzero_ps(); 2];
            for (j, col) in cols.iter().enumerate() {
                let pj = _mm256_broadcast_ss(&*p(kk).add(j));
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(col.as_ptr()), pj, a[0]);
                a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(col.as_ptr().add(8)), pj, a[1]);
            }
            keep(&mut best_d, &mut best_k, a, kk);
        }
        let mut out = [0u32; 16];
        _mm256_storeu_ps(out.as_mut_ptr().cast(), best_k[0]);
        _mm256_storeu_ps(out.as_mut_ptr().add(8).cast(), best_k[1]);
        out
    }

    /// [`argmin_tiles16_avx512`] at AVX2: each codebook's 16 lanes in two 8-lane halves, the
    /// same sums, chains and merges (so the same codes), the codes stored a byte at a time.
    ///
    /// # Safety
    /// AVX2 and FMA; as [`argmin_tiles16_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn argmin_tiles16_avx2<const S: usize>(
        xt: &[[f32; 16]],
        c_n: usize,
        protos: &[f32],
        norms: &[f32],
        rows: usize,
        out: &mut [u8],
    ) {
        tiles16_fit(xt, c_n, S, protos, norms, rows, out);
        let (xp, pp, np) = (xt.as_ptr(), protos.as_ptr(), norms.as_ptr());
        for c in 0..c_n {
            let mut code = [0u32; 16];
            for h in 0..2 {
                let x = |j: usize| _mm256_loadu_ps(xp.add(c * S + j).cast::<f32>().add(8 * h));
                let mut best = [(_mm256_set1_ps(f32::INFINITY), _mm256_setzero_ps()); 4];
                for step in 0..4 {
                    for (chain, (best_d, best_k)) in best.iter_mut().enumerate() {
                        let kk = 4 * chain + step;
                        let p = pp.add((c * 16 + kk) * S);
                        let mut acc = _mm256_setzero_ps();
                        for j in 0..S {
                            acc = _mm256_fmadd_ps(x(j), _mm256_broadcast_ss(&*p.add(j)), acc);
                        }
                        let d = _mm256_sub_ps(_mm256_set1_ps(*np.add(c * 16 + kk) * 0.5), acc);
                        let better = _mm256_cmp_ps::<_CMP_LT_OQ>(d, *best_d);
                        *best_d = _mm256_blendv_ps(*best_d, d, better);
                        *best_k = _mm256_blendv_ps(*best_k, _mm256_castsi256_ps(_mm256_set1_epi32(kk as i32)), better);
                    }
                }
                let merge = |(ad, ak): (__m256, __m256), (bd, bk): (__m256, __m256)| {
                    let later = _mm256_cmp_ps::<_CMP_LT_OQ>(bd, ad);
                    (_mm256_blendv_ps(ad, bd, later), _mm256_blendv_ps(ak, bk, later))
                };
                let (_, k) = merge(merge(best[0], best[1]), merge(best[2], best[3]));
                _mm256_storeu_ps(code.as_mut_ptr().add(8 * h).cast(), k);
            }
            for (l, k) in code.iter().enumerate().take(rows) {
                *out.get_unchecked_mut(l * c_n + c) = *k as u8;
            }
        }
    }

    /// `xt[j][l] = rows[l·d + j]` for 16 rows of `d ≥ 16` values: 16 × 16 blocks transposed in
    /// registers (unpack pairs, then pairs of pairs, then 128-bit lanes), the columns past the
    /// last whole block by scalar copies.
    ///
    /// # Safety
    /// AVX-512F; `rows` holds `16 · d` values and `xt` at least `d` columns.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose16_avx512(rows: &[f32], d: usize, xt: &mut [[f32; 16]]) {
        debug_assert!(rows.len() == 16 * d && xt.len() >= d && d >= 16);
        let p = rows.as_ptr();
        let mut j0 = 0;
        while j0 + 16 <= d {
            let r: [__m512i; 16] = std::array::from_fn(|i| _mm512_castps_si512(_mm512_loadu_ps(p.add(i * d + j0))));
            let cols = crate::interp::kernels::transpose16_epi32(r);
            for (k, v) in cols.into_iter().enumerate() {
                _mm512_storeu_ps(xt[j0 + k].as_mut_ptr(), _mm512_castsi512_ps(v));
            }
            j0 += 16;
        }
        for j in j0..d {
            for (l, v) in xt[j].iter_mut().enumerate() {
                *v = rows[l * d + j];
            }
        }
    }

    use super::{RowsTap, Subspaces, CL, KB, LANES};
    use std::arch::x86_64::*;

    /// One 16-lane vector per channel group; `KB` running sums in registers.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn nearest_avx512(
        xs: &[[f32; CL]],
        taps: &[usize],
        pt: &[f32],
        hn: &[f32],
        k: usize,
    ) -> [u8; CL] {
        let mut best_d = _mm512_set1_ps(f32::INFINITY);
        let mut best_k = _mm512_setzero_si512();
        let (pt, hn) = (pt.as_ptr(), hn.as_ptr());
        for kb in (0..k).step_by(KB) {
            let mut acc = [_mm512_setzero_ps(); KB];
            for (&t, xv) in taps.iter().zip(xs) {
                let xv = _mm512_loadu_ps(xv.as_ptr());
                let row = pt.add((t * k + kb) * CL);
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(xv, _mm512_loadu_ps(row.add(j * CL)), *a);
                }
            }
            // Four chains of four prototypes, each sequential from (∞, its first index), merged
            // in order with "the later one wins only if strictly nearer": exactly the result of
            // one sequential scan (ties and NaN included), with a dependency chain of 6, not 16.
            let mut chain_d = [_mm512_set1_ps(f32::INFINITY); 4];
            let mut chain_k = [_mm512_setzero_si512(); 4];
            for q in 0..4 {
                chain_k[q] = _mm512_set1_epi32((kb + 4 * q) as i32);
                for j in 4 * q..4 * q + 4 {
                    let d = _mm512_sub_ps(_mm512_loadu_ps(hn.add((kb + j) * CL)), acc[j]);
                    let m = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(d, chain_d[q]);
                    chain_d[q] = _mm512_mask_mov_ps(chain_d[q], m, d);
                    chain_k[q] = _mm512_mask_mov_epi32(chain_k[q], m, _mm512_set1_epi32((kb + j) as i32));
                }
            }
            let merge = |(d0, k0): (__m512, __m512i), (d1, k1): (__m512, __m512i)| {
                let m = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(d1, d0);
                (_mm512_mask_mov_ps(d0, m, d1), _mm512_mask_mov_epi32(k0, m, k1))
            };
            let lo = merge((chain_d[0], chain_k[0]), (chain_d[1], chain_k[1]));
            let hi = merge((chain_d[2], chain_k[2]), (chain_d[3], chain_k[3]));
            (best_d, best_k) = merge((best_d, best_k), merge(lo, hi));
        }
        let mut out = [0u8; CL];
        _mm_storeu_si128(out.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(best_k));
        out
    }

    /// [`nearest_avx512`] for `N` rows at once, 8 prototypes at a time (`8·N` running sums):
    /// each prototype vector is loaded once for all rows. Row `r` reads tap `p.t`'s channel
    /// values at `x[p.off[r]..]`, lanes outside `mask & p.mask[r]` as 0. Same sums, same scan
    /// order.
    ///
    /// # Safety
    /// AVX-512F; for every tap and row, the lanes in `mask & p.mask[r]` lie inside `x`; every
    /// tap `< s` where `pt` holds `s × k × CL` values; `hn` holds `k × CL`, and `k` is a
    /// multiple of 8.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn nearest_n_avx512<const N: usize>(
        x: &[f32],
        taps: &[RowsTap<N>],
        mask: u16,
        pt: &[f32],
        hn: &[f32],
        k: usize,
    ) -> [[u8; CL]; N] {
        debug_assert!(taps.iter().all(|p| (p.t as usize + 1) * k * CL <= pt.len()));
        debug_assert!(hn.len() >= k * CL && k.is_multiple_of(8));
        let mut best = [(_mm512_set1_ps(f32::INFINITY), _mm512_setzero_si512()); N];
        let (xp, pt, hn) = (x.as_ptr(), pt.as_ptr(), hn.as_ptr());
        let merge = |(d0, k0): (__m512, __m512i), (d1, k1): (__m512, __m512i)| {
            let m = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(d1, d0);
            (_mm512_mask_mov_ps(d0, m, d1), _mm512_mask_mov_epi32(k0, m, k1))
        };
        for kb in (0..k).step_by(8) {
            let mut acc = [[_mm512_setzero_ps(); 8]; N];
            for p in taps {
                let v: [__m512; N] = std::array::from_fn(|r| _mm512_maskz_loadu_ps(mask & p.mask[r], xp.add(p.off[r])));
                let row = pt.add((p.t as usize * k + kb) * CL);
                for j in 0..8 {
                    let pv = _mm512_loadu_ps(row.add(j * CL));
                    for r in 0..N {
                        acc[r][j] = _mm512_fmadd_ps(v[r], pv, acc[r][j]);
                    }
                }
            }
            // per row: two chains of four, merged in index order (as in `nearest_avx512`)
            for (acc, best) in acc.iter().zip(best.iter_mut()) {
                let mut chain = [(_mm512_set1_ps(f32::INFINITY), _mm512_setzero_si512()); 2];
                for (q, (cd, ck)) in chain.iter_mut().enumerate() {
                    *ck = _mm512_set1_epi32((kb + 4 * q) as i32);
                    for j in 4 * q..4 * q + 4 {
                        let d = _mm512_sub_ps(_mm512_loadu_ps(hn.add((kb + j) * CL)), acc[j]);
                        let m = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(d, *cd);
                        *cd = _mm512_mask_mov_ps(*cd, m, d);
                        *ck = _mm512_mask_mov_epi32(*ck, m, _mm512_set1_epi32((kb + j) as i32));
                    }
                }
                *best = merge(*best, merge(chain[0], chain[1]));
            }
        }
        let mut out = [[0u8; CL]; N];
        for (o, b) in out.iter_mut().zip(best) {
            _mm_storeu_si128(o.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(b.1));
        }
        out
    }

    /// [`nearest_n_avx512`] at AVX2: per 8-lane half of the channel group, `N` rows and 4
    /// prototypes at a time (`4·N` running sums), prototypes compared in increasing order.
    /// Lanes outside `mask & p.mask[r]` read as 0 (`vmaskmovps`). Same sums, same codes.
    ///
    /// # Safety
    /// AVX2 and FMA; otherwise as [`nearest_n_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn nearest_n_avx2<const N: usize>(
        x: &[f32],
        taps: &[RowsTap<N>],
        mask: u16,
        pt: &[f32],
        hn: &[f32],
        k: usize,
    ) -> [[u8; CL]; N] {
        const H: usize = 8;
        debug_assert!(taps.iter().all(|p| (p.t as usize + 1) * k * CL <= pt.len()));
        debug_assert!(hn.len() >= k * CL && k.is_multiple_of(4));
        let (xp, pt, hn) = (x.as_ptr(), pt.as_ptr(), hn.as_ptr());
        let bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        // 8 lanes from `p`, lane l only when bit l of `m` is set
        let load = |p: *const f32, m: u16| match m & 0xff {
            0xff => _mm256_loadu_ps(p),
            0 => _mm256_setzero_ps(),
            m => {
                let sel = _mm256_and_si256(_mm256_set1_epi32(m as i32), bit);
                _mm256_maskload_ps(p, _mm256_cmpeq_epi32(sel, bit))
            }
        };
        let mut out = [[0u8; CL]; N];
        for half in 0..CL / H {
            let o = half * H;
            let mut best = [(_mm256_set1_ps(f32::INFINITY), _mm256_setzero_si256()); N];
            for kb in (0..k).step_by(4) {
                let mut acc = [[_mm256_setzero_ps(); 4]; N];
                for p in taps {
                    let v: [__m256; N] = std::array::from_fn(|r| load(xp.add(p.off[r] + o), (mask & p.mask[r]) >> o));
                    let row = pt.add((p.t as usize * k + kb) * CL + o);
                    for j in 0..4 {
                        let pv = _mm256_loadu_ps(row.add(j * CL));
                        for r in 0..N {
                            acc[r][j] = _mm256_fmadd_ps(v[r], pv, acc[r][j]);
                        }
                    }
                }
                for (acc, (bd, bk)) in acc.iter().zip(best.iter_mut()) {
                    for (j, a) in acc.iter().enumerate() {
                        let d = _mm256_sub_ps(_mm256_loadu_ps(hn.add((kb + j) * CL + o)), *a);
                        let m = _mm256_cmp_ps::<_CMP_LT_OQ>(d, *bd);
                        *bd = _mm256_blendv_ps(*bd, d, m);
                        let kv = _mm256_set1_epi32((kb + j) as i32);
                        *bk = _mm256_blendv_epi8(*bk, kv, _mm256_castps_si256(m));
                    }
                }
            }
            for (out, (_, bk)) in out.iter_mut().zip(best) {
                let mut ks = [0i32; H];
                _mm256_storeu_si256(ks.as_mut_ptr().cast(), bk);
                for l in 0..H {
                    out[o + l] = ks[l] as u8;
                }
            }
        }
        out
    }

    /// Two 8-lane halves per channel group; 8 prototypes at a time (16 registers).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn nearest_avx2(xs: &[[f32; CL]], taps: &[usize], pt: &[f32], hn: &[f32], k: usize) -> [u8; CL] {
        const H: usize = 8;
        let mut out = [0u8; CL];
        let (pt, hn) = (pt.as_ptr(), hn.as_ptr());
        for half in 0..CL / H {
            let o = half * H;
            let mut best_d = _mm256_set1_ps(f32::INFINITY);
            let mut best_k = _mm256_setzero_si256();
            for kb in (0..k).step_by(H) {
                let mut acc = [_mm256_setzero_ps(); H];
                for (&t, xv) in taps.iter().zip(xs) {
                    let xv = _mm256_loadu_ps(xv.as_ptr().add(o));
                    let row = pt.add((t * k + kb) * CL + o);
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(xv, _mm256_loadu_ps(row.add(j * CL)), *a);
                    }
                }
                for (j, a) in acc.iter().enumerate() {
                    let d = _mm256_sub_ps(_mm256_loadu_ps(hn.add((kb + j) * CL + o)), *a);
                    let m = _mm256_cmp_ps::<_CMP_LT_OQ>(d, best_d);
                    best_d = _mm256_blendv_ps(best_d, d, m);
                    let kv = _mm256_set1_epi32((kb + j) as i32);
                    best_k = _mm256_blendv_epi8(best_k, kv, _mm256_castps_si256(m));
                }
            }
            let mut ks = [0i32; H];
            _mm256_storeu_si256(ks.as_mut_ptr().cast(), best_k);
            for l in 0..H {
                out[o + l] = ks[l] as u8;
            }
        }
        out
    }
}

#[inline(always)]
fn encode_block(job: &Job, r0: usize, out: &mut [u8]) {
    let sub = job.prepared.sub;
    let c_n = sub.count();
    let n = out.len() / c_n;
    let simd = Simd::detect();
    let avx512 = simd == Simd::Avx512;
    // a few rows (a fully connected layer or a deep 1×1 conv at batch 1): one row at a time,
    // the 16 prototypes in the lanes, or at AVX-512 16 codebooks in the lanes where the
    // subspaces tile the row (the same sums and comparisons, so the same codes)
    #[cfg(target_arch = "x86_64")]
    let rowwise = match (simd, &job.prepared.row_protos, &job.prepared.kind) {
        (Simd::Avx512 | Simd::Avx2, Some(pr), Kind::Argmin { norms, .. }) => Some((pr, norms)),
        _ => None,
    };
    let contiguous = job.rows.contiguous();
    let (mut xt, mut gathered) = (Vec::new(), Vec::new());
    for g in (0..n).step_by(LANES) {
        let lanes = (n - g).min(LANES);
        #[cfg(target_arch = "x86_64")]
        if let Some((pr, norms)) = rowwise.filter(|_| lanes < ROWWISE_BELOW) {
            let nhwc = matches!(job.rows, Rows::ConvNhwc { .. });
            if contiguous.is_none() && !nhwc {
                // gathered as for a tile (its lanes past `lanes` repeat the last row)
                if xt.is_empty() {
                    xt = vec![[0f32; LANES]; sub.d];
                }
                job.rows.fill(avx512, r0 + g, lanes, 0..sub.d, &mut xt);
            }
            for l in 0..lanes {
                let row: &[f32] = match contiguous {
                    Some((x, d)) => &x[(r0 + g + l) * d..][..d],
                    None if job.rows.row_nhwc(r0 + g + l, &mut gathered) => &gathered,
                    None => {
                        gathered.clear();
                        gathered.extend(xt.iter().map(|col| col[l]));
                        &gathered
                    }
                };
                let codes = &mut out[(g + l) * c_n..][..c_n];
                if let Some(cp) = job.prepared.col_protos.as_ref().filter(|_| avx512) {
                    // SAFETY: AVX-512F detected; `cp` was built for these subspaces, which
                    // tile `row` exactly.
                    unsafe { x86::argmin_cols16_avx512(row, sub, cp, codes) };
                    continue;
                }
                for (c, code) in codes.iter_mut().enumerate() {
                    // SAFETY: the level was detected (`rowwise`: AVX-512F, or AVX2 and FMA);
                    // `row` holds the codebook's columns, `pr` and `norms` its 16 prototypes.
                    *code = unsafe {
                        match avx512 {
                            true => x86::argmin_row16_avx512(row, sub, c, pr, norms),
                            false => x86::argmin_row16_avx2(row, sub, c, pr, norms),
                        }
                    };
                }
            }
            continue;
        }
        if xt.is_empty() {
            xt = vec![[0f32; LANES]; sub.d];
        }
        match &job.prepared.kind {
            Kind::Argmin { .. } => job.rows.fill(avx512, r0 + g, lanes, 0..sub.d, &mut xt),
            Kind::Tree { cols, .. } => job.rows.fill(avx512, r0 + g, lanes, cols.iter().copied(), &mut xt),
        }
        if let Kind::Tree {
            depth,
            dims,
            thresholds,
            ..
        } = &job.prepared.kind
        {
            // codebooks in groups (independent chains of threshold lookups at the SIMD levels)
            for c0 in (0..c_n).step_by(TREE_GROUP) {
                let cs: [usize; TREE_GROUP] = std::array::from_fn(|i| (c0 + i).min(c_n - 1));
                let codes = tree_tiles_at(simd, &xt, sub, cs, *depth, dims, thresholds);
                for (c, code) in (c0..c_n).zip(codes) {
                    for l in 0..lanes {
                        out[(g + l) * c_n + c] = code[l] as u8;
                    }
                }
            }
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if let Kind::Argmin {
            k: 16,
            pt,
            norms,
            quant: None,
        } = &job.prepared.kind
        {
            if sub.s == 4 && sub.d == 4 * c_n && simd != Simd::Scalar {
                let out = &mut out[g * c_n..];
                // SAFETY: the level detected (AVX-512F, or AVX2 and FMA); `xt` holds the row's
                // `4·c_n` columns, `pt` and `norms` 16 prototypes per codebook, `out` `lanes ≤ 16`
                // rows of codes.
                unsafe {
                    match avx512 {
                        true => x86::argmin_tiles16_avx512::<4>(&xt, c_n, pt, norms, lanes, out),
                        false => x86::argmin_tiles16_avx2::<4>(&xt, c_n, pt, norms, lanes, out),
                    }
                }
                continue;
            }
        }
        for c in 0..c_n {
            let code = match &job.prepared.kind {
                Kind::Argmin { quant: Some(q), .. } => q.nearest_tile(&xt, sub, c),
                // SAFETY: AVX-512F detected; `xt` holds the codebook's columns, `pt` and
                // `norms` its `k` prototypes.
                #[cfg(target_arch = "x86_64")]
                Kind::Argmin { k, pt, norms, .. } if avx512 => unsafe {
                    x86::argmin_tile_avx512(&xt, sub, c, *k, pt, norms)
                },
                // SAFETY: AVX2 and FMA detected; as above.
                #[cfg(target_arch = "x86_64")]
                Kind::Argmin { k, pt, norms, .. } if simd == Simd::Avx2 => unsafe {
                    x86::argmin_tile_avx2(&xt, sub, c, *k, pt, norms)
                },
                Kind::Argmin { k, pt, norms, .. } => argmin_tile(&xt, sub, c, *k, pt, norms),
                Kind::Tree { .. } => unreachable!("encoded above"),
            };
            for l in 0..lanes {
                out[(g + l) * c_n + c] = code[l] as u8;
            }
        }
    }
}

/// The longest subspace [`x86::argmin_cols16_avx512`] takes (its row values stay in registers).
const COLS_MAX_S: usize = 8;

/// Fewer rows than this in a tile are encoded one at a time when [`Prepared::row_protos`] and
/// AVX-512 or AVX2 allow (a tile costs `k·s` multiply-adds per codebook whatever its rows, a row `s`
/// and a reduction).
const ROWWISE_BELOW: usize = 8;

/// Nearest prototype of codebook `c` for each lane's row.
#[inline(always)]
fn argmin_tile(xt: &[[f32; LANES]], sub: Subspaces, c: usize, k: usize, protos: &[f32], norms: &[f32]) -> [u32; LANES] {
    let mut best_d = [f32::INFINITY; LANES];
    let mut best_k = [0u32; LANES];
    let range = sub.range(c);
    for kk in 0..k {
        let p = &protos[(c * k + kk) * sub.s..(c * k + kk + 1) * sub.s];
        let mut acc = [0f32; LANES];
        for (pj, col) in p.iter().zip(range.clone()) {
            let xc = &xt[col];
            for l in 0..LANES {
                acc[l] = xc[l].mul_add(*pj, acc[l]);
            }
        }
        let half_norm = norms[c * k + kk] * 0.5;
        for l in 0..LANES {
            let dist = half_norm - acc[l];
            let better = dist < best_d[l];
            best_d[l] = if better { dist } else { best_d[l] };
            best_k[l] = if better { kk as u32 } else { best_k[l] };
        }
    }
    best_k
}

/// Codebooks a tree tile walks together.
const TREE_GROUP: usize = 4;

/// [`tree_tile`] of the codebooks `cs` at `simd`: the AVX-512 and AVX2 forms gather each
/// level's thresholds for all lanes at once and walk the group's codebooks side by side (each
/// level waits on the gather the previous one chose; four codebooks give four independent chains),
/// where the portable loop walks the lanes one by one. The same comparisons, so the same leaves.
#[inline(always)]
fn tree_tiles_at(
    simd: Simd,
    xt: &[[f32; LANES]],
    sub: Subspaces,
    cs: [usize; TREE_GROUP],
    depth: usize,
    dims: &[usize],
    thr: &[f32],
) -> [[u32; LANES]; TREE_GROUP] {
    let nodes = (1 << depth) - 1;
    let last = cs.iter().max().copied().unwrap_or(0);
    assert!(dims.len() >= (last + 1) * depth && thr.len() >= (last + 1) * nodes && depth <= 8);
    match simd {
        // SAFETY: the level is supported (`Simd::detect`); the node indices stay below
        // `nodes` (a level's `2^lev - 1 + idx` with `idx < 2^lev`), checked above.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { x86::tree_tiles_avx512(xt, sub, cs, depth, dims, thr) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { x86::tree_tiles_avx2(xt, sub, cs, depth, dims, thr) },
        _ => cs.map(|c| tree_tile(xt, sub, c, depth, dims, thr)),
    }
}

/// Leaf of codebook `c`'s tree for each lane's row (padded dimensions read as 0).
#[inline(always)]
fn tree_tile(xt: &[[f32; LANES]], sub: Subspaces, c: usize, depth: usize, dims: &[usize], thr: &[f32]) -> [u32; LANES] {
    let nodes = (1 << depth) - 1;
    let th = &thr[c * nodes..(c + 1) * nodes];
    let mut idx = [0u32; LANES];
    for lev in 0..depth {
        let col = c * sub.s + dims[c * depth + lev];
        let base = (1u32 << lev) - 1;
        let zero = [0f32; LANES];
        let xc = if col < sub.d { &xt[col] } else { &zero };
        for l in 0..LANES {
            idx[l] = 2 * idx[l] + (xc[l] > th[(base + idx[l]) as usize]) as u32;
        }
    }
    idx
}

/// Each prototype's `‖p‖²` (`protos` `[c][k][s]`): the f32 encoder's norms when none are given,
/// a plain sum of products in subspace order.
pub fn squared_norms(protos: &[f32], s: usize) -> Vec<f32> {
    protos.chunks(s).map(|p| p.iter().map(|v| v * v).sum()).collect()
}

/// Convenience: argmin encoding of row-major rows (`act_scale`: the int8 encoder's input scale;
/// `norms`: see [`Codebooks::Argmin`]).
#[allow(clippy::too_many_arguments)]
pub fn encode_argmin(
    x: &[f32],
    rows: usize,
    sub: Subspaces,
    k: usize,
    protos: &[f32],
    norms: Option<&[f32]>,
    act_scale: Option<f32>,
    codes: &mut [u8],
) {
    assert_eq!(x.len(), rows * sub.d);
    encode(
        &Rows::Matrix { x, d: sub.d },
        sub,
        &Codebooks::Argmin {
            k,
            protos,
            act_scale,
            norms,
        },
        codes,
    )
}

/// Convenience: tree encoding of row-major rows.
#[allow(clippy::too_many_arguments)]
pub fn encode_tree(
    x: &[f32],
    rows: usize,
    sub: Subspaces,
    depth: usize,
    dims: &[usize],
    thresholds: &[f32],
    codes: &mut [u8],
) {
    assert_eq!(x.len(), rows * sub.d);
    encode(
        &Rows::Matrix { x, d: sub.d },
        sub,
        &Codebooks::Tree {
            depth,
            dims,
            thresholds,
        },
        codes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::op::Padding;
    use crate::pq::rng::Rng;

    /// The nearest prototype, and with norms given the least `norms[k] − 2 x·p_k` (what a
    /// metric's prototypes encode as), whichever kernel this CPU takes.
    #[test]
    fn argmin_matches_brute_force() {
        let mut rng = Rng::new(11);
        let cases = [
            (700usize, 20usize, 9usize, 16usize),
            (33, 8, 4, 256),
            (5, 3, 4, 16),
            (300, 64, 4, 16),
        ];
        for (&(rows, d, s, k), with_norms) in cases.iter().flat_map(|c| [(c, false), (c, true)]) {
            let sub = Subspaces { d, s };
            let c_n = sub.count();
            let x: Vec<f32> = (0..rows * d).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
            let mut protos: Vec<f32> = (0..c_n * k * s).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
            // padded dims of the last codebook are zero, as the pass produces them
            for kk in 0..k {
                for j in sub.range(c_n - 1).len()..s {
                    protos[((c_n - 1) * k + kk) * s + j] = 0.0;
                }
            }
            // norms unrelated to the prototypes' own
            let norms: Vec<f32> = (0..c_n * k).map(|_| rng.next_f64() as f32 * 3.0 - 1.0).collect();
            let norms = with_norms.then_some(&norms[..]);
            let mut codes = vec![0u8; rows * c_n];
            encode_argmin(&x, rows, sub, k, &protos, norms, None, &mut codes);
            for r in 0..rows {
                for c in 0..c_n {
                    let xr = &x[r * d..(r + 1) * d];
                    let dist = |j: usize| -> f64 {
                        let xv = |t: usize| xr.get(c * s + t).copied().filter(|_| c * s + t < d).unwrap_or(0.0) as f64;
                        let p = |t: usize| protos[(c * k + j) * s + t] as f64;
                        match norms {
                            Some(n) => n[c * k + j] as f64 - 2.0 * (0..s).map(|t| xv(t) * p(t)).sum::<f64>(),
                            None => (0..s).map(|t| (xv(t) - p(t)).powi(2)).sum(),
                        }
                    };
                    let got = codes[r * c_n + c] as usize;
                    let best = (0..k).map(dist).fold(f64::INFINITY, f64::min);
                    assert!(
                        dist(got) <= best + 1e-4,
                        "row {r} codebook {c}: {} vs best {best}",
                        dist(got)
                    );
                }
            }
        }
    }

    /// The hand-written AVX-512 and AVX2 tile kernels give the portable tile's codes (bit for
    /// bit: the same sums and strict comparisons) for k = 16, 32 and k not a multiple of their
    /// prototype groups (7, 13), subspaces of 1 to 9 values (the last codebook one short), on
    /// rows with ties, NaN, ±∞, huge values and -0, with huge and NaN prototypes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tile_kernels_match_the_portable_tile() {
        let levels = super::super::report_checked(
            "tile_kernels_match_the_portable_tile",
            "at SIMD levels",
            &[Simd::Avx2, Simd::Avx512],
            Simd::supported,
            Simd::name,
        );
        let mut rng = Rng::new(43);
        let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 3e38, -3e38, -0.0, 0.0];
        for k in [16usize, 32, 7, 13] {
            for s_len in 1..=9 {
                let sub = Subspaces {
                    d: 2 * s_len - 1,
                    s: s_len,
                };
                let c_n = sub.count();
                // a tie: the last prototype equals the second
                let (protos, norms) = tie_codebooks(&mut rng, c_n, k, s_len, &[(1, k - 1)]);
                for t in 0..6 {
                    let xt: Vec<[f32; LANES]> = (0..sub.d)
                        .map(|j| {
                            std::array::from_fn(|l| match (l + j + t) % 4 {
                                0 if t > 0 => special[(l + j + t) % special.len()],
                                // lane 5 is the second prototype of codebook 0 (a tie)
                                _ if l == 5 && j < s_len => protos[s_len + j],
                                _ => rng.next_f64() as f32 - 0.5,
                            })
                        })
                        .collect();
                    for c in 0..c_n {
                        let want = argmin_tile(&xt, sub, c, k, &protos, &norms);
                        for &level in &levels {
                            // SAFETY: the level is supported; `xt` holds `d` columns, `protos`
                            // and `norms` every codebook's `k` prototypes.
                            let got = unsafe {
                                match level {
                                    Simd::Avx512 => x86::argmin_tile_avx512(&xt, sub, c, k, &protos, &norms),
                                    _ => x86::argmin_tile_avx2(&xt, sub, c, k, &protos, &norms),
                                }
                            };
                            assert_eq!(got, want, "{}: k={k} s={s_len} codebook {c} tile {t}", level.name());
                        }
                    }
                }
            }
        }
    }

    /// The every-codebook tile kernels (16 prototypes of 4 values) give the portable tile's codes
    /// for each codebook and row: ties within a chain of four prototypes and across chains
    /// (prototype 7 repeats 4 in one chain; 5 repeats 1 and 15 repeats 10, settled by the first
    /// merges; 13 repeats 2, by the last), infinite and NaN distances (`odd_prototypes`,
    /// and special inputs), rows short of a whole tile, codebooks past a group of 16.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tiles16_kernels_match_the_portable_tile() {
        let levels = super::super::report_checked(
            "tiles16_kernels_match_the_portable_tile",
            "at SIMD levels",
            &[Simd::Avx2, Simd::Avx512],
            Simd::supported,
            Simd::name,
        );
        let (k, s) = (16usize, 4usize);
        // (first, repeat): none of them a prototype `odd_prototypes` changes
        const TIES: [(usize, usize); 4] = [(4, 7), (1, 5), (10, 15), (2, 13)];
        let mut rng = Rng::new(44);
        let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 3e38, -3e38, -0.0, 0.0];
        for c_n in [1usize, 3, 16, 21] {
            let sub = Subspaces { d: c_n * s, s };
            let (protos, norms) = tie_codebooks(&mut rng, c_n, k, s, &TIES);
            for t in 0..6 {
                let xt: Vec<[f32; LANES]> = (0..sub.d)
                    .map(|j| {
                        std::array::from_fn(|l| match (l + j + t) % 5 {
                            0 if t > 0 => special[(l + j + t) % special.len()],
                            // lanes 4-7: the first prototype of each tie, of their codebook
                            _ if (4..8).contains(&l) => protos[((j / s) * k + TIES[l - 4].0) * s + j % s],
                            _ => rng.next_f64() as f32 - 0.5,
                        })
                    })
                    .collect();
                let want: Vec<[u32; LANES]> = (0..c_n).map(|c| argmin_tile(&xt, sub, c, k, &protos, &norms)).collect();
                for rows in [16usize, 9, 1] {
                    for &level in &levels {
                        let mut got = vec![0xFFu8; rows * c_n + 1];
                        // SAFETY: the level is supported; `xt` holds the `4·c_n` columns,
                        // `protos` and `norms` 16 prototypes per codebook, `got` `rows` rows.
                        unsafe {
                            match level {
                                Simd::Avx512 => {
                                    x86::argmin_tiles16_avx512::<4>(&xt, c_n, &protos, &norms, rows, &mut got)
                                }
                                _ => x86::argmin_tiles16_avx2::<4>(&xt, c_n, &protos, &norms, rows, &mut got),
                            }
                        }
                        for (c, want) in want.iter().enumerate() {
                            for (l, &w) in want.iter().enumerate().take(rows) {
                                assert_eq!(
                                    got[l * c_n + c] as u32,
                                    w,
                                    "{}: c_n={c_n} tile {t} codebook {c} row {l}",
                                    level.name()
                                );
                            }
                        }
                        assert_eq!(got[rows * c_n], 0xFF, "{}: wrote past the rows", level.name());
                    }
                }
            }
        }
    }

    /// Random prototypes of `c_n` codebooks (`k` of `s` values each) and their norms, where in
    /// every codebook prototype `to` repeats prototype `from` for each pair of `ties`, and
    /// [`odd_prototypes`] makes some distances infinite or NaN.
    #[cfg(target_arch = "x86_64")]
    fn tie_codebooks(rng: &mut Rng, c_n: usize, k: usize, s: usize, ties: &[(usize, usize)]) -> (Vec<f32>, Vec<f32>) {
        let mut protos: Vec<f32> = (0..c_n * k * s).map(|_| rng.next_f64() as f32 - 0.5).collect();
        for cb in 0..c_n {
            for &(from, to) in ties {
                let (a, b) = ((cb * k + from) * s, (cb * k + to) * s);
                protos.copy_within(a..a + s, b);
            }
            odd_prototypes(&mut protos, cb, k, s);
        }
        let norms = protos.chunks(s).map(|p| p.iter().map(|v| v * v).sum()).collect();
        (protos, norms)
    }

    /// Prototypes 3, 6, 0 and 9 of codebook `cb` (of `k ≥ 10`, `s` values each) with a first
    /// value of 1e20 (an infinite norm), -1e20 and NaN (in both AVX2 halves), in every other
    /// codebook: infinite and NaN distances beside finite ones.
    #[cfg(target_arch = "x86_64")]
    fn odd_prototypes(protos: &mut [f32], cb: usize, k: usize, s: usize) {
        if cb.is_multiple_of(2) {
            for (kk, v) in [(3, 1e20), (6, -1e20), (0, f32::NAN), (9, f32::NAN)] {
                protos[(cb * k + kk.min(k - 1)) * s] = v;
            }
        }
    }

    /// The row kernel of `level` (AVX-512 or AVX2).
    ///
    /// # Safety
    /// `level` is supported; as the kernels.
    #[cfg(target_arch = "x86_64")]
    unsafe fn row16(level: Simd, row: &[f32], sub: Subspaces, c: usize, pr: &[f32], norms: &[f32]) -> u8 {
        match level {
            Simd::Avx512 => x86::argmin_row16_avx512(row, sub, c, pr, norms),
            _ => x86::argmin_row16_avx2(row, sub, c, pr, norms),
        }
    }

    /// Both row kernels against the portable tile, row by row, on random codebooks (s = 1 to 9,
    /// the last codebook one value short) with ties, NaN, ±∞, huge values and -0 in the rows
    /// (up to three in a codebook), and huge and NaN prototypes (infinite or NaN distances
    /// beside finite ones in one codebook).
    #[cfg(target_arch = "x86_64")]
    fn row_kernels_match_the_tile(rng: &mut Rng) {
        let levels = super::super::report_checked(
            "row_kernels_match_the_tile",
            "at SIMD levels",
            &[Simd::Avx2, Simd::Avx512],
            Simd::supported,
            Simd::name,
        );
        let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30, -0.0, 0.0];
        for s_len in 1..=9 {
            let sub = Subspaces {
                d: 3 * s_len - 1,
                s: s_len,
            };
            let c_n = sub.count();
            let mut protos: Vec<f32> = (0..c_n * 16 * s_len).map(|_| rng.next_f64() as f32 - 0.5).collect();
            for cb in 0..c_n {
                // ties: prototype 12 equals 2 (across the two AVX2 halves), 5 equals 4
                let (a, b) = ((cb * 16 + 2) * s_len, (cb * 16 + 12) * s_len);
                protos.copy_within(a..a + s_len, b);
                let (a, b) = ((cb * 16 + 4) * s_len, (cb * 16 + 5) * s_len);
                protos.copy_within(a..a + s_len, b);
                odd_prototypes(&mut protos, cb, 16, s_len);
            }
            let norms: Vec<f32> = protos.chunks(s_len).map(|p| p.iter().map(|v| v * v).sum()).collect();
            let cb = Codebooks::Argmin {
                k: 16,
                protos: &protos,
                act_scale: None,
                norms: None,
            };
            let pr = prepare(sub, &cb, None).row_protos.unwrap();
            let mut xt = vec![[0f32; LANES]; sub.d];
            for t in 0..LANES * 4 {
                let row: Vec<f32> = (0..sub.d)
                    .map(|j| match (t + j) % 4 {
                        0 if t % 3 == 0 => special[(t / 3 + j) % special.len()],
                        _ => rng.next_f64() as f32 - 0.5,
                    })
                    .collect();
                // every 8th row is each codebook's prototype 2, which equals its prototype 12
                // (a tie at distance −‖p‖²/2, across the AVX2 halves)
                let row = match t % 8 {
                    7 => (0..sub.d)
                        .map(|j| protos[((j / s_len) * 16 + 2) * s_len + j % s_len])
                        .collect(),
                    _ => row,
                };
                for (col, v) in xt.iter_mut().zip(&row) {
                    col[t % LANES] = *v;
                }
                if t % LANES != LANES - 1 {
                    continue;
                }
                for c in 0..c_n {
                    let tile = argmin_tile(&xt, sub, c, 16, &protos, &norms);
                    for (l, &code) in tile.iter().enumerate() {
                        let row: Vec<f32> = xt.iter().map(|col| col[l]).collect();
                        for &level in &levels {
                            // SAFETY: the level is supported; `row` holds `d` values, `pr` and
                            // `norms` the prototypes of every codebook.
                            let got = unsafe { row16(level, &row, sub, c, &pr, &norms) };
                            assert_eq!(got as u32, code, "{}: s={s_len} codebook {c} row {t}", level.name());
                        }
                    }
                }
            }
        }
    }

    /// A few rows (fewer than [`ROWWISE_BELOW`]: a fully connected layer or a deep 1×1 conv at
    /// batch 1) get the codes they get inside a batch of full 16-row tiles, whether the row
    /// path runs them (AVX-512 or AVX2, 16 prototypes; at AVX-512, subspaces of 1 to 8 values
    /// that tile the row, 16 codebooks per call, more than 16 of them included) or not:
    /// contiguous rows, channels-last rows
    /// with stride, padding and dilation (gathered one by one), NCHW rows (gathered as a tile),
    /// ties between equal prototypes, NaN, infinite and huge inputs.
    #[test]
    fn few_rows_encode_like_full_tiles() {
        let mut rng = Rng::new(31);
        let row_path = cfg!(target_arch = "x86_64") && Simd::detect() >= Simd::Avx2;
        eprintln!(
            "few_rows_encode_like_full_tiles: row path {}",
            if row_path { "run" } else { "not at this SIMD level" }
        );
        // distances that are only NaN and +∞ (an infinite input against prototypes of 0 and
        // below): no code beats the first, as in the tile's strict scan; and one finite
        #[cfg(target_arch = "x86_64")]
        if row_path {
            row_kernels_match_the_tile(&mut rng);
            let sub = Subspaces { d: 1, s: 1 };
            for (x, last) in [(f32::INFINITY, -1.0f32), (f32::INFINITY, 2.0), (-3.0, 0.5)] {
                let protos: Vec<f32> = (0..16)
                    .map(|kk| if kk % 2 == 0 { 0.0 } else { -(kk as f32) })
                    .chain([last])
                    .skip(1)
                    .collect();
                let norms: Vec<f32> = protos.iter().map(|p| p * p).collect();
                let prepared = prepare(
                    sub,
                    &Codebooks::Argmin {
                        k: 16,
                        protos: &protos,
                        act_scale: None,
                        norms: None,
                    },
                    None,
                );
                let tile = argmin_tile(&[[x; LANES]], sub, 0, 16, &protos, &norms)[0] as u8;
                let pr = prepared.row_protos.as_ref().unwrap();
                for level in Simd::available().into_iter().filter(|&l| l >= Simd::Avx2) {
                    // SAFETY: the level is supported; one codebook of 16 prototypes, a row of one value.
                    let row = unsafe { row16(level, &[x], sub, 0, pr, &norms) };
                    assert_eq!(row, tile, "{}: x={x} last prototype {last}", level.name());
                }
                if let Some(cp) = &prepared.col_protos {
                    let mut code = [0u8];
                    // SAFETY: built only at AVX-512; one codebook of one value tiles the row.
                    unsafe { x86::argmin_cols16_avx512(&[x], sub, cp, &mut code) };
                    assert_eq!(code[0], tile, "codebook lanes: x={x} last prototype {last}");
                }
            }
        }
        for k in [16usize, 32] {
            // (channels, [h, w], kernel, stride, dilation, pads, subspace): 4 or fewer
            // rows per image, the batch 8 images (full tiles)
            type Case = (usize, [usize; 2], [usize; 2], usize, usize, [usize; 4], usize);
            let cases: &[Case] = &[
                (20, [1, 1], [1, 1], 1, 1, [0; 4], 4),
                (12, [2, 2], [1, 1], 2, 1, [0; 4], 4),
                (8, [2, 2], [3, 3], 1, 1, [1; 4], 4),
                (6, [3, 3], [3, 3], 2, 2, [2, 1, 1, 2], 5),
                // the codebook-lane kernel's extremes: subspaces of 1 (20 codebooks) and of 8
                (20, [1, 1], [1, 1], 1, 1, [0; 4], 1),
                (16, [1, 1], [1, 1], 1, 1, [0; 4], 8),
            ];
            for &(c, [h, w], kernel, stride, dil, pads, sub_s) in cases {
                let win = Window {
                    kernel,
                    strides: [stride; 2],
                    dilations: [dil; 2],
                    padding: Padding::Explicit(pads),
                    ceil_mode: false,
                };
                let geo = win.resolve([h, w]).unwrap();
                let per = geo.out[0] * geo.out[1];
                let n = 8;
                let mut xnchw: Vec<f32> = (0..n * h * w * c).map(|_| rng.next_f64() as f32 - 0.3).collect();
                // special values in the first image (the one encoded alone below)
                xnchw[0] = f32::NAN;
                xnchw[1] = f32::INFINITY;
                xnchw[2] = 1e30;
                xnchw[3] = -0.0;
                let x = crate::interp::kernels::to_nhwc(&xnchw, [n, c, h, w]);
                let d = c * kernel[0] * kernel[1];
                let sub = Subspaces { d, s: sub_s };
                let c_n = sub.count();
                let mut protos: Vec<f32> = (0..c_n * k * sub_s).map(|_| rng.next_f64() as f32 - 0.3).collect();
                // a tie in every codebook: prototype 9 equals prototype 3
                for cb in 0..c_n {
                    let (a, b) = ((cb * k + 3) * sub_s, (cb * k + 9) * sub_s);
                    protos.copy_within(a..a + sub_s, b);
                }
                let cb = Codebooks::Argmin {
                    k,
                    protos: &protos,
                    act_scale: None,
                    norms: None,
                };
                let prepared = prepare(sub, &cb, None);
                assert_eq!(prepared.row_protos.is_some(), k == 16 && row_path);
                let cols = k == 16 && Simd::detect() == Simd::Avx512 && d % sub_s == 0 && sub_s <= COLS_MAX_S;
                assert_eq!(prepared.col_protos.is_some(), cols);
                for nhwc in [true, false] {
                    let rows = |imgs: usize| match nhwc {
                        true => Rows::ConvNhwc {
                            x: &x[..imgs * h * w * c],
                            shape: [imgs, h, w, c],
                            win: &win,
                            geo,
                        },
                        false => Rows::Conv {
                            x: &xnchw[..imgs * h * w * c],
                            shape: [imgs, c, h, w],
                            win: &win,
                            geo,
                        },
                    };
                    let mut full = vec![0u8; n * per * c_n];
                    encode_prepared(&rows(n), &prepared, &mut full);
                    let mut one = vec![0u8; per * c_n];
                    encode_prepared(&rows(1), &prepared, &mut one);
                    assert_eq!(
                        one,
                        full[..per * c_n],
                        "k={k} c={c} {h}x{w} nhwc={nhwc}: one image vs the batch"
                    );
                    // the same rows as a matrix (contiguous), 1 to 7 of them
                    let m = crate::interp::kernels::conv::im2col_rows(&xnchw, [n, c, h, w], &win).unwrap();
                    let m = m.as_slice().unwrap();
                    for r in 1..ROWWISE_BELOW.min(n * per) {
                        let mut few = vec![0u8; r * c_n];
                        let mat = Rows::Matrix { x: &m[..r * d], d };
                        encode_prepared(&mat, &prepared, &mut few);
                        assert_eq!(few, full[..r * c_n], "k={k} c={c} {h}x{w} nhwc={nhwc}: {r} matrix rows");
                    }
                }
            }
        }
    }

    /// The gathering tree tiles give the portable walk's leaves at every level this CPU has:
    /// depths 1 to 8, values equal to a threshold (not greater), NaN (never greater), and the
    /// padded dimensions of a last codebook past `d` (read as 0).
    #[test]
    fn tree_tiles_match_the_portable_walk_at_every_level() {
        let levels = crate::interp::kernels::levels_checked("tree_tiles_match_the_portable_walk_at_every_level");
        let mut rng = Rng::new(17);
        for depth in 1..=8 {
            let sub = Subspaces { d: 7, s: 3 };
            let c_n = sub.count();
            let nodes = (1 << depth) - 1;
            let dims: Vec<usize> = (0..c_n * depth).map(|_| (rng.next_f64() * 3.0) as usize).collect();
            let thr: Vec<f32> = (0..c_n * nodes).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let mut xt = vec![[0f32; LANES]; sub.d];
            for (j, col) in xt.iter_mut().enumerate() {
                for (l, v) in col.iter_mut().enumerate() {
                    *v = match (j + l) % 7 {
                        0 => f32::NAN,
                        1 => thr[(l * 31 + j) % thr.len()],
                        _ => rng.next_f64() as f32 - 0.5,
                    };
                }
            }
            // a group with a repeated codebook (the padding of a last group) and one in order
            for cs in [[2, 0, 1, 1], [0, 1, 2, 2]] {
                for &level in &levels {
                    let got = tree_tiles_at(level, &xt, sub, cs, depth, &dims, &thr);
                    for (&c, got) in cs.iter().zip(got) {
                        let want = tree_tile(&xt, sub, c, depth, &dims, &thr);
                        assert!(want.iter().all(|&i| i < 1 << depth));
                        assert_eq!(got, want, "depth {depth}, codebook {c}, {}", level.name());
                    }
                }
            }
        }
    }

    #[test]
    fn tree_matches_reference_walk() {
        let mut rng = Rng::new(5);
        let sub = Subspaces { d: 10, s: 4 };
        let rows = 300;
        let x: Vec<f32> = (0..rows * 10).map(|_| rng.next_f64() as f32).collect();
        let c_n = sub.count();
        let dims: Vec<usize> = (0..c_n * 4).map(|i| i % 4).collect();
        let thr: Vec<f32> = (0..c_n * 15).map(|_| rng.next_f64() as f32).collect();
        let mut codes = vec![0u8; rows * c_n];
        encode_tree(&x, rows, sub, 4, &dims, &thr, &mut codes);
        for r in 0..rows {
            for c in 0..c_n {
                let mut sv = [0f32; 4];
                for (j, col) in sub.range(c).enumerate() {
                    sv[j] = x[r * 10 + col];
                }
                let want = crate::pq::tree::encode(&sv, &dims[c * 4..c * 4 + 4], &thr[c * 15..c * 15 + 15]);
                assert_eq!(codes[r * c_n + c] as usize, want);
            }
        }
    }

    #[test]
    fn conv_rows_encode_like_materialized_im2col_rows() {
        let wide = Window {
            kernel: [3, 3],
            strides: [1, 1],
            dilations: [1, 1],
            padding: Padding::Explicit([1; 4]),
            ceil_mode: false,
        };
        conv_case([2, 2, 9, 40], wide);
        let odd = Window {
            kernel: [3, 2],
            strides: [2, 1],
            dilations: [1, 2],
            padding: Padding::Explicit([1, 0, 2, 1]),
            ceil_mode: false,
        };
        conv_case([2, 3, 7, 6], odd);
    }

    /// The conv rows of `x` (NCHW `shape`) read as NCHW and, from `xh` (the same values
    /// channels-last), as NHWC.
    fn both_layouts<'a>(
        x: &'a [f32],
        xh: &'a [f32],
        shape: [usize; 4],
        win: &'a Window,
        geo: crate::ir::window::Geometry,
    ) -> (Rows<'a>, Rows<'a>) {
        let [n, c, h, w] = shape;
        let nhwc = Rows::ConvNhwc {
            x: xh,
            shape: [n, h, w, c],
            win,
            geo,
        };
        (Rows::Conv { x, shape, win, geo }, nhwc)
    }

    /// Thresholds for `c_n` random trees of `depth` levels.
    fn random_thresholds(rng: &mut Rng, c_n: usize, depth: usize) -> Vec<f32> {
        (0..c_n * ((1 << depth) - 1))
            .map(|_| rng.next_f64() as f32 - 0.3)
            .collect()
    }

    /// One layer's prepared trees on inputs of two widths, in turns: the table of tap starts
    /// the pixel-lane tree kernel caches per shape is rebuilt for each (a table kept across a
    /// change of width would read the wrong columns).
    #[test]
    fn one_tree_encodes_two_widths() {
        let levels = crate::interp::kernels::levels_checked("one_tree_encodes_two_widths");
        let mut rng = Rng::new(5);
        let (c, kernel, s, depth) = (8, [3, 3], 3, 6);
        let win = Window {
            kernel,
            strides: [1, 1],
            dilations: [1, 1],
            padding: Padding::Explicit([1, 1, 1, 1]),
            ceil_mode: false,
        };
        let sub = Subspaces { d: c * 9, s };
        let c_n = sub.count();
        let dims: Vec<usize> = (0..c_n * depth).map(|i| (i * 5 + 1) % s).collect();
        let thr = random_thresholds(&mut rng, c_n, depth);
        let tree = Codebooks::Tree {
            depth,
            dims: &dims,
            thresholds: &thr,
        };
        let prepared = prepare(sub, &tree, Some((c, kernel[0], kernel[1])));
        let pt = prepared.pixel_tree.as_ref().expect("a pixel-lane tree");
        for (turn, w) in [9, 21, 9, 4].into_iter().enumerate() {
            let shape = [1, c, 6, w];
            let x: Vec<f32> = (0..shape.iter().product())
                .map(|_| rng.next_f64() as f32 - 0.3)
                .collect();
            let xh = crate::interp::kernels::to_nhwc(&x, shape);
            let geo = win.resolve([shape[2], shape[3]]).unwrap();
            let (nchw, nhwc) = both_layouts(&x, &xh, shape, &win, geo);
            let mut want = vec![0u8; nchw.count() * c_n];
            encode(&nchw, sub, &tree, &mut want);
            for &lv in &levels {
                let mut got = vec![255u8; want.len()];
                if tree_nhwc(lv, &nhwc, pt, c_n, &mut got) {
                    assert_eq!(got, want, "width {w} (turn {turn}) at {lv:?}");
                } else {
                    assert_eq!(lv, Simd::Scalar, "the pixel-lane tree runs at {lv:?}");
                }
            }
        }
    }

    /// Channels-last rows give the same codes as NCHW rows, through the channel-lane kernel
    /// (one codebook per channel, or per channel and kernel row) and the generic gather alike,
    /// with channel counts that are not a multiple of 16, strides, dilations, padding, K = 16/32.
    #[test]
    fn nhwc_rows_encode_like_nchw_rows() {
        let levels = crate::interp::kernels::levels_checked("nhwc_rows_encode_like_nchw_rows");
        let mut rng = Rng::new(21);
        type Case = ([usize; 4], [usize; 2], [usize; 2], [usize; 2], [usize; 4], usize, usize);
        let cases: &[Case] = &[
            // shape, kernel, strides, dilations, pads, subspace, k
            ([2, 20, 9, 7], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 9, 16),
            ([3, 16, 8, 8], [3, 3], [2, 2], [1, 1], [1, 1, 1, 1], 9, 16),
            ([1, 37, 6, 5], [3, 3], [1, 2], [2, 1], [2, 1, 0, 2], 9, 32),
            ([2, 6, 12, 12], [5, 5], [1, 1], [1, 1], [2, 2, 2, 2], 5, 16),
            ([2, 24, 5, 5], [1, 1], [2, 2], [1, 1], [0, 0, 0, 0], 4, 16),
            ([2, 5, 6, 6], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 6, 16),
            // rows wider than one 16-pixel tile (the pixel-lane tree kernel)
            ([2, 4, 5, 37], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 9, 16),
            ([1, 3, 4, 40], [3, 3], [1, 2], [1, 1], [0, 1, 1, 0], 9, 16),
            // 16 channels or more (the planar copy's transposes) with a pixel tail, strided,
            // dilated, 1×1, and pads wider than the kernel
            ([2, 32, 6, 19], [5, 5], [1, 1], [1, 1], [2, 2, 2, 2], 5, 16),
            ([1, 20, 9, 35], [3, 3], [2, 2], [1, 1], [1, 1, 1, 1], 9, 16),
            ([2, 48, 3, 17], [1, 1], [1, 1], [1, 1], [0, 0, 0, 0], 4, 16),
            ([1, 16, 7, 21], [3, 3], [1, 1], [2, 2], [3, 1, 0, 4], 9, 16),
            ([1, 17, 5, 16], [2, 3], [1, 3], [1, 1], [0, 4, 1, 5], 6, 16),
            ([2, 20, 7, 9], [3, 3], [2, 2], [1, 1], [1, 1, 1, 1], 9, 16),
            // stride 2 over rows of several 16-pixel runs (deinterleaved copies; rows and
            // columns no window reads are skipped): 1×1, odd and even left pads, dilated
            ([1, 16, 6, 40], [1, 1], [2, 2], [1, 1], [0, 0, 0, 0], 4, 16),
            ([2, 18, 7, 33], [3, 3], [2, 2], [1, 1], [0, 1, 2, 0], 9, 16),
            ([1, 16, 9, 37], [3, 3], [2, 2], [2, 2], [2, 3, 2, 2], 9, 16),
            // 16 images or more on maps narrower than a vector (the image-lane tree kernel):
            // a partial last group, strided, dilated, 1×1, wide windows, pads wider than the
            // kernel, a 1-pixel output
            ([17, 20, 7, 7], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 9, 16),
            ([16, 5, 4, 4], [3, 3], [2, 2], [1, 1], [1, 1, 1, 1], 9, 16),
            ([33, 24, 3, 3], [1, 1], [2, 2], [1, 1], [0, 0, 0, 0], 4, 16),
            ([18, 6, 6, 5], [5, 5], [1, 1], [1, 1], [2, 2, 2, 2], 5, 16),
            ([16, 16, 7, 7], [3, 3], [1, 1], [2, 2], [3, 1, 0, 4], 9, 16),
            ([17, 17, 5, 6], [2, 3], [1, 3], [1, 1], [0, 4, 1, 5], 6, 16),
            ([16, 9, 2, 2], [2, 2], [2, 2], [1, 1], [0, 0, 0, 0], 4, 16),
            // 3-value codebooks (one kernel row of one channel): 60 and 51 codebooks, pixel
            // and image lanes
            ([2, 20, 9, 18], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 3, 16),
            ([17, 17, 5, 6], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 3, 16),
            // fewer images on narrow rows: two or four output rows per vector at AVX-512 (a
            // last vector with fewer rows, strided, 1-pixel rows)
            ([1, 24, 8, 8], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 3, 16),
            ([2, 20, 4, 4], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 3, 16),
            ([1, 12, 7, 3], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 3, 16),
            ([3, 16, 13, 11], [3, 3], [2, 2], [1, 1], [1, 1, 1, 1], 9, 16),
            ([1, 18, 5, 1], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 9, 16),
            // one channel (a stem: the interpreter reads its NCHW input as channels-last)
            ([2, 1, 12, 20], [5, 5], [1, 1], [1, 1], [2, 2, 2, 2], 5, 16),
            ([17, 1, 9, 9], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 3, 16),
        ];
        for (ci, &(shape, kernel, strides, dilations, pads, s, k)) in cases.iter().enumerate() {
            let win = Window {
                kernel,
                strides,
                dilations,
                padding: Padding::Explicit(pads),
                ceil_mode: false,
            };
            let x: Vec<f32> = (0..shape.iter().product())
                .map(|_| rng.next_f64() as f32 - 0.3)
                .collect();
            let xh = crate::interp::kernels::to_nhwc(&x, shape);
            let geo = win.resolve([shape[2], shape[3]]).unwrap();
            let d = shape[1] * kernel[0] * kernel[1];
            let sub = Subspaces { d, s };
            let c_n = sub.count();
            let protos: Vec<f32> = (0..c_n * k * s).map(|_| rng.next_f64() as f32 - 0.3).collect();
            // every other case with norms of its own (a metric's encoder)
            let norms: Vec<f32> = (0..c_n * k).map(|_| rng.next_f64() as f32).collect();
            let norms = (ci % 2 == 1).then_some(&norms[..]);
            let nchw = Rows::Conv {
                x: &x,
                shape,
                win: &win,
                geo,
            };
            let [n, c, h, w] = shape;
            let nhwc = Rows::ConvNhwc {
                x: &xh,
                shape: [n, h, w, c],
                win: &win,
                geo,
            };
            let cb = Codebooks::Argmin {
                k,
                protos: &protos,
                act_scale: None,
                norms,
            };
            let mut a = vec![0u8; nchw.count() * c_n];
            let mut b = vec![0u8; nchw.count() * c_n];
            encode(&nchw, sub, &cb, &mut a);
            let prepared = prepare(sub, &cb, Some((c, kernel[0], kernel[1])));
            let lanes = prepared.lanes.is_some();
            assert_eq!(
                lanes,
                s == kernel[0] * kernel[1] || s == kernel[1],
                "case {shape:?} s={s}"
            );
            encode_prepared(&nhwc, &prepared, &mut b);
            assert_eq!(a, b, "argmin {shape:?} s={s} k={k} (channel lanes: {lanes})");
            // every SIMD level of the channel-lane kernel gives the same codes
            if let Some(cl) = &prepared.lanes {
                let sl = if cl.families == 1 {
                    kernel[0] * kernel[1]
                } else {
                    kernel[1]
                };
                let groups = c.div_ceil(CL);
                for g in 0..groups * cl.families {
                    // all taps, and a subset (taps outside the image are left out)
                    for taps in [
                        (0..sl).collect::<Vec<_>>(),
                        (0..sl).filter(|t| (t + g) % 3 != 1).collect(),
                    ] {
                        let xs: Vec<[f32; CL]> = taps
                            .iter()
                            .map(|_| std::array::from_fn(|_| rng.next_f64() as f32 - 0.3))
                            .collect();
                        let pt = &cl.pt[g * sl * k * CL..(g + 1) * sl * k * CL];
                        let hn = &cl.half_norms[g * k * CL..(g + 1) * k * CL];
                        let want = nearest_in_lanes_at(Simd::Scalar, &xs, &taps, pt, hn, k);
                        for &lv in &levels {
                            assert_eq!(nearest_in_lanes_at(lv, &xs, &taps, pt, hn, k), want, "{lv:?}");
                        }
                    }
                }
            }
            // the tree encoder reads channels-last rows too (K = 2 to 256), NaN and
            // infinities among the values (NaN goes left, as `x > t` is false)
            let mut xn = x.clone();
            for (i, v) in xn.iter_mut().enumerate() {
                match i % 41 {
                    3 => *v = f32::NAN,
                    17 => *v = f32::INFINITY,
                    29 => *v = f32::NEG_INFINITY,
                    _ => {}
                }
            }
            let xnh = crate::interp::kernels::to_nhwc(&xn, shape);
            let (nchw, nhwc) = both_layouts(&xn, &xnh, shape, &win, geo);
            for depth in 1..=8 {
                let dims: Vec<usize> = (0..c_n * depth).map(|i| (i * 7 + depth) % s).collect();
                let thr = random_thresholds(&mut rng, c_n, depth);
                let tree = Codebooks::Tree {
                    depth,
                    dims: &dims,
                    thresholds: &thr,
                };
                encode(&nchw, sub, &tree, &mut a);
                let prepared = prepare(sub, &tree, Some((c, kernel[0], kernel[1])));
                encode_prepared(&nhwc, &prepared, &mut b);
                assert_eq!(a, b, "tree {shape:?}");
                // the pixel-lane tree kernel at every level where it applies, on 1 and 3
                // threads (bands of output rows differ)
                if let Some(pt) = &prepared.pixel_tree {
                    for &lv in &levels {
                        for threads in [1, 3] {
                            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                            b.fill(255);
                            if pool.install(|| tree_nhwc(lv, &nhwc, pt, c_n, &mut b)) {
                                assert_eq!(
                                    a, b,
                                    "pixel-lane tree at {lv:?}, depth {depth}, {shape:?}, {threads} threads"
                                );
                            } else {
                                assert_eq!(lv, Simd::Scalar, "the pixel-lane tree runs at {lv:?}");
                            }
                        }
                    }
                } else {
                    panic!("no pixel-lane tree at depth {depth}");
                }
            }
        }
    }

    /// Encoder throughput on ResNet-like layers: a measurement that `docs/bench.sh` runs
    /// (`--release --ignored --nocapture`), not a check.
    #[test]
    #[ignore]
    fn encode_throughput() {
        let mut rng = Rng::new(3);
        for &(n, c, hw, stride, k) in &[
            (64usize, 32usize, 14usize, 0usize, 16usize),
            (16, 512, 1, 0, 16),
            (64usize, 64usize, 14usize, 2usize, 16usize),
            (64, 64, 7, 1, 16),
            (2, 64, 7, 1, 16),
            (64, 16, 7, 1, 16),
            (64, 32, 7, 1, 16),
            (64, 256, 2, 1, 16),
        ] {
            // stride 0: a 1×1 conv with codebooks of 4 channels (the fully connected encoder)
            let (kk, s) = if stride == 0 { (1, 4) } else { (3, 9) };
            let win = Window {
                kernel: [kk, kk],
                strides: [stride.max(1), stride.max(1)],
                dilations: [1, 1],
                padding: Padding::Explicit([kk / 2; 4]),
                ceil_mode: false,
            };
            let x: Vec<f32> = (0..n * c * hw * hw).map(|_| rng.next_f64() as f32).collect();
            let geo = win.resolve([hw, hw]).unwrap();
            let sub = Subspaces { d: c * kk * kk, s };
            let protos: Vec<f32> = (0..sub.d * k).map(|_| rng.next_f64() as f32).collect();
            let prepared = prepare(
                sub,
                &Codebooks::Argmin {
                    k,
                    protos: &protos,
                    act_scale: None,
                    norms: None,
                },
                Some((c, kk, kk)),
            );
            let rows = Rows::ConvNhwc {
                x: &x,
                shape: [n, hw, hw, c],
                win: &win,
                geo,
            };
            let mut codes = vec![0u8; rows.count() * sub.count()];
            encode_prepared(&rows, &prepared, &mut codes);
            let t = std::time::Instant::now();
            let reps = 20 * 64 / n;
            for _ in 0..reps {
                encode_prepared(&rows, &prepared, &mut codes);
            }
            let secs = t.elapsed().as_secs_f64() / reps as f64;
            let units = rows.count() * c.div_ceil(CL);
            let macs = rows.count() * sub.d * k;
            eprintln!(
                "n={n} c={c} hw={hw} s={stride}: {:.3} ms, {:.1} ns/unit, {:.1} GMAC/s",
                secs * 1e3,
                secs * 1e9 / units as f64,
                macs as f64 / secs / 1e9
            );
        }
    }

    /// Throughput of the pixel-lane hash-tree encoder on ResNet-18/16's 3×3 shapes with 3-value
    /// codebooks (a sub-batch of 16 images), per tree depth (6: 64 codes, 7: 128): ns per tree
    /// level and 16 pixels. Run by hand and by `docs/bench.sh`.
    #[test]
    #[ignore]
    fn tree_encode_throughput() {
        let mut rng = Rng::new(4);
        for &(n, c, hw, stride) in &[
            (16usize, 16usize, 32usize, 1usize),
            (16, 32, 16, 1),
            (16, 64, 8, 1),
            (16, 16, 32, 2),
        ] {
            for depth in [6usize, 7] {
                let win = Window {
                    kernel: [3, 3],
                    strides: [stride, stride],
                    dilations: [1, 1],
                    padding: Padding::Explicit([1; 4]),
                    ceil_mode: false,
                };
                let sub = Subspaces { d: c * 9, s: 3 };
                let c_n = sub.count();
                let dims: Vec<usize> = (0..c_n * depth).map(|i| (i * 5 + 1) % 3).collect();
                let thr = random_thresholds(&mut rng, c_n, depth);
                let tree = Codebooks::Tree {
                    depth,
                    dims: &dims,
                    thresholds: &thr,
                };
                let prepared = prepare(sub, &tree, Some((c, 3, 3)));
                let x: Vec<f32> = (0..n * c * hw * hw).map(|_| rng.next_f64() as f32 - 0.3).collect();
                let geo = win.resolve([hw, hw]).unwrap();
                let rows = Rows::ConvNhwc {
                    x: &x,
                    shape: [n, hw, hw, c],
                    win: &win,
                    geo,
                };
                let mut codes = vec![0u8; rows.count() * c_n];
                encode_prepared(&rows, &prepared, &mut codes);
                let reps = 40;
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    encode_prepared(&rows, &prepared, &mut codes);
                }
                let secs = t.elapsed().as_secs_f64() / reps as f64;
                let steps = (rows.count() * c_n * depth) as f64 / 16.0;
                eprintln!(
                    "tree n={n} c={c} hw={hw} s={stride} depth {depth}: {:.3} ms, {:.2} ns per level and 16 pixels",
                    secs * 1e3,
                    secs * 1e9 / steps
                );
            }
        }
    }

    /// The in-register 16 × 16 transpose of contiguous rows puts every value where the scalar
    /// fill does, whole blocks and the columns after them; and the 1×1 channels-last rows it
    /// serves give the codes of the same rows as a matrix.
    #[test]
    fn contiguous_rows_transpose_like_the_scalar_fill() {
        let mut rng = Rng::new(8);
        #[cfg(target_arch = "x86_64")]
        if Simd::Avx512.supported() {
            for d in [16usize, 17, 37, 64] {
                let rows: Vec<f32> = (0..16 * d).map(|_| rng.next_f64() as f32).collect();
                let mut xt = vec![[0f32; LANES]; d];
                // SAFETY: AVX-512F checked; 16 rows of d values.
                unsafe { x86::transpose16_avx512(&rows, d, &mut xt) };
                for (j, col) in xt.iter().enumerate() {
                    for (l, &v) in col.iter().enumerate() {
                        assert_eq!(v.to_bits(), rows[l * d + j].to_bits(), "d={d} row {l} column {j}");
                    }
                }
            }
        }
        let (n, h, w, c, k) = (2usize, 3usize, 7usize, 40usize, 16usize);
        let x: Vec<f32> = (0..n * h * w * c).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let win = Window::pointwise();
        let geo = win.resolve([h, w]).unwrap();
        let sub = Subspaces { d: c, s: 4 };
        let protos: Vec<f32> = (0..c * k).map(|_| rng.next_f64() as f32 - 0.5).collect();
        let cb = Codebooks::Argmin {
            k,
            protos: &protos,
            act_scale: None,
            norms: None,
        };
        let rows = n * h * w;
        let mut a = vec![0u8; rows * sub.count()];
        let mut b = a.clone();
        encode(
            &Rows::ConvNhwc {
                x: &x,
                shape: [n, h, w, c],
                win: &win,
                geo,
            },
            sub,
            &cb,
            &mut a,
        );
        encode(&Rows::Matrix { x: &x, d: c }, sub, &cb, &mut b);
        assert_eq!(a, b);
        // against a direct scan of every row and codebook
        for r in 0..rows {
            for cc in 0..sub.count() {
                let xr = &x[r * c + cc * 4..][..4];
                let dist = |kk: usize| {
                    let p = &protos[(cc * k + kk) * 4..][..4];
                    p.iter().zip(xr).map(|(p, x)| (p - x) * (p - x)).sum::<f32>()
                };
                let best = (0..k).min_by(|&i, &j| dist(i).total_cmp(&dist(j))).unwrap();
                let got = a[r * sub.count() + cc] as usize;
                assert!(dist(got) <= dist(best) + 1e-5, "row {r} codebook {cc}: {got} vs {best}");
            }
        }
    }

    #[test]
    fn nearest_levels_agree_on_many_inputs() {
        let levels = crate::interp::kernels::levels_checked("nearest_levels_agree_on_many_inputs");
        let mut rng = Rng::new(4);
        let (s, k) = (9, 16);
        let pt: Vec<f32> = (0..s * k * CL).map(|_| rng.next_f64() as f32).collect();
        let hn: Vec<f32> = (0..k * CL).map(|_| rng.next_f64() as f32).collect();
        let mut xs = vec![[0f32; CL]; s];
        let all: Vec<usize> = (0..s).collect();
        for i in 0..20000 {
            xs[i % s][i % CL] = i as f32 * 1e-6;
            let want = nearest_in_lanes_at(Simd::Scalar, &xs, &all, &pt, &hn, k);
            // the two-row SIMD kernels, with this row and a partial channel group
            #[cfg(target_arch = "x86_64")]
            for lv in pair_levels() {
                let width = 1 + i % CL;
                let mut part = xs.clone();
                part.iter_mut().for_each(|v| v[width..].fill(0.0));
                let want_part = nearest_in_lanes_at(Simd::Scalar, &part, &all, &pt, &hn, k);
                let mask = if width == CL { u16::MAX } else { (1u16 << width) - 1 };
                let (a, b) = pair_call(lv, &xs, &xs, &all, [u16::MAX; 2], mask, &pt, &hn, k);
                assert_eq!(
                    a[..width],
                    want_part[..width],
                    "call {i}: {lv:?} two-row kernel, {width} lanes"
                );
                assert_eq!(a, b);
                let (full, _) = pair_call(lv, &xs, &xs, &all, [u16::MAX; 2], u16::MAX, &pt, &hn, k);
                assert_eq!(full, want, "call {i}: {lv:?} two-row kernel");
                // tap i % s outside the image for row b only: it reads zeros there
                let mut holed = xs.clone();
                holed[i % s] = [0.0; CL];
                let want_holed = nearest_in_lanes_at(Simd::Scalar, &holed, &all, &pt, &hn, k);
                let (_, b) = pair_call(lv, &xs, &xs, &all, [u16::MAX, !(1 << (i % s))], u16::MAX, &pt, &hn, k);
                assert_eq!(b, want_holed, "call {i}: {lv:?} two-row kernel, one tap outside");
            }
            for &lv in &levels {
                let got = nearest_in_lanes_at(lv, &xs, &all, &pt, &hn, k);
                if got != want {
                    let l = (0..CL).find(|&l| got[l] != want[l]).unwrap();
                    let dist = |kk: usize| {
                        let mut a = 0f32;
                        for t in 0..s {
                            a = xs[t][l].mul_add(pt[(t * k + kk) * CL + l], a);
                        }
                        hn[kk * CL + l] - a
                    };
                    panic!(
                        "call {i} {lv:?} lane {l}: {} (d={}) vs scalar {} (d={})",
                        got[l],
                        dist(got[l] as usize),
                        want[l],
                        dist(want[l] as usize)
                    );
                }
            }
        }
    }

    /// Throughput of one channel-lane argmin call per SIMD level: a measurement that
    /// `docs/bench.sh` runs (`--release --ignored --nocapture`), not a check.
    #[test]
    #[ignore]
    fn nearest_throughput() {
        let mut rng = Rng::new(3);
        let (s, k) = (9, 16);
        let pt: Vec<f32> = (0..s * k * CL).map(|_| rng.next_f64() as f32).collect();
        let hn: Vec<f32> = (0..k * CL).map(|_| rng.next_f64() as f32).collect();
        let mut xs = vec![[0f32; CL]; s];
        let all: Vec<usize> = (0..s).collect();
        for lv in Simd::available() {
            let t = std::time::Instant::now();
            let mut acc = 0u64;
            let reps = 1_000_000;
            for i in 0..reps {
                xs[i % s][i % CL] = i as f32 * 1e-6;
                acc += nearest_in_lanes_at(lv, &xs, &all, &pt, &hn, k)[i % CL] as u64;
            }
            let ns = t.elapsed().as_secs_f64() * 1e9 / reps as f64;
            eprintln!("{lv:?}: {ns:.1} ns per call ({acc})");
        }
    }

    /// The levels with a two-row kernel that this CPU runs.
    #[cfg(target_arch = "x86_64")]
    fn pair_levels() -> Vec<Simd> {
        let levels: Vec<Simd> = [Simd::Avx512, Simd::Avx2]
            .into_iter()
            .filter(|l| l.supported())
            .collect();
        eprintln!("two-row channel-lane kernels tested: {levels:?}");
        levels
    }

    /// The two-row kernel of `lv` on rows `a` and `b` (`inside[r]`: bit `i` set when tap `i`
    /// of row `r` is inside the image).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    fn pair_call(
        lv: Simd,
        a: &[[f32; CL]],
        b: &[[f32; CL]],
        taps: &[usize],
        inside: [u16; 2],
        mask: u16,
        pt: &[f32],
        hn: &[f32],
        k: usize,
    ) -> ([u8; CL], [u8; CL]) {
        let flat: Vec<f32> = a.iter().chain(b).flatten().copied().collect();
        let list: Vec<RowsTap<2>> = taps
            .iter()
            .enumerate()
            .map(|(i, &t)| RowsTap {
                t: t as u32,
                mask: inside.map(|m| if m >> i & 1 == 1 { u16::MAX } else { 0 }),
                off: [i * CL, (a.len() + i) * CL],
            })
            .collect();
        assert!(lv.supported() && k.is_multiple_of(8) && hn.len() >= k * CL);
        assert!(taps.iter().all(|&t| (t + 1) * k * CL <= pt.len()));
        let kernel: NearestN<2> = match lv {
            Simd::Avx512 => x86::nearest_n_avx512::<2>,
            Simd::Avx2 => x86::nearest_n_avx2::<2>,
            Simd::Scalar => unreachable!("no scalar two-row kernel"),
        };
        // SAFETY: the level is supported and every bound of the kernel's contract checked above.
        let [a, b] = unsafe { kernel(&flat, &list, mask, pt, hn, k) };
        (a, b)
    }

    /// Cost of one two-row AVX-512 call on L1-resident data, by tap count (a measurement).
    #[test]
    #[ignore]
    fn nearest2_throughput() {
        #[cfg(target_arch = "x86_64")]
        if Simd::Avx512.supported() {
            let mut rng = Rng::new(3);
            let k = 16;
            let pt: Vec<f32> = (0..9 * k * CL).map(|_| rng.next_f64() as f32).collect();
            let hn: Vec<f32> = (0..k * CL).map(|_| rng.next_f64() as f32).collect();
            let xs: Vec<[f32; CL]> = (0..64)
                .map(|_| std::array::from_fn(|_| rng.next_f64() as f32))
                .collect();
            for n_t in [1usize, 4, 9] {
                let flat: Vec<f32> = xs.iter().flatten().copied().collect();
                let reps = 2_000_000;
                let t = std::time::Instant::now();
                let mut acc = 0u64;
                for i in 0..reps {
                    let taps: [RowsTap<2>; 9] = std::array::from_fn(|j| RowsTap {
                        t: j as u32,
                        mask: [u16::MAX; 2],
                        off: [(i + j) % 64 * CL, (i + j + 7) % 64 * CL],
                    });
                    // SAFETY: AVX-512F checked; every offset reads CL floats inside `flat`.
                    let [a, b] = unsafe { x86::nearest_n_avx512::<2>(&flat, &taps[..n_t], u16::MAX, &pt, &hn, k) };
                    acc += (a[i % CL] + b[0]) as u64;
                }
                let ns = t.elapsed().as_secs_f64() * 1e9 / reps as f64;
                eprintln!("{n_t} taps: {ns:.1} ns per two-row call ({acc})");
            }
        }
    }

    /// Ties go to the lowest index in every kernel, and NaN distances never win.
    #[test]
    fn channel_lanes_break_ties_like_a_sequential_scan() {
        let k = 32;
        let s = 2;
        // prototypes 3, 9, 17 and 30 all at distance 0 from x = (1, 1) in every lane; the rest far
        let mut pt = vec![5.0f32; s * k * CL];
        let mut hn = vec![25.0f32; k * CL];
        for &kk in &[3usize, 9, 17, 30] {
            for t in 0..s {
                for l in 0..CL {
                    pt[(t * k + kk) * CL + l] = 1.0;
                }
            }
            for l in 0..CL {
                hn[kk * CL + l] = 1.0;
            }
        }
        let xs = vec![[1.0f32; CL]; s];
        let all: Vec<usize> = (0..s).collect();
        let levels = crate::interp::kernels::levels_checked("channel_lanes_break_ties_like_a_sequential_scan");
        for &lv in &levels {
            assert_eq!(nearest_in_lanes_at(lv, &xs, &all, &pt, &hn, k), [3u8; CL], "{lv:?}");
        }
        let nan = vec![[f32::NAN; CL]; s];
        for &lv in &levels {
            assert_eq!(nearest_in_lanes_at(lv, &nan, &all, &pt, &hn, k), [0u8; CL], "{lv:?}");
        }
        // prototypes at a NaN distance (a NaN half norm) never win, wherever they stand: before
        // the ties, inside a block of 8 with them, first of a block
        let mut hn_nan = hn.clone();
        for &kk in &[0usize, 2, 8, 16, 31] {
            hn_nan[kk * CL..(kk + 1) * CL].fill(f32::NAN);
        }
        for &lv in &levels {
            assert_eq!(nearest_in_lanes_at(lv, &xs, &all, &pt, &hn_nan, k), [3u8; CL], "{lv:?}");
        }
        #[cfg(target_arch = "x86_64")]
        for lv in pair_levels() {
            let (a, b) = pair_call(lv, &xs, &xs, &all, [u16::MAX; 2], u16::MAX, &pt, &hn_nan, k);
            assert_eq!((a, b), ([3u8; CL], [3u8; CL]), "{lv:?}");
        }
        // the two-row kernels: one row of ties, one of NaNs
        #[cfg(target_arch = "x86_64")]
        for lv in pair_levels() {
            let (a, b) = pair_call(lv, &xs, &nan, &all, [u16::MAX; 2], u16::MAX, &pt, &hn, k);
            assert_eq!((a, b), ([3u8; CL], [0u8; CL]), "{lv:?}");
        }
    }

    fn conv_case(shape: [usize; 4], win: Window) {
        let mut rng = Rng::new(8);
        let x: Vec<f32> = (0..shape.iter().product()).map(|_| rng.next_f64() as f32).collect();
        let geo = win.resolve([shape[2], shape[3]]).unwrap();
        let rows = crate::interp::kernels::conv::im2col_rows(&x, shape, &win).unwrap();
        let d = shape[1] * win.kernel[0] * win.kernel[1];
        let sub = Subspaces { d, s: 6 };
        let (k, c_n) = (16, sub.count());
        let protos: Vec<f32> = (0..c_n * k * 6).map(|_| rng.next_f64() as f32).collect();
        let n_rows = rows.len() / d;
        let mut a = vec![0u8; n_rows * c_n];
        let mut b = vec![0u8; n_rows * c_n];
        encode_argmin(rows.as_slice().unwrap(), n_rows, sub, k, &protos, None, None, &mut a);
        encode(
            &Rows::Conv {
                x: &x,
                shape,
                win: &win,
                geo,
            },
            sub,
            &Codebooks::Argmin {
                k,
                protos: &protos,
                act_scale: None,
                norms: None,
            },
            &mut b,
        );
        assert_eq!(a, b);
        let dims: Vec<usize> = (0..c_n * 4).map(|i| (i * 5) % 6).collect();
        let thr: Vec<f32> = (0..c_n * 15).map(|_| rng.next_f64() as f32).collect();
        let tree = Codebooks::Tree {
            depth: 4,
            dims: &dims,
            thresholds: &thr,
        };
        encode_tree(rows.as_slice().unwrap(), n_rows, sub, 4, &dims, &thr, &mut a);
        encode(
            &Rows::Conv {
                x: &x,
                shape,
                win: &win,
                geo,
            },
            sub,
            &tree,
            &mut b,
        );
        assert_eq!(a, b);
    }
}
