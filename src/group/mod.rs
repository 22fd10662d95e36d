//! Consumer groups: several processes share a stream, each reading the shards whose leases it
//! holds.
//!
//! A group is a filter on the consumer's [assignment](crate::assignment) stream and nothing
//! else: discovery still finds every shard and says when each may start (parents first); the
//! group lets a start through once this worker holds the shard's lease, and revokes the shard
//! when the lease goes. Leases live in a table ([`DynamoDbLeases`] in the Java KCL's layout,
//! or [`PostgresLeases`]), and so do the checkpoints: within a group the lease table is the
//! checkpoint store.
//!
//! - **Fenced.** Every write is conditional on the owner and the lease counter, which each
//!   renewal, claim, checkpoint and release moves. A worker that lost a lease cannot write its
//!   checkpoint: the write is refused ([`StoreError::LeaseLost`](crate::StoreError)), the
//!   shard stops there, and its new owner reads on from the last checkpoint written under the
//!   lease.
//! - **Liveness on the observer's clock.** A lease is expired when its counter has not moved
//!   for the lease duration as measured by the worker looking at it; clocks are never compared
//!   across hosts. A holder whose own last renewal is older than the lease duration stops the
//!   shard without writing.
//! - **Fair share, fast.** Each worker aims at `ceil(claimable leases / live workers)` (at
//!   most [`max_leases`](ConsumerGroupBuilder::max_leases)): it claims unowned leases, then
//!   expired ones (oldest first), and otherwise asks the most-loaded worker for a
//!   **cooperative handoff**: the owner stops the shard, lets its in-flight batch finish (the
//!   last batch is marked [`BatchEnd::Revoked`](crate::BatchEnd), so layers flush), writes
//!   its checkpoint and hands the lease straight to the requester.
//! - **Children after parents**, across workers: a child's lease is claimable only when the
//!   table shows every parent finished.
//! - **Graceful shutdown releases every lease** after the final checkpoint flush, so others
//!   take over within one listing. A stopping worker at once withdraws its handoff requests
//!   (an owner still finishing such a shard lets it go to nobody) and releases any lease
//!   handed to it meanwhile, so none is left with a worker that has gone (unless the lease
//!   table fails just then: logged, and the lease expires).
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # async fn example() -> Result<(), kinesis_tower::BoxError> {
//! use kinesis_tower::group::{ConsumerGroup, PostgresLeases};
//! use kinesis_tower::{service_fn, Batch, BoxError, Consumer};
//!
//! let pool = sqlx::PgPool::connect("postgres://127.0.0.1/test").await?;
//! let leases = PostgresLeases::new(pool, "orders-processor")?;
//! leases.create_table().await?;
//! let group = ConsumerGroup::builder(leases, "worker-1").build()?;
//! let consumer = Consumer::builder().stream_name("orders").group(group).build()?;
//! consumer
//!     .process(service_fn(|batch: Batch| async move {
//!         println!("{} records from {}", batch.records.len(), batch.shard_id);
//!         Ok::<_, BoxError>(())
//!     }))
//!     .await?;
//! # Ok(()) }
//! ```

mod held;
mod lease;
mod memory;
mod planner;
mod store;
mod worker;

#[cfg(feature = "dynamodb")]
mod dynamodb;
#[cfg(feature = "postgres")]
mod postgres;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::assignment::{AssignmentFilter, Assignments};
use crate::Error;
use held::Leases;

#[cfg(feature = "dynamodb")]
pub use dynamodb::DynamoDbLeases;
pub use lease::{Lease, LeaseBackend, LeaseError};
pub use memory::MemoryLeases;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresLeases, DEFAULT_LEASE_TABLE};
pub use store::GroupStore;

/// How a group times its leases.
#[derive(Clone, Debug)]
pub(crate) struct GroupSettings {
    pub(crate) lease_duration: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) checkpoint_interval: Duration,
    pub(crate) handoff_timeout: Duration,
    pub(crate) max_leases: Option<usize>,
}

impl GroupSettings {
    /// Each held lease is renewed three times per lease duration.
    pub(crate) fn renew_interval(&self) -> Duration {
        self.lease_duration / 3
    }
}

impl Default for GroupSettings {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(10),
            poll_interval: Duration::from_millis(500),
            checkpoint_interval: Duration::from_secs(1),
            handoff_timeout: Duration::from_secs(10),
            max_leases: None,
        }
    }
}

/// A worker of a consumer group: give it to [`ConsumerBuilder::group`](crate::ConsumerBuilder::group).
///
/// Cheap to clone. One run at a time: a worker holds one set of leases, so do not run two
/// consumers (or two runs of one consumer) with the same `ConsumerGroup` at once; give each
/// its own worker name. A run that ends (a signal, an error, `ShutdownHandle::shutdown`)
/// releases every lease after its final checkpoint flush; a run whose future is dropped
/// without finishing leaves its leases to expire (one lease duration).
#[derive(Clone, Debug)]
pub struct ConsumerGroup {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    leases: Arc<Leases>,
    settings: GroupSettings,
    /// The running loop's stop channel: it releases every lease, then answers.
    stop: Mutex<Option<oneshot::Sender<oneshot::Sender<()>>>>,
    stream: Mutex<String>,
}

