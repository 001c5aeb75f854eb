//! Making the kernel match a rendered ruleset, in one transaction.

use std::collections::HashMap;

use crate::installed::Installed;
use crate::netfilter::Netfilter;
use crate::render::Ruleset;
use crate::rule;
use crate::Error;

impl Netfilter {
    /// Makes flux's chains hold exactly `ruleset` and its hooks exist exactly once, in a single
    /// `iptables-restore --noflush` call: readers never see a half-written chain, and a failure
    /// leaves the kernel as it was. Rules outside flux's chains and hooks are not touched.
    ///
    /// Reads the kernel first to decide which hooks to add or delete. If someone changes the
    /// hooks between that read and the write, the transaction fails and the next apply (the
    /// daemon retries with backoff) starts from a fresh read.
    pub fn apply(&self, ruleset: &Ruleset) -> Result<(), Error> {
        let installed = self.installed()?;
        self.restore(&plan(ruleset, &installed))
    }
}

/// The restore input that turns `installed` into `ruleset`: the chain contents, then hook
/// changes. Stale and duplicate hooks are deleted; missing ones are inserted at the top of their
/// chain, ahead of other people's rules that might otherwise accept or rewrite VIP traffic
/// first.
pub(crate) fn plan(ruleset: &Ruleset, installed: &Installed) -> String {
    let mut input = ruleset.chain_contents();

    let mut wanted: HashMap<&str, usize> = HashMap::new();
    for hook in ruleset.hooks() {
        *wanted.entry(hook).or_default() += 1;
    }
    for hook in &installed.hooks {
        match wanted.get_mut(hook.as_str()) {
            Some(n) if *n > 0 => *n -= 1,
            _ => push_command(&mut input, "-D", hook, ""),
        }
    }
    // Each insert goes to position 1, so inserting in reverse leaves them in rendered order.
    for hook in ruleset.hooks().iter().rev() {
        if let Some(n) = wanted.get_mut(hook.as_str()) {
            if *n > 0 {
                *n -= 1;
                push_command(&mut input, "-I", hook, "1 ");
            }
        }
    }

    input.push_str("COMMIT\n");
    input
}

/// Appends `-I CHAIN 1 SPEC` / `-D CHAIN SPEC` for a rule saved as `-A CHAIN SPEC`.
fn push_command(input: &mut String, command: &str, saved: &str, position: &str) {
    // Hooks come from render or from `Installed`, both `-A` lines; anything else is skipped
    // rather than sent as a malformed command.
    if let Some((chain, spec)) = rule::split_append(saved) {
        input.push_str(&format!("{command} {chain} {position}{spec}\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{render, Desired, Redirect};

    const OUTPUT_HOOK: &str = r#"-A OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES"#;
    const DOCKER0_HOOK: &str =
        r#"-A PREROUTING -i docker0 -m comment --comment "flux hook" -j FLUX-SERVICES"#;
    const BR_HOOK: &str =
        r#"-A PREROUTING -i br-+ -m comment --comment "flux hook" -j FLUX-SERVICES"#;

    fn ruleset(bridges: &[&str]) -> Ruleset {
        render(&Desired {
            redirects: vec![Redirect {
                service: "web".into(),
                vip: "198.18.0.10:80".parse().expect("valid"),
            }],
            proxy_port: 7100,
            bridge_interfaces: bridges.iter().map(|s| s.to_string()).collect(),
            vip_ranges: vec![],
        })
    }

    fn hook_lines(input: &str) -> Vec<&str> {
        input
            .lines()
            .filter(|l| l.starts_with("-I ") || l.starts_with("-D "))
            .collect()
    }

    #[test]
    fn first_apply_inserts_every_hook_at_the_top() {
        let input = plan(&ruleset(&["docker0", "br-+"]), &Installed::default());
        assert!(input.starts_with(&ruleset(&[]).chain_contents()));
        assert!(input.ends_with("COMMIT\n"));
        assert_eq!(
            hook_lines(&input),
            [
                r#"-I PREROUTING 1 -i docker0 -m comment --comment "flux hook" -j FLUX-SERVICES"#,
                r#"-I PREROUTING 1 -i br-+ -m comment --comment "flux hook" -j FLUX-SERVICES"#,
                r#"-I OUTPUT 1 -m comment --comment "flux hook" -j FLUX-SERVICES"#,
            ]
        );
    }

    #[test]
    fn present_hooks_are_not_added_again() {
        let rs = ruleset(&["docker0"]);
        let installed = Installed {
            services_chain: true,
            canary_chain: true,
            hooks: vec![DOCKER0_HOOK.into(), OUTPUT_HOOK.into()],
            ..Installed::default()
        };
        assert!(hook_lines(&plan(&rs, &installed)).is_empty());
    }

    #[test]
    fn duplicate_and_stale_hooks_are_deleted() {
        let rs = ruleset(&["docker0"]);
        let installed = Installed {
            services_chain: true,
            canary_chain: true,
            hooks: vec![BR_HOOK.into(), OUTPUT_HOOK.into(), OUTPUT_HOOK.into()],
            ..Installed::default()
        };
        assert_eq!(
            hook_lines(&plan(&rs, &installed)),
            [
                r#"-D PREROUTING -i br-+ -m comment --comment "flux hook" -j FLUX-SERVICES"#,
                r#"-D OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES"#,
                r#"-I PREROUTING 1 -i docker0 -m comment --comment "flux hook" -j FLUX-SERVICES"#,
            ]
        );
    }
}
