//! ONNX → IR import. Nodes are converted in file order (ONNX guarantees a topological order),
//! each op's opset form normalised into one IR form, and every node whose inputs are all
//! constant (including `Shape` of a statically-shaped value) is folded on the spot, so shape
//! sub-graphs feeding Reshape, Squeeze, Pad … disappear before the rest of the import sees them.

use super::attrs::Attrs;
use super::export::{TABCONV_DOMAIN, TABCONV_OPSET};
use super::proto::{read_model_proto, TensorReader};
use crate::error::{Error, Result};
use crate::interp::eval::eval_op;
use crate::interp::kernels::encode_i8::valid_act_scale;
use crate::ir::infer::{infer_graph, infer_op};
use crate::ir::op::{Binary, Conv, Encoder, Gemm, Padding, Pool, PoolKind, PqEncode, Unary, Window};
use crate::ir::{DType, Dim, Fact, Graph, Op, Outlet, Tensor};
use crate::onnx::pb::{self, type_proto, ModelProto, NodeProto};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// ONNX ops the importer understands (default domain).
pub const SUPPORTED_OPS: &[&str] = &[
    "Conv",
    "BatchNormalization",
    "Relu",
    "LeakyRelu",
    "Clip",
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "HardSwish",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "LRN",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Sum",
    "Concat",
    "Flatten",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Gemm",
    "MatMul",
    "Softmax",
    "ReduceMean",
    "Pad",
    "Dropout",
    "Identity",
    "Constant",
    "Shape",
    "Gather",
    "Cast",
    "ConstantOfShape",
    "LogSoftmax",
    "Slice",
    "Split",
    "Erf",
    "Gelu",
    "Sqrt",
    "Exp",
    "Neg",
    "Pow",
    "Equal",
    "Where",
    "Expand",
    "LayerNormalization",
];

/// tabconv's own operators (domain `ai.tabconv`, see docs/TCV-FORMAT.md).
pub const TABCONV_OPS: &[&str] = &[
    "Im2Col",
    "PQEncode",
    "LutMatMul",
    "NhwcConv",
    "NhwcMaxPool",
    "NhwcAveragePool",
    "Gelu",
];

/// `Gelu`'s form from its `approximate` attribute (ONNX opset 20, and `ai.tabconv` opset 4).
fn gelu(a: &Attrs) -> Result<Unary> {
    match a.string("approximate").as_deref() {
        None | Some("none") => Ok(Unary::Gelu { tanh: false }),
        Some("tanh") => Ok(Unary::Gelu { tanh: true }),
        Some(other) => Err(Error::Other(format!(
            "approximate must be 'none' or 'tanh', got '{other}'"
        ))),
    }
}

fn is_supported(n: &NodeProto, tabconv_opset: Option<i64>) -> bool {
    if n.domain.is_empty() || n.domain == "ai.onnx" {
        SUPPORTED_OPS.contains(&n.op_type.as_str())
    } else {
        n.domain == TABCONV_DOMAIN && tabconv_opset.is_some() && TABCONV_OPS.contains(&n.op_type.as_str())
    }
}

/// Read and import an ONNX model file, then infer shapes and verify the graph.
pub fn load_model(path: &Path) -> Result<Graph> {
    let model = read_model_proto(path)?;
    import_model(&model, path)
}

/// Metadata key recording how a declared fixed batch was handled: `symbolic (declared B)` when
/// the graph was imported with its batch symbolic, `fixed B` when it depends on its fixed batch
/// (the interpreter then runs larger batches in chunks of `B`, see `interp::Plan::run`). Absent
/// when the inputs already declare a symbolic batch.
pub const BATCH_KEY: &str = "batch";

/// Import a model. When every input declares the same fixed leading dimension `B` (what
/// `torch.onnx.export` writes without `dynamic_axes`, and most model-zoo files), the model is
/// first imported with that dimension as the symbolic batch, constant `Reshape` targets that pin
/// it rewritten to copy it (see `Importer::unpin_batch`); the result is kept when shapes infer and
/// every computed value keeps the batch leading, once, so each image is computed on its own
/// exactly as at batch `B` ([`batch_is_per_image`]). Otherwise the model is imported as declared.
pub fn import_model(model: &ModelProto, path: &Path) -> Result<Graph> {
    import_model_from(model, path, true)
}

/// [`import_model`]; `allow_external`: whether initializers may keep their data in external
/// files (never for a `.tcv`, see docs/TCV-FORMAT.md).
pub(crate) fn import_model_from(model: &ModelProto, path: &Path, allow_external: bool) -> Result<Graph> {
    let Some(b) = model.graph.as_ref().and_then(declared_fixed_batch) else {
        return import_with(model, path, None, allow_external);
    };
    if let Ok(mut g) = import_with(model, path, Some(b), allow_external) {
        if batch_is_per_image(&g).is_ok() {
            g.metadata.insert(BATCH_KEY.into(), format!("symbolic (declared {b})"));
            return Ok(g);
        }
    }
    let mut g = import_with(model, path, None, allow_external)?;
    g.metadata.insert(BATCH_KEY.into(), format!("fixed {b}"));
    Ok(g)
}

/// `B` when every (non-initializer) graph input has rank ≥ 2 and declares the same fixed
/// leading dimension `B`.
fn declared_fixed_batch(g: &pb::GraphProto) -> Option<i64> {
    use pb::tensor_shape_proto::dimension::Value as D;
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut batch = None;
    for input in g.input.iter().filter(|i| !inits.contains(i.name.as_str())) {
        let Some(type_proto::Value::TensorType(tt)) = input.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
            return None;
        };
        let dims = &tt.shape.as_ref()?.dim;
        let b = match dims.first()?.value {
            Some(D::DimValue(v)) if v > 0 && dims.len() >= 2 => v,
            _ => return None,
        };
        if batch.replace(b).is_some_and(|prev| prev != b) {
            return None;
        }
    }
    batch
}

/// A small integer tensor whose contents are known statically (possibly in terms of `N`): a shape.
fn is_shape_value(f: &Fact) -> bool {
    f.dtype != DType::F32 && f.value.is_some()
}

