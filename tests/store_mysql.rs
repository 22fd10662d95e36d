//! `MySqlStore` against the MariaDB server on 127.0.0.1:3306 (user `root`, empty password,
//! database `test`; `KT_MYSQL_URL` overrides). Each test works in its own table and drops it.
#![cfg(feature = "mysql")]

mod conformance;
mod sql_common;

use kinesis_tower::store::{MySqlStore, SetOutcome};
use kinesis_tower::CheckpointStore;
use kinesis_tower_layers::testing::at;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};

use sql_common::{fresh, unique_table, SqlStore};

fn url() -> String {
    std::env::var("KT_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

/// A pool for a handle on any table.
async fn pool_for(_table: &str) -> MySqlPool {
    MySqlPoolOptions::new()
        .max_connections(4)
        .connect(&url())
        .await
        .expect("MariaDB on 127.0.0.1:3306 (source scripts/env.sh; ensure_mariadb)")
}

sql_common::sql_checks!(
    MySqlStore,
    db = sqlx::MySql,
    quote = '`',
    unreachable = "mysql://root@127.0.0.1:1/test",
    pool = pool_for,
    columns = "SELECT sequence_number, CAST(sub_sequence_number AS CHAR), shard_end FROM {t} WHERE shard_id = ?"
);

/// A new row right after a refusal on the same connection is still an insert.
#[tokio::test]
async fn an_insert_after_a_refusal_on_one_connection_advances() {
    // One connection: every statement runs on the same session.
    let single = MySqlPoolOptions::new()
        .max_connections(1)
        .connect(&url())
        .await
        .unwrap();
    let store = MySqlStore::from_pool(single, &unique_table("columns")).unwrap();
    store.create_table().await.unwrap();
    store.set("app/s", "shard-1", at(5)).await.unwrap();
    assert_eq!(
        store.set("app/s", "shard-1", at(5)).await.unwrap(),
        SetOutcome::NotAdvanced
    );
    assert_eq!(
        store.set("app/s", "shard-2", at(1)).await.unwrap(),
        SetOutcome::Advanced
    );
    store.drop_table().await;
}

/// Writers racing on shards without a row: the losers of the insert fall back to the guarded
/// update, and the greatest checkpoint wins.
#[tokio::test]
async fn racing_first_writes_keep_the_greatest() {
    let store: MySqlStore = fresh("race").await;
    for shard in 0..5 {
        let shard = format!("shard-{shard}");
        let writers: Vec<_> = (1..=12)
            .map(|n| {
                let (store, shard) = (store.clone(), shard.clone());
                tokio::spawn(async move { store.set("ns", &shard, at(n)).await })
            })
            .collect();
        let mut advanced = 0;
        for writer in writers {
            if writer.await.unwrap().unwrap() == SetOutcome::Advanced {
                advanced += 1;
            }
        }
        assert!(advanced >= 1);
        assert_eq!(store.get("ns", &shard).await.unwrap(), Some(at(12)));
    }
    store.drop_table().await;
}

#[tokio::test]
async fn database_qualified_names_work() {
    let table = format!("test.{}", unique_table("qualified"));
    let store = MySqlStore::connect_with_table(&url(), &table)
        .await
        .unwrap();
    store.create_table().await.unwrap();
    store.set("ns", "s", at(7)).await.unwrap();
    assert_eq!(store.get("ns", "s").await.unwrap(), Some(at(7)));
    store.drop_table().await;
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
    let admin = pool_for("").await;
    store.set("ns", "s", at(1)).await.unwrap();
    for n in 2..8 {
        let (id,): (u64,) = sqlx::query_as("SELECT CONNECTION_ID()")
            .fetch_one(store.pool())
            .await
            .unwrap();
        sqlx::query(&format!("KILL {id}"))
            .execute(&admin)
            .await
            .unwrap();
        assert_eq!(
            store.set("ns", "s", at(n)).await.unwrap(),
            SetOutcome::Advanced
        );
    }
    assert_eq!(store.get("ns", "s").await.unwrap(), Some(at(7)));
    store.drop_table().await;
}
