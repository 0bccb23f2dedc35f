//! Mutual TLS for every QUIC endpoint of the fabric.
//!
//! Every peer presents a certificate signed by the fabric CA; its subject names the peer: common name
//! = node id, organizational unit = role. A development CA and node certificates can be generated
//! with [`generate_dev_pki`]; production users point the config at their own PEM files.
//!
//! Note (measured, see STACK.md): with TLS 1.3 a client holding a certificate from another CA still
//! completes `connect()`; the refusal shows on its first read. Never treat a connection as
//! authorised before [`peer_identity`] succeeds on the server side.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// ALPN protocol id of the fabric's QUIC services.
pub const ALPN: &[u8] = b"fabric/1";

/// A peer's role, carried in its certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An edge-node.
    Edge,
    /// A cloud-hub.
    Hub,
    /// The model registry.
    Registry,
    /// A person driving the registry with the CLI.
    Operator,
}

impl Role {
    /// The role's name in certificates and configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::Hub => "hub",
            Role::Registry => "registry",
            Role::Operator => "operator",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "edge" => Ok(Role::Edge),
            "hub" => Ok(Role::Hub),
            "registry" => Ok(Role::Registry),
            "operator" => Ok(Role::Operator),
            other => Err(format!("unknown role '{other}': use edge, hub, registry or operator")),
        }
    }
}

/// Who a peer is, from its verified certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Node id (certificate common name).
    pub node_id: String,
    /// Role (certificate organizational unit).
    pub role: Role,
}

/// The PEM files of one node: the fabric CA, its certificate, its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The fabric CA certificate (PEM); peers must be signed by it.
    pub ca: PathBuf,
    /// This node's certificate chain (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `generate_dev_pki` writes for `node` in `dir`.
    pub fn in_dir(dir: &Path, node: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{node}.pem")),
            key: dir.join(format!("{node}.key.pem")),
        }
    }
}

/// Why TLS cannot be set up, or a peer is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file cannot be read or holds nothing usable.
    #[error("cannot use {path}: {reason} (generate development certificates with `fabric certs --out <dir> --node <id>:<role>`)")]
    File { path: String, reason: String },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Generating certificates failed.
    #[error("certificate generation: {0}")]
    Generate(String),
    /// The peer's certificate does not name a node and role.
    #[error("peer certificate: {0}")]
    Peer(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::File { path: path.display().to_string(), reason };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| TlsError::File { path: path.display().to_string(), reason: e.to_string() })
}

fn roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in read_certs(ca)? {
        store.add(cert).map_err(|e| TlsError::File { path: ca.display().to_string(), reason: e.to_string() })?;
    }
    Ok(Arc::new(store))
}

/// A QUIC server config that requires a client certificate from the fabric CA.
pub fn server_config(files: &TlsFiles) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(&files.cert)?, read_key(&files.key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// A TLS server config for a node's HTTP and gRPC ports (TLS 1.2 and 1.3, ALPN `alpn`): any CA's
/// certificate in `cert`; with `client_ca`, mutual TLS (clients must present a certificate that CA
/// signed).
pub fn port_server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config =
        builder.with_single_cert(read_certs(cert)?, read_key(key)?).map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The identity (node id, role) the certificate in `files` carries: who this node is to its peers.
pub fn own_identity(files: &TlsFiles) -> Result<Identity, TlsError> {
    let certs = read_certs(&files.cert)?;
    let cert = certs
        .first()
        .ok_or_else(|| TlsError::File { path: files.cert.display().to_string(), reason: "no certificate".into() })?;
    identity_of(cert)
}

/// A QUIC client config that presents this node's certificate and trusts only the fabric CA.
pub fn client_config(files: &TlsFiles) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(read_certs(&files.cert)?, read_key(&files.key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    // Keep-alive and idle timeout are the caller's (the edge's `offload` settings).
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Reads node id and role from a DER certificate.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| TlsError::Peer(e.to_string()))?;
    let subject = parsed.subject();
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let node_id =
        first(&mut subject.iter_common_name()).ok_or_else(|| TlsError::Peer("no common name (node id)".into()))?;
    let role = first(&mut subject.iter_organizational_unit())
        .ok_or_else(|| TlsError::Peer(format!("certificate of '{node_id}' names no role (organizational unit)")))?
        .parse()
        .map_err(TlsError::Peer)?;
    Ok(Identity { node_id, role })
}

/// The verified identity of a connected peer.
pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, TlsError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| TlsError::Peer("peer presented no certificate".into()))?;
    let leaf = certs.first().ok_or_else(|| TlsError::Peer("empty certificate chain".into()))?;
    identity_of(leaf)
}

