//! The text of single rules and set members, in the exact form `iptables-save` and
//! `ipset save` print them.
//!
//! Rendering and reading back share these helpers so that a freshly applied ruleset compares
//! equal, string for string, to what the kernel reports; any difference in normalisation would
//! look like permanent drift and make the daemon re-apply forever.

use std::net::SocketAddrV4;

use crate::{
    EMPTY_RULE_COMMENT, EMPTY_SET, FORWARD_CHAIN, FORWARD_CHAIN_PREFIX, FORWARD_RULE_COMMENT,
    HOOK_COMMENT, REJECT_CHAIN, SERVICES_CHAIN, SERVICE_COMMENT_PREFIX, SET_RULE_COMMENT, VIP_SET,
};

/// The rule that sends connections to every VIP in [`VIP_SET`] to the proxy: `dst,dst` matches
/// the destination address and port against the set's `ip,port` members. Written in the order
/// `iptables-save` prints it, so the round trip is exact.
pub(crate) fn set_rule(proxy_port: u16) -> String {
    format!(
        "-A {SERVICES_CHAIN} -p tcp -m set --match-set {VIP_SET} dst,dst \
         -m comment --comment \"{SET_RULE_COMMENT}\" -j REDIRECT --to-ports {proxy_port}"
    )
}

/// The first rule of the services chain: a connection to a VIP in [`EMPTY_SET`] leaves the
/// chain before any redirect (its set member or a VIP range's rule) can take it, so that the
/// filter table's [`reject_rule`] sees its real destination and refuses it.
pub(crate) fn empty_return_rule() -> String {
    format!(
        "-A {SERVICES_CHAIN} -p tcp -m set --match-set {EMPTY_SET} dst,dst \
         -m comment --comment \"{EMPTY_RULE_COMMENT}\" -j RETURN"
    )
}

/// The rule that refuses connections to every VIP in [`EMPTY_SET`] with a TCP reset, so the
/// client's `connect()` fails at once with `ECONNREFUSED`. The filter table runs after nat in
/// every hook, so a redirected connection (its destination rewritten to the proxy) never
/// matches it.
pub(crate) fn reject_rule() -> String {
    format!(
        "-A {REJECT_CHAIN} -p tcp -m set --match-set {EMPTY_SET} dst,dst \
         -m comment --comment \"{EMPTY_RULE_COMMENT}\" -j REJECT --reject-with tcp-reset"
    )
}

/// The services chain's jump to [`FORWARD_CHAIN`], right after the return of refused VIPs and
/// before every redirect, so that no set member or VIP range rule takes a kernel-forwarded VIP.
pub(crate) fn forward_jump_rule() -> String {
    format!(
        "-A {SERVICES_CHAIN} -p tcp -m comment --comment \"{FORWARD_RULE_COMMENT}\" -j {FORWARD_CHAIN}"
    )
}

/// The chain of the kernel-forwarded service at `vip`: see [`FORWARD_CHAIN_PREFIX`].
pub(crate) fn forward_chain_name(vip: SocketAddrV4) -> String {
    format!(
        "{FORWARD_CHAIN_PREFIX}{:08X}-{}",
        u32::from(*vip.ip()),
        vip.port()
    )
}

/// The rule of [`FORWARD_CHAIN`] that sends connections to `vip` to the service's own chain.
pub(crate) fn forward_service_rule(service: &str, vip: SocketAddrV4) -> String {
    format!(
        "-A {FORWARD_CHAIN} -d {}/32 -p tcp -m tcp --dport {} \
         -m comment --comment \"{SERVICE_COMMENT_PREFIX}{service}\" -j {}",
        vip.ip(),
        vip.port(),
        forward_chain_name(vip)
    )
}

