//! The proxy's routing table: VIP -> service -> instances, built by the controller and swapped
//! in whole, so connections read it without locks. Instance order per connection follows the
//! service's balancing policy.
//!
//! An instance whose active check is failing is out of the pool: never picked, not even as a
//! last resort, while another instance is not failing its check. When every instance fails its
//! check ("panic mode", as HAProxy and Envoy call it) the verdicts are set aside and all
//! instances are tried as if unchecked, passive health still ordering them: a check that fails
//! everywhere at once is more often the check's fault (a wrong path, a shared dependency down)
//! than every instance's, and refusing every connection would turn it into a full outage.
//!
//! A service with traffic control (rule weights, drained instances, locality, affinity) is
//! ordered by `super::balancer` instead, which follows the same rules for health.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::balancer::{self, Candidate, Pick, Traffic};
use super::health::{now_ms, Health};
use crate::metrics::{InstanceLabels, InstanceMetrics};
use crate::model::{
    Balance, HealthCheck, InstanceProtocol, Protocol, ProxyProtocol, ServiceTimeouts,
};

/// One instance the proxy may connect to.
#[derive(Debug)]
pub struct Backend {
    pub service: String,
    pub instance: String,
    pub addr: SocketAddr,
    /// Shared with earlier tables, so health survives a table rebuild.
    pub health: Arc<Health>,
    /// This instance's series; shared with earlier tables like `health`.
    pub metrics: InstanceMetrics,
    pub labels: InstanceLabels,
    /// Container labels, for grouping chart lines by any label.
    pub extra: std::collections::BTreeMap<String, String>,
    /// Idle kept-alive HTTP connections to this instance (`http` services only); shared with
    /// earlier tables like `health`.
    pub pool: Arc<super::http::pool::Pool>,
    /// Index of its rule's group in the route's `traffic.groups` (see `balancer`).
    pub group: usize,
    /// Whether it runs on this host (for locality).
    pub local: bool,
    /// Whether its instance carries a drain mark: no new connection.
    pub drained: bool,
}

impl Backend {
    pub fn view(&self) -> super::health::HealthView {
        self.health.view(&self.metrics)
    }
}

#[derive(Debug)]
pub struct ServiceRoute {
    pub name: String,
    pub protocol: Protocol,
    pub balance: Balance,
    pub backends: Vec<Arc<Backend>>,
    /// The service's active check, which the checker runs against every backend.
    pub check: Option<HealthCheck>,
    /// Round-robin position.
    next: AtomicUsize,
    /// Weights, locality and affinity; plain by default.
    pub traffic: Traffic,
    /// No traffic control at all (plain `traffic`, no drained backend): the allocation-free
    /// path of the balance policy alone.
    plain: bool,
    /// The service's own time limits over fluxd's ([`ServiceRoute::timeouts`]).
    pub timeouts: ServiceTimeouts,
    /// `tcp` services with `--proxy-protocol`: the header's version and the VIP it names as
    /// destination.
    pub proxy_protocol: Option<(ProxyProtocol, SocketAddr)>,
    /// `http` services: the HTTP version spoken to instances; None is auto (the client's).
    pub instance_protocol: Option<InstanceProtocol>,
}

impl ServiceRoute {
    pub fn new(
        name: String,
        protocol: Protocol,
        balance: Balance,
        backends: Vec<Arc<Backend>>,
    ) -> Self {
        ServiceRoute {
            name,
            protocol,
            balance,
            check: None,
            next: AtomicUsize::new(0),
            traffic: Traffic::default(),
            plain: !backends.iter().any(|b| b.drained),
            backends,
            timeouts: ServiceTimeouts::default(),
            proxy_protocol: None,
            instance_protocol: None,
        }
    }

    /// The same route speaking `protocol` to its instances (`http` services).
    pub fn with_instance_protocol(mut self, protocol: Option<InstanceProtocol>) -> Self {
        self.instance_protocol = protocol;
        self
    }

    /// The same route with the service's time limits and PROXY protocol header.
    pub fn with_tuning(
        mut self,
        timeouts: ServiceTimeouts,
        proxy_protocol: Option<(ProxyProtocol, SocketAddr)>,
    ) -> Self {
        self.timeouts = timeouts;
        self.proxy_protocol = proxy_protocol;
        self
    }

    /// The limits this service's connections run under: its own where it has them, fluxd's
    /// (`daemon`) otherwise.
    pub fn timeouts(&self, daemon: super::limits::Timeouts) -> super::limits::Timeouts {
        let ms =
            |v: Option<u64>, d: std::time::Duration| v.map_or(d, std::time::Duration::from_millis);
        super::limits::Timeouts {
            connect: ms(self.timeouts.connect_ms, daemon.connect),
            http_response: ms(self.timeouts.http_response_ms, daemon.http_response),
            half_closed_idle: ms(self.timeouts.half_close_ms, daemon.half_closed_idle),
        }
    }

