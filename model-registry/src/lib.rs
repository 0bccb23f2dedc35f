//! `model-registry`: the control plane of the inference fabric. It stores model versions (immutable,
//! by SHA-256 digest), deploys models to groups of nodes, rolls them out (pin, canary, shadow, promote,
//! roll back, automatic rollback), and answers every node's heartbeat with the state it should
//! converge to. Reached over QUIC with mutual TLS; the `fabric` CLI drives it.
//!
//! - [`state`]: the durable state (models, deployments, rollouts; autoscaling records beside it);
//! - [`store`]: where it is kept, per key (the `Store` trait; redb by default), and the model files;
//! - [`fleet`]: the nodes' last heartbeats, their wake-ups, the hub list, liveness and retention;
//! - [`rollout`]: pure policy: rollout transitions, each node's desired state, canary analysis;
//! - [`waves`]: pure policy: rollouts in waves (which nodes each wave moves, when waves advance);
//! - [`service`]: the QUIC service carrying requests out;
//! - [`replica`]: replicated registries on etcd: leader election, fenced writes, followers;
//! - [`status_page`]: the read-only status page (HTTP).

pub mod fleet;
pub mod replica;
pub mod rollout;
pub mod service;
pub mod state;
pub mod status_page;
pub mod store;
pub mod waves;
