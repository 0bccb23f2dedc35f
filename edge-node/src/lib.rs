//! `edge-node`: the device daemon. Serves local apps over the Open Inference Protocol (KServe v2
//! REST) from a model repository, with per-model actor pools that batch and enforce deadlines, and
//! offloads what it cannot serve in time to cloud hubs over QUIC ([`offload`]).

pub mod offload;

use std::sync::Arc;

use fabric_engine::{ExecutionProvider, OrtOptions};
use fabric_node::agent::HubDirectory;
use fabric_node::boot::{self, RoleParts};
use fabric_node::config::ServingConfig;
use fabric_node::dispatch::Overflow;
use fabric_node::metrics::Metrics;
use serde::{Deserialize, Serialize};

/// The edge-node configuration file (`edge.toml`); every key has a default.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct EdgeConfig {
    /// HTTP, model repository (engine: `auto` by default), model defaults, ONNX Runtime: the keys
    /// edge.toml shares with hub.toml.
    #[serde(flatten)]
    pub serving: ServingConfig,
    /// Hubs to offload overflow to.
    pub offload: offload::OffloadConfig,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        let defaults = ServingConfig::default();
        EdgeConfig {
            serving: ServingConfig {
                // An edge device has no GPU provider to try: ONNX Runtime (where `auto` picks it) runs
                // on the CPU without a warning per session about the GPU providers it skipped.
                ort: OrtOptions { providers: vec![ExecutionProvider::Cpu], ..defaults.ort },
                ..defaults
            },
            offload: offload::OffloadConfig::default(),
        }
    }
}

/// Loads the repository, connects to hubs, binds the HTTP API and serves until SIGTERM/SIGINT
/// (then drains in-flight work).
///
/// `on_ready` gets the bound address once every model is loaded and the server accepts requests.
pub async fn run(config: EdgeConfig, on_ready: impl FnOnce(std::net::SocketAddr)) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let serving = &config.serving;
    let metrics = Metrics::new("fabric");
    // With a registry, the hubs it lists are learnt as they heartbeat (besides any configured here).
    let registry = serving.registry.addr.is_some() && config.offload.tls.is_some();
    let offloader = offload::Offloader::start(&config.offload, registry, Some(metrics.clone()))?;
    let loaded = boot::load_models(serving, &metrics).await?;
    let parts = RoleParts {
        name: "edge-node",
        role: fabric_proto::tls::Role::Edge,
        tls: config.offload.tls.as_ref(),
        overflow: offloader.clone().map(|o| o as Arc<dyn Overflow>),
        hubs: offloader.map(|o| o as Arc<dyn HubDirectory>),
        quic: None,
    };
    let node = boot::start(serving, metrics, &loaded, parts)?;
    let addr = node.http;
    tracing::info!(%addr, models = loaded.loaded, failed = loaded.failed.len(), hubs = config.offload.hubs.len(),
        ms = started.elapsed().as_millis() as u64, "edge-node ready");
    on_ready(addr);
    node.serve().await?;
    tracing::info!("edge-node stopped");
    Ok(())
}
