//! Replicated registries: several `model-registry` processes on one etcd, one of them the leader.
//!
//! Each replica holds a [`Replica`] (in [`crate::service`]): the [`Registry`] it serves now. A follower's registry answers
//! reads from a state fed by an etcd watch and refuses writes and heartbeats with `not_leader`,
//! naming the leader, so nodes and the CLI move there. The leader's registry writes through an
//! [`EtcdStore`] fenced on its election key, and keeps the fleet (heartbeats, load) in memory only:
//! a new leader re-learns it from the next heartbeats.
//!
//! Leadership ([`run`]): a lease of [`LeaseTimes::ttl`] kept alive every [`LeaseTimes::keep_alive`];
//! a replica campaigns only after its first keep-alive succeeded, and becomes leader when etcd's
//! election says so. It steps down (back to a follower's registry) when its keep-alives have not
//! succeeded for the lease's time less a margin, before etcd can hand the leadership to another; the
//! fence makes any write it still tries fail.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, WatchOptions};

use crate::service::{Registry, Replica, Settings};
use crate::store::etcd::{connect_options, read_all, EtcdStore, Fence};
use crate::store::{assemble, Blobs, Store, Stored};

/// Why a replica's term ended or could not start (it campaigns again after a pause).
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// etcd refused or could not be reached.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The lease could not be had or kept.
    #[error("{0}")]
    Lease(String),
}

/// The lease a leader holds.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTimes {
    /// The lease's time to live: a leader that dies is replaced within about this.
    pub ttl: Duration,
    /// How often it is kept alive.
    pub keep_alive: Duration,
}

impl Default for LeaseTimes {
    fn default() -> Self {
        // GreptimeDB's metasrv: a 3 s lease kept alive every second.
        LeaseTimes { ttl: Duration::from_secs(3), keep_alive: Duration::from_secs(1) }
    }
}

/// How a replica reaches etcd and what it serves.
#[derive(Clone)]
pub struct HaConfig {
    /// etcd's client endpoints.
    pub endpoints: Vec<String>,
    /// The prefix of the registry's keys (`<prefix>state/...`) and election (`<prefix>leader`).
    pub prefix: String,
    /// This replica's address as clients dial it (`NAME@HOST:PORT`).
    pub advertise: String,
    /// The registry's settings.
    pub settings: Settings,
    /// The lease.
    pub lease: LeaseTimes,
}

impl HaConfig {
    fn state_prefix(&self) -> String {
        format!("{}state/", self.prefix)
    }

    fn election(&self) -> String {
        format!("{}leader", self.prefix)
    }
}

/// Connects to etcd and loads a follower's registry (the state as stored now), for [`run`].
pub async fn start(config: &HaConfig, blobs: Arc<Blobs>) -> Result<Arc<Replica>, ReplicaError> {
    let store = connect_store(config, blobs).await?;
    let stored = tokio::task::block_in_place(|| store.load())?.unwrap_or_default();
    let registry = Registry::follower(Box::new(store.read_only()), stored, config.settings.clone());
    Ok(Replica::following(registry, &config.advertise))
}

async fn connect_store(config: &HaConfig, blobs: Arc<Blobs>) -> Result<EtcdStore, ReplicaError> {
    let (endpoints, prefix) = (config.endpoints.clone(), config.state_prefix());
    Ok(tokio::task::block_in_place(|| EtcdStore::connect(&endpoints, &prefix, blobs))?)
}

