//! The registry service: requests from the CLI and the nodes over QUIC, carried out against the state
//! (every change one durable transition, in order, writing only the keys it changed) and the fleet's
//! last heartbeats (in memory, [`crate::fleet`]: re-learnt from the next heartbeats after a restart).
//!
//! What a heartbeat costs is its own node's work: the state is a shared snapshot (no copy per
//! heartbeat), the desired state is computed once per change and per group of nodes that get the
//! same answer (role, labels, versions ready, replica counts: [`GroupKey`]), the hub list is kept up
//! to date as hubs change, and a change wakes only the held heartbeats whose answer it changes. A
//! node that is idle (no traffic, no canary under analysis, not a hub) is held longer
//! (`Settings::idle_heartbeat`); it reports at once when its load changes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use fabric_proto::registry::{
    self, DesiredState, Heartbeat, NodeInfo, NodeQuery, Refusal, Reply, Request, RolloutAction, MAX_FRAME,
};
use fabric_proto::tls::{self, Identity, Role};
use serde_json::{json, Value};

use crate::fleet::{Fleet, NodeRecord};
use crate::rollout::{self, AnalysisSettings, Window};
use crate::state::{now_ms, scaled_key, Deployment, ModelVersion, RegistryState, Scaled};
use crate::store::{scaled_record_key, Change, Store};
use fabric_policy::autoscale::{AutoscaleSettings, Autoscaler, LoadSample};

/// The registry's settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Largest model file accepted.
    pub max_model_bytes: u64,
    /// When a canary with automatic rollback is rolled back.
    pub analysis: AnalysisSettings,
    /// How often canaries are analysed.
    pub analysis_every: Duration,
    /// A node whose last heartbeat is older than this (plus the longer hold of an idle node) is down
    /// (its reports no longer count).
    pub heartbeat_timeout: Duration,
    /// How deployed versions are scaled on each node (`max_replicas` 0: the node's cores); `None`:
    /// the deployment's replica count, fixed.
    pub autoscale: Option<AutoscaleSettings>,
    /// Seconds a version may sit idle on a hub before it goes to zero replicas (0: never).
    pub hub_idle_to_zero_s: f64,
    /// Longest an idle node's heartbeat is held (it may ask for less).
    pub idle_heartbeat: Duration,
    /// A node down for longer than this is forgotten, with everything kept for it.
    pub forget_after: Duration,
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
            idle_heartbeat: Duration::from_secs(10),
            forget_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// What decides a node's desired state besides the registry's state: nodes with equal keys get the
/// same answer, computed once.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GroupKey {
    generation: u64,
    /// The hub list's version (edges only; 0 for hubs).
    hubs: u64,
    role: String,
    labels: BTreeMap<String, String>,
    ready: BTreeSet<(String, u64)>,
    scaled: Vec<(String, usize)>,
}

/// A desired state and its answer frame, serialised once and shared by every node of its group.
pub struct Desired {
    /// What the nodes of the group should serve.
    pub state: DesiredState,
    /// The answer as it goes on the wire (a `Reply`'s JSON).
    frame: Vec<u8>,
}

/// Groups cached before the cache is emptied (it is emptied by every transition anyway).
const DESIRED_CACHE: usize = 4096;
/// The most a fast heartbeat is held, in milliseconds.
const FAST_HOLD_MS: u64 = 5_000;

/// The registry: state, store, fleet.
pub struct Registry {
    store: Box<dyn Store>,
    /// The state: a snapshot replaced whole by each transition.
    state: RwLock<Arc<RegistryState>>,
    /// The store's revision; held while writing, so writes are ordered.
    revision: Mutex<u64>,
    fleet: Fleet,
    /// Autoscaling decisions by node, then `model:version`.
    scaled: DashMap<String, BTreeMap<String, Scaled>>,
    /// Decisions not written yet (store key, record or `None` to delete): one write per tick.
    unsaved: Mutex<BTreeMap<String, Option<Scaled>>>,
    desired: DashMap<GroupKey, Arc<Desired>>,
    /// Desired states computed (cache misses), for the benchmark and tests.
    computed: AtomicU64,
    /// A hub came (back) or moved since the last liveness tick: edges are woken then.
    hubs_moved: std::sync::atomic::AtomicBool,
    settings: Settings,
    /// One autoscaler per node and version, fed by that node's heartbeats.
    scalers: DashMap<(String, String, u64), Autoscaler>,
    started: Instant,
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal::new("internal", e.to_string())
}

/// Activity in a node's report that the registry watches closely (traffic, a queue, a load).
fn active(report: &Value) -> bool {
    report["versions"].as_array().into_iter().flatten().any(|v| {
        v["arrivals_per_s"].as_f64().unwrap_or(0.0) > 0.0
            || v["queue_depth"].as_u64().unwrap_or(0) > 0
            || v["loading_replicas"].as_u64().unwrap_or(0) > 0
    })
}

impl Registry {
    /// Opens the registry on `store`, with the state last written.
    pub fn open(store: Box<dyn Store>, settings: Settings) -> Result<Arc<Registry>, crate::store::StoreError> {
        let stored = store.load()?.unwrap_or_default();
        Ok(Arc::new(Registry {
            store,
            state: RwLock::new(Arc::new(stored.state)),
            revision: Mutex::new(stored.revision),
            fleet: Fleet::default(),
            scaled: stored.scaled.into_iter().collect(),
            unsaved: Mutex::new(BTreeMap::new()),
            desired: DashMap::new(),
            computed: AtomicU64::new(0),
            hubs_moved: std::sync::atomic::AtomicBool::new(false),
            settings,
            scalers: DashMap::new(),
            started: Instant::now(),
        }))
    }

