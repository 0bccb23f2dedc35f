//! One infer request served, whichever face it came in by (KServe v2 over REST or gRPC): the
//! version chosen by the traffic policy, the inputs validated, the deadline set, a shadow copy
//! spawned, the request dispatched (here, a hub, or refused), then counted in the version's load
//! report and in the request metrics. The faces only decode and encode, so they cannot drift apart.

use std::sync::Arc;
use std::time::Instant;

use super::state::{ApiError, HttpState};
use crate::dispatch::{Cascaded, DispatchError};
use crate::load_report::Outcome;
use crate::models::ServedModel;
use crate::pool::{PoolError, MAX_PRIORITY, PRIORITY_LABELS};
use crate::shadow::{self, ShadowStats};
use fabric_proto::kserve::{self, DecodedRequest, OutputSelection};
use fabric_types::tensor::NamedTensor;

/// A served request's outputs, for its face to encode.
pub struct Outputs {
    /// The request's id, echoed.
    pub id: Option<String>,
    /// Which outputs the client asked for, and how.
    pub selection: OutputSelection,
    /// Every output, in graph order.
    pub outputs: Vec<NamedTensor>,
    /// `edge-node`, `cloud-hub`, or `hub <node id>`.
    pub served_by: String,
    /// Rows in the batch it ran in, when served here.
    pub batch_rows: Option<usize>,
    /// What the model's cascade did, when it is the small model of one.
    pub cascade: Option<Cascaded>,
}

/// The model version a request names, before its body is read (unknown ones are answered first).
pub fn known(state: &HttpState, name: &str, version: Option<&str>) -> Result<Arc<ServedModel>, ApiError> {
    Ok(state.models.route(name, version)?)
}

/// Serves a decoded request (or counts the decoding failure) against `known`, the version it named,
/// and encodes the outputs with `encode`; returns the version that answered and the encoded result.
pub async fn serve<R>(
    state: &HttpState,
    known: Arc<ServedModel>,
    name: &str,
    version: Option<&str>,
    request: Result<DecodedRequest, ApiError>,
    arrived: Instant,
    encode: impl FnOnce(&ServedModel, Outputs) -> Result<R, ApiError>,
) -> (Arc<ServedModel>, Result<R, ApiError>) {
    let priority = priority_label(&request, &known);
    // The version is chosen once the request is read: the traffic policy routes by the request's id.
    let (model, result) = match request {
        Err(e) => (known, Err(e)),
        Ok(request) => match state.models.route_infer(name, version, request.id.as_deref()) {
            Err(e) => (known, Err(ApiError::from(e))),
            Ok(routed) => {
                drop(known);
                let result = counted(state, &routed.model, routed.shadow, request, arrived, encode).await;
                (routed.model, result)
            }
        },
    };
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.kind,
    };
    let version = model.version_str();
    state.metrics.requests.with_label_values(&[model.name.as_str(), &version, outcome]).inc();
    state.metrics.priority_requests.with_label_values(&[model.name.as_str(), priority, outcome]).inc();
    let latency = arrived.elapsed().as_secs_f64();
    state.metrics.request_duration.with_label_values(&[model.name.as_str(), &version]).observe(latency);
    if result.is_ok() {
        state.metrics.request_success.with_label_values(&[model.name.as_str(), &version]).inc_by(latency);
    }
    (model, result)
}

/// The model's cascade as this request has it: its `cascade_threshold` parameter, when it gives one,
/// in place of the configured threshold (to measure the trade-off, or for a caller that needs surer
/// answers).
fn cascade_of(
    request: &DecodedRequest,
    cascade: Arc<fabric_policy::cascade::Cascade>,
) -> Result<Arc<fabric_policy::cascade::Cascade>, ApiError> {
    match request.parameters.get("cascade_threshold") {
        None => Ok(cascade),
        Some(v) => match v.as_f64().filter(|t| t.is_finite()) {
            Some(threshold) => Ok(Arc::new(fabric_policy::cascade::Cascade { threshold, ..(*cascade).clone() })),
            None => Err(ApiError::invalid(format!("parameter cascade_threshold must be a number, got {v}"))),
        },
    }
}

/// The request's priority: its `priority` parameter (1 most urgent to 9), else the model's default.
fn priority_of(request: &DecodedRequest, model: &ServedModel) -> Result<u8, ApiError> {
    match request.parameters.get("priority") {
        None => Ok(model.pool.default_priority()),
        Some(v) => {
            v.as_u64().and_then(|p| u8::try_from(p).ok()).filter(|p| (1..=MAX_PRIORITY).contains(p)).ok_or_else(|| {
                ApiError::invalid(format!("parameter priority must be 1 (most urgent) to {MAX_PRIORITY}, got {v}"))
            })
        }
    }
}

