//! Making the kernel match a rendered ruleset, changing only what differs.

use std::collections::HashMap;

use crate::installed::Installed;
use crate::netfilter::Netfilter;
use crate::render::Ruleset;
use crate::rule;
use crate::Error;
use crate::{CANARY_CHAIN, EMPTY_SET, FORWARD_CHAIN, REJECT_CHAIN, SERVICES_CHAIN, VIP_SET};

impl Netfilter {
    /// Makes flux's chains hold exactly `ruleset`, its hooks exist exactly once and its sets
    /// hold exactly the rendered members. Rules and sets outside flux's are not touched.
    ///
    /// Reads the kernel first (`iptables-save -t nat`, `-t filter`, `ipset save` of both sets),
    /// then sends only the difference, so one added service costs one `ipset restore` line
    /// whatever the number of services:
    ///
    /// 1. the sets, in one `ipset restore -exist` call: created if missing (before the rules
    ///    that reference them), then every missing member added to either set, then every
    ///    stale member deleted from either. Adds before deletes, so a VIP moving between
    ///    `flux-vips` and `flux-empty` (its service lost or gained its last instance) is for a
    ///    moment in both (refused: the return rule comes first), never in neither (which would
    ///    send its connections wherever the VIP routes). A member whose comment changed (the
    ///    VIP moved to another service) is re-added, which with `-exist` replaces its comment
    ///    in place, so the VIP is never out of the set;
    /// 2. the chains and hooks, in one `iptables-restore --noflush` call, only where they
    ///    differ from the rendered ones: the filter table, then nat (each table is one
    ///    transaction: all of it takes effect or none of it). When there is such a call, the
    ///    set deletions of step 1 wait until after it: a kernel-forwarded service that gets its
    ///    first instance gets its forwarding rule before its VIP leaves `flux-empty`, and one
    ///    that loses its last is refused before its rule goes, so its VIP is never unrouted;
    /// 3. a set the ruleset no longer uses (every VIP inside a `--vip-range`; refusals turned
    ///    off) is destroyed, after step 2 removed the rules that referenced it.
    ///
    /// What ipset does not guarantee: `ipset restore` is not a transaction. It applies its
    /// input line by line and stops at the first failing line, keeping the lines before it,
    /// so a failed apply can leave part of the member delta installed (never a member flux did
    /// not render, never a half-written member). The next apply reads the sets again and sends
    /// what is still missing; the daemon retries at its next drift check. A set someone
    /// created under flux's name with another type is replaced, which needs flux's chains
    /// emptied first: VIPs are unrouted for that moment.
    ///
    /// If someone changes the hooks between the read and the write, the iptables transaction
    /// fails and the next apply starts from a fresh read.
    pub fn apply(&self, ruleset: &Ruleset) -> Result<(), Error> {
        let mut installed = self.installed()?;
        let incompatible = |set: &Option<String>| {
            set.as_deref()
                .is_some_and(|create| !rule::set_compatible(create))
        };
        let replace: Vec<&str> = [
            (ruleset.uses_set(), &installed.set, VIP_SET),
            (ruleset.rejects_empty(), &installed.empty_set, EMPTY_SET),
        ]
        .into_iter()
        .filter(|(used, set, _)| *used && incompatible(set))
        .map(|(_, _, name)| name)
        .collect();
        if !replace.is_empty() {
            // Nothing can be destroyed while a rule references it.
            self.restore(&emptied_chains(&installed))?;
            for set in replace {
                self.ipset(&["destroy", set], None)?;
            }
            installed = self.installed()?;
        }
        let (adds, dels) = set_plan_parts(ruleset, &installed);
        self.apply_in_order(&adds, plan(ruleset, &installed), &dels)?;
        if !ruleset.uses_set() && installed.set.is_some() {
            self.ipset(&["destroy", VIP_SET], None)?;
        }
        if !ruleset.rejects_empty() && installed.empty_set.is_some() {
            self.ipset(&["destroy", EMPTY_SET], None)?;
        }
        Ok(())
    }

    /// Set additions, then one `iptables-restore` of `tables` (if any), then set deletions;
    /// without a restore, additions and deletions go in one `ipset restore` call. See
    /// [`Netfilter::apply`] for why in that order.
    fn apply_in_order(&self, adds: &str, tables: Option<String>, dels: &str) -> Result<(), Error> {
        let ipset = |input: &str| match input.is_empty() {
            true => Ok(()),
            false => self.ipset(&["restore", "-exist"], Some(input)).map(drop),
        };
        match tables {
            None => ipset(&format!("{adds}{dels}")),
            Some(tables) => {
                ipset(adds)?;
                self.restore(&tables)?;
                ipset(dels)
            }
        }
    }
}

