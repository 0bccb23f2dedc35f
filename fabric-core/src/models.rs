//! The set of models a server serves, and routing a request to a model version.

use std::collections::BTreeMap;
use std::sync::Arc;

use dashmap::DashMap;

use crate::config::ModelConfig;
use crate::engine::EngineKind;
use crate::pool::PoolHandle;

/// One served model version.
pub struct ServedModel {
    /// Model name.
    pub name: String,
    /// Version number.
    pub version: u64,
    /// Engine running it.
    pub engine: EngineKind,
    /// Its serving settings.
    pub config: ModelConfig,
    /// Its pool.
    pub pool: PoolHandle,
}

impl ServedModel {
    /// The version as the protocol spells it.
    pub fn version_str(&self) -> String {
        self.version.to_string()
    }
}

/// Why a request names no served model (HTTP 404).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// No model of that name.
    #[error("unknown model '{name}' (served models: {served})")]
    UnknownModel { name: String, served: String },
    /// The model exists but not in that version.
    #[error("model '{name}' has no version '{version}' (versions: {available})")]
    UnknownVersion { name: String, version: String, available: String },
    /// The model is in the repository but could not be loaded (HTTP 503).
    #[error("model '{name}' version {version} is unavailable: it failed to load: {reason}")]
    Unavailable { name: String, version: u64, reason: String },
}

impl RouteError {
    /// What it means to a client (see [`crate::pool::PoolError::code`]).
    pub fn code(&self) -> crate::wire::ErrorCode {
        match self {
            RouteError::UnknownModel { .. } | RouteError::UnknownVersion { .. } => crate::wire::ErrorCode::UnknownModel,
            RouteError::Unavailable { .. } => crate::wire::ErrorCode::Busy,
        }
    }
}

/// One entry of the repository index: a model version and whether it serves.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct IndexEntry {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: String,
    /// `READY` or `UNAVAILABLE` (Triton's words).
    pub state: &'static str,
    /// Why it is unavailable; empty when ready.
    pub reason: String,
}

/// Every served model, by name and version.
#[derive(Default)]
pub struct ModelSet {
    models: DashMap<String, BTreeMap<u64, Arc<ServedModel>>>,
    /// Versions found in the repository that failed to load, with the reason.
    unavailable: DashMap<String, BTreeMap<u64, String>>,
}

impl ModelSet {
    /// Adds (or replaces) a model version.
    pub fn insert(&self, model: ServedModel) {
        if let Some(mut failed) = self.unavailable.get_mut(&model.name) {
            failed.remove(&model.version);
        }
        self.unavailable.remove_if(&model.name, |_, v| v.is_empty());
        self.models.entry(model.name.clone()).or_default().insert(model.version, Arc::new(model));
    }

    /// Records a version that failed to load, so requests for it get the reason instead of a 404.
    pub fn mark_unavailable(&self, name: &str, version: u64, reason: String) {
        self.unavailable.entry(name.to_string()).or_default().insert(version, reason);
    }

    /// Names of all models, sorted (those that failed to load included).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.models.iter().map(|e| e.key().clone()).collect();
        names.extend(self.unavailable.iter().map(|e| e.key().clone()));
        names.sort();
        names.dedup();
        names
    }

    /// Every version known, served or not, sorted by name and version; `ready` says per served version
    /// whether it has a replica (`None`: it does).
    pub fn index(&self, not_ready: impl Fn(&ServedModel) -> Option<String>) -> Vec<IndexEntry> {
        let mut entries: Vec<(String, u64, IndexEntry)> = Vec::new();
        for e in self.models.iter() {
            for (v, m) in e.value() {
                let reason = not_ready(m);
                let state = if reason.is_some() { "UNAVAILABLE" } else { "READY" };
                let entry = IndexEntry {
                    name: e.key().clone(),
                    version: v.to_string(),
                    state,
                    reason: reason.unwrap_or_default(),
                };
                entries.push((e.key().clone(), *v, entry));
            }
        }
        for e in self.unavailable.iter() {
            for (v, reason) in e.value() {
                let entry = IndexEntry {
                    name: e.key().clone(),
                    version: v.to_string(),
                    state: "UNAVAILABLE",
                    reason: reason.clone(),
                };
                entries.push((e.key().clone(), *v, entry));
            }
        }
        entries.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        entries.into_iter().map(|(_, _, e)| e).collect()
    }

    /// Versions that failed to load, as `name/version: reason`.
    pub fn failures(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .unavailable
            .iter()
            .flat_map(|e| e.value().iter().map(|(v, r)| format!("{}/{v}: {r}", e.key())).collect::<Vec<_>>())
            .collect();
        out.sort();
        out
    }

    /// All versions of a model, oldest first.
    pub fn versions(&self, name: &str) -> Vec<Arc<ServedModel>> {
        self.models.get(name).map(|v| v.values().cloned().collect()).unwrap_or_default()
    }

    /// The version a request goes to: the one named, else the newest.
    pub fn route(&self, name: &str, version: Option<&str>) -> Result<Arc<ServedModel>, RouteError> {
        let unavailable = |wanted: Option<u64>| {
            self.unavailable.get(name).and_then(|failed| {
                let (v, reason) = match wanted {
                    Some(n) => failed.get_key_value(&n)?,
                    None => failed.iter().next_back()?,
                };
                Some(RouteError::Unavailable { name: name.to_string(), version: *v, reason: reason.clone() })
            })
        };
        let wanted = version.and_then(|v| v.parse::<u64>().ok());
        let Some(versions) = self.models.get(name) else {
            return Err(unavailable(wanted).unwrap_or_else(|| RouteError::UnknownModel {
                name: name.to_string(),
                served: self.names().join(", "),
            }));
        };
        let found = match version {
            None => versions.values().next_back().cloned(),
            Some(_) => wanted.and_then(|n| versions.get(&n).cloned()),
        };
        if found.is_none() {
            if let Some(e) = wanted.and_then(|n| unavailable(Some(n))) {
                return Err(e);
            }
        }
        found.ok_or_else(|| RouteError::UnknownVersion {
            name: name.to_string(),
            version: version.unwrap_or("latest").to_string(),
            available: versions.keys().map(u64::to_string).collect::<Vec<_>>().join(", "),
        })
    }
}
