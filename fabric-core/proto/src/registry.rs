//! The registry protocol: what the `fabric` CLI, the nodes and the model registry say to each other
//! over QUIC (mutual TLS, the fabric CA), one request per bidirectional stream.
//!
//! A message is a frame: a 4-byte big-endian length, then JSON. A push sends the model's bytes after
//! its request frame, up to the end of the stream; a fetch gets them after the response frame. Who may
//! ask what is decided by the role in the peer's certificate, never by the message: operators change
//! and read, nodes heartbeat (as the node their certificate names) and fetch model files.
//!
//! A heartbeat is a long poll: the registry answers at once when the node's desired state differs from
//! what the node says it applied, else when it changes or after `wait_ms`. So a rollout reaches every
//! node within a round trip, and a quiet node still reports once a second.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::answers::FetchHead;
pub use crate::answers::Target;
use crate::report::NodeReport;
use crate::tls::{self, TlsFiles};
use fabric_policy::traffic::TrafficPolicy;

/// Largest frame (a heartbeat carries the node's load report).
pub const MAX_FRAME: usize = 16 << 20;
/// Size of the chunks a push and a fetch stream model bytes in.
pub const CHUNK: usize = 256 << 10;

/// A change to a model's rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum RolloutAction {
    /// Every request to one version (the stable one); ends a canary.
    Pin { version: u64 },
    /// A share of requests (0-100) to a canary version beside the stable one.
    Canary {
        version: u64,
        weight: u32,
        /// Roll back by itself when the canary's errors or p99 latency exceed the stable version's.
        auto_rollback: bool,
    },
    /// A copy of a share (percent) of requests to a version whose answers are compared, never returned;
    /// share 0 ends it.
    Shadow { version: u64, share: u32 },
    /// The canary becomes the stable version.
    Promote,
    /// The canary's weight goes back to 0 and the canary is dropped.
    Rollback,
    /// Moves `version` across the nodes in waves (see `answers::Waves`).
    Waves {
        /// The version moved to.
        version: u64,
        /// Each wave's cumulative share of the nodes, percent, rising, the last 100.
        steps: Vec<u32>,
        /// How long each wave runs before the next, in milliseconds.
        every_ms: u64,
        /// Labels a node must carry to take part.
        #[serde(default)]
        labels: BTreeMap<String, String>,
        /// The share of a moved node's requests the version takes (100: all).
        weight: u32,
        /// Abort by itself when the moved nodes do worse.
        auto_abort: bool,
    },
    /// Holds a rollout in waves where it is.
    Pause,
    /// Lets a paused rollout in waves go on.
    Resume,
    /// Stops a rollout in waves: every moved node goes back to the version it came from.
    Abort,
}

/// What a node says of itself when it heartbeats.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id: must be the one its certificate names.
    pub node_id: String,
    /// `edge` or `hub`.
    pub role: String,
    /// Labels from its config (site, rack, ...).
    pub labels: BTreeMap<String, String>,
    /// Engines it runs (`tract`, `ort`).
    pub engines: Vec<String>,
    /// CPU cores.
    pub cores: usize,
    /// Memory in MiB (0 when unknown).
    pub memory_mib: u64,
    /// GPU, when it has one.
    pub gpu: Option<String>,
    /// Its HTTP API (for `fabric nodes`).
    pub http: String,
    /// A hub's QUIC infer service, `host:port` (edges learn the hubs from the registry).
    #[serde(default)]
    pub quic: Option<String>,
}

/// A hub as the registry tells edges of it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HubEntry {
    /// Node id (the name its certificate carries).
    pub node_id: String,
    /// Its QUIC infer service, `host:port`.
    pub addr: String,
    /// Whether it heartbeats (a hub that stopped is down: edges stop offloading to it).
    pub up: bool,
}

/// A model version a node serves and has ready.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReadyVersion {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u64,
}

/// A node's heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Who it is.
    pub info: NodeInfo,
    /// The revision of the desired state it has fully applied (0: none).
    pub applied: u64,
    /// Versions it has ready now.
    pub ready: Vec<ReadyVersion>,
    /// Its load report (what `GET /v2/fabric/load` shows).
    pub report: NodeReport,
    /// Longest the registry may hold the answer, in milliseconds.
    pub wait_ms: u64,
    /// Longest the registry may hold it while the node is idle (nothing to watch: no traffic, no
    /// rollout under analysis), in milliseconds; 0: `wait_ms`. The node reports early when its load
    /// changes ([`fabric_policy::cadence`]), so an idle node costs the registry little.
    #[serde(default)]
    pub max_wait_ms: u64,
}

