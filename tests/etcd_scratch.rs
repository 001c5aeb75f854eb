//! Scratch tests for the etcd backend (to be replaced by the shared store suite).

mod support;

use std::time::{Duration, Instant};

use flux::store::etcd::EtcdStore;
use flux::store::{Cond, Op, Store, StoreError, Txn, WatchEvent};
use support::etcd::Etcd;
use tokio::sync::mpsc;

fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("flux=debug")
        .with_test_writer()
        .try_init();
}

async fn store(etcd: &Etcd) -> EtcdStore {
    EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), "/flux/")
        .await
        .expect("connect")
}

async fn next(rx: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("watch event in time")
        .expect("watch still open")
}

fn put(key: &str, value: &str, bound: bool) -> Op {
    Op::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        bound,
    }
}

fn etcd_pid(etcd: &Etcd) -> String {
    for entry in std::fs::read_dir("/proc").unwrap() {
        let path = entry.unwrap().path();
        let Ok(cmd) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.starts_with("etcd\0") && cmd.contains(&etcd.endpoint) {
            return path.file_name().unwrap().to_string_lossy().into_owned();
        }
    }
    panic!("etcd pid not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_get_list_paged() {
    init_log();
    let etcd = Etcd::start();
    let s = store(&etcd).await;
    etcd.ctl(&["put", "/other/x", "1"]);
    etcd.ctl(&["put", "/flux", "just-the-prefix-without-slash"]);
    let mut last = 0;
    for chunk in 0..13 {
        let ops: Vec<Op> = (0..100)
            .map(|i| put(&format!("svc/{:05}", chunk * 100 + i), "v", false))
            .collect();
        let out = s
            .txn(Txn {
                when: vec![],
                then: ops,
            })
            .await
            .unwrap();
        assert!(out.succeeded);
        assert!(out.revision > last);
        last = out.revision;
    }
    s.put("svd", b"x".to_vec()).await.unwrap();
    let listing = s.list("svc/").await.unwrap();
    assert_eq!(listing.kvs.len(), 1300);
    assert_eq!(listing.revision, last + 1);
    let keys: Vec<_> = listing.kvs.iter().map(|kv| kv.key.clone()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    assert_eq!(keys[0], "svc/00000");
    assert_eq!(keys[1299], "svc/01299");
    let all = s.list("").await.unwrap();
    assert_eq!(all.kvs.len(), 1301);
    let kv = s.get("svc/00042").await.unwrap().unwrap();
    assert_eq!(kv.value, b"v");
    assert_eq!(kv.create_revision, kv.mod_revision);
    assert!(s.get("nope").await.unwrap().is_none());
    // Raw layout in etcd.
    assert!(etcd.ctl(&["get", "/flux/svd"]).contains("x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn txn_conditions_and_limits() {
    init_log();
    let etcd = Etcd::start();
    let s = store(&etcd).await;
    let r1 = s.put("a", b"1".to_vec()).await.unwrap();
    let absent = s
        .txn(Txn {
            when: vec![Cond::Absent("a".into())],
            then: vec![put("b", "x", false)],
        })
        .await
        .unwrap();
    assert!(!absent.succeeded);
    assert_eq!(absent.revision, r1);
    assert!(s.get("b").await.unwrap().is_none());
    let ok = s
        .txn(Txn {
            when: vec![Cond::Exists("a".into()), Cond::ModRevision("a".into(), r1)],
            then: vec![put("b", "x", false), put("a", "2", false)],
        })
        .await
        .unwrap();
    assert!(ok.succeeded);
    assert_eq!(ok.revision, r1 + 1);
    assert!(!s
        .compare_and_swap("a", Some(r1), b"3".to_vec())
        .await
        .unwrap());
    assert!(s
        .compare_and_swap("a", Some(r1 + 1), b"3".to_vec())
        .await
        .unwrap());
    assert!(s.compare_and_swap("c", None, b"c".to_vec()).await.unwrap());
    assert!(!s.compare_and_swap("c", None, b"c".to_vec()).await.unwrap());
    assert!(s.delete("c").await.unwrap());
    assert!(!s.delete("c").await.unwrap());
    s.put("p/1", b"".to_vec()).await.unwrap();
    s.put("p/2", b"".to_vec()).await.unwrap();
    s.put("q", b"".to_vec()).await.unwrap();
    let out = s
        .txn(Txn {
            when: vec![],
            then: vec![Op::DeletePrefix("p/".into())],
        })
        .await
        .unwrap();
    assert!(out.succeeded);
    assert!(s.list("p/").await.unwrap().kvs.is_empty());
    assert!(s.get("q").await.unwrap().is_some());

    let too_many = (0..129).map(|i| put(&format!("k{i}"), "", false)).collect();
    assert!(matches!(
        s.txn(Txn {
            when: vec![],
            then: too_many
        })
        .await,
        Err(StoreError::Invalid(_))
    ));
    let max = (0..128).map(|i| put(&format!("k{i}"), "", false)).collect();
    assert!(
        s.txn(Txn {
            when: vec![],
            then: max
        })
        .await
        .unwrap()
        .succeeded
    );
    assert!(matches!(
        s.txn(Txn {
            when: vec![],
            then: vec![put("bound", "x", true)]
        })
        .await,
        Err(StoreError::Invalid(_))
    ));
    let big = vec![b'x'; 1_700_000];
    let e = s.put("big", big).await.unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
    let huge = vec![b'x'; 3_000_000];
    let e = s.put("huge", huge).await.unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
    let dup = s
        .txn(Txn {
            when: vec![],
            then: vec![put("d", "1", false), put("d", "2", false)],
        })
        .await
        .unwrap_err();
    println!("duplicate keys in one txn: {dup:?}");
    // Still usable afterwards.
    s.put("after", b"1".to_vec()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_events_compaction_and_restart() {
    init_log();
    let mut etcd = Etcd::start();
    let s = store(&etcd).await;
    let r0 = s.put("w/a", b"1".to_vec()).await.unwrap();
    let mut rx = s.watch("w/", r0 + 1).await.unwrap();
    let mut now_rx = s.watch("w/", 0).await.unwrap();
    let r1 = s.put("w/b", b"2".to_vec()).await.unwrap();
    s.put("x/outside", b"".to_vec()).await.unwrap();
    let r2 = s.put("w/a", b"3".to_vec()).await.unwrap();
    assert!(s.delete("w/b").await.unwrap());
    let out = s
        .txn(Txn {
            when: vec![],
            then: vec![Op::DeletePrefix("w/".into())],
        })
        .await
        .unwrap();
    for rx in [&mut rx, &mut now_rx] {
        match next(rx).await {
            WatchEvent::Put(kv) => {
                assert_eq!(
                    (kv.key.as_str(), kv.mod_revision, kv.create_revision),
                    ("w/b", r1, r1)
                )
            }
            e => panic!("{e:?}"),
        }
        match next(rx).await {
            WatchEvent::Put(kv) => {
                assert_eq!(
                    (kv.key.as_str(), kv.value.as_slice(), kv.mod_revision),
                    ("w/a", &b"3"[..], r2)
                );
                assert_eq!(kv.create_revision, r0);
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(
            next(rx).await,
            WatchEvent::Delete {
                key: "w/b".into(),
                revision: r2 + 1
            }
        );
        assert_eq!(
            next(rx).await,
            WatchEvent::Delete {
                key: "w/a".into(),
                revision: out.revision
            }
        );
    }
    drop(now_rx);

    // Restart: events written while the watch is disconnected must still arrive, in order.
    let mut expected = Vec::new();
    for i in 0..3 {
        let r = s.put(&format!("w/pre{i}"), b"x".to_vec()).await.unwrap();
        expected.push(("w/pre".to_string() + &i.to_string(), r));
    }
    for (k, r) in &expected {
        match next(&mut rx).await {
            WatchEvent::Put(kv) => assert_eq!((&kv.key, kv.mod_revision), (k, *r)),
            e => panic!("{e:?}"),
        }
    }
    etcd.stop();
    let t = Instant::now();
    let e = s.put("w/down", b"x".to_vec()).await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(7), "{:?}", t.elapsed());
    assert!(matches!(
        s.list("w/").await,
        Err(StoreError::Unavailable(_))
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| etcd.restart());
    // Written by someone else before our watch is back.
    etcd.ctl(&["put", "/flux/w/during1", "a"]);
    etcd.ctl(&["put", "/flux/w/during2", "b"]);
    etcd.ctl(&["del", "/flux/w/during1"]);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next(&mut rx).await);
    }
    assert!(
        matches!(&got[0], WatchEvent::Put(kv) if kv.key == "w/during1"),
        "{got:?}"
    );
    assert!(
        matches!(&got[1], WatchEvent::Put(kv) if kv.key == "w/during2"),
        "{got:?}"
    );
    assert!(
        matches!(&got[2], WatchEvent::Delete { key, .. } if key == "w/during1"),
        "{got:?}"
    );
    // Our own writes work again (the client reconnects).
    let t = Instant::now();
    loop {
        match s.put("w/after", b"y".to_vec()).await {
            Ok(_) => break,
            Err(e) if t.elapsed() < Duration::from_secs(15) => {
                println!("after restart: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(matches!(next(&mut rx).await, WatchEvent::Put(kv) if kv.key == "w/after"));

    // Compaction: a watch from revision 1 gets a Reset with the current state, then events.
    let head = s.put("w/z", b"z".to_vec()).await.unwrap();
    assert!(matches!(next(&mut rx).await, WatchEvent::Put(kv) if kv.key == "w/z"));
    etcd.ctl(&["compact", &head.to_string()]);
    let mut old = s.watch("w/", 1).await.unwrap();
    match next(&mut old).await {
        WatchEvent::Reset(listing) => {
            let keys: Vec<_> = listing.kvs.iter().map(|kv| kv.key.as_str()).collect();
            assert_eq!(
                keys,
                ["w/after", "w/during2", "w/pre0", "w/pre1", "w/pre2", "w/z"]
            );
            assert_eq!(listing.revision, head);
        }
        e => panic!("{e:?}"),
    }
    let r = s.put("w/new", b"n".to_vec()).await.unwrap();
    assert!(
        matches!(next(&mut old).await, WatchEvent::Put(kv) if kv.key == "w/new" && kv.mod_revision == r)
    );
    assert!(matches!(next(&mut rx).await, WatchEvent::Put(kv) if kv.key == "w/new"));

    // Closing ends the watches and refuses further calls.
    s.close(true).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap();
    assert!(end.is_none());
    assert!(tokio::time::timeout(Duration::from_secs(5), old.recv())
        .await
        .unwrap()
        .is_none());
    assert!(matches!(s.get("w/new").await, Err(StoreError::Closed)));
    assert!(matches!(s.watch("w/", 0).await, Err(StoreError::Closed)));
    assert!(matches!(
        s.put("w/x", vec![]).await,
        Err(StoreError::Closed)
    ));
    s.close(true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_ends_when_receiver_dropped_and_store_dropped() {
    init_log();
    let etcd = Etcd::start();
    let s = store(&etcd).await;
    let rx = s.watch("a/", 0).await.unwrap();
    drop(rx);
    s.put("a/1", vec![]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.start_session(Duration::from_secs(2)).await.unwrap();
    s.txn(Txn {
        when: vec![],
        then: vec![put("a/b", "1", true)],
    })
    .await
    .unwrap();
    drop(s);
    // Dropping without close stops renewing like close(false).
    let other = store(&etcd).await;
    assert!(other.get("a/b").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(other.get("a/b").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bound_records_and_close() {
    init_log();
    let etcd = Etcd::start();
    let observer = store(&etcd).await;

    // close(false): records stay until the TTL runs out.
    let s = store(&etcd).await;
    s.start_session(Duration::from_secs(2)).await.unwrap();
    assert!(matches!(
        s.start_session(Duration::from_secs(2)).await,
        Err(StoreError::Invalid(_))
    ));
    s.txn(Txn {
        when: vec![],
        then: vec![put("h/1", "a", true), put("h/plain", "p", false)],
    })
    .await
    .unwrap();
    // Renewals keep it alive past the TTL.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(observer.get("h/1").await.unwrap().is_some());
    let mut rx = observer.watch("h/", 0).await.unwrap();
    s.close(false).await.unwrap();
    assert!(observer.get("h/1").await.unwrap().is_some());
    let t = Instant::now();
    match next(&mut rx).await {
        WatchEvent::Delete { key, .. } => assert_eq!(key, "h/1"),
        e => panic!("{e:?}"),
    }
    println!("bound record expired {:?} after close(false)", t.elapsed());
    assert!(t.elapsed() >= Duration::from_millis(500));
    assert!(observer.get("h/plain").await.unwrap().is_some());

    // close(true): records go at once.
    let s = store(&etcd).await;
    s.start_session(Duration::from_secs(30)).await.unwrap();
    s.txn(Txn {
        when: vec![],
        then: vec![put("h/2", "b", true), put("h/3", "c", true)],
    })
    .await
    .unwrap();
    assert_eq!(observer.list("h/").await.unwrap().kvs.len(), 3);
    s.close(true).await.unwrap();
    let keys: Vec<_> = observer
        .list("h/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["h/plain"]);
}

/// Lease lost while this host keeps running (revoked by someone else, or etcd frozen past the
/// TTL): a new lease is granted and the bound records come back, with their latest values,
/// minus the ones deleted or overwritten unbound meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_regranted_and_records_reput() {
    init_log();
    let mut etcd = Etcd::start();
    let observer = store(&etcd).await;
    let s = store(&etcd).await;
    s.start_session(Duration::from_secs(2)).await.unwrap();
    let mut ops: Vec<Op> = (0..120)
        .map(|i| put(&format!("r/{i:03}"), "v1", true))
        .collect();
    ops.push(put("r/gone", "x", true));
    ops.push(put("r/unbound", "x", true));
    ops.push(put("s/1", "x", true));
    s.txn(Txn {
        when: vec![],
        then: ops,
    })
    .await
    .unwrap();
    s.txn(Txn {
        when: vec![],
        then: vec![
            put("r/000", "v2", true),
            Op::Delete("r/gone".into()),
            put("r/unbound", "u", false),
            Op::DeletePrefix("s/".into()),
        ],
    })
    .await
    .unwrap();
    s.txn(Txn {
        when: vec![],
        then: (0..120)
            .map(|i| put(&format!("t/{i:03}"), "t", true))
            .collect(),
    })
    .await
    .unwrap();
    let expect_count = observer.list("").await.unwrap().kvs.len();
    assert_eq!(expect_count, 241);

    // 1. Revoked from outside.
    let leases = etcd.ctl(&["lease", "list"]);
    let id = leases.lines().nth(1).unwrap().trim().to_string();
    etcd.ctl(&["lease", "revoke", &id]);
    assert_eq!(observer.list("").await.unwrap().kvs.len(), 1);
    let t = Instant::now();
    while observer.list("").await.unwrap().kvs.len() < expect_count {
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("records back {:?} after an outside revoke", t.elapsed());
    let kv = observer.get("r/000").await.unwrap().unwrap();
    assert_eq!(kv.value, b"v2");
    assert!(observer.get("r/gone").await.unwrap().is_none());
    assert!(observer.get("s/1").await.unwrap().is_none());
    let new_id = etcd.ctl(&["lease", "list"]);
    assert!(!new_id.contains(&id), "{new_id}");

    // 2. etcd frozen for longer than the TTL (a partition, from etcd's side).
    let pid = etcd_pid(&etcd);
    let mut rx = observer.watch("r/", 0).await.unwrap();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    // The records disappear (lease expired) and come back.
    let mut deleted = 0;
    let mut put_back = 0;
    let t = Instant::now();
    while put_back < 120 {
        match next(&mut rx).await {
            WatchEvent::Delete { .. } => deleted += 1,
            WatchEvent::Put(_) => put_back += 1,
            WatchEvent::Reset(_) => panic!("reset"),
        }
    }
    println!(
        "freeze: {deleted} deletes, {put_back} re-puts within {:?}",
        t.elapsed()
    );
    assert_eq!(deleted, 120);
    let t = Instant::now();
    while observer.list("").await.unwrap().kvs.len() < expect_count {
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // New bound writes work under the new lease.
    let t = Instant::now();
    loop {
        match s
            .txn(Txn {
                when: vec![],
                then: vec![put("r/late", "l", true)],
            })
            .await
        {
            Ok(_) => break,
            Err(e) if t.elapsed() < Duration::from_secs(10) => {
                println!("{e}");
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }

    // 3. etcd killed for longer than the TTL and restarted: etcd 3.4 extends leases on
    // restart, so either the lease survives or it is re-granted; the records must be there.
    etcd.stop();
    tokio::time::sleep(Duration::from_secs(6)).await;
    tokio::task::block_in_place(|| etcd.restart());
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(observer.list("").await.unwrap().kvs.len(), expect_count + 1);

    s.close(true).await.unwrap();
    assert_eq!(observer.list("").await.unwrap().kvs.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_to_nothing_is_unavailable() {
    let port = support::etcd::free_port();
    let t = Instant::now();
    let e = EtcdStore::connect(&[format!("127.0.0.1:{port}")], "/flux/")
        .await
        .err()
        .unwrap();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(7));
    let e = EtcdStore::connect(&[], "/flux/").await.err().unwrap();
    assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
}

/// Progress notifications advance the resume point of a quiet watch, so after a compaction a
/// reconnect needs no Reset; and they never make it skip events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn progress_notify_advances_quiet_watch() {
    init_log();
    let dir = tempfile::tempdir().unwrap();
    let (cp, pp) = (support::etcd::free_port(), support::etcd::free_port());
    let endpoint = format!("http://127.0.0.1:{cp}");
    let spawn = || {
        std::process::Command::new("etcd")
            .args(["--name", "p", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{pp}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{pp}"),
            ])
            .args(["--initial-cluster", &format!("p=http://127.0.0.1:{pp}")])
            .arg("--experimental-watch-progress-notify-interval=300ms")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = spawn();
    let s = loop {
        match EtcdStore::connect(std::slice::from_ref(&endpoint), "/flux/").await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let mut rx = s.watch("quiet/", 0).await.unwrap();
    s.put("quiet/a", b"1".to_vec()).await.unwrap();
    assert!(matches!(next(&mut rx).await, WatchEvent::Put(kv) if kv.key == "quiet/a"));
    let mut head = 0;
    for i in 0..200 {
        head = s.put(&format!("busy/{i}"), b"x".to_vec()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.put("busy/last", b"x".to_vec()).await.unwrap();
    let compact_to = head;
    let ctl = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &endpoint, "compact", &compact_to.to_string()])
        .output()
        .unwrap();
    assert!(ctl.status.success());
    child.kill().unwrap();
    child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut child = spawn();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    loop {
        match s.put("quiet/b", b"2".to_vec()).await {
            Ok(_) => break,
            Err(_) if t.elapsed() < Duration::from_secs(15) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    // Without progress tracking this would be a Reset (the watch resumed from before the
    // compaction); with it, just the event.
    match next(&mut rx).await {
        WatchEvent::Put(kv) => assert_eq!(kv.key, "quiet/b"),
        e => panic!("{e:?}"),
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Concurrent bound writes and deletes while the lease is revoked from outside: in the end etcd
/// holds exactly what this host last wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_bound_writes_survive_lease_loss() {
    init_log();
    let etcd = Etcd::start();
    let s = std::sync::Arc::new(store(&etcd).await);
    s.start_session(Duration::from_secs(3)).await.unwrap();
    let mut workers = Vec::new();
    for w in 0..4 {
        let s = s.clone();
        workers.push(tokio::spawn(async move {
            let mut mine = std::collections::BTreeMap::new();
            for i in 0..150u32 {
                let key = format!("c/{w}/{}", i % 17);
                let op = if i % 5 == 4 {
                    Op::Delete(key.clone())
                } else {
                    put(&key, &i.to_string(), true)
                };
                loop {
                    match s
                        .txn(Txn {
                            when: vec![],
                            then: vec![op.clone()],
                        })
                        .await
                    {
                        Ok(_) => break,
                        Err(StoreError::Unavailable(_)) => {
                            tokio::time::sleep(Duration::from_millis(50)).await
                        }
                        Err(e) => panic!("{e:?}"),
                    }
                }
                match op {
                    Op::Delete(k) => {
                        mine.remove(&k);
                    }
                    Op::Put { key, value, .. } => {
                        mine.insert(key, value);
                    }
                    _ => unreachable!(),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            mine
        }));
    }
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let leases = etcd.ctl(&["lease", "list"]);
        if let Some(id) = leases.lines().nth(1) {
            etcd.ctl(&["lease", "revoke", id.trim()]);
        }
    }
    let mut expected = std::collections::BTreeMap::new();
    for w in workers {
        expected.extend(w.await.unwrap());
    }
    let t = Instant::now();
    loop {
        let got: std::collections::BTreeMap<_, _> = s
            .list("c/")
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect();
        if got == expected {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{got:?}\n{expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.close(true).await.unwrap();
    let other = store(&etcd).await;
    assert!(other.list("c/").await.unwrap().kvs.is_empty());
}
