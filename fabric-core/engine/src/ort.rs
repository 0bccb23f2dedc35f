//! The ONNX Runtime engine: `ort` with the library loaded at run time (`load-dynamic`).
//!
//! One ONNX Runtime environment per process, created on first use from the configured library path.
//! Execution providers are tried in the configured order (default TensorRT > CUDA > CPU); the one
//! that actually registers is logged once per session, so a CPU fallback is never silent.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider as _};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor as OrtTensor};
use serde::{Deserialize, Serialize};

use super::{shown, Engine, EngineError, EngineKind, EngineOptions};
use crate::model::{read_onnx, ModelMetadata};
use fabric_types::dtype::DataType;
use fabric_types::tensor::Tensor;

/// An ONNX Runtime execution provider the fabric knows how to ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    /// NVIDIA TensorRT.
    Tensorrt,
    /// NVIDIA CUDA.
    Cuda,
    /// ONNX Runtime's own CPU kernels (always available).
    Cpu,
}

impl ExecutionProvider {
    /// ONNX Runtime's name for the provider.
    pub fn ort_name(self) -> &'static str {
        match self {
            ExecutionProvider::Tensorrt => "TensorrtExecutionProvider",
            ExecutionProvider::Cuda => "CUDAExecutionProvider",
            ExecutionProvider::Cpu => "CPUExecutionProvider",
        }
    }
}

/// ONNX Runtime settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrtOptions {
    /// Full path of libonnxruntime.so.1.x; `ORT_DYLIB_PATH` when unset.
    pub library: Option<PathBuf>,
    /// Providers to try, in order; the first that registers wins.
    pub providers: Vec<ExecutionProvider>,
    /// Threads ONNX Runtime may use inside one operator.
    pub intra_threads: usize,
}

impl Default for OrtOptions {
    fn default() -> Self {
        OrtOptions {
            library: None,
            providers: vec![ExecutionProvider::Tensorrt, ExecutionProvider::Cuda, ExecutionProvider::Cpu],
            intra_threads: 1,
        }
    }
}

static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// The process-wide ONNX Runtime environment, loading the library on first call.
///
/// A failed load leaves nothing behind, so a later call with a corrected path can still succeed.
pub fn environment(library: Option<&Path>) -> Result<Environment, EngineError> {
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env.clone());
    }
    let _guard = INIT_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env.clone());
    }
    let path = library
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()).map(PathBuf::from))
        .ok_or(EngineError::OrtLibraryUnset)?;
    let shown_path = path.display().to_string();
    if !path.is_file() {
        return Err(EngineError::OrtLibraryMissing { path: shown_path });
    }
    let builder = ort::init_from(&path).map_err(|e| match e {
        ort::LoadDynamicError::BadVersion { version_str, .. } => EngineError::OrtLibraryVersion {
            path: shown_path.clone(),
            found: version_str,
            required: ort::MINOR_VERSION,
        },
        other => EngineError::OrtLibraryInvalid { path: shown_path.clone(), reason: other.to_string() },
    })?;
    let env = builder
        .with_name("fabric")
        .build()
        .map_err(|e| EngineError::OrtLibraryInvalid { path: shown_path.clone(), reason: e.to_string() })?;
    tracing::info!(library = %shown_path, "ONNX Runtime loaded");
    Ok(ENVIRONMENT.get_or_init(|| env).clone())
}

/// A model loaded into an ONNX Runtime session.
pub struct OrtEngine {
    metadata: ModelMetadata,
    max_batch_size: usize,
    session: Session,
    provider: ExecutionProvider,
}

impl OrtEngine {
    /// Loads a model, registering the first configured execution provider that works.
    pub fn load(path: &Path, options: &EngineOptions) -> Result<OrtEngine, EngineError> {
        let env = environment(options.ort.library.as_deref())?;
        let (bytes, proto) = read_onnx(path)?;
        let metadata = ModelMetadata::from_proto(&proto, path)?;
        let load_err = |reason: String| EngineError::Load { engine: EngineKind::Ort, path: shown(path), reason };
        let mut skipped = Vec::new();
        for &provider in &options.ort.providers {
            let dispatch = match provider {
                ExecutionProvider::Cpu => None,
                ExecutionProvider::Cuda => match ep::CUDA::is_available() {
                    // Heuristic convolution algorithms: the default exhaustive search benchmarks
                    // cuDNN's algorithms for every new input shape, and a dynamic batcher makes a new
                    // shape of nearly every batch size (measured on an H100: the CNN's hub served 501
                    // requests/s of 2,000 offered with the search, p50 267 ms).
                    Ok(true) => Some(
                        ep::CUDA::default()
                            .with_conv_algorithm_search(ep::cuda::ConvAlgorithmSearch::Heuristic)
                            .build()
                            .error_on_failure(),
                    ),
                    _ => {
                        skipped.push("CUDA: not in this ONNX Runtime build".to_string());
                        continue;
                    }
                },
                ExecutionProvider::Tensorrt => match ep::TensorRT::is_available() {
                    Ok(true) => Some(ep::TensorRT::default().build().error_on_failure()),
                    _ => {
                        skipped.push("TensorRT: not in this ONNX Runtime build".to_string());
                        continue;
                    }
                },
            };
            let mut builder = Session::builder(&env)
                .map_err(|e| load_err(e.to_string()))?
                .with_intra_threads(options.ort.intra_threads.max(1))
                .map_err(|e| load_err(e.to_string()))?;
            if let Some(dispatch) = dispatch {
                builder = match builder.with_execution_providers([dispatch]) {
                    Ok(b) => b,
                    Err(e) => {
                        skipped.push(format!("{}: {}", provider.ort_name(), e.message()));
                        continue;
                    }
                };
            }
            match builder.commit_from_memory(&bytes) {
                Ok(session) => {
                    if skipped.is_empty() {
                        tracing::info!(model = %path.display(), provider = provider.ort_name(), "ONNX Runtime session ready");
                    } else {
                        tracing::warn!(model = %path.display(), provider = provider.ort_name(), skipped = %skipped.join("; "),
                            "ONNX Runtime session ready on a fallback provider");
                    }
                    return Ok(OrtEngine { metadata, max_batch_size: options.max_batch_size, session, provider });
                }
                Err(e) if provider == ExecutionProvider::Cpu => return Err(load_err(e.to_string())),
                Err(e) => skipped.push(format!("{}: {e}", provider.ort_name())),
            }
        }
        Err(load_err(format!("no configured execution provider could run it ({})", skipped.join("; "))))
    }

