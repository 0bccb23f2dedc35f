//! The KServe v2 HTTP API over a [`ModelSet`](crate::models::ModelSet): health, metadata, the
//! repository index, metrics and infer. A thin layer that decodes, dispatches to a model's pool (or
//! a hub) and encodes.
//!
//! Errors follow the protocol: a JSON body `{"error": "..."}` with 400 (bad request), 404 (unknown
//! model or version), 413 (body too large), 503 (overloaded, not ready, deadline), 500 (a replica
//! failed).

use std::sync::atomic::Ordering;
use std::time::Instant;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::infer;
use super::state::{read_body, read_json, ApiError, HttpState};
use crate::models::ServedModel;
use fabric_proto::kserve;
use fabric_types::tensor::NamedTensor;

/// Registers the KServe v2 routes (the repository load and unload routes are in [`super::admin`]);
/// needs `web::Data<HttpState>` in the app.
pub fn routes(cfg: &mut web::ServiceConfig) {
    // Infer first: actix matches routes in order, and each route with a `{segment}` costs a regex
    // match (10% of the CPU at 38k req/s when infer came last, measured with perf).
    cfg.route("/v2/models/{model}/infer", web::post().to(infer))
        .route("/v2/models/{model}/versions/{version}/infer", web::post().to(infer))
        .route("/v2/models/{model}/feedback", web::post().to(feedback))
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
        .route("/metrics", web::get().to(metrics));
}

async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "live": true }))
}

/// Ready when every model version the node started with serves (Triton's strict readiness): one
/// that failed to load, or has no replica now, makes the server not ready, with the reason. Versions
/// loaded later do not count (a probe must not restart a node because a new version is warming up);
/// their own `/ready` says whether they serve.
async fn ready(state: web::Data<HttpState>) -> HttpResponse {
    match readiness(&state) {
        Ok(()) => HttpResponse::Ok().json(json!({ "ready": true })),
        Err(message) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message).response(),
    }
}

/// Whether the server is ready (see [`ready`]), or why not; both faces answer from it.
pub(crate) fn readiness(state: &HttpState) -> Result<(), String> {
    if !state.ready.load(Ordering::Acquire) {
        return Err("server is loading models".into());
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
        Ok(())
    } else {
        Err(format!("not every model is ready: {}", unavailable.join("; ")))
    }
}

/// Why a served model version cannot take requests now, if it cannot.
pub(crate) fn not_ready(model: &ServedModel) -> Option<String> {
    (!model.pool.serving()).then(|| "no replica is loaded".to_string())
}

/// Triton's repository index: every model version known, with its state and the reason when it is
/// unavailable; `{"ready": true}` lists only the ready ones.
async fn repository_index(state: web::Data<HttpState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    if let Err(denied) = may_read(&state, &req, None) {
        return denied;
    }
    let only_ready = match read_json(&state, &req, payload).await {
        Ok(body) => body.get("ready").and_then(Value::as_bool).unwrap_or(false),
        Err(e) => return e.response(),
    };
    let entries: Vec<_> =
        state.models.index(not_ready).into_iter().filter(|e| !only_ready || e.state == "READY").collect();
    HttpResponse::Ok().json(entries)
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

pub(crate) fn platform(model: &ServedModel) -> &'static str {
    match model.engine {
        fabric_types::EngineKind::Tract => "tract_onnx",
        fabric_types::EngineKind::Ort => "onnxruntime_onnx",
    }
}

async fn model_metadata(state: web::Data<HttpState>, req: HttpRequest) -> HttpResponse {
    let (name, version) = path_model(&req);
    if let Err(denied) = may_read(&state, &req, Some(name)) {
        return denied;
    }
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
    if let Err(denied) = may_read(&state, &req, Some(name)) {
        return denied;
    }
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
    if let Err(denied) = may_read(&state, &req, Some(name)) {
        return denied;
    }
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

/// Encodes outputs with the response parameters saying where they were served.
fn finish(
    model: &ServedModel,
    id: &Option<String>,
    selection: &kserve::OutputSelection,
    served_by: String,
    batch_rows: Option<usize>,
    cascade: Option<crate::dispatch::Cascaded>,
    outputs: Vec<NamedTensor>,
) -> Result<kserve::EncodedResponse, ApiError> {
    let mut parameters: Map<String, Value> = Map::new();
    parameters.insert("served_by".into(), Value::from(served_by));
    if let Some(rows) = batch_rows {
        parameters.insert("batch_rows".into(), Value::from(rows));
    }
    if let Some(c) = cascade {
        // Which model's outputs these are: the small one here, or the big one on a hub.
        parameters.insert("answered_by_model".into(), Value::from(c.answered_by));
        parameters.insert("cascade".into(), Value::from(c.outcome));
        if let Some(note) = c.note {
            parameters.insert("cascade_note".into(), Value::from(note));
        }
    }
    Ok(kserve::encode_response(&model.name, &model.version_str(), id.as_deref(), &parameters, &outputs, selection)?)
}

/// The request's `Authorization` header, for the client-key checks.
fn authorization(req: &HttpRequest) -> Option<&str> {
    req.headers().get(actix_web::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok())
}

/// The client-key check of a read about `model` (`None`: about the repository).
fn may_read(state: &HttpState, req: &HttpRequest, model: Option<&str>) -> Result<(), HttpResponse> {
    state.clients.check(authorization(req), model, &state.metrics).map_err(|e| ApiError::from(e).response())
}

/// Most labels one feedback request may carry.
const MAX_FEEDBACK: usize = 10_000;

/// One request's true labels: `label` for a one-row request, `labels` (one per row) for any.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Labelled {
    id: String,
    #[serde(default)]
    label: Option<i64>,
    #[serde(default)]
    labels: Option<Vec<i64>>,
}

