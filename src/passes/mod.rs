//! Graph rewrites. Each pass lives in its own file and implements [`Pass`]; pipelines
//! (`passes/*.yaml`) name them with typed options; the [`manager`] runs a pipeline, re-infers
//! shapes and verifies the graph after every pass, and times and summarises each one.

pub mod analysis;
pub mod channels_last;
pub mod constant_fold;
pub mod conv_to_im2col;
pub mod dead_code;
pub mod fold_batchnorm;
pub mod fuse_transformer;
pub mod gemm_to_matmul;
pub mod im2col_to_conv;
pub mod lut;
pub mod manager;
pub mod mask;
pub mod pipeline;

use crate::error::Result;
use crate::ir::Graph;
use ndarray::ArrayD;

/// What passes may use besides the graph: calibration data, a seed, and a place for notes
/// (e.g. "left conv3 alone: grouped") that end up in the compile report.
#[derive(Default)]
pub struct PassCx {
    pub calib: Option<ArrayD<f32>>,
    /// The calibration images the `mask` pass measures on: held out from [`PassCx::calib`]
    /// (so from every table and codebook learned), but for the first
    /// [`PassCx::holdout_learned`]. Measured on the images the tables were fitted to, an
    /// approximated model looks better than it is on new images (on the ResNet-18/16 fixture
    /// the logit cosine read 0.9982 there and 0.9967 on unseen images).
    pub holdout: Option<ArrayD<f32>>,
    /// How many of [`PassCx::holdout`]'s images, its first ones, are also in
    /// [`PassCx::calib`]: for an expected-drop target, a calibration set whose held-out quarter
    /// is too few to confirm on lends the mask the images learned on last
    /// (`manager::split_holdout`); the confirmation then holds the images no table saw out
    /// first.
    pub holdout_learned: usize,
    pub seed: u64,
    pub notes: Vec<String>,
    /// What passes recorded about the graph for later passes (the `lut` pass's replaced
    /// layers, which `mask` restores and relearns).
    pub analyses: analysis::Analyses,
    /// Labelled validation images for passes that measure accuracy (`mask`).
    pub val: Option<(ArrayD<f32>, Vec<i64>)>,
    /// What the `mask` pass decided and measured.
    pub mask: Option<mask::MaskReport>,
    /// What the `lut` pass's global distillation stage did (its last run).
    pub global: Option<crate::calib::global::Report>,
    /// Print progress lines on stderr as the passes go (each pass, each layer learned, each
    /// masking step); off for library use, on in `tabconv-compile`.
    pub verbose: bool,
    /// Set from elsewhere to stop the compile: checked between passes, between the `lut`
    /// pass's layers and between the `mask` pass's steps ([`PassCx::check_cancel`]), so a long
    /// pass stops within one layer (the Python binding's Ctrl-C).
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl PassCx {
    /// `Err` once [`PassCx::cancel`] is set.
    pub fn check_cancel(&self) -> Result<()> {
        match &self.cancel {
            Some(c) if c.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(crate::error::Error::Other("interrupted".into()))
            }
            _ => Ok(()),
        }
    }

    /// A progress line (see [`PassCx::verbose`]).
    pub fn say(&self, bar: &indicatif::ProgressBar, line: impl FnOnce() -> String) {
        if self.verbose {
            crate::cli::say(bar, &line());
        }
    }
}

/// `*` wildcard match (e.g. `/layer1/*`), used by the layer lists of pipeline options.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || !name[first.len()..].ends_with(last) || name.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for p in &parts[1..parts.len() - 1] {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    true
}

/// The patterns of an option's layer list (`keep_exact`, `layers`, …) that name none of
/// `names`, for a compile note: a mistyped name would otherwise change nothing, silently.
pub fn unmatched<'a>(patterns: impl IntoIterator<Item = &'a str>, names: &[&str]) -> Vec<&'a str> {
    let mut out: Vec<&str> = patterns
        .into_iter()
        .filter(|p| !names.iter().any(|n| glob_match(p, n)))
        .collect();
    out.dedup();
    out
}

pub trait Pass {
    /// The name used in pipeline files.
    fn name(&self) -> &'static str;
    /// The pass's parameters, normalised, for reports and `.tcv` metadata.
    fn params(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn run(&self, graph: &mut Graph, cx: &mut PassCx) -> Result<()>;
}
