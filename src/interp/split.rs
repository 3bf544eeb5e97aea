//! Running a large batch in sub-batches that keep their activations in cache.
//!
//! At batch 64 the early activations of a small-image CNN (28×28×16 floats are 50 KB per
//! image) add up to several megabytes, so every layer streams them through L3 or memory. When
//! the graph computes each image on its own ([`crate::onnx::import::batch_is_per_image`]),
//! [`super::Plan::run`] splits the batch into sub-batches whose largest activation fits in
//! [`SUB_BATCH_BYTES`] and concatenates their outputs; with several threads the sub-batches run
//! at the same time, one per thread, rather than every layer being split across the threads.
//! Measured at batch 64 (AVX-512 Zen 5, same binary with `TABCONV_SUB_BATCH=0` and without,
//! alternating runs): NIN 10.15 → 8.31 ms on one thread, 5.57 → 4.28 on two; the ResNet-18/16
//! fixture 10.83 → 10.16 and MobileNet 0.569 → 0.520 ms on two threads (unchanged on one).
//!
//! Each image goes through the same kernels either way, which give every image the same
//! result whatever the batch (direct convolutions per pixel, lookups in integers, GEMM rows
//! summed in the same order), and the sub-batch size depends on the graph only, not on the
//! thread count.

use crate::error::{Error, Result};
use crate::ir::{cost, DType, Dim, Graph, Op, Outlet, Tensor};
use ndarray::{concatenate, ArrayD, Axis, Slice};
use rayon::prelude::*;

/// The largest activation of a sub-batch stays within this many bytes: about the L2 cache of
/// one core (1 MB on Zen 4/5; 1.25–2 MB on recent Intel cores).
pub const SUB_BATCH_BYTES: usize = 1 << 20;

/// How a plan over a graph splits a batch ([`sub_batch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubBatch {
    /// Images whose largest activation fits in [`SUB_BATCH_BYTES`] (a power of two).
    pub cache: usize,
    /// Images below which the layers doing most of the work get too few rows for their
    /// kernels' tiles (a power of two): a deep layer on 1×1 maps has one row per image, and 16
    /// of them measured 5% slower on ResNet-18 w64 than 64.
    pub rows: usize,
}

impl SubBatch {
    /// Images per sub-batch for `n` images: `max(cache, rows)`; `None`: run the batch whole.
    /// Not the thread count: with kernels whose rows do not depend on each other, an image
    /// gets the same bits in any sub-batch, but the `gemm` crate's kernels (general MatMul/Gemm
    /// below AVX2) change with the number of rows, and padded convolutions of 16 images or more
    /// skip the taps outside the image (a `−0.0` sum or a non-finite weight can tell), so the
    /// size must not change with the threads for results to stay independent of them.
    pub fn size(self, n: usize) -> Option<usize> {
        let s = self.cache.max(self.rows).max(1);
        (s < n).then_some(s)
    }
}

/// Weights and tables that layers with too few rows per sub-batch may hold in all (see
/// [`sub_batch`]).
const SHORT_CONST_BYTES: usize = 8 << 20;

/// Rows of work a layer's kernel wants at once (one AVX-512 tile row block is 10–16 pixels;
/// 64 keeps several).
const MIN_ROWS: usize = 64;

