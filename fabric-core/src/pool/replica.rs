//! A replica: one engine on a thread of its own (an actix sync actor), running the batches the pool
//! hands it. A panic in the engine is caught, reported, and the replica replaced.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::batch;
use crate::engine::{Engine, EngineError};
use crate::tensor::Tensor;

/// One engine on its own thread.
pub struct Replica {
    pub(super) engine: Option<Box<dyn Engine>>,
}

impl Actor for Replica {
    type Context = SyncContext<Self>;
}

/// Requests of one batch, each with its inputs in graph order.
pub(super) struct RunBatch {
    pub(super) requests: Vec<Vec<Tensor>>,
}

/// Outputs per request, and how long the engine took.
pub(super) struct BatchOutput {
    pub(super) per_request: Vec<Vec<Tensor>>,
    pub(super) took: Duration,
}

/// How a batch failed.
pub(super) enum ReplicaFailure {
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
    let (joined, rows) = batch::join(requests)?;
    let outputs = engine.run_ordered(&joined.iter().collect::<Vec<_>>())?;
    Ok(batch::split(outputs, &rows)?)
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
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}
