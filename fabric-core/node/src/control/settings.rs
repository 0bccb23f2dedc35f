//! Changing what serves: traffic policies and pool settings (replicas, batching, timeouts) of a
//! version that serves.

use super::*;

impl NodeControl {
    /// Sets the traffic policy of `name` (`None`: the newest version).
    pub fn set_policy(&self, name: &str, policy: Option<TrafficPolicy>) -> Result<(), ControlError> {
        self.models.set_policy(name, policy.clone())?;
        tracing::info!(model = %name, policy = %serde_json::to_string(&policy).unwrap_or_default(), "traffic policy set");
        Ok(())
    }

    /// Changes a version's serving settings (a JSON object of [`ModelConfig`] keys, Triton's names
    /// accepted) and answers once the change has converged. A change of the replica count alone resizes
    /// the pool in place (shrinking retires idle replicas first, busy ones after their batch); any
    /// other change loads a new pool with the new settings, swaps it in when warm and drains the old.
    pub async fn reconfigure(
        self: &Arc<Self>,
        name: &str,
        version: u64,
        changes: &serde_json::Value,
    ) -> Result<ModelConfig, ControlError> {
        let model = self.models.route(name, Some(&version.to_string()))?;
        let wanted = model_config_with_json(&model.config, changes).map_err(ControlError::Invalid)?;
        let only_replicas = ModelConfig { replicas: model.config.replicas, ..wanted.clone() } == model.config;
        if wanted.replicas == 0 && !only_replicas {
            return Err(ControlError::Invalid(
                "replicas 0 (scale to zero) cannot be combined with other changes: set the other settings first".into(),
            ));
        }
        if only_replicas {
            let started = Instant::now();
            model.pool.resize(wanted.replicas).await.map_err(|reason| ControlError::Resize {
                name: name.to_string(),
                version,
                reason,
            })?;
            tracing::info!(model = %name, version, replicas = wanted.replicas, ms = started.elapsed().as_millis() as u64, "pool resized");
            // The served entry keeps its settings in step (the pool already has them).
            let lock = self.lock_for(name);
            let _serialised = lock.lock().await;
            if let Ok(current) = self.models.route(name, Some(&version.to_string())) {
                if Arc::ptr_eq(&current, &model) {
                    self.models.update_config(&model, wanted.clone());
                }
            }
            return Ok(wanted);
        }
        self.load_version(name, version, Source::Path(model.path.clone()), wanted.clone(), true).await?;
        Ok(wanted)
    }
}