/// One instance's rule in its service's chain: `DNAT` to `addr`, taken with `probability`
/// (as [`probability`] prints it) or, for the chain's last rule, always. The comment names
/// the service and the instance (`flux:web/b1`), which [`instance_comment`] reads back.
pub(crate) fn dnat_rule(
    chain: &str,
    service: &str,
    instance: &str,
    probability: Option<&str>,
    addr: SocketAddrV4,
) -> String {
    let statistic = probability
        .map(|p| format!(" -m statistic --mode random --probability {p}"))
        .unwrap_or_default();
    format!(
        "-A {chain} -p tcp -m comment --comment \"{SERVICE_COMMENT_PREFIX}{service}/{instance}\"\
         {statistic} -j DNAT --to-destination {addr}"
    )
}

/// The probability that gives one of the `remaining` rules left in a chain an even share:
/// `1/remaining`, in the form `iptables-save` prints it. The kernel keeps it as a 31-bit
/// fraction (`lround(2^31 * p)`) and iptables prints that fraction back with 11 decimals, so
/// writing the printed form makes the round trip exact (1/3 reads back as `0.33333333349`).
pub(crate) fn probability(remaining: usize) -> String {
    const SCALE: f64 = 2_147_483_648.0; // 2^31
    let fixed = (SCALE / remaining.max(1) as f64).round();
    format!("{:.11}", fixed / SCALE)
}

/// The service and instance of a rule comment `flux:SERVICE/INSTANCE` (an instance's `DNAT`
/// rule); the service alone for `flux:SERVICE`. Service names hold no `/`, so the split is
/// unambiguous.
pub(crate) fn instance_comment(comment: &str) -> Option<(&str, Option<&str>)> {
    let named = comment.strip_prefix(SERVICE_COMMENT_PREFIX)?;
    Some(match named.split_once('/') {
        Some((service, instance)) => (service, Some(instance)),
        None => (named, None),
    })
}

/// The `ipset restore` command that creates `set` ([`VIP_SET`] or [`EMPTY_SET`]). `maxelem`
/// well above any realistic number of services (the hash grows as needed; the default cap is
/// 65,536).
pub(crate) fn set_create(set: &str) -> String {
    format!("create {set} hash:ip,port family inet hashsize 1024 maxelem 1048576 comment")
}

/// Whether an existing set (its `create` line from `ipset save`) can hold flux's members: the
/// right type and family, with the comment extension. Size parameters do not matter.
pub(crate) fn set_compatible(create: &str) -> bool {
    let words: Vec<&str> = create.split(' ').collect();
    words.get(2) == Some(&"hash:ip,port")
        && words.windows(2).any(|w| w == ["family", "inet"])
        && words.contains(&"comment")
}

/// One VIP as a member of `set`, as `ipset save` prints it; also the `ipset restore` command
/// that adds it (with `-exist`, replacing the comment of a member already there).
pub(crate) fn set_member(set: &str, service: &str, vip: SocketAddrV4) -> String {
    format!(
        "add {set} {element} comment \"{SERVICE_COMMENT_PREFIX}{service}\"",
        element = member_element_of(vip),
    )
}

/// The set element for a VIP: `198.18.0.10,tcp:80`.
pub(crate) fn member_element_of(vip: SocketAddrV4) -> String {
    format!("{},tcp:{}", vip.ip(), vip.port())
}

/// The element of a saved member line (`add SET ELEMENT ...`), if the line is a member of
/// `set`.
pub(crate) fn member_element<'a>(set: &str, line: &'a str) -> Option<&'a str> {
    let rest = line
        .strip_prefix("add ")?
        .strip_prefix(set)?
        .strip_prefix(' ')?;
    rest.split(' ').next().filter(|e| !e.is_empty())
}

/// The comment of a saved member line, unquoted. `ipset save` prints it in double quotes with
/// no escaping; render only writes names that need none.
pub(crate) fn member_comment(line: &str) -> Option<&str> {
    let (_, after) = line.split_once(" comment \"")?;
    after.split('"').next()
}

/// The comment on VIP range rules; no service name, so `annotate` names no service.
pub(crate) const RANGE_COMMENT: &str = "flux vip range";

/// The rule that sends every TCP connection to a VIP range to the proxy.
pub(crate) fn range_rule(range: &crate::VipRange, proxy_port: u16) -> String {
    format!(
        "-A {SERVICES_CHAIN} -d {range} -p tcp -m comment --comment \"{RANGE_COMMENT}\" \
         -j REDIRECT --to-ports {proxy_port}"
    )
}

