//! The closed set of operations tabconv understands. Opset quirks are resolved by the importer,
//! so each op has exactly one form here (e.g. Clip bounds and Squeeze axes are attributes).

use super::tensor::{DType, Tensor};
use std::sync::Arc;

/// Spatial padding of a 2-D window op. `Same*` and `Valid` are resolved against the input size
/// at shape-inference / run time, as ONNX `auto_pad` requires.
#[derive(Clone, Debug, PartialEq)]
pub enum Padding {
    /// `[top, left, bottom, right]`
    Explicit([usize; 4]),
    SameUpper,
    SameLower,
    Valid,
}

/// Geometry shared by Conv and the pooling ops (always 2-D: 1-D inputs are rejected at import).
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    pub padding: Padding,
    pub ceil_mode: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Conv {
    pub window: Window,
    pub group: usize,
    /// Channels-last input `[N, H, W, C]` and output `[N, oh, ow, M]` (weights stay
    /// `[M, C/group, kh, kw]`); set by the `channels-last` pass for group 1 and depthwise convs.
    pub nhwc: bool,
    /// ReLU fused into the output (only with `nhwc`).
    pub relu: bool,
    /// With `relu`: the output also capped at this value (a fused `Clip(0, max)`, e.g. ReLU6).
    pub relu_max: Option<f32>,
}

