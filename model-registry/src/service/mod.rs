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
//!
//! Here: the [`Registry`] (state, fleet, desired states per group, transitions). Its parts:
//! [`requests`] (who may do what, and where each request goes), [`upload`] (model files in and
//! out), [`models`] (model and rollout transitions), [`heartbeat`] (the long poll, liveness),
//! [`autoscale`] (the autoscaling driver), [`canary`] (the canary tick), [`views`] (what the CLI
//! and the status page read), [`server`] (the QUIC loop and its ticks), [`replica`] (which registry
//! this process serves now: the leader's, or a follower's view).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use fabric_policy::histogram::LatencySum;
use fabric_proto::registry::{
    self, DesiredState, Heartbeat, NodeInfo, NodeQuery, Refusal, Reply, Request, RolloutAction, MAX_FRAME,
};
use fabric_proto::report::NodeReport;
use fabric_proto::tls::{self, Identity, Role};
use serde_json::{json, Value};

use crate::fleet::{Fleet, NodeRecord};
use crate::rollout::{self, AnalysisSettings, Window};
use crate::state::{now_ms, scaled_key, Deployment, ModelVersion, RegistryState, Scaled};
use crate::store::{scaled_record_key, Change, Store};
use fabric_policy::autoscale::{AutoscaleSettings, Autoscaler};

mod autoscale;
mod canary;
mod heartbeat;
mod models;
mod reference;
mod replica;
mod requests;
mod server;
mod upload;
mod views;

pub use replica::Replica;
pub use server::{serve, Admission, FLUSH_TICK};
pub use views::{DETAIL_NODES, OVERVIEW_NODES};

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
    /// The models whose rollout in waves has moved this node.
    moved: Vec<String>,
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
    /// Whether this registry takes writes and heartbeats: a replicated registry's followers serve
    /// reads of a state fed from the store ([`Registry::replace_state`]) and send the rest to the
    /// leader ([`crate::replica`]).
    leader: bool,
}

/// An answer, typed where it is built ([`fabric_proto::answers`]), as it travels.
fn answer(value: &impl serde::Serialize) -> Reply {
    serde_json::to_value(value).map_err(internal)
}

/// The refusal a client gets for a write the store refused.
pub(super) fn store_refusal(e: &crate::store::StoreError) -> Refusal {
    use crate::store::StoreError;
    match e {
        StoreError::Unavailable(m) => Refusal::new("unavailable", m.clone()),
        StoreError::NotLeader(m) => Refusal::new("not_leader", m.clone()),
        StoreError::Conflict { .. } => {
            Refusal::new("conflict", format!("{e}: the registry re-read its state; run the command again"))
        }
        other => internal(other),
    }
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal::new("internal", e.to_string())
}

impl Registry {
    /// Opens the registry on `store`, with the state last written.
    pub fn open(store: Box<dyn Store>, settings: Settings) -> Result<Arc<Registry>, crate::store::StoreError> {
        let stored = store.load()?.unwrap_or_default();
        Ok(Arc::new(Registry::with(store, stored, settings, true)))
    }

    /// A follower's registry on `stored` (kept up to date with [`Registry::replace_state`]): it answers
    /// reads; writes and heartbeats go to the leader.
    pub fn follower(store: Box<dyn Store>, stored: crate::store::Stored, settings: Settings) -> Arc<Registry> {
        Arc::new(Registry::with(store, stored, settings, false))
    }

    /// Whether this registry takes writes and heartbeats.
    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// Replaces a follower's state with what the store now holds.
    pub fn replace_state(&self, stored: crate::store::Stored) {
        let mut revision = self.revision.lock().unwrap_or_else(|p| p.into_inner());
        *revision = stored.revision;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(stored.state);
        self.scaled.clear();
        for (node, records) in stored.scaled {
            self.scaled.insert(node, records);
        }
        drop(revision);
        self.desired.clear();
    }

    /// Whether the blob store has model file `digest`.
    pub fn blob_exists(&self, digest: &str) -> bool {
        self.store.blob_path(digest).exists()
    }

    /// The store's revision this registry is at.
    pub fn revision(&self) -> u64 {
        *self.revision.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with(store: Box<dyn Store>, stored: crate::store::Stored, settings: Settings, leader: bool) -> Registry {
        Registry {
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
            leader,
        }
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
    pub(super) fn transition(&self, change: impl FnOnce(&mut RegistryState) -> Result<Value, Refusal>) -> Reply {
        let mut revision = self.revision.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.state();
        let mut next = (*current).clone();
        let answer = change(&mut next)?;
        next.generation += 1;
        let changes = crate::store::diff(&current, &next);
        *revision = match self.store.write(*revision, &changes) {
            Ok(r) => r,
            Err(e) => return Err(self.refused_write(e, &mut revision)),
        };
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        drop(revision);
        self.desired.clear();
        self.wake_changed(|_| true);
        Ok(answer)
    }

    /// Says why a write failed; a write that met another revision (one an earlier, timed-out write
    /// made after all) re-reads the state, so the next one starts from what is stored.
    fn refused_write(&self, e: crate::store::StoreError, revision: &mut u64) -> Refusal {
        if matches!(e, crate::store::StoreError::Conflict { .. }) {
            match self.store.load() {
                Ok(stored) => {
                    let stored = stored.unwrap_or_default();
                    *revision = stored.revision;
                    *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(stored.state);
                    self.desired.clear();
                }
                Err(load) => tracing::warn!("re-reading the state after a conflicting write failed: {load}"),
            }
        }
        tracing::warn!("a write was refused by the store: {e}");
        store_refusal(&e)
    }

    /// Wakes the held heartbeats (of nodes `concerned` selects) whose desired state now differs from
    /// what they applied.
    pub(super) fn wake_changed(&self, concerned: impl Fn(&NodeInfo) -> bool) {
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
    pub(super) fn desired_of(&self, info: &NodeInfo, ready: &BTreeSet<(String, u64)>) -> Arc<Desired> {
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
            moved: state
                .rollouts
                .iter()
                .filter(|(name, r)| {
                    r.waves.as_ref().is_some_and(|w| crate::waves::moved(w, name, &info.node_id, &info.labels))
                })
                .map(|(name, _)| name.clone())
                .collect(),
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
    pub(super) fn desired_for_node(&self, id: &str) -> Option<Arc<Desired>> {
        let (info, ready) = self.fleet.with(id, |n| (n.info.clone(), n.ready.clone()))?;
        Some(self.desired_of(&info, &ready))
    }
}

fn check_name(name: &str) -> Result<(), Refusal> {
    if registry::is_plain_name(name) {
        Ok(())
    } else {
        Err(Refusal::new("invalid", format!("invalid model name '{name}': use letters, digits, '_', '-' and '.'")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{test_version, Rollout};
    use crate::store::embedded::RedbStore;
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
                s.deployments
                    .insert(name.into(), vec![Deployment { to: Target::Edge, labels, replicas: 1, cascade: None }]);
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
            report: NodeReport::default(),
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
