//! Making the kernel match a rendered ruleset, changing only what differs.

use std::collections::HashMap;

use crate::installed::Installed;
use crate::netfilter::Netfilter;
use crate::render::Ruleset;
use crate::rule;
use crate::Error;
use crate::{CANARY_CHAIN, SERVICES_CHAIN, VIP_SET};

impl Netfilter {
    /// Makes flux's chains hold exactly `ruleset`, its hooks exist exactly once and its VIP set
    /// hold exactly the rendered members. Rules and sets outside flux's are not touched.
    ///
    /// Reads the kernel first (`iptables-save -t nat`, `ipset save flux-vips`), then sends
    /// only the difference, so one added service costs one `ipset restore` line whatever the
    /// number of services:
    ///
    /// 1. the set, in one `ipset restore -exist` call: created if missing (before the rule
    ///    that references it), stale members deleted, missing members added; a member whose
    ///    comment changed (the VIP moved to another service) is re-added, which with `-exist`
    ///    replaces its comment in place, so the VIP is never out of the set;
    /// 2. the chains and hooks, in one `iptables-restore --noflush` transaction, only when
    ///    they differ from the rendered ones (all of it takes effect or none of it);
    /// 3. a set the ruleset no longer uses (every VIP inside a `--vip-range`) is destroyed,
    ///    after step 2 removed the rule that referenced it.
    ///
    /// What ipset does not guarantee: `ipset restore` is not a transaction. It applies its
    /// input line by line and stops at the first failing line, keeping the lines before it,
    /// so a failed apply can leave part of the member delta installed (never a member flux did
    /// not render, never a half-written member). The next apply reads the set again and sends
    /// what is still missing; the daemon retries at its next drift check. A set someone
    /// created under flux's name with another type is replaced, which needs the chain emptied
    /// first: VIPs are unrouted for that moment.
    ///
    /// If someone changes the hooks between the read and the write, the iptables transaction
    /// fails and the next apply starts from a fresh read.
    pub fn apply(&self, ruleset: &Ruleset) -> Result<(), Error> {
        let mut installed = self.installed()?;
        if ruleset.uses_set() {
            if installed
                .set
                .as_deref()
                .is_some_and(|create| !rule::set_compatible(create))
            {
                // Nothing can be destroyed while a rule references it.
                self.restore(&format!(
                    "*nat\n:{SERVICES_CHAIN} - [0:0]\n:{CANARY_CHAIN} - [0:0]\nCOMMIT\n"
                ))?;
                self.ipset(&["destroy", VIP_SET], None)?;
                installed = self.installed()?;
            }
            if let Some(input) = set_plan(ruleset, &installed) {
                self.ipset(&["restore", "-exist"], Some(&input))?;
            }
        }
        if let Some(input) = plan(ruleset, &installed) {
            self.restore(&input)?;
        }
        if !ruleset.uses_set() && installed.set.is_some() {
            self.ipset(&["destroy", VIP_SET], None)?;
        }
        Ok(())
    }
}

impl Netfilter {
    /// Moves the kernel from `from`, the ruleset the caller last applied successfully, to `to`,
    /// without reading the kernel first: when only set members differ (services added, removed
    /// or moved) this is one `ipset restore -exist` with the member delta, a few milliseconds
    /// whatever the number of services. Anything else (chain rules, hooks, whether the set is
    /// used) goes through a full [`Netfilter::apply`].
    ///
    /// Why not always read first: `ipset save` looks up the protocol name of every member in
    /// `/etc/protocols` (glibc reopens the file per lookup), about 65 ms for 10,000 members.
    ///
    /// The price is trust: a change made behind flux's back since `from` was applied is not
    /// seen here. The delta is idempotent (`-exist`), so a `from` that is partly installed
    /// (after a failed apply) is still moved to `to`; a set destroyed meanwhile makes this
    /// fail; anything else (a flushed set, a foreign member) is left for the periodic drift
    /// check, which reads everything and repairs with a full apply. Callers must therefore
    /// pass the last ruleset they applied, and use [`Netfilter::apply`] after any drift.
    pub fn apply_change(&self, from: &Ruleset, to: &Ruleset) -> Result<(), Error> {
        if from.uses_set() != to.uses_set()
            || from.service_rules() != to.service_rules()
            || from.hooks() != to.hooks()
        {
            return self.apply(to);
        }
        if !to.uses_set() {
            return Ok(()); // ranges only: nothing differs
        }
        let assumed = Installed {
            set: Some(rule::set_create()),
            set_members: from.set_members().to_vec(),
            ..Installed::default()
        };
        match set_plan(to, &assumed) {
            Some(input) => self.ipset(&["restore", "-exist"], Some(&input)).map(drop),
            None => Ok(()),
        }
    }
}

