//! `MetricsLayer`: counts and times the calls of the inner service, per stream and shard.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use metrics::{Counter, Histogram};
use tower::{Layer, Service};

use crate::metric_names as names;
use crate::record::{Batch, ShardId};

/// A [`Layer`] that records, per stream and shard, the calls of the inner service through the
/// [`metrics`] facade: `kinesis_handler_calls_total`, `kinesis_handler_records_total`,
/// `kinesis_handler_bytes_total`, `kinesis_handler_duration_seconds` and
/// `kinesis_handler_errors_total` (see [`metric_names`](crate::metric_names) for what each
/// counts). Responses and errors pass through unchanged.
///
/// The metric handles of a shard are registered with the recorder the first time the layer
/// sees the shard, then kept: a call costs a map lookup, a clock read and a few atomic adds,
/// and allocates nothing. Install the recorder before the first batch.
///
/// Where it sits decides what it measures. Outermost (above [`BatchLayer`](crate::batch::BatchLayer)),
/// it counts the records the consumer delivers and the errors that end the run, but a call that
/// only buffers records returns at once and counts as handled, and a flush set off by an empty
/// batch (a heartbeat) is not timed. Just inside `BatchLayer` (above
/// [`CheckpointLayer`](crate::checkpoint::CheckpointLayer)), each call is a batch the handler really
/// handles: the latency histogram is then the handling (with retries) and the checkpoint
/// write. Use one of the two: two `MetricsLayer`s of one stream add to the same series.
///
/// ```
/// use kinesis_tower_layers::{Batch, BoxError};
/// use kinesis_tower_layers::metrics::MetricsLayer;
/// use tower::{service_fn, ServiceBuilder};
///
/// let service = ServiceBuilder::new()
///     .layer(MetricsLayer::new("orders"))
///     .service(service_fn(|batch: Batch| async move {
///         let _ = batch.records.len();
///         Ok::<_, BoxError>(())
///     }));
/// # drop(service);
/// ```
#[derive(Clone, Debug)]
pub struct MetricsLayer {
    stream: Arc<str>,
}

impl MetricsLayer {
    /// Records under the label `stream = <stream>`.
    pub fn new(stream: impl Into<Arc<str>>) -> Self {
        Self {
            stream: stream.into(),
        }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService::new(inner, self.stream.clone())
    }
}

/// The handles of one shard.
#[derive(Debug)]
struct ShardHandles {
    calls: Counter,
    records: Counter,
    bytes: Counter,
    duration: Histogram,
    errors: Counter,
}

impl ShardHandles {
    fn register(stream: &Arc<str>, shard: &ShardId) -> Self {
        let labels = names::labels(stream.clone(), shard);
        Self {
            calls: metrics::counter!(names::HANDLER_CALLS_TOTAL, labels.clone()),
            records: metrics::counter!(names::HANDLER_RECORDS_TOTAL, labels.clone()),
            bytes: metrics::counter!(names::HANDLER_BYTES_TOTAL, labels.clone()),
            duration: metrics::histogram!(names::HANDLER_DURATION_SECONDS, labels.clone()),
            errors: metrics::counter!(names::HANDLER_ERRORS_TOTAL, labels),
        }
    }
}

/// Shards and their handles.
///
/// Shard ids are short and come from Kinesis, not from an attacker: rustc's Fx hash makes the
/// per-call lookup a few nanoseconds instead of SipHash's twenty-odd.
type ShardMap = HashMap<ShardId, Arc<ShardHandles>, rustc_hash::FxBuildHasher>;

/// The registry shared by a service and its clones: every shard registered once.
type Registry = Arc<Mutex<ShardMap>>;

/// The [`Service`] made by [`MetricsLayer`].
///
/// Clones share the registry of shards; each clone also keeps its own map of the shards it has
/// seen, so a call takes no lock once its shard is known to the clone.
#[derive(Debug)]
pub struct MetricsService<S> {
    inner: S,
    stream: Arc<str>,
    shared: Registry,
    local: ShardMap,
}

impl<S: Clone> Clone for MetricsService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            stream: self.stream.clone(),
            shared: self.shared.clone(),
            // Filled from the shared registry on first use: cloning stays cheap.
            local: ShardMap::default(),
        }
    }
}

