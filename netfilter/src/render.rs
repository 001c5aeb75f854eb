//! Desired state to rule text: the pure half of "render desired state, apply atomically".

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddrV4;

use crate::desired::{Desired, Redirect};
use crate::rule;
use crate::validate::{interface_problem, redirect_problem};
use crate::{CANARY_CHAIN, SERVICES_CHAIN};

/// The complete contents of flux's chains and the hooks into them, as `iptables-save` would
/// print them once installed. Built only by [`render`], so every line in it has passed its
/// checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// `-A FLUX-SERVICES ...` lines, sorted by service then VIP so that the same desired state
    /// always gives the same text and an unchanged state never looks like a change.
    service_rules: Vec<String>,
    /// `-A OUTPUT ...` / `-A PREROUTING ...` lines in the order they should end up in, kept
    /// apart from the chain contents because they live in chains flux shares with others.
    hooks: Vec<String>,
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

    /// The hook rules that should exist (once each) in `OUTPUT` and `PREROUTING`.
    pub fn hooks(&self) -> &[String] {
        &self.hooks
    }

    /// What was left out of the ruleset and why.
    pub fn rejected(&self) -> &[Rejected] {
        &self.rejected
    }

    /// Input for `iptables-restore --noflush` that replaces the contents of flux's chains in one
    /// transaction. Declaring a chain flushes it, so the result holds exactly these rules
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
        // About 140 bytes a rule; sized once because a large ruleset is megabytes of text.
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
    let service_rules = render_services(desired, &mut rejected);
    let hooks = render_hooks(&desired.bridge_interfaces, &mut rejected);
    Ruleset {
        service_rules,
        hooks,
        rejected,
    }
}

fn render_services(desired: &Desired, rejected: &mut Vec<Rejected>) -> Vec<String> {
    let mut redirects: Vec<&Redirect> = desired.redirects.iter().collect();
    redirects.sort();
    redirects.dedup();
    // A VIP:port matched by two rules only ever reaches the first; the service whose name sorts
    // first keeps it so the outcome does not depend on the order the controller listed them in.
    let mut owner: BTreeMap<SocketAddrV4, &str> = BTreeMap::new();
    let mut rules = Vec::with_capacity(redirects.len());
    for redirect in redirects {
        if desired
            .vip_ranges
            .iter()
            .any(|r| r.contains(*redirect.vip.ip()))
        {
            continue; // the range rule below covers it
        }
        let taken_by = owner.get(&redirect.vip).copied();
        let reason = redirect_problem(redirect, desired.proxy_port, taken_by);
        match reason {
            Some(reason) => rejected.push(Rejected::Redirect {
                redirect: redirect.clone(),
                reason,
            }),
            None => {
                owner.insert(redirect.vip, &redirect.service);
                rules.push(rule::service_rule(
                    &redirect.service,
                    redirect.vip,
                    desired.proxy_port,
                ));
            }
        }
    }
    let mut ranges = desired.vip_ranges.clone();
    ranges.sort();
    ranges.dedup();
    // After the per-VIP rules, so a VIP outside every range is matched by its own rule first.
    rules.extend(
        ranges
            .iter()
            .map(|r| rule::range_rule(r, desired.proxy_port)),
    );
    rules
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

    #[test]
    fn vip_ranges_replace_per_service_rules_inside_them() {
        let mut d = desired(
            vec![
                redirect("web", "198.18.0.10:80"),
                redirect("old", "10.128.0.1:80"),
            ],
            &[],
        );
        d.vip_ranges = vec![crate::VipRange {
            addr: "198.18.0.0".parse().unwrap(),
            prefix_len: 15,
        }];
        let rs = render(&d);
        assert_eq!(
            rs.service_rules(),
            [
                r#"-A FLUX-SERVICES -d 10.128.0.1/32 -p tcp -m tcp --dport 80 -m comment --comment "flux:old" -j REDIRECT --to-ports 7100"#,
                r#"-A FLUX-SERVICES -d 198.18.0.0/15 -p tcp -m comment --comment "flux vip range" -j REDIRECT --to-ports 7100"#,
            ]
        );
    }

    #[test]
    fn renders_exact_iptables_save_text() {
        let rs = render(&desired(
            vec![
                redirect("web", "198.18.0.10:80"),
                redirect("api", "198.18.0.11:443"),
            ],
            &["docker0", "br-+"],
        ));
        assert_eq!(
            rs.service_rules(),
            [
                r#"-A FLUX-SERVICES -d 198.18.0.11/32 -p tcp -m tcp --dport 443 -m comment --comment "flux:api" -j REDIRECT --to-ports 7100"#,
                r#"-A FLUX-SERVICES -d 198.18.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "flux:web" -j REDIRECT --to-ports 7100"#,
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
                "-A FLUX-SERVICES -d 198.18.0.11/32 -p tcp -m tcp --dport 443 -m comment --comment \"flux:api\" -j REDIRECT --to-ports 7100\n",
                "-A FLUX-SERVICES -d 198.18.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"flux:web\" -j REDIRECT --to-ports 7100\n",
                "COMMIT\n",
            )
        );
    }

    #[test]
    fn empty_state_still_hooks_and_declares_chains() {
        let rs = render(&desired(vec![], &[]));
        assert!(rs.service_rules().is_empty());
        assert_eq!(rs.hooks().len(), 1);
        assert_eq!(
            rs.restore_input(),
            "*nat\n:FLUX-SERVICES - [0:0]\n:FLUX-CANARY - [0:0]\nCOMMIT\n"
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
        assert!(ra.service_rules()[0].contains("198.18.0.1/32"));
        assert!(ra.service_rules()[1].contains("198.18.0.3/32"));
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
        assert_eq!(rs.service_rules().len(), 1);
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
        assert_eq!(rs.service_rules().len(), 1);
        assert!(rs.service_rules()[0].contains("flux:alpha"));
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
        assert_eq!(rs.service_rules().len(), 1);
        assert_eq!(rs.hooks().len(), 3);
        assert_eq!(rs.rejected().len(), 6);
        for line in rs.service_rules().iter().chain(rs.hooks()) {
            assert!(!line.contains("ACCEPT") && !line.contains('\n'));
        }
    }

    #[test]
    fn unusable_ports_are_rejected() {
        let rs = render(&desired(vec![redirect("web", "198.18.0.10:0")], &[]));
        assert!(rs.service_rules().is_empty());
        assert_eq!(rs.rejected().len(), 1);

        let mut no_proxy = desired(vec![redirect("web", "198.18.0.10:80")], &[]);
        no_proxy.proxy_port = 0;
        let rs = render(&no_proxy);
        assert!(rs.service_rules().is_empty());
        assert!(rs.rejected()[0].to_string().contains("no proxy port"));
    }
}
