//! The hub's QUIC infer service against the real cloud-hub binary: outputs equal to the edge engine's,
//! malformed / truncated / oversized frames, and peers without a certificate or from another CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fabric_engine::{self as engine, EngineKind, EngineOptions};
use fabric_proto::tls::{self, Role, TlsFiles};
use fabric_proto::wire::{self, ErrorCode, RequestHeader, ResponseHeader, WireLimits};
use fabric_testkit::ort::ort_library;
use fabric_testkit::process::{temp_dir, Proc};
use fabric_testkit::reference::{self, max_abs_diff};
use fabric_types::tensor::Tensor;
use fabric_types::NamedTensor;
use rustls::pki_types::pem::PemObject;

/// A running cloud-hub (killed on drop) and its folder (removed).
struct Hub {
    proc: Proc,
    quic: SocketAddr,
    dir: PathBuf,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.proc.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_hub() -> Hub {
    let dir = temp_dir("hub");
    tls::generate_dev_pki(&dir.join("certs"), &[("hub-1".into(), Role::Hub), ("edge-1".into(), Role::Edge)])
        .expect("pki");
    for model in ["mlp", "mixed"] {
        let v = dir.join("models").join(model).join("1");
        std::fs::create_dir_all(&v).expect("repo");
        std::fs::copy(reference::model_path(model), v.join("model.onnx")).expect("copy");
    }
    let config = format!(
        "[http]\naddr = \"127.0.0.1:0\"\n[quic]\naddr = \"127.0.0.1:0\"\n[quic.limits]\nmax_tensor_bytes = 1048576\n[ort]\nlibrary = \"{}\"\n",
        ort_library().display()
    );
    std::fs::write(dir.join("hub.toml"), config).expect("config");
    let mut command = Command::new(env!("CARGO_BIN_EXE_cloud-hub"));
    command
        .args(["--config"])
        .arg(dir.join("hub.toml"))
        .arg("--model-repository")
        .arg(dir.join("models"))
        .arg("--certs")
        .arg(dir.join("certs"))
        .env("RUST_LOG", "warn");
    let proc = Proc::spawn(command, "cloud-hub listening on ", &[]);
    let quic = proc.addr.split("quic://").nth(1).unwrap_or_default().parse().expect("quic addr");
    Hub { proc, quic, dir }
}

async fn connect(hub: SocketAddr, files: Option<&TlsFiles>, trust: &Path) -> Result<quinn::Connection, String> {
    let crypto = match files {
        Some(files) => tls::client_config(files).map_err(|e| e.to_string())?,
        None => {
            // A client that trusts the fabric CA but presents no certificate of its own.
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls::pki_types::CertificateDer::pem_file_iter(trust).expect("ca").flatten() {
                roots.add(cert).expect("root");
            }
            let mut tls =
                rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .expect("tls13")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
            tls.alpn_protocols = vec![tls::ALPN.to_vec()];
            quinn::ClientConfig::new(Arc::new(
                quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls"),
            ))
        }
    };
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(crypto);
    endpoint.connect(hub, "hub-1").map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())
}

/// Sends raw bytes on a new stream and reads the whole answer.
async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Result<(ResponseHeader, Vec<NamedTensor>), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| format!("{e} (closed: {:?})", conn.close_reason()))?;
    let _ = send.finish();
    let answer = tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(64 << 20))
        .await
        .map_err(|_| "no answer within 20 s".to_string())?
        .map_err(|e| format!("{e} (closed: {:?})", conn.close_reason()))?;
    let mut reader = answer.as_slice();
    wire::read_message(&mut reader, &WireLimits::default(), |h: &ResponseHeader| h.result.as_deref().unwrap_or(&[]))
        .await
        .map_err(|e| e.to_string())
}

fn request(model: &str, inputs: &[NamedTensor]) -> Vec<u8> {
    let header = RequestHeader {
        protocol: wire::PROTOCOL_VERSION,
        request_id: 42,
        trace_id: 7,
        model: model.into(),
        version: None,
        budget_us: 10_000_000,
        inputs: wire::tensor_headers(inputs),
    };
    let tensors: Vec<&Tensor> = inputs.iter().map(|t| &t.tensor).collect();
    wire::encode_message(&header, &tensors).expect("encode")
}

