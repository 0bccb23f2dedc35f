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
}

/// Every served model, by name and version.
#[derive(Default)]
pub struct ModelSet {
    models: DashMap<String, BTreeMap<u64, Arc<ServedModel>>>,
}

impl ModelSet {
    /// Adds (or replaces) a model version.
    pub fn insert(&self, model: ServedModel) {
        self.models.entry(model.name.clone()).or_default().insert(model.version, Arc::new(model));
    }

    /// Names of all models, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.models.iter().map(|e| e.key().clone()).collect();
        names.sort();
        names
    }

    /// All versions of a model, oldest first.
    pub fn versions(&self, name: &str) -> Vec<Arc<ServedModel>> {
        self.models.get(name).map(|v| v.values().cloned().collect()).unwrap_or_default()
    }

    /// The version a request goes to: the one named, else the newest.
    pub fn route(&self, name: &str, version: Option<&str>) -> Result<Arc<ServedModel>, RouteError> {
        let versions = self
            .models
            .get(name)
            .ok_or_else(|| RouteError::UnknownModel { name: name.to_string(), served: self.names().join(", ") })?;
        let found = match version {
            None => versions.values().next_back().cloned(),
            Some(v) => v.parse::<u64>().ok().and_then(|n| versions.get(&n).cloned()),
        };
        found.ok_or_else(|| RouteError::UnknownVersion {
            name: name.to_string(),
            version: version.unwrap_or("latest").to_string(),
            available: versions.keys().map(u64::to_string).collect::<Vec<_>>().join(", "),
        })
    }
}
