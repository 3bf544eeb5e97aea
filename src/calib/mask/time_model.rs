//! The time model that prices a LUT layer against its exact form (`restore_unprofitable`).

use crate::error::{Error, Result};
use crate::interp::kernels::encode::TREE_IMAGE_LANES as IMAGE_LANES;
use crate::ir::op::{Encoder, Op, PqEncode};
use crate::ir::{cost, Graph};
use serde::{Deserialize, Serialize};

/// Relative time of the operations of a LUT layer, one exact multiply-add = 1. The defaults
/// are the kernels' measured throughputs (docs/BENCHMARKS-avx512.md, one thread, batch 64, AVX-512
/// Zen 5): exact direct convolution ≈ 110 G multiply-adds/s, channel-lane argmin encoding
/// ≈ 40 G/s (its comparisons included; it fills 16 channels per vector, so a layer of `C`
/// channels pays for `⌈C/16⌉·16`), the int8 channel-lane encoder about twice that, argmin encoders that gather their rows (fully connected
/// layers, codebooks spanning channels) ≈ 8 G/s, hash-tree comparisons ≈ 2 G/s (one gather
/// per comparison) where rows are gathered (fully connected layers) and ≈ 8 G/s per filled lane
/// in the pixel-lane kernel of convolutions (planar copies of the input, one load per 16 pixels
/// of an output row, so a row of `ow < 16` pixels pays `16/ow` times as much: measured on AMD
/// Zen 4, where direct convolutions of 16–128 channels run at 55–78 G/s, per comparison and
/// filled lane 0.26–0.29 ns (16–18 of that machine's exact multiply-adds) for 3×3 codebooks and
/// 0.19–0.22 ns for 3-value ones, from 32- to 2-pixel-wide maps, the same per filled lane at
/// every width; 13–40 exact multiply-adds per comparison on NIN's layers, the low end for wide
/// windows, the high end for 1×1 convolutions; strided convolutions copy `stride_h · stride_w`
/// input pixels per output pixel into the planar layout and are priced that many times dearer,
/// measured 4.3–7.8 times on 3×3 stride-2 layers and 58 times on 1×1 stride-2 shortcuts with a
/// scalar scatter; since the copy deinterleaves stride 2 in registers and skips what no window
/// reads, 1.9–2.6 times on ResNet-18/16's 3×3 stride-2 layers and 4.8–39 times on its 1×1
/// stride-2 shortcuts of 8–2 codebooks, whose copy and per-pixel work outweigh their few
/// comparisons: still priced `stride_h · stride_w`), int8 lookup-adds
/// ≈ 250 G/s in the VNNI kernel plus ≈ 0.4 ns per output value (fitted on NIN's layers, from
/// 5 to 160 codebooks: a layer of few codebooks is dominated by its outputs; ≈ 115 G/s overall
/// in ResNet-18 w64 at batch 64; the AVX-512BW kernel without VNNI, ≈ 70 G/s, is not priced),
/// and ≈ 31 G/s at K = 256 (NIN's 5×5 layer: 160 codebooks, 48 outputs, 2 MB of tables; 3.3
/// exact multiply-adds per lookup once its outputs are priced). These are one machine's ratios:
/// on Zen 4, whose AVX-512 multiply-adds are half as wide, exact layers are relatively slower and
/// the int8 argmin encoder relatively faster (≈ 0.8 of that machine's exact multiply-adds per
/// multiply-add instead of 1.3), so a tree on 7-pixel-wide maps that this model prices 1.3×
/// faster than the int8 argmin encoder ran 1.26× slower there (ResNet-18 w64's layer1).
/// Counting operations alone (all weights 1) would keep layers as lookups that run slower than
/// the exact layer they replace (measured: a 1-channel stem as lookups ran 7×
/// slower than exact).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TimeModel {
    /// An argmin multiply-add in the channel-lane kernel (convolutions whose codebooks follow
    /// the input channels).
    pub encode_mac: f64,
    /// The same in the int8 channel-lane kernel (`encode_i8`).
    pub encode_mac_i8: f64,
    /// An argmin multiply-add of an encoder that gathers its rows.
    pub encode_mac_gather: f64,
    /// An argmin multiply-add of pixel codebooks (`PqEncode::pixel`: the f32 encoder over each
    /// input pixel's channels, then the codes gathered per tap; measured on AMD Zen 4, batch
    /// 64 in sub-batches of 16, ResNet-18 w64's 64-channel layers with 8-channel codebooks:
    /// 13 G/s at stride 1, 20 G/s at stride 2, where that machine's direct convolution runs
    /// ≈ 55 G/s).
    pub encode_mac_pixel: f64,
    /// The same in the int8 pixel kernel (`encode_pixel`, with `act_scale`): 26 G/s at stride
    /// 1, 31 G/s at stride 2 on the same layers, gathering included.
    pub encode_mac_pixel_i8: f64,
    /// A hash-tree comparison of an encoder that gathers its rows.
    pub compare: f64,
    /// A hash-tree comparison in the pixel-lane kernel of convolutions, per filled lane at
    /// stride 1: output rows narrower than 16 pixels pay for the empty lanes too, strided
    /// convolutions `stride_h · stride_w` times as much (see [`TimeModel::time`]).
    pub compare_conv: f64,
    pub lookup: f64,
    /// A lookup-add with more than 16 prototypes per codebook (K = 256: 256-entry tables, the
    /// `vpermi2b` and row-wise kernels; other K, e.g. 64, the row-wise kernel: NIN's layers at
    /// K = 64, batch 64, ran at about 24 G lookups/s on Zen 4, 2.3–3.2 of that machine's exact
    /// multiply-adds per lookup, within this price). CPUs with AVX-512 VBMI and VNNI run K = 64
    /// and 128 in a shuffle kernel 1–2.4× faster than row-wise; the price stays the portable
    /// kernel's (conservative there: it restores more layers than the time would).
    pub lookup_k256: f64,
    /// A lookup-add of the scalar kernel: more than 16 prototypes (but not 256) and fewer than
    /// 16 outputs, where neither the row-wise kernel's vectors nor, on most CPUs, a shuffle
    /// kernel apply (AVX-512 VBMI and VNNI CPUs run 64 and 128 in one: the price stays the
    /// portable kernel's; `lut_throughput` on Zen 4: 3.3 G lookups/s, where direct convolutions
    /// run at 55–78 G multiply-adds/s).
    pub lookup_scalar: f64,
    /// An output value of the lookups (rows × outputs).
    pub output: f64,
    /// The images per run the lookups will see: from 16 images up, the tree kernel of
    /// convolutions fills its lanes with images, below it with the pixels of one output row, so
    /// rows narrower than 16 pixels leave lanes empty and are priced `16/ow` times as much.
    /// Large batches run in sub-batches sized by the graph's largest activation
    /// (`interp::split`; 16 images for the ResNets measured), and it is their size that counts.
    pub batch: usize,
}