/// The `ipset restore -exist` input that turns the installed set into the rendered one, or
/// `None` when they already match. Members are compared by element: one flux did not render
/// is deleted, one missing or with another comment is (re-)added.
pub(crate) fn set_plan(ruleset: &Ruleset, installed: &Installed) -> Option<String> {
    let mut input = String::new();
    if installed.set.is_none() {
        input.push_str(&rule::set_create());
        input.push('\n');
    }
    let have: HashMap<&str, &str> = installed
        .set_members
        .iter()
        .filter_map(|line| Some((rule::member_element(line)?, line.as_str())))
        .collect();
    let want: HashMap<&str, &str> = ruleset
        .set_members()
        .iter()
        .filter_map(|line| Some((rule::member_element(line)?, line.as_str())))
        .collect();
    // Sorted, so the same difference always gives the same input.
    let mut stale: Vec<&str> = have
        .keys()
        .copied()
        .filter(|element| !want.contains_key(element))
        .collect();
    stale.sort_unstable();
    for element in stale {
        input.push_str(&format!("del {VIP_SET} {element}\n"));
    }
    for line in ruleset.set_members() {
        let current = rule::member_element(line).and_then(|e| have.get(e));
        if current != Some(&line.as_str()) {
            input.push_str(line);
            input.push('\n');
        }
    }
    (!input.is_empty()).then_some(input)
}

