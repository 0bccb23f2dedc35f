//! The Open Inference Protocol (KServe v2) infer request and response, in JSON and with the binary
//! tensor data extension. Pure encoding and decoding: no sockets, no models.
//!
//! Binary extension: the body is a JSON header of `Inference-Header-Content-Length` bytes followed
//! by the raw tensors, in input order, of every input whose `parameters.binary_data_size` is set.
//! Outputs come back binary when the output's `binary_data` parameter, or the request's
//! `binary_data_output` parameter, is true.

use std::borrow::Cow;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use fabric_types::dtype::DataType;
use fabric_types::tensor::{NamedTensor, Tensor, TensorError};

/// The HTTP header carrying the JSON part's length in binary-extension bodies.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Why a request body is not a valid infer request (HTTP 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// Not JSON, or JSON of the wrong form.
    #[error("malformed infer request: {0}")]
    Malformed(String),
    /// An input's declaration or data is wrong.
    #[error("input '{name}': {reason}")]
    Input { name: String, reason: String },
    /// The binary section does not match the declared sizes.
    #[error("binary data: {0}")]
    Binary(String),
    /// A requested output the model does not have.
    #[error("unknown output '{name}': the model's outputs are {expected}")]
    UnknownOutput { name: String, expected: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestBody {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<RequestInput>,
    #[serde(default)]
    outputs: Option<Vec<RequestOutput>>,
}

struct RequestInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    parameters: Option<Map<String, Value>>,
    data: Option<InputData>,
}

/// One JSON element of an input's `data`.
#[derive(Clone, Copy, Debug)]
enum Scalar {
    Float(f64),
    Int(i64),
    Uint(u64),
    Bool(bool),
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Float(v) => write!(f, "{v}"),
            Scalar::Int(v) => write!(f, "{v}"),
            Scalar::Uint(v) => write!(f, "{v}"),
            Scalar::Bool(v) => write!(f, "{v}"),
        }
    }
}

/// An input's `data`, decoded while it is parsed, with no `serde_json::Value` tree in between (32
/// bytes and more per element). When `datatype` comes before `data`, as clients write it, the elements
/// go straight into little-endian bytes of that type; otherwise they are kept as 16-byte scalars and
/// converted once the datatype is known.
#[derive(Default)]
struct InputData {
    dtype: Option<DataType>,
    bytes: Vec<u8>,
    scalars: Vec<Scalar>,
    count: usize,
    /// The first element that does not fit the datatype.
    error: Option<String>,
}

impl InputData {
    fn push(&mut self, value: Scalar) {
        let index = self.count;
        self.count += 1;
        if self.error.is_some() {
            return;
        }
        match self.dtype {
            Some(dtype) => {
                if let Err(e) = push_scalar(dtype, index, value, &mut self.bytes) {
                    self.error = Some(e);
                }
            }
            None => self.scalars.push(value),
        }
    }

    fn not_a_number(&mut self, what: &str) {
        let index = self.count;
        self.count += 1;
        if self.error.is_none() {
            let dtype = self.dtype.map(|d| d.to_string()).unwrap_or_else(|| "number".into());
            self.error = Some(format!("element {index} ({what}) is not a valid {dtype}"));
        }
    }

    /// The elements as little-endian bytes of `dtype`.
    fn into_bytes(mut self, dtype: DataType) -> Result<Vec<u8>, String> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.dtype == Some(dtype) {
            return Ok(self.bytes);
        }
        let mut out = Vec::with_capacity(self.scalars.len() * dtype.size().unwrap_or(1));
        for (i, v) in std::mem::take(&mut self.scalars).into_iter().enumerate() {
            push_scalar(dtype, i, v, &mut out)?;
        }
        Ok(out)
    }
}

/// Reads `data` (nested arrays of numbers or booleans, or one scalar) into [`InputData`].
struct DataSeed(Option<DataType>);

impl<'de> serde::de::DeserializeSeed<'de> for DataSeed {
    type Value = InputData;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<InputData, D::Error> {
        let mut data = InputData { dtype: self.0, ..InputData::default() };
        deserializer.deserialize_any(ElementVisitor(&mut data))?;
        Ok(data)
    }
}

/// One element, or a nested array of them, appended to the data.
struct ElementVisitor<'a>(&'a mut InputData);

