//! The registry service: requests from the CLI and the nodes over QUIC, carried out against the state
//! (every change one durable transition, in order) and the nodes' last heartbeats (in memory: they
//! are re-learnt within a second of a restart).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabric_core::registry_proto::{
    self, DesiredState, Heartbeat, HubEntry, NodeInfo, Refusal, Reply, Request, RolloutAction, MAX_FRAME,
};
use fabric_core::tls::{self, Identity, Role};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::rollout::{self, AnalysisSettings, Window};
use crate::state::{now_ms, scaled_key, Deployment, ModelVersion, RegistryState, Scaled};
use crate::store::Store;
use fabric_core::policy::autoscale::{AutoscaleSettings, Autoscaler, LoadSample};

/// The registry's settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Largest model file accepted.
    pub max_model_bytes: u64,
    /// When a canary with automatic rollback is rolled back.
    pub analysis: AnalysisSettings,
    /// How often canaries are analysed.
    pub analysis_every: Duration,
    /// A node whose last heartbeat is older than this is down (its reports no longer count).
    pub heartbeat_timeout: Duration,
    /// How deployed versions are scaled on each node (`max_replicas` 0: the node's cores); `None`:
    /// the deployment's replica count, fixed.
    pub autoscale: Option<AutoscaleSettings>,
    /// Seconds a version may sit idle on a hub before it goes to zero replicas (0: never).
    pub hub_idle_to_zero_s: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_model_bytes: 1 << 30,
            analysis: AnalysisSettings::default(),
            analysis_every: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(3),
            autoscale: Some(AutoscaleSettings { max_replicas: 0, ..AutoscaleSettings::default() }),
            hub_idle_to_zero_s: 300.0,
        }
    }
}

/// What the registry knows of a node from its last heartbeat.
struct NodeRecord {
    info: NodeInfo,
    ready: BTreeSet<(String, u64)>,
    report: Value,
    applied: u64,
    last_seen: Instant,
}

/// The registry: state, store, nodes.
pub struct Registry {
    store: Box<dyn Store>,
    /// Revision in the store, and the state.
    state: Mutex<(u64, RegistryState)>,
    nodes: Mutex<BTreeMap<String, NodeRecord>>,
    /// Bumped on every change a node's desired state may depend on (long polls wake on it).
    changed: watch::Sender<u64>,
    settings: Settings,
    /// One autoscaler per node and version, fed by that node's heartbeats.
    scalers: Mutex<BTreeMap<(String, String, u64), Autoscaler>>,
    /// Each node's up/down state at the last liveness tick.
    liveness: Mutex<BTreeMap<String, bool>>,
    started: Instant,
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal::new("internal", e.to_string())
}

impl Registry {
    /// Opens the registry on `store`, with the state last written.
    pub fn open(store: Box<dyn Store>, settings: Settings) -> Result<Arc<Registry>, crate::store::StoreError> {
        let current = store.load()?.unwrap_or_default();
        let (changed, _) = watch::channel(0);
        Ok(Arc::new(Registry {
            store,
            state: Mutex::new(current),
            nodes: Mutex::new(BTreeMap::new()),
            changed,
            settings,
            scalers: Mutex::new(BTreeMap::new()),
            liveness: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
        }))
    }

    fn state(&self) -> RegistryState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1.clone()
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Runs one transition: `change` edits a copy of the state; the copy is written (one atomic write)
    /// and only then becomes the state. Transitions are serialised, so they are ordered.
    fn transition(&self, change: impl FnOnce(&mut RegistryState) -> Result<Value, Refusal>) -> Reply {
        let mut current = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = current.1.clone();
        let answer = change(&mut next)?;
        next.generation += 1;
        let revision = self.store.save(current.0, &next).map_err(internal)?;
        *current = (revision, next);
        drop(current);
        self.notify();
        Ok(answer)
    }

