//! Open-loop load generator for the offload benchmark (the test kit's open loop): requests start on
//! a fixed schedule whatever the answers do, so overload shows up as refusals and late answers
//! instead of a slower client.
//!
//! ```text
//! cargo run --release -p edge-node --example openloop -- URL BODY_FILE HEADER_LENGTH RATE SECS DEADLINE_MS
//! ```
//! Prints one JSON line: sent, ok, goodput (ok within the deadline) per second, offloaded, refused,
//! latency percentiles of the answers that were ok, of those served locally, and of the refusals.
//!
//! Two goodputs: `goodput` counts every answer in time over the run's length, so a server that holds a
//! queue at the end is credited with what it answers after the load stopped (a standing queue of 375
//! ms on a 10 s run: about 4%); `steady_goodput` counts only the requests due after the first second
//! and before the last (the queue filling at the start and draining at the end left out), over that
//! span: the rate a server sustains, comparable between queueing policies.

use std::time::Duration;

use fabric_testkit::load::{open_loop, Outcome};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, body_file, header_length, rate, secs, deadline_ms] = args.as_slice() else {
        anyhow::bail!("usage: openloop URL BODY_FILE HEADER_LENGTH RATE SECS DEADLINE_MS");
    };
    let body = (std::fs::read(body_file)?, header_length.parse::<usize>()?);
    let (rate, secs, deadline): (f64, f64, u64) = (rate.parse()?, secs.parse()?, deadline_ms.parse()?);
    let outcomes = open_loop(url, &body, rate, secs, |_| {});
    let offloaded = |o: &Outcome| o.served_by.starts_with("hub");
    let sorted = |keep: &dyn Fn(&Outcome) -> bool| {
        let mut v: Vec<Duration> = outcomes.iter().filter(|o| keep(o)).map(|o| o.latency).collect();
        v.sort();
        v
    };
    let pct = |v: &[Duration], p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize).map(|d| d.as_secs_f64() * 1e3).unwrap_or(f64::NAN)
    };
    let ok = sorted(&|o| o.status == 200);
    let local = sorted(&|o| o.status == 200 && !offloaded(o));
    let refused = sorted(&|o| o.status == 503);
    let deadline = Duration::from_millis(deadline);
    let in_time = ok.iter().filter(|d| **d <= deadline).count();
    // Requests are due at index / rate; the steady window leaves a second out at each end (none on a
    // run of two seconds or less).
    let edge = if secs > 2.0 { 1.0 } else { 0.0 };
    let steady = outcomes
        .iter()
        .filter(|o| {
            let due = o.index as f64 / rate;
            due >= edge && due < secs - edge && o.status == 200 && o.latency <= deadline
        })
        .count();
    println!(
        "{{\"sent\":{},\"ok\":{},\"goodput\":{:.1},\"steady_goodput\":{:.1},\"offloaded\":{},\"refused\":{},\"failed\":{},\"late\":{},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"local_p50_ms\":{:.2},\"local_p99_ms\":{:.2},\"refused_p99_ms\":{:.2}}}",
        outcomes.len(),
        ok.len(),
        in_time as f64 / secs,
        steady as f64 / (secs - 2.0 * edge),
        outcomes.iter().filter(|o| offloaded(o)).count(),
        refused.len(),
        outcomes.iter().filter(|o| o.status != 200 && o.status != 503).count(),
        ok.len() - in_time,
        pct(&ok, 0.5),
        pct(&ok, 0.99),
        pct(&local, 0.5),
        pct(&local, 0.99),
        pct(&refused, 0.99)
    );
    Ok(())
}
