//! KServe v2 over gRPC: the generated `inference` messages and service ([`pb`]), and the pure
//! conversions between them and the fabric's tensors. Decoding yields the same
//! [`DecodedRequest`] the REST codec does, so both faces are served by one path.
//!
//! Inputs arrive as `raw_input_contents` (little-endian bytes, one entry per input, what
//! tritonclient sends) or as typed `contents`; outputs always go back as `raw_output_contents`, as
//! Triton answers them.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::kserve::{CodecError, DecodedRequest, OutputSelection};
use fabric_types::dtype::DataType;
use fabric_types::tensor::{NamedTensor, Tensor, TensorError};

/// The messages, client and server of `inference.GRPCInferenceService`, generated from
/// `proto/grpc_service.proto` at build.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("inference");
}

use pb::infer_parameter::ParameterChoice;
use pb::model_infer_request::InferInputTensor;

/// An infer parameter as the JSON value the REST face would have carried.
fn parameter_json(p: &pb::InferParameter) -> Value {
    match &p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => Value::from(*b),
        Some(ParameterChoice::Int64Param(i)) => Value::from(*i),
        Some(ParameterChoice::StringParam(s)) => Value::from(s.as_str()),
        Some(ParameterChoice::DoubleParam(d)) => Value::from(*d),
        Some(ParameterChoice::Uint64Param(u)) => Value::from(*u),
        None => Value::Null,
    }
}

/// A string infer parameter.
pub fn string_parameter(s: impl Into<String>) -> pb::InferParameter {
    pb::InferParameter { parameter_choice: Some(ParameterChoice::StringParam(s.into())) }
}

/// An int64 infer parameter.
pub fn int_parameter(i: i64) -> pb::InferParameter {
    pb::InferParameter { parameter_choice: Some(ParameterChoice::Int64Param(i)) }
}

/// Decodes a `ModelInferRequest` into the model it names (and version, `None` when empty) and the
/// request the serving path takes.
pub fn decode_infer(request: pb::ModelInferRequest) -> Result<(String, Option<String>, DecodedRequest), CodecError> {
    let pb::ModelInferRequest { model_name, model_version, id, parameters, inputs, outputs, raw_input_contents } =
        request;
    if !raw_input_contents.is_empty() && raw_input_contents.len() != inputs.len() {
        return Err(CodecError::Binary(format!(
            "raw_input_contents has {} entries for {} inputs: send one per input, in order",
            raw_input_contents.len(),
            inputs.len()
        )));
    }
    let mut raw = raw_input_contents.into_iter();
    let mut decoded = Vec::with_capacity(inputs.len());
    for input in inputs {
        let tensor = decode_input(&input, raw.next())?;
        decoded.push(NamedTensor::new(input.name, tensor));
    }
    let mut parameters: Map<String, Value> = parameters.iter().map(|(k, v)| (k.clone(), parameter_json(v))).collect();
    let timeout = match parameters.remove("timeout") {
        None => None,
        Some(v) => Some(Duration::from_micros(
            v.as_u64()
                .ok_or_else(|| CodecError::Malformed(format!("parameter timeout must be microseconds, got {v}")))?,
        )),
    };
    // The REST face's binary flags mean nothing here: outputs always come back raw.
    parameters.remove("binary_data_output");
    let requested = (!outputs.is_empty()).then(|| outputs.into_iter().map(|o| (o.name, true)).collect::<Vec<_>>());
    let version = (!model_version.is_empty()).then_some(model_version);
    let id = (!id.is_empty()).then_some(id);
    let request = DecodedRequest {
        id,
        inputs: decoded,
        outputs: OutputSelection { requested, binary_default: true },
        timeout,
        parameters,
    };
    Ok((model_name, version, request))
}

fn decode_input(input: &InferInputTensor, raw: Option<bytes::Bytes>) -> Result<Tensor, CodecError> {
    let err = |reason: String| CodecError::Input { name: input.name.clone(), reason };
    let (dtype, shape) = crate::kserve::input_declaration(&input.name, &input.datatype, &input.shape)?;
    let bytes = match (raw, &input.contents) {
        (Some(_), Some(_)) => return Err(err("has contents and a raw_input_contents entry: send one".into())),
        (Some(raw), None) => raw.to_vec(),
        (None, Some(contents)) => {
            let want = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| err("shape is too large".into()))?;
            typed_bytes(dtype, contents, want).map_err(err)?
        }
        (None, None) => return Err(err("has neither contents nor a raw_input_contents entry".into())),
    };
    Tensor::from_bytes(dtype, shape, bytes).map_err(|e| err(e.to_string()))
}

