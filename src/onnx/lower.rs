//! `tabconv-compile --emit onnx`: a compiled graph as a standard ONNX model, so it runs in ONNX
//! Runtime, tract or anything else that reads ONNX.
//!
//! The graph is exported as for a `.tcv` but with `Gelu` as Mul/Erf/Add
//! ([`export::Target::Standard`]), then every `ai.tabconv` node is replaced by standard
//! operators (opset 17):
//! - `PQEncode`'s rows: for a convolution, a grouped `Conv` whose one-hot kernels copy each
//!   input channel's `kh × kw` window (the implicit im2col rows, `(c, i, j)` order, one MAC per
//!   value), reshaped to `[rows, D]`, zero-padded to `C · S`;
//! - argmin encoder: `MatMul` of each codebook's subvector with its prototypes, `‖p‖² − 2 x·p`,
//!   `ArgMin` over the prototypes (ties to the lowest index, as tabconv);
//! - tree encoder: the split values picked by a one-hot `MatMul`, then per level `Gather` of the
//!   node's threshold, `Greater`, and the index arithmetic `2·idx + bit`;
//! - `LutMatMul`: `Gather` of each codebook's table row (int8 tables stay int8 and are `Cast`),
//!   `ReduceSum` over the codebooks, `· scale + offset`.
//!
//! Codes are int64 between the two. The channels-last forms (and the epilogues fused with them)
//! have no standard equivalent: `--emit onnx` compiles without the `channels-last` pass.
//! Distances are summed in ONNX's order rather than tabconv's, so a row whose two nearest
//! prototypes tie to the last bit may get the other code.

use super::export::{self, attr_i, attr_ints, tensor_proto, window_attrs, TABCONV_DOMAIN};
use super::pb;
use crate::error::{Error, Result};
use crate::ir::op::{Encoder, Op, PqEncode};
use crate::ir::{Dim, Graph, Outlet, Tensor};
use ndarray::{ArrayD, IxDyn};
use petgraph::stable_graph::NodeIndex;
use std::collections::HashSet;

/// Encode the graph as standard ONNX bytes, with the producing pipeline in `metadata_props`.
pub fn encode(graph: &Graph, pipeline_yaml: &str) -> Result<Vec<u8>> {
    use prost::Message;
    let meta = [(super::tcv::KEY_PIPELINE.to_string(), pipeline_yaml.to_string())];
    Ok(lower_model(graph, &meta)?.encode_to_vec())
}

/// The graph as a standard ONNX model (see the module documentation).
pub fn lower_model(graph: &Graph, metadata: &[(String, String)]) -> Result<pb::ModelProto> {
    let mut model = export::export_model_for(graph, metadata, export::Target::Standard)?;
    let g = model.graph.as_mut().expect("export writes a graph");
    let mut w = Lowered::default();
    for n in std::mem::take(&mut g.node) {
        if n.domain != TABCONV_DOMAIN {
            w.nodes.push(n);
            continue;
        }
        let ir = graph
            .find(&n.name)
            .ok_or_else(|| Error::Other(format!("{}: no such node in the graph", n.name)))?;
        let fail = |msg: &str| Error::node(&n.name, &n.op_type, msg);
        match &graph.node(ir).op {
            Op::PqEncode(p) if !p.nhwc => w.pq_encode(graph, ir, p, &n).map_err(|e| fail(&e.to_string()))?,
            Op::LutMatMul { relu: false } if n.input.len() == 4 => {
                w.lut_matmul(graph, ir, &n).map_err(|e| fail(&e.to_string()))?
            }
            _ => {
                return Err(fail(
                    "has no standard ONNX form (channels-last ops and fused epilogues: compile \
                     without the channels-last pass)",
                ))
            }
        }
    }
    g.node = w.nodes;
    g.initializer.extend(w.inits);
    let used: HashSet<&str> = g.node.iter().flat_map(|n| n.input.iter().map(String::as_str)).collect();
    let used: HashSet<String> = used.into_iter().map(str::to_string).collect();
    g.initializer.retain(|t| used.contains(&t.name));
    // the codes changed type (u8 → i64): keep only the graph's inputs and outputs typed
    g.value_info.clear();
    model.opset_import.retain(|o| o.domain != TABCONV_DOMAIN);
    Ok(model)
}

