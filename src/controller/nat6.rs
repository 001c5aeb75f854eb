//! IPv6 VIPs reach the proxy through `ip6tables` nat rules (see `netfilter::v6`) on the nat
//! path, and on the bpf path when fluxd has no IPv6 listener for the program to hand them to
//! (then the proxy falls back on the original destination for a connection whose local
//! address is no service, which is how a redirected IPv6 connection arrives). A host whose
//! catalog has no IPv6 VIP runs no `ip6tables` command at all (beyond one read at start), so
//! IPv4-only hosts behave as before.

use std::net::SocketAddr;
use std::sync::Arc;

use super::guard::Verdict;
use super::Controller;
use crate::catalog::State;

/// The IPv6 nat rules for `state`: every IPv6 VIP the guard allows. A service with no
/// instance is redirected too (its connections are reset by the proxy): IPv6 has no refusal
/// set.
pub(super) fn desired6(
    state: &State,
    verdict: &Verdict,
    proxy_port: u16,
    bridge_interfaces: &[String],
) -> netfilter::Desired6 {
    let redirects = state
        .services
        .values()
        .filter(|s| verdict.allows(&s.name))
        .filter_map(|s| match s.address {
            Some(SocketAddr::V6(vip)) => Some(netfilter::Redirect6 {
                service: s.name.clone(),
                vip,
            }),
            _ => None,
        })
        .collect();
    netfilter::Desired6 {
        redirects,
        proxy_port,
        bridge_interfaces: bridge_interfaces.to_vec(),
    }
}

/// No IPv6 nat rule: the bpf steering takes the IPv6 VIPs (a fluxd of an earlier version may
/// have left rules for them, which go).
pub(super) fn desired6_none(proxy_port: u16) -> netfilter::Desired6 {
    netfilter::Desired6 {
        redirects: Vec::new(),
        proxy_port,
        bridge_interfaces: Vec::new(),
    }
}

impl Controller {
    /// Installs `wanted` unless it is what was applied last.
    pub(super) async fn sync6(&mut self, wanted: netfilter::Desired6) {
        let ruleset = netfilter::render6(&wanted);
        if self.applied6.as_deref() == Some(&ruleset) {
            return;
        }
        let status = self.status.clone();
        let ruleset = Arc::new(ruleset);
        let apply = ruleset.clone();
        let result = tokio::task::spawn_blocking(move || match &status.rules {
            Some(rules) => rules.netfilter.apply6(&apply),
            None => Ok(()),
        })
        .await;
        match result {
            Ok(Ok(())) => {
                tracing::debug!(vips = ruleset.chain.len(), "IPv6 rules applied");
                self.applied6 = Some(ruleset);
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "applying IPv6 rules failed; retrying at the next drift check");
                self.applied6 = None;
            }
            Err(e) => tracing::error!(error = %e, "IPv6 rules task failed"),
        }
    }

    /// Whether the kernel's IPv6 rules differ from those applied last (then forgotten, so the
    /// next sync applies them again). Nothing is read while no IPv6 VIP was ever applied.
    pub(super) async fn drifted6(&mut self) -> bool {
        let Some(applied) = self.applied6.clone() else {
            return false;
        };
        if applied.is_empty() {
            return false;
        }
        let status = self.status.clone();
        let drifted = tokio::task::spawn_blocking(move || {
            let rules = status.rules.as_ref()?;
            match rules.reader.drift6(&applied) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read installed IPv6 rules");
                    None
                }
            }
        })
        .await
        .ok()
        .flatten();
        if drifted == Some(true) {
            tracing::warn!("installed IPv6 rules differ from the desired ones; repairing");
            self.applied6 = None;
            return true;
        }
        false
    }

    /// The IPv6 rules last applied, for `fluxd debug`.
    pub fn applied6(&self) -> Option<Arc<netfilter::Ruleset6>> {
        self.applied6.clone()
    }
}
