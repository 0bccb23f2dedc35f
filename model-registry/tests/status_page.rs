//! The registry's status page in a real browser (Debian's Chromium, headless) and `fabric top`, on a
//! fabric with a canary under load: the page's rendered DOM shows the node, the model, the rollout and
//! its live traffic split; its screenshot is a real rendering; `fabric top --once` shows the same.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::{agent, infer, model, wait_for, Fabric, Load};

/// Chromium, headless, on `url` with `args` (bounded: 60 s); returns stdout.
fn chromium(url: &str, args: &[String]) -> String {
    let bin = ["chromium", "chromium-browser"]
        .iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
        .unwrap_or_else(|| panic!("Chromium is not installed: run scripts/setup.sh (it installs Debian's chromium)"));
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
    let f = Fabric::new("status");
    let (registry, page) = f.registry_with_page("127.0.0.1:0", &[]);
    let r = registry.addr.clone();
    let edge = f.edge("edge-1", &r, &["site=berlin"]);
    f.cli(&r, &["model", "push", "mlp", &model("mlp")]);
    f.cli(&r, &["deploy", "mlp", "--to", "edge"]);
    let a = agent();
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
    let dom = chromium(&page, &["--dump-dom".to_string()]);
    for expected in ["edge-1", "site=berlin", "mlp", "stable v1", "canary v2 at 30%", "v1 70%", "v2 30%", "requests/s"]
    {
        assert!(dom.contains(expected), "the page lacks '{expected}':\n{dom}");
    }
    assert!(dom.contains(r#"id="error" style="display: none;""#), "the page shows an error: {dom}");
    // Its screenshot: a PNG of the window's size, with more than a blank page's bytes.
    let shot = f.dir.join("status.png");
    chromium(&page, &[format!("--screenshot={}", shot.display()), "--window-size=1200,900".to_string()]);
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
