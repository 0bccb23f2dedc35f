//! The KServe v2 HTTP API over a [`ModelSet`]: a thin actix-web layer that decodes, routes to a
//! model's pool, and encodes. Shared by edge-node and cloud-hub; the binaries own the listener.
//!
//! Errors follow the protocol: a JSON body `{"error": "..."}` with 400 (bad request), 404 (unknown
//! model or version), 413 (body too large), 503 (overloaded, not ready, deadline), 500 (a replica
//! failed).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix_web::http::{header, StatusCode};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures::StreamExt;
use serde_json::{json, Map, Value};

use crate::config::{HttpConfig, ServingConfig};
use crate::control::NodeControl;
use crate::dispatch::{DispatchError, Dispatcher, Overflow};
use crate::load_report::Outcome;
use crate::metrics::Metrics;
use crate::models::{ModelSet, RouteError, ServedModel};
use crate::pool::PoolError;
use crate::shadow::{self, ShadowStats};
use fabric_proto::kserve::{self, CodecError};
use fabric_proto::wire::ErrorCode;
use fabric_types::tensor::NamedTensor;

/// What the HTTP handlers share.
pub struct HttpState {
    /// Server name for `GET /v2` (e.g. `edge-node`).
    pub server_name: String,
    /// Served models.
    pub models: Arc<ModelSet>,
    /// Metrics rendered at `/metrics`.
    pub metrics: Metrics,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Longest a request body may take to arrive (then 408).
    pub body_timeout: std::time::Duration,
    /// Set once every model is loaded.
    pub ready: AtomicBool,
    /// Where requests are served: here, a hub, or nowhere.
    pub dispatcher: Dispatcher,
    /// Live control of the models (repository and admin APIs).
    pub control: Arc<NodeControl>,
}

impl HttpState {
    /// The state for a server named `server_name` (not ready until the caller says so); call inside
    /// the actix system (control starts an arbiter).
    pub fn new(
        server_name: &str,
        models: Arc<ModelSet>,
        metrics: Metrics,
        serving: &ServingConfig,
        overflow: Option<Arc<dyn Overflow>>,
    ) -> HttpState {
        let http = &serving.http;
        HttpState {
            server_name: server_name.to_string(),
            control: NodeControl::new(server_name, serving.clone(), models.clone(), metrics.clone()),
            models,
            max_body_bytes: http.max_body_bytes,
            body_timeout: std::time::Duration::from_millis(http.body_timeout_ms),
            ready: AtomicBool::new(false),
            dispatcher: Dispatcher::new(server_name, overflow, metrics.clone()),
            metrics,
        }
    }
}

/// An error answered as `{"error": message}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind }
    }

    /// The error as a response.
    pub fn response(&self) -> HttpResponse {
        HttpResponse::build(self.status).json(json!({ "error": self.message }))
    }
}

/// The HTTP status of a failure, from what it means to a client (the wire's error code): the one
/// place statuses are decided.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest | ErrorCode::Malformed | ErrorCode::UnsupportedProtocol => StatusCode::BAD_REQUEST,
        ErrorCode::UnknownModel => StatusCode::NOT_FOUND,
        ErrorCode::Busy | ErrorCode::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        let kind = match e {
            RouteError::Unavailable { .. } => "unavailable",
            _ => "not_found",
        };
        ApiError::new(status_of(e.code()), kind, e.to_string())
    }
}

impl From<CodecError> for ApiError {
    fn from(e: CodecError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", e.to_string())
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        ApiError::new(status_of(e.code()), e.kind(), e.to_string())
    }
}

