//! The etcd backend, for clusters: every host talks to the same etcd, so records written by one
//! are seen by all, and a host's records go away with its lease when it dies.
//!
//! The etcd-client crate leaves a lot to the caller (see shared/PITFALLS.md): it reconnects
//! neither watch nor lease keep-alive streams, it cannot decode a response above 4 MiB, and its
//! per-request timeout ends once response headers arrive, so it does not bound the messages of a
//! stream. So every request here runs under our own timeout, lists are paged and pinned to one
//! revision, and background tasks re-establish watches and the session lease themselves.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    TxnOp, WatchOptions,
};
use rand::Rng;
use tokio::sync::{mpsc, Mutex, Notify};
use tokio::task::JoinHandle;

use super::{
    Cond, KeyValue, Listing, Op, Result, Revision, Store, StoreError, Txn, TxnOutcome, WatchEvent,
};

/// Long enough for a loaded cluster, short enough that the daemon reports an unreachable etcd at
/// startup instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Our own bound on every request, stream messages and the wait for the session lock included:
/// callers would rather get `Unavailable` and decide themselves than wait for etcd to return.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Keeps each list response far below the crate's 4 MiB decode limit.
const PAGE_SIZE: i64 = 500;
/// etcd's default `--max-txn-ops`; refusing here gives a clearer error than etcd's.
const MAX_TXN_OPS: usize = 128;
/// Re-put batches stay well inside etcd's operation and 1.5 MiB request limits.
const REPUT_BATCH_OPS: usize = 100;
const REPUT_BATCH_BYTES: usize = 1 << 20;
const WATCH_CHANNEL: usize = 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Short on purpose: after an outage, hosts must see each other's changes within seconds of
/// etcd returning (a 5 s cap let a watch notice 6 s late); one attempt per second per stream
/// costs etcd nothing.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A watch stream carries no traffic of its own while a prefix is quiet; HTTP/2 pings are what
/// notice a peer that vanished without closing the connection. etcd refuses pings more often
/// than every 5 s (`--grpc-keepalive-min-time`), and pings with no stream open at all.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(10);
const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests that failed together with one stale token share one fresh login.
const RELOGIN_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// gRPC status codes (fixed by the gRPC spec); named here because the crate does not re-export
/// tonic's `Code`.
mod grpc {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const ABORTED: i32 = 10;
    pub const OUT_OF_RANGE: i32 = 11;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
    pub const DATA_LOSS: i32 = 15;
}

