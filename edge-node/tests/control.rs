//! Live control of a running edge-node (real binary, real HTTP): loading and unloading versions under
//! load, traffic policies (canary shares, sticky ids, shadow), resizing pools, the load report, and
//! the refusals (bad models, policies on versions not ready, missing token, control switched off).
//! Counts, not timings: every wait is bounded, and shares are counted per phase.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use fabric_testkit::reference;
use serde_json::{json, Value};
use support::{client, get, post, send_json, start_edge_with_args, Edge, Reply};

/// An edge-node with model control and the admin API on.
fn start_controlled(models: &[(&str, &str)]) -> Edge {
    let args: Vec<String> =
        ["--model-control", "explicit", "--admin-addr", "127.0.0.1:0"].iter().map(|s| s.to_string()).collect();
    start_edge_with_args(models, "", &args)
}

fn admin(edge: &Edge) -> String {
    edge.admin.clone().expect("the admin API is on")
}

/// A one-row MLP request in the binary extension, with an id when given.
fn mlp_body(id: Option<&str>) -> (Vec<u8>, usize) {
    let data: Vec<u8> = (0..784).flat_map(|i| ((i % 13) as f32 / 13.0).to_le_bytes()).collect();
    let mut head = json!({ "inputs": [{ "name": "input", "shape": [1, 784], "datatype": "FP32",
                                        "parameters": { "binary_data_size": data.len() } }],
                           "outputs": [{ "name": "logits", "parameters": { "binary_data": false } }] });
    if let Some(id) = id {
        head["id"] = json!(id);
    }
    let mut body = serde_json::to_vec(&head).expect("json");
    let n = body.len();
    body.extend_from_slice(&data);
    (body, n)
}

/// Loads `version` of `model` from the bytes of a generated model file, through Triton's load.
fn load_file(edge: &Edge, model: &str, version: u64, file: &std::path::Path) -> Reply {
    let bytes = std::fs::read(file).expect("model file");
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    let body = json!({ "parameters": { format!("file:{version}/model.onnx"): encoded } });
    send_json(&client(), "POST", &format!("{}/v2/repository/models/{model}/load", edge.url), &body, true)
}

fn set_policy(edge: &Edge, model: &str, policy: Value) -> Reply {
    send_json(&client(), "PUT", &format!("{}/v2/fabric/models/{model}/policy", admin(edge)), &policy, true)
}

fn report(edge: &Edge) -> Value {
    let r = get(&client(), &format!("{}/v2/fabric/load", admin(edge)));
    assert_eq!(r.status, 200, "load report: {}", r.error());
    r.json()
}

fn version_report(edge: &Edge, model: &str, version: u64) -> Value {
    report(edge)["versions"]
        .as_array()
        .and_then(|v| v.iter().find(|e| e["name"] == model && e["version"] == version).cloned())
        .unwrap_or(Value::Null)
}

/// Waits up to `limit` for `done`, checking every 20 ms.
fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < until, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Clone, Debug)]
struct Sample {
    sent: Instant,
    done: Instant,
    status: u16,
    version: String,
    error: String,
}

/// Closed-loop clients sending the same request until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(url: &str, clients: usize, body: (Vec<u8>, usize)) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        let body = Arc::new(body);
        let threads = (0..clients)
            .map(|_| {
                let (stop, samples, body, url) = (stop.clone(), samples.clone(), body.clone(), url.to_string());
                std::thread::spawn(move || {
                    let agent = client();
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        let reply = post(&agent, &url, &body.0, Some(body.1));
                        let done = Instant::now();
                        let (version, error) = if reply.status == 200 {
                            (reply.json()["model_version"].as_str().unwrap_or_default().to_string(), String::new())
                        } else {
                            (String::new(), reply.error())
                        };
                        samples.lock().expect("samples").push(Sample {
                            sent,
                            done,
                            status: reply.status,
                            version,
                            error,
                        });
                    }
                })
            })
            .collect();
        Load { stop, samples, threads }
    }

    fn count(&self) -> usize {
        self.samples.lock().expect("samples").len()
    }

    /// Waits until `n` more requests have been answered (bounded).
    fn wait_more(&self, n: usize, limit: Duration) {
        let target = self.count() + n;
        wait_for(&format!("{n} more answers"), limit, || self.count() >= target);
    }

    fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("client thread");
        }
        Arc::try_unwrap(self.samples).map(|m| m.into_inner().expect("samples")).unwrap_or_default()
    }
}

