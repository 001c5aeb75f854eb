//! What every request needs: the client and the key prefix, our own deadline on each request,
//! paged lists pinned to one revision, and logging in again when etcd forgot our token.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{Client, GetOptions};
use tokio::sync::Mutex;

use crate::store::{KeyValue, Listing, Result, Revision, StoreError};

use super::error::{is_compacted, is_token_refused, map_err};
use super::REQUEST_TIMEOUT;

/// Keeps each list response far below the crate's 4 MiB decode limit.
const PAGE_SIZE: i64 = 500;
/// Requests that failed together with one stale token share one fresh login.
const RELOGIN_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// What the background tasks need, cheap to clone into them.
#[derive(Clone)]
pub(super) struct Core {
    pub(super) client: Client,
    pub(super) prefix: String,
    /// Since when the watches have been failing, `None` while they work: readers of the
    /// followed catalog (the UI, `fluxctl`) say their picture may be stale.
    pub(super) watch_down_since: Arc<std::sync::Mutex<Option<SystemTime>>>,
    /// The etcd user to log in as again when etcd no longer knows our token.
    pub(super) login: Option<Arc<Login>>,
}

/// etcd forgets every token it issued when it restarts (the default "simple" tokens live in its
/// memory) and when a token's `--auth-token-ttl` runs out; etcd-client 0.15 logs in only once,
/// at connect. So the user and password are kept, and any request that etcd refuses for its
/// token logs in again (once for all the requests that failed together); the request's own
/// retry, or the background task's next round, then succeeds.
pub(super) struct Login {
    pub(super) user: String,
    pub(super) password: String,
    /// Bumped by every successful login: a request sent before the latest login that etcd
    /// refused for its (old) token needs no login of its own, however late its answer came.
    pub(super) generation: std::sync::atomic::AtomicU64,
    /// When a login was last tried, held across the attempt: one at a time, and none within
    /// `RELOGIN_MIN_INTERVAL` of the last (etcd may still be electing, or the password changed).
    pub(super) last_try: Mutex<Option<Instant>>,
}

impl Core {
    /// Which login a request about to be sent goes out under (0 without a user).
    pub(super) fn login_generation(&self) -> u64 {
        self.login
            .as_ref()
            .map_or(0, |l| l.generation.load(Ordering::SeqCst))
    }

    /// etcd's error as a `StoreError`, after logging in again if etcd refused our token; `sent`
    /// is the `login_generation` the request went out under.
    pub(super) async fn fail(&self, e: etcd_client::Error, sent: u64) -> StoreError {
        self.login_again_if_refused(&e, sent).await;
        map_err(e)
    }

    /// A request under our deadline; a refused token is handled as `fail` does.
    pub(super) async fn call<T>(
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
    pub(super) async fn login_again(&self, sent: u64) {
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

    pub(super) fn abs(&self, key: &str) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(self.prefix.as_bytes());
        full.extend_from_slice(key.as_bytes());
        full
    }

    pub(super) fn rel(&self, key: &[u8]) -> Option<String> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        Some(String::from_utf8_lossy(rest).into_owned())
    }

    /// `[key, end)` covering every key under the relative prefix. etcd rejects an empty key, so
    /// "everything" (empty store prefix and empty prefix) becomes its `"\0"`..`"\0"` form.
    pub(super) fn range(&self, prefix: &str) -> (Vec<u8>, Vec<u8>) {
        let key = self.abs(prefix);
        if key.is_empty() {
            return (vec![0], vec![0]);
        }
        let end = prefix_end(&key);
        (key, end)
    }

    pub(super) fn convert(&self, kv: &etcd_client::KeyValue) -> Option<KeyValue> {
        Some(KeyValue {
            key: self.rel(kv.key())?,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
        })
    }

    pub(super) async fn current_revision(&self) -> Result<Revision> {
        let mut kv = self.client.kv_client();
        let response = self
            .call(kv.get(self.abs(""), Some(GetOptions::new().with_count_only())))
            .await?;
        Ok(response.header().map(|h| h.revision()).unwrap_or_default())
    }

    /// A compaction between two pages makes the pinned revision unreadable; the whole list is
    /// then taken again at a newer revision.
    pub(super) async fn list(&self, prefix: &str) -> Result<Listing> {
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
pub(super) async fn timed<T>(
    request: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<std::result::Result<T, etcd_client::Error>> {
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| timeout_error())
}

pub(super) fn timeout_error() -> StoreError {
    StoreError::Unavailable(format!("etcd did not answer within {REQUEST_TIMEOUT:?}"))
}