    /// Carries out one request from `peer`; a push reads its bytes from `recv`.
    pub async fn handle(&self, peer: &Identity, request: Request, recv: &mut quinn::RecvStream) -> Reply {
        let operator = || {
            if peer.role == Role::Operator {
                Ok(())
            } else {
                Err(Refusal::new(
                    "forbidden",
                    format!(
                        "{} '{}' may not do this: it needs an operator certificate (fabric certs --node NAME:operator)",
                        peer.role.as_str(),
                        peer.node_id
                    ),
                ))
            }
        };
        match request {
            Request::Push { name, version, size } => {
                operator()?;
                self.push(peer, &name, version, size, recv).await
            }
            Request::ListModels => {
                operator()?;
                let state = self.state();
                Ok(json!(state.models.values().flat_map(|v| v.values()).collect::<Vec<_>>()))
            }
            Request::ShowModel { name, version } => {
                operator()?;
                self.show(&name, version)
            }
            Request::RemoveModel { name, version } => {
                operator()?;
                self.remove(&name, version)
            }
            Request::Deploy { name, to, labels, replicas } => {
                operator()?;
                self.deploy(&name, Deployment { to, labels, replicas: replicas.max(1) })
            }
            Request::Rollout { name, change } => {
                operator()?;
                self.rollout(&name, &change, None)
            }
            Request::RolloutStatus { name } => {
                operator()?;
                self.status(&name)
            }
            Request::Nodes => {
                operator()?;
                Ok(self.nodes())
            }
            Request::Overview => {
                operator()?;
                Ok(self.overview())
            }
            Request::Heartbeat(heartbeat) => self.heartbeat(peer, heartbeat).await,
            Request::Fetch { .. } => Err(Refusal::new("invalid", "fetch is answered on its stream")),
        }
    }

