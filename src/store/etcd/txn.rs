//! Transactions, and the bookkeeping of which records are bound to the host session.

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, DeleteOptions, PutOptions, TxnOp};

use crate::store::{Cond, Op, Result, StoreError, Txn, TxnOutcome};

use super::client::timeout_error;
use super::error::{is_lease_gone, is_token_refused, map_err};
use super::EtcdStore;

impl EtcdStore {
    /// `deadline` covers the wait for the session lock and the request together, so a caller
    /// queued behind a slow re-put or a dead etcd still hears back in time.
    pub(super) async fn run_txn(
        &self,
        txn: Txn,
        deadline: tokio::time::Instant,
    ) -> Result<TxnOutcome> {
        let compares: Vec<Compare> = txn
            .when
            .iter()
            .map(|cond| match cond {
                Cond::Absent(key) => {
                    Compare::create_revision(self.core.abs(key), CompareOp::Equal, 0)
                }
                Cond::Exists(key) => {
                    Compare::create_revision(self.core.abs(key), CompareOp::Greater, 0)
                }
                Cond::ModRevision(key, rev) => {
                    Compare::mod_revision(self.core.abs(key), CompareOp::Equal, *rev)
                }
            })
            .collect();
        let has_bound = txn
            .then
            .iter()
            .any(|op| matches!(op, Op::Put { bound: true, .. }));

        // Transactions without writes cannot disturb the bound map; skip the lock for them.
        let mut session = if txn.then.is_empty() {
            None
        } else {
            match tokio::time::timeout_at(deadline, self.session.lock()).await {
                Ok(guard) => Some(guard),
                Err(_) => return Err(timeout_error()),
            }
        };
        let lease = match (&session, has_bound) {
            (Some(s), true) if !s.started => {
                return Err(StoreError::Invalid("bound put before start_session".into()))
            }
            (Some(s), true) => match s.lease {
                Some(id) => Some(id),
                None => {
                    return Err(StoreError::Unavailable(
                        "the session lease was lost and is being granted again".into(),
                    ))
                }
            },
            _ => None,
        };

        let ops: Vec<TxnOp> = txn
            .then
            .iter()
            .map(|op| match op {
                Op::Put { key, value, bound } => {
                    let options = match (bound, lease) {
                        (true, Some(id)) => Some(PutOptions::new().with_lease(id)),
                        _ => None,
                    };
                    TxnOp::put(self.core.abs(key), value.clone(), options)
                }
                Op::Delete(key) => TxnOp::delete(self.core.abs(key), None),
                Op::DeletePrefix(prefix) => {
                    let (key, end) = self.core.range(prefix);
                    TxnOp::delete(key, Some(DeleteOptions::new().with_range(end)))
                }
            })
            .collect();
        let request = etcd_client::Txn::new().when(compares).and_then(ops);
        let mut kv = self.core.client.kv_client();
        let sent = self.core.login_generation();
        let answer = tokio::time::timeout_at(deadline, kv.txn(request)).await;
        let response = match answer {
            Ok(Ok(response)) => response,
            Ok(Err(e)) if lease.is_some() && is_lease_gone(&e) => {
                if let Some(s) = session.as_mut() {
                    if s.lease == lease {
                        s.lease = None;
                    }
                }
                self.lease_lost.notify_one();
                return Err(StoreError::Unavailable(
                    "the session lease was lost and is being granted again".into(),
                ));
            }
            Ok(Err(e)) => {
                let refused = is_token_refused(&e);
                let error = map_err(e);
                if let (Some(s), StoreError::Unavailable(_)) = (session.as_mut(), &error) {
                    forget_touched(&mut s.bound, &txn.then);
                }
                // Logging in again may take a while: not with every writer waiting on the lock.
                drop(session);
                if refused {
                    self.core.login_again(sent).await;
                }
                return Err(error);
            }
            Err(_) => {
                if let Some(s) = session.as_mut() {
                    forget_touched(&mut s.bound, &txn.then);
                }
                return Err(timeout_error());
            }
        };
        if response.succeeded() {
            if let Some(s) = session.as_mut() {
                for op in &txn.then {
                    match op {
                        Op::Put {
                            key,
                            value,
                            bound: true,
                        } => {
                            s.bound.insert(key.clone(), value.clone());
                        }
                        // An unbound put detaches the key from the lease in etcd too.
                        Op::Put { key, .. } | Op::Delete(key) => {
                            s.bound.remove(key);
                        }
                        Op::DeletePrefix(prefix) => s.bound.retain(|k, _| !k.starts_with(prefix)),
                    }
                }
            }
        }
        Ok(TxnOutcome {
            succeeded: response.succeeded(),
            revision: response.header().map(|h| h.revision()).unwrap_or_default(),
        })
    }
}

/// After a transaction whose outcome is unknown (no answer, connection lost), the keys it wrote
/// leave the re-put map: a re-put must never bring back a record that may have been deleted, or
/// write a value the caller was told did not land. The caller saw an error and retries, which
/// puts the key back in the map; at worst a record that did land is not re-put after a later
/// lease loss.
fn forget_touched(bound: &mut BTreeMap<String, Vec<u8>>, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Put { key, .. } | Op::Delete(key) => {
                bound.remove(key);
            }
            Op::DeletePrefix(prefix) => bound.retain(|k, _| !k.starts_with(prefix)),
        }
    }
}
