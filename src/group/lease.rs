//! A lease (one row of the lease table per shard) and the back-end interface: every write is
//! conditional, so two workers can never both believe they hold a shard and write its
//! checkpoint.

use std::sync::Arc;

use async_trait::async_trait;
use kinesis_tower_layers::{BoxError, Checkpoint};

/// One shard's lease as the table holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// The shard id (the table's key).
    pub key: String,
    /// The worker holding the lease; `None` when nobody does.
    pub owner: Option<String>,
    /// The fencing token: every renewal, claim, checkpoint and release adds one, and each of
    /// them is conditional on the value the writer last saw. Others judge the owner alive as
    /// long as it moves.
    pub counter: u64,
    /// The shard's checkpoint; `None` when reading starts at the consumer's start position.
    pub checkpoint: Option<Checkpoint>,
    /// How many times the owner changed since the last checkpoint.
    pub owner_switches: u64,
    /// The shard's parents (a split has one, a merge two).
    pub parents: Vec<String>,
    /// A worker that asked the owner to hand the lease over (a cooperative handoff).
    pub handoff_to: Option<String>,
}

impl Lease {
    /// A new, unowned lease for `key` with these parents.
    pub fn new(key: impl Into<String>, parents: Vec<String>) -> Self {
        Self {
            key: key.into(),
            owner: None,
            counter: 0,
            checkpoint: None,
            owner_switches: 0,
            parents,
            handoff_to: None,
        }
    }

    /// Whether the shard was read to its end.
    pub fn is_finished(&self) -> bool {
        self.checkpoint == Some(Checkpoint::ShardEnd)
    }

    /// Whether `worker` holds the lease.
    pub fn is_owned_by(&self, worker: &str) -> bool {
        self.owner.as_deref() == Some(worker)
    }
}

/// An error of a lease back-end. A refused condition is not an error: the operations answer
/// `false` / `None` for it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// The back-end failed or could not be reached.
    #[error("lease table {backend} ({table}): {operation} failed{}: {source}; check that the back-end is reachable and the lease table exists (create it with create_table)", key.as_deref().map(|k| format!(" for lease {k}")).unwrap_or_default())]
    Backend {
        /// `dynamodb` or `postgres`.
        backend: &'static str,
        /// The table.
        table: String,
        /// What was being done (`list`, `renew`, `claim`, ...).
        operation: &'static str,
        /// The lease, when the operation had one.
        key: Option<String>,
        /// Whether trying again later may succeed.
        retryable: bool,
        /// The back-end's own error.
        #[source]
        source: BoxError,
    },
    /// A row of the lease table that is not a lease this library (or the KCL) wrote.
    #[error(
        "lease table {table}: the row for {key} is not a lease: {reason}; fix or delete that row"
    )]
    Corrupt {
        /// The table.
        table: String,
        /// The row's key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A table or group name the back-end cannot take.
    #[error("invalid lease {what} {name:?}: {reason}")]
    InvalidName {
        /// `table name` or `group name`.
        what: &'static str,
        /// The rejected name.
        name: String,
        /// What is allowed.
        reason: &'static str,
    },
}

impl LeaseError {
    /// Whether trying the same operation again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            LeaseError::Backend {
                retryable: true,
                ..
            }
        )
    }
}

