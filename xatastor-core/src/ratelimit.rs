//! Rate-limited logging: a warning that a host, a full disk or a retrying client can trigger
//! thousands of times a second is logged at most once per interval, with the number of occurrences
//! that were not logged in between.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use xatastor_core::ratelimit::RateLimit;
//!
//! let limit = RateLimit::new(Duration::from_secs(10));
//! let t0 = Instant::now();
//! assert_eq!(limit.check(t0), Some(0)); // logged
//! assert_eq!(limit.check(t0), None); // counted, not logged
//! assert_eq!(limit.check(t0 + Duration::from_secs(11)), Some(1)); // logged: "1 more like it"
//! ```

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)
)]

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Lets one event through per interval and counts the others.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// At most one event per `interval`.
    #[must_use]
    pub fn new(interval: Duration) -> Self {
        Self { interval, state: Mutex::new(State::default()) }
    }

    /// An event happened at `now`: `Some(n)` if it is to be logged, `n` being the number of events
    /// suppressed since the last one logged; `None` if it is to be suppressed (and counted).
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock();
        match s.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                s.suppressed = s.suppressed.saturating_add(1);
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.suppressed))
            }
        }
    }

    /// [`RateLimit::check`] at the current time (for drivers, which own the clock).
    #[allow(clippy::disallowed_methods)] // a driver-side helper: reads the clock for its callers
    pub fn check_now(&self) -> Option<u64> {
        self.check(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods)] // a starting point; the test's clock is the offsets from it
    fn one_per_interval_with_the_count_of_the_others() {
        let l = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.check(t0), Some(0));
        for i in 1..1000 {
            assert_eq!(l.check(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(l.check(t0 + Duration::from_secs(10)), Some(999));
        assert_eq!(l.check(t0 + Duration::from_secs(11)), None);
        assert_eq!(l.check(t0 + Duration::from_secs(30)), Some(1));
    }
}
