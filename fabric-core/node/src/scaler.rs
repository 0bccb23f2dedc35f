//! Node-local autoscaling: a node without a registry sizes each model version's pool to its load and
//! cores with the same pure policy the registry will apply ([`policy::autoscale`]), so the default is
//! never the slow choice. Every `interval` it reads the node's load report, asks each version's
//! [`Autoscaler`], and resizes through [`NodeControl`] (in place: shrinking retires idle replicas first).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::control::NodeControl;
use fabric_policy::autoscale::{AutoscaleSettings, Autoscaler, LoadSample};

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

/// Starts the node's autoscaler on a thread of its own.
pub fn start(control: Arc<NodeControl>, config: &AutoscaleConfig) -> std::io::Result<()> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let settings = config.settings(cores);
    let interval = Duration::from_millis(config.interval_ms.max(100));
    let io = fabric_proto::io_thread::spawn("autoscaler")?;
    tracing::info!(
        min = settings.min_replicas,
        max = settings.max_replicas,
        target = settings.target_utilisation,
        "autoscaling the pools to their load"
    );
    io.spawn(run(control, settings, interval));
    Ok(())
}

async fn run(control: Arc<NodeControl>, settings: AutoscaleSettings, interval: Duration) {
    let origin = Instant::now();
    let mut scalers: BTreeMap<(String, u64), Autoscaler> = BTreeMap::new();
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let report = control.report().await;
        scalers.retain(|(name, version), _| report.versions.iter().any(|v| &v.name == name && v.version == *version));
        for v in &report.versions {
            // A version that is still loading replicas, or failing to, is left alone.
            let asleep = v.target_replicas == 0;
            if v.loading_replicas > 0 || v.last_load_error.is_some() || (asleep && settings.idle_to_zero_s <= 0.0) {
                continue;
            }
            let sample = LoadSample::from_report(&serde_json::to_value(v).unwrap_or_default(), origin.elapsed());
            let scaler = scalers
                .entry((v.name.clone(), v.version))
                .or_insert_with(|| Autoscaler::new(settings.for_device(v.on_gpu)));
            let decision = scaler.decide(&sample, v.target_replicas);
            if decision.replicas == v.target_replicas {
                continue;
            }
            tracing::info!(model = %v.name, version = v.version, from = v.target_replicas, to = decision.replicas,
                "autoscaling: {}", decision.reason);
            let change = serde_json::json!({ "replicas": decision.replicas });
            if let Err(e) = control.reconfigure(&v.name, v.version, &change).await {
                tracing::warn!(model = %v.name, version = v.version, "autoscaling to {} replicas failed: {e}", decision.replicas);
            }
        }
    }
}
