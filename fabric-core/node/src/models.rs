//! The set of model versions a node serves, each model's traffic policy, and routing a request to a
//! version.
//!
//! A model's versions and its policy sit under one map entry, so a policy change, a load or an unload
//! takes effect atomically for every later request: a request routes under the entry's read lock and
//! leaves with an `Arc` of its version, which keeps that version's pool alive until it is answered.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;

use crate::config::ModelConfig;
use crate::pool::PoolHandle;
use crate::shadow::ShadowStats;
use fabric_engine::EngineKind;
use fabric_policy::cascade::Cascade;
use fabric_policy::traffic::{self, PolicyError, TrafficPolicy};

/// One served model version.
pub struct ServedModel {
    /// Model name.
    pub name: String,
    /// Version number.
    pub version: u64,
    /// Engine running it.
    pub engine: EngineKind,
    /// Why that engine, when `auto` chose it (the race's figures, or why the other could not load).
    pub engine_reason: Option<String>,
    /// Its serving settings.
    pub config: ModelConfig,
    /// The model file its replicas load.
    pub path: PathBuf,
    /// Its pool.
    pub pool: PoolHandle,
    /// Its drift counts and feedback.
    pub quality: Arc<crate::quality::Quality>,
}

impl ServedModel {
    /// The version as the protocol spells it.
    pub fn version_str(&self) -> String {
        self.version.to_string()
    }
}

/// Why a request names no served model (HTTP 404).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
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
    pub fn code(&self) -> fabric_proto::wire::ErrorCode {
        match self {
            RouteError::UnknownModel { .. } | RouteError::UnknownVersion { .. } => {
                fabric_proto::wire::ErrorCode::UnknownModel
            }
            RouteError::Unavailable { .. } => fabric_proto::wire::ErrorCode::Busy,
        }
    }
}

/// Why a version cannot be taken out of service.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RemoveError {
    /// Not loaded.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The traffic policy still sends requests (or shadow copies) to it.
    #[error("model '{name}' version {version} still receives traffic under the policy {policy}: move the policy off it first (PUT /v2/fabric/models/{name}/policy)")]
    InUse { name: String, version: u64, policy: String },
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

/// Where a request goes: its version, and the shadow version that gets a copy (if this one is copied).
pub struct Routed {
    /// The version that answers.
    pub model: Arc<ServedModel>,
    /// The version that gets a copy, and where the comparison is recorded.
    pub shadow: Option<(Arc<ServedModel>, Arc<ShadowStats>)>,
}

/// A model name's versions and policy.
#[derive(Default)]
struct Family {
    versions: BTreeMap<u64, Arc<ServedModel>>,
    /// `None`: versionless requests go to the newest version (Triton's default).
    policy: Option<TrafficPolicy>,
    shadow: Option<Arc<ShadowStats>>,
}

/// Every served model, by name and version.
#[derive(Default)]
pub struct ModelSet {
    models: DashMap<String, Family>,
    /// Versions found in the repository that failed to load, with the reason.
    unavailable: DashMap<String, BTreeMap<u64, String>>,
    /// Draws for requests without an id (see [`traffic::draw`]).
    counter: AtomicU64,
    /// The versions the node was started with: server readiness waits for these only.
    startup: Mutex<BTreeSet<(String, u64)>>,
    /// Cascades from the config file (`[cascade.NAME]`), by the small model's name.
    configured_cascades: std::sync::RwLock<BTreeMap<String, Arc<Cascade>>>,
    /// Cascades the registry's desired state placed; they win over the config's.
    placed_cascades: DashMap<String, Arc<Cascade>>,
}

impl ModelSet {
    /// Sets the config file's cascades.
    pub fn set_configured_cascades(&self, cascades: &BTreeMap<String, Cascade>) {
        let all = cascades.iter().map(|(k, v)| (k.clone(), Arc::new(v.clone()))).collect();
        *self.configured_cascades.write().unwrap_or_else(std::sync::PoisonError::into_inner) = all;
    }

    /// Sets (or with `None` drops) the cascade the registry placed on model `name`.
    pub fn place_cascade(&self, name: &str, cascade: Option<Cascade>) {
        match cascade {
            Some(c) if self.placed_cascades.get(name).is_none_or(|old| **old != c) => {
                tracing::info!(model = name, to = %c.to, threshold = c.threshold, "cascade placed by the registry");
                self.placed_cascades.insert(name.to_string(), Arc::new(c));
            }
            Some(_) => {}
            None => {
                self.placed_cascades.remove(name);
            }
        }
    }

    /// The cascade from model `name`, when it is the small model of one.
    pub fn cascade(&self, name: &str) -> Option<Arc<Cascade>> {
        if let Some(c) = self.placed_cascades.get(name) {
            return Some(c.clone());
        }
        self.configured_cascades.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(name).cloned()
    }

