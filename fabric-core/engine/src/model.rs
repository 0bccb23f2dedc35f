//! Model metadata (the inputs and outputs a model file declares) and request validation against it.
//!
//! Metadata is read from the ONNX file itself, not from either engine, so both engines and the HTTP
//! layer agree on names, data types and shapes, and a request is checked once before any engine sees it.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tract_onnx::pb;
use tract_onnx::prelude::{Framework, InferenceModelExt};

use fabric_types::dtype::DataType;
use fabric_types::tensor::{NamedTensor, Tensor, TensorError};

/// One declared input or output: name, data type and shape (`-1` for a dynamic dimension).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Name as in the model graph.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Dimensions; -1 marks a dynamic one (an output whose shape is unknown is `[-1]`).
    pub shape: Vec<i64>,
    /// The symbol naming the leading dimension, when it is dynamic and known (e.g. `N`). Whether a
    /// model can be batched is decided by these symbols, not by `-1`s (see [`ModelMetadata::is_batched`]).
    #[serde(skip)]
    pub leading: Option<String>,
}

impl TensorSpec {
    /// A spec without symbols: every dynamic leading dimension counts as the batch symbol `N`.
    pub fn new(name: impl Into<String>, datatype: DataType, shape: Vec<i64>) -> TensorSpec {
        let leading = (shape.first() == Some(&-1)).then(|| BATCH_SYMBOL.to_string());
        TensorSpec { name: name.into(), datatype, shape, leading }
    }

    /// Whether the leading dimension is dynamic: a request's rows are counted along it.
    pub fn has_dynamic_leading(&self) -> bool {
        self.shape.first() == Some(&-1)
    }

    /// A concrete shape: `rows` for a dynamic leading dimension, 1 for other dynamic ones.
    pub fn shape_with_rows(&self, rows: usize) -> Vec<usize> {
        self.shape
            .iter()
            .enumerate()
            .map(|(axis, &d)| match usize::try_from(d) {
                Ok(n) => n,
                Err(_) if axis == 0 => rows,
                Err(_) => 1,
            })
            .collect()
    }

    /// The dimensions after the leading one (empty for scalars).
    pub fn inner_dims(&self) -> &[i64] {
        self.shape.get(1..).unwrap_or(&[])
    }
}

/// The name given to an unnamed dynamic leading input dimension when no input names its own.
pub const BATCH_SYMBOL: &str = "N";

/// The inputs and outputs of a model, in graph order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelMetadata {
    /// Graph inputs that are fed by the caller (initializers excluded).
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs.
    pub outputs: Vec<TensorSpec>,
}

/// Why a model file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    /// No file at the path.
    #[error("model file {path} does not exist")]
    Missing { path: String },
    /// The file exists but cannot be read.
    #[error("cannot read model file {path}: {reason}")]
    Unreadable { path: String, reason: String },
    /// The bytes are not an ONNX model.
    #[error("model file {path} is corrupt or not an ONNX model: {reason}")]
    Corrupt { path: String, reason: String },
    /// A declared input or output uses a data type the fabric does not serve.
    #[error("model file {path}: {kind} '{name}' has datatype {datatype}, which this fabric does not serve (use FP32, FP64, BOOL or an integer type)")]
    UnservedType { path: String, kind: &'static str, name: String, datatype: String },
    /// The model declares an operator-set version of the ONNX standard that does not exist yet.
    #[error("model file {path} declares ONNX operator set {opset}, newer than any this fabric knows (newest: {NEWEST_ONNX_OPSET}); re-export it with an older opset (e.g. torch.onnx.export(..., opset_version=17))")]
    UnknownOpset { path: String, opset: i64 },
}

/// The newest operator set of the ONNX standard known here (onnx 1.23, the version
/// scripts/requirements.txt installs). A model declaring a newer one is refused at load: an engine
/// would otherwise run it with the semantics of an older set (tract only warns).
pub const NEWEST_ONNX_OPSET: i64 = 28;

