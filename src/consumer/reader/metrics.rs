//! The metrics of one shard's reader, registered once when the reader starts.

use std::time::Duration;

use kinesis_tower_layers::metric_names as names;
use kinesis_tower_layers::ShardId;
use metrics::{Counter, Gauge, Histogram};

/// The handles a reader records into: no label is built after the reader has started.
pub(crate) struct ReaderMetrics {
    records_read: Counter,
    bytes_read: Counter,
    get_records_calls: Counter,
    get_records_duration: Histogram,
    throttles: Counter,
    iterator_refreshes: Counter,
    millis_behind_latest: Gauge,
}

impl ReaderMetrics {
    /// Registers the shard's handles with the current recorder.
    pub(crate) fn new(stream: &str, shard: &ShardId) -> Self {
        let labels = names::labels(stream.to_owned(), shard);
        Self {
            records_read: metrics::counter!(names::RECORDS_READ_TOTAL, labels.clone()),
            bytes_read: metrics::counter!(names::BYTES_READ_TOTAL, labels.clone()),
            get_records_calls: metrics::counter!(names::GET_RECORDS_CALLS_TOTAL, labels.clone()),
            get_records_duration: metrics::histogram!(
                names::GET_RECORDS_DURATION_SECONDS,
                labels.clone()
            ),
            throttles: metrics::counter!(names::READ_THROTTLES_TOTAL, labels.clone()),
            iterator_refreshes: metrics::counter!(names::ITERATOR_REFRESHES_TOTAL, labels.clone()),
            millis_behind_latest: metrics::gauge!(names::MILLIS_BEHIND_LATEST, labels),
        }
    }

    /// A GetRecords call ended (answered or failed) after `elapsed`.
    pub(crate) fn get_records_call(&self, elapsed: Duration) {
        self.get_records_calls.increment(1);
        self.get_records_duration.record(elapsed.as_secs_f64());
    }

    /// A GetRecords answer brought `records` records of `bytes` bytes.
    pub(crate) fn read(&self, records: usize, bytes: usize, millis_behind_latest: Option<i64>) {
        self.records_read.increment(records as u64);
        self.bytes_read.increment(bytes as u64);
        if let Some(millis) = millis_behind_latest {
            self.millis_behind_latest.set(millis as f64);
        }
    }

    /// The shard has been read to its end: nothing is behind any more.
    pub(crate) fn shard_read(&self) {
        self.millis_behind_latest.set(0.0);
    }

    /// Kinesis answered that the shard's read limit was exceeded.
    pub(crate) fn throttled(&self) {
        self.throttles.increment(1);
    }

