//! Issue 2 acceptance on etcd: two fluxd processes (own sockets and state) share one real etcd.

mod support;

use std::time::Duration;

use support::etcd::Etcd;
use support::fluxd::{wait_until, Fluxd};

#[test]
fn two_daemons_see_the_same_services_within_a_second() {
    let etcd = Etcd::start();
    let a = Fluxd::etcd(&etcd.endpoint, "host-a", &[]);
    let b = Fluxd::etcd(&etcd.endpoint, "host-b", &[]);
    a.ok(&["service", "add", "web", "--address", "10.128.0.1:80"]);
    let seen = wait_until(Duration::from_secs(1), || {
        b.ok(&["list"]).contains("10.128.0.1:80")
    });
    assert!(seen.is_some(), "b did not see the service within 1 s");
    b.ok(&["select", "web", "v1", "--image", "nginx"]);
    let info = a.json(&["info", "web"]);
    assert_eq!(info[0]["rules"][0]["name"], "v1");
    // The VIP claim is shared too: b cannot take a's address.
    let out = b.ctl(&["service", "add", "other", "--address", "10.128.0.1:80"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn host_record_follows_daemon_liveness() {
    let etcd = Etcd::start();
    let host_key = |h: &str| format!("/flux/hosts/{h}");
    let present = |h: &str| etcd.ctl(&["get", &host_key(h), "--keys-only"]).contains(h);

    let mut a = Fluxd::etcd(&etcd.endpoint, "host-a", &["--host-ttl", "3"]);
    let mut b = Fluxd::etcd(&etcd.endpoint, "host-b", &["--host-ttl", "3"]);
    assert!(present("host-a") && present("host-b"));

    // Clean stop: removed at once.
    a.stop();
    assert!(
        !present("host-a"),
        "host-a still registered after a clean stop"
    );

    // SIGKILL: gone within the TTL.
    b.kill();
    let gone = wait_until(Duration::from_secs(3), || !present("host-b"));
    assert!(
        gone.is_some(),
        "host-b still registered 3 s after SIGKILL with TTL 3 s"
    );
    eprintln!(
        "host-b vanished {:?} after SIGKILL (ttl 3 s)",
        gone.unwrap()
    );
}
