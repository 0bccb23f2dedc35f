//! The hub's QUIC infer service: accepts edge connections (mutual TLS, fabric CA only), serves one
//! request per bidirectional stream through the same model pools as the HTTP API.
//!
//! A malformed, truncated or oversized message gets an error response naming the problem and the
//! stream is finished; the connection and its other streams carry on. A stream that stalls is cut
//! at its deadline (or the header timeout).
//!
//! Each answer says how its request arrived ([`Arrival`]: the bytes the connection received while
//! it did, over how long, and the hub's own time after), from which the edge learns its uplink.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_node::models::ModelSet;
use fabric_proto::tls::{self, Role};
use fabric_proto::wire::{
    self, codes, Arrival, ErrorCode, HubLoad, RequestHeader, ResponseHeader, WireError, WireLimits,
};
use fabric_types::tensor::{NamedTensor, Tensor};

/// What every stream handler shares.
pub struct QuicService {
    /// Served models.
    pub models: Arc<ModelSet>,
    /// Frame limits.
    pub limits: WireLimits,
    /// How long a peer may take to send a whole request.
    pub read_timeout: Duration,
    /// Requests in progress (reported to edges as load).
    pub in_flight: AtomicU32,
    /// Requests the hub takes before refusing as busy.
    pub capacity: u32,
}

impl QuicService {
    fn load(&self) -> HubLoad {
        HubLoad { in_flight: self.in_flight.load(Ordering::Relaxed), capacity: self.capacity }
    }
}

/// Accepts connections until the endpoint closes.
pub async fn serve(endpoint: quinn::Endpoint, service: Arc<QuicService>) {
    while let Some(incoming) = endpoint.accept().await {
        let service = service.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(%remote, "QUIC handshake refused: {e}");
                    return;
                }
            };
            let peer = match tls::peer_identity(&conn) {
                Ok(id) if matches!(id.role, Role::Edge | Role::Hub | Role::Operator) => id,
                Ok(id) => {
                    tracing::warn!(%remote, node = %id.node_id, role = id.role.as_str(), "refused: role may not use the infer service");
                    conn.close(codes::FORBIDDEN.into(), b"role may not use the infer service");
                    return;
                }
                Err(e) => {
                    tracing::warn!(%remote, "refused peer: {e}");
                    conn.close(codes::FORBIDDEN.into(), b"no valid fabric certificate");
                    return;
                }
            };
            tracing::info!(%remote, node = %peer.node_id, role = peer.role.as_str(), "peer connected");
            tokio::spawn(report_load(conn.clone(), service.clone()));
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        let service = service.clone();
                        let conn = conn.clone();
                        tokio::spawn(async move { handle_stream(&service, &conn, send, recv).await });
                    }
                    Err(e) => {
                        tracing::info!(node = %peer.node_id, "peer disconnected: {e}");
                        return;
                    }
                }
            }
        });
    }
}

/// Sends the hub's load to one peer every [`wire::LOAD_REPORT_INTERVAL`] until the connection closes.
async fn report_load(conn: quinn::Connection, service: Arc<QuicService>) {
    let mut tick = tokio::time::interval(wire::LOAD_REPORT_INTERVAL);
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            _ = tick.tick() => {}
        }
        let Ok(datagram) = wire::encode_load_report(service.load()) else { return };
        if conn.send_datagram(datagram.into()).is_err() {
            return; // closed, or the peer takes no datagrams: answers still carry the load
        }
    }
}

fn failure(code: ErrorCode, message: String, request_id: u64, load: HubLoad) -> ResponseHeader {
    ResponseHeader { protocol: wire::PROTOCOL_VERSION, request_id, result: Err((code, message)), load, arrival: None }
}

/// A request counted in flight; dropping it (answered, or the handler's future dropped) uncounts it.
struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl QuicService {
    /// Counts a request in flight if the hub has room: check and increment in one atomic step.
    fn admit(&self) -> Option<InFlight<'_>> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.capacity).then_some(n + 1))
            .ok()
            .map(|_| InFlight(&self.in_flight))
    }
}

/// Why a request stream could not be read: the answer to send, and the code to stop the stream with.
struct ReadFailure {
    code: ErrorCode,
    message: String,
    request_id: u64,
    stop: u32,
}

