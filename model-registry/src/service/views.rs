//! Read-only views as the CLI and the status page show them: a model's rollout status, the nodes,
//! the overview; per-version figures summed over the nodes' last reports, with their latency
//! histograms merged.

#[allow(unused_imports)]
use fabric_proto::answers::{
    Accuracy, Analysis, Failing, LiveVersion, ModelOverview, NodeRollout, NodeView, Overview, RolloutStatus,
    RolloutSummary, Route, VersionSummary, WavesProgress, WindowFigures,
};

use super::*;

impl Registry {
    /// A model's rollout: counts over the nodes it targets (per state, per version ready, per route),
    /// and per-node detail for at most `limit` of them (0: all), those that need attention first.
    pub(super) fn status(&self, name: &str, limit: usize) -> Result<RolloutStatus, Refusal> {
        let state = self.state();
        let rollout = state.rollouts.get(name).ok_or_else(|| {
            Refusal::new("not_found", format!("model '{name}' has no rollout: `fabric deploy {name} --to ...` first"))
        })?;
        let timeout = self.settings.heartbeat_timeout;
        let deployments = state.deployments.get(name);
        // Pass 1, over the fleet: counts, and which nodes get detail.
        let (mut total, mut up, mut converged) = (0usize, 0usize, 0usize);
        let mut ready_on: BTreeMap<u64, usize> = BTreeMap::new();
        let mut routes: BTreeMap<Option<BTreeMap<u64, u32>>, usize> = BTreeMap::new();
        let mut candidates: Vec<(bool, String)> = Vec::new();
        self.fleet.each(|n| {
            if !deployments.is_some_and(|ds| ds.iter().any(|d| rollout::targets(d, &n.info))) {
                return;
            }
            total += 1;
            let is_up = n.is_up(timeout);
            up += usize::from(is_up);
            let desired = self.desired_of(&n.info, &n.ready);
            let done = n.applied == desired.state.revision;
            converged += usize::from(done);
            for (_, v) in n.ready.iter().filter(|(m, _)| m == name) {
                *ready_on.entry(*v).or_default() += 1;
            }
            let policy = desired.state.models.iter().find(|m| m.name == name).and_then(|m| m.policy.clone());
            *routes.entry(policy.map(|p| p.weights)).or_default() += 1;
            candidates.push((is_up && done, n.info.node_id.clone()));
        });
        candidates.sort();
        if limit > 0 {
            candidates.truncate(limit);
        }
        let per_node: Vec<NodeRollout> = candidates.iter().filter_map(|(_, id)| self.node_status(name, id)).collect();
        let nodes = &self.fleet;
        let active_waves = rollout.waves.as_ref().filter(|w| w.active());
        let compared = match (rollout.canary, active_waves) {
            (Some(c), _) => rollout.stable.map(|s| (s, c.version)),
            (None, Some(w)) => Some((w.from, w.version)),
            _ => None,
        };
        let analysis = compared.map(|(stable, canary)| Analysis {
            stable: figures(&window(nodes, name, stable, timeout)),
            canary: figures(&window(nodes, name, canary, timeout)),
        });
        let waves = active_waves.map(|w| {
            let (mut taking_part, mut moved) = (0usize, 0usize);
            self.fleet.each(|n| {
                let targeted = deployments.is_some_and(|ds| ds.iter().any(|d| rollout::targets(d, &n.info)));
                if targeted && crate::waves::takes_part(w, &n.info.labels) {
                    taking_part += 1;
                    moved += usize::from(crate::waves::moved(w, name, &n.info.node_id, &n.info.labels));
                }
            });
            // Until the wave's nodes serve, its whole time is still ahead.
            let ran = w.wave_ready_ms.map_or(0, |ready| crate::state::now_ms().saturating_sub(ready));
            WavesProgress {
                wave: w.wave + 1,
                waves: w.steps.len(),
                taking_part,
                moved,
                next_in_ms: w.every_ms.saturating_sub(ran),
            }
        });
        let summary = RolloutSummary {
            nodes: total,
            up,
            down: total - up,
            converged,
            not_converged: total - converged,
            ready: ready_on.iter().map(|(v, n)| (v.to_string(), *n)).collect(),
            routes: routes.into_iter().map(|(weights, nodes)| Route { weights, nodes }).collect(),
        };
        let accuracy = state
            .models
            .get(name)
            .into_iter()
            .flat_map(|vs| vs.keys())
            .filter_map(|&v| {
                let w = window(nodes, name, v, timeout);
                w.accuracy_pct().map(|accuracy_pct| (v.to_string(), Accuracy { labelled: w.labelled, accuracy_pct }))
            })
            .collect();
        Ok(RolloutStatus {
            accuracy,
            name: name.to_string(),
            generation: state.generation,
            rollout: rollout.clone(),
            analysis,
            waves,
            summary,
            nodes: per_node,
        })
    }

