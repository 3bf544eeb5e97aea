//! Output-size and padding arithmetic for 2-D window ops (Conv, MaxPool, AveragePool), shared
//! by shape inference and the kernels so the two can never disagree.

use super::op::{Conv, Padding, Window};
use crate::bail;
use crate::error::Result;

/// Resolved geometry for one input size: `pads = [top, left, bottom, right]`, `out = [oh, ow]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub pads: [usize; 4],
    pub out: [usize; 2],
}

/// Largest padded input size, dilated kernel extent or stride accepted (2^31 − 1).
pub const WINDOW_LIMIT: usize = i32::MAX as usize;

impl Window {
    /// A 1×1 window of stride 1 without padding: one row per pixel.
    pub fn pointwise() -> Window {
        Window {
            kernel: [1, 1],
            strides: [1, 1],
            dilations: [1, 1],
            padding: Padding::Explicit([0; 4]),
            ceil_mode: false,
        }
    }

    /// Effective (dilated) kernel extent along axis `i` (saturating: [`Window::resolve`] rejects
    /// an extent that does not fit).
    pub fn extent(&self, i: usize) -> usize {
        self.kernel[i]
            .saturating_sub(1)
            .saturating_mul(self.dilations[i])
            .saturating_add(1)
    }

    /// Pads and output size for one input size. All arithmetic is checked: huge kernels, pads,
    /// strides or dilations from a file give an error, never an overflow.
    pub fn resolve(&self, input: [usize; 2]) -> Result<Geometry> {
        let mut pads = [0usize; 4];
        let mut out = [0usize; 2];
        for i in 0..2 {
            let (s, n) = (self.strides[i], input[i]);
            if s == 0 || self.kernel[i] == 0 || self.dilations[i] == 0 {
                bail!("kernel, stride and dilation must be positive");
            }
            let k = self.kernel[i]
                .checked_sub(1)
                .and_then(|k| k.checked_mul(self.dilations[i]))
                .and_then(|k| k.checked_add(1));
            let Some(k) = k else {
                bail!(
                    "kernel {} with dilation {} overflows",
                    self.kernel[i],
                    self.dilations[i]
                );
            };
            let (begin, end) = match &self.padding {
                Padding::Explicit(p) => (p[i], p[i + 2]),
                Padding::Valid => (0, 0),
                Padding::SameUpper | Padding::SameLower => {
                    let target = n.div_ceil(s);
                    let Some(full) = target.saturating_sub(1).checked_mul(s).and_then(|v| v.checked_add(k)) else {
                        bail!("SAME padding of a window of extent {k} with stride {s} overflows");
                    };
                    let total = full.saturating_sub(n);
                    let small = total / 2;
                    if matches!(self.padding, Padding::SameUpper) {
                        (small, total - small)
                    } else {
                        (total - small, small)
                    }
                }
            };
            let Some(padded) = n.checked_add(begin).and_then(|v| v.checked_add(end)) else {
                bail!("input size {n} with pads ({begin}, {end}) overflows");
            };
            // Keeps every index the kernels compute (in isize) far from overflow.
            if padded > WINDOW_LIMIT || s > WINDOW_LIMIT || k > WINDOW_LIMIT {
                bail!(
                    "window geometry (input {n}, pads ({begin}, {end}), extent {k}, stride {s}) exceeds {WINDOW_LIMIT}"
                );
            }
            if padded < k {
                bail!("window of extent {k} does not fit input size {n} with pads ({begin}, {end})");
            }
            let span = padded - k;
            let mut o = if self.ceil_mode {
                span.div_ceil(s) + 1
            } else {
                span / s + 1
            };
            // ceil_mode must not start a window entirely inside the end padding
            // (PyTorch and ONNX Runtime drop such a window).
            if self.ceil_mode && o > 1 && (o - 1) * s >= n + begin {
                o -= 1;
            }
            pads[i] = begin;
            pads[i + 2] = end;
            out[i] = o;
        }
        Ok(Geometry { pads, out })
    }
}

