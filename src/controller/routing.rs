//! Turns the catalog's state into the proxy's routing table and the netfilter's desired rules.
//! Pure apart from reusing the health of instances that were already known.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::Arc;

use super::guard;
use crate::catalog::State;
use crate::docker::LocalInstances;
use crate::metrics::{InstanceLabels, InstanceMetrics, Metrics};
use crate::model::{Instance, Service};
use crate::model::{NetworkMode, Origin, Protocol};
use crate::proxy::health::Health;
use crate::proxy::http::pool::Pool;
use crate::proxy::route_table::{Backend, RouteTable, ServiceRoute};

/// What survives a rebuild of the routing table for one instance: its health and its series.
#[derive(Clone)]
pub struct Kept {
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
}

struct BuiltService {
    service: Arc<Service>,
    instances: Vec<Arc<Instance>>,
    route: Arc<ServiceRoute>,
    /// Health, series and pool of each routed instance, by name and address: health survives
    /// as long as the instance keeps its address; a new address is a new backend, live at first.
    kept: HashMap<(String, SocketAddrV4), Kept>,
}

/// Builds the table; instances that are gone have their series dropped from `metrics`.
pub fn route_table(state: &State, built: &mut Built, metrics: &Metrics) -> RouteTable {
    let mut table = RouteTable::default();
    let mut next = HashMap::with_capacity(state.services.len());
    for (name, service) in &state.services {
        let instances: Vec<&Arc<Instance>> = state.instance_records_of(name).collect();
        let b = match built.services.remove(name) {
            Some(prev) if same_records(&prev, service, &instances) => prev,
            prev => build_service(service, &instances, prev.map(|p| p.kept), metrics),
        };
        table.by_name.insert(name.clone(), b.route.clone());
        // A service without a VIP (edge only) is routed by name, for its health, but no
        // connection can arrive for it.
        if let Some(vip) = service.address {
            table.services.insert(vip, b.route.clone());
        }
        next.insert(name.clone(), b);
    }
    for gone in built.services.values() {
        for k in gone.kept.values() {
            metrics.forget(&k.labels);
        }
    }
    built.services = next;
    table
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
    old: Option<HashMap<(String, SocketAddrV4), Kept>>,
    metrics: &Metrics,
) -> BuiltService {
    let mut old = old.unwrap_or_default();
    let http = service.protocol == Protocol::Http;
    let mut kept = HashMap::new();
    let backends: Vec<Arc<Backend>> = instances
        .iter()
        .filter_map(|i| {
            let addr = i.address?;
            let key = (i.name.clone(), addr);
            let labels = labels_of(i);
            let k = match old.remove(&key) {
                Some(k) if k.labels == labels && k.metrics.http.is_some() == http => k,
                // Same labels with another protocol share the series (an http -> tcp change
                // leaves the per-request series until the instance goes).
                _ => Kept {
                    health: Arc::default(),
                    metrics: metrics.instance(&labels, http),
                    labels,
                    pool: Arc::default(),
                },
            };
            kept.insert(key, k.clone());
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
            }))
        })
        .collect();
    for k in old.values() {
        if !kept.values().any(|n| n.labels == k.labels) {
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
            .with_check(service.health.clone()),
        ),
        kept,
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
/// A `tcp` service with no backend in `routes` (no instance with an address, on any host) is
/// refused rather than redirected (`rejects`), when `reject_empty`: the proxy could only accept
/// its connections and reset them, while a refusal tells the client at once. An instance that
/// failed, or fails its active check, still counts: the proxy tries it as a last resort. An
/// `http` service is always redirected, so its clients get a `503` they can read.
pub fn desired_rules(
    state: &State,
    routes: &RouteTable,
    proxy_port: u16,
    bridge_interfaces: &[String],
    verdict: &guard::Verdict,
    reject_empty: bool,
) -> netfilter::Desired {
    let (rejects, redirects) = state
        .services
        .values()
        .filter(|s| verdict.allows(&s.name))
        .filter_map(|s| {
            // A service without a VIP (edge only) has nothing to redirect or refuse.
            let entry = netfilter::Redirect {
                service: s.name.clone(),
                vip: s.address?,
            };
            Some((has_no_instance(s, routes), entry))
        })
        .partition::<Vec<_>, _>(|(empty, _)| *empty);
    netfilter::Desired {
        redirects: redirects.into_iter().map(|(_, r)| r).collect(),
        rejects: rejects.into_iter().map(|(_, r)| r).collect(),
        reject_empty,
        proxy_port,
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

/// Whether `service` is a `tcp` service the proxy has no instance to send to.
fn has_no_instance(service: &Service, routes: &RouteTable) -> bool {
    service.protocol == Protocol::Tcp
        && routes
            .by_name
            .get(&service.name)
            .is_none_or(|route| route.backends.is_empty())
}

/// The catalog state with this host's container instances as the Docker agent sees them rather
/// than as the store last said: a local container is routable the moment the agent knows it,
/// even while the store is unreachable. Until the agent has listed Docker once, the store's
/// record stands. Other hosts' instances at addresses only their own host reaches are left out
/// (see `only_on_its_host`).
pub fn with_local(state: &State, host: &str, local: Option<&LocalInstances>) -> State {
    let mut merged = state.clone();
    merged.instances.retain(|_, i| {
        let replaced =
            local.is_some() && i.origin == Origin::Container && i.host.as_deref() == Some(host);
        !replaced && !only_on_its_host(state, host, i)
    });
    let Some(local) = local else {
        return merged;
    };
    for i in local.values() {
        if merged.services.contains_key(&i.service) {
            merged
                .instances
                .insert((i.service.clone(), i.name.clone()), Arc::new(i.clone()));
        }
    }
    merged
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
        (Some(addr), Some(h)) => h.network_mode == NetworkMode::Local && *addr.ip() != h.ip,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{decode, Balance, HealthCheck, Host};

    fn instance(name: &str, host: &str, address: &str) -> (String, String, Arc<Instance>) {
        let json = serde_json::json!({
            "service": "web", "name": name, "origin": "container", "host": host,
            "container": { "id": name, "name": name, "image": "i", "tag": "t" },
            "address": address,
        });
        let i: Instance = decode(json.to_string().as_bytes()).unwrap();
        ("web".into(), name.into(), Arc::new(i))
    }

    fn host(name: &str, ip: &str, mode: NetworkMode) -> Arc<Host> {
        Arc::new(Host {
            name: name.into(),
            ip: ip.parse().unwrap(),
            network_mode: mode,
            version: "0".into(),
            commit: None,
            started_at: 0,
            http: None,
        })
    }

    #[test]
    fn other_hosts_addresses_only_they_reach_are_not_routed_here() {
        let mut state = State::default();
        let web: Service = decode(br#"{"name":"web","address":"198.18.0.10:80"}"#).unwrap();
        state.services.insert("web".into(), Arc::new(web));
        state
            .hosts
            .insert("h1".into(), host("h1", "192.0.2.1", NetworkMode::Local));
        state
            .hosts
            .insert("h2".into(), host("h2", "192.0.2.2", NetworkMode::Local));
        state
            .hosts
            .insert("h3".into(), host("h3", "192.0.2.3", NetworkMode::Global));
        for (service, name, i) in [
            instance("mine", "h1", "127.0.0.1:49153"),
            instance("h2-lo", "h2", "127.0.0.1:49153"),
            instance("h2-bridge", "h2", "172.17.0.1:49154"),
            instance("h2-ok", "h2", "192.0.2.2:49155"),
            instance("h3-ok", "h3", "10.32.0.5:80"),
            instance("gone-host", "h4", "127.0.0.1:49156"),
        ] {
            state.instances.insert((service, name), i);
        }
        let names =
            |s: &State| -> Vec<String> { s.instances.keys().map(|(_, n)| n.clone()).collect() };
        // Before the agent's first listing this host's own record stands; after, its view.
        let merged = with_local(&state, "h1", None);
        assert_eq!(names(&merged), ["gone-host", "h2-ok", "h3-ok", "mine"]);
        let local = LocalInstances::new();
        let merged = with_local(&state, "h1", Some(&local));
        assert_eq!(names(&merged), ["gone-host", "h2-ok", "h3-ok"]);
    }

    fn service(name: &str, vip: &str, protocol: Protocol) -> Arc<Service> {
        Arc::new(Service {
            name: name.into(),
            address: Some(vip.parse().unwrap()),
            protocol,
            instance_port: None,
            balance: Balance::default(),
            health: None,
        })
    }

    /// A state with: `web` (one instance), `idle` (none), `nowhere` (a container with no
    /// address), `api` (an http service with none), `checked` (one instance failing its active
    /// check), `mine` (no instance, refused by the VIP guard).
    fn state() -> State {
        let mut state = State::default();
        for s in [
            service("web", "198.18.0.10:80", Protocol::Tcp),
            service("idle", "198.18.0.11:80", Protocol::Tcp),
            service("nowhere", "198.18.0.12:80", Protocol::Tcp),
            service("api", "198.18.0.13:80", Protocol::Http),
            service("checked", "198.18.0.14:80", Protocol::Tcp),
            service("mine", "198.18.0.15:80", Protocol::Tcp),
        ] {
            state.services.insert(s.name.clone(), s);
        }
        let mut add = |i: Instance| {
            state
                .instances
                .insert((i.service.clone(), i.name.clone()), Arc::new(i));
        };
        add(Instance::new_static(
            "web",
            "w1",
            "192.0.2.1:80".parse().unwrap(),
        ));
        add(Instance::new_static(
            "checked",
            "c1",
            "192.0.2.2:80".parse().unwrap(),
        ));
        add(Instance {
            address: None,
            ..Instance::new_static("nowhere", "n1", "192.0.2.3:80".parse().unwrap())
        });
        state
    }

    fn verdict() -> guard::Verdict {
        let mut verdict = guard::Verdict::default();
        verdict.refused.insert(
            "mine".into(),
            guard::RefusedVip {
                service: "mine".into(),
                vip: "198.18.0.15:80".parse().unwrap(),
                reason: "is 198.18.0.15, an address of g0".into(),
            },
        );
        verdict
    }

    fn names(entries: &[netfilter::Redirect]) -> Vec<&str> {
        let mut names: Vec<&str> = entries.iter().map(|r| r.service.as_str()).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn tcp_services_with_no_backend_are_refused() {
        let state = state();
        let table = route_table(&state, &mut Built::default(), &Metrics::new());
        // An instance failing its active check is still an instance (panic mode tries it).
        let check = HealthCheck {
            fall: 1,
            ..HealthCheck::tcp()
        };
        let checked = &table.by_name["checked"].backends[0];
        checked.health.check_started(&check);
        checked.health.check_result(&check, Err("refused".into()));
        checked.health.failed();
        assert!(checked.health.check_failing());

        let desired = desired_rules(&state, &table, 7171, &[], &verdict(), true);
        assert_eq!(names(&desired.rejects), ["idle", "nowhere"]);
        assert_eq!(names(&desired.redirects), ["api", "checked", "web"]);
        assert!(desired.reject_empty);
        let idle = desired
            .rejects
            .iter()
            .find(|r| r.service == "idle")
            .unwrap();
        assert_eq!(idle.vip, "198.18.0.11:80".parse().unwrap());

        // Rendered: the refused VIPs are flux-empty members, not flux-vips ones; the guard's
        // refusal gets neither.
        let rs = netfilter::render(&desired);
        assert_eq!(rs.empty_members().len(), 2);
        assert_eq!(rs.set_members().len(), 3);
        assert!(!rs
            .set_members()
            .iter()
            .chain(rs.empty_members())
            .any(|m| m.contains("flux:mine")));
    }

    #[test]
    fn without_refusals_every_allowed_service_is_listed_for_the_renderer() {
        let state = state();
        let table = route_table(&state, &mut Built::default(), &Metrics::new());
        let desired = desired_rules(&state, &table, 7171, &[], &verdict(), false);
        assert!(!desired.reject_empty);
        // Listed apart still; render redirects them since refusals are off.
        let rs = netfilter::render(&desired);
        assert_eq!(rs.set_members().len(), 5);
        assert!(rs.empty_members().is_empty() && rs.reject_rules().is_empty());
    }

    #[test]
    fn an_instance_arriving_or_leaving_moves_the_vip() {
        let mut state = state();
        let mut built = Built::default();
        let metrics = Metrics::new();
        state.instances.insert(
            ("idle".into(), "i1".into()),
            Arc::new(Instance::new_static(
                "idle",
                "i1",
                "192.0.2.9:80".parse().unwrap(),
            )),
        );
        let table = route_table(&state, &mut built, &metrics);
        let desired = desired_rules(&state, &table, 7171, &[], &verdict(), true);
        assert_eq!(names(&desired.rejects), ["nowhere"]);
        state
            .instances
            .remove(&("web".to_string(), "w1".to_string()));
        let table = route_table(&state, &mut built, &metrics);
        let desired = desired_rules(&state, &table, 7171, &[], &verdict(), true);
        assert_eq!(names(&desired.rejects), ["nowhere", "web"]);
    }
}