/// A store on an etcd cluster, keeping its keys under one prefix so several flux installations
/// (or other users) can share a cluster.
pub struct EtcdStore {
    core: Core,
    session: Arc<Mutex<Session>>,
    /// Lets a transaction that found the lease gone wake the keep-alive task now rather than at
    /// its next renewal.
    lease_lost: Arc<Notify>,
    closed: AtomicBool,
    /// Background tasks (watches, keep-alive) to stop on close or drop; a task of a dropped
    /// store would otherwise keep the lease alive forever.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

/// What the background tasks need, cheap to clone into them.
#[derive(Clone)]
struct Core {
    client: Client,
    prefix: String,
    /// Since when the watches have been failing, `None` while they work: readers of the
    /// followed catalog (the UI, `fluxctl`) say their picture may be stale.
    watch_down_since: Arc<std::sync::Mutex<Option<SystemTime>>>,
    /// The etcd user to log in as again when etcd no longer knows our token.
    login: Option<Arc<Login>>,
}

/// etcd forgets every token it issued when it restarts (the default "simple" tokens live in its
/// memory) and when a token's `--auth-token-ttl` runs out; etcd-client 0.15 logs in only once,
/// at connect. So the user and password are kept, and any request that etcd refuses for its
/// token logs in again (once for all the requests that failed together); the request's own
/// retry, or the background task's next round, then succeeds.
struct Login {
    user: String,
    password: String,
    /// Bumped by every successful login: a request sent before the latest login that etcd
    /// refused for its (old) token needs no login of its own, however late its answer came.
    generation: std::sync::atomic::AtomicU64,
    /// When a login was last tried, held across the attempt: one at a time, and none within
    /// `RELOGIN_MIN_INTERVAL` of the last (etcd may still be electing, or the password changed).
    last_try: Mutex<Option<Instant>>,
}

/// The host session. One lock covers the lease and the bound-record map, and every writing
/// transaction holds it across its request: otherwise a re-put after a lost lease could race a
/// concurrent delete and bring a record back, or write an older value over a newer one.
#[derive(Default)]
struct Session {
    started: bool,
    /// The TTL asked for, in seconds; a re-grant asks for the same.
    ttl: i64,
    /// The TTL etcd granted (it raises very short ones to its minimum); renewals are paced by it.
    granted_ttl: i64,
    /// `None` while the lease is known to be gone and a new one is not yet granted.
    lease: Option<i64>,
    /// Every record this host wrote bound and has not deleted or overwritten unbound since:
    /// what has to be written again under a new lease.
    bound: BTreeMap<String, Vec<u8>>,
    /// A new lease was granted but not every bound record is written under it yet.
    reput_pending: bool,
}

/// How to prove who we are to etcd, and whom to trust: the contents of the files named by
/// `--etcd-ca-file`, `--etcd-cert-file`/`--etcd-key-file` and `--etcd-user`/`--etcd-password-file`.
#[derive(Default, Clone)]
pub struct Credentials {
    /// PEM CA of etcd's server certificate; with it, connections are TLS (`https://`).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate and key, for etcd's `--client-cert-auth`.
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// etcd user and password (etcd auth).
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tls", &self.ca_pem.is_some())
            .field("client_cert", &self.client_pem.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl EtcdStore {
    /// Connects and makes one request, so an unreachable or misconfigured etcd is reported here
    /// rather than by the first real use.
    ///
    /// `endpoints` like `http://127.0.0.1:2379` or `127.0.0.1:2379`. Keys given to the `Store`
    /// methods are relative and stored as `prefix + key`; keys handed back are relative again.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdStore> {
        Self::connect_with(endpoints, prefix, &Credentials::default()).await
    }

    /// As `connect`, over TLS and/or as an etcd user as `credentials` say. With a CA, every
    /// endpoint is reached over `https://`, whatever scheme it was given with.
    pub async fn connect_with(
        endpoints: &[String],
        prefix: &str,
        credentials: &Credentials,
    ) -> Result<EtcdStore> {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoints given".into()));
        }
        let mut endpoints = endpoints.to_vec();
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(HTTP2_PING_INTERVAL, HTTP2_PING_TIMEOUT)
            .with_keep_alive_while_idle(false)
            // A member cut off from its cluster would otherwise keep serving a watch that never
            // sees another event; with this it fails and we reconnect, possibly elsewhere.
            .with_require_leader(true);
        if let Some(ca) = &credentials.ca_pem {
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(ca));
            if let Some((cert, key)) = &credentials.client_pem {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
            for e in endpoints.iter_mut() {
                let hostport = e
                    .strip_prefix("http://")
                    .or_else(|| e.strip_prefix("https://"))
                    .unwrap_or(e);
                *e = format!("https://{hostport}");
            }
        }
        if let Some((user, password)) = &credentials.user {
            options = options.with_user(user.clone(), password.clone());
        }
        let client =
            match tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(&endpoints, Some(options)))
                .await
            {
                Ok(client) => client.map_err(map_connect_err)?,
                Err(_) => {
                    return Err(StoreError::Unavailable(format!(
                        "no connection to etcd within {CONNECT_TIMEOUT:?}"
                    )))
                }
            };
        let core = Core {
            client,
            prefix: prefix.to_string(),
            watch_down_since: Arc::default(),
            login: credentials.user.as_ref().map(|(user, password)| {
                Arc::new(Login {
                    user: user.clone(),
                    password: password.clone(),
                    generation: Default::default(),
                    last_try: Mutex::new(None),
                })
            }),
        };
        // The first request is where a refused TLS handshake shows when there is no user to
        // authenticate first: its cause is spelt out too.
        let mut kv = core.client.kv_client();
        timed(kv.get(core.abs(""), Some(GetOptions::new().with_count_only())))
            .await?
            .map_err(map_connect_err)?;
        Ok(EtcdStore {
            core,
            session: Arc::new(Mutex::new(Session::default())),
            lease_lost: Arc::new(Notify::new()),
            closed: AtomicBool::new(false),
            tasks: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        // The list stays valid even if a holder panicked: it only holds handles.
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a task for shutdown. Checks `closed` after pushing, under the same lock that
    /// `close` aborts under, so a task spawned while closing cannot be missed.
    fn track(&self, task: JoinHandle<()>) {
        let mut tasks = self.tasks();
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
        if self.closed.load(Ordering::SeqCst) {
            tasks.drain(..).for_each(|t| t.abort());
        }
    }

    fn stop_tasks(&self) {
        self.tasks().drain(..).for_each(|t| t.abort());
    }

    /// `deadline` covers the wait for the session lock and the request together, so a caller
    /// queued behind a slow re-put or a dead etcd still hears back in time.
    async fn run_txn(&self, txn: Txn, deadline: tokio::time::Instant) -> Result<TxnOutcome> {
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

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.check_open()?;
        let response = once_more_if_token_refused(|| async {
            let mut kv = self.core.client.kv_client();
            self.core.call(kv.get(self.core.abs(key), None)).await
        })
        .await?;
        Ok(response.kvs().first().and_then(|kv| self.core.convert(kv)))
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        self.check_open()?;
        once_more_if_token_refused(|| self.core.list(prefix)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        self.check_open()?;
        if txn.when.len() > MAX_TXN_OPS || txn.then.len() > MAX_TXN_OPS {
            return Err(StoreError::Invalid(format!(
                "a transaction takes at most {MAX_TXN_OPS} conditions and {MAX_TXN_OPS} operations"
            )));
        }
        // Each attempt its own deadline: the second comes after a login that took its time.
        once_more_if_token_refused(|| {
            self.run_txn(txn.clone(), tokio::time::Instant::now() + REQUEST_TIMEOUT)
        })
        .await
    }

    async fn watch(
        &self,
        prefix: &str,
        from_revision: Revision,
    ) -> Result<mpsc::Receiver<WatchEvent>> {
        self.check_open()?;
        // "From now" is pinned here rather than in the task, so a write made right after this
        // returns is not missed while the task is still connecting.
        let start = if from_revision > 0 {
            from_revision
        } else {
            self.core.current_revision().await? + 1
        };
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        let task = tokio::spawn(watch_loop(self.core.clone(), prefix.to_string(), start, tx));
        self.track(task);
        Ok(rx)
    }

    async fn start_session(&self, ttl: Duration) -> Result<()> {
        self.check_open()?;
        let ttl_secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let mut session = self.session.lock().await;
        if session.started {
            return Err(StoreError::Invalid("the session is already started".into()));
        }
        let mut leases = self.core.client.lease_client();
        let granted = self.core.call(leases.grant(ttl_secs, None)).await?;
        if !granted.error().is_empty() {
            return Err(StoreError::Unavailable(format!(
                "etcd refused a lease: {}",
                granted.error()
            )));
        }
        session.started = true;
        session.ttl = ttl_secs;
        session.granted_ttl = granted.ttl();
        session.lease = Some(granted.id());
        drop(session);
        let task = tokio::spawn(keep_session(
            self.core.clone(),
            self.session.clone(),
            self.lease_lost.clone(),
        ));
        self.track(task);
        Ok(())
    }

    fn unreachable_since(&self) -> Option<SystemTime> {
        self.core.watch_down_since.lock().ok().and_then(|s| *s)
    }

    async fn close(&self, release_session: bool) -> Result<()> {
        // A second close has nothing left to do; failing it would only make shutdown paths
        // fragile.
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.stop_tasks();
        if !release_session {
            return Ok(());
        }
        let revoke = async {
            let mut session = self.session.lock().await;
            session.bound.clear();
            let Some(id) = session.lease.take() else {
                return Ok(());
            };
            let mut leases = self.core.client.lease_client();
            let sent = self.core.login_generation();
            match leases.revoke(id).await {
                Ok(_) => Ok(()),
                // Already expired: the records are gone, which is what was asked.
                Err(e) if is_lease_gone(&e) => Ok(()),
                Err(e) => Err(self.core.fail(e, sent).await),
            }
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, revoke).await {
            Ok(result) => result,
            Err(_) => Err(timeout_error()),
        }
    }
}

impl Core {
    /// Which login a request about to be sent goes out under (0 without a user).
    fn login_generation(&self) -> u64 {
        self.login
            .as_ref()
            .map_or(0, |l| l.generation.load(Ordering::SeqCst))
    }

    /// etcd's error as a `StoreError`, after logging in again if etcd refused our token; `sent`
    /// is the `login_generation` the request went out under.
    async fn fail(&self, e: etcd_client::Error, sent: u64) -> StoreError {
        self.login_again_if_refused(&e, sent).await;
        map_err(e)
    }

    /// A request under our deadline; a refused token is handled as `fail` does.
    async fn call<T>(
        &self,
        request: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        let sent = self.login_generation();
        match timed(request).await? {
            Ok(t) => Ok(t),
            Err(e) => Err(self.fail(e, sent).await),
        }
    }

    async fn login_again_if_refused(&self, e: &etcd_client::Error, sent: u64) {
        if is_token_refused(e) {
            self.login_again(sent).await;
        }
    }

    /// Logs in again, unless a login succeeded since `sent` or one was tried just now.
    async fn login_again(&self, sent: u64) {
        let Some(login) = &self.login else { return };
        let mut last_try = login.last_try.lock().await;
        if login.generation.load(Ordering::SeqCst) != sent
            || last_try.is_some_and(|t| t.elapsed() < RELOGIN_MIN_INTERVAL)
        {
            return;
        }
        *last_try = Some(Instant::now());
        let mut auth = self.client.auth_client();
        // etcd checks the token sent with Authenticate itself, so the stale one must go first.
        auth.remove_client_auth();
        match timed(auth.set_client_auth(login.user.clone(), login.password.clone())).await {
            Ok(Ok(())) => {
                login.generation.fetch_add(1, Ordering::SeqCst);
                tracing::info!(user = %login.user, "logged in to etcd again: it no longer knew our token");
            }
            Ok(Err(err)) => {
                tracing::warn!(user = %login.user, error = %map_err(err), "logging in to etcd again failed")
            }
            Err(err) => {
                tracing::warn!(user = %login.user, error = %err, "logging in to etcd again failed")
            }
        }
    }

    fn abs(&self, key: &str) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(self.prefix.as_bytes());
        full.extend_from_slice(key.as_bytes());
        full
    }

    fn rel(&self, key: &[u8]) -> Option<String> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        Some(String::from_utf8_lossy(rest).into_owned())
    }

    /// `[key, end)` covering every key under the relative prefix. etcd rejects an empty key, so
    /// "everything" (empty store prefix and empty prefix) becomes its `"\0"`..`"\0"` form.
    fn range(&self, prefix: &str) -> (Vec<u8>, Vec<u8>) {
        let key = self.abs(prefix);
        if key.is_empty() {
            return (vec![0], vec![0]);
        }
        let end = prefix_end(&key);
        (key, end)
    }

    fn convert(&self, kv: &etcd_client::KeyValue) -> Option<KeyValue> {
        Some(KeyValue {
            key: self.rel(kv.key())?,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
        })
    }

    async fn current_revision(&self) -> Result<Revision> {
        let mut kv = self.client.kv_client();
        let response = self
            .call(kv.get(self.abs(""), Some(GetOptions::new().with_count_only())))
            .await?;
        Ok(response.header().map(|h| h.revision()).unwrap_or_default())
    }

    /// A compaction between two pages makes the pinned revision unreadable; the whole list is
    /// then taken again at a newer revision.
    async fn list(&self, prefix: &str) -> Result<Listing> {
        let mut attempts = 0;
        loop {
            match self.list_once(prefix).await? {
                Some(listing) => return Ok(listing),
                None if attempts < 3 => attempts += 1,
                None => {
                    return Err(StoreError::Unavailable(
                        "etcd kept compacting away the revision of a paged list".into(),
                    ))
                }
            }
        }
    }

    /// `None` if the revision of the first page was compacted before the last page was read.
    async fn list_once(&self, prefix: &str) -> Result<Option<Listing>> {
        let (mut start, end) = self.range(prefix);
        let mut kv = self.client.kv_client();
        let mut listing = Listing::default();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE_SIZE);
            if listing.revision > 0 {
                options = options.with_revision(listing.revision);
            }
            let sent = self.login_generation();
            let response = match timed(kv.get(start.clone(), Some(options))).await? {
                Ok(response) => response,
                Err(e) if listing.revision > 0 && is_compacted(&e) => return Ok(None),
                Err(e) => return Err(self.fail(e, sent).await),
            };
            if listing.revision == 0 {
                listing.revision = response.header().map(|h| h.revision()).unwrap_or_default();
            }
            listing
                .kvs
                .extend(response.kvs().iter().filter_map(|kv| self.convert(kv)));
            match response.kvs().last() {
                Some(last) if response.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok(Some(listing)),
            }
        }
    }
}

