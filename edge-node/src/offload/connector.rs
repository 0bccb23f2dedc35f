//! Keeping one hub connected: connect (mutual TLS, the peer must be a hub), wait until the
//! connection closes, reconnect as the reconnect policy says; the hub's load reports read as they
//! arrive.

#[allow(unused_imports)]
use super::link::HubLink;
use super::*;

/// The client endpoints, one per address family.
#[derive(Clone)]
pub(super) struct Endpoints {
    pub(super) v4: quinn::Endpoint,
    pub(super) v6: Option<quinn::Endpoint>,
}

impl Endpoints {
    /// Resolves `addr` (DNS names included) and connects from the endpoint of its family.
    pub(super) async fn connect(&self, addr: &str, server_name: &str) -> Result<quinn::Connection, String> {
        let resolved: Vec<SocketAddr> =
            tokio::net::lookup_host(addr).await.map_err(|e| format!("cannot resolve {addr}: {e}"))?.collect();
        let target = resolved
            .iter()
            .find(|a| a.is_ipv4() || self.v6.is_some())
            .copied()
            .ok_or_else(|| format!("{addr} resolves to no address this node can reach ({resolved:?})"))?;
        let endpoint = match (target, &self.v6) {
            (SocketAddr::V6(_), Some(v6)) => v6,
            _ => &self.v4,
        };
        let connecting = endpoint.connect(target, server_name).map_err(|e| e.to_string())?;
        connecting.await.map_err(|e| {
            let text = e.to_string();
            if text.contains("NotValidForName") || text.contains("not valid for name") {
                format!("{text}: the hub's certificate does not carry the name '{server_name}'; give the name it has as --hub NAME@{addr} (a hub's node id is always in its certificate)")
            } else {
                text
            }
        })
    }
}

/// Keeps one hub connected: connect, wait until the connection closes, back off, reconnect.
pub(super) async fn keep_connected(endpoints: Endpoints, link: Arc<HubLink>, min: Duration, max: Duration) {
    // Each link jitters on its own (seeded by its address), so edges that lost a hub together
    // come back apart.
    let mut policy = ReconnectPolicy::new(min, max, seed_of(&link.addr));
    loop {
        if link.retired.load(Ordering::Relaxed) {
            return;
        }
        link.attempts.fetch_add(1, Ordering::Relaxed);
        link.proven.store(false, Ordering::Relaxed);
        let attempt = endpoints.connect(&link.addr, &link.server_name).await;
        match attempt.and_then(|conn| match tls::peer_identity(&conn) {
            Ok(id) if id.role == Role::Hub => Ok((conn, id)),
            Ok(id) => Err(format!("peer '{}' is a {}, not a hub", id.node_id, id.role.as_str())),
            Err(e) => Err(e.to_string()),
        }) {
            Ok((conn, id)) => {
                tracing::info!(hub = %link.addr, node = %id.node_id, "connected to hub");
                if let Ok(mut name) = link.name.lock() {
                    if *name != id.node_id {
                        // Known by its node id from now on: the series under the configured name goes.
                        if let Some(m) = &link.metrics {
                            let _ = m.hub_usable.remove_label_values(&[name.as_str()]);
                        }
                        *name = id.node_id.clone();
                    }
                }
                if let Ok(mut slot) = link.conn.lock() {
                    *slot = Some(conn.clone());
                }
                link.publish();
                if link.retired.load(Ordering::Relaxed) {
                    // Retired while connecting: `retire` found no connection to close.
                    conn.close(0u32.into(), b"hub no longer listed");
                }
                tokio::spawn(read_load_reports(conn.clone(), link.clone()));
                let reason = conn.closed().await;
                if let Ok(mut slot) = link.conn.lock() {
                    *slot = None;
                }
                link.publish();
                // Closed before the hub ever answered: it refused us (TLS 1.3 checks the client's
                // certificate after connect() returns) or is failing; back off as for a failed connect.
                let proven = link.proven.load(Ordering::Relaxed);
                let retry = policy.after(if proven { LinkEnd::Lost } else { LinkEnd::ClosedUnproven });
                if retry.log && proven {
                    tracing::warn!(hub = %link.addr, "hub connection lost: {reason}; reconnecting");
                } else if retry.log {
                    tracing::warn!(hub = %link.addr, "hub closed the connection before any answer: {reason}; retrying with backoff up to {} ms", max.as_millis());
                }
                tokio::time::sleep(retry.after).await;
            }
            Err(e) => {
                let retry = policy.after(LinkEnd::ConnectFailed);
                if retry.log {
                    tracing::warn!(hub = %link.addr, "cannot connect to hub: {e}; retrying with backoff up to {} ms", max.as_millis());
                }
                tokio::time::sleep(retry.after).await;
            }
        }
    }
}

/// Takes the hub's load reports (datagrams) until the connection closes.
pub(super) async fn read_load_reports(conn: quinn::Connection, link: Arc<HubLink>) {
    while let Ok(datagram) = conn.read_datagram().await {
        match wire::decode_load_report(&datagram) {
            Ok(load) => link.record_load(load),
            Err(e) => tracing::debug!(hub = %link.addr, "ignoring a bad load report: {e}"),
        }
    }
}
