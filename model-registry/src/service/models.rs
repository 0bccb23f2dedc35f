//! Transitions of the models and their rollouts: show, remove, deploy, and rollout changes (canary,
//! shadow, promote, rollback).

#[allow(unused_imports)]
use fabric_proto::answers::{Deployed, ModelDetail, Removed, RolloutChanged};

use super::*;

impl Registry {
    pub(super) fn show(&self, name: &str, version: Option<u64>) -> Reply {
        let state = self.state();
        let versions = state.models.get(name).ok_or_else(|| Refusal::new("not_found", format!("no model '{name}'")))?;
        match version {
            Some(v) => versions
                .get(&v)
                .ok_or_else(|| Refusal::new("not_found", format!("model '{name}' has no version {v}")))
                .and_then(|m| answer(m)),
            None => answer(&ModelDetail {
                name: name.to_string(),
                versions: versions.values().cloned().collect(),
                deployments: state.deployments.get(name).cloned(),
                rollout: state.rollouts.get(name).cloned(),
            }),
        }
    }

    pub(super) fn remove(&self, name: &str, version: u64) -> Reply {
        let mut on_nodes = Vec::new();
        self.fleet.each(|n| {
            if n.ready.contains(&(name.to_string(), version)) {
                on_nodes.push(n.info.node_id.clone());
            }
        });
        on_nodes.sort();
        let mut digest = None;
        let reply = self.transition(|state| {
            let in_waves =
                |r: &crate::state::Rollout| r.waves.as_ref().is_some_and(|w| w.active() && w.version == version);
            if let Some(r) = state.rollouts.get(name).filter(|r| r.versions().contains(&version) || in_waves(r)) {
                return Err(Refusal::new(
                    "conflict",
                    format!("{name}:{version} is in the rollout ({}): move the rollout off it first", json!(r)),
                ));
            }
            if !on_nodes.is_empty() {
                let shown: Vec<&str> = on_nodes.iter().take(10).map(String::as_str).collect();
                let more = on_nodes.len().saturating_sub(shown.len());
                let more = if more > 0 { format!(" and {more} more") } else { String::new() };
                return Err(Refusal::new(
                    "conflict",
                    format!("{name}:{version} is still loaded on {}{more}", shown.join(", ")),
                ));
            }
            let versions =
                state.models.get_mut(name).ok_or_else(|| Refusal::new("not_found", format!("no model '{name}'")))?;
            let removed = versions
                .remove(&version)
                .ok_or_else(|| Refusal::new("not_found", format!("model '{name}' has no version {version}")))?;
            if versions.is_empty() {
                state.models.remove(name);
            }
            digest = Some(removed.digest.clone());
            answer(&Removed { removed })
        })?;
        if let Some(d) = digest {
            if !self.state().models.values().flat_map(|v| v.values()).any(|m| m.digest == d) {
                self.store.remove_blob(&d);
            }
        }
        Ok(reply)
    }

    pub(super) fn deploy(&self, name: &str, deployment: Deployment) -> Reply {
        self.transition(|state| {
            let newest = state.models.get(name).and_then(|v| v.keys().next_back().copied()).ok_or_else(|| {
                Refusal::new("not_found", format!("no model '{name}': push one with `fabric model push {name} FILE`"))
            })?;
            let groups = state.deployments.entry(name.to_string()).or_default();
            groups.retain(|d| !(d.to == deployment.to && d.labels == deployment.labels));
            groups.push(deployment.clone());
            let generation = state.generation + 1;
            let rollout = state.rollouts.entry(name.to_string()).or_default();
            if rollout.stable.is_none() {
                rollout.stable = Some(newest);
                rollout.record(now_ms(), generation, format!("deployed; pinned the newest version {newest}"));
            }
            answer(&Deployed {
                name: name.to_string(),
                generation,
                deployments: groups.clone(),
                rollout: rollout.clone(),
            })
        })
    }

    /// The positions ([`crate::waves::position`]) of the nodes known now (up or down) that model
    /// `name` is deployed to and that carry `labels`.
    pub(super) fn wave_positions(&self, name: &str, labels: &BTreeMap<String, String>) -> Vec<u64> {
        let state = self.state();
        let Some(deployments) = state.deployments.get(name) else { return Vec::new() };
        let mut positions = Vec::new();
        self.fleet.each(|n| {
            let targeted = deployments.iter().any(|d| rollout::targets(d, &n.info));
            if targeted && labels.iter().all(|(k, v)| n.info.labels.get(k) == Some(v)) {
                positions.push(crate::waves::position(name, &n.info.node_id));
            }
        });
        positions
    }

    /// Changes a rollout (`auto`: the analysis's reason, for an automatic rollback).
    pub(super) fn rollout(&self, name: &str, change: &RolloutAction, auto: Option<String>) -> Reply {
        let positions = match change {
            RolloutAction::Waves { labels, .. } => self.wave_positions(name, labels),
            _ => Vec::new(),
        };
        let context = rollout::Context { now_ms: now_ms(), positions };
        self.transition(|state| {
            let (mut rollout, line) = rollout::apply(state, name, change, &context)?;
            let line = match &auto {
                Some(why) => format!("automatic rollback: {why}"),
                None => line,
            };
            rollout.auto_rolled_back = auto.clone().or(rollout.auto_rolled_back);
            rollout.record(now_ms(), state.generation + 1, line);
            state.rollouts.insert(name.to_string(), rollout.clone());
            answer(&RolloutChanged { name: name.to_string(), generation: state.generation + 1, rollout })
        })
    }
}
