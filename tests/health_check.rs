//! Active health checks (issue 9): an instance failing its service's check leaves the pool of
//! the fluxd that checks it before any client connection fails on it, `fluxctl query` and
//! `fluxd debug` say why, and it comes back after `rise` passing checks. fluxd, its rules, the
//! backends and the clients all run inside network namespaces the tests create.

mod support;

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::backend::{who_serves, Backend};
use support::fluxd::{wait_until, Fluxd};
use support::http_backend::{Client, HttpBackend};
use support::netns::Netns;

const VIP: &str = "198.18.0.10:80";
/// Checks every 200 ms with a 100 ms timeout: fast enough for tests, slow enough for a busy
/// two-core machine to answer in time.
const INTERVAL_MS: u64 = 200;

fn vip() -> SocketAddrV4 {
    VIP.parse().unwrap()
}

/// The `fluxctl query --json` record of instance `name` of `web`.
fn instance(fluxd: &Fluxd, name: &str) -> Value {
    let q = fluxd.json(&["query", "--service", "web"]);
    q.as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no instance {name} in {q}"))
}

fn check_state(fluxd: &Fluxd, name: &str) -> String {
    instance(fluxd, name)["health"]["check"]["state"]
        .as_str()
        .unwrap_or("none")
        .to_string()
}

/// Waits until every named instance's check says `state`; panics with the log after `limit`.
fn wait_check(fluxd: &Fluxd, names: &[&str], state: &str, limit: Duration) -> Duration {
    wait_until(limit, || {
        names.iter().all(|n| check_state(fluxd, n) == state)
    })
    .unwrap_or_else(|| {
        panic!(
            "{names:?} not {state} within {limit:?}: {}\n{}",
            fluxd.ok(&["query", "--service", "web"]),
            fluxd.log()
        )
    })
}

/// One request through the VIP on a fresh connection: when it started, and who answered (or
/// why it failed).
struct Answer {
    started: Instant,
    from: Result<String, String>,
}

fn request() -> Answer {
    let started = Instant::now();
    let from = Client::connect(vip())
        .and_then(|mut c| c.get("web"))
        .map_err(|e| e.to_string())
        .and_then(|m| match m.status() {
            200 => Ok(m.header("x-backend").to_string()),
            s => Err(format!("status {s}")),
        });
    Answer { started, from }
}