/// Where a group's leases live: DynamoDB (in the KCL's table layout) or Postgres.
///
/// Every write is conditional on what the writer last saw (owner and counter), and answers
/// whether the condition held; the caller never learns of a refused write as an error. Each
/// write that changes ownership or progress adds one to the counter, except a handoff request
/// (so the owner's renewals keep working while it finishes).
#[async_trait]
pub trait LeaseBackend: Send + Sync + 'static {
    /// `dynamodb`, `postgres`, ...: for logs and errors.
    fn name(&self) -> &'static str;

    /// Every lease of the group, in one query (strongly consistent where the back-end has the
    /// choice).
    async fn list(&self) -> Result<Vec<Lease>, LeaseError>;

    /// Creates the lease unless a row for its key exists (then nothing changes).
    async fn create(&self, lease: &Lease) -> Result<(), LeaseError>;

    /// Takes the lease for `worker`, if its owner and counter are still those of `seen`: owner
    /// `worker`, counter + 1, the handoff request cleared, `owner_switches` + 1 if the owner
    /// changes. Answers the lease as written, or `None` if the condition failed.
    async fn claim(&self, seen: &Lease, worker: &str) -> Result<Option<Lease>, LeaseError>;

    /// Renews a held lease: counter `counter` → `counter + 1`, if `worker` still holds it at
    /// `counter`. Answers whether it did.
    async fn renew(&self, key: &str, worker: &str, counter: u64) -> Result<bool, LeaseError>;

    /// Writes the checkpoint of a held lease (counter + 1, `owner_switches` = 0), if `worker`
    /// still holds it at `counter`. Answers whether it did.
    async fn checkpoint(
        &self,
        key: &str,
        worker: &str,
        counter: u64,
        checkpoint: Checkpoint,
    ) -> Result<bool, LeaseError>;

    /// Lets a held lease go (counter + 1, the handoff request cleared), if `worker` still holds
    /// it at `counter`: to nobody, or straight to `to` (a cooperative handoff:
    /// `owner_switches` + 1), which also requires that the lease's handoff request is still
    /// `to`'s (a withdrawn request is not answered). Answers whether it did.
    async fn release(
        &self,
        key: &str,
        worker: &str,
        counter: u64,
        to: Option<&str>,
    ) -> Result<bool, LeaseError>;

    /// Asks `owner` to hand the lease to `worker`, if `owner` still holds it and nobody asked
    /// yet. The counter does not move, so the owner's renewals go on while it finishes the
    /// shard. Answers whether the request was written.
    async fn request_handoff(
        &self,
        key: &str,
        owner: &str,
        worker: &str,
    ) -> Result<bool, LeaseError>;

    /// Withdraws `worker`'s handoff request on the lease, if the request there is still
    /// `worker`'s: a worker that stops must not be handed leases it will never read. The
    /// counter does not move. Answers whether a request was withdrawn.
    async fn withdraw_handoff(&self, key: &str, worker: &str) -> Result<bool, LeaseError>;
}

macro_rules! forward {
    ($($ptr:ident),*) => {$(
        #[async_trait]
        impl<T: LeaseBackend + ?Sized> LeaseBackend for $ptr<T> {
            fn name(&self) -> &'static str {
                (**self).name()
            }
            async fn list(&self) -> Result<Vec<Lease>, LeaseError> {
                (**self).list().await
            }
            async fn create(&self, lease: &Lease) -> Result<(), LeaseError> {
                (**self).create(lease).await
            }
            async fn claim(&self, seen: &Lease, worker: &str) -> Result<Option<Lease>, LeaseError> {
                (**self).claim(seen, worker).await
            }
            async fn renew(&self, key: &str, worker: &str, counter: u64) -> Result<bool, LeaseError> {
                (**self).renew(key, worker, counter).await
            }
            async fn checkpoint(
                &self,
                key: &str,
                worker: &str,
                counter: u64,
                checkpoint: Checkpoint,
            ) -> Result<bool, LeaseError> {
                (**self).checkpoint(key, worker, counter, checkpoint).await
            }
            async fn release(
                &self,
                key: &str,
                worker: &str,
                counter: u64,
                to: Option<&str>,
            ) -> Result<bool, LeaseError> {
                (**self).release(key, worker, counter, to).await
            }
            async fn request_handoff(
                &self,
                key: &str,
                owner: &str,
                worker: &str,
            ) -> Result<bool, LeaseError> {
                (**self).request_handoff(key, owner, worker).await
            }
            async fn withdraw_handoff(&self, key: &str, worker: &str) -> Result<bool, LeaseError> {
                (**self).withdraw_handoff(key, worker).await
            }
        }
    )*};
}

forward!(Box, Arc);
