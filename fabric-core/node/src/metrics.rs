//! Prometheus metrics of a serving process, per model and version, in a registry of its own
//! (so several servers in one test process never collide).

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// One metric a serving process exports, as the metrics reference (docs/metrics.md) lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricDefinition {
    /// Full name (`fabric_requests_total`).
    pub name: String,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
    /// Label names.
    pub labels: Vec<String>,
    /// What it means.
    pub help: String,
}

/// Every metric a serving process exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    prefix: String,
    definitions: Vec<MetricDefinition>,
    /// Inference requests received, by model, version and outcome (ok, or the error kind).
    pub requests: IntCounterVec,
    /// Where requests went: local, offload or rejected (admission's decision).
    pub routes: IntCounterVec,
    /// Requests waiting in a model's queue.
    pub queue_depth: IntGaugeVec,
    /// Replicas serving a model.
    pub replicas: IntGaugeVec,
    /// GPU memory one replica of a version holds, MiB, measured at load (GPU versions only).
    pub gpu_memory: IntGaugeVec,
    /// Replicas worth running on one GPU, measured at load (GPU versions only; autoscaling's cap).
    pub replicas_per_gpu: IntGaugeVec,
    /// Rows per batch handed to a replica.
    pub batch_size: HistogramVec,
    /// Time from arrival to answer, in seconds.
    pub request_duration: HistogramVec,
    /// Seconds from arrival to answer summed over the requests answered with outputs (the gRPC
    /// face's model statistics read it).
    pub request_success: CounterVec,
    /// Time a request waited in the queue, in seconds.
    pub queue_duration: HistogramVec,
    /// Time a replica took per batch, in seconds.
    pub compute_duration: HistogramVec,
    /// Model version loads carried out (at start and live), by model and outcome (loaded, failed).
    pub model_loads: IntCounterVec,
    /// An edge's hubs: 1 while it offloads to the hub (connected, not marked down by the registry).
    pub hub_usable: IntGaugeVec,
    /// An edge's offload attempts by hub and outcome (served, busy, failed).
    pub offload_attempts: IntCounterVec,
    /// Offload requests sent to each hub and not yet answered, by hub.
    pub offload_in_flight: IntGaugeVec,
    /// An edge's measured round trip to each hub, in seconds (QUIC's estimate).
    pub hub_rtt: GaugeVec,
    /// An edge's uplink rate to each hub as its transfers showed it, in bytes a second (absent until a
    /// transfer took long enough to show it).
    pub hub_uplink_rate: GaugeVec,
    /// Client-key checks by client and outcome (admitted, or why refused).
    pub client_requests: IntCounterVec,
    /// Inference requests by model, priority and outcome.
    pub priority_requests: IntCounterVec,
    /// Requests a cascade's small model answered here, by model and outcome (small, escalated, fallback).
    pub cascades: IntCounterVec,
    /// Rows labelled by feedback, by model, version and outcome (correct, wrong).
    pub feedback_labels: IntCounterVec,
    /// Feedback for request ids with no prediction kept (unknown, forgotten, labelled already), by model.
    pub feedback_unknown: IntCounterVec,
    /// Time a request waited in the queue, by model, version and priority, in seconds.
    pub priority_queue_duration: HistogramVec,
}

const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

