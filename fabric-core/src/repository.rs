//! The model repository on disk, in Triton's layout, and loading it into a [`ModelSet`].
//!
//! ```text
//! <repo>/<model>/config.toml        optional: ModelConfig keys for this model
//! <repo>/<model>/<version>/model.onnx
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{model_config_with_overrides, ModelConfig, ServingConfig};
use crate::engine::{self, EngineError, EngineKind};
use crate::metrics::Metrics;
use crate::models::{ModelSet, ServedModel};
use crate::pool::{EngineFactory, ModelPool};

/// One model version found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoEntry {
    /// Model name (its folder).
    pub name: String,
    /// Version (a numeric folder).
    pub version: u64,
    /// Path of model.onnx.
    pub path: PathBuf,
    /// Settings: defaults plus the model's config.toml.
    pub config: ModelConfig,
}

/// Why the repository cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    /// The folder does not exist.
    #[error("model repository {path} does not exist: set models.path in the config or pass --model-repository")]
    Missing { path: String },
    /// A folder cannot be listed.
    #[error("cannot list {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

fn list_dirs(path: &Path) -> Result<Vec<PathBuf>, RepositoryError> {
    let entries =
        std::fs::read_dir(path).map_err(|source| RepositoryError::Io { path: path.display().to_string(), source })?;
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    Ok(dirs)
}

/// What a scan found: versions to load, and versions whose model folder is unusable (with why).
#[derive(Debug, Default)]
pub struct Scan {
    /// Versions to load.
    pub entries: Vec<RepoEntry>,
    /// (model, version, reason) of versions that cannot be loaded as found (a bad config.toml, say).
    pub unusable: Vec<(String, u64, String)>,
}

/// Lists every model version in the repository. A model whose config.toml is invalid is reported in
/// [`Scan::unusable`] and the others are listed: one bad file does not take the repository down.
pub fn scan(repo: &Path, defaults: &ModelConfig) -> Result<Scan, RepositoryError> {
    if !repo.is_dir() {
        return Err(RepositoryError::Missing { path: repo.display().to_string() });
    }
    let mut found = Scan::default();
    for model_dir in list_dirs(repo)? {
        let Some(name) = model_dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        let config_file = model_dir.join("config.toml");
        let config = if config_file.is_file() {
            model_config_with_overrides(defaults, &config_file)
        } else {
            Ok(defaults.clone())
        };
        let mut versions = 0;
        for version_dir in list_dirs(&model_dir)? {
            let version = version_dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u64>().ok());
            let path = version_dir.join("model.onnx");
            if let (Some(version), true) = (version, path.is_file()) {
                match &config {
                    Ok(config) => {
                        found.entries.push(RepoEntry { name: name.clone(), version, path, config: config.clone() })
                    }
                    Err(e) => found.unusable.push((name.clone(), version, e.to_string())),
                }
                versions += 1;
            }
        }
        if let Err(e) = &config {
            tracing::error!(model = %name, "model skipped: {e}");
        }
        if versions == 0 {
            tracing::warn!(model = %name, "no <version>/model.onnx under {}; skipped", model_dir.display());
        }
    }
    Ok(found)
}

/// Loads one model version into a pool and adds it to the set.
pub async fn load_entry(
    entry: &RepoEntry,
    serving: &ServingConfig,
    models: &ModelSet,
    metrics: &Metrics,
) -> Result<(), EngineError> {
    let kind = entry.config.engine.unwrap_or(serving.models.engine);
    let options = serving.engine_options(&entry.config);
    let path = entry.path.clone();
    let factory: EngineFactory = Arc::new(move || engine::load(kind, &path, &options));
    let version = entry.version.to_string();
    let pool = ModelPool::start(&entry.name, &version, factory, entry.config.pool(), metrics.clone()).await?;
    models.insert(ServedModel {
        name: entry.name.clone(),
        version: entry.version,
        engine: kind,
        config: entry.config.clone(),
        pool,
    });
    Ok(())
}

/// Loads every model version of the repository; a model that fails is logged and left out.
///
/// Returns the number of versions loaded and the failures.
pub async fn load_all(
    serving: &ServingConfig,
    models: &ModelSet,
    metrics: &Metrics,
) -> Result<(usize, Vec<String>), RepositoryError> {
    let Scan { entries, unusable } = scan(&serving.models.path, &serving.model_defaults)?;
    let (mut loaded, mut failed) = (0, Vec::new());
    for (name, version, reason) in unusable {
        failed.push(format!("{name}/{version}: {reason}"));
        models.mark_unavailable(&name, version, reason);
    }
    for entry in &entries {
        let started = std::time::Instant::now();
        match load_entry(entry, serving, models, metrics).await {
            Ok(()) => {
                loaded += 1;
                let kind: EngineKind = entry.config.engine.unwrap_or(serving.models.engine);
                tracing::info!(model = %entry.name, version = entry.version, engine = %kind, replicas = entry.config.replicas,
                    max_batch = entry.config.max_batch_size, ms = started.elapsed().as_millis() as u64, "model loaded");
            }
            Err(e) => {
                tracing::error!(model = %entry.name, version = entry.version,
                    "model NOT loaded, skipped (its /ready and the repository index say why): {e}");
                models.mark_unavailable(&entry.name, entry.version, e.to_string());
                failed.push(format!("{}/{}: {e}", entry.name, entry.version));
            }
        }
    }
    Ok((loaded, failed))
}
