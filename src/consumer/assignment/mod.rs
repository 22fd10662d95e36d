//! Shard assignment: which shards this consumer reads, and when each may start.
//!
//! Discovery (ListShards) and the shard lineage produce a stream of [`Assignment`] events: a
//! shard may start (its parents are finished), a shard ended, a shard is taken away. The
//! consumer reads whatever the stream tells it to. Between the two sits an
//! [`AssignmentFilter`]: in a single process every event passes ([`EveryShard`]); a user can
//! restrict a consumer to chosen shards ([`OnlyShards`], as the Go library's `ScanShard` reads
//! one shard); a consumer group filters by the leases it holds and revokes what it loses.

mod discovery;
mod lineage;
mod source;

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use kinesis_tower_layers::ShardId;
use tokio::sync::oneshot;

pub(crate) use lineage::{Fallback, Read};
pub(crate) use source::{spawn_source, Feedback, SourceEvent};

/// A stream of assignment events, what an [`AssignmentFilter`] takes and returns.
pub type Assignments = BoxStream<'static, Assignment>;

/// One change in which shards this consumer reads.
#[derive(Debug)]
#[non_exhaustive]
pub enum Assignment {
    /// The shard may be read now (every parent is finished). It is read from its checkpoint,
    /// or, without one, from the position the lineage chose (the start position, or
    /// `TRIM_HORIZON` for a child of a shard that was read).
    Start(ShardStart),
    /// The shard is finished: read to its end with [`Checkpoint::ShardEnd`] stored, or found
    /// to need no reading. Informational: the consumer has already stopped reading it.
    ///
    /// [`Checkpoint::ShardEnd`]: kinesis_tower_layers::Checkpoint::ShardEnd
    Ended(ShardId),
    /// Stop reading the shard: its reader stops, its in-flight batch finishes, it gets a last
    /// batch marked [`BatchEnd::Revoked`](kinesis_tower_layers::BatchEnd::Revoked) (so
    /// buffering layers flush), and the store is flushed; then [`RevocationDone`] resolves.
    /// What its reader had fetched and not yet handed over is dropped: whoever reads the shard
    /// next reads it again from the checkpoint. To read the shard here again later, a filter
    /// sends its [`ShardStart`] again (keep a clone of the one it let through).
    Revoke(Revocation),
}

impl Assignment {
    /// The shard the event is about.
    pub fn shard_id(&self) -> &ShardId {
        match self {
            Assignment::Start(start) => &start.shard_id,
            Assignment::Ended(shard) => shard,
            Assignment::Revoke(revocation) => &revocation.shard_id,
        }
    }
}

/// A shard that may start, with where it starts when it has no checkpoint.
#[derive(Clone, Debug)]
pub struct ShardStart {
    pub(crate) shard_id: ShardId,
    /// The shard's parents, as the listing showed them.
    pub(crate) parents: Vec<ShardId>,
    pub(crate) fallback: Fallback,
    /// The latest listing shows the shard open (a stored `ShardEnd` for it is then wrong).
    pub(crate) listed_open: bool,
}

impl ShardStart {
    /// The shard.
    pub fn shard_id(&self) -> &ShardId {
        &self.shard_id
    }

    /// The shard's parents (one for a split, two for a merge, none for an original shard).
    pub fn parents(&self) -> &[ShardId] {
        &self.parents
    }
}

/// A request to stop reading one shard; see [`Assignment::Revoke`].
pub struct Revocation {
    pub(crate) shard_id: ShardId,
    done: Option<oneshot::Sender<()>>,
}

impl fmt::Debug for Revocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Revocation")
            .field("shard_id", &self.shard_id)
            .finish_non_exhaustive()
    }
}

impl Revocation {
    /// A revocation of `shard_id`, and the future that resolves once the consumer has stopped
    /// the shard, finished its in-flight work and flushed its checkpoint (or found it was not
    /// reading it, or stopped running).
    pub fn new(shard_id: impl Into<ShardId>) -> (Self, RevocationDone) {
        let (tx, rx) = oneshot::channel();
        (
            Self {
                shard_id: shard_id.into(),
                done: Some(tx),
            },
            RevocationDone(rx),
        )
    }