    /// Adds a model version, or replaces the one of that version (returned, to be drained).
    pub fn insert(&self, model: ServedModel) -> Option<Arc<ServedModel>> {
        if let Some(mut failed) = self.unavailable.get_mut(&model.name) {
            failed.remove(&model.version);
        }
        self.unavailable.remove_if(&model.name, |_, v| v.is_empty());
        self.models.entry(model.name.clone()).or_default().versions.insert(model.version, Arc::new(model))
    }

    /// Replaces the settings recorded for `model` (its pool already runs with them), if it still serves.
    pub fn update_config(&self, model: &Arc<ServedModel>, config: ModelConfig) {
        if let Some(mut family) = self.models.get_mut(&model.name) {
            if let Some(current) = family.versions.get_mut(&model.version).filter(|m| Arc::ptr_eq(m, model)) {
                *current = Arc::new(ServedModel {
                    name: model.name.clone(),
                    version: model.version,
                    engine: model.engine,
                    engine_reason: model.engine_reason.clone(),
                    config,
                    path: model.path.clone(),
                    pool: model.pool.clone(),
                    quality: model.quality.clone(),
                });
            }
        }
    }

    /// Records a version that failed to load, so requests for it get the reason instead of a 404.
    pub fn mark_unavailable(&self, name: &str, version: u64, reason: String) {
        self.unavailable.entry(name.to_string()).or_default().insert(version, reason);
    }

    /// Notes the versions known now (served or failed) as those the node started with.
    pub fn mark_startup(&self) {
        let mut startup = self.startup.lock().unwrap_or_else(|p| p.into_inner());
        for e in self.index(|_| None) {
            if let Ok(v) = e.version.parse() {
                startup.insert((e.name, v));
            }
        }
    }

    /// Whether `name`/`version` is one the node started with.
    pub fn is_startup(&self, name: &str, version: u64) -> bool {
        self.startup.lock().unwrap_or_else(|p| p.into_inner()).contains(&(name.to_string(), version))
    }

    /// Takes a version out of routing (refused while the policy uses it, unless `whole_model`, which
    /// drops the policy with the last version). Returns it, to be drained and stopped.
    pub fn remove(&self, name: &str, version: u64, whole_model: bool) -> Result<Arc<ServedModel>, RemoveError> {
        let failed = self.unavailable.get_mut(name).and_then(|mut f| f.remove(&version));
        self.unavailable.remove_if(name, |_, v| v.is_empty());
        self.startup.lock().unwrap_or_else(|p| p.into_inner()).remove(&(name.to_string(), version));
        let Some(mut family) = self.models.get_mut(name) else {
            return Err(self.not_found(name, version, failed).into());
        };
        if !whole_model {
            if let Some(policy) = family.policy.as_ref().filter(|p| p.uses(version)) {
                return Err(RemoveError::InUse {
                    name: name.to_string(),
                    version,
                    policy: serde_json::to_string(policy).unwrap_or_default(),
                });
            }
        }
        let Some(removed) = family.versions.remove(&version) else {
            drop(family);
            return Err(self.not_found(name, version, failed).into());
        };
        if family.versions.is_empty() {
            drop(family);
            self.models.remove_if(name, |_, f| f.versions.is_empty());
        }
        Ok(removed)
    }

    fn not_found(&self, name: &str, version: u64, failed: Option<String>) -> RouteError {
        match failed {
            Some(reason) => RouteError::Unavailable { name: name.to_string(), version, reason },
            None => match self.models.get(name) {
                Some(f) => RouteError::UnknownVersion {
                    name: name.to_string(),
                    version: version.to_string(),
                    available: f.versions.keys().map(u64::to_string).collect::<Vec<_>>().join(", "),
                },
                None => RouteError::UnknownModel { name: name.to_string(), served: self.names().join(", ") },
            },
        }
    }

    /// Sets a model's traffic policy (`None`: newest version), after checking every version it routes
    /// to is loaded and has a replica ready. Takes effect for every request routed after it returns.
    pub fn set_policy(&self, name: &str, policy: Option<TrafficPolicy>) -> Result<(), PolicyError> {
        let Some(mut family) = self.models.get_mut(name) else {
            return Err(PolicyError::UnknownModel(name.to_string()));
        };
        if let Some(policy) = &policy {
            policy.validate(|v| match family.versions.get(&v) {
                None => Err("not loaded".into()),
                Some(m) if !m.pool.serving() => Err("no replica ready".into()),
                Some(_) => Ok(()),
            })?;
        }
        let shadow = policy.as_ref().and_then(|p| p.shadow).map(|s| s.version);
        if family.shadow.as_ref().map(|s| s.version) != shadow {
            family.shadow = shadow.map(|v| Arc::new(ShadowStats::new(v)));
        }
        family.policy = policy;
        Ok(())
    }

