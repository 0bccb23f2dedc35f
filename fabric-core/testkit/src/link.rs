//! An emulated network link for tests and benchmarks: a UDP relay between the client side (edges,
//! nodes) and a server (a hub, the registry) that delays, jitters, drops, reorders and rate-limits
//! datagrams, each direction on its own settings, changeable while it runs, so a test can degrade a
//! link or cut it and bring it back. QUIC runs over UDP: the real protocol, with its real TLS,
//! crosses the relay unchanged. (The kernel's `netem` is not available on these machines.)
//!
//! What happens to one datagram is a pure function of the direction's settings, its state (when the
//! emulated wire is free), the arrival time, the size and a seeded random source ([`Shaper`], tested
//! with tables); the relay's threads only move datagrams in and out and release them on time.
//!
//! Each client address gets a socket of its own towards the server, so the server sees one peer per
//! client, as it would behind a NAT.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

/// Largest datagram relayed (QUIC's are at most 1,452 bytes on loopback paths; room to spare).
const MAX_DATAGRAM: usize = 65_536;

/// How often blocked reads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// What one direction of the link does to the datagrams that cross it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Direction {
    /// One-way propagation delay (half the round trip when both directions are alike).
    pub delay: Duration,
    /// Extra delay drawn uniformly from zero to this, per datagram (reorders when larger than the
    /// gap between datagrams).
    pub jitter: Duration,
    /// Share of datagrams lost at random, 0 to 1.
    pub loss: f64,
    /// The bottleneck's rate in bits per second (`None`: unlimited): datagrams leave one after the
    /// other at this rate, queueing behind each other.
    pub rate_bps: Option<u64>,
    /// Most bytes waiting for the bottleneck; a datagram that would overflow it is dropped (a
    /// router's tail drop).
    pub queue_bytes: usize,
    /// Share of datagrams held back by [`Direction::reorder_by`], so that later ones overtake them.
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_by: Duration,
    /// The link is cut: every datagram is dropped.
    pub cut: bool,
}

impl Default for Direction {
    fn default() -> Self {
        Direction {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bps: None,
            queue_bytes: 1 << 20,
            reorder: 0.0,
            reorder_by: Duration::from_millis(5),
            cut: false,
        }
    }
}

impl Direction {
    /// A WAN direction: `delay` one way, `mbit_per_s` megabits a second, `loss` lost at random; the
    /// bottleneck's buffer holds about 100 ms at that rate (at least 64 KiB).
    pub fn wan(delay: Duration, mbit_per_s: f64, loss: f64) -> Direction {
        let rate = (mbit_per_s * 1e6) as u64;
        Direction {
            delay,
            loss,
            rate_bps: Some(rate),
            queue_bytes: ((rate / 8) / 10).max(64 << 10) as usize,
            ..Direction::default()
        }
    }
}

/// Why a datagram did not cross.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// The link is cut.
    Cut,
    /// Lost at random.
    Lost,
    /// The bottleneck's buffer was full.
    QueueFull,
}

/// One direction's shaping state: when the emulated bottleneck is next free.
#[derive(Debug)]
pub struct Shaper {
    wire_free: Option<Instant>,
}

impl Default for Shaper {
    fn default() -> Self {
        Shaper::new()
    }
}

impl Shaper {
    /// A direction with nothing in flight.
    pub fn new() -> Shaper {
        Shaper { wire_free: None }
    }