/// The little-endian bytes of typed contents, from the field that matches `dtype`, with `want`
/// elements.
fn typed_bytes(dtype: DataType, c: &pb::InferTensorContents, want: usize) -> Result<Vec<u8>, String> {
    fn check<T>(values: &[T], want: usize, field: &str) -> Result<(), String> {
        if values.len() == want {
            Ok(())
        } else {
            Err(format!("the shape needs {want} elements, {field} has {}", values.len()))
        }
    }
    macro_rules! narrow {
        ($values:expr, $field:literal, $t:ty) => {{
            check($values, want, $field)?;
            let mut out = Vec::with_capacity(want * std::mem::size_of::<$t>());
            for (i, &v) in $values.iter().enumerate() {
                let n = <$t>::try_from(v).map_err(|_| format!("element {i} ({v}) is not a valid {dtype}"))?;
                out.extend_from_slice(&n.to_le_bytes());
            }
            out
        }};
    }
    macro_rules! same {
        ($values:expr, $field:literal) => {{
            check($values, want, $field)?;
            $values.iter().flat_map(|v| v.to_le_bytes()).collect()
        }};
    }
    Ok(match dtype {
        DataType::Bool => {
            check(&c.bool_contents, want, "bool_contents")?;
            c.bool_contents.iter().map(|&b| u8::from(b)).collect()
        }
        DataType::Int8 => narrow!(&c.int_contents, "int_contents", i8),
        DataType::Int16 => narrow!(&c.int_contents, "int_contents", i16),
        DataType::Int32 => same!(&c.int_contents, "int_contents"),
        DataType::Int64 => same!(&c.int64_contents, "int64_contents"),
        DataType::Uint8 => narrow!(&c.uint_contents, "uint_contents", u8),
        DataType::Uint16 => narrow!(&c.uint_contents, "uint_contents", u16),
        DataType::Uint32 => same!(&c.uint_contents, "uint_contents"),
        DataType::Uint64 => same!(&c.uint64_contents, "uint64_contents"),
        DataType::Fp32 => same!(&c.fp32_contents, "fp32_contents"),
        DataType::Fp64 => same!(&c.fp64_contents, "fp64_contents"),
        DataType::Fp16 | DataType::Bytes => return Err(TensorError::UnsupportedDataType(dtype).to_string()),
    })
}

/// Encodes the outputs the selection asks for (all, in graph order, when it names none) as a
/// `ModelInferResponse` with raw contents; `parameters` are the response's own (`served_by`, ...).
pub fn encode_infer(
    model: &str,
    version: &str,
    id: Option<&str>,
    parameters: HashMap<String, pb::InferParameter>,
    outputs: Vec<NamedTensor>,
    selection: &OutputSelection,
) -> Result<pb::ModelInferResponse, CodecError> {
    crate::kserve::check_outputs(selection, outputs.iter().map(|o| o.name.as_str()))?;
    let chosen: Vec<NamedTensor> = match &selection.requested {
        None => outputs,
        Some(requested) => {
            let mut outputs: Vec<Option<NamedTensor>> = outputs.into_iter().map(Some).collect();
            requested
                .iter()
                .filter_map(|(name, _)| {
                    outputs.iter_mut().find(|o| o.as_ref().is_some_and(|o| &o.name == name)).and_then(Option::take)
                })
                .collect()
        }
    };
    let mut tensors = Vec::with_capacity(chosen.len());
    let mut raw = Vec::with_capacity(chosen.len());
    for output in chosen {
        tensors.push(pb::model_infer_response::InferOutputTensor {
            name: output.name,
            datatype: output.tensor.dtype().as_str().to_string(),
            shape: output.tensor.shape().iter().map(|&d| d as i64).collect(),
            parameters: HashMap::new(),
            contents: None,
        });
        raw.push(bytes::Bytes::from(output.tensor.into_bytes()));
    }
    Ok(pb::ModelInferResponse {
        model_name: model.to_string(),
        model_version: version.to_string(),
        id: id.unwrap_or_default().to_string(),
        parameters,
        outputs: tensors,
        raw_output_contents: raw,
    })
}

