//! Waiting with exponential backoff for a bounded time: the one retry loop of this crate (a destroy
//! that finds the zvol busy, a device link that udev has not made yet, a device size that the
//! kernel has not updated yet).

use std::time::{Duration, Instant};

/// Sleeps `first`, `2 × first`, … up to `max` per step, until `limit` has passed since
/// [`Backoff::new`].
///
/// ```text
/// let mut b = Backoff::new(limit, first, max);
/// loop {
///     if done() { break Ok(..) }
///     if !b.wait() { break Err(timed out after b.elapsed()) }
/// }
/// ```
#[derive(Debug)]
pub(crate) struct Backoff {
    start: Instant,
    limit: Duration,
    delay: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts the clock.
    #[allow(clippy::disallowed_methods)] // a driver-side wait, not engine logic (STYLE.md rule 2)
    pub(crate) fn new(limit: Duration, first: Duration, max: Duration) -> Self {
        Self { start: Instant::now(), limit, delay: first, max }
    }

    /// Time since the start.
    pub(crate) fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Whether the time is up.
    pub(crate) fn expired(&self) -> bool {
        self.elapsed() >= self.limit
    }

    /// Sleeps the next delay (never past the limit) and returns true, or returns false at once if
    /// the time is up.
    pub(crate) fn wait(&mut self) -> bool {
        let left = self.limit.saturating_sub(self.elapsed());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(self.delay.min(left));
        self.delay = (self.delay * 2).min(self.max);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_with_growing_delays_until_the_limit() {
        let mut b =
            Backoff::new(Duration::from_millis(40), Duration::from_millis(1), Duration::from_millis(8));
        let mut waits = 0;
        while b.wait() {
            waits += 1;
            assert!(waits < 1000, "the limit ends the loop");
        }
        assert!(b.expired());
        assert!(b.elapsed() >= Duration::from_millis(40));
        // 1 + 2 + 4 + 8 + 8 + … ms: at least 5 steps to reach 40 ms, and never a busy loop.
        assert!(waits >= 5, "{waits}");
        let mut none = Backoff::new(Duration::ZERO, Duration::from_millis(1), Duration::from_millis(1));
        assert!(!none.wait(), "no time: no wait");
    }
}
