//! The model actors: one [`ModelPool`] per loaded model version, and its [`Replica`]s.
//!
//! A request is admitted or refused at the door ([`policy::admission`]) by its caller, under the
//! queue's lock, queued oldest first, and taken in batches ([`policy::batching`]) by idle replicas:
//! threads that each own one engine, join the batch, run it, split the outputs back and answer every
//! request themselves. No actor sits on that path (one wake-up per batch for the replica, one per
//! request for its answer); the pool actor supervises: it loads, retires and replaces replicas, and
//! runs the watchdog.
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
//! [`handle`] is what callers hold ([`PoolHandle`]: submit, admission, status); [`queue`] is the
//! shared queue (admission, batch taking, expiry, the watchdog's check); [`supervisor`] loads,
//! retries, retires and replaces replicas; [`replica`] is the engine thread; [`batch`] joins requests
//! into one batch and splits the outputs back (pure); [`warmup`] times batch sizes on a fresh engine;
//! [`gpu_place`] measures a version on a GPU (memory per replica, replicas worth running).

mod batch;
mod gpu_place;
mod handle;
mod queue;
mod replica;
mod supervisor;
mod warmup;

pub use gpu_place::{measure_streams, GpuPlacement, MAX_STREAMS};
pub use handle::PoolHandle;
pub(crate) use queue::PRIORITY_LABELS;
pub use warmup::{race, warmup_sizes, warmup_sizes_for};

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use self::queue::Intake;
use self::warmup::{warm, Warmup};
use crate::config::ModelConfig;
use crate::load_report::LoadStats;
use crate::metrics::Metrics;
use fabric_engine::model::InputError;
use fabric_engine::{Engine, EngineError};
use fabric_policy::admission::{AdmissionSettings, Rejection};
use fabric_policy::batching::Queued;
use fabric_policy::service_time::ServiceTimes;
use fabric_proto::wire::ErrorCode;
use fabric_types::tensor::{NamedTensor, Tensor};

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
    /// The priority of requests that name none (1 most urgent, 9 least).
    pub default_priority: u8,
}

/// The shortest automatic watchdog: engine calls are timed on a shared machine, so tiny averages lie.
pub const MIN_WATCHDOG: Duration = Duration::from_secs(1);

/// First delay before retrying a replica that failed to load (doubles up to [`MAX_LOAD_RETRY`]).
const MIN_LOAD_RETRY: Duration = Duration::from_millis(200);
/// Longest delay between load retries.
const MAX_LOAD_RETRY: Duration = Duration::from_secs(30);

impl PoolConfig {
    /// The pool settings a model's configuration describes.
    pub fn of(model: &ModelConfig) -> PoolConfig {
        PoolConfig {
            max_batch_size: model.max_batch_size.max(1),
            max_queue_delay: Duration::from_micros(model.max_queue_delay_us),
            queue_capacity: model.queue_capacity.max(1),
            replicas: model.replicas.max(1),
            watchdog: (model.watchdog_ms > 0).then(|| Duration::from_millis(model.watchdog_ms)),
            admission: AdmissionSettings {
                local_wait_pct: model.local_wait_pct,
                margin_pct: model.deadline_margin_pct,
                queue_wait_pct: model.queue_wait_pct,
            },
            warmup_max_bytes: model.warmup_max_bytes,
            default_priority: model.default_priority.clamp(1, MAX_PRIORITY),
        }
    }
}

/// The least urgent priority (1 is the most): requests are served, and admitted, most urgent first.
pub const MAX_PRIORITY: u8 = 9;

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
            default_priority: 5,
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
    /// When the replica answered (before the caller's thread woke up to it).
    pub finished: Instant,
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
    /// No replica is ready (scaled to zero, or loading) and one cannot be ready before the deadline.
    #[error("no replica is ready (scaled to zero or loading) and one takes about {:.0} ms to be ready, but only {:.0} ms are left before the deadline: retry with a longer timeout, or keep a replica (autoscale.idle_to_zero_s = 0)", expected.as_secs_f64() * 1e3, budget.as_secs_f64() * 1e3)]
    ColdStart { expected: Duration, budget: Duration },
    /// With a hub at hand, the expected wait here is over the local target: the caller offloads it.
    #[error("expected wait of {:.1} ms is over the local target of {:.1} ms while a hub can take it", wait.as_secs_f64() * 1e3, target.as_secs_f64() * 1e3)]
    OverWaitTarget { wait: Duration, target: Duration },
    /// No hub, and the expected queueing delay is over the target: the node is saturated.
    #[error("the node is saturated: the expected queueing wait of {:.1} ms is over the target of {:.1} ms (model_defaults.queue_wait_pct of the deadline); retry later, or add replicas or a hub", wait.as_secs_f64() * 1e3, target.as_secs_f64() * 1e3)]
    OverQueueTarget { wait: Duration, target: Duration },
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
            | PoolError::ColdStart { .. }
            | PoolError::OverWaitTarget { .. }
            | PoolError::OverQueueTarget { .. }
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
            PoolError::ColdStart { .. } => "cold_start",
            PoolError::OverWaitTarget { .. } => "over_wait_target",
            PoolError::OverQueueTarget { .. } => "over_queue_target",
            PoolError::ReplicaFailed(_) => "replica_failed",
            PoolError::Engine(_) => "engine_error",
            PoolError::Stopped => "stopped",
        }
    }
}

