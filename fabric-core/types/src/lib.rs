//! `fabric-types`: the values every layer of the fabric passes around, with no behaviour beyond
//! their own invariants: element types ([`dtype`]), dense tensors as little-endian bytes
//! ([`tensor`]) and which engine runs a model ([`engine_kind`]).

pub mod dtype;
pub mod engine_kind;
pub mod tensor;

pub use dtype::DataType;
pub use engine_kind::EngineKind;
pub use tensor::{NamedTensor, Tensor};
