//! `fabric certs`: writes a CA and node certificates whose subjects carry node id and role.

use std::process::Command;

use fabric_core::tls::{identity_of, Role};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

#[test]
fn certs_name_node_and_role_and_bad_input_is_explained() {
    let dir = std::env::temp_dir().join(format!("fabric-certs-{}", std::process::id()));
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_fabric")).args(args).output().expect("run fabric");
    let out = run(&["certs", "--out", dir.to_str().expect("utf8"), "--node", "edge-1:edge", "--node", "hub-1:hub"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (node, role) in [("edge-1", Role::Edge), ("hub-1", Role::Hub)] {
        let cert = CertificateDer::from_pem_file(dir.join(format!("{node}.pem"))).expect("pem");
        let id = identity_of(&cert).expect("identity");
        assert_eq!((id.node_id.as_str(), id.role), (node, role));
        assert!(dir.join(format!("{node}.key.pem")).is_file());
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
