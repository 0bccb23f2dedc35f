//! `fabric-core`: what two or more parts of the inference fabric share.
//!
//! Always built (what the `fabric` CLI links):
//! - [`dtype`], [`tensor`]: element types and dense tensors as little-endian bytes;
//! - [`kserve`]: the KServe v2 request and response codec (JSON and binary tensors);
//! - [`wire`]: the QUIC message format between edges and hubs; [`tls`]: mutual TLS and identities;
//!   [`io_thread`]: the runtime thread QUIC runs on;
//! - [`policy`]: pure decisions (batching, admission, service times, hub health);
//! - [`reference`]: reader for the reference cases the model script writes (tests and benchmarks);
//! - [`registry_proto`]: what the CLI, the nodes and the model registry say to each other over QUIC.
//!
//! With the `engines` feature: [`model`] (what a model file declares, request validation) and
//! [`engine`] (the `Engine` trait with the tract and ONNX Runtime engines).
//!
//! With the `serving` feature (the default): [`pool`] (the model actors), [`dispatch`] (where a
//! request is served: here, a hub, or nowhere), [`http`] (the KServe v2 API), [`models`],
//! [`repository`], [`config`], [`metrics`], [`serve`] (what the serving binaries share at start);
//! live control: [`control`] (load, unload, traffic policies, resize, the load report) with its HTTP
//! faces in [`admin`], [`load_report`] (rolling per-version statistics) and [`shadow`] (shadow traffic);
//! [`agent`]: the node's side of the model registry (heartbeats, converging to the desired state);
//! [`scaler`]: pools sized to their load when no registry manages the node.

pub mod dtype;
pub mod io_thread;
pub mod kserve;
pub mod policy;
pub mod reference;
pub mod registry_proto;
pub mod tensor;
pub mod tls;
pub mod wire;

#[cfg(feature = "engines")]
pub mod engine;
#[cfg(feature = "engines")]
pub mod model;

#[cfg(feature = "serving")]
pub mod admin;
#[cfg(feature = "serving")]
pub mod agent;
#[cfg(feature = "serving")]
pub mod config;
#[cfg(feature = "serving")]
pub mod control;
#[cfg(feature = "serving")]
pub mod dispatch;
#[cfg(feature = "serving")]
pub mod http;
#[cfg(feature = "serving")]
pub mod load_report;
#[cfg(feature = "serving")]
pub mod metrics;
#[cfg(feature = "serving")]
pub mod models;
#[cfg(feature = "serving")]
pub mod pool;
#[cfg(feature = "serving")]
pub mod repository;
#[cfg(feature = "serving")]
pub mod scaler;
#[cfg(feature = "serving")]
pub mod serve;
#[cfg(feature = "serving")]
pub mod shadow;

pub use dtype::DataType;
#[cfg(feature = "engines")]
pub use engine::{Engine, EngineChoice, EngineError, EngineKind, EngineOptions};
#[cfg(feature = "engines")]
pub use model::{ModelMetadata, TensorSpec};
pub use tensor::{NamedTensor, Tensor};