#[test]
fn http_check_takes_a_503_instance_out_and_back() {
    let ns = Netns::new("hc-http");
    let good = HttpBackend::start(&ns, "good", 9000, 200);
    let sick = HttpBackend::start(&ns, "sick", 9001, 200);
    let fluxd = Fluxd::dataplane(&ns.name, &[]);
    fluxd.ok(&[
        "service",
        "add",
        "web",
        "--address",
        VIP,
        "--protocol",
        "http",
        "--health",
        "http:/healthz",
        "--health-interval",
        "200ms",
        "--health-timeout",
        "100ms",
        "--health-fall",
        "2",
        "--health-rise",
        "2",
    ]);
    fluxd.add_instance("web", "good", good.addr);
    fluxd.add_instance("web", "sick", sick.addr);
    fluxd.wait_routed("web");
    wait_check(&fluxd, &["good", "sick"], "passing", Duration::from_secs(5));
    assert!(
        sick.health_checks
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );

    // Clients run throughout: the instance must leave the pool without one request failing.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let client = ns.spawn(move || {
        let mut answers = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s.load(std::sync::atomic::Ordering::SeqCst)
            && Instant::now() < deadline
            && answers.len() < 20_000
        {
            answers.push(request());
            std::thread::sleep(Duration::from_millis(5));
        }
        answers
    });
    std::thread::sleep(Duration::from_millis(300));
    let sick_since = Instant::now();
    sick.set_health(503);
    // fall (2) checks 200 ms apart, the first up to one interval away, plus slack for a busy
    // machine.
    let limit = Duration::from_millis(2 * INTERVAL_MS + INTERVAL_MS) + Duration::from_secs(2);
    wait_check(&fluxd, &["sick"], "failing", limit);
    let verdict_seen = Instant::now();
    eprintln!(
        "failing {:?} after /healthz turned 503",
        verdict_seen - sick_since
    );

    let sick_view = instance(&fluxd, "sick");
    assert_eq!(sick_view["state"], "failing", "{sick_view}");
    let check = &sick_view["health"]["check"];
    assert_eq!(check["check"], "http:/healthz", "{check}");
    assert_eq!(check["reason"], "http GET /healthz answered 503", "{check}");
    assert!(check["failures_in_a_row"].as_u64().unwrap() >= 2, "{check}");
    assert!(check["since_unix_ms"].as_u64().unwrap() > 0, "{check}");
    assert_eq!(instance(&fluxd, "good")["state"], "live");
    let text = fluxd.ok(&["query", "--service", "web"]);
    let line = text.lines().find(|l| l.contains("sick")).unwrap();
    assert!(line.contains("failing"), "{text}");
    assert!(
        line.contains("http GET /healthz answered 503,") && line.contains(" in a row, since "),
        "{text}"
    );
    let failing = fluxd.ok(&["query", "--state", "failing", "-q"]);
    assert_eq!(failing.trim(), "sick");
    let debug = fluxd.debug();
    let dbg_sick = debug["services"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["instance"] == "sick")
        .cloned()
        .unwrap();
    assert_eq!(dbg_sick["check"]["state"], "failing", "{dbg_sick}");
    let info = fluxd.ok(&["info", "web"]);
    assert!(
        info.contains("health check: http GET /healthz every 200ms, timeout 100ms, fall 2, rise 2"),
        "{info}"
    );

    // Keep the clients going for a second on the verdict, then the instance recovers.
    std::thread::sleep(Duration::from_secs(1));
    // No request may reach it from the verdict until /healthz answers 200 again (after that,
    // `rise` passes may already have put it back before this test sees them).
    let healed = Instant::now();
    sick.set_health(200);
    let back = wait_check(
        &fluxd,
        &["sick"],
        "passing",
        Duration::from_millis(3 * INTERVAL_MS) + Duration::from_secs(2),
    );
    eprintln!("passing again {back:?} after /healthz turned 200");
    assert_eq!(instance(&fluxd, "sick")["state"], "live");
    let recovered = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let answers = client.join().unwrap();

    let failures: Vec<&String> = answers
        .iter()
        .filter_map(|a| a.from.as_ref().err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} failed: {:?}",
        failures.len(),
        answers.len(),
        &failures[..failures.len().min(5)]
    );
    let from_sick = |a: &&Answer| a.from.as_deref() == Ok("sick");
    let before = answers
        .iter()
        .filter(|a| a.started < sick_since)
        .filter(from_sick)
        .count();
    let failing = |a: &&Answer| a.started > verdict_seen && a.started < healed;
    let while_failing = answers.iter().filter(failing).count();
    let sick_while_failing = answers.iter().filter(failing).filter(from_sick).count();
    let after = answers
        .iter()
        .filter(|a| a.started > recovered)
        .filter(from_sick)
        .count();
    eprintln!(
        "{} requests: {before} to sick before, {sick_while_failing} of {while_failing} while failing, {after} after",
        answers.len()
    );
    assert!(before > 0, "sick served nothing before its check failed");
    assert!(
        while_failing > 50,
        "too few requests while failing: {while_failing}"
    );
    assert_eq!(
        sick_while_failing, 0,
        "requests reached the failing instance"
    );
    assert!(after > 0, "sick got no requests after it passed again");
}

