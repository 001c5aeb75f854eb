//! The controller: keeps the data plane level with the catalog. On every new catalog State it
//! compares that State with the last one it built from (kube-rs style: from states, not
//! events, so a missed event cannot cause drift), rebuilds the routes of the services that
//! differ, recomputes the desired rules and installs what changed; a timer compares the
//! installed rules with the desired ones and repairs drift.

pub mod guard;
mod guard_v6;
mod nat6;
pub mod routing;
mod steer;
mod traffic;
mod udp;
pub mod view;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::catalog::State;
use crate::docker::LocalInstances;
use crate::metrics::history::History;
use crate::metrics::Metrics;
use crate::model::Forwarding;
use crate::proxy::health::checker::Checker;
use crate::proxy::route_table::RouteTable;

/// How often installed rules are compared with the desired ones.
pub const DRIFT_CHECK: Duration = Duration::from_secs(2);

/// The rules side of the data plane.
pub struct Rules {
    pub netfilter: netfilter::Netfilter,
    /// Reads the installed rules for the periodic drift check, at the lowest CPU priority: the
    /// check runs every few seconds and must not take CPU from the proxy (on a busy two-core
    /// host it showed as millisecond stalls in the proxy's tail latency).
    pub reader: netfilter::Netfilter,
    pub proxy_port: u16,
    pub bridge_interfaces: Vec<String>,
    pub vip_ranges: Vec<ipnet::Ipv4Net>,
    /// Ranges no VIP may be in, nor overlap a VIP range (`--protected-range`): see [`guard`].
    pub protected_ranges: Vec<ipnet::Ipv4Net>,
    /// Addresses no VIP may take beyond those read at each sync: the etcd endpoints.
    pub protected_addresses: Vec<(std::net::Ipv4Addr, String)>,
    /// Whether `conntrack` can be run: without it, connection attempts made before a VIP was
    /// routed are not cleared when it becomes routed (the daemon warns once at start).
    pub conntrack: std::sync::atomic::AtomicBool,
    /// Whether services with no instance are refused (see [`can_refuse_empty`]; always on the
    /// bpf path).
    pub reject_empty: bool,
    /// The BPF steering, when VIP connections reach the proxy that way instead of through the
    /// nat rules (`--steering`); `netfilter` then only removes what a nat-mode fluxd left.
    pub steering: Option<Arc<steering::Steering>>,
    /// Why the nat path is used although `--steering auto` tried bpf.
    pub steering_fallback: Option<String>,
    /// Where the bpf steering is (or was) pinned.
    pub bpf_dir: std::path::PathBuf,
    /// Whether the bpf steering also takes IPv6 VIPs (it holds fluxd's IPv6 listener); if
    /// not, they go through the ip6tables rules on either path.
    pub steer_ipv6: bool,
}