impl From<Rejection> for PoolError {
    fn from(why: Rejection) -> Self {
        match why {
            Rejection::QueueFull { capacity } => PoolError::QueueFull { capacity },
            Rejection::WouldMissDeadline { expected, budget } => PoolError::WouldMissDeadline { expected, budget },
            Rejection::NoReplicas => PoolError::NotReady,
            Rejection::ColdStart { expected, budget } => PoolError::ColdStart { expected, budget },
            Rejection::OverQueueTarget { wait, target } => PoolError::OverQueueTarget { wait, target },
        }
    }
}

type ReplyTx = oneshot::Sender<Result<PoolReply, PoolError>>;

/// A replica's engine panicked (its thread has ended; its batch was answered).
struct ReplicaGone {
    reason: String,
}

impl Message for ReplicaGone {
    type Result = ();
}

/// Changes the number of replicas; in-flight batches finish on the replicas being retired. `done`
/// (when given) is answered once the pool has exactly that many replicas running, or with the reason
/// a replica failed to load.
pub struct SetReplicas {
    /// Replicas wanted.
    pub target: usize,
    /// Told when the change has converged.
    pub done: Option<oneshot::Sender<Result<(), String>>>,
}

impl Message for SetReplicas {
    type Result = ();
}

/// A request arrived while the pool is scaled to zero: load a replica (unless one was wanted meanwhile).
pub struct Wake;

impl Message for Wake {
    type Result = ();
}

/// Stops the pool: queued requests are answered `Stopped`, replicas leave after their batch.
pub struct Stop;

impl Message for Stop {
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
    /// The last measured time to load and warm a replica (what a request waits after scale to zero).
    pub cold_start: Option<Duration>,
}

