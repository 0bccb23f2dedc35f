//! The failover benchmark (ignored by `cargo test`; `scripts/bench/failover.sh` runs it in release):
//! a 3-member etcd cluster and three registry replicas on loopback, two real edge nodes under
//! closed-loop load and 1,000 simulated nodes (`FAILOVER_SIMS`) connected, all knowing every
//! replica. Mid-rollout (a canary acknowledged) the leader is killed with SIGKILL; measured: the new
//! leader, every node reporting to it, the acknowledged canary kept, its promotion reaching every
//! node, and the requests that failed at the nodes. Then the same with the canary's automatic
//! rollback (a slower version) carried out by the new leader.

mod support;

use std::time::{Duration, Instant};

use fabric_testkit::etcd::EtcdCluster;
use fabric_testkit::process::Proc;
use serde_json::Value;
use support::{figure, infer_model, model, simulate, wait_for, Fabric, Load};

fn leader(replicas: &[Option<Proc>]) -> Option<usize> {
    replicas.iter().enumerate().find_map(|(i, r)| {
        r.as_ref().filter(|r| r.printed("model-registry leader ") > r.printed("model-registry follower ")).map(|_| i)
    })
}

fn routes(desired: &fabric_proto::registry::DesiredState, model: &str) -> Vec<u64> {
    desired
        .models
        .iter()
        .filter(|m| m.name == model)
        .filter_map(|m| m.policy.as_ref())
        .flat_map(|p| p.weights.iter().filter(|(_, w)| **w > 0).map(|(v, _)| *v))
        .collect()
}

