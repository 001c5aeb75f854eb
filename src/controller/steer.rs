//! The controller's bpf path: the same desired state as the nat rules (VIPs to proxy, VIPs to
//! refuse, VIP ranges), applied as the steering program's maps and local routes instead.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Status;

/// The steering for `rules` (as [`super::routing::desired_rules`] computed them, after the VIP
/// guard), steering connections from `ifaces`.
pub(super) fn desired(
    rules: &netfilter::Desired,
    ifaces: &BTreeMap<u32, String>,
) -> steering::Desired {
    let entries = |list: &[netfilter::Redirect], action| {
        list.iter()
            .map(move |r| (r.vip, (r.service.clone(), action)))
            .collect::<Vec<_>>()
    };
    let mut services: BTreeMap<_, _> = entries(&rules.redirects, steering::Action::Proxy)
        .into_iter()
        .collect();
    // Refused VIPs come last: a VIP never sits in both lists, but if it did, refusing is safe.
    services.extend(entries(&rules.rejects, steering::Action::Refuse));
    steering::Desired {
        services,
        ranges: rules
            .vip_ranges
            .iter()
            .map(|r| (r.addr, r.prefix_len))
            .collect(),
        ifaces: ifaces.clone(),
    }
}

/// Applies `desired` unless it is what was applied last: only the difference after a success
/// (one map update for one service), everything from a fresh read otherwise.
pub(super) async fn sync(status: &Arc<Status>, desired: steering::Desired) {
    let previous = status.steered.lock().ok().and_then(|a| a.clone());
    if previous.as_deref() == Some(&desired) {
        return;
    }
    let status = status.clone();
    let result = tokio::task::spawn_blocking(move || {
        let Some(s) = status.rules.as_ref().and_then(|r| r.steering.as_ref()) else {
            return Ok(());
        };
        match &previous {
            Some(previous) => s.apply_change(previous, &desired)?,
            None => s.apply(&desired)?,
        }
        if let Ok(mut a) = status.steered.lock() {
            *a = Some(Arc::new(desired));
        }
        Ok::<_, steering::Error>(())
    })
    .await;
    match result {
        Ok(Ok(())) => tracing::debug!("steering applied"),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "applying the steering failed; retrying at the next drift check")
        }
        Err(e) => tracing::error!(error = %e, "steering task failed"),
    }
}

/// Compares the kernel with the steering last applied; true (and the record of it cleared, so
/// that the next sync applies everything) when they differ or nothing was applied yet.
pub(super) async fn drifted(status: &Arc<Status>) -> bool {
    let s = status.clone();
    let drifted = tokio::task::spawn_blocking(move || {
        let steering = s.rules.as_ref()?.steering.as_ref()?;
        let Some(applied) = s.steered.lock().ok()?.clone() else {
            return Some(true);
        };
        match steering.drift(&applied) {
            Ok(d) if d.is_clean() => Some(false),
            Ok(d) => {
                tracing::warn!(drift = %d, "installed steering differs from the desired one; repairing");
                Some(true)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the installed steering");
                None
            }
        }
    })
    .await
    .ok()
    .flatten();
    if drifted == Some(true) {
        if let Ok(mut a) = status.steered.lock() {
            *a = None;
        }
    }
    drifted == Some(true)
}