fn assert_no_failures(samples: &[Sample]) {
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.status != 200).collect();
    let first = failed.first().map(|s| format!("{} {}", s.status, s.error));
    assert!(failed.is_empty(), "{} of {} requests failed, first: {first:?}", failed.len(), samples.len());
}

#[test]
fn canary_rollout_under_load_fails_nothing_and_follows_the_weights() {
    let edge = start_controlled(&[("mlp", "")]);
    let infer = format!("{}/v2/models/mlp/infer", edge.url);
    assert_eq!(set_policy(&edge, "mlp", json!({ "weights": { "1": 100 } })).status, 200);
    let load = Load::start(&infer, 4, mlp_body(None));
    load.wait_more(500, Duration::from_secs(60));
    // v2 arrives as bytes while v1 serves.
    let loaded = load_file(&edge, "mlp", 2, &reference::model_path("mlp_alt"));
    assert_eq!(loaded.status, 200, "load v2: {}", loaded.error());
    const PER_PHASE: usize = 5_000;
    let phases: [(u32, u32); 4] = [(100, 0), (90, 10), (50, 50), (0, 100)];
    // Each phase: from the moment its policy call returned to the moment the next one was sent.
    let mut bounds: Vec<(Instant, Instant)> = Vec::new();
    for (w1, w2) in phases {
        let before = Instant::now();
        if let Some(last) = bounds.last_mut() {
            last.1 = before;
        }
        let r = set_policy(&edge, "mlp", json!({ "weights": { "1": w1, "2": w2 } }));
        assert_eq!(r.status, 200, "policy {w1}/{w2}: {}", r.error());
        bounds.push((Instant::now(), Instant::now()));
        // Enough answers inside the phase (the four in flight at its start do not count).
        load.wait_more(PER_PHASE + 50, Duration::from_secs(180));
    }
    // v1 takes no traffic any more: unloading it under load fails nothing.
    let before_unload = Instant::now();
    let unload = send_json(
        &client(),
        "POST",
        &format!("{}/v2/repository/models/mlp/unload", edge.url),
        &json!({ "parameters": { "version": "1" } }),
        true,
    );
    assert_eq!(unload.status, 200, "unload v1: {}", unload.error());
    if let Some(last) = bounds.last_mut() {
        last.1 = before_unload;
    }
    load.wait_more(500, Duration::from_secs(60));
    let samples = load.stop();
    assert_no_failures(&samples);
    for ((w1, w2), (start, end)) in phases.iter().zip(&bounds) {
        let phase: Vec<&Sample> = samples.iter().filter(|s| s.sent >= *start && s.done <= *end).collect();
        assert!(phase.len() >= PER_PHASE, "phase {w1}/{w2}: only {} requests", phase.len());
        let on_v2 = phase.iter().filter(|s| s.version == "2").count();
        let share_v2 = on_v2 as f64 * 100.0 / phase.len() as f64;
        assert!(
            (share_v2 - f64::from(*w2)).abs() <= 2.0,
            "phase {w1}/{w2}: v2 served {share_v2:.2}% of {}",
            phase.len()
        );
        assert!(phase.iter().all(|s| s.version == "1" || s.version == "2"));
    }
    let after: Vec<&Sample> = samples.iter().filter(|s| s.sent > before_unload).collect();
    assert!(after.iter().all(|s| s.version == "2"), "a request reached v1 after its unload");
    let index = send_json(&client(), "POST", &format!("{}/v2/repository/index", edge.url), &json!({}), false).json();
    assert_eq!(index, json!([{ "name": "mlp", "version": "2", "state": "READY", "reason": "" }]));
}

#[test]
fn the_same_request_id_always_lands_on_the_same_version() {
    let edge = start_controlled(&[("mlp", "")]);
    assert_eq!(load_file(&edge, "mlp", 2, &reference::model_path("mlp")).status, 200);
    assert_eq!(set_policy(&edge, "mlp", json!({ "weights": { "1": 50, "2": 50 } })).status, 200);
    let agent = client();
    let url = format!("{}/v2/models/mlp/infer", edge.url);
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for i in 0..1_000 {
        let id = format!("user-{}", i % 100);
        let (body, n) = mlp_body(Some(&id));
        let reply = post(&agent, &url, &body, Some(n));
        assert_eq!(reply.status, 200, "{}", reply.error());
        let head = reply.json();
        assert_eq!(head["id"], json!(id));
        seen.entry(id).or_default().insert(head["model_version"].as_str().unwrap_or_default().to_string());
    }
    let moved: Vec<_> = seen.iter().filter(|(_, versions)| versions.len() > 1).collect();
    assert!(moved.is_empty(), "ids served by two versions: {moved:?}");
    let on_v2 = seen.values().filter(|v| v.contains("2")).count();
    assert!((20..=80).contains(&on_v2), "100 ids under 50/50: {on_v2} on v2");
}

