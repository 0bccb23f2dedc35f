//! IO binding for an ONNX Runtime session: for each batch size it runs at (the buckets, on a GPU),
//! input and output buffers allocated once in the device's memory and bound once, with pinned host
//! buffers to stage the copies. A run copies the rows into the pinned input, from there to the
//! device, runs the bound session and copies the outputs back the same way. Nothing is allocated per
//! run, and each bucket's buffers keep their addresses, which is what lets the CUDA provider capture
//! one CUDA graph per bucket (`gpu_graph_id`) and replay it instead of launching every kernel.
//!
//! Without a GPU the same code runs with the CPU as the "device" (`[ort] io_binding = true`), which
//! is how it is tested here.

use std::collections::BTreeMap;

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, NoSelectedOutputs, RunOptions, Session};
use ort::value::{DynTensor, TensorElementType};

use crate::model::ModelMetadata;
use crate::{EngineError, EngineKind};
use fabric_types::dtype::DataType;
use fabric_types::tensor::Tensor;

/// ONNX Runtime's element type for a fixed-width data type; `None` for those bound buffers cannot
/// hold (strings, and FP16, which requests do not carry here).
fn element_type(dtype: DataType) -> Option<TensorElementType> {
    Some(match dtype {
        DataType::Fp32 => TensorElementType::Float32,
        DataType::Fp64 => TensorElementType::Float64,
        DataType::Int8 => TensorElementType::Int8,
        DataType::Int16 => TensorElementType::Int16,
        DataType::Int32 => TensorElementType::Int32,
        DataType::Int64 => TensorElementType::Int64,
        DataType::Uint8 => TensorElementType::Uint8,
        DataType::Uint16 => TensorElementType::Uint16,
        DataType::Uint32 => TensorElementType::Uint32,
        DataType::Uint64 => TensorElementType::Uint64,
        DataType::Bool => TensorElementType::Bool,
        DataType::Fp16 | DataType::Bytes => return None,
    })
}

/// The shape of a tensor of `rows` rows, where `declared` has the batch (`-1`) first and every
/// other dimension fixed; `None` otherwise (its buffer could not be sized before the run).
pub fn bucket_shape(declared: &[i64], rows: usize) -> Option<Vec<usize>> {
    let (first, rest) = declared.split_first()?;
    if *first != -1 || rest.iter().any(|&d| d <= 0) {
        return None;
    }
    Some(std::iter::once(rows).chain(rest.iter().map(|&d| d as usize)).collect())
}

/// Whether a model can run on bound buffers: every input and output batch-first with its other
/// dimensions fixed, and of a fixed-width type.
pub fn supports(metadata: &ModelMetadata) -> bool {
    let all = metadata.inputs.iter().chain(&metadata.outputs);
    metadata.is_batched()
        && !metadata.outputs.is_empty()
        && all.clone().all(|t| bucket_shape(&t.shape, 1).is_some() && element_type(t.datatype).is_some())
}

/// Where bound buffers live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// CUDA device memory, staged through CUDA pinned host memory.
    Cuda,
    /// The CPU standing in for the device (no GPU: the same code path, tested).
    Cpu,
}

/// One batch size's buffers, bound once.
struct Buffers {
    binding: IoBinding,
    host_inputs: Vec<DynTensor>,
    device_inputs: Vec<DynTensor>,
    device_outputs: Vec<DynTensor>,
    host_outputs: Vec<DynTensor>,
    output_shapes: Vec<Vec<usize>>,
    options: RunOptions<NoSelectedOutputs>,
}

/// The bound buffers of one session, made the first time each batch size runs (the warm-up runs
/// every bucket, so none is made while serving).
pub struct BoundSession {
    device: Allocator,
    pinned: Allocator,
    graphs: bool,
    by_rows: BTreeMap<usize, Buffers>,
}

fn run_err(what: &str, e: ort::Error) -> EngineError {
    EngineError::Run { engine: EngineKind::Ort, reason: format!("{what}: {e}") }
}

