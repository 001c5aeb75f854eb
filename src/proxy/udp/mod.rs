//! `udp` services: fluxd relays their datagrams itself, with a flow table per service (client
//! address -> instance and connected upstream socket) instead of conntrack.
//!
//! The controller hands the relay a [`UdpPlan`] (each routed udp service's VIP and route, and
//! the interfaces allowed to reach them); the relay keeps one socket and task per VIP
//! ([`relay`]), bound to the VIP:port itself. On the bpf path the VIP is a local address of the
//! host (flux's local route) and the `sk_lookup` program leaves UDP to the usual socket lookup,
//! so the datagrams reach that socket with no rule at all, and replies leave it from the VIP.
//! On the nat path an iptables `REDIRECT` sends the VIP:port's datagrams to a socket of the
//! service's own ([`NatSockets`]), and each reply is sent with the address its flow's datagrams
//! arrived at as source (`IP_PKTINFO`), so that conntrack's reverse NAT turns it back into the
//! VIP:port.

pub mod flows;
mod relay;
mod socket;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::proxy::route_table::ServiceRoute;
use relay::{Inputs, Shared};

/// fluxd's `--udp-idle-ms` and `--udp-max-flows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSettings {
    /// A flow with no datagram either way for this long is closed.
    pub idle: Duration,
    /// Most flows at once over every udp service.
    pub max_flows: usize,
}

impl Default for UdpSettings {
    fn default() -> Self {
        UdpSettings {
            idle: Duration::from_secs(30),
            max_flows: 65_536,
        }
    }
}

/// What the relay serves, as the controller decided it (after the VIP guard).
#[derive(Debug, Clone, Default)]
pub struct UdpPlan {
    /// Each udp service to relay, sorted by VIP.
    pub services: Vec<UdpTarget>,
    /// The interfaces (by index) whose datagrams are relayed: lo and the bridges; None for
    /// any.
    pub ifaces: Option<Arc<BTreeSet<u32>>>,
}

/// One udp service the relay serves.
#[derive(Debug, Clone)]
pub struct UdpTarget {
    /// Its VIP:port.
    pub vip: SocketAddr,
    pub route: Arc<ServiceRoute>,
    /// On the nat path, the socket its datagrams are redirected to (see [`NatSockets`]); None
    /// on the bpf path, where the relay binds the VIP:port itself.
    pub redirected: Option<Arc<std::net::UdpSocket>>,
}

impl PartialEq for UdpPlan {
    /// The same VIPs with the very same routes (a route is rebuilt whenever its service or
    /// instances change) and sockets, and the same interfaces.
    fn eq(&self, other: &Self) -> bool {
        self.ifaces == other.ifaces
            && self.services.len() == other.services.len()
            && self.services.iter().zip(&other.services).all(|(a, b)| {
                a.vip == b.vip
                    && Arc::ptr_eq(&a.route, &b.route)
                    && match (&a.redirected, &b.redirected) {
                        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
                        (None, None) => true,
                        _ => false,
                    }
            })
    }
}

/// The nat path's relay sockets, one per udp VIP, each on a port the kernel picks: the
/// controller needs the port to write the service's `REDIRECT` rule before the relay runs.
#[derive(Debug, Default)]
pub struct NatSockets {
    by_vip: std::sync::Mutex<HashMap<SocketAddr, Arc<std::net::UdpSocket>>>,
}

impl NatSockets {
    /// The sockets of `vips`, bound on first use (those that cannot be are left out, and
    /// tried again next time); the sockets of VIPs not in `vips` are let go.
    pub fn sync(&self, vips: &[SocketAddr]) -> HashMap<SocketAddr, Arc<std::net::UdpSocket>> {
        let mut map = self
            .by_vip
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|vip, _| vips.contains(vip));
        for vip in vips {
            if map.contains_key(vip) {
                continue;
            }
            match socket::bind_redirected(*vip) {
                Ok(s) => {
                    map.insert(*vip, Arc::new(s));
                }
                Err(e) => {
                    tracing::warn!(%vip, error = %e, "cannot bind a udp relay socket; retrying at the next sync")
                }
            }
        }
        map.clone()
    }
}

/// `fluxd debug`'s note on a `udp` service (None for others): relayed per flow, and how many
/// flows it has now.
pub fn debug_settings(route: &ServiceRoute, metrics: &Metrics) -> Option<String> {
    (route.protocol == crate::model::Protocol::Udp).then(|| {
        format!(
            "udp relay: {} flows open",
            metrics.udp.flows(&route.name).get()
        )
    })
}