impl Conv {
    /// A standard (NCHW, unfused) convolution.
    pub fn nchw(window: Window, group: usize) -> Conv {
        Conv {
            window,
            group,
            nhwc: false,
            relu: false,
            relu_max: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum PoolKind {
    Max,
    Avg { count_include_pad: bool },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    pub kind: PoolKind,
    pub window: Window,
    /// Channels-last input and output (set by the `channels-last` pass).
    pub nhwc: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    Relu,
    LeakyRelu {
        alpha: f32,
    },
    Sigmoid,
    Tanh,
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    HardSwish,
    Clip {
        min: f32,
        max: f32,
    },
    /// Identity, and Dropout in inference.
    Identity,
    Erf,
    Sqrt,
    Exp,
    Neg,
    /// `x·Φ(x)`; `tanh`: the tanh approximation (ONNX `Gelu`, `approximate="tanh"`).
    Gelu {
        tanh: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    /// f32 only (`powf`).
    Pow,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Gemm {
    pub alpha: f32,
    pub beta: f32,
    pub trans_a: bool,
    pub trans_b: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input; its declared fact is the node's output fact.
    Input,
    Const(Arc<Tensor>),
    /// inputs: x, w, [bias]
    Conv(Conv),
    /// inputs: x, scale, bias, mean, var
    BatchNorm {
        epsilon: f32,
    },
    Unary(Unary),
    /// inputs: a, b (numpy broadcasting)
    Binary(Binary),
    /// n-ary elementwise sum with broadcasting
    Sum,
    Pool(Pool),
    GlobalPool {
        max: bool,
    },
    Lrn {
        size: usize,
        alpha: f32,
        beta: f32,
        bias: f32,
    },
    Concat {
        axis: i64,
    },
    Flatten {
        axis: i64,
    },
    /// inputs: data, shape (runtime i64 tensor, ONNX semantics for 0 and -1)
    Reshape {
        allowzero: bool,
    },
    Transpose {
        perm: Option<Vec<usize>>,
    },
    Squeeze {
        axes: Option<Vec<i64>>,
    },
    Unsqueeze {
        axes: Vec<i64>,
    },
    /// inputs: a, b, [c]
    Gemm(Gemm),
    MatMul,
    Softmax {
        axis: i64,
        log: bool,
    },
    /// Strided slice with per-axis `[start, end)` already clamped by ONNX rules at run time.
    Slice {
        starts: Vec<i64>,
        ends: Vec<i64>,
        axes: Vec<i64>,
        steps: Vec<i64>,
    },
    ReduceMean {
        axes: Option<Vec<i64>>,
        keepdims: bool,
    },
    /// Constant-mode pad: `pads` as ONNX `[x1_begin, x2_begin, …, x1_end, x2_end, …]`.
    Pad {
        pads: Vec<i64>,
        value: f32,
    },
    Shape {
        start: i64,
        end: Option<i64>,
    },
    /// inputs: data, indices
    Gather {
        axis: i64,
    },
    Cast {
        to: DType,
    },
    /// input: shape (i64)
    ConstantOfShape {
        value: Arc<Tensor>,
    },
    /// inputs: a, b (numpy broadcasting, same type) → bool
    Equal,
    /// inputs: condition (bool), x, y (numpy broadcasting of all three)
    Where,
    /// inputs: data, shape (runtime i64; bidirectional broadcasting as ONNX `Expand`)
    Expand,
    /// inputs: x, scale, [bias]: normalise over the axes from `axis` on (ONNX 17
    /// `LayerNormalization`, `stash_type` float; only the first output).
    LayerNorm {
        axis: i64,
        epsilon: f32,
    },
    /// `ai.tabconv.Im2Col`: `[N, C, H, W]` → `[N, oh·ow, C·kh·kw]`, one receptive field per row,
    /// row layout `(c, i, j)` so each input channel's `kh·kw` values are contiguous.
    Im2Col(Window),
    /// Split along `axis` into pieces of the given sizes (one output each).
    Split {
        axis: i64,
        sizes: Vec<usize>,
    },
    /// `ai.tabconv.PQEncode`: rows `[…, D]` → codes u8 `[…, C]`, `C = ⌈D / subspace⌉`.
    /// inputs: x, then prototypes f32 `[C, K, S]` (argmin) or split dims i64 `[C, depth]` and
    /// thresholds f32 `[C, K−1]` (tree).
    PqEncode(PqEncode),
    /// `ai.tabconv.LutMatMul`: codes `[…, C]`, tables `[C, M, K]` (i8 or f32), scale f32 `[M]`,
    /// offset f32 `[M]` → `y[…, m] = scale[m]·Σ_c T[c, m, code_c] + offset[m]`; with an
    /// optional input 4 (a residual of as many values as `y`, added in memory order) and `relu`,
    /// the epilogue `max(y + residual, 0)` is fused (the channels-last pass sets them).
    LutMatMul {
        relu: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoder {
    Argmin,
    Tree,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PqEncode {
    pub subspace: usize,
    pub encoder: Encoder,
    /// When set, the input is an NCHW batch and the rows are its implicit im2col rows for this
    /// window (`[N, oh·ow, C·kh·kw]`, as `Im2Col` would produce), so no im2col matrix is built.
    pub window: Option<Window>,
    /// With a window: the input is channels-last `[N, H, W, C]` instead of NCHW (same rows, same
    /// codes; set by the `layout` pass so LUT layers chain without transposes).
    pub nhwc: bool,
    /// Argmin only: the input scale of the int8 encoder (`encode_i8`), None for the f32 one.
    pub act_scale: Option<f32>,
    /// With a window: *pixel codebooks*. Each codebook covers `subspace` channels of one input
    /// pixel and serves every tap of the window: prototypes `[⌈C/subspace⌉, K, subspace]`, every
    /// input pixel encoded once, and the codes `[N, oh·ow, kh·kw·⌈C/subspace⌉]` gathered per
    /// output pixel in tap-major order `(i, j, codebook)`; a tap outside the image reads the codes
    /// of an all-zero pixel. Encoding costs `K·C` per input pixel instead of `K·C·kh·kw` per
    /// output pixel.
    pub pixel: bool,
}

impl Op {
    /// Name used in dumps, histograms and errors (ONNX op names where one exists).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input => "Input",
            Op::Const(_) => "Const",
            Op::Conv(_) => "Conv",
            Op::BatchNorm { .. } => "BatchNormalization",
            Op::Unary(u) => match u {
                Unary::Relu => "Relu",
                Unary::LeakyRelu { .. } => "LeakyRelu",
                Unary::Sigmoid => "Sigmoid",
                Unary::Tanh => "Tanh",
                Unary::HardSigmoid { .. } => "HardSigmoid",
                Unary::HardSwish => "HardSwish",
                Unary::Clip { .. } => "Clip",
                Unary::Identity => "Identity",
                Unary::Erf => "Erf",
                Unary::Sqrt => "Sqrt",
                Unary::Exp => "Exp",
                Unary::Neg => "Neg",
                Unary::Gelu { .. } => "Gelu",
            },
            Op::Binary(b) => match b {
                Binary::Add => "Add",
                Binary::Sub => "Sub",
                Binary::Mul => "Mul",
                Binary::Div => "Div",
                Binary::Pow => "Pow",
            },
            Op::Sum => "Sum",
            Op::Pool(p) => match p.kind {
                PoolKind::Max => "MaxPool",
                PoolKind::Avg { .. } => "AveragePool",
            },
            Op::GlobalPool { max: true } => "GlobalMaxPool",
            Op::GlobalPool { max: false } => "GlobalAveragePool",
            Op::Lrn { .. } => "LRN",
            Op::Concat { .. } => "Concat",
            Op::Flatten { .. } => "Flatten",
            Op::Reshape { .. } => "Reshape",
            Op::Transpose { .. } => "Transpose",
            Op::Squeeze { .. } => "Squeeze",
            Op::Unsqueeze { .. } => "Unsqueeze",
            Op::Gemm(_) => "Gemm",
            Op::MatMul => "MatMul",
            Op::Softmax { log: false, .. } => "Softmax",
            Op::Softmax { log: true, .. } => "LogSoftmax",
            Op::Slice { .. } => "Slice",
            Op::ReduceMean { .. } => "ReduceMean",
            Op::Pad { .. } => "Pad",
            Op::Shape { .. } => "Shape",
            Op::Gather { .. } => "Gather",
            Op::Cast { .. } => "Cast",
            Op::ConstantOfShape { .. } => "ConstantOfShape",
            Op::Equal => "Equal",
            Op::Where => "Where",
            Op::Expand => "Expand",
            Op::LayerNorm { .. } => "LayerNormalization",
            Op::Im2Col(_) => "Im2Col",
            Op::Split { .. } => "Split",
            Op::PqEncode(_) => "PQEncode",
            Op::LutMatMul { .. } => "LutMatMul",
        }
    }

    /// Attributes in a stable, readable form for the IR dump (never raw weights).
    pub fn attrs(&self) -> String {
        fn window(w: &Window) -> String {
            let pad = match &w.padding {
                Padding::Explicit(p) => format!("pads={p:?}"),
                other => format!("auto_pad={other:?}"),
            };
            let mut s = format!("kernel={:?} strides={:?} {pad}", w.kernel, w.strides);
            if w.dilations != [1, 1] {
                s += &format!(" dilations={:?}", w.dilations);
            }
            if w.ceil_mode {
                s += " ceil_mode";
            }
            s
        }
        match self {
            Op::Input | Op::Sum | Op::MatMul | Op::Binary(_) | Op::Equal | Op::Where | Op::Expand => String::new(),
            Op::LayerNorm { axis, epsilon } => format!("axis={axis} epsilon={epsilon:e}"),
            Op::Const(t) => t.summary(),
            Op::Im2Col(w) => window(w),
            Op::Split { axis, sizes } => format!("axis={axis} sizes={sizes:?}"),
            Op::PqEncode(p) => {
                let mut s = format!("subspace={} encoder={:?}", p.subspace, p.encoder).to_lowercase();
                if let Some(w) = &p.window {
                    s += &format!(" im2col {}", window(w));
                    if p.nhwc {
                        s += " layout=nhwc";
                    }
                }
                if let Some(a) = p.act_scale {
                    s += &format!(" int8 act_scale={a:e}");
                }
                if p.pixel {
                    s += " pixel";
                }
                s
            }
            Op::LutMatMul { relu } => {
                if *relu {
                    "relu".into()
                } else {
                    String::new()
                }
            }
            Op::Conv(c) => {
                let mut s = window(&c.window);
                if c.group != 1 {
                    s += &format!(" group={}", c.group);
                }
                if c.nhwc {
                    s += " layout=nhwc";
                }
                if c.relu {
                    s += " activation=relu";
                }
                if let Some(max) = c.relu_max {
                    s += &format!(" max={max}");
                }
                s
            }
            Op::BatchNorm { epsilon } => format!("epsilon={epsilon:e}"),
            Op::Unary(u) => match u {
                Unary::LeakyRelu { alpha } => format!("alpha={alpha}"),
                Unary::HardSigmoid { alpha, beta } => format!("alpha={alpha} beta={beta}"),
                Unary::Clip { min, max } => format!("min={min} max={max}"),
                Unary::Gelu { tanh: true } => "approximate=tanh".into(),
                _ => String::new(),
            },
            Op::Pool(p) => {
                let mut s = window(&p.window);
                if let PoolKind::Avg {
                    count_include_pad: true,
                } = p.kind
                {
                    s += " count_include_pad";
                }
                if p.nhwc {
                    s += " layout=nhwc";
                }
                s
            }
            Op::GlobalPool { .. } => String::new(),
            Op::Lrn {
                size,
                alpha,
                beta,
                bias,
            } => format!("size={size} alpha={alpha:e} beta={beta} bias={bias}"),
            Op::Concat { axis } => format!("axis={axis}"),
            Op::Flatten { axis } => format!("axis={axis}"),
            Op::Reshape { allowzero } => {
                if *allowzero {
                    "allowzero".into()
                } else {
                    String::new()
                }
            }
            Op::Transpose { perm: Some(p) } => format!("perm={p:?}"),
            Op::Transpose { perm: None } => "perm=reverse".into(),
            Op::Squeeze { axes } => format!("axes={axes:?}"),
            Op::Unsqueeze { axes } => format!("axes={axes:?}"),
            Op::Gemm(g) => format!(
                "alpha={} beta={} transA={} transB={}",
                g.alpha, g.beta, g.trans_a as u8, g.trans_b as u8
            ),
            Op::Slice {
                starts,
                ends,
                axes,
                steps,
            } => {
                format!("starts={starts:?} ends={ends:?} axes={axes:?} steps={steps:?}")
            }
            Op::Softmax { axis, .. } => format!("axis={axis}"),
            Op::ReduceMean { axes, keepdims } => {
                format!("axes={axes:?} keepdims={}", *keepdims as u8)
            }
            Op::Pad { pads, value } => format!("pads={pads:?} value={value}"),
            Op::Shape { start, end } => format!("start={start} end={end:?}"),
            Op::Gather { axis } => format!("axis={axis}"),
            Op::Cast { to } => format!("to={to}"),
            Op::ConstantOfShape { value } => format!("value={}", value.summary()),
        }
    }

    pub fn num_outputs(&self) -> usize {
        match self {
            Op::Split { sizes, .. } => sizes.len(),
            _ => 1,
        }
    }
}