#[derive(Default)]
struct Lowered {
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
    /// The `ai.tabconv` node being lowered (prefix of the names made for it).
    prefix: String,
    count: usize,
}

fn const_input(graph: &Graph, n: NodeIndex, i: usize) -> Result<&Tensor> {
    let ins = graph.inputs_of(n);
    let o = ins.get(i).ok_or_else(|| Error::Other(format!("input {i} missing")))?;
    match &graph.node(o.node).op {
        Op::Const(t) => Ok(t),
        _ => Err(Error::Other(format!("input {i} is not a constant"))),
    }
}

/// An argmin encoder's norms (its optional third input, `[c_n, k]`).
fn given_norms(graph: &Graph, n: NodeIndex, c_n: usize, k: usize) -> Result<Option<Vec<f32>>> {
    if graph.inputs_of(n).len() < 3 {
        return Ok(None);
    }
    let t = const_input(graph, n, 2)?;
    if t.shape() != [c_n, k] {
        return Err(Error::Other(format!(
            "norms {:?} do not fit {c_n} codebooks of {k}",
            t.shape()
        )));
    }
    Ok(Some(t.as_f32()?.iter().copied().collect()))
}

/// An output's shape for `Reshape`: the batch dimension as −1.
fn reshape_target(graph: &Graph, o: Outlet) -> Result<Vec<i64>> {
    let f = graph
        .fact(o)
        .ok_or_else(|| Error::Other("output without shape".into()))?;
    let mut batch = 0;
    let dims = f
        .shape
        .iter()
        .map(|d| match d {
            Dim::Known(v) => Ok(*v),
            Dim::Batch(1) => {
                batch += 1;
                Ok(-1)
            }
            Dim::Batch(k) => Err(Error::Other(format!("output dimension {k}·N"))),
        })
        .collect::<Result<Vec<i64>>>()?;
    if batch > 1 {
        return Err(Error::Other("more than one batch dimension".into()));
    }
    Ok(dims)
}

impl Lowered {
    fn name(&mut self) -> String {
        self.count += 1;
        format!("{}/onnx/{}", self.prefix, self.count)
    }

