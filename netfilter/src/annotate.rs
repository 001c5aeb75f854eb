//! Installed rules and set members labelled for people, for `fluxd debug`.

use crate::installed::Installed;
use crate::rule;
use crate::{EMPTY_SET, SERVICE_COMMENT_PREFIX, VIP_SET};

/// One installed rule and the service it serves, so an operator reading the kernel's rules can
/// tell which service (if any) each one belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotatedRule {
    /// The table the rule is in, `nat` or `filter` (both have an `OUTPUT` chain).
    pub table: &'static str,
    /// The chain the rule is in.
    pub chain: String,
    /// The rule as `iptables-save` prints it.
    pub rule: String,
    /// The service named by the rule's `flux:` comment; `None` for hooks and for rules flux did
    /// not write, which is itself worth showing.
    pub service: Option<String>,
    /// The instance a kernel-forwarded service's `DNAT` rule sends to (its comment is
    /// `flux:SERVICE/INSTANCE`); `None` for every other rule.
    pub instance: Option<String>,
}

/// Labels every installed flux rule: nat's hooks first (where traffic enters), then the services
/// chain in kernel order, the kernel-forwarding chains (the forward chain, then each service's
/// own by name), then anything in the canary chain; then filter's hooks and the reject chain.
pub fn annotate(installed: &Installed) -> Vec<AnnotatedRule> {
    let nat = installed
        .hooks
        .iter()
        .chain(&installed.service_rules)
        .chain(&installed.forward_rules)
        .chain(installed.forward_chains.values().flatten())
        .chain(&installed.canary_rules)
        .map(|line| ("nat", line));
    let filter = installed
        .filter_hooks
        .iter()
        .chain(&installed.reject_rules)
        .map(|line| ("filter", line));
    nat.chain(filter)
        .map(|(table, line)| {
            let comment = rule::comment(line);
            let named = comment.as_deref().and_then(rule::instance_comment);
            AnnotatedRule {
                table,
                chain: rule::split_append(line)
                    .map(|(chain, _)| chain.to_string())
                    .unwrap_or_default(),
                rule: line.clone(),
                service: named.map(|(service, _)| service.to_string()),
                instance: named.and_then(|(_, instance)| instance.map(str::to_string)),
            }
        })
        .collect()
}

/// One member of one of flux's installed sets and the service it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotatedMember {
    /// The set element, `198.18.0.10,tcp:80`.
    pub element: String,
    /// The member as `ipset save` prints it.
    pub member: String,
    /// The service named by the member's `flux:` comment; `None` for members flux did not add.
    pub service: Option<String>,
}

/// Labels every member of the installed VIP set, sorted by element so that two reads of the
/// same set (which `ipset save` prints in hash order) look the same.
pub fn annotate_set(installed: &Installed) -> Vec<AnnotatedMember> {
    annotate_members(VIP_SET, &installed.set_members)
}

/// Labels every member of the installed [`EMPTY_SET`]: the VIPs refused because their service
/// has no instance, sorted by element.
pub fn annotate_empty_set(installed: &Installed) -> Vec<AnnotatedMember> {
    annotate_members(EMPTY_SET, &installed.empty_members)
}

fn annotate_members(set: &str, lines: &[String]) -> Vec<AnnotatedMember> {
    let mut members: Vec<AnnotatedMember> = lines
        .iter()
        .map(|line| AnnotatedMember {
            element: rule::member_element(set, line)
                .unwrap_or_default()
                .to_string(),
            member: line.clone(),
            service: rule::member_comment(line)
                .and_then(|c| c.strip_prefix(SERVICE_COMMENT_PREFIX).map(str::to_string)),
        })
        .collect();
    members.sort_by_key(|m| (element_order(&m.element), m.member.clone()));
    members
}