impl Default for TimeModel {
    fn default() -> TimeModel {
        TimeModel {
            encode_mac: 2.75,
            encode_mac_i8: 1.3,
            encode_mac_gather: 14.0,
            encode_mac_pixel: 4.0,
            encode_mac_pixel_i8: 2.0,
            compare: 55.0,
            compare_conv: 16.0,
            lookup: 0.45,
            lookup_k256: 3.3,
            lookup_scalar: 20.0,
            output: 40.0,
            batch: 1,
        }
    }
}

/// Lanes of the pixel-lane tree kernel the time model prices (AVX-512: 16 pixels per vector).
const LANES: usize = 16;

impl TimeModel {
    /// Estimated time of `c` in exact multiply-adds. An argmin encoder's comparisons are part of
    /// its per-multiply-add rate; `compare_conv` (convolutions) and `compare` (gathered rows)
    /// price the hash tree's; [`TimeModel::lookup_price`] prices a lookup-add (by the kernel
    /// that runs it) and `output` each output value the lookups produce (packing, the sums'
    /// transpose, the epilogue: these dominate layers of few codebooks). `enc` is the layer's
    /// encoder, `d` its row length, `k` its prototypes per codebook, `m` its outputs and `ow` the width of a
    /// convolution's output rows when known: below `batch` 16 the tree kernel fills one 16-lane
    /// vector per 16 pixels of an output row, so rows narrower than 16 pay for the empty lanes.
    pub fn time(&self, c: &cost::Cost, enc: &PqEncode, d: usize, k: usize, m: usize, ow: Option<usize>) -> f64 {
        let compares = if c.encode_macs > 0 {
            0.0
        } else {
            c.encode_compares as f64
        };
        let codebooks = d.div_ceil(enc.subspace.max(1)).max(1) as f64;
        c.exact_macs as f64
            + self.encode_mac_rate(enc, d) * c.encode_macs as f64
            + if let Some(w) = &enc.window {
                let ow = match self.batch >= IMAGE_LANES {
                    true => LANES, // image lanes: every lane filled
                    false => ow.unwrap_or(LANES).max(1),
                };
                let stride = (w.strides[0] * w.strides[1]).max(1) as f64;
                self.compare_conv * stride * (ow.div_ceil(LANES) * LANES) as f64 / ow as f64
            } else {
                self.compare
            } * compares
            + (self.lookup_price(k, m) + self.output / codebooks) * c.lookups as f64
    }

