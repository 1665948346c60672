//! Rate limits for warnings a host (or a failing disk) can cause once per command.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// One line per second at most.
const INTERVAL: Duration = Duration::from_secs(1);

/// Lets the first occurrence of a warning through, then at most one per [`INTERVAL`], counting
/// the ones it holds back so that the next line (or [`LogLimiter::flush`]) can say how many.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// An occurrence at `now`: `Some(n)` to log it now, mentioning `n` occurrences not logged since
    /// the last line; `None` to count it silently.
    pub(crate) fn hit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < INTERVAL => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// Like [`LogLimiter::hit`], for a warning also limited target-wide by `shared`: `Some(n)` only
    /// when both let it through. An occurrence the target-wide limit holds back stays counted here
    /// (reported by this limiter's next line or its flush).
    pub(crate) fn hit_shared(&mut self, shared: &SharedLimiter, now: Instant) -> Option<u64> {
        let n = self.hit(now)?;
        if shared.hit(now).is_some() {
            Some(n)
        } else {
            self.suppressed = self.suppressed.saturating_add(n).saturating_add(1);
            None
        }
    }

    /// Logs how many occurrences of `what` were counted but not logged, if any.
    pub(crate) fn flush(&mut self, span: &tracing::Span, what: &str) {
        let n = std::mem::take(&mut self.suppressed);
        if n > 0 {
            tracing::warn!(parent: span, suppressed = n, "{what}: {n} more not logged");
        }
    }
}

/// One [`LogLimiter`] shared by every connection of a target: whatever the number of connections a
/// failing disk or a misbehaving host touches, one line per interval of a kind of warning.
#[derive(Debug, Default)]
pub(crate) struct SharedLimiter(Mutex<LogLimiter>);

impl SharedLimiter {
    /// An occurrence at `now`: `Some(n)` to log it, mentioning `n` held back since the last line.
    pub(crate) fn hit(&self, now: Instant) -> Option<u64> {
        self.0.lock().hit(now)
    }
}

/// The target-wide limits of the warnings a command can cause, one per kind.
#[derive(Debug, Default)]
pub(crate) struct WarningLimits {
    /// A backend request failed (a full or failing disk fails every command).
    pub(crate) backend_failed: SharedLimiter,
    /// A data digest did not match.
    pub(crate) data_digest: SharedLimiter,
    /// A host wrote an invalid CC (Property Set).
    pub(crate) invalid_cc: SharedLimiter,
    /// A flush of a controller shutdown failed.
    pub(crate) shutdown_flush: SharedLimiter,
    /// A driver completed a request the engine does not know.
    pub(crate) unknown_completion: SharedLimiter,
    /// A backend returned a read of the wrong length.
    pub(crate) read_length: SharedLimiter,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_then_once_per_second_with_counts() {
        #[allow(clippy::disallowed_methods)] // a starting point; time advances by hand
        let t0 = Instant::now();
        let mut l = LogLimiter::default();
        assert_eq!(l.hit(t0), Some(0), "the first one is logged");
        for i in 1..1000 {
            assert_eq!(l.hit(t0 + Duration::from_micros(i)), None);
        }
        assert_eq!(l.hit(t0 + Duration::from_millis(1000)), Some(999), "then a line with the count");
        assert_eq!(l.hit(t0 + Duration::from_millis(1001)), None);
        assert_eq!(l.suppressed, 1);
        l.flush(&tracing::Span::none(), "x");
        assert_eq!(l.suppressed, 0);
        assert_eq!(l.hit(t0 + Duration::from_millis(5000)), Some(0));
    }

    #[test]
    fn a_shared_limit_holds_back_what_each_connection_would_log() {
        #[allow(clippy::disallowed_methods)] // a starting point; time advances by hand
        let t0 = Instant::now();
        let shared = SharedLimiter::default();
        let (mut a, mut b) = (LogLimiter::default(), LogLimiter::default());
        assert_eq!(a.hit_shared(&shared, t0), Some(0), "the first one, target-wide");
        assert_eq!(b.hit_shared(&shared, t0), None, "another connection, same second");
        assert_eq!(b.hit_shared(&shared, t0), None);
        assert_eq!(b.suppressed, 2, "counted where it happened");
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!(b.hit_shared(&shared, t1), Some(2));
        assert_eq!(a.hit_shared(&shared, t1), None);
        assert_eq!(a.suppressed, 1);
    }
}
