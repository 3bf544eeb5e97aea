//! Typed access to a NodeProto's attributes with defaults and clear errors.

use crate::error::{Error, Result};
use tract_onnx::pb::{AttributeProto, NodeProto};

pub struct Attrs<'a> {
    node: &'a NodeProto,
}

impl<'a> Attrs<'a> {
    pub fn new(node: &'a NodeProto) -> Attrs<'a> {
        Attrs { node }
    }
    pub fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == name)
    }
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
    pub fn int(&self, name: &str, default: i64) -> i64 {
        self.get(name).map(|a| a.i).unwrap_or(default)
    }
    pub fn float(&self, name: &str, default: f32) -> f32 {
        self.get(name).map(|a| a.f).unwrap_or(default)
    }
    pub fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.get(name).map(|a| a.ints.clone())
    }
    pub fn string(&self, name: &str) -> Option<String> {
        self.get(name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
    pub fn req_int(&self, name: &str) -> Result<i64> {
        self.get(name)
            .map(|a| a.i)
            .ok_or_else(|| Error::Other(format!("missing required attribute '{name}'")))
    }
    /// A 2-element spatial attribute (kernel_shape, strides, dilations), or `default` for each.
    pub fn pair(&self, name: &str, default: usize) -> Result<[usize; 2]> {
        match self.ints(name) {
            None => Ok([default, default]),
            Some(v) if v.len() == 2 && v.iter().all(|&x| x > 0) => Ok([v[0] as usize, v[1] as usize]),
            Some(v) => Err(Error::Other(format!(
                "attribute '{name}' = {v:?}: only 2-D windows with positive sizes are supported"
            ))),
        }
    }
}
