//! What an edge concludes about one hub from what it hears: whether to send it a request now.
//!
//! Three signals, each of which once went missing and switched offload off or let it pile up:
//! - the hub's load report (with every answer, and unasked every 200 ms), trusted while fresh;
//! - busy answers: the hub rests for a short, growing while, then is tried again;
//! - a window of requests in flight (AIMD, as TCP's congestion window): a served request widens it a
//!   little, a busy answer or a timeout halves it. Under overload the edge then sends the hub about what
//!   it can answer in time, and the rest is refused at the door instead of crossing the network to be
//!   refused there (measured: at 5x the edge's capacity, two of three offloads came back busy before).

use std::time::{Duration, Instant};

/// A load report older than this says nothing about the hub now.
pub const REPORT_STALE: Duration = Duration::from_secs(1);
/// First rest after a busy answer (doubles while the hub stays busy, up to [`REST_MAX`]).
pub const REST_MIN: Duration = Duration::from_millis(50);
/// Longest rest after busy answers.
pub const REST_MAX: Duration = Duration::from_millis(800);
/// Requests in flight allowed to a hub not heard from yet.
pub const WINDOW_START: f64 = 8.0;
/// Largest window.
pub const WINDOW_MAX: f64 = 4096.0;

/// Weight of the newest answer time in the moving average, in fifths.
const ANSWER_WEIGHT_FIFTHS: u32 = 1;
/// The shortest patience: below it, scheduling noise alone would give up on healthy hubs.
pub const MIN_PATIENCE: Duration = Duration::from_millis(50);
/// How many usual answer times to wait for a hub before giving up on it for this request.
pub const PATIENCE_FACTOR: u32 = 4;

/// A hub's own report of its load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reported {
    /// Requests it is serving.
    pub in_flight: u32,
    /// Requests it takes before refusing (0: no limit).
    pub capacity: u32,
}

/// What an edge knows of one hub.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HubHealth {
    report: Option<(Reported, Instant)>,
    rest_until: Option<Instant>,
    next_rest: Duration,
    window: f64,
    /// Moving average of the time to an answer (timeouts included, as lower bounds).
    answer: Option<Duration>,
}

impl Default for HubHealth {
    fn default() -> Self {
        HubHealth { report: None, rest_until: None, next_rest: REST_MIN, window: WINDOW_START, answer: None }
    }
}

/// Orders hubs for a request by when their answer is expected: each hub's measured answer time
/// times one plus the requests ahead of this one there (its reported load plus what this edge has in
/// flight to it), soonest first; equal costs keep their order. So idle hubs are tried fastest first,
/// and load spreads to the slower ones as the fast one's queue grows.
pub fn by_expected_answer(hubs: &[(u32, Duration)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..hubs.len()).collect();
    order.sort_by_key(|&i| {
        let (load, answer) = hubs[i];
        answer.saturating_mul(load.saturating_add(1))
    });
    order
}

impl HubHealth {
    /// The expected time to an answer: the moving average, or `fallback` (twice the round trip, say)
    /// before the first answer.
    pub fn expected(&self, fallback: Duration) -> Duration {
        self.answer.unwrap_or(fallback)
    }

    /// How long to wait for this hub's answer before trying elsewhere: a hub that answers in 10 ms
    /// and has not in 40 is probably gone, and the rest of the budget can still be spent locally.
    pub fn patience(&self, fallback: Duration) -> Duration {
        self.expected(fallback).saturating_mul(PATIENCE_FACTOR).max(MIN_PATIENCE)
    }

    /// An answer came after `took` (or an attempt timed out after it: a lower bound, recorded all the
    /// same, or a hub too slow to ever answer in time would keep the estimate of its last good answers).
    pub fn answered_in(&mut self, took: Duration) {
        self.answer = Some(match self.answer {
            None => took,
            Some(avg) => avg - avg * ANSWER_WEIGHT_FIFTHS / 5 + took * ANSWER_WEIGHT_FIFTHS / 5,
        });
    }

    /// Whether the hub may take one more request at `now`, with `sending` of ours already in flight to it.
    pub fn has_room(&self, now: Instant, sending: u32) -> bool {
        if self.rest_until.is_some_and(|t| now < t) || f64::from(sending) >= self.window.floor().max(1.0) {
            return false;
        }
        match self.fresh(now) {
            Some(load) => load.capacity == 0 || load.in_flight < load.capacity,
            None => true,
        }
    }

    /// The reported in-flight count (0 when unknown or stale).
    pub fn in_flight(&self, now: Instant) -> u32 {
        self.fresh(now).map(|l| l.in_flight).unwrap_or(0)
    }

    /// Requests allowed in flight now.
    pub fn window(&self) -> f64 {
        self.window
    }

    fn fresh(&self, now: Instant) -> Option<Reported> {
        self.report.filter(|(_, at)| now.saturating_duration_since(*at) < REPORT_STALE).map(|(l, _)| l)
    }

    /// A load report arrived (with an answer, or unasked).
    pub fn reported(&mut self, load: Reported, now: Instant) {
        self.report = Some((load, now));
    }