    /// The shard.
    pub fn shard_id(&self) -> &ShardId {
        &self.shard_id
    }

    /// Says the revocation is complete.
    pub(crate) fn complete(mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

/// Resolves when a [`Revocation`] is complete. Resolves too if the consumer stopped first (a
/// run that ends flushes every checkpoint).
#[derive(Debug)]
pub struct RevocationDone(oneshot::Receiver<()>);

impl Future for RevocationDone {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(drop)
    }
}

/// Decides which shards this consumer reads, by transforming the stream of assignment events.
///
/// It may drop [`Assignment::Start`] events (the shard is read elsewhere, or not at all), hold
/// them back (until a lease is acquired), and add [`Assignment::Revoke`] events (a lease was
/// lost). A shard whose start was dropped counts as finished for its children once the store
/// holds its `ShardEnd` (written by whoever read it); children start after that.
///
/// Implemented for closures `Fn(Assignments) -> Assignments`. The filter is applied once per
/// run.
///
/// ```
/// use futures::StreamExt;
/// use kinesis_tower::assignment::{Assignment, Assignments};
///
/// // Only the shards whose number is even.
/// let even = |events: Assignments| -> Assignments {
///     events
///         .filter(|event| {
///             let keep = !matches!(event, Assignment::Start(start)
///                 if start.shard_id().as_str().ends_with(['1', '3', '5', '7', '9']));
///             async move { keep }
///         })
///         .boxed()
/// };
/// # let _ = kinesis_tower::Consumer::builder().assignment_filter(even);
/// ```
pub trait AssignmentFilter: Send + Sync + 'static {
    /// The events this consumer acts on, from every event discovery and lineage produce.
    fn filter(&self, assignments: Assignments) -> Assignments;

    /// Called when the run starts to stop (a shutdown signal or a failure): from now on the
    /// consumer takes no new start. A consumer group stops claiming leases here. Does nothing
    /// by default.
    fn stopping(&self) {}

    /// Called once per run, after the run has stopped reading and flushed its checkpoints,
    /// and awaited (up to the drain timeout, at least 5 s) before the run returns. A consumer
    /// group releases its leases here. Does nothing by default.
    fn finish(&self) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }
}

impl<F> AssignmentFilter for F
where
    F: Fn(Assignments) -> Assignments + Send + Sync + 'static,
{
    fn filter(&self, assignments: Assignments) -> Assignments {
        self(assignments)
    }
}

/// Every shard: the default, single-process filter.
#[derive(Clone, Copy, Debug, Default)]
pub struct EveryShard;

impl AssignmentFilter for EveryShard {
    fn filter(&self, assignments: Assignments) -> Assignments {
        assignments
    }
}

/// Only the chosen shards (`ConsumerBuilder::shards`). Their children are not read unless
/// chosen too; a chosen child starts once its parents are finished, here or by whoever reads
/// them (their `ShardEnd` in the store).
#[derive(Clone, Debug)]
pub struct OnlyShards(HashSet<ShardId>);

impl OnlyShards {
    /// These shards.
    pub fn new<I, S>(shards: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<ShardId>,
    {
        Self(shards.into_iter().map(Into::into).collect())
    }

    /// Whether `shard` is chosen.
    pub fn contains(&self, shard: &str) -> bool {
        self.0.contains(shard)
    }
}

impl AssignmentFilter for OnlyShards {
    fn filter(&self, assignments: Assignments) -> Assignments {
        let chosen = self.0.clone();
        assignments
            .filter(move |event| {
                let keep = match event {
                    Assignment::Start(start) => chosen.contains(start.shard_id.as_str()),
                    _ => true,
                };
                std::future::ready(keep)
            })
            .boxed()
    }
}