/// Which nodes `fabric nodes` lists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeQuery {
    /// Labels a node must carry (all of them).
    pub labels: BTreeMap<String, String>,
    /// `up` or `down`.
    pub state: Option<String>,
    /// `edge` or `hub`.
    pub role: Option<String>,
    /// At most this many (0 or none: all), nodes that need attention first, then by id.
    pub limit: Option<usize>,
}

/// One version a node should serve.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DesiredVersion {
    /// Version.
    pub version: u64,
    /// SHA-256 of the model file, hex.
    pub digest: String,
    /// Size of the model file in bytes.
    pub size: u64,
    /// Replicas on this node.
    pub replicas: usize,
    /// Digest of the version's reference statistics for drift, fetched like a model file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// One model a node should serve, and how to route it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredModel {
    /// Model name.
    pub name: String,
    /// Versions to have loaded.
    pub versions: Vec<DesiredVersion>,
    /// Routing of versionless requests (`None`: leave as it is until a version is ready).
    pub policy: Option<TrafficPolicy>,
    /// Its cascade to a bigger model on the hubs, when its deployment has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cascade: Option<fabric_policy::cascade::Cascade>,
}

/// What the registry wants a node to serve.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// The registry's state generation this was computed from.
    pub generation: u64,
    /// A fingerprint of the content (what the node reports as `applied` once done).
    pub revision: u64,
    /// Models to serve; anything else the registry placed there is unloaded.
    pub models: Vec<DesiredModel>,
    /// For edges: the hubs to offload to, up or down.
    #[serde(default)]
    pub hubs: Vec<HubEntry>,
}

impl DesiredState {
    /// The desired state of `models` and `hubs`, from the registry's state `generation`.
    pub fn new(generation: u64, models: Vec<DesiredModel>, hubs: Vec<HubEntry>) -> DesiredState {
        DesiredState { generation, revision: Self::fingerprint(&(&models, &hubs)), models, hubs }
    }

    /// The fingerprint of what a node is asked for (stable across runs: FNV-1a over the JSON).
    pub fn fingerprint(content: &impl Serialize) -> u64 {
        let text = serde_json::to_vec(content).unwrap_or_default();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h.max(1)
    }
}

/// A request to the registry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Upload a model version (its `size` bytes follow the frame).
    Push { name: String, version: Option<u64>, size: u64 },
    /// Sets a version's reference sample for drift (`size` bytes of `.npy` or `.npz` follow the
    /// frame); `input` names the model input it samples (default: the first), `output` the class
    /// output (default: an integer label, else scores).
    Reference {
        name: String,
        version: u64,
        size: u64,
        #[serde(default)]
        input: Option<String>,
        #[serde(default)]
        output: Option<String>,
    },
    /// A model's drift per version, over the nodes' counts.
    Drift { name: String },
    /// Every model version.
    ListModels,
    /// One model's versions, or one version.
    ShowModel { name: String, version: Option<u64> },
    /// Delete a version (refused while a rollout or a node uses it).
    RemoveModel { name: String, version: u64 },
    /// Serve a model on a group of nodes (on edges, with a cascade to a bigger model on the hubs).
    Deploy {
        name: String,
        to: Target,
        labels: BTreeMap<String, String>,
        replicas: usize,
        #[serde(default)]
        cascade: Option<fabric_policy::cascade::Cascade>,
    },
    /// Change a model's rollout.
    Rollout { name: String, change: RolloutAction },
    /// A model's rollout: counts per version and per state, and per-node detail for at most `limit`
    /// nodes (those not converged or down first; default 20, 0: all).
    RolloutStatus {
        name: String,
        #[serde(default)]
        limit: Option<usize>,
    },
    /// The nodes the query selects.
    Nodes(#[serde(default)] NodeQuery),
    /// Everything at once, for `fabric top` and the status page: nodes, models, rollouts.
    Overview,
    /// A node reports; the answer is its desired state.
    Heartbeat(Heartbeat),
    /// A model file by digest, from byte `offset` on (a download resumed after a cut; its bytes
    /// follow the answer).
    Fetch {
        digest: String,
        #[serde(default)]
        offset: u64,
    },
}

