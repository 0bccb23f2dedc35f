//! TLS on a real edge-node's HTTP and gRPC ports, mutual: clients need a certificate from the
//! configured CA (none, or one from another CA, cannot connect); an operator's certificate may call
//! the repository and admin APIs without the admin token, another role's may not; plain text gets
//! no answer.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fabric_proto::kserve_grpc::pb;
use fabric_proto::tls::{generate_dev_pki_with_names, NodeCert, Role};
use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::{start_edge_with_args, Edge};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn pki(dir: &Path) -> PathBuf {
    let node = |id: &str, role, names: &[&str]| NodeCert {
        id: id.into(),
        role,
        names: names.iter().map(|n| n.to_string()).collect(),
    };
    let certs = dir.join("certs");
    generate_dev_pki_with_names(
        &certs,
        &[
            node("edge-1", Role::Edge, &["localhost", "127.0.0.1"]),
            node("ops", Role::Operator, &[]),
            node("app", Role::Edge, &[]),
        ],
    )
    .expect("pki");
    certs
}

fn start(certs: &Path) -> Edge {
    let config = format!(
        "[tls]\ncert = \"{0}/edge-1.pem\"\nkey = \"{0}/edge-1.key.pem\"\nclient_ca = \"{0}/ca.pem\"\n[grpc]\nenabled = true\naddr = \"127.0.0.1:0\"\n",
        certs.display()
    );
    let args = ["--model-control", "explicit", "--admin-addr", "127.0.0.1:0"].map(String::from);
    start_edge_with_args(&[("mlp", ""), ("mixed", "")], &config, &args)
}

/// One HTTP/1.1 request over TLS, as `identity` (a certificate in `certs`, or none); the status.
fn https(addr: &str, certs: &Path, identity: Option<&str>, method: &str, path: &str) -> Result<u16, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(certs.join("ca.pem")).map_err(|e| e.to_string())? {
        roots.add(cert.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certs.join(format!("{id}.pem")))
                .map_err(|e| e.to_string())?
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            let key = PrivateKeyDer::from_pem_file(certs.join(format!("{id}.key.pem"))).map_err(|e| e.to_string())?;
            builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?
        }
    };
    let name = "localhost".try_into().map_err(|e: rustls::pki_types::InvalidDnsNameError| e.to_string())?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let socket = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    socket.set_read_timeout(Some(Duration::from_secs(20))).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, socket);
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    // The server may close without close_notify once it has answered: what arrived counts.
    let read = tls.read_to_end(&mut reply);
    let text = String::from_utf8_lossy(&reply);
    let status = text.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|s| s.parse().ok());
    status.ok_or_else(|| format!("no HTTP answer ({read:?}): {text:?}"))
}

#[test]
fn mutual_tls_on_both_ports_and_operator_certificates_for_the_repository() {
    let dir = fabric_testkit::process::temp_dir("edge-tls");
    let certs = pki(&dir);
    let edge = start(&certs);
    assert!(edge.url.starts_with("https://"), "{}", edge.url);
    let addr = edge.url.trim_start_matches("https://").to_string();

    assert_eq!(https(&addr, &certs, Some("app"), "GET", "/v2/health/ready"), Ok(200));
    assert!(https(&addr, &certs, None, "GET", "/v2/health/ready").is_err(), "no client certificate, yet answered");
    let other = pki(&dir.join("other"));
    assert!(
        https(&addr, &other, Some("app"), "GET", "/v2/health/ready").is_err(),
        "another CA's certificate, yet answered"
    );
    // Plain HTTP on a TLS port gets no HTTP answer.
    let plain =
        fabric_testkit::http::try_post(&support::client(), &format!("http://{addr}/v2/health/ready"), b"", None);
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status != 200), "plain text answered 200");

    // The repository: an edge's certificate is not enough without the token; an operator's is.
    assert_eq!(https(&addr, &certs, Some("app"), "POST", "/v2/repository/models/mixed/unload"), Ok(401));
    assert_eq!(https(&addr, &certs, Some("ops"), "POST", "/v2/repository/models/mixed/unload"), Ok(200));
    assert_eq!(https(&addr, &certs, Some("app"), "GET", "/v2/models/mixed/ready"), Ok(404), "unloaded");
    // The admin API is behind the same TLS: an operator's certificate may change a policy, an edge's not.
    let admin = edge.admin.clone().expect("admin API");
    assert!(admin.starts_with("https://"), "{admin}");
    let admin = admin.trim_start_matches("https://").to_string();
    assert_eq!(https(&admin, &certs, Some("app"), "DELETE", "/v2/fabric/models/mlp/policy"), Ok(401));
    assert_eq!(https(&admin, &certs, Some("ops"), "DELETE", "/v2/fabric/models/mlp/policy"), Ok(200));
    assert_eq!(https(&admin, &certs, Some("app"), "GET", "/v2/fabric/load"), Ok(200), "reads need no token");

    // gRPC over the same TLS: served with a client certificate, the repository with an operator's.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let grpc_addr = edge.grpc.clone().expect("grpc");
    let channel = |id: Option<&str>| {
        let ca = Certificate::from_pem(std::fs::read(certs.join("ca.pem")).expect("ca"));
        let mut tls = ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost");
        if let Some(id) = id {
            let cert = std::fs::read(certs.join(format!("{id}.pem"))).expect("cert");
            let key = std::fs::read(certs.join(format!("{id}.key.pem"))).expect("key");
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        let endpoint = Channel::from_shared(format!("https://{grpc_addr}")).expect("uri").tls_config(tls).expect("tls");
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), endpoint.connect())
                .await
                .map_err(|_| "timed out".to_string())?
                .map_err(|e| e.to_string())
        })
    };
    let mut app = GrpcInferenceServiceClient::new(channel(Some("app")).expect("app connects"));
    assert!(rt.block_on(app.server_ready(pb::ServerReadyRequest {})).expect("ready").into_inner().ready);
    let unload = pb::RepositoryModelUnloadRequest { model_name: "mlp".into(), ..Default::default() };
    let refused = rt.block_on(app.repository_model_unload(unload.clone())).expect_err("an edge's certificate");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut ops = GrpcInferenceServiceClient::new(channel(Some("ops")).expect("ops connects"));
    rt.block_on(ops.repository_model_unload(unload)).expect("an operator's certificate unloads");
    let anonymous = channel(None).map(GrpcInferenceServiceClient::new);
    let served = anonymous.ok().map(|mut c| rt.block_on(c.server_live(pb::ServerLiveRequest {})).is_ok());
    assert_ne!(served, Some(true), "a gRPC client without a certificate was served");
    let _ = std::fs::remove_dir_all(&dir);
}
