//! Both engines against onnxruntime's Python reference, the trained digits classifier, and every
//! load and input error, with its message.

use std::path::Path;

use fabric_engine::{self as engine, ort::OrtEngine, ExecutionProvider, OrtOptions};
use fabric_engine::{Engine, EngineError, EngineKind, EngineOptions};
use fabric_testkit::reference::{self, max_abs_diff};
use fabric_types::{NamedTensor, Tensor};

const TOLERANCE: f64 = 1e-4;

fn options() -> EngineOptions {
    EngineOptions {
        max_batch_size: 512,
        ort: OrtOptions { library: Some(fabric_testkit::ort::ort_library()), ..OrtOptions::default() },
    }
}

fn load(kind: EngineKind, model: &str) -> Box<dyn Engine> {
    engine::load(kind, &reference::model_path(model), &options()).unwrap_or_else(|e| panic!("{kind} {model}: {e}"))
}

fn load_err(kind: EngineKind, path: &Path) -> String {
    match engine::load(kind, path, &options()) {
        Ok(_) => panic!("{kind} loaded {} but should have refused it", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn both_engines_match_the_python_reference_on_every_model() {
    for model in ["mlp", "cnn", "mixed", "digits", "digits_raw", "shape_use", "shape_out", "odd_outputs", "partly"] {
        let cases = reference::load_cases(model).expect("reference cases");
        assert!(!cases.is_empty(), "{model}: no reference cases");
        for kind in [EngineKind::Tract, EngineKind::Ort] {
            let mut engine = load(kind, model);
            for case in &cases {
                let outputs =
                    engine.infer(&case.inputs).unwrap_or_else(|e| panic!("{kind} {model}/{}: {e}", case.name));
                assert_eq!(outputs.len(), case.outputs.len());
                for (got, want) in outputs.iter().zip(&case.outputs) {
                    assert_eq!(got.name, want.name);
                    let diff =
                        max_abs_diff(&got.tensor, &want.tensor).unwrap_or_else(|e| panic!("{kind} {model}: {e}"));
                    assert!(diff <= TOLERANCE, "{kind} {model}/{} output {}: max diff {diff}", case.name, got.name);
                }
            }
        }
    }
}

#[test]
fn batchability_is_decided_from_inputs_and_outputs_alike_on_both_engines() {
    // digits_raw is skl2onnx's default export: unnamed dynamic batch dims on the input and outputs.
    // shape_use reads its own batch size at run time (Shape -> Reshape).
    let cases = [
        ("mlp", true),
        ("digits", true),
        ("digits_raw", true),
        ("shape_use", true),
        ("shape_out", false),   // one output is the input's shape: fixed, not batch-major
        ("odd_outputs", false), // scalar, fixed-first, other-symbol and shapeless outputs
        ("partly", false),      // one input has no batch dimension
    ];
    for kind in [EngineKind::Tract, EngineKind::Ort] {
        for (model, batched) in cases {
            let engine = load(kind, model);
            assert_eq!(engine.metadata().is_batched(), batched, "{kind} {model}: {:?}", engine.metadata());
        }
    }
    // The unknown output shape of odd_outputs is reported from shape inference, as Triton would.
    let odd = load(EngineKind::Tract, "odd_outputs");
    let shapes: Vec<(&str, &[i64])> = odd.metadata().outputs.iter().map(|o| (o.name.as_str(), &o.shape[..])).collect();
    assert_eq!(shapes, [("total", &[][..]), ("colsum", &[1, 4][..]), ("flat", &[-1][..]), ("relu", &[-1, 4][..])]);
}

#[test]
fn digits_classifier_is_accurate_and_agrees_with_scikit_learn() {
    let case = reference::load_cases("digits").expect("digits reference").remove(0);
    let y_true = case.extra("y_true").expect("y_true").as_slice::<i64>().expect("int64").into_owned();
    let sklearn = case.extra("sklearn_label").expect("sklearn_label").as_slice::<i64>().expect("int64").into_owned();
    for kind in [EngineKind::Tract, EngineKind::Ort] {
        let mut engine = load(kind, "digits");
        let outputs = engine.infer(&case.inputs).expect("infer");
        let label = outputs.iter().find(|t| t.name == "label").expect("label output");
        let predicted = label.tensor.as_slice::<i64>().expect("label is int64");
        let correct = predicted.iter().zip(&y_true).filter(|(p, t)| p == t).count();
        let accuracy = correct as f64 / y_true.len() as f64;
        assert!(accuracy >= 0.95, "{kind}: accuracy {accuracy:.4} on {} samples", y_true.len());
        let disagreements: Vec<usize> = (0..sklearn.len()).filter(|&i| predicted[i] != sklearn[i]).collect();
        assert!(disagreements.is_empty(), "{kind}: differs from scikit-learn on samples {disagreements:?}");
    }
}

#[test]
fn ort_falls_back_to_cpu_without_a_gpu_and_honours_the_provider_list() {
    let path = reference::model_path("mlp");
    let engine = OrtEngine::load(&path, &options()).expect("load");
    // The CPU wheel has neither TensorRT nor CUDA: the default list must end on CPU.
    assert_eq!(engine.provider(), ExecutionProvider::Cpu);

    let mut gpu_only = options();
    gpu_only.ort.providers = vec![ExecutionProvider::Cuda];
    let err = OrtEngine::load(&path, &gpu_only).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("no configured execution provider could run it") && err.contains("CUDA"), "{err}");
}

#[test]
fn missing_model_file_is_reported() {
    for kind in [EngineKind::Tract, EngineKind::Ort] {
        let err = load_err(kind, Path::new("/nonexistent/model.onnx"));
        assert_eq!(err, "model file /nonexistent/model.onnx does not exist");
    }
}

#[test]
fn corrupt_model_is_reported() {
    let path = reference::build_dir().join("bad-models/corrupt/model.onnx");
    for kind in [EngineKind::Tract, EngineKind::Ort] {
        let err = load_err(kind, &path);
        assert!(err.contains("is corrupt or not an ONNX model"), "{kind}: {err}");
    }
}

#[test]
fn an_opset_newer_than_onnx_knows_is_refused_by_both_engines() {
    let path = reference::build_dir().join("bad-models/wrong_opset/model.onnx");
    for kind in [EngineKind::Tract, EngineKind::Ort] {
        let err = load_err(kind, &path);
        assert!(err.contains("declares ONNX operator set 999, newer than any this fabric knows"), "{kind}: {err}");
    }
}

#[test]
fn unsupported_operator_is_named() {
    let path = reference::build_dir().join("bad-models/unsupported/model.onnx");
    let err = load_err(EngineKind::Tract, &path);
    assert!(err.contains("uses operator(s) Det that the tract engine does not support"), "{err}");
    // The same file is valid ONNX: ONNX Runtime serves it.
    let mut ort = engine::load(EngineKind::Ort, &path, &options()).expect("ORT runs Det");
    let m = Tensor::from_vec(vec![1, 3, 3], vec![2.0f32, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 4.0]).expect("tensor");
    let out = ort.infer(&[NamedTensor::new("input", m)]).expect("infer");
    assert!((out[0].tensor.as_slice::<f32>().expect("f32")[0] - 24.0).abs() < 1e-4);
}

fn mlp_input(shape: Vec<usize>) -> NamedTensor {
    let n = shape.iter().product();
    NamedTensor::new("input", Tensor::from_vec(shape, vec![0.5f32; n]).expect("tensor"))
}

fn infer_err(kind: EngineKind, model: &str, max_batch: usize, inputs: &[NamedTensor]) -> EngineError {
    let opts = EngineOptions { max_batch_size: max_batch, ..options() };
    let mut engine = engine::load(kind, &reference::model_path(model), &opts).expect("load");
    engine.infer(inputs).map(|_| ()).expect_err("should be refused")
}

#[test]
fn input_errors_name_what_is_wrong() {
    let ids = NamedTensor::new("ids", Tensor::from_vec(vec![2, 4], vec![1i64; 8]).expect("tensor"));
    let int_input = NamedTensor::new("input", Tensor::from_vec(vec![1, 784], vec![1i64; 784]).expect("tensor"));
    let cases: Vec<(&str, &str, usize, Vec<NamedTensor>, &str)> = vec![
        (
            "unknown input",
            "mlp",
            64,
            vec![
                mlp_input(vec![1, 784]),
                NamedTensor::new("extra", Tensor::from_vec(vec![1], vec![1.0f32]).expect("t")),
            ],
            "unknown input 'extra': the model's inputs are 'input'",
        ),
        ("missing input", "mixed", 64, vec![ids], "missing input 'weights': the model needs 'ids', 'weights'"),
        ("wrong dtype", "mlp", 64, vec![int_input], "input 'input' has datatype INT64, the model expects FP32"),
        (
            "wrong rank",
            "mlp",
            64,
            vec![mlp_input(vec![784])],
            "input 'input' has shape [784] (rank 1), the model expects [-1, 784] (rank 2)",
        ),
        (
            "wrong dims",
            "mlp",
            64,
            vec![mlp_input(vec![1, 783])],
            "input 'input' has shape [1, 783], the model expects [-1, 784] (dimension 1 must be 784)",
        ),
        (
            "batch over limit",
            "mlp",
            4,
            vec![mlp_input(vec![5, 784])],
            "batch of 5 exceeds this model's maximum batch size of 4",
        ),
    ];
    for kind in [EngineKind::Tract, EngineKind::Ort] {
        for (label, model, max_batch, inputs, want) in &cases {
            let err = infer_err(kind, model, *max_batch, inputs);
            assert!(matches!(err, EngineError::Input(_)), "{kind} {label}: {err:?}");
            assert_eq!(err.to_string(), *want, "{kind} {label}");
        }
    }
}

/// `n` rows of `t`, its rows repeated from the first where it has fewer.
fn rows_of(t: &Tensor, n: usize) -> Tensor {
    let singles = t.split_batch(&vec![1; t.batch_size()]).expect("split into rows");
    let picked: Vec<&Tensor> = singles.iter().cycle().take(n).collect();
    Tensor::concat_batch(&picked).expect("concat rows")
}

#[test]
fn bound_buffers_give_the_plain_session_answers_and_are_made_once_per_bucket() {
    // Without a GPU the bound path runs with the CPU as its device: the same buffers, bound once
    // per bucket, the same copies in and out as on CUDA.
    let mut bound_options = options();
    bound_options.max_batch_size = 8;
    bound_options.ort.io_binding = Some(true);
    let mut plain_options = bound_options.clone();
    plain_options.ort.io_binding = Some(false);
    for model in ["mlp", "cnn", "digits"] {
        let path = reference::model_path(model);
        let case = reference::load_cases(model).expect("reference cases").remove(0);
        let mut bound = OrtEngine::load(&path, &bound_options).unwrap_or_else(|e| panic!("{model}: {e}"));
        let mut plain = OrtEngine::load(&path, &plain_options).unwrap_or_else(|e| panic!("{model}: {e}"));
        assert!(bound.bound_sizes().is_empty(), "{model}: buffers before any run");
        // 3 and 5 pad to the buckets 4 and 8; the second 3 reuses the buffers of 4.
        for rows in [1, 3, 5, 3, 8, 2] {
            let inputs: Vec<NamedTensor> =
                case.inputs.iter().map(|t| NamedTensor::new(t.name.clone(), rows_of(&t.tensor, rows))).collect();
            let got = bound.infer(&inputs).unwrap_or_else(|e| panic!("{model} bound, {rows} rows: {e}"));
            let want = plain.infer(&inputs).unwrap_or_else(|e| panic!("{model} plain, {rows} rows: {e}"));
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert_eq!((&g.name, g.tensor.shape()), (&w.name, w.tensor.shape()), "{model}, {rows} rows");
                let diff = max_abs_diff(&g.tensor, &w.tensor).unwrap_or_else(|e| panic!("{model}: {e}"));
                assert!(diff <= TOLERANCE, "{model}, {rows} rows, output {}: max diff {diff}", g.name);
            }
        }
        assert_eq!(bound.bound_sizes(), [1, 2, 4, 8], "{model}: one set of buffers per bucket hit");
        assert!(plain.bound_sizes().is_empty(), "{model}: io_binding = false binds nothing");
    }
}
