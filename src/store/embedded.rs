//! The embedded store: the default backend on a single host, with no process besides fluxd.
//!
//! A redb file (`<state dir>/store.redb`) is the durable copy and an in-memory map mirrors it
//! for reads. Every write runs the same three steps while holding the writer lock: compute a
//! [`Plan`] against memory (conditions, revisions), commit it to redb in one durable write
//! transaction, and only then apply it to memory and hand its events to watchers. A crash at
//! any point therefore leaves the file at either the old or the new state, and memory never
//! shows a change the disk could lose.
//!
//! Watchers live in this process only: each gets a bounded channel, fed from a history of the
//! most recent events so `watch(prefix, list.revision + 1)` misses nothing. Host sessions are
//! leases persisted with their TTL; records of leases inherited from a previous process are
//! removed one TTL after this one opened the file, as etcd would do after a crash.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, DatabaseError, ReadableTable, TableDefinition};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::OwnedMutexGuard;

use super::{
    Cond, KeyValue, Listing, Op, Result, Revision, Store, StoreError, Txn, TxnOutcome, WatchEvent,
};

/// The database file inside the state directory.
const FILE_NAME: &str = "store.redb";

/// key -> (value, create_revision, mod_revision, lease id or [`NO_LEASE`]).
const KV: TableDefinition<&str, (&[u8], i64, i64, i64)> = TableDefinition::new("kv");
/// [`REVISION`] and [`NEXT_LEASE`]: the counters that must survive a restart.
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// Lease id -> TTL in milliseconds; kept so a restart knows how long inherited records live.
const LEASES: TableDefinition<i64, u64> = TableDefinition::new("leases");

const REVISION: &str = "revision";
const NEXT_LEASE: &str = "next_lease";

/// redb's errors, boxed: `redb::Error` is large, and every redb call's own error type converts
/// into this with `?`.
type DbError = Box<dyn std::error::Error + Send + Sync>;
type DbResult<T> = std::result::Result<T, DbError>;

/// Lease ids are i64 like etcd's, so records look the same in both backends.
type LeaseId = i64;
/// The lease column of a record that is not host-bound.
const NO_LEASE: LeaseId = 0;

/// How many recent events are kept for watches that start in the past. Enough to cover a
/// consumer re-watching after a short hiccup; a start older than this gets a `Reset`, which is
/// always correct, only costlier.
const HISTORY_EVENTS: usize = 10_000;

/// Per-watcher channel size. A consumer that falls this far behind is not allowed to slow
/// writers down: its further events are dropped and it gets a `Reset` once it has drained.
const WATCH_CHANNEL: usize = 1024;

/// A lagging watcher gets its `Reset` only when this much of its channel is free again, so a
/// consumer that keeps up only barely is not sent a full snapshot for every event.
const WATCH_RESUME_ROOM: usize = WATCH_CHANNEL / 2;

/// How often expired leases are reaped and lagging watchers offered their `Reset`. This bounds
/// how late a record vanishes after its TTL.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(250);

/// etcd's default `--max-txn-ops`: refusing here what a cluster would refuse keeps a deployment
/// free to move from the embedded store to etcd.
const MAX_TXN_OPS: usize = 128;
/// etcd's default `--max-request-bytes` (1.5 MiB), for the same reason.
const MAX_TXN_BYTES: usize = 1536 * 1024;

/// The single-host store. Dropping it without `close` behaves like a crash: nothing more is
/// written, bound records stay until their TTL runs out after the next open, and the file is
/// released so the store can be opened again.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

/// State shared by the handle, its write tasks and the housekeeping task. Background work holds
/// it only through a `Weak`, so dropping the handle releases the file.
struct Inner {
    /// Where the database lives, for error messages.
    path: PathBuf,
    /// Serialises writes from the condition check until memory is updated, so every write sees
    /// the result of the previous one. Holds the database; `None` once the store is closed.
    /// An owned guard travels into the blocking commit, so a caller that gives up waiting
    /// cannot let the next writer start before memory matches the disk.
    writer: Arc<tokio::sync::Mutex<Option<Database>>>,
    /// The mirror of the file plus watchers and leases. Locked briefly and never across an
    /// await; reads take it alone, writes take it after the writer lock.
    mem: Mutex<Mem>,
}

