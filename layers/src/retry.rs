//! `RetryLayer`: retries failed calls with exponential backoff and jitter ([`Backoff`]), on
//! tower's retry machinery (`tower::retry::{Retry, Policy}`).

use std::error::Error as StdError;
use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::ErrInto;
use futures::TryFutureExt;
use tokio::time::{Instant, Sleep};
use tower::retry::{Policy, Retry};
use tower::{Layer, Service};

use crate::backoff::Backoff;
use crate::checkpoint::StoreError;
use crate::BoxError;

/// Default [`RetryLayer::max_attempts`]: 5 attempts in all (the first call and 4 retries).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Default [`RetryLayer::initial_backoff`]: 100 ms.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Default [`RetryLayer::max_backoff`]: 10 s.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Default [`RetryLayer::max_elapsed`]: 30 s, the consumer's default drain timeout, so a call
/// being retried at shutdown gives up within it.
pub const DEFAULT_MAX_ELAPSED: Duration = Duration::from_secs(30);

/// Decides whether an error is worth another attempt.
///
/// Implemented by [`DefaultClassifier`] (the default) and by any
/// `Fn(&BoxError) -> bool + Clone + Send + Sync + 'static` closure.
pub trait Classify: Clone + Send + Sync + 'static {
    /// True when the call that failed with `error` should be made again.
    fn is_retryable(&self, error: &BoxError) -> bool;
}

impl<F> Classify for F
where
    F: Fn(&BoxError) -> bool + Clone + Send + Sync + 'static,
{
    fn is_retryable(&self, error: &BoxError) -> bool {
        self(error)
    }
}

/// The default classifier: retries the errors that say they are transient (see
/// [`is_transient`]), and nothing else.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultClassifier;

impl Classify for DefaultClassifier {
    fn is_retryable(&self, error: &BoxError) -> bool {
        is_transient(&**error)
    }
}

/// An error that says "trying again later may succeed": return it (or put it anywhere in your
/// error's `source()` chain) from a handler, and the default [`RetryLayer`] retries the call.
/// It displays as the error it wraps and is otherwise transparent.
///
/// ```
/// use kinesis_tower_layers::BoxError;
/// use kinesis_tower_layers::retry::{is_transient, Transient};
///
/// let e: BoxError = Transient::new("warehouse busy").into();
/// assert!(is_transient(&*e));
/// assert_eq!(e.to_string(), "warehouse busy");
/// ```
pub struct Transient(BoxError);

impl Transient {
    /// Marks `error` transient.
    pub fn new(error: impl Into<BoxError>) -> Self {
        Self(error.into())
    }

    /// The wrapped error.
    pub fn get_ref(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.0
    }

    /// Unwraps the error.
    pub fn into_inner(self) -> BoxError {
        self.0
    }
}

impl fmt::Debug for Transient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Transient").field(&self.0).finish()
    }
}

impl fmt::Display for Transient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for Transient {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0.source()
    }
}

/// Whether `error` says it is transient. Walks the `source()` chain and stops at the first of:
///
/// - a [`Transient`]: transient;
/// - a [`StoreError`]: transient when [`StoreError::is_retryable`] (a checkpoint back-end
///   that could not be reached), not for a bad name or a corrupt value;
/// - a [`std::io::Error`] of kind `TimedOut`, `Interrupted`, `WouldBlock`,
///   `ConnectionReset`, `ConnectionAborted`, `ConnectionRefused` or `BrokenPipe`: transient
///   (any other kind is not).
///
/// Everything else is not transient: a handler's own errors are taken as final unless it
/// says otherwise, so a bad record is not hammered `max_attempts` times.
pub fn is_transient(error: &(dyn StdError + 'static)) -> bool {
    use std::io::ErrorKind;
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<Transient>() {
            return true;
        }
        if let Some(store) = e.downcast_ref::<StoreError>() {
            return store.is_retryable();
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::TimedOut
                    | ErrorKind::Interrupted
                    | ErrorKind::WouldBlock
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::ConnectionRefused
                    | ErrorKind::BrokenPipe
            );
        }
        next = e.source();
    }
    false
}

