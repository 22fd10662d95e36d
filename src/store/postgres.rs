//! `PostgresStore`: checkpoints in a PostgreSQL table (feature `postgres`).

use std::sync::Arc;

use kinesis_tower_layers::checkpoint::SetOutcome;
use kinesis_tower_layers::{Checkpoint, StoreError};
use sqlx::postgres::PgConnection;
use sqlx::{Executor, Pool, Postgres};

use super::sql::{sql_store, Columns, ErrorKind};

const BACKEND: &str = "postgres";

pub(crate) const ERRORS: ErrorKind = ErrorKind {
    backend: BACKEND,
    database: is_retryable_code,
};

/// Server errors worth another try: connection exceptions (class 08), serialization failure,
/// deadlock, the connection terminated by an administrator (`pg_terminate_backend`) or a
/// server restart, too many connections, a lock not available.
fn is_retryable_code(e: &dyn sqlx::error::DatabaseError) -> bool {
    e.code().is_some_and(|code| retryable_code(&code))
}

fn retryable_code(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "53300" | "55P03"
        )
}

/// Checkpoints in a PostgreSQL table, written through: each [`set`](kinesis_tower_layers::CheckpointStore::set) is
/// one upsert. Wrap it in a buffered store ([`buffered`](PostgresStore::buffered)) to write at
/// most once a second per shard, as the consumer's store usually should.
///
/// Monotonic on the server: the upsert only replaces a row whose `sort_key`
/// ([`Checkpoint::sort_key`], compared bytewise with `COLLATE "C"`) is smaller, so two
/// processes, or a buffered write landing late, can never move a checkpoint backwards, and
/// sequence numbers compare numerically (up to 128 digits). Round trips that fail with a
/// transient error (connection lost or terminated, pool timeout, serialization failure,
/// deadlock) are tried again a few times with backoff before the error is returned.
///
/// For exactly-once output into the same database, write the checkpoint inside your own
/// transaction with [`set_in`](PostgresStore::set_in).
///
/// A handler doing so, which answers `Processed::SkipCheckpoint` so that `CheckpointLayer`
/// does not write the checkpoint a second time:
///
/// ```no_run
/// # use kinesis_tower::store::PostgresStore;
/// # use kinesis_tower::{Batch, Checkpoint, Processed};
/// # async fn handle(store: &PostgresStore, namespace: &str, batch: Batch)
/// #     -> Result<Processed, Box<dyn std::error::Error + Send + Sync>> {
/// let mut tx = store.pool().begin().await?;
/// for record in &batch.records {
///     sqlx::query("INSERT INTO events (shard_id, sequence_number, data) VALUES ($1, $2, $3)")
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
/// The table ([`create_table`](PostgresStore::create_table); `kinesis_checkpoints` unless
/// another name is given):
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS "kinesis_checkpoints" (
///     namespace           TEXT           NOT NULL,  -- '<app name>/<stream name>'
///     shard_id            TEXT           NOT NULL,
///     sort_key            TEXT COLLATE "C" NOT NULL,  -- Checkpoint::sort_key(); compared on update
///     sequence_number     NUMERIC(128, 0),           -- NULL at shard end
///     sub_sequence_number NUMERIC(20, 0),            -- KPL user record index, or NULL
///     shard_end           BOOLEAN        NOT NULL DEFAULT FALSE,
///     updated_at          TIMESTAMPTZ    NOT NULL DEFAULT now(),
///     PRIMARY KEY (namespace, shard_id)
/// )
/// ```
///
/// and the write:
///
/// ```sql
/// INSERT INTO "kinesis_checkpoints" AS c
///     (namespace, shard_id, sort_key, sequence_number, sub_sequence_number, shard_end, updated_at)
/// VALUES ($1, $2, $3, $4::numeric, $5::numeric, $6, now())
/// ON CONFLICT (namespace, shard_id) DO UPDATE SET
///     sort_key = EXCLUDED.sort_key, sequence_number = EXCLUDED.sequence_number,
///     sub_sequence_number = EXCLUDED.sub_sequence_number, shard_end = EXCLUDED.shard_end,
///     updated_at = EXCLUDED.updated_at
/// WHERE c.sort_key < EXCLUDED.sort_key
/// ```
///
/// One row written means [`SetOutcome::Advanced`], none [`SetOutcome::NotAdvanced`].
#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: Pool<Postgres>,
    table: Arc<str>,
    sql: Arc<Queries>,
}