    /// A standard node; its output is `out` or a fresh name.
    fn op(&mut self, op: &str, inputs: &[&str], attribute: Vec<pb::AttributeProto>, out: Option<&str>) -> String {
        let name = self.name();
        let output = out.map_or_else(|| name.clone(), str::to_string);
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            name,
            op_type: op.to_string(),
            ..Default::default()
        });
        self.nodes.last_mut().expect("pushed").attribute = attribute;
        output
    }

    fn init(&mut self, t: &Tensor) -> String {
        let name = self.name();
        self.inits.push(tensor_proto(&name, t));
        name
    }

    fn i64s(&mut self, v: &[i64]) -> String {
        self.init(&Tensor::i64_vec(v.to_vec()))
    }

    fn scalar_i64(&mut self, v: i64) -> String {
        self.init(&Tensor::I64(ArrayD::from_elem(IxDyn(&[]), v)))
    }

    fn reshape(&mut self, x: &str, shape: &[i64], out: Option<&str>) -> String {
        let s = self.i64s(shape);
        self.op("Reshape", &[x, &s], vec![], out)
    }

    /// `PQEncode` → the rows, then the encoder; int64 codes under the node's output name.
    fn pq_encode(&mut self, graph: &Graph, ir: NodeIndex, p: &PqEncode, n: &pb::NodeProto) -> Result<()> {
        self.prefix = n.name.clone();
        if p.pixel {
            return self.pq_encode_pixels(graph, ir, p, n);
        }
        let x_fact = graph
            .fact(graph.inputs_of(ir)[0])
            .ok_or_else(|| Error::Other("input without shape".into()))?;
        let dims: Vec<i64> = x_fact.shape.iter().map(|&d| d.bind(1)).collect();
        let (rows, d) = match &p.window {
            Some(win) => {
                let cin = dims.get(1).copied().unwrap_or(0).max(0) as usize;
                let [kh, kw] = win.kernel;
                let taps = kh * kw;
                // one-hot kernels: output channel c·taps + t copies tap t of channel c
                let mut onehot = vec![0f32; cin * taps * taps];
                for c in 0..cin {
                    for t in 0..taps {
                        onehot[(c * taps + t) * taps + t] = 1.0;
                    }
                }
                let wname = self.init(&Tensor::f32(&[cin * taps, 1, kh, kw], onehot)?);
                let mut attrs = window_attrs(win, true);
                attrs.retain(|a| a.name != "ceil_mode");
                attrs.push(attr_i("group", cin as i64));
                let patches = self.op("Conv", &[&n.input[0], &wname], attrs, None);
                let d = (cin * taps) as i64;
                let flat = self.reshape(&patches, &[0, d, -1], None);
                let rows = self.op("Transpose", &[&flat], vec![attr_ints("perm", &[0, 2, 1])], None);
                (self.reshape(&rows, &[-1, d], None), d as usize)
            }
            None => {
                let d = *dims.last().ok_or_else(|| Error::Other("rank-0 input".into()))? as usize;
                (self.reshape(&n.input[0], &[-1, d as i64], None), d)
            }
        };
        let sub = crate::pq::Subspaces { d, s: p.subspace };
        let (c_n, s) = (sub.count(), p.subspace);
        let rows = if c_n * s > d {
            let pads = self.i64s(&[0, 0, 0, (c_n * s - d) as i64]);
            self.op("Pad", &[&rows, &pads], vec![], None)
        } else {
            rows
        };
        let x4 = self.reshape(&rows, &[-1, c_n as i64, 1, s as i64], None);
        let codes = self.encoder(graph, ir, p, &x4, c_n)?;
        let target = reshape_target(graph, Outlet::new(ir, 0))?;
        self.reshape(&codes, &target, Some(&n.output[0]));
        Ok(())
    }

    /// Pixel codebooks: the input zero-padded as the window pads it, every pixel of that
    /// encoded (the padding's pixels are the all-zero pixel the taps outside the image read),
    /// then each output pixel's codes gathered tap by tap with constant indices.
    fn pq_encode_pixels(&mut self, graph: &Graph, ir: NodeIndex, p: &PqEncode, n: &pb::NodeProto) -> Result<()> {
        let win = p
            .window
            .as_ref()
            .ok_or_else(|| Error::Other("pixel codebooks need a window".into()))?;
        let x_fact = graph
            .fact(graph.inputs_of(ir)[0])
            .ok_or_else(|| Error::Other("input without shape".into()))?;
        let [cin, h, w] = [1, 2, 3].map(|i| x_fact.shape.get(i).and_then(|d| d.known()).unwrap_or(0).max(0) as usize);
        if win.ceil_mode || cin == 0 {
            return Err(Error::Other(
                "pixel codebooks with ceil_mode or without input channels have no standard form".into(),
            ));
        }
        if !cin.is_multiple_of(p.subspace.max(1)) {
            return Err(Error::Other(format!(
                "pixel codebooks of {} channels do not divide the {cin} channels",
                p.subspace
            )));
        }
        let geo = win.resolve([h, w])?;
        let [top, left, bottom, right] = geo.pads.map(|v| v as i64);
        let (hp, wp) = (h + geo.pads[0] + geo.pads[2], w + geo.pads[1] + geo.pads[3]);
        let pads = self.i64s(&[0, 0, top, left, 0, 0, bottom, right]);
        let padded = self.op("Pad", &[&n.input[0], &pads], vec![], None);
        let nhwc = self.op("Transpose", &[&padded], vec![attr_ints("perm", &[0, 2, 3, 1])], None);
        let (g, s) = (cin.div_ceil(p.subspace.max(1)), p.subspace);
        let x4 = self.reshape(&nhwc, &[-1, g as i64, 1, s as i64], None);
        let codes = self.encoder(graph, ir, p, &x4, g)?;
        let codes = self.reshape(&codes, &[-1, (hp * wp) as i64, g as i64], None);
        let ([kh, kw], [oh, ow]) = (win.kernel, geo.out);
        // per output pixel and tap, the padded input pixel it reads
        let idx = ArrayD::from_shape_fn(IxDyn(&[oh * ow, kh * kw]), |ix| {
            let ((oy, ox), (i, j)) = ((ix[0] / ow, ix[0] % ow), (ix[1] / kw, ix[1] % kw));
            let y = oy * win.strides[0] + i * win.dilations[0];
            (y * wp + ox * win.strides[1] + j * win.dilations[1]) as i64
        });
        let idx = self.init(&Tensor::I64(idx));
        let taps = self.op("Gather", &[&codes, &idx], vec![attr_i("axis", 1)], None);
        let target = reshape_target(graph, Outlet::new(ir, 0))?;
        self.reshape(&taps, &target, Some(&n.output[0]));
        Ok(())
    }

    /// `p`'s encoder on `x4` (`[R, C, 1, S]`, `c_n` codebooks): int64 codes `[R, C]`.
    fn encoder(&mut self, graph: &Graph, ir: NodeIndex, p: &PqEncode, x4: &str, c_n: usize) -> Result<String> {
        let s = p.subspace;
        match p.encoder {
            Encoder::Argmin => match p.act_scale {
                Some(a) => self.argmin_i8(graph, ir, x4, c_n, s, a),
                None => self.argmin(graph, ir, x4, c_n, s),
            },
            Encoder::Tree => self.tree(graph, ir, x4, c_n, s),
        }
    }

    /// Nearest prototype: `argmin_k ‖p_k‖² − 2 x·p_k` per codebook (the encoder's norms in place
    /// of `‖p_k‖²` when it has them); `x4` is `[R, C, 1, S]`.
    fn argmin(&mut self, graph: &Graph, ir: NodeIndex, x4: &str, c_n: usize, s: usize) -> Result<String> {
        let protos = const_input(graph, ir, 1)?.as_f32()?.as_standard_layout().into_owned();
        let k = protos.shape()[1];
        let pv = protos.as_slice().expect("standard layout");
        let mut pt = vec![0f32; c_n * s * k];
        let given = given_norms(graph, ir, c_n, k)?;
        let mut norms = vec![0f32; c_n * k];
        for c in 0..c_n {
            for j in 0..k {
                let p = &pv[(c * k + j) * s..][..s];
                norms[c * k + j] = match &given {
                    Some(n) => n[c * k + j],
                    None => p.iter().fold(0f32, |a, &v| v.mul_add(v, a)),
                };
                for (i, &v) in p.iter().enumerate() {
                    pt[(c * s + i) * k + j] = v;
                }
            }
        }
        let pt = self.init(&Tensor::f32(&[c_n, s, k], pt)?);
        let norms = self.init(&Tensor::f32(&[c_n, k], norms)?);
        let minus2 = self.init(&Tensor::f32(&[], vec![-2.0])?);
        let dot = self.op("MatMul", &[x4, &pt], vec![], None);
        let dot = self.reshape(&dot, &[-1, c_n as i64, k as i64], None);
        let dot = self.op("Mul", &[&dot, &minus2], vec![], None);
        let dist = self.op("Add", &[&dot, &norms], vec![], None);
        Ok(self.op("ArgMin", &[&dist], vec![attr_i("axis", 2), attr_i("keepdims", 0)], None))
    }

    /// The int8 argmin (`encode_i8`) in float32 operators, exactly: the inputs quantized by
    /// `Round(Min(Where(x' > 0, x', 0), 127))` with `x' = x · (1/act_scale)` (NaN and negatives
    /// read as 0; ONNX rounds half to even, as the encoder), then `hn − q·pq` with
    /// integer-valued floats whose sums stay below 2²⁴, so every sum is exact whatever the order.
    fn argmin_i8(
        &mut self,
        graph: &Graph,
        ir: NodeIndex,
        x4: &str,
        c_n: usize,
        s: usize,
        act_scale: f32,
    ) -> Result<String> {
        use crate::interp::kernels::encode_i8::{valid_act_scale, Quant};
        let p = const_input(graph, ir, 1)?;
        let k = match p.shape()[..] {
            [c, k, ss] if c == c_n && ss == s && (1..=256).contains(&k) => k,
            _ => {
                return Err(Error::Other(format!(
                    "prototypes {:?} do not fit {c_n} codebooks of {s} values",
                    p.shape()
                )))
            }
        };
        if !valid_act_scale(act_scale) || s > 64 {
            return Err(Error::Other(format!(
                "act_scale {act_scale} with subspace {s}: not an int8 encoder"
            )));
        }
        let protos = p.as_f32()?.iter().copied().collect::<Vec<f32>>();
        let norms = given_norms(graph, ir, c_n, k)?;
        let q = Quant::with_norms(&protos, norms.as_deref(), k, s, act_scale);
        let mut pt = vec![0f32; c_n * s * k];
        for c in 0..c_n {
            for j in 0..k {
                for i in 0..s {
                    pt[(c * s + i) * k + j] = q.protos()[(c * k + j) * s + i] as f32;
                }
            }
        }
        let hn: Vec<f32> = q.half_norms().iter().map(|&h| h as f32).collect();
        let pt = self.init(&Tensor::f32(&[c_n, s, k], pt)?);
        let hn = self.init(&Tensor::f32(&[c_n, k], hn)?);
        let inv = self.init(&Tensor::f32(&[], vec![1.0 / act_scale])?);
        let zero = self.init(&Tensor::f32(&[], vec![0.0])?);
        let top = self.init(&Tensor::f32(&[], vec![127.0])?);
        let xs = self.op("Mul", &[x4, &inv], vec![], None);
        // Where(x > 0, x, 0) rather than Max: NaN reads as 0, as in the encoder
        let pos = self.op("Greater", &[&xs, &zero], vec![], None);
        let xs = self.op("Where", &[&pos, &xs, &zero], vec![], None);
        let xs = self.op("Min", &[&xs, &top], vec![], None);
        let xq = self.op("Round", &[&xs], vec![], None);
        let dot = self.op("MatMul", &[&xq, &pt], vec![], None);
        let dot = self.reshape(&dot, &[-1, c_n as i64, k as i64], None);
        let dist = self.op("Sub", &[&hn, &dot], vec![], None);
        Ok(self.op("ArgMin", &[&dist], vec![attr_i("axis", 2), attr_i("keepdims", 0)], None))
    }

    /// Hash tree: at level `l` the node `2^l − 1 + idx` compares its split value with its
    /// threshold; `x4` is `[R, C, 1, S]`.
    fn tree(&mut self, graph: &Graph, ir: NodeIndex, x4: &str, c_n: usize, s: usize) -> Result<String> {
        let dims = const_input(graph, ir, 1)?;
        let depth = dims.shape().get(1).copied().unwrap_or(0);
        if depth == 0 {
            return Err(Error::Other("a tree of depth 0".into()));
        }
        let dims = dims.to_i64_vec()?;
        let thr = const_input(graph, ir, 2)?.as_f32()?.as_standard_layout().into_owned();
        let thr = thr.as_slice().expect("standard layout");
        let nodes = (1usize << depth) - 1;
        if dims.len() != c_n * depth || thr.len() != c_n * nodes {
            return Err(Error::Other("tree tensors do not fit the codebooks".into()));
        }
        // one-hot selection of each level's split dimension: [C, S, depth]
        let mut sel = vec![0f32; c_n * s * depth];
        for c in 0..c_n {
            for l in 0..depth {
                let dim = dims[c * depth + l].clamp(0, s as i64 - 1) as usize;
                sel[(c * s + dim) * depth + l] = 1.0;
            }
        }
        let sel = self.init(&Tensor::f32(&[c_n, s, depth], sel)?);
        let picked = self.op("MatMul", &[x4, &sel], vec![], None);
        let picked = self.reshape(&picked, &[-1, c_n as i64, depth as i64], None);
        let thr_flat = self.init(&Tensor::f32(&[c_n * nodes], thr.to_vec())?);
        let two = self.init(&Tensor::i64_vec(vec![2]));
        let mut idx: Option<String> = None;
        for l in 0..depth {
            let li = self.scalar_i64(l as i64);
            let xl = self.op("Gather", &[&picked, &li], vec![attr_i("axis", 2)], None);
            // the node's threshold: thresholds[c · nodes + 2^l − 1 + idx]
            let base: Vec<i64> = (0..c_n).map(|c| (c * nodes + (1 << l) - 1) as i64).collect();
            let base = self.i64s(&base);
            let at = match &idx {
                Some(i) => self.op("Add", &[i, &base], vec![], None),
                None => base,
            };
            let t = self.op("Gather", &[&thr_flat, &at], vec![attr_i("axis", 0)], None);
            let gt = self.op("Greater", &[&xl, &t], vec![], None);
            let bit = self.op("Cast", &[&gt], vec![attr_i("to", 7)], None);
            idx = Some(match idx {
                Some(i) => {
                    let twice = self.op("Mul", &[&i, &two], vec![], None);
                    self.op("Add", &[&twice, &bit], vec![], None)
                }
                None => bit,
            });
        }
        Ok(idx.expect("depth ≥ 1"))
    }

    /// `LutMatMul(codes, tables [C, M, K], scale, offset)` → gathered table rows summed over
    /// the codebooks, `· scale + offset`.
    fn lut_matmul(&mut self, graph: &Graph, ir: NodeIndex, n: &pb::NodeProto) -> Result<()> {
        self.prefix = n.name.clone();
        let tables = const_input(graph, ir, 1)?;
        let &[c_n, m, k] = tables.shape() else {
            return Err(Error::Other(format!("tables {:?} are not [C, M, K]", tables.shape())));
        };
        // [C, M, K] → [C·K, M]: row c·K + code is what codebook c adds for that code
        let flat = match tables {
            Tensor::I8(t) => {
                let t = t.as_standard_layout();
                let v = t.as_slice().expect("standard layout");
                let mut f = vec![0i8; c_n * k * m];
                for c in 0..c_n {
                    for o in 0..m {
                        for j in 0..k {
                            f[(c * k + j) * m + o] = v[(c * m + o) * k + j];
                        }
                    }
                }
                let t = self.init(&Tensor::I8(
                    ArrayD::from_shape_vec(IxDyn(&[c_n * k, m]), f).expect("size"),
                ));
                self.op("Cast", &[&t], vec![attr_i("to", 1)], None)
            }
            Tensor::F32(t) => {
                let t = t.as_standard_layout();
                let v = t.as_slice().expect("standard layout");
                let mut f = vec![0f32; c_n * k * m];
                for c in 0..c_n {
                    for o in 0..m {
                        for j in 0..k {
                            f[(c * k + j) * m + o] = v[(c * m + o) * k + j];
                        }
                    }
                }
                self.init(&Tensor::f32(&[c_n * k, m], f)?)
            }
            t => return Err(Error::Other(format!("tables must be i8 or f32, got {}", t.dtype()))),
        };
        let codes = self.reshape(&n.input[0], &[-1, c_n as i64], None);
        let base: Vec<i64> = (0..c_n).map(|c| (c * k) as i64).collect();
        let base = self.i64s(&base);
        let at = self.op("Add", &[&codes, &base], vec![], None);
        let rows = self.op("Gather", &[&flat, &at], vec![attr_i("axis", 0)], None);
        let axis = self.i64s(&[1]);
        let sum = self.op("ReduceSum", &[&rows, &axis], vec![attr_i("keepdims", 0)], None);
        let scaled = self.op("Mul", &[&sum, &n.input[2]], vec![], None);
        let y = self.op("Add", &[&scaled, &n.input[3]], vec![], None);
        let target = reshape_target(graph, Outlet::new(ir, 0))?;
        self.reshape(&y, &target, Some(&n.output[0]));
        Ok(())
    }
}