/// The retry policy of [`RetryLayer`] (a `tower::retry::Policy`): exponential backoff with
/// equal jitter ([`Backoff`]), bounded by attempts and elapsed time, retrying what the
/// classifier allows.
///
/// Retry `n` (1 for the first retry) waits a random time between half of and the whole
/// `min(max_backoff, initial_backoff * 2^(n-1))` ([`Backoff::delay`]: calls that failed
/// together do not retry together). A call is not retried when it was the
/// `max_attempts`-th, when the classifier says no, or when the next attempt would start more
/// than `max_elapsed` after the first one started. The error returned is then the last one,
/// unchanged.
#[derive(Clone, Debug)]
pub struct RetryPolicy<C = DefaultClassifier> {
    max_attempts: u32,
    /// `initial_backoff` and `max_backoff`.
    backoff: Backoff,
    max_elapsed: Duration,
    classifier: C,
    /// Attempts made for the current request (tower clones the policy into each call).
    attempts: u32,
    /// When the current request's first attempt started.
    started: Option<Instant>,
}

impl<C> RetryPolicy<C> {
    /// The upper bound of the wait before retry `retry` (1 for the first retry):
    /// [`Backoff::ceiling`].
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        self.backoff.ceiling(retry)
    }

    /// The backoff the waits are drawn from: `initial_backoff` as its base, `max_backoff` as
    /// its max.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }
}

impl<C, Req, Res> Policy<Req, Res, BoxError> for RetryPolicy<C>
where
    C: Classify,
    Req: Clone,
{
    type Future = Sleep;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, BoxError>) -> Option<Sleep> {
        let error = result.as_ref().err()?;
        self.attempts += 1;
        let started = *self.started.get_or_insert_with(Instant::now);
        if !self.classifier.is_retryable(error) {
            return None;
        }
        if self.attempts >= self.max_attempts {
            tracing::warn!(attempts = self.attempts, %error, "giving up: max attempts reached");
            return None;
        }
        let delay = self.backoff.delay(self.attempts);
        let elapsed = started.elapsed();
        if elapsed.saturating_add(delay) > self.max_elapsed {
            tracing::warn!(attempts = self.attempts, ?elapsed, %error, "giving up: max elapsed time reached");
            return None;
        }
        tracing::warn!(attempt = self.attempts, ?delay, %error, "call failed; retrying");
        Some(tokio::time::sleep(delay))
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        // Called before each attempt; before the first one, `attempts` is 0 (tower clones the
        // policy into the call after this), which is where the elapsed time starts.
        if self.attempts == 0 {
            self.started = Some(Instant::now());
        }
        Some(req.clone())
    }
}

