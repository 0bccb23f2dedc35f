//! The edge's links to hubs, with the real cloud-hub binary on loopback: a hub that said busy is used
//! again once it has room, `offload.mode = "always"`, a hub that refuses this edge's certificate after
//! the handshake is retried with backoff (never faster than the reconnect policy allows), and a fabric peer that is not a hub is
//! never used.

mod support;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use edge_node::offload::{HubEndpoint, OffloadConfig, Offloader};
use fabric_node::dispatch::Overflow;
use fabric_policy::reconnect::most_attempts_within;
use fabric_proto::tls::{self, NodeCert, Role, TlsFiles};
use fabric_testkit::http::binary_body;
use fabric_testkit::process::temp_dir;
use support::{certs, client, post, start_edge_with_args, start_hub, start_hub_at, start_hub_with};

/// Each test starts a hub (ONNX Runtime) and loads the machine a little: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A binary CNN request of `rows` rows and its header length.
fn body(rows: usize) -> (Vec<u8>, usize) {
    binary_body(&[rows, 3, 64, 64], 23, None)
}

/// Who served a request (`edge-node` or `hub <id>`), after checking it succeeded.
fn served_by(url: &str, (body, n): &(Vec<u8>, usize)) -> String {
    let reply = post(&client(), url, body, Some(*n));
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    reply.json()["parameters"]["served_by"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_hub_that_said_busy_is_used_again_and_mode_always_sends_everything_there() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = temp_dir("busy");
    let certs = certs(&dir);
    // One request at a time on the hub: a burst makes it answer busy.
    let hub = start_hub_with(&dir, &certs, "hub-1", "[quic]\nmax_in_flight = 1\n");
    let args = vec!["--hub".to_string(), format!("hub-1@{}", hub.quic), "--certs".into(), certs.display().to_string()];
    let edge = start_edge_with_args(
        &[("cnn", "max_batch_size = 8\ndefault_timeout_ms = 20000\n")],
        "[offload]\nmode = \"always\"\n",
        &args,
    );
    let url = format!("{}/v2/models/cnn/infer", edge.url);
    let big = body(8);
    // Wait for the link (bounded), then burst.
    let up = Instant::now() + Duration::from_secs(20);
    while !served_by(&url, &big).starts_with("hub") {
        assert!(Instant::now() < up, "the edge never offloaded in mode always");
    }
    let burst: Vec<_> = (0..16)
        .map(|_| {
            let (url, big) = (url.clone(), big.clone());
            std::thread::spawn(move || served_by(&url, &big))
        })
        .collect();
    let served: Vec<String> = burst.into_iter().map(|h| h.join().expect("thread")).collect();
    let local = served.iter().filter(|s| *s == "edge-node").count();
    eprintln!("burst: {local} of 16 served locally after busy answers");
    assert!(local > 0, "the hub never said busy: the burst proved nothing ({served:?})");
    // Idle again: within 2 s (a short rest, then its load reports say it has room) it serves again.
    let again = Instant::now();
    let small = body(1);
    loop {
        if served_by(&url, &small).starts_with("hub") {
            break;
        }
        assert!(again.elapsed() < Duration::from_secs(2), "the edge stopped offloading to a hub that had said busy");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Mode always: with the hub idle, every request goes there.
    for i in 0..10 {
        assert!(served_by(&url, &small).starts_with("hub"), "request {i} was not offloaded in mode always");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The most connection attempts the reconnect policy allows a failing link in `elapsed`, with the
/// offloader's default delays.
fn policy_bound(elapsed: Duration) -> u32 {
    let config = OffloadConfig::default();
    most_attempts_within(
        Duration::from_millis(config.reconnect_min_ms),
        Duration::from_millis(config.reconnect_max_ms),
        elapsed,
    )
}

fn offloader(hub: &str, name: &str, files: TlsFiles) -> std::sync::Arc<Offloader> {
    let config = OffloadConfig {
        hubs: vec![HubEndpoint { addr: hub.to_string(), server_name: Some(name.into()) }],
        tls: Some(files),
        ..OffloadConfig::default()
    };
    Offloader::start(&config, false, None).expect("offloader").expect("a hub is configured")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_refusing_our_certificate_after_connect_is_retried_with_backoff() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = temp_dir("foreign");
    let certs = certs(&dir);
    let hub = start_hub(&dir, &certs);
    // This edge trusts the fabric CA (so its connect() succeeds under TLS 1.3), but presents a
    // certificate from another CA, which the hub refuses only after the handshake.
    let foreign = dir.join("foreign");
    tls::generate_dev_pki(&foreign, &[("edge-1".into(), Role::Edge)]).expect("pki");
    let files = TlsFiles { ca: certs.join("ca.pem"), ..TlsFiles::in_dir(&foreign, "edge-1") };
    let started = Instant::now();
    let offload = offloader(&hub.quic, "hub-1", files);
    // Retried (twice, bounded wait), never offered meanwhile, and no faster than the reconnect policy
    // allows (its delays are table-tested in fabric-policy; here the real link keeps to them).
    let until = started + Duration::from_secs(30);
    while offload.connect_attempts() < 3 {
        assert!(Instant::now() < until, "not retried twice within 30 s ({})", offload.connect_attempts());
        assert!(offload.view(1000).is_none(), "a hub that refuses us is not offered for offload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let attempts = offload.connect_attempts();
    let allowed = policy_bound(started.elapsed());
    assert!(attempts as u32 <= allowed, "reconnect hot loop: {attempts} attempts, the policy allows {allowed}");
    assert!(offload.view(1000).is_none(), "a hub that refuses us is not offered for offload");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fabric_peer_that_is_not_a_hub_is_never_used() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = temp_dir("role");
    let certs = certs(&dir);
    // A real cloud-hub process, but its certificate (same fabric CA) says role "edge".
    tls::generate_dev_pki(&certs, &[("edge-2".into(), Role::Edge)]).expect("pki");
    let impostor = start_hub_with(&dir, &certs, "edge-2", "");
    let started = Instant::now();
    let offload = offloader(&impostor.quic, "edge-2", TlsFiles::in_dir(&certs, "edge-1"));
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(offload.connected(), 0, "connected to a peer whose role is not hub");
        assert!(offload.view(1000).is_none());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let attempts = offload.connect_attempts();
    let allowed = policy_bound(started.elapsed());
    assert!((1..=u64::from(allowed)).contains(&attempts), "{attempts} attempts; the reconnect policy allows {allowed}");
    let inputs = vec![fabric_types::NamedTensor::new(
        "input",
        fabric_types::Tensor::from_vec(vec![1, 3, 64, 64], vec![0.5f32; 3 * 64 * 64]).expect("tensor"),
    )];
    let deadline = Instant::now() + Duration::from_secs(1);
    let err = match offload.infer("cnn", Some(1), &inputs, deadline).await {
        Ok(_) => panic!("served by a peer that is not a hub"),
        Err(e) => e.to_string(),
    };
    assert_eq!(err, "offload failed: no hub connected");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits (bounded) until the offloader has a connected hub; returns whether it did.
async fn connects_within(offload: &Offloader, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if offload.connected() > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_are_reached_by_dns_name_or_ipv6_and_must_carry_the_name_asked_for() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = temp_dir("names");
    let certs = dir.join("certs");
    let nodes = [
        NodeCert { id: "hub-1".into(), role: Role::Hub, names: vec!["localhost".into()] },
        NodeCert { id: "edge-1".into(), role: Role::Edge, names: vec![] },
    ];
    tls::generate_dev_pki_with_names(&certs, &nodes).expect("pki");
    let hub = start_hub(&dir, &certs);
    let port = hub.quic.rsplit_once(':').expect("port").1.to_string();
    let edge_files = || TlsFiles::in_dir(&certs, "edge-1");
    // A DNS name, resolved at connect; the certificate carries it, so no name needs giving.
    let by_dns = offloader_for(HubEndpoint::parse(&format!("localhost:{port}")).expect("addr"), edge_files());
    assert!(connects_within(&by_dns, Duration::from_secs(20)).await, "did not reach the hub by DNS name");
    // An IP the certificate does not carry: refused by TLS, never used (names are checked, not just roles).
    let by_ip = offloader_for(HubEndpoint::parse(&format!("127.0.0.1:{port}")).expect("addr"), edge_files());
    assert!(
        !connects_within(&by_ip, Duration::from_millis(1500)).await,
        "connected to a hub under a name its certificate lacks"
    );
    // The node id always works, given as name@address.
    let by_id = offloader_for(HubEndpoint::parse(&format!("hub-1@127.0.0.1:{port}")).expect("addr"), edge_files());
    assert!(connects_within(&by_id, Duration::from_secs(20)).await, "did not reach the hub by its node id");
    drop(hub);
    // IPv6, where the machine has it.
    if std::net::UdpSocket::bind("[::1]:0").is_ok() {
        let hub6 = start_hub_at(&dir, &certs, "hub-1", "", "[::1]:0");
        assert!(hub6.quic.starts_with("[::1]:"), "{}", hub6.quic);
        let v6 = offloader_for(HubEndpoint::parse(&format!("hub-1@{}", hub6.quic)).expect("addr"), edge_files());
        assert!(connects_within(&v6, Duration::from_secs(20)).await, "did not reach the hub over IPv6");
    } else {
        eprintln!("no IPv6 loopback here: the IPv6 case was not run");
    }
    assert!(HubEndpoint::parse("hub-1@nohost").is_err() && HubEndpoint::parse("::1:4433").is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

fn offloader_for(hub: HubEndpoint, files: TlsFiles) -> std::sync::Arc<Offloader> {
    let config = OffloadConfig { hubs: vec![hub], tls: Some(files), ..OffloadConfig::default() };
    Offloader::start(&config, false, None).expect("offloader").expect("a hub is configured")
}
