//! Priority classes under overload, on a real edge-node without a hub: at 3x its capacity, with a
//! tenth of the requests urgent (`priority` 1) and the rest not (9), the urgent class is served
//! (at least 95% of it within its deadline) while the other absorbs the refusals, and each class's
//! outcomes are counted. Outcomes, not latency figures: the deadline is the server's own bound.

mod support;

use std::time::Duration;

use fabric_testkit::http::binary_body;
use fabric_testkit::load::{closed_loop_rate, open_loop, BinaryBody, Outcome};
use serde_json::Value;
use support::{client, get, start_edge_with_args};

const DEADLINE_MS: u64 = 800;

/// A CNN request of 4 rows (binary, its logits as JSON) at `priority`.
fn body_at(priority: u64) -> BinaryBody {
    let (body, n) = binary_body(&[4, 3, 64, 64], 17, Some("logits"));
    let mut head: Value = serde_json::from_slice(&body[..n]).expect("header");
    head["parameters"] = serde_json::json!({ "priority": priority });
    let mut out = serde_json::to_vec(&head).expect("json");
    let header_length = out.len();
    out.extend_from_slice(&body[n..]);
    (out, header_length)
}

fn served_in_time(results: &[Outcome]) -> usize {
    results.iter().filter(|r| r.status == 200 && r.latency <= Duration::from_millis(DEADLINE_MS)).count()
}

#[test]
fn at_3x_the_urgent_tenth_is_served_and_the_rest_absorbs_the_refusals() {
    let model = format!("max_batch_size = 8\nqueue_capacity = 64\ndefault_timeout_ms = {DEADLINE_MS}\n");
    let edge = start_edge_with_args(&[("cnn", &model)], "[http]\nworkers = 1\n", &[]);
    let url = format!("{}/v2/models/cnn/infer", edge.url);
    let (low, high) = (body_at(9), body_at(1));
    let cap = closed_loop_rate(&url, &low, 2.0);
    let urgent = {
        let (url, high) = (url.clone(), high.clone());
        std::thread::spawn(move || open_loop(&url, &high, cap * 0.3, 10.0, |_| {}))
    };
    let rest = open_loop(&url, &low, cap * 2.7, 10.0, |_| {});
    let urgent = urgent.join().expect("urgent load");
    let answered = |r: &Outcome| r.status == 200 || r.status == 503;
    assert!(urgent.iter().chain(&rest).all(answered), "every request answered with outputs or a precise 503");
    let (urgent_ok, rest_ok) = (served_in_time(&urgent), served_in_time(&rest));
    let rest_refused = rest.iter().filter(|r| r.status == 503).count();
    eprintln!(
        "capacity {cap:.0}/s; urgent: {urgent_ok} of {} served in time; the rest: {rest_ok} of {} ({rest_refused} refused)",
        urgent.len(),
        rest.len()
    );
    assert!(
        urgent_ok as f64 >= 0.95 * urgent.len() as f64,
        "urgent goodput {urgent_ok} of {} offered is under 95%",
        urgent.len()
    );
    assert!(rest_refused * 2 > rest.len() / 2, "the less urgent class absorbed only {rest_refused} refusals");
    // Each class's outcomes are counted.
    let metrics = get(&client(), &format!("{}/metrics", edge.url)).text();
    let count = |priority: &str, ok: bool| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("fabric_priority_requests_total{") && l.contains(&format!("priority=\"{priority}\""))
            })
            .filter(|l| l.contains("outcome=\"ok\"") == ok)
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    };
    assert!(count("1", true) >= urgent_ok as f64, "{metrics}");
    assert!(count("9", false) >= rest_refused as f64, "{metrics}");
    assert!(
        metrics.contains("fabric_priority_queue_duration_seconds_count{model=\"cnn\",priority=\"1\",version=\"1\"}")
    );
}

#[test]
fn a_priority_outside_1_to_9_is_refused_with_the_range() {
    let edge = start_edge_with_args(&[("mlp", "")], "", &[]);
    let url = format!("{}/v2/models/mlp/infer", edge.url);
    let body = |p: &str| {
        format!(
            r#"{{"inputs":[{{"name":"input","shape":[1,784],"datatype":"FP32","data":[{}]}}],"parameters":{{"priority":{p}}}}}"#,
            vec!["0.5"; 784].join(",")
        )
    };
    for (p, status) in [("1", 200), ("9", 200), ("0", 400), ("10", 400), ("\"high\"", 400)] {
        let reply = support::post(&client(), &url, body(p).as_bytes(), None);
        assert_eq!(reply.status, status, "priority {p}: {}", reply.error());
        if status == 400 {
            assert!(reply.error().contains("parameter priority must be 1 (most urgent) to 9"), "{}", reply.error());
        }
    }
}