/// Writes a development CA and, for each (node id, role), a certificate whose only name is the node id;
/// see [`generate_dev_pki_with_names`].
pub fn generate_dev_pki(dir: &Path, nodes: &[(String, Role)]) -> Result<Vec<PathBuf>, TlsError> {
    let named: Vec<NodeCert> =
        nodes.iter().map(|(id, role)| NodeCert { id: id.clone(), role: *role, names: Vec::new() }).collect();
    generate_dev_pki_with_names(dir, &named)
}

/// One node's certificate to make: its id (CN), role (OU), and the names it answers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCert {
    /// Node id: the common name, and always one of the certificate's names.
    pub id: String,
    /// Role: the organizational unit.
    pub role: Role,
    /// More names (DNS names or IP addresses) a peer may reach the node by.
    pub names: Vec<String>,
}

/// Writes a development CA (`ca.pem`, `ca.key.pem`) and, for each node, `<id>.pem` and `<id>.key.pem`
/// into `dir`; private keys are readable by their owner only (0600). The certificate's subject
/// alternative names are the node id and the node's extra names, and nothing else: a peer checks it
/// reached the node it named. Reuses an existing CA in `dir`, so nodes can be added later.
pub fn generate_dev_pki_with_names(dir: &Path, nodes: &[NodeCert]) -> Result<Vec<PathBuf>, TlsError> {
    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let io =
        |path: &Path, e: std::io::Error| TlsError::File { path: path.display().to_string(), reason: e.to_string() };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let (ca_pem, ca_key_pem) = (dir.join("ca.pem"), dir.join("ca.key.pem"));
    let mut written = Vec::new();
    let ca_key = if ca_key_pem.is_file() && ca_pem.is_file() {
        KeyPair::from_pem(&std::fs::read_to_string(&ca_key_pem).map_err(|e| io(&ca_key_pem, e))?).map_err(gen)?
    } else {
        let key = KeyPair::generate().map_err(gen)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "fabric development CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).map_err(gen)?;
        std::fs::write(&ca_pem, cert.pem()).map_err(|e| io(&ca_pem, e))?;
        write_private(&ca_key_pem, &key.serialize_pem()).map_err(|e| io(&ca_key_pem, e))?;
        written.extend([ca_pem.clone(), ca_key_pem.clone()]);
        key
    };
    let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(&ca_pem).map_err(|e| io(&ca_pem, e))?, ca_key)
        .map_err(gen)?;
    for NodeCert { id: node, role, names } in nodes {
        let key = KeyPair::generate().map_err(gen)?;
        let dns: Vec<String> = std::iter::once(node.clone())
            .chain(names.iter().filter(|n| n.parse::<std::net::IpAddr>().is_err()).cloned())
            .collect();
        let mut params = CertificateParams::new(dns).map_err(gen)?;
        for ip in names.iter().filter_map(|n| n.parse::<std::net::IpAddr>().ok()) {
            params.subject_alt_names.push(SanType::IpAddress(ip));
        }
        params.distinguished_name.push(DnType::CommonName, node.as_str());
        params.distinguished_name.push(DnType::OrganizationalUnitName, role.as_str());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).map_err(gen)?;
        let files = TlsFiles::in_dir(dir, node);
        std::fs::write(&files.cert, cert.pem()).map_err(|e| io(&files.cert, e))?;
        write_private(&files.key, &key.serialize_pem()).map_err(|e| io(&files.key, e))?;
        written.extend([files.cert, files.key]);
    }
    Ok(written)
}

/// Writes a file only its owner may read (a private key), whatever the umask.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path)?;
    // An existing file keeps its mode on open: set it explicitly.
    #[cfg(unix)]
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents.as_bytes())
}
