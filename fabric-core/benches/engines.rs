//! Raw engine benchmark: tract vs ONNX Runtime on the CPU, batch 1 and 32, MLP and CNN.
//!
//! `cargo bench -p fabric-core --bench engines` (needs `bash scripts/setup.sh` first). Each row runs
//! one engine on one thread for a fixed time after a warm-up and prints throughput and latency;
//! the header names the machine so the table can be quoted with its context.

use std::time::{Duration, Instant};

use fabric_core::engine::{self, OrtOptions};
use fabric_core::{reference, EngineKind, EngineOptions, NamedTensor, Tensor};

const RUN_FOR: Duration = Duration::from_secs(3);

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{cpu}, {cores} cores")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let ort_library = std::env::var_os("ORT_DYLIB_PATH").map(Into::into).or_else(|| {
        std::fs::read_to_string(reference::build_dir().join("ort-dylib-path")).ok().map(|s| s.trim().into())
    });
    let options = EngineOptions {
        max_batch_size: 64,
        ort: OrtOptions { library: ort_library, intra_threads: 1, ..OrtOptions::default() },
    };
    println!("raw engine benchmark, one thread per engine, {}s per row", RUN_FOR.as_secs());
    println!("machine: {}", machine());
    println!();
    println!("| model | batch | engine | infer/s | batches/s | p50 ms | p99 ms |");
    println!("|---|---:|---|---:|---:|---:|---:|");
    for (model, row_shape) in [("mlp", vec![784]), ("cnn", vec![3, 64, 64])] {
        for batch in [1usize, 32] {
            let mut shape = vec![batch];
            shape.extend(&row_shape);
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| (i % 97) as f32 / 97.0).collect();
            let inputs = vec![NamedTensor::new("input", Tensor::from_vec(shape, data).expect("tensor"))];
            for kind in [EngineKind::Tract, EngineKind::Ort] {
                let mut engine = match engine::load(kind, &reference::model_path(model), &options) {
                    Ok(e) => e,
                    Err(e) => {
                        eprintln!("{kind} {model}: {e}");
                        std::process::exit(1);
                    }
                };
                for _ in 0..5 {
                    engine.infer(&inputs).expect("warm-up");
                }
                let mut latencies = Vec::new();
                let start = Instant::now();
                while start.elapsed() < RUN_FOR {
                    let t = Instant::now();
                    engine.infer(&inputs).expect("infer");
                    latencies.push(t.elapsed());
                }
                let elapsed = start.elapsed().as_secs_f64();
                latencies.sort();
                let batches = latencies.len() as f64 / elapsed;
                println!(
                    "| {model} | {batch} | {kind} | {:.0} | {:.0} | {:.3} | {:.3} |",
                    batches * batch as f64,
                    batches,
                    percentile(&latencies, 0.5).as_secs_f64() * 1e3,
                    percentile(&latencies, 0.99).as_secs_f64() * 1e3,
                );
            }
        }
    }
}
