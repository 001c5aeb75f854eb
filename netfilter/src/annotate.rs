//! Installed rules labelled for people, for `fluxd debug`.

use crate::installed::Installed;
use crate::rule;
use crate::SERVICE_COMMENT_PREFIX;

/// One installed rule and the service it serves, so an operator reading the kernel's rules can
/// tell which service (if any) each one belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotatedRule {
    /// The chain the rule is in.
    pub chain: String,
    /// The rule as `iptables-save` prints it.
    pub rule: String,
    /// The service named by the rule's `flux:` comment; `None` for hooks and for rules flux did
    /// not write, which is itself worth showing.
    pub service: Option<String>,
}

/// Labels every installed flux rule: the hooks first (where traffic enters), then the services
/// chain in kernel order, then anything in the canary chain.
pub fn annotate(installed: &Installed) -> Vec<AnnotatedRule> {
    installed
        .hooks
        .iter()
        .chain(&installed.service_rules)
        .chain(&installed.canary_rules)
        .map(|line| AnnotatedRule {
            chain: rule::split_append(line)
                .map(|(chain, _)| chain.to_string())
                .unwrap_or_default(),
            rule: line.clone(),
            service: rule::comment(line)
                .and_then(|c| c.strip_prefix(SERVICE_COMMENT_PREFIX).map(str::to_string)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        let annotated = annotate(&installed);
        let summary: Vec<(&str, Option<&str>)> = annotated
            .iter()
            .map(|a| (a.chain.as_str(), a.service.as_deref()))
            .collect();
        assert_eq!(
            summary,
            [
                ("OUTPUT", None),
                ("FLUX-SERVICES", Some("web")),
                ("FLUX-SERVICES", None),
            ]
        );
    }
}
