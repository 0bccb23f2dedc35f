//! Retry delays with full jitter: each failure doubles the ceiling (up to a cap), and the delay is
//! drawn uniformly below it, so a fleet that lost its registry at the same moment does not come back
//! at the same moment (AWS's "exponential backoff and jitter" analysis: full jitter spreads retries
//! best for the least total work).

use std::time::Duration;

/// Jittered exponential backoff; deterministic for a given seed.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    failures: u32,
    rng: u64,
}

impl Backoff {
    /// Delays start under `first` and never exceed `cap`; `seed` picks the jitter (a node's id hash).
    pub fn new(first: Duration, cap: Duration, seed: u64) -> Backoff {
        Backoff { first, cap: cap.max(first), failures: 0, rng: seed | 1 }
    }

    /// The delay before the next try, after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        // xorshift64*: plenty for spreading retries.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let unit = (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        ceiling.mul_f64(unit)
    }

    /// The ceiling the next delay is drawn under.
    pub fn ceiling(&self) -> Duration {
        let doubled = self.first.saturating_mul(1u32 << self.failures.min(20));
        doubled.min(self.cap)
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure starts from `first` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A stable seed from a name (FNV-1a), so each node jitters differently.
pub fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stay_under_the_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 7);
        let ceilings: Vec<u64> = (0..8)
            .map(|_| {
                let c = b.ceiling();
                let d = b.next_delay();
                assert!(d <= c, "{d:?} over {c:?}");
                c.as_millis() as u64
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn a_fleet_spreads_its_retries() {
        // 1,000 nodes failing at once: their first retries at the 2 s cap spread over the whole window.
        let mut buckets = [0u32; 10];
        for n in 0..1000 {
            let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(2), seed_of(&format!("edge-{n}")));
            let d = b.next_delay();
            buckets[(d.as_secs_f64() / 0.2).min(9.0) as usize] += 1;
        }
        assert!(buckets.iter().all(|&c| (50..=150).contains(&c)), "{buckets:?}");
    }
}