/// Why the registry refused a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// A short kind: `forbidden`, `not_found`, `invalid`, `conflict`, `too_large`, `internal`,
    /// `unavailable` (the store cannot take writes now), `not_leader` (a replicated registry's
    /// follower: see `leader`).
    pub kind: String,
    /// What went wrong and what to do.
    pub message: String,
    /// Where the leader is (`NAME@HOST:PORT`), when a follower refused and knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

impl Refusal {
    /// A refusal of `kind`.
    pub fn new(kind: &str, message: impl Into<String>) -> Refusal {
        Refusal { kind: kind.to_string(), message: message.into(), leader: None }
    }

    /// The same refusal, naming the leader.
    pub fn with_leader(mut self, leader: String) -> Refusal {
        self.leader = Some(leader);
        self
    }
}

/// The answer to a request.
pub type Reply = Result<Value, Refusal>;

/// Why talking to the registry failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The connection or stream failed.
    #[error("registry connection: {0}")]
    Io(String),
    /// A frame was too large or not valid JSON.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The registry refused.
    #[error("the registry refused ({}): {}", .0.kind, .0.message)]
    Refused(Refusal),
    /// The address or certificates are unusable.
    #[error("{0}")]
    Setup(String),
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, message: &T) -> Result<(), ProtoError> {
    let body = serde_json::to_vec(message).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(ProtoError::Malformed(format!("frame of {} bytes over the {MAX_FRAME} limit", body.len())));
    }
    let len = u32::try_from(body.len()).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    send.write_all(&len.to_be_bytes()).await.map_err(|e| ProtoError::Io(e.to_string()))?;
    send.write_all(&body).await.map_err(|e| ProtoError::Io(e.to_string()))
}

/// Writes one frame whose body is already serialised JSON.
pub async fn write_raw_frame(send: &mut quinn::SendStream, body: &[u8]) -> Result<(), ProtoError> {
    if body.len() > MAX_FRAME {
        return Err(ProtoError::Malformed(format!("frame of {} bytes over the {MAX_FRAME} limit", body.len())));
    }
    let len = u32::try_from(body.len()).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    send.write_all(&len.to_be_bytes()).await.map_err(|e| ProtoError::Io(e.to_string()))?;
    send.write_all(body).await.map_err(|e| ProtoError::Io(e.to_string()))
}

/// Reads one frame of at most `max` bytes. The buffer grows as bytes arrive: a peer that announces a
/// large frame and sends nothing costs nothing.
pub async fn read_frame<T: DeserializeOwned>(recv: &mut quinn::RecvStream, max: usize) -> Result<T, ProtoError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| ProtoError::Io(format!("reading a frame: {e}")))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(ProtoError::Malformed(format!("frame of {len} bytes over the {max} limit")));
    }
    let mut body: Vec<u8> = Vec::with_capacity(len.min(64 << 10));
    while body.len() < len {
        let chunk = recv
            .read_chunk(len - body.len(), true)
            .await
            .map_err(|e| ProtoError::Io(format!("reading a frame: {e}")))?
            .ok_or_else(|| ProtoError::Io(format!("the stream ended {} bytes into a {len}-byte frame", body.len())))?;
        body.extend_from_slice(&chunk.bytes);
    }
    serde_json::from_slice(&body).map_err(|e| ProtoError::Malformed(e.to_string()))
}

/// Where the registry is: `[NAME@]HOST:PORT`, NAME the name its certificate carries (default HOST).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryAddr {
    /// Its address.
    pub addr: String,
    /// The name its certificate must carry.
    pub server_name: String,
}

impl RegistryAddr {
    /// Parses `[NAME@]HOST:PORT`.
    pub fn parse(s: &str) -> Result<RegistryAddr, String> {
        let (name, addr) = match s.split_once('@') {
            Some((name, addr)) => (Some(name.to_string()), addr.to_string()),
            None => (None, s.to_string()),
        };
        let host = addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
            .ok_or_else(|| format!("registry address '{s}' is not [NAME@]HOST:PORT"))?;
        Ok(RegistryAddr { server_name: name.unwrap_or(host), addr })
    }

    fn resolve(&self) -> Result<SocketAddr, ProtoError> {
        self.addr
            .to_socket_addrs()
            .map_err(|e| ProtoError::Setup(format!("registry address {}: {e}", self.addr)))?
            .next()
            .ok_or_else(|| ProtoError::Setup(format!("registry address {} resolves to nothing", self.addr)))
    }
}

impl std::fmt::Display for RegistryAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.server_name, self.addr)
    }
}

