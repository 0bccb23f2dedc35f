//! TLS on the node's HTTP listeners: the rustls config from `[tls]`, and the identity of a client's
//! certificate kept with its connection (under mutual TLS) for the handlers to read.

use crate::config::PortTlsConfig;
use fabric_proto::tls::Identity;

/// The fabric identity (node id, role) of the client certificate a TLS connection presented.
#[derive(Clone, Debug)]
pub struct PeerIdentity(pub Identity);

/// The rustls config of the node's ports, when TLS is on.
pub fn tls_config(tls: &PortTlsConfig, alpn: &[&[u8]]) -> std::io::Result<Option<rustls::ServerConfig>> {
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let Some((cert, key)) = tls.files().map_err(invalid)? else { return Ok(None) };
    fabric_proto::tls::port_server_config(cert, key, tls.client_ca.as_deref(), alpn)
        .map(Some)
        .map_err(|e| invalid(e.to_string()))
}

/// Keeps the identity of a TLS client's certificate with its connection.
pub fn remember_peer(connection: &dyn std::any::Any, data: &mut actix_web::dev::Extensions) {
    type Tls = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
    let Some(stream) = connection.downcast_ref::<Tls>() else { return };
    let (_, session) = stream.get_ref();
    if let Some(identity) =
        session.peer_certificates().and_then(|c| c.first()).and_then(|c| fabric_proto::tls::identity_of(c).ok())
    {
        data.insert(PeerIdentity(identity));
    }
}