/// Restore input that empties flux's chains (those that exist, in filter), so that no rule of
/// flux's references its sets any more.
fn emptied_chains(installed: &Installed) -> String {
    let mut input = String::new();
    if installed.reject_chain {
        input.push_str(&format!("*filter\n:{REJECT_CHAIN} - [0:0]\nCOMMIT\n"));
    }
    input.push_str(&format!(
        "*nat\n:{SERVICES_CHAIN} - [0:0]\n:{CANARY_CHAIN} - [0:0]\nCOMMIT\n"
    ));
    input
}

impl Netfilter {
    /// Moves the kernel from `from`, the ruleset the caller last applied successfully, to `to`,
    /// without reading the kernel first: when only set members differ (services added, removed
    /// or moved, services losing their last instance or getting their first) this is one
    /// `ipset restore -exist` with the member delta of both sets, a few milliseconds whatever
    /// the number of services. When kernel-forwarded services changed (an instance came, went,
    /// or fails its check; a forwarded service added or removed while others remain), one
    /// `iptables-restore --noflush` rewrites only the forwarding chains that differ, between
    /// the set additions and deletions. Anything else (the services chain, hooks, which sets are
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
            || from.rejects_empty() != to.rejects_empty()
            || from.service_rules() != to.service_rules()
            || from.hooks() != to.hooks()
            || from.reject_rules() != to.reject_rules()
            || from.filter_hooks() != to.filter_hooks()
        {
            return self.apply(to);
        }
        let assumed = Installed {
            set: Some(rule::set_create(VIP_SET)),
            set_members: from.set_members().to_vec(),
            empty_set: Some(rule::set_create(EMPTY_SET)),
            empty_members: from.empty_members().to_vec(),
            ..Installed::default()
        };
        let (adds, dels) = set_plan_parts(to, &assumed);
        self.apply_in_order(&adds, forward_change(from, to), &dels)
    }
}

/// The restore input that rewrites the kernel-forwarding chains of `from` into those of `to`
/// (the services chain being the same in both), or `None` when they are equal: the forward
/// chain when its jumps changed, each service chain that is new or changed (declaring it
/// flushes it), and the deletion of those that are gone, all in one transaction.
fn forward_change(from: &Ruleset, to: &Ruleset) -> Option<String> {
    let jumps_changed = from.forward_rules() != to.forward_rules();
    let changed: Vec<(&str, &Vec<String>)> = to
        .forward_chains()
        .iter()
        .filter(|(chain, rules)| from.forward_chains().get(*chain) != Some(*rules))
        .map(|(chain, rules)| (chain.as_str(), rules))
        .collect();
    let gone: Vec<&String> = from
        .forward_chains()
        .keys()
        .filter(|chain| !to.forward_chains().contains_key(*chain))
        .collect();
    if !jumps_changed && changed.is_empty() && gone.is_empty() {
        return None;
    }
    let (declarations, rules) = to.forward_contents(jumps_changed, changed.into_iter());
    let mut input = format!("*nat\n{declarations}{rules}");
    for chain in gone {
        input.push_str(&format!("-F {chain}\n-X {chain}\n"));
    }
    input.push_str("COMMIT\n");
    Some(input)
}

/// [`set_plan_parts`] as one `ipset restore` input, or `None` when the sets already match.
#[cfg(test)]
pub(crate) fn set_plan(ruleset: &Ruleset, installed: &Installed) -> Option<String> {
    let (adds, dels) = set_plan_parts(ruleset, installed);
    let input = adds + &dels;
    (!input.is_empty()).then_some(input)
}