impl<S> MetricsService<S> {
    /// Wraps `inner`, recording under the label `stream = <stream>`.
    pub fn new(inner: S, stream: impl Into<Arc<str>>) -> Self {
        Self {
            inner,
            stream: stream.into(),
            shared: Registry::default(),
            local: ShardMap::default(),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn handles(&mut self, shard: &ShardId) -> Arc<ShardHandles> {
        if let Some(handles) = self.local.get(shard) {
            return handles.clone();
        }
        let handles = self
            .shared
            .lock()
            // Only inserts: a poisoned lock still holds a consistent map.
            .unwrap_or_else(PoisonError::into_inner)
            .entry(shard.clone())
            .or_insert_with(|| Arc::new(ShardHandles::register(&self.stream, shard)))
            .clone();
        self.local.insert(shard.clone(), handles.clone());
        handles
    }
}

impl<S> Service<Batch> for MetricsService<S>
where
    S: Service<Batch>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, batch: Batch) -> Self::Future {
        let handles = self.handles(&batch.shard_id);
        let records = batch.len() as u64;
        let timing = if records == 0 {
            None
        } else {
            handles.calls.increment(1);
            Some(Timing {
                started: Instant::now(),
                records,
                bytes: batch.size() as u64,
            })
        };
        MetricsFuture {
            future: self.inner.call(batch),
            handles,
            timing,
        }
    }
}

/// What a call with records reports when it ends.
#[derive(Debug)]
struct Timing {
    started: Instant,
    records: u64,
    bytes: u64,
}

pin_project_lite::pin_project! {
    /// The future of [`MetricsService`].
    #[derive(Debug)]
    pub struct MetricsFuture<F> {
        #[pin]
        future: F,
        handles: Arc<ShardHandles>,
        timing: Option<Timing>,
    }
}

