//! The controller's bpf path: the same desired state as the nat rules (VIPs to proxy, VIPs to
//! refuse, VIP ranges), applied as the steering program's maps and local routes instead. IPv6
//! VIPs are steered alike when fluxd has an IPv6 listener to hand them to.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use super::guard::Verdict;
use super::routing::has_no_instance;
use super::Status;
use crate::catalog::State;
use crate::proxy::route_table::RouteTable;

/// The steering for `rules` (as [`super::routing::desired_rules`] computed them, after the VIP
/// guard) and the IPv6 VIPs `ipv6` (from [`ipv6_services`]), steering connections from
/// `ifaces`.
pub(super) fn desired(
    rules: &netfilter::Desired,
    ipv6: Vec<(SocketAddr, (String, steering::Action))>,
    ifaces: &BTreeMap<u32, String>,
) -> steering::Desired {
    let entries = |list: &[netfilter::Redirect], action| {
        list.iter()
            .map(move |r| (SocketAddr::V4(r.vip), (r.service.clone(), action)))
            .collect::<Vec<_>>()
    };
    let mut services: BTreeMap<_, _> = entries(&rules.redirects, steering::Action::Proxy)
        .into_iter()
        .chain(ipv6)
        .collect();
    // Refused VIPs come last: a VIP never sits in both lists, but if it did, refusing is safe.
    services.extend(entries(&rules.rejects, steering::Action::Refuse));
    steering::Desired {
        services,
        ranges: rules
            .vip_ranges
            .iter()
            .map(|r| (r.addr, r.prefix_len))
            .collect(),
        ifaces: ifaces.clone(),
    }
}

/// The IPv6 VIPs the guard allows, each to the proxy, or refused when it is a `tcp` service
/// with no instance and `reject_empty` (as IPv4 ones: see `routing::desired_rules`).
pub(super) fn ipv6_services(
    state: &State,
    routes: &RouteTable,
    verdict: &Verdict,
    reject_empty: bool,
) -> Vec<(SocketAddr, (String, steering::Action))> {
    state
        .services
        .values()
        .filter(|s| verdict.allows(&s.name))
        .filter_map(|s| match s.address {
            Some(vip @ SocketAddr::V6(_)) => {
                let action = if reject_empty && has_no_instance(s, routes) {
                    steering::Action::Refuse
                } else {
                    steering::Action::Proxy
                };
                Some((vip, (s.name.clone(), action)))
            }
            _ => None,
        })
        .collect()
}

/// Applies `desired` unless it is what was applied last: only the difference after a success
/// (one map update for one service), everything from a fresh read otherwise.
pub(super) async fn sync(status: &Arc<Status>, desired: steering::Desired) {
    let previous = status.steered.lock().ok().and_then(|a| a.clone());
    if previous.as_deref() == Some(&desired) {
        return;
    }
    let status = status.clone();
    let result = tokio::task::spawn_blocking(move || {
        let Some(s) = status.rules.as_ref().and_then(|r| r.steering.as_ref()) else {
            return Ok(());
        };
        match &previous {
            Some(previous) => s.apply_change(previous, &desired)?,
            None => s.apply(&desired)?,
        }
        if let Ok(mut a) = status.steered.lock() {
            *a = Some(Arc::new(desired));
        }
        Ok::<_, steering::Error>(())
    })
    .await;
    match result {
        Ok(Ok(())) => tracing::debug!("steering applied"),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "applying the steering failed; retrying at the next drift check")
        }
        Err(e) => tracing::error!(error = %e, "steering task failed"),
    }
}

/// Compares the kernel with the steering last applied; true (and the record of it cleared, so
/// that the next sync applies everything) when they differ or nothing was applied yet.
pub(super) async fn drifted(status: &Arc<Status>) -> bool {
    let s = status.clone();
    let drifted = tokio::task::spawn_blocking(move || {
        let steering = s.rules.as_ref()?.steering.as_ref()?;
        let Some(applied) = s.steered.lock().ok()?.clone() else {
            return Some(true);
        };
        match steering.drift(&applied) {
            Ok(d) if d.is_clean() => Some(false),
            Ok(d) => {
                tracing::warn!(drift = %d, "installed steering differs from the desired one; repairing");
                Some(true)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the installed steering");
                None
            }
        }
    })
    .await
    .ok()
    .flatten();
    if drifted == Some(true) {
        if let Ok(mut a) = status.steered.lock() {
            *a = None;
        }
    }
    drifted == Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::guard::RefusedVip;
    use crate::controller::routing::{route_table, Built};
    use crate::metrics::Metrics;
    use crate::model::{decode, Instance, Service};

    /// A service as its store record reads (`protocol` "tcp" or "http").
    fn service(name: &str, vip: &str, protocol: &str) -> Arc<Service> {
        let json = serde_json::json!({ "name": name, "address": vip, "protocol": protocol });
        Arc::new(decode(json.to_string().as_bytes()).unwrap())
    }

    #[test]
    fn ipv6_vips_are_steered_or_refused_as_ipv4_ones() {
        let mut state = State::default();
        for s in [
            service("web6", "[fd00:18::a]:80", "tcp"),
            service("idle6", "[fd00:18::b]:80", "tcp"),
            service("api6", "[fd00:18::c]:80", "http"),
            service("mine6", "[fd00:18::d]:80", "tcp"),
            service("web4", "198.18.0.10:80", "tcp"),
        ] {
            state.services.insert(s.name.clone(), s);
        }
        for (svc, addr) in [("web6", "[fd00:10::10]:80"), ("web4", "192.0.2.1:80")] {
            let i = Instance::new_static(svc, "i1", addr.parse().unwrap());
            state
                .instances
                .insert((svc.into(), "i1".into()), Arc::new(i));
        }
        let table = route_table(&state, &mut Built::default(), &Metrics::new());
        let mut verdict = Verdict::default();
        verdict.refused.insert(
            "mine6".into(),
            RefusedVip {
                service: "mine6".into(),
                vip: "[fd00:18::d]:80".parse().unwrap(),
                reason: "an address of lo".into(),
            },
        );
        let got = |reject_empty| -> Vec<String> {
            ipv6_services(&state, &table, &verdict, reject_empty)
                .into_iter()
                .map(|(vip, (name, action))| format!("{vip} {name} {action}"))
                .collect()
        };
        // The http service is steered although empty (its clients get a 503); the guard's
        // refusal and the IPv4 VIP are not here.
        assert_eq!(
            got(true),
            [
                "[fd00:18::c]:80 api6 proxy",
                "[fd00:18::b]:80 idle6 refuse",
                "[fd00:18::a]:80 web6 proxy",
            ]
        );
        assert!(got(false).iter().all(|l| l.ends_with("proxy")));

        let rules = netfilter::Desired::default();
        let d = desired(
            &rules,
            ipv6_services(&state, &table, &verdict, true),
            &BTreeMap::new(),
        );
        assert_eq!(d.services.len(), 3);
        assert!(d.has_ipv6());
    }
}
