//! The registry's read-only status page: one HTML page (plain HTML and JavaScript, no build step,
//! `status.html`) that polls `/api/status` (the registry's [`crate::service::Registry::overview`]: nodes, models,
//! rollouts with their traffic split, per-version latency and errors, autoscaling decisions) every
//! second. HTTP on a listener of its own (`--http-addr`, loopback by default), on a thread of its
//! own; it changes nothing, so it asks for no certificate: keep it on loopback or behind your proxy.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::{web, App, HttpResponse, HttpServer};

use crate::service::Replica;

/// The page, compiled in.
const PAGE: &str = include_str!("status.html");

/// Binds `addr` and serves the page from a thread of its own; returns the bound address.
pub fn start(replica: Arc<Replica>, addr: &str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new().name("status-page".into()).spawn(move || {
        let served = actix_rt::System::new().block_on(async move {
            let replica = web::Data::new(replica);
            HttpServer::new(move || {
                App::new()
                    .app_data(replica.clone())
                    .route("/", web::get().to(page))
                    .route("/api/status", web::get().to(status))
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

async fn page() -> HttpResponse {
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(PAGE)
}

async fn status(replica: web::Data<Arc<Replica>>) -> HttpResponse {
    HttpResponse::Ok().insert_header(("cache-control", "no-store")).json(replica.current().overview())
}