impl<F, R, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<R, E>>,
{
    type Output = Result<R, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.future.poll(cx));
        let handles = &*this.handles;
        if let Some(timing) = this.timing.take() {
            handles
                .duration
                .record(timing.started.elapsed().as_secs_f64());
            if result.is_ok() {
                handles.records.increment(timing.records);
                handles.bytes.increment(timing.bytes);
            }
        }
        if result.is_err() {
            handles.errors.increment(1);
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::record;
    use crate::{BoxError, Record};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
    use metrics_util::{CompositeKey, MetricKind};
    use std::collections::HashMap;
    use std::time::Duration;
    use tower::{service_fn, ServiceExt};

    /// A batch of `shard` with records of these data sizes, at sequence numbers 1, 2, ...
    fn batch(shard: &str, sizes: &[usize]) -> Batch {
        let records = (1..)
            .zip(sizes)
            .map(|(n, size)| Record {
                data: bytes::Bytes::from(vec![0u8; *size]),
                ..record(shard, n)
            })
            .collect();
        Batch::new(shard.into(), records)
    }

    /// One snapshot of the recorder (taking one drains it), looked up by name and shard.
    pub(crate) struct Values(HashMap<CompositeKey, DebugValue>);

    impl Values {
        pub(crate) fn take(snapshotter: &Snapshotter, stream: &str) -> Self {
            Self(
                snapshotter
                    .snapshot()
                    .into_vec()
                    .into_iter()
                    .filter(|(key, ..)| {
                        key.key()
                            .labels()
                            .any(|l| l.key() == names::STREAM && l.value() == stream)
                    })
                    .map(|(key, _, _, value)| (key, value))
                    .collect(),
            )
        }

        fn get(&self, kind: MetricKind, name: &'static str, shard: &str) -> Option<&DebugValue> {
            self.0.iter().find_map(|(key, value)| {
                let matches = key.kind() == kind
                    && key.key().name() == name
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == names::SHARD && l.value() == shard);
                matches.then_some(value)
            })
        }

        pub(crate) fn counter(&self, name: &'static str, shard: &str) -> Option<u64> {
            match self.get(MetricKind::Counter, name, shard) {
                Some(DebugValue::Counter(n)) => Some(*n),
                Some(other) => panic!("{name} is not a counter: {other:?}"),
                None => None,
            }
        }

        pub(crate) fn histogram(&self, name: &'static str, shard: &str) -> Vec<f64> {
            match self.get(MetricKind::Histogram, name, shard) {
                Some(DebugValue::Histogram(values)) => {
                    values.iter().map(|v| v.into_inner()).collect()
                }
                Some(other) => panic!("{name} is not a histogram: {other:?}"),
                None => Vec::new(),
            }
        }
    }

    /// Runs `f` on a paused current-thread runtime with `recorder` as this thread's recorder.
    fn with_recorder<T>(
        recorder: &DebuggingRecorder,
        f: impl std::future::Future<Output = T>,
    ) -> T {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        metrics::with_local_recorder(recorder, || runtime.block_on(f))
    }

    #[test]
    fn counts_calls_records_bytes_errors_and_times_calls_per_shard() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        with_recorder(&recorder, async {
            // Sleeps 50 ms (paused clock: the histogram is in real time, so only check it is
            // there), fails batches whose first record has 13 bytes of data.
            let inner = service_fn(|batch: Batch| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if batch.records.first().is_some_and(|r| r.data.len() == 13) {
                    Err::<(), BoxError>("boom".into())
                } else {
                    Ok(())
                }
            });
            let mut svc = MetricsLayer::new("orders").layer(inner);
            for b in [
                batch("shard-0", &[10, 20, 30]),
                batch("shard-0", &[1]),
                batch("shard-1", &[5, 5]),
                batch("shard-1", &[13, 100]),
                Batch::empty(ShardId::from("shard-1"), None),
            ] {
                let _ = svc.ready().await.unwrap().call(b).await;
            }
            // A clone shares the registry and adds to the same series.
            let mut clone = svc.clone();
            clone
                .ready()
                .await
                .unwrap()
                .call(batch("shard-0", &[8]))
                .await
                .unwrap();
        });

        use names::*;
        let values = Values::take(&snapshotter, "orders");
        // Data + partition key ("pk", 2 bytes) per record.
        assert_eq!(values.counter(HANDLER_CALLS_TOTAL, "shard-0"), Some(3));
        assert_eq!(values.counter(HANDLER_RECORDS_TOTAL, "shard-0"), Some(5));
        assert_eq!(
            values.counter(HANDLER_BYTES_TOTAL, "shard-0"),
            Some(60 + 6 + 1 + 2 + 8 + 2)
        );
        assert_eq!(values.counter(HANDLER_ERRORS_TOTAL, "shard-0"), Some(0));
        assert_eq!(
            values.histogram(HANDLER_DURATION_SECONDS, "shard-0").len(),
            3
        );

        // The failed batch counts as a call and an error, not as records handled; the empty
        // batch counts as nothing.
        assert_eq!(values.counter(HANDLER_CALLS_TOTAL, "shard-1"), Some(2));
        assert_eq!(values.counter(HANDLER_RECORDS_TOTAL, "shard-1"), Some(2));
        assert_eq!(values.counter(HANDLER_BYTES_TOTAL, "shard-1"), Some(14));
        assert_eq!(values.counter(HANDLER_ERRORS_TOTAL, "shard-1"), Some(1));
        assert_eq!(
            values.histogram(HANDLER_DURATION_SECONDS, "shard-1").len(),
            2
        );
    }

    #[test]
    fn the_latency_histogram_holds_the_time_of_the_call() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let inner = service_fn(|_batch: Batch| async {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    Ok::<_, BoxError>(())
                });
                let mut svc = MetricsLayer::new("orders").layer(inner);
                svc.ready()
                    .await
                    .unwrap()
                    .call(batch("shard-0", &[1]))
                    .await
                    .unwrap();
            })
        });
        let values = Values::take(&snapshotter, "orders");
        let samples = values.histogram(names::HANDLER_DURATION_SECONDS, "shard-0");
        assert_eq!(samples.len(), 1);
        assert!(
            (0.03..5.0).contains(&samples[0]),
            "a 30 ms call recorded as {} s",
            samples[0]
        );
    }

    #[test]
    fn a_failing_heartbeat_counts_as_an_error_only() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        with_recorder(&recorder, async {
            let inner =
                service_fn(|_batch: Batch| async { Err::<(), BoxError>("flush failed".into()) });
            let mut svc = MetricsLayer::new("orders").layer(inner);
            let err = svc
                .ready()
                .await
                .unwrap()
                .call(Batch::empty(ShardId::from("shard-7"), None))
                .await
                .unwrap_err();
            assert_eq!(err.to_string(), "flush failed");
        });
        let values = Values::take(&snapshotter, "orders");
        assert_eq!(
            values.counter(names::HANDLER_ERRORS_TOTAL, "shard-7"),
            Some(1)
        );
        assert_eq!(
            values.counter(names::HANDLER_CALLS_TOTAL, "shard-7"),
            Some(0)
        );
        assert!(values
            .histogram(names::HANDLER_DURATION_SECONDS, "shard-7")
            .is_empty());
    }
}