/// A [`Layer`] that retries failed calls of the inner service: exponential backoff with
/// jitter ([`Backoff`]), at most [`max_attempts`](RetryLayer::max_attempts) attempts, no new attempt after
/// [`max_elapsed`](RetryLayer::max_elapsed), and only errors the classifier calls
/// retryable (default: [`DefaultClassifier`]; see [`is_transient`] and [`Transient`]).
///
/// Built on `tower::retry::Retry` with [`RetryPolicy`]. Each attempt gets a clone of the
/// request: a [`Batch`](crate::Batch) clones in O(1), as its [`Records`](crate::Records) are
/// shared copy-on-write (an inner layer that changes the records in place copies them then;
/// `DeaggregateLayer` reads them in place and clones only the plain records it keeps). Between
/// attempts the inner service's `poll_ready` is awaited again. The inner service must be
/// `Clone`; its errors are boxed.
///
/// Put it *inside* [`CheckpointLayer`](crate::checkpoint::CheckpointLayer): the checkpoint layer then sees
/// only the final outcome (one checkpoint write after the attempt that succeeded, none if
/// every attempt failed), and a transient checkpoint-store error is not answered by handling
/// the batch again.
///
/// A partly failed batch ([`PartialFailure`](crate::checkpoint::PartialFailure), from
/// [`KeyedConcurrencyLayer`](crate::keyed::KeyedConcurrencyLayer)) is classified by the
/// handler's error it carries, and retried whole: every key of it is called again, those that
/// had succeeded too. Put `RetryLayer` inside `KeyedConcurrencyLayer` to retry only the key
/// that failed.
///
/// ```
/// use std::time::Duration;
/// use kinesis_tower_layers::{Batch, BoxError, Checkpointer, MemoryStore};
/// use kinesis_tower_layers::checkpoint::CheckpointLayer;
/// use kinesis_tower_layers::retry::{RetryLayer, Transient};
/// use tower::{service_fn, ServiceBuilder};
///
/// let checkpointer = Checkpointer::new(MemoryStore::new(), "my-app/orders");
/// let handler = service_fn(|batch: Batch| async move {
///     // A sink that is briefly unavailable: say so, and the batch is tried again.
///     if batch.is_empty() {
///         return Err::<(), BoxError>(Transient::new("sink busy").into());
///     }
///     Ok(())
/// });
/// let service = ServiceBuilder::new()
///     .layer(CheckpointLayer::new(checkpointer))
///     .layer(
///         RetryLayer::new()
///             .max_attempts(8)
///             .initial_backoff(Duration::from_millis(50))
///             .max_backoff(Duration::from_secs(5))
///             .max_elapsed(Duration::from_secs(20)),
///     )
///     .service(handler);
/// # drop(service);
///
/// // Or decide yourself which errors to retry:
/// let layer = RetryLayer::new().classify(|e: &BoxError| e.to_string().contains("throttled"));
/// # drop(layer);
/// ```
#[derive(Clone, Debug)]
pub struct RetryLayer<C = DefaultClassifier> {
    policy: RetryPolicy<C>,
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryLayer {
    /// Retries transient errors: [`DEFAULT_MAX_ATTEMPTS`] attempts, backoff from
    /// [`DEFAULT_INITIAL_BACKOFF`] up to [`DEFAULT_MAX_BACKOFF`], for at most
    /// [`DEFAULT_MAX_ELAPSED`].
    pub fn new() -> Self {
        Self {
            policy: RetryPolicy {
                max_attempts: DEFAULT_MAX_ATTEMPTS,
                backoff: Backoff::new(DEFAULT_INITIAL_BACKOFF, DEFAULT_MAX_BACKOFF),
                max_elapsed: DEFAULT_MAX_ELAPSED,
                classifier: DefaultClassifier,
                attempts: 0,
                started: None,
            },
        }
    }
}

impl<C> RetryLayer<C> {
    /// Attempts in all, the first call included; 1 means no retry. 0 is taken as 1.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.policy.max_attempts = attempts.max(1);
        self
    }

    /// The upper bound of the first retry's wait; it doubles for each further retry, up to
    /// [`max_backoff`](Self::max_backoff) (the doubling saturates: any value works, and
    /// `Duration::MAX` makes every bound max backoff). Each wait is at least half its bound.
    pub fn initial_backoff(mut self, backoff: Duration) -> Self {
        self.policy.backoff = Backoff::new(backoff, self.policy.backoff.max());
        self
    }