/// Registers every route of the API; needs `web::Data<HttpState>` in the app.
pub fn routes(cfg: &mut web::ServiceConfig) {
    // Infer first: actix matches routes in order, and each route with a `{segment}` costs a regex
    // match (10% of the CPU at 38k req/s when infer came last, measured with perf).
    cfg.route("/v2/models/{model}/infer", web::post().to(infer))
        .route("/v2/models/{model}/versions/{version}/infer", web::post().to(infer))
        .route("/v2/health/live", web::get().to(live))
        .route("/v2/health/ready", web::get().to(ready))
        .route("/v2", web::get().to(server_metadata))
        .route("/v2/models/{model}", web::get().to(model_metadata))
        .route("/v2/models/{model}/versions/{version}", web::get().to(model_metadata))
        .route("/v2/models/{model}/ready", web::get().to(model_ready))
        .route("/v2/models/{model}/versions/{version}/ready", web::get().to(model_ready))
        .route("/v2/models/{model}/config", web::get().to(model_config))
        .route("/v2/models/{model}/versions/{version}/config", web::get().to(model_config))
        .route("/v2/repository/index", web::post().to(repository_index))
        .configure(crate::admin::repository_routes)
        .route("/metrics", web::get().to(metrics));
}

/// The JSON error body for requests that match no route.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no route for {} {}", req.method(), req.path()))
        .response()
}

async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "live": true }))
}

/// Ready when every model version the node started with serves (Triton's strict readiness): one
/// that failed to load, or has no replica now, makes the server not ready, with the reason. Versions
/// loaded later do not count (a probe must not restart a node because a new version is warming up);
/// their own `/ready` says whether they serve.
async fn ready(state: web::Data<HttpState>) -> HttpResponse {
    if !state.ready.load(Ordering::Acquire) {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "server is loading models").response();
    }
    let unavailable: Vec<String> = state
        .models
        .index(not_ready)
        .into_iter()
        .filter(|e| e.state != "READY")
        .filter(|e| e.version.parse().is_ok_and(|v| state.models.is_startup(&e.name, v)))
        .map(|e| format!("{}/{}: {}", e.name, e.version, e.reason))
        .collect();
    if unavailable.is_empty() {
        HttpResponse::Ok().json(json!({ "ready": true }))
    } else {
        let message = format!("not every model is ready: {}", unavailable.join("; "));
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message).response()
    }
}

/// Why a served model version cannot take requests now, if it cannot.
fn not_ready(model: &ServedModel) -> Option<String> {
    (!model.pool.serving()).then(|| "no replica is loaded".to_string())
}

/// Triton's repository index: every model version known, with its state and the reason when it is
/// unavailable; `{"ready": true}` lists only the ready ones.
async fn repository_index(state: web::Data<HttpState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let only_ready = match read_json(&state, &req, payload).await {
        Ok(body) => body.get("ready").and_then(Value::as_bool).unwrap_or(false),
        Err(e) => return e.response(),
    };
    let entries: Vec<_> =
        state.models.index(not_ready).into_iter().filter(|e| !only_ready || e.state == "READY").collect();
    HttpResponse::Ok().json(entries)
}

/// Reads a small JSON body (an empty one is `{}`); 400 for anything else.
pub(crate) async fn read_json(state: &HttpState, req: &HttpRequest, payload: web::Payload) -> Result<Value, ApiError> {
    let body = read_body(req, payload, state.max_body_bytes, state.body_timeout).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", format!("the body is not valid JSON: {e}"))
    })
}

async fn server_metadata(state: web::Data<HttpState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "name": state.server_name,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_configuration", "model_repository", "metrics"],
    }))
}

fn path_model<'a>(req: &'a HttpRequest) -> (&'a str, Option<&'a str>) {
    (req.match_info().get("model").unwrap_or(""), req.match_info().get("version"))
}

fn platform(model: &ServedModel) -> &'static str {
    match model.engine {
        fabric_types::EngineKind::Tract => "tract_onnx",
        fabric_types::EngineKind::Ort => "onnxruntime_onnx",
    }
}

async fn model_metadata(state: web::Data<HttpState>, req: HttpRequest) -> HttpResponse {
    let (name, version) = path_model(&req);
    let model = match state.models.route(name, version) {
        Ok(m) => m,
        Err(e) => return ApiError::from(e).response(),
    };
    let meta = model.pool.metadata();
    let versions: Vec<String> = state.models.versions(name).iter().map(|m| m.version_str()).collect();
    HttpResponse::Ok().json(json!({
        "name": model.name,
        "versions": versions,
        "platform": platform(&model),
        "inputs": meta.inputs,
        "outputs": meta.outputs,
    }))
}

