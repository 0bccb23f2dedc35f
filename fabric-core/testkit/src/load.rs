//! Load for tests, from threads of a compiled client: closed loop ([`Load`]: each client sends its
//! next request when the last is answered) and open loop ([`open_loop`]: requests start on a fixed
//! schedule whatever the answers do, as real traffic does). Both keep every answer, so a test can
//! say that every request was answered once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::http::{body_for, client, infer, post, try_post};

/// An answer: when sent and received, the status, and the version (or the error).
#[derive(Clone, Debug)]
pub struct Sample {
    /// Index of the node it was sent to.
    pub node: usize,
    /// When it was sent.
    pub sent: Instant,
    /// When its answer arrived.
    pub done: Instant,
    /// The HTTP status (0: no answer).
    pub status: u16,
    /// The version that answered, or the error.
    pub version: String,
    /// Who served it (`hub <id>` when offloaded).
    pub served_by: String,
}

/// Closed-loop JSON clients on several nodes until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    /// Every answer so far.
    pub samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// `clients` closed-loop MLP clients per node URL.
    pub fn start(nodes: &[String], clients: usize) -> Load {
        Load::start_model(nodes, clients, "mlp")
    }

    /// `clients` closed-loop clients of `model` per node URL.
    pub fn start_model(nodes: &[String], clients: usize, model: &'static str) -> Load {
        let body = Arc::new(body_for(model));
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for (node, url) in nodes.iter().enumerate() {
            for _ in 0..clients {
                let (stop, samples, url, body) = (stop.clone(), samples.clone(), url.clone(), body.clone());
                threads.push(std::thread::spawn(move || {
                    let agent = client();
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        let answer = infer(&agent, &url, model, &body);
                        samples.lock().expect("samples").push(Sample {
                            node,
                            sent,
                            done: Instant::now(),
                            status: answer.status,
                            version: answer.version,
                            served_by: answer.served_by,
                        });
                    }
                }));
            }
        }
        Load { stop, samples, threads }
    }

    /// Answers so far.
    pub fn count(&self) -> usize {
        self.samples.lock().expect("samples").len()
    }

    /// Whether each of the first `nodes` nodes has answered a request sent at or after `since`
    /// with `version`.
    pub fn all_answered_with(&self, nodes: usize, since: Instant, version: &str) -> bool {
        let samples = self.samples.lock().expect("samples");
        (0..nodes).all(|node| samples.iter().any(|s| s.node == node && s.sent >= since && s.version == version))
    }

    /// Stops the clients; returns every answer.
    pub fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        Arc::try_unwrap(self.samples).map(|m| m.into_inner().expect("samples")).unwrap_or_default()
    }
}

/// One open-loop request's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Its place in the schedule.
    pub index: usize,
    /// The HTTP status.
    pub status: u16,
    /// From when it was due to when its answer arrived.
    pub latency: Duration,
    /// Who served it (`edge-node`, `hub <id>`).
    pub served_by: String,
    /// The error message, for a failure.
    pub error: String,
}

/// A binary-extension request body and its JSON header's length.
pub type BinaryBody = (Vec<u8>, usize);

/// Closed loop with sixteen clients for `secs`: the served requests per second (the server's
/// capacity, with enough clients to keep one replica busy with full batches).
pub fn closed_loop_rate(url: &str, (body, n): &BinaryBody, secs: f64) -> f64 {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let (url, body, n) = (url.to_string(), body.to_vec(), *n);
            std::thread::spawn(move || {
                let agent = client();
                let mut ok = 0;
                while Instant::now() < until {
                    ok += usize::from(post(&agent, &url, &body, Some(n)).status == 200);
                }
                ok
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("client thread")).sum::<usize>() as f64 / secs
}

/// Open loop at `rate` requests/s for `secs` (a header length of 0: a JSON body); `during(i)` runs
/// before request `i` is sent. Returns one outcome per request, in schedule order (status 0: no
/// HTTP answer, the error says why); panics if any request got no outcome or two.
pub fn open_loop(url: &str, (body, n): &BinaryBody, rate: f64, secs: f64, during: impl Fn(usize)) -> Vec<Outcome> {
    let total = (rate * secs) as usize;
    let (tx, rx) = mpsc::channel::<(usize, Instant)>();
    let rx = Arc::new(Mutex::new(rx));
    let results = Arc::new(Mutex::new(Vec::with_capacity(total)));
    // Little: rate x latency in flight; at 600/s and 0.8 s that is 480 requests waiting at once.
    let workers: Vec<_> = (0..512)
        .map(|_| {
            let (rx, results, url, body, n) = (rx.clone(), results.clone(), url.to_string(), body.to_vec(), *n);
            std::thread::spawn(move || loop {
                let Ok((index, due)) = rx.lock().expect("lock").recv() else { return };
                // A connection per request: a worker may sit idle past the server's keep-alive, and a
                // POST on a connection the server has just closed fails in the client, not the server.
                let outcome = match try_post(&client(), &url, &body, (n > 0).then_some(n)) {
                    Ok(reply) => {
                        let end = reply.header_length.unwrap_or(reply.body.len()).min(reply.body.len());
                        let head: Value = serde_json::from_slice(&reply.body[..end]).unwrap_or_default();
                        Outcome {
                            index,
                            status: reply.status,
                            latency: due.elapsed(),
                            served_by: head["parameters"]["served_by"].as_str().unwrap_or_default().to_string(),
                            error: head["error"].as_str().unwrap_or_default().to_string(),
                        }
                    }
                    Err(e) => Outcome { index, status: 0, latency: due.elapsed(), served_by: String::new(), error: e },
                };
                results.lock().expect("lock").push(outcome);
            })
        })
        .collect();
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        during(i);
        tx.send((i, due)).expect("send");
    }
    drop(tx);
    for w in workers {
        w.join().expect("worker");
    }
    let mut results = results.lock().expect("lock").clone();
    assert_eq!(results.len(), total, "requests without an answer");
    results.sort_by_key(|r| r.index);
    assert!(results.iter().enumerate().all(|(i, r)| r.index == i), "a request answered twice or not at all");
    results
}

/// The 99th percentile of some latencies (zero for none).
pub fn p99(mut latencies: Vec<Duration>) -> Duration {
    latencies.sort();
    latencies.get(((latencies.len() as f64 - 1.0) * 0.99) as usize).copied().unwrap_or_default()
}
