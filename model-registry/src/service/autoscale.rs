//! The autoscaling driver: each heartbeat's load report feeds one autoscaler per node and version;
//! decisions change the replicas in the desired state and are flushed to the store in batches.

use super::*;

impl Registry {
    /// Feeds a node's fresh report to the autoscalers of the versions deployed there; a change of
    /// replica count takes effect at once (the node's next answer carries it) and is written with the
    /// tick's other decisions ([`Registry::flush_scaled`]). Returns whether any count changed.
    pub(super) fn autoscale(&self, info: &NodeInfo, desired: &Desired) -> bool {
        let Some(mut settings) = self.settings.autoscale else { return false };
        if settings.max_replicas == 0 {
            settings.max_replicas = info.cores.max(1);
        }
        if info.role == Role::Hub.as_str() {
            settings.idle_to_zero_s = self.settings.hub_idle_to_zero_s;
        }
        let mut changes = Vec::new();
        self.fleet.with(&info.node_id, |n| {
            for m in &desired.state.models {
                for dv in &m.versions {
                    let Some(v) = n.report.version(&m.name, dv.version) else {
                        continue;
                    };
                    if v.loading_replicas > 0 || v.last_load_error.is_some() {
                        continue;
                    }
                    let sample = v.load_sample(self.started.elapsed());
                    let key = (info.node_id.clone(), m.name.clone(), dv.version);
                    let device = settings.for_device(v.on_gpu, v.replicas_per_gpu);
                    let mut scaler = self.scalers.entry(key).or_insert_with(|| Autoscaler::new(device));
                    let decision = scaler.decide(&sample, dv.replicas);
                    if decision.replicas != dv.replicas {
                        changes.push((m.name.clone(), dv.version, dv.replicas, decision));
                    }
                }
            }
        });
        let changed = !changes.is_empty();
        for (model, version, from, decision) in changes {
            tracing::info!(node = %info.node_id, %model, version, from, to = decision.replicas, "autoscaling: {}", decision.reason);
            let key = scaled_key(&model, version);
            let scaled = Scaled { replicas: decision.replicas, reason: decision.reason.clone(), at_ms: now_ms() };
            self.scaled.entry(info.node_id.clone()).or_default().insert(key.clone(), scaled.clone());
            self.unsaved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(scaled_record_key(&info.node_id, &key), Some(scaled));
        }
        changed
    }

    /// Writes the autoscaling decisions since the last call, in one durable write (called every
    /// [`FLUSH_TICK`](super::FLUSH_TICK)); a failed write is kept for the next one.
    pub fn flush_scaled(&self) {
        let pending = std::mem::take(&mut *self.unsaved.lock().unwrap_or_else(|p| p.into_inner()));
        if pending.is_empty() {
            return;
        }
        let changes: Vec<Change> = pending
            .iter()
            .map(|(k, v)| match v {
                Some(s) => Change::Put(k.clone(), serde_json::to_vec(s).unwrap_or_default()),
                None => Change::Delete(k.clone()),
            })
            .collect();
        let mut revision = self.revision.lock().unwrap_or_else(|p| p.into_inner());
        match self.store.write(*revision, &changes) {
            Ok(r) => *revision = r,
            Err(e) => {
                tracing::error!(decisions = changes.len(), "cannot record autoscaling decisions (retried): {e}");
                let mut unsaved = self.unsaved.lock().unwrap_or_else(|p| p.into_inner());
                for (k, v) in pending {
                    unsaved.entry(k).or_insert(v);
                }
            }
        }
    }
}