impl BoundSession {
    /// Allocators for `placement` from `session`; `graphs` when the session was built with CUDA
    /// graphs, so each batch size runs under its own graph id.
    pub fn new(session: &Session, placement: Placement, graphs: bool) -> Result<BoundSession, EngineError> {
        let (device, pinned) = match placement {
            Placement::Cuda => (
                MemoryInfo::new(AllocationDevice::CUDA, 0, AllocatorType::Device, MemoryType::Default),
                MemoryInfo::new(AllocationDevice::CUDA_PINNED, 0, AllocatorType::Device, MemoryType::CPUInput),
            ),
            Placement::Cpu => (
                MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default),
                MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default),
            ),
        };
        let allocator = |info: ort::Result<MemoryInfo<'static>>| {
            info.and_then(|info| Allocator::new(session, info)).map_err(|e| run_err("allocator for bound buffers", e))
        };
        Ok(BoundSession { device: allocator(device)?, pinned: allocator(pinned)?, graphs, by_rows: BTreeMap::new() })
    }

    /// The batch sizes that have buffers, ascending.
    pub fn sizes(&self) -> Vec<usize> {
        self.by_rows.keys().copied().collect()
    }

    fn buffers(&self, session: &Session, metadata: &ModelMetadata, rows: usize) -> Result<Buffers, EngineError> {
        let tensor = |alloc: &Allocator, dtype: DataType, shape: &[usize]| {
            let kind = element_type(dtype).ok_or_else(|| EngineError::Run {
                engine: EngineKind::Ort,
                reason: format!("{dtype} tensors cannot be bound"),
            })?;
            DynTensor::new(alloc, kind, shape.to_vec()).map_err(|e| run_err("bound buffer", e))
        };
        let shape_of = |declared: &[i64]| {
            bucket_shape(declared, rows).ok_or_else(|| EngineError::Run {
                engine: EngineKind::Ort,
                reason: format!("shape {declared:?} cannot be bound (a dimension other than the batch is dynamic)"),
            })
        };
        let mut binding = session.create_binding().map_err(|e| run_err("IO binding", e))?;
        let (mut host_inputs, mut device_inputs) = (Vec::new(), Vec::new());
        for spec in &metadata.inputs {
            let shape = shape_of(&spec.shape)?;
            host_inputs.push(tensor(&self.pinned, spec.datatype, &shape)?);
            let on_device = tensor(&self.device, spec.datatype, &shape)?;
            binding.bind_input(spec.name.as_str(), &on_device).map_err(|e| run_err("binding an input", e))?;
            device_inputs.push(on_device);
        }
        let (mut device_outputs, mut host_outputs, mut output_shapes) = (Vec::new(), Vec::new(), Vec::new());
        for spec in &metadata.outputs {
            let shape = shape_of(&spec.shape)?;
            let mut on_device = tensor(&self.device, spec.datatype, &shape)?;
            binding.bind_output(spec.name.as_str(), &mut on_device).map_err(|e| run_err("binding an output", e))?;
            device_outputs.push(on_device);
            host_outputs.push(tensor(&self.pinned, spec.datatype, &shape)?);
            output_shapes.push(shape);
        }
        let mut options = RunOptions::new().map_err(|e| run_err("run options", e))?;
        if self.graphs {
            // One graph per batch size: a captured graph replays only with the shapes and
            // addresses it was captured with. Ids start at 1 (0 is the runtime's default graph).
            options.set("gpu_graph_id", rows.to_string()).map_err(|e| run_err("CUDA graph id", e))?;
        }
        Ok(Buffers { binding, host_inputs, device_inputs, device_outputs, host_outputs, output_shapes, options })
    }

    /// Runs `inputs` (graph order, one batch) on the bound buffers of their batch size.
    pub fn run(
        &mut self,
        session: &mut Session,
        metadata: &ModelMetadata,
        inputs: &[&Tensor],
    ) -> Result<Vec<Tensor>, EngineError> {
        let rows = inputs.first().map_or(0, |t| t.batch_size());
        if !self.by_rows.contains_key(&rows) {
            let made = self.buffers(session, metadata, rows)?;
            self.by_rows.insert(rows, made);
        }
        let Some(b) = self.by_rows.get_mut(&rows) else {
            return Err(EngineError::Run { engine: EngineKind::Ort, reason: "bound buffers vanished".into() });
        };
        for ((t, host), device) in inputs.iter().zip(&mut b.host_inputs).zip(&mut b.device_inputs) {
            let bytes = t.bytes();
            let room = if host.memory_info().is_cpu_accessible() { buffer_len(host) } else { 0 };
            if bytes.len() != room {
                return Err(EngineError::Run {
                    engine: EngineKind::Ort,
                    reason: format!("input of {} bytes for a bound buffer of {room}", bytes.len()),
                });
            }
            // SAFETY: the pinned buffer is host memory of exactly `room` bytes (checked above),
            // owned by `host` and not aliased while this copy runs.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), host.data_ptr_mut().cast::<u8>(), room) };
            host.copy_into(device).map_err(|e| run_err("copying an input to the device", e))?;
        }
        session.run_binding_with_options(&b.binding, &b.options).map_err(|e| run_err("bound run", e))?;
        let mut outputs = Vec::with_capacity(b.device_outputs.len());
        for (((device, host), shape), spec) in
            b.device_outputs.iter().zip(&mut b.host_outputs).zip(&b.output_shapes).zip(&metadata.outputs)
        {
            device.copy_into(&mut *host).map_err(|e| run_err("copying an output from the device", e))?;
            let len = buffer_len(host);
            // SAFETY: `host` is CPU-accessible memory of `len` bytes, just written by the copy.
            let bytes = unsafe { std::slice::from_raw_parts(host.data_ptr().cast::<u8>(), len) }.to_vec();
            outputs.push(Tensor::from_bytes(spec.datatype, shape.clone(), bytes)?);
        }
        Ok(outputs)
    }
}

