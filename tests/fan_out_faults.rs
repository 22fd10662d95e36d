//! The enhanced fan-out reader over the in-memory Kinesis, for what no emulator does on demand:
//! subscriptions ended by the server after a few events, cut mid-stream, refused with
//! ResourceInUse or throttling, a handler that stalls, a consumer that is slow to activate or
//! deregistered under a run. Time is paused: sleeps complete as soon as every task is idle.

mod faults;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kinesis_tower::kinesis::memory::{shard_name, MemoryKinesis, Operation};
use kinesis_tower::kinesis::{IteratorPosition, KinesisApi, KinesisErrorKind, StreamRef};
use kinesis_tower::store::MemoryStore;
use kinesis_tower::testing::{
    builder, closed_parent_with_child, sequences, wait_for, Running, Seen,
};
use kinesis_tower::{
    Batch, BatchEnd, BoxError, Checkpoint, CheckpointStore, Consumer, EnhancedFanOut, Error,
};
use tower::service_fn;

use faults::FaultyKinesis;

const CONSUMER: &str = "fan-out-tests";

/// A consumer of `kinesis` reading through fan-out as [`CONSUMER`].
fn fan_out(kinesis: &MemoryKinesis) -> Consumer {
    builder(kinesis).enhanced_fan_out(CONSUMER).build().unwrap()
}

/// Runs `consumer` (checkpointed) until it has handled `count` records, then stops it.
async fn read(consumer: &Consumer, count: u64) -> Seen {
    let seen = Seen::default();
    let run = Running::checkpointed(consumer, seen.handler());
    wait_for(Duration::from_secs(30), || seen.count() == count).await;
    run.stop().await.unwrap();
    seen
}

/// Runs `consumer` until it ends, which must be with an `Error::FanOut`.
async fn fan_out_error(consumer: &Consumer) -> Error {
    let error = tokio::time::timeout(
        Duration::from_secs(30),
        consumer.process(service_fn(|_: Batch| async { Ok::<_, BoxError>(()) })),
    )
    .await
    .expect("the run ends")
    .unwrap_err();
    assert!(matches!(error, Error::FanOut { .. }), "{error:?}");
    error
}

fn after(kinesis: &MemoryKinesis, shard: usize, index: usize) -> IteratorPosition {
    IteratorPosition::AfterSequenceNumber(sequences(kinesis, &shard_name(shard))[index])
}

#[tokio::test(start_paused = true)]
async fn delivers_every_record_once_in_order_from_trim_horizon() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.fill(500, 10);
    let consumer = fan_out(&kinesis);
    let seen = read(&consumer, 1_000).await;
    for shard in 0..2 {
        assert_eq!(
            seen.of(&shard_name(shard)),
            sequences(&kinesis, &shard_name(shard))
        );
    }
    // Registered once, by name; read only through subscriptions.
    assert_eq!(kinesis.stream_consumers(), vec![CONSUMER.to_owned()]);
    assert!(kinesis.iterator_requests().is_empty());
    assert_eq!(kinesis.get_records_calls(&shard_name(0)), 0);
}

