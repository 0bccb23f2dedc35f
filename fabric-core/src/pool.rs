//! The model actors: one [`ModelPool`] per loaded model version, and its [`Replica`]s.
//!
//! The pool is an actix actor owning a bounded queue. A request is admitted or refused at the door
//! ([`policy::admission`]), queued oldest first, and batched ([`policy::batching`]) onto an idle
//! replica. Each replica is a sync actor on its own thread that owns one engine; it joins the batch,
//! runs it and splits the outputs back, so the pool's own thread only moves requests around.
//!
//! Every request is answered exactly once: with outputs, with a refusal at admission, with "deadline
//! exceeded" when it can no longer make it, or with an error when its replica fails. A replica that
//! panics, or whose engine call runs past the watchdog, is replaced; its batch gets an error, never
//! silence. A replica that fails to load is retried with backoff, and the pool says so: its published
//! view carries the target and ready counts and the last load error.
//!
//! A model whose outputs are not all batch-major ([`ModelMetadata::is_batched`]) is served one request
//! per engine call: its outputs cannot be split by rows.

use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::engine::{Engine, EngineError};
use crate::metrics::Metrics;
use crate::model::{InputError, ModelMetadata};
use crate::policy::admission::{self, Admission, AdmissionInput, AdmissionSettings, OffloadView, PoolLoad, Rejection};
use crate::policy::batching::{self, BatchConfig, BatchDecision, Queued};
use crate::policy::service_time::ServiceTimes;
use crate::tensor::{NamedTensor, Tensor, TensorError};
use crate::wire::ErrorCode;

/// Builds a fresh engine for a new replica (called on a blocking thread).
pub type EngineFactory = Arc<dyn Fn() -> Result<Box<dyn Engine>, EngineError> + Send + Sync>;

/// Serving settings of one model version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Most rows per batch.
    pub max_batch_size: usize,
    /// Longest the oldest request waits for a batch to fill while other replicas are busy.
    pub max_queue_delay: Duration,
    /// Most requests waiting in the queue.
    pub queue_capacity: usize,
    /// Replicas (engine instances, one thread each).
    pub replicas: usize,
    /// Longest one engine call may run before its batch is failed and the replica replaced; `None`:
    /// 10x the measured time of that batch size, at least [`MIN_WATCHDOG`].
    pub watchdog: Option<Duration>,
    /// Latency-first admission settings.
    pub admission: AdmissionSettings,
    /// Most input bytes one warm-up batch may take (larger batch sizes are not measured).
    pub warmup_max_bytes: usize,
}

/// The shortest automatic watchdog: engine calls are timed on a shared machine, so tiny averages lie.
pub const MIN_WATCHDOG: Duration = Duration::from_secs(1);

/// First delay before retrying a replica that failed to load (doubles up to [`MAX_LOAD_RETRY`]).
const MIN_LOAD_RETRY: Duration = Duration::from_millis(200);
/// Longest delay between load retries.
const MAX_LOAD_RETRY: Duration = Duration::from_secs(30);

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_batch_size: 32,
            max_queue_delay: Duration::from_micros(500),
            queue_capacity: 1024,
            replicas: 1,
            watchdog: None,
            admission: AdmissionSettings::default(),
            warmup_max_bytes: 64 << 20,
        }
    }
}

/// A request the pool did not serve: why, and (when it was turned away at admission, with a hub at
/// hand) its inputs, to send elsewhere.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub error: PoolError,
    /// The inputs, when they came back.
    pub inputs: Option<Vec<NamedTensor>>,
}

impl From<InputError> for Refused {
    fn from(e: InputError) -> Self {
        Refused { error: PoolError::Input(e), inputs: None }
    }
}

/// A served request's result.
#[derive(Debug)]
pub struct PoolReply {
    /// Outputs in graph order.
    pub outputs: Vec<Tensor>,
    /// Rows in the batch this request ran in.
    pub batch_rows: usize,
}