#[derive(Debug)]
struct Queries {
    create: String,
    get: String,
    set: String,
    list: String,
}

impl Queries {
    fn new(t: &str) -> Self {
        Self {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    namespace           TEXT           NOT NULL,
                    shard_id            TEXT           NOT NULL,
                    sort_key            TEXT COLLATE \"C\" NOT NULL,
                    sequence_number     NUMERIC(128, 0),
                    sub_sequence_number NUMERIC(20, 0),
                    shard_end           BOOLEAN        NOT NULL DEFAULT FALSE,
                    updated_at          TIMESTAMPTZ    NOT NULL DEFAULT now(),
                    PRIMARY KEY (namespace, shard_id)
                )"
            ),
            get: format!("SELECT sort_key FROM {t} WHERE namespace = $1 AND shard_id = $2"),
            set: format!(
                "INSERT INTO {t} AS c
                    (namespace, shard_id, sort_key, sequence_number, sub_sequence_number, shard_end, updated_at)
                 VALUES ($1, $2, $3, $4::numeric, $5::numeric, $6, now())
                 ON CONFLICT (namespace, shard_id) DO UPDATE SET
                    sort_key = EXCLUDED.sort_key, sequence_number = EXCLUDED.sequence_number,
                    sub_sequence_number = EXCLUDED.sub_sequence_number, shard_end = EXCLUDED.shard_end,
                    updated_at = EXCLUDED.updated_at
                 WHERE c.sort_key < EXCLUDED.sort_key"
            ),
            list: format!(
                "SELECT shard_id, sort_key FROM {t} WHERE namespace = $1 ORDER BY shard_id COLLATE \"C\""
            ),
        }
    }
}

/// Two concurrent `CREATE TABLE IF NOT EXISTS` race on the catalog: the loser reports a
/// duplicate although the table now exists.
fn created_meanwhile(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("23505" | "42P07")))
}

sql_store!(
    PostgresStore,
    Postgres,
    conn = PgConnection,
    quote = '"',
    url = "postgres://user@host:port/database"
);

impl PostgresStore {
    async fn upsert<'e, E: Executor<'e, Database = Postgres>>(
        &self,
        executor: E,
        namespace: &str,
        shard_id: &str,
        columns: &Columns,
    ) -> Result<SetOutcome, StoreError> {
        let result = sqlx::query(&self.sql.set)
            .bind(namespace)
            .bind(shard_id)
            .bind(&columns.sort_key)
            .bind(&columns.sequence_number)
            .bind(columns.sub_sequence_number.map(|s| s.to_string()))
            .bind(columns.shard_end)
            .execute(executor)
            .await
            .map_err(|e| ERRORS.error_for("set", namespace, Some(shard_id), e))?;
        Ok(if result.rows_affected() > 0 {
            SetOutcome::Advanced
        } else {
            SetOutcome::NotAdvanced
        })
    }

    /// One attempt at a write through the pool.
    async fn write(
        &self,
        namespace: &str,
        shard_id: &str,
        columns: &Columns,
    ) -> Result<SetOutcome, StoreError> {
        self.upsert(&self.pool, namespace, shard_id, columns).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_server_errors_by_code() {
        for (code, retryable) in [
            ("40001", true),
            ("40P01", true),
            ("57P01", true),
            ("08006", true),
            ("08003", true),
            ("42P01", false),
            ("42601", false),
            ("28P01", false),
            ("23505", false),
        ] {
            assert_eq!(retryable_code(code), retryable, "{code}");
        }
    }
}
