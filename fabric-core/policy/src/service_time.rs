//! Measured service time per batch size: an exponentially weighted average for each size seen,
//! and an estimate for sizes not seen yet (interpolated, or scaled up linearly, never optimistic).

use std::time::Duration;

/// Weight of the newest sample in the moving average.
const ALPHA: f64 = 0.2;

/// Moving averages of how long one batch of each size takes on one replica.
#[derive(Clone, Debug)]
pub struct ServiceTimes {
    /// `secs[n]` is the average for batch size n (index 0 unused).
    secs: Vec<Option<f64>>,
}

impl ServiceTimes {
    /// An empty table for batches of 1..=max_batch.
    pub fn new(max_batch: usize) -> Self {
        ServiceTimes { secs: vec![None; max_batch.max(1) + 1] }
    }

    /// Records one batch of `batch` rows that took `took`.
    pub fn record(&mut self, batch: usize, took: Duration) {
        let Some(slot) = self.secs.get_mut(batch) else {
            return;
        };
        let s = took.as_secs_f64();
        *slot = Some(match *slot {
            Some(avg) => avg + ALPHA * (s - avg),
            None => s,
        });
    }

    /// The expected time of a batch of `batch` rows, `None` before any measurement.
    pub fn estimate(&self, batch: usize) -> Option<Duration> {
        let batch = batch.clamp(1, self.secs.len() - 1);
        if let Some(s) = self.secs[batch] {
            return Some(Duration::from_secs_f64(s));
        }
        let below = (1..batch).rev().find_map(|n| self.secs[n].map(|s| (n, s)));
        let above = (batch + 1..self.secs.len()).find_map(|n| self.secs[n].map(|s| (n, s)));
        let secs = match (below, above) {
            (Some((lo, ts)), Some((hi, th))) => ts + (th - ts) * (batch - lo) as f64 / (hi - lo) as f64,
            (Some((lo, ts)), None) => ts * batch as f64 / lo as f64,
            (None, Some((_, th))) => th,
            (None, None) => return None,
        };
        Some(Duration::from_secs_f64(secs))
    }
}

impl ServiceTimes {
    /// The measured batch size with the lowest time per row (the largest among equals), or the
    /// largest size when nothing is measured. Engines differ: tract's convolutions, for one, get
    /// slower per row in big batches, so filling batches to the limit is not always best.
    pub fn preferred_batch(&self) -> usize {
        let mut best: Option<(usize, f64)> = None;
        for (n, s) in self.secs.iter().enumerate().skip(1) {
            if let Some(s) = s {
                let per_row = s / n as f64;
                if best.is_none_or(|(_, b)| per_row <= b) {
                    best = Some((n, per_row));
                }
            }
        }
        best.map(|(n, _)| n).unwrap_or(self.secs.len() - 1)
    }
}

/// One dispatch in this many lets a batch grow past the preferred size, so that a size judged slow
/// from one noisy warm-up sample is measured again under real load.
pub const PROBE_EVERY: u64 = 128;

impl ServiceTimes {
    /// The batch limit for dispatch number `n`: the preferred size, or on every [`PROBE_EVERY`]th
    /// dispatch twice that (within `cap`), to re-measure the next size up.
    pub fn limit_for_dispatch(&self, n: u64, cap: usize) -> usize {
        let preferred = self.preferred_batch().min(cap.max(1));
        if n % PROBE_EVERY == PROBE_EVERY - 1 {
            preferred.saturating_mul(2).min(cap.max(1))
        } else {
            preferred
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1e3)
    }

    #[test]
    fn estimates_table() {
        let mut t = ServiceTimes::new(32);
        assert_eq!(t.estimate(4), None);
        t.record(1, ms(1.0));
        t.record(16, ms(4.0));
        let cases = [(1, 1.0), (16, 4.0), (8, 1.0 + 3.0 * 7.0 / 15.0), (32, 8.0), (0, 1.0), (100, 8.0)];
        for (batch, want) in cases {
            let got = t.estimate(batch).map(|d| d.as_secs_f64() * 1e3);
            assert!(got.is_some_and(|g| (g - want).abs() < 1e-9), "batch {batch}: {got:?} vs {want}");
        }
        t.record(1, ms(2.0));
        let avg = t.estimate(1).map(|d| d.as_secs_f64() * 1e3);
        assert!(avg.is_some_and(|a| (a - 1.2).abs() < 1e-9), "{avg:?}");
        assert_eq!(t.preferred_batch(), 16, "4 ms for 16 rows beats 1 ms for 1");
        let mut conv = ServiceTimes::new(32);
        assert_eq!(conv.preferred_batch(), 32, "nothing measured: fill batches");
        for (n, ms_total) in [(1, 1.0), (4, 3.0), (32, 64.0)] {
            conv.record(n, ms(ms_total));
        }
        assert_eq!(conv.preferred_batch(), 4, "per row: 1.0, 0.75, 2.0 ms");
        // A noisy warm-up made 8 look slow: every PROBE_EVERYth dispatch may still reach 8 (twice 4).
        assert_eq!(conv.limit_for_dispatch(0, 32), 4);
        assert_eq!(conv.limit_for_dispatch(PROBE_EVERY - 1, 32), 8);
        assert_eq!(conv.limit_for_dispatch(PROBE_EVERY - 1, 6), 6, "within the cap");
        let mut only_big = ServiceTimes::new(8);
        only_big.record(8, ms(5.0));
        assert_eq!(only_big.estimate(2), Some(ms(5.0)));
    }
}
