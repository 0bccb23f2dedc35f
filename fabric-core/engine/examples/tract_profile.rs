//! Where tract spends its time on one model: plans built for a symbolic batch against plans built
//! for one batch size, and per-operator timings from tract's own evaluation hook.
//!
//! `cargo run --release -p fabric-engine --example tract_profile -- [MODEL] [BATCH...]` (MODEL a
//! bench model name such as `cnn`, default `cnn`; batches default to 1 and 32).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;

const RUN_FOR: Duration = Duration::from_secs(2);

fn rate(plan: &Arc<TypedSimplePlan>, input: &Tensor) -> TractResult<(f64, f64)> {
    let mut state = TypedSimpleState::new(plan)?;
    for _ in 0..5 {
        state.run(tvec!(input.clone().into_tvalue()))?;
    }
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < RUN_FOR {
        state.run(tvec!(input.clone().into_tvalue()))?;
        runs += 1;
    }
    let per_run = start.elapsed().as_secs_f64() / runs as f64;
    Ok((input.shape()[0] as f64 / per_run, per_run * 1e3))
}

/// Rows per second and ms per run of the fabric's tract engine (what edge-node serves with).
fn engine_rate(path: &std::path::Path, input: &Tensor) -> TractResult<(f64, f64)> {
    use fabric_engine::{self as engine, EngineKind, EngineOptions};
    let mut engine = engine::load(EngineKind::Tract, path, &EngineOptions::default())?;
    let tensor = fabric_types::Tensor::from_bytes(
        fabric_types::DataType::Fp32,
        input.shape().to_vec(),
        input.as_bytes().to_vec(),
    )?;
    for _ in 0..5 {
        engine.run_ordered(&[&tensor])?;
    }
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < RUN_FOR {
        engine.run_ordered(&[&tensor])?;
        runs += 1;
    }
    let per_run = start.elapsed().as_secs_f64() / runs as f64;
    Ok((input.shape()[0] as f64 / per_run, per_run * 1e3))
}

/// Rows per second with `threads` callers each running its own state of `plan` at once.
fn concurrent_rate(plan: &Arc<TypedSimplePlan>, input: &Tensor, threads: usize) -> TractResult<f64> {
    let rows = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> TractResult<u64> {
                    let mut state = TypedSimpleState::new(plan)?;
                    let start = Instant::now();
                    let mut runs = 0u64;
                    while start.elapsed() < RUN_FOR {
                        state.run(tvec!(input.clone().into_tvalue()))?;
                        runs += 1;
                    }
                    Ok(runs)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().map_err(|_| anyhow::anyhow!("worker panicked"))?).sum::<TractResult<u64>>()
    })?;
    Ok(rows as f64 * input.shape()[0] as f64 / RUN_FOR.as_secs_f64())
}

fn per_op(plan: &Arc<TypedSimplePlan>, input: &Tensor, runs: usize) -> TractResult<Vec<(String, f64)>> {
    let mut state = TypedSimpleState::new(plan)?;
    let mut spent: HashMap<usize, Duration> = HashMap::new();
    for _ in 0..runs {
        state.run_plan_with_eval(tvec!(input.clone().into_tvalue()), |session, op_state, node, inputs| {
            let t = Instant::now();
            let out = tract_onnx::tract_core::plan::eval(session, op_state, node, inputs);
            *spent.entry(node.id).or_default() += t.elapsed();
            out
        })?;
    }
    let model = plan.model();
    let mut rows: Vec<(String, f64)> = spent
        .into_iter()
        .map(|(id, d)| {
            let node = &model.nodes[id];
            (format!("{} ({})", node.name, node.op.name()), d.as_secs_f64() * 1e3 / runs as f64)
        })
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(rows)
}

fn main() -> TractResult<()> {
    let mut args = std::env::args().skip(1);
    let model_name = args.next().unwrap_or_else(|| "cnn".into());
    let mut batches: Vec<usize> = args.filter_map(|a| a.parse().ok()).collect();
    if batches.is_empty() {
        batches = vec![1, 32];
    }
    let path = fabric_testkit::reference::model_path(&model_name);
    let typed = tract_onnx::onnx().model_for_path(&path)?.into_typed()?.into_decluttered()?;
    let input_fact = typed.input_fact(0)?.clone();
    let batch_symbol = input_fact.shape[0].symbols().into_iter().next();
    let symbolic = typed.clone().into_optimized()?.into_runnable()?;
    println!("model {model_name}: input {input_fact:?}");
    println!("| batch | plan | rows/s | ms per run |");
    println!("|---:|---|---:|---:|");
    for &batch in &batches {
        let mut shape: Vec<usize> = vec![batch];
        shape.extend(input_fact.shape.iter().skip(1).map(|d| d.as_i64().unwrap_or(1) as usize));
        let n: usize = shape.iter().product();
        let input = Tensor::from_shape(&shape, &(0..n).map(|i| (i % 97) as f32 / 97.0).collect::<Vec<_>>())?;
        let (r, ms) = rate(&symbolic, &input)?;
        println!("| {batch} | symbolic (raw tract) | {r:.0} | {ms:.3} |");
        let (r, ms) = engine_rate(&path, &input)?;
        println!("| {batch} | fabric's tract engine | {r:.0} | {ms:.3} |");
        let Some(sym) = &batch_symbol else { continue };
        let fixed = typed
            .set_symbols(&HashMap::from([(sym.clone(), TDim::Val(batch as i64))]))?
            .into_optimized()?
            .into_runnable()?;
        let (r, ms) = rate(&fixed, &input)?;
        println!("| {batch} | concrete | {r:.0} | {ms:.3} |");
        println!("| {batch} | symbolic, 2 callers | {:.0} | |", concurrent_rate(&symbolic, &input, 2)?);
        if std::env::var_os("NO_OPS").is_some() {
            continue;
        }
        let ours = fabric_engine::tract::TractEngine::load(&path, &Default::default())?.plan();
        for (label, plan) in [("symbolic (raw tract)", &symbolic), ("concrete", &fixed), ("fabric's engine", &ours)] {
            println!("\nper operator, batch {batch}, {label} plan (ms per run):");
            for (op, ms) in per_op(plan, &input, 200)?.into_iter().take(12) {
                println!("  {ms:8.3}  {op}");
            }
        }
        println!();
    }
    Ok(())
}
