//! `PostgresLeases`: a group's leases in a PostgreSQL table (feature `postgres`).

use std::sync::Arc;

use async_trait::async_trait;
use kinesis_tower_layers::Checkpoint;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use super::lease::{Lease, LeaseBackend, LeaseError};
use crate::store::postgres::ERRORS;
use crate::store::sql::quote_table;

const BACKEND: &str = "postgres";

/// The lease table used unless another is given.
pub const DEFAULT_LEASE_TABLE: &str = "kinesis_leases";

/// A consumer group's leases in a PostgreSQL table, for teams that keep their checkpoints in
/// Postgres and run no DynamoDB. Several groups share one table (the `group_name` column).
///
/// ```sql
/// CREATE TABLE kinesis_leases (
///     group_name       TEXT NOT NULL,
///     lease_key        TEXT NOT NULL,              -- the shard id
///     lease_owner      TEXT,                       -- NULL when unowned
///     lease_counter    BIGINT NOT NULL DEFAULT 0,  -- the fencing token
///     checkpoint       TEXT COLLATE "C",           -- Checkpoint::sort_key; NULL on a new lease
///     owner_switches   BIGINT NOT NULL DEFAULT 0,  -- owner changes since the last checkpoint
///     parent_shard_ids TEXT[] NOT NULL DEFAULT '{}',
///     handoff_to       TEXT,                       -- a worker that asked for the lease
///     updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
///     PRIMARY KEY (group_name, lease_key)
/// );
/// ```
///
/// Every write is one `UPDATE ... WHERE lease_owner = $me AND lease_counter = $seen`; the
/// listing is one `SELECT` of the group's rows. Times are never read from the database or
/// compared across hosts: liveness is judged from the counter, on each worker's own clock.
#[derive(Clone, Debug)]
pub struct PostgresLeases {
    pool: PgPool,
    group: Arc<str>,
    table: Arc<str>,
    sql: Arc<Queries>,
}

#[derive(Debug)]
struct Queries {
    create_table: String,
    list: String,
    create: String,
    claim: String,
    renew: String,
    checkpoint: String,
    release: String,
    request_handoff: String,
    withdraw_handoff: String,
}

const COLUMNS: &str =
    "lease_key, lease_owner, lease_counter, checkpoint, owner_switches, parent_shard_ids, handoff_to";

impl Queries {
    fn new(t: &str) -> Self {
        let held = "group_name = $1 AND lease_key = $2 AND lease_owner = $3 AND lease_counter = $4";
        Self {
            create_table: format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    group_name       TEXT NOT NULL,
                    lease_key        TEXT NOT NULL,
                    lease_owner      TEXT,
                    lease_counter    BIGINT NOT NULL DEFAULT 0,
                    checkpoint       TEXT COLLATE \"C\",
                    owner_switches   BIGINT NOT NULL DEFAULT 0,
                    parent_shard_ids TEXT[] NOT NULL DEFAULT '{{}}',
                    handoff_to       TEXT,
                    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
                    PRIMARY KEY (group_name, lease_key)
                )"
            ),
            list: format!("SELECT {COLUMNS} FROM {t} WHERE group_name = $1 ORDER BY lease_key COLLATE \"C\""),
            create: format!(
                "INSERT INTO {t} (group_name, lease_key, parent_shard_ids) VALUES ($1, $2, $3)
                 ON CONFLICT (group_name, lease_key) DO NOTHING"
            ),
            claim: format!(
                "UPDATE {t} SET lease_owner = $3, lease_counter = lease_counter + 1,
                    owner_switches = owner_switches + CASE WHEN lease_owner IS DISTINCT FROM $3 THEN 1 ELSE 0 END,
                    handoff_to = NULL, updated_at = now()
                 WHERE group_name = $1 AND lease_key = $2 AND lease_counter = $4
                   AND lease_owner IS NOT DISTINCT FROM $5
                 RETURNING {COLUMNS}"
            ),
            renew: format!(
                "UPDATE {t} SET lease_counter = lease_counter + 1, updated_at = now() WHERE {held}"
            ),
            checkpoint: format!(
                "UPDATE {t} SET lease_counter = lease_counter + 1, checkpoint = $5,
                    owner_switches = 0, updated_at = now()
                 WHERE {held}"
            ),
            release: format!(
                "UPDATE {t} SET lease_counter = lease_counter + 1, lease_owner = $5,
                    owner_switches = owner_switches + CASE WHEN $5::text IS NULL THEN 0 ELSE 1 END,
                    handoff_to = NULL, updated_at = now()
                 WHERE {held} AND ($5::text IS NULL OR handoff_to = $5)"
            ),
            request_handoff: format!(
                "UPDATE {t} SET handoff_to = $4
                 WHERE group_name = $1 AND lease_key = $2 AND lease_owner = $3 AND handoff_to IS NULL"
            ),
            withdraw_handoff: format!(
                "UPDATE {t} SET handoff_to = NULL
                 WHERE group_name = $1 AND lease_key = $2 AND handoff_to = $3"
            ),
        }
    }
}

