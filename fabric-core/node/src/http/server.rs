//! The node's HTTP server: the KServe v2 routes and the repository routes in one app, with the JSON
//! 404 for anything else, bound on the configured address.

use std::net::SocketAddr;

use actix_web::{web, App, HttpServer};

use super::state::{not_found, HttpState};
use super::{admin, kserve_api};
use crate::config::HttpConfig;

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
            .configure(kserve_api::routes)
            .configure(admin::repository_routes)
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
