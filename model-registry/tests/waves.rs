//! Rollouts in waves over real edge nodes under load and simulated nodes (in this process, speaking
//! the real protocol with their own certificates): four waves complete in order, each moving the
//! nodes its hash cutoff names; a version that is slower on the nodes of wave 2 stops the rollout
//! there and every moved node goes back.

mod support;

use std::time::{Duration, Instant};

use fabric_proto::registry::DesiredState;
use model_registry::waves::position;
use serde_json::Value;
use support::{infer_model, model, simulate, wait_for, Fabric, Load};

/// Whether `desired` routes `model`'s requests to `version` at all.
fn routes_to(desired: &DesiredState, model: &str, version: u64) -> bool {
    desired
        .models
        .iter()
        .filter(|m| m.name == model)
        .filter_map(|m| m.policy.as_ref())
        .any(|p| p.weights.get(&version).is_some_and(|w| *w > 0))
}

fn history(status: &Value) -> Vec<String> {
    status["rollout"]["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["what"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn waves_move_the_fleet_in_order_and_a_slower_version_stops_at_its_wave() {
    let sims: Vec<String> = (0..37).map(|i| format!("sim-{i:02}")).collect();
    let real = ["edge-1", "edge-2", "edge-3"];
    let mut extra = sims.clone();
    extra.push("edge-3".into());
    let f = Fabric::with_edges("waves", &extra);
    let registry = f.registry("127.0.0.1:0", &["--no-autoscale"]);
    let r = registry.addr.clone();
    let edges: Vec<_> = real.iter().map(|id| f.edge(id, &r, &[])).collect();
    let nodes: Vec<String> = edges.iter().map(|e| e.addr.clone()).collect();
    let (_sim_runtime, told) = simulate(&f, &format!("registry-1@{r}"), &sims, 1000);
    let a = support::client();
    let everyone: Vec<String> = sims.iter().cloned().chain(real.iter().map(|s| s.to_string())).collect();

    // Four waves of mlp v1 -> v2 (10%, 25%, 50%, 100% of 40 nodes: 4, 10, 20, 40), 2 s each.
    f.cli(&r, &["model", "push", "mlp", &model("mlp")]);
    f.cli(&r, &["deploy", "mlp", "--to", "edge"]);
    f.cli(&r, &["model", "push", "mlp", &model("mlp_alt")]);
    for n in &nodes {
        wait_for(&format!("{n} on v1"), Duration::from_secs(60), || {
            infer_model(&a, n, "mlp", &support::body_for("mlp")).0 == 200
        });
    }
    wait_for("40 nodes known", Duration::from_secs(60), || {
        f.cli(&r, &["nodes", "--limit", "0"]).as_array().map(|n| n.len()) == Some(40)
    });
    let load = Load::start(&nodes, 1);
    // Without automatic abort here: two alike versions on two shared cores, judged by p99.
    let started =
        f.cli(&r, &["rollout", "waves", "mlp", "2", "--steps", "10%,25%,50%,100%", "--every", "2s", "--no-auto-abort"]);
    assert_eq!(started["rollout"]["waves"]["phase"], "running", "{started}");
    let mut seen: Vec<u64> = Vec::new();
    wait_for("the waves to complete", Duration::from_secs(120), || {
        let status = f.cli(&r, &["rollout", "status", "mlp"]);
        let waves = &status["rollout"]["waves"];
        if let Some(moved) = status["waves"]["moved"].as_u64() {
            if seen.last() != Some(&moved) {
                seen.push(moved);
                // The simulated nodes told the new version are exactly those under the cutoff.
                let cutoff = waves["cutoffs"].as_array().and_then(|c| c.last()).and_then(Value::as_u64).unwrap_or(0);
                let want = |id: &str| cutoff == u64::MAX || position("mlp", id) < cutoff;
                wait_for("the simulated nodes told their wave", Duration::from_secs(30), || {
                    let told = told.lock().expect("told");
                    sims.iter().all(|id| told.get(id).is_some_and(|(d, _)| routes_to(d, "mlp", 2) == want(id)))
                });
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        waves["phase"] == "completed"
    });
    assert_eq!(seen, [4, 10, 20, 40], "the waves moved these many nodes, in this order");
    let status = f.cli(&r, &["rollout", "status", "mlp"]);
    assert_eq!(status["rollout"]["stable"], 2);
    let lines = history(&status);
    let waves: Vec<&String> = lines.iter().filter(|l| l.starts_with("wave ") || l.starts_with("waves ")).collect();
    assert!(
        waves.len() >= 5
            && waves[waves.len() - 4].starts_with("wave 2 of 4")
            && waves[waves.len() - 3].starts_with("wave 3 of 4")
            && waves[waves.len() - 2].starts_with("wave 4 of 4")
            && waves[waves.len() - 1].starts_with("waves completed"),
        "{lines:?}"
    );
    let since = Instant::now();
    wait_for("every real edge on v2", Duration::from_secs(60), || load.all_answered_with(nodes.len(), since, "2"));
    let samples = load.stop();
    assert!(samples.iter().all(|s| s.status == 200), "a request failed during the waves");
    assert!(told.lock().expect("told").values().all(|(d, _)| routes_to(d, "mlp", 2) && !routes_to(d, "mlp", 1)));

    // A slower CNN (20x the work) in waves whose first wave holds no real node and whose second holds
    // one: wave 1 passes (no traffic to judge), wave 2's real node is slower, and the waves stop there.
    let name = ["cnn", "cnn-b", "cnn-c", "cnn-d"]
        .into_iter()
        .find(|name| {
            let mut order: Vec<&String> = everyone.iter().collect();
            order.sort_by_key(|id| position(name, id));
            order.iter().position(|id| id.starts_with("edge-")).is_some_and(|r| (2..30).contains(&r))
        })
        .expect("a model name whose order starts with simulated nodes");
    let mut order: Vec<&String> = everyone.iter().collect();
    order.sort_by_key(|id| position(name, id));
    let first_real = order.iter().position(|id| id.starts_with("edge-")).expect("a real node");
    // Shares of 40 nodes: wave 1 moves `first_real` nodes or fewer (rounded up), wave 2 one more.
    let s1 = (first_real * 100 / 40).max(1);
    let s2 = ((first_real + 1) * 100).div_ceil(40);
    assert!((40 * s1).div_ceil(100) <= first_real && s2 > s1 && s2 < 100, "{first_real}: {s1} {s2}");
    f.cli(&r, &["model", "push", name, &model("cnn")]);
    f.cli(&r, &["deploy", name, "--to", "edge"]);
    f.cli(&r, &["model", "push", name, &model("cnn_slow")]);
    let body = support::body_for("cnn");
    for n in &nodes {
        wait_for(&format!("{n} serving {name} v1"), Duration::from_secs(60), || {
            infer_model(&a, n, name, &body).0 == 200
        });
    }
    let load = Load::start_model(&nodes, 2, name);
    let steps = format!("{s1}%,{s2}%,100%");
    f.cli(&r, &["rollout", "waves", name, "2", "--steps", &steps, "--every", "12s"]);
    let aborted = wait_for("the waves aborted", Duration::from_secs(120), || {
        std::thread::sleep(Duration::from_millis(300));
        let st = f.cli(&r, &["rollout", "status", name]);
        if std::env::var_os("WAVES_DEBUG").is_some() {
            eprintln!("DEBUG {} {} {}", st["waves"], st["analysis"], st["summary"]["routes"]);
        }
        st["rollout"]["waves"]["phase"] == "aborted"
    });
    let _ = aborted;
    let status = f.cli(&r, &["rollout", "status", name]);
    let outcome = status["rollout"]["waves"]["outcome"].as_str().unwrap_or_default().to_string();
    assert!(outcome.starts_with("wave 2 of 3") && outcome.contains("p99"), "{outcome}");
    assert_eq!(status["rollout"]["stable"], 1, "{status}");
    // Every moved node back on v1: the simulated ones told so, the real one answering from it.
    wait_for("the simulated nodes back on v1", Duration::from_secs(30), || {
        let told = told.lock().expect("told");
        sims.iter().all(|id| told.get(id).is_some_and(|(d, _)| !routes_to(d, name, 2)))
    });
    let back = Instant::now();
    wait_for("every real edge answering from v1", Duration::from_secs(30), || {
        load.all_answered_with(nodes.len(), back, "1")
    });
    let samples = load.stop();
    assert!(samples.iter().all(|s| s.status == 200), "a request failed during the aborted waves");
    let at = |what: &str| {
        status["rollout"]["history"]
            .as_array()
            .into_iter()
            .flatten()
            .rev()
            .find(|e| e["what"].as_str().is_some_and(|w| w.starts_with(what)))
            .and_then(|e| e["at_ms"].as_u64())
    };
    if let (Some(wave2), Some(abort)) = (at("wave 2 of 3"), at("waves aborted")) {
        support::figure(
            "wave 2 started -> aborted (slower version on its real node)",
            &format!("{} ms", abort - wave2),
        );
    }
}