/// Whether connections to services with no instance can be refused at once: that matches the
/// `flux-empty` ipset, so it needs ipset, which fluxd can otherwise do without when every VIP
/// lies in a `--vip-range`. Checked once at start; without ipset, says so once, and those
/// services' connections are accepted and then reset by the proxy.
pub async fn can_refuse_empty() -> bool {
    let check = tokio::task::spawn_blocking(|| {
        netfilter::Netfilter::new(netfilter::CommandRunner::new()).check_ipset()
    })
    .await;
    let error = match check {
        Ok(Ok(())) => return true,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    tracing::warn!(
        error = %error,
        "services with no instance will accept connections and reset them, not refuse them"
    );
    false
}

/// What the controller has done, for the API (`fluxd debug`, `fluxctl query`).
pub struct Status {
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub rules: Option<Rules>,
    /// The ruleset last applied successfully (nat path); shared, not copied, by the readers
    /// (the drift check, the debug view, the next apply), since it holds a line per VIP.
    pub applied: Mutex<Option<Arc<netfilter::Ruleset>>>,
    /// The steering last applied successfully (bpf path).
    pub steered: Mutex<Option<Arc<steering::Desired>>>,
    /// The catalog state the data plane was last built from.
    pub state: ArcSwap<State>,
    /// What the VIP guard refused at the last sync, for `fluxd debug` and the services' views.
    pub guard: ArcSwap<guard::Verdict>,
    /// Drift repairs since start.
    pub repairs: AtomicU64,
    /// Every instance's series, for `/metrics` and the UI's history.
    pub metrics: Arc<Metrics>,
    /// The last 15 minutes of every instance's series, for the UI's charts.
    pub history: Arc<History>,
    /// When the controller's loop last finished a turn (a sync or a drift check), in ms since
    /// `started`: the systemd watchdog pings only while this moves.
    pub heartbeat: AtomicU64,
    started: std::time::Instant,
    /// The udp services the relay serves (see `proxy::udp`), set at each sync.
    pub udp: tokio::sync::watch::Sender<Arc<crate::proxy::udp::UdpPlan>>,
}

impl Status {
    /// Records one interval of every routed instance into the history.
    pub fn sample(&self) {
        let routes = self.routes.load();
        self.history.sample(
            routes
                .services
                .values()
                .flat_map(|r| r.backends.iter())
                .map(|b| (&b.metrics, &b.labels, &b.extra)),
        );
    }

    /// Proxied connections open now (requests in flight for `http` services), over all
    /// instances.
    pub fn open_connections(&self) -> i64 {
        let routes = self.routes.load();
        routes
            .services
            .values()
            .flat_map(|r| r.backends.iter())
            .map(|b| b.metrics.active.get())
            .sum()
    }

    pub fn new(routes: Arc<ArcSwap<RouteTable>>, rules: Option<Rules>) -> Arc<Status> {
        Arc::new(Status {
            routes,
            rules,
            applied: Mutex::new(None),
            steered: Mutex::new(None),
            state: ArcSwap::from_pointee(State::default()),
            guard: ArcSwap::from_pointee(guard::Verdict::default()),
            repairs: AtomicU64::new(0),
            metrics: Arc::new(Metrics::new()),
            history: Arc::new(History::default()),
            heartbeat: AtomicU64::new(0),
            started: std::time::Instant::now(),
            udp: tokio::sync::watch::Sender::new(Arc::default()),
        })
    }

    /// Records that the controller's loop is turning.
    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.heartbeat.store(ms, Ordering::Relaxed);
    }

    /// How long ago the controller's loop last turned.
    pub fn since_beat(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.heartbeat.load(Ordering::Relaxed)))
    }
}

pub struct Controller {
    status: Arc<Status>,
    /// This host's instances from the Docker agent, if it runs.
    local: Option<watch::Receiver<Option<Arc<LocalInstances>>>>,
    /// The catalog state last received.
    catalog: Arc<State>,
    /// The catalog as this host routes it, patched at each sync.
    view: view::RoutedView,
    /// The routes last built, and what they were built from.
    table: RouteTable,
    built: routing::Built,
    /// The active health checks of the routed instances, kept level with each new table.
    checker: Checker,
    /// Skipped records last reported, so each is logged once and not at every sync.
    reported: Vec<String>,
    /// This host's interface addresses as last read, for the VIP guard: re-read at every sync
    /// and drift check, and a change re-syncs.
    addresses: guard::Addresses,
    /// The interfaces whose connections the bpf path steers (lo and the bridges), by index:
    /// read again with the addresses, since Docker networks come and go.
    ifaces: std::collections::BTreeMap<u32, String>,
    /// The IPv6 nat rules last applied successfully (`nat6`); None before the first apply
    /// and after a failure or drift, so the next sync applies them.
    applied6: Option<Arc<netfilter::Ruleset6>>,
    /// The nat path's udp relay sockets, whose ports the udp redirect rules name.
    udp_nat: crate::proxy::udp::NatSockets,
}

impl Controller {
    pub fn new(
        status: Arc<Status>,
        host: String,
        local: Option<watch::Receiver<Option<Arc<LocalInstances>>>>,
    ) -> Self {
        Controller {
            checker: Checker::new(status.metrics.clone()),
            view: view::RoutedView::new(&host),
            built: routing::Built::for_host(&host),
            status,
            local,
            catalog: Arc::new(State::default()),
            table: RouteTable::default(),
            reported: Vec::new(),
            addresses: guard::Addresses::default(),
            ifaces: Default::default(),
            applied6: None,
            udp_nat: Default::default(),
        }
    }

    /// Builds the data plane for `state` once, so it is up before fluxd reports ready.
    pub async fn initial_sync(&mut self, state: Arc<State>) {
        self.catalog = state;
        self.sync().await;
        self.status.beat();
    }

