//! The `model-registry` daemon: open the store, listen on QUIC, serve.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use model_registry::replica::{self, HaConfig, LeaseTimes};
use model_registry::rollout::AnalysisSettings;
use model_registry::service::{self, Registry, Replica, Settings};
use model_registry::store::embedded::RedbStore;
use model_registry::store::Blobs;

/// The fabric's model registry: model versions, deployments and rollouts, over QUIC with mutual TLS.
///
/// Nodes (edge-node, cloud-hub started with --registry) heartbeat to it and converge to what it
/// wants; operators drive it with `fabric`. Its state survives restarts (redb in --data-dir).
///
/// Replicated: start 2 or 3 with `--store etcd://HOST:PORT,...` on one etcd cluster and one shared
/// --data-dir (the model files); one is elected leader, the others follow (answer reads, send writes
/// and heartbeats to the leader) and take over within a lease (3 s) when it dies. Give nodes and the
/// CLI every replica: `--registry registry-1@HOST:PORT,registry-2@HOST:PORT,...`.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// UDP address of the QUIC control API
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: String,
    /// The read-only status page (HTML, live): its HTTP address, or "off"
    #[arg(long, default_value = "127.0.0.1:7080")]
    http_addr: String,
    /// File holding the status page's token (first line; or FABRIC_STATUS_TOKEN): needed, as
    /// ?token=, when --http-addr is beyond loopback
    #[arg(long)]
    status_token_file: Option<PathBuf>,
    /// Folder for the database and the model files (replicated: a folder the replicas share, such as
    /// a shared volume, for the model files)
    #[arg(long, default_value = "registry-data")]
    data_dir: PathBuf,
    /// Where the state is kept: "embedded" (redb in --data-dir, one registry) or
    /// "etcd://HOST:PORT[,HOST:PORT...]" (etcd v3, for 2-3 replicas with one elected leader)
    #[arg(long, default_value = "embedded")]
    store: String,
    /// Replicated: the prefix of the registry's keys in etcd (state under <prefix>state/, the
    /// election at <prefix>leader)
    #[arg(long, default_value = model_registry::store::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// Replicated: the address clients reach this replica at, NAME@HOST:PORT (default: --node-id @
    /// the bound --listen address); followers name the leader by it
    #[arg(long)]
    advertise: Option<String>,
    /// Replicated: the leader's lease in milliseconds (a dead leader is replaced within about this;
    /// kept alive every third of it)
    #[arg(long, default_value_t = 3000)]
    lease_ms: u64,
    /// Folder with ca.pem, <node-id>.pem and <node-id>.key.pem (as `fabric certs` writes them)
    #[arg(long, default_value = "certs")]
    certs: PathBuf,
    /// This registry's id, naming its certificate in --certs
    #[arg(long, default_value = "registry-1")]
    node_id: String,
    /// Largest model file accepted, in MiB
    #[arg(long, default_value_t = 1024)]
    max_model_mib: u64,
    /// Automatic rollback: fewest canary requests in the window before judging
    #[arg(long, default_value_t = 20.0)]
    rollback_min_requests: f64,
    /// Automatic rollback: canary error share over the stable one's by more than this many points
    #[arg(long, default_value_t = 5.0)]
    rollback_error_margin_pct: f64,
    /// Automatic rollback: canary p99 over the stable one's by more than this many percent
    #[arg(long, default_value_t = 100.0)]
    rollback_p99_margin_pct: f64,
    /// Automatic rollback: canary accuracy (from feedback, POST /v2/models/NAME/feedback) under the
    /// stable one's by more than this many points
    #[arg(long, default_value_t = 5.0)]
    rollback_accuracy_margin_pct: f64,
    /// Automatic rollback: fewest labelled rows of each version before accuracy is compared
    #[arg(long, default_value_t = 100)]
    rollback_min_labelled: u64,
    /// A node is down when its last heartbeat is older than this many milliseconds
    #[arg(long, default_value_t = 3000)]
    heartbeat_timeout_ms: u64,
    /// Keep the deployments' replica counts fixed instead of scaling them to each node's load
    #[arg(long)]
    no_autoscale: bool,
    /// Autoscaling: utilisation to keep each replica at (0-1)
    #[arg(long, default_value_t = 0.6)]
    autoscale_target: f64,
    /// Autoscaling: seconds more replicas must be needed before adding one (a load step adds at once)
    #[arg(long, default_value_t = 2.0)]
    autoscale_up_delay_s: f64,
    /// Autoscaling: seconds after the last change, and of lower load, before removing replicas
    #[arg(long, default_value_t = 60.0)]
    autoscale_down_delay_s: f64,
    /// Autoscaling: seconds a model may sit idle on a hub before it goes to zero replicas (0: never);
    /// the next request waits for a replica to load if its deadline allows, else gets a 503 at once
    #[arg(long, default_value_t = 300.0)]
    hub_idle_to_zero_s: f64,
    /// Longest an idle node's heartbeat is held, in milliseconds (nodes with traffic, in a canary
    /// under analysis, and hubs report every 500 ms; an idle node reports at once when its load changes)
    #[arg(long, default_value_t = 10_000)]
    idle_heartbeat_ms: u64,
    /// A node down for longer than this many seconds is forgotten, with its autoscaling records
    #[arg(long, default_value_t = 86_400)]
    forget_nodes_after_s: u64,
    /// QUIC handshakes in progress at most; one that cannot start within 1 s is refused at once and
    /// the node retries with jittered backoff (a whole fleet reconnecting after a restart comes in waves)
    #[arg(long, default_value_t = 256)]
    max_handshakes: usize,
    /// Longest a stream may take to deliver its request once opened, in ms; one that announces a
    /// frame and stalls is answered `timeout` and closed
    #[arg(long, default_value_t = 10_000)]
    request_timeout_ms: u64,
    /// Streams one connection may have open at once (a node holds one heartbeat and a few fetches);
    /// more wait for one to end
    #[arg(long, default_value_t = 64)]
    max_streams_per_connection: u32,
    /// UDP receive and send buffer of the QUIC socket, in MiB (the kernel may cap it: net.core.rmem_max)
    #[arg(long, default_value_t = 8)]
    socket_buffer_mib: usize,
    /// Runtime threads (0: one per core)
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// The UDP socket of the QUIC endpoint, with buffers sized for a fleet (the kernel's default, about
/// 200 KiB, drops datagrams once about a thousand nodes heartbeat).
fn fleet_socket(addr: std::net::SocketAddr, buffer: usize) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    for (what, set) in [
        ("receive", Socket::set_recv_buffer_size as fn(&Socket, usize) -> std::io::Result<()>),
        ("send", Socket::set_send_buffer_size),
    ] {
        if let Err(e) = set(&socket, buffer) {
            tracing::warn!("cannot size the UDP {what} buffer to {buffer} bytes: {e}");
        }
    }
    let (got_recv, got_send) = (socket.recv_buffer_size()?, socket.send_buffer_size()?);
    if got_recv < buffer {
        // Linux doubles what it grants and caps it at net.core.rmem_max.
        tracing::warn!(
            "UDP receive buffer is {got_recv} bytes, under the {buffer} asked for: raise net.core.rmem_max for fleets of thousands of nodes"
        );
    }
    tracing::debug!(recv = got_recv, send = got_send, "QUIC socket buffers");
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A stateless-reset key derived from the registry's private key: a registry restarted with the same
/// certificate resets the connections of its previous run on their next packet, so nodes reconnect at
/// once instead of waiting for the idle timeout.
/// The connection ids it hands out are keyed the same way: a restarted registry recognises its
/// previous run's ids (quinn only resets connections whose id it can validate).
fn restart_keys(key_file: &std::path::Path) -> anyhow::Result<(ring::hmac::Key, u64)> {
    let secret = std::fs::read(key_file).map_err(|e| anyhow::anyhow!("{}: {e}", key_file.display()))?;
    let derive = |label: &[u8]| {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(label);
        context.update(&secret);
        context.finish()
    };
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derive(b"fabric registry stateless reset v1").as_ref());
    let cid = derive(b"fabric registry connection ids v1");
    let cid_key = u64::from_be_bytes(cid.as_ref()[..8].try_into().map_err(|_| anyhow::anyhow!("digest too short"))?);
    Ok((reset, cid_key))
}

