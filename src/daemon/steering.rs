//! Choosing how VIP connections reach the proxy (`--steering`): the BPF `sk_lookup` path when
//! it loads and attaches here, else the nat REDIRECT, with one log line saying which and why.

use std::sync::Arc;

use netfilter::CommandRunner;

use super::config::{Config, SteeringMode};

/// The steering fluxd runs with.
pub struct Choice {
    /// The loaded program (attached, inert until the controller's first apply); None in nat
    /// mode.
    pub bpf: Option<Arc<steering::Steering>>,
    /// Why nat is used although bpf was possible in principle (`auto` fell back), for the log,
    /// `fluxd debug` and `/v1/host`.
    pub fallback: Option<String>,
}

/// Loads the BPF steering unless `--steering nat`; with `auto`, a failure (an old kernel, no
/// CAP_BPF, no bpf file system for the pins) means nat, with `bpf` it stops fluxd.
pub async fn choose(config: &Config) -> anyhow::Result<Choice> {
    if !config.dataplane || config.steering == SteeringMode::Nat {
        return Ok(Choice {
            bpf: None,
            fallback: None,
        });
    }
    let dir = config.bpf_dir.clone();
    let loaded =
        tokio::task::spawn_blocking(move || steering::Steering::load(&dir, CommandRunner::new()))
            .await?;
    match loaded {
        Ok(s) => {
            tracing::info!(
                pins = %s.pin_dir().display(),
                "steering: bpf (sk_lookup program attached; VIPs routed locally, no NAT)"
            );
            Ok(Choice {
                bpf: Some(Arc::new(s)),
                fallback: None,
            })
        }
        Err(e) if config.steering == SteeringMode::Auto => {
            let why = format!("bpf steering unavailable: {e}");
            tracing::warn!(reason = %why, "steering: nat (iptables REDIRECT)");
            Ok(Choice {
                bpf: None,
                fallback: Some(why),
            })
        }
        Err(e) => anyhow::bail!("steering: bpf: {e}"),
    }
}
