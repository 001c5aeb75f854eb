//! Routing in the style of kube-proxy's proxier tests: each case builds a catalog `State` with
//! the small builders below, runs it through `route_table`, `desired_rules` and
//! `netfilter::render`, and compares the whole output with the expected text: every route (by
//! VIP, the same one by name) with its backends in order, every rule of the services chain,
//! every set member and every hook.
//!
//! The last part checks what `Built` keeps between rebuilds: routes, health and series.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{desired_rules, route_table, with_local, Built};
use crate::catalog::{Decoded, State};
use crate::controller::guard::{Addresses, Verdict};
use crate::docker::LocalInstances;
use crate::metrics::{InstanceLabels, Metrics};
use crate::model::{
    self, Balance, ContainerInfo, HealthCheck, Host, Instance, Origin, Protocol, Rule, Selector,
    Service,
};
use crate::proxy::route_table::{Backend, RouteTable, ServiceRoute};
use crate::store::KeyValue;

/// fluxd's proxy port in every case.
const PROXY_PORT: u16 = 7171;

/// The host the data plane under test runs on.
const THIS_HOST: &str = "host-a";

/// The rule that sends every member of the VIP set to the proxy.
const SET_RULE: &str = r#"-A FLUX-SERVICES -p tcp -m set --match-set flux-vips dst,dst -m comment --comment "flux vips" -j REDIRECT --to-ports 7171"#;

/// The rule of the VIP range `198.18.0.0/16`.
const RANGE_RULE: &str = r#"-A FLUX-SERVICES -d 198.18.0.0/16 -p tcp -m comment --comment "flux vip range" -j REDIRECT --to-ports 7171"#;

/// The hooks with `--bridge-interfaces docker0`, the same in every case.
const HOOKS: [&str; 2] = [
    r#"-A OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES"#,
    r#"-A PREROUTING -i docker0 -m comment --comment "flux hook" -j FLUX-SERVICES"#,
];

// ---------------------------------------------------------------------------------------------
// Builders

/// A `tcp`, round-robin service without an active check.
fn service(name: &str, vip: &str) -> Service {
    Service {
        name: name.into(),
        address: Some(vip.parse().expect("test VIPs are valid")),
        protocol: Protocol::Tcp,
        instance_port: None,
        balance: Balance::RoundRobin,
        health: None,
        forward: Default::default(),
        locality: Default::default(),
        affinity: Default::default(),
        timeouts: Default::default(),
        proxy_protocol: None,
        instance_protocol: None,
    }
}

fn static_instance(service: &str, name: &str, address: &str) -> Instance {
    Instance::new_static(
        service,
        name,
        address.parse().expect("test addresses are valid"),
    )
}

/// A container instance that `host`'s agent enrolled with rule `v1`; no address is the
/// `no address` state.
fn container(service: &str, id: &str, host: &str, address: Option<&str>) -> Instance {
    Instance {
        service: service.into(),
        name: id.into(),
        origin: Origin::Container,
        host: Some(host.into()),
        rule: Some("v1".into()),
        container: Some(ContainerInfo {
            id: id.into(),
            name: format!("{service}-{id}"),
            image: "registry.example/shop".into(),
            tag: "v1".into(),
            labels: BTreeMap::from([("team".into(), "shop".into())]),
            address_note: None,
        }),
        address: address.map(|a| a.parse().expect("test addresses are valid")),
    }
}

fn rule(service: &str, name: &str, image: &str) -> Rule {
    Rule {
        service: service.into(),
        name: name.into(),
        selector: Selector {
            image: Some(image.into()),
            ..Selector::default()
        },
        instance_port: None,
        weight: None,
    }
}

fn host(name: &str, ip: &str) -> Host {
    Host {
        name: name.into(),
        ip: ip.parse().expect("test addresses are valid"),
        network_mode: Default::default(),
        version: "test".into(),
        commit: None,
        started_at: 0,
        http: None,
    }
}

/// A catalog state, one record at a time.
#[derive(Default)]
struct StateBuilder(State);

fn state() -> StateBuilder {
    StateBuilder::default()
}

impl StateBuilder {
    fn service(mut self, s: Service) -> Self {
        self.0.services.insert(s.name.clone(), Arc::new(s));
        self
    }

    fn rule(mut self, r: Rule) -> Self {
        self.0
            .rules
            .insert((r.service.clone(), r.name.clone()), Arc::new(r));
        self
    }

    fn instance(mut self, i: Instance) -> Self {
        self.0
            .instances
            .insert((i.service.clone(), i.name.clone()), Arc::new(i));
        self
    }

    fn host(mut self, h: Host) -> Self {
        self.0.hosts.insert(h.name.clone(), Arc::new(h));
        self
    }

    fn build(self) -> State {
        self.0
    }
}

/// The guard's verdict on `state` for a host whose own addresses are `own`, with `vip_ranges`
/// as its `--vip-range`s and no protected range.
fn judge(state: &State, vip_ranges: &[&str], own: &[&str]) -> Verdict {
    let ranges: Vec<_> = vip_ranges
        .iter()
        .map(|r| r.parse().expect("test ranges are valid"))
        .collect();
    let own = Addresses::new(
        own.iter()
            .map(|a| {
                let ip = a.parse().expect("test addresses are valid");
                (ip, "an address of eth0".to_string())
            })
            .collect(),
    );
    Verdict::judge(
        state
            .services
            .values()
            .filter_map(|s| Some((s.name.as_str(), s.address?))),
        &ranges,
        &own,
        &[],
    )
}

