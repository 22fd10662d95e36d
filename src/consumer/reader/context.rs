//! What every reader of one shard has: the consumer's shared parts, the shard's buffer and
//! output, its backoff and metrics; and how a reader's early end reaches the consumer.

use std::sync::Arc;
use std::time::Duration;

use kinesis_tower_layers::{Checkpoint, ShardId, StoreError};

use super::buffer::ShardBuffer;
use super::metrics::ReaderMetrics;
use super::{ReaderEvent, ReaderOutput};
use crate::backoff::Backoff;
use crate::consumer::assignment::Read;
use crate::consumer::handle::Shared;
use crate::kinesis::{KinesisError, KinesisErrorKind};
use crate::Error;

/// Why a reader ended early.
pub(super) enum Stop {
    /// Retrying will not help.
    Failed(Error),
    /// The shard was not found: expired, or the stream is gone (the consumer checks).
    Gone(Error),
}

impl From<Error> for Stop {
    fn from(error: Error) -> Self {
        Stop::Failed(error)
    }
}

/// One shard's reading context.
pub(super) struct ShardContext {
    pub shared: Arc<Shared>,
    pub shard: ShardId,
    pub buffer: ShardBuffer,
    pub output: ReaderOutput,
    pub backoff: Backoff,
    pub metrics: ReaderMetrics,
}

impl ShardContext {
    pub fn new(
        shared: Arc<Shared>,
        shard: ShardId,
        buffer: ShardBuffer,
        output: ReaderOutput,
    ) -> Self {
        let settings = &shared.settings;
        Self {
            backoff: Backoff::new(settings.backoff_base, settings.backoff_max),
            metrics: ReaderMetrics::new(settings.stream.stream_name(), &shard),
            shared,
            shard,
            buffer,
            output,
        }
    }

    pub fn stream_name(&self) -> &str {
        self.shared.settings.stream.stream_name()
    }

    fn store_error(&self, source: StoreError) -> Error {
        Error::Store {
            stream: self.stream_name().to_owned(),
            shard: Some(self.shard.to_string()),
            source: Box::new(source),
        }
    }

    /// The shard's stored checkpoint. The stores retry passing failures themselves: one retry
    /// loop per failure.
    pub async fn stored_checkpoint(&self) -> Result<Option<Checkpoint>, Error> {
        self.shared
            .checkpointer
            .get(&self.shard)
            .await
            .map_err(|e| self.store_error(e))
    }

    /// Makes where this shard started durable (before anything is read, by time; before its
    /// first record is handed over, at that record), so a restart resumes there instead of at a
    /// start position that has moved on (`LATEST`, a timestamp) and skipping what came in
    /// meanwhile. `flush: false` when a durable start in time covers the shard already (the
    /// record-precise start then only narrows it, and may wait for the store's own flush).
    pub async fn record_start(&self, started: Checkpoint, flush: bool) -> Result<(), Error> {
        let checkpointer = &self.shared.checkpointer;
        checkpointer
            .set(&self.shard, started)
            .await
            .map_err(|e| self.store_error(e))?;
        if flush {
            checkpointer
                .flush()
                .await
                .map_err(|e| self.store_error(e))?;
        }
        tracing::debug!(%started, "start position recorded");
        Ok(())
    }

    /// What ends a reader early, from a Kinesis error.
    pub fn stop(&self, error: KinesisError) -> Stop {
        if error.kind() == KinesisErrorKind::ResourceNotFound {
            Stop::Gone(Error::ShardNotFound {
                stream: self.stream_name().to_owned(),
                shard: self.shard.to_string(),
                source: error,
            })
        } else {
            Stop::Failed(Error::from_kinesis(
                self.stream_name(),
                Some(&self.shard),
                error,
            ))
        }
    }

    /// Tells the consumer the shard needs no reading.
    pub fn already_finished(&self, read: Read) {
        tracing::debug!(?read, "shard needs no reading");
        self.output.send(ReaderEvent::AlreadyFinished { read });
    }

    /// Notes a throttled or transient failure of `call` that the reader backs off from for
    /// `delay`.
    pub fn backing_off(&self, call: &str, error: &KinesisError, delay: Duration) {
        backing_off(&self.metrics, call, error, delay);
    }
}

/// Notes a throttled or transient failure of `call` that the reader backs off from for `delay`.
pub(super) fn backing_off(
    metrics: &ReaderMetrics,
    call: &str,
    error: &KinesisError,
    delay: Duration,
) {
    if error.kind() == KinesisErrorKind::Throttled {
        metrics.throttled();
    }
    tracing::warn!(%error, ?delay, "{call} failed; backing off");
}

/// Reports how a reader ended to the consumer.
pub(super) fn report(output: &ReaderOutput, ended: Result<(), Stop>) {
    match ended {
        Ok(()) => {}
        Err(Stop::Gone(error)) => {
            output.send(ReaderEvent::Gone(error));
        }
        Err(Stop::Failed(error)) => {
            tracing::error!(%error, "shard reader stopped");
            output.send(ReaderEvent::Failed(error));
        }
    }
}
