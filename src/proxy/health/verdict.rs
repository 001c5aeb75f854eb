//! The verdict of one instance's active health check: a small state machine fed one check
//! result at a time. `fall` failures in a row make it failing (out of the pool), `rise` passes
//! in a row make a failing instance passing again. Pure: the checker feeds it, `Health` holds it.

use serde::{Deserialize, Serialize};

use crate::model::HealthCheck;

/// Where an instance stands with its active check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckState {
    /// Not enough results yet (a new instance, or the check just changed): in the pool, with
    /// passive health guarding its connects.
    Unknown,
    /// In the pool.
    Passing,
    /// Out of the pool on this host until `rise` checks in a row pass.
    Failing,
}

impl CheckState {
    pub fn as_str(&self) -> &'static str {
        match self {
            CheckState::Unknown => "unknown",
            CheckState::Passing => "passing",
            CheckState::Failing => "failing",
        }
    }
}

/// The running record of one instance's check results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The check these results come from: a different check starts over from Unknown.
    pub check: HealthCheck,
    pub state: CheckState,
    /// Unix ms when `state` was entered (when the check started, for Unknown).
    pub since_unix_ms: u64,
    /// Failures since the last pass.
    pub failures_in_a_row: u32,
    /// Passes since the last failure.
    pub passes_in_a_row: u32,
    /// Why the last failed check failed (`http GET /healthz answered 503`); kept after passes,
    /// with its time, so that a flapping instance shows what it last said.
    pub last_failure: Option<String>,
    pub last_failure_unix_ms: Option<u64>,
}

impl Verdict {
    pub fn new(check: HealthCheck, now_unix_ms: u64) -> Self {
        Verdict {
            check,
            state: CheckState::Unknown,
            since_unix_ms: now_unix_ms,
            failures_in_a_row: 0,
            passes_in_a_row: 0,
            last_failure: None,
            last_failure_unix_ms: None,
        }
    }

    /// Takes one result (`Err` holds the reason); returns the new state when it changed.
    ///
    /// Unknown becomes Passing at the first pass (it was in the pool already: there is nothing
    /// to rise into) and Failing after `fall` failures, like Passing does.
    pub fn record(&mut self, result: Result<(), String>, now_unix_ms: u64) -> Option<CheckState> {
        let next = match result {
            Ok(()) => {
                self.passes_in_a_row = self.passes_in_a_row.saturating_add(1);
                self.failures_in_a_row = 0;
                match self.state {
                    CheckState::Unknown => CheckState::Passing,
                    CheckState::Failing if self.passes_in_a_row >= self.check.rise => {
                        CheckState::Passing
                    }
                    s => s,
                }
            }
            Err(why) => {
                self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
                self.passes_in_a_row = 0;
                self.last_failure = Some(why);
                self.last_failure_unix_ms = Some(now_unix_ms);
                if self.failures_in_a_row >= self.check.fall {
                    CheckState::Failing
                } else {
                    self.state
                }
            }
        };
        if next == self.state {
            return None;
        }
        self.state = next;
        self.since_unix_ms = now_unix_ms;
        Some(next)
    }

    pub fn view(&self) -> CheckView {
        CheckView {
            check: self.check.spec(),
            state: self.state,
            since_unix_ms: self.since_unix_ms,
            failures_in_a_row: self.failures_in_a_row,
            passes_in_a_row: self.passes_in_a_row,
            reason: self.last_failure.clone(),
            last_failure_unix_ms: self.last_failure_unix_ms,
        }
    }
}

/// The active check as `fluxctl query`, `fluxd debug` and the UI show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckView {
    /// The check, as `--health` takes it (`http:/healthz`, `tcp`).
    pub check: String,
    pub state: CheckState,
    /// Unix ms when `state` was entered.
    pub since_unix_ms: u64,
    pub failures_in_a_row: u32,
    pub passes_in_a_row: u32,
    /// Why the last failed check failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_unix_ms: Option<u64>,
}

impl CheckView {
    /// `http GET /healthz answered 503, 3 in a row, since 12:03:04 UTC` for a failing instance;
    /// `passing` (with the last failure, if the last result was one) otherwise.
    pub fn summary(&self) -> String {
        let reason = self.reason.as_deref().unwrap_or("failed");
        match self.state {
            CheckState::Failing => format!(
                "{reason}, {} in a row, since {}",
                self.failures_in_a_row.max(1),
                clock(self.since_unix_ms)
            ),
            s if self.failures_in_a_row > 0 => format!(
                "{}, {} failed: {reason}",
                s.as_str(),
                self.failures_in_a_row
            ),
            s => s.as_str().to_string(),
        }
    }
}

/// `HH:MM:SS UTC` of a Unix ms time: the same on every host, whatever its time zone.
pub fn clock(unix_ms: u64) -> String {
    let s = unix_ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(fall: u32, rise: u32) -> HealthCheck {
        HealthCheck {
            fall,
            rise,
            ..HealthCheck::http("/healthz")
        }
    }

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_passes() {
        let mut v = Verdict::new(check(3, 2), 1000);
        assert_eq!(v.state, CheckState::Unknown);
        assert_eq!(v.record(Ok(()), 2000), Some(CheckState::Passing));
        assert_eq!(v.record(Err("a".into()), 3000), None);
        assert_eq!(v.record(Err("b".into()), 4000), None);
        assert_eq!(v.state, CheckState::Passing);
        assert_eq!(v.record(Err("c".into()), 5000), Some(CheckState::Failing));
        assert_eq!((v.since_unix_ms, v.failures_in_a_row), (5000, 3));
        assert_eq!(v.last_failure.as_deref(), Some("c"));
        assert_eq!(v.record(Err("d".into()), 6000), None);
        assert_eq!(v.since_unix_ms, 5000, "since is when it started failing");
        assert_eq!(
            v.record(Ok(()), 7000),
            None,
            "one pass is not enough to rise"
        );
        assert_eq!(v.record(Err("e".into()), 8000), None);
        assert_eq!(v.record(Ok(()), 9000), None, "passes must be in a row");
        assert_eq!(v.record(Ok(()), 10000), Some(CheckState::Passing));
        assert_eq!(v.failures_in_a_row, 0);
        assert_eq!(v.last_failure.as_deref(), Some("e"), "last failure kept");
    }

    #[test]
    fn a_failure_in_between_resets_the_count() {
        let mut v = Verdict::new(check(2, 1), 0);
        v.record(Err("x".into()), 1);
        v.record(Ok(()), 2);
        v.record(Err("x".into()), 3);
        assert_eq!(v.state, CheckState::Passing);
        assert_eq!(v.record(Err("x".into()), 4), Some(CheckState::Failing));
        assert_eq!(v.record(Ok(()), 5), Some(CheckState::Passing), "rise 1");
    }

    #[test]
    fn unknown_falls_without_ever_passing() {
        let mut v = Verdict::new(check(1, 2), 0);
        assert_eq!(
            v.record(Err("tcp connect refused".into()), 1),
            Some(CheckState::Failing)
        );
    }

    #[test]
    fn summaries() {
        let mut v = Verdict::new(check(2, 2), 0);
        assert_eq!(v.view().summary(), "unknown");
        v.record(Err("http GET /healthz answered 503".into()), 1000);
        assert_eq!(
            v.view().summary(),
            "unknown, 1 failed: http GET /healthz answered 503"
        );
        v.record(
            Err("http GET /healthz answered 503".into()),
            (12 * 3600 + 3 * 60 + 4) * 1000,
        );
        assert_eq!(
            v.view().summary(),
            "http GET /healthz answered 503, 2 in a row, since 12:03:04 UTC"
        );
    }
}
