//! Bounded waits: every wait in a test names what it waits for and how long it may take.

use std::time::{Duration, Instant};

/// Waits up to `limit` for `done`, checking every 20 ms; returns how long it took; panics naming
/// `what` when the limit passes.
pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}
