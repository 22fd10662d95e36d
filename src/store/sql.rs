//! What the Postgres and MySQL stores share: table-name validation and quoting, the columns a
//! checkpoint is written as, reading one back, and turning sqlx errors into [`StoreError`]s.

use kinesis_tower_layers::{Checkpoint, StoreError};

/// Validates `name` (`table` or `schema.table`; each part 1 to 63 letters, digits and `_`,
/// starting with a letter or `_`) and returns it quoted with `quote` (`"` or `` ` ``), so the
/// exact name is used (case included) and no keyword can clash.
///
/// Table names are spliced into SQL (they cannot be bound), so nothing else passes.
pub(crate) fn quote_table(name: &str, quote: char) -> Result<String, StoreError> {
    let part_ok = |part: &str| {
        let mut bytes = part.bytes();
        bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && part.len() <= 63
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 || !parts.iter().all(|p| part_ok(p)) {
        return Err(StoreError::InvalidName {
            what: "table name",
            name: name.to_owned(),
            reason: "use `table` or `schema.table`, each part 1 to 63 letters, digits and '_', \
                     starting with a letter or '_'",
        });
    }
    Ok(parts
        .iter()
        .map(|p| format!("{quote}{p}{quote}"))
        .collect::<Vec<_>>()
        .join("."))
}

/// A checkpoint as the columns beside its sort key: the decimal sequence number (`None` at shard
/// end), the sub-sequence number and the shard-end flag.
pub(crate) struct Columns {
    /// `Checkpoint::sort_key`: the column the server compares.
    pub(crate) sort_key: String,
    /// Decimal sequence number; `None` at shard end.
    pub(crate) sequence_number: Option<String>,
    /// KPL sub-sequence number.
    pub(crate) sub_sequence_number: Option<u64>,
    /// Whether this is `Checkpoint::ShardEnd`.
    pub(crate) shard_end: bool,
}

impl Columns {
    pub(crate) fn of(checkpoint: &Checkpoint) -> Self {
        let (sequence_number, sub_sequence_number, shard_end) = match checkpoint {
            Checkpoint::Sequence {
                sequence_number,
                sub_sequence_number,
            } => (
                Some(sequence_number.to_string()),
                *sub_sequence_number,
                false,
            ),
            Checkpoint::StartedAt { sequence_number } => {
                (Some(sequence_number.to_string()), None, false)
            }
            Checkpoint::ShardEnd => (None, None, true),
            // Where reading started, by time: only the sort key says it.
            _ => (None, None, false),
        };
        Self {
            sort_key: checkpoint.sort_key(),
            sequence_number,
            sub_sequence_number,
            shard_end,
        }
    }
}

/// Reads a stored sort key back; anything else than a key this library wrote is
/// [`StoreError::Corrupt`], never "no checkpoint".
pub(crate) fn parse_sort_key(
    namespace: &str,
    shard_id: &str,
    key: &str,
) -> Result<Checkpoint, StoreError> {
    Checkpoint::from_sort_key(key).map_err(|e| StoreError::Corrupt {
        namespace: namespace.to_owned(),
        shard_id: shard_id.to_owned(),
        reason: e.to_string(),
    })
}

/// Classifies sqlx errors for one back-end: `database` decides for errors the server sent.
#[derive(Clone, Copy)]
pub(crate) struct ErrorKind {
    /// `postgres` or `mysql`.
    pub(crate) backend: &'static str,
    /// Whether an error the server reported may succeed when tried again.
    pub(crate) database: fn(&dyn sqlx::error::DatabaseError) -> bool,
}

impl ErrorKind {
    /// Whether trying again may succeed: connection failures (refused, reset, closed by the
    /// server), pool timeouts, and what `database` says of server errors.
    pub(crate) fn is_retryable(&self, e: &sqlx::Error) -> bool {
        match e {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => (self.database)(db.as_ref()),
            _ => false,
        }
    }

    /// A `StoreError::Backend` for an operation without a shard.
    pub(crate) fn error(&self, operation: &'static str, e: sqlx::Error) -> StoreError {
        StoreError::Backend {
            backend: self.backend,
            operation,
            namespace: None,
            shard_id: None,
            retryable: self.is_retryable(&e),
            source: Box::new(e),
        }
    }

    /// A `StoreError::Backend` naming the namespace and, when there is one, the shard.
    pub(crate) fn error_for(
        &self,
        operation: &'static str,
        namespace: &str,
        shard_id: Option<&str>,
        e: sqlx::Error,
    ) -> StoreError {
        StoreError::Backend {
            backend: self.backend,
            operation,
            namespace: Some(namespace.to_owned()),
            shard_id: shard_id.map(str::to_owned),
            retryable: self.is_retryable(&e),
            source: Box::new(e),
        }
    }
}

/// What a SQL store does the same way on every database: its constructors and accessors,
/// reading a checkpoint, and the [`CheckpointStore`](kinesis_tower_layers::CheckpointStore)
/// impl (each round trip under `with_retries`).
///
/// The store type has the fields `pool: sqlx::Pool<$db>`, `table: Arc<str>` and
/// `sql: Arc<Queries>`; its module defines `BACKEND`, `ERRORS`, `Queries` (with `Queries::new`
/// and the `create`, `get` and `list` statements; the last two select text columns),
/// `created_meanwhile` (whether a failed `CREATE TABLE IF NOT EXISTS` lost a race), and
/// `write` (one attempt at a set through the pool) and `upsert` (one on a given connection).
macro_rules! sql_store {
    ($store:ident, $db:ty, conn = $conn:ty, quote = $quote:literal, url = $url:literal) => {
        impl $store {
            #[doc = concat!("Connects to `", $url, "` and creates the `kinesis_checkpoints` table if it does not exist.")]
            pub async fn connect(url: &str) -> Result<Self, StoreError> {
                Self::connect_with_table(url, $crate::store::DEFAULT_TABLE).await
            }

            /// Connects to `url` with checkpoints in `table`, created if missing. The name is
            /// `table` or `schema.table` (MySQL: `database.table`), each part 1 to 63 letters,
            /// digits and `_`, starting with a letter or `_`; it is quoted, so used exactly as
            /// given, case included.
            pub async fn connect_with_table(url: &str, table: &str) -> Result<Self, StoreError> {
                let quoted = $crate::store::sql::quote_table(table, $quote)?;
                let pool = sqlx::pool::PoolOptions::<$db>::new()
                    .acquire_timeout(std::time::Duration::from_secs(5))
                    .connect(url)
                    .await
                    .map_err(|e| ERRORS.error("connect", e))?;
                let store = Self::with_quoted(pool, table, &quoted);
                store.create_table().await?;
                Ok(store)
            }

            /// Uses the application's pool and `table` (validated as in
            /// [`connect_with_table`](Self::connect_with_table)); call
            /// [`create_table`](Self::create_table) if it may not exist yet.
            pub fn from_pool(pool: sqlx::Pool<$db>, table: &str) -> Result<Self, StoreError> {
                let quoted = $crate::store::sql::quote_table(table, $quote)?;
                Ok(Self::with_quoted(pool, table, &quoted))
            }

            fn with_quoted(pool: sqlx::Pool<$db>, table: &str, quoted: &str) -> Self {
                Self {
                    pool,
                    table: table.into(),
                    sql: std::sync::Arc::new(Queries::new(quoted)),
                }
            }

            /// Creates the table if it does not exist (the DDL is in the type's docs); safe to
            /// call from several processes at once.
            pub async fn create_table(&self) -> Result<(), StoreError> {
                $crate::store::retry::with_retries(BACKEND, "create table", || async {
                    match sqlx::Executor::execute(&self.pool, self.sql.create.as_str()).await {
                        Ok(_) => Ok(()),
                        Err(e) if created_meanwhile(&e) => Ok(()),
                        Err(e) => Err(ERRORS.error("create table", e)),
                    }
                })
                .await
            }

            /// This store behind a [`BufferedStore`](crate::store::BufferedStore): checkpoints
            /// are kept in memory and written every second (see
            /// [`flush_interval`](crate::store::BufferedStore::flush_interval)) and on `flush`,
            /// which is how a consumer should usually use it.
            pub fn buffered(self) -> $crate::store::BufferedStore<Self> {
                $crate::store::BufferedStore::new(self)
            }

            /// The pool.
            pub fn pool(&self) -> &sqlx::Pool<$db> {
                &self.pool
            }

            /// The table name as given.
            pub fn table(&self) -> &str {
                &self.table
            }

            /// Moves the shard's checkpoint forward inside the caller's transaction (pass
            /// `&mut tx`), with the same server-side guard as
            /// [`set`](kinesis_tower_layers::CheckpointStore::set): the checkpoint commits or
            /// rolls back with the handler's own writes, which is what makes output
            /// exactly-once (see the example on the type).
            ///
            /// Not retried: retry the whole transaction.
            pub async fn set_in(
                &self,
                conn: &mut $conn,
                namespace: &str,
                shard_id: &str,
                checkpoint: Checkpoint,
            ) -> Result<SetOutcome, StoreError> {
                let columns = $crate::store::sql::Columns::of(&checkpoint);
                self.upsert(conn, namespace, shard_id, &columns).await
            }

            /// The shard's checkpoint as the caller's transaction sees it.
            pub async fn get_in(
                &self,
                conn: &mut $conn,
                namespace: &str,
                shard_id: &str,
            ) -> Result<Option<Checkpoint>, StoreError> {
                self.select(conn, namespace, shard_id).await
            }

            async fn select<'e, E: sqlx::Executor<'e, Database = $db>>(
                &self,
                executor: E,
                namespace: &str,
                shard_id: &str,
            ) -> Result<Option<Checkpoint>, StoreError> {
                let key: Option<(String,)> = sqlx::query_as(&self.sql.get)
                    .bind(namespace)
                    .bind(shard_id)
                    .fetch_optional(executor)
                    .await
                    .map_err(|e| ERRORS.error_for("get", namespace, Some(shard_id), e))?;
                key.map(|(key,)| $crate::store::sql::parse_sort_key(namespace, shard_id, &key))
                    .transpose()
            }
        }

        #[async_trait::async_trait]
        impl kinesis_tower_layers::CheckpointStore for $store {
            async fn get(
                &self,
                namespace: &str,
                shard_id: &str,
            ) -> Result<Option<Checkpoint>, StoreError> {
                $crate::store::retry::with_retries(BACKEND, "get", || {
                    self.select(&self.pool, namespace, shard_id)
                })
                .await
            }

            async fn set(
                &self,
                namespace: &str,
                shard_id: &str,
                checkpoint: Checkpoint,
            ) -> Result<SetOutcome, StoreError> {
                let columns = $crate::store::sql::Columns::of(&checkpoint);
                $crate::store::retry::with_retries(BACKEND, "set", || {
                    self.write(namespace, shard_id, &columns)
                })
                .await
            }

            async fn flush(&self) -> Result<(), StoreError> {
                Ok(())
            }

            async fn list(
                &self,
                namespace: &str,
            ) -> Result<Vec<(String, Checkpoint)>, StoreError> {
                let rows: Vec<(String, String)> =
                    $crate::store::retry::with_retries(BACKEND, "list", || async {
                        sqlx::query_as(&self.sql.list)
                            .bind(namespace)
                            .fetch_all(&self.pool)
                            .await
                            .map_err(|e| ERRORS.error_for("list", namespace, None, e))
                    })
                    .await?;
                rows.into_iter()
                    .map(|(shard, key)| {
                        let checkpoint =
                            $crate::store::sql::parse_sort_key(namespace, &shard, &key)?;
                        Ok((shard, checkpoint))
                    })
                    .collect()
            }
        }
    };
}
pub(crate) use sql_store;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated_and_quoted() {
        assert_eq!(
            quote_table("kinesis_checkpoints", '"').unwrap(),
            "\"kinesis_checkpoints\""
        );
        assert_eq!(
            quote_table("ops.Checkpoints_2", '`').unwrap(),
            "`ops`.`Checkpoints_2`"
        );
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a.b.c",
            "x; DROP TABLE y",
            "1abc",
            "a-b",
            "a\"b",
            "a`b",
            "a b",
            "é",
            &"a".repeat(64),
        ] {
            let err = quote_table(bad, '"').unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidName { .. }),
                "{bad}: {err}"
            );
        }
        assert!(quote_table(&"a".repeat(63), '`').is_ok());
    }

    #[test]
    fn columns_of_each_kind_of_checkpoint() {
        let c = Columns::of(&Checkpoint::Sequence {
            sequence_number: "0042".parse().unwrap(),
            sub_sequence_number: Some(7),
        });
        assert_eq!(c.sequence_number.as_deref(), Some("42"));
        assert_eq!(c.sub_sequence_number, Some(7));
        assert!(!c.shard_end);
        let end = Columns::of(&Checkpoint::ShardEnd);
        assert_eq!((end.sequence_number, end.shard_end), (None, true));
        assert_eq!(end.sort_key, "z");
    }

    #[test]
    fn garbage_sort_keys_are_corrupt_not_missing() {
        let err = parse_sort_key("ns", "s", "garbage").unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }
}
