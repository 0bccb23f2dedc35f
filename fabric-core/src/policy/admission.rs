//! Where a new request goes: this node's queue, a hub (offload), or nowhere (a precise refusal),
//! from the queue's state, the measured service time, the deadline, and the best hub's health and
//! expected answer time. Refusing at the door is the point: a request that cannot be answered in
//! time gets a precise error now instead of a timeout later.

use std::time::Duration;

/// The state of one model pool when a request arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLoad {
    /// Requests waiting in the queue.
    pub queued_requests: usize,
    /// Rows waiting in the queue.
    pub queued_rows: usize,
    /// Replicas serving the model.
    pub replicas: usize,
    /// Replicas running a batch right now.
    pub busy_replicas: usize,
}

/// Everything admission looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionInput {
    /// Rows in the new request.
    pub rows: usize,
    /// Time left until the request's deadline.
    pub budget: Duration,
    /// Most requests the queue may hold.
    pub queue_capacity: usize,
    /// Most rows in one batch.
    pub max_batch_size: usize,
    /// The pool's state.
    pub load: PoolLoad,
}

/// Why a request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The queue holds `capacity` requests already.
    QueueFull { capacity: usize },
    /// The expected wait plus run exceeds the time left.
    WouldMissDeadline { expected: Duration, budget: Duration },
    /// The model has no replica.
    NoReplicas,
}

/// The decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Queue it here.
    Local,
    /// Send it to a hub.
    Offload,
    /// Refuse it, with the reason.
    Reject(Rejection),
}

/// What offload could do for the request: the best healthy hub with room, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffloadView {
    /// Expected time until the hub's answer arrives (round trip plus the hub's own queue and compute).
    pub expected: Duration,
}

/// Expected time until a request of `rows` rows, queued now, is answered.
///
/// Queued rows ahead are served in full batches spread over the replicas; when every replica is busy
/// the first round also waits for a running batch. `batch_time(n)` is the measured time of n rows.
pub fn expected_completion(input: &AdmissionInput, batch_time: impl Fn(usize) -> Option<Duration>) -> Option<Duration> {
    let max = input.max_batch_size.max(1);
    let replicas = input.load.replicas.max(1);
    let ahead = input.load.queued_rows + input.rows;
    let batches = ahead.div_ceil(max);
    let mut rounds = batches.div_ceil(replicas);
    if input.load.busy_replicas >= replicas {
        rounds += 1;
    }
    batch_time(ahead.min(max)).map(|t| t * rounds as u32)
}

/// Decides whether to take the request here, without a hub.
pub fn admit(input: &AdmissionInput, batch_time: impl Fn(usize) -> Option<Duration>) -> Admission {
    admit_or_offload(input, batch_time, None)
}

