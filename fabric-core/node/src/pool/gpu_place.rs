//! A version's place on a GPU, measured when it loads rather than assumed: the GPU memory one
//! replica holds (this process's share before and after the first replica loaded and warmed), a
//! version refused with the reason when it leaves the GPU under its reserve, and how many replicas
//! are worth running (throughput at 1, 2 and 3 streams on the largest warm-up batch, capped by what
//! fits in memory). Autoscaling then stays within that count instead of a constant.

use std::time::{Duration, Instant};

use super::warmup::{warmup_inputs, Warmup};
use super::EngineFactory;
use fabric_engine::{gpu, Engine, EngineError};
use fabric_policy::autoscale::GPU_MAX_REPLICAS;
use fabric_policy::gpu::{fits, replicas_per_gpu, StreamsThroughput};
use fabric_types::tensor::Tensor;

/// What was measured of a version on its GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuPlacement {
    /// GPU memory one replica holds, MiB (0 when `nvidia-smi` could not tell).
    pub memory_mib: u64,
    /// Replicas worth running on this GPU.
    pub replicas_per_gpu: usize,
    /// Throughput at each stream count probed (empty when no probe ran).
    pub streams: Vec<StreamsThroughput>,
}

/// Most streams probed at load (the 1, 2, 3: beyond three, replicas of one model on one
/// GPU have only contended in every measurement so far).
pub const MAX_STREAMS: usize = 3;
/// How long each stream count runs in the probe: long enough for a few dozen GPU batches.
const PROBE_FOR: Duration = Duration::from_millis(300);

/// Measures `first` (loaded and warmed, on a GPU) and places the version: `memory_before` is this
/// process's GPU memory before `first` loaded. Refuses the version when one replica leaves the GPU
/// short of its reserve; probes up to [`MAX_STREAMS`] replicas (extra ones loaded from `factory`
/// and dropped after) when more than one fits.
pub(super) fn place(
    first: &mut Box<dyn Engine>,
    factory: &EngineFactory,
    warmup: &Warmup,
    memory_before: Option<u64>,
) -> Result<GpuPlacement, EngineError> {
    let memory_mib = match (memory_before, gpu::this_process_memory_mib()) {
        (Some(before), Some(after)) => after.saturating_sub(before).max(1),
        _ => 0,
    };
    // How many replicas fit, counting the first one's memory as free again (it is already resident).
    let fit_count = match gpu::memory_now() {
        Some(mem) if memory_mib > 0 => {
            let free = mem.free_mib.saturating_add(memory_mib);
            fits(1, memory_mib, free, mem.total_mib)?;
            (2..=MAX_STREAMS).take_while(|&n| fits(n, memory_mib, free, mem.total_mib).is_ok()).last().unwrap_or(1)
        }
        _ => GPU_MAX_REPLICAS.min(MAX_STREAMS),
    };
    let rows = warmup.sizes.last().copied().unwrap_or(1);
    // Nothing to probe with one replica's room, or with a model that runs one request at a time.
    let inputs = match warmup_inputs(&warmup.metadata, rows) {
        Ok(inputs) if fit_count >= 2 && first.metadata().is_batched() => inputs,
        _ => {
            let replicas_per_gpu = fit_count.min(GPU_MAX_REPLICAS);
            return Ok(GpuPlacement { memory_mib, replicas_per_gpu, streams: Vec::new() });
        }
    };
    let mut extra: Vec<Box<dyn Engine>> = Vec::new();
    for _ in 1..fit_count {
        match factory() {
            Ok(engine) => extra.push(engine),
            Err(e) => {
                tracing::info!(error = %e, "GPU stream probe: a further replica did not load; probing fewer");
                break;
            }
        }
    }
    let mut engines: Vec<&mut Box<dyn Engine>> = std::iter::once(first).chain(extra.iter_mut()).collect();
    let streams = measure_streams(&mut engines, &inputs, rows, PROBE_FOR);
    let chosen = replicas_per_gpu(&streams).min(fit_count);
    tracing::info!(memory_mib, fit_count, chosen, ?streams, "GPU placement measured");
    Ok(GpuPlacement { memory_mib, replicas_per_gpu: chosen, streams })
}

/// Throughput of 1, 2, … `engines.len()` engines running `inputs` (`rows` rows a run) at once, each
/// count for `each`: one thread per engine, each engine run once untimed first. A stream whose run
/// fails stops; its rows so far count.
pub fn measure_streams(
    engines: &mut [&mut Box<dyn Engine>],
    inputs: &[Tensor],
    rows: usize,
    each: Duration,
) -> Vec<StreamsThroughput> {
    let refs: Vec<&Tensor> = inputs.iter().collect();
    for engine in engines.iter_mut() {
        let _ = engine.run_ordered(&refs);
    }
    let mut measured = Vec::new();
    for streams in 1..=engines.len() {
        let started = Instant::now();
        let refs = &refs;
        let served: usize = std::thread::scope(|scope| {
            let runners: Vec<_> = engines[..streams]
                .iter_mut()
                .map(|engine| {
                    scope.spawn(move || {
                        let mut served = 0;
                        while started.elapsed() < each {
                            if engine.run_ordered(refs).is_err() {
                                break;
                            }
                            served += rows;
                        }
                        served
                    })
                })
                .collect();
            runners.into_iter().map(|r| r.join().unwrap_or(0)).sum()
        });
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        measured.push(StreamsThroughput { streams, rows_per_s: served as f64 / seconds });
    }
    measured
}
