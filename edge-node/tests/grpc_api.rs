//! edge-node's two faces, KServe v2 over REST and over gRPC, against the real binary: one table of
//! requests sent to both, each answered alike (the same outputs, or the same failure as an HTTP
//! status and a gRPC code with the same message), then the gRPC-only parts: typed contents, every
//! metadata RPC beside its REST twin, the stream (every request answered once), message limits and
//! the repository RPCs.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use fabric_proto::kserve_grpc::{int_parameter, pb};
use fabric_testkit::reference::{self, max_abs_diff};
use fabric_types::{DataType, NamedTensor, Tensor};
use pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use serde_json::{json, Value};
use support::{client, get, post, start_edge_with_args, Edge, Reply};
use tonic::transport::Channel;
use tonic::Code;

const MODELS: &[(&str, &str)] = &[("mlp", ""), ("mixed", ""), ("digits", "max_batch_size = 512\n")];

/// A request in face-neutral form.
struct Case {
    label: &'static str,
    model: &'static str,
    version: Option<&'static str>,
    inputs: Vec<NamedTensor>,
    outputs: Vec<&'static str>,
    timeout_us: Option<u64>,
}

/// What both faces must answer: outputs like the reference's, or this failure.
enum Want {
    Outputs(Vec<NamedTensor>),
    Fails { http: u16, grpc: Code, message: &'static str },
}

fn start(args: &[&str]) -> Edge {
    let mut all = vec!["--grpc-addr".to_string(), "127.0.0.1:0".to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    let edge = start_edge_with_args(MODELS, "[grpc]\nmax_message_bytes = 1048576\n", &all);
    assert!(edge.grpc.is_some(), "edge-node printed no gRPC line");
    edge
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

async fn connect(edge: &Edge) -> GrpcInferenceServiceClient<Channel> {
    let addr = edge.grpc.clone().expect("grpc address");
    let channel = tokio::time::timeout(
        Duration::from_secs(10),
        Channel::from_shared(format!("http://{addr}")).expect("uri").connect(),
    )
    .await
    .expect("connects within 10 s")
    .expect("connects");
    GrpcInferenceServiceClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

fn rest(edge: &Edge, case: &Case) -> Reply {
    let decls: Vec<Value> = case
        .inputs
        .iter()
        .map(|t| {
            json!({ "name": t.name, "shape": t.tensor.shape(), "datatype": t.tensor.dtype().as_str(),
                    "parameters": { "binary_data_size": t.tensor.bytes().len() } })
        })
        .collect();
    let mut head = json!({ "inputs": decls, "parameters": { "binary_data_output": true } });
    if let Some(t) = case.timeout_us {
        head["parameters"]["timeout"] = json!(t);
    }
    if !case.outputs.is_empty() {
        head["outputs"] = json!(case.outputs.iter().map(|o| json!({ "name": o })).collect::<Vec<_>>());
    }
    let mut body = serde_json::to_vec(&head).expect("json");
    let n = body.len();
    for t in &case.inputs {
        body.extend_from_slice(t.tensor.bytes());
    }
    let url = match case.version {
        None => format!("{}/v2/models/{}/infer", edge.url, case.model),
        Some(v) => format!("{}/v2/models/{}/versions/{v}/infer", edge.url, case.model),
    };
    post(&client(), &url, &body, Some(n))
}

fn rest_outputs(reply: &Reply) -> Vec<NamedTensor> {
    let head = reply.json();
    let mut offset = reply.header_length.expect("binary outputs");
    head["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .map(|o| {
            let dtype: DataType = o["datatype"].as_str().expect("datatype").parse().expect("dtype");
            let shape: Vec<usize> =
                o["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim") as usize).collect();
            let n = o["parameters"]["binary_data_size"].as_u64().expect("size") as usize;
            let bytes = reply.body[offset..offset + n].to_vec();
            offset += n;
            NamedTensor::new(
                o["name"].as_str().expect("name"),
                Tensor::from_bytes(dtype, shape, bytes).expect("tensor"),
            )
        })
        .collect()
}

fn grpc_request(case: &Case) -> pb::ModelInferRequest {
    let mut parameters = HashMap::new();
    if let Some(t) = case.timeout_us {
        parameters.insert("timeout".to_string(), int_parameter(t as i64));
    }
    pb::ModelInferRequest {
        model_name: case.model.to_string(),
        model_version: case.version.unwrap_or_default().to_string(),
        id: case.label.to_string(),
        parameters,
        inputs: case
            .inputs
            .iter()
            .map(|t| pb::model_infer_request::InferInputTensor {
                name: t.name.clone(),
                datatype: t.tensor.dtype().as_str().to_string(),
                shape: t.tensor.shape().iter().map(|&d| d as i64).collect(),
                ..Default::default()
            })
            .collect(),
        outputs: case
            .outputs
            .iter()
            .map(|o| pb::model_infer_request::InferRequestedOutputTensor { name: o.to_string(), ..Default::default() })
            .collect(),
        raw_input_contents: case.inputs.iter().map(|t| t.tensor.bytes().to_vec().into()).collect(),
    }
}

fn grpc_outputs(response: &pb::ModelInferResponse) -> Vec<NamedTensor> {
    response
        .outputs
        .iter()
        .zip(&response.raw_output_contents)
        .map(|(o, raw)| {
            let dtype: DataType = o.datatype.parse().expect("dtype");
            let shape = o.shape.iter().map(|&d| d as usize).collect();
            NamedTensor::new(o.name.clone(), Tensor::from_bytes(dtype, shape, raw.to_vec()).expect("tensor"))
        })
        .collect()
}

fn assert_close(got: &[NamedTensor], want: &[NamedTensor], what: &str) {
    assert_eq!(
        got.iter().map(|t| &t.name).collect::<Vec<_>>(),
        want.iter().map(|t| &t.name).collect::<Vec<_>>(),
        "{what}"
    );
    for (g, w) in got.iter().zip(want) {
        let diff = max_abs_diff(&g.tensor, &w.tensor).unwrap_or_else(|e| panic!("{what} {}: {e}", g.name));
        assert!(diff <= 1e-4, "{what} {}: max diff {diff}", g.name);
    }
}

fn fp32(shape: Vec<usize>, value: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(shape, vec![value; n]).expect("fp32")
}

#[test]
fn both_faces_answer_every_case_alike() {
    let edge = start(&[]);
    let rt = runtime();
    let mut grpc = rt.block_on(connect(&edge));
    let mlp = reference::load_cases("mlp").expect("mlp cases").remove(0);
    let mixed = reference::load_cases("mixed").expect("mixed cases").remove(0);
    let digits = reference::load_cases("digits").expect("digits cases").remove(0);
    let input = |t: Tensor| vec![NamedTensor::new("input", t)];
    let case = |label, model, inputs: Vec<NamedTensor>| Case {
        label,
        model,
        version: None,
        inputs,
        outputs: vec![],
        timeout_us: None,
    };
    let fails = |http, grpc, message| Want::Fails { http, grpc, message };
    let mixed_second = mixed.outputs[1].clone();
    #[rustfmt::skip]
    let cases: Vec<(Case, Want)> = vec![
        (case("mlp reference", "mlp", mlp.inputs.clone()), Want::Outputs(mlp.outputs.clone())),
        (case("mixed reference", "mixed", mixed.inputs.clone()), Want::Outputs(mixed.outputs.clone())),
        (case("digits, 450 rows", "digits", digits.inputs.clone()), Want::Outputs(digits.outputs.clone())),
        (Case { outputs: vec![mixed_second.name.as_str().to_owned().leak()], ..case("one output chosen", "mixed", mixed.inputs.clone()) }, Want::Outputs(vec![mixed_second])),
        (Case { version: Some("1"), ..case("version named", "mlp", mlp.inputs.clone()) }, Want::Outputs(mlp.outputs.clone())),
        (case("wrong shape", "mlp", input(fp32(vec![1, 783], 0.5))), fails(400, Code::InvalidArgument, "dimension 1 must be 784")),
        (case("wrong rank", "mlp", input(fp32(vec![784], 0.5))), fails(400, Code::InvalidArgument, "has shape [784] (rank 1)")),
        (case("wrong dtype", "mlp", input(Tensor::from_vec(vec![1, 784], vec![0.5f64; 784]).expect("fp64"))), fails(400, Code::InvalidArgument, "has datatype FP64, the model expects FP32")),
        (case("wrong input name", "mlp", vec![NamedTensor::new("x", fp32(vec![1, 784], 0.5))]), fails(400, Code::InvalidArgument, "unknown input 'x'")),
        (case("missing input", "mixed", vec![mixed.inputs[0].clone()]), fails(400, Code::InvalidArgument, "missing input 'weights'")),
        (case("zero rows", "mlp", input(fp32(vec![0, 784], 0.5))), fails(400, Code::InvalidArgument, "input 'input' has 0 rows")),
        (Case { outputs: vec!["probs"], ..case("unknown output", "mlp", mlp.inputs.clone()) }, fails(400, Code::InvalidArgument, "unknown output 'probs'")),
        (case("unknown model", "resnet", mlp.inputs.clone()), fails(404, Code::NotFound, "unknown model 'resnet' (served models: digits, mixed, mlp)")),
        (Case { version: Some("7"), ..case("unknown version", "mlp", mlp.inputs.clone()) }, fails(404, Code::NotFound, "model 'mlp' has no version '7' (versions: 1)")),
        (Case { timeout_us: Some(1), ..case("deadline", "mlp", mlp.inputs.clone()) }, fails(503, Code::Unavailable, "deadline")),
    ];
    for (case, want) in &cases {
        let reply = rest(&edge, case);
        let answer = rt.block_on(grpc.model_infer(grpc_request(case)));
        match want {
            Want::Outputs(outputs) => {
                assert_eq!(reply.status, 200, "{} (REST): {}", case.label, String::from_utf8_lossy(&reply.body));
                let response = answer.unwrap_or_else(|s| panic!("{} (gRPC): {s:?}", case.label)).into_inner();
                assert_close(&rest_outputs(&reply), outputs, &format!("{} (REST)", case.label));
                assert_close(&grpc_outputs(&response), outputs, &format!("{} (gRPC)", case.label));
                assert_eq!(
                    (response.model_name.as_str(), response.model_version.as_str(), response.id.as_str()),
                    (case.model, "1", case.label)
                );
                let served_by = response.parameters.get("served_by").and_then(|p| p.parameter_choice.clone());
                assert_eq!(
                    served_by,
                    Some(pb::infer_parameter::ParameterChoice::StringParam("edge-node".into())),
                    "{}",
                    case.label
                );
            }
            Want::Fails { http, grpc: code, message } => {
                assert_eq!(reply.status, *http, "{} (REST): {}", case.label, String::from_utf8_lossy(&reply.body));
                let status = answer.expect_err(case.label);
                assert_eq!(status.code(), *code, "{} (gRPC): {}", case.label, status.message());
                assert!(reply.error().contains(message), "{} (REST): {}", case.label, reply.error());
                // The same words on both faces (a deadline's message carries its own timings).
                if case.label != "deadline" {
                    assert_eq!(status.message(), reply.error(), "{}", case.label);
                } else {
                    assert!(status.message().contains(message), "{} (gRPC): {}", case.label, status.message());
                }
            }
        }
    }
    // Both faces were counted alike: every case twice.
    let metrics = get(&client(), &format!("{}/metrics", edge.url)).text();
    let mlp_ok = metrics
        .lines()
        .find(|l| {
            l.starts_with("fabric_requests_total{") && l.contains("model=\"mlp\"") && l.contains("outcome=\"ok\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(mlp_ok, Some(4.0), "two mlp successes per face:\n{metrics}");
}

#[test]
fn typed_contents_metadata_and_the_stream() {
    let edge = start(&[]);
    let rt = runtime();
    let mut grpc = rt.block_on(connect(&edge));
    let agent = client();
    let mlp = reference::load_cases("mlp").expect("mlp cases").remove(0);

    // Typed contents instead of raw bytes.
    let mut typed = grpc_request(&Case {
        label: "typed",
        model: "mlp",
        version: None,
        inputs: mlp.inputs.clone(),
        outputs: vec![],
        timeout_us: None,
    });
    let values = mlp.inputs[0].tensor.as_slice::<f32>().expect("fp32").to_vec();
    typed.raw_input_contents.clear();
    typed.inputs[0].contents = Some(pb::InferTensorContents { fp32_contents: values, ..Default::default() });
    let response = rt.block_on(grpc.model_infer(typed)).expect("typed contents").into_inner();
    assert_close(&grpc_outputs(&response), &mlp.outputs, "typed contents");

    // Health and metadata, beside their REST twins.
    assert!(rt.block_on(grpc.server_live(pb::ServerLiveRequest {})).expect("live").into_inner().live);
    assert!(rt.block_on(grpc.server_ready(pb::ServerReadyRequest {})).expect("ready").into_inner().ready);
    let server = rt.block_on(grpc.server_metadata(pb::ServerMetadataRequest {})).expect("server").into_inner();
    assert_eq!(server.name, get(&agent, &format!("{}/v2", edge.url)).json()["name"]);
    let ready = rt.block_on(grpc.model_ready(pb::ModelReadyRequest { name: "mixed".into(), version: String::new() }));
    assert!(ready.expect("model ready").into_inner().ready);
    let unknown = rt.block_on(grpc.model_ready(pb::ModelReadyRequest { name: "nope".into(), version: String::new() }));
    assert_eq!(unknown.expect_err("unknown model").code(), Code::NotFound);
    let meta =
        rt.block_on(grpc.model_metadata(pb::ModelMetadataRequest { name: "mixed".into(), version: String::new() }));
    let meta = meta.expect("metadata").into_inner();
    let rest_meta = get(&agent, &format!("{}/v2/models/mixed", edge.url)).json();
    assert_eq!(
        (meta.platform.as_str(), meta.versions.clone()),
        (rest_meta["platform"].as_str().expect("platform"), vec!["1".to_string()])
    );
    let as_json = |t: &[pb::model_metadata_response::TensorMetadata]| {
        t.iter().map(|t| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape })).collect::<Vec<_>>()
    };
    assert_eq!(json!(as_json(&meta.inputs)), rest_meta["inputs"]);
    assert_eq!(json!(as_json(&meta.outputs)), rest_meta["outputs"]);
    let config =
        rt.block_on(grpc.model_config(pb::ModelConfigRequest { name: "digits".into(), version: String::new() }));
    let config = config.expect("config").into_inner().config.expect("a config");
    let rest_config = get(&agent, &format!("{}/v2/models/digits/config", edge.url)).json();
    assert_eq!(i64::from(config.max_batch_size), rest_config["max_batch_size"].as_i64().expect("max batch"));
    assert_eq!(config.input[0].dims, vec![64]);
    assert_eq!(config.input[0].data_type, pb::DataType::TypeFp32 as i32);
    let index = rt.block_on(grpc.repository_index(pb::RepositoryIndexRequest { ready: true, ..Default::default() }));
    let names: Vec<String> = index
        .expect("index")
        .into_inner()
        .models
        .into_iter()
        .map(|m| format!("{}/{}/{}", m.name, m.version, m.state))
        .collect();
    assert_eq!(names, ["digits/1/READY", "mixed/1/READY", "mlp/1/READY"]);

    // The stream: 200 requests, each answered once, the bad ones with their error.
    let requests: Vec<pb::ModelInferRequest> = (0..200)
        .map(|i| {
            let label: &'static str = format!("s{i}").leak();
            let inputs =
                if i % 10 == 9 { vec![NamedTensor::new("input", fp32(vec![1, 3], 0.0))] } else { mlp.inputs.clone() };
            grpc_request(&Case { label, model: "mlp", version: None, inputs, outputs: vec![], timeout_us: None })
        })
        .collect();
    let answers = rt.block_on(async {
        let mut stream = grpc.model_stream_infer(tokio_stream::iter(requests)).await.expect("stream").into_inner();
        let mut answers = Vec::new();
        while let Some(answer) = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("an answer within 30 s")
            .expect("no stream error")
        {
            answers.push(answer);
        }
        answers
    });
    assert_eq!(answers.len(), 200, "every request answered");
    let ids: HashSet<String> =
        answers.iter().map(|a| a.infer_response.as_ref().expect("response").id.clone()).collect();
    assert_eq!(ids.len(), 200, "each request answered once");
    for a in &answers {
        let response = a.infer_response.as_ref().expect("response");
        let n: usize = response.id[1..].parse().expect("id");
        if n % 10 == 9 {
            assert!(a.error_message.contains("dimension 1 must be 784"), "{}: {}", response.id, a.error_message);
        } else {
            assert_eq!(a.error_message, "", "{}", response.id);
            assert_close(&grpc_outputs(response), &mlp.outputs, &response.id);
        }
    }

    // Statistics count what was served: 1 typed + 180 streamed successes, 20 failures.
    let stats =
        rt.block_on(grpc.model_statistics(pb::ModelStatisticsRequest { name: "mlp".into(), version: String::new() }));
    let stats = stats.expect("statistics").into_inner().model_stats;
    assert_eq!(stats.len(), 1);
    let inference = stats[0].inference_stats.as_ref().expect("inference stats");
    assert_eq!(inference.success.as_ref().map(|d| d.count), Some(181));
    assert_eq!(inference.fail.as_ref().map(|d| d.count), Some(20));
    assert!(inference.success.as_ref().is_some_and(|d| d.ns > 0));
    assert!(stats[0].execution_count >= 1);

    // A message over grpc.max_message_bytes (1 MiB here) is refused unread; the server goes on.
    let big = grpc_request(&Case {
        label: "big",
        model: "mlp",
        version: None,
        inputs: vec![NamedTensor::new("input", fp32(vec![400, 784], 0.5))],
        outputs: vec![],
        timeout_us: None,
    });
    let refused = rt.block_on(grpc.model_infer(big)).expect_err("over the limit");
    assert_eq!(refused.code(), Code::OutOfRange, "{}", refused.message());
    assert!(refused.message().contains("the limit is: 1048576 bytes"), "{}", refused.message());
    assert!(rt.block_on(grpc.server_ready(pb::ServerReadyRequest {})).expect("still ready").into_inner().ready);
}

/// A request carrying the admin token, as repository calls must.
fn with_token<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {}", support::ADMIN_TOKEN).parse().expect("metadata value");
    request.metadata_mut().insert("authorization", value);
    request
}

#[test]
fn repository_rpcs_load_and_unload_with_model_control() {
    let edge = start(&["--model-control", "explicit"]);
    let rt = runtime();
    let mut grpc = rt.block_on(connect(&edge));
    let unload = pb::RepositoryModelUnloadRequest { model_name: "mixed".into(), ..Default::default() };
    // Without the admin token, or with a wrong one: refused, and nothing changes.
    let status = rt.block_on(grpc.repository_model_unload(unload.clone())).expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    let mut wrong = tonic::Request::new(unload.clone());
    wrong.metadata_mut().insert("authorization", "Bearer not-the-token-0123456789".parse().expect("value"));
    assert_eq!(
        rt.block_on(grpc.repository_model_unload(wrong)).expect_err("wrong token").code(),
        Code::Unauthenticated
    );
    let rest = post(&client(), &format!("{}/v2/repository/models/mixed/unload", edge.url), b"{}", None);
    assert_eq!(rest.status, 401, "{}", rest.error());
    assert_eq!(status.message(), rest.error(), "the same words on both faces");
    assert!(rt
        .block_on(grpc.model_ready(pb::ModelReadyRequest { name: "mixed".into(), version: String::new() }))
        .is_ok());
    rt.block_on(grpc.repository_model_unload(with_token(unload))).expect("unload");
    let gone = rt.block_on(grpc.model_ready(pb::ModelReadyRequest { name: "mixed".into(), version: String::new() }));
    assert_eq!(gone.expect_err("unloaded").code(), Code::NotFound);
    let bytes = std::fs::read(reference::model_path("mixed")).expect("model file");
    let mut parameters = HashMap::new();
    parameters.insert(
        "file:3/model.onnx".to_string(),
        pb::ModelRepositoryParameter {
            parameter_choice: Some(pb::model_repository_parameter::ParameterChoice::BytesParam(bytes.into())),
        },
    );
    let load = pb::RepositoryModelLoadRequest { model_name: "mixed".into(), parameters, ..Default::default() };
    rt.block_on(grpc.repository_model_load(with_token(load))).expect("load from bytes");
    let ready = rt.block_on(grpc.model_ready(pb::ModelReadyRequest { name: "mixed".into(), version: "3".into() }));
    assert!(ready.expect("loaded version").into_inner().ready);
    let bad = pb::RepositoryModelLoadRequest { model_name: "nope".into(), ..Default::default() };
    let status = rt.block_on(grpc.repository_model_load(with_token(bad))).expect_err("not in the repository");
    assert_eq!(status.code(), Code::NotFound, "{}", status.message());
    // REST sees what gRPC did.
    let index = get(&client(), &format!("{}/v2/models/mixed/versions/3/ready", edge.url));
    assert_eq!(index.status, 200);
}
