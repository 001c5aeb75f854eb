//! What the kernel holds, read back from `iptables-save -t nat`, `iptables-save -t filter`,
//! `ipset save flux-vips` and `ipset save flux-empty`.

use std::collections::BTreeMap;

use crate::rule;
use crate::{
    CANARY_CHAIN, EMPTY_SET, FORWARD_CHAIN, FORWARD_CHAIN_PREFIX, REJECT_CHAIN, SERVICES_CHAIN,
    VIP_SET,
};

/// flux's part of the nat and filter tables as the kernel reports it, in `iptables-save` text,
/// and flux's sets in `ipset save` text. Everything else in the tables is ignored: flux neither
/// reports nor compares other people's rules or sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// Whether the services chain exists; without it the hooks cannot exist either.
    pub services_chain: bool,
    /// Whether the canary chain exists; its absence means the table was wiped.
    pub canary_chain: bool,
    /// The services chain's rules in kernel order, foreign ones included, since anything in
    /// flux's chain changes where VIP traffic goes.
    pub service_rules: Vec<String>,
    /// Rules someone put in the canary chain. Harmless (nothing jumps there) and so not drift,
    /// but listed so an operator can see them.
    pub canary_rules: Vec<String>,
    /// flux's hook rules in nat's `PREROUTING` and `OUTPUT`, duplicates included, in kernel
    /// order.
    pub hooks: Vec<String>,
    /// The `create flux-vips ...` line of [`VIP_SET`], `None` when the set does not exist (or
    /// ipset is not installed).
    pub set: Option<String>,
    /// The set's members (`add flux-vips ELEMENT ...` lines), foreign ones included, in the
    /// order `ipset save` prints them (hash order, which means nothing).
    pub set_members: Vec<String>,
    /// Whether the filter table's reject chain ([`REJECT_CHAIN`]) exists.
    pub reject_chain: bool,
    /// The reject chain's rules in kernel order, foreign ones included.
    pub reject_rules: Vec<String>,
    /// flux's hook rules in filter's `INPUT`, `FORWARD` and `OUTPUT`, duplicates included, in
    /// kernel order.
    pub filter_hooks: Vec<String>,
    /// The `create flux-empty ...` line of [`EMPTY_SET`], `None` when the set does not exist.
    pub empty_set: Option<String>,
    /// That set's members (`add flux-empty ELEMENT ...` lines), foreign ones included, in hash
    /// order.
    pub empty_members: Vec<String>,
    /// Whether the nat chain of kernel-forwarded services ([`FORWARD_CHAIN`]) exists.
    pub forward_chain: bool,
    /// Its rules in kernel order, foreign ones included.
    pub forward_rules: Vec<String>,
    /// Every nat chain named like a kernel-forwarded service's own chain
    /// ([`FORWARD_CHAIN_PREFIX`]), with its rules in kernel order: the ones flux wants and any
    /// left from services that are gone.
    pub forward_chains: BTreeMap<String, Vec<String>>,
}

impl Installed {
    /// Reads `iptables-save` output. Only the `nat` and `filter` tables are looked at; lines
    /// flux does not own are skipped, so unknown syntax in other people's rules cannot make
    /// this fail.
    pub fn parse(save: &str) -> Self {
        let mut installed = Installed::default();
        installed.parse_tables(save);
        installed
    }

    /// [`Installed::parse`] into an existing value, so the nat and filter tables can be read
    /// by two `iptables-save -t` calls.
    pub fn parse_tables(&mut self, save: &str) {
        let mut table = None;
        for line in save.lines() {
            if let Some(name) = line.strip_prefix('*') {
                table = match name {
                    "nat" => Some(Table::Nat),
                    "filter" => Some(Table::Filter),
                    _ => None,
                };
                continue;
            }
            let Some(in_table) = table else {
                continue;
            };
            if line == "COMMIT" {
                table = None;
            } else if let Some(declaration) = line.strip_prefix(':') {
                match (in_table, declaration.split(' ').next()) {
                    (Table::Nat, Some(SERVICES_CHAIN)) => self.services_chain = true,
                    (Table::Nat, Some(CANARY_CHAIN)) => self.canary_chain = true,
                    (Table::Nat, Some(FORWARD_CHAIN)) => self.forward_chain = true,
                    (Table::Nat, Some(name)) if name.starts_with(FORWARD_CHAIN_PREFIX) => {
                        self.forward_chains.entry(name.to_string()).or_default();
                    }
                    (Table::Filter, Some(REJECT_CHAIN)) => self.reject_chain = true,
                    _ => {}
                }
            } else if let Some((chain, _)) = rule::split_append(line) {
                match in_table {
                    Table::Nat if chain == SERVICES_CHAIN => {
                        self.service_rules.push(line.to_string())
                    }
                    Table::Nat if chain == CANARY_CHAIN => self.canary_rules.push(line.to_string()),
                    Table::Nat if chain == FORWARD_CHAIN => {
                        self.forward_rules.push(line.to_string())
                    }
                    Table::Nat if chain.starts_with(FORWARD_CHAIN_PREFIX) => self
                        .forward_chains
                        .entry(chain.to_string())
                        .or_default()
                        .push(line.to_string()),
                    Table::Nat if rule::is_hook(chain, line) => self.hooks.push(line.to_string()),
                    Table::Filter if chain == REJECT_CHAIN => {
                        self.reject_rules.push(line.to_string())
                    }
                    Table::Filter if rule::is_filter_hook(chain, line) => {
                        self.filter_hooks.push(line.to_string())
                    }
                    _ => {}
                }
            }
        }
    }

