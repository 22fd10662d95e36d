//! The backoff policy of the consumer's reads and listings and of the checkpoint stores'
//! round trips: [`kinesis_tower_layers::backoff::Backoff`], exponential with full jitter (each
//! delay is drawn between zero and a ceiling that doubles from the base up to the max), the
//! same policy as `RetryLayer`'s.

pub(crate) use kinesis_tower_layers::backoff::Backoff;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Full jitter: each delay is drawn between zero and a ceiling that doubles from the base
    /// up to the cap; `reset` starts over from the base.
    #[test]
    fn delays_are_drawn_between_zero_and_a_doubling_ceiling() {
        let (base, max) = (Duration::from_millis(200), Duration::from_secs(5));
        let mut lowest = Duration::MAX;
        for _ in 0..200 {
            let mut b = Backoff::new(base, max);
            let first = b.next_delay();
            assert!(first <= base, "{first:?}");
            lowest = lowest.min(first);
            for attempt in 2..=30u32 {
                let ceiling = base.saturating_mul(1 << (attempt - 1).min(20)).min(max);
                let d = b.next_delay();
                assert!(d <= ceiling, "attempt {attempt}: {d:?} over {ceiling:?}");
            }
            assert_eq!(b.attempts(), 30);
            b.reset();
            assert_eq!(b.attempts(), 0);
            assert!(b.next_delay() <= base);
        }
        // Not "equal jitter", which never goes below half the ceiling.
        assert!(lowest < base / 4, "{lowest:?}");
    }
}