#[test]
#[ignore = "a benchmark: scripts/bench/failover.sh"]
fn failover_with_a_fleet_connected() {
    let Some(etcd) = EtcdCluster::start(3) else { return };
    let count: usize = std::env::var("FAILOVER_SIMS").ok().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let sims: Vec<String> = (0..count).map(|i| format!("sim-{i:04}")).collect();
    let f = Fabric::with_edges("failover", &sims);
    let mut replicas: Vec<Option<Proc>> = (1..=3).map(|n| Some(f.replica(n, &etcd.store_arg()))).collect();
    let all: String = replicas.iter().flatten().map(|r| r.addr.clone()).collect::<Vec<_>>().join(",");
    wait_for("a leader", Duration::from_secs(30), || leader(&replicas).is_some());
    let edges = [f.edge("edge-1", &all, &[]), f.edge("edge-2", &all, &[])];
    let nodes: Vec<String> = edges.iter().map(|e| e.addr.clone()).collect();
    f.cli(&all, &["model", "push", "mlp", &model("mlp")]);
    f.cli(&all, &["deploy", "mlp", "--to", "edge"]);
    let (_runtime, told) = simulate(&f, &all, &sims, 3000);
    let a = support::client();
    for n in &nodes {
        wait_for("edges on v1", Duration::from_secs(60), || {
            infer_model(&a, n, "mlp", &support::body_for("mlp")).0 == 200
        });
    }
    let connected = Instant::now();
    wait_for("every simulated node told v1", Duration::from_secs(300), || {
        told.lock().expect("told").values().filter(|(d, _)| routes(d, "mlp") == [1]).count() == count
    });
    figure(
        "simulated nodes connected (from cold, one process)",
        &format!("{count} in {} ms", connected.elapsed().as_millis()),
    );
    f.cli(&all, &["model", "push", "mlp", &model("mlp_alt")]);
    let load = Load::start(&nodes, 2);
    let acked = f.cli(&all, &["rollout", "canary", "mlp", "2", "--weight", "50"]);
    wait_for("the canary on every node", Duration::from_secs(120), || {
        told.lock().expect("told").values().filter(|(d, _)| routes(d, "mlp") == [1, 2]).count() == count
    });

    // SIGKILL the leader mid-rollout.
    let old = leader(&replicas).expect("leader");
    replicas[old] = None;
    let killed = Instant::now();
    wait_for("a new leader", Duration::from_secs(30), || leader(&replicas).is_some());
    let elected = killed.elapsed();
    figure("new leader after kill -9 of the leader", &format!("{} ms (lease 3 s)", elected.as_millis()));
    let mut answered = 0;
    let limit = Instant::now() + Duration::from_secs(120);
    while answered < count {
        answered = told.lock().expect("told").values().filter(|(_, at)| *at > killed + elected).count();
        assert!(Instant::now() < limit, "{answered} of {count} simulated nodes answered by the new leader in 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    figure(
        "every simulated node answered by the new leader",
        &format!("{} ms after the kill (idle nodes held 3 s)", killed.elapsed().as_millis()),
    );
    // The CLI polls the replicas alive (a dead one first in the list costs each call its 2 s connect).
    let alive: String = replicas.iter().flatten().map(|r| r.addr.clone()).collect::<Vec<_>>().join(",");
    let status = f.cli(&alive, &["rollout", "status", "mlp"]);
    assert_eq!(status["rollout"], acked["rollout"], "the new leader lost the acknowledged canary");
    wait_for("both real edges reporting to the new leader", Duration::from_secs(120), || {
        f.cli(&alive, &["nodes", "--role", "edge", "--state", "up", "--limit", "0"]).as_array().is_some_and(|n| {
            n.iter().filter(|n| n["node"].as_str().is_some_and(|id| id.starts_with("edge-"))).count() == 2
        })
    });
    figure("both real edges up at the new leader", &format!("{} ms after the kill", killed.elapsed().as_millis()));

    // The rollout completes on the new leader.
    f.cli(&alive, &["rollout", "promote", "mlp"]);
    let promoted = Instant::now();
    wait_for("v2 on every node", Duration::from_secs(120), || {
        told.lock().expect("told").values().filter(|(d, _)| routes(d, "mlp") == [2]).count() == count
            && load.all_answered_with(2, promoted, "2")
    });
    figure("promote on the new leader -> every node on v2", &format!("{} ms", promoted.elapsed().as_millis()));
    let samples = load.stop();
    let failed = samples.iter().filter(|s| s.status != 200).count();
    figure("requests at the real edges through the failover", &format!("{} answered, {failed} failed", samples.len()));
    assert_eq!(failed, 0);

    // An automatic rollback carried out by the next leader: a slower CNN canary, the leader killed
    // as the canary starts.
    f.cli(&all, &["model", "push", "cnn", &model("cnn")]);
    f.cli(&all, &["deploy", "cnn", "--to", "edge"]);
    let body = support::body_for("cnn");
    for n in &nodes {
        wait_for("edges on cnn v1", Duration::from_secs(60), || infer_model(&a, n, "cnn", &body).0 == 200);
    }
    f.cli(&all, &["model", "push", "cnn", &model("cnn_slow")]);
    let load = Load::start_model(&nodes, 2, "cnn");
    f.cli(&all, &["rollout", "canary", "cnn", "2", "--weight", "50", "--auto-rollback"]);
    let old = leader(&replicas).expect("leader");
    replicas[old] = None;
    let killed = Instant::now();
    let alive: String = replicas.iter().flatten().map(|r| r.addr.clone()).collect::<Vec<_>>().join(",");
    let mut status = Value::Null;
    wait_for("the automatic rollback on the new leader", Duration::from_secs(120), || {
        std::thread::sleep(Duration::from_millis(300));
        let out = f.cli_as(&alive, "operator", &["rollout", "status", "cnn", "--output", "json"]);
        status = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        !status["rollout"]["auto_rolled_back"].is_null()
    });
    figure(
        "automatic rollback of a slower canary by the next leader",
        &format!("{} ms after the kill ({})", killed.elapsed().as_millis(), status["rollout"]["auto_rolled_back"]),
    );
    let samples = load.stop();
    let failed = samples.iter().filter(|s| s.status != 200).count();
    figure(
        "requests at the real edges through the second failover",
        &format!("{} answered, {failed} failed", samples.len()),
    );
    assert_eq!(failed, 0);
}
