//! The emulated WAN link as a process, for benchmarks: relays UDP from a local port to a server
//! with a delay, jitter, loss and rate limit in each direction (see `fabric_testkit::link`), prints
//! `wan link on ADDR -> SERVER` once it listens, and every 5 s (on standard error) what crossed and
//! what was dropped. Lines on standard input change it while it runs: `cut` drops everything both
//! ways, `restore` ends the cut, `stats` prints the counts so far as one line of JSON.
//!
//! ```text
//! cargo run --release -p fabric-testkit --example wan_link -- --to 127.0.0.1:9000 --delay-ms 20 --mbit 50 --loss 0.01
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fabric_testkit::link::{Direction, Link};

/// Relay UDP (QUIC) to a server across an emulated WAN link.
#[derive(Parser, Debug)]
#[command(about, long_about = None)]
struct Args {
    /// The server's UDP address (a hub's or the registry's QUIC port).
    #[arg(long)]
    to: SocketAddr,
    /// Where clients send instead (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// One-way delay each direction, in milliseconds (the round trip is twice this).
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Extra delay drawn uniformly up to this, per datagram, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Share of datagrams lost at random each direction, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Client-to-server rate in megabits a second (0: unlimited).
    #[arg(long, default_value_t = 0.0)]
    mbit: f64,
    /// Server-to-client rate in megabits a second (0: the same as --mbit).
    #[arg(long, default_value_t = 0.0)]
    down_mbit: f64,
    /// Seed of the random draws (loss, jitter).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn direction(args: &Args, mbit: f64) -> Direction {
    let delay = Duration::from_secs_f64(args.delay_ms / 1e3);
    let base = if mbit > 0.0 {
        Direction::wan(delay, mbit, args.loss)
    } else {
        Direction { delay, loss: args.loss, ..Direction::default() }
    };
    Direction { jitter: Duration::from_secs_f64(args.jitter_ms / 1e3), ..base }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!((0.0..=1.0).contains(&args.loss), "--loss is a share from 0 to 1, got {}", args.loss);
    let up = direction(&args, args.mbit);
    let down = direction(&args, if args.down_mbit > 0.0 { args.down_mbit } else { args.mbit });
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "--listen must be a loopback address (the link is for benchmarks on one machine)"
    );
    let link = Link::start(args.to, up, down, args.seed).context("starting the link")?;
    println!("wan link on {} -> {}", link.addr(), args.to);
    let link = std::sync::Arc::new(link);
    let commanded = link.clone();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            match line.trim() {
                "cut" => commanded.cut(true),
                "restore" => commanded.cut(false),
                "stats" => {
                    let s = commanded.stats();
                    println!(
                        "{{\"up_bytes\":{},\"up_lost\":{},\"down_bytes\":{},\"down_lost\":{},\"down_buffer_full\":{},\"cut\":{}}}",
                        s.up.bytes,
                        s.up.lost,
                        s.down.bytes,
                        s.down.lost,
                        s.down.queue_full,
                        s.up.cut + s.down.cut
                    );
                }
                other => eprintln!("unknown command {other:?} (cut, restore, stats)"),
            }
        }
    });
    loop {
        std::thread::sleep(Duration::from_secs(5));
        let s = link.stats();
        eprintln!(
            "up: {} datagrams ({} bytes), lost {}, buffer full {}; down: {} datagrams, lost {}, buffer full {}",
            s.up.delivered, s.up.bytes, s.up.lost, s.up.queue_full, s.down.delivered, s.down.lost, s.down.queue_full
        );
    }
}
