//! Test support: a real edge-node (and cloud-hub) process on 127.0.0.1 with ephemeral ports, over a
//! temporary model repository built from the generated models. Processes, waits, the HTTP client
//! and load come from `fabric-testkit`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use fabric_testkit::ort::ort_library;
use fabric_testkit::process::{workspace_binary, Proc};
use fabric_testkit::reference;

#[allow(unused_imports)]
pub use fabric_testkit::http::{client, get, post, Reply};

/// The admin token test nodes are started with.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A running edge-node, killed on drop (its folder removed).
pub struct Edge {
    /// The process.
    pub proc: Proc,
    /// Its KServe v2 API.
    pub url: String,
    /// Its folder (config, model repository).
    pub dir: PathBuf,
    /// The admin API's URL, when it was switched on (`--admin-addr`).
    pub admin: Option<String>,
    /// The gRPC API's address (`HOST:PORT`), when it was switched on (`--grpc-addr`).
    pub grpc: Option<String>,
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.proc.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts edge-node serving `models` (name, per-model config.toml text) with extra config TOML.
pub fn start_edge(models: &[(&str, &str)], config: &str) -> Edge {
    start_edge_with_args(models, config, &[])
}

/// Like [`start_edge`], with extra command-line arguments.
///
/// The edge's default engine is `auto`; these nodes start without ONNX Runtime's library, so `auto`
/// means tract, the engine the tests were written against (and a load races no second engine).
pub fn start_edge_with_args(models: &[(&str, &str)], config: &str, args: &[String]) -> Edge {
    spawn_edge(models, config, args, false)
}

/// Like [`start_edge`], with ONNX Runtime's library (ORT_DYLIB_PATH, or the one setup.sh installed).
pub fn start_edge_with_ort(models: &[(&str, &str)], config: &str, args: &[String]) -> Edge {
    spawn_edge(models, config, args, true)
}

/// Tests count on the replica counts they configure: a node's autoscaler stays off unless asked for.
fn without_autoscaler(config: &str) -> String {
    if config.contains("[autoscale]") {
        config.to_string()
    } else {
        format!("{config}\n[autoscale]\nenabled = false\n")
    }
}

fn spawn_edge(models: &[(&str, &str)], config: &str, args: &[String], with_ort: bool) -> Edge {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("edge-test-{}-{n}", std::process::id()));
    let repo = dir.join("models");
    for (name, model_config) in models {
        let version = repo.join(name).join("1");
        std::fs::create_dir_all(&version).expect("temp repo");
        // Generated models, else the ones made for error tests (`corrupt`, `unsupported`).
        let mut source = reference::model_path(name);
        if !source.exists() {
            source = reference::build_dir().join("bad-models").join(name).join("model.onnx");
        }
        std::fs::copy(&source, version.join("model.onnx")).expect("copy model");
        std::fs::write(repo.join(name).join("config.toml"), model_config).expect("model config");
    }
    let config_file = dir.join("edge.toml");
    std::fs::write(&config_file, without_autoscaler(config)).expect("config");
    let mut command = Command::new(env!("CARGO_BIN_EXE_edge-node"));
    if with_ort {
        command.env("ORT_DYLIB_PATH", ort_library());
    } else {
        command.env_remove("ORT_DYLIB_PATH");
    }
    command
        .arg("--config")
        .arg(&config_file)
        .arg("--model-repository")
        .arg(&repo)
        .arg("--http-addr")
        .arg("127.0.0.1:0")
        .args(args)
        .env("RUST_LOG", "warn")
        .env("FABRIC_ADMIN_TOKEN", ADMIN_TOKEN);
    let proc = Proc::spawn(command, "edge-node listening on ", &["edge-node admin API on ", "edge-node gRPC on "]);
    let admin = proc.seen("edge-node admin API on ").map(str::to_string);
    let grpc = proc.seen("edge-node gRPC on ").map(str::to_string);
    let url = proc.addr.clone();
    Edge { proc, url, dir, admin, grpc }
}

/// Sends a JSON body with `method`, with the admin token when `token` is set.
pub fn send_json(agent: &ureq::Agent, method: &str, url: &str, body: &serde_json::Value, token: bool) -> Reply {
    fabric_testkit::http::send_json(agent, method, url, body, token.then_some(ADMIN_TOKEN))
}

/// A running cloud-hub, killed on drop.
pub struct Hub {
    /// The process.
    pub proc: Proc,
    /// Its QUIC address.
    pub quic: String,
}

/// Development certificates for hub-1 (hub) and edge-1 (edge) under `dir/certs`.
pub fn certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    fabric_proto::tls::generate_dev_pki(
        &certs,
        &[("hub-1".into(), fabric_proto::tls::Role::Hub), ("edge-1".into(), fabric_proto::tls::Role::Edge)],
    )
    .expect("pki");
    certs
}

/// Starts cloud-hub (node hub-1) serving the CNN with ONNX Runtime.
pub fn start_hub(dir: &Path, certs: &Path) -> Hub {
    start_hub_with(dir, certs, "hub-1", "")
}

/// Starts cloud-hub serving the CNN as `node_id` (its certificate in `certs`) with extra config TOML.
pub fn start_hub_with(dir: &Path, certs: &Path, node_id: &str, config: &str) -> Hub {
    start_hub_at(dir, certs, node_id, config, "127.0.0.1:0")
}

/// Like [`start_hub_with`], with the QUIC service on `quic_addr` (e.g. `[::1]:0`).
pub fn start_hub_at(dir: &Path, certs: &Path, node_id: &str, config: &str, quic_addr: &str) -> Hub {
    let repo = dir.join("hub-models");
    std::fs::create_dir_all(repo.join("cnn/1")).expect("repo");
    std::fs::copy(reference::model_path("cnn"), repo.join("cnn/1/model.onnx")).expect("copy");
    let config_file = dir.join(format!("hub-{node_id}.toml"));
    std::fs::write(&config_file, without_autoscaler(config)).expect("hub config");
    let mut command = Command::new(workspace_binary("cloud-hub", "cloud-hub"));
    command
        .arg("--config")
        .arg(&config_file)
        .arg("--model-repository")
        .arg(&repo)
        .arg("--certs")
        .arg(certs)
        .args(["--node-id", node_id, "--http-addr", "127.0.0.1:0", "--quic-addr", quic_addr])
        .env("ORT_DYLIB_PATH", ort_library())
        .env("RUST_LOG", "error");
    let proc = Proc::spawn(command, "cloud-hub listening on ", &[]);
    let quic = proc.addr.split("quic://").nth(1).unwrap_or_default().to_string();
    Hub { proc, quic }
}
