//! `MySqlStore`: checkpoints in a MySQL or MariaDB table (feature `mysql`).

use std::sync::Arc;

use kinesis_tower_layers::checkpoint::SetOutcome;
use kinesis_tower_layers::{Checkpoint, StoreError};
use sqlx::mysql::{MySqlConnection, MySqlDatabaseError};
use sqlx::{MySql, Pool};

use super::sql::{sql_store, Columns, ErrorKind};

const BACKEND: &str = "mysql";

/// `ER_DUP_ENTRY`.
const DUPLICATE_KEY: u16 = 1062;

const ERRORS: ErrorKind = ErrorKind {
    backend: BACKEND,
    database: is_retryable_error,
};

/// Server errors worth another try: lock wait timeout, deadlock, too many connections, server
/// shutting down, connection killed, server gone away / lost connection.
fn is_retryable_error(e: &dyn sqlx::error::DatabaseError) -> bool {
    e.try_downcast_ref::<MySqlDatabaseError>()
        .is_some_and(|e| retryable_number(e.number()))
}

fn retryable_number(number: u16) -> bool {
    matches!(number, 1205 | 1213 | 1040 | 1053 | 1927 | 2006 | 2013)
}

/// Checkpoints in a MySQL (5.7+) or MariaDB (10.3+) table, written through: each
/// [`set`](kinesis_tower_layers::CheckpointStore::set) is one guarded update (plus an insert
/// for a shard's first checkpoint). Wrap it in a buffered store
/// ([`buffered`](MySqlStore::buffered)) to write at most once a second per shard, as the
/// consumer's store usually should.
///
/// Monotonic on the server: the update only replaces a row whose `sort_key`
/// ([`Checkpoint::sort_key`], a binary-collated string) is smaller, so two processes, or a
/// buffered write landing late, can never move a checkpoint backwards, and sequence numbers
/// compare numerically (up to 128 digits; `DECIMAL` would hold only 65, so the decimal
/// sequence number is kept as text beside it). Round trips that fail with a transient error
/// (connection lost, pool timeout, deadlock, lock wait timeout) are tried again a few times
/// with backoff before the error is returned.
///
/// For exactly-once output into the same database, write the checkpoint inside your own
/// transaction with [`set_in`](MySqlStore::set_in).
///
/// In a transaction, a duplicate key on a shard's first checkpoint (another writer inserted it
/// first) is handled inside `set_in`: InnoDB rolls back only that statement, not the
/// transaction.
///
/// A handler doing so, which answers `Processed::SkipCheckpoint` so that `CheckpointLayer`
/// does not write the checkpoint a second time:
///
/// ```no_run
/// # use kinesis_tower::store::MySqlStore;
/// # use kinesis_tower::{Batch, Processed};
/// # async fn handle(store: &MySqlStore, namespace: &str, batch: Batch)
/// #     -> Result<Processed, Box<dyn std::error::Error + Send + Sync>> {
/// let mut tx = store.pool().begin().await?;
/// for record in &batch.records {
///     sqlx::query("INSERT INTO events (shard_id, sequence_number, data) VALUES (?, ?, ?)")
///         .bind(&*record.shard_id)
///         .bind(record.sequence_number.to_string())
///         .bind(&record.data[..])
///         .execute(&mut *tx)
///         .await?;
/// }
/// if let Some(checkpoint) = batch.checkpoint() {
///     store.set_in(&mut tx, namespace, &batch.shard_id, checkpoint).await?;
/// }
/// tx.commit().await?;
/// Ok(Processed::SkipCheckpoint)
/// # }
/// ```
///
/// The table ([`create_table`](MySqlStore::create_table); `kinesis_checkpoints` unless another
/// name is given):
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS `kinesis_checkpoints` (
///     namespace           VARCHAR(512) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
///     shard_id            VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
///     sort_key            VARCHAR(150) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
///     sequence_number     VARCHAR(128) CHARACTER SET ascii NULL,  -- decimal; NULL at shard end
///     sub_sequence_number BIGINT UNSIGNED NULL,                   -- KPL user record index
///     shard_end           BOOLEAN      NOT NULL DEFAULT FALSE,
///     updated_at          TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
///     PRIMARY KEY (namespace, shard_id)
/// ) ENGINE = InnoDB
/// ```
///
/// A write is a guarded update, and an insert when no row was updated:
///
/// ```sql
/// UPDATE `kinesis_checkpoints`
///    SET sort_key = ?, sequence_number = ?, sub_sequence_number = ?, shard_end = ?,
///        updated_at = CURRENT_TIMESTAMP(6)
///  WHERE namespace = ? AND shard_id = ? AND sort_key < ?;
/// -- only when the update matched no row:
/// INSERT INTO `kinesis_checkpoints`
///     (namespace, shard_id, sort_key, sequence_number, sub_sequence_number, shard_end)
/// VALUES (?, ?, ?, ?, ?, ?);
/// -- only when the insert failed with a duplicate key (the row exists): the update again.
/// ```
///
/// The update matching a row means [`SetOutcome::Advanced`], as does a successful insert; an
/// update that matches nothing after a duplicate key means [`SetOutcome::NotAdvanced`]. A
/// moving checkpoint costs one round trip, a shard's first one two. (A single
/// `INSERT ... ON DUPLICATE KEY UPDATE` cannot tell the outcome: sqlx connects with
/// `CLIENT_FOUND_ROWS`, under which a new row and a row left unchanged both count 1.)
#[derive(Clone, Debug)]
pub struct MySqlStore {
    pool: Pool<MySql>,
    table: Arc<str>,
    sql: Arc<Queries>,
}

#[derive(Debug)]
struct Queries {
    create: String,
    get: String,
    update: String,
    insert: String,
    list: String,
}

impl Queries {
    fn new(t: &str) -> Self {
        Self {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    namespace           VARCHAR(512) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
                    shard_id            VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
                    sort_key            VARCHAR(150) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
                    sequence_number     VARCHAR(128) CHARACTER SET ascii NULL,
                    sub_sequence_number BIGINT UNSIGNED NULL,
                    shard_end           BOOLEAN      NOT NULL DEFAULT FALSE,
                    updated_at          TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
                    PRIMARY KEY (namespace, shard_id)
                ) ENGINE = InnoDB"
            ),
            // Binary-collated columns come back as bytes; converted, as text.
            get: format!(
                "SELECT CONVERT(sort_key USING utf8mb4) FROM {t} WHERE namespace = ? AND shard_id = ?"
            ),
            update: format!(
                "UPDATE {t} SET sort_key = ?, sequence_number = ?, sub_sequence_number = ?,
                    shard_end = ?, updated_at = CURRENT_TIMESTAMP(6)
                 WHERE namespace = ? AND shard_id = ? AND sort_key < ?"
            ),
            insert: format!(
                "INSERT INTO {t}
                    (namespace, shard_id, sort_key, sequence_number, sub_sequence_number, shard_end)
                 VALUES (?, ?, ?, ?, ?, ?)"
            ),
            list: format!(
                "SELECT CONVERT(shard_id USING utf8mb4), CONVERT(sort_key USING utf8mb4)
                 FROM {t} WHERE namespace = ? ORDER BY shard_id"
            ),
        }
    }
}

