//! Issue 17 part 3: WebSocket and other `Upgrade` requests on `http` services. Real WebSocket
//! instances (aiohttp) and clients (`websockets`) inside a namespace the test creates: messages
//! go both ways through the VIP, connections spread over the instances, a long-lived connection
//! keeps working, a close from either side ends both, an unreachable instance is passed over,
//! a refused upgrade reaches the client as the instance sent it, plain requests on the same service are still pooled and balanced, and
//! an upgraded connection is held to the half-close limit and drained like a `tcp` one when
//! fluxd stops.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use support::fluxd::{wait_until, Fluxd};
use support::http_backend::read_message;
use support::netns::Netns;
use support::openmetrics;
use support::websocket::{client, WsInstance};

const VIP: &str = "198.18.0.40:80";
const HTTP: &str = "127.0.0.1:7070";

fn url(path: &str) -> String {
    format!("ws://{VIP}{path}")
}

/// An `http` service `ws` at the VIP with the given instances (and service flags).
fn setup(ns: &Netns, instances: &[(&str, SocketAddrV4)], flags: &[&str]) -> Fluxd {
    let fluxd = Fluxd::dataplane(&ns.name, &["--http", HTTP]);
    let mut add = vec![
        "service",
        "add",
        "ws",
        "--address",
        VIP,
        "--protocol",
        "http",
    ];
    add.extend_from_slice(flags);
    fluxd.ok(&add);
    for (name, addr) in instances {
        fluxd.add_instance("ws", name, addr);
    }
    fluxd.wait_routed("ws");
    fluxd
}

/// The `flux_*` samples of one family from `/metrics`, by (instance, the family's own label).
fn samples(ns: &Netns, name: &str, label: &str) -> HashMap<(String, String), f64> {
    openmetrics::by_instance(ns, HTTP.parse().unwrap(), name, label)
}

