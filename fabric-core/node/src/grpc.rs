//! KServe v2 over gRPC (`inference.GRPCInferenceService`), beside the REST API and as thin: each RPC
//! decodes, calls what the REST handler calls ([`infer::serve`], the model set, [`NodeControl`]) and
//! encodes. Errors are gRPC status codes with the REST face's messages: 400 is INVALID_ARGUMENT,
//! 404 NOT_FOUND, 503 UNAVAILABLE, 408 DEADLINE_EXCEEDED, 413 and 429 RESOURCE_EXHAUSTED.
//!
//! The server runs on a tokio runtime of its own (tonic needs a multi-threaded one; the pools stay
//! on actix's), sized like the HTTP workers.
//!
//! [`NodeControl`]: crate::control::NodeControl

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::web;
use futures::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status};

use crate::config::{GrpcConfig, PortTlsConfig};
use crate::control::ControlError;
use crate::http::admin::{control_status, repository_authorised, REPOSITORY_NEEDS_TOKEN};
use crate::http::infer;
use crate::http::kserve_api::{not_ready, platform, readiness};
use crate::http::state::{ApiError, HttpState};
use crate::models::ServedModel;
use fabric_proto::kserve_grpc::{self, pb};
use pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};

/// The gRPC status code of an HTTP status, as the two faces answer the same failure.
pub fn code_of(status: StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        408 => Code::DeadlineExceeded,
        409 => Code::FailedPrecondition,
        413 | 429 => Code::ResourceExhausted,
        503 => Code::Unavailable,
        _ => Code::Internal,
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let after = e.retry_after_s();
        let mut status = Status::new(code_of(e.status), e.message);
        if let Some(s) = after.and_then(|s| s.to_string().parse().ok()) {
            status.metadata_mut().insert("retry-after", s);
        }
        status
    }
}

fn control_failed(e: ControlError) -> Status {
    let status = control_status(&e);
    if status.is_server_error() {
        tracing::error!("control: {e}");
    }
    Status::new(code_of(status), e.to_string())
}

/// Binds `config.addr` and serves the gRPC face of `state` (over TLS when `tls` is on) on a runtime
/// of its own until the process exits; returns the bound address.
pub fn start(
    state: web::Data<HttpState>,
    config: &GrpcConfig,
    tls: &PortTlsConfig,
    workers: usize,
) -> std::io::Result<SocketAddr> {
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let tls = match tls.files().map_err(invalid)? {
        None => None,
        Some((cert, key)) => {
            let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| invalid(format!("{}: {e}", p.display())));
            let mut server = tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(read(cert)?, read(key)?));
            if let Some(ca) = &tls.client_ca {
                server = server.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
            }
            Some(server)
        }
    };
    let listener = std::net::TcpListener::bind(&config.addr)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let workers = if workers > 0 { workers } else { std::thread::available_parallelism().map_or(2, |n| n.get()) };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers).thread_name("grpc").enable_all().build()?;
    let listener = {
        let _inside = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let limit = config.max_message_bytes;
    let service = GrpcInferenceServiceServer::new(GrpcFace { state })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(|e| invalid(format!("gRPC TLS: {e}")))?;
    }
    std::thread::Builder::new().name("grpc-server".into()).spawn(move || {
        // Small answers must not wait for Nagle's algorithm (a 40 ms stall against delayed ACKs).
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|stream| {
            if let Ok(s) = &stream {
                let _ = s.set_nodelay(true);
            }
            stream
        });
        let serve = builder.add_service(service).serve_with_incoming(incoming);
        if let Err(e) = runtime.block_on(serve) {
            tracing::error!("the gRPC server on {addr} stopped: {e}");
        }
    })?;
    Ok(addr)
}

/// The service: the node's shared state.
struct GrpcFace {
    state: web::Data<HttpState>,
}