/// Why a request got no outputs.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The inputs do not fit the model.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The queue is full.
    #[error("queue full: {capacity} requests are already waiting for this model; retry later or add replicas")]
    QueueFull { capacity: usize },
    /// Admission expects the request to finish after its deadline.
    #[error("deadline cannot be met: expected {:.1} ms in queue and compute, {:.1} ms left", expected.as_secs_f64() * 1e3, budget.as_secs_f64() * 1e3)]
    WouldMissDeadline { expected: Duration, budget: Duration },
    /// The deadline passed before the request could run.
    #[error("deadline exceeded after {:.1} ms (timeout {:.1} ms)", waited.as_secs_f64() * 1e3, timeout.as_secs_f64() * 1e3)]
    DeadlineExceeded { waited: Duration, timeout: Duration },
    /// No replica is loaded.
    #[error("model is not ready: no replica is loaded")]
    NotReady,
    /// With a hub at hand, the expected wait here is over the local target: the caller offloads it.
    #[error("expected wait of {:.1} ms is over the local target of {:.1} ms while a hub can take it", wait.as_secs_f64() * 1e3, target.as_secs_f64() * 1e3)]
    OverWaitTarget { wait: Duration, target: Duration },
    /// The pool's mailbox is full for a moment (a burst beyond the queue's intake).
    #[error("model pool is saturated: its intake is full; retry shortly")]
    Saturated,
    /// The replica running the batch failed (panicked, or ran past the watchdog).
    #[error("replica failed while running the batch: {0}")]
    ReplicaFailed(String),
    /// The engine refused the batch.
    #[error("engine error: {0}")]
    Engine(String),
    /// The pool has stopped (server shutting down).
    #[error("model pool stopped (server shutting down)")]
    Stopped,
}

impl PoolError {
    /// What the failure means to a client, whatever the transport: the wire's error code, from which
    /// the HTTP status is derived too (`http::status_of`), so the two cannot disagree.
    pub fn code(&self) -> ErrorCode {
        match self {
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

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PoolError::Input(_) => "invalid_input",
            PoolError::QueueFull { .. } => "queue_full",
            PoolError::WouldMissDeadline { .. } => "would_miss_deadline",
            PoolError::DeadlineExceeded { .. } => "deadline_exceeded",
            PoolError::NotReady => "not_ready",
            PoolError::Saturated => "saturated",
            PoolError::OverWaitTarget { .. } => "over_wait_target",
            PoolError::ReplicaFailed(_) => "replica_failed",
            PoolError::Engine(_) => "engine_error",
            PoolError::Stopped => "stopped",
        }
    }
}

type ReplyTx = oneshot::Sender<Result<PoolReply, PoolError>>;

/// A request for the pool: inputs already validated and in graph order.
struct Submit {
    inputs: Vec<Tensor>,
    /// A hub that could take the request instead: the pool then holds it to the local wait target.
    hub: Option<OffloadView>,
    /// Where to hand the inputs back if the request is turned away at admission.
    give_back: Option<oneshot::Sender<Vec<Tensor>>>,
    rows: usize,
    shape_key: u64,
    arrived: Instant,
    deadline: Instant,
    reply: ReplyTx,
}

impl Message for Submit {
    type Result = ();
}

/// Changes the number of replicas; in-flight batches finish on the replicas being retired.
pub struct SetReplicas(pub usize);

impl Message for SetReplicas {
    type Result = ();
}

/// Asks the pool for its current state.
pub struct GetStatus;

impl Message for GetStatus {
    type Result = PoolStatus;
}

/// A snapshot of a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolStatus {
    /// Replicas wanted.
    pub target: usize,
    /// Replicas able to take work.
    pub replicas: usize,
    /// Replicas running a batch.
    pub busy: usize,
    /// Replicas being loaded.
    pub loading: usize,
    /// Requests in the queue.
    pub queued: usize,
    /// Replicas replaced after a failure, since start.
    pub restarts: u64,
    /// Why the last replica load failed, while the pool is short of its target.
    pub last_error: Option<String>,
}

struct Pending {
    inputs: Vec<Tensor>,
    rows: usize,
    shape_key: u64,
    arrived: Instant,
    deadline: Instant,
    reply: ReplyTx,
}

impl Pending {
    fn queued(&self) -> Queued {
        Queued { rows: self.rows, enqueued: self.arrived, deadline: self.deadline, shape_key: self.shape_key }
    }

    fn answer(self, result: Result<PoolReply, PoolError>) {
        // The caller may have given up (its own timeout); nothing to do then.
        let _ = self.reply.send(result);
    }

    fn expire(self, now: Instant) {
        let waited = now.saturating_duration_since(self.arrived);
        let timeout = self.deadline.saturating_duration_since(self.arrived);
        self.answer(Err(PoolError::DeadlineExceeded { waited, timeout }));
    }
}

struct Slot {
    id: u64,
    addr: Addr<Replica>,
    busy: bool,
    retiring: bool,
}

