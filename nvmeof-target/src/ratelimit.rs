//! Rate limits for warnings a host (or a failing disk) can cause once per command.

use std::time::{Duration, Instant};

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

    /// Logs how many occurrences of `what` were counted but not logged, if any.
    pub(crate) fn flush(&mut self, span: &tracing::Span, what: &str) {
        let n = std::mem::take(&mut self.suppressed);
        if n > 0 {
            tracing::warn!(parent: span, suppressed = n, "{what}: {n} more not logged");
        }
    }
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
}
