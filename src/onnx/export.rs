//! IR → ONNX `ModelProto` (the body of a `.tcv` file). Standard ops are written in their
//! opset-17 form; tabconv's own ops go to the `ai.tabconv` domain. Constants become
//! initializers with raw little-endian data. Output is deterministic: nodes in the IR's
//! topological order, names made unique in that order.

use crate::error::{Error, Result};
use crate::ir::op::{Encoder, Gemm, Op, Padding, PoolKind, Unary, Window};
use crate::ir::{DType, Dim, Graph, Outlet, Tensor};
use crate::onnx::pb;
use std::collections::{HashMap, HashSet};

pub const ONNX_OPSET: i64 = 17;
pub const TABCONV_DOMAIN: &str = "ai.tabconv";
/// Version 2 added `PQEncode`'s `layout` attribute (channels-last input), version 3 the fused
/// `LutMatMul` epilogue, version 4 `Gelu` (standard only from ONNX opset 20), version 5
/// `PQEncode`'s `act_scale` (the int8 argmin encoder), version 6 `NhwcConv`'s `activation_max`
/// (a fused `Clip(0, max)`), version 7 `PQEncode`'s `pixel` (pixel codebooks), version 8 the
/// argmin `PQEncode`'s optional `norms` input (codebooks fitted in the output's metric).
pub const TABCONV_OPSET: i64 = 8;

/// What the exported model is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Target {
    /// The body of a `.tcv`: ops that opset 17 lacks (`Gelu`) go to `ai.tabconv` as one node,
    /// so a round trip gives back the same graph.
    Tcv,
    /// Standard opset-17 operators wherever one op has an exact decomposition (`Gelu` as
    /// Mul/Erf/Add); `ai.tabconv`'s lookup ops are still written, for [`super::lower`] to replace.
    Standard,
}

fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 1,
        DType::U8 => 2,
        DType::I8 => 3,
        DType::I32 => 6,
        DType::I64 => 7,
        DType::Bool => 9,
    }
}

pub fn tensor_proto(name: &str, t: &Tensor) -> pb::TensorProto {
    pb::TensorProto {
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: dtype_code(t.dtype()),
        name: name.to_string(),
        raw_data: t.to_le_bytes(),
        ..Default::default()
    }
}

fn value_info(name: &str, dtype: DType, shape: &[Dim]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value as D, Dimension};
    let dim = shape
        .iter()
        .map(|d| Dimension {
            denotation: String::new(),
            value: Some(match d {
                Dim::Known(v) => D::DimValue(*v),
                Dim::Batch(1) => D::DimParam("N".into()),
                Dim::Batch(k) => D::DimParam(format!("{k}*N")),
            }),
        })
        .collect();
    pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: dtype_code(dtype),
                shape: Some(pb::TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

pub(crate) fn attr_i(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: 2,
        i,
        ..Default::default()
    }
}
fn attr_f(name: &str, f: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: 1,
        f,
        ..Default::default()
    }
}
pub(crate) fn attr_ints(name: &str, ints: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: 7,
        ints: ints.to_vec(),
        ..Default::default()
    }
}
fn attr_s(name: &str, s: &str) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: 3,
        s: s.as_bytes().to_vec(),
        ..Default::default()
    }
}
/// The string attribute when `cond` holds (an optional attribute left at its default otherwise).
fn attr_s_if(cond: bool, name: &str, s: &str) -> Vec<pb::AttributeProto> {
    if cond {
        vec![attr_s(name, s)]
    } else {
        vec![]
    }
}
fn attr_t(name: &str, t: pb::TensorProto) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: 4,
        t: Some(t),
        ..Default::default()
    }
}

pub(crate) fn window_attrs(w: &Window, with_dilations: bool) -> Vec<pb::AttributeProto> {
    let u = |v: [usize; 2]| [v[0] as i64, v[1] as i64];
    let mut a = vec![
        attr_ints("kernel_shape", &u(w.kernel)),
        attr_ints("strides", &u(w.strides)),
    ];
    if with_dilations {
        a.push(attr_ints("dilations", &u(w.dilations)));
    }
    match &w.padding {
        Padding::Explicit(p) => a.push(attr_ints("pads", &p.map(|v| v as i64))),
        Padding::SameUpper => a.push(attr_s("auto_pad", "SAME_UPPER")),
        Padding::SameLower => a.push(attr_s("auto_pad", "SAME_LOWER")),
        Padding::Valid => a.push(attr_s("auto_pad", "VALID")),
    }
    if w.ceil_mode {
        a.push(attr_i("ceil_mode", 1));
    }
    a
}

