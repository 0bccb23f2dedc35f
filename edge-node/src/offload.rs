//! Offload to cloud hubs over QUIC (mutual TLS): one connection per configured hub, kept open and
//! re-established with exponential backoff; one bidirectional stream per offloaded request.
//!
//! Hubs come from the config (`--hub`) and from the model registry, whose desired state lists every
//! hub with its QUIC address and whether it heartbeats: a hub the registry says is down is not used
//! (it may still be connected), one it names anew gets a link, and one whose address moved is
//! reconnected there.
//!
//! A hub that answers "busy" or vanishes mid-request is skipped for the next one while the deadline
//! allows; past that the caller gets a precise error (or serves locally). Each hub's load report and
//! measured answer time feed the admission decision ([`Overflow::view`]).
//!
//! What the edge concludes about each hub (its load reports, busy answers, a window of requests in
//! flight) is the pure [`HubHealth`] policy. A connection that closes before any good
//! answer or load report (a hub refusing this node's certificate, say) counts as a failed connect: the
//! reconnect backs off instead of looping.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabric_node::agent::HubDirectory;
use fabric_node::dispatch::{Offloaded, Overflow, OverflowError};
use fabric_node::metrics::Metrics;
use fabric_policy::admission::OffloadView;
use fabric_policy::backoff::seed_of;
use fabric_policy::hub::{self, HubHealth, Reported};
use fabric_policy::reconnect::{LinkEnd, ReconnectPolicy};
use fabric_proto::registry::HubEntry;
use fabric_proto::tls::{self, Role, TlsFiles};
use fabric_proto::wire::{self, ErrorCode, HubLoad, RequestHeader, ResponseHeader, WireLimits};
use fabric_types::tensor::{NamedTensor, Tensor};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// One hub to offload to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubEndpoint {
    /// The hub's QUIC address as `host:port`: an IP literal (`10.0.0.5:4433`, `[::1]:4433`) or a DNS
    /// name (`hub1.example.net:4433`, resolved at each connect).
    pub addr: String,
    /// The name the hub's certificate must carry: its node id, or a DNS name or IP in it. Default: the
    /// host of `addr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

impl HubEndpoint {
    /// Parses `[name@]host:port`, as `--hub` takes it.
    pub fn parse(spec: &str) -> Result<HubEndpoint, OffloadSetupError> {
        let (name, addr) = match spec.split_once('@') {
            Some((name, addr)) => (Some(name.to_string()), addr),
            None => (None, spec),
        };
        let endpoint = HubEndpoint { addr: addr.to_string(), server_name: name };
        endpoint.host_and_port()?;
        Ok(endpoint)
    }

    /// The host (brackets of an IPv6 literal removed) and port.
    fn host_and_port(&self) -> Result<(String, u16), OffloadSetupError> {
        let bad = || OffloadSetupError::Address(self.addr.clone());
        if let Ok(addr) = self.addr.parse::<SocketAddr>() {
            return Ok((addr.ip().to_string(), addr.port()));
        }
        let (host, port) = self.addr.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || host.contains(':') || host.contains('[') {
            return Err(bad());
        }
        Ok((host.to_string(), port))
    }

    /// The name to check in the hub's certificate.
    fn server_name(&self) -> Result<String, OffloadSetupError> {
        match &self.server_name {
            Some(name) => Ok(name.clone()),
            None => self.host_and_port().map(|(host, _)| host),
        }
    }
}

/// When requests go to a hub.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffloadMode {
    /// Only what this node cannot serve by its deadline (the default).
    #[default]
    Overflow,
    /// Everything, while a hub is usable (e.g. to spare a battery); local serving is the fallback.
    Always,
}

