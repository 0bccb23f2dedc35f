//! The `hybrid` congestion controller of hub links: BBR and CUBIC side by side, both told of every
//! packet sent, acknowledged and lost; CUBIC's window sends while the link loses few packets, BBR's
//! once it loses more.
//!
//! Neither of quinn's controllers suits every link an edge sits behind. CUBIC halves its window at
//! every loss, so 1% random loss holds it to a few Mbit/s whatever the link (across 40 ms and
//! 50 Mbit/s it carried 1% of the link); BBR is not cut back by random loss, but for traffic as
//! bursty as offload's, one request at a time, its window across a 150 ms link stayed below two
//! requests (39-54% of what the link carries where CUBIC reached 65-71%). Which one a link needs is
//! what it loses: the share of bytes declared lost, over the last few megabytes sent. Above
//! [`LOSSY`] the link is lossy and BBR's window sends; below [`CLEAN`] CUBIC's (the gap between the
//! two keeps a link near the line from flapping). Both controllers see every event all along, so
//! the one taking over is warm. Until [`MIN_SAMPLE`] bytes were sent, CUBIC's (the two start alike).
//!
//! An earlier hybrid sent at the larger of the two windows: on the long clean link CUBIC then did
//! not grow (its window did not limit the sending) and the hybrid stayed near BBR (docs/benchmarks.md).
//! Pure state, no I/O.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, CubicConfig};
use quinn_proto::RttEstimator;

/// Share of bytes lost above which the link counts as lossy (BBR's window sends).
pub(super) const LOSSY: f64 = 0.005;
/// Share of bytes lost below which a lossy link counts as clean again (CUBIC's window sends).
pub(super) const CLEAN: f64 = 0.0025;
/// Bytes sent before the loss share is judged.
pub(super) const MIN_SAMPLE: u64 = 128 * 1024;
/// Bytes sent after which both counts are halved, so the share follows the link's recent past.
pub(super) const DECAY_AFTER: u64 = 8 * 1024 * 1024;

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
            loss: LossShare::default(),
        })
    }
}

/// Bytes sent and lost lately, and whether the link counts as lossy.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct LossShare {
    sent: u64,
    lost: u64,
    lossy: bool,
}

impl LossShare {
    /// Counts bytes sent, halving both counts past [`DECAY_AFTER`].
    pub(super) fn sent(&mut self, bytes: u64) {
        self.sent += bytes;
        if self.sent > DECAY_AFTER {
            self.sent /= 2;
            self.lost /= 2;
        }
        self.judge();
    }

    /// Counts bytes declared lost.
    pub(super) fn lost(&mut self, bytes: u64) {
        self.lost += bytes;
        self.judge();
    }

    fn judge(&mut self) {
        if self.sent < MIN_SAMPLE {
            return;
        }
        let share = self.lost as f64 / self.sent as f64;
        if share > LOSSY {
            self.lossy = true;
        } else if share < CLEAN {
            self.lossy = false;
        }
    }

    /// Whether the link loses enough that BBR's window should send.
    pub(super) fn lossy(&self) -> bool {
        self.lossy
    }
}

/// BBR and CUBIC fed the same events; CUBIC's window sends on a clean link, BBR's on a lossy one.
pub(super) struct Hybrid {
    bbr: Box<dyn Controller>,
    cubic: Box<dyn Controller>,
    loss: LossShare,
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
        self.loss.sent(bytes);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.both(|c| c.on_ack(now, sent, bytes, app_limited, rtt));
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_packet_num_acked: Option<u64>) {
        self.both(|c| c.on_end_acks(now, in_flight, app_limited, largest_packet_num_acked));
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        self.both(|c| c.on_congestion_event(now, sent, is_persistent_congestion, lost_bytes));
        self.loss.lost(lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.both(|c| c.on_mtu_update(new_mtu));
    }

    fn window(&self) -> u64 {
        if self.loss.lossy() {
            self.bbr.window()
        } else {
            self.cubic.window()
        }
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Hybrid { bbr: self.bbr.clone_box(), cubic: self.cubic.clone_box(), loss: self.loss })
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
    fn cubic_sends_on_a_clean_link_and_bbr_once_the_link_loses_past_the_lossy_share() {
        use Event::*;
        let t0 = Instant::now();
        let kb = 1024;
        // (case, events, BBR's window sends)
        #[rustfmt::skip]
        let cases: [(&str, Vec<Event>, bool); 7] = [
            ("fresh", vec![], false),
            ("sending only", vec![Sent(1200), Sent(1200), Sent(1200)], false),
            ("a loss before enough was sent to judge", vec![Sent(12 * kb), Lost(1200)], false),
            ("1% lost over 1 MB", vec![Sent(1024 * kb), Lost(10 * kb)], true),
            ("0.1% lost over 1 MB", vec![Sent(1024 * kb), Lost(kb)], false),
            ("lossy, then clean for long enough: CUBIC again", vec![Sent(1024 * kb), Lost(10 * kb), Sent(8 * 1024 * kb), Sent(8 * 1024 * kb)], false),
            ("lossy, then a little clean sending: still BBR (between the shares)", vec![Sent(1024 * kb), Lost(10 * kb), Sent(1024 * kb)], true),
        ];
        for (name, events, bbr_sends) in cases {
            let mut hybrid = Arc::new(HybridConfig::default()).build(t0, 1200);
            let mut bbr = Arc::new(BbrConfig::default()).build(t0, 1200);
            let mut cubic = Arc::new(CubicConfig::default()).build(t0, 1200);
            for c in [hybrid.as_mut(), bbr.as_mut(), cubic.as_mut()] {
                feed(c, &events, t0);
            }
            let want = if bbr_sends { bbr.window() } else { cubic.window() };
            assert_eq!(hybrid.window(), want, "{name}: bbr {}, cubic {}", bbr.window(), cubic.window());
            assert_eq!(hybrid.clone_box().window(), want, "{name}: a clone keeps both states");
        }
    }

    #[test]
    fn the_loss_share_judges_recent_bytes_with_a_gap_between_lossy_and_clean() {
        let mut share = LossShare::default();
        share.sent(MIN_SAMPLE - 1);
        share.lost(MIN_SAMPLE / 2);
        assert!(!share.lossy(), "judged before MIN_SAMPLE bytes were sent");
        share.sent(1);
        assert!(share.lossy(), "half lost is lossy");
        let mut share = LossShare::default();
        share.sent(1_000_000);
        share.lost(4_000);
        assert!(!share.lossy(), "0.4% is under LOSSY");
        share.lost(2_000);
        assert!(share.lossy(), "0.6% is over LOSSY");
        share.sent(1_000_000);
        assert!(share.lossy(), "0.3%: between the shares, stays lossy");
        share.sent(1_000_000);
        assert!(!share.lossy(), "0.2% is under CLEAN");
        let mut share = LossShare::default();
        share.sent(DECAY_AFTER);
        share.lost(DECAY_AFTER / 100);
        share.sent(1);
        assert_eq!((share.sent, share.lost), ((DECAY_AFTER + 1) / 2, DECAY_AFTER / 200), "halved past DECAY_AFTER");
    }
}
