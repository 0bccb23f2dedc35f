//! The model pool with real tract engines: batching, deadlines, queue limits, replica panics and
//! resizing. Fault injection wraps a real engine (a delay, or a panic on a marked input).

use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_core::engine::{self, EngineError};
use fabric_core::metrics::Metrics;
use fabric_core::model::ModelMetadata;
use fabric_core::pool::{EngineFactory, ModelPool, PoolConfig, PoolError, PoolHandle};
use fabric_core::{reference, Engine, EngineKind, EngineOptions, NamedTensor, Tensor};

/// A real engine with an optional delay per batch, that panics when an input starts with NaN.
struct Faulty {
    inner: Box<dyn Engine>,
    delay: Duration,
}

impl Engine for Faulty {
    fn kind(&self) -> EngineKind {
        self.inner.kind()
    }
    fn metadata(&self) -> &ModelMetadata {
        self.inner.metadata()
    }
    fn max_batch_size(&self) -> usize {
        self.inner.max_batch_size()
    }
    fn run_ordered(&mut self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, EngineError> {
        std::thread::sleep(self.delay);
        if inputs[0].as_slice::<f32>().is_ok_and(|v| v.iter().any(|x| x.is_nan())) {
            panic!("injected fault: NaN input");
        }
        self.inner.run_ordered(inputs)
    }
}

fn factory(delay: Duration) -> EngineFactory {
    Arc::new(move || {
        let inner = engine::load(EngineKind::Tract, &reference::model_path("mlp"), &EngineOptions::default())?;
        Ok(Box::new(Faulty { inner, delay }) as Box<dyn Engine>)
    })
}

fn row(seed: f32) -> Vec<NamedTensor> {
    let data: Vec<f32> = (0..784).map(|i| ((i as f32) * 0.37 + seed).sin()).collect();
    vec![NamedTensor::new("input", Tensor::from_vec(vec![1, 784], data).expect("tensor"))]
}

async fn start(config: PoolConfig, delay: Duration) -> PoolHandle {
    ModelPool::start("mlp", "1", factory(delay), config, Metrics::new("test")).await.expect("pool starts")
}

fn soon(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

#[actix_rt::test]
async fn concurrent_requests_are_batched_and_each_gets_its_own_answer() {
    let pool =
        start(PoolConfig { replicas: 1, max_batch_size: 16, ..PoolConfig::default() }, Duration::from_millis(2)).await;
    let mut direct =
        engine::load(EngineKind::Tract, &reference::model_path("mlp"), &EngineOptions::default()).expect("engine");
    let futures: Vec<_> = (0..60)
        .map(|i| {
            let pool = pool.clone();
            async move { (i, pool.infer(row(i as f32), soon(5_000)).await) }
        })
        .collect();
    let mut biggest = 0;
    for (i, result) in futures::future::join_all(futures).await {
        let reply = result.unwrap_or_else(|e| panic!("request {i}: {e}"));
        biggest = biggest.max(reply.batch_rows);
        let want = direct.infer(&row(i as f32)).expect("direct");
        let diff = reference::max_abs_diff(&reply.outputs[0], &want[0].tensor).expect("same shape");
        assert!(diff < 1e-5, "request {i} got another request's answer (diff {diff})");
    }
    assert!(biggest > 1, "no batch larger than 1 formed");
}

#[actix_rt::test]
async fn deadlines_are_enforced_with_precise_errors() {
    let pool = start(PoolConfig { replicas: 1, ..PoolConfig::default() }, Duration::from_millis(30)).await;
    // Already past: refused at the door.
    let err = pool.infer(row(0.0), Instant::now()).await.expect_err("past deadline");
    assert!(matches!(err, PoolError::WouldMissDeadline { .. }), "{err}");
    // Behind a 30 ms batch with a 40 ms budget, the second request cannot make it: refused or expired, never late.
    let slow = pool.clone();
    let first = actix_rt::spawn(async move { slow.infer(row(1.0), soon(5_000)).await });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let started = Instant::now();
    let second = pool.infer(row(2.0), soon(40)).await;
    assert!(started.elapsed() < Duration::from_millis(40 + 60), "answered late: {:?}", started.elapsed());
    match second {
        Err(PoolError::WouldMissDeadline { .. } | PoolError::DeadlineExceeded { .. }) => {}
        other => panic!("expected a deadline error, got {other:?}"),
    }
    first.await.expect("join").expect("first request served");
}

#[actix_rt::test]
async fn full_queue_refuses_at_once() {
    let pool = start(
        PoolConfig { replicas: 1, queue_capacity: 2, max_batch_size: 1, ..PoolConfig::default() },
        Duration::from_millis(50),
    )
    .await;
    let futures: Vec<_> = (0..8)
        .map(|i| {
            let pool = pool.clone();
            async move { pool.infer(row(i as f32), soon(10_000)).await }
        })
        .collect();
    let results = futures::future::join_all(futures).await;
    let full = results.iter().filter(|r| matches!(r, Err(PoolError::QueueFull { capacity: 2 }))).count();
    let served = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(full + served, 8, "{results:?}");
    assert!(full >= 4 && served >= 2, "full {full}, served {served}");
}

#[actix_rt::test]
async fn a_panicking_replica_is_replaced_and_its_batch_answered() {
    let pool = start(PoolConfig { replicas: 1, ..PoolConfig::default() }, Duration::ZERO).await;
    let mut poisoned = row(0.0);
    let mut data = poisoned[0].tensor.as_slice::<f32>().expect("f32").into_owned();
    data[0] = f32::NAN;
    poisoned[0].tensor = Tensor::from_vec(vec![1, 784], data).expect("tensor");
    let err = pool.infer(poisoned, soon(5_000)).await.expect_err("panics");
    assert!(matches!(err, PoolError::ReplicaFailed(ref m) if m.contains("injected fault")), "{err}");
    // The next request waits for the replacement instead of failing.
    pool.infer(row(1.0), soon(10_000)).await.expect("served by the replacement");
    let status = pool.status().await.expect("status");
    assert_eq!((status.replicas, status.restarts), (1, 1), "{status:?}");
}

#[actix_rt::test]
async fn replicas_resize_under_load_without_losing_requests() {
    let pool =
        start(PoolConfig { replicas: 1, max_batch_size: 4, ..PoolConfig::default() }, Duration::from_millis(3)).await;
    pool.set_replicas(3);
    let load: Vec<_> = (0..120)
        .map(|i| {
            let pool = pool.clone();
            async move {
                if i == 60 {
                    pool.set_replicas(1);
                }
                pool.infer(row(i as f32), soon(20_000)).await
            }
        })
        .collect();
    let results = futures::future::join_all(load).await;
    let failed: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
    assert!(failed.is_empty(), "{failed:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = pool.status().await.expect("status");
        if s.replicas == 1 && s.loading == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "did not settle at 1 replica: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_rt::test]
async fn invalid_inputs_are_refused_before_queueing() {
    let pool = start(PoolConfig::default(), Duration::ZERO).await;
    let wrong = vec![NamedTensor::new("input", Tensor::from_vec(vec![1, 3], vec![0.0f32; 3]).expect("tensor"))];
    let err = pool.infer(wrong, soon(1_000)).await.expect_err("wrong dims");
    assert!(err.to_string().contains("dimension 1 must be 784"), "{err}");
    let too_big =
        vec![NamedTensor::new("input", Tensor::from_vec(vec![33, 784], vec![0.0f32; 33 * 784]).expect("tensor"))];
    let err = pool.infer(too_big, soon(1_000)).await.expect_err("batch too large");
    assert_eq!(err.to_string(), "batch of 33 exceeds this model's maximum batch size of 32");
}