/// The endpoints of `etcd://HOST:PORT[,HOST:PORT...]`.
fn etcd_endpoints(store: &str) -> anyhow::Result<Vec<String>> {
    let list = store
        .strip_prefix("etcd://")
        .ok_or_else(|| anyhow::anyhow!("--store {store}: use \"embedded\" or \"etcd://HOST:PORT[,HOST:PORT...]\""))?;
    let endpoints: Vec<String> = list.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_string).collect();
    if endpoints.is_empty() {
        anyhow::bail!("--store {store}: name at least one etcd endpoint, as etcd://127.0.0.1:2379");
    }
    Ok(endpoints)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let threads =
        if cli.threads > 0 { cli.threads } else { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?;
    runtime.block_on(async move {
        let settings = Settings {
            max_model_bytes: cli.max_model_mib << 20,
            analysis: AnalysisSettings {
                min_requests: cli.rollback_min_requests,
                error_margin_pct: cli.rollback_error_margin_pct,
                p99_margin_pct: cli.rollback_p99_margin_pct,
                min_labelled: cli.rollback_min_labelled,
                accuracy_margin_pct: cli.rollback_accuracy_margin_pct,
            },
            heartbeat_timeout: std::time::Duration::from_millis(cli.heartbeat_timeout_ms),
            // max_replicas 0: each node's cores.
            autoscale: (!cli.no_autoscale).then(|| fabric_policy::autoscale::AutoscaleSettings {
                max_replicas: 0,
                target_utilisation: cli.autoscale_target,
                up_delay_s: cli.autoscale_up_delay_s,
                down_delay_s: cli.autoscale_down_delay_s,
                ..Default::default()
            }),
            hub_idle_to_zero_s: cli.hub_idle_to_zero_s,
            idle_heartbeat: std::time::Duration::from_millis(cli.idle_heartbeat_ms),
            forget_after: std::time::Duration::from_secs(cli.forget_nodes_after_s),
            ..Settings::default()
        };
        let etcd = match cli.store.as_str() {
            "embedded" => None,
            other => Some(etcd_endpoints(other)?),
        };
        let files = fabric_proto::tls::TlsFiles::in_dir(&cli.certs, &cli.node_id);
        let mut config = fabric_proto::tls::server_config(&files).map_err(|e| {
            anyhow::anyhow!(
                "{e} (create development certificates with `fabric certs --out {} --node {}:registry`)",
                cli.certs.display(),
                cli.node_id
            )
        })?;
        let mut transport = fabric_proto::registry::transport();
        transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(cli.max_streams_per_connection.max(1)));
        transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
        config.transport_config(Arc::new(transport));
        let addr: std::net::SocketAddr =
            cli.listen.parse().map_err(|e| anyhow::anyhow!("--listen {}: {e}", cli.listen))?;
        let socket = fleet_socket(addr, cli.socket_buffer_mib << 20)?;
        let (reset, cid_key) = restart_keys(&files.key)?;
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset));
        endpoint_config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
        // quinn sends at most one stateless reset per 20 ms by default (and datagrams read in one
        // batch share one timestamp): after a restart, most of a fleet would wait out the idle
        // timeout instead. A reset is always smaller than the packet that caused it, so sending one
        // per stray packet amplifies nothing.
        endpoint_config.min_reset_interval(std::time::Duration::ZERO);
        let endpoint = quinn::Endpoint::new(endpoint_config, Some(config), socket, Arc::new(quinn::TokioRuntime))?;
        let bound = endpoint.local_addr()?;
        let (replica, campaign) = match etcd {
            None => (Replica::single(Registry::open(Box::new(RedbStore::open(&cli.data_dir)?), settings)?), None),
            Some(endpoints) => {
                let advertise = cli.advertise.clone().unwrap_or_else(|| format!("{}@{bound}", cli.node_id));
                let ha = HaConfig {
                    endpoints,
                    prefix: cli.etcd_prefix.clone(),
                    advertise,
                    settings,
                    lease: LeaseTimes {
                        ttl: std::time::Duration::from_millis(cli.lease_ms.max(1000)),
                        keep_alive: std::time::Duration::from_millis((cli.lease_ms / 3).max(200)),
                    },
                };
                // Each replica stages uploads in a folder of its own beside the shared blobs.
                let blobs = Arc::new(Blobs::open(
                    cli.data_dir.join("blobs"),
                    cli.data_dir.join(format!("staging-{}", cli.node_id)),
                )?);
                let replica = replica::start(&ha, blobs.clone()).await.map_err(|e| {
                    anyhow::anyhow!("{e:#} (is etcd running at {}? check --store)", ha.endpoints.join(","))
                })?;
                (replica.clone(), Some(tokio::spawn(replica::run(replica, ha, blobs))))
            }
        };
        if cli.http_addr != "off" {
            let token = match &cli.status_token_file {
                Some(file) => Some(
                    std::fs::read_to_string(file)
                        .map_err(|e| anyhow::anyhow!("--status-token-file {}: {e}", file.display()))?
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                ),
                None => std::env::var("FABRIC_STATUS_TOKEN").ok().map(|t| t.trim().to_string()),
            }
            .filter(|t| !t.is_empty());
            let page = model_registry::status_page::start(Arc::clone(&replica), &cli.http_addr, token.as_deref())
                .map_err(|e| {
                    anyhow::anyhow!(
                        "the status page cannot listen on {}: {e} (pass another --http-addr, or --http-addr off)",
                        cli.http_addr
                    )
                })?;
            // A line scripts and tests wait for (before the listening line).
            println!("model-registry status page on http://{page}");
        }
        tracing::info!(%bound, data = %cli.data_dir.display(), store = %cli.store, "model-registry ready");
        println!("model-registry listening on quic://{bound}");
        let admission = service::Admission {
            max_handshakes: cli.max_handshakes.max(1),
            request_timeout: std::time::Duration::from_millis(cli.request_timeout_ms.max(1)),
            ..Default::default()
        };
        let serving = tokio::spawn(service::serve(endpoint.clone(), Arc::clone(&replica), admission));
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        endpoint.close(0u32.into(), b"registry shutting down");
        if let Some(campaign) = campaign {
            campaign.abort();
        }
        let registry = replica.current();
        if registry.is_leader() {
            tokio::task::block_in_place(|| registry.flush_scaled());
        }
        serving.abort();
        Ok(())
    })
}