fn shadow_counts(edge: &Edge) -> Value {
    let r = get(&client(), &format!("{}/v2/fabric/models/mlp/policy", admin(edge)));
    assert_eq!(r.status, 200, "{}", r.error());
    r.json()["shadow"].clone()
}

#[test]
fn shadow_copies_are_compared_and_never_returned() {
    let edge = start_controlled(&[("mlp", "")]);
    assert_eq!(load_file(&edge, "mlp", 2, &reference::model_path("mlp")).status, 200);
    assert_eq!(load_file(&edge, "mlp", 3, &reference::model_path("mlp_alt")).status, 200);
    let agent = client();
    let url = format!("{}/v2/models/mlp/infer", edge.url);
    let (body, n) = mlp_body(None);
    let v1 = post(&agent, &url.replace("/infer", "/versions/1/infer"), &body, Some(n)).json()["outputs"].clone();
    for (shadow, agreement) in [(2, 100.0), (3, 0.0)] {
        let policy = json!({ "weights": { "1": 1 }, "shadow": { "version": shadow, "percent": 100 } });
        assert_eq!(set_policy(&edge, "mlp", policy).status, 200);
        for _ in 0..200 {
            let reply = post(&agent, &url, &body, Some(n));
            assert_eq!(reply.status, 200, "{}", reply.error());
            let head = reply.json();
            assert_eq!(head["model_version"], "1", "a shadow answer reached the client");
            assert_eq!(head["outputs"], v1);
        }
        wait_for("200 shadow comparisons", Duration::from_secs(30), || shadow_counts(&edge)["compared"] == 200);
        let counts = shadow_counts(&edge);
        assert_eq!(counts["version"], shadow);
        assert_eq!(counts["shadow_failed"], 0, "{counts}");
        assert_eq!(counts["agreement_pct"].as_f64(), Some(agreement), "{counts}");
    }
}

#[test]
fn a_bad_model_is_refused_with_the_reason_and_serving_is_untouched() {
    let edge = start_controlled(&[("mlp", "")]);
    let agent = client();
    let (body, n) = mlp_body(None);
    let infer = format!("{}/v2/models/mlp/infer", edge.url);
    for (bad, reason) in [("corrupt", "is corrupt or not an ONNX model"), ("wrong_opset", "operator set 999")] {
        let file = reference::build_dir().join("bad-models").join(bad).join("model.onnx");
        let r = load_file(&edge, "mlp", 2, &file);
        assert_eq!(r.status, 400, "{bad}: {}", String::from_utf8_lossy(&r.body));
        assert!(r.error().contains(reason) && r.error().contains("nothing changed"), "{bad}: {}", r.error());
        assert_eq!(post(&agent, &infer, &body, Some(n)).json()["model_version"], "1");
        let index = send_json(&agent, "POST", &format!("{}/v2/repository/index", edge.url), &json!({}), false).json();
        assert_eq!(index, json!([{ "name": "mlp", "version": "1", "state": "READY", "reason": "" }]), "{bad}");
        assert_eq!(get(&agent, &format!("{}/v2/health/ready", edge.url)).status, 200);
        let model = &report(&edge)["models"][0];
        assert!(model["last_load_error"].as_str().is_some_and(|e| e.starts_with("2: ")), "{model}");
    }
    // A model neither in the repository nor given as a file.
    let r = send_json(&agent, "POST", &format!("{}/v2/repository/models/nope/load", edge.url), &json!({}), true);
    assert_eq!(r.status, 404, "{}", r.error());
    assert!(r.error().contains("not in the repository"), "{}", r.error());
}

