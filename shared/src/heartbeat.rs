//! When a background loop last went round, for a liveness endpoint to judge it by.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The time of a loop's last beat, shared between the loop and the endpoints without a lock.
#[derive(Debug)]
pub struct Heartbeat {
    /// Milliseconds since the Unix epoch.
    last_ms: AtomicU64,
}

impl Default for Heartbeat {
    /// A heartbeat that beat just now.
    fn default() -> Self {
        Heartbeat {
            last_ms: AtomicU64::new(now_ms()),
        }
    }
}

impl Heartbeat {
    /// The loop is alive now.
    pub fn beat(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// How long since the last beat.
    pub fn silent_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Moves the last beat `by` into the past, as if the loop had been silent that long (for
    /// tests of a liveness window).
    pub fn backdate(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_sub(
            by.min(self.last_ms.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
    }
}

/// Wall-clock time rather than `Instant`, so that a beat fits in one atomic.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_grows_until_the_next_beat() {
        let beat = Heartbeat::default();
        assert!(beat.silent_for() < Duration::from_secs(5));
        beat.backdate(Duration::from_secs(120));
        assert!(beat.silent_for() >= Duration::from_secs(120));
        beat.beat();
        assert!(beat.silent_for() < Duration::from_secs(5));
    }
}
