//! Rate limiting of the log messages a guest can provoke at will.
//!
//! A guest that hammers a register with a bad access must not be able to flood the host log: each
//! device keeps a [`LogThrottle`] and logs through [`warn_throttled!`](crate::warn_throttled) (or
//! [`log_throttled!`](crate::log_throttled) for another level), which lets one message through per
//! [`INTERVAL`] and reports how many were dropped in between. The PCI and VFIO crates use the same
//! throttle for what a guest provokes through config space.

use std::time::{Duration, Instant};

/// Minimum time between two messages let through by one throttle.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Admits at most one message per [`INTERVAL`].
#[derive(Debug, Default)]
pub struct LogThrottle {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// Asks to log a message now. Returns how many messages were suppressed since the last one
    /// admitted, or `None` if this one must be dropped.
    pub fn admit(&mut self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&mut self, now: Instant) -> Option<u64> {
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
}

/// `log::log!` through a [`LogThrottle`]:
/// `log_throttled!(self.throttle, log::Level::Error, "format", args..)`. The calling crate must
/// depend on `log`.
#[macro_export]
macro_rules! log_throttled {
    ($throttle:expr, $level:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $throttle.admit() {
            if suppressed == 0 {
                log::log!($level, $($arg)+);
            } else {
                log::log!(
                    $level,
                    "{} ({} similar messages suppressed)",
                    format_args!($($arg)+),
                    suppressed
                );
            }
        }
    };
}

/// `log::warn!` through a [`LogThrottle`]: `warn_throttled!(self.throttle, "format", args..)`.
#[macro_export]
macro_rules! warn_throttled {
    ($throttle:expr, $($arg:tt)+) => {
        $crate::log_throttled!($throttle, log::Level::Warn, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_message_is_admitted() {
        let mut throttle = LogThrottle::default();

        assert_eq!(throttle.admit_at(Instant::now()), Some(0));
    }

    #[test]
    fn message_within_interval_is_suppressed() {
        let mut throttle = LogThrottle::default();
        let start = Instant::now();
        throttle.admit_at(start);

        assert_eq!(throttle.admit_at(start + INTERVAL / 2), None);
    }

    #[test]
    fn message_after_interval_reports_suppressed_count() {
        let mut throttle = LogThrottle::default();
        let start = Instant::now();
        throttle.admit_at(start);
        throttle.admit_at(start + INTERVAL / 4);
        throttle.admit_at(start + INTERVAL / 2);

        assert_eq!(throttle.admit_at(start + INTERVAL), Some(2));
    }
}