/// The pool's state as callers see it, published after every change, for admission decisions
/// taken before a request reaches the pool (local, offload or refuse).
#[derive(Default)]
struct SharedView {
    queued_requests: AtomicUsize,
    queued_rows: AtomicUsize,
    replicas: AtomicUsize,
    loading: AtomicUsize,
    busy: AtomicUsize,
    batch_limit: AtomicUsize,
    service: Mutex<Option<ServiceTimes>>,
    /// Hands out unique batch keys for requests of models that cannot share a batch.
    next_solo_key: AtomicU64,
}

/// The actor that queues and batches requests for one model version.
pub struct ModelPool {
    label: (String, String),
    config: PoolConfig,
    batched: bool,
    /// Rows of the largest warm-up batch (and the service-time table's size).
    batch_cap: usize,
    factory: EngineFactory,
    /// Batch sizes to measure at warm-up (their inputs are made one at a time, then dropped).
    warmup: Arc<Warmup>,
    metrics: Metrics,
    queue: VecDeque<Pending>,
    queued_rows: usize,
    slots: Vec<Slot>,
    target_replicas: usize,
    loading: usize,
    restarts: u64,
    next_slot: u64,
    last_error: Option<String>,
    /// Batches dispatched since start (every so often one may grow past the preferred size).
    dispatched: u64,
    /// Delay before the next load retry, and when it may start.
    retry_backoff: Duration,
    retry_at: Option<Instant>,
    service: ServiceTimes,
    timer: Option<(Instant, SpawnHandle)>,
    view: Arc<SharedView>,
}

/// What callers hold: the pool's address and what is needed to validate requests before queueing.
#[derive(Clone)]
pub struct PoolHandle {
    addr: Addr<ModelPool>,
    metadata: Arc<ModelMetadata>,
    batched: bool,
    on_gpu: bool,
    max_batch_size: usize,
    queue_capacity: usize,
    admission: AdmissionSettings,
    view: Arc<SharedView>,
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
fn admission_input(
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

/// What a fresh replica runs before it serves: a batch of each size, to time them.
struct Warmup {
    metadata: Arc<ModelMetadata>,
    sizes: Vec<usize>,
}

/// The batch sizes to warm up: powers of two up to `cap` and `cap` itself, skipping those whose inputs
/// would take more than `budget` bytes (1 row always runs). An edge device may have 1 GB in all: a
/// model with a 4 MB input must not allocate 32 rows of it just to be timed.
pub fn warmup_sizes(cap: usize, bytes_per_row: usize, budget: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> =
        std::iter::successors(Some(1usize), |n| n.checked_mul(2)).take_while(|&n| n < cap).collect();
    sizes.push(cap.max(1));
    sizes.retain(|&n| n == 1 || n.saturating_mul(bytes_per_row) <= budget);
    sizes
}

/// Input bytes of one row (dynamic dimensions other than the batch counted as 1).
fn bytes_per_row(metadata: &ModelMetadata) -> usize {
    metadata
        .inputs
        .iter()
        .map(|spec| {
            let inner: usize = spec.inner_dims().iter().map(|&d| usize::try_from(d).unwrap_or(1)).product();
            let outer = if spec.has_dynamic_leading() {
                1
            } else {
                spec.shape.first().map_or(1, |&d| usize::try_from(d).unwrap_or(1))
            };
            outer.saturating_mul(inner).saturating_mul(spec.datatype.size().unwrap_or(1))
        })
        .sum()
}

/// Zero-filled inputs of batch size `rows` (dynamic dims other than the batch set to 1), for warm-up.
fn warmup_inputs(metadata: &ModelMetadata, rows: usize) -> Result<Vec<Tensor>, TensorError> {
    metadata
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec
                .shape
                .iter()
                .enumerate()
                .map(|(axis, &d)| {
                    if d >= 0 {
                        d as usize
                    } else if axis == 0 {
                        rows
                    } else {
                        1
                    }
                })
                .collect();
            let bytes = shape.iter().product::<usize>() * spec.datatype.size().unwrap_or(1);
            Tensor::from_bytes(spec.datatype, shape, vec![0; bytes])
        })
        .collect()
}

