//! The node's HTTP faces, a thin layer over dispatch and live control:
//! - [`state`]: what the handlers share (state, errors, statuses, bodies);
//! - [`infer`]: one infer request served, whichever face (REST here, or gRPC) it came by;
//! - [`tls`]: TLS on the listeners, and the client certificate's identity;
//! - [`kserve_api`]: the KServe v2 API (health, metadata, infer, repository index, metrics);
//! - [`admin`]: the repository load and unload routes, and the admin API (traffic policies, pool
//!   settings, the load report) on its own address;
//! - [`server`]: the app that serves them.

pub mod admin;
pub mod infer;
pub mod kserve_api;
pub mod server;
pub mod state;
pub mod tls;

pub use server::bind;
pub use state::{status_of, ApiError, HttpState};