    /// The upper bound of any wait (`Duration::MAX`: none but the doubling's, which
    /// saturates).
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.policy.backoff = Backoff::new(self.policy.backoff.base(), backoff);
        self
    }

    /// No attempt starts later than this after the first one started (`Duration::MAX`: no
    /// bound). An attempt in progress is not cut short: stack `tower`'s `Timeout` inside for
    /// that.
    pub fn max_elapsed(mut self, elapsed: Duration) -> Self {
        self.policy.max_elapsed = elapsed;
        self
    }

    /// Retries the errors `classifier` says are retryable, instead of the transient ones.
    pub fn classify<K: Classify>(self, classifier: K) -> RetryLayer<K> {
        let RetryPolicy {
            max_attempts,
            backoff,
            max_elapsed,
            ..
        } = self.policy;
        RetryLayer {
            policy: RetryPolicy {
                max_attempts,
                backoff,
                max_elapsed,
                classifier,
                attempts: 0,
                started: None,
            },
        }
    }

    /// The policy the services made by this layer use.
    pub fn policy(&self) -> &RetryPolicy<C> {
        &self.policy
    }
}

impl<S, C: Clone> Layer<S> for RetryLayer<C> {
    type Service = RetryService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryService {
            inner: Retry::new(self.policy.clone(), BoxErrors(inner)),
        }
    }
}

/// An inner service with its errors boxed: what [`RetryService`] wraps in `tower`'s `Retry`,
/// so that classifiers see a [`BoxError`] whatever the inner service's error type.
#[derive(Clone, Debug)]
struct BoxErrors<S>(S);

impl<S, Req> Service<Req> for BoxErrors<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ErrInto<S::Future, BoxError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.0.call(req).err_into()
    }
}

/// The [`Service`] made by [`RetryLayer`].
#[derive(Clone, Debug)]
pub struct RetryService<S, C = DefaultClassifier> {
    inner: Retry<RetryPolicy<C>, BoxErrors<S>>,
}

