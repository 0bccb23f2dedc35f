//! Node boot, in one place for both serving binaries (edge-node, cloud-hub): the flags they share,
//! logging, loading the model repository into pools (with the strict and empty checks), then
//! [`start`]: the HTTP API bound, the admin API, readiness, and the registry agent or the
//! autoscaler. What differs by role (the edge's offloader, the hub's QUIC service) is passed in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix_web::web;

use crate::agent::HubDirectory;
use crate::config::{ModelControl, ServingConfig};
use crate::dispatch::Overflow;
use crate::http::{self, HttpState};
use crate::metrics::Metrics;
use crate::models::ModelSet;
use crate::repository::{self, RepositoryError};
use fabric_engine::EngineChoice;
use fabric_proto::tls::{Role, TlsFiles};

/// The command-line flags both serving roles take (flags override the config file).
#[derive(clap::Args, Debug, Default)]
pub struct ServingArgs {
    /// HTTP listen address, e.g. 127.0.0.1:8000 (port 0 picks a free one)
    #[arg(long)]
    pub http_addr: Option<String>,
    /// Serve KServe v2 over gRPC on this address too, e.g. 127.0.0.1:8002 (tritonclient.grpc,
    /// perf_analyzer -i grpc); port 0 picks a free one
    #[arg(long)]
    pub grpc_addr: Option<String>,
    /// Model repository folder: <repo>/<model>/<version>/model.onnx [default: models]
    #[arg(long)]
    pub model_repository: Option<PathBuf>,
    /// Engine for models without their own setting: auto (edge default: time both on each model's
    /// warm-up batches and keep the faster; tract where ONNX Runtime's library does not load),
    /// tract (pure Rust, CPU) or ort (ONNX Runtime; hub default)
    #[arg(long)]
    pub engine: Option<EngineChoice>,
    /// Refuse to start if any model fails to load (by default the others are served and the failure
    /// is reported by the model's /ready, the repository index and the server's /v2/health/ready).
    #[arg(long)]
    pub strict_models: bool,
    /// `explicit`: load and unload models while serving through the repository API
    /// (POST /v2/repository/models/<m>/load|unload), as Triton's --model-control-mode=explicit;
    /// `none` (default): serve what the repository holds at start.
    #[arg(long, value_enum)]
    pub model_control: Option<ModelControl>,
    /// Serve the admin API (traffic policies, pool settings, load report under /v2/fabric/) on this
    /// address, e.g. 127.0.0.1:8001; its mutating calls need the token (admin.token, admin.token_file
    /// or FABRIC_ADMIN_TOKEN).
    #[arg(long)]
    pub admin_addr: Option<String>,
    /// File holding the admin API's bearer token (first line).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Take the desired state from this model registry, [NAME@]HOST:PORT (e.g.
    /// registry-1@127.0.0.1:7000; a replicated registry: every replica, comma-separated, the node
    /// follows the leader); the node heartbeats to it with its --certs certificate.
    #[arg(long)]
    pub registry: Option<String>,
    /// Where the node keeps fetched model files and its last desired state [default: fabric-data]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A label deployments can select this node by, as KEY=VALUE (repeatable), e.g. --label site=berlin
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label '{s}' is not KEY=VALUE"))
}

impl ServingArgs {
    /// Applies the flags given to the config.
    pub fn apply(self, config: &mut ServingConfig) {
        if let Some(addr) = self.http_addr {
            config.http.addr = addr;
        }
        if let Some(addr) = self.grpc_addr {
            config.grpc.addr = addr;
            config.grpc.enabled = true;
        }
        if let Some(repo) = self.model_repository {
            config.models.path = repo;
        }
        if let Some(engine) = self.engine {
            config.models.engine = engine;
        }
        config.models.strict |= self.strict_models;
        if let Some(control) = self.model_control {
            config.models.control = control;
        }
        if let Some(addr) = self.admin_addr {
            config.admin.addr = addr;
            config.admin.enabled = true;
        }
        if let Some(file) = self.admin_token_file {
            config.admin.token_file = Some(file);
        }
        if let Some(addr) = self.registry {
            config.registry.addr = Some(addr);
        }
        if let Some(dir) = self.data_dir {
            config.registry.data_dir = dir;
        }
        config.registry.labels.extend(self.labels);
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default: info, with ONNX Runtime's chatter at warn).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,ort=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Why the models could not be served.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The repository cannot be read.
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// Strict mode, and some model failed.
    #[error("--strict-models: {} model version(s) failed to load: {}", .0.len(), .0.join("; "))]
    Strict(Vec<String>),
    /// The admin API is on without a usable token.
    #[error("{0}")]
    Admin(String),
    /// Nothing could be loaded.
    #[error(
        "no model could be loaded from {path} ({failed} failed): put models in <repo>/<name>/<version>/model.onnx"
    )]
    Empty { path: String, failed: usize },
}

