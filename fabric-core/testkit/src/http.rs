//! An HTTP client for tests (ureq: a client nobody here wrote) and the KServe v2 requests they send.

use std::time::Duration;

use serde_json::{json, Value};

/// An HTTP client that returns error statuses as responses and never waits unbounded (30 s).
pub fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent()
}

/// A response's status and body.
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The whole body.
    pub body: Vec<u8>,
    /// `Inference-Header-Content-Length`, for binary responses.
    pub header_length: Option<usize>,
}

impl Reply {
    /// The body as JSON (the JSON part, for binary responses); panics if it is not JSON.
    pub fn json(&self) -> Value {
        let end = self.header_length.unwrap_or(self.body.len());
        serde_json::from_slice(&self.body[..end])
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `error` message of an error body.
    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_string()
    }
}

fn reply(resp: ureq::http::Response<ureq::Body>) -> Reply {
    let status = resp.status().as_u16();
    let header_length = resp
        .headers()
        .get("inference-header-content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = resp.into_body().with_config().limit(256 << 20).read_to_vec().expect("body");
    Reply { status, body, header_length }
}

/// GETs a URL.
pub fn get(agent: &ureq::Agent, url: &str) -> Reply {
    reply(agent.get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}")))
}

/// POSTs a body, with an `Inference-Header-Content-Length` (a binary request) when given; panics
/// when no HTTP answer comes.
pub fn post(agent: &ureq::Agent, url: &str, body: &[u8], header_length: Option<usize>) -> Reply {
    try_post(agent, url, body, header_length).unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// [`post`], with a failure to get any HTTP answer as an error.
pub fn try_post(agent: &ureq::Agent, url: &str, body: &[u8], header_length: Option<usize>) -> Result<Reply, String> {
    let mut req = agent
        .post(url)
        .header("content-type", if header_length.is_some() { "application/octet-stream" } else { "application/json" });
    if let Some(n) = header_length {
        req = req.header("inference-header-content-length", &n.to_string());
    }
    req.send(body).map(reply).map_err(|e| e.to_string())
}

/// Sends a JSON body with `method`, with `Authorization: Bearer <token>` when a token is given.
pub fn send_json(agent: &ureq::Agent, method: &str, url: &str, body: &Value, token: Option<&str>) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}")).unwrap_or_default();
    let request = ureq::http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .header("authorization", auth.as_str())
        .body(body.to_string())
        .expect("request");
    reply(agent.run(request).unwrap_or_else(|e| panic!("{method} {url}: {e}")))
}

/// A one-row JSON request for the MLP (`mlp`, 784 inputs) or a CNN (a name starting `cnn`, 3x64x64).
pub fn body_for(model: &str) -> String {
    let shape: Vec<usize> = if model.starts_with("cnn") { vec![1, 3, 64, 64] } else { vec![1, 784] };
    let n: usize = shape.iter().product();
    json!({ "inputs": [{ "name": "input", "shape": shape, "datatype": "FP32", "data": vec![0.25f32; n] }] }).to_string()
}

/// [`body_for`] with a `timeout` parameter (microseconds).
pub fn body_with_timeout(model: &str, timeout_us: u64) -> String {
    let mut body: Value = serde_json::from_str(&body_for(model)).expect("json");
    body["parameters"] = json!({ "timeout": timeout_us });
    body.to_string()
}

/// A binary-extension request for one FP32 input named `input` of `shape`, element `i` being
/// `(i % modulus) / modulus`, and its JSON header's length; with `json_output`, that output is asked
/// for as JSON (cheap for a client that only reads who served it).
pub fn binary_body(shape: &[usize], modulus: usize, json_output: Option<&str>) -> (Vec<u8>, usize) {
    let n: usize = shape.iter().product();
    let data: Vec<u8> = (0..n).flat_map(|i| ((i % modulus) as f32 / modulus as f32).to_le_bytes()).collect();
    let mut head = json!({ "inputs": [{ "name": "input", "shape": shape, "datatype": "FP32",
                                        "parameters": { "binary_data_size": data.len() } }] });
    if let Some(output) = json_output {
        head["outputs"] = json!([{ "name": output, "parameters": { "binary_data": false } }]);
    }
    let mut body = serde_json::to_vec(&head).expect("json");
    let header_length = body.len();
    body.extend_from_slice(&data);
    (body, header_length)
}

/// What one infer request got.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The HTTP status (0: no answer at all).
    pub status: u16,
    /// The version that answered, or the error text.
    pub version: String,
    /// Who served it (`edge-node`, `cloud-hub`, or `hub <id>` for an edge that offloaded it).
    pub served_by: String,
}

/// One JSON request to `model` at `base`.
pub fn infer(agent: &ureq::Agent, base: &str, model: &str, body: &str) -> Answer {
    let url = format!("{base}/v2/models/{model}/infer");
    match agent.post(&url).header("content-type", "application/json").send(body) {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let text = r.body_mut().read_to_string().unwrap_or_default();
            let v: Value = serde_json::from_str(&text).unwrap_or_default();
            Answer {
                status,
                version: v["model_version"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| text.chars().take(300).collect()),
                served_by: v["parameters"]["served_by"].as_str().unwrap_or_default().to_string(),
            }
        }
        Err(e) => Answer { status: 0, version: e.to_string(), served_by: String::new() },
    }
}
