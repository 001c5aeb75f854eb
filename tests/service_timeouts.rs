//! Per-service time limits (issue 16): a service's own `--connect-timeout-ms` overrides
//! fluxd's, and `service set ... default` gives it back. The instance is an address whose SYNs
//! vanish (routed to `lo` inside the test's namespace, where it is no local address), so only
//! the connect timeout ends a client's wait.

mod support;

use std::io::Read;
use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use support::fluxd::{wait_until, Fluxd};
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
