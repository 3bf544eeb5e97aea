//! Constant and runtime tensors: f32 for activations and weights, integer types for shapes
//! and indices, u8/i8 for the lookup-table codes and tables of later passes.

use crate::bail;
use crate::error::Result;
use ndarray::{ArrayD, IxDyn};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    I64,
    I32,
    U8,
    I8,
    Bool,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::U8 => "u8",
            DType::I8 => "i8",
            DType::Bool => "bool",
        }
    }
    pub fn size_of(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
            DType::U8 | DType::I8 | DType::Bool => 1,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn nonzero<T: PartialEq + Default>(v: T) -> bool {
    v != T::default()
}

#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    U8(ArrayD<u8>),
    I8(ArrayD<i8>),
    Bool(ArrayD<bool>),
}

macro_rules! dispatch {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            Tensor::F32($a) => $body,
            Tensor::I64($a) => $body,
            Tensor::I32($a) => $body,
            Tensor::U8($a) => $body,
            Tensor::I8($a) => $body,
            Tensor::Bool($a) => $body,
        }
    };
}
pub(crate) use dispatch;

impl Tensor {
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::I64(_) => DType::I64,
            Tensor::I32(_) => DType::I32,
            Tensor::U8(_) => DType::U8,
            Tensor::I8(_) => DType::I8,
            Tensor::Bool(_) => DType::Bool,
        }
    }
    pub fn shape(&self) -> &[usize] {
        dispatch!(self, a => a.shape())
    }
    pub fn len(&self) -> usize {
        dispatch!(self, a => a.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn byte_len(&self) -> usize {
        self.len() * self.dtype().size_of()
    }

    pub fn f32(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        match ArrayD::from_shape_vec(IxDyn(shape), data) {
            Ok(a) => Ok(Tensor::F32(a)),
            Err(e) => bail!("tensor data does not fit shape {shape:?}: {e}"),
        }
    }
    pub fn i64_vec(data: Vec<i64>) -> Tensor {
        let n = data.len();
        Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[n]), data).expect("1-D shape always fits"))
    }
    pub fn scalar_f32(v: f32) -> Tensor {
        Tensor::F32(ArrayD::from_elem(IxDyn(&[]), v))
    }

    pub fn as_f32(&self) -> Result<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Ok(a),
            t => bail!("expected an f32 tensor, got {}", t.dtype()),
        }
    }
    pub fn into_f32(self) -> Result<ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Ok(a),
            t => bail!("expected an f32 tensor, got {}", t.dtype()),
        }
    }

    /// Integer (or bool) contents as i64, in logical order: how shape and index tensors are read.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        Ok(match self {
            Tensor::I64(a) => a.iter().copied().collect(),
            Tensor::I32(a) => a.iter().map(|&v| v as i64).collect(),
            Tensor::U8(a) => a.iter().map(|&v| v as i64).collect(),
            Tensor::I8(a) => a.iter().map(|&v| v as i64).collect(),
            Tensor::Bool(a) => a.iter().map(|&v| v as i64).collect(),
            Tensor::F32(_) => bail!("expected an integer tensor, got f32"),
        })
    }

    /// Contents as f32 (for scalar parameters given as tensors, e.g. Clip min/max, Pad value).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            Tensor::F32(a) => a.iter().copied().collect(),
            Tensor::I64(a) => a.iter().map(|&v| v as f32).collect(),
            Tensor::I32(a) => a.iter().map(|&v| v as f32).collect(),
            Tensor::U8(a) => a.iter().map(|&v| v as f32).collect(),
            Tensor::I8(a) => a.iter().map(|&v| v as f32).collect(),
            Tensor::Bool(a) => a.iter().map(|&v| v as u8 as f32).collect(),
        }
    }

    /// ONNX Cast semantics for the types we carry, element by element with no detour through a
    /// wider float (int64 above 2^53 keeps its value): float → int truncates toward zero
    /// (saturating), int → narrower int wraps (two's complement, as ONNX Runtime's
    /// `static_cast`), anything → bool is `≠ 0`.
    #[allow(clippy::unnecessary_cast)]
    pub fn cast(&self, to: DType) -> Tensor {
        if self.dtype() == to {
            return self.clone();
        }
        macro_rules! cast_array {
            ($a:expr) => {
                match to {
                    DType::F32 => Tensor::F32($a.mapv(|v| v as f32)),
                    DType::I64 => Tensor::I64($a.mapv(|v| v as i64)),
                    DType::I32 => Tensor::I32($a.mapv(|v| v as i32)),
                    DType::U8 => Tensor::U8($a.mapv(|v| v as u8)),
                    DType::I8 => Tensor::I8($a.mapv(|v| v as i8)),
                    DType::Bool => Tensor::Bool($a.mapv(nonzero)),
                }
            };
        }
        match self {
            Tensor::F32(a) => cast_array!(a),
            Tensor::I64(a) => cast_array!(a),
            Tensor::I32(a) => cast_array!(a),
            Tensor::U8(a) => cast_array!(a),
            Tensor::I8(a) => cast_array!(a),
            Tensor::Bool(a) => cast_array!(a.mapv(u8::from)),
        }
    }

    /// Raw little-endian bytes in standard (C) order.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.byte_len());
        match self {
            Tensor::F32(a) => a.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Tensor::I64(a) => a.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Tensor::I32(a) => a.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Tensor::U8(a) => out.extend(a.iter()),
            Tensor::I8(a) => a.iter().for_each(|v| out.push(*v as u8)),
            Tensor::Bool(a) => a.iter().for_each(|v| out.push(*v as u8)),
        }
        out
    }

    /// A short content hash (FNV-1a 64 over dtype, shape and bytes) used by the IR dump so that
    /// snapshots change when a tensor's contents change without printing raw weights.
    pub fn short_hash(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |b: u8| {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        };
        for b in self.dtype().name().bytes() {
            eat(b);
        }
        for d in self.shape() {
            for b in (*d as u64).to_le_bytes() {
                eat(b);
            }
        }
        for b in self.to_le_bytes() {
            eat(b);
        }
        format!("{:08x}", (h >> 32) as u32 ^ h as u32)
    }

    /// `f32[16,1,5,5] #1a2b3c4d` or, for tiny integer tensors, their values.
    pub fn summary(&self) -> String {
        let shape = self.shape().iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
        if self.dtype() != DType::F32 && self.len() <= 8 {
            if let Ok(v) = self.to_i64_vec() {
                return format!("{}[{}] {:?}", self.dtype(), shape, v);
            }
        }
        if self.dtype() == DType::F32 && self.len() == 1 {
            return format!("f32[{}] {:?}", shape, self.to_f32_vec()[0]);
        }
        format!("{}[{}] #{}", self.dtype(), shape, self.short_hash())
    }
}
