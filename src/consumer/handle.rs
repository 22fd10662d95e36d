//! The consumer handle users hold, and what it shares with every run.

use std::future::Future;
use std::sync::Arc;

use kinesis_tower_layers::{Batch, BoxError, Checkpointer};
use tower::Service;

use super::assignment::AssignmentFilter;
use super::builder::ConsumerBuilder;
use super::dispatch::{self, Erased};
use super::settings::Settings;
use super::stream::RecordStream;
use crate::kinesis::KinesisApi;
use crate::Error;

/// What every run of a consumer reads: its settings, its Kinesis client, its checkpointer and
/// its assignment filter.
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    pub(crate) api: Arc<dyn KinesisApi>,
    pub(crate) checkpointer: Checkpointer,
    pub(crate) filter: Arc<dyn AssignmentFilter>,
    /// What tests look at inside a run.
    #[cfg(test)]
    pub(crate) probe: Probe,
}

/// Sizes that must stay bounded over long runs, for tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Probe {
    lineage: std::sync::atomic::AtomicUsize,
    lineage_max: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
impl Probe {
    pub(crate) fn lineage_size(&self, size: usize) {
        use std::sync::atomic::Ordering::SeqCst;
        self.lineage.store(size, SeqCst);
        self.lineage_max.fetch_max(size, SeqCst);
    }

    /// The largest lineage seen after a listing.
    pub(crate) fn lineage_max(&self) -> usize {
        self.lineage_max.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A Kinesis stream consumer.
///
/// Build one with [`Consumer::builder`], then either take every shard's records as one stream
/// with [`records`](Consumer::records), or drive a `tower::Service<Batch>` with
/// [`run`](Consumer::run) / [`run_until`](Consumer::run_until). A consumer can be run again
/// after a run ends; it resumes from its checkpoints.
#[derive(Clone)]
pub struct Consumer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    pub(crate) fn new(shared: Shared) -> Self {
        Self {
            shared: Arc::new(shared),
        }
    }

    /// A builder; `stream_name` (or `stream_arn`) and a client are required.
    pub fn builder() -> ConsumerBuilder {
        ConsumerBuilder::default()
    }

    /// The checkpointer (store + this consumer's namespace), for `CheckpointLayer` and for
    /// committing progress by hand.
    pub fn checkpointer(&self) -> Checkpointer {
        self.shared.checkpointer.clone()
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        self.shared.settings.stream.stream_name()
    }

    /// The checkpoint namespace: `<app name>/<stream name>`.
    pub fn namespace(&self) -> &str {
        self.shared.checkpointer.namespace()
    }

    /// Drives `service` with every shard's batches until the service or Kinesis fails.
    /// See [`run_until`](Consumer::run_until).
    pub fn run<S>(&self, service: S) -> impl Future<Output = Result<(), Error>> + use<S>
    where
        S: Service<Batch> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        self.run_until(service, std::future::pending())
    }

    /// Drives `service` with every shard's batches until `shutdown` completes (or the service,
    /// the store or Kinesis fails).
    ///
    /// Batches of one shard are handed over one at a time, in order; shards proceed
    /// concurrently. `poll_ready` is awaited before every call. When a closed shard's last
    /// batch (marked `BatchEnd::ShardEnd`) has been handled, the shard's checkpoint becomes
    /// `ShardEnd` once it covers the last record delivered, and its children start. On shutdown, fetching stops,
    /// each shard still being read gets a last empty batch marked `BatchEnd::Shutdown` (so
    /// layers flush), in-flight calls get `drain_timeout` to finish, the store is flushed, and
    /// every task is stopped before this returns. On a handler error, the other shards' in-flight
    /// calls finish, the store is flushed, and the error is returned.
    ///
    /// Pass `token.cancelled_owned()` to stop it with a `CancellationToken`.
    pub fn run_until<S, F>(
        &self,
        service: S,
        shutdown: F,
    ) -> impl Future<Output = Result<(), Error>> + use<S, F>
    where
        S: Service<Batch> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        F: Future<Output = ()>,
    {
        dispatch::run(self.shared.clone(), Box::new(Erased(service)), shutdown)
    }

    /// Every shard's records merged into one stream (spawns the reading on the current tokio
    /// runtime). Combine it with any `futures`/`tokio-stream` combinator, e.g.
    /// `chunks_timeout`; commit progress with [`RecordStream::checkpointer`].
    pub fn records(&self) -> RecordStream {
        RecordStream::spawn(self.shared.clone())
    }

    #[cfg(test)]
    pub(crate) fn probe(&self) -> &Probe {
        &self.shared.probe
    }
}
