//! Turns the catalog's state into the proxy's routing table and the netfilter's desired rules.
//! Pure apart from reusing the health of instances that were already known.

use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;

use super::guard;
use crate::catalog::State;
use crate::docker::LocalInstances;
use crate::metrics::{InstanceLabels, InstanceMetrics, Metrics};
use crate::model::{Forwarding, NetworkMode, Origin, Protocol};
use crate::model::{Instance, Service};
use crate::proxy::health::Health;
use crate::proxy::http::pool::Pool;
use crate::proxy::route_table::{Backend, RouteTable, ServiceRoute};

/// What survives a rebuild of the routing table for one instance: its health and its series.
/// Taken from the backend of the last route, so a built service holds nothing twice.
#[derive(Clone)]
struct Kept {
    pub health: Arc<Health>,
    pub metrics: InstanceMetrics,
    pub labels: InstanceLabels,
    /// Kept-alive connections of `http` services.
    pub pool: Arc<Pool>,
}

/// What the last table was built from, per service. A service whose record and instance
/// records are the very ones of the last build (the catalog shares unchanged records between
/// States) keeps its route as it was: one change among 10,000 services rebuilds one route,
/// not 10,000 (each costs a score of allocations, which a long-running daemon's heap makes
/// slow).
#[derive(Default)]
pub struct Built {
    services: HashMap<String, BuiltService>,
    /// This host's name, to tell its instances apart (locality).
    host: String,
}

impl Built {
    /// Builds for `host`; `Built::default()` has no host name (nothing is local but loopback).
    pub fn for_host(host: &str) -> Built {
        Built {
            services: HashMap::new(),
            host: host.to_string(),
        }
    }
}

struct BuiltService {
    service: Arc<Service>,
    instances: Vec<Arc<Instance>>,
    /// Rule weights, drain marks and this host's identity as of that build.
    traffic: super::traffic::Inputs,
    /// Its backends carry each routed instance's health, series and pool into the next
    /// build: health survives as long as the instance keeps its address; a new address is a
    /// new backend, live at first.
    route: Arc<ServiceRoute>,
}

/// Builds the table; instances that are gone have their series dropped from `metrics`.
pub fn route_table(state: &State, built: &mut Built, metrics: &Metrics) -> RouteTable {
    let mut names: BTreeSet<String> = state.services.keys().cloned().collect();
    names.extend(built.services.keys().cloned());
    let mut table = RouteTable::default();
    update_routes(state, &names, built, metrics, &mut table);
    table
}

/// Brings the routes of the services named in `changed` level with `state`, in `table` and
/// `built`, and leaves every other route as it is: what one change costs does not grow with
/// the number of services. A service whose record and instance records are the very ones of
/// its last build keeps its route.
pub fn update_routes(
    state: &State,
    changed: &BTreeSet<String>,
    built: &mut Built,
    metrics: &Metrics,
    table: &mut RouteTable,
) {
    for name in changed {
        let prev = built.services.remove(name);
        // The VIP the service had: dropped unless the service still has it (another service
        // may have taken it over in the same change; its own entry stands then).
        if let Some(vip) = prev.as_ref().and_then(|p| p.service.address) {
            let still = state.services.get(name).and_then(|s| s.address) == Some(vip);
            if !still && table.services.get(&vip).is_some_and(|r| r.name == *name) {
                table.services.remove(&vip);
            }
        }
        let Some(service) = state.services.get(name) else {
            if let Some(gone) = prev {
                for b in &gone.route.backends {
                    metrics.forget(&b.labels);
                }
            }
            if table.by_name.contains_key(name) {
                table.by_name.remove(name);
            }
            continue;
        };
        let instances: Vec<&Arc<Instance>> = state.instance_records_of(name).collect();
        let traffic = super::traffic::Inputs::of(state, name, &built.host);
        let b = match prev {
            Some(prev) if prev.traffic == traffic && same_records(&prev, service, &instances) => {
                prev
            }
            prev => build_service(service, &instances, traffic, prev.map(|p| p.route), metrics),
        };
        if !table
            .by_name
            .get(name)
            .is_some_and(|r| Arc::ptr_eq(r, &b.route))
        {
            table.by_name.insert(name.clone(), b.route.clone());
        }
        // A service without a VIP (edge only) is routed by name, for its health, but no
        // connection can arrive for it.
        if let Some(vip) = service.address {
            if !table
                .services
                .get(&vip)
                .is_some_and(|r| Arc::ptr_eq(r, &b.route))
            {
                table.services.insert(vip, b.route.clone());
            }
        }
        built.services.insert(name.clone(), b);
    }
}

fn same_records(prev: &BuiltService, service: &Arc<Service>, instances: &[&Arc<Instance>]) -> bool {
    Arc::ptr_eq(&prev.service, service)
        && prev.instances.len() == instances.len()
        && prev
            .instances
            .iter()
            .zip(instances)
            .all(|(a, b)| Arc::ptr_eq(a, b))
}

