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

/// Every shard's records, merged into one stream; what [`Consumer::records`] returns.
///
/// Records of one shard come in shard order; children of a closed shard come after all of the
/// parent's records, once its last record was committed (until then the parent's end is not in
/// the store, and a restart would read its tail again). The stream ends with an error item if
/// the consumer fails (missing stream,
/// denied access...), or ends when [`shutdown`](RecordStream::shutdown) is called. Commit
/// progress with the [`Checkpointer`] from [`RecordStream::checkpointer`].
///
/// Dropping the stream stops the background task; call [`shutdown`](RecordStream::shutdown)
/// to wait for it and for the store to be flushed.
///
/// [`Consumer::records`]: crate::Consumer::records
pub struct RecordStream {
    rx: mpsc::UnboundedReceiver<Handoff>,
    /// The batch being yielded, with its buffer room.
    current: Option<(std::vec::IntoIter<Record>, Permit)>,
    task: Option<JoinHandle<Result<(), Error>>>,
    stream: String,
    checkpointer: Checkpointer,
    shutdown: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl std::fmt::Debug for RecordStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordStream")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl RecordStream {
    /// Spawns a run that hands every batch to the stream (on the current tokio runtime).
    pub(crate) fn spawn(shared: Arc<Shared>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let stream = shared.settings.stream.stream_name().to_owned();
        let checkpointer = shared.checkpointer.clone();
        let stop = shutdown.clone().cancelled_owned();
        let task = tokio::spawn(dispatch::run(shared, Box::new(ToStream { tx }), stop));
        Self {
            rx,
            current: None,
            task: Some(task),
            stream,
            checkpointer,
            _stop_on_drop: shutdown.clone().drop_guard(),
            shutdown,
        }
    }

    /// The checkpointer to commit processed records with (per shard, it only moves forward).
    pub fn checkpointer(&self) -> &Checkpointer {
        &self.checkpointer
    }

    /// Stops reading, waits for the background task to finish and the store to be flushed.
    /// Records not yet yielded are dropped; they are read again from the last checkpoint.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.shutdown.cancel();
        self.current = None;
        self.rx.close();
        while self.rx.recv().await.is_some() {}
        match self.task.take() {
            Some(task) => join(task, &self.stream).await,
            None => Ok(()),
        }
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
    type Item = Result<Record, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some((records, _)) = this.current.as_mut() {
                if let Some(record) = records.next() {
                    return Poll::Ready(Some(Ok(record)));
                }
                // Every record of the batch was yielded: its buffer room goes back.
                this.current = None;
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some((batch, permit))) => {
                    this.current = Some((batch.records.into_iter(), permit));
                }
                Poll::Ready(None) => {
                    let Some(task) = this.task.as_mut() else {
                        return Poll::Ready(None);
                    };
                    let outcome = std::task::ready!(Pin::new(task).poll(cx));
                    this.task = None;
                    let outcome = outcome.unwrap_or_else(|e| {
                        Err(Error::Task {
                            stream: this.stream.clone(),
                            reason: e.to_string(),
                        })
                    });
                    return Poll::Ready(outcome.err().map(Err));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