    /// An expired iterator was renewed.
    pub(crate) fn iterator_refreshed(&self) {
        self.iterator_refreshes.increment(1);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use kinesis_tower_layers::checkpoint::CheckpointLayer;
    use kinesis_tower_layers::metric_names as names;
    use kinesis_tower_layers::metrics::MetricsLayer;
    use kinesis_tower_layers::{Batch, BoxError, Record};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use metrics_util::{CompositeKey, MetricKind};
    use tokio_util::sync::CancellationToken;
    use tower::{service_fn, ServiceBuilder};

    use crate::kinesis::memory::{shard_name, MemoryKinesis, Operation};
    use crate::kinesis::KinesisErrorKind;
    use crate::{Consumer, ConsumerBuilder, StartPosition};

    /// One snapshot of the recorder (taking one drains it), by (kind, name, shard), for the
    /// stream `stream` only.
    fn values(
        snapshot: metrics_util::debugging::Snapshot,
        stream: &str,
    ) -> HashMap<(MetricKind, String, String), DebugValue> {
        snapshot
            .into_vec()
            .into_iter()
            .filter_map(|(key, _, _, value): (CompositeKey, _, _, _)| {
                let label = |k: &str| {
                    key.key()
                        .labels()
                        .find(|l| l.key() == k)
                        .map(|l| l.value().to_owned())
                };
                (label(names::STREAM)? == stream).then(|| {
                    let shard = label(names::SHARD).expect("every metric has a shard label");
                    ((key.kind(), key.key().name().to_owned(), shard), value)
                })
            })
            .collect()
    }

    fn counter(
        values: &HashMap<(MetricKind, String, String), DebugValue>,
        name: &str,
        shard: &str,
    ) -> u64 {
        match values.get(&(MetricKind::Counter, name.to_owned(), shard.to_owned())) {
            Some(DebugValue::Counter(n)) => *n,
            other => panic!("{name} of {shard}: {other:?}"),
        }
    }

    /// Runs a consumer of `kinesis` (configured by `configure`) under MetricsLayer and
    /// CheckpointLayer until `records` records were handled, recording into a recorder of its
    /// own; the metrics of its stream.
    fn run_recorded(
        kinesis: &MemoryKinesis,
        records: u64,
        configure: impl FnOnce(ConsumerBuilder) -> ConsumerBuilder,
    ) -> HashMap<(MetricKind, String, String), DebugValue> {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let builder = Consumer::builder()
                    .kinesis_api(Arc::new(kinesis.clone()))
                    .stream_name("metrics-stream")
                    .app_name("tests")
                    .start_position(StartPosition::TrimHorizon);
                let consumer = configure(builder).build().unwrap();
                let seen = Arc::new(AtomicU64::new(0));
                let handler = service_fn({
                    let seen = seen.clone();
                    move |batch: Batch| {
                        seen.fetch_add(batch.len() as u64, Ordering::SeqCst);
                        async { Ok::<_, BoxError>(()) }
                    }
                });
                let service = ServiceBuilder::new()
                    .layer(MetricsLayer::new(consumer.stream_name()))
                    .layer(CheckpointLayer::new(consumer.checkpointer()))
                    .service(handler);
                let stop = CancellationToken::new();
                let run = tokio::spawn({
                    let (consumer, stop) = (consumer.clone(), stop.clone());
                    async move { consumer.run_until(service, stop.cancelled_owned()).await }
                });
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while seen.load(Ordering::SeqCst) < records {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "records not handled"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                stop.cancel();
                run.await.unwrap().unwrap();
            })
        });
        values(snapshotter.snapshot(), "metrics-stream")
    }

    #[test]
    fn reader_handler_and_checkpoint_metrics_follow_a_run_with_faults() {
        let kinesis = MemoryKinesis::with_shards(2);
        kinesis.fill(50, 10);
        let (s0, s1) = (shard_name(0), shard_name(1));
        kinesis.inject(
            Some(&s0),
            Operation::GetRecords,
            KinesisErrorKind::Throttled,
            3,
        );
        kinesis.inject(
            Some(&s0),
            Operation::GetShardIterator,
            KinesisErrorKind::Throttled,
            1,
        );
        kinesis.inject(
            Some(&s1),
            Operation::GetRecords,
            KinesisErrorKind::ExpiredIterator,
            2,
        );
        let values = run_recorded(&kinesis, 100, |builder| builder.max_records_per_call(20));
        for shard in [&s0, &s1] {
            let records = kinesis.records(shard);
            let bytes: usize = records.iter().map(Record::size).sum();
            assert_eq!(counter(&values, names::RECORDS_READ_TOTAL, shard), 50);
            assert_eq!(
                counter(&values, names::BYTES_READ_TOTAL, shard),
                bytes as u64
            );
            let calls = kinesis.get_records_calls(shard);
            assert_eq!(
                counter(&values, names::GET_RECORDS_CALLS_TOTAL, shard),
                calls
            );
            match values.get(&(
                MetricKind::Histogram,
                names::GET_RECORDS_DURATION_SECONDS.to_owned(),
                shard.to_string(),
            )) {
                Some(DebugValue::Histogram(samples)) => {
                    assert_eq!(samples.len() as u64, calls)
                }
                other => panic!("GetRecords latency of {shard}: {other:?}"),
            }
            match values.get(&(
                MetricKind::Gauge,
                names::MILLIS_BEHIND_LATEST.to_owned(),
                shard.to_string(),
            )) {
                // The last answer was at the tip.
                Some(DebugValue::Gauge(millis)) => assert_eq!(millis.into_inner(), 0.0),
                other => panic!("millis behind latest of {shard}: {other:?}"),
            }
            assert_eq!(counter(&values, names::HANDLER_RECORDS_TOTAL, shard), 50);
            assert_eq!(counter(&values, names::HANDLER_ERRORS_TOTAL, shard), 0);
            // One checkpoint per handler call with records (50 records, 20 per call: 3).
            assert_eq!(counter(&values, names::HANDLER_CALLS_TOTAL, shard), 3);
            assert_eq!(counter(&values, names::CHECKPOINTS_WRITTEN_TOTAL, shard), 3);
        }
        // 3 throttled GetRecords and 1 throttled GetShardIterator on shard 0, none on shard 1.
        assert_eq!(counter(&values, names::READ_THROTTLES_TOTAL, &s0), 4);
        assert_eq!(counter(&values, names::READ_THROTTLES_TOTAL, &s1), 0);
        assert_eq!(counter(&values, names::ITERATOR_REFRESHES_TOTAL, &s0), 0);
        assert_eq!(counter(&values, names::ITERATOR_REFRESHES_TOTAL, &s1), 2);
        // 6 GetRecords answers per shard at least (3 with records), plus the failed ones.
        assert!(kinesis.get_records_calls(&s0) >= 3 + 3);
    }

    #[test]
    fn fan_out_metrics_count_subscriptions_resubscriptions_and_events() {
        let kinesis = MemoryKinesis::with_shards(2);
        kinesis.event_record_limit(10);
        kinesis.end_subscriptions_after(2);
        kinesis.fill(50, 10);
        let (s0, s1) = (shard_name(0), shard_name(1));
        kinesis.inject(
            Some(&s0),
            Operation::SubscribeToShard,
            KinesisErrorKind::Throttled,
            1,
        );
        let values = run_recorded(&kinesis, 100, |builder| builder.enhanced_fan_out("metrics"));
        for shard in [&s0, &s1] {
            let bytes: usize = kinesis.records(shard).iter().map(Record::size).sum();
            assert_eq!(counter(&values, names::RECORDS_READ_TOTAL, shard), 50);
            assert_eq!(
                counter(&values, names::BYTES_READ_TOTAL, shard),
                bytes as u64
            );
            // 5 events of 10 records, 2 per subscription: 3 subscriptions, 2 of them again.
            assert_eq!(counter(&values, names::SUBSCRIPTION_EVENTS_TOTAL, shard), 5);
            assert_eq!(counter(&values, names::SUBSCRIPTIONS_TOTAL, shard), 3);
            assert_eq!(counter(&values, names::RESUBSCRIPTIONS_TOTAL, shard), 2);
            assert_eq!(counter(&values, names::HANDLER_RECORDS_TOTAL, shard), 50);
        }
        assert_eq!(counter(&values, names::READ_THROTTLES_TOTAL, &s0), 1);
        assert_eq!(counter(&values, names::READ_THROTTLES_TOTAL, &s1), 0);
    }
}
