//! Bounded retries of a store's round trips: transient errors are tried again a few times with
//! backoff, then surface with their context. This is the one retry of a store round trip; it
//! runs in the crate's retry loop ([`retry`]), waiting as the project's backoff policy
//! ([`Backoff`]) says.

use std::future::Future;
use std::time::Duration;

use kinesis_tower_layers::StoreError;

use crate::backoff::Backoff;
use crate::retrying::retry;

/// How many times a round trip is tried in all before its error is returned.
pub(crate) const ATTEMPTS: u32 = 4;
const BASE_DELAY: Duration = Duration::from_millis(25);
const MAX_DELAY: Duration = Duration::from_secs(1);

/// Runs `op` until it succeeds, fails with an error that is not retryable, or has been tried
/// [`ATTEMPTS`] times. Between tries it waits as [`Backoff`] says, exponential with equal
/// jitter: between half of and the whole of a ceiling that starts at `BASE_DELAY` and doubles
/// per try (25, 50, then 100 ms), capped at `MAX_DELAY`.
pub(crate) async fn with_retries<T, F, Fut>(
    backend: &'static str,
    operation: &'static str,
    op: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    retry(
        &mut Backoff::new(BASE_DELAY, MAX_DELAY),
        ATTEMPTS - 1,
        StoreError::is_retryable,
        |error, delay, retry| {
            tracing::warn!(backend, operation, attempt = retry, ?delay, %error, "checkpoint store call failed; retrying");
        },
        op,
    )
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn failure(retryable: bool) -> StoreError {
        StoreError::Backend {
            backend: "test",
            operation: "set",
            namespace: None,
            shard_id: None,
            retryable,
            source: "boom".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_errors_then_gives_up_with_the_last_error() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = with_retries("test", "set", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(failure(true)) }
        })
        .await;
        assert!(result.unwrap_err().is_retryable());
        assert_eq!(calls.load(Ordering::SeqCst), ATTEMPTS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_error_that_clears_is_bridged() {
        let calls = AtomicU32::new(0);
        let result = with_retries("test", "get", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(failure(true))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(result.unwrap(), 2);
    }

    /// The waits are equal jitter: between half of and the whole of a ceiling that doubles
    /// from the base.
    #[tokio::test(start_paused = true)]
    async fn waits_are_drawn_between_half_and_all_of_a_doubling_ceiling() {
        fastrand::seed(3);
        let mut lowest = Duration::MAX;
        for _ in 0..100 {
            let calls = std::sync::Mutex::new(Vec::new());
            let _ = with_retries("test", "set", || {
                calls.lock().unwrap().push(tokio::time::Instant::now());
                async { Err::<(), _>(failure(true)) }
            })
            .await;
            let calls = calls.into_inner().unwrap();
            assert_eq!(calls.len() as u32, ATTEMPTS);
            for (retry, gap) in calls.windows(2).map(|w| w[1] - w[0]).enumerate() {
                let ceiling = BASE_DELAY * (1 << retry);
                // The timer has millisecond ticks: a wait may end up to 1 ms late.
                assert!(
                    ceiling / 2 <= gap && gap <= ceiling + Duration::from_millis(1),
                    "{gap:?}"
                );
                if retry == 0 {
                    lowest = lowest.min(gap);
                }
            }
        }
        assert!(lowest < BASE_DELAY * 3 / 5, "{lowest:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = with_retries("test", "get", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(failure(false)) }
        })
        .await;
        assert!(!result.unwrap_err().is_retryable());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