/// Everything readers and watchers see, changed only by [`Mem::apply`].
struct Mem {
    /// Set by `close` or drop; from then on every call fails with `Closed`.
    closed: bool,
    /// The records, sorted so a prefix listing is one range scan.
    kvs: BTreeMap<String, Entry>,
    /// The revision of the last change (0 for an empty store).
    revision: Revision,
    /// The most recent changes in revision order, for watches that start in the past.
    history: VecDeque<Change>,
    /// The oldest revision whose changes are all in `history`. Starts at `revision + 1` on
    /// open, because changes made by an earlier process are not kept.
    first_kept: Revision,
    /// Open watches; dropped when their receiver goes away or the store closes.
    watchers: Vec<Watcher>,
    /// Live leases and when their records are removed. `None` is this handle's own session:
    /// while the handle is open its process is alive by definition, so there is no renewal
    /// that could fall behind and nothing to lose.
    leases: HashMap<LeaseId, Option<Instant>>,
    /// This handle's session lease, between `start_session` and `close`.
    session: Option<LeaseId>,
    /// The id the next session gets; persisted so ids are never reused across restarts.
    next_lease: LeaseId,
}

/// One stored record; the key is the map key.
#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    /// The revision that created the key; kept across updates, new after a delete.
    create_revision: Revision,
    /// The revision that last wrote the key, checked by `Cond::ModRevision`.
    mod_revision: Revision,
    /// The session the record is bound to, or [`NO_LEASE`].
    lease: LeaseId,
}

/// One key's change, as planned, committed, kept in the history and sent to watchers.
#[derive(Debug, Clone)]
enum Change {
    Put { kv: KeyValue, lease: LeaseId },
    Delete { key: String, revision: Revision },
}

/// What one write does, computed against memory before anything is committed.
#[derive(Debug, Default)]
struct Plan {
    /// The revision all of `changes` carry; the store revision only moves if there are any.
    revision: Revision,
    /// In operation order, which is the order watchers see them.
    changes: Vec<Change>,
    /// A session lease to create, with its TTL.
    grant: Option<(LeaseId, Duration)>,
    /// Leases to remove; their records are among `changes`.
    revoke: Vec<LeaseId>,
    /// The store closes after this write (`close`).
    close: bool,
}

/// One `watch` call's receiving end, as seen by writers.
struct Watcher {
    /// Only changes to keys starting with this are sent.
    prefix: String,
    /// Changes below this revision are not sent (a watch that starts in the future).
    from: Revision,
    /// Never awaited: a full channel makes the watcher lag instead of blocking the writer.
    tx: mpsc::Sender<WatchEvent>,
    /// The channel was full and events were dropped: nothing more is sent until a `Reset`
    /// replaces what the consumer missed.
    lagging: bool,
}