impl PostgresLeases {
    /// The leases of `group` (one per application and stream: several groups can share the
    /// table) in [`DEFAULT_LEASE_TABLE`].
    pub fn new(pool: PgPool, group: &str) -> Result<Self, LeaseError> {
        Self::with_table(pool, group, DEFAULT_LEASE_TABLE)
    }

    /// The leases of `group` in `table` (`table` or `schema.table`; letters, digits, `_`).
    pub fn with_table(pool: PgPool, group: &str, table: &str) -> Result<Self, LeaseError> {
        if group.is_empty() || group.len() > 255 {
            return Err(LeaseError::InvalidName {
                what: "group name",
                name: group.to_owned(),
                reason: "use 1 to 255 characters",
            });
        }
        let quoted = quote_table(table, '"').map_err(|_| LeaseError::InvalidName {
            what: "table name",
            name: table.to_owned(),
            reason: "use `table` or `schema.table`, each part 1 to 63 letters, digits and '_', starting with a letter or '_'",
        })?;
        Ok(Self {
            pool,
            group: group.into(),
            table: table.into(),
            sql: Arc::new(Queries::new(&quoted)),
        })
    }

    /// Connects to `url` (`postgres://user@host:port/database`) for the leases of `group`.
    pub async fn connect(url: &str, group: &str) -> Result<Self, LeaseError> {
        let pool = PgPool::connect(url)
            .await
            .map_err(|e| LeaseError::Backend {
                backend: BACKEND,
                table: DEFAULT_LEASE_TABLE.to_owned(),
                operation: "connect",
                key: None,
                retryable: ERRORS.is_retryable(&e),
                source: Box::new(e),
            })?;
        Self::new(pool, group)
    }

