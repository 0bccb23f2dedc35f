//! Reader for the reference cases that `scripts/gen_models.py` writes: inputs and onnxruntime's
//! outputs for a model, as `manifest.json` plus one raw little-endian file per tensor.
//!
//! Used by tests and benchmarks to compare the engines (and the servers) with the Python reference.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use fabric_types::dtype::DataType;
use fabric_types::tensor::{NamedTensor, Tensor, TensorError};

/// Why a reference case cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// A file could not be read.
    #[error("cannot read {path}: {source} (run `bash scripts/setup.sh` to generate the models)")]
    Io { path: String, source: std::io::Error },
    /// The manifest is not valid.
    #[error("bad manifest {path}: {source}")]
    Manifest { path: String, source: serde_json::Error },
    /// A tensor file does not match its manifest entry.
    #[error("bad tensor {path}: {source}")]
    Tensor { path: String, source: TensorError },
}

#[derive(Deserialize)]
struct Entry {
    name: String,
    datatype: DataType,
    shape: Vec<usize>,
    file: String,
}

#[derive(Deserialize)]
struct Manifest {
    inputs: Vec<Entry>,
    outputs: Vec<Entry>,
    #[serde(default)]
    extras: Vec<Entry>,
}

/// One reference case: inputs, the reference outputs, and extra labelled tensors (e.g. true labels).
#[derive(Clone, Debug)]
pub struct ReferenceCase {
    /// Case name (its folder name).
    pub name: String,
    /// Inputs fed to the model.
    pub inputs: Vec<NamedTensor>,
    /// onnxruntime's (Python) outputs for those inputs.
    pub outputs: Vec<NamedTensor>,
    /// Extra tensors, e.g. `y_true` and `sklearn_label` for the digits classifier.
    pub extras: Vec<NamedTensor>,
}

impl ReferenceCase {
    /// An extra tensor by name.
    pub fn extra(&self, name: &str) -> Option<&Tensor> {
        self.extras.iter().find(|t| t.name == name).map(|t| &t.tensor)
    }
}

/// The project's build folder: `FABRIC_BUILD_DIR`, else `build/` at the workspace root.
pub fn build_dir() -> PathBuf {
    std::env::var_os("FABRIC_BUILD_DIR").map(PathBuf::from).unwrap_or_else(|| crate::workspace_root().join("build"))
}

/// The generated model repository (Triton layout).
pub fn models_dir() -> PathBuf {
    build_dir().join("models")
}

/// Path of `<models>/<name>/1/model.onnx`.
pub fn model_path(name: &str) -> PathBuf {
    models_dir().join(name).join("1").join("model.onnx")
}

fn read_entries(dir: &Path, entries: Vec<Entry>) -> Result<Vec<NamedTensor>, ReferenceError> {
    entries
        .into_iter()
        .map(|e| {
            let path = dir.join(&e.file);
            let bytes = std::fs::read(&path)
                .map_err(|source| ReferenceError::Io { path: path.display().to_string(), source })?;
            let tensor = Tensor::from_bytes(e.datatype, e.shape, bytes)
                .map_err(|source| ReferenceError::Tensor { path: path.display().to_string(), source })?;
            Ok(NamedTensor::new(e.name, tensor))
        })
        .collect()
}

/// Reads one case folder.
pub fn load_case(dir: &Path) -> Result<ReferenceCase, ReferenceError> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|source| ReferenceError::Io { path: path.display().to_string(), source })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|source| ReferenceError::Manifest { path: path.display().to_string(), source })?;
    Ok(ReferenceCase {
        name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        inputs: read_entries(dir, manifest.inputs)?,
        outputs: read_entries(dir, manifest.outputs)?,
        extras: read_entries(dir, manifest.extras)?,
    })
}

/// Reads every case of a model, sorted by name.
pub fn load_cases(model: &str) -> Result<Vec<ReferenceCase>, ReferenceError> {
    let root = build_dir().join("reference").join(model);
    let listing =
        std::fs::read_dir(&root).map_err(|source| ReferenceError::Io { path: root.display().to_string(), source })?;
    let mut dirs: Vec<PathBuf> = listing.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    dirs.iter().map(|d| load_case(d)).collect()
}

/// Largest absolute difference between two tensors, after checking they agree in type and shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64, String> {
    if a.dtype() != b.dtype() || a.shape() != b.shape() {
        return Err(format!("{} {:?} vs {} {:?}", a.dtype(), a.shape(), b.dtype(), b.shape()));
    }
    let as_f64 = |t: &Tensor| -> Result<Vec<f64>, TensorError> {
        Ok(match t.dtype() {
            DataType::Fp32 => t.as_slice::<f32>()?.iter().map(|&v| f64::from(v)).collect(),
            DataType::Fp64 => t.as_slice::<f64>()?.to_vec(),
            DataType::Int64 => t.as_slice::<i64>()?.iter().map(|&v| v as f64).collect(),
            DataType::Int32 => t.as_slice::<i32>()?.iter().map(|&v| f64::from(v)).collect(),
            _ => t.bytes().iter().map(|&v| f64::from(v)).collect(),
        })
    };
    let (x, y) = (as_f64(a).map_err(|e| e.to_string())?, as_f64(b).map_err(|e| e.to_string())?);
    Ok(x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max))
}
