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

#[test]
fn info_lists_the_live_hosts_with_last_seen_and_instance_counts() {
    let etcd = Etcd::start();
    // Last seen is the last renewal of the host's lease, a third of its TTL apart: host-a
    // renews every second, host-b every 2.3 s.
    let a = Fluxd::etcd(
        &etcd.endpoint,
        "host-a",
        &["--host-ip", "192.0.2.1", "--host-ttl", "4"],
    );
    let mut b = Fluxd::etcd(
        &etcd.endpoint,
        "host-b",
        &["--host-ip", "192.0.2.2", "--host-ttl", "8"],
    );
    a.ok(&["service", "add", "web", "--address", "10.128.0.1:80"]);
    // An instance host-b's agent would have enrolled, written as the agent writes it.
    let instance = r#"{"service":"web","name":"0123456789ab","origin":"container","host":"host-b","rule":"all","container":{"id":"0123456789abcdef","name":"web1","image":"docker.io/library/nginx","tag":"latest"},"address":"192.0.2.2:32768"}"#;
    etcd.ctl(&["put", "/flux/instances/web/0123456789ab", instance]);

    let seen_ago = |hosts: &serde_json::Value, name: &str| -> u64 {
        let h = hosts
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {hosts}"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        now.saturating_sub(h["last_seen_unix_ms"].as_u64().expect("last seen"))
    };
    let hosts = a.json(&["hosts"]);
    assert_eq!(hosts.as_array().unwrap().len(), 2, "{hosts}");
    assert!(seen_ago(&hosts, "host-a") < 3000, "{hosts}");
    assert!(seen_ago(&hosts, "host-b") < 4000, "{hosts}");
    let b_view = &hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "host-b")
        .unwrap();
    assert_eq!(b_view["ip"], "192.0.2.2");
    assert_eq!(b_view["instances"], 1);
    assert_eq!(b_view["version"], env!("CARGO_PKG_VERSION"));

    let info = a.ok(&["info"]);
    let row = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}: {info}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert!(info.starts_with("HOST"), "{info}");
    assert_eq!(row("host-a")[1], "192.0.2.1", "{info}");
    assert_eq!(row("host-b")[1], "192.0.2.2", "{info}");
    assert!(
        row("host-b")[2].ends_with('s') && row("host-b")[3] == "ago",
        "{info}"
    );
    assert_eq!(row("host-b")[4], "1", "{info}");
    assert_eq!(row("host-a")[4], "0", "{info}");
    assert!(info.contains("service web"), "{info}");
    // `info --json` is still the list of services that scripts read.
    let json = a.json(&["info"]);
    assert_eq!(json[0]["name"], "web", "{json}");

    // A host that died is still listed until its TTL runs out, and its last sighting ages
    // while the live host's stays fresh.
    b.kill();
    std::thread::sleep(Duration::from_secs(4));
    let hosts = a.json(&["hosts"]);
    assert!(seen_ago(&hosts, "host-b") >= 3500, "{hosts}");
    assert!(seen_ago(&hosts, "host-a") < 3000, "{hosts}");
}
