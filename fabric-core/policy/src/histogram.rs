//! Latency histograms with log-spaced buckets (4% wide from 10 µs), the one shape every node's load
//! report uses, so the registry can merge the nodes' histograms and read a fleet-wide percentile
//! instead of taking the largest per-node p99 (a node with ten slow requests is not the fleet's
//! 99th percentile).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Buckets: bucket `i` holds latencies up to `MIN_LATENCY_US * GROWTH^i` (about 10 µs to 64 s).
pub const BUCKETS: usize = 400;
const MIN_LATENCY_US: f64 = 10.0;
const GROWTH: f64 = 1.04;

/// The bucket a latency falls in.
pub fn bucket_of(latency: Duration) -> usize {
    let us = latency.as_secs_f64() * 1e6;
    if us <= MIN_LATENCY_US {
        return 0;
    }
    ((us / MIN_LATENCY_US).ln() / GROWTH.ln()).ceil().min((BUCKETS - 1) as f64) as usize
}

/// The middle of a bucket's range, in milliseconds.
pub fn bucket_value_ms(bucket: usize) -> f64 {
    let upper = MIN_LATENCY_US * GROWTH.powi(bucket as i32);
    let lower = if bucket == 0 { 0.0 } else { upper / GROWTH };
    (lower + upper) / 2.0 / 1e3
}

/// A latency histogram: (bucket, count) for the buckets that hold any, in bucket order. On the
/// wire, a list of `[bucket, count]` pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LatencyHistogram {
    counts: Vec<(u16, u64)>,
}

impl LatencyHistogram {
    /// From dense counts, one per bucket (as a node's report window sums them).
    pub fn from_dense(counts: &[u32]) -> LatencyHistogram {
        let counts = counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(bucket, &n)| (bucket.min(BUCKETS - 1) as u16, u64::from(n)))
            .collect();
        LatencyHistogram { counts }
    }

    /// Counts one latency.
    pub fn record(&mut self, latency: Duration) {
        let bucket = bucket_of(latency) as u16;
        match self.counts.binary_search_by_key(&bucket, |(b, _)| *b) {
            Ok(i) => self.counts[i].1 += 1,
            Err(i) => self.counts.insert(i, (bucket, 1)),
        }
    }

    /// Adds another histogram's counts to this one.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        self.counts.extend_from_slice(&other.counts);
        self.counts.sort_unstable_by_key(|(bucket, _)| *bucket);
        self.counts.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 += later.1;
            }
            same
        });
    }

    /// Latencies counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|(_, n)| n).sum()
    }

    /// Whether it counts nothing.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// The `q` quantile (0..=1) in milliseconds, exact to the bucket (4%); `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        self.counts.iter().find_map(|&(bucket, n)| {
            seen += n;
            (seen >= rank).then(|| bucket_value_ms(usize::from(bucket)))
        })
    }
}

/// Many histograms summed into one count per bucket: adding one costs its own buckets, whatever the
/// sum holds already (the registry adds every serving node's, per version, each analysis tick).
#[derive(Clone, Debug)]
pub struct LatencySum {
    counts: Vec<u64>,
    total: u64,
}

impl Default for LatencySum {
    fn default() -> Self {
        LatencySum { counts: vec![0; BUCKETS], total: 0 }
    }
}

impl LatencySum {
    /// Adds one histogram.
    pub fn add(&mut self, histogram: &LatencyHistogram) {
        for &(bucket, n) in &histogram.counts {
            self.counts[usize::from(bucket).min(BUCKETS - 1)] += n;
            self.total += n;
        }
    }

    /// The sum as a histogram.
    pub fn histogram(&self) -> LatencyHistogram {
        let counts =
            self.counts.iter().enumerate().filter(|(_, &n)| n > 0).map(|(bucket, &n)| (bucket as u16, n)).collect();
        LatencyHistogram { counts }
    }

