//! What a consumer group costs its lease table at steady state: two workers with the default
//! settings share a 10-shard stream (embedded emulator on 127.0.0.1) with records arriving on
//! every shard, leases in DynamoDB (dynalite, `AWS_ENDPOINT_URL_DYNAMODB`, default
//! `http://127.0.0.1:4568`). Every lease-table request of both workers is counted, by kind,
//! over a window after the shards are split 5/5, and printed per minute.
//!
//! `cargo bench --bench group_requests --features dynamodb,postgres` (`WINDOW_SECS`, default 60)

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kinesis_tower::group::{ConsumerGroup, DynamoDbLeases, Lease, LeaseBackend, LeaseError};
use kinesis_tower::{service_fn, Batch, BoxError, Checkpoint, Consumer, StartPosition};

const KINDS: [&str; 8] = [
    "list (Scan)",
    "create",
    "claim",
    "renew",
    "checkpoint",
    "release",
    "request handoff",
    "withdraw handoff",
];

/// Counts each request by kind, then forwards it.
struct Counting {
    inner: DynamoDbLeases,
    counts: Arc<[AtomicU64; 8]>,
}

impl Counting {
    fn count(&self, kind: usize) {
        self.counts[kind].fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl LeaseBackend for Counting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    async fn list(&self) -> Result<Vec<Lease>, LeaseError> {
        self.count(0);
        self.inner.list().await
    }
    async fn create(&self, lease: &Lease) -> Result<(), LeaseError> {
        self.count(1);
        self.inner.create(lease).await
    }
    async fn claim(&self, seen: &Lease, worker: &str) -> Result<Option<Lease>, LeaseError> {
        self.count(2);
        self.inner.claim(seen, worker).await
    }
    async fn renew(&self, key: &str, worker: &str, counter: u64) -> Result<bool, LeaseError> {
        self.count(3);
        self.inner.renew(key, worker, counter).await
    }
    async fn checkpoint(
        &self,
        key: &str,
        worker: &str,
        counter: u64,
        checkpoint: Checkpoint,
    ) -> Result<bool, LeaseError> {
        self.count(4);
        self.inner
            .checkpoint(key, worker, counter, checkpoint)
            .await
    }
    async fn release(
        &self,
        key: &str,
        worker: &str,
        counter: u64,
        to: Option<&str>,
    ) -> Result<bool, LeaseError> {
        self.count(5);
        self.inner.release(key, worker, counter, to).await
    }
    async fn request_handoff(
        &self,
        key: &str,
        owner: &str,
        worker: &str,
    ) -> Result<bool, LeaseError> {
        self.count(6);
        self.inner.request_handoff(key, owner, worker).await
    }
    async fn withdraw_handoff(&self, key: &str, worker: &str) -> Result<bool, LeaseError> {
        self.count(7);
        self.inner.withdraw_handoff(key, worker).await
    }
}

fn main() {
    let window = Duration::from_secs(
        std::env::var("WINDOW_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let kinesis = common::start_ferrokinesis().await;
        let stream = common::unique_stream_name("group-requests");
        common::create_stream(&kinesis.client, &stream, 10).await;
        common::wait_for_stream_active(&kinesis.client, &stream, Duration::from_secs(10)).await;
        let dynamodb = common::dynamodb_client().await;
        let table = common::unique_stream_name("kt-group-requests");
        let leases = DynamoDbLeases::new(dynamodb.clone(), &table).unwrap();
        leases.create_table().await.unwrap();

        let counts: Arc<[AtomicU64; 8]> = Arc::new(Default::default());
        let handled = Arc::new(AtomicU64::new(0));
        let mut groups = Vec::new();
        let mut runs = Vec::new();
        for name in ["a", "b"] {
            let group = ConsumerGroup::builder(
                Counting {
                    inner: leases.clone(),
                    counts: counts.clone(),
                },
                name,
            )
            .build()
            .unwrap();
            groups.push(group.clone());
            let consumer = Consumer::builder()
                .client(kinesis.client.clone())
                .stream_name(&stream)
                .start_position(StartPosition::TrimHorizon)
                .group(group)
                .build()
                .unwrap();
            let handled = handled.clone();
            let handler = service_fn(move |batch: Batch| {
                handled.fetch_add(batch.records.len() as u64, Ordering::Relaxed);
                async { Ok::<_, BoxError>(()) }
            });
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            runs.push((
                stop,
                tokio::spawn(async move {
                    consumer
                        .process_until(handler, async {
                            let _ = stopped.await;
                        })
                        .await
                }),
            ));
        }
        // A record on every shard every 100 ms.
        let producing = Arc::new(AtomicBool::new(true));
        let producer = tokio::spawn({
            let (client, stream, producing) =
                (kinesis.client.clone(), stream.clone(), producing.clone());
            async move {
                let shards = common::list_all_shards(&client, &stream).await;
                while producing.load(Ordering::SeqCst) {
                    for shard in &shards {
                        let key = shard.hash_key_range().unwrap().starting_hash_key();
                        let _ = client
                            .put_record()
                            .stream_name(&stream)
                            .partition_key("k")
                            .explicit_hash_key(key)
                            .data(aws_sdk_kinesis::primitives::Blob::new("x"))
                            .send()
                            .await;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let start = Instant::now();
        while !(groups[0].held().len() == 5 && groups[1].held().len() == 5) {
            assert!(start.elapsed() < Duration::from_secs(60), "never 5/5");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Settle, then count over the window.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let before: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let handled_before = handled.load(Ordering::Relaxed);
        tokio::time::sleep(window).await;
        let after: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let records = handled.load(Ordering::Relaxed) - handled_before;
        let per_minute = |n: u64| n as f64 * 60.0 / window.as_secs_f64();
        let total: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
        println!(
            "group_requests: 10 shards, 2 workers, default settings, {window:?} window, {records} records handled"
        );
        for (kind, (a, b)) in KINDS.iter().zip(after.iter().zip(&before)) {
            println!("  {kind:<16} {:>8.1} / min", per_minute(a - b));
        }
        println!("  {:<16} {:>8.1} / min", "total", per_minute(total));
        producing.store(false, Ordering::SeqCst);
        producer.await.unwrap();
        for (stop, run) in runs {
            let _ = stop.send(());
            run.await.unwrap().unwrap();
        }
        let _ = dynamodb.delete_table().table_name(&table).send().await;
        common::delete_stream(&kinesis.client, &stream).await;
    });
}