async fn model_ready(state: web::Data<HttpState>, req: HttpRequest) -> HttpResponse {
    let (name, version) = path_model(&req);
    let model = match state.models.route(name, version) {
        Ok(m) => m,
        Err(e) => return ApiError::from(e).response(),
    };
    match model.pool.status().await {
        Ok(s) if s.replicas > 0 => HttpResponse::Ok().json(json!({ "name": model.name, "ready": true })),
        Ok(s) => {
            let why = match (s.loading, s.last_error) {
                (_, Some(e)) => format!("the last replica load failed (retrying): {e}"),
                (n, None) if n > 0 => "a replica is loading".to_string(),
                _ => "no replica is loading".to_string(),
            };
            let message = format!("model '{}' version {} has no replica ready: {why}", model.name, model.version);
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message).response()
        }
        Err(e) => ApiError::from(e).response(),
    }
}

/// The model's configuration in the form Triton's client tools read.
async fn model_config(state: web::Data<HttpState>, req: HttpRequest) -> HttpResponse {
    let (name, version) = path_model(&req);
    let model = match state.models.route(name, version) {
        Ok(m) => m,
        Err(e) => return ApiError::from(e).response(),
    };
    let meta = model.pool.metadata();
    let batched = model.pool.is_batched();
    let tensors = |specs: &[fabric_engine::TensorSpec]| -> Vec<Value> {
        specs
            .iter()
            .map(|s| {
                let dims = if batched { s.inner_dims() } else { &s.shape[..] };
                json!({ "name": s.name, "data_type": format!("TYPE_{}", s.datatype), "dims": dims })
            })
            .collect()
    };
    HttpResponse::Ok().json(json!({
        "name": model.name,
        "platform": platform(&model),
        "backend": model.engine,
        "max_batch_size": if batched { model.pool.max_batch_size() } else { 0 },
        "input": tensors(&meta.inputs),
        "output": tensors(&meta.outputs),
        "dynamic_batching": { "max_queue_delay_microseconds": model.config.max_queue_delay_us },
        "instance_group": [{ "count": model.config.replicas, "kind": if model.pool.on_gpu() { "KIND_GPU" } else { "KIND_CPU" } }],
        "parameters": {
            "queue_capacity": model.config.queue_capacity,
            "default_timeout_ms": model.config.default_timeout_ms,
            "engine_choice": model.engine_reason,
        },
    }))
}

async fn metrics(state: web::Data<HttpState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render())
}

/// Reads the body, refusing anything over the limit before buffering it, and anything that takes
/// longer than `timeout` to arrive (408). Memory grows with the bytes that arrive, never past the
/// declared length: a client that declares 64 MiB and sends nothing costs nothing.
async fn read_body(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Vec<u8>, ApiError> {
    match tokio::time::timeout(timeout, read_body_chunks(req, payload, limit)).await {
        Ok(body) => body,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the request body did not arrive within {} ms", timeout.as_millis()),
        )),
    }
}

async fn read_body_chunks(req: &HttpRequest, mut payload: web::Payload, limit: usize) -> Result<Vec<u8>, ApiError> {
    let too_large = |n: String| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body of {n} bytes exceeds the limit of {limit} bytes"),
        )
    };
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared.filter(|&n| n > limit) {
        return Err(too_large(n.to_string()));
    }
    let mut body: Vec<u8> = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", format!("reading the body failed: {e}"))
        })?;
        if body.len() + chunk.len() > limit {
            return Err(too_large(format!("more than {limit}")));
        }
        if body.capacity() - body.len() < chunk.len() {
            // Double what has arrived, but never reserve past the declared length (the exact size
            // once it is near): memory follows the bytes, and a 64 MiB body costs 64 MiB, not 128.
            let wanted = (body.len() + chunk.len()).max(body.len() * 2).max(64 << 10);
            let cap = declared.filter(|&n| n >= body.len() + chunk.len()).map_or(wanted, |n| wanted.min(n));
            body.reserve_exact(cap - body.len());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The served result of one request, encoded.
struct Served {
    response: kserve::EncodedResponse,
}

/// Reads and decodes an infer request's body.
async fn read_request(
    state: &HttpState,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<kserve::DecodedRequest, ApiError> {
    let body = read_body(req, payload, state.max_body_bytes, state.body_timeout).await?;
    let header_length = match req.headers().get(kserve::HEADER_LENGTH) {
        None => None,
        Some(v) => Some(v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                "Inference-Header-Content-Length is not a byte count",
            )
        })?),
    };
    Ok(kserve::decode_request(&body, header_length)?)
}