/// The verdict of a host that refuses nothing and has no VIP range.
fn allow_all(state: &State) -> Verdict {
    judge(state, &[], &[])
}

// ---------------------------------------------------------------------------------------------
// The whole output

/// Everything routing produces for one state, as text.
#[derive(Debug, PartialEq, Eq)]
struct Routing {
    /// `describe`'s lines: one route per VIP, sorted by VIP.
    routes: Vec<String>,
    service_rules: Vec<String>,
    set_members: Vec<String>,
    hooks: Vec<String>,
}

/// Routes `state` from scratch on a host that bridges `docker0`.
fn routing(state: &State, verdict: &Verdict) -> Routing {
    let table = route_table(state, &mut Built::default(), &Metrics::new());
    // Refusals off: every allowed VIP is a member of flux-vips, as before they existed (the
    // `refusals` module below covers them).
    let desired = desired_rules(
        state,
        &table,
        PROXY_PORT,
        &["docker0".to_string()],
        verdict,
        false,
    );
    let rules = netfilter::render(&desired);
    // A state the catalog accepted never asks for a rule that render refuses.
    assert_eq!(rules.rejected(), [], "nothing is rejected");
    Routing {
        routes: describe(&table),
        service_rules: rules.service_rules().to_vec(),
        set_members: rules.set_members().to_vec(),
        hooks: rules.hooks().to_vec(),
    }
}

fn lines(l: &[&str]) -> Vec<String> {
    l.iter().map(|s| s.to_string()).collect()
}

