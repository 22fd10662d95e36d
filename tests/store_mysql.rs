//! `MySqlStore` against the MariaDB server on 127.0.0.1:3306 (user `root`, empty password,
//! database `test`; `KT_MYSQL_URL` overrides). Each test works in its own table and drops it.
#![cfg(feature = "mysql")]

mod conformance;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kinesis_tower::layers::CheckpointStore;
use kinesis_tower::store::{MySqlStore, SetOutcome, StoreError};
use kinesis_tower::Checkpoint;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};

fn url() -> String {
    std::env::var("KT_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

/// A table name no other test (or test process) uses.
fn unique_table(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "kt_{prefix}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        fastrand::u32(..)
    )
}

async fn pool() -> MySqlPool {
    MySqlPoolOptions::new()
        .max_connections(4)
        .connect(&url())
        .await
        .expect("MariaDB on 127.0.0.1:3306 (source scripts/env.sh; ensure_mariadb)")
}

async fn fresh_store(prefix: &str) -> MySqlStore {
    let store = MySqlStore::from_pool(pool().await, &unique_table(prefix)).unwrap();
    store.create_table().await.unwrap();
    store
}

async fn drop_table(store: &MySqlStore) {
    sqlx::query(&format!("DROP TABLE IF EXISTS `{}`", store.table()))
        .execute(store.pool())
        .await
        .unwrap();
}

/// A handle on the table named after the check's scope (created on first use).
async fn scoped(scope: &str) -> MySqlStore {
    let store = MySqlStore::from_pool(pool().await, scope).unwrap();
    store.create_table().await.unwrap();
    store
}

async fn drop_scope(scope: &str) {
    drop_table(&scoped(scope).await).await;
}

conformance::suite!(
    write_through,
    make =
        |scope: String| async move { Arc::new(scoped(&scope).await) as Arc<dyn CheckpointStore> },
    cleanup = |scope: String| async move { drop_scope(&scope).await },
);

conformance::suite!(
    buffered,
    make = |scope: String| async move {
        // Only explicit flushes write, which is what the suite checks.
        let store = scoped(&scope)
            .await
            .buffered()
            .flush_interval(Duration::from_secs(3600));
        Arc::new(store) as Arc<dyn CheckpointStore>
    },
    cleanup = |scope: String| async move { drop_scope(&scope).await },
);

fn at(seq: &str, sub: Option<u64>) -> Checkpoint {
    Checkpoint::Sequence {
        sequence_number: seq.parse().unwrap(),
        sub_sequence_number: sub,
    }
}

/// What the conformance suite does not look at: a new row right after a refusal on the same
/// connection is still an insert, the informational columns hold the whole value, and keys
/// are case-sensitive and sort bytewise.
#[tokio::test]
async fn outcomes_columns_and_bytewise_keys() {
    // One connection: every statement runs on the same session.
    let single = MySqlPoolOptions::new()
        .max_connections(1)
        .connect(&url())
        .await
        .unwrap();
    let store = MySqlStore::from_pool(single, &unique_table("columns")).unwrap();
    store.create_table().await.unwrap();
    store.set("app/s", "shard-1", at("5", None)).await.unwrap();
    assert_eq!(
        store.set("app/s", "shard-1", at("5", None)).await.unwrap(),
        SetOutcome::NotAdvanced
    );
    assert_eq!(
        store.set("app/s", "shard-2", at("1", None)).await.unwrap(),
        SetOutcome::Advanced
    );
    let big = "9".repeat(128);
    store
        .set("app/s", "shard-1", at(&big, Some(u64::MAX)))
        .await
        .unwrap();
    let columns = |store: &MySqlStore| {
        let sql = format!(
            "SELECT sequence_number, sub_sequence_number, shard_end FROM `{}` WHERE shard_id = 'shard-1'",
            store.table()
        );
        let pool = store.pool().clone();
        async move {
            sqlx::query_as::<_, (Option<String>, Option<u64>, bool)>(&sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        columns(&store).await,
        (Some(big.clone()), Some(u64::MAX), false)
    );
    store
        .set("app/s", "shard-1", Checkpoint::ShardEnd)
        .await
        .unwrap();
    assert_eq!(columns(&store).await, (None, None, true));
    for shard in ["b", "B", "a"] {
        store.set("other/s", shard, at("1", None)).await.unwrap();
    }
    let shards: Vec<String> = store
        .list("other/s")
        .await
        .unwrap()
        .into_iter()
        .map(|(shard, _)| shard)
        .collect();
    assert_eq!(shards, ["B", "a", "b"]);
    assert_eq!(store.get("OTHER/s", "b").await.unwrap(), None);
    drop_table(&store).await;
}

/// Writers racing on shards without a row: the losers of the insert fall back to the guarded
/// update, and the greatest checkpoint wins.
#[tokio::test]
async fn racing_first_writes_keep_the_greatest() {
    let store = fresh_store("race").await;
    for shard in 0..5 {
        let shard = format!("shard-{shard}");
        let writers: Vec<_> = (1..=12u32)
            .map(|n| {
                let (store, shard) = (store.clone(), shard.clone());
                tokio::spawn(async move { store.set("ns", &shard, at(&n.to_string(), None)).await })
            })
            .collect();
        let mut advanced = 0;
        for writer in writers {
            if writer.await.unwrap().unwrap() == SetOutcome::Advanced {
                advanced += 1;
            }
        }
        assert!(advanced >= 1);
        assert_eq!(store.get("ns", &shard).await.unwrap(), Some(at("12", None)));
    }
    drop_table(&store).await;
}

#[tokio::test]
async fn invalid_table_names_are_rejected_and_database_qualified_names_work() {
    let pool = pool().await;
    for bad in [
        "",
        "x; DROP TABLE y",
        "1abc",
        "a-b",
        "a`b",
        "a.b.c",
        &"a".repeat(64),
    ] {
        let err = MySqlStore::from_pool(pool.clone(), bad).unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidName { .. }),
            "{bad}: {err}"
        );
    }
    let table = format!("test.{}", unique_table("qualified"));
    let store = MySqlStore::connect_with_table(&url(), &table)
        .await
        .unwrap();
    store.create_table().await.unwrap();
    store.set("ns", "s", at("7", None)).await.unwrap();
    assert_eq!(store.get("ns", "s").await.unwrap(), Some(at("7", None)));
    sqlx::query(&format!(
        "DROP TABLE `test`.`{}`",
        table.trim_start_matches("test.")
    ))
    .execute(&pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn failures_are_errors_never_missing_checkpoints() {
    let store = MySqlStore::from_pool(pool().await, &unique_table("missing")).unwrap();
    let err = store.get("ns", "s").await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Backend {
                retryable: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(store.set("ns", "s", at("1", None)).await.is_err());

    let unreachable = MySqlPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("mysql://root@127.0.0.1:1/test")
        .unwrap();
    let store = MySqlStore::from_pool(unreachable, "kinesis_checkpoints").unwrap();
    let err = store.get("ns", "s").await.unwrap_err();
    assert!(err.is_retryable(), "{err}");

    let store = fresh_store("corrupt").await;
    sqlx::query(&format!(
        "INSERT INTO `{}` (namespace, shard_id, sort_key) VALUES ('n', 's', 'garbage')",
        store.table()
    ))
    .execute(store.pool())
    .await
    .unwrap();
    let err = store.get("n", "s").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    drop_table(&store).await;
}

/// A connection killed by the server (`KILL`) is replaced and writes go on.
#[tokio::test]
async fn killed_connections_are_replaced_and_writes_continue() {
    // One connection in the store's pool, so the one to kill is known.
    let single = MySqlPoolOptions::new()
        .max_connections(1)
        .connect(&url())
        .await
        .unwrap();
    let store = MySqlStore::from_pool(single, &unique_table("kill")).unwrap();
    store.create_table().await.unwrap();
    let admin = pool().await;
    store.set("ns", "s", at("1", None)).await.unwrap();
    for n in 2..8u32 {
        let (id,): (u64,) = sqlx::query_as("SELECT CONNECTION_ID()")
            .fetch_one(store.pool())
            .await
            .unwrap();
        sqlx::query(&format!("KILL {id}"))
            .execute(&admin)
            .await
            .unwrap();
        assert_eq!(
            store
                .set("ns", "s", at(&n.to_string(), None))
                .await
                .unwrap(),
            SetOutcome::Advanced
        );
    }
    assert_eq!(store.get("ns", "s").await.unwrap(), Some(at("7", None)));
    drop_table(&store).await;
}

#[tokio::test]
async fn set_in_commits_and_rolls_back_with_the_transaction() {
    let store = fresh_store("set_in").await;
    let mut tx = store.pool().begin().await.unwrap();
    assert_eq!(
        store
            .set_in(&mut tx, "ns", "s", at("10", None))
            .await
            .unwrap(),
        SetOutcome::Advanced
    );
    assert_eq!(
        store.get_in(&mut tx, "ns", "s").await.unwrap(),
        Some(at("10", None))
    );
    tx.rollback().await.unwrap();
    assert_eq!(store.get("ns", "s").await.unwrap(), None);

    let mut tx = store.pool().begin().await.unwrap();
    store
        .set_in(&mut tx, "ns", "s", at("20", None))
        .await
        .unwrap();
    assert_eq!(
        store
            .set_in(&mut tx, "ns", "s", at("15", None))
            .await
            .unwrap(),
        SetOutcome::NotAdvanced
    );
    tx.commit().await.unwrap();
    assert_eq!(store.get("ns", "s").await.unwrap(), Some(at("20", None)));
    assert_eq!(
        store.set("ns", "s", at("19", None)).await.unwrap(),
        SetOutcome::NotAdvanced
    );
    assert_eq!(store.get("ns", "s").await.unwrap(), Some(at("20", None)));
    drop_table(&store).await;
}

/// A flush that fails keeps its checkpoints pending; the next one writes them.
#[tokio::test]
async fn a_failed_flush_keeps_the_checkpoints_pending() {
    let store = fresh_store("flush_fails").await;
    let buffered = store
        .clone()
        .buffered()
        .flush_interval(Duration::from_secs(3600));
    buffered.set("ns", "s", at("41", None)).await.unwrap();
    drop_table(&store).await;
    let err = buffered.flush().await.unwrap_err();
    assert!(matches!(err, StoreError::Backend { .. }), "{err}");
    assert_eq!(buffered.pending(), 1);
    buffered.set("ns", "s", at("42", None)).await.unwrap();
    store.create_table().await.unwrap();
    buffered.flush().await.unwrap();
    assert_eq!(buffered.pending(), 0);
    assert_eq!(store.get("ns", "s").await.unwrap(), Some(at("42", None)));
    drop_table(&store).await;
}
