//! Pipelines as YAML: a name, a description and an ordered list of passes with options.
//!
//! ```yaml
//! name: exact
//! description: exact rewrites only
//! passes:
//!   - fold-batchnorm:
//!   - conv-to-im2col:
//! ```
//! Unknown pass names or option keys and wrong types are errors with file, line and column.
//! `--pipeline NAME` finds the pipelines shipped in the binary (`passes/NAME.yaml`, included at
//! build time); anything else is read as a path.

use super::{constant_fold, conv_to_im2col, dead_code, fold_batchnorm, gemm_to_matmul, lut, mask, Pass};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Pipelines shipped inside the binary.
pub const BUILTIN: &[(&str, &str)] = &[
    ("exact", include_str!("../../passes/exact.yaml")),
    ("tabconv", include_str!("../../passes/tabconv.yaml")),
    ("all-lut", include_str!("../../passes/all-lut.yaml")),
];

/// Options of passes that take none (still rejects unknown keys).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NoOptions {}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum PassSpec {
    FoldBatchnorm(Option<NoOptions>),
    ConvToIm2col(Option<conv_to_im2col::Options>),
    GemmToMatmul(Option<NoOptions>),
    ConstantFold(Option<NoOptions>),
    DeadCode(Option<NoOptions>),
    Lut(Option<Box<lut::Options>>),
    Mask(Option<Box<mask::Options>>),
    Im2colToConv(Option<NoOptions>),
    ChannelsLast(Option<NoOptions>),
    FuseTransformer(Option<NoOptions>),
}

impl PassSpec {
    pub fn build(&self) -> Box<dyn Pass> {
        match self {
            PassSpec::FoldBatchnorm(_) => Box::new(fold_batchnorm::FoldBatchnorm),
            PassSpec::ConvToIm2col(o) => Box::new(conv_to_im2col::ConvToIm2col(o.clone().unwrap_or_default())),
            PassSpec::GemmToMatmul(_) => Box::new(gemm_to_matmul::GemmToMatmul),
            PassSpec::ConstantFold(_) => Box::new(constant_fold::ConstantFold),
            PassSpec::DeadCode(_) => Box::new(dead_code::DeadCode),
            PassSpec::Lut(o) => Box::new(lut::Lut(o.as_deref().cloned().unwrap_or_default())),
            PassSpec::Mask(o) => Box::new(mask::Mask(o.as_deref().cloned().unwrap_or_default())),
            PassSpec::Im2colToConv(_) => Box::new(super::im2col_to_conv::Im2colToConv),
            PassSpec::ChannelsLast(_) => Box::new(super::channels_last::ChannelsLast),
            PassSpec::FuseTransformer(_) => Box::new(super::fuse_transformer::FuseTransformer),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Each pass is a one-key map `name: options` (options may be empty).
    #[serde(with = "serde_yaml::with::singleton_map_recursive")]
    pub passes: Vec<PassSpec>,
}

impl Pipeline {
    /// Parse YAML text; `origin` (a file name) prefixes errors, which carry line and column.
    pub fn parse(text: &str, origin: &str) -> Result<Pipeline> {
        serde_yaml::from_str(text).map_err(|e| {
            let loc = e
                .location()
                .map(|l| format!(":{}:{}", l.line(), l.column()))
                .unwrap_or_default();
            Error::Input(format!("{origin}{loc}: {e}"))
        })
    }

    /// A built-in pipeline by name, or a YAML file by path.
    pub fn find(name_or_path: &str) -> Result<Pipeline> {
        if let Some((name, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Pipeline::parse(text, &format!("passes/{name}.yaml (built in)"));
        }
        let p = Path::new(name_or_path);
        if !p.exists() {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
            return Err(Error::Input(format!(
                "pipeline '{name_or_path}' is neither a built-in ({}) nor an existing file",
                names.join(", ")
            )));
        }
        let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
        Pipeline::parse(&text, &p.display().to_string())
    }

    /// Apply `PASS.PARAM=VALUE` overrides to every pass of that name.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let bad = |m: &str| Error::Input(format!("--set {assignment}: {m}"));
        let (lhs, value) = assignment
            .split_once('=')
            .ok_or_else(|| bad("expected PASS.PARAM=VALUE"))?;
        let (pass, param) = lhs.split_once('.').ok_or_else(|| bad("expected PASS.PARAM=VALUE"))?;
        let value: serde_yaml::Value = serde_yaml::from_str(value).map_err(|e| bad(&e.to_string()))?;
        let mut tree = serde_yaml::to_value(&*self).map_err(|e| bad(&e.to_string()))?;
        let mut hits = 0;
        if let Some(seq) = tree.get_mut("passes").and_then(|p| p.as_sequence_mut()) {
            for item in seq {
                let Some(map) = item.as_mapping_mut() else { continue };
                let Some(opts) = map.get_mut(pass) else { continue };
                if opts.is_null() {
                    *opts = serde_yaml::Value::Mapping(Default::default());
                }
                if let Some(m) = opts.as_mapping_mut() {
                    m.insert(serde_yaml::Value::String(param.to_string()), value.clone());
                    hits += 1;
                }
            }
        }
        if hits == 0 {
            return Err(bad(&format!("pipeline '{}' has no pass named '{pass}'", self.name)));
        }
        *self = serde_yaml::from_value(tree).map_err(|e| bad(&e.to_string()))?;
        Ok(())
    }

    /// The normalised pipeline as YAML (stored in `.tcv` metadata and reports).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("pipelines serialise")
    }

    pub fn build(&self) -> Vec<Box<dyn Pass>> {
        self.passes.iter().map(PassSpec::build).collect()
    }
}
