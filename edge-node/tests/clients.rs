//! Client keys on both faces of a real edge-node: no key or an unknown one is 401 (gRPC
//! UNAUTHENTICATED), a model the key may not call is 403 (PERMISSION_DENIED), and a key over its
//! quota is 429 with Retry-After (RESOURCE_EXHAUSTED with retry-after) while other keys are served;
//! probes stay open; every refusal is counted per client.

mod support;

use std::time::Instant;

use fabric_proto::kserve_grpc::pb;
use fabric_testkit::http::binary_body;
use fabric_testkit::reference;
use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use support::{client, get, start_edge_with_args, Edge};
use tonic::Code;

const APP: &str = "app-key-0123456789abcdef";
const CNN_ONLY: &str = "cnn-only-key-0123456789";
const SLOW: &str = "slow-key-0123456789abcd";

fn sha256_hex(key: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, key.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn start() -> Edge {
    let config = format!(
        "[grpc]\nenabled = true\naddr = \"127.0.0.1:0\"\n\
         [[clients.keys]]\nname = \"app\"\nsha256 = \"{}\"\n\
         [[clients.keys]]\nname = \"cnn-only\"\nsha256 = \"{}\"\nmodels = [\"cnn\"]\n\
         [[clients.keys]]\nname = \"slow\"\nsha256 = \"{}\"\nrate_per_s = 5.0\nburst = 5.0\n",
        sha256_hex(APP),
        sha256_hex(CNN_ONLY),
        sha256_hex(SLOW)
    );
    let edge = start_edge_with_args(&[("mlp", ""), ("cnn", "")], &config, &[]);
    assert!(edge.grpc.is_some(), "no gRPC line");
    edge
}

/// An infer of the MLP over REST with `key` (or none): (status, Retry-After, error).
fn rest_infer(edge: &Edge, model: &str, key: Option<&str>) -> (u16, Option<String>, String) {
    let case = reference::load_cases(model).expect("cases").remove(0);
    let shape: Vec<usize> = case.inputs[0].tensor.shape().to_vec();
    let (body, n) = binary_body(&shape, 7, None);
    let mut request = client()
        .post(&format!("{}/v2/models/{model}/infer", edge.url))
        .header("Inference-Header-Content-Length", n.to_string());
    if let Some(key) = key {
        request = request.header("Authorization", format!("Bearer {key}"));
    }
    match request.send(&body[..]) {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
            let text = r.body_mut().read_to_string().unwrap_or_default();
            let error = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_default();
            (status, retry, error)
        }
        Err(e) => panic!("request failed: {e}"),
    }
}

fn grpc_request(model: &str, key: Option<&str>) -> tonic::Request<pb::ModelInferRequest> {
    let case = reference::load_cases(model).expect("cases").remove(0);
    let input = &case.inputs[0];
    let message = pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: input.name.clone(),
            datatype: input.tensor.dtype().as_str().into(),
            shape: input.tensor.shape().iter().map(|&d| d as i64).collect(),
            ..Default::default()
        }],
        raw_input_contents: vec![input.tensor.bytes().to_vec().into()],
        ..Default::default()
    };
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().expect("metadata"));
    }
    request
}

