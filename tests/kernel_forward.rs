//! Issue 15, item 2: `fluxctl service add ... --forward kernel`. The kernel forwards the
//! service's connections itself (iptables DNAT from the VIP straight to an instance), so no
//! connection passes through fluxd's proxy. Real fluxd, its data plane inside a network
//! namespace the test creates, real clients and backends there.

mod support;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::time::Duration;

use serde_json::Value;
use support::backend::{who_serves, Backend};
use support::fluxd::{wait_until, Fluxd};
use support::http_backend::HttpBackend;
use support::netns::Netns;

const VIP: &str = "198.18.0.30:80";
/// The service's own chain: `FLUX-FWD-` + the VIP in hex + its port.
const CHAIN: &str = "FLUX-FWD-C612001E-80";

fn vip() -> SocketAddrV4 {
    VIP.parse().unwrap()
}

/// The DNAT rules of the service's chain installed in the namespace, one line each.
fn dnat_rules(ns: &Netns) -> Vec<String> {
    ns.nat_table()
        .lines()
        .filter(|l| l.starts_with(&format!("-A {CHAIN} ")))
        .map(str::to_string)
        .collect()
}

/// Waits until the service's chain sends to exactly the instances `names`.
fn wait_rules_for(ns: &Netns, fluxd: &Fluxd, names: &[&str]) {
    let want: Vec<String> = names.iter().map(|n| format!("flux:bulk/{n}")).collect();
    let ok = wait_until(Duration::from_secs(6), || {
        let rules = dnat_rules(ns);
        rules.len() == want.len() && want.iter().all(|w| rules.iter().any(|r| r.contains(w)))
    });
    assert!(
        ok.is_some(),
        "never forwarded to {names:?}:\n{}\n{}",
        ns.nat_table(),
        fluxd.log()
    );
}

/// A namespace with fluxd and `n` backends (`b0`, `b1`, ...) of the kernel-forwarded service
/// `bulk`, its rules installed.
fn setup(tag: &str, n: usize, extra: &[&str]) -> (Netns, Fluxd, Vec<Backend>) {
    setup_on(tag, n, &[], extra)
}

