//! Kernel-forwarded services to rule text: a jump from [`crate::FORWARD_CHAIN`] for each
//! service's VIP:port to a chain of the service's own, and in that chain one `DNAT` rule per
//! instance that takes new connections.
//!
//! The spread is kube-proxy's: with `n` instances, rule `i` (from 0) matches with probability
//! `1/(n-i)` and the last one always, so each instance gets `1/n` of the connections whatever
//! its place, and no state is kept between connections. nat rules see only a connection's first
//! packet; conntrack sends the rest where the first went, so rewriting the chain (an instance
//! added, removed, or out while its active check fails) changes where new connections go and
//! leaves established ones alone.

use std::collections::BTreeMap;

use crate::desired::{Destination, Forward};
use crate::rejected::Rejected;
use crate::rule;
use crate::validate::destination_problem;

/// The rendered part of the ruleset that forwards services in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Rendered {
    /// The forwards that got rules, sorted by VIP, each with its renderable destinations
    /// (standby ones included) sorted by instance name and address.
    pub forwards: Vec<Forward>,
    /// The rules of [`crate::FORWARD_CHAIN`], one per forward, in the order of `forwards`.
    pub rules: Vec<String>,
    /// Each forward's own chain by name, with its `DNAT` rules in order.
    pub chains: BTreeMap<String, Vec<String>>,
}

