//! What callers hold: a pool's queue and address and the model's metadata, so that a request is
//! validated, admitted (on the queue's exact state) and queued from the caller's own thread, and
//! answered by its deadline.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use super::gpu_place::GpuPlacement;
use super::queue::Intake;
use super::{GetStatus, ModelPool, Pending, PoolError, PoolReply, PoolStatus, Refused, SetReplicas, Stop, Wake};
use crate::load_report::{LoadStats, Outcome};
use fabric_engine::model::ModelMetadata;
use fabric_policy::admission::{Admission, OffloadView};
use fabric_types::tensor::{NamedTensor, Tensor};

/// What callers hold: the pool's address and what is needed to validate requests before queueing.
#[derive(Clone)]
pub struct PoolHandle {
    pub(super) addr: Addr<ModelPool>,
    pub(super) intake: Arc<Intake>,
    pub(super) metadata: Arc<ModelMetadata>,
    pub(super) batched: bool,
    pub(super) on_gpu: bool,
    /// What was measured of it on its GPU, when it runs on one.
    pub(super) gpu: Option<Arc<GpuPlacement>>,
    pub(super) max_batch_size: usize,
    /// Hands out unique batch keys for requests of models that cannot share a batch.
    pub(super) solo_keys: Arc<AtomicU64>,
    /// Rolling load statistics, for the load report.
    pub(super) stats: Arc<LoadStats>,
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

    /// The GPU memory a replica holds and the replicas worth running, measured at load (on a GPU only).
    pub fn gpu(&self) -> Option<&GpuPlacement> {
        self.gpu.as_deref()
    }

    /// Whether requests share batches (see [`ModelMetadata::is_batched`]).
    pub fn is_batched(&self) -> bool {
        self.batched
    }

    /// Validates, queues and awaits one request; always returns by `deadline` (plus scheduling slack).
    pub async fn infer(&self, inputs: Vec<NamedTensor>, deadline: Instant) -> Result<PoolReply, PoolError> {
        self.infer_at(inputs, deadline, self.intake.default_priority()).await
    }

    /// Like [`infer`](Self::infer), at `priority` (1 most urgent, [`MAX_PRIORITY`](super::MAX_PRIORITY)
    /// least): queued ahead of less urgent requests, and admitted on what is as urgent or more.
    pub async fn infer_at(
        &self,
        inputs: Vec<NamedTensor>,
        deadline: Instant,
        priority: u8,
    ) -> Result<PoolReply, PoolError> {
        self.submit(inputs, deadline, None, priority).await.map_err(|refused| refused.error)
    }

    /// The priority of requests that name none.
    pub fn default_priority(&self) -> u8 {
        self.intake.default_priority()
    }

    /// Like [`infer`](Self::infer), counted in the load report (arrival at `arrived`, and the outcome):
    /// for callers that serve here only (the hub's QUIC service, shadow copies).
    pub async fn infer_counted(
        &self,
        inputs: Vec<NamedTensor>,
        arrived: Instant,
        deadline: Instant,
    ) -> Result<PoolReply, PoolError> {
        self.stats.arrival(arrived);
        let result = self.infer(inputs, deadline).await;
        let (outcome, finished) = match &result {
            Ok(reply) => (Outcome::Served, reply.finished),
            Err(e) => (Outcome::Rejected(e.kind()), Instant::now()),
        };
        self.stats.answer(arrived, finished, outcome);
        result
    }

    /// Like [`infer`](Self::infer), with a hub at hand: a request whose expected wait here is over the
    /// local target is turned away with [`PoolError::OverWaitTarget`], for the caller to offload. A
    /// request turned away at admission comes back with its inputs, so the caller need not keep a copy.
    pub async fn infer_with_hub(
        &self,
        inputs: Vec<NamedTensor>,
        deadline: Instant,
        hub: OffloadView,
        priority: u8,
    ) -> Result<PoolReply, Refused> {
        self.submit(inputs, deadline, Some(hub), priority).await
    }

    async fn submit(
        &self,
        inputs: Vec<NamedTensor>,
        deadline: Instant,
        hub: Option<OffloadView>,
        priority: u8,
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
            self.solo_keys.fetch_add(1, Ordering::Relaxed)
        };
        let (reply, rx) = oneshot::channel();
        let priority = priority.clamp(1, super::MAX_PRIORITY);
        let pending = Pending { inputs, rows, priority, shape_key, arrived, deadline, reply };
        let (wake, queued) = self.intake.submit(pending, hub);
        if wake {
            self.addr.do_send(Wake);
        }
        if let Err((error, refused)) = queued {
            // Turned away at the door: with a hub at hand, the inputs go back for it.
            let inputs = hub.map(|_| self.named(refused.inputs));
            return Err(Refused { error, inputs });
        }
        // The queue answers expired requests itself; this bound only guards against a pool that stopped.
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
        Err(Refused { error, inputs: None })
    }

    /// Inputs in graph order, named again.
    fn named(&self, inputs: Vec<Tensor>) -> Vec<NamedTensor> {
        self.metadata.name_inputs(inputs)
    }

    /// Where a request should go now: here, to a hub (when `hub` says one could answer in time), or nowhere.
    pub fn admission(
        &self,
        inputs: &[NamedTensor],
        deadline: Instant,
        hub: Option<OffloadView>,
        priority: u8,
    ) -> Admission {
        self.intake.admission(self.rows(inputs), deadline, hub, priority)
    }

    /// When a hub must answer a request sent to it first (offload mode `always`) for this pool to
    /// still serve it by `deadline` if the hub fails.
    pub fn hub_deadline(&self, inputs: &[NamedTensor], deadline: Instant, priority: u8) -> Instant {
        let now = Instant::now();
        now + self.intake.hub_budget(self.rows(inputs), deadline, priority)
    }

    /// Rows in a request: the leading size of its batched input (1 for a model that does not batch).
    fn rows(&self, inputs: &[NamedTensor]) -> usize {
        self.metadata
            .inputs
            .iter()
            .zip(inputs)
            .find(|(spec, _)| spec.has_dynamic_leading())
            .map(|(_, t)| t.tensor.batch_size())
            .unwrap_or(1)
    }

    /// Changes the replica count (without waiting for it).
    pub fn set_replicas(&self, n: usize) {
        self.addr.do_send(SetReplicas { target: n, done: None });
    }

    /// Changes the replica count and answers once exactly `n` replicas run (new ones loaded and warmed,
    /// retired ones gone after their batch), or with the reason a new replica failed to load.
    pub async fn resize(&self, n: usize) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        self.addr
            .send(SetReplicas { target: n, done: Some(done) })
            .await
            .map_err(|_| "the pool stopped".to_string())?;
        rx.await.map_err(|_| "the pool stopped".to_string())?
    }

    /// Stops the pool: what is still queued is answered `Stopped` (unload drains first), replicas leave.
    pub fn shutdown(&self) {
        self.addr.do_send(Stop);
    }

    /// The rolling load statistics.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// The pool's current state.
    pub async fn status(&self) -> Result<PoolStatus, PoolError> {
        self.addr.send(GetStatus).await.map_err(|_| PoolError::Stopped)
    }

    /// Replicas ready to serve now (without a round trip to the pool actor).
    pub fn ready_replicas(&self) -> usize {
        self.intake.counts().0
    }

    /// Whether it takes requests now: a replica is ready, or it is scaled to zero and a request wakes one.
    pub fn serving(&self) -> bool {
        self.intake.serving()
    }
}
