//! Configuration shared by the serving roles (edge-node, cloud-hub): HTTP, model repository, per-model
//! serving settings, ONNX Runtime. Every key has a default, so an empty file is a valid config.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use fabric_engine::{EngineChoice, EngineOptions, OrtOptions};
use fabric_policy::autoscale::AutoscaleSettings;

/// HTTP (KServe v2) server settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on; port 0 picks a free port (printed at start).
    pub addr: String,
    /// Largest request body accepted, in bytes; larger bodies get 413 before being read.
    pub max_body_bytes: usize,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// Seconds to finish in-flight requests after SIGTERM.
    pub shutdown_timeout_s: u64,
    /// Milliseconds a request body may take to arrive before the request is answered 408.
    pub body_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: "127.0.0.1:8000".into(),
            max_body_bytes: 64 << 20,
            workers: 0,
            shutdown_timeout_s: 10,
            body_timeout_ms: 30_000,
        }
    }
}

/// KServe v2 over gRPC (`inference.GRPCInferenceService`): a listener of its own beside the HTTP one,
/// off by default.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// Whether to serve it (`--grpc-addr` turns it on).
    pub enabled: bool,
    /// Address to listen on; port 0 picks a free port (printed at start).
    pub addr: String,
    /// Largest request message accepted, in bytes; larger ones get OUT_OF_RANGE unread.
    pub max_message_bytes: usize,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig { enabled: false, addr: "127.0.0.1:8002".into(), max_message_bytes: 64 << 20 }
    }
}

/// TLS on the node's HTTP and gRPC ports (rustls): on when `cert` and `key` are set; with
/// `client_ca`, mutual TLS, and a client certificate of the fabric's `operator` role may call the
/// repository API without the admin token.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PortTlsConfig {
    /// The server's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// CA whose client certificates are required (PEM); unset: clients need none.
    pub client_ca: Option<PathBuf>,
}

impl PortTlsConfig {
    /// The certificate and key, when TLS is on; one without the other is an error.
    pub fn files(&self) -> Result<Option<(&Path, &Path)>, String> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some((c.as_path(), k.as_path()))),
            (None, None) if self.client_ca.is_none() => Ok(None),
            _ => Err("tls: set both tls.cert and tls.key (and tls.client_ca for mutual TLS)".into()),
        }
    }
}

/// Client API keys: who may call the inference API, on which models, how fast. With no key listed the
/// API is open (as before); with one, every inference and model call must present a listed key.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientsConfig {
    /// The keys, each `[[clients.keys]]`.
    pub keys: Vec<ClientKeyConfig>,
}

/// One client's key (kept only as its SHA-256 digest) and what it may do.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientKeyConfig {
    /// The client's name, as metrics and logs show it.
    pub name: String,
    /// SHA-256 of the key, hex (`printf %s "$KEY" | sha256sum`): the key itself is never stored.
    pub sha256: String,
    /// Models the key may call; empty: every model.
    pub models: Vec<String>,
    /// Requests per second on average; unset: no rate limit.
    pub rate_per_s: Option<f64>,
    /// Requests allowed at once above that rate (the bucket); unset: one second's worth.
    pub burst: Option<f64>,
    /// Requests in flight at once; unset: no limit.
    pub max_in_flight: Option<usize>,
    /// The priority of this client's requests that name none (1 most urgent, 9 least); unset: the
    /// model's `default_priority`.
    pub priority: Option<u8>,
}

/// The admin API (`/v2/fabric/...`: traffic policies, pool settings, the load report): a listener of
/// its own, off by default and on 127.0.0.1 when on.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Whether to serve it.
    pub enabled: bool,
    /// Address to listen on (keep it on 127.0.0.1 unless a proxy with TLS fronts it).
    pub addr: String,
    /// Bearer token that mutating calls must present (`Authorization: Bearer <token>`); or set
    /// `token_file`, or the FABRIC_ADMIN_TOKEN environment variable. Required when enabled.
    pub token: Option<String>,
    /// File holding the token (its first line).
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { enabled: false, addr: "127.0.0.1:8001".into(), token: None, token_file: None }
    }
}

impl AdminConfig {
    /// The token mutating calls need: `token`, else the first line of `token_file`, else
    /// FABRIC_ADMIN_TOKEN.
    pub fn resolve_token(&self) -> Result<String, String> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| format!("admin.token_file {}: {e}", file.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
            (None, None) => std::env::var("FABRIC_ADMIN_TOKEN").unwrap_or_default(),
        };
        let token = token.trim().to_string();
        if token.len() < 16 {
            return Err("the admin API needs a token of at least 16 characters: set admin.token, admin.token_file or FABRIC_ADMIN_TOKEN (e.g. `openssl rand -hex 16`)".into());
        }
        Ok(token)
    }
}