/// Renders `forwards`, which have passed the checks every VIP passes (service name, port, one
/// service per VIP). A destination that cannot be rendered is left out and reported; a forward
/// left with no destination to send new connections to gets no rule and is reported.
pub(crate) fn render_forwards<'a>(
    forwards: impl IntoIterator<Item = &'a Forward>,
    rejected: &mut Vec<Rejected>,
) -> Rendered {
    let mut sorted: Vec<&Forward> = forwards.into_iter().collect();
    // By VIP, and the whole entry after it, so that the output does not depend on the input's
    // order; one forward per VIP (the caller has given each VIP to one service already).
    sorted.sort_by(|a, b| (a.vip, a).cmp(&(b.vip, b)));
    sorted.dedup_by_key(|f| f.vip);
    let mut out = Rendered::default();
    for forward in sorted {
        let mut destinations: Vec<Destination> = forward.destinations.clone();
        destinations.sort();
        destinations.dedup();
        destinations.retain(|d| match destination_problem(&forward.service, d) {
            Some(reason) => {
                rejected.push(Rejected::Destination {
                    service: forward.service.clone(),
                    instance: d.instance.clone(),
                    addr: d.addr,
                    reason,
                });
                false
            }
            None => true,
        });
        let taking: Vec<&Destination> = destinations.iter().filter(|d| !d.standby).collect();
        if taking.is_empty() {
            rejected.push(Rejected::Forward {
                service: forward.service.clone(),
                vip: forward.vip,
                reason: "no instance to forward new connections to".to_string(),
            });
            continue;
        }
        let chain = rule::forward_chain_name(forward.vip);
        let n = taking.len();
        let dnat = taking
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let probability = (i + 1 < n).then(|| rule::probability(n - i));
                rule::dnat_rule(
                    &chain,
                    &forward.service,
                    &d.instance,
                    probability.as_deref(),
                    d.addr,
                )
            })
            .collect();
        out.rules
            .push(rule::forward_service_rule(&forward.service, forward.vip));
        out.chains.insert(chain, dnat);
        out.forwards.push(Forward {
            destinations,
            ..forward.clone()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(instance: &str, addr: &str, standby: bool) -> Destination {
        Destination {
            instance: instance.into(),
            addr: addr.parse().expect("test addresses are valid"),
            standby,
        }
    }

    fn forward(service: &str, vip: &str, destinations: Vec<Destination>) -> Forward {
        Forward {
            service: service.into(),
            vip: vip.parse().expect("test VIPs are valid"),
            destinations,
        }
    }

    #[test]
    fn spreads_new_connections_evenly_with_a_statistic_chain() {
        let mut rejected = vec![];
        let r = render_forwards(
            &[forward(
                "web",
                "198.18.0.10:80",
                vec![
                    dest("c", "10.0.0.3:8080", false),
                    dest("a", "10.0.0.1:8080", false),
                    dest("b", "10.0.0.2:8080", false),
                ],
            )],
            &mut rejected,
        );
        assert!(rejected.is_empty());
        assert_eq!(
            r.rules,
            [
                r#"-A FLUX-FORWARD -d 198.18.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "flux:web" -j FLUX-FWD-C612000A-80"#
            ]
        );
        assert_eq!(r.chains.len(), 1);
        assert_eq!(
            r.chains["FLUX-FWD-C612000A-80"],
            [
                r#"-A FLUX-FWD-C612000A-80 -p tcp -m comment --comment "flux:web/a" -m statistic --mode random --probability 0.33333333349 -j DNAT --to-destination 10.0.0.1:8080"#,
                r#"-A FLUX-FWD-C612000A-80 -p tcp -m comment --comment "flux:web/b" -m statistic --mode random --probability 0.50000000000 -j DNAT --to-destination 10.0.0.2:8080"#,
                r#"-A FLUX-FWD-C612000A-80 -p tcp -m comment --comment "flux:web/c" -j DNAT --to-destination 10.0.0.3:8080"#,
            ]
        );
        assert_eq!(r.forwards[0].destinations[0].instance, "a");
    }

    #[test]
    fn standby_instances_get_no_rule_but_stay_the_services() {
        let mut rejected = vec![];
        let r = render_forwards(
            &[forward(
                "web",
                "198.18.0.10:80",
                vec![
                    dest("a", "10.0.0.1:80", true),
                    dest("b", "10.0.0.2:80", false),
                ],
            )],
            &mut rejected,
        );
        assert!(rejected.is_empty());
        assert_eq!(
            r.chains["FLUX-FWD-C612000A-80"],
            [
                r#"-A FLUX-FWD-C612000A-80 -p tcp -m comment --comment "flux:web/b" -j DNAT --to-destination 10.0.0.2:80"#
            ]
        );
        assert_eq!(r.forwards[0].destinations.len(), 2);
    }

    #[test]
    fn a_forward_with_nowhere_to_send_gets_no_rule() {
        let mut rejected = vec![];
        let r = render_forwards(
            &[
                forward("idle", "198.18.0.11:80", vec![]),
                forward(
                    "down",
                    "198.18.0.12:80",
                    vec![dest("a", "10.0.0.1:80", true)],
                ),
            ],
            &mut rejected,
        );
        assert_eq!(r, Rendered::default());
        assert_eq!(rejected.len(), 2);
        assert_eq!(
            rejected[0].to_string(),
            "kernel forwarding of 198.18.0.11:80 for service \"idle\" skipped: no instance to forward new connections to"
        );
    }

    #[test]
    fn destinations_that_could_inject_rules_are_left_out() {
        let mut rejected = vec![];
        let r = render_forwards(
            &[forward(
                "web",
                "198.18.0.10:80",
                vec![
                    dest("ok", "10.0.0.1:80", false),
                    dest("bad\" -j ACCEPT", "10.0.0.2:80", false),
                    dest("zero", "10.0.0.3:0", false),
                    dest(&"x".repeat(201), "10.0.0.4:80", false),
                    dest("ok", "10.0.0.1:80", false), // the same twice: one rule
                ],
            )],
            &mut rejected,
        );
        assert_eq!(rejected.len(), 3, "{rejected:?}");
        assert!(rejected
            .iter()
            .all(|r| matches!(r, Rejected::Destination { .. })));
        assert_eq!(r.chains["FLUX-FWD-C612000A-80"].len(), 1);
        assert!(!r.chains["FLUX-FWD-C612000A-80"][0].contains("ACCEPT"));
        // Both names go into one comment of at most 255 bytes.
        let mut rejected = vec![];
        let long = "s".repeat(200);
        let r = render_forwards(
            &[forward(
                &long,
                "198.18.0.10:80",
                vec![
                    dest(&"i".repeat(49), "10.0.0.1:80", false),
                    dest(&"j".repeat(50), "10.0.0.2:80", false),
                ],
            )],
            &mut rejected,
        );
        assert_eq!(r.forwards[0].destinations.len(), 1);
        assert!(
            rejected[0].to_string().contains("together longer"),
            "{rejected:?}"
        );
    }

    #[test]
    fn forwards_are_ordered_by_vip() {
        let mut rejected = vec![];
        let r = render_forwards(
            &[
                forward("b", "198.18.0.20:80", vec![dest("x", "10.0.0.1:80", false)]),
                forward("a", "198.18.0.3:443", vec![dest("x", "10.0.0.1:80", false)]),
            ],
            &mut rejected,
        );
        assert!(r.rules[0].contains("198.18.0.3/32") && r.rules[1].contains("198.18.0.20/32"));
        assert_eq!(
            r.chains.keys().collect::<Vec<_>>(),
            ["FLUX-FWD-C6120003-443", "FLUX-FWD-C6120014-80"]
        );
    }
}
