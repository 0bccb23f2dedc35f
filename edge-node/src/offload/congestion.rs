//! The `hybrid` congestion controller of hub links: BBR and CUBIC side by side, both told of every
//! packet sent, acknowledged and lost; CUBIC's window sends while the link loses few packets, BBR's
//! once it loses more.
//!
//! Neither of quinn's controllers suits every link an edge sits behind. CUBIC halves its window at
//! every loss, so 1% random loss holds it to a few Mbit/s whatever the link (across 40 ms and
//! 50 Mbit/s it carried 1% of the link); BBR is not cut back by random loss, but for traffic as
//! bursty as offload's, one request at a time, its window across a 150 ms link stayed below two
//! requests (39-54% of what the link carries where CUBIC reached 65-71%). Which one a link needs is
//! how it loses: random loss comes as a loss episode nearly every round trip, a queue overrun by
//! CUBIC itself as one episode every few seconds. So the hybrid counts loss episodes (as CUBIC does:
//! a loss of a packet sent before the last episode began belongs to it) per packet sent, over the
//! last few thousand packets: above [`LOSSY`] the link is lossy and BBR's window sends; below
//! [`CLEAN`] CUBIC's (the gap keeps a link near the line from flapping). Both controllers see every
//! event all along, so the one taking over is warm. Until [`MIN_SAMPLE`] packets were sent, CUBIC's.
//! (Counting lost bytes, or each report of losses, instead flipped the clean 150 ms link to BBR at
//! CUBIC's first queue overrun: 14-20% of the link against CUBIC's 58-60%.)
//!
//! An earlier hybrid sent at the larger of the two windows: on the long clean link CUBIC then did
//! not grow (its window did not limit the sending) and the hybrid stayed near BBR (docs/benchmarks.md).
//! Pure state, no I/O.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, CubicConfig};
use quinn_proto::RttEstimator;

/// Loss episodes per packet sent above which the link counts as lossy (BBR's window sends): 1%
/// random loss across 40 ms and 50 Mbit/s makes one about every 200 packets.
pub(super) const LOSSY: f64 = 0.003;
/// Loss episodes per packet below which a lossy link counts as clean again (CUBIC's window sends).
pub(super) const CLEAN: f64 = 0.0015;
/// Packets sent before the link is judged.
pub(super) const MIN_SAMPLE: u64 = 300;
/// Packets sent after which both counts are halved, so the judgement follows the link's recent past.
pub(super) const DECAY_AFTER: u64 = 8000;

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
            loss: LossShare::new(current_mtu),
        })
    }
}

/// Packets sent and loss events lately, and whether the link counts as lossy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct LossShare {
    /// Bytes sent, counted in packets of `mtu` (quinn reports a whole batch of datagrams at once).
    sent_bytes: u64,
    events: u64,
    mtu: u64,
    lossy: bool,
    /// When the last counted episode began; losses of packets sent before it belong to it.
    episode: Option<Instant>,
}

impl LossShare {
    /// Nothing counted yet, packets of `mtu` bytes.
    pub(super) fn new(mtu: u16) -> Self {
        LossShare { sent_bytes: 0, events: 0, mtu: u64::from(mtu.max(1)), lossy: false, episode: None }
    }

    fn packets(&self) -> u64 {
        self.sent_bytes / self.mtu
    }

    /// Counts bytes sent, halving both counts past [`DECAY_AFTER`] packets.
    pub(super) fn sent(&mut self, bytes: u64) {
        self.sent_bytes += bytes;
        if self.packets() > DECAY_AFTER {
            self.sent_bytes /= 2;
            self.events /= 2;
        }
        self.judge();
    }

    /// Counts a loss found at `now` of a packet sent at `sent`: a new episode unless that packet was
    /// sent before the last episode began.
    pub(super) fn lost(&mut self, now: Instant, sent: Instant) {
        if self.episode.is_some_and(|began| sent <= began) {
            return;
        }
        self.episode = Some(now);
        self.events += 1;
        self.judge();
    }