    /// The price of one lookup-add at `k` prototypes per codebook and `m` outputs, by the
    /// kernel `LutMatMul` runs there (`interp::kernels::lut::rowwise_by_shape`, the rule of
    /// `prefer_rowwise` that does not depend on the CPU, so the same model gives the same
    /// `.tcv` everywhere): the shuffle kernels at 16, the row-wise (or at 256 the VBMI) kernel
    /// above 16 from 16 outputs, the scalar kernel above 16 (but not 256) below 16 outputs.
    /// Fewer than 16 prototypes (which the shuffle kernels do not take) are priced as 16: not
    /// measured.
    pub fn lookup_price(&self, k: usize, m: usize) -> f64 {
        match k {
            0..=16 => self.lookup,
            _ if k == 256 || crate::interp::kernels::lut::rowwise_by_shape(k, m) => self.lookup_k256,
            _ => self.lookup_scalar,
        }
    }
}

impl TimeModel {
    /// The time of one argmin multiply-add of `enc`: the channel-lane kernel's (its 16-channel
    /// vectors padded) when `enc` will run it, else a gathering encoder's.
    fn encode_mac_rate(&self, enc: &PqEncode, d: usize) -> f64 {
        let Some(w) = &enc.window else {
            return self.encode_mac_gather;
        };
        if enc.pixel {
            return match enc.act_scale {
                Some(_) => self.encode_mac_pixel_i8,
                None => self.encode_mac_pixel,
            };
        }
        let [kh, kw] = w.kernel;
        let s = enc.subspace;
        if enc.encoder != Encoder::Argmin || !(s == kh * kw || (s == kw && kh > 1)) {
            return self.encode_mac_gather;
        }
        // a row is one pixel window: `C·kh·kw` values
        let channels = (d / (kh * kw).max(1)).max(1);
        let rate = match enc.act_scale {
            Some(_) if s == kh * kw && kw <= 4 && kh <= 16 => self.encode_mac_i8,
            _ => self.encode_mac,
        };
        rate * (channels.div_ceil(16) * 16) as f64 / channels as f64
    }
}

/// The cost of LUT layer `lut` (its lookups and encoding; rows of `d` values) in `graph` and the
/// estimated speed of the exact layer's `exact_macs` against it by `tm` (> 1: the lookups are
/// faster).
pub(super) fn layer_cost(
    graph: &Graph,
    lut: &str,
    tm: &TimeModel,
    d: usize,
    exact_macs: u64,
) -> Result<(cost::Cost, f64)> {
    layer_cost_as(graph, lut, tm, d, exact_macs, false)
}

