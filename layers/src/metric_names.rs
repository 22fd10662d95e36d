//! The names of every metric this library emits, and their labels. These names are part of the
//! API: they change only with a new major version.
//!
//! Everything goes through the [`metrics`] facade, so any recorder works (Prometheus,
//! StatsD, OpenTelemetry bridges...); with no recorder installed, nothing is recorded and the
//! cost is a few no-op calls per batch. Each metric carries the labels [`STREAM`] and
//! [`SHARD`]. Label values are built once per shard (when a shard's reader starts, or the first
//! time a layer or checkpointer sees the shard), never per record or per call.
//!
//! | name | kind | unit | emitted by | what |
//! |---|---|---|---|---|
//! | `kinesis_records_read_total` | counter | records | reader | records returned by GetRecords |
//! | `kinesis_bytes_read_total` | counter | bytes | reader | data + partition key bytes returned by GetRecords |
//! | `kinesis_get_records_calls_total` | counter | calls | reader | GetRecords calls, answered or failed |
//! | `kinesis_get_records_duration_seconds` | histogram | seconds | reader | time of each GetRecords call, answered or failed |
//! | `kinesis_read_throttles_total` | counter | answers | reader | GetRecords and GetShardIterator answers that said the shard's read limit was exceeded (ProvisionedThroughputExceeded) |
//! | `kinesis_iterator_refreshes_total` | counter | iterators | reader | expired shard iterators renewed (after the last record read) |
//! | `kinesis_millis_behind_latest` | gauge | milliseconds | reader | how far the shard's reader is behind the tip of the shard, from the last GetRecords answer |
//! | `kinesis_handler_calls_total` | counter | calls | [`MetricsLayer`](crate::metrics::MetricsLayer) | calls of the inner service with at least one record |
//! | `kinesis_handler_records_total` | counter | records | [`MetricsLayer`](crate::metrics::MetricsLayer) | records of calls that succeeded |
//! | `kinesis_handler_bytes_total` | counter | bytes | [`MetricsLayer`](crate::metrics::MetricsLayer) | data + partition key bytes of calls that succeeded |
//! | `kinesis_handler_duration_seconds` | histogram | seconds | [`MetricsLayer`](crate::metrics::MetricsLayer) | time from call to answer of calls with records, succeeded or failed |
//! | `kinesis_handler_errors_total` | counter | calls | [`MetricsLayer`](crate::metrics::MetricsLayer) | calls that failed, empty batches included |
//! | `kinesis_checkpoints_written_total` | counter | writes | [`Checkpointer`](crate::Checkpointer) | checkpoint writes that moved a shard's checkpoint forward (for buffered stores: accepted for the next flush) |
//! | `kinesis_checkpoint_duration_seconds` | histogram | seconds | [`Checkpointer`](crate::Checkpointer) | time of each checkpoint write to the store, succeeded or failed |
//! | `kinesis_checkpoint_errors_total` | counter | writes | [`Checkpointer`](crate::Checkpointer) | checkpoint writes the store failed |
//! | `kinesis_leases_held` | gauge | leases | consumer group | leases this worker holds (label [`WORKER`], no shard) |
//! | `kinesis_leases_acquired_total` | counter | leases | consumer group | leases this worker claimed or was handed (label [`WORKER`], no shard) |
//! | `kinesis_leases_lost_total` | counter | leases | consumer group | leases taken from this worker, or given up because it missed its renewals (label [`WORKER`], no shard) |
//! | `kinesis_lease_handoffs_total` | counter | leases | consumer group | leases this worker handed to another on request (label [`WORKER`], no shard) |
//!
//! Empty batches (heartbeats, and the empty last batch of a shard) are not handler calls in
//! these figures: they carry no record, and timing them would drag the latency histogram
//! towards zero. A failing empty batch still counts in `kinesis_handler_errors_total` (a layer
//! inside, such as a batching layer, may flush records on it).
//!
//! [`describe`] registers a description and unit for each name with the installed recorder
//! (exporters show them as help text); call it once after installing the recorder.

use metrics::{Label, SharedString, Unit};

/// Label: the stream name.
pub const STREAM: &str = "stream";
/// Label: the consumer group worker (the group's metrics carry it and [`STREAM`], no shard).
pub const WORKER: &str = "worker";
/// Label: the shard id.
pub const SHARD: &str = "shard";