/// The loaded models, and how many loaded and failed.
pub struct Loaded {
    /// The models, for the HTTP API (and the hub's QUIC service).
    pub models: Arc<ModelSet>,
    /// Versions loaded.
    pub loaded: usize,
    /// Versions that failed, as `name/version: reason`.
    pub failed: Vec<String>,
}

/// Loads the repository; in strict mode any failure, and in any mode an empty result, is an error.
pub async fn load_models(serving: &ServingConfig, metrics: &Metrics) -> Result<Loaded, LoadError> {
    // A config mistake found after minutes of loading is a poor start: check the admin token first.
    if serving.admin.enabled {
        serving.admin.resolve_token().map_err(LoadError::Admin)?;
    }
    crate::clients::Clients::new(&serving.clients).map_err(LoadError::Admin)?;
    serving.tls.files().map_err(LoadError::Admin)?;
    // The repository API loads and unloads models: it answers only callers with the admin token.
    if serving.models.control == ModelControl::Explicit {
        serving.admin.resolve_token().map_err(|e| LoadError::Admin(format!("--model-control explicit: {e}")))?;
    }
    let models = Arc::new(ModelSet::default());
    let (loaded, failed) = repository::load_all(serving, &models, metrics).await?;
    if serving.models.strict && !failed.is_empty() {
        return Err(LoadError::Strict(failed));
    }
    // With model control on or a registry, a node may start empty and have models loaded into it.
    if loaded == 0 && serving.models.control != ModelControl::Explicit && serving.registry.addr.is_none() {
        return Err(LoadError::Empty { path: serving.models.path.display().to_string(), failed: failed.len() });
    }
    models.mark_startup();
    // Let the pool actors start now: if a later step of the start fails (a port in use), the runtime
    // stops them cleanly instead of starting them while it shuts down (actix then panics).
    tokio::task::yield_now().await;
    Ok(Loaded { models, loaded, failed })
}

/// Why a node with loaded models could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The HTTP API could not bind its address.
    #[error("HTTP API on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    /// The gRPC API could not start on its address.
    #[error("gRPC API on {addr}: {source}")]
    Grpc { addr: String, source: std::io::Error },
    /// The admin API could not start.
    #[error("{0}")]
    Admin(String),
    /// The registry agent or the autoscaler could not start.
    #[error("{0}")]
    Control(String),
}

/// A node serving: its models loaded, its HTTP API bound and ready.
pub struct Node {
    /// What the handlers share (models, live control, the dispatcher).
    pub state: web::Data<HttpState>,
    /// Where the KServe v2 API listens.
    pub http: SocketAddr,
    /// Where the KServe v2 gRPC API listens, when it is on.
    pub grpc: Option<SocketAddr>,
    server: actix_web::dev::Server,
}

impl Node {
    /// Serves until SIGTERM/SIGINT, then drains in-flight work.
    pub async fn serve(self) -> std::io::Result<()> {
        self.server.await
    }
}

/// What a role adds to the shared start: its name, its certificate's role and files, where it
/// offloads overflow (edges) and where its QUIC service listens (hubs).
pub struct RoleParts<'a> {
    /// `edge-node` or `cloud-hub`: the server name, and the prefix of the lines printed at start.
    pub name: &'static str,
    /// The role the node's certificate must carry to join a registry.
    pub role: Role,
    /// The node's certificates, when it has them.
    pub tls: Option<&'a TlsFiles>,
    /// Where requests this node cannot serve in time go.
    pub overflow: Option<Arc<dyn Overflow>>,
    /// The same place as the registry agent sees it: told the hubs the registry lists.
    pub hubs: Option<Arc<dyn HubDirectory>>,
    /// The hub's QUIC infer service, told to the registry.
    pub quic: Option<SocketAddr>,
}

