//! Sending requests to hubs: the hubs in order of expected answer, one bidirectional stream per
//! request, a busy or vanished hub skipped for the next while the deadline allows.

#[allow(unused_imports)]
use super::link::HubLink;
use super::*;

impl Offloader {
    pub(super) async fn attempt(
        &self,
        link: &HubLink,
        conn: &quinn::Connection,
        model: &str,
        version: Option<u64>,
        inputs: &[NamedTensor],
        deadline: Instant,
    ) -> Result<Vec<NamedTensor>, Attempt> {
        let started = Instant::now();
        let header = RequestHeader {
            protocol: wire::PROTOCOL_VERSION,
            request_id: self.next_id.fetch_add(1, Ordering::Relaxed),
            trace_id: rand_trace(),
            model: model.to_string(),
            version,
            budget_us: u64::try_from(deadline.saturating_duration_since(started).as_micros()).unwrap_or(u64::MAX),
            inputs: wire::tensor_headers(inputs),
        };
        let tensors: Vec<&Tensor> = inputs.iter().map(|t| &t.tensor).collect();
        let bytes = wire::encode_message(&header, &tensors).map_err(|e| Attempt::Invalid(e.to_string()))?;
        let limits = self.limits;
        link.sending(bytes.len() as u64);
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("cannot open a stream: {e}"))?;
            send.write_all(&bytes).await.map_err(|e| format!("hub lost while sending: {e}"))?;
            let _ = send.finish();
            wire::read_message(&mut recv, &limits, |h: &ResponseHeader| h.result.as_deref().unwrap_or(&[]))
                .await
                .map_err(|e| format!("hub lost while answering: {e}"))
        };
        let guard = tokio::time::Instant::from_std(deadline);
        let result = tokio::time::timeout_at(guard, exchange).await;
        let (head, outputs) = match result {
            Err(_) => {
                // A timeout is an answer time too (a lower bound): without it, a hub too slow to ever
                // answer in time would keep the estimate of its last good answers and keep being chosen.
                link.record_answer(started.elapsed());
                link.with_health(HubHealth::timed_out);
                return Err(Attempt::Next("deadline passed waiting for the hub".into()));
            }
            Ok(Err(e)) => return Err(Attempt::Next(e)),
            Ok(Ok(answer)) => answer,
        };
        link.record_load(head.load);
        if let Some(arrival) = head.arrival {
            link.record_arrival(conn, arrival);
        }
        match head.result {
            Ok(_) => {
                link.record_answer(started.elapsed());
                link.with_health(HubHealth::served);
                Ok(outputs)
            }
            Err((ErrorCode::BadRequest | ErrorCode::Malformed, msg)) => Err(Attempt::Invalid(msg)),
            Err((ErrorCode::Busy, msg)) => {
                link.with_health(|h| h.busy(Instant::now()));
                Err(Attempt::Next(format!("Busy: {msg}")))
            }
            Err((code, msg)) => Err(Attempt::Next(format!("{code:?}: {msg}"))),
        }
    }
}

/// How one attempt on one hub failed.
pub(super) enum Attempt {
    /// Try another hub (busy, lost, deadline on that hub).
    Next(String),
    /// Final: the request itself is wrong.
    Invalid(String),
}

pub(super) fn rand_trace() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    // Truncating the nanoseconds is the point: only the low bits vary.
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

/// One of our requests in flight to a hub, counted (and published) while it lives.
pub(super) struct Sending<'a>(&'a HubLink);

impl<'a> Sending<'a> {
    fn start(link: &'a HubLink) -> Self {
        link.in_flight.fetch_add(1, Ordering::Relaxed);
        link.publish_in_flight();
        Sending(link)
    }
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.publish_in_flight();
    }
}

impl Overflow for Offloader {
    fn view(&self, request_bytes: u64) -> Option<OffloadView> {
        self.candidates(request_bytes).first().map(|(h, c)| OffloadView { expected: h.expected(c, request_bytes) })
    }

    fn always(&self) -> bool {
        self.mode == OffloadMode::Always
    }

    fn infer<'a>(
        &'a self,
        model: &'a str,
        version: Option<u64>,
        inputs: &'a [NamedTensor],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Offloaded, OverflowError>> {
        Box::pin(async move {
            let mut failures = Vec::new();
            let bytes: u64 = inputs.iter().map(|t| t.tensor.bytes().len() as u64).sum();
            for (link, conn) in self.candidates(bytes) {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                // The registry may have marked it down since the candidates were picked.
                if link.down.load(Ordering::Relaxed) {
                    continue;
                }
                // Never sent where its transfer alone, or its expected answer, would miss the deadline:
                // the link's time goes to requests that can still make it.
                let upload = link.upload(&conn, bytes).max(link.sized_answer(&conn, bytes).unwrap_or_default());
                if !admission::hub_in_time(upload, deadline.saturating_duration_since(now)) {
                    link.count("link_too_slow");
                    failures.push(format!(
                        "{}: its link would take {:.0} ms to carry the request and answer, past its deadline (less the hub margin)",
                        link.label(),
                        upload.as_secs_f64() * 1e3
                    ));
                    continue;
                }
                let patience = link.patience(&conn);
                let attempt_deadline = deadline.min(now + patience);
                let (expected, budget) = (link.expected(&conn, bytes), attempt_deadline.saturating_duration_since(now));
                let result = {
                    // Uncounted when the attempt ends, or when this future is dropped (the client left).
                    let _sending = Sending::start(&link);
                    self.attempt(&link, &conn, model, version, inputs, attempt_deadline).await
                };
                let name = link.name.lock().map(|n| n.clone()).unwrap_or_default();
                match result {
                    Ok(outputs) => {
                        link.count("served");
                        tracing::trace!(
                            hub = %name,
                            expected_ms = expected.as_millis() as u64,
                            took_ms = now.elapsed().as_millis() as u64,
                            "offloaded"
                        );
                        return Ok(Offloaded { outputs, served_by: format!("hub {name}") });
                    }
                    Err(Attempt::Invalid(msg)) => return Err(OverflowError::Invalid(msg)),
                    Err(Attempt::Next(msg)) => {
                        link.count(if msg.starts_with("Busy") { "busy" } else { "failed" });
                        tracing::debug!(
                            hub = %name,
                            expected_ms = expected.as_millis() as u64,
                            budget_ms = budget.as_millis() as u64,
                            took_ms = now.elapsed().as_millis() as u64,
                            "offload attempt failed: {msg}"
                        );
                        failures.push(format!("{name}: {msg}"));
                    }
                }
            }
            if failures.is_empty() {
                failures.push("no hub connected".into());
            }
            Err(OverflowError::Unavailable(failures.join("; ")))
        })
    }
}
