//! IPv6 VIPs on the nat path: `ip6tables`' nat table gets flux's services chain
//! ([`SERVICES_CHAIN`], the same name in the IPv6 table) with one `REDIRECT` rule per IPv6
//! VIP, hooked from `OUTPUT` and from `PREROUTING` per bridge like the IPv4 chain.
//!
//! Kept apart from the IPv4 rules on purpose: an IPv4-only host (no IPv6 VIP in the catalog)
//! never runs `ip6tables` at all, so its rules and its behaviour are exactly as before. The
//! IPv6 side is small: no ipset (one rule per VIP; IPv6 VIPs are expected to be few), no VIP
//! ranges and no refusal of empty services (the proxy accepts and resets those connections),
//! no kernel forwarding (refused for IPv6 VIPs by the model).
//!
//! Applied whole, in one `ip6tables-restore --noflush` transaction that rewrites the chain and
//! replaces flux's hooks; read back with `ip6tables-save -t nat` for the drift check.

use std::net::SocketAddrV6;

use crate::netfilter::Netfilter;
use crate::rule::{output_hook, prerouting_hook, split_append};
use crate::Error;
use crate::{HOOK_COMMENT, SERVICES_CHAIN, SERVICE_COMMENT_PREFIX};

/// One IPv6 service address whose connections the proxy must receive.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Redirect6 {
    /// Written into the rule's comment, for operators and `fluxd debug`.
    pub service: String,
    pub vip: SocketAddrV6,
}

/// The complete IPv6 nat state flux wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired6 {
    /// Every IPv6 VIP to capture; order does not matter.
    pub redirects: Vec<Redirect6>,
    /// The port of the proxy's IPv6 listener (the same as the IPv4 one).
    pub proxy_port: u16,
    /// Interfaces whose incoming traffic is redirected, as for IPv4.
    pub bridge_interfaces: Vec<String>,
}

/// The rendered IPv6 rules, in `ip6tables-save`'s own spelling so they compare with what the
/// kernel reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset6 {
    /// The rules of the services chain, sorted by VIP.
    pub chain: Vec<String>,
    /// The hook rules into the chain (`OUTPUT`, then `PREROUTING` per bridge).
    pub hooks: Vec<String>,
}

impl Ruleset6 {
    /// No IPv6 VIP: nothing should be installed at all.
    pub fn is_empty(&self) -> bool {
        self.chain.is_empty()
    }
}

/// Renders `desired`; pure.
pub fn render6(desired: &Desired6) -> Ruleset6 {
    let mut redirects = desired.redirects.clone();
    redirects.sort_by(|a, b| (a.vip.ip(), a.vip.port()).cmp(&(b.vip.ip(), b.vip.port())));
    redirects.dedup_by(|a, b| a.vip == b.vip);
    if redirects.is_empty() {
        return Ruleset6::default();
    }
    let chain = redirects
        .iter()
        .map(|r| redirect_rule(r, desired.proxy_port))
        .collect();
    let hooks = std::iter::once(output_hook())
        .chain(desired.bridge_interfaces.iter().map(|i| prerouting_hook(i)))
        .collect();
    Ruleset6 { chain, hooks }
}

fn redirect_rule(r: &Redirect6, proxy_port: u16) -> String {
    format!(
        "-A {SERVICES_CHAIN} -d {}/128 -p tcp -m tcp --dport {} -m comment --comment \"{SERVICE_COMMENT_PREFIX}{}\" -j REDIRECT --to-ports {proxy_port}",
        r.vip.ip(),
        r.vip.port(),
        r.service
    )
}

/// What `ip6tables-save -t nat` shows of flux.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed6 {
    /// Whether the services chain exists.
    pub chain_exists: bool,
    /// Its rules, sorted.
    pub chain: Vec<String>,
    /// flux's hook rules in `OUTPUT` and `PREROUTING`, in table order.
    pub hooks: Vec<String>,
}

impl Installed6 {
    pub fn parse(save: &str) -> Installed6 {
        let mut installed = Installed6::default();
        let prefix = format!("-A {SERVICES_CHAIN} ");
        for line in save.lines() {
            if line.starts_with(&format!(":{SERVICES_CHAIN} ")) {
                installed.chain_exists = true;
            } else if line.starts_with(&prefix) {
                installed.chain.push(line.to_string());
            } else if (line.starts_with("-A OUTPUT ") || line.starts_with("-A PREROUTING "))
                && line.contains(&format!("--comment \"{HOOK_COMMENT}\""))
                && line.ends_with(&format!(" -j {SERVICES_CHAIN}"))
            {
                installed.hooks.push(line.to_string());
            }
        }
        installed.chain.sort();
        installed
    }

    /// Whether the kernel holds exactly `ruleset` (for an empty one: nothing of flux).
    pub fn matches(&self, ruleset: &Ruleset6) -> bool {
        if ruleset.is_empty() {
            return !self.chain_exists && self.hooks.is_empty();
        }
        let mut want = ruleset.chain.clone();
        want.sort();
        self.chain_exists && self.chain == want && self.hooks == ruleset.hooks
    }
}