/// Runs the warm-up batches on a fresh engine; returns it with the measured (rows, time) pairs.
fn warm(mut engine: Box<dyn Engine>, warmup: &Warmup) -> (Box<dyn Engine>, Vec<(usize, Duration)>) {
    let mut timings = Vec::new();
    for &rows in &warmup.sizes {
        let Ok(inputs) = warmup_inputs(&warmup.metadata, rows) else { continue };
        let refs: Vec<&Tensor> = inputs.iter().collect();
        // The first run pays one-off allocation costs; time the second.
        if engine.run_ordered(&refs).is_err() {
            continue;
        }
        let start = Instant::now();
        if engine.run_ordered(&refs).is_ok() {
            timings.push((rows, start.elapsed()));
        }
    }
    (engine, timings)
}

impl ModelPool {
    /// Loads the first replica (so load errors surface here), warms it, and starts the pool.
    ///
    /// Further replicas load in the background; the pool serves as soon as one is up.
    pub async fn start(
        model: &str,
        version: &str,
        factory: EngineFactory,
        config: PoolConfig,
        metrics: Metrics,
    ) -> Result<PoolHandle, EngineError> {
        let first = {
            let factory = factory.clone();
            actix_rt::task::spawn_blocking(move || factory())
                .await
                .map_err(|e| EngineError::Thread { what: "loader", reason: e.to_string() })??
        };
        let metadata = Arc::new(first.metadata().clone());
        let batched = metadata.is_batched();
        let on_gpu = first.on_gpu();
        let max_batch_size = config.max_batch_size.max(1);
        // Powers of two up to the limit, so the pool learns which batch size serves rows fastest; one
        // request at a time for a model that cannot batch.
        let batch_cap = if batched { max_batch_size } else { 1 };
        let sizes = warmup_sizes(batch_cap, bytes_per_row(&metadata), config.warmup_max_bytes);
        let warmup = Arc::new(Warmup { metadata: metadata.clone(), sizes });
        let config = PoolConfig { max_batch_size, ..config };
        let view = Arc::new(SharedView::default());
        let (queue_capacity, admission) = (config.queue_capacity, config.admission);
        let target = config.replicas.max(1);
        let pool = ModelPool {
            label: (model.to_string(), version.to_string()),
            service: ServiceTimes::new(max_batch_size),
            config,
            batched,
            batch_cap,
            factory,
            warmup,
            metrics,
            queue: VecDeque::new(),
            queued_rows: 0,
            slots: Vec::new(),
            target_replicas: target,
            loading: 0,
            restarts: 0,
            next_slot: 0,
            last_error: None,
            dispatched: 0,
            retry_backoff: MIN_LOAD_RETRY,
            retry_at: None,
            timer: None,
            view: view.clone(),
        };
        // The first replica is warmed before the pool takes requests, so "ready" means ready.
        let warmup = pool.warmup.clone();
        let (first, timings) = actix_rt::task::spawn_blocking(move || warm(first, &warmup))
            .await
            .map_err(|e| EngineError::Thread { what: "warm-up", reason: e.to_string() })?;
        let addr = ModelPool::create(move |ctx| {
            let mut pool = pool;
            for (rows, took) in timings {
                pool.record_service(rows, took);
            }
            pool.add_replica(first, ctx);
            pool.converge(ctx);
            pool
        });
        Ok(PoolHandle { addr, metadata, batched, on_gpu, max_batch_size, queue_capacity, admission, view })
    }

    fn labels(&self) -> [&str; 2] {
        [&self.label.0, &self.label.1]
    }

    /// Runs the warm-up batches on a fresh engine (seeding the service-time table), then adds it.
    fn warm_and_add(&mut self, engine: Box<dyn Engine>, ctx: &mut Context<Self>) {
        let warmup = self.warmup.clone();
        self.loading += 1;
        let fut = actix_rt::task::spawn_blocking(move || warm(engine, &warmup));
        ctx.spawn(fut.into_actor(self).map(|result, pool, ctx| {
            pool.loading -= 1;
            match result {
                Ok((engine, timings)) => {
                    for (rows, took) in timings {
                        pool.record_service(rows, took);
                    }
                    pool.add_replica(engine, ctx);
                }
                Err(e) => pool.load_failed(format!("the warm-up thread failed: {e}"), ctx),
            }
            pool.converge(ctx);
        }));
    }