#[tokio::test]
async fn hub_outputs_equal_the_edge_engine_and_bad_frames_get_precise_errors() {
    let hub = start_hub();
    let certs = hub.dir.join("certs");
    let conn = connect(hub.quic, Some(&TlsFiles::in_dir(&certs, "edge-1")), &certs.join("ca.pem"))
        .await
        .expect("edge connects");

    for model in ["mlp", "mixed"] {
        let mut edge =
            engine::load(EngineKind::Tract, &reference::model_path(model), &EngineOptions::default()).expect("tract");
        for case in reference::load_cases(model).expect("cases") {
            let (head, outputs) = exchange(&conn, &request(model, &case.inputs)).await.expect("answer");
            assert_eq!(head.request_id, 42);
            assert!(head.result.is_ok(), "{model}: {:?}", head.result);
            let local = edge.infer(&case.inputs).expect("edge engine");
            for ((hub_out, edge_out), want) in outputs.iter().zip(&local).zip(&case.outputs) {
                assert_eq!(hub_out.name, edge_out.name);
                let diff = max_abs_diff(&hub_out.tensor, &edge_out.tensor).expect("same shape");
                assert!(
                    diff <= 1e-4,
                    "{model}/{} {}: hub (ORT) vs edge (tract) differ by {diff}",
                    case.name,
                    hub_out.name
                );
                assert!(max_abs_diff(&hub_out.tensor, &want.tensor).expect("same shape") <= 1e-4);
            }
        }
    }

    let good = request("mlp", &reference::load_cases("mlp").expect("cases")[0].inputs);
    let mut garbage = Vec::new();
    // The version this build speaks (a varint under 128 is its own byte), then nonsense.
    let version = u8::try_from(wire::PROTOCOL_VERSION).expect("a one-byte version");
    wire::put_frame(&mut garbage, &[version, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).expect("frame");
    // A header from a build that speaks the protocol before this one.
    let mut older = Vec::new();
    wire::put_frame(&mut older, &[version - 1, 0x00]).expect("frame");
    let mut huge_tensor = good[..4 + u32::from_be_bytes([good[0], good[1], good[2], good[3]]) as usize].to_vec();
    huge_tensor.extend_from_slice(&(2u32 << 20).to_be_bytes());
    let wrong_shape =
        request("mlp", &[NamedTensor::new("input", Tensor::from_vec(vec![1, 3], vec![0f32; 3]).expect("t"))]);
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<u8>, ErrorCode, &str)> = vec![
        ("garbage header", garbage, ErrorCode::Malformed, "malformed message: header"),
        ("an older protocol", older, ErrorCode::UnsupportedProtocol, "peer speaks protocol version 1, this build speaks 2"),
        ("truncated message", good[..good.len() - 100].to_vec(), ErrorCode::Malformed, "stream ended early"),
        ("tensor frame longer than declared", huge_tensor, ErrorCode::Malformed, "tensor frame of 2097152 bytes exceeds the limit of 3136 bytes"),
        ("oversized length prefix", vec![0xff; 4], ErrorCode::Malformed, "exceeds the limit of 65536 bytes"),
        ("unknown model", request("resnet", &[]), ErrorCode::UnknownModel, "unknown model 'resnet'"),
        ("wrong shape", wrong_shape, ErrorCode::BadRequest, "dimension 1 must be 784"),
    ];
    for (label, bytes, code, message) in cases {
        let (head, _) = exchange(&conn, &bytes).await.unwrap_or_else(|e| panic!("{label}: no error response: {e}"));
        match head.result {
            Err((got, text)) => {
                assert_eq!(got, code, "{label}: {text}");
                assert!(text.contains(message), "{label}: {text}");
            }
            Ok(_) => panic!("{label}: served"),
        }
    }
    // A header with a 300 ms budget, then silence: the hub answers at the budget, not its 5 s read timeout.
    let inputs = &reference::load_cases("mlp").expect("cases")[0].inputs;
    let header = RequestHeader {
        protocol: wire::PROTOCOL_VERSION,
        request_id: 43,
        trace_id: 8,
        model: "mlp".into(),
        version: None,
        budget_us: 300_000,
        inputs: wire::tensor_headers(inputs),
    };
    let tensors: Vec<&Tensor> = Vec::new();
    let mut slow = wire::encode_message(&header, &tensors).expect("encode");
    slow.extend_from_slice(&3136u32.to_be_bytes());
    slow.extend_from_slice(&[0; 100]);
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(&slow).await.expect("write");
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(1 << 20))
        .await
        .expect("answered")
        .expect("read");
    let mut reader = answer.as_slice();
    let (head, _) = wire::read_message(&mut reader, &WireLimits::default(), |h: &ResponseHeader| {
        h.result.as_deref().unwrap_or(&[])
    })
    .await
    .expect("response");
    let (code, message) = head.result.expect_err("refused");
    assert!(message.contains("request tensors not received within"), "{message}");
    // Its deadline, not the read timeout, cut the wait: a request too late to serve, not a bad one.
    assert_eq!(code, ErrorCode::DeadlineExceeded, "{message}");
    // Anything under the 5 s read timeout shows the budget cut it (a wide margin over the 300 ms budget).
    assert!(started.elapsed() < Duration::from_millis(4_500), "held until the read timeout: {:?}", started.elapsed());
    drop(send);

    // The connection survived all of that.
    let (head, _) = exchange(&conn, &good).await.expect("still serving");
    assert!(head.result.is_ok());
}

