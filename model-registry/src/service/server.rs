//! The QUIC server loop: admission of connections (a handshake budget for thousands of peers), one
//! task per stream, the liveness, canary and flush ticks.

use super::*;

/// How often node liveness is checked (a hub that stopped is known down within this of its timeout).
pub(super) const LIVENESS_TICK: Duration = Duration::from_millis(250);

/// Longest a QUIC handshake may take (twice as long as a node waits for one).
pub(super) const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// How often autoscaling decisions are written (one write for all of them).
pub const FLUSH_TICK: Duration = Duration::from_millis(250);

/// How many QUIC handshakes the registry runs at once: one that cannot start within `queue_wait`
/// is refused (the node retries with jittered backoff) rather than left to time out.
#[derive(Clone, Copy, Debug)]
pub struct Admission {
    /// Handshakes in progress at most.
    pub max_handshakes: usize,
    /// Longest a handshake waits for its turn before it is refused.
    pub queue_wait: Duration,
    /// Longest a stream may take to deliver its request frame (a silent or stalling peer is answered
    /// `timeout` and its stream closed).
    pub request_timeout: Duration,
}

impl Default for Admission {
    fn default() -> Self {
        Admission { max_handshakes: 256, queue_wait: Duration::from_secs(1), request_timeout: Duration::from_secs(10) }
    }
}

/// How often the leader's store does its housekeeping (etcd: compacting revisions older than this).
pub(super) const MAINTAIN_TICK: Duration = Duration::from_secs(60);

/// Runs `tick` on the registry serving now, every `period`, while it is the leader.
fn leader_tick(replica: &Arc<Replica>, period: Duration, tick: fn(&Registry)) {
    let replica = replica.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(period);
        loop {
            every.tick().await;
            let registry = replica.current();
            if registry.is_leader() {
                tick(&registry);
            }
        }
    });
}

/// Serves the registry on `endpoint` until it closes (a replica's: the leader's registry, or a
/// follower's that sends writes and heartbeats to the leader).
pub async fn serve(endpoint: quinn::Endpoint, replica: Arc<Replica>, admission: Admission) {
    let analysis_every = replica.current().settings.analysis_every;
    leader_tick(&replica, analysis_every, Registry::analyse);
    leader_tick(&replica, LIVENESS_TICK, Registry::check_liveness);
    leader_tick(&replica, FLUSH_TICK, Registry::flush_scaled);
    // Blocking (etcd's compaction): off the async threads.
    leader_tick(&replica, MAINTAIN_TICK, |r| tokio::task::block_in_place(|| r.store.maintain()));
    let turns = Arc::new(tokio::sync::Semaphore::new(admission.max_handshakes.max(1)));
    let refused = Arc::new(AtomicU64::new(0));
    let reporter = refused.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            let n = reporter.swap(0, Ordering::Relaxed);
            if n > 0 {
                tracing::warn!(
                    refused = n,
                    "QUIC handshakes refused in the last 5 s: too many at once (nodes retry with backoff)"
                );
            }
        }
    });
    while let Some(incoming) = endpoint.accept().await {
        let replica = replica.clone();
        let (turns, refused) = (turns.clone(), refused.clone());
        tokio::spawn(async move {
            // A burst (a fleet reconnecting) waits its turn briefly; beyond that it is refused at
            // once, which the node hears immediately, instead of a handshake that times out.
            let Ok(Ok(turn)) = tokio::time::timeout(admission.queue_wait, turns.acquire_owned()).await else {
                refused.fetch_add(1, Ordering::Relaxed);
                incoming.refuse();
                return;
            };
            // Bounded (a node gives up on a connect after 5 s): a handshake whose client gave up
            // must not hold a turn until QUIC's idle timeout.
            let connected = match tokio::time::timeout(HANDSHAKE_LIMIT, incoming).await {
                Ok(connected) => connected,
                Err(_) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            drop(turn);
            let connection = match connected {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("QUIC handshake refused: {e}");
                    return;
                }
            };
            let peer = match tls::peer_identity(&connection) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("peer without a usable identity: {e}");
                    connection.close(1u32.into(), b"no identity");
                    return;
                }
            };
            while let Ok((send, recv)) = connection.accept_bi().await {
                let (registry, peer) = (replica.current(), peer.clone());
                let replica = replica.clone();
                let limit = admission.request_timeout;
                tokio::spawn(async move { handle_stream(&registry, &replica, &peer, send, recv, limit).await });
            }
        });
    }
}

pub(super) async fn handle_stream(
    registry: &Registry,
    replica: &Replica,
    peer: &Identity,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    request_timeout: Duration,
) {
    // The request frame must arrive in time: a peer that opens streams and stalls (or announces a
    // large frame and sends nothing) holds nothing past this.
    let read = tokio::time::timeout(request_timeout, registry::read_frame(&mut recv, MAX_FRAME)).await;
    let request: Request = match read {
        Ok(Ok(r)) => r,
        Err(_) => {
            let message =
                format!("no complete request within {} ms: the stream is closed", request_timeout.as_millis());
            tracing::debug!(peer = %peer.node_id, "{message}");
            let _ = recv.stop(0u32.into());
            let _ = registry::write_frame(&mut send, &Reply::Err(Refusal::new("timeout", message))).await;
            let _ = send.finish();
            return;
        }
        Ok(Err(e)) => {
            let reply: Reply = Err(Refusal::new("invalid", format!("malformed request: {e}")));
            let _ = registry::write_frame(&mut send, &reply).await;
            let _ = send.finish();
            return;
        }
    };
    if let Request::Fetch { digest, offset } = &request {
        if let Err(refusal) = registry.fetch(peer, digest, *offset, &mut send).await {
            let _ = registry::write_frame(&mut send, &Reply::Err(refusal)).await;
        }
        let _ = send.finish();
        return;
    }
    // A follower answers reads from its watch-fed state; the rest goes to the leader.
    let reads = matches!(
        request,
        Request::ListModels
            | Request::ShowModel { .. }
            | Request::RolloutStatus { .. }
            | Request::Nodes(_)
            | Request::Overview
    );
    if !registry.is_leader() && !reads {
        let _ = registry::write_frame(&mut send, &Reply::Err(replica.not_leader())).await;
        let _ = send.finish();
        return;
    }
    // A node that gave up on its held heartbeat (it reports afresh) stops the stream: stop holding.
    let reply = match request {
        Request::Heartbeat(heartbeat) => {
            let answer = tokio::select! {
                answer = registry.heartbeat(peer, heartbeat) => answer,
                _ = send.stopped() => return,
            };
            match answer {
                // The group's answer, serialised once.
                Ok(desired) => {
                    let _ = registry::write_raw_frame(&mut send, &desired.frame).await;
                    let _ = send.finish();
                    return;
                }
                Err(refusal) => Err(refusal),
            }
        }
        request => registry.handle(peer, request, &mut recv).await,
    };
    if let Err(e) = &reply {
        tracing::info!(peer = %peer.node_id, kind = %e.kind, "request refused: {}", e.message);
    }
    let _ = registry::write_frame(&mut send, &reply).await;
    let _ = send.finish();
}