    /// The `q` quantile of everything added, in milliseconds; `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((self.total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        self.counts.iter().enumerate().find_map(|(bucket, &n)| {
            seen += n;
            (n > 0 && seen >= rank).then(|| bucket_value_ms(bucket))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(latencies: &[(u64, usize)]) -> LatencyHistogram {
        let mut h = LatencyHistogram::default();
        for &(us, times) in latencies {
            for _ in 0..times {
                h.record(Duration::from_micros(us));
            }
        }
        h
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() <= b * 0.04 + 1e-9)
    }

    #[test]
    fn quantiles_are_exact_to_the_bucket() {
        // (latencies in µs x count, q, expected ms)
        let cases: [(&[(u64, usize)], f64, f64); 5] = [
            (&[(1_000, 100)], 0.5, 1.0),
            (&[(1_000, 100)], 0.99, 1.0),
            (&[(1_000, 98), (50_000, 2)], 0.99, 50.0),
            (&[(1_000, 99), (50_000, 1)], 0.99, 1.0),
            (&[(200, 50), (2_000, 50)], 0.5, 0.2),
        ];
        for (i, (latencies, q, ms)) in cases.into_iter().enumerate() {
            assert!(close(of(latencies).quantile_ms(q), ms), "case {i}: {:?} vs {ms}", of(latencies).quantile_ms(q));
        }
        assert_eq!(LatencyHistogram::default().quantile_ms(0.99), None);
    }

    #[test]
    fn merging_equals_counting_everything_in_one() {
        let a = of(&[(300, 40), (1_000, 10), (90_000, 1)]);
        let b = of(&[(1_000, 5), (2_000, 7), (7, 3)]);
        let mut merged = a.clone();
        merged.merge(&b);
        let one = of(&[(300, 40), (1_000, 10), (90_000, 1), (1_000, 5), (2_000, 7), (7, 3)]);
        assert_eq!(merged, one);
        assert_eq!(merged.count(), 66);
        let mut empty = LatencyHistogram::default();
        empty.merge(&a);
        assert_eq!(empty, a);
    }

    #[test]
    fn the_fleet_p99_is_not_the_largest_node_p99() {
        // A busy node, fast; a quiet node with a few slow answers.
        let busy = of(&[(1_000, 1_000)]);
        let quiet = of(&[(1_000, 5), (100_000, 5)]);
        assert!(close(quiet.quantile_ms(0.99), 100.0));
        let mut fleet = busy.clone();
        fleet.merge(&quiet);
        assert!(close(fleet.quantile_ms(0.99), 1.0), "{:?}", fleet.quantile_ms(0.99));
    }

    #[test]
    fn a_sum_reads_as_the_merged_histogram() {
        let parts = [of(&[(300, 40), (1_000, 10)]), of(&[(90_000, 3), (1_000, 5)]), LatencyHistogram::default()];
        let mut merged = LatencyHistogram::default();
        let mut sum = LatencySum::default();
        for h in &parts {
            merged.merge(h);
            sum.add(h);
        }
        assert_eq!(sum.histogram(), merged);
        for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
            assert_eq!(sum.quantile_ms(q), merged.quantile_ms(q), "q {q}");
        }
        assert_eq!(LatencySum::default().quantile_ms(0.5), None);
    }

    #[test]
    fn dense_counts_become_the_same_histogram() {
        let mut dense = vec![0u32; BUCKETS];
        dense[bucket_of(Duration::from_millis(3))] += 4;
        dense[bucket_of(Duration::from_micros(5))] += 2;
        assert_eq!(LatencyHistogram::from_dense(&dense), of(&[(3_000, 4), (5, 2)]));
    }

    #[test]
    fn it_travels_as_bucket_count_pairs() {
        let h = of(&[(5, 2)]);
        assert_eq!(serde_json::to_string(&h).ok().as_deref(), Some("[[0,2]]"));
        let back: LatencyHistogram = serde_json::from_str("[[0,2]]").expect("parses");
        assert_eq!(back, h);
    }
}
