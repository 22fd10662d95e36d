//! Restarting inside a KPL aggregate, end to end against kinesis-mock (127.0.0.1:4570; start it
//! with `source scripts/env.sh && ensure_kinesis_mock`).
//!
//! Five aggregates of 100 user records are put on a one-shard stream. The first run (Checkpoint
//! outside Deaggregate) checkpoints user record 37 of the third aggregate, `(sequence, 37)`,
//! and fails on the next batch, so nothing later is checkpointed. A second consumer on the same
//! store must deliver user record 38 of that aggregate first, then everything after it, once;
//! read by polling, and through enhanced fan-out.

mod common;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::Client;
use futures::FutureExt;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::kpl::Aggregator;
use kinesis_tower::kpl::DeaggregateLayer;
use kinesis_tower::store::MemoryStore;
use kinesis_tower::{Batch, Checkpoint, Consumer, EnhancedFanOut, StartPosition};
use kinesis_tower::{BoxError, CheckpointStore, Processed};
use tokio::time::Instant;
use tower::{service_fn, ServiceBuilder};

const AGGREGATES: usize = 5;
const USER_RECORDS: usize = 100;
/// The aggregate the first run stops in, and the last user record it checkpoints.
const STOP_AGGREGATE: usize = 2;
const STOP_AFTER: u64 = 37;
const DEADLINE: Duration = Duration::from_secs(120);

