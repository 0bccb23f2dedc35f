//! `fabric-testkit`: what the fabric's tests and benchmarks share, so each crate's tests say only
//! what they test:
//! - [`process`]: binaries of the current build profile started on 127.0.0.1, ready lines awaited
//!   within a bound, killed on drop;
//! - [`wait`]: bounded waits; [`http`]: a client and the KServe v2 requests tests send;
//! - [`load`]: closed- and open-loop load that keeps every answer;
//! - [`reference`]: the reference cases and models the model script writes; [`ort`]: the ONNX
//!   Runtime library to load; [`tools`]: external tools, skipped with a reason where absent;
//! - [`etcd`]: a real etcd cluster on loopback, members killed and restarted;
//! - [`link`]: an emulated WAN link (delay, jitter, loss, rate, reordering, cuts) as a UDP relay.

pub mod etcd;
pub mod http;
pub mod link;
pub mod load;
pub mod ort;
pub mod process;
pub mod reference;
pub mod tools;
pub mod wait;

use std::path::PathBuf;

/// The workspace's root folder (where `build/`, `.venv/` and `target/` are).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}