    /// The hub said busy: rest it (longer while it keeps saying so) and halve the window.
    pub fn busy(&mut self, now: Instant) {
        self.rest_until = Some(now + self.next_rest);
        self.next_rest = (self.next_rest * 2).min(REST_MAX);
        self.window = (self.window / 2.0).max(1.0);
    }

    /// An attempt ran out of time: halve the window.
    pub fn timed_out(&mut self) {
        self.window = (self.window / 2.0).max(1.0);
    }

    /// The hub served a request: the next rest starts short again, and the window grows by 1/window.
    pub fn served(&mut self) {
        self.next_rest = REST_MIN;
        self.window = (self.window + 1.0 / self.window).min(WINDOW_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_hub_that_said_busy_rests_then_is_tried_again() {
        let t0 = Instant::now();
        let full = Reported { in_flight: 4, capacity: 4 };
        let idle = Reported { in_flight: 0, capacity: 4 };
        let mut h = HubHealth::default();
        assert!(h.has_room(t0, 0), "no report yet: try it");
        // The busy answer carries a full load, and nothing else arrives: the old edge never tried again.
        h.reported(full, t0);
        h.busy(t0);
        #[rustfmt::skip]
        let cases = [
            ("resting", t0 + 10 * MS, false),
            ("rest over, report still says full", t0 + 60 * MS, false),
            ("report stale: try again", t0 + REPORT_STALE, true),
        ];
        for (label, at, want) in cases {
            assert_eq!(h.has_room(at, 0), want, "{label}");
        }
        // A periodic report says it has room: tried again as soon as the rest is over.
        h.reported(idle, t0 + 200 * MS);
        assert!(h.has_room(t0 + 201 * MS, 0));
        // Busy again: the rest doubles; a served request shortens the next one, not the current one.
        h.busy(t0 + 300 * MS);
        assert!(!h.has_room(t0 + 390 * MS, 0), "second rest is 100 ms");
        h.served();
        assert!(!h.has_room(t0 + 390 * MS, 0), "a success elsewhere does not cut a rest short");
        assert!(h.has_room(t0 + 401 * MS, 0));
        h.busy(t0 + 500 * MS);
        assert!(h.has_room(t0 + 551 * MS, 0), "rest back to 50 ms after a served request");
        assert_eq!(h.in_flight(t0 + 551 * MS), 0);
    }

    #[test]
    fn answer_times_patience_and_order() {
        let mut h = HubHealth::default();
        let rtt2 = 2 * MS;
        #[rustfmt::skip]
        let before: [(&str, Duration, Duration); 2] = [
            ("no answer yet: the fallback", h.expected(rtt2), rtt2),
            ("patience never under the minimum", h.patience(rtt2), MIN_PATIENCE),
        ];
        for (label, got, want) in before {
            assert_eq!(got, want, "{label}");
        }
        h.answered_in(20 * MS);
        assert_eq!(h.expected(rtt2), 20 * MS, "the first answer is the estimate");
        assert_eq!(h.patience(rtt2), 80 * MS, "four usual answer times");
        h.answered_in(70 * MS); // a timeout: 20 + (70 - 20) / 5
        assert_eq!(h.expected(rtt2), 30 * MS);
        // (load, answer time) -> order: equal answer times by load, ties in order; a fast hub first
        // until its queue makes it slower than an idle slow one.
        let cases: [(&[(u32, Duration)], Vec<usize>); 3] = [
            (&[(5, MS), (1, MS), (3, MS), (1, MS)], vec![1, 3, 2, 0]),
            (&[(0, 5 * MS), (0, 2 * MS)], vec![1, 0]),
            (&[(0, 5 * MS), (3, 2 * MS)], vec![0, 1]),
        ];
        for (hubs, want) in cases {
            assert_eq!(by_expected_answer(hubs), want, "{hubs:?}");
        }
    }

    #[test]
    fn the_window_follows_what_the_hub_takes() {
        let t0 = Instant::now();
        let mut h = HubHealth::default();
        #[rustfmt::skip]
        let cases: [(&str, u32, bool); 3] = [
            ("under the window", 7, true),
            ("at the window", 8, false),
            ("over it", 20, false),
        ];
        for (label, sending, want) in cases {
            assert_eq!(h.has_room(t0, sending), want, "{label}");
        }
        h.timed_out();
        assert_eq!(h.window(), 4.0, "a timeout halves it");
        h.busy(t0);
        assert_eq!(h.window(), 2.0, "so does a busy answer");
        for _ in 0..3 {
            h.busy(t0);
        }
        assert_eq!(h.window(), 1.0, "never below one: the hub is still probed");
        assert!(h.has_room(t0 + REST_MAX, 0));
        assert!(!h.has_room(t0 + REST_MAX, 1));
        // Additive increase: about one more per window's worth of served requests.
        for _ in 0..10 {
            h.served();
        }
        assert!(h.window() > 4.0 && h.window() < 5.0, "{}", h.window());
    }
}