/// Serving settings of one model; defaults for all, overridable in `<repo>/<model>/config.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Most rows per batch (also the largest batch one request may carry).
    pub max_batch_size: usize,
    /// Microseconds the oldest request may wait for a batch to fill while replicas are busy.
    pub max_queue_delay_us: u64,
    /// Most requests waiting in the queue before new ones get 503.
    pub queue_capacity: usize,
    /// Engine instances (one thread each).
    pub replicas: usize,
    /// Deadline of a request that sets none (`timeout` parameter), in milliseconds.
    pub default_timeout_ms: u64,
    /// Engine for this model (`auto`, `tract` or `ort`); the repository's engine when unset.
    pub engine: Option<EngineChoice>,
    /// Longest one engine call may run before its batch fails and the replica is replaced, in
    /// milliseconds; 0: ten times the measured time of that batch size, at least one second.
    pub watchdog_ms: u64,
    /// With a hub: serve here only while the expected queueing delay stays under this share of the
    /// request's deadline, in percent; beyond it, offload.
    pub local_wait_pct: u32,
    /// Admit a request only if its expected finish leaves this share of its deadline free, in percent
    /// (headroom for a loaded machine's scheduling noise); beyond it, refuse at once (or offload).
    pub deadline_margin_pct: u32,
    /// Without a hub: admit only while the expected queueing wait is under this share of the
    /// deadline (at least two batch rounds); 100 turns the target off.
    pub queue_wait_pct: u32,
    /// The priority of a request that names none (the v2 `priority` parameter): 1 is the most
    /// urgent, 9 the least.
    pub default_priority: u8,
    /// Most input bytes one warm-up batch may allocate; larger batch sizes are not timed at load (they
    /// are estimated from smaller ones), so loading a model with large inputs stays within memory.
    pub warmup_max_bytes: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            max_batch_size: 32,
            max_queue_delay_us: 500,
            queue_capacity: 1024,
            replicas: 1,
            default_timeout_ms: 1000,
            engine: None,
            watchdog_ms: 0,
            local_wait_pct: 25,
            deadline_margin_pct: 25,
            queue_wait_pct: 25,
            default_priority: 5,
            warmup_max_bytes: 64 << 20,
        }
    }
}

impl ModelConfig {
    /// The default request deadline.
    pub fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.default_timeout_ms)
    }
}

/// Keys of a Triton model configuration that describe the model itself (taken from the ONNX file here):
/// accepted in a load's config override and ignored.
const TRITON_DESCRIPTIVE_KEYS: &[&str] = &["name", "platform", "backend", "input", "output", "version_policy"];

/// Applies a JSON override (a load's `config` parameter, or an admin reconfigure) on top of `base`.
///
/// Takes this config's own keys (`replicas`, `queue_capacity`, ...) and Triton's names for the same
/// settings: `instance_group[*].count` (summed) for `replicas`, `dynamic_batching.max_queue_delay_microseconds`
/// for `max_queue_delay_us`; Triton's descriptive keys (`name`, `input`, ...) are ignored, anything
/// else is refused by name.
pub fn model_config_with_json(base: &ModelConfig, overrides: &serde_json::Value) -> Result<ModelConfig, String> {
    let serde_json::Value::Object(overrides) = overrides else {
        return Err(format!("the config override must be a JSON object, got {overrides}"));
    };
    let mut merged = serde_json::to_value(base).map_err(|e| e.to_string())?;
    let Some(fields) = merged.as_object_mut() else {
        return Err("model config is not an object".into());
    };
    for (key, value) in overrides {
        match key.as_str() {
            "instance_group" => {
                let groups = value.as_array().ok_or("instance_group must be a list")?;
                let count: u64 = groups.iter().map(|g| g.get("count").and_then(|c| c.as_u64()).unwrap_or(1)).sum();
                fields.insert("replicas".into(), count.into());
            }
            "dynamic_batching" => {
                if let Some(delay) = value.get("max_queue_delay_microseconds") {
                    fields.insert("max_queue_delay_us".into(), delay.clone());
                }
            }
            k if TRITON_DESCRIPTIVE_KEYS.contains(&k) => {}
            _ => {
                fields.insert(key.clone(), value.clone());
            }
        }
    }
    serde_json::from_value(merged).map_err(|e| format!("invalid config override: {e}"))
}