impl Metrics {
    /// Creates the metrics in a fresh registry; metric names start with `prefix` (e.g. `fabric`).
    pub fn new(prefix: &str) -> Metrics {
        let registry = Registry::new();
        let mv = &["model", "version"];
        let definitions = std::cell::RefCell::new(Vec::new());
        let define = |name: &str, kind: &'static str, labels: &[&str], help: &str| {
            definitions.borrow_mut().push(MetricDefinition {
                name: format!("{prefix}_{name}"),
                kind,
                labels: labels.iter().map(|l| l.to_string()).collect(),
                help: help.to_string(),
            });
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            define(name, "counter", labels, help);
            let c = IntCounterVec::new(Opts::new(format!("{prefix}_{name}"), help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            define(name, "gauge", labels, help);
            let g = IntGaugeVec::new(Opts::new(format!("{prefix}_{name}"), help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let float_gauge = |name: &str, help: &str, labels: &[&str]| {
            define(name, "gauge", labels, help);
            let g = GaugeVec::new(Opts::new(format!("{prefix}_{name}"), help), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let histogram_by = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            define(name, "histogram", labels, help);
            let opts = HistogramOpts::new(format!("{prefix}_{name}"), help).buckets(buckets.to_vec());
            let h = HistogramVec::new(opts, labels).expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| histogram_by(name, help, buckets, mv);
        Metrics {
            requests: counter(
                "requests_total",
                "Inference requests by model, version and outcome",
                &["model", "version", "outcome"],
            ),
            routes: counter(
                "routed_total",
                "Admission decisions by model, version and route",
                &["model", "version", "route"],
            ),
            request_success: {
                let name = "request_success_seconds_total";
                let help = "Seconds from arrival to answer, summed over the requests answered with outputs";
                define(name, "counter", mv, help);
                let c = CounterVec::new(Opts::new(format!("{prefix}_{name}"), help), mv).expect("valid metric");
                registry.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            queue_depth: gauge("queue_depth", "Requests waiting in the model's queue", mv),
            replicas: gauge("replicas", "Replicas serving the model", mv),
            gpu_memory: gauge("gpu_memory_mib", "GPU memory one replica holds, MiB, measured at load", mv),
            replicas_per_gpu: gauge(
                "replicas_per_gpu",
                "Replicas worth running on one GPU, measured at load (throughput at 1-3 streams, capped by memory)",
                mv,
            ),
            batch_size: histogram("batch_size", "Rows per batch run by a replica", BATCH_BUCKETS),
            request_duration: histogram("request_duration_seconds", "Time from arrival to answer", LATENCY_BUCKETS),
            queue_duration: histogram("queue_duration_seconds", "Time waiting in the queue", LATENCY_BUCKETS),
            compute_duration: histogram("compute_duration_seconds", "Time a replica took per batch", LATENCY_BUCKETS),
            model_loads: counter(
                "model_loads_total",
                "Model version loads by model and outcome",
                &["model", "outcome"],
            ),
            hub_usable: gauge(
                "hub_usable",
                "1 while this edge offloads to the hub (connected, not marked down)",
                &["hub"],
            ),
            offload_attempts: counter(
                "offload_attempts_total",
                "Offload attempts by hub and outcome (served, busy, failed, link_too_slow)",
                &["hub", "outcome"],
            ),
            offload_in_flight: gauge(
                "offload_in_flight",
                "Offload requests sent to the hub and not yet answered or given up",
                &["hub"],
            ),
            hub_rtt: float_gauge("hub_rtt_seconds", "Round trip to the hub (QUIC's estimate), in seconds", &["hub"]),
            hub_uplink_rate: float_gauge(
                "hub_uplink_bytes_per_second",
                "Uplink rate to the hub as this edge's transfers showed it, in bytes a second",
                &["hub"],
            ),
            cascades: counter(
                "cascade_total",
                "Requests a cascade's small model answered here, by outcome: small (confident), escalated (the big model on a hub answered), fallback (not confident, no hub answered in time)",
                &["model", "outcome"],
            ),
            feedback_labels: counter(
                "feedback_labels_total",
                "Rows labelled by feedback, by model, version and outcome (correct: the label is the class the version answered)",
                &["model", "version", "outcome"],
            ),
            feedback_unknown: counter(
                "feedback_unknown_total",
                "Feedback for request ids with no prediction kept (unknown, forgotten, or labelled already)",
                &["model"],
            ),
            priority_requests: counter(
                "priority_requests_total",
                "Inference requests by model, priority (1 most urgent) and outcome",
                &["model", "priority", "outcome"],
            ),
            priority_queue_duration: histogram_by(
                "priority_queue_duration_seconds",
                "Time waiting in the queue, by priority (1 most urgent)",
                LATENCY_BUCKETS,
                &["model", "version", "priority"],
            ),
            client_requests: counter(
                "client_requests_total",
                "Client-key checks by client and outcome (admitted, unauthenticated, forbidden, rate_limited, concurrency_limited)",
                &["client", "outcome"],
            ),
            registry,
            prefix: prefix.to_string(),
            definitions: definitions.take(),
        }
    }

    /// What every metric is: name, kind, labels, meaning (the metrics reference is checked against it).
    pub fn definitions(&self) -> &[MetricDefinition] {
        &self.definitions
    }

    /// Drops every series of one model version (after an unload), so /metrics stops showing it.
    pub fn remove_version(&self, model: &str, version: &str) {
        let is_ours = |m: &prometheus::proto::Metric| {
            let label = |name: &str| m.get_label().iter().find(|l| l.name() == name).map(|l| l.value().to_string());
            label("model").as_deref() == Some(model) && label("version").as_deref() == Some(version)
        };
        // The third label's values present now, per metric with one.
        let third = |family: &str, label: &str| -> Vec<String> {
            self.registry
                .gather()
                .iter()
                .filter(|f| f.name() == family)
                .flat_map(|f| f.get_metric().iter().filter(|m| is_ours(m)).cloned().collect::<Vec<_>>())
                .filter_map(|m| m.get_label().iter().find(|l| l.name() == label).map(|l| l.value().to_string()))
                .collect()
        };
        for outcome in third(&format!("{}_requests_total", self.prefix), "outcome") {
            let _ = self.requests.remove_label_values(&[model, version, &outcome]);
        }
        for route in third(&format!("{}_routed_total", self.prefix), "route") {
            let _ = self.routes.remove_label_values(&[model, version, &route]);
        }
        let mv = [model, version];
        let _ = self.queue_depth.remove_label_values(&mv);
        let _ = self.replicas.remove_label_values(&mv);
        let _ = self.request_success.remove_label_values(&mv);
        for priority in ["1", "2", "3", "4", "5", "6", "7", "8", "9"] {
            let _ = self.priority_queue_duration.remove_label_values(&[model, version, priority]);
        }
        for h in [&self.batch_size, &self.request_duration, &self.queue_duration, &self.compute_duration] {
            let _ = h.remove_label_values(&mv);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}
