//! Model quality on a real local fabric (registry, edge-node, the `fabric` CLI): drift of the digits
//! classifier's inputs and predictions against its training sample, live accuracy from feedback,
//! and a canary rolled back on accuracy alone.

mod support;

use std::time::Duration;

use fabric_testkit::http::post;
use fabric_testkit::reference;
use serde_json::{json, Value};
use support::{client, model, wait_for, Fabric};

/// The held-out digits: rows of 64 values and their true labels.
fn held_out() -> (Vec<Vec<f32>>, Vec<i64>) {
    let case = reference::load_case(&reference::build_dir().join("reference/digits/test")).expect("digits case");
    let x = case.inputs[0].tensor.as_slice::<f32>().expect("FP32").to_vec();
    let y = case.extra("y_true").expect("labels").as_slice::<i64>().expect("INT64").to_vec();
    (x.chunks(64).map(<[f32]>::to_vec).collect(), y)
}

/// The digits with the left half of each image brightened by 0.5 (clipped at 1): the 32 features
/// of columns 0-3 shift, the 32 of columns 4-7 do not.
fn brightened_left(rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    rows.iter()
        .map(|r| r.iter().enumerate().map(|(i, v)| if i % 8 < 4 { (v + 0.5).min(1.0) } else { *v }).collect())
        .collect()
}

/// The digits with uniform noise of +-0.25 added to every pixel (clipped to 0..1), from a fixed seed.
fn noisy(rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32
    };
    rows.iter().map(|r| r.iter().map(|v| (v + (uniform() - 0.5) * 0.5).clamp(0.0, 1.0)).collect()).collect()
}

/// The digits with the first third of the images turned a quarter (as numpy's rot90 turns them).
fn a_third_rotated(rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    rows.iter()
        .enumerate()
        .map(
            |(n, r)| if n < rows.len() / 3 { (0..64).map(|i| r[(i % 8) * 8 + 7 - i / 8]).collect() } else { r.clone() },
        )
        .collect()
}

/// Sends `rows` to `model` at `base` in requests of 10 rows with ids `<prefix>-<n>`; returns the
/// predicted label of every row.
fn send(base: &str, model: &str, rows: &[Vec<f32>], prefix: &str) -> Vec<i64> {
    let a = client();
    let mut labels = Vec::new();
    for (n, chunk) in rows.chunks(10).enumerate() {
        let data: Vec<f32> = chunk.iter().flatten().copied().collect();
        let body = json!({
            "id": format!("{prefix}-{n}"),
            "inputs": [{ "name": "input", "shape": [chunk.len(), 64], "datatype": "FP32", "data": data }],
            "outputs": [{ "name": "label" }],
        });
        let reply = post(&a, &format!("{base}/v2/models/{model}/infer"), body.to_string().as_bytes(), None);
        assert_eq!(reply.status, 200, "{}", reply.text());
        let answer = reply.json();
        assert_eq!(answer["id"], format!("{prefix}-{n}"));
        let out = answer["outputs"].as_array().and_then(|o| o.first()).cloned().unwrap_or(Value::Null);
        labels.extend(out["data"].as_array().expect("labels").iter().map(|v| v.as_i64().expect("label")));
    }
    labels
}

