//! Where the registry keeps its state: behind the [`Store`] trait, an embedded redb file by default.
//!
//! The state is one value ([`RegistryState`]) written whole by each transition in one redb
//! transaction (durable on commit: it survives a kill -9), with a revision number checked on write
//! (compare-and-swap), which is what a distributed store (etcd) offers too. Model files are blobs named
//! by their SHA-256 digest: written to a staging file, synced, renamed into place, and only then
//! referenced by the state; an upload that fails leaves no blob and no state.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};

use crate::state::RegistryState;

const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

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

/// The registry's persistence.
pub trait Store: Send + Sync {
    /// The last state written and its revision (`None` on a fresh store).
    fn load(&self) -> Result<Option<(u64, RegistryState)>, StoreError>;
    /// Writes `state` if the stored revision is still `expected`; returns the new revision. Atomic and
    /// durable when it returns.
    fn save(&self, expected: u64, state: &RegistryState) -> Result<u64, StoreError>;
    /// A fresh path to stage an upload in (same filesystem as the blobs).
    fn staging_path(&self) -> PathBuf;
    /// Moves a staged, synced file into place as the blob `digest`.
    fn commit_blob(&self, staged: &Path, digest: &str) -> Result<(), StoreError>;
    /// Where blob `digest` is (it may not exist).
    fn blob_path(&self, digest: &str) -> PathBuf;
    /// Deletes blob `digest`.
    fn remove_blob(&self, digest: &str);
}

/// The default store: `<dir>/registry.redb` and `<dir>/blobs/<digest>.onnx`.
pub struct RedbStore {
    db: Database,
    blobs: PathBuf,
    staging: PathBuf,
    next: std::sync::atomic::AtomicU64,
}

impl RedbStore {
    /// Opens (or creates) the store in `dir`; clears what an interrupted upload left in staging.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        let io = |what: String| move |source| StoreError::Io { what, source };
        let blobs = dir.join("blobs");
        let staging = dir.join("staging");
        std::fs::create_dir_all(&blobs).map_err(io(format!("creating {}", blobs.display())))?;
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(io(format!("creating {}", staging.display())))?;
        let db = Database::create(dir.join("registry.redb")).map_err(|e| StoreError::Db(e.to_string()))?;
        Ok(RedbStore { db, blobs, staging, next: 0.into() })
    }
}

fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

impl Store for RedbStore {
    fn load(&self) -> Result<Option<(u64, RegistryState)>, StoreError> {
        let read = self.db.begin_read().map_err(db)?;
        let table = match read.open_table(STATE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db(e)),
        };
        let revision = match table.get("revision").map_err(db)? {
            Some(v) => u64::from_be_bytes(v.value().try_into().map_err(|_| StoreError::Corrupt("revision".into()))?),
            None => return Ok(None),
        };
        let state = table.get("state").map_err(db)?.ok_or_else(|| StoreError::Corrupt("no state".into()))?;
        let state: RegistryState =
            serde_json::from_slice(state.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(Some((revision, state)))
    }

    fn save(&self, expected: u64, state: &RegistryState) -> Result<u64, StoreError> {
        let body = serde_json::to_vec(state).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let write = self.db.begin_write().map_err(db)?;
        let revision = {
            let mut table = write.open_table(STATE).map_err(db)?;
            let found = match table.get("revision").map_err(db)? {
                Some(v) => {
                    u64::from_be_bytes(v.value().try_into().map_err(|_| StoreError::Corrupt("revision".into()))?)
                }
                None => 0,
            };
            if found != expected {
                return Err(StoreError::Conflict { expected, found });
            }
            let revision = expected + 1;
            table.insert("revision", revision.to_be_bytes().as_slice()).map_err(db)?;
            table.insert("state", body.as_slice()).map_err(db)?;
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

    #[test]
    fn saves_load_back_and_stale_writes_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("registry-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = RedbStore::open(&dir)?;
        assert!(store.load()?.is_none());
        let mut state = RegistryState { generation: 1, ..Default::default() };
        assert_eq!(store.save(0, &state)?, 1);
        state.generation = 2;
        assert_eq!(store.save(1, &state)?, 2);
        assert!(matches!(store.save(1, &state), Err(StoreError::Conflict { expected: 1, found: 2 })));
        drop(store);
        let reopened = RedbStore::open(&dir)?;
        assert_eq!(reopened.load()?.map(|(rev, s)| (rev, s.generation)), Some((2, 2)));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