/// The labels of one shard's metrics: [`STREAM`] and [`SHARD`]. Build them once per shard and
/// register handles with them (`metrics::counter!(NAME, labels.clone())`); the shard id is
/// copied here, the stream name only when it is not already shared (`Arc<str>`).
pub fn labels(stream: impl Into<SharedString>, shard: &str) -> Vec<Label> {
    vec![
        Label::new(STREAM, stream.into()),
        Label::new(SHARD, SharedString::from(shard.to_owned())),
    ]
}

/// Counter: records returned by GetRecords.
pub const RECORDS_READ_TOTAL: &str = "kinesis_records_read_total";
/// Counter: data + partition key bytes returned by GetRecords.
pub const BYTES_READ_TOTAL: &str = "kinesis_bytes_read_total";
/// Counter: GetRecords calls, answered or failed.
pub const GET_RECORDS_CALLS_TOTAL: &str = "kinesis_get_records_calls_total";
/// Histogram (seconds): time of each GetRecords call, answered or failed.
pub const GET_RECORDS_DURATION_SECONDS: &str = "kinesis_get_records_duration_seconds";
/// Counter: answers that said the shard's read limit was exceeded.
pub const READ_THROTTLES_TOTAL: &str = "kinesis_read_throttles_total";
/// Counter: expired shard iterators renewed.
pub const ITERATOR_REFRESHES_TOTAL: &str = "kinesis_iterator_refreshes_total";
/// Gauge (milliseconds): how far the shard's reader is behind the tip of the shard.
pub const MILLIS_BEHIND_LATEST: &str = "kinesis_millis_behind_latest";

/// Counter: calls of the inner service with at least one record.
pub const HANDLER_CALLS_TOTAL: &str = "kinesis_handler_calls_total";
/// Counter: records of handler calls that succeeded.
pub const HANDLER_RECORDS_TOTAL: &str = "kinesis_handler_records_total";
/// Counter: data + partition key bytes of handler calls that succeeded.
pub const HANDLER_BYTES_TOTAL: &str = "kinesis_handler_bytes_total";
/// Histogram (seconds): time from call to answer of handler calls with records.
pub const HANDLER_DURATION_SECONDS: &str = "kinesis_handler_duration_seconds";
/// Counter: handler calls that failed.
pub const HANDLER_ERRORS_TOTAL: &str = "kinesis_handler_errors_total";

/// Counter: checkpoint writes that moved a shard's checkpoint forward.
pub const CHECKPOINTS_WRITTEN_TOTAL: &str = "kinesis_checkpoints_written_total";
/// Histogram (seconds): time of each checkpoint write to the store.
pub const CHECKPOINT_DURATION_SECONDS: &str = "kinesis_checkpoint_duration_seconds";
/// Counter: checkpoint writes the store failed.
pub const CHECKPOINT_ERRORS_TOTAL: &str = "kinesis_checkpoint_errors_total";

/// Counter: SubscribeToShard subscriptions opened (enhanced fan-out), first ones and again.
pub const SUBSCRIPTIONS_TOTAL: &str = "kinesis_subscriptions_total";
/// Counter: subscriptions opened again after one ended (Kinesis ends each after 5 minutes),
/// broke, or was cancelled because the handler stalled.
pub const RESUBSCRIPTIONS_TOTAL: &str = "kinesis_resubscriptions_total";
/// Counter: SubscribeToShard events received (with records or without).
pub const SUBSCRIPTION_EVENTS_TOTAL: &str = "kinesis_subscription_events_total";

/// The enhanced fan-out reader's own metrics (labels [`STREAM`] and [`SHARD`]); it also
/// records [`RECORDS_READ_TOTAL`], [`BYTES_READ_TOTAL`], [`READ_THROTTLES_TOTAL`] and
/// [`MILLIS_BEHIND_LATEST`], as the polling reader does.
pub const FAN_OUT: [&str; 3] = [
    SUBSCRIPTIONS_TOTAL,
    RESUBSCRIPTIONS_TOTAL,
    SUBSCRIPTION_EVENTS_TOTAL,
];

/// Gauge: leases this consumer group worker holds.
pub const LEASES_HELD: &str = "kinesis_leases_held";
/// Counter: leases this worker claimed or was handed.
pub const LEASES_ACQUIRED_TOTAL: &str = "kinesis_leases_acquired_total";
/// Counter: leases taken from this worker, or given up because it missed its renewals.
pub const LEASES_LOST_TOTAL: &str = "kinesis_leases_lost_total";
/// Counter: leases this worker handed to another on request.
pub const LEASE_HANDOFFS_TOTAL: &str = "kinesis_lease_handoffs_total";

