//! What the Postgres and MySQL store tests share: the [`SqlStore`] view of a store, and the
//! checks that read the same on both databases. `sql_checks!(Store)` generates the conformance
//! suite (written through and buffered) and one `#[tokio::test]` per check.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kinesis_tower::store::{BufferedStore, SetOutcome, StoreError};
use kinesis_tower::Checkpoint;
use kinesis_tower::CheckpointStore;
use kinesis_tower_layers::testing::at;

/// A table name no other test (or test process) uses.
pub fn unique_table(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "kt_{prefix}_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        fastrand::u32(..)
    )
}

/// A handle on a new table of its own (drop it with [`SqlStore::drop_table`]).
pub async fn fresh<S: SqlStore>(prefix: &str) -> S {
    S::open(&unique_table(prefix)).await
}

/// A SQL store as the shared checks drive it.
#[allow(async_fn_in_trait)]
pub trait SqlStore: CheckpointStore + Clone + std::fmt::Debug + Sized {
    /// A handle with a pool of its own on `table` (created if missing).
    async fn open(table: &str) -> Self;
    /// `connect_with_table` on the test server.
    async fn connect_with_table(table: &str) -> Result<Self, StoreError>;
    /// `from_pool` with this handle's pool.
    fn with_table(&self, table: &str) -> Result<Self, StoreError>;
    /// A handle on a server that is not there.
    fn unreachable() -> Self;
    async fn create_table(&self) -> Result<(), StoreError>;
    /// Runs `sql` with `{t}` replaced by the quoted table name.
    async fn execute(&self, sql: &str);
    /// The shard's informational columns as text: sequence number, sub-sequence number, shard
    /// end.
    async fn columns(&self, shard_id: &str) -> (Option<String>, Option<String>, bool);
    /// `set_in` of each checkpoint in one transaction, then committed or rolled back.
    async fn set_in_transaction(
        &self,
        namespace: &str,
        shard_id: &str,
        checkpoints: &[Checkpoint],
        commit: bool,
    ) -> Vec<SetOutcome>;
    fn buffered_for_tests(self) -> BufferedStore<Self>;

    async fn drop_table(&self) {
        self.execute("DROP TABLE IF EXISTS {t}").await;
    }
}