struct Writer {
    target: Target,
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
    used: HashSet<String>,
    uses_custom_domain: bool,
}

impl Writer {
    fn unique(&mut self, base: &str) -> String {
        let mut n = if base.is_empty() {
            "v".to_string()
        } else {
            base.to_string()
        };
        let mut i = 1;
        while !self.used.insert(n.clone()) {
            n = format!("{base}.{i}");
            i += 1;
        }
        n
    }
    /// An extra initializer holding an attribute-ised input (Clip bounds, Squeeze axes, …).
    fn extra(&mut self, base: &str, t: Tensor) -> String {
        let name = self.unique(base);
        self.initializers.push(tensor_proto(&name, &t));
        name
    }
    fn node(
        &mut self,
        name: &str,
        op: &str,
        domain: &str,
        inputs: Vec<String>,
        output: &str,
        attribute: Vec<pb::AttributeProto>,
    ) {
        if domain == TABCONV_DOMAIN {
            self.uses_custom_domain = true;
        }
        self.nodes.push(pb::NodeProto {
            input: inputs,
            output: vec![output.to_string()],
            name: name.to_string(),
            op_type: op.to_string(),
            domain: domain.to_string(),
            attribute,
            doc_string: tabconv_doc(domain, op).to_string(),
        });
    }
}

/// What an `ai.tabconv` node does, as Netron shows it (the full contract: docs/TCV-FORMAT.md).
fn tabconv_doc(domain: &str, op: &str) -> &'static str {
    if domain != TABCONV_DOMAIN {
        return "";
    }
    match op {
        "PQEncode" => {
            "tabconv product-quantization encoder: splits each row (for a conv, each output \
             pixel's window, read in place) into codebooks of `subspace` values and writes, per \
             codebook, the index of the nearest of its K prototypes (encoder=argmin, input 1: \
             prototypes [C, K, S]) or of its hash-tree leaf (encoder=tree, inputs 1-2: split \
             dims [C, depth] and thresholds [C, K-1]). Output: uint8 codes [..., C]. \
             See docs/TCV-FORMAT.md."
        }
        "LutMatMul" => {
            "tabconv table lookups replacing a MatMul: y[..., m] = scale[m] * sum over codebooks \
             c of tables[c, m, codes[..., c]] + offset[m]; then, when fused, + residual (input 4) \
             and ReLU (activation). Inputs: codes [..., C], tables [C, M, K] (int8 or float32), \
             scale [M], offset [M]. See docs/TCV-FORMAT.md."
        }
        "Im2Col" => "tabconv im2col: the receptive field of every output pixel as one row [N, oh*ow, C*kh*kw].",
        "NhwcConv" => {
            "tabconv convolution on channels-last [N, H, W, C] activations (standard Conv \
             attributes; optional input 3: a residual added before the optional ReLU, which \
             activation_max caps)."
        }
        "NhwcMaxPool" | "NhwcAveragePool" => "tabconv pooling on channels-last [N, H, W, C] activations.",
        "Gelu" => {
            "ONNX Gelu (opset 20, attribute `approximate`) in a file of ONNX opset 17: \
             0.5 * x * (1 + erf(x / sqrt(2))), or with approximate=tanh \
             0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))."
        }
        _ => "tabconv operator: see docs/TCV-FORMAT.md.",
    }
}

/// Convert the graph to the body of a `.tcv` ([`Target::Tcv`]) with `metadata` as
/// `metadata_props`.
pub fn export_model(graph: &Graph, metadata: &[(String, String)]) -> Result<pb::ModelProto> {
    export_model_for(graph, metadata, Target::Tcv)
}

