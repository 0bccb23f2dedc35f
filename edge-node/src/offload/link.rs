//! One hub link's state: its connection, what the registry says of it (down, retired), its health
//! as the pure hub policy keeps it, its requests in flight and its metrics.

use super::*;

/// One hub's link: connection (when up), reported load, measured answer time.
pub(super) struct HubLink {
    /// Where it came from: the config (kept for the life of the process) or the registry.
    pub(super) from_registry: bool,
    /// The registry says it stopped heartbeating: not used until it comes back.
    pub(super) down: AtomicBool,
    /// Replaced or dropped: its connector closes the connection and ends.
    pub(super) retired: AtomicBool,
    /// `host:port` as configured (resolved at each connect).
    pub(super) addr: String,
    pub(super) server_name: String,
    pub(super) conn: Mutex<Option<quinn::Connection>>,
    pub(super) name: Mutex<String>,
    pub(super) in_flight: AtomicU32,
    pub(super) health: Mutex<HubHealth>,
    /// What the hub's answers have shown of the link (its rate, the hub's own time) and its backlog.
    pub(super) uplink: Mutex<Uplink>,

    /// Whether the current connection has shown the hub accepted this node (an answer or a load report).
    pub(super) proven: AtomicBool,
    /// Connection attempts since start.
    pub(super) attempts: AtomicU64,
    /// Where its state and attempts are counted.
    pub(super) metrics: Option<Metrics>,
}

impl HubLink {
    pub(super) fn connection(&self) -> Option<quinn::Connection> {
        self.conn.lock().ok().and_then(|c| c.clone()).filter(|c| c.close_reason().is_none())
    }

    /// The connection, once the hub has shown it accepts this node (an answer or a load report): a
    /// hub that refuses our certificate completes the handshake and closes only afterwards.
    pub(super) fn usable_connection(&self) -> Option<quinn::Connection> {
        self.connection().filter(|_| self.proven.load(Ordering::Relaxed))
    }

    pub(super) fn has_room(&self, now: Instant) -> bool {
        let sending = self.in_flight.load(Ordering::Relaxed);
        // Until an answer has shown the hub's time, and while a stale rate is probed, one at a time.
        let alone = self.uplink.lock().map(|u| !u.measured() || u.probing(now)).unwrap_or(true);
        if alone && sending > 0 {
            return false;
        }
        self.health.lock().map(|h| h.has_room(now, sending)).unwrap_or(true)
    }

    pub(super) fn reported_in_flight(&self, now: Instant) -> u32 {
        self.health.lock().map(|h| h.in_flight(now)).unwrap_or(0)
    }

    pub(super) fn with_health(&self, f: impl FnOnce(&mut HubHealth)) {
        if let Ok(mut health) = self.health.lock() {
            f(&mut health);
        }
    }

    pub(super) fn record_load(&self, load: HubLoad) {
        if !self.proven.swap(true, Ordering::Relaxed) {
            self.publish();
        }
        let load = Reported { in_flight: load.in_flight, capacity: load.capacity };
        self.with_health(|h| h.reported(load, Instant::now()));
    }

    /// The path's round trip without queueing: the shortest QUIC has seen (its smoothed round trip
    /// also holds the time datagrams wait at the bottleneck, which the backlog already accounts for).
    pub(super) fn path_rtt(conn: &quinn::Connection) -> Duration {
        let min = conn.stats().path.min_rtt;
        if min.is_zero() {
            conn.rtt()
        } else {
            min.min(conn.rtt())
        }
    }

    /// The expected answer time of a request of `bytes` sent now: its transfer behind the link's
    /// backlog, the hub's usual time, the way back; before the first answer, twice the round trip
    /// (that one request, alone on the link, is how the rest are learnt).
    pub(super) fn expected(&self, conn: &quinn::Connection, bytes: u64) -> Duration {
        self.sized_answer(conn, bytes).unwrap_or_else(|| conn.rtt() * 2)
    }

    /// Expected answer time of a request of `bytes` sent now, from its size (`None` until the hub's
    /// own time was measured).
    pub(super) fn sized_answer(&self, conn: &quinn::Connection, bytes: u64) -> Option<Duration> {
        let rtt = Self::path_rtt(conn);
        self.uplink.lock().ok().and_then(|u| u.answer(bytes, Instant::now(), rtt))
    }

    /// Expected time until a request of `bytes` sent now has reached the hub.
    pub(super) fn upload(&self, conn: &quinn::Connection, bytes: u64) -> Duration {
        let rtt = Self::path_rtt(conn);
        self.uplink.lock().map(|u| u.upload(bytes, Instant::now(), rtt)).unwrap_or(rtt / 2)
    }

    /// A request of `bytes` is being sent now: it joins the link's backlog.
    pub(super) fn sending(&self, bytes: u64) {
        if let Ok(mut u) = self.uplink.lock() {
            u.sent(bytes, Instant::now());
        }
    }

    /// Records what the hub saw of a request's arrival; publishes the link's rate and round trip.
    pub(super) fn record_arrival(&self, conn: &quinn::Connection, arrival: Arrival) {
        let rate = self.uplink.lock().ok().and_then(|mut u| {
            u.delivered(arrival.bytes, Duration::from_micros(arrival.micros), Instant::now());
            u.hub_took(Duration::from_micros(arrival.hub_micros));
            u.bytes_per_s()
        });
        if let Some(m) = &self.metrics {
            let hub = self.label();
            m.hub_rtt.with_label_values(&[&hub]).set(Self::path_rtt(conn).as_secs_f64());
            if let Some(rate) = rate {
                m.hub_uplink_rate.with_label_values(&[&hub]).set(rate);
            }
        }
    }

    /// How long to wait for this hub before trying elsewhere.
    pub(super) fn patience(&self, conn: &quinn::Connection) -> Duration {
        let fallback = conn.rtt() * 2;
        self.health.lock().map(|h| h.patience(fallback)).unwrap_or(fallback)
    }

    pub(super) fn record_answer(&self, took: Duration) {
        self.with_health(|h| h.answered_in(took));
    }
}

impl HubLink {
    /// Stops using this link: its connection closes (requests on it finish or fail over) and its
    /// connector ends.
    pub(super) fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        if let Some(conn) = self.connection() {
            conn.close(0u32.into(), b"hub no longer listed");
        }
        self.publish();
    }

    pub(super) fn label(&self) -> String {
        self.name.lock().map(|n| n.clone()).unwrap_or_default()
    }

    /// Publishes whether the edge offloads to this hub now.
    pub(super) fn publish(&self) {
        if let Some(m) = &self.metrics {
            let usable = !self.retired.load(Ordering::Relaxed)
                && !self.down.load(Ordering::Relaxed)
                && self.usable_connection().is_some();
            m.hub_usable.with_label_values(&[&self.label()]).set(i64::from(usable));
        }
    }

    /// Publishes how many of our requests to this hub are unanswered.
    pub(super) fn publish_in_flight(&self) {
        if let Some(m) = &self.metrics {
            let sending = i64::from(self.in_flight.load(Ordering::Relaxed));
            m.offload_in_flight.with_label_values(&[&self.label()]).set(sending);
        }
    }

    /// Counts one offload attempt's outcome.
    pub(super) fn count(&self, outcome: &str) {
        if let Some(m) = &self.metrics {
            m.offload_attempts.with_label_values(&[&self.label(), outcome]).inc();
        }
    }
}
