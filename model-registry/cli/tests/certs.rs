//! `fabric certs`: writes a CA and node certificates whose subjects carry node id and role.

use std::process::Command;

use fabric_proto::tls::{identity_of, Role};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

#[test]
fn certs_name_node_and_role_and_bad_input_is_explained() {
    let dir = std::env::temp_dir().join(format!("fabric-certs-{}", std::process::id()));
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_fabric")).args(args).output().expect("run fabric");
    let out = run(&[
        "certs",
        "--out",
        dir.to_str().expect("utf8"),
        "--node",
        "edge-1:edge",
        "--node",
        "hub-1:hub:hub1.example.net,10.0.0.5",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (node, role, names) in [
        ("edge-1", Role::Edge, vec!["DNS:edge-1"]),
        ("hub-1", Role::Hub, vec!["DNS:hub-1", "DNS:hub1.example.net", "IP:10.0.0.5"]),
    ] {
        let cert = CertificateDer::from_pem_file(dir.join(format!("{node}.pem"))).expect("pem");
        let id = identity_of(&cert).expect("identity");
        assert_eq!((id.node_id.as_str(), id.role), (node, role));
        // Its own names only: no shared `localhost` that would let any node pass for any other.
        assert_eq!(subject_alt_names(&cert), names, "{node}");
        let key = dir.join(format!("{node}.key.pem"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is readable by others: {mode:o}", key.display());
    }
    // A second run reuses the CA: the new node is signed by the same one.
    let ca_before = std::fs::read(dir.join("ca.pem")).expect("ca");
    assert!(run(&["certs", "--out", dir.to_str().expect("utf8"), "--node", "ops:operator"]).status.success());
    assert_eq!(std::fs::read(dir.join("ca.pem")).expect("ca"), ca_before);
    let bad = run(&["certs", "--out", dir.to_str().expect("utf8"), "--node", "x:admin"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown role 'admin': use edge, hub, registry or operator"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The certificate's subject alternative names as `DNS:name` / `IP:address`.
fn subject_alt_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).expect("x509");
    let Ok(Some(san)) = parsed.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => format!("DNS:{d}"),
            x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                4 => format!("IP:{}", std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])),
                _ => format!("IP:{ip:?}"),
            },
            other => format!("{other:?}"),
        })
        .collect()
}