/// The smallest key greater than every key starting with `prefix`, as etcd computes it; `"\0"`
/// (no upper bound) if there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Runs a request under our own deadline (see `REQUEST_TIMEOUT`), leaving etcd's own error for
/// the caller to inspect.
async fn timed<T>(
    request: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<std::result::Result<T, etcd_client::Error>> {
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| timeout_error())
}

fn timeout_error() -> StoreError {
    StoreError::Unavailable(format!("etcd did not answer within {REQUEST_TIMEOUT:?}"))
}

/// As `map_err`, with the cause of a transport failure spelt out (a refused TLS handshake,
/// say), which the crate's own message ("transport error") leaves out.
fn map_connect_err(e: etcd_client::Error) -> StoreError {
    let mut chain = Vec::new();
    let mut source = match &e {
        etcd_client::Error::GRpcStatus(status) => std::error::Error::source(status),
        other => std::error::Error::source(other),
    };
    while let Some(s) = source {
        let m = s.to_string();
        if !chain.contains(&m) {
            chain.push(m);
        }
        source = s.source();
    }
    match map_err(e) {
        StoreError::Unavailable(m) if !chain.is_empty() => {
            StoreError::Unavailable(format!("{m}: {}", chain.join(": ")))
        }
        other => other,
    }
}