/// The consumer group's metrics (labels [`STREAM`] and [`WORKER`]).
pub const GROUP: [&str; 4] = [
    LEASES_HELD,
    LEASES_ACQUIRED_TOTAL,
    LEASES_LOST_TOTAL,
    LEASE_HANDOFFS_TOTAL,
];

/// Every per-shard metric name, in the order of the table above (the group's are in
/// [`GROUP`]).
pub const ALL: [&str; 15] = [
    RECORDS_READ_TOTAL,
    BYTES_READ_TOTAL,
    GET_RECORDS_CALLS_TOTAL,
    GET_RECORDS_DURATION_SECONDS,
    READ_THROTTLES_TOTAL,
    ITERATOR_REFRESHES_TOTAL,
    MILLIS_BEHIND_LATEST,
    HANDLER_CALLS_TOTAL,
    HANDLER_RECORDS_TOTAL,
    HANDLER_BYTES_TOTAL,
    HANDLER_DURATION_SECONDS,
    HANDLER_ERRORS_TOTAL,
    CHECKPOINTS_WRITTEN_TOTAL,
    CHECKPOINT_DURATION_SECONDS,
    CHECKPOINT_ERRORS_TOTAL,
];

/// Registers a description and unit for every metric with the current recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};

    describe_counter!(
        RECORDS_READ_TOTAL,
        Unit::Count,
        "Records returned by GetRecords."
    );
    describe_counter!(
        BYTES_READ_TOTAL,
        Unit::Bytes,
        "Data and partition key bytes returned by GetRecords."
    );
    describe_counter!(
        GET_RECORDS_CALLS_TOTAL,
        Unit::Count,
        "GetRecords calls, answered or failed."
    );
    describe_histogram!(
        GET_RECORDS_DURATION_SECONDS,
        Unit::Seconds,
        "Time of each GetRecords call, answered or failed."
    );
    describe_counter!(
        READ_THROTTLES_TOTAL,
        Unit::Count,
        "GetRecords and GetShardIterator answers saying the shard's read limit was exceeded."
    );
    describe_counter!(
        ITERATOR_REFRESHES_TOTAL,
        Unit::Count,
        "Expired shard iterators renewed."
    );
    describe_gauge!(
        MILLIS_BEHIND_LATEST,
        Unit::Milliseconds,
        "How far the shard's reader is behind the tip of the shard."
    );
    describe_counter!(
        HANDLER_CALLS_TOTAL,
        Unit::Count,
        "Handler calls with at least one record."
    );
    describe_counter!(
        HANDLER_RECORDS_TOTAL,
        Unit::Count,
        "Records of handler calls that succeeded."
    );
    describe_counter!(
        HANDLER_BYTES_TOTAL,
        Unit::Bytes,
        "Data and partition key bytes of handler calls that succeeded."
    );
    describe_histogram!(
        HANDLER_DURATION_SECONDS,
        Unit::Seconds,
        "Time from call to answer of handler calls with records."
    );
    describe_counter!(
        HANDLER_ERRORS_TOTAL,
        Unit::Count,
        "Handler calls that failed."
    );
    describe_counter!(
        CHECKPOINTS_WRITTEN_TOTAL,
        Unit::Count,
        "Checkpoint writes that moved a shard's checkpoint forward."
    );
    describe_histogram!(
        CHECKPOINT_DURATION_SECONDS,
        Unit::Seconds,
        "Time of each checkpoint write to the store."
    );
    describe_counter!(
        CHECKPOINT_ERRORS_TOTAL,
        Unit::Count,
        "Checkpoint writes the store failed."
    );
    describe_counter!(
        SUBSCRIPTIONS_TOTAL,
        Unit::Count,
        "SubscribeToShard subscriptions opened (enhanced fan-out)."
    );
    describe_counter!(
        RESUBSCRIPTIONS_TOTAL,
        Unit::Count,
        "Subscriptions opened again after one ended, broke or was cancelled for a stalled handler."
    );
    describe_counter!(
        SUBSCRIPTION_EVENTS_TOTAL,
        Unit::Count,
        "SubscribeToShard events received."
    );
    describe_gauge!(
        LEASES_HELD,
        Unit::Count,
        "Leases this consumer group worker holds."
    );
    describe_counter!(
        LEASES_ACQUIRED_TOTAL,
        Unit::Count,
        "Leases this worker claimed or was handed."
    );
    describe_counter!(
        LEASES_LOST_TOTAL,
        Unit::Count,
        "Leases taken from this worker, or given up because it missed its renewals."
    );
    describe_counter!(
        LEASE_HANDOFFS_TOTAL,
        Unit::Count,
        "Leases this worker handed to another on request."
    );
}