/// A VIP being relayed.
struct Running {
    name: String,
    inputs: watch::Sender<Inputs>,
    task: JoinHandle<()>,
    /// Which nat socket it relays from (its address), if any: a new one means a new relay.
    redirected: Option<usize>,
}

/// The relay of every udp service: follows the plan, binding a socket for each new VIP and
/// closing those of VIPs that left.
pub struct UdpRelay {
    shared: Shared,
    metrics: Arc<Metrics>,
    plan: watch::Receiver<Arc<UdpPlan>>,
}

/// How often a VIP whose socket could not be bound is tried again.
const BIND_RETRY: Duration = Duration::from_secs(5);

impl UdpRelay {
    pub fn new(
        settings: UdpSettings,
        metrics: Arc<Metrics>,
        plan: watch::Receiver<Arc<UdpPlan>>,
    ) -> UdpRelay {
        UdpRelay {
            shared: Shared {
                budget: flows::Budget::new(settings.max_flows),
                idle: settings.idle,
                metrics: metrics.udp.clone(),
            },
            metrics,
            plan,
        }
    }

    /// Relays until `stop` fires; every socket is closed then.
    pub async fn run(mut self, stop: watch::Receiver<bool>) {
        let mut running: HashMap<SocketAddr, Running> = HashMap::new();
        let mut retry = tokio::time::interval(BIND_RETRY);
        let mut stopped = stop.clone();
        loop {
            let plan = self.plan.borrow_and_update().clone();
            self.follow(&plan, &mut running, &stop);
            tokio::select! {
                changed = self.plan.changed() => if changed.is_err() { break },
                _ = retry.tick() => {}
                _ = stopped.changed() => break,
            }
        }
        for (_, r) in running {
            r.task.abort();
        }
    }

    /// Brings the running relays level with `plan`.
    fn follow(
        &self,
        plan: &UdpPlan,
        running: &mut HashMap<SocketAddr, Running>,
        stop: &watch::Receiver<bool>,
    ) {
        running.retain(|vip, r| {
            let keep = plan.services.iter().any(|t| {
                t.vip == *vip
                    && t.route.name == r.name
                    && t.redirected.as_ref().map(|s| Arc::as_ptr(s) as usize) == r.redirected
            }) && !r.task.is_finished();
            if !keep {
                r.task.abort();
                self.metrics.udp.forget(&r.name);
                tracing::info!(service = %r.name, %vip, "udp relay closed");
            }
            keep
        });
        for t in &plan.services {
            let (vip, route) = (&t.vip, &t.route);
            let inputs = Inputs {
                route: route.clone(),
                ifaces: plan.ifaces.clone(),
            };
            if let Some(r) = running.get(vip) {
                r.inputs.send_if_modified(|old| {
                    let same =
                        Arc::ptr_eq(&old.route, &inputs.route) && old.ifaces == inputs.ifaces;
                    if !same {
                        *old = inputs.clone();
                    }
                    !same
                });
                continue;
            }
            let bound = match &t.redirected {
                Some(s) => s.try_clone().and_then(tokio::net::UdpSocket::from_std),
                None => socket::bind_service(*vip),
            };
            let socket = match bound {
                Ok(s) => s,
                Err(e) => {
                    // Retried every few seconds: said once a minute.
                    static WARN: crate::throttle::Throttle = crate::throttle::Throttle::new();
                    if WARN.check(crate::proxy::health::now_ms(), 60_000).is_some() {
                        tracing::warn!(service = %route.name, %vip, error = %e, "cannot bind the udp service's socket; retrying");
                    }
                    continue;
                }
            };
            tracing::info!(service = %route.name, %vip, "udp relay listening");
            let (tx, rx) = watch::channel(inputs);
            let task = tokio::spawn(relay::run(
                route.name.clone(),
                socket,
                t.redirected.is_some(),
                rx,
                self.shared.clone(),
                stop.clone(),
            ));
            running.insert(
                *vip,
                Running {
                    name: route.name.clone(),
                    inputs: tx,
                    task,
                    redirected: t.redirected.as_ref().map(|s| Arc::as_ptr(s) as usize),
                },
            );
        }
    }
}
