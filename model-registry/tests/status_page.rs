//! The registry's status page in a real browser (Debian's Chromium, headless) and `fabric top`, on a
//! fabric with a canary under load: the page's rendered DOM shows the node, the model, the rollout and
//! its live traffic split; its screenshot is a real rendering; `fabric top --once` shows the same.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fabric_testkit::tools::tool;
use serde_json::json;
use support::{client, infer, model, wait_for, Fabric, Load};

/// Chromium, headless (`bin`), on `url` with `args` (bounded: 60 s); returns stdout.
fn chromium(bin: &Path, url: &str, args: &[String]) -> String {
    let out = Command::new("timeout")
        .arg("60")
        .arg(bin)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"])
        .arg("--virtual-time-budget=5000")
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_status_page_and_fabric_top_show_the_fabric_live() {
    let Some(browser) = tool(&["chromium", "chromium-browser"]) else { return };
    let f = Fabric::new("status");
    let (registry, page) = f.registry_with_page("127.0.0.1:0", &[]);
    let r = registry.addr.clone();
    let edge = f.edge("edge-1", &r, &["site=berlin"]);
    f.cli(&r, &["model", "push", "mlp", &model("mlp")]);
    f.cli(&r, &["deploy", "mlp", "--to", "edge"]);
    let a = client();
    wait_for("mlp served", Duration::from_secs(60), || infer(&a, &edge.addr).0 == 200);
    f.cli(&r, &["model", "push", "mlp", &model("mlp_alt")]);
    f.cli(&r, &["rollout", "canary", "mlp", "2", "--weight", "30"]);
    wait_for("the canary routed", Duration::from_secs(60), || {
        let status = f.cli(&r, &["rollout", "status", "mlp"]);
        status["nodes"][0]["policy"]["weights"] == json!({ "1": 70, "2": 30 })
    });
    let load = Load::start(std::slice::from_ref(&edge.addr), 2);
    wait_for("traffic in the node's report", Duration::from_secs(30), || load.count() >= 500);

    // The page, rendered by Chromium after its scripts ran.
    let dom = chromium(&browser, &page, &["--dump-dom".to_string()]);
    for expected in ["edge-1", "site=berlin", "mlp", "stable v1", "canary v2 at 30%", "v1 70%", "v2 30%", "requests/s"]
    {
        assert!(dom.contains(expected), "the page lacks '{expected}':\n{dom}");
    }
    assert!(dom.contains(r#"id="error" style="display: none;""#), "the page shows an error: {dom}");
    // The figures it rendered, per version: both serve (requests/s), none fails, latencies are
    // ordered, each has replicas; the 70% stable version takes more traffic than the 30% canary.
    let rows = version_rows(&dom);
    let figure = |v: &str, column: usize| -> f64 {
        let row = rows.iter().find(|(version, _)| version == v).unwrap_or_else(|| panic!("no row for v{v}: {rows:?}"));
        row.1.get(column).and_then(|c| c.trim_end_matches('%').parse().ok()).unwrap_or_else(|| panic!("v{v}: {row:?}"))
    };
    for v in ["1", "2"] {
        let (rps, errors, p50, p99, replicas) = (figure(v, 0), figure(v, 1), figure(v, 2), figure(v, 3), figure(v, 4));
        assert!(rps > 0.0 && errors == 0.0 && p50 > 0.0 && p99 >= p50 && replicas >= 1.0, "v{v}: {rows:?}");
    }
    assert!(figure("1", 0) > figure("2", 0), "the 70% version served less than the 30% one: {rows:?}");
    // Its screenshot: a PNG of the window's size, with more than a blank page's bytes.
    let shot = f.dir.join("status.png");
    chromium(&browser, &page, &[format!("--screenshot={}", shot.display()), "--window-size=1200,900".to_string()]);
    let png = std::fs::read(&shot).expect("a screenshot");
    assert_eq!(&png[1..4], b"PNG");
    let size = |at: usize| u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]);
    assert_eq!((size(16), size(20)), (1200, 900), "IHDR width and height");
    assert!(png.len() > 20_000, "a {} byte screenshot looks blank", png.len());
    if let Some(dir) = std::env::var_os("FABRIC_SCREENSHOT_DIR") {
        let _ = std::fs::copy(&shot, std::path::Path::new(&dir).join("status-page.png"));
    }

    // The same in the terminal.
    let top = f.cli_as(&r, "operator", &["top", "--once"]);
    assert!(top.status.success(), "{}", String::from_utf8_lossy(&top.stderr));
    let text = String::from_utf8_lossy(&top.stdout);
    for expected in ["edge-1", "mlp (v1 v2): stable v1  canary v2 at 30%", "REQUESTS/S"] {
        assert!(text.contains(expected), "fabric top lacks '{expected}':\n{text}");
    }
    let samples = load.stop();
    assert!(samples.iter().all(|s| s.status == 200), "{:?}", samples.iter().find(|s| s.status != 200));
}

/// The per-version rows of the page's model table: the version and its cells after the first
/// (requests/s, errors, p50 ms, p99 ms, replicas), as rendered text.
fn version_rows(dom: &str) -> Vec<(String, Vec<String>)> {
    dom.split("<tr><td>v")
        .skip(1)
        .filter_map(|rest| {
            let row = rest.split("</tr>").next()?;
            let (version, cells) = row.split_once("</td>")?;
            let cells = cells
                .split("</td>")
                .filter_map(|c| c.rsplit('>').next())
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some((version.to_string(), cells))
        })
        .collect()
}