/// Sorts etcd's failures by what the caller can do: retry later (`Unavailable`), fix the request
/// (`Invalid`), or get an operator (`Storage`).
fn map_err(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(ref status) if is_token_refused(&e) => {
            StoreError::Unavailable(format!("etcd: {}", status.message()))
        }
        E::GRpcStatus(status) => {
            let message = format!("etcd: {}", status.message());
            match status.code() as i32 {
                grpc::CANCELLED
                | grpc::UNKNOWN
                | grpc::DEADLINE_EXCEEDED
                | grpc::ABORTED
                | grpc::INTERNAL
                | grpc::UNAVAILABLE => StoreError::Unavailable(message),
                // Also the NOSPACE alarm, which no retry or smaller request fixes.
                grpc::RESOURCE_EXHAUSTED if status.message().contains("space exceeded") => {
                    StoreError::Storage(message)
                }
                grpc::DATA_LOSS => StoreError::Storage(message),
                // Invalid argument (too large, too many operations, duplicate key in a
                // transaction), too large for the gRPC limit, compacted, permissions, ...
                _ => StoreError::Invalid(message),
            }
        }
        E::InvalidArgs(m) | E::EndpointError(m) => StoreError::Invalid(m),
        E::InvalidUri(e) => StoreError::Invalid(format!("bad etcd endpoint: {e}")),
        E::Utf8Error(e) => StoreError::Storage(e.to_string()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// etcd no longer accepts our token (restarted, or the token's TTL ran out), or got a request
/// without one (another task was just logging in again): both pass once we log in again.
fn is_token_refused(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => is_token_refusal(s.message()),
        _ => false,
    }
}

fn is_token_refusal(message: &str) -> bool {
    message.contains("invalid auth token") || message.contains("user name is empty")
}

/// Makes a request once more if etcd refused it for a stale token: `Core::fail` has logged in
/// again by then, so a caller (`fluxctl`, the API) does not see a failure etcd's restart caused.
async fn once_more_if_token_refused<T, F>(request: impl Fn() -> F) -> Result<T>
where
    F: Future<Output = Result<T>>,
{
    match request().await {
        Err(StoreError::Unavailable(m)) if is_token_refusal(&m) => request().await,
        other => other,
    }
}

fn is_compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() as i32 == grpc::OUT_OF_RANGE && s.message().contains("compacted"))
}

