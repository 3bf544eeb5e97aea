//! Max and average pooling over 2-D windows, global pooling, and LRN; one (image, channel)
//! plane per task.

use crate::error::Result;
use crate::ir::op::{Pool, PoolKind};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

pub fn pool2d(x: &[f32], shape: [usize; 4], pool: &Pool) -> Result<ArrayD<f32>> {
    let [n, c, h, w] = shape;
    let win = &pool.window;
    let geo = win.resolve([h, w])?;
    let [oh, ow] = geo.out;
    let [kh, kw] = win.kernel;
    let [sh, sw] = win.strides;
    let [dh, dw] = win.dilations;
    let (pt, pl, pb, pr) = (
        geo.pads[0] as isize,
        geo.pads[1] as isize,
        geo.pads[2] as isize,
        geo.pads[3] as isize,
    );
    let mut out = vec![0f32; n * c * oh * ow];
    out.par_chunks_mut(oh * ow).enumerate().for_each(|(plane_idx, dst)| {
        let src = &x[plane_idx * h * w..(plane_idx + 1) * h * w];
        for y in 0..oh {
            for xo in 0..ow {
                let y0 = (y * sh) as isize - pt;
                let x0 = (xo * sw) as isize - pl;
                let mut acc = match pool.kind {
                    PoolKind::Max => f32::NEG_INFINITY,
                    PoolKind::Avg { .. } => 0.0,
                };
                let (mut inside, mut in_padded) = (0usize, 0usize);
                for i in 0..kh {
                    let sy = y0 + (i * dh) as isize;
                    if sy >= -pt && sy < h as isize + pb {
                        for j in 0..kw {
                            let sx = x0 + (j * dw) as isize;
                            if sx < -pl || sx >= w as isize + pr {
                                continue;
                            }
                            in_padded += 1;
                            if sy < 0 || sy >= h as isize || sx < 0 || sx >= w as isize {
                                continue;
                            }
                            inside += 1;
                            let v = src[sy as usize * w + sx as usize];
                            match pool.kind {
                                PoolKind::Max => acc = acc.max(v),
                                PoolKind::Avg { .. } => acc += v,
                            }
                        }
                    }
                }
                dst[y * ow + xo] = match pool.kind {
                    PoolKind::Max => acc,
                    PoolKind::Avg {
                        count_include_pad: true,
                    } => acc / in_padded.max(1) as f32,
                    PoolKind::Avg {
                        count_include_pad: false,
                    } => acc / inside.max(1) as f32,
                };
            }
        }
    });
    Ok(ArrayD::from_shape_vec(IxDyn(&[n, c, oh, ow]), out).expect("pool output size"))
}

/// Global average or max over all spatial positions of each (image, channel).
pub fn global_pool(x: &[f32], shape: &[usize], max: bool) -> ArrayD<f32> {
    let plane: usize = shape[2..].iter().product();
    let out: Vec<f32> = x
        .par_chunks(plane.max(1))
        .map(|p| {
            if max {
                p.iter().copied().fold(f32::NEG_INFINITY, f32::max)
            } else {
                p.iter().sum::<f32>() / plane as f32
            }
        })
        .collect();
    let mut oshape = shape[..2].to_vec();
    oshape.extend(std::iter::repeat_n(1, shape.len() - 2));
    ArrayD::from_shape_vec(IxDyn(&oshape), out).expect("global pool output size")
}

/// Local response normalisation across channels (ONNX LRN).
pub fn lrn(x: &[f32], shape: &[usize], size: usize, alpha: f32, beta: f32, bias: f32) -> ArrayD<f32> {
    let c = shape[1];
    let plane: usize = shape[2..].iter().product();
    let lo = (size - 1) / 2;
    let hi = (size - 1).div_ceil(2);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(c * plane).enumerate().for_each(|(img, dst)| {
        let src = &x[img * c * plane..(img + 1) * c * plane];
        for ch in 0..c {
            let from = ch.saturating_sub(lo);
            let to = (ch + hi).min(c - 1);
            for p in 0..plane {
                let sq: f32 = (from..=to).map(|k| src[k * plane + p] * src[k * plane + p]).sum();
                dst[ch * plane + p] = src[ch * plane + p] / (bias + alpha / size as f32 * sq).powf(beta);
            }
        }
    });
    ArrayD::from_shape_vec(IxDyn(shape), out).expect("lrn output size")
}