/// The priority label of a request for the per-class metrics ("" when it names an invalid one).
fn priority_label(request: &Result<DecodedRequest, ApiError>, model: &ServedModel) -> &'static str {
    let priority = match request {
        Ok(r) => priority_of(r, model).unwrap_or(0),
        Err(_) => model.pool.default_priority(),
    };
    match priority {
        1..=MAX_PRIORITY => PRIORITY_LABELS[usize::from(priority) - 1],
        _ => "",
    }
}

/// Dispatches and encodes, counted in the version's load report.
async fn counted<R>(
    state: &HttpState,
    model: &ServedModel,
    shadow: Option<(Arc<ServedModel>, Arc<ShadowStats>)>,
    request: DecodedRequest,
    arrived: Instant,
    encode: impl FnOnce(&ServedModel, Outputs) -> Result<R, ApiError>,
) -> Result<R, ApiError> {
    // The version's load report counts the request from here: its latency is the version's own (queue,
    // compute or hub), not the time to receive and decode the body, which no version changes.
    let stats = model.pool.stats();
    let at = Instant::now();
    stats.arrival(at);
    let result = dispatch(state, model, shadow, request, arrived).await;
    let outcome = match &result {
        Ok((_, Some(_))) => Outcome::Served,
        Ok((_, None)) => Outcome::Offloaded,
        Err(e) => Outcome::Rejected(e.kind),
    };
    let finished = result.as_ref().ok().and_then(|(_, f)| *f).unwrap_or_else(Instant::now);
    let result = result.and_then(|(outputs, _)| encode(model, outputs));
    stats.answer(at, finished, outcome);
    result
}

/// Validates and dispatches; says when the replica answered (`None`: a hub served it).
async fn dispatch(
    state: &HttpState,
    model: &ServedModel,
    shadow: Option<(Arc<ServedModel>, Arc<ShadowStats>)>,
    request: DecodedRequest,
    arrived: Instant,
) -> Result<(Outputs, Option<Instant>), ApiError> {
    // Validate here, before any route is chosen: a request that does not fit the model gets its 400
    // whether it would have been served locally or by a hub.
    model.pool.metadata().validate(&request.inputs, model.pool.max_batch_size()).map_err(PoolError::Input)?;
    kserve::check_outputs(&request.outputs, model.pool.metadata().outputs.iter().map(|o| o.name.as_str()))?;
    let deadline = arrived + request.timeout.unwrap_or_else(|| model.config.default_timeout());
    let priority = priority_of(&request, model)?;
    // A shadow copy runs beside the request; it gets the primary's outputs to compare, never the client.
    let compare = shadow.map(|(shadow, stats)| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        shadow::spawn(shadow.pool.clone(), stats, request.inputs.clone(), deadline, rx);
        tx
    });
    // Its features counted against the version's reference, if it has one.
    model.quality.observe_inputs(Instant::now(), &request.inputs);
    // A cascade's small model keeps the inputs, for the big model if it is not confident.
    let cascade = match state.models.cascade(&model.name) {
        Some(c) => Some((cascade_of(&request, c)?, request.inputs.clone())),
        None => None,
    };
    let done = state.dispatcher.infer(model, request.inputs, deadline, priority).await.map_err(|e| match e {
        DispatchError::Pool(e) => ApiError::from(e),
        DispatchError::Invalid(msg) => ApiError::invalid(msg),
    })?;
    // The shadow compares this version's own outputs (before any cascade).
    if let Some(tx) = compare {
        let _ = tx.send(done.outputs.clone());
    }
    // Only an answer computed here: a hub that took the small model's overflow answered already.
    let (done, cascaded) = match cascade {
        Some((c, inputs)) if done.batch_rows.is_some() => {
            let (done, cascaded) = state.dispatcher.escalate(model, &c, done, inputs, deadline).await;
            (done, Some(cascaded))
        }
        _ => (done, None),
    };
    // Counted as the answer the client gets (a cascade's escalated answers included).
    model.quality.observe(Instant::now(), request.id.as_deref(), &done.outputs);
    let outputs = Outputs {
        id: request.id,
        selection: request.outputs,
        outputs: done.outputs,
        served_by: done.served_by,
        batch_rows: done.batch_rows,
        cascade: cascaded,
    };
    Ok((outputs, done.finished))
}