fn answers(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The instance name an answer "NAME:message" came from, checking that the message is the one
/// sent.
fn from(answer: &str, sent: &str) -> String {
    let (name, msg) = answer.split_once(':').unwrap();
    assert_eq!(msg, sent, "{answer}");
    name.to_string()
}

#[test]
fn messages_echo_both_ways_over_several_instances_and_a_long_connection_lasts() {
    let ns = Netns::new("ws-echo");
    let a = WsInstance::start(&ns, "a", 9400);
    let b = WsInstance::start(&ns, "b", 9401);
    let fluxd = setup(&ns, &[("a", a.addr), ("b", b.addr)], &[]);

    // A long-lived connection (6 rounds, 1 s apart) while 8 other clients come and go.
    const CLIENTS: usize = 8;
    const MESSAGES: usize = 5;
    let (r, long) = std::thread::scope(|s| {
        let long = s.spawn(|| client(&ns, &["long", &url("/ws"), "6", "1"]));
        std::thread::sleep(Duration::from_millis(1500));
        let r = client(
            &ns,
            &[
                "echo",
                &url("/ws"),
                &CLIENTS.to_string(),
                &MESSAGES.to_string(),
            ],
        );
        (r, long.join().unwrap())
    });
    let mut per_instance: HashMap<String, usize> = HashMap::new();
    let all = r["answers"].as_array().unwrap();
    assert_eq!(all.len(), CLIENTS, "{r}");
    for (i, conn) in all.iter().enumerate() {
        let conn = answers(conn);
        assert_eq!(conn.len(), MESSAGES, "{r}");
        // Every message of one connection is answered by the same instance.
        let names: HashSet<String> = conn
            .iter()
            .enumerate()
            .map(|(j, a)| from(a, &format!("c{i}m{j}")))
            .collect();
        assert_eq!(names.len(), 1, "{conn:?}");
        *per_instance
            .entry(names.into_iter().next().unwrap())
            .or_default() += 1;
    }
    assert_eq!(
        per_instance.len(),
        2,
        "one instance took every client: {per_instance:?}"
    );
    let long = answers(&long["answers"]);
    assert_eq!(long.len(), 6, "{long:?}");
    let names: HashSet<String> = long
        .iter()
        .enumerate()
        .map(|(j, a)| from(a, &format!("long{j}")))
        .collect();
    assert_eq!(names.len(), 1, "{long:?}");

    // 1,000 messages one after the other on one connection, through the VIP and (for
    // comparison, printed only) straight to an instance.
    let through = client(&ns, &["many", &url("/ws"), "1000"]);
    assert_eq!(through["answered"], 1000, "{through}");
    let direct = client(&ns, &["many", &format!("ws://{}/ws", a.addr), "1000"]);
    eprintln!(
        "1000 round trips: {:.3} s through the VIP, {:.3} s straight to the instance",
        through["seconds"].as_f64().unwrap(),
        direct["seconds"].as_f64().unwrap()
    );

    let upgrades = samples(&ns, "flux_http_upgrades_total", "result");
    let switched: f64 = ["a", "b"]
        .iter()
        .map(|i| upgrades[&(i.to_string(), "switched".into())])
        .sum();
    assert_eq!(switched as usize, CLIENTS + 2, "{upgrades:?}");
    let bytes = samples(&ns, "flux_transferred_bytes_total", "direction");
    for i in ["a", "b"] {
        for d in ["to_instance", "to_client"] {
            assert!(bytes[&(i.into(), d.into())] > 0.0, "{i} {d}: {bytes:?}");
        }
    }
    // Every tunnel ended with its client: none is left open.
    let idle = wait_until(Duration::from_secs(10), || {
        samples(&ns, "flux_connections_active", "")
            .values()
            .all(|v| *v == 0.0)
    });
    assert!(
        idle.is_some(),
        "{:?}\n{}",
        samples(&ns, "flux_connections_active", ""),
        fluxd.log()
    );
}

#[test]
fn a_close_from_either_side_ends_both() {
    let ns = Netns::new("ws-close");
    let a = WsInstance::start(&ns, "a", 9410);
    let fluxd = setup(&ns, &[("a", a.addr)], &[]);

    // The client closes: the instance sees the client's close frame (1000).
    let r = client(&ns, &["close", &url("/ws")]);
    assert_eq!(r["answer"], "a:before-close", "{r}");
    let seen = wait_until(Duration::from_secs(10), || a.closes() == ["1000"]);
    assert!(seen.is_some(), "instance saw {:?}", a.closes());

    // The instance closes: the client gets the instance's own code and reason.
    let r = client(&ns, &["bye", &url("/ws")]);
    assert_eq!(r["code"], 4001, "{r}");
    assert_eq!(r["reason"], "bye from a", "{r}");
    let seen = wait_until(Duration::from_secs(10), || a.closes().len() == 2);
    assert!(seen.is_some(), "instance saw {:?}", a.closes());

    // Both tunnels are over on fluxd's side too.
    let idle = wait_until(Duration::from_secs(10), || {
        samples(&ns, "flux_connections_active", "")
            .values()
            .all(|v| *v == 0.0)
    });
    assert!(idle.is_some(), "{}", fluxd.log());
}

#[test]
fn a_refused_upgrade_reaches_the_client_as_the_instance_sent_it() {
    let ns = Netns::new("ws-refused");
    let a = WsInstance::start(&ns, "a", 9420);
    let _fluxd = setup(&ns, &[("a", a.addr)], &[]);

    let r = client(&ns, &["status", &url("/forbidden")]);
    assert_eq!(r["status"], 403, "{r}");

    // The same by hand, to see the whole answer.
    let vip: SocketAddrV4 = VIP.parse().unwrap();
    let resp = ns.run(move || {
        let mut s = TcpStream::connect(vip).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(
            b"GET /forbidden HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .unwrap();
        read_message(&mut BufReader::new(s)).unwrap().unwrap()
    });
    assert_eq!(resp.status(), 403, "{}", resp.start);
    assert_eq!(resp.header("x-backend"), "a");
    assert_eq!(String::from_utf8_lossy(&resp.body), "forbidden by a\n");
    let upgrades = samples(&ns, "flux_http_upgrades_total", "result");
    assert_eq!(
        upgrades[&("a".into(), "refused".into())],
        2.0,
        "{upgrades:?}"
    );
    assert_eq!(
        upgrades[&("a".into(), "switched".into())],
        0.0,
        "{upgrades:?}"
    );
    let requests = samples(&ns, "flux_http_requests_total", "code");
    assert_eq!(requests[&("a".into(), "4xx".into())], 2.0, "{requests:?}");
}

#[test]
fn plain_requests_beside_upgrades_are_pooled_and_balanced() {
    let ns = Netns::new("ws-plain");
    let a = WsInstance::start(&ns, "a", 9430);
    let b = WsInstance::start(&ns, "b", 9431);
    let _fluxd = setup(&ns, &[("a", a.addr), ("b", b.addr)], &[]);

    // One kept-alive client connection (made in the namespace, used from here), with
    // upgrades on other connections between two rounds of requests on it: an upgrade neither
    // takes a pooled connection nor leaves its own in the pool.
    let vip: SocketAddrV4 = VIP.parse().unwrap();
    let s = ns.run(move || TcpStream::connect(vip).unwrap());
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut seen = Vec::new();
    let mut round = |seen: &mut Vec<(String, String)>| {
        for i in 0..20 {
            // Every other request asks for h2c, which fluxd does not pass on: answered as
            // HTTP/1.1 like the others.
            let h2c = if i % 2 == 1 {
                "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
            } else {
                ""
            };
            write!(w, "GET /plain HTTP/1.1\r\nHost: ws\r\n{h2c}\r\n").unwrap();
            let m = read_message(&mut r).unwrap().unwrap();
            assert_eq!(m.status(), 200, "request {i}: {}", m.start);
            assert!(m.header("upgrade").is_empty(), "{:?}", m.headers);
            seen.push((
                m.header("x-backend").to_string(),
                m.header("x-peer").to_string(),
            ));
        }
    };
    round(&mut seen);
    client(&ns, &["echo", &url("/ws"), "4", "2"]);
    round(&mut seen);

    let mut by_instance: HashMap<&str, HashSet<&str>> = HashMap::new();
    for (name, peer) in &seen {
        by_instance.entry(name).or_default().insert(peer);
    }
    assert_eq!(by_instance.len(), 2, "not balanced: {seen:?}");
    // Pooled: one request at a time, so each instance saw all of them over one kept-alive
    // connection.
    for (name, peers) in &by_instance {
        assert_eq!(peers.len(), 1, "{name} saw {peers:?}: {seen:?}");
    }
    let upgrades = samples(&ns, "flux_http_upgrades_total", "result");
    let switched: f64 = upgrades
        .iter()
        .filter(|((_, r), _)| r == "switched")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(
        switched, 4.0,
        "the h2c requests were not upgrades: {upgrades:?}"
    );
}

/// An instance written by hand: answers 101 to one upgrade request together with bytes of its
/// own, reports what arrived (the head, then the bytes the client sent with it), then holds the connection open without
/// reading or closing, so only fluxd's half-close limit can end it.
fn holding_instance(l: TcpListener) -> (Vec<u8>, Duration) {
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The bytes past the head only come once the instance switched.
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: raw\r\n\r\nearly-from-instance")
        .unwrap();
    // Wait for the client's end of stream, then do nothing until fluxd ends the connection.
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("no end of stream from the client: {e}"),
        }
    }
    // Neither writing nor closing: fluxd ends the connection with a reset once the half-close
    // limit passed, which the socket's pending error shows.
    let ended = loop {
        std::thread::sleep(Duration::from_millis(50));
        if s.take_error().unwrap().is_some() || started.elapsed() > Duration::from_secs(30) {
            break started.elapsed();
        }
    };
    (got, ended)
}

