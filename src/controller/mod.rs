//! The controller: follows the store (list, then watch) and keeps the data plane level with it.
//! On any change it recomputes everything from the current state (kube-rs style, so a missed
//! event cannot cause drift), coalescing bursts of changes into one sync. A timer compares the
//! installed rules with the desired ones and repairs drift.

pub mod routing;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::{sleep, Instant};

use crate::catalog::State;
use crate::proxy::health::Health;
use crate::proxy::routes::RouteTable;
use crate::store::{KeyValue, Store, WatchEvent};
use routing::HealthKey;

/// Changes that arrive within this window are applied together.
const COALESCE: Duration = Duration::from_millis(10);
/// How often installed rules are compared with the desired ones.
pub const DRIFT_CHECK: Duration = Duration::from_secs(2);

/// The rules side of the data plane, absent with `--no-dataplane`.
pub struct Rules {
    pub netfilter: netfilter::Netfilter,
    pub proxy_port: u16,
    pub bridge_interfaces: Vec<String>,
}

/// What the controller has done, for the API (`fluxd debug`, `fluxctl query`).
pub struct Status {
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub rules: Option<Rules>,
    /// The ruleset last applied successfully.
    pub applied: Mutex<Option<netfilter::Ruleset>>,
    /// The catalog state the data plane was last built from.
    pub state: ArcSwap<State>,
    /// Drift repairs since start.
    pub repairs: AtomicU64,
}

impl Status {
    pub fn new(routes: Arc<ArcSwap<RouteTable>>, rules: Option<Rules>) -> Arc<Status> {
        Arc::new(Status {
            routes,
            rules,
            applied: Mutex::new(None),
            state: ArcSwap::from_pointee(State::default()),
            repairs: AtomicU64::new(0),
        })
    }
}

pub struct Controller {
    store: Arc<dyn Store>,
    status: Arc<Status>,
    health: HashMap<HealthKey, Arc<Health>>,
    /// Every key under the store root, as last seen.
    kvs: BTreeMap<String, KeyValue>,
    revision: i64,
    /// Skipped records last reported, so each is logged once and not at every sync.
    reported: Vec<String>,
}

impl Controller {
    pub fn new(store: Arc<dyn Store>, status: Arc<Status>) -> Self {
        Controller {
            store,
            status,
            health: HashMap::new(),
            kvs: BTreeMap::new(),
            revision: 0,
            reported: Vec::new(),
        }
    }

    /// Lists and syncs once, so the data plane is up before fluxd reports ready.
    pub async fn initial_sync(&mut self) -> crate::store::Result<()> {
        let listing = self.store.list("").await?;
        self.replace(listing.kvs, listing.revision);
        self.sync().await;
        Ok(())
    }

    /// Follows the store until `stop`. A watch that ends is re-established from the last
    /// revision seen (the backends resume or send a Reset themselves; this is the last resort).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut drift_timer = tokio::time::interval(DRIFT_CHECK);
        drift_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = Duration::from_millis(100);
        loop {
            let mut events = match self.store.watch("", self.revision + 1).await {
                Ok(rx) => rx,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the store; retrying");
                    tokio::select! {
                        _ = sleep(retry) => {}
                        _ = stop.changed() => return,
                    }
                    retry = (retry * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            retry = Duration::from_millis(100);
            let mut due: Option<Instant> = None;
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Some(ev) => {
                            self.apply_event(ev);
                            due.get_or_insert(Instant::now() + COALESCE);
                        }
                        None => break,
                    },
                    _ = sleep_until_opt(due) => {
                        due = None;
                        self.sync().await;
                    }
                    _ = drift_timer.tick() => self.check_drift().await,
                    _ = stop.changed() => return,
                }
            }
        }
    }

    fn replace(&mut self, kvs: Vec<KeyValue>, revision: i64) {
        self.kvs = kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        self.revision = revision;
    }

    fn apply_event(&mut self, ev: WatchEvent) {
        match ev {
            WatchEvent::Put(kv) => {
                self.revision = self.revision.max(kv.mod_revision);
                self.kvs.insert(kv.key.clone(), kv);
            }
            WatchEvent::Delete { key, revision } => {
                self.revision = self.revision.max(revision);
                self.kvs.remove(&key);
            }
            WatchEvent::Reset(listing) => self.replace(listing.kvs, listing.revision),
        }
    }

    /// Rebuilds routes and rules from the current keys and installs both.
    async fn sync(&mut self) {
        let state = State::from_kvs(self.kvs.values(), self.revision);
        if state.skipped != self.reported {
            for s in state.skipped.iter().filter(|s| !self.reported.contains(s)) {
                tracing::warn!(record = %s, "skipping a store record that does not validate");
            }
            self.reported = state.skipped.clone();
        }
        let table = routing::route_table(&state, &mut self.health);
        self.status.routes.store(Arc::new(table));
        if let Some(rules) = &self.status.rules {
            let desired = netfilter::render(&routing::desired_rules(
                &state,
                rules.proxy_port,
                &rules.bridge_interfaces,
            ));
            for r in desired.rejected() {
                tracing::warn!(reason = %r, "not installing a redirect");
            }
            let changed = self
                .status
                .applied
                .lock()
                .map(|a| a.as_ref() != Some(&desired))
                .unwrap_or(true);
            if changed {
                self.install(desired).await;
            }
        }
        self.status.state.store(Arc::new(state));
    }

    async fn install(&self, desired: netfilter::Ruleset) {
        let status = self.status.clone();
        let result = tokio::task::spawn_blocking(move || {
            let Some(rules) = &status.rules else {
                return Ok(());
            };
            rules.netfilter.apply(&desired)?;
            if let Ok(mut a) = status.applied.lock() {
                *a = Some(desired);
            }
            Ok::<_, netfilter::Error>(())
        })
        .await;
        match result {
            Ok(Ok(())) => tracing::debug!("rules applied"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "applying rules failed; retrying at the next drift check")
            }
            Err(e) => tracing::error!(error = %e, "rules task failed"),
        }
    }

    /// Compares the kernel's rules with the last desired set and re-applies on any difference.
    async fn check_drift(&mut self) {
        let status = self.status.clone();
        let drifted = tokio::task::spawn_blocking(move || {
            let rules = status.rules.as_ref()?;
            let applied = status.applied.lock().ok()?.clone();
            let Some(applied) = applied else {
                return Some(true); // never applied successfully: try again
            };
            match rules.netfilter.drift(&applied) {
                Ok(d) if d.is_clean() => Some(false),
                Ok(d) => {
                    tracing::warn!(drift = %d, "installed rules differ from the desired ones; repairing");
                    Some(true)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read installed rules");
                    None
                }
            }
        })
        .await
        .ok()
        .flatten();
        if drifted == Some(true) {
            if let Ok(mut a) = self.status.applied.lock() {
                *a = None;
            }
            self.status.repairs.fetch_add(1, Ordering::Relaxed);
            self.sync().await;
        }
    }
}

async fn sleep_until_opt(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