/// Binds the HTTP API over the loaded models, starts the gRPC API when it is on (printing
/// `<name> gRPC on ADDR`) and the admin API when it is on (printing
/// `<name> admin API on http://ADDR`, a line scripts wait for), marks the node ready, and starts
/// the registry agent (with a registry) or the autoscaler (without).
pub fn start(
    serving: &ServingConfig,
    metrics: Metrics,
    loaded: &Loaded,
    parts: RoleParts<'_>,
) -> Result<Node, StartError> {
    let state = web::Data::new(HttpState::new(parts.name, loaded.models.clone(), metrics, serving, parts.overflow));
    let bind_error = |source| StartError::Bind { addr: serving.http.addr.clone(), source };
    let (server, addrs) = http::bind(state.clone(), &serving.http, &serving.tls).map_err(bind_error)?;
    let addr = addrs
        .first()
        .copied()
        .ok_or_else(|| bind_error(std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "bound no address")))?;
    let grpc = if serving.grpc.enabled {
        let grpc_error = |source| StartError::Grpc { addr: serving.grpc.addr.clone(), source };
        let bound =
            crate::grpc::start(state.clone(), &serving.grpc, &serving.tls, serving.http.workers).map_err(grpc_error)?;
        // A line on stdout that scripts and tests wait for (before the ready line).
        println!("{} gRPC on {bound}", parts.name);
        Some(bound)
    } else {
        None
    };
    if let Some(admin) = http::admin::start(&state, &serving.admin, &serving.tls).map_err(StartError::Admin)? {
        // A line on stdout that scripts and tests wait for (before the ready line).
        let scheme = if serving.tls.cert.is_some() { "https" } else { "http" };
        println!("{} admin API on {scheme}://{admin}", parts.name);
    }
    state.ready.store(true, Ordering::Release);
    start_registry_or_autoscaler(&state, serving, parts.tls, parts.role, addr, parts.quic, parts.hubs)
        .map_err(StartError::Control)?;
    Ok(Node { state, http: addr, grpc, server })
}

/// Starts the registry agent when the config names a registry (the node's identity comes from its
/// certificate, `tls`, whose role must match), else the node's own autoscaler when it is on.
fn start_registry_or_autoscaler(
    state: &HttpState,
    serving: &ServingConfig,
    tls: Option<&TlsFiles>,
    role: Role,
    http: SocketAddr,
    quic: Option<SocketAddr>,
    hubs: Option<Arc<dyn HubDirectory>>,
) -> Result<(), String> {
    if serving.registry.addr.is_none() {
        // On its own, the node sizes its pools itself.
        if serving.autoscale.enabled {
            crate::scaler::start(state.control.clone(), &serving.autoscale).map_err(|e| e.to_string())?;
        }
        return Ok(());
    }
    let tls = tls.ok_or("--registry needs the node's certificates: pass --certs")?;
    let identity = fabric_proto::tls::own_identity(tls).map_err(|e| e.to_string())?;
    if identity.role != role {
        return Err(format!(
            "the certificate {} is for a {}, not a {}",
            tls.cert.display(),
            identity.role.as_str(),
            role.as_str()
        ));
    }
    let (cores, memory_mib) = crate::agent::machine();
    let gpus = fabric_engine::gpu::this_machine();
    let gpu = fabric_engine::gpu::describe(gpus);
    if let Some(described) = &gpu {
        tracing::info!(gpu = %described, "GPU found (nvidia-smi); reported to the registry");
    }
    let info = fabric_proto::registry::NodeInfo {
        node_id: identity.node_id,
        role: role.as_str().to_string(),
        labels: fabric_engine::gpu::with_gpu_label(serving.registry.labels.clone(), gpus),
        engines: vec![serving.models.engine.to_string()],
        cores,
        memory_mib,
        gpu,
        http: format!("http://{http}"),
        quic: quic.map(|a| a.to_string()),
    };
    crate::agent::start(&serving.registry, tls, state.control.clone(), hubs, info).map_err(|e| e.to_string())
}
