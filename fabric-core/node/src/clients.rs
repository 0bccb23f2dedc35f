//! Who calls the node: named client keys (kept as SHA-256 digests, compared in constant time), the
//! models each may call, and each one's quota (a rate and a concurrency limit, from
//! [`fabric_policy::quota`]); and the admin token. Both faces (REST and gRPC) ask here before
//! serving; a refusal is 401 (no or unknown key), 403 (a model the key may not call) or 429 with
//! `Retry-After`, which each face answers in its own form.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;

use crate::config::ClientsConfig;
use crate::metrics::Metrics;
use fabric_policy::quota::{Quota, QuotaLimits, QuotaRefusal};

/// Why a caller is turned away: the HTTP status (each face maps it), a kind for metrics, what to tell
/// the caller, and when to try again.
#[derive(Debug)]
pub struct Refusal {
    /// 401, 403 or 429.
    pub status: StatusCode,
    /// `unauthenticated`, `forbidden`, `rate_limited` or `concurrency_limited`.
    pub kind: &'static str,
    /// The same words on both faces.
    pub message: String,
    /// When to try again (429).
    pub retry_after: Option<Duration>,
}

impl Refusal {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Refusal {
        Refusal { status, kind, message: message.into(), retry_after: None }
    }

    fn retry_after(mut self, after: Duration) -> Refusal {
        self.retry_after = Some(after);
        self
    }
}

/// The token mutating admin and repository calls must present, kept only as its SHA-256 digest.
pub struct AdminToken([u8; 32]);

impl AdminToken {
    /// Keeps the digest of `token`; the token itself is not held after this.
    pub fn new(token: &str) -> Self {
        AdminToken(sha256(token.as_bytes()))
    }

    /// Whether `given` is the token: digests compared in constant time, so neither the token's
    /// length nor a matching prefix shows in how long the answer takes.
    pub fn matches(&self, given: &[u8]) -> bool {
        use subtle::ConstantTimeEq as _;
        bool::from(sha256(given).ct_eq(&self.0))
    }

    /// Whether an `Authorization` header's value is `Bearer <the token>`.
    pub fn matches_bearer(&self, header: Option<&str>) -> bool {
        self.matches(header.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default().as_bytes())
    }
}

/// One client: its name, its key's digest, its models and its quota.
pub struct Client {
    /// As the config names it.
    pub name: String,
    digest: [u8; 32],
    models: Vec<String>,
    quota: Mutex<Quota>,
    priority: Option<u8>,
}

/// The clients a node knows; empty: the API is open.
#[derive(Default)]
pub struct Clients {
    clients: Vec<Arc<Client>>,
    closed: bool,
}

/// A request admitted under a client's quota: its place is given back when this is dropped.
pub struct Admitted {
    client: Option<Arc<Client>>,
}

impl Admitted {
    /// The priority the client's requests have when they name none.
    pub fn priority(&self) -> Option<u8> {
        self.client.as_ref().and_then(|c| c.priority)
    }

