//! Live control of a serving node: load and unload model versions, set traffic policies, resize and
//! reconfigure pools, and the load report. One implementation behind every interface: Triton's
//! repository API and the admin API over HTTP ([`crate::http::admin`]), and the registry over QUIC.
//!
//! - A load builds the engine, reads the metadata and warms the first replica before the version
//!   becomes routable; a failure leaves everything as it was and says why. Loads of the same version
//!   at once share one result. Reloading a version that serves swaps the new pool in when it is warm
//!   and drains the old one: no request sees the gap.
//! - An unload takes the version out of routing at once (refused while the policy routes to it), lets
//!   every request already routed to it finish, then stops its replicas and drops its metric series.
//! - Pools run on an arbiter of the node's own, so any runtime (an HTTP worker, the QUIC thread) can
//!   drive control.
//!
//! Here: [`NodeControl`], its errors and sources. Its parts: [`load`], [`unload`], [`settings`]
//! (traffic policies and pool settings), [`report`] (the load report).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::config::{model_config_with_json, ModelConfig, ModelControl, ServingConfig};
use crate::metrics::Metrics;
use crate::models::{ModelSet, RemoveError, RouteError, ServedModel};
use crate::repository::{self, RepoEntry};
use fabric_proto::report::{ModelReport, NodeReport, VersionReport};

use fabric_policy::traffic::{PolicyError, TrafficPolicy};

mod load;
mod report;
mod settings;
mod unload;

/// Why a control operation was not carried out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    /// Loading and unloading are switched off.
    #[error("model control is off: start the node with --model-control explicit (models.control = \"explicit\") to load and unload models while serving")]
    Disabled,
    /// Unknown model or version.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The repository has no such model.
    #[error("model '{name}' is not in the repository {repo} (expected {repo}/{name}/<version>/model.onnx), and no model file was given")]
    NotInRepository { name: String, repo: String },
    /// The request itself is wrong (a bad name, config override or file parameter).
    #[error("{0}")]
    Invalid(String),
    /// The version failed to load; nothing changed.
    #[error("model '{name}' version {version} failed to load (nothing changed): {reason}")]
    LoadFailed { name: String, version: u64, reason: String },
    /// The traffic policy is refused.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The version still receives traffic.
    #[error("{0}")]
    InUse(String),
    /// A resize did not converge.
    #[error("model '{name}' version {version}: {reason}")]
    Resize { name: String, version: u64, reason: String },
    /// The node cannot do it (files, threads).
    #[error("{0}")]
    Internal(String),
}

impl From<RemoveError> for ControlError {
    fn from(e: RemoveError) -> Self {
        match e {
            RemoveError::Route(e) => ControlError::Route(e),
            e @ RemoveError::InUse { .. } => ControlError::InUse(e.to_string()),
        }
    }
}

/// Where a version's model file comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A file on this node (the repository).
    Path(PathBuf),
    /// Bytes handed over in the request (kept in the staging folder while they serve).
    Bytes(Arc<Vec<u8>>),
}

impl Source {
    /// Identifies what would be loaded (the path, or a hash of the bytes).
    fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        match self {
            Source::Path(path) => path.hash(&mut hasher),
            Source::Bytes(bytes) => bytes.hash(&mut hasher),
        }
        hasher.finish()
    }
}

/// A load that went through.
#[derive(Clone, Debug, Serialize)]
pub struct Loaded {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// Milliseconds from the request to routable (engine built, first replica warmed).
    pub ms: u64,
    /// Whether it replaced a version that was serving (reload).
    pub replaced: bool,
    /// Whether the version was already loaded and left as it was.
    pub unchanged: bool,
}

/// An unload that went through.
#[derive(Clone, Debug, Serialize)]
pub struct Unloaded {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// Milliseconds until the last request routed to it was answered and its replicas stopped.
    pub drain_ms: u64,
}

