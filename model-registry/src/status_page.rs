//! The registry's read-only status page: one HTML page (plain HTML and JavaScript, no build step,
//! `status.html`) that polls `/api/status` (the registry's [`crate::service::Registry::overview`]: nodes, models,
//! rollouts with their traffic split, per-version latency and errors, autoscaling decisions) every
//! second. HTTP on a listener of its own (`--http-addr`, loopback by default), on a thread of its
//! own. It changes nothing, but it shows the whole fleet: beyond loopback it needs a token
//! (`--status-token-file` or FABRIC_STATUS_TOKEN; `?token=` or `Authorization: Bearer`), and the
//! registry refuses to serve it there without one.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

use crate::service::Replica;

/// The page, compiled in.
const PAGE: &str = include_str!("status.html");

/// The page's token, kept only as its SHA-256 digest.
struct PageToken(Option<[u8; 32]>);

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

impl PageToken {
    /// Whether the request may see the page: no token needed, or it presents the token (compared in
    /// constant time) as `?token=` or `Authorization: Bearer`.
    fn admits(&self, req: &HttpRequest) -> bool {
        use subtle::ConstantTimeEq as _;
        let Some(digest) = &self.0 else { return true };
        let from_query = web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .ok()
            .and_then(|q| q.get("token").cloned());
        let from_header = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let given = from_query.or(from_header).unwrap_or_default();
        bool::from(sha256(given.as_bytes()).ct_eq(digest))
    }
}

fn denied() -> HttpResponse {
    HttpResponse::Unauthorized().content_type("text/plain; charset=utf-8").body(
        "this status page needs its token: open it as /?token=<token> (--status-token-file or FABRIC_STATUS_TOKEN)\n",
    )
}

/// Binds `addr` and serves the page from a thread of its own; returns the bound address. Beyond
/// loopback the page needs `token`: without one that is an error.
pub fn start(replica: Arc<Replica>, addr: &str, token: Option<&str>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    if token.is_none() && !bound.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "beyond loopback the status page needs a token: pass --status-token-file or set FABRIC_STATUS_TOKEN",
        ));
    }
    let token = web::Data::new(PageToken(token.map(|t| sha256(t.as_bytes()))));
    std::thread::Builder::new().name("status-page".into()).spawn(move || {
        let served = actix_rt::System::new().block_on(async move {
            let replica = web::Data::new(replica);
            HttpServer::new(move || {
                App::new()
                    .app_data(replica.clone())
                    .app_data(token.clone())
                    .route("/", web::get().to(page))
                    .route("/api/status", web::get().to(status))
                    .route("/metrics", web::get().to(metrics))
            })
            .workers(1)
            .disable_signals()
            .listen(listener)?
            .run()
            .await
        });
        if let Err(e) = served {
            tracing::error!("the status page stopped: {e}");
        }
    })?;
    Ok(bound)
}

async fn page(token: web::Data<PageToken>, req: HttpRequest) -> HttpResponse {
    if !token.admits(&req) {
        return denied();
    }
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(PAGE)
}

/// The fleet's quality per model version (drift, live accuracy), in Prometheus' text format.
async fn metrics(replica: web::Data<Arc<Replica>>, token: web::Data<PageToken>, req: HttpRequest) -> HttpResponse {
    if !token.admits(&req) {
        return denied();
    }
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(replica.current().quality_metrics())
}

async fn status(replica: web::Data<Arc<Replica>>, token: web::Data<PageToken>, req: HttpRequest) -> HttpResponse {
    if !token.admits(&req) {
        return denied();
    }
    HttpResponse::Ok().insert_header(("cache-control", "no-store")).json(replica.current().overview())
}
