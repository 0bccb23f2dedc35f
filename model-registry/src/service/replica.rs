//! Which registry this process serves now: always the same one (one registry on its embedded
//! store), or, for a replicated registry, the leader's or a follower's view, swapped by
//! [`crate::replica`] as leadership comes and goes. The QUIC loop asks it for each stream.

use std::sync::{Arc, RwLock};

use fabric_proto::registry::Refusal;

use super::Registry;

/// The registry this process serves now, and where the leader is.
pub struct Replica {
    current: RwLock<Arc<Registry>>,
    /// The leader's address as clients dial it (`NAME@HOST:PORT`), when known.
    leader: RwLock<Option<String>>,
    /// This replica's own address, as it campaigns with it.
    name: String,
}

impl Replica {
    /// A registry that is always the leader (one process, the embedded store).
    pub fn single(registry: Arc<Registry>) -> Arc<Replica> {
        Arc::new(Replica { current: RwLock::new(registry), leader: RwLock::new(None), name: String::new() })
    }

    /// A replica `name` (`NAME@HOST:PORT`) following, serving `registry` (a follower's view) until
    /// [`crate::replica::run`] elects it.
    pub fn following(registry: Arc<Registry>, name: &str) -> Arc<Replica> {
        Arc::new(Replica { current: RwLock::new(registry), leader: RwLock::new(None), name: name.to_string() })
    }

    /// The registry serving now (the leader's, or a follower's view).
    pub fn current(&self) -> Arc<Registry> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Serves `registry` from now on (the leader's, or a follower's view).
    pub fn set(&self, registry: Arc<Registry>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = registry;
    }

    /// The leader's address, when known.
    pub fn leader(&self) -> Option<String> {
        self.leader.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records where the leader is.
    pub fn set_leader(&self, leader: Option<String>) {
        *self.leader.write().unwrap_or_else(|p| p.into_inner()) = leader;
    }

    /// The refusal a follower answers writes and heartbeats with.
    pub fn not_leader(&self) -> Refusal {
        match self.leader() {
            Some(leader) => Refusal::new(
                "not_leader",
                format!("registry replica {} is a follower; the leader is {leader}", self.name),
            )
            .with_leader(leader),
            None => Refusal::new(
                "not_leader",
                format!(
                    "registry replica {} is a follower and no leader is elected now (etcd may have lost its \
                     quorum); nodes keep serving their last desired state: try again shortly",
                    self.name
                ),
            ),
        }
    }
}
