//! `fabric-node`: what a serving node (edge-node, cloud-hub) runs, over the lower layers
//! (`fabric-types`, `fabric-policy`, `fabric-proto`, `fabric-engine`).
//!
//! - [`config`]: the node's configuration file and its defaults (a leaf: every other module reads it);
//! - the data path: [`pool`] (the model actors: queue, batching, replicas, supervision, warm-up),
//!   [`dispatch`] (where a request is served: here, a hub, or nowhere), [`models`] (the versions
//!   served and their routes), [`repository`] (model files to running pools), [`shadow`] (copies
//!   of traffic to a shadow version), [`metrics`];
//! - [`clients`]: client keys, the models each may call, and their quotas;
//! - the faces: [`http`] (the KServe v2 REST API and the admin API, and `http::infer`: one request
//!   served whichever face it came by) and [`grpc`] (KServe v2 over gRPC), thin layers over dispatch
//!   and control;
//! - live control: [`control`] (load, unload, traffic policies, resize, the load report) and
//!   [`load_report`] (rolling per-version statistics);
//! - [`agent`]: the node's side of the model registry (heartbeats, converging to the desired state);
//!   [`scaler`]: pools sized to their load when no registry manages the node;
//! - [`boot`]: what a node does at start, in one place for both binaries.

pub mod agent;
pub mod boot;
pub mod clients;
pub mod config;
pub mod control;
pub mod dispatch;
pub mod grpc;
pub mod http;
pub mod load_report;
pub mod metrics;
pub mod models;
pub mod pool;
pub mod quality;
pub mod repository;
pub mod scaler;
pub mod shadow;
