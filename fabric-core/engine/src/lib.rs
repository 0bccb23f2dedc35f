//! `fabric-engine`: model files ([`model`]: what a model declares, request validation) and the
//! `Engine` trait: one loaded model that runs a batch. Two engines implement it:
//! [`tract`](crate::tract) (pure Rust, for edge devices) and [`ort`](crate::ort)
//! (ONNX Runtime loaded at run time, for hubs, with GPU execution providers where present).
//!
//! An engine is owned by one thread at a time (`Send`, `&mut self` to run); the pool gives each
//! replica its own engine instead of sharing one behind a lock.

pub mod binding;
mod buckets;
pub mod gpu;
pub mod model;
pub mod ort;
pub mod tract;
mod tract_pool;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::{InputError, ModelFileError};
use fabric_types::tensor::{NamedTensor, Tensor, TensorError};

pub use self::ort::{ExecutionProvider, OrtOptions};
pub use fabric_types::EngineKind;
pub use model::{ModelMetadata, TensorSpec};

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model file is missing, unreadable, corrupt or declares unserved types.
    #[error(transparent)]
    ModelFile(#[from] ModelFileError),
    /// The model uses operators this engine does not implement.
    #[error("model {path} uses operator(s) {} that the {engine} engine does not support; serve it with the other engine", ops.join(", "))]
    UnsupportedOps { engine: EngineKind, path: String, ops: Vec<String> },
    /// The engine could not build the model for another reason.
    #[error("{engine} could not load model {path}: {reason}")]
    Load { engine: EngineKind, path: String, reason: String },
    /// The request's tensors do not fit the model.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The engine failed while running a batch.
    #[error("{engine} failed running the model: {reason}")]
    Run { engine: EngineKind, reason: String },
    /// The ONNX Runtime library could not be found.
    #[error("ONNX Runtime library not found at {path}: run `bash scripts/setup.sh` (it installs onnxruntime 1.31 into .venv) and set ORT_DYLIB_PATH or `ort_library` in the config to the full path of libonnxruntime.so.1.31.x")]
    OrtLibraryMissing { path: String },
    /// No ONNX Runtime library was configured at all.
    #[error("no ONNX Runtime library configured: set ORT_DYLIB_PATH or `ort_library` in the config to the full path of libonnxruntime.so.1.31.x (`bash scripts/setup.sh` installs it into .venv)")]
    OrtLibraryUnset,
    /// The library is too old for this build.
    #[error("ONNX Runtime at {path} is version {found}, but this build needs 1.{required}.0 or newer: install onnxruntime>=1.{required} (`pip install onnxruntime==1.31.1`) and point ORT_DYLIB_PATH at its libonnxruntime.so")]
    OrtLibraryVersion { path: String, found: String, required: u32 },
    /// The file exists but is not a usable ONNX Runtime library.
    #[error("cannot use {path} as the ONNX Runtime library: {reason}")]
    OrtLibraryInvalid { path: String, reason: String },
    /// The thread loading or warming a replica died (a panic in the engine's own code).
    #[error("the {what} thread failed: {reason}")]
    Thread { what: &'static str, reason: String },
    /// The version does not fit in the GPU's free memory (measured once its first replica loaded).
    #[error("the model does not fit on this GPU: {0}")]
    GpuFit(#[from] fabric_policy::gpu::FitError),
    /// A tensor could not be built from an engine's output.
    #[error("engine output: {0}")]
    Output(#[from] TensorError),
}

/// Which engine a model is configured to run on: one of them, or `auto`, the faster of the two
/// on that model's warm-up batches on this machine (tract when ONNX Runtime's library does not load).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// Time both at load and keep the faster (ONNX Runtime only where its library loads).
    #[default]
    Auto,
    /// Always tract.
    Tract,
    /// Always ONNX Runtime (`onnxruntime` is accepted too).
    #[serde(alias = "onnxruntime")]
    Ort,
}

impl EngineChoice {
    /// The engine when the choice names one; `None` for `auto`.
    pub fn fixed(self) -> Option<EngineKind> {
        match self {
            EngineChoice::Auto => None,
            EngineChoice::Tract => Some(EngineKind::Tract),
            EngineChoice::Ort => Some(EngineKind::Ort),
        }
    }
}

impl std::fmt::Display for EngineChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.fixed() {
            Some(kind) => kind.fmt(f),
            None => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for EngineChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            other => match other.parse::<EngineKind>() {
                Ok(EngineKind::Tract) => Ok(EngineChoice::Tract),
                Ok(EngineKind::Ort) => Ok(EngineChoice::Ort),
                Err(_) => Err(format!("unknown engine '{other}': use 'auto', 'tract' or 'ort'")),
            },
        }
    }
}

/// Settings shared by both engines.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineOptions {
    /// Largest batch (leading dimension) one run may take.
    pub max_batch_size: usize,
    /// ONNX Runtime settings (ignored by tract).
    pub ort: OrtOptions,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { max_batch_size: 64, ort: OrtOptions::default() }
    }
}

/// A loaded model that runs batches.
pub trait Engine: Send {
    /// Which engine this is.
    fn kind(&self) -> EngineKind;
    /// The model's declared inputs and outputs.
    fn metadata(&self) -> &ModelMetadata;
    /// The largest batch one run accepts.
    fn max_batch_size(&self) -> usize;
    /// Whether the model runs on a GPU (an execution provider that registered), for Triton's `KIND_GPU`.
    fn on_gpu(&self) -> bool {
        false
    }
    /// Runs inputs already validated and in graph order; returns outputs in graph order.
    fn run_ordered(&mut self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, EngineError>;

    /// Validates named inputs against the metadata, runs them, and names the outputs.
    fn infer(&mut self, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>, EngineError> {
        let (ordered, _batch) = self.metadata().validate(inputs, self.max_batch_size())?;
        let outputs = self.run_ordered(&ordered)?;
        Ok(self.metadata().name_outputs(outputs))
    }
}

/// Loads a model file with the chosen engine.
pub fn load(kind: EngineKind, path: &Path, options: &EngineOptions) -> Result<Box<dyn Engine>, EngineError> {
    Ok(match kind {
        EngineKind::Tract => Box::new(tract::TractEngine::load(path, options)?),
        EngineKind::Ort => Box::new(ort::OrtEngine::load(path, options)?),
    })
}

/// The model path as shown in messages.
fn shown(path: &Path) -> String {
    PathBuf::from(path).display().to_string()
}