/// Convert the graph to an ONNX model for `target` with `metadata` as `metadata_props`.
pub fn export_model_for(graph: &Graph, metadata: &[(String, String)], target: Target) -> Result<pb::ModelProto> {
    let order = graph.topo_order()?;
    let mut w = Writer {
        target,
        nodes: vec![],
        initializers: vec![],
        used: HashSet::new(),
        uses_custom_domain: false,
    };
    let mut names: HashMap<Outlet, String> = HashMap::new();
    // Graph outputs keep their names; an outlet that is two outputs (or an input) gets Identities.
    let mut output_alias: HashMap<Outlet, String> = HashMap::new();
    for (name, o) in &graph.outputs {
        if !output_alias.contains_key(o) && !matches!(graph.node(o.node).op, Op::Input) {
            output_alias.insert(*o, name.clone());
            w.used.insert(name.clone());
        }
    }
    for n in &order {
        let node = graph.node(*n);
        let o = Outlet::new(*n, 0);
        let vname = match output_alias.get(&o) {
            Some(name) => name.clone(),
            None => {
                let base = if matches!(node.op, Op::Input) {
                    node.name.clone()
                } else {
                    node.outputs[0].name.clone()
                };
                w.unique(&base)
            }
        };
        names.insert(o, vname.clone());
        let mut outs = vec![vname];
        for slot in 1..node.outputs.len() {
            let extra = match output_alias.get(&Outlet::new(*n, slot)) {
                Some(name) => name.clone(),
                None => w.unique(&node.outputs[slot].name),
            };
            names.insert(Outlet::new(*n, slot), extra.clone());
            outs.push(extra);
        }
        let ins: Vec<String> = graph.inputs_of(*n).iter().map(|i| names[i].clone()).collect();
        write_node(&mut w, graph, *n, ins, &outs)?;
    }
    let mut outputs = Vec::new();
    for (name, o) in &graph.outputs {
        let f = graph
            .fact(*o)
            .ok_or_else(|| Error::Other(format!("output {name} has no shape")))?;
        if names[o] != *name {
            w.node(
                &format!("{name}/output"),
                "Identity",
                "",
                vec![names[o].clone()],
                name,
                vec![],
            );
        }
        outputs.push(value_info(name, f.dtype, &f.shape));
    }
    let inputs = graph
        .inputs
        .iter()
        .map(|n| {
            let f = graph.node(*n).outputs[0]
                .fact
                .as_ref()
                .ok_or_else(|| Error::Other("input without shape".into()))?;
            Ok(value_info(&names[&Outlet::new(*n, 0)], f.dtype, &f.shape))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut opset_import = vec![pb::OperatorSetIdProto {
        domain: String::new(),
        version: ONNX_OPSET,
    }];
    if w.uses_custom_domain {
        opset_import.push(pb::OperatorSetIdProto {
            domain: TABCONV_DOMAIN.into(),
            version: TABCONV_OPSET,
        });
    }
    Ok(pb::ModelProto {
        ir_version: 8,
        opset_import,
        producer_name: "tabconv".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(pb::GraphProto {
            node: w.nodes,
            name: "tabconv".into(),
            initializer: w.initializers,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        metadata_props: metadata
            .iter()
            .map(|(k, v)| pb::StringStringEntryProto {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        ..Default::default()
    })
}

/// `Gelu` (opset 20) in opset-17 operators ([`Target::Standard`]), in the order the
/// interpreter's kernel computes it:
/// `(0.5·x)·(1 + erf(x·(1/√2)))`, or with `tanh`, `(0.5·x)·(1 + tanh((x + 0.044715·x·x·x)·√(2/π)))`.
fn write_gelu(w: &mut Writer, name: &str, ins: Vec<String>, out: &str, tanh: bool) {
    let x = ins.into_iter().next().unwrap_or_default();
    let mut k = 0;
    // one node `op(a, b)`; `b` a runtime value or a scalar constant
    let mut step = |w: &mut Writer, op: &str, a: &str, b: Result<&str, f32>| -> String {
        k += 1;
        let b = match b {
            Ok(v) => vec![v.to_string()],
            Err(c) => vec![w.extra(&format!("{name}.c{k}"), Tensor::scalar_f32(c))],
        };
        let o = w.unique(&format!("{out}.gelu{k}"));
        let ins = [
            vec![a.to_string()],
            if op == "Erf" || op == "Tanh" { vec![] } else { b },
        ]
        .concat();
        w.node(&format!("{name}/gelu{k}"), op, "", ins, &o, vec![]);
        o
    };
    let inner = if tanh {
        let c = step(w, "Mul", &x, Err(0.044715));
        let c = step(w, "Mul", &c, Ok(&x));
        let c = step(w, "Mul", &c, Ok(&x));
        let s = step(w, "Add", &x, Ok(&c));
        let s = step(w, "Mul", &s, Err(0.797_884_6));
        step(w, "Tanh", &s, Ok(""))
    } else {
        let a = step(w, "Mul", &x, Err(std::f32::consts::FRAC_1_SQRT_2));
        step(w, "Erf", &a, Ok(""))
    };
    let p = step(w, "Add", &inner, Err(1.0));
    let h = step(w, "Mul", &x, Err(0.5));
    w.node(&format!("{name}/gelu"), "Mul", "", vec![h, p], out, vec![]);
}

fn write_node(
    w: &mut Writer,
    graph: &Graph,
    n: petgraph::stable_graph::NodeIndex,
    ins: Vec<String>,
    outs: &[String],
) -> Result<()> {
    let out = outs[0].as_str();
    let node = graph.node(n);
    let name = node.name.as_str();
    let std = |w: &mut Writer, op: &str, ins: Vec<String>, attrs: Vec<pb::AttributeProto>| {
        w.node(name, op, "", ins, out, attrs)
    };
    match &node.op {
        Op::Input => {}
        Op::Const(t) => w.initializers.push(tensor_proto(out, t)),
        Op::Conv(c) => {
            let mut a = window_attrs(&c.window, true);
            a.push(attr_i("group", c.group as i64));
            if c.relu {
                if !c.nhwc {
                    crate::bail!("node '{name}': a fused ReLU needs the channels-last Conv");
                }
                a.push(attr_s("activation", "Relu"));
                if let Some(max) = c.relu_max {
                    a.push(attr_f("activation_max", max));
                }
            }
            match c.nhwc {
                true => w.node(name, "NhwcConv", TABCONV_DOMAIN, ins, out, a),
                false => std(w, "Conv", ins, a),
            }
        }
        Op::Im2Col(win) => w.node(name, "Im2Col", TABCONV_DOMAIN, ins, out, window_attrs(win, true)),
        Op::Split { axis, sizes } => {
            let split = w.extra(
                &format!("{name}.split"),
                Tensor::i64_vec(sizes.iter().map(|&s| s as i64).collect()),
            );
            std(w, "Split", [ins, vec![split]].concat(), vec![attr_i("axis", *axis)]);
            w.nodes.last_mut().expect("just written").output = outs.to_vec();
        }
        Op::PqEncode(p) => {
            let enc = match p.encoder {
                Encoder::Argmin => "argmin",
                Encoder::Tree => "tree",
            };
            let mut a = vec![attr_i("subspace", p.subspace as i64), attr_s("encoder", enc)];
            if let Some(v) = p.act_scale {
                a.push(attr_f("act_scale", v));
            }
            if let Some(win) = &p.window {
                a.extend(window_attrs(win, true));
                if p.nhwc {
                    a.push(attr_s("layout", "NHWC"));
                }
                if p.pixel {
                    a.push(attr_i("pixel", 1));
                }
            }
            w.node(name, "PQEncode", TABCONV_DOMAIN, ins, out, a)
        }
        Op::LutMatMul { relu } => {
            let a = attr_s_if(*relu, "activation", "Relu");
            w.node(name, "LutMatMul", TABCONV_DOMAIN, ins, out, a)
        }
        Op::BatchNorm { epsilon } => std(w, "BatchNormalization", ins, vec![attr_f("epsilon", *epsilon)]),
        Op::Unary(u) => match u {
            Unary::Relu => std(w, "Relu", ins, vec![]),
            Unary::Sigmoid => std(w, "Sigmoid", ins, vec![]),
            Unary::Tanh => std(w, "Tanh", ins, vec![]),
            Unary::HardSwish => std(w, "HardSwish", ins, vec![]),
            Unary::Identity => std(w, "Identity", ins, vec![]),
            Unary::Erf | Unary::Sqrt | Unary::Exp | Unary::Neg => std(w, node.op.name(), ins, vec![]),
            Unary::Gelu { tanh } if w.target == Target::Standard => write_gelu(w, name, ins, out, *tanh),
            Unary::Gelu { tanh } => {
                let a = attr_s_if(*tanh, "approximate", "tanh");
                w.node(name, "Gelu", TABCONV_DOMAIN, ins, out, a)
            }
            Unary::LeakyRelu { alpha } => std(w, "LeakyRelu", ins, vec![attr_f("alpha", *alpha)]),
            Unary::HardSigmoid { alpha, beta } => std(
                w,
                "HardSigmoid",
                ins,
                vec![attr_f("alpha", *alpha), attr_f("beta", *beta)],
            ),
            Unary::Clip { min, max } => {
                let lo = w.extra(&format!("{name}.min"), Tensor::scalar_f32(*min));
                let hi = w.extra(&format!("{name}.max"), Tensor::scalar_f32(*max));
                std(w, "Clip", [ins, vec![lo, hi]].concat(), vec![])
            }
        },
        Op::Binary(_) => std(w, node.op.name(), ins, vec![]),
        Op::Sum => std(w, "Sum", ins, vec![]),
        Op::Equal | Op::Where | Op::Expand => std(w, node.op.name(), ins, vec![]),
        Op::LayerNorm { axis, epsilon } => std(
            w,
            "LayerNormalization",
            ins,
            vec![attr_i("axis", *axis), attr_f("epsilon", *epsilon)],
        ),
        Op::Pool(p) => {
            let mut a = window_attrs(&p.window, p.kind == PoolKind::Max || p.window.dilations != [1, 1]);
            if let PoolKind::Avg {
                count_include_pad: true,
            } = p.kind
            {
                a.push(attr_i("count_include_pad", 1));
            }
            match p.nhwc {
                true => {
                    let op = format!("Nhwc{}", node.op.name());
                    w.node(name, &op, TABCONV_DOMAIN, ins, out, a)
                }
                false => std(w, node.op.name(), ins, a),
            }
        }
        Op::GlobalPool { .. } => std(w, node.op.name(), ins, vec![]),
        Op::Lrn {
            size,
            alpha,
            beta,
            bias,
        } => std(
            w,
            "LRN",
            ins,
            vec![
                attr_i("size", *size as i64),
                attr_f("alpha", *alpha),
                attr_f("beta", *beta),
                attr_f("bias", *bias),
            ],
        ),
        Op::Concat { axis } => std(w, "Concat", ins, vec![attr_i("axis", *axis)]),
        Op::Flatten { axis } => std(w, "Flatten", ins, vec![attr_i("axis", *axis)]),
        Op::Reshape { allowzero } => std(
            w,
            "Reshape",
            ins,
            if *allowzero {
                vec![attr_i("allowzero", 1)]
            } else {
                vec![]
            },
        ),
        Op::Transpose { perm } => {
            let a = perm
                .as_ref()
                .map(|p| vec![attr_ints("perm", &p.iter().map(|&v| v as i64).collect::<Vec<_>>())]);
            std(w, "Transpose", ins, a.unwrap_or_default())
        }
        Op::Squeeze { axes } => {
            let mut i = ins;
            if let Some(ax) = axes {
                i.push(w.extra(&format!("{name}.axes"), Tensor::i64_vec(ax.clone())));
            }
            std(w, "Squeeze", i, vec![])
        }
        Op::Unsqueeze { axes } => {
            let ax = w.extra(&format!("{name}.axes"), Tensor::i64_vec(axes.clone()));
            std(w, "Unsqueeze", [ins, vec![ax]].concat(), vec![])
        }
        Op::Gemm(Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        }) => std(
            w,
            "Gemm",
            ins,
            vec![
                attr_f("alpha", *alpha),
                attr_f("beta", *beta),
                attr_i("transA", *trans_a as i64),
                attr_i("transB", *trans_b as i64),
            ],
        ),
        Op::MatMul => std(w, "MatMul", ins, vec![]),
        Op::Softmax { axis, .. } => std(w, node.op.name(), ins, vec![attr_i("axis", *axis)]),
        Op::Slice {
            starts,
            ends,
            axes,
            steps,
        } => {
            let mut i = ins;
            for (what, v) in [("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps)] {
                i.push(w.extra(&format!("{name}.{what}"), Tensor::i64_vec(v.clone())));
            }
            std(w, "Slice", i, vec![])
        }
        Op::ReduceMean { axes, keepdims } => {
            let mut a = vec![attr_i("keepdims", *keepdims as i64)];
            if let Some(ax) = axes {
                a.push(attr_ints("axes", ax));
            }
            std(w, "ReduceMean", ins, a)
        }
        Op::Pad { pads, value } => {
            let p = w.extra(&format!("{name}.pads"), Tensor::i64_vec(pads.clone()));
            let v = w.extra(&format!("{name}.value"), Tensor::scalar_f32(*value));
            std(w, "Pad", [ins, vec![p, v]].concat(), vec![])
        }
        Op::Shape { start, end } => {
            let mut a = vec![attr_i("start", *start)];
            if let Some(e) = end {
                a.push(attr_i("end", *e));
            }
            std(w, "Shape", ins, a)
        }
        Op::Gather { axis } => std(w, "Gather", ins, vec![attr_i("axis", *axis)]),
        Op::Cast { to } => std(w, "Cast", ins, vec![attr_i("to", dtype_code(*to) as i64)]),
        Op::ConstantOfShape { value } => {
            // ONNX wants a one-element 1-D tensor here
            let mut t = tensor_proto("value", value);
            t.dims = vec![1];
            std(w, "ConstantOfShape", ins, vec![attr_t("value", t)])
        }
    }
    Ok(())
}
