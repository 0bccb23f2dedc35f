//! ONNX Runtime library errors. A process loads ONNX Runtime once, so these run in their own test
//! binary, in sequence, ending with a successful load that proves a failure leaves nothing behind.

use std::path::PathBuf;

use fabric_engine::ort::environment;
use fabric_testkit::reference;

#[test]
fn library_missing_invalid_too_old_then_fixed() {
    let missing =
        environment(Some(&PathBuf::from("/opt/nowhere/libonnxruntime.so.1.31.1"))).map(|_| ()).unwrap_err().to_string();
    assert!(
        missing.starts_with(
            "ONNX Runtime library not found at /opt/nowhere/libonnxruntime.so.1.31.1: run `bash scripts/setup.sh`"
        ),
        "{missing}"
    );

    let not_a_library = reference::model_path("mlp");
    let invalid = environment(Some(&not_a_library)).map(|_| ()).unwrap_err().to_string();
    assert!(invalid.starts_with("cannot use ") && invalid.contains("as the ONNX Runtime library"), "{invalid}");

    let old = reference::build_dir().join("ort-old/libonnxruntime.so.1.20.1");
    let too_old = environment(Some(&old)).map(|_| ()).unwrap_err().to_string();
    assert!(too_old.contains("is version 1.20.1, but this build needs 1.31.0 or newer"), "{too_old}");
    assert!(too_old.contains("pip install onnxruntime==1.31.1"), "{too_old}");

    environment(Some(&fabric_testkit::ort::ort_library())).expect("the right library loads after the failures");
}
