//! `cloud-hub`: the GPU server. Serves the same KServe v2 HTTP API as edge-node (shared code in
//! `fabric_node::http`) and the QUIC infer service that edge-nodes offload their overflow to.

pub mod quic;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fabric_engine::EngineChoice;
use fabric_node::boot::{self, RoleParts};
use fabric_node::config::AutoscaleConfig;
use fabric_node::config::{AdminConfig, GrpcConfig, HttpConfig, RepositoryConfig, ServingConfig};
use fabric_node::metrics::Metrics;
use fabric_proto::tls::{self, TlsFiles};
use fabric_proto::wire::WireLimits;
use serde::{Deserialize, Serialize};

/// The QUIC infer service's settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuicConfig {
    /// UDP address to listen on; port 0 picks one (printed at start).
    pub addr: String,
    /// CA, certificate and key (PEM). Required: every peer must present a fabric certificate.
    pub tls: Option<TlsFiles>,
    /// Frame size limits.
    pub limits: WireLimits,
    /// Milliseconds a peer may take to send a whole request.
    pub read_timeout_ms: u64,
    /// Requests in progress before new ones are refused as busy.
    pub max_in_flight: u32,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            addr: "127.0.0.1:4433".into(),
            tls: None,
            limits: WireLimits::default(),
            read_timeout_ms: 5000,
            max_in_flight: 4096,
        }
    }
}

/// The cloud-hub configuration file (`hub.toml`); every key has a default.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct HubConfig {
    /// HTTP, model repository (engine: ONNX Runtime by default on hubs), model defaults, ONNX Runtime
    /// (library path, execution providers TensorRT > CUDA > CPU, threads): the keys hub.toml shares
    /// with edge.toml.
    #[serde(flatten)]
    pub serving: ServingConfig,
    /// The QUIC infer service for edges.
    pub quic: QuicConfig,
}

/// Seconds a model may sit idle on a hub before it goes to zero replicas (its file stays loaded on disk).
pub const HUB_IDLE_TO_ZERO_S: f64 = 300.0;

impl Default for HubConfig {
    fn default() -> Self {
        let defaults = ServingConfig::default();
        HubConfig {
            serving: ServingConfig {
                http: HttpConfig { addr: "127.0.0.1:8100".into(), ..defaults.http },
                grpc: GrpcConfig { addr: "127.0.0.1:8102".into(), ..defaults.grpc },
                models: RepositoryConfig { engine: EngineChoice::Ort, ..defaults.models },
                admin: AdminConfig { addr: "127.0.0.1:8101".into(), ..defaults.admin },
                // Hubs serve many models for many edges: an idle one frees its replicas.
                autoscale: AutoscaleConfig { idle_to_zero_s: HUB_IDLE_TO_ZERO_S, ..defaults.autoscale },
                ..defaults
            },
            quic: QuicConfig::default(),
        }
    }
}

/// Where a started hub listens.
#[derive(Clone, Copy, Debug)]
pub struct HubAddrs {
    /// KServe v2 HTTP.
    pub http: SocketAddr,
    /// QUIC infer service.
    pub quic: SocketAddr,
}

/// Loads the models, starts the QUIC service and the HTTP API, and serves until SIGTERM/SIGINT.
pub async fn run(config: HubConfig, on_ready: impl FnOnce(HubAddrs)) -> anyhow::Result<()> {
    let files = config.quic.tls.clone().ok_or_else(|| {
        anyhow::anyhow!("quic.tls is not set: the hub needs the fabric CA and its own certificate (create development ones with `fabric certs --out certs --node hub-1:hub --node edge-1:edge`)")
    })?;
    let server_config = tls::server_config(&files)?;
    let serving = &config.serving;
    let metrics = Metrics::new("fabric");
    let loaded = boot::load_models(serving, &metrics).await?;
    let models = loaded.models.clone();
    let quic_addr: SocketAddr =
        config.quic.addr.parse().map_err(|e| anyhow::anyhow!("quic.addr '{}': {e}", config.quic.addr))?;
    // QUIC runs on a thread of its own, beside the pool actors rather than between their turns.
    let io = fabric_proto::io_thread::spawn("quic-infer")?;
    let endpoint = {
        let _on_io_thread = io.enter();
        quinn::Endpoint::server(server_config, quic_addr)?
    };
    let quic_bound = endpoint.local_addr()?;
    let service = Arc::new(quic::QuicService {
        models: models.clone(),
        limits: config.quic.limits,
        read_timeout: Duration::from_millis(config.quic.read_timeout_ms),
        in_flight: 0.into(),
        capacity: config.quic.max_in_flight,
    });
    io.spawn(quic::serve(endpoint.clone(), service));
    let parts = RoleParts {
        name: "cloud-hub",
        role: fabric_proto::tls::Role::Hub,
        tls: Some(&files),
        overflow: None,
        hubs: None,
        quic: Some(quic_bound),
    };
    let node = boot::start(serving, metrics, &loaded, parts)?;
    let http_bound = node.http;
    tracing::info!(http = %http_bound, quic = %quic_bound, models = loaded.loaded, failed = loaded.failed.len(), "cloud-hub ready");
    on_ready(HubAddrs { http: http_bound, quic: quic_bound });
    node.serve().await?;
    endpoint.close(fabric_proto::wire::codes::SHUTDOWN.into(), b"hub shutting down");
    tracing::info!("cloud-hub stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_keeps_the_hub_defaults_it_does_not_set() {
        let path = std::env::temp_dir().join(format!("hub-defaults-{}.toml", std::process::id()));
        std::fs::write(&path, "[http]\naddr = \"127.0.0.1:9999\"\n[autoscale]\nup_delay_s = 5.0\n").expect("write");
        let config: HubConfig = fabric_node::config::load_role_config(&path).expect("loads");
        let _ = std::fs::remove_file(&path);
        assert_eq!(config.serving.http.addr, "127.0.0.1:9999");
        assert_eq!(config.serving.models.engine, EngineChoice::Ort, "the hub's engine, not the shared default");
        assert_eq!(config.serving.admin.addr, "127.0.0.1:8101");
        assert_eq!(config.serving.autoscale.up_delay_s, 5.0);
        assert_eq!(config.serving.autoscale.idle_to_zero_s, HUB_IDLE_TO_ZERO_S, "kept within a table the file sets");
    }
}