impl<'de> serde::de::DeserializeSeed<'de> for ElementVisitor<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ElementVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("numbers or booleans, in (nested) arrays")
    }
    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.0.push(Scalar::Bool(v));
        Ok(())
    }
    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.0.push(Scalar::Int(v));
        Ok(())
    }
    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.0.push(Scalar::Uint(v));
        Ok(())
    }
    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.0.push(Scalar::Float(v));
        Ok(())
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.0.not_a_number(&format!("{v:?}"));
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.not_a_number("null");
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(ElementVisitor(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

impl<'de> Deserialize<'de> for RequestInput {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(InputVisitor)
    }
}

/// An input object, with `data` decoded by the datatype declared before it (when it is).
struct InputVisitor;

const INPUT_FIELDS: &[&str] = &["name", "shape", "datatype", "parameters", "data"];

impl<'de> serde::de::Visitor<'de> for InputVisitor {
    type Value = RequestInput;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an input object with name, shape, datatype and data or parameters.binary_data_size")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<RequestInput, A::Error> {
        use serde::de::Error;
        let (mut name, mut shape, mut datatype, mut parameters, mut data) = (None, None, None, None, None);
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let duplicate = match key.as_ref() {
                "name" => name.replace(map.next_value::<String>()?).is_some(),
                "shape" => shape.replace(map.next_value::<Vec<i64>>()?).is_some(),
                "datatype" => datatype.replace(map.next_value::<String>()?).is_some(),
                "parameters" => parameters.replace(map.next_value::<Option<Map<String, Value>>>()?).is_some(),
                "data" => {
                    let dtype = datatype.as_deref().and_then(|d: &str| d.parse::<DataType>().ok());
                    data.replace(map.next_value_seed(DataSeed(dtype))?).is_some()
                }
                other => return Err(A::Error::unknown_field(other, INPUT_FIELDS)),
            };
            if duplicate {
                return Err(A::Error::custom(format!("duplicate field `{key}`")));
            }
        }
        Ok(RequestInput {
            name: name.ok_or_else(|| A::Error::missing_field("name"))?,
            shape: shape.ok_or_else(|| A::Error::missing_field("shape"))?,
            datatype: datatype.ok_or_else(|| A::Error::missing_field("datatype"))?,
            parameters: parameters.flatten(),
            data,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// Which outputs to return, and which of them as binary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputSelection {
    /// Requested outputs and whether each is binary; `None` means all outputs.
    pub requested: Option<Vec<(String, bool)>>,
    /// Binary for outputs without their own setting (`binary_data_output`).
    pub binary_default: bool,
}

/// A decoded infer request.
#[derive(Debug)]
pub struct DecodedRequest {
    /// The request id, echoed in the response.
    pub id: Option<String>,
    /// Input tensors, as named in the request.
    pub inputs: Vec<NamedTensor>,
    /// Which outputs to return, and how.
    pub outputs: OutputSelection,
    /// The `timeout` parameter (microseconds, as Triton has it).
    pub timeout: Option<Duration>,
    /// Request parameters other than those the fabric interprets.
    pub parameters: Map<String, Value>,
}

fn param_bool(params: &Option<Map<String, Value>>, key: &str) -> Option<bool> {
    params.as_ref().and_then(|p| p.get(key)).and_then(Value::as_bool)
}

/// Appends one JSON element as little-endian bytes of `dtype` (element `index`, for the message).
fn push_scalar(dtype: DataType, index: usize, v: Scalar, out: &mut Vec<u8>) -> Result<(), String> {
    let bad = || format!("element {index} ({v}) is not a valid {dtype}");
    macro_rules! int {
        ($t:ty) => {{
            let n: $t = match v {
                Scalar::Int(x) => <$t>::try_from(x).map_err(|_| bad())?,
                Scalar::Uint(x) => <$t>::try_from(x).map_err(|_| bad())?,
                _ => return Err(bad()),
            };
            out.extend_from_slice(&n.to_le_bytes());
        }};
    }
    let float = || match v {
        Scalar::Float(x) => Ok(x),
        Scalar::Int(x) => Ok(x as f64),
        Scalar::Uint(x) => Ok(x as f64),
        Scalar::Bool(_) => Err(bad()),
    };
    match dtype {
        DataType::Bool => match v {
            Scalar::Bool(b) => out.push(u8::from(b)),
            _ => return Err(bad()),
        },
        DataType::Fp32 => out.extend_from_slice(&(float()? as f32).to_le_bytes()),
        DataType::Fp64 => out.extend_from_slice(&float()?.to_le_bytes()),
        DataType::Int8 => int!(i8),
        DataType::Int16 => int!(i16),
        DataType::Int32 => int!(i32),
        DataType::Int64 => int!(i64),
        DataType::Uint8 => int!(u8),
        DataType::Uint16 => int!(u16),
        DataType::Uint32 => int!(u32),
        DataType::Uint64 => int!(u64),
        DataType::Fp16 | DataType::Bytes => return Err(format!("datatype {dtype} is not supported")),
    }
    Ok(())
}

/// An input's declared datatype and shape, checked: a served datatype, no negative dimension (both
/// faces, REST and gRPC, declare inputs alike).
pub(crate) fn input_declaration(
    name: &str,
    datatype: &str,
    shape: &[i64],
) -> Result<(DataType, Vec<usize>), CodecError> {
    let err = |reason: String| CodecError::Input { name: name.to_string(), reason };
    let dtype: DataType = datatype.parse().map_err(|e: fabric_types::dtype::UnknownDataType| err(e.to_string()))?;
    if !dtype.is_served() {
        return Err(err(TensorError::UnsupportedDataType(dtype).to_string()));
    }
    let dims = shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| err(format!("shape {shape:?} has a negative dimension"))))
        .collect::<Result<_, _>>()?;
    Ok((dtype, dims))
}

