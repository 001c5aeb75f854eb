//! The host session: the lease every bound record hangs on, renewed in the background, granted
//! again (with every bound record written again) when etcd let it expire.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{PutOptions, TxnOp};
use tokio::sync::{Mutex, Notify};

use crate::store::{Result, StoreError};

use super::client::{timed, timeout_error, Core};
use super::error::is_lease_gone;
use super::retry::{Backoff, Outage, BACKOFF_MAX};
use super::REQUEST_TIMEOUT;

/// Re-put batches stay well inside etcd's operation and 1.5 MiB request limits.
const REPUT_BATCH_OPS: usize = 100;
const REPUT_BATCH_BYTES: usize = 1 << 20;

/// The host session. One lock covers the lease and the bound-record map, and every writing
/// transaction holds it across its request: otherwise a re-put after a lost lease could race a
/// concurrent delete and bring a record back, or write an older value over a newer one.
#[derive(Default)]
pub(super) struct Session {
    pub(super) started: bool,
    /// The TTL asked for, in seconds; a re-grant asks for the same.
    pub(super) ttl: i64,
    /// The TTL etcd granted (it raises very short ones to its minimum); renewals are paced by it.
    pub(super) granted_ttl: i64,
    /// `None` while the lease is known to be gone and a new one is not yet granted.
    pub(super) lease: Option<i64>,
    /// Every record this host wrote bound and has not deleted or overwritten unbound since:
    /// what has to be written again under a new lease.
    pub(super) bound: BTreeMap<String, Vec<u8>>,
    /// A new lease was granted but not every bound record is written under it yet.
    pub(super) reput_pending: bool,
}

enum KeepEnd {
    LeaseGone(i64),
    Broken(String),
}

/// Keeps the session lease alive until aborted by `close`/drop; re-grants it and re-puts the
/// bound records if etcd let it expire.
pub(super) async fn keep_session(
    core: Core,
    session: Arc<Mutex<Session>>,
    lease_lost: Arc<Notify>,
) {
    let mut backoff = Backoff::new();
    let mut outage = Outage::new(format!("session lease {}", core.prefix));
    loop {
        let (lease, granted_ttl) = {
            let s = session.lock().await;
            (s.lease, s.granted_ttl)
        };
        // etcd 3.4 gives every lease a full TTL when it comes back from an outage; retrying
        // slower than the normal renewal pace could miss that window and lose the lease anyway.
        backoff.max = renew_period(granted_ttl).min(BACKOFF_MAX);
        let end = match lease {
            None => match regrant(&core, &session).await {
                Ok(()) => continue,
                Err(e) => KeepEnd::Broken(e.to_string()),
            },
            Some(id) => {
                renew(
                    &core,
                    &session,
                    &lease_lost,
                    id,
                    granted_ttl,
                    &mut backoff,
                    &mut outage,
                )
                .await
            }
        };
        match end {
            KeepEnd::LeaseGone(id) => {
                {
                    let mut s = session.lock().await;
                    if s.lease == Some(id) {
                        s.lease = None;
                    }
                }
                // Normally 100 ms: the next round grants a new lease. The backoff only matters
                // if etcd kept dropping fresh leases.
                tokio::time::sleep(backoff.next_delay()).await;
            }
            KeepEnd::Broken(error) => {
                outage.failed(&error);
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// One keep-alive stream for lease `id`, renewing at `renew_period`.
async fn renew(
    core: &Core,
    session: &Mutex<Session>,
    lease_lost: &Notify,
    id: i64,
    granted_ttl: i64,
    backoff: &mut Backoff,
    outage: &mut Outage,
) -> KeepEnd {
    let mut leases = core.client.lease_client();
    let sent = core.login_generation();
    let (mut keeper, mut stream) = match timed(leases.keep_alive(id)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) if is_lease_gone(&e) => return KeepEnd::LeaseGone(id),
        Ok(Err(e)) => return KeepEnd::Broken(core.fail(e, sent).await.to_string()),
        Err(e) => return KeepEnd::Broken(e.to_string()),
    };
    // A re-put cut short by an outage is finished as soon as etcd answers again.
    {
        let mut s = session.lock().await;
        if s.reput_pending && s.lease == Some(id) {
            if let Err(e) = reput(core, &mut s, id).await {
                return KeepEnd::Broken(e.to_string());
            }
        }
    }
    outage.recovered();
    let period = renew_period(granted_ttl);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = lease_lost.notified() => {}
        }
        if keeper.keep_alive().await.is_err() {
            return KeepEnd::Broken("keep-alive request stream closed".into());
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await {
            // Only a renewal that worked proves the stream healthy; a stream etcd breaks right
            // after opening must not be reopened at full speed.
            Ok(Ok(Some(answer))) if answer.ttl() > 0 => backoff.reset(),
            Ok(Ok(Some(_))) => return KeepEnd::LeaseGone(id),
            Ok(Ok(None)) => return KeepEnd::Broken("keep-alive stream ended".into()),
            Ok(Err(e)) if is_lease_gone(&e) => return KeepEnd::LeaseGone(id),
            Ok(Err(e)) => return KeepEnd::Broken(core.fail(e, sent).await.to_string()),
            Err(_) => return KeepEnd::Broken(timeout_error().to_string()),
        }
    }
}

/// A third of the TTL, so two lost renewals in a row still leave the lease alive.
fn renew_period(granted_ttl: i64) -> Duration {
    Duration::from_millis((granted_ttl.max(1) as u64 * 1000 / 3).max(100))
}

/// Replaces a lease etcd let expire (an outage longer than the TTL, or a revoke by someone
/// else). Other hosts saw this host's records disappear; writing them again is what brings the
/// host back.
async fn regrant(core: &Core, session: &Mutex<Session>) -> Result<()> {
    let mut s = session.lock().await;
    if let Some(id) = s.lease {
        // Someone else granted one meanwhile; just make sure its re-put is complete.
        return if s.reput_pending {
            reput(core, &mut s, id).await
        } else {
            Ok(())
        };
    }
    let mut leases = core.client.lease_client();
    let granted = core.call(leases.grant(s.ttl, None)).await?;
    if !granted.error().is_empty() {
        return Err(StoreError::Unavailable(format!(
            "etcd refused a lease: {}",
            granted.error()
        )));
    }
    tracing::warn!(
        records = s.bound.len(),
        "etcd session lease expired; granted a new one and writing this host's records again"
    );
    s.lease = Some(granted.id());
    s.granted_ttl = granted.ttl();
    s.reput_pending = true;
    reput(core, &mut s, granted.id()).await
}

/// Writes every bound record under lease `id`, in transactions that stay within etcd's limits.
/// Runs under the session lock, so no transaction of this handle interleaves with it.
async fn reput(core: &Core, s: &mut Session, id: i64) -> Result<()> {
    let mut kv = core.client.kv_client();
    let mut batch = Vec::new();
    let mut bytes = 0;
    let records: Vec<(&String, &Vec<u8>)> = s.bound.iter().collect();
    for (i, (key, value)) in records.iter().enumerate() {
        batch.push(TxnOp::put(
            core.abs(key),
            (*value).clone(),
            Some(PutOptions::new().with_lease(id)),
        ));
        bytes += key.len() + value.len();
        let last = i + 1 == records.len();
        if last || batch.len() >= REPUT_BATCH_OPS || bytes >= REPUT_BATCH_BYTES {
            let ops = std::mem::take(&mut batch);
            bytes = 0;
            core.call(kv.txn(etcd_client::Txn::new().and_then(ops)))
                .await?;
        }
    }
    s.reput_pending = false;
    Ok(())
}