impl<S, C> RetryService<S, C> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner.get_ref().0
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RetryService`].
    pub struct RetryFuture<S, C, Req>
    where
        S: Service<Req>,
        S::Error: Into<BoxError>,
        C: Classify,
        Req: Clone,
    {
        #[pin]
        inner: tower::retry::future::ResponseFuture<RetryPolicy<C>, BoxErrors<S>, Req>,
    }
}

impl<S, C, Req> std::future::Future for RetryFuture<S, C, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify,
    Req: Clone,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

impl<S, C, Req> Service<Req> for RetryService<S, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify,
    Req: Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = RetryFuture<S, C, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        RetryFuture {
            inner: self.inner.call(req),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::CheckpointLayer;
    use crate::testing::{batch, FaultyStore};
    use crate::{Batch, Checkpointer};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};
    use tower::{service_fn, ServiceBuilder, ServiceExt};

    /// A handler that fails its first `failures` calls with `error(n)` (n = attempt, from 1),
    /// recording when each attempt started and what it was given.
    #[derive(Clone)]
    struct Flaky {
        attempts: Arc<AtomicU32>,
        started: Arc<Mutex<Vec<(Instant, Batch)>>>,
        failures: u32,
        error: fn(u32) -> BoxError,
    }

    impl Flaky {
        fn new(failures: u32, error: fn(u32) -> BoxError) -> Self {
            Self {
                attempts: Arc::default(),
                started: Arc::default(),
                failures,
                error,
            }
        }

        fn attempts(&self) -> u32 {
            self.attempts.load(Ordering::SeqCst)
        }

        fn gaps(&self) -> Vec<Duration> {
            let started = self.started.lock().unwrap();
            started.windows(2).map(|w| w[1].0 - w[0].0).collect()
        }
    }

    impl Service<Batch> for Flaky {
        type Response = ();
        type Error = BoxError;
        type Future = std::future::Ready<Result<(), BoxError>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, batch: Batch) -> Self::Future {
            let n = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
            self.started.lock().unwrap().push((Instant::now(), batch));
            std::future::ready(if n <= self.failures {
                Err((self.error)(n))
            } else {
                Ok(())
            })
        }
    }

    fn transient(n: u32) -> BoxError {
        Transient::new(format!("attempt {n} failed")).into()
    }

    fn permanent(n: u32) -> BoxError {
        format!("attempt {n}: bad record").into()
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_errors_with_the_same_batch_until_success() {
        let handler = Flaky::new(2, transient);
        let mut svc = RetryLayer::new().layer(handler.clone());
        svc.ready()
            .await
            .unwrap()
            .call(batch([1, 2]))
            .await
            .unwrap();
        assert_eq!(handler.attempts(), 3);
        let started = handler.started.lock().unwrap();
        assert!(started.iter().all(|(_, b)| *b == batch([1, 2])));
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_max_attempts_with_the_last_error() {
        let handler = Flaky::new(u32::MAX, transient);
        let mut svc = RetryLayer::new().max_attempts(4).layer(handler.clone());
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(batch([1]))
            .await
            .unwrap_err();
        assert_eq!(handler.attempts(), 4);
        assert_eq!(err.to_string(), "attempt 4 failed");
        assert!(err.is::<Transient>());
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_max_elapsed_with_the_last_error() {
        // Each attempt takes 1 s; waits are at most 10 ms; no attempt starts after 3.5 s.
        let attempts = Arc::new(AtomicU32::new(0));
        let slow = {
            let attempts = attempts.clone();
            service_fn(move |_b: Batch| {
                let n = attempts.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Err::<(), BoxError>(transient(n))
                }
            })
        };
        let mut svc = RetryLayer::new()
            .max_attempts(100)
            .initial_backoff(Duration::from_millis(10))
            .max_backoff(Duration::from_millis(10))
            .max_elapsed(Duration::from_millis(3_500))
            .layer(slow);
        let t0 = Instant::now();
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(batch([1]))
            .await
            .unwrap_err();
        assert_eq!(attempts.load(Ordering::SeqCst), 4);
        assert_eq!(err.to_string(), "attempt 4 failed");
        assert!(
            t0.elapsed() < Duration::from_millis(4_100),
            "{:?}",
            t0.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_retry_errors_that_are_not_retryable() {
        let handler = Flaky::new(u32::MAX, permanent);
        let mut svc = RetryLayer::new().layer(handler.clone());
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(batch([1]))
            .await
            .unwrap_err();
        assert_eq!(handler.attempts(), 1);
        assert_eq!(err.to_string(), "attempt 1: bad record");

        // A closure decides instead: now the "bad record" errors are retried, transient ones not.
        let handler = Flaky::new(2, permanent);
        let mut svc = RetryLayer::new()
            .classify(|e: &BoxError| e.to_string().contains("bad record"))
            .layer(handler.clone());
        svc.ready().await.unwrap().call(batch([1])).await.unwrap();
        assert_eq!(handler.attempts(), 3);
        let handler = Flaky::new(2, transient);
        let mut svc = RetryLayer::new()
            .classify(|e: &BoxError| e.to_string().contains("bad record"))
            .layer(handler.clone());
        assert!(svc.ready().await.unwrap().call(batch([1])).await.is_err());
        assert_eq!(handler.attempts(), 1);
    }

    #[derive(Debug, thiserror::Error)]
    #[error("loading the batch failed")]
    struct Wrapped(#[source] BoxError);

    #[test]
    fn transient_means_marked_a_retryable_store_error_or_a_passing_io_error() {
        let store = |retryable| StoreError::Backend {
            backend: "test",
            operation: "set",
            namespace: None,
            shard_id: None,
            retryable,
            source: "down".into(),
        };
        let io = |kind| std::io::Error::new(kind, "io");
        let cases: Vec<(BoxError, bool)> = vec![
            (Transient::new("busy").into(), true),
            (Box::new(Wrapped(Transient::new("busy").into())), true),
            (Box::new(store(true)), true),
            (Box::new(Wrapped(Box::new(store(true)))), true),
            (Box::new(store(false)), false),
            (Box::new(io(std::io::ErrorKind::TimedOut)), true),
            (Box::new(io(std::io::ErrorKind::ConnectionReset)), true),
            (Box::new(io(std::io::ErrorKind::NotFound)), false),
            ("plain message".into(), false),
            (Box::new(Wrapped("plain".into())), false),
        ];
        for (error, expected) in cases {
            assert_eq!(is_transient(&*error), expected, "{error:?}");
            assert_eq!(
                DefaultClassifier.is_retryable(&error),
                expected,
                "{error:?}"
            );
        }
    }

    /// Waits are drawn between half of and the whole of a ceiling that doubles per retry up to
    /// max backoff.
    #[tokio::test(start_paused = true)]
    async fn backoff_grows_and_is_jittered_within_bounds() {
        fastrand::seed(7);
        let layer = RetryLayer::new()
            .max_attempts(7)
            .initial_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_millis(1_600))
            .max_elapsed(Duration::MAX);
        let ceilings: Vec<Duration> = (1..=6).map(|r| layer.policy().backoff_ceiling(r)).collect();
        let ms = |d: Duration| d.as_millis() as u64;
        assert_eq!(
            ceilings.iter().map(|c| ms(*c)).collect::<Vec<_>>(),
            vec![100, 200, 400, 800, 1_600, 1_600]
        );
        let runs = 200;
        let mut sums = [0f64; 6];
        let mut distinct = vec![std::collections::BTreeSet::new(); 6];
        for _ in 0..runs {
            let handler = Flaky::new(u32::MAX, transient);
            let mut svc = layer.clone().layer(handler.clone());
            let _ = svc.ready().await.unwrap().call(batch([1])).await;
            let gaps = handler.gaps();
            assert_eq!(gaps.len(), 6);
            for (i, gap) in gaps.iter().enumerate() {
                // The timer has millisecond ticks: a wait may end up to 1 ms late.
                assert!(
                    ceilings[i] / 2 <= *gap && *gap <= ceilings[i] + Duration::from_millis(1),
                    "retry {}: {gap:?} out of [{:?} / 2, {:?}]",
                    i + 1,
                    ceilings[i],
                    ceilings[i]
                );
                sums[i] += gap.as_secs_f64();
                distinct[i].insert(ms(*gap));
            }
        }
        for i in 0..6 {
            let mean = sums[i] / runs as f64;
            let half = ceilings[i].as_secs_f64() / 2.0;
            // Uniform on [ceiling / 2, ceiling]: the mean is near three quarters of it.
            let three_quarters = half * 1.5;
            assert!(
                (mean - three_quarters).abs() < half * 0.1,
                "retry {}: mean {mean} vs {three_quarters}",
                i + 1
            );
            assert!(distinct[i].len() > 20, "retry {}: not jittered", i + 1);
        }
    }

    /// Calls `svc` with a batch; returns the result and the (virtual) time the call took.
    async fn timed<S>(svc: &mut S) -> (Result<(), BoxError>, Duration)
    where
        S: Service<Batch, Response = (), Error = BoxError>,
    {
        let t0 = Instant::now();
        let result = svc.ready().await.unwrap().call(batch([1])).await;
        (result, t0.elapsed())
    }

    /// `Duration::MAX` as the first retry's bound: every ceiling is max backoff.
    #[tokio::test(start_paused = true)]
    async fn initial_backoff_of_duration_max_is_bounded_by_max_backoff() {
        let layer = RetryLayer::new()
            .max_attempts(4)
            .initial_backoff(Duration::MAX)
            .max_backoff(Duration::from_secs(2));
        for retry in [1, 2, 40, u32::MAX] {
            assert_eq!(
                layer.policy().backoff_ceiling(retry),
                Duration::from_secs(2)
            );
        }
        let handler = Flaky::new(3, transient);
        let (result, took) = timed(&mut layer.layer(handler.clone())).await;
        result.unwrap();
        assert_eq!(handler.attempts(), 4);
        // Three waits, each between half of and all of 2 s.
        assert!(
            Duration::from_secs(3) <= took && took <= Duration::from_millis(6_003),
            "{took:?}"
        );
    }

    /// `Duration::MAX` as the bound of every wait: the ceilings saturate, and a wait of
    /// centuries is still a wait (the timer caps it), not a panic.
    #[tokio::test(start_paused = true)]
    async fn max_backoff_of_duration_max_saturates() {
        let layer = RetryLayer::new()
            .initial_backoff(Duration::from_secs(1))
            .max_backoff(Duration::MAX)
            .max_elapsed(Duration::MAX);
        assert_eq!(layer.policy().backoff_ceiling(3), Duration::from_secs(4));
        let ceilings: Vec<Duration> = [33, 64, 65, u32::MAX]
            .into_iter()
            .map(|retry| layer.policy().backoff_ceiling(retry))
            .collect();
        assert!(ceilings.windows(2).all(|w| w[0] <= w[1]), "{ceilings:?}");
        assert!(ceilings[0] >= Duration::from_secs(1 << 31), "{ceilings:?}");
        assert_eq!(layer.policy().backoff_ceiling(u32::MAX), Duration::MAX);
        let layer = layer.initial_backoff(Duration::MAX);
        let handler = Flaky::new(2, transient);
        let (result, _) = timed(&mut layer.layer(handler.clone())).await;
        result.unwrap();
        assert_eq!(handler.attempts(), 3);
    }

    /// `Duration::MAX` as the elapsed bound: only max attempts stop the retries, however long
    /// the waits.
    #[tokio::test(start_paused = true)]
    async fn max_elapsed_of_duration_max_leaves_max_attempts_in_charge() {
        for max_backoff in [Duration::from_secs(10), Duration::MAX] {
            let handler = Flaky::new(u32::MAX, transient);
            let mut svc = RetryLayer::new()
                .max_attempts(6)
                .initial_backoff(Duration::from_secs(5))
                .max_backoff(max_backoff)
                .max_elapsed(Duration::MAX)
                .layer(handler.clone());
            let (result, _) = timed(&mut svc).await;
            assert_eq!(result.unwrap_err().to_string(), "attempt 6 failed");
            assert_eq!(handler.attempts(), 6);
        }
    }

    /// CheckpointLayer outside RetryLayer: one write, after the attempt that succeeded; none
    /// when every attempt fails.
    #[tokio::test(start_paused = true)]
    async fn checkpoint_outside_retry_sees_only_the_final_outcome() {
        for (failures, succeeds) in [(2, true), (u32::MAX, false)] {
            let handler = Flaky::new(failures, transient);
            // Notes how many handler attempts had been made at each checkpoint write.
            let attempts_at_write: Arc<Mutex<Vec<u32>>> = Arc::default();
            let store = Arc::new(FaultyStore::new().on_write({
                let (seen, attempts) = (attempts_at_write.clone(), handler.attempts.clone());
                move || seen.lock().unwrap().push(attempts.load(Ordering::SeqCst))
            }));
            let checkpointer = Checkpointer::from_arc(store.clone(), "ns");
            let mut svc = ServiceBuilder::new()
                .layer(CheckpointLayer::new(checkpointer.clone()))
                .layer(RetryLayer::new())
                .service(handler.clone());
            let result = svc.ready().await.unwrap().call(batch([1, 2, 3])).await;
            if succeeds {
                result.unwrap();
                assert_eq!(handler.attempts(), 3);
                assert_eq!(store.writes(), 1);
                assert_eq!(*attempts_at_write.lock().unwrap(), vec![3]);
                assert_eq!(
                    checkpointer.get("shard-0").await.unwrap(),
                    batch([3]).checkpoint()
                );
            } else {
                assert_eq!(result.unwrap_err().to_string(), "attempt 5 failed");
                assert_eq!(handler.attempts(), DEFAULT_MAX_ATTEMPTS);
                assert_eq!(store.writes(), 0);
                assert_eq!(checkpointer.get("shard-0").await.unwrap(), None);
            }
        }
    }
}
