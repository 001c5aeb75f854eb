//! Desired state to rule text: the pure half of "render desired state, apply atomically".

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddrV4;

use crate::desired::{Desired, Redirect};
use crate::rule;
use crate::validate::{interface_problem, redirect_problem};
use crate::{CANARY_CHAIN, SERVICES_CHAIN};

/// The complete contents of flux's chains, the members of its VIP set and the hooks into the
/// chains, as `iptables-save` and `ipset save` would print them once installed. Built only by
/// [`render`], so every line in it has passed its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// `-A FLUX-SERVICES ...` lines: the set rule (when the set is used), then one rule per VIP
    /// range, so that the same desired state always gives the same text.
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
    /// What [`render`] left out, for the controller to report.
    rejected: Vec<Rejected>,
}

/// Part of the desired state that [`render`] refused to turn into a rule. One bad entry is
/// skipped and reported instead of blocking every other service's routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// A redirect that was not rendered.
    Redirect {
        /// The redirect as given.
        redirect: Redirect,
        /// Why, for the operator.
        reason: String,
    },
    /// A bridge interface that got no hook.
    BridgeInterface {
        /// The name as given.
        name: String,
        /// Why, for the operator.
        reason: String,
    },
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejected::Redirect { redirect, reason } => write!(
                f,
                "redirect of {} for service {:?} skipped: {reason}",
                redirect.vip, redirect.service
            ),
            Rejected::BridgeInterface { name, reason } => {
                write!(f, "bridge interface {name:?} skipped: {reason}")
            }
        }
    }
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

    /// The hook rules that should exist (once each) in `OUTPUT` and `PREROUTING`.
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

    /// What was left out of the ruleset and why.
    pub fn rejected(&self) -> &[Rejected] {
        &self.rejected
    }

    /// Input for `iptables-restore --noflush` that replaces the contents of flux's chains in one
    /// transaction (the set's members are not in it: see [`crate::Netfilter::apply`]). Declaring a chain flushes it, so the result holds exactly these rules
    /// whatever was there before, and no other chain is touched. The hooks are not in it: they
    /// live in shared chains where a blind `-I` would duplicate them, so
    /// [`crate::Netfilter::apply`] adds only those missing.
    pub fn restore_input(&self) -> String {
        let mut input = self.chain_contents();
        input.push_str("COMMIT\n");
        input
    }

    /// The restore input up to (not including) its `COMMIT`, so apply can add hook commands to
    /// the same transaction.
    pub(crate) fn chain_contents(&self) -> String {
        let mut input = String::with_capacity(64 + 140 * self.service_rules.len());
        input.push_str("*nat\n");
        input.push_str(&format!(":{SERVICES_CHAIN} - [0:0]\n"));
        input.push_str(&format!(":{CANARY_CHAIN} - [0:0]\n"));
        for line in &self.service_rules {
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
    let routed_vips: Vec<SocketAddrV4> = owners.keys().copied().collect();
    let set_members: Vec<String> = owners
        .into_iter()
        .map(|(vip, service)| rule::set_member(service, vip))
        .collect();
    let uses_set = desired.vip_ranges.is_empty() || !set_members.is_empty();
    let mut ranges = desired.vip_ranges.clone();
    ranges.sort();
    ranges.dedup();
    // The set rule first, so a VIP outside every range is matched by its member; the ranges'
    // rules after it.
    let service_rules = uses_set
        .then(|| rule::set_rule(desired.proxy_port))
        .into_iter()
        .chain(
            ranges
                .iter()
                .map(|r| rule::range_rule(r, desired.proxy_port)),
        )
        .collect();
    let hooks = render_hooks(&desired.bridge_interfaces, &mut rejected);
    Ruleset {
        service_rules,
        set_members,
        uses_set,
        hooks,
        routed_vips,
        vip_ranges: ranges,
        rejected,
    }
}

/// The redirects outside every VIP range, by VIP, each with the service that keeps it.
fn render_members<'a>(
    desired: &'a Desired,
    rejected: &mut Vec<Rejected>,
) -> BTreeMap<SocketAddrV4, &'a str> {
    let mut redirects: Vec<&Redirect> = desired.redirects.iter().collect();
    redirects.sort();
    redirects.dedup();
    // A set holds a VIP:port once; the service whose name sorts first keeps it so the outcome
    // does not depend on the order the controller listed them in.
    let mut owner: BTreeMap<SocketAddrV4, &str> = BTreeMap::new();
    for redirect in redirects {
        if desired
            .vip_ranges
            .iter()
            .any(|r| r.contains(*redirect.vip.ip()))
        {
            continue; // the range rule covers it
        }
        let taken_by = owner.get(&redirect.vip).copied();
        match redirect_problem(redirect, desired.proxy_port, taken_by) {
            Some(reason) => rejected.push(Rejected::Redirect {
                redirect: redirect.clone(),
                reason,
            }),
            None => {
                owner.insert(redirect.vip, &redirect.service);
            }
        }
    }
    owner
}

fn render_hooks(interfaces: &[String], rejected: &mut Vec<Rejected>) -> Vec<String> {
    let mut names: Vec<&String> = interfaces.iter().collect();
    names.sort();
    names.dedup();
    let mut hooks = vec![rule::output_hook()];
    for name in names {
        match interface_problem(name) {
            Some(reason) => rejected.push(Rejected::BridgeInterface {
                name: name.clone(),
                reason: reason.to_string(),
            }),
            None => hooks.push(rule::prerouting_hook(name)),
        }
    }
    hooks
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
            vip_ranges: vec![],
        }
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
}
