//! The pool's queue, shared by the callers that fill it and the replica threads that drain it.
//!
//! The hot path has no actor hop: a caller admits its request under the queue's lock (on the exact
//! state, not a snapshot) and wakes an idle replica if there is one; a replica thread takes a batch as
//! the batching policy says, runs it, and answers each request itself. A batch costs the replica one
//! wake-up, and each request one (its answer). The pool actor keeps supervision: loading, retiring and
//! replacing replicas, and the watchdog, which also expires queued requests that can no longer make it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Pending, PoolConfig, PoolError, PoolReply, ReplyTx};
use crate::load_report::LoadStats;
use crate::metrics::Metrics;
use fabric_policy::admission::{self, Admission, AdmissionInput, AdmissionSettings, OffloadView, PoolLoad};
use fabric_policy::batching::{self, BatchConfig, BatchDecision, Queued};
use fabric_policy::service_time::ServiceTimes;
use fabric_types::tensor::Tensor;

/// Metric labels of the priorities, 1 to 9.
pub(crate) const PRIORITY_LABELS: [&str; 9] = ["1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// Longest a replica sleeps without looking at the queue (a guard against a missed wake-up).
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// The answers of one batch: taken once, by the replica when it finishes or by the watchdog.
pub(super) type Replies = Arc<Mutex<Option<Vec<(ReplyTx, Instant)>>>>;

/// A batch a replica took: the requests' inputs, and where their answers go.
pub(super) struct Batch {
    /// Id, to tell the queue it is done.
    pub(super) id: u64,
    /// Each request's inputs, in graph order.
    pub(super) requests: Vec<Vec<Tensor>>,
    /// Rows in the batch.
    pub(super) rows: usize,
    /// The answers, shared with the watchdog.
    pub(super) replies: Replies,
}

/// A batch on a replica: which replica, since when, how long it may take, and its answers.
struct Running {
    replica: u64,
    started: Instant,
    limit: Duration,
    replies: Replies,
}

/// Everything under the queue's lock.
struct State {
    queue: VecDeque<Pending>,
    queued_rows: usize,
    service: ServiceTimes,
    dispatched: u64,
    /// Replica threads running (idle or busy), and how many of them run a batch.
    replicas: usize,
    busy: usize,
    /// Replicas being loaded (kept by the supervisor, read by admission).
    loading: usize,
    /// Replicas that died and whose replacement the supervisor has not started yet: admission counts
    /// them as loading, so requests arriving in between queue for the replacement instead of being
    /// refused for want of a replica.
    replacing: usize,
    /// Replicas asked to stop: the next ones to come back idle exit.
    retire: usize,
    running: HashMap<u64, Running>,
    /// Replicas the watchdog gave up on: they exit when their engine call returns.
    abandoned: HashSet<u64>,
    next_batch: u64,
    stopped: bool,
    /// Replicas wanted (set by the supervisor): 0 means scaled to zero.
    target: usize,
    /// Scaled to zero and a wake-up already sent (one is enough).
    waking: bool,
    /// When the current loads began (none loading: `None`), and the last measured load + warm-up time.
    loading_since: Option<Instant>,
    cold_start: Option<Duration>,
}

/// The queue and its replicas' shared state.
pub(super) struct Intake {
    state: Mutex<State>,
    work: Condvar,
    config: PoolConfig,
    batched: bool,
    /// Largest batch, in rows.
    batch_cap: usize,
    label: (String, String),
    metrics: Metrics,
    stats: Arc<LoadStats>,
}

/// A replica's reason to stop taking batches.
pub(super) enum Leave {
    /// Retired by a resize (the count was already taken off).
    Retired,
    /// The watchdog replaced it.
    Abandoned,
    /// The pool stopped.
    Stopped,
}

impl Intake {
    /// An empty queue with no replicas yet.
    pub(super) fn new(
        config: PoolConfig,
        batched: bool,
        batch_cap: usize,
        service: ServiceTimes,
        label: (String, String),
        metrics: Metrics,
        stats: Arc<LoadStats>,
    ) -> Intake {
        let state = State {
            queue: VecDeque::new(),
            queued_rows: 0,
            service,
            dispatched: 0,
            replicas: 0,
            busy: 0,
            loading: 0,
            replacing: 0,
            retire: 0,
            running: HashMap::new(),
            abandoned: HashSet::new(),
            next_batch: 0,
            stopped: false,
            target: 1,
            waking: false,
            loading_since: None,
            cold_start: None,
        };
        Intake { state: Mutex::new(state), work: Condvar::new(), config, batched, batch_cap, label, metrics, stats }
    }

    /// The priority of requests that name none.
    pub(super) fn default_priority(&self) -> u8 {
        self.config.default_priority
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent counters (no code between updates panics).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn labels(&self) -> [&str; 2] {
        [&self.label.0, &self.label.1]
    }

    /// The requests and rows queued behind a new request of `priority`: the less urgent tail (the
    /// queue is kept in priority order, oldest first within a priority).
    fn behind(st: &State, priority: u8) -> (usize, usize) {
        st.queue.iter().rev().take_while(|p| p.priority > priority).fold((0, 0), |(n, rows), p| (n + 1, rows + p.rows))
    }

    fn load(&self, st: &State) -> PoolLoad {
        let replicas = st.replicas.saturating_sub(st.retire);
        let loading = st.loading + st.replacing;
        // With no replica ready, the wait for one: a whole load when asleep, what is left of one loading.
        let cold_wait = match (replicas, st.loading_since) {
            (0, Some(since)) if loading > 0 => st.cold_start.map(|c| c.saturating_sub(since.elapsed())),
            (0, _) => st.cold_start,
            _ => None,
        };
        PoolLoad {
            queued_requests: st.queue.len(),
            queued_rows: st.queued_rows,
            replicas,
            busy_replicas: st.busy,
            loading,
            asleep: st.target == 0,
            cold_wait,
        }
    }

    /// Admission's view for a request of `rows` rows and `priority`: only what is as urgent or more is
    /// ahead of it.
    fn input(&self, st: &State, rows: usize, budget: Duration, priority: u8) -> admission::AdmissionInput {
        let limit = st.service.preferred_batch().min(self.batch_cap.max(1));
        let mut load = self.load(st);
        let (behind, behind_rows) = Self::behind(st, priority);
        load.queued_requests -= behind;
        load.queued_rows = load.queued_rows.saturating_sub(behind_rows);
        admission_input(self.batched, rows, budget, self.config.queue_capacity, limit, load, self.config.admission)
    }

    /// Where a request of `rows` rows and `priority` should go now (on the exact state).
    pub(super) fn admission(
        &self,
        rows: usize,
        deadline: Instant,
        hub: Option<OffloadView>,
        priority: u8,
    ) -> Admission {
        let st = self.lock();
        let input = self.input(&st, rows, deadline.saturating_duration_since(Instant::now()), priority);
        admission::admit_or_offload(&input, |n| st.service.estimate(n), hub)
    }

    /// The budget a hub gets for a request of `rows` rows when every request goes to a hub, so that
    /// serving it here stays possible if the hub fails (see [`admission::hub_budget_before_local`]).
    pub(super) fn hub_budget(&self, rows: usize, deadline: Instant, priority: u8) -> Duration {
        let st = self.lock();
        let input = self.input(&st, rows, deadline.saturating_duration_since(Instant::now()), priority);
        admission::hub_budget_before_local(&input, |n| st.service.estimate(n))
    }

    /// Queues a request, or says at once why not (handing its inputs back). The flag says the pool is
    /// scaled to zero and the caller must wake it: the first request to arrive does, whether it can
    /// wait for the load or not (a request refused for its short deadline is still demand: the next
    /// ones find a replica).
    pub(super) fn submit(
        &self,
        request: Pending,
        hub: Option<OffloadView>,
    ) -> (bool, Result<(), (PoolError, Pending)>) {
        let mut st = self.lock();
        if st.stopped {
            return (false, Err((PoolError::Stopped, request)));
        }
        let wake = st.target == 0 && !st.waking;
        st.waking |= wake;
        let input =
            self.input(&st, request.rows, request.deadline.saturating_duration_since(Instant::now()), request.priority);
        let estimate = |n: usize| st.service.estimate(n);
        let decision = match hub {
            None => admission::admit(&input, estimate),
            // With a hub, the local wait target decides (below); the queueing target is for a node alone.
            Some(_) => {
                let feasible =
                    AdmissionInput { settings: AdmissionSettings { queue_wait_pct: 100, ..input.settings }, ..input };
                match admission::admit(&feasible, estimate) {
                    Admission::Local => admission::admit_or_offload(&input, estimate, hub),
                    other => other,
                }
            }
        };
        match decision {
            Admission::Local => {
                st.queued_rows += request.rows;
                // Ahead of every less urgent request, behind the rest.
                let at = st.queue.len() - Self::behind(&st, request.priority).0;
                st.queue.insert(at, request);
                self.metrics.queue_depth.with_label_values(&self.labels()).set(st.queue.len() as i64);
                drop(st);
                self.work.notify_one();
                (wake, Ok(()))
            }
            Admission::Offload => {
                let wait = admission::expected_times(&input, estimate).map(|(w, _)| w).unwrap_or_default();
                let target = input.budget.saturating_mul(input.settings.local_wait_pct.min(100)) / 100;
                (wake, Err((PoolError::OverWaitTarget { wait, target }, request)))
            }
            Admission::Reject(why) => (wake, Err((PoolError::from(why), request))),
        }
    }

    /// Takes the rows of a request off the counter; a mismatch is a bug, logged rather than wrapped.
    fn take_rows(&self, st: &mut State, rows: usize) {
        match st.queued_rows.checked_sub(rows) {
            Some(left) => st.queued_rows = left,
            None => {
                tracing::error!(model = %self.label.0, queued = st.queued_rows, rows, "queued-rows counter underflow; reset");
                st.queued_rows = 0;
            }
        }
    }

    /// Answers queued requests that can no longer make their deadline, and drops those whose caller left.
    fn expire(&self, st: &mut State, now: Instant) {
        if st.queue.iter().all(|p| !p.reply.is_closed() && !batching::is_hopeless(&p.queued(), now, None)) {
            return;
        }
        let mut kept = VecDeque::with_capacity(st.queue.len());
        for p in std::mem::take(&mut st.queue) {
            if p.reply.is_closed() {
                self.take_rows(st, p.rows);
            } else if batching::is_hopeless(&p.queued(), now, None) {
                self.take_rows(st, p.rows);
                self.metrics.requests.with_label_values(&[&self.label.0, &self.label.1, "deadline_exceeded"]).inc();
                p.expire(now);
            } else {
                kept.push_back(p);
            }
        }
        st.queue = kept;
        self.metrics.queue_depth.with_label_values(&self.labels()).set(st.queue.len() as i64);
    }

    /// A replica joins (its engine loaded and warmed).
    pub(super) fn add_replica(&self) {
        self.lock().replicas += 1;
        self.work.notify_all();
    }

    /// Blocks replica `id` until there is a batch for it, or it is to leave.
    pub(super) fn next_batch(&self, id: u64) -> Result<Batch, Leave> {
        let mut st = self.lock();
        loop {
            if st.abandoned.remove(&id) {
                return Err(Leave::Abandoned);
            }
            if st.stopped {
                st.replicas = st.replicas.saturating_sub(1);
                return Err(Leave::Stopped);
            }
            // The last replica does not leave while requests wait (scale to zero never strands them).
            if st.retire > 0 && (st.replicas > 1 || st.queue.is_empty()) {
                st.retire -= 1;
                st.replicas = st.replicas.saturating_sub(1);
                return Err(Leave::Retired);
            }
            let now = Instant::now();
            self.expire(&mut st, now);
            let limit = st.service.limit_for_dispatch(st.dispatched, self.batch_cap);
            let head: Vec<Queued> = st.queue.iter().take(limit + 1).map(Pending::queued).collect();
            let config = BatchConfig { max_batch_size: limit, max_queue_delay: self.config.max_queue_delay };
            let idle = st.replicas.saturating_sub(st.busy).max(1);
            let decision = batching::decide(&head, now, &config, idle, st.busy, |rows| st.service.estimate(rows));
            match decision {
                BatchDecision::Dispatch { requests, rows } => return Ok(self.take(&mut st, id, requests, rows, now)),
                BatchDecision::WaitUntil(at) => {
                    let wait = at.saturating_duration_since(now).min(IDLE_RECHECK);
                    st = self.work.wait_timeout(st, wait).unwrap_or_else(|p| p.into_inner()).0;
                }
                BatchDecision::Idle => {
                    st = self.work.wait_timeout(st, IDLE_RECHECK).unwrap_or_else(|p| p.into_inner()).0;
                }
            }
        }
    }

    fn take(&self, st: &mut State, replica: u64, requests: usize, rows: usize, now: Instant) -> Batch {
        let taken: Vec<Pending> = st.queue.drain(..requests).collect();
        self.take_rows(st, rows);
        st.busy += 1;
        st.dispatched += 1;
        st.next_batch += 1;
        let id = st.next_batch;
        let labels = self.labels();
        for p in &taken {
            let waited = (now - p.arrived).as_secs_f64();
            self.metrics.queue_duration.with_label_values(&labels).observe(waited);
            let priority = PRIORITY_LABELS[usize::from(p.priority.clamp(1, super::MAX_PRIORITY)) - 1];
            self.metrics.priority_queue_duration.with_label_values(&[labels[0], labels[1], priority]).observe(waited);
        }
        self.metrics.batch_size.with_label_values(&labels).observe(rows as f64);
        self.metrics.queue_depth.with_label_values(&labels).set(st.queue.len() as i64);
        let limit = self.config.watchdog.unwrap_or_else(|| {
            st.service.estimate(rows).map(|t| t.saturating_mul(10)).unwrap_or_default().max(super::MIN_WATCHDOG)
        });
        let (inputs, answers): (Vec<Vec<Tensor>>, Vec<(ReplyTx, Instant)>) =
            taken.into_iter().map(|p| (p.inputs, (p.reply, p.arrived))).unzip();
        let replies: Replies = Arc::new(Mutex::new(Some(answers)));
        st.running.insert(id, Running { replica, started: now, limit, replies: replies.clone() });
        // Another idle replica may find more work behind this batch.
        if !st.queue.is_empty() && st.replicas > st.busy {
            self.work.notify_one();
        }
        Batch { id, requests: inputs, rows, replies }
    }

    /// A batch is done (answered by the replica, or by the watchdog before it): free the replica.
    pub(super) fn finish(&self, batch: u64, rows: usize, took: Option<Duration>) {
        let mut st = self.lock();
        if st.running.remove(&batch).is_some() {
            st.busy = st.busy.saturating_sub(1);
        }
        if let Some(took) = took {
            self.stats.busy(Instant::now(), took);
            st.service.record(rows, took);
            self.metrics.compute_duration.with_label_values(&self.labels()).observe(took.as_secs_f64());
        }
    }

    /// A replica died (its engine panicked): it no longer counts, and a replacement is on its way.
    pub(super) fn replica_gone(&self) {
        let mut st = self.lock();
        st.replicas = st.replicas.saturating_sub(1);
        st.replacing += 1;
    }

    /// The supervisor has started the replacement of a replica that died.
    pub(super) fn replacement_started(&self) {
        let mut st = self.lock();
        st.replacing = st.replacing.saturating_sub(1);
    }

    /// Fails batches that ran past the watchdog (their replicas are abandoned and must be replaced) and
    /// expires queued requests that can no longer make it. Returns how many replicas were abandoned.
    pub(super) fn check(&self, now: Instant) -> usize {
        let mut st = self.lock();
        self.expire(&mut st, now);
        let late: Vec<u64> =
            st.running.iter().filter(|(_, r)| now.duration_since(r.started) > r.limit).map(|(id, _)| *id).collect();
        for id in &late {
            let Some(run) = st.running.remove(id) else { continue };
            st.busy = st.busy.saturating_sub(1);
            st.replicas = st.replicas.saturating_sub(1);
            st.abandoned.insert(run.replica);
            let message =
                format!("the engine call ran past the {} ms watchdog; replica replaced", run.limit.as_millis());
            tracing::error!(model = %self.label.0, version = %self.label.1, "{message}");
            answer_all(&run.replies, || Err(PoolError::ReplicaFailed(message.clone())));
        }
        late.len()
    }

    /// Sets how many replicas are loading (for admission and status).
    pub(super) fn set_loading(&self, n: usize) {
        let mut st = self.lock();
        if n == 0 {
            st.loading_since = None;
        } else if st.loading == 0 {
            st.loading_since = Some(Instant::now());
        }
        st.loading = n;
    }

    /// Sets the replica target (0: scaled to zero, requests wake a replica).
    pub(super) fn set_target(&self, n: usize) {
        let mut st = self.lock();
        st.target = n;
        st.waking = false;
    }

    /// Records how long loading and warming a replica took.
    pub(super) fn record_cold_start(&self, took: Duration) {
        self.lock().cold_start = Some(took);
    }

    /// The last measured load + warm-up time of a replica.
    pub(super) fn cold_start(&self) -> Option<Duration> {
        self.lock().cold_start
    }

    /// Whether the pool can take requests: a replica is ready, or it is scaled to zero (a request wakes one).
    pub(super) fn serving(&self) -> bool {
        let st = self.lock();
        st.replicas > st.retire || st.target == 0
    }

    /// Asks `n` replicas to leave (idle ones first: they are the first to look).
    pub(super) fn retire(&self, n: usize) {
        self.lock().retire += n;
        self.work.notify_all();
    }

    /// Takes back up to `n` requests to leave that replicas have not acted on; returns how many.
    pub(super) fn unretire(&self, n: usize) -> usize {
        let mut st = self.lock();
        let kept = st.retire.min(n);
        st.retire -= kept;
        kept
    }

    /// Replicas that stay (running, less those asked to leave), and how many run a batch.
    pub(super) fn counts(&self) -> (usize, usize, usize) {
        let st = self.lock();
        (st.replicas.saturating_sub(st.retire), st.busy, st.queue.len())
    }

    /// Whether exactly `target` replica threads run (those asked to leave have left).
    pub(super) fn settled(&self, target: usize) -> bool {
        let st = self.lock();
        st.replicas == target && st.retire == 0
    }

    /// Stops: every queued request is answered, replicas leave.
    pub(super) fn stop(&self) {
        let mut st = self.lock();
        st.stopped = true;
        for p in st.queue.drain(..) {
            p.answer(Err(PoolError::Stopped));
        }
        st.queued_rows = 0;
        drop(st);
        self.work.notify_all();
    }

    /// Seeds the service-time table (warm-up timings).
    pub(super) fn record_service(&self, rows: usize, took: Duration) {
        self.lock().service.record(rows, took);
    }
}

/// Answers every request of a batch, once: whoever takes the replies first (replica or watchdog).
pub(super) fn answer_all(replies: &Replies, mut result: impl FnMut() -> Result<PoolReply, PoolError>) {
    let taken = replies.lock().unwrap_or_else(|p| p.into_inner()).take();
    for (reply, _) in taken.into_iter().flatten() {
        let _ = reply.send(result());
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
