//! Shadow traffic: a copy of a share of a model's requests goes to another version, whose answers are
//! compared with the primary's and recorded, never returned to the client.
//!
//! The copy runs on the shadow version's own pool, local only (never offloaded), with the request's
//! deadline; a shadow that is slow or fails costs the client nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fabric_proto::report::ShadowReport;
use tokio::sync::oneshot;

use crate::pool::PoolHandle;
use fabric_types::dtype::DataType;
use fabric_types::tensor::NamedTensor;

/// Absolute and relative tolerance for floating-point outputs to count as agreeing: the same model
/// file may answer a row differently in the last bits depending on the batch it ran in.
const TOLERANCE: f64 = 1e-5;

/// What the shadow copies of one model have shown.
pub struct ShadowStats {
    /// The shadow version.
    pub version: u64,
    compared: AtomicU64,
    agreed: AtomicU64,
    shadow_failed: AtomicU64,
    /// Copies not compared because the primary failed.
    primary_failed: AtomicU64,
}

impl ShadowStats {
    /// Fresh statistics for shadow version `version`.
    pub fn new(version: u64) -> ShadowStats {
        ShadowStats {
            version,
            compared: AtomicU64::new(0),
            agreed: AtomicU64::new(0),
            shadow_failed: AtomicU64::new(0),
            primary_failed: AtomicU64::new(0),
        }
    }

    /// The counts so far.
    pub fn report(&self) -> ShadowReport {
        let compared = self.compared.load(Ordering::Relaxed);
        let agreed = self.agreed.load(Ordering::Relaxed);
        ShadowReport {
            version: self.version,
            compared,
            agreed,
            agreement_pct: (compared > 0).then(|| agreed as f64 * 100.0 / compared as f64),
            shadow_failed: self.shadow_failed.load(Ordering::Relaxed),
            primary_failed: self.primary_failed.load(Ordering::Relaxed),
        }
    }
}

/// Whether two answers agree: the same outputs (names, types, shapes), values equal (floating point
/// within [`TOLERANCE`], absolute or relative).
pub fn outputs_agree(a: &[NamedTensor], b: &[NamedTensor]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name
                && x.tensor.dtype() == y.tensor.dtype()
                && x.tensor.shape() == y.tensor.shape()
                && match x.tensor.dtype() {
                    DataType::Fp32 => close(x.tensor.as_slice::<f32>().ok(), y.tensor.as_slice::<f32>().ok()),
                    DataType::Fp64 => close(x.tensor.as_slice::<f64>().ok(), y.tensor.as_slice::<f64>().ok()),
                    _ => x.tensor.bytes() == y.tensor.bytes(),
                }
        })
}

fn close<T: Copy + Into<f64>>(a: Option<std::borrow::Cow<'_, [T]>>, b: Option<std::borrow::Cow<'_, [T]>>) -> bool {
    let (Some(a), Some(b)) = (a, b) else { return false };
    a.iter().zip(b.iter()).all(|(&x, &y)| {
        let (x, y): (f64, f64) = (x.into(), y.into());
        x == y || (x - y).abs() <= TOLERANCE * (1.0 + y.abs())
    })
}

/// Runs a copy of `inputs` on the shadow version's pool, then compares its outputs with the primary's
/// (`primary` gets them, or is dropped when the primary failed). Spawned: the client never waits for it.
pub fn spawn(
    shadow: PoolHandle,
    stats: Arc<ShadowStats>,
    inputs: Vec<NamedTensor>,
    deadline: Instant,
    primary: oneshot::Receiver<Vec<NamedTensor>>,
) {
    // tokio's spawn, not actix's: the gRPC face serves from a runtime of its own, outside actix.
    tokio::spawn(async move {
        let result = shadow.infer_counted(inputs, Instant::now(), deadline).await;
        let Ok(reply) = result else {
            stats.shadow_failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Ok(primary) = primary.await else {
            stats.primary_failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let outputs = shadow.metadata().name_outputs(reply.outputs);
        stats.compared.fetch_add(1, Ordering::Relaxed);
        if outputs_agree(&primary, &outputs) {
            stats.agreed.fetch_add(1, Ordering::Relaxed);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_types::tensor::Tensor;

    fn t(name: &str, values: Vec<f32>) -> NamedTensor {
        NamedTensor::new(name, Tensor::from_vec(vec![1, values.len()], values).expect("tensor"))
    }

    #[test]
    fn agreement_cases() {
        let i = |v: Vec<i64>| NamedTensor::new("y", Tensor::from_vec(vec![v.len()], v).expect("tensor"));
        let cases: Vec<(Vec<NamedTensor>, Vec<NamedTensor>, bool)> = vec![
            (vec![t("y", vec![1.0, 2.0])], vec![t("y", vec![1.0, 2.0])], true),
            (vec![t("y", vec![1.0, 2.0])], vec![t("y", vec![1.0, 2.0 + 1e-6])], true),
            (vec![t("y", vec![1000.0])], vec![t("y", vec![1000.0 + 1e-3])], true),
            (vec![t("y", vec![1.0, 2.0])], vec![t("y", vec![1.0, 2.1])], false),
            (vec![t("y", vec![1.0, 2.0])], vec![t("z", vec![1.0, 2.0])], false),
            (vec![t("y", vec![1.0, 2.0])], vec![t("y", vec![1.0, 2.0, 3.0])], false),
            (vec![t("y", vec![1.0])], vec![], false),
            (vec![i(vec![1, 2])], vec![i(vec![1, 2])], true),
            (vec![i(vec![1, 2])], vec![i(vec![1, 3])], false),
        ];
        for (a, b, want) in cases {
            assert_eq!(outputs_agree(&a, &b), want, "{a:?} vs {b:?}");
        }
    }
}