    /// When a datagram of `len` bytes arriving at `now` is delivered under `settings`, or why it is
    /// dropped. `draw` gives uniform numbers in [0, 1): the loss draw, the jitter draw and the
    /// reorder draw, in that order (a seeded source makes a run repeatable).
    pub fn admit(
        &mut self,
        settings: &Direction,
        now: Instant,
        len: usize,
        mut draw: impl FnMut() -> f64,
    ) -> Result<Instant, Dropped> {
        if settings.cut {
            return Err(Dropped::Cut);
        }
        if settings.loss > 0.0 && draw() < settings.loss {
            return Err(Dropped::Lost);
        }
        let sent = match settings.rate_bps.filter(|r| *r > 0) {
            None => now,
            Some(rate) => {
                let start = self.wire_free.filter(|free| *free > now).unwrap_or(now);
                // Bytes still ahead of this one in the bottleneck's buffer (integer nanoseconds and
                // bits: exact at the buffer's edge).
                let waiting = start.duration_since(now).as_nanos() * u128::from(rate) / 8 / 1_000_000_000;
                if waiting + len as u128 > settings.queue_bytes as u128 {
                    return Err(Dropped::QueueFull);
                }
                let wire = len as u128 * 8 * 1_000_000_000 / u128::from(rate);
                let done = start + Duration::from_nanos(u64::try_from(wire).unwrap_or(u64::MAX));
                self.wire_free = Some(done);
                done
            }
        };
        let jitter = if settings.jitter > Duration::ZERO { settings.jitter.mul_f64(draw()) } else { Duration::ZERO };
        let held =
            if settings.reorder > 0.0 && draw() < settings.reorder { settings.reorder_by } else { Duration::ZERO };
        Ok(sent + settings.delay + jitter + held)
    }
}

/// Counts of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Datagrams delivered.
    pub delivered: u64,
    /// Bytes delivered.
    pub bytes: u64,
    /// Datagrams dropped because the link was cut.
    pub cut: u64,
    /// Datagrams lost at random.
    pub lost: u64,
    /// Datagrams dropped at the full bottleneck.
    pub queue_full: u64,
}

/// Both directions' counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Client to server.
    pub up: DirectionStats,
    /// Server to client.
    pub down: DirectionStats,
}

/// A datagram on its way: when it is due, in what order it came, where it goes.
struct InFlight {
    due: Instant,
    seq: u64,
    socket: Arc<UdpSocket>,
    to: Option<SocketAddr>,
    payload: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// Settings, shaping state, the random source and the counts, under one lock.
struct State {
    up: Direction,
    down: Direction,
    up_shaper: Shaper,
    down_shaper: Shaper,
    rng: SmallRng,
    stats: LinkStats,
    next_seq: u64,
}

/// What the relay's threads share.
struct Shared {
    state: Mutex<State>,
    queue: Mutex<BinaryHeap<Reverse<InFlight>>>,
    due: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Shapes one datagram and, unless dropped, queues it for release.
    fn relay(&self, upward: bool, payload: &[u8], socket: &Arc<UdpSocket>, to: Option<SocketAddr>) {
        let now = Instant::now();
        let (due, seq) = {
            let mut guard = self.state();
            let st = &mut *guard;
            let (settings, shaper) = if upward { (&st.up, &mut st.up_shaper) } else { (&st.down, &mut st.down_shaper) };
            let rng = &mut st.rng;
            let outcome = shaper.admit(settings, now, payload.len(), || rng.random::<f64>());
            let stats = if upward { &mut st.stats.up } else { &mut st.stats.down };
            match outcome {
                Err(Dropped::Cut) => stats.cut += 1,
                Err(Dropped::Lost) => stats.lost += 1,
                Err(Dropped::QueueFull) => stats.queue_full += 1,
                Ok(_) => {
                    stats.delivered += 1;
                    stats.bytes += payload.len() as u64;
                }
            }
            let Ok(due) = outcome else { return };
            st.next_seq += 1;
            (due, st.next_seq)
        };
        let item = InFlight { due, seq, socket: socket.clone(), to, payload: payload.to_vec() };
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push(Reverse(item));
        self.due.notify_one();
    }

