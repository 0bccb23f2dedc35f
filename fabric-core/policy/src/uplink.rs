//! How long a request takes to reach a hub across its link, and to come back answered: learnt from
//! the requests already sent, so that offload judges each request by its size.
//!
//! A hub's recent answer times alone are blind to size: across a 10 Mbit/s uplink a 196 KB request
//! spends 157 ms on the wire, a 4 KB one 3 ms. The rate is learnt where the bottleneck's pace shows,
//! at the receiving end: each answer says how many bytes the hub's connection received while the
//! request arrived, and over how long ([`Uplink::delivered`]), and how long the hub took after
//! ([`Uplink::hub_took`]). The connection's bytes, not the request's own: across 40 ms and 50 Mbit/s
//! with 1% loss a request's own bytes over its arrival read 23-28 Mbit/s (a loss near its end
//! stretches the arrival by a round trip while the link carries other bytes), the connection's 47.
//! (Timing uploads by the hub's acknowledgements at the sender, as this did first, was off by up to
//! 1.6x either way across a 10 Mbit/s link: acknowledgements come late, and a request's start
//! includes the time it waits in the edge's own send buffer.)
//!
//! What is still to cross is a fluid backlog ([`Uplink::sent`]): every request sent adds its bytes,
//! the link drains them at the learnt rate. A request sent now arrives after half the path's round
//! trip plus the backlog and its own bytes at that rate, and is answered after the hub's usual time
//! and the other half of the round trip. On a link too fast for a transfer to show (a window under
//! [`MIN_WIRE`], loopback or a LAN), no rate is learnt and a transfer costs nothing extra.
//!
//! A rate is forgotten once no arrival has refreshed it for [`RATE_STALE`]: an estimate learnt low
//! (the first request of a connection crosses in slow start; a loss burst) would otherwise keep every
//! request off the link, and a link no request crosses teaches nothing new. The next request is then
//! a probe ([`Uplink::probing`]): sent alone, on the round trip's estimate, and its arrival's rate
//! replaces the old one. (Measured across 150 ms and 10 Mbit/s: one slow first sample, 1.3 Mbit/s,
//! held offload to 1 request in 10 s.)

use std::time::{Duration, Instant};

/// An arrival shorter than this shows nothing of the link's rate.
pub const MIN_WIRE: Duration = Duration::from_millis(2);
/// An arrival of fewer bytes than this (about a dozen packets) is too short a train to time.
pub const MIN_SAMPLE_BYTES: u64 = 16 * 1024;

/// A learnt rate not refreshed by an arrival for this long is forgotten, and the next request probes.
pub const RATE_STALE: Duration = Duration::from_secs(2);

/// Weight of the newest sample in the moving averages.
const WEIGHT: f64 = 0.2;

/// What an edge has learnt of its uplink to one hub.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Uplink {
    /// Bytes a second the hub received while requests arrived (`None`: no arrival ever showed it).
    bytes_per_s: Option<f64>,
    /// The hub's own time from a request's last bytes to its answer.
    hub_time: Option<Duration>,
    /// Bytes sent and, at the learnt rate, not yet across, as of the instant beside them.
    backlog: Option<(f64, Instant)>,
    /// When an arrival last refreshed the rate.
    learnt_at: Option<Instant>,
}

fn average(old: Option<f64>, sample: f64) -> f64 {
    match old {
        None => sample,
        Some(avg) => avg + WEIGHT * (sample - avg),
    }
}

impl Uplink {
    /// The hub's connection received `bytes` over `window` while one request arrived, told at `now`
    /// (a rate gone stale is replaced by the sample, not averaged with it).
    pub fn delivered(&mut self, bytes: u64, window: Duration, now: Instant) {
        if window >= MIN_WIRE && bytes >= MIN_SAMPLE_BYTES {
            let sample = bytes as f64 / window.as_secs_f64();
            self.bytes_per_s = Some(average(self.rate(now), sample));
            self.learnt_at = Some(now);
        }
    }

    /// The hub answered `took` after a request's last bytes reached it.
    pub fn hub_took(&mut self, took: Duration) {
        let avg = average(self.hub_time.map(|d| d.as_secs_f64()), took.as_secs_f64());
        self.hub_time = Some(Duration::from_secs_f64(avg.max(0.0)));
    }

