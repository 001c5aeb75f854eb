//! How the kernel differs from the desired ruleset, so the daemon can repair and report it.

use std::collections::HashMap;
use std::fmt;

use crate::installed::Installed;
use crate::render::Ruleset;

/// Every way flux's rules and sets in the kernel differ from the desired ones. Clean means
/// identical, rule for rule and member for member, so a clean drift after apply proves the
/// kernel holds what was rendered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// The canary chain is gone: someone wiped the table (or deleted flux's chains).
    pub canary_missing: bool,
    /// The services chain is gone, so every VIP is unrouted.
    pub services_chain_missing: bool,
    /// Desired rules of flux's nat chains the kernel lacks (e.g. after `iptables -t nat -F
    /// FLUX-SERVICES`, which leaves the canary intact): the services chain, and the forward
    /// chain and service chains of kernel-forwarded services.
    pub missing_rules: Vec<String>,
    /// Rules in those chains that flux did not render (stale or inserted by someone).
    pub extra_rules: Vec<String>,
    /// Same rules, different order, in one of those chains. Redirects never overlap, but the
    /// order of a kernel-forwarded service's `DNAT` rules sets each instance's share, and the
    /// kernel should hold exactly what was rendered anyway.
    pub misordered: bool,
    /// Kernel-forwarding chains flux wants that do not exist ([`crate::FORWARD_CHAIN`] or a
    /// service's own chain): those services' connections are not forwarded.
    pub missing_chains: Vec<String>,
    /// Kernel-forwarding chains that exist but are not wanted: left from services that are no
    /// longer forwarded (apply deletes them).
    pub extra_chains: Vec<String>,
    /// Desired hooks the kernel lacks, in nat (some traffic is not redirected at all) or in
    /// filter (some connections to services with no instance are not refused).
    pub missing_hooks: Vec<String>,
    /// Hooks that should not be there: duplicates, or for bridges no longer configured.
    pub extra_hooks: Vec<String>,
    /// The ruleset refuses services with no instance but the filter chain is gone.
    pub reject_chain_missing: bool,
    /// Desired rules of the filter chain the kernel lacks (e.g. after `iptables -F
    /// FLUX-REJECT`): connections to services with no instance are not refused.
    pub missing_reject_rules: Vec<String>,
    /// Rules in flux's filter chain that flux did not render.
    pub extra_reject_rules: Vec<String>,
    /// The ruleset matches the VIP set but it does not exist (`ipset destroy`, a reboot of
    /// ipset state): every set-matched VIP is unrouted.
    pub set_missing: bool,
    /// A set of flux's name exists but cannot hold flux's members (another type or family, or
    /// no comment extension); apply replaces it.
    pub set_incompatible: bool,
    /// The ruleset refuses services with no instance but [`crate::EMPTY_SET`] does not exist:
    /// nothing is refused (and nothing returned from the services chain).
    pub empty_set_missing: bool,
    /// A set of [`crate::EMPTY_SET`]'s name exists but cannot hold flux's members.
    pub empty_set_incompatible: bool,
    /// Desired set members the kernel lacks (e.g. after `ipset flush flux-vips`), of either
    /// set (each line names its set). A member whose comment differs counts as missing (and
    /// its installed form as extra).
    pub missing_members: Vec<String>,
    /// Set members flux did not render: stale, or added by someone.
    pub extra_members: Vec<String>,
}

