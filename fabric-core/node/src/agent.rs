//! The registry agent of a node: heartbeats to the model registry (with the node's load report) and
//! converges the node to the desired state each answer carries, through [`NodeControl`].
//!
//! Converging: fetch each wanted model file by digest into the node's cache (`<data_dir>/models`,
//! verified by SHA-256 before every load: a corrupted file is fetched again, never served; a download
//! cut short is kept as `<digest>.partial` and resumed from where it stopped), load and
//! warm the versions not loaded yet, set replica counts, then the traffic policy (whose weights the
//! registry only gives to versions this node reported ready), and last unload, after draining, the
//! versions the registry placed here and no longer wants. The desired state is kept on disk
//! (`<data_dir>/desired.json`): a node that restarts while the registry is down serves it again.
//!
//! Cadence: the registry holds an idle node's heartbeat for up to `idle_heartbeat_ms`; the agent
//! checks its report every 250 ms and sends a fresh heartbeat at once when it says something the
//! registry acts on ([`fabric_policy::cadence`]). A registry that cannot be reached is retried with
//! jittered backoff ([`fabric_policy::backoff`]), so a fleet does not come back in one wave. The model
//! cache is kept within `cache_budget_mib` ([`fabric_policy::cache`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::AgentConfig;
use crate::config::ModelConfig;
use crate::control::{ControlError, NodeControl, Source};
use fabric_policy::backoff::{seed_of, Backoff};
use fabric_policy::cache::{evictions, CachedFile};
use fabric_policy::cadence::{report_early, VersionActivity};
use fabric_proto::registry::{
    DesiredState, Heartbeat, HubEntry, NodeInfo, ProtoError, RegistryAddr, RegistryClient, Request,
};
use fabric_proto::tls::TlsFiles;

/// Why the agent cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad address or certificates.
    #[error("registry agent: {0}")]
    Setup(String),
}

/// Why one convergence did not finish (it is retried).
#[derive(Debug, thiserror::Error)]
enum ConvergeError {
    #[error("{0}")]
    Control(#[from] ControlError),
    #[error("{0}")]
    Fetch(String),
}

/// Where an edge offloads, as the control plane sees it: told the hubs each desired state lists.
pub trait HubDirectory: Send + Sync {
    /// The hubs the registry knows (added, moved, marked up or down); hubs configured by hand stay.
    fn set_hubs(&self, hubs: &[HubEntry]);
}

struct Agent {
    control: Arc<NodeControl>,
    /// Where an edge offloads: told the hubs each desired state lists.
    hubs: Option<Arc<dyn HubDirectory>>,
    client: Arc<RegistryClient>,
    info: NodeInfo,
    dir: PathBuf,
    heartbeat_ms: u64,
    idle_heartbeat_ms: u64,
    cache_budget: u64,
    /// Versions the registry placed on this node.
    managed: tokio::sync::Mutex<BTreeSet<(String, u64)>>,
}

/// Starts the agent on a thread of its own; `info` says who this node is (its id must be the one in
/// its certificate).
pub fn start(
    config: &AgentConfig,
    tls: &TlsFiles,
    control: Arc<NodeControl>,
    hubs: Option<Arc<dyn HubDirectory>>,
    info: NodeInfo,
) -> Result<(), AgentError> {
    let Some(addr) = &config.addr else { return Ok(()) };
    // Several addresses: a replicated registry's replicas (the client moves to the leader).
    let targets = RegistryAddr::parse_list(addr).map_err(AgentError::Setup)?;
    std::fs::create_dir_all(config.data_dir.join("models"))
        .map_err(|e| AgentError::Setup(format!("cannot create {}: {e}", config.data_dir.display())))?;
    let io = fabric_proto::io_thread::spawn("registry-agent").map_err(|e| AgentError::Setup(e.to_string()))?;
    let client = {
        let _on_io_thread = io.enter();
        RegistryClient::replicated(targets, tls).map_err(|e| AgentError::Setup(e.to_string()))?
    };
    let agent = Arc::new(Agent {
        control,
        hubs,
        client,
        info,
        dir: config.data_dir.clone(),
        heartbeat_ms: config.heartbeat_ms.max(100),
        idle_heartbeat_ms: config.idle_heartbeat_ms.max(config.heartbeat_ms.max(100)),
        cache_budget: config.cache_budget_mib.saturating_mul(1 << 20),
        managed: tokio::sync::Mutex::new(BTreeSet::new()),
    });
    tracing::info!(registry = %addr, node = %agent.info.node_id, "registry agent started");
    io.spawn(agent.run());
    Ok(())
}

impl Agent {
    fn desired_file(&self) -> PathBuf {
        self.dir.join("desired.json")
    }

