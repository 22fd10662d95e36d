//! Shared by the benches: run a consumer until it has handled a number of records.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kinesis_tower::layers::{Batch, BoxError, CheckpointLayer};
use kinesis_tower::Consumer;
use tokio_util::sync::CancellationToken;
use tower::{service_fn, Layer};

/// Drives `consumer` with a no-op handler under `CheckpointLayer` until `total` records were
/// handled, then shuts it down gracefully.
pub async fn run_until_handled(consumer: &Consumer, total: u64) {
    let handled = Arc::new(AtomicU64::new(0));
    let done = CancellationToken::new();
    let handler = {
        let (handled, done) = (handled.clone(), done.clone());
        service_fn(move |batch: Batch| {
            let n = batch.len() as u64;
            if handled.fetch_add(n, Ordering::Relaxed) + n >= total {
                done.cancel();
            }
            std::future::ready(Ok::<_, BoxError>(()))
        })
    };
    let service = CheckpointLayer::new(consumer.checkpointer()).layer(handler);
    consumer
        .run_until(service, done.cancelled_owned())
        .await
        .expect("run succeeds");
    assert_eq!(handled.load(Ordering::Relaxed), total);
}
