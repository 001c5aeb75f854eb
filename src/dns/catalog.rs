//! What DNS answers are made of: services and their VIPs from the catalog this fluxd follows,
//! and the instances the proxy would use from this host. Behind a small trait so that the
//! answering code is tested and fuzzed without a store or a proxy.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::catalog::State;
use crate::controller::guard::Verdict;
use crate::proxy::health::now_ms;
use crate::proxy::route_table::RouteTable;

/// The names DNS can answer for.
pub trait Names {
    /// None for an unknown service; Some(None) for a service without a VIP (`--address none`).
    fn service(&self, name: &str) -> Option<Option<SocketAddr>>;
    /// The service's instances live from this host, as (instance name, address), in a stable
    /// order.
    fn live_instances(&self, service: &str) -> Vec<(String, SocketAddr)>;
    /// The zone's SOA serial: changes when the catalog does.
    fn serial(&self) -> u32;
}

/// One moment of the catalog: taken once per query, never locked while answering.
pub struct Snapshot {
    pub state: Arc<State>,
    /// The proxy's table (None without a data plane: then every instance with an address
    /// counts as live, there being no health view to ask).
    pub routes: Option<Arc<RouteTable>>,
    /// When the snapshot was taken, for the backoff of failed instances.
    pub now_ms: u64,
    /// What the VIP guard refused on this host: such a VIP collides with an address in use
    /// here (an interface, a gateway, a resolver), so handing it out would send clients there.
    pub refused: Option<Arc<Verdict>>,
}

impl Snapshot {
    pub fn new(state: Arc<State>, routes: Option<Arc<RouteTable>>) -> Snapshot {
        Snapshot {
            state,
            routes,
            now_ms: now_ms(),
            refused: None,
        }
    }

    /// The same snapshot, knowing which services' VIPs this host refuses.
    pub fn with_refused(mut self, refused: Arc<Verdict>) -> Snapshot {
        self.refused = Some(refused);
        self
    }
}

impl Names for Snapshot {
    fn service(&self, name: &str) -> Option<Option<SocketAddr>> {
        let refused = |s: &str| {
            self.refused
                .as_ref()
                .is_some_and(|v| v.refused.contains_key(s))
        };
        // A refused VIP answers like a service without one: the name exists, with no address.
        self.state
            .services
            .get(name)
            .map(|s| s.address.filter(|_| !refused(name)))
    }

    fn live_instances(&self, service: &str) -> Vec<(String, SocketAddr)> {
        let mut out: Vec<(String, SocketAddr)> = match &self.routes {
            // Exactly the instances the proxy would pick now: available (not failed and
            // waiting for their retry), not failing an active check and not drained.
            Some(routes) => routes
                .by_name
                .get(service)
                .map(|r| {
                    r.backends
                        .iter()
                        .filter(|b| {
                            !b.drained
                                && !b.health.check_failing()
                                && b.health.available(self.now_ms)
                        })
                        .map(|b| (b.instance.clone(), b.addr))
                        .collect()
                })
                .unwrap_or_default(),
            None => self
                .state
                .instances_of(service)
                .filter_map(|i| Some((i.name.clone(), i.address?)))
                .collect(),
        };
        out.sort();
        out
    }

    fn serial(&self) -> u32 {
        // Wraps after 4 billion store revisions; resolvers only compare serials for zone
        // transfers, which fluxd does not offer.
        self.state.revision as u32
    }
}