    /// Follows catalog states until `stop`.
    pub async fn run(
        mut self,
        mut states: watch::Receiver<Arc<State>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut drift_timer = tokio::time::interval(DRIFT_CHECK);
        drift_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let verdicts = self.checker.verdicts();
        loop {
            tokio::select! {
                changed = states.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.catalog = states.borrow_and_update().clone();
                    self.sync().await;
                }
                changed = local_changed(&mut self.local) => {
                    if changed.is_err() {
                        self.local = None;
                    }
                    self.sync().await;
                }
                // An instance entered or left the pool by its active check: the proxy reads
                // that from the table by itself, the kernel-forwarding rules need rewriting.
                _ = verdicts.notified() => {
                    if self.catalog.services.values().any(|s| s.forward == Forwarding::Kernel) {
                        self.sync().await;
                    }
                }
                _ = drift_timer.tick() => {
                    // Addresses come and go (DHCP, a new Docker bridge, an operator): the
                    // guard judges again when they change.
                    if self.read_addresses() {
                        tracing::info!("interface addresses changed; checking VIPs again");
                        self.sync().await;
                    } else if self.read_ifaces() {
                        tracing::info!(ifaces = ?self.ifaces, "steered interfaces changed");
                        self.sync().await;
                    }
                    self.check_drift().await
                }
                _ = stop.changed() => return,
            }
            self.status.beat();
        }
    }

    /// Brings routes and rules level with the catalog and the local instances, and installs
    /// both: the routes of the services that changed since the last sync are rebuilt, the
    /// others kept.
    async fn sync(&mut self) {
        let t = std::time::Instant::now();
        let local = self.local.as_ref().and_then(|l| l.borrow().clone());
        let changed = self.view.update(self.catalog.clone(), local);
        let state = Arc::new(self.view.state().clone());
        if state.skipped != self.reported {
            for s in state.skipped.iter().filter(|s| !self.reported.contains(s)) {
                tracing::warn!(record = %s, "skipping a store record that does not validate");
            }
            self.reported = state.skipped.clone();
        }
        match &changed {
            view::Changed::All => {
                self.table = routing::route_table(&state, &mut self.built, &self.status.metrics)
            }
            view::Changed::Services(names) => routing::update_routes(
                &state,
                names,
                &mut self.built,
                &self.status.metrics,
                &mut self.table,
            ),
        }
        let table = Arc::new(self.table.clone());
        self.checker.sync(&table);
        self.status.routes.store(table.clone());
        let services = match &changed {
            view::Changed::All => None,
            view::Changed::Services(names) => Some(names.len()),
        };
        tracing::debug!(took = ?t.elapsed(), ?services, "routes built");
        self.read_addresses();
        self.read_ifaces();
        if let Some(rules) = &self.status.rules {
            let verdict = guard::Verdict::judge(
                state
                    .services
                    .values()
                    .filter_map(|s| Some((s.name.as_str(), s.address?))),
                &rules.vip_ranges,
                &self.addresses,
                &rules.protected_ranges,
            );
            report_guard(&self.status.guard.load(), &verdict);
            // From the table just stored: the proxy already has the instances a VIP leaving
            // `flux-empty` is routed to, and a VIP entering it may still see connections
            // redirected before the change, which the proxy resets.
            let mut wanted = routing::desired_rules(
                &state,
                &table,
                rules.proxy_port,
                &rules.bridge_interfaces,
                &verdict,
                rules.reject_empty,
            );
            // IPv6 VIPs: in the steering's maps when it holds an IPv6 listener, else in the
            // ip6tables rules (which are then emptied, or never written).
            let steer6 = rules.steering.is_some() && rules.steer_ipv6;
            let (wanted6, ipv6) = if steer6 {
                let ipv6 = steer::ipv6_services(&state, &table, &verdict, rules.reject_empty);
                (nat6::desired6_none(rules.proxy_port), ipv6)
            } else {
                let wanted6 =
                    nat6::desired6(&state, &verdict, rules.proxy_port, &rules.bridge_interfaces);
                (wanted6, Vec::new())
            };
            self.status.guard.store(Arc::new(verdict));
            self.sync6(wanted6).await;
            let Some(rules) = &self.status.rules else {
                return;
            };
            if rules.steering.is_some() {
                udp::hand_over(&self.status, &wanted, &table, udp::Path::Bpf(&self.ifaces));
                steer::sync(&self.status, steer::desired(&wanted, ipv6, &self.ifaces)).await;
                self.forward_beside_steering(&wanted).await;
                self.status.state.store(state);
                return;
            }
            wanted.udp_redirects =
                udp::hand_over(&self.status, &wanted, &table, udp::Path::Nat(&self.udp_nat));
            let desired = netfilter::render(&wanted);
            let changed = self
                .status
                .applied
                .lock()
                .map(|a| a.as_deref() != Some(&desired))
                .unwrap_or(true);
            tracing::debug!(took = ?t.elapsed(), changed, "rules rendered");
            if changed {
                for r in desired.rejected() {
                    tracing::warn!(reason = %r, "not installing a redirect");
                }
                self.install(desired).await;
                tracing::debug!(took = ?t.elapsed(), "rules installed");
            }
        }
        self.status.state.store(state);
    }

    /// The bpf path's nat rules: only the DNAT chains of kernel-forwarded services (the bpf
    /// steering takes every proxied VIP). Installed while some service is forwarded, removed
    /// once none is, so that a bpf host without any keeps no nat rule at all.
    async fn forward_beside_steering(&self, wanted: &netfilter::Desired) {
        let installed = matches!(self.status.applied.lock().as_deref(), Ok(Some(_)));
        if wanted.forwards.is_empty() && !installed {
            return;
        }
        let desired = netfilter::render(&netfilter::Desired {
            forwards: wanted.forwards.clone(),
            proxy_port: wanted.proxy_port,
            bridge_interfaces: wanted.bridge_interfaces.clone(),
            ..Default::default()
        });
        let changed = self
            .status
            .applied
            .lock()
            .map(|a| a.as_deref() != Some(&desired))
            .unwrap_or(true);
        if changed {
            // Also when the last forwarded service left: its instances' conntrack entries are
            // cleared on the way.
            self.install(desired).await;
        }
        if wanted.forwards.is_empty() {
            let status = self.status.clone();
            let removed = tokio::task::spawn_blocking(move || {
                let rules = status.rules.as_ref()?;
                let result = rules.netfilter.remove();
                if result.is_ok() {
                    if let Ok(mut a) = status.applied.lock() {
                        *a = None;
                    }
                }
                Some(result)
            })
            .await;
            if let Ok(Some(Err(e))) = removed {
                tracing::error!(error = %e, "could not remove the nat rules of the last kernel-forwarded service; retrying at the next sync");
            }
        }
    }

    /// Reads this host's interface addresses again; true when they changed. On a failure to
    /// read them the last ones stand.
    fn read_addresses(&mut self) -> bool {
        let fixed = self
            .status
            .rules
            .as_ref()
            .map_or(&[][..], |r| &r.protected_addresses[..]);
        match guard::Addresses::read(fixed) {
            Ok(now) if now != self.addresses => {
                self.addresses = now;
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read interface addresses; the VIP guard uses the last ones read");
                false
            }
        }
    }

    /// Reads the steered interfaces again (bpf path only); true when they changed.
    fn read_ifaces(&mut self) -> bool {
        let Some(rules) = self.status.rules.as_ref().filter(|r| r.steering.is_some()) else {
            return false;
        };
        match steering::interfaces::steered(&rules.bridge_interfaces) {
            Ok(now) if now != self.ifaces => {
                self.ifaces = now;
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the interfaces; steering keeps the last ones read");
                false
            }
        }
    }

    async fn install(&self, desired: netfilter::Ruleset) {
        let status = self.status.clone();
        let result = tokio::task::spawn_blocking(move || {
            let Some(rules) = &status.rules else {
                return Ok(());
            };
            // After a success the kernel holds the last applied ruleset (the drift check
            // clears it when it does not), so only the difference is sent: one ipset line for
            // one service, whatever the number of services.
            let previous = status.applied.lock().ok().and_then(|a| a.clone());
            match &previous {
                Some(previous) => rules.netfilter.apply_change(previous, &desired)?,
                None => rules.netfilter.apply(&desired)?,
            }
            let routed = netfilter::Routed::between(previous.as_deref(), &desired);
            let unforwarded = netfilter::Unforwarded::between(previous.as_deref(), &desired);
            if let Ok(mut a) = status.applied.lock() {
                *a = Some(Arc::new(desired));
            }
            // After the apply: an attempt made before it would otherwise survive, and no new
            // connection goes to an instance that left any more.
            clear_unredirected(rules, &routed);
            clear_unforwarded(rules, &unforwarded);
            Ok::<_, netfilter::Error>(())
        })
        .await;
        match result {
            Ok(Ok(())) => tracing::debug!("rules applied"),
            Ok(Err(e)) => tracing::error!(
                error = %e,
                "applying rules failed; retrying at the next drift check"
            ),
            Err(e) => tracing::error!(error = %e, "rules task failed"),
        }
    }

    /// Compares the kernel's rules with the last applied set and re-applies on any difference.
    async fn check_drift(&mut self) {
        let bpf = self
            .status
            .rules
            .as_ref()
            .is_some_and(|r| r.steering.is_some());
        let mut repair = self.drifted6().await;
        if bpf {
            repair |= steer::drifted(&self.status).await;
            // Nat rules on the bpf path are kernel-forwarded services' only.
            if !matches!(self.status.applied.lock().as_deref(), Ok(Some(_))) {
                if repair {
                    self.status.repairs.fetch_add(1, Ordering::Relaxed);
                    self.sync().await;
                }
                return;
            }
        }
        let status = self.status.clone();
        let drifted = tokio::task::spawn_blocking(move || {
            let rules = status.rules.as_ref()?;
            let applied = status.applied.lock().ok()?.clone();
            let Some(applied) = applied else {
                return Some(true); // never applied successfully: try again
            };
            match rules.reader.drift(&applied) {
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
            repair = true;
        }
        if repair {
            self.status.repairs.fetch_add(1, Ordering::Relaxed);
            self.sync().await;
        }
    }
}

/// Logs what the guard decided differently from last time: a warning per newly refused VIP, an
/// error per newly refused VIP range, and a note when either is routed again.
fn report_guard(before: &guard::Verdict, now: &guard::Verdict) {
    for r in now.refused.values() {
        if before.refused.get(&r.service) != Some(r) {
            tracing::warn!(service = %r.service, vip = %r.vip, reason = %r.reason, "VIP guard: not routing this service on this host");
        }
    }
    for r in before.refused.values() {
        if !now.refused.contains_key(&r.service) {
            tracing::info!(service = %r.service, vip = %r.vip, "VIP guard: service no longer refused");
        }
    }
    for r in &now.refused_ranges {
        if !before.refused_ranges.contains(r) {
            tracing::error!(range = %r.range, reason = %r.reason, "VIP guard: not installing the rule of this VIP range");
        }
    }
    for r in &before.refused_ranges {
        if now.ranges.contains(&r.range) {
            tracing::info!(range = %r.range, "VIP guard: installing the rule of this VIP range again");
        }
    }
}

/// Deletes the conntrack entries of connection attempts to `routed` made before it was routed,
/// which would otherwise hold back a later connection from the same source port (see
/// [`netfilter::Netfilter::clear_unredirected`]).
fn clear_unredirected(rules: &Rules, routed: &netfilter::Routed) {
    if routed.is_empty() {
        return;
    }
    if let Some((deleted, ms)) = clear_conntrack(rules, |n| n.clear_unredirected(routed)) {
        tracing::debug!(
            deleted,
            vips = routed.vips.len(),
            ranges = routed.ranges.len(),
            ms,
            "cleared conntrack entries of connections made before their VIP was routed"
        );
    }
}

/// Deletes the conntrack entries of connections the kernel forwarded to instances that left
/// their service, so those connections fail at the client's next packet instead of hanging
/// (see [`netfilter::Unforwarded`]).
fn clear_unforwarded(rules: &Rules, unforwarded: &netfilter::Unforwarded) {
    if unforwarded.is_empty() {
        return;
    }
    if let Some((deleted, ms)) = clear_conntrack(rules, |n| n.clear_unforwarded(unforwarded)) {
        tracing::debug!(
            deleted,
            instances = unforwarded.flows.len(),
            ms,
            "cleared conntrack entries of connections forwarded to instances that left"
        );
    }
}

/// Runs one conntrack clean-up on the blocking task: the entries deleted and the milliseconds
/// it took. A failure is logged and costs only this clean-up, never the routing; without the
/// conntrack tool no clean-up is tried again.
fn clear_conntrack(
    rules: &Rules,
    clear: impl FnOnce(&netfilter::Netfilter) -> Result<usize, netfilter::Error>,
) -> Option<(usize, u64)> {
    if !rules.conntrack.load(Ordering::Relaxed) {
        return None;
    }
    let started = std::time::Instant::now();
    match clear(&rules.netfilter) {
        Ok(deleted) => Some((deleted, started.elapsed().as_millis() as u64)),
        Err(e @ netfilter::Error::ConntrackMissing) => {
            tracing::warn!(error = %e, "not clearing conntrack entries any more");
            rules.conntrack.store(false, Ordering::Relaxed);
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "clearing conntrack entries failed");
            None
        }
    }
}

/// Waits for the agent's next publication; pends forever without an agent.
async fn local_changed(
    local: &mut Option<watch::Receiver<Option<Arc<LocalInstances>>>>,
) -> Result<(), watch::error::RecvError> {
    match local {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}
