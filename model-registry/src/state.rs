//! The registry's durable state: model versions, deployments and rollouts, kept per key by the store
//! (see [`crate::store`]); a transition edits a copy and writes only the keys it changed. The
//! autoscaling records ([`ScaledTable`]) grow with the fleet, so they live beside it, not in it: a
//! transition never copies them.

use std::collections::BTreeMap;

pub use fabric_proto::answers::{
    Canary, Deployment, ModelVersion, Rollout, RolloutEvent, Scaled, ShadowRoute, HISTORY,
};
use serde::{Deserialize, Serialize};

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

/// The key of a version in a node's autoscaling records.
pub fn scaled_key(model: &str, version: u64) -> String {
    format!("{model}:{version}")
}

/// A model version for tests: digest `<name><version>`, nothing read from a file.
#[cfg(test)]
pub(crate) fn test_version(name: &str, version: u64) -> ModelVersion {
    ModelVersion {
        name: name.into(),
        version,
        digest: format!("{name}{version}"),
        size: 1,
        inputs: Vec::new(),
        outputs: Vec::new(),
        pushed_by: "operator".into(),
        pushed_at: 0,
        reference: None,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