/// Campaigns, leads and follows, forever: the replica's life.
pub async fn run(replica: Arc<Replica>, config: HaConfig, blobs: Arc<Blobs>) {
    let mut pause = Duration::from_millis(200);
    loop {
        match one_term(&replica, &config, &blobs).await {
            Ok(()) => pause = Duration::from_millis(200),
            Err(e) => {
                tracing::warn!("registry replica: {e} (trying again in {} ms)", pause.as_millis());
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// One lease: follow while campaigning, lead once elected, until the lease is lost.
async fn one_term(replica: &Arc<Replica>, config: &HaConfig, blobs: &Arc<Blobs>) -> Result<(), ReplicaError> {
    let mut client = Client::connect(config.endpoints.clone(), Some(connect_options())).await?;
    let ttl = config.lease.ttl.as_secs().max(1) as i64;
    let lease = client.lease_grant(ttl, None).await?.id();
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
    let sent = Instant::now();
    keeper.keep_alive().await?;
    match answers.message().await? {
        Some(a) if a.ttl() > 0 => {}
        _ => return Err(ReplicaError::Lease(format!("the first keep-alive of lease {lease:x} failed"))),
    }
    // The lease holds until `valid_until` (by our clock, from when its last keep-alive was sent).
    let (lost_tx, mut lost) = tokio::sync::watch::channel(false);
    let times = config.lease;
    let keeping = tokio::spawn(async move {
        let margin = Duration::from_millis(500).min(times.ttl / 4);
        let mut valid_until = sent + times.ttl - margin;
        loop {
            let now = Instant::now();
            if now >= valid_until {
                let _ = lost_tx.send(true);
                return;
            }
            let attempt = async {
                keeper.keep_alive().await?;
                answers.message().await
            };
            match tokio::time::timeout(times.keep_alive.min(valid_until - now), attempt).await {
                Ok(Ok(Some(a))) if a.ttl() > 0 => valid_until = now + times.ttl - margin,
                Ok(Ok(_)) => {
                    // Expired at etcd.
                    let _ = lost_tx.send(true);
                    return;
                }
                Ok(Err(e)) => tracing::debug!("lease keep-alive failed: {e}"),
                Err(_) => {}
            }
            tokio::time::sleep(times.keep_alive.saturating_sub(now.elapsed())).await;
        }
    });
    let follower = tokio::spawn(follow(replica.clone(), config.clone()));
    let campaign = async {
        let mut elections = client.clone();
        elections.campaign(config.election(), config.advertise.clone(), lease).await
    };
    let won = tokio::select! {
        won = campaign => won,
        _ = lost.changed() => {
            follower.abort();
            keeping.abort();
            return Err(ReplicaError::Lease("the lease ran out while campaigning".into()));
        }
    };
    follower.abort();
    let leader_key = match won.map(|mut w| w.take_leader()) {
        Ok(Some(key)) => key,
        Ok(None) => {
            keeping.abort();
            return Err(ReplicaError::Lease("etcd's campaign answer had no leader key".into()));
        }
        Err(e) => {
            keeping.abort();
            return Err(e.into());
        }
    };
    let fence = Fence { key: leader_key.key().to_vec(), revision: leader_key.rev() };
    let started = Instant::now();
    let store = connect_store(config, blobs.clone()).await?.fenced(fence);
    let registry = match tokio::task::block_in_place(|| Registry::open(Box::new(store), config.settings.clone())) {
        Ok(r) => r,
        Err(e) => {
            keeping.abort();
            let _ = client.lease_revoke(lease).await;
            return Err(e.into());
        }
    };
    check_blobs(&registry);
    replica.set_leader(Some(config.advertise.clone()));
    replica.set(registry.clone());
    tracing::info!(
        replica = %config.advertise,
        revision = registry.revision(),
        took_ms = started.elapsed().as_millis() as u64,
        "this registry replica is the leader"
    );
    // A line scripts and tests wait for.
    println!("model-registry leader {}", config.advertise);
    let _ = lost.wait_for(|l| *l).await;
    keeping.abort();
    tracing::warn!(replica = %config.advertise, "leadership lost (the lease could not be kept alive): following again");
    println!("model-registry follower {}", config.advertise);
    replica.set_leader(None);
    let stored = Stored { revision: registry.revision(), state: (*registry.state()).clone(), ..Default::default() };
    let view = connect_store(config, blobs.clone()).await.map(|s| s.read_only());
    match view {
        Ok(store) => replica.set(Registry::follower(Box::new(store), stored, config.settings.clone())),
        Err(e) => tracing::warn!("cannot reopen the store as a follower: {e}"),
    }
    let _ = client.lease_revoke(lease).await;
    Ok(())
}

/// Says which model files the state references that the shared blob folder lacks (a folder that is
/// not shared between the replicas, or a lost volume).
fn check_blobs(registry: &Registry) {
    let state = registry.state();
    let missing: Vec<String> = state
        .models
        .values()
        .flat_map(|v| v.values())
        .filter(|m| !registry.blob_exists(&m.digest))
        .map(|m| format!("{}:{}", m.name, m.version))
        .collect();
    if !missing.is_empty() {
        tracing::error!(
            missing = %missing.join(","),
            "model files of stored versions are missing from the blob folder: replicas must share --data-dir's blobs \
             (a shared volume); nodes cannot fetch these versions from this replica"
        );
    }
}

/// A follower's life: the state fed by a watch on the registry's keys, the leader's address from the
/// election. Runs until aborted (when this replica is elected).
async fn follow(replica: Arc<Replica>, config: HaConfig) {
    loop {
        if let Err(e) = follow_once(&replica, &config).await {
            tracing::debug!("following etcd: {e} (starting over)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn follow_once(replica: &Replica, config: &HaConfig) -> Result<(), etcd_client::Error> {
    let mut client = Client::connect(config.endpoints.clone(), Some(connect_options())).await?;
    let prefix = config.state_prefix();
    let (keys, revision) = read_all(&mut client, &prefix).await?;
    let mut keys: std::collections::BTreeMap<String, Vec<u8>> = keys.into_iter().collect();
    let apply = |keys: &std::collections::BTreeMap<String, Vec<u8>>| match assemble(
        keys.iter().map(|(k, v)| (k.clone(), v.clone())),
    ) {
        Ok(stored) => replica.current().replace_state(stored),
        Err(e) => tracing::warn!("the stored state does not parse (kept the last one): {e}"),
    };
    apply(&keys);
    let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut events = client.watch(prefix.clone(), Some(options)).await?;
    let mut leaders = client.clone();
    let election = config.election();
    let mut every = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            message = events.message() => {
                let Some(message) = message? else { return Ok(()) };
                if message.canceled() {
                    // Compacted past our revision (or cancelled): start over from a fresh read.
                    return Ok(());
                }
                for event in message.events() {
                    let Some(kv) = event.kv() else { continue };
                    let Some(key) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else { continue };
                    match event.event_type() {
                        EventType::Put => keys.insert(key.to_string(), kv.value().to_vec()),
                        EventType::Delete => keys.remove(key),
                    };
                }
                apply(&keys);
            }
            _ = every.tick() => {
                let leader = match leaders.leader(election.clone()).await {
                    Ok(answer) => answer.kv().and_then(|kv| kv.value_str().ok()).map(str::to_string),
                    Err(_) => None,
                };
                replica.set_leader(leader);
            }
        }
    }
}
