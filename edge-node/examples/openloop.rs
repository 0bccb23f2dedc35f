//! Open-loop load generator for the offload benchmark: requests start on a fixed schedule whatever
//! the answers do, so overload shows up as refusals and late answers instead of a slower client.
//!
//! ```text
//! cargo run --release -p edge-node --example openloop -- URL BODY_FILE HEADER_LENGTH RATE SECS DEADLINE_MS
//! ```
//! Prints one JSON line: sent, ok, goodput (ok within the deadline) per second, offloaded, refused,
//! latency percentiles of the answers that were ok, of those served locally, and of the refusals.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, body_file, header_length, rate, secs, deadline_ms] = args.as_slice() else {
        anyhow::bail!("usage: openloop URL BODY_FILE HEADER_LENGTH RATE SECS DEADLINE_MS");
    };
    let body = Arc::new(std::fs::read(body_file)?);
    let (rate, secs, deadline): (f64, f64, u64) = (rate.parse()?, secs.parse()?, deadline_ms.parse()?);
    let header_length = header_length.clone();
    let total = (rate * secs) as usize;
    let (tx, rx) = mpsc::channel::<Instant>();
    let rx = Arc::new(Mutex::new(rx));
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let workers: Vec<_> = (0..512)
        .map(|_| {
            let (rx, outcomes, url, body, header_length) =
                (rx.clone(), outcomes.clone(), url.clone(), body.clone(), header_length.clone());
            std::thread::spawn(move || {
                while let Ok(due) = rx.lock().map_err(|_| ()).and_then(|r| r.recv().map_err(|_| ())) {
                    // A connection per request: a worker idle past the server's keep-alive would otherwise
                    // POST on a connection the server has just closed, a client-side failure.
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .timeout_global(Some(Duration::from_secs(30)))
                        .build()
                        .into();
                    let mut req = agent.post(&url).header("content-type", "application/octet-stream");
                    if header_length != "0" {
                        req = req.header("inference-header-content-length", &header_length);
                    }
                    let (status, hub) = match req.send(body.as_slice()) {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            let text = resp.into_body().read_to_string().unwrap_or_default();
                            (status, text.contains("\"served_by\":\"hub"))
                        }
                        Err(_) => (0, false),
                    };
                    if let Ok(mut o) = outcomes.lock() {
                        o.push((status, hub, due.elapsed()));
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        tx.send(due)?;
    }
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    let outcomes = outcomes.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let sorted = |keep: &dyn Fn(&(u16, bool, Duration)) -> bool| {
        let mut v: Vec<Duration> = outcomes.iter().filter(|o| keep(o)).map(|o| o.2).collect();
        v.sort();
        v
    };
    let pct = |v: &[Duration], p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize).map(|d| d.as_secs_f64() * 1e3).unwrap_or(f64::NAN)
    };
    let ok = sorted(&|o| o.0 == 200);
    let local = sorted(&|o| o.0 == 200 && !o.1);
    let refused = sorted(&|o| o.0 == 503);
    let in_time = ok.iter().filter(|d| **d <= Duration::from_millis(deadline)).count();
    println!(
        "{{\"sent\":{},\"ok\":{},\"goodput\":{:.1},\"offloaded\":{},\"refused\":{},\"failed\":{},\"late\":{},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"local_p50_ms\":{:.2},\"local_p99_ms\":{:.2},\"refused_p99_ms\":{:.2}}}",
        outcomes.len(),
        ok.len(),
        in_time as f64 / secs,
        outcomes.iter().filter(|o| o.1).count(),
        refused.len(),
        outcomes.iter().filter(|o| o.0 != 200 && o.0 != 503).count(),
        ok.len() - in_time,
        pct(&ok, 0.5),
        pct(&ok, 0.99),
        pct(&local, 0.5),
        pct(&local, 0.99),
        pct(&refused, 0.99)
    );
    Ok(())
}
