//! The registry's durable state: model versions, deployments and rollouts, kept per key by the store
//! (see [`crate::store`]); a transition edits a copy and writes only the keys it changed. The
//! autoscaling records ([`ScaledTable`]) grow with the fleet, so they live beside it, not in it: a
//! transition never copies them.

use std::collections::BTreeMap;

use fabric_proto::registry::Target;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Everything the registry must not lose.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RegistryState {
    /// Bumped by every transition; nodes' desired states carry it.
    pub generation: u64,
    /// Model versions by name and version.
    pub models: BTreeMap<String, BTreeMap<u64, ModelVersion>>,
    /// Where each model is deployed.
    pub deployments: BTreeMap<String, Vec<Deployment>>,
    /// Each deployed model's rollout.
    pub rollouts: BTreeMap<String, Rollout>,
}

/// Replica counts the autoscaler decided, by node, then `model:version` ([`scaled_key`]).
pub type ScaledTable = BTreeMap<String, BTreeMap<String, Scaled>>;

/// An autoscaling decision for one model version on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scaled {
    /// Replicas to run.
    pub replicas: usize,
    /// Why.
    pub reason: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// The key of a version in a node's autoscaling records.
pub fn scaled_key(model: &str, version: u64) -> String {
    format!("{model}:{version}")
}

/// An immutable model version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// SHA-256 of the file, hex.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Inputs as read from the file.
    pub inputs: Value,
    /// Outputs as read from the file.
    pub outputs: Value,
    /// The operator who pushed it (certificate name).
    pub pushed_by: String,
    /// When, in seconds since the Unix epoch.
    pub pushed_at: u64,
}

/// A model served on a group of nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// Which role.
    pub to: Target,
    /// Labels a node must carry (all of them).
    pub labels: BTreeMap<String, String>,
    /// Replicas per node.
    pub replicas: usize,
}

/// A canary beside the stable version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    /// Canary version.
    pub version: u64,
    /// Share of requests, percent.
    pub weight: u32,
    /// Roll back by itself on worse errors or latency than the stable version.
    pub auto_rollback: bool,
}

/// A shadow version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowRoute {
    /// Shadow version.
    pub version: u64,
    /// Share of requests copied, percent.
    pub share: u32,
}

/// One step in a rollout's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutEvent {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The state generation it created.
    pub generation: u64,
    /// What happened.
    pub what: String,
}

/// How a model's versionless traffic is split.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// The version that takes the traffic the canary does not.
    pub stable: Option<u64>,
    /// The stable version before the last promote or pin (what a rollback without a canary returns to).
    #[serde(default)]
    pub previous_stable: Option<u64>,
    /// The canary, if one runs.
    pub canary: Option<Canary>,
    /// The shadow, if one runs.
    pub shadow: Option<ShadowRoute>,
    /// Why the last automatic rollback happened (figures included), if one did.
    pub auto_rolled_back: Option<String>,
    /// The last steps, newest last (at most [`HISTORY`]).
    pub history: Vec<RolloutEvent>,
}

/// Steps kept in a rollout's history.
pub const HISTORY: usize = 20;

impl Rollout {
    /// The versions this rollout needs on a node.
    pub fn versions(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.stable.into_iter().collect();
        v.extend(self.canary.map(|c| c.version));
        v.extend(self.shadow.map(|s| s.version));
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Records a step.
    pub fn record(&mut self, at_ms: u64, generation: u64, what: String) {
        self.history.push(RolloutEvent { at_ms, generation, what });
        if self.history.len() > HISTORY {
            self.history.remove(0);
        }
    }
}

/// A model version for tests: digest `<name><version>`, nothing read from a file.
#[cfg(test)]
pub(crate) fn test_version(name: &str, version: u64) -> ModelVersion {
    ModelVersion {
        name: name.into(),
        version,
        digest: format!("{name}{version}"),
        size: 1,
        inputs: Value::Null,
        outputs: Value::Null,
        pushed_by: "operator".into(),
        pushed_at: 0,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