    async fn push(
        &self,
        peer: &Identity,
        name: &str,
        version: Option<u64>,
        size: u64,
        recv: &mut quinn::RecvStream,
    ) -> Reply {
        check_name(name)?;
        if size > self.settings.max_model_bytes {
            let _ = recv.stop(0u32.into());
            return Err(Refusal::new(
                "too_large",
                format!(
                    "model file of {size} bytes is over the registry's limit of {} bytes (--max-model-mib)",
                    self.settings.max_model_bytes
                ),
            ));
        }
        let staged = self.store.staging_path();
        let result = self.receive(recv, &staged, size).await;
        let digest = match result {
            Ok(digest) => digest,
            Err(e) => {
                let _ = std::fs::remove_file(&staged);
                let _ = recv.stop(0u32.into());
                return Err(e);
            }
        };
        // Validated before it is accepted: the file parses and its inputs and outputs are read.
        let path = staged.clone();
        let metadata = tokio::task::spawn_blocking(move || -> Result<fabric_core::ModelMetadata, String> {
            let (_bytes, proto) = fabric_core::model::read_onnx(&path).map_err(|e| e.to_string())?;
            fabric_core::ModelMetadata::from_proto(&proto, &path).map_err(|e| e.to_string())
        })
        .await
        .map_err(internal)?;
        let metadata = match metadata {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&staged);
                return Err(Refusal::new("invalid", format!("not a usable ONNX model: {e}")));
            }
        };
        let mut committed = false;
        let answer = self.transition(|state| {
            let versions = state.models.entry(name.to_string()).or_default();
            let version = match version {
                Some(v) if versions.contains_key(&v) => {
                    return Err(Refusal::new(
                        "conflict",
                        format!("{name}:{v} exists and versions are immutable: push a new version"),
                    ))
                }
                Some(0) => return Err(Refusal::new("invalid", "versions start at 1")),
                Some(v) => v,
                None => versions.keys().next_back().map_or(1, |v| v + 1),
            };
            self.store.commit_blob(&staged, &digest).map_err(internal)?;
            committed = true;
            let model = ModelVersion {
                name: name.to_string(),
                version,
                digest: digest.clone(),
                size,
                inputs: json!(metadata.inputs),
                outputs: json!(metadata.outputs),
                pushed_by: peer.node_id.clone(),
                pushed_at: now_ms() / 1000,
            };
            versions.insert(version, model.clone());
            Ok(json!(model))
        });
        if answer.is_err() {
            let _ = std::fs::remove_file(&staged);
            if committed && !self.state().models.values().flat_map(|v| v.values()).any(|m| m.digest == digest) {
                self.store.remove_blob(&digest);
            }
        }
        answer
    }

    /// Reads exactly `size` bytes into `staged`, hashing them; refuses short and long streams. Bytes
    /// are written in blocks of [`WRITE_BLOCK`] (one trip to the blocking pool each, not one per chunk).
    async fn receive(&self, recv: &mut quinn::RecvStream, staged: &Path, size: u64) -> Result<String, Refusal> {
        let file = std::fs::File::create(staged).map_err(internal)?;
        let mut file = Some(file);
        let mut block: Vec<u8> = Vec::with_capacity(WRITE_BLOCK);
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        let mut got = 0u64;
        loop {
            let chunk = tokio::time::timeout(Duration::from_secs(30), recv.read_chunk(registry_proto::CHUNK, true))
                .await
                .map_err(|_| Refusal::new("invalid", "the upload stalled for 30 s"))?
                .map_err(|e| Refusal::new("invalid", format!("the upload was cut: {e}")))?;
            let Some(chunk) = chunk else { break };
            got += chunk.bytes.len() as u64;
            if got > size {
                return Err(Refusal::new(
                    "invalid",
                    format!("the upload sent more than the {size} bytes it announced"),
                ));
            }
            context.update(&chunk.bytes);
            block.extend_from_slice(&chunk.bytes);
            if block.len() >= WRITE_BLOCK {
                file = Some(write_block(file, std::mem::take(&mut block), false).await?);
                block.reserve(WRITE_BLOCK);
            }
        }
        if got != size {
            return Err(Refusal::new("invalid", format!("the upload was truncated: {got} of {size} bytes arrived")));
        }
        write_block(file, block, true).await?;
        Ok(registry_proto::hex(context.finish().as_ref()))
    }

    fn show(&self, name: &str, version: Option<u64>) -> Reply {
        let state = self.state();
        let versions = state.models.get(name).ok_or_else(|| Refusal::new("not_found", format!("no model '{name}'")))?;
        match version {
            Some(v) => versions
                .get(&v)
                .map(|m| json!(m))
                .ok_or_else(|| Refusal::new("not_found", format!("model '{name}' has no version {v}"))),
            None => Ok(json!({
                "name": name,
                "versions": versions.values().collect::<Vec<_>>(),
                "deployments": state.deployments.get(name),
                "rollout": state.rollouts.get(name),
            })),
        }
    }

    fn remove(&self, name: &str, version: u64) -> Reply {
        let on_nodes: Vec<String> = self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|n| n.ready.contains(&(name.to_string(), version)))
            .map(|n| n.info.node_id.clone())
            .collect();
        let mut digest = None;
        let answer = self.transition(|state| {
            if let Some(r) = state.rollouts.get(name).filter(|r| r.versions().contains(&version)) {
                return Err(Refusal::new(
                    "conflict",
                    format!("{name}:{version} is in the rollout ({}): move the rollout off it first", json!(r)),
                ));
            }
            if !on_nodes.is_empty() {
                return Err(Refusal::new(
                    "conflict",
                    format!("{name}:{version} is still loaded on {}", on_nodes.join(", ")),
                ));
            }
            let versions =
                state.models.get_mut(name).ok_or_else(|| Refusal::new("not_found", format!("no model '{name}'")))?;
            let removed = versions
                .remove(&version)
                .ok_or_else(|| Refusal::new("not_found", format!("model '{name}' has no version {version}")))?;
            if versions.is_empty() {
                state.models.remove(name);
            }
            digest = Some(removed.digest.clone());
            Ok(json!({ "removed": removed }))
        })?;
        if let Some(d) = digest {
            if !self.state().models.values().flat_map(|v| v.values()).any(|m| m.digest == d) {
                self.store.remove_blob(&d);
            }
        }
        Ok(answer)
    }

    fn deploy(&self, name: &str, deployment: Deployment) -> Reply {
        self.transition(|state| {
            let newest = state.models.get(name).and_then(|v| v.keys().next_back().copied()).ok_or_else(|| {
                Refusal::new("not_found", format!("no model '{name}': push one with `fabric model push {name} FILE`"))
            })?;
            let groups = state.deployments.entry(name.to_string()).or_default();
            groups.retain(|d| !(d.to == deployment.to && d.labels == deployment.labels));
            groups.push(deployment.clone());
            let generation = state.generation + 1;
            let rollout = state.rollouts.entry(name.to_string()).or_default();
            if rollout.stable.is_none() {
                rollout.stable = Some(newest);
                rollout.record(now_ms(), generation, format!("deployed; pinned the newest version {newest}"));
            }
            Ok(json!({ "name": name, "generation": generation, "deployments": groups, "rollout": rollout }))
        })
    }

    /// Changes a rollout (`auto`: the analysis's reason, for an automatic rollback).
    fn rollout(&self, name: &str, change: &RolloutAction, auto: Option<String>) -> Reply {
        self.transition(|state| {
            let (mut rollout, line) = rollout::apply(state, name, change)?;
            let line = match &auto {
                Some(why) => format!("automatic rollback: {why}"),
                None => line,
            };
            rollout.auto_rolled_back = auto.clone().or(rollout.auto_rolled_back);
            rollout.record(now_ms(), state.generation + 1, line);
            state.rollouts.insert(name.to_string(), rollout.clone());
            Ok(json!({ "name": name, "generation": state.generation + 1, "rollout": rollout }))
        })
    }

    fn status(&self, name: &str) -> Reply {
        let state = self.state();
        let rollout = state.rollouts.get(name).ok_or_else(|| {
            Refusal::new("not_found", format!("model '{name}' has no rollout: `fabric deploy {name} --to ...` first"))
        })?;
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let timeout = self.settings.heartbeat_timeout;
        let per_node: Vec<Value> = nodes
            .values()
            .filter(|n| state.deployments.get(name).is_some_and(|ds| ds.iter().any(|d| rollout::targets(d, &n.info))))
            .map(|n| {
                let desired = rollout::desired_for(&state, &n.info, &n.ready);
                let versions: Vec<Value> = n.report["versions"]
                    .as_array()
                    .map(|vs| vs.iter().filter(|v| v["name"] == name).cloned().collect())
                    .unwrap_or_default();
                let prefix = format!("{name}:");
                let scaled: BTreeMap<&String, &Scaled> = state
                    .scaled
                    .get(&n.info.node_id)
                    .map(|s| s.iter().filter(|(k, _)| k.starts_with(&prefix)).collect())
                    .unwrap_or_default();
                let replicas: Option<BTreeMap<String, usize>> = desired
                    .iter()
                    .find(|m| m.name == name)
                    .map(|m| m.versions.iter().map(|v| (v.version.to_string(), v.replicas)).collect());
                json!({
                    "node": n.info.node_id,
                    "replicas": replicas,
                    "autoscaled": scaled,
                    "ready": n.ready.iter().filter(|(m, _)| m == name).map(|(_, v)| v).collect::<Vec<_>>(),
                    "policy": desired.iter().find(|m| m.name == name).and_then(|m| m.policy.clone()),
                    "converged": n.applied == DesiredState::new(0, desired.clone(), hubs_for(&nodes, &n.info, timeout)).revision,
                    "versions": versions,
                })
            })
            .collect();
        let analysis = rollout.canary.map(|c| {
            let stable =
                rollout.stable.map(|s| window(&nodes, name, s, self.settings.heartbeat_timeout)).unwrap_or_default();
            let canary = window(&nodes, name, c.version, self.settings.heartbeat_timeout);
            json!({ "stable": window_json(&stable), "canary": window_json(&canary) })
        });
        Ok(
            json!({ "name": name, "generation": state.generation, "rollout": rollout, "analysis": analysis, "nodes": per_node }),
        )
    }

    /// Nodes, models and rollouts in one value (read-only): what `fabric top` and the status page show.
    pub fn overview(&self) -> Value {
        let state = self.state();
        let models: Vec<Value> = state
            .models
            .iter()
            .map(|(name, versions)| {
                // Each version's figures over the nodes' last reports, summed once here for every
                // viewer (the status page, `fabric top`).
                let live: Vec<Value> = {
                    let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
                    versions
                        .keys()
                        .map(|&v| {
                            let w = window(&nodes, name, v, self.settings.heartbeat_timeout);
                            json!({
                                "version": v, "weight_pct": w.weight_pct, "requests_per_s": w.per_s,
                                "error_pct": w.error_pct(), "p50_ms": w.p50_ms, "p99_ms": w.p99_ms,
                                "replicas": w.replicas,
                            })
                        })
                        .collect()
                };
                json!({
                    "name": name,
                    "versions": versions.values().map(|m| json!({ "version": m.version, "size": m.size, "digest": m.digest })).collect::<Vec<_>>(),
                    "deployments": state.deployments.get(name),
                    "status": self.status(name).ok(),
                    "live": live,
                })
            })
            .collect();
        json!({ "generation": state.generation, "nodes": self.nodes(), "models": models })
    }

    fn nodes(&self) -> Value {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        json!(nodes
            .values()
            .map(|n| {
                let sum = |key: &str| -> f64 {
                    n.report["versions"]
                        .as_array()
                        .map(|vs| vs.iter().map(|v| v[key].as_f64().unwrap_or(0.0)).sum())
                        .unwrap_or(0.0)
                };
                let up = node_state(n.last_seen.elapsed(), self.settings.heartbeat_timeout) == "up";
                // A node that stopped heartbeating serves nothing we know of: its last report is stale.
                let served = if up { sum("served_per_s") } else { 0.0 };
                let restarts = sum("restarts");
                let versions = n.report["versions"].as_array().cloned().unwrap_or_default();
                // Per model version: replicas replaced (panics, watchdog), and the ones failing now
                // (a load that keeps failing, or a crash loop: replaced with backoff, not in a tight loop).
                let restarts_by_version: BTreeMap<String, u64> = versions
                    .iter()
                    .filter(|v| v["restarts"].as_u64().unwrap_or(0) > 0)
                    .map(|v| (format!("{}:{}", text_of(&v["name"]), v["version"]), v["restarts"].as_u64().unwrap_or(0)))
                    .collect();
                let failing: Vec<Value> = versions
                    .iter()
                    .filter(|v| !v["last_load_error"].is_null())
                    .map(|v| {
                        json!({
                            "model": v["name"],
                            "version": v["version"],
                            "restarts": v["restarts"],
                            "reason": v["last_load_error"],
                        })
                    })
                    .collect();
                json!({
                    "node": n.info.node_id,
                    "state": node_state(n.last_seen.elapsed(), self.settings.heartbeat_timeout),
                    "restarts": restarts,
                    "restarts_by_version": restarts_by_version,
                    "failing": failing,
                    "role": n.info.role,
                    "labels": n.info.labels,
                    "http": n.info.http,
                    "last_heartbeat_ms": n.last_seen.elapsed().as_millis() as u64,
                    "ready": n.ready.iter().map(|(m, v)| format!("{m}:{v}")).collect::<Vec<_>>(),
                    "served_per_s": served,
                    "cores": n.info.cores,
                    "memory_mib": n.info.memory_mib,
                    "engines": n.info.engines,
                    "gpu": n.info.gpu,
                })
            })
            .collect::<Vec<_>>())
    }

    fn desired(&self, node_id: &str) -> DesiredState {
        let state = self.state();
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let (models, hubs) = match nodes.get(node_id) {
            Some(n) => (
                rollout::desired_for(&state, &n.info, &n.ready),
                hubs_for(&nodes, &n.info, self.settings.heartbeat_timeout),
            ),
            None => (Vec::new(), Vec::new()),
        };
        DesiredState::new(state.generation, models, hubs)
    }

    /// One liveness tick: when a node has gone down (or come back) since the last tick, long polls
    /// wake, so edges hear of a hub that stopped heartbeating within a tick of its timeout.
    pub fn check_liveness(&self) {
        let now_up: BTreeMap<String, bool> = {
            let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes
                .iter()
                .map(|(id, n)| (id.clone(), node_state(n.last_seen.elapsed(), self.settings.heartbeat_timeout) == "up"))
                .collect()
        };
        let mut last = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        if *last != now_up {
            for (id, up) in &now_up {
                if last.get(id) != Some(up) {
                    if *up {
                        tracing::info!(node = %id, "node up");
                    } else {
                        tracing::warn!(node = %id, "node down: no heartbeat for {} ms", self.settings.heartbeat_timeout.as_millis());
                    }
                }
            }
            *last = now_up;
            drop(last);
            self.notify();
        }
    }

    /// A node reports; answers its desired state at once if it differs from what the node applied,
    /// else when it changes or after the node's `wait_ms` (at most 5 s).
    async fn heartbeat(&self, peer: &Identity, heartbeat: Heartbeat) -> Reply {
        let info = heartbeat.info;
        if info.node_id != peer.node_id {
            return Err(Refusal::new(
                "forbidden",
                format!(
                    "node '{}' cannot report as '{}': a node reports only for itself (its certificate decides)",
                    peer.node_id, info.node_id
                ),
            ));
        }
        if !matches!(peer.role, Role::Edge | Role::Hub) || info.role != peer.role.as_str() {
            return Err(Refusal::new(
                "forbidden",
                format!("only edge and hub certificates heartbeat; '{}' is {}", peer.node_id, peer.role.as_str()),
            ));
        }
        let ready: BTreeSet<(String, u64)> = heartbeat.ready.into_iter().map(|r| (r.name, r.version)).collect();
        let ready_changed = {
            let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            let before = nodes.get(&info.node_id).map(|n| n.ready.clone());
            let id = info.node_id.clone();
            nodes.insert(
                id,
                NodeRecord {
                    info: info.clone(),
                    ready: ready.clone(),
                    report: heartbeat.report,
                    applied: heartbeat.applied,
                    last_seen: Instant::now(),
                },
            );
            before.as_ref() != Some(&ready)
        };
        if ready_changed {
            self.notify();
        }
        self.autoscale(&info);
        let mut changes = self.changed.subscribe();
        let until = tokio::time::Instant::now() + Duration::from_millis(heartbeat.wait_ms.min(5_000));
        loop {
            let desired = self.desired(&info.node_id);
            if desired.revision != heartbeat.applied {
                return Ok(json!(desired));
            }
            match tokio::time::timeout_at(until, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Ok(json!(desired)),
            }
        }
    }

    /// Feeds a node's fresh report to the autoscalers of the versions deployed there; a change of
    /// replica count is a transition (durable, with its reason) that reaches the node as desired state.
    fn autoscale(&self, info: &NodeInfo) {
        let Some(mut settings) = self.settings.autoscale else { return };
        if settings.max_replicas == 0 {
            settings.max_replicas = info.cores.max(1);
        }
        if info.role == Role::Hub.as_str() {
            settings.idle_to_zero_s = self.settings.hub_idle_to_zero_s;
        }
        let state = self.state();
        let (report, desired) = match self.nodes.lock().unwrap_or_else(|p| p.into_inner()).get(&info.node_id) {
            Some(n) => (n.report.clone(), rollout::desired_for(&state, &n.info, &n.ready)),
            None => return,
        };
        let mut changes = Vec::new();
        {
            let mut scalers = self.scalers.lock().unwrap_or_else(|p| p.into_inner());
            for m in &desired {
                for dv in &m.versions {
                    let reported = report["versions"].as_array().into_iter().flatten();
                    let Some(v) =
                        reported.into_iter().find(|v| v["name"] == m.name.as_str() && v["version"] == dv.version)
                    else {
                        continue;
                    };
                    if v["loading_replicas"].as_u64().unwrap_or(0) > 0 || !v["last_load_error"].is_null() {
                        continue;
                    }
                    let sample = LoadSample::from_report(v, self.started.elapsed());
                    let key = (info.node_id.clone(), m.name.clone(), dv.version);
                    let on_gpu = v["on_gpu"].as_bool().unwrap_or(false);
                    let scaler = scalers.entry(key).or_insert_with(|| Autoscaler::new(settings.for_device(on_gpu)));
                    let decision = scaler.decide(&sample, dv.replicas);
                    if decision.replicas != dv.replicas {
                        changes.push((m.name.clone(), dv.version, dv.replicas, decision));
                    }
                }
            }
        }
        for (model, version, from, decision) in changes {
            tracing::info!(node = %info.node_id, %model, version, from, to = decision.replicas, "autoscaling: {}", decision.reason);
            let node = info.node_id.clone();
            let result = self.transition(|state| {
                let scaled = Scaled { replicas: decision.replicas, reason: decision.reason.clone(), at_ms: now_ms() };
                state.scaled.entry(node).or_default().insert(scaled_key(&model, version), scaled);
                Ok(Value::Null)
            });
            if let Err(e) = result {
                tracing::error!(%model, version, "cannot record the autoscaling decision: {e}");
            }
        }
    }

    /// Streams a model file to a node (or operator) that asked for it by digest.
    pub async fn fetch(&self, peer: &Identity, digest: &str, send: &mut quinn::SendStream) -> Result<(), Refusal> {
        let known = self.state().models.values().flat_map(|v| v.values()).find(|m| m.digest == digest).cloned();
        let Some(model) = known else {
            return Err(Refusal::new("not_found", format!("no model file with digest {digest}")));
        };
        tracing::debug!(node = %peer.node_id, model = %model.name, version = model.version, "model file fetched");
        let path = self.store.blob_path(digest);
        let mut file = tokio::fs::File::open(&path).await.map_err(internal)?;
        registry_proto::write_frame(send, &Reply::Ok(json!({ "size": model.size }))).await.map_err(internal)?;
        tokio::io::copy(&mut file, send).await.map_err(internal)?;
        Ok(())
    }

    /// One analysis tick: rolls back canaries (with automatic rollback on) that are worse than their
    /// stable version by the configured margins.
    pub fn analyse(&self) {
        let state = self.state();
        let decisions: Vec<(String, String)> = {
            let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            state
                .rollouts
                .iter()
                .filter_map(|(name, r)| {
                    let c = r.canary.filter(|c| c.auto_rollback)?;
                    let stable = window(&nodes, name, r.stable?, self.settings.heartbeat_timeout);
                    let canary = window(&nodes, name, c.version, self.settings.heartbeat_timeout);
                    rollout::analyse(&stable, &canary, &self.settings.analysis).map(|why| (name.clone(), why))
                })
                .collect()
        };
        for (name, why) in decisions {
            tracing::warn!(model = %name, "automatic rollback: {why}");
            if let Err(e) = self.rollout(&name, &RolloutAction::Rollback, Some(why)) {
                tracing::error!(model = %name, "automatic rollback failed: {e}");
            }
        }
    }
}

