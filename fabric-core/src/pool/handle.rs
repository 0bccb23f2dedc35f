//! What callers hold: a pool's address, the model's metadata, and the view the pool publishes, so
//! that a request is validated and routed (admission) before it is sent, and answered by its deadline.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::{GetStatus, ModelPool, PoolError, PoolReply, PoolStatus, Refused, SetReplicas, SharedView, Submit};
use crate::model::ModelMetadata;
use crate::policy::admission::{self, Admission, AdmissionInput, AdmissionSettings, OffloadView, PoolLoad};
use crate::tensor::{NamedTensor, Tensor};

/// What callers hold: the pool's address and what is needed to validate requests before queueing.
#[derive(Clone)]
pub struct PoolHandle {
    pub(super) addr: Addr<ModelPool>,
    pub(super) metadata: Arc<ModelMetadata>,
    pub(super) batched: bool,
    pub(super) on_gpu: bool,
    pub(super) max_batch_size: usize,
    pub(super) queue_capacity: usize,
    pub(super) admission: AdmissionSettings,
    pub(super) view: Arc<SharedView>,
}

impl PoolHandle {
    /// The model's declared inputs and outputs.
    pub fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    /// Most rows one request may carry.
    pub fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    /// Whether the replicas run on a GPU.
    pub fn on_gpu(&self) -> bool {
        self.on_gpu
    }

    /// Whether requests share batches (see [`ModelMetadata::is_batched`]).
    pub fn is_batched(&self) -> bool {
        self.batched
    }

    /// Validates, queues and awaits one request; always returns by `deadline` (plus scheduling slack).
    pub async fn infer(&self, inputs: Vec<NamedTensor>, deadline: Instant) -> Result<PoolReply, PoolError> {
        self.submit(inputs, deadline, None).await.map_err(|refused| refused.error)
    }

    /// Like [`infer`](Self::infer), with a hub at hand: a request whose expected wait here is over the
    /// local target is turned away with [`PoolError::OverWaitTarget`], for the caller to offload. A
    /// request turned away at admission comes back with its inputs, so the caller need not keep a copy.
    pub async fn infer_with_hub(
        &self,
        inputs: Vec<NamedTensor>,
        deadline: Instant,
        hub: OffloadView,
    ) -> Result<PoolReply, Refused> {
        self.submit(inputs, deadline, Some(hub)).await
    }

    async fn submit(
        &self,
        inputs: Vec<NamedTensor>,
        deadline: Instant,
        hub: Option<OffloadView>,
    ) -> Result<PoolReply, Refused> {
        let arrived = Instant::now();
        let (inputs, rows) = self.metadata.into_ordered(inputs, self.max_batch_size).map_err(Refused::from)?;
        let shape_key = if self.batched {
            let mut hasher = DefaultHasher::new();
            for t in &inputs {
                t.shape().get(1..).hash(&mut hasher);
            }
            hasher.finish()
        } else {
            // A key of its own: the batcher never joins it with another request.
            self.view.next_solo_key.fetch_add(1, Ordering::Relaxed)
        };
        let (reply, rx) = oneshot::channel();
        let (give_back, returned) = match hub {
            Some(_) => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let submit = Submit { inputs, hub, give_back, rows, shape_key, arrived, deadline, reply };
        if let Err(e) = self.addr.try_send(submit) {
            let (error, submit) = match e {
                SendError::Full(s) => (PoolError::Saturated, s),
                SendError::Closed(s) => (PoolError::Stopped, s),
            };
            let inputs = hub.map(|_| self.named(submit.inputs));
            return Err(Refused { error, inputs });
        }
        // The pool answers expired requests itself; this bound only guards against a pool that stopped.
        let guard = tokio::time::Instant::from_std(deadline + Duration::from_millis(50));
        let error = match tokio::time::timeout_at(guard, rx).await {
            Ok(Ok(Ok(reply))) => return Ok(reply),
            Ok(Ok(Err(e))) => e,
            Ok(Err(_)) => PoolError::Stopped,
            Err(_) => PoolError::DeadlineExceeded {
                waited: arrived.elapsed(),
                timeout: deadline.saturating_duration_since(arrived),
            },
        };
        // Sent before the refusal, so it is there now if the pool turned the request away at the door.
        let inputs = returned.and_then(|mut rx| rx.try_recv().ok()).map(|t| self.named(t));
        Err(Refused { error, inputs })
    }

    /// Inputs in graph order, named again.
    fn named(&self, inputs: Vec<Tensor>) -> Vec<NamedTensor> {
        self.metadata.name_inputs(inputs)
    }

    /// Where a request should go now: here, to a hub (when `hub` says one could answer in time), or nowhere.
    pub fn admission(&self, inputs: &[NamedTensor], deadline: Instant, hub: Option<OffloadView>) -> Admission {
        let v = &self.view;
        let load = PoolLoad {
            queued_requests: v.queued_requests.load(Ordering::Relaxed),
            queued_rows: v.queued_rows.load(Ordering::Relaxed),
            replicas: v.replicas.load(Ordering::Relaxed),
            busy_replicas: v.busy.load(Ordering::Relaxed),
            loading: v.loading.load(Ordering::Relaxed),
        };
        let rows = self
            .metadata
            .inputs
            .iter()
            .zip(inputs)
            .find(|(spec, _)| spec.has_dynamic_leading())
            .map(|(_, t)| t.tensor.batch_size())
            .unwrap_or(1);
        let input = admission_input(
            self.batched,
            rows,
            deadline.saturating_duration_since(Instant::now()),
            self.queue_capacity,
            v.batch_limit.load(Ordering::Relaxed).max(1),
            load,
            self.admission,
        );
        let service = v.service.lock().ok().and_then(|s| s.clone());
        admission::admit_or_offload(&input, |rows| service.as_ref().and_then(|s| s.estimate(rows)), hub)
    }

    /// Changes the replica count.
    pub fn set_replicas(&self, n: usize) {
        self.addr.do_send(SetReplicas(n));
    }

    /// The pool's current state.
    pub async fn status(&self) -> Result<PoolStatus, PoolError> {
        self.addr.send(GetStatus).await.map_err(|_| PoolError::Stopped)
    }

    /// Replicas ready to serve now (from the published view, without a round trip to the pool).
    pub fn ready_replicas(&self) -> usize {
        self.view.replicas.load(Ordering::Relaxed)
    }
}

/// The admission input for a request. A model that cannot batch counts each request as one batch.
pub(super) fn admission_input(
    batched: bool,
    rows: usize,
    budget: Duration,
    queue_capacity: usize,
    batch_limit: usize,
    load: PoolLoad,
    settings: AdmissionSettings,
) -> AdmissionInput {
    let (rows, max_batch_size, load) = if batched {
        (rows, batch_limit, load)
    } else {
        (1, 1, PoolLoad { queued_rows: load.queued_requests, ..load })
    };
    AdmissionInput { rows, budget, queue_capacity, max_batch_size, load, settings }
}
