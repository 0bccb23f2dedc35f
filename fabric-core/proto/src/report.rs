//! The load report: what a node says about its models every heartbeat (and at the admin API's
//! `GET /v2/fabric/load`), typed end to end: the node builds it, the registry reads its fields, the
//! latency histograms in it merge across nodes.

use std::collections::BTreeMap;
use std::time::Duration;

use fabric_policy::autoscale::{LoadSample, WAIT_AT_TARGET};
use fabric_policy::histogram::LatencyHistogram;
use fabric_policy::traffic::TrafficPolicy;
use fabric_types::EngineKind;
use serde::{Deserialize, Serialize};

/// The node's load report.
#[derive(Clone, Debug, Serialize, Default, PartialEq, Deserialize)]
pub struct NodeReport {
    /// Server name (`edge-node`, `cloud-hub`).
    pub node: String,
    /// Milliseconds since the node started.
    pub uptime_ms: u64,
    /// Per model name.
    pub models: Vec<ModelReport>,
    /// Per served version.
    pub versions: Vec<VersionReport>,
}

/// One model name in the load report: its policy, shadow comparison and failed loads.
#[derive(Clone, Debug, Serialize, Default, PartialEq, Deserialize)]
pub struct ModelReport {
    /// Model name.
    pub name: String,
    /// The traffic policy (`null`: the newest version takes versionless requests).
    pub policy: Option<TrafficPolicy>,
    /// The shadow comparison so far.
    pub shadow: Option<ShadowReport>,
    /// The last load of this model that failed, if any (version: reason).
    pub last_load_error: Option<String>,
}

/// One version in the load report.
#[derive(Clone, Debug, Serialize, PartialEq, Deserialize)]
pub struct VersionReport {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// Whether it can take requests now (a replica is ready, or it is scaled to zero: a request wakes one).
    pub ready: bool,
    /// This version's share of versionless traffic under the policy, in percent.
    pub weight_pct: f64,
    /// Whether its replicas run on a GPU.
    pub on_gpu: bool,
    /// The engine serving it.
    pub engine: EngineKind,
    /// Why that engine, when `auto` chose it.
    pub engine_choice: Option<String>,
    /// Replicas wanted.
    pub target_replicas: usize,
    /// Replicas ready.
    pub ready_replicas: usize,
    /// Replicas loading.
    pub loading_replicas: usize,
    /// Replicas running a batch now.
    pub busy_replicas: usize,
    /// Requests queued.
    pub queue_depth: usize,
    /// Requests routed to it and not answered yet.
    pub in_flight: i64,
    /// Replicas replaced after a failure since it loaded.
    pub restarts: u64,
    /// Why its last replica load failed, while it is short of replicas.
    pub last_load_error: Option<String>,
    /// The last measured time to load and warm a replica, in milliseconds (the wait after scale to zero).
    pub cold_start_ms: Option<f64>,
    /// GPU memory one replica holds, MiB, measured at load (on a GPU only).
    #[serde(default)]
    pub gpu_memory_mib: Option<u64>,
    /// Replicas worth running on one GPU, measured at load by throughput at 1, 2, 3 streams and
    /// capped by memory (on a GPU only; autoscaling stays within it).
    #[serde(default)]
    pub replicas_per_gpu: Option<usize>,
    /// Its inputs and predictions counted into its reference's bins, when it has a reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftReport>,
    /// Labels received as feedback on its answers, when any came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<FeedbackReport>,
    /// Rates and latencies over the last few seconds.
    #[serde(flatten)]
    pub window: WindowReport,
    /// The same over the last 0.5-0.75 s (what autoscaling reads).
    pub recent: WindowReport,
}

/// Rates and percentiles over the report's window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowReport {
    /// Length of the window the rates are over, in milliseconds.
    pub window_ms: u64,
    /// Requests that arrived, per second.
    pub arrivals_per_s: f64,
    /// Requests answered with outputs computed here, per second.
    pub served_per_s: f64,
    /// Requests answered with outputs from a hub, per second.
    pub offloaded_per_s: f64,
    /// Requests answered with an error, per second, by kind.
    pub rejected_per_s: BTreeMap<String, f64>,
    /// Median time from arrival to answer of the answered requests, in milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile of the same, in milliseconds.
    pub p99_ms: Option<f64>,
    /// Share of replica time spent running batches (0..=1), given the replica count.
    pub utilisation: f64,
    /// Answered requests in the window (the count behind the percentiles).
    pub answered: u64,
    /// Their latencies, from arrival to answer (what the percentiles are read from; merges across
    /// nodes).
    #[serde(default, skip_serializing_if = "LatencyHistogram::is_empty")]
    pub latency: LatencyHistogram,
}

/// A version's live counts for drift, over its current and previous drift window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DriftReport {
    /// Digest of the reference the counts are binned by.
    pub reference: String,
    /// Length of one drift window, in seconds.
    pub window_s: u64,
    /// The counts.
    pub counts: fabric_policy::drift::DriftCounts,
}

/// Feedback on a version's answers: the labels that came for requests it answered, over its
/// current and previous drift window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedbackReport {
    /// Rows labelled.
    pub labelled: u64,
    /// Of those, rows whose predicted class was the label.
    pub correct: u64,
}

impl FeedbackReport {
    /// correct / labelled in percent (`None` before the first label).
    pub fn accuracy_pct(&self) -> Option<f64> {
        (self.labelled > 0).then(|| self.correct as f64 * 100.0 / self.labelled as f64)
    }
}

/// The shadow statistics as reported.
#[derive(Clone, Debug, PartialEq, Serialize, Default, Deserialize)]
pub struct ShadowReport {
    /// The shadow version.
    pub version: u64,
    /// Copies whose outputs were compared with the primary's.
    pub compared: u64,
    /// Of those, how many agreed.
    pub agreed: u64,
    /// agreed / compared, in percent (`null` before the first comparison).
    pub agreement_pct: Option<f64>,
    /// Copies the shadow version failed to answer (refused, late, engine error).
    pub shadow_failed: u64,
    /// Copies not compared because the primary failed.
    pub primary_failed: u64,
}

impl VersionReport {
    /// What the autoscaler reads of this version at `at`: its short window (`recent`), else the
    /// longer one.
    pub fn load_sample(&self, at: Duration) -> LoadSample {
        let window = if self.recent.window_ms > 0 { &self.recent } else { &self.window };
        LoadSample {
            at,
            arrivals_per_s: window.arrivals_per_s,
            served_per_s: window.served_per_s,
            utilisation: window.utilisation,
            replicas: self.ready_replicas,
            queued: self.queue_depth,
            wait_at_target: WAIT_AT_TARGET.iter().any(|k| window.rejected_per_s.get(*k).is_some_and(|r| *r > 0.0)),
        }
    }

    /// Requests answered per second (with outputs, here or by a hub, or with an error).
    pub fn answered_per_s(&self) -> f64 {
        self.window.served_per_s + self.window.offloaded_per_s + self.rejected_per_s()
    }

    /// Requests answered with an error per second, all kinds.
    pub fn rejected_per_s(&self) -> f64 {
        self.window.rejected_per_s.values().sum()
    }
}

impl NodeReport {
    /// The report of one version, if the node serves it.
    pub fn version(&self, name: &str, version: u64) -> Option<&VersionReport> {
        self.versions.iter().find(|v| v.name == name && v.version == version)
    }
}