/// Implements [`SqlStore`] for `$store` and generates the conformance suite over it (written
/// through, and buffered with only explicit flushes) and the shared checks. The test file
/// defines `url()` (the test server) and `$pool(table)` (a pool for a handle on `table`).
macro_rules! sql_checks {
    ($store:ident, db = $db:ty, quote = $quote:literal, unreachable = $unreachable:literal, pool = $pool:ident, columns = $columns:literal) => {
        impl sql_common::SqlStore for $store {
            async fn open(table: &str) -> Self {
                let store = $store::from_pool($pool(table).await, table).unwrap();
                store.create_table().await.unwrap();
                store
            }

            async fn connect_with_table(
                table: &str,
            ) -> Result<Self, kinesis_tower::store::StoreError> {
                $store::connect_with_table(&url(), table).await
            }

            fn with_table(&self, table: &str) -> Result<Self, kinesis_tower::store::StoreError> {
                $store::from_pool(self.pool().clone(), table)
            }

            fn unreachable() -> Self {
                let pool = sqlx::pool::PoolOptions::<$db>::new()
                    .acquire_timeout(std::time::Duration::from_millis(500))
                    .connect_lazy($unreachable)
                    .unwrap();
                $store::from_pool(pool, "kinesis_checkpoints").unwrap()
            }

            async fn create_table(&self) -> Result<(), kinesis_tower::store::StoreError> {
                $store::create_table(self).await
            }

            async fn execute(&self, sql: &str) {
                let q = $quote;
                let quoted = format!("{q}{}{q}", self.table().replace('.', &format!("{q}.{q}")));
                sqlx::query(&sql.replace("{t}", &quoted))
                    .execute(self.pool())
                    .await
                    .unwrap();
            }

            async fn columns(&self, shard_id: &str) -> (Option<String>, Option<String>, bool) {
                let q = $quote;
                let quoted = format!("{q}{}{q}", self.table().replace('.', &format!("{q}.{q}")));
                sqlx::query_as(&$columns.replace("{t}", &quoted))
                    .bind(shard_id)
                    .fetch_one(self.pool())
                    .await
                    .unwrap()
            }

            async fn set_in_transaction(
                &self,
                namespace: &str,
                shard_id: &str,
                checkpoints: &[kinesis_tower::Checkpoint],
                commit: bool,
            ) -> Vec<kinesis_tower::store::SetOutcome> {
                let mut tx = self.pool().begin().await.unwrap();
                let mut outcomes = Vec::new();
                for checkpoint in checkpoints {
                    outcomes.push(
                        self.set_in(&mut tx, namespace, shard_id, *checkpoint)
                            .await
                            .unwrap(),
                    );
                    assert_eq!(
                        self.get_in(&mut tx, namespace, shard_id).await.unwrap(),
                        checkpoints.iter().copied().max(),
                        "the transaction sees its own checkpoint"
                    );
                }
                if commit {
                    tx.commit().await.unwrap();
                } else {
                    tx.rollback().await.unwrap();
                }
                outcomes
            }

            fn buffered_for_tests(self) -> kinesis_tower::store::BufferedStore<Self> {
                self.buffered()
                    .flush_interval(sql_common::NO_INTERVAL_FLUSH)
            }
        }

        conformance::suite!(
            write_through,
            make = |scope: String| async move {
                std::sync::Arc::new(<$store as sql_common::SqlStore>::open(&scope).await)
                    as std::sync::Arc<dyn kinesis_tower::CheckpointStore>
            },
            cleanup = |scope: String| async move {
                sql_common::SqlStore::drop_table(
                    &<$store as sql_common::SqlStore>::open(&scope).await,
                )
                .await
            },
        );

        conformance::suite!(
            buffered,
            make = |scope: String| async move {
                let store = <$store as sql_common::SqlStore>::open(&scope).await;
                std::sync::Arc::new(sql_common::SqlStore::buffered_for_tests(store))
                    as std::sync::Arc<dyn kinesis_tower::CheckpointStore>
            },
            cleanup = |scope: String| async move {
                sql_common::SqlStore::drop_table(
                    &<$store as sql_common::SqlStore>::open(&scope).await,
                )
                .await
            },
        );

        mod shared {
            use super::*;

            #[tokio::test]
            async fn invalid_table_names_are_rejected() {
                sql_common::invalid_table_names_are_rejected::<$store>().await;
            }

            #[tokio::test]
            async fn failures_are_errors_never_missing_checkpoints() {
                sql_common::failures_are_errors_never_missing_checkpoints::<$store>().await;
            }

            #[tokio::test]
            async fn columns_hold_full_values() {
                sql_common::columns_hold_full_values::<$store>().await;
            }

            #[tokio::test]
            async fn keys_are_case_sensitive_and_sort_bytewise() {
                sql_common::keys_are_case_sensitive_and_sort_bytewise::<$store>().await;
            }

            #[tokio::test]
            async fn set_in_commits_and_rolls_back_with_the_transaction() {
                sql_common::set_in_commits_and_rolls_back_with_the_transaction::<$store>().await;
            }

            #[tokio::test]
            async fn a_failed_flush_keeps_the_checkpoints_pending() {
                sql_common::a_failed_flush_keeps_the_checkpoints_pending::<$store>().await;
            }

            #[tokio::test]
            async fn a_late_buffered_flush_does_not_undo_a_transactional_checkpoint() {
                sql_common::a_late_buffered_flush_does_not_undo_a_transactional_checkpoint::<
                                                                                            $store,
                                                                                        >()
                                                                                        .await;
            }
        }
    };
}
pub(crate) use sql_checks;

pub async fn invalid_table_names_are_rejected<S: SqlStore>() {
    let store = S::open(&unique_table("names")).await;
    for bad in [
        "",
        "x; DROP TABLE y",
        "1abc",
        "a-b",
        "a\"b",
        "a`b",
        "a.b.c",
        "a.",
        &"a".repeat(64),
    ] {
        let err = store.with_table(bad).unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidName { .. }),
            "{bad}: {err}"
        );
        let err = S::connect_with_table(bad).await.unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidName { .. }),
            "{bad}: {err}"
        );
    }
    store.drop_table().await;
}

pub async fn failures_are_errors_never_missing_checkpoints<S: SqlStore>() {
    // A table that does not exist: not retryable, and never "no checkpoint".
    let store = S::open(&unique_table("missing")).await;
    let missing = store.with_table(&unique_table("missing")).unwrap();
    let err = missing.get("ns", "s").await.unwrap_err();
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
    assert!(err.to_string().contains("namespace ns"), "{err}");
    assert!(missing.set("ns", "s", at(1)).await.is_err());
    assert!(missing.list("ns").await.is_err());

    // A server that is not there: retryable, and the retries end.
    let err = S::unreachable().get("ns", "s").await.unwrap_err();
    assert!(err.is_retryable(), "{err}");

    // A row this library did not write.
    store
        .execute("INSERT INTO {t} (namespace, shard_id, sort_key) VALUES ('n', 's', 'garbage')")
        .await;
    let err = store.get("n", "s").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(store.list("n").await.is_err());
    store.drop_table().await;
}