struct Pending {
    inputs: Vec<Tensor>,
    rows: usize,
    /// 1 (most urgent) to [`MAX_PRIORITY`]: queued behind every request as urgent or more, ahead of
    /// every less urgent one.
    priority: u8,
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

/// The actor that supervises one model version's replicas (the queue is [`Intake`], shared).
pub struct ModelPool {
    label: (String, String),
    factory: EngineFactory,
    /// Batch sizes to measure at warm-up (their inputs are made one at a time, then dropped).
    warmup: Arc<Warmup>,
    metrics: Metrics,
    intake: Arc<Intake>,
    target_replicas: usize,
    loading: usize,
    restarts: u64,
    next_replica: u64,
    last_error: Option<String>,
    /// Delay before the next load retry, and when it may start.
    retry_backoff: Duration,
    retry_at: Option<Instant>,
    /// Resizes waiting for the replica count to reach the target.
    resize_waiters: Vec<oneshot::Sender<Result<(), String>>>,
    /// When replicas panicked recently (within [`CRASH_WINDOW`]): a crash loop is replaced with backoff.
    crashes: std::collections::VecDeque<Instant>,
}

/// How far back replica panics count towards a crash loop.
const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// Panics within [`CRASH_WINDOW`] that make a crash loop (replacements then back off like failed loads).
const CRASH_LOOP: usize = 3;

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
        let load_started = Instant::now();
        // With the load, on its blocking thread: this process's GPU memory just before it, so the
        // replica's share can be measured (asked of nvidia-smi only on a machine with a GPU).
        let (first, gpu_memory_before) = {
            let factory = factory.clone();
            actix_rt::task::spawn_blocking(move || {
                let before = fabric_engine::gpu::this_process_memory_mib();
                factory().map(|engine| (engine, before))
            })
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
        let sizes = warmup_sizes_for(&metadata, max_batch_size, config.warmup_max_bytes);
        let warmup = Arc::new(Warmup { metadata: metadata.clone(), sizes });
        let config = PoolConfig { max_batch_size, ..config };
        let label = (model.to_string(), version.to_string());
        // The first replica is warmed before the pool takes requests, so "ready" means ready.
        let warmup_first = warmup.clone();
        let (first, timings) = actix_rt::task::spawn_blocking(move || warm(first, &warmup_first))
            .await
            .map_err(|e| EngineError::Thread { what: "warm-up", reason: e.to_string() })?;
        // On a GPU: the memory a replica holds, whether it fits, and how many replicas pay off.
        let (first, gpu) = if on_gpu {
            let (factory, warmup) = (factory.clone(), warmup.clone());
            let (first, placed) = actix_rt::task::spawn_blocking(move || {
                let mut first = first;
                let placed = gpu_place::place(&mut first, &factory, &warmup, gpu_memory_before);
                (first, placed)
            })
            .await
            .map_err(|e| EngineError::Thread { what: "GPU placement", reason: e.to_string() })?;
            (first, Some(placed?))
        } else {
            (first, None)
        };
        let mut service = ServiceTimes::new(max_batch_size);
        for (rows, took) in timings {
            service.record(rows, took);
        }
        // Loaded once even for a target of 0 (the metadata and the cold-start time come from it; the
        // engine is then dropped: the pool starts scaled to zero).
        if let Some(placed) = &gpu {
            let labels = [model, version];
            metrics.gpu_memory.with_label_values(&labels).set(i64::try_from(placed.memory_mib).unwrap_or(i64::MAX));
            metrics.replicas_per_gpu.with_label_values(&labels).set(placed.replicas_per_gpu as i64);
        }
        let target = match &gpu {
            Some(placed) if config.replicas > placed.replicas_per_gpu => {
                tracing::warn!(
                    model,
                    version,
                    configured = config.replicas,
                    per_gpu = placed.replicas_per_gpu,
                    "fewer replicas than configured: more do not pay off on this GPU (measured at load)"
                );
                placed.replicas_per_gpu
            }
            _ => config.replicas,
        };
        let stats = Arc::new(LoadStats::default());
        let intake =
            Arc::new(Intake::new(config, batched, batch_cap, service, label.clone(), metrics.clone(), stats.clone()));
        intake.set_target(target);
        intake.record_cold_start(load_started.elapsed());
        let pool = ModelPool {
            label,
            factory,
            warmup,
            metrics,
            intake: intake.clone(),
            target_replicas: target,
            loading: 0,
            restarts: 0,
            next_replica: 0,
            last_error: None,
            retry_backoff: MIN_LOAD_RETRY,
            retry_at: None,
            resize_waiters: Vec::new(),
            crashes: std::collections::VecDeque::new(),
        };
        let addr = ModelPool::create(move |ctx| {
            let mut pool = pool;
            pool.add_replica(first, ctx);
            pool.converge(ctx);
            pool
        });
        Ok(PoolHandle {
            addr,
            intake,
            metadata,
            batched,
            on_gpu,
            gpu: gpu.map(Arc::new),
            max_batch_size,
            solo_keys: Arc::new(AtomicU64::new(0)),
            stats,
        })
    }
}

impl Actor for ModelPool {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(supervisor::CHECK_EVERY, |pool, ctx| pool.check(ctx));
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.intake.stop();
        for waiter in self.resize_waiters.drain(..) {
            let _ = waiter.send(Err("the pool stopped".into()));
        }
    }
}

impl Handler<SetReplicas> for ModelPool {
    type Result = ();

    fn handle(&mut self, msg: SetReplicas, ctx: &mut Context<Self>) {
        if msg.target == 0 && self.target_replicas > 0 {
            tracing::info!(model = %self.label.0, version = %self.label.1, "scaling to zero (the model stays loaded: a request wakes a replica)");
        }
        self.set_target(msg.target);
        // A fresh resize gets its own backoff: a new target is worth an immediate try.
        self.retry_at = None;
        self.retry_backoff = MIN_LOAD_RETRY;
        self.resize_waiters.extend(msg.done);
        self.converge(ctx);
        self.answer_resizes(None);
    }
}

impl Handler<Wake> for ModelPool {
    type Result = ();

    fn handle(&mut self, _msg: Wake, ctx: &mut Context<Self>) {
        if self.target_replicas == 0 {
            tracing::info!(model = %self.label.0, version = %self.label.1,
                cold_start_ms = self.intake.cold_start().map(|d| d.as_millis() as u64),
                "a request arrived at zero replicas: waking one");
            self.set_target(1);
            self.retry_at = None;
            self.converge(ctx);
        }
    }
}

impl Handler<Stop> for ModelPool {
    type Result = ();

    fn handle(&mut self, _msg: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<GetStatus> for ModelPool {
    type Result = MessageResult<GetStatus>;

    fn handle(&mut self, _msg: GetStatus, _ctx: &mut Context<Self>) -> Self::Result {
        let (replicas, busy, queued) = self.intake.counts();
        MessageResult(PoolStatus {
            target: self.target_replicas,
            replicas,
            busy,
            loading: self.loading,
            queued,
            restarts: self.restarts,
            last_error: self.last_error.clone(),
            cold_start: self.intake.cold_start(),
        })
    }
}
