//! `fluxctl service set` (issue 16): a service changes in place while clients keep connecting to
//! its VIP, with no failed connection while the balance, the health check or the protocol
//! changes; a new address serves and the old one no longer does afterwards; refusals change nothing.
//! fluxd, its data plane, the backends and the clients run inside namespaces the tests create.

mod support;

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::fluxd::{wait_until, Fluxd};
use support::http_backend::{Client, HttpBackend};
use support::netns::Netns;

const VIP: &str = "198.18.0.10:80";
const NEW_VIP: &str = "198.18.0.11:8080";
const TAKEN_VIP: &str = "198.18.0.12:80";

/// Bounds of the client loop: whichever comes first.
const MAX_REQUESTS: usize = 2_000;
const MAX_LOOP: Duration = Duration::from_secs(20);

/// One request on a fresh connection through `vip`: the backend's name, or why it failed.
fn request(vip: SocketAddrV4) -> Result<String, String> {
    Client::connect(vip)
        .and_then(|mut c| c.get("web"))
        .map_err(|e| e.to_string())
        .and_then(|m| match m.status() {
            200 => Ok(m.header("x-backend").to_string()),
            s => Err(format!("status {s}")),
        })
}

/// A bounded client loop inside `ns` until `stop`: every answer, in order.
fn client_loop(
    ns: &Netns,
    vip: SocketAddrV4,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Result<String, String>>> {
    ns.spawn(move || {
        let deadline = Instant::now() + MAX_LOOP;
        let mut answers = Vec::new();
        while !stop.load(Ordering::SeqCst)
            && Instant::now() < deadline
            && answers.len() < MAX_REQUESTS
        {
            answers.push(request(vip));
            std::thread::sleep(Duration::from_millis(2));
        }
        answers
    })
}

fn info(fluxd: &Fluxd) -> serde_json::Value {
    fluxd.json(&["info", "web"])[0].clone()
}

fn edits_under_a_client_loop(steering: &str) {
    let ns = Netns::new("edit");
    let a = HttpBackend::start(&ns, "a", 9000, 200);
    let b = HttpBackend::start(&ns, "b", 9001, 200);
    let fluxd = Fluxd::dataplane(&ns.name, &["--steering", steering]);
    fluxd.ok(&["service", "add", "web", "--address", VIP]);
    fluxd.add_instance("web", "a", a.addr);
    fluxd.add_instance("web", "b", b.addr);
    fluxd.wait_routed("web");
    let vip: SocketAddrV4 = VIP.parse().unwrap();

    // A connection opened before the edits, kept alive through all of them.
    let mut kept = ns.run(move || Client::connect(vip).unwrap());
    assert_eq!(kept.get("web").unwrap().status(), 200);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = client_loop(&ns, vip, stop.clone());
    let edits: [&[&str]; 8] = [
        &["--balance", "random"],
        &[
            "--health",
            "http:/healthz",
            "--health-interval",
            "200ms",
            "--health-timeout",
            "100ms",
        ],
        // The backends speak HTTP: the same VIP goes from spliced bytes to per-request balancing.
        &["--protocol", "http"],
        &[
            "--balance",
            "least-conn",
            "--http-response-timeout-ms",
            "5000",
        ],
        &["--health", "none"],
        &["--protocol", "tcp", "--connect-timeout-ms", "1000"],
        &[
            "--health",
            "tcp",
            "--health-interval",
            "200ms",
            "--health-timeout",
            "100ms",
        ],
        &[
            "--balance",
            "round-robin",
            "--connect-timeout-ms",
            "default",
        ],
    ];
    for edit in edits {
        std::thread::sleep(Duration::from_millis(400));
        let mut args = vec!["service", "set", "web"];
        args.extend_from_slice(edit);
        fluxd.ok(&args);
    }
    std::thread::sleep(Duration::from_millis(400));
    stop.store(true, Ordering::SeqCst);
    let answers = clients.join().unwrap();
    let failures: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    eprintln!(
        "{steering}: {} requests during 8 edits, {} failed",
        answers.len(),
        failures.len()
    );
    assert!(answers.len() >= 100, "too few requests: {}", answers.len());
    assert!(failures.is_empty(), "{failures:?}\n{}", fluxd.log());
    for name in ["a", "b"] {
        assert!(
            answers.iter().any(|x| x.as_deref() == Ok(name)),
            "{name} never answered"
        );
    }

    // Open connections go on as they were.
    let again = kept
        .get("web")
        .expect("the kept-alive connection still works");
    assert_eq!(again.status(), 200);

    // Only what was set changed, and the last values stand.
    let s = info(&fluxd);
    assert_eq!(s["address"], VIP);
    assert_eq!(s["protocol"], "tcp");
    assert_eq!(s["balance"], "round-robin");
    assert_eq!(s["health"]["kind"], "tcp");
    assert_eq!(s["timeouts"], serde_json::json!({"http_response_ms": 5000}));
    let text = fluxd.ok(&["info", "web"]);
    assert!(text.contains("timeouts: http-response 5000ms"), "{text}");
}

#[test]
fn edits_under_a_client_loop_fail_no_connection_bpf() {
    edits_under_a_client_loop("bpf");
}

#[test]
fn edits_under_a_client_loop_fail_no_connection_nat() {
    edits_under_a_client_loop("nat");
}

fn moving_the_address(steering: &str) {
    let ns = Netns::new("edit-move");
    let a = HttpBackend::start(&ns, "a", 9000, 200);
    let fluxd = Fluxd::dataplane(&ns.name, &["--steering", steering]);
    fluxd.ok(&["service", "add", "web", "--address", VIP]);
    fluxd.ok(&["service", "add", "db", "--address", TAKEN_VIP]);
    fluxd.add_instance("web", "a", a.addr);
    fluxd.add_instance("db", "a", a.addr);
    fluxd.wait_routed("web");
    fluxd.wait_routed("db");
    let (old, new): (SocketAddrV4, SocketAddrV4) = (VIP.parse().unwrap(), NEW_VIP.parse().unwrap());

    // Refusals: one line naming the field, exit status 2, nothing written.
    let revision = || fluxd.json(&["info"]).to_string();
    let before = revision();
    for (args, starts) in [
        (
            vec!["--address", TAKEN_VIP],
            "fluxctl: address: already used by service db",
        ),
        (vec!["--balance", "fastest"], "fluxctl: balance: must be"),
        (
            vec!["--protocol", "http", "--proxy-protocol", "v1"],
            "fluxctl: proxy_protocol: is for tcp services",
        ),
        (
            vec!["--connect-timeout-ms", "5"],
            "fluxctl: connect-timeout-ms: must be 10-60000",
        ),
        (
            vec!["--health-interval", "1s"],
            "fluxctl: health-interval: needs --health",
        ),
        (vec![], "fluxctl: service set: nothing to change"),
    ] {
        let mut a = vec!["service", "set", "web"];
        a.extend_from_slice(&args);
        let out = fluxd.ctl(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with(starts), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    let out = fluxd.ctl(&["service", "set", "nope", "--balance", "random"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service of this name"));
    assert_eq!(revision(), before, "refusals change nothing");
    assert_eq!(ns.run(move || request(old)), Ok("a".to_string()));

    // The move: the new VIP serves as soon as `set` returns and the routing caught up; the old
    // one refuses afterwards.
    let out = fluxd.ok(&["service", "set", "web", "--address", NEW_VIP]);
    assert!(
        out.starts_with(&format!("changed service web: address {NEW_VIP}")),
        "{out}"
    );
    let served = wait_until(Duration::from_secs(10), || {
        ns.run(move || request(new)) == Ok("a".to_string())
    });
    assert!(served.is_some(), "new VIP does not serve: {}", fluxd.log());
    // No longer a VIP: not routed to the proxy any more, so the connect fails (refused, or
    // unanswered where the namespace has no route for it).
    let refused = wait_until(Duration::from_secs(10), || {
        ns.run(move || {
            std::net::TcpStream::connect_timeout(&old.into(), Duration::from_millis(500)).is_err()
        })
    });
    assert!(refused.is_some(), "old VIP still answers: {}", fluxd.log());
    assert_eq!(info(&fluxd)["address"], NEW_VIP);
    // The old VIP is free for another service.
    fluxd.ok(&["service", "add", "api", "--address", VIP]);
}

#[test]
fn a_new_address_serves_and_the_old_refuses_bpf() {
    moving_the_address("bpf");
}

#[test]
fn a_new_address_serves_and_the_old_refuses_nat() {
    moving_the_address("nat");
}