/// Bytes an upload buffers before writing them out.
const WRITE_BLOCK: usize = 4 << 20;

/// Writes a block on the blocking pool (and syncs the file when `last`); hands the file back.
async fn write_block(file: Option<std::fs::File>, block: Vec<u8>, last: bool) -> Result<std::fs::File, Refusal> {
    use std::io::Write;
    let mut file = file.ok_or_else(|| internal("upload file lost"))?;
    tokio::task::spawn_blocking(move || {
        file.write_all(&block)?;
        if last {
            file.sync_all()?;
        }
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(internal)?
    .map_err(internal)
}

/// What one version did over the nodes' last reports.
fn window(nodes: &BTreeMap<String, NodeRecord>, name: &str, version: u64, timeout: Duration) -> Window {
    let mut w = Window::default();
    let mut serving = 0u32;
    let highest = |so_far: Option<f64>, new: Option<f64>| match (so_far, new) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    for n in nodes.values().filter(|n| node_state(n.last_seen.elapsed(), timeout) == "up") {
        for v in n.report["versions"].as_array().into_iter().flatten() {
            if v["name"] != name || v["version"] != version {
                continue;
            }
            let secs = v["window_ms"].as_f64().unwrap_or(0.0) / 1e3;
            let ok = v["served_per_s"].as_f64().unwrap_or(0.0) + v["offloaded_per_s"].as_f64().unwrap_or(0.0);
            let rejected: f64 =
                v["rejected_per_s"].as_object().map(|m| m.values().filter_map(Value::as_f64).sum()).unwrap_or(0.0);
            w.answered += (ok + rejected) * secs;
            w.errors += rejected * secs;
            w.per_s += ok + rejected;
            w.p99_ms = highest(w.p99_ms, v["p99_ms"].as_f64());
            w.p50_ms = highest(w.p50_ms, v["p50_ms"].as_f64());
            w.replicas += v["ready_replicas"].as_u64().unwrap_or(0);
            w.weight_pct += v["weight_pct"].as_f64().unwrap_or(0.0);
            serving += 1;
        }
    }
    if serving > 0 {
        w.weight_pct /= f64::from(serving);
    }
    w
}

/// The hubs an edge offloads to (none for other roles): every hub that has heartbeated since the
/// registry started, with its QUIC address and whether it is up. A hub not heard of since a registry
/// restart is simply not listed; edges keep what they knew of it (no restart marks hubs down).
fn hubs_for(nodes: &BTreeMap<String, NodeRecord>, node: &NodeInfo, timeout: Duration) -> Vec<HubEntry> {
    if node.role != Role::Edge.as_str() {
        return Vec::new();
    }
    nodes
        .values()
        .filter(|n| n.info.role == Role::Hub.as_str())
        .filter_map(|n| {
            let addr = n.info.quic.clone()?;
            Some(HubEntry {
                node_id: n.info.node_id.clone(),
                addr,
                up: node_state(n.last_seen.elapsed(), timeout) == "up",
            })
        })
        .collect()
}

/// Whether a node is up: its last heartbeat is at most `timeout` old (heartbeats come at least every
/// second, long polls included).
pub fn node_state(since_heartbeat: Duration, timeout: Duration) -> &'static str {
    if since_heartbeat <= timeout {
        "up"
    } else {
        "down"
    }
}

fn window_json(w: &Window) -> Value {
    json!({ "requests": w.answered.round(), "error_pct": w.error_pct(), "p99_ms": w.p99_ms })
}

/// A JSON string's text (empty for anything else).
fn text_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn check_name(name: &str) -> Result<(), Refusal> {
    if registry_proto::is_plain_name(name) {
        Ok(())
    } else {
        Err(Refusal::new("invalid", format!("invalid model name '{name}': use letters, digits, '_', '-' and '.'")))
    }
}

/// How often node liveness is checked (a hub that stopped is known down within this of its timeout).
const LIVENESS_TICK: Duration = Duration::from_millis(250);

/// Serves the registry on `endpoint` until it closes.
pub async fn serve(endpoint: quinn::Endpoint, registry: Arc<Registry>) {
    let ticker = registry.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(ticker.settings.analysis_every);
        loop {
            every.tick().await;
            ticker.analyse();
        }
    });
    let ticker = registry.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(LIVENESS_TICK);
        loop {
            every.tick().await;
            ticker.check_liveness();
        }
    });
    while let Some(incoming) = endpoint.accept().await {
        let registry = registry.clone();
        tokio::spawn(async move {
            let connection = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("QUIC handshake refused: {e}");
                    return;
                }
            };
            let peer = match tls::peer_identity(&connection) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("peer without a usable identity: {e}");
                    connection.close(1u32.into(), b"no identity");
                    return;
                }
            };
            while let Ok((send, recv)) = connection.accept_bi().await {
                let (registry, peer) = (registry.clone(), peer.clone());
                tokio::spawn(async move { handle_stream(&registry, &peer, send, recv).await });
            }
        });
    }
}

