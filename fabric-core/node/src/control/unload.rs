//! Unloading: out of routing at once (refused while the policy routes to it), every request already
//! routed to it finished, then its replicas stopped and its metric series dropped.

use super::*;

impl NodeControl {
    /// Unloads `version` of `name`, or every version (and the policy) when `None`; answers once the
    /// requests already routed there are answered and its replicas have stopped.
    pub async fn unload(self: &Arc<Self>, name: &str, version: Option<u64>) -> Result<Vec<Unloaded>, ControlError> {
        if !self.explicit() {
            return Err(ControlError::Disabled);
        }
        self.unload_versions(name, version).await
    }

    /// [`unload`](Self::unload) for the registry's agent (not subject to the repository API's switch).
    pub async fn unload_versions(
        self: &Arc<Self>,
        name: &str,
        version: Option<u64>,
    ) -> Result<Vec<Unloaded>, ControlError> {
        let lock = self.lock_for(name);
        let _serialised = lock.lock().await;
        let versions: Vec<u64> = match version {
            Some(v) => vec![v],
            None => {
                let mut all: Vec<u64> = self.models.versions(name).iter().map(|m| m.version).collect();
                all.extend(
                    self.models
                        .index(|_| None)
                        .iter()
                        .filter(|e| e.name == name)
                        .filter_map(|e| e.version.parse::<u64>().ok()),
                );
                all.sort_unstable();
                all.dedup();
                if all.is_empty() {
                    return Err(self
                        .models
                        .route(name, None)
                        .err()
                        .map(ControlError::Route)
                        .unwrap_or_else(|| ControlError::Invalid(format!("model '{name}' has nothing loaded"))));
                }
                all
            }
        };
        let mut removed = Vec::new();
        for v in &versions {
            match self.models.remove(name, *v, version.is_none()) {
                Ok(model) => removed.push(model),
                // A version that only failed to load is forgotten by `remove`; nothing to drain.
                Err(RemoveError::Route(RouteError::Unavailable { .. })) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let staging = self.staging_dir();
        let mut done = Vec::new();
        for model in removed {
            let started = Instant::now();
            let (model_name, v, path) = (model.name.clone(), model.version, model.path.clone());
            drain(model).await;
            self.metrics.remove_version(&model_name, &v.to_string());
            if path.starts_with(&staging) {
                remove_staged(&path);
            }
            let drain_ms = started.elapsed().as_millis() as u64;
            tracing::info!(model = %model_name, version = v, drain_ms, "model version unloaded");
            done.push(Unloaded { name: model_name, version: v, drain_ms });
        }
        Ok(done)
    }
}
