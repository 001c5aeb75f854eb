//! Issue 14, item 4: a `tcp` service with no instance refuses connections at once (a TCP reset
//! to the SYN, so `connect()` fails with ECONNREFUSED), as flux 0.2's REJECT rule did, instead
//! of the proxy accepting each connection and then resetting it; `http` services keep
//! answering 503. Real fluxd, its data plane inside a network namespace the test creates.
//!
//! "Refused, not accepted then reset" is told apart three ways: the error comes from
//! `connect()` itself, not from a later read; it comes at once; and the namespace's TCP
//! `PassiveOpens` counter (every handshake a listening socket answered, fluxd's proxy
//! included) does not move.
//!
//! The tests that read the nat path's sets and rules run fluxd with `--steering nat`; each has
//! its bpf counterpart here (`..._on_the_bpf_path`: the program's `refuse` entry, no ipset
//! needed) or in tests/steering.rs (VIP ranges, drift, clean stop). What does not depend on the
//! path (which services count as having an instance, `http` answering 503) runs on both.

mod support;

use std::io::{ErrorKind, Read};
use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use support::backend::{who_serves, Backend};
use support::fluxd::{wait_until, Fluxd};
use support::http_backend::Client;
use support::netns::Netns;
use support::steered::Action;

const VIP: &str = "198.18.0.20:80";

fn vip() -> SocketAddrV4 {
    VIP.parse().unwrap()
}

/// How a connection attempt to a VIP ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// `connect()` failed with ECONNREFUSED: nothing ever accepted it.
    Refused,
    /// The handshake completed and the connection was then reset or closed before a byte
    /// came (the proxy with no instance to send to).
    AcceptedThenClosed,
    /// A backend answered with its name.
    Served(String),
    /// Anything else (a timeout, unreachable), with the error.
    Other(String),
}

/// Connects to `vip` from the calling thread's namespace and reads a line.
fn attempt(vip: SocketAddrV4) -> Outcome {
    let mut s = match TcpStream::connect_timeout(&vip.into(), Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Outcome::Refused,
        // The handshake completed and a reset followed before `connect_timeout`'s poll
        // returned: accepted, then reset.
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return Outcome::AcceptedThenClosed,
        Err(e) => return Outcome::Other(format!("connect: {e}")),
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) if line.is_empty() => return Outcome::AcceptedThenClosed,
            Err(e) if e.kind() == ErrorKind::ConnectionReset && line.is_empty() => {
                return Outcome::AcceptedThenClosed
            }
            Ok(0) => return Outcome::Other("closed mid-line".into()),
            Ok(_) if byte[0] == b'\n' => {
                return Outcome::Served(String::from_utf8_lossy(&line).into_owned())
            }
            Ok(_) => line.push(byte[0]),
            Err(e) => return Outcome::Other(format!("read: {e}")),
        }
    }
}

/// The namespace's `Tcp: PassiveOpens`: handshakes answered by a listening socket.
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

