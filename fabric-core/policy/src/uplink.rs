//! How long a request takes to reach a hub across its link, and to come back answered: learnt from
//! the requests already sent, so that offload judges each request by its size.
//!
//! A hub's recent answer times alone are blind to size: across a 10 Mbit/s uplink a 196 KB request
//! spends 157 ms on the wire, a 4 KB one 3 ms. Each sent request gives two measurements: how long
//! after its first byte was written the hub acknowledged its last (`upload`), and how long after that
//! its answer came (`after_upload`: the hub's queue and compute, and the way back). The upload is
//! modelled as one round trip plus the bytes that had to cross before it was complete (its own and
//! those of earlier requests still unacknowledged when it started) at the link's rate; the rate is
//! the moving average of what each upload shows. On a link too fast for its transfer to show (under
//! [`MIN_WIRE`], loopback or a LAN), no rate is learnt and a transfer costs nothing extra.

use std::time::Duration;

/// A transfer shorter than this (after the round trip) shows nothing of the link's rate.
pub const MIN_WIRE: Duration = Duration::from_millis(2);

/// Weight of the newest sample in the moving averages.
const WEIGHT: f64 = 0.2;

/// What an edge has learnt of its uplink to one hub.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Uplink {
    /// Bytes a second the link carried, while the transfer showed (`None`: never did).
    bytes_per_s: Option<f64>,
    /// From the hub's acknowledgement of a request's last byte to its answer.
    after_upload: Option<Duration>,
    /// The shortest round trip seen: the path's own delay. QUIC's smoothed round trip also holds
    /// the time datagrams queue at the bottleneck, which the bytes ahead already account for
    /// (measured across a 150 ms, 10 Mbit/s link: smoothed 200 ms, and a rate taken against it
    /// came out twice the link's).
    min_rtt: Option<Duration>,
}

fn average(old: Option<f64>, sample: f64) -> f64 {
    match old {
        None => sample,
        Some(avg) => avg + WEIGHT * (sample - avg),
    }
}

impl Uplink {
    /// A request of `bytes`, sent with `ahead` bytes of earlier requests still unacknowledged, was
    /// acknowledged `upload` after its first byte was written, on a path whose round trip is `rtt`.
    pub fn uploaded(&mut self, bytes: u64, ahead: u64, upload: Duration, rtt: Duration) {
        let rtt = self.path_rtt(rtt);
        self.min_rtt = Some(rtt);
        let wire = upload.saturating_sub(rtt);
        if wire >= MIN_WIRE {
            let sample = (bytes + ahead) as f64 / wire.as_secs_f64();
            self.bytes_per_s = Some(average(self.bytes_per_s, sample));
        }
    }

    /// A request's answer came `after` the hub had acknowledged its last byte.
    pub fn answered(&mut self, after: Duration) {
        let avg = average(self.after_upload.map(|d| d.as_secs_f64()), after.as_secs_f64());
        self.after_upload = Some(Duration::from_secs_f64(avg.max(0.0)));
    }

    /// The path's own round trip: the shortest seen, `rtt` (QUIC's current estimate) included.
    fn path_rtt(&self, rtt: Duration) -> Duration {
        self.min_rtt.map_or(rtt, |m| m.min(rtt))
    }

    /// The learnt rate in bytes a second, if the link ever showed it.
    pub fn bytes_per_s(&self) -> Option<f64> {
        self.bytes_per_s
    }

    /// Expected time until a request of `bytes`, sent now with `ahead` bytes unacknowledged before
    /// it, has reached the hub: the path's round trip, plus the bytes at the learnt rate.
    pub fn upload(&self, bytes: u64, ahead: u64, rtt: Duration) -> Duration {
        let rtt = self.path_rtt(rtt);
        match self.bytes_per_s.filter(|r| *r > 0.0) {
            None => rtt,
            Some(rate) => rtt + Duration::from_secs_f64((bytes + ahead) as f64 / rate),
        }
    }

    /// Expected time until its answer: the upload, then the hub's usual time from upload to answer
    /// (`None` until one answer was measured).
    pub fn answer(&self, bytes: u64, ahead: u64, rtt: Duration) -> Option<Duration> {
        self.after_upload.map(|after| self.upload(bytes, ahead, rtt) + after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn uploads_table() {
        // (what was measured: bytes, ahead, upload, rtt; then a request asked about: bytes, ahead,
        // rtt; its expected upload)
        #[rustfmt::skip]
        let cases: [(&str, Vec<(u64, u64, Duration)>, (u64, u64), Duration); 6] = [
            ("nothing learnt: a round trip", vec![], (196_000, 0), 40 * MS),
            // 125,000 bytes in 100 ms past a 40 ms round trip: 1.25 MB/s (10 Mbit/s).
            ("one sample", vec![(125_000, 0, 140 * MS)], (250_000, 0), 240 * MS),
            ("bytes ahead wait too", vec![(125_000, 0, 140 * MS)], (125_000, 125_000), 240 * MS),
            // Two requests of 62,500 bytes, the second behind the first: the same rate.
            ("a sample with bytes ahead", vec![(62_500, 62_500, 140 * MS)], (125_000, 0), 140 * MS),
            ("loopback: the transfer never shows", vec![(196_000, 0, 41 * MS)], (196_000, 0), 40 * MS),
            // 10 Mbit/s, then 20: the average moves a fifth of the way (1.25 -> 1.5 MB/s).
            ("moving average", vec![(125_000, 0, 140 * MS), (125_000, 0, 90 * MS)], (150_000, 0), 140 * MS),
        ];
        for (name, samples, (bytes, ahead), want) in cases {
            let mut up = Uplink::default();
            for (b, a, took) in samples {
                up.uploaded(b, a, took, 40 * MS);
            }
            let got = up.upload(bytes, ahead, 40 * MS);
            let diff = got.abs_diff(want);
            assert!(diff < Duration::from_micros(10), "{name}: {got:?}, want {want:?}");
        }
    }

    #[test]
    fn queueing_in_the_smoothed_round_trip_is_not_taken_for_speed() {
        let mut up = Uplink::default();
        // The first upload sees the path's 40 ms; later QUIC's smoothed round trip grows to 90 ms as
        // datagrams queue, and the rate is still taken against 40 ms.
        up.uploaded(125_000, 0, 140 * MS, 40 * MS);
        up.uploaded(125_000, 0, 140 * MS, 90 * MS);
        assert_eq!(up.bytes_per_s().map(|r| r.round()), Some(1_250_000.0));
        assert_eq!(up.upload(125_000, 0, 90 * MS), 140 * MS);
    }

    #[test]
    fn the_answer_adds_the_hubs_time_after_the_upload() {
        let mut up = Uplink::default();
        assert_eq!(up.answer(1000, 0, 40 * MS), None, "no answer measured yet");
        up.uploaded(125_000, 0, 140 * MS, 40 * MS);
        up.answered(10 * MS);
        assert_eq!(up.answer(125_000, 0, 40 * MS), Some(150 * MS));
        up.answered(20 * MS); // 10 + (20 - 10) / 5
        let got = up.answer(125_000, 0, 40 * MS).expect("measured");
        assert!(got.abs_diff(152 * MS) < Duration::from_micros(10), "{got:?}");
        assert_eq!(up.bytes_per_s().map(|r| r.round()), Some(1_250_000.0));
    }
}
