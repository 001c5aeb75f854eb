//! The etcd backend, for clusters: every host talks to the same etcd, so records written by one
//! are seen by all, and a host's records go away with its lease when it dies.
//!
//! The etcd-client crate leaves a lot to the caller (see shared/PITFALLS.md): it reconnects
//! neither watch nor lease keep-alive streams, it cannot decode a response above 4 MiB, and its
//! per-request timeout ends once response headers arrive, so it does not bound the messages of a
//! stream. So every request here runs under our own timeout, lists are paged and pinned to one
//! revision, and background tasks re-establish watches and the session lease themselves.
//!
//! The module is split by concern: `client` (the client, keys and paged lists, logging in again),
//! `txn` (transactions and the bound-record bookkeeping), `session` (the host lease: renewal,
//! re-grant, re-put), `watch` (watches that survive broken streams and compaction), `retry`
//! (backoff and outage logging) and `error` (how etcd's failures map onto `StoreError`).

mod client;
mod error;
mod retry;
mod session;
mod txn;
mod watch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use etcd_client::{Client, ConnectOptions, GetOptions};
use tokio::sync::{mpsc, Mutex, Notify};
use tokio::task::JoinHandle;

use self::client::{timed, timeout_error, Core, Login};
use self::error::{is_lease_gone, map_connect_err, once_more_if_token_refused};
use self::session::{keep_session, Session};
use self::watch::watch_loop;
use super::{KeyValue, Listing, Result, Revision, Store, StoreError, Txn, TxnOutcome, WatchEvent};

/// Long enough for a loaded cluster, short enough that the daemon reports an unreachable etcd at
/// startup instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Our own bound on every request, stream messages and the wait for the session lock included:
/// callers would rather get `Unavailable` and decide themselves than wait for etcd to return.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// etcd's default `--max-txn-ops`; refusing here gives a clearer error than etcd's.
const MAX_TXN_OPS: usize = 128;
const WATCH_CHANNEL: usize = 1024;
/// A watch stream carries no traffic of its own while a prefix is quiet; HTTP/2 pings are what
/// notice a peer that vanished without closing the connection. etcd refuses pings more often
/// than every 5 s (`--grpc-keepalive-min-time`), and pings with no stream open at all.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(10);
const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(5);

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

    /// etcd's answer for one key, as it is (with its lease, which `KeyValue` leaves out).
    async fn get_one(&self, key: &str) -> Result<etcd_client::GetResponse> {
        self.check_open()?;
        once_more_if_token_refused(|| async {
            let mut kv = self.core.client.kv_client();
            self.core.call(kv.get(self.core.abs(key), None)).await
        })
        .await
    }

    fn stop_tasks(&self) {
        self.tasks().drain(..).for_each(|t| t.abort());
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
        let response = self.get_one(key).await?;
        Ok(response.kvs().first().and_then(|kv| self.core.convert(kv)))
    }

    /// From the key's lease: etcd reports the TTL it granted and what is left of it, and a
    /// renewal resets what is left, so their difference is the time since the last renewal
    /// (to the second, etcd's unit).
    async fn last_renewed(&self, key: &str) -> Result<Option<SystemTime>> {
        let response = self.get_one(key).await?;
        let lease = match response.kvs().first() {
            Some(kv) if kv.lease() != 0 => kv.lease(),
            _ => return Ok(None),
        };
        let ttl = once_more_if_token_refused(|| async {
            let mut leases = self.core.client.lease_client();
            self.core.call(leases.time_to_live(lease, None)).await
        })
        .await?;
        // A lease that ran out is reported with TTL -1; its records are about to vanish.
        if ttl.ttl() < 0 {
            return Ok(None);
        }
        let since = Duration::from_secs((ttl.granted_ttl() - ttl.ttl()).max(0) as u64);
        Ok(SystemTime::now().checked_sub(since))
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