/// The restore input that turns `installed` into `ruleset`, or `None` when flux's chains
/// already hold exactly the rendered rules and every hook is there once: the chain contents
/// (declaring a chain flushes it), then hook changes. Stale and duplicate hooks are deleted;
/// missing ones are inserted at the top of their chain, ahead of other people's rules that
/// might otherwise accept or rewrite VIP traffic first.
pub(crate) fn plan(ruleset: &Ruleset, installed: &Installed) -> Option<String> {
    let mut hook_commands = String::new();
    let mut wanted: HashMap<&str, usize> = HashMap::new();
    for hook in ruleset.hooks() {
        *wanted.entry(hook).or_default() += 1;
    }
    for hook in &installed.hooks {
        match wanted.get_mut(hook.as_str()) {
            Some(n) if *n > 0 => *n -= 1,
            _ => push_command(&mut hook_commands, "-D", hook, ""),
        }
    }
    // Each insert goes to position 1, so inserting in reverse leaves them in rendered order.
    for hook in ruleset.hooks().iter().rev() {
        if let Some(n) = wanted.get_mut(hook.as_str()) {
            if *n > 0 {
                *n -= 1;
                push_command(&mut hook_commands, "-I", hook, "1 ");
            }
        }
    }

    let chains_match = installed.services_chain
        && installed.canary_chain
        && installed.service_rules == ruleset.service_rules();
    if chains_match && hook_commands.is_empty() {
        return None;
    }
    let mut input = ruleset.chain_contents();
    input.push_str(&hook_commands);
    input.push_str("COMMIT\n");
    Some(input)
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

    fn redirect(service: &str, vip: &str) -> Redirect {
        Redirect {
            service: service.into(),
            vip: vip.parse().expect("valid"),
        }
    }

    fn render_with(redirects: Vec<Redirect>, bridges: &[&str]) -> Ruleset {
        render(&Desired {
            redirects,
            proxy_port: 7100,
            bridge_interfaces: bridges.iter().map(|s| s.to_string()).collect(),
            vip_ranges: vec![],
        })
    }

    fn ruleset(bridges: &[&str]) -> Ruleset {
        render_with(vec![redirect("web", "198.18.0.10:80")], bridges)
    }

    fn installed_as(rs: &Ruleset) -> Installed {
        Installed {
            services_chain: true,
            canary_chain: true,
            service_rules: rs.service_rules().to_vec(),
            hooks: rs.hooks().to_vec(),
            set: Some(rule::set_create()),
            set_members: rs.set_members().to_vec(),
            ..Installed::default()
        }
    }

    fn hook_lines(input: &str) -> Vec<&str> {
        input
            .lines()
            .filter(|l| l.starts_with("-I ") || l.starts_with("-D "))
            .collect()
    }

    #[test]
    fn first_apply_inserts_every_hook_at_the_top() {
        let input = plan(&ruleset(&["docker0", "br-+"]), &Installed::default()).expect("changes");
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
    fn first_apply_creates_the_set_with_every_member() {
        let rs = render_with(
            vec![
                redirect("web", "198.18.0.10:80"),
                redirect("api", "198.18.0.11:443"),
            ],
            &[],
        );
        assert_eq!(
            set_plan(&rs, &Installed::default()).as_deref(),
            Some(concat!(
                "create flux-vips hash:ip,port family inet hashsize 1024 maxelem 1048576 comment\n",
                "add flux-vips 198.18.0.10,tcp:80 comment \"flux:web\"\n",
                "add flux-vips 198.18.0.11,tcp:443 comment \"flux:api\"\n",
            ))
        );
    }

    #[test]
    fn an_unchanged_state_runs_nothing() {
        let rs = ruleset(&["docker0"]);
        let installed = installed_as(&rs);
        assert_eq!(plan(&rs, &installed), None);
        assert_eq!(set_plan(&rs, &installed), None);
    }

    #[test]
    fn one_new_service_is_one_set_line_and_no_iptables_call() {
        let before = render_with(vec![redirect("web", "198.18.0.10:80")], &["docker0"]);
        let after = render_with(
            vec![
                redirect("web", "198.18.0.10:80"),
                redirect("new", "198.18.0.12:80"),
            ],
            &["docker0"],
        );
        let installed = installed_as(&before);
        assert_eq!(plan(&after, &installed), None);
        assert_eq!(
            set_plan(&after, &installed).as_deref(),
            Some("add flux-vips 198.18.0.12,tcp:80 comment \"flux:new\"\n")
        );
        assert_eq!(
            set_plan(&before, &installed_as(&after)).as_deref(),
            Some("del flux-vips 198.18.0.12,tcp:80\n")
        );
    }

    #[test]
    fn a_vip_moved_to_another_service_is_re_added_in_place() {
        let installed = installed_as(&render_with(vec![redirect("old", "198.18.0.10:80")], &[]));
        let moved = render_with(vec![redirect("new", "198.18.0.10:80")], &[]);
        assert_eq!(
            set_plan(&moved, &installed).as_deref(),
            Some("add flux-vips 198.18.0.10,tcp:80 comment \"flux:new\"\n")
        );
    }

    #[test]
    fn foreign_members_are_deleted() {
        let rs = ruleset(&[]);
        let mut installed = installed_as(&rs);
        installed
            .set_members
            .push("add flux-vips 198.18.0.99,udp:53".into());
        installed
            .set_members
            .push("add flux-vips 198.18.0.10,tcp:80".into()); // no comment: re-added
        installed.set_members.remove(0);
        assert_eq!(
            set_plan(&rs, &installed).as_deref(),
            Some(concat!(
                "del flux-vips 198.18.0.99,udp:53\n",
                "add flux-vips 198.18.0.10,tcp:80 comment \"flux:web\"\n",
            ))
        );
    }

    #[test]
    fn changed_chain_contents_rewrite_the_chain() {
        let rs = ruleset(&[]);
        let mut installed = installed_as(&rs);
        installed
            .service_rules
            .push("-A FLUX-SERVICES -j RETURN".into());
        let input = plan(&rs, &installed).expect("chain differs");
        assert_eq!(input, rs.restore_input());
        installed.service_rules.pop();
        installed.canary_chain = false;
        assert!(plan(&rs, &installed).is_some());
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
        assert!(hook_lines(&plan(&rs, &installed).expect("chain is empty")).is_empty());
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
            hook_lines(&plan(&rs, &installed).expect("hooks differ")),
            [
                r#"-D PREROUTING -i br-+ -m comment --comment "flux hook" -j FLUX-SERVICES"#,
                r#"-D OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES"#,
                r#"-I PREROUTING 1 -i docker0 -m comment --comment "flux hook" -j FLUX-SERVICES"#,
            ]
        );
    }
}