async fn handle_stream(registry: &Registry, peer: &Identity, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let request: Request = match registry_proto::read_frame(&mut recv, MAX_FRAME).await {
        Ok(r) => r,
        Err(e) => {
            let reply: Reply = Err(Refusal::new("invalid", format!("malformed request: {e}")));
            let _ = registry_proto::write_frame(&mut send, &reply).await;
            let _ = send.finish();
            return;
        }
    };
    if let Request::Fetch { digest } = &request {
        if let Err(refusal) = registry.fetch(peer, digest, &mut send).await {
            let _ = registry_proto::write_frame(&mut send, &Reply::Err(refusal)).await;
        }
        let _ = send.finish();
        return;
    }
    let reply = registry.handle(peer, request, &mut recv).await;
    if let Err(e) = &reply {
        tracing::info!(peer = %peer.node_id, kind = %e.kind, "request refused: {}", e.message);
    }
    let _ = registry_proto::write_frame(&mut send, &reply).await;
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_down_after_the_heartbeat_timeout() {
        let timeout = Duration::from_secs(3);
        for (age_ms, want) in [(0, "up"), (1_000, "up"), (3_000, "up"), (3_001, "down"), (60_000, "down")] {
            assert_eq!(node_state(Duration::from_millis(age_ms), timeout), want, "{age_ms} ms");
        }
    }
}
