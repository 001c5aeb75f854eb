//! One suite for both store backends. Every test is a generic async fn over a [`Backend`];
//! `suite!` instantiates each once for the embedded store and once for a real etcd, so the two
//! backends are held to the same semantics (the module docs of `flux::store`). The few tests
//! that only make sense for one backend sit at the end.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flux::store::embedded::EmbeddedStore;
use flux::store::etcd::EtcdStore;
use flux::store::{
    Cond, KeyValue, Listing, Op, Revision, Store, StoreError, Txn, TxnOutcome, WatchEvent,
};
use support::etcd::Etcd;
use tokio::sync::mpsc;
use tokio::time::timeout;

type TestResult = Result<(), StoreError>;

/// How long any single wait for the store may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);

/// Session TTL for the host-bound tests: etcd's shortest (it rounds smaller TTLs up to about
/// 2 s), so the tests stay quick on both backends.
const TTL: Duration = Duration::from_secs(2);

/// Slack after the TTL before a bound record must be gone: etcd checks expiry every 500 ms and
/// the last renewal may land just before close; the embedded reaper runs every 250 ms.
const TTL_MARGIN: Duration = Duration::from_secs(3);

/// Where one test's data lives. `open` gives a new handle on the same data each time; the
/// embedded store allows one handle at a time, so tests close or drop a handle before opening
/// the next, which is also what a restarted fluxd does.
enum Backend {
    Embedded(tempfile::TempDir),
    /// A private etcd per test (compaction is cluster-wide), under a prefix named after the test.
    Etcd {
        etcd: Etcd,
        prefix: String,
    },
}

impl Backend {
    fn embedded() -> Backend {
        Backend::Embedded(tempfile::tempdir().expect("temporary directory"))
    }

    async fn etcd(test: &str) -> Backend {
        let etcd = tokio::task::spawn_blocking(Etcd::start)
            .await
            .expect("starting etcd");
        Backend::Etcd {
            etcd,
            prefix: format!("/flux-test/{test}/"),
        }
    }

    async fn open(&self) -> Result<Arc<dyn Store>, StoreError> {
        Ok(match self {
            Backend::Embedded(dir) => Arc::new(EmbeddedStore::open(dir.path()).await?),
            Backend::Etcd { etcd, prefix } => {
                Arc::new(EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), prefix).await?)
            }
        })
    }

    /// Makes every revision before the current one unavailable to watches, the way each
    /// backend loses history in production: etcd compacts, the embedded store restarts.
    async fn forget_history(&self, store: Arc<dyn Store>) -> Result<Arc<dyn Store>, StoreError> {
        match self {
            Backend::Embedded(_) => {
                store.close(false).await?;
                drop(store);
                self.open().await
            }
            Backend::Etcd { etcd, .. } => {
                let revision = store.list("").await?.revision;
                let out = etcd.ctl(&["compact", &revision.to_string()]);
                assert!(out.contains("compacted"), "etcdctl compact said: {out:?}");
                Ok(store)
            }
        }
    }
}

/// Instantiates each generic test for both backends. A test may name a runtime flavour in
/// parentheses, e.g. `name(flavor = "multi_thread")`; the default is tokio's current-thread
/// runtime, which also proves the backends do not need a second worker to make progress.
macro_rules! suite {
    ($($test:ident $(($($flavor:tt)*))?),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test $(($($flavor)*))?]
                async fn $test() {
                    let backend = super::Backend::embedded();
                    if let Err(e) = super::$test(&backend).await {
                        panic!("store error: {e}");
                    }
                }
            )*
        }

        mod etcd {
            $(
                #[tokio::test $(($($flavor)*))?]
                async fn $test() {
                    let backend = super::Backend::etcd(stringify!($test)).await;
                    if let Err(e) = super::$test(&backend).await {
                        panic!("store error: {e}");
                    }
                }
            )*
        }
    };
}

suite! {
    get_put_delete,
    list_is_sorted_by_prefix_with_store_revision,
    list_returns_more_than_a_thousand_keys,
    txn_applies_all_when_every_condition_holds,
    txn_applies_nothing_when_any_condition_fails,
    txn_refuses_bad_requests,
    compare_and_swap_checks_the_revision,
    delete_prefix_deletes_only_that_prefix,
    watch_from_a_revision_replays_then_follows,
    list_then_watch_misses_nothing(flavor = "multi_thread", worker_threads = 2),
    slow_watcher_still_converges,
    watch_from_lost_history_resets,
    bound_put_needs_a_session,
    bound_records_outlive_close_false_for_their_ttl,
    bound_records_vanish_at_once_on_close_true,
    closed_store_refuses_calls_and_ends_watches,
    data_survives_reopen,
    data_survives_drop_without_close,
    a_service_edit_keeps_or_moves_its_vip_claim_in_one_transaction,
}