async fn serve(
    state: &HttpState,
    model: &ServedModel,
    shadow: Option<(Arc<ServedModel>, Arc<ShadowStats>)>,
    request: kserve::DecodedRequest,
    arrived: Instant,
) -> Result<Served, ApiError> {
    // The version's load report counts the request from here: its latency is the version's own (queue,
    // compute or hub), not the time to receive and decode the body, which no version changes.
    let stats = model.pool.stats();
    let at = Instant::now();
    stats.arrival(at);
    let result = dispatch(state, model, shadow, request, arrived).await;
    let outcome = match &result {
        Ok((_, Some(_))) => Outcome::Served,
        Ok((_, None)) => Outcome::Offloaded,
        Err(e) => Outcome::Rejected(e.kind),
    };
    let finished = result.as_ref().ok().and_then(|(_, f)| *f).unwrap_or_else(Instant::now);
    stats.answer(at, finished, outcome);
    result.map(|(served, _)| served)
}

/// Validates, dispatches and encodes; says when the replica answered (`None`: a hub served it).
async fn dispatch(
    state: &HttpState,
    model: &ServedModel,
    shadow: Option<(Arc<ServedModel>, Arc<ShadowStats>)>,
    request: kserve::DecodedRequest,
    arrived: Instant,
) -> Result<(Served, Option<Instant>), ApiError> {
    // Validate here, before any route is chosen: a request that does not fit the model gets its 400
    // whether it would have been served locally or by a hub.
    model.pool.metadata().validate(&request.inputs, model.pool.max_batch_size()).map_err(PoolError::Input)?;
    kserve::check_outputs(&request.outputs, model.pool.metadata().outputs.iter().map(|o| o.name.as_str()))?;
    let deadline = arrived + request.timeout.unwrap_or_else(|| model.config.default_timeout());
    // A shadow copy runs beside the request; it gets the primary's outputs to compare, never the client.
    let compare = shadow.map(|(shadow, stats)| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        shadow::spawn(shadow, stats, request.inputs.clone(), deadline, rx);
        tx
    });
    let done = state.dispatcher.infer(model, request.inputs, deadline).await.map_err(|e| match e {
        DispatchError::Pool(e) => ApiError::from(e),
        DispatchError::Invalid(msg) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", msg),
    })?;
    if let Some(tx) = compare {
        let _ = tx.send(done.outputs.clone());
    }
    let finished = done.finished;
    let response = finish(model, &request.id, &request.outputs, done.served_by, done.batch_rows, done.outputs)?;
    Ok((Served { response }, finished))
}

/// Encodes outputs with the response parameters saying where they were served.
fn finish(
    model: &ServedModel,
    id: &Option<String>,
    selection: &kserve::OutputSelection,
    served_by: String,
    batch_rows: Option<usize>,
    outputs: Vec<NamedTensor>,
) -> Result<kserve::EncodedResponse, ApiError> {
    let mut parameters: Map<String, Value> = Map::new();
    parameters.insert("served_by".into(), Value::from(served_by));
    if let Some(rows) = batch_rows {
        parameters.insert("batch_rows".into(), Value::from(rows));
    }
    Ok(kserve::encode_response(&model.name, &model.version_str(), id.as_deref(), &parameters, &outputs, selection)?)
}

