//! Taking away everything flux installed, and nothing else.

use crate::installed::Installed;
use crate::netfilter::Netfilter;
use crate::rule;
use crate::Error;
use crate::{CANARY_CHAIN, EMPTY_SET, FORWARD_CHAIN, REJECT_CHAIN, SERVICES_CHAIN, VIP_SET};

impl Netfilter {
    /// Deletes flux's hooks and chains, each table in one transaction, so VIP traffic is never
    /// sent to a half-removed chain, then destroys the sets (a set that a rule references
    /// cannot be destroyed, so they go last). Idempotent: with nothing installed it changes
    /// nothing. The nat table goes first and iptables-restore stops at the first table that
    /// fails: if someone else's rule still jumps to flux's nat chain (deleting that rule is
    /// not flux's call) this fails and changes nothing; if one jumps to flux's filter chain,
    /// it fails after removing the nat chains. It fails after removing the chains if someone
    /// else's rule still matches a set, which is then left in place.
    pub fn remove(&self) -> Result<(), Error> {
        let installed = self.installed()?;
        if let Some(input) = plan(&installed) {
            self.restore(&input)?;
        }
        for (exists, set) in [
            (installed.set.is_some(), VIP_SET),
            (installed.empty_set.is_some(), EMPTY_SET),
        ] {
            if exists {
                self.ipset(&["destroy", set], None)?;
            }
        }
        Ok(())
    }
}

/// The restore input that deletes what `installed` lists, or `None` when there is nothing to
/// delete (so a repeated remove does not even touch the tables).
pub(crate) fn plan(installed: &Installed) -> Option<String> {
    let mut input = String::new();
    // Each chain after those that jump to it: the services chain, the forward chain, then the
    // forwarded services' own chains.
    let nat: Vec<(bool, &str)> = [
        (installed.services_chain, SERVICES_CHAIN),
        (installed.canary_chain, CANARY_CHAIN),
        (installed.forward_chain, FORWARD_CHAIN),
    ]
    .into_iter()
    .chain(installed.forward_chains.keys().map(|c| (true, c.as_str())))
    .collect();
    table_plan(&mut input, "nat", &installed.hooks, &nat);
    let filter = [(installed.reject_chain, REJECT_CHAIN)];
    table_plan(&mut input, "filter", &installed.filter_hooks, &filter);
    (!input.is_empty()).then_some(input)
}

/// Appends one table's part of [`plan`], if it has anything to delete: the hooks, then the
/// chains (a chain must be empty and unreferenced before it can be deleted).
fn table_plan(input: &mut String, table: &str, hooks: &[String], chains: &[(bool, &str)]) {
    if hooks.is_empty() && !chains.iter().any(|(exists, _)| *exists) {
        return;
    }
    input.push_str(&format!("*{table}\n"));
    for hook in hooks {
        if let Some((chain, spec)) = rule::split_append(hook) {
            input.push_str(&format!("-D {chain} {spec}\n"));
        }
    }
    for (exists, chain) in chains {
        if *exists {
            input.push_str(&format!("-F {chain}\n-X {chain}\n"));
        }
    }
    input.push_str("COMMIT\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_installed_means_nothing_to_run() {
        assert_eq!(plan(&Installed::default()), None);
    }

    #[test]
    fn deletes_hooks_before_chains() {
        let installed = Installed {
            services_chain: true,
            canary_chain: true,
            service_rules: vec!["-A FLUX-SERVICES -j ACCEPT".into()],
            canary_rules: vec![],
            hooks: vec![r#"-A OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES"#.into()],
            ..Installed::default()
        };
        assert_eq!(
            plan(&installed).as_deref(),
            Some(concat!(
                "*nat\n",
                "-D OUTPUT -m comment --comment \"flux hook\" -j FLUX-SERVICES\n",
                "-F FLUX-SERVICES\n-X FLUX-SERVICES\n",
                "-F FLUX-CANARY\n-X FLUX-CANARY\n",
                "COMMIT\n",
            ))
        );
    }

    #[test]
    fn removes_the_filter_chain_and_its_hooks_after_nat() {
        let installed = Installed {
            services_chain: true,
            canary_chain: true,
            hooks: vec![r#"-A OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES"#.into()],
            reject_chain: true,
            reject_rules: vec![rule::reject_rule()],
            filter_hooks: vec![
                rule::filter_output_hook(),
                rule::filter_bridge_hook("FORWARD", "docker0"),
            ],
            ..Installed::default()
        };
        assert_eq!(
            plan(&installed).as_deref(),
            Some(concat!(
                "*nat\n",
                "-D OUTPUT -m comment --comment \"flux hook\" -j FLUX-SERVICES\n",
                "-F FLUX-SERVICES\n-X FLUX-SERVICES\n",
                "-F FLUX-CANARY\n-X FLUX-CANARY\n",
                "COMMIT\n",
                "*filter\n",
                "-D OUTPUT -m conntrack --ctstate NEW -m comment --comment \"flux hook\" -j FLUX-REJECT\n",
                "-D FORWARD -i docker0 -m conntrack --ctstate NEW -m comment --comment \"flux hook\" -j FLUX-REJECT\n",
                "-F FLUX-REJECT\n-X FLUX-REJECT\n",
                "COMMIT\n",
            ))
        );
        // Only the filter chain left (a nat table wiped by someone): only filter is touched.
        let filter_only = Installed {
            reject_chain: true,
            ..Installed::default()
        };
        assert_eq!(
            plan(&filter_only).as_deref(),
            Some("*filter\n-F FLUX-REJECT\n-X FLUX-REJECT\nCOMMIT\n")
        );
    }

    #[test]
    fn removes_the_kernel_forwarding_chains_after_the_chain_that_jumps_to_them() {
        let installed = Installed {
            services_chain: true,
            canary_chain: true,
            forward_chain: true,
            forward_rules: vec!["-A FLUX-FORWARD -j FLUX-FWD-C612000A-80".into()],
            forward_chains: [
                ("FLUX-FWD-C612000A-80".to_string(), vec![]),
                ("FLUX-FWD-C612000B-80".to_string(), vec![]),
            ]
            .into(),
            ..Installed::default()
        };
        assert_eq!(
            plan(&installed).as_deref(),
            Some(concat!(
                "*nat\n",
                "-F FLUX-SERVICES\n-X FLUX-SERVICES\n",
                "-F FLUX-CANARY\n-X FLUX-CANARY\n",
                "-F FLUX-FORWARD\n-X FLUX-FORWARD\n",
                "-F FLUX-FWD-C612000A-80\n-X FLUX-FWD-C612000A-80\n",
                "-F FLUX-FWD-C612000B-80\n-X FLUX-FWD-C612000B-80\n",
                "COMMIT\n",
            ))
        );
    }

    #[test]
    fn a_lone_canary_is_removed_too() {
        let installed = Installed {
            canary_chain: true,
            ..Installed::default()
        };
        assert_eq!(
            plan(&installed).as_deref(),
            Some("*nat\n-F FLUX-CANARY\n-X FLUX-CANARY\nCOMMIT\n")
        );
    }
}
