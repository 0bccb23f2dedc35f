//! The ONNX Runtime engine: `ort` with the library loaded at run time (`load-dynamic`).
//!
//! One ONNX Runtime environment per process, created on first use from the configured library path.
//! Execution providers are tried in the configured order (default TensorRT > CUDA > CPU); the one
//! that actually registers is logged once per session, so a CPU fallback is never silent.
//!
//! On a GPU provider a batch runs at bucket sizes (powers of two up to the cap, see
//! `fabric_policy::gpu`), so the session sees a few shapes, each built and warmed before the version
//! reports ready, and runs on buffers bound once per bucket (`binding`), with a CUDA graph per
//! bucket on the CUDA provider. TensorRT keeps its compiled engines on disk (`[ort] cache_dir`), in a folder keyed
//! by the model file, the GPU and the runtime, so a restart or a scale-from-zero loads them instead of
//! building them again.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider as _};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor as OrtTensor};
use serde::{Deserialize, Serialize};

use super::{shown, Engine, EngineError, EngineKind, EngineOptions};
use crate::binding::{self, BoundSession, Placement};
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
    /// Where TensorRT keeps compiled engines and its timing cache; `~/.cache/fabric/tensorrt` when
    /// unset (the system's temporary folder without a home).
    pub cache_dir: Option<PathBuf>,
    /// Lets TensorRT run layers in FP16 (faster; the model must tolerate it).
    pub fp16: bool,
    /// Runs on input and output buffers allocated once per batch size and bound once (`None`: on
    /// a GPU provider only; `true` also on the CPU, where the device is the CPU itself).
    pub io_binding: Option<bool>,
    /// Captures a CUDA graph per batch bucket and replays it (CUDA provider, bound buffers only);
    /// a model the CUDA provider cannot run whole falls back to ordinary launches with a warning.
    pub cuda_graphs: bool,
}

