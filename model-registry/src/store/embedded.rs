//! The default store: one embedded redb file (`<dir>/registry.redb`) and the model files beside it
//! (`<dir>/blobs`). A file in the old layout (the whole state as one value under `state`) is
//! converted at open; the file is compacted at every open, so space freed by deleted keys goes back
//! to the disk.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};

use super::{assemble, diff, json, scaled_record_key, Blobs, Change, Store, StoreError, Stored, GENERATION, REVISION};
use crate::state::{RegistryState, ScaledTable};

/// The old layout: `revision` and `state` (the whole state as one JSON value).
const LEGACY: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
/// The per-key layout.
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");

/// The default store: `<dir>/registry.redb` and `<dir>/blobs/<digest>.onnx`.
pub struct RedbStore {
    db: Database,
    blobs: Blobs,
}

fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) the store in `dir`: clears what an interrupted upload left in staging,
    /// converts a file in the old one-value layout, and compacts the file.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        let blobs = Blobs::open(dir.join("blobs"), dir.join("staging"))?;
        let mut db = Database::create(dir.join("registry.redb")).map_err(db)?;
        migrate(&db)?;
        if let Err(e) = db.compact() {
            tracing::warn!("compacting the registry database failed (it still works, only larger): {e}");
        }
        Ok(RedbStore { db, blobs })
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

    fn blobs(&self) -> &Blobs {
        &self.blobs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Scaled;
    use crate::state::{test_version as version, Rollout};
    use crate::store::Store;
    use std::path::PathBuf;

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