/// Live control of one node's models.
pub struct NodeControl {
    node: String,
    serving: ServingConfig,
    models: Arc<ModelSet>,
    metrics: Metrics,
    started: Instant,
    /// Pools started by control live here (not on whichever runtime asked).
    arbiter: actix::ArbiterHandle,
    /// Loads in progress, by model and version: a second request for the same joins the first.
    loading: Mutex<BTreeMap<(String, u64), InProgress>>,
    /// Serialises control operations per model name (a load and an unload never interleave).
    locks: dashmap::DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// The last failed load per model name.
    load_errors: dashmap::DashMap<String, String>,
    staged: AtomicU64,
}

impl NodeControl {
    /// Control over `models` of the node `node`; starts the arbiter its pools run on (call inside the
    /// actix system).
    pub fn new(node: &str, serving: ServingConfig, models: Arc<ModelSet>, metrics: Metrics) -> Arc<NodeControl> {
        let arbiter = actix::Arbiter::new().handle();
        Arc::new(NodeControl {
            node: node.to_string(),
            serving,
            models,
            metrics,
            started: Instant::now(),
            arbiter,
            loading: Mutex::new(BTreeMap::new()),
            locks: dashmap::DashMap::new(),
            load_errors: dashmap::DashMap::new(),
            staged: AtomicU64::new(0),
        })
    }

    /// The models controlled.
    pub fn models(&self) -> &Arc<ModelSet> {
        &self.models
    }

    /// Whether the repository API may load and unload.
    pub fn explicit(&self) -> bool {
        self.serving.models.control == ModelControl::Explicit
    }

    pub(super) fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.entry(name.to_string()).or_default().clone()
    }

    /// The served version `name`/`version`, if loaded.
    pub fn loaded(&self, name: &str, version: u64) -> Option<Arc<ServedModel>> {
        self.models.versions(name).into_iter().find(|m| m.version == version)
    }

    /// Sets (or drops) the cascade the registry placed on model `name`.
    pub fn place_cascade(&self, name: &str, cascade: Option<fabric_policy::cascade::Cascade>) {
        self.models.place_cascade(name, cascade);
    }

    /// The settings new versions get (the node's model defaults).
    pub fn model_defaults(&self) -> &ModelConfig {
        &self.serving.model_defaults
    }
}

/// Refuses names that are not a plain folder name (they become paths in the staging folder).
fn check_name(name: &str) -> Result<(), ControlError> {
    if fabric_proto::registry::is_plain_name(name) {
        Ok(())
    } else {
        Err(ControlError::Invalid(format!(
            "invalid model name '{name}': use letters, digits, '_', '-' and '.', not starting with '.'"
        )))
    }
}

/// Longest an unload waits for the requests already routed to a version (then they are answered
/// "stopped"): a request holds its version from routing to answer, body upload included.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// How often a drain looks whether the last request has left.
const DRAIN_POLL: Duration = Duration::from_millis(2);

/// Waits until no request holds `model` any more (each holds it from routing to answer), bounded by
/// [`DRAIN_LIMIT`], then stops its pool.
pub(super) async fn drain(model: Arc<ServedModel>) {
    let until = Instant::now() + DRAIN_LIMIT;
    while Arc::strong_count(&model) > 1 && Instant::now() < until {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    if Arc::strong_count(&model) > 1 {
        tracing::warn!(model = %model.name, version = model.version, "requests still held the version after {} s; stopping it anyway", DRAIN_LIMIT.as_secs());
    }
    model.pool.shutdown();
}

pub(super) fn remove_staged(path: &Path) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

pub(super) type SharedLoad = Shared<BoxFuture<'static, Result<Loaded, ControlError>>>;

/// A load in progress: what it loads (a second request joins it only if it asks for the same), and
/// its result.
pub(super) struct InProgress {
    source: u64,
    config: ModelConfig,
    replace: bool,
    result: SharedLoad,
}