impl EmbeddedStore {
    /// Opens (creating) the store in `dir` (file dir/store.redb); fails with a clear error if
    /// another process has it open.
    pub async fn open(dir: &Path) -> Result<EmbeddedStore> {
        let dir = dir.to_path_buf();
        let path = dir.join(FILE_NAME);
        let file = path.clone();
        let (db, mem) = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| {
                StoreError::Storage(format!("creating state directory {}: {e}", dir.display()))
            })?;
            load(&file)
        })
        .await
        .map_err(|e| StoreError::Storage(format!("opening {}: {e}", path.display())))??;
        let inner = Arc::new(Inner {
            path,
            writer: Arc::new(tokio::sync::Mutex::new(Some(db))),
            mem: Mutex::new(mem),
        });
        tokio::spawn(housekeeping(Arc::downgrade(&inner)));
        Ok(EmbeddedStore { inner })
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mem = self.inner.mem();
        mem.check_open()?;
        Ok(mem.kvs.get(key).map(|e| e.to_kv(key)))
    }

    /// The only live session is this handle's own, alive as long as this process is: its
    /// records were seen now. Records of an earlier process's session (kept until their TTL
    /// after a crash) were last seen before this process started: unknown.
    async fn last_renewed(&self, key: &str) -> Result<Option<std::time::SystemTime>> {
        let mem = self.inner.mem();
        mem.check_open()?;
        let own = |e: &Entry| e.lease != NO_LEASE && mem.session == Some(e.lease);
        Ok(mem
            .kvs
            .get(key)
            .filter(|e| own(e))
            .map(|_| std::time::SystemTime::now()))
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let mem = self.inner.mem();
        mem.check_open()?;
        Ok(mem.listing(prefix))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        validate(&txn)?;
        self.inner.write(move |mem| mem.plan_txn(txn)).await
    }

    async fn watch(
        &self,
        prefix: &str,
        from_revision: Revision,
    ) -> Result<mpsc::Receiver<WatchEvent>> {
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        let mut mem = self.inner.mem();
        mem.check_open()?;
        mem.add_watcher(prefix, from_revision, tx);
        Ok(rx)
    }

    async fn start_session(&self, ttl: Duration) -> Result<()> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("session TTL must be positive".into()));
        }
        self.inner
            .write(move |mem| Ok((mem.plan_session(ttl)?, ())))
            .await
    }

    /// Closing twice is not an error: shutdown paths may race with each other.
    async fn close(&self, release_session: bool) -> Result<()> {
        let closed = self
            .inner
            .write(move |mem| Ok((mem.plan_close(release_session), ())))
            .await;
        match closed {
            Err(StoreError::Closed) => Ok(()),
            other => other,
        }
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // A drop is a crash as far as the data goes: end the watches and release the file so
        // this process can open the store again. A write still in flight holds the writer
        // lock; it releases the file itself when it sees `closed` (`Inner::write_blocking`).
        self.inner.mem().shut();
        if let Ok(mut db) = self.inner.writer.try_lock() {
            *db = None;
        }
    }
}

impl Inner {
    fn mem(&self) -> MutexGuard<'_, Mem> {
        // A poisoned lock means a panic while it was held. Readers only read, and `Mem::apply`
        // makes no call that panics on the data it is given, so the map is consistent either
        // way and serving it beats taking the whole store down.
        self.mem.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one write: `plan` (against memory), durable commit, apply. The work after taking
    /// the writer lock runs to completion on a blocking thread even if the caller stops
    /// waiting, so memory can never fall behind the file.
    async fn write<R, F>(self: &Arc<Self>, plan: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Mem) -> Result<(Plan, R)> + Send + 'static,
    {
        let db = Arc::clone(&self.writer).lock_owned().await;
        let inner = Arc::clone(self);
        tokio::task::spawn_blocking(move || inner.write_blocking(db, plan))
            .await
            .map_err(|e| StoreError::Storage(format!("store writer task failed: {e}")))?
    }

    fn write_blocking<R>(
        &self,
        mut db: OwnedMutexGuard<Option<Database>>,
        plan: impl FnOnce(&Mem) -> Result<(Plan, R)>,
    ) -> Result<R> {
        if self.mem().closed {
            // The handle was dropped while this write waited: write nothing more, and let go
            // of the file that `Drop` could not take.
            *db = None;
        }
        let Some(database) = db.as_ref() else {
            return Err(StoreError::Closed);
        };
        let (plan, out) = plan(&self.mem())?;
        if plan.writes_disk() {
            commit(database, &plan).map_err(|e| {
                StoreError::Storage(format!("committing to {}: {e}", self.path.display()))
            })?;
        }
        let mut mem = self.mem();
        mem.apply(plan);
        if mem.closed {
            *db = None;
        }
        Ok(out)
    }
}

