//! `records()`: every shard merged into one `Stream` of records.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::Stream;
use kinesis_tower_layers::{Batch, BoxError, Checkpointer, Record};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::dispatch::{self, Dispatch};
use super::handle::Shared;
use super::reader::BufferPermit as Permit;
use crate::Error;

type Handoff = (Batch, Permit);

/// What `records()` runs instead of a service: each batch goes to the stream with its buffer
/// room, which is returned once the stream has yielded the batch's records (backpressure). The
/// call completes at once: the stream keeps each shard's order, and a closed shard's children
/// wait for its last record to be committed anyway, so there is nothing to wait for.
struct ToStream {
    tx: mpsc::UnboundedSender<Handoff>,
}

impl Dispatch for ToStream {
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: Batch, permit: Permit) -> BoxFuture<'static, Result<(), BoxError>> {
        if !batch.is_empty() {
            // If the stream is gone, nobody reads these records: nothing is lost, as stream
            // users checkpoint what they processed themselves.
            let _ = self.tx.send((batch, permit));
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Every shard's records, merged into one `Stream<Item = Record>`; what [`Consumer::records`]
/// and [`Consumer::records_until`] return.
///
/// Records of one shard come in shard order; children of a closed shard come after all of the
/// parent's records, once its last record was committed (until then the parent's end is not in
/// the store, and a restart would read its tail again). Commit progress with the
/// [`Checkpointer`] from [`checkpointer`](RecordStream::checkpointer).
///
/// The stream ends when the consumer stops: after the shutdown signal of
/// [`Consumer::records_until`], or when it fails (missing stream, denied access, a store that
/// keeps failing). How it ended, and the error if it failed, is what
/// [`ShutdownHandle::shutdown`] returns; take the handle with
/// [`shutdown_handle`](RecordStream::shutdown_handle) before handing the stream to a
/// combinator, so it stays reachable:
///
/// ```no_run
/// use std::time::Duration;
/// use kinesis_tower::Consumer;
/// use tokio_stream::StreamExt;
///
/// # async fn example(consumer: Consumer) -> Result<(), kinesis_tower::BoxError> {
/// let records = consumer.records_until(tokio::signal::ctrl_c());
/// let (checkpointer, stop) = (records.checkpointer(), records.shutdown_handle());
/// let mut chunks = std::pin::pin!(records.chunks_timeout(500, Duration::from_secs(2)));
/// while let Some(chunk) = chunks.next().await {
///     println!("{} records", chunk.len());
///     checkpointer.commit_all(&chunk).await?;
/// }
/// stop.shutdown().await?; // flushes the store; the error that ended the stream, if any
/// # Ok(()) }
/// ```
///
/// Dropping the stream stops the consumer too.
///
/// [`Consumer::records`]: crate::Consumer::records
/// [`Consumer::records_until`]: crate::Consumer::records_until
pub struct RecordStream {
    rx: mpsc::UnboundedReceiver<Handoff>,
    /// The batch being yielded, with its buffer room.
    current: Option<(std::vec::IntoIter<Record>, Permit)>,
    handle: ShutdownHandle,
    _stop_on_drop: DropGuard,
}

impl std::fmt::Debug for RecordStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordStream")
            .field("stream", &self.handle.inner.stream)
            .finish_non_exhaustive()
    }
}

impl RecordStream {
    /// Spawns a run that hands every batch to the stream (on the current tokio runtime) and
    /// stops when `signal` completes.
    pub(crate) fn spawn<F>(shared: Arc<Shared>, signal: F) -> Self
    where
        F: Future + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let token = CancellationToken::new();
        let stream = shared.settings.stream.stream_name().to_owned();
        let checkpointer = shared.checkpointer.clone();
        let cancelled = token.clone().cancelled_owned();
        let stop = async move {
            tokio::select! {
                _ = signal => {}
                () = cancelled => {}
            }
        };
        let name = stream.clone();
        let task = tokio::spawn(async move {
            let outcome = dispatch::run(shared, Box::new(ToStream { tx }), stop).await;
            if let Err(error) = &outcome {
                // Also returned by `ShutdownHandle::shutdown`; logged for streams nobody joins.
                tracing::error!(stream = %name, error = %error, "the record stream ended on an error");
            }
            outcome
        });
        Self {
            rx,
            current: None,
            _stop_on_drop: token.clone().drop_guard(),
            handle: ShutdownHandle {
                inner: Arc::new(HandleInner {
                    token,
                    task: tokio::sync::Mutex::new(Some(task)),
                    stream,
                    checkpointer,
                }),
            },
        }
    }

    /// The checkpointer to commit processed records with (per shard, it only moves forward).
    pub fn checkpointer(&self) -> Checkpointer {
        self.handle.inner.checkpointer.clone()
    }

    /// A handle that stops the consumer and returns how it ended; it stays usable after the
    /// stream was moved into a combinator or dropped.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// Stops reading and returns how the consumer ended (see [`ShutdownHandle::shutdown`]).
    /// Records not yet yielded are dropped; they are read again from the last checkpoint.
    pub async fn shutdown(self) -> Result<(), Error> {
        let handle = self.handle.clone();
        drop(self);
        handle.shutdown().await
    }
}

/// Stops the consumer behind a [`RecordStream`] and returns how it ended; from
/// [`RecordStream::shutdown_handle`]. Cloning it is cheap.
#[derive(Clone)]
pub struct ShutdownHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    token: CancellationToken,
    task: tokio::sync::Mutex<Option<JoinHandle<Result<(), Error>>>>,
    stream: String,
    checkpointer: Checkpointer,
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("stream", &self.inner.stream)
            .finish_non_exhaustive()
    }
}

impl ShutdownHandle {
    /// Stops reading (if the consumer still runs), waits until every task of the consumer has
    /// stopped, and flushes the store, so commits made after the stream ended are kept too.
    ///
    /// Returns the error that ended the consumer (missing stream, denied access, a store that
    /// kept failing...), or `Ok(())` after a clean stop. The outcome goes to the first caller;
    /// later calls only flush.
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.inner.token.cancel();
        let task = self.inner.task.lock().await.take();
        let outcome = match task {
            Some(task) => join(task, &self.inner.stream).await,
            None => Ok(()),
        };
        let flushed = self.inner.checkpointer.flush().await;
        outcome.and(flushed.map_err(|source| Error::Store {
            stream: self.inner.stream.clone(),
            shard: None,
            source: Box::new(source),
        }))
    }

    /// Whether the consumer has stopped (its stream ended or will end once drained).
    pub fn is_stopped(&self) -> bool {
        self.inner.token.is_cancelled()
            || self
                .inner
                .task
                .try_lock()
                .map(|task| task.as_ref().is_none_or(JoinHandle::is_finished))
                .unwrap_or(false)
    }
}

async fn join(task: JoinHandle<Result<(), Error>>, stream: &str) -> Result<(), Error> {
    task.await.unwrap_or_else(|e| {
        Err(Error::Task {
            stream: stream.to_owned(),
            reason: e.to_string(),
        })
    })
}

impl Stream for RecordStream {
    type Item = Record;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some((records, _)) = this.current.as_mut() {
                if let Some(record) = records.next() {
                    return Poll::Ready(Some(record));
                }
                // Every record of the batch was yielded: its buffer room goes back.
                this.current = None;
            }
            match std::task::ready!(this.rx.poll_recv(cx)) {
                Some((batch, permit)) => {
                    this.current = Some((batch.records.into_iter(), permit));
                }
                // The run ended (its sender is gone): how is for the shutdown handle to say.
                None => return Poll::Ready(None),
            }
        }
    }
}