    /// The same route with traffic control.
    pub fn with_traffic(mut self, traffic: Traffic) -> Self {
        self.plain = traffic.is_plain() && !self.backends.iter().any(|b| b.drained);
        self.traffic = traffic;
        self
    }

    /// Whether `b` takes new connections at all: not drained by a mark or its rule's weight.
    pub fn takes_new(&self, b: &Backend) -> bool {
        !b.drained
            && self
                .traffic
                .groups
                .get(b.group)
                .is_none_or(|g| g.weight > 0)
    }

    /// One line on this route's traffic control for `fluxd debug` (`weights v1=90 v2=10;
    /// drained i3; locality prefer-host (local: i1); affinity client-ip`); None when plain.
    pub fn traffic_summary(&self) -> Option<String> {
        if self.plain {
            return None;
        }
        let mut parts = Vec::new();
        let t = &self.traffic;
        if t.groups.len() > 1 {
            let weights: Vec<String> = t
                .groups
                .iter()
                .enumerate()
                // The static group only when it has members.
                .filter(|(i, g)| !g.name.is_empty() || self.backends.iter().any(|b| b.group == *i))
                .map(|(_, g)| {
                    let name = if g.name.is_empty() {
                        "(static)"
                    } else {
                        &g.name
                    };
                    format!("{name}={}", g.weight)
                })
                .collect();
            parts.push(format!("weights {}", weights.join(" ")));
        }
        let drained: Vec<&str> = self
            .backends
            .iter()
            .filter(|b| !self.takes_new(b))
            .map(|b| b.instance.as_str())
            .collect();
        if !drained.is_empty() {
            parts.push(format!("drained {}", drained.join(" ")));
        }
        if !t.locality.is_any() {
            let local: Vec<&str> = self
                .backends
                .iter()
                .filter(|b| b.local)
                .map(|b| b.instance.as_str())
                .collect();
            let local = if local.is_empty() {
                "none".to_string()
            } else {
                local.join(" ")
            };
            parts.push(format!("locality {} (local: {local})", t.locality));
        }
        if !t.affinity.is_none() {
            parts.push(format!("affinity {}", t.affinity));
        }
        Some(parts.join("; "))
    }

    /// The order of a service with traffic control (see `balancer`), as indices.
    fn traffic_order(&self, client: Option<IpAddr>) -> Vec<usize> {
        let now = now_ms();
        let candidates: Vec<Candidate> = self
            .backends
            .iter()
            .map(|b| Candidate {
                name: &b.instance,
                group: b.group,
                local: b.local,
                drained: b.drained,
                check_failing: b.health.check_failing(),
                available: b.health.available(now),
                retry_at_ms: b.health.retry_at_ms(),
                active: b.metrics.active.get().max(0) as u64,
            })
            .collect();
        let pick = match self.balance {
            Balance::RoundRobin => Pick::Counter(self.next.fetch_add(1, Ordering::Relaxed)),
            Balance::Random => Pick::Random,
            Balance::LeastConn => Pick::LeastConn,
        };
        balancer::order(
            &self.traffic,
            &candidates,
            client,
            pick,
            &mut rand::random::<u64>,
        )
    }

    /// The same route with the service's active check.
    pub fn with_check(mut self, check: Option<HealthCheck>) -> Self {
        self.check = check;
        self
    }

    /// Panic mode: every backend fails its active check, so verdicts are set aside (see the
    /// module's doc). Asked only on the fallback paths (no usable backend, `connect_order`).
    fn all_check_failing(&self) -> bool {
        self.backends.iter().all(|b| b.health.check_failing())
    }

    /// The policy's pick among available instances, without allocating: what almost every
    /// connection needs. None when no instance is available (all failed and not yet due, or
    /// failing their check).
    ///
    /// `client` is the client's address, for affinity.
    pub fn first_choice(&self, client: Option<IpAddr>) -> Option<&Arc<Backend>> {
        if !self.plain {
            // The first of the full order, if it is available now (as on the plain path).
            let first = *self.traffic_order(client).first()?;
            let b = &self.backends[first];
            return b.health.available(now_ms()).then_some(b);
        }
        let now = now_ms();
        let usable = |panic: bool| {
            move |b: &&Arc<Backend>| (panic || !b.health.check_failing()) && b.health.available(now)
        };
        let mut panic = false;
        let mut n = self.backends.iter().filter(usable(false)).count();
        if n == 0 && self.all_check_failing() {
            panic = true;
            n = self.backends.iter().filter(usable(true)).count();
        }
        if n == 0 {
            return None;
        }
        let available = || self.backends.iter().filter(usable(panic));
        match self.balance {
            Balance::RoundRobin => available().nth(self.next.fetch_add(1, Ordering::Relaxed) % n),
            Balance::Random => available().nth(rand::random::<usize>() % n),
            Balance::LeastConn => {
                let a = available().nth(rand::random::<usize>() % n)?;
                let b = available().nth(rand::random::<usize>() % n)?;
                let active = |x: &Backend| x.metrics.active.get();
                Some(if active(b) < active(a) { b } else { a })
            }
        }
    }