    /// The current state (a shared snapshot).
    pub fn state(&self) -> Arc<RegistryState> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The fleet's node table.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// Desired states computed so far (each serves every node of its group until the next change).
    pub fn desired_computed(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }

    /// Runs one transition: `change` edits a copy of the state; the keys it changed are written (one
    /// atomic write) and only then is the copy the state. Transitions are serialised, so they are
    /// ordered. Held heartbeats whose answer changes are woken.
    fn transition(&self, change: impl FnOnce(&mut RegistryState) -> Result<Value, Refusal>) -> Reply {
        let mut revision = self.revision.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.state();
        let mut next = (*current).clone();
        let answer = change(&mut next)?;
        next.generation += 1;
        let changes = crate::store::diff(&current, &next);
        *revision = self.store.write(*revision, &changes).map_err(internal)?;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        drop(revision);
        self.desired.clear();
        self.wake_changed(|_| true);
        Ok(answer)
    }

    /// Wakes the held heartbeats (of nodes `concerned` selects) whose desired state now differs from
    /// what they applied.
    fn wake_changed(&self, concerned: impl Fn(&NodeInfo) -> bool) {
        for id in self.fleet.waiting() {
            let Some((info, ready, applied)) = self.fleet.with(&id, |n| (n.info.clone(), n.ready.clone(), n.applied))
            else {
                continue;
            };
            if concerned(&info) && self.desired_of(&info, &ready).state.revision != applied {
                self.fleet.wake(&id);
            }
        }
    }

    /// The desired state of a node with `info` and `ready`, from the group cache.
    fn desired_of(&self, info: &NodeInfo, ready: &BTreeSet<(String, u64)>) -> Arc<Desired> {
        let state = self.state();
        let edge = info.role == Role::Edge.as_str();
        let (hubs, hubs_version) = if edge { self.fleet.hubs() } else { (Arc::new(Vec::new()), 0) };
        let scaled = self.scaled.get(&info.node_id).map(|s| s.clone());
        let key = GroupKey {
            generation: state.generation,
            hubs: hubs_version,
            role: info.role.clone(),
            labels: info.labels.clone(),
            ready: ready.clone(),
            scaled: scaled.iter().flatten().map(|(k, s)| (k.clone(), s.replicas)).collect(),
        };
        if let Some(d) = self.desired.get(&key) {
            return d.clone();
        }
        let models = rollout::desired_for(&state, info, ready, scaled.as_ref());
        let desired = DesiredState::new(state.generation, models, hubs.to_vec());
        let frame = serde_json::to_vec(&Ok::<&DesiredState, Refusal>(&desired)).unwrap_or_default();
        let computed = Arc::new(Desired { state: desired, frame });
        if self.desired.len() >= DESIRED_CACHE {
            self.desired.clear();
        }
        self.desired.insert(key, computed.clone());
        self.computed.fetch_add(1, Ordering::Relaxed);
        computed
    }