/// Where models come from and which engine runs them.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepositoryConfig {
    /// Folder in Triton's layout: `<path>/<model>/<version>/model.onnx`.
    pub path: PathBuf,
    /// Engine for every model without its own `engine` setting: `auto` (the faster of the two on
    /// each model's warm-up batches, tract where ONNX Runtime does not load), `tract` or `ort`.
    pub engine: EngineChoice,
    /// Refuse to start when any model fails to load (Triton's `--exit-on-error`), instead of serving
    /// the others and reporting the failure in the model's `/ready` and the repository index.
    pub strict: bool,
    /// `none`: serve what the repository holds at start; `explicit`: also load and unload models while
    /// serving through the repository API (`POST /v2/repository/models/<m>/load`, Triton's
    /// `--model-control-mode=explicit`).
    pub control: ModelControl,
    /// Where model files handed over in a load request are kept while they serve; default: a folder
    /// in the system's temporary directory.
    pub staging_path: Option<PathBuf>,
}

/// Whether the repository API may load and unload models (Triton's model control modes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelControl {
    /// The repository is loaded at start; load and unload requests are refused.
    #[default]
    None,
    /// Load and unload requests are carried out.
    Explicit,
}

impl Default for RepositoryConfig {
    fn default() -> Self {
        RepositoryConfig {
            path: PathBuf::from("models"),
            engine: EngineChoice::Auto,
            strict: false,
            control: ModelControl::None,
            staging_path: None,
        }
    }
}

/// Everything a serving role needs to serve models over HTTP: the keys edge.toml and hub.toml share
/// (each flattens it into its own config, beside its role's keys).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ServingConfig {
    /// HTTP server.
    pub http: HttpConfig,
    /// gRPC server.
    pub grpc: GrpcConfig,
    /// Client API keys and quotas.
    pub clients: ClientsConfig,
    /// TLS on the HTTP and gRPC ports.
    pub tls: PortTlsConfig,
    /// Model repository.
    pub models: RepositoryConfig,
    /// Defaults for every model.
    pub model_defaults: ModelConfig,
    /// ONNX Runtime (used by models served with the `ort` engine).
    pub ort: OrtOptions,
    /// The admin API.
    pub admin: AdminConfig,
    /// The model registry this node takes its desired state from.
    pub registry: AgentConfig,
    /// Sizing the pools to their load when no registry manages the node.
    pub autoscale: AutoscaleConfig,
    /// Cascades by the small model's name (`[cascade.NAME]`): what it is not confident about goes to
    /// a bigger model on the hubs (edges).
    pub cascade: std::collections::BTreeMap<String, fabric_policy::cascade::Cascade>,
}

impl ServingConfig {
    /// The engine options for a model with these settings.
    pub fn engine_options(&self, model: &ModelConfig) -> EngineOptions {
        EngineOptions { max_batch_size: model.max_batch_size.max(1), ort: self.ort.clone() }
    }
}

/// Why a config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// The file is not valid TOML for this config.
    #[error("invalid config {path}: {source}")]
    Parse { path: String, source: toml::de::Error },
    /// A top-level key the config does not have.
    #[error("invalid config {path}: unknown key `{key}` (the keys are {expected})")]
    UnknownKey { path: String, key: String, expected: String },
}

/// Reads a role's config file over the role's defaults (keys it sets win, table by table: a hub's
/// file that sets only `[http]` keeps the hub's engine and autoscaling defaults), refusing top-level
/// keys it does not have. (serde cannot deny unknown fields of a struct that flattens another, so the
/// top level is checked against the keys of the default config; the tables below deny their own
/// unknown keys.)
pub fn load_role_config<T>(path: &Path) -> Result<T, ConfigError>
where
    T: serde::de::DeserializeOwned + Serialize + Default,
{
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.display().to_string(), source })?;
    let known = toml::Table::try_from(T::default()).unwrap_or_default();
    if let Some(key) = table.keys().find(|k| !known.contains_key(k.as_str())) {
        let expected: Vec<&str> = known.keys().map(String::as_str).collect();
        return Err(ConfigError::UnknownKey {
            path: path.display().to_string(),
            key: key.clone(),
            expected: expected.join(", "),
        });
    }
    let mut merged = known;
    merge_tables(&mut merged, table);
    merged.try_into().map_err(|source| ConfigError::Parse { path: path.display().to_string(), source })
}

