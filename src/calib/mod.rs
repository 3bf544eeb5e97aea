//! Calibration: what the `lut` pass learns from. Running a graph (exact, or approximated up to
//! the layer being learned) over sampled calibration images and collecting the sampled rows
//! of its values ([`collect`]), finding what follows a layer up to the end of its block
//! ([`epilogue`]), fitting a layer's codebooks and tables ([`fit`]) and learning them by
//! gradient descent ([`learn`]). The `lut` pass only decides which layers to replace and how
//! (a [`fit::Plan`]), and rewrites the graph.

pub mod compensate;
pub mod epilogue;
pub mod fit;
pub mod global;
pub mod grad;
pub mod learn;
pub mod mask;
pub mod resume;

use crate::error::Result;
use crate::interp::Plan;
use crate::ir::infer::infer_graph;
use crate::ir::{Graph, Outlet};
use crate::passes::{channels_last::ChannelsLast, im2col_to_conv::Im2colToConv, Pass, PassCx};
use crate::pq::rng::Rng;
use ndarray::ArrayD;
pub use resume::Resume;
use std::sync::Arc;

/// The calibration rows one layer learns from: the first images of the pass's random order
/// ([`order`]), enough to offer 4× the rows needed (so early layers, with many rows per image,
/// do not run the whole set) but never more images than rows (so a fully connected layer does
/// not run the whole of a large set: the cost is bounded by `max_rows`, whatever the set's
/// size), and sorted row indices into those images' rows. Every layer's images are a prefix of
/// the same order, so the next layer's run can resume from this one's ([`resume`]); the rows
/// are numbered and collected as if the images ran in increasing index order, so what a layer
/// is fitted on depends on which images and rows were drawn, not on the order they ran in (with
/// all images drawn, as for small sets, the rows of a sorted run) — up to the rounding of
/// kernels whose bits depend on how many images run together (`interp::split::SubBatch`).
pub struct Sample {
    /// The images, in the order they run (a prefix of [`order`]).
    pub images: Vec<usize>,
    /// Per image (as `images`), its rank among them by index.
    rank: Vec<usize>,
    /// `rank · rows_per_image + row_in_image`, increasing.
    pub rows: Vec<usize>,
    pub rows_per_image: usize,
}

/// The order layers draw their calibration images in: `min(n_images, max_rows)` distinct
/// images in random order (every prefix a uniform sample).
pub fn order(rng: &mut Rng, n_images: usize, max_rows: usize) -> Vec<usize> {
    let mut v = rng.sample_indices(n_images, n_images.min(max_rows).max(1));
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
    v
}