/// Packets the refusal rule in FLUX-REJECT has matched.
fn rejected_packets(ns: &Netns) -> u64 {
    let out = ns.exec(&[
        "iptables",
        "-t",
        "filter",
        "-L",
        "FLUX-REJECT",
        "-v",
        "-x",
        "-n",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.contains("REJECT") && l.contains("flux-empty"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no refusal rule: {text}"))
}

/// Three attempts in a row are each refused by `connect()` within 100 ms, without any
/// listening socket of the namespace (the proxy's included) answering a handshake, and on nat
/// each is counted by the refusal rule.
fn assert_refused_at_once(ns: &Netns, fluxd: &Fluxd, vip: SocketAddrV4) {
    let nat = fluxd.steering() == "nat";
    let opens = passive_opens(ns);
    let rejected = nat.then(|| rejected_packets(ns));
    let outcomes = ns.run(move || {
        (0..3)
            .map(|_| {
                let started = Instant::now();
                (attempt(vip), started.elapsed())
            })
            .collect::<Vec<_>>()
    });
    for (outcome, took) in &outcomes {
        assert_eq!(
            *outcome,
            Outcome::Refused,
            "{outcomes:?}\n{}\n{}",
            ns.filter_table(),
            fluxd.log()
        );
        assert!(*took < Duration::from_millis(100), "{outcomes:?}");
    }
    // The figure for the notes: how soon a client learns (`-- --nocapture`).
    eprintln!(
        "refused by connect() after {:?}",
        outcomes.iter().map(|(_, t)| *t).collect::<Vec<_>>()
    );
    assert_eq!(
        passive_opens(ns),
        opens,
        "a refused connection reached a listening socket"
    );
    if let Some(rejected) = rejected {
        assert_eq!(rejected_packets(ns), rejected + 3);
    }
}

/// Waits until connections to `vip` are refused (after a change of instances).
fn wait_refused(ns: &Netns, fluxd: &Fluxd, vip: SocketAddrV4) {
    let refused =
        ns.run(move || wait_until(Duration::from_secs(5), || attempt(vip) == Outcome::Refused));
    assert!(
        refused.is_some(),
        "never refused: {:?}\n{}\n{}",
        ns.run(move || attempt(vip)),
        fluxd.debug(),
        fluxd.log()
    );
}

#[test]
fn a_tcp_service_with_no_instance_refuses_until_it_has_one() {
    let ns = Netns::new("noinst");
    let fluxd = Fluxd::dataplane(&ns.name, &["--steering", "nat"]);
    fluxd.ok(&["service", "add", "idle", "--address", VIP]);
    let member = r#"add flux-empty 198.18.0.20,tcp:80 comment "flux:idle""#;
    let listed = wait_until(Duration::from_secs(5), || ns.empty_set().contains(member));
    assert!(listed.is_some(), "{}\n{}", ns.empty_set(), fluxd.log());
    assert!(!ns.vip_set().contains("flux:idle"), "{}", ns.vip_set());
    assert_refused_at_once(&ns, &fluxd, vip());

    let debug = fluxd.debug();
    assert_eq!(debug["refuses_empty"], true, "{debug}");
    assert_eq!(debug["drift"]["clean"], true, "{debug}");
    assert_eq!(
        debug["no_instance"],
        serde_json::json!([{"element": "198.18.0.20,tcp:80", "service": "idle"}]),
        "{debug}"
    );
    assert!(
        debug["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["table"] == "filter"
                && r["chain"] == "FLUX-REJECT"
                && r["rule"]
                    .as_str()
                    .unwrap()
                    .contains("--reject-with tcp-reset")),
        "{debug}"
    );
    let text = String::from_utf8(
        std::process::Command::new(env!("CARGO_BIN_EXE_fluxd"))
            .args(["debug", "--api"])
            .arg(format!("unix://{}", fluxd.socket.display()))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(text.contains("INSTALLED RULES (filter)"), "{text}");
    assert!(text.contains("REJECTED (no instance)"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("idle") && l.contains("198.18.0.20,tcp:80")),
        "{text}"
    );

    // An instance: served through the proxy.
    let b = Backend::start(&ns, "b0", 9000);
    fluxd.add_instance("idle", "b0", b.addr);
    let served = ns.run(|| {
        wait_until(Duration::from_secs(5), || {
            attempt(vip()) == Outcome::Served("b0".into())
        })
    });
    assert!(
        served.is_some(),
        "{:?}\n{}",
        ns.run(|| attempt(vip())),
        fluxd.log()
    );
    assert!(ns.vip_set().contains("flux:idle") && !ns.empty_set().contains("flux:idle"));
    assert!(ns.run(|| who_serves(vip())).is_ok());

    // The instance goes: refused again, at once, without reaching the proxy.
    fluxd.ok(&["instance", "rm", "idle", "b0"]);
    wait_refused(&ns, &fluxd, vip());
    assert_refused_at_once(&ns, &fluxd, vip());
    assert_eq!(fluxd.debug()["drift"]["clean"], true);
}

/// An instance that exists but does not answer (its container is down, its port closed) keeps
/// the service out of the refusal: the proxy tries it, as a last resort, for every connection.
/// On both steering paths.
#[test]
fn an_instance_that_fails_still_counts_as_an_instance() {
    for steering in ["nat", "bpf"] {
        let ns = Netns::new("noinst-failed");
        let fluxd = Fluxd::dataplane(&ns.name, &["--steering", steering]);
        fluxd.ok(&["service", "add", "web", "--address", VIP]);
        // Nothing listens there.
        fluxd.add_instance("web", "dead", "127.0.0.1:9009");
        fluxd.wait_routed("web");
        let outcomes = ns.run(|| (0..3).map(|_| attempt(vip())).collect::<Vec<_>>());
        for o in &outcomes {
            assert_eq!(*o, Outcome::AcceptedThenClosed, "{steering}: {outcomes:?}");
        }
        assert_eq!(fluxd.steered_as("web"), Some(Action::Proxy), "{steering}");
        if steering == "nat" {
            assert!(!ns.empty_set().contains("flux:web"), "{}", ns.empty_set());
        }
    }
}

/// An `http` service with no instance is steered to the proxy, which answers 503, while a `tcp`
/// one beside it is refused. On both steering paths.
#[test]
fn an_http_service_with_no_instance_still_answers_503() {
    for steering in ["nat", "bpf"] {
        let ns = Netns::new("noinst-http");
        let fluxd = Fluxd::dataplane(&ns.name, &["--steering", steering]);
        fluxd.ok(&[
            "service",
            "add",
            "api",
            "--address",
            VIP,
            "--protocol",
            "http",
        ]);
        fluxd.ok(&["service", "add", "idle", "--address", "198.18.0.21:80"]);
        // The tcp one is refused, the http one steered to the proxy as before.
        fluxd.wait_refusing("idle");
        fluxd.wait_routed("api");
        if steering == "nat" {
            assert!(ns.empty_set().contains("flux:idle") && ns.vip_set().contains("flux:api"));
            assert!(!ns.empty_set().contains("flux:api"), "{}", ns.empty_set());
        }
        let answer = ns.run(|| Client::connect(vip()).and_then(|mut c| c.get("api")));
        let answer = answer.unwrap_or_else(|e| panic!("{steering}: {e}: {}", fluxd.log()));
        assert_eq!(answer.status(), 503);
        assert!(String::from_utf8_lossy(&answer.body).contains("no instance of service api"));
        let idle: SocketAddrV4 = "198.18.0.21:80".parse().unwrap();
        assert_refused_at_once(&ns, &fluxd, idle);
    }
}

#[test]
fn a_vip_inside_a_vip_range_with_no_instance_is_refused_too() {
    let ns = Netns::new("noinst-range");
    let fluxd = Fluxd::dataplane(
        &ns.name,
        &["--steering", "nat", "--vip-range", "198.18.0.0/16"],
    );
    fluxd.ok(&["service", "add", "idle", "--address", VIP]);
    let listed = wait_until(Duration::from_secs(5), || {
        ns.empty_set().contains("flux:idle") && ns.nat_table().contains("flux vip range")
    });
    assert!(listed.is_some(), "{}\n{}", ns.empty_set(), fluxd.log());
    // The range rule would redirect it: the return rule ahead of it must win.
    assert_refused_at_once(&ns, &fluxd, vip());
    // A VIP of the range that is no service still reaches the proxy, which resets it.
    let other: SocketAddrV4 = "198.18.9.9:80".parse().unwrap();
    assert_eq!(ns.run(move || attempt(other)), Outcome::AcceptedThenClosed);

    let b = Backend::start(&ns, "b0", 9000);
    fluxd.add_instance("idle", "b0", b.addr);
    let served = ns.run(|| {
        wait_until(Duration::from_secs(5), || {
            attempt(vip()) == Outcome::Served("b0".into())
        })
    });
    assert!(served.is_some(), "{}", fluxd.log());
    // Inside the range a routed VIP needs no member.
    assert_eq!(ns.vip_set(), "");
    fluxd.ok(&["instance", "rm", "idle", "b0"]);
    wait_refused(&ns, &fluxd, vip());
    assert_eq!(fluxd.debug()["drift"]["clean"], true);
}

/// Someone flushing the filter chain, deleting its hook or emptying `flux-empty`: fluxd's
/// periodic check sees the drift and repairs it, and the VIP is refused again.
#[test]
fn damage_to_the_refusal_is_drift_and_is_repaired() {
    let ns = Netns::new("noinst-drift");
    let fluxd = Fluxd::dataplane(&ns.name, &["--steering", "nat"]);
    fluxd.ok(&["service", "add", "idle", "--address", VIP]);
    let listed = wait_until(Duration::from_secs(5), || {
        ns.empty_set().contains("flux:idle")
    });
    assert!(listed.is_some(), "{}", fluxd.log());
    assert_eq!(fluxd.debug()["drift"]["clean"], true);
    for damage in [
        &["iptables", "-F", "FLUX-REJECT"][..],
        &[
            "iptables",
            "-D",
            "OUTPUT",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-m",
            "comment",
            "--comment",
            "flux hook",
            "-j",
            "FLUX-REJECT",
        ],
        &["ipset", "flush", "flux-empty"],
    ] {
        let mut saw_drift = false;
        // The check runs every 2 s: it may repair before debug is asked, so try a few times.
        for _ in 0..3 {
            let out = ns.exec(damage);
            assert!(out.status.success(), "{damage:?}: {out:?}");
            if fluxd.debug()["drift"]["clean"] == false {
                saw_drift = true;
            }
            let repaired = wait_until(Duration::from_secs(5), || {
                fluxd.debug()["drift"]["clean"] == true
            });
            assert!(
                repaired.is_some(),
                "{damage:?} not repaired: {}",
                fluxd.log()
            );
            if saw_drift {
                break;
            }
        }
        assert!(saw_drift, "fluxd debug never showed {damage:?} as drift");
        assert_refused_at_once(&ns, &fluxd, vip());
    }
}

/// A clean stop takes the filter chain, its hooks and the set of refused VIPs away with the
/// rest, leaving the filter table as it was.
#[test]
fn a_clean_stop_restores_the_filter_table() {
    let ns = Netns::new("noinst-stop");
    let before = ns.filter_table();
    let mut fluxd = Fluxd::dataplane(&ns.name, &["--steering", "nat"]);
    fluxd.ok(&["service", "add", "idle", "--address", VIP]);
    let listed = wait_until(Duration::from_secs(5), || {
        ns.empty_set().contains("flux:idle")
    });
    assert!(listed.is_some(), "{}", fluxd.log());
    assert!(ns.filter_table().contains("FLUX-REJECT"));
    fluxd.stop();
    assert_eq!(ns.filter_table(), before);
    assert_eq!(
        ns.empty_set(),
        "",
        "the set of refused VIPs outlived a clean stop"
    );
}

/// Without ipset (allowed when every VIP lies in a `--vip-range`) nothing can be refused: a
/// service with no instance is accepted and reset by the proxy, as before, and fluxd says so
/// once.
#[test]
fn without_ipset_a_service_with_no_instance_is_accepted_then_reset() {
    let ns = Netns::new("noinst-noipset");
    let bin = path_without_ipset();
    let mut fluxd = Fluxd::unstarted_in_netns(
        &ns.name,
        "h1",
        &["--steering", "nat", "--vip-range", "198.18.0.0/16"],
    );
    fluxd.set_env("PATH", &bin.path().display().to_string());
    fluxd.start();
    fluxd.ok(&["service", "add", "idle", "--address", VIP]);
    let ranged = wait_until(Duration::from_secs(5), || {
        ns.nat_table().contains("flux vip range")
    });
    assert!(ranged.is_some(), "{}", fluxd.log());
    let (outcome, took) = ns.run(|| {
        let started = Instant::now();
        (attempt(vip()), started.elapsed())
    });
    assert_eq!(outcome, Outcome::AcceptedThenClosed);
    eprintln!("without refusals: accepted, then reset after {took:?}");
    assert!(
        !ns.filter_table().contains("FLUX-REJECT"),
        "{}",
        ns.filter_table()
    );
    assert_eq!(fluxd.debug()["refuses_empty"], false);
    assert_eq!(fluxd.debug()["drift"]["clean"], true);
    let log = fluxd.log();
    assert_eq!(
        log.matches("services with no instance will accept connections")
            .count(),
        1,
        "{log}"
    );
}

/// The bpf counterpart of the first test: the program's `refuse` entry for a service with no
/// instance refuses at once (a RST to the SYN: no listening socket answers), an instance turns
/// it into a `proxy` entry, and losing it refuses again. No ipset, no filter rule.
#[test]
fn a_tcp_service_with_no_instance_refuses_until_it_has_one_on_the_bpf_path() {
    let ns = Netns::new("noinst-bpf");
    let filter_before = ns.filter_table();
    let fluxd = Fluxd::dataplane(&ns.name, &["--steering", "bpf"]);
    fluxd.ok(&["service", "add", "idle", "--address", VIP]);
    fluxd.wait_refusing("idle");
    assert_refused_at_once(&ns, &fluxd, vip());
    let debug = fluxd.debug();
    assert_eq!(debug["refuses_empty"], true, "{debug}");
    assert_eq!(debug["drift"]["clean"], true, "{debug}");
    assert_eq!(
        debug["bpf"]["entries"],
        serde_json::json!([{"vip": VIP, "action": "refuse", "service": "idle"}]),
        "{debug}"
    );
    assert_eq!(
        ns.filter_table(),
        filter_before,
        "no filter rule on this path"
    );
    assert_eq!(ns.empty_set(), "");

    let b = Backend::start(&ns, "b0", 9000);
    fluxd.add_instance("idle", "b0", b.addr);
    let served = ns.run(|| {
        wait_until(Duration::from_secs(5), || {
            attempt(vip()) == Outcome::Served("b0".into())
        })
    });
    assert!(
        served.is_some(),
        "{:?}\n{}",
        ns.run(|| attempt(vip())),
        fluxd.log()
    );
    assert_eq!(fluxd.steered_as("idle"), Some(Action::Proxy));

    fluxd.ok(&["instance", "rm", "idle", "b0"]);
    wait_refused(&ns, &fluxd, vip());
    assert_refused_at_once(&ns, &fluxd, vip());
    assert_eq!(fluxd.steered_as("idle"), Some(Action::Refuse));
    assert_eq!(fluxd.debug()["drift"]["clean"], true);
}

/// The bpf counterpart of the test above: the program refuses by itself, so without ipset a
/// service with no instance is still refused at once, and fluxd does not warn otherwise.
#[test]
fn without_ipset_the_bpf_path_still_refuses() {
    let ns = Netns::new("noinst-bpf-noipset");
    let bin = path_without_ipset();
    let mut fluxd = Fluxd::unstarted_in_netns(&ns.name, "h1", &["--steering", "bpf"]);
    fluxd.set_env("PATH", &bin.path().display().to_string());
    fluxd.start();
    fluxd.ok(&["service", "add", "idle", "--address", VIP]);
    fluxd.wait_refusing("idle");
    assert_refused_at_once(&ns, &fluxd, vip());
    assert_eq!(fluxd.debug()["refuses_empty"], true);
    let log = fluxd.log();
    assert!(
        !log.contains("services with no instance will accept connections"),
        "{log}"
    );
}

/// A directory to use as PATH holding what fluxd runs (links to the real programs) except
/// ipset.
fn path_without_ipset() -> tempfile::TempDir {
    let bin = tempfile::tempdir().unwrap();
    for program in [
        "ip",
        "iptables",
        "iptables-save",
        "iptables-restore",
        "conntrack",
        "nice",
        "sh",
    ] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .output()
            .unwrap();
        let path = String::from_utf8(found.stdout).unwrap();
        if !path.trim().is_empty() {
            std::os::unix::fs::symlink(path.trim(), bin.path().join(program)).unwrap();
        }
    }
    bin
}
