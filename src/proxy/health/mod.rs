//! Health of one instance as this host sees it. Passive: a failed connect puts the instance in a
//! retry queue with exponential backoff; one successful connect makes it live again. Active
//! (services with a `health` check): the checker's verdict, and while it is failing the instance
//! is out of the pool whatever connects do. What connections read is kept in atomics, because
//! every connection reads it and no lock belongs on that path.
//!
//! `checker` runs the active checks (one task per checked instance) and `verdict` is the pure
//! state machine that turns their answers into passing / failing.

pub mod checker;
pub mod verdict;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use self::verdict::{CheckState, CheckView, Verdict};
use crate::model::HealthCheck;

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
    /// The active check's verdict; None while the service has no check. Written by the
    /// checker, read by the views: never locked on the connection path.
    active: Mutex<Option<Verdict>>,
    /// True while the active check says failing: the one bit connections read. A passive
    /// success does not clear it; only `rise` passing checks (or the check's removal) do.
    check_failing: AtomicBool,
}

impl Health {
    /// Live, or failed with its retry due: either way it may be tried now.
    pub fn available(&self, now_ms: u64) -> bool {
        self.retry_at_ms.load(Ordering::Relaxed) <= now_ms
    }

    pub fn is_live(&self) -> bool {
        self.failures.load(Ordering::Relaxed) == 0
    }

    /// Out of the pool by its active check's verdict.
    pub fn check_failing(&self) -> bool {
        self.check_failing.load(Ordering::Relaxed)
    }

    /// A checker starts on this instance with `check`: the verdict so far stands if it came from
    /// the same check, else it starts over from Unknown (in the pool).
    pub fn check_started(&self, check: &HealthCheck) {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.as_ref().is_none_or(|v| &v.check != check) {
            *active = Some(Verdict::new(check.clone(), unix_ms()));
            self.check_failing.store(false, Ordering::Relaxed);
        }
    }

    /// One result of `check` (`Err` holds why it failed); the new state if it changed. A result
    /// of another check (a task aborted mid-check after its check changed) is ignored.
    pub fn check_result(
        &self,
        check: &HealthCheck,
        result: Result<(), String>,
    ) -> Option<CheckState> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let verdict = active.as_mut().filter(|v| &v.check == check)?;
        let changed = verdict.record(result, unix_ms());
        self.check_failing
            .store(verdict.state == CheckState::Failing, Ordering::Relaxed);
        changed
    }

    /// The service no longer has a check (or the instance left): no verdict, in the pool.
    pub fn check_stopped(&self) {
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.check_failing.store(false, Ordering::Relaxed);
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
            check: self
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(Verdict::view),
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
    /// The active check's verdict; absent when the service has no check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckView>,
}

impl HealthView {
    /// Out of the pool by its active check.
    pub fn check_failing(&self) -> bool {
        self.check
            .as_ref()
            .is_some_and(|c| c.state == CheckState::Failing)
    }
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

    #[test]
    fn passive_success_does_not_override_a_failing_check() {
        let h = Health::default();
        let check = HealthCheck {
            fall: 1,
            rise: 2,
            ..HealthCheck::tcp()
        };
        h.check_started(&check);
        assert!(!h.check_failing());
        assert_eq!(
            h.check_result(&check, Err("tcp connect refused".into())),
            Some(CheckState::Failing)
        );
        h.succeeded();
        assert!(
            h.check_failing(),
            "a connect that worked does not end the verdict"
        );
        // The same check restarting (a table rebuild) keeps the verdict; another one does not.
        h.check_started(&check);
        assert!(h.check_failing());
        let other = HealthCheck::tcp();
        h.check_started(&other);
        assert!(!h.check_failing());
        let metrics = crate::metrics::Metrics::new().instance(&labels(), false);
        assert_eq!(h.view(&metrics).check.unwrap().state, CheckState::Unknown);
        for _ in 0..3 {
            assert_eq!(h.check_result(&check, Err("stale".into())), None);
        }
        assert!(!h.check_failing(), "results of the old check are ignored");
        for _ in 0..3 {
            h.check_result(&other, Err("x".into()));
        }
        assert!(h.check_failing());
        h.check_stopped();
        assert!(!h.check_failing());
        assert!(h.view(&metrics).check.is_none());
    }

    fn labels() -> crate::metrics::InstanceLabels {
        crate::metrics::InstanceLabels {
            service: "s".into(),
            instance: "i".into(),
            host: String::new(),
            image: String::new(),
            tag: String::new(),
        }
    }
}