    fn add_replica(&mut self, engine: Box<dyn Engine>, ctx: &mut Context<Self>) {
        // A load worked: the next failure starts its backoff afresh.
        self.retry_backoff = MIN_LOAD_RETRY;
        if self.slots.iter().filter(|s| !s.retiring).count() >= self.target_replicas {
            return; // scaled down while this one loaded
        }
        self.last_error = None;
        let cell = Mutex::new(Some(engine));
        let addr = SyncArbiter::start(1, move || Replica { engine: cell.lock().ok().and_then(|mut e| e.take()) });
        self.next_slot += 1;
        self.slots.push(Slot { id: self.next_slot, addr, busy: false, retiring: false });
        self.publish_gauges();
        tracing::info!(model = %self.label.0, version = %self.label.1, replicas = self.active_replicas(), "replica ready");
        self.schedule(ctx);
    }

    fn active_replicas(&self) -> usize {
        self.slots.iter().filter(|s| !s.retiring).count()
    }

    /// Starts loads or retires replicas until the count matches the target. After a failed load, new
    /// loads wait for the retry time (backoff doubling up to [`MAX_LOAD_RETRY`]).
    fn converge(&mut self, ctx: &mut Context<Self>) {
        let active = self.active_replicas();
        if active + self.loading < self.target_replicas {
            if let Some(at) = self.retry_at {
                let now = Instant::now();
                if now < at {
                    return; // a retry is scheduled for `at`
                }
                self.retry_at = None;
            }
            for _ in 0..(self.target_replicas - active - self.loading) {
                let factory = self.factory.clone();
                self.loading += 1;
                let fut = actix_rt::task::spawn_blocking(move || catch_unwind(AssertUnwindSafe(|| factory())));
                ctx.spawn(fut.into_actor(self).map(|result, pool, ctx| {
                    pool.loading -= 1;
                    let failure = match result {
                        Ok(Ok(Ok(engine))) => {
                            pool.warm_and_add(engine, ctx);
                            None
                        }
                        Ok(Ok(Err(e))) => Some(e.to_string()),
                        Ok(Err(panic)) => Some(format!("the loader panicked: {}", panic_message(&*panic))),
                        Err(e) => Some(format!("the loader thread failed: {e}")),
                    };
                    if let Some(reason) = failure {
                        pool.load_failed(reason, ctx);
                    }
                    pool.publish_gauges();
                }));
            }
        } else if active > self.target_replicas {
            let mut surplus = active - self.target_replicas;
            // Idle ones go first; busy ones finish their batch and then go.
            for idle_first in [true, false] {
                for slot in self.slots.iter_mut().filter(|s| !s.retiring && s.busy != idle_first) {
                    if surplus == 0 {
                        break;
                    }
                    slot.retiring = true;
                    surplus -= 1;
                }
            }
            self.slots.retain(|s| !(s.retiring && !s.busy));
        }
        self.publish_gauges();
    }

    /// Records a failed load and schedules the retry.
    fn load_failed(&mut self, reason: String, ctx: &mut Context<Self>) {
        let delay = self.retry_backoff;
        tracing::error!(model = %self.label.0, version = %self.label.1, retry_ms = delay.as_millis() as u64,
            "replica failed to load, retrying: {reason}");
        self.last_error = Some(reason);
        self.retry_backoff = (delay * 2).min(MAX_LOAD_RETRY);
        self.retry_at = Some(Instant::now() + delay);
        ctx.run_later(delay, |pool, ctx| {
            pool.retry_at = None;
            pool.converge(ctx);
            pool.schedule(ctx);
        });
    }

    fn publish_gauges(&self) {
        self.metrics.replicas.with_label_values(&self.labels()).set(self.active_replicas() as i64);
        self.metrics.queue_depth.with_label_values(&self.labels()).set(self.queue.len() as i64);
        let v = &self.view;
        v.queued_requests.store(self.queue.len(), Ordering::Relaxed);
        v.queued_rows.store(self.queued_rows, Ordering::Relaxed);
        v.replicas.store(self.active_replicas(), Ordering::Relaxed);
        v.loading.store(self.loading, Ordering::Relaxed);
        v.busy.store(self.slots.iter().filter(|s| s.busy).count(), Ordering::Relaxed);
        v.batch_limit.store(self.batch_limit(), Ordering::Relaxed);
    }

    /// Records a batch time and shares the updated table with callers.
    fn record_service(&mut self, rows: usize, took: Duration) {
        self.service.record(rows, took);
        if let Ok(mut shared) = self.view.service.lock() {
            *shared = Some(self.service.clone());
        }
    }

    /// Rows per batch: the measured most efficient size, within the configured limit.
    fn batch_limit(&self) -> usize {
        self.service.preferred_batch().min(self.batch_cap.max(1))
    }

    fn expected_run(&self, rows: usize) -> Option<Duration> {
        self.service.estimate(rows)
    }

