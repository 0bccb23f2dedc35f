//! `fabric-proto`: what the fabric's parts say to each other, as bytes and as types.
//!
//! - [`answers`]: what the registry answers the CLI, typed (and its durable model, deployment
//!   and rollout records);
//! - [`kserve`]: the KServe v2 request and response codec (JSON and binary tensors);
//! - [`kserve_grpc`]: KServe v2 over gRPC (the generated `inference` service) and its conversions;
//! - [`wire`]: the QUIC message format between edges and hubs;
//! - [`tls`]: mutual TLS, identities and the development CA;
//! - [`registry`]: what the CLI, the nodes and the model registry say to each other over QUIC, and
//!   the client that says it;
//! - [`report`]: the load report nodes send with each heartbeat, typed;
//! - [`io_thread`]: the runtime thread QUIC runs on inside an actix process.

pub mod answers;
pub mod io_thread;
pub mod kserve;
pub mod kserve_grpc;
pub mod registry;
pub mod report;
pub mod tls;
pub mod wire;