/// Reads a request: the header within the read timeout, then its tensors within what is left of the
/// request's own budget (or the read timeout, if shorter): a peer cannot hold a stream past its deadline.
async fn read_request(
    service: &QuicService,
    recv: &mut quinn::RecvStream,
) -> Result<(RequestHeader, Vec<NamedTensor>), ReadFailure> {
    let bad = |e: WireError, request_id: u64| ReadFailure {
        code: if matches!(e, WireError::Version(_)) { ErrorCode::UnsupportedProtocol } else { ErrorCode::Malformed },
        message: e.to_string(),
        request_id,
        stop: e.code(),
    };
    // Late past the read timeout: a peer that stalls mid-request. Late past the request's own
    // deadline: a request that can no longer be served in time (a slow link, a starved sender), which
    // the edge may still serve elsewhere, so it is said as that and not as a malformed request.
    let late = |what: &str, within: Duration, request_id: u64, deadline: bool| ReadFailure {
        code: if deadline { ErrorCode::DeadlineExceeded } else { ErrorCode::Malformed },
        message: format!("{what} not received within {} ms", within.as_millis()),
        request_id,
        stop: codes::TIMEOUT,
    };
    let started = Instant::now();
    let (header, header_len): (RequestHeader, usize) =
        match tokio::time::timeout(service.read_timeout, wire::read_header(recv, &service.limits)).await {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => return Err(bad(e, 0)),
            Err(_) => return Err(late("request header", service.read_timeout, 0, false)),
        };
    let id = header.request_id;
    let budget = Duration::from_micros(header.budget_us).saturating_sub(started.elapsed());
    let read_left = service.read_timeout.saturating_sub(started.elapsed());
    let within = read_left.min(budget);
    match tokio::time::timeout(within, wire::read_tensors(recv, &service.limits, header_len, &header.inputs)).await {
        Ok(Ok(inputs)) => Ok((header, inputs)),
        Ok(Err(e)) => Err(bad(e, id)),
        Err(_) => Err(late("request tensors", within, id, budget <= read_left)),
    }
}

async fn handle_stream(
    service: &QuicService,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let arrived = Instant::now();
    let received_before = conn.stats().udp_rx.bytes;
    let (header, inputs) = match read_request(service, &mut recv).await {
        Ok(request) => request,
        Err(f) => {
            tracing::warn!("bad request stream: {}", f.message);
            let _ = recv.stop(f.stop.into());
            respond(&mut send, &failure(f.code, f.message, f.request_id, service.load()), &[]).await;
            return;
        }
    };
    let read = Instant::now();
    let received = conn.stats().udp_rx.bytes.saturating_sub(received_before);
    let id = header.request_id;
    let Some(counted) = service.admit() else {
        let message = format!("hub at capacity ({} requests)", service.capacity);
        respond(&mut send, &failure(ErrorCode::Busy, message, id, service.load()), &[]).await;
        return;
    };
    let version = header.version.map(|v| v.to_string());
    let result = match service.models.route(&header.model, version.as_deref()) {
        Err(e) => Err((e.code(), e.to_string())),
        Ok(model) => {
            let deadline = arrived + Duration::from_micros(header.budget_us);
            match model.pool.infer_counted(inputs, arrived, deadline).await {
                Ok(reply) => Ok((model, reply.outputs)),
                Err(e) => Err((e.code(), e.to_string())),
            }
        }
    };
    drop(counted);
    match result {
        Ok((model, outputs)) => {
            let named = model.pool.metadata().name_outputs(outputs);
            let head = ResponseHeader {
                protocol: wire::PROTOCOL_VERSION,
                request_id: id,
                result: Ok(wire::tensor_headers(&named)),
                load: service.load(),
                arrival: Some(Arrival {
                    bytes: received,
                    micros: micros(read.duration_since(arrived)),
                    hub_micros: micros(read.elapsed()),
                }),
            };
            let tensors: Vec<&Tensor> = named.iter().map(|t| &t.tensor).collect();
            respond(&mut send, &head, &tensors).await;
        }
        Err((code, message)) => respond(&mut send, &failure(code, message, id, service.load()), &[]).await,
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

async fn respond(send: &mut quinn::SendStream, header: &ResponseHeader, tensors: &[&Tensor]) {
    match wire::encode_message(header, tensors) {
        Ok(bytes) => {
            if let Err(e) = send.write_all(&bytes).await {
                tracing::debug!("peer left before the response was sent: {e}");
                return;
            }
            let _ = send.finish();
        }
        Err(e) => {
            tracing::error!("cannot encode response: {e}");
            let _ = send.reset(codes::MALFORMED.into());
        }
    }
}
