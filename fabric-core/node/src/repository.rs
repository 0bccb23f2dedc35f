//! The model repository on disk, in Triton's layout, and loading it into a [`ModelSet`].
//!
//! ```text
//! <repo>/<model>/config.toml        optional: ModelConfig keys for this model
//! <repo>/<model>/<version>/model.onnx
//! <repo>/<model>/<version>/reference.json   optional: reference statistics for drift
//! ```
//!
//! `reference.json` is what the registry makes of a reference sample (`fabric model show NAME:VERSION
//! --output json`, its `reference.stats`): a node without a registry counts drift against it too.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::config::{model_config_with_overrides, ConfigError, ModelConfig, ServingConfig};
use crate::metrics::Metrics;
use crate::models::{ModelSet, ServedModel};
use crate::pool::{race, warmup_sizes_for, EngineFactory, ModelPool, PoolConfig};
use fabric_engine::{self as engine, Engine, EngineError, EngineKind, EngineOptions};
use fabric_policy::engine_choice;

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

/// The settings of model `name`: the defaults plus its config.toml when it has one.
pub fn model_config(repo: &Path, name: &str, defaults: &ModelConfig) -> Result<ModelConfig, ConfigError> {
    let file = repo.join(name).join("config.toml");
    if file.is_file() {
        model_config_with_overrides(defaults, &file)
    } else {
        Ok(defaults.clone())
    }
}

/// The versions of one model in the repository (none when its folder does not exist), with `config`.
pub fn scan_model(repo: &Path, name: &str, config: &ModelConfig) -> Result<Vec<RepoEntry>, RepositoryError> {
    let model_dir = repo.join(name);
    if !model_dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut entries = Vec::new();
    for version_dir in list_dirs(&model_dir)? {
        let version = version_dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u64>().ok());
        let path = version_dir.join("model.onnx");
        if let (Some(version), true) = (version, path.is_file()) {
            entries.push(RepoEntry { name: name.to_string(), version, path, config: config.clone() });
        }
    }
    Ok(entries)
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
        let config = model_config(repo, &name, defaults);
        let entries = scan_model(repo, &name, config.as_ref().unwrap_or(defaults))?;
        if entries.is_empty() {
            tracing::warn!(model = %name, "no <version>/model.onnx under {}; skipped", model_dir.display());
        }
        match config {
            Ok(_) => found.entries.extend(entries),
            Err(e) => {
                tracing::error!(model = %name, "model skipped: {e}");
                found.unusable.extend(entries.into_iter().map(|entry| (name.clone(), entry.version, e.to_string())));
            }
        }
    }
    Ok(found)
}

/// Starts a pool for one model version: its first replica loaded and warmed (so load errors surface
/// here), the others loading in the background. Not routable until added to a [`ModelSet`].
pub async fn start_version(
    entry: &RepoEntry,
    serving: &ServingConfig,
    metrics: &Metrics,
) -> Result<ServedModel, EngineError> {
    let choice = entry.config.engine.unwrap_or(serving.models.engine);
    let options = serving.engine_options(&entry.config);
    let path = entry.path.clone();
    let (kind, engine_reason, chosen) = match choice.fixed() {
        Some(kind) => (kind, None, None),
        None => {
            let (path, options, config) = (path.clone(), options.clone(), entry.config.clone());
            let chosen = actix_rt::task::spawn_blocking(move || choose_engine(&path, &options, &config))
                .await
                .map_err(|e| EngineError::Thread { what: "engine choice", reason: e.to_string() })??;
            (chosen.engine.kind(), Some(chosen.reason), Some(chosen.engine))
        }
    };
    // The engine that won the race serves as the first replica instead of being loaded again.
    let chosen = Mutex::new(chosen);
    let factory: EngineFactory = Arc::new(move || match chosen.lock().ok().and_then(|mut c| c.take()) {
        Some(engine) => Ok(engine),
        None => engine::load(kind, &path, &options),
    });
    let version = entry.version.to_string();
    let started =
        ModelPool::start(&entry.name, &version, factory, PoolConfig::of(&entry.config), metrics.clone()).await;
    let outcome = if started.is_ok() { "loaded" } else { "failed" };
    metrics.model_loads.with_label_values(&[entry.name.as_str(), outcome]).inc();
    let pool = started?;
    if let Some(reason) = &engine_reason {
        tracing::info!(model = %entry.name, version = entry.version, engine = %kind, "engine chosen: {reason}");
    }
    let quality = crate::quality::Quality::new(&pool.metadata().outputs);
    if let Some((digest, stats)) = repository_reference(&entry.path) {
        tracing::info!(model = %entry.name, version = entry.version, rows = stats.rows, "counting drift against reference.json");
        quality.set_reference(&digest, stats);
    }
    Ok(ServedModel {
        name: entry.name.clone(),
        version: entry.version,
        engine: kind,
        engine_reason,
        config: entry.config.clone(),
        path: entry.path.clone(),
        quality: std::sync::Arc::new(quality),
        pool,
    })
}

/// The `reference.json` beside a repository's `model.onnx`, with its digest (a file the registry
/// placed, named by its digest, has none: the registry hands its reference over separately).
fn repository_reference(model: &Path) -> Option<(String, fabric_policy::drift::Reference)> {
    if model.file_name()? != "model.onnx" {
        return None;
    }
    let path = model.with_file_name("reference.json");
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(stats) => Some((fabric_proto::answers::VersionReference::digest_of(&bytes), stats)),
        Err(e) => {
            tracing::warn!("{} is not reference statistics, drift not counted: {e}", path.display());
            None
        }
    }
}

/// The engine `auto` chose for a model, loaded, and why.
struct Chosen {
    engine: Box<dyn Engine>,
    reason: String,
}

/// `engine = "auto"`: loads the model in both engines, races them on its warm-up batches and keeps
/// the faster ([`engine_choice::pick`]); the one that loads when the other cannot (ONNX Runtime's
/// library missing, an operator tract lacks). Blocking: run it off the async threads.
fn choose_engine(path: &Path, options: &EngineOptions, config: &ModelConfig) -> Result<Chosen, EngineError> {
    let tract = engine::load(EngineKind::Tract, path, options);
    let ort = engine::load(EngineKind::Ort, path, options);
    Ok(match (tract, ort) {
        (Ok(mut tract), Ok(mut ort)) => {
            let sizes = warmup_sizes_for(tract.metadata(), config.max_batch_size, config.warmup_max_bytes);
            let timings = race(&mut *tract, &mut *ort, &sizes);
            let pick = engine_choice::pick(&timings);
            let reason = engine_choice::explain(&pick, &timings);
            Chosen { engine: if pick.kind == EngineKind::Ort { ort } else { tract }, reason }
        }
        (Ok(tract), Err(e)) => Chosen { engine: tract, reason: format!("auto: tract; onnxruntime not used: {e}") },
        (Err(e), Ok(ort)) => Chosen { engine: ort, reason: format!("auto: onnxruntime; tract cannot serve it: {e}") },
        // Both failed: tract's reason (a bad file reads the same in both; a missing operator names the other engine).
        (Err(e), Err(_)) => return Err(e),
    })
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
        match start_version(entry, serving, metrics).await {
            Ok(model) => {
                let kind = model.engine;
                models.insert(model);
                loaded += 1;
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
