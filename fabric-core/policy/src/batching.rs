//! When to hand a batch to a replica, and which requests go in it.
//!
//! Requests are taken strictly from the front of the queue (oldest first), so no newer request can
//! overtake an older one. A batch goes out as soon as it is full, or the oldest request has waited
//! `max_queue_delay`, or waiting longer would make a request miss its deadline, or no replica is busy
//! (an idle server gains nothing by waiting: batches form by themselves while replicas are busy).

use std::time::{Duration, Instant};

/// Batching settings of one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most rows in one batch.
    pub max_batch_size: usize,
    /// Longest the oldest request may wait for a batch to fill.
    pub max_queue_delay: Duration,
}

/// What the batcher needs to know of one queued request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queued {
    /// Rows (leading dimension) in the request.
    pub rows: usize,
    /// When it entered the queue.
    pub enqueued: Instant,
    /// When its answer is due.
    pub deadline: Instant,
    /// Requests with different keys cannot share a batch (different non-batch dims).
    pub shape_key: u64,
}

/// What to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchDecision {
    /// Send the first `requests` requests (`rows` rows) to an idle replica.
    Dispatch { requests: usize, rows: usize },
    /// Nothing to send before this instant (unless something else happens first).
    WaitUntil(Instant),
    /// Nothing to do: empty queue or no idle replica.
    Idle,
}

/// Whether a request can no longer be answered in time, given the expected batch time.
pub fn is_hopeless(request: &Queued, now: Instant, expected_run: Option<Duration>) -> bool {
    now + expected_run.unwrap_or_default() > request.deadline
}

/// Decides whether to dispatch a batch now.
///
/// `expected_run` is the estimated time of the candidate batch on one replica (if measured).
pub fn decide(
    queue: &[Queued],
    now: Instant,
    config: &BatchConfig,
    idle_replicas: usize,
    busy_replicas: usize,
    expected_run: impl Fn(usize) -> Option<Duration>,
) -> BatchDecision {
    let Some(front) = queue.first() else {
        return BatchDecision::Idle;
    };
    if idle_replicas == 0 {
        return BatchDecision::Idle;
    }
    let max = config.max_batch_size.max(1);
    let (mut requests, mut rows) = (0, 0);
    let mut can_grow = true;
    for q in queue {
        if q.shape_key != front.shape_key || rows + q.rows > max {
            can_grow = false;
            break;
        }
        requests += 1;
        rows += q.rows;
    }
    if requests == 0 {
        // A single request larger than the batch limit: validation refuses these, but never stall on one.
        return BatchDecision::Dispatch { requests: 1, rows: front.rows };
    }
    let dispatch = BatchDecision::Dispatch { requests, rows };
    if rows >= max || !can_grow || busy_replicas == 0 {
        return dispatch;
    }
    let fill_by = front.enqueued + config.max_queue_delay;
    if now >= fill_by {
        return dispatch;
    }
    let earliest_deadline = queue[..requests].iter().map(|q| q.deadline).min().unwrap_or(front.deadline);
    if fill_by + expected_run(rows).unwrap_or_default() > earliest_deadline {
        return dispatch;
    }
    BatchDecision::WaitUntil(fill_by)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn q(base: Instant, rows: usize, enqueued_ms: u64, deadline_ms: u64, key: u64) -> Queued {
        Queued {
            rows,
            enqueued: base + MS * enqueued_ms as u32,
            deadline: base + MS * deadline_ms as u32,
            shape_key: key,
        }
    }

    #[test]
    fn decision_table() {
        let base = Instant::now();
        let cfg = BatchConfig { max_batch_size: 8, max_queue_delay: 2 * MS };
        let at = |ms: u64| base + MS * ms as u32;
        let run = |_rows: usize| Some(MS);
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<Queued>, u64, usize, usize, BatchDecision)> = vec![
            ("empty queue", vec![], 0, 1, 0, BatchDecision::Idle),
            ("no idle replica", vec![q(base, 1, 0, 100, 0)], 0, 0, 2, BatchDecision::Idle),
            ("idle server dispatches at once", vec![q(base, 1, 0, 100, 0)], 0, 1, 0, BatchDecision::Dispatch { requests: 1, rows: 1 }),
            ("busy peer: wait to fill", vec![q(base, 1, 0, 100, 0)], 0, 1, 1, BatchDecision::WaitUntil(at(2))),
            ("delay elapsed", vec![q(base, 1, 0, 100, 0), q(base, 2, 1, 100, 0)], 2, 1, 1, BatchDecision::Dispatch { requests: 2, rows: 3 }),
            ("full batch", vec![q(base, 4, 0, 100, 0), q(base, 4, 0, 100, 0), q(base, 1, 0, 100, 0)], 0, 1, 1, BatchDecision::Dispatch { requests: 2, rows: 8 }),
            ("next does not fit", vec![q(base, 5, 0, 100, 0), q(base, 4, 0, 100, 0)], 0, 1, 1, BatchDecision::Dispatch { requests: 1, rows: 5 }),
            ("other shape stops the batch", vec![q(base, 1, 0, 100, 0), q(base, 1, 0, 100, 7), q(base, 1, 0, 100, 0)], 0, 1, 1, BatchDecision::Dispatch { requests: 1, rows: 1 }),
            ("deadline pressure", vec![q(base, 1, 0, 100, 0), q(base, 1, 0, 2, 0)], 0, 1, 1, BatchDecision::Dispatch { requests: 2, rows: 2 }),
            ("oversized single request", vec![q(base, 9, 0, 100, 0)], 0, 1, 1, BatchDecision::Dispatch { requests: 1, rows: 9 }),
        ];
        for (label, queue, now_ms, idle, busy, want) in cases {
            assert_eq!(decide(&queue, at(now_ms), &cfg, idle, busy, run), want, "{label}");
        }
    }

    #[test]
    fn hopeless_requests() {
        let base = Instant::now();
        let r = q(base, 1, 0, 10, 0);
        assert!(!is_hopeless(&r, base, Some(5 * MS)));
        assert!(is_hopeless(&r, base + 6 * MS, Some(5 * MS)));
        assert!(!is_hopeless(&r, base + 10 * MS, None));
        assert!(is_hopeless(&r, base + 11 * MS, None));
    }
}
