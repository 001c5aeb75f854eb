//! The shared store: a revisioned key-value map with transactions, watches and host-bound
//! records. Two backends give the same semantics: `embedded` (one host, no extra process) and
//! `etcd` (clusters). Keys here are relative (`services/web`); a backend may add its prefix.
//!
//! Semantics both backends keep (and `tests/store_suite.rs` checks):
//! - Every change gets the next store revision; a record's `mod_revision` is the revision that
//!   last wrote it, `create_revision` the one that created it.
//! - `list` is one consistent snapshot and returns the revision it was taken at, so a caller can
//!   `watch(prefix, revision + 1)` and miss nothing.
//! - A watch delivers every change to keys under its prefix with revision >= `from_revision`,
//!   in revision order. If those revisions are no longer available (compacted, or the embedded
//!   store restarted), the watch sends `Reset` with a fresh snapshot and continues after it.
//!   Backends reconnect broken watches themselves; the receiver only ends when the store closes.
//! - Host-bound records (`Op::Put { bound: true, .. }`) are attached to this store handle's host
//!   session (`start_session`) and vanish when the session ends (`close(true)`) or stops being
//!   renewed for its TTL (the process died). If the backend loses the session (lease expired
//!   during an outage), it opens a new one and writes every bound record again.

pub mod embedded;
pub mod etcd;

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

/// Store revision: a counter over all changes, starting at 1 for the first change.
pub type Revision = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
}

/// A consistent snapshot of a prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Sorted by key.
    pub kvs: Vec<KeyValue>,
    /// The store revision the snapshot was taken at.
    pub revision: Revision,
}

/// A condition a transaction checks before applying its operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// The key does not exist.
    Absent(String),
    /// The key exists.
    Exists(String),
    /// The key was last written at exactly this revision.
    ModRevision(String, Revision),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Writes the key; `bound` attaches it to this handle's host session.
    Put {
        key: String,
        value: Vec<u8>,
        bound: bool,
    },
    Delete(String),
    /// Deletes every key starting with the prefix.
    DeletePrefix(String),
}

/// All conditions are checked and all operations applied as one atomic step, or nothing is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub when: Vec<Cond>,
    pub then: Vec<Op>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnOutcome {
    /// False if a condition failed; then nothing was written.
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: Revision,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete {
        key: String,
        revision: Revision,
    },
    /// The requested history is gone: replace everything known under the prefix with this.
    Reset(Listing),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or did not answer in time; the caller may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The request itself was refused (too large, too many operations, bad key).
    #[error("store refused the request: {0}")]
    Invalid(String),
    #[error("store is closed")]
    Closed,
    #[error("store storage error: {0}")]
    Storage(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[async_trait]
pub trait Store: Send + Sync {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Every key starting with `prefix`, as one snapshot.
    async fn list(&self, prefix: &str) -> Result<Listing>;

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome>;

    /// Changes under `prefix` from `from_revision` on (see the module docs).
    async fn watch(
        &self,
        prefix: &str,
        from_revision: Revision,
    ) -> Result<mpsc::Receiver<WatchEvent>>;

    /// Opens this handle's host session with the given TTL and keeps renewing it in the
    /// background until `close`. Bound puts before this fail with `Invalid`.
    async fn start_session(&self, ttl: Duration) -> Result<()>;

    /// When the host session that `key` is bound to last proved its host alive (a renewal), or
    /// None when the key does not exist or is not host-bound. This is how "last seen" of a
    /// host is known without the host writing anything: etcd tracks each lease's renewals.
    async fn last_renewed(&self, key: &str) -> Result<Option<std::time::SystemTime>>;

    /// Since when this store's watches have been failing (the followed picture may be stale),
    /// or `None` while they work. A local store is never unreachable.
    fn unreachable_since(&self) -> Option<std::time::SystemTime> {
        None
    }

    /// Stops renewing. With `release_session`, bound records are removed now (clean stop);
    /// without, they stay until the TTL runs out (what a crash looks like to other hosts).
    async fn close(&self, release_session: bool) -> Result<()>;

    /// Writes one key (unbound).
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        let out = self
            .txn(Txn {
                when: vec![],
                then: vec![Op::Put {
                    key: key.to_string(),
                    value,
                    bound: false,
                }],
            })
            .await?;
        Ok(out.revision)
    }

    /// Deletes one key; true if it existed.
    async fn delete(&self, key: &str) -> Result<bool> {
        let out = self
            .txn(Txn {
                when: vec![Cond::Exists(key.to_string())],
                then: vec![Op::Delete(key.to_string())],
            })
            .await?;
        Ok(out.succeeded)
    }

    /// Writes `value` only if the key was last written at `expected` (`None`: does not exist).
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Revision>,
        value: Vec<u8>,
    ) -> Result<bool> {
        let cond = match expected {
            Some(rev) => Cond::ModRevision(key.to_string(), rev),
            None => Cond::Absent(key.to_string()),
        };
        let out = self
            .txn(Txn {
                when: vec![cond],
                then: vec![Op::Put {
                    key: key.to_string(),
                    value,
                    bound: false,
                }],
            })
            .await?;
        Ok(out.succeeded)
    }
}