/// The crate reports a vanished lease as its own error from `keep_alive`, etcd as NOT_FOUND from
/// a put or revoke.
fn is_lease_gone(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => {
            s.code() as i32 == grpc::NOT_FOUND && s.message().contains("lease not found")
        }
        _ => false,
    }
}

/// Exponential reconnect delay with jitter, so many hosts coming back after an etcd outage do
/// not all hit it in the same instant.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: BACKOFF_MIN,
            max: BACKOFF_MAX,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
    }
}

/// Logs the start and the end of an outage once each; a retry every few seconds would flood the
/// log during a long one.
struct Outage {
    what: String,
    down: bool,
    /// Set to the outage's start while it lasts, for those who report staleness.
    since: Option<Arc<std::sync::Mutex<Option<SystemTime>>>>,
}

impl Outage {
    fn new(what: String) -> Self {
        Outage {
            what,
            down: false,
            since: None,
        }
    }

    fn failed(&mut self, err: &dyn Display) {
        if self.down {
            tracing::debug!(what = %self.what, error = %err, "etcd still failing");
        } else {
            self.down = true;
            tracing::warn!(what = %self.what, error = %err, "etcd failing; retrying with backoff");
            if let Some(Ok(mut since)) = self.since.as_ref().map(|s| s.lock()) {
                since.get_or_insert_with(SystemTime::now);
            }
        }
    }

