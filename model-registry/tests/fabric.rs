//! A whole fabric on loopback: a model registry, a cloud-hub and two edge-nodes (real binaries),
//! driven by the `fabric` CLI. Rollouts under steady load (no request may fail), canary shares,
//! automatic rollback, a registry killed mid-rollout, nodes restarted offline and with a corrupted
//! model cache, and refused uploads and identities. Waits are bounded; timings are printed, not
//! asserted.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fabric_proto::registry::{Heartbeat, NodeInfo, ProtoError, RegistryAddr, RegistryClient, Request};
use fabric_proto::tls::TlsFiles;
use serde_json::{json, Value};
use support::{body_for, body_with_timeout, client, infer, infer_served, model, wait_for, Fabric, Load, Sample};

/// Waits until every one of `nodes` nodes routes `name` by `want` and has converged.
fn wait_routes(f: &Fabric, registry: &str, name: &str, nodes: usize, want: Value) -> Duration {
    wait_for(&format!("{nodes} nodes routing {want}"), Duration::from_secs(60), || {
        let status = f.cli(registry, &["rollout", "status", name]);
        let all = status["nodes"].as_array().cloned().unwrap_or_default();
        all.len() == nodes && all.iter().all(|n| n["policy"]["weights"] == want && n["converged"] == true)
    })
}

/// How long after `from` each node's answers were all from `version` (the send time of its last
/// answer from another version, relative to `from`), over answers sent before `until`.
fn time_to_all(samples: &[Sample], nodes: usize, from: Instant, until: Instant, version: &str) -> Vec<Duration> {
    (0..nodes)
        .map(|node| {
            samples
                .iter()
                .filter(|s| s.node == node && s.sent >= from && s.sent < until && s.version != version)
                .map(|s| s.sent.saturating_duration_since(from))
                .max()
                .unwrap_or_default()
        })
        .collect()
}

fn assert_all_served(samples: &[Sample]) {
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "{} of {} requests failed; first: {:?}", failed.len(), samples.len(), failed.first());
}