/// Why a request's tensors do not fit the model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    /// A tensor name the model does not have.
    #[error("unknown input '{name}': the model's inputs are {expected}")]
    UnknownInput { name: String, expected: String },
    /// A model input with no tensor.
    #[error("missing input '{name}': the model needs {expected}")]
    MissingInput { name: String, expected: String },
    /// The same input twice.
    #[error("input '{name}' is given more than once")]
    DuplicateInput { name: String },
    /// Wrong element type.
    #[error("input '{name}' has datatype {got}, the model expects {expected}")]
    WrongDataType { name: String, expected: DataType, got: DataType },
    /// Wrong number of dimensions.
    #[error("input '{name}' has shape {got:?} (rank {}), the model expects {} (rank {})", got.len(), ShapeDisplay(expected), expected.len())]
    WrongRank { name: String, expected: Vec<i64>, got: Vec<usize> },
    /// A fixed dimension with the wrong size.
    #[error(
        "input '{name}' has shape {got:?}, the model expects {} (dimension {axis} must be {want})",
        ShapeDisplay(expected)
    )]
    WrongDims { name: String, expected: Vec<i64>, got: Vec<usize>, axis: usize, want: i64 },
    /// Inputs disagree on the batch size.
    #[error("inputs disagree on the batch size: '{first}' has {first_batch}, '{name}' has {batch}")]
    BatchMismatch { first: String, first_batch: usize, name: String, batch: usize },
    /// A request with zero rows: nothing to infer.
    #[error("input '{name}' has 0 rows: send at least one row")]
    NoRows { name: String },
    /// A batch larger than the model accepts.
    #[error("batch of {got} exceeds this model's maximum batch size of {max}")]
    BatchTooLarge { got: usize, max: usize },
    /// The bytes do not form a tensor.
    #[error("input '{name}': {source}")]
    Tensor { name: String, source: TensorError },
}

/// Formats a spec shape as `[-1, 784]`.
pub struct ShapeDisplay<'a>(pub &'a [i64]);

impl fmt::Display for ShapeDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Reads an ONNX model file into its raw bytes and protobuf, with clear errors for missing and corrupt files.
pub fn read_onnx(path: &Path) -> Result<(Vec<u8>, pb::ModelProto), ModelFileError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ModelFileError::Missing { path: shown.clone() },
        _ => ModelFileError::Unreadable { path: shown.clone(), reason: e.to_string() },
    })?;
    let mut proto = tract_onnx::onnx()
        .proto_model_for_read(&mut bytes.as_slice())
        .map_err(|e| ModelFileError::Corrupt { path: shown.clone(), reason: format!("{e:#}") })?;
    if proto.graph.as_ref().is_none_or(|g| g.output.is_empty()) {
        return Err(ModelFileError::Corrupt { path: shown, reason: "the file holds no graph with outputs".into() });
    }
    let standard = |domain: &str| domain.is_empty() || domain == "ai.onnx";
    if let Some(opset) = proto.opset_import.iter().find(|o| standard(&o.domain) && o.version > NEWEST_ONNX_OPSET) {
        return Err(ModelFileError::UnknownOpset { path: shown, opset: opset.version });
    }
    name_dynamic_dims(&mut proto);
    Ok((bytes, proto))
}