fn version_of(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

/// The call's `authorization` metadata, for the client-key checks.
fn authorization<T>(request: &Request<T>) -> Option<String> {
    request.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// The time left by the client's own gRPC deadline, when it set one.
fn grpc_deadline<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    kserve_grpc::parse_grpc_timeout(value)
}

impl GrpcFace {
    /// The client-key check of a read about `model` (`None`: about the repository).
    fn may_read<T>(&self, request: &Request<T>, model: Option<&str>) -> Result<(), Status> {
        let auth = authorization(request);
        Ok(self.state.clients.check(auth.as_deref(), model, &self.state.metrics).map_err(ApiError::from)?)
    }

    /// One infer request, served as the REST face serves it.
    async fn infer(
        &self,
        message: pb::ModelInferRequest,
        client_deadline: Option<Duration>,
        authorization: Option<&str>,
    ) -> Result<pb::ModelInferResponse, Status> {
        let arrived = Instant::now();
        // The caller's key and quota first (as REST): its place is held until the answer is built.
        let admitted = self
            .state
            .clients
            .admit(authorization, &message.model_name, &self.state.metrics)
            .map_err(ApiError::from)?;
        let (name, version, request) = match kserve_grpc::decode_infer(message) {
            Ok(decoded) => decoded,
            Err(e) => return Err(Status::invalid_argument(e.to_string())),
        };
        let known = infer::known(&self.state, &name, version.as_deref())?;
        let mut request = request;
        admitted.apply_priority(&mut request);
        // The earlier of the `timeout` parameter and the call's own deadline.
        request.timeout = match (request.timeout, client_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let encode = |model: &ServedModel, o: infer::Outputs| {
            let mut parameters = HashMap::new();
            parameters.insert("served_by".to_string(), kserve_grpc::string_parameter(o.served_by));
            if let Some(rows) = o.batch_rows {
                parameters.insert("batch_rows".to_string(), kserve_grpc::int_parameter(rows as i64));
            }
            if let Some(c) = o.cascade {
                parameters.insert("answered_by_model".to_string(), kserve_grpc::string_parameter(c.answered_by));
                parameters.insert("cascade".to_string(), kserve_grpc::string_parameter(c.outcome.to_string()));
                if let Some(note) = c.note {
                    parameters.insert("cascade_note".to_string(), kserve_grpc::string_parameter(note));
                }
            }
            kserve_grpc::encode_infer(
                &model.name,
                &model.version_str(),
                o.id.as_deref(),
                parameters,
                o.outputs,
                &o.selection,
            )
            .map_err(ApiError::from)
        };
        let (model, result) =
            infer::serve(&self.state, known, &name, version.as_deref(), Ok(request), arrived, encode).await;
        result.map_err(|e| {
            if e.status.is_server_error() && e.status != StatusCode::SERVICE_UNAVAILABLE {
                tracing::error!(model = %model.name, "{}", e.message);
            }
            Status::from(e)
        })
    }
}

type InferStream = Pin<Box<dyn Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send + 'static>>;

/// Requests one stream may have in flight at once; the next is read when one is answered.
const STREAM_IN_FLIGHT: usize = 256;

#[tonic::async_trait]
impl GrpcInferenceService for GrpcFace {
    async fn server_live(&self, _: Request<pb::ServerLiveRequest>) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse { ready: readiness(&self.state).is_ok() }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let model = self.state.models.route(&r.name, version_of(&r.version)).map_err(ApiError::from)?;
        let ready = model.pool.status().await.map_err(ApiError::from)?.replicas > 0;
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        let extensions = ["binary_tensor_data", "model_configuration", "model_repository", "statistics"];
        Ok(Response::new(pb::ServerMetadataResponse {
            name: self.state.server_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: extensions.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        self.may_read(&request, Some(&request.get_ref().name))?;
        let r = request.into_inner();
        let model = self.state.models.route(&r.name, version_of(&r.version)).map_err(ApiError::from)?;
        let meta = model.pool.metadata();
        let tensors = |specs: &[fabric_engine::TensorSpec]| {
            specs
                .iter()
                .map(|s| pb::model_metadata_response::TensorMetadata {
                    name: s.name.clone(),
                    datatype: s.datatype.as_str().to_string(),
                    shape: s.shape.clone(),
                })
                .collect()
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            name: model.name.clone(),
            versions: self.state.models.versions(&model.name).iter().map(|m| m.version_str()).collect(),
            platform: platform(&model).to_string(),
            inputs: tensors(&meta.inputs),
            outputs: tensors(&meta.outputs),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let (deadline, auth) = (grpc_deadline(&request), authorization(&request));
        self.infer(request.into_inner(), deadline, auth.as_deref()).await.map(Response::new)
    }

    type ModelStreamInferStream = InferStream;

    /// Each request on the stream is served as it arrives, concurrently with the others (up to
    /// [`STREAM_IN_FLIGHT`]); each answer, or its error, goes back as soon as it is ready.
    async fn model_stream_infer(
        &self,
        request: Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<InferStream>, Status> {
        let (deadline, auth) = (grpc_deadline(&request), Arc::new(authorization(&request)));
        let face = Arc::new(GrpcFace { state: self.state.clone() });
        let answers = request
            .into_inner()
            .map(move |message| {
                let (face, auth) = (face.clone(), auth.clone());
                async move {
                    let message = match message {
                        Ok(m) => m,
                        // The client's side of the stream broke: end it with that error.
                        Err(status) => return Err(status),
                    };
                    let (id, model_name, model_version) =
                        (message.id.clone(), message.model_name.clone(), message.model_version.clone());
                    Ok(match face.infer(message, deadline, auth.as_deref()).await {
                        Ok(response) => pb::ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(response),
                        },
                        // The error names its request: the response carries its id and model.
                        Err(status) => pb::ModelStreamInferResponse {
                            error_message: status.message().to_string(),
                            infer_response: Some(pb::ModelInferResponse {
                                model_name,
                                model_version,
                                id,
                                ..Default::default()
                            }),
                        },
                    })
                }
            })
            .buffer_unordered(STREAM_IN_FLIGHT);
        Ok(Response::new(Box::pin(answers)))
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = request.into_inner();
        let model = self.state.models.route(&r.name, version_of(&r.version)).map_err(ApiError::from)?;
        Ok(Response::new(pb::ModelConfigResponse { config: Some(model_config(&model)) }))
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let name = request.get_ref().name.clone();
        self.may_read(&request, (!name.is_empty()).then_some(name.as_str()))?;
        let r = request.into_inner();
        let models = if r.name.is_empty() {
            self.state.models.all()
        } else if r.version.is_empty() {
            let versions = self.state.models.versions(&r.name);
            if versions.is_empty() {
                // The same answer as any other call naming a model this node does not have.
                self.state.models.route(&r.name, None).map_err(ApiError::from)?;
            }
            versions
        } else {
            vec![self.state.models.route(&r.name, Some(&r.version)).map_err(ApiError::from)?]
        };
        let model_stats = models.iter().map(|m| statistics(&self.state, m)).collect();
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        self.may_read(&request, None)?;
        let only_ready = request.into_inner().ready;
        let models = self
            .state
            .models
            .index(not_ready)
            .into_iter()
            .filter(|e| !only_ready || e.state == "READY")
            .map(|e| pb::repository_index_response::ModelIndex {
                name: e.name,
                version: e.version,
                state: e.state.to_string(),
                reason: e.reason,
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        authorised(&self.state, &request)?;
        let r = request.into_inner();
        let (config, files) = load_parameters(&r.parameters).map_err(Status::invalid_argument)?;
        self.state.control.load_model(&r.model_name, config, files).await.map_err(control_failed)?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        use pb::model_repository_parameter::ParameterChoice;
        authorised(&self.state, &request)?;
        let r = request.into_inner();
        let version = match r.parameters.get("version").and_then(|p| p.parameter_choice.as_ref()) {
            None => None,
            Some(ParameterChoice::Int64Param(v)) if *v >= 0 => Some(*v as u64),
            Some(ParameterChoice::StringParam(s)) if s.parse::<u64>().is_ok() => s.parse().ok(),
            Some(other) => {
                return Err(Status::invalid_argument(format!("parameter version must be a number, got {other:?}")))
            }
        };
        self.state.control.unload(&r.model_name, version).await.map_err(control_failed)?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }
}

/// Repository calls need the admin token, as `authorization: Bearer <token>` metadata.
fn authorised<T>(state: &HttpState, request: &Request<T>) -> Result<(), Status> {
    let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
    let peer =
        request.peer_certs().and_then(|certs| certs.first().and_then(|c| fabric_proto::tls::identity_of(c).ok()));
    if repository_authorised(state, header, peer.as_ref()) {
        Ok(())
    } else {
        Err(Status::unauthenticated(REPOSITORY_NEEDS_TOKEN))
    }
}

/// Triton's load parameters over gRPC: `config` (a JSON string) and `file:<version>/model.onnx`
/// (the model's bytes).
fn load_parameters(
    params: &HashMap<String, pb::ModelRepositoryParameter>,
) -> Result<(Option<serde_json::Value>, BTreeMap<u64, Vec<u8>>), String> {
    use pb::model_repository_parameter::ParameterChoice;
    let mut config = None;
    let mut files = BTreeMap::new();
    for (key, value) in params {
        let value = value.parameter_choice.as_ref();
        if key == "config" {
            let Some(ParameterChoice::StringParam(text)) = value else {
                return Err("parameter config must be a string holding a JSON object".into());
            };
            config = Some(serde_json::from_str(text).map_err(|e| format!("parameter config: {e}"))?);
        } else if let Some(path) = key.strip_prefix("file:") {
            let version = path
                .strip_suffix("/model.onnx")
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("parameter '{key}': expected file:<version>/model.onnx"))?;
            let Some(ParameterChoice::BytesParam(bytes)) = value else {
                return Err(format!("parameter '{key}' must hold the model's bytes"));
            };
            files.insert(version, bytes.to_vec());
        }
    }
    Ok((config, files))
}

/// The model configuration in Triton's form, as the REST face's `/config` gives it.
fn model_config(model: &ServedModel) -> pb::ModelConfig {
    let meta = model.pool.metadata();
    let batched = model.pool.is_batched();
    let data_type = |d: fabric_types::dtype::DataType| {
        pb::DataType::from_str_name(&format!("TYPE_{}", d.as_str())).unwrap_or(pb::DataType::TypeInvalid) as i32
    };
    let dims = |s: &fabric_engine::TensorSpec| if batched { s.inner_dims().to_vec() } else { s.shape.clone() };
    let mut parameters = HashMap::new();
    let mut set = |k: &str, v: String| {
        parameters.insert(k.to_string(), pb::ModelParameter { string_value: v });
    };
    set("queue_capacity", model.config.queue_capacity.to_string());
    set("default_timeout_ms", model.config.default_timeout_ms.to_string());
    set("engine_choice", model.engine_reason.clone().unwrap_or_default());
    pb::ModelConfig {
        name: model.name.clone(),
        platform: platform(model).to_string(),
        backend: model.engine.to_string(),
        max_batch_size: if batched { model.pool.max_batch_size() as i32 } else { 0 },
        input: meta
            .inputs
            .iter()
            .map(|s| pb::ModelInput { name: s.name.clone(), data_type: data_type(s.datatype), dims: dims(s) })
            .collect(),
        output: meta
            .outputs
            .iter()
            .map(|s| pb::ModelOutput { name: s.name.clone(), data_type: data_type(s.datatype), dims: dims(s) })
            .collect(),
        instance_group: vec![pb::ModelInstanceGroup {
            name: model.name.clone(),
            count: model.config.replicas as i32,
            kind: if model.pool.on_gpu() {
                pb::model_instance_group::Kind::Gpu
            } else {
                pb::model_instance_group::Kind::Cpu
            } as i32,
        }],
        scheduling_choice: Some(pb::model_config::SchedulingChoice::DynamicBatching(pb::ModelDynamicBatching {
            max_queue_delay_microseconds: model.config.max_queue_delay_us,
            ..Default::default()
        })),
        parameters,
    }
}

/// A version's statistics from the node's metrics: requests answered and failed, their time, the
/// queue and compute time, and batches run.
fn statistics(state: &HttpState, model: &ServedModel) -> pb::ModelStatistics {
    let metrics = &state.metrics;
    let version = model.version_str();
    let mv = [model.name.as_str(), version.as_str()];
    let requests =
        |outcome: &str| metrics.requests.get_metric_with_label_values(&[mv[0], mv[1], outcome]).map_or(0, |c| c.get());
    let ok = requests("ok");
    let answered = metrics.request_duration.get_metric_with_label_values(&mv).map_or(0, |h| h.get_sample_count());
    let duration = |count: u64, seconds: f64| pb::StatisticDuration { count, ns: (seconds * 1e9) as u64 };
    let histogram = |h: &prometheus::HistogramVec| {
        h.get_metric_with_label_values(&mv)
            .map_or(duration(0, 0.0), |h| duration(h.get_sample_count(), h.get_sample_sum()))
    };
    let success_seconds = metrics.request_success.get_metric_with_label_values(&mv).map_or(0.0, |c| c.get());
    let total_seconds = metrics.request_duration.get_metric_with_label_values(&mv).map_or(0.0, |h| h.get_sample_sum());
    let batches = metrics.batch_size.get_metric_with_label_values(&mv).ok();
    let compute = histogram(&metrics.compute_duration);
    pb::ModelStatistics {
        name: model.name.clone(),
        version: version.clone(),
        last_inference: 0,
        inference_count: ok,
        execution_count: batches.as_ref().map_or(0, |h| h.get_sample_count()),
        inference_stats: Some(pb::InferStatistics {
            success: Some(duration(ok, success_seconds)),
            fail: Some(duration(answered.saturating_sub(ok), (total_seconds - success_seconds).max(0.0))),
            queue: Some(histogram(&metrics.queue_duration)),
            // Input and output handling run inside the replica's timed call, not apart from it: they
            // are counted with it (perf_analyzer needs the three counts equal) at 0 ns of their own.
            compute_input: Some(duration(compute.count, 0.0)),
            compute_infer: Some(compute),
            compute_output: Some(duration(compute.count, 0.0)),
        }),
        batch_stats: Vec::new(),
    }
}
