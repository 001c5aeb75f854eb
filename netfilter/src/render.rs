//! Desired state to rule text: the pure half of "render desired state, apply atomically".

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use crate::desired::{Desired, Forward, Redirect};
use crate::forward::render_forwards;
use crate::rejected::Rejected;
use crate::rule;
use crate::validate::{interface_problem, redirect_problem};
use crate::{CANARY_CHAIN, EMPTY_SET, FORWARD_CHAIN, REJECT_CHAIN, SERVICES_CHAIN, VIP_SET};

/// The complete contents of flux's chains, the members of its sets and the hooks into the
/// chains, as `iptables-save` and `ipset save` would print them once installed. Built only by
/// [`render`], so every line in it has passed its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// `-A FLUX-SERVICES ...` lines: the return of refused VIPs (when they are refused), the
    /// jump to the kernel-forwarded services (when there are any), the set rule (when the set is
    /// used), then one rule per VIP range, so that the same desired state always gives the same
    /// text.
    service_rules: Vec<String>,
    /// `add flux-vips IP,tcp:PORT comment "flux:SERVICE"` lines, sorted by VIP: one per
    /// redirect not covered by a VIP range.
    set_members: Vec<String>,
    /// Whether the chain matches [`crate::VIP_SET`] (and so the set must exist): always without
    /// VIP ranges, so adding the first service changes only the set; with ranges, only while
    /// some VIP lies outside them.
    uses_set: bool,
    /// `-A OUTPUT ...` / `-A PREROUTING ...` lines in the order they should end up in, kept
    /// apart from the chain contents because they live in chains flux shares with others.
    hooks: Vec<String>,
    /// The VIP:ports of the set members, sorted: what the set routes, for
    /// [`crate::Routed::between`].
    routed_vips: Vec<SocketAddrV4>,
    /// The VIP ranges with a rule, sorted, each once.
    vip_ranges: Vec<crate::VipRange>,
    /// Whether services with no instance are refused ([`Desired::reject_empty`]): then
    /// [`crate::EMPTY_SET`], the return rule, the filter chain and its hooks are all installed,
    /// even with no such service, so that a service losing its last instance changes only set
    /// members.
    rejects_empty: bool,
    /// `add flux-empty IP,tcp:PORT comment "flux:SERVICE"` lines, sorted by VIP: one per
    /// refused VIP, whether inside a VIP range or not.
    empty_members: Vec<String>,
    /// The VIP:ports of those members, sorted.
    empty_vips: Vec<SocketAddrV4>,
    /// `-A FLUX-REJECT ...` lines: the one `REJECT` rule when refusing, else none.
    reject_rules: Vec<String>,
    /// `-A OUTPUT|INPUT|FORWARD ...` hooks of the filter table into [`crate::REJECT_CHAIN`],
    /// in the order they should end up in.
    filter_hooks: Vec<String>,
    /// The kernel-forwarded services that got rules, sorted by VIP, with their destinations.
    forwards: Vec<Forward>,
    /// `-A FLUX-FORWARD ...` lines, one per forward, sorted by VIP; empty (and the chain not
    /// used) when no service is forwarded.
    forward_rules: Vec<String>,
    /// Each forward's own chain by name, with its `DNAT` rules in order.
    forward_chains: BTreeMap<String, Vec<String>>,
    /// What [`render`] left out, for the controller to report.
    rejected: Vec<Rejected>,
}

impl Ruleset {
    /// The lines flux's services chain should hold, in order.
    pub fn service_rules(&self) -> &[String] {
        &self.service_rules
    }

    /// The members [`crate::VIP_SET`] should hold, sorted by VIP, as `ipset save` prints them.
    pub fn set_members(&self) -> &[String] {
        &self.set_members
    }

    /// Whether the services chain matches [`crate::VIP_SET`], so the set must exist.
    pub fn uses_set(&self) -> bool {
        self.uses_set
    }

    /// The hook rules that should exist (once each) in nat's `OUTPUT` and `PREROUTING`.
    pub fn hooks(&self) -> &[String] {
        &self.hooks
    }

    /// The VIP:ports routed through the set, sorted.
    pub fn routed_vips(&self) -> &[SocketAddrV4] {
        &self.routed_vips
    }

    /// The VIP ranges routed by a rule of their own, sorted.
    pub fn vip_ranges(&self) -> &[crate::VipRange] {
        &self.vip_ranges
    }

    /// Whether services with no instance are refused, so [`crate::EMPTY_SET`] must exist and
    /// the filter chain be hooked.
    pub fn rejects_empty(&self) -> bool {
        self.rejects_empty
    }

    /// The members [`crate::EMPTY_SET`] should hold, sorted by VIP, as `ipset save` prints them.
    pub fn empty_members(&self) -> &[String] {
        &self.empty_members
    }

    /// The VIP:ports refused because their service has no instance, sorted.
    pub fn empty_vips(&self) -> &[SocketAddrV4] {
        &self.empty_vips
    }

