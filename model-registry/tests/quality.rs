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
    let registry = f.registry("127.0.0.1:0", &[]);
    let r = registry.addr.clone();
    let edge = f.edge("edge-1", &r, &[]);
    let sample = reference::build_dir().join("reference/digits/train.npz");
    let sample = sample.to_str().expect("path");
    // The same model under two names: one gets held-out digits, the other brightened ones.
    for name in ["digits", "digits-shifted"] {
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
        ["digits", "digits-shifted"].iter().all(|name| {
            let status = f.cli(&r, &["rollout", "status", name]);
            status["nodes"][0]["versions"][0]["drift"].is_object()
        })
    });
    let (rows, truth) = held_out();
    let predicted = send(&edge.addr, "digits", &rows, "held");
    let correct = predicted.iter().zip(&truth).filter(|(p, t)| p == t).count();
    assert!(correct * 100 >= rows.len() * 95, "held-out accuracy {correct}/{}", rows.len());
    send(&edge.addr, "digits-shifted", &brightened_left(&rows), "bright");

    // Within one window (the edge reports its counts with its next heartbeat).
    wait_for("the registry holding both models' counts", Duration::from_secs(30), || {
        drift_of(&f, &r, "digits", 1)["rows"] == 450 && drift_of(&f, &r, "digits-shifted", 1)["rows"] == 450
    });
    let same = drift_of(&f, &r, "digits", 1);
    assert_eq!(same["verdict"], "none", "{same}");
    assert_eq!(same["drifted_features"], 0, "{same}");
    assert_eq!(same["prediction"]["drifted"], false, "{same}");
    let shifted = drift_of(&f, &r, "digits-shifted", 1);
    assert_eq!(shifted["verdict"], "drift", "{shifted}");
    let drifted: Vec<u64> = shifted["features"]
        .as_array()
        .expect("features")
        .iter()
        .filter(|s| s["drifted"] == true)
        .filter_map(|s| s["feature"].as_u64())
        .collect();
    assert!(drifted.len() >= 24, "most of the 32 brightened features drift: {drifted:?}");
    assert!(drifted.iter().all(|f| f % 8 < 4), "only brightened features drift: {drifted:?}");
    assert_eq!(shifted["prediction"]["drifted"], true, "{shifted}");
    // The table says the same, the most drifted feature first.
    let out = f.cli_as(&r, "operator", &["drift", "digits-shifted"]);
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    eprintln!("{}", String::from_utf8_lossy(&f.cli_as(&r, "operator", &["drift", "digits"]).stdout));
    assert!(table.contains("digits-shifted:1: drift") && table.contains("DRIFT"), "{table}");
}
