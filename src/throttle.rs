//! Rate limits for log lines that a stuck condition (a full fd table, say) would otherwise
//! repeat many times a second.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lets one event through per period and counts the others, across threads without a lock.
#[derive(Default)]
pub struct Throttle {
    /// When the next event may be reported, in ms on the caller's clock; 0 at first.
    next_ms: AtomicU64,
    /// Events not reported since the last one that was.
    suppressed: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle {
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Some(events suppressed since the last report) if this event is to be reported now.
    pub fn check(&self, now_ms: u64, period_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + period_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_reports_once_per_period_with_a_count() {
        let t = Throttle::new();
        assert_eq!(t.check(5, 1000), Some(0));
        assert_eq!(t.check(6, 1000), None);
        assert_eq!(t.check(900, 1000), None);
        assert_eq!(t.check(1004, 1000), None);
        assert_eq!(t.check(1005, 1000), Some(3));
        assert_eq!(t.check(1006, 1000), None);
    }
}
