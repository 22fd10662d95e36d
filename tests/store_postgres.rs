//! `PostgresStore` against the PostgreSQL server on 127.0.0.1:5432 (database `test`, user
//! `postgres`, trust auth; `KT_POSTGRES_URL` overrides). Each test works in its own table and
//! drops it.
#![cfg(feature = "postgres")]

mod common;
mod conformance;
mod sql_common;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::store::{PostgresStore, SetOutcome};
use kinesis_tower::{Batch, Checkpoint, Consumer, SequenceNumber, StartPosition};
use kinesis_tower::{BoxError, CheckpointStore, Processed};
use kinesis_tower_layers::testing::at;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tower::{service_fn, Layer};

use sql_common::{fresh, unique_table, SqlStore};

fn url() -> String {
    std::env::var("KT_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn pool_named(application_name: &str) -> PgPool {
    let options = PgConnectOptions::from_str(&url())
        .expect("KT_POSTGRES_URL parses")
        .application_name(application_name);
    PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (source scripts/env.sh; ensure_postgres)")
}

sql_common::sql_checks!(
    PostgresStore,
    db = sqlx::Postgres,
    quote = '"',
    unreachable = "postgres://postgres@127.0.0.1:1/test",
    pool = pool_named,
    columns = "SELECT sequence_number::text, sub_sequence_number::text, shard_end FROM {t} WHERE shard_id = $1"
);

#[tokio::test]
async fn schema_qualified_names_work() {
    let pool = pool_named("kt_names").await;
    let schema = unique_table("schema");
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
        .execute(&pool)
        .await
        .unwrap();
    // Quoted: the name is used exactly as given, mixed case included.
    let store = PostgresStore::from_pool(pool.clone(), &format!("{schema}.Checkpoints")).unwrap();
    store.create_table().await.unwrap();
    store.create_table().await.unwrap();
    store.set("ns", "s", at(7)).await.unwrap();
    let (n,): (i64,) = sqlx::query_as(&format!(
        "SELECT count(*) FROM \"{schema}\".\"Checkpoints\""
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(n, 1);
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_create_table_calls_all_succeed() {
    let store: PostgresStore = fresh("create_race").await;
    store.drop_table().await;
    let calls = (0..6).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.create_table().await })
    });
    for call in calls {
        call.await.unwrap().unwrap();
    }
    store.drop_table().await;
}

/// Ends every connection of the store's pool from another connection, as an administrator or
/// a server restart would.
async fn terminate_connections(admin: &PgPool, application_name: &str) -> u64 {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(application_name)
    .fetch_one(admin)
    .await
    .unwrap();
    n as u64
}

#[tokio::test]
async fn terminated_connections_are_replaced_and_writes_continue() {
    let store: PostgresStore = fresh("terminate").await;
    let admin = pool_named("kt_admin").await;
    store.set("ns", "s", at(1)).await.unwrap();
    for n in 2..10 {
        let killed = terminate_connections(&admin, store.table()).await;
        assert!(killed > 0, "the store had an open connection");
        assert_eq!(
            store.set("ns", "s", at(n)).await.unwrap(),
            SetOutcome::Advanced
        );
        assert_eq!(store.get("ns", "s").await.unwrap(), Some(at(n)));
    }
    store.drop_table().await;
}