/// The restore input that makes the kernel hold `ruleset`, given what it holds now.
fn plan(installed: &Installed6, ruleset: &Ruleset6) -> Option<String> {
    let mut input = String::from("*nat\n");
    if ruleset.is_empty() {
        if !installed.chain_exists && installed.hooks.is_empty() {
            return None;
        }
        delete_hooks(&mut input, &installed.hooks);
        if installed.chain_exists {
            input.push_str(&format!("-F {SERVICES_CHAIN}\n-X {SERVICES_CHAIN}\n"));
        }
    } else {
        // Declaring the chain under --noflush empties it (or creates it): the rules below
        // are then its whole content.
        input.push_str(&format!(":{SERVICES_CHAIN} - [0:0]\n"));
        delete_hooks(&mut input, &installed.hooks);
        for line in ruleset.chain.iter().chain(&ruleset.hooks) {
            input.push_str(line);
            input.push('\n');
        }
    }
    input.push_str("COMMIT\n");
    Some(input)
}

fn delete_hooks(input: &mut String, hooks: &[String]) {
    for hook in hooks {
        if let Some((chain, spec)) = split_append(hook) {
            input.push_str(&format!("-D {chain} {spec}\n"));
        }
    }
}

impl Netfilter {
    /// Reads flux's IPv6 nat rules; `None` when `ip6tables-save` cannot be run (no IPv6
    /// tools, or no IPv6 in the kernel), which holds no flux rule either.
    pub fn installed6(&self) -> Result<Option<Installed6>, Error> {
        match self.runner.run("ip6tables-save", &["-t", "nat"], None) {
            Ok(save) => Ok(Some(Installed6::parse(&save))),
            Err(Error::Spawn { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes the kernel hold `ruleset`, from a fresh read; an empty one removes flux's IPv6
    /// rules, and costs one read (none at all when the tools are missing).
    pub fn apply6(&self, ruleset: &Ruleset6) -> Result<(), Error> {
        let installed = match self.installed6()? {
            Some(i) => i,
            None if ruleset.is_empty() => return Ok(()),
            None => Installed6::default(),
        };
        if let Some(input) = plan(&installed, ruleset) {
            let args = ["-w", "5", "--noflush"];
            self.runner.run("ip6tables-restore", &args, Some(&input))?;
        }
        Ok(())
    }

    /// Whether the kernel's IPv6 rules differ from `ruleset`.
    pub fn drift6(&self, ruleset: &Ruleset6) -> Result<bool, Error> {
        Ok(match self.installed6()? {
            Some(installed) => !installed.matches(ruleset),
            None => !ruleset.is_empty(),
        })
    }

    /// Removes flux's IPv6 rules, if any; idempotent.
    pub fn remove6(&self) -> Result<(), Error> {
        self.apply6(&Ruleset6::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> Desired6 {
        Desired6 {
            redirects: vec![
                Redirect6 {
                    service: "b".into(),
                    vip: "[fd00::2]:443".parse().unwrap(),
                },
                Redirect6 {
                    service: "a".into(),
                    vip: "[fd00::1]:80".parse().unwrap(),
                },
            ],
            proxy_port: 7100,
            bridge_interfaces: vec!["docker0".into()],
        }
    }

    #[test]
    fn renders_one_redirect_per_vip_and_the_hooks() {
        let r = render6(&desired());
        assert_eq!(
            r.chain,
            vec![
                "-A FLUX-SERVICES -d fd00::1/128 -p tcp -m tcp --dport 80 -m comment --comment \"flux:a\" -j REDIRECT --to-ports 7100",
                "-A FLUX-SERVICES -d fd00::2/128 -p tcp -m tcp --dport 443 -m comment --comment \"flux:b\" -j REDIRECT --to-ports 7100",
            ]
        );
        assert_eq!(r.hooks.len(), 2);
        assert!(render6(&Desired6::default()).is_empty());
    }

    #[test]
    fn plan_replaces_hooks_and_removes_all_when_empty() {
        let r = render6(&desired());
        let installed = Installed6::parse(&format!(
            "*nat\n:OUTPUT ACCEPT [0:0]\n:{SERVICES_CHAIN} - [0:0]\n{}\n{}\nCOMMIT\n",
            r.hooks[0], r.chain[1]
        ));
        assert!(installed.chain_exists);
        assert!(!installed.matches(&r));
        let input = plan(&installed, &r).unwrap();
        assert!(input.contains("-D OUTPUT -m comment --comment \"flux hook\" -j FLUX-SERVICES\n"));
        assert_eq!(input.matches("-A FLUX-SERVICES").count(), 2);
        let gone = plan(&installed, &Ruleset6::default()).unwrap();
        assert!(gone.ends_with("-F FLUX-SERVICES\n-X FLUX-SERVICES\nCOMMIT\n"));
        assert_eq!(plan(&Installed6::default(), &Ruleset6::default()), None);
    }
}