    /// Releases datagrams when they are due, until stopped.
    fn release(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let wait = match queue.peek() {
                None => POLL,
                Some(Reverse(next)) if next.due <= now => {
                    let Some(Reverse(item)) = queue.pop() else { continue };
                    drop(queue);
                    // A send that fails (the peer's socket gone) is a datagram lost, as on a network.
                    let _ = match item.to {
                        Some(to) => item.socket.send_to(&item.payload, to),
                        None => item.socket.send(&item.payload),
                    };
                    queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                    continue;
                }
                Some(Reverse(next)) => next.due.duration_since(now).min(POLL),
            };
            queue = self.due.wait_timeout(queue, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// A running emulated link: clients send to [`Link::addr`], the relay forwards to the server.
/// Stops (its threads end, its sockets close) when dropped.
pub struct Link {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Link {
    /// Starts a link on 127.0.0.1 (an ephemeral port) towards `server`, with these settings for
    /// client-to-server (`up`) and server-to-client (`down`); `seed` fixes the random draws.
    pub fn start(server: SocketAddr, up: Direction, down: Direction, seed: u64) -> std::io::Result<Link> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0")?);
        front.set_read_timeout(Some(POLL))?;
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                up,
                down,
                up_shaper: Shaper::new(),
                down_shaper: Shaper::new(),
                rng: SmallRng::seed_from_u64(seed),
                stats: LinkStats::default(),
                next_seq: 0,
            }),
            queue: Mutex::new(BinaryHeap::new()),
            due: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let releaser = shared.clone();
        std::thread::Builder::new().name("link-release".into()).spawn(move || releaser.release())?;
        let relay = shared.clone();
        std::thread::Builder::new().name("link-front".into()).spawn(move || front_loop(&relay, &front, server))?;
        Ok(Link { addr, shared })
    }

    /// The address clients send to instead of the server's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes both directions' settings; datagrams already on their way keep their times.
    pub fn set(&self, up: Direction, down: Direction) {
        let mut st = self.shared.state();
        st.up = up;
        st.down = down;
    }

    /// Changes the settings with `change`, given the current ones (client-to-server, then back).
    pub fn update(&self, change: impl FnOnce(&mut Direction, &mut Direction)) {
        let mut guard = self.shared.state();
        let st = &mut *guard;
        change(&mut st.up, &mut st.down);
    }

    /// Cuts the link both ways (`true`) or restores it (`false`).
    pub fn cut(&self, cut: bool) {
        self.update(|up, down| {
            up.cut = cut;
            down.cut = cut;
        });
    }

    /// The counts so far.
    pub fn stats(&self) -> LinkStats {
        self.shared.state().stats
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.due.notify_all();
    }
}

/// Reads what clients send; each new client gets a socket towards the server and a thread that
/// relays the server's answers back to it.
fn front_loop(shared: &Arc<Shared>, front: &Arc<UdpSocket>, server: SocketAddr) {
    let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !shared.stop.load(Ordering::SeqCst) {
        let (n, client) = match front.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            // ICMP errors surface as reads failing (a client gone): nothing to relay.
            Err(_) => continue,
        };
        let back = match backs.get(&client) {
            Some(back) => back.clone(),
            None => match open_back(shared, front, client, server) {
                Ok(back) => {
                    backs.insert(client, back.clone());
                    back
                }
                Err(e) => {
                    eprintln!("link: no socket towards {server} for {client}: {e}");
                    continue;
                }
            },
        };
        shared.relay(true, &buf[..n], &back, None);
    }
}

/// A socket towards the server for one client, with its thread relaying answers back.
fn open_back(
    shared: &Arc<Shared>,
    front: &Arc<UdpSocket>,
    client: SocketAddr,
    server: SocketAddr,
) -> std::io::Result<Arc<UdpSocket>> {
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0")?);
    back.connect(server)?;
    back.set_read_timeout(Some(POLL))?;
    let (shared, front, reader) = (shared.clone(), front.clone(), back.clone());
    std::thread::Builder::new().name("link-back".into()).spawn(move || {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while !shared.stop.load(Ordering::SeqCst) {
            match reader.recv(&mut buf) {
                Ok(n) => shared.relay(false, &buf[..n], &front, Some(client)),
                Err(_) => continue, // a timeout to look at the stop flag, or the server not there yet
            }
        }
    })?;
    Ok(back)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A source that plays back the given draws, then 0.5.
    fn draws(values: &[f64]) -> impl FnMut() -> f64 + '_ {
        let mut it = values.iter();
        move || it.next().copied().unwrap_or(0.5)
    }