impl Drift {
    /// Compares a rendered ruleset with one read of the kernel. Separate from
    /// [`crate::Netfilter::drift`] so `fluxd debug` can show the installed rules and the drift
    /// from the same read.
    pub fn between(desired: &Ruleset, installed: &Installed) -> Self {
        let (mut missing_rules, mut extra_rules) = (Vec::new(), Vec::new());
        let mut misordered = false;
        let no_rules = Vec::new();
        let mut compare = |want: &[String], have: &[String]| {
            let (missing, extra) = difference(want, have);
            misordered |= missing.is_empty() && extra.is_empty() && want != have;
            missing_rules.extend(missing);
            extra_rules.extend(extra);
        };
        compare(desired.service_rules(), &installed.service_rules);
        compare(desired.forward_rules(), &installed.forward_rules);
        for (chain, want) in desired.forward_chains() {
            compare(
                want,
                installed.forward_chains.get(chain).unwrap_or(&no_rules),
            );
        }
        let (mut missing_chains, mut extra_chains) = (Vec::new(), Vec::new());
        match (desired.forwards_any(), installed.forward_chain) {
            (true, false) => missing_chains.push(crate::FORWARD_CHAIN.to_string()),
            (false, true) => extra_chains.push(crate::FORWARD_CHAIN.to_string()),
            _ => {}
        }
        for (chain, have) in &installed.forward_chains {
            if !desired.forward_chains().contains_key(chain) {
                extra_chains.push(chain.clone());
                compare(&[], have);
            }
        }
        missing_chains.extend(
            desired
                .forward_chains()
                .keys()
                .filter(|c| !installed.forward_chains.contains_key(*c))
                .cloned(),
        );
        let (mut missing_hooks, mut extra_hooks) = difference(desired.hooks(), &installed.hooks);
        let (missing, extra) = difference(desired.filter_hooks(), &installed.filter_hooks);
        missing_hooks.extend(missing);
        extra_hooks.extend(extra);
        // The chain's one rendered rule cannot be out of order, so only the contents count.
        let (missing_reject_rules, extra_reject_rules) =
            difference(desired.reject_rules(), &installed.reject_rules);
        // A set the ruleset does not use is not compared: nothing matches it.
        let (mut missing_members, mut extra_members) = if desired.uses_set() {
            difference(desired.set_members(), &installed.set_members)
        } else {
            (vec![], vec![])
        };
        if desired.rejects_empty() {
            let (missing, extra) = difference(desired.empty_members(), &installed.empty_members);
            missing_members.extend(missing);
            extra_members.extend(extra);
        }
        let incompatible = |set: &Option<String>| {
            set.as_deref()
                .is_some_and(|create| !crate::rule::set_compatible(create))
        };
        Drift {
            canary_missing: !installed.canary_chain,
            services_chain_missing: !installed.services_chain,
            missing_rules,
            extra_rules,
            misordered,
            missing_chains,
            extra_chains,
            missing_hooks,
            extra_hooks,
            reject_chain_missing: desired.rejects_empty() && !installed.reject_chain,
            missing_reject_rules,
            extra_reject_rules,
            set_missing: desired.uses_set() && installed.set.is_none(),
            set_incompatible: desired.uses_set() && incompatible(&installed.set),
            empty_set_missing: desired.rejects_empty() && installed.empty_set.is_none(),
            empty_set_incompatible: desired.rejects_empty() && incompatible(&installed.empty_set),
            missing_members,
            extra_members,
        }
    }

    /// Whether the kernel holds exactly the desired rules and nothing needs repairing.
    pub fn is_clean(&self) -> bool {
        *self == Drift::default()
    }
}

impl fmt::Display for Drift {
    /// One line for the log, with counts rather than rules: a wiped table would otherwise log
    /// thousands of lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_clean() {
            return f.write_str("no drift");
        }
        let mut parts = Vec::new();
        if self.canary_missing {
            parts.push("canary chain missing".to_string());
        }
        if self.services_chain_missing {
            parts.push("services chain missing".to_string());
        }
        if self.set_missing {
            parts.push(format!("set {} missing", crate::VIP_SET));
        }
        if self.set_incompatible {
            parts.push(format!("set {} has the wrong type", crate::VIP_SET));
        }
        if self.reject_chain_missing {
            parts.push("reject chain missing".to_string());
        }
        if self.empty_set_missing {
            parts.push(format!("set {} missing", crate::EMPTY_SET));
        }
        if self.empty_set_incompatible {
            parts.push(format!("set {} has the wrong type", crate::EMPTY_SET));
        }
        for (count, what) in [
            (self.missing_chains.len(), "forwarding chains missing"),
            (self.extra_chains.len(), "unexpected forwarding chains"),
            (self.missing_rules.len(), "service rules missing"),
            (self.extra_rules.len(), "unexpected service rules"),
            (self.missing_reject_rules.len(), "reject rules missing"),
            (self.extra_reject_rules.len(), "unexpected reject rules"),
            (self.missing_hooks.len(), "hooks missing"),
            (self.extra_hooks.len(), "unexpected hooks"),
            (self.missing_members.len(), "set members missing"),
            (self.extra_members.len(), "unexpected set members"),
        ] {
            if count > 0 {
                parts.push(format!("{count} {what}"));
            }
        }
        if self.misordered {
            parts.push("service rules out of order".to_string());
        }
        f.write_str(&parts.join(", "))
    }
}