    /// Answers queued requests that can no longer make their deadline, or whose caller left.
    fn expire(&mut self, now: Instant) {
        if self.queue.iter().all(|p| !p.reply.is_closed() && !batching::is_hopeless(&p.queued(), now, None)) {
            return;
        }
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for p in std::mem::take(&mut self.queue) {
            if p.reply.is_closed() {
                self.take_rows(p.rows);
            } else if batching::is_hopeless(&p.queued(), now, None) {
                self.take_rows(p.rows);
                self.metrics.requests.with_label_values(&[&self.label.0, &self.label.1, "deadline_exceeded"]).inc();
                p.expire(now);
            } else {
                kept.push_back(p);
            }
        }
        self.queue = kept;
    }

    /// Takes rows off the queued-rows counter; a mismatch is a bug, logged rather than wrapped around.
    fn take_rows(&mut self, rows: usize) {
        match self.queued_rows.checked_sub(rows) {
            Some(left) => self.queued_rows = left,
            None => {
                tracing::error!(model = %self.label.0, queued = self.queued_rows, rows, "queued-rows counter underflow; reset");
                self.queued_rows = 0;
            }
        }
    }

    /// Hands batches to idle replicas while the batching policy says so.
    fn schedule(&mut self, ctx: &mut Context<Self>) {
        loop {
            let now = Instant::now();
            self.expire(now);
            let idle = self.slots.iter().filter(|s| !s.busy && !s.retiring).count();
            let busy = self.slots.iter().filter(|s| s.busy).count();
            let batch = self.service.limit_for_dispatch(self.dispatched, self.batch_cap);
            let head: Vec<Queued> = self.queue.iter().take(batch + 1).map(Pending::queued).collect();
            let config = BatchConfig { max_batch_size: batch, max_queue_delay: self.config.max_queue_delay };
            match batching::decide(&head, now, &config, idle, busy, |rows| self.expected_run(rows)) {
                BatchDecision::Dispatch { requests, rows } => self.dispatch(requests, rows, ctx),
                BatchDecision::WaitUntil(at) => {
                    if self.timer.is_none_or(|(t, _)| at < t) {
                        if let Some((_, handle)) = self.timer.take() {
                            ctx.cancel_future(handle);
                        }
                        let handle = ctx.run_later(at.saturating_duration_since(now), |pool, ctx| {
                            pool.timer = None;
                            pool.schedule(ctx);
                        });
                        self.timer = Some((at, handle));
                    }
                    break;
                }
                BatchDecision::Idle => break,
            }
        }
        self.publish_gauges();
    }

    fn dispatch(&mut self, requests: usize, rows: usize, ctx: &mut Context<Self>) {
        let Some(slot) = self.slots.iter_mut().find(|s| !s.busy && !s.retiring) else {
            return;
        };
        slot.busy = true;
        self.dispatched += 1;
        let (slot_id, addr) = (slot.id, slot.addr.clone());
        let batch: Vec<Pending> = self.queue.drain(..requests).collect();
        self.take_rows(rows);
        let now = Instant::now();
        for p in &batch {
            self.metrics.queue_duration.with_label_values(&self.labels()).observe((now - p.arrived).as_secs_f64());
        }
        self.metrics.batch_size.with_label_values(&self.labels()).observe(rows as f64);
        let (inputs, replies): (Vec<Vec<Tensor>>, Vec<Pending>) =
            batch.into_iter().map(|mut p| (std::mem::take(&mut p.inputs), p)).unzip();
        let watchdog = self.watchdog(rows);
        let fut = tokio::time::timeout(watchdog, addr.send(RunBatch { requests: inputs }));
        ctx.spawn(fut.into_actor(self).map(move |result, pool, ctx| {
            let result = match result {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(e)) => Err(ReplicaFailure::Panicked(format!("replica thread is gone: {e}"))),
                // The engine thread cannot be interrupted: it is abandoned (it exits when the call returns)
                // and replaced, and its batch answered now.
                Err(_) => Err(ReplicaFailure::Panicked(format!(
                    "the engine call ran past the {} ms watchdog; replica replaced",
                    watchdog.as_millis()
                ))),
            };
            pool.finish(slot_id, rows, replies, result, ctx);
        }));
    }

    /// How long an engine call on `rows` rows may run.
    fn watchdog(&self, rows: usize) -> Duration {
        self.config.watchdog.unwrap_or_else(|| {
            self.expected_run(rows).map(|t| t.saturating_mul(10)).unwrap_or_default().max(MIN_WATCHDOG)
        })
    }

    fn finish(
        &mut self,
        slot_id: u64,
        rows: usize,
        replies: Vec<Pending>,
        result: Result<BatchOutput, ReplicaFailure>,
        ctx: &mut Context<Self>,
    ) {
        let mut replace = false;
        match result {
            Ok(BatchOutput { per_request, took }) => {
                self.record_service(rows, took);
                self.metrics.compute_duration.with_label_values(&self.labels()).observe(took.as_secs_f64());
                for (p, outputs) in replies.into_iter().zip(per_request) {
                    p.answer(Ok(PoolReply { outputs, batch_rows: rows }));
                }
            }
            Err(failure) => {
                let error = |f: &ReplicaFailure| match f {
                    ReplicaFailure::Engine(msg) => PoolError::Engine(msg.clone()),
                    ReplicaFailure::Panicked(msg) => PoolError::ReplicaFailed(msg.clone()),
                };
                if let ReplicaFailure::Panicked(msg) = &failure {
                    tracing::error!(model = %self.label.0, version = %self.label.1, "replica panicked, replacing it: {msg}");
                    replace = true;
                }
                for p in replies {
                    p.answer(Err(error(&failure)));
                }
            }
        }
        if let Some(i) = self.slots.iter().position(|s| s.id == slot_id) {
            if replace || self.slots[i].retiring {
                self.slots.remove(i);
            } else {
                self.slots[i].busy = false;
            }
        }
        if replace {
            self.restarts += 1;
            self.converge(ctx);
        }
        self.schedule(ctx);
    }
}

