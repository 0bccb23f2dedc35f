//! The pool actor's supervision of its replicas: loading (with retries and backoff after a failure),
//! warming, adding, retiring (idle ones first) and replacing them, and the periodic check that fails
//! batches past the watchdog and expires queued requests that can no longer make their deadline.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::replica::{self, panic_message};
use super::warmup::warm;
use super::{ModelPool, ReplicaGone, CRASH_LOOP, CRASH_WINDOW, MAX_LOAD_RETRY, MIN_LOAD_RETRY};
use fabric_engine::Engine;

/// How often the watchdog looks at running batches (and expires hopeless queued requests).
pub(super) const CHECK_EVERY: Duration = Duration::from_millis(100);

impl ModelPool {
    /// Sets the replica target (the queue's admission reads it: at 0, requests wake a replica).
    pub(super) fn set_target(&mut self, n: usize) {
        self.target_replicas = n;
        self.intake.set_target(n);
    }

    /// Runs the warm-up batches on a fresh engine (seeding the service-time table), then adds it;
    /// `load_started` is when its load began (load and warm-up make the cold-start time).
    pub(super) fn warm_and_add(&mut self, engine: Box<dyn Engine>, load_started: Instant, ctx: &mut Context<Self>) {
        let warmup = self.warmup.clone();
        self.set_loading(self.loading + 1);
        let fut = actix_rt::task::spawn_blocking(move || warm(engine, &warmup));
        ctx.spawn(fut.into_actor(self).map(move |result, pool, ctx| {
            pool.set_loading(pool.loading - 1);
            match result {
                Ok((engine, timings)) => {
                    for (rows, took) in timings {
                        pool.intake.record_service(rows, took);
                    }
                    pool.intake.record_cold_start(load_started.elapsed());
                    pool.add_replica(engine, ctx);
                }
                Err(e) => pool.load_failed(format!("the warm-up thread failed: {e}"), ctx),
            }
            pool.converge(ctx);
        }));
    }

    pub(super) fn set_loading(&mut self, n: usize) {
        self.loading = n;
        self.intake.set_loading(n);
    }

    /// Starts a replica thread for a loaded, warmed engine (unless the pool shrank meanwhile).
    pub(super) fn add_replica(&mut self, engine: Box<dyn Engine>, ctx: &mut Context<Self>) {
        // A load worked: the next failure starts its backoff afresh (unless replicas keep crashing).
        if self.crashes.len() < CRASH_LOOP {
            self.retry_backoff = MIN_LOAD_RETRY;
        }
        if self.active_replicas() >= self.target_replicas {
            return; // scaled down while this one loaded
        }
        self.last_error = None;
        self.next_replica += 1;
        let name = format!("replica-{}-{}", self.label.0, self.next_replica);
        self.intake.add_replica();
        if let Err(e) = replica::spawn(self.next_replica, engine, self.intake.clone(), ctx.address(), name) {
            self.intake.replica_gone();
            self.intake.replacement_started();
            self.load_failed(format!("cannot start a replica thread: {e}"), ctx);
            return;
        }
        self.publish_gauges();
        tracing::info!(model = %self.label.0, version = %self.label.1, replicas = self.active_replicas(), "replica ready");
        self.answer_resizes(None);
    }

    /// Answers the resizes waiting, if the replica count has reached the target (or with `failure`).
    pub(super) fn answer_resizes(&mut self, failure: Option<&str>) {
        if self.resize_waiters.is_empty() {
            return;
        }
        let result = match failure {
            Some(reason) => Err(format!("a replica failed to load (the pool keeps retrying): {reason}")),
            None if self.loading == 0 && self.intake.settled(self.target_replicas) => Ok(()),
            None => return,
        };
        for waiter in self.resize_waiters.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }

    /// Replicas running and staying (not asked to leave).
    pub(super) fn active_replicas(&self) -> usize {
        self.intake.counts().0
    }

    /// Starts loads or retires replicas until the count matches the target. After a failed load, new
    /// loads wait for the retry time (backoff doubling up to [`MAX_LOAD_RETRY`]).
    pub(super) fn converge(&mut self, ctx: &mut Context<Self>) {
        let active = self.active_replicas();
        if active + self.loading < self.target_replicas {
            if let Some(at) = self.retry_at {
                if Instant::now() < at {
                    return; // a retry is scheduled for `at`
                }
                self.retry_at = None;
            }
            // Replicas asked to leave but still running stay instead of loading new ones.
            let kept = self.intake.unretire(self.target_replicas - active - self.loading);
            for _ in 0..(self.target_replicas - active - kept - self.loading) {
                let factory = self.factory.clone();
                let load_started = Instant::now();
                self.set_loading(self.loading + 1);
                let fut = actix_rt::task::spawn_blocking(move || catch_unwind(AssertUnwindSafe(|| factory())));
                ctx.spawn(fut.into_actor(self).map(move |result, pool, ctx| {
                    pool.set_loading(pool.loading - 1);
                    let failure = match result {
                        Ok(Ok(Ok(engine))) => {
                            pool.warm_and_add(engine, load_started, ctx);
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
            // Idle replicas see it first and leave; busy ones finish their batch and then look.
            self.intake.retire(active - self.target_replicas);
        }
        self.publish_gauges();
    }

    /// Records a failed load and schedules the retry.
    pub(super) fn load_failed(&mut self, reason: String, ctx: &mut Context<Self>) {
        let delay = self.retry_backoff;
        tracing::error!(model = %self.label.0, version = %self.label.1, retry_ms = delay.as_millis() as u64,
            "replica failed to load, retrying: {reason}");
        self.answer_resizes(Some(&reason));
        self.last_error = Some(reason);
        self.retry_backoff = (delay * 2).min(MAX_LOAD_RETRY);
        self.retry_at = Some(Instant::now() + delay);
        ctx.run_later(delay, |pool, ctx| {
            pool.retry_at = None;
            pool.converge(ctx);
        });
    }

    /// The watchdog and expiry check, every [`CHECK_EVERY`].
    pub(super) fn check(&mut self, ctx: &mut Context<Self>) {
        let abandoned = self.intake.check(Instant::now());
        if abandoned > 0 {
            self.restarts += abandoned as u64;
            self.converge(ctx);
        }
        // Retired replicas leave on their own threads: look whether a shrink has completed.
        self.answer_resizes(None);
    }

    pub(super) fn publish_gauges(&self) {
        let labels = [self.label.0.as_str(), self.label.1.as_str()];
        self.metrics.replicas.with_label_values(&labels).set(self.active_replicas() as i64);
    }
}

impl Handler<ReplicaGone> for ModelPool {
    type Result = ();

    fn handle(&mut self, msg: ReplicaGone, ctx: &mut Context<Self>) {
        tracing::error!(model = %self.label.0, version = %self.label.1, "replica panicked, replacing it: {}", msg.reason);
        self.restarts += 1;
        let now = Instant::now();
        self.crashes.push_back(now);
        while self.crashes.front().is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW) {
            self.crashes.pop_front();
        }
        if self.crashes.len() >= CRASH_LOOP {
            // Not a tight loop: the replacement waits like a failed load, and the pool says it is failing.
            let reason = format!(
                "crash loop: {} replica panics within {} s, replacing with backoff (last: {})",
                self.crashes.len(),
                CRASH_WINDOW.as_secs(),
                msg.reason
            );
            self.load_failed(reason, ctx);
        }
        self.converge(ctx);
        self.intake.replacement_started();
    }
}
