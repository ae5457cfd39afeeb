//! Exponential backoff with full jitter.
//!
//! Retry `n` (1 for the first retry) waits a uniformly random time in
//! `[0, min(max, base × 2^(n-1))]`. Full jitter spreads the retries of
//! many callers that failed together, so they do not hit a recovering
//! upstream in synchronized waves (see "Exponential Backoff And Jitter",
//! AWS Architecture Blog, 2015).

use std::time::Duration;

/// The ceiling of retry `n`'s wait.
pub fn ceiling(base: Duration, max: Duration, retry: u32) -> Duration {
    let factor = 2u32.saturating_pow(retry.saturating_sub(1).min(31));
    base.saturating_mul(factor).min(max)
}

/// A random wait for retry `n`.
pub fn wait(base: Duration, max: Duration, retry: u32) -> Duration {
    let ceiling = ceiling(base, max, retry);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Property: for any base, max and retry number, the wait is within
    /// `[0, min(max, base × 2^(n-1))]`, and ceilings never shrink as
    /// retries go on.
    #[test]
    fn waits_stay_within_their_bounds() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let base = Duration::from_micros(rng.u64(1..5_000_000));
            let max = Duration::from_micros(rng.u64(1..120_000_000));
            let retry = rng.u32(1..64);
            let w = wait(base, max, retry);
            let c = ceiling(base, max, retry);
            assert!(w <= c, "wait {w:?} over ceiling {c:?}");
            assert!(c <= max);
            assert!(c <= base.saturating_mul(2u32.saturating_pow(retry - 1)));
            assert!(ceiling(base, max, retry + 1) >= c);
        }
        assert_eq!(
            ceiling(Duration::from_millis(100), Duration::from_secs(10), 1),
            Duration::from_millis(100)
        );
        assert_eq!(
            ceiling(Duration::from_millis(100), Duration::from_secs(10), 4),
            Duration::from_millis(800)
        );
        assert_eq!(
            ceiling(Duration::from_millis(100), Duration::from_secs(10), 20),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn jitter_spreads_waits() {
        let waits: Vec<Duration> = (0..200)
            .map(|_| wait(Duration::from_millis(100), Duration::from_secs(1), 1))
            .collect();
        let below_half = waits
            .iter()
            .filter(|w| **w < Duration::from_millis(50))
            .count();
        assert!(
            (40..160).contains(&below_half),
            "{below_half} of 200 below half the ceiling"
        );
    }
}
