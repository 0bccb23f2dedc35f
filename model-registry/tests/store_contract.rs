//! One set of store tests run over both stores: the embedded redb file and etcd (a real 3-member
//! cluster on loopback). Then what only etcd has: writes fenced on an election key, and writes
//! refused with an error that says so while the cluster has no quorum.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric_testkit::etcd::EtcdCluster;
use fabric_testkit::process::temp_dir;
use model_registry::state::{ModelVersion, RegistryState, Rollout, Scaled};
use model_registry::store::embedded::RedbStore;
use model_registry::store::etcd::{EtcdStore, Fence};
use model_registry::store::{diff, json, scaled_record_key, Blobs, Change, Store, StoreError};

fn version(name: &str, v: u64) -> ModelVersion {
    ModelVersion {
        name: name.into(),
        version: v,
        digest: format!("{name}{v}"),
        size: 1,
        inputs: Vec::new(),
        outputs: Vec::new(),
        pushed_by: "operator".into(),
        pushed_at: 0,
        reference: None,
    }
}

/// What every store must do; `open` opens the same store (again: a restarted registry).
fn contract(open: &dyn Fn() -> Box<dyn Store>) {
    let store = open();
    assert!(store.load().expect("load").is_none(), "a fresh store holds nothing");
    let mut state = RegistryState { generation: 1, ..Default::default() };
    state.models.entry("mlp".into()).or_default().insert(1, version("mlp", 1));
    let r1 = store.write(0, &diff(&RegistryState::default(), &state)).expect("first write");
    let before = state.clone();
    state.generation = 2;
    state.rollouts.insert("mlp".into(), Rollout { stable: Some(1), ..Default::default() });
    let r2 = store.write(r1, &diff(&before, &state)).expect("second write");
    assert!(r2 > r1);
    // A write from a stale revision changes nothing.
    match store.write(r1, &[Change::Put("meta/generation".into(), json(&99u64))]) {
        Err(StoreError::Conflict { expected, found }) => assert_eq!((expected, found), (r1, r2)),
        other => panic!("a stale write was not refused: {other:?}"),
    }
    let scaled = Scaled { replicas: 3, reason: "load".into(), at_ms: 5 };
    let r3 = store.write(r2, &[Change::Put(scaled_record_key("edge/1", "mlp:1"), json(&scaled))]).expect("scaled");
    // A transition of more keys than one etcd transaction takes (128 operations by default).
    let mut many = state.clone();
    many.generation = 3;
    for v in 2..=250 {
        many.models.get_mut("mlp").expect("mlp").insert(v, version("mlp", v));
    }
    let r4 = store.write(r3, &diff(&state, &many)).expect("a large transition");
    // Deleting keys.
    let mut fewer = many.clone();
    fewer.generation = 4;
    fewer.models.get_mut("mlp").expect("mlp").retain(|v, _| *v <= 10);
    let r5 = store.write(r4, &diff(&many, &fewer)).expect("deletes");
    drop(store);
    let store = open();
    let reopened = store.load().expect("load").expect("stored");
    assert_eq!(reopened.revision, r5);
    assert_eq!(reopened.state, fewer);
    assert_eq!(reopened.scaled["edge/1"]["mlp:1"], scaled);
    // Blobs: staged, committed, found, removed.
    let staged = store.staging_path();
    std::fs::write(&staged, b"onnx bytes").expect("stage");
    store.commit_blob(&staged, "abc").expect("commit");
    assert_eq!(std::fs::read(store.blob_path("abc")).expect("blob"), b"onnx bytes");
    store.remove_blob("abc");
    assert!(!store.blob_path("abc").exists());
}

#[test]
fn the_embedded_store_keeps_the_contract() {
    let dir = temp_dir("store-embedded");
    contract(&|| Box::new(RedbStore::open(&dir).expect("open")));
}

fn etcd_store(cluster: &EtcdCluster, prefix: &str, blobs: &Arc<Blobs>) -> EtcdStore {
    EtcdStore::connect(&cluster.endpoints(), prefix, blobs.clone()).expect("connect")
}

fn blobs(tag: &str) -> Arc<Blobs> {
    let dir = temp_dir(tag);
    Arc::new(Blobs::open(dir.join("blobs"), dir.join("staging")).expect("blobs"))
}