/// MySQL serializes `CREATE TABLE IF NOT EXISTS` under a metadata lock: no race to forgive.
fn created_meanwhile(_: &sqlx::Error) -> bool {
    false
}

sql_store!(
    MySqlStore,
    MySql,
    conn = MySqlConnection,
    quote = '`',
    url = "mysql://user:password@host:port/database"
);

impl MySqlStore {
    /// The guarded update, else an insert; see the type's docs.
    async fn upsert(
        &self,
        conn: &mut MySqlConnection,
        namespace: &str,
        shard_id: &str,
        columns: &Columns,
    ) -> Result<SetOutcome, StoreError> {
        let error = |e| ERRORS.error_for("set", namespace, Some(shard_id), e);
        if self
            .update(&mut *conn, namespace, shard_id, columns)
            .await
            .map_err(error)?
        {
            return Ok(SetOutcome::Advanced);
        }
        let inserted = sqlx::query(&self.sql.insert)
            .bind(namespace)
            .bind(shard_id)
            .bind(&columns.sort_key)
            .bind(&columns.sequence_number)
            .bind(columns.sub_sequence_number)
            .bind(columns.shard_end)
            .execute(&mut *conn)
            .await;
        match inserted {
            Ok(_) => Ok(SetOutcome::Advanced),
            // The row exists (it did all along, or another writer has just inserted it): the
            // guarded update decides.
            Err(sqlx::Error::Database(db))
                if db
                    .try_downcast_ref::<MySqlDatabaseError>()
                    .is_some_and(|e| e.number() == DUPLICATE_KEY) =>
            {
                let advanced = self
                    .update(conn, namespace, shard_id, columns)
                    .await
                    .map_err(error)?;
                Ok(if advanced {
                    SetOutcome::Advanced
                } else {
                    SetOutcome::NotAdvanced
                })
            }
            Err(e) => Err(error(e)),
        }
    }

    /// Whether the guarded update moved the row forward. The `WHERE` clause holds the guard, so
    /// a matched row is a changed row, with or without `CLIENT_FOUND_ROWS`.
    async fn update(
        &self,
        conn: &mut MySqlConnection,
        namespace: &str,
        shard_id: &str,
        columns: &Columns,
    ) -> Result<bool, sqlx::Error> {
        let result = sqlx::query(&self.sql.update)
            .bind(&columns.sort_key)
            .bind(&columns.sequence_number)
            .bind(columns.sub_sequence_number)
            .bind(columns.shard_end)
            .bind(namespace)
            .bind(shard_id)
            .bind(&columns.sort_key)
            .execute(conn)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    /// One attempt at a write, on a connection from the pool.
    async fn write(
        &self,
        namespace: &str,
        shard_id: &str,
        columns: &Columns,
    ) -> Result<SetOutcome, StoreError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| ERRORS.error_for("set", namespace, Some(shard_id), e))?;
        self.upsert(&mut conn, namespace, shard_id, columns).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_server_errors_by_number() {
        for (number, retryable) in [
            (1213, true),
            (1205, true),
            (2006, true),
            (2013, true),
            (1146, false),
            (1064, false),
            (1045, false),
            (1062, false),
        ] {
            assert_eq!(retryable_number(number), retryable, "{number}");
        }
    }
}
