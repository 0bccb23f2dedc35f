//! Warm-up: a fresh engine runs a batch of each size before it serves, so that "ready" means ready
//! and the pool knows how long each batch size takes. Bounded by a memory budget: an edge device may
//! have 1 GB in all.

use std::time::{Duration, Instant};

use fabric_engine::model::ModelMetadata;
use fabric_engine::Engine;
use fabric_policy::engine_choice::SizeTiming;
use fabric_types::tensor::{Tensor, TensorError};

/// What a fresh replica runs before it serves: a batch of each size, to time them.
pub(super) struct Warmup {
    pub(super) metadata: std::sync::Arc<ModelMetadata>,
    pub(super) sizes: Vec<usize>,
}

/// The batch sizes to warm up: the GPU engine's buckets (powers of two up to `cap`, and `cap`), so a
/// GPU session is built for each before it reports ready, skipping those whose inputs would take
/// more than `budget` bytes (1 row always runs). An edge device may have 1 GB in all: a
/// model with a 4 MB input must not allocate 32 rows of it just to be timed.
pub fn warmup_sizes(cap: usize, bytes_per_row: usize, budget: usize) -> Vec<usize> {
    let mut sizes = fabric_policy::gpu::buckets(cap);
    sizes.retain(|&n| n == 1 || n.saturating_mul(bytes_per_row) <= budget);
    sizes
}

/// The warm-up batch sizes of a model served with batches of up to `max_batch_size` rows (one row
/// for a model that cannot batch), within `budget` input bytes.
pub fn warmup_sizes_for(metadata: &ModelMetadata, max_batch_size: usize, budget: usize) -> Vec<usize> {
    let cap = if metadata.is_batched() { max_batch_size.max(1) } else { 1 };
    warmup_sizes(cap, bytes_per_row(metadata), budget)
}

/// Timed runs of each size per engine in [`race`], at least (after one untimed run each) ...
const RACE_MIN_ROUNDS: usize = 3;
/// ... and at most, while a size's rounds have taken less than [`RACE_BUDGET`] in all: small models
/// run in microseconds, where one preemption can double a time, so they get more runs to take the
/// fastest of.
const RACE_MAX_ROUNDS: usize = 25;
/// Time one size may take in all before no further rounds start.
const RACE_BUDGET: Duration = Duration::from_millis(25);
/// A size whose run takes longer than this is timed once per engine.
const RACE_SLOW_RUN: Duration = Duration::from_millis(50);

/// Runs every warm-up size on both engines, interleaved (so a burst of other work on the machine
/// hits both), and keeps each engine's fastest run per size. A size either engine fails is skipped.
pub fn race(tract: &mut dyn Engine, ort: &mut dyn Engine, sizes: &[usize]) -> Vec<SizeTiming> {
    let metadata = tract.metadata().clone();
    let mut timings = Vec::new();
    'sizes: for &rows in sizes {
        let Ok(inputs) = warmup_inputs(&metadata, rows) else { continue };
        let refs: Vec<&Tensor> = inputs.iter().collect();
        // One untimed run each: the first pays one-off allocations.
        if tract.run_ordered(&refs).is_err() || ort.run_ordered(&refs).is_err() {
            continue;
        }
        let (mut best_tract, mut best_ort) = (Duration::MAX, Duration::MAX);
        let started = Instant::now();
        for round in 1..=RACE_MAX_ROUNDS {
            let (Some(t), Some(o)) = (timed_run(tract, &refs), timed_run(ort, &refs)) else { continue 'sizes };
            (best_tract, best_ort) = (best_tract.min(t), best_ort.min(o));
            if best_tract.max(best_ort) > RACE_SLOW_RUN || (round >= RACE_MIN_ROUNDS && started.elapsed() > RACE_BUDGET)
            {
                break;
            }
        }
        timings.push(SizeTiming { rows, tract: best_tract, ort: best_ort });
    }
    timings
}

/// One run's time, `None` if it failed.
fn timed_run(engine: &mut dyn Engine, inputs: &[&Tensor]) -> Option<Duration> {
    let start = Instant::now();
    engine.run_ordered(inputs).ok().map(|_| start.elapsed())
}

/// Input bytes of one row (dynamic dimensions other than the batch counted as 1).
pub(super) fn bytes_per_row(metadata: &ModelMetadata) -> usize {
    metadata
        .inputs
        .iter()
        .map(|spec| {
            let inner: usize = spec.inner_dims().iter().map(|&d| usize::try_from(d).unwrap_or(1)).product();
            let outer = if spec.has_dynamic_leading() {
                1
            } else {
                spec.shape.first().map_or(1, |&d| usize::try_from(d).unwrap_or(1))
            };
            outer.saturating_mul(inner).saturating_mul(spec.datatype.size().unwrap_or(1))
        })
        .sum()
}

/// Zero-filled inputs of batch size `rows` (dynamic dims other than the batch set to 1), for warm-up.
pub(super) fn warmup_inputs(metadata: &ModelMetadata, rows: usize) -> Result<Vec<Tensor>, TensorError> {
    metadata
        .inputs
        .iter()
        .map(|spec| {
            let shape = spec.shape_with_rows(rows);
            let bytes = shape.iter().product::<usize>() * spec.datatype.size().unwrap_or(1);
            Tensor::from_bytes(spec.datatype, shape, vec![0; bytes])
        })
        .collect()
}

/// Runs the warm-up batches on a fresh engine; returns it with the measured (rows, time) pairs.
pub(super) fn warm(mut engine: Box<dyn Engine>, warmup: &Warmup) -> (Box<dyn Engine>, Vec<(usize, Duration)>) {
    let mut timings = Vec::new();
    for &rows in &warmup.sizes {
        let Ok(inputs) = warmup_inputs(&warmup.metadata, rows) else { continue };
        let refs: Vec<&Tensor> = inputs.iter().collect();
        // The first run pays one-off allocation costs; time the second.
        if engine.run_ordered(&refs).is_err() {
            continue;
        }
        let start = Instant::now();
        if engine.run_ordered(&refs).is_ok() {
            timings.push((rows, start.elapsed()));
        }
    }
    (engine, timings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_sizes_table() {
        const MIB: usize = 1 << 20;
        #[rustfmt::skip]
        let cases: Vec<(&str, usize, usize, usize, Vec<usize>)> = vec![
            ("small rows: all powers of two and the cap", 32, 3136, 64 * MIB, vec![1, 2, 4, 8, 16, 32]),
            ("a cap that is no power of two", 12, 100, 64 * MIB, vec![1, 2, 4, 8, 12]),
            ("4 MiB rows: within 64 MiB only", 32, 4 * MIB, 64 * MIB, vec![1, 2, 4, 8, 16]),
            ("rows over the budget: 1 row still runs", 32, 128 * MIB, 64 * MIB, vec![1]),
            ("unbatched", 1, 3136, 64 * MIB, vec![1]),
        ];
        for (label, cap, row, budget, want) in cases {
            assert_eq!(warmup_sizes(cap, row, budget), want, "{label}");
        }
    }
}
