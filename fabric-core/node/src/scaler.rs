//! Node-local autoscaling: a node without a registry sizes each model version's pool to its load and
//! cores with the same pure policy the registry will apply ([`policy::autoscale`]), so the default is
//! never the slow choice. Every `interval` it reads the node's load report, asks each version's
//! [`Autoscaler`], and resizes through [`NodeControl`] (in place: shrinking retires idle replicas first).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::AutoscaleConfig;
use crate::control::NodeControl;
use fabric_policy::autoscale::{AutoscaleSettings, Autoscaler};

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
            let sample = v.load_sample(origin.elapsed());
            let scaler = scalers
                .entry((v.name.clone(), v.version))
                .or_insert_with(|| Autoscaler::new(settings.for_device(v.on_gpu, v.replicas_per_gpu)));
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