    fn cached(&self, digest: &str) -> PathBuf {
        self.dir.join("models").join(format!("{digest}.onnx"))
    }

    async fn run(self: Arc<Self>) {
        let mut applied = 0u64;
        // Serve the last desired state at once, registry or not.
        if let Some(desired) = self.persisted() {
            self.tell_hubs(&desired);
            self.managed.lock().await.extend(managed_by(&desired));
            match self.converge(&desired).await {
                Ok(()) => {
                    applied = desired.revision;
                    tracing::info!(models = desired.models.len(), "serving the last desired state from disk");
                }
                Err(e) => tracing::warn!("the last desired state does not converge yet: {e}"),
            }
        }
        let mut backoff = Backoff::new(RETRY_FIRST, RETRY_CAP, seed_of(&self.info.node_id));
        loop {
            let report = self.control.report().await;
            let sent = activity(&report);
            // The registry holds an active node's heartbeat for `heartbeat_ms` at most (its test).
            let active = report
                .versions
                .iter()
                .any(|v| v.window.arrivals_per_s > 0.0 || v.queue_depth > 0 || v.loading_replicas > 0);
            let longest_silence = if active {
                Duration::from_millis(self.heartbeat_ms) + SILENT_LIMIT
            } else {
                Duration::from_millis(self.idle_heartbeat_ms) + SILENT_LIMIT
            };
            let heartbeat = Heartbeat {
                info: self.info.clone(),
                applied,
                ready: self.control.ready_versions(),
                report,
                wait_ms: self.heartbeat_ms,
                max_wait_ms: self.idle_heartbeat_ms,
            };
            // The registry answers within the hold it may take (at most `idle_heartbeat_ms`): a poll
            // unanswered well after it is a registry that vanished, noticed before QUIC's idle timeout.
            let limit = Duration::from_millis(self.idle_heartbeat_ms) + ANSWER_MARGIN;
            let request = Request::Heartbeat(heartbeat);
            let call = tokio::time::timeout(limit, self.client.call(&request));
            let answer = tokio::select! {
                answer = call => match answer {
                    Ok(answer) => answer,
                    Err(_) => {
                        self.client.abandon().await;
                        Err(ProtoError::Io("no heartbeat answer in time".into()))
                    }
                },
                // Nothing at all came back, not even the acknowledgement of the request: the
                // registry (a replica) is gone; move on now rather than at the hold's end.
                () = self.silent_registry(longest_silence) => {
                    self.client.abandon().await;
                    Err(ProtoError::Io(format!("the registry sent nothing for {} ms", longest_silence.as_millis())))
                },
                // Something the registry acts on: report it now rather than when the hold ends.
                () = self.load_moved(&sent) => continue,
            };
            let desired = answer.and_then(|value| {
                serde_json::from_value::<DesiredState>(value).map_err(|e| ProtoError::Malformed(e.to_string()))
            });
            let desired = match desired {
                Ok(d) => {
                    if backoff.failures() > 0 {
                        tracing::info!("registry reachable again");
                    }
                    backoff.reset();
                    d
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    let failures = backoff.failures();
                    if failures == 1 || failures % 30 == 0 {
                        tracing::warn!(
                            "registry unreachable, serving the last desired state ({failures} tries, next in {} ms): {e}",
                            delay.as_millis()
                        );
                    }
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            if desired.revision == applied {
                continue;
            }
            self.tell_hubs(&desired);
            self.persist(&desired);
            match self.converge(&desired).await {
                Ok(()) => {
                    applied = desired.revision;
                    self.trim_cache(&desired).await;
                }
                Err(e) => {
                    tracing::warn!("converging to generation {} failed, retrying: {e}", desired.generation);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Returns once the registry connection has received nothing for `longest` (never, while that
    /// cannot be told: no connection yet). A live registry acknowledges the request within a round
    /// trip and answers within its hold.
    async fn silent_registry(&self, longest: Duration) {
        let mut last = self.client.received_datagrams();
        let mut since = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(REPORT_CHECK).await;
            let now = self.client.received_datagrams();
            if now != last || now.is_none() {
                (last, since) = (now, tokio::time::Instant::now());
            } else if since.elapsed() >= longest {
                return;
            }
        }
    }

    /// Returns once the node's load report says something the registry acts on, compared with `sent`.
    async fn load_moved(&self, sent: &[VersionActivity]) {
        loop {
            tokio::time::sleep(REPORT_CHECK).await;
            if report_early(sent, &activity(&self.control.report().await)) {
                return;
            }
        }
    }

    /// Deletes cached model files over the budget: never one `desired` wants, oldest first.
    async fn trim_cache(&self, desired: &DesiredState) {
        let wanted: BTreeSet<String> = desired
            .models
            .iter()
            .flat_map(|m| m.versions.iter().flat_map(|v| [Some(v.digest.clone()), v.reference.clone()]))
            .flatten()
            .collect();
        let dir = self.dir.join("models");
        let budget = self.cache_budget;
        let trimmed = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<String>> {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().to_string();
                // A download cut short is kept to be resumed, while its version is still wanted.
                if let Some(digest) = name.strip_suffix(".partial") {
                    if !wanted.contains(digest) {
                        std::fs::remove_file(entry.path())?;
                    }
                    continue;
                }
                let Some(digest) = name.strip_suffix(".onnx") else { continue };
                let meta = entry.metadata()?;
                let last_used = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                files.push(CachedFile {
                    digest: digest.to_string(),
                    size: meta.len(),
                    last_used,
                    in_use: wanted.contains(digest),
                });
            }
            let gone = evictions(&files, budget);
            for digest in &gone {
                std::fs::remove_file(dir.join(format!("{digest}.onnx")))?;
            }
            Ok(gone)
        })
        .await;
        match trimmed {
            Ok(Ok(gone)) if !gone.is_empty() => {
                tracing::info!(
                    files = gone.len(),
                    budget_mib = budget >> 20,
                    "model cache trimmed to its budget: {gone:?}"
                )
            }
            Ok(Err(e)) => tracing::warn!("cannot trim the model cache: {e}"),
            _ => {}
        }
    }

    /// Hands the hubs of a desired state to the offloader (edges).
    fn tell_hubs(&self, desired: &DesiredState) {
        if let Some(hubs) = &self.hubs {
            hubs.set_hubs(&desired.hubs);
        }
    }

    fn persisted(&self) -> Option<DesiredState> {
        let text = std::fs::read(self.desired_file()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn persist(&self, desired: &DesiredState) {
        let tmp = self.desired_file().with_extension("tmp");
        let written = serde_json::to_vec(desired)
            .map_err(std::io::Error::other)
            .and_then(|text| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, self.desired_file()));
        if let Err(e) = written {
            tracing::warn!("cannot keep the desired state on disk: {e}");
        }
    }

    /// Brings the node to `desired`.
    async fn converge(&self, desired: &DesiredState) -> Result<(), ConvergeError> {
        let mut managed = self.managed.lock().await;
        for model in &desired.models {
            for v in &model.versions {
                match self.control.loaded(&model.name, v.version) {
                    None => {
                        let path = self.model_file(&v.digest).await?;
                        // Loaded with a replica even when scaled to zero: the load checks the file and
                        // measures the cold start; the pool then goes to zero.
                        let config =
                            ModelConfig { replicas: v.replicas.max(1), ..self.control.model_defaults().clone() };
                        self.control.load_version(&model.name, v.version, Source::Path(path), config, false).await?;
                        if v.replicas == 0 {
                            self.control
                                .reconfigure(&model.name, v.version, &serde_json::json!({ "replicas": 0 }))
                                .await?;
                        }
                    }
                    Some(m) if m.config.replicas != v.replicas => {
                        let change = serde_json::json!({ "replicas": v.replicas });
                        self.control.reconfigure(&model.name, v.version, &change).await?;
                    }
                    Some(_) => {}
                }
                managed.insert((model.name.clone(), v.version));
                if let Some(digest) = &v.reference {
                    self.watch_reference(&model.name, v.version, digest).await?;
                }
            }
            if let Some(policy) = &model.policy {
                self.control.set_policy(&model.name, Some(policy.clone()))?;
            }
            self.control.place_cascade(&model.name, model.cascade.clone());
        }
        let wanted = managed_by(desired);
        let names: BTreeSet<&str> = desired.models.iter().map(|m| m.name.as_str()).collect();
        for (name, version) in managed.clone().into_iter().filter(|k| !wanted.contains(k)) {
            if !names.contains(name.as_str()) {
                self.control.place_cascade(&name, None);
                // No longer deployed here: nothing routes to it once the policy is gone.
                self.control.set_policy(&name, None).or_else(|e| match e {
                    ControlError::Policy(fabric_policy::traffic::PolicyError::UnknownModel(_)) => Ok(()),
                    e => Err(e),
                })?;
            }
            match self.control.unload_versions(&name, Some(version)).await {
                Ok(_) | Err(ControlError::Route(_)) => {
                    managed.remove(&(name, version));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Counts `name:version`'s answers against the reference statistics `digest` (fetched like a
    /// model file) unless it already does.
    async fn watch_reference(&self, name: &str, version: u64, digest: &str) -> Result<(), ConvergeError> {
        let Some(model) = self.control.loaded(name, version) else { return Ok(()) };
        if model.quality.reference_digest().as_deref() == Some(digest) {
            return Ok(());
        }
        let path = self.model_file(digest).await?;
        let stats = std::fs::read(&path).map_err(|e| e.to_string()).and_then(|bytes| {
            serde_json::from_slice::<fabric_policy::drift::Reference>(&bytes).map_err(|e| e.to_string())
        });
        match stats {
            Ok(stats) => {
                tracing::info!(
                    model = name,
                    version,
                    rows = stats.rows,
                    features = stats.features(),
                    "counting drift against the version's reference"
                );
                model.quality.set_reference(digest, stats);
            }
            // Serving goes on without drift counts: a reference this node cannot read is no outage.
            Err(e) => {
                tracing::warn!(model = name, version, %digest, "reference statistics unreadable, drift not counted: {e}")
            }
        }
        Ok(())
    }

    /// The cached model file for `digest`, checked against it; fetched when missing or wrong.
    async fn model_file(&self, digest: &str) -> Result<PathBuf, ConvergeError> {
        let path = self.cached(digest);
        if path.exists() {
            if digest_of(&path).await.as_deref() == Some(digest) {
                touch(&path);
                return Ok(path);
            }
            tracing::warn!(%digest, "cached model file does not match its digest (corrupted on disk): fetching it again");
            let _ = std::fs::remove_file(&path);
        }
        let fetched = self.client.fetch(digest, &path).await.map_err(|e| ConvergeError::Fetch(e.to_string()))?;
        match digest_of(&path).await {
            Some(d) if d == digest => {
                tracing::info!(%digest, size = fetched.size, resumed_from = fetched.resumed_from, "model file fetched");
                Ok(path)
            }
            got => {
                let _ = std::fs::remove_file(&path);
                Err(ConvergeError::Fetch(format!("fetched model file has digest {got:?}, wanted {digest}")))
            }
        }
    }
}

/// First retry delay after the registry could not be reached, and the most it grows to.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_CAP: Duration = Duration::from_secs(5);
/// How much later than its longest hold a heartbeat's answer may come before the registry is deemed gone.
const ANSWER_MARGIN: Duration = Duration::from_secs(10);
/// A connection that received nothing for this long past the registry's hold is a registry that is
/// gone (a live one acknowledges a request within a round trip and answers within its hold).
const SILENT_LIMIT: Duration = Duration::from_secs(2);
/// How often the agent looks at its load report while a heartbeat is held.
const REPORT_CHECK: Duration = Duration::from_millis(250);

/// What the registry acts on in a load report.
fn activity(report: &fabric_proto::report::NodeReport) -> Vec<VersionActivity> {
    report
        .versions
        .iter()
        .map(|v| VersionActivity {
            name: v.name.clone(),
            version: v.version,
            ready: v.ready,
            loading: v.loading_replicas,
            restarts: v.restarts,
            failing: v.last_load_error.is_some(),
            arrivals_per_s: v.recent.arrivals_per_s,
            busy: v.window.arrivals_per_s > 0.0 || v.queue_depth > 0 || v.in_flight > 0,
        })
        .collect()
}

/// Marks a cached file as just used (its modification time), for the cache budget's "oldest first".
fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

fn managed_by(desired: &DesiredState) -> BTreeSet<(String, u64)> {
    desired.models.iter().flat_map(|m| m.versions.iter().map(|v| (m.name.clone(), v.version))).collect()
}

async fn digest_of(path: &Path) -> Option<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || fabric_proto::registry::sha256_file(&path).ok()).await.ok().flatten()
}

/// What this machine has, for the registry: cores and memory (MiB, from /proc/meminfo on Linux).
pub fn machine() -> (usize, u64) {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or(0, |kb| kb / 1024);
    (cores, memory)
}