#[test]
fn tcp_check_takes_a_closed_instance_out_before_any_client_tries_it() {
    let ns = Netns::new("hc-tcp");
    let b0 = Backend::start(&ns, "b0", 9000);
    let mut b1 = Backend::start(&ns, "b1", 9001);
    let fluxd = Fluxd::dataplane(&ns.name, &[]);
    fluxd.ok(&[
        "service",
        "add",
        "web",
        "--address",
        VIP,
        "--health",
        "tcp",
        "--health-interval",
        "200ms",
        "--health-timeout",
        "100ms",
        "--health-fall",
        "1",
    ]);
    fluxd.add_instance("web", "b0", b0.addr);
    fluxd.add_instance("web", "b1", b1.addr);
    fluxd.wait_routed("web");
    wait_check(&fluxd, &["b0", "b1"], "passing", Duration::from_secs(5));
    // Both serve while both pass.
    let served = ns.run(|| {
        wait_until(Duration::from_secs(5), || {
            (0..10).any(|_| who_serves(vip()).is_ok_and(|n| n == "b1"))
        })
    });
    assert!(served.is_some(), "b1 never served: {}", fluxd.log());

    b1.kill();
    wait_check(&fluxd, &["b1"], "failing", Duration::from_secs(3));
    let b1_view = instance(&fluxd, "b1");
    assert_eq!(
        b1_view["health"]["check"]["reason"], "tcp connect refused",
        "{b1_view}"
    );
    let failures_before = b1_view["health"]["connect_failures"].as_u64().unwrap();

    let (served, failed) = ns.run(|| {
        let mut served = std::collections::HashMap::<String, usize>::new();
        let mut failed = Vec::new();
        for i in 0..300 {
            match who_serves(vip()) {
                Ok(n) => *served.entry(n).or_default() += 1,
                Err(e) => failed.push(format!("connection {i}: {e}")),
            }
        }
        (served, failed)
    });
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(served.get("b0"), Some(&300), "{served:?}");
    let b1_view = instance(&fluxd, "b1");
    assert_eq!(b1_view["state"], "failing", "{b1_view}");
    // No connect was even attempted on it: the check, not a client, found it closed.
    assert_eq!(failures_before, 0, "{b1_view}");
    assert_eq!(b1_view["health"]["connect_failures"], 0, "{b1_view}");
    assert_eq!(
        b1_view["health"]["live"], true,
        "passive health never saw a failure"
    );
}

#[test]
fn bad_health_input_is_one_line_and_changes_nothing() {
    let d = Fluxd::embedded();
    let cases: &[(&[&str], &str)] = &[
        (&["--health", "udp"], "health: must be tcp or http:/PATH"),
        (&["--health", "http:healthz"], "health: must start with /"),
        (
            &["--health", "http:/a b"],
            "health: must be printable ASCII",
        ),
        (&["--health", "http"], "health: must be tcp or http:/PATH"),
        (
            &["--health", "tcp", "--health-interval", "50ms"],
            "health-interval: must be 100 ms to 1 h",
        ),
        (
            &["--health", "tcp", "--health-interval", "2"],
            "health-interval: expected a duration",
        ),
        (
            &["--health", "tcp", "--health-timeout", "2s"],
            "health-timeout: must be less than the interval",
        ),
        (
            &["--health", "tcp", "--health-timeout", "5ms"],
            "health-timeout: must be at least 10 ms",
        ),
        (
            &["--health", "tcp", "--health-fall", "0"],
            "health-fall: must be 1-100",
        ),
        (
            &["--health", "tcp", "--health-rise", "x"],
            "health-rise: must be 1-100",
        ),
        (&["--health-rise", "2"], "health-rise: needs --health"),
        (
            &["--health-interval", "1s"],
            "health-interval: needs --health",
        ),
    ];
    for (flags, want) in cases {
        let mut args = vec!["service", "add", "web", "--address", VIP];
        args.extend_from_slice(flags);
        let out = d.ctl(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{flags:?}: {err}");
        assert!(err.contains(want), "{flags:?}: want {want:?}, got {err}");
    }
    let list = d.json(&["list"]);
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");

    // A good one is stored as given and shown.
    d.ok(&[
        "service",
        "add",
        "web",
        "--address",
        VIP,
        "--health",
        "http:/healthz",
        "--health-interval",
        "5s",
    ]);
    let info = d.json(&["info", "web"]);
    let h = &info[0]["health"];
    assert_eq!(h["kind"], "http", "{info}");
    assert_eq!(h["path"], "/healthz", "{info}");
    assert_eq!(h["interval_ms"], 5000, "{info}");
    assert_eq!(
        (
            h["timeout_ms"].as_u64(),
            h["fall"].as_u64(),
            h["rise"].as_u64()
        ),
        (Some(1000), Some(3), Some(2))
    );
    assert!(d.ok(&["list"]).contains("http:/healthz"));
    // A service without a check reads as it always did.
    d.ok(&["service", "add", "plain", "--address", "198.18.0.11:80"]);
    let plain = d.json(&["info", "plain"]);
    assert!(plain[0].get("health").is_none(), "{plain}");
}