impl RegistryAddr {
    /// Parses a comma-separated list of `[NAME@]HOST:PORT` (a replicated registry's replicas).
    pub fn parse_list(s: &str) -> Result<Vec<RegistryAddr>, String> {
        let list: Vec<RegistryAddr> =
            s.split(',').map(str::trim).filter(|a| !a.is_empty()).map(RegistryAddr::parse).collect::<Result<_, _>>()?;
        if list.is_empty() {
            return Err(format!("no registry address in '{s}'"));
        }
        Ok(list)
    }
}

/// A connection to the registry (reconnects on the next call after it drops). Given several
/// addresses (a replicated registry), it moves to the next on a failed connect, and to the leader a
/// follower names, with jittered backoff, for up to [`FAILOVER_WITHIN`] per call.
pub struct RegistryClient {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    link: tokio::sync::Mutex<Link>,
}

/// Which replica a client talks to, and its connection.
struct Link {
    targets: Vec<RegistryAddr>,
    at: usize,
    connection: Option<quinn::Connection>,
}

/// Longest one call keeps moving between replicas (a new leader is elected within a lease, 3 s).
pub const FAILOVER_WITHIN: Duration = Duration::from_secs(10);

/// Longest a model file download may go without a byte before it is given up.
pub const FETCH_STALL: Duration = Duration::from_secs(5);

/// Times a connect the registry refused (too many handshakes at once) is tried again before failing.
const REFUSED_RETRIES: u32 = 4;

/// How long a registry connection may be silent before it sends a keep-alive: longer than an idle
/// node's held heartbeat (10 s), so a healthy node sends none (at 10,000 nodes, keep-alives every
/// 2 s were most of the registry's packets).
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A registry connection silent for this long is dead. A registry that restarted resets it at the
/// next packet (its stateless-reset key survives restarts); a call that gets no answer in time drops
/// the connection at once ([`RegistryClient::forget_connection`]).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a failed call should move to another replica: a follower's refusal, or a connection that
/// failed before the request went out (so nothing was done).
fn moves_on(result: &Result<Value, ProtoError>, sent: bool, replicas: usize) -> Option<Option<String>> {
    match result {
        Err(ProtoError::Refused(r)) if r.kind == "not_leader" => Some(r.leader.clone()),
        Err(ProtoError::Io(_)) if !sent && replicas > 1 => Some(None),
        _ => None,
    }
}

impl RegistryClient {
    /// A client presenting the certificate in `files` (call inside a tokio runtime).
    pub fn new(target: RegistryAddr, files: &TlsFiles) -> Result<Arc<RegistryClient>, ProtoError> {
        Self::replicated(vec![target], files)
    }

