//! The text of single rules, in the exact form `iptables-save` prints them.
//!
//! Rendering and reading back share these helpers so that a freshly applied ruleset compares
//! equal, string for string, to what the kernel reports; any difference in normalisation would
//! look like permanent drift and make the daemon re-apply forever.

use std::net::SocketAddrV4;

use crate::{HOOK_COMMENT, SERVICES_CHAIN, SERVICE_COMMENT_PREFIX};

/// The rule that sends one VIP's connections to the proxy. `-m tcp` and the quoted comment are
/// there because `iptables-save` adds them; writing them ourselves keeps the round trip exact.
pub(crate) fn service_rule(service: &str, vip: SocketAddrV4, proxy_port: u16) -> String {
    format!(
        "-A {SERVICES_CHAIN} -d {ip}/32 -p tcp -m tcp --dport {port} \
         -m comment --comment \"{SERVICE_COMMENT_PREFIX}{service}\" \
         -j REDIRECT --to-ports {proxy_port}",
        ip = vip.ip(),
        port = vip.port(),
    )
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
/// `\` inside; older versions printed simple comments bare, so both forms are read.
pub(crate) fn comment(line: &str) -> Option<String> {
    let (_, after) = line.split_once("--comment ")?;
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
        assert_eq!(comment(r#"-A X --comment "unterminated"#), None);
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
    fn splits_chain_from_spec() {
        assert_eq!(
            split_append("-A OUTPUT -j ACCEPT"),
            Some(("OUTPUT", "-j ACCEPT"))
        );
        assert_eq!(split_append("-A EMPTY"), Some(("EMPTY", "")));
        assert_eq!(split_append(":OUTPUT ACCEPT [0:0]"), None);
    }
}
