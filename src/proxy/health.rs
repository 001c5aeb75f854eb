//! Passive health of one instance as this host sees it: a failed connect puts the instance in a
//! retry queue with exponential backoff; one successful connect makes it live again. Kept in
//! atomics because every connection reads it and no lock belongs on that path.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::metrics::InstanceMetrics;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// First retry delay after a failure; doubled per further failure.
pub const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest wait between retries of a failed instance.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct Health {
    /// Consecutive failed connects; 0 means live.
    failures: AtomicU32,
    /// When the next retry is allowed, in ms on the process clock (`now_ms`); 0 when live.
    retry_at_ms: AtomicU64,
    /// Unix ms of the last successful connect; 0 if none yet.
    last_success_unix_ms: AtomicU64,
}

impl Health {
    /// Live, or failed with its retry due: either way it may be tried now.
    pub fn available(&self, now_ms: u64) -> bool {
        self.retry_at_ms.load(Ordering::Relaxed) <= now_ms
    }

    pub fn is_live(&self) -> bool {
        self.failures.load(Ordering::Relaxed) == 0
    }

    pub fn retry_at_ms(&self) -> u64 {
        self.retry_at_ms.load(Ordering::Relaxed)
    }

    pub fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.retry_at_ms.store(0, Ordering::Relaxed);
        self.last_success_unix_ms
            .store(unix_ms(), Ordering::Relaxed);
    }

    pub fn failed(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let delay = backoff(n, rand::random::<f64>());
        self.retry_at_ms
            .store(now_ms() + delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// What `fluxctl query` and `fluxd debug` show; the counts come from the instance's metrics.
    pub fn view(&self, metrics: &InstanceMetrics) -> HealthView {
        let retry_at = self.retry_at_ms.load(Ordering::Relaxed);
        let now = now_ms();
        HealthView {
            live: self.is_live(),
            failures: self.failures.load(Ordering::Relaxed),
            retry_in_ms: (!self.is_live()).then(|| retry_at.saturating_sub(now)),
            last_success_unix_ms: match self.last_success_unix_ms.load(Ordering::Relaxed) {
                0 => None,
                t => Some(t),
            },
            active: metrics.active.get().max(0) as u32,
            connections: metrics.connections.get(),
            connect_failures: metrics.connect_failures.get(),
        }
    }
}

/// Backoff after `failures` consecutive failures: 1 s, 2 s, 4 s ... capped at 30 s, with ±20%
/// jitter (`jitter01` uniform in [0,1)) so that hosts do not retry a recovering instance in step.
pub fn backoff(failures: u32, jitter01: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = BACKOFF_START.saturating_mul(1 << exp).min(BACKOFF_CAP);
    base.mul_f64(0.8 + 0.4 * jitter01)
}

/// What `fluxctl query` and `fluxd debug` show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct HealthView {
    pub live: bool,
    pub failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_unix_ms: Option<u64>,
    pub active: u32,
    pub connections: u64,
    pub connect_failures: u64,
}

/// Milliseconds on a monotonic clock that starts at 1 (so 0 can mean "no retry pending").
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1, 0.5), Duration::from_secs(1));
        assert_eq!(backoff(2, 0.5), Duration::from_secs(2));
        assert_eq!(backoff(6, 0.5), Duration::from_secs(30));
        assert_eq!(backoff(1000, 0.5), Duration::from_secs(30));
        assert!(backoff(1, 0.0) >= Duration::from_millis(800));
        assert!(backoff(1, 0.999) < Duration::from_millis(1200));
    }

    #[test]
    fn failure_then_success() {
        let h = Health::default();
        assert!(h.available(now_ms()));
        h.failed();
        assert!(!h.is_live());
        assert!(!h.available(now_ms()));
        assert!(h.available(now_ms() + 1300));
        h.succeeded();
        assert!(h.is_live() && h.available(now_ms()));
    }
}
