//! The registry and its clients against peers that misbehave, over real QUIC with the fabric's mutual
//! TLS: a peer that opens streams, announces 16 MiB frames and goes silent holds nothing past the
//! request timeout and gets no more streams than the per-connection limit; a server whose
//! certificate carries the registry's name but another role is refused by the client.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use fabric_proto::registry::{self, Reply, Request, MAX_FRAME};
use fabric_proto::tls::{self, TlsFiles};
use support::Fabric;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime")
}

#[test]
fn a_silent_peer_holds_no_stream_past_the_request_timeout() {
    let f = Fabric::new("silent-peer");
    let registry = f.registry("127.0.0.1:0", &["--request-timeout-ms", "500", "--max-streams-per-connection", "8"]);
    let addr: SocketAddr = registry.addr.parse().expect("registry address");
    runtime().block_on(async {
        let files = TlsFiles::in_dir(&f.certs, "operator");
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("bind")).expect("endpoint");
        let config = tls::client_config(&files).expect("client config");
        let connecting = endpoint.connect_with(config, addr, "registry-1").expect("connect");
        let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .expect("handshake in time")
            .expect("connected");

        // Eight streams, each announcing a 16 MiB frame, then silent.
        let mut silent = Vec::new();
        for _ in 0..8 {
            let (mut send, recv) = conn.open_bi().await.expect("stream");
            send.write_all(&(16u32 << 20).to_be_bytes()).await.expect("frame length");
            silent.push((send, recv));
        }
        // A ninth waits for one of them to end: the registry allows eight at once per connection.
        let ninth = tokio::time::timeout(Duration::from_millis(300), conn.open_bi()).await;
        assert!(ninth.is_err(), "a ninth stream opened past --max-streams-per-connection 8");

        // Each silent stream is answered `timeout` and closed, well before a client would give up.
        for (i, (_send, mut recv)) in silent.into_iter().enumerate() {
            let read =
                tokio::time::timeout(Duration::from_secs(10), registry::read_frame::<Reply>(&mut recv, MAX_FRAME));
            let reply =
                read.await.unwrap_or_else(|_| panic!("stream {i} still held after 10 s")).expect("a reply frame");
            let refusal = reply.expect_err("a silent stream is refused");
            assert_eq!(refusal.kind, "timeout", "stream {i}: {}", refusal.message);
            assert!(refusal.message.contains("no complete request within 500 ms"), "{}", refusal.message);
        }

        // The connection serves real requests once the silent streams are gone.
        let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.open_bi())
            .await
            .expect("a stream again")
            .expect("stream");
        registry::write_frame(&mut send, &Request::ListModels).await.expect("request");
        let _ = send.finish();
        let reply: Reply = registry::read_frame(&mut recv, MAX_FRAME).await.expect("reply");
        assert!(reply.is_ok(), "{reply:?}");
    });
}

#[test]
fn clients_refuse_a_server_whose_certificate_is_not_a_registrys() {
    let f = Fabric::new("wrong-role");
    let rt = runtime();
    // hub-1's certificate is from the fabric CA, so the name checks out; only its role is wrong.
    let server = {
        let _inside = rt.enter();
        let config = tls::server_config(&TlsFiles::in_dir(&f.certs, "hub-1")).expect("server config");
        quinn::Endpoint::server(config, "127.0.0.1:0".parse().expect("bind")).expect("server")
    };
    let addr = server.local_addr().expect("address");
    rt.spawn(async move {
        while let Some(incoming) = server.accept().await {
            if let Ok(conn) = incoming.await {
                // Held open: the client must leave on its own.
                tokio::spawn(async move { conn.closed().await });
            }
        }
    });
    let result = rt.block_on(async {
        let target = registry::RegistryAddr { addr: addr.to_string(), server_name: "hub-1".into() };
        let client = registry::RegistryClient::new(target, &TlsFiles::in_dir(&f.certs, "operator")).expect("client");
        tokio::time::timeout(Duration::from_secs(30), client.call(&Request::ListModels))
            .await
            .expect("an answer in time")
    });
    let error = result.expect_err("a hub is not a registry").to_string();
    assert!(error.contains("presents a certificate for a hub ('hub-1'), not a registry"), "{error}");
}

fn registry_command(f: &Fabric, http_addr: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_model-registry"));
    cmd.args(["--listen", "127.0.0.1:0", "--node-id", "registry-1", "--http-addr", http_addr])
        .arg("--data-dir")
        .arg(f.dir.join("registry"))
        .arg("--certs")
        .arg(&f.certs)
        .env_remove("FABRIC_STATUS_TOKEN")
        .env("RUST_LOG", "warn");
    cmd
}

#[test]
fn the_status_page_needs_a_token_beyond_loopback_and_then_checks_it() {
    let f = Fabric::new("page-token");
    // Beyond loopback without a token: refused at start, saying what to do.
    let out = std::process::Command::new("timeout")
        .arg("60")
        .arg(registry_command(&f, "0.0.0.0:0").get_program())
        .args(registry_command(&f, "0.0.0.0:0").get_args())
        .env_remove("FABRIC_STATUS_TOKEN")
        .output()
        .expect("runs");
    assert!(!out.status.success(), "started a tokenless status page beyond loopback");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs a token: pass --status-token-file or set FABRIC_STATUS_TOKEN"), "{stderr}");

    // With a token: the page and its data answer only with it.
    let mut cmd = registry_command(&f, "127.0.0.1:0");
    cmd.env("FABRIC_STATUS_TOKEN", "page-token-0123456789");
    let proc = fabric_testkit::process::Proc::spawn(
        cmd,
        "model-registry listening on quic://",
        &["model-registry status page on "],
    );
    let page = proc.seen("model-registry status page on ").expect("page line").to_string();
    let agent = support::client();
    let status = |path: &str| fabric_testkit::http::get(&agent, &format!("{page}{path}")).status;
    assert_eq!(status("/"), 401);
    assert_eq!(status("/api/status"), 401);
    assert_eq!(status("/?token=wrong-token-0123456789"), 401);
    assert_eq!(status("/?token=page-token-0123456789"), 200);
    assert_eq!(status("/api/status?token=page-token-0123456789"), 200);
}
