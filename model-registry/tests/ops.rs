//! The operations material against the real tools: the alert rules pass `promtool check rules`; a real
//! Prometheus (Debian's) scrapes a running fabric (registry, hub, edge) with those rules loaded; the
//! systemd units pass `systemd-analyze verify`. `scripts/setup.sh` installs the tools; without them
//! a plain `cargo test` skips these tests saying so, and `scripts/test.sh` requires them.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fabric_testkit::process::{workspace_binary, Proc};
use fabric_testkit::tools::tool;
use serde_json::{json, Value};
use support::{client, infer, model, wait_for, Fabric};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_alert_rules_pass_promtool() {
    let Some(promtool) = tool(&["promtool"]) else { return };
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(repo().join("ops/prometheus/alerts.yml"))
        .output()
        .expect("promtool runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check rules failed:\n{text}");
    assert!(text.contains("SUCCESS: 10 rules found"), "{text}");
}

#[test]
fn the_systemd_units_verify() {
    let Some(systemd_analyze) = tool(&["systemd-analyze"]) else { return };
    let dir = std::env::temp_dir().join(format!("fabric-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bin = workspace_binary("edge-node", "edge-node");
    let bins = bin.parent().expect("bin dir").to_path_buf();
    workspace_binary("cloud-hub", "cloud-hub");
    for unit in ["edge-node.service", "cloud-hub.service", "model-registry.service"] {
        // verify checks that ExecStart's binary exists: point it at the built one.
        let text = std::fs::read_to_string(repo().join("ops/systemd").join(unit)).expect("unit");
        let text = text.replace("/usr/local/bin/", &format!("{}/", bins.display()));
        let path = dir.join(unit);
        std::fs::write(&path, text).expect("write unit");
        let out = Command::new(&systemd_analyze).args(["verify", "--man=no"]).arg(&path).output().expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Outside a booted systemd (containers, CI) verify also reports the host's own units; only
        // lines about ours count.
        let ours: Vec<&str> = stderr.lines().filter(|l| l.contains(unit)).collect();
        assert!(ours.is_empty() && (out.status.success() || !stderr.contains(unit)), "{unit}:\n{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn prometheus_scrapes_a_running_fabric_with_the_alert_rules() {
    let Some(prometheus) = tool(&["prometheus"]) else { return };
    let f = Fabric::new("prometheus");
    let (registry, page) = f.registry_with_page("127.0.0.1:0", &[]);
    let r = registry.addr.clone();
    let hub = f.hub(&r);
    let edge = f.edge("edge-1", &r, &[]);
    f.cli(&r, &["model", "push", "mlp", &model("mlp")]);
    // The digits with a reference sample: the registry's drift and accuracy gauges have series.
    let sample = fabric_testkit::reference::build_dir().join("reference/digits/train.npz");
    f.cli(&r, &["model", "push", "digits", &model("digits"), "--reference", sample.to_str().expect("path")]);
    f.cli(&r, &["deploy", "mlp", "--to", "all"]);
    let a = client();
    for n in [&edge.addr, &hub.addr] {
        wait_for("mlp served", Duration::from_secs(60), || infer(&a, n).0 == 200);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let host = |url: &str| url.trim_start_matches("http://").to_string();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: fabric-edge\n    static_configs:\n      - targets: [\"{}\"]\n  - job_name: fabric-hub\n    static_configs:\n      - targets: [\"{}\"]\n  - job_name: fabric-registry\n    static_configs:\n      - targets: [\"{}\"]\n",
        repo().join("ops/prometheus/alerts.yml").display(),
        host(&edge.addr),
        host(&hub.addr),
        host(&page)
    );
    std::fs::write(f.dir.join("prometheus.yml"), config).expect("config");
    let child = Command::new(prometheus)
        .arg(format!("--config.file={}", f.dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", f.dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus starts");
    let _prometheus =
        Proc { child, addr: format!("http://127.0.0.1:{port}"), seen: Vec::new(), later: Default::default() };
    let api = |path: &str| -> Value {
        a.get(&format!("http://127.0.0.1:{port}/api/v1/{path}"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    };
    wait_for("the three targets scraped and up", Duration::from_secs(60), || {
        let targets = api("targets");
        let active = targets["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
        active.len() == 3 && active.iter().all(|t| t["health"] == "up")
    });
    wait_for("the edge's requests in Prometheus", Duration::from_secs(60), || {
        let q = api("query?query=fabric_requests_total%7Bjob%3D%22fabric-edge%22%2Cmodel%3D%22mlp%22%7D");
        q["data"]["result"].as_array().is_some_and(|r| !r.is_empty())
    });
    wait_for("the alert rules loaded and evaluated", Duration::from_secs(60), || {
        let rules = api("rules");
        let groups = rules["data"]["groups"].as_array().cloned().unwrap_or_default();
        groups.iter().any(|g| {
            g["name"] == "fabric"
                && g["rules"].as_array().is_some_and(|r| r.len() == 10 && r.iter().all(|r| r["health"] == json!("ok")))
        })
    });
    // Nothing fires on a healthy fabric.
    let alerts = api("alerts");
    let firing: Vec<&Value> =
        alerts["data"]["alerts"].as_array().into_iter().flatten().filter(|a| a["state"] == "firing").collect();
    assert!(firing.is_empty(), "{firing:?}");
}

#[test]
fn the_configuration_reference_lists_every_registry_flag() {
    let help = Command::new(env!("CARGO_BIN_EXE_model-registry")).arg("--help").output().expect("--help runs");
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: std::collections::BTreeSet<String> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .filter_map(|l| l.split([' ', ',']).next())
        .filter(|f| !["help", "version"].contains(f))
        .map(|f| format!("--{f}"))
        .collect();
    assert!(flags.len() > 10, "{help}");
    let page = std::fs::read_to_string(repo().join("docs/configuration.md")).expect("docs/configuration.md");
    let section = page.split("## model-registry flags").nth(1).expect("a model-registry section");
    let documented: std::collections::BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect();
    let missing: Vec<_> = flags.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&flags).collect();
    assert!(missing.is_empty() && stale.is_empty(), "undocumented: {missing:?}; documented but gone: {stale:?}");
}