#[test]
fn an_upgraded_connection_carries_early_bytes_and_keeps_the_half_close_limit() {
    let ns = Netns::new("ws-half");
    let addr: SocketAddrV4 = "127.0.0.1:9440".parse().unwrap();
    let l = ns.run(move || TcpListener::bind(addr).unwrap());
    let instance = std::thread::spawn(move || holding_instance(l));
    let fluxd = setup(&ns, &[("raw", addr)], &["--half-close-timeout-ms", "1000"]);

    let vip: SocketAddrV4 = VIP.parse().unwrap();
    let (head, early, ended) = ns.run(move || {
        let mut s = TcpStream::connect(vip).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // The first bytes of the new protocol in the same write as the request's head.
        s.write_all(b"GET /raw HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: raw\r\n\r\nearly-from-client")
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"early-from-instance") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        let (head, early) = text.split_once("\r\n\r\n").unwrap();
        // Half-close: the instance never answers nor closes.
        s.shutdown(Shutdown::Write).unwrap();
        let started = Instant::now();
        let end = s.read(&mut buf);
        (
            head.to_string(),
            early.to_string(),
            (end.map_err(|e| e.kind()), started.elapsed()),
        )
    });
    let (got, instance_ended) = instance.join().unwrap();
    let got = String::from_utf8_lossy(&got);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: raw"), "{head}");
    assert_eq!(early, "early-from-instance");
    assert!(
        got.to_ascii_lowercase().contains("upgrade: raw\r\n"),
        "{got}"
    );
    assert!(got.ends_with("\r\n\r\nearly-from-client"), "{got}");
    eprintln!(
        "client saw {:?}; instance's side ended after {instance_ended:?}",
        ended
    );
    // The connection ended (with a reset or an end of stream) well before the 30 s reads gave
    // up: the limit, not a read timeout, ended it.
    assert!(
        !matches!(
            ended.0,
            Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
        ),
        "{ended:?}\n{}",
        fluxd.log()
    );
    assert!(instance_ended < Duration::from_secs(30), "{}", fluxd.log());
}

