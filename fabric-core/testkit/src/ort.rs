//! The ONNX Runtime library tests load: `ORT_DYLIB_PATH`, else the path `scripts/setup.sh` wrote to
//! `build/ort-dylib-path`, else the library in `.venv`'s onnxruntime wheel.

use std::path::PathBuf;

/// The ONNX Runtime library; panics with what to run when there is none.
pub fn ort_library() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Ok(path) = std::fs::read_to_string(crate::reference::build_dir().join("ort-dylib-path")) {
        return PathBuf::from(path.trim());
    }
    let lib = crate::workspace_root().join(".venv/lib");
    std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/onnxruntime/capi"))
        .flat_map(|capi| std::fs::read_dir(capi).into_iter().flatten().filter_map(|e| e.ok()).map(|e| e.path()))
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so.1.")))
        .unwrap_or_else(|| panic!("no ONNX Runtime library: run `bash scripts/setup.sh` or set ORT_DYLIB_PATH"))
}
