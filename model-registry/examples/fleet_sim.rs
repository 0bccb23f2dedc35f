//! The fleet simulator: N simulated nodes in one process speaking the registry's own protocol to a
//! real `model-registry` (which it starts, kills with SIGKILL and restarts), each with its own
//! certificate from the fabric CA, heartbeating as `fabric_node::agent` does (the same `Heartbeat`
//! message, a load report of the same shape, the long poll, the jittered backoff); an operator drives
//! rollouts through the same client the `fabric` CLI uses. What a simulated node does not do is load
//! models: it reports a version ready as soon as its desired state names it.
//!
//! Phases: connect from cold; steady state (registry CPU and RSS from /proc); canary, promote,
//! rollback (time from the operator's call returning to each node's answer carrying the change);
//! reads (`nodes --state down`, `rollout status`, the status page's overview); registry kill -9 and
//! restart with the whole fleet reconnecting. Prints a markdown row per phase and writes JSON.
//!
//! `cargo run --release -p model-registry --example fleet_sim -- --nodes 1000 --registry-bin target/release/model-registry --model build/models/mlp/1/model.onnx --model2 build/models/mlp_alt/1/model.onnx`
//! (scripts/bench/fleet.sh runs it at 1,000, 3,000 and 10,000 nodes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fabric_policy::backoff::{seed_of, Backoff};
use fabric_policy::histogram::LatencyHistogram;
use fabric_proto::answers::NodeView;
use fabric_proto::registry::{
    DesiredState, Heartbeat, NodeInfo, NodeQuery, ReadyVersion, RegistryAddr, RegistryClient, Request, RolloutAction,
    Target,
};
use fabric_proto::report::{ModelReport, NodeReport, VersionReport, WindowReport};
use fabric_proto::tls::{generate_dev_pki_with_names, NodeCert, Role, TlsFiles};
use fabric_types::EngineKind;
use serde_json::{json, Value};

/// The model every simulated node serves.
const MODEL: &str = "fleet";

struct Args {
    nodes: usize,
    hubs: usize,
    ramp: Duration,
    steady: Duration,
    registry_bin: PathBuf,
    model: PathBuf,
    model2: PathBuf,
    work: PathBuf,
    out: Option<PathBuf>,
    endpoints: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        nodes: 1000,
        hubs: 4,
        ramp: Duration::from_secs(10),
        steady: Duration::from_secs(30),
        registry_bin: PathBuf::from("target/release/model-registry"),
        model: PathBuf::from("build/models/mlp/1/model.onnx"),
        model2: PathBuf::from("build/models/mlp_alt/1/model.onnx"),
        work: std::env::temp_dir().join(format!("fleet-sim-{}", std::process::id())),
        out: None,
        endpoints: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--nodes" => a.nodes = value()?.parse()?,
            "--hubs" => a.hubs = value()?.parse()?,
            "--ramp-s" => a.ramp = Duration::from_secs_f64(value()?.parse()?),
            "--steady-s" => a.steady = Duration::from_secs_f64(value()?.parse()?),
            "--registry-bin" => a.registry_bin = value()?.into(),
            "--model" => a.model = value()?.into(),
            "--model2" => a.model2 = value()?.into(),
            "--work" => a.work = value()?.into(),
            "--out" => a.out = Some(value()?.into()),
            "--endpoints" => a.endpoints = value()?.parse()?,
            "--help" | "-h" => {
                println!("fleet_sim [--nodes N] [--hubs H] [--ramp-s S] [--steady-s S] [--registry-bin F] [--model F] [--model2 F] [--work DIR] [--out F.json] [--endpoints E (0: one per 250 nodes)]");
                std::process::exit(0);
            }
            other => bail!("unknown flag {other} (--help lists them)"),
        }
    }
    Ok(a)
}

/// What the simulated fleet has seen, shared by its nodes.
#[derive(Default)]
struct Seen {
    /// Nodes that got a first answer since `epoch` was last bumped.
    connected: AtomicUsize,
    /// Failed heartbeats (connects included).
    errors: AtomicU64,
    /// The same, by the start of their message.
    error_kinds: Mutex<BTreeMap<String, u64>>,
    /// Heartbeats answered.
    answers: AtomicU64,
    /// When each node first saw the change being measured (`None`: not yet).
    watch: Mutex<Option<Watch>>,
}

/// A change being measured: the predicate on a desired state, and when each node first matched it.
struct Watch {
    matches: fn(&DesiredState) -> bool,
    at: BTreeMap<usize, Instant>,
}

