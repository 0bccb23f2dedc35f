//! The fleet as the registry sees it: one record per node from its last heartbeat, in a sharded map
//! (`dashmap`) so heartbeats never queue behind one lock; each node's wake-up (what its held
//! heartbeat waits on, bumped only when a change concerns that node); the hub list edges are told,
//! kept up to date as hubs come, go or change address instead of being rebuilt from every node per
//! heartbeat; liveness; and forgetting nodes gone for longer than the retention.
//!
//! Nothing here decides what a node should serve ([`crate::rollout`] does) or touches the store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use fabric_proto::registry::{HubEntry, NodeInfo};
use fabric_proto::report::NodeReport;
use fabric_proto::tls::Role;
use tokio::sync::watch;

/// What the registry knows of a node from its last heartbeat.
pub struct NodeRecord {
    /// Who it says it is (checked against its certificate).
    pub info: NodeInfo,
    /// Versions it has ready.
    pub ready: BTreeSet<(String, u64)>,
    /// Its last load report.
    pub report: NodeReport,
    /// The desired-state revision it has applied.
    pub applied: u64,
    /// When its last heartbeat arrived.
    pub last_seen: Instant,
    /// How much longer than a fast heartbeat the registry may hold this node's poll: its down timeout
    /// grows by as much (an idle node polls less often, and is no less alive for it).
    pub slack: Duration,
    /// Up at the last liveness tick.
    pub up: bool,
}

impl NodeRecord {
    /// Whether it is up now: its last heartbeat is at most `timeout` (plus its slack) old.
    pub fn is_up(&self, timeout: Duration) -> bool {
        node_up(self.last_seen.elapsed(), timeout + self.slack)
    }
}

/// Whether a node is up: its last heartbeat is at most `timeout` old.
pub fn node_up(since_heartbeat: Duration, timeout: Duration) -> bool {
    since_heartbeat <= timeout
}

/// What one liveness tick found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// Nodes that went down.
    pub down: Vec<String>,
    /// Nodes that came back.
    pub up: Vec<String>,
    /// Nodes forgotten (down for longer than the retention).
    pub forgotten: Vec<String>,
    /// Whether the hub list changed (edges must hear of it).
    pub hubs_changed: bool,
}

/// The node table and what derives from it.
pub struct Fleet {
    nodes: DashMap<String, NodeRecord>,
    wakers: DashMap<String, watch::Sender<u64>>,
    /// Hubs by node id (address and up/down), and the list edges get, published on every change.
    hubs: Mutex<BTreeMap<String, HubEntry>>,
    hub_list: RwLock<Arc<Vec<HubEntry>>>,
    hubs_version: AtomicU64,
    /// Nodes down since when (for the retention).
    down_since: DashMap<String, Instant>,
    wakes: AtomicU64,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            nodes: DashMap::new(),
            wakers: DashMap::new(),
            hubs: Mutex::new(BTreeMap::new()),
            hub_list: RwLock::new(Arc::new(Vec::new())),
            hubs_version: AtomicU64::new(0),
            down_since: DashMap::new(),
            wakes: AtomicU64::new(0),
        }
    }
}

impl Fleet {
    /// Stores a node's heartbeat; returns whether the hub list changed (a new hub, a new address, a
    /// hub back up) and whether the node came back from down.
    pub fn record(&self, record: NodeRecord) -> (bool, bool) {
        let id = record.info.node_id.clone();
        let hub = (record.info.role == Role::Hub.as_str()).then(|| record.info.quic.clone()).flatten();
        let was_down = self.nodes.get(&id).is_some_and(|n| !n.up);
        self.nodes.insert(id.clone(), record);
        self.down_since.remove(&id);
        let hubs_changed = match hub {
            Some(addr) => self.set_hub(HubEntry { node_id: id, addr, up: true }),
            None => false,
        };
        (hubs_changed, was_down)
    }

    fn set_hub(&self, entry: HubEntry) -> bool {
        let mut hubs = self.hubs.lock().unwrap_or_else(|p| p.into_inner());
        if hubs.get(&entry.node_id) == Some(&entry) {
            return false;
        }
        hubs.insert(entry.node_id.clone(), entry);
        self.publish_hubs(&hubs);
        true
    }

    fn publish_hubs(&self, hubs: &BTreeMap<String, HubEntry>) {
        *self.hub_list.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(hubs.values().cloned().collect());
        self.hubs_version.fetch_add(1, Ordering::Release);
    }

    /// The hubs edges offload to (every hub heard of since the registry started, up or down), and the
    /// version of that list.
    pub fn hubs(&self) -> (Arc<Vec<HubEntry>>, u64) {
        let list = self.hub_list.read().unwrap_or_else(|p| p.into_inner()).clone();
        (list, self.hubs_version.load(Ordering::Acquire))
    }

    /// Sets how much longer than a fast heartbeat the node's poll is held (see [`NodeRecord::slack`]).
    pub fn set_slack(&self, id: &str, slack: Duration) {
        if let Some(mut n) = self.nodes.get_mut(id) {
            n.slack = slack;
        }
    }

    /// Runs `f` on a node's record.
    pub fn with<T>(&self, id: &str, f: impl FnOnce(&NodeRecord) -> T) -> Option<T> {
        self.nodes.get(id).map(|n| f(&n))
    }

    /// Runs `f` on every node (one shard locked at a time: heartbeats to other shards go on).
    pub fn each(&self, mut f: impl FnMut(&NodeRecord)) {
        for n in self.nodes.iter() {
            f(&n);
        }
    }