    /// The order to try instances in for one new connection: the policy's pick first, then the
    /// other available instances, then failed ones by when their retry is due, so that a
    /// connection is only refused when every instance has been tried. Instances failing their
    /// active check are left out, unless all are (panic mode).
    pub fn connect_order(&self, client: Option<IpAddr>) -> Vec<Arc<Backend>> {
        if !self.plain {
            return self
                .traffic_order(client)
                .into_iter()
                .map(|i| self.backends[i].clone())
                .collect();
        }
        let now = now_ms();
        let panic = self.all_check_failing();
        let (mut avail, mut failed): (Vec<_>, Vec<_>) = self
            .backends
            .iter()
            .filter(|b| panic || !b.health.check_failing())
            .cloned()
            .partition(|b| b.health.available(now));
        if !avail.is_empty() {
            let first = match self.balance {
                Balance::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % avail.len(),
                Balance::Random => rand::random::<usize>() % avail.len(),
                Balance::LeastConn => least_of_two(&avail),
            };
            avail.rotate_left(first);
        }
        failed.sort_by_key(|b| b.health.retry_at_ms());
        avail.extend(failed);
        avail
    }
}

/// Power of two choices: of two random instances, the one with fewer active connections.
fn least_of_two(avail: &[Arc<Backend>]) -> usize {
    let a = rand::random::<usize>() % avail.len();
    let b = rand::random::<usize>() % avail.len();
    let active = |i: usize| avail[i].metrics.active.get();
    if active(b) < active(a) {
        b
    } else {
        a
    }
}

/// Everything the proxy routes, by VIP. The maps are persistent (`imbl`): the controller
/// copies the last table and changes the routes of the services that changed, whatever the
/// number of services.
#[derive(Debug, Default, Clone)]
pub struct RouteTable {
    pub services: imbl::HashMap<SocketAddr, Arc<ServiceRoute>>,
    /// The same routes by service name, for health lookups from the API.
    pub by_name: imbl::HashMap<String, Arc<ServiceRoute>>,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// The instances a connection would try, in order.
    fn tried(r: &ServiceRoute) -> Vec<String> {
        r.connect_order(None)
            .iter()
            .map(|b| b.instance.clone())
            .collect()
    }

    fn route(n: usize, balance: Balance) -> ServiceRoute {
        let backends = (0..n)
            .map(|i| {
                let labels = InstanceLabels {
                    service: "s".into(),
                    instance: format!("i{i}"),
                    host: String::new(),
                    image: String::new(),
                    tag: String::new(),
                };
                Arc::new(Backend {
                    service: "s".into(),
                    instance: format!("i{i}"),
                    addr: SocketAddr::new([192, 0, 2, i as u8].into(), 80),
                    health: Arc::new(Health::default()),
                    metrics: crate::metrics::Metrics::new().instance(&labels, false),
                    labels,
                    extra: Default::default(),
                    pool: Default::default(),
                    group: 0,
                    local: false,
                    drained: false,
                })
            })
            .collect();
        ServiceRoute::new("s".into(), Protocol::Tcp, balance, backends)
    }

    #[test]
    fn round_robin_spreads_evenly_over_live() {
        let r = route(3, Balance::RoundRobin);
        r.backends[1].health.failed();
        let mut counts = HashMap::new();
        for _ in 0..100 {
            let order = r.connect_order(None);
            assert_eq!(order.len(), 3, "every instance stays a fallback");
            assert_eq!(order[2].instance, "i1", "failed instance tried last");
            *counts.entry(order[0].instance.clone()).or_insert(0) += 1;
        }
        assert_eq!(counts["i0"], 50);
        assert_eq!(counts["i2"], 50);
    }

    #[test]
    fn all_failed_tries_soonest_due_first() {
        let r = route(3, Balance::RoundRobin);
        r.backends[0].health.failed();
        r.backends[0].health.failed(); // ~2 s
        r.backends[1].health.failed(); // ~1 s
        r.backends[2].health.failed();
        r.backends[2].health.failed();
        r.backends[2].health.failed(); // ~4 s
        let order = tried(&r);
        assert_eq!(order, ["i1", "i0", "i2"]);
    }

