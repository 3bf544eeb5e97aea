//! Static knowledge about a value: dtype, shape with a symbolic batch, and (for small integer
//! tensors such as shapes) the symbolic contents, so Shape→Gather→Concat→Reshape chains can be
//! reasoned about even when the batch size is only known at run time.

use super::tensor::{DType, Tensor};
use std::fmt;

/// One dimension: a known size, or a multiple of the symbolic batch `N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dim {
    Known(i64),
    /// `k·N`
    Batch(i64),
}

impl Dim {
    pub fn known(self) -> Option<i64> {
        match self {
            Dim::Known(v) => Some(v),
            Dim::Batch(_) => None,
        }
    }
    /// Concrete value once the batch size is bound.
    pub fn bind(self, batch: usize) -> i64 {
        match self {
            Dim::Known(v) => v,
            Dim::Batch(k) => k * batch as i64,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(v) => write!(f, "{v}"),
            Dim::Batch(1) => write!(f, "N"),
            Dim::Batch(k) => write!(f, "{k}N"),
        }
    }
}

/// Product of dimensions as `(known factor, batch multiplicity)`: `known · N^batch_power`;
/// `None` when the known factor overflows.
pub fn dims_product(dims: &[Dim]) -> Option<(i64, u32)> {
    let mut known = 1i64;
    let mut power = 0u32;
    for d in dims {
        match d {
            Dim::Known(v) => known = known.checked_mul(*v)?,
            Dim::Batch(k) => {
                known = known.checked_mul(*k)?;
                power += 1;
            }
        }
    }
    Some((known, power))
}

#[derive(Clone, Debug, PartialEq)]
pub struct Fact {
    pub dtype: DType,
    pub shape: Vec<Dim>,
    /// Known contents of small integer tensors (rank ≤ 1), possibly symbolic.
    pub value: Option<Vec<Dim>>,
}

impl Fact {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> Fact {
        Fact {
            dtype,
            shape,
            value: None,
        }
    }
    pub fn known(dtype: DType, shape: &[usize]) -> Fact {
        Fact::new(dtype, shape.iter().map(|&d| Dim::Known(d as i64)).collect())
    }
    pub fn of_tensor(t: &Tensor) -> Fact {
        let mut f = Fact::known(t.dtype(), t.shape());
        if t.dtype() != DType::F32 && t.shape().len() <= 1 && t.len() <= 64 {
            if let Ok(v) = t.to_i64_vec() {
                f.value = Some(v.into_iter().map(Dim::Known).collect());
            }
        }
        f
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// The shape as plain numbers if nothing is symbolic.
    pub fn concrete_shape(&self) -> Option<Vec<usize>> {
        self.shape.iter().map(|d| d.known().map(|v| v as usize)).collect()
    }
    pub fn dim(&self, axis: usize) -> Dim {
        self.shape[axis]
    }
    pub fn shape_string(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!("{}[{}]", self.dtype, dims.join(","))
    }
}

impl fmt::Display for Fact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shape_string())
    }
}
