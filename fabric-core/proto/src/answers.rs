//! What the registry answers, typed: the registry builds these, the CLI reads their fields and
//! prints them (or, with `--output json`, prints them as JSON, the same JSON the status page reads).
//! The model versions, deployments and rollouts are also the registry's durable state.

use std::collections::BTreeMap;

use fabric_policy::traffic::TrafficPolicy;
use fabric_types::DataType;
use serde::{Deserialize, Serialize};

use crate::report::VersionReport;

/// Which nodes a deployment targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Edge nodes.
    Edge,
    /// Cloud hubs.
    Hub,
    /// Both.
    All,
}

/// An input or output of a model, as read from its file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorDecl {
    /// Name in the model graph.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Dimensions; -1 marks a dynamic one.
    pub shape: Vec<i64>,
}

/// An immutable model version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// SHA-256 of the file, hex.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Inputs as read from the file.
    pub inputs: Vec<TensorDecl>,
    /// Outputs as read from the file.
    pub outputs: Vec<TensorDecl>,
    /// The operator who pushed it (certificate name).
    pub pushed_by: String,
    /// When, in seconds since the Unix epoch.
    pub pushed_at: u64,
    /// Its reference statistics for drift, when a reference sample was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<VersionReference>,
}

/// A version's reference statistics as the registry keeps them, and the digest nodes fetch them by.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionReference {
    /// SHA-256 of the statistics as JSON (what [`VersionReference::bytes`] gives), hex.
    pub digest: String,
    /// The bins and the counts of the sample.
    pub stats: fabric_policy::drift::Reference,
}

impl VersionReference {
    /// The statistics with their digest.
    pub fn new(stats: fabric_policy::drift::Reference) -> VersionReference {
        VersionReference { digest: Self::digest_of(&Self::encode(&stats)), stats }
    }

    /// The digest of reference statistics as bytes (SHA-256, hex): what nodes check them by.
    pub fn digest_of(bytes: &[u8]) -> String {
        let hash = ring::digest::digest(&ring::digest::SHA256, bytes);
        hash.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The statistics as nodes fetch them (JSON).
    pub fn bytes(&self) -> Vec<u8> {
        Self::encode(&self.stats)
    }

    fn encode(stats: &fabric_policy::drift::Reference) -> Vec<u8> {
        // Plain numbers, strings and arrays: serialising cannot fail.
        serde_json::to_vec(stats).unwrap_or_default()
    }
}

/// A model served on a group of nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// Which role.
    pub to: Target,
    /// Labels a node must carry (all of them).
    pub labels: BTreeMap<String, String>,
    /// Replicas per node.
    pub replicas: usize,
    /// A cascade from this model on those nodes to a bigger one on the hubs (edges).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cascade: Option<fabric_policy::cascade::Cascade>,
}

/// A canary beside the stable version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    /// Canary version.
    pub version: u64,
    /// Share of requests, percent.
    pub weight: u32,
    /// Roll back by itself on worse errors or latency than the stable version.
    pub auto_rollback: bool,
}

/// A shadow version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowRoute {
    /// Shadow version.
    pub version: u64,
    /// Share of requests copied, percent.
    pub share: u32,
}

/// One step in a rollout's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutEvent {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The state generation it created.
    pub generation: u64,
    /// What happened.
    pub what: String,
}

/// How a model's versionless traffic is split.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// The version that takes the traffic the canary does not.
    pub stable: Option<u64>,
    /// The stable version before the last promote or pin (what a rollback without a canary returns to).
    #[serde(default)]
    pub previous_stable: Option<u64>,
    /// The canary, if one runs.
    pub canary: Option<Canary>,
    /// The shadow, if one runs.
    pub shadow: Option<ShadowRoute>,
    /// Why the last automatic rollback happened (figures included), if one did.
    pub auto_rolled_back: Option<String>,
    /// The last steps, newest last (at most [`HISTORY`]).
    pub history: Vec<RolloutEvent>,
    /// A rollout in waves, running, paused or ended (the last one is kept to be shown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves: Option<Waves>,
}

/// Where a rollout in waves is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WavePhase {
    /// Waves advance when their time has passed and the analysis holds.
    Running,
    /// Held by hand: moved nodes stay moved, no wave starts.
    Paused,
    /// Every wave passed: the version is the stable one.
    Completed,
    /// Stopped (by hand or by the analysis): every moved node is back on the version it came from.
    Aborted,
}

