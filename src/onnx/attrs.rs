//! Typed access to a NodeProto's attributes with defaults and clear errors. An attribute whose
//! declared type is not the one read (an `INT` read as a float, …) is recorded and reported by
//! [`Attrs::type_errors`] instead of being silently read as 0.

use crate::error::{Error, Result};
use crate::onnx::pb::{attribute_proto::AttributeType, AttributeProto, NodeProto};
use std::cell::RefCell;

pub struct Attrs<'a> {
    node: &'a NodeProto,
    wrong: RefCell<Vec<String>>,
}

impl<'a> Attrs<'a> {
    pub fn new(node: &'a NodeProto) -> Attrs<'a> {
        Attrs {
            node,
            wrong: RefCell::new(Vec::new()),
        }
    }
    pub fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == name)
    }
    /// The attribute, if present, after checking its declared type (`UNDEFINED` is accepted:
    /// very old files do not declare one).
    fn typed(&self, name: &str, want: AttributeType) -> Option<&'a AttributeProto> {
        let a = self.get(name)?;
        if a.r#type != AttributeType::Undefined as i32 && a.r#type != want as i32 {
            let got =
                AttributeType::try_from(a.r#type).map_or_else(|_| a.r#type.to_string(), |t| t.as_str_name().into());
            self.wrong
                .borrow_mut()
                .push(format!("attribute '{name}' is {got}, expected {}", want.as_str_name()));
            return None;
        }
        Some(a)
    }
    /// Every attribute read with the wrong type so far, as one error.
    pub fn type_errors(&self) -> Result<()> {
        let wrong = self.wrong.borrow();
        if wrong.is_empty() {
            return Ok(());
        }
        Err(Error::Other(wrong.join("; ")))
    }
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
    pub fn int(&self, name: &str, default: i64) -> i64 {
        self.typed(name, AttributeType::Int).map(|a| a.i).unwrap_or(default)
    }
    pub fn float(&self, name: &str, default: f32) -> f32 {
        self.typed(name, AttributeType::Float).map(|a| a.f).unwrap_or(default)
    }
    pub fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.typed(name, AttributeType::Ints).map(|a| a.ints.clone())
    }
    pub fn string(&self, name: &str) -> Option<String> {
        self.typed(name, AttributeType::String)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
    pub fn req_int(&self, name: &str) -> Result<i64> {
        self.typed(name, AttributeType::Int)
            .map(|a| a.i)
            .ok_or_else(|| Error::Other(format!("missing required attribute '{name}' (an INT)")))
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