/// [`setup`] with `daemon` given to fluxd (`--steering nat`).
fn setup_on(tag: &str, n: usize, daemon: &[&str], extra: &[&str]) -> (Netns, Fluxd, Vec<Backend>) {
    let ns = Netns::new(tag);
    let fluxd = Fluxd::dataplane(&ns.name, daemon);
    let mut args = vec![
        "service",
        "add",
        "bulk",
        "--address",
        VIP,
        "--forward",
        "kernel",
    ];
    args.extend_from_slice(extra);
    fluxd.ok(&args);
    let backends: Vec<Backend> = (0..n)
        .map(|i| {
            let b = Backend::start(&ns, &format!("b{i}"), 9100 + i as u16);
            fluxd.add_instance("bulk", &b.name, b.addr);
            b
        })
        .collect();
    let names: Vec<String> = backends.iter().map(|b| b.name.clone()).collect();
    wait_rules_for(
        &ns,
        &fluxd,
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    (ns, fluxd, backends)
}

/// The namespace's `Tcp: PassiveOpens`: handshakes answered by a listening socket, fluxd's
/// proxy included.
fn passive_opens(ns: &Netns) -> u64 {
    let snmp = String::from_utf8(ns.exec(&["cat", "/proc/net/snmp"]).stdout).unwrap();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "PassiveOpens")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// Who served each of `n` connections to the VIP.
fn serving(ns: &Netns, n: usize) -> HashMap<String, usize> {
    ns.run(move || {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..n {
            *counts.entry(who_serves(vip()).unwrap()).or_default() += 1;
        }
        counts
    })
}

/// On fluxd's default path (bpf here: the nat table then holds the forwarded services' rules
/// only).
#[test]
fn connections_reach_every_instance_and_none_passes_through_the_proxy() {
    reach_every_instance("kfwd", &[]);
    // fluxd's default here; the nat case below pins the other path.
}

/// On the nat path, where the forwarded services' rules sit beside the redirects.
#[test]
fn connections_reach_every_instance_on_the_nat_path_too() {
    reach_every_instance("kfwdnat", &["--steering", "nat"]);
}

fn reach_every_instance(tag: &str, daemon: &[&str]) {
    let (ns, fluxd, backends) = setup_on(tag, 3, daemon, &[]);
    let steering = fluxd.steering();
    eprintln!("steering: {steering}");
    let opens = passive_opens(&ns);
    let counts = serving(&ns, 300);
    eprintln!("300 connections through the kernel: {counts:?}");
    for b in &backends {
        let n = counts.get(&b.name).copied().unwrap_or(0);
        assert!(n >= 60, "{} got {n} of 300 (< 20%): {counts:?}", b.name);
    }
    // Every handshake answered in the namespace was a backend's: none was the proxy's.
    assert_eq!(passive_opens(&ns) - opens, 300);
    let query = fluxd.json(&["query", "--service", "bulk"]);
    for i in query.as_array().unwrap() {
        assert_eq!(i["health"]["connections"], 0, "counted by the proxy: {i}");
        assert_eq!(i["state"], "live", "{i}");
    }
    // Not a member of the VIP set, and shown as kernel-forwarded everywhere.
    assert!(!ns.vip_set().contains("flux:bulk"), "{}", ns.vip_set());
    let list = fluxd.ok(&["list"]);
    assert!(list.lines().next().unwrap().ends_with("FORWARD"), "{list}");
    assert!(
        list.lines()
            .any(|l| l.starts_with("bulk ") && l.ends_with("kernel")),
        "{list}"
    );
    assert!(fluxd
        .ok(&["info", "bulk"])
        .contains("forwarded by the kernel"));
    assert_eq!(fluxd.json(&["info", "bulk"])[0]["forward"], "kernel");

    let debug = fluxd.debug();
    assert_eq!(debug["drift"]["clean"], true, "{debug}");
    assert_eq!(debug["steering"], steering);
    let dnat: Vec<(&str, &str)> = debug["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["chain"] == CHAIN)
        .map(|r| {
            (
                r["service"].as_str().unwrap(),
                r["instance"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(dnat, [("bulk", "b0"), ("bulk", "b1"), ("bulk", "b2")]);
    assert_eq!(debug["forwarded"][0]["service"], "bulk", "{debug}");
    assert_eq!(debug["forwarded"][0]["instances"][2]["in_rules"], true);
    let text = String::from_utf8(
        std::process::Command::new(env!("CARGO_BIN_EXE_fluxd"))
            .args(["debug", "--api"])
            .arg(format!("unix://{}", fluxd.socket.display()))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(text.contains("KERNEL-FORWARDED"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("bulk") && l.contains(" b1 ") && l.contains(CHAIN)),
        "{text}"
    );
}

/// Reads the backend's greeting on a fresh connection: the name of who serves it.
fn greeting(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        name.push(byte[0]);
    }
    String::from_utf8(name).unwrap()
}

#[test]
fn an_instance_removed_loses_its_connections_and_gets_no_new_ones() {
    let (ns, fluxd, _backends) = setup("kfwdrm", 2, &[]);
    // Twenty connections kept open, each knowing who serves it.
    let mut held: Vec<(String, TcpStream)> = ns.run(|| {
        (0..20)
            .map(|_| {
                let mut s = TcpStream::connect(vip()).unwrap();
                (greeting(&mut s), s)
            })
            .collect()
    });
    assert!(held.iter().any(|(n, _)| n == "b1"), "none on b1");
    let on_b1 = || {
        String::from_utf8(ns.exec(&["conntrack", "-L", "-p", "tcp"]).stdout)
            .unwrap()
            .matches("sport=9101 ")
            .count()
    };
    assert_eq!(on_b1(), held.iter().filter(|(n, _)| n == "b1").count());

    fluxd.ok(&["instance", "rm", "bulk", "b1"]);
    wait_rules_for(&ns, &fluxd, &["b0"]);
    let cleared = wait_until(Duration::from_secs(3), || on_b1() == 0);
    assert!(cleared.is_some(), "entries to b1 left: {}", fluxd.log());

    // A connection that was on b1 is reset at its next packet (forwarded anew, to b0, which
    // knows no such connection), not left talking to an instance that left.
    let (_, stale) = held.iter_mut().find(|(n, _)| n == "b1").unwrap();
    stale.write_all(b"still there?\n").unwrap();
    let mut buf = [0u8; 64];
    let read = stale.read(&mut buf);
    assert!(
        matches!(&read, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{read:?}"
    );
    // One on b0 goes on: it echoes.
    let (_, kept) = held.iter_mut().find(|(n, _)| n == "b0").unwrap();
    kept.write_all(b"ping\n").unwrap();
    let mut echo = [0u8; 5];
    kept.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping\n");

    let counts = serving(&ns, 50);
    assert_eq!(counts.get("b0"), Some(&50), "{counts:?}");
}

/// How a connection attempt ended: refused at once, or served by the named backend.
fn attempt(vip: SocketAddrV4) -> Result<String, ErrorKind> {
    who_serves(vip).map_err(|e| e.kind())
}

#[test]
fn with_no_instance_it_is_refused_like_any_tcp_service() {
    let ns = Netns::new("kfwdnone");
    let fluxd = Fluxd::dataplane(&ns.name, &[]);
    fluxd.ok(&[
        "service",
        "add",
        "bulk",
        "--address",
        VIP,
        "--forward",
        "kernel",
    ]);
    // A flux-empty member on nat, a refuse entry in the steering map on bpf.
    fluxd.wait_refusing("bulk");
    assert_eq!(ns.run(|| attempt(vip())), Err(ErrorKind::ConnectionRefused));
    assert!(dnat_rules(&ns).is_empty());

    let _b0 = Backend::start(&ns, "b0", 9100);
    fluxd.add_instance("bulk", "b0", "127.0.0.1:9100");
    wait_rules_for(&ns, &fluxd, &["b0"]);
    let served = ns.run(|| wait_until(Duration::from_secs(3), || attempt(vip()).is_ok()));
    assert!(served.is_some(), "{}", fluxd.log());
    assert!(!ns.empty_set().contains("flux:bulk"));
    // Forwarded by its DNAT rules: neither proxied nor refused by the steering any more.
    assert_eq!(fluxd.steered_as("bulk"), None, "{}", fluxd.debug());

    fluxd.ok(&["instance", "rm", "bulk", "b0"]);
    let refused = ns.run(|| {
        wait_until(Duration::from_secs(5), || {
            attempt(vip()) == Err(ErrorKind::ConnectionRefused)
        })
    });
    assert!(refused.is_some(), "{}\n{}", ns.nat_table(), fluxd.log());
    assert!(!ns.nat_table().contains(CHAIN), "{}", ns.nat_table());
}

/// Sends `n` requests, one per connection, and returns how many each backend answered
/// (health checks apart: they are connections too).
fn served_during(ns: &Netns, backends: &[&HttpBackend], n: usize) -> Vec<u64> {
    let count = |b: &HttpBackend| b.requests.load(std::sync::atomic::Ordering::SeqCst);
    let before: Vec<u64> = backends.iter().map(|b| count(b)).collect();
    ns.run(move || {
        for _ in 0..n {
            let mut s = TcpStream::connect_timeout(&vip().into(), Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: bulk\r\nConnection: close\r\n\r\n")
                .unwrap();
            // The backend keeps the connection open: the status line is all we wait for.
            let mut answer = [0u8; 12];
            s.read_exact(&mut answer).unwrap();
            assert_eq!(&answer, b"HTTP/1.1 200");
        }
    });
    backends
        .iter()
        .zip(before)
        .map(|(b, was)| count(b) - was)
        .collect()
}

/// An instance whose active check fails leaves the rules (no new connection reaches it, though
/// it still accepts them) and comes back once it passes again.
#[test]
fn an_instance_failing_its_health_check_gets_no_new_connections() {
    let ns = Netns::new("kfwdhc");
    let fluxd = Fluxd::dataplane(&ns.name, &[]);
    let a = HttpBackend::start(&ns, "a", 9200, 200);
    let b = HttpBackend::start(&ns, "b", 9201, 200);
    fluxd.ok(&[
        "service",
        "add",
        "bulk",
        "--address",
        VIP,
        "--forward",
        "kernel",
        "--health",
        "http:/healthz",
        "--health-interval",
        "200ms",
        "--health-timeout",
        "100ms",
        "--health-fall",
        "1",
        "--health-rise",
        "1",
    ]);
    fluxd.add_instance("bulk", "a", a.addr);
    fluxd.add_instance("bulk", "b", b.addr);
    wait_rules_for(&ns, &fluxd, &["a", "b"]);

    b.set_health(503);
    wait_rules_for(&ns, &fluxd, &["a"]);
    assert_eq!(served_during(&ns, &[&a, &b], 30), [30, 0]);
    let debug = fluxd.debug();
    assert_eq!(
        debug["forwarded"][0]["instances"][1],
        serde_json::json!({"instance": "b", "address": "127.0.0.1:9201", "in_rules": false}),
        "{debug}"
    );

    b.set_health(200);
    wait_rules_for(&ns, &fluxd, &["a", "b"]);
    let counts = served_during(&ns, &[&a, &b], 60);
    assert!(counts[1] > 0, "b never came back: {counts:?}");
}

#[test]
fn drift_is_repaired_and_a_stop_or_cleanup_removes_everything() {
    let (ns, mut fluxd, _backends) = setup("kfwddrift", 2, &[]);
    let installed = ns.nat_table();
    ns.exec(&["iptables", "-t", "nat", "-F", CHAIN]);
    let repaired = wait_until(Duration::from_secs(6), || ns.nat_table() == installed);
    assert!(repaired.is_some(), "{}\n{}", ns.nat_table(), fluxd.log());
    assert!(fluxd.debug()["repairs"].as_u64().unwrap() >= 1);

    fluxd.stop();
    let after = ns.nat_table();
    assert!(!after.contains("FLUX-"), "{after}");

    // With --keep-rules they stay on stop, and `fluxd cleanup` removes them.
    let mut kept = Fluxd::dataplane(&ns.name, &["--keep-rules"]);
    kept.ok(&[
        "service",
        "add",
        "bulk",
        "--address",
        VIP,
        "--forward",
        "kernel",
    ]);
    kept.add_instance("bulk", "b0", "127.0.0.1:9100");
    wait_rules_for(&ns, &kept, &["b0"]);
    kept.stop();
    assert!(ns.nat_table().contains(CHAIN), "kept on stop");
    let out = ns.exec(&[env!("CARGO_BIN_EXE_fluxd"), "cleanup"]);
    assert!(out.status.success(), "{out:?}");
    let after = ns.nat_table();
    assert!(!after.contains("FLUX-"), "{after}");
}

/// One line on stderr, exit status 2, naming the field; nothing stored.
fn refused(fluxd: &Fluxd, args: &[&str], field: &str) {
    let out = fluxd.ctl(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(field), "{args:?}: {err}");
}

#[test]
fn bad_forward_input_is_one_line_naming_the_field_and_changes_nothing() {
    let fluxd = Fluxd::embedded();
    let add = ["service", "add", "x", "--address", "198.18.0.31:80"];
    let with = |extra: &[&'static str]| -> Vec<&str> { add.iter().chain(extra).copied().collect() };
    refused(&fluxd, &with(&["--forward", "dnat"]), "forward");
    refused(
        &fluxd,
        &with(&["--forward", "kernel", "--protocol", "http"]),
        "forward",
    );
    refused(
        &fluxd,
        &with(&["--forward", "kernel", "--balance", "least-conn"]),
        "forward",
    );
    refused(
        &fluxd,
        &[
            "service",
            "add",
            "x",
            "--address",
            "none",
            "--instance-port",
            "80",
            "--forward",
            "kernel",
        ],
        "forward",
    );
    // The API refuses the same record from any client.
    let out = std::process::Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&fluxd.socket)
        .args([
            "-d",
            r#"{"name":"x","address":"198.18.0.31:80","protocol":"http","forward":"kernel"}"#,
            "http://fluxd/v1/services",
        ])
        .output();
    if let Ok(out) = out {
        let body: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert_eq!(body["field"], "forward", "{body}");
    }
    assert_eq!(fluxd.json(&["list"]), serde_json::json!([]));
    // A good one is stored with the field; a proxied one without it.
    fluxd.ok(&with(&["--forward", "kernel"]));
    assert_eq!(fluxd.json(&["info", "x"])[0]["forward"], "kernel");
    fluxd.ok(&["service", "add", "y", "--address", "198.18.0.32:80"]);
    assert!(fluxd.json(&["info", "y"])[0].get("forward").is_none());
}