    /// The lines flux's filter chain [`crate::REJECT_CHAIN`] should hold, in order.
    pub fn reject_rules(&self) -> &[String] {
        &self.reject_rules
    }

    /// The hook rules that should exist (once each) in filter's `OUTPUT`, `INPUT` and
    /// `FORWARD`.
    pub fn filter_hooks(&self) -> &[String] {
        &self.filter_hooks
    }

    /// The kernel-forwarded services that got rules, sorted by VIP, each with its destinations
    /// (those on standby included) sorted by instance name.
    pub fn forwards(&self) -> &[Forward] {
        &self.forwards
    }

    /// The lines [`crate::FORWARD_CHAIN`] should hold, in order; empty when the chain is not
    /// used.
    pub fn forward_rules(&self) -> &[String] {
        &self.forward_rules
    }

    /// Each kernel-forwarded service's own chain by name, with the lines it should hold.
    pub fn forward_chains(&self) -> &BTreeMap<String, Vec<String>> {
        &self.forward_chains
    }

    /// Whether [`crate::FORWARD_CHAIN`] is used (some service is forwarded by the kernel).
    pub fn forwards_any(&self) -> bool {
        !self.forward_rules.is_empty()
    }

    /// What was left out of the ruleset and why.
    pub fn rejected(&self) -> &[Rejected] {
        &self.rejected
    }

    /// Input for `iptables-restore --noflush` that replaces the contents of flux's chains (the
    /// sets' members are not in it: see [`crate::Netfilter::apply`]). Declaring a chain flushes
    /// it, so the result holds exactly these rules whatever was there before, and no other chain
    /// is touched. The hooks are not in it: they live in shared chains where a blind `-I` would
    /// duplicate them, so [`crate::Netfilter::apply`] adds only those missing.
    ///
    /// The filter table comes first: iptables-restore commits each table on its own and stops
    /// at the first that fails, so a failure in nat leaves empty services refused rather than
    /// neither refused nor redirected.
    pub fn restore_input(&self) -> String {
        let mut input = String::new();
        if self.rejects_empty {
            input.push_str(&self.filter_contents());
            input.push_str("COMMIT\n");
        }
        input.push_str(&self.nat_contents());
        input.push_str("COMMIT\n");
        input
    }

    /// The nat part of the restore input up to (not including) its `COMMIT`, so apply can add
    /// hook commands to the same transaction.
    pub(crate) fn nat_contents(&self) -> String {
        let mut input = String::with_capacity(64 + 140 * self.service_rules.len());
        input.push_str("*nat\n");
        input.push_str(&format!(":{SERVICES_CHAIN} - [0:0]\n"));
        input.push_str(&format!(":{CANARY_CHAIN} - [0:0]\n"));
        // Every chain is declared before any rule, since a rule may only jump to a chain
        // declared already.
        let chains = self.forward_chains.iter().map(|(c, r)| (c.as_str(), r));
        let (declarations, rules) = self.forward_contents(self.forwards_any(), chains);
        input.push_str(&declarations);
        for line in &self.service_rules {
            input.push_str(line);
            input.push('\n');
        }
        input.push_str(&rules);
        input
    }

    /// The kernel-forwarding part of the nat table's restore input, on its own so that a change
    /// of instances rewrites only the chains that changed: the lines declaring (and so
    /// flushing) the forward chain, when `with_jumps`, and the given service chains; then their
    /// rules.
    pub(crate) fn forward_contents<'a>(
        &self,
        with_jumps: bool,
        chains: impl Iterator<Item = (&'a str, &'a Vec<String>)> + Clone,
    ) -> (String, String) {
        let (mut declarations, mut rules) = (String::new(), String::new());
        if with_jumps {
            declarations.push_str(&format!(":{FORWARD_CHAIN} - [0:0]\n"));
            for line in &self.forward_rules {
                rules.push_str(line);
                rules.push('\n');
            }
        }
        for (chain, lines) in chains {
            declarations.push_str(&format!(":{chain} - [0:0]\n"));
            for line in lines {
                rules.push_str(line);
                rules.push('\n');
            }
        }
        (declarations, rules)
    }

    /// The filter part of the restore input up to its `COMMIT`: flux's reject chain, declared
    /// (and so flushed), with its rules.
    pub(crate) fn filter_contents(&self) -> String {
        let mut input = format!("*filter\n:{REJECT_CHAIN} - [0:0]\n");
        for line in &self.reject_rules {
            input.push_str(line);
            input.push('\n');
        }
        input
    }
}

