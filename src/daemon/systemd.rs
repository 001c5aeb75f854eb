//! Talking to systemd (`Type=notify`): READY=1 once rules, listeners and the API are up,
//! STATUS= lines, STOPPING=1 at shutdown, and WATCHDOG=1 pings while the data plane is alive.
//! Every call is a no-op without `NOTIFY_SOCKET` (fluxd run by hand), and a failure to notify
//! is logged, never fatal: systemd is a supervisor, not a dependency.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::controller::{Status, DRIFT_CHECK};

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// STATUS=…: one line `systemctl status fluxd` shows.
pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

/// READY=1 with a status line: fluxd routes and serves.
pub fn ready(line: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(line)]);
}

/// STOPPING=1: a clean stop has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The watchdog period systemd asked for (`WatchdogSec=` sets `WATCHDOG_USEC`), if any.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// What the watchdog checks before each ping.
pub struct Liveness {
    /// The data plane's status: its controller loop must have turned recently.
    pub controller: Option<Arc<Status>>,
    /// Tasks that run until the stop signal (proxy, controller, API servers): none may have
    /// ended.
    pub tasks: Vec<(&'static str, AbortHandle)>,
}

impl Liveness {
    /// None when alive, else why not. The controller turns at least every drift check
    /// (`DRIFT_CHECK`, 2 s); it counts as stuck once it has not turned for the whole watchdog
    /// period (and at least three drift checks), e.g. behind an iptables call that hangs.
    pub fn problem(&self, period: Duration) -> Option<String> {
        if let Some((name, _)) = self.tasks.iter().find(|(_, t)| t.is_finished()) {
            return Some(format!("{name} task ended"));
        }
        if let Some(c) = &self.controller {
            let since = c.since_beat();
            if since > period.max(DRIFT_CHECK * 3) {
                return Some(format!("controller has not turned for {since:?}"));
            }
        }
        None
    }
}

/// With a watchdog period set, pings WATCHDOG=1 at half of it for as long as `live` finds
/// nothing wrong, until `stop`. When something is wrong it stops pinging (and says why in
/// STATUS=), so systemd kills and restarts fluxd after the period.
pub fn spawn_watchdog(
    live: Liveness,
    mut stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let period = watchdog_period()?;
    tracing::info!(period = ?period, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            match live.problem(period) {
                None => {
                    send(&[NotifyState::Watchdog]);
                    reported = false;
                }
                Some(why) if !reported => {
                    tracing::error!(reason = %why, "not pinging the systemd watchdog");
                    status(&format!("unhealthy: {why}"));
                    reported = true;
                }
                Some(_) => {}
            }
        }
    }))
}