/// The bytes a bound buffer holds.
fn buffer_len(t: &DynTensor) -> usize {
    let elements: i64 = t.shape().iter().product();
    let width = match *t.data_type() {
        TensorElementType::Float64 | TensorElementType::Int64 | TensorElementType::Uint64 => 8,
        TensorElementType::Float32 | TensorElementType::Int32 | TensorElementType::Uint32 => 4,
        TensorElementType::Int16 | TensorElementType::Uint16 | TensorElementType::Float16 => 2,
        _ => 1,
    };
    usize::try_from(elements).unwrap_or(0) * width
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TensorSpec;

    fn spec(shape: &[i64], datatype: DataType) -> TensorSpec {
        let leading = (shape.first() == Some(&-1)).then(|| "batch".to_string());
        TensorSpec { name: "t".into(), datatype, shape: shape.to_vec(), leading }
    }

    #[test]
    fn buffers_are_sized_only_where_the_batch_is_the_one_dynamic_dimension() {
        let cases: [(&[i64], usize, Option<&[usize]>); 6] = [
            (&[-1, 3, 224, 224], 8, Some(&[8, 3, 224, 224])),
            (&[-1, 128], 1, Some(&[1, 128])),
            (&[-1], 4, Some(&[4])),
            (&[-1, -1], 4, None),
            (&[2, 3], 4, None),
            (&[], 4, None),
        ];
        for (declared, rows, want) in cases {
            assert_eq!(bucket_shape(declared, rows).as_deref(), want, "{declared:?}");
        }
    }

    #[test]
    fn a_model_is_bound_only_when_every_tensor_can_be() {
        let model = |inputs: Vec<TensorSpec>, outputs: Vec<TensorSpec>| ModelMetadata { inputs, outputs };
        let cases = [
            (model(vec![spec(&[-1, 4], DataType::Fp32)], vec![spec(&[-1, 3], DataType::Fp32)]), true),
            (model(vec![spec(&[-1, 128], DataType::Int64)], vec![spec(&[-1, 768], DataType::Fp32)]), true),
            (model(vec![spec(&[-1, 4], DataType::Fp32)], vec![spec(&[-1, -1], DataType::Fp32)]), false),
            (model(vec![spec(&[-1, 4], DataType::Bytes)], vec![spec(&[-1, 3], DataType::Fp32)]), false),
            (model(vec![spec(&[-1, 4], DataType::Fp32)], vec![]), false),
            (model(vec![spec(&[4], DataType::Fp32)], vec![spec(&[4], DataType::Fp32)]), false),
        ];
        for (metadata, want) in cases {
            assert_eq!(supports(&metadata), want, "{metadata:?}");
        }
    }
}