#[test]
fn keys_decide_who_calls_which_model_on_both_faces() {
    let edge = start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let addr = format!("http://{}", edge.grpc.clone().expect("grpc"));
    let mut grpc = rt.block_on(GrpcInferenceServiceClient::connect(addr)).expect("connects");
    let cases: &[(&str, Option<&str>, u16, Code, &str)] = &[
        ("mlp", Some(APP), 200, Code::Ok, ""),
        ("cnn", Some(CNN_ONLY), 200, Code::Ok, ""),
        ("mlp", None, 401, Code::Unauthenticated, "this node needs a client key"),
        ("mlp", Some("not-a-listed-key-012345"), 401, Code::Unauthenticated, "this node needs a client key"),
        (
            "mlp",
            Some(CNN_ONLY),
            403,
            Code::PermissionDenied,
            "client 'cnn-only' may not call model 'mlp' (its models: cnn)",
        ),
    ];
    for (model, key, status, code, message) in cases {
        let (got, _, error) = rest_infer(&edge, model, *key);
        assert_eq!(got, *status, "REST {model} {key:?}: {error}");
        assert!(error.contains(message), "REST {model} {key:?}: {error}");
        let answer = rt.block_on(grpc.model_infer(grpc_request(model, *key)));
        match answer {
            Ok(_) => assert_eq!(*code, Code::Ok, "gRPC {model} {key:?}"),
            Err(s) => {
                assert_eq!(s.code(), *code, "gRPC {model} {key:?}: {}", s.message());
                assert_eq!(s.message(), error, "the same words on both faces");
            }
        }
    }
    // Reads need a key too; probes and scrapers do not.
    assert_eq!(get(&client(), &format!("{}/v2/models/mlp", edge.url)).status, 401);
    let meta =
        rt.block_on(grpc.model_metadata(pb::ModelMetadataRequest { name: "mlp".into(), version: String::new() }));
    assert_eq!(meta.expect_err("no key").code(), Code::Unauthenticated);
    for path in ["/v2/health/live", "/v2/health/ready", "/v2", "/metrics"] {
        assert_eq!(get(&client(), &format!("{}{path}", edge.url)).status, 200, "{path}");
    }
    assert!(rt.block_on(grpc.server_ready(pb::ServerReadyRequest {})).expect("ready").into_inner().ready);
}

#[test]
fn a_key_over_its_rate_gets_429_with_retry_after_and_others_are_served() {
    let edge = start();
    let started = Instant::now();
    // 30 requests at once from the slow key (5/s, burst 5), and 10 from the app key beside them.
    let slow: Vec<_> = (0..30)
        .map(|_| {
            let url = edge.url.clone();
            std::thread::spawn(move || {
                let edge_url = url;
                let case = reference::load_cases("mlp").expect("cases").remove(0);
                let (body, n) = binary_body(case.inputs[0].tensor.shape(), 7, None);
                let r = client()
                    .post(&format!("{edge_url}/v2/models/mlp/infer"))
                    .header("Inference-Header-Content-Length", n.to_string())
                    .header("Authorization", format!("Bearer {SLOW}"))
                    .send(&body[..])
                    .expect("answer");
                (r.status().as_u16(), r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string))
            })
        })
        .collect();
    let app: Vec<u16> = (0..10).map(|_| rest_infer(&edge, "mlp", Some(APP)).0).collect();
    let slow: Vec<(u16, Option<String>)> = slow.into_iter().map(|t| t.join().expect("client")).collect();
    let elapsed = started.elapsed().as_secs_f64();
    assert!(app.iter().all(|s| *s == 200), "the app key is not limited: {app:?}");
    let admitted = slow.iter().filter(|(s, _)| *s == 200).count();
    let limited: Vec<&Option<String>> = slow.iter().filter(|(s, _)| *s == 429).map(|(_, r)| r).collect();
    assert_eq!(admitted + limited.len(), 30, "every request answered 200 or 429: {slow:?}");
    // The bucket: 5 at once, then 5 a second.
    assert!(admitted <= 5 + (5.0 * elapsed).ceil() as usize, "{admitted} admitted in {elapsed:.2} s");
    assert!(!limited.is_empty(), "nothing was limited");
    assert!(
        limited.iter().all(|r| r.as_deref().and_then(|v| v.parse::<u64>().ok()).is_some_and(|s| s >= 1)),
        "{limited:?}"
    );
    // gRPC answers the same quota with RESOURCE_EXHAUSTED and retry-after, until tokens come back.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let addr = format!("http://{}", edge.grpc.clone().expect("grpc"));
    let mut grpc = rt.block_on(GrpcInferenceServiceClient::connect(addr)).expect("connects");
    let refused = (0..20)
        .find_map(|_| rt.block_on(grpc.model_infer(grpc_request("mlp", Some(SLOW)))).err())
        .expect("a refusal within 20 calls");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{}", refused.message());
    assert!(refused.metadata().get("retry-after").is_some(), "retry-after metadata");
    // Counted per client.
    let metrics = get(&client(), &format!("{}/metrics", edge.url)).text();
    let count = |client: &str, outcome: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("fabric_client_requests_total{")
                    && l.contains(&format!("client=\"{client}\""))
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(count("slow", "rate_limited") >= limited.len() as f64 + 1.0, "{metrics}");
    assert!(count("app", "admitted") >= 10.0);
}
