//! The node's load report: per version its replicas, queue and rolling rates and latencies, per
//! model its policy, shadow comparison and failed loads.

use super::*;

impl NodeControl {
    /// The load report: every served version's replicas, queue and rates over the last few seconds,
    /// and every model's policy and shadow comparison.
    pub async fn report(&self) -> NodeReport {
        let now = Instant::now();
        let mut versions = Vec::new();
        let mut weights: BTreeMap<String, Option<TrafficPolicy>> = BTreeMap::new();
        for model in self.models.all() {
            let policy = weights
                .entry(model.name.clone())
                .or_insert_with(|| self.models.policy(&model.name).ok().and_then(|(p, _)| p))
                .clone();
            let newest = self.models.versions(&model.name).last().map(|m| m.version);
            let weight_pct = match &policy {
                Some(p) => {
                    let total: u64 = p.weights.values().map(|&w| u64::from(w)).sum();
                    let w = p.weights.get(&model.version).copied().unwrap_or(0);
                    if total == 0 {
                        0.0
                    } else {
                        f64::from(w) * 100.0 / total as f64
                    }
                }
                None if newest == Some(model.version) => 100.0,
                None => 0.0,
            };
            let status = model.pool.status().await.ok();
            let stats = model.pool.stats();
            let ready_replicas = model.pool.ready_replicas();
            versions.push(VersionReport {
                name: model.name.clone(),
                version: model.version,
                ready: model.pool.serving(),
                weight_pct,
                on_gpu: model.pool.on_gpu(),
                engine: model.engine,
                engine_choice: model.engine_reason.clone(),
                target_replicas: status.as_ref().map_or(0, |s| s.target),
                ready_replicas,
                loading_replicas: status.as_ref().map_or(0, |s| s.loading),
                busy_replicas: status.as_ref().map_or(0, |s| s.busy),
                queue_depth: status.as_ref().map_or(0, |s| s.queued),
                in_flight: stats.in_flight(),
                restarts: status.as_ref().map_or(0, |s| s.restarts),
                cold_start_ms: status.as_ref().and_then(|s| s.cold_start).map(|d| d.as_secs_f64() * 1e3),
                gpu_memory_mib: model.pool.gpu().map(|g| g.memory_mib),
                replicas_per_gpu: model.pool.gpu().map(|g| g.replicas_per_gpu),
                last_load_error: status.and_then(|s| s.last_error),
                drift: model.quality.drift_report(now),
                feedback: model.quality.feedback_report(now),
                window: stats.report(now, ready_replicas),
                recent: stats.recent(now, ready_replicas),
            });
        }
        let models = self
            .models
            .names()
            .into_iter()
            .map(|name| {
                let (policy, shadow) = self.models.policy(&name).unwrap_or((None, None));
                ModelReport {
                    last_load_error: self.load_errors.get(&name).map(|e| e.clone()),
                    shadow: shadow.map(|s| s.report()),
                    policy,
                    name,
                }
            })
            .collect();
        NodeReport { node: self.node.clone(), uptime_ms: self.started.elapsed().as_millis() as u64, models, versions }
    }

    /// The versions with a replica ready now.
    pub fn ready_versions(&self) -> Vec<fabric_proto::registry::ReadyVersion> {
        self.models
            .all()
            .into_iter()
            .filter(|m| m.pool.serving())
            .map(|m| fabric_proto::registry::ReadyVersion { name: m.name.clone(), version: m.version })
            .collect()
    }
}
