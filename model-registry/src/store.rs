//! Where the registry keeps its state: behind the [`Store`] trait, an embedded redb file by default.
//!
//! The state is kept per key, the shape a distributed store (etcd) needs: `model/<name>/<version>`,
//! `deployments/<name>`, `rollout/<name>`, `scaled/<node>/<model>:<version>` and `meta/generation`,
//! each a small JSON value. A transition writes only the keys it changed ([`diff`]), all of them and
//! the new revision in one redb transaction (durable on commit: it survives a kill -9), checked
//! against the revision it read (compare-and-swap). Model files are blobs named by their SHA-256
//! digest: written to a staging file, synced, renamed into place, and only then referenced by the
//! state; an upload that fails leaves no blob and no state.
//!
//! A file in the old layout (the whole state as one value under `state`) is converted at open; the
//! file is compacted at every open, so space freed by deleted keys goes back to the disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::Serialize;

use crate::state::{RegistryState, Scaled, ScaledTable};

/// The old layout: `revision` and `state` (the whole state as one JSON value).
const LEGACY: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
/// The per-key layout.
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
/// The revision's key in [`KEYS`].
const REVISION: &str = "meta/revision";
/// The generation's key in [`KEYS`].
const GENERATION: &str = "meta/generation";

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
    /// A fresh path to stage an upload in (same filesystem as the blobs).
    fn staging_path(&self) -> PathBuf;
    /// Moves a staged, synced file into place as the blob `digest`.
    fn commit_blob(&self, staged: &Path, digest: &str) -> Result<(), StoreError>;
    /// Where blob `digest` is (it may not exist).
    fn blob_path(&self, digest: &str) -> PathBuf;
    /// Deletes blob `digest`.
    fn remove_blob(&self, digest: &str);
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
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
fn assemble(keys: impl Iterator<Item = (String, Vec<u8>)>) -> Result<Stored, StoreError> {
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

/// The default store: `<dir>/registry.redb` and `<dir>/blobs/<digest>.onnx`.
pub struct RedbStore {
    db: Database,
    blobs: PathBuf,
    staging: PathBuf,
    next: std::sync::atomic::AtomicU64,
}

fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) the store in `dir`: clears what an interrupted upload left in staging,
    /// converts a file in the old one-value layout, and compacts the file.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        let io = |what: String| move |source| StoreError::Io { what, source };
        let blobs = dir.join("blobs");
        let staging = dir.join("staging");
        std::fs::create_dir_all(&blobs).map_err(io(format!("creating {}", blobs.display())))?;
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(io(format!("creating {}", staging.display())))?;
        let mut db = Database::create(dir.join("registry.redb")).map_err(db)?;
        migrate(&db)?;
        if let Err(e) = db.compact() {
            tracing::warn!("compacting the registry database failed (it still works, only larger): {e}");
        }
        Ok(RedbStore { db, blobs, staging, next: 0.into() })
    }
}

/// Converts the old layout (one value) into keys, in one transaction.
fn migrate(database: &Database) -> Result<(), StoreError> {
    let read = database.begin_read().map_err(db)?;
    let legacy = match read.open_table(LEGACY) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(db(e)),
    };
    let Some(body) = legacy.get("state").map_err(db)? else { return Ok(()) };
    // Field by field: serde's `flatten` cannot read maps with integer keys (the versions).
    #[derive(serde::Deserialize)]
    struct Legacy {
        generation: u64,
        models: BTreeMap<String, BTreeMap<u64, crate::state::ModelVersion>>,
        deployments: BTreeMap<String, Vec<crate::state::Deployment>>,
        rollouts: BTreeMap<String, crate::state::Rollout>,
        #[serde(default)]
        scaled: ScaledTable,
    }
    let legacy: Legacy = serde_json::from_slice(body.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let old = Stored {
        revision: 0,
        state: RegistryState {
            generation: legacy.generation,
            models: legacy.models,
            deployments: legacy.deployments,
            rollouts: legacy.rollouts,
        },
        scaled: legacy.scaled,
    };
    drop((body, read));
    let mut changes = diff(&RegistryState::default(), &old.state);
    if old.state.generation == 0 {
        changes.push(Change::Put(GENERATION.into(), json(&0u64)));
    }
    for (node, records) in &old.scaled {
        changes.extend(records.iter().map(|(k, s)| Change::Put(scaled_record_key(node, k), json(s))));
    }
    let write = database.begin_write().map_err(db)?;
    {
        let mut keys = write.open_table(KEYS).map_err(db)?;
        for c in &changes {
            if let Change::Put(k, v) = c {
                keys.insert(k.as_str(), v.as_slice()).map_err(db)?;
            }
        }
        keys.insert(REVISION, 1u64.to_be_bytes().as_slice()).map_err(db)?;
    }
    write.delete_table(LEGACY).map_err(db)?;
    write.commit().map_err(db)?;
    tracing::info!(keys = changes.len(), "registry database converted to the per-key layout");
    Ok(())
}