    /// Reads `ipset save` output of flux's sets into [`Installed::set`],
    /// [`Installed::set_members`], [`Installed::empty_set`] and [`Installed::empty_members`];
    /// lines about other sets are skipped.
    pub fn parse_set(&mut self, save: &str) {
        for line in save.lines() {
            let mut words = line.splitn(3, ' ');
            match (words.next(), words.next()) {
                (Some("create"), Some(VIP_SET)) => self.set = Some(line.to_string()),
                (Some("add"), Some(VIP_SET)) => self.set_members.push(line.to_string()),
                (Some("create"), Some(EMPTY_SET)) => self.empty_set = Some(line.to_string()),
                (Some("add"), Some(EMPTY_SET)) => self.empty_members.push(line.to_string()),
                _ => {}
            }
        }
    }
}

/// The tables flux has chains in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Nat,
    Filter,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Wed Nov 25 16:49:34 2026
*filter
:INPUT ACCEPT [0:0]
:FLUX-SERVICES - [0:0]
-A INPUT -m comment --comment "flux hook" -j FLUX-SERVICES
COMMIT
*mangle
:FLUX-REJECT - [0:0]
-A OUTPUT -m comment --comment "flux hook" -j FLUX-REJECT
-A FLUX-REJECT -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:FLUX-CANARY - [0:0]
:FLUX-SERVICES - [0:0]
-A PREROUTING -i br-+ -m comment --comment "flux hook" -j FLUX-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES
-A OUTPUT -j FLUX-SERVICES
-A DOCKER -i docker0 -j RETURN
-A FLUX-SERVICES -d 198.18.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "flux:web" -j REDIRECT --to-ports 7100
-A FLUX-SERVICES -j ACCEPT
COMMIT
# Completed on Wed Nov 25 16:49:34 2026
"#;

    #[test]
    fn picks_out_flux_chains_and_hooks_only() {
        let installed = Installed::parse(SAVE);
        assert!(installed.services_chain);
        assert!(installed.canary_chain);
        assert_eq!(
            installed.service_rules,
            [
                r#"-A FLUX-SERVICES -d 198.18.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "flux:web" -j REDIRECT --to-ports 7100"#,
                "-A FLUX-SERVICES -j ACCEPT",
            ]
        );
        assert_eq!(
            installed.hooks,
            [
                r#"-A PREROUTING -i br-+ -m comment --comment "flux hook" -j FLUX-SERVICES"#,
                r#"-A OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES"#,
            ]
        );
        assert!(installed.canary_rules.is_empty());
        // Nothing of the filter or mangle tables is flux's in this save.
        assert!(!installed.reject_chain);
        assert!(installed.reject_rules.is_empty() && installed.filter_hooks.is_empty());
    }

    const FILTER_SAVE: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Sun Dec  6 20:32:31 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:FLUX-REJECT - [0:0]
