//! Loading a model version: build the engine, read the metadata and warm the first replica before
//! the version becomes routable; loads of the same version at once share one result; model bytes in
//! a request are staged to disk first.

use super::*;

impl NodeControl {
    /// Triton's load: every version of `name` in the repository that is not loaded yet, or every one
    /// again with `config` (a JSON override); with `files` (version -> ONNX bytes), those versions from
    /// the bytes instead. Each version keeps serving until its replacement is warm.
    pub async fn load_model(
        self: &Arc<Self>,
        name: &str,
        config: Option<serde_json::Value>,
        files: BTreeMap<u64, Vec<u8>>,
    ) -> Result<Vec<Loaded>, ControlError> {
        if !self.explicit() {
            return Err(ControlError::Disabled);
        }
        check_name(name)?;
        let base = repository::model_config(&self.serving.models.path, name, &self.serving.model_defaults)
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        let mut jobs: Vec<(u64, Source, ModelConfig, bool)> = Vec::new();
        if files.is_empty() {
            let entries = repository::scan_model(&self.serving.models.path, name, &base)
                .map_err(|e| ControlError::Invalid(e.to_string()))?;
            if entries.is_empty() {
                return Err(ControlError::NotInRepository {
                    name: name.to_string(),
                    repo: self.serving.models.path.display().to_string(),
                });
            }
            for RepoEntry { version, path, config: repo_config, .. } in entries {
                let config = match &config {
                    Some(o) => model_config_with_json(&repo_config, o).map_err(ControlError::Invalid)?,
                    None => repo_config,
                };
                jobs.push((version, Source::Path(path), config, false));
            }
        } else {
            for (version, bytes) in files {
                let config = match &config {
                    Some(o) => model_config_with_json(&base, o).map_err(ControlError::Invalid)?,
                    None => base.clone(),
                };
                jobs.push((version, Source::Bytes(Arc::new(bytes)), config, true));
            }
        }
        // Without an override, versions already loaded from the repository are left as they are.
        let force_all = config.is_some();
        let mut done = Vec::new();
        for (version, source, model_config, from_bytes) in jobs {
            done.push(self.load_version(name, version, source, model_config, force_all || from_bytes).await?);
        }
        Ok(done)
    }

    /// Loads one version (or reloads it when `replace`), coalescing with a load of it in progress.
    pub async fn load_version(
        self: &Arc<Self>,
        name: &str,
        version: u64,
        source: Source,
        config: ModelConfig,
        replace: bool,
    ) -> Result<Loaded, ControlError> {
        check_name(name)?;
        let key = (name.to_string(), version);
        let fingerprint = source.fingerprint();
        let shared = {
            let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
            let same = loading
                .get(&key)
                .filter(|l| l.source == fingerprint && l.config == config && l.replace == replace)
                .map(|l| l.result.clone());
            match same {
                Some(in_progress) => in_progress,
                // A different load of this version waits for the one in progress (control operations
                // on a model are serialised), then runs.
                None => {
                    let (tx, rx) = oneshot::channel();
                    let this = self.clone();
                    let job_key = key.clone();
                    let job_config = config.clone();
                    let spawned = self.arbiter.spawn(async move {
                        let result = this.load_now(&job_key.0, job_key.1, source, job_config, replace).await;
                        let mut loading = this.loading.lock().unwrap_or_else(|p| p.into_inner());
                        if loading.get(&job_key).is_some_and(|l| l.source == fingerprint) {
                            loading.remove(&job_key);
                        }
                        drop(loading);
                        let _ = tx.send(result);
                    });
                    if !spawned {
                        return Err(ControlError::Internal("the control arbiter has stopped".into()));
                    }
                    let fut: BoxFuture<'static, Result<Loaded, ControlError>> = rx
                        .map(|r| r.unwrap_or_else(|_| Err(ControlError::Internal("the load task ended".into()))))
                        .boxed();
                    let shared = fut.shared();
                    loading.insert(key, InProgress { source: fingerprint, config, replace, result: shared.clone() });
                    shared
                }
            }
        };
        shared.await
    }

    /// The load itself (on the arbiter).
    pub(super) async fn load_now(
        self: &Arc<Self>,
        name: &str,
        version: u64,
        source: Source,
        config: ModelConfig,
        replace: bool,
    ) -> Result<Loaded, ControlError> {
        let lock = self.lock_for(name);
        let _serialised = lock.lock().await;
        let started = Instant::now();
        let already = self.models.versions(name).into_iter().any(|m| m.version == version);
        if already && !replace {
            return Ok(Loaded { name: name.to_string(), version, ms: 0, replaced: false, unchanged: true });
        }
        let (path, staged) = match source {
            Source::Path(path) => (path, false),
            Source::Bytes(bytes) => (self.stage(name, version, &bytes)?, true),
        };
        let entry = RepoEntry { name: name.to_string(), version, path: path.clone(), config };
        let model = match repository::start_version(&entry, &self.serving, &self.metrics).await {
            Ok(model) => model,
            Err(e) => {
                if staged {
                    remove_staged(&path);
                }
                let error = ControlError::LoadFailed { name: name.to_string(), version, reason: e.to_string() };
                tracing::error!(model = %name, version, "{error}");
                self.load_errors.insert(name.to_string(), format!("{version}: {e}"));
                return Err(error);
            }
        };
        self.load_errors.remove(name);
        let old = self.models.insert(model);
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(model = %name, version, ms, replaced = old.is_some(), "model version loaded and routable");
        let replaced = old.is_some();
        if let Some(old) = old {
            let staging = self.staging_dir();
            actix_rt::spawn(async move {
                let path = old.path.clone();
                drain(old).await;
                if path.starts_with(&staging) {
                    remove_staged(&path);
                }
            });
        }
        Ok(Loaded { name: name.to_string(), version, ms, replaced, unchanged: false })
    }

    pub(super) fn staging_dir(&self) -> PathBuf {
        self.serving
            .models
            .staging_path
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("fabric-staged-{}", std::process::id())))
    }

    /// Writes handed-over bytes to a file of their own (a reload never overwrites a file in use).
    pub(super) fn stage(&self, name: &str, version: u64, bytes: &[u8]) -> Result<PathBuf, ControlError> {
        let n = self.staged.fetch_add(1, Ordering::Relaxed);
        let dir = self.staging_dir().join(name).join(format!("{version}-{n}"));
        let path = dir.join("model.onnx");
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&path, bytes))
            .map_err(|e| ControlError::Internal(format!("cannot stage the model file in {}: {e}", dir.display())))?;
        Ok(path)
    }
}
