//! Checkpoints/s through `CheckpointStore::set`, 64 shards written round-robin with ever
//! greater sequence numbers (every write advances), on one core (current-thread runtime).
//!
//! * `memory`: `MemoryStore`, the baseline measured in the same run.
//! * `redis`: `RedisStore` writing through (one Lua script call per checkpoint) to the local
//!   Redis (`REDIS_URL`, default `redis://127.0.0.1:6379/`).
//! * `dynamodb`: `DynamoDbStore` writing through (one conditional PutItem per checkpoint) to
//!   dynalite (`AWS_ENDPOINT_URL_DYNAMODB`, default `http://127.0.0.1:4568`): the emulator's
//!   speed, not DynamoDB's.
//! * `dynamodb_buffered`: the same behind `BufferedStore` (1 s interval), each sample ending
//!   with a `flush`, so the figure includes writing the 64 shards' last checkpoints.
//!
//! A back-end that is not reachable is skipped with a message.
//!
//! `source scripts/env.sh && cargo bench --bench checkpoint_stores --features redis,dynamodb`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kinesis_tower::layers::{CheckpointStore, MemoryStore};
use kinesis_tower::store::{DynamoDbStore, RedisStore};
use kinesis_tower::{Checkpoint, SequenceNumber};

const SHARDS: usize = 64;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Shard names, built once.
fn shards() -> Vec<String> {
    (0..SHARDS).map(|i| format!("shardId-{i:012}")).collect()
}

/// `iters` checkpoints round-robin over the shards, then a flush; the time they took.
async fn write(
    store: &dyn CheckpointStore,
    namespace: &str,
    shards: &[String],
    next: &AtomicU64,
    iters: u64,
) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let seq = SequenceNumber::parse(&format!("4959033827149025660855969253836157{n:022}"))
            .expect("valid sequence number");
        let shard = &shards[i as usize % shards.len()];
        store
            .set(namespace, shard, Checkpoint::at(seq))
            .await
            .expect("set");
    }
    store.flush().await.expect("flush");
    start.elapsed()
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

async fn redis_store(namespace: &str) -> Option<RedisStore> {
    match RedisStore::connect_with_prefix(&redis_url(), "kt-bench").await {
        Ok(store) => {
            store.delete_namespace(namespace).await.ok()?;
            Some(store)
        }
        Err(err) => {
            eprintln!("skipping redis: {err}");
            None
        }
    }
}

async fn dynamodb_store(table: &str) -> Option<DynamoDbStore> {
    if std::env::var_os("AWS_ENDPOINT_URL_DYNAMODB").is_none() {
        eprintln!(
            "skipping dynamodb: AWS_ENDPOINT_URL_DYNAMODB is not set (source scripts/env.sh)"
        );
        return None;
    }
    let config = aws_config::load_from_env().await;
    let store = DynamoDbStore::from_sdk_config(&config, table).ok()?;
    match store.create_table().await {
        Ok(()) => Some(store),
        Err(err) => {
            eprintln!("skipping dynamodb: {err}");
            None
        }
    }
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let shards = shards();
    let namespace = format!("bench/{}", std::process::id());
    let table = format!("kt-bench-{}", std::process::id());
    let next = AtomicU64::new(1);

    let mut stores: Vec<(&str, Arc<dyn CheckpointStore>)> =
        vec![("memory", Arc::new(MemoryStore::new()))];
    let redis = rt.block_on(redis_store(&namespace));
    if let Some(store) = &redis {
        stores.push(("redis", Arc::new(store.clone())));
    }
    let dynamodb = rt.block_on(dynamodb_store(&table));
    if let Some(store) = &dynamodb {
        stores.push(("dynamodb", Arc::new(store.clone())));
        stores.push(("dynamodb_buffered", Arc::new(store.clone().buffered())));
    }

    let mut group = c.benchmark_group("checkpoint_set_64_shards");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    for (name, store) in &stores {
        group.bench_function(*name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let store = store.clone();
                let (namespace, shards, next) = (&namespace, &shards, &next);
                async move { write(store.as_ref(), namespace, shards, next, iters).await }
            })
        });
    }
    group.finish();

    rt.block_on(async {
        if let Some(store) = &redis {
            let _ = store.delete_namespace(&namespace).await;
        }
        if let Some(store) = &dynamodb {
            let _ = store
                .client()
                .delete_table()
                .table_name(store.table())
                .send()
                .await;
        }
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