impl Mem {
    fn check_open(&self) -> Result<()> {
        if self.closed {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    fn listing(&self, prefix: &str) -> Listing {
        Listing {
            kvs: under(&self.kvs, prefix).map(|(k, e)| e.to_kv(k)).collect(),
            revision: self.revision,
        }
    }

    fn holds(&self, cond: &Cond) -> bool {
        match cond {
            Cond::Absent(key) => !self.kvs.contains_key(key),
            Cond::Exists(key) => self.kvs.contains_key(key),
            // A missing key compares as revision 0, as in etcd; no write ever has revision 0.
            Cond::ModRevision(key, rev) => self.kvs.get(key).map_or(0, |e| e.mod_revision) == *rev,
        }
    }

    fn plan_txn(&self, txn: Txn) -> Result<(Plan, TxnOutcome)> {
        let bound = txn
            .then
            .iter()
            .any(|op| matches!(op, Op::Put { bound: true, .. }));
        let session = match self.session {
            Some(id) => id,
            None if bound => {
                return Err(StoreError::Invalid(
                    "bound put without a session (start_session first)".into(),
                ))
            }
            None => NO_LEASE,
        };
        if !txn.when.iter().all(|c| self.holds(c)) {
            let outcome = TxnOutcome {
                succeeded: false,
                revision: self.revision,
            };
            return Ok((Plan::default(), outcome));
        }
        let revision = self.revision + 1;
        let mut changes = Vec::new();
        // Overlapping deletes are allowed (as in etcd) but each key is deleted once.
        let mut deleted = HashSet::new();
        for op in txn.then {
            match op {
                Op::Put { key, value, bound } => {
                    let create_revision =
                        self.kvs.get(&key).map_or(revision, |e| e.create_revision);
                    let lease = if bound { session } else { NO_LEASE };
                    let kv = KeyValue {
                        key,
                        value,
                        create_revision,
                        mod_revision: revision,
                    };
                    changes.push(Change::Put { kv, lease });
                }
                Op::Delete(key) => {
                    if self.kvs.contains_key(&key) && deleted.insert(key.clone()) {
                        changes.push(Change::Delete { key, revision });
                    }
                }
                Op::DeletePrefix(prefix) => {
                    for (key, _) in under(&self.kvs, &prefix) {
                        if deleted.insert(key.clone()) {
                            let key = key.clone();
                            changes.push(Change::Delete { key, revision });
                        }
                    }
                }
            }
        }
        let outcome = TxnOutcome {
            succeeded: true,
            revision: if changes.is_empty() {
                self.revision
            } else {
                revision
            },
        };
        let plan = Plan {
            revision,
            changes,
            ..Plan::default()
        };
        Ok((plan, outcome))
    }

    fn plan_session(&self, ttl: Duration) -> Result<Plan> {
        if self.session.is_some() {
            return Err(StoreError::Invalid("the session is already started".into()));
        }
        Ok(Plan {
            grant: Some((self.next_lease, ttl)),
            ..Plan::default()
        })
    }

    /// Removes the leases and every record bound to them, as deletes at one new revision.
    fn plan_revoke(&self, leases: Vec<LeaseId>) -> Plan {
        let revision = self.revision + 1;
        let changes = self
            .kvs
            .iter()
            .filter(|(_, e)| leases.contains(&e.lease))
            .map(|(key, _)| Change::Delete {
                key: key.clone(),
                revision,
            })
            .collect();
        Plan {
            revision,
            changes,
            revoke: leases,
            ..Plan::default()
        }
    }

    fn expired(&self, now: Instant) -> Vec<LeaseId> {
        self.leases
            .iter()
            .filter(|(_, deadline)| deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect()
    }

    fn plan_close(&self, release_session: bool) -> Plan {
        let mut plan = match self.session {
            Some(id) if release_session => self.plan_revoke(vec![id]),
            _ => Plan::default(),
        };
        plan.close = true;
        plan
    }

    /// Makes a committed plan visible: the only place the map, revision and leases change.
    fn apply(&mut self, plan: Plan) {
        for change in &plan.changes {
            match change {
                Change::Put { kv, lease } => {
                    let entry = Entry {
                        value: kv.value.clone(),
                        create_revision: kv.create_revision,
                        mod_revision: kv.mod_revision,
                        lease: *lease,
                    };
                    self.kvs.insert(kv.key.clone(), entry);
                }
                Change::Delete { key, .. } => {
                    self.kvs.remove(key);
                }
            }
        }
        if let Some((id, _)) = plan.grant {
            self.leases.insert(id, None);
            self.session = Some(id);
            self.next_lease = id + 1;
        }
        for id in &plan.revoke {
            self.leases.remove(id);
            if self.session == Some(*id) {
                self.session = None;
            }
        }
        if !plan.changes.is_empty() {
            self.revision = plan.revision;
            let (kvs, revision) = (&self.kvs, self.revision);
            self.watchers
                .retain_mut(|w| w.offer(&plan.changes, kvs, revision));
            self.remember(plan.changes);
        }
        if plan.close {
            self.shut();
        }
    }

    fn remember(&mut self, changes: Vec<Change>) {
        self.history.extend(changes);
        while self.history.len() > HISTORY_EVENTS {
            if let Some(oldest) = self.history.pop_front() {
                self.first_kept = oldest.revision() + 1;
            }
        }
        // A revision is kept whole or not at all, so a replay never starts mid-transaction.
        while self
            .history
            .front()
            .is_some_and(|c| c.revision() < self.first_kept)
        {
            self.history.pop_front();
        }
    }

    /// Marks the store closed and ends every watch (receivers see the channel close).
    fn shut(&mut self) {
        self.closed = true;
        self.watchers.clear();
        self.session = None;
    }

    fn add_watcher(&mut self, prefix: &str, from: Revision, tx: mpsc::Sender<WatchEvent>) {
        let mut watcher = Watcher {
            prefix: prefix.to_string(),
            // etcd reads a start revision of 0 (or less) as "from now on".
            from: if from <= 0 { self.revision + 1 } else { from },
            tx,
            lagging: false,
        };
        let keep = if watcher.from < self.first_kept {
            // The changes it asks for are gone: a lagging watcher gets a Reset right away,
            // since its fresh channel has all the room it needs.
            watcher.lagging = true;
            watcher.catch_up(&self.kvs, self.revision)
        } else {
            let start = self
                .history
                .partition_point(|c| c.revision() < watcher.from);
            watcher.offer(self.history.range(start..), &self.kvs, self.revision)
        };
        if keep {
            self.watchers.push(watcher);
        }
    }

    /// Gives lagging watchers their Reset once they have drained, and forgets dropped ones,
    /// without waiting for the next write.
    fn tend_watchers(&mut self) {
        let (kvs, revision) = (&self.kvs, self.revision);
        self.watchers.retain_mut(|w| {
            if w.lagging {
                w.catch_up(kvs, revision)
            } else {
                !w.tx.is_closed()
            }
        });
    }
}

impl Watcher {
    /// Sends the changes it is interested in; false once the receiver is gone. `kvs` and
    /// `revision` are the state after `changes`, for a Reset if the watcher is lagging.
    fn offer<'a>(
        &mut self,
        changes: impl IntoIterator<Item = &'a Change>,
        kvs: &BTreeMap<String, Entry>,
        revision: Revision,
    ) -> bool {
        if self.lagging {
            return self.catch_up(kvs, revision);
        }
        let wanted = changes
            .into_iter()
            .filter(|c| c.revision() >= self.from && c.key().starts_with(&self.prefix));
        for change in wanted {
            match self.tx.try_send(change.to_event()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    self.lagging = true;
                    return true;
                }
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        true
    }

    /// Sends a Reset with the current state if the consumer has made room; false once the
    /// receiver is gone.
    fn catch_up(&mut self, kvs: &BTreeMap<String, Entry>, revision: Revision) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        if self.tx.capacity() < WATCH_RESUME_ROOM {
            return true;
        }
        let listing = Listing {
            kvs: under(kvs, &self.prefix).map(|(k, e)| e.to_kv(k)).collect(),
            revision,
        };
        match self.tx.try_send(WatchEvent::Reset(listing)) {
            Ok(()) => {
                self.lagging = false;
                true
            }
            Err(TrySendError::Full(_)) => true,
            Err(TrySendError::Closed(_)) => false,
        }
    }
}

impl Entry {
    fn to_kv(&self, key: &str) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: self.value.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
        }
    }
}

