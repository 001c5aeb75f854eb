//! Taking away everything flux installed, and nothing else.

use crate::installed::Installed;
use crate::netfilter::Netfilter;
use crate::rule;
use crate::Error;
use crate::{CANARY_CHAIN, SERVICES_CHAIN, VIP_SET};

impl Netfilter {
    /// Deletes flux's hooks and chains in one transaction, so VIP traffic is never sent to a
    /// half-removed chain, then destroys the VIP set (a set that a rule references cannot be
    /// destroyed, so it goes last). Idempotent: with nothing installed it changes nothing.
    /// Fails (and changes nothing) if someone else's rule still jumps to flux's chain, since
    /// deleting that rule is not flux's call; fails after removing the chains if someone
    /// else's rule still matches the set, which is then left in place.
    pub fn remove(&self) -> Result<(), Error> {
        let installed = self.installed()?;
        if let Some(input) = plan(&installed) {
            self.restore(&input)?;
        }
        if installed.set.is_some() {
            self.ipset(&["destroy", VIP_SET], None)?;
        }
        Ok(())
    }
}

/// The restore input that deletes what `installed` lists, or `None` when there is nothing to
/// delete (so a repeated remove does not even touch the table).
pub(crate) fn plan(installed: &Installed) -> Option<String> {
    if !installed.services_chain && !installed.canary_chain && installed.hooks.is_empty() {
        return None;
    }
    let mut input = String::from("*nat\n");
    for hook in &installed.hooks {
        if let Some((chain, spec)) = rule::split_append(hook) {
            input.push_str(&format!("-D {chain} {spec}\n"));
        }
    }
    // A chain must be empty and unreferenced before it can be deleted; the hooks went above.
    for (exists, chain) in [
        (installed.services_chain, SERVICES_CHAIN),
        (installed.canary_chain, CANARY_CHAIN),
    ] {
        if exists {
            input.push_str(&format!("-F {chain}\n-X {chain}\n"));
        }
    }
    input.push_str("COMMIT\n");
    Some(input)
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