/// A consumer run whose store connections are terminated over and over: the run goes on,
/// every record is handled, the stored checkpoint never moves backwards and ends at each
/// shard's last record.
#[tokio::test]
async fn consumer_run_survives_terminated_connections() {
    const SHARDS: i32 = 2;
    const RECORDS: usize = 2_000;
    let store: PostgresStore = fresh("run_terminate").await;
    let admin = pool_named("kt_admin").await;
    let kinesis = common::start_ferrokinesis().await;
    let stream = common::unique_stream_name("pg-terminate");
    common::create_stream(&kinesis.client, &stream, SHARDS).await;
    let records: Vec<(String, Vec<u8>)> = (0..RECORDS)
        .map(|i| (format!("pk-{i}"), format!("{i}").into_bytes()))
        .collect();
    let written = common::put_records(&kinesis.client, &stream, &records).await;
    let mut last: BTreeMap<String, SequenceNumber> = BTreeMap::new();
    for (shard, seq) in written {
        let seq: SequenceNumber = seq.parse().unwrap();
        let entry = last.entry(shard).or_insert(seq);
        *entry = (*entry).max(seq);
    }

    let consumer = Consumer::builder()
        .client(kinesis.client.clone())
        .stream_name(&stream)
        .app_name("pg-terminate")
        .start_position(StartPosition::TrimHorizon)
        .max_records_per_call(50)
        // Buffered, as a consumer normally uses it: flushes go through the terminations too.
        .store(
            store
                .clone()
                .buffered()
                .flush_interval(Duration::from_millis(100)),
        )
        .build()
        .unwrap();
    let namespace = consumer.namespace().to_owned();
    let handled = Arc::new(AtomicUsize::new(0));
    let handler = service_fn({
        let handled = handled.clone();
        move |batch: Batch| {
            handled.fetch_add(batch.len(), Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok::<_, BoxError>(())
            }
        }
    });
    let service = CheckpointLayer::new(consumer.checkpointer()).layer(handler);

    // Terminates the store's connections every 30 ms and watches the stored checkpoints
    // through another handle: none may ever move backwards.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn({
        let done = done.clone();
        let observer = PostgresStore::from_pool(admin.clone(), store.table()).unwrap();
        let table = store.table().to_owned();
        let namespace = namespace.clone();
        async move {
            let mut seen: BTreeMap<String, Checkpoint> = BTreeMap::new();
            let mut terminated = 0;
            while !done.load(Ordering::SeqCst) {
                terminated += terminate_connections(&admin, &table).await;
                for (shard, checkpoint) in observer.list(&namespace).await.unwrap() {
                    if let Some(before) = seen.insert(shard.clone(), checkpoint) {
                        assert!(
                            checkpoint >= before,
                            "checkpoint of {shard} went back from {before} to {checkpoint}"
                        );
                    }
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            terminated
        }
    });
    let stop = {
        let handled = handled.clone();
        async move {
            while handled.load(Ordering::SeqCst) < RECORDS {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), consumer.run_until(service, stop))
        .await
        .expect("the run ends once every record is handled")
        .expect("the run survives terminated store connections");
    done.store(true, Ordering::SeqCst);
    let terminated = watcher.await.unwrap();
    assert!(terminated > 0, "connections were terminated during the run");
    assert_eq!(handled.load(Ordering::SeqCst), RECORDS);
    for (shard, seq) in &last {
        assert_eq!(
            store.get(&namespace, shard).await.unwrap(),
            Some(Checkpoint::at(*seq)),
            "{shard}"
        );
    }
    common::delete_stream(&kinesis.client, &stream).await;
    store.drop_table().await;
}

/// A handler that writes its output and its checkpoint in one transaction answers
/// `SkipCheckpoint`; the shard's end is still recorded by the consumer.
#[tokio::test]
async fn handler_transactions_with_skip_checkpoint_resume_without_duplicates() {
    const RECORDS: usize = 300;
    let store: PostgresStore = fresh("tx_handler").await;
    let sink = format!("{}_sink", store.table());
    sqlx::query(&format!(
        "CREATE TABLE \"{sink}\" (shard_id TEXT, sequence_number NUMERIC(128,0), PRIMARY KEY (shard_id, sequence_number))"
    ))
    .execute(store.pool())
    .await
    .unwrap();
    let kinesis = common::start_ferrokinesis().await;
    let stream = common::unique_stream_name("pg-tx");
    common::create_stream(&kinesis.client, &stream, 2).await;
    let records: Vec<(String, Vec<u8>)> = (0..RECORDS)
        .map(|i| (format!("pk-{i}"), b"x".to_vec()))
        .collect();
    common::put_records(&kinesis.client, &stream, &records[..RECORDS / 2]).await;

    let run = |stop_after: usize| {
        let store = store.clone();
        let sink = sink.clone();
        let client = kinesis.client.clone();
        let stream = stream.clone();
        async move {
            let consumer = Consumer::builder()
                .client(client)
                .stream_name(&stream)
                .app_name("pg-tx")
                .start_position(StartPosition::TrimHorizon)
                .max_records_per_call(20)
                .store(store.clone())
                .build()
                .unwrap();
            let namespace = consumer.namespace().to_owned();
            let inserted = Arc::new(Mutex::new(0usize));
            let handler = service_fn({
                let inserted = inserted.clone();
                move |batch: Batch| {
                    let (store, sink, namespace, inserted) = (
                        store.clone(),
                        sink.clone(),
                        namespace.clone(),
                        inserted.clone(),
                    );
                    async move {
                        let mut tx = store.pool().begin().await?;
                        for record in &batch.records {
                            sqlx::query(&format!(
                                "INSERT INTO \"{sink}\" VALUES ($1, $2::numeric)"
                            ))
                            .bind(&*record.shard_id)
                            .bind(record.sequence_number.to_string())
                            .execute(&mut *tx)
                            .await?;
                        }
                        if let Some(checkpoint) = batch.checkpoint() {
                            store
                                .set_in(&mut tx, &namespace, &batch.shard_id, checkpoint)
                                .await?;
                        }
                        tx.commit().await?;
                        *inserted.lock().unwrap() += batch.len();
                        Ok::<_, BoxError>(Processed::SkipCheckpoint)
                    }
                }
            });
            let service = CheckpointLayer::new(consumer.checkpointer()).layer(handler);
            let stop = {
                let inserted = inserted.clone();
                async move {
                    while *inserted.lock().unwrap() < stop_after {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(60), consumer.run_until(service, stop))
                .await
                .unwrap()
                .unwrap();
        }
    };
    run(RECORDS / 2).await;
    common::put_records(&kinesis.client, &stream, &records[RECORDS / 2..]).await;
    run(RECORDS / 2).await;
    let (rows,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM \"{sink}\""))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(
        rows as usize, RECORDS,
        "every record once (the primary key refuses twice)"
    );
    sqlx::query(&format!("DROP TABLE \"{sink}\""))
        .execute(store.pool())
        .await
        .unwrap();
    common::delete_stream(&kinesis.client, &stream).await;
    store.drop_table().await;
}
