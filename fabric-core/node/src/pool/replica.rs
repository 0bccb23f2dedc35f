//! A replica: one engine on a thread of its own, taking batches from the queue, running them, and
//! answering each request itself. A panic in the engine is caught: the batch gets an error, the
//! thread ends, and the pool replaces it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use super::batch;
use super::queue::{answer_all, Intake, Leave};
use super::{ModelPool, PoolError, PoolReply, ReplicaGone};
use fabric_engine::{Engine, EngineError};
use fabric_types::tensor::Tensor;

/// Starts replica `id` on a thread of its own; it tells `pool` when it dies.
pub(super) fn spawn(
    id: u64,
    mut engine: Box<dyn Engine>,
    intake: Arc<Intake>,
    pool: Addr<ModelPool>,
    name: String,
) -> std::io::Result<()> {
    std::thread::Builder::new().name(name).spawn(move || loop {
        let batch = match intake.next_batch(id) {
            Ok(batch) => batch,
            Err(Leave::Retired | Leave::Abandoned | Leave::Stopped) => return,
        };
        let started = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| run_batch(engine.as_mut(), &batch.requests))) {
            Ok(Ok(per_request)) => {
                let took = started.elapsed();
                let mut outputs = per_request.into_iter();
                let rows = batch.rows;
                let finished = Instant::now();
                // Counted before the answers go out: once the last request is answered its version may
                // be unloaded and its metric series dropped, and a late count would bring them back.
                intake.finish(batch.id, batch.rows, Some(took));
                answer_all(&batch.replies, || match outputs.next() {
                    Some(outputs) => Ok(PoolReply { outputs, batch_rows: rows, finished }),
                    None => Err(PoolError::Engine("the engine returned fewer outputs than requests".into())),
                });
            }
            Ok(Err(e)) => {
                let message = e.to_string();
                intake.finish(batch.id, batch.rows, None);
                answer_all(&batch.replies, || Err(PoolError::Engine(message.clone())));
            }
            Err(panic) => {
                let message = panic_message(&*panic);
                // Counted out (and its replacement counted in) before anyone hears of it.
                intake.finish(batch.id, batch.rows, None);
                intake.replica_gone();
                answer_all(&batch.replies, || Err(PoolError::ReplicaFailed(message.clone())));
                pool.do_send(ReplicaGone { reason: message });
                return; // the engine may be broken: this thread ends, the pool loads another
            }
        }
    })?;
    Ok(())
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

/// The message a panic carried.
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}