/// Offload settings (`[offload]` in edge.toml); no hubs means no offload.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OffloadConfig {
    /// Hubs to offload to.
    pub hubs: Vec<HubEndpoint>,
    /// This node's CA, certificate and key (PEM); required when hubs are set.
    pub tls: Option<TlsFiles>,
    /// First reconnect delay after a hub is lost, in milliseconds (doubles up to the maximum).
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, in milliseconds.
    pub reconnect_max_ms: u64,
    /// Frame size limits.
    pub limits: WireLimits,
    /// `overflow` (default): only what cannot be served here in time; `always`: everything while a hub is up.
    pub mode: OffloadMode,
    /// Milliseconds between keep-alive packets on an idle hub connection.
    pub keep_alive_ms: u64,
    /// Milliseconds without a packet after which a hub counts as gone (then reconnect). With the
    /// defaults (1 s keep-alives, 5 s), a link with a 300 ms round trip never flaps, and a dead hub is
    /// detected within 5 s; requests in flight to it give up sooner, after four times its usual
    /// answer time.
    pub idle_timeout_ms: u64,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        OffloadConfig {
            hubs: Vec::new(),
            tls: None,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5000,
            limits: WireLimits::default(),
            mode: OffloadMode::Overflow,
            keep_alive_ms: 1000,
            idle_timeout_ms: 5000,
        }
    }
}

/// Why offload cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OffloadSetupError {
    /// Hubs without certificates.
    #[error("offload.hubs is set but offload.tls is not: hubs accept only peers with a fabric certificate (create development ones with `fabric certs --out certs --node edge-1:edge --node hub-1:hub`, then pass --certs certs)")]
    NoTls,
    /// A hub address does not parse.
    #[error("offload hub address '{0}' is not host:port (an IP literal, [IPv6]:port, or a DNS name), optionally with name@ in front")]
    Address(String),
    /// The idle timeout cannot be used.
    #[error("offload.idle_timeout_ms = {0} is out of range (use 1000 to 600000; it must exceed keep_alive_ms)")]
    IdleTimeout(u64),
    /// TLS files unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The UDP socket cannot be opened.
    #[error("cannot open a QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
}

/// One hub's link: connection (when up), reported load, measured answer time.
struct HubLink {
    /// Where it came from: the config (kept for the life of the process) or the registry.
    from_registry: bool,
    /// The registry says it stopped heartbeating: not used until it comes back.
    down: AtomicBool,
    /// Replaced or dropped: its connector closes the connection and ends.
    retired: AtomicBool,
    /// `host:port` as configured (resolved at each connect).
    addr: String,
    server_name: String,
    conn: Mutex<Option<quinn::Connection>>,
    name: Mutex<String>,
    in_flight: AtomicU32,
    health: Mutex<HubHealth>,

    /// Whether the current connection has shown the hub accepted this node (an answer or a load report).
    proven: AtomicBool,
    /// Connection attempts since start.
    attempts: AtomicU64,
    /// Where its state and attempts are counted.
    metrics: Option<Metrics>,
}

impl HubLink {
    fn connection(&self) -> Option<quinn::Connection> {
        self.conn.lock().ok().and_then(|c| c.clone()).filter(|c| c.close_reason().is_none())
    }

    fn has_room(&self, now: Instant) -> bool {
        let sending = self.in_flight.load(Ordering::Relaxed);
        self.health.lock().map(|h| h.has_room(now, sending)).unwrap_or(true)
    }

    fn reported_in_flight(&self, now: Instant) -> u32 {
        self.health.lock().map(|h| h.in_flight(now)).unwrap_or(0)
    }

    fn with_health(&self, f: impl FnOnce(&mut HubHealth)) {
        if let Ok(mut health) = self.health.lock() {
            f(&mut health);
        }
    }

    fn record_load(&self, load: HubLoad) {
        self.proven.store(true, Ordering::Relaxed);
        let load = Reported { in_flight: load.in_flight, capacity: load.capacity };
        self.with_health(|h| h.reported(load, Instant::now()));
    }

    /// The expected answer time (twice the round trip before the first answer).
    fn expected(&self, conn: &quinn::Connection) -> Duration {
        let fallback = conn.rtt() * 2;
        self.health.lock().map(|h| h.expected(fallback)).unwrap_or(fallback)
    }

    /// How long to wait for this hub before trying elsewhere.
    fn patience(&self, conn: &quinn::Connection) -> Duration {
        let fallback = conn.rtt() * 2;
        self.health.lock().map(|h| h.patience(fallback)).unwrap_or(fallback)
    }

    fn record_answer(&self, took: Duration) {
        self.with_health(|h| h.answered_in(took));
    }
}

/// The offload client: hub links and the QUIC endpoint they share.
pub struct Offloader {
    hubs: std::sync::RwLock<Vec<Arc<HubLink>>>,
    /// What a new link needs: the QUIC thread, the endpoints, the reconnect backoff bounds.
    io: tokio::runtime::Handle,
    endpoints: Endpoints,
    backoff: (Duration, Duration),
    metrics: Option<Metrics>,
    limits: WireLimits,
    next_id: AtomicU64,
    mode: OffloadMode,
}