/// `IP,proto:port` ordered by address, then port (numerically), then the text.
fn element_order(element: &str) -> (Option<std::net::Ipv4Addr>, Option<u16>, String) {
    let (ip, rest) = element.split_once(',').unwrap_or((element, ""));
    let port = rest.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
    (ip.parse().ok(), port, element.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_services_of_set_members() {
        let installed = Installed {
            set: Some(rule::set_create(VIP_SET)),
            set_members: vec![
                r#"add flux-vips 198.18.0.10,tcp:80 comment "flux:web""#.into(),
                "add flux-vips 198.18.0.9,tcp:80".into(),
                r#"add flux-vips 198.18.0.10,tcp:443 comment "flux:api""#.into(),
            ],
            ..Installed::default()
        };
        let summary: Vec<(String, Option<String>)> = annotate_set(&installed)
            .into_iter()
            .map(|m| (m.element, m.service))
            .collect();
        assert_eq!(
            summary,
            [
                ("198.18.0.9,tcp:80".to_string(), None),
                ("198.18.0.10,tcp:80".to_string(), Some("web".to_string())),
                ("198.18.0.10,tcp:443".to_string(), Some("api".to_string())),
            ]
        );
    }

    #[test]
    fn names_services_of_refused_vips() {
        let installed = Installed {
            set_members: vec![r#"add flux-vips 198.18.0.10,tcp:80 comment "flux:web""#.into()],
            empty_set: Some(rule::set_create(EMPTY_SET)),
            empty_members: vec![
                r#"add flux-empty 198.18.0.12,tcp:80 comment "flux:idle""#.into(),
                "add flux-empty 198.18.0.11,tcp:22".into(),
            ],
            ..Installed::default()
        };
        let summary: Vec<(String, Option<String>)> = annotate_empty_set(&installed)
            .into_iter()
            .map(|m| (m.element, m.service))
            .collect();
        assert_eq!(
            summary,
            [
                ("198.18.0.11,tcp:22".to_string(), None),
                ("198.18.0.12,tcp:80".to_string(), Some("idle".to_string())),
            ]
        );
        assert_eq!(annotate_set(&installed).len(), 1);
    }

    #[test]
    fn names_services_from_comments() {
        let installed = Installed {
            services_chain: true,
            canary_chain: true,
            hooks: vec![r#"-A OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES"#.into()],
            service_rules: vec![
                r#"-A FLUX-SERVICES -d 198.18.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "flux:web" -j REDIRECT --to-ports 7100"#.into(),
                "-A FLUX-SERVICES -j ACCEPT".into(),
            ],
            canary_rules: vec![],
            ..Installed::default()
        };
        let with_filter = Installed {
            forward_chain: true,
            forward_rules: vec![
                r#"-A FLUX-FORWARD -d 198.18.0.11/32 -p tcp -m tcp --dport 80 -m comment --comment "flux:bulk" -j FLUX-FWD-C612000B-80"#.into(),
            ],
            forward_chains: [(
                "FLUX-FWD-C612000B-80".to_string(),
                vec![r#"-A FLUX-FWD-C612000B-80 -p tcp -m comment --comment "flux:bulk/b1" -j DNAT --to-destination 10.0.0.1:80"#.into()],
            )]
            .into(),
            reject_chain: true,
            reject_rules: vec![rule::reject_rule()],
            filter_hooks: vec![rule::filter_output_hook()],
            ..installed.clone()
        };
        let annotated = annotate(&with_filter);
        let summary: Vec<(&str, &str, Option<&str>, Option<&str>)> = annotated
            .iter()
            .map(|a| {
                (
                    a.table,
                    a.chain.as_str(),
                    a.service.as_deref(),
                    a.instance.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("nat", "OUTPUT", None, None),
                ("nat", "FLUX-SERVICES", Some("web"), None),
                ("nat", "FLUX-SERVICES", None, None),
                ("nat", "FLUX-FORWARD", Some("bulk"), None),
                ("nat", "FLUX-FWD-C612000B-80", Some("bulk"), Some("b1")),
                ("filter", "OUTPUT", None, None),
                ("filter", "FLUX-REJECT", None, None),
            ]
        );
    }
}
