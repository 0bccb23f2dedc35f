//! The tract engine: tract-onnx, pure Rust on the CPU, optimised once for a symbolic batch size,
//! with our own max pool in place of tract's where tract's is slow ([`super::tract_pool`]).
//!
//! Measured and not done (`examples/tract_profile.rs`, docs/benchmarks.md "The edge's engines"):
//! plans built for each batch size are no faster at batch 1 and slower on the MLP at 32 (tract
//! picks another kernel), and tract's threaded matrix products (`multithread-mm`) were slower on
//! 2 cores.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;

use super::{shown, Engine, EngineError, EngineKind, EngineOptions};
use crate::model::{read_onnx, ModelMetadata};
use fabric_types::dtype::DataType;
use fabric_types::tensor::Tensor as FabricTensor;

/// A model loaded into tract, with its reusable execution state.
pub struct TractEngine {
    metadata: ModelMetadata,
    max_batch_size: usize,
    state: TypedSimpleState,
}

fn datum_type(d: DataType) -> DatumType {
    match d {
        DataType::Bool => DatumType::Bool,
        DataType::Uint8 => DatumType::U8,
        DataType::Uint16 => DatumType::U16,
        DataType::Uint32 => DatumType::U32,
        DataType::Uint64 => DatumType::U64,
        DataType::Int8 => DatumType::I8,
        DataType::Int16 => DatumType::I16,
        DataType::Int32 => DatumType::I32,
        DataType::Int64 => DatumType::I64,
        DataType::Fp16 => DatumType::F16,
        DataType::Fp32 => DatumType::F32,
        DataType::Fp64 => DatumType::F64,
        DataType::Bytes => DatumType::String,
    }
}

impl TractEngine {
    /// Loads and optimises an ONNX model; names the operators tract lacks instead of failing vaguely.
    pub fn load(path: &Path, options: &EngineOptions) -> Result<TractEngine, EngineError> {
        let (_bytes, proto) = read_onnx(path)?;
        let metadata = ModelMetadata::from_proto(&proto, path)?;
        let onnx = tract_onnx::onnx();
        let mut missing: Vec<String> = proto
            .graph
            .iter()
            .flat_map(|g| g.node.iter())
            .filter(|n| !onnx.op_register.0.contains_key(&n.op_type))
            .map(|n| n.op_type.clone())
            .collect();
        missing.sort();
        missing.dedup();
        if !missing.is_empty() {
            return Err(EngineError::UnsupportedOps { engine: EngineKind::Tract, path: shown(path), ops: missing });
        }
        let load_err = |e: TractError| EngineError::Load {
            engine: EngineKind::Tract,
            path: shown(path),
            reason: format!("{e:#}"),
        };
        let plan: Arc<TypedSimplePlan> = onnx
            .model_for_proto_model(&proto)
            .and_then(|m| m.into_typed())
            .and_then(|m| m.into_decluttered())
            .and_then(|mut m| {
                let swapped = super::tract_pool::swap_max_pools(&mut m)?;
                tracing::debug!(model = %path.display(), swapped, "max pools computed by our own kernel");
                m.into_optimized()
            })
            .and_then(|m| m.into_runnable())
            .map_err(load_err)?;
        let state = TypedSimpleState::new(&plan).map_err(load_err)?;
        tracing::debug!(model = %path.display(), "tract engine ready");
        Ok(TractEngine { metadata, max_batch_size: options.max_batch_size, state })
    }
}

/// The value of each symbol that names an input dimension, from the inputs of this run.
fn input_symbols(model: &TypedModel, inputs: &[&FabricTensor]) -> SymbolValues {
    let mut values = SymbolValues::default();
    for (i, input) in inputs.iter().enumerate() {
        let Ok(fact) = model.input_fact(i) else { continue };
        for (dim, &n) in fact.shape.iter().zip(input.shape()) {
            if let TDim::Sym(symbol) = dim {
                values.set(symbol, n as i64);
            }
        }
    }
    values
}

/// A tensor of symbolic dimensions with the symbols replaced by their values in this run.
fn resolve_dims(tensor: &Tensor, symbols: &SymbolValues) -> TractResult<Tensor> {
    let plain = tensor.try_as_plain_ram()?;
    let dims = plain.as_slice::<TDim>()?;
    let values = dims
        .iter()
        .map(|d| {
            d.eval(symbols)
                .to_i64()
                .map_err(|_| TractError::msg(format!("dimension {d} does not follow from the inputs")))
        })
        .collect::<TractResult<Vec<i64>>>()?;
    Tensor::from_shape(tensor.shape(), &values)
}

impl TractEngine {
    /// The optimised plan this engine runs (for profiling it operator by operator).
    pub fn plan(&self) -> Arc<TypedSimplePlan> {
        self.state.plan().clone()
    }
}

impl Engine for TractEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Tract
    }

    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    fn run_ordered(&mut self, inputs: &[&FabricTensor]) -> Result<Vec<FabricTensor>, EngineError> {
        let run_err = |e: TractError| EngineError::Run { engine: EngineKind::Tract, reason: format!("{e:#}") };
        let values = inputs
            .iter()
            .map(|t| {
                // SAFETY: `FabricTensor` guarantees the byte length matches shape x element size and that
                // BOOL bytes are 0 or 1, which is all tract's raw constructor requires of plain data types.
                unsafe { Tensor::from_raw_dt(datum_type(t.dtype()), t.shape(), t.bytes()) }.map(|t| t.into_tvalue())
            })
            .collect::<TractResult<TVec<TValue>>>()
            .map_err(run_err)?;
        let outputs = self.state.run(values).map_err(run_err)?;
        // Symbol values are worked out only when an output needs them (a shape the plan folded into a
        // constant holding the batch symbol, e.g. `Shape(x)` as an output).
        let mut symbols: Option<SymbolValues> = None;
        self.metadata
            .outputs
            .iter()
            .zip(outputs)
            .map(|(spec, value)| {
                // tract may hand back symbolic dims (TDim) for integer outputs, or a wider type: cast to the declared one.
                let mut tensor = value.into_tensor();
                if tensor.datum_type() == DatumType::TDim {
                    let values = symbols.get_or_insert_with(|| input_symbols(self.state.plan().model(), inputs));
                    tensor = resolve_dims(&tensor, values).map_err(run_err)?;
                }
                let cast = tensor.cast_to_dt(datum_type(spec.datatype)).map_err(run_err)?;
                Ok(FabricTensor::from_bytes(spec.datatype, cast.shape().to_vec(), cast.as_bytes().to_vec())?)
            })
            .collect()
    }
}
