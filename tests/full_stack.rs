//! The recommended stack (Batch → Checkpoint → Retry → Deaggregate → handler) under
//! `Consumer::run_until` over the in-memory Kinesis (feature `test-util`) with a buffered store:
//! a graceful shutdown drains and flushes, so a restart delivers nothing twice and skips nothing;
//! a closed parent ends with `ShardEnd` before its child starts; a handler failure skips nothing.
//! Time is paused: sleeps complete as soon as every task is idle.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kinesis_tower::batch::BatchLayer;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::kinesis::memory::MemoryKinesis;
use kinesis_tower::kpl::Aggregator;
use kinesis_tower::kpl::DeaggregateLayer;
use kinesis_tower::retry::{RetryLayer, Transient};
use kinesis_tower::store::BufferedStore;
use kinesis_tower::store::MemoryStore;
use kinesis_tower::testing::{builder, wait_for, Running};
use kinesis_tower::{Batch, BoxError, Checkpoint, CheckpointStore, Error};
use tower::{service_fn, ServiceBuilder};

/// A parent with plain records and aggregates, closed, and a child with the same mix.
/// Returns every user record's data per shard, in order.
fn stream() -> (MemoryKinesis, Vec<(String, Vec<String>)>) {
    let kinesis = MemoryKinesis::default();
    let mut expected = Vec::new();
    for (shard, parents) in [("parent", &[][..]), ("child", &["parent"][..])] {
        kinesis.add_shard(shard, parents);
        let mut users = Vec::new();
        for outer in 0..12 {
            if outer % 3 == 1 {
                let mut aggregator = Aggregator::new();
                for u in 0..10 {
                    let data = format!("{shard}-{outer}-{u}");
                    aggregator
                        .add(&format!("k{u}"), None, data.clone())
                        .unwrap();
                    users.push(data);
                }
                let aggregate = aggregator.finish().unwrap();
                kinesis.put(shard, &aggregate.partition_key, aggregate.data);
            } else {
                let data = format!("{shard}-{outer}");
                kinesis.put(shard, "k", data.clone());
                users.push(data);
            }
        }
        if shard == "parent" {
            kinesis.close_shard("parent");
        }
        expected.push((shard.to_owned(), users));
    }
    (kinesis, expected)
}

/// User records the handler finished, in the order it finished them.
#[derive(Clone, Default)]
struct Handled(Arc<Mutex<Vec<String>>>);

impl Handled {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// Runs the full stack until `stop_after` user records were handled (then shuts down), or
/// until the handler fails on `fail_on`.
async fn run(
    kinesis: &MemoryKinesis,
    store: Arc<MemoryStore>,
    stop_after: usize,
    fail_on: Option<&'static str>,
) -> (Result<(), Error>, Vec<String>) {
    // A new buffered store over the same backing store: what a restarted process has.
    let buffered = Arc::new(BufferedStore::new(store).flush_interval(Duration::from_secs(3600)));
    let consumer = builder(kinesis)
        .store_arc(buffered)
        .max_records_per_call(4)
        .heartbeat_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let handled = Handled::default();
    let failed_once = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let handler = {
        let handled = handled.clone();
        service_fn(move |batch: Batch| {
            let data: Vec<String> = batch
                .records
                .iter()
                .map(|r| String::from_utf8_lossy(&r.data).into_owned())
                .collect();
            // Every batch with records fails transiently once, then succeeds.
            let transient = data
                .first()
                .is_some_and(|d| failed_once.lock().unwrap().insert(d.clone()));
            let fatal = fail_on.is_some_and(|f| data.iter().any(|d| d == f));
            if !transient && !fatal {
                handled.0.lock().unwrap().extend(data);
            }
            async move {
                if fatal {
                    return Err::<(), BoxError>("sink rejected the record".into());
                }
                if transient {
                    return Err(Transient::new("sink busy").into());
                }
                Ok(())
            }
        })
    };
    let service = ServiceBuilder::new()
        .layer(
            BatchLayer::new()
                .max_records(5)
                .max_wait(Duration::from_millis(300)),
        )
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .layer(RetryLayer::new().max_attempts(3))
        .layer(DeaggregateLayer::new())
        .service(handler);
    let run = Running::start(&consumer, service);
    wait_for(Duration::from_secs(60), || {
        handled.len() >= stop_after || run.is_finished()
    })
    .await;
    // Let a little more arrive into the batch buffer before stopping.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let result = run.stop().await;
    let all = handled.0.lock().unwrap().clone();
    (result, all)
}

#[tokio::test(start_paused = true)]
async fn a_graceful_restart_delivers_every_user_record_exactly_once_in_order() {
    let (kinesis, expected) = stream();
    let total: usize = expected.iter().map(|(_, u)| u.len()).sum();
    let store = Arc::new(MemoryStore::new());
    let mut handled: Vec<String> = Vec::new();
    for stop_after in [7, 23, 41, 60, usize::MAX] {
        let before = handled.len();
        let want = stop_after.min(total).saturating_sub(before);
        let (result, now) = run(&kinesis, store.clone(), want, None).await;
        result.unwrap();
        handled.extend(now);
        assert!(handled.len() >= before);
        if handled.len() >= total {
            break;
        }
    }
    for (shard, users) in &expected {
        let got: Vec<String> = handled
            .iter()
            .filter(|d| d.starts_with(&format!("{shard}-")))
            .cloned()
            .collect();
        assert_eq!(&got, users, "{shard}: every user record once, in order");
    }
    let ns = "tests/test-stream";
    assert_eq!(
        store.get(ns, "parent").await.unwrap(),
        Some(Checkpoint::ShardEnd)
    );
    // A further run delivers nothing.
    let (result, again) = run(&kinesis, store.clone(), 0, None).await;
    result.unwrap();
    assert!(again.is_empty(), "{again:?}");
}

#[tokio::test(start_paused = true)]
async fn a_handler_failure_skips_nothing_after_a_restart() {
    let (kinesis, expected) = stream();
    let store = Arc::new(MemoryStore::new());
    let (result, first) = run(&kinesis, store.clone(), usize::MAX, Some("parent-7-4")).await;
    assert!(result.is_err(), "{result:?}");
    assert!(!first.contains(&"parent-7-4".to_owned()));
    let (result, second) = run(&kinesis, store.clone(), 60, None).await;
    result.unwrap();
    let (_, parent) = &expected[0];
    // The second run starts at or before the failed user record and goes on in order.
    let start = parent.iter().position(|d| d == "parent-7-0").unwrap();
    let got: Vec<String> = second
        .iter()
        .filter(|d| d.starts_with("parent-"))
        .cloned()
        .collect();
    assert!(
        got.first()
            .is_some_and(|d| parent.iter().position(|p| p == d).unwrap() <= start),
        "{got:?}"
    );
    let from = parent.iter().position(|p| p == &got[0]).unwrap();
    assert_eq!(&got[..], &parent[from..]);
}