impl ConsumerGroup {
    /// A worker named `worker` (unique in the group: a host name, a pod name) on `backend`.
    pub fn builder(backend: impl LeaseBackend, worker: impl Into<String>) -> ConsumerGroupBuilder {
        ConsumerGroupBuilder {
            backend: Arc::new(backend),
            worker: worker.into(),
            settings: GroupSettings::default(),
        }
    }

    /// This worker's name.
    pub fn worker(&self) -> &str {
        &self.inner.leases.worker
    }

    /// The shards whose leases this worker holds now, sorted.
    pub fn held(&self) -> Vec<String> {
        let mut held: Vec<String> = self
            .inner
            .leases
            .all()
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        held.sort();
        held
    }

    /// The checkpoint store of the group (its lease table), which
    /// [`ConsumerBuilder::group`](crate::ConsumerBuilder::group) installs.
    pub fn store(&self) -> GroupStore {
        GroupStore {
            leases: self.inner.leases.clone(),
        }
    }

    pub(crate) fn set_stream(&self, stream: &str) {
        *self
            .inner
            .stream
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = stream.to_owned();
    }
}

impl AssignmentFilter for ConsumerGroup {
    fn filter(&self, assignments: Assignments) -> Assignments {
        let (out, events) = mpsc::unbounded_channel();
        let (lost_tx, lost_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        self.inner.leases.set_lost_channel(Some(lost_tx));
        self.inner
            .leases
            .stopping
            .store(false, std::sync::atomic::Ordering::SeqCst);
        *self
            .inner
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(stop_tx);
        let stream = self
            .inner
            .stream
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let worker = worker::Worker::new(
            self.inner.leases.clone(),
            self.inner.settings.clone(),
            stream,
            out,
        );
        let task = tokio::spawn(worker.run(assignments, lost_rx, stop_rx));
        let guard = AbortOnDrop(task);
        let mut events = events;
        futures::stream::poll_fn(move |cx| {
            let _ = &guard;
            events.poll_recv(cx)
        })
        .boxed()
    }

    fn stopping(&self) {
        self.inner
            .leases
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn finish(&self) -> BoxFuture<'static, ()> {
        let stop = self
            .inner
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let leases = self.inner.leases.clone();
        Box::pin(async move {
            if let Some(stop) = stop {
                let (done_tx, done) = oneshot::channel();
                if stop.send(done_tx).is_ok() {
                    let _ = done.await;
                }
            }
            leases.set_lost_channel(None);
        })
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Builds a [`ConsumerGroup`] worker; every setting has a default.
#[derive(Debug)]
pub struct ConsumerGroupBuilder {
    backend: Arc<dyn LeaseBackend>,
    worker: String,
    settings: GroupSettings,
}

impl ConsumerGroupBuilder {
    /// How long a lease lasts without renewal (default 10 s, as the KCL's failover time).
    /// Others take over a crashed worker's shards after about this long; each held lease is
    /// renewed three times per duration.
    pub fn lease_duration(mut self, duration: Duration) -> Self {
        self.settings.lease_duration = duration;
        self
    }

    /// How often the worker lists the lease table (default 500 ms): one query per listing.
    /// A new worker gets its share, and a released lease a new owner, within about one
    /// listing.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.settings.poll_interval = interval;
        self
    }

    /// How long an accepted checkpoint may wait before it is written with a renewal (default
    /// 1 s). A crash re-delivers at most this much; revocations and shutdown write at once.
    pub fn checkpoint_interval(mut self, interval: Duration) -> Self {
        self.settings.checkpoint_interval = interval;
        self
    }

    /// How long a handoff waits for the shard's in-flight batch before the lease is handed
    /// over anyway (default 10 s); a checkpoint the batch writes later is refused.
    pub fn handoff_timeout(mut self, timeout: Duration) -> Self {
        self.settings.handoff_timeout = timeout;
        self
    }

    /// The most leases this worker holds (default: no limit). Shards beyond what all workers
    /// together may hold are not read.
    pub fn max_leases(mut self, leases: usize) -> Self {
        self.settings.max_leases = Some(leases);
        self
    }

    /// Validates the settings.
    pub fn build(self) -> Result<ConsumerGroup, Error> {
        let s = &self.settings;
        if self.worker.is_empty() || self.worker.len() > 255 {
            return Err(Error::config(
                "group worker",
                "the worker name must be 1 to 255 characters, unique in the group",
            ));
        }
        if s.lease_duration < Duration::from_millis(300) {
            return Err(Error::config(
                "lease_duration",
                format!("{:?} is too short: use at least 300 ms", s.lease_duration),
            ));
        }
        if s.poll_interval.is_zero() || s.poll_interval > s.renew_interval() {
            return Err(Error::config(
                "poll_interval",
                format!(
                    "{:?} must be above zero and at most a third of the lease duration ({:?})",
                    s.poll_interval,
                    s.renew_interval()
                ),
            ));
        }
        if s.checkpoint_interval.is_zero() {
            return Err(Error::config("checkpoint_interval", "must be above zero"));
        }
        if s.max_leases == Some(0) {
            return Err(Error::config("max_leases", "must be at least 1"));
        }
        Ok(ConsumerGroup {
            inner: Arc::new(Inner {
                leases: Arc::new(Leases::new(self.worker, self.backend, s.lease_duration)),
                settings: self.settings,
                stop: Mutex::default(),
                stream: Mutex::default(),
            }),
        })
    }
}
