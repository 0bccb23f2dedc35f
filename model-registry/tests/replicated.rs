//! A replicated registry: three `model-registry` replicas on a real 3-member etcd cluster on
//! loopback, real edge nodes under load that know every replica. The leader is killed (SIGKILL)
//! mid-rollout: a new one is elected, nothing acknowledged is lost, the rollout goes on there, no
//! request fails at the nodes. Then etcd loses its quorum: changes are refused with an error that
//! says so, reads answer, nodes serve on, and everything resumes when quorum returns. Last, a
//! rollout in waves whose leader is killed in its first wave completes on the next leader.

mod support;

use std::time::{Duration, Instant};

use fabric_testkit::etcd::EtcdCluster;
use fabric_testkit::process::Proc;
use serde_json::{json, Value};
use support::{client, model, wait_for, Fabric, Load, Sample};

/// Which replica printed that it leads (the latest to), if one does now.
fn leader(replicas: &[Option<Proc>]) -> Option<usize> {
    replicas
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().map(|r| (i, r)))
        .filter(|(_, r)| r.printed("model-registry leader ") > r.printed("model-registry follower "))
        .map(|(i, _)| i)
        .next()
}

/// Waits (60 s at most) until `nodes` nodes route `mlp` by `want`; on timeout the panic shows the
/// last `rollout status` and `nodes` seen (what each node reported, which replica answered).
fn wait_routes(f: &Fabric, registry: &str, nodes: usize, want: &Value, what: &str) {
    let mut last = Value::Null;
    let routed = |last: &mut Value| {
        let status = f.cli(registry, &["rollout", "status", "mlp"]);
        let listed = status["nodes"].as_array().cloned().unwrap_or_default();
        *last = status;
        listed.len() == nodes && listed.iter().all(|n| &n["policy"]["weights"] == want)
    };
    let until = Instant::now() + Duration::from_secs(60);
    while !routed(&mut last) {
        if Instant::now() > until {
            let seen = f.cli(registry, &["nodes"]);
            panic!("timed out after 60 s waiting for {what}: last rollout status {last}; nodes {seen}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (120 s at most) until the rollout in waves of `mlp` reaches `phase`; its status then.
fn wait_for_waves(f: &Fabric, registry: &str, phase: &str) -> Value {
    let mut status = Value::Null;
    wait_for(&format!("the waves {phase}"), Duration::from_secs(120), || {
        std::thread::sleep(Duration::from_millis(300));
        let out = f.cli_as(registry, "operator", &["rollout", "status", "mlp", "--output", "json"]);
        status = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        status["rollout"]["waves"]["phase"] == phase
    });
    status
}

fn failed(samples: &[Sample]) -> Vec<String> {
    samples.iter().filter(|s| s.status != 200).map(|s| format!("{} {}", s.status, s.version)).take(5).collect()
}

#[test]
fn a_replicated_registry_survives_its_leader_and_etcd_losing_quorum() {
    let Some(mut etcd) = EtcdCluster::start(3) else { return };
    let f = Fabric::new("replicated");
    let store = etcd.store_arg();
    let mut replicas: Vec<Option<Proc>> = (1..=3).map(|n| Some(f.replica(n, &store))).collect();
    let all: String = replicas.iter().flatten().map(|r| r.addr.clone()).collect::<Vec<_>>().join(",");
    wait_for("a leader", Duration::from_secs(30), || leader(&replicas).is_some());

    // Nodes and the CLI know every replica; the CLI's commands reach the leader from any of them.
    let e1 = f.edge("edge-1", &all, &[]);
    let e2 = f.edge("edge-2", &all, &[]);
    let nodes = vec![e1.addr.clone(), e2.addr.clone()];
    f.cli(&all, &["model", "push", "mlp", &model("mlp")]);
    f.cli(&all, &["deploy", "mlp", "--to", "edge"]);
    wait_routes(&f, &all, 2, &json!({ "1": 100 }), "both edges on v1");
    // A follower answers reads from its watch-fed state.
    let follower = (0..3).find(|i| Some(*i) != leader(&replicas)).expect("a follower");
    let at_follower = replicas[follower].as_ref().expect("running").addr.clone();
    let listed = f.cli(&at_follower, &["model", "list"]);
    assert_eq!(listed.as_array().map(|a| a.len()), Some(1), "{listed}");

    // A canary acknowledged, then the leader dies; digits is pushed through it too, deployed later.
    f.cli(&all, &["model", "push", "mlp", &model("mlp_alt")]);
    f.cli(&all, &["model", "push", "digits", &model("digits")]);
    let acked = f.cli(&all, &["rollout", "canary", "mlp", "2", "--weight", "50"]);
    let load = Load::start(&nodes, 2);
    let old = leader(&replicas).expect("leader");
    replicas[old] = None; // SIGKILL
    let killed = Instant::now();
    wait_for("a new leader", Duration::from_secs(30), || leader(&replicas).is_some_and(|l| l != old));
    let elected = killed.elapsed();
    support::figure("new leader after kill -9 of the leader (3 s lease)", &format!("{} ms", elected.as_millis()));
    let status = f.cli(&all, &["rollout", "status", "mlp"]);
    assert_eq!(status["rollout"], acked["rollout"], "the new leader lost or changed an acknowledged state");
    wait_routes(&f, &all, 2, &json!({ "1": 50, "2": 50 }), "both edges back with the new leader");
    support::figure(
        "both edges reporting to the new leader after the kill",
        &format!("{} ms", killed.elapsed().as_millis()),
    );
    // A version pushed through the dead leader is served by the others (the shared blob folder).
    f.cli(&all, &["deploy", "digits", "--to", "edge"]);
    let a = client();
    for n in &nodes {
        wait_for("digits, pushed through the dead leader, on both edges", Duration::from_secs(60), || {
            fabric_testkit::http::get(&a, &format!("{n}/v2/models/digits/ready")).status == 200
        });
    }
    // The rollout goes on at the new leader: promoted, every node converges.
    f.cli(&all, &["rollout", "promote", "mlp"]);
    let promoted = Instant::now();
    wait_for("every node answering from v2", Duration::from_secs(60), || load.all_answered_with(2, promoted, "2"));

    // etcd loses one member: the registry goes on.
    etcd.kill(2);
    f.cli(&all, &["rollout", "canary", "mlp", "1", "--weight", "10"]);
    // etcd loses its quorum: changes are refused, saying so; reads answer; nodes serve on.
    etcd.kill(1);
    let mut said = String::new();
    let limit = Instant::now() + Duration::from_secs(60);
    loop {
        let out = f.cli_as(&all, "operator", &["rollout", "promote", "mlp"]);
        said = format!("{said}\n---\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() && said.contains("quorum") {
            break;
        }
        assert!(Instant::now() < limit, "no change was refused for want of quorum; the CLI said: {said}");
    }
    let listed = f.cli(&at_follower, &["model", "list"]);
    assert_eq!(listed.as_array().map(|a| a.len()), Some(3), "reads stopped without quorum: {listed}");
    let before = load.count();
    wait_for("nodes serving without quorum", Duration::from_secs(60), || load.count() >= before + 200);
    // Quorum back: a leader again, and changes go through.
    etcd.restart(1);
    etcd.restart(2);
    etcd.wait_all_healthy();
    let back = Instant::now();
    wait_for("changes accepted again", Duration::from_secs(60), || {
        f.cli_as(&all, "operator", &["rollout", "promote", "mlp"]).status.success()
    });
    support::figure(
        "changes accepted again after etcd's quorum returned",
        &format!("{} ms", back.elapsed().as_millis()),
    );
    let promoted = Instant::now();
    wait_for("every node answering from v1", Duration::from_secs(60), || load.all_answered_with(2, promoted, "1"));

    // A rollout in waves, its leader killed in the first wave: the new leader carries it through.
    wait_for("a leader again", Duration::from_secs(30), || leader(&replicas).is_some());
    let started =
        f.cli(&all, &["rollout", "waves", "mlp", "2", "--steps", "50%,100%", "--every", "3s", "--no-auto-abort"]);
    assert_eq!(started["rollout"]["waves"]["phase"], "running", "{started}");
    let old = leader(&replicas).expect("leader");
    replicas[old] = None; // SIGKILL
    wait_for("a new leader", Duration::from_secs(30), || leader(&replicas).is_some());
    let status = wait_for_waves(&f, &all, "completed");
    assert_eq!(status["rollout"]["stable"], 2, "{status}");
    let done = Instant::now();
    wait_for("every node answering from v2", Duration::from_secs(60), || load.all_answered_with(2, done, "2"));
    let samples = load.stop();
    assert!(samples.len() > 500, "only {} answers", samples.len());
    assert!(failed(&samples).is_empty(), "requests failed at the nodes: {:?}", failed(&samples));
}