    /// A client of a replicated registry: `targets` are its replicas, tried in turn.
    pub fn replicated(targets: Vec<RegistryAddr>, files: &TlsFiles) -> Result<Arc<RegistryClient>, ProtoError> {
        let first = targets.first().ok_or_else(|| ProtoError::Setup("no registry address".into()))?;
        let bind: SocketAddr = if first.resolve()?.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
            .parse()
            .map_err(|e| ProtoError::Setup(format!("{e}")))?;
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| ProtoError::Setup(e.to_string()))?;
        Self::on_endpoint_replicated(endpoint, targets, files)
    }

    /// A client on an existing endpoint (many clients, each with its own certificate, can share one
    /// socket: the fleet simulator does).
    pub fn on_endpoint(
        endpoint: quinn::Endpoint,
        target: RegistryAddr,
        files: &TlsFiles,
    ) -> Result<Arc<RegistryClient>, ProtoError> {
        Self::on_endpoint_replicated(endpoint, vec![target], files)
    }

    /// A client of a replicated registry on an existing endpoint.
    pub fn on_endpoint_replicated(
        endpoint: quinn::Endpoint,
        targets: Vec<RegistryAddr>,
        files: &TlsFiles,
    ) -> Result<Arc<RegistryClient>, ProtoError> {
        if targets.is_empty() {
            return Err(ProtoError::Setup("no registry address".into()));
        }
        let mut config = tls::client_config(files).map_err(|e| ProtoError::Setup(e.to_string()))?;
        let mut transport = transport();
        transport.keep_alive_interval(Some(KEEP_ALIVE));
        transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().map_err(|e| ProtoError::Setup(format!("{e}")))?));
        config.transport_config(Arc::new(transport));
        let link = Link { targets, at: 0, connection: None };
        Ok(Arc::new(RegistryClient { endpoint, config, link: tokio::sync::Mutex::new(link) }))
    }

    /// The registry replica this client talks to now.
    pub async fn target(&self) -> RegistryAddr {
        let link = self.link.lock().await;
        link.targets[link.at].clone()
    }

    /// Moves to the leader a follower named (added to the list if new), or to the next replica.
    async fn move_on(&self, leader: Option<String>) {
        let mut link = self.link.lock().await;
        let named = leader.and_then(|l| RegistryAddr::parse(&l).ok());
        link.at = match named {
            Some(leader) => match link.targets.iter().position(|t| t.addr == leader.addr) {
                Some(i) => i,
                None => {
                    link.targets.push(leader);
                    link.targets.len() - 1
                }
            },
            None => (link.at + 1) % link.targets.len(),
        };
        if let Some(c) = link.connection.take() {
            c.close(0u32.into(), b"moving to another registry replica");
        }
    }

    /// Runs `attempt` (which says whether the request went out) until it succeeds or fails for a
    /// reason moving to another replica cannot help, for up to [`FAILOVER_WITHIN`].
    async fn with_failover<F, Fut>(&self, mut attempt: F) -> Result<Value, ProtoError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = (bool, Result<Value, ProtoError>)>,
    {
        let deadline = tokio::time::Instant::now() + FAILOVER_WITHIN;
        let mut backoff = fabric_policy::backoff::Backoff::new(
            Duration::from_millis(50),
            Duration::from_secs(1),
            fabric_policy::backoff::seed_of(&format!("{:?}", std::time::SystemTime::now())),
        );
        // What a live replica said beats a replica that did not answer, when all fail.
        let mut said: Option<Result<Value, ProtoError>> = None;
        loop {
            let (sent, result) = attempt().await;
            let replicas = self.link.lock().await.targets.len();
            let Some(leader) = moves_on(&result, sent, replicas) else { return result };
            // A named leader is tried at once; otherwise wait (an election takes a lease's time).
            let delay = if leader.is_some() { Duration::ZERO } else { backoff.next_delay() };
            if matches!(result, Err(ProtoError::Refused(_))) || !matches!(said, Some(Err(ProtoError::Refused(_)))) {
                said = Some(result);
            }
            if tokio::time::Instant::now() + delay >= deadline {
                return said.unwrap_or_else(|| Err(ProtoError::Io("no registry replica answered".into())));
            }
            self.move_on(leader).await;
            tokio::time::sleep(delay).await;
        }
    }

    async fn connection(&self) -> Result<quinn::Connection, ProtoError> {
        let mut link = self.link.lock().await;
        if let Some(c) = link.connection.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let target = link.targets[link.at].clone();
        let addr = target.resolve()?;
        // With other replicas to try, one that does not answer is left sooner.
        let within = if link.targets.len() > 1 { Duration::from_secs(2) } else { Duration::from_secs(5) };
        // A registry busy with a fleet's handshakes refuses new ones at once: try again a few times,
        // jittered, before the caller sees it (the CLI during a fleet's reconnect, say).
        let mut backoff = fabric_policy::backoff::Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            fabric_policy::backoff::seed_of(&format!("{:?}", std::time::SystemTime::now())),
        );
        loop {
            let connecting = self
                .endpoint
                .connect_with(self.config.clone(), addr, &target.server_name)
                .map_err(|e| ProtoError::Io(format!("connecting to {target}: {e}")))?;
            let connected = tokio::time::timeout(within, connecting)
                .await
                .map_err(|_| ProtoError::Io(format!("no answer from the registry at {target} within {within:?}")))?;
            match connected {
                Ok(c) => {
                    // The CA vouches for the name; the role says it is a registry and not, say, a hub
                    // whose certificate happens to carry that name.
                    match crate::tls::peer_identity(&c) {
                        Ok(id) if id.role == crate::tls::Role::Registry => {}
                        Ok(id) => {
                            c.close(1u32.into(), b"not a registry");
                            return Err(ProtoError::Setup(format!(
                                "the server at {target} presents a certificate for a {} ('{}'), not a registry: check --registry",
                                id.role.as_str(),
                                id.node_id
                            )));
                        }
                        Err(e) => {
                            c.close(1u32.into(), b"no identity");
                            return Err(ProtoError::Setup(format!(
                                "the server at {target} has no usable identity: {e}"
                            )));
                        }
                    }
                    link.connection = Some(c.clone());
                    return Ok(c);
                }
                Err(quinn::ConnectionError::ConnectionClosed(close))
                    if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
                        && backoff.failures() < REFUSED_RETRIES =>
                {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => return Err(ProtoError::Io(format!("connecting to the registry at {target}: {e}"))),
            }
        }
    }

    /// Datagrams received on the current connection so far (`None`: no connection, or one being
    /// made now). A live registry acknowledges every request within a round trip, so a count that
    /// stays put after a request went out is a registry that is gone.
    pub fn received_datagrams(&self) -> Option<u64> {
        let link = self.link.try_lock().ok()?;
        link.connection.as_ref().map(|c| c.stats().udp_rx.datagrams)
    }

    /// Drops the connection and, with several replicas, moves to the next: for a registry that went
    /// silent.
    pub async fn abandon(&self) {
        if self.link.lock().await.targets.len() > 1 {
            self.move_on(None).await;
        } else {
            self.forget_connection().await;
        }
    }

    /// Drops the connection (the next call makes a new one): for a call that got no answer in time.
    pub async fn forget_connection(&self) {
        if let Some(c) = self.link.lock().await.connection.take() {
            c.close(0u32.into(), b"no answer in time");
        }
    }

    /// Sends a request and reads its answer as `T` (the type [`crate::answers`] names for it).
    pub async fn ask<T: DeserializeOwned>(&self, request: &Request) -> Result<T, ProtoError> {
        let value = self.call(request).await?;
        serde_json::from_value(value).map_err(|e| ProtoError::Malformed(format!("answer to {request:?}: {e}")))
    }

    /// Sends a request and reads its answer (at the leader, for a replicated registry).
    pub async fn call(&self, request: &Request) -> Result<Value, ProtoError> {
        self.with_failover(move || self.call_once(request)).await
    }

    async fn call_once(&self, request: &Request) -> (bool, Result<Value, ProtoError>) {
        let (mut send, mut recv) = match self.open().await {
            Ok(streams) => streams,
            Err(e) => return (false, Err(e)),
        };
        let answer = async {
            write_frame(&mut send, request).await?;
            let _ = send.finish();
            let reply: Reply = read_frame(&mut recv, MAX_FRAME).await?;
            reply.map_err(ProtoError::Refused)
        };
        (true, answer.await)
    }

    async fn open(&self) -> Result<(quinn::SendStream, quinn::RecvStream), ProtoError> {
        let connection = self.connection().await?;
        match connection.open_bi().await {
            Ok(streams) => Ok(streams),
            Err(e) => {
                self.link.lock().await.connection = None;
                Err(ProtoError::Io(format!("opening a stream to the registry: {e}")))
            }
        }
    }

    /// Pushes a model file (to the leader, for a replicated registry); `progress(sent, total)` is
    /// called as bytes go out.
    pub async fn push(
        &self,
        name: &str,
        version: Option<u64>,
        file: &Path,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Value, ProtoError> {
        let progress = std::sync::Mutex::new(&mut progress);
        let progress = &progress;
        self.with_failover(move || async move {
            let mut report = |sent, total| {
                if let Ok(mut p) = progress.lock() {
                    (*p)(sent, total)
                }
            };
            match self.open().await {
                Ok(streams) => (true, self.push_on(streams, name, version, file, &mut report).await),
                Err(e) => (false, Err(e)),
            }
        })
        .await
    }

    async fn push_on(
        &self,
        (mut send, mut recv): (quinn::SendStream, quinn::RecvStream),
        name: &str,
        version: Option<u64>,
        file: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Value, ProtoError> {
        use tokio::io::AsyncReadExt;
        let mut source = tokio::fs::File::open(file)
            .await
            .map_err(|e| ProtoError::Setup(format!("cannot open {}: {e}", file.display())))?;
        let size = source.metadata().await.map_err(|e| ProtoError::Setup(e.to_string()))?.len();
        write_frame(&mut send, &Request::Push { name: name.to_string(), version, size }).await?;
        let mut buf = vec![0u8; 4 * CHUNK];
        let mut sent = 0u64;
        loop {
            let n = source.read(&mut buf).await.map_err(|e| ProtoError::Setup(e.to_string()))?;
            if n == 0 {
                break;
            }
            if send.write_all(&buf[..n]).await.is_err() {
                break; // the registry refused mid-way: its answer says why
            }
            sent += n as u64;
            progress(sent, size);
        }
        let _ = send.finish();
        let reply: Reply = read_frame(&mut recv, MAX_FRAME).await?;
        reply.map_err(ProtoError::Refused)
    }

    /// Sends a request whose `bytes` follow its frame (a reference sample), and reads the answer.
    pub async fn ask_with_bytes(&self, request: &Request, bytes: &[u8]) -> Result<Value, ProtoError> {
        self.with_failover(move || async move {
            let (mut send, mut recv) = match self.open().await {
                Ok(streams) => streams,
                Err(e) => return (false, Err(e)),
            };
            let sent = async {
                write_frame(&mut send, request).await?;
                // A refusal mid-way cuts the write: the registry's answer says why.
                let _ = send.write_all(bytes).await;
                let _ = send.finish();
                let reply: Reply = read_frame(&mut recv, MAX_FRAME).await?;
                reply.map_err(ProtoError::Refused)
            };
            (true, sent.await)
        })
        .await
    }

    /// Fetches a model file by digest into `dest` (written to `dest` with the extension `partial`,
    /// renamed into place once whole). A download cut short (the link stalled, the registry went
    /// away) keeps its partial file, and the next fetch of the digest asks only for the rest: a large
    /// model over a flaky link is not started again from zero. The caller checks the digest (and
    /// deletes `dest` when it is wrong, so that a corrupt partial file is fetched whole next time).
    pub async fn fetch(&self, digest: &str, dest: &Path) -> Result<Fetched, ProtoError> {
        let partial = dest.with_extension("partial");
        let have = tokio::fs::metadata(&partial).await.map(|m| m.len()).unwrap_or(0);
        let (mut send, mut recv) = match self.open().await {
            Ok(streams) => streams,
            Err(e) => {
                // Every replica serves model files: try the next.
                if self.link.lock().await.targets.len() > 1 {
                    self.move_on(None).await;
                }
                return Err(e);
            }
        };
        write_frame(&mut send, &Request::Fetch { digest: digest.to_string(), offset: have }).await?;
        let _ = send.finish();
        // A registry (replica) that dies mid-file is left after FETCH_STALL without a byte, not after
        // QUIC's idle timeout; the next try goes to another replica (they share the model files).
        let stalled = |got: u64, size: u64| {
            ProtoError::Io(format!(
                "the registry sent nothing for {FETCH_STALL:?} during a model file ({got} of {size} bytes kept; the next try resumes there)"
            ))
        };
        let reply: Reply = match tokio::time::timeout(FETCH_STALL, read_frame(&mut recv, MAX_FRAME)).await {
            Ok(reply) => reply?,
            Err(_) => {
                self.abandon().await;
                return Err(ProtoError::Io(format!(
                    "the registry sent nothing for {FETCH_STALL:?} after a model file was asked for"
                )));
            }
        };
        let head = reply.map_err(ProtoError::Refused)?;
        let FetchHead { size, offset } =
            serde_json::from_value(head).map_err(|e| ProtoError::Malformed(format!("fetch answer: {e}")))?;
        let setup = |e: std::io::Error| ProtoError::Setup(format!("cannot write {}: {e}", partial.display()));
        // The registry says where its bytes start: where we asked, or 0 (the whole file again).
        let mut out = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&partial)
            .await
            .map_err(setup)?;
        out.set_len(offset).await.map_err(setup)?;
        out.seek(std::io::SeekFrom::Start(offset)).await.map_err(setup)?;
        if offset > 0 {
            tracing::info!(%digest, offset, size, "model file download resumed");
        }
        let mut got = offset;
        loop {
            let chunk = match tokio::time::timeout(FETCH_STALL, recv.read_chunk(CHUNK, true)).await {
                Ok(Ok(chunk)) => chunk,
                Ok(Err(e)) => {
                    let _ = out.sync_all().await;
                    return Err(ProtoError::Io(format!(
                        "{e} ({got} of {size} bytes kept; the next try resumes there)"
                    )));
                }
                Err(_) => {
                    let _ = out.sync_all().await;
                    self.abandon().await;
                    return Err(stalled(got, size));
                }
            };
            let Some(chunk) = chunk else { break };
            got += chunk.bytes.len() as u64;
            if got > size {
                drop(out);
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(ProtoError::Malformed(format!(
                    "the registry sent more than the {size} bytes it announced"
                )));
            }
            out.write_all(&chunk.bytes).await.map_err(setup)?;
        }
        out.sync_all().await.map_err(setup)?;
        drop(out);
        if got != size {
            return Err(ProtoError::Io(format!(
                "model file cut short: {got} of {size} bytes (kept; the next try resumes there)"
            )));
        }
        tokio::fs::rename(&partial, dest).await.map_err(|e| ProtoError::Setup(e.to_string()))?;
        Ok(Fetched { size, resumed_from: offset })
    }
}