#[tokio::test(start_paused = true)]
async fn subscriptions_the_server_ends_resume_after_the_last_record() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.end_subscriptions_after(1);
    kinesis.event_record_limit(7);
    kinesis.fill(100, 10);
    let consumer = fan_out(&kinesis);
    let seen = read(&consumer, 100).await;
    assert_eq!(seen.of(&shard_name(0)), sequences(&kinesis, &shard_name(0)));
    let requests: Vec<_> = kinesis
        .subscription_requests()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(requests[0], IteratorPosition::TrimHorizon);
    // One event per subscription: each next one starts just after the last record delivered.
    for (n, position) in requests.iter().enumerate().skip(1).take(14) {
        assert_eq!(*position, after(&kinesis, 0, n * 7 - 1), "subscription {n}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_subscription_cut_mid_stream_resumes_without_loss_or_duplicate() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.event_record_limit(10);
    let shard = shard_name(0);
    for i in 0..30 {
        kinesis.put(&shard, "k", format!("{i}"));
    }
    let consumer = fan_out(&kinesis);
    let seen = Seen::default();
    let run = Running::checkpointed(&consumer, seen.handler());
    wait_for(Duration::from_secs(30), || seen.count() == 30).await;
    // The connection breaks while the subscription waits for more; then more comes.
    kinesis.inject(
        None,
        Operation::SubscriptionEvent,
        KinesisErrorKind::Transient,
        1,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 30..100 {
        kinesis.put(&shard, "k", format!("{i}"));
    }
    wait_for(Duration::from_secs(30), || seen.count() == 100).await;
    run.stop().await.unwrap();
    assert_eq!(seen.of(&shard), sequences(&kinesis, &shard));
    let requests = kinesis.subscription_requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[1].1, after(&kinesis, 0, 29));
}

#[tokio::test(start_paused = true)]
async fn resource_in_use_and_throttling_are_retried_with_backoff() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(50, 10);
    kinesis.inject(
        None,
        Operation::SubscribeToShard,
        KinesisErrorKind::ResourceInUse,
        3,
    );
    kinesis.inject(
        None,
        Operation::SubscribeToShard,
        KinesisErrorKind::Throttled,
        3,
    );
    let consumer = fan_out(&kinesis);
    let seen = Seen::default();
    let started = tokio::time::Instant::now();
    let run = Running::checkpointed(&consumer, seen.handler());
    wait_for(Duration::from_secs(60), || seen.count() == 50).await;
    // Six refusals, backed off (200 ms doubling, at most 5 s): not a busy loop.
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    run.stop().await.unwrap();
    assert_eq!(seen.of(&shard_name(0)), sequences(&kinesis, &shard_name(0)));
    assert_eq!(kinesis.subscription_requests().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_handler_cancels_the_subscription_and_resumes_after_it() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.event_record_limit(50);
    kinesis.fill(1_000, 10);
    let release = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(AtomicU64::new(0));
    let seen = Seen::default();
    let handler = {
        let (release, handled, seen) = (release.clone(), handled.clone(), seen.clone());
        service_fn(move |batch: Batch| {
            let (release, handled, seen) = (release.clone(), handled.clone(), seen.clone());
            async move {
                while !release.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                handled.fetch_add(batch.len() as u64, Ordering::SeqCst);
                seen.take(&batch);
                Ok::<_, BoxError>(())
            }
        })
    };
    let consumer = builder(&kinesis)
        .buffer_records(100)
        .max_records_per_call(50)
        .enhanced_fan_out(EnhancedFanOut::new(CONSUMER).stall_timeout(Duration::from_secs(2)))
        .build()
        .unwrap();
    let run = Running::checkpointed(&consumer, handler);
    wait_for(Duration::from_secs(5), || kinesis.open_subscriptions() == 1).await;
    // The handler is stuck: the buffer fills, no more events are pulled, and after the stall
    // timeout the subscription is cancelled.
    wait_for(Duration::from_secs(10), || {
        kinesis.open_subscriptions() == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(kinesis.open_subscriptions(), 0);
    // Memory stays under the cap: what was pulled and not handled fits the buffer (100
    // records) plus the batch in the handler's hands.
    assert!(
        kinesis.records_served() <= 150,
        "{} records pulled",
        kinesis.records_served()
    );
    release.store(true, Ordering::SeqCst);
    wait_for(Duration::from_secs(60), || seen.count() == 1_000).await;
    run.stop().await.unwrap();
    assert_eq!(seen.of(&shard_name(0)), sequences(&kinesis, &shard_name(0)));
    let requests = kinesis.subscription_requests();
    assert!(requests.len() >= 2, "{requests:?}");
    assert!(matches!(
        requests[1].1,
        IteratorPosition::AfterSequenceNumber(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn parents_are_read_to_their_end_before_their_children() {
    let kinesis = closed_parent_with_child();
    let consumer = fan_out(&kinesis);
    let seen = read(&consumer, 2).await;
    let order: Vec<_> = seen
        .order()
        .into_iter()
        .map(|(shard, _)| shard.to_string())
        .collect();
    assert_eq!(order, ["p", "c"]);
    assert!(seen
        .ends()
        .iter()
        .any(|(shard, end)| &**shard == "p" && *end == BatchEnd::ShardEnd));
}

#[tokio::test(start_paused = true)]
async fn a_restart_resumes_after_the_checkpoint() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(100, 10);
    let all = sequences(&kinesis, &shard_name(0));
    let store = Arc::new(MemoryStore::new());
    store
        .set("tests/test-stream", &shard_name(0), Checkpoint::at(all[41]))
        .await
        .unwrap();
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .enhanced_fan_out(CONSUMER)
        .build()
        .unwrap();
    let seen = read(&consumer, 58).await;
    assert_eq!(seen.of(&shard_name(0)), all[42..].to_vec());
    assert_eq!(kinesis.subscription_requests()[0].1, after(&kinesis, 0, 41));
    assert_eq!(
        store
            .get("tests/test-stream", &shard_name(0))
            .await
            .unwrap(),
        Some(Checkpoint::at(all[99]))
    );
}

#[tokio::test(start_paused = true)]
async fn registration_is_idempotent_and_waits_until_the_consumer_is_active() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.consumer_activation_describes(3);
    kinesis.fill(10, 10);
    let seen = Seen::default();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let consumer = builder(&kinesis)
                .enhanced_fan_out(CONSUMER)
                .build()
                .unwrap();
            Running::checkpointed(&consumer, seen.handler())
        })
        .collect();
    // Two workers of one application (each with its own store here): both read everything.
    wait_for(Duration::from_secs(30), || seen.count() == 20).await;
    for run in workers {
        run.stop().await.unwrap();
    }
    assert_eq!(kinesis.stream_consumers(), vec![CONSUMER.to_owned()]);
}

#[tokio::test(start_paused = true)]
async fn the_consumer_stays_registered_unless_asked_to_deregister() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(10, 10);
    for deregister in [false, true] {
        let consumer = builder(&kinesis)
            .enhanced_fan_out(EnhancedFanOut::new(CONSUMER).deregister_on_shutdown(deregister))
            .build()
            .unwrap();
        read(&consumer, 10).await;
        assert_eq!(kinesis.stream_consumers().is_empty(), deregister);
    }
}

#[tokio::test(start_paused = true)]
async fn a_consumer_deregistered_under_a_run_is_an_error_that_says_so() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.end_subscriptions_after(1);
    kinesis.fill(10, 10);
    let consumer = fan_out(&kinesis);
    let seen = Seen::default();
    let run = Running::checkpointed(&consumer, seen.handler());
    wait_for(Duration::from_secs(30), || seen.count() == 10).await;
    let arn = format!(
        "{}/consumer/{CONSUMER}:1",
        kinesis.stream_arn(&StreamRef::name("s")).await.unwrap()
    );
    kinesis.deregister_stream_consumer(&arn).await.unwrap();
    kinesis.put(&shard_name(0), "k", "after");
    let error = tokio::time::timeout(Duration::from_secs(60), run.join())
        .await
        .expect("the run ends")
        .unwrap_err();
    assert!(matches!(error, Error::FanOut { .. }), "{error:?}");
    assert!(error.to_string().contains("deregistered"), "{error}");
    assert!(!error.is_retryable());
}

#[tokio::test(start_paused = true)]
async fn a_kinesis_api_without_fan_out_is_a_clear_error() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(1, 10);
    // Implements the polling calls only.
    let consumer = FaultyKinesis::new(&kinesis)
        .consumer()
        .enhanced_fan_out(CONSUMER)
        .build()
        .unwrap();
    let error = fan_out_error(&consumer).await;
    assert!(
        error
            .to_string()
            .contains("does not support enhanced fan-out"),
        "{error}"
    );
}

