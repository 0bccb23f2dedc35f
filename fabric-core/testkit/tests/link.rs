//! The emulated link with real UDP sockets on loopback: datagrams are held for their delay, queue at
//! the rate limit, vanish while the link is cut and flow again when it is restored, and each client
//! reaches the server from a socket of its own.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use fabric_testkit::link::{Direction, Link};

const MS: Duration = Duration::from_millis(1);

/// A UDP server that echoes each datagram, prefixed by the sender's port; runs until the test ends.
fn echo_server() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind echo");
    let addr = socket.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let mut answer = from.port().to_be_bytes().to_vec();
            answer.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&answer, from);
        }
    });
    addr
}

/// A client socket towards the link that gives up reading after `limit`.
fn client(link: &Link, limit: Duration) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind client");
    socket.connect(link.addr()).expect("connect");
    socket.set_read_timeout(Some(limit)).expect("timeout");
    socket
}

/// Sends `payload` and waits for its echo: the server-side port it came from, and the round trip.
fn round_trip(socket: &UdpSocket, payload: &[u8]) -> Option<(u16, Duration)> {
    let sent = Instant::now();
    socket.send(payload).expect("send");
    let mut buf = vec![0u8; 65_536];
    let n = socket.recv(&mut buf).ok()?;
    assert_eq!(&buf[2..n], payload, "the echo carries what was sent");
    Some((u16::from_be_bytes([buf[0], buf[1]]), sent.elapsed()))
}

#[test]
fn delay_holds_each_direction_and_clients_get_sockets_of_their_own() {
    let delay = Direction { delay: 30 * MS, ..Direction::default() };
    let link = Link::start(echo_server(), delay, delay, 1).expect("link");
    let (a, b) = (client(&link, Duration::from_secs(5)), client(&link, Duration::from_secs(5)));
    let (port_a, took) = round_trip(&a, b"hello").expect("an echo through the link");
    assert!(took >= 60 * MS, "a 30 ms + 30 ms link answered in {took:?}");
    let (port_b, _) = round_trip(&b, b"again").expect("an echo for the second client");
    assert_ne!(port_a, port_b, "two clients reach the server from one socket");
    assert_eq!(round_trip(&a, b"third").expect("echo").0, port_a, "a client keeps its socket");
    let stats = link.stats();
    assert_eq!((stats.up.delivered, stats.down.delivered), (3, 3));
}

#[test]
fn a_cut_link_drops_everything_until_restored() {
    let link = Link::start(echo_server(), Direction::default(), Direction::default(), 2).expect("link");
    let socket = client(&link, Duration::from_millis(300));
    assert!(round_trip(&socket, b"before").is_some(), "the link works before the cut");
    link.cut(true);
    for _ in 0..3 {
        assert!(round_trip(&socket, b"during").is_none(), "a datagram crossed a cut link");
    }
    assert_eq!(link.stats().up.cut, 3);
    link.cut(false);
    socket.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    assert!(round_trip(&socket, b"after").is_some(), "the restored link carries datagrams again");
}

#[test]
fn the_rate_limit_spaces_datagrams_and_the_buffer_drops_the_excess() {
    // 4 Mbit/s: a 1,000-byte datagram takes 2 ms on the wire; the buffer holds 10 of them.
    let up = Direction { rate_bps: Some(4_000_000), queue_bytes: 10_000, ..Direction::default() };
    let link = Link::start(echo_server(), up, Direction::default(), 3).expect("link");
    let socket = client(&link, Duration::from_secs(5));
    let start = Instant::now();
    // 998 bytes up (the echo adds its 2-byte port prefix on the way back): 1.996 ms each on the wire.
    let payload = vec![7u8; 998];
    for _ in 0..30 {
        socket.send(&payload).expect("send");
    }
    let mut buf = vec![0u8; 65_536];
    let (mut echoes, mut last) = (0u32, start);
    socket.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    while socket.recv(&mut buf).is_ok() {
        echoes += 1;
        last = Instant::now();
    }
    let stats = link.stats();
    assert_eq!(stats.up.delivered + stats.up.queue_full, 30, "{stats:?}");
    assert!(stats.up.queue_full > 0, "30 datagrams at once fitted a 10-datagram buffer: {stats:?}");
    assert_eq!(u64::from(echoes), stats.up.delivered, "every datagram the link took came back");
    // The last echo came no sooner than the wire lets that many datagrams through one after another.
    let wire = Duration::from_micros(1996) * echoes;
    assert!(last.duration_since(start) >= wire, "{echoes} datagrams crossed in {:?}", last.duration_since(start));
}

#[test]
fn settings_change_while_the_link_runs() {
    let link = Link::start(echo_server(), Direction::default(), Direction::default(), 4).expect("link");
    let socket = client(&link, Duration::from_secs(5));
    assert!(round_trip(&socket, b"fast").is_some());
    link.update(|up, _| up.delay = 50 * MS);
    let (_, took) = round_trip(&socket, b"slow").expect("echo");
    assert!(took >= 50 * MS, "the new delay was not applied: {took:?}");
    link.set(Direction { loss: 1.0, ..Direction::default() }, Direction::default());
    socket.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    assert!(round_trip(&socket, b"lost").is_none(), "a datagram crossed a link losing everything");
    assert_eq!(link.stats().up.lost, 1);
}