/// Turns the desired state into rule text. Pure, so the whole ruleset can be checked in unit
/// tests and compared with the kernel's without side effects.
pub fn render(desired: &Desired) -> Ruleset {
    let mut rejected = Vec::new();
    let owners = render_members(desired, &mut rejected);
    let forwarded = render_forwards(
        desired.forwards.iter().filter(|f| {
            owners
                .forwarded
                .get(&f.vip)
                .is_some_and(|service| *service == f.service)
        }),
        &mut rejected,
    );
    let routed_vips: Vec<SocketAddrV4> = owners.routed.keys().copied().collect();
    let set_members: Vec<String> = owners
        .routed
        .iter()
        .map(|(vip, service)| rule::set_member(VIP_SET, service, *vip))
        .collect();
    let empty_vips: Vec<SocketAddrV4> = owners.empty.keys().copied().collect();
    let empty_members: Vec<String> = owners
        .empty
        .iter()
        .map(|(vip, service)| rule::set_member(EMPTY_SET, service, *vip))
        .collect();
    let uses_set = desired.vip_ranges.is_empty() || !set_members.is_empty();
    let rejects_empty = desired.reject_empty;
    let mut ranges = desired.vip_ranges.clone();
    ranges.sort();
    ranges.dedup();
    // The return of refused VIPs first, so neither their own member nor a range takes them;
    // then the kernel-forwarded VIPs, which no redirect may take either; then the set rule, so
    // a VIP outside every range is matched by its member; the ranges' rules after it.
    let service_rules = rejects_empty
        .then(rule::empty_return_rule)
        .into_iter()
        .chain((!forwarded.rules.is_empty()).then(rule::forward_jump_rule))
        .chain(uses_set.then(|| rule::set_rule(desired.proxy_port)))
        .chain(
            ranges
                .iter()
                .map(|r| rule::range_rule(r, desired.proxy_port)),
        )
        // UDP last: every rule above matches TCP alone.
        .chain(udp_rules(&desired.udp_redirects, &mut rejected))
        .collect();
    let bridges = valid_bridges(&desired.bridge_interfaces, &mut rejected);
    let hooks = std::iter::once(rule::output_hook())
        .chain(bridges.iter().map(|b| rule::prerouting_hook(b)))
        .collect();
    let (reject_rules, filter_hooks) = if rejects_empty {
        let hooks = std::iter::once(rule::filter_output_hook())
            .chain(["INPUT", "FORWARD"].into_iter().flat_map(|chain| {
                bridges
                    .iter()
                    .map(move |b| rule::filter_bridge_hook(chain, b))
            }))
            .collect();
        (vec![rule::reject_rule()], hooks)
    } else {
        (vec![], vec![])
    };
    Ruleset {
        service_rules,
        set_members,
        uses_set,
        hooks,
        routed_vips,
        vip_ranges: ranges,
        rejects_empty,
        empty_members,
        empty_vips,
        reject_rules,
        filter_hooks,
        forwards: forwarded.forwards,
        forward_rules: forwarded.rules,
        forward_chains: forwarded.chains,
        rejected,
    }
}

/// What a VIP gets. `Route` sorts first, so of two identical entries (a service listed both to
/// route and to refuse) the route is kept; a forward is kept over a refusal likewise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Route,
    Forward,
    Refuse,
}

/// Each set's members by VIP, with the service that keeps it, and the kernel-forwarded VIPs.
struct Owners<'a> {
    routed: BTreeMap<SocketAddrV4, &'a str>,
    empty: BTreeMap<SocketAddrV4, &'a str>,
    forwarded: BTreeMap<SocketAddrV4, &'a str>,
}

/// The redirects outside every VIP range, the refusals and the kernel forwards, by VIP, each
/// with the service that keeps it. A VIP belongs to one service and gets one treatment at most:
/// were it in both sets, it would be refused although routable.
fn render_members<'a>(desired: &'a Desired, rejected: &mut Vec<Rejected>) -> Owners<'a> {
    // Without the refusal's set, a service with no instance is redirected like any other (the
    // proxy resets its connections).
    let refuse = if desired.reject_empty {
        Kind::Refuse
    } else {
        Kind::Route
    };
    let entry = |r: &'a Redirect, kind| Entry {
        service: &r.service,
        vip: r.vip,
        kind,
    };
    let mut entries: Vec<Entry<'a>> = desired
        .redirects
        .iter()
        .map(|r| entry(r, Kind::Route))
        .chain(desired.rejects.iter().map(|r| entry(r, refuse)))
        .chain(desired.forwards.iter().map(|f| Entry {
            service: &f.service,
            vip: f.vip,
            kind: Kind::Forward,
        }))
        .collect();
    entries.sort();
    entries.dedup_by(|a, b| (a.service, a.vip) == (b.service, b.vip));
    // A set holds a VIP:port once; the service whose name sorts first keeps it so the outcome
    // does not depend on the order the controller listed them in.
    let mut owner: BTreeMap<SocketAddrV4, (&str, Option<Kind>)> = BTreeMap::new();
    for Entry { service, vip, kind } in entries {
        if kind == Kind::Route && desired.vip_ranges.iter().any(|r| r.contains(*vip.ip())) {
            // The range rule covers it; it still holds its VIP against a refusal by another
            // service. Nothing is rendered from it, so there is nothing to check.
            owner.entry(vip).or_insert((service, None));
            continue;
        }
        // A forward, unlike a redirect, is not covered by a range: it needs its own rule.
        let taken_by = owner.get(&vip).map(|(service, _)| *service);
        let proxy_port = (kind == Kind::Route).then_some(desired.proxy_port);
        match redirect_problem(service, vip, proxy_port, taken_by) {
            Some(reason) => {
                let redirect = Redirect {
                    service: service.to_string(),
                    vip,
                };
                rejected.push(match kind {
                    Kind::Route => Rejected::Redirect { redirect, reason },
                    Kind::Refuse => Rejected::Refusal { redirect, reason },
                    Kind::Forward => Rejected::Forward {
                        service: redirect.service,
                        vip,
                        reason,
                    },
                })
            }
            None => {
                owner.insert(vip, (service, Some(kind)));
            }
        }
    }
    let of = |wanted: Kind| {
        owner
            .iter()
            .filter(|(_, (_, kind))| *kind == Some(wanted))
            .map(|(vip, (service, _))| (*vip, *service))
            .collect()
    };
    Owners {
        routed: of(Kind::Route),
        empty: of(Kind::Refuse),
        forwarded: of(Kind::Forward),
    }
}