impl Change {
    fn key(&self) -> &str {
        match self {
            Change::Put { kv, .. } => &kv.key,
            Change::Delete { key, .. } => key,
        }
    }

    fn revision(&self) -> Revision {
        match self {
            Change::Put { kv, .. } => kv.mod_revision,
            Change::Delete { revision, .. } => *revision,
        }
    }

    fn to_event(&self) -> WatchEvent {
        match self {
            Change::Put { kv, .. } => WatchEvent::Put(kv.clone()),
            Change::Delete { key, revision } => WatchEvent::Delete {
                key: key.clone(),
                revision: *revision,
            },
        }
    }
}

impl Plan {
    fn writes_disk(&self) -> bool {
        !self.changes.is_empty() || self.grant.is_some() || !self.revoke.is_empty()
    }
}

/// The records whose key starts with `prefix`, in key order.
fn under<'a>(
    kvs: &'a BTreeMap<String, Entry>,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a String, &'a Entry)> + 'a {
    kvs.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
}

/// Refuses, before taking any lock, what etcd would refuse, so both backends accept the same
/// transactions.
fn validate(txn: &Txn) -> Result<()> {
    if txn.when.len() > MAX_TXN_OPS || txn.then.len() > MAX_TXN_OPS {
        return Err(StoreError::Invalid(format!(
            "a transaction may hold at most {MAX_TXN_OPS} conditions and {MAX_TXN_OPS} operations"
        )));
    }
    let mut bytes = 0;
    for cond in &txn.when {
        let (Cond::Absent(key) | Cond::Exists(key) | Cond::ModRevision(key, _)) = cond;
        check_key(key)?;
        bytes += key.len();
    }
    let mut puts = HashSet::new();
    let mut deletes = Vec::new();
    let mut prefixes = Vec::new();
    for op in &txn.then {
        match op {
            Op::Put { key, value, .. } => {
                check_key(key)?;
                bytes += key.len() + value.len();
                if !puts.insert(key.as_str()) {
                    return Err(StoreError::Invalid(format!(
                        "{key} is written twice in one transaction"
                    )));
                }
            }
            Op::Delete(key) => {
                check_key(key)?;
                bytes += key.len();
                deletes.push(key.as_str());
            }
            Op::DeletePrefix(prefix) => {
                bytes += prefix.len();
                prefixes.push(prefix.as_str());
            }
        }
    }
    if bytes > MAX_TXN_BYTES {
        return Err(StoreError::Invalid(format!(
            "transaction of {bytes} bytes exceeds the limit of {MAX_TXN_BYTES}"
        )));
    }
    // etcd refuses a transaction that both writes and deletes a key; so do we.
    if let Some(key) = puts
        .iter()
        .find(|k| deletes.contains(k) || prefixes.iter().any(|p| k.starts_with(p)))
    {
        return Err(StoreError::Invalid(format!(
            "{key} is both written and deleted in one transaction"
        )));
    }
    Ok(())
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        Err(StoreError::Invalid("empty key".into()))
    } else {
        Ok(())
    }
}

