//! The replicated store: the registry's keys in etcd v3, under one prefix (`/fabric/registry/` by
//! default), each key a small JSON value as in the embedded store (etcd refuses requests over
//! 1.5 MiB, so nothing is kept as one whole-state value). Model files stay in a blob folder that the
//! replicas share ([`Blobs`]).
//!
//! Every write is one etcd transaction that checks the revision it read (`meta/revision`) and, on
//! the leader, the election key it won ([`Fence`]): a replica that lost its leadership can never
//! write, even if it has not noticed yet. A transition of more keys than etcd takes in one
//! transaction (128 operations by default) is written in several, each checked the same way.
//!
//! The [`Store`] trait is synchronous (transitions are short and serialised); the etcd calls run on a
//! runtime of their own, each bounded by [`WRITE_TIMEOUT`], so a store without quorum answers with
//! an error rather than holding a transition forever.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse};

use super::{assemble, Blobs, Change, Store, StoreError, Stored, REVISION};

/// Longest one etcd call may take before the store answers that etcd is unavailable.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a call is retried while etcd elects a leader among its members (one that lost a member
/// takes about a second); past it, the store answers that etcd is unavailable.
pub const RETRY_WITHIN: Duration = Duration::from_secs(5);

/// The pause between tries.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The key of the last write's nonce (not part of the state).
pub const WRITER: &str = "meta/writer";

/// A nonce for one write: unique within this process, and across processes with near certainty.
fn next_nonce() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seed = format!("{}-{}-{n}", std::process::id(), crate::state::now_ms());
    fabric_policy::hash::stable_hash(seed.as_bytes())
}

/// The most operations one transaction carries (etcd's default `--max-txn-ops` is 128; two more go
/// with every transaction: the revision and the nonce).
pub const MAX_TXN_OPS: usize = 100;

/// The key prefix the registry's keys live under by default.
pub const DEFAULT_PREFIX: &str = "/fabric/registry/";

/// The election key a leader won: writes are fenced on it (its create revision must still be ours).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The leader's key in the election.
    pub key: Vec<u8>,
    /// The revision it was created at (our campaign's).
    pub revision: i64,
}

/// The runtime the store's etcd calls run on: one for the process, never dropped (a runtime may not
/// be dropped inside another's task).
fn runtime() -> Result<&'static tokio::runtime::Runtime, StoreError> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("etcd-store")
        .enable_all()
        .build()
        .map_err(|e| StoreError::Db(format!("starting the etcd store's runtime: {e}")))?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// Runs `future` on the store's runtime and waits for it (inside a multi-threaded tokio runtime the
/// wait moves this thread's other tasks elsewhere first).
fn block<T: Send + 'static>(future: impl std::future::Future<Output = T> + Send + 'static) -> Result<T, StoreError> {
    let rt = runtime()?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(future.await);
    });
    let wait = move || rx.recv().map_err(|_| StoreError::Db("the etcd store's runtime stopped".into()));
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(wait),
        _ => wait(),
    }
}

/// Why etcd failed, said so a user knows what to do.
pub fn unavailable(endpoints: &[String], e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!(
        "etcd ({}) cannot take the write: {e}. It may have lost its quorum (a majority of its members must be up) \
         or be unreachable; the registry refuses changes until it answers, and nodes keep serving their last desired state",
        endpoints.join(",")
    ))
}

/// Connection settings for the registry's etcd clients: every call fails at once when the member
/// has no leader (instead of waiting), and connections are probed so a dead member is left quickly.
/// No per-request timeout here (gRPC's would end watches and campaigns): the store bounds its own
/// calls.
pub fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_require_leader(true)
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
}