    /// The execution provider this session runs on.
    pub fn provider(&self) -> ExecutionProvider {
        self.provider
    }
}

fn to_ort(t: &Tensor) -> Result<DynValue, EngineError> {
    let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
    macro_rules! typed {
        ($ty:ty) => {
            OrtTensor::<$ty>::from_array((shape, t.as_slice::<$ty>()?.into_owned())).map(|v| v.into_dyn())
        };
    }
    let value = match t.dtype() {
        DataType::Fp32 => typed!(f32),
        DataType::Fp64 => typed!(f64),
        DataType::Int8 => typed!(i8),
        DataType::Int16 => typed!(i16),
        DataType::Int32 => typed!(i32),
        DataType::Int64 => typed!(i64),
        DataType::Uint8 => typed!(u8),
        DataType::Uint16 => typed!(u16),
        DataType::Uint32 => typed!(u32),
        DataType::Uint64 => typed!(u64),
        DataType::Bool => {
            let bools: Vec<bool> = t.bytes().iter().map(|b| *b != 0).collect();
            OrtTensor::<bool>::from_array((shape, bools)).map(|v| v.into_dyn())
        }
        other @ (DataType::Fp16 | DataType::Bytes) => {
            return Err(EngineError::Output(fabric_types::tensor::TensorError::UnsupportedDataType(other)))
        }
    };
    value.map_err(|e| EngineError::Run { engine: EngineKind::Ort, reason: e.to_string() })
}

fn from_ort(value: &DynValue, dtype: DataType) -> Result<Tensor, EngineError> {
    let run_err = |e: ort::Error| EngineError::Run { engine: EngineKind::Ort, reason: e.to_string() };
    macro_rules! typed {
        ($ty:ty) => {{
            let (shape, data) = value.try_extract_tensor::<$ty>().map_err(run_err)?;
            Tensor::from_vec(shape.iter().map(|&d| d as usize).collect(), data.to_vec())?
        }};
    }
    Ok(match dtype {
        DataType::Fp32 => typed!(f32),
        DataType::Fp64 => typed!(f64),
        DataType::Int8 => typed!(i8),
        DataType::Int16 => typed!(i16),
        DataType::Int32 => typed!(i32),
        DataType::Int64 => typed!(i64),
        DataType::Uint8 => typed!(u8),
        DataType::Uint16 => typed!(u16),
        DataType::Uint32 => typed!(u32),
        DataType::Uint64 => typed!(u64),
        DataType::Bool => {
            let (shape, data) = value.try_extract_tensor::<bool>().map_err(run_err)?;
            Tensor::from_bools(shape.iter().map(|&d| d as usize).collect(), data)?
        }
        other @ (DataType::Fp16 | DataType::Bytes) => {
            return Err(EngineError::Output(fabric_types::tensor::TensorError::UnsupportedDataType(other)))
        }
    })
}

impl Engine for OrtEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Ort
    }

    fn on_gpu(&self) -> bool {
        self.provider != ExecutionProvider::Cpu
    }

    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    fn run_ordered(&mut self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, EngineError> {
        let feed = self
            .metadata
            .inputs
            .iter()
            .zip(inputs)
            .map(|(spec, t)| Ok((spec.name.as_str(), SessionInputValue::from(to_ort(t)?))))
            .collect::<Result<Vec<_>, EngineError>>()?;
        let outputs =
            self.session.run(feed).map_err(|e| EngineError::Run { engine: EngineKind::Ort, reason: e.to_string() })?;
        self.metadata
            .outputs
            .iter()
            .map(|spec| {
                let value = outputs.get(&spec.name).ok_or_else(|| EngineError::Run {
                    engine: EngineKind::Ort,
                    reason: format!("ONNX Runtime returned no output '{}'", spec.name),
                })?;
                from_ort(value, spec.datatype)
            })
            .collect()
    }
}