fn build_service(
    service: &Arc<Service>,
    instances: &[&Arc<Instance>],
    traffic: super::traffic::Inputs,
    old: Option<Arc<ServiceRoute>>,
    metrics: &Metrics,
) -> BuiltService {
    // Health, series and pool of each instance last routed, by name and address.
    let mut old: HashMap<(String, SocketAddr), Kept> = old
        .iter()
        .flat_map(|r| r.backends.iter())
        .map(|b| {
            let k = Kept {
                health: b.health.clone(),
                metrics: b.metrics.clone(),
                labels: b.labels.clone(),
                pool: b.pool.clone(),
            };
            ((b.instance.clone(), b.addr), k)
        })
        .collect();
    let http = service.protocol == Protocol::Http;
    let udp = service.protocol == Protocol::Udp;
    let backends: Vec<Arc<Backend>> = instances
        .iter()
        .filter_map(|i| {
            let addr = i.address?;
            let key = (i.name.clone(), addr);
            let labels = labels_of(i);
            let k = match old.remove(&key) {
                Some(k)
                    if k.labels == labels
                        && k.metrics.http.is_some() == http
                        && k.metrics.udp.is_some() == udp =>
                {
                    k
                }
                // Same labels with another protocol share the series (an http -> tcp change
                // leaves the per-request series until the instance goes).
                stale => {
                    // Series under labels the record no longer has (same name and address,
                    // another tag, say) are forgotten below, like those of instances that left.
                    old.extend(stale.map(|s| (key.clone(), s)));
                    Kept {
                        health: Arc::default(),
                        metrics: if udp {
                            metrics.udp_instance(&labels)
                        } else {
                            metrics.instance(&labels, http)
                        },
                        labels,
                        pool: Arc::default(),
                    }
                }
            };
            Some(Arc::new(Backend {
                service: i.service.clone(),
                instance: i.name.clone(),
                addr,
                health: k.health,
                metrics: k.metrics,
                labels: k.labels,
                extra: i
                    .container
                    .as_ref()
                    .map(|c| c.labels.clone())
                    .unwrap_or_default(),
                pool: k.pool,
                group: traffic.group(i),
                local: traffic.local(i),
                drained: traffic.drained(i),
            }))
        })
        .collect();
    for k in old.values() {
        if !backends.iter().any(|b| b.labels == k.labels) {
            metrics.forget(&k.labels);
        }
    }
    BuiltService {
        service: service.clone(),
        instances: instances.iter().map(|i| (*i).clone()).collect(),
        route: Arc::new(
            ServiceRoute::new(
                service.name.clone(),
                service.protocol,
                service.balance,
                backends,
            )
            .with_check(service.health.clone())
            .with_traffic(traffic.traffic(service))
            .with_tuning(
                service.timeouts,
                service.proxy_protocol.zip(service.address),
            )
            .with_instance_protocol(service.instance_protocol),
        ),
        traffic,
    }
}

fn labels_of(i: &Instance) -> InstanceLabels {
    let c = i.container.as_ref();
    InstanceLabels {
        service: i.service.clone(),
        instance: i.name.clone(),
        host: i.host.clone().unwrap_or_default(),
        image: c.map(|c| c.image.clone()).unwrap_or_default(),
        tag: c.map(|c| c.tag.clone()).unwrap_or_default(),
    }
}

/// The rules for `state`, leaving out what the VIP guard refused: a refused service gets no
/// set member (the proxy table may keep it, but no traffic reaches it), a refused VIP range no
/// rule (its VIPs then get set members like any VIP outside the ranges).
///
/// A `tcp` service with no backend in `routes` (no instance with an address, on any host), or
/// whose every backend is drained, is refused rather than redirected (`rejects`), when `reject_empty`: the proxy could only accept
/// its connections and reset them, while a refusal tells the client at once. An instance that
/// failed, or fails its active check, still counts: the proxy tries it as a last resort. An
/// `http` service is always redirected, so its clients get a `503` they can read.
///
/// A `--forward kernel` service with backends is forwarded by the kernel (`forwards`) to the
/// same backends the proxy would use, at the addresses they have from this host; see
/// [`forward_of`] for which take new connections.
pub fn desired_rules(
    state: &State,
    routes: &RouteTable,
    proxy_port: u16,
    bridge_interfaces: &[String],
    verdict: &guard::Verdict,
    reject_empty: bool,
) -> netfilter::Desired {
    let (mut redirects, mut rejects, mut forwards) = (Vec::new(), Vec::new(), Vec::new());
    for s in state.services.values().filter(|s| verdict.allows(&s.name)) {
        // A service without a VIP (edge only) has nothing to redirect or refuse; an IPv6 VIP
        // is the IPv6 rules' (`desired_v6`).
        let Some(SocketAddr::V4(vip)) = s.address else {
            continue;
        };
        let entry = netfilter::Redirect {
            service: s.name.clone(),
            vip,
        };
        if has_no_instance(s, routes) {
            rejects.push(entry);
        } else if let Some(forward) = forward_of(s, vip, routes) {
            forwards.push(forward);
        } else {
            redirects.push(entry);
        }
    }
    netfilter::Desired {
        redirects,
        rejects,
        forwards,
        reject_empty,
        proxy_port,
        // The controller adds them on the nat path, once their sockets' ports are known.
        udp_redirects: Vec::new(),
        bridge_interfaces: bridge_interfaces.to_vec(),
        vip_ranges: verdict
            .ranges
            .iter()
            .map(|n| netfilter::VipRange {
                addr: n.network(),
                prefix_len: n.prefix_len(),
            })
            .collect(),
    }
}