/// The drift view of one version.
fn drift_of(f: &Fabric, registry: &str, name: &str, version: u64) -> Value {
    let view = f.cli(registry, &["drift", name]);
    view["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["version"] == version).cloned())
        .unwrap_or(Value::Null)
}

#[test]
fn held_out_digits_show_no_drift_and_brightened_ones_drift_on_the_right_features() {
    let f = Fabric::new("drift");
    let (registry, page) = f.registry_with_page("127.0.0.1:0", &[]);
    let r = registry.addr.clone();
    let edge = f.edge("edge-1", &r, &[]);
    let sample = reference::build_dir().join("reference/digits/train.npz");
    let sample = sample.to_str().expect("path");
    // The same model under several names: one gets the held-out digits, each other one a shift of them.
    for name in ["digits", "digits-shifted", "digits-noisy", "digits-rotated"] {
        let set = f.cli(&r, &["model", "push", name, &model("digits"), "--reference", sample]);
        assert_eq!((set["rows"].as_u64(), set["features"].as_u64()), (Some(1347), Some(64)), "{set}");
        assert_eq!(set["prediction_output"], "label");
        let classes: u64 = set["classes"].as_array().expect("classes").iter().filter_map(Value::as_u64).sum();
        assert_eq!(classes, 1347, "the model's predictions on every sample row: {set}");
        f.cli(&r, &["deploy", name, "--to", "edge"]);
    }
    // A bad sample is refused with the reason, and changes nothing.
    let bad = f.dir.join("bad.npy");
    std::fs::write(&bad, b"not a numpy file").expect("write");
    let out = f.cli_as(&r, "operator", &["model", "reference", "digits:1", bad.to_str().expect("path")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither .npy nor .npz"), "{out:?}");
    let wrong = reference::build_dir().join("reference/digits/test/in-input.bin");
    let out = f.cli_as(&r, "operator", &["model", "reference", "digits:9", wrong.to_str().expect("path")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no model version digits:9"), "{out:?}");

    // Both counting on the edge once it has fetched the references (its load report says so).
    wait_for("the edge counting drift for both models", Duration::from_secs(60), || {
        ["digits", "digits-shifted", "digits-noisy", "digits-rotated"].iter().all(|name| {
            let status = f.cli(&r, &["rollout", "status", name]);
            status["nodes"][0]["versions"][0]["drift"].is_object()
        })
    });
    let (rows, truth) = held_out();
    let predicted = send(&edge.addr, "digits", &rows, "held");
    let correct = predicted.iter().zip(&truth).filter(|(p, t)| p == t).count();
    assert!(correct * 100 >= rows.len() * 95, "held-out accuracy {correct}/{}", rows.len());
    send(&edge.addr, "digits-shifted", &brightened_left(&rows), "bright");
    send(&edge.addr, "digits-noisy", &noisy(&rows), "noisy");
    send(&edge.addr, "digits-rotated", &a_third_rotated(&rows), "rotated");

    // Within one window (the edge reports its counts with its next heartbeat).
    wait_for("the registry holding every model's counts", Duration::from_secs(30), || {
        ["digits", "digits-shifted", "digits-noisy", "digits-rotated"]
            .iter()
            .all(|name| drift_of(&f, &r, name, 1)["rows"] == 450)
    });
    let drifted_of = |view: &Value| -> Vec<u64> {
        let features = view["features"].as_array().cloned().unwrap_or_default();
        features.iter().filter(|s| s["drifted"] == true).filter_map(|s| s["feature"].as_u64()).collect()
    };
    // Noise moves most pixels (the model, trained on clean digits, mostly still answers the same);
    // a third of the digits turned moves pixels and the predicted classes.
    let noise = drift_of(&f, &r, "digits-noisy", 1);
    assert_eq!(noise["verdict"], "drift", "{noise}");
    assert!(drifted_of(&noise).len() >= 16, "{noise}");
    let turned = drift_of(&f, &r, "digits-rotated", 1);
    assert_eq!(turned["verdict"], "drift", "{turned}");
    assert!(drifted_of(&turned).len() >= 16, "{turned}");
    assert_eq!(turned["prediction"]["drifted"], true, "{turned}");
    let same = drift_of(&f, &r, "digits", 1);
    assert_eq!(same["verdict"], "none", "{same}");
    assert_eq!(same["drifted_features"], 0, "{same}");
    assert_eq!(same["prediction"]["drifted"], false, "{same}");
    let shifted = drift_of(&f, &r, "digits-shifted", 1);
    assert_eq!(shifted["verdict"], "drift", "{shifted}");
    let drifted = drifted_of(&shifted);
    assert!(drifted.len() >= 24, "most of the 32 brightened features drift: {drifted:?}");
    assert!(drifted.iter().all(|f| f % 8 < 4), "only brightened features drift: {drifted:?}");
    assert_eq!(shifted["prediction"]["drifted"], true, "{shifted}");
    // The registry's /metrics says the same, for Prometheus and the alert rules.
    let metrics = fabric_testkit::http::get(&client(), &format!("{page}/metrics")).text();
    let line = |prefix: &str| metrics.lines().find(|l| l.starts_with(prefix)).map(str::to_string);
    let shifted_count = line("fabric_drift_features_drifted{model=\"digits-shifted\",version=\"1\"}");
    assert_eq!(
        shifted_count.as_deref().and_then(|l| l.rsplit(' ').next()),
        Some(drifted.len().to_string().as_str()),
        "{metrics}"
    );
    let same_count = line("fabric_drift_features_drifted{model=\"digits\",version=\"1\"}");
    assert_eq!(same_count.as_deref().and_then(|l| l.rsplit(' ').next()), Some("0"), "{metrics}");
    // Every family it exposes is in docs/metrics.md's section on the registry.
    let page_doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md")).expect("doc");
    let section = page_doc.split("## The registry's").nth(1).expect("the registry's section");
    for family in metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()) {
        let listed = section.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(|w| w == family);
        assert!(listed, "{family} is not in docs/metrics.md");
    }
    // The table says the same, the most drifted feature first.
    let out = f.cli_as(&r, "operator", &["drift", "digits-shifted"]);
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    eprintln!("{}", String::from_utf8_lossy(&f.cli_as(&r, "operator", &["drift", "digits"]).stdout));
    assert!(table.contains("digits-shifted:1: drift") && table.contains("DRIFT"), "{table}");
}

/// Sends each row alone with id `<prefix>-<n>`; returns the version that answered each.
fn send_rows(base: &str, rows: &[Vec<f32>], prefix: &str) -> Vec<String> {
    let a = client();
    rows.iter()
        .enumerate()
        .map(|(n, row)| {
            let body = json!({
                "id": format!("{prefix}-{n}"),
                "inputs": [{ "name": "input", "shape": [1, 64], "datatype": "FP32", "data": row }],
            });
            let reply = post(&a, &format!("{base}/v2/models/digits/infer"), body.to_string().as_bytes(), None);
            assert_eq!(reply.status, 200, "{}", reply.text());
            reply.json()["model_version"].as_str().expect("version").to_string()
        })
        .collect()
}

/// Posts feedback to `model` at `base`; returns the status and the answer.
fn feedback(base: &str, model: &str, body: &Value) -> (u16, Value) {
    let reply = post(&client(), &format!("{base}/v2/models/{model}/feedback"), body.to_string().as_bytes(), None);
    (reply.status, reply.json())
}

#[test]
fn a_canary_worse_on_the_digits_is_rolled_back_on_accuracy_from_feedback() {
    let f = Fabric::new("accuracy");
    // Latency is not what this test is about: its margin is set wide, so only accuracy can roll back.
    let registry = f.registry("127.0.0.1:0", &["--rollback-p99-margin-pct", "10000"]);
    let r = registry.addr.clone();
    let edge = f.edge("edge-1", &r, &[]);
    f.cli(&r, &["model", "push", "digits", &model("digits")]);
    f.cli(&r, &["deploy", "digits", "--to", "edge"]);
    // Version 2: the same network trained with every 3 and 5 labelled 8 (as fast, and wrong more often).
    f.cli(&r, &["model", "push", "digits", &model("digits_mislabelled")]);
    f.cli(&r, &["rollout", "canary", "digits", "2", "--weight", "50", "--auto-rollback"]);
    wait_for("the edge routing half to the canary", Duration::from_secs(60), || {
        let status = f.cli(&r, &["rollout", "status", "digits"]);
        status["nodes"][0]["policy"]["weights"] == json!({ "1": 50, "2": 50 })
            && status["nodes"][0]["converged"] == true
    });

    // Feedback's precise errors, and what it does not count.
    let (rows, truth) = held_out();
    send_rows(&edge.addr, &rows[..2], "probe");
    let (status, answer) = feedback(
        &edge.addr,
        "digits",
        &json!({ "feedback": [
            { "id": "probe-0", "label": truth[0] },
            { "id": "probe-1", "labels": [1, 2] },
            { "id": "never-sent", "label": 3 },
            { "id": "probe-0", "label": truth[0] },
        ]}),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["labelled"], 1, "{answer}");
    assert_eq!(answer["unknown"], json!(["never-sent", "probe-0"]), "labelled once only: {answer}");
    assert!(answer["refused"][0]["error"].as_str().is_some_and(|e| e.contains("1 row(s) but 2 label(s)")), "{answer}");
    let (status, answer) = feedback(&edge.addr, "digits", &json!({ "labels": [1] }));
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().is_some_and(|e| e.contains("\"feedback\"")), "{answer}");
    let (status, _) = feedback(&edge.addr, "no-such-model", &json!({ "feedback": [] }));
    assert_eq!(status, 404);

    // Held-out digits one at a time, each labelled afterwards, until the registry rolls back.
    let mut answered_by = std::collections::BTreeMap::<String, usize>::new();
    for round in 0..5 {
        let prefix = format!("r{round}");
        let versions = send_rows(&edge.addr, &rows, &prefix);
        for v in versions {
            *answered_by.entry(v).or_default() += 1;
        }
        let labels: Vec<Value> =
            truth.iter().enumerate().map(|(n, t)| json!({ "id": format!("{prefix}-{n}"), "label": t })).collect();
        let (status, answer) = feedback(&edge.addr, "digits", &json!({ "feedback": labels }));
        assert_eq!((status, answer["labelled"].as_u64()), (200, Some(rows.len() as u64)), "{answer}");
        assert_eq!(answer["unknown"], json!([]), "{answer}");
        let rolled_back =
            || f.cli(&r, &["rollout", "status", "digits"])["rollout"]["auto_rolled_back"].as_str().map(str::to_string);
        let waited = std::time::Instant::now();
        while rolled_back().is_none() && waited.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(why) = rolled_back() {
            assert!(why.contains("canary accuracy"), "rolled back on accuracy: {why}");
            let status = f.cli(&r, &["rollout", "status", "digits"]);
            assert!(status["rollout"]["canary"].is_null(), "{status}");
            // Each version's live accuracy, as the rollout status shows it.
            let accuracy = |v: &str| status["accuracy"][v]["accuracy_pct"].as_f64().unwrap_or(0.0);
            assert!(accuracy("1") > 90.0 && accuracy("2") < 90.0, "{status}");
            // Rolled back while both answered without errors.
            assert!(answered_by.get("1").is_some_and(|n| *n > 100) && answered_by.get("2").is_some_and(|n| *n > 100));
            eprintln!("rolled back after {} labelled rows ({answered_by:?}): {why}", (round + 1) * rows.len());
            // Every request from here on goes to the stable version.
            assert!(send_rows(&edge.addr, &rows[..20], "after").iter().all(|v| v == "1"));
            return;
        }
    }
    panic!("no rollback on accuracy after 5 rounds: {}", f.cli(&r, &["rollout", "status", "digits"]));
}

/// One row to the cascade's small model at `base` (with `parameters`): status and answer.
fn cascade_infer(base: &str, row: &[f32], parameters: Value) -> (u16, Value) {
    let body = json!({
        "inputs": [{ "name": "input", "shape": [1, 64], "datatype": "FP32", "data": row }],
        "parameters": parameters,
    });
    let reply = post(&client(), &format!("{base}/v2/models/digits-small/infer"), body.to_string().as_bytes(), None);
    (reply.status, reply.json())
}

/// An answer's output by name.
fn output(answer: &Value, name: &str) -> Vec<f64> {
    let outputs = answer["outputs"].as_array().cloned().unwrap_or_default();
    let o = outputs.iter().find(|o| o["name"] == name).cloned().unwrap_or(Value::Null);
    o["data"].as_array().map(|d| d.iter().filter_map(Value::as_f64).collect()).unwrap_or_default()
}

#[test]
fn a_cascade_answers_sure_digits_on_the_edge_and_escalates_the_rest_to_the_big_model_on_the_hub() {
    let f = Fabric::new("cascade");
    let registry = f.registry("127.0.0.1:0", &[]);
    let r = registry.addr.clone();
    let mut hub = f.hub(&r);
    // The edge's config names a cascade to a model that does not exist: the deployment's, placed by
    // the registry, wins (run-fabric.sh and the examples run one from the config file).
    let configured = "[cascade.digits-small]\nto = \"no-such-model\"\nthreshold = 0.5\n";
    let edge = f.edge_with("edge-1", &r, &[], Some(configured));
    f.cli(&r, &["model", "push", "digits", &model("digits")]);
    f.cli(&r, &["deploy", "digits", "--to", "hub"]);
    f.cli(&r, &["model", "push", "digits-small", &model("digits_small")]);
    let deployed =
        f.cli(&r, &["deploy", "digits-small", "--to", "edge", "--cascade-to", "digits", "--cascade-threshold", "0.9"]);
    assert_eq!(deployed["deployments"][0]["cascade"]["to"], "digits", "{deployed}");
    let bad = f.cli_as(&r, "operator", &["deploy", "digits-small", "--to", "edge", "--cascade-to", "../x"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a model name"), "{bad:?}");
    let (rows, truth) = held_out();
    // Once the edge serves the small model and reaches the hub, a request that asks for more
    // confidence than any answer has escalates.
    wait_for("an escalation reaching the hub's digits", Duration::from_secs(60), || {
        let (status, answer) = cascade_infer(&edge.addr, &rows[0], json!({ "cascade_threshold": 1.5 }));
        status == 200 && answer["parameters"]["cascade"] == "escalated"
    });

    // The held-out digits at the configured threshold: each answered once, by the model it says.
    let big = reference::load_case(&reference::build_dir().join("reference/digits/test")).expect("digits case");
    let big_labels = big
        .outputs
        .iter()
        .find(|o| o.name == "label")
        .expect("label")
        .tensor
        .as_slice::<i64>()
        .expect("INT64")
        .to_vec();
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    let mut correct = 0usize;
    for (n, row) in rows.iter().enumerate() {
        let (status, answer) = cascade_infer(&edge.addr, row, json!({}));
        assert_eq!(status, 200, "{answer}");
        let outcome = answer["parameters"]["cascade"].as_str().expect("cascade outcome").to_string();
        let label = output(&answer, "label")[0] as i64;
        let top = output(&answer, "probabilities").into_iter().fold(0.0, f64::max);
        match outcome.as_str() {
            "small" => {
                assert_eq!(answer["parameters"]["answered_by_model"], "digits-small");
                assert!(top >= 0.9, "a confident answer: {answer}");
            }
            "escalated" => {
                assert_eq!(answer["parameters"]["answered_by_model"], "digits");
                assert_eq!(answer["parameters"]["served_by"], "hub hub-1");
                assert_eq!(label, big_labels[n], "the big model's own answer for digit {n}");
            }
            "fallback" => assert!(answer["parameters"]["cascade_note"].is_string(), "{answer}"),
            other => panic!("unknown outcome {other}: {answer}"),
        }
        correct += usize::from(label == truth[n]);
        *outcomes.entry(outcome).or_default() += 1;
    }
    let escalated = outcomes.get("escalated").copied().unwrap_or(0);
    eprintln!(
        "cascade at 0.9: {outcomes:?}, accuracy {:.2}% ({} of 450 escalated)",
        correct as f64 * 100.0 / rows.len() as f64,
        escalated
    );
    assert!(escalated > 0 && outcomes.get("small").is_some_and(|n| *n > rows.len() / 2), "{outcomes:?}");
    let (status, answer) = cascade_infer(&edge.addr, &rows[0], json!({ "cascade_threshold": "high" }));
    assert_eq!(status, 400, "{answer}");

    // The hub gone: an unsure digit gets the small model's answer, saying why, within its deadline.
    hub.kill();
    let started = std::time::Instant::now();
    let (status, answer) =
        cascade_infer(&edge.addr, &rows[0], json!({ "cascade_threshold": 1.5, "timeout": 2_000_000 }));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["parameters"]["cascade"], "fallback", "{answer}");
    assert_eq!(answer["parameters"]["answered_by_model"], "digits-small");
    assert!(started.elapsed() < Duration::from_secs(10), "answered within its deadline's reach");
}