/// Puts `over` on top of `base`: tables merge key by key, anything else replaces.
fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(below)), toml::Value::Table(above)) => merge_tables(below, above),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Checks a configuration reference (a Markdown page whose tables list keys as `` | `a.b` | ``)
/// against a role's config type `T`: returns each key `T` has that the sections named in `sections`
/// do not document, and each documented key `T` does not accept. Empty: the page and the code agree.
pub fn reference_mismatches<T>(reference: &str, sections: &[&str]) -> Vec<String>
where
    T: serde::de::DeserializeOwned + Serialize + Default,
{
    let mut documented = Vec::new();
    let mut in_section = false;
    for line in reference.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            in_section = sections.contains(&heading.trim());
        } else if in_section {
            if let Some(key) = line.strip_prefix("| `").and_then(|rest| rest.split('`').next()) {
                documented.push(key.to_string());
            }
        }
    }
    let mut have = Vec::new();
    if let Ok(table) = toml::Table::try_from(T::default()) {
        leaf_keys(&table, "", &mut have);
    }
    let mut problems: Vec<String> =
        have.iter().filter(|k| !documented.contains(k)).map(|k| format!("undocumented key `{k}`")).collect();
    for key in documented.iter().filter(|k| !have.contains(k)) {
        // A key without a default (certificates, tokens): the parser must know it. A value of the wrong
        // type is fine here; an unknown key is not.
        let text = format!("{key} = \"x\"\n");
        let unknown = match toml::from_str::<toml::Table>(&text) {
            Ok(table) => {
                let known = toml::Table::try_from(T::default()).unwrap_or_default();
                let top = table.keys().next().cloned().unwrap_or_default();
                let mut merged = known.clone();
                merge_tables(&mut merged, table);
                !known.contains_key(&top)
                    || merged.try_into::<T>().is_err_and(|e| e.to_string().contains("unknown field"))
            }
            Err(_) => true,
        };
        if unknown {
            problems.push(format!("documented key `{key}` does not exist"));
        }
    }
    problems
}

/// The dotted paths of every value in `table` (an empty table counts as a value).
fn leaf_keys(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (key, value) in table {
        let path = format!("{prefix}{key}");
        match value {
            toml::Value::Table(inner) if !inner.is_empty() => leaf_keys(inner, &format!("{path}."), out),
            _ => out.push(path),
        }
    }
}

/// Applies a per-model TOML file on top of the defaults (keys it sets win).
pub fn model_config_with_overrides(defaults: &ModelConfig, path: &Path) -> Result<ModelConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    let parse = |source| ConfigError::Parse { path: path.display().to_string(), source };
    let overrides: toml::Table = toml::from_str(&text).map_err(parse)?;
    let mut merged = toml::Table::try_from(defaults).unwrap_or_default();
    merged.extend(overrides);
    merged.try_into().map_err(parse)
}

/// The `[registry]` settings of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The registry as `[NAME@]HOST:PORT` (a replicated one: its replicas, comma-separated); unset: the
    /// node serves its repository only.
    pub addr: Option<String>,
    /// Where the node keeps the model files it fetched and its last desired state.
    pub data_dir: PathBuf,
    /// Labels deployments select nodes by (`site = "berlin"`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Longest the registry may hold a heartbeat's answer, in milliseconds (the node reports at least
    /// this often while it serves traffic or is in a rollout under analysis).
    pub heartbeat_ms: u64,
    /// Longest the registry may hold it while the node is idle, in milliseconds (the node still
    /// reports at once when its load changes).
    pub idle_heartbeat_ms: u64,
    /// Most MiB of model files kept in `<data_dir>/models`: the versions the node serves always stay,
    /// then the most recently used; the oldest go first.
    pub cache_budget_mib: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            addr: None,
            data_dir: PathBuf::from("fabric-data"),
            labels: Default::default(),
            heartbeat_ms: 500,
            idle_heartbeat_ms: 10_000,
            cache_budget_mib: 4096,
        }
    }
}

/// The `[autoscale]` settings of a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoscaleConfig {
    /// Whether the node sizes its pools itself (off when a registry manages the node).
    pub enabled: bool,
    /// Fewest replicas per model version.
    pub min_replicas: usize,
    /// Most replicas per model version; 0: the machine's cores.
    pub max_replicas: usize,
    /// Utilisation to keep each replica at, 0-1.
    pub target_utilisation: f64,
    /// Seconds more replicas must be needed before scaling up (a step scales at once).
    pub up_delay_s: f64,
    /// Seconds after the last change, and of lower load, before scaling down.
    pub down_delay_s: f64,
    /// Scale down only if the smaller count stays this share under the target.
    pub hysteresis: f64,
    /// Seconds without a request before a version goes to zero replicas (0: never; hubs: 300).
    /// A request that arrives then is held while a replica loads, or refused at once (503) if its
    /// deadline cannot wait for it.
    pub idle_to_zero_s: f64,
    /// Milliseconds between decisions.
    pub interval_ms: u64,
}