/// Gives every unnamed dynamic dimension of the graph inputs a symbol, as most exporters leave them
/// unnamed (`None` in skl2onnx, torch's dynamic axes) and tract cannot load an input it knows nothing of.
///
/// An unnamed leading dimension becomes the batch symbol: the name the other inputs give their
/// leading dimension, else [`BATCH_SYMBOL`] (or another free name if the model uses that one elsewhere).
/// Other unnamed dimensions get names of their own. Returns the batch symbol.
pub fn name_dynamic_dims(proto: &mut pb::ModelProto) -> String {
    use pb::tensor_shape_proto::dimension::Value;
    let Some(graph) = proto.graph.as_mut() else {
        return BATCH_SYMBOL.to_string();
    };
    let initializers: std::collections::HashSet<String> = graph.initializer.iter().map(|t| t.name.clone()).collect();
    let dims_of = |v: &pb::ValueInfoProto| -> Vec<Option<Value>> {
        match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(pb::type_proto::Value::TensorType(t)) => {
                t.shape.as_ref().map(|s| s.dim.iter().map(|d| d.value.clone()).collect()).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    };
    let used: std::collections::HashSet<String> = graph
        .input
        .iter()
        .chain(graph.output.iter())
        .flat_map(|v| dims_of(v))
        .filter_map(|d| match d {
            Some(Value::DimParam(p)) if !p.is_empty() => Some(p),
            _ => None,
        })
        .collect();
    let named_leading = graph.input.iter().filter(|v| !initializers.contains(&v.name)).find_map(|v| {
        match dims_of(v).into_iter().next() {
            Some(Some(Value::DimParam(p))) if !p.is_empty() => Some(p),
            _ => None,
        }
    });
    let batch = named_leading.unwrap_or_else(|| {
        ["N", "batch", "fabric_batch"].into_iter().find(|n| !used.contains(*n)).unwrap_or("fabric_batch").to_string()
    });
    let mut fresh = 0;
    for input in graph.input.iter_mut().filter(|v| !initializers.contains(&v.name)) {
        let Some(pb::type_proto::Value::TensorType(t)) = input.r#type.as_mut().and_then(|t| t.value.as_mut()) else {
            continue;
        };
        let Some(shape) = t.shape.as_mut() else { continue };
        for (axis, dim) in shape.dim.iter_mut().enumerate() {
            let unnamed = match &dim.value {
                None => true,
                Some(Value::DimParam(p)) => p.is_empty() || p == "?" || p.starts_with("unk__"),
                Some(Value::DimValue(n)) => *n < 0,
            };
            if unnamed {
                let name = if axis == 0 {
                    batch.clone()
                } else {
                    fresh += 1;
                    format!("fabric_dim{fresh}")
                };
                dim.value = Some(Value::DimParam(name));
            }
        }
    }
    batch
}

/// The shapes tract infers for the graph outputs (`None` where it cannot tell), with the symbol of each
/// output's leading dimension. `None` when tract cannot type the graph (an operator it lacks, say).
fn inferred_outputs(proto: &pb::ModelProto) -> Option<Vec<Option<(Vec<i64>, Option<String>)>>> {
    let typed = tract_onnx::onnx().model_for_proto_model(proto).ok()?.into_typed().ok()?;
    let outlets = typed.output_outlets().ok()?.to_vec();
    Some(
        outlets
            .iter()
            .map(|outlet| {
                let fact = typed.outlet_fact(*outlet).ok()?;
                let dims: Vec<i64> = fact.shape.iter().map(|d| d.to_i64().unwrap_or(-1)).collect();
                let leading = match fact.shape.iter().next() {
                    Some(tract_onnx::prelude::TDim::Sym(s)) => Some(s.to_string()),
                    _ => None,
                };
                Some((dims, leading))
            })
            .collect(),
    )
}