async fn with_stream<F, Fut>(body: F)
where
    F: FnOnce(Client, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let client = common::kinesis_mock_client().await;
    let stream = common::unique_stream_name("kpl-resume");
    common::create_stream(&client, &stream, 1).await;
    let outcome = AssertUnwindSafe(body(client.clone(), stream.clone()))
        .catch_unwind()
        .await;
    common::delete_stream(&client, &stream).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn consumer(client: &Client, stream: &str, store: &Arc<MemoryStore>, fan_out: bool) -> Consumer {
    let builder = if fan_out {
        Consumer::builder()
            .enhanced_fan_out(EnhancedFanOut::new("kpl-resume").deregister_on_shutdown(true))
    } else {
        Consumer::builder()
    };
    builder
        .client(client.clone())
        .stream_name(stream)
        .app_name("kpl-resume")
        .start_position(StartPosition::TrimHorizon)
        .store_arc(store.clone())
        // One aggregate per batch: the stop is exact.
        .max_records_per_call(1)
        .poll_interval(Duration::from_millis(100))
        .build()
        .expect("valid configuration")
}

/// What a handler saw: (data, sequence number, sub-sequence number) per user record.
type Seen = Arc<Mutex<Vec<(String, String, Option<u64>)>>>;

fn record_batch(seen: &Seen, batch: &Batch) {
    seen.lock().unwrap().extend(batch.records.iter().map(|r| {
        (
            String::from_utf8_lossy(&r.data).into_owned(),
            r.sequence_number.to_string(),
            r.sub_sequence_number,
        )
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_inside_an_aggregate_delivers_the_next_user_record() {
    restart_inside_an_aggregate(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_inside_an_aggregate_delivers_the_next_user_record_over_fan_out() {
    restart_inside_an_aggregate(true).await;
}

async fn restart_inside_an_aggregate(fan_out: bool) {
    with_stream(|client, stream| async move {
        let mut aggregates = Vec::new();
        for a in 0..AGGREGATES {
            let mut aggregator = Aggregator::new();
            for u in 0..USER_RECORDS {
                let added = aggregator.add(&format!("pk-{}", u % 10), None, format!("a{a}-u{u}"));
                assert!(added.unwrap().is_none());
            }
            let aggregate = aggregator.finish().unwrap();
            aggregates.push((aggregate.partition_key, aggregate.data.to_vec()));
        }
        let put = common::put_records(&client, &stream, &aggregates).await;
        let stop_sequence: kinesis_tower::SequenceNumber = put[STOP_AGGREGATE].1.parse().unwrap();
        let store = Arc::new(MemoryStore::new());

        // First run: checkpoint at user record 37 of the third aggregate, then fail.
        let first = consumer(&client, &stream, &store, fan_out);
        let seen_first: Seen = Arc::default();
        let handler = {
            let seen = seen_first.clone();
            service_fn(move |batch: Batch| {
                let stop_here = batch
                    .records
                    .first()
                    .is_some_and(|r| r.sequence_number == stop_sequence);
                let already_stopped = seen
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|(data, ..)| data == &format!("a{STOP_AGGREGATE}-u0"));
                let answer = if already_stopped && !batch.is_empty() {
                    Err::<Processed, BoxError>("the first run stops here".into())
                } else if stop_here {
                    let at = batch.records[STOP_AFTER as usize].checkpoint();
                    Ok(Processed::CheckpointAt(at))
                } else {
                    Ok(Processed::Checkpoint)
                };
                if answer.is_ok() {
                    record_batch(&seen, &batch);
                }
                async move { answer }
            })
        };
        let service = ServiceBuilder::new()
            .layer(CheckpointLayer::new(first.checkpointer()))
            .layer(DeaggregateLayer::new())
            .service(handler);
        let result = tokio::time::timeout(DEADLINE, first.run(service))
            .await
            .expect("the first run ends");
        let error = result.expect_err("the first run ends with the handler's error");
        assert!(
            format!("{error:?}").contains("the first run stops here"),
            "{error:?}"
        );
        let stored = store
            .get(first.namespace(), "shardId-000000000000")
            .await
            .unwrap();
        assert_eq!(
            stored,
            Some(Checkpoint::Sequence {
                sequence_number: stop_sequence,
                sub_sequence_number: Some(STOP_AFTER),
            })
        );
        assert_eq!(
            seen_first.lock().unwrap().len(),
            (STOP_AGGREGATE + 1) * USER_RECORDS
        );

        // Second run, a new consumer on the same store.
        let second = consumer(&client, &stream, &store, fan_out);
        let seen: Seen = Arc::default();
        let handler = {
            let seen = seen.clone();
            service_fn(move |batch: Batch| {
                record_batch(&seen, &batch);
                async { Ok::<_, BoxError>(()) }
            })
        };
        let service = ServiceBuilder::new()
            .layer(CheckpointLayer::new(second.checkpointer()))
            .layer(DeaggregateLayer::new())
            .service(handler);
        let stop = tokio_util::sync::CancellationToken::new();
        let run = tokio::spawn(second.run_until(service, stop.clone().cancelled_owned()));
        let expected: Vec<String> = (STOP_AFTER as usize + 1..USER_RECORDS)
            .map(|u| format!("a{STOP_AGGREGATE}-u{u}"))
            .chain(
                (STOP_AGGREGATE + 1..AGGREGATES)
                    .flat_map(|a| (0..USER_RECORDS).map(move |u| format!("a{a}-u{u}"))),
            )
            .collect();
        let deadline = Instant::now() + DEADLINE;
        while seen.lock().unwrap().len() < expected.len() {
            assert!(
                Instant::now() < deadline,
                "only {} of {} user records delivered",
                seen.lock().unwrap().len(),
                expected.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let anything extra (a repeat) arrive before looking.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.cancel();
        run.await.unwrap().unwrap();

        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen[0],
            (
                format!("a{STOP_AGGREGATE}-u{}", STOP_AFTER + 1),
                stop_sequence.to_string(),
                Some(STOP_AFTER + 1)
            ),
            "the next user record after the checkpoint comes first"
        );
        let data: Vec<&String> = seen.iter().map(|(d, ..)| d).collect();
        assert_eq!(
            data,
            expected.iter().collect::<Vec<_>>(),
            "nothing missing or repeated"
        );
        // The checkpoint covers the last user record (the whole last aggregate).
        let last = put.last().unwrap().1.parse().unwrap();
        let stored = store
            .get(second.namespace(), "shardId-000000000000")
            .await
            .unwrap()
            .expect("a checkpoint");
        assert!(
            stored
                >= Checkpoint::Sequence {
                    sequence_number: last,
                    sub_sequence_number: Some(USER_RECORDS as u64 - 1),
                },
            "{stored:?}"
        );
    })
    .await;
}