    fn recovered(&mut self) {
        if self.down {
            self.down = false;
            tracing::info!(what = %self.what, "etcd reachable again");
            if let Some(Ok(mut since)) = self.since.as_ref().map(|s| s.lock()) {
                *since = None;
            }
        }
    }
}

enum WatchEnd {
    ReceiverGone,
    Compacted,
    Broken(String),
}

/// Feeds one watch receiver for as long as it exists, across broken streams and compactions.
async fn watch_loop(core: Core, prefix: String, mut next: Revision, tx: mpsc::Sender<WatchEvent>) {
    let mut backoff = Backoff::new();
    let mut outage = Outage::new(format!("watch {}{prefix}", core.prefix));
    outage.since = Some(core.watch_down_since.clone());
    loop {
        let end = tokio::select! {
            _ = tx.closed() => return,
            end = watch_stream(&core, &prefix, &mut next, &tx, &mut backoff, &mut outage) => end,
        };
        match end {
            WatchEnd::ReceiverGone => return,
            WatchEnd::Broken(error) => {
                outage.failed(&error);
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
            WatchEnd::Compacted => {
                tracing::info!(prefix = %prefix, from = next, "watch history compacted; relisting");
                let listing = loop {
                    match core.list(&prefix).await {
                        Ok(listing) => break listing,
                        Err(error) => {
                            outage.failed(&error);
                            tokio::select! {
                                _ = tx.closed() => return,
                                _ = tokio::time::sleep(backoff.next_delay()) => {}
                            }
                        }
                    }
                };
                next = listing.revision + 1;
                if tx.send(WatchEvent::Reset(listing)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One watch stream from `next` on, advancing `next` past every response fully delivered, so
/// the following stream resumes exactly where this one broke.
async fn watch_stream(
    core: &Core,
    prefix: &str,
    next: &mut Revision,
    tx: &mpsc::Sender<WatchEvent>,
    backoff: &mut Backoff,
    outage: &mut Outage,
) -> WatchEnd {
    let (key, end) = core.range(prefix);
    let options = WatchOptions::new()
        .with_range(end)
        .with_start_revision(*next)
        // Lets a quiet prefix advance `next`, so a reconnect after a compaction needs no relist.
        .with_progress_notify();
    let mut client = core.client.watch_client();
    let sent = core.login_generation();
    // The crate asserts that etcd's first answer creates the watch; in a task of its own that
    // assertion (should a server ever break it) costs one retry instead of this watch.
    let mut create = tokio::spawn(async move { client.watch(key, Some(options)).await });
    let (_watcher, mut stream) = match tokio::time::timeout(REQUEST_TIMEOUT, &mut create).await {
        Ok(Ok(Ok(created))) => created,
        Ok(Ok(Err(e))) if is_compacted(&e) => return WatchEnd::Compacted,
        Ok(Ok(Err(e))) => return WatchEnd::Broken(core.fail(e, sent).await.to_string()),
        Ok(Err(e)) => return WatchEnd::Broken(format!("creating the watch failed: {e}")),
        Err(_) => {
            create.abort();
            return WatchEnd::Broken(timeout_error().to_string());
        }
    };
    outage.recovered();
    let created = Instant::now();
    let end = async {
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return WatchEnd::Broken("watch stream ended".into()),
                Err(e) if is_compacted(&e) => return WatchEnd::Compacted,
                Err(e) => return WatchEnd::Broken(core.fail(e, sent).await.to_string()),
            };
            if response.compact_revision() > 0 {
                return WatchEnd::Compacted;
            }
            if response.canceled() {
                let reason = response.cancel_reason();
                if reason.contains("compacted") {
                    return WatchEnd::Compacted;
                }
                return WatchEnd::Broken(format!("etcd cancelled the watch: {reason}"));
            }
            if response.events().is_empty() {
                // A progress notification: everything up to its revision was delivered. (Only
                // without events: with events, the header may run ahead of the batch.)
                if !response.created() {
                    if let Some(header) = response.header() {
                        *next = (*next).max(header.revision() + 1);
                    }
                }
                continue;
            }
            // etcd never splits one revision across responses (we ask for no fragments), so a
            // stream breaking between responses leaves no revision half-delivered.
            let mut last = *next - 1;
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(key) = core.rel(kv.key()) else {
                    continue;
                };
                last = last.max(kv.mod_revision());
                let event = match event.event_type() {
                    EventType::Put => WatchEvent::Put(KeyValue {
                        key,
                        value: kv.value().to_vec(),
                        create_revision: kv.create_revision(),
                        mod_revision: kv.mod_revision(),
                    }),
                    EventType::Delete => WatchEvent::Delete {
                        key,
                        revision: kv.mod_revision(),
                    },
                };
                if tx.send(event).await.is_err() {
                    return WatchEnd::ReceiverGone;
                }
            }
            *next = last + 1;
        }
    }
    .await;
    // A stream that lived a while was a working connection, whatever ended it; one that etcd
    // ends right after creating it must not be retried at full speed.
    if created.elapsed() >= BACKOFF_MAX {
        backoff.reset();
    }
    end
}

enum KeepEnd {
    LeaseGone(i64),
    Broken(String),
}

/// Keeps the session lease alive until aborted by `close`/drop; re-grants it and re-puts the
/// bound records if etcd let it expire.
async fn keep_session(core: Core, session: Arc<Mutex<Session>>, lease_lost: Arc<Notify>) {
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
