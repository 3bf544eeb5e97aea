//! Output-size and padding arithmetic for 2-D window ops (Conv, MaxPool, AveragePool), shared
//! by shape inference and the kernels so the two can never disagree.

use super::op::{Padding, Window};
use crate::bail;
use crate::error::Result;

/// Resolved geometry for one input size: `pads = [top, left, bottom, right]`, `out = [oh, ow]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub pads: [usize; 4],
    pub out: [usize; 2],
}

impl Window {
    /// Effective (dilated) kernel extent along axis `i`.
    pub fn extent(&self, i: usize) -> usize {
        (self.kernel[i] - 1) * self.dilations[i] + 1
    }

    pub fn resolve(&self, input: [usize; 2]) -> Result<Geometry> {
        let mut pads = [0usize; 4];
        let mut out = [0usize; 2];
        for i in 0..2 {
            let (k, s, n) = (self.extent(i), self.strides[i], input[i]);
            if s == 0 {
                bail!("stride must be positive");
            }
            let (begin, end) = match &self.padding {
                Padding::Explicit(p) => (p[i], p[i + 2]),
                Padding::Valid => (0, 0),
                Padding::SameUpper | Padding::SameLower => {
                    let target = n.div_ceil(s);
                    let total = ((target.saturating_sub(1)) * s + k).saturating_sub(n);
                    let small = total / 2;
                    if matches!(self.padding, Padding::SameUpper) {
                        (small, total - small)
                    } else {
                        (total - small, small)
                    }
                }
            };
            let padded = n + begin + end;
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
