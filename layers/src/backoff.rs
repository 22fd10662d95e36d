//! [`Backoff`]: exponential backoff with equal jitter, the one backoff policy of the consumer's
//! reads and listings, of the checkpoint stores' round trips, and of [`RetryLayer`].
//!
//! The delays come from the [`backon`] crate's exponential backoff: its doubling for the
//! ceilings, its jitter for the draws.
//!
//! [`RetryLayer`]: crate::retry::RetryLayer

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Exponential backoff with equal jitter.
///
/// The wait before retry `n` (1 for the first retry) is drawn between half of and the whole
/// [`ceiling(n)`](Backoff::ceiling) `= min(max, base * 2^(n-1))`. The random half spreads out
/// the retries of shards or workers that failed together, so they do not come back together
/// either; the fixed half keeps a retry from following its failure at once.
///
/// Both come from the [`backon`] crate: the ceilings are its exponential backoff (factor 2,
/// from `base`, capped at `max`), the draws its jitter, which adds up to the delay it was
/// given once more (here half the ceiling). backon computes in `f32` seconds: a ceiling is
/// `base` doubled to within a part in a million, and exactly `max` once it reaches it.
///
/// Any `base` and `max` work, `Duration::MAX` included: the ceiling stops growing at `max` (or
/// at `Duration::MAX`) however many retries were made, and a `base` above `max` starts at
/// `max`.
///
/// A `Backoff` counts the delays it handed out: [`next_delay`](Backoff::next_delay) draws the
/// wait before the next retry, [`attempts`](Backoff::attempts) says how many were drawn, and
/// [`reset`](Backoff::reset) starts over from `base` (after a success).
///
/// ```
/// use std::time::Duration;
/// use kinesis_tower_layers::backoff::Backoff;
///
/// let ms = Duration::from_millis;
/// let mut backoff = Backoff::new(ms(100), Duration::from_secs(1));
/// assert_eq!(backoff.ceiling(1), ms(100));
/// assert_eq!(backoff.ceiling(4).as_millis(), 800);
/// assert_eq!(backoff.ceiling(5), Duration::from_secs(1));
///
/// let first = backoff.next_delay();
/// assert!(ms(50) <= first && first <= ms(100));
/// let second = backoff.next_delay();
/// assert!(ms(100) <= second && second <= backoff.ceiling(2));
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
    /// Waits of up to `base` (first retry), doubling per retry, up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempts: 0,
        }
    }

    /// The upper bound of the first retry's wait (when not above [`max`](Self::max)).
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The upper bound of any wait.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The upper bound of the wait before retry `retry` (1 for the first retry; 0 is taken as
    /// 1): `base` doubled `retry - 1` times, at most `max`, as backon's exponential backoff
    /// gives it. Saturates instead of overflowing.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let retries = usize::try_from(retry.max(1)).unwrap_or(usize::MAX);
        let mut ceilings = ExponentialBuilder::new()
            .with_min_delay(self.base.min(self.max))
            .with_max_delay(self.max)
            .with_factor(2.0)
            .without_max_times()
            .build()
            .take(retries);
        let mut ceiling = ceilings.next().unwrap_or(self.max);
        // Once the ceiling stops growing (at `max`, or at `Duration::MAX`) it stays there: no
        // need to walk on to retry `u32::MAX`.
        for next in ceilings {
            if next == ceiling {
                break;
            }
            ceiling = next;
        }
        ceiling
    }

    /// A wait before retry `retry`, drawn between half of and the whole
    /// [`ceiling(retry)`](Self::ceiling) by backon's jitter. Does not count as an attempt.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self.ceiling(retry);
        let half = ceiling / 2;
        let drawn = ExponentialBuilder::new()
            .with_min_delay(half)
            .with_jitter()
            .with_max_times(1)
            .build()
            .next()
            .unwrap_or(half);
        // backon's jitter is computed in f32 seconds: it may land a rounding above the ceiling.
        drawn.min(ceiling)
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// `actual` is `expected` to within a part in a million (backon computes in f32 seconds).
    fn assert_close(actual: Duration, expected: Duration) {
        let (a, e) = (actual.as_secs_f64(), expected.as_secs_f64());
        assert!((a - e).abs() <= e * 1e-6, "{actual:?} vs {expected:?}");
    }

    #[test]
    fn the_ceiling_doubles_from_base_up_to_max() {
        let b = Backoff::new(100 * MS, 1_600 * MS);
        let expected = [100, 100, 200, 400, 800, 1_600, 1_600, 1_600];
        for (retry, ms) in (0..).zip(expected) {
            assert_close(b.ceiling(retry), ms * MS);
        }
        assert_eq!(b.ceiling(1), 100 * MS);
        assert_eq!(b.ceiling(5), 1_600 * MS);
        assert_eq!(b.ceiling(u32::MAX), 1_600 * MS);
        // Not a power-of-two multiple of the base: capped exactly at max.
        assert_eq!(Backoff::new(300 * MS, 1_000 * MS).ceiling(3), 1_000 * MS);
        // A base above max starts at max.
        assert_eq!(Backoff::new(3_000 * MS, 1_000 * MS).ceiling(1), 1_000 * MS);
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
        assert_close(nanos.ceiling(31), Duration::from_nanos(1 << 30));
        assert_close(nanos.ceiling(64), Duration::from_nanos(1 << 63));
        assert_eq!(nanos.ceiling(u32::MAX), Duration::MAX);
        let ceilings: Vec<Duration> = (1..200).map(|r| nanos.ceiling(r)).collect();
        assert!(ceilings.windows(2).all(|w| w[0] <= w[1]), "{ceilings:?}");
    }

    #[test]
    fn delays_are_equal_jitter_between_half_and_all_of_the_ceiling() {
        fastrand::seed(11);
        let mut b = Backoff::new(100 * MS, 1_600 * MS);
        let runs = 2_000;
        let mut sums = [0f64; 6];
        let mut lowest = [Duration::MAX; 6];
        let mut highest = [Duration::ZERO; 6];
        for _ in 0..runs {
            b.reset();
            for (i, retry) in (1..=6).enumerate() {
                let d = b.next_delay();
                let ceiling = b.ceiling(retry);
                assert_eq!(b.attempts(), retry);
                assert!(ceiling / 2 <= d && d <= ceiling, "retry {retry}: {d:?}");
                sums[i] += d.as_secs_f64();
                lowest[i] = lowest[i].min(d);
                highest[i] = highest[i].max(d);
            }
        }
        for (i, retry) in (1..=6).enumerate() {
            let ceiling = b.ceiling(retry).as_secs_f64();
            let mean = sums[i] / f64::from(runs);
            // Uniform on [ceiling / 2, ceiling]: the mean is near three quarters of it, and
            // draws come near both ends.
            assert!(
                (mean - ceiling * 0.75).abs() < ceiling * 0.05,
                "{mean} vs {ceiling}"
            );
            assert!(lowest[i].as_secs_f64() < ceiling * 0.51, "{:?}", lowest[i]);
            assert!(
                highest[i].as_secs_f64() > ceiling * 0.99,
                "{:?}",
                highest[i]
            );
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_delays() {
        let draw = || {
            fastrand::seed(5);
            let mut b = Backoff::new(100 * MS, 1_600 * MS);
            (0..8).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(draw(), draw());
    }

    #[test]
    fn huge_settings_draw_without_overflow() {
        let mut b = Backoff::new(Duration::MAX, Duration::MAX);
        for _ in 0..100 {
            assert!(b.next_delay() >= Duration::MAX / 2);
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