    /// A model's policy (`None`: newest version) and its shadow statistics.
    pub fn policy(&self, name: &str) -> Result<(Option<TrafficPolicy>, Option<Arc<ShadowStats>>), RouteError> {
        match self.models.get(name) {
            Some(f) => Ok((f.policy.clone(), f.shadow.clone())),
            None => Err(self.not_found_model(name)),
        }
    }

    fn not_found_model(&self, name: &str) -> RouteError {
        RouteError::UnknownModel { name: name.to_string(), served: self.names().join(", ") }
    }

    /// Names of all models, sorted (those that failed to load included).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.models.iter().map(|e| e.key().clone()).collect();
        names.extend(self.unavailable.iter().map(|e| e.key().clone()));
        names.sort();
        names.dedup();
        names
    }

    /// Every version known, served or not, sorted by name and version; `not_ready` says per served
    /// version why it cannot serve now (`None`: it can).
    pub fn index(&self, not_ready: impl Fn(&ServedModel) -> Option<String>) -> Vec<IndexEntry> {
        let mut entries: Vec<(String, u64, IndexEntry)> = Vec::new();
        for e in self.models.iter() {
            for (v, m) in &e.value().versions {
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
        self.models.get(name).map(|f| f.versions.values().cloned().collect()).unwrap_or_default()
    }

    /// Every served version of every model, by name then version.
    pub fn all(&self) -> Vec<Arc<ServedModel>> {
        let mut all: Vec<Arc<ServedModel>> =
            self.models.iter().flat_map(|f| f.versions.values().cloned().collect::<Vec<_>>()).collect();
        all.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
        all
    }

    /// The version a request about a model (metadata, readiness, config) means: the one named, else the
    /// policy's main version, else the newest.
    pub fn route(&self, name: &str, version: Option<&str>) -> Result<Arc<ServedModel>, RouteError> {
        self.resolve(name, version, |family| family.policy.as_ref().and_then(TrafficPolicy::primary))
            .map(|(model, _)| model)
    }

    /// The version an inference request goes to: the one named, else the policy's choice (sticky by
    /// request id when there is one), else the newest; with the shadow copy, if this request is copied.
    pub fn route_infer(&self, name: &str, version: Option<&str>, id: Option<&str>) -> Result<Routed, RouteError> {
        let draw = traffic::draw(id, self.counter.fetch_add(1, Ordering::Relaxed));
        let mut shadow = None;
        let (model, family_shadow) = self.resolve(name, version, |family| {
            let policy = family.policy.as_ref()?;
            shadow = policy.shadow_for(draw);
            policy.choose(draw)
        })?;
        let shadow = match (version, shadow, family_shadow) {
            (None, Some(v), Some(stats)) => self.route(name, Some(&v.to_string())).ok().map(|m| (m, stats)),
            _ => None,
        };
        Ok(Routed { model, shadow })
    }

    /// Resolves a version under the family's read lock; `versionless` picks one when none is named.
    fn resolve(
        &self,
        name: &str,
        version: Option<&str>,
        versionless: impl FnOnce(&Family) -> Option<u64>,
    ) -> Result<(Arc<ServedModel>, Option<Arc<ShadowStats>>), RouteError> {
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
        let Some(family) = self.models.get(name) else {
            return Err(unavailable(wanted).unwrap_or_else(|| self.not_found_model(name)));
        };
        let found = match version {
            None => match versionless(&family) {
                Some(v) => family.versions.get(&v).cloned(),
                None => family.versions.values().next_back().cloned(),
            },
            Some(_) => wanted.and_then(|n| family.versions.get(&n).cloned()),
        };
        if let Some(model) = found {
            return Ok((model, family.shadow.clone()));
        }
        if let Some(e) = wanted.and_then(|n| unavailable(Some(n))) {
            return Err(e);
        }
        Err(RouteError::UnknownVersion {
            name: name.to_string(),
            version: version.unwrap_or("latest").to_string(),
            available: family.versions.keys().map(u64::to_string).collect::<Vec<_>>().join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_policy::cascade::Measure;

    #[test]
    fn a_placed_cascade_wins_over_the_configured_one_until_dropped() {
        let c = |to: &str| Cascade { to: to.into(), output: None, threshold: 0.9, measure: Measure::Top1 };
        let set = ModelSet::default();
        set.set_configured_cascades(&BTreeMap::from([("small".to_string(), c("from-config"))]));
        let to = |name: &str| set.cascade(name).map(|c| c.to.clone());
        assert_eq!(to("small").as_deref(), Some("from-config"));
        set.place_cascade("small", Some(c("from-registry")));
        assert_eq!(to("small").as_deref(), Some("from-registry"));
        set.place_cascade("small", None);
        assert_eq!(to("small").as_deref(), Some("from-config"));
        assert_eq!(to("other"), None);
    }
}
