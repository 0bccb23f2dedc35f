//! When a link to a peer (an edge's link to a hub) connects again after it ended: at once after a
//! connection that served was lost; after a jittered, doubling delay while connecting fails or the
//! peer closes before it ever answered (a hub that refuses this edge's certificate does so only after
//! the TLS 1.3 handshake, so "connected" alone proves nothing). Delays use equal jitter (half the
//! ceiling fixed, half drawn), so a refusing hub is never retried in a hot loop, yet edges that lost
//! the same hub at once come back spread out.

use std::time::Duration;

use crate::backoff::Backoff;

/// How a link's last connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkEnd {
    /// No connection: unreachable, TLS refused, or the peer is not what was asked for.
    ConnectFailed,
    /// Connected, then closed before the peer ever answered.
    ClosedUnproven,
    /// Connected and answered, then lost.
    Lost,
}

/// What to do after a link ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// How long to wait before connecting again.
    pub after: Duration,
    /// Whether to log this end (every loss; a run of failures only at its first).
    pub log: bool,
}

/// One link's reconnect state.
#[derive(Clone, Debug)]
pub struct ReconnectPolicy {
    backoff: Backoff,
    failing: bool,
}

impl ReconnectPolicy {
    /// Delays start at `first` (at most) and never exceed `cap`; `seed` picks the jitter.
    pub fn new(first: Duration, cap: Duration, seed: u64) -> ReconnectPolicy {
        ReconnectPolicy { backoff: Backoff::new(first, cap, seed), failing: false }
    }

    /// The next step after the link ended as `end`.
    pub fn after(&mut self, end: LinkEnd) -> Retry {
        match end {
            LinkEnd::Lost => {
                self.backoff.reset();
                self.failing = false;
                Retry { after: Duration::ZERO, log: true }
            }
            LinkEnd::ConnectFailed | LinkEnd::ClosedUnproven => {
                let ceiling = self.backoff.ceiling();
                let drawn = self.backoff.next_delay();
                let log = !self.failing;
                self.failing = true;
                Retry { after: ceiling / 2 + drawn / 2, log }
            }
        }
    }
}

/// The most connection attempts a failing link makes within `elapsed` of its first: every delay
/// at its floor (half its ceiling) and attempts themselves instant. A test's bound on a real link.
pub fn most_attempts_within(first: Duration, cap: Duration, elapsed: Duration) -> u32 {
    let mut ceiling = first;
    let mut at = Duration::ZERO;
    let mut attempts = 1;
    loop {
        at += ceiling / 2;
        if at > elapsed {
            return attempts;
        }
        attempts += 1;
        ceiling = (ceiling * 2).min(cap.max(first));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(5);

    /// Attempts a link that always fails makes in `window` of simulated time (the clock advances
    /// only by the policy's delays).
    fn attempts_in(seed: u64, window: Duration) -> u32 {
        let mut policy = ReconnectPolicy::new(FIRST, CAP, seed);
        let (mut now, mut attempts) = (Duration::ZERO, 0);
        while now <= window {
            attempts += 1;
            now += policy.after(LinkEnd::ClosedUnproven).after;
        }
        attempts
    }

    #[test]
    fn a_refusing_hub_is_retried_a_handful_of_times_in_five_seconds_whatever_the_jitter() {
        for seed in 0..200 {
            let n = attempts_in(seed, Duration::from_secs(5));
            assert!((6..=7).contains(&n), "seed {seed}: {n} attempts in 5 s");
            assert!(n <= most_attempts_within(FIRST, CAP, Duration::from_secs(5)));
        }
    }

    #[test]
    fn delays_double_within_equal_jitter_up_to_the_cap() {
        let mut policy = ReconnectPolicy::new(FIRST, CAP, 7);
        let ceilings_ms = [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        for (i, ceiling) in ceilings_ms.iter().map(|&ms| Duration::from_millis(ms)).enumerate() {
            let retry = policy.after(if i % 2 == 0 { LinkEnd::ConnectFailed } else { LinkEnd::ClosedUnproven });
            assert!(
                retry.after >= ceiling / 2 && retry.after <= ceiling,
                "failure {i}: {:?} vs {ceiling:?}",
                retry.after
            );
        }
    }

    #[test]
    fn a_lost_link_reconnects_at_once_and_starts_over() {
        // (event, wait at most, logged)
        let cases = [
            (LinkEnd::ConnectFailed, FIRST, true),
            (LinkEnd::ConnectFailed, FIRST * 2, false),
            (LinkEnd::ClosedUnproven, FIRST * 4, false),
            (LinkEnd::Lost, Duration::ZERO, true),
            (LinkEnd::ConnectFailed, FIRST, true),
            (LinkEnd::Lost, Duration::ZERO, true),
            (LinkEnd::Lost, Duration::ZERO, true),
        ];
        let mut policy = ReconnectPolicy::new(FIRST, CAP, 3);
        for (i, (end, most, log)) in cases.into_iter().enumerate() {
            let retry = policy.after(end);
            assert!(retry.after <= most && retry.after >= most / 2, "case {i} ({end:?}): {:?}", retry.after);
            assert_eq!(retry.log, log, "case {i} ({end:?})");
        }
    }

    #[test]
    fn links_that_failed_together_retry_apart() {
        let waits: std::collections::BTreeSet<Duration> = (0..20)
            .map(|seed| {
                let mut p = ReconnectPolicy::new(FIRST, CAP, crate::backoff::seed_of(&format!("edge-{seed}")));
                p.after(LinkEnd::ConnectFailed);
                p.after(LinkEnd::ConnectFailed).after
            })
            .collect();
        assert!(waits.len() > 10, "20 links drew only {} distinct delays", waits.len());
    }

    #[test]
    fn the_attempt_bound_counts_floors() {
        // Floors 50, 100, 200, 400 ms: attempts at 0, 50, 150, 350, 750 ms.
        let table = [(0, 1), (49, 1), (50, 2), (149, 2), (150, 3), (749, 4), (750, 5)];
        for (ms, attempts) in table {
            assert_eq!(most_attempts_within(FIRST, CAP, Duration::from_millis(ms)), attempts, "{ms} ms");
        }
    }
}