/// How one attempt on one hub failed.
enum Attempt {
    /// Try another hub (busy, lost, deadline on that hub).
    Next(String),
    /// Final: the request itself is wrong.
    Invalid(String),
}

impl Offloader {
    /// Opens the endpoint and starts a connector task per hub, on a QUIC thread of their own. With no
    /// hub configured, starts only when `registry` says the registry will name them.
    pub fn start(
        config: &OffloadConfig,
        registry: bool,
        metrics: Option<Metrics>,
    ) -> Result<Option<Arc<Offloader>>, OffloadSetupError> {
        if config.hubs.is_empty() && !registry {
            return Ok(None);
        }
        let files = config.tls.as_ref().ok_or(OffloadSetupError::NoTls)?;
        let mut client = tls::client_config(files)?;
        if !(1000..=600_000).contains(&config.idle_timeout_ms) || config.keep_alive_ms >= config.idle_timeout_ms {
            return Err(OffloadSetupError::IdleTimeout(config.idle_timeout_ms));
        }
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_millis(config.keep_alive_ms.max(1))));
        let idle = quinn::VarInt::from_u64(config.idle_timeout_ms)
            .map_err(|_| OffloadSetupError::IdleTimeout(config.idle_timeout_ms))?;
        transport.max_idle_timeout(Some(idle.into()));
        client.transport_config(Arc::new(transport));
        // The endpoints and their connections run on a thread of their own, not between the pools'
        // turns. One per address family: an IPv4 socket cannot reach an IPv6 hub.
        let io = fabric_proto::io_thread::spawn("quic-offload").map_err(OffloadSetupError::Endpoint)?;
        let endpoints = {
            let _on_io_thread = io.enter();
            let mut v4 =
                quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0))).map_err(OffloadSetupError::Endpoint)?;
            v4.set_default_client_config(client.clone());
            let v6 = match quinn::Endpoint::client(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))) {
                Ok(mut v6) => {
                    v6.set_default_client_config(client);
                    Some(v6)
                }
                Err(e) => {
                    tracing::info!("no IPv6 QUIC endpoint ({e}); IPv6 hubs cannot be reached");
                    None
                }
            };
            Endpoints { v4, v6 }
        };
        let (min, max) =
            (Duration::from_millis(config.reconnect_min_ms.max(1)), Duration::from_millis(config.reconnect_max_ms));
        let offloader = Offloader {
            hubs: std::sync::RwLock::new(Vec::new()),
            io,
            endpoints,
            backoff: (min, max.max(min)),
            metrics,
            limits: config.limits,
            next_id: AtomicU64::new(1),
            mode: config.mode,
        };
        for h in &config.hubs {
            offloader.add_link(h.addr.clone(), h.server_name()?, false, false);
        }
        Ok(Some(Arc::new(offloader)))
    }

    /// Starts a link to `addr` (checking `server_name` in its certificate) and its connector.
    fn add_link(&self, addr: String, server_name: String, from_registry: bool, down: bool) {
        let link = Arc::new(HubLink {
            from_registry,
            down: AtomicBool::new(down),
            retired: AtomicBool::new(false),
            name: Mutex::new(server_name.clone()),
            addr,
            server_name,
            conn: Mutex::new(None),
            in_flight: AtomicU32::new(0),
            health: Mutex::new(HubHealth::default()),
            proven: AtomicBool::new(false),
            attempts: AtomicU64::new(0),
            metrics: self.metrics.clone(),
        });
        link.publish();
        self.io.spawn(keep_connected(self.endpoints.clone(), link.clone(), self.backoff.0, self.backoff.1));
        self.hubs.write().unwrap_or_else(|p| p.into_inner()).push(link);
    }

    fn links(&self) -> Vec<Arc<HubLink>> {
        self.hubs.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Hubs that are up, connected and have room, the soonest expected answer first.
    fn candidates(&self) -> Vec<(Arc<HubLink>, quinn::Connection)> {
        let now = Instant::now();
        let up: Vec<_> = self
            .links()
            .into_iter()
            .filter(|h| !h.down.load(Ordering::Relaxed) && h.has_room(now))
            .filter_map(|h| h.connection().map(|c| (h, c)))
            .collect();
        let costs: Vec<(u32, Duration)> = up
            .iter()
            .map(|(h, c)| (h.reported_in_flight(now) + h.in_flight.load(Ordering::Relaxed), h.expected(c)))
            .collect();
        let mut slots: Vec<Option<(Arc<HubLink>, quinn::Connection)>> = up.into_iter().map(Some).collect();
        hub::by_expected_answer(&costs).into_iter().filter_map(|i| slots.get_mut(i).and_then(Option::take)).collect()
    }

    /// Hubs connected right now.
    pub fn connected(&self) -> usize {
        self.links().iter().filter(|h| h.connection().is_some()).count()
    }

    /// Connection attempts to all hubs since start (reconnects included).
    pub fn connect_attempts(&self) -> u64 {
        self.links().iter().map(|h| h.attempts.load(Ordering::Relaxed)).sum()
    }

    async fn attempt(
        &self,
        link: &HubLink,
        conn: &quinn::Connection,
        model: &str,
        version: u64,
        inputs: &[NamedTensor],
        deadline: Instant,
    ) -> Result<Vec<NamedTensor>, Attempt> {
        let started = Instant::now();
        let header = RequestHeader {
            protocol: wire::PROTOCOL_VERSION,
            request_id: self.next_id.fetch_add(1, Ordering::Relaxed),
            trace_id: rand_trace(),
            model: model.to_string(),
            version: Some(version),
            budget_us: u64::try_from(deadline.saturating_duration_since(started).as_micros()).unwrap_or(u64::MAX),
            inputs: wire::tensor_headers(inputs),
        };
        let tensors: Vec<&Tensor> = inputs.iter().map(|t| &t.tensor).collect();
        let bytes = wire::encode_message(&header, &tensors).map_err(|e| Attempt::Invalid(e.to_string()))?;
        let limits = self.limits;
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("cannot open a stream: {e}"))?;
            send.write_all(&bytes).await.map_err(|e| format!("hub lost while sending: {e}"))?;
            let _ = send.finish();
            wire::read_message(&mut recv, &limits, |h: &ResponseHeader| h.result.as_deref().unwrap_or(&[]))
                .await
                .map_err(|e| format!("hub lost while answering: {e}"))
        };
        let guard = tokio::time::Instant::from_std(deadline);
        let (head, outputs) = match tokio::time::timeout_at(guard, exchange).await {
            Err(_) => {
                // A timeout is an answer time too (a lower bound): without it, a hub too slow to ever
                // answer in time would keep the estimate of its last good answers and keep being chosen.
                link.record_answer(started.elapsed());
                link.with_health(HubHealth::timed_out);
                return Err(Attempt::Next("deadline passed waiting for the hub".into()));
            }
            Ok(Err(e)) => return Err(Attempt::Next(e)),
            Ok(Ok(answer)) => answer,
        };
        link.record_load(head.load);
        match head.result {
            Ok(_) => {
                link.record_answer(started.elapsed());
                link.with_health(HubHealth::served);
                Ok(outputs)
            }
            Err((ErrorCode::BadRequest | ErrorCode::Malformed, msg)) => Err(Attempt::Invalid(msg)),
            Err((ErrorCode::Busy, msg)) => {
                link.with_health(|h| h.busy(Instant::now()));
                Err(Attempt::Next(format!("Busy: {msg}")))
            }
            Err((code, msg)) => Err(Attempt::Next(format!("{code:?}: {msg}"))),
        }
    }
}

