//! The HTTP faces of live control, both thin over [`NodeControl`]:
//!
//! - Triton's model-repository extension on the main API: `POST /v2/repository/models/{m}/load`
//!   (parameters `config`, a JSON override, and `file:<version>/model.onnx`, base64 bytes) and
//!   `.../unload` (extension: parameter `version` unloads one version). Carried out only with
//!   `--model-control explicit`, and only for a caller presenting the admin token.
//! - The admin API on a listener of its own (`/v2/fabric/...`, JSON): the load report, traffic
//!   policies and pool settings. Mutating calls need `Authorization: Bearer <token>` (or, over mutual
//!   TLS, an operator's client certificate).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::Engine as _;
use serde_json::{json, Value};

use super::state::{not_found, read_json, status_of, HttpState};
use super::tls::{remember_peer, tls_config, PeerIdentity};
use crate::clients::AdminToken;
use crate::config::{AdminConfig, PortTlsConfig};
use crate::control::ControlError;
use fabric_policy::traffic::{PolicyError, TrafficPolicy};
use fabric_proto::tls::{Identity, Role};

/// The HTTP status of a control failure.
pub fn control_status(e: &ControlError) -> StatusCode {
    match e {
        ControlError::Disabled => StatusCode::FORBIDDEN,
        ControlError::Route(e) => status_of(e.code()),
        ControlError::NotInRepository { .. } | ControlError::Policy(PolicyError::UnknownModel(_)) => {
            StatusCode::NOT_FOUND
        }
        ControlError::Invalid(_) | ControlError::LoadFailed { .. } | ControlError::Policy(_) => StatusCode::BAD_REQUEST,
        ControlError::InUse(_) => StatusCode::CONFLICT,
        ControlError::Resize { .. } | ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": message.to_string() }))
}

fn control_error(e: ControlError) -> HttpResponse {
    let status = control_status(&e);
    if status.is_server_error() {
        tracing::error!("control: {e}");
    }
    error(status, e)
}

/// Registers the repository load and unload routes (the index is in [`super::kserve_api`]).
pub fn repository_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v2/repository/models/{model}/load", web::post().to(repository_load))
        .route("/v2/repository/models/{model}/unload", web::post().to(repository_unload));
}

fn model_of(req: &HttpRequest) -> String {
    req.match_info().get("model").unwrap_or_default().to_string()
}

/// The `parameters` object of a repository request (an empty body has none).
async fn parameters(state: &HttpState, req: &HttpRequest, payload: web::Payload) -> Result<Value, HttpResponse> {
    let body = read_json(state, req, payload).await.map_err(|e| e.response())?;
    Ok(body.get("parameters").cloned().unwrap_or(Value::Null))
}

async fn repository_load(state: web::Data<HttpState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    if let Some(denied) = repository_denied(&state, &req) {
        return denied;
    }
    let name = model_of(&req);
    let params = match parameters(&state, &req, payload).await {
        Ok(p) => p,
        Err(response) => return response,
    };
    let (config, files) = match load_parameters(&params) {
        Ok(parsed) => parsed,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match state.control.load_model(&name, config, files).await {
        Ok(loaded) => HttpResponse::Ok().json(json!({ "loaded": loaded })),
        Err(e) => control_error(e),
    }
}

/// Triton's load parameters: `config` (a JSON object, or a string holding one) and
/// `file:<version>/model.onnx` entries (base64 model bytes).
fn load_parameters(params: &Value) -> Result<(Option<Value>, BTreeMap<u64, Vec<u8>>), String> {
    let mut config = None;
    let mut files = BTreeMap::new();
    let Some(params) = params.as_object() else {
        return Ok((None, files));
    };
    for (key, value) in params {
        if key == "config" {
            config = Some(match value {
                Value::String(text) => serde_json::from_str(text).map_err(|e| format!("parameter config: {e}"))?,
                other => other.clone(),
            });
        } else if let Some(path) = key.strip_prefix("file:") {
            let version = path
                .strip_suffix("/model.onnx")
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| format!("parameter '{key}': expected file:<version>/model.onnx"))?;
            let text = value.as_str().ok_or_else(|| format!("parameter '{key}' must be a base64 string"))?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|e| format!("parameter '{key}' is not base64: {e}"))?;
            files.insert(version, bytes);
        }
    }
    Ok((config, files))
}

async fn repository_unload(state: web::Data<HttpState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    if let Some(denied) = repository_denied(&state, &req) {
        return denied;
    }
    let name = model_of(&req);
    let params = match parameters(&state, &req, payload).await {
        Ok(p) => p,
        Err(response) => return response,
    };
    let version = match params.get("version") {
        None => None,
        Some(v) => match v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())) {
            Some(v) => Some(v),
            None => return error(StatusCode::BAD_REQUEST, format!("parameter version must be a number, got {v}")),
        },
    };
    match state.control.unload(&name, version).await {
        Ok(unloaded) => HttpResponse::Ok().json(json!({ "unloaded": unloaded })),
        Err(e) => control_error(e),
    }
}

/// What a repository call without the admin token is told (both faces).
pub const REPOSITORY_NEEDS_TOKEN: &str =
    "the repository API (load, unload) needs 'Authorization: Bearer <token>' with the node's admin token, or an operator client certificate over mutual TLS";

/// Whether a repository call may go ahead: it presents the node's admin token, or comes over mutual
/// TLS with a certificate of the fabric's operator role (`peer`).
pub fn repository_authorised(state: &HttpState, authorization: Option<&str>, peer: Option<&Identity>) -> bool {
    peer.is_some_and(|p| p.role == Role::Operator)
        || state.repository_token.as_ref().is_some_and(|t| t.matches_bearer(authorization))
}