    /// Creates the table unless it exists.
    pub async fn create_table(&self) -> Result<(), LeaseError> {
        match sqlx::query(&self.sql.create_table)
            .execute(&self.pool)
            .await
        {
            Ok(_) => Ok(()),
            // Two workers creating it at once: the loser sees a duplicate.
            Err(sqlx::Error::Database(db))
                if matches!(db.code().as_deref(), Some("23505" | "42P07")) =>
            {
                Ok(())
            }
            Err(e) => Err(self.error("create table", None, e)),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn error(&self, operation: &'static str, key: Option<&str>, e: sqlx::Error) -> LeaseError {
        LeaseError::Backend {
            backend: BACKEND,
            table: self.table.to_string(),
            operation,
            key: key.map(str::to_owned),
            retryable: ERRORS.is_retryable(&e),
            source: Box::new(e),
        }
    }

    fn parse(&self, row: &PgRow) -> Result<Lease, LeaseError> {
        let key: String = row
            .try_get("lease_key")
            .map_err(|e| self.error("list", None, e))?;
        let corrupt = |reason: String| LeaseError::Corrupt {
            table: self.table.to_string(),
            key: key.clone(),
            reason,
        };
        let get_err = |e: sqlx::Error| corrupt(e.to_string());
        let mut lease = Lease::new(
            key.clone(),
            row.try_get::<Vec<String>, _>("parent_shard_ids")
                .map_err(get_err)?,
        );
        lease.owner = row.try_get("lease_owner").map_err(get_err)?;
        let counter: i64 = row.try_get("lease_counter").map_err(get_err)?;
        lease.counter = u64::try_from(counter)
            .map_err(|_| corrupt(format!("negative lease_counter {counter}")))?;
        let switches: i64 = row.try_get("owner_switches").map_err(get_err)?;
        lease.owner_switches = u64::try_from(switches).unwrap_or(0);
        let checkpoint: Option<String> = row.try_get("checkpoint").map_err(get_err)?;
        lease.checkpoint = checkpoint
            .map(|c| {
                Checkpoint::from_sort_key(&c).map_err(|e| corrupt(format!("checkpoint {c:?}: {e}")))
            })
            .transpose()?;
        lease.handoff_to = row.try_get("handoff_to").map_err(get_err)?;
        Ok(lease)
    }

    async fn execute(
        &self,
        operation: &'static str,
        key: &str,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<bool, LeaseError> {
        let done = query
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(operation, Some(key), e))?;
        Ok(done.rows_affected() == 1)
    }
}

fn counter(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[async_trait]
impl LeaseBackend for PostgresLeases {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn list(&self) -> Result<Vec<Lease>, LeaseError> {
        let rows = sqlx::query(&self.sql.list)
            .bind(&*self.group)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.error("list", None, e))?;
        rows.iter().map(|row| self.parse(row)).collect()
    }

    async fn create(&self, lease: &Lease) -> Result<(), LeaseError> {
        let query = sqlx::query(&self.sql.create)
            .bind(&*self.group)
            .bind(&lease.key)
            .bind(&lease.parents);
        self.execute("create", &lease.key, query).await.map(drop)
    }

    async fn claim(&self, seen: &Lease, worker: &str) -> Result<Option<Lease>, LeaseError> {
        let row = sqlx::query(&self.sql.claim)
            .bind(&*self.group)
            .bind(&seen.key)
            .bind(worker)
            .bind(counter(seen.counter))
            .bind(seen.owner.as_deref())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.error("claim", Some(&seen.key), e))?;
        row.map(|row| self.parse(&row)).transpose()
    }

    async fn renew(&self, key: &str, worker: &str, counter_seen: u64) -> Result<bool, LeaseError> {
        let query = sqlx::query(&self.sql.renew)
            .bind(&*self.group)
            .bind(key)
            .bind(worker)
            .bind(counter(counter_seen));
        self.execute("renew", key, query).await
    }

    async fn checkpoint(
        &self,
        key: &str,
        worker: &str,
        counter_seen: u64,
        checkpoint: Checkpoint,
    ) -> Result<bool, LeaseError> {
        let query = sqlx::query(&self.sql.checkpoint)
            .bind(&*self.group)
            .bind(key)
            .bind(worker)
            .bind(counter(counter_seen))
            .bind(checkpoint.sort_key());
        self.execute("checkpoint", key, query).await
    }

    async fn release(
        &self,
        key: &str,
        worker: &str,
        counter_seen: u64,
        to: Option<&str>,
    ) -> Result<bool, LeaseError> {
        let query = sqlx::query(&self.sql.release)
            .bind(&*self.group)
            .bind(key)
            .bind(worker)
            .bind(counter(counter_seen))
            .bind(to);
        self.execute("release", key, query).await
    }

    async fn request_handoff(
        &self,
        key: &str,
        owner: &str,
        worker: &str,
    ) -> Result<bool, LeaseError> {
        let query = sqlx::query(&self.sql.request_handoff)
            .bind(&*self.group)
            .bind(key)
            .bind(owner)
            .bind(worker);
        self.execute("request handoff", key, query).await
    }

    async fn withdraw_handoff(&self, key: &str, worker: &str) -> Result<bool, LeaseError> {
        let query = sqlx::query(&self.sql.withdraw_handoff)
            .bind(&*self.group)
            .bind(key)
            .bind(worker);
        self.execute("withdraw handoff", key, query).await
    }
}
