//! Shared by the benches: run a consumer until it has handled a number of records.
// Each bench uses a part of this module.
#![allow(dead_code)]

#[cfg(feature = "test-util")]
pub mod memory;

use std::future::Ready;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::Consumer;
use kinesis_tower::{Batch, BoxError, Checkpointer};
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service};

/// A no-op handler that counts the records it is given and cancels `done` once it has seen
/// `total` of them. Clones share the count.
#[derive(Clone, Debug)]
pub struct CountingHandler {
    handled: Arc<AtomicU64>,
    total: u64,
    done: CancellationToken,
}

impl CountingHandler {
    fn new(total: u64) -> Self {
        Self {
            handled: Arc::new(AtomicU64::new(0)),
            total,
            done: CancellationToken::new(),
        }
    }
}

impl Service<Batch> for CountingHandler {
    type Response = ();
    type Error = BoxError;
    type Future = Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: Batch) -> Self::Future {
        let n = batch.len() as u64;
        if self.handled.fetch_add(n, Ordering::Relaxed) + n >= self.total {
            self.done.cancel();
        }
        std::future::ready(Ok(()))
    }
}

/// Drives `consumer` with the service `stack` builds around a [`CountingHandler`] (given the
/// consumer's checkpointer) until `total` records reached the handler, then shuts it down
/// gracefully.
pub async fn run_stack_until_handled<S, F>(consumer: &Consumer, total: u64, stack: F)
where
    F: FnOnce(Checkpointer, CountingHandler) -> S,
    S: Service<Batch> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let handler = CountingHandler::new(total);
    let (handled, done) = (handler.handled.clone(), handler.done.clone());
    let service = stack(consumer.checkpointer(), handler);
    consumer
        .run_until(service, done.cancelled_owned())
        .await
        .expect("run succeeds");
    assert_eq!(handled.load(Ordering::Relaxed), total);
}

/// Drives `consumer` with a no-op handler under `CheckpointLayer` until `total` records were
/// handled, then shuts it down gracefully.
pub async fn run_until_handled(consumer: &Consumer, total: u64) {
    run_stack_until_handled(consumer, total, |checkpointer, handler| {
        CheckpointLayer::new(checkpointer).layer(handler)
    })
    .await
}