    /// The packet size the counts are in, as path MTU discovery raises it.
    pub(super) fn mtu(&mut self, mtu: u16) {
        self.mtu = u64::from(mtu.max(1));
    }

    fn judge(&mut self) {
        let packets = self.packets();
        if packets < MIN_SAMPLE {
            return;
        }
        let share = self.events as f64 / packets as f64;
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
        self.loss.lost(now, sent);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.both(|c| c.on_mtu_update(new_mtu));
        self.loss.mtu(new_mtu);
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
    fn cubic_sends_on_a_clean_link_and_bbr_once_the_link_loses_often() {
        use Event::*;
        let t0 = Instant::now();
        let packets = |n: u64| Sent(n * 1200);
        let spread =
            |events: u64, per: u64| -> Vec<Event> { (0..events).flat_map(|_| [packets(per), Lost(1200)]).collect() };
        // (case, events, BBR's window sends)
        #[rustfmt::skip]
        let cases: [(&str, Vec<Event>, bool); 8] = [
            ("fresh", vec![], false),
            ("sending only", vec![packets(3)], false),
            ("losses before enough was sent to judge", spread(2, 100), false),
            ("a loss every 100 packets (random loss)", spread(20, 100), true),
            ("one burst of 60 packets in 2,000 (a queue overrun)", vec![packets(2000), Lost(72_000)], false),
            ("a loss every 1,000 packets", spread(4, 1000), false),
            ("persistent congestion once on a clean link: both collapse, CUBIC's window", vec![packets(2000), PersistentCongestion], false),
            ("lossy, then clean for long enough: CUBIC again", [spread(20, 100), vec![packets(8000), packets(8000)]].concat(), false),
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
    fn loss_events_per_packet_judge_the_link_with_a_gap_between_lossy_and_clean() {
        let t0 = Instant::now();
        let mut tick = 0u64;
        let mut at = || {
            tick += 1;
            t0 + Duration::from_millis(tick)
        };
        let mut episode = |share: &mut LossShare| {
            let t = at();
            share.lost(t, t);
        };
        let mut share = LossShare::new(1000);
        share.sent((MIN_SAMPLE - 1) * 1000);
        (0..100).for_each(|_| episode(&mut share));
        assert!(!share.lossy(), "judged before MIN_SAMPLE packets were sent");
        share.sent(1000);
        assert!(share.lossy(), "a loss every 10 packets is lossy");
        let mut share = LossShare::new(1000);
        share.sent(1_000_000);
        (0..2).for_each(|_| episode(&mut share));
        assert!(!share.lossy(), "0.2% is under LOSSY");
        (0..2).for_each(|_| episode(&mut share));
        assert!(share.lossy(), "0.4% is over LOSSY");
        share.sent(1_000_000);
        assert!(share.lossy(), "0.2%: between the two, stays lossy");
        share.sent(1_000_000);
        assert!(!share.lossy(), "0.13% is under CLEAN");
        let mut share = LossShare::new(1000);
        share.sent(DECAY_AFTER * 1000);
        (0..80).for_each(|_| episode(&mut share));
        share.sent(1000);
        assert_eq!((share.packets(), share.events), ((DECAY_AFTER + 1) / 2, 40), "halved past DECAY_AFTER");
        share.mtu(500);
        assert_eq!(share.packets(), DECAY_AFTER + 1, "counted in packets of the new MTU");
        // A burst found lost over several reports is one episode: its packets were sent before it began.
        let mut share = LossShare::new(1000);
        share.sent(MIN_SAMPLE * 1000);
        let (sent, found) = (at(), at());
        for later in 0..50 {
            share.lost(found + Duration::from_millis(later), sent);
        }
        assert_eq!(share.events, 1, "one episode");
        let next = at() + Duration::from_millis(100);
        share.lost(next, next);
        assert_eq!(share.events, 2, "a packet sent after the episode began starts another");
    }
}