    /// One node's part in a model's rollout.
    pub(super) fn node_status(&self, name: &str, id: &str) -> Option<NodeRollout> {
        let desired = self.desired_for_node(id)?;
        let prefix = format!("{name}:");
        let scaled: BTreeMap<String, Scaled> = self
            .scaled
            .get(id)
            .map(|s| s.iter().filter(|(k, _)| k.starts_with(&prefix)).map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let model = desired.state.models.iter().find(|m| m.name == name);
        let replicas: Option<BTreeMap<String, usize>> =
            model.map(|m| m.versions.iter().map(|v| (v.version.to_string(), v.replicas)).collect());
        self.fleet.with(id, |n| NodeRollout {
            node: id.to_string(),
            state: if n.is_up(self.settings.heartbeat_timeout) { "up" } else { "down" }.to_string(),
            replicas,
            autoscaled: scaled,
            ready: n.ready.iter().filter(|(m, _)| m == name).map(|(_, v)| *v).collect(),
            policy: model.and_then(|m| m.policy.clone()),
            converged: n.applied == desired.state.revision,
            versions: n.report.versions.iter().filter(|v| v.name == name).cloned().collect(),
        })
    }

    /// Nodes, models and rollouts in one value (read-only): what `fabric top` and the status page show.
    /// Nodes as counts, and the nodes that need attention (down or failing) first, at most
    /// [`OVERVIEW_NODES`] of them.
    pub fn overview(&self) -> Overview {
        let state = self.state();
        let nodes = &self.fleet;
        let timeout = self.settings.heartbeat_timeout;
        let models: Vec<ModelOverview> = state
            .models
            .iter()
            .map(|(name, versions)| {
                // Each version's figures over the nodes' last reports, summed once here for every
                // viewer (the status page, `fabric top`).
                let drift = self.drift(name).ok();
                let verdict = |v: u64| {
                    drift.as_ref()?.versions.iter().find(|d| d.version == v).map(|d| d.judgement.verdict.clone())
                };
                let live = versions
                    .keys()
                    .map(|&v| {
                        let w = window(&nodes, name, v, timeout);
                        LiveVersion {
                            version: v,
                            weight_pct: w.weight_pct,
                            requests_per_s: w.per_s,
                            error_pct: w.error_pct(),
                            p50_ms: w.p50_ms,
                            p99_ms: w.p99_ms,
                            replicas: w.replicas,
                            accuracy_pct: w.accuracy_pct(),
                            drift: verdict(v),
                        }
                    })
                    .collect();
                ModelOverview {
                    name: name.clone(),
                    versions: versions
                        .values()
                        .map(|m| VersionSummary { version: m.version, size: m.size, digest: m.digest.clone() })
                        .collect(),
                    deployments: state.deployments.get(name).cloned(),
                    status: self.status(name, DETAIL_NODES).ok(),
                    live,
                }
            })
            .collect();
        let mut counts: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        self.fleet.each(|n| {
            let state = if n.is_up(timeout) { "up" } else { "down" };
            *counts.entry(n.info.role.clone()).or_default().entry(state.to_string()).or_default() += 1;
        });
        let shown = self.nodes(&NodeQuery { limit: Some(OVERVIEW_NODES), ..Default::default() });
        Overview {
            generation: state.generation,
            node_counts: counts,
            nodes_total: self.fleet.len(),
            nodes: shown,
            models,
        }
    }

    /// The nodes `query` selects: those that need attention (down, or a version failing) first, then
    /// by id; at most `query.limit`.
    pub(super) fn nodes(&self, query: &NodeQuery) -> Vec<NodeView> {
        let timeout = self.settings.heartbeat_timeout;
        let mut selected: Vec<(bool, String)> = Vec::new();
        self.fleet.each(|n| {
            let up = n.is_up(timeout);
            let state_ok = query.state.as_deref().is_none_or(|s| s == if up { "up" } else { "down" });
            let role_ok = query.role.as_deref().is_none_or(|r| r == n.info.role);
            let labels_ok = query.labels.iter().all(|(k, v)| n.info.labels.get(k) == Some(v));
            if state_ok && role_ok && labels_ok {
                selected.push((up && !failing(&n.report), n.info.node_id.clone()));
            }
        });
        selected.sort();
        if let Some(limit) = query.limit.filter(|&l| l > 0) {
            selected.truncate(limit);
        }
        selected.iter().filter_map(|(_, id)| self.fleet.with(id, |n| node_view(n, timeout))).collect()
    }
}

/// Per-node detail in `rollout status` unless asked otherwise.
pub const DETAIL_NODES: usize = 20;

/// Nodes listed one by one in the overview (the rest are counted).
pub const OVERVIEW_NODES: usize = 50;

/// Whether a node's report says a version is failing (a load that keeps failing, a crash loop).
pub(super) fn failing(report: &NodeReport) -> bool {
    report.versions.iter().any(|v| v.last_load_error.is_some())
}

/// One node as `fabric nodes` shows it.
pub(super) fn node_view(n: &NodeRecord, timeout: Duration) -> NodeView {
    let versions = &n.report.versions;
    let up = n.is_up(timeout);
    // A node that stopped heartbeating serves nothing we know of: its last report is stale.
    let served: f64 = if up { versions.iter().map(|v| v.window.served_per_s).sum() } else { 0.0 };
    let restarts: f64 = versions.iter().map(|v| v.restarts as f64).sum();
    // Per model version: replicas replaced (panics, watchdog), and the ones failing now (a load that
    // keeps failing, or a crash loop: replaced with backoff, not in a tight loop).
    let restarts_by_version: BTreeMap<String, u64> =
        versions.iter().filter(|v| v.restarts > 0).map(|v| (format!("{}:{}", v.name, v.version), v.restarts)).collect();
    let failing = versions
        .iter()
        .filter(|v| v.last_load_error.is_some())
        .map(|v| Failing {
            model: v.name.clone(),
            version: v.version,
            restarts: v.restarts,
            reason: v.last_load_error.clone(),
        })
        .collect();
    NodeView {
        node: n.info.node_id.clone(),
        state: if up { "up" } else { "down" }.to_string(),
        restarts,
        restarts_by_version,
        failing,
        role: n.info.role.clone(),
        labels: n.info.labels.clone(),
        http: n.info.http.clone(),
        last_heartbeat_ms: n.last_seen.elapsed().as_millis() as u64,
        ready: n.ready.iter().map(|(m, v)| format!("{m}:{v}")).collect(),
        served_per_s: served,
        cores: n.info.cores,
        memory_mib: n.info.memory_mib,
        engines: n.info.engines.clone(),
        gpu: n.info.gpu.clone(),
    }
}

/// What one version did over the nodes' last reports.
pub(super) fn window(fleet: &Fleet, name: &str, version: u64, timeout: Duration) -> Window {
    let mut w = Window::default();
    let mut serving = 0u32;
    // The nodes' latency histograms merge: the fleet's p99 is over every answer, not the worst node's.
    let mut latency = LatencySum::default();
    fleet.each(|n| {
        // Only nodes that serve it (no allocation: this runs over the whole fleet).
        if !n.is_up(timeout) || !n.ready.iter().any(|(m, v)| m == name && *v == version) {
            return;
        }
        if let Some(v) = n.report.version(name, version) {
            let secs = v.window.window_ms as f64 / 1e3;
            w.answered += v.answered_per_s() * secs;
            w.errors += v.rejected_per_s() * secs;
            w.per_s += v.answered_per_s();
            latency.add(&v.window.latency);
            w.replicas += v.ready_replicas as u64;
            w.weight_pct += v.weight_pct;
            if let Some(f) = &v.feedback {
                w.labelled += f.labelled;
                w.correct += f.correct;
            }
            serving += 1;
        }
    });
    if serving > 0 {
        w.weight_pct /= f64::from(serving);
    }
    w.p50_ms = latency.quantile_ms(0.5);
    w.p99_ms = latency.quantile_ms(0.99);
    w
}

pub(super) fn figures(w: &Window) -> WindowFigures {
    WindowFigures {
        requests: w.answered.round(),
        error_pct: w.error_pct(),
        p99_ms: w.p99_ms,
        labelled: w.labelled,
        accuracy_pct: w.accuracy_pct(),
    }
}