/// Decodes a request body; `header_length` is the `Inference-Header-Content-Length` value if present.
pub fn decode_request(body: &[u8], header_length: Option<usize>) -> Result<DecodedRequest, CodecError> {
    let (json, mut binary) = match header_length {
        Some(n) if n > body.len() => {
            return Err(CodecError::Binary(format!(
                "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                body.len()
            )))
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let request: RequestBody = serde_json::from_slice(json).map_err(|e| CodecError::Malformed(e.to_string()))?;
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let err = |reason: String| CodecError::Input { name: input.name.clone(), reason };
        let (dtype, shape) = input_declaration(&input.name, &input.datatype, &input.shape)?;
        let binary_size = input.parameters.as_ref().and_then(|p| p.get("binary_data_size"));
        let bytes = match (binary_size, input.data) {
            (Some(size), None) => {
                let size = size
                    .as_u64()
                    .and_then(|s| usize::try_from(s).ok())
                    .ok_or_else(|| err(format!("binary_data_size {size} is not a byte count")))?;
                if header_length.is_none() {
                    return Err(err(
                        "binary_data_size is set but the request has no Inference-Header-Content-Length header".into(),
                    ));
                }
                if size > binary.len() {
                    return Err(CodecError::Binary(format!(
                        "input '{}' declares {size} bytes but only {} remain in the body",
                        input.name,
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                mine.to_vec()
            }
            (None, Some(data)) => {
                let want = shape
                    .iter()
                    .try_fold(1usize, |a, &d| a.checked_mul(d))
                    .ok_or_else(|| err("shape is too large".into()))?;
                if data.count != want {
                    return Err(err(format!("shape {:?} needs {want} elements, data has {}", input.shape, data.count)));
                }
                data.into_bytes(dtype).map_err(err)?
            }
            (Some(_), Some(_)) => return Err(err("has both data and binary_data_size".into())),
            (None, None) => return Err(err("has neither data nor binary_data_size".into())),
        };
        let tensor = Tensor::from_bytes(dtype, shape, bytes).map_err(|e| err(e.to_string()))?;
        inputs.push(NamedTensor::new(input.name, tensor));
    }
    if !binary.is_empty() {
        return Err(CodecError::Binary(format!(
            "{} bytes in the body are not claimed by any input's binary_data_size",
            binary.len()
        )));
    }
    let mut parameters = request.parameters.unwrap_or_default();
    let binary_default = parameters.remove("binary_data_output").and_then(|v| v.as_bool()).unwrap_or(false);
    let timeout = match parameters.remove("timeout") {
        None => None,
        Some(v) => Some(Duration::from_micros(
            v.as_u64()
                .ok_or_else(|| CodecError::Malformed(format!("parameter timeout must be microseconds, got {v}")))?,
        )),
    };
    let requested = request.outputs.map(|outs| {
        outs.into_iter()
            .map(|o| {
                let binary = param_bool(&o.parameters, "binary_data").unwrap_or(binary_default);
                (o.name, binary)
            })
            .collect()
    });
    Ok(DecodedRequest {
        id: request.id,
        inputs,
        outputs: OutputSelection { requested, binary_default },
        timeout,
        parameters,
    })
}

#[derive(Serialize)]
#[serde(untagged)]
enum JsonData<'a> {
    F32(Cow<'a, [f32]>),
    F64(Cow<'a, [f64]>),
    I8(Cow<'a, [i8]>),
    I16(Cow<'a, [i16]>),
    I32(Cow<'a, [i32]>),
    I64(Cow<'a, [i64]>),
    U8(Cow<'a, [u8]>),
    U16(Cow<'a, [u16]>),
    U32(Cow<'a, [u32]>),
    U64(Cow<'a, [u64]>),
    Bool(Vec<bool>),
}

fn json_data(t: &Tensor) -> Result<JsonData<'_>, TensorError> {
    Ok(match t.dtype() {
        DataType::Fp32 => JsonData::F32(t.as_slice()?),
        DataType::Fp64 => JsonData::F64(t.as_slice()?),
        DataType::Int8 => JsonData::I8(t.as_slice()?),
        DataType::Int16 => JsonData::I16(t.as_slice()?),
        DataType::Int32 => JsonData::I32(t.as_slice()?),
        DataType::Int64 => JsonData::I64(t.as_slice()?),
        DataType::Uint8 => JsonData::U8(t.as_slice()?),
        DataType::Uint16 => JsonData::U16(t.as_slice()?),
        DataType::Uint32 => JsonData::U32(t.as_slice()?),
        DataType::Uint64 => JsonData::U64(t.as_slice()?),
        DataType::Bool => JsonData::Bool(t.bytes().iter().map(|b| *b != 0).collect()),
        other => return Err(TensorError::UnsupportedDataType(other)),
    })
}

#[derive(Serialize)]
struct ResponseOutput<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(Serialize)]
struct ResponseBody<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    parameters: &'a Map<String, Value>,
    outputs: Vec<ResponseOutput<'a>>,
}

/// Refuses a selection that names an output the model does not have: called before inference too, so
/// a typo costs a 400, not an engine run.
pub fn check_outputs<'a>(
    selection: &OutputSelection,
    outputs: impl Iterator<Item = &'a str> + Clone,
) -> Result<(), CodecError> {
    for (name, _) in selection.requested.iter().flatten() {
        if !outputs.clone().any(|o| o == name) {
            let expected = outputs.map(|o| format!("'{o}'")).collect::<Vec<_>>().join(", ");
            return Err(CodecError::UnknownOutput { name: name.clone(), expected });
        }
    }
    Ok(())
}

/// An encoded response: the body, and the JSON part's length when binary data follows it.
#[derive(Debug)]
pub struct EncodedResponse {
    /// The whole body.
    pub body: Vec<u8>,
    /// `Some(n)` for binary-extension bodies: the value of `Inference-Header-Content-Length`.
    pub header_length: Option<usize>,
}

/// Encodes the outputs (all of them, in graph order) as the selection asks.
pub fn encode_response(
    model: &str,
    version: &str,
    id: Option<&str>,
    parameters: &Map<String, Value>,
    outputs: &[NamedTensor],
    selection: &OutputSelection,
) -> Result<EncodedResponse, CodecError> {
    check_outputs(selection, outputs.iter().map(|o| o.name.as_str()))?;
    let chosen: Vec<(&NamedTensor, bool)> = match &selection.requested {
        None => outputs.iter().map(|o| (o, selection.binary_default)).collect(),
        Some(requested) => requested
            .iter()
            .map(|(name, binary)| {
                outputs.iter().find(|o| &o.name == name).map(|o| (o, *binary)).ok_or_else(|| {
                    CodecError::UnknownOutput {
                        name: name.clone(),
                        expected: outputs.iter().map(|o| format!("'{}'", o.name)).collect::<Vec<_>>().join(", "),
                    }
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let mut binary_parts: Vec<&[u8]> = Vec::new();
    let mut body_outputs = Vec::with_capacity(chosen.len());
    for (output, binary) in &chosen {
        let t = &output.tensor;
        let (parameters, data) = if *binary {
            binary_parts.push(t.bytes());
            (Some(serde_json::json!({ "binary_data_size": t.bytes().len() })), None)
        } else {
            (None, Some(json_data(t).map_err(|e| CodecError::Malformed(e.to_string()))?))
        };
        body_outputs.push(ResponseOutput {
            name: &output.name,
            datatype: t.dtype().as_str(),
            shape: t.shape(),
            parameters,
            data,
        });
    }
    let body = ResponseBody { model_name: model, model_version: version, id, parameters, outputs: body_outputs };
    let mut bytes = serde_json::to_vec(&body).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if binary_parts.is_empty() {
        return Ok(EncodedResponse { body: bytes, header_length: None });
    }
    let header_length = bytes.len();
    bytes.reserve(binary_parts.iter().map(|p| p.len()).sum());
    for part in binary_parts {
        bytes.extend_from_slice(part);
    }
    Ok(EncodedResponse { body: bytes, header_length: Some(header_length) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_with_binary(json: &str, tail: &[u8]) -> (Vec<u8>, Option<usize>) {
        let mut b = json.as_bytes().to_vec();
        b.extend_from_slice(tail);
        (b, Some(json.len()))
    }

    #[test]
    fn json_flat_and_nested_data() {
        let flat = r#"{"id":"7","inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4.5]}]}"#;
        let nested = r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]}]}"#;
        // `data` before `datatype`: kept as scalars, converted once the datatype is known.
        let data_first = r#"{"inputs":[{"data":[[1,2],[3,4.5]],"name":"x","shape":[2,2],"datatype":"FP32"}]}"#;
        for body in [flat, nested, data_first] {
            let req = decode_request(body.as_bytes(), None).expect("valid");
            assert_eq!(req.inputs[0].tensor.as_slice::<f32>().expect("f32").to_vec(), vec![1.0, 2.0, 3.0, 4.5]);
        }
        assert_eq!(decode_request(flat.as_bytes(), None).expect("valid").id.as_deref(), Some("7"));
        let bools = r#"{"inputs":[{"name":"b","shape":[2],"datatype":"BOOL","data":[true,false]}]}"#;
        assert_eq!(decode_request(bools.as_bytes(), None).expect("valid").inputs[0].tensor.bytes(), &[1, 0]);
    }

    #[test]
    fn binary_inputs_and_parameters() {
        let json = r#"{"inputs":[{"name":"a","shape":[2],"datatype":"INT32","parameters":{"binary_data_size":8}},
                      {"name":"b","shape":[1],"datatype":"FP64","data":[0.25]}],
                      "outputs":[{"name":"y","parameters":{"binary_data":false}},{"name":"z"}],
                      "parameters":{"binary_data_output":true,"timeout":2500,"custom":1}}"#;
        let mut tail = Vec::new();
        tail.extend_from_slice(&5i32.to_le_bytes());
        tail.extend_from_slice(&(-6i32).to_le_bytes());
        let (body, len) = body_with_binary(json, &tail);
        let req = decode_request(&body, len).expect("valid");
        assert_eq!(req.inputs[0].tensor.as_slice::<i32>().expect("i32").to_vec(), vec![5, -6]);
        assert_eq!(req.inputs[1].tensor.as_slice::<f64>().expect("f64").to_vec(), vec![0.25]);
        assert_eq!(req.timeout, Some(Duration::from_micros(2500)));
        assert_eq!(req.outputs.requested, Some(vec![("y".into(), false), ("z".into(), true)]));
        assert!(req.parameters.contains_key("custom") && !req.parameters.contains_key("timeout"));
    }

    #[test]
    fn malformed_requests_table() {
        let one = r#"{"inputs":[{"name":"a","shape":[2],"datatype":"INT32","parameters":{"binary_data_size":8}}]}"#;
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<u8>, Option<usize>, &str)> = vec![
            ("not json", b"{nope".to_vec(), None, "malformed infer request"),
            ("not an infer request", br#"{"hello":1}"#.to_vec(), None, "malformed infer request"),
            ("unknown dtype", br#"{"inputs":[{"name":"a","shape":[1],"datatype":"FLOAT","data":[1]}]}"#.to_vec(), None, "input 'a': unknown datatype 'FLOAT'"),
            ("fp16 refused", br#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP16","data":[1]}]}"#.to_vec(), None, "datatype FP16 is not supported"),
            ("bytes refused", br#"{"inputs":[{"name":"a","shape":[1],"datatype":"BYTES","data":["x"]}]}"#.to_vec(), None, "datatype BYTES is not supported"),
            ("count mismatch", br#"{"inputs":[{"name":"a","shape":[2,2],"datatype":"FP32","data":[1,2,3]}]}"#.to_vec(), None, "shape [2, 2] needs 4 elements, data has 3"),
            ("wrong element", br#"{"inputs":[{"name":"a","shape":[1],"datatype":"INT8","data":[300]}]}"#.to_vec(), None, "element 0 (300) is not a valid INT8"),
            ("wrong element, data first", br#"{"inputs":[{"name":"a","data":[1,-1],"shape":[2],"datatype":"UINT8"}]}"#.to_vec(), None, "element 1 (-1) is not a valid UINT8"),
            ("a string element", br#"{"inputs":[{"name":"a","shape":[2],"datatype":"FP32","data":[1,"x"]}]}"#.to_vec(), None, "element 1 (\"x\") is not a valid FP32"),
            ("duplicate field", br#"{"inputs":[{"name":"a","name":"b","shape":[1],"datatype":"FP32","data":[1]}]}"#.to_vec(), None, "duplicate field `name`"),
            ("unknown input field", br#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","data":[1],"x":1}]}"#.to_vec(), None, "unknown field `x`"),
            ("negative dim", br#"{"inputs":[{"name":"a","shape":[-1],"datatype":"FP32","data":[1]}]}"#.to_vec(), None, "negative dimension"),
            ("no data", br#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32"}]}"#.to_vec(), None, "has neither data nor binary_data_size"),
            ("binary too short", body_with_binary(one, &[0; 4]).0, Some(one.len()), "declares 8 bytes but only 4 remain"),
            ("binary too long", body_with_binary(one, &[0; 12]).0, Some(one.len()), "4 bytes in the body are not claimed"),
            ("header length past body", b"{}".to_vec(), Some(10), "Inference-Header-Content-Length is 10 but the body has only 2 bytes"),
            ("binary without header", one.as_bytes().to_vec(), None, "no Inference-Header-Content-Length header"),
            ("bad timeout", br#"{"inputs":[],"parameters":{"timeout":"soon"}}"#.to_vec(), None, "parameter timeout must be microseconds"),
        ];
        for (label, body, len, want) in cases {
            let err = decode_request(&body, len).map(|_| ()).expect_err(label).to_string();
            assert!(err.contains(want), "{label}: {err}");
        }
    }

    #[test]
    fn responses_json_and_binary() {
        let outputs = vec![
            NamedTensor::new("p", Tensor::from_vec(vec![1, 2], vec![0.1f32, 0.9]).expect("t")),
            NamedTensor::new("label", Tensor::from_vec(vec![1], vec![1i64]).expect("t")),
        ];
        let params = Map::new();
        let all_json =
            encode_response("m", "1", Some("r1"), &params, &outputs, &OutputSelection::default()).expect("encode");
        assert_eq!(all_json.header_length, None);
        let v: Value = serde_json::from_slice(&all_json.body).expect("json");
        assert_eq!(v["id"], "r1");
        assert_eq!(v["outputs"][0]["data"][0].as_f64().map(|x| x as f32), Some(0.1f32));
        assert_eq!(v["outputs"][1]["datatype"], "INT64");

        let sel = OutputSelection { requested: Some(vec![("label".into(), true)]), binary_default: false };
        let bin = encode_response("m", "1", None, &params, &outputs, &sel).expect("encode");
        let n = bin.header_length.expect("binary");
        let head: Value = serde_json::from_slice(&bin.body[..n]).expect("json");
        assert_eq!(head["outputs"].as_array().map(Vec::len), Some(1));
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(&bin.body[n..], &1i64.to_le_bytes());

        let unknown = OutputSelection { requested: Some(vec![("nope".into(), false)]), binary_default: false };
        let err = encode_response("m", "1", None, &params, &outputs, &unknown).map(|_| ()).expect_err("unknown");
        assert_eq!(err.to_string(), "unknown output 'nope': the model's outputs are 'p', 'label'");
    }
}
