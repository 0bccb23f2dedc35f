//! The `hybrid` congestion controller of hub links: BBR and CUBIC side by side, both told of every
//! packet sent, acknowledged and lost, and the larger of their windows sends.
//!
//! Neither of quinn's controllers suits every link an edge sits behind. CUBIC halves its window at
//! every loss, so 1% random loss holds it to a few Mbit/s whatever the link (across 40 ms and
//! 50 Mbit/s it carried 1% of the link); BBR is not cut back by random loss, but for traffic as
//! bursty as offload's, one request at a time, its window across a 150 ms link stayed below two
//! requests (requests took a round trip longer than the link needs; 39-54% of what the link carries
//! where CUBIC reached 65-71%). On a lossy link CUBIC's window is the small one and BBR's sends. On a
//! clean one CUBIC's takes over only where BBR's limits the sending: CUBIC does not grow on
//! acknowledgements of traffic its window did not limit, so across 150 ms the hybrid carried 39% of
//! the link, between BBR's 13% and CUBIC's 57% in the same run (docs/benchmarks.md). Pure state, no
//! I/O.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, CubicConfig};
use quinn_proto::RttEstimator;

/// Builds [`Hybrid`] controllers.
#[derive(Debug, Default)]
pub(super) struct HybridConfig {
    bbr: Arc<BbrConfig>,
    cubic: Arc<CubicConfig>,
}

impl ControllerFactory for HybridConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Hybrid {
            bbr: self.bbr.clone().build(now, current_mtu),
            cubic: self.cubic.clone().build(now, current_mtu),
        })
    }
}

/// BBR and CUBIC fed the same events; the larger window is the connection's.
pub(super) struct Hybrid {
    bbr: Box<dyn Controller>,
    cubic: Box<dyn Controller>,
}

impl Hybrid {
    fn both(&mut self, mut f: impl FnMut(&mut dyn Controller)) {
        f(self.bbr.as_mut());
        f(self.cubic.as_mut());
    }
}

impl Controller for Hybrid {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.both(|c| c.on_sent(now, bytes, last_packet_number));
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.both(|c| c.on_ack(now, sent, bytes, app_limited, rtt));
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_packet_num_acked: Option<u64>) {
        self.both(|c| c.on_end_acks(now, in_flight, app_limited, largest_packet_num_acked));
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        self.both(|c| c.on_congestion_event(now, sent, is_persistent_congestion, lost_bytes));
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.both(|c| c.on_mtu_update(new_mtu));
    }

    fn window(&self) -> u64 {
        self.bbr.window().max(self.cubic.window())
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Hybrid { bbr: self.bbr.clone_box(), cubic: self.cubic.clone_box() })
    }

    fn initial_window(&self) -> u64 {
        self.bbr.initial_window().max(self.cubic.initial_window())
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// One event as the connection would report it.
    #[derive(Clone, Copy)]
    enum Event {
        Sent(u64),
        Lost(u64),
        PersistentCongestion,
    }

    fn feed(c: &mut dyn Controller, events: &[Event], t0: Instant) {
        for (i, e) in events.iter().enumerate() {
            let now = t0 + Duration::from_millis(10 * (i as u64 + 1));
            match *e {
                Event::Sent(bytes) => c.on_sent(now, bytes, i as u64),
                Event::Lost(bytes) => c.on_congestion_event(now, now, false, bytes),
                Event::PersistentCongestion => c.on_congestion_event(now, now, true, 1200),
            }
        }
    }

    #[test]
    fn the_larger_window_of_bbr_and_cubic_fed_the_same_events_sends() {
        use Event::*;
        let t0 = Instant::now();
        #[rustfmt::skip]
        let cases: [(&str, Vec<Event>); 4] = [
            ("fresh", vec![]),
            ("sending only", vec![Sent(1200), Sent(1200), Sent(1200)]),
            ("a random loss: CUBIC cuts back, BBR does not", vec![Sent(12_000), Lost(1200)]),
            ("losses and a persistent congestion", vec![Sent(12_000), Lost(1200), Sent(12_000), Lost(2400), PersistentCongestion]),
        ];
        for (name, events) in cases {
            let mut hybrid = Arc::new(HybridConfig::default()).build(t0, 1200);
            let mut bbr = Arc::new(BbrConfig::default()).build(t0, 1200);
            let mut cubic = Arc::new(CubicConfig::default()).build(t0, 1200);
            for c in [hybrid.as_mut(), bbr.as_mut(), cubic.as_mut()] {
                feed(c, &events, t0);
            }
            let want = bbr.window().max(cubic.window());
            assert_eq!(hybrid.window(), want, "{name}: bbr {}, cubic {}", bbr.window(), cubic.window());
            assert_eq!(hybrid.clone_box().window(), want, "{name}: a clone keeps both states");
        }
        // After a loss the hybrid keeps sending at BBR's window where CUBIC alone would halve.
        let mut hybrid = Arc::new(HybridConfig::default()).build(t0, 1200);
        let mut cubic = Arc::new(CubicConfig::default()).build(t0, 1200);
        let before = cubic.window();
        for c in [hybrid.as_mut(), cubic.as_mut()] {
            feed(c, &[Event::Sent(12_000), Event::Lost(1200)], t0);
        }
        assert!(cubic.window() < before, "CUBIC did not cut back at a loss");
        assert!(hybrid.window() > cubic.window(), "the hybrid cut back as CUBIC does");
    }
}
