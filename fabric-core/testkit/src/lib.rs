//! `fabric-testkit`: what the fabric's tests and benchmarks share: the reference cases the model
//! script writes ([`reference`]) and the ONNX Runtime library to load ([`ort`]).

pub mod ort;
pub mod reference;

use std::path::PathBuf;

/// The workspace's root folder (where `build/`, `.venv/` and `target/` are).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}