/// Decides between this node, a hub and refusal: here if it can be served in time, else on the hub
/// if the hub's expected answer time fits the budget, else refused with the local reason.
pub fn admit_or_offload(
    input: &AdmissionInput,
    batch_time: impl Fn(usize) -> Option<Duration>,
    hub: Option<OffloadView>,
) -> Admission {
    let local = if input.load.replicas == 0 {
        Err(Rejection::NoReplicas)
    } else if input.load.queued_requests >= input.queue_capacity {
        Err(Rejection::QueueFull { capacity: input.queue_capacity })
    } else {
        match expected_completion(input, batch_time) {
            Some(expected) if expected > input.budget => {
                Err(Rejection::WouldMissDeadline { expected, budget: input.budget })
            }
            // With a hub at hand, keep a tenth of the budget as margin: estimates are averages, and a
            // request sent to the hub now beats one that misses its deadline here.
            Some(expected) if hub.is_some() && expected + input.budget / 10 > input.budget => {
                Err(Rejection::WouldMissDeadline { expected, budget: input.budget })
            }
            _ => Ok(()),
        }
    };
    match (local, hub) {
        (Ok(()), _) => Admission::Local,
        (Err(_), Some(hub)) if hub.expected <= input.budget => Admission::Offload,
        (Err(why), _) => Admission::Reject(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn input(
        rows: usize,
        budget_ms: u32,
        queued_requests: usize,
        queued_rows: usize,
        replicas: usize,
        busy: usize,
    ) -> AdmissionInput {
        AdmissionInput {
            rows,
            budget: MS * budget_ms,
            queue_capacity: 100,
            max_batch_size: 8,
            load: PoolLoad { queued_requests, queued_rows, replicas, busy_replicas: busy },
        }
    }

    #[test]
    fn admission_table() {
        // One batch of n rows takes 1 ms + 0.25 ms per row.
        let time = |n: usize| Some(MS + MS * n as u32 / 4);
        #[rustfmt::skip]
        let cases: Vec<(&str, AdmissionInput, Admission)> = vec![
            ("idle pool", input(1, 100, 0, 0, 1, 0), Admission::Local),
            ("queue full", input(1, 100, 100, 100, 1, 1), Admission::Reject(Rejection::QueueFull { capacity: 100 })),
            ("no replicas", input(1, 100, 0, 0, 0, 0), Admission::Reject(Rejection::NoReplicas)),
            // 40 rows ahead + 1 = 6 batches of 8, one replica, busy: 7 rounds x 3 ms = 21 ms.
            ("deep queue, tight deadline", input(1, 20, 40, 40, 1, 1),
                Admission::Reject(Rejection::WouldMissDeadline { expected: MS * 21, budget: MS * 20 })),
            ("deep queue, enough time", input(1, 21, 40, 40, 1, 1), Admission::Local),
            // Two replicas halve the rounds: 3 + 1 = 4 rounds x 3 ms = 12 ms.
            ("more replicas", input(1, 12, 40, 40, 2, 2), Admission::Local),
            ("deadline already too close", input(1, 1, 0, 0, 1, 0),
                Admission::Reject(Rejection::WouldMissDeadline { expected: MS + MS / 4, budget: MS })),
        ];
        for (label, inp, want) in cases {
            assert_eq!(admit(&inp, time), want, "{label}");
        }
        assert_eq!(admit(&input(1, 0, 10, 10, 1, 1), |_| None), Admission::Local, "no measurement yet");
    }

    #[test]
    fn offload_table() {
        let time = |n: usize| Some(MS + MS * n as u32 / 4);
        let hub = |ms: u32| Some(OffloadView { expected: MS * ms });
        #[rustfmt::skip]
        let cases: Vec<(&str, AdmissionInput, Option<OffloadView>, Admission)> = vec![
            ("local fits: stay local even with a hub", input(1, 100, 0, 0, 1, 0), hub(1), Admission::Local),
            ("local too slow, hub fits", input(1, 20, 40, 40, 1, 1), hub(5), Admission::Offload),
            ("local within the hub margin", input(1, 22, 40, 40, 1, 1), hub(5), Admission::Offload),
            ("local clear of the margin", input(1, 24, 40, 40, 1, 1), hub(5), Admission::Local),
            ("local too slow, hub too slow", input(1, 20, 40, 40, 1, 1), hub(25),
                Admission::Reject(Rejection::WouldMissDeadline { expected: MS * 21, budget: MS * 20 })),
            ("local too slow, no hub", input(1, 20, 40, 40, 1, 1), None,
                Admission::Reject(Rejection::WouldMissDeadline { expected: MS * 21, budget: MS * 20 })),
            ("queue full, hub fits", input(1, 100, 100, 100, 1, 1), hub(5), Admission::Offload),
            ("no replicas, hub fits", input(1, 100, 0, 0, 0, 0), hub(5), Admission::Offload),
        ];
        for (label, inp, view, want) in cases {
            assert_eq!(admit_or_offload(&inp, time, view), want, "{label}");
        }
    }
}
