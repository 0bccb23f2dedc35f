//! Per-client quotas: a request rate (a token bucket) and a concurrency limit, decided from plain
//! numbers and the caller's `now`. A request over either is refused with how long to wait before
//! trying again (the `Retry-After` a client is told).

use std::time::{Duration, Instant};

/// What one client may use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuotaLimits {
    /// Requests per second on average; `None`: no rate limit.
    pub rate_per_s: Option<f64>,
    /// Requests allowed at once above the average (the bucket's size); at least 1.
    pub burst: f64,
    /// Requests in flight at once; `None`: no limit.
    pub max_in_flight: Option<usize>,
}

/// Why a request is refused.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum QuotaRefusal {
    /// Over the rate: a token comes back after `retry_after`.
    Rate { retry_after: Duration },
    /// `limit` requests are in flight already.
    Concurrency { limit: usize },
}

/// A client's bucket and in-flight count.
#[derive(Clone, Debug)]
pub struct Quota {
    limits: QuotaLimits,
    tokens: f64,
    refilled: Instant,
    in_flight: usize,
}

impl Quota {
    /// A full bucket at `now`.
    pub fn new(limits: QuotaLimits, now: Instant) -> Quota {
        let limits = QuotaLimits { burst: limits.burst.max(1.0), ..limits };
        Quota { limits, tokens: limits.burst, refilled: now, in_flight: 0 }
    }

    /// Takes one request in, or says why not; an admitted request must be [`finish`](Self::finish)ed.
    pub fn try_start(&mut self, now: Instant) -> Result<(), QuotaRefusal> {
        if let Some(limit) = self.limits.max_in_flight {
            if self.in_flight >= limit {
                return Err(QuotaRefusal::Concurrency { limit });
            }
        }
        if let Some(rate) = self.limits.rate_per_s.filter(|r| *r > 0.0) {
            let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
            self.tokens = (self.tokens + elapsed * rate).min(self.limits.burst);
            self.refilled = now;
            if self.tokens < 1.0 {
                let retry_after = Duration::from_secs_f64((1.0 - self.tokens) / rate);
                return Err(QuotaRefusal::Rate { retry_after });
            }
            self.tokens -= 1.0;
        }
        self.in_flight += 1;
        Ok(())
    }

    /// An admitted request was answered.
    pub fn finish(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn quota_table() {
        let t0 = Instant::now();
        let limits = |rate: Option<f64>, burst: f64, conc: Option<usize>| QuotaLimits {
            rate_per_s: rate,
            burst,
            max_in_flight: conc,
        };
        // (label, limits, requests as (ms after t0, finish the earliest one first), expected outcomes)
        #[rustfmt::skip]
        let cases: Vec<(&str, QuotaLimits, Vec<(u32, bool)>, Vec<Result<(), QuotaRefusal>>)> = vec![
            ("no limits", limits(None, 1.0, None), vec![(0, false); 3], vec![Ok(()); 3]),
            ("burst of 2 at 10/s, then empty", limits(Some(10.0), 2.0, None), vec![(0, false), (0, false), (0, false)],
                vec![Ok(()), Ok(()), Err(QuotaRefusal::Rate { retry_after: MS * 100 })]),
            ("a token back after 100 ms", limits(Some(10.0), 1.0, None), vec![(0, false), (50, false), (100, false)],
                vec![Ok(()), Err(QuotaRefusal::Rate { retry_after: MS * 50 }), Ok(())]),
            ("idle time refills up to the burst only", limits(Some(10.0), 2.0, None), vec![(0, false), (10_000, false), (10_000, false), (10_000, false)],
                vec![Ok(()), Ok(()), Ok(()), Err(QuotaRefusal::Rate { retry_after: MS * 100 })]),
            ("concurrency", limits(None, 1.0, Some(2)), vec![(0, false), (0, false), (0, false)],
                vec![Ok(()), Ok(()), Err(QuotaRefusal::Concurrency { limit: 2 })]),
            ("finished requests free their place", limits(None, 1.0, Some(1)), vec![(0, false), (1, true), (2, false)],
                vec![Ok(()), Ok(()), Err(QuotaRefusal::Concurrency { limit: 1 })]),
            ("a refused request takes no token", limits(Some(10.0), 1.0, Some(1)), vec![(0, false), (200, false), (200, true)],
                vec![Ok(()), Err(QuotaRefusal::Concurrency { limit: 1 }), Ok(())]),
        ];
        for (label, limits, requests, want) in cases {
            let mut quota = Quota::new(limits, t0);
            let got: Vec<_> = requests
                .iter()
                .map(|&(ms, finish_first)| {
                    if finish_first {
                        quota.finish();
                    }
                    quota.try_start(t0 + MS * ms)
                })
                .collect();
            for (g, w) in got.iter().zip(&want) {
                match (g, w) {
                    (Err(QuotaRefusal::Rate { retry_after: a }), Err(QuotaRefusal::Rate { retry_after: b })) => {
                        assert!(a.abs_diff(*b) < Duration::from_micros(10), "{label}: {got:?}")
                    }
                    _ => assert_eq!(g, w, "{label}: {got:?}"),
                }
            }
        }
    }
}