impl ModelMetadata {
    /// Reads the declared inputs and outputs from a parsed ONNX model.
    pub fn from_proto(proto: &pb::ModelProto, path: &Path) -> Result<ModelMetadata, ModelFileError> {
        let shown = path.display().to_string();
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| ModelFileError::Corrupt { path: shown.clone(), reason: "no graph".into() })?;
        let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let spec = |v: &pb::ValueInfoProto, kind: &'static str| -> Result<TensorSpec, ModelFileError> {
            let Some(pb::type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
                return Err(ModelFileError::UnservedType {
                    path: shown.clone(),
                    kind,
                    name: v.name.clone(),
                    datatype: "a non-tensor type (sequence or map)".into(),
                });
            };
            let datatype = DataType::from_onnx(t.elem_type).ok_or_else(|| ModelFileError::UnservedType {
                path: shown.clone(),
                kind,
                name: v.name.clone(),
                datatype: format!("ONNX type code {}", t.elem_type),
            })?;
            if !datatype.is_served() {
                return Err(ModelFileError::UnservedType {
                    path: shown.clone(),
                    kind,
                    name: v.name.clone(),
                    datatype: datatype.to_string(),
                });
            }
            use pb::tensor_shape_proto::dimension::Value;
            let Some(declared) = t.shape.as_ref() else {
                // No shape at all: rank unknown, reported as one dynamic dimension.
                return Ok(TensorSpec { name: v.name.clone(), datatype, shape: vec![-1], leading: None });
            };
            let shape = declared
                .dim
                .iter()
                .map(|d| match d.value {
                    Some(Value::DimValue(n)) if n >= 0 => n,
                    _ => -1,
                })
                .collect();
            let leading = match declared.dim.first().and_then(|d| d.value.as_ref()) {
                Some(Value::DimParam(p)) if !p.is_empty() && p != "?" && !p.starts_with("unk__") => Some(p.clone()),
                _ => None,
            };
            Ok(TensorSpec { name: v.name.clone(), datatype, shape, leading })
        };
        let inputs: Vec<TensorSpec> = graph
            .input
            .iter()
            .filter(|v| !initializers.contains(v.name.as_str()))
            .map(|v| spec(v, "input"))
            .collect::<Result<_, _>>()?;
        let mut outputs: Vec<TensorSpec> = graph.output.iter().map(|v| spec(v, "output")).collect::<Result<_, _>>()?;
        // An output whose leading dimension the file leaves unnamed (or whose shape it omits) may still
        // be batch-major: ask tract's shape inference, which follows the input symbols through the graph.
        let unknown = |o: &TensorSpec| o.leading.is_none() && o.shape.first() == Some(&-1);
        if outputs.iter().any(unknown) {
            if let Some(inferred) = inferred_outputs(proto) {
                for (spec, found) in outputs.iter_mut().zip(inferred) {
                    if let (true, Some((dims, leading))) = (unknown(spec), found) {
                        if spec.shape == [-1] && !dims.is_empty() {
                            spec.shape = dims; // shapeless in the file: the inferred rank and sizes
                        }
                        spec.leading = leading;
                    }
                }
            }
        }
        Ok(ModelMetadata { inputs, outputs })
    }

    /// Whether requests can share a batch: every input and every output leads with the same dynamic
    /// symbol. Anything else (a fixed or differently named first dimension, a scalar output, an output
    /// of unknown shape, an input without a batch dimension) is served one request at a time, since
    /// splitting its outputs by rows would hand rows to the wrong requests.
    pub fn is_batched(&self) -> bool {
        let Some(symbol) = self.inputs.first().and_then(|s| s.leading.as_deref()) else {
            return false;
        };
        let leads = |s: &TensorSpec| s.leading.as_deref() == Some(symbol) && s.has_dynamic_leading();
        self.inputs.iter().all(leads) && !self.outputs.is_empty() && self.outputs.iter().all(leads)
    }

    /// Outputs in graph order, with their names.
    pub fn name_outputs(&self, outputs: Vec<Tensor>) -> Vec<NamedTensor> {
        self.outputs.iter().zip(outputs).map(|(spec, t)| NamedTensor::new(spec.name.clone(), t)).collect()
    }

    /// Inputs in graph order, with their names.
    pub fn name_inputs(&self, inputs: Vec<Tensor>) -> Vec<NamedTensor> {
        self.inputs.iter().zip(inputs).map(|(spec, t)| NamedTensor::new(spec.name.clone(), t)).collect()
    }

    fn input_names(&self) -> String {
        let names: Vec<String> = self.inputs.iter().map(|s| format!("'{}'", s.name)).collect();
        names.join(", ")
    }

    /// Checks named tensors against the declared inputs and returns them in graph order with the batch size.
    ///
    /// `max_batch` is enforced only for batched models (dynamic leading dimension).
    pub fn validate<'a>(
        &self,
        inputs: &'a [NamedTensor],
        max_batch: usize,
    ) -> Result<(Vec<&'a Tensor>, usize), InputError> {
        let (order, batch) = self.check(inputs, max_batch)?;
        Ok((order.into_iter().map(|i| &inputs[i].tensor).collect(), batch))
    }

    /// Like [`validate`](Self::validate), but takes the tensors and returns them in graph order without copying.
    pub fn into_ordered(&self, inputs: Vec<NamedTensor>, max_batch: usize) -> Result<(Vec<Tensor>, usize), InputError> {
        let (order, batch) = self.check(&inputs, max_batch)?;
        let mut slots: Vec<Option<Tensor>> = inputs.into_iter().map(|t| Some(t.tensor)).collect();
        Ok((order.into_iter().filter_map(|i| slots[i].take()).collect(), batch))
    }

    /// Validates and returns, for each declared input in graph order, the index of its tensor in `inputs`.
    fn check(&self, inputs: &[NamedTensor], max_batch: usize) -> Result<(Vec<usize>, usize), InputError> {
        for (i, given) in inputs.iter().enumerate() {
            if !self.inputs.iter().any(|s| s.name == given.name) {
                return Err(InputError::UnknownInput { name: given.name.clone(), expected: self.input_names() });
            }
            if inputs[..i].iter().any(|other| other.name == given.name) {
                return Err(InputError::DuplicateInput { name: given.name.clone() });
            }
        }
        let mut order = Vec::with_capacity(self.inputs.len());
        let mut batch: Option<(&str, usize)> = None;
        for spec in &self.inputs {
            let index = inputs
                .iter()
                .position(|t| t.name == spec.name)
                .ok_or_else(|| InputError::MissingInput { name: spec.name.clone(), expected: self.input_names() })?;
            let t = &inputs[index].tensor;
            if t.dtype() != spec.datatype {
                return Err(InputError::WrongDataType {
                    name: spec.name.clone(),
                    expected: spec.datatype,
                    got: t.dtype(),
                });
            }
            if t.shape().len() != spec.shape.len() {
                return Err(InputError::WrongRank {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    got: t.shape().to_vec(),
                });
            }
            for (axis, (&want, &got)) in spec.shape.iter().zip(t.shape()).enumerate() {
                if want >= 0 && want as usize != got {
                    return Err(InputError::WrongDims {
                        name: spec.name.clone(),
                        expected: spec.shape.clone(),
                        got: t.shape().to_vec(),
                        axis,
                        want,
                    });
                }
            }
            if spec.has_dynamic_leading() {
                let n = t.batch_size();
                match batch {
                    None => batch = Some((&spec.name, n)),
                    Some((first, first_batch)) if first_batch != n => {
                        return Err(InputError::BatchMismatch {
                            first: first.to_string(),
                            first_batch,
                            name: spec.name.clone(),
                            batch: n,
                        })
                    }
                    Some(_) => {}
                }
            }
            order.push(index);
        }
        let batch = match batch {
            Some((name, 0)) => return Err(InputError::NoRows { name: name.to_string() }),
            Some((_, n)) if n > max_batch => return Err(InputError::BatchTooLarge { got: n, max: max_batch }),
            Some((_, n)) => n,
            None => 1,
        };
        Ok((order, batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ModelMetadata {
        ModelMetadata {
            inputs: vec![
                TensorSpec::new("ids", DataType::Int64, vec![-1, 4]),
                TensorSpec::new("weights", DataType::Fp64, vec![-1, 4]),
            ],
            outputs: vec![TensorSpec::new("out", DataType::Fp64, vec![-1, 4])],
        }
    }

    fn ids(shape: Vec<usize>) -> NamedTensor {
        let n = shape.iter().product();
        NamedTensor::new("ids", Tensor::from_vec(shape, vec![1i64; n]).expect("valid"))
    }

    fn weights(shape: Vec<usize>) -> NamedTensor {
        let n = shape.iter().product();
        NamedTensor::new("weights", Tensor::from_vec(shape, vec![0.5f64; n]).expect("valid"))
    }

    #[test]
    fn validation_table() {
        let wrong_dtype = NamedTensor::new("ids", Tensor::from_vec(vec![2, 4], vec![1i32; 8]).expect("valid"));
        let extra = NamedTensor::new("bogus", Tensor::from_vec(vec![1], vec![1i32]).expect("valid"));
        let cases: Vec<(&str, Vec<NamedTensor>, Result<usize, &str>)> = vec![
            ("ok", vec![ids(vec![2, 4]), weights(vec![2, 4])], Ok(2)),
            ("any order", vec![weights(vec![3, 4]), ids(vec![3, 4])], Ok(3)),
            (
                "unknown",
                vec![ids(vec![2, 4]), weights(vec![2, 4]), extra],
                Err("unknown input 'bogus': the model's inputs are 'ids', 'weights'"),
            ),
            ("missing", vec![ids(vec![2, 4])], Err("missing input 'weights'")),
            ("duplicate", vec![ids(vec![2, 4]), ids(vec![2, 4])], Err("input 'ids' is given more than once")),
            (
                "dtype",
                vec![wrong_dtype, weights(vec![2, 4])],
                Err("input 'ids' has datatype INT32, the model expects INT64"),
            ),
            (
                "rank",
                vec![ids(vec![8]), weights(vec![2, 4])],
                Err("input 'ids' has shape [8] (rank 1), the model expects [-1, 4] (rank 2)"),
            ),
            ("dims", vec![ids(vec![2, 5]), weights(vec![2, 4])], Err("dimension 1 must be 4")),
            ("batch mismatch", vec![ids(vec![2, 4]), weights(vec![3, 4])], Err("'ids' has 2, 'weights' has 3")),
            (
                "too large",
                vec![ids(vec![9, 4]), weights(vec![9, 4])],
                Err("batch of 9 exceeds this model's maximum batch size of 8"),
            ),
            ("zero rows", vec![ids(vec![0, 4]), weights(vec![0, 4])], Err("input 'ids' has 0 rows")),
        ];
        let m = meta();
        for (label, inputs, want) in cases {
            let got = m.validate(&inputs, 8).map(|(ordered, b)| {
                assert_eq!(ordered.len(), 2);
                assert_eq!(ordered[0].dtype(), DataType::Int64, "{label}: graph order");
                b
            });
            match (got, want) {
                (Ok(b), Ok(w)) => assert_eq!(b, w, "{label}"),
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{label}: {e}"),
                (got, want) => panic!("{label}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn batchability_table() {
        let spec = |shape: Vec<i64>, leading: Option<&str>| TensorSpec {
            name: "t".into(),
            datatype: DataType::Fp32,
            shape,
            leading: leading.map(str::to_string),
        };
        let n = Some("N");
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<TensorSpec>, Vec<TensorSpec>, bool)> = vec![
            ("batch-major in and out", vec![spec(vec![-1, 4], n)], vec![spec(vec![-1, 2], n)], true),
            ("two inputs, same symbol", vec![spec(vec![-1, 4], n), spec(vec![-1], n)], vec![spec(vec![-1], n)], true),
            ("inputs with other symbols", vec![spec(vec![-1, 4], n), spec(vec![-1, 4], Some("M"))], vec![spec(vec![-1], n)], false),
            ("unbatched second input", vec![spec(vec![-1, 4], n), spec(vec![4], None)], vec![spec(vec![-1, 4], n)], false),
            ("fixed first input dim", vec![spec(vec![1, 4], None)], vec![spec(vec![1, 4], None)], false),
            ("scalar output", vec![spec(vec![-1, 4], n)], vec![spec(vec![], None)], false),
            ("fixed first output dim", vec![spec(vec![-1, 4], n)], vec![spec(vec![-1, 2], n), spec(vec![1, 4], None)], false),
            ("output led by another symbol", vec![spec(vec![-1, 4], n)], vec![spec(vec![-1], Some("M"))], false),
            ("output of unknown shape", vec![spec(vec![-1, 4], n)], vec![spec(vec![-1], None)], false),
            ("no inputs", vec![], vec![spec(vec![-1], n)], false),
        ];
        for (label, inputs, outputs, want) in cases {
            assert_eq!(ModelMetadata { inputs, outputs }.is_batched(), want, "{label}");
        }
    }
}