    /// Gives `request` the client's priority unless it names its own.
    pub fn apply_priority(&self, request: &mut fabric_proto::kserve::DecodedRequest) {
        if let Some(p) = self.priority() {
            request.parameters.entry("priority").or_insert_with(|| serde_json::Value::from(p));
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(client) = &self.client {
            client.quota.lock().unwrap_or_else(|p| p.into_inner()).finish();
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// What a refusal tells the client (the same words on both faces).
const NEEDS_KEY: &str = "this node needs a client key: send 'Authorization: Bearer <key>' (gRPC: authorization metadata) with a key listed in its [[clients.keys]]";

impl Clients {
    /// The clients of the config; an unusable entry is an error naming it.
    pub fn new(config: &ClientsConfig) -> Result<Clients, String> {
        let now = Instant::now();
        let mut clients = Vec::with_capacity(config.keys.len());
        for (i, key) in config.keys.iter().enumerate() {
            if key.name.trim().is_empty() {
                return Err(format!("clients.keys[{i}] has no name"));
            }
            let digest = parse_digest(&key.sha256).ok_or_else(|| {
                format!(
                    "clients.keys '{}': sha256 must be the key's SHA-256 in hex, 64 characters (printf %s \"$KEY\" | sha256sum)",
                    key.name
                )
            })?;
            if clients.iter().any(|c: &Arc<Client>| c.name == key.name) {
                return Err(format!("clients.keys: the name '{}' is listed twice", key.name));
            }
            let rate = key.rate_per_s.filter(|r| *r > 0.0);
            let limits = QuotaLimits {
                rate_per_s: rate,
                burst: key.burst.or(rate).unwrap_or(1.0),
                max_in_flight: key.max_in_flight,
            };
            clients.push(Arc::new(Client {
                name: key.name.clone(),
                digest,
                models: key.models.clone(),
                quota: Mutex::new(Quota::new(limits, now)),
                priority: key.priority,
            }));
        }
        Ok(Clients { clients, closed: false })
    }

    /// Whether calls need a key.
    pub fn enabled(&self) -> bool {
        self.closed || !self.clients.is_empty()
    }

    /// Clients that accept no key at all (a config that could not be read must not open the API).
    pub fn refusing_all() -> Clients {
        Clients { clients: Vec::new(), closed: true }
    }

    /// The client whose key an `Authorization` value carries (`None` when the API is open). Every
    /// listed digest is compared, in constant time, whichever matches.
    fn identify(&self, authorization: Option<&str>) -> Result<Option<Arc<Client>>, Refusal> {
        if !self.enabled() {
            return Ok(None);
        }
        use subtle::ConstantTimeEq as _;
        let given = sha256(authorization.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default().trim().as_bytes());
        let mut found = None;
        for client in &self.clients {
            if bool::from(client.digest.ct_eq(&given)) {
                found = Some(client.clone());
            }
        }
        found.map(Some).ok_or_else(|| Refusal::new(StatusCode::UNAUTHORIZED, "unauthenticated", NEEDS_KEY))
    }

    /// Checks that the caller has a key and may see `model` (metadata, readiness; `None`: any model,
    /// as the repository index): no quota taken.
    pub fn check(&self, authorization: Option<&str>, model: Option<&str>, metrics: &Metrics) -> Result<(), Refusal> {
        let result = self.identify(authorization).and_then(|client| match (client, model) {
            (Some(c), Some(model)) if !c.models.is_empty() && !c.models.iter().any(|m| m == model) => {
                Err(forbidden(&c, model))
            }
            _ => Ok(()),
        });
        if let Err(e) = &result {
            metrics.client_requests.with_label_values(&["", e.kind]).inc();
        }
        result
    }

    /// Admits an inference on `model` under the caller's quota, or says why not.
    pub fn admit(&self, authorization: Option<&str>, model: &str, metrics: &Metrics) -> Result<Admitted, Refusal> {
        let client = match self.identify(authorization) {
            Ok(None) => return Ok(Admitted { client: None }),
            Ok(Some(c)) => c,
            Err(e) => {
                metrics.client_requests.with_label_values(&["", e.kind]).inc();
                return Err(e);
            }
        };
        let count = |outcome: &str| metrics.client_requests.with_label_values(&[client.name.as_str(), outcome]).inc();
        if !client.models.is_empty() && !client.models.iter().any(|m| m == model) {
            count("forbidden");
            return Err(forbidden(&client, model));
        }
        let started = client.quota.lock().unwrap_or_else(|p| p.into_inner()).try_start(Instant::now());
        match started {
            Ok(()) => {
                count("admitted");
                Ok(Admitted { client: Some(client) })
            }
            Err(QuotaRefusal::Rate { retry_after }) => {
                count("rate_limited");
                let message = format!(
                    "client '{}' is over its rate limit: retry in {} ms",
                    client.name,
                    retry_after.as_millis().max(1)
                );
                Err(Refusal::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message).retry_after(retry_after))
            }
            Err(QuotaRefusal::Concurrency { limit }) => {
                count("concurrency_limited");
                let message = format!(
                    "client '{}' has {limit} requests in flight, its limit: retry when one is answered",
                    client.name
                );
                Err(Refusal::new(StatusCode::TOO_MANY_REQUESTS, "concurrency_limited", message)
                    .retry_after(Duration::from_secs(1)))
            }
        }
    }
}

fn forbidden(client: &Client, model: &str) -> Refusal {
    Refusal::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("client '{}' may not call model '{model}' (its models: {})", client.name, client.models.join(", ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientKeyConfig;

    fn hex(key: &str) -> String {
        sha256(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn keys_models_and_quotas() {
        let metrics = Metrics::new("t");
        let config = ClientsConfig {
            keys: vec![
                ClientKeyConfig { name: "app".into(), sha256: hex("app-key-0123456789"), ..Default::default() },
                ClientKeyConfig {
                    name: "batch".into(),
                    sha256: hex("batch-key-0123456789"),
                    models: vec!["cnn".into()],
                    max_in_flight: Some(1),
                    ..Default::default()
                },
            ],
        };
        let clients = Clients::new(&config).expect("clients");
        let status = |r: Result<Admitted, Refusal>| r.map(|_| 200).unwrap_or_else(|e| e.status.as_u16());
        let cases: &[(Option<&str>, &str, u16)] = &[
            (Some("Bearer app-key-0123456789"), "mlp", 200),
            (Some("Bearer app-key-012345678"), "mlp", 401),
            (Some("app-key-0123456789"), "mlp", 401),
            (None, "mlp", 401),
            (Some("Bearer batch-key-0123456789"), "mlp", 403),
            (Some("Bearer batch-key-0123456789"), "cnn", 200),
        ];
        for (auth, model, want) in cases {
            assert_eq!(status(clients.admit(*auth, model, &metrics)), *want, "{auth:?} {model}");
        }
        let held = clients.admit(Some("Bearer batch-key-0123456789"), "cnn", &metrics).expect("first");
        let second = clients.admit(Some("Bearer batch-key-0123456789"), "cnn", &metrics).err().expect("over the limit");
        assert_eq!((second.status.as_u16(), second.retry_after.is_some()), (429, true));
        drop(held);
        assert!(clients.admit(Some("Bearer batch-key-0123456789"), "cnn", &metrics).is_ok(), "the place came back");
        assert!(Clients::default().admit(None, "mlp", &metrics).is_ok(), "no keys: open");
        let bad = ClientsConfig {
            keys: vec![ClientKeyConfig { name: "x".into(), sha256: "abc".into(), ..Default::default() }],
        };
        assert!(Clients::new(&bad).err().is_some_and(|e| e.contains("64 characters")));
    }
}
