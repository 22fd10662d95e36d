//! Failures of Kinesis, of a shard's reader and of the handler: those a run rides out (throttling,
//! transient errors, hung calls, expired iterators), and those that end it with an error that says
//! what to fix. Time is paused: sleeps complete as soon as every task is idle.

mod faults;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::kinesis::memory::{shard_name, MemoryKinesis, Operation};
use kinesis_tower::kinesis::{IteratorPosition, KinesisErrorKind};
use kinesis_tower::store::MemoryStore;
use kinesis_tower::testing::{builder, sequences, wait_for, Running, Seen};
use kinesis_tower::{Batch, BoxError, CheckpointStore};
use kinesis_tower::{Error, StartPosition};
use tower::{service_fn, Layer};

use faults::FaultyKinesis;

#[tokio::test(start_paused = true)]
async fn throttling_backs_off_and_loses_nothing() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.fill(50, 10);
    kinesis.inject(
        Some(&shard_name(0)),
        Operation::GetRecords,
        KinesisErrorKind::Throttled,
        4,
    );
    let consumer = builder(&kinesis).max_records_per_call(10).build().unwrap();
    let seen = Seen::default();
    let started = tokio::time::Instant::now();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(60), || seen.count() == 100).await;
    let elapsed = started.elapsed();
    run.stop().await.unwrap();
    assert_eq!(seen.of(&shard_name(0)), sequences(&kinesis, &shard_name(0)));
    // 4 throttles then 5 full reads: the throttled calls were retried, with backoff.
    assert!(kinesis.get_records_calls(&shard_name(0)) >= 9);
    assert!(
        elapsed >= Duration::from_millis(100 + 200 + 400 + 800),
        "{elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn transient_failure_of_one_shard_does_not_stop_the_others() {
    let kinesis = MemoryKinesis::with_shards(3);
    kinesis.fill(30, 10);
    kinesis.inject(
        Some(&shard_name(1)),
        Operation::GetRecords,
        KinesisErrorKind::Transient,
        10,
    );
    let consumer = builder(&kinesis).build().unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(5), || {
        seen.of(&shard_name(0)).len() == 30 && seen.of(&shard_name(2)).len() == 30
    })
    .await;
    assert!(
        seen.of(&shard_name(1)).is_empty(),
        "shard 1 is still failing"
    );
    // Shard 1 recovers once its faults are used up.
    wait_for(Duration::from_secs(120), || {
        seen.of(&shard_name(1)).len() == 30
    })
    .await;
    run.stop().await.unwrap();
}

/// A Kinesis call that never answers (a hung connection) counts as a transient failure after
/// a timeout: the shard is read again, the run goes on.
#[tokio::test(start_paused = true)]
async fn a_hung_get_records_call_times_out_and_the_shard_goes_on() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(5, 10);
    let api = FaultyKinesis::new(&kinesis);
    api.hanging_get_records.store(1, Ordering::SeqCst);
    let consumer = api.consumer().build().unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(120), || seen.count() == 5).await;
    run.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn expired_iterator_resumes_after_the_last_record_read_not_the_checkpoint() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(20, 10);
    let shard = shard_name(0);
    let all = sequences(&kinesis, &shard);
    // No CheckpointLayer: the checkpoint never moves, so a resume from the checkpoint would
    // replay from the start.
    let consumer = builder(&kinesis).max_records_per_call(5).build().unwrap();
    let seen = Seen::default();
    let kinesis_in_handler = kinesis.clone();
    let seen_in_handler = seen.clone();
    let handler = service_fn(move |batch: Batch| {
        seen_in_handler.take(&batch);
        if seen_in_handler.count() == 10 {
            kinesis_in_handler.expire_iterators();
        }
        async { Ok::<_, BoxError>(()) }
    });
    let run = Running::start(&consumer, handler);
    wait_for(Duration::from_secs(30), || seen.count() >= 20).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.stop().await.unwrap();
    assert_eq!(seen.of(&shard), all, "every record exactly once, in order");
    let requests = kinesis.iterator_requests();
    assert_eq!(requests[0].1, IteratorPosition::TrimHorizon);
    assert!(
        requests[1..].iter().any(
            |(_, p)| matches!(p, IteratorPosition::AfterSequenceNumber(s) if all[9..].contains(s))
        ),
        "renewed after a record read, not at the (empty) checkpoint: {requests:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn expired_latest_iterator_before_any_record_is_anchored_in_time() {
    let kinesis = MemoryKinesis::with_shards(1);
    let consumer = builder(&kinesis)
        .start_position(StartPosition::Latest)
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(5), || {
        kinesis.get_records_calls(&shard_name(0)) > 0
    })
    .await;
    kinesis.expire_iterators();
    let put = kinesis.put(&shard_name(0), "k", "after the iterator was taken");
    wait_for(Duration::from_secs(5), || seen.count() == 1).await;
    run.stop().await.unwrap();
    assert_eq!(seen.of(&shard_name(0)), vec![put]);
    assert!(matches!(
        kinesis.iterator_requests()[1].1,
        IteratorPosition::AtTimestamp(_)
    ));
}