    #[test]
    fn one_datagram_table() {
        let t0 = Instant::now();
        let d = Direction::default();
        let rate = Direction { rate_bps: Some(8_000_000), ..d }; // 1 ms per 1,000 bytes
                                                                 // (settings, draws, bytes, expected delivery after t0 or why dropped)
        let cases: Vec<(&str, Direction, Vec<f64>, usize, Result<Duration, Dropped>)> = vec![
            ("untouched", d, vec![], 1000, Ok(Duration::ZERO)),
            ("delay", Direction { delay: 40 * MS, ..d }, vec![], 1000, Ok(40 * MS)),
            ("cut", Direction { cut: true, delay: 40 * MS, ..d }, vec![], 1000, Err(Dropped::Cut)),
            ("lost", Direction { loss: 0.01, ..d }, vec![0.005], 1000, Err(Dropped::Lost)),
            ("not lost", Direction { loss: 0.01, ..d }, vec![0.5], 1000, Ok(Duration::ZERO)),
            ("rate", rate, vec![], 1000, Ok(MS)),
            ("rate and delay", Direction { delay: 20 * MS, ..rate }, vec![], 500, Ok(20 * MS + MS / 2)),
            ("jitter, top draw", Direction { delay: 10 * MS, jitter: 4 * MS, ..d }, vec![0.75], 1000, Ok(13 * MS)),
            ("reordered", Direction { reorder: 0.5, reorder_by: 7 * MS, ..d }, vec![0.1], 1000, Ok(7 * MS)),
            ("not reordered", Direction { reorder: 0.5, reorder_by: 7 * MS, ..d }, vec![0.9], 1000, Ok(Duration::ZERO)),
            ("bigger than the buffer", Direction { queue_bytes: 999, ..rate }, vec![], 1000, Err(Dropped::QueueFull)),
        ];
        for (name, settings, values, len, want) in cases {
            let got = Shaper::new().admit(&settings, t0, len, draws(&values)).map(|at| at.duration_since(t0));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn datagrams_queue_behind_each_other_at_the_bottleneck() {
        let t0 = Instant::now();
        let settings =
            Direction { rate_bps: Some(8_000_000), queue_bytes: 2_500, delay: 5 * MS, ..Direction::default() };
        let mut shaper = Shaper::new();
        let mut at =
            |offset: Duration| shaper.admit(&settings, t0 + offset, 1000, || 0.5).map(|d| d.duration_since(t0));
        // Three back to back: 1, 2, then the third would make 3,000 bytes waiting in a 2,500-byte buffer.
        assert_eq!(at(Duration::ZERO), Ok(6 * MS));
        assert_eq!(at(Duration::ZERO), Ok(7 * MS));
        assert_eq!(at(Duration::ZERO), Err(Dropped::QueueFull));
        // Half a millisecond later the wire has room again; once idle, no queueing at all.
        assert_eq!(at(MS / 2), Ok(8 * MS));
        assert_eq!(at(10 * MS), Ok(16 * MS));
    }

    #[test]
    fn random_loss_comes_near_its_share() {
        let mut rng = SmallRng::seed_from_u64(7);
        let settings = Direction { loss: 0.1, ..Direction::default() };
        let mut shaper = Shaper::new();
        let t0 = Instant::now();
        let lost = (0..10_000).filter(|_| shaper.admit(&settings, t0, 100, || rng.random::<f64>()).is_err()).count();
        assert!((800..1200).contains(&lost), "{lost} of 10,000 lost at 10%");
    }

    #[test]
    fn wan_preset_buffers_about_a_tenth_of_a_second() {
        let d = Direction::wan(20 * MS, 10.0, 0.01);
        assert_eq!(d.rate_bps, Some(10_000_000));
        assert_eq!(d.queue_bytes, 125_000);
        assert_eq!(Direction::wan(MS, 1.0, 0.0).queue_bytes, 64 << 10);
    }
}
