//! Issue 17, part 1: `udp` services through a real fluxd, its data plane inside a network
//! namespace the test creates. Clients are *connected* UDP sockets (they drop any reply that
//! does not come from the VIP) and socat; instances are small UDP servers (`support::
//! udp_backend`) and, in `dataplane_docker`-style tests, containers. Checked: new flows spread
//! over instances, a flow keeps its instance, idle flows expire, a full table drops new flows
//! and says so in /metrics, an instance that leaves (removed, or answering ICMP port
//! unreachable) holds no flow (no stale-conntrack black hole), bad flags are refused.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::fluxd::{wait_until, Fluxd};
use support::netns::Netns;
use support::openmetrics;
use support::udp_backend::{ask, client, UdpBackend};

const VIP: &str = "198.18.0.53:53";
const HTTP: &str = "127.0.0.1:7070";

fn vip() -> SocketAddr {
    VIP.parse().unwrap()
}

/// `/metrics` from inside the namespace, as (name, labels) -> value.
fn metrics(ns: &Netns) -> Vec<openmetrics::Sample> {
    let text = ns.run(|| {
        let mut s = TcpStream::connect(HTTP).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_once("\r\n\r\n").unwrap().1.to_string()
    });
    openmetrics::samples(&text)
}

/// The value of `name` whose labels include all of `labels` (0 when absent).
fn value(samples: &[openmetrics::Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// Starts fluxd in `ns` with a udp service `dns` and the given instances.
fn udp_service(ns: &Netns, extra: &[&str], instances: &[(&str, u16)]) -> Fluxd {
    let mut args = vec!["--http", HTTP];
    args.extend_from_slice(extra);
    let fluxd = Fluxd::dataplane(&ns.name, &args);
    fluxd.ok(&[
        "service",
        "add",
        "dns",
        "--address",
        VIP,
        "--protocol",
        "udp",
    ]);
    for (name, port) in instances {
        fluxd.add_instance("dns", name, format!("127.0.0.1:{port}"));
    }
    fluxd.wait_routed("dns");
    fluxd
}

/// Asks from `c` until an answer comes (the relay binds right after the route is in place),
/// for at most 10 s (parallel tests and builds share two cores).
fn first_answer(c: &std::net::UdpSocket, msg: &[u8], fluxd: &Fluxd) -> String {
    let mut got = None;
    wait_until(Duration::from_secs(10), || {
        got = ask(c, msg);
        got.is_some()
    });
    got.unwrap_or_else(|| panic!("no answer from the VIP: {}", fluxd.log()))
}

#[test]
fn flows_spread_stick_expire_and_a_full_table_is_counted_bpf() {
    flows_spread_stick_expire_and_a_full_table_is_counted("bpf");
}

#[test]
fn flows_spread_stick_expire_and_a_full_table_is_counted_nat() {
    flows_spread_stick_expire_and_a_full_table_is_counted("nat");
}

fn flows_spread_stick_expire_and_a_full_table_is_counted(steering: &str) {
    let ns = Netns::new("udp");
    let _b: Vec<UdpBackend> = (0..3)
        .map(|i| UdpBackend::start(&ns, &format!("b{i}"), 9100 + i))
        .collect();
    let fluxd = udp_service(
        &ns,
        &[
            "--steering",
            steering,
            "--udp-idle-ms",
            "1000",
            "--udp-max-flows",
            "3",
        ],
        &[("b0", 9100), ("b1", 9101), ("b2", 9102)],
    );
    let clients: Vec<_> = (0..3).map(|_| client(&ns, vip(), 0)).collect();
    // Three flows, round-robin: each instance gets one.
    // The first waits for the relay; the others' very first datagram must get through.
    let mut first = BTreeMap::new();
    first.insert(0, first_answer(&clients[0], b"hello", &fluxd));
    for (i, c) in clients.iter().enumerate().skip(1) {
        first.insert(i, ask(c, b"hello").expect("a new flow's first datagram"));
    }
    let spread: BTreeSet<&String> = first.values().collect();
    assert_eq!(spread.len(), 3, "new flows went to {first:?}");
    // Each flow keeps its instance, and payloads of any size up to the largest go through.
    let big = vec![b'x'; 65_000];
    for (i, c) in clients.iter().enumerate() {
        for msg in [&b"again"[..], &b""[..], &big[..]] {
            assert_eq!(ask(c, msg).as_ref(), Some(&first[&i]), "client {i}");
        }
    }
    let m = metrics(&ns);
    assert_eq!(value(&m, "flux_udp_flows", &[("service", "dns")]), 3.0);
    let debug = fluxd.debug();
    let settings = debug["services"][0]["settings"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(settings, "udp relay: 3 flows open", "{debug}");
    assert_eq!(debug["drift"]["clean"], true, "{debug}");
    if steering == "nat" {
        // One REDIRECT for the udp VIP.
        assert!(ns
            .nat_table()
            .contains("-d 198.18.0.53/32 -p udp -m udp --dport 53"));
    }
    for name in spread {
        let to = |d| {
            value(
                &m,
                "flux_udp_datagrams_total",
                &[("instance", name), ("direction", d)],
            )
        };
        let (up, down) = (to("to_instance"), to("to_client"));
        assert!(up >= 4.0 && down >= 4.0, "{name}: {up} up, {down} down");
        let bytes = value(
            &m,
            "flux_transferred_bytes_total",
            &[("instance", name), ("direction", "to_instance")],
        );
        assert!(bytes >= 65_010.0, "{name}: {bytes}");
    }
    // The table is full: a fourth client's datagrams are dropped and counted.
    let fourth = client(&ns, vip(), 0);
    assert_eq!(ask(&fourth, b"full?"), None);
    let dropped = value(
        &metrics(&ns),
        "flux_udp_flows_dropped_total",
        &[("service", "dns"), ("reason", "table_full")],
    );
    assert!(dropped >= 1.0, "{dropped}");
    // Idle flows expire (1 s here), and then the fourth client gets a flow.
    let expired = wait_until(Duration::from_secs(10), || {
        value(&metrics(&ns), "flux_udp_flows", &[("service", "dns")]) == 0.0
    });
    assert!(expired.is_some(), "flows never expired: {}", fluxd.log());
    assert!(ask(&fourth, b"now")
        .expect("a flow once the table has room")
        .starts_with('b'));
    // socat, a client of its own (a connected socket too).
    let out = ns.exec(&[
        "sh",
        "-c",
        &format!("printf ping | timeout 5 socat -t 2 - UDP:{VIP}"),
    ]);
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        reply.ends_with(":ping") && reply.starts_with('b'),
        "socat got {reply:?} {out:?}"
    );
}

/// kube-proxy's bug: a client with a fixed source port kept a conntrack entry to a removed
/// instance and its datagrams were black-holed for 30 s and more. Here the flow moves at once.
#[test]
fn a_removed_or_refusing_instance_holds_no_flow_bpf() {
    a_removed_or_refusing_instance_holds_no_flow("bpf");
}

#[test]
fn a_removed_or_refusing_instance_holds_no_flow_nat() {
    a_removed_or_refusing_instance_holds_no_flow("nat");
}

fn a_removed_or_refusing_instance_holds_no_flow(steering: &str) {
    let ns = Netns::new("udpstale");
    let _b0 = UdpBackend::start(&ns, "b0", 9200);
    let mut b1 = UdpBackend::start(&ns, "b1", 9201);
    // Default idle limit (30 s): only the removal can move the flow.
    let fluxd = udp_service(
        &ns,
        &["--steering", steering],
        &[("b0", 9200), ("b1", 9201)],
    );
    let c = client(&ns, vip(), 40053);
    let first = first_answer(&c, b"q1", &fluxd);
    let other = if first == "b0" { "b1" } else { "b0" };
    fluxd.ok(&["instance", "rm", "dns", &first]);
    let t = Instant::now();
    let mut moved = None;
    // Datagrams from the same source port right away: once fluxd has applied the removal
    // (`instance rm` returns when it is stored, a few ms before), the answers must come from
    // the other instance, well inside the 30 s a stale entry would last.
    let mut before_applied = 0;
    while t.elapsed() < Duration::from_secs(10) {
        match ask(&c, b"q2") {
            Some(who) if who == other => {
                moved = Some(who);
                break;
            }
            Some(_) => before_applied += 1,
            None => {}
        }
    }
    assert_eq!(moved.as_deref(), Some(other), "{}", fluxd.log());
    eprintln!(
        "the flow moved {:?} after the removal ({before_applied} answers came before fluxd applied it)",
        t.elapsed()
    );
    for _ in 0..5 {
        assert_eq!(ask(&c, b"q3").as_deref(), Some(other));
    }

    // Put the first back, then crash b1 (its instance stays registered): the ICMP port
    // unreachable fails b1 and moves flows off it.
    fluxd.add_instance(
        "dns",
        &first,
        format!("127.0.0.1:{}", if first == "b0" { 9200 } else { 9201 }),
    );
    fluxd.wait_routed("dns");
    b1.kill();
    let clients: Vec<_> = (0..3).map(|_| client(&ns, vip(), 0)).collect();
    for c in &clients {
        let mut got = None;
        for _ in 0..10 {
            got = ask(c, b"after");
            if got.is_some() {
                break;
            }
        }
        assert_eq!(got.as_deref(), Some("b0"), "{}", fluxd.log());
    }
    let m = metrics(&ns);
    let failures = value(&m, "flux_connect_failures_total", &[("instance", "b1")]);
    assert!(failures >= 1.0, "b1 refused but was never failed");
}

#[test]
fn settings_for_streams_are_refused_for_udp_services() {
    let fluxd = Fluxd::embedded();
    for (flags, field) in [
        (&["--forward", "kernel"][..], "forward"),
        (&["--health", "tcp"][..], "health"),
    ] {
        let mut args = vec!["service", "add", "u", "--address", VIP, "--protocol", "udp"];
        args.extend_from_slice(flags);
        let out = fluxd.ctl(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(field), "{flags:?}: {err}");
    }
    let out = fluxd.ctl(&[
        "service",
        "add",
        "u",
        "--address",
        VIP,
        "--protocol",
        "sctp",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tcp, http or udp"));
    // Nothing was created; a plain udp service is.
    fluxd.ok(&["service", "add", "u", "--address", VIP, "--protocol", "udp"]);
    let info = fluxd.ok(&["info", "u"]);
    assert!(info.contains("udp"), "{info}");
    for flags in [
        &["--forward", "kernel"][..],
        &["--proxy-protocol", "v2"][..],
    ] {
        let mut args = vec!["service", "set", "u"];
        args.extend_from_slice(flags);
        let out = fluxd.ctl(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    // And a tcp service cannot become udp while it has a stream setting.
    fluxd.ok(&[
        "service",
        "add",
        "t",
        "--address",
        "198.18.0.54:53",
        "--health",
        "tcp",
    ]);
    let out = fluxd.ctl(&["service", "set", "t", "--protocol", "udp"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("health"));
    assert!(fluxd.ok(&["info", "t"]).contains("tcp"));
}

/// A UDP echo server for containers, statically linked so the busybox image can run it:
/// answers each datagram with NAME, a colon and the datagram, as `support::udp_backend` does.
const UDP_ECHO_C: &str = r#"
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(atoi(argv[2]));
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0) return 1;
    static char buf[65536 + 256];
    size_t nl = strlen(argv[1]);
    if (nl > 200) return 2;
    memcpy(buf, argv[1], nl);
    buf[nl] = ':';
    for (;;) {
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom(s, buf + nl + 1, 65536, 0, (struct sockaddr *)&from, &fl);
        if (n >= 0) sendto(s, buf, nl + 1 + n, 0, (struct sockaddr *)&from, fl);
    }
}
"#;

/// Builds the echo server into `dir` and returns its path.
fn udp_echo_binary(dir: &std::path::Path) -> std::path::PathBuf {
    let src = dir.join("udpecho.c");
    let bin = dir.join("udpecho");
    std::fs::write(&src, UDP_ECHO_C).unwrap();
    let out = std::process::Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "cc: {out:?}");
    bin
}

/// Two containers of a udp service on a real dockerd; flows spread over both; a client with a
/// fixed source port whose container is stopped reaches the other container with its very next
/// datagrams. Global network mode: the container's own IP and port.
#[test]
fn container_instances_serve_flows_and_a_stopped_one_holds_none() {
    container_instances("global");
}

/// The same in local mode: the instance is the host IP and the port Docker published for
/// `5353/udp`.
#[test]
fn container_instances_at_their_published_udp_port() {
    container_instances("local");
}

fn container_instances(mode: &str) {
    use support::docker::Dockerd;
    let ns = Netns::new("udpdock");
    let docker = Dockerd::new(&ns);
    docker.import_image("flux-udp:1");
    let tmp = tempfile::tempdir().unwrap();
    let echo = udp_echo_binary(tmp.path());
    let mut ids = BTreeMap::new();
    for name in ["c1", "c2"] {
        let id = docker.ok(&[
            "create",
            "--init",
            "--name",
            name,
            "-p",
            "5353/udp",
            "flux-udp:1",
            "/bin/udpecho",
            name,
            "5353",
        ]);
        docker.ok(&[
            "cp",
            &echo.display().to_string(),
            &format!("{id}:/bin/udpecho"),
        ]);
        docker.start(&id);
        ids.insert(name.to_string(), id);
    }
    let endpoint = docker.endpoint();
    let fluxd = udp_service(&ns, &["--docker", &endpoint, "--network-mode", mode], &[]);
    fluxd.ok(&[
        "select",
        "dns",
        "all",
        "--image",
        "flux-udp",
        "--instance-port",
        "5353",
    ]);
    let c = client(&ns, vip(), 40054);
    let mut seen = BTreeSet::new();
    let first = first_answer(&c, b"q\n", &fluxd);
    seen.insert(first.clone());
    // New flows from other clients reach the other container too (round-robin), once the
    // agent has enrolled both.
    let both = wait_until(Duration::from_secs(10), || {
        if let Some(who) = ask(&client(&ns, vip(), 0), b"other") {
            seen.insert(who);
        }
        seen.len() == 2
    });
    assert!(both.is_some(), "only {seen:?} served: {}", fluxd.log());
    assert_eq!(ask(&c, b"same").as_deref(), Some(first.as_str()));
    docker.stop(&ids[&first]);
    let t = Instant::now();
    let mut moved = None;
    while t.elapsed() < Duration::from_secs(10) {
        if let Some(who) = ask(&c, b"after") {
            moved = Some(who);
            break;
        }
    }
    let other = if first == "c1" { "c2" } else { "c1" };
    assert_eq!(moved.as_deref(), Some(other), "{}", fluxd.log());
    eprintln!(
        "the flow moved {:?} after docker stop returned",
        t.elapsed()
    );
}

/// Like the steering program for TCP, the relay takes datagrams from the host itself and its
/// bridges only: a neighbour on the LAN that routes the VIP range to this host gets nothing
/// (on the bpf path the VIP is a local address, so only the relay's own check stops it).
#[test]
fn datagrams_from_the_lan_are_not_relayed() {
    for steering in ["bpf", "nat"] {
        let ns = Netns::new("udplan");
        let lan = Netns::new("udplan-peer");
        ns.ip(&[
            "link", "add", "lan0", "type", "veth", "peer", "name", "up0", "netns", &lan.name,
        ]);
        ns.ip(&["addr", "add", "198.19.250.1/24", "dev", "lan0"]);
        ns.ip(&["link", "set", "lan0", "up"]);
        lan.ip(&["addr", "add", "198.19.250.2/24", "dev", "up0"]);
        lan.ip(&["link", "set", "up0", "up"]);
        lan.ip(&["route", "replace", "198.18.0.0/16", "via", "198.19.250.1"]);
        let _b0 = UdpBackend::start(&ns, "b0", 9300);
        let fluxd = udp_service(&ns, &["--steering", steering], &[("b0", 9300)]);
        // From the host itself: served.
        first_answer(&client(&ns, vip(), 0), b"local", &fluxd);
        // From the LAN: nothing, however often it asks.
        let neighbour = client(&lan, vip(), 0);
        for _ in 0..3 {
            assert_eq!(ask(&neighbour, b"from the lan"), None, "{steering}");
        }
    }
}
