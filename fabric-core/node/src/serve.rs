//! What both serving binaries (edge-node, cloud-hub) do the same way at start: the flags they share,
//! logging, and loading the model repository into pools with the strict and empty checks.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{ModelControl, ServingConfig};
use crate::metrics::Metrics;
use crate::models::ModelSet;
use crate::repository::{self, RepositoryError};
use fabric_engine::EngineChoice;

/// The command-line flags both serving roles take (flags override the config file).
#[derive(clap::Args, Debug, Default)]
pub struct ServingArgs {
    /// HTTP listen address, e.g. 127.0.0.1:8000 (port 0 picks a free one)
    #[arg(long)]
    pub http_addr: Option<String>,
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
    /// registry-1@127.0.0.1:7000); the node heartbeats to it with its --certs certificate.
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
