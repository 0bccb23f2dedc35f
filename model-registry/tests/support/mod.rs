//! Test support: a whole local fabric on loopback (a model-registry, edge-nodes, a cloud-hub, all real
//! binaries on ephemeral ports), the `fabric` CLI, and closed-loop HTTP clients.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fabric_proto::registry::DesiredState;

use fabric_testkit::ort::ort_library;
use fabric_testkit::process::{workspace_binary, Proc};
use fabric_testkit::reference;
use serde_json::Value;

#[allow(unused_imports)]
pub use fabric_testkit::http::{body_for, body_with_timeout, client};
#[allow(unused_imports)]
pub use fabric_testkit::load::{Load, Sample};
#[allow(unused_imports)]
pub use fabric_testkit::wait::wait_for;

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
    /// A fresh folder with certificates for registry-1..3, hub-1, hub-2, edge-1, edge-2 and an operator.
    pub fn new(name: &str) -> Fabric {
        Fabric::with_edges(name, &[])
    }

    /// Like [`new`](Self::new), with certificates for more edges (simulated nodes, more real ones).
    pub fn with_edges(name: &str, edges: &[String]) -> Fabric {
        let dir = std::env::temp_dir().join(format!("fabric-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let certs = dir.join("certs");
        let nodes: Vec<(String, fabric_proto::tls::Role)> = [
            ("registry-1", fabric_proto::tls::Role::Registry),
            ("registry-2", fabric_proto::tls::Role::Registry),
            ("registry-3", fabric_proto::tls::Role::Registry),
            ("hub-1", fabric_proto::tls::Role::Hub),
            ("hub-2", fabric_proto::tls::Role::Hub),
            ("edge-1", fabric_proto::tls::Role::Edge),
            ("edge-2", fabric_proto::tls::Role::Edge),
            ("operator", fabric_proto::tls::Role::Operator),
        ]
        .into_iter()
        .map(|(n, r)| (n.to_string(), r))
        .chain(edges.iter().map(|e| (e.clone(), fabric_proto::tls::Role::Edge)))
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
        let proc = Proc::spawn(cmd, "model-registry listening on quic://", &["model-registry status page on "]);
        let page = proc.seen("model-registry status page on ").unwrap_or_default().to_string();
        (proc, page)
    }

    /// Starts replica `n` (registry-`n`) of a replicated registry on the etcd `store`
    /// (`etcd://...`), sharing one data folder (the model files) with the other replicas.
    pub fn replica(&self, n: usize, store: &str) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_model-registry"));
        let id = format!("registry-{n}");
        cmd.args(["--listen", "127.0.0.1:0", "--node-id", &id, "--http-addr", "off", "--store", store])
            .arg("--data-dir")
            .arg(self.dir.join("registry-shared"))
            .arg("--certs")
            .arg(&self.certs)
            .env("RUST_LOG", std::env::var("REGISTRY_LOG").unwrap_or_else(|_| "warn".into()));
        let mut proc = Proc::spawn(cmd, "model-registry listening on quic://", &[]);
        proc.addr = format!("{id}@{}", proc.addr);
        proc
    }

    /// Starts edge-node `id` (tract) taking its desired state from the registry at `registry`
    /// (`HOST:PORT` of registry-1, or `NAME@HOST:PORT,...`).
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
            .arg(named(registry))
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
        Proc::spawn(cmd, "edge-node listening on ", &[])
    }

    /// Starts cloud-hub hub-1 (ONNX Runtime) taking its desired state from the registry.
    pub fn hub(&self, registry: &str) -> Proc {
        self.hub_as("hub-1", registry)
    }

    /// Starts cloud-hub `id` (ONNX Runtime) taking its desired state from the registry.
    pub fn hub_as(&self, id: &str, registry: &str) -> Proc {
        let repo = self.dir.join(format!("{id}-repo"));
        std::fs::create_dir_all(&repo).expect("repo");
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
            .env("ORT_DYLIB_PATH", ort_library())
            .env("RUST_LOG", "error");
        let mut hub = Proc::spawn(cmd, "cloud-hub listening on ", &[]);
        hub.addr = hub.addr.split_whitespace().next().unwrap_or_default().to_string();
        hub
    }

    /// Runs `fabric` against the registry with the operator certificate (or `id`'s).
    pub fn cli_as(&self, registry: &str, id: &str, args: &[&str]) -> std::process::Output {
        Command::new(workspace_binary("fabric-cli", "fabric"))
            .args(args)
            .env("FABRIC_REGISTRY", named(registry))
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

/// A registry address as nodes and the CLI take it: `HOST:PORT` is registry-1's.
fn named(registry: &str) -> String {
    if registry.contains('@') {
        registry.to_string()
    } else {
        format!("registry-1@{registry}")
    }
}

/// A generated model file.
pub fn model(name: &str) -> String {
    reference::model_path(name).display().to_string()
}

/// One MLP request (JSON): its status and the version that answered.
pub fn infer(agent: &ureq::Agent, base: &str) -> (u16, String) {
    infer_model(agent, base, "mlp", &body_for("mlp"))
}

/// One request to `model` with `body`: its status and the version that answered (or the error).
pub fn infer_model(agent: &ureq::Agent, base: &str, model: &str, body: &str) -> (u16, String) {
    let answer = fabric_testkit::http::infer(agent, base, model, body);
    (answer.status, answer.version)
}

/// One request to `model` with `body`: its status, the version that answered (or the error), and
/// who served it (`node`, or `hub <id>` for an edge that offloaded it).
pub fn infer_served(agent: &ureq::Agent, base: &str, model: &str, body: &str) -> (u16, String, String) {
    let answer = fabric_testkit::http::infer(agent, base, model, body);
    (answer.status, answer.version, answer.served_by)
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

/// What each simulated node was last told, and when it last got an answer.
pub type Told = std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, (DesiredState, Instant)>>>;

/// Simulated edges `ids` (certificates in the fabric's folder) of the registry at `registry`
/// (`NAME@HOST:PORT,...`): each heartbeats as an idle node that loads whatever it is told at once,
/// held at most `hold_ms`, and gives up on an answer 2 s past its hold (as the node agent does), over
/// one UDP socket per 250 nodes.
pub fn simulate(f: &Fabric, registry: &str, ids: &[String], hold_ms: u64) -> (tokio::runtime::Runtime, Told) {
    use fabric_proto::registry::{Heartbeat, NodeInfo, ReadyVersion, RegistryAddr, RegistryClient, Request};
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
    let told: Told = Default::default();
    let targets = RegistryAddr::parse_list(registry).expect("addresses");
    let _enter = runtime.enter();
    let mut endpoint = None;
    for (i, id) in ids.iter().enumerate() {
        if i % 250 == 0 {
            endpoint = Some(quinn::Endpoint::client("0.0.0.0:0".parse().expect("bind")).expect("endpoint"));
        }
        let socket = endpoint.clone().expect("endpoint");
        let files = fabric_proto::tls::TlsFiles::in_dir(&f.certs, id);
        let client = RegistryClient::on_endpoint_replicated(socket, targets.clone(), &files).expect("client");
        let (id, told) = (id.clone(), told.clone());
        runtime.spawn(async move {
            let info = NodeInfo { node_id: id.clone(), role: "edge".into(), ..Default::default() };
            let (mut applied, mut ready) = (0u64, Vec::new());
            loop {
                let beat = Heartbeat {
                    info: info.clone(),
                    applied,
                    ready: ready.clone(),
                    wait_ms: 500,
                    max_wait_ms: hold_ms,
                    ..Default::default()
                };
                let request = Request::Heartbeat(beat);
                let answer = tokio::time::timeout(Duration::from_millis(hold_ms + 2000), client.call(&request)).await;
                match answer {
                    Ok(Ok(value)) => {
                        let Ok(desired) = serde_json::from_value::<DesiredState>(value) else { continue };
                        applied = desired.revision;
                        ready = desired
                            .models
                            .iter()
                            .flat_map(|m| {
                                m.versions.iter().map(|v| ReadyVersion { name: m.name.clone(), version: v.version })
                            })
                            .collect();
                        told.lock().expect("told").insert(id.clone(), (desired, Instant::now()));
                    }
                    Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
                    Err(_) => client.abandon().await,
                }
            }
        });
    }
    (runtime, told)
}