/// `POST /v2/models/{model}/feedback` with `{"feedback": [{"id": "...", "label": 3}, ...]}`: the true
/// labels of answered requests, by the id the request carried, counted into the live accuracy of
/// the version that answered each. Ids with no prediction kept (unknown, forgotten after 100,000
/// newer ones, labelled already) are listed back, not counted.
async fn feedback(state: web::Data<HttpState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let name = req.match_info().get("model").unwrap_or_default().to_string();
    if let Err(response) = may_read(&state, &req, Some(&name)) {
        return response;
    }
    if let Err(e) = infer::known(&state, &name, None) {
        return e.response();
    }
    let body = match read_json(&state, &req, payload).await {
        Ok(v) => v,
        Err(e) => return e.response(),
    };
    let invalid = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", message).response();
    let items: Vec<Labelled> = match serde_json::from_value(body["feedback"].clone()) {
        Ok(items) => items,
        Err(e) => {
            return invalid(format!(
                "feedback must be {{\"feedback\": [{{\"id\": REQUEST_ID, \"label\": CLASS}} or {{\"id\": REQUEST_ID, \"labels\": [CLASS, ...]}}, ...]}}: {e}"
            ))
        }
    };
    if items.len() > MAX_FEEDBACK {
        return invalid(format!("{} labels in one request; send at most {MAX_FEEDBACK}", items.len()));
    }
    let versions = state.models.versions(&name);
    let now = Instant::now();
    let (mut labelled, mut correct) = (0u64, 0u64);
    let mut unknown = Vec::new();
    let mut refused = Vec::new();
    for item in items {
        let labels = match (item.label, item.labels) {
            (Some(l), None) => vec![l],
            (None, Some(ls)) if !ls.is_empty() => ls,
            _ => {
                refused.push(json!({ "id": item.id, "error": "give either label or labels (one per row)" }));
                continue;
            }
        };
        let Some(version) = versions.iter().find(|m| m.quality.knows(&item.id)) else {
            state.metrics.feedback_unknown.with_label_values(&[name.as_str()]).inc();
            unknown.push(item.id);
            continue;
        };
        match version.quality.feedback(now, &item.id, &labels) {
            Ok(Some(right)) => {
                labelled += labels.len() as u64;
                correct += right;
                let v = version.version_str();
                let counter =
                    |outcome: &str| state.metrics.feedback_labels.with_label_values(&[name.as_str(), &v, outcome]);
                counter("correct").inc_by(right);
                counter("wrong").inc_by(labels.len() as u64 - right);
            }
            Ok(None) => unknown.push(item.id),
            Err(e) => refused.push(json!({ "id": item.id, "error": e.to_string() })),
        }
    }
    HttpResponse::Ok().json(json!({
        "model_name": name,
        "labelled": labelled,
        "correct": correct,
        "unknown": unknown,
        "refused": refused,
    }))
}

async fn infer(state: web::Data<HttpState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let arrived = Instant::now();
    let (name, version) = path_model(&req);
    // The caller's key and quota first: its place is held until the answer is built.
    let admitted = match state.clients.admit(authorization(&req), name, &state.metrics) {
        Ok(admitted) => admitted,
        Err(e) => return ApiError::from(e).response(),
    };
    // An unknown model is answered before its body is read.
    let known = match infer::known(&state, name, version) {
        Ok(m) => m,
        Err(e) => return e.response(),
    };
    let mut request = read_request(&state, &req, payload).await;
    if let Ok(request) = &mut request {
        admitted.apply_priority(request);
    }
    let encode = |model: &ServedModel, o: infer::Outputs| {
        finish(model, &o.id, &o.selection, o.served_by, o.batch_rows, o.cascade, o.outputs)
    };
    let (model, result) = infer::serve(&state, known, name, version, request, arrived, encode).await;
    match result {
        Ok(response) => match response.header_length {
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
