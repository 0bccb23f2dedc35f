//! The hub's QUIC infer service: accepts edge connections (mutual TLS, fabric CA only), serves one
//! request per bidirectional stream through the same model pools as the HTTP API.
//!
//! A malformed, truncated or oversized message gets an error response naming the problem and the
//! stream is finished; the connection and its other streams carry on. A stream that stalls is cut
//! at its deadline (or the header timeout).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_core::models::{ModelSet, RouteError};
use fabric_core::pool::PoolError;
use fabric_core::tensor::{NamedTensor, Tensor};
use fabric_core::tls::{self, Role};
use fabric_core::wire::{self, codes, ErrorCode, HubLoad, RequestHeader, ResponseHeader, WireError, WireLimits};

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
                        tokio::spawn(async move { handle_stream(&service, send, recv).await });
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
    ResponseHeader { protocol: wire::PROTOCOL_VERSION, request_id, result: Err((code, message)), load }
}

fn pool_error_code(e: &PoolError) -> ErrorCode {
    match e {
        PoolError::Input(_) => ErrorCode::BadRequest,
        PoolError::QueueFull { .. }
        | PoolError::WouldMissDeadline { .. }
        | PoolError::NotReady
        | PoolError::Saturated
        | PoolError::OverWaitTarget { .. }
        | PoolError::Stopped => ErrorCode::Busy,
        PoolError::DeadlineExceeded { .. } => ErrorCode::DeadlineExceeded,
        PoolError::ReplicaFailed(_) | PoolError::Engine(_) => ErrorCode::Internal,
    }
}

async fn handle_stream(service: &QuicService, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let arrived = Instant::now();
    let read = tokio::time::timeout(
        service.read_timeout,
        wire::read_message(&mut recv, &service.limits, |h: &RequestHeader| &h.inputs),
    )
    .await;
    let (header, inputs) = match read {
        Ok(Ok(message)) => message,
        Ok(Err(e)) => {
            let code =
                if matches!(e, WireError::Version(_)) { ErrorCode::UnsupportedProtocol } else { ErrorCode::Malformed };
            tracing::warn!("bad request stream: {e}");
            let _ = recv.stop(e.code().into());
            respond(&mut send, &failure(code, e.to_string(), 0, service.load()), &[]).await;
            return;
        }
        Err(_) => {
            let _ = recv.stop(codes::TIMEOUT.into());
            let message = format!("request not received within {} ms", service.read_timeout.as_millis());
            respond(&mut send, &failure(ErrorCode::Malformed, message, 0, service.load()), &[]).await;
            return;
        }
    };
    let id = header.request_id;
    if service.in_flight.load(Ordering::Relaxed) >= service.capacity {
        respond(
            &mut send,
            &failure(ErrorCode::Busy, format!("hub at capacity ({} requests)", service.capacity), id, service.load()),
            &[],
        )
        .await;
        return;
    }
    service.in_flight.fetch_add(1, Ordering::Relaxed);
    let version = header.version.map(|v| v.to_string());
    let result = match service.models.route(&header.model, version.as_deref()) {
        Err(e @ (RouteError::UnknownModel { .. } | RouteError::UnknownVersion { .. })) => {
            Err((ErrorCode::UnknownModel, e.to_string()))
        }
        Err(e @ RouteError::Unavailable { .. }) => Err((ErrorCode::Busy, e.to_string())),
        Ok(model) => {
            let deadline = arrived + Duration::from_micros(header.budget_us);
            match model.pool.infer(inputs, deadline).await {
                Ok(reply) => Ok((model, reply.outputs)),
                Err(e) => Err((pool_error_code(&e), e.to_string())),
            }
        }
    };
    service.in_flight.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok((model, outputs)) => {
            let named: Vec<NamedTensor> = model
                .pool
                .metadata()
                .outputs
                .iter()
                .zip(outputs)
                .map(|(spec, t)| NamedTensor::new(spec.name.clone(), t))
                .collect();
            let head = ResponseHeader {
                protocol: wire::PROTOCOL_VERSION,
                request_id: id,
                result: Ok(wire::tensor_headers(&named)),
                load: service.load(),
            };
            let tensors: Vec<&Tensor> = named.iter().map(|t| &t.tensor).collect();
            respond(&mut send, &head, &tensors).await;
        }
        Err((code, message)) => respond(&mut send, &failure(code, message, id, service.load()), &[]).await,
    }
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
