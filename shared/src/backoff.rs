//! Exponential backoff with full jitter.

use rand::Rng;
use std::time::Duration;

/// Delay before attempt `attempt + 1` after a retryable failure of attempt `attempt` (1-based):
/// uniformly random in `[0, min(max, base * 2^(attempt-1))]`, so that a fleet of workers that
/// failed together does not retry together.
pub fn full_jitter(attempt: i32, base: Duration, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).clamp(0, 30) as u32;
    let ceiling = base.saturating_mul(1u32 << exp).min(max);
    if ceiling.is_zero() {
        return Duration::ZERO;
    }
    rand::thread_rng().gen_range(Duration::ZERO..=ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_under_the_exponential_ceiling_and_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 1..40 {
            let d = full_jitter(attempt, base, max);
            let ceiling = base.saturating_mul(1 << (attempt - 1).min(30)).min(max);
            assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
        }
    }

    #[test]
    fn zero_base_means_no_delay() {
        assert_eq!(
            full_jitter(3, Duration::ZERO, Duration::from_secs(1)),
            Duration::ZERO
        );
    }
}
