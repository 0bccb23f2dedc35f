//! Where a new request goes: this node's queue, a hub (offload), or nowhere (a precise refusal),
//! from the queue's state, the measured service time, the deadline, and the best hub's expected
//! answer time. Refusing at the door is the point: a request that cannot be answered in time gets a
//! precise error now instead of a timeout later.
//!
//! Latency first: with a hub at hand, a request is served here only while its expected wait in the
//! queue stays under a share of its budget ([`AdmissionSettings::local_wait_pct`]); beyond that it
//! goes to the hub. Without one (or when the hub could not answer in time), it is admitted only while
//! its expected finish leaves a safety margin before the deadline ([`AdmissionSettings::margin_pct`]):
//! estimates are averages, and on a loaded machine a batch can take longer than its average. And
//! only while its expected wait stays under a queueing target too ([`AdmissionSettings::queue_wait_pct`]
//! of the budget, never less than two batch rounds): on a saturated node a standing queue buys no
//! goodput (two rounds keep every replica fed) and costs every request its latency, so what would
//! queue past the target is refused at the door instead.

use std::time::Duration;

/// The state of one model pool when a request arrives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolLoad {
    /// Requests waiting in the queue.
    pub queued_requests: usize,
    /// Rows waiting in the queue.
    pub queued_rows: usize,
    /// Replicas ready to serve the model.
    pub replicas: usize,
    /// Replicas running a batch right now.
    pub busy_replicas: usize,
    /// Replicas being loaded (a replacement, or a retry after a failed load).
    pub loading: usize,
    /// Scaled to zero: the first request admitted wakes a replica.
    pub asleep: bool,
    /// With no replica ready: how long until one is expected to be (the measured load and warm-up
    /// time, less what a load in progress has done); `None`: not measured.
    pub cold_wait: Option<Duration>,
}

/// How latency-first admission trades the local queue against a hub and the deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionSettings {
    /// With a hub: the longest expected queueing delay served here, in percent of the request's budget.
    pub local_wait_pct: u32,
    /// The share of the budget kept free for scheduling noise, in percent: admitted only if the expected
    /// finish comes before the deadline less this margin.
    pub margin_pct: u32,
    /// Without a hub: the longest expected queueing delay admitted, in percent of the request's budget
    /// (at least two batch rounds); 100 turns the target off.
    pub queue_wait_pct: u32,
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        AdmissionSettings { local_wait_pct: 25, margin_pct: 25, queue_wait_pct: 25 }
    }
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
    /// The trade-offs.
    pub settings: AdmissionSettings,
}

/// Why a request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The queue holds `capacity` requests already.
    QueueFull { capacity: usize },
    /// The expected wait plus run exceeds the time left (less the safety margin).
    WouldMissDeadline { expected: Duration, budget: Duration },
    /// The model has no replica.
    NoReplicas,
    /// No replica is ready and one cannot be loaded before the deadline (margin kept).
    ColdStart { expected: Duration, budget: Duration },
    /// No hub, and the expected queueing delay is over the target: the node is saturated.
    OverQueueTarget { wait: Duration, target: Duration },
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

/// The share of the budget kept free when a hub's answer is expected, in percent: an estimate across
/// a link is off by the round trip's jitter and the learnt rate's error (within 5% measured), and a
/// request sent on no slack at all misses its deadline at the first hiccup (across a 150 ms link,
/// most offloads judged at 498 of 499 ms were late).
pub const HUB_MARGIN_PCT: u32 = 10;

/// Whether a hub's answer expected after `expected` comes in time for a request with `budget` left,
/// the hub's margin kept.
pub fn hub_in_time(expected: Duration, budget: Duration) -> bool {
    expected <= budget.saturating_sub(pct(budget, HUB_MARGIN_PCT))
}

/// Expected wait in the queue and expected finish of a request of `rows` rows, queued now.
///
/// Queued rows ahead are served in full batches spread over the replicas; when every replica is busy
/// the first round also waits for a running batch. `batch_time(n)` is the measured time of n rows.
pub fn expected_times(
    input: &AdmissionInput,
    batch_time: impl Fn(usize) -> Option<Duration>,
) -> Option<(Duration, Duration)> {
    // A request is never split: a batch holds at least one whole request, so requests larger than the
    // batch limit (tract's CNN prefers batches of 1 row; requests of 4 rows run whole) count as such.
    let average = input.load.queued_rows.checked_div(input.load.queued_requests).unwrap_or(0);
    let max = input.max_batch_size.max(input.rows).max(average).max(1);
    let replicas = input.load.replicas.max(1);
    let ahead = input.load.queued_rows + input.rows;
    let batches = ahead.div_ceil(max);
    let mut rounds = batches.div_ceil(replicas);
    if input.load.busy_replicas >= replicas {
        rounds += 1;
    }
    let per_round = batch_time(ahead.min(max))?;
    let rounds = u32::try_from(rounds).unwrap_or(u32::MAX);
    let finish = per_round.saturating_mul(rounds);
    Some((finish.saturating_sub(per_round), finish))
}