    /// A node's desired state now (`None`: not known).
    fn desired_for_node(&self, id: &str) -> Option<Arc<Desired>> {
        let (info, ready) = self.fleet.with(id, |n| (n.info.clone(), n.ready.clone()))?;
        Some(self.desired_of(&info, &ready))
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
            Request::Heartbeat(heartbeat) => self.heartbeat(peer, heartbeat).await.map(|d| json!(d.state)),
            Request::Fetch { .. } => Err(Refusal::new("invalid", "fetch is answered on its stream")),
            other => {
                operator()?;
                self.read_or_change(other)
            }
        }
    }

    /// The operator requests that need no stream: reads and transitions.
    pub fn read_or_change(&self, request: Request) -> Reply {
        match request {
            Request::ListModels => {
                let state = self.state();
                Ok(json!(state.models.values().flat_map(|v| v.values()).collect::<Vec<_>>()))
            }
            Request::ShowModel { name, version } => self.show(&name, version),
            Request::RemoveModel { name, version } => self.remove(&name, version),
            Request::Deploy { name, to, labels, replicas } => {
                self.deploy(&name, Deployment { to, labels, replicas: replicas.max(1) })
            }
            Request::Rollout { name, change } => self.rollout(&name, &change, None),
            Request::RolloutStatus { name, limit } => self.status(&name, limit.unwrap_or(DETAIL_NODES)),
            Request::Nodes(query) => Ok(self.nodes(&query)),
            Request::Overview => Ok(self.overview()),
            Request::Push { .. } | Request::Heartbeat(_) | Request::Fetch { .. } => {
                Err(Refusal::new("invalid", "this request needs its stream"))
            }
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
        let metadata = tokio::task::spawn_blocking(move || -> Result<fabric_engine::ModelMetadata, String> {
            let (_bytes, proto) = fabric_engine::model::read_onnx(&path).map_err(|e| e.to_string())?;
            fabric_engine::ModelMetadata::from_proto(&proto, &path).map_err(|e| e.to_string())
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
            let chunk = tokio::time::timeout(Duration::from_secs(30), recv.read_chunk(registry::CHUNK, true))
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
        Ok(registry::hex(context.finish().as_ref()))
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
        let mut on_nodes = Vec::new();
        self.fleet.each(|n| {
            if n.ready.contains(&(name.to_string(), version)) {
                on_nodes.push(n.info.node_id.clone());
            }
        });
        on_nodes.sort();
        let mut digest = None;
        let answer = self.transition(|state| {
            if let Some(r) = state.rollouts.get(name).filter(|r| r.versions().contains(&version)) {
                return Err(Refusal::new(
                    "conflict",
                    format!("{name}:{version} is in the rollout ({}): move the rollout off it first", json!(r)),
                ));
            }
            if !on_nodes.is_empty() {
                let shown: Vec<&str> = on_nodes.iter().take(10).map(String::as_str).collect();
                let more = on_nodes.len().saturating_sub(shown.len());
                let more = if more > 0 { format!(" and {more} more") } else { String::new() };
                return Err(Refusal::new(
                    "conflict",
                    format!("{name}:{version} is still loaded on {}{more}", shown.join(", ")),
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

    /// A model's rollout: counts over the nodes it targets (per state, per version ready, per route),
    /// and per-node detail for at most `limit` of them (0: all), those that need attention first.
    fn status(&self, name: &str, limit: usize) -> Reply {
        let state = self.state();
        let rollout = state.rollouts.get(name).ok_or_else(|| {
            Refusal::new("not_found", format!("model '{name}' has no rollout: `fabric deploy {name} --to ...` first"))
        })?;
        let timeout = self.settings.heartbeat_timeout;
        let deployments = state.deployments.get(name);
        // Pass 1, over the fleet: counts, and which nodes get detail.
        let (mut total, mut up, mut converged) = (0usize, 0usize, 0usize);
        let mut ready_on: BTreeMap<u64, usize> = BTreeMap::new();
        let mut routes: BTreeMap<String, (Value, usize)> = BTreeMap::new();
        let mut candidates: Vec<(bool, String)> = Vec::new();
        self.fleet.each(|n| {
            if !deployments.is_some_and(|ds| ds.iter().any(|d| rollout::targets(d, &n.info))) {
                return;
            }
            total += 1;
            let is_up = n.is_up(timeout);
            up += usize::from(is_up);
            let desired = self.desired_of(&n.info, &n.ready);
            let done = n.applied == desired.state.revision;
            converged += usize::from(done);
            for (_, v) in n.ready.iter().filter(|(m, _)| m == name) {
                *ready_on.entry(*v).or_default() += 1;
            }
            let policy = desired.state.models.iter().find(|m| m.name == name).and_then(|m| m.policy.clone());
            let weights = json!(policy.map(|p| p.weights));
            routes.entry(weights.to_string()).or_insert((weights, 0)).1 += 1;
            candidates.push((is_up && done, n.info.node_id.clone()));
        });
        candidates.sort();
        if limit > 0 {
            candidates.truncate(limit);
        }
        let per_node: Vec<Value> = candidates.iter().filter_map(|(_, id)| self.node_status(name, id)).collect();
        let nodes = &self.fleet;
        let analysis = rollout.canary.map(|c| {
            let stable = rollout.stable.map(|s| window(&nodes, name, s, timeout)).unwrap_or_default();
            let canary = window(&nodes, name, c.version, timeout);
            json!({ "stable": window_json(&stable), "canary": window_json(&canary) })
        });
        let summary = json!({
            "nodes": total, "up": up, "down": total - up, "converged": converged, "not_converged": total - converged,
            "ready": ready_on.iter().map(|(v, n)| (v.to_string(), *n)).collect::<BTreeMap<_, _>>(),
            "routes": routes.into_values().map(|(weights, n)| json!({ "weights": weights, "nodes": n })).collect::<Vec<_>>(),
        });
        Ok(json!({
            "name": name, "generation": state.generation, "rollout": rollout, "analysis": analysis,
            "summary": summary, "nodes": per_node,
        }))
    }

    /// One node's part in a model's rollout.
    fn node_status(&self, name: &str, id: &str) -> Option<Value> {
        let desired = self.desired_for_node(id)?;
        let prefix = format!("{name}:");
        let scaled: BTreeMap<String, Scaled> = self
            .scaled
            .get(id)
            .map(|s| s.iter().filter(|(k, _)| k.starts_with(&prefix)).map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let model = desired.state.models.iter().find(|m| m.name == name);
        let replicas: Option<BTreeMap<String, usize>> =
            model.map(|m| m.versions.iter().map(|v| (v.version.to_string(), v.replicas)).collect());
        self.fleet.with(id, |n| {
            let versions: Vec<Value> = n.report["versions"]
                .as_array()
                .map(|vs| vs.iter().filter(|v| v["name"] == name).cloned().collect())
                .unwrap_or_default();
            json!({
                "node": id,
                "state": if n.is_up(self.settings.heartbeat_timeout) { "up" } else { "down" },
                "replicas": replicas,
                "autoscaled": scaled,
                "ready": n.ready.iter().filter(|(m, _)| m == name).map(|(_, v)| v).collect::<Vec<_>>(),
                "policy": model.and_then(|m| m.policy.clone()),
                "converged": n.applied == desired.state.revision,
                "versions": versions,
            })
        })
    }

    /// Nodes, models and rollouts in one value (read-only): what `fabric top` and the status page show.
    /// Nodes as counts, and the nodes that need attention (down or failing) first, at most
    /// [`OVERVIEW_NODES`] of them.
    pub fn overview(&self) -> Value {
        let state = self.state();
        let nodes = &self.fleet;
        let timeout = self.settings.heartbeat_timeout;
        let models: Vec<Value> = state
            .models
            .iter()
            .map(|(name, versions)| {
                // Each version's figures over the nodes' last reports, summed once here for every
                // viewer (the status page, `fabric top`).
                let live: Vec<Value> = versions
                    .keys()
                    .map(|&v| {
                        let w = window(&nodes, name, v, timeout);
                        json!({
                            "version": v, "weight_pct": w.weight_pct, "requests_per_s": w.per_s,
                            "error_pct": w.error_pct(), "p50_ms": w.p50_ms, "p99_ms": w.p99_ms,
                            "replicas": w.replicas,
                        })
                    })
                    .collect();
                json!({
                    "name": name,
                    "versions": versions.values().map(|m| json!({ "version": m.version, "size": m.size, "digest": m.digest })).collect::<Vec<_>>(),
                    "deployments": state.deployments.get(name),
                    "status": self.status(name, DETAIL_NODES).ok(),
                    "live": live,
                })
            })
            .collect();
        let mut counts: BTreeMap<String, BTreeMap<&str, usize>> = BTreeMap::new();
        self.fleet.each(|n| {
            let state = if n.is_up(timeout) { "up" } else { "down" };
            *counts.entry(n.info.role.clone()).or_default().entry(state).or_default() += 1;
        });
        let shown = self.nodes(&NodeQuery { limit: Some(OVERVIEW_NODES), ..Default::default() });
        json!({
            "generation": state.generation,
            "node_counts": counts,
            "nodes_total": self.fleet.len(),
            "nodes": shown,
            "models": models,
        })
    }

    /// The nodes `query` selects: those that need attention (down, or a version failing) first, then
    /// by id; at most `query.limit`.
    fn nodes(&self, query: &NodeQuery) -> Value {
        let timeout = self.settings.heartbeat_timeout;
        let mut selected: Vec<(bool, String)> = Vec::new();
        self.fleet.each(|n| {
            let up = n.is_up(timeout);
            let state_ok = query.state.as_deref().is_none_or(|s| s == if up { "up" } else { "down" });
            let role_ok = query.role.as_deref().is_none_or(|r| r == n.info.role);
            let labels_ok = query.labels.iter().all(|(k, v)| n.info.labels.get(k) == Some(v));
            if state_ok && role_ok && labels_ok {
                selected.push((up && !failing(&n.report), n.info.node_id.clone()));
            }
        });
        selected.sort();
        if let Some(limit) = query.limit.filter(|&l| l > 0) {
            selected.truncate(limit);
        }
        json!(selected.iter().filter_map(|(_, id)| self.fleet.with(id, |n| node_json(n, timeout))).collect::<Vec<_>>())
    }

    /// A node reports; answers its desired state at once if it differs from what the node applied,
    /// else when a change concerns it or after its hold: the node's `wait_ms` (at most 5 s) while it
    /// is watched (a hub, traffic, a canary under analysis), else up to its `max_wait_ms` and the
    /// registry's idle hold.
    pub async fn heartbeat(&self, peer: &Identity, heartbeat: Heartbeat) -> Result<Arc<Desired>, Refusal> {
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
        // Subscribed before anything is computed, so a change from here on is not missed.
        let mut changes = self.fleet.subscribe(&info.node_id);
        let fast_ms = heartbeat.wait_ms.min(FAST_HOLD_MS);
        let watched = info.role == Role::Hub.as_str() || active(&heartbeat.report);
        let (hubs_changed, came_back) = self.fleet.record(NodeRecord {
            info: info.clone(),
            ready: ready.clone(),
            report: heartbeat.report,
            applied: heartbeat.applied,
            last_seen: Instant::now(),
            slack: Duration::ZERO,
            up: true,
        });
        if came_back {
            tracing::info!(node = %info.node_id, "node up again");
        }
        if hubs_changed {
            // Edges hear of it at the next liveness tick: a hub flapping wakes them at most 4 times
            // a second, not once per heartbeat.
            self.hubs_moved.store(true, Ordering::Release);
        }
        let mut desired = self.desired_of(&info, &ready);
        if self.autoscale(&info, &desired) {
            desired = self.desired_of(&info, &ready);
        }
        let analysed = {
            let state = self.state();
            desired
                .state
                .models
                .iter()
                .any(|m| state.rollouts.get(&m.name).is_some_and(|r| r.canary.is_some_and(|c| c.auto_rollback)))
        };
        let hold_ms = if watched || analysed {
            fast_ms
        } else {
            heartbeat
                .max_wait_ms
                .max(heartbeat.wait_ms)
                .min(self.settings.idle_heartbeat.as_millis() as u64)
                .max(fast_ms)
        };
        // Down when the next heartbeat is the timeout late; an idle node, held long, twice the timeout
        // late (a loaded registry answers a fleet's held heartbeats late, and that is no outage).
        let slack = if hold_ms > fast_ms { hold_ms + self.settings.heartbeat_timeout.as_millis() as u64 } else { 0 };
        self.fleet.set_slack(&info.node_id, Duration::from_millis(slack));
        let until = tokio::time::Instant::now() + Duration::from_millis(hold_ms);
        loop {
            if desired.state.revision != heartbeat.applied {
                return Ok(desired);
            }
            match tokio::time::timeout_at(until, changes.changed()).await {
                Ok(Ok(())) => desired = self.desired_of(&info, &ready),
                _ => return Ok(desired),
            }
        }
    }

    /// Feeds a node's fresh report to the autoscalers of the versions deployed there; a change of
    /// replica count takes effect at once (the node's next answer carries it) and is written with the
    /// tick's other decisions ([`Registry::flush_scaled`]). Returns whether any count changed.
    fn autoscale(&self, info: &NodeInfo, desired: &Desired) -> bool {
        let Some(mut settings) = self.settings.autoscale else { return false };
        if settings.max_replicas == 0 {
            settings.max_replicas = info.cores.max(1);
        }
        if info.role == Role::Hub.as_str() {
            settings.idle_to_zero_s = self.settings.hub_idle_to_zero_s;
        }
        let mut changes = Vec::new();
        self.fleet.with(&info.node_id, |n| {
            for m in &desired.state.models {
                for dv in &m.versions {
                    let reported = n.report["versions"].as_array().into_iter().flatten();
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
                    let mut scaler =
                        self.scalers.entry(key).or_insert_with(|| Autoscaler::new(settings.for_device(on_gpu)));
                    let decision = scaler.decide(&sample, dv.replicas);
                    if decision.replicas != dv.replicas {
                        changes.push((m.name.clone(), dv.version, dv.replicas, decision));
                    }
                }
            }
        });
        let changed = !changes.is_empty();
        for (model, version, from, decision) in changes {
            tracing::info!(node = %info.node_id, %model, version, from, to = decision.replicas, "autoscaling: {}", decision.reason);
            let key = scaled_key(&model, version);
            let scaled = Scaled { replicas: decision.replicas, reason: decision.reason.clone(), at_ms: now_ms() };
            self.scaled.entry(info.node_id.clone()).or_default().insert(key.clone(), scaled.clone());
            self.unsaved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(scaled_record_key(&info.node_id, &key), Some(scaled));
        }
        changed
    }

    /// Writes the autoscaling decisions since the last call, in one durable write (called every
    /// [`FLUSH_TICK`]); a failed write is kept for the next one.
    pub fn flush_scaled(&self) {
        let pending = std::mem::take(&mut *self.unsaved.lock().unwrap_or_else(|p| p.into_inner()));
        if pending.is_empty() {
            return;
        }
        let changes: Vec<Change> = pending
            .iter()
            .map(|(k, v)| match v {
                Some(s) => Change::Put(k.clone(), serde_json::to_vec(s).unwrap_or_default()),
                None => Change::Delete(k.clone()),
            })
            .collect();
        let mut revision = self.revision.lock().unwrap_or_else(|p| p.into_inner());
        match self.store.write(*revision, &changes) {
            Ok(r) => *revision = r,
            Err(e) => {
                tracing::error!(decisions = changes.len(), "cannot record autoscaling decisions (retried): {e}");
                let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
                for (k, v) in pending {
                    unsaved.entry(k).or_insert(v);
                }
            }
        }
    }

    /// One liveness tick: nodes down (or back), the hub list updated (waking only edges), nodes gone
    /// for longer than the retention forgotten with their autoscaling records.
    pub fn check_liveness(&self) {
        let tick = self.fleet.tick(self.settings.heartbeat_timeout, self.settings.forget_after);
        // One line per node, or one line for many (a fleet's worth of lines helps nobody).
        let timeout_ms = self.settings.heartbeat_timeout.as_millis();
        if tick.down.len() > MANY_NODES {
            let first: Vec<&String> = tick.down.iter().take(MANY_NODES).collect();
            tracing::warn!(
                nodes = tick.down.len(),
                "nodes down: no heartbeat in time (timeout {timeout_ms} ms), first {first:?}"
            );
        } else {
            for id in &tick.down {
                tracing::warn!(node = %id, "node down: no heartbeat for {timeout_ms} ms");
            }
        }
        if tick.up.len() > MANY_NODES {
            tracing::info!(nodes = tick.up.len(), "nodes up again");
        } else {
            for id in &tick.up {
                tracing::info!(node = %id, "node up");
            }
        }
        if !tick.forgotten.is_empty() {
            let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
            for id in &tick.forgotten {
                if let Some((_, records)) = self.scaled.remove(id) {
                    for key in records.keys() {
                        unsaved.insert(scaled_record_key(id, key), None);
                    }
                }
            }
            drop(unsaved);
            let gone: BTreeSet<&String> = tick.forgotten.iter().collect();
            self.scalers.retain(|(node, _, _), _| !gone.contains(node));
            tracing::info!(
                nodes = tick.forgotten.len(),
                "forgot nodes down for over {} s: {:?}",
                self.settings.forget_after.as_secs(),
                tick.forgotten
            );
        }
        if tick.hubs_changed | self.hubs_moved.swap(false, Ordering::AcqRel) {
            self.wake_changed(|n| n.role == Role::Edge.as_str());
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
        registry::write_frame(send, &Reply::Ok(json!({ "size": model.size }))).await.map_err(internal)?;
        tokio::io::copy(&mut file, send).await.map_err(internal)?;
        Ok(())
    }

    /// One analysis tick: rolls back canaries (with automatic rollback on) that are worse than their
    /// stable version by the configured margins.
    pub fn analyse(&self) {
        let state = self.state();
        let timeout = self.settings.heartbeat_timeout;
        let decisions: Vec<(String, String)> = state
            .rollouts
            .iter()
            .filter_map(|(name, r)| {
                let c = r.canary.filter(|c| c.auto_rollback)?;
                let stable = window(&self.fleet, name, r.stable?, timeout);
                let canary = window(&self.fleet, name, c.version, timeout);
                rollout::analyse(&stable, &canary, &self.settings.analysis).map(|why| (name.clone(), why))
            })
            .collect();
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

/// Per-node detail in `rollout status` unless asked otherwise.
pub const DETAIL_NODES: usize = 20;
/// Nodes listed one by one in the overview (the rest are counted).
pub const OVERVIEW_NODES: usize = 50;

/// Whether a node's report says a version is failing (a load that keeps failing, a crash loop).
fn failing(report: &Value) -> bool {
    report["versions"].as_array().into_iter().flatten().any(|v| !v["last_load_error"].is_null())
}

/// One node as `fabric nodes` shows it.
fn node_json(n: &NodeRecord, timeout: Duration) -> Value {
    let sum = |key: &str| -> f64 {
        n.report["versions"].as_array().map(|vs| vs.iter().map(|v| v[key].as_f64().unwrap_or(0.0)).sum()).unwrap_or(0.0)
    };
    let up = n.is_up(timeout);
    // A node that stopped heartbeating serves nothing we know of: its last report is stale.
    let served = if up { sum("served_per_s") } else { 0.0 };
    let versions = n.report["versions"].as_array().cloned().unwrap_or_default();
    // Per model version: replicas replaced (panics, watchdog), and the ones failing now (a load that
    // keeps failing, or a crash loop: replaced with backoff, not in a tight loop).
    let restarts_by_version: BTreeMap<String, u64> = versions
        .iter()
        .filter(|v| v["restarts"].as_u64().unwrap_or(0) > 0)
        .map(|v| (format!("{}:{}", text_of(&v["name"]), v["version"]), v["restarts"].as_u64().unwrap_or(0)))
        .collect();
    let failing: Vec<Value> = versions
        .iter()
        .filter(|v| !v["last_load_error"].is_null())
        .map(|v| json!({ "model": v["name"], "version": v["version"], "restarts": v["restarts"], "reason": v["last_load_error"] }))
        .collect();
    json!({
        "node": n.info.node_id,
        "state": if up { "up" } else { "down" },
        "restarts": sum("restarts"),
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
}

/// What one version did over the nodes' last reports.
fn window(fleet: &Fleet, name: &str, version: u64, timeout: Duration) -> Window {
    let mut w = Window::default();
    let mut serving = 0u32;
    let highest = |so_far: Option<f64>, new: Option<f64>| match (so_far, new) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    fleet.each(|n| {
        // Only nodes that serve it (no allocation: this runs over the whole fleet).
        if !n.is_up(timeout) || !n.ready.iter().any(|(m, v)| m == name && *v == version) {
            return;
        }
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
    });
    if serving > 0 {
        w.weight_pct /= f64::from(serving);
    }
    w
}

fn window_json(w: &Window) -> Value {
    json!({ "requests": w.answered.round(), "error_pct": w.error_pct(), "p99_ms": w.p99_ms })
}

/// A JSON string's text (empty for anything else).
fn text_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn check_name(name: &str) -> Result<(), Refusal> {
    if registry::is_plain_name(name) {
        Ok(())
    } else {
        Err(Refusal::new("invalid", format!("invalid model name '{name}': use letters, digits, '_', '-' and '.'")))
    }
}

/// Above this many nodes changing state in one tick, one log line says so for all.
const MANY_NODES: usize = 10;
/// How often node liveness is checked (a hub that stopped is known down within this of its timeout).
const LIVENESS_TICK: Duration = Duration::from_millis(250);
/// Longest a QUIC handshake may take (twice as long as a node waits for one).
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// How often autoscaling decisions are written (one write for all of them).
pub const FLUSH_TICK: Duration = Duration::from_millis(250);

/// How many QUIC handshakes the registry runs at once: one that cannot start within `queue_wait`
/// is refused (the node retries with jittered backoff) rather than left to time out.
#[derive(Clone, Copy, Debug)]
pub struct Admission {
    /// Handshakes in progress at most.
    pub max_handshakes: usize,
    /// Longest a handshake waits for its turn before it is refused.
    pub queue_wait: Duration,
}

impl Default for Admission {
    fn default() -> Self {
        Admission { max_handshakes: 256, queue_wait: Duration::from_secs(1) }
    }
}

/// Serves the registry on `endpoint` until it closes.
pub async fn serve(endpoint: quinn::Endpoint, registry: Arc<Registry>, admission: Admission) {
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
    let ticker = registry.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(FLUSH_TICK);
        loop {
            every.tick().await;
            ticker.flush_scaled();
        }
    });
    let turns = Arc::new(tokio::sync::Semaphore::new(admission.max_handshakes.max(1)));
    let refused = Arc::new(AtomicU64::new(0));
    let reporter = refused.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            let n = reporter.swap(0, Ordering::Relaxed);
            if n > 0 {
                tracing::warn!(
                    refused = n,
                    "QUIC handshakes refused in the last 5 s: too many at once (nodes retry with backoff)"
                );
            }
        }
    });
    while let Some(incoming) = endpoint.accept().await {
        let registry = registry.clone();
        let (turns, refused) = (turns.clone(), refused.clone());
        tokio::spawn(async move {
            // A burst (a fleet reconnecting) waits its turn briefly; beyond that it is refused at
            // once, which the node hears immediately, instead of a handshake that times out.
            let Ok(Ok(turn)) = tokio::time::timeout(admission.queue_wait, turns.acquire_owned()).await else {
                refused.fetch_add(1, Ordering::Relaxed);
                incoming.refuse();
                return;
            };
            // Bounded (a node gives up on a connect after 5 s): a handshake whose client gave up
            // must not hold a turn until QUIC's idle timeout.
            let connected = match tokio::time::timeout(HANDSHAKE_LIMIT, incoming).await {
                Ok(connected) => connected,
                Err(_) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            drop(turn);
            let connection = match connected {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("QUIC handshake refused: {e}");
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
    let request: Request = match registry::read_frame(&mut recv, MAX_FRAME).await {
        Ok(r) => r,
        Err(e) => {
            let reply: Reply = Err(Refusal::new("invalid", format!("malformed request: {e}")));
            let _ = registry::write_frame(&mut send, &reply).await;
            let _ = send.finish();
            return;
        }
    };
    if let Request::Fetch { digest } = &request {
        if let Err(refusal) = registry.fetch(peer, digest, &mut send).await {
            let _ = registry::write_frame(&mut send, &Reply::Err(refusal)).await;
        }
        let _ = send.finish();
        return;
    }
    // A node that gave up on its held heartbeat (it reports afresh) stops the stream: stop holding.
    let reply = match request {
        Request::Heartbeat(heartbeat) => {
            let answer = tokio::select! {
                answer = registry.heartbeat(peer, heartbeat) => answer,
                _ = send.stopped() => return,
            };
            match answer {
                // The group's answer, serialised once.
                Ok(desired) => {
                    let _ = registry::write_raw_frame(&mut send, &desired.frame).await;
                    let _ = send.finish();
                    return;
                }
                Err(refusal) => Err(refusal),
            }
        }
        request => registry.handle(peer, request, &mut recv).await,
    };
    if let Err(e) = &reply {
        tracing::info!(peer = %peer.node_id, kind = %e.kind, "request refused: {}", e.message);
    }
    let _ = registry::write_frame(&mut send, &reply).await;
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{test_version, Rollout};
    use crate::store::RedbStore;
    use fabric_proto::registry::{ReadyVersion, Target};

    fn registry(name: &str, settings: Settings) -> (Arc<Registry>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("registry-service-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = RedbStore::open(&dir).expect("store");
        (Registry::open(Box::new(store), settings).expect("registry"), dir)
    }

    fn settings() -> Settings {
        Settings { autoscale: None, ..Settings::default() }
    }

    /// Models `a` (deployed to edges at site x) and `b` (site y), versions 1 and 2, stable 1.
    fn two_models(r: &Registry) {
        r.transition(|s| {
            for (name, site) in [("a", "x"), ("b", "y")] {
                let versions = s.models.entry(name.into()).or_default();
                versions.insert(1, test_version(name, 1));
                versions.insert(2, test_version(name, 2));
                let labels = BTreeMap::from([("site".to_string(), site.to_string())]);
                s.deployments.insert(name.into(), vec![Deployment { to: Target::Edge, labels, replicas: 1 }]);
                s.rollouts.insert(name.into(), Rollout { stable: Some(1), ..Default::default() });
            }
            Ok(Value::Null)
        })
        .expect("set up");
    }

    fn node(id: &str, role: Role, site: &str) -> (Identity, NodeInfo) {
        let info = NodeInfo {
            node_id: id.into(),
            role: role.as_str().into(),
            labels: BTreeMap::from([("site".to_string(), site.to_string())]),
            quic: (role == Role::Hub).then(|| "127.0.0.1:4433".to_string()),
            ..Default::default()
        };
        (Identity { node_id: id.into(), role }, info)
    }

    fn beat(info: &NodeInfo, applied: u64, ready: &[(&str, u64)]) -> Heartbeat {
        Heartbeat {
            info: info.clone(),
            applied,
            ready: ready.iter().map(|(n, v)| ReadyVersion { name: n.to_string(), version: *v }).collect(),
            report: json!({ "versions": [] }),
            wait_ms: 500,
            max_wait_ms: 30_000,
        }
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let limit = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(tokio::time::Instant::now() < limit, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn a_change_wakes_only_the_nodes_it_concerns() {
        let (r, dir) = registry("wakes", settings());
        two_models(&r);
        // The hub first: a hub joining changes every edge's answer (its hub list).
        let nodes = [
            node("hub-1", Role::Hub, "x"),
            node("edge-x1", Role::Edge, "x"),
            node("edge-x2", Role::Edge, "x"),
            node("edge-y1", Role::Edge, "y"),
        ];
        // Each node converges (its first answer), then holds a heartbeat with what it applied.
        let mut held = BTreeMap::new();
        for (peer, info) in &nodes {
            let model = if info.labels["site"] == "x" { "a" } else { "b" };
            let first = r.heartbeat(peer, beat(info, 0, &[])).await.expect("first answer");
            let ready: Vec<(&str, u64)> = if info.role == "edge" { vec![(model, 1)] } else { vec![] };
            let desired = first.state.clone();
            let revision = r.desired_of(info, &ready.iter().map(|(m, v)| (m.to_string(), *v)).collect()).state.revision;
            assert!(desired.models.iter().all(|m| m.name == model), "{} got {:?}", info.node_id, desired.models);
            let (r, peer, hb) = (r.clone(), peer.clone(), beat(info, revision, &ready));
            held.insert(info.node_id.clone(), tokio::spawn(async move { r.heartbeat(&peer, hb).await }));
        }
        until("four held heartbeats", || r.fleet.waiting().len() == 4).await;
        // A canary of model a: the two site-x edges wake and get it; edge-y1 and the hub do not.
        r.rollout("a", &RolloutAction::Canary { version: 2, weight: 10, auto_rollback: false }, None).expect("canary");
        for id in ["edge-x1", "edge-x2"] {
            let answer = held.remove(id).expect("held").await.expect("task").expect("answer");
            let desired = &answer.state;
            let versions: Vec<u64> = desired.models[0].versions.iter().map(|v| v.version).collect();
            assert_eq!(versions, [1, 2], "{id} was told the canary");
            assert_eq!(r.fleet.wakes_of(id), 1, "{id}");
        }
        assert_eq!((r.fleet.wakes_of("edge-y1"), r.fleet.wakes_of("hub-1")), (0, 0));
        // edge-y1 is idle, held 10 s: still held (the hub's 500 ms hold may have ended by itself).
        assert!(!held["edge-y1"].is_finished(), "a node the canary does not concern answered");
        // A hub that moves (or goes down) wakes the edges, never the hubs.
        let (peer, mut info) = node("hub-1", Role::Hub, "x");
        info.quic = Some("127.0.0.1:4434".into());
        let hub2 = r.clone();
        tokio::spawn(async move { hub2.heartbeat(&peer, beat(&info, 0, &[])).await });
        until("the hub's new address", || r.fleet.hubs().0.first().is_some_and(|h| h.addr.ends_with("4434"))).await;
        r.check_liveness();
        let answer = held.remove("edge-y1").expect("held").await.expect("task").expect("answer");
        let desired = &answer.state;
        assert_eq!(desired.hubs.iter().map(|h| h.addr.as_str()).collect::<Vec<_>>(), ["127.0.0.1:4434"]);
        assert_eq!(r.fleet.wakes_of("edge-y1"), 1);
        assert_eq!(r.fleet.wakes_of("hub-1"), 0, "the hub's own change does not wake hubs");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test]
    async fn nodes_of_one_group_share_one_desired_state() {
        let (r, dir) = registry("groups", settings());
        two_models(&r);
        let before = r.desired_computed();
        for i in 0..200 {
            let (peer, info) = node(&format!("edge-{i}"), Role::Edge, if i % 2 == 0 { "x" } else { "y" });
            r.heartbeat(&peer, beat(&info, 0, &[])).await.expect("answer");
        }
        // Two groups (site x, site y), each computed once.
        assert_eq!(r.desired_computed() - before, 2);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test]
    async fn nodes_gone_longer_than_the_retention_are_forgotten_with_their_records() {
        let settings = Settings {
            heartbeat_timeout: Duration::from_millis(1000),
            idle_heartbeat: Duration::from_millis(1),
            forget_after: Duration::from_millis(1),
            ..settings()
        };
        let (r, dir) = registry("forget", settings.clone());
        two_models(&r);
        for id in ["edge-1", "edge-2"] {
            let (peer, info) = node(id, Role::Edge, "x");
            r.heartbeat(&peer, beat(&info, 0, &[])).await.expect("answer");
            let scaled = Scaled { replicas: 2, reason: "test".into(), at_ms: 1 };
            r.scaled.entry(id.into()).or_default().insert(scaled_key("a", 1), scaled.clone());
            r.unsaved.lock().expect("lock").insert(scaled_record_key(id, &scaled_key("a", 1)), Some(scaled));
        }
        r.flush_scaled();
        // edge-1 silent past the timeout; edge-2 then heartbeats (up, with a second to spare on a
        // loaded machine).
        tokio::time::sleep(Duration::from_millis(1300)).await;
        // edge-2 heartbeats again; edge-1 stays silent: down at one tick, forgotten at the next.
        let (peer, info) = node("edge-2", Role::Edge, "x");
        r.heartbeat(&peer, beat(&info, 0, &[])).await.expect("answer");
        r.check_liveness();
        assert_eq!(r.fleet.with("edge-1", |n| n.up), Some(false));
        tokio::time::sleep(Duration::from_millis(10)).await;
        r.check_liveness();
        assert!(r.fleet.with("edge-1", |_| ()).is_none(), "edge-1 is still known");
        // edge-2 can only be forgotten on a tick after one that marked it down.
        assert!(r.fleet.with("edge-2", |_| ()).is_some(), "edge-2 was forgotten");
        assert!(!r.scaled.contains_key("edge-1"));
        assert!(r.scalers.iter().all(|s| s.key().0 != "edge-1"));
        r.flush_scaled();
        drop(r);
        let stored = RedbStore::open(&dir).expect("store").load().expect("load").expect("stored");
        assert!(!stored.scaled.contains_key("edge-1"), "the forgotten node's records are still stored");
        assert!(stored.scaled.contains_key("edge-2"), "a live node's records were lost");
        std::fs::remove_dir_all(&dir).ok();
    }
}