fn repository_denied(state: &HttpState, req: &HttpRequest) -> Option<HttpResponse> {
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let peer = req.conn_data::<PeerIdentity>().map(|p| &p.0);
    (!repository_authorised(state, header, peer)).then(|| error(StatusCode::UNAUTHORIZED, REPOSITORY_NEEDS_TOKEN))
}

/// Registers the admin API's routes; needs `web::Data<HttpState>` and the token in the app.
fn admin_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v2/fabric/load", web::get().to(load_report))
        .route("/v2/fabric/models/{model}/policy", web::get().to(get_policy))
        .route("/v2/fabric/models/{model}/policy", web::put().to(put_policy))
        .route("/v2/fabric/models/{model}/policy", web::delete().to(delete_policy))
        .route("/v2/fabric/models/{model}/versions/{version}/config", web::put().to(put_config));
}

/// Checks a mutating call: the bearer token, or (over mutual TLS) an operator's client certificate.
fn authorised(req: &HttpRequest, token: &AdminToken) -> Result<(), HttpResponse> {
    if req.method() == Method::GET {
        return Ok(());
    }
    let operator = req.conn_data::<PeerIdentity>().is_some_and(|p| p.0.role == Role::Operator);
    if operator || token.matches_bearer(req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())) {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "this admin call needs 'Authorization: Bearer <token>' with the node's admin token",
        ))
    }
}

async fn load_report(state: web::Data<HttpState>) -> HttpResponse {
    HttpResponse::Ok().json(state.control.report().await)
}

async fn get_policy(state: web::Data<HttpState>, req: HttpRequest) -> HttpResponse {
    match state.control.models().policy(&model_of(&req)) {
        Ok((policy, shadow)) => {
            HttpResponse::Ok().json(json!({ "policy": policy, "shadow": shadow.map(|s| s.report()) }))
        }
        Err(e) => control_error(e.into()),
    }
}

async fn put_policy(
    state: web::Data<HttpState>,
    token: web::Data<AdminToken>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    if let Err(denied) = authorised(&req, &token) {
        return denied;
    }
    let body = match read_json(&state, &req, payload).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    let policy: TrafficPolicy = match serde_json::from_value(body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid policy ({e}); expected {{\"weights\": {{\"1\": 90, \"2\": 10}}, \"shadow\": {{\"version\": 3, \"percent\": 10}}}}"),
            )
        }
    };
    match state.control.set_policy(&model_of(&req), Some(policy.clone())) {
        Ok(()) => HttpResponse::Ok().json(json!({ "policy": policy })),
        Err(e) => control_error(e),
    }
}

async fn delete_policy(state: web::Data<HttpState>, token: web::Data<AdminToken>, req: HttpRequest) -> HttpResponse {
    if let Err(denied) = authorised(&req, &token) {
        return denied;
    }
    match state.control.set_policy(&model_of(&req), None) {
        Ok(()) => HttpResponse::Ok().json(json!({ "policy": null })),
        Err(e) => control_error(e),
    }
}

async fn put_config(
    state: web::Data<HttpState>,
    token: web::Data<AdminToken>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    if let Err(denied) = authorised(&req, &token) {
        return denied;
    }
    let name = model_of(&req);
    let Some(version) = req.match_info().get("version").and_then(|v| v.parse::<u64>().ok()) else {
        return error(StatusCode::BAD_REQUEST, "the version must be a number");
    };
    let changes = match read_json(&state, &req, payload).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    match state.control.reconfigure(&name, version, &changes).await {
        Ok(config) => HttpResponse::Ok().json(json!({ "name": name, "version": version, "config": config })),
        Err(e) => control_error(e),
    }
}

/// Binds the admin API (one worker: it is small and rarely called), over the node's TLS when it has
/// one; returns the server and address.
pub fn bind(
    state: web::Data<HttpState>,
    config: &AdminConfig,
    tls: &PortTlsConfig,
) -> Result<(actix_web::dev::Server, SocketAddr), String> {
    let token = web::Data::new(AdminToken::new(&config.resolve_token()?));
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(token.clone())
            .configure(admin_routes)
            .default_service(web::to(not_found))
    })
    .on_connect(remember_peer)
    .workers(1);
    let failed = |e: std::io::Error| format!("admin API on {}: {e}", config.addr);
    let server = match tls_config(tls, &[b"http/1.1"]).map_err(failed)? {
        Some(rustls) => server.bind_rustls_0_23(&config.addr, rustls).map_err(failed)?,
        None => server.bind(&config.addr).map_err(failed)?,
    };
    let addr = server.addrs().first().copied().ok_or("the admin API bound no address")?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the admin API listens beyond this machine: keep it behind TLS");
    }
    Ok((server.run(), addr))
}

/// Starts the admin API when the config turns it on; returns its address.
pub fn start(
    state: &web::Data<HttpState>,
    config: &AdminConfig,
    tls: &PortTlsConfig,
) -> Result<Option<SocketAddr>, String> {
    if !config.enabled {
        return Ok(None);
    }
    let (server, addr) = bind(state.clone(), config, tls)?;
    actix_rt::spawn(server);
    tracing::info!(%addr, "admin API listening");
    Ok(Some(addr))
}

#[cfg(test)]
mod tests {
    use crate::clients::AdminToken;

    #[test]
    fn the_admin_token_matches_only_itself() {
        let token = AdminToken::new("s3cret-admin-token");
        let cases: &[(&[u8], bool)] = &[
            (b"s3cret-admin-token", true),
            (b"s3cret-admin-toke", false),
            (b"s3cret-admin-token ", false),
            (b"S3cret-admin-token", false),
            (b"", false),
            (b"s3cret-admin-token-and-more", false),
        ];
        for (given, want) in cases {
            assert_eq!(token.matches(given), *want, "{:?}", String::from_utf8_lossy(given));
        }
    }
}
