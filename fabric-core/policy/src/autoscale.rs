//! Autoscaling, pure: from a model version's load samples (one per report, typically every second)
//! and its current replica count, the replica count it should have, and why.
//!
//! Demand is measured in replicas' worth of work: the arrival rate times the replica time one request
//! takes (busy time per served request, so it holds when the pool is saturated and the arrival rate
//! is what shows the real load). The count that keeps utilisation at the target is demand / target.
//!
//! - Up, fast path: a sudden step (twice the work the current count takes at the target) or a queue whose wait sits
//!   at admission's target scales at once, to what the step needs.
//! - Up, otherwise: only when every sample of the last `up_delay` needs more (a spike is not a trend),
//!   to the least of them.
//! - Down: only `down_delay` after the last change, and only when every sample of that window, with
//!   the hysteresis margin, needs fewer; never below `min` or above `max`.
//!
//! So flat noisy load settles and stays, a step is met within one sample, and a scale-up is never
//! undone within the down delay (no up-down-up).

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a model version scales.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoscaleSettings {
    /// Fewest replicas.
    pub min_replicas: usize,
    /// Most replicas.
    pub max_replicas: usize,
    /// Utilisation (busy share of replica time) to keep each replica at, 0-1.
    pub target_utilisation: f64,
    /// How long more replicas must be needed before scaling up (outside the fast path), in seconds.
    pub up_delay_s: f64,
    /// How long after the last change, and for how long fewer must be needed, before scaling down, in
    /// seconds.
    pub down_delay_s: f64,
    /// Scale down only if the smaller count would stay this share under the target (0-1).
    pub hysteresis: f64,
    /// Scale to zero after this many seconds without a request (0: never). A request that arrives
    /// at zero wakes a replica (the pool holds it meanwhile); the next sample confirms the wake.
    pub idle_to_zero_s: f64,
}

impl Default for AutoscaleSettings {
    fn default() -> Self {
        AutoscaleSettings {
            min_replicas: 1,
            max_replicas: 4,
            target_utilisation: 0.6,
            up_delay_s: 2.0,
            down_delay_s: 60.0,
            hysteresis: 0.2,
            idle_to_zero_s: 0.0,
        }
    }
}

/// Most replicas of one model version on one GPU when none were measured: one runs while the next
/// one's inputs are copied; more only contend for the same device (measured on an H100: 16 replicas
/// of the CNN, one per core, served less than one replica would). A version measured at load
/// (`replicas_per_gpu` in its load report) uses its own figure instead.
pub const GPU_MAX_REPLICAS: usize = 2;

impl AutoscaleSettings {
    /// These settings for a pool on a GPU (`on_gpu`): at most `measured` replicas (what the pool
    /// found worth running at load, by throughput and memory), or [`GPU_MAX_REPLICAS`] where nothing
    /// was measured; unchanged on the CPU.
    pub fn for_device(self, on_gpu: bool, measured: Option<usize>) -> AutoscaleSettings {
        if on_gpu {
            let cap = measured.filter(|&n| n > 0).unwrap_or(GPU_MAX_REPLICAS);
            let max = self.max_replicas.min(cap).max(1);
            AutoscaleSettings { max_replicas: max, min_replicas: self.min_replicas.min(max), ..self }
        } else {
            self
        }
    }
}

/// One load sample of a model version.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadSample {
    /// When, since any fixed origin.
    pub at: Duration,
    /// Requests arriving per second.
    pub arrivals_per_s: f64,
    /// Requests served per second.
    pub served_per_s: f64,
    /// Busy share of the replicas' time, 0-1.
    pub utilisation: f64,
    /// Replicas ready when the sample was taken.
    pub replicas: usize,
    /// Whether admission found the queue wait at its target (requests refused or offloaded for it).
    pub wait_at_target: bool,
    /// Requests waiting in the queue when the sample was taken.
    pub queued: usize,
}

/// Utilisation at which replicas count as saturated (with requests waiting: a fast-path scale-up).
const SATURATED: f64 = 0.9;

/// Rejection kinds that mean admission found the queue wait at its target.
pub const WAIT_AT_TARGET: [&str; 3] = ["over_wait_target", "would_miss_deadline", "queue_full"];

/// A decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The replica count to have.
    pub replicas: usize,
    /// Why (for status and logs).
    pub reason: String,
}