#[test]
fn the_etcd_store_keeps_the_contract_fences_writes_and_says_when_quorum_is_lost() {
    let Some(mut cluster) = EtcdCluster::start(3) else { return };
    let blobs = blobs("store-etcd");
    contract(&|| Box::new(etcd_store(&cluster, "/test/contract/", &blobs)));
    let store = etcd_store(&cluster, "/test/contract/", &blobs);

    // Fenced on a key: writes pass while its create revision is the one fenced on, and are refused
    // (NotLeader) once it was deleted and created again (another leader's campaign).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let endpoints = cluster.endpoints();
    let mut client = runtime.block_on(etcd_client::Client::connect(endpoints.clone(), None)).expect("etcd client");
    let put = |client: &mut etcd_client::Client| {
        runtime.block_on(client.put("/test/fence/leader", "me", None)).expect("put");
        let got = runtime.block_on(client.get("/test/fence/leader", None)).expect("get");
        got.kvs()[0].create_revision()
    };
    let created = put(&mut client);
    let fenced = etcd_store(&cluster, "/test/fenced/", &blobs)
        .fenced(Fence { key: b"/test/fence/leader".to_vec(), revision: created });
    let r1 = fenced.write(0, &[Change::Put("meta/generation".into(), json(&1u64))]).expect("fenced write");
    runtime.block_on(client.delete("/test/fence/leader", None)).expect("delete");
    put(&mut client);
    match fenced.write(r1, &[Change::Put("meta/generation".into(), json(&2u64))]) {
        Err(StoreError::NotLeader(_)) => {}
        other => panic!("a write past a replaced fence was not refused: {other:?}"),
    }
    let stored = etcd_store(&cluster, "/test/fenced/", &blobs).load().expect("load").expect("stored");
    assert_eq!(stored.state.generation, 1, "the fenced-off write changed the state");

    // Compaction: the first call records etcd's revision, the next compacts up to it, so history
    // older than one interval is gone (a read at revision 1 is refused as compacted).
    store.compact().expect("compaction noted");
    let r = store.load().expect("load").expect("stored").revision;
    store.write(r, &[Change::Put("meta/generation".into(), json(&4u64))]).expect("write");
    store.compact().expect("compacted");
    let old = runtime
        .block_on(client.get("/test/contract/meta/revision", Some(etcd_client::GetOptions::new().with_revision(1))));
    assert!(old.is_err_and(|e| e.to_string().contains("compacted")), "history was not compacted");

    // One member down: writes go on.
    cluster.kill(2);
    let r2 = store.load().expect("load").expect("stored").revision;
    let r3 = store.write(r2, &[Change::Put("meta/generation".into(), json(&5u64))]).expect("write with 2 of 3");
    // Quorum lost: refused, within the store's bound, with an error that says what happened. A write
    // etcd's leader took before it noticed it lost its peers is not refused but unanswered: the error
    // says it may still be made.
    cluster.kill(1);
    let started = Instant::now();
    let unanswered = match store.write(r3, &[Change::Put("meta/generation".into(), json(&6u64))]) {
        Err(StoreError::Unavailable(message)) => {
            assert!(message.contains("quorum"), "{message}");
            message.contains("may still be made")
        }
        other => panic!("a write without quorum was not refused as unavailable: {other:?}"),
    };
    assert!(started.elapsed() < Duration::from_secs(30), "the refusal took {:?}", started.elapsed());
    // Quorum back: writes resume from what etcd holds (the unanswered write made, or not at all).
    cluster.restart(1);
    cluster.restart(2);
    cluster.wait_all_healthy();
    let limit = Instant::now() + Duration::from_secs(30);
    let stored = loop {
        match store.load() {
            Ok(stored) => break stored.expect("stored"),
            Err(_) if Instant::now() < limit => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("reads did not resume with quorum back: {e}"),
        }
    };
    match stored.revision - r3 {
        0 => assert_eq!(stored.state.generation, 5),
        1 => assert!(unanswered && stored.state.generation == 6, "a write refused outright was made"),
        n => panic!("{n} writes appeared"),
    }
    let r4 = store.write(stored.revision, &[Change::Put("meta/generation".into(), json(&7u64))]).expect("write");
    let stored = store.load().expect("load").expect("stored");
    assert_eq!((stored.revision, stored.state.generation), (r4, 7));
}