/// Whether the graph computes each image on its own: every computed value (other than small
/// integer shape values) has the batch `N` as exactly one of its dimensions (the graph outputs
/// as the leading one; attention's `[3, N, heads, T, d]` moves it), no op works across the
/// batch axis of its input, and the batch size only shapes values. At the declared batch the
/// graph computes what the file does, so with this it computes, for any batch, what the file
/// computes image by image.
pub fn batch_is_per_image(g: &Graph) -> std::result::Result<(), String> {
    // the one axis that is the batch `N` (not a multiple of it)
    let batch_axis = |f: &Fact| -> Option<usize> {
        let mut it = f.shape.iter().enumerate().filter(|(_, d)| matches!(d, Dim::Batch(_)));
        let (i, d) = it.next()?;
        (it.next().is_none() && *d == Dim::Batch(1)).then_some(i)
    };
    let batch_leads = |f: &Fact| batch_axis(f) == Some(0);
    for n in g.topo_order().map_err(|e| e.to_string())? {
        let node = g.node(n);
        if matches!(node.op, Op::Input | Op::Const(_)) {
            continue;
        }
        for v in &node.outputs {
            let Some(f) = v.fact.as_ref() else {
                return Err(format!("node '{}' has an output without a shape", node.name));
            };
            if !(is_shape_value(f) || batch_axis(f).is_some()) {
                return Err(format!("node '{}' ({}) gives {f}", node.name, node.op.name()));
            }
        }
        // The batch size itself may only shape things (a Reshape target, a ConstantOfShape
        // shape, or more shape arithmetic), never enter the computed values.
        let shapes_only = node.outputs.iter().all(|v| v.fact.as_ref().is_some_and(is_shape_value));
        for (port, o) in g.inputs_of(n).iter().enumerate() {
            let holds_n = g
                .fact(*o)
                .and_then(|f| f.value.as_ref())
                .is_some_and(|v| v.iter().any(|d| matches!(d, Dim::Batch(_))));
            let ok = shapes_only
                || matches!(
                    (&node.op, port),
                    (Op::Reshape { .. } | Op::Expand, 1) | (Op::ConstantOfShape { .. }, 0)
                );
            if holds_n && !ok {
                return Err(format!(
                    "node '{}' ({}) uses the batch size as a value",
                    node.name,
                    node.op.name()
                ));
            }
        }
        // the rank and batch axis of the first input that has one
        let (rank0, b) = g
            .inputs_of(n)
            .iter()
            .filter_map(|o| g.fact(*o))
            .find_map(|f| batch_axis(f).map(|b| (Some(f.rank()), b)))
            .unwrap_or((None, 0));
        let on_batch = |axis: i64, r: usize| crate::ir::infer::norm_axis(axis, r).ok() == Some(b);
        let across = match (&node.op, rank0) {
            (Op::Softmax { axis, .. }, Some(r)) => on_batch(*axis, r),
            // LayerNorm normalises over every axis from `axis` on
            (Op::LayerNorm { axis, .. }, Some(r)) => crate::ir::infer::norm_axis(*axis, r).ok().is_none_or(|a| a <= b),
            (Op::Pad { pads, .. }, Some(r)) => {
                pads.get(b).is_some_and(|&p| p != 0) || pads.get(b + r).is_some_and(|&p| p != 0)
            }
            (Op::Concat { axis, .. } | Op::Split { axis, .. } | Op::Gather { axis }, Some(r)) => on_batch(*axis, r),
            // `x[:, …]`: all of the batch axis, in order, is per image
            (
                Op::Slice {
                    starts,
                    ends,
                    axes,
                    steps,
                },
                Some(r),
            ) => axes.iter().enumerate().any(|(i, &a)| {
                let whole = starts.get(i) == Some(&0)
                    && ends.get(i).is_some_and(|&e| e >= i32::MAX as i64)
                    && steps.get(i).is_none_or(|&s| s == 1);
                on_batch(a, r) && !whole
            }),
            // A reshape keeps images apart only when the batch is outermost (after 1s) on both
            // sides: `[3, N, 4] → [N, 3, 4]` would mix them.
            (Op::Reshape { .. } | Op::Flatten { .. }, Some(_)) => {
                let outer = |f: &Fact| batch_axis(f).is_some_and(|b| f.shape[..b].iter().all(|d| d.known() == Some(1)));
                let ins_ok = g.inputs_of(n).first().and_then(|o| g.fact(*o)).is_some_and(outer);
                let outs_ok = node.outputs.iter().all(|v| v.fact.as_ref().is_some_and(outer));
                !(ins_ok && outs_ok)
            }
            _ => false,
        };
        // shape arithmetic (concatenating shape vectors) works on shapes, not on images
        if across && !shapes_only {
            return Err(format!(
                "node '{}' ({}) works across the batch axis (axis {b})",
                node.name,
                node.op.name()
            ));
        }
    }
    for (name, o) in &g.outputs {
        if !g.fact(*o).is_some_and(batch_leads) {
            return Err(format!("output '{name}' does not lead with the batch"));
        }
    }
    Ok(())
}

fn import_with(model: &ModelProto, path: &Path, symbolic_batch: Option<i64>, allow_external: bool) -> Result<Graph> {
    let merr = |msg: String| Error::Model { path: path.into(), msg };
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(1);
    let g = model.graph.as_ref().ok_or_else(|| merr("no graph".into()))?;
    let tabconv_opset = model
        .opset_import
        .iter()
        .find(|o| o.domain == TABCONV_DOMAIN)
        .map(|o| o.version);
    if let Some(v) = tabconv_opset {
        if !(1..=TABCONV_OPSET).contains(&v) {
            return Err(merr(format!(
                "uses {TABCONV_DOMAIN} opset {v}, this tabconv understands up to {TABCONV_OPSET}"
            )));
        }
    }

    let unsupported: Vec<String> = g
        .node
        .iter()
        .filter(|n| !is_supported(n, tabconv_opset))
        .map(|n| {
            let dom = if n.domain.is_empty() {
                String::new()
            } else {
                format!("{}::", n.domain)
            };
            format!("{dom}{} (node '{}')", n.op_type, n.name)
        })
        .collect();
    if !unsupported.is_empty() {
        let mut list: Vec<String> = unsupported;
        list.dedup();
        return Err(Error::Unsupported {
            path: path.into(),
            opset,
            list,
        });
    }

    let mut im = Importer {
        graph: Graph::new(),
        values: HashMap::new(),
        unsupported_outputs: HashMap::new(),
        names: HashSet::new(),
        opset,
        reader: if allow_external {
            TensorReader::new(path)
        } else {
            TensorReader::without_external(path)
        },
        symbolic_batch,
        tabconv_opset: tabconv_opset.unwrap_or(0),
    };
    im.graph.metadata.insert("source_opset".into(), opset.to_string());
    if !model.producer_name.is_empty() {
        im.graph.metadata.insert(
            "source_producer".into(),
            format!("{} {}", model.producer_name, model.producer_version),
        );
    }

    for t in &g.initializer {
        let tensor = im
            .reader
            .read(t)
            .map_err(|e| merr(format!("initializer '{}': {e}", t.name)))?;
        im.add_const(&t.name, tensor);
    }
    for input in &g.input {
        if im.values.contains_key(&input.name) {
            continue; // old model-zoo files list initializers as inputs too
        }
        let fact = input_fact(input, symbolic_batch.is_some())
            .map_err(|e| merr(format!("graph input '{}': {e}", input.name)))?;
        let n = im.graph.add_node(&input.name, Op::Input, &[]);
        im.graph.node_mut(n).outputs[0].fact = Some(fact);
        im.graph.inputs.push(n);
        im.names.insert(input.name.clone());
        im.values.insert(input.name.clone(), Outlet::new(n, 0));
    }
    if im.graph.inputs.is_empty() {
        return Err(merr("the graph has no (non-initializer) input".into()));
    }

    for (i, node) in g.node.iter().enumerate() {
        let name = if node.name.is_empty() {
            format!("{}_{i}", node.op_type)
        } else {
            node.name.clone()
        };
        im.import_node(node, &name).map_err(|e| match e {
            Error::Other(msg) => Error::Model {
                path: path.into(),
                msg: format!("node '{name}' ({}, opset {opset}): {msg}", node.op_type),
            },
            Error::Node { node: n, op, msg } => Error::Model {
                path: path.into(),
                msg: format!("node '{n}' ({op}, opset {opset}): {msg}"),
            },
            other => other,
        })?;
    }

    if g.output.is_empty() {
        return Err(merr("the graph has no outputs".into()));
    }
    for out in &g.output {
        let o = im.value(&out.name).map_err(|e| merr(format!("graph output: {e}")))?;
        im.graph.outputs.push((out.name.clone(), o));
    }
    im.graph.remove_dead();
    infer_graph(&mut im.graph).map_err(|e| merr(e.to_string()))?;
    im.graph.verify().map_err(|e| merr(e.to_string()))?;
    Ok(im.graph)
}