fn rand_trace() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    // Truncating the nanoseconds is the point: only the low bits vary.
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

/// The client endpoints, one per address family.
#[derive(Clone)]
struct Endpoints {
    v4: quinn::Endpoint,
    v6: Option<quinn::Endpoint>,
}

impl Endpoints {
    /// Resolves `addr` (DNS names included) and connects from the endpoint of its family.
    async fn connect(&self, addr: &str, server_name: &str) -> Result<quinn::Connection, String> {
        let resolved: Vec<SocketAddr> =
            tokio::net::lookup_host(addr).await.map_err(|e| format!("cannot resolve {addr}: {e}"))?.collect();
        let target = resolved
            .iter()
            .find(|a| a.is_ipv4() || self.v6.is_some())
            .copied()
            .ok_or_else(|| format!("{addr} resolves to no address this node can reach ({resolved:?})"))?;
        let endpoint = match (target, &self.v6) {
            (SocketAddr::V6(_), Some(v6)) => v6,
            _ => &self.v4,
        };
        let connecting = endpoint.connect(target, server_name).map_err(|e| e.to_string())?;
        connecting.await.map_err(|e| {
            let text = e.to_string();
            if text.contains("NotValidForName") || text.contains("not valid for name") {
                format!("{text}: the hub's certificate does not carry the name '{server_name}'; give the name it has as --hub NAME@{addr} (a hub's node id is always in its certificate)")
            } else {
                text
            }
        })
    }
}