-A INPUT -i docker0 -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FORWARD -i br-+ -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -j FLUX-REJECT
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT
-A FLUX-REJECT -p tcp -m set --match-set flux-empty dst,dst -m comment --comment "flux no instance" -j REJECT --reject-with tcp-reset
-A FLUX-REJECT -j ACCEPT
COMMIT
# Completed on Sun Dec  6 20:32:31 2026
"#;

    #[test]
    fn picks_out_the_reject_chain_and_filter_hooks_only() {
        let mut installed = Installed::parse(SAVE);
        installed.parse_tables(FILTER_SAVE);
        assert!(installed.services_chain && installed.reject_chain);
        assert_eq!(installed.service_rules.len(), 2, "nat part kept");
        assert_eq!(
            installed.reject_rules,
            [
                r#"-A FLUX-REJECT -p tcp -m set --match-set flux-empty dst,dst -m comment --comment "flux no instance" -j REJECT --reject-with tcp-reset"#,
                "-A FLUX-REJECT -j ACCEPT",
            ]
        );
        // Someone else's jump (no flux comment) is not a hook.
        assert_eq!(
            installed.filter_hooks,
            [
                r#"-A INPUT -i docker0 -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT"#,
                r#"-A FORWARD -i br-+ -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT"#,
                r#"-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT"#,
            ]
        );
        assert_eq!(installed.hooks.len(), 2, "filter hooks are not nat hooks");
    }

    #[test]
    fn reads_the_vip_set() {
        let mut installed = Installed::default();
        installed.parse_set(concat!(
            "create flux-vips hash:ip,port family inet hashsize 1024 maxelem 1048576 comment bucketsize 12 initval 0xccd6335b\n",
            "add flux-vips 198.18.0.11,tcp:443 comment \"flux:api\"\n",
            "add other 198.18.0.12,tcp:443\n",
            "add flux-vips 198.18.0.10,tcp:80\n",
        ));
        assert!(installed
            .set
            .as_deref()
            .is_some_and(|c| c.starts_with("create flux-vips hash:ip,port")));
        assert_eq!(
            installed.set_members,
            [
                r#"add flux-vips 198.18.0.11,tcp:443 comment "flux:api""#,
                "add flux-vips 198.18.0.10,tcp:80",
            ]
        );
    }

    #[test]
    fn reads_the_empty_set_apart_from_the_vip_set() {
        let mut installed = Installed::default();
        installed.parse_set(concat!(
            "create flux-vips hash:ip,port family inet hashsize 1024 maxelem 1048576 comment\n",
            "add flux-vips 198.18.0.10,tcp:80 comment \"flux:web\"\n",
        ));
        installed.parse_set(concat!(
            "create flux-empty hash:ip,port family inet hashsize 1024 maxelem 1048576 comment bucketsize 12 initval 0x52fed01c\n",
            "add flux-empty 198.18.0.11,tcp:80 comment \"flux:idle\"\n",
            "add flux-empty-not 198.18.0.12,tcp:80\n",
        ));
        assert_eq!(
            installed.set_members,
            [r#"add flux-vips 198.18.0.10,tcp:80 comment "flux:web""#]
        );
        assert!(installed
            .empty_set
            .as_deref()
            .is_some_and(|c| c.starts_with("create flux-empty hash:ip,port")));
        assert_eq!(
            installed.empty_members,
            [r#"add flux-empty 198.18.0.11,tcp:80 comment "flux:idle""#]
        );
    }

    #[test]
    fn picks_out_the_forward_chain_and_every_service_chain() {
        let save = r#"*nat
:OUTPUT ACCEPT [0:0]
:FLUX-FORWARD - [0:0]
:FLUX-FWD-C612000A-80 - [0:0]
:FLUX-FWD-C612000B-80 - [0:0]
:FLUX-FWDX - [0:0]
-A FLUX-FORWARD -d 198.18.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment "flux:web" -j FLUX-FWD-C612000A-80
-A FLUX-FWD-C612000A-80 -p tcp -m comment --comment "flux:web/b1" -j DNAT --to-destination 127.0.0.1:9001
-A FLUX-FWDX -j ACCEPT
COMMIT
"#;
        let installed = Installed::parse(save);
        assert!(installed.forward_chain);
        assert_eq!(installed.forward_rules.len(), 1);
        assert_eq!(
            installed.forward_chains.keys().collect::<Vec<_>>(),
            ["FLUX-FWD-C612000A-80", "FLUX-FWD-C612000B-80"],
            "a declared chain with no rule is listed too; FLUX-FWDX is not flux's"
        );
        assert_eq!(installed.forward_chains["FLUX-FWD-C612000A-80"].len(), 1);
        assert!(installed.forward_chains["FLUX-FWD-C612000B-80"].is_empty());
    }

    #[test]
    fn empty_or_missing_table_means_nothing_installed() {
        assert_eq!(Installed::parse(""), Installed::default());
        let bare = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
        assert_eq!(Installed::parse(bare), Installed::default());
    }
}