    /// A request of `bytes` was sent at `now`: its bytes join the backlog (none is kept while no rate
    /// is learnt: nothing could say when they have crossed).
    pub fn sent(&mut self, bytes: u64, now: Instant) {
        self.backlog = self.rate(now).map(|_| (self.backlog_at(now) + bytes as f64, now));
    }

    /// Bytes sent and, at the learnt rate, not yet across at `now` (0 while no rate is learnt).
    pub fn backlog_at(&self, now: Instant) -> f64 {
        match (self.backlog, self.rate(now)) {
            (Some((bytes, at)), Some(rate)) => {
                (bytes - rate * now.saturating_duration_since(at).as_secs_f64()).max(0.0)
            }
            _ => 0.0,
        }
    }

    /// Whether an answer has shown the hub's own time: until then a link carries one request at a
    /// time (a burst sent on a guess could crowd a slow link past every deadline, and teach nothing).
    pub fn measured(&self) -> bool {
        self.hub_time.is_some()
    }

    /// Whether a rate was learnt and has gone stale at `now`: the next request is a probe, sent alone.
    pub fn probing(&self, now: Instant) -> bool {
        self.bytes_per_s.is_some() && self.rate(now).is_none()
    }

    /// The learnt rate in bytes a second, if an arrival ever showed it.
    pub fn bytes_per_s(&self) -> Option<f64> {
        self.bytes_per_s
    }

    /// The learnt rate while fresh at `now`.
    fn rate(&self, now: Instant) -> Option<f64> {
        let fresh = self.learnt_at.is_some_and(|at| now.saturating_duration_since(at) < RATE_STALE);
        self.bytes_per_s.filter(|r| *r > 0.0 && fresh)
    }

    /// Expected time until a request of `bytes` sent at `now` has reached the hub, on a path whose
    /// round trip (without queueing) is `path_rtt`: half of it, plus the backlog and its own bytes at
    /// the learnt rate.
    pub fn upload(&self, bytes: u64, now: Instant, path_rtt: Duration) -> Duration {
        let wire = match self.rate(now) {
            None => Duration::ZERO,
            Some(rate) => Duration::from_secs_f64((self.backlog_at(now) + bytes as f64) / rate),
        };
        path_rtt / 2 + wire
    }

