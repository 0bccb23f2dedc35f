//! The pool's supervision of its replicas: loading (with retries and backoff after a failure), warming,
//! adding, retiring (idle ones first) and replacing them, and the watchdog that bounds each engine call.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::replica::{panic_message, Replica};
use super::warmup::warm;
use super::{ModelPool, Slot, MAX_LOAD_RETRY, MIN_LOAD_RETRY, MIN_WATCHDOG};
use crate::engine::Engine;

impl ModelPool {
    /// Runs the warm-up batches on a fresh engine (seeding the service-time table), then adds it.
    pub(super) fn warm_and_add(&mut self, engine: Box<dyn Engine>, ctx: &mut Context<Self>) {
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

    pub(super) fn add_replica(&mut self, engine: Box<dyn Engine>, ctx: &mut Context<Self>) {
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

    pub(super) fn active_replicas(&self) -> usize {
        self.slots.iter().filter(|s| !s.retiring).count()
    }

    /// Starts loads or retires replicas until the count matches the target. After a failed load, new
    /// loads wait for the retry time (backoff doubling up to [`MAX_LOAD_RETRY`]).
    pub(super) fn converge(&mut self, ctx: &mut Context<Self>) {
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
    pub(super) fn load_failed(&mut self, reason: String, ctx: &mut Context<Self>) {
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

    /// How long an engine call on `rows` rows may run.
    pub(super) fn watchdog(&self, rows: usize) -> Duration {
        self.config.watchdog.unwrap_or_else(|| {
            self.expected_run(rows).map(|t| t.saturating_mul(10)).unwrap_or_default().max(MIN_WATCHDOG)
        })
    }
}