/// Keeps one hub connected: connect, wait until the connection closes, back off, reconnect.
async fn keep_connected(endpoints: Endpoints, link: Arc<HubLink>, min: Duration, max: Duration) {
    // Each link jitters on its own (seeded by its address), so edges that lost a hub together
    // come back apart.
    let mut policy = ReconnectPolicy::new(min, max, seed_of(&link.addr));
    loop {
        if link.retired.load(Ordering::Relaxed) {
            return;
        }
        link.attempts.fetch_add(1, Ordering::Relaxed);
        link.proven.store(false, Ordering::Relaxed);
        let attempt = endpoints.connect(&link.addr, &link.server_name).await;
        match attempt.and_then(|conn| match tls::peer_identity(&conn) {
            Ok(id) if id.role == Role::Hub => Ok((conn, id)),
            Ok(id) => Err(format!("peer '{}' is a {}, not a hub", id.node_id, id.role.as_str())),
            Err(e) => Err(e.to_string()),
        }) {
            Ok((conn, id)) => {
                tracing::info!(hub = %link.addr, node = %id.node_id, "connected to hub");
                if let Ok(mut name) = link.name.lock() {
                    if *name != id.node_id {
                        // Known by its node id from now on: the series under the configured name goes.
                        if let Some(m) = &link.metrics {
                            let _ = m.hub_usable.remove_label_values(&[name.as_str()]);
                        }
                        *name = id.node_id.clone();
                    }
                }
                if let Ok(mut slot) = link.conn.lock() {
                    *slot = Some(conn.clone());
                }
                link.publish();
                if link.retired.load(Ordering::Relaxed) {
                    // Retired while connecting: `retire` found no connection to close.
                    conn.close(0u32.into(), b"hub no longer listed");
                }
                tokio::spawn(read_load_reports(conn.clone(), link.clone()));
                let reason = conn.closed().await;
                if let Ok(mut slot) = link.conn.lock() {
                    *slot = None;
                }
                link.publish();
                // Closed before the hub ever answered: it refused us (TLS 1.3 checks the client's
                // certificate after connect() returns) or is failing; back off as for a failed connect.
                let proven = link.proven.load(Ordering::Relaxed);
                let retry = policy.after(if proven { LinkEnd::Lost } else { LinkEnd::ClosedUnproven });
                if retry.log && proven {
                    tracing::warn!(hub = %link.addr, "hub connection lost: {reason}; reconnecting");
                } else if retry.log {
                    tracing::warn!(hub = %link.addr, "hub closed the connection before any answer: {reason}; retrying with backoff up to {} ms", max.as_millis());
                }
                tokio::time::sleep(retry.after).await;
            }
            Err(e) => {
                let retry = policy.after(LinkEnd::ConnectFailed);
                if retry.log {
                    tracing::warn!(hub = %link.addr, "cannot connect to hub: {e}; retrying with backoff up to {} ms", max.as_millis());
                }
                tokio::time::sleep(retry.after).await;
            }
        }
    }
}

/// One of our requests in flight to a hub, counted while it lives.
struct Sending<'a>(&'a AtomicU32);

impl<'a> Sending<'a> {
    fn start(counter: &'a AtomicU32) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Sending(counter)
    }
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes the hub's load reports (datagrams) until the connection closes.
async fn read_load_reports(conn: quinn::Connection, link: Arc<HubLink>) {
    while let Ok(datagram) = conn.read_datagram().await {
        match wire::decode_load_report(&datagram) {
            Ok(load) => link.record_load(load),
            Err(e) => tracing::debug!(hub = %link.addr, "ignoring a bad load report: {e}"),
        }
    }
}

impl HubLink {
    /// Stops using this link: its connection closes (requests on it finish or fail over) and its
    /// connector ends.
    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        if let Some(conn) = self.connection() {
            conn.close(0u32.into(), b"hub no longer listed");
        }
        self.publish();
    }