impl Sample {
    /// The sample of a layer with `rows_per_image` rows per image, its images the first of
    /// `order` ([`order`] for `max_rows`), its rows drawn by `rng`.
    pub fn new(rng: &mut Rng, order: &[usize], rows_per_image: usize, max_rows: usize) -> Sample {
        let rows_per_image = rows_per_image.max(1);
        let n_used = max_rows
            .saturating_mul(4)
            .div_ceil(rows_per_image)
            .clamp(1, order.len().min(max_rows).max(1))
            .min(order.len());
        let images = order[..n_used].to_vec();
        let mut by_index: Vec<usize> = (0..n_used).collect();
        by_index.sort_unstable_by_key(|&p| images[p]);
        let mut rank = vec![0; n_used];
        for (r, &p) in by_index.iter().enumerate() {
            rank[p] = r;
        }
        let rows = rng.sample_indices(n_used * rows_per_image, max_rows);
        Sample {
            images,
            rank,
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
    let mut g = with_outputs(graph, wanted);
    g.remove_dead();
    plan_graph(g)
}

/// A copy of `graph` whose outputs are `wanted` (named `calib.{i}`).
fn with_outputs(graph: &Graph, wanted: &[Outlet]) -> Graph {
    let mut g = graph.clone();
    g.outputs = wanted
        .iter()
        .enumerate()
        .map(|(i, o)| (format!("calib.{i}"), *o))
        .collect();
    g
}

/// [`plan`] for a graph whose outputs are already the wanted values.
fn plan_graph(mut g: Graph) -> Result<Plan<'static>> {
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
/// returns `(rows × width values, width)` per request. The run resumes from `resume` where it
/// can and leaves there the graph's values past `advance` ([`resume`]).
pub fn collect(
    graph: &Graph,
    calib: &ArrayD<f32>,
    sample: &Sample,
    wanted: &[(Outlet, Layout)],
    resume: &mut Resume,
    advance: Option<Outlet>,
) -> Result<Vec<(Vec<f32>, usize)>> {
    let outlets: Vec<Outlet> = wanted.iter().map(|(o, _)| *o).collect();
    let mut runs = resume.plan(graph, &outlets, sample.images.len(), advance)?;
    let rpi = sample.rows_per_image;
    let idx = &sample.rows;
    let mut out: Vec<(Vec<f32>, usize)> = vec![(Vec::new(), 0); wanted.len()];
    // per image: the run of `idx` holding its rows (by its rank)
    let span = |p: usize| {
        let r0 = sample.rank[p] * rpi;
        let a = idx.partition_point(|&r| r < r0);
        (r0, a, a + idx[a..].partition_point(|&r| r < r0 + rpi))
    };
    const CHUNK: usize = 64;
    // chunks of the resumed images, then of the others
    let (resumed, total) = (runs.resumed, runs.total);
    let chunks = (0..resumed)
        .step_by(CHUNK)
        .map(|s| (s, (s + CHUNK).min(resumed)))
        .chain((resumed..total).step_by(CHUNK).map(|s| (s, (s + CHUNK).min(total))));
    for (s, e) in chunks {
        let wanted_images = s < sample.images.len();
        let has_rows = wanted_images
            && (s..e.min(sample.images.len())).any(|p| {
                let (_, a, b) = span(p);
                a < b
            });
        if !has_rows && !runs.keeps_cut() {
            continue;
        }
        let values = runs.run(resume, calib, &sample.images, (s, e))?;
        if !wanted_images {
            continue;
        }
        let n = e - s;
        for ((t, (_, layout)), (rows_out, width)) in values.into_iter().zip(wanted).zip(out.iter_mut()) {
            let t = t.into_f32()?;
            let t = t.as_standard_layout();
            let data = t.as_slice().expect("standard layout");
            let per_image = data.len() / n.max(1);
            *width = match layout {
                Layout::Rows => *t.shape().last().unwrap_or(&1),
                Layout::Mapped { m, .. } => *m,
            };
            let w = *width;
            rows_out.resize(idx.len() * w, 0.0);
            for p in s..e.min(sample.images.len()) {
                let (r0, a, b) = span(p);
                let image = &data[(p - s) * per_image..(p - s + 1) * per_image];
                for (d, &r) in idx[a..b].iter().enumerate() {
                    let (row, dst) = (r - r0, &mut rows_out[(a + d) * w..(a + d + 1) * w]);
                    match layout {
                        Layout::Rows => dst.copy_from_slice(&image[row * w..(row + 1) * w]),
                        Layout::Mapped { perm, m } => {
                            let pr = &perm[row * m..(row + 1) * m];
                            dst.iter_mut().zip(pr).for_each(|(v, &q)| *v = image[q as usize]);
                        }
                    }
                }
            }
        }
    }
    *resume = runs.finish();
    resume.last_resumed = resumed.min(sample.images.len());
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
            let order = order(&mut Rng::new(2), n, max_rows);
            let s = Sample::new(&mut Rng::new(1), &order, rpi, max_rows);
            assert_eq!(s.images.len(), used, "{n} images, {rpi} rows each, max_rows {max_rows}");
            assert_eq!(s.images, order[..used], "a prefix of the order");
            let distinct: std::collections::BTreeSet<_> = order.iter().collect();
            assert!(distinct.len() == order.len() && order.iter().all(|&i| i < n));
            assert_eq!(s.rows.len(), max_rows.min(used * rpi));
            assert!(s.rows.windows(2).all(|w| w[0] < w[1]) && s.rows.iter().all(|&r| r < used * rpi));
        }
        let empty = Sample::new(&mut Rng::new(1), &[], 4, 100);
        assert!(empty.images.is_empty() && empty.rows.is_empty());
    }
}