/// The informational columns beside the sort key hold the whole value: 128 digits, a
/// sub-sequence number past i64, NULLs and the flag at shard end.
pub async fn columns_hold_full_values<S: SqlStore>() {
    let store: S = fresh("columns").await;
    let big = "9".repeat(128);
    let checkpoint = Checkpoint::Sequence {
        sequence_number: big.parse().unwrap(),
        sub_sequence_number: Some(u64::MAX),
    };
    store.set("ns", "s", checkpoint).await.unwrap();
    assert_eq!(
        store.columns("s").await,
        (Some(big), Some(u64::MAX.to_string()), false)
    );
    store.set("ns", "s", Checkpoint::ShardEnd).await.unwrap();
    assert_eq!(store.columns("s").await, (None, None, true));
    store.drop_table().await;
}

pub async fn keys_are_case_sensitive_and_sort_bytewise<S: SqlStore>() {
    let store = S::open(&unique_table("keys")).await;
    for (shard, seq) in [("b", 2), ("B", 3), ("a", 1)] {
        store.set("ns/s", shard, at(seq)).await.unwrap();
    }
    assert_eq!(
        store.list("ns/s").await.unwrap(),
        vec![
            ("B".to_owned(), at(3)),
            ("a".to_owned(), at(1)),
            ("b".to_owned(), at(2)),
        ]
    );
    assert_eq!(store.get("NS/s", "b").await.unwrap(), None);
    store.drop_table().await;
}

/// The checkpoint commits and rolls back with the handler's transaction, under the same guard.
pub async fn set_in_commits_and_rolls_back_with_the_transaction<S: SqlStore>() {
    let store = S::open(&unique_table("set_in")).await;
    let outcomes = store.set_in_transaction("ns", "s", &[at(10)], false).await;
    assert_eq!(outcomes, [SetOutcome::Advanced]);
    assert_eq!(store.get("ns", "s").await.unwrap(), None);

    let outcomes = store
        .set_in_transaction("ns", "s", &[at(20), at(15)], true)
        .await;
    assert_eq!(outcomes, [SetOutcome::Advanced, SetOutcome::NotAdvanced]);
    assert_eq!(store.get("ns", "s").await.unwrap(), Some(at(20)));
    // A write from outside the transaction cannot move it back.
    assert_eq!(
        store.set("ns", "s", at(19)).await.unwrap(),
        SetOutcome::NotAdvanced
    );
    assert_eq!(store.get("ns", "s").await.unwrap(), Some(at(20)));
    store.drop_table().await;
}

/// A flush that fails keeps its checkpoints pending; the next one writes them.
pub async fn a_failed_flush_keeps_the_checkpoints_pending<S: SqlStore>() {
    let store = S::open(&unique_table("flush_fails")).await;
    let buffered = store.clone().buffered_for_tests();
    buffered.set("ns", "s", at(41)).await.unwrap();
    store.drop_table().await;
    let err = buffered.flush().await.unwrap_err();
    assert!(matches!(err, StoreError::Backend { .. }), "{err}");
    assert_eq!(buffered.pending(), 1);
    buffered.set("ns", "s", at(42)).await.unwrap();
    store.create_table().await.unwrap();
    buffered.flush().await.unwrap();
    assert_eq!(buffered.pending(), 0);
    assert_eq!(store.get("ns", "s").await.unwrap(), Some(at(42)));
    store.drop_table().await;
}

/// A buffered store's late flush of an older checkpoint does not undo a newer one a handler
/// committed in its own transaction: the server refuses it.
pub async fn a_late_buffered_flush_does_not_undo_a_transactional_checkpoint<S: SqlStore>() {
    let store = S::open(&unique_table("late_flush")).await;
    let buffered = store.clone().buffered_for_tests();
    buffered.set("ns", "s", at(100)).await.unwrap();
    store.set_in_transaction("ns", "s", &[at(200)], true).await;
    buffered.flush().await.unwrap();
    assert_eq!(store.get("ns", "s").await.unwrap(), Some(at(200)));
    assert_eq!(buffered.get("ns", "s").await.unwrap(), Some(at(200)));
    store.drop_table().await;
}

/// Only explicit flushes write: what the checks look at.
pub const NO_INTERVAL_FLUSH: Duration = Duration::from_secs(3600);
