//! docs/metrics.md against the code and a running edge: every metric defined is documented with its
//! type and labels, nothing documented is missing from the code, and every metric family a running
//! edge (with a hub) exposes is one of them.

mod support;

use std::collections::BTreeSet;

use fabric_node::metrics::Metrics;

/// (name, type, labels) of each row of the reference.
fn documented() -> BTreeSet<(String, String, String)> {
    let page =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md")).expect("docs/metrics.md");
    page.lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_string(), cells.get(2)?.to_string(), cells.get(3)?.to_string()))
        })
        .collect()
}

#[test]
fn every_metric_is_documented_with_its_type_and_labels() {
    let defined: BTreeSet<(String, String, String)> = Metrics::new("fabric")
        .definitions()
        .iter()
        .map(|d| (d.name.clone(), d.kind.to_string(), d.labels.join(", ")))
        .collect();
    let doc = documented();
    let undocumented: Vec<_> = defined.difference(&doc).collect();
    let stale: Vec<_> = doc.difference(&defined).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "in the code, not in docs/metrics.md: {undocumented:?}\nin docs/metrics.md, not in the code: {stale:?}"
    );
}

#[test]
fn a_running_edge_exposes_only_documented_metrics() {
    let dir = std::env::temp_dir().join(format!("metrics-ref-{}", std::process::id()));
    let certs = support::certs(&dir);
    let hub = support::start_hub(&dir, &certs);
    let args = vec!["--hub".to_string(), format!("hub-1@{}", hub.quic), "--certs".into(), certs.display().to_string()];
    let edge = support::start_edge_with_args(&[("mlp", "")], "", &args);
    let agent = support::client();
    let body = serde_json::json!({ "inputs": [{ "name": "input", "shape": [1, 784], "datatype": "FP32", "data": vec![0.5f32; 784] }] });
    let reply = support::send_json(&agent, "POST", &format!("{}/v2/models/mlp/infer", edge.url), &body, false);
    assert_eq!(reply.status, 200, "{}", reply.error());
    let doc: BTreeSet<String> = documented().into_iter().map(|(name, _, _)| name).collect();
    // The hub link's gauge appears once connected.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = support::get(&agent, &format!("{}/metrics", edge.url)).text();
        if text.contains("fabric_hub_usable{hub=\"hub-1\"} 1") || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // (The hub exposes the same `Metrics`; its families are checked by the definitions test.)
    let text = support::get(&agent, &format!("{}/metrics", edge.url)).text();
    let families: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    assert!(families.contains("fabric_requests_total"), "{text}");
    let unknown: Vec<&String> = families.difference(&doc).collect();
    assert!(unknown.is_empty(), "/metrics exposes metrics docs/metrics.md does not list: {unknown:?}");
    let text = support::get(&agent, &format!("{}/metrics", edge.url)).text();
    assert!(text.contains("fabric_hub_usable{hub=\"hub-1\"} 1"), "the edge's hub gauge: {text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The metric names an ops file's queries use (`_bucket`, `_sum`, `_count` of histograms folded).
fn names_used(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("fabric_") {
        let name: String = text[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name).to_string();
        names.insert(base);
    }
    names
}

/// The registry's metrics, as the reference's section on them lists them (its bullets).
fn registry_documented() -> BTreeSet<String> {
    let page =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md")).expect("docs/metrics.md");
    let section = page.split("## The registry's").nth(1).unwrap_or_default();
    let bullets: String = section.lines().filter(|l| l.starts_with("- ")).collect::<Vec<_>>().join("\n");
    names_used(&bullets)
}

#[test]
fn the_dashboard_and_the_alert_rules_use_only_documented_metrics() {
    let mut doc: BTreeSet<String> = documented().into_iter().map(|(name, _, _)| name).collect();
    doc.extend(registry_documented());
    for file in ["ops/grafana/fabric-dashboard.json", "ops/prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(format!("{}/../{file}", env!("CARGO_MANIFEST_DIR"))).expect(file);
        if file.ends_with(".json") {
            let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
            assert!(dashboard["panels"].as_array().is_some_and(|p| !p.is_empty()), "{file} has panels");
        }
        let used = names_used(&text);
        assert!(!used.is_empty(), "{file} queries no fabric metric");
        let unknown: Vec<&String> = used.difference(&doc).collect();
        assert!(unknown.is_empty(), "{file} uses metrics docs/metrics.md does not list: {unknown:?}");
    }
}