impl Actor for ModelPool {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Requests wait in our own queue; the mailbox only needs to absorb bursts between turns.
        ctx.set_mailbox_capacity(self.config.queue_capacity.max(16) * 4);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        for p in self.queue.drain(..) {
            p.answer(Err(PoolError::Stopped));
        }
    }
}

impl Handler<Submit> for ModelPool {
    type Result = ();

    fn handle(&mut self, msg: Submit, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let load = PoolLoad {
            queued_requests: self.queue.len(),
            queued_rows: self.queued_rows,
            replicas: self.active_replicas(),
            busy_replicas: self.slots.iter().filter(|s| s.busy).count(),
            // While a replacement loads, queue rather than refuse: it will serve them (or they expire).
            // A retry waiting out its backoff is not loading: refuse at once rather than at the deadline.
            loading: self.loading,
        };
        let input = admission_input(
            self.batched,
            msg.rows,
            msg.deadline.saturating_duration_since(now),
            self.config.queue_capacity,
            self.batch_limit(),
            load,
            self.config.admission,
        );
        let mut decision = admission::admit(&input, |rows| self.expected_run(rows));
        if decision == Admission::Local
            && msg.hub.is_some()
            && admission::admit_or_offload(&input, |rows| self.expected_run(rows), msg.hub) == Admission::Offload
        {
            decision = Admission::Offload;
        }
        match decision {
            Admission::Local => {
                self.queued_rows += msg.rows;
                self.queue.push_back(Pending {
                    inputs: msg.inputs,
                    rows: msg.rows,
                    shape_key: msg.shape_key,
                    arrived: msg.arrived,
                    deadline: msg.deadline,
                    reply: msg.reply,
                });
                self.schedule(ctx);
            }
            // Over the local wait target with a hub at hand: the caller sends it there.
            Admission::Offload => {
                let wait = admission::expected_times(&input, |rows| self.expected_run(rows)).map(|(w, _)| w);
                let target = input.budget.saturating_mul(input.settings.local_wait_pct.min(100)) / 100;
                if let Some(give_back) = msg.give_back {
                    let _ = give_back.send(msg.inputs);
                }
                let _ = msg.reply.send(Err(PoolError::OverWaitTarget { wait: wait.unwrap_or_default(), target }));
            }
            Admission::Reject(why) => {
                let error = match why {
                    Rejection::QueueFull { capacity } => PoolError::QueueFull { capacity },
                    Rejection::WouldMissDeadline { expected, budget } => {
                        PoolError::WouldMissDeadline { expected, budget }
                    }
                    Rejection::NoReplicas => PoolError::NotReady,
                };
                if let Some(give_back) = msg.give_back {
                    let _ = give_back.send(msg.inputs);
                }
                let _ = msg.reply.send(Err(error));
            }
        }
    }
}