impl Default for OrtOptions {
    fn default() -> Self {
        OrtOptions {
            library: None,
            providers: vec![ExecutionProvider::Tensorrt, ExecutionProvider::Cuda, ExecutionProvider::Cpu],
            intra_threads: 1,
            cache_dir: None,
            fp16: false,
            io_binding: None,
            cuda_graphs: true,
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
    /// Batch sizes a GPU session runs at; empty on the CPU (any batch runs as it is).
    buckets: Vec<usize>,
    /// Buffers bound once per batch size, where the model allows it and binding is on.
    bound: Option<BoundSession>,
}

/// The TensorRT engine folder for a model file: `[ort] cache_dir` (or the default) joined with the
/// key of model, GPU, runtime and batch cap.
fn trt_cache_dir(options: &EngineOptions, model_bytes: &[u8]) -> PathBuf {
    let root = options.ort.cache_dir.clone().unwrap_or_else(|| {
        std::env::var_os("HOME")
            .map(|home| PathBuf::from(home).join(".cache/fabric/tensorrt"))
            .unwrap_or_else(|| std::env::temp_dir().join("fabric-tensorrt"))
    });
    let gpu = crate::gpu::this_machine().first().map_or("unknown-gpu", |g| g.name.as_str());
    let digest = format!("{:016x}", fabric_policy::hash::stable_hash(model_bytes));
    let runtime = format!("ort-api{}", ort::MINOR_VERSION);
    root.join(fabric_policy::gpu::engine_cache_key(&digest, gpu, &runtime, options.max_batch_size))
}

/// TensorRT optimisation profiles covering 1 to `max` rows of every input (`name:1x3x224x224`), when
/// the batch is the inputs' only dynamic dimension; `None` otherwise (TensorRT then builds per shape).
fn trt_profiles(metadata: &ModelMetadata, max: usize) -> Option<(String, String)> {
    let mut min = Vec::new();
    let mut top = Vec::new();
    for spec in &metadata.inputs {
        let rest = spec.shape.get(1..)?;
        if spec.shape.first() != Some(&-1) || rest.iter().any(|&d| d <= 0) {
            return None;
        }
        let dims = |n: usize| {
            std::iter::once(n.to_string()).chain(rest.iter().map(|d| d.to_string())).collect::<Vec<_>>().join("x")
        };
        min.push(format!("{}:{}", spec.name, dims(1)));
        top.push(format!("{}:{}", spec.name, dims(max)));
    }
    (!min.is_empty()).then(|| (min.join(","), top.join(",")))
}

impl OrtEngine {
    /// Loads a model, registering the first configured execution provider that works.
    pub fn load(path: &Path, options: &EngineOptions) -> Result<OrtEngine, EngineError> {
        let env = environment(options.ort.library.as_deref())?;
        let (bytes, proto) = read_onnx(path)?;
        let metadata = ModelMetadata::from_proto(&proto, path)?;
        let load_err = |reason: String| EngineError::Load { engine: EngineKind::Ort, path: shown(path), reason };
        let mut skipped = Vec::new();
        let bindable = binding::supports(&metadata) && options.ort.io_binding != Some(false);
        let attempts = options.ort.providers.iter().flat_map(|&p| {
            // CUDA graphs need bound buffers; where the provider cannot take the whole model with
            // them, the next attempt is the same provider without.
            let graphs = p == ExecutionProvider::Cuda && options.ort.cuda_graphs && bindable;
            [(p, graphs)].into_iter().chain(graphs.then_some((p, false)))
        });
        for (provider, graphs) in attempts {
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
                            .with_cuda_graph(graphs)
                            .build()
                            .error_on_failure(),
                    ),
                    _ => {
                        // Said once: an attempt with CUDA graphs is followed by one without.
                        if !graphs {
                            skipped.push("CUDA: not in this ONNX Runtime build".to_string());
                        }
                        continue;
                    }
                },
                ExecutionProvider::Tensorrt => match ep::TensorRT::is_available() {
                    Ok(true) => {
                        let cache = trt_cache_dir(options, &bytes);
                        if let Err(e) = std::fs::create_dir_all(&cache) {
                            skipped.push(format!(
                                "TensorRT: cannot create its engine cache {}: {e} (set [ort] cache_dir)",
                                cache.display()
                            ));
                            continue;
                        }
                        let cache_path = cache.display().to_string();
                        let mut trt = ep::TensorRT::default()
                            .with_engine_cache(true)
                            .with_engine_cache_path(&cache_path)
                            .with_timing_cache(true)
                            .with_timing_cache_path(&cache_path)
                            .with_fp16(options.ort.fp16);
                        if let Some((min, max)) = trt_profiles(&metadata, options.max_batch_size.max(1)) {
                            trt = trt
                                .with_profile_min_shapes(&min)
                                .with_profile_opt_shapes(&max)
                                .with_profile_max_shapes(&max);
                        }
                        tracing::info!(model = %path.display(), cache = %cache_path, "TensorRT engine cache");
                        Some(trt.build().error_on_failure())
                    }
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
                    let on_gpu = provider != ExecutionProvider::Cpu;
                    let bound = match (on_gpu, options.ort.io_binding) {
                        _ if !bindable => None,
                        (true, _) => Some(BoundSession::new(&session, Placement::Cuda, graphs)?),
                        (false, Some(true)) => Some(BoundSession::new(&session, Placement::Cpu, false)?),
                        (false, _) => None,
                    };
                    let buckets = if (on_gpu || bound.is_some()) && metadata.is_batched() {
                        fabric_policy::gpu::buckets(options.max_batch_size)
                    } else {
                        Vec::new()
                    };
                    tracing::info!(model = %path.display(), io_binding = bound.is_some(), cuda_graphs = graphs,
                        buckets = ?buckets, "ONNX Runtime batch shapes");
                    return Ok(OrtEngine {
                        metadata,
                        max_batch_size: options.max_batch_size,
                        session,
                        provider,
                        buckets,
                        bound,
                    });
                }
                Err(e) if provider == ExecutionProvider::Cpu => return Err(load_err(e.to_string())),
                Err(e) if graphs => skipped.push(format!("{} with CUDA graphs: {e}", provider.ort_name())),
                Err(e) => skipped.push(format!("{}: {e}", provider.ort_name())),
            }
        }
        Err(load_err(format!("no configured execution provider could run it ({})", skipped.join("; "))))
    }

    /// The execution provider this session runs on.
    pub fn provider(&self) -> ExecutionProvider {
        self.provider
    }

    /// The batch sizes that have bound buffers (empty without IO binding).
    pub fn bound_sizes(&self) -> Vec<usize> {
        self.bound.as_ref().map_or_else(Vec::new, BoundSession::sizes)
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
        let (session, metadata, bound) = (&mut self.session, &self.metadata, &mut self.bound);
        crate::buckets::run_in_buckets(inputs, &self.buckets, |batch| match bound {
            Some(bound) => bound.run(session, metadata, batch),
            None => run_session(session, metadata, batch),
        })
    }
}

/// One run of the session on inputs in graph order.
fn run_session(
    session: &mut Session,
    metadata: &ModelMetadata,
    inputs: &[&Tensor],
) -> Result<Vec<Tensor>, EngineError> {
    let feed = metadata
        .inputs
        .iter()
        .zip(inputs)
        .map(|(spec, t)| Ok((spec.name.as_str(), SessionInputValue::from(to_ort(t)?))))
        .collect::<Result<Vec<_>, EngineError>>()?;
    let outputs = session.run(feed).map_err(|e| EngineError::Run { engine: EngineKind::Ort, reason: e.to_string() })?;
    metadata
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TensorSpec;

    fn spec(name: &str, shape: &[i64]) -> TensorSpec {
        TensorSpec { name: name.into(), datatype: DataType::Fp32, shape: shape.to_vec(), leading: None }
    }

    #[test]
    fn tensorrt_profiles_span_one_row_to_the_cap_where_only_the_batch_is_dynamic() {
        let cases: [(Vec<TensorSpec>, Option<(&str, &str)>); 5] = [
            (vec![spec("input", &[-1, 3, 224, 224])], Some(("input:1x3x224x224", "input:32x3x224x224"))),
            (
                vec![spec("ids", &[-1, 128]), spec("mask", &[-1, 128])],
                Some(("ids:1x128,mask:1x128", "ids:32x128,mask:32x128")),
            ),
            (vec![spec("ids", &[-1, -1])], None),
            (vec![spec("x", &[4, 3])], None),
            (vec![], None),
        ];
        for (inputs, want) in cases {
            let metadata = ModelMetadata { inputs, outputs: vec![] };
            let got = trt_profiles(&metadata, 32);
            assert_eq!(got.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), want, "{:?}", metadata.inputs);
        }
    }
}