impl Store for RedbStore {
    fn load(&self) -> Result<Option<Stored>, StoreError> {
        let read = self.db.begin_read().map_err(db)?;
        let table = match read.open_table(KEYS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db(e)),
        };
        let mut entries = Vec::new();
        for entry in table.iter().map_err(db)? {
            let (k, v) = entry.map_err(db)?;
            entries.push((k.value().to_string(), v.value().to_vec()));
        }
        if entries.is_empty() {
            return Ok(None);
        }
        assemble(entries.into_iter()).map(Some)
    }

    fn write(&self, expected: u64, changes: &[Change]) -> Result<u64, StoreError> {
        let write = self.db.begin_write().map_err(db)?;
        let revision = {
            let mut table = write.open_table(KEYS).map_err(db)?;
            let found = match table.get(REVISION).map_err(db)? {
                Some(v) => {
                    u64::from_be_bytes(v.value().try_into().map_err(|_| StoreError::Corrupt("revision".into()))?)
                }
                None => 0,
            };
            if found != expected {
                return Err(StoreError::Conflict { expected, found });
            }
            for change in changes {
                match change {
                    Change::Put(k, v) => {
                        table.insert(k.as_str(), v.as_slice()).map_err(db)?;
                    }
                    Change::Delete(k) => {
                        table.remove(k.as_str()).map_err(db)?;
                    }
                }
            }
            let revision = expected + 1;
            table.insert(REVISION, revision.to_be_bytes().as_slice()).map_err(db)?;
            revision
        };
        write.commit().map_err(db)?;
        Ok(revision)
    }

    fn staging_path(&self) -> PathBuf {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.staging.join(format!("upload-{}-{n}", std::process::id()))
    }

    fn commit_blob(&self, staged: &Path, digest: &str) -> Result<(), StoreError> {
        let dest = self.blob_path(digest);
        std::fs::rename(staged, &dest)
            .map_err(|source| StoreError::Io { what: format!("storing {}", dest.display()), source })?;
        // The rename is durable once the folder is synced.
        if let Ok(dir) = std::fs::File::open(&self.blobs) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.blobs.join(format!("{digest}.onnx"))
    }

    fn remove_blob(&self, digest: &str) {
        let _ = std::fs::remove_file(self.blob_path(digest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{test_version as version, Rollout};

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("registry-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn writes_load_back_and_stale_writes_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = temp("cas");
        let store = RedbStore::open(&dir)?;
        assert!(store.load()?.is_none());
        let mut state = RegistryState { generation: 1, ..Default::default() };
        state.models.entry("mlp".into()).or_default().insert(1, version("mlp", 1));
        assert_eq!(store.write(0, &diff(&RegistryState::default(), &state))?, 1);
        let before = state.clone();
        state.generation = 2;
        state.rollouts.insert("mlp".into(), Rollout { stable: Some(1), ..Default::default() });
        assert_eq!(store.write(1, &diff(&before, &state))?, 2);
        assert!(matches!(store.write(1, &[]), Err(StoreError::Conflict { expected: 1, found: 2 })));
        let scaled = Scaled { replicas: 3, reason: "load".into(), at_ms: 5 };
        store.write(2, &[Change::Put(scaled_record_key("edge-1", "mlp:1"), json(&scaled))])?;
        drop(store);
        let reopened = RedbStore::open(&dir)?.load()?.ok_or("nothing stored")?;
        assert_eq!((reopened.revision, &reopened.state), (3, &state));
        assert_eq!(reopened.scaled["edge-1"]["mlp:1"], scaled);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

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

    #[test]
    fn the_old_one_value_layout_is_converted() -> Result<(), Box<dyn std::error::Error>> {
        let dir = temp("legacy");
        std::fs::create_dir_all(&dir)?;
        {
            let database = Database::create(dir.join("registry.redb"))?;
            let write = database.begin_write()?;
            {
                let mut t = write.open_table(LEGACY)?;
                let body = serde_json::json!({
                    "generation": 4,
                    "models": { "mlp": { "1": version("mlp", 1) } },
                    "deployments": {},
                    "rollouts": { "mlp": Rollout { stable: Some(1), ..Default::default() } },
                    "scaled": { "edge-1": { "mlp:1": { "replicas": 2, "reason": "r", "at_ms": 1 } } },
                });
                t.insert("revision", 4u64.to_be_bytes().as_slice())?;
                t.insert("state", serde_json::to_vec(&body)?.as_slice())?;
            }
            write.commit()?;
        }
        let loaded = RedbStore::open(&dir)?.load()?.ok_or("nothing converted")?;
        assert_eq!(loaded.state.generation, 4);
        assert_eq!(loaded.state.rollouts["mlp"].stable, Some(1));
        assert_eq!(loaded.state.models["mlp"][&1].digest, "mlp1");
        assert_eq!(loaded.scaled["edge-1"]["mlp:1"].replicas, 2);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