    /// Nodes known.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// What a held heartbeat of `id` waits on.
    pub fn subscribe(&self, id: &str) -> watch::Receiver<u64> {
        self.wakers.entry(id.to_string()).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// The nodes with a heartbeat held now.
    pub fn waiting(&self) -> Vec<String> {
        self.wakers.iter().filter(|w| w.receiver_count() > 0).map(|w| w.key().clone()).collect()
    }

    /// Wakes the held heartbeat of `id` (it recomputes its desired state and answers if it changed).
    pub fn wake(&self, id: &str) {
        if let Some(w) = self.wakers.get(id) {
            w.send_modify(|n| *n += 1);
            self.wakes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How often `id` was woken since it was first seen.
    pub fn wakes_of(&self, id: &str) -> u64 {
        self.wakers.get(id).map_or(0, |w| *w.borrow())
    }

    /// Wake-ups since the registry started, over all nodes.
    pub fn wakes_total(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    /// One liveness tick: marks nodes down (or back up), updates the hub list, and forgets nodes down
    /// for longer than `retention`.
    pub fn tick(&self, timeout: Duration, retention: Duration) -> Tick {
        let mut tick = Tick::default();
        let mut hub_states = Vec::new();
        for mut n in self.nodes.iter_mut() {
            let up = n.is_up(timeout);
            if up != n.up {
                n.up = up;
                let id = n.info.node_id.clone();
                if up {
                    tick.up.push(id.clone());
                    self.down_since.remove(&id);
                } else {
                    tick.down.push(id.clone());
                    self.down_since.insert(id.clone(), Instant::now());
                }
                if n.info.role == Role::Hub.as_str() {
                    hub_states.push((id, up));
                }
            }
        }
        let gone: Vec<String> =
            self.down_since.iter().filter(|d| d.value().elapsed() > retention).map(|d| d.key().clone()).collect();
        for id in &gone {
            self.nodes.remove(id);
            self.wakers.remove(id);
            self.down_since.remove(id);
        }
        let mut hubs = self.hubs.lock().unwrap_or_else(|p| p.into_inner());
        for (id, up) in hub_states {
            if let Some(h) = hubs.get_mut(&id) {
                h.up = up;
                tick.hubs_changed = true;
            }
        }
        for id in &gone {
            tick.hubs_changed |= hubs.remove(id).is_some();
        }
        if tick.hubs_changed {
            self.publish_hubs(&hubs);
        }
        tick.forgotten = gone;
        tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, role: &str, age: Duration) -> NodeRecord {
        NodeRecord {
            info: NodeInfo {
                node_id: id.into(),
                role: role.into(),
                quic: (role == "hub").then(|| format!("{id}:4433")),
                ..Default::default()
            },
            ready: BTreeSet::new(),
            report: NodeReport::default(),
            applied: 0,
            last_seen: Instant::now() - age,
            slack: Duration::ZERO,
            up: true,
        }
    }

    #[test]
    fn nodes_are_down_after_the_timeout_plus_their_slack() {
        let timeout = Duration::from_secs(3);
        for (age_ms, want) in [(0, true), (1_000, true), (3_000, true), (3_001, false), (60_000, false)] {
            assert_eq!(node_up(Duration::from_millis(age_ms), timeout), want, "{age_ms} ms");
        }
        let mut idle = node("e", "edge", Duration::from_secs(8));
        assert!(!idle.is_up(timeout));
        idle.slack = Duration::from_millis(9_500);
        assert!(idle.is_up(timeout), "an idle node held 10 s is up 8 s after its heartbeat");
    }

    #[test]
    fn hubs_going_down_change_the_hub_list_and_old_nodes_are_forgotten() {
        let fleet = Fleet::default();
        let (changed, _) = fleet.record(node("hub-1", "hub", Duration::ZERO));
        assert!(changed, "a new hub changes the list");
        assert!(!fleet.record(node("hub-1", "hub", Duration::ZERO)).0, "the same hub again changes nothing");
        assert!(!fleet.record(node("edge-1", "edge", Duration::ZERO)).0, "an edge is not a hub");
        fleet.record(node("edge-2", "edge", Duration::from_secs(10)));
        let (_, v0) = fleet.hubs();
        // edge-2 is down; nothing forgotten yet; the hub list is untouched by an edge.
        let tick = fleet.tick(Duration::from_secs(3), Duration::from_secs(3600));
        assert_eq!((tick.down, tick.hubs_changed), (vec!["edge-2".to_string()], false));
        assert_eq!(fleet.hubs().1, v0);
        // hub-1 stops: down, and the list says so.
        fleet.record(node("hub-1", "hub", Duration::from_secs(10)));
        let tick = fleet.tick(Duration::from_secs(3), Duration::from_secs(3600));
        assert!(tick.hubs_changed);
        assert_eq!(fleet.hubs().0.iter().map(|h| (h.node_id.as_str(), h.up)).collect::<Vec<_>>(), [("hub-1", false)]);
        // With no retention left, the down nodes are forgotten, wake-ups included.
        let _waiting = fleet.subscribe("edge-2");
        let tick = fleet.tick(Duration::from_secs(3), Duration::ZERO);
        let mut forgotten = tick.forgotten.clone();
        forgotten.sort();
        assert_eq!(forgotten, ["edge-2", "hub-1"]);
        assert!(tick.hubs_changed);
        assert_eq!((fleet.len(), fleet.hubs().0.len(), fleet.waiting().len()), (1, 0, 0));
    }
}
