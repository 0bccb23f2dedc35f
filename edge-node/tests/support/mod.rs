//! Test support: a real edge-node process on 127.0.0.1 with an ephemeral port, over a temporary
//! model repository built from the generated models, and an HTTP client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use fabric_testkit::reference;

/// The admin token test nodes are started with.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A running edge-node, killed on drop.
pub struct Edge {
    pub child: Child,
    pub url: String,
    pub dir: PathBuf,
    /// The admin API's URL, when it was switched on (`--admin-addr`).
    pub admin: Option<String>,
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// The ONNX Runtime library setup.sh installed.
pub fn ort_library() -> String {
    std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| {
        std::fs::read_to_string(reference::build_dir().join("ort-dylib-path"))
            .expect("run scripts/setup.sh")
            .trim()
            .to_string()
    })
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
    // Tests count on the replica counts they configure: the node's autoscaler stays off unless asked for.
    let config = if config.contains("[autoscale]") {
        config.to_string()
    } else {
        format!("{config}\n[autoscale]\nenabled = false\n")
    };
    std::fs::write(&config_file, config).expect("config");
    let mut command = Command::new(env!("CARGO_BIN_EXE_edge-node"));
    if with_ort {
        command.env("ORT_DYLIB_PATH", ort_library());
    } else {
        command.env_remove("ORT_DYLIB_PATH");
    }
    let mut child = command
        .arg("--config")
        .arg(&config_file)
        .arg("--model-repository")
        .arg(&repo)
        .arg("--http-addr")
        .arg("127.0.0.1:0")
        .args(args)
        .env("RUST_LOG", "warn")
        .env("FABRIC_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn edge-node");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut admin = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("edge-node admin API on ") {
                admin = Some(url.to_string());
            }
            if let Some(url) = line.strip_prefix("edge-node listening on ") {
                let _ = tx.send((url.to_string(), admin.clone()));
            }
        }
    });
    let (url, admin) = rx.recv_timeout(Duration::from_secs(60)).expect("edge-node did not become ready within 60 s");
    Edge { child, url, dir, admin }
}

/// Sends a JSON body with `method`, with the admin token when `token` is set.
pub fn send_json(agent: &ureq::Agent, method: &str, url: &str, body: &serde_json::Value, token: bool) -> Reply {
    let text = body.to_string();
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let request = ureq::http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .header("authorization", if token { auth.as_str() } else { "" })
        .body(text)
        .expect("request");
    reply(agent.run(request).expect("request sent"))
}

/// An HTTP client that returns error statuses as responses and never waits unbounded.
pub fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent()
}

/// A response's status and body.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub header_length: Option<usize>,
}

impl Reply {
    /// The body as JSON (the JSON part, for binary responses).
    pub fn json(&self) -> serde_json::Value {
        let end = self.header_length.unwrap_or(self.body.len());
        serde_json::from_slice(&self.body[..end])
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `error` message of an error body.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_string()
    }
}

fn reply(resp: ureq::http::Response<ureq::Body>) -> Reply {
    let status = resp.status().as_u16();
    let header_length = resp
        .headers()
        .get("inference-header-content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = resp.into_body().with_config().limit(256 << 20).read_to_vec().expect("body");
    Reply { status, body, header_length }
}

/// GET a path.
pub fn get(agent: &ureq::Agent, url: &str) -> Reply {
    reply(agent.get(url).call().expect("GET"))
}

/// POST a body, with an optional Inference-Header-Content-Length.
pub fn post(agent: &ureq::Agent, url: &str, body: &[u8], header_length: Option<usize>) -> Reply {
    let mut req = agent
        .post(url)
        .header("content-type", if header_length.is_some() { "application/octet-stream" } else { "application/json" });
    if let Some(n) = header_length {
        req = req.header("inference-header-content-length", &n.to_string());
    }
    reply(req.send(body).expect("POST"))
}

/// A running cloud-hub, killed on drop.
pub struct Hub {
    pub child: Child,
    /// Its QUIC address.
    pub quic: String,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cloud-hub binary of this workspace (built on demand: it is another package's binary).
fn hub_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/cloud-hub");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "cloud-hub", "--bin", "cloud-hub"])
            .status()
            .expect("cargo");
        assert!(status.success(), "building cloud-hub failed");
    }
    bin
}

/// Development certificates for hub-1 (hub) and edge-1 (edge) under `dir/certs`.
pub fn certs(dir: &std::path::Path) -> PathBuf {
    let certs = dir.join("certs");
    fabric_proto::tls::generate_dev_pki(
        &certs,
        &[("hub-1".into(), fabric_proto::tls::Role::Hub), ("edge-1".into(), fabric_proto::tls::Role::Edge)],
    )
    .expect("pki");
    certs
}

/// Starts cloud-hub (node hub-1) serving the CNN with ONNX Runtime.
pub fn start_hub(dir: &std::path::Path, certs: &std::path::Path) -> Hub {
    start_hub_with(dir, certs, "hub-1", "")
}

/// Starts cloud-hub serving the CNN as `node_id` (its certificate in `certs`) with extra config TOML.
pub fn start_hub_with(dir: &std::path::Path, certs: &std::path::Path, node_id: &str, config: &str) -> Hub {
    start_hub_at(dir, certs, node_id, config, "127.0.0.1:0")
}

/// Like [`start_hub_with`], with the QUIC service on `quic_addr` (e.g. `[::1]:0`).
pub fn start_hub_at(
    dir: &std::path::Path,
    certs: &std::path::Path,
    node_id: &str,
    config: &str,
    quic_addr: &str,
) -> Hub {
    let repo = dir.join("hub-models");
    std::fs::create_dir_all(repo.join("cnn/1")).expect("repo");
    std::fs::copy(reference::model_path("cnn"), repo.join("cnn/1/model.onnx")).expect("copy");
    let config_file = dir.join(format!("hub-{node_id}.toml"));
    let config = if config.contains("[autoscale]") {
        config.to_string()
    } else {
        format!("{config}\n[autoscale]\nenabled = false\n")
    };
    std::fs::write(&config_file, config).expect("hub config");
    let ort = ort_library();
    let mut child = Command::new(hub_binary())
        .arg("--config")
        .arg(&config_file)
        .arg("--model-repository")
        .arg(&repo)
        .arg("--certs")
        .arg(certs)
        .args(["--node-id", node_id, "--http-addr", "127.0.0.1:0", "--quic-addr", quic_addr])
        .env("ORT_DYLIB_PATH", ort)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn cloud-hub");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(quic) = line.split("quic://").nth(1) {
                let _ = tx.send(quic.to_string());
            }
        }
    });
    let quic = rx.recv_timeout(Duration::from_secs(60)).expect("hub ready within 60 s");
    Hub { child, quic }
}