/// Opens the file and reads it into memory. Leases found here belong to an earlier process;
/// they get a full TTL from now, since when that process last renewed them is unknown.
fn load(path: &Path) -> Result<(Database, Mem)> {
    let db = Database::create(path).map_err(|e| match e {
        DatabaseError::DatabaseAlreadyOpen => StoreError::Storage(format!(
            "{} is already open (is another fluxd running with this state directory?)",
            path.display()
        )),
        e => StoreError::Storage(format!("opening {}: {e}", path.display())),
    })?;
    let read = |e: DbError| StoreError::Storage(format!("reading {}: {e}", path.display()));
    create_tables(&db).map_err(read)?;
    let mem = read_mem(&db).map_err(read)?;
    Ok((db, mem))
}

/// Creates missing tables, so reads never meet `TableDoesNotExist` on a fresh file.
fn create_tables(db: &Database) -> DbResult<()> {
    let tx = db.begin_write()?;
    tx.open_table(KV)?;
    tx.open_table(META)?;
    tx.open_table(LEASES)?;
    tx.commit()?;
    Ok(())
}

fn read_mem(db: &Database) -> DbResult<Mem> {
    let tx = db.begin_read()?;
    let mut kvs = BTreeMap::new();
    for row in tx.open_table(KV)?.iter()? {
        let (key, value) = row?;
        let (value, create_revision, mod_revision, lease) = value.value();
        let entry = Entry {
            value: value.to_vec(),
            create_revision,
            mod_revision,
            lease,
        };
        kvs.insert(key.value().to_string(), entry);
    }
    let meta = tx.open_table(META)?;
    let revision = meta.get(REVISION)?.map_or(0, |v| v.value());
    let mut next_lease = meta.get(NEXT_LEASE)?.map_or(1, |v| v.value());
    let now = Instant::now();
    let mut leases = HashMap::new();
    for row in tx.open_table(LEASES)?.iter()? {
        let (id, ttl_ms) = row?;
        let id = id.value();
        next_lease = next_lease.max(id + 1);
        leases.insert(id, Some(now + Duration::from_millis(ttl_ms.value())));
    }
    Ok(Mem {
        closed: false,
        kvs,
        revision,
        history: VecDeque::new(),
        first_kept: revision + 1,
        watchers: Vec::new(),
        leases,
        session: None,
        next_lease,
    })
}