    fn label(&self) -> String {
        self.name.lock().map(|n| n.clone()).unwrap_or_default()
    }

    /// Publishes whether the edge offloads to this hub now.
    fn publish(&self) {
        if let Some(m) = &self.metrics {
            let usable = !self.retired.load(Ordering::Relaxed)
                && !self.down.load(Ordering::Relaxed)
                && self.connection().is_some();
            m.hub_usable.with_label_values(&[&self.label()]).set(i64::from(usable));
        }
    }

    /// Counts one offload attempt's outcome.
    fn count(&self, outcome: &str) {
        if let Some(m) = &self.metrics {
            m.offload_attempts.with_label_values(&[&self.label(), outcome]).inc();
        }
    }
}

impl HubDirectory for Offloader {
    fn set_hubs(&self, hubs: &[HubEntry]) {
        let links = self.links();
        for entry in hubs {
            // A hub is the same hub by its node id (the name its certificate carries).
            let known: Vec<&Arc<HubLink>> = links
                .iter()
                .filter(|l| !l.retired.load(Ordering::Relaxed))
                .filter(|l| l.name.lock().is_ok_and(|n| *n == entry.node_id) || l.server_name == entry.node_id)
                .collect();
            for link in &known {
                let was_down = link.down.swap(!entry.up, Ordering::Relaxed);
                link.publish();
                if was_down == entry.up {
                    if entry.up {
                        tracing::info!(hub = %entry.node_id, "the registry says hub is up again: offloading to it");
                    } else {
                        tracing::warn!(hub = %entry.node_id, "the registry says hub is down: no offload to it until it heartbeats");
                    }
                }
            }
            let moved: Vec<&&Arc<HubLink>> = known.iter().filter(|l| l.from_registry && l.addr != entry.addr).collect();
            for link in &moved {
                tracing::info!(hub = %entry.node_id, from = %link.addr, to = %entry.addr, "hub moved");
                link.retire();
            }
            if known.is_empty() || moved.len() == known.len() {
                tracing::info!(hub = %entry.node_id, addr = %entry.addr, up = entry.up, "hub learnt from the registry");
                self.add_link(entry.addr.clone(), entry.node_id.clone(), true, !entry.up);
            }
        }
        self.hubs.write().unwrap_or_else(|p| p.into_inner()).retain(|l| !l.retired.load(Ordering::Relaxed));
    }
}

impl Overflow for Offloader {
    fn view(&self) -> Option<OffloadView> {
        self.candidates().first().map(|(h, c)| OffloadView { expected: h.expected(c) })
    }

    fn always(&self) -> bool {
        self.mode == OffloadMode::Always
    }

    fn infer<'a>(
        &'a self,
        model: &'a str,
        version: u64,
        inputs: &'a [NamedTensor],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Offloaded, OverflowError>> {
        Box::pin(async move {
            let mut failures = Vec::new();
            for (link, conn) in self.candidates() {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                let patience = link.patience(&conn);
                let attempt_deadline = deadline.min(now + patience);
                let result = {
                    // Uncounted when the attempt ends, or when this future is dropped (the client left).
                    let _sending = Sending::start(&link.in_flight);
                    self.attempt(&link, &conn, model, version, inputs, attempt_deadline).await
                };
                let name = link.name.lock().map(|n| n.clone()).unwrap_or_default();
                match result {
                    Ok(outputs) => {
                        link.count("served");
                        return Ok(Offloaded { outputs, served_by: format!("hub {name}") });
                    }
                    Err(Attempt::Invalid(msg)) => return Err(OverflowError::Invalid(msg)),
                    Err(Attempt::Next(msg)) => {
                        link.count(if msg.starts_with("Busy") { "busy" } else { "failed" });
                        tracing::debug!(hub = %name, "offload attempt failed: {msg}");
                        failures.push(format!("{name}: {msg}"));
                    }
                }
            }
            if failures.is_empty() {
                failures.push("no hub connected".into());
            }
            Err(OverflowError::Unavailable(failures.join("; ")))
        })
    }
}
