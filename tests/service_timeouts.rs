//! Per-service time limits (issue 16): a service's own `--connect-timeout-ms` overrides
//! fluxd's, and `service set ... default` gives it back (the instance is an address whose SYNs
//! vanish: routed to `lo` inside the test's namespace, where it is no local address, so only
//! the connect timeout ends a client's wait); an `http` service's own
//! `--http-response-timeout-ms` answers 504 sooner than fluxd's, and a change applies from the
//! next request on a kept-alive connection.

mod support;

use std::io::Read;
use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use support::fluxd::{wait_until, Fluxd};
use support::http_backend::Client;
use support::netns::Netns;

const VIP: &str = "198.18.0.30:80";
/// Swallows SYNs: see the module doc.
const BLACKHOLE: &str = "198.19.99.1:80";
const DAEMON_MS: u64 = 3000;
const SERVICE_MS: u64 = 300;

/// How long a client waits, connected to the VIP, before the proxy gives up on the instance
/// and resets it.
fn wait_for_reset(ns: &Netns) -> Duration {
    let vip: SocketAddrV4 = VIP.parse().unwrap();
    ns.run(move || {
        let started = Instant::now();
        let mut s = TcpStream::connect_timeout(&vip.into(), Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 16];
        let r = s.read(&mut buf);
        assert!(
            !matches!(r, Ok(n) if n > 0),
            "the blackholed instance answered"
        );
        started.elapsed()
    })
}

#[test]
fn a_services_connect_timeout_overrides_the_daemons() {
    let ns = Netns::new("timeouts");
    ns.ip(&["route", "add", "198.19.99.0/24", "dev", "lo"]);
    let fluxd = Fluxd::dataplane(&ns.name, &["--connect-timeout-ms", &DAEMON_MS.to_string()]);
    fluxd.ok(&[
        "service",
        "add",
        "slow",
        "--address",
        VIP,
        "--connect-timeout-ms",
        &SERVICE_MS.to_string(),
    ]);
    fluxd.add_instance("slow", "gone", BLACKHOLE);
    fluxd.wait_routed("slow");
    let settings = fluxd.debug()["services"][0]["settings"].clone();
    assert_eq!(settings, "timeouts: connect 300ms");

    let own = wait_for_reset(&ns);
    eprintln!("service's own limit ({SERVICE_MS} ms): reset after {own:?}");
    assert!(own >= Duration::from_millis(SERVICE_MS), "{own:?}");
    assert!(
        own < Duration::from_millis(DAEMON_MS),
        "{own:?}: the daemon's limit applied"
    );

    fluxd.ok(&["service", "set", "slow", "--connect-timeout-ms", "default"]);
    let applied = wait_until(Duration::from_secs(10), || {
        fluxd.debug()["services"][0].get("settings").is_none()
    });
    assert!(applied.is_some(), "{}", fluxd.debug());
    let daemon = wait_for_reset(&ns);
    eprintln!("daemon's limit ({DAEMON_MS} ms): reset after {daemon:?}");
    assert!(daemon >= Duration::from_millis(DAEMON_MS), "{daemon:?}");
    let info = fluxd.json(&["info", "slow"]);
    assert!(info[0].get("timeouts").is_none(), "{info}");
}

/// A backend that accepts and reads requests but never answers, for `deadline` at most.
fn mute_backend(ns: &Netns, addr: SocketAddrV4, deadline: Duration) {
    let listener = ns.run(move || {
        let l = std::net::TcpListener::bind(addr).unwrap();
        l.set_nonblocking(true).unwrap();
        l
    });
    std::thread::spawn(move || {
        let until = Instant::now() + deadline;
        let mut held = Vec::new();
        while Instant::now() < until {
            match listener.accept() {
                Ok((s, _)) => held.push(s),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
}

#[test]
fn an_http_services_response_timeout_overrides_the_daemons_per_request() {
    const HTTP_VIP: &str = "198.18.0.31:80";
    let ns = Netns::new("timeouts-http");
    let mute: SocketAddrV4 = "127.0.0.1:9300".parse().unwrap();
    mute_backend(&ns, mute, Duration::from_secs(30));
    let fluxd = Fluxd::dataplane(&ns.name, &["--http-response-timeout-ms", "5000"]);
    fluxd.ok(&[
        "service",
        "add",
        "mute",
        "--address",
        HTTP_VIP,
        "--protocol",
        "http",
        "--http-response-timeout-ms",
        "300",
    ]);
    fluxd.add_instance("mute", "m", mute);
    fluxd.wait_routed("mute");
    let vip: SocketAddrV4 = HTTP_VIP.parse().unwrap();
    let fluxd_socket = fluxd.socket.clone();
    let (first, second) = ns.run(move || {
        let mut c = Client::connect(vip).unwrap();
        let started = Instant::now();
        let first = c.get("mute").unwrap();
        let first = (
            first.status(),
            String::from_utf8_lossy(&first.body).into_owned(),
            started.elapsed(),
        );
        // The same client connection, after the service's limit changed.
        let out = support::fluxd::fluxctl(
            &fluxd_socket,
            &[
                "service",
                "set",
                "mute",
                "--http-response-timeout-ms",
                "700",
            ],
        );
        assert!(out.status.success(), "{out:?}");
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let second = c.get("mute").unwrap();
        let second = (
            second.status(),
            String::from_utf8_lossy(&second.body).into_owned(),
            started.elapsed(),
        );
        (first, second)
    });
    eprintln!("first: {first:?}, second: {second:?}");
    assert_eq!(first.0, 504, "{first:?}");
    assert!(first.1.contains("within 300 ms"), "{first:?}");
    assert!(
        first.2 < Duration::from_secs(5),
        "{first:?}: the daemon's limit applied"
    );
    assert_eq!(second.0, 504, "{second:?}");
    assert!(second.1.contains("within 700 ms"), "{second:?}");
    assert!(second.2 >= Duration::from_millis(700), "{second:?}");
}