/// The rule that redirects datagrams to a `udp` service's `vip` to its relay socket on
/// `port`, as `iptables-save` prints it.
pub(crate) fn udp_rule(service: &str, vip: SocketAddrV4, port: u16) -> String {
    format!(
        "-A {SERVICES_CHAIN} -d {}/32 -p udp -m udp --dport {} \
         -m comment --comment \"{SERVICE_COMMENT_PREFIX}{service}\" -j REDIRECT --to-ports {port}",
        vip.ip(),
        vip.port()
    )
}

/// The hook for connections opened by the host's own processes.
pub(crate) fn output_hook() -> String {
    format!("-A OUTPUT -m comment --comment \"{HOOK_COMMENT}\" -j {SERVICES_CHAIN}")
}

/// The hook for connections from containers, which enter the host on a bridge.
pub(crate) fn prerouting_hook(interface: &str) -> String {
    format!(
        "-A PREROUTING -i {interface} -m comment --comment \"{HOOK_COMMENT}\" -j {SERVICES_CHAIN}"
    )
}

/// The filter hook for connections opened by the host's own processes. Only a connection's
/// first packets (`NEW`) jump to the chain: the filter table sees every packet, and every
/// proxied byte would otherwise pay for a set lookup (kube-proxy hooks its filter chains the
/// same way).
pub(crate) fn filter_output_hook() -> String {
    format!(
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"{HOOK_COMMENT}\" \
         -j {REJECT_CHAIN}"
    )
}

/// The filter hook for connections from containers on `interface`, in `chain`: `FORWARD` for
/// a VIP routed onwards (the usual case), `INPUT` for one routed to this host itself. Only
/// the bridges, as in nat: traffic arriving from the LAN is never flux's to refuse.
pub(crate) fn filter_bridge_hook(chain: &str, interface: &str) -> String {
    format!(
        "-A {chain} -i {interface} -m conntrack --ctstate NEW \
         -m comment --comment \"{HOOK_COMMENT}\" -j {REJECT_CHAIN}"
    )
}

/// Splits `-A CHAIN SPEC` into the chain and the rule specification, so a saved rule can be
/// turned into a `-I`/`-D` command for the same rule.
pub(crate) fn split_append(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("-A ")?;
    match rest.split_once(' ') {
        Some((chain, spec)) => Some((chain, spec)),
        None => Some((rest, "")),
    }
}

/// Whether a rule in a shared chain of the nat table is one of flux's hooks. Both the comment
/// and the jump must match: a rule someone else wrote that happens to jump to flux's chain is
/// not flux's to delete.
pub(crate) fn is_hook(chain: &str, line: &str) -> bool {
    (chain == "PREROUTING" || chain == "OUTPUT")
        && comment(line).as_deref() == Some(HOOK_COMMENT)
        && line.ends_with(&format!(" -j {SERVICES_CHAIN}"))
}

/// [`is_hook`] for the filter table's hooks into [`REJECT_CHAIN`].
pub(crate) fn is_filter_hook(chain: &str, line: &str) -> bool {
    matches!(chain, "INPUT" | "FORWARD" | "OUTPUT")
        && comment(line).as_deref() == Some(HOOK_COMMENT)
        && line.ends_with(&format!(" -j {REJECT_CHAIN}"))
}