#[test]
fn an_upgrade_moves_on_from_an_instance_that_cannot_be_reached() {
    let ns = Netns::new("ws-retry");
    let a = WsInstance::start(&ns, "a", 9450);
    // Nothing listens on the second instance's port: its connects are refused.
    let dead: SocketAddrV4 = "127.0.0.1:9451".parse().unwrap();
    let _fluxd = setup(&ns, &[("a", a.addr), ("dead", dead)], &[]);

    let r = client(&ns, &["echo", &url("/ws"), "4", "1"]);
    for (i, conn) in r["answers"].as_array().unwrap().iter().enumerate() {
        assert_eq!(answers(conn), [format!("a:c{i}m0")], "{r}");
    }
    let failures = samples(&ns, "flux_connect_failures_total", "");
    assert!(
        failures[&("dead".into(), String::new())] >= 1.0,
        "{failures:?}"
    );
    let upgrades = samples(&ns, "flux_http_upgrades_total", "result");
    assert_eq!(
        upgrades[&("a".into(), "switched".into())],
        4.0,
        "{upgrades:?}"
    );
}

/// An instance written by hand that switches one connection to a line echo.
fn echoing_instance(l: TcpListener) {
    let (s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let head = read_message(&mut r).unwrap().unwrap();
    assert_eq!(head.header("upgrade"), "echo", "{:?}", head.headers);
    w.write_all(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .unwrap();
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut r, &mut line).is_ok_and(|n| n > 0) {
        if w.write_all(line.as_bytes()).is_err() {
            return;
        }
        line.clear();
    }
}

#[test]
fn a_stop_drains_an_upgraded_connection_like_a_tcp_one() {
    let ns = Netns::new("ws-drain");
    let addr: SocketAddrV4 = "127.0.0.1:9460".parse().unwrap();
    let l = ns.run(move || TcpListener::bind(addr).unwrap());
    let instance = std::thread::spawn(move || echoing_instance(l));
    let mut fluxd = Fluxd::dataplane(&ns.name, &["--http", HTTP, "--drain-seconds", "30"]);
    fluxd.ok(&[
        "service",
        "add",
        "ws",
        "--address",
        VIP,
        "--protocol",
        "http",
    ]);
    fluxd.add_instance("ws", "echo", addr);
    fluxd.wait_routed("ws");

    let vip: SocketAddrV4 = VIP.parse().unwrap();
    let s = ns.run(move || TcpStream::connect(vip).unwrap());
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    (&s).write_all(
        b"GET /echo HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .unwrap();
    let head = read_message(&mut r).unwrap().unwrap();
    assert_eq!(head.status(), 101, "{}", head.start);

    let pid = nix::unistd::Pid::from_raw(fluxd.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let draining = wait_until(Duration::from_secs(10), || {
        fluxd.log().contains("draining established connections")
    });
    assert!(draining.is_some(), "{}", fluxd.log());
    // The tunnel holds its connection's place: the drain waits for it, and it still carries
    // bytes both ways.
    (&s).write_all(b"still here\n").unwrap();
    let mut echo = String::new();
    std::io::BufRead::read_line(&mut r, &mut echo).unwrap();
    assert_eq!(echo, "still here\n");
    // Once it ends, fluxd exits without waiting out the 30 s.
    drop((s, r));
    let status = fluxd.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {}",
        fluxd.log()
    );
    assert!(
        fluxd.log().contains("every connection ended"),
        "{}",
        fluxd.log()
    );
    instance.join().unwrap();
}