#[test]
fn policies_and_unloads_that_would_lose_traffic_are_refused() {
    let edge = start_controlled(&[("mlp", "")]);
    let agent = client();
    // A weight on a version that is not loaded.
    let r = set_policy(&edge, "mlp", json!({ "weights": { "1": 90, "2": 10 } }));
    assert_eq!(r.status, 400, "{}", r.error());
    assert!(r.error().contains("version 2 is not ready"), "{}", r.error());
    // Mutating admin calls need the token; reading does not.
    let r = send_json(
        &agent,
        "PUT",
        &format!("{}/v2/fabric/models/mlp/policy", admin(&edge)),
        &json!({ "weights": { "1": 1 } }),
        false,
    );
    assert_eq!(r.status, 401, "{}", r.error());
    assert_eq!(get(&agent, &format!("{}/v2/fabric/models/mlp/policy", admin(&edge))).json()["policy"], Value::Null);
    // The version the policy routes to cannot be unloaded.
    assert_eq!(set_policy(&edge, "mlp", json!({ "weights": { "1": 1 } })).status, 200);
    let unload = |version: &str| {
        send_json(
            &agent,
            "POST",
            &format!("{}/v2/repository/models/mlp/unload", edge.url),
            &json!({ "parameters": { "version": version } }),
            true,
        )
    };
    let r = unload("1");
    assert_eq!(r.status, 409, "{}", r.error());
    assert!(r.error().contains("still receives traffic"), "{}", r.error());
    let (body, n) = mlp_body(None);
    assert_eq!(post(&agent, &format!("{}/v2/models/mlp/infer", edge.url), &body, Some(n)).status, 200);
    // Without a policy, an unload goes through; the model is gone afterwards.
    assert_eq!(
        send_json(&agent, "DELETE", &format!("{}/v2/fabric/models/mlp/policy", admin(&edge)), &json!({}), true).status,
        200
    );
    assert_eq!(unload("1").status, 200);
    assert_eq!(post(&agent, &format!("{}/v2/models/mlp/infer", edge.url), &body, Some(n)).status, 404);
    // Unloading the last version of a startup model leaves the node ready (nothing it must serve is broken).
    assert_eq!(get(&agent, &format!("{}/v2/health/ready", edge.url)).status, 200);
}

#[test]
fn model_control_is_refused_unless_switched_on() {
    let edge = start_edge_with_args(&[("mlp", "")], "", &[]);
    let r = send_json(&client(), "POST", &format!("{}/v2/repository/models/mlp/load", edge.url), &json!({}), true);
    assert_eq!(r.status, 403, "{}", r.error());
    assert!(r.error().contains("--model-control explicit"), "{}", r.error());
    let r = send_json(&client(), "POST", &format!("{}/v2/repository/models/mlp/unload", edge.url), &json!({}), true);
    assert_eq!(r.status, 403, "{}", r.error());
    // Without the token, the answer is the same refusal whether control is on or off: nothing says more.
    let r = send_json(&client(), "POST", &format!("{}/v2/repository/models/mlp/unload", edge.url), &json!({}), false);
    assert_eq!(r.status, 401, "{}", r.error());
    assert!(edge.admin.is_none(), "the admin API is off by default");
}

