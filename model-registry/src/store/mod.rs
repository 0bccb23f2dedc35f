//! Where the registry keeps its state: behind the [`Store`] trait, an embedded redb file by default
//! ([`embedded::RedbStore`]), or etcd for replicated registries ([`etcd::EtcdStore`]).
//!
//! The state is kept per key, the shape a distributed store needs: `model/<name>/<version>`,
//! `deployments/<name>`, `rollout/<name>`, `scaled/<node>/<model>:<version>` and `meta/generation`,
//! each a small JSON value. A transition writes only the keys it changed ([`diff`]), all of them and
//! the new revision in one atomic write (durable when it returns: it survives a kill -9), checked
//! against the revision it read (compare-and-swap). Model files are blobs named by their SHA-256
//! digest ([`Blobs`]): written to a staging file, synced, renamed into place, and only then
//! referenced by the state; an upload that fails leaves no blob and no state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::state::{RegistryState, Scaled, ScaledTable};

pub mod embedded;
pub mod etcd;

/// The revision's key.
pub const REVISION: &str = "meta/revision";
/// The generation's key.
pub const GENERATION: &str = "meta/generation";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("registry database: {0}")]
    Db(String),
    /// Another writer got there first (revision mismatch).
    #[error("the state changed under this write (revision {found}, expected {expected})")]
    Conflict { expected: u64, found: u64 },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The stored state does not parse.
    #[error("stored state is unreadable: {0}")]
    Corrupt(String),
    /// The store cannot take writes now (etcd without quorum, or unreachable).
    #[error("{0}")]
    Unavailable(String),
    /// This replica is not the leader (any more): only the leader writes.
    #[error("{0}")]
    NotLeader(String),
}

/// One key written by a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Set `key` to the JSON bytes.
    Put(String, Vec<u8>),
    /// Remove `key`.
    Delete(String),
}

impl Change {
    /// The key it writes.
    pub fn key(&self) -> &str {
        match self {
            Change::Put(k, _) | Change::Delete(k) => k,
        }
    }
}

/// What a store holds: the state, the autoscaling records, and the revision they are at.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stored {
    /// The revision (bumped by every write).
    pub revision: u64,
    /// Models, deployments, rollouts and the generation.
    pub state: RegistryState,
    /// Autoscaling decisions by node, then `model:version`.
    pub scaled: ScaledTable,
}

/// The registry's persistence.
pub trait Store: Send + Sync {
    /// What was last written (`None` on a fresh store).
    fn load(&self) -> Result<Option<Stored>, StoreError>;
    /// Writes `changes` if the stored revision is still `expected`; returns the new revision. Atomic
    /// and durable when it returns.
    fn write(&self, expected: u64, changes: &[Change]) -> Result<u64, StoreError>;
    /// The model files.
    fn blobs(&self) -> &Blobs;
    /// A fresh path to stage an upload in (same filesystem as the blobs).
    fn staging_path(&self) -> PathBuf {
        self.blobs().staging_path()
    }
    /// Moves a staged, synced file into place as the blob `digest`.
    fn commit_blob(&self, staged: &Path, digest: &str) -> Result<(), StoreError> {
        self.blobs().commit(staged, digest)
    }
    /// Where blob `digest` is (it may not exist).
    fn blob_path(&self, digest: &str) -> PathBuf {
        self.blobs().path(digest)
    }
    /// Deletes blob `digest`.
    fn remove_blob(&self, digest: &str) {
        self.blobs().remove(digest)
    }
    /// Housekeeping the leader runs now and then (etcd: compacting old revisions).
    fn maintain(&self) {}
}

/// Model files by SHA-256 digest in one folder (`<digest>.onnx`), with a staging folder beside it on
/// the same filesystem (so a rename moves a finished upload into place atomically). Replicated
/// registries share the folder (a shared volume): every replica serves every blob.
pub struct Blobs {
    dir: PathBuf,
    staging: PathBuf,
    next: std::sync::atomic::AtomicU64,
}

impl Blobs {
    /// Opens `dir`, staging uploads in `staging` (emptied: what an interrupted upload left).
    pub fn open(dir: PathBuf, staging: PathBuf) -> Result<Blobs, StoreError> {
        let io = |what: String| move |source| StoreError::Io { what, source };
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(io(format!("creating {}", staging.display())))?;
        Ok(Blobs { dir, staging, next: 0.into() })
    }

    /// A fresh path to stage an upload in.
    pub fn staging_path(&self) -> PathBuf {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.staging.join(format!("upload-{}-{n}", std::process::id()))
    }

    /// Moves a staged, synced file into place as the blob `digest`.
    pub fn commit(&self, staged: &Path, digest: &str) -> Result<(), StoreError> {
        let dest = self.path(digest);
        std::fs::rename(staged, &dest)
            .map_err(|source| StoreError::Io { what: format!("storing {}", dest.display()), source })?;
        // The rename is durable once the folder is synced.
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Where blob `digest` is (it may not exist).
    pub fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}.onnx"))
    }

    /// Deletes blob `digest`.
    pub fn remove(&self, digest: &str) {
        let _ = std::fs::remove_file(self.path(digest));
    }
}