#[test]
fn consumer_names_are_validated() {
    let kinesis = MemoryKinesis::with_shards(1);
    for bad in ["", "has space", &"x".repeat(129)] {
        let error = builder(&kinesis).enhanced_fan_out(bad).build().unwrap_err();
        assert!(error.is_config(), "{error}");
        assert!(error.to_string().contains("enhanced_fan_out"), "{error}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_event_larger_than_the_buffer_goes_out_in_parts_on_one_subscription() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.event_record_limit(1_000);
    kinesis.fill(1_000, 10);
    let consumer = builder(&kinesis)
        .buffer_records(100)
        .max_records_per_call(50)
        .enhanced_fan_out(CONSUMER)
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::checkpointed(&consumer, seen.handler());
    wait_for(Duration::from_secs(30), || seen.count() == 1_000).await;
    run.stop().await.unwrap();
    assert_eq!(seen.of(&shard_name(0)), sequences(&kinesis, &shard_name(0)));
    assert_eq!(seen.largest_batch(), 50);
    // No subscription was given up for it (Kinesis refuses one again within 5 seconds).
    assert_eq!(kinesis.subscription_requests().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn access_denied_names_the_permissions_fan_out_needs() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(1, 10);
    kinesis.inject(
        None,
        Operation::SubscribeToShard,
        KinesisErrorKind::AccessDenied,
        1,
    );
    let consumer = fan_out(&kinesis);
    let error = fan_out_error(&consumer).await;
    assert!(
        error.to_string().contains("kinesis:SubscribeToShard"),
        "{error}"
    );
    assert!(!error.is_retryable());
}

#[tokio::test(start_paused = true)]
async fn subscriptions_that_end_at_once_are_not_a_busy_loop() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.end_subscriptions_after(0);
    let consumer = fan_out(&kinesis);
    let seen = Seen::default();
    let run = Running::checkpointed(&consumer, seen.handler());
    tokio::time::sleep(Duration::from_secs(60)).await;
    // Backed off (200 ms doubling to 5 s): about 15 in a minute, not thousands.
    let subscriptions = kinesis.subscription_requests().len();
    assert!(
        (2..=30).contains(&subscriptions),
        "{subscriptions} subscriptions in 60 s"
    );
    run.stop().await.unwrap();
}