#[test]
fn unloading_answers_everything_queued() {
    const ROWS: usize = 8;
    const REQUESTS: usize = 700;
    // A standing queue is what this test drains: the queueing-delay target is off (100%), or admission
    // would refuse part of the burst at the door on a slow machine.
    let edge = start_controlled(&[(
        "cnn",
        "max_batch_size = 8\nqueue_capacity = 2000\ndefault_timeout_ms = 120000\nqueue_wait_pct = 100\n",
    )]);
    let data: Vec<u8> = (0..ROWS * 3 * 64 * 64).flat_map(|i| ((i % 7) as f32 / 7.0).to_le_bytes()).collect();
    let head = json!({ "inputs": [{ "name": "input", "shape": [ROWS, 3, 64, 64], "datatype": "FP32",
                                    "parameters": { "binary_data_size": data.len() } }] });
    let mut body = serde_json::to_vec(&head).expect("json");
    let n = body.len();
    body.extend_from_slice(&data);
    let body = Arc::new(body);
    let url = format!("{}/v2/models/cnn/infer", edge.url);
    let gate = Arc::new(std::sync::Barrier::new(REQUESTS));
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let (body, url, gate, answered) = (body.clone(), url.clone(), gate.clone(), answered.clone());
            std::thread::spawn(move || {
                let agent = client();
                gate.wait();
                let reply = post(&agent, &url, &body, Some(n));
                answered.fetch_add(1, Ordering::SeqCst);
                (reply.status, if reply.status == 200 { String::new() } else { reply.error() })
            })
        })
        .collect();
    // Every request has reached the version (is queued or running) before the unload.
    let mut queued_at_unload = 0;
    wait_for("every request in the pool", Duration::from_secs(120), || {
        let v = version_report(&edge, "cnn", 1);
        queued_at_unload = v["queue_depth"].as_u64().unwrap_or(0);
        v["in_flight"].as_u64().unwrap_or(0) as usize + answered.load(Ordering::SeqCst) >= REQUESTS
    });
    let unload =
        send_json(&client(), "POST", &format!("{}/v2/repository/models/cnn/unload", edge.url), &json!({}), true);
    assert_eq!(unload.status, 200, "{}", unload.error());
    let outcomes: Vec<(u16, String)> = clients.into_iter().map(|c| c.join().expect("client")).collect();
    let failed: Vec<_> = outcomes.iter().filter(|(status, _)| *status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {REQUESTS} failed (first {:?}); {queued_at_unload} were queued at the unload",
        failed.len(),
        failed.first()
    );
    eprintln!("unload drained {queued_at_unload} queued requests: {}", unload.json());
    assert!(queued_at_unload >= 100, "only {queued_at_unload} were queued at the unload");
    assert_eq!(get(&client(), &format!("{}/v2/models/cnn", edge.url)).status, 404);
    // Its metric series went with it.
    let metrics = String::from_utf8_lossy(&get(&client(), &format!("{}/metrics", edge.url)).body).into_owned();
    let left: Vec<&str> =
        metrics.lines().filter(|l| l.contains("model=\"cnn\"") && l.contains("version=\"1\"")).collect();
    assert!(left.is_empty(), "series of the unloaded version remain: {left:?}");
}