#[test]
fn rollouts_across_a_fabric_fail_no_request() {
    let f = Fabric::new("rollout");
    let registry = f.registry("127.0.0.1:0", &[]);
    let r = registry.addr.clone();
    let hub = f.hub(&r);
    let e1 = f.edge("edge-1", &r, &["site=berlin"]);
    // edge-2 keeps no model file it is not asked to serve (a cache budget of 0 MiB).
    let e2 = f.edge_with("edge-2", &r, &["site=paris"], Some("[registry]\ncache_budget_mib = 0\n"));
    let nodes = vec![e1.addr.clone(), e2.addr.clone(), hub.addr.clone()];
    let a = client();

    // v1 pushed and deployed everywhere: each node fetches, loads, routes and serves it.
    let pushed = f.cli(&r, &["model", "push", "mlp", &model("mlp")]);
    assert_eq!((pushed["version"].as_u64(), pushed["size"].as_u64().is_some()), (Some(1), true), "{pushed}");
    f.cli(&r, &["deploy", "mlp", "--to", "all"]);
    for n in &nodes {
        wait_for(&format!("{n} serving v1"), Duration::from_secs(60), || infer(&a, n) == (200, "1".into()));
    }
    let listed = f.cli(&r, &["nodes"]);
    let ids: Vec<&str> = listed.as_array().into_iter().flatten().filter_map(|n| n["node"].as_str()).collect();
    assert_eq!(ids, ["edge-1", "edge-2", "hub-1"], "{listed}");
    assert!(listed.as_array().into_iter().flatten().all(|n| n["ready"] == json!(["mlp:1"])), "{listed}");

    // v2 as a 20% canary: the share over 5,000 requests at an edge.
    assert_eq!(f.cli(&r, &["model", "push", "mlp", &model("mlp_alt")])["version"], 2);
    f.cli(&r, &["rollout", "canary", "mlp", "2", "--weight", "20"]);
    wait_routes(&f, &r, "mlp", 3, json!({ "1": 80, "2": 20 }));
    let load = Load::start(&nodes[..1], 4);
    wait_for("5,000 answers", Duration::from_secs(180), || load.count() >= 5_000);
    let samples = load.stop();
    assert_all_served(&samples);
    let share = samples.iter().filter(|s| s.version == "2").count() as f64 * 100.0 / samples.len() as f64;
    assert!((share - 20.0).abs() <= 3.0, "v2 served {share:.1}% of {} requests under a 20% canary", samples.len());

    // Promote, then roll back, under steady load on every node: nothing fails.
    let load = Load::start(&nodes, 2);
    let settle = |n: usize| {
        let target = load.count() + n;
        wait_for("answers", Duration::from_secs(120), || load.count() >= target);
    };
    // Each switch is waited for on every node (a node that must fetch the version again takes
    // longer than a fast node's hundreds of answers), then 300 more answers are collected.
    let switched = |since: Instant, version: &str| {
        wait_for(&format!("every node answering from v{version}"), Duration::from_secs(120), || {
            load.all_answered_with(3, since, version)
        });
        settle(300);
    };
    settle(300);
    f.cli(&r, &["rollout", "promote", "mlp"]);
    let promoted = Instant::now();
    switched(promoted, "2");
    f.cli(&r, &["rollout", "rollback", "mlp"]);
    let rolled_back = Instant::now();
    switched(rolled_back, "1");
    let end = Instant::now();
    let samples = load.stop();
    assert_all_served(&samples);
    let to_v2 = time_to_all(&samples, 3, promoted, rolled_back, "2");
    let to_v1 = time_to_all(&samples, 3, rolled_back, end, "1");
    let ms = |d: &[Duration]| format!("{:?} ms", d.iter().map(|d| d.as_millis()).collect::<Vec<_>>());
    support::figure(
        "promote (canary already warm) -> 100% of answers from v2, per node, after the CLI returned",
        &ms(&to_v2),
    );
    support::figure("rollback to a version the nodes had unloaded -> 100% from v1, per node", &ms(&to_v1));
    for (node, (a2, a1)) in to_v2.iter().zip(&to_v1).enumerate() {
        let later = |from: Instant, to: Instant, v: &str| {
            samples.iter().any(|s| s.node == node && s.sent >= from && s.sent < to && s.version == v)
        };
        let window: Vec<(u128, u128, String)> = samples
            .iter()
            .filter(|s| s.node == node && s.sent >= promoted)
            .take(20)
            .map(|s| {
                (
                    s.sent.saturating_duration_since(promoted).as_millis(),
                    s.done.saturating_duration_since(promoted).as_millis(),
                    s.version.clone(),
                )
            })
            .collect();
        assert!(
            later(promoted, rolled_back, "2") && later(rolled_back, end, "1"),
            "node {node} never switched ({a2:?}, {a1:?}); rollback at {} ms; answers: {window:?}",
            rolled_back.saturating_duration_since(promoted).as_millis()
        );
    }

    // Back-to-back canaries end where the last command said (kserve#2130).
    for cmd in [&["rollout", "canary", "mlp", "2", "--weight", "30"][..], &["rollout", "promote", "mlp"]] {
        f.cli(&r, cmd);
    }
    assert_eq!(f.cli(&r, &["model", "push", "mlp", &model("mlp"), "--version", "3"])["version"], 3);
    f.cli(&r, &["rollout", "canary", "mlp", "3", "--weight", "30"]);
    f.cli(&r, &["rollout", "rollback", "mlp"]);
    wait_routes(&f, &r, "mlp", 3, json!({ "2": 100 }));
    for n in &nodes {
        assert_eq!(infer(&a, n), (200, "2".into()));
    }
    // The cache budget: edge-2 keeps only v2's file (v1's, also v3's, was deleted once unwanted);
    // edge-1, within its 4 GiB default, keeps both.
    let cached = |id: &str| -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(f.dir.join(format!("{id}-data/models")))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().to_string()).collect())
            .unwrap_or_default();
        files.sort();
        files
    };
    let (v1, v2) = (
        support::digest(std::path::Path::new(&model("mlp"))),
        support::digest(std::path::Path::new(&model("mlp_alt"))),
    );
    wait_for("edge-2's cache trimmed to its budget", Duration::from_secs(30), || {
        cached("edge-2") == [format!("{v2}.onnx")]
    });
    let mut both = vec![format!("{v1}.onnx"), format!("{v2}.onnx")];
    both.sort();
    assert_eq!(cached("edge-1"), both);
    // A shadow reaches every node's routing, and answers still come from the stable version.
    f.cli(&r, &["rollout", "shadow", "mlp", "3", "--share", "100"]);
    wait_for("the shadow on every node", Duration::from_secs(60), || {
        let status = f.cli(&r, &["rollout", "status", "mlp"]);
        let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
        nodes.len() == 3 && nodes.iter().all(|n| n["policy"]["shadow"] == json!({ "version": 3, "percent": 100 }))
    });
    for n in &nodes {
        assert_eq!(infer(&a, n), (200, "2".into()));
    }
    f.cli(&r, &["rollout", "shadow", "mlp", "3", "--share", "0"]);

    // Automatic rollback: a CNN canary with 20x the work (multiply-adds) is rolled back by the
    // analysis, with the reason.
    f.cli(&r, &["model", "push", "cnn", &model("cnn")]);
    f.cli(&r, &["deploy", "cnn", "--to", "edge"]);
    wait_routes(&f, &r, "cnn", 2, json!({ "1": 100 }));
    assert_eq!(f.cli(&r, &["model", "push", "cnn", &model("cnn_slow")])["version"], 2);
    f.cli(&r, &["rollout", "canary", "cnn", "2", "--weight", "50", "--auto-rollback"]);
    wait_routes(&f, &r, "cnn", 2, json!({ "1": 50, "2": 50 }));
    let load = Load::start_model(&nodes[..2], 2, "cnn");
    let started = Instant::now();
    let took = wait_for("the automatic rollback", Duration::from_secs(60), || {
        // Polled gently: every CLI call is a process on the same two cores as the fabric.
        std::thread::sleep(Duration::from_millis(300));
        let status = f.cli(&r, &["rollout", "status", "cnn"]);
        !status["rollout"]["auto_rolled_back"].is_null()
    });
    load.stop();
    let status = f.cli(&r, &["rollout", "status", "cnn"]);
    let why = status["rollout"]["auto_rolled_back"].as_str().unwrap_or_default().to_string();
    support::figure(
        "automatic rollback after the load started",
        &format!("{} ms ({why})", started.elapsed().as_millis()),
    );
    assert!(why.contains("p99") || why.contains("error rate"), "{status}");
    assert_eq!(status["rollout"]["canary"], Value::Null);
    let _ = took;
    wait_routes(&f, &r, "cnn", 2, json!({ "1": 100 }));
    let text = f.cli_as(&r, "operator", &["rollout", "status", "cnn"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("automatically rolled back"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
}

#[test]
fn a_registry_killed_mid_rollout_loses_nothing_and_nodes_serve_on() {
    let f = Fabric::new("restart");
    let registry = f.registry("127.0.0.1:0", &[]);
    let r = registry.addr.clone();
    let e1 = f.edge("edge-1", &r, &[]);
    let e2 = f.edge("edge-2", &r, &[]);
    let a = client();
    f.cli(&r, &["model", "push", "mlp", &model("mlp")]);
    f.cli(&r, &["deploy", "mlp", "--to", "edge"]);
    wait_routes(&f, &r, "mlp", 2, json!({ "1": 100 }));
    f.cli(&r, &["model", "push", "mlp", &model("mlp_alt")]);
    // The CLI's answer is the acknowledgement; the registry dies right after it.
    let acked = f.cli(&r, &["rollout", "canary", "mlp", "2", "--weight", "50"]);
    drop(registry); // SIGKILL
    for n in [&e1.addr, &e2.addr] {
        for _ in 0..100 {
            let (status, version) = infer(&a, n);
            assert_eq!(status, 200, "{n} failed while the registry was down: {version}");
        }
    }
    // A node restarted while the registry is down serves its last desired state from disk.
    drop(e2);
    let e2 = f.edge("edge-2", &r, &[]);
    wait_for("edge-2 serving offline", Duration::from_secs(30), || infer(&a, &e2.addr).0 == 200);
    // A cached model file corrupted on disk is found by its digest and fetched again, never served.
    drop(e1);
    // The v1 file's digest, computed here (the registry is down).
    let v1 = support::digest(std::path::Path::new(&model("mlp")));
    let cached = f.dir.join("edge-1-data/models").join(format!("{v1}.onnx"));
    assert!(cached.exists(), "edge-1 has no cached {}", cached.display());
    std::fs::write(&cached, b"not the model any more").expect("corrupt the cache");
    let registry = f.registry(&r, &[]);
    let started = Instant::now();
    let e1 = f.edge("edge-1", &r, &[]);
    // Same state as acknowledged, and every node converges to it.
    let status = f.cli(&r, &["rollout", "status", "mlp"]);
    assert_eq!(status["rollout"], acked["rollout"], "the registry lost or changed state");
    let took = wait_routes(&f, &r, "mlp", 2, json!({ "1": 50, "2": 50 }));
    support::figure(
        "every node converged after the registry came back (kill -9 mid-rollout; one node restarted with a corrupted cache)",
        &format!("{} ms", started.elapsed().as_millis()),
    );
    let _ = took;
    assert_eq!(support::digest(&cached), v1, "the corrupted cache file was not replaced");
    let answers: Vec<(u16, String)> = (0..200).map(|_| infer(&a, &e1.addr)).collect();
    assert!(answers.iter().all(|(s, _)| *s == 200), "{:?}", answers.iter().find(|(s, _)| *s != 200));
    // A node that stops heartbeating is marked down (3 s), the others stay up.
    drop(e2);
    wait_for("edge-2 marked down", Duration::from_secs(30), || {
        let nodes = f.cli(&r, &["nodes"]);
        let state = |id: &str| {
            nodes
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["node"] == id)
                .map(|n| n["state"].clone())
                .unwrap_or_default()
        };
        state("edge-2") == "down" && state("edge-1") == "up"
    });
    drop(registry);
}

fn registry_client(
    f: &Fabric,
    registry: &str,
    id: &str,
    runtime: &tokio::runtime::Runtime,
) -> std::sync::Arc<RegistryClient> {
    let _enter = runtime.enter();
    let target = RegistryAddr::parse(&format!("registry-1@{registry}")).expect("address");
    RegistryClient::new(target, &TlsFiles::in_dir(&f.certs, id)).expect("client")
}

#[test]
fn bad_uploads_and_borrowed_identities_are_refused() {
    let f = Fabric::new("refusals");
    let registry = f.registry("127.0.0.1:0", &["--max-model-mib", "1"]);
    let r = registry.addr.clone();
    let blobs = f.dir.join("registry/blobs");
    let staging = f.dir.join("registry/staging");
    let nothing_left = || {
        let count = |d: &std::path::Path| std::fs::read_dir(d).map(|e| e.count()).unwrap_or(0);
        assert_eq!((count(&blobs), count(&staging)), (0, 0), "an upload left files behind");
    };
    let push = |id: &str, file: &str| f.cli_as(&r, id, &["model", "push", "m", file]);
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    let corrupt = reference_bad("corrupt");
    let out = push("operator", &corrupt);
    assert!(!out.status.success() && stderr(&out).contains("not a usable ONNX model"), "{}", stderr(&out));
    nothing_left();
    let out = push("operator", &model("mlp")); // 1.6 MB over the 1 MiB limit
    assert!(!out.status.success() && stderr(&out).contains("over the registry's limit"), "{}", stderr(&out));
    nothing_left();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let operator = registry_client(&f, &r, "operator", &runtime);
    let truncated = runtime.block_on(operator.call(&Request::Push { name: "m".into(), version: None, size: 1000 }));
    assert!(
        matches!(&truncated, Err(ProtoError::Refused(e)) if e.message.contains("truncated: 0 of 1000")),
        "{truncated:?}"
    );
    nothing_left();
    assert!(f.cli(&r, &["model", "list"]).as_array().is_some_and(|l| l.is_empty()));

    // A node's certificate cannot push; an operator's can.
    let out = push("edge-1", &model("digits"));
    assert!(!out.status.success() && stderr(&out).contains("needs an operator certificate"), "{}", stderr(&out));
    let out = push("operator", &model("digits"));
    assert!(out.status.success(), "{}", stderr(&out));

    // A node reports only for itself.
    let edge1 = registry_client(&f, &r, "edge-1", &runtime);
    let as_other = Heartbeat {
        info: NodeInfo { node_id: "edge-2".into(), role: "edge".into(), labels: BTreeMap::new(), ..Default::default() },
        ..Default::default()
    };
    let refused = runtime.block_on(edge1.call(&Request::Heartbeat(as_other)));
    assert!(
        matches!(&refused, Err(ProtoError::Refused(e)) if e.message.contains("cannot report as 'edge-2'")),
        "{refused:?}"
    );

    // A version in use cannot be deleted.
    f.cli(&r, &["deploy", "m", "--to", "edge"]);
    let out = f.cli_as(&r, "operator", &["model", "rm", "m:1"]);
    assert!(!out.status.success() && stderr(&out).contains("is in the rollout"), "{}", stderr(&out));
}

fn reference_bad(name: &str) -> String {
    fabric_testkit::reference::build_dir().join("bad-models").join(name).join("model.onnx").display().to_string()
}

#[test]
fn a_load_step_on_an_edge_and_a_hub_scales_up_and_back_and_answers_every_request() {
    let f = Fabric::new("autoscale");
    // A low utilisation target: on a machine busy with other work the test's clients offer less load,
    // and the decision must still come from that load.
    let registry = f.registry(
        "127.0.0.1:0",
        &[
            "--autoscale-target",
            "0.2",
            "--autoscale-up-delay-s",
            "1",
            "--autoscale-down-delay-s",
            "2",
            "--hub-idle-to-zero-s",
            "0",
        ],
    );
    let r = registry.addr.clone();
    let _hub = f.hub(&r);
    let edge = f.edge("edge-1", &r, &[]);
    f.cli(&r, &["model", "push", "cnn", &model("cnn")]);
    f.cli(&r, &["deploy", "cnn", "--to", "all"]);
    wait_routes(&f, &r, "cnn", 2, json!({ "1": 100 }));
    let edge_status = || -> Value {
        let status = f.cli(&r, &["rollout", "status", "cnn"]);
        status["nodes"].as_array().into_iter().flatten().find(|n| n["node"] == "edge-1").cloned().unwrap_or_default()
    };
    let replicas = || edge_status()["replicas"]["1"].as_u64();
    let ready = || edge_status()["versions"][0]["ready_replicas"].as_u64();
    assert_eq!(replicas(), Some(1));
    // 1x: one closed-loop client (about one replica's worth); then 8x: eight.
    let base = Load::start_model(std::slice::from_ref(&edge.addr), 1, "cnn");
    wait_for("the 1x load running", Duration::from_secs(30), || base.count() >= 20);
    let step = Instant::now();
    let burst = Load::start_model(std::slice::from_ref(&edge.addr), 7, "cnn");
    wait_for("a second replica decided under load", Duration::from_secs(60), || replicas() == Some(2));
    let decided = step.elapsed();
    wait_for("the second replica serving", Duration::from_secs(60), || ready() == Some(2));
    support::figure(
        "load step on an edge (CNN, 1 -> 8 closed-loop clients): step -> second replica decided / serving",
        &format!("{} ms / {} ms", decided.as_millis(), step.elapsed().as_millis()),
    );
    let reason = edge_status()["autoscaled"]["cnn:1"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("demand") || reason.contains("step") || reason.contains("queue"), "{reason}");
    let mut samples = burst.stop();
    samples.extend(base.stop());
    // Every request answered: served (here or by the hub), or refused with the deadline's precise 503.
    let precise = |s: &Sample| s.status == 503 && (s.version.contains("deadline") || s.version.contains("queue"));
    let lost: Vec<&Sample> = samples.iter().filter(|s| s.status != 200 && !precise(s)).collect();
    assert!(lost.is_empty(), "{} of {} not answered properly, first {:?}", lost.len(), samples.len(), lost.first());
    let refused = samples.iter().filter(|s| precise(s)).count();
    support::figure(
        "load step on an edge + hub: answers by server, and 503s the deadline forced",
        &format!("{} answers {:?}, {refused} refused", samples.len(), served_by(&samples)),
    );
    let idle = Instant::now();
    wait_for("back to one replica when idle", Duration::from_secs(60), || replicas() == Some(1));
    support::figure(
        "load step on an edge: load ended -> back to one replica (down delay 2 s)",
        &format!("{} ms", idle.elapsed().as_millis()),
    );
}

/// Who served each answer, counted.
fn served_by(samples: &[Sample]) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for s in samples {
        *by.entry(s.served_by.clone()).or_default() += 1;
    }
    by
}

