//! Bounded retries of transient store errors.

use std::future::Future;
use std::time::Duration;

use kinesis_tower_layers::StoreError;

const ATTEMPTS: u32 = 4;
const BASE: Duration = Duration::from_millis(25);
const CAP: Duration = Duration::from_secs(1);

/// Runs `f` until it succeeds, fails with an error that is not retryable, or has failed
/// [`ATTEMPTS`] times; waits between attempts with exponential backoff and full jitter.
#[allow(dead_code)]
pub(crate) async fn with_retries<T, F, Fut>(
    _backend: &'static str,
    _operation: &'static str,
    mut f: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() && attempt + 1 < ATTEMPTS => {
                let ceiling = BASE.saturating_mul(1 << attempt).min(CAP);
                tokio::time::sleep(ceiling.mul_f64(fastrand::f64())).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