/// A model file fetched whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// Its size in bytes.
    pub size: u64,
    /// The byte this download started at: more than 0 when it resumed one cut short.
    pub resumed_from: u64,
}

/// QUIC transport settings for registry connections: flow-control windows sized for model files
/// (quinn's defaults, tuned for many small streams, held a push to about 30 MiB/s on loopback), and
/// BBR, not CUBIC, to carry them: a loss-driven controller at 1% random loss and a 100 ms round trip
/// is held near 1.4 Mbit/s whatever the link (the Mathis bound; measured for offload across 40 ms
/// and 1% loss, CUBIC carried 1% of a 50 Mbit/s link, BBR 94%), and model files cross such links.
pub fn transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    transport.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    transport.receive_window(quinn::VarInt::from_u32(32 << 20));
    transport.send_window(32 << 20);
    transport
}

/// Whether a model name is a plain folder name (letters, digits, `_`, `-`, `.`, not starting with `.`):
/// names become paths in caches and staging folders.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// SHA-256 of a file, hex (blocking: call off the async threads for large files).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        context.update(&buf[..n]);
    }
    Ok(hex(context.finish().as_ref()))
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        let cases = [
            ("registry-1@127.0.0.1:7000", Ok(("registry-1", "127.0.0.1:7000"))),
            ("127.0.0.1:7000", Ok(("127.0.0.1", "127.0.0.1:7000"))),
            ("reg@[::1]:7000", Ok(("reg", "[::1]:7000"))),
            ("localhost", Err(())),
        ];
        for (s, want) in cases {
            let got = RegistryAddr::parse(s).map(|a| (a.server_name, a.addr)).map_err(|_| ());
            assert_eq!(got, want.map(|(n, a)| (n.to_string(), a.to_string())), "{s}");
        }
    }

    #[test]
    fn requests_round_trip_and_fingerprints_are_stable() {
        let request = Request::Rollout {
            name: "mlp".into(),
            change: RolloutAction::Canary { version: 2, weight: 20, auto_rollback: true },
        };
        let text = serde_json::to_string(&request).expect("json");
        assert_eq!(serde_json::from_str::<Request>(&text).expect("parse"), request);
        let models = vec![DesiredModel {
            name: "mlp".into(),
            versions: vec![DesiredVersion { version: 1, digest: "ab".into(), size: 3, replicas: 1, reference: None }],
            policy: Some(TrafficPolicy::pinned(1)),
            cascade: None,
        }];
        assert_eq!(DesiredState::fingerprint(&models), DesiredState::fingerprint(&models.clone()));
        assert_ne!(DesiredState::fingerprint(&models), DesiredState::fingerprint(&Vec::<DesiredModel>::new()));
        assert_eq!(hex(&[0, 15, 255]), "000fff");
    }

    #[test]
    fn fetches_resume_and_speak_to_registries_from_before_resumption() {
        use crate::answers::FetchHead;
        // (what one side sent, what the other reads)
        let requests = [
            (r#"{"op":"fetch","digest":"ab"}"#, Request::Fetch { digest: "ab".into(), offset: 0 }),
            (r#"{"op":"fetch","digest":"ab","offset":7}"#, Request::Fetch { digest: "ab".into(), offset: 7 }),
        ];
        for (text, want) in requests {
            assert_eq!(serde_json::from_str::<Request>(text).expect(text), want, "{text}");
        }
        let heads = [
            (r#"{"size":9}"#, FetchHead { size: 9, offset: 0 }),
            (r#"{"size":9,"offset":4}"#, FetchHead { size: 9, offset: 4 }),
        ];
        for (text, want) in heads {
            assert_eq!(serde_json::from_str::<FetchHead>(text).expect(text), want, "{text}");
        }
    }

    #[test]
    fn a_heartbeat_with_a_weighted_policy_in_its_report_reads_back() {
        let weights = BTreeMap::from([(1, 80), (2, 20)]);
        let report = NodeReport {
            node: "edge-node".into(),
            models: vec![crate::report::ModelReport {
                name: "mlp".into(),
                policy: Some(TrafficPolicy { weights, shadow: None }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let request = Request::Heartbeat(Heartbeat { report, wait_ms: 500, ..Heartbeat::default() });
        let text = serde_json::to_string(&request).expect("json");
        assert_eq!(serde_json::from_str::<Request>(&text).expect("parse"), request);
    }
}