impl Default for AutoscaleConfig {
    fn default() -> Self {
        let policy = AutoscaleSettings::default();
        AutoscaleConfig {
            enabled: true,
            min_replicas: policy.min_replicas,
            max_replicas: 0,
            target_utilisation: policy.target_utilisation,
            up_delay_s: policy.up_delay_s,
            down_delay_s: policy.down_delay_s,
            hysteresis: policy.hysteresis,
            idle_to_zero_s: policy.idle_to_zero_s,
            interval_ms: 250,
        }
    }
}

impl AutoscaleConfig {
    /// The policy settings, `max_replicas` 0 meaning `cores`.
    pub fn settings(&self, cores: usize) -> AutoscaleSettings {
        AutoscaleSettings {
            min_replicas: self.min_replicas.max(1),
            max_replicas: if self.max_replicas == 0 { cores.max(1) } else { self.max_replicas },
            target_utilisation: self.target_utilisation,
            up_delay_s: self.up_delay_s,
            down_delay_s: self.down_delay_s,
            hysteresis: self.hysteresis,
            idle_to_zero_s: self.idle_to_zero_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults_and_overrides_merge() -> Result<(), Box<dyn std::error::Error>> {
        let cfg: ServingConfig = toml::from_str("")?;
        assert_eq!(cfg.http.max_body_bytes, 64 << 20);
        assert_eq!(cfg.model_defaults, ModelConfig::default());
        let dir = std::env::temp_dir().join(format!("fabric-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("config.toml");
        std::fs::write(&file, "max_batch_size = 8\nengine = \"ort\"\n")?;
        let merged = model_config_with_overrides(&ModelConfig::default(), &file)?;
        assert_eq!((merged.max_batch_size, merged.engine, merged.replicas), (8, Some(EngineChoice::Ort), 1));
        std::fs::write(&file, "max_batch = 8\n")?;
        let err = model_config_with_overrides(&ModelConfig::default(), &file).map(|_| ()).expect_err("unknown key");
        assert!(err.to_string().contains("unknown field `max_batch`"), "{err}");
        // A role's config: top-level typos are refused by name, nested ones by their table.
        std::fs::write(&file, "[http]\nworkers = 2\n[modles]\npath = \"x\"\n")?;
        let err = load_role_config::<ServingConfig>(&file).map(|_| ()).expect_err("unknown key");
        assert!(
            err.to_string().contains(
                "unknown key `modles` (the keys are admin, autoscale, cascade, clients, grpc, http, model_defaults, models, ort, registry, tls)"
            ),
            "{err}"
        );
        std::fs::write(&file, "[http]\nworkerz = 2\n")?;
        let err = load_role_config::<ServingConfig>(&file).map(|_| ()).expect_err("unknown nested key");
        assert!(err.to_string().contains("unknown field `workerz`"), "{err}");
        std::fs::write(&file, "[http]\nworkers = 2\n")?;
        assert_eq!(load_role_config::<ServingConfig>(&file)?.http.workers, 2);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn json_overrides_take_our_keys_and_tritons() {
        let base = ModelConfig::default();
        let cases: &[(&str, Result<(usize, usize, u64, usize), &str>)] = &[
            (r#"{}"#, Ok((32, 1, 500, 1024))),
            (r#"{"max_batch_size": 8, "replicas": 3}"#, Ok((8, 3, 500, 1024))),
            (r#"{"instance_group": [{"count": 2, "kind": "KIND_CPU"}, {"count": 1}]}"#, Ok((32, 3, 500, 1024))),
            (
                r#"{"dynamic_batching": {"max_queue_delay_microseconds": 100}, "queue_capacity": 9}"#,
                Ok((32, 1, 100, 9)),
            ),
            (
                r#"{"name": "mlp", "platform": "onnxruntime_onnx", "input": [], "max_batch_size": 4}"#,
                Ok((4, 1, 500, 1024)),
            ),
            (r#"{"max_batch": 8}"#, Err("unknown field `max_batch`")),
            (r#"{"replicas": "two"}"#, Err("invalid type")),
            (r#"[1]"#, Err("must be a JSON object")),
        ];
        for (json, want) in cases {
            let value: serde_json::Value = serde_json::from_str(json).expect("test JSON");
            let got = model_config_with_json(&base, &value)
                .map(|c| (c.max_batch_size, c.replicas, c.max_queue_delay_us, c.queue_capacity));
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(&got, want, "{json}"),
                (Err(e), Err(part)) => assert!(e.contains(part), "{json}: {e}"),
                (got, want) => panic!("{json}: got {got:?}, want {want:?}"),
            }
        }
    }
}
