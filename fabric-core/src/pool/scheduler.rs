//! The pool's queue: counters and gauges, expiry of requests that can no longer make their deadline,
//! and dispatch of batches to idle replicas as the batching policy says, then the answers.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::handle::admission_input;
use super::replica::{BatchOutput, ReplicaFailure, RunBatch};
use super::{ModelPool, Pending, PoolError, PoolReply, Submit};
use crate::policy::admission::{self, Admission, PoolLoad, Rejection};
use crate::policy::batching::{self, BatchConfig, BatchDecision, Queued};
use crate::tensor::Tensor;

impl ModelPool {
    pub(super) fn publish_gauges(&self) {
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
    pub(super) fn record_service(&mut self, rows: usize, took: Duration) {
        self.service.record(rows, took);
        if let Ok(mut shared) = self.view.service.lock() {
            *shared = Some(self.service.clone());
        }
    }

    /// Rows per batch: the measured most efficient size, within the configured limit.
    pub(super) fn batch_limit(&self) -> usize {
        self.service.preferred_batch().min(self.batch_cap.max(1))
    }

    pub(super) fn expected_run(&self, rows: usize) -> Option<Duration> {
        self.service.estimate(rows)
    }

    /// Answers queued requests that can no longer make their deadline, or whose caller left.
    pub(super) fn expire(&mut self, now: Instant) {
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
    pub(super) fn take_rows(&mut self, rows: usize) {
        match self.queued_rows.checked_sub(rows) {
            Some(left) => self.queued_rows = left,
            None => {
                tracing::error!(model = %self.label.0, queued = self.queued_rows, rows, "queued-rows counter underflow; reset");
                self.queued_rows = 0;
            }
        }
    }

    /// Hands batches to idle replicas while the batching policy says so.
    pub(super) fn schedule(&mut self, ctx: &mut Context<Self>) {
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

    pub(super) fn dispatch(&mut self, requests: usize, rows: usize, ctx: &mut Context<Self>) {
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

    pub(super) fn finish(
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
