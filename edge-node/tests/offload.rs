//! Offload from edge to hub under open-loop overload, with the real edge-node and cloud-hub binaries
//! on loopback (both on this machine's 2 cores, so 2x the edge's capacity is the ceiling):
//! (a) 1.5x capacity with a hub: all answered, some offloaded, p99 within the deadline;
//! (b) 3x with no hub: overflow gets quick 503s, what is admitted meets its deadline;
//! (c) the hub killed mid-load: nothing hangs past its deadline, nothing is dropped silently.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use fabric_core::reference;
use fabric_core::tls::{self, Role};
use serde_json::json;
use support::{client, post, start_edge_with_args, Edge};

/// The scenarios load the whole machine: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const DEADLINE_MS: u64 = 800;
/// CNN requests of 4 rows: a few ms each on tract, so the edge saturates at a rate a test client can drive.
const ROWS: usize = 4;

struct Hub {
    child: Child,
    quic: String,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

fn certs(dir: &std::path::Path) -> PathBuf {
    let certs = dir.join("certs");
    tls::generate_dev_pki(&certs, &[("hub-1".into(), Role::Hub), ("edge-1".into(), Role::Edge)]).expect("pki");
    certs
}

fn start_hub(dir: &std::path::Path, certs: &std::path::Path) -> Hub {
    let repo = dir.join("hub-models");
    std::fs::create_dir_all(repo.join("cnn/1")).expect("repo");
    std::fs::copy(reference::model_path("cnn"), repo.join("cnn/1/model.onnx")).expect("copy");
    let ort = std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| {
        std::fs::read_to_string(reference::build_dir().join("ort-dylib-path"))
            .expect("run scripts/setup.sh")
            .trim()
            .to_string()
    });
    let mut child = Command::new(hub_binary())
        .arg("--model-repository")
        .arg(&repo)
        .arg("--certs")
        .arg(certs)
        .args(["--http-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0"])
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

fn edge(dir: &std::path::Path, hub: Option<(&str, &std::path::Path)>) -> Edge {
    let model_config = format!("max_batch_size = 8\nqueue_capacity = 64\ndefault_timeout_ms = {DEADLINE_MS}\n");
    let mut args: Vec<String> = Vec::new();
    if let Some((addr, certs)) = hub {
        args.extend(["--hub".into(), addr.into(), "--certs".into(), certs.display().to_string()]);
    }
    let edge = start_edge_with_args(&[("cnn", &model_config)], "[http]\nworkers = 1\n", &args);
    let _ = dir;
    edge
}

/// A binary-extension request (cheap for the client, which shares the cores) and its header length.
fn body() -> (Vec<u8>, usize) {
    let data: Vec<u8> = (0..ROWS * 3 * 64 * 64).flat_map(|i| ((i % 17) as f32 / 17.0).to_le_bytes()).collect();
    let head = json!({ "inputs": [{ "name": "input", "shape": [ROWS, 3, 64, 64], "datatype": "FP32",
                                    "parameters": { "binary_data_size": data.len() } }],
                       "outputs": [{ "name": "logits", "parameters": { "binary_data": false } }] });
    let mut body = serde_json::to_vec(&head).expect("json");
    let n = body.len();
    body.extend_from_slice(&data);
    (body, n)
}

#[derive(Debug, Clone)]
struct Outcome {
    status: u16,
    latency: Duration,
    served_by: String,
    error: String,
}

/// Closed loop with sixteen clients for `secs` (enough to keep one replica busy with full batches): the edge's capacity in requests/s.
fn capacity(url: &str, (body, n): &(Vec<u8>, usize), secs: f64) -> f64 {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let (url, body, n) = (url.to_string(), body.to_vec(), *n);
            std::thread::spawn(move || {
                let agent = client();
                let mut ok = 0;
                while Instant::now() < until {
                    ok += usize::from(post(&agent, &url, &body, Some(n)).status == 200);
                }
                ok
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("thread")).sum::<usize>() as f64 / secs
}

/// Open loop: requests start on a fixed schedule whatever the answers do; `during(i)` runs before request i.
fn open_loop(url: &str, (body, n): &(Vec<u8>, usize), rate: f64, secs: f64, during: impl Fn(usize)) -> Vec<Outcome> {
    let total = (rate * secs) as usize;
    let (tx, rx) = mpsc::channel::<(usize, Instant)>();
    let rx = Arc::new(Mutex::new(rx));
    let results = Arc::new(Mutex::new(Vec::with_capacity(total)));
    // Little: rate x latency in flight; at 600/s and 0.8 s that is 480 requests waiting at once.
    let workers: Vec<_> = (0..512)
        .map(|_| {
            let (rx, results, url, body, n) = (rx.clone(), results.clone(), url.to_string(), body.to_vec(), *n);
            std::thread::spawn(move || {
                let agent = client();
                loop {
                    let Ok((_, due)) = rx.lock().expect("lock").recv() else { return };
                    let reply = post(&agent, &url, &body, Some(n));
                    let head = reply.json();
                    let outcome = Outcome {
                        status: reply.status,
                        latency: due.elapsed(),
                        served_by: head["parameters"]["served_by"].as_str().unwrap_or_default().to_string(),
                        error: head["error"].as_str().unwrap_or_default().to_string(),
                    };
                    results.lock().expect("lock").push(outcome);
                }
            })
        })
        .collect();
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        during(i);
        tx.send((i, due)).expect("send");
    }
    drop(tx);
    for w in workers {
        w.join().expect("worker");
    }
    let results = results.lock().expect("lock").clone();
    assert_eq!(results.len(), total, "requests without an answer");
    results
}

fn p99(mut latencies: Vec<Duration>) -> Duration {
    latencies.sort();
    latencies.get(((latencies.len() as f64 - 1.0) * 0.99) as usize).copied().unwrap_or_default()
}

fn temp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("offload-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

#[test]
fn a_overload_at_1_5x_is_absorbed_by_the_hub() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = temp("a");
    let certs = certs(&dir);
    let hub = start_hub(&dir, &certs);
    let edge = edge(&dir, Some((&hub.quic, &certs)));
    let url = format!("{}/v2/models/cnn/infer", edge.url);
    let body = body();
    // Capacity with the hub connected but idle: closed loop keeps the edge's queue short, so it stays local.
    let cap = capacity(&url, &body, 2.0);
    let results = open_loop(&url, &body, cap * 1.5, 10.0, |_| {});
    let errors: Vec<&Outcome> = results.iter().filter(|r| r.status != 200).collect();
    assert!(errors.is_empty(), "{} of {} failed, e.g. {:?}", errors.len(), results.len(), errors.first());
    let offloaded = results.iter().filter(|r| r.served_by.starts_with("hub")).count();
    let share = offloaded as f64 / results.len() as f64;
    let tail = p99(results.iter().map(|r| r.latency).collect());
    eprintln!(
        "(a) capacity {cap:.0}/s, offered {:.0}/s: {} requests, {:.1}% offloaded, p99 {:?}",
        cap * 1.5,
        results.len(),
        share * 100.0,
        tail
    );
    assert!(offloaded > 0, "nothing was offloaded at 1.5x capacity");
    assert!(tail <= Duration::from_millis(DEADLINE_MS), "p99 {tail:?} past the {DEADLINE_MS} ms deadline");
    let metrics = String::from_utf8(support::get(&client(), &format!("{}/metrics", edge.url)).body).expect("utf8");
    assert!(
        metrics.contains("fabric_routed_total{model=\"cnn\",route=\"offload\",version=\"1\"}"),
        "offload share not in metrics"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn b_overload_at_3x_without_a_hub_is_refused_quickly() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = temp("b");
    let edge = edge(&dir, None);
    let url = format!("{}/v2/models/cnn/infer", edge.url);
    let body = body();
    let cap = capacity(&url, &body, 2.0);
    let results = open_loop(&url, &body, cap * 3.0, 10.0, |_| {});
    let served: Vec<Duration> = results.iter().filter(|r| r.status == 200).map(|r| r.latency).collect();
    let refused: Vec<&Outcome> = results.iter().filter(|r| r.status == 503).collect();
    let other: Vec<&Outcome> = results.iter().filter(|r| r.status != 200 && r.status != 503).collect();
    assert!(other.is_empty(), "unexpected answers: {:?}", other.first());
    assert!(!refused.is_empty() && !served.is_empty(), "served {}, refused {}", served.len(), refused.len());
    for r in &refused {
        assert!(r.error.contains("deadline") || r.error.contains("queue full"), "imprecise 503: {}", r.error);
    }
    let refused_p99 = p99(refused.iter().map(|r| r.latency).collect());
    let served_p99 = p99(served.clone());
    eprintln!(
        "(b) capacity {cap:.0}/s, offered {:.0}/s: {} served (p99 {served_p99:?}), {} refused (p99 {refused_p99:?})",
        cap * 3.0,
        served.len(),
        refused.len()
    );
    assert!(
        served_p99 <= Duration::from_millis(DEADLINE_MS),
        "admitted requests missed the deadline: p99 {served_p99:?}"
    );
    assert!(refused_p99 < Duration::from_millis(DEADLINE_MS / 4), "refusals were slow: p99 {refused_p99:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn c_hub_killed_mid_load_nothing_hangs_or_vanishes() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = temp("c");
    let certs = certs(&dir);
    let hub = Mutex::new(Some(start_hub(&dir, &certs)));
    let quic = hub.lock().expect("lock").as_ref().map(|h| h.quic.clone()).expect("hub");
    let edge = edge(&dir, Some((&quic, &certs)));
    let url = format!("{}/v2/models/cnn/infer", edge.url);
    let body = body();
    let cap = capacity(&url, &body, 2.0);
    let rate = cap * 2.0;
    let kill_at = (rate * 3.0) as usize;
    let results = open_loop(&url, &body, rate, 8.0, |i| {
        if i == kill_at {
            if let Some(mut h) = hub.lock().expect("lock").take() {
                let _ = h.child.kill(); // SIGKILL: no goodbye on the wire
                let _ = h.child.wait();
            }
        }
    });
    let slack = Duration::from_millis(DEADLINE_MS + 300);
    let late: Vec<&Outcome> = results.iter().filter(|r| r.latency > slack).collect();
    assert!(late.is_empty(), "{} answers came after the deadline, e.g. {:?}", late.len(), late.first());
    let bad: Vec<&Outcome> =
        results.iter().filter(|r| r.status != 200 && !(r.status == 503 && !r.error.is_empty())).collect();
    assert!(bad.is_empty(), "imprecise failures: {:?}", bad.first());
    let offloaded = results.iter().filter(|r| r.served_by.starts_with("hub")).count();
    let refused = results.iter().filter(|r| r.status == 503).count();
    eprintln!("(c) {} requests at {rate:.0}/s, hub killed after {kill_at}: {offloaded} offloaded, {refused} refused, none late or lost", results.len());
    let _ = std::fs::remove_dir_all(&dir);
}
