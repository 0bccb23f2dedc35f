//! Test support: a whole local fabric on loopback (a model-registry, edge-nodes, a cloud-hub, all real
//! binaries on ephemeral ports), the `fabric` CLI, and closed-loop HTTP clients.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use fabric_testkit::reference;
use serde_json::{json, Value};

/// A child process, killed (SIGKILL) on drop.
pub struct Proc {
    pub child: Child,
    /// The address it printed.
    pub addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary of another package of the workspace, from the same build profile as this test (built on
/// demand), so `cargo test --release` runs release nodes.
pub fn workspace_binary(package: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_model-registry")).parent().expect("the profile folder").to_path_buf();
    let bin = dir.join(name);
    if !bin.exists() {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", package, "--bin", name]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        assert!(build.status().expect("cargo").success(), "building {package} failed");
    }
    bin
}

/// Spawns `cmd` and waits (60 s at most) for a stdout line starting with `prefix`; returns what follows.
fn spawn_until(cmd: Command, prefix: &'static str) -> Proc {
    spawn_until_all(cmd, &[prefix]).0
}

/// Spawns `cmd` and waits (60 s at most) for stdout lines starting with each of `prefixes`, in order;
/// returns the process (its address: what followed the last prefix) and what followed each.
fn spawn_until_all(mut cmd: Command, prefixes: &[&'static str]) -> (Proc, Vec<String>) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    let wanted = prefixes.to_vec();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = wanted.iter().find_map(|p| line.strip_prefix(p)) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let found: Vec<String> = prefixes
        .iter()
        .map(|p| rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no '{p}' line within 60 s")))
        .collect();
    let addr = found.last().cloned().unwrap_or_default();
    (Proc { child, addr }, found)
}

/// A test fabric's folder and certificates.
pub struct Fabric {
    pub dir: PathBuf,
    pub certs: PathBuf,
}

impl Drop for Fabric {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Fabric {
    /// A fresh folder with certificates for registry-1, hub-1, hub-2, edge-1, edge-2 and an operator.
    pub fn new(name: &str) -> Fabric {
        let dir = std::env::temp_dir().join(format!("fabric-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let certs = dir.join("certs");
        let nodes: Vec<(String, fabric_proto::tls::Role)> = [
            ("registry-1", fabric_proto::tls::Role::Registry),
            ("hub-1", fabric_proto::tls::Role::Hub),
            ("hub-2", fabric_proto::tls::Role::Hub),
            ("edge-1", fabric_proto::tls::Role::Edge),
            ("edge-2", fabric_proto::tls::Role::Edge),
            ("operator", fabric_proto::tls::Role::Operator),
        ]
        .into_iter()
        .map(|(n, r)| (n.to_string(), r))
        .collect();
        fabric_proto::tls::generate_dev_pki(&certs, &nodes).expect("certificates");
        Fabric { dir, certs }
    }

    /// Starts the registry on `listen` (e.g. 127.0.0.1:0) with extra flags; returns it and its address.
    pub fn registry(&self, listen: &str, extra: &[&str]) -> Proc {
        self.registry_with_page(listen, extra).0
    }

    /// Like [`registry`](Self::registry), also returning its status page's URL.
    pub fn registry_with_page(&self, listen: &str, extra: &[&str]) -> (Proc, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_model-registry"));
        cmd.args(["--listen", listen, "--node-id", "registry-1", "--http-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(self.dir.join("registry"))
            .arg("--certs")
            .arg(&self.certs)
            .args(extra)
            .env("RUST_LOG", "warn");
        let (proc, lines) =
            spawn_until_all(cmd, &["model-registry status page on ", "model-registry listening on quic://"]);
        (proc, lines[0].clone())
    }

    /// Starts edge-node `id` (tract) taking its desired state from the registry at `registry`.
    pub fn edge(&self, id: &str, registry: &str, labels: &[&str]) -> Proc {
        self.edge_with(id, registry, labels, None)
    }

    /// Like [`edge`](Self::edge), with a config file of this content.
    pub fn edge_with(&self, id: &str, registry: &str, labels: &[&str], config: Option<&str>) -> Proc {
        let repo = self.dir.join(format!("{id}-repo"));
        std::fs::create_dir_all(&repo).expect("repo");
        let mut cmd = Command::new(workspace_binary("edge-node", "edge-node"));
        cmd.args(["--http-addr", "127.0.0.1:0", "--node-id", id])
            .arg("--model-repository")
            .arg(&repo)
            .arg("--certs")
            .arg(&self.certs)
            .arg("--registry")
            .arg(format!("registry-1@{registry}"))
            .arg("--data-dir")
            .arg(self.dir.join(format!("{id}-data")))
            // Without ONNX Runtime's library the edge's `auto` engine is tract, the engine these
            // rollout tests were written against (and a load races no second engine).
            .env_remove("ORT_DYLIB_PATH")
            .env("RUST_LOG", std::env::var("EDGE_LOG").unwrap_or_else(|_| "warn".into()));
        for l in labels {
            cmd.args(["--label", l]);
        }
        if let Some(text) = config {
            let path = self.dir.join(format!("{id}.toml"));
            std::fs::write(&path, text).expect("edge config");
            cmd.arg("--config").arg(path);
        }
        spawn_until(cmd, "edge-node listening on ")
    }

    /// Starts cloud-hub hub-1 (ONNX Runtime) taking its desired state from the registry.
    pub fn hub(&self, registry: &str) -> Proc {
        self.hub_as("hub-1", registry)
    }

    /// Starts cloud-hub `id` (ONNX Runtime) taking its desired state from the registry.
    pub fn hub_as(&self, id: &str, registry: &str) -> Proc {
        let repo = self.dir.join(format!("{id}-repo"));
        std::fs::create_dir_all(&repo).expect("repo");
        let ort = std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| {
            std::fs::read_to_string(reference::build_dir().join("ort-dylib-path"))
                .expect("run scripts/setup.sh")
                .trim()
                .to_string()
        });
        let mut cmd = Command::new(workspace_binary("cloud-hub", "cloud-hub"));
        cmd.args(["--http-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0", "--node-id", id])
            .arg("--model-repository")
            .arg(&repo)
            .arg("--certs")
            .arg(&self.certs)
            .arg("--registry")
            .arg(format!("registry-1@{registry}"))
            .arg("--data-dir")
            .arg(self.dir.join(format!("{id}-data")))
            .env("ORT_DYLIB_PATH", ort)
            .env("RUST_LOG", "error");
        let mut hub = spawn_until(cmd, "cloud-hub listening on ");
        hub.addr = hub.addr.split_whitespace().next().unwrap_or_default().to_string();
        hub
    }

    /// Runs `fabric` against the registry with the operator certificate (or `id`'s).
    pub fn cli_as(&self, registry: &str, id: &str, args: &[&str]) -> std::process::Output {
        Command::new(workspace_binary("fabric-cli", "fabric"))
            .args(args)
            .env("FABRIC_REGISTRY", format!("registry-1@{registry}"))
            .env("FABRIC_CERTS", &self.certs)
            .env("FABRIC_ID", id)
            .output()
            .expect("run fabric")
    }

    /// Runs `fabric ... --output json` as the operator and returns the JSON; panics on failure.
    pub fn cli(&self, registry: &str, args: &[&str]) -> Value {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.cli_as(registry, "operator", &all);
        assert!(out.status.success(), "fabric {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("fabric {args:?}: not JSON ({e})"))
    }
}

/// A generated model file.
pub fn model(name: &str) -> String {
    reference::model_path(name).display().to_string()
}

/// An HTTP client that returns error statuses as responses, with bounded waits.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent()
}

/// A one-row JSON request for the MLP (`mlp`) or the CNN (`cnn`).
pub fn body_for(model: &str) -> String {
    let shape: Vec<usize> = if model == "cnn" { vec![1, 3, 64, 64] } else { vec![1, 784] };
    let n: usize = shape.iter().product();
    json!({ "inputs": [{ "name": "input", "shape": shape, "datatype": "FP32", "data": vec![0.25f32; n] }] }).to_string()
}

/// One MLP request (JSON): its status and the version that answered.
pub fn infer(agent: &ureq::Agent, base: &str) -> (u16, String) {
    infer_model(agent, base, "mlp", &body_for("mlp"))
}

/// One request to `model` with `body`: its status and the version that answered (or the error).
pub fn infer_model(agent: &ureq::Agent, base: &str, model: &str, body: &str) -> (u16, String) {
    let (status, version, _) = infer_served(agent, base, model, body);
    (status, version)
}

/// One request to `model` with `body`: its status, the version that answered (or the error), and
/// who served it (`node`, or `hub <id>` for an edge that offloaded it).
pub fn infer_served(agent: &ureq::Agent, base: &str, model: &str, body: &str) -> (u16, String, String) {
    let url = format!("{base}/v2/models/{model}/infer");
    match agent.post(&url).header("content-type", "application/json").send(body) {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let text = r.body_mut().read_to_string().unwrap_or_default();
            let v: Value = serde_json::from_str(&text).unwrap_or_default();
            (
                status,
                v["model_version"].as_str().map(str::to_string).unwrap_or_else(|| text.chars().take(300).collect()),
                v["parameters"]["served_by"].as_str().unwrap_or_default().to_string(),
            )
        }
        Err(e) => (0, e.to_string(), String::new()),
    }
}

/// A one-row JSON request for `model` with a `timeout` parameter (microseconds).
pub fn body_with_timeout(model: &str, timeout_us: u64) -> String {
    let mut body: Value = serde_json::from_str(&body_for(model)).expect("json");
    body["parameters"] = json!({ "timeout": timeout_us });
    body.to_string()
}

/// Waits up to `limit` for `done`, checking every 20 ms; returns how long it took.
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// An answer: when sent and received, the status, and the version (or the error).
#[derive(Clone, Debug)]
pub struct Sample {
    pub node: usize,
    pub sent: Instant,
    pub done: Instant,
    pub status: u16,
    pub version: String,
    /// Who served it (`hub <id>` when offloaded).
    pub served_by: String,
}

/// Closed-loop clients on several nodes until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// `clients` closed-loop MLP clients per node URL.
    pub fn start(nodes: &[String], clients: usize) -> Load {
        Load::start_model(nodes, clients, "mlp")
    }

    /// `clients` closed-loop clients of `model` per node URL.
    pub fn start_model(nodes: &[String], clients: usize, model: &'static str) -> Load {
        let body = Arc::new(body_for(model));
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for (node, url) in nodes.iter().enumerate() {
            for _ in 0..clients {
                let (stop, samples, url, body) = (stop.clone(), samples.clone(), url.clone(), body.clone());
                threads.push(std::thread::spawn(move || {
                    let agent = agent();
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        let (status, version, served_by) = infer_served(&agent, &url, model, &body);
                        samples.lock().expect("samples").push(Sample {
                            node,
                            sent,
                            done: Instant::now(),
                            status,
                            version,
                            served_by,
                        });
                    }
                }));
            }
        }
        Load { stop, samples, threads }
    }

    /// Answers so far.
    pub fn count(&self) -> usize {
        self.samples.lock().expect("samples").len()
    }

    /// Whether each of the first `nodes` nodes has answered a request sent at or after `since`
    /// with `version`.
    pub fn all_answered_with(&self, nodes: usize, since: Instant, version: &str) -> bool {
        let samples = self.samples.lock().expect("samples");
        (0..nodes).all(|node| samples.iter().any(|s| s.node == node && s.sent >= since && s.version == version))
    }

    /// Stops the clients; returns every answer.
    pub fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        Arc::try_unwrap(self.samples).map(|m| m.into_inner().expect("samples")).unwrap_or_default()
    }
}

/// Prints a measured figure, and appends it to the file `$FABRIC_FIGURES` names (the registry
/// benchmark collects them there; stderr interleaves with the nodes' logs).
pub fn figure(what: &str, value: &str) {
    eprintln!("FIGURE {what}: {value}");
    if let Some(path) = std::env::var_os("FABRIC_FIGURES") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "| {what} | {value} |");
        }
    }
}

/// SHA-256 of a file, hex.
pub fn digest(path: &Path) -> String {
    fabric_proto::registry::sha256_file(path).expect("readable")
}