async fn infer(state: web::Data<HttpState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let arrived = Instant::now();
    let (name, version) = path_model(&req);
    // An unknown model is answered before its body is read.
    let known = match state.models.route(name, version) {
        Ok(m) => m,
        Err(e) => return ApiError::from(e).response(),
    };
    // The version is chosen once the body is read: the traffic policy routes by the request's id.
    // Requests that reach a version are counted in its load report by `serve`.
    let (model, result) = match read_request(&state, &req, payload).await {
        Err(e) => (known, Err(e)),
        Ok(request) => match state.models.route_infer(name, version, request.id.as_deref()) {
            Err(e) => (known, Err(ApiError::from(e))),
            Ok(routed) => {
                drop(known);
                let result = serve(&state, &routed.model, routed.shadow, request, arrived).await;
                (routed.model, result)
            }
        },
    };
    let version = model.version_str();
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.kind,
    };
    let latency = arrived.elapsed();
    state.metrics.requests.with_label_values(&[model.name.as_str(), &version, outcome]).inc();
    state.metrics.request_duration.with_label_values(&[model.name.as_str(), &version]).observe(latency.as_secs_f64());
    match result {
        Ok(Served { response }) => match response.header_length {
            None => HttpResponse::Ok().content_type("application/json").body(response.body),
            Some(n) => HttpResponse::Ok()
                .content_type("application/octet-stream")
                .insert_header((kserve::HEADER_LENGTH, n.to_string()))
                .body(response.body),
        },
        Err(e) => {
            if e.status.is_server_error() && e.status != StatusCode::SERVICE_UNAVAILABLE {
                tracing::error!(model = %model.name, "{}", e.message);
            }
            e.response()
        }
    }
}

/// Starts the registry agent when the config names a registry (the node's identity comes from its
/// certificate, `tls`, whose role must match), else the node's own autoscaler when it is on.
pub fn start_registry_or_autoscaler(
    state: &HttpState,
    serving: &ServingConfig,
    tls: Option<&fabric_proto::tls::TlsFiles>,
    role: fabric_proto::tls::Role,
    http: SocketAddr,
    quic: Option<SocketAddr>,
) -> Result<(), String> {
    if serving.registry.addr.is_none() {
        // On its own, the node sizes its pools itself.
        if serving.autoscale.enabled {
            crate::scaler::start(state.control.clone(), &serving.autoscale).map_err(|e| e.to_string())?;
        }
        return Ok(());
    }
    let tls = tls.ok_or("--registry needs the node's certificates: pass --certs")?;
    let identity = fabric_proto::tls::own_identity(tls).map_err(|e| e.to_string())?;
    if identity.role != role {
        return Err(format!(
            "the certificate {} is for a {}, not a {}",
            tls.cert.display(),
            identity.role.as_str(),
            role.as_str()
        ));
    }
    let (cores, memory_mib) = crate::agent::machine();
    let info = fabric_proto::registry::NodeInfo {
        node_id: identity.node_id,
        role: role.as_str().to_string(),
        labels: serving.registry.labels.clone(),
        engines: vec![serving.models.engine.to_string()],
        cores,
        memory_mib,
        gpu: None,
        http: format!("http://{http}"),
        quic: quic.map(|a| a.to_string()),
    };
    let overflow = state.dispatcher.overflow().cloned();
    crate::agent::start(&serving.registry, tls, state.control.clone(), overflow, info).map_err(|e| e.to_string())
}

/// Binds the API on the configured address; returns the server (to run) and the bound addresses.
pub fn bind(
    state: web::Data<HttpState>,
    config: &HttpConfig,
) -> std::io::Result<(actix_web::dev::Server, Vec<SocketAddr>)> {
    let max_body = config.max_body_bytes;
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            // Our own reader enforces the limit; this only lifts actix's smaller default for extractors.
            .app_data(web::PayloadConfig::new(max_body))
            .configure(routes)
            .default_service(web::to(not_found))
    })
    .shutdown_timeout(config.shutdown_timeout_s)
    .bind(&config.addr)?;
    if config.workers > 0 {
        server = server.workers(config.workers);
    }
    let addrs = server.addrs();
    Ok((server.run(), addrs))
}
