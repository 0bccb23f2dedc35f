//! How an edge offloads, as its config says: the hubs (`[NAME@]HOST:PORT`), the mode, the reconnect
//! delays, and why a setup is refused.

use super::*;

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
    pub(super) fn host_and_port(&self) -> Result<(String, u16), OffloadSetupError> {
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
    pub(super) fn server_name(&self) -> Result<String, OffloadSetupError> {
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

/// The QUIC congestion controller of the links to hubs (it sets how fast requests go up).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// CUBIC (quinn's default): loss-driven; on a lossy link its window stays small (measured across
    /// a 40 ms, 50 Mbit/s link with 1% loss: 1% of what the link carries).
    Cubic,
    /// BBR (the default): paced at the measured bottleneck rate, not cut back by random loss (94% of
    /// what the same link carries). quinn labels its BBR experimental; `cubic` is the fallback.
    #[default]
    Bbr,
    /// NewReno: the classic loss-driven controller.
    Newreno,
    /// BBR and CUBIC side by side, the larger window sending (`super::congestion`): at or above BBR
    /// on every emulated link measured, below CUBIC on a long clean one.
    Hybrid,
}

impl Congestion {
    /// quinn's factory for this controller.
    pub(super) fn factory(self) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        match self {
            Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
            Congestion::Bbr => Arc::new(quinn::congestion::BbrConfig::default()),
            Congestion::Newreno => Arc::new(quinn::congestion::NewRenoConfig::default()),
            Congestion::Hybrid => Arc::new(super::congestion::HybridConfig::default()),
        }
    }
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
    /// The QUIC congestion controller towards hubs: `bbr` (default), `cubic` or `newreno`.
    pub congestion: Congestion,
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
            congestion: Congestion::Bbr,
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