/// An expired LATEST iterator, renewed before any record was read, starts a margin before our
/// clock: a Kinesis clock behind ours does not skip the records put in between.
#[tokio::test(start_paused = true)]
async fn expired_latest_iterator_with_clock_skew_loses_nothing() {
    let kinesis = MemoryKinesis::with_shards(1);
    let mut api = FaultyKinesis::new(&kinesis);
    api.server_clock_behind = Duration::from_secs(2);
    let consumer = api
        .consumer()
        .start_position(StartPosition::Latest)
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(5), || {
        kinesis.get_records_calls(&shard_name(0)) > 0
    })
    .await;
    let put = kinesis.put(&shard_name(0), "k", "after the iterator was taken");
    kinesis.expire_iterators();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.count() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let delivered = seen.count() == 1;
    run.stop().await.unwrap();
    assert!(
        delivered,
        "record {put:?} put after the LATEST iterator was never delivered"
    );
}

#[tokio::test(start_paused = true)]
async fn missing_stream_ends_run_with_a_clear_error() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.delete_stream();
    let consumer = builder(&kinesis).build().unwrap();
    let err = consumer.run(Seen::default().handler()).await.unwrap_err();
    assert!(matches!(err, Error::StreamNotFound { .. }), "{err:?}");
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(
        message.contains("test-stream") && message.contains("create it"),
        "{message}"
    );
}

