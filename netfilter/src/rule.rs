//! The text of single rules and set members, in the exact form `iptables-save` and
//! `ipset save` print them.
//!
//! Rendering and reading back share these helpers so that a freshly applied ruleset compares
//! equal, string for string, to what the kernel reports; any difference in normalisation would
//! look like permanent drift and make the daemon re-apply forever.

use std::net::SocketAddrV4;

use crate::{HOOK_COMMENT, SERVICES_CHAIN, SERVICE_COMMENT_PREFIX, SET_RULE_COMMENT, VIP_SET};

/// The rule that sends connections to every VIP in [`VIP_SET`] to the proxy: `dst,dst` matches
/// the destination address and port against the set's `ip,port` members. Written in the order
/// `iptables-save` prints it, so the round trip is exact.
pub(crate) fn set_rule(proxy_port: u16) -> String {
    format!(
        "-A {SERVICES_CHAIN} -p tcp -m set --match-set {VIP_SET} dst,dst \
         -m comment --comment \"{SET_RULE_COMMENT}\" -j REDIRECT --to-ports {proxy_port}"
    )
}

/// The `ipset restore` command that creates [`VIP_SET`]. `maxelem` well above any realistic
/// number of services (the hash grows as needed; the default cap is 65,536).
pub(crate) fn set_create() -> String {
    format!("create {VIP_SET} hash:ip,port family inet hashsize 1024 maxelem 1048576 comment")
}

/// Whether an existing set (its `create` line from `ipset save`) can hold flux's members: the
/// right type and family, with the comment extension. Size parameters do not matter.
pub(crate) fn set_compatible(create: &str) -> bool {
    let words: Vec<&str> = create.split(' ').collect();
    words.get(2) == Some(&"hash:ip,port")
        && words.windows(2).any(|w| w == ["family", "inet"])
        && words.contains(&"comment")
}

/// One VIP as a member of [`VIP_SET`], as `ipset save` prints it; also the `ipset restore`
/// command that adds it (with `-exist`, replacing the comment of a member already there).
pub(crate) fn set_member(service: &str, vip: SocketAddrV4) -> String {
    format!(
        "add {VIP_SET} {element} comment \"{SERVICE_COMMENT_PREFIX}{service}\"",
        element = member_element_of(vip),
    )
}

/// The set element for a VIP: `198.18.0.10,tcp:80`.
pub(crate) fn member_element_of(vip: SocketAddrV4) -> String {
    format!("{},tcp:{}", vip.ip(), vip.port())
}

/// The element of a saved member line (`add SET ELEMENT ...`), if the line is a member of
/// [`VIP_SET`].
pub(crate) fn member_element(line: &str) -> Option<&str> {
    let rest = line
        .strip_prefix("add ")?
        .strip_prefix(VIP_SET)?
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

/// Splits `-A CHAIN SPEC` into the chain and the rule specification, so a saved rule can be
/// turned into a `-I`/`-D` command for the same rule.
pub(crate) fn split_append(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("-A ")?;
    match rest.split_once(' ') {
        Some((chain, spec)) => Some((chain, spec)),
        None => Some((rest, "")),
    }
}

/// Whether a rule in a shared chain is one of flux's hooks. Both the comment and the jump must
/// match: a rule someone else wrote that happens to jump to flux's chain is not flux's to delete.
pub(crate) fn is_hook(chain: &str, line: &str) -> bool {
    (chain == "PREROUTING" || chain == "OUTPUT")
        && comment(line).as_deref() == Some(HOOK_COMMENT)
        && line.ends_with(&format!(" -j {SERVICES_CHAIN}"))
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
    }

    #[test]
    fn reads_set_members() {
        let line = set_member("web", "198.18.0.10:80".parse().expect("valid"));
        assert_eq!(
            line,
            r#"add flux-vips 198.18.0.10,tcp:80 comment "flux:web""#
        );
        assert_eq!(member_element(&line), Some("198.18.0.10,tcp:80"));
        assert_eq!(member_comment(&line), Some("flux:web"));
        assert_eq!(
            member_element("add flux-vips 198.18.0.1,udp:53"),
            Some("198.18.0.1,udp:53")
        );
        assert_eq!(member_comment("add flux-vips 198.18.0.1,udp:53"), None);
        assert_eq!(member_element("add flux-vips-other 1.2.3.4,tcp:1"), None);
        assert_eq!(member_element("create flux-vips hash:ip,port"), None);
    }

    #[test]
    fn judges_existing_sets_by_type_family_and_comments() {
        assert!(set_compatible(&set_create()));
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
