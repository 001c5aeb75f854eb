//! Issue 7 acceptance for metrics: `/metrics` is scraped while a bounded load runs; the output
//! must parse with the reference parser (Python's prometheus_client, OpenMetrics), and each
//! instance's connection counter must rise by exactly the connections it served.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::time::Duration;

use support::backend::{who_serves, Backend};
use support::fluxd::{wait_until, Fluxd};
use support::netns::Netns;
use support::openmetrics;

const VIP: &str = "198.18.0.10:80";
const HTTP: &str = "127.0.0.1:7070";

/// GET /metrics from inside the namespace.
fn scrape(ns: &Netns) -> String {
    ns.run(|| {
        let mut s = TcpStream::connect(HTTP).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("application/openmetrics-text"), "{head}");
        body.to_string()
    })
}

/// Parses with the reference parser and returns connections_total per instance.
fn parse(text: &str) -> HashMap<String, f64> {
    openmetrics::samples(text)
        .into_iter()
        .filter(|s| s.name == "flux_connections_total")
        .map(|s| (s.labels["instance"].clone(), s.value))
        .collect()
}

#[test]
fn counters_rise_by_the_connections_made_per_instance() {
    let ns = Netns::new("metrics");
    let fluxd = Fluxd::dataplane(&ns.name, &["--http", HTTP]);
    fluxd.ok(&["service", "add", "web", "--address", VIP]);
    let backends: Vec<Backend> = (0..2)
        .map(|i| Backend::start(&ns, &format!("b{i}"), 9000 + i))
        .collect();
    for b in &backends {
        fluxd.add_instance("web", &b.name, b.addr);
    }
    let vip: SocketAddrV4 = VIP.parse().unwrap();
    fluxd.wait_routed("web");
    // Warm up, so both instances have series, then take the baseline.
    let warm = ns.run(move || wait_until(Duration::from_secs(5), || who_serves(vip).is_ok()));
    assert!(warm.is_some());
    let before = parse(&scrape(&ns));

    // A bounded load: 300 connections, scraped once in the middle.
    let load = ns.spawn(move || {
        let mut served: HashMap<String, f64> = HashMap::new();
        for _ in 0..300 {
            *served.entry(who_serves(vip).unwrap()).or_default() += 1.0;
        }
        served
    });
    let during = scrape(&ns);
    parse(&during);
    let served = load.join().unwrap();
    let after = parse(&scrape(&ns));
    for b in &backends {
        let rise = after.get(&b.name).copied().unwrap_or(0.0)
            - before.get(&b.name).copied().unwrap_or(0.0);
        assert_eq!(
            rise,
            served.get(&b.name).copied().unwrap_or(0.0),
            "{}: counter rose by {rise}, served {served:?}",
            b.name
        );
    }
    let text = scrape(&ns);
    for name in [
        "flux_connections_active",
        "flux_connect_failures_total",
        "flux_transferred_bytes_total",
        "flux_connect_duration_seconds_bucket",
        "flux_connection_duration_seconds_count",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert!(text.contains(r#"direction="to_client""#));
    drop(fluxd);
}
