//! `fabric-policy`: pure policies: decisions as plain functions of plain inputs, no I/O, no clocks of their own.
//! Callers pass `now`; tests drive them with tables of cases.

pub mod admission;
pub mod autoscale;
pub mod backoff;
pub mod batching;
pub mod cache;
pub mod cadence;
pub mod cascade;
pub mod drift;
pub mod engine_choice;
pub mod gpu;
pub mod hash;
pub mod histogram;
pub mod hub;
pub mod quota;
pub mod reconnect;
pub mod service_time;
pub mod traffic;
pub mod uplink;