/// How a plan over `graph` returning `wanted` may split batches: when the graph computes each
/// image on its own, its inputs and the wanted values are f32 with the batch leading, and every
/// value's size per image is known. `None` otherwise (batches run whole). The environment
/// variable `TABCONV_SUB_BATCH` forces the size for such graphs (`0`: run batches whole), for
/// measuring.
pub fn sub_batch(graph: &Graph, wanted: &[Outlet]) -> Option<SubBatch> {
    let forced = std::env::var("TABCONV_SUB_BATCH")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    if forced == Some(0) {
        return None;
    }
    let leads = |o: Outlet| {
        let f = graph.node(o.node).outputs.get(o.slot)?.fact.as_ref()?;
        let batch_first = f.shape.first() == Some(&Dim::Batch(1));
        let rest_known = f.shape.iter().skip(1).all(|d| d.known().is_some());
        (f.dtype == DType::F32 && batch_first && rest_known).then_some(())
    };
    if graph.inputs.is_empty() || wanted.is_empty() {
        return None;
    }
    let inputs = graph.inputs.iter().map(|&n| Outlet::new(n, 0));
    for o in inputs.chain(wanted.iter().copied()) {
        leads(o)?;
    }
    crate::onnx::import::batch_is_per_image(graph).ok()?;
    let order = graph.topo_order().ok()?;
    let mut largest = 1usize;
    // (work, rows per image, constant bytes) of the layers that do the arithmetic
    let mut layers: Vec<(u64, usize, usize)> = Vec::new();
    for &n in &order {
        let node = graph.node(n);
        if matches!(node.op, Op::Const(_)) {
            continue;
        }
        for v in &node.outputs {
            let Some(f) = v.fact.as_ref().filter(|f| f.value.is_none()) else {
                continue;
            };
            largest = largest.max(per_image(f)?.saturating_mul(f.dtype.size_of()));
        }
        let Some(f) = node.outputs[0].fact.as_ref() else {
            continue;
        };
        // rows: output values per image over those of one row (channels last, or a Conv's
        // channels at axis 1)
        let row = match &node.op {
            Op::Conv(c) if !c.nhwc => f.shape.get(1).and_then(|d| d.known()),
            Op::Conv(_) | Op::LutMatMul { .. } | Op::MatMul => f.shape.last().and_then(|d| d.known()),
            _ => continue,
        };
        let c = cost::node_cost(graph, n);
        let work = c.exact_macs.saturating_add(c.lookups).saturating_add(c.encode_macs);
        let row = usize::try_from(row?).ok()?.max(1);
        let consts: usize = graph
            .inputs_of(n)
            .iter()
            .filter_map(|o| graph.const_value(*o))
            .map(|t| t.byte_len())
            .sum();
        layers.push((work, per_image(f)? / row, consts));
    }
    if let Some(f) = forced {
        return Some(SubBatch { cache: f, rows: 1 });
    }
    let cache = 1 << (SUB_BATCH_BYTES / largest).max(1).ilog2();
    // the smallest power of two giving MIN_ROWS rows to the layers with at least 80% of the work
    // and to all but SHORT_CONST_BYTES of the weights and tables: a layer with few rows per
    // sub-batch streams its constants once per sub-batch (the ResNet-34 w64 `.tcv`, 41 MB of
    // tables mostly in layers of 1–4 rows per image, ran 19% slower in sub-batches of 16), and
    // lookups on ≤ 32 rows take the row-wise kernel
    let total: u64 = layers.iter().map(|l| l.0).sum();
    let mut rows = 1usize;
    while rows < MIN_ROWS {
        let short = layers.iter().filter(|l| l.1 * rows < MIN_ROWS);
        let (work, consts) = short.fold((0u64, 0usize), |(w, c), l| (w + l.0, c + l.2));
        if work * 5 <= total && consts <= SHORT_CONST_BYTES {
            break;
        }
        rows *= 2;
    }
    Some(SubBatch { cache, rows })
}

/// Values per image of a value whose dimensions are known but for the batch (`k·N` counts `k`).
fn per_image(f: &crate::ir::Fact) -> Option<usize> {
    f.shape.iter().try_fold(1usize, |a, d| {
        let k = match *d {
            Dim::Known(k) | Dim::Batch(k) => k,
        };
        Some(a.saturating_mul(usize::try_from(k).ok()?))
    })
}

/// Run `run_once` on sub-batches of `s` images of `inputs` (all f32 with the batch leading;
/// the last sub-batch may be smaller), in parallel when there are threads (in order when
/// `in_order`), and join each output along axis 0.
pub fn run_split(
    inputs: Vec<Tensor>,
    s: usize,
    in_order: bool,
    run_once: impl Fn(Vec<Tensor>) -> Result<Vec<Tensor>> + Sync,
) -> Result<Vec<Tensor>> {
    let n = inputs[0].shape()[0];
    let arrays = inputs.iter().map(|t| t.as_f32()).collect::<Result<Vec<_>>>()?;
    let part = |start: usize| -> Result<Vec<Tensor>> {
        let chunk = arrays
            .iter()
            .map(|a| Tensor::F32(a.slice_axis(Axis(0), Slice::from(start..(start + s).min(n))).to_owned()))
            .collect();
        run_once(chunk)
    };
    let starts: Vec<usize> = (0..n).step_by(s).collect();
    let parts: Vec<Vec<Tensor>> = if in_order {
        starts.into_iter().map(part).collect::<Result<_>>()?
    } else {
        // As many sub-batches as threads or more: each thread has its own, so their kernels
        // run in order (the team's helpers would only oversubscribe the cores). Fewer: the
        // kernels of each split their loops over the threads left.
        let alone = starts.len() >= rayon::current_num_threads();
        starts
            .into_par_iter()
            .with_max_len(1)
            .map(|start| match alone {
                true => crate::interp::kernels::team::alone(|| part(start)),
                false => part(start),
            })
            .collect::<Result<_>>()?
    };
    let parts = parts
        .into_iter()
        .map(|p| p.into_iter().map(Tensor::into_f32).collect())
        .collect::<Result<Vec<_>>>()?;
    join(&parts, &format!("sub-batches of {s}"))
}

/// Each output of the runs over consecutive pieces of a batch (`parts[piece][output]`) joined
/// along axis 0; `pieces` names them in an error.
pub(super) fn join(parts: &[Vec<ArrayD<f32>>], pieces: &str) -> Result<Vec<Tensor>> {
    (0..parts.first().map_or(0, Vec::len))
        .map(|i| {
            let views: Vec<_> = parts.iter().map(|p| p[i].view()).collect();
            concatenate(Axis(0), &views)
                .map(Tensor::F32)
                .map_err(|e| Error::Other(format!("joining the outputs of {pieces}: {e}")))
        })
        .collect()
}