/// A rollout in waves: each wave moves the next share of the nodes that take part to `version`.
/// Which nodes a wave moves is decided by a hash of the model and node id ([`Waves::cutoffs`]), so it
/// is stable, needs no node list, and a node offline during the rollout gets its wave's state when
/// it comes back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waves {
    /// The version moved to.
    pub version: u64,
    /// The stable version when the waves started (where an abort takes the moved nodes back).
    pub from: u64,
    /// Each wave's share of the nodes, cumulative percent (e.g. 1, 10, 50, 100).
    pub steps: Vec<u32>,
    /// How long each wave runs, analysed, before the next starts, in milliseconds.
    pub every_ms: u64,
    /// Labels a node must carry to take part (beside the model's deployments); nodes without them
    /// stay on `from` until the waves complete.
    pub labels: BTreeMap<String, String>,
    /// The share of a moved node's requests `version` takes (100: all; less: a canary split on it).
    pub weight: u32,
    /// Abort by itself (rolling every moved node back) when the moved nodes' errors or p99 latency
    /// on `version` are worse than `from`'s on the others, as the canary analysis judges.
    pub auto_abort: bool,
    /// The wave running (0-based; `steps[wave]` is its share).
    pub wave: usize,
    /// Per started wave, the hash cutoff fixed when it started: a node moves when its position is
    /// under the running wave's cutoff.
    pub cutoffs: Vec<u64>,
    /// When the running wave started, in milliseconds since the Unix epoch.
    pub wave_started_ms: u64,
    /// When every moved node that is up first served the version in the running wave (its time
    /// counts from then: a wave is judged on nodes that serve, not on nodes still loading).
    #[serde(default)]
    pub wave_ready_ms: Option<u64>,
    /// Where it is.
    pub phase: WavePhase,
    /// How it ended (why it aborted, with the figures), once it has.
    pub outcome: Option<String>,
}

impl Waves {
    /// Whether nodes are moved by it now (running or paused).
    pub fn active(&self) -> bool {
        matches!(self.phase, WavePhase::Running | WavePhase::Paused)
    }
}

/// A rollout in waves as it stands over the fleet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WavesProgress {
    /// The wave running, 1-based, and how many there are.
    pub wave: usize,
    /// Waves in all.
    pub waves: usize,
    /// Nodes that take part (known to the registry, up or down).
    pub taking_part: usize,
    /// Of those, moved to the version now.
    pub moved: usize,
    /// Milliseconds until the running wave may advance (0: at the next analysis tick).
    pub next_in_ms: u64,
}

/// Steps kept in a rollout's history.
pub const HISTORY: usize = 20;

impl Rollout {
    /// The versions this rollout needs on a node.
    pub fn versions(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.stable.into_iter().collect();
        v.extend(self.canary.map(|c| c.version));
        v.extend(self.shadow.map(|s| s.version));
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Records a step.
    pub fn record(&mut self, at_ms: u64, generation: u64, what: String) {
        self.history.push(RolloutEvent { at_ms, generation, what });
        if self.history.len() > HISTORY {
            self.history.remove(0);
        }
    }
}

/// An autoscaling decision for one model version on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scaled {
    /// Replicas to run.
    pub replicas: usize,
    /// Why.
    pub reason: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// The first frame of a fetch's answer: the bytes that follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchHead {
    /// The model file's size.
    pub size: u64,
    /// Where in the file the bytes that follow start: the offset a resumed fetch asked for, or 0
    /// (the whole file: asked from 0, an offset past the file's end, or a registry from before
    /// fetches resumed).
    #[serde(default)]
    pub offset: u64,
}

/// `fabric model show NAME`: every version, where it is deployed, its rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelDetail {
    /// Model name.
    pub name: String,
    /// Its versions, oldest first.
    pub versions: Vec<ModelVersion>,
    /// Where it is deployed (`null`: nowhere).
    pub deployments: Option<Vec<Deployment>>,
    /// Its rollout (`null`: not deployed).
    pub rollout: Option<Rollout>,
}

/// `fabric model rm`: the version removed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Removed {
    /// The version removed.
    pub removed: ModelVersion,
}

/// `fabric deploy`: the model's deployments and rollout after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployed {
    /// Model name.
    pub name: String,
    /// The state generation it created.
    pub generation: u64,
    /// The model's deployments now.
    pub deployments: Vec<Deployment>,
    /// Its rollout now.
    pub rollout: Rollout,
}

/// `fabric rollout ...`: the rollout after the change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutChanged {
    /// Model name.
    pub name: String,
    /// The state generation it created.
    pub generation: u64,
    /// The rollout now.
    pub rollout: Rollout,
}

/// A version's figures over the nodes' last report windows, as the canary analysis compares them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowFigures {
    /// Requests answered in the windows.
    pub requests: f64,
    /// Of those, answered with an error, percent.
    pub error_pct: f64,
    /// The 99th percentile over every node's answers, milliseconds.
    pub p99_ms: Option<f64>,
    /// Rows labelled by feedback over the nodes' windows.
    #[serde(default)]
    pub labelled: u64,
    /// Of those, the share answered right, percent (`None` before the first label).
    #[serde(default)]
    pub accuracy_pct: Option<f64>,
}

/// The canary against the stable version.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// The stable version's figures.
    pub stable: WindowFigures,
    /// The canary's.
    pub canary: WindowFigures,
}

/// How many nodes route a model one way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Version -> weight (`null`: no policy yet).
    pub weights: Option<BTreeMap<u64, u32>>,
    /// Nodes routing so.
    pub nodes: usize,
}