/// The declared fact of a graph input; `symbolic_batch`: the leading dimension is the batch
/// even when declared fixed.
fn input_fact(input: &pb::ValueInfoProto, symbolic_batch: bool) -> Result<Fact> {
    let Some(type_proto::Value::TensorType(tt)) = input.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(Error::Other("has no tensor type".into()));
    };
    if tt.elem_type != 1 {
        return Err(Error::Other(format!("element type {} is not float32", tt.elem_type)));
    }
    let dims = tt.shape.as_ref().map(|s| s.dim.as_slice()).unwrap_or(&[]);
    if dims.is_empty() {
        return Err(Error::Other("has no declared shape".into()));
    }
    use pb::tensor_shape_proto::dimension::Value as D;
    let shape = dims
        .iter()
        .enumerate()
        .map(|(i, d)| match (&d.value, i) {
            (Some(D::DimValue(_)), 0) if symbolic_batch => Ok(Dim::Batch(1)),
            (Some(D::DimValue(v)), _) if *v > 0 => Ok(Dim::Known(*v)),
            (_, 0) => Ok(Dim::Batch(1)),
            (v, i) => Err(Error::Other(format!(
                "dimension {i} is symbolic ({v:?}); only the batch dimension may be symbolic"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Fact::new(DType::F32, shape))
}

struct Importer {
    graph: Graph,
    values: HashMap<String, Outlet>,
    /// Secondary outputs (Dropout mask, MaxPool indices, …) that inference does not produce.
    unsupported_outputs: HashMap<String, String>,
    names: HashSet<String>,
    opset: i64,
    reader: TensorReader,
    /// The file's `ai.tabconv` opset (0 when it declares none).
    tabconv_opset: i64,
    /// The declared fixed batch being imported as the symbolic batch (see [`import_model`]).
    symbolic_batch: Option<i64>,
}

impl Importer {
    fn unique(&mut self, name: &str) -> String {
        let mut n = name.to_string();
        let mut i = 1;
        while !self.names.insert(n.clone()) {
            n = format!("{name}.{i}");
            i += 1;
        }
        n
    }

    fn add_const(&mut self, value_name: &str, t: Tensor) -> Outlet {
        let name = self.unique(value_name);
        let n = self.graph.add_node(&name, Op::Const(Arc::new(t.clone())), &[]);
        self.graph.node_mut(n).outputs[0].fact = Some(Fact::of_tensor(&t));
        self.graph.node_mut(n).outputs[0].name = value_name.to_string();
        let o = Outlet::new(n, 0);
        self.values.insert(value_name.to_string(), o);
        o
    }

    /// With a declared batch `B` imported as symbolic: a constant `Reshape` target `[B, d…]` of a
    /// value `[N, e…]` (batch leading, the rest static) whose `d…` hold exactly the `e…`
    /// elements of one image (or are completed by one `-1`) becomes `[-1, d…]` with the `-1` of
    /// `d…` resolved, so it yields `N` (with or without `allowzero`). The exporter wrote the
    /// declared batch there (the legacy exporter folds `x.view(x.size(0), -1)` into such a
    /// constant, the dynamo exporter writes it directly); at batch `B` both targets give the same
    /// shape.
    fn unpin_batch(&mut self, op: &Op, inputs: &[Outlet]) -> Option<Outlet> {
        let b = self.symbolic_batch?;
        if !matches!(op, Op::Reshape { .. }) || inputs.len() != 2 {
            return None;
        }
        let data = self.graph.fact(inputs[0])?;
        if data.shape.first() != Some(&Dim::Batch(1)) {
            return None;
        }
        let per_image: i64 = data.shape[1..]
            .iter()
            .try_fold(1i64, |p, d| p.checked_mul(d.known()?))?;
        let target = self.graph.const_value(inputs[1])?.to_i64_vec().ok()?;
        let (&first, rest) = target.split_first()?;
        if first != b || per_image <= 0 || rest.iter().any(|&d| d == 0 || d < -1) {
            return None;
        }
        let known: i64 = rest
            .iter()
            .filter(|&&d| d != -1)
            .try_fold(1i64, |p, &d| p.checked_mul(d))?;
        let fill = match rest.iter().filter(|&&d| d == -1).count() {
            0 if known == per_image => 1,
            1 if known > 0 && per_image % known == 0 => per_image / known,
            _ => return None,
        };
        let mut t = vec![-1];
        t.extend(rest.iter().map(|&d| if d == -1 { fill } else { d }));
        let name = format!("{}.batch", self.graph.node(inputs[1].node).name);
        Some(self.add_const(&name, Tensor::i64_vec(t)))
    }

    /// With a declared batch `B` imported as symbolic: a constant `[B, d…]` concatenated along
    /// another axis with computed values that lead with the batch (a class token the exporter
    /// expanded to the declared batch, e.g. `cls.expand(x.shape[0], -1, -1)` at `B = 1`) is
    /// expanded to `[N, d…]` (`Expand` to the batch of the first such value, then `d…`), so the
    /// `Concat` works for any batch and equals the file's at batch `B`.
    fn unpin_concat(&mut self, name: &str, op: &Op, inputs: &mut [Outlet]) -> Option<()> {
        let b = self.symbolic_batch?;
        let Op::Concat { axis } = op else {
            return None;
        };
        let rank = self.graph.fact(inputs[0])?.rank();
        if crate::ir::infer::norm_axis(*axis, rank).ok()? == 0 {
            return None;
        }
        let batched = *inputs.iter().find(|&&o| {
            self.graph.const_value(o).is_none()
                && self
                    .graph
                    .fact(o)
                    .is_some_and(|f| f.shape.first() == Some(&Dim::Batch(1)))
        })?;
        // the constants `[B, d…]` among the inputs, by port
        let pinned: Vec<(usize, Vec<usize>)> = inputs
            .iter()
            .enumerate()
            .filter_map(|(i, &o)| Some((i, self.graph.const_value(o)?.shape().to_vec())))
            .filter(|(_, shape)| shape.len() == rank && shape.first() == Some(&(b as usize)))
            .collect();
        for (i, shape) in pinned {
            let n = self
                .add_op(
                    &format!("{name}.batch_of_{i}"),
                    &format!("{name}/batch_of_{i}"),
                    Op::Shape { start: 0, end: Some(1) },
                    &[batched],
                )
                .ok()?;
            let rest = self.add_const(
                &format!("{name}.rest_of_{i}"),
                Tensor::i64_vec(shape[1..].iter().map(|&d| d as i64).collect()),
            );
            let target = self
                .add_op(
                    &format!("{name}.shape_of_{i}"),
                    &format!("{name}/shape_of_{i}"),
                    Op::Concat { axis: 0 },
                    &[n, rest],
                )
                .ok()?;
            inputs[i] = self
                .add_op(
                    &format!("{name}.expanded_{i}"),
                    &format!("{name}/expand_{i}"),
                    Op::Expand,
                    &[inputs[i], target],
                )
                .ok()?;
        }
        Some(())
    }

    fn value(&self, name: &str) -> Result<Outlet> {
        if let Some(o) = self.values.get(name) {
            return Ok(*o);
        }
        match self.unsupported_outputs.get(name) {
            Some(what) => Err(Error::Other(format!(
                "uses '{name}', the {what}, which inference does not compute"
            ))),
            None => Err(Error::Other(format!(
                "input '{name}' is not produced by any earlier node"
            ))),
        }
    }

    /// Input `i` of the node if present and non-empty.
    fn opt_input(&self, node: &NodeProto, i: usize) -> Result<Option<Outlet>> {
        match node.input.get(i) {
            Some(n) if !n.is_empty() => Ok(Some(self.value(n)?)),
            _ => Ok(None),
        }
    }

    /// The constant value of input `i` (must be produced by a constant or a foldable sub-graph).
    fn const_input(&self, node: &NodeProto, i: usize, what: &str) -> Result<Option<Arc<Tensor>>> {
        match self.opt_input(node, i)? {
            None => Ok(None),
            Some(o) => match self.graph.const_value(o) {
                Some(t) => Ok(Some(t.clone())),
                None => Err(Error::Other(format!("{what} (input {i}) must be a constant"))),
            },
        }
    }

    fn fact(&self, o: Outlet) -> &Fact {
        self.graph.fact(o).expect("facts are inferred eagerly during import")
    }

    /// The `activation_max` attribute of a channels-last op (a fused `Clip(0, max)`): absent, or
    /// on an `NhwcConv` of an opset-6 file, a positive finite float with `activation` "Relu".
    fn activation_max(&self, a: &Attrs, op: &str) -> Result<Option<f32>> {
        if !a.has("activation_max") {
            return Ok(None);
        }
        if op != "NhwcConv" {
            return Err(Error::Other(format!(
                "attribute 'activation_max' is for NhwcConv, not {op}"
            )));
        }
        if self.tabconv_opset < 6 {
            return Err(Error::Other(format!(
                "attribute 'activation_max' needs {TABCONV_DOMAIN} opset 6, the file declares {}",
                self.tabconv_opset
            )));
        }
        let max = a.float("activation_max", f32::NAN);
        if !(max.is_finite() && max > 0.0 && relu_attr(a)?) {
            return Err(Error::Other(format!(
                "activation_max must be a positive finite float with activation 'Relu', got {max}"
            )));
        }
        Ok(Some(max))
    }

    /// `ai.tabconv` opset 2's channels-last `NhwcConv` / `NhwcMaxPool` / `NhwcAveragePool`: the
    /// standard op's attributes (kernel_shape required), plus `activation` ("Relu") on NhwcConv.
    fn nhwc_op(&self, node: &NodeProto, a: &Attrs) -> Result<Op> {
        if self.tabconv_opset < 2 {
            return Err(Error::Other(format!(
                "{} needs {TABCONV_DOMAIN} opset 2, the file declares {}",
                node.op_type, self.tabconv_opset
            )));
        }
        let kernel = a.pair("kernel_shape", 0)?;
        if kernel[0] == 0 {
            return Err(Error::Other("missing or non-2-D kernel_shape".into()));
        }
        let win = window(a, kernel)?;
        let relu_max = self.activation_max(a, &node.op_type)?;
        Ok(match node.op_type.as_str() {
            "NhwcConv" => Op::Conv(Conv {
                window: win,
                group: a.int("group", 1).max(1) as usize,
                nhwc: true,
                relu: relu_attr(a)?,
                relu_max,
            }),
            pool => Op::Pool(Pool {
                kind: match pool {
                    "NhwcMaxPool" => PoolKind::Max,
                    _ => PoolKind::Avg {
                        count_include_pad: a.int("count_include_pad", 0) != 0,
                    },
                },
                window: win,
                nhwc: true,
            }),
        })
    }

    /// Input 0 of the node, which every op tabconv imports needs.
    fn input0(&self, node: &NodeProto) -> Result<Outlet> {
        match node.input.first() {
            Some(n) if !n.is_empty() => self.value(n),
            _ => Err(Error::Other("has no input".into())),
        }
    }

    fn import_node(&mut self, node: &NodeProto, name: &str) -> Result<()> {
        if node.output.first().is_none_or(|o| o.is_empty()) {
            return Err(Error::Other("has no output".into()));
        }
        let a = Attrs::new(node);
        let res = if node.domain == TABCONV_DOMAIN {
            self.import_tabconv_node(node, name, &a)
        } else {
            self.import_onnx_node(node, name, &a)
        };
        // an attribute of the wrong type is the first thing to report
        a.type_errors()?;
        res
    }

    fn import_tabconv_node(&mut self, node: &NodeProto, name: &str, a: &Attrs) -> Result<()> {
        let op = match node.op_type.as_str() {
            "Im2Col" => {
                let kernel = a.pair("kernel_shape", 0)?;
                if kernel[0] == 0 {
                    return Err(Error::Other("missing or non-2-D kernel_shape".into()));
                }
                Op::Im2Col(window(a, kernel)?)
            }
            "PQEncode" => {
                let subspace = a.req_int("subspace")?;
                if subspace < 1 {
                    return Err(Error::Other(format!("subspace must be positive, got {subspace}")));
                }
                let encoder = match a.string("encoder").as_deref() {
                    Some("argmin") => Encoder::Argmin,
                    Some("tree") => Encoder::Tree,
                    other => {
                        return Err(Error::Other(format!(
                            "encoder must be 'argmin' or 'tree', got {other:?}"
                        )))
                    }
                };
                let window = match a.has("kernel_shape") {
                    true => Some(window(a, a.pair("kernel_shape", 1)?)?),
                    false => None,
                };
                if a.has("layout") && self.tabconv_opset < 2 {
                    return Err(Error::Other(format!(
                        "attribute 'layout' needs {TABCONV_DOMAIN} opset 2, the file declares {}",
                        self.tabconv_opset
                    )));
                }
                let nhwc = match a.string("layout").as_deref() {
                    None | Some("NCHW") => false,
                    Some("NHWC") if window.is_some() => true,
                    other => {
                        return Err(Error::Other(format!(
                            "layout must be 'NCHW' or 'NHWC' (with kernel_shape), got {other:?}"
                        )))
                    }
                };
                let act_scale = match a.has("act_scale") {
                    false => None,
                    true if self.tabconv_opset < 5 => {
                        return Err(Error::Other(format!(
                            "attribute 'act_scale' needs {TABCONV_DOMAIN} opset 5, the file declares {}",
                            self.tabconv_opset
                        )))
                    }
                    true => {
                        let v = a.float("act_scale", 0.0);
                        if encoder != Encoder::Argmin || !valid_act_scale(v) || subspace > 64 {
                            return Err(Error::Other(format!(
                                "act_scale must be a positive finite float (normal, with a finite inverse) on an argmin encoder of subspace ≤ 64, got {v} ({encoder:?}, subspace {subspace})"
                            )));
                        }
                        Some(v)
                    }
                };
                let pixel = match a.has("pixel") {
                    false => false,
                    true if self.tabconv_opset < 7 => {
                        return Err(Error::Other(format!(
                            "attribute 'pixel' needs {TABCONV_DOMAIN} opset 7, the file declares {}",
                            self.tabconv_opset
                        )))
                    }
                    true => match a.int("pixel", 0) {
                        0 => false,
                        1 if window.is_some() => true,
                        v => {
                            return Err(Error::Other(format!(
                                "pixel must be 0 or 1, and 1 only with kernel_shape, got {v}"
                            )))
                        }
                    },
                };
                if encoder == Encoder::Argmin && node.input.len() > 2 && self.tabconv_opset < 8 {
                    return Err(Error::Other(format!(
                        "an argmin encoder's norms (a third input) need {TABCONV_DOMAIN} opset 8, the file declares {}",
                        self.tabconv_opset
                    )));
                }
                Op::PqEncode(PqEncode {
                    subspace: subspace as usize,
                    encoder,
                    window,
                    nhwc,
                    act_scale,
                    pixel,
                })
            }
            "LutMatMul" => {
                let fused = a.has("activation") || node.input.len() > 4;
                if fused && self.tabconv_opset < 3 {
                    return Err(Error::Other(format!(
                        "a fused LutMatMul epilogue needs {TABCONV_DOMAIN} opset 3, the file declares {}",
                        self.tabconv_opset
                    )));
                }
                Op::LutMatMul { relu: relu_attr(a)? }
            }
            "NhwcConv" | "NhwcMaxPool" | "NhwcAveragePool" => self.nhwc_op(node, a)?,
            "Gelu" => {
                if self.tabconv_opset < 4 {
                    return Err(Error::Other(format!(
                        "Gelu needs {TABCONV_DOMAIN} opset 4, the file declares {}",
                        self.tabconv_opset
                    )));
                }
                if node.input.len() != 1 {
                    return Err(Error::Other(format!("expects 1 input, got {}", node.input.len())));
                }
                Op::Unary(gelu(a)?)
            }
            other => return Err(Error::Other(format!("unknown {TABCONV_DOMAIN} operator {other}"))),
        };
        let inputs = all_inputs(self, node)?;
        let out = node.output.first().cloned().unwrap_or_else(|| name.to_string());
        self.add_op(&out, name, op, &inputs).map(|_| ())
    }

    /// A default-domain node: Constant, Identity/Dropout, Conv, pooling, BatchNormalization, the
    /// activations and the arithmetic ops here; the rest in [`Importer::import_shape_node`] and
    /// [`Importer::import_data_node`].
    fn import_onnx_node(&mut self, node: &NodeProto, name: &str, a: &Attrs) -> Result<()> {
        let opset = self.opset;
        let mut inputs: Vec<Outlet> = Vec::new();
        // By default every present input is wired; ops with attribute-ised inputs truncate.
        let all_inputs = |s: &Self| all_inputs(s, node);
        let op = match node.op_type.as_str() {
            "Constant" => {
                let t = constant_attr(a, &mut self.reader)?;
                let out = node.output.first().cloned().unwrap_or_else(|| name.to_string());
                self.add_const(&out, t);
                return Ok(());
            }
            "Identity" | "Dropout" => {
                if node.op_type == "Dropout" {
                    if let Some(t) = self.const_input(node, 2, "training_mode")? {
                        if t.to_i64_vec()?.first() == Some(&1) {
                            return Err(Error::Other("training_mode=true is not supported for inference".into()));
                        }
                    }
                }
                let src = self.input0(node)?;
                if let Some(o) = node.output.first() {
                    self.values.insert(o.clone(), src);
                }
                if let Some(m) = node.output.get(1) {
                    self.unsupported_outputs.insert(m.clone(), "Dropout mask".into());
                }
                return Ok(());
            }
            "Conv" => {
                inputs = all_inputs(self)?;
                let w = self.fact(
                    inputs
                        .get(1)
                        .copied()
                        .ok_or_else(|| Error::Other("missing weight".into()))?,
                );
                if w.rank() != 4 {
                    return Err(Error::Other(format!(
                        "only 2-D convolution is supported (weight {})",
                        w.shape_string()
                    )));
                }
                let kernel = match a.ints("kernel_shape") {
                    Some(_) => a.pair("kernel_shape", 1)?,
                    None => {
                        let k = w
                            .concrete_shape()
                            .ok_or_else(|| Error::Other("weight shape unknown".into()))?;
                        [k[2], k[3]]
                    }
                };
                Op::Conv(Conv::nchw(window(a, kernel)?, a.int("group", 1).max(1) as usize))
            }
            "MaxPool" | "AveragePool" => {
                inputs = all_inputs(self)?;
                if node.output.len() > 1 {
                    self.unsupported_outputs
                        .insert(node.output[1].clone(), "MaxPool indices".into());
                }
                let kernel = a.pair("kernel_shape", 0)?;
                if kernel[0] == 0 {
                    return Err(Error::Other("missing or non-2-D kernel_shape".into()));
                }
                let kind = if node.op_type == "MaxPool" {
                    PoolKind::Max
                } else {
                    PoolKind::Avg {
                        count_include_pad: a.int("count_include_pad", 0) != 0,
                    }
                };
                Op::Pool(Pool {
                    kind,
                    window: window(a, kernel)?,
                    nhwc: false,
                })
            }
            "GlobalAveragePool" | "GlobalMaxPool" => {
                inputs = all_inputs(self)?;
                Op::GlobalPool {
                    max: node.op_type == "GlobalMaxPool",
                }
            }
            "BatchNormalization" => {
                inputs = all_inputs(self)?;
                inputs.truncate(5);
                if a.int("spatial", 1) == 0 {
                    return Err(Error::Other(
                        "spatial=0 (per-activation statistics) is not supported".into(),
                    ));
                }
                if a.int("training_mode", 0) != 0 {
                    return Err(Error::Other("training_mode=1 is not supported for inference".into()));
                }
                for (i, what) in node.output.iter().enumerate().skip(1) {
                    self.unsupported_outputs
                        .insert(what.clone(), format!("BatchNormalization training output {i}"));
                }
                Op::BatchNorm {
                    epsilon: a.float("epsilon", 1e-5),
                }
            }
            "Relu" => self.unary(node, &mut inputs, Unary::Relu)?,
            "Sigmoid" => self.unary(node, &mut inputs, Unary::Sigmoid)?,
            "Tanh" => self.unary(node, &mut inputs, Unary::Tanh)?,
            "HardSwish" => self.unary(node, &mut inputs, Unary::HardSwish)?,
            "LeakyRelu" => self.unary(
                node,
                &mut inputs,
                Unary::LeakyRelu {
                    alpha: a.float("alpha", 0.01),
                },
            )?,
            "HardSigmoid" => self.unary(
                node,
                &mut inputs,
                Unary::HardSigmoid {
                    alpha: a.float("alpha", 0.2),
                    beta: a.float("beta", 0.5),
                },
            )?,
            "Clip" => {
                let (min, max) = if opset < 11 {
                    (a.float("min", f32::NEG_INFINITY), a.float("max", f32::INFINITY))
                } else {
                    (
                        scalar_or(self.const_input(node, 1, "min")?, "min", f32::NEG_INFINITY)?,
                        scalar_or(self.const_input(node, 2, "max")?, "max", f32::INFINITY)?,
                    )
                };
                self.unary(node, &mut inputs, Unary::Clip { min, max })?
            }
            "Add" | "Sub" | "Mul" | "Div" => {
                inputs = all_inputs(self)?;
                if opset < 7 && a.int("broadcast", 0) != 0 && a.has("axis") {
                    return Err(Error::Other(
                        "legacy broadcast with 'axis' (opset < 7) is not supported".into(),
                    ));
                }
                Op::Binary(match node.op_type.as_str() {
                    "Add" => Binary::Add,
                    "Sub" => Binary::Sub,
                    "Mul" => Binary::Mul,
                    _ => Binary::Div,
                })
            }
            "Sum" => {
                inputs = all_inputs(self)?;
                Op::Sum
            }
            _ => return self.import_shape_node(node, name, a),
        };
        let out = node.output.first().cloned().unwrap_or_else(|| name.to_string());
        self.add_op(&out, name, op, &inputs).map(|_| ())
    }

    /// LRN, Concat and the reshaping, matrix and reduction ops (see [`Importer::import_onnx_node`]).
    fn import_shape_node(&mut self, node: &NodeProto, name: &str, a: &Attrs) -> Result<()> {
        let opset = self.opset;
        let mut inputs: Vec<Outlet>;
        let all_inputs = |s: &Self| all_inputs(s, node);
        let op = match node.op_type.as_str() {
            "LRN" => {
                inputs = all_inputs(self)?;
                let size = a.req_int("size")?;
                if size < 1 {
                    return Err(Error::Other(format!("size must be at least 1, got {size}")));
                }
                Op::Lrn {
                    size: size as usize,
                    alpha: a.float("alpha", 1e-4),
                    beta: a.float("beta", 0.75),
                    bias: a.float("bias", 1.0),
                }
            }
            "Concat" => {
                inputs = all_inputs(self)?;
                Op::Concat {
                    axis: a.req_int("axis")?,
                }
            }
            "Flatten" => {
                inputs = all_inputs(self)?;
                Op::Flatten { axis: a.int("axis", 1) }
            }
            "Reshape" => {
                inputs = all_inputs(self)?;
                if opset < 5 || a.has("shape") {
                    let s = a.ints("shape").ok_or_else(|| Error::Other("missing 'shape'".into()))?;
                    let o = self.add_const(&format!("{name}.shape"), Tensor::i64_vec(s));
                    inputs.truncate(1);
                    inputs.push(o);
                }
                Op::Reshape {
                    allowzero: a.int("allowzero", 0) != 0,
                }
            }
            "Transpose" => {
                inputs = all_inputs(self)?;
                let perm = a.ints("perm").map(|p| p.into_iter().map(|x| x as usize).collect());
                Op::Transpose { perm }
            }
            "Squeeze" | "Unsqueeze" => {
                inputs = vec![self.input0(node)?];
                let axes = if opset < 13 {
                    a.ints("axes")
                } else {
                    self.const_input(node, 1, "axes")?.map(|t| t.to_i64_vec()).transpose()?
                };
                if node.op_type == "Squeeze" {
                    Op::Squeeze { axes }
                } else {
                    Op::Unsqueeze {
                        axes: axes.ok_or_else(|| Error::Other("Unsqueeze needs axes".into()))?,
                    }
                }
            }
            "Gemm" => {
                inputs = all_inputs(self)?;
                Op::Gemm(Gemm {
                    alpha: a.float("alpha", 1.0),
                    beta: a.float("beta", 1.0),
                    trans_a: a.int("transA", 0) != 0,
                    trans_b: a.int("transB", 0) != 0,
                })
            }
            "MatMul" => {
                inputs = all_inputs(self)?;
                Op::MatMul
            }
            "Softmax" | "LogSoftmax" => {
                inputs = all_inputs(self)?;
                let log = node.op_type == "LogSoftmax";
                let x = *inputs.first().ok_or_else(|| Error::Other("has no input".into()))?;
                let rank = self.fact(x).rank() as i64;
                let axis = a.int("axis", if opset < 13 { 1 } else { -1 });
                let axis = if axis < 0 { axis + rank } else { axis };
                if opset < 13 && axis != rank - 1 {
                    // Before opset 13 Softmax normalises over all axes from `axis` on: express
                    // it with standard ops so the IR has one Softmax semantics.
                    let out = node.output.first().cloned().unwrap_or_else(|| name.to_string());
                    let flat = self.add_op(
                        &format!("{out}.flat"),
                        &format!("{name}/flatten"),
                        Op::Flatten { axis },
                        &[x],
                    )?;
                    let sm = self.add_op(
                        &format!("{out}.sm"),
                        &format!("{name}/softmax"),
                        Op::Softmax { axis: -1, log },
                        &[flat],
                    )?;
                    let shape = self.add_op(
                        &format!("{out}.shape"),
                        &format!("{name}/shape"),
                        Op::Shape { start: 0, end: None },
                        &[x],
                    )?;
                    self.add_op(&out, name, Op::Reshape { allowzero: false }, &[sm, shape])?;
                    return Ok(());
                }
                Op::Softmax { axis, log }
            }
            "Slice" => {
                inputs = vec![self.input0(node)?];
                let ints = |s: &Self, i: usize, what: &str| -> Result<Option<Vec<i64>>> {
                    s.const_input(node, i, what)?.map(|t| t.to_i64_vec()).transpose()
                };
                let (starts, ends, axes, steps) = if opset < 10 {
                    (
                        a.ints("starts").unwrap_or_default(),
                        a.ints("ends").unwrap_or_default(),
                        a.ints("axes"),
                        None,
                    )
                } else {
                    (
                        ints(self, 1, "starts")?.ok_or_else(|| Error::Other("missing starts".into()))?,
                        ints(self, 2, "ends")?.ok_or_else(|| Error::Other("missing ends".into()))?,
                        ints(self, 3, "axes")?,
                        ints(self, 4, "steps")?,
                    )
                };
                let n = starts.len();
                let axes = axes.unwrap_or_else(|| (0..n as i64).collect());
                let steps = steps.unwrap_or_else(|| vec![1; n]);
                if ends.len() != n || axes.len() != n || steps.len() != n {
                    return Err(Error::Other("starts, ends, axes and steps differ in length".into()));
                }
                Op::Slice {
                    starts,
                    ends,
                    axes,
                    steps,
                }
            }
            "ReduceMean" => {
                inputs = vec![self.input0(node)?];
                let mut axes = if opset < 18 {
                    a.ints("axes")
                } else {
                    self.const_input(node, 1, "axes")?.map(|t| t.to_i64_vec()).transpose()?
                };
                if axes.as_ref().is_some_and(|v| v.is_empty()) {
                    axes = None;
                }
                if axes.is_none() && a.int("noop_with_empty_axes", 0) != 0 {
                    self.values.insert(node.output[0].clone(), inputs[0]);
                    return Ok(());
                }
                Op::ReduceMean {
                    axes,
                    keepdims: a.int("keepdims", 1) != 0,
                }
            }
            _ => return self.import_data_node(node, name, a),
        };
        let out = node.output.first().cloned().unwrap_or_else(|| name.to_string());
        self.add_op(&out, name, op, &inputs).map(|_| ())
    }

    /// Pad, Split and the shape, index and cast ops (see [`Importer::import_onnx_node`]).
    fn import_data_node(&mut self, node: &NodeProto, name: &str, a: &Attrs) -> Result<()> {
        let opset = self.opset;
        let inputs: Vec<Outlet>;
        let all_inputs = |s: &Self| all_inputs(s, node);
        let op = match node.op_type.as_str() {
            "Pad" => {
                inputs = vec![self.input0(node)?];
                let mode = a.string("mode").unwrap_or_else(|| "constant".into());
                if mode != "constant" {
                    return Err(Error::Other(format!(
                        "Pad mode '{mode}' is not supported (only 'constant')"
                    )));
                }
                let rank = self.fact(inputs[0]).rank();
                let (mut pads, value) = if opset < 11 {
                    (
                        a.ints("pads").or_else(|| a.ints("paddings")).unwrap_or_default(),
                        a.float("value", 0.0),
                    )
                } else {
                    let p = self
                        .const_input(node, 1, "pads")?
                        .ok_or_else(|| Error::Other("missing pads".into()))?
                        .to_i64_vec()?;
                    let v = scalar_or(self.const_input(node, 2, "constant_value")?, "constant_value", 0.0)?;
                    (p, v)
                };
                if let Some(axes) = self.const_input(node, 3, "axes")? {
                    pads = pads_for_axes(&pads, &axes.to_i64_vec()?, rank)?;
                }
                Op::Pad { pads, value }
            }
            "Split" => {
                inputs = vec![self.input0(node)?];
                let f = self.fact(inputs[0]).clone();
                let axis = a.int("axis", 0);
                let ax = if axis < 0 { axis + f.rank() as i64 } else { axis } as usize;
                let given = if opset < 13 {
                    a.ints("split")
                } else {
                    self.const_input(node, 1, "split")?
                        .map(|t| t.to_i64_vec())
                        .transpose()?
                };
                let sizes: Vec<usize> = match given {
                    Some(s) => s.into_iter().map(|v| v.max(0) as usize).collect(),
                    None => {
                        let n = node.output.len().max(1);
                        let d = f
                            .shape
                            .get(ax)
                            .and_then(|d| d.known())
                            .ok_or_else(|| Error::Other("the split axis must have a known size".into()))?
                            as usize;
                        if !d.is_multiple_of(n) {
                            return Err(Error::Other(format!(
                                "axis of size {d} does not split evenly into {n} outputs"
                            )));
                        }
                        vec![d / n; n]
                    }
                };
                if sizes.len() != node.output.len() {
                    return Err(Error::Other(format!(
                        "{} split sizes for {} outputs",
                        sizes.len(),
                        node.output.len()
                    )));
                }
                let out = self.add_op(&node.output[0], name, Op::Split { axis, sizes }, &inputs)?;
                for (i, o) in node.output.iter().enumerate().skip(1) {
                    self.graph.node_mut(out.node).outputs[i].name = o.clone();
                    self.values.insert(o.clone(), Outlet::new(out.node, i));
                }
                return Ok(());
            }
            "Shape" => {
                inputs = all_inputs(self)?;
                Op::Shape {
                    start: a.int("start", 0),
                    end: a.get("end").map(|x| x.i),
                }
            }
            "Gather" => {
                inputs = all_inputs(self)?;
                Op::Gather { axis: a.int("axis", 0) }
            }
            "Cast" => {
                inputs = all_inputs(self)?;
                Op::Cast {
                    to: onnx_dtype(a.req_int("to")? as i32)?,
                }
            }
            "ConstantOfShape" => {
                inputs = all_inputs(self)?;
                let value = match a.get("value").and_then(|v| v.t.as_ref()) {
                    Some(t) => first_as_scalar(&self.reader.read(t)?),
                    None => Tensor::scalar_f32(0.0),
                };
                Op::ConstantOfShape { value: Arc::new(value) }
            }
            _ => return self.import_transformer_node(node, name, a),
        };
        let out = node.output.first().cloned().unwrap_or_else(|| name.to_string());
        self.add_op(&out, name, op, &inputs).map(|_| ())
    }

    /// The operators transformer encoders add: Erf, Gelu, Sqrt, Exp, Neg, Pow, Equal, Where,
    /// Expand, LayerNormalization (see [`Importer::import_onnx_node`]).
    fn import_transformer_node(&mut self, node: &NodeProto, name: &str, a: &Attrs) -> Result<()> {
        let mut inputs: Vec<Outlet> = Vec::new();
        let all_inputs = |s: &Self| all_inputs(s, node);
        let op = match node.op_type.as_str() {
            "Erf" => self.unary(node, &mut inputs, Unary::Erf)?,
            "Sqrt" => self.unary(node, &mut inputs, Unary::Sqrt)?,
            "Exp" => self.unary(node, &mut inputs, Unary::Exp)?,
            "Neg" => self.unary(node, &mut inputs, Unary::Neg)?,
            "Gelu" => self.unary(node, &mut inputs, gelu(a)?)?,
            "Pow" => {
                inputs = all_inputs(self)?;
                if inputs.len() != 2 {
                    return Err(Error::Other(format!("expects 2 inputs, got {}", inputs.len())));
                }
                // an integer exponent of a float base (allowed since opset 12) becomes f32
                let (base, exp) = (self.fact(inputs[0]).dtype, self.fact(inputs[1]).dtype);
                if base == DType::F32 && exp != DType::F32 {
                    inputs[1] = self.add_op(
                        &format!("{name}.exponent"),
                        &format!("{name}/exponent"),
                        Op::Cast { to: DType::F32 },
                        &[inputs[1]],
                    )?;
                }
                Op::Binary(Binary::Pow)
            }
            "Equal" => {
                inputs = all_inputs(self)?;
                Op::Equal
            }
            "Where" => {
                inputs = all_inputs(self)?;
                Op::Where
            }
            "Expand" => {
                inputs = all_inputs(self)?;
                Op::Expand
            }
            "LayerNormalization" => {
                inputs = all_inputs(self)?;
                inputs.truncate(3);
                if a.int("stash_type", 1) != 1 {
                    return Err(Error::Other("stash_type other than 1 (float) is not supported".into()));
                }
                for (i, what) in node.output.iter().enumerate().skip(1) {
                    let which = if i == 1 { "Mean" } else { "InvStdDev" };
                    self.unsupported_outputs
                        .insert(what.clone(), format!("LayerNormalization {which} output"));
                }
                Op::LayerNorm {
                    axis: a.int("axis", -1),
                    epsilon: a.float("epsilon", 1e-5),
                }
            }
            other => return Err(Error::Other(format!("operator {other} is not supported"))),
        };
        let out = node.output.first().cloned().unwrap_or_else(|| name.to_string());
        self.add_op(&out, name, op, &inputs).map(|_| ())
    }

    fn unary(&self, node: &NodeProto, inputs: &mut Vec<Outlet>, u: Unary) -> Result<Op> {
        *inputs = vec![self.input0(node)?];
        Ok(Op::Unary(u))
    }

    /// Add the node, infer its output fact, and fold it into a constant when possible.
    fn add_op(&mut self, out_name: &str, name: &str, op: Op, inputs: &[Outlet]) -> Result<Outlet> {
        let mut inputs = inputs.to_vec();
        if let Some(target) = self.unpin_batch(&op, &inputs) {
            inputs[1] = target;
        }
        self.unpin_concat(name, &op, &mut inputs);
        let inputs = &inputs[..];
        let facts: Vec<Fact> = inputs.iter().map(|o| self.fact(*o).clone()).collect();
        let out_facts = infer_op(&op, &facts)?;
        let out_name = out_name.to_string();
        let all_const = inputs.iter().all(|o| self.graph.const_value(*o).is_some());
        let static_shape = matches!(op, Op::Shape { .. }) && facts[0].concrete_shape().is_some();
        if static_shape {
            let v = out_facts[0].value.as_ref().expect("Shape infers its value");
            let t = Tensor::i64_vec(v.iter().map(|d| d.known().expect("concrete")).collect());
            return Ok(self.add_const(&out_name, t));
        }
        if all_const && !inputs.is_empty() && op.num_outputs() == 1 {
            let args: Vec<Arc<Tensor>> = inputs
                .iter()
                .map(|o| self.graph.const_value(*o).unwrap().clone())
                .collect();
            let t = eval_op(&op, args)?.remove(0);
            return Ok(self.add_const(&out_name, t));
        }
        let unique = self.unique(name);
        let n = self.graph.add_node(&unique, op, inputs);
        for (v, f) in self.graph.node_mut(n).outputs.iter_mut().zip(out_facts) {
            v.fact = Some(f);
        }
        self.graph.node_mut(n).outputs[0].name = out_name.clone();
        self.values.insert(out_name, Outlet::new(n, 0));
        Ok(Outlet::new(n, 0))
    }
}

/// Every present input of the node, wired by port.
fn all_inputs(im: &Importer, node: &NodeProto) -> Result<Vec<Outlet>> {
    node.input
        .iter()
        .filter(|n| !n.is_empty())
        .map(|n| im.value(n))
        .collect()
}

/// The one value of a scalar constant input (Clip bounds, Pad's constant value), or `default`
/// when the input is absent.
fn scalar_or(t: Option<Arc<Tensor>>, what: &str, default: f32) -> Result<f32> {
    match t {
        None => Ok(default),
        Some(t) => match t.to_f32_vec().as_slice() {
            [v] => Ok(*v),
            v => Err(Error::Other(format!("{what} must hold one value, got {}", v.len()))),
        },
    }
}

/// Pad's `pads` for the listed `axes` (opset 18) spread over all `rank` axes.
fn pads_for_axes(pads: &[i64], axes: &[i64], rank: usize) -> Result<Vec<i64>> {
    if pads.len() != 2 * axes.len() {
        return Err(Error::Other(format!(
            "{} pads for {} axes (expected {})",
            pads.len(),
            axes.len(),
            2 * axes.len()
        )));
    }
    let mut full = vec![0i64; 2 * rank];
    for (j, &ax) in axes.iter().enumerate() {
        let a = crate::ir::infer::norm_axis(ax, rank)?;
        full[a] = pads[j];
        full[a + rank] = pads[j + axes.len()];
    }
    Ok(full)
}

/// The first element of `t` as a rank-0 tensor of `t`'s type (ConstantOfShape's value).
fn first_as_scalar(t: &Tensor) -> Tensor {
    use ndarray::{ArrayD, IxDyn};
    match t {
        Tensor::I64(a) => Tensor::I64(ArrayD::from_elem(IxDyn(&[]), a.iter().copied().next().unwrap_or(0))),
        Tensor::I32(a) => Tensor::I32(ArrayD::from_elem(IxDyn(&[]), a.iter().copied().next().unwrap_or(0))),
        other => Tensor::scalar_f32(other.to_f32_vec().first().copied().unwrap_or(0.0)),
    }
}

/// The `activation` attribute of `ai.tabconv` ops with a fused epilogue: absent or "Relu".
fn relu_attr(a: &Attrs) -> Result<bool> {
    match a.string("activation").as_deref() {
        None => Ok(false),
        Some("Relu") => Ok(true),
        Some(other) => Err(Error::Other(format!("activation must be 'Relu', got '{other}'"))),
    }
}

fn window(a: &Attrs, kernel: [usize; 2]) -> Result<Window> {
    let padding = match a.string("auto_pad").as_deref().unwrap_or("NOTSET") {
        "NOTSET" | "" => {
            let p = a.ints("pads").unwrap_or_else(|| vec![0; 4]);
            if p.len() != 4 || p.iter().any(|&x| x < 0) {
                return Err(Error::Other(format!(
                    "pads {p:?}: expected 4 non-negative values for a 2-D window"
                )));
            }
            Padding::Explicit([p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize])
        }
        "SAME_UPPER" => Padding::SameUpper,
        "SAME_LOWER" => Padding::SameLower,
        "VALID" => Padding::Valid,
        other => return Err(Error::Other(format!("unknown auto_pad '{other}'"))),
    };
    Ok(Window {
        kernel,
        strides: a.pair("strides", 1)?,
        dilations: a.pair("dilations", 1)?,
        padding,
        ceil_mode: a.int("ceil_mode", 0) != 0,
    })
}

fn onnx_dtype(code: i32) -> Result<DType> {
    Ok(match code {
        1 | 11 => DType::F32,
        7 => DType::I64,
        6 => DType::I32,
        2 => DType::U8,
        3 => DType::I8,
        9 => DType::Bool,
        other => return Err(Error::Other(format!("cast to data type {other} is not supported"))),
    })
}

fn constant_attr(a: &Attrs, reader: &mut TensorReader) -> Result<Tensor> {
    if let Some(t) = a.get("value").and_then(|v| v.t.as_ref()) {
        return reader.read(t);
    }
    if let Some(v) = a.get("value_float") {
        return Ok(Tensor::scalar_f32(v.f));
    }
    if let Some(v) = a.get("value_floats") {
        return Tensor::f32(&[v.floats.len()], v.floats.clone());
    }
    if let Some(v) = a.get("value_int") {
        return Ok(Tensor::I64(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), v.i)));
    }
    if let Some(v) = a.get("value_ints") {
        return Ok(Tensor::i64_vec(v.ints.clone()));
    }
    Err(Error::Other("Constant without a supported value attribute".into()))
}
