//! What the HTTP handlers share: the state behind both APIs, the error type and how a failure
//! becomes a status (the one place statuses are decided), and reading request bodies within their
//! size and time limits.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::clients::{AdminToken, Clients, Refusal};
use crate::config::ServingConfig;
use crate::control::NodeControl;
use crate::dispatch::{Dispatcher, Overflow};
use crate::metrics::Metrics;
use crate::models::{ModelSet, RouteError};
use crate::pool::PoolError;
use fabric_proto::kserve::CodecError;
use fabric_proto::wire::ErrorCode;

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
    /// The admin token repository calls (load, unload) must present, when the node has one.
    pub repository_token: Option<AdminToken>,
    /// Client keys and quotas (empty: the API is open).
    pub clients: Clients,
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
        models.set_configured_cascades(&serving.cascade);
        let http = &serving.http;
        HttpState {
            server_name: server_name.to_string(),
            control: NodeControl::new(server_name, serving.clone(), models.clone(), metrics.clone()),
            models,
            max_body_bytes: http.max_body_bytes,
            body_timeout: std::time::Duration::from_millis(http.body_timeout_ms),
            ready: AtomicBool::new(false),
            repository_token: serving.admin.resolve_token().ok().map(|t| AdminToken::new(&t)),
            // Checked at start (boot::load_models); a config that fails here refuses every key.
            clients: Clients::new(&serving.clients).unwrap_or_else(|e| {
                tracing::error!("clients: {e}; refusing every client key");
                Clients::refusing_all()
            }),
            dispatcher: Dispatcher::new(server_name, overflow, metrics.clone()),
            metrics,
        }
    }
}

/// An error answered as `{"error": message}` with a status.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status answered.
    pub(crate) status: StatusCode,
    /// What the body's `error` says.
    pub(crate) message: String,
    /// The failure's kind, as the load report and metrics count it.
    pub(crate) kind: &'static str,
    /// When to try again (429: answered as `Retry-After`, whole seconds rounded up).
    pub(crate) retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, retry_after: None }
    }

    /// `Retry-After` in whole seconds, at least 1.
    pub(crate) fn retry_after_s(&self) -> Option<u64> {
        self.retry_after.map(|d| d.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// A 400 for a request that does not fit the model.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }

    /// The error as a response.
    pub fn response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(s) = self.retry_after_s() {
            response.insert_header((header::RETRY_AFTER, s.to_string()));
        }
        response.json(json!({ "error": self.message }))
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

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        ApiError { status: r.status, message: r.message, kind: r.kind, retry_after: r.retry_after }
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

/// The JSON error body for requests that match no route.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no route for {} {}", req.method(), req.path()))
        .response()
}

/// Reads a small JSON body (an empty one is `{}`); 400 for anything else.
pub async fn read_json(state: &HttpState, req: &HttpRequest, payload: web::Payload) -> Result<Value, ApiError> {
    let body = read_body(req, payload, state.max_body_bytes, state.body_timeout).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", format!("the body is not valid JSON: {e}"))
    })
}

/// Reads the body, refusing anything over the limit before buffering it, and anything that takes
/// longer than `timeout` to arrive (408). Memory grows with the bytes that arrive, never past the
/// declared length: a client that declares 64 MiB and sends nothing costs nothing.
pub(super) async fn read_body(
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