#[tokio::test(start_paused = true)]
async fn access_denied_ends_run_saying_which_permissions_to_grant() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.inject(
        None,
        Operation::ListShards,
        KinesisErrorKind::AccessDenied,
        1,
    );
    let consumer = builder(&kinesis).build().unwrap();
    let err = consumer.run(Seen::default().handler()).await.unwrap_err();
    assert!(matches!(&err, Error::AccessDenied { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("kinesis:GetRecords"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn unreachable_kinesis_at_start_is_an_error_but_later_listing_failures_are_not() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.inject(
        None,
        Operation::ListShards,
        KinesisErrorKind::Transient,
        1_000,
    );
    let consumer = builder(&kinesis).build().unwrap();
    let err = consumer.run(Seen::default().handler()).await.unwrap_err();
    assert!(
        matches!(&err, Error::Kinesis { shard: None, .. }),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(err.to_string().contains("ListShards"), "{err}");

    // Once the shards are known, a failing refresh leaves the readers alone.
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(10, 10);
    let consumer = builder(&kinesis)
        .shard_refresh_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(5), || seen.count() == 10).await;
    kinesis.inject(
        None,
        Operation::ListShards,
        KinesisErrorKind::Transient,
        1_000,
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    kinesis.put(&shard_name(0), "k", "still read");
    wait_for(Duration::from_secs(5), || seen.count() == 11).await;
    run.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shard_not_found_while_still_listed_ends_run_naming_the_shard() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(5, 10);
    let consumer = builder(&kinesis).build().unwrap();
    let seen = Seen::default();
    let kinesis_in_handler = kinesis.clone();
    let inner = seen.handler();
    let handler = tower::ServiceExt::map_request(inner, move |b: Batch| {
        if !b.is_empty() {
            kinesis_in_handler.inject(
                None,
                Operation::GetRecords,
                KinesisErrorKind::ResourceNotFound,
                1,
            );
        }
        b
    });
    let err = consumer.run(handler).await.unwrap_err();
    match &err {
        Error::ShardNotFound { shard, source, .. } => {
            assert_eq!(shard, &shard_name(0));
            assert_eq!(source.operation(), "GetRecords");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains(&shard_name(0)), "{err}");
    assert_eq!(seen.count(), 5);
}

#[tokio::test(start_paused = true)]
async fn stream_deleted_while_reading_ends_run_with_stream_not_found() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.fill(5, 10);
    let consumer = builder(&kinesis).build().unwrap();
    let seen = Seen::default();
    let kinesis_in_handler = kinesis.clone();
    let handler = tower::ServiceExt::map_request(seen.handler(), move |b: Batch| {
        if !b.is_empty() {
            kinesis_in_handler.delete_stream();
        }
        b
    });
    let err = consumer.run(handler).await.unwrap_err();
    assert!(matches!(&err, Error::StreamNotFound { .. }), "{err:?}");
    assert!(seen.count() >= 5);
}

#[tokio::test(start_paused = true)]
async fn handler_error_ends_run_keeps_its_checkpoint_and_flushes_others() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.fill(20, 10);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .max_records_per_call(10)
        .build()
        .unwrap();
    let bad_shard = shard_name(1);
    let calls = Arc::new(AtomicU64::new(0));
    let handler = {
        let (bad_shard, calls) = (bad_shard.clone(), calls.clone());
        service_fn(move |batch: Batch| {
            let fail = *batch.shard_id == *bad_shard
                && !batch.is_empty()
                && calls.fetch_add(1, Ordering::SeqCst) == 1;
            async move {
                if fail {
                    return Err::<(), BoxError>("cannot write to the warehouse".into());
                }
                tokio::task::yield_now().await;
                Ok(())
            }
        })
    };
    let service = CheckpointLayer::new(consumer.checkpointer()).layer(handler);
    let err = consumer.run(service).await.unwrap_err();
    let records = kinesis.records(&bad_shard);
    match &err {
        Error::Handler {
            shard,
            first_sequence_number,
            last_sequence_number,
            ..
        } => {
            assert_eq!(shard, &bad_shard);
            assert_eq!(
                first_sequence_number.as_deref(),
                Some(records[10].sequence_number.to_string().as_str())
            );
            assert_eq!(
                last_sequence_number.as_deref(),
                Some(records[19].sequence_number.to_string().as_str())
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("cannot write to the warehouse"));
    // The failed batch is not checkpointed; the batch before it is.
    assert_eq!(
        store.get(consumer.namespace(), &bad_shard).await.unwrap(),
        Some(records[9].checkpoint())
    );
}

/// A panic in a reader task (here in the KinesisApi implementation) ends the run with
/// `Error::Task` instead of leaving its shard silently unread.
#[tokio::test(start_paused = true)]
async fn a_panicking_reader_ends_run_instead_of_silently_stalling_its_shard() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.fill(5, 10);
    let mut api = FaultyKinesis::new(&kinesis);
    api.panics = Some(shard_name(1).into());
    let consumer = api.consumer().build().unwrap();
    let seen = Seen::default();
    let outcome =
        tokio::time::timeout(Duration::from_secs(600), consumer.run(seen.handler())).await;
    assert!(
        matches!(outcome, Ok(Err(Error::Task { .. }))),
        "after 600 s: {:?}; shard 1 handled {} of 5 records",
        outcome.map(|r| r.map_err(|e| e.to_string())),
        seen.of(&shard_name(1)).len()
    );
}