/// The set member of one VIP, as `ipset save` prints it.
fn member(vip: &str, service: &str) -> String {
    let (ip, port) = vip.split_once(':').expect("IP:PORT");
    format!(r#"add flux-vips {ip},tcp:{port} comment "flux:{service}""#)
}

/// The table as text, one line per route sorted by VIP:
/// `VIP NAME PROTOCOL BALANCE, CHECK -> [INSTANCE ADDRESS, ...]`. Checks on the way that the
/// very same routes are indexed by name, and that every backend belongs to its route's service.
fn describe(table: &RouteTable) -> Vec<String> {
    assert_eq!(
        table.by_name.len(),
        table.services.len(),
        "every route is indexed once by VIP and once by name"
    );
    let mut by_vip: Vec<_> = table.services.iter().collect();
    by_vip.sort_by_key(|(vip, _)| **vip);
    by_vip
        .into_iter()
        .map(|(vip, route)| {
            let by_name = &table.by_name[&route.name];
            assert!(Arc::ptr_eq(by_name, route), "{}: one route", route.name);
            let check = route
                .check
                .as_ref()
                .map_or("no check".to_string(), HealthCheck::describe);
            let backends: Vec<String> = route
                .backends
                .iter()
                .map(|b| {
                    assert_eq!(b.service, route.name, "{} in its own service", b.instance);
                    format!("{} {}", b.instance, b.addr)
                })
                .collect();
            format!(
                "{vip} {} {} {}, {check} -> [{}]",
                route.name,
                route.protocol,
                route.balance,
                backends.join(", ")
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Catalog state -> routes and rules

#[test]
fn a_service_routes_to_its_instances_that_have_an_address() {
    let state = state()
        .service(service("web", "198.18.0.10:80"))
        .instance(static_instance("web", "vm-1", "192.0.2.7:80"))
        .instance(container("web", "c1", "host-a", Some("10.0.0.1:32768")))
        .instance(container("web", "c2", "host-b", None))
        .instance(container("web", "c3", "host-b", Some("10.0.0.2:32770")))
        .build();
    assert_eq!(
        routing(&state, &allow_all(&state)),
        Routing {
            routes: lines(&[
                "198.18.0.10:80 web tcp round-robin, no check -> [c1 10.0.0.1:32768, c3 10.0.0.2:32770, vm-1 192.0.2.7:80]"
            ]),
            service_rules: lines(&[SET_RULE]),
            set_members: vec![member("198.18.0.10:80", "web")],
            hooks: lines(&HOOKS),
        }
    );
}

#[test]
fn a_service_without_instances_is_routed_to_no_backend() {
    // A rule enrols nothing by itself (the agents do), and hosts route nothing.
    let state = state()
        .service(service("web", "198.18.0.10:80"))
        .rule(rule("web", "v1", "nginx"))
        .host(host("host-a", "192.0.2.1"))
        .build();
    assert_eq!(
        routing(&state, &allow_all(&state)),
        Routing {
            routes: lines(&["198.18.0.10:80 web tcp round-robin, no check -> []"]),
            service_rules: lines(&[SET_RULE]),
            set_members: vec![member("198.18.0.10:80", "web")],
            hooks: lines(&HOOKS),
        }
    );
}

#[test]
fn an_empty_catalog_still_hooks_and_keeps_the_set_rule() {
    let state = state().build();
    assert_eq!(
        routing(&state, &allow_all(&state)),
        Routing {
            routes: vec![],
            service_rules: lines(&[SET_RULE]),
            set_members: vec![],
            hooks: lines(&HOOKS),
        }
    );
}

#[test]
fn instances_route_only_to_their_own_service() {
    // `web-2` sorts right after `web`: its instances must not spill into web's route.
    let state = state()
        .service(service("web", "198.18.0.10:80"))
        .service(service("web-2", "198.18.0.11:80"))
        .service(service("api", "198.18.0.12:80"))
        .instance(static_instance("web", "a", "192.0.2.1:80"))
        .instance(static_instance("web-2", "b", "192.0.2.2:80"))
        .instance(static_instance("api", "c", "192.0.2.3:80"))
        .build();
    assert_eq!(
        routing(&state, &allow_all(&state)),
        Routing {
            routes: lines(&[
                "198.18.0.10:80 web tcp round-robin, no check -> [a 192.0.2.1:80]",
                "198.18.0.11:80 web-2 tcp round-robin, no check -> [b 192.0.2.2:80]",
                "198.18.0.12:80 api tcp round-robin, no check -> [c 192.0.2.3:80]",
            ]),
            service_rules: lines(&[SET_RULE]),
            set_members: vec![
                member("198.18.0.10:80", "web"),
                member("198.18.0.11:80", "web-2"),
                member("198.18.0.12:80", "api"),
            ],
            hooks: lines(&HOOKS),
        }
    );
}

#[test]
fn each_route_has_its_services_protocol() {
    let state = state()
        .service(Service {
            protocol: Protocol::Http,
            ..service("api", "198.18.0.11:8080")
        })
        .service(service("db", "198.18.0.12:5432"))
        .instance(static_instance("api", "a1", "192.0.2.1:8080"))
        .instance(static_instance("db", "d1", "192.0.2.2:5432"))
        .build();
    assert_eq!(
        routing(&state, &allow_all(&state)),
        Routing {
            routes: lines(&[
                "198.18.0.11:8080 api http round-robin, no check -> [a1 192.0.2.1:8080]",
                "198.18.0.12:5432 db tcp round-robin, no check -> [d1 192.0.2.2:5432]",
            ]),
            service_rules: lines(&[SET_RULE]),
            set_members: vec![
                member("198.18.0.11:8080", "api"),
                member("198.18.0.12:5432", "db"),
            ],
            hooks: lines(&HOOKS),
        }
    );
    // Only the backends of the http service get per-request series.
    let table = route_table(&state, &mut Built::default(), &Metrics::new());
    let http_series = |name: &str| table.by_name[name].backends[0].metrics.http.is_some();
    assert!(http_series("api"));
    assert!(!http_series("db"));
}

#[test]
fn the_balance_policy_and_the_health_check_are_carried_to_the_route() {
    let state = state()
        .service(Service {
            balance: Balance::LeastConn,
            health: Some(HealthCheck {
                interval_ms: 500,
                timeout_ms: 100,
                fall: 2,
                rise: 5,
                ..HealthCheck::http("/healthz")
            }),
            ..service("api", "198.18.0.11:80")
        })
        .service(Service {
            balance: Balance::Random,
            health: Some(HealthCheck::tcp()),
            ..service("db", "198.18.0.12:5432")
        })
        .build();
    assert_eq!(
        routing(&state, &allow_all(&state)),
        Routing {
            routes: lines(&[
                "198.18.0.11:80 api tcp least-conn, http GET /healthz every 500ms, timeout 100ms, fall 2, rise 5 -> []",
                "198.18.0.12:5432 db tcp random, tcp connect every 2s, timeout 1s, fall 3, rise 2 -> []",
            ]),
            service_rules: lines(&[SET_RULE]),
            set_members: vec![
                member("198.18.0.11:80", "api"),
                member("198.18.0.12:5432", "db"),
            ],
            hooks: lines(&HOOKS),
        }
    );
}

#[test]
fn a_vip_refused_by_the_guard_keeps_its_route_but_gets_no_member() {
    let state = state()
        .service(service("web", "198.18.0.10:80"))
        .service(service("shadow", "10.0.0.5:80"))
        .instance(static_instance("shadow", "s1", "192.0.2.9:80"))
        .build();
    let verdict = judge(&state, &[], &["10.0.0.5"]);
    assert_eq!(
        verdict.refused.keys().collect::<Vec<_>>(),
        ["shadow"],
        "the case is what it says"
    );
    assert_eq!(
        routing(&state, &verdict),
        Routing {
            // Still routed: the proxy table may keep it, no traffic reaches it.
            routes: lines(&[
                "10.0.0.5:80 shadow tcp round-robin, no check -> [s1 192.0.2.9:80]",
                "198.18.0.10:80 web tcp round-robin, no check -> []",
            ]),
            service_rules: lines(&[SET_RULE]),
            set_members: vec![member("198.18.0.10:80", "web")],
            hooks: lines(&HOOKS),
        }
    );
}

#[test]
fn a_vip_inside_a_vip_range_gets_no_member_and_the_range_gets_a_rule() {
    let state = state()
        .service(service("web", "198.18.0.10:80"))
        .service(service("legacy", "10.128.0.1:80"))
        .build();
    assert_eq!(
        routing(&state, &judge(&state, &["198.18.0.0/16"], &[])),
        Routing {
            routes: lines(&[
                "10.128.0.1:80 legacy tcp round-robin, no check -> []",
                "198.18.0.10:80 web tcp round-robin, no check -> []",
            ]),
            // The set rule first, for the VIP outside the range.
            service_rules: lines(&[SET_RULE, RANGE_RULE]),
            set_members: vec![member("10.128.0.1:80", "legacy")],
            hooks: lines(&HOOKS),
        }
    );
}

#[test]
fn with_every_vip_inside_a_vip_range_the_set_rule_is_left_out() {
    let state = state()
        .service(service("web", "198.18.0.10:80"))
        .service(service("api", "198.18.7.1:443"))
        .build();
    assert_eq!(
        routing(&state, &judge(&state, &["198.18.0.0/16"], &[])),
        Routing {
            routes: lines(&[
                "198.18.0.10:80 web tcp round-robin, no check -> []",
                "198.18.7.1:443 api tcp round-robin, no check -> []",
            ]),
            service_rules: lines(&[RANGE_RULE]),
            set_members: vec![],
            hooks: lines(&HOOKS),
        }
    );
}

#[test]
fn a_refused_vip_range_gets_no_rule_and_its_safe_vips_fall_back_to_members() {
    // 198.18.0.1 is this host's own address: the range's rule would capture it.
    let state = state()
        .service(service("web", "198.18.0.10:80"))
        .service(service("shadow", "198.18.0.1:80"))
        .build();
    let verdict = judge(&state, &["198.18.0.0/16"], &["198.18.0.1"]);
    assert_eq!(verdict.ranges, [], "the case is what it says");
    assert_eq!(
        routing(&state, &verdict),
        Routing {
            routes: lines(&[
                "198.18.0.1:80 shadow tcp round-robin, no check -> []",
                "198.18.0.10:80 web tcp round-robin, no check -> []",
            ]),
            service_rules: lines(&[SET_RULE]),
            set_members: vec![member("198.18.0.10:80", "web")],
            hooks: lines(&HOOKS),
        }
    );
}

#[test]
fn a_backend_carries_the_labels_of_its_series_and_its_containers_labels() {
    let state = state()
        .service(service("web", "198.18.0.10:80"))
        .instance(static_instance("web", "vm-1", "192.0.2.7:80"))
        .instance(container("web", "c1", "host-b", Some("10.0.0.1:32768")))
        .build();
    let table = route_table(&state, &mut Built::default(), &Metrics::new());
    let backends = &table.by_name["web"].backends;
    let labels = |b: &Backend| (b.labels.clone(), b.extra.clone());
    assert_eq!(
        backends.iter().map(|b| labels(b)).collect::<Vec<_>>(),
        [
            (
                InstanceLabels {
                    service: "web".into(),
                    instance: "c1".into(),
                    host: "host-b".into(),
                    image: "registry.example/shop".into(),
                    tag: "v1".into(),
                },
                BTreeMap::from([("team".to_string(), "shop".to_string())]),
            ),
            (
                InstanceLabels {
                    service: "web".into(),
                    instance: "vm-1".into(),
                    host: String::new(),
                    image: String::new(),
                    tag: String::new(),
                },
                BTreeMap::new(),
            ),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// with_local: this host's containers as the Docker agent sees them

/// The agent's view: instances by store key, as the agent publishes them.
fn local(instances: Vec<Instance>) -> LocalInstances {
    instances
        .into_iter()
        .map(|i| (crate::catalog::keys::instance(&i.service, &i.name), i))
        .collect()
}

/// The state's instances as text: `SERVICE/NAME ORIGIN HOST ADDRESS`.
fn instances(state: &State) -> Vec<String> {
    state
        .instances
        .values()
        .map(|i| {
            format!(
                "{}/{} {:?} {} {}",
                i.service,
                i.name,
                i.origin,
                i.host.as_deref().unwrap_or("-"),
                i.address
                    .map_or("no-address".to_string(), |a| a.to_string()),
            )
        })
        .collect()
}

#[test]
fn with_local_puts_the_agents_view_in_place_of_this_hosts_containers() {
    let store = state()
        .service(service("web", "198.18.0.10:80"))
        .instance(container("web", "c1", THIS_HOST, Some("10.0.0.1:32768")))
        .instance(container("web", "c2", THIS_HOST, Some("10.0.0.1:32769")))
        .instance(container("web", "c3", "host-b", Some("10.0.0.2:32768")))
        .instance(static_instance("web", "vm-1", "192.0.2.7:80"))
        .build();
    let agent = local(vec![
        // c1 got another port since the store last heard; c2 stopped; c4 started.
        container("web", "c1", THIS_HOST, Some("10.0.0.1:40000")),
        container("web", "c4", THIS_HOST, None),
        // A service the catalog no longer has.
        container("gone", "c5", THIS_HOST, Some("10.0.0.1:32770")),
    ]);
    let merged = with_local(&store, THIS_HOST, Some(&agent));
    assert_eq!(
        instances(&merged),
        [
            "web/c1 Container host-a 10.0.0.1:40000",
            "web/c3 Container host-b 10.0.0.2:32768",
            "web/c4 Container host-a no-address",
            "web/vm-1 Static - 192.0.2.7:80",
        ]
    );
    // What is not this host's is the store's very record, so it keeps its route.
    for key in [("web", "c3"), ("web", "vm-1")] {
        let key = (key.0.to_string(), key.1.to_string());
        assert!(Arc::ptr_eq(&merged.instances[&key], &store.instances[&key]));
    }
    assert!(Arc::ptr_eq(&merged.services["web"], &store.services["web"]));
}

#[test]
fn with_local_and_no_container_on_this_host_leaves_only_the_others() {
    let store = state()
        .service(service("web", "198.18.0.10:80"))
        .instance(container("web", "c1", THIS_HOST, Some("10.0.0.1:32768")))
        .instance(container("web", "c3", "host-b", Some("10.0.0.2:32768")))
        .build();
    let merged = with_local(&store, THIS_HOST, Some(&LocalInstances::new()));
    assert_eq!(
        instances(&merged),
        ["web/c3 Container host-b 10.0.0.2:32768"]
    );
}

#[test]
fn with_local_before_the_agent_listed_docker_keeps_the_stores_records() {
    let store = state()
        .service(service("web", "198.18.0.10:80"))
        .instance(container("web", "c1", THIS_HOST, Some("10.0.0.1:32768")))
        .instance(container("web", "c3", "host-b", Some("10.0.0.2:32768")))
        .build();
    let merged = with_local(&store, THIS_HOST, None);
    assert_eq!(
        instances(&merged),
        [
            "web/c1 Container host-a 10.0.0.1:32768",
            "web/c3 Container host-b 10.0.0.2:32768",
        ]
    );
    for (key, record) in &store.instances {
        assert!(Arc::ptr_eq(&merged.instances[key], record));
    }
}

// ---------------------------------------------------------------------------------------------
// Rebuilds: what `Built` keeps

/// A web service with two static instances and an api service with one.
fn two_services() -> State {
    state()
        .service(service("web", "198.18.0.10:80"))
        .service(service("api", "198.18.0.11:80"))
        .instance(static_instance("web", "w1", "192.0.2.1:80"))
        .instance(static_instance("web", "w2", "192.0.2.2:80"))
        .instance(static_instance("api", "a1", "192.0.2.3:80"))
        .build()
}

/// `state` with one instance record replaced (or added): a new allocation, as the catalog
/// makes for a record whose revision moved; every other record is shared.
fn with_instance(state: &State, i: Instance) -> State {
    let mut next = state.clone();
    next.instances
        .insert((i.service.clone(), i.name.clone()), Arc::new(i));
    next
}

fn without_instance(state: &State, service: &str, name: &str) -> State {
    let mut next = state.clone();
    next.instances
        .remove(&(service.to_string(), name.to_string()));
    next
}

fn route<'a>(table: &'a RouteTable, service: &str) -> &'a Arc<ServiceRoute> {
    &table.by_name[service]
}

fn backend<'a>(table: &'a RouteTable, service: &str, instance: &str) -> &'a Arc<Backend> {
    route(table, service)
        .backends
        .iter()
        .find(|b| b.instance == instance)
        .expect("the instance is routed")
}

#[test]
fn an_unchanged_service_keeps_the_very_same_route_across_rebuilds() {
    let (metrics, mut built) = (Metrics::new(), Built::default());
    let state = two_services();
    let first = route_table(&state, &mut built, &metrics);
    // The same records again, whether the same State or a copy sharing them.
    let again = route_table(&state, &mut built, &metrics);
    let copy = route_table(&state.clone(), &mut built, &metrics);
    for table in [&again, &copy] {
        for name in ["web", "api"] {
            assert!(
                Arc::ptr_eq(route(&first, name), route(table, name)),
                "{name}"
            );
        }
        assert_eq!(describe(table), describe(&first));
    }
}

#[test]
fn a_changed_instance_rebuilds_only_its_own_service() {
    let (metrics, mut built) = (Metrics::new(), Built::default());
    let state = two_services();
    let before = route_table(&state, &mut built, &metrics);
    let state = with_instance(&state, static_instance("api", "a1", "192.0.2.9:80"));
    let after = route_table(&state, &mut built, &metrics);
    assert!(Arc::ptr_eq(route(&before, "web"), route(&after, "web")));
    assert!(!Arc::ptr_eq(route(&before, "api"), route(&after, "api")));
    assert_eq!(
        describe(&after),
        [
            "198.18.0.10:80 web tcp round-robin, no check -> [w1 192.0.2.1:80, w2 192.0.2.2:80]",
            "198.18.0.11:80 api tcp round-robin, no check -> [a1 192.0.2.9:80]",
        ]
    );
}

#[test]
fn a_store_change_to_one_record_rebuilds_only_the_route_it_belongs_to() {
    // The same through the catalog: its cache shares the records that did not change.
    fn kv(key: String, value: Vec<u8>, rev: i64) -> KeyValue {
        KeyValue {
            key,
            value,
            create_revision: rev,
            mod_revision: rev,
        }
    }
    let skey = crate::catalog::keys::service;
    let ikey = crate::catalog::keys::instance;
    let web = service("web", "198.18.0.10:80");
    let api = service("api", "198.18.0.11:80");
    let w1 = static_instance("web", "w1", "192.0.2.1:80");
    let mut kvs = vec![
        kv(skey("web"), model::encode(&web), 1),
        kv(skey("api"), model::encode(&api), 2),
        kv(ikey("web", "w1"), model::encode(&w1), 3),
    ];
    let (metrics, mut built, mut cache) = (Metrics::new(), Built::default(), Decoded::default());
    let state = State::from_kvs(kvs.iter(), 3, &mut cache);
    let before = route_table(&state, &mut built, &metrics);
    let a1 = static_instance("api", "a1", "192.0.2.3:80");
    kvs.push(kv(ikey("api", "a1"), model::encode(&a1), 4));
    let state = State::from_kvs(kvs.iter(), 4, &mut cache);
    let after = route_table(&state, &mut built, &metrics);
    assert!(Arc::ptr_eq(route(&before, "web"), route(&after, "web")));
    assert!(!Arc::ptr_eq(route(&before, "api"), route(&after, "api")));
    assert_eq!(
        describe(&after),
        [
            "198.18.0.10:80 web tcp round-robin, no check -> [w1 192.0.2.1:80]",
            "198.18.0.11:80 api tcp round-robin, no check -> [a1 192.0.2.3:80]",
        ]
    );
}

#[test]
fn an_instance_that_keeps_its_name_and_address_keeps_its_health() {
    let (metrics, mut built) = (Metrics::new(), Built::default());
    let state = two_services();
    let before = route_table(&state, &mut built, &metrics);
    backend(&before, "web", "w1").health.failed();
    // Another instance joins: web's route is rebuilt, w1 is the same backend as before.
    let state = with_instance(&state, static_instance("web", "w3", "192.0.2.4:80"));
    let after = route_table(&state, &mut built, &metrics);
    assert!(!Arc::ptr_eq(route(&before, "web"), route(&after, "web")));
    let w1 = backend(&after, "web", "w1");
    assert!(Arc::ptr_eq(
        &backend(&before, "web", "w1").health,
        &w1.health
    ));
    assert!(
        !w1.health.is_live(),
        "the failure recorded before is still there"
    );
    assert!(backend(&after, "web", "w3").health.is_live());
}

#[test]
fn an_instance_at_a_new_address_starts_with_fresh_health() {
    let (metrics, mut built) = (Metrics::new(), Built::default());
    let state = two_services();
    let before = route_table(&state, &mut built, &metrics);
    backend(&before, "web", "w1").health.failed();
    let state = with_instance(&state, static_instance("web", "w1", "192.0.2.99:80"));
    let after = route_table(&state, &mut built, &metrics);
    let w1 = backend(&after, "web", "w1");
    assert_eq!(w1.addr.to_string(), "192.0.2.99:80");
    assert!(!Arc::ptr_eq(
        &backend(&before, "web", "w1").health,
        &w1.health
    ));
    assert!(
        w1.health.is_live(),
        "a new address is a new backend, live at first"
    );
}

/// The lines of the metrics export about `instance` of `service`.
fn series_of(metrics: &Metrics, service: &str, instance: &str) -> Vec<String> {
    let labels = format!(r#"service="{service}",instance="{instance}""#);
    metrics
        .encode()
        .lines()
        .filter(|l| l.contains(&labels))
        .map(String::from)
        .collect()
}

/// The value of `flux_connections_total` for `instance` of `service`, if it has the series.
fn connections(metrics: &Metrics, service: &str, instance: &str) -> Option<String> {
    series_of(metrics, service, instance)
        .into_iter()
        .find(|l| l.starts_with("flux_connections_total{"))
        .and_then(|l| l.rsplit(' ').next().map(String::from))
}

#[test]
fn the_series_of_removed_instances_and_services_are_forgotten() {
    let (metrics, mut built) = (Metrics::new(), Built::default());
    let state = two_services();
    route_table(&state, &mut built, &metrics);
    for (service, instance) in [("web", "w1"), ("web", "w2"), ("api", "a1")] {
        assert!(
            !series_of(&metrics, service, instance).is_empty(),
            "{instance} has series while routed"
        );
    }
    // An instance leaves.
    let state = without_instance(&state, "web", "w2");
    route_table(&state, &mut built, &metrics);
    assert_eq!(series_of(&metrics, "web", "w2"), Vec::<String>::new());
    assert!(!series_of(&metrics, "web", "w1").is_empty());
    // A whole service leaves.
    let mut state = state;
    state.services.remove("api");
    state.instances = state
        .instances
        .without(&("api".to_string(), "a1".to_string()));
    route_table(&state, &mut built, &metrics);
    assert_eq!(series_of(&metrics, "api", "a1"), Vec::<String>::new());
    assert!(!series_of(&metrics, "web", "w1").is_empty());
}

#[test]
fn an_instance_that_moves_keeps_counting_in_its_series() {
    let (metrics, mut built) = (Metrics::new(), Built::default());
    let state = two_services();
    let before = route_table(&state, &mut built, &metrics);
    backend(&before, "web", "w1").metrics.connections.inc();
    let state = with_instance(&state, static_instance("web", "w1", "192.0.2.99:80"));
    let after = route_table(&state, &mut built, &metrics);
    backend(&after, "web", "w1").metrics.connections.inc();
    assert_eq!(connections(&metrics, "web", "w1").as_deref(), Some("2"));
}

#[test]
fn a_service_that_turns_http_keeps_its_instances_series_and_adds_per_request_ones() {
    let (metrics, mut built) = (Metrics::new(), Built::default());
    let state = two_services();
    let before = route_table(&state, &mut built, &metrics);
    backend(&before, "web", "w1").metrics.connections.inc();
    let mut state = state;
    state.services.insert(
        "web".into(),
        Arc::new(Service {
            protocol: Protocol::Http,
            ..service("web", "198.18.0.10:80")
        }),
    );
    let after = route_table(&state, &mut built, &metrics);
    assert!(backend(&after, "web", "w1").metrics.http.is_some());
    assert_eq!(connections(&metrics, "web", "w1").as_deref(), Some("1"));
}

#[test]
fn an_instance_whose_labels_change_leaves_no_series_under_its_old_labels() {
    // Same name and address, another image tag (a record rewritten by a newer agent, say): the
    // series are now under the new tag, and nothing is left under the old one.
    let (metrics, mut built) = (Metrics::new(), Built::default());
    let c1 = container("web", "c1", "host-b", Some("10.0.0.2:32768"));
    let state = state()
        .service(service("web", "198.18.0.10:80"))
        .instance(c1.clone())
        .build();
    route_table(&state, &mut built, &metrics);
    let mut retagged = c1;
    if let Some(c) = retagged.container.as_mut() {
        c.tag = "v2".into();
    }
    let state = with_instance(&state, retagged);
    route_table(&state, &mut built, &metrics);
    let series = series_of(&metrics, "web", "c1");
    let tagged = |tag: &str| -> Vec<&String> {
        let label = format!(r#"tag="{tag}""#);
        series.iter().filter(|l| l.contains(&label)).collect()
    };
    assert!(!tagged("v2").is_empty(), "{series:#?}");
    let stale = tagged("v1");
    assert!(
        stale.is_empty(),
        "{} lines left under the old tag, the first: {}",
        stale.len(),
        stale[0]
    );
}

/// Another host's container instance at an address only that host reaches is not routed here.
mod other_hosts_addresses {
    use super::super::*;
    use crate::model::{decode, Host};

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
}

/// Which services are refused for having no instance, and which are redirected.
mod refusals {
    use super::super::*;
    use crate::model::{Balance, HealthCheck};

    fn service(name: &str, vip: &str, protocol: Protocol) -> Arc<Service> {
        Arc::new(Service {
            name: name.into(),
            address: Some(vip.parse().unwrap()),
            protocol,
            instance_port: None,
            balance: Balance::default(),
            health: None,
            forward: Default::default(),
            locality: Default::default(),
            affinity: Default::default(),
            timeouts: Default::default(),
            proxy_protocol: None,
            instance_protocol: None,
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

/// The whole ruleset with refusals on (the default wherever ipset is installed): a `tcp`
/// service with no backend is a member of `flux-empty`, refused by the filter chain, and the
/// nat chain returns early for it; every other allowed VIP is redirected as before.
#[test]
fn with_refusals_on_a_tcp_service_without_backends_is_refused_and_the_rest_redirected() {
    let mut web = service("web", "198.18.0.10:80");
    web.instance_port = Some(8080);
    let mut api = service("api", "198.18.0.12:80");
    api.protocol = Protocol::Http;
    let state = StateBuilder::default()
        .service(web)
        .service(service("idle", "198.18.0.11:80"))
        .service(api)
        .instance(static_instance("web", "w1", "192.0.2.1:8080"))
        .instance(container("idle", "0123456789ab", THIS_HOST, None))
        .build();
    let table = route_table(&state, &mut Built::default(), &Metrics::new());
    let desired = desired_rules(
        &state,
        &table,
        PROXY_PORT,
        &["docker0".to_string()],
        &allow_all(&state),
        true,
    );
    let rules = netfilter::render(&desired);
    assert_eq!(rules.rejected(), []);
    assert_eq!(
        rules.service_rules(),
        [
            r#"-A FLUX-SERVICES -p tcp -m set --match-set flux-empty dst,dst -m comment --comment "flux no instance" -j RETURN"#,
            SET_RULE,
        ]
    );
    assert_eq!(
        rules.set_members(),
        [
            member("198.18.0.10:80", "web"),
            member("198.18.0.12:80", "api")
        ]
    );
    assert_eq!(
        rules.empty_members(),
        [r#"add flux-empty 198.18.0.11,tcp:80 comment "flux:idle""#]
    );
    assert_eq!(
        rules.reject_rules(),
        [
            r#"-A FLUX-REJECT -p tcp -m set --match-set flux-empty dst,dst -m comment --comment "flux no instance" -j REJECT --reject-with tcp-reset"#
        ]
    );
    assert_eq!(rules.hooks(), HOOKS);
    assert_eq!(
        rules.filter_hooks(),
        [
            r#"-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT"#,
            r#"-A INPUT -i docker0 -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT"#,
            r#"-A FORWARD -i docker0 -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT"#,
        ]
    );
}

/// `--forward kernel`: a `tcp` service with backends is forwarded by the kernel (DNAT straight
/// to each backend, at the address the proxy would use), not redirected; with none it is
/// refused like any `tcp` service; a proxied service beside it is unchanged.
#[test]
fn a_kernel_forwarded_service_is_dnated_to_its_backends_and_refused_without_any() {
    let kernel = |name: &str, vip: &str| Service {
        forward: model::Forwarding::Kernel,
        ..service(name, vip)
    };
    let state = StateBuilder::default()
        .service(service("web", "198.18.0.10:80"))
        .service(kernel("bulk", "198.18.0.12:80"))
        .service(kernel("idle", "198.18.0.13:80"))
        .instance(static_instance("web", "w1", "192.0.2.1:8080"))
        .instance(static_instance("bulk", "b2", "192.0.2.3:9000"))
        .instance(container("bulk", "c1", "host-b", Some("10.0.0.2:32768")))
        .instance(container("bulk", "c2", "host-b", None))
        .instance(container("idle", "0123456789ab", THIS_HOST, None))
        .build();
    let table = route_table(&state, &mut Built::default(), &Metrics::new());
    let desired = desired_rules(
        &state,
        &table,
        PROXY_PORT,
        &["docker0".to_string()],
        &allow_all(&state),
        true,
    );
    let rules = netfilter::render(&desired);
    assert_eq!(rules.rejected(), []);
    assert_eq!(
        rules.service_rules(),
        [
            r#"-A FLUX-SERVICES -p tcp -m set --match-set flux-empty dst,dst -m comment --comment "flux no instance" -j RETURN"#,
            r#"-A FLUX-SERVICES -p tcp -m comment --comment "flux forward" -j FLUX-FORWARD"#,
            SET_RULE,
        ]
    );
    assert_eq!(rules.set_members(), [member("198.18.0.10:80", "web")]);
    assert_eq!(
        rules.empty_members(),
        [r#"add flux-empty 198.18.0.13,tcp:80 comment "flux:idle""#]
    );
    assert_eq!(
        rules.forward_rules(),
        [
            r#"-A FLUX-FORWARD -d 198.18.0.12/32 -p tcp -m tcp --dport 80 -m comment --comment "flux:bulk" -j FLUX-FWD-C612000C-80"#
        ]
    );
    assert_eq!(
        rules.forward_chains()["FLUX-FWD-C612000C-80"],
        [
            r#"-A FLUX-FWD-C612000C-80 -p tcp -m comment --comment "flux:bulk/b2" -m statistic --mode random --probability 0.50000000000 -j DNAT --to-destination 192.0.2.3:9000"#,
            r#"-A FLUX-FWD-C612000C-80 -p tcp -m comment --comment "flux:bulk/c1" -j DNAT --to-destination 10.0.0.2:32768"#,
        ]
    );
    assert_eq!(rules.hooks(), HOOKS);
}

/// Only instances that pass their active check (or have none yet) take new connections; the
/// failing ones stay the service's (on standby) so their established connections are kept.
/// When every instance fails, all take connections, as in the proxy's panic mode.
#[test]
fn a_kernel_forwarded_instance_failing_its_check_is_on_standby_unless_all_fail() {
    let state = StateBuilder::default()
        .service(Service {
            forward: model::Forwarding::Kernel,
            health: Some(HealthCheck {
                fall: 1,
                ..HealthCheck::tcp()
            }),
            ..service("bulk", "198.18.0.12:80")
        })
        .instance(static_instance("bulk", "b1", "192.0.2.1:80"))
        .instance(static_instance("bulk", "b2", "192.0.2.2:80"))
        .build();
    let table = route_table(&state, &mut Built::default(), &Metrics::new());
    let check = table.by_name["bulk"].check.clone().expect("a check");
    let fail = |instance: &str| {
        let b = backend(&table, "bulk", instance);
        b.health.check_started(&check);
        b.health
            .check_result(&check, Err("tcp connect refused".into()));
    };
    let standby = |table: &RouteTable| {
        let desired = desired_rules(&state, table, PROXY_PORT, &[], &allow_all(&state), true);
        desired.forwards[0]
            .destinations
            .iter()
            .map(|d| (d.instance.clone(), d.standby))
            .collect::<Vec<_>>()
    };
    let pair = |a: bool, b: bool| vec![("b1".to_string(), a), ("b2".to_string(), b)];
    assert_eq!(standby(&table), pair(false, false));
    fail("b1");
    assert_eq!(standby(&table), pair(true, false));
    fail("b2");
    assert_eq!(standby(&table), pair(false, false), "panic mode");
}

/// Drain: an instance with a mark, or of a rule at weight 0, is on standby in a
/// kernel-forwarded service (no new connection, its established ones kept), and never taken
/// back in panic mode; a `tcp` service whose every instance is drained is refused like one
/// with none.
#[test]
fn drained_instances_take_no_new_connection_on_either_path() {
    let mut v2 = rule("bulk", "v2", "app");
    v2.weight = Some(0);
    let mut state = StateBuilder::default()
        .service(Service {
            forward: model::Forwarding::Kernel,
            ..service("bulk", "198.18.0.12:80")
        })
        .service(service("web", "198.18.0.10:80"))
        .rule(rule("bulk", "v1", "app"))
        .rule(v2)
        .instance(container("bulk", "c1", "host-b", Some("10.0.0.2:32768")))
        .instance(Instance {
            rule: Some("v2".into()),
            ..container("bulk", "c2", "host-b", Some("10.0.0.3:32768"))
        })
        .instance(static_instance("bulk", "s1", "192.0.2.1:80"))
        .instance(static_instance("web", "w1", "192.0.2.2:80"))
        .build();
    let mark = |state: &mut State, service: &str, instance: &str| {
        state.drains.insert(
            (service.into(), instance.into()),
            Arc::new(model::Drain {
                service: service.into(),
                instance: instance.into(),
            }),
        );
    };
    mark(&mut state, "bulk", "s1");
    let table = route_table(&state, &mut Built::default(), &Metrics::new());
    let desired = desired_rules(&state, &table, PROXY_PORT, &[], &allow_all(&state), true);
    let standby: Vec<(String, bool)> = desired.forwards[0]
        .destinations
        .iter()
        .map(|d| (d.instance.clone(), d.standby))
        .collect();
    assert_eq!(
        standby,
        [
            ("c1".to_string(), false),
            ("c2".to_string(), true),
            ("s1".to_string(), true)
        ]
    );
    assert_eq!(
        route(&table, "bulk").traffic_summary().as_deref(),
        Some("weights (static)=100 v1=100 v2=0; drained c2 s1")
    );
    mark(&mut state, "web", "w1");
    let table = route_table(&state, &mut Built::default(), &Metrics::new());
    let desired = desired_rules(&state, &table, PROXY_PORT, &[], &allow_all(&state), true);
    let rejects: Vec<&str> = desired.rejects.iter().map(|r| r.service.as_str()).collect();
    assert_eq!(rejects, ["web"]);
}
