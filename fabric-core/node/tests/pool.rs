//! The model pool with real tract engines: batching, deadlines, queue limits, replica panics and
//! resizing, every test model answered under concurrency exactly as alone, and supervision (load
//! retries, the watchdog). Fault injection wraps a real engine: a delay, a panic on a marked input, a
//! hang, an error every N calls, loads that fail.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_engine::model::{InputError, ModelMetadata};
use fabric_engine::{self as engine, EngineError};
use fabric_engine::{Engine, EngineKind, EngineOptions};
use fabric_node::metrics::Metrics;
use fabric_node::pool::{EngineFactory, ModelPool, PoolConfig, PoolError, PoolHandle};
use fabric_policy::admission::{Admission, OffloadView};
use fabric_testkit::reference;
use fabric_types::{DataType, NamedTensor, Tensor};

fn factory(delay: Duration) -> EngineFactory {
    injected_factory("mlp", Faults { delay, ..Faults::default() }, Arc::new(AtomicUsize::new(0)))
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
    // A hang guard, not a latency figure: the point is the error below, which comes instead of a late answer.
    assert!(started.elapsed() < Duration::from_secs(2), "answered late: {:?}", started.elapsed());
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

/// Polls the pool's status until `done` holds (bounded: 20 s, generous for a loaded machine).
async fn wait_for(pool: &PoolHandle, what: &str, done: impl Fn(&fabric_node::pool::PoolStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = pool.status().await.expect("status");
        if done(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not reached, status {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[actix_rt::test]
async fn replicas_resize_under_load_without_losing_requests() {
    let pool =
        start(PoolConfig { replicas: 1, max_batch_size: 4, ..PoolConfig::default() }, Duration::from_millis(20)).await;
    pool.set_replicas(3);
    wait_for(&pool, "three replicas up", |s| s.replicas == 3).await;
    let load: Vec<_> = (0..120)
        .map(|i| {
            let pool = pool.clone();
            actix_rt::spawn(async move { pool.infer(row(i as f32), soon(60_000)).await })
        })
        .collect();
    // Shrink while replicas are busy, so retiring a busy replica (it finishes its batch first) is exercised.
    wait_for(&pool, "replicas busy", |s| s.busy >= 2).await;
    pool.set_replicas(1);
    let mut failed = Vec::new();
    for handle in load {
        if let Err(e) = handle.await.expect("join") {
            failed.push(e.to_string());
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
    wait_for(&pool, "settled at 1 replica", |s| s.replicas == 1 && s.loading == 0 && s.busy == 0).await;
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

/// Deterministic inputs for a model: `rows` rows on the leading dynamic dimension, 1 on other dynamic ones.
fn inputs_for(meta: &ModelMetadata, rows: usize, seed: u64) -> Vec<NamedTensor> {
    meta.inputs
        .iter()
        .map(|spec| {
            let shape = spec.shape_with_rows(rows);
            let n: usize = shape.iter().product();
            let x = |i: usize| ((i as f64 + 1.0) * 0.731 + seed as f64 * 1.37).sin();
            let tensor = match spec.datatype {
                DataType::Fp32 => Tensor::from_vec(shape, (0..n).map(|i| x(i) as f32).collect::<Vec<_>>()),
                DataType::Fp64 => Tensor::from_vec(shape, (0..n).map(x).collect::<Vec<_>>()),
                DataType::Int64 => Tensor::from_vec(shape, (0..n).map(|i| (x(i) * 1000.0) as i64).collect::<Vec<_>>()),
                other => panic!("no generator for {other}"),
            };
            NamedTensor::new(spec.name.clone(), tensor.expect("tensor"))
        })
        .collect()
}

/// A factory for any generated model on tract, with a delay per engine call so that batches form.
fn model_factory(model: &str, delay: Duration) -> EngineFactory {
    injected_factory(model, Faults { delay, ..Faults::default() }, Arc::new(AtomicUsize::new(0)))
}

#[actix_rt::test]
async fn every_model_answers_concurrent_mixed_requests_exactly_as_alone() {
    let mut joined = Vec::new();
    for (model, batched) in [
        ("mlp", true),
        ("mixed", true),
        ("digits", true),
        ("digits_raw", true),
        ("shape_use", true),
        ("odd_outputs", false),
        ("shape_out", false),
        ("partly", false),
        ("cnn", true),
    ] {
        let config = PoolConfig {
            replicas: 1,
            max_batch_size: 8,
            max_queue_delay: Duration::from_millis(5),
            ..PoolConfig::default()
        };
        let pool =
            ModelPool::start(model, "1", model_factory(model, Duration::from_millis(3)), config, Metrics::new("t"))
                .await
                .unwrap_or_else(|e| panic!("{model}: {e}"));
        assert_eq!(pool.is_batched(), batched, "{model}");
        let mut alone =
            engine::load(EngineKind::Tract, &reference::model_path(model), &EngineOptions::default()).expect("engine");
        let requests: Vec<Vec<NamedTensor>> =
            (0..24).map(|i| inputs_for(pool.metadata(), 1 + i % 3, i as u64)).collect();
        let want: Vec<Vec<NamedTensor>> = requests.iter().map(|r| alone.infer(r).expect("alone")).collect();
        let futures: Vec<_> = requests
            .iter()
            .cloned()
            .map(|r| {
                let pool = pool.clone();
                async move { pool.infer(r, soon(60_000)).await }
            })
            .collect();
        let mut biggest = 0;
        for (i, result) in futures::future::join_all(futures).await.into_iter().enumerate() {
            let reply = result.unwrap_or_else(|e| panic!("{model} request {i}: {e}"));
            let rows = 1 + i % 3;
            if !batched {
                assert_eq!(reply.batch_rows, rows, "{model}: request {i} shared an engine call");
            }
            biggest = biggest.max(reply.batch_rows);
            assert_eq!(reply.outputs.len(), want[i].len(), "{model}");
            for (got, want) in reply.outputs.iter().zip(&want[i]) {
                assert_eq!(got.shape(), want.tensor.shape(), "{model} request {i} output {}", want.name);
                // Integer outputs (labels) bit for bit. Float outputs within 1e-5: tract picks its matrix
                // kernel by batch size, so the last bits can differ; another request's rows would not.
                let diff = reference::max_abs_diff(got, &want.tensor).expect("comparable");
                let exact = !matches!(got.dtype(), DataType::Fp32 | DataType::Fp64);
                assert!(
                    if exact { got.bytes() == want.tensor.bytes() } else { diff <= 1e-5 },
                    "{model} request {i} output {}: not what it gets alone (max diff {diff})",
                    want.name
                );
            }
        }
        if batched && biggest > 3 {
            joined.push(model);
        }
    }
    // Each batched model's batch limit is measured at warm-up (tract's CNN often prefers 1-4 rows), so a
    // loaded machine may keep one from joining requests; but the check above must have seen joins.
    assert!(joined.len() >= 3, "too few models joined requests into one batch: {joined:?}");
}

#[actix_rt::test]
async fn zero_rows_are_refused_and_partly_batched_models_keep_their_counts() {
    let config = PoolConfig { replicas: 1, max_batch_size: 8, ..PoolConfig::default() };
    let pool =
        ModelPool::start("partly", "1", model_factory("partly", Duration::from_millis(1)), config, Metrics::new("t"))
            .await
            .expect("pool");
    let empty = inputs_for(pool.metadata(), 0, 0);
    let err = pool.infer(empty, soon(5_000)).await.expect_err("0 rows");
    assert!(matches!(err, PoolError::Input(InputError::NoRows { .. })), "{err}");
    assert_eq!(err.to_string(), "input 'x' has 0 rows: send at least one row");
    let futures: Vec<_> = (0..40)
        .map(|i| {
            let pool = pool.clone();
            async move { pool.infer(inputs_for(pool.metadata(), 1 + i % 4, i as u64), soon(60_000)).await }
        })
        .collect();
    for (i, r) in futures::future::join_all(futures).await.into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("request {i}: {e}"));
    }
    wait_for(&pool, "queue drained", |s| s.queued == 0 && s.busy == 0).await;
}

/// What an injected engine does wrong. Whatever the faults, an input starting with NaN panics the call.
#[derive(Clone, Copy, Default)]
struct Faults {
    /// A delay before each call.
    delay: Duration,
    /// Loads numbered (from 1) in this range fail.
    failing_loads: (usize, usize),
    /// Calls numbered (from 1, warm-up included) that are multiples of this fail with an engine error.
    fail_every: Option<usize>,
    /// An input whose first value is this hangs the call for 5 s.
    hang_marker: Option<f32>,
    /// A delay in each load (a slow cold start).
    load_delay: Duration,
}

/// A real engine with injected faults.
struct Injected {
    inner: Box<dyn Engine>,
    faults: Faults,
    calls: usize,
}

impl Engine for Injected {
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
        std::thread::sleep(self.faults.delay);
        self.calls += 1;
        if self.faults.fail_every.is_some_and(|n| self.calls % n == 0) {
            return Err(EngineError::Run {
                engine: EngineKind::Tract,
                reason: format!("injected failure on call {}", self.calls),
            });
        }
        let first = inputs[0].as_slice::<f32>().ok().and_then(|v| v.first().copied());
        if self.faults.hang_marker.is_some() && first == self.faults.hang_marker {
            std::thread::sleep(Duration::from_secs(5));
        }
        if inputs[0].as_slice::<f32>().is_ok_and(|v| v.iter().any(|x| x.is_nan())) {
            panic!("injected fault: NaN input");
        }
        self.inner.run_ordered(inputs)
    }
}

fn injected_factory(model: &str, faults: Faults, loads: Arc<AtomicUsize>) -> EngineFactory {
    let path = reference::model_path(model);
    Arc::new(move || {
        let n = loads.fetch_add(1, Ordering::SeqCst) + 1;
        if (faults.failing_loads.0..=faults.failing_loads.1).contains(&n) {
            let reason = format!("injected load failure #{n}");
            return Err(EngineError::Load { engine: EngineKind::Tract, path: path.display().to_string(), reason });
        }
        std::thread::sleep(faults.load_delay);
        let inner = engine::load(EngineKind::Tract, &path, &EngineOptions::default())?;
        Ok(Box::new(Injected { inner, faults, calls: 0 }) as Box<dyn Engine>)
    })
}

/// A pool of the MLP whose engines have `faults` (loads counted apart).
async fn start_faulty(faults: Faults, config: PoolConfig) -> PoolHandle {
    ModelPool::start(
        "mlp",
        "1",
        injected_factory("mlp", faults, Arc::new(AtomicUsize::new(0))),
        config,
        Metrics::new("t"),
    )
    .await
    .expect("pool starts")
}

fn marked(value: f32) -> Vec<NamedTensor> {
    let mut r = row(0.0);
    let mut data = r[0].tensor.as_slice::<f32>().expect("f32").into_owned();
    data[0] = value;
    r[0].tensor = Tensor::from_vec(vec![1, 784], data).expect("tensor");
    r
}

#[actix_rt::test]
async fn a_replica_that_fails_to_reload_is_retried_and_the_pool_says_why() {
    let loads = Arc::new(AtomicUsize::new(0));
    let faults = Faults { failing_loads: (2, 3), ..Faults::default() };
    let pool = ModelPool::start(
        "mlp",
        "1",
        injected_factory("mlp", faults, loads.clone()),
        PoolConfig::default(),
        Metrics::new("t"),
    )
    .await
    .expect("first load works");
    let err = pool.infer(marked(f32::NAN), soon(5_000)).await.expect_err("panics");
    assert!(matches!(err, PoolError::ReplicaFailed(_)), "{err}");
    // Reloads 2 and 3 fail: the pool has no replica and says why.
    wait_for(&pool, "a failed reload reported", |s| {
        s.replicas == 0 && s.last_error.as_deref().is_some_and(|e| e.contains("injected load failure"))
    })
    .await;
    assert_eq!(pool.ready_replicas(), 0);
    // With a hub at hand, admission sends requests there instead of queueing for a replica that may not come.
    let hub = Some(OffloadView { expected: Duration::from_millis(5) });
    assert_eq!(pool.admission(&row(1.0), soon(1_000), hub, pool.default_priority()), Admission::Offload);
    // Load 4 works: the pool recovers by itself and serves again.
    wait_for(&pool, "recovered", |s| s.replicas == 1 && s.last_error.is_none()).await;
    pool.infer(row(1.0), soon(10_000)).await.expect("served after the retry");
    assert!(loads.load(Ordering::SeqCst) >= 4);
}

#[actix_rt::test]
async fn a_replica_that_keeps_crashing_is_reported_and_replaced_with_backoff() {
    let loads = Arc::new(AtomicUsize::new(0));
    let pool = ModelPool::start(
        "mlp",
        "1",
        injected_factory("mlp", Faults::default(), loads.clone()),
        PoolConfig::default(),
        Metrics::new("t"),
    )
    .await
    .expect("loads");
    for crash in 1..=3u64 {
        let err = pool.infer(marked(f32::NAN), soon(10_000)).await.expect_err("panics");
        assert!(matches!(err, PoolError::ReplicaFailed(_)), "{err}");
        if crash < 3 {
            wait_for(&pool, "replaced", |s| s.replicas == 1).await;
        }
    }
    // The third panic within a minute is a crash loop: said, and the replacement backs off.
    wait_for(&pool, "the crash loop reported", |s| {
        s.restarts == 3 && s.last_error.as_deref().is_some_and(|e| e.contains("crash loop: 3 replica panics"))
    })
    .await;
    let loads_at_loop = loads.load(Ordering::SeqCst);
    // Meanwhile requests get a precise refusal, and the pool recovers by itself after the backoff.
    wait_for(&pool, "replaced after the backoff", |s| s.replicas == 1).await;
    pool.infer(row(1.0), soon(10_000)).await.expect("served after the backoff");
    assert_eq!(loads.load(Ordering::SeqCst), loads_at_loop + 1, "one replacement, not a loop");
}

#[actix_rt::test]
async fn a_hung_engine_call_is_cut_by_the_watchdog_and_the_replica_replaced() {
    let faults = Faults { hang_marker: Some(1234.5), ..Faults::default() };
    let config = PoolConfig { watchdog: Some(Duration::from_millis(300)), ..PoolConfig::default() };
    let pool = start_faulty(faults, config).await;
    let started = Instant::now();
    let err = pool.infer(marked(1234.5), soon(30_000)).await.expect_err("hangs");
    assert!(matches!(err, PoolError::ReplicaFailed(ref m) if m.contains("watchdog")), "{err}");
    assert!(started.elapsed() < Duration::from_secs(4), "answered only after the hang ended: {:?}", started.elapsed());
    pool.infer(row(1.0), soon(20_000)).await.expect("served by the replacement");
    let status = pool.status().await.expect("status");
    assert_eq!((status.replicas, status.restarts), (1, 1), "{status:?}");
}

#[actix_rt::test]
async fn an_engine_failing_every_third_call_fails_only_those_requests() {
    // Warm-up makes 2 calls per batch size (1..32: 6 sizes), so count failures, not positions.
    let faults = Faults { fail_every: Some(3), ..Faults::default() };
    let pool = ModelPool::start(
        "mlp",
        "1",
        injected_factory("mlp", faults, Arc::new(AtomicUsize::new(0))),
        PoolConfig::default(),
        Metrics::new("t"),
    )
    .await
    .expect("pool");
    let mut failed = 0;
    for i in 0..9 {
        match pool.infer(row(i as f32), soon(10_000)).await {
            Ok(_) => {}
            Err(PoolError::Engine(m)) => {
                assert!(m.contains("injected failure"), "{m}");
                failed += 1;
            }
            Err(e) => panic!("request {i}: {e}"),
        }
    }
    assert_eq!(failed, 3, "one call in three fails");
    let status = pool.status().await.expect("status");
    assert_eq!((status.replicas, status.restarts), (1, 0), "an engine error does not replace the replica: {status:?}");
}

#[actix_rt::test]
async fn scaled_to_zero_a_request_wakes_a_replica_or_is_refused_at_once_when_it_cannot_wait() {
    // 40 ms a batch: the 20 requests below take at least 200 ms, so the status poll sees them queued
    // even on a loaded machine (at 5 ms a batch they were once all served before the first poll).
    let faults =
        Faults { load_delay: Duration::from_millis(300), delay: Duration::from_millis(40), ..Faults::default() };
    let config = PoolConfig { max_batch_size: 4, ..PoolConfig::default() };
    let pool = start_faulty(faults, config).await;
    // Requests queued when the pool goes to zero are all served: the last replica leaves after them.
    let queued: Vec<_> = (0..20)
        .map(|i| {
            let pool = pool.clone();
            actix_rt::spawn(async move { pool.infer(row(i as f32), soon(30_000)).await })
        })
        .collect();
    wait_for(&pool, "requests queued", |s| s.busy == 1).await;
    pool.resize(0).await.expect("scales to zero");
    for handle in queued {
        handle.await.expect("join").expect("a request queued before scale to zero is served");
    }
    let status = pool.status().await.expect("status");
    assert_eq!((status.target, status.replicas, status.queued), (0, 0, 0), "{status:?}");
    let cold = status.cold_start.expect("cold start measured");
    assert!(cold >= Duration::from_millis(300), "cold start {cold:?} includes the 300 ms load");
    assert!(pool.serving(), "a pool at zero still takes requests");
    // Requests that can wait are held while a replica loads, and all served.
    let woken: Vec<_> = (0..8)
        .map(|i| {
            let pool = pool.clone();
            actix_rt::spawn(async move { pool.infer(row(i as f32), soon(20_000)).await })
        })
        .collect();
    for handle in woken {
        handle.await.expect("join").expect("served after the wake");
    }
    let status = pool.status().await.expect("status");
    assert_eq!((status.target, status.replicas), (1, 1), "one replica woken: {status:?}");
    // Back at zero, a deadline shorter than the cold start is refused at once, precisely (ColdStart
    // is admission's refusal: a request that had waited would end DeadlineExceeded), and the request,
    // demand all the same, wakes a replica for the next ones.
    pool.resize(0).await.expect("scales to zero");
    let err = pool.infer(row(1.0), soon(100)).await.expect_err("cannot wait for a load");
    assert!(matches!(err, PoolError::ColdStart { .. }), "{err}");
    assert!(err.to_string().contains("scaled to zero"), "{err}");
    wait_for(&pool, "woken by the refused request", |s| s.target == 1 && s.replicas == 1).await;
}

#[test]
fn the_gpu_stream_probe_measures_one_to_n_engines_at_once_and_a_failing_stream_stops() {
    // The probe is device-agnostic: here on tract engines (a GPU machine runs it on CUDA sessions).
    let load = |faults: Faults| injected_factory("mlp", faults, Arc::new(AtomicUsize::new(0)))().expect("loads");
    let inputs = vec![Tensor::from_vec(vec![8, 784], vec![0.5f32; 8 * 784]).expect("tensor")];
    let (mut a, mut b, mut c) = (load(Faults::default()), load(Faults::default()), load(Faults::default()));
    let mut engines = vec![&mut a, &mut b, &mut c];
    let measured = fabric_node::pool::measure_streams(&mut engines, &inputs, 8, Duration::from_millis(30));
    assert_eq!(measured.iter().map(|m| m.streams).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(measured.iter().all(|m| m.rows_per_s > 0.0), "{measured:?}");
    // An engine failing every call adds nothing and does not stop the others.
    let mut broken = load(Faults { fail_every: Some(1), ..Faults::default() });
    let mut engines = vec![&mut a, &mut broken];
    let measured = fabric_node::pool::measure_streams(&mut engines, &inputs, 8, Duration::from_millis(30));
    assert_eq!(measured.len(), 2);
    assert!(measured[1].rows_per_s > 0.0, "the working stream still counts: {measured:?}");
    let mut engines = vec![&mut broken];
    let measured = fabric_node::pool::measure_streams(&mut engines, &inputs, 8, Duration::from_millis(30));
    assert_eq!(measured[0].rows_per_s, 0.0, "{measured:?}");
}

#[actix_rt::test]
async fn a_cpu_pool_reports_no_gpu_placement() {
    let pool = start(PoolConfig::default(), Duration::ZERO).await;
    assert!(!pool.on_gpu());
    assert!(pool.gpu().is_none(), "no GPU, nothing measured");
}