struct Node {
    index: usize,
    info: NodeInfo,
    client: Arc<RegistryClient>,
    seen: Arc<Seen>,
    /// Bumped when the registry restarts: each node counts itself connected again once.
    epoch: Arc<AtomicU64>,
}

/// The load report an idle node sends: the shape of `fabric_node::control::NodeReport`.
fn report(ready: &[ReadyVersion], uptime_ms: u64) -> NodeReport {
    // A node's window with answers spread over 24 latency buckets, as a serving node's is: the
    // registry merges these for every version's percentiles.
    let mut dense = vec![0u32; fabric_policy::histogram::BUCKETS];
    for (i, n) in dense.iter_mut().enumerate().skip(150).take(24) {
        *n = 1 + (i as u32 % 7);
    }
    let latency = LatencyHistogram::from_dense(&dense);
    let window = WindowReport { window_ms: 3500, answered: latency.count(), latency, ..WindowReport::default() };
    let versions = ready
        .iter()
        .map(|r| VersionReport {
            name: r.name.clone(),
            version: r.version,
            ready: true,
            weight_pct: 100.0,
            on_gpu: false,
            engine: EngineKind::Tract,
            engine_choice: None,
            target_replicas: 1,
            ready_replicas: 1,
            loading_replicas: 0,
            busy_replicas: 0,
            queue_depth: 0,
            in_flight: 0,
            restarts: 0,
            last_load_error: None,
            cold_start_ms: Some(3.0),
            gpu_memory_mib: None,
            replicas_per_gpu: None,
            drift: None,
            feedback: None,
            window: window.clone(),
            recent: WindowReport { latency: LatencyHistogram::default(), ..window.clone() },
        })
        .collect();
    let models = ready
        .iter()
        .map(|r| ModelReport { name: r.name.clone(), policy: None, shadow: None, last_load_error: None })
        .collect();
    NodeReport { node: "edge-node".into(), uptime_ms, models, versions }
}

impl Node {
    async fn run(self) {
        let started = Instant::now();
        let mut applied = 0u64;
        let mut ready: Vec<ReadyVersion> = Vec::new();
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5), seed_of(&self.info.node_id));
        let mut counted_epoch = u64::MAX;
        loop {
            let heartbeat = Heartbeat {
                info: self.info.clone(),
                applied,
                ready: ready.clone(),
                report: report(&ready, started.elapsed().as_millis() as u64),
                wait_ms: 500,
                max_wait_ms: 10_000,
            };
            // As the agent: an answer later than the longest hold plus 10 s means the registry is gone.
            let request = Request::Heartbeat(heartbeat);
            let answer = match tokio::time::timeout(Duration::from_secs(20), self.client.call(&request)).await {
                Ok(answer) => answer,
                Err(_) => {
                    self.client.forget_connection().await;
                    Err(fabric_proto::registry::ProtoError::Io("no answer in 20 s".into()))
                }
            };
            let desired = match answer.map(serde_json::from_value::<DesiredState>) {
                Ok(Ok(d)) => d,
                failed => {
                    let why = match failed {
                        Err(e) => e.to_string(),
                        Ok(Err(e)) => format!("malformed answer: {e}"),
                        Ok(Ok(_)) => String::new(),
                    };
                    let kind: String = why.chars().take(60).collect();
                    *self.seen.error_kinds.lock().unwrap_or_else(|p| p.into_inner()).entry(kind).or_default() += 1;
                    self.seen.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            backoff.reset();
            self.seen.answers.fetch_add(1, Ordering::Relaxed);
            let epoch = self.epoch.load(Ordering::Acquire);
            if counted_epoch != epoch {
                counted_epoch = epoch;
                self.seen.connected.fetch_add(1, Ordering::AcqRel);
            }
            if let Some(w) = self.seen.watch.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                if (w.matches)(&desired) {
                    w.at.entry(self.index).or_insert_with(Instant::now);
                }
            }
            // Converged at once: every version it names is "ready" (a simulated node loads nothing).
            ready = desired
                .models
                .iter()
                .flat_map(|m| m.versions.iter().map(|v| ReadyVersion { name: m.name.clone(), version: v.version }))
                .collect();
            applied = desired.revision;
        }
    }
}

fn versions_of(d: &DesiredState) -> Vec<u64> {
    d.models.iter().filter(|m| m.name == MODEL).flat_map(|m| m.versions.iter().map(|v| v.version)).collect()
}

fn weights_of(d: &DesiredState) -> Vec<(u64, u32)> {
    d.models
        .iter()
        .filter(|m| m.name == MODEL)
        .filter_map(|m| m.policy.as_ref())
        .flat_map(|p| p.weights.iter().map(|(v, w)| (*v, *w)))
        .collect()
}