    #[test]
    fn first_choice_agrees_with_round_robin_spread() {
        let r = route(3, Balance::RoundRobin);
        r.backends[2].health.failed();
        let picks: Vec<String> = (0..4)
            .map(|_| r.first_choice(None).unwrap().instance.clone())
            .collect();
        assert_eq!(picks, ["i0", "i1", "i0", "i1"]);
        r.backends[0].health.failed();
        r.backends[1].health.failed();
        assert!(r.first_choice(None).is_none());
    }

    fn fail_check(b: &Backend) {
        let check = crate::model::HealthCheck {
            fall: 1,
            ..crate::model::HealthCheck::tcp()
        };
        b.health.check_started(&check);
        b.health
            .check_result(&check, Err("tcp connect refused".into()));
        assert!(b.health.check_failing());
    }

    #[test]
    fn failing_check_leaves_the_pool_even_as_last_resort() {
        let r = route(3, Balance::RoundRobin);
        fail_check(&r.backends[1]);
        for _ in 0..10 {
            assert_ne!(r.first_choice(None).unwrap().instance, "i1");
            let order = tried(&r);
            assert_eq!(order.len(), 2, "{order:?}");
            assert!(!order.contains(&"i1".to_string()));
        }
        // Passively failed instances are still a last resort; a failing check is not.
        r.backends[0].health.failed();
        r.backends[2].health.failed();
        assert!(r.first_choice(None).is_none());
        let order = tried(&r);
        assert!(!order.contains(&"i1".to_string()), "{order:?}");
        assert_eq!(order.len(), 2);
    }

    #[test]
    fn all_failing_checks_is_panic_mode() {
        let r = route(2, Balance::RoundRobin);
        fail_check(&r.backends[0]);
        fail_check(&r.backends[1]);
        let picks: Vec<String> = (0..4)
            .map(|_| r.first_choice(None).unwrap().instance.clone())
            .collect();
        assert_eq!(picks, ["i0", "i1", "i0", "i1"]);
        assert_eq!(r.connect_order(None).len(), 2);
        r.backends[0].health.check_stopped();
        assert_eq!(r.first_choice(None).unwrap().instance, "i0");
        assert_eq!(
            r.connect_order(None).len(),
            1,
            "panic ends with one instance in the pool"
        );
    }

    #[test]
    fn a_drained_backend_is_never_picked_even_without_other_traffic_control() {
        let backends = route(3, Balance::RoundRobin).backends;
        let backends: Vec<Arc<Backend>> = backends
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let b = Arc::into_inner(b).unwrap();
                Arc::new(Backend {
                    drained: i == 1,
                    ..b
                })
            })
            .collect();
        let r = ServiceRoute::new("s".into(), Protocol::Tcp, Balance::RoundRobin, backends)
            .with_traffic(Traffic::default());
        for _ in 0..20 {
            assert_ne!(r.first_choice(None).unwrap().instance, "i1");
            let order = tried(&r);
            assert_eq!(order.len(), 2, "{order:?}");
            assert!(!order.contains(&"i1".to_string()));
        }
        assert_eq!(r.traffic_summary().as_deref(), Some("drained i1"));
    }

    #[test]
    fn a_services_own_timeouts_override_the_daemons() {
        use std::time::Duration;
        let daemon = crate::proxy::limits::Timeouts {
            connect: Duration::from_millis(2500),
            http_response: Duration::from_secs(60),
            half_closed_idle: Duration::from_secs(120),
        };
        let plain = route(1, Balance::RoundRobin);
        let t = plain.timeouts(daemon);
        assert_eq!(
            (t.connect, t.http_response, t.half_closed_idle),
            (
                daemon.connect,
                daemon.http_response,
                daemon.half_closed_idle
            )
        );
        let tuned = route(1, Balance::RoundRobin).with_tuning(
            ServiceTimeouts {
                connect_ms: Some(300),
                http_response_ms: None,
                half_close_ms: Some(5000),
            },
            None,
        );
        let t = tuned.timeouts(daemon);
        assert_eq!(t.connect, Duration::from_millis(300));
        assert_eq!(t.http_response, daemon.http_response);
        assert_eq!(t.half_closed_idle, Duration::from_secs(5));
    }

    #[test]
    fn least_conn_prefers_idle() {
        let r = route(2, Balance::LeastConn);
        r.backends[0].metrics.active.set(100);
        let picks_idle = (0..200)
            .filter(|_| r.connect_order(None)[0].instance == "i1")
            .count();
        // i1 wins whenever it is one of the two draws: 3 in 4 on average.
        assert!(picks_idle > 120, "{picks_idle}");
    }
}
