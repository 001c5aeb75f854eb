//! Turns the catalog's state into the proxy's routing table and the netfilter's desired rules.
//! Pure apart from reusing the health of instances that were already known.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::Arc;

use crate::catalog::State;
use crate::docker::LocalInstances;
use crate::metrics::{InstanceLabels, InstanceMetrics, Metrics};
use crate::model::Instance;
use crate::model::{Origin, Protocol};
use crate::proxy::health::Health;
use crate::proxy::http::Pool;
use crate::proxy::routes::{Backend, RouteTable, ServiceRoute};

/// Health survives rebuilds of the table as long as the instance keeps its address; a new
/// address is a new backend and starts live.
pub type HealthKey = (String, String, SocketAddrV4);

/// What survives a rebuild of the routing table for one instance: its health and its series.
#[derive(Clone)]
pub struct Kept {
    pub health: Arc<Health>,
    pub metrics: InstanceMetrics,
    pub labels: InstanceLabels,
    /// Kept-alive connections of `http` services.
    pub pool: Arc<Pool>,
}

/// Builds the table; instances that are gone have their series dropped from `metrics`.
pub fn route_table(
    state: &State,
    kept: &mut HashMap<HealthKey, Kept>,
    metrics: &Metrics,
) -> RouteTable {
    let mut table = RouteTable::default();
    let mut seen = HashMap::new();
    for service in state.services.values() {
        let http = service.protocol == Protocol::Http;
        let backends: Vec<Arc<Backend>> = state
            .instances_of(&service.name)
            .filter_map(|i| {
                let addr = i.address?;
                let key = (i.service.clone(), i.name.clone(), addr);
                let labels = labels_of(i);
                let k = match kept.get(&key) {
                    Some(k) if k.labels == labels && k.metrics.http.is_some() == http => k.clone(),
                    _ => Kept {
                        health: Arc::default(),
                        metrics: metrics.instance(&labels, http),
                        labels,
                        pool: Arc::default(),
                    },
                };
                seen.insert(key, k.clone());
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
        let route = Arc::new(ServiceRoute::new(
            service.name.clone(),
            service.protocol,
            service.balance,
            backends,
        ));
        table.by_name.insert(service.name.clone(), route.clone());
        table.services.insert(service.address, route);
    }
    for (key, k) in kept.iter() {
        // Same labels with another protocol share the series (an http -> tcp change leaves the
        // per-request series until the instance goes).
        if seen.get(key).is_none_or(|s| s.labels != k.labels) {
            metrics.forget(&k.labels);
        }
    }
    *kept = seen;
    table
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

pub fn desired_rules(
    state: &State,
    proxy_port: u16,
    bridge_interfaces: &[String],
    vip_ranges: &[ipnet::Ipv4Net],
) -> netfilter::Desired {
    netfilter::Desired {
        redirects: state
            .services
            .values()
            .map(|s| netfilter::Redirect {
                service: s.name.clone(),
                vip: s.address,
            })
            .collect(),
        proxy_port,
        bridge_interfaces: bridge_interfaces.to_vec(),
        vip_ranges: vip_ranges
            .iter()
            .map(|n| netfilter::VipRange {
                addr: n.network(),
                prefix_len: n.prefix_len(),
            })
            .collect(),
    }
}

/// The catalog state with this host's container instances as the Docker agent sees them rather
/// than as the store last said: a local container is routable the moment the agent knows it,
/// even while the store is unreachable. Until the agent has listed Docker once, the store's
/// record stands.
pub fn with_local(state: &State, host: &str, local: Option<&LocalInstances>) -> State {
    let mut merged = state.clone();
    let Some(local) = local else {
        return merged;
    };
    merged
        .instances
        .retain(|_, i| !(i.origin == Origin::Container && i.host.as_deref() == Some(host)));
    for i in local.values() {
        if merged.services.contains_key(&i.service) {
            merged
                .instances
                .insert((i.service.clone(), i.name.clone()), Arc::new(i.clone()));
        }
    }
    merged
}
