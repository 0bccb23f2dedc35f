//! Raw engine benchmark: tract vs ONNX Runtime on the CPU, batch 1 and 32, MLP, CNN and digits;
//! "tract (raw)" is tract-onnx as it comes (optimised for a symbolic batch), "tract" the fabric's
//! tract engine (with its own max pool), so a change to the engine is measured against tract itself
//! in the same run.
//!
//! `cargo bench -p fabric-engine --bench engines` (needs `bash scripts/setup.sh` first). Each row runs
//! one engine on one thread for a fixed time after a warm-up and prints throughput and latency;
//! the header names the machine so the table can be quoted with its context.

use std::time::{Duration, Instant};

use fabric_engine::{self as engine, EngineKind, EngineOptions, OrtOptions};
use fabric_testkit::reference;
use fabric_types::{NamedTensor, Tensor};

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

/// One inference on `model` as `label` names it: tract-onnx untouched, or one of the fabric's engines.
fn runner(label: &str, model: &str, options: &EngineOptions) -> Box<dyn FnMut(&[NamedTensor])> {
    let path = reference::model_path(model);
    let exit = |e: String| -> ! {
        eprintln!("{label} {model}: {e}");
        std::process::exit(1);
    };
    if label == "tract (raw)" {
        use tract_onnx::prelude::*;
        let plan = tract_onnx::onnx()
            .model_for_path(&path)
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .unwrap_or_else(|e| exit(e.to_string()));
        let mut state = TypedSimpleState::new(&plan).unwrap_or_else(|e| exit(e.to_string()));
        return Box::new(move |inputs: &[NamedTensor]| {
            let t = &inputs[0].tensor;
            let input = unsafe { tract_onnx::prelude::Tensor::from_raw_dt(f32::datum_type(), t.shape(), t.bytes()) }
                .expect("tensor");
            state.run(tvec!(input.into_tvalue())).expect("infer");
        });
    }
    let kind = if label == "tract" { EngineKind::Tract } else { EngineKind::Ort };
    let mut engine = engine::load(kind, &path, options).unwrap_or_else(|e| exit(e.to_string()));
    Box::new(move |inputs: &[NamedTensor]| {
        engine.infer(inputs).expect("infer");
    })
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
    for (model, row_shape) in [("mlp", vec![784]), ("cnn", vec![3, 64, 64]), ("digits", vec![64])] {
        for batch in [1usize, 32] {
            let mut shape = vec![batch];
            shape.extend(&row_shape);
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| (i % 97) as f32 / 97.0).collect();
            let inputs = vec![NamedTensor::new("input", Tensor::from_vec(shape, data).expect("tensor"))];
            for label in ["tract (raw)", "tract", "onnxruntime"] {
                let mut run = runner(label, model, &options);
                for _ in 0..5 {
                    run(&inputs);
                }
                let mut latencies = Vec::new();
                let start = Instant::now();
                while start.elapsed() < RUN_FOR {
                    let t = Instant::now();
                    run(&inputs);
                    latencies.push(t.elapsed());
                }
                let elapsed = start.elapsed().as_secs_f64();
                latencies.sort();
                let batches = latencies.len() as f64 / elapsed;
                println!(
                    "| {model} | {batch} | {label} | {:.0} | {:.0} | {:.3} | {:.3} |",
                    batches * batch as f64,
                    batches,
                    percentile(&latencies, 0.5).as_secs_f64() * 1e3,
                    percentile(&latencies, 0.99).as_secs_f64() * 1e3,
                );
            }
        }
    }
}