/// The registry under test: its process and what /proc says of it.
struct Registry {
    child: Child,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

impl Registry {
    fn start(bin: &Path, args: Vec<String>, log: &Path) -> anyhow::Result<Registry> {
        let child = spawn_registry(bin, &args, log)?;
        Ok(Registry { child, bin: bin.to_path_buf(), args, log: log.to_path_buf() })
    }

    fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.child.kill()?; // SIGKILL
        self.child.wait()?;
        self.child = spawn_registry(&self.bin, &self.args, &self.log)?;
        Ok(())
    }

    /// CPU seconds (user + system) and resident MiB.
    fn usage(&self) -> (f64, f64) {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        // utime and stime are fields 14 and 15 of stat (11 and 12 after the command name).
        let cpu = (ticks(11) + ticks(12)) / 100.0;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss_kb = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .unwrap_or(0.0);
        (cpu, rss_kb / 1024.0)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_registry(bin: &Path, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    // Ready once it prints its listening line.
    use std::io::BufRead;
    let stdout = child.stdout.take().context("registry stdout")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("listening on quic://") => break,
            Some(Ok(_)) => {}
            _ => bail!("the registry exited before listening"),
        }
        if Instant::now() > deadline {
            bail!("the registry did not listen within 30 s");
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Ok(child)
}

/// Nodes the registry's log says it marked down: a line per node, or one line for many (`nodes=N`).
fn marked_down(log: &str) -> u64 {
    log.lines()
        .map(|l| {
            if l.contains("node down") {
                1
            } else if l.contains("nodes down") {
                l.split("nodes=")
                    .nth(1)
                    .and_then(|rest| {
                        rest.trim_start_matches(|c: char| !c.is_ascii_digit())
                            .split(|c: char| !c.is_ascii_digit())
                            .next()
                    })
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(1)
            } else {
                0
            }
        })
        .sum()
}

/// A client endpoint whose socket has 8 MiB buffers: hundreds of simulated nodes share it, and with
/// the kernel's default (~200 KiB) a burst of handshake flights is dropped and retransmitted seconds
/// later, which real nodes (a socket each) never see.
fn client_endpoint(bind: std::net::SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_recv_buffer_size(8 << 20)?;
    socket.set_send_buffer_size(8 << 20)?;
    socket.bind(&bind.into())?;
    Ok(quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket.into(), Arc::new(quinn::TokioRuntime))?)
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Measures one change: `act` runs the operator's call; returns p50 / p99 / max in ms from its return
/// and how many nodes matched within `limit`.
async fn measure(
    seen: &Seen,
    nodes: usize,
    matches: fn(&DesiredState) -> bool,
    act: impl std::future::Future<Output = anyhow::Result<()>>,
    limit: Duration,
) -> anyhow::Result<Value> {
    *seen.watch.lock().unwrap_or_else(|p| p.into_inner()) = Some(Watch { matches, at: BTreeMap::new() });
    act.await?;
    let returned = Instant::now();
    let deadline = returned + limit;
    loop {
        let got = seen.watch.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(0, |w| w.at.len());
        if got >= nodes || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let watch = seen.watch.lock().unwrap_or_else(|p| p.into_inner()).take().context("watch")?;
    let mut ms: Vec<f64> =
        watch.at.values().map(|t| t.saturating_duration_since(returned).as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    Ok(json!({
        "reached": ms.len(), "of": nodes,
        "p50_ms": percentile(&ms, 0.5), "p99_ms": percentile(&ms, 0.99), "max_ms": ms.last().copied().unwrap_or(f64::NAN),
        "within_1s_pct": ms.iter().filter(|&&m| m <= 1000.0).count() as f64 * 100.0 / nodes as f64,
    }))
}

async fn timed(client: &RegistryClient, request: Request) -> anyhow::Result<(f64, usize)> {
    let t = Instant::now();
    let answer = client.call(&request).await?;
    Ok((t.elapsed().as_secs_f64() * 1e3, serde_json::to_vec(&answer)?.len()))
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(&args.work);
    let certs = args.work.join("certs");
    let data = args.work.join("registry-data");
    let t = Instant::now();
    let ids: Vec<(String, Role)> = (0..args.nodes)
        .map(|i| (format!("sim-edge-{i:05}"), Role::Edge))
        .chain((0..args.hubs).map(|i| (format!("sim-hub-{i:02}"), Role::Hub)))
        .collect();
    let mut certs_wanted: Vec<NodeCert> =
        ids.iter().map(|(id, role)| NodeCert { id: id.clone(), role: *role, names: vec![] }).collect();
    certs_wanted.push(NodeCert { id: "registry-1".into(), role: Role::Registry, names: vec!["127.0.0.1".into()] });
    certs_wanted.push(NodeCert { id: "operator".into(), role: Role::Operator, names: vec![] });
    generate_dev_pki_with_names(&certs, &certs_wanted)?;
    eprintln!("{} certificates in {:.1} s", certs_wanted.len(), t.elapsed().as_secs_f64());

    let port = free_udp_port()?;
    let registry_args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--http-addr",
        "off",
        "--data-dir",
        &data.display().to_string(),
        "--certs",
        &certs.display().to_string(),
        "--node-id",
        "registry-1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = args.work.join("registry.log");
    let mut registry = Registry::start(&args.registry_bin, registry_args, &log)?;
    let target = RegistryAddr::parse(&format!("registry-1@127.0.0.1:{port}")).map_err(anyhow::Error::msg)?;
    let operator = RegistryClient::new(target.clone(), &TlsFiles::in_dir(&certs, "operator"))?;
    operator.push(MODEL, Some(1), &args.model, |_, _| {}).await?;
    operator.push(MODEL, Some(2), &args.model2, |_, _| {}).await?;
    operator
        .call(&Request::Deploy {
            name: MODEL.into(),
            to: Target::Edge,
            labels: BTreeMap::new(),
            replicas: 1,
            cascade: None,
        })
        .await?;
    operator.call(&Request::Rollout { name: MODEL.into(), change: RolloutAction::Pin { version: 1 } }).await?;

    let mut results = serde_json::Map::new();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    results.insert(
        "machine".into(),
        json!(format!("{cpu_model}, {} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0))),
    );
    results.insert("nodes".into(), json!(args.nodes));
    results.insert("hubs".into(), json!(args.hubs));

    // Connect from cold: every node starts within the ramp.
    let seen = Arc::new(Seen::default());
    let epoch = Arc::new(AtomicU64::new(0));
    let bind: std::net::SocketAddr = "127.0.0.1:0".parse()?;
    // One UDP socket per 250 simulated nodes (default), as a few hundred processes would have.
    let sockets = if args.endpoints > 0 { args.endpoints } else { (args.nodes / 250).max(4) };
    let endpoints: Vec<quinn::Endpoint> = (0..sockets).map(|_| client_endpoint(bind)).collect::<Result<_, _>>()?;
    let total = ids.len();
    let started = Instant::now();
    for (i, (id, role)) in ids.iter().enumerate() {
        let client = RegistryClient::on_endpoint(
            endpoints[i % endpoints.len()].clone(),
            target.clone(),
            &TlsFiles::in_dir(&certs, id),
        )?;
        let info = NodeInfo {
            node_id: id.clone(),
            role: role.as_str().into(),
            labels: BTreeMap::from([("site".to_string(), format!("site-{}", i % 50))]),
            engines: vec!["tract".into()],
            cores: 2,
            memory_mib: 2048,
            gpu: None,
            http: format!("127.0.0.1:{}", 20000 + i % 40000),
            quic: (*role == Role::Hub).then(|| format!("127.0.0.1:{}", 4433 + i % 1000)),
        };
        let node = Node { index: i, info, client, seen: seen.clone(), epoch: epoch.clone() };
        let due = started + args.ramp.mul_f64(i as f64 / total as f64);
        tokio::spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            node.run().await;
        });
    }
    let connect_limit = args.ramp + Duration::from_secs(120);
    while seen.connected.load(Ordering::Acquire) < total && started.elapsed() < connect_limit {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connected = seen.connected.load(Ordering::Acquire);
    let connect = json!({ "connected": connected, "of": total, "s": started.elapsed().as_secs_f64(),
        "ramp_s": args.ramp.as_secs_f64(), "errors": seen.errors.load(Ordering::Relaxed) });
    eprintln!("connect: {connect}");
    results.insert("connect".into(), connect);

    // Steady state: settle, then CPU and RSS over the window.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (cpu0, _) = registry.usage();
    let answers0 = seen.answers.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut rss = Vec::new();
    while t0.elapsed() < args.steady {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push(registry.usage().1);
    }
    let (cpu1, _) = registry.usage();
    let secs = t0.elapsed().as_secs_f64();
    let steady = json!({
        "cpu_pct": (cpu1 - cpu0) / secs * 100.0,
        "rss_mib_min": rss.iter().copied().fold(f64::INFINITY, f64::min),
        "rss_mib_max": rss.iter().copied().fold(0.0, f64::max),
        "heartbeats_per_s": (seen.answers.load(Ordering::Relaxed) - answers0) as f64 / secs,
        "s": secs,
        "errors": seen.errors.load(Ordering::Relaxed),
    });
    eprintln!("steady: {steady}");
    results.insert("steady".into(), steady);

    // Rollouts: canary 10%, promote, rollback; each timed from the operator's call returning.
    let edges = args.nodes;
    let call = |change: RolloutAction| {
        let operator = operator.clone();
        async move {
            operator.call(&Request::Rollout { name: MODEL.into(), change }).await?;
            Ok(())
        }
    };
    let canary = measure(
        &seen,
        edges,
        |d| versions_of(d).contains(&2),
        call(RolloutAction::Canary { version: 2, weight: 10, auto_rollback: false }),
        Duration::from_secs(20),
    )
    .await?;
    eprintln!("canary: {canary}");
    results.insert("canary".into(), canary);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let promote =
        measure(&seen, edges, |d| weights_of(d) == [(2, 100)], call(RolloutAction::Promote), Duration::from_secs(20))
            .await?;
    eprintln!("promote: {promote}");
    results.insert("promote".into(), promote);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rollback =
        measure(&seen, edges, |d| versions_of(d).contains(&1), call(RolloutAction::Rollback), Duration::from_secs(20))
            .await?;
    eprintln!("rollback: {rollback}");
    results.insert("rollback".into(), rollback);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Reads, as the CLI and the status page make them.
    let mut reads = serde_json::Map::new();
    for (what, request) in [
        (
            "nodes --state down",
            Request::Nodes(NodeQuery { state: Some("down".into()), limit: Some(100), ..Default::default() }),
        ),
        ("nodes (first 100)", Request::Nodes(NodeQuery { limit: Some(100), ..Default::default() })),
        ("rollout status", Request::RolloutStatus { name: MODEL.into(), limit: None }),
        ("status page data", Request::Overview),
    ] {
        let mut ms = Vec::new();
        let mut bytes = 0;
        for _ in 0..5 {
            let (t, b) = timed(&operator, request.clone()).await?;
            ms.push(t);
            bytes = b;
        }
        ms.sort_by(f64::total_cmp);
        reads
            .insert(what.into(), json!({ "p50_ms": percentile(&ms, 0.5), "max_ms": ms[ms.len() - 1], "bytes": bytes }));
    }
    let down = operator
        .ask::<Vec<NodeView>>(&Request::Nodes(NodeQuery { state: Some("down".into()), ..Default::default() }))
        .await?
        .len();
    reads.insert("nodes_down".into(), json!(down));
    eprintln!("reads: {}", Value::Object(reads.clone()));
    results.insert("reads".into(), Value::Object(reads));

    // kill -9 and restart: the whole fleet reconnects.
    epoch.fetch_add(1, Ordering::AcqRel);
    seen.connected.store(0, Ordering::Release);
    let errors0 = seen.errors.load(Ordering::Relaxed);
    let killed = Instant::now();
    registry.kill_and_restart()?;
    let restarted = killed.elapsed().as_secs_f64();
    let mut progress = Vec::new();
    while seen.connected.load(Ordering::Acquire) < total && killed.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = killed.elapsed().as_secs() as usize;
        if progress.len() <= second {
            progress.push(seen.connected.load(Ordering::Acquire));
        }
    }
    eprintln!("reconnected per second since the kill: {progress:?}");
    let back = killed.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let down = operator
        .ask::<Vec<NodeView>>(&Request::Nodes(NodeQuery { state: Some("down".into()), ..Default::default() }))
        .await?
        .len();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let restart = json!({
        "reconnected": seen.connected.load(Ordering::Acquire), "of": total,
        "s_from_kill": back, "registry_restart_s": restarted,
        "retried_heartbeats": seen.errors.load(Ordering::Relaxed) - errors0,
        "nodes_down_after": down,
        "nodes_marked_down": marked_down(&log_text),
    });
    eprintln!("restart: {restart}");
    results.insert("restart".into(), restart);

    results.insert("error_kinds".into(), json!(*seen.error_kinds.lock().unwrap_or_else(|p| p.into_inner())));
    let results = Value::Object(results);
    println!("{}", serde_json::to_string_pretty(&results)?);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_vec_pretty(&results)?)?;
    }
    drop(registry);
    let _ = std::fs::remove_dir_all(&args.work);
    Ok(())
}