    /// Expected time until its answer: the upload, the hub's usual time, and the way back (`None`
    /// until the hub's time was measured).
    pub fn answer(&self, bytes: u64, now: Instant, path_rtt: Duration) -> Option<Duration> {
        self.hub_time.map(|hub| self.upload(bytes, now, path_rtt) + hub + path_rtt / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn rates_table() {
        // (arrivals the hub reported: bytes, window; then a request of `bytes` sent on an empty
        // link with a 40 ms round trip; its expected upload)
        #[rustfmt::skip]
        let cases: [(&str, Vec<(u64, Duration)>, u64, Duration); 6] = [
            ("nothing learnt: half a round trip", vec![], 196_000, 20 * MS),
            // 125,000 bytes in 100 ms: 1.25 MB/s (10 Mbit/s).
            ("one arrival", vec![(125_000, 100 * MS)], 250_000, 220 * MS),
            ("loopback: the arrival too quick to time", vec![(196_000, MS)], 196_000, 20 * MS),
            ("a short train says nothing", vec![(8_000, 50 * MS)], 196_000, 20 * MS),
            // 10 Mbit/s, then 20: the average moves a fifth of the way (1.25 -> 1.5 MB/s).
            ("moving average", vec![(125_000, 100 * MS), (125_000, 50 * MS)], 150_000, 120 * MS),
            // Another stream's bytes arrived meanwhile: they count, the link carried them.
            ("the link's delivery, not the stream's", vec![(250_000, 200 * MS)], 125_000, 120 * MS),
        ];
        let now = Instant::now();
        for (name, arrivals, bytes, want) in cases {
            let mut up = Uplink::default();
            for (b, window) in arrivals {
                up.delivered(b, window, now);
            }
            let got = up.upload(bytes, now, 40 * MS);
            assert!(got.abs_diff(want) < Duration::from_micros(10), "{name}: {got:?}, want {want:?}");
        }
    }

    #[test]
    fn the_backlog_drains_at_the_learnt_rate() {
        let t0 = Instant::now();
        let mut up = Uplink::default();
        up.sent(196_000, t0);
        assert_eq!(up.backlog_at(t0), 0.0, "no rate learnt: nothing counted ahead");
        up.delivered(125_000, 100 * MS, t0); // 1.25 MB/s
        up.sent(125_000, t0);
        #[rustfmt::skip]
        let cases: [(&str, Duration, f64, Duration); 5] = [
            // 125,000 bytes ahead plus 125,000 of its own: 200 ms, plus 20 ms.
            ("right behind another", Duration::ZERO, 125_000.0, 220 * MS),
            ("half drained", 50 * MS, 62_500.0, 170 * MS),
            ("drained", 100 * MS, 0.0, 120 * MS),
            ("idle: never below empty", 1_000 * MS, 0.0, 120 * MS),
            ("long idle: the rate forgotten, the request a probe", 10_000 * MS, 0.0, 20 * MS),
        ];
        for (name, after, backlog, upload) in cases {
            let at = t0 + after;
            assert!((up.backlog_at(at) - backlog).abs() < 1.0, "{name}: {}", up.backlog_at(at));
            let got = up.upload(125_000, at, 40 * MS);
            assert!(got.abs_diff(upload) < Duration::from_micros(10), "{name}: {got:?}");
        }
        // Sent again once half drained: what is left plus the new bytes.
        up.sent(125_000, t0 + 50 * MS);
        assert!((up.backlog_at(t0 + 50 * MS) - 187_500.0).abs() < 1.0);
    }

    #[test]
    fn a_stale_rate_is_forgotten_and_the_next_sample_replaces_it() {
        let t0 = Instant::now();
        let mut up = Uplink::default();
        assert!(!up.probing(t0), "never learnt (a fast link): nothing to probe");
        up.delivered(125_000, 1000 * MS, t0); // learnt low: 125 KB/s
        #[rustfmt::skip]
        let cases = [
            ("fresh: 125 KB at the learnt rate", t0 + 1000 * MS, false, 1020 * MS),
            ("stale: the probe is judged by the round trip", t0 + RATE_STALE, true, 20 * MS),
        ];
        for (name, at, probing, upload) in cases {
            assert_eq!(up.probing(at), probing, "{name}");
            let got = up.upload(125_000, at, 40 * MS);
            assert!(got.abs_diff(upload) < Duration::from_micros(10), "{name}: {got:?}");
        }
        // The probe's arrival shows 1.25 MB/s: it replaces the stale rate (averaged, 350 KB/s).
        let t1 = t0 + RATE_STALE + 300 * MS;
        up.delivered(125_000, 100 * MS, t1);
        assert!(!up.probing(t1));
        assert_eq!(up.bytes_per_s().map(|r| r.round()), Some(1_250_000.0));
        let got = up.upload(125_000, t1, 40 * MS);
        assert!(got.abs_diff(120 * MS) < Duration::from_micros(10), "{got:?}");
    }

    #[test]
    fn the_answer_adds_the_hubs_time_and_the_way_back() {
        let now = Instant::now();
        let mut up = Uplink::default();
        assert_eq!(up.answer(1000, now, 40 * MS), None, "the hub's time not measured yet");
        up.delivered(125_000, 100 * MS, now);
        up.hub_took(10 * MS);
        // 20 ms there, 100 ms on the wire, 10 ms at the hub, 20 ms back.
        assert_eq!(up.answer(125_000, now, 40 * MS), Some(150 * MS));
        up.hub_took(20 * MS); // 10 + (20 - 10) / 5
        let got = up.answer(125_000, now, 40 * MS).expect("measured");
        assert!(got.abs_diff(152 * MS) < Duration::from_micros(10), "{got:?}");
        assert_eq!(up.bytes_per_s().map(|r| r.round()), Some(1_250_000.0));
    }
}
