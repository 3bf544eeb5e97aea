//! Calibration: what the `lut` pass learns from. Running a graph (exact, or approximated up to
//! the layer being learned) over sampled calibration images and collecting the sampled rows
//! of its values ([`collect`]), finding what follows a layer up to the end of its block
//! ([`epilogue`]), and learning a layer's codebooks and tables by gradient descent
//! ([`learn`]). The `lut` pass only decides which layers to replace and rewrites the graph.

pub mod epilogue;
pub mod global;
pub mod grad;
pub mod learn;
pub mod mask;

use crate::error::Result;
use crate::interp::Plan;
use crate::ir::infer::infer_graph;
use crate::ir::{Graph, Outlet, Tensor};
use crate::passes::{channels_last::ChannelsLast, im2col_to_conv::Im2colToConv, Pass, PassCx};
use crate::pq::rng::Rng;
use ndarray::{ArrayD, Axis};
use std::sync::Arc;

/// The calibration rows one layer learns from: a random subset of the images, big enough to
/// offer 4× the rows needed (so early layers, with many rows per image, do not run the whole
/// set) but never more images than rows (so a fully connected layer does not run the whole of
/// a large set: the cost is bounded by `max_rows`, whatever the set's size), and sorted row
/// indices into that subset's rows.
pub struct Sample {
    pub images: Vec<usize>,
    /// `image_in_subset · rows_per_image + row_in_image`, increasing.
    pub rows: Vec<usize>,
    pub rows_per_image: usize,
}

impl Sample {
    pub fn new(rng: &mut Rng, n_images: usize, rows_per_image: usize, max_rows: usize) -> Sample {
        let rows_per_image = rows_per_image.max(1);
        let n_used = max_rows
            .saturating_mul(4)
            .div_ceil(rows_per_image)
            .clamp(1, n_images.min(max_rows).max(1));
        let images = rng.sample_indices(n_images, n_used);
        let rows = rng.sample_indices(n_used * rows_per_image, max_rows);
        Sample {
            images,
            rows,
            rows_per_image,
        }
    }
}

/// How to read rows out of a value.
#[derive(Clone, Debug)]
pub enum Layout {
    /// The layer's own layout: rows are the flattened leading dimensions, the last dimension
    /// is the row (`width` values).
    Rows,
    /// A value holding the layer's rows permuted (layout ops after the layer): per image,
    /// element `p·m + j` of the layer's layout sits at `perm[p·m + j]`.
    Mapped { perm: Vec<u32>, m: usize },
}

/// A plan running `graph` cut down to the values `wanted` (its outputs, in that order) and
/// rewritten as the default pipeline leaves the layers it keeps exact: `Im2Col → MatMul` chains
/// folded back into `Conv` and activations kept channels-last (`im2col-to-conv`,
/// `channels-last`), so the direct convolution kernels run them. The passes leave graph
/// outputs in place, so each wanted value keeps its layout (a chain whose values are wanted is
/// left as it is) and only float rounding changes: the exact convolutions' summation order, a
/// global average pool run as a channels-last mean, residual adds and ReLUs fused into the
/// convolutions.
///
/// Calibration runs the exact model and the prefix approximated so far over thousands of
/// images; in the `conv-to-im2col` form the two took 8 ms per image on the ResNet-18/16
/// fixture (the `[N, pixels, C·kh·kw]` matrices and their GEMMs), more than ten times its
/// inference.
pub fn plan(graph: &Graph, wanted: &[Outlet]) -> Result<Plan<'static>> {
    let mut g = graph.clone();
    g.outputs = wanted
        .iter()
        .enumerate()
        .map(|(i, o)| (format!("calib.{i}"), *o))
        .collect();
    g.remove_dead();
    let mut cx = PassCx::default();
    for pass in [&Im2colToConv as &dyn Pass, &ChannelsLast] {
        pass.run(&mut g, &mut cx)?;
        infer_graph(&mut g)?;
    }
    Plan::owning(Arc::new(g))
}

/// [`plan`] for the model's first output (its logits), or an error when it has none.
pub fn output_plan(graph: &Graph) -> Result<Plan<'static>> {
    let (_, out) = graph
        .outputs
        .first()
        .ok_or_else(|| crate::error::Error::Other("the graph has no output".into()))?;
    plan(graph, &[*out])
}

/// Run `graph` over the sampled images and collect the sampled rows of each requested value;
/// returns `(rows × width values, width)` per request.
pub fn collect(
    graph: &Graph,
    calib: &ArrayD<f32>,
    sample: &Sample,
    wanted: &[(Outlet, Layout)],
) -> Result<Vec<(Vec<f32>, usize)>> {
    let outlets: Vec<Outlet> = wanted.iter().map(|(o, _)| *o).collect();
    let plan = plan(graph, &outlets)?;
    let subset = calib.select(Axis(0), &sample.images);
    let rpi = sample.rows_per_image;
    let idx = &sample.rows;
    let mut out: Vec<(Vec<f32>, usize)> = vec![(Vec::new(), 0); wanted.len()];
    let mut next = 0usize;
    const CHUNK: usize = 64;
    for (ci, chunk) in subset.axis_chunks_iter(Axis(0), CHUNK).enumerate() {
        let n = chunk.shape()[0];
        let start = ci * CHUNK * rpi;
        let end = start + n * rpi;
        if next >= idx.len() {
            break;
        }
        if idx[next] >= end {
            continue;
        }
        let values = plan.run(vec![Tensor::F32(chunk.to_owned())])?;
        let stop = idx[next..]
            .iter()
            .position(|&r| r >= end)
            .map_or(idx.len(), |p| next + p);
        for ((t, (_, layout)), (rows_out, width)) in values.into_iter().zip(wanted).zip(out.iter_mut()) {
            let t = t.into_f32()?;
            let t = t.as_standard_layout();
            let data = t.as_slice().expect("standard layout");
            let per_image = data.len() / n.max(1);
            match layout {
                Layout::Rows => {
                    *width = *t.shape().last().unwrap_or(&1);
                    for &r in &idx[next..stop] {
                        let r = r - start;
                        rows_out.extend_from_slice(&data[r * *width..(r + 1) * *width]);
                    }
                }
                Layout::Mapped { perm, m } => {
                    *width = *m;
                    for &r in &idx[next..stop] {
                        let (img, p) = ((r - start) / rpi, (r - start) % rpi);
                        let base = img * per_image;
                        let pr = &perm[p * m..(p + 1) * m];
                        rows_out.extend(pr.iter().map(|&q| data[base + q as usize]));
                    }
                }
            }
        }
        next = stop;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_runs_at_most_max_rows_images_and_offers_four_times_the_rows_where_it_can() {
        // (images, rows per image, max_rows) → images run
        for (n, rpi, max_rows, used) in [
            (60_000, 1, 16_384, 16_384), // a fully connected layer: one row per image, all taken
            (60_000, 2, 1000, 1000),
            (60_000, 16, 16_384, 4096), // a 4×4 map: 4× the rows needed
            (60_000, 784, 16_384, 84),
            (8, 784, 500, 3),
            (10, 1, 100, 10), // fewer images than rows: all of them
        ] {
            let s = Sample::new(&mut Rng::new(1), n, rpi, max_rows);
            assert_eq!(s.images.len(), used, "{n} images, {rpi} rows each, max_rows {max_rows}");
            assert!(s.images.iter().all(|&i| i < n));
            assert_eq!(s.rows.len(), max_rows.min(used * rpi));
            assert!(s.rows.windows(2).all(|w| w[0] < w[1]) && s.rows.iter().all(|&r| r < used * rpi));
        }
    }
}
