//! Retrying etcd: jittered backoff, and logging an outage once at each end.

use std::fmt::Display;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Short on purpose: after an outage, hosts must see each other's changes within seconds of
/// etcd returning (a 5 s cap let a watch notice 6 s late); one attempt per second per stream
/// costs etcd nothing.
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Exponential reconnect delay with jitter, so many hosts coming back after an etcd outage do
/// not all hit it in the same instant.
pub(super) struct Backoff {
    pub(super) next: Duration,
    pub(super) max: Duration,
}

impl Backoff {
    pub(super) fn new() -> Self {
        Backoff {
            next: BACKOFF_MIN,
            max: BACKOFF_MAX,
        }
    }

    pub(super) fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    pub(super) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
    }
}

/// Logs the start and the end of an outage once each; a retry every few seconds would flood the
/// log during a long one.
pub(super) struct Outage {
    pub(super) what: String,
    pub(super) down: bool,
    /// Set to the outage's start while it lasts, for those who report staleness.
    pub(super) since: Option<Arc<std::sync::Mutex<Option<SystemTime>>>>,
}

impl Outage {
    pub(super) fn new(what: String) -> Self {
        Outage {
            what,
            down: false,
            since: None,
        }
    }

    pub(super) fn failed(&mut self, err: &dyn Display) {
        if self.down {
            tracing::debug!(what = %self.what, error = %err, "etcd still failing");
        } else {
            self.down = true;
            tracing::warn!(what = %self.what, error = %err, "etcd failing; retrying with backoff");
            if let Some(Ok(mut since)) = self.since.as_ref().map(|s| s.lock()) {
                since.get_or_insert_with(SystemTime::now);
            }
        }
    }

    pub(super) fn recovered(&mut self) {
        if self.down {
            self.down = false;
            tracing::info!(what = %self.what, "etcd reachable again");
            if let Some(Ok(mut since)) = self.since.as_ref().map(|s| s.lock()) {
                *since = None;
            }
        }
    }
}