/// The `fabric_model_loads_total` count of a model's successful loads.
fn loads_of(edge: &Edge, model: &str) -> u64 {
    let metrics = String::from_utf8_lossy(&get(&client(), &format!("{}/metrics", edge.url)).body).into_owned();
    let series = format!("fabric_model_loads_total{{model=\"{model}\",outcome=\"loaded\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(series.as_str())).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn concurrent_loads_of_the_same_version_share_one_load() {
    let edge = start_controlled(&[("cnn", "")]);
    assert_eq!(loads_of(&edge, "cnn"), 1, "the load at start");
    // Four identical reloads at once (the CNN takes long enough to load that they overlap).
    let body = json!({ "parameters": { "config": "{\"max_batch_size\": 16}" } });
    let gate = Arc::new(std::sync::Barrier::new(4));
    let url = format!("{}/v2/repository/models/cnn/load", edge.url);
    let replies: Vec<Reply> = (0..4)
        .map(|_| {
            let (gate, url, body) = (gate.clone(), url.clone(), body.clone());
            std::thread::spawn(move || {
                gate.wait();
                send_json(&client(), "POST", &url, &body, true)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("client"))
        .collect();
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.error());
    }
    assert_eq!(loads_of(&edge, "cnn"), 2, "four identical loads at once built the engine more than once");
    let config = get(&client(), &format!("{}/v2/models/cnn/config", edge.url)).json();
    assert_eq!(config["max_batch_size"], 16);
}

#[test]
fn resizing_under_load_fails_nothing_and_answers_when_ready() {
    let edge = start_controlled(&[("mlp", "")]);
    let load = Load::start(&format!("{}/v2/models/mlp/infer", edge.url), 3, mlp_body(None));
    load.wait_more(200, Duration::from_secs(60));
    let config_url = format!("{}/v2/fabric/models/mlp/versions/1/config", admin(&edge));
    for replicas in [4, 1] {
        let r = send_json(&client(), "PUT", &config_url, &json!({ "replicas": replicas }), true);
        assert_eq!(r.status, 200, "resize to {replicas}: {}", r.error());
        let v = version_report(&edge, "mlp", 1);
        assert_eq!(
            (v["target_replicas"].as_u64(), v["ready_replicas"].as_u64()),
            (Some(replicas), Some(replicas)),
            "{v}"
        );
        load.wait_more(300, Duration::from_secs(60));
    }
    // Another setting swaps in a new pool under load.
    let r = send_json(&client(), "PUT", &config_url, &json!({ "max_batch_size": 8, "replicas": 2 }), true);
    assert_eq!(r.status, 200, "{}", r.error());
    load.wait_more(300, Duration::from_secs(60));
    let samples = load.stop();
    assert_no_failures(&samples);
    let config = get(&client(), &format!("{}/v2/models/mlp/config", edge.url)).json();
    assert_eq!((config["max_batch_size"].as_u64(), config["instance_group"][0]["count"].as_u64()), (Some(8), Some(2)));
}

#[test]
fn the_load_report_matches_a_known_load() {
    let edge = start_controlled(&[("mlp", "")]);
    let load = Load::start(&format!("{}/v2/models/mlp/infer", edge.url), 2, mlp_body(None));
    // More than one window (4 s) of steady load.
    std::thread::sleep(Duration::from_millis(4_500));
    let asked = Instant::now();
    let v = version_report(&edge, "mlp", 1);
    let answered_at = Instant::now();
    load.wait_more(50, Duration::from_secs(30));
    let samples = load.stop();
    assert_no_failures(&samples);
    // The report was taken between `asked` and `answered_at`: count the client's answers in its window.
    let at = asked + (answered_at - asked) / 2;
    let window = Duration::from_millis(v["window_ms"].as_u64().expect("window"));
    let in_window: Vec<&Sample> = samples.iter().filter(|s| s.done <= at && s.done > at - window).collect();
    let rate = in_window.len() as f64 / window.as_secs_f64();
    let served = v["served_per_s"].as_f64().expect("served rate");
    assert!((served - rate).abs() <= rate * 0.1, "report says {served:.0}/s served, the client saw {rate:.0}/s: {v}");
    let arrivals = v["arrivals_per_s"].as_f64().expect("arrival rate");
    assert!((arrivals - rate).abs() <= rate * 0.1, "report says {arrivals:.0}/s arrived, the client saw {rate:.0}/s");
    // The server's latency is part of each request's client-side time: its median lies within what
    // the client saw (the report's buckets are 4% wide). No ratio of the two: on a busy machine the
    // client's share of the time varies.
    let client_max = in_window.iter().map(|s| s.done - s.sent).max().unwrap_or_default().as_secs_f64() * 1e3;
    let p50 = v["p50_ms"].as_f64().expect("p50");
    assert!(p50 > 0.0 && p50 <= client_max * 1.04, "server p50 {p50} ms, client's slowest {client_max} ms");
    assert_eq!((v["ready_replicas"].as_u64(), v["weight_pct"].as_f64()), (Some(1), Some(100.0)));
}

#[test]
fn a_node_on_its_own_sizes_its_pools_to_the_load() {
    // Short delays so the test is quick; the policy is the same as with the defaults.
    let config =
        "[autoscale]\nenabled = true\nmax_replicas = 2\nup_delay_s = 1.0\ndown_delay_s = 2.0\ninterval_ms = 200\n";
    let args: Vec<String> = ["--admin-addr", "127.0.0.1:0"].iter().map(|s| s.to_string()).collect();
    let edge = start_edge_with_args(&[("cnn", "max_batch_size = 4\n")], config, &args);
    let replicas = |edge: &Edge| version_report(edge, "cnn", 1)["target_replicas"].as_u64();
    assert_eq!(replicas(&edge), Some(1));
    let data: Vec<u8> = (0..4 * 3 * 64 * 64).flat_map(|i| ((i % 5) as f32 / 5.0).to_le_bytes()).collect();
    let head = json!({ "inputs": [{ "name": "input", "shape": [4, 3, 64, 64], "datatype": "FP32",
                                    "parameters": { "binary_data_size": data.len() } }] });
    let mut body = serde_json::to_vec(&head).expect("json");
    let n = body.len();
    body.extend_from_slice(&data);
    let load = Load::start(&format!("{}/v2/models/cnn/infer", edge.url), 4, (body, n));
    wait_for("a second replica serving under load", Duration::from_secs(60), || {
        version_report(&edge, "cnn", 1)["ready_replicas"].as_u64() == Some(2)
    });
    assert_eq!(replicas(&edge), Some(2));
    let samples = load.stop();
    assert_no_failures(&samples);
    wait_for("back to one replica when idle", Duration::from_secs(60), || replicas(&edge) == Some(1));
}
