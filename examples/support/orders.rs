//! The handler stack of the `lambda` example: the same stack a consumer runs, with nothing in
//! it that knows where its batches come from. `tests/lambda.rs` runs it under
//! `Consumer::run` too.
//!
//! Each record (each user record of a KPL aggregate) is an order in UTF-8 text; a record that
//! is not UTF-8 fails, and the records before it stay handled.

// Each program that includes this file uses part of it.
#![allow(dead_code)]

use kinesis_tower::kpl::DeaggregateLayer;
use kinesis_tower::metrics::MetricsLayer;
use kinesis_tower::per_record::PerRecordLayer;
use kinesis_tower::retry::RetryLayer;
use kinesis_tower::{service_fn, Batch, BoxError, Processed, Record};
use tower::{Service, ServiceBuilder};

/// The stack: metrics, retries of transient errors, KPL deaggregation, one call per record.
/// `out` is given each order handled.
pub fn stack<F>(
    stream: &str,
    out: F,
) -> impl Service<Batch, Response = Processed, Error = BoxError, Future: Send> + Clone + Send + 'static
where
    F: Fn(&Record, &str) + Clone + Send + Sync + 'static,
{
    ServiceBuilder::new()
        .layer(MetricsLayer::new(stream))
        .layer(RetryLayer::new().max_attempts(3))
        .layer(DeaggregateLayer::new())
        .layer(PerRecordLayer::new())
        .service(service_fn(move |record: Record| {
            let out = out.clone();
            async move {
                let order = std::str::from_utf8(&record.data)
                    .map_err(|e| format!("not an order (not UTF-8 text): {e}"))?;
                out(&record, order);
                Ok::<_, BoxError>(())
            }
        }))
}

/// One line per order on stdout: `<shard> <sequence>[/<sub-sequence>] <partition key>: <order>`.
pub fn print(record: &Record, order: &str) {
    println!("{}", line(record, order));
}

/// The line [`print`] writes.
pub fn line(record: &Record, order: &str) -> String {
    let position = match record.sub_sequence_number {
        Some(sub) => format!("{}/{sub}", record.sequence_number),
        None => record.sequence_number.to_string(),
    };
    format!(
        "{} {position} {}: {order}",
        record.shard_id, record.partition_key
    )
}