impl Handler<SetReplicas> for ModelPool {
    type Result = ();

    fn handle(&mut self, msg: SetReplicas, ctx: &mut Context<Self>) {
        self.target_replicas = msg.0;
        self.converge(ctx);
        self.schedule(ctx);
    }
}

impl Handler<GetStatus> for ModelPool {
    type Result = MessageResult<GetStatus>;

    fn handle(&mut self, _msg: GetStatus, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(PoolStatus {
            target: self.target_replicas,
            replicas: self.active_replicas(),
            busy: self.slots.iter().filter(|s| s.busy).count(),
            loading: self.loading,
            queued: self.queue.len(),
            restarts: self.restarts,
            last_error: self.last_error.clone(),
        })
    }
}

/// One engine on its own thread.
pub struct Replica {
    engine: Option<Box<dyn Engine>>,
}

impl Actor for Replica {
    type Context = SyncContext<Self>;
}

/// Requests of one batch, each with its inputs in graph order.
struct RunBatch {
    requests: Vec<Vec<Tensor>>,
}

/// Outputs per request, and how long the engine took.
struct BatchOutput {
    per_request: Vec<Vec<Tensor>>,
    took: Duration,
}

/// How a batch failed.
enum ReplicaFailure {
    /// The engine returned an error (the replica is fine).
    Engine(String),
    /// The engine panicked (the replica is replaced).
    Panicked(String),
}

impl Message for RunBatch {
    type Result = Result<BatchOutput, ReplicaFailure>;
}

/// Joins the requests into one batch, runs it, and splits the outputs back per request.
fn run_batch(engine: &mut dyn Engine, requests: &[Vec<Tensor>]) -> Result<Vec<Vec<Tensor>>, EngineError> {
    if let [single] = requests {
        let refs: Vec<&Tensor> = single.iter().collect();
        return Ok(vec![engine.run_ordered(&refs)?]);
    }
    let inputs = requests.first().map(Vec::len).unwrap_or(0);
    let joined = (0..inputs)
        .map(|i| Tensor::concat_batch(&requests.iter().map(|r| &r[i]).collect::<Vec<_>>()))
        .collect::<Result<Vec<_>, _>>()?;
    let rows: Vec<usize> = requests.iter().map(|r| r.first().map(Tensor::batch_size).unwrap_or(1)).collect();
    let outputs = engine.run_ordered(&joined.iter().collect::<Vec<_>>())?;
    let mut per_request: Vec<Vec<Tensor>> = vec![Vec::with_capacity(outputs.len()); requests.len()];
    for output in outputs {
        for (slot, part) in per_request.iter_mut().zip(output.split_batch(&rows)?) {
            slot.push(part);
        }
    }
    Ok(per_request)
}

impl Handler<RunBatch> for Replica {
    type Result = Result<BatchOutput, ReplicaFailure>;

    fn handle(&mut self, msg: RunBatch, _ctx: &mut SyncContext<Self>) -> Self::Result {
        let Some(engine) = self.engine.as_mut() else {
            return Err(ReplicaFailure::Panicked("replica has no engine".into()));
        };
        let start = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| run_batch(engine.as_mut(), &msg.requests))) {
            Ok(Ok(per_request)) => Ok(BatchOutput { per_request, took: start.elapsed() }),
            Ok(Err(e)) => Err(ReplicaFailure::Engine(e.to_string())),
            Err(panic) => {
                self.engine = None;
                Err(ReplicaFailure::Panicked(panic_message(&*panic)))
            }
        }
    }
}

/// The message a panic carried.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_sizes_table() {
        const MIB: usize = 1 << 20;
        #[rustfmt::skip]
        let cases: Vec<(&str, usize, usize, usize, Vec<usize>)> = vec![
            ("small rows: all powers of two and the cap", 32, 3136, 64 * MIB, vec![1, 2, 4, 8, 16, 32]),
            ("a cap that is no power of two", 12, 100, 64 * MIB, vec![1, 2, 4, 8, 12]),
            ("4 MiB rows: within 64 MiB only", 32, 4 * MIB, 64 * MIB, vec![1, 2, 4, 8, 16]),
            ("rows over the budget: 1 row still runs", 32, 128 * MIB, 64 * MIB, vec![1]),
            ("unbatched", 1, 3136, 64 * MIB, vec![1]),
        ];
        for (label, cap, row, budget, want) in cases {
            assert_eq!(warmup_sizes(cap, row, budget), want, "{label}");
        }
    }
}
