//! The proxy's routing table: VIP -> service -> instances, built by the controller and swapped
//! in whole, so connections read it without locks. Instance order per connection follows the
//! service's balancing policy.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::health::{now_ms, Health};
use crate::metrics::{InstanceLabels, InstanceMetrics};
use crate::model::{Balance, Protocol};

/// One instance the proxy may connect to.
#[derive(Debug)]
pub struct Backend {
    pub service: String,
    pub instance: String,
    pub addr: SocketAddrV4,
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
    /// Round-robin position.
    next: AtomicUsize,
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
            backends,
            next: AtomicUsize::new(0),
        }
    }

    /// The policy's pick among available instances, without allocating: what almost every
    /// connection needs. None when no instance is available (all failed and not yet due).
    pub fn first_choice(&self) -> Option<&Arc<Backend>> {
        let now = now_ms();
        let available = || self.backends.iter().filter(|b| b.health.available(now));
        let n = available().count();
        if n == 0 {
            return None;
        }
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
    /// connection is only refused when every instance has been tried.
    pub fn connect_order(&self) -> Vec<Arc<Backend>> {
        let now = now_ms();
        let (mut avail, mut failed): (Vec<_>, Vec<_>) = self
            .backends
            .iter()
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

/// Everything the proxy routes, by VIP.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub services: HashMap<SocketAddrV4, Arc<ServiceRoute>>,
    /// The same routes by service name, for health lookups from the API.
    pub by_name: HashMap<String, Arc<ServiceRoute>>,
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    addr: SocketAddrV4::new([192, 0, 2, i as u8].into(), 80),
                    health: Arc::new(Health::default()),
                    metrics: crate::metrics::Metrics::new().instance(&labels, false),
                    labels,
                    extra: Default::default(),
                    pool: Default::default(),
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
            let order = r.connect_order();
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
        let order: Vec<_> = r
            .connect_order()
            .iter()
            .map(|b| b.instance.clone())
            .collect();
        assert_eq!(order, ["i1", "i0", "i2"]);
    }

    #[test]
    fn first_choice_agrees_with_round_robin_spread() {
        let r = route(3, Balance::RoundRobin);
        r.backends[2].health.failed();
        let picks: Vec<String> = (0..4)
            .map(|_| r.first_choice().unwrap().instance.clone())
            .collect();
        assert_eq!(picks, ["i0", "i1", "i0", "i1"]);
        r.backends[0].health.failed();
        r.backends[1].health.failed();
        assert!(r.first_choice().is_none());
    }

    #[test]
    fn least_conn_prefers_idle() {
        let r = route(2, Balance::LeastConn);
        r.backends[0].metrics.active.set(100);
        let picks_idle = (0..200)
            .filter(|_| r.connect_order()[0].instance == "i1")
            .count();
        // i1 wins whenever it is one of the two draws: 3 in 4 on average.
        assert!(picks_idle > 120, "{picks_idle}");
    }
}
