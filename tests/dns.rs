//! Issue 16, part 1: fluxd's DNS responder, asked by a real client (`dig`, from
//! bind9-dnsutils) as a container or a host resolver would ask it. fluxd runs with its data
//! plane inside a network namespace the test creates; dig runs there too.
//!
//! Covered: A for a service's VIP (any case), SRV with the port and the target's address,
//! the instances of a service (A and SRV), only live ones (an instance failing its active
//! check leaves and comes back), NXDOMAIN with the SOA, no data for other types and for a
//! service without VIP, REFUSED for other zones, the same answers over TCP, forwarding to a
//! real resolver (dnsmasq) and SERVFAIL when none answers, answers while etcd is down, and the
//! queries counted by response code in /metrics.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::backend::Backend;
use support::etcd::{free_port, Etcd};
use support::fluxd::{wait_until, Fluxd};
use support::netns::Netns;

/// fluxd's DNS listener inside the test's namespace (its own port space: no clash).
const DNS_PORT: &str = "5353";
const HTTP: &str = "127.0.0.1:7070";

/// `dig @127.0.0.1 -p PORT ARGS` inside `ns` (None: in this process's namespace), one try.
fn dig_at(ns: Option<&Netns>, port: &str, args: &[&str]) -> String {
    let mut a = vec!["dig", "@127.0.0.1", "-p", port, "+time=3", "+tries=1"];
    a.extend_from_slice(args);
    let out = match ns {
        Some(ns) => ns.exec(&a),
        None => Command::new(a[0]).args(&a[1..]).output().unwrap(),
    };
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dig(ns: &Netns, args: &[&str]) -> String {
    dig_at(Some(ns), DNS_PORT, args)
}

/// The `+short` answer lines, sorted.
fn short(ns: &Netns, args: &[&str]) -> Vec<String> {
    let mut a = vec!["+short"];
    a.extend_from_slice(args);
    let mut lines: Vec<String> = dig(ns, &a).lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// The status dig prints in its header (`NOERROR`, `NXDOMAIN`, ...).
fn status(out: &str) -> &str {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("no reply")
}

/// The records of one section of dig's full output (`ANSWER`, `AUTHORITY`, `ADDITIONAL`),
/// whitespace-normalised.
fn section(out: &str, name: &str) -> Vec<String> {
    let head = format!(";; {name} SECTION:");
    out.lines()
        .skip_while(|l| !l.starts_with(&head))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// GET /metrics from inside the namespace.
fn scrape(ns: &Netns) -> String {
    ns.run(|| {
        let mut s = TcpStream::connect(HTTP).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

/// The value of one sample line of /metrics, 0 if absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn service_names_from_the_catalog_over_udp_and_tcp() {
    let ns = Netns::new("dns");
    let dns = format!("127.0.0.1:{DNS_PORT}");
    let f = Fluxd::dataplane(&ns.name, &["--dns-listen", &dns, "--http", HTTP]);
    let a = Backend::start(&ns, "a", 9101);
    f.ok(&[
        "service",
        "add",
        "web",
        "--address",
        "198.18.0.30:80",
        "--health",
        "tcp",
        "--health-interval",
        "300ms",
        "--health-timeout",
        "200ms",
        "--health-fall",
        "1",
        "--health-rise",
        "1",
    ]);
    f.ok(&[
        "service",
        "add",
        "edge",
        "--address",
        "none",
        "--instance-port",
        "80",
    ]);
    f.add_instance("web", "a", a.addr);
    // Nothing listens at b's address yet: its check fails.
    f.add_instance("web", "b", "127.0.0.2:9102");

    // fluxd debug lists the listener.
    assert_eq!(f.debug()["dns"], serde_json::json!([dns]));
    // The VIP, whatever the case of the name.
    assert_eq!(short(&ns, &["web.flux", "A"]), ["198.18.0.30"]);
    assert_eq!(short(&ns, &["WeB.FluX.", "A"]), ["198.18.0.30"]);
    let out = dig(&ns, &["web.flux", "A"]);
    assert_eq!(status(&out), "NOERROR");
    assert!(out.contains(" aa "), "authoritative: {out}");
    assert_eq!(section(&out, "ANSWER"), ["web.flux. 5 IN A 198.18.0.30"]);

    // SRV: the VIP's port, the target's address in the additional section.
    let out = dig(&ns, &["_web._tcp.flux", "SRV"]);
    assert_eq!(
        section(&out, "ANSWER"),
        ["_web._tcp.flux. 5 IN SRV 0 0 80 web.flux."]
    );
    assert_eq!(
        section(&out, "ADDITIONAL"),
        ["web.flux. 5 IN A 198.18.0.30"]
    );

    // Instances: only the live one while b fails its check.
    let only_a = wait_until(Duration::from_secs(10), || {
        short(&ns, &["web.instances.flux", "A"]) == ["127.0.0.1"]
    });
    assert!(
        only_a.is_some(),
        "{:?}",
        dig(&ns, &["web.instances.flux", "A"])
    );
    assert_eq!(
        short(&ns, &["web.instances.flux", "SRV"]),
        ["0 0 9101 a.web.instances.flux."]
    );
    assert_eq!(short(&ns, &["a.web.instances.flux", "A"]), ["127.0.0.1"]);
    assert_eq!(
        status(&dig(&ns, &["b.web.instances.flux", "A"])),
        "NXDOMAIN"
    );
    // b starts listening: its check passes and it is back.
    let b = ns.run(|| std::net::TcpListener::bind("127.0.0.2:9102").unwrap());
    let both = wait_until(Duration::from_secs(10), || {
        short(&ns, &["web.instances.flux", "A"]) == ["127.0.0.1", "127.0.0.2"]
    });
    assert!(
        both.is_some(),
        "{:?}",
        dig(&ns, &["web.instances.flux", "A"])
    );
    let out = dig(&ns, &["web.instances.flux", "SRV"]);
    assert_eq!(
        section(&out, "ANSWER"),
        [
            "web.instances.flux. 5 IN SRV 0 0 9101 a.web.instances.flux.",
            "web.instances.flux. 5 IN SRV 0 0 9102 b.web.instances.flux.",
        ]
    );
    assert_eq!(
        section(&out, "ADDITIONAL"),
        [
            "a.web.instances.flux. 5 IN A 127.0.0.1",
            "b.web.instances.flux. 5 IN A 127.0.0.2",
        ]
    );
    // A drained instance gets no new connection from the proxy, so DNS does not hand it out
    // either; undrained, it is back.
    f.ok(&["instance", "drain", "web", "b"]);
    let drained = wait_until(Duration::from_secs(10), || {
        short(&ns, &["web.instances.flux", "A"]) == ["127.0.0.1"]
    });
    assert!(
        drained.is_some(),
        "{:?}",
        dig(&ns, &["web.instances.flux", "A"])
    );
    f.ok(&["instance", "undrain", "web", "b"]);
    let undrained = wait_until(Duration::from_secs(10), || {
        short(&ns, &["web.instances.flux", "A"]) == ["127.0.0.1", "127.0.0.2"]
    });
    assert!(
        undrained.is_some(),
        "{:?}",
        dig(&ns, &["web.instances.flux", "A"])
    );
    // And it leaves again when it stops listening.
    drop(b);
    let gone = wait_until(Duration::from_secs(10), || {
        short(&ns, &["web.instances.flux", "A"]) == ["127.0.0.1"]
    });
    assert!(
        gone.is_some(),
        "{:?}",
        dig(&ns, &["web.instances.flux", "A"])
    );

    // Unknown names: NXDOMAIN with the zone's SOA for negative caching.
    for name in ["nope.flux", "_nope._tcp.flux", "nope.instances.flux"] {
        let out = dig(&ns, &[name, "A"]);
        assert_eq!(status(&out), "NXDOMAIN", "{name}: {out}");
        let soa = section(&out, "AUTHORITY");
        assert!(
            soa.len() == 1 && soa[0].starts_with("flux. 5 IN SOA "),
            "{out}"
        );
    }
    // Known names, other types, and a service without VIP: NOERROR, no data.
    for (name, t) in [
        ("web.flux", "AAAA"),
        ("web.flux", "TXT"),
        ("edge.flux", "A"),
    ] {
        let out = dig(&ns, &[name, t]);
        assert_eq!(status(&out), "NOERROR", "{name} {t}: {out}");
        assert!(section(&out, "ANSWER").is_empty(), "{out}");
    }
    // A VIP the guard refuses here (it is an address of this host) is not handed out: the
    // name exists, with no address, as long as the refusal lasts.
    ns.ip(&["link", "add", "g0", "type", "veth", "peer", "name", "g1"]);
    ns.ip(&["addr", "add", "198.18.5.5/32", "dev", "g0"]);
    ns.ip(&["link", "set", "g0", "up"]);
    f.ok(&["service", "add", "mine", "--address", "198.18.5.5:80"]);
    let refused = wait_until(Duration::from_secs(10), || {
        let out = dig(&ns, &["mine.flux", "A"]);
        status(&out) == "NOERROR" && section(&out, "ANSWER").is_empty()
    });
    assert!(refused.is_some(), "{}", dig(&ns, &["mine.flux", "A"]));
    ns.ip(&["addr", "del", "198.18.5.5/32", "dev", "g0"]);
    let routed = wait_until(Duration::from_secs(10), || {
        short(&ns, &["mine.flux", "A"]) == ["198.18.5.5"]
    });
    assert!(routed.is_some(), "{}", dig(&ns, &["mine.flux", "A"]));

    // Other zones: refused (no --dns-forward).
    assert_eq!(status(&dig(&ns, &["example.com", "A"])), "REFUSED");

    // The same over TCP.
    let out = dig(&ns, &["+tcp", "web.flux", "A"]);
    assert_eq!(section(&out, "ANSWER"), ["web.flux. 5 IN A 198.18.0.30"]);
    assert_eq!(status(&dig(&ns, &["+tcp", "nope.flux", "A"])), "NXDOMAIN");
    // Several queries on one TCP connection (dig +keepopen with two names).
    let out = dig(
        &ns,
        &[
            "+tcp",
            "+keepopen",
            "web.flux",
            "A",
            "_web._tcp.flux",
            "SRV",
        ],
    );
    assert_eq!(out.matches("status: NOERROR").count(), 2, "{out}");

    // A new service is answered at once; a removed one is gone.
    f.ok(&["service", "add", "db", "--address", "198.18.0.31:5432"]);
    assert!(wait_until(Duration::from_secs(5), || {
        short(&ns, &["db.flux", "A"]) == ["198.18.0.31"]
    })
    .is_some());
    f.ok(&["service", "rm", "db"]);
    assert!(wait_until(Duration::from_secs(5), || {
        status(&dig(&ns, &["db.flux", "A"])) == "NXDOMAIN"
    })
    .is_some());

    // Counted by response code.
    let metrics = scrape(&ns);
    assert!(
        sample(&metrics, "flux_dns_queries_total{rcode=\"NOERROR\"}") >= 10.0,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "flux_dns_queries_total{rcode=\"NXDOMAIN\"}") >= 5.0,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "flux_dns_queries_total{rcode=\"REFUSED\"}") >= 1.0,
        "{metrics}"
    );
    drop(a);
}

/// A dnsmasq on loopback inside `ns`, authoritative for `example.test` only.
struct Dnsmasq {
    child: Child,
}

impl Dnsmasq {
    fn start(ns: &Netns, port: u16) -> Dnsmasq {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "dnsmasq", "--keep-in-foreground"])
            .args([
                "--no-resolv",
                "--no-hosts",
                "--user=root",
                "--listen-address=127.0.0.1",
            ])
            .args(["--bind-interfaces", "--pid-file=", "--conf-file=/dev/null"])
            .arg(format!("--port={port}"))
            .arg("--address=/example.test/192.0.2.55")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (apt-get install dnsmasq-base)");
        let port = port.to_string();
        let up = wait_until(Duration::from_secs(5), || {
            dig_at(Some(ns), &port, &["+short", "www.example.test"]).trim() == "192.0.2.55"
        });
        assert!(up.is_some(), "dnsmasq did not start");
        Dnsmasq { child }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn other_zones_are_forwarded_with_dns_forward() {
    let ns = Netns::new("dnsfwd");
    let _resolver = Dnsmasq::start(&ns, 5454);
    let dns = format!("127.0.0.1:{DNS_PORT}");
    let f = Fluxd::dataplane(
        &ns.name,
        &[
            "--dns-listen",
            &dns,
            "--dns-forward=127.0.0.1:5454",
            "--http",
            HTTP,
        ],
    );
    f.ok(&["service", "add", "web", "--address", "198.18.0.30:80"]);
    // Other zones: the resolver's answer, over UDP and TCP; fluxd's own names stay its own.
    assert_eq!(short(&ns, &["www.example.test", "A"]), ["192.0.2.55"]);
    assert_eq!(
        short(&ns, &["+tcp", "www.example.test", "A"]),
        ["192.0.2.55"]
    );
    let out = dig(&ns, &["www.example.test", "A"]);
    assert_eq!(status(&out), "NOERROR");
    assert!(out.contains(" ra"), "recursion available: {out}");
    assert_eq!(short(&ns, &["web.flux", "A"]), ["198.18.0.30"]);
    // dnsmasq's own answer for a name it does not know (no upstream: REFUSED), relayed.
    assert_ne!(status(&dig(&ns, &["www.example.org", "A"])), "no reply");
    let metrics = scrape(&ns);
    assert!(
        sample(&metrics, "flux_dns_forwarded_total{result=\"answered\"}") >= 3.0,
        "{metrics}"
    );
}

#[test]
fn forwarding_without_a_resolver_answers_servfail() {
    let ns = Netns::new("dnsnofwd");
    let dns = format!("127.0.0.1:{DNS_PORT}");
    // Nothing listens on 5455: the resolver refuses (ICMP) or times out.
    let _f = Fluxd::dataplane(
        &ns.name,
        &["--dns-listen", &dns, "--dns-forward=127.0.0.1:5455"],
    );
    assert_eq!(status(&dig(&ns, &["www.example.test", "A"])), "SERVFAIL");
}

#[test]
fn dns_settings_are_checked_at_start() {
    for (args, field) in [
        (vec!["--dns-listen", "localhost:53"], "dns_listen:"),
        (
            vec!["--dns-listen", "127.0.0.1:5300", "--dns-domain", "a..b"],
            "dns_domain:",
        ),
        (vec!["--dns-domain", "flux"], "dns_domain:"),
        (
            vec!["--dns-listen", "127.0.0.1:5300", "--dns-forward=nowhere"],
            "dns_forward:",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Fluxd::new(dir.path().to_path_buf(), "h1", &args);
        f.spawn();
        let status = f.wait_exit(Duration::from_secs(10)).expect("fluxd exits");
        assert_eq!(status.code(), Some(2), "{args:?}: {}", f.log());
        let log = f.log();
        assert!(log.contains(field), "{args:?}: {log}");
    }
}

#[test]
fn names_resolve_while_etcd_is_down() {
    let mut etcd = Etcd::start();
    let port = free_port().to_string();
    let dns = format!("127.0.0.1:{port}");
    let f = Fluxd::etcd(&etcd.endpoint, "h1", &["--dns-listen", &dns]);
    f.ok(&["service", "add", "web", "--address", "198.18.0.40:80"]);
    f.add_instance("web", "s1", "192.0.2.10:8080");
    let vip = || dig_at(None, &port, &["+short", "web.flux", "A"]);
    assert!(wait_until(Duration::from_secs(5), || vip().trim() == "198.18.0.40").is_some());
    etcd.stop();
    // The followed catalog answers: the VIP, and (no data plane here) every instance with an
    // address.
    for _ in 0..3 {
        assert_eq!(vip().trim(), "198.18.0.40");
        assert_eq!(
            dig_at(None, &port, &["+short", "web.instances.flux", "A"]).trim(),
            "192.0.2.10"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    etcd.restart();
}
