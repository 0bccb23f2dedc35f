//! The node's HTTP server: the KServe v2 routes and the repository routes in one app, with the JSON
//! 404 for anything else, bound on the configured address, over TLS when the config says so (the
//! client's certificate, under mutual TLS, is kept with its connection for the handlers).

use std::net::SocketAddr;

use actix_web::{web, App, HttpServer};

use super::state::{not_found, HttpState};
use super::tls::{remember_peer, tls_config};
use super::{admin, kserve_api};
use crate::config::{HttpConfig, PortTlsConfig};

/// Binds the API on the configured address (over TLS when `tls` is on); returns the server (to
/// run) and the bound addresses.
pub fn bind(
    state: web::Data<HttpState>,
    config: &HttpConfig,
    tls: &PortTlsConfig,
) -> std::io::Result<(actix_web::dev::Server, Vec<SocketAddr>)> {
    let max_body = config.max_body_bytes;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            // Our own reader enforces the limit; this only lifts actix's smaller default for extractors.
            .app_data(web::PayloadConfig::new(max_body))
            .configure(kserve_api::routes)
            .configure(admin::repository_routes)
            .default_service(web::to(not_found))
    })
    .on_connect(remember_peer)
    .shutdown_timeout(config.shutdown_timeout_s);
    let mut server = match tls_config(tls, &[b"h2", b"http/1.1"])? {
        Some(rustls) => server.bind_rustls_0_23(&config.addr, rustls)?,
        None => server.bind(&config.addr)?,
    };
    if config.workers > 0 {
        server = server.workers(config.workers);
    }
    let addrs = server.addrs();
    Ok((server.run(), addrs))
}
