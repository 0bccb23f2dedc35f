//! `edge-node`: the device daemon. Serves local apps over the Open Inference Protocol (KServe v2
//! REST) from a model repository, with per-model actor pools that batch and enforce deadlines.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix_web::web;
use fabric_core::config::ServingConfig;
use fabric_core::http::{self, HttpState};
use fabric_core::metrics::Metrics;
use fabric_core::models::ModelSet;
use fabric_core::repository;
use serde::{Deserialize, Serialize};

/// The edge-node configuration file (`edge.toml`); every key has a default.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// HTTP, model repository, model defaults, ONNX Runtime.
    #[serde(flatten)]
    pub serving: ServingConfig,
}

/// Loads the repository, binds the HTTP API and serves until SIGTERM/SIGINT (then drains in-flight work).
///
/// `on_ready` gets the bound address once every model is loaded and the server accepts requests.
pub async fn run(
    config: EdgeConfig,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let metrics = Metrics::new("fabric");
    let models = Arc::new(ModelSet::default());
    let (loaded, failed) = repository::load_all(&config.serving, &models, &metrics).await?;
    if loaded == 0 {
        anyhow::bail!(
            "no model could be loaded from {} ({} failed): put models in <repo>/<name>/<version>/model.onnx",
            config.serving.models.path.display(),
            failed.len()
        );
    }
    let state = web::Data::new(HttpState {
        server_name: "edge-node".into(),
        models,
        metrics,
        max_body_bytes: config.serving.http.max_body_bytes,
        ready: false.into(),
    });
    let (server, addrs) = http::bind(state.clone(), &config.serving.http)?;
    state.ready.store(true, Ordering::Release);
    let addr = addrs
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("bound no address"))?;
    tracing::info!(%addr, models = loaded, failed = failed.len(), ms = started.elapsed().as_millis() as u64, "edge-node ready");
    on_ready(addr);
    server.await?;
    tracing::info!("edge-node stopped");
    Ok(())
}
