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
//!
//! Layout: this module holds the settings, errors and status, and the actor's state and messages;
//! [`handle`] is what callers hold ([`PoolHandle`]: submit, admission on the published view, status); [`scheduler`] queues, expires and dispatches batches;
//! [`supervisor`] loads, retries, retires and replaces replicas (and times engine calls with the
//! watchdog); [`replica`] is the engine thread; [`batch`] joins requests into one batch and splits
//! the outputs back (pure); [`warmup`] times batch sizes on a fresh engine.

mod batch;
mod handle;
mod replica;
mod scheduler;
mod supervisor;
mod warmup;

pub use handle::PoolHandle;
pub use warmup::warmup_sizes;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use self::replica::Replica;
use self::warmup::{bytes_per_row, warm, Warmup};
use crate::engine::{Engine, EngineError};
use crate::metrics::Metrics;
use crate::model::InputError;
use crate::policy::admission::{AdmissionSettings, OffloadView};
use crate::policy::batching::Queued;
use crate::policy::service_time::ServiceTimes;
use crate::tensor::{NamedTensor, Tensor};
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
