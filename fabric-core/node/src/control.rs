//! Live control of a serving node: load and unload model versions, set traffic policies, resize and
//! reconfigure pools, and the load report. One implementation behind every interface: Triton's
//! repository API and the admin API over HTTP ([`crate::admin`]), and the registry over QUIC.
//!
//! - A load builds the engine, reads the metadata and warms the first replica before the version
//!   becomes routable; a failure leaves everything as it was and says why. Loads of the same version
//!   at once share one result. Reloading a version that serves swaps the new pool in when it is warm
//!   and drains the old one: no request sees the gap.
//! - An unload takes the version out of routing at once (refused while the policy routes to it), lets
//!   every request already routed to it finish, then stops its replicas and drops its metric series.
//! - Pools run on an arbiter of the node's own, so any runtime (an HTTP worker, the QUIC thread) can
//!   drive control.

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

/// Longest an unload waits for the requests already routed to a version (then they are answered
/// "stopped"): a request holds its version from routing to answer, body upload included.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// How often a drain looks whether the last request has left.
const DRAIN_POLL: Duration = Duration::from_millis(2);

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

type SharedLoad = Shared<BoxFuture<'static, Result<Loaded, ControlError>>>;

/// A load in progress: what it loads (a second request joins it only if it asks for the same), and
/// its result.
struct InProgress {
    source: u64,
    config: ModelConfig,
    replace: bool,
    result: SharedLoad,
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

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.entry(name.to_string()).or_default().clone()
    }

    /// Triton's load: every version of `name` in the repository that is not loaded yet, or every one
    /// again with `config` (a JSON override); with `files` (version -> ONNX bytes), those versions from
    /// the bytes instead. Each version keeps serving until its replacement is warm.
    pub async fn load_model(
        self: &Arc<Self>,
        name: &str,
        config: Option<serde_json::Value>,
        files: BTreeMap<u64, Vec<u8>>,
    ) -> Result<Vec<Loaded>, ControlError> {
        if !self.explicit() {
            return Err(ControlError::Disabled);
        }
        check_name(name)?;
        let base = repository::model_config(&self.serving.models.path, name, &self.serving.model_defaults)
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        let mut jobs: Vec<(u64, Source, ModelConfig, bool)> = Vec::new();
        if files.is_empty() {
            let entries = repository::scan_model(&self.serving.models.path, name, &base)
                .map_err(|e| ControlError::Invalid(e.to_string()))?;
            if entries.is_empty() {
                return Err(ControlError::NotInRepository {
                    name: name.to_string(),
                    repo: self.serving.models.path.display().to_string(),
                });
            }
            for RepoEntry { version, path, config: repo_config, .. } in entries {
                let config = match &config {
                    Some(o) => model_config_with_json(&repo_config, o).map_err(ControlError::Invalid)?,
                    None => repo_config,
                };
                jobs.push((version, Source::Path(path), config, false));
            }
        } else {
            for (version, bytes) in files {
                let config = match &config {
                    Some(o) => model_config_with_json(&base, o).map_err(ControlError::Invalid)?,
                    None => base.clone(),
                };
                jobs.push((version, Source::Bytes(Arc::new(bytes)), config, true));
            }
        }
        // Without an override, versions already loaded from the repository are left as they are.
        let force_all = config.is_some();
        let mut done = Vec::new();
        for (version, source, model_config, from_bytes) in jobs {
            done.push(self.load_version(name, version, source, model_config, force_all || from_bytes).await?);
        }
        Ok(done)
    }

    /// Loads one version (or reloads it when `replace`), coalescing with a load of it in progress.
    pub async fn load_version(
        self: &Arc<Self>,
        name: &str,
        version: u64,
        source: Source,
        config: ModelConfig,
        replace: bool,
    ) -> Result<Loaded, ControlError> {
        check_name(name)?;
        let key = (name.to_string(), version);
        let fingerprint = source.fingerprint();
        let shared = {
            let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
            let same = loading
                .get(&key)
                .filter(|l| l.source == fingerprint && l.config == config && l.replace == replace)
                .map(|l| l.result.clone());
            match same {
                Some(in_progress) => in_progress,
                // A different load of this version waits for the one in progress (control operations
                // on a model are serialised), then runs.
                None => {
                    let (tx, rx) = oneshot::channel();
                    let this = self.clone();
                    let job_key = key.clone();
                    let job_config = config.clone();
                    let spawned = self.arbiter.spawn(async move {
                        let result = this.load_now(&job_key.0, job_key.1, source, job_config, replace).await;
                        let mut loading = this.loading.lock().unwrap_or_else(|p| p.into_inner());
                        if loading.get(&job_key).is_some_and(|l| l.source == fingerprint) {
                            loading.remove(&job_key);
                        }
                        drop(loading);
                        let _ = tx.send(result);
                    });
                    if !spawned {
                        return Err(ControlError::Internal("the control arbiter has stopped".into()));
                    }
                    let fut: BoxFuture<'static, Result<Loaded, ControlError>> = rx
                        .map(|r| r.unwrap_or_else(|_| Err(ControlError::Internal("the load task ended".into()))))
                        .boxed();
                    let shared = fut.shared();
                    loading.insert(key, InProgress { source: fingerprint, config, replace, result: shared.clone() });
                    shared
                }
            }
        };
        shared.await
    }

    /// The load itself (on the arbiter).
    async fn load_now(
        self: &Arc<Self>,
        name: &str,
        version: u64,
        source: Source,
        config: ModelConfig,
        replace: bool,
    ) -> Result<Loaded, ControlError> {
        let lock = self.lock_for(name);
        let _serialised = lock.lock().await;
        let started = Instant::now();
        let already = self.models.versions(name).into_iter().any(|m| m.version == version);
        if already && !replace {
            return Ok(Loaded { name: name.to_string(), version, ms: 0, replaced: false, unchanged: true });
        }
        let (path, staged) = match source {
            Source::Path(path) => (path, false),
            Source::Bytes(bytes) => (self.stage(name, version, &bytes)?, true),
        };
        let entry = RepoEntry { name: name.to_string(), version, path: path.clone(), config };
        let model = match repository::start_version(&entry, &self.serving, &self.metrics).await {
            Ok(model) => model,
            Err(e) => {
                if staged {
                    remove_staged(&path);
                }
                let error = ControlError::LoadFailed { name: name.to_string(), version, reason: e.to_string() };
                tracing::error!(model = %name, version, "{error}");
                self.load_errors.insert(name.to_string(), format!("{version}: {e}"));
                return Err(error);
            }
        };
        self.load_errors.remove(name);
        let old = self.models.insert(model);
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(model = %name, version, ms, replaced = old.is_some(), "model version loaded and routable");
        let replaced = old.is_some();
        if let Some(old) = old {
            let staging = self.staging_dir();
            actix_rt::spawn(async move {
                let path = old.path.clone();
                drain(old).await;
                if path.starts_with(&staging) {
                    remove_staged(&path);
                }
            });
        }
        Ok(Loaded { name: name.to_string(), version, ms, replaced, unchanged: false })
    }

    fn staging_dir(&self) -> PathBuf {
        self.serving
            .models
            .staging_path
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("fabric-staged-{}", std::process::id())))
    }

    /// Writes handed-over bytes to a file of their own (a reload never overwrites a file in use).
    fn stage(&self, name: &str, version: u64, bytes: &[u8]) -> Result<PathBuf, ControlError> {
        let n = self.staged.fetch_add(1, Ordering::Relaxed);
        let dir = self.staging_dir().join(name).join(format!("{version}-{n}"));
        let path = dir.join("model.onnx");
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&path, bytes))
            .map_err(|e| ControlError::Internal(format!("cannot stage the model file in {}: {e}", dir.display())))?;
        Ok(path)
    }

    /// Unloads `version` of `name`, or every version (and the policy) when `None`; answers once the
    /// requests already routed there are answered and its replicas have stopped.
    pub async fn unload(self: &Arc<Self>, name: &str, version: Option<u64>) -> Result<Vec<Unloaded>, ControlError> {
        if !self.explicit() {
            return Err(ControlError::Disabled);
        }
        self.unload_versions(name, version).await
    }

    /// [`unload`](Self::unload) for the registry's agent (not subject to the repository API's switch).
    pub async fn unload_versions(
        self: &Arc<Self>,
        name: &str,
        version: Option<u64>,
    ) -> Result<Vec<Unloaded>, ControlError> {
        let lock = self.lock_for(name);
        let _serialised = lock.lock().await;
        let versions: Vec<u64> = match version {
            Some(v) => vec![v],
            None => {
                let mut all: Vec<u64> = self.models.versions(name).iter().map(|m| m.version).collect();
                all.extend(
                    self.models
                        .index(|_| None)
                        .iter()
                        .filter(|e| e.name == name)
                        .filter_map(|e| e.version.parse::<u64>().ok()),
                );
                all.sort_unstable();
                all.dedup();
                if all.is_empty() {
                    return Err(self
                        .models
                        .route(name, None)
                        .err()
                        .map(ControlError::Route)
                        .unwrap_or_else(|| ControlError::Invalid(format!("model '{name}' has nothing loaded"))));
                }
                all
            }
        };
        let mut removed = Vec::new();
        for v in &versions {
            match self.models.remove(name, *v, version.is_none()) {
                Ok(model) => removed.push(model),
                // A version that only failed to load is forgotten by `remove`; nothing to drain.
                Err(RemoveError::Route(RouteError::Unavailable { .. })) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let staging = self.staging_dir();
        let mut done = Vec::new();
        for model in removed {
            let started = Instant::now();
            let (model_name, v, path) = (model.name.clone(), model.version, model.path.clone());
            drain(model).await;
            self.metrics.remove_version(&model_name, &v.to_string());
            if path.starts_with(&staging) {
                remove_staged(&path);
            }
            let drain_ms = started.elapsed().as_millis() as u64;
            tracing::info!(model = %model_name, version = v, drain_ms, "model version unloaded");
            done.push(Unloaded { name: model_name, version: v, drain_ms });
        }
        Ok(done)
    }

    /// The versions with a replica ready now.
    pub fn ready_versions(&self) -> Vec<fabric_proto::registry::ReadyVersion> {
        self.models
            .all()
            .into_iter()
            .filter(|m| m.pool.serving())
            .map(|m| fabric_proto::registry::ReadyVersion { name: m.name.clone(), version: m.version })
            .collect()
    }

    /// The served version `name`/`version`, if loaded.
    pub fn loaded(&self, name: &str, version: u64) -> Option<Arc<ServedModel>> {
        self.models.versions(name).into_iter().find(|m| m.version == version)
    }

    /// The settings new versions get (the node's model defaults).
    pub fn model_defaults(&self) -> &ModelConfig {
        &self.serving.model_defaults
    }

    /// Sets the traffic policy of `name` (`None`: the newest version).
    pub fn set_policy(&self, name: &str, policy: Option<TrafficPolicy>) -> Result<(), ControlError> {
        self.models.set_policy(name, policy.clone())?;
        tracing::info!(model = %name, policy = %serde_json::to_string(&policy).unwrap_or_default(), "traffic policy set");
        Ok(())
    }

    /// Changes a version's serving settings (a JSON object of [`ModelConfig`] keys, Triton's names
    /// accepted) and answers once the change has converged. A change of the replica count alone resizes
    /// the pool in place (shrinking retires idle replicas first, busy ones after their batch); any
    /// other change loads a new pool with the new settings, swaps it in when warm and drains the old.
    pub async fn reconfigure(
        self: &Arc<Self>,
        name: &str,
        version: u64,
        changes: &serde_json::Value,
    ) -> Result<ModelConfig, ControlError> {
        let model = self.models.route(name, Some(&version.to_string()))?;
        let wanted = model_config_with_json(&model.config, changes).map_err(ControlError::Invalid)?;
        let only_replicas = ModelConfig { replicas: model.config.replicas, ..wanted.clone() } == model.config;
        if wanted.replicas == 0 && !only_replicas {
            return Err(ControlError::Invalid(
                "replicas 0 (scale to zero) cannot be combined with other changes: set the other settings first".into(),
            ));
        }
        if only_replicas {
            let started = Instant::now();
            model.pool.resize(wanted.replicas).await.map_err(|reason| ControlError::Resize {
                name: name.to_string(),
                version,
                reason,
            })?;
            tracing::info!(model = %name, version, replicas = wanted.replicas, ms = started.elapsed().as_millis() as u64, "pool resized");
            // The served entry keeps its settings in step (the pool already has them).
            let lock = self.lock_for(name);
            let _serialised = lock.lock().await;
            if let Ok(current) = self.models.route(name, Some(&version.to_string())) {
                if Arc::ptr_eq(&current, &model) {
                    self.models.update_config(&model, wanted.clone());
                }
            }
            return Ok(wanted);
        }
        self.load_version(name, version, Source::Path(model.path.clone()), wanted.clone(), true).await?;
        Ok(wanted)
    }

    /// The load report: every served version's replicas, queue and rates over the last few seconds,
    /// and every model's policy and shadow comparison.
    pub async fn report(&self) -> NodeReport {
        let now = Instant::now();
        let mut versions = Vec::new();
        let mut weights: BTreeMap<String, Option<TrafficPolicy>> = BTreeMap::new();
        for model in self.models.all() {
            let policy = weights
                .entry(model.name.clone())
                .or_insert_with(|| self.models.policy(&model.name).ok().and_then(|(p, _)| p))
                .clone();
            let newest = self.models.versions(&model.name).last().map(|m| m.version);
            let weight_pct = match &policy {
                Some(p) => {
                    let total: u64 = p.weights.values().map(|&w| u64::from(w)).sum();
                    let w = p.weights.get(&model.version).copied().unwrap_or(0);
                    if total == 0 {
                        0.0
                    } else {
                        f64::from(w) * 100.0 / total as f64
                    }
                }
                None if newest == Some(model.version) => 100.0,
                None => 0.0,
            };
            let status = model.pool.status().await.ok();
            let stats = model.pool.stats();
            let ready_replicas = model.pool.ready_replicas();
            versions.push(VersionReport {
                name: model.name.clone(),
                version: model.version,
                ready: model.pool.serving(),
                weight_pct,
                on_gpu: model.pool.on_gpu(),
                engine: model.engine,
                engine_choice: model.engine_reason.clone(),
                target_replicas: status.as_ref().map_or(0, |s| s.target),
                ready_replicas,
                loading_replicas: status.as_ref().map_or(0, |s| s.loading),
                busy_replicas: status.as_ref().map_or(0, |s| s.busy),
                queue_depth: status.as_ref().map_or(0, |s| s.queued),
                in_flight: stats.in_flight(),
                restarts: status.as_ref().map_or(0, |s| s.restarts),
                cold_start_ms: status.as_ref().and_then(|s| s.cold_start).map(|d| d.as_secs_f64() * 1e3),
                last_load_error: status.and_then(|s| s.last_error),
                window: stats.report(now, ready_replicas),
                recent: stats.recent(now, ready_replicas),
            });
        }
        let models = self
            .models
            .names()
            .into_iter()
            .map(|name| {
                let (policy, shadow) = self.models.policy(&name).unwrap_or((None, None));
                ModelReport {
                    last_load_error: self.load_errors.get(&name).map(|e| e.clone()),
                    shadow: shadow.map(|s| s.report()),
                    policy,
                    name,
                }
            })
            .collect();
        NodeReport { node: self.node.clone(), uptime_ms: self.started.elapsed().as_millis() as u64, models, versions }
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

/// Waits until no request holds `model` any more (each holds it from routing to answer), bounded by
/// [`DRAIN_LIMIT`], then stops its pool.
async fn drain(model: Arc<ServedModel>) {
    let until = Instant::now() + DRAIN_LIMIT;
    while Arc::strong_count(&model) > 1 && Instant::now() < until {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    if Arc::strong_count(&model) > 1 {
        tracing::warn!(model = %model.name, version = model.version, "requests still held the version after {} s; stopping it anyway", DRAIN_LIMIT.as_secs());
    }
    model.pool.shutdown();
}

fn remove_staged(path: &Path) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