#[tokio::test]
async fn peers_without_a_fabric_certificate_are_refused() {
    let hub = start_hub();
    let certs = hub.dir.join("certs");
    let good = request("mlp", &reference::load_cases("mlp").expect("cases")[0].inputs);

    // No client certificate at all.
    let refused = match connect(hub.quic, None, &certs.join("ca.pem")).await {
        Err(e) => e,
        Ok(conn) => exchange(&conn, &good).await.map(|_| ()).expect_err("served a peer with no certificate"),
    };
    eprintln!("no certificate: {refused}");
    assert!(refused.contains("CertificateRequired") || refused.contains("peer sent no certificates"), "{refused}");

    // A certificate from another CA: connect() may succeed (TLS 1.3), the first read must fail.
    let other = temp_dir("other-ca");
    tls::generate_dev_pki(&other, &[("edge-1".into(), Role::Edge)]).expect("pki");
    let mut files = TlsFiles::in_dir(&other, "edge-1");
    files.ca = certs.join("ca.pem"); // trusts the real hub, presents a foreign certificate
    let refused = match connect(hub.quic, Some(&files), &certs.join("ca.pem")).await {
        Err(e) => e,
        Ok(conn) => exchange(&conn, &good).await.map(|_| ()).expect_err("served a peer from another CA"),
    };
    assert!(refused.contains("UnknownIssuer") || refused.to_lowercase().contains("certificate"), "{refused}");

    // A fabric certificate whose role may not infer (the registry's) is refused by name.
    tls::generate_dev_pki(&certs, &[("registry-1".into(), Role::Registry)]).expect("registry cert");
    let registry = TlsFiles::in_dir(&certs, "registry-1");
    let refused = match connect(hub.quic, Some(&registry), &certs.join("ca.pem")).await {
        Err(e) => e,
        Ok(conn) => exchange(&conn, &good).await.map(|_| ()).expect_err("served the registry role"),
    };
    assert!(refused.contains("role may not use the infer service"), "{refused}");

    // A hub certificate from another CA is refused by the edge side too.
    let wrong_trust = TlsFiles { ca: other.join("ca.pem"), ..TlsFiles::in_dir(&certs, "edge-1") };
    let refused = connect(hub.quic, Some(&wrong_trust), &other.join("ca.pem"))
        .await
        .map(|_| ())
        .expect_err("trusted a foreign hub");
    assert!(refused.contains("UnknownIssuer") || refused.to_lowercase().contains("certificate"), "{refused}");
    let _ = std::fs::remove_dir_all(&other);
}