/// Expected time until a request of `rows` rows, queued now, is answered.
pub fn expected_completion(input: &AdmissionInput, batch_time: impl Fn(usize) -> Option<Duration>) -> Option<Duration> {
    expected_times(input, batch_time).map(|(_, finish)| finish)
}

/// The share of the budget a hub gets when every request goes to a hub (offload mode `always`): the
/// whole budget less what serving here would take (expected finish plus the safety margin), so that a
/// hub that vanishes mid-request leaves time to serve the request here. Where here cannot make the
/// deadline anyway, or nothing is measured yet, the hub gets it all.
pub fn hub_budget_before_local(input: &AdmissionInput, batch_time: impl Fn(usize) -> Option<Duration>) -> Duration {
    let Some(finish) = expected_completion(input, batch_time) else {
        return input.budget;
    };
    let reserve = finish + pct(input.budget, input.settings.margin_pct);
    if reserve >= input.budget {
        input.budget
    } else {
        input.budget - reserve
    }
}

/// Decides whether to take the request here, without a hub.
pub fn admit(input: &AdmissionInput, batch_time: impl Fn(usize) -> Option<Duration>) -> Admission {
    admit_or_offload(input, batch_time, None)
}

fn pct(d: Duration, pct: u32) -> Duration {
    d.saturating_mul(pct.min(100)) / 100
}

