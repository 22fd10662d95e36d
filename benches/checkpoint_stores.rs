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
//! * `postgres`, `mysql`: `PostgresStore` / `MySqlStore` writing through (one guarded upsert /
//!   update per checkpoint) to the local servers (`KT_POSTGRES_URL`, `KT_MYSQL_URL`; defaults
//!   the test servers), in a table of their own that is dropped afterwards.
//! * `postgres_buffered`, `mysql_buffered`: the same behind `BufferedStore`, as the consumer
//!   uses them, each sample ending with a `flush`.
//!
//! A back-end that is not reachable is skipped with a message.
//!
//! `source scripts/env.sh && cargo bench --bench checkpoint_stores --all-features`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kinesis_tower::store::MemoryStore;
use kinesis_tower::store::{DynamoDbStore, MySqlStore, PostgresStore, RedisStore};
use kinesis_tower::CheckpointStore;
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

async fn postgres_store(table: &str) -> Option<PostgresStore> {
    let url = std::env::var("KT_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    PostgresStore::connect_with_table(&url, table)
        .await
        .map_err(|err| eprintln!("skipping postgres: {err}"))
        .ok()
}

async fn mysql_store(table: &str) -> Option<MySqlStore> {
    let url = std::env::var("KT_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned());
    MySqlStore::connect_with_table(&url, table)
        .await
        .map_err(|err| eprintln!("skipping mysql: {err}"))
        .ok()
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
    let sql_table = format!("kt_bench_{}", std::process::id());
    let postgres = rt.block_on(postgres_store(&sql_table));
    if let Some(store) = &postgres {
        stores.push(("postgres", Arc::new(store.clone())));
        stores.push(("postgres_buffered", Arc::new(store.clone().buffered())));
    }
    let mysql = rt.block_on(mysql_store(&sql_table));
    if let Some(store) = &mysql {
        stores.push(("mysql", Arc::new(store.clone())));
        stores.push(("mysql_buffered", Arc::new(store.clone().buffered())));
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
        if let Some(store) = &postgres {
            let drop = format!("DROP TABLE IF EXISTS \"{}\"", store.table());
            let _ = sqlx::query(&drop).execute(store.pool()).await;
        }
        if let Some(store) = &mysql {
            let drop = format!("DROP TABLE IF EXISTS `{}`", store.table());
            let _ = sqlx::query(&drop).execute(store.pool()).await;
        }
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
