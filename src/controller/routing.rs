//! Turns the catalog's state into the proxy's routing table and the netfilter's desired rules.
//! Pure apart from reusing the health of instances that were already known.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::Arc;

use crate::catalog::State;
use crate::docker::LocalInstances;
use crate::model::Origin;
use crate::proxy::health::Health;
use crate::proxy::routes::{Backend, RouteTable, ServiceRoute};

/// Health survives rebuilds of the table as long as the instance keeps its address; a new
/// address is a new backend and starts live.
pub type HealthKey = (String, String, SocketAddrV4);

pub fn route_table(state: &State, health: &mut HashMap<HealthKey, Arc<Health>>) -> RouteTable {
    let mut table = RouteTable::default();
    let mut seen = HashMap::new();
    for service in state.services.values() {
        let backends: Vec<Arc<Backend>> = state
            .instances_of(&service.name)
            .filter_map(|i| {
                let addr = i.address?;
                let key = (i.service.clone(), i.name.clone(), addr);
                let h = health.get(&key).cloned().unwrap_or_default();
                seen.insert(key, h.clone());
                Some(Arc::new(Backend {
                    service: i.service.clone(),
                    instance: i.name.clone(),
                    addr,
                    health: h,
                }))
            })
            .collect();
        let route = Arc::new(ServiceRoute::new(
            service.name.clone(),
            service.balance,
            backends,
        ));
        table.by_name.insert(service.name.clone(), route.clone());
        table.services.insert(service.address, route);
    }
    *health = seen;
    table
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
                .insert((i.service.clone(), i.name.clone()), i.clone());
        }
    }
    merged
}
