//! Offload across an emulated WAN link (the test kit's UDP relay between a real edge and a real hub,
//! QUIC with mutual TLS crossing it unchanged): requests cross the link's delay, survive loss, and
//! while the link is cut every request is still answered (served here, or refused with a precise
//! error) within its deadline; once restored, the edge offloads again. An idle connection across a
//! 150 ms, lossy link holds on its keep-alives, and serves when work comes.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edge_node::offload::{HubEndpoint, OffloadConfig, Offloader};
use fabric_node::dispatch::Overflow;
use fabric_proto::tls::TlsFiles;
use fabric_testkit::http::binary_body;
use fabric_testkit::link::{Direction, Link};
use fabric_testkit::process::temp_dir;
use fabric_testkit::wait::wait_for;
use support::{certs, client, get, post, start_edge_with_args, start_hub};

const MS: Duration = Duration::from_millis(1);

/// Deadline of every request here.
const DEADLINE_MS: u64 = 3000;

/// One request: status, who served it, how long it took.
fn infer(url: &str) -> (u16, String, Duration) {
    let (body, n) = binary_body(&[1, 3, 64, 64], 23, None);
    let start = Instant::now();
    let reply = post(&client(), url, &body, Some(n));
    let served_by = if reply.status == 200 {
        reply.json()["parameters"]["served_by"].as_str().unwrap_or_default().to_string()
    } else {
        String::from_utf8_lossy(&reply.body).into_owned()
    };
    (reply.status, served_by, start.elapsed())
}

#[test]
fn offload_crosses_a_wan_link_survives_loss_and_a_cut() {
    let dir = temp_dir("wan");
    let certs = certs(&dir);
    let hub = start_hub(&dir, &certs);
    let hub_addr: SocketAddr = hub.quic.parse().expect("the hub's QUIC address");
    // 20 ms each way, 50 Mbit/s: a 40 ms round trip.
    let wan = Direction::wan(20 * MS, 50.0, 0.0);
    let link = Link::start(hub_addr, wan, wan, 23).expect("link");
    let args =
        vec!["--hub".to_string(), format!("hub-1@{}", link.addr()), "--certs".into(), certs.display().to_string()];
    let edge = start_edge_with_args(
        &[("cnn", &format!("max_batch_size = 8\ndefault_timeout_ms = {DEADLINE_MS}\n"))],
        "[offload]\nmode = \"always\"\n",
        &args,
    );
    let url = format!("{}/v2/models/cnn/infer", edge.url);
    wait_for("the edge to offload across the link", Duration::from_secs(30), || infer(&url).1.starts_with("hub"));
    // Across the link: every offloaded answer took at least the round trip.
    for i in 0..10 {
        let (status, by, took) = infer(&url);
        assert_eq!(status, 200, "request {i}: {by}");
        if by.starts_with("hub") {
            assert!(took >= 40 * MS, "request {i} crossed a 40 ms round trip in {took:?}");
        }
    }
    // The edge measured the link: its round trip (at least the 40 ms the relay holds datagrams) and
    // its uplink rate (a 49 KB request spends about 8 ms on a 50 Mbit/s wire).
    let metrics = String::from_utf8_lossy(&get(&client(), &format!("{}/metrics", edge.url)).body).into_owned();
    let gauge = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{hub=\"hub-1\"}}")))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let rtt = gauge("fabric_hub_rtt_seconds").expect("the round trip in the edge's metrics");
    assert!(rtt >= 0.040, "a 40 ms round trip measured as {rtt} s");
    let rate = gauge("fabric_hub_uplink_bytes_per_second").expect("the uplink rate in the edge's metrics");
    assert!(rate > 0.0, "uplink rate {rate}");
    // 2% loss each way: QUIC retransmits; every request is answered.
    let lossy = Direction::wan(20 * MS, 50.0, 0.02);
    link.set(lossy, lossy);
    let mut by_hub = 0;
    for i in 0..40 {
        let (status, by, _) = infer(&url);
        assert_eq!(status, 200, "request {i} on a lossy link: {by}");
        by_hub += usize::from(by.starts_with("hub"));
    }
    let stats = link.stats();
    assert!(stats.up.lost + stats.down.lost > 0, "a 2% loss link lost nothing: {stats:?}");
    assert!(by_hub > 0, "nothing was offloaded across the lossy link");
    // Cut: each request is answered, served here or refused precisely, within its deadline (with a
    // second for the machine); none hangs.
    link.cut(true);
    let mut during = Vec::new();
    for i in 0..10 {
        let (status, by, took) = infer(&url);
        during.push((status, took));
        assert!(status == 200 || status == 503, "request {i} during the cut: {status} {by}");
        if status == 200 {
            assert_eq!(by, "edge-node", "request {i} was answered by a hub across a cut link");
        }
        assert!(took < Duration::from_millis(DEADLINE_MS + 1000), "request {i} took {took:?} during the cut");
    }
    assert!(link.stats().up.cut > 0, "the edge sent nothing during the cut");
    // Restored: the edge finds the hub again.
    link.cut(false);
    let back = wait_for("the edge to offload again after the cut", Duration::from_secs(60), || {
        infer(&url).1.starts_with("hub")
    });
    eprintln!("clean link: rtt {rtt} s, uplink {rate:.0} B/s; lossy link: {by_hub} of 40 offloaded; during the cut: {during:?}; offloading again {back:?} after the restore; {:?}", link.stats());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_across_150_ms_and_loss_holds_and_serves_after() {
    let dir = temp_dir("wan-idle");
    let certs = certs(&dir);
    let hub = start_hub(&dir, &certs);
    let hub_addr: SocketAddr = hub.quic.parse().expect("the hub's QUIC address");
    // 75 ms each way (a 150 ms round trip), 10 Mbit/s, 2% loss each way.
    let wan = Direction::wan(75 * MS, 10.0, 0.02);
    let link = Link::start(hub_addr, wan, wan, 29).expect("link");
    // An idle timeout of 10 round trips, a keep-alive every 2: tighter than the defaults (1 s and 5 s).
    let config = OffloadConfig {
        hubs: vec![HubEndpoint { addr: link.addr().to_string(), server_name: Some("hub-1".into()) }],
        tls: Some(TlsFiles::in_dir(&certs, "edge-1")),
        keep_alive_ms: 300,
        idle_timeout_ms: 1500,
        ..OffloadConfig::default()
    };
    let offload = Offloader::start(&config, false, None).expect("offloader").expect("a hub is configured");
    let until = Instant::now() + Duration::from_secs(30);
    while offload.connected() == 0 {
        assert!(Instant::now() < until, "never connected across the link");
        tokio::time::sleep(20 * MS).await;
    }
    let attempts = offload.connect_attempts();
    // Idle for four idle timeouts: nothing to wait on but the absence of a reconnect.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(offload.connect_attempts(), attempts, "the idle connection was dropped and dialled again");
    assert_eq!(offload.connected(), 1, "the idle connection did not hold");
    let inputs = vec![fabric_types::NamedTensor::new(
        "input",
        fabric_types::Tensor::from_vec(vec![1, 3, 64, 64], vec![0.5f32; 3 * 64 * 64]).expect("tensor"),
    )];
    let answered = offload.infer("cnn", Some(1), &inputs, Instant::now() + Duration::from_secs(3)).await;
    let served = answered.expect("offloaded after the idle spell");
    assert_eq!(served.served_by, "hub hub-1");
    assert_eq!(offload.connect_attempts(), attempts, "a request after idle needed a new connection");
    eprintln!("idle link: {:?}", link.stats());
    let _ = std::fs::remove_dir_all(&dir);
}