/// Writes a plan in one durable redb transaction: all of it reaches the disk or none does.
fn commit(db: &Database, plan: &Plan) -> DbResult<()> {
    let tx = db.begin_write()?;
    {
        let mut kv = tx.open_table(KV)?;
        for change in &plan.changes {
            match change {
                Change::Put { kv: rec, lease } => {
                    let row = (
                        rec.value.as_slice(),
                        rec.create_revision,
                        rec.mod_revision,
                        *lease,
                    );
                    kv.insert(rec.key.as_str(), row)?;
                }
                Change::Delete { key, .. } => {
                    kv.remove(key.as_str())?;
                }
            }
        }
        let mut meta = tx.open_table(META)?;
        if !plan.changes.is_empty() {
            meta.insert(REVISION, plan.revision)?;
        }
        let mut leases = tx.open_table(LEASES)?;
        if let Some((id, ttl)) = plan.grant {
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            leases.insert(id, ttl_ms)?;
            meta.insert(NEXT_LEASE, id + 1)?;
        }
        for id in &plan.revoke {
            leases.remove(id)?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Reaps expired leases and tends lagging watchers until the store is closed or dropped.
async fn housekeeping(weak: Weak<Inner>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        let expired = {
            let mut mem = inner.mem();
            if mem.closed {
                return;
            }
            mem.tend_watchers();
            !mem.expired(Instant::now()).is_empty()
        };
        if expired {
            let reaped = inner
                .write(|mem| Ok((mem.plan_revoke(mem.expired(Instant::now())), ())))
                .await;
            match reaped {
                Ok(()) => {}
                Err(StoreError::Closed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "removing expired host records failed; retrying")
                }
            }
        }
    }
}