/// `(wanted - have, have - wanted)` counting duplicates, so a rule present twice shows up once
/// as extra.
fn difference(wanted: &[String], have: &[String]) -> (Vec<String>, Vec<String>) {
    let mut unmatched: HashMap<&str, usize> = HashMap::new();
    for line in have {
        *unmatched.entry(line).or_default() += 1;
    }
    let mut missing = Vec::new();
    for line in wanted {
        match unmatched.get_mut(line.as_str()) {
            Some(n) if *n > 0 => *n -= 1,
            _ => missing.push(line.clone()),
        }
    }
    let mut extra = Vec::new();
    for line in have {
        if let Some(n) = unmatched.get_mut(line.as_str()) {
            if *n > 0 {
                *n -= 1;
                extra.push(line.clone());
            }
        }
    }
    (missing, extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{render, Desired, Redirect};

    fn ruleset() -> Ruleset {
        render(&Desired {
            redirects: vec![
                Redirect {
                    service: "a".into(),
                    vip: "198.18.0.1:80".parse().expect("valid"),
                },
                Redirect {
                    service: "b".into(),
                    vip: "198.18.0.2:80".parse().expect("valid"),
                },
            ],
            proxy_port: 7100,
            bridge_interfaces: vec!["docker0".into()],
            ..Desired::default()
        })
    }

    /// `a` routed, `idle` refused (no instance).
    fn refusing() -> Ruleset {
        render(&Desired {
            redirects: vec![Redirect {
                service: "a".into(),
                vip: "198.18.0.1:80".parse().expect("valid"),
            }],
            rejects: vec![Redirect {
                service: "idle".into(),
                vip: "198.18.0.3:80".parse().expect("valid"),
            }],
            reject_empty: true,
            proxy_port: 7100,
            bridge_interfaces: vec!["docker0".into()],
            ..Desired::default()
        })
    }

    fn installed_as(rs: &Ruleset) -> Installed {
        Installed {
            services_chain: true,
            canary_chain: true,
            service_rules: rs.service_rules().to_vec(),
            canary_rules: vec![],
            hooks: rs.hooks().to_vec(),
            set: Some(crate::rule::set_create(crate::VIP_SET)),
            set_members: rs.set_members().to_vec(),
            reject_chain: rs.rejects_empty(),
            reject_rules: rs.reject_rules().to_vec(),
            filter_hooks: rs.filter_hooks().to_vec(),
            empty_set: rs
                .rejects_empty()
                .then(|| crate::rule::set_create(crate::EMPTY_SET)),
            empty_members: rs.empty_members().to_vec(),
            forward_chain: rs.forwards_any(),
            forward_rules: rs.forward_rules().to_vec(),
            forward_chains: rs.forward_chains().clone(),
        }
    }

    #[test]
    fn refusing_state_read_back_is_clean() {
        let rs = refusing();
        assert!(!rs.empty_members().is_empty() && !rs.filter_hooks().is_empty());
        let drift = Drift::between(&rs, &installed_as(&rs));
        assert!(drift.is_clean(), "{drift}");
    }

    #[test]
    fn damage_to_the_filter_chain_and_its_hooks_is_drift() {
        let rs = refusing();
        let mut flushed = installed_as(&rs);
        flushed.reject_rules.clear();
        let drift = Drift::between(&rs, &flushed);
        assert_eq!(drift.missing_reject_rules, rs.reject_rules());
        assert_eq!(drift.to_string(), "1 reject rules missing");

        let mut unhooked = installed_as(&rs);
        let forward = unhooked.filter_hooks.pop().expect("three filter hooks");
        unhooked
            .reject_rules
            .insert(0, "-A FLUX-REJECT -j RETURN".into());
        let drift = Drift::between(&rs, &unhooked);
        assert_eq!(drift.missing_hooks, [forward]);
        assert_eq!(drift.extra_reject_rules, ["-A FLUX-REJECT -j RETURN"]);
        assert_eq!(
            drift.to_string(),
            "1 unexpected reject rules, 1 hooks missing"
        );

        let wiped = Installed {
            reject_chain: false,
            reject_rules: vec![],
            filter_hooks: vec![],
            ..installed_as(&rs)
        };
        let drift = Drift::between(&rs, &wiped);
        assert!(drift.reject_chain_missing && drift.missing_hooks.len() == 3);
        assert!(drift.missing_rules.is_empty() && !drift.canary_missing);
    }

    #[test]
    fn damage_to_the_empty_set_is_drift() {
        let rs = refusing();
        let mut installed = installed_as(&rs);
        installed.empty_members = vec!["add flux-empty 198.18.0.9,tcp:22".into()];
        let drift = Drift::between(&rs, &installed);
        assert_eq!(drift.missing_members, rs.empty_members());
        assert_eq!(drift.extra_members, ["add flux-empty 198.18.0.9,tcp:22"]);

        installed.empty_set = Some("create flux-empty hash:ip family inet".into());
        assert!(Drift::between(&rs, &installed).empty_set_incompatible);
        installed.empty_set = None;
        installed.empty_members.clear();
        let drift = Drift::between(&rs, &installed);
        assert!(drift.empty_set_missing && drift.missing_members.len() == 1);
        assert!(!drift.set_missing);
        assert_eq!(
            drift.to_string(),
            "set flux-empty missing, 1 set members missing"
        );
    }

    #[test]
    fn a_vip_in_the_wrong_set_is_drift() {
        let rs = refusing();
        let mut installed = installed_as(&rs);
        // `idle` in the VIP set instead: redirected to a proxy with nothing to send it to.
        installed.set_members.push(crate::rule::set_member(
            crate::VIP_SET,
            "idle",
            "198.18.0.3:80".parse().unwrap(),
        ));
        installed.empty_members.clear();
        let drift = Drift::between(&rs, &installed);
        assert_eq!(drift.missing_members, rs.empty_members());
        assert_eq!(drift.extra_members.len(), 1);
        assert!(drift.extra_members[0].starts_with("add flux-vips 198.18.0.3,tcp:80"));
    }

    #[test]
    fn the_return_rule_after_the_redirect_is_drift() {
        let rs = refusing();
        let mut installed = installed_as(&rs);
        installed.service_rules.reverse();
        let drift = Drift::between(&rs, &installed);
        assert!(drift.misordered && !drift.is_clean());
    }

    #[test]
    fn leftover_refusal_rules_are_drift_when_not_refusing() {
        let rs = ruleset();
        let leftover = refusing();
        let installed = Installed {
            reject_chain: true,
            reject_rules: leftover.reject_rules().to_vec(),
            filter_hooks: leftover.filter_hooks().to_vec(),
            empty_set: Some(crate::rule::set_create(crate::EMPTY_SET)),
            empty_members: leftover.empty_members().to_vec(),
            ..installed_as(&rs)
        };
        let drift = Drift::between(&rs, &installed);
        assert_eq!(drift.extra_hooks.len(), 3);
        assert_eq!(drift.extra_reject_rules, leftover.reject_rules());
        // An unused set is not compared: nothing matches it once the rules are gone.
        assert!(drift.extra_members.is_empty() && !drift.empty_set_missing);
    }

    /// `bulk` forwarded to two instances, beside the two proxied services of [`ruleset`].
    fn forwarding() -> Ruleset {
        let dest = |instance: &str, addr: &str| crate::Destination {
            instance: instance.into(),
            addr: addr.parse().expect("valid"),
            standby: false,
        };
        render(&Desired {
            forwards: vec![crate::Forward {
                service: "bulk".into(),
                vip: "198.18.0.5:80".parse().expect("valid"),
                destinations: vec![dest("b1", "10.0.0.1:80"), dest("b2", "10.0.0.2:80")],
            }],
            proxy_port: 7100,
            ..Desired::default()
        })
    }

    #[test]
    fn damage_to_the_forwarding_chains_is_drift() {
        let rs = forwarding();
        assert!(Drift::between(&rs, &installed_as(&rs)).is_clean());

        // A flushed service chain: its rules missing.
        let mut flushed = installed_as(&rs);
        flushed.forward_chains.values_mut().for_each(Vec::clear);
        let drift = Drift::between(&rs, &flushed);
        assert_eq!(drift.missing_rules.len(), 2);
        assert_eq!(drift.to_string(), "2 service rules missing");

        // Reordered DNAT rules change each instance's share.
        let mut reordered = installed_as(&rs);
        reordered
            .forward_chains
            .values_mut()
            .for_each(|r| r.reverse());
        assert!(Drift::between(&rs, &reordered).misordered);

        // A deleted chain, and one left from a service no longer forwarded.
        let mut chains = installed_as(&rs);
        let (name, _) = chains.forward_chains.pop_first().expect("one chain");
        chains.forward_chains.insert(
            "FLUX-FWD-C6120063-80".into(),
            vec!["-A FLUX-FWD-C6120063-80 -j ACCEPT".into()],
        );
        let drift = Drift::between(&rs, &chains);
        assert_eq!(drift.missing_chains, [name]);
        assert_eq!(drift.extra_chains, ["FLUX-FWD-C6120063-80"]);
        assert_eq!(drift.extra_rules, ["-A FLUX-FWD-C6120063-80 -j ACCEPT"]);
        assert_eq!(
            drift.to_string(),
            "1 forwarding chains missing, 1 unexpected forwarding chains, 2 service rules missing, 1 unexpected service rules"
        );

        // The forward chain gone with the jump still in the services chain.
        let mut no_forward = installed_as(&rs);
        no_forward.forward_chain = false;
        no_forward.forward_rules.clear();
        let drift = Drift::between(&rs, &no_forward);
        assert_eq!(drift.missing_chains, ["FLUX-FORWARD"]);
        assert_eq!(drift.missing_rules, rs.forward_rules());
    }

    #[test]
    fn forwarding_chains_left_when_nothing_is_forwarded_are_drift() {
        let rs = ruleset();
        let leftover = forwarding();
        let installed = Installed {
            forward_chain: true,
            forward_rules: leftover.forward_rules().to_vec(),
            forward_chains: leftover.forward_chains().clone(),
            ..installed_as(&rs)
        };
        let drift = Drift::between(&rs, &installed);
        assert_eq!(drift.extra_chains.len(), 2);
        assert_eq!(drift.extra_rules.len(), 3);
        assert!(drift.missing_rules.is_empty());
    }

    #[test]
    fn identical_state_is_clean() {
        let rs = ruleset();
        let drift = Drift::between(&rs, &installed_as(&rs));
        assert!(drift.is_clean(), "{drift}");
        assert_eq!(drift.to_string(), "no drift");
    }

    #[test]
    fn flushed_chain_with_canary_intact_is_drift() {
        let rs = ruleset();
        let mut installed = installed_as(&rs);
        installed.service_rules.clear();
        let drift = Drift::between(&rs, &installed);
        assert!(!drift.canary_missing);
        assert_eq!(drift.missing_rules, rs.service_rules());
        assert_eq!(drift.to_string(), "1 service rules missing");
    }

    #[test]
    fn wiped_table_is_drift() {
        let drift = Drift::between(&ruleset(), &Installed::default());
        assert!(drift.canary_missing && drift.services_chain_missing && drift.set_missing);
        assert_eq!(drift.missing_rules.len(), 1);
        assert_eq!(drift.missing_hooks.len(), 2);
        assert_eq!(drift.missing_members.len(), 2);
    }

    #[test]
    fn set_damage_is_drift() {
        let rs = ruleset();
        let mut installed = installed_as(&rs);
        installed.set_members.reverse(); // hash order means nothing
        assert!(Drift::between(&rs, &installed).is_clean());

        installed.set_members.pop();
        installed
            .set_members
            .push("add flux-vips 198.18.0.9,tcp:22".into());
        let drift = Drift::between(&rs, &installed);
        assert_eq!(drift.missing_members, [rs.set_members()[0].clone()]);
        assert_eq!(drift.extra_members, ["add flux-vips 198.18.0.9,tcp:22"]);
        assert_eq!(
            drift.to_string(),
            "1 set members missing, 1 unexpected set members"
        );

        installed.set = Some("create flux-vips hash:ip family inet".into());
        assert!(Drift::between(&rs, &installed).set_incompatible);
        installed.set = None;
        installed.set_members.clear();
        let drift = Drift::between(&rs, &installed);
        assert!(drift.set_missing && drift.missing_members.len() == 2);
    }

    #[test]
    fn an_unused_set_is_not_compared() {
        let mut desired = Desired {
            redirects: vec![Redirect {
                service: "a".into(),
                vip: "198.18.0.1:80".parse().expect("valid"),
            }],
            proxy_port: 7100,
            bridge_interfaces: vec![],
            vip_ranges: vec![crate::VipRange {
                addr: "198.18.0.0".parse().expect("valid"),
                prefix_len: 16,
            }],
            ..Desired::default()
        };
        let rs = render(&desired);
        let installed = installed_as(&rs);
        desired.vip_ranges.clear();
        let mut with_set = installed.clone();
        with_set.set_members = render(&desired).set_members().to_vec();
        assert!(Drift::between(&rs, &installed).is_clean());
        assert!(Drift::between(&rs, &with_set).is_clean());
        let none = Installed {
            set: None,
            ..installed
        };
        assert!(Drift::between(&rs, &none).is_clean());
    }

    #[test]
    fn duplicate_and_foreign_rules_are_extra() {
        let rs = ruleset();
        let mut installed = installed_as(&rs);
        installed.hooks.push(rs.hooks()[0].clone());
        installed
            .service_rules
            .insert(0, "-A FLUX-SERVICES -j ACCEPT".into());
        installed.service_rules.push(rs.service_rules()[0].clone());
        let drift = Drift::between(&rs, &installed);
        assert_eq!(drift.extra_hooks, [rs.hooks()[0].clone()]);
        assert_eq!(
            drift.extra_rules,
            ["-A FLUX-SERVICES -j ACCEPT", rs.service_rules()[0].as_str()]
        );
        assert!(drift.missing_rules.is_empty() && drift.missing_hooks.is_empty());
        assert!(!drift.misordered);
    }

    #[test]
    fn reordered_rules_are_drift() {
        // Two rendered rules: the set rule (for the VIP outside the range) and a range rule.
        let rs = render(&Desired {
            redirects: vec![Redirect {
                service: "a".into(),
                vip: "10.128.0.1:80".parse().expect("valid"),
            }],
            proxy_port: 7100,
            bridge_interfaces: vec![],
            vip_ranges: vec![crate::VipRange {
                addr: "198.18.0.0".parse().expect("valid"),
                prefix_len: 16,
            }],
            ..Desired::default()
        });
        assert_eq!(rs.service_rules().len(), 2);
        let mut installed = installed_as(&rs);
        assert!(Drift::between(&rs, &installed).is_clean());
        installed.service_rules.reverse();
        let drift = Drift::between(&rs, &installed);
        assert!(drift.misordered && !drift.is_clean());
    }
}
