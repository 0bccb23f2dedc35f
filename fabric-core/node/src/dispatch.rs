//! Where one request is served: this node's pool, a hub, or nowhere (a precise refusal). The one
//! place admission, offload and their fallbacks are carried out, so that the HTTP layer only decodes
//! and encodes (and the registry's routing can reuse it).
//!
//! 1. Admission ([`policy::admission`](fabric_policy::admission)) on the pool's published snapshot and
//!    the best hub's expected answer time: local, offload, or refuse at the door.
//! 2. Offload: a hub that fails (busy, gone, too slow) leaves the request to the local pool while the
//!    deadline allows. Where every request goes to a hub first (offload mode `always`), the hubs get
//!    the deadline less what serving here would take, so a hub that vanishes mid-request (killed, its
//!    connection not yet timed out) leaves time to serve the request here.
//! 3. Local: with a hub at hand the pool re-checks the wait target on its exact state; what it turns
//!    away comes back with its inputs and goes to the hub after all ("late offload").

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;

use crate::metrics::Metrics;
use crate::models::ServedModel;
use crate::pool::{PoolError, Refused};
use fabric_policy::admission::{Admission, OffloadView};
use fabric_policy::cascade::{self, Cascade};
use fabric_types::tensor::NamedTensor;

/// Why a request could not be served elsewhere.
#[derive(Debug, thiserror::Error)]
pub enum OverflowError {
    /// No hub could take it in time (busy, down, vanished mid-request): serve locally if time allows.
    #[error("offload failed: {0}")]
    Unavailable(String),
    /// The hub refused the request itself (it does not fit the model): final.
    #[error("{0}")]
    Invalid(String),
}

/// Outputs served elsewhere, and by whom.
pub struct Offloaded {
    /// Outputs in graph order.
    pub outputs: Vec<NamedTensor>,
    /// Which hub served them.
    pub served_by: String,
}

/// Somewhere else to serve requests this node cannot serve in time (a hub, for an edge-node).
pub trait Overflow: Send + Sync {
    /// The best hub's expected answer time for a request of `request_bytes` (its transfer across the
    /// link included), or `None` when no hub is usable now.
    fn view(&self, request_bytes: u64) -> Option<OffloadView>;
    /// Whether to send every request to a hub while one is usable (not only what overflows).
    fn always(&self) -> bool {
        false
    }
    /// Serves one request elsewhere (`version` `None`: whichever the hub routes to), answering by
    /// the deadline.
    fn infer<'a>(
        &'a self,
        model: &'a str,
        version: Option<u64>,
        inputs: &'a [NamedTensor],
        deadline: Instant,
    ) -> BoxFuture<'a, Result<Offloaded, OverflowError>>;
}

/// A served request: its outputs, who served them, and the batch it ran in (when served here).
pub struct Dispatched {
    /// Outputs in graph order, named.
    pub outputs: Vec<NamedTensor>,
    /// `edge-node`, `cloud-hub`, or `hub <node id>`.
    pub served_by: String,
    /// Rows in the batch it ran in, when served here.
    pub batch_rows: Option<usize>,
    /// When the replica answered, when served here.
    pub finished: Option<Instant>,
}

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// Refused or failed here (the pool's precise reason).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A hub found the request invalid for the model.
    #[error("{0}")]
    Invalid(String),
}

/// Carries out where requests go, for one node.
pub struct Dispatcher {
    server_name: String,
    overflow: Option<Arc<dyn Overflow>>,
    metrics: Metrics,
}

/// What a cascade did with a request its small model answered here.
#[derive(Clone, Debug, PartialEq)]
pub struct Cascaded {
    /// The model whose outputs the answer carries.
    pub answered_by: String,
    /// `small` (confident), `escalated` (the big model answered), `fallback` (not confident, but the
    /// big model could not answer in time: the small model's answer, with the reason).
    pub outcome: &'static str,
    /// Why it fell back.
    pub note: Option<String>,
}

impl Dispatcher {
    /// A dispatcher for the node `server_name`, with somewhere to send overflow or not.
    pub fn new(server_name: &str, overflow: Option<Arc<dyn Overflow>>, metrics: Metrics) -> Dispatcher {
        Dispatcher { server_name: server_name.to_string(), overflow, metrics }
    }

    /// A cascade's second step: `done` (the small model's answer, served here) stands when it is
    /// confident about every row; otherwise `inputs` go to the big model on a hub by `deadline`, and
    /// when no hub can answer in time the small model's answer stands, saying why.
    pub async fn escalate(
        &self,
        model: &ServedModel,
        cascade: &Cascade,
        done: Dispatched,
        inputs: Vec<NamedTensor>,
        deadline: Instant,
    ) -> (Dispatched, Cascaded) {
        let small = |outcome, note| Cascaded { answered_by: model.name.clone(), outcome, note };
        let counted = |c: Cascaded| {
            self.metrics.cascades.with_label_values(&[model.name.as_str(), c.outcome]).inc();
            c
        };
        let scores = match &cascade.output {
            Some(name) => done.outputs.iter().find(|o| &o.name == name),
            None => done.outputs.iter().find(|o| {
                matches!(o.tensor.dtype(), fabric_types::DataType::Fp32 | fabric_types::DataType::Fp64)
                    && o.tensor.shape().len() == 2
                    && o.tensor.shape()[1] > 1
            }),
        };
        let Some((values, per_row)) = scores.and_then(|s| {
            let per_row = s.tensor.shape().get(1).copied()?;
            Some((fabric_policy::drift::values_f64(&s.tensor)?, per_row))
        }) else {
            let note = format!("no scores output to read confidence from (set [cascade.{}] output)", model.name);
            return (done, counted(small("fallback", Some(note))));
        };
        if !cascade::escalates(&values, per_row, cascade) {
            return (done, counted(small("small", None)));
        }
        let Some(overflow) = &self.overflow else {
            return (done, counted(small("fallback", Some("no hub to escalate to".into()))));
        };
        match overflow.infer(&cascade.to, None, &inputs, deadline).await {
            Ok(big) => {
                let answered = Cascaded { answered_by: cascade.to.clone(), outcome: "escalated", note: None };
                let done =
                    Dispatched { outputs: big.outputs, served_by: big.served_by, batch_rows: None, finished: None };
                (done, counted(answered))
            }
            Err(e) => {
                tracing::debug!(model = %model.name, to = %cascade.to, "escalation failed, the small model's answer stands: {e}");
                (done, counted(small("fallback", Some(format!("{} could not answer in time: {e}", cascade.to)))))
            }
        }
    }

