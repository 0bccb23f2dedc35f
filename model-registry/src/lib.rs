//! `model-registry`: the control plane of the inference fabric. It stores model versions (immutable,
//! by SHA-256 digest), deploys models to groups of nodes, rolls them out (pin, canary, shadow, promote,
//! roll back, automatic rollback), and answers every node's heartbeat with the state it should
//! converge to. Reached over QUIC with mutual TLS; the `fabric` CLI drives it.
//!
//! - [`state`]: the durable state (one value, written whole per transition);
//! - [`store`]: where it is kept (the `Store` trait; redb by default) and the model files;
//! - [`rollout`]: pure policy: rollout transitions, each node's desired state, canary analysis;
//! - [`service`]: the QUIC service carrying requests out;
//! - [`status_page`]: the read-only status page (HTTP).

pub mod rollout;
pub mod service;
pub mod state;
pub mod status_page;
pub mod store;
