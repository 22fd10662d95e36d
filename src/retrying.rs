//! The retry loop of the crate's own round trips (checkpoint stores, ListShards,
//! GetShardIterator): backon's `Retry`, waiting as a [`Backoff`] says. Handlers are retried by
//! `RetryLayer` (tower's `Retry`), on the same [`Backoff`].

use std::future::Future;
use std::time::Duration;

use backon::Retryable;

use crate::backoff::Backoff;

/// Runs `op` until it succeeds, fails with an error `retryable` turns down, or was retried
/// `max_retries` times; returns the last error then. Before each retry, `notify` is told the
/// error, the wait (`backoff.next_delay()`) and which retry it is (1 for the first). A success
/// resets `backoff`.
pub(crate) async fn retry<T, E, Fut>(
    backoff: &mut Backoff,
    max_retries: u32,
    retryable: impl FnMut(&E) -> bool,
    mut notify: impl FnMut(&E, Duration, u32),
    op: impl FnMut() -> Fut,
) -> Result<T, E>
where
    Fut: Future<Output = Result<T, E>>,
{
    let max_retries = usize::try_from(max_retries).unwrap_or(usize::MAX);
    let mut retries = 0;
    let delays = std::iter::repeat_with(|| backoff.next_delay()).take(max_retries);
    let result = op
        .retry(delays)
        .sleep(tokio::time::sleep)
        .when(retryable)
        .notify(|error, delay| {
            retries += 1;
            notify(error, delay, retries);
        })
        .await;
    if result.is_ok() {
        backoff.reset();
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::time::Instant;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Fails with `Err(n)` (n from 1) while `n <= failures`, noting when each call started.
    struct Op {
        failures: u32,
        calls: Mutex<Vec<Instant>>,
    }

    impl Op {
        fn new(failures: u32) -> Self {
            Self {
                failures,
                calls: Mutex::default(),
            }
        }

        fn call(&self) -> impl Future<Output = Result<u32, u32>> {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Instant::now());
            let n = calls.len() as u32;
            let failures = self.failures;
            async move {
                if n <= failures {
                    Err(n)
                } else {
                    Ok(n)
                }
            }
        }

        fn gaps(&self) -> Vec<Duration> {
            let calls = self.calls.lock().unwrap();
            calls.windows(2).map(|w| w[1] - w[0]).collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_waiting_as_the_backoff_says_then_resets_it() {
        let op = Op::new(3);
        let mut backoff = Backoff::new(100 * MS, 1_000 * MS);
        let mut told = Vec::new();
        let result = retry(
            &mut backoff,
            5,
            |_| true,
            |e: &u32, delay, retry| told.push((*e, delay, retry)),
            || op.call(),
        )
        .await;
        assert_eq!(result, Ok(4));
        assert_eq!(backoff.attempts(), 0);
        let gaps = op.gaps();
        assert_eq!(gaps.len(), 3);
        for (i, (gap, (error, delay, retry))) in gaps.iter().zip(&told).enumerate() {
            let n = i as u32 + 1;
            assert_eq!((*error, *retry), (n, n));
            let ceiling = backoff.ceiling(n);
            assert!(ceiling / 2 <= *delay && *delay <= ceiling, "{delay:?}");
            // The timer has millisecond ticks: a wait may end up to 1 ms late.
            assert!(
                *delay <= *gap && *gap <= *delay + MS,
                "{gap:?} vs {delay:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_retries_with_the_last_error() {
        let op = Op::new(u32::MAX);
        let mut backoff = Backoff::new(MS, MS);
        let result = retry(&mut backoff, 3, |_| true, |_, _, _| {}, || op.call()).await;
        assert_eq!(result, Err(4));
        assert_eq!(backoff.attempts(), 3);
        let op = Op::new(u32::MAX);
        let result = retry(&mut backoff, 0, |_| true, |_, _, _| {}, || op.call()).await;
        assert_eq!(result, Err(1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_that_is_not_retryable_ends_at_once() {
        let op = Op::new(u32::MAX);
        let mut backoff = Backoff::new(MS, MS);
        let result = retry(&mut backoff, 9, |e| *e < 2, |_, _, _| {}, || op.call()).await;
        assert_eq!(result, Err(2));
        assert_eq!(op.gaps().len(), 1);
    }
}