/// The `ipset restore -exist` input that turns the installed sets into the rendered ones, in
/// two parts: the sets that are missing created, then every add; then every delete (see
/// [`Netfilter::apply`] for why in that order). Both empty when the sets already match. Only
/// the sets the ruleset uses are looked at. Members are compared by element: one flux did not
/// render is deleted, one missing or with another comment is (re-)added.
fn set_plan_parts(ruleset: &Ruleset, installed: &Installed) -> (String, String) {
    let mut sets = Vec::new();
    if ruleset.uses_set() {
        sets.push((
            VIP_SET,
            &installed.set,
            &installed.set_members,
            ruleset.set_members(),
        ));
    }
    if ruleset.rejects_empty() {
        sets.push((
            EMPTY_SET,
            &installed.empty_set,
            &installed.empty_members,
            ruleset.empty_members(),
        ));
    }
    let (mut creates, mut adds, mut dels) = (String::new(), String::new(), String::new());
    for (set, create, have, want) in sets {
        if create.is_none() {
            creates.push_str(&rule::set_create(set));
            creates.push('\n');
        }
        member_delta(set, have, want, &mut adds, &mut dels);
    }
    (creates + &adds, dels)
}

/// The `add` lines that bring `want` into `set` and the `del` lines that take out what `have`
/// holds beyond it.
fn member_delta(set: &str, have: &[String], want: &[String], adds: &mut String, dels: &mut String) {
    let have: HashMap<&str, &str> = by_element(set, have);
    let wanted: HashMap<&str, &str> = by_element(set, want);
    for line in want {
        let current = rule::member_element(set, line).and_then(|e| have.get(e));
        if current != Some(&line.as_str()) {
            adds.push_str(line);
            adds.push('\n');
        }
    }
    // Sorted, so the same difference always gives the same input.
    let mut stale: Vec<&str> = have
        .keys()
        .copied()
        .filter(|element| !wanted.contains_key(element))
        .collect();
    stale.sort_unstable();
    for element in stale {
        dels.push_str(&format!("del {set} {element}\n"));
    }
}

/// Member lines of `set` by their element.
fn by_element<'a>(set: &str, lines: &'a [String]) -> HashMap<&'a str, &'a str> {
    lines
        .iter()
        .filter_map(|line| Some((rule::member_element(set, line)?, line.as_str())))
        .collect()
}

/// The restore input that turns `installed` into `ruleset`, or `None` when flux's chains
/// already hold exactly the rendered rules and every hook is there once: per table, the chain
/// contents (declaring a chain flushes it), then hook changes, for the tables that differ.
/// Stale and duplicate hooks are deleted; missing ones are inserted at the top of their chain,
/// ahead of other people's rules that might otherwise accept or rewrite VIP traffic first.
///
/// The filter table goes first while refusing (a failure in nat then leaves empty services
/// refused), nat first when not (the return rule goes before the refusal it made way for).
pub(crate) fn plan(ruleset: &Ruleset, installed: &Installed) -> Option<String> {
    let nat = nat_plan(ruleset, installed);
    let filter = filter_plan(ruleset, installed);
    let input: String = if ruleset.rejects_empty() {
        filter.into_iter().chain(nat).collect()
    } else {
        nat.into_iter().chain(filter).collect()
    };
    (!input.is_empty()).then_some(input)
}

/// The nat table's part of [`plan`], with its `COMMIT`. Kernel-forwarding chains that are not
/// wanted (left from services no longer forwarded) are deleted after the chains that jump to
/// them are rewritten.
fn nat_plan(ruleset: &Ruleset, installed: &Installed) -> Option<String> {
    let hook_commands = hook_commands(ruleset.hooks(), &installed.hooks);
    let chains_match = installed.services_chain
        && installed.canary_chain
        && installed.service_rules == ruleset.service_rules()
        && installed.forward_chain == ruleset.forwards_any()
        && installed.forward_rules == ruleset.forward_rules()
        && installed.forward_chains == *ruleset.forward_chains();
    if chains_match && hook_commands.is_empty() {
        return None;
    }
    let mut input = ruleset.nat_contents();
    let stale_forward =
        (installed.forward_chain && !ruleset.forwards_any()).then_some(FORWARD_CHAIN);
    let stale = stale_forward.into_iter().chain(
        installed
            .forward_chains
            .keys()
            .map(String::as_str)
            .filter(|chain| !ruleset.forward_chains().contains_key(*chain)),
    );
    for chain in stale {
        input.push_str(&format!("-F {chain}\n-X {chain}\n"));
    }
    input.push_str(&hook_commands);
    input.push_str("COMMIT\n");
    Some(input)
}