// ---- helpers ----------------------------------------------------------------------------------

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_string(),
        value: value.as_bytes().to_vec(),
        bound: false,
    }
}

fn bound_put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_string(),
        value: value.as_bytes().to_vec(),
        bound: true,
    }
}

/// Runs operations unconditionally and returns the outcome.
async fn apply(store: &dyn Store, then: Vec<Op>) -> Result<TxnOutcome, StoreError> {
    store.txn(Txn { when: vec![], then }).await
}

fn put_event(
    key: &str,
    value: &str,
    create_revision: Revision,
    mod_revision: Revision,
) -> WatchEvent {
    WatchEvent::Put(KeyValue {
        key: key.to_string(),
        value: value.as_bytes().to_vec(),
        create_revision,
        mod_revision,
    })
}

fn delete_event(key: &str, revision: Revision) -> WatchEvent {
    WatchEvent::Delete {
        key: key.to_string(),
        revision,
    }
}

fn keys(listing: &Listing) -> Vec<&str> {
    listing.kvs.iter().map(|kv| kv.key.as_str()).collect()
}

async fn value(store: &dyn Store, key: &str) -> Result<Option<String>, StoreError> {
    let kv = store.get(key).await?;
    Ok(kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

async fn next_event(rx: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
    match timeout(WAIT, rx.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("the watch ended"),
        Err(_) => panic!("no watch event within {WAIT:?}"),
    }
}

/// Fails if the watch delivers anything within `quiet`.
async fn no_event(rx: &mut mpsc::Receiver<WatchEvent>, quiet: Duration) {
    if let Ok(event) = timeout(quiet, rx.recv()).await {
        panic!("expected no watch event, got {event:?}");
    }
}

/// What a watcher knows: key -> record, rebuilt from a listing plus events, the way the
/// catalog uses a watch.
#[derive(Debug, Default)]
struct Mirror {
    kvs: BTreeMap<String, KeyValue>,
    /// The revision of the last event or reset applied.
    revision: Revision,
}

impl Mirror {
    fn from_listing(listing: &Listing) -> Mirror {
        let mut mirror = Mirror::default();
        mirror.reset(listing);
        mirror
    }

    fn reset(&mut self, listing: &Listing) {
        assert!(
            listing.revision >= self.revision,
            "reset to revision {} after {}",
            listing.revision,
            self.revision
        );
        self.kvs = listing
            .kvs
            .iter()
            .map(|kv| (kv.key.clone(), kv.clone()))
            .collect();
        self.revision = listing.revision;
    }

    /// Applies one event, checking that revisions only move forward.
    fn apply(&mut self, event: WatchEvent) {
        let revision = match &event {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
            WatchEvent::Reset(listing) => listing.revision,
        };
        assert!(
            revision >= self.revision,
            "event at revision {revision} after {}: {event:?}",
            self.revision
        );
        match event {
            WatchEvent::Put(kv) => {
                self.kvs.insert(kv.key.clone(), kv);
            }
            WatchEvent::Delete { key, .. } => {
                assert!(self.kvs.remove(&key).is_some(), "delete of unknown {key}");
            }
            WatchEvent::Reset(listing) => self.reset(&listing),
        }
        self.revision = revision;
    }

    /// Applies events until the mirror holds exactly what `target` holds at its revision.
    /// Several events can share a revision, so reaching the revision alone is not enough.
    async fn follow_to(&mut self, rx: &mut mpsc::Receiver<WatchEvent>, target: &Listing) {
        let expected: BTreeMap<String, KeyValue> = target
            .kvs
            .iter()
            .map(|kv| (kv.key.clone(), kv.clone()))
            .collect();
        while self.revision != target.revision || self.kvs != expected {
            match timeout(WAIT, rx.recv()).await {
                Ok(Some(event)) => self.apply(event),
                Ok(None) => panic!("the watch ended at revision {}", self.revision),
                Err(_) => panic!(
                    "watch stalled at revision {} (target {}) with {} of {} keys matching",
                    self.revision,
                    target.revision,
                    expected
                        .iter()
                        .filter(|(k, v)| self.kvs.get(*k) == Some(v))
                        .count(),
                    expected.len()
                ),
            }
            assert!(
                self.revision <= target.revision,
                "watch went past revision {}",
                target.revision
            );
        }
    }
}

// ---- reads and writes -------------------------------------------------------------------------

async fn get_put_delete(backend: &Backend) -> TestResult {
    let store = backend.open().await?;
    assert_eq!(store.get("k").await?, None);

    let r1 = store.put("k", b"one".to_vec()).await?;
    let kv = store.get("k").await?.expect("k after its first put");
    let first = KeyValue {
        key: "k".into(),
        value: b"one".to_vec(),
        create_revision: r1,
        mod_revision: r1,
    };
    assert_eq!(kv, first);

    let r2 = store.put("k", b"two".to_vec()).await?;
    assert!(r2 > r1, "revision {r2} after {r1}");
    let kv = store.get("k").await?.expect("k after its second put");
    assert_eq!((kv.create_revision, kv.mod_revision), (r1, r2));
    assert_eq!(kv.value, b"two");

    assert!(store.delete("k").await?, "delete of an existing key");
    assert_eq!(store.get("k").await?, None);
    assert!(!store.delete("k").await?, "delete of a missing key");

    // A key created again starts a new life: its create revision is the new write's.
    let r3 = store.put("k", b"three".to_vec()).await?;
    let kv = store.get("k").await?.expect("k after re-creation");
    assert_eq!((kv.create_revision, kv.mod_revision), (r3, r3));
    store.close(true).await
}

async fn list_is_sorted_by_prefix_with_store_revision(backend: &Backend) -> TestResult {
    let store = backend.open().await?;
    let mut last = 0;
    for key in ["svc/b", "svc/c/x", "svd/a", "svc/a", "sv", "svc"] {
        last = store.put(key, key.as_bytes().to_vec()).await?;
    }
    let listing = store.list("svc/").await?;
    assert_eq!(keys(&listing), ["svc/a", "svc/b", "svc/c/x"]);
    assert_eq!(listing.revision, last);
    for kv in &listing.kvs {
        assert_eq!(kv.value, kv.key.as_bytes());
    }

    assert_eq!(
        store.list("nothing/").await?,
        Listing {
            kvs: vec![],
            revision: last
        }
    );

    // The listing carries the store revision, not the newest revision under the prefix.
    let later = store.put("svd/b", b"x".to_vec()).await?;
    assert_eq!(store.list("svc/").await?.revision, later);
    store.close(true).await
}

async fn list_returns_more_than_a_thousand_keys(backend: &Backend) -> TestResult {
    const N: usize = 2_500;
    let store = backend.open().await?;
    // Written in a scrambled order (7919 is prime, so this visits every i once).
    let order: Vec<usize> = (0..N).map(|i| i * 7919 % N).collect();
    let mut last = 0;
    for batch in order.chunks(100) {
        let ops = batch
            .iter()
            .map(|i| put(&format!("many/{i:05}"), &i.to_string()))
            .collect();
        last = apply(&*store, ops).await?.revision;
    }
    store.put("many0", b"outside".to_vec()).await?;

    let listing = store.list("many/").await?;
    assert_eq!(listing.kvs.len(), N);
    assert!(listing.revision > last);
    for (i, kv) in listing.kvs.iter().enumerate() {
        assert_eq!(kv.key, format!("many/{i:05}"));
        assert_eq!(kv.value, i.to_string().as_bytes());
    }
    store.close(true).await
}

// ---- transactions -----------------------------------------------------------------------------

async fn txn_applies_all_when_every_condition_holds(backend: &Backend) -> TestResult {
    let store = backend.open().await?;
    let ra = store.put("t/a", b"a".to_vec()).await?;
    let out = store
        .txn(Txn {
            when: vec![
                Cond::Exists("t/a".into()),
                Cond::Absent("t/b".into()),
                Cond::ModRevision("t/a".into(), ra),
            ],
            then: vec![
                put("t/b", "b"),
                put("t/c", "c"),
                Op::Delete("t/a".into()),
                Op::Delete("t/missing".into()),
            ],
        })
        .await?;
    assert!(out.succeeded);
    assert!(out.revision > ra);
    // One transaction is one revision, shared by all of its changes.
    for key in ["t/b", "t/c"] {
        let kv = store.get(key).await?.expect("written by the transaction");
        assert_eq!(kv.mod_revision, out.revision, "{key}");
    }
    assert_eq!(store.get("t/a").await?, None);
    assert_eq!(store.list("").await?.revision, out.revision);
    store.close(true).await
}

async fn txn_applies_nothing_when_any_condition_fails(backend: &Backend) -> TestResult {
    let store = backend.open().await?;
    apply(&*store, vec![put("f/a", "a"), put("f/other", "o")]).await?;
    let ra = store.get("f/a").await?.expect("f/a").mod_revision;
    let failing = [
        Cond::Absent("f/a".into()),
        Cond::Exists("f/missing".into()),
        Cond::ModRevision("f/a".into(), ra + 1000),
    ];
    for cond in failing {
        let out = store
            .txn(Txn {
                // Conditions that hold around the failing one: one failure is enough.
                when: vec![
                    Cond::Exists("f/a".into()),
                    cond.clone(),
                    Cond::ModRevision("f/a".into(), ra),
                ],
                then: vec![
                    put("f/new", "x"),
                    put("f/a", "changed"),
                    Op::Delete("f/other".into()),
                ],
            })
            .await?;
        assert!(!out.succeeded, "{cond:?} must fail");
        assert_eq!(
            out.revision, ra,
            "a failed transaction must not move the revision"
        );
        assert_eq!(store.get("f/new").await?, None, "{cond:?}");
        assert_eq!(
            value(&*store, "f/a").await?.as_deref(),
            Some("a"),
            "{cond:?}"
        );
        assert!(store.get("f/other").await?.is_some(), "{cond:?}");
    }
    assert_eq!(store.list("").await?.revision, ra);
    store.close(true).await
}

async fn txn_refuses_bad_requests(backend: &Backend) -> TestResult {
    let store = backend.open().await?;
    let refused = [
        vec![put("r/a", "1"), put("r/a", "2")],
        vec![put("r/a", "1"), Op::Delete("r/a".into())],
        vec![put("r/x/a", "1"), Op::DeletePrefix("r/x/".into())],
        (0..200).map(|i| put(&format!("r/{i}"), "v")).collect(),
    ];
    for then in refused {
        let summary = format!("{:?}", then.first());
        match apply(&*store, then).await {
            Err(StoreError::Invalid(_)) => {}
            other => panic!("{summary}...: expected Invalid, got {other:?}"),
        }
    }
    assert_eq!(store.list("r/").await?.kvs, vec![]);
    store.close(true).await
}

async fn compare_and_swap_checks_the_revision(backend: &Backend) -> TestResult {
    let store = backend.open().await?;
    assert!(store.compare_and_swap("cas", None, b"1".to_vec()).await?);
    assert!(!store.compare_and_swap("cas", None, b"x".to_vec()).await?);
    let rev = store.get("cas").await?.expect("cas").mod_revision;
    assert!(
        !store
            .compare_and_swap("cas", Some(rev + 1000), b"x".to_vec())
            .await?
    );
    assert!(
        store
            .compare_and_swap("cas", Some(rev), b"2".to_vec())
            .await?
    );
    assert!(
        !store
            .compare_and_swap("cas", Some(rev), b"3".to_vec())
            .await?,
        "stale revision"
    );
    assert_eq!(value(&*store, "cas").await?.as_deref(), Some("2"));
    store.close(true).await
}

async fn delete_prefix_deletes_only_that_prefix(backend: &Backend) -> TestResult {
    let store = backend.open().await?;
    apply(
        &*store,
        ["p/a", "p/b", "p/c/d", "p", "pq", "q/a"]
            .iter()
            .map(|k| put(k, k))
            .collect(),
    )
    .await?;
    let before = store.list("").await?.revision;
    let mut rx = store.watch("p", before + 1).await?;

    let out = apply(&*store, vec![Op::DeletePrefix("p/".into())]).await?;
    assert!(out.succeeded);
    assert_eq!(
        out.revision,
        before + 1,
        "one revision for the whole prefix"
    );
    assert_eq!(keys(&store.list("").await?), ["p", "pq", "q/a"]);

    let mut deleted = BTreeSet::new();
    for _ in 0..3 {
        match next_event(&mut rx).await {
            WatchEvent::Delete { key, revision } => {
                assert_eq!(revision, out.revision);
                deleted.insert(key);
            }
            other => panic!("expected a delete, got {other:?}"),
        }
    }
    assert_eq!(
        deleted,
        BTreeSet::from(["p/a".into(), "p/b".into(), "p/c/d".into()])
    );
    no_event(&mut rx, Duration::from_millis(300)).await;

    // Nothing left under the prefix: the delete succeeds and changes nothing.
    let again = apply(&*store, vec![Op::DeletePrefix("p/".into())]).await?;
    assert_eq!(again.revision, out.revision);
    store.close(true).await
}

// ---- watches ----------------------------------------------------------------------------------

async fn watch_from_a_revision_replays_then_follows(backend: &Backend) -> TestResult {
    let store = backend.open().await?;
    let r1 = store.put("w/a", b"1".to_vec()).await?;
    let r2 = store.put("w/b", b"2".to_vec()).await?;
    store.put("other/x", b"not watched".to_vec()).await?;
    let r3 = apply(&*store, vec![Op::Delete("w/a".into())])
        .await?
        .revision;

    let mut from_r2 = store.watch("w/", r2).await?;
    let mut from_r1 = store.watch("w/", r1).await?;
    assert_eq!(
        next_event(&mut from_r2).await,
        put_event("w/b", "2", r2, r2)
    );
    assert_eq!(next_event(&mut from_r2).await, delete_event("w/a", r3));

    let r4 = store.put("w/c", b"3".to_vec()).await?;
    assert_eq!(
        next_event(&mut from_r2).await,
        put_event("w/c", "3", r4, r4)
    );
    no_event(&mut from_r2, Duration::from_millis(300)).await;

    let expected = [
        put_event("w/a", "1", r1, r1),
        put_event("w/b", "2", r2, r2),
        delete_event("w/a", r3),
        put_event("w/c", "3", r4, r4),
    ];
    for event in expected {
        assert_eq!(next_event(&mut from_r1).await, event);
    }
    store.close(true).await
}

async fn list_then_watch_misses_nothing(backend: &Backend) -> TestResult {
    const WRITES: usize = 400;
    let store = backend.open().await?;
    let writer = tokio::spawn({
        let store = Arc::clone(&store);
        async move {
            for i in 0..WRITES {
                let key = format!("c/{}", i % 37);
                if i % 5 == 4 {
                    store.delete(&key).await?;
                } else {
                    store.put(&key, i.to_string().into_bytes()).await?;
                }
            }
            Ok::<_, StoreError>(())
        }
    });

    // Start while the writer is busy, so writes land between the list and the watch.
    timeout(WAIT, async {
        while store.list("c/").await.map_or(0, |l| l.kvs.len()) < 5 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the writer made no progress");
    let listing = store.list("c/").await?;
    let mut rx = store.watch("c/", listing.revision + 1).await?;
    let mut mirror = Mirror::from_listing(&listing);

    timeout(WAIT * 3, writer)
        .await
        .expect("writer finished")
        .expect("writer task")?;
    let last = store.list("c/").await?;
    assert!(
        last.revision > listing.revision,
        "writes landed after the list"
    );
    mirror.follow_to(&mut rx, &last).await;
    store.close(true).await
}

async fn slow_watcher_still_converges(backend: &Backend) -> TestResult {
    let store = backend.open().await?;
    let start = store.list("lag/").await?;
    let mut rx = store.watch("lag/", start.revision + 1).await?;
    // 3,000 events while nobody reads: more than any reasonable channel holds, so the backend
    // must either buffer or drop and Reset; either way the reader must end up right.
    for round in 0..30 {
        let ops = (0..100)
            .map(|k| put(&format!("lag/{k:03}"), &round.to_string()))
            .collect();
        apply(&*store, ops).await?;
    }
    let last = store.list("lag/").await?;
    let mut mirror = Mirror::from_listing(&start);
    mirror.follow_to(&mut rx, &last).await;
    store.close(true).await
}

async fn watch_from_lost_history_resets(backend: &Backend) -> TestResult {
    let store = backend.open().await?;
    let r1 = store.put("h/a", b"1".to_vec()).await?;
    store.put("h/b", b"2".to_vec()).await?;
    store.delete("h/a").await?;
    store.put("other/x", b"x".to_vec()).await?;

    let store = backend.forget_history(store).await?;
    let listing = store.list("h/").await?;
    let mut rx = store.watch("h/", r1).await?;
    match next_event(&mut rx).await {
        WatchEvent::Reset(snapshot) => assert_eq!(snapshot, listing),
        other => panic!("expected a Reset, got {other:?}"),
    }
    let r = store.put("h/c", b"3".to_vec()).await?;
    assert_eq!(next_event(&mut rx).await, put_event("h/c", "3", r, r));

    // Starting right after the current revision needs no history: no Reset, just new events.
    let mut fresh = store.watch("h/", r + 1).await?;
    let r = store.put("h/d", b"4".to_vec()).await?;
    assert_eq!(next_event(&mut fresh).await, put_event("h/d", "4", r, r));
    store.close(true).await
}

// ---- host sessions ----------------------------------------------------------------------------

async fn bound_put_needs_a_session(backend: &Backend) -> TestResult {
    let store = backend.open().await?;
    match apply(&*store, vec![bound_put("hosts/h1", "x")]).await {
        Err(StoreError::Invalid(_)) => {}
        other => panic!("bound put without a session: expected Invalid, got {other:?}"),
    }
    assert_eq!(store.get("hosts/h1").await?, None);
    store.close(true).await
}

async fn bound_records_outlive_close_false_for_their_ttl(backend: &Backend) -> TestResult {
    let host = backend.open().await?;
    host.start_session(TTL).await?;
    apply(
        &*host,
        vec![bound_put("hosts/h1", "up"), put("hosts/static", "kept")],
    )
    .await?;
    host.close(false).await?;
    drop(host);

    // Another handle (after a restart, for the embedded store) still sees the record: to
    // others a stopped process looks like one that may be alive until its TTL runs out.
    let closed_at = Instant::now();
    let store = backend.open().await?;
    let listing = store.list("hosts/").await?;
    assert_eq!(keys(&listing), ["hosts/h1", "hosts/static"]);
    let mut rx = store.watch("hosts/", listing.revision + 1).await?;
    match timeout(TTL + TTL_MARGIN, rx.recv()).await {
        Ok(Some(WatchEvent::Delete { key, revision })) => {
            assert_eq!(key, "hosts/h1");
            assert!(revision > listing.revision);
        }
        Ok(other) => panic!("expected the bound record's delete, got {other:?}"),
        Err(_) => panic!(
            "bound record still there {:?} after close",
            TTL + TTL_MARGIN
        ),
    }
    assert!(
        closed_at.elapsed() >= TTL / 4,
        "bound record removed after {:?}, well before its TTL",
        closed_at.elapsed()
    );
    assert_eq!(store.get("hosts/h1").await?, None);
    assert_eq!(
        value(&*store, "hosts/static").await?.as_deref(),
        Some("kept")
    );
    store.close(true).await
}

async fn bound_records_vanish_at_once_on_close_true(backend: &Backend) -> TestResult {
    let host = backend.open().await?;
    host.start_session(TTL).await?;
    apply(
        &*host,
        vec![bound_put("hosts/h1", "up"), put("hosts/static", "kept")],
    )
    .await?;
    // A record written again without `bound` is no longer tied to the session.
    apply(&*host, vec![bound_put("hosts/unbound", "up")]).await?;
    apply(&*host, vec![put("hosts/unbound", "kept")]).await?;
    host.close(true).await?;
    drop(host);

    let store = backend.open().await?;
    assert_eq!(
        keys(&store.list("hosts/").await?),
        ["hosts/static", "hosts/unbound"]
    );
    store.close(true).await
}

// ---- lifecycle --------------------------------------------------------------------------------

async fn closed_store_refuses_calls_and_ends_watches(backend: &Backend) -> TestResult {
    let store = backend.open().await?;
    let rev = store.put("x/a", b"1".to_vec()).await?;
    let mut rx = store.watch("x/", rev + 1).await?;
    store.close(true).await?;

    match timeout(WAIT, rx.recv()).await {
        Ok(None) => {}
        Ok(Some(event)) => panic!("event after close: {event:?}"),
        Err(_) => panic!("watch still open {WAIT:?} after close"),
    }
    assert!(matches!(store.get("x/a").await, Err(StoreError::Closed)));
    assert!(matches!(store.list("x/").await, Err(StoreError::Closed)));
    assert!(matches!(
        store.put("x/b", vec![]).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        store.watch("x/", 0).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        store.start_session(TTL).await,
        Err(StoreError::Closed)
    ));
    Ok(())
}

async fn data_survives_reopen(backend: &Backend) -> TestResult {
    let store = backend.open().await?;
    store.put("d/a", b"1".to_vec()).await?;
    store.put("d/b", b"2".to_vec()).await?;
    store.put("d/a", b"3".to_vec()).await?;
    store.delete("d/b").await?;
    store.put("d/c", b"4".to_vec()).await?;
    let before = store.list("").await?;
    store.close(false).await?;
    drop(store);

    let store = backend.open().await?;
    assert_eq!(
        store.list("").await?,
        before,
        "records, revisions and store revision"
    );
    let next = store.put("d/d", b"5".to_vec()).await?;
    assert!(next > before.revision, "revisions continue after a restart");
    store.close(true).await
}

async fn data_survives_drop_without_close(backend: &Backend) -> TestResult {
    let store = backend.open().await?;
    apply(&*store, vec![put("d/a", "1"), put("d/b", "2")]).await?;
    store.delete("d/a").await?;
    let before = store.list("").await?;
    drop(store);

    let store = backend.open().await?;
    assert_eq!(store.list("").await?, before);
    let next = store.put("d/c", b"3".to_vec()).await?;
    assert!(next > before.revision);
    store.close(true).await
}

/// `fluxctl service set` over this backend: the record and its VIP claim change in one
/// transaction; a taken VIP or an invalid result writes nothing; the new fields round-trip.
async fn a_service_edit_keeps_or_moves_its_vip_claim_in_one_transaction(
    backend: &Backend,
) -> TestResult {
    use flux::catalog::{keys, Catalog, CatalogError};
    use flux::model::{self, Service, ServiceEdit};
    let store = backend.open().await?;
    let catalog = Catalog::new(store.clone());
    let service = |json: &str| model::decode::<Service>(json.as_bytes()).expect("a valid service");
    let edit = |json: &str| model::decode::<ServiceEdit>(json.as_bytes()).expect("a valid edit");
    let ok = |_: &Service| -> Result<(), model::InvalidInput> { Ok(()) };
    let add = |s: Service| {
        let catalog = catalog.clone();
        async move {
            match catalog.add_service(&s).await {
                Ok(()) => Ok(()),
                Err(CatalogError::Store(e)) => Err(e),
                Err(e) => panic!("add refused: {e}"),
            }
        }
    };
    add(service(
        r#"{"name":"web","address":"198.18.0.1:80","health":{"kind":"tcp"}}"#,
    ))
    .await?;
    add(service(r#"{"name":"db","address":"198.18.0.2:5432"}"#)).await?;

    // Same VIP: the claim stays as it was, only the record changes.
    let claim_before = store
        .get(&keys::vip(&"198.18.0.1:80".parse().unwrap()))
        .await?;
    let edited = catalog
        .edit_service(
            "web",
            &edit(r#"{"balance":"random","health":null,"proxy_protocol":"v2","timeouts":{"connect_ms":300}}"#),
            ok,
        )
        .await
        .expect("edited");
    let loaded = catalog.load().await.expect("loads");
    assert_eq!(*loaded.services["web"], edited, "new fields round-trip");
    assert_eq!(edited.health, None);
    assert_eq!(
        store
            .get(&keys::vip(&"198.18.0.1:80".parse().unwrap()))
            .await?,
        claim_before,
        "the kept claim is not rewritten"
    );

    // A VIP that another service holds: refused, nothing written.
    let before = store.list("").await?;
    let e = catalog
        .edit_service("web", &edit(r#"{"address":"198.18.0.2:5432"}"#), ok)
        .await
        .expect_err("the VIP is db's");
    assert_eq!(
        e.to_string(),
        r#"address: already used by service db (got "198.18.0.2:5432")"#
    );
    // An edit whose result does not validate: refused, nothing written.
    let e = catalog
        .edit_service("web", &edit(r#"{"protocol":"http"}"#), ok)
        .await
        .expect_err("http with a PROXY header");
    assert!(e.to_string().starts_with("proxy_protocol: "), "{e}");
    assert_eq!(store.list("").await?, before);

    // A free VIP: the old claim goes and the new one comes, with the record, in one revision.
    catalog
        .edit_service("web", &edit(r#"{"address":"198.18.0.3:8080"}"#), ok)
        .await
        .expect("moved");
    let after = store.list("").await?;
    let names: Vec<&str> = after.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        names,
        [
            "services/db",
            "services/web",
            "vips/198.18.0.2:5432",
            "vips/198.18.0.3:8080"
        ]
    );
    assert_eq!(after.revision, before.revision + 1, "one transaction");
    let claim = &after.kvs[3];
    assert_eq!(claim.value, b"web");
    assert_eq!(claim.mod_revision, after.kvs[1].mod_revision);
    // The old VIP is free for another service.
    add(service(r#"{"name":"api","address":"198.18.0.1:80"}"#)).await?;

    // Locality and affinity are editable; moving to kernel forwarding is refused while a rule
    // has a weight the kernel cannot honour, and nothing is written.
    let edited = catalog
        .edit_service(
            "api",
            &edit(r#"{"locality":"prefer-host","affinity":"client-ip"}"#),
            ok,
        )
        .await
        .expect("edited");
    assert_eq!(
        *catalog.load().await.expect("loads").services["api"],
        edited
    );
    catalog
        .put_rule(
            &model::decode(
                br#"{"service":"db","name":"canary","selector":{"tag":"2"},"weight":10}"#,
            )
            .expect("a valid rule"),
        )
        .await
        .expect("rule written");
    let before = store.list("").await?;
    let e = catalog
        .edit_service("db", &edit(r#"{"forward":"kernel"}"#), ok)
        .await
        .expect_err("weight 10 under kernel forwarding");
    assert!(
        e.to_string()
            .starts_with("forward: rule canary has weight 10;"),
        "{e}"
    );
    assert_eq!(store.list("").await?, before);

    let e = catalog
        .edit_service("nope", &edit(r#"{"balance":"random"}"#), ok)
        .await
        .expect_err("no such service");
    assert!(matches!(e, CatalogError::NotFound(_)), "{e}");
    store.close(true).await
}

// ---- embedded only ----------------------------------------------------------------------------

/// Behaviour only the embedded store has: a file that one process owns at a time, and drop as
/// the model of a crash.
mod embedded_only {
    use super::*;

    /// Set in the environment of the child process `torn_write_leaves_old_or_new_state` kills.
    const CRASH_DIR: &str = "FLUX_STORE_SUITE_CRASH_DIR";

    #[tokio::test]
    async fn open_is_exclusive_until_close() -> TestResult {
        let dir = tempfile::tempdir().expect("temporary directory");
        let first = EmbeddedStore::open(dir.path()).await?;
        match EmbeddedStore::open(dir.path()).await {
            Err(StoreError::Storage(msg)) => assert!(msg.contains("already open"), "{msg}"),
            Err(e) => panic!("expected a Storage error saying already open, got {e}"),
            Ok(_) => panic!("a second open of the same store succeeded"),
        }
        first.close(false).await?;
        let second = EmbeddedStore::open(dir.path()).await?;
        drop(second);
        EmbeddedStore::open(dir.path()).await?.close(true).await
    }

    #[tokio::test]
    async fn bound_records_outlive_a_crash_for_their_ttl() -> TestResult {
        let dir = tempfile::tempdir().expect("temporary directory");
        let host = EmbeddedStore::open(dir.path()).await?;
        host.start_session(TTL).await?;
        apply(&host, vec![bound_put("hosts/h1", "up")]).await?;
        drop(host);

        let restarted = Instant::now();
        let store = EmbeddedStore::open(dir.path()).await?;
        assert!(
            store.get("hosts/h1").await?.is_some(),
            "gone before its TTL"
        );
        timeout(TTL + TTL_MARGIN, async {
            while store.get("hosts/h1").await?.is_some() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok::<_, StoreError>(())
        })
        .await
        .expect("bound record outlived its TTL after the restart")?;
        assert!(
            restarted.elapsed() >= TTL,
            "removed after {:?}",
            restarted.elapsed()
        );
        store.close(true).await
    }

    #[tokio::test]
    async fn dead_session_records_expire_while_a_new_session_lives() -> TestResult {
        let dir = tempfile::tempdir().expect("temporary directory");
        let host = EmbeddedStore::open(dir.path()).await?;
        host.start_session(TTL).await?;
        apply(&host, vec![bound_put("hosts/dead", "up")]).await?;
        drop(host);

        // The restarted process opens its own session at once; the dead one's records must
        // still go, and the new one's must stay.
        let host = EmbeddedStore::open(dir.path()).await?;
        host.start_session(Duration::from_secs(60)).await?;
        apply(&host, vec![bound_put("hosts/live", "up")]).await?;
        timeout(TTL + TTL_MARGIN, async {
            while host.get("hosts/dead").await?.is_some() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok::<_, StoreError>(())
        })
        .await
        .expect("the dead session's record outlived its TTL")?;
        assert!(
            host.get("hosts/live").await?.is_some(),
            "the live session's record was reaped"
        );
        host.close(true).await
    }

    /// Kills a process that is committing transactions as fast as it can, then checks that
    /// the store opens at some whole transaction: each one writes both keys of a pair with the
    /// same value, so a torn write would show as a mismatch.
    #[tokio::test]
    async fn torn_write_leaves_old_or_new_state() -> TestResult {
        let dir = tempfile::tempdir().expect("temporary directory");
        for round in 0..10 {
            let mut child =
                std::process::Command::new(std::env::current_exe().expect("test binary"))
                    .args([
                        "--exact",
                        "embedded_only::crash_child_writer",
                        "--nocapture",
                        "--test-threads=1",
                    ])
                    .env(CRASH_DIR, dir.path())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("starting the writer child");
            let stdout = child.stdout.take().expect("piped stdout");
            // Kill it after a varying number of commits, to land at different points of a write.
            let progressed = tokio::task::spawn_blocking(move || {
                use std::io::BufRead;
                std::io::BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                    .filter(|line| line.starts_with("committed"))
                    .nth(5 + 3 * round)
                    .is_some()
            });
            let progressed = timeout(WAIT, progressed).await;
            child.kill().expect("killing the writer child");
            child.wait().expect("reaping the writer child");
            assert!(
                matches!(progressed, Ok(Ok(true))),
                "round {round}: the child never committed"
            );

            let store = EmbeddedStore::open(dir.path()).await?;
            let listing = store.list("pair/").await?;
            assert_eq!(keys(&listing), ["pair/a", "pair/b"], "round {round}");
            let (a, b) = (&listing.kvs[0], &listing.kvs[1]);
            assert_eq!(a.value, b.value, "round {round}: torn transaction");
            assert_eq!(a.mod_revision, b.mod_revision, "round {round}");
            assert_eq!(
                listing.revision, a.mod_revision,
                "round {round}: revision counter"
            );
            store.close(false).await?;
        }
        Ok(())
    }

    /// Not a test on its own: the writer process `torn_write_leaves_old_or_new_state` starts
    /// and kills. Without its environment variable it does nothing.
    #[tokio::test]
    async fn crash_child_writer() -> TestResult {
        let Some(dir) = std::env::var_os(CRASH_DIR) else {
            return Ok(());
        };
        let store = EmbeddedStore::open(std::path::Path::new(&dir)).await?;
        for i in 0u64.. {
            let v = i.to_string();
            // Big enough values that a commit spans several pages.
            let v = v.repeat(20_000 / v.len());
            apply(&store, vec![put("pair/a", &v), put("pair/b", &v)]).await?;
            println!("committed {i}");
        }
        Ok(())
    }
}