/// A value as the store keeps it (JSON).
pub fn json<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data (maps with string keys, numbers, strings): serialising cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// The key of a model version.
pub fn model_key(name: &str, version: u64) -> String {
    format!("model/{name}/{version}")
}

/// The key of an autoscaling record (`key`: `model:version`).
pub fn scaled_record_key(node: &str, key: &str) -> String {
    format!("scaled/{node}/{key}")
}

/// The keys that differ between `old` and `new`, as writes (pure; the generation always changes).
pub fn diff(old: &RegistryState, new: &RegistryState) -> Vec<Change> {
    let mut changes = Vec::new();
    let models = |s: &RegistryState| -> BTreeMap<String, Vec<u8>> {
        s.models.values().flat_map(|vs| vs.values()).map(|m| (model_key(&m.name, m.version), json(m))).collect()
    };
    let named = |prefix: &str, map: &BTreeMap<String, Vec<u8>>| -> BTreeMap<String, Vec<u8>> {
        map.iter().map(|(k, v)| (format!("{prefix}/{k}"), v.clone())).collect()
    };
    let groups =
        |s: &RegistryState| named("deployments", &s.deployments.iter().map(|(k, v)| (k.clone(), json(v))).collect());
    let rollouts =
        |s: &RegistryState| named("rollout", &s.rollouts.iter().map(|(k, v)| (k.clone(), json(v))).collect());
    for (before, after) in [(models(old), models(new)), (groups(old), groups(new)), (rollouts(old), rollouts(new))] {
        for (k, v) in &after {
            if before.get(k) != Some(v) {
                changes.push(Change::Put(k.clone(), v.clone()));
            }
        }
        changes.extend(before.keys().filter(|k| !after.contains_key(*k)).map(|k| Change::Delete(k.clone())));
    }
    if old.generation != new.generation {
        changes.push(Change::Put(GENERATION.into(), json(&new.generation)));
    }
    changes
}

/// Rebuilds the state from its keys.
pub fn assemble(keys: impl Iterator<Item = (String, Vec<u8>)>) -> Result<Stored, StoreError> {
    let corrupt = |k: &str, e: serde_json::Error| StoreError::Corrupt(format!("{k}: {e}"));
    let mut stored = Stored::default();
    for (k, v) in keys {
        if let Some((node, key)) = k.strip_prefix("scaled/").and_then(|rest| rest.rsplit_once('/')) {
            // Node ids may hold '/'; `model:version` never does.
            let s: Scaled = serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?;
            stored.scaled.entry(node.to_string()).or_default().insert(key.to_string(), s);
            continue;
        }
        let mut parts = k.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            // The etcd store's last write nonce: not state.
            (Some("meta"), Some("writer"), None) => {}
            (Some("meta"), Some("revision"), None) => {
                stored.revision = u64::from_be_bytes(v.try_into().map_err(|_| StoreError::Corrupt("revision".into()))?)
            }
            (Some("meta"), Some("generation"), None) => {
                stored.state.generation = serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?
            }
            (Some("model"), Some(name), Some(_)) => {
                let m: crate::state::ModelVersion = serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?;
                stored.state.models.entry(name.to_string()).or_default().insert(m.version, m);
            }
            (Some("deployments"), Some(name), None) => {
                stored.state.deployments.insert(name.into(), serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?);
            }
            (Some("rollout"), Some(name), None) => {
                stored.state.rollouts.insert(name.into(), serde_json::from_slice(&v).map_err(|e| corrupt(&k, e))?);
            }
            _ => return Err(StoreError::Corrupt(format!("unknown key {k}"))),
        }
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{test_version as version, Rollout};

    #[test]
    fn a_transition_writes_only_the_keys_it_changed() {
        let mut old = RegistryState { generation: 7, ..Default::default() };
        for name in ["a", "b"] {
            old.models.entry(name.into()).or_default().insert(1, version(name, 1));
            old.rollouts.insert(name.into(), Rollout { stable: Some(1), ..Default::default() });
            old.deployments.insert(name.into(), Vec::new());
        }
        // A canary on "a": its rollout and the generation, nothing of "b", no model.
        let mut new = old.clone();
        new.generation = 8;
        new.rollouts.get_mut("a").map(|r| r.previous_stable = Some(1));
        let keys_of = |c: &[Change]| c.iter().map(|c| c.key().to_string()).collect::<Vec<_>>();
        assert_eq!(keys_of(&diff(&old, &new)), ["rollout/a", "meta/generation"]);
        // A push of b:2 writes that version only.
        let mut pushed = new.clone();
        pushed.generation = 9;
        pushed.models.get_mut("b").map(|v| v.insert(2, version("b", 2)));
        assert_eq!(keys_of(&diff(&new, &pushed)), ["model/b/2", "meta/generation"]);
        // Removing model a deletes its keys.
        let mut removed = pushed.clone();
        removed.generation = 10;
        removed.models.remove("a");
        removed.rollouts.remove("a");
        removed.deployments.remove("a");
        let changes = diff(&pushed, &removed);
        assert_eq!(keys_of(&changes), ["model/a/1", "deployments/a", "rollout/a", "meta/generation"]);
        assert!(changes[..3].iter().all(|c| matches!(c, Change::Delete(_))));
    }
}