    /// Where overflow goes, if anywhere.
    pub fn overflow(&self) -> Option<&Arc<dyn Overflow>> {
        self.overflow.as_ref()
    }

    fn count(&self, model: &ServedModel, route: &str) {
        self.metrics.routes.with_label_values(&[model.name.as_str(), &model.version_str(), route]).inc();
    }

    /// Serves validated inputs by `deadline` at `priority` (1 most urgent), here or on a hub, or says
    /// precisely why not.
    pub async fn infer(
        &self,
        model: &ServedModel,
        inputs: Vec<NamedTensor>,
        deadline: Instant,
        priority: u8,
    ) -> Result<Dispatched, DispatchError> {
        let Some(overflow) = &self.overflow else {
            self.count(model, "local");
            return self.local(model, inputs, deadline, priority).await;
        };
        let bytes: usize = inputs.iter().map(|t| t.tensor.bytes().len()).sum();
        let view = overflow.view(bytes as u64);
        let (route, hub_deadline) = match view {
            // Sent to a hub first, by a deadline that keeps time to serve it here if the hub fails.
            Some(_) if overflow.always() => (Admission::Offload, model.pool.hub_deadline(&inputs, deadline, priority)),
            view => (model.pool.admission(&inputs, deadline, view, priority), deadline),
        };
        match (route, view) {
            (Admission::Reject(why), _) => {
                self.count(model, "rejected");
                Err(DispatchError::Pool(PoolError::from(why)))
            }
            (Admission::Offload, _) => {
                self.count(model, "offload");
                match overflow.infer(&model.name, Some(model.version), &inputs, hub_deadline).await {
                    Ok(done) => Ok(Dispatched {
                        outputs: done.outputs,
                        served_by: done.served_by,
                        batch_rows: None,
                        finished: None,
                    }),
                    Err(OverflowError::Invalid(msg)) => Err(DispatchError::Invalid(msg)),
                    Err(OverflowError::Unavailable(msg)) => {
                        // Serve here after all if the deadline still allows; the pool decides.
                        tracing::debug!(model = %model.name, "offload failed, trying locally: {msg}");
                        self.count(model, "local");
                        self.local(model, inputs, deadline, priority).await
                    }
                }
            }
            (Admission::Local, None) => {
                self.count(model, "local");
                self.local(model, inputs, deadline, priority).await
            }
            (Admission::Local, Some(view)) => {
                self.count(model, "local");
                match model.pool.infer_with_hub(inputs, deadline, view, priority).await {
                    Ok(reply) => Ok(self.served_here(model, reply)),
                    Err(Refused { error, inputs: Some(inputs) }) if is_overload(&error) => {
                        self.late_offload(overflow.as_ref(), model, error, inputs, deadline, priority).await
                    }
                    Err(refused) => Err(refused.error.into()),
                }
            }
        }
    }

    /// The pool turned a request away for overload: a hub may still take it.
    async fn late_offload(
        &self,
        overflow: &dyn Overflow,
        model: &ServedModel,
        error: PoolError,
        inputs: Vec<NamedTensor>,
        deadline: Instant,
        priority: u8,
    ) -> Result<Dispatched, DispatchError> {
        self.count(model, "late_offload");
        match overflow.infer(&model.name, Some(model.version), &inputs, deadline).await {
            Ok(done) => {
                Ok(Dispatched { outputs: done.outputs, served_by: done.served_by, batch_rows: None, finished: None })
            }
            // Turned away only for the wait target: here can still make the deadline.
            Err(o) if matches!(error, PoolError::OverWaitTarget { .. } | PoolError::OverQueueTarget { .. }) => {
                tracing::debug!(model = %model.name, "late offload failed, serving here: {o}");
                self.local(model, inputs, deadline, priority).await
            }
            Err(o) => {
                tracing::debug!(model = %model.name, "late offload failed: {o}");
                Err(error.into())
            }
        }
    }

    async fn local(
        &self,
        model: &ServedModel,
        inputs: Vec<NamedTensor>,
        deadline: Instant,
        priority: u8,
    ) -> Result<Dispatched, DispatchError> {
        let reply = model.pool.infer_at(inputs, deadline, priority).await?;
        Ok(self.served_here(model, reply))
    }

    fn served_here(&self, model: &ServedModel, reply: crate::pool::PoolReply) -> Dispatched {
        Dispatched {
            outputs: model.pool.metadata().name_outputs(reply.outputs),
            served_by: self.server_name.clone(),
            batch_rows: Some(reply.batch_rows),
            finished: Some(reply.finished),
        }
    }
}

/// Refusals a hub might still take.
fn is_overload(e: &PoolError) -> bool {
    matches!(
        e,
        PoolError::OverWaitTarget { .. }
            | PoolError::OverQueueTarget { .. }
            | PoolError::QueueFull { .. }
            | PoolError::WouldMissDeadline { .. }
            | PoolError::NotReady
            | PoolError::ColdStart { .. }
    )
}