/// The autoscaler of one model version on one node: the recent samples and the last change.
#[derive(Clone, Debug)]
pub struct Autoscaler {
    settings: AutoscaleSettings,
    /// (time, replicas needed at the target, replicas needed with the down hysteresis, idle).
    recent: VecDeque<(Duration, usize, usize, bool)>,
    last_change: Option<Duration>,
}

impl Autoscaler {
    /// An autoscaler with `settings` (min and max are put in order, min at least 0).
    pub fn new(settings: AutoscaleSettings) -> Autoscaler {
        let max = settings.max_replicas.max(settings.min_replicas).max(1);
        Autoscaler {
            settings: AutoscaleSettings { max_replicas: max, ..settings },
            recent: VecDeque::new(),
            last_change: None,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &AutoscaleSettings {
        &self.settings
    }

    /// Replicas' worth of work in a sample (see the module doc).
    pub fn demand(sample: &LoadSample) -> f64 {
        if sample.replicas == 0 {
            // Nothing runs: every arrival needs a replica's worth until one measures otherwise.
            return if sample.arrivals_per_s > 0.0 { 1.0 } else { 0.0 };
        }
        let busy = sample.utilisation.clamp(0.0, 1.0) * sample.replicas as f64;
        if sample.served_per_s <= 0.0 {
            return busy;
        }
        // Replica time per request, times the requests that arrive.
        (busy / sample.served_per_s * sample.arrivals_per_s).max(busy)
    }

    fn clamp(&self, n: usize) -> usize {
        n.clamp(self.settings.min_replicas, self.settings.max_replicas)
    }

    /// Takes a sample; returns the count to have now (`current`, or a change with its reason).
    pub fn decide(&mut self, sample: &LoadSample, current: usize) -> Decision {
        let s = self.settings;
        let demand = Self::demand(sample);
        let target = s.target_utilisation.clamp(0.05, 1.0);
        let needed = self.clamp((demand / target).ceil() as usize);
        let needed_down = self.clamp((demand / (target * (1.0 - s.hysteresis.clamp(0.0, 0.9)))).ceil() as usize);
        let idle = sample.arrivals_per_s <= 0.0;
        self.recent.push_back((sample.at, needed, needed_down, idle));
        // Keep the windows, plus the last sample before them (it shows the history covers them).
        let keep = Duration::from_secs_f64(s.up_delay_s.max(s.down_delay_s).max(s.idle_to_zero_s));
        while self.recent.get(1).is_some_and(|(t, ..)| sample.at.saturating_sub(*t) >= keep) {
            self.recent.pop_front();
        }
        let to_zero = s.idle_to_zero_s > 0.0;
        if to_zero && current == 0 {
            // Scaled to zero: stay, unless requests arrive (the pool has woken a replica for them).
            if idle {
                return Decision { replicas: 0, reason: String::new() };
            }
            // Until a replica has measured the work, one; after, what the measured demand needs.
            let to = if sample.replicas == 0 { 1 } else { needed.max(1) };
            return self.change(sample.at, to, format!("woken from zero by {:.1} requests/s", sample.arrivals_per_s));
        }
        let stay = Decision { replicas: self.clamp(current), reason: String::new() };
        if current < s.min_replicas || current > s.max_replicas {
            return self.change(
                sample.at,
                self.clamp(current),
                format!("keeping within {}-{} replicas", s.min_replicas, s.max_replicas),
            );
        }
        let since = |d: f64| sample.at.saturating_sub(Duration::from_secs_f64(d));
        // Up, fast path: a step (twice the work the current count takes at the target), a queue held
        // at its wait target, or saturation: replicas busy all the time with requests waiting behind
        // them (a closed-loop step: arrivals can only equal what the replicas serve, so the demand
        // computed from them stays at the current count while the queue says more).
        let step = demand >= 2.0 * current.max(1) as f64 * target;
        let saturated = sample.utilisation >= SATURATED && sample.queued >= sample.replicas.max(1);
        if needed > current && (step || sample.wait_at_target || saturated) {
            let why = if step {
                "load step"
            } else if sample.wait_at_target {
                "queue wait at its target"
            } else {
                "replicas saturated with requests waiting"
            };
            return self.change(
                sample.at,
                needed,
                format!("{why}: demand {demand:.2} replicas at {:.0}% target utilisation", target * 100.0),
            );
        }
        // Up, sustained: every sample of the up window needs more.
        let window: Vec<usize> =
            self.recent.iter().filter(|(t, ..)| *t >= since(s.up_delay_s)).map(|(_, n, ..)| *n).collect();
        let held_for = |d: f64| {
            self.recent.front().is_some_and(|(t, ..)| sample.at.saturating_sub(*t) >= Duration::from_secs_f64(d))
        };
        let covers = held_for(s.up_delay_s);
        if needed > current && covers && window.iter().all(|&n| n > current) {
            let to = window.iter().copied().min().unwrap_or(needed);
            return self.change(
                sample.at,
                to,
                format!("demand above target for {:.0} s: {demand:.2} replicas", s.up_delay_s),
            );
        }
        let quiet_for =
            |d: f64| self.last_change.is_none_or(|t| sample.at.saturating_sub(t) >= Duration::from_secs_f64(d));
        // To zero: no request for the whole idle window, and no change within it.
        if to_zero
            && quiet_for(s.idle_to_zero_s)
            && held_for(s.idle_to_zero_s)
            && self.recent.iter().filter(|(t, ..)| *t >= since(s.idle_to_zero_s)).all(|(.., idle)| *idle)
        {
            return self.change(sample.at, 0, format!("idle for {:.0} s: scaled to zero", s.idle_to_zero_s));
        }
        // Down: the whole down window, with hysteresis, needs fewer, and the last change is that old.
        let quiet = quiet_for(s.down_delay_s);
        let covers = held_for(s.down_delay_s);
        let most = self
            .recent
            .iter()
            .filter(|(t, ..)| *t >= since(s.down_delay_s))
            .map(|(_, _, n, _)| *n)
            .max()
            .unwrap_or(current);
        if quiet && covers && most < current {
            return self.change(
                sample.at,
                most,
                format!("demand under target for {:.0} s: {demand:.2} replicas", s.down_delay_s),
            );
        }
        stay
    }

    fn change(&mut self, at: Duration, to: usize, reason: String) -> Decision {
        self.last_change = Some(at);
        Decision { replicas: to, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_s: f64, arrivals: f64, capacity_per_replica: f64, replicas: usize) -> LoadSample {
        let capacity = capacity_per_replica * replicas as f64;
        let served = arrivals.min(capacity);
        LoadSample {
            at: Duration::from_secs_f64(at_s),
            arrivals_per_s: arrivals,
            served_per_s: served,
            utilisation: if capacity > 0.0 { served / capacity } else { 0.0 },
            replicas,
            wait_at_target: arrivals > capacity,
            queued: 0,
        }
    }

    #[test]
    fn demand_in_replicas() {
        // (arrivals, capacity per replica, replicas, demand)
        let cases = [(50.0, 100.0, 1, 0.5), (400.0, 100.0, 1, 4.0), (150.0, 100.0, 2, 1.5), (0.0, 100.0, 2, 0.0)];
        for (arrivals, capacity, replicas, want) in cases {
            let d = Autoscaler::demand(&sample(0.0, arrivals, capacity, replicas));
            assert!((d - want).abs() < 1e-9, "{arrivals}/s on {replicas}: {d}, want {want}");
        }
        assert_eq!(Autoscaler::demand(&LoadSample { arrivals_per_s: 5.0, ..Default::default() }), 1.0);
    }

    #[test]
    fn a_gpu_pool_is_capped_at_what_was_measured_or_a_few_replicas() {
        let cpu = AutoscaleSettings { min_replicas: 1, max_replicas: 16, ..Default::default() };
        // (on a GPU, measured replicas per GPU, min, max) -> (min, max)
        #[rustfmt::skip]
        let cases = [
            (false, None, 1, 16, 1, 16),
            (false, Some(3), 1, 16, 1, 16), // a CPU pool ignores GPU figures
            (true, None, 1, 16, 1, 2),
            (true, None, 1, 1, 1, 1),
            (true, None, 4, 16, 2, 2),
            (true, Some(3), 1, 16, 1, 3),
            (true, Some(1), 2, 16, 1, 1),
            (true, Some(6), 1, 4, 1, 4),    // the operator's max still holds
            (true, Some(0), 1, 16, 1, 2),   // nothing measured
        ];
        for (on_gpu, measured, min, max, want_min, want_max) in cases {
            let s = AutoscaleSettings { min_replicas: min, max_replicas: max, ..cpu }.for_device(on_gpu, measured);
            assert_eq!(
                (s.min_replicas, s.max_replicas),
                (want_min, want_max),
                "gpu {on_gpu} {measured:?}, {min}-{max}"
            );
        }
        // A 10x step on a GPU pool: two replicas, not ten.
        let mut a = Autoscaler::new(cpu.for_device(true, None));
        assert_eq!(a.decide(&sample(0.0, 1000.0, 100.0, 1), 1).replicas, 2);
    }

    #[test]
    fn single_decisions() {
        let settings = AutoscaleSettings { max_replicas: 8, ..Default::default() };
        // (arrivals with 100/s per replica, current replicas, expected count)
        let cases = [
            (30.0, 1, 1),   // light load stays
            (400.0, 1, 7),  // a 4x step at 60%: ceil(4 / 0.6) = 7 at once
            (2000.0, 1, 8), // capped at max
            (70.0, 1, 1),   // above target but not a step: waits for the up delay
        ];
        for (arrivals, current, want) in cases {
            let mut a = Autoscaler::new(settings);
            let d = a.decide(&sample(0.0, arrivals, 100.0, current), current);
            assert_eq!(d.replicas, want, "{arrivals}/s on {current}: {d:?}");
        }
        // A closed-loop step: arrivals equal what one replica serves (demand 1.0, not a "step"), but
        // the replica is busy all the time with 11 requests waiting: up at once.
        let closed = LoadSample { served_per_s: 100.0, utilisation: 0.98, queued: 11, ..sample(0.0, 100.0, 100.0, 1) };
        let d = Autoscaler::new(settings).decide(&closed, 1);
        assert_eq!(d.replicas, 2, "{d:?}");
        assert!(d.reason.contains("saturated"), "{d:?}");
        // Busy but nothing waiting: not saturation (waits for the up delay).
        let busy = LoadSample { queued: 0, ..closed };
        assert_eq!(Autoscaler::new(settings).decide(&busy, 1).replicas, 1);
    }

    /// Replays a trace (arrivals per second, one sample a second) through a simulated pool of 100
    /// requests/s per replica that resizes at once; returns (time, replicas) after each sample.
    fn replay(trace: &[f64], settings: AutoscaleSettings) -> Vec<(usize, usize)> {
        let mut a = Autoscaler::new(settings);
        let mut replicas = settings.min_replicas;
        let mut out = Vec::new();
        for (t, &arrivals) in trace.iter().enumerate() {
            replicas = a.decide(&sample(t as f64, arrivals, 100.0, replicas), replicas).replicas;
            out.push((t, replicas));
        }
        out
    }

    fn changes(history: &[(usize, usize)]) -> Vec<(usize, usize)> {
        history.windows(2).filter(|w| w[0].1 != w[1].1).map(|w| w[1]).collect()
    }

    /// A deterministic noise in [-1, 1].
    fn noise(i: usize) -> f64 {
        let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
        (x as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    #[test]
    fn a_4x_step_is_met_within_one_sample_and_undone_only_after_the_down_delay() {
        let settings = AutoscaleSettings { max_replicas: 8, ..Default::default() };
        // 40/s (0.4 of a replica), then 400/s (4x one replica's capacity) from t=30 to t=120.
        let trace: Vec<f64> = (0..300).map(|t| if (30..120).contains(&t) { 400.0 } else { 40.0 }).collect();
        let h = replay(&trace, settings);
        assert_eq!(h[29].1, 1);
        assert_eq!(h[30].1, 7, "the step's own sample decides");
        let down = changes(&h).into_iter().find(|&(t, n)| t > 30 && n < 7).expect("scales down");
        assert!(down.0 >= 120 + 60, "scaled down at {} s, before the down delay after the load ended", down.0);
        assert_eq!(h.last().map(|x| x.1), Some(1));
    }

    #[test]
    fn samples_more_often_than_once_a_second_decide_the_same_way() {
        let settings = AutoscaleSettings { max_replicas: 2, up_delay_s: 1.0, down_delay_s: 2.0, ..Default::default() };
        let mut a = Autoscaler::new(settings);
        let mut replicas = 1;
        let mut history = Vec::new();
        // 0.2 s apart: 4 s saturated (closed loop: arrivals = served), then 6 s idle.
        for i in 0..50 {
            let t = i as f64 * 0.2;
            let s = if t < 4.0 {
                LoadSample {
                    at: Duration::from_secs_f64(t),
                    arrivals_per_s: 160.0,
                    served_per_s: 160.0,
                    utilisation: 0.97,
                    replicas,
                    wait_at_target: false,
                    queued: 0,
                }
            } else {
                LoadSample { at: Duration::from_secs_f64(t), replicas, ..Default::default() }
            };
            replicas = a.decide(&s, replicas).replicas;
            history.push((t, replicas));
        }
        let up = history.iter().find(|h| h.1 == 2).map(|h| h.0).expect("scales up");
        assert!((1.0..1.5).contains(&up), "up at {up} s");
        let down = history.iter().rev().find(|h| h.1 == 2).map(|h| h.0).expect("was up");
        assert!((4.0..7.0).contains(&down), "last at 2 replicas at {down} s: {history:?}");
        assert_eq!(replicas, 1);
    }

    #[test]
    fn idle_goes_to_zero_after_its_window_and_a_request_wakes_it() {
        let settings = AutoscaleSettings { max_replicas: 4, idle_to_zero_s: 10.0, ..Default::default() };
        // 20 s at 50/s, 30 s idle, then 50/s again.
        let trace: Vec<f64> = (0..80).map(|t| if (20..50).contains(&t) { 0.0 } else { 50.0 }).collect();
        let mut a = Autoscaler::new(settings);
        let mut replicas = 1;
        let mut history = Vec::new();
        for (t, &arrivals) in trace.iter().enumerate() {
            // At zero, the pool has woken a replica for the first arrivals by the time of the sample.
            let ready = if replicas == 0 && arrivals > 0.0 { 1 } else { replicas };
            let d = a.decide(&sample(t as f64, arrivals, 100.0, ready), replicas);
            replicas = d.replicas;
            history.push((t, replicas));
        }
        let zero = history.iter().find(|h| h.1 == 0).map(|h| h.0).expect("scales to zero");
        assert_eq!(zero, 30, "idle from 20 s, 10 s window: {history:?}");
        assert!(history[30..50].iter().all(|h| h.1 == 0), "stays at zero while idle: {history:?}");
        assert_eq!(history[50].1, 1, "the first sample with requests wakes it: {history:?}");
        assert!(history[50..].iter().all(|h| h.1 == 1), "{history:?}");
        // Without an idle window, idle load never goes below min.
        let mut never = Autoscaler::new(AutoscaleSettings::default());
        for t in 0..400 {
            assert_eq!(never.decide(&sample(t as f64, 0.0, 100.0, 1), 1).replicas, 1);
        }
    }

    #[test]
    fn a_ramp_only_goes_up() {
        let settings = AutoscaleSettings { max_replicas: 8, ..Default::default() };
        let trace: Vec<f64> = (0..300).map(|t| 20.0 + t as f64 * 1.5).collect();
        let h = replay(&trace, settings);
        assert!(h.windows(2).all(|w| w[1].1 >= w[0].1), "{:?}", changes(&h));
        let last = h.last().map(|x| x.1).unwrap_or(0);
        assert!(last >= 7, "ramp to {} /s ended at {last} replicas", trace[299]);
    }

    #[test]
    fn a_sawtooth_never_goes_up_down_up_within_the_down_delay() {
        let settings = AutoscaleSettings { max_replicas: 8, ..Default::default() };
        // 20 s at 300/s, 20 s at 60/s, repeated.
        let trace: Vec<f64> = (0..600).map(|t| if (t / 20) % 2 == 0 { 300.0 } else { 60.0 }).collect();
        let h = replay(&trace, settings);
        let c = changes(&h);
        for w in c.windows(3) {
            let (up1, down, up2) = (w[0], w[1], w[2]);
            if down.1 < up1.1 && up2.1 > down.1 {
                assert!(down.0 - up1.0 >= 60, "up at {} s, down at {} s: {c:?}", up1.0, down.0);
            }
        }
    }

    #[test]
    fn flat_noisy_load_changes_at_most_once_per_five_minutes() {
        let settings = AutoscaleSettings { max_replicas: 8, ..Default::default() };
        for level in [30.0, 90.0, 150.0, 250.0] {
            // +-25% noise around a flat level, for 30 minutes.
            let trace: Vec<f64> = (0..1800).map(|t| level * (1.0 + 0.25 * noise(t))).collect();
            let h = replay(&trace, settings);
            let c = changes(&h);
            for w in c.windows(2) {
                assert!(w[1].0 - w[0].0 >= 300, "level {level}: changes at {} s and {} s: {c:?}", w[0].0, w[1].0);
            }
            assert!(c.len() <= 2, "level {level}: {c:?}");
        }
    }
}