/// The text of a rule's `--comment`, unquoted. iptables 1.8 always quotes it and escapes `"` and
/// `\` inside; older versions printed simple comments bare, so both forms are read. Only the
/// `-m comment --comment` match counts: an interface may be called `br--comment`.
pub(crate) fn comment(line: &str) -> Option<String> {
    let (_, after) = line.split_once(" -m comment --comment ")?;
    let mut chars = after.chars();
    if !after.starts_with('"') {
        return Some(after.split(' ').next().unwrap_or_default().to_string());
    }
    chars.next(); // the opening quote
    let mut text = String::new();
    while let Some(c) = chars.next() {
        match c {
            '\\' => text.push(chars.next()?),
            '"' => return Some(text),
            c => text.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_quoted_bare_and_escaped_comments() {
        assert_eq!(
            comment(r#"-A X -m comment --comment "flux:web" -j Y"#).as_deref(),
            Some("flux:web")
        );
        assert_eq!(
            comment("-A X -m comment --comment flux:web -j Y").as_deref(),
            Some("flux:web")
        );
        assert_eq!(
            comment(r#"-A X -m comment --comment "a \"b\" \\c" -j Y"#).as_deref(),
            Some(r#"a "b" \c"#)
        );
        assert_eq!(comment("-A X -j Y"), None);
        // Found by fuzzing (netfilter_render): an interface whose name holds `--comment`.
        assert_eq!(
            comment(r#"-A PREROUTING -i g.g--comment -m comment --comment "flux hook" -j Y"#)
                .as_deref(),
            Some("flux hook")
        );
        assert_eq!(comment(r#"-A X -m comment --comment "unterminated"#), None);
    }

    #[test]
    fn recognises_only_flux_hooks() {
        assert!(is_hook("OUTPUT", &output_hook()));
        assert!(is_hook("PREROUTING", &prerouting_hook("docker0")));
        assert!(!is_hook("FORWARD", &output_hook()));
        assert!(!is_hook("OUTPUT", "-A OUTPUT -j FLUX-SERVICES"));
        assert!(!is_hook(
            "OUTPUT",
            r#"-A OUTPUT -m comment --comment "flux hook" -j ACCEPT"#
        ));
        assert!(!is_hook("OUTPUT", &filter_output_hook()));
    }

    #[test]
    fn recognises_only_flux_filter_hooks() {
        assert!(is_filter_hook("OUTPUT", &filter_output_hook()));
        assert!(is_filter_hook(
            "FORWARD",
            &filter_bridge_hook("FORWARD", "br-+")
        ));
        assert!(is_filter_hook(
            "INPUT",
            &filter_bridge_hook("INPUT", "docker0")
        ));
        assert!(!is_filter_hook("PREROUTING", &filter_output_hook()));
        assert!(!is_filter_hook("OUTPUT", &output_hook()));
        assert!(!is_filter_hook("OUTPUT", "-A OUTPUT -j FLUX-REJECT"));
    }

    /// The exact text `iptables-save` printed for these rules (iptables 1.8.9, nf_tables), so
    /// the round trip is exact and the drift check does not loop.
    #[test]
    fn reject_rules_read_as_iptables_save_prints_them() {
        assert_eq!(
            empty_return_rule(),
            r#"-A FLUX-SERVICES -p tcp -m set --match-set flux-empty dst,dst -m comment --comment "flux no instance" -j RETURN"#
        );
        assert_eq!(
            reject_rule(),
            r#"-A FLUX-REJECT -p tcp -m set --match-set flux-empty dst,dst -m comment --comment "flux no instance" -j REJECT --reject-with tcp-reset"#
        );
        assert_eq!(
            filter_output_hook(),
            r#"-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT"#
        );
        assert_eq!(
            filter_bridge_hook("FORWARD", "br-+"),
            r#"-A FORWARD -i br-+ -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT"#
        );
    }

    /// The exact text `iptables-save` printed (iptables 1.8.9, nf_tables) for a service forwarded
    /// to three instances, so the round trip is exact.
    #[test]
    fn forward_rules_read_as_iptables_save_prints_them() {
        let vip: SocketAddrV4 = "198.18.0.10:80".parse().unwrap();
        let chain = forward_chain_name(vip);
        assert_eq!(chain, "FLUX-FWD-C612000A-80");
        assert!(chain.len() <= 28, "iptables' limit");
        assert_eq!(
            forward_chain_name("255.255.255.255:65535".parse().unwrap()).len(),
            23
        );
        assert_eq!(
            forward_jump_rule(),
            r#"-A FLUX-SERVICES -p tcp -m comment --comment "flux forward" -j FLUX-FORWARD"#
        );
        assert_eq!(
            forward_service_rule("web", vip),
            r#"-A FLUX-FORWARD -d 198.18.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "flux:web" -j FLUX-FWD-C612000A-80"#
        );
        let to = |p: u16| SocketAddrV4::new([127, 0, 0, 1].into(), p);
        assert_eq!(
            dnat_rule(&chain, "web", "b1", Some(&probability(3)), to(9001)),
            r#"-A FLUX-FWD-C612000A-80 -p tcp -m comment --comment "flux:web/b1" -m statistic --mode random --probability 0.33333333349 -j DNAT --to-destination 127.0.0.1:9001"#
        );
        assert_eq!(
            dnat_rule(&chain, "web", "b3", None, to(9003)),
            r#"-A FLUX-FWD-C612000A-80 -p tcp -m comment --comment "flux:web/b3" -j DNAT --to-destination 127.0.0.1:9003"#
        );
    }

    #[test]
    fn probabilities_are_printed_as_iptables_prints_them() {
        assert_eq!(probability(2), "0.50000000000");
        assert_eq!(probability(3), "0.33333333349");
        assert_eq!(probability(4), "0.25000000000");
        assert_eq!(probability(7), "0.14285714272");
        assert_eq!(probability(1000), "0.00100000016");
    }

    #[test]
    fn reads_service_and_instance_from_comments() {
        assert_eq!(instance_comment("flux:web/b1"), Some(("web", Some("b1"))));
        assert_eq!(instance_comment("flux:web"), Some(("web", None)));
        assert_eq!(instance_comment("flux forward"), None);
    }

    #[test]
    fn reads_set_members() {
        let line = set_member(VIP_SET, "web", "198.18.0.10:80".parse().expect("valid"));
        assert_eq!(
            line,
            r#"add flux-vips 198.18.0.10,tcp:80 comment "flux:web""#
        );
        assert_eq!(member_element(VIP_SET, &line), Some("198.18.0.10,tcp:80"));
        assert_eq!(member_element(EMPTY_SET, &line), None);
        assert_eq!(member_comment(&line), Some("flux:web"));
        assert_eq!(
            member_element(VIP_SET, "add flux-vips 198.18.0.1,udp:53"),
            Some("198.18.0.1,udp:53")
        );
        assert_eq!(member_comment("add flux-vips 198.18.0.1,udp:53"), None);
        assert_eq!(
            member_element(VIP_SET, "add flux-vips-other 1.2.3.4,tcp:1"),
            None
        );
        assert_eq!(
            member_element(VIP_SET, "create flux-vips hash:ip,port"),
            None
        );
        let empty = set_member(EMPTY_SET, "idle", "198.18.0.11:80".parse().expect("valid"));
        assert_eq!(
            empty,
            r#"add flux-empty 198.18.0.11,tcp:80 comment "flux:idle""#
        );
        assert_eq!(
            member_element(EMPTY_SET, &empty),
            Some("198.18.0.11,tcp:80")
        );
    }

    #[test]
    fn judges_existing_sets_by_type_family_and_comments() {
        assert!(set_compatible(&set_create(VIP_SET)));
        assert!(set_compatible(&set_create(EMPTY_SET)));
        assert!(set_compatible(
            "create flux-vips hash:ip,port family inet hashsize 1024 maxelem 65536 comment bucketsize 12 initval 0x1"
        ));
        assert!(!set_compatible(
            "create flux-vips hash:ip family inet hashsize 1024 maxelem 65536 comment"
        ));
        assert!(!set_compatible(
            "create flux-vips hash:ip,port family inet6 hashsize 1024 comment"
        ));
        assert!(!set_compatible(
            "create flux-vips hash:ip,port family inet hashsize 1024 maxelem 65536"
        ));
    }

    #[test]
    fn splits_chain_from_spec() {
        assert_eq!(
            split_append("-A OUTPUT -j ACCEPT"),
            Some(("OUTPUT", "-j ACCEPT"))
        );
        assert_eq!(split_append("-A EMPTY"), Some(("EMPTY", "")));
        assert_eq!(split_append(":OUTPUT ACCEPT [0:0]"), None);
    }
}
