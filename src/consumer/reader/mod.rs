//! Shard readers: one interface that yields a shard's batches, in order, into the shard's
//! bounded buffer. Two readers sit behind it: polling (GetRecords in a loop) and enhanced
//! fan-out (SubscribeToShard). Both start a shard the same way (`cursor`) and report to the
//! consumer the same way (`context`).

pub(crate) mod buffer;
mod context;
mod cursor;
mod fan_out;
mod metrics;
mod polling;

use futures::future::BoxFuture;
use kinesis_tower_layers::{Batch, ShardId};
use tokio::sync::mpsc::UnboundedSender;

use super::assignment::{Read, ShardStart};
use crate::kinesis::ChildShard;
use crate::Error;
pub(crate) use buffer::{BufferPermit, ShardBuffer};
pub(crate) use fan_out::FanOutReader;
pub(crate) use polling::PollingReader;

/// What a reader tells the consumer about its shard.
#[derive(Debug)]
pub(crate) enum ReaderEvent {
    /// Records (or a heartbeat: none, from a poll that found nothing; or the last batch of a
    /// closed shard, marked `ShardEnd`) with the buffer room they take.
    Batch { batch: Batch, permit: BufferPermit },
    /// A closed shard's children, reported before its last batch.
    Children(Vec<ChildShard>),
    /// The reader resumes from a stored checkpoint (an earlier run started the shard).
    Resumed,
    /// The shard needs no reading: its checkpoint says it ended, or it is skipped.
    AlreadyFinished { read: Read },
    /// An error that retrying will not fix.
    Failed(Error),
    /// The store says the shard ended, but the listing its start came from showed it open:
    /// `Error` is what to report if the next listing still does.
    EndedWhileListedOpen(Error),
    /// Kinesis says the shard does not exist: expired, or the stream is gone. `Error` is what to
    /// report if a listing still shows the shard.
    Gone(Error),
}

/// Where a reader sends its shard's events.
#[derive(Clone, Debug)]
pub(crate) struct ReaderOutput {
    shard: ShardId,
    tx: UnboundedSender<(ShardId, ReaderEvent)>,
}

impl ReaderOutput {
    pub(crate) fn new(shard: ShardId, tx: UnboundedSender<(ShardId, ReaderEvent)>) -> Self {
        Self { shard, tx }
    }

    /// Sends `event`; false when the consumer no longer listens (the reader should stop).
    pub(crate) fn send(&self, event: ReaderEvent) -> bool {
        self.tx.send((self.shard.clone(), event)).is_ok()
    }
}

/// A way of reading shards. `read` reads one shard from its checkpoint (or, without one, from
/// `start`'s position) until it ends, yielding its batches in order through `output`, taking
/// room in `buffer` for what it fetches (a slow handler stops the reading); the consumer
/// cancels the future to stop it.
pub(crate) trait ShardReader: Send + Sync + 'static {
    fn read(
        &self,
        start: ShardStart,
        buffer: ShardBuffer,
        output: ReaderOutput,
    ) -> BoxFuture<'static, ()>;

    /// Called once when the run ends, after every shard's reader has stopped.
    fn finish(&self) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}