/// One VIP as some service wants it treated, for [`render_members`]. Sorted by service, then
/// VIP, then kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry<'a> {
    service: &'a str,
    vip: SocketAddrV4,
    kind: Kind,
}

/// The bridge interfaces that can be hooked, sorted, each once; the others are reported.
fn valid_bridges<'a>(interfaces: &'a [String], rejected: &mut Vec<Rejected>) -> Vec<&'a str> {
    let mut names: Vec<&String> = interfaces.iter().collect();
    names.sort();
    names.dedup();
    let mut valid = Vec::new();
    for name in names {
        match interface_problem(name) {
            Some(reason) => rejected.push(Rejected::BridgeInterface {
                name: name.clone(),
                reason: reason.to_string(),
            }),
            None => valid.push(name.as_str()),
        }
    }
    valid
}

/// The `udp` services' redirect rules, sorted by VIP so that the same desired state always
/// gives the same text; one per VIP (the first by port), and none for a name that could
/// inject rule text or a port 0 (reported in `rejected`, as a redirect).
fn udp_rules(redirects: &[crate::UdpRedirect], rejected: &mut Vec<Rejected>) -> Vec<String> {
    let mut sorted: Vec<&crate::UdpRedirect> = redirects.iter().collect();
    sorted.sort_by_key(|r| (r.vip, r.port));
    sorted.dedup_by_key(|r| r.vip);
    sorted
        .into_iter()
        .filter(|r| {
            let problem = redirect_problem(&r.service, r.vip, Some(r.port), None);
            if let Some(reason) = &problem {
                rejected.push(Rejected::Redirect {
                    redirect: Redirect {
                        service: r.service.clone(),
                        vip: r.vip,
                    },
                    reason: reason.clone(),
                });
            }
            problem.is_none()
        })
        .map(|r| rule::udp_rule(&r.service, r.vip, r.port))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(service: &str, vip: &str) -> Redirect {
        Redirect {
            service: service.to_string(),
            vip: vip.parse().expect("test VIPs are valid"),
        }
    }

    fn desired(redirects: Vec<Redirect>, bridges: &[&str]) -> Desired {
        Desired {
            redirects,
            proxy_port: 7100,
            bridge_interfaces: bridges.iter().map(|s| s.to_string()).collect(),
            ..Desired::default()
        }
    }

    /// `desired` with `rejects` refused.
    fn refusing(redirects: Vec<Redirect>, rejects: Vec<Redirect>, bridges: &[&str]) -> Desired {
        Desired {
            rejects,
            reject_empty: true,
            ..desired(redirects, bridges)
        }
    }

    const RETURN_RULE: &str = r#"-A FLUX-SERVICES -p tcp -m set --match-set flux-empty dst,dst -m comment --comment "flux no instance" -j RETURN"#;
    const REJECT_RULE: &str = r#"-A FLUX-REJECT -p tcp -m set --match-set flux-empty dst,dst -m comment --comment "flux no instance" -j REJECT --reject-with tcp-reset"#;

    #[test]
    fn services_with_no_instance_are_refused_not_redirected() {
        let rs = render(&refusing(
            vec![redirect("web", "198.18.0.10:80")],
            vec![redirect("idle", "198.18.0.11:80")],
            &["docker0"],
        ));
        assert!(rs.rejects_empty() && rs.uses_set());
        assert!(rs.rejected().is_empty());
        // The return comes first: nothing after it may redirect a refused VIP.
        assert_eq!(rs.service_rules(), [RETURN_RULE, SET_RULE]);
        assert_eq!(
            rs.set_members(),
            [r#"add flux-vips 198.18.0.10,tcp:80 comment "flux:web""#]
        );
        assert_eq!(
            rs.empty_members(),
            [r#"add flux-empty 198.18.0.11,tcp:80 comment "flux:idle""#]
        );
        assert_eq!(rs.routed_vips(), ["198.18.0.10:80".parse().unwrap()]);
        assert_eq!(rs.empty_vips(), ["198.18.0.11:80".parse().unwrap()]);
        assert_eq!(rs.reject_rules(), [REJECT_RULE]);
        assert_eq!(
            rs.filter_hooks(),
            [
                r#"-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT"#,
                r#"-A INPUT -i docker0 -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT"#,
                r#"-A FORWARD -i docker0 -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT"#,
            ]
        );
        // The nat hooks are unchanged.
        assert_eq!(rs.hooks().len(), 2);
        assert_eq!(
            rs.restore_input(),
            format!(
                "*filter\n:FLUX-REJECT - [0:0]\n{REJECT_RULE}\nCOMMIT\n\
                 *nat\n:FLUX-SERVICES - [0:0]\n:FLUX-CANARY - [0:0]\n{RETURN_RULE}\n{SET_RULE}\nCOMMIT\n"
            )
        );
    }

    #[test]
    fn refusing_with_no_empty_service_still_installs_the_rules() {
        // So that a service losing its last instance changes set members only.
        let rs = render(&refusing(
            vec![redirect("web", "198.18.0.10:80")],
            vec![],
            &[],
        ));
        assert!(rs.empty_members().is_empty());
        assert_eq!(rs.service_rules(), [RETURN_RULE, SET_RULE]);
        assert_eq!(rs.reject_rules(), [REJECT_RULE]);
        assert_eq!(rs.filter_hooks().len(), 1);
    }

    #[test]
    fn without_reject_empty_refusals_are_redirected() {
        let mut d = refusing(
            vec![redirect("web", "198.18.0.10:80")],
            vec![redirect("idle", "198.18.0.11:80")],
            &["docker0"],
        );
        d.reject_empty = false;
        let rs = render(&d);
        assert!(!rs.rejects_empty());
        assert_eq!(rs.service_rules(), [SET_RULE]);
        assert_eq!(rs.set_members().len(), 2);
        assert!(rs.set_members()[1].contains("flux:idle"));
        assert!(rs.empty_members().is_empty() && rs.empty_vips().is_empty());
        assert!(rs.reject_rules().is_empty() && rs.filter_hooks().is_empty());
        assert!(!rs.restore_input().contains("*filter"));
    }

    #[test]
    fn refused_vips_inside_a_range_are_members_and_returned_before_the_range_rule() {
        let mut d = refusing(
            vec![redirect("web", "198.18.0.10:80")],
            vec![redirect("idle", "198.18.0.11:80")],
            &[],
        );
        d.vip_ranges = vec![range()];
        let rs = render(&d);
        assert!(!rs.uses_set(), "every routed VIP is in the range");
        assert_eq!(rs.service_rules(), [RETURN_RULE, RANGE_RULE]);
        assert!(rs.set_members().is_empty());
        assert_eq!(
            rs.empty_members(),
            [r#"add flux-empty 198.18.0.11,tcp:80 comment "flux:idle""#]
        );
    }

    #[test]
    fn a_vip_is_in_one_set_at_most() {
        // Listed both ways for the same service: routed.
        let rs = render(&refusing(
            vec![redirect("web", "198.18.0.10:80")],
            vec![redirect("web", "198.18.0.10:80")],
            &[],
        ));
        assert_eq!(rs.set_members().len(), 1);
        assert!(rs.empty_members().is_empty());
        assert!(rs.rejected().is_empty());
        // Two services: the first by name keeps it, whichever set it goes to.
        let rs = render(&refusing(
            vec![redirect("zeta", "198.18.0.10:80")],
            vec![redirect("alpha", "198.18.0.10:80")],
            &[],
        ));
        assert!(rs.set_members().is_empty());
        assert_eq!(rs.empty_members().len(), 1);
        assert!(matches!(
            rs.rejected(),
            [Rejected::Redirect { redirect, reason }]
                if redirect.service == "zeta" && reason.contains("alpha")
        ));
        let rs = render(&refusing(
            vec![redirect("alpha", "198.18.0.10:80")],
            vec![redirect("zeta", "198.18.0.10:80")],
            &[],
        ));
        assert_eq!(rs.set_members().len(), 1);
        assert!(rs.empty_members().is_empty());
        assert!(rs.rejected()[0]
            .to_string()
            .starts_with("refusal of 198.18.0.10:80"));
        // Inside a range too: the range's service holds its VIP against a refusal.
        let mut d = refusing(
            vec![redirect("alpha", "198.18.0.10:80")],
            vec![redirect("zeta", "198.18.0.10:80")],
            &[],
        );
        d.vip_ranges = vec![range()];
        let rs = render(&d);
        assert!(rs.empty_members().is_empty(), "{:?}", rs.empty_members());
    }

    #[test]
    fn refusals_are_checked_like_redirects_but_need_no_proxy_port() {
        let mut d = refusing(
            vec![],
            vec![
                redirect("ok", "198.18.0.1:80"),
                redirect("bad\" -j ACCEPT", "198.18.0.2:80"),
                redirect("zero", "198.18.0.3:0"),
            ],
            &[],
        );
        d.proxy_port = 0;
        let rs = render(&d);
        assert_eq!(
            rs.empty_members(),
            [r#"add flux-empty 198.18.0.1,tcp:80 comment "flux:ok""#]
        );
        assert_eq!(rs.rejected().len(), 2);
        assert!(rs
            .rejected()
            .iter()
            .all(|r| matches!(r, Rejected::Refusal { .. })));
    }

    fn forward(service: &str, vip: &str, instances: &[(&str, &str)]) -> Forward {
        Forward {
            service: service.into(),
            vip: vip.parse().expect("test VIPs are valid"),
            destinations: instances
                .iter()
                .map(|(instance, addr)| crate::Destination {
                    instance: instance.to_string(),
                    addr: addr.parse().expect("test addresses are valid"),
                    standby: false,
                })
                .collect(),
        }
    }

    const FORWARD_JUMP: &str =
        r#"-A FLUX-SERVICES -p tcp -m comment --comment "flux forward" -j FLUX-FORWARD"#;

    #[test]
    fn forwarded_services_are_no_set_members_and_come_before_every_redirect() {
        let mut d = refusing(
            vec![redirect("web", "198.18.0.10:80")],
            vec![redirect("idle", "198.18.0.11:80")],
            &["docker0"],
        );
        d.vip_ranges = vec![range()];
        d.forwards = vec![forward(
            "bulk",
            "198.18.0.12:80",
            &[("b1", "127.0.0.1:9001"), ("b2", "127.0.0.1:9002")],
        )];
        let rs = render(&d);
        assert!(rs.rejected().is_empty(), "{:?}", rs.rejected());
        // Refusals first, then forwards, then the redirects (the range's included).
        assert_eq!(rs.service_rules(), [RETURN_RULE, FORWARD_JUMP, RANGE_RULE]);
        assert!(rs.set_members().is_empty());
        assert_eq!(rs.empty_members().len(), 1);
        assert_eq!(
            rs.forward_rules(),
            [
                r#"-A FLUX-FORWARD -d 198.18.0.12/32 -p tcp -m tcp --dport 80 -m comment --comment "flux:bulk" -j FLUX-FWD-C612000C-80"#
            ]
        );
        assert_eq!(rs.forward_chains()["FLUX-FWD-C612000C-80"].len(), 2);
        assert_eq!(rs.forwards().len(), 1);
        assert!(rs.forwards_any());
        let nat = rs.restore_input();
        let nat = &nat[nat.find("*nat").unwrap()..];
        assert_eq!(
            nat,
            format!(
                "*nat\n:FLUX-SERVICES - [0:0]\n:FLUX-CANARY - [0:0]\n\
                 :FLUX-FORWARD - [0:0]\n:FLUX-FWD-C612000C-80 - [0:0]\n\
                 {RETURN_RULE}\n{FORWARD_JUMP}\n{RANGE_RULE}\n{}\n{}\n{}\nCOMMIT\n",
                rs.forward_rules()[0],
                rs.forward_chains()["FLUX-FWD-C612000C-80"][0],
                rs.forward_chains()["FLUX-FWD-C612000C-80"][1],
            )
        );
    }

    #[test]
    fn without_forwarded_services_nothing_of_forwarding_is_rendered() {
        let rs = render(&desired(vec![redirect("web", "198.18.0.10:80")], &[]));
        assert!(!rs.forwards_any());
        assert!(rs.forward_rules().is_empty() && rs.forward_chains().is_empty());
        assert!(!rs.restore_input().contains("FORWARD"));
    }

    #[test]
    fn a_forwarded_vip_is_held_by_one_service() {
        let mut d = desired(vec![redirect("alpha", "198.18.0.10:80")], &[]);
        d.forwards = vec![
            forward("zeta", "198.18.0.10:80", &[("b1", "10.0.0.1:80")]),
            forward("beta", "198.18.0.11:0", &[("b1", "10.0.0.1:80")]),
        ];
        let rs = render(&d);
        assert!(!rs.forwards_any());
        assert_eq!(rs.set_members().len(), 1);
        let reasons: Vec<String> = rs.rejected().iter().map(|r| r.to_string()).collect();
        assert_eq!(
            reasons,
            [
                "kernel forwarding of 198.18.0.11:0 for service \"beta\" skipped: port 0 matches no connection",
                "kernel forwarding of 198.18.0.10:80 for service \"zeta\" skipped: 198.18.0.10:80 is already taken by service \"alpha\"",
            ]
        );
        // The forward keeps its VIP against a refusal of a service sorting after it.
        let mut d = refusing(vec![], vec![redirect("zeta", "198.18.0.10:80")], &[]);
        d.forwards = vec![forward("alpha", "198.18.0.10:80", &[("b1", "10.0.0.1:80")])];
        let rs = render(&d);
        assert!(rs.forwards_any() && rs.empty_members().is_empty());
    }

    #[test]
    fn forwarded_output_does_not_depend_on_input_order() {
        let f = vec![
            forward(
                "b",
                "198.18.0.2:80",
                &[("x", "10.0.0.1:80"), ("y", "10.0.0.2:80")],
            ),
            forward("a", "198.18.0.1:80", &[("z", "10.0.0.3:80")]),
        ];
        let mut reversed = f.clone();
        reversed.reverse();
        reversed[0].destinations.reverse();
        let with = |forwards| {
            render(&Desired {
                forwards,
                ..desired(vec![], &[])
            })
        };
        assert_eq!(with(f), with(reversed));
    }

    const SET_RULE: &str = r#"-A FLUX-SERVICES -p tcp -m set --match-set flux-vips dst,dst -m comment --comment "flux vips" -j REDIRECT --to-ports 7100"#;
    const RANGE_RULE: &str = r#"-A FLUX-SERVICES -d 198.18.0.0/15 -p tcp -m comment --comment "flux vip range" -j REDIRECT --to-ports 7100"#;

    fn range() -> crate::VipRange {
        crate::VipRange {
            addr: "198.18.0.0".parse().unwrap(),
            prefix_len: 15,
        }
    }

    #[test]
    fn vip_ranges_replace_set_members_inside_them() {
        let mut d = desired(
            vec![
                redirect("web", "198.18.0.10:80"),
                redirect("old", "10.128.0.1:80"),
            ],
            &[],
        );
        d.vip_ranges = vec![range()];
        let rs = render(&d);
        assert!(rs.uses_set());
        assert_eq!(rs.service_rules(), [SET_RULE, RANGE_RULE]);
        assert_eq!(
            rs.set_members(),
            [r#"add flux-vips 10.128.0.1,tcp:80 comment "flux:old""#]
        );
    }

    #[test]
    fn vip_ranges_covering_every_vip_need_no_set() {
        let mut d = desired(vec![redirect("web", "198.18.0.10:80")], &[]);
        d.vip_ranges = vec![range(), range()];
        let rs = render(&d);
        assert!(!rs.uses_set());
        assert!(rs.set_members().is_empty());
        assert_eq!(rs.service_rules(), [RANGE_RULE]);
    }

    #[test]
    fn renders_one_rule_and_one_member_per_vip() {
        let rs = render(&desired(
            vec![
                redirect("web", "198.18.0.10:80"),
                redirect("api", "198.18.0.11:443"),
                redirect("web", "198.18.0.9:8080"),
            ],
            &["docker0", "br-+"],
        ));
        assert!(rs.uses_set());
        assert_eq!(rs.service_rules(), [SET_RULE]);
        assert_eq!(
            rs.set_members(),
            [
                r#"add flux-vips 198.18.0.9,tcp:8080 comment "flux:web""#,
                r#"add flux-vips 198.18.0.10,tcp:80 comment "flux:web""#,
                r#"add flux-vips 198.18.0.11,tcp:443 comment "flux:api""#,
            ]
        );
        assert_eq!(
            rs.hooks(),
            [
                r#"-A OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES"#,
                r#"-A PREROUTING -i br-+ -m comment --comment "flux hook" -j FLUX-SERVICES"#,
                r#"-A PREROUTING -i docker0 -m comment --comment "flux hook" -j FLUX-SERVICES"#,
            ]
        );
        assert!(rs.rejected().is_empty());
        assert_eq!(
            rs.restore_input(),
            concat!(
                "*nat\n",
                ":FLUX-SERVICES - [0:0]\n",
                ":FLUX-CANARY - [0:0]\n",
                "-A FLUX-SERVICES -p tcp -m set --match-set flux-vips dst,dst -m comment --comment \"flux vips\" -j REDIRECT --to-ports 7100\n",
                "COMMIT\n",
            )
        );
    }

    #[test]
    fn empty_state_still_hooks_and_declares_chains() {
        let rs = render(&desired(vec![], &[]));
        // The set rule is there already, so the first service changes only the set.
        assert!(rs.uses_set());
        assert_eq!(rs.service_rules(), [SET_RULE]);
        assert!(rs.set_members().is_empty());
        assert_eq!(rs.hooks().len(), 1);
        assert_eq!(
            rs.restore_input(),
            format!("*nat\n:FLUX-SERVICES - [0:0]\n:FLUX-CANARY - [0:0]\n{SET_RULE}\nCOMMIT\n")
        );
    }

    #[test]
    fn output_does_not_depend_on_input_order() {
        let a = vec![
            redirect("b", "198.18.0.2:80"),
            redirect("a", "198.18.0.1:80"),
            redirect("a", "198.18.0.3:80"),
        ];
        let mut b = a.clone();
        b.reverse();
        let (ra, rb) = (
            render(&desired(a, &["docker0", "br-+"])),
            render(&desired(b, &["br-+", "docker0"])),
        );
        assert_eq!(ra, rb);
        assert!(ra.set_members()[0].contains("198.18.0.1,tcp:80"));
        assert!(ra.set_members()[1].contains("198.18.0.2,tcp:80"));
        assert!(ra.set_members()[2].contains("198.18.0.3,tcp:80"));
    }

    #[test]
    fn identical_redirects_and_interfaces_render_once() {
        let rs = render(&desired(
            vec![
                redirect("web", "198.18.0.10:80"),
                redirect("web", "198.18.0.10:80"),
            ],
            &["docker0", "docker0"],
        ));
        assert_eq!(rs.set_members().len(), 1);
        assert_eq!(rs.hooks().len(), 2);
        assert!(rs.rejected().is_empty());
    }

    #[test]
    fn a_shared_vip_goes_to_the_first_service_by_name() {
        let rs = render(&desired(
            vec![
                redirect("zeta", "198.18.0.10:80"),
                redirect("alpha", "198.18.0.10:80"),
            ],
            &[],
        ));
        assert_eq!(rs.set_members().len(), 1);
        assert!(rs.set_members()[0].contains("flux:alpha"));
        assert!(matches!(
            rs.rejected(),
            [Rejected::Redirect { redirect, reason }]
                if redirect.service == "zeta" && reason.contains("alpha")
        ));
    }

    #[test]
    fn names_that_could_inject_rules_are_rejected() {
        let rs = render(&desired(
            vec![
                redirect("ok", "198.18.0.1:80"),
                redirect("bad\" -j ACCEPT", "198.18.0.2:80"),
                redirect("new\nline", "198.18.0.3:80"),
                redirect("", "198.18.0.4:80"),
            ],
            &[
                "docker0",
                "eth0 -j ACCEPT",
                "+",
                "averyveryverylongname",
                "br-+",
            ],
        ));
        assert_eq!(rs.set_members().len(), 1);
        assert_eq!(rs.hooks().len(), 3);
        assert_eq!(rs.rejected().len(), 6);
        for line in rs
            .service_rules()
            .iter()
            .chain(rs.hooks())
            .chain(rs.set_members())
        {
            assert!(!line.contains("ACCEPT") && !line.contains('\n'));
            assert_eq!(line.matches('"').count(), 2, "{line}");
        }
    }

    #[test]
    fn unusable_ports_are_rejected() {
        let rs = render(&desired(vec![redirect("web", "198.18.0.10:0")], &[]));
        assert!(rs.set_members().is_empty());
        assert_eq!(rs.rejected().len(), 1);

        let mut no_proxy = desired(vec![redirect("web", "198.18.0.10:80")], &[]);
        no_proxy.proxy_port = 0;
        let rs = render(&no_proxy);
        assert!(rs.set_members().is_empty());
        assert!(rs.rejected()[0].to_string().contains("no proxy port"));
    }

    #[test]
    fn udp_services_get_a_redirect_to_their_own_port_after_every_tcp_rule() {
        let mut d = desired(vec![redirect("web", "198.18.0.10:80")], &["docker0"]);
        d.udp_redirects = vec![
            crate::UdpRedirect {
                service: "stats".into(),
                vip: "198.18.0.20:8125".parse().unwrap(),
                port: 40001,
            },
            crate::UdpRedirect {
                service: "dns".into(),
                vip: "198.18.0.2:53".parse().unwrap(),
                port: 40000,
            },
        ];
        let rs = render(&d);
        let rules = rs.service_rules();
        assert_eq!(
            &rules[rules.len() - 2..],
            [
                r#"-A FLUX-SERVICES -d 198.18.0.2/32 -p udp -m udp --dport 53 -m comment --comment "flux:dns" -j REDIRECT --to-ports 40000"#,
                r#"-A FLUX-SERVICES -d 198.18.0.20/32 -p udp -m udp --dport 8125 -m comment --comment "flux:stats" -j REDIRECT --to-ports 40001"#,
            ]
        );
        // A name that could inject rule text gets no rule.
        d.udp_redirects[0].service = "x\" -j ACCEPT".into();
        let rs = render(&d);
        assert_eq!(
            rs.service_rules()
                .iter()
                .filter(|r| r.contains("udp"))
                .count(),
            1
        );
        assert_eq!(rs.rejected().len(), 1);
        // Without udp services the rules are those of before.
        d.udp_redirects.clear();
        assert!(!render(&d).service_rules().iter().any(|r| r.contains("udp")));
    }
}
