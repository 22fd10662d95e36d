//! [`Backoff`]: exponential backoff with full jitter, the one backoff policy of the consumer's
//! reads and listings, of the checkpoint stores' round trips, and of [`RetryLayer`].
//!
//! [`RetryLayer`]: crate::retry::RetryLayer

use std::time::Duration;

/// Exponential backoff with full jitter.
///
/// The wait before retry `n` (1 for the first retry) is drawn uniformly between zero and
/// [`ceiling(n)`](Backoff::ceiling) `= min(max, base * 2^(n-1))`. Drawing from zero ("full
/// jitter") spreads out the retries of shards or workers that failed together, so they do not
/// come back together either.
///
/// All arithmetic saturates: any `base` and `max` work, `Duration::MAX` included, and the
/// ceiling stops growing at `max` (or at `Duration::MAX`) however many retries were made.
///
/// A `Backoff` counts the delays it handed out: [`next_delay`](Backoff::next_delay) draws the
/// wait before the next retry, [`attempts`](Backoff::attempts) says how many were drawn, and
/// [`reset`](Backoff::reset) starts over from `base` (after a success).
///
/// ```
/// use std::time::Duration;
/// use kinesis_tower_layers::backoff::Backoff;
///
/// let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
/// assert_eq!(backoff.ceiling(1), Duration::from_millis(100));
/// assert_eq!(backoff.ceiling(4), Duration::from_millis(800));
/// assert_eq!(backoff.ceiling(5), Duration::from_secs(1));
///
/// assert!(backoff.next_delay() <= Duration::from_millis(100));
/// assert!(backoff.next_delay() <= Duration::from_millis(200));
/// assert_eq!(backoff.attempts(), 2);
/// backoff.reset();
/// assert_eq!(backoff.attempts(), 0);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempts: u32,
}

impl Backoff {
    /// Waits from up to `base` (first retry), doubling per retry, up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempts: 0,
        }
    }

    /// The upper bound of the first retry's wait.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The upper bound of any wait.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The upper bound of the wait before retry `retry` (1 for the first retry; 0 is taken as
    /// 1): `base` doubled `retry - 1` times, at most `max`. Saturates instead of overflowing.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1);
        let base = self.base.as_nanos();
        let nanos = if base == 0 {
            0
        } else if doublings <= base.leading_zeros() {
            base << doublings
        } else {
            u128::MAX
        };
        saturating_from_nanos(nanos).min(self.max)
    }

    /// A wait before retry `retry`, drawn uniformly between zero and
    /// [`ceiling(retry)`](Self::ceiling). Does not count as an attempt.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self.ceiling(retry).as_nanos();
        saturating_from_nanos(fastrand::u128(0..=ceiling))
    }

    /// The wait before the next retry (see [`delay`](Self::delay)), counted as an attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.attempts = self.attempts.saturating_add(1);
        self.delay(self.attempts)
    }

    /// How many delays [`next_delay`](Self::next_delay) handed out since the start or the
    /// last [`reset`](Self::reset).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Starts over from `base` (call it after a success).
    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

/// `nanos` as a `Duration`, or `Duration::MAX` when it does not fit.
fn saturating_from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    match u64::try_from(nanos / NANOS_PER_SEC) {
        // The remainder is below 10^9: it fits in a u32.
        Ok(secs) => Duration::new(secs, (nanos % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_ceiling_doubles_from_base_up_to_max() {
        let b = Backoff::new(100 * MS, 1_600 * MS);
        let ceilings: Vec<u128> = (0..=7).map(|r| b.ceiling(r).as_millis()).collect();
        assert_eq!(ceilings, vec![100, 100, 200, 400, 800, 1_600, 1_600, 1_600]);
        assert_eq!(b.ceiling(u32::MAX), 1_600 * MS);
        // Not a power-of-two multiple of the base: capped exactly at max.
        assert_eq!(Backoff::new(300 * MS, 1_000 * MS).ceiling(3), 1_000 * MS);
        assert_eq!(
            Backoff::new(Duration::ZERO, MS).ceiling(u32::MAX),
            Duration::ZERO
        );
    }

    #[test]
    fn the_ceiling_saturates_for_any_base_max_and_retry() {
        let unbounded = Backoff::new(Duration::from_secs(1), Duration::MAX);
        assert_eq!(unbounded.ceiling(64), Duration::from_secs(1 << 63));
        for retry in [65, 100, 129, u32::MAX] {
            assert_eq!(unbounded.ceiling(retry), Duration::MAX);
        }
        let huge = Backoff::new(Duration::MAX, Duration::MAX);
        for retry in [1, 2, u32::MAX] {
            assert_eq!(huge.ceiling(retry), Duration::MAX);
        }
        let capped = Backoff::new(Duration::MAX, Duration::from_secs(2));
        assert_eq!(capped.ceiling(1), Duration::from_secs(2));
        assert_eq!(capped.ceiling(u32::MAX), Duration::from_secs(2));
        let nanos = Backoff::new(Duration::from_nanos(1), Duration::MAX);
        assert_eq!(nanos.ceiling(31), Duration::from_nanos(1 << 30));
        assert_eq!(nanos.ceiling(128), saturating_from_nanos(1 << 127));
        assert_eq!(nanos.ceiling(129), Duration::MAX);
    }

    #[test]
    fn delays_are_full_jitter_between_zero_and_the_ceiling() {
        fastrand::seed(11);
        let mut b = Backoff::new(100 * MS, 1_600 * MS);
        let runs = 2_000;
        let mut sums = [0f64; 6];
        let mut lowest = [Duration::MAX; 6];
        for _ in 0..runs {
            b.reset();
            for (i, retry) in (1..=6).enumerate() {
                let d = b.next_delay();
                assert_eq!(b.attempts(), retry);
                assert!(d <= b.ceiling(retry), "retry {retry}: {d:?}");
                sums[i] += d.as_secs_f64();
                lowest[i] = lowest[i].min(d);
            }
        }
        for (i, retry) in (1..=6).enumerate() {
            let ceiling = b.ceiling(retry).as_secs_f64();
            let mean = sums[i] / f64::from(runs);
            // Uniform on [0, ceiling]: the mean is near half of it, and draws come near zero.
            assert!(
                (mean - ceiling / 2.0).abs() < ceiling * 0.05,
                "{mean} vs {ceiling}"
            );
            assert!(lowest[i].as_secs_f64() < ceiling * 0.01, "{:?}", lowest[i]);
        }
    }

    #[test]
    fn huge_settings_draw_without_overflow() {
        let mut b = Backoff::new(Duration::MAX, Duration::MAX);
        for _ in 0..100 {
            let _ = b.next_delay();
        }
        assert_eq!(b.attempts(), 100);
        let mut b = Backoff::new(Duration::from_secs(1), Duration::MAX);
        b.attempts = u32::MAX - 1;
        let _ = b.next_delay();
        let _ = b.next_delay();
        assert_eq!(b.attempts(), u32::MAX);
        assert!(Backoff::new(Duration::ZERO, Duration::ZERO)
            .delay(1)
            .is_zero());
    }
}
