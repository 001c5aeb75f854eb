//! How the kernel differs from the desired ruleset, so the daemon can repair and report it.

use std::collections::HashMap;
use std::fmt;

use crate::installed::Installed;
use crate::render::Ruleset;

/// Every way flux's rules and VIP set in the kernel differ from the desired ones. Clean means
/// identical, rule for rule and member for member, so a clean drift after apply proves the
/// kernel holds what was rendered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// The canary chain is gone: someone wiped the table (or deleted flux's chains).
    pub canary_missing: bool,
    /// The services chain is gone, so every VIP is unrouted.
    pub services_chain_missing: bool,
    /// Desired service rules the kernel lacks (e.g. after `iptables -t nat -F FLUX-SERVICES`,
    /// which leaves the canary intact).
    pub missing_rules: Vec<String>,
    /// Rules in flux's services chain that flux did not render (stale or inserted by someone).
    pub extra_rules: Vec<String>,
    /// Same rules, different order. Rendered rules never overlap, but the kernel should still
    /// hold exactly what was rendered.
    pub misordered: bool,
    /// Desired hooks the kernel lacks: some traffic is not redirected at all.
    pub missing_hooks: Vec<String>,
    /// Hooks that should not be there: duplicates, or for bridges no longer configured.
    pub extra_hooks: Vec<String>,
    /// The ruleset matches the VIP set but it does not exist (`ipset destroy`, a reboot of
    /// ipset state): every set-matched VIP is unrouted.
    pub set_missing: bool,
    /// A set of flux's name exists but cannot hold flux's members (another type or family, or
    /// no comment extension); apply replaces it.
    pub set_incompatible: bool,
    /// Desired set members the kernel lacks (e.g. after `ipset flush flux-vips`). A member
    /// whose comment differs counts as missing (and its installed form as extra).
    pub missing_members: Vec<String>,
    /// Set members flux did not render: stale, or added by someone.
    pub extra_members: Vec<String>,
}

impl Drift {
    /// Compares a rendered ruleset with one read of the kernel. Separate from
    /// [`crate::Netfilter::drift`] so `fluxd debug` can show the installed rules and the drift
    /// from the same read.
    pub fn between(desired: &Ruleset, installed: &Installed) -> Self {
        let (missing_rules, extra_rules) =
            difference(desired.service_rules(), &installed.service_rules);
        let misordered = missing_rules.is_empty()
            && extra_rules.is_empty()
            && desired.service_rules() != installed.service_rules.as_slice();
        let (missing_hooks, extra_hooks) = difference(desired.hooks(), &installed.hooks);
        // A set the ruleset does not use is not compared: nothing matches it.
        let (missing_members, extra_members) = if desired.uses_set() {
            difference(desired.set_members(), &installed.set_members)
        } else {
            (vec![], vec![])
        };
        Drift {
            canary_missing: !installed.canary_chain,
            services_chain_missing: !installed.services_chain,
            missing_rules,
            extra_rules,
            misordered,
            missing_hooks,
            extra_hooks,
            set_missing: desired.uses_set() && installed.set.is_none(),
            set_incompatible: desired.uses_set()
                && installed
                    .set
                    .as_deref()
                    .is_some_and(|create| !crate::rule::set_compatible(create)),
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
        for (count, what) in [
            (self.missing_rules.len(), "service rules missing"),
            (self.extra_rules.len(), "unexpected service rules"),
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
            vip_ranges: vec![],
        })
    }

    fn installed_as(rs: &Ruleset) -> Installed {
        Installed {
            services_chain: true,
            canary_chain: true,
            service_rules: rs.service_rules().to_vec(),
            canary_rules: vec![],
            hooks: rs.hooks().to_vec(),
            set: Some(crate::rule::set_create()),
            set_members: rs.set_members().to_vec(),
        }
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
        });
        assert_eq!(rs.service_rules().len(), 2);
        let mut installed = installed_as(&rs);
        assert!(Drift::between(&rs, &installed).is_clean());
        installed.service_rules.reverse();
        let drift = Drift::between(&rs, &installed);
        assert!(drift.misordered && !drift.is_clean());
    }
}
