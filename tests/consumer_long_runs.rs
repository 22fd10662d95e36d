//! Long runs: what the consumer keeps stays bounded, and time-based batching holds with the
//! defaults. Time is paused: sleeps complete as soon as every task is idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kinesis_tower::batch::BatchLayer;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::kinesis::memory::{shard_name, MemoryKinesis};
use kinesis_tower::testing::{builder, closed_parent_with_child, wait_for, Running, Seen};
use kinesis_tower::{Batch, BoxError};
use tower::{service_fn, ServiceBuilder};

/// With the consumer's defaults, `BatchLayer::max_wait` holds on a quiet shard: the layer asks
/// for a heartbeat at its deadline, so one record is handled within max wait plus one poll
/// interval (200 ms).
#[tokio::test(start_paused = true)]
async fn max_wait_holds_on_a_quiet_shard_with_the_defaults() {
    let kinesis = MemoryKinesis::with_shards(1);
    let consumer = builder(&kinesis).build().unwrap();
    let seen = Seen::default();
    let handled_at = Arc::new(Mutex::new(None));
    let handler = {
        let (seen, handled_at) = (seen.clone(), handled_at.clone());
        service_fn(move |batch: Batch| {
            if !batch.is_empty() {
                *handled_at.lock().unwrap() = Some(tokio::time::Instant::now());
            }
            seen.take(&batch);
            async { Ok::<_, BoxError>(()) }
        })
    };
    let service = ServiceBuilder::new()
        .layer(BatchLayer::new().max_wait(Duration::from_secs(1)))
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .service(handler);
    let run = Running::start(&consumer, service);
    wait_for(Duration::from_secs(5), || {
        kinesis.get_records_calls(&shard_name(0)) > 0
    })
    .await;
    let put_at = tokio::time::Instant::now();
    kinesis.put(&shard_name(0), "k", "v");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let handled = handled_at
        .lock()
        .unwrap()
        .expect("the record was never handled");
    run.stop().await.unwrap();
    let waited = handled - put_at;
    assert!(
        waited <= Duration::from_millis(1_000 + 200 + 50),
        "handled {waited:?} after it was put"
    );
    assert_eq!(seen.count(), 1);
}

/// Without a layer that asks for them, and without `heartbeat_interval`, the handler never sees
/// an empty batch.
#[tokio::test(start_paused = true)]
async fn no_heartbeats_unless_asked_for() {
    let kinesis = MemoryKinesis::with_shards(2);
    let consumer = builder(&kinesis).build().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let handler = {
        let calls = calls.clone();
        service_fn(move |_batch: Batch| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>(()) }
        })
    };
    let run = Running::start(&consumer, handler);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    run.stop().await.unwrap();
}

/// A closed shard whose last record a stream user never commits: when the run ends, the
/// checkpointer stops waiting for it (a consumer run again and again keeps nothing of it).
#[tokio::test(start_paused = true)]
async fn an_end_never_committed_is_forgotten_when_the_run_ends() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("p", &[]);
    kinesis.put("p", "k", "v");
    kinesis.close_shard("p");
    let consumer = builder(&kinesis).build().unwrap();
    let mut stream = consumer.records();
    stream.next().await.unwrap();
    // Polling on hands the batch back as done (nothing more comes: no child).
    assert!(tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .is_err());
    assert_eq!(consumer.checkpointer().pending_shard_ends(), 1);
    stream.shutdown().await.unwrap();
    assert_eq!(consumer.checkpointer().pending_shard_ends(), 0);
}

/// A run without `CheckpointLayer` over a closed shard: its children are held back (its end
/// is never checkpointed), and the consumer says so, naming the shard and the fix.
#[tokio::test(start_paused = true)]
async fn children_held_back_by_an_unchecked_end_are_reported() {
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let kinesis = closed_parent_with_child();
    let consumer = builder(&kinesis).build().unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    tokio::time::sleep(Duration::from_secs(40)).await;
    run.stop().await.unwrap();
    assert!(seen.of("c").is_empty());
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("children wait")
            && logs.contains("shard=p")
            && logs.contains("CheckpointLayer"),
        "{logs}"
    );
}
