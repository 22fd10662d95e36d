//! Bounded retries of a store's round trips (stand-in until the store foundation lands).

use std::future::Future;
use std::time::Duration;

use kinesis_tower_layers::StoreError;

/// Runs `f` until it succeeds, fails with an error that is not retryable, or has failed 4
/// times; waits with exponential backoff and full jitter (25 ms base, 1 s cap) in between.
pub(crate) async fn with_retries<T, F, Fut>(
    _backend: &'static str,
    _operation: &'static str,
    mut f: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 0u32;
    loop {
        match f().await {
            Err(e) if e.is_retryable() && attempt < 3 => {
                let cap = Duration::from_millis(25 << attempt).min(Duration::from_secs(1));
                tokio::time::sleep(cap.mul_f64(fastrand::f64())).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}