/// The kernel forwarding of `service`, if it is forwarded by the kernel: each backend of its
/// route as a destination. Those failing their active check are on standby (no new
/// connection, established ones kept), unless all are: then, as the proxy's panic mode does,
/// every one takes connections, since a check failing everywhere at once is more often the
/// check's fault than every instance's. Passive health (failed connects) is the proxy's
/// alone: the kernel never sees a connect fail.
fn forward_of(
    service: &Service,
    vip: SocketAddrV4,
    routes: &RouteTable,
) -> Option<netfilter::Forward> {
    if service.forward != Forwarding::Kernel {
        return None;
    }
    let route = routes.by_name.get(&service.name)?;
    // Drained instances (a mark, or their rule's weight 0) are on standby like those failing
    // their check, and never come back in panic mode: drain means no new connection.
    let panic = route
        .backends
        .iter()
        .filter(|b| route.takes_new(b))
        .all(|b| b.health.check_failing());
    Some(netfilter::Forward {
        service: service.name.clone(),
        vip,
        // The kernel cannot rewrite an IPv4 connection to an IPv6 instance: those are left out.
        destinations: route
            .backends
            .iter()
            .filter_map(|b| match b.addr {
                SocketAddr::V4(addr) => Some(netfilter::Destination {
                    instance: b.instance.clone(),
                    addr,
                    standby: !route.takes_new(b) || (!panic && b.health.check_failing()),
                }),
                SocketAddr::V6(_) => None,
            })
            .collect(),
    })
}

/// Whether `service` is a `tcp` service the proxy has no instance to send to: none at all, or
/// every one drained (by a mark or its rule's weight 0), since drain means no new connection.
pub(super) fn has_no_instance(service: &Service, routes: &RouteTable) -> bool {
    service.protocol == Protocol::Tcp
        && routes
            .by_name
            .get(&service.name)
            .is_none_or(|route| !route.backends.iter().any(|b| route.takes_new(b)))
}

/// The catalog state with this host's container instances as the Docker agent sees them rather
/// than as the store last said: a local container is routable the moment the agent knows it,
/// even while the store is unreachable. Until the agent has listed Docker once, the store's
/// record stands. Other hosts' instances at addresses only their own host reaches are left out
/// (see `only_on_its_host`). The controller keeps this level by patching (see
/// [`super::view::RoutedView`]); this is the same from scratch.
pub fn with_local(state: &State, host: &str, local: Option<&LocalInstances>) -> State {
    let records: Option<Vec<Arc<Instance>>> =
        local.map(|l| l.values().map(|i| Arc::new(i.clone())).collect());
    merge_local(state, host, records.as_deref())
}

/// [`with_local`] with the agent's instances already wrapped.
pub(super) fn merge_local(state: &State, host: &str, local: Option<&[Arc<Instance>]>) -> State {
    let mut merged = state.clone();
    let keeps = |i: &Instance| keeps_instance(state, host, local.is_some(), i);
    // Most often every record stands: the catalog's map is then shared, not copied.
    if !state.instances.values().all(|i| keeps(i)) {
        merged.instances = state
            .instances
            .iter()
            .filter(|(_, i)| keeps(i))
            .map(|(k, i)| (k.clone(), i.clone()))
            .collect();
    }
    for i in local.unwrap_or_default() {
        if merged.services.contains_key(&i.service) {
            merged
                .instances
                .insert((i.service.clone(), i.name.clone()), i.clone());
        }
    }
    merged
}

/// Whether a catalog instance is routed as the store has it: not when it is one of this host's
/// containers and the agent's view (`local`) stands in for those, nor when only its own host
/// can reach it.
pub(super) fn keeps_instance(state: &State, host: &str, local: bool, i: &Instance) -> bool {
    let replaced = local && i.origin == Origin::Container && i.host.as_deref() == Some(host);
    !replaced && !only_on_its_host(state, host, i)
}

/// A container instance of another host in `local` mode at an address other than that host's
/// IP: its agent used a port published only on, say, 127.0.0.1 there, believing itself the only
/// host, and rewrites the record as `no address` once it sees this host. Until then, connecting
/// to that address from here would reach whatever listens at it on this host.
fn only_on_its_host(state: &State, own: &str, i: &Instance) -> bool {
    if i.origin != Origin::Container {
        return false;
    }
    let Some(name) = i.host.as_deref().filter(|h| *h != own) else {
        return false;
    };
    match (i.address, state.hosts.get(name)) {
        (Some(addr), Some(h)) => h.network_mode == NetworkMode::Local && addr.ip() != h.ip,
        _ => false,
    }
}

#[cfg(test)]
#[path = "routing_tests.rs"]
mod tests;
