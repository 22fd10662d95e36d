//! The consumer handle users hold, and what it shares with every run.

use std::future::Future;
use std::sync::Arc;

use kinesis_tower_layers::checkpoint::CheckpointLayer;
use kinesis_tower_layers::{Batch, BoxError, Checkpointer, Processed};
use tower::Layer;
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
    /// Whether the user gave a store (checkpoints are meant to survive a restart).
    pub(crate) store_configured: bool,
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

    /// Handles every shard's batches with `handler`, checkpoints each batch once the handler
    /// succeeded, and stops cleanly on Ctrl-C or SIGTERM: the safe way to consume a stream.
    ///
    /// It is [`run_until`](Consumer::run_until) with the handler wrapped in
    /// [`CheckpointLayer`](crate::checkpoint::CheckpointLayer) and a shutdown on Ctrl-C (SIGINT)
    /// or SIGTERM; on either, fetching stops, in-flight batches finish, their checkpoints are
    /// written and the store is flushed before it returns. The handler answers `()` (checkpoint
    /// the whole batch) or a [`Processed`]; put `RetryLayer`, `DeaggregateLayer`, `MetricsLayer`
    /// or tower's layers around it as you like. For a stack that needs `BatchLayer` (which must
    /// sit outside `CheckpointLayer`), build the stack yourself and call `run_until`.
    ///
    /// ```no_run
    /// use kinesis_tower::{service_fn, Batch, BoxError, Consumer};
    ///
    /// # async fn example(consumer: Consumer) -> Result<(), BoxError> {
    /// let handler = service_fn(|batch: Batch| async move {
    ///     println!("{} records from {}", batch.records.len(), batch.shard_id);
    ///     Ok::<_, BoxError>(())
    /// });
    /// consumer.process(handler).await?;
    /// # Ok(()) }
    /// ```
    pub fn process<S>(&self, handler: S) -> impl Future<Output = Result<(), Error>> + use<S>
    where
        S: Service<Batch> + Send + 'static,
        S::Response: Into<Processed>,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        self.process_until(handler, shutdown_signal())
    }

    /// [`process`](Consumer::process) that stops when `shutdown` completes instead of on a
    /// signal.
    pub fn process_until<S, F>(
        &self,
        handler: S,
        shutdown: F,
    ) -> impl Future<Output = Result<(), Error>> + use<S, F>
    where
        S: Service<Batch> + Send + 'static,
        S::Response: Into<Processed>,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        F: Future,
    {
        let service = CheckpointLayer::new(self.checkpointer()).layer(handler);
        self.run_until(service, shutdown)
    }

    /// Drives `service` with every shard's batches until the service or Kinesis fails.
    /// See [`run_until`](Consumer::run_until).
    pub fn run<S>(&self, service: S) -> impl Future<Output = Result<(), Error>> + use<S>
    where
        S: Service<Batch> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        self.run_until(service, std::future::pending::<()>())
    }

    /// Drives `service` with every shard's batches until `shutdown` completes (or the service,
    /// the store or Kinesis fails). Nothing is checkpointed unless the stack does it: put
    /// [`CheckpointLayer`](crate::checkpoint::CheckpointLayer) in it (or commit through
    /// [`checkpointer`](Consumer::checkpointer)), or use [`process`](Consumer::process), which
    /// does. A consumer with a store whose stack handles records for a minute without
    /// checkpointing any logs a warning saying so.
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
        F: Future,
    {
        let shutdown = async move {
            shutdown.await;
        };
        dispatch::run(self.shared.clone(), Box::new(Erased(service)), shutdown)
    }

    /// Every shard's records merged into one `Stream<Item = Record>` (spawns the reading on the
    /// current tokio runtime), until the stream is dropped or its
    /// [`ShutdownHandle`](crate::ShutdownHandle) stops it. Combine it with any
    /// `futures`/`tokio-stream` combinator, e.g. `chunks_timeout`; commit progress with
    /// [`RecordStream::checkpointer`].
    pub fn records(&self) -> RecordStream {
        RecordStream::spawn(self.shared.clone(), std::future::pending::<()>())
    }

    /// [`records`](Consumer::records) that stops when `signal` completes (e.g.
    /// `tokio::signal::ctrl_c()`): reading stops, the stream ends after the records already
    /// fetched, and [`ShutdownHandle::shutdown`](crate::ShutdownHandle::shutdown) flushes the
    /// store and says how the consumer ended.
    pub fn records_until<F>(&self, signal: F) -> RecordStream
    where
        F: Future + Send + 'static,
    {
        RecordStream::spawn(self.shared.clone(), signal)
    }

    #[cfg(test)]
    pub(crate) fn probe(&self) -> &Probe {
        &self.shared.probe
    }
}

/// Completes on Ctrl-C (SIGINT) or, on Unix, SIGTERM (what container runtimes send to stop a
/// process): the signal [`Consumer::process`] stops on, for `run_until` and `records_until`.
/// If a signal handler cannot be installed, that signal is not waited for.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received; stopping"),
        () = terminate => tracing::info!("SIGTERM received; stopping"),
    }
}