#[test]
fn hubs_learnt_from_the_registry_scale_to_zero_share_offload_and_survive_a_kill() {
    let f = Fabric::new("hubs");
    let registry = f.registry("127.0.0.1:0", &["--hub-idle-to-zero-s", "2"]);
    let r = registry.addr.clone();
    let mut hub1 = f.hub_as("hub-1", &r);
    let hub2 = f.hub_as("hub-2", &r);
    // No --hub: the edge learns the hubs from the registry. Everything offloaded while a hub is usable.
    let edge = f.edge_with("edge-1", &r, &[], Some("[offload]\nmode = \"always\"\n"));
    let a = client();
    f.cli(&r, &["model", "push", "mlp", &model("mlp")]);
    f.cli(&r, &["deploy", "mlp", "--to", "all"]);
    f.cli(&r, &["model", "push", "cnn", &model("cnn")]);
    f.cli(&r, &["deploy", "cnn", "--to", "hub"]);
    wait_routes(&f, &r, "mlp", 3, json!({ "1": 100 }));
    wait_routes(&f, &r, "cnn", 2, json!({ "1": 100 }));

    // Idle for 2 s, each hub goes to zero replicas; the model stays loaded (and ready to wake).
    let replicas_of = |model: &str, id: &str| -> Option<u64> {
        let status = f.cli(&r, &["rollout", "status", model]);
        let node = status["nodes"].as_array()?.iter().find(|n| n["node"] == id)?.clone();
        // Only once the node has applied it: a hub told "zero" serves on until its next heartbeat,
        // and a request it serves meanwhile wakes nothing (two flaky failures came from that race).
        (node["converged"] == true).then(|| node["replicas"]["1"].as_u64()).flatten()
    };
    let hub_replicas = |id: &str| replicas_of("mlp", id);
    let idle = Instant::now();
    wait_for("both hubs at zero replicas", Duration::from_secs(60), || {
        hub_replicas("hub-1") == Some(0) && hub_replicas("hub-2") == Some(0) && replicas_of("cnn", "hub-1") == Some(0)
    });
    support::figure(
        "hubs idle -> both at zero replicas (idle window 2 s)",
        &format!("{} ms", idle.elapsed().as_millis()),
    );
    let reason = f.cli(&r, &["rollout", "status", "mlp"]).to_string();
    assert!(reason.contains("scaled to zero"), "{reason}");

    // Straight to hub-1 at zero over HTTP: a request that can wait is held while a replica loads,
    // and served...
    let cold = Instant::now();
    let (status, text, _) = infer_served(&a, &hub1.addr, "mlp", &body_with_timeout("mlp", 30_000_000));
    assert_eq!(status, 200, "{text}");
    support::figure(
        "hub cold start, MLP (ONNX Runtime): request at zero replicas -> answer",
        &format!("{} ms", cold.elapsed().as_millis()),
    );
    let cold = Instant::now();
    let (status, text, _) = infer_served(&a, &hub1.addr, "cnn", &body_with_timeout("cnn", 30_000_000));
    assert_eq!(status, 200, "{text}");
    support::figure(
        "hub cold start, CNN (ONNX Runtime): request at zero replicas -> answer",
        &format!("{} ms", cold.elapsed().as_millis()),
    );
    // ...and at hub-2 (still at zero), one whose deadline is shorter than a replica's load gets a
    // precise 503 at once; it wakes a replica all the same.
    let (status, text, _) = infer_served(&a, &hub2.addr, "mlp", &body_with_timeout("mlp", 1_000));
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("scaled to zero"), "{text}");
    let woken = || f.cli(&r, &["rollout", "status", "mlp"]).to_string().contains("woken from zero");
    wait_for("the hubs woken by their requests", Duration::from_secs(30), || {
        let awake = |id: &str| hub_replicas(id).is_some_and(|n| n >= 1);
        awake("hub-1") && awake("hub-2") && woken()
    });
    // Idle again, both back at zero; then an offloaded request wakes a hub too (the edge, whose
    // patience with a hub is short, serves that one itself; the hub is woken for the next ones).
    wait_for("both hubs at zero again", Duration::from_secs(60), || {
        hub_replicas("hub-1") == Some(0) && hub_replicas("hub-2") == Some(0)
    });
    let (status, text, _) = infer_served(&a, &edge.addr, "mlp", &body_for("mlp"));
    assert_eq!(status, 200, "{text}");
    wait_for("a hub woken by offload", Duration::from_secs(30), || {
        hub_replicas("hub-1").is_some_and(|n| n >= 1) || hub_replicas("hub-2").is_some_and(|n| n >= 1)
    });

    // Load through the edge: both hubs take offload.
    let load = Load::start(std::slice::from_ref(&edge.addr), 4);
    wait_for("both hubs serving the edge's offload", Duration::from_secs(60), || {
        let by = served_by(&load.samples.lock().expect("samples"));
        by.contains_key("hub hub-1") && by.contains_key("hub hub-2")
    });

    // kill -9 of hub-1 under load: nothing lost; the registry marks it down, the edge stops using it.
    let killed = Instant::now();
    let _ = hub1.child.kill();
    let _ = hub1.child.wait();
    let state = |id: &str| -> String {
        let nodes = f.cli(&r, &["nodes"]);
        let node = nodes.as_array().into_iter().flatten().find(|n| n["node"] == id).cloned().unwrap_or_default();
        node["state"].as_str().unwrap_or_default().to_string()
    };
    // The edge's own view (its metrics): hub-1 no longer used, then no attempt on it while load goes on.
    let metric = |name: &str| -> f64 {
        let text =
            a.get(&format!("{}/metrics", edge.addr)).call().ok().and_then(|mut r| r.body_mut().read_to_string().ok());
        text.unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    };
    wait_for("hub-1 unused by the edge", Duration::from_secs(30), || {
        metric("fabric_hub_usable{hub=\"hub-1\"}") == 0.0 && state("hub-1") == "down"
    });
    support::figure(
        "hub kill -9 -> marked down by the registry and unused by the edge (heartbeat timeout 3 s)",
        &format!("{} ms", killed.elapsed().as_millis()),
    );
    // Attempts sent before the mark end on their own time (the hub's patience): count from when none is left.
    wait_for("the edge's requests to hub-1 drained", Duration::from_secs(30), || {
        metric("fabric_offload_in_flight{hub=\"hub-1\"}") == 0.0
    });
    let attempts = metric("fabric_offload_attempts_total{hub=\"hub-1\"");
    let after_down = Instant::now();
    wait_for("requests after hub-1 went down", Duration::from_secs(30), || {
        load.samples.lock().expect("samples").iter().filter(|s| s.sent > after_down).count() >= 200
    });
    assert_eq!(metric("fabric_offload_attempts_total{hub=\"hub-1\""), attempts, "no attempt on a hub marked down");
    {
        let samples = load.samples.lock().expect("samples");
        let late: Vec<&Sample> = samples.iter().filter(|s| s.sent > after_down).collect();
        assert!(late.iter().any(|s| s.served_by == "hub hub-2"), "offload moved to hub-2: {:?}", served_by(&samples));
    }

    // hub-1 restarted: it heartbeats again, is up, and takes offload again.
    let _hub1 = f.hub_as("hub-1", &r);
    let back = Instant::now();
    wait_for("hub-1 serving the edge's offload again", Duration::from_secs(60), || {
        load.samples.lock().expect("samples").iter().any(|s| s.sent > back && s.served_by == "hub hub-1")
    });
    let samples = load.stop();
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.status != 200).collect();
    assert!(failed.is_empty(), "{} of {} failed, first {:?}", failed.len(), samples.len(), failed.first());
    support::figure(
        "hub kill -9 under offload load: answers (all 200) by server",
        &format!("{} answers, {:?}", samples.len(), served_by(&samples)),
    );
}