/// The filter table's part of [`plan`], with its `COMMIT`: the reject chain and its hooks
/// while refusing, and otherwise the removal of any left from before.
fn filter_plan(ruleset: &Ruleset, installed: &Installed) -> Option<String> {
    let hook_commands = hook_commands(ruleset.filter_hooks(), &installed.filter_hooks);
    let mut input = if ruleset.rejects_empty() {
        let chain_matches =
            installed.reject_chain && installed.reject_rules == ruleset.reject_rules();
        if chain_matches && hook_commands.is_empty() {
            return None;
        }
        let mut input = ruleset.filter_contents();
        input.push_str(&hook_commands);
        input
    } else {
        if !installed.reject_chain && hook_commands.is_empty() {
            return None;
        }
        // The hooks go first: a chain must be unreferenced before it can be deleted.
        let mut input = String::from("*filter\n");
        input.push_str(&hook_commands);
        if installed.reject_chain {
            input.push_str(&format!("-F {REJECT_CHAIN}\n-X {REJECT_CHAIN}\n"));
        }
        input
    };
    input.push_str("COMMIT\n");
    Some(input)
}

/// The `-D` and `-I` commands that leave each of `wanted` in its chain exactly once, given the
/// hooks `installed`: stale and duplicate hooks deleted, missing ones inserted at the top.
fn hook_commands(wanted_hooks: &[String], installed: &[String]) -> String {
    let mut commands = String::new();
    let mut wanted: HashMap<&str, usize> = HashMap::new();
    for hook in wanted_hooks {
        *wanted.entry(hook).or_default() += 1;
    }
    for hook in installed {
        match wanted.get_mut(hook.as_str()) {
            Some(n) if *n > 0 => *n -= 1,
            _ => push_command(&mut commands, "-D", hook, ""),
        }
    }
    // Each insert goes to position 1, so inserting in reverse leaves them in rendered order.
    for hook in wanted_hooks.iter().rev() {
        if let Some(n) = wanted.get_mut(hook.as_str()) {
            if *n > 0 {
                *n -= 1;
                push_command(&mut commands, "-I", hook, "1 ");
            }
        }
    }
    commands
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
            ..Desired::default()
        })
    }

    /// `routed` redirected and `empty` refused.
    fn refusing(routed: Vec<Redirect>, empty: Vec<Redirect>, bridges: &[&str]) -> Ruleset {
        render(&Desired {
            redirects: routed,
            rejects: empty,
            reject_empty: true,
            proxy_port: 7100,
            bridge_interfaces: bridges.iter().map(|s| s.to_string()).collect(),
            ..Desired::default()
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
            set: Some(rule::set_create(VIP_SET)),
            set_members: rs.set_members().to_vec(),
            reject_chain: rs.rejects_empty(),
            reject_rules: rs.reject_rules().to_vec(),
            filter_hooks: rs.filter_hooks().to_vec(),
            empty_set: rs.rejects_empty().then(|| rule::set_create(EMPTY_SET)),
            empty_members: rs.empty_members().to_vec(),
            forward_chain: rs.forwards_any(),
            forward_rules: rs.forward_rules().to_vec(),
            forward_chains: rs.forward_chains().clone(),
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
        assert!(input.starts_with(&ruleset(&[]).nat_contents()));
        assert!(!input.contains("*filter"), "not refusing: filter untouched");
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
                "add flux-vips 198.18.0.10,tcp:80 comment \"flux:web\"\n",
                "del flux-vips 198.18.0.99,udp:53\n",
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
    fn first_refusing_apply_writes_filter_then_nat() {
        let rs = refusing(
            vec![redirect("web", "198.18.0.10:80")],
            vec![redirect("idle", "198.18.0.11:80")],
            &["docker0"],
        );
        assert_eq!(
            set_plan(&rs, &Installed::default()).as_deref(),
            Some(concat!(
                "create flux-vips hash:ip,port family inet hashsize 1024 maxelem 1048576 comment\n",
                "create flux-empty hash:ip,port family inet hashsize 1024 maxelem 1048576 comment\n",
                "add flux-vips 198.18.0.10,tcp:80 comment \"flux:web\"\n",
                "add flux-empty 198.18.0.11,tcp:80 comment \"flux:idle\"\n",
            ))
        );
        let input = plan(&rs, &Installed::default()).expect("changes");
        let filter_end = input.find("COMMIT\n").expect("filter part") + "COMMIT\n".len();
        let (filter, nat) = input.split_at(filter_end);
        assert_eq!(
            filter,
            concat!(
                "*filter\n:FLUX-REJECT - [0:0]\n",
                "-A FLUX-REJECT -p tcp -m set --match-set flux-empty dst,dst -m comment --comment \"flux no instance\" -j REJECT --reject-with tcp-reset\n",
                "-I FORWARD 1 -i docker0 -m conntrack --ctstate NEW -m comment --comment \"flux hook\" -j FLUX-REJECT\n",
                "-I INPUT 1 -i docker0 -m conntrack --ctstate NEW -m comment --comment \"flux hook\" -j FLUX-REJECT\n",
                "-I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment \"flux hook\" -j FLUX-REJECT\n",
                "COMMIT\n",
            )
        );
        assert!(nat.starts_with(&rs.nat_contents()), "{nat}");
        assert_eq!(hook_lines(nat).len(), 2);
        assert_eq!(plan(&rs, &installed_as(&rs)), None);
        assert_eq!(set_plan(&rs, &installed_as(&rs)), None);
    }

    /// A VIP moving between the sets is added to its new set before it leaves the old one: in
    /// both for a moment (refused), never in neither (unrouted).
    #[test]
    fn a_vip_moving_between_sets_is_added_before_it_is_deleted() {
        let routed = refusing(
            vec![
                redirect("web", "198.18.0.10:80"),
                redirect("idle", "198.18.0.11:80"),
            ],
            vec![redirect("gone", "198.18.0.12:80")],
            &[],
        );
        let emptied = refusing(
            vec![
                redirect("web", "198.18.0.10:80"),
                redirect("gone", "198.18.0.12:80"),
            ],
            vec![redirect("idle", "198.18.0.11:80")],
            &[],
        );
        assert_eq!(plan(&emptied, &installed_as(&routed)), None);
        assert_eq!(
            set_plan(&emptied, &installed_as(&routed)).as_deref(),
            Some(concat!(
                "add flux-vips 198.18.0.12,tcp:80 comment \"flux:gone\"\n",
                "add flux-empty 198.18.0.11,tcp:80 comment \"flux:idle\"\n",
                "del flux-vips 198.18.0.11,tcp:80\n",
                "del flux-empty 198.18.0.12,tcp:80\n",
            ))
        );
    }

    #[test]
    fn a_flushed_filter_chain_rewrites_only_filter() {
        let rs = refusing(vec![], vec![redirect("idle", "198.18.0.11:80")], &[]);
        let mut installed = installed_as(&rs);
        installed.reject_rules.clear();
        assert_eq!(
            plan(&rs, &installed).as_deref(),
            Some(format!("{}COMMIT\n", rs.filter_contents()).as_str())
        );
        let mut installed = installed_as(&rs);
        installed.filter_hooks.clear();
        assert_eq!(
            hook_lines(&plan(&rs, &installed).expect("hook missing")),
            [
                r#"-I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT"#
            ]
        );
    }

    #[test]
    fn leftover_refusal_rules_are_removed_after_nat_when_not_refusing() {
        let rs = ruleset(&[]);
        let leftover = refusing(vec![], vec![redirect("idle", "198.18.0.11:80")], &[]);
        let installed = Installed {
            service_rules: leftover.service_rules().to_vec(),
            ..installed_as(&leftover)
        };
        let input = plan(&rs, &installed).expect("changes");
        assert_eq!(
            input,
            format!(
                "{}COMMIT\n*filter\n\
                 -D OUTPUT -m conntrack --ctstate NEW -m comment --comment \"flux hook\" -j FLUX-REJECT\n\
                 -F FLUX-REJECT\n-X FLUX-REJECT\nCOMMIT\n",
                rs.nat_contents()
            )
        );
        // The unused set is left for apply to destroy, not emptied member by member.
        assert_eq!(set_plan(&rs, &installed_as(&rs)), None);
    }

    /// Records every command and answers each with empty output.
    struct Recorder(std::sync::Mutex<Vec<(String, Option<String>)>>);

    impl crate::Runner for std::sync::Arc<Recorder> {
        fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
            let command = std::iter::once(program)
                .chain(args.iter().copied())
                .collect::<Vec<_>>()
                .join(" ");
            self.0
                .lock()
                .expect("no panic while held")
                .push((command, stdin.map(str::to_string)));
            Ok(String::new())
        }
    }

    #[test]
    fn apply_change_moves_a_vip_between_sets_with_one_ipset_call() {
        let recorder = std::sync::Arc::new(Recorder(Default::default()));
        let nf = Netfilter::new(recorder.clone());
        let routed = refusing(vec![redirect("web", "198.18.0.10:80")], vec![], &[]);
        let emptied = refusing(vec![], vec![redirect("web", "198.18.0.10:80")], &[]);
        nf.apply_change(&routed, &emptied).expect("change");
        let calls = std::mem::take(&mut *recorder.0.lock().unwrap());
        assert_eq!(
            calls,
            [(
                "ipset restore -exist".to_string(),
                Some(
                    "add flux-empty 198.18.0.10,tcp:80 comment \"flux:web\"\n\
                     del flux-vips 198.18.0.10,tcp:80\n"
                        .to_string()
                )
            )]
        );
        // Turning refusals on or off is no member delta: a full apply, which reads first.
        let not_refusing = render_with(vec![redirect("web", "198.18.0.10:80")], &[]);
        nf.apply_change(&not_refusing, &routed).expect("change");
        let calls = std::mem::take(&mut *recorder.0.lock().unwrap());
        assert_eq!(calls[0].0, "iptables-save -t nat");
        assert!(calls
            .iter()
            .any(|(c, _)| c == "iptables-restore -w 5 --noflush"));
    }

    fn dest(instance: &str, addr: &str) -> crate::Destination {
        crate::Destination {
            instance: instance.into(),
            addr: addr.parse().expect("valid"),
            standby: false,
        }
    }

    /// `web` proxied; `bulk` forwarded to `bulk` (refused when empty), `api` to one instance.
    fn forwarding(bulk: Vec<crate::Destination>) -> Ruleset {
        let bulk_vip = "198.18.0.5:80".parse().expect("valid");
        let mut forwards = vec![crate::Forward {
            service: "api".into(),
            vip: "198.18.0.6:80".parse().expect("valid"),
            destinations: vec![dest("a1", "10.0.0.9:80")],
        }];
        let mut rejects = vec![];
        if bulk.is_empty() {
            rejects.push(redirect("bulk", "198.18.0.5:80"));
        } else {
            forwards.push(crate::Forward {
                service: "bulk".into(),
                vip: bulk_vip,
                destinations: bulk,
            });
        }
        render(&Desired {
            redirects: vec![redirect("web", "198.18.0.10:80")],
            rejects,
            reject_empty: true,
            forwards,
            proxy_port: 7100,
            ..Desired::default()
        })
    }

    fn recorded(
        nf: &Netfilter,
        recorder: &Recorder,
        from: &Ruleset,
        to: &Ruleset,
    ) -> Vec<(String, Option<String>)> {
        nf.apply_change(from, to).expect("change");
        std::mem::take(&mut *recorder.0.lock().unwrap())
    }

    #[test]
    fn an_instance_joining_rewrites_only_its_services_chain() {
        let recorder = std::sync::Arc::new(Recorder(Default::default()));
        let nf = Netfilter::new(recorder.clone());
        let one = forwarding(vec![dest("b1", "10.0.0.1:80")]);
        let two = forwarding(vec![dest("b1", "10.0.0.1:80"), dest("b2", "10.0.0.2:80")]);
        assert_eq!(
            recorded(&nf, &recorder, &one, &two),
            [(
                "iptables-restore -w 5 --noflush".to_string(),
                Some(concat!(
                    "*nat\n",
                    ":FLUX-FWD-C6120005-80 - [0:0]\n",
                    "-A FLUX-FWD-C6120005-80 -p tcp -m comment --comment \"flux:bulk/b1\" -m statistic --mode random --probability 0.50000000000 -j DNAT --to-destination 10.0.0.1:80\n",
                    "-A FLUX-FWD-C6120005-80 -p tcp -m comment --comment \"flux:bulk/b2\" -j DNAT --to-destination 10.0.0.2:80\n",
                    "COMMIT\n",
                ).to_string())
            )]
        );
        assert!(
            recorded(&nf, &recorder, &two, &two).is_empty(),
            "no change, no command"
        );
    }

    /// Its rule comes before its VIP leaves `flux-empty`, and it is back in `flux-empty` before
    /// its rule goes: refused for a moment, never unrouted.
    #[test]
    fn a_forwarded_service_changing_between_refused_and_forwarded_is_never_unrouted() {
        let recorder = std::sync::Arc::new(Recorder(Default::default()));
        let nf = Netfilter::new(recorder.clone());
        let empty = forwarding(vec![]);
        let served = forwarding(vec![dest("b1", "10.0.0.1:80")]);
        let calls = recorded(&nf, &recorder, &empty, &served);
        let commands: Vec<&str> = calls.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(
            commands,
            ["iptables-restore -w 5 --noflush", "ipset restore -exist"]
        );
        let restore = calls[0].1.as_deref().unwrap();
        assert!(
            restore.starts_with("*nat\n:FLUX-FORWARD - [0:0]\n:FLUX-FWD-C6120005-80 - [0:0]\n"),
            "{restore}"
        );
        assert!(!restore.contains("FLUX-SERVICES"), "{restore}");
        assert_eq!(
            calls[1].1.as_deref(),
            Some("del flux-empty 198.18.0.5,tcp:80\n")
        );

        let calls = recorded(&nf, &recorder, &served, &empty);
        let commands: Vec<&str> = calls.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(
            commands,
            ["ipset restore -exist", "iptables-restore -w 5 --noflush"]
        );
        assert_eq!(
            calls[0].1.as_deref(),
            Some("add flux-empty 198.18.0.5,tcp:80 comment \"flux:bulk\"\n")
        );
        assert!(calls[1]
            .1
            .as_deref()
            .unwrap()
            .ends_with("-F FLUX-FWD-C6120005-80\n-X FLUX-FWD-C6120005-80\nCOMMIT\n"));
    }

    #[test]
    fn the_first_forwarded_service_is_a_full_apply() {
        let recorder = std::sync::Arc::new(Recorder(Default::default()));
        let nf = Netfilter::new(recorder.clone());
        let proxied = refusing(vec![redirect("web", "198.18.0.10:80")], vec![], &[]);
        let calls = recorded(&nf, &recorder, &proxied, &forwarding(vec![]));
        assert_eq!(
            calls[0].0, "iptables-save -t nat",
            "the services chain changes"
        );
    }

    #[test]
    fn a_full_apply_writes_the_forwarding_chains_and_deletes_stale_ones() {
        let rs = forwarding(vec![dest("b1", "10.0.0.1:80")]);
        let input = plan(&rs, &Installed::default()).expect("changes");
        let nat = &input[input.find("*nat").unwrap()..];
        assert!(nat.starts_with(concat!(
            "*nat\n:FLUX-SERVICES - [0:0]\n:FLUX-CANARY - [0:0]\n",
            ":FLUX-FORWARD - [0:0]\n:FLUX-FWD-C6120005-80 - [0:0]\n:FLUX-FWD-C6120006-80 - [0:0]\n",
            "-A FLUX-SERVICES -p tcp -m set --match-set flux-empty dst,dst -m comment --comment \"flux no instance\" -j RETURN\n",
            "-A FLUX-SERVICES -p tcp -m comment --comment \"flux forward\" -j FLUX-FORWARD\n",
            "-A FLUX-SERVICES -p tcp -m set --match-set flux-vips dst,dst -m comment --comment \"flux vips\" -j REDIRECT --to-ports 7100\n",
            "-A FLUX-FORWARD ",
        )), "{nat}");
        assert_eq!(plan(&rs, &installed_as(&rs)), None);
        // A chain left from a service no longer forwarded is deleted, after the chain that
        // jumps to it is rewritten.
        let mut installed = installed_as(&rs);
        installed
            .forward_chains
            .insert("FLUX-FWD-C6120063-80".into(), vec![]);
        let input = plan(&rs, &installed).expect("a stale chain");
        let rewritten = input.find(":FLUX-FORWARD - [0:0]").unwrap();
        let deleted = input
            .find("-F FLUX-FWD-C6120063-80\n-X FLUX-FWD-C6120063-80\n")
            .unwrap();
        assert!(rewritten < deleted, "{input}");
        // Nothing forwarded any more: the forward chain goes too.
        let proxied = refusing(vec![redirect("web", "198.18.0.10:80")], vec![], &[]);
        let input = plan(&proxied, &installed_as(&rs)).expect("changes");
        assert!(
            input.contains("-F FLUX-FORWARD\n-X FLUX-FORWARD\n-F FLUX-FWD-C6120005-80\n"),
            "{input}"
        );
        assert!(!input.contains(":FLUX-FORWARD"), "{input}");
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
