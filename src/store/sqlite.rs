//! `SqliteStore`: checkpoints in an embedded SQLite file (feature `sqlite`).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use kinesis_tower_layers::checkpoint::SetOutcome;
use kinesis_tower_layers::{Checkpoint, CheckpointStore, StoreError};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;

use super::retry::with_retries;

use super::DEFAULT_TABLE;

/// Checkpoints in a SQLite database file: the embedded default for persistence.
///
/// Writes go through (each `set` is its own transaction; `flush` has nothing to do). The file
/// uses WAL journaling with `synchronous=NORMAL`: a committed checkpoint survives a crash of the
/// process; after a power loss the last few may be lost, which only means re-delivery.
/// Monotonic in the database: the upsert only replaces a row whose checkpoint is older, by
/// comparing [`Checkpoint::sort_key`] strings, so sequence numbers compare numerically.
///
/// The table (created by [`open`](SqliteStore::open) or [`create_table`](SqliteStore::create_table)):
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS kinesis_checkpoints (
///     namespace           TEXT    NOT NULL,  -- '<app name>/<stream name>'
///     shard_id            TEXT    NOT NULL,
///     sort_key            TEXT    NOT NULL,  -- Checkpoint::sort_key(); compared on update
///     sequence_number     TEXT,              -- decimal, NULL at shard end
///     sub_sequence_number INTEGER,           -- KPL user record index, or NULL
///     shard_end           INTEGER NOT NULL DEFAULT 0,
///     updated_at          TEXT    NOT NULL,
///     PRIMARY KEY (namespace, shard_id)
/// )
/// ```
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    table: String,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path` and its `kinesis_checkpoints`
    /// table.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_table(path, DEFAULT_TABLE).await
    }

    /// Opens (creating if missing) the database file at `path` with checkpoints in `table`
    /// (letters, digits and `_`, starting with a letter or `_`; created if missing).
    pub async fn open_with_table(path: impl AsRef<Path>, table: &str) -> Result<Self, StoreError> {
        validate_table(table)?;
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|e| backend("open", false, e))?
            .filename(path.as_ref())
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Backend {
                backend: "sqlite",
                operation: "open",
                namespace: None,
                shard_id: None,
                retryable: is_retryable(&e),
                source: Box::new(OpenError {
                    path: path.as_ref().display().to_string(),
                    source: e,
                }),
            })?;
        let store = Self {
            pool,
            table: table.to_owned(),
        };
        store.create_table().await?;
        Ok(store)
    }

    /// Uses an existing pool and table; call [`create_table`](SqliteStore::create_table) if it
    /// may not exist yet.
    pub fn from_pool(pool: SqlitePool, table: &str) -> Result<Self, StoreError> {
        validate_table(table)?;
        Ok(Self {
            pool,
            table: table.to_owned(),
        })
    }

    /// Creates the table if it does not exist.
    pub async fn create_table(&self) -> Result<(), StoreError> {
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                namespace TEXT NOT NULL,
                shard_id TEXT NOT NULL,
                sort_key TEXT NOT NULL,
                sequence_number TEXT,
                sub_sequence_number INTEGER,
                shard_end INTEGER NOT NULL DEFAULT 0,
                updated_at TEXT NOT NULL,
                PRIMARY KEY (namespace, shard_id)
            )",
            t = self.table
        );
        sqlx::query(&ddl)
            .execute(&self.pool)
            .await
            .map_err(|e| backend("create table", is_retryable(&e), e))?;
        Ok(())
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// Opening the database file failed; names the file.
#[derive(Debug, thiserror::Error)]
#[error("cannot open SQLite file {path}: {source}")]
struct OpenError {
    path: String,
    source: sqlx::Error,
}

/// Table names are spliced into SQL (they cannot be bound), so only plain identifiers pass.
fn validate_table(table: &str) -> Result<(), StoreError> {
    let mut bytes = table.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if first_ok && table.len() <= 64 && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Ok(())
    } else {
        Err(StoreError::InvalidName {
            what: "table name",
            name: table.to_owned(),
            reason: "use 1 to 64 letters, digits and '_', starting with a letter or '_'",
        })
    }
}

fn is_retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes.
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, 5 | 6)),
        _ => false,
    }
}

fn backend(operation: &'static str, retryable: bool, e: sqlx::Error) -> StoreError {
    StoreError::Backend {
        backend: "sqlite",
        operation,
        namespace: None,
        shard_id: None,
        retryable,
        source: Box::new(e),
    }
}

fn backend_for(
    operation: &'static str,
    namespace: &str,
    shard_id: &str,
    e: sqlx::Error,
) -> StoreError {
    StoreError::Backend {
        backend: "sqlite",
        operation,
        namespace: Some(namespace.to_owned()),
        shard_id: Some(shard_id.to_owned()),
        retryable: is_retryable(&e),
        source: Box::new(e),
    }
}

#[async_trait]
impl CheckpointStore for SqliteStore {
    async fn get(&self, namespace: &str, shard_id: &str) -> Result<Option<Checkpoint>, StoreError> {
        let sql = format!(
            "SELECT sort_key FROM {} WHERE namespace = ?1 AND shard_id = ?2",
            self.table
        );
        let row = with_retries("sqlite", "get", || async {
            sqlx::query(&sql)
                .bind(namespace)
                .bind(shard_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| backend_for("get", namespace, shard_id, e))
        })
        .await?;
        let Some(row) = row else { return Ok(None) };
        let key: String = row
            .try_get(0)
            .map_err(|e| backend_for("get", namespace, shard_id, e))?;
        Checkpoint::from_sort_key(&key)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                namespace: namespace.to_owned(),
                shard_id: shard_id.to_owned(),
                reason: e.to_string(),
            })
    }

    async fn set(
        &self,
        namespace: &str,
        shard_id: &str,
        checkpoint: Checkpoint,
    ) -> Result<SetOutcome, StoreError> {
        let sql = format!(
            "INSERT INTO {t} (namespace, shard_id, sort_key, sequence_number, sub_sequence_number, shard_end, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
             ON CONFLICT (namespace, shard_id) DO UPDATE SET
                sort_key = excluded.sort_key,
                sequence_number = excluded.sequence_number,
                sub_sequence_number = excluded.sub_sequence_number,
                shard_end = excluded.shard_end,
                updated_at = excluded.updated_at
             WHERE excluded.sort_key > {t}.sort_key",
            t = self.table
        );
        let (sequence, sub, end) = match checkpoint {
            Checkpoint::Sequence {
                sequence_number,
                sub_sequence_number,
            } => (
                Some(sequence_number.to_string()),
                sub_sequence_number.and_then(|s| i64::try_from(s).ok()),
                false,
            ),
            Checkpoint::StartedAt { sequence_number } => {
                (Some(sequence_number.to_string()), None, false)
            }
            Checkpoint::ShardEnd => (None, None, true),
            // Where reading started, by time: only the sort key says it.
            _ => (None, None, false),
        };
        let sort_key = checkpoint.sort_key();
        let result = with_retries("sqlite", "set", || async {
            sqlx::query(&sql)
                .bind(namespace)
                .bind(shard_id)
                .bind(&sort_key)
                .bind(&sequence)
                .bind(sub)
                .bind(end)
                .execute(&self.pool)
                .await
                .map_err(|e| backend_for("set", namespace, shard_id, e))
        })
        .await?;
        Ok(if result.rows_affected() > 0 {
            SetOutcome::Advanced
        } else {
            SetOutcome::NotAdvanced
        })
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn list(&self, namespace: &str) -> Result<Vec<(String, Checkpoint)>, StoreError> {
        let sql = format!(
            "SELECT shard_id, sort_key FROM {} WHERE namespace = ?1 ORDER BY shard_id",
            self.table
        );
        let rows = sqlx::query(&sql)
            .bind(namespace)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| backend_for("list", namespace, "*", e))?;
        rows.into_iter()
            .map(|row| {
                let shard: String = row
                    .try_get(0)
                    .map_err(|e| backend_for("list", namespace, "*", e))?;
                let key: String = row
                    .try_get(1)
                    .map_err(|e| backend_for("list", namespace, &shard, e))?;
                let checkpoint =
                    Checkpoint::from_sort_key(&key).map_err(|e| StoreError::Corrupt {
                        namespace: namespace.to_owned(),
                        shard_id: shard.clone(),
                        reason: e.to_string(),
                    })?;
                Ok((shard, checkpoint))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kinesis_tower_layers::testing::at;

    #[tokio::test]
    async fn monotonic_numeric_and_persistent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.db");
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.get("app/s", "shard-1").await.unwrap(), None);
        assert_eq!(
            store.set("app/s", "shard-1", at(99)).await.unwrap(),
            SetOutcome::Advanced
        );
        // 100 > 99 numerically, though "100" < "99" as text.
        assert_eq!(
            store.set("app/s", "shard-1", at(100)).await.unwrap(),
            SetOutcome::Advanced
        );
        assert_eq!(
            store.set("app/s", "shard-1", at(99)).await.unwrap(),
            SetOutcome::NotAdvanced
        );
        assert_eq!(
            store.set("app/s", "shard-1", at(100)).await.unwrap(),
            SetOutcome::NotAdvanced
        );
        // 128 digits, inside an aggregate.
        let big = |sub| Checkpoint::Sequence {
            sequence_number: "9".repeat(128).parse().unwrap(),
            sub_sequence_number: Some(sub),
        };
        store.set("app/s", "shard-1", big(3)).await.unwrap();
        assert_eq!(
            store.set("app/s", "shard-1", big(2)).await.unwrap(),
            SetOutcome::NotAdvanced
        );
        assert_eq!(store.get("other/s", "shard-1").await.unwrap(), None);
        drop(store);

        let reopened = SqliteStore::open(&path).await.unwrap();
        assert_eq!(
            reopened.get("app/s", "shard-1").await.unwrap(),
            Some(big(3))
        );
        reopened
            .set("app/s", "shard-1", Checkpoint::ShardEnd)
            .await
            .unwrap();
        assert_eq!(
            reopened.get("app/s", "shard-1").await.unwrap(),
            Some(Checkpoint::ShardEnd)
        );
    }

    #[tokio::test]
    async fn rejects_table_names_that_could_inject_sql() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            "",
            "x; DROP TABLE y",
            "1abc",
            "a-b",
            "a\"b",
            &"a".repeat(65),
        ] {
            let err = SqliteStore::open_with_table(dir.path().join("x.db"), bad)
                .await
                .unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidName { .. }),
                "{bad}: {err}"
            );
        }
        SqliteStore::open_with_table(dir.path().join("x.db"), "my_checkpoints_2")
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn open_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("cp.db");
        let err = SqliteStore::open(&path).await.unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn corrupt_rows_are_errors_not_missing_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("c.db")).await.unwrap();
        sqlx::query("INSERT INTO kinesis_checkpoints (namespace, shard_id, sort_key, updated_at) VALUES ('n', 's', 'garbage', 'now')")
            .execute(store.pool())
            .await
            .unwrap();
        let err = store.get("n", "s").await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }
}