/// The registry's state in etcd.
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
    prefix: String,
    fence: Option<Fence>,
    /// A follower's view: writes are refused (only the leader writes).
    read_only: bool,
    blobs: Arc<Blobs>,
    /// The etcd revision seen at the last compaction tick: the next tick compacts up to it.
    compact_to: std::sync::Mutex<i64>,
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`host:port` or URLs), keys under `prefix`, model files in
    /// `blobs`.
    pub fn connect(endpoints: &[String], prefix: &str, blobs: Arc<Blobs>) -> Result<EtcdStore, StoreError> {
        let urls = endpoints.to_vec();
        let client = block(async move { Client::connect(urls, Some(connect_options())).await })?
            .map_err(|e| unavailable(endpoints, e))?;
        Ok(EtcdStore {
            client,
            endpoints: endpoints.to_vec(),
            prefix: prefix.to_string(),
            fence: None,
            read_only: false,
            blobs,
            compact_to: std::sync::Mutex::new(0),
        })
    }

    /// The same store, writing only while `fence` holds (the leader's).
    pub fn fenced(mut self, fence: Fence) -> EtcdStore {
        self.fence = Some(fence);
        self
    }

    /// The same store, refusing writes (a follower's).
    pub fn read_only(mut self) -> EtcdStore {
        self.read_only = true;
        self
    }

    fn key(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.prefix).into_bytes()
    }

    /// Runs `request` against etcd until it answers, retrying what passes (an election among etcd's
    /// members, a member that went away) for up to [`RETRY_WITHIN`]; what etcd still says then is
    /// returned as unavailable.
    fn call<T, F, Fut>(&self, request: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(Client) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>> + Send,
    {
        let (client, endpoints) = (self.client.clone(), self.endpoints.clone());
        block(async move {
            let deadline = tokio::time::Instant::now() + RETRY_WITHIN;
            let mut unanswered = false;
            loop {
                let said = match tokio::time::timeout(WRITE_TIMEOUT, request(client.clone())).await {
                    Ok(Ok(answer)) => return Ok(answer),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => {
                        unanswered = true;
                        format!("no answer within {WRITE_TIMEOUT:?}")
                    }
                };
                // A request etcd took but did not answer may be committed once its quorum returns.
                let said = if unanswered {
                    format!("{said} (a request etcd did not answer may still be made when it recovers: check before repeating a change)")
                } else {
                    said
                };
                let passing =
                    ["leader changed", "no leader", "timed out", "unavailable", "transport", "connect", "no answer"]
                        .iter()
                        .any(|p| said.to_lowercase().contains(p));
                if !passing || tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                    return Err(unavailable(&endpoints, said));
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        })?
    }

    /// Writes one transaction: `changes` (at most [`MAX_TXN_OPS`]) and the revision `from + 1`, if the
    /// revision is still `from` and the fence holds. A transaction retried after an error that may
    /// have hidden its success carries a nonce (`meta/writer`) that tells, when the revision moved,
    /// whether it was this one that moved it.
    fn write_one(&self, from: u64, changes: &[Change]) -> Result<(), StoreError> {
        let revision_key = self.key(REVISION);
        let writer_key = self.key(WRITER);
        let nonce = next_nonce();
        let mut compares = vec![if from == 0 {
            Compare::create_revision(revision_key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(revision_key.clone(), CompareOp::Equal, from.to_be_bytes().to_vec())
        }];
        if let Some(fence) = &self.fence {
            compares.push(Compare::create_revision(fence.key.clone(), CompareOp::Equal, fence.revision));
        }
        let mut ops: Vec<TxnOp> = changes
            .iter()
            .map(|c| match c {
                Change::Put(k, v) => TxnOp::put(self.key(k), v.clone(), None),
                Change::Delete(k) => TxnOp::delete(self.key(k), None),
            })
            .collect();
        ops.push(TxnOp::put(revision_key.clone(), (from + 1).to_be_bytes().to_vec(), None));
        ops.push(TxnOp::put(writer_key.clone(), nonce.to_be_bytes().to_vec(), None));
        let mut otherwise = vec![TxnOp::get(revision_key, None), TxnOp::get(writer_key, None)];
        if let Some(fence) = &self.fence {
            otherwise.push(TxnOp::get(fence.key.clone(), None));
        }
        let txn = Txn::new().when(compares).and_then(ops).or_else(otherwise);
        let answer = self.call(move |mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })?;
        if answer.succeeded() {
            return Ok(());
        }
        // Why it was refused: the fence (leadership lost) first, then the revision.
        let mut found = 0;
        let mut ours = false;
        let mut fence_holds = self.fence.is_none();
        for (i, op) in answer.op_responses().into_iter().enumerate() {
            let TxnOpResponse::Get(get) = op else { continue };
            let kv = get.kvs().first();
            let number = kv.and_then(|kv| <[u8; 8]>::try_from(kv.value()).ok()).map(u64::from_be_bytes);
            match i {
                0 => found = number.unwrap_or(0),
                1 => ours = number == Some(nonce),
                _ => {
                    if let Some(fence) = &self.fence {
                        fence_holds = kv.is_some_and(|kv| kv.create_revision() == fence.revision);
                    }
                }
            }
        }
        if ours && found == from + 1 {
            // An earlier try went through; its answer was lost.
            return Ok(());
        }
        if !fence_holds {
            return Err(StoreError::NotLeader(
                "this registry replica is no longer the leader (its election key is gone or replaced): the write was not made".into(),
            ));
        }
        Err(StoreError::Conflict { expected: from, found })
    }

    /// Compacts etcd's history up to the revision seen at the previous call (so a follower's watch
    /// that is less than one interval behind never misses an event).
    pub fn compact(&self) -> Result<(), StoreError> {
        let key = self.key(REVISION);
        let now = self
            .call(move |mut client| {
                let key = key.clone();
                async move { client.get(key, Some(GetOptions::new().with_count_only())).await }
            })?
            .header()
            .map(|h| h.revision())
            .unwrap_or(0);
        let target = std::mem::replace(&mut *self.compact_to.lock().unwrap_or_else(|p| p.into_inner()), now);
        if target > 0 {
            match self.call(move |mut client| async move { client.compact(target, None).await }) {
                Ok(_) => tracing::debug!(revision = target, "etcd history compacted"),
                // Compacted already (by another replica or etcd's own retention): nothing to do.
                Err(e) if e.to_string().contains("compacted") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Reads every key under `prefix` as the store's keys (prefix stripped) and the etcd revision they
/// were read at.
pub async fn read_all(client: &mut Client, prefix: &str) -> Result<(Vec<(String, Vec<u8>)>, i64), etcd_client::Error> {
    let answer = client.get(prefix, Some(GetOptions::new().with_prefix())).await?;
    let revision = answer.header().map(|h| h.revision()).unwrap_or(0);
    let keys = answer
        .kvs()
        .iter()
        .filter_map(|kv| {
            let key = kv.key_str().ok()?.strip_prefix(prefix)?.to_string();
            Some((key, kv.value().to_vec()))
        })
        .collect();
    Ok((keys, revision))
}

impl Store for EtcdStore {
    fn load(&self) -> Result<Option<Stored>, StoreError> {
        let prefix = self.prefix.clone();
        let (keys, _) = self.call(move |mut client| {
            let prefix = prefix.clone();
            async move { read_all(&mut client, &prefix).await }
        })?;
        if keys.is_empty() {
            return Ok(None);
        }
        assemble(keys.into_iter()).map(Some)
    }

    fn write(&self, expected: u64, changes: &[Change]) -> Result<u64, StoreError> {
        if self.read_only {
            return Err(StoreError::NotLeader("this registry replica is a follower: only the leader writes".into()));
        }
        let mut revision = expected;
        // One transaction when it fits; an empty change still bumps the revision.
        let chunks: Vec<&[Change]> =
            if changes.is_empty() { vec![&[][..]] } else { changes.chunks(MAX_TXN_OPS).collect() };
        for chunk in chunks {
            self.write_one(revision, chunk)?;
            revision += 1;
        }
        Ok(revision)
    }

    fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    fn maintain(&self) {
        if let Err(e) = self.compact() {
            tracing::warn!("compacting etcd's history failed (it is tried again at the next tick): {e}");
        }
    }
}
