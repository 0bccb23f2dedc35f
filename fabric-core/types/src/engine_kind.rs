//! Which engine runs a model: named here, below every layer that decides or reports it.

use serde::{Deserialize, Serialize};

/// Which engine runs a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// tract-onnx, pure Rust, CPU.
    Tract,
    /// ONNX Runtime through `ort`, loaded dynamically.
    Ort,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Tract => "tract",
            EngineKind::Ort => "onnxruntime",
        })
    }
}

impl std::str::FromStr for EngineKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tract" => Ok(EngineKind::Tract),
            "ort" | "onnxruntime" => Ok(EngineKind::Ort),
            other => Err(format!("unknown engine '{other}': use 'tract' or 'ort'")),
        }
    }
}
