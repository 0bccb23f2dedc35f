//! Control benchmark: how long live control takes on a real edge-node (release build).
//!
//! - Load to ready: `POST /v2/repository/models/<m>/load` of a version added to the repository, until
//!   the call returns (the version is routable: engine built, first replica warmed), for the MLP and
//!   the CNN; then unload it again. Client time and the node's own count.
//! - Policy change to first request served by the new version: four closed-loop clients on the MLP
//!   while the policy flips between v1 and v2; from sending the `PUT .../policy` to the first answer
//!   from the version it names. Also counts answers from the old version to requests sent after the
//!   call returned (must be 0: the change is atomic).
//!
//! Run: `cargo bench -p edge-node --bench control` (scripts/bench/control.sh). Prints a markdown table.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabric_testkit::http::{binary_body, client, send_json};
use fabric_testkit::process::Proc;
use fabric_testkit::reference;
use serde_json::{json, Value};

const TOKEN: &str = "bench-admin-token-0123456789";

struct Edge {
    _proc: Proc,
    url: String,
    admin: String,
}

fn start(repo: &Path) -> Edge {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edge-node"));
    command
        .args(["--http-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--model-control", "explicit"])
        .arg("--model-repository")
        .arg(repo)
        .env("FABRIC_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "warn");
    let proc = Proc::spawn(command, "edge-node listening on ", &["edge-node admin API on "]);
    let admin = proc.seen("edge-node admin API on ").expect("the admin API's line").to_string();
    Edge { url: proc.addr.clone(), admin, _proc: proc }
}

fn send(agent: &ureq::Agent, method: &str, url: &str, body: &Value) -> (u16, Value) {
    let reply = send_json(agent, method, url, body, Some(TOKEN));
    (reply.status, serde_json::from_slice(&reply.body).unwrap_or(Value::Null))
}

fn link(repo: &Path, name: &str, version: u64, source: &str) {
    let dir = repo.join(name).join(version.to_string());
    std::fs::create_dir_all(&dir).expect("repo");
    std::fs::copy(reference::model_path(source), dir.join("model.onnx")).expect("copy");
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * q).round() as usize]
}

fn mlp_body() -> (Vec<u8>, usize) {
    binary_body(&[1, 784], 13, Some("logits"))
}

/// (time sent, time answered, version) of every answer.
type Answers = Arc<Mutex<Vec<(Instant, Instant, String)>>>;

fn main() {
    let repo: PathBuf = std::env::temp_dir().join(format!("control-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&repo);
    link(&repo, "mlp", 1, "mlp");
    link(&repo, "cnn", 1, "cnn");
    let edge = start(&repo);
    let agent = client();
    let mut rows = Vec::new();

    // Load to ready, then unload, ten times per model.
    for model in ["mlp", "cnn"] {
        link(&repo, model, 2, model);
        let (mut client_ms, mut node_ms) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            let t0 = Instant::now();
            let (status, body) =
                send(&agent, "POST", &format!("{}/v2/repository/models/{model}/load", edge.url), &json!({}));
            client_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            assert_eq!(status, 200, "load: {body}");
            let loaded = body["loaded"].as_array().and_then(|l| l.iter().find(|v| v["version"] == 2)).cloned();
            node_ms.push(loaded.and_then(|l| l["ms"].as_f64()).unwrap_or(f64::NAN));
            let unload = json!({ "parameters": { "version": "2" } });
            let (status, body) =
                send(&agent, "POST", &format!("{}/v2/repository/models/{model}/unload", edge.url), &unload);
            assert_eq!(status, 200, "unload: {body}");
        }
        rows.push(format!(
            "| {model}: load requested -> routable (10 loads) | {:.1} ms | {:.1} ms | node's own count p50 {:.1} ms |",
            percentile(&mut client_ms, 0.5),
            percentile(&mut client_ms, 1.0),
            percentile(&mut node_ms, 0.5)
        ));
    }

    // Policy flips under load.
    let (status, body) = send(&agent, "POST", &format!("{}/v2/repository/models/mlp/load", edge.url), &json!({}));
    assert_eq!(status, 200, "{body}");
    let policy_url = format!("{}/v2/fabric/models/mlp/policy", edge.admin);
    let pin = |v: u64| json!({ "weights": { v.to_string(): 1 } });
    assert_eq!(send(&agent, "PUT", &policy_url, &pin(1)).0, 200);
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Answers = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, answers, url) = (stop.clone(), answers.clone(), format!("{}/v2/models/mlp/infer", edge.url));
            std::thread::spawn(move || {
                let (body, n) = mlp_body();
                let agent = self::client();
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let mut reply = agent
                        .post(&url)
                        .header("inference-header-content-length", &n.to_string())
                        .send(&body[..])
                        .expect("infer");
                    let text = reply.body_mut().read_to_string().unwrap_or_default();
                    let version = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v["model_version"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    answers.lock().expect("answers").push((sent, Instant::now(), version));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (mut switch_ms, mut call_ms, mut stale) = (Vec::new(), Vec::new(), 0usize);
    for flip in 0..60u64 {
        let to = 2 - flip % 2; // 2, 1, 2, ...
        let t0 = Instant::now();
        assert_eq!(send(&agent, "PUT", &policy_url, &pin(to)).0, 200);
        let returned = Instant::now();
        call_ms.push((returned - t0).as_secs_f64() * 1e3);
        let want = to.to_string();
        let first = loop {
            let found = answers
                .lock()
                .expect("answers")
                .iter()
                .filter(|(_, done, v)| *done >= t0 && *v == want)
                .map(|(_, done, _)| *done)
                .min();
            if let Some(done) = found {
                break done;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no answer from v{to}");
            std::thread::sleep(Duration::from_micros(200));
        };
        switch_ms.push((first - t0).as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(100));
        stale += answers.lock().expect("answers").iter().filter(|(sent, _, v)| *sent > returned && *v != want).count();
        answers.lock().expect("answers").retain(|(_, done, _)| *done > returned);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    rows.push(format!(
        "| policy change -> first answer from the new version (60 flips, 4 clients) | {:.2} ms | {:.2} ms | the PUT itself p50 {:.2} ms; old-version answers to requests sent after it returned: {stale} |",
        percentile(&mut switch_ms, 0.5),
        percentile(&mut switch_ms, 1.0),
        percentile(&mut call_ms, 0.5)
    ));
    drop(edge);
    let _ = std::fs::remove_dir_all(&repo);

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!("Control benchmark on {cpu}, {cores} cores (release edge-node, tract engine)\n");
    println!("| what | p50 | max | notes |\n|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}
