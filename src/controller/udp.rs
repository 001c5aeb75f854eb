//! The controller's part for `udp` services: which of them the relay serves (those the VIP
//! guard lets through, with a VIP), handed over before the steering or the rules send their
//! datagrams to it; on the nat path, with the socket each service's redirect rule names.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use super::Status;
use crate::model::Protocol;
use crate::proxy::route_table::RouteTable;
use crate::proxy::udp::{NatSockets, UdpPlan, UdpTarget};

/// How datagrams reach the relay on this host.
pub(super) enum Path<'a> {
    /// The VIP is a local address: the relay binds it, for datagrams from these interfaces.
    Bpf(&'a BTreeMap<u32, String>),
    /// A `REDIRECT` rule per service sends them to a socket of these.
    Nat(&'a NatSockets),
}

/// The udp services of `wanted` (the desired rules, after the guard) with their routes, sorted
/// by VIP.
fn targets(wanted: &netfilter::Desired, table: &RouteTable) -> Vec<UdpTarget> {
    let mut targets: Vec<UdpTarget> = wanted
        .redirects
        .iter()
        .chain(&wanted.rejects)
        .filter_map(|r| {
            let route = table.services.get(&SocketAddr::from(r.vip))?;
            (route.protocol == Protocol::Udp && route.name == r.service).then(|| UdpTarget {
                vip: SocketAddr::from(r.vip),
                route: route.clone(),
                redirected: None,
            })
        })
        .collect();
    targets.sort_by_key(|t| t.vip);
    targets
}

/// Hands the relay its plan for `wanted` and `table`, if it changed; returns the redirect rules
/// the nat path needs (none on the bpf path).
pub(super) fn hand_over(
    status: &Status,
    wanted: &netfilter::Desired,
    table: &RouteTable,
    path: Path,
) -> Vec<netfilter::UdpRedirect> {
    let mut services = targets(wanted, table);
    let mut rules = Vec::new();
    let ifaces = match path {
        Path::Bpf(ifaces) => Some(Arc::new(ifaces.keys().copied().collect())),
        Path::Nat(sockets) => {
            let vips: Vec<SocketAddr> = services.iter().map(|t| t.vip).collect();
            let bound = sockets.sync(&vips);
            // A service whose socket could not be bound gets no rule: its datagrams go
            // where the VIP routes, as before the service existed.
            services.retain_mut(|t| {
                t.redirected = bound.get(&t.vip).cloned();
                t.redirected.is_some()
            });
            for t in &services {
                let (SocketAddr::V4(vip), Some(Ok(local))) =
                    (t.vip, t.redirected.as_ref().map(|s| s.local_addr()))
                else {
                    continue;
                };
                rules.push(netfilter::UdpRedirect {
                    service: t.route.name.clone(),
                    vip,
                    port: local.port(),
                });
            }
            None
        }
    };
    let plan = UdpPlan { services, ifaces };
    status.udp.send_if_modified(|old| {
        let changed = **old != plan;
        if changed {
            *old = Arc::new(plan);
        }
        changed
    });
    rules
}
