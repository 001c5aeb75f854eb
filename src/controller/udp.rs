//! The controller's part for `udp` services: which of them the relay serves (those the VIP
//! guard lets through, with a VIP), handed over before the steering installs their routes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use super::Status;
use crate::model::Protocol;
use crate::proxy::route_table::RouteTable;
use crate::proxy::udp::UdpPlan;

/// The relay's plan for `wanted` (the desired rules, after the guard) and `table`, with the
/// interfaces allowed to reach the VIPs (None: any).
pub(super) fn plan(
    wanted: &netfilter::Desired,
    table: &RouteTable,
    ifaces: Option<&BTreeMap<u32, String>>,
) -> UdpPlan {
    let mut services: Vec<(SocketAddr, Arc<_>)> = wanted
        .redirects
        .iter()
        .chain(&wanted.rejects)
        .filter_map(|r| {
            let route = table.services.get(&r.vip)?;
            (route.protocol == Protocol::Udp && route.name == r.service)
                .then(|| (SocketAddr::from(r.vip), route.clone()))
        })
        .collect();
    services.sort_by_key(|(vip, _)| *vip);
    UdpPlan {
        services,
        ifaces: ifaces.map(|i| Arc::new(i.keys().copied().collect())),
    }
}

/// Hands the relay its new plan, if it changed.
pub(super) fn hand_over(
    status: &Status,
    wanted: &netfilter::Desired,
    table: &RouteTable,
    ifaces: Option<&BTreeMap<u32, String>>,
) {
    let plan = plan(wanted, table, ifaces);
    status.udp.send_if_modified(|old| {
        let changed = **old != plan;
        if changed {
            *old = Arc::new(plan);
        }
        changed
    });
}