/// A rollout's counts over the nodes it targets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSummary {
    /// Nodes targeted.
    pub nodes: usize,
    /// Of those, up.
    pub up: usize,
    /// Down.
    pub down: usize,
    /// Serving their desired state.
    pub converged: usize,
    /// Not yet.
    pub not_converged: usize,
    /// Version -> nodes that have it ready.
    pub ready: BTreeMap<String, usize>,
    /// How the nodes route it.
    pub routes: Vec<Route>,
}

/// One node's part in a model's rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRollout {
    /// Node id.
    pub node: String,
    /// `up` or `down`.
    pub state: String,
    /// Version -> replicas its desired state asks for (`null`: the model is not placed there).
    pub replicas: Option<BTreeMap<String, usize>>,
    /// `model:version` -> the autoscaler's last decision there.
    pub autoscaled: BTreeMap<String, Scaled>,
    /// Versions it has ready.
    pub ready: Vec<u64>,
    /// The traffic policy it is asked to apply.
    pub policy: Option<TrafficPolicy>,
    /// Whether it serves its desired state.
    pub converged: bool,
    /// Its last report of the model's versions.
    pub versions: Vec<VersionReport>,
}

/// `fabric rollout status`: a model's rollout across the fleet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// Model name.
    pub name: String,
    /// The registry's state generation.
    pub generation: u64,
    /// The rollout.
    pub rollout: Rollout,
    /// The canary against the stable version, while a canary runs (for waves: the moved nodes on
    /// the new version against the others on the old one).
    pub analysis: Option<Analysis>,
    /// A rollout in waves, while one runs or is paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves: Option<WavesProgress>,
    /// Counts over the nodes it targets.
    pub summary: RolloutSummary,
    /// Live accuracy from feedback per version that has labels, over the nodes' windows.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub accuracy: BTreeMap<String, Accuracy>,
    /// Detail for the nodes that need attention first (at most the limit asked for).
    pub nodes: Vec<NodeRollout>,
}

/// A version's live accuracy from feedback.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// Rows labelled.
    pub labelled: u64,
    /// Of those, the share answered right, percent.
    pub accuracy_pct: f64,
}

/// A version failing on a node (a load that keeps failing, a crash loop).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failing {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u64,
    /// Replicas replaced since it loaded.
    pub restarts: u64,
    /// Why its last load failed.
    pub reason: Option<String>,
}

/// One node as `fabric nodes` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// Node id.
    pub node: String,
    /// `up` or `down`.
    pub state: String,
    /// Replicas replaced, over its versions.
    pub restarts: f64,
    /// `model:version` -> replicas replaced.
    pub restarts_by_version: BTreeMap<String, u64>,
    /// Versions failing now.
    pub failing: Vec<Failing>,
    /// `edge` or `hub`.
    pub role: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its KServe v2 API.
    pub http: String,
    /// Milliseconds since its last heartbeat.
    pub last_heartbeat_ms: u64,
    /// `model:version` it has ready.
    pub ready: Vec<String>,
    /// Requests served per second (0 while it is down).
    pub served_per_s: f64,
    /// Its cores.
    pub cores: usize,
    /// Its memory, MiB.
    pub memory_mib: u64,
    /// Engines it runs.
    pub engines: Vec<String>,
    /// Its GPU, if any.
    pub gpu: Option<String>,
}

/// A version as the overview lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionSummary {
    /// Version.
    pub version: u64,
    /// Bytes.
    pub size: u64,
    /// SHA-256 of the file, hex.
    pub digest: String,
}

/// A version's live figures, summed over the nodes' last reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LiveVersion {
    /// Version.
    pub version: u64,
    /// Its share of versionless traffic, averaged over the nodes that serve it, percent.
    pub weight_pct: f64,
    /// Requests answered per second, all nodes.
    pub requests_per_s: f64,
    /// Answered with an error, percent.
    pub error_pct: f64,
    /// Median over every node's answers, milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile over every node's answers, milliseconds.
    pub p99_ms: Option<f64>,
    /// Replicas ready, all nodes.
    pub replicas: u64,
    /// Live accuracy from feedback, percent (`None` before the first label).
    #[serde(default)]
    pub accuracy_pct: Option<f64>,
    /// Drift verdict against its reference (`none`, `drift`, `not_enough_data`; `None`: no reference).
    #[serde(default)]
    pub drift: Option<String>,
}

/// One model in the overview.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelOverview {
    /// Model name.
    pub name: String,
    /// Its versions.
    pub versions: Vec<VersionSummary>,
    /// Where it is deployed.
    pub deployments: Option<Vec<Deployment>>,
    /// Its rollout across the fleet (`null`: not deployed).
    pub status: Option<RolloutStatus>,
    /// Each version's live figures.
    pub live: Vec<LiveVersion>,
}

/// Nodes, models and rollouts at once: what `fabric top` and the status page show.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Overview {
    /// The registry's state generation.
    pub generation: u64,
    /// Role -> `up`/`down` -> nodes.
    pub node_counts: BTreeMap<String, BTreeMap<String, usize>>,
    /// Nodes known.
    pub nodes_total: usize,
    /// The nodes that need attention first (at most 50).
    pub nodes: Vec<NodeView>,
    /// Every model.
    pub models: Vec<ModelOverview>,
}
