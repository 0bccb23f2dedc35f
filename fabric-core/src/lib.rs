//! `fabric-core`: what two or more parts of the inference fabric share.
//!
//! - [`dtype`], [`tensor`]: element types and dense tensors as little-endian bytes;
//! - [`model`]: the inputs and outputs a model file declares, and request validation against them;
//! - [`engine`]: the `Engine` trait with the tract and ONNX Runtime engines;
//! - [`reference`]: reader for the reference cases the model script writes (tests and benchmarks).

pub mod dtype;
pub mod engine;
pub mod model;
pub mod reference;
pub mod tensor;

pub use dtype::DataType;
pub use engine::{Engine, EngineError, EngineKind, EngineOptions};
pub use model::{ModelMetadata, TensorSpec};
pub use tensor::{NamedTensor, Tensor};
pub mod config;
pub mod http;
pub mod io_thread;
pub mod kserve;
pub mod metrics;
pub mod models;
pub mod policy;
pub mod pool;
pub mod repository;
pub mod tls;
pub mod wire;
