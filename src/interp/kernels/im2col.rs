//! im2col: unfold the receptive fields of one image into a `(C·kh·kw) × (oh·ow)` matrix whose
//! row order `(c, i, j)` matches a `[M, C, kh, kw]` weight flattened to `M × (C·kh·kw)`.

use crate::ir::op::Window;
use crate::ir::window::Geometry;

/// `x`: one image `C×H×W`; `cols`: `(C·kh·kw) × (oh·ow)`, fully overwritten (zeros in padding).
pub fn im2col(x: &[f32], c: usize, hw: [usize; 2], win: &Window, geo: &Geometry, cols: &mut [f32]) {
    im2col_strided(x, c, hw, win, geo, cols, geo.out[0] * geo.out[1])
}

/// [`im2col`] into the first `oh·ow` columns of a matrix whose rows are `ld` apart (several
/// images side by side, for one GEMM over the whole batch).
pub fn im2col_strided(x: &[f32], c: usize, hw: [usize; 2], win: &Window, geo: &Geometry, cols: &mut [f32], ld: usize) {
    let [h, w] = hw;
    let [kh, kw] = win.kernel;
    let [oh, ow] = geo.out;
    let p = oh * ow;
    assert!(c * kh * kw == 0 || ld >= p && cols.len() >= (c * kh * kw - 1) * ld + p);
    debug_assert_eq!(x.len(), c * h * w);
    for ch in 0..c {
        let plane = &x[ch * h * w..(ch + 1) * h * w];
        for i in 0..kh {
            for j in 0..kw {
                let row = &mut cols[((ch * kh + i) * kw + j) * ld..][..p];
                let di = (i * win.dilations[0]) as isize - geo.pads[0] as isize;
                let dj = (j * win.dilations[1]) as isize - geo.pads[1] as isize;
                for y in 0..oh {
                    let sy = (y * win.strides[0]) as isize + di;
                    let out = &mut row[y * ow..(y + 1) * ow];
                    if sy < 0 || sy >= h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[sy as usize * w..(sy as usize + 1) * w];
                    // Outputs x whose source column x·stride + dj is inside the row: [lo, hi).
                    let st = win.strides[1] as isize;
                    let lo = if dj >= 0 { 0 } else { ((-dj + st - 1) / st) as usize }.min(ow);
                    let hi = if (w as isize) <= dj {
                        0
                    } else {
                        ((w as isize - dj + st - 1) / st) as usize
                    }
                    .clamp(lo, ow);
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    if hi > lo {
                        let first = (lo as isize * st + dj) as usize;
                        if st == 1 {
                            out[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                        } else {
                            for (o, v) in out[lo..hi].iter_mut().zip(src[first..].iter().step_by(st as usize)) {
                                *o = *v;
                            }
                        }
                    }
                }
            }
        }
    }
}