/// [`layer_cost`], or with `as_tree` the cost of the same lookups with a hash-tree encoder of
/// the same codebooks instead of its argmin one (`log2 K` comparisons per codebook and row
/// instead of `K·S` multiply-adds and `K` comparisons), to price a refit before running it.
pub(super) fn layer_cost_as(
    graph: &Graph,
    lut: &str,
    tm: &TimeModel,
    d: usize,
    exact_macs: u64,
    as_tree: bool,
) -> Result<(cost::Cost, f64)> {
    let node = graph.find(lut).expect("a live LUT layer");
    let enc = graph.inputs_of(node)[0].node;
    let Op::PqEncode(enc_op) = &graph.node(enc).op else {
        return Err(Error::Other(format!(
            "{lut}: a LutMatMul whose codes do not come from a PQEncode"
        )));
    };
    let mut enc_op = enc_op.clone();
    // prototypes per codebook: the tables are [C, M, K]
    let shape = graph
        .const_value(graph.inputs_of(node)[1])
        .map_or(&[][..], |t| t.shape());
    let (m, k) = (shape.get(1).copied().unwrap_or(16), shape.get(2).copied().unwrap_or(16));
    let mut c = cost::node_cost(graph, node);
    let mut e = cost::node_cost(graph, enc);
    if as_tree && e.encode_macs > 0 {
        // argmin: `K` comparisons per codebook and row
        e.encode_compares = e.encode_compares / k as u64 * u64::from(k.max(2).ilog2());
        e.encode_macs = 0;
        (enc_op.encoder, enc_op.act_scale) = (Encoder::Tree, None);
    }
    c.add(&e);
    // a convolution's output width, from its input's facts
    let ow = enc_op.window.as_ref().and_then(|w| {
        let f = graph.fact(graph.inputs_of(enc)[0])?;
        let dims: Vec<usize> = f.shape.iter().map(|d| d.bind(1).max(0) as usize).collect();
        let hw = match (enc_op.nhwc, dims.as_slice()) {
            (false, [_, _, h, w]) | (true, [_, h, w, _]) => [*h, *w],
            _ => return None,
        };
        w.resolve(hw).ok().map(|g| g.out[1])
    });
    let est = exact_macs as f64 / tm.time(&c, &enc_op, d, k, m, ow).max(1.0);
    Ok((c, est))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_model_prices_each_kernel() {
        let tm = TimeModel::default();
        let window = crate::ir::op::Window {
            kernel: [5, 5],
            strides: [1, 1],
            dilations: [1, 1],
            padding: crate::ir::op::Padding::Explicit([2, 2, 2, 2]),
            ceil_mode: false,
        };
        let tree = |window| PqEncode {
            subspace: 5,
            encoder: Encoder::Tree,
            window,
            nhwc: false,
            act_scale: None,
            pixel: false,
        };
        // 160 codebooks of 5 values (d = 800), 1000 rows, 48 outputs, depth 4
        let c = cost::Cost {
            exact_macs: 7,
            encode_compares: 1000 * 160 * 4,
            lookups: 1000 * 160 * 48,
            ..Default::default()
        };
        let lookups = (tm.lookup + tm.output / 160.0) * c.lookups as f64;
        let conv = tm.time(&c, &tree(Some(window.clone())), 800, 16, 48, Some(32));
        assert!(
            (conv - (7.0 + tm.compare_conv * 640_000.0 + lookups)).abs() < 1e-6,
            "{conv}"
        );
        // output rows of 7 pixels fill 7 of the pixel-lane kernel's 16 lanes; of 20, 20 of 32;
        // at stride 2, 4 input pixels per output pixel
        let mut strided = window.clone();
        strided.strides = [2, 2];
        for (w, ow, pad) in [(&window, 7, 16.0 / 7.0), (&window, 20, 1.6), (&strided, 32, 4.0)] {
            let narrow = tm.time(&c, &tree(Some(w.clone())), 800, 16, 48, Some(ow));
            let want = 7.0 + tm.compare_conv * pad * 640_000.0 + lookups;
            assert!((narrow - want).abs() < 1e-6, "{ow}: {narrow} vs {want}");
        }
        // priced for batch 64, the image lanes are full at any width (not at any stride)
        let tm64 = TimeModel { batch: 64, ..tm };
        for (w, ow, pad) in [(&window, 7, 1.0), (&strided, 3, 4.0)] {
            let narrow = tm64.time(&c, &tree(Some(w.clone())), 800, 16, 48, Some(ow));
            let want = 7.0 + tm.compare_conv * pad * 640_000.0 + lookups;
            assert!((narrow - want).abs() < 1e-6, "{ow}: {narrow} vs {want}");
        }
        let fc = tm.time(&c, &tree(None), 800, 16, 48, None);
        assert!((fc - (7.0 + tm.compare * 640_000.0 + lookups)).abs() < 1e-6, "{fc}");
        // 256 prototypes: the wide tables' rate
        let wide = tm.time(&c, &tree(None), 800, 256, 48, None);
        // the kernel behind each price: shuffles at 16, row-wise or VBMI above, scalar for few
        // outputs above 16 but not 256
        assert_eq!(
            [(16, 8), (64, 16), (64, 15), (256, 8)].map(|(k, m)| tm.lookup_price(k, m)),
            [tm.lookup, tm.lookup_k256, tm.lookup_scalar, tm.lookup_k256]
        );
        let lookups256 = (tm.lookup_k256 + tm.output / 160.0) * c.lookups as f64;
        assert!(
            (wide - (7.0 + tm.compare * 640_000.0 + lookups256)).abs() < 1e-6,
            "{wide}"
        );
        // an argmin's comparisons are part of its multiply-add rate; int8 where its kernel runs
        // (kernel width ≤ 4, one codebook per channel), at the padded 16-channel rate
        let mut w3 = window;
        w3.kernel = [3, 3];
        let argmin = |act_scale| PqEncode {
            subspace: 9,
            encoder: Encoder::Argmin,
            window: Some(w3.clone()),
            nhwc: true,
            act_scale,
            pixel: false,
        };
        let c = cost::Cost {
            encode_macs: 1000,
            encode_compares: 50,
            ..Default::default()
        };
        // 8 channels (d = 72): 16-lane vectors half full, twice the rate per multiply-add
        assert!((tm.time(&c, &argmin(None), 72, 16, 48, Some(7)) - 2.0 * tm.encode_mac * 1000.0).abs() < 1e-6);
        assert!((tm.time(&c, &argmin(Some(0.1)), 72, 16, 48, Some(7)) - 2.0 * tm.encode_mac_i8 * 1000.0).abs() < 1e-6);
    }
}
