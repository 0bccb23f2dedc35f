//! `edge-node`: the device daemon. Serves local apps over the Open Inference Protocol (KServe v2
//! REST) from a model repository, with per-model actor pools that batch and enforce deadlines, and
//! offloads what it cannot serve in time to cloud hubs over QUIC ([`offload`]).

pub mod offload;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix_web::web;
use fabric_core::config::{HttpConfig, ModelConfig, RepositoryConfig, ServingConfig};
use fabric_core::engine::OrtOptions;
use fabric_core::http::{self, HttpState, Overflow};
use fabric_core::metrics::Metrics;
use fabric_core::models::ModelSet;
use fabric_core::repository;
use serde::{Deserialize, Serialize};

/// The edge-node configuration file (`edge.toml`); every key has a default.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// HTTP (KServe v2) server.
    pub http: HttpConfig,
    /// Model repository (engine: tract by default).
    pub models: RepositoryConfig,
    /// Defaults for every model.
    pub model_defaults: ModelConfig,
    /// ONNX Runtime, for models served with the `ort` engine.
    pub ort: OrtOptions,
    /// Hubs to offload overflow to.
    pub offload: offload::OffloadConfig,
}

impl EdgeConfig {
    /// The serving part of the config.
    pub fn serving(&self) -> ServingConfig {
        ServingConfig {
            http: self.http.clone(),
            models: self.models.clone(),
            model_defaults: self.model_defaults.clone(),
            ort: self.ort.clone(),
        }
    }
}

/// Loads the repository, connects to hubs, binds the HTTP API and serves until SIGTERM/SIGINT
/// (then drains in-flight work).
///
/// `on_ready` gets the bound address once every model is loaded and the server accepts requests.
pub async fn run(config: EdgeConfig, on_ready: impl FnOnce(std::net::SocketAddr)) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let serving = config.serving();
    let metrics = Metrics::new("fabric");
    let models = Arc::new(ModelSet::default());
    let offloader = offload::Offloader::start(&config.offload)?;
    let (loaded, failed) = repository::load_all(&serving, &models, &metrics).await?;
    if serving.models.strict && !failed.is_empty() {
        anyhow::bail!("--strict-models: {} model version(s) failed to load: {}", failed.len(), failed.join("; "));
    }
    if loaded == 0 {
        anyhow::bail!(
            "no model could be loaded from {} ({} failed): put models in <repo>/<name>/<version>/model.onnx",
            serving.models.path.display(),
            failed.len()
        );
    }
    let state = web::Data::new(HttpState {
        server_name: "edge-node".into(),
        models,
        metrics,
        max_body_bytes: config.http.max_body_bytes,
        body_timeout: std::time::Duration::from_millis(config.http.body_timeout_ms),
        ready: false.into(),
        overflow: offloader.clone().map(|o| o as Arc<dyn Overflow>),
    });
    let (server, addrs) = http::bind(state.clone(), &config.http)?;
    state.ready.store(true, Ordering::Release);
    let addr = addrs.first().copied().ok_or_else(|| anyhow::anyhow!("bound no address"))?;
    tracing::info!(%addr, models = loaded, failed = failed.len(), hubs = config.offload.hubs.len(),
        ms = started.elapsed().as_millis() as u64, "edge-node ready");
    on_ready(addr);
    server.await?;
    tracing::info!("edge-node stopped");
    Ok(())
}