/// `[H, W]` of an NCHW (`nhwc`: NHWC) shape whose spatial sizes are known (the batch may be
/// symbolic).
pub fn spatial(shape: &[super::fact::Dim], nhwc: bool) -> Option<[usize; 2]> {
    let known = |d: &super::fact::Dim| usize::try_from(d.known()?).ok();
    match (shape, nhwc) {
        ([_, _, h, w], false) | ([_, h, w, _], true) => Some([known(h)?, known(w)?]),
        _ => None,
    }
}

/// The smaller convolution that gives the same outputs when some kernel rows or columns only ever
/// meet padding (small inputs: a 3×3 kernel on a 1×1 or 2×2 map with stride 2), with the first
/// kept tap `[i0, j0]`; `None` when every tap is used (or the padding cannot absorb the shift).
pub fn pruned_taps(conv: &Conv, hw: [usize; 2]) -> Result<Option<(Conv, [usize; 2])>> {
    let win = &conv.window;
    let geo = win.resolve(hw)?;
    let mut first = [0usize; 2];
    let mut kept = [0usize; 2];
    for a in 0..2 {
        let used = |i: usize| {
            (0..geo.out[a]).any(|y| {
                let at = (y * win.strides[a] + i * win.dilations[a]) as isize - geo.pads[a] as isize;
                at >= 0 && at < hw[a] as isize
            })
        };
        let taps: Vec<usize> = (0..win.kernel[a]).filter(|&i| used(i)).collect();
        let (Some(&lo), Some(&hi)) = (taps.first(), taps.last()) else {
            return Ok(None);
        };
        if lo * win.dilations[a] > geo.pads[a] {
            return Ok(None);
        }
        first[a] = lo;
        kept[a] = hi - lo + 1;
    }
    if kept == win.kernel {
        return Ok(None);
    }
    // Same outputs: shift the leading pad by the dropped taps, size the trailing pad so the
    // output size is unchanged, and check that it is.
    let mut pads = [0usize; 4];
    for a in 0..2 {
        pads[a] = geo.pads[a] - first[a] * win.dilations[a];
        let extent = (kept[a] - 1) * win.dilations[a] + 1;
        let need = (geo.out[a] - 1) * win.strides[a] + extent;
        pads[a + 2] = need.saturating_sub(hw[a] + pads[a]);
    }
    let small = Window {
        kernel: kept,
        strides: win.strides,
        dilations: win.dilations,
        padding: Padding::Explicit(pads),
        ceil_mode: false,
    };
    if small.resolve(hw)?.out != geo.out {
        return Ok(None);
    }
    Ok(Some((
        Conv {
            window: small,
            ..conv.clone()
        },
        first,
    )))
}

/// `w[m][c][i0 + i][j0 + j]` for `i < kept[0]`, `j < kept[1]` of a `[M, C, kh, kw]` weight.
pub fn slice_taps(w: &[f32], ws: &[usize], [i0, j0]: [usize; 2], kept: [usize; 2]) -> Vec<f32> {
    let (mc, kh, kw) = (ws[0] * ws[1], ws[2], ws[3]);
    let mut out = Vec::with_capacity(mc * kept[0] * kept[1]);
    for plane in w.chunks_exact(kh * kw).take(mc) {
        for i in 0..kept[0] {
            out.extend_from_slice(&plane[(i0 + i) * kw + j0..][..kept[1]]);
        }
    }
    out
}

/// [`pruned_taps`] with the weight `w` (`ws`: `[M, C, kh, kw]`) sliced to the kept taps: the
/// smaller convolution and its weights, or `None` when every tap is used.
pub fn pruned_weights(conv: &Conv, hw: [usize; 2], w: &[f32], ws: &[usize]) -> Result<Option<(Conv, Vec<f32>)>> {
    Ok(pruned_taps(conv, hw)?.map(|(small, first)| {
        let sliced = slice_taps(w, ws, first, small.window.kernel);
        (small, sliced)
    }))
}
