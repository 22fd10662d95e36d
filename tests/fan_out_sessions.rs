//! Enhanced fan-out against a real server that ends its subscriptions: the embedded
//! ferrokinesis on 127.0.0.1 with a SubscribeToShard session of 1 second (Kinesis's is 5
//! minutes), while a producer puts records for several seconds. Every record must come once,
//! in shard order, across many subscriptions; a second run on the same store resumes after the
//! checkpoints and delivers only what was put since.
//!
//! ferrokinesis 0.7 answers a subscription at `AFTER_SEQUENCE_NUMBER` from the start of the
//! shard: the reader must drop what it delivered already (kinesis-mock and Kinesis start
//! where asked).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kinesis_tower::store::MemoryStore;
use kinesis_tower::{service_fn, Batch, BoxError, Consumer, SequenceNumber, StartPosition};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SHARDS: i32 = 2;

type Seen = Arc<Mutex<Vec<(String, SequenceNumber)>>>;

fn recorder(
    seen: &Seen,
) -> impl tower::Service<Batch, Response = (), Error = BoxError, Future = impl Send> + Clone {
    let seen = seen.clone();
    service_fn(move |batch: Batch| {
        let mut seen = seen.lock().unwrap();
        for record in &batch.records {
            seen.push((record.shard_id.to_string(), record.sequence_number));
        }
        async { Ok::<_, BoxError>(()) }
    })
}

/// Per shard, in put order.
fn by_shard(records: &[(String, SequenceNumber)]) -> HashMap<String, Vec<SequenceNumber>> {
    let mut shards: HashMap<String, Vec<SequenceNumber>> = HashMap::new();
    for (shard, seq) in records {
        shards.entry(shard.clone()).or_default().push(*seq);
    }
    shards
}

async fn wait_for(seen: &Seen, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().len() < count {
        assert!(
            Instant::now() < deadline,
            "{} of {count} records after 60 s",
            seen.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A duplicate would come in now.
    tokio::time::sleep(Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_ended_by_the_server_lose_nothing_and_repeat_nothing() {
    // RUST_LOG=kinesis_tower=debug shows each subscription and where it starts.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let kinesis = common::start_ferrokinesis_with(|options| ferrokinesis::store::StoreOptions {
        subscribe_to_shard_session_ms: 1_000,
        ..options
    })
    .await;
    let client = kinesis.client.clone();
    let stream = common::unique_stream_name("fan-out-sessions");
    common::create_stream(&client, &stream, SHARDS).await;
    let store = Arc::new(MemoryStore::new());
    let consumer = || {
        Consumer::builder()
            .client(client.clone())
            .stream_name(&stream)
            .app_name("sessions")
            .start_position(StartPosition::TrimHorizon)
            .store_arc(store.clone())
            .enhanced_fan_out("sessions")
            .build()
            .expect("valid configuration")
    };

    // The first run reads while the producer puts, for 4 s or more: at least four sessions.
    let seen: Seen = Arc::default();
    let stop = CancellationToken::new();
    let run =
        tokio::spawn(consumer().process_until(recorder(&seen), stop.clone().cancelled_owned()));
    let mut put = Vec::new();
    for round in 0..40 {
        let records: Vec<(String, Vec<u8>)> = (0..20)
            .map(|i| (format!("key-{i}"), format!("{round}-{i}").into_bytes()))
            .collect();
        put.extend(common::put_records(&client, &stream, &records).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for(&seen, put.len()).await;
    stop.cancel();
    run.await.unwrap().unwrap();
    let put: Vec<(String, SequenceNumber)> = put
        .into_iter()
        .map(|(shard, seq)| (shard, seq.parse().unwrap()))
        .collect();
    let want = by_shard(&put);
    assert_eq!(want.len(), SHARDS as usize);
    assert_eq!(
        by_shard(&seen.lock().unwrap()),
        want,
        "once each, in shard order"
    );

    // A second run resumes after the checkpoints: only what was put since comes.
    let records: Vec<(String, Vec<u8>)> = (0..50)
        .map(|i| (format!("key-{i}"), format!("after-{i}").into_bytes()))
        .collect();
    let after: Vec<(String, SequenceNumber)> = common::put_records(&client, &stream, &records)
        .await
        .into_iter()
        .map(|(shard, seq)| (shard, seq.parse().unwrap()))
        .collect();
    let seen_again: Seen = Arc::default();
    let stop = CancellationToken::new();
    let run = tokio::spawn(
        consumer().process_until(recorder(&seen_again), stop.clone().cancelled_owned()),
    );
    wait_for(&seen_again, after.len()).await;
    stop.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(by_shard(&seen_again.lock().unwrap()), by_shard(&after));
    common::delete_stream(&client, &stream).await;
}
