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
//! reconnect backs off instead of looping; and no request is sent on a connection until it has shown
//! one (the hub's first load report comes one round trip after the handshake).
//!
//! Here: the [`Offloader`] and its hub set (the registry's list applied through the pure
//! [`hub_set`] diff). Its parts: [`config`], [`link`] (one hub's state), [`connector`] (keeping it
//! connected), [`send`] (requests to hubs).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabric_node::agent::HubDirectory;
use fabric_node::dispatch::{Offloaded, Overflow, OverflowError};
use fabric_node::metrics::Metrics;
use fabric_policy::admission::{self, OffloadView};
use fabric_policy::backoff::seed_of;
use fabric_policy::hub::{self, HubHealth, Reported};
use fabric_policy::reconnect::{LinkEnd, ReconnectPolicy};
use fabric_policy::uplink::Uplink;
use fabric_proto::registry::HubEntry;
use fabric_proto::tls::{self, Role, TlsFiles};
use fabric_proto::wire::{self, Arrival, ErrorCode, HubLoad, RequestHeader, ResponseHeader, WireLimits};
use fabric_types::tensor::{NamedTensor, Tensor};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

mod config;
mod congestion;
mod connector;
mod hub_set;
mod link;
mod send;

pub use config::{Congestion, HubEndpoint, OffloadConfig, OffloadMode, OffloadSetupError};

use connector::{keep_connected, Endpoints};
use link::HubLink;

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
        transport.congestion_controller_factory(config.congestion.factory());
        // Requests cross the link one after another, in the order sent, as the offload's backlog
        // reckons them: interleaved (quinn's default), two requests on a 10 Mbit/s link each took
        // twice as long, the earlier one past the time it was judged by.
        transport.send_fairness(false);
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
            uplink: Mutex::new(Uplink::default()),
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

    /// Hubs that are up, connected and have room, the soonest expected answer for a request of
    /// `bytes` first.
    fn candidates(&self, bytes: u64) -> Vec<(Arc<HubLink>, quinn::Connection)> {
        let now = Instant::now();
        let up: Vec<_> = self
            .links()
            .into_iter()
            .filter(|h| !h.down.load(Ordering::Relaxed) && h.has_room(now))
            .filter_map(|h| h.usable_connection().map(|c| (h, c)))
            .collect();
        let costs: Vec<(u32, Duration)> = up
            .iter()
            .map(|(h, c)| (h.reported_in_flight(now) + h.in_flight.load(Ordering::Relaxed), h.expected(c, bytes)))
            .collect();
        let mut slots: Vec<Option<(Arc<HubLink>, quinn::Connection)>> = up.into_iter().map(Some).collect();
        hub::by_expected_answer(&costs).into_iter().filter_map(|i| slots.get_mut(i).and_then(Option::take)).collect()
    }

    /// Hubs connected right now that have shown they accept this node.
    pub fn connected(&self) -> usize {
        self.links().iter().filter(|h| h.usable_connection().is_some()).count()
    }

    /// Connection attempts to all hubs since start (reconnects included).
    pub fn connect_attempts(&self) -> u64 {
        self.links().iter().map(|h| h.attempts.load(Ordering::Relaxed)).sum()
    }
}

impl HubDirectory for Offloader {
    fn set_hubs(&self, hubs: &[HubEntry]) {
        let links = self.links();
        let known: Vec<hub_set::Known> = links
            .iter()
            .map(|l| hub_set::Known {
                name: l.name.lock().map(|n| n.clone()).unwrap_or_default(),
                server_name: l.server_name.clone(),
                addr: l.addr.clone(),
                from_registry: l.from_registry,
                down: l.down.load(Ordering::Relaxed),
                retired: l.retired.load(Ordering::Relaxed),
            })
            .collect();
        for change in hub_set::diff(&known, hubs) {
            match change {
                hub_set::Change::Mark { link, hub, down, changed } => {
                    links[link].down.store(down, Ordering::Relaxed);
                    links[link].publish();
                    match (changed, down) {
                        (true, false) => tracing::info!(%hub, "the registry says hub is up again: offloading to it"),
                        (true, true) => {
                            tracing::warn!(%hub, "the registry says hub is down: no offload to it until it heartbeats")
                        }
                        (false, _) => {}
                    }
                }
                hub_set::Change::Retire { link, hub, to } => {
                    tracing::info!(%hub, from = %links[link].addr, %to, "hub moved");
                    links[link].retire();
                }
                hub_set::Change::Add { node_id, addr, down } => {
                    tracing::info!(hub = %node_id, %addr, up = !down, "hub learnt from the registry");
                    self.add_link(addr, node_id, true, down);
                }
            }
        }
        self.hubs.write().unwrap_or_else(|p| p.into_inner()).retain(|l| !l.retired.load(Ordering::Relaxed));
    }
}