/// The `grpc-timeout` header's value ("<digits><unit>", unit H, M, S, m, u or n), or `None` when it
/// is not one.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(
        name: &str,
        datatype: &str,
        shape: Vec<i64>,
        contents: Option<pb::InferTensorContents>,
    ) -> InferInputTensor {
        InferInputTensor { name: name.into(), datatype: datatype.into(), shape, parameters: HashMap::new(), contents }
    }

    fn request(inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>) -> pb::ModelInferRequest {
        pb::ModelInferRequest {
            model_name: "m".into(),
            inputs,
            raw_input_contents: raw.into_iter().map(bytes::Bytes::from).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn raw_and_typed_contents_decode_to_the_same_tensor() {
        let values = [1.0f32, 2.0, 3.5, -4.0];
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let typed = pb::InferTensorContents { fp32_contents: values.to_vec(), ..Default::default() };
        let (_, _, a) = decode_infer(request(vec![input("x", "FP32", vec![2, 2], None)], vec![raw])).expect("raw");
        let (_, _, b) =
            decode_infer(request(vec![input("x", "FP32", vec![2, 2], Some(typed))], vec![])).expect("typed");
        assert_eq!(a.inputs, b.inputs);
        assert_eq!(a.inputs[0].tensor.as_slice::<f32>().expect("fp32").as_ref(), &values);
    }

    #[test]
    fn narrow_integer_types_are_range_checked() {
        let c = pb::InferTensorContents { int_contents: vec![1, 300], ..Default::default() };
        let e = decode_infer(request(vec![input("x", "INT8", vec![2], Some(c))], vec![])).expect_err("out of range");
        assert!(e.to_string().contains("element 1 (300) is not a valid INT8"), "{e}");
        let c = pb::InferTensorContents { uint_contents: vec![7, 255], ..Default::default() };
        let (_, _, r) = decode_infer(request(vec![input("x", "UINT8", vec![2], Some(c))], vec![])).expect("uint8");
        assert_eq!(r.inputs[0].tensor.bytes(), &[7, 255]);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let fp32 = |n: usize| pb::InferTensorContents { fp32_contents: vec![0.0; n], ..Default::default() };
        let cases: Vec<(&str, pb::ModelInferRequest, &str)> = vec![
            (
                "raw count",
                request(vec![input("x", "FP32", vec![1], None)], vec![vec![0; 4], vec![0; 4]]),
                "2 entries for 1 inputs",
            ),
            ("raw length", request(vec![input("x", "FP32", vec![2], None)], vec![vec![0; 4]]), "needs 8 bytes, got 4"),
            ("no data", request(vec![input("x", "FP32", vec![2], None)], vec![]), "neither contents nor"),
            (
                "both",
                request(vec![input("x", "FP32", vec![1], Some(fp32(1)))], vec![vec![0; 4]]),
                "has contents and a raw",
            ),
            (
                "count",
                request(vec![input("x", "FP32", vec![3], Some(fp32(2)))], vec![]),
                "needs 3 elements, fp32_contents has 2",
            ),
            ("dtype", request(vec![input("x", "FLOAT", vec![1], Some(fp32(1)))], vec![]), "FLOAT"),
            ("fp16", request(vec![input("x", "FP16", vec![1], None)], vec![vec![0; 2]]), "not supported"),
            ("negative", request(vec![input("x", "FP32", vec![-1], None)], vec![vec![]]), "negative dimension"),
        ];
        for (case, req, want) in cases {
            let e = decode_infer(req).expect_err(case);
            assert!(e.to_string().contains(want), "{case}: {e}");
        }
    }

    #[test]
    fn parameters_timeout_version_and_outputs() {
        let mut req = request(vec![input("x", "INT64", vec![1], None)], vec![vec![0; 8]]);
        req.model_version = "3".into();
        req.id = "r1".into();
        req.parameters.insert("timeout".into(), int_parameter(2500));
        req.parameters.insert("priority".into(), int_parameter(1));
        req.outputs
            .push(pb::model_infer_request::InferRequestedOutputTensor { name: "y".into(), parameters: HashMap::new() });
        let (model, version, r) = decode_infer(req).expect("decodes");
        assert_eq!((model.as_str(), version.as_deref(), r.id.as_deref()), ("m", Some("3"), Some("r1")));
        assert_eq!(r.timeout, Some(Duration::from_micros(2500)));
        assert_eq!(r.parameters.get("priority"), Some(&Value::from(1)));
        assert_eq!(r.outputs.requested, Some(vec![("y".to_string(), true)]));
        let mut bad = request(vec![], vec![]);
        bad.parameters.insert("timeout".into(), string_parameter("soon"));
        assert!(decode_infer(bad).expect_err("bad timeout").to_string().contains("microseconds"));
    }

    #[test]
    fn outputs_encode_raw_in_the_selected_order() {
        let y = NamedTensor::new("y", Tensor::from_vec(vec![1, 2], vec![1.0f32, 2.0]).expect("y"));
        let z = NamedTensor::new("z", Tensor::from_vec(vec![1], vec![7i64]).expect("z"));
        let all =
            encode_infer("m", "1", Some("a"), HashMap::new(), vec![y.clone(), z.clone()], &OutputSelection::default())
                .expect("all");
        assert_eq!(all.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["y", "z"]);
        assert_eq!(all.raw_output_contents[1].as_ref(), &7i64.to_le_bytes());
        assert_eq!((all.id.as_str(), all.outputs[0].shape.as_slice()), ("a", &[1i64, 2][..]));
        let only_z = OutputSelection { requested: Some(vec![("z".into(), true)]), binary_default: true };
        let some = encode_infer("m", "1", None, HashMap::new(), vec![y.clone(), z.clone()], &only_z).expect("z");
        assert_eq!((some.outputs.len(), some.outputs[0].datatype.as_str()), (1, "INT64"));
        let typo = OutputSelection { requested: Some(vec![("q".into(), true)]), binary_default: true };
        assert!(encode_infer("m", "1", None, HashMap::new(), vec![y, z], &typo).is_err());
    }

    #[test]
    fn grpc_timeout_header() {
        let cases = [
            ("5S", Some(Duration::from_secs(5))),
            ("250m", Some(Duration::from_millis(250))),
            ("1H", Some(Duration::from_secs(3600))),
            ("100u", Some(Duration::from_micros(100))),
            ("7n", Some(Duration::from_nanos(7))),
            ("2M", Some(Duration::from_secs(120))),
            ("", None),
            ("S", None),
            ("12x", None),
            ("123456789S", None),
            ("-1S", None),
        ];
        for (value, want) in cases {
            assert_eq!(parse_grpc_timeout(value), want, "{value:?}");
        }
    }
}