/// Decides between this node, a hub and refusal (see the module doc for the rules).
pub fn admit_or_offload(
    input: &AdmissionInput,
    batch_time: impl Fn(usize) -> Option<Duration>,
    hub: Option<OffloadView>,
) -> Admission {
    let hub = hub.filter(|h| hub_in_time(h.expected, input.budget));
    let usable = input.budget.saturating_sub(pct(input.budget, input.settings.margin_pct));
    // Can it be served here before the deadline, margin kept? With what expected wait (`None`: a replica
    // is on its way, or nothing is measured yet)?
    let cold = input.load.replicas == 0;
    let local: Result<Option<(Duration, Duration)>, Rejection> = if cold {
        // A replica is on its way (or will be woken): queue if it can be ready in time, unless a hub can
        // take the request now.
        let coming = input.load.loading > 0 || input.load.asleep;
        let expected = input.load.cold_wait.map(|w| w + batch_time(input.rows.max(1)).unwrap_or_default());
        if !coming {
            Err(Rejection::NoReplicas)
        } else if input.load.queued_requests >= input.queue_capacity {
            Err(Rejection::QueueFull { capacity: input.queue_capacity })
        } else if let Some(expected) = expected.filter(|e| *e > usable) {
            Err(Rejection::ColdStart { expected, budget: usable })
        } else {
            Ok(None)
        }
    } else if input.load.queued_requests >= input.queue_capacity {
        Err(Rejection::QueueFull { capacity: input.queue_capacity })
    } else {
        match expected_times(input, batch_time) {
            None => Ok(None), // nothing measured yet
            Some((_, finish)) if finish > usable => {
                Err(Rejection::WouldMissDeadline { expected: finish, budget: usable })
            }
            Some(times) => Ok(Some(times)),
        }
    };
    match (local, hub) {
        (Err(_), Some(_)) => Admission::Offload,
        (Err(why), None) => Admission::Reject(why),
        // A replica is loading: the hub answers sooner.
        (Ok(None), Some(_)) if cold => Admission::Offload,
        (Ok(None), _) => Admission::Local,
        (Ok(Some((wait, _))), Some(_)) => {
            if wait <= pct(input.budget, input.settings.local_wait_pct) {
                Admission::Local
            } else {
                Admission::Offload
            }
        }
        (Ok(Some((wait, finish))), None) => {
            // Two rounds (the batch running and the next, filling) keep every replica busy.
            let round = finish.saturating_sub(wait);
            let target = pct(input.budget, input.settings.queue_wait_pct).max(round.saturating_mul(2));
            if input.settings.queue_wait_pct < 100 && wait > target {
                Admission::Reject(Rejection::OverQueueTarget { wait, target })
            } else {
                Admission::Local
            }
        }
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
            load: PoolLoad { queued_requests, queued_rows, replicas, busy_replicas: busy, ..Default::default() },
            settings: AdmissionSettings { local_wait_pct: 25, margin_pct: 20, queue_wait_pct: 100 },
        }
    }

    fn loading(mut i: AdmissionInput, n: usize) -> AdmissionInput {
        i.load.loading = n;
        i
    }

    /// Scaled to zero, a replica taking `cold_ms` to load (unknown: `None`).
    fn asleep(mut i: AdmissionInput, cold_ms: Option<u32>) -> AdmissionInput {
        i.load.asleep = true;
        i.load.cold_wait = cold_ms.map(|ms| MS * ms);
        i
    }

    #[test]
    fn a_hubs_answer_must_leave_its_margin() {
        #[rustfmt::skip]
        let cases = [
            ("well inside", 300, 500, true),
            ("at the margin: 450 of 500", 450, 500, true),
            ("inside the deadline, not the margin", 451, 500, false),
            ("past the deadline", 600, 500, false),
        ];
        for (name, expected, budget, want) in cases {
            assert_eq!(hub_in_time(MS * expected, MS * budget), want, "{name}");
        }
    }

    #[test]
    fn hub_budget_before_local_table() {
        // One batch of n rows takes 1 ms + 0.25 ms per row; margin 20% of the budget.
        let time = |n: usize| Some(MS + MS * n as u32 / 4);
        let unmeasured = |_: usize| None;
        #[rustfmt::skip]
        let cases: Vec<(&str, AdmissionInput, bool, Duration)> = vec![
            ("idle: one 1.25 ms batch and 200 ms of margin kept", input(1, 1000, 0, 0, 1, 0), true, MS * 800 - MS * 5 / 4),
            ("a queue here: 17 rows, three 3 ms batches after the running one", input(1, 1000, 16, 16, 1, 1), true, MS * 788),
            ("here cannot make it: the hub gets it all", input(1, 5, 16, 16, 1, 1), true, MS * 5),
            ("nothing measured: the hub gets it all", input(1, 1000, 0, 0, 1, 0), false, MS * 1000),
        ];
        for (name, case, measured, want) in cases {
            let got = if measured {
                hub_budget_before_local(&case, time)
            } else {
                hub_budget_before_local(&case, unmeasured)
            };
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn admission_table() {
        // One batch of n rows takes 1 ms + 0.25 ms per row; a full batch of 8 takes 3 ms.
        let time = |n: usize| Some(MS + MS * n as u32 / 4);
        #[rustfmt::skip]
        let cases: Vec<(&str, AdmissionInput, Admission)> = vec![
            ("idle pool", input(1, 100, 0, 0, 1, 0), Admission::Local),
            ("queue full", input(1, 100, 100, 100, 1, 1), Admission::Reject(Rejection::QueueFull { capacity: 100 })),
            ("no replicas", input(1, 100, 0, 0, 0, 0), Admission::Reject(Rejection::NoReplicas)),
            ("no replicas, one loading: queue for it", loading(input(1, 100, 0, 0, 0, 0), 1), Admission::Local),
            // Scaled to zero: a 50 ms load and a 1.25 ms batch fit 80% of 100 ms, not 80% of 60 ms.
            ("asleep, the load fits: queue and wake", asleep(input(1, 100, 0, 0, 0, 0), Some(50)), Admission::Local),
            ("asleep, load not measured: queue and wake", asleep(input(1, 100, 0, 0, 0, 0), None), Admission::Local),
            ("asleep, the load does not fit", asleep(input(1, 60, 0, 0, 0, 0), Some(50)),
                Admission::Reject(Rejection::ColdStart { expected: MS * 51 + MS / 4, budget: MS * 48 })),
            ("asleep, queue full", asleep(input(1, 100, 100, 100, 0, 0), Some(50)),
                Admission::Reject(Rejection::QueueFull { capacity: 100 })),
            ("loading, the rest of the load does not fit", AdmissionInput { load: PoolLoad { loading: 1, cold_wait: Some(MS * 90), ..Default::default() }, ..input(1, 100, 0, 0, 0, 0) },
                Admission::Reject(Rejection::ColdStart { expected: MS * 91 + MS / 4, budget: MS * 80 })),
            // 40 rows ahead + 1 = 6 batches of 8, one replica, busy: 7 rounds x 3 ms = 21 ms; 80% of 25 ms is 20 ms.
            ("deep queue, finish inside the margin", input(1, 25, 40, 40, 1, 1),
                Admission::Reject(Rejection::WouldMissDeadline { expected: MS * 21, budget: MS * 20 })),
            ("deep queue, clear of the margin", input(1, 27, 40, 40, 1, 1), Admission::Local),
            // Two replicas halve the rounds: 3 + 1 = 4 rounds x 3 ms = 12 ms.
            ("more replicas", input(1, 15, 40, 40, 2, 2), Admission::Local),
            // Requests of 4 rows with a batch limit of 1: each runs whole, 2 ms a batch (1 ms + 4 x 0.25).
            // 20 queued (80 rows) + this one = 21 batches of 4 rows, busy: 22 rounds x 2 ms = 44 ms.
            ("requests larger than the batch limit run whole", AdmissionInput { max_batch_size: 1, ..input(4, 50, 20, 80, 1, 1) },
                Admission::Reject(Rejection::WouldMissDeadline { expected: MS * 44, budget: MS * 40 })),
            ("deadline already too close", input(1, 1, 0, 0, 1, 0),
                Admission::Reject(Rejection::WouldMissDeadline { expected: MS + MS / 4, budget: MS * 4 / 5 })),
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
            ("idle: stay local even with a hub", input(1, 100, 0, 0, 1, 0), hub(1), Admission::Local),
            // 7 rounds x 3 ms: wait 18 ms, finish 21 ms.
            ("wait over 25% of the budget: offload", input(1, 60, 40, 40, 1, 1), hub(5), Admission::Offload),
            ("wait within 25% of the budget: local", input(1, 80, 40, 40, 1, 1), hub(5), Admission::Local),
            ("wait too long, hub too slow, local still in time", input(1, 60, 40, 40, 1, 1), hub(70), Admission::Local),
            ("local too slow, hub too slow", input(1, 20, 40, 40, 1, 1), hub(25),
                Admission::Reject(Rejection::WouldMissDeadline { expected: MS * 21, budget: MS * 16 })),
            ("local too slow, no hub", input(1, 20, 40, 40, 1, 1), None,
                Admission::Reject(Rejection::WouldMissDeadline { expected: MS * 21, budget: MS * 16 })),
            ("queue full, hub fits", input(1, 100, 100, 100, 1, 1), hub(5), Admission::Offload),
            ("no replicas, hub fits", input(1, 100, 0, 0, 0, 0), hub(5), Admission::Offload),
            ("replica loading, hub fits: offload now", loading(input(1, 100, 0, 0, 0, 0), 1), hub(5), Admission::Offload),
            ("asleep, hub fits: offload now", asleep(input(1, 100, 0, 0, 0, 0), Some(50)), hub(5), Admission::Offload),
        ];
        for (label, inp, view, want) in cases {
            assert_eq!(admit_or_offload(&inp, time, view), want, "{label}");
        }
    }

    #[test]
    fn queue_target_table() {
        // One batch of n rows takes 1 ms + 0.25 ms per row; a full batch of 8 takes 3 ms.
        let time = |n: usize| Some(MS + MS * n as u32 / 4);
        let target = |pct: u32, i: AdmissionInput| AdmissionInput {
            settings: AdmissionSettings { queue_wait_pct: pct, ..i.settings },
            ..i
        };
        let hub = Some(OffloadView { expected: MS * 5 });
        #[rustfmt::skip]
        let cases: Vec<(&str, AdmissionInput, Option<OffloadView>, Admission)> = vec![
            ("idle", target(25, input(1, 100, 0, 0, 1, 0)), None, Admission::Local),
            // 40 queued, busy: 7 rounds of 3 ms, wait 18 ms; 25% of 100 ms is 25 ms.
            ("wait under the target", target(25, input(1, 100, 40, 40, 1, 1)), None, Admission::Local),
            ("wait over the target: refused at the door", target(10, input(1, 100, 40, 40, 1, 1)), None,
                Admission::Reject(Rejection::OverQueueTarget { wait: MS * 18, target: MS * 10 })),
            // Busy with 8 queued: wait 2 rounds (6 ms) is over 25% of 20 ms (5 ms) but is the floor.
            ("two rounds are always allowed", target(25, input(1, 20, 8, 8, 1, 1)), None, Admission::Local),
            ("three rounds are not", target(25, input(1, 20, 16, 16, 1, 1)), None,
                Admission::Reject(Rejection::OverQueueTarget { wait: MS * 9, target: MS * 6 })),
            ("target off at 100", target(100, input(1, 100, 40, 40, 1, 1)), None, Admission::Local),
            ("a hub takes what waits too long here", target(10, input(1, 60, 40, 40, 1, 1)), hub, Admission::Offload),
            ("the deadline still comes first", target(25, input(1, 20, 40, 40, 1, 1)), None,
                Admission::Reject(Rejection::WouldMissDeadline { expected: MS * 21, budget: MS * 16 })),
            ("nothing measured: admitted", target(1, input(1, 100, 40, 40, 1, 1)), None, Admission::Local),
        ];
        for (label, inp, view, want) in cases {
            let got = if label.starts_with("nothing measured") {
                admit_or_offload(&inp, |_| None, view)
            } else {
                admit_or_offload(&inp, time, view)
            };
            assert_eq!(got, want, "{label}");
        }
    }
}
