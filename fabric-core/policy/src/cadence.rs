//! When a node reports without waiting for its heartbeat: an idle node's heartbeat is held long by
//! the registry (its report changes nothing), so the node sends a fresh one as soon as its report says
//! something the registry acts on: a version appears, goes, becomes ready or fails, traffic starts or
//! stops, or the load moves enough for the autoscaler to care.

/// What the registry acts on in one version's report.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionActivity {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// Ready to serve.
    pub ready: bool,
    /// Replicas loading.
    pub loading: usize,
    /// Replicas replaced so far.
    pub restarts: u64,
    /// Whether a load is failing.
    pub failing: bool,
    /// Requests arriving per second (the short window the autoscaler reads).
    pub arrivals_per_s: f64,
    /// Requests arrived over the report's whole window (seconds), or waiting now.
    pub busy: bool,
}

/// Relative change of arrivals that is worth reporting at once.
pub const ARRIVALS_CHANGE: f64 = 0.5;
/// Below this rate a change is noise of the short window, not a step (requests per second).
pub const ARRIVALS_FLOOR: f64 = 4.0;

/// Whether `now` differs from what was last `sent` in a way the registry acts on.
pub fn report_early(sent: &[VersionActivity], now: &[VersionActivity]) -> bool {
    if sent.len() != now.len() {
        return true;
    }
    sent.iter().zip(now).any(|(a, b)| {
        let moved =
            (b.arrivals_per_s - a.arrivals_per_s).abs() > ARRIVALS_CHANGE * a.arrivals_per_s.max(ARRIVALS_FLOOR);
        (a.name != b.name || a.version != b.version)
            || (a.ready, a.loading, a.restarts, a.failing, a.busy)
                != (b.ready, b.loading, b.restarts, b.failing, b.busy)
            || moved
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(arrivals: f64) -> VersionActivity {
        VersionActivity {
            name: "m".into(),
            version: 1,
            ready: true,
            loading: 0,
            restarts: 0,
            failing: false,
            arrivals_per_s: arrivals,
            busy: arrivals > 0.0,
        }
    }

    #[test]
    fn reports_early_only_on_what_the_registry_acts_on() {
        let restarted = VersionActivity { restarts: 1, ..v(0.0) };
        let queued = VersionActivity { busy: true, ..v(0.0) };
        let sparse = |a: f64| VersionActivity { busy: true, ..v(a) };
        let other = VersionActivity { version: 2, ..v(0.0) };
        let cases: Vec<(Vec<VersionActivity>, Vec<VersionActivity>, bool, &str)> = vec![
            (vec![v(0.0)], vec![v(0.0)], false, "idle stays idle"),
            (vec![v(0.0)], vec![v(0.5)], true, "traffic starts"),
            (vec![v(40.0)], vec![v(0.0)], true, "traffic stops"),
            (vec![v(100.0)], vec![v(130.0)], false, "+30%: noise"),
            (vec![v(100.0)], vec![v(200.0)], true, "a step"),
            (vec![v(0.0)], vec![restarted], true, "a replica restarted"),
            (vec![v(0.0)], vec![queued], true, "requests arrive or queue"),
            (vec![sparse(1.3)], vec![sparse(2.7)], false, "a few requests a second: short-window noise"),
            (vec![sparse(1.3)], vec![sparse(0.0)], false, "still busy over the long window"),
            (vec![v(0.0)], vec![other.clone()], true, "another version"),
            (vec![v(0.0)], vec![v(0.0), other.clone()], true, "a version loaded"),
            (vec![], vec![], false, "nothing served"),
        ];
        for (sent, now, want, why) in cases {
            assert_eq!(report_early(&sent, &now), want, "{why}");
        }
    }
}
