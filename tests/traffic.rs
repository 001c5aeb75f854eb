//! Traffic control (issue 16, parts 3, 4 and 6) end to end: real fluxd, real etcd, real TCP
//! backends, all inside a network namespace the test creates. Rule weights share connections
//! (90/10 over 2,000 connections), weight 0 drains a rule without touching an open connection,
//! `fluxctl instance drain`/`undrain` take one instance out and back, and client-IP affinity
//! keeps a client on one instance.
//!
//! Instances of rules are container instances: the test writes their records into etcd as
//! another host's Docker agent writes them (as `etcd_hosts.rs` does), pointing at backends on
//! the namespace's loopback, so no dockerd is needed to exercise the balancer's rule weights.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::Duration;

use support::backend::{who_serves, Backend};
use support::etcd::Etcd;
use support::fluxd::{wait_until, Fluxd};
use support::netns::Netns;

const VIP: &str = "198.18.0.10:80";
const STICKY_VIP: &str = "198.18.0.11:80";

/// The record another host's agent writes for a container matched by `rule`.
fn container_record(name: &str, rule: &str, tag: &str, addr: SocketAddrV4) -> String {
    format!(
        r#"{{"service":"web","name":"{name}","origin":"container","host":"h2","rule":"{rule}","container":{{"id":"{name}0000","name":"{name}","image":"docker.io/library/app","tag":"{tag}"}},"address":"{addr}"}}"#
    )
}

/// `fluxd debug`'s traffic line for `service`, if any.
fn traffic_line(fluxd: &Fluxd, service: &str) -> String {
    fluxd.debug()["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == service)
        .and_then(|s| s["traffic"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Waits until this host's proxy routes `service` to `n` instances.
fn wait_backends(fluxd: &Fluxd, service: &str, n: usize) {
    let count = || {
        fluxd.debug()["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == service)
            .map_or(0, |s| s["instances"].as_array().unwrap().len())
    };
    let seen = wait_until(Duration::from_secs(10), || count() == n);
    assert!(
        seen.is_some(),
        "{service}: {} instances routed, not {n}",
        count()
    );
}

fn wait_traffic(fluxd: &Fluxd, service: &str, wanted: &str) {
    let seen = wait_until(Duration::from_secs(10), || {
        traffic_line(fluxd, service).contains(wanted)
    });
    assert!(
        seen.is_some(),
        "{service}: traffic never showed {wanted:?}: {:?}\n{}",
        traffic_line(fluxd, service),
        fluxd.log()
    );
}

/// `n` connections through `vip` from the namespace, counted by the instance that answered.
fn spread(ns: &Netns, vip: &str, n: usize) -> HashMap<String, usize> {
    let vip: SocketAddrV4 = vip.parse().unwrap();
    ns.run(move || {
        let mut counts = HashMap::new();
        for _ in 0..n {
            let who = who_serves(vip).unwrap_or_else(|e| format!("error: {e}"));
            *counts.entry(who).or_insert(0) += 1;
        }
        counts
    })
}

#[test]
fn weights_drain_and_affinity_on_a_real_data_plane() {
    let ns = Netns::new("traffic");
    let etcd = Etcd::start_in(&ns.name, Ipv4Addr::LOCALHOST);
    let store = format!(
        "--store=etcd://{}",
        etcd.endpoint.trim_start_matches("http://")
    );
    let fluxd = Fluxd::in_netns(&ns.name, "h1", &[&store]);
    let backends: Vec<Backend> = [("v1-a", 9001), ("v1-b", 9002), ("v2-a", 9003)]
        .iter()
        .map(|(name, port)| Backend::start(&ns, name, *port))
        .collect();

    // Canary: v1 at 90, v2 at 10.
    fluxd.ok(&["service", "add", "web", "--address", VIP]);
    fluxd.ok(&["select", "web", "v1", "--tag", "1", "--weight", "90"]);
    fluxd.ok(&["select", "web", "v2", "--tag", "2", "--weight", "10"]);
    for b in &backends {
        let (rule, tag) = if b.name.starts_with("v1") {
            ("v1", "1")
        } else {
            ("v2", "2")
        };
        let key = format!("/flux/instances/web/{}", b.name);
        etcd.ctl(&["put", &key, &container_record(&b.name, rule, tag, b.addr)]);
    }
    fluxd.wait_routed("web");
    wait_traffic(&fluxd, "web", "weights v1=90 v2=10");
    wait_backends(&fluxd, "web", 3);
    let info = fluxd.ok(&["info", "web"]);
    assert!(info.contains("WEIGHT"), "{info}");
    let list = fluxd.ok(&["list", "-v"]);
    assert!(
        list.contains("weight=90") && list.contains("weight=10"),
        "{list}"
    );

    let n = 2000;
    let counts = spread(&ns, VIP, n);
    let v2 = counts.get("v2-a").copied().unwrap_or(0);
    let v1 = counts.get("v1-a").copied().unwrap_or(0) + counts.get("v1-b").copied().unwrap_or(0);
    assert_eq!(v1 + v2, n, "every connection served: {counts:?}");
    let v2_share = 100.0 * v2 as f64 / n as f64;
    eprintln!("90/10 over {n} connections: v2 got {v2_share:.1}% ({counts:?})");
    assert!(
        (7.0..=13.0).contains(&v2_share),
        "v2 share {v2_share:.1}%: {counts:?}"
    );

    // Weight 0 drains v2: an open connection to it keeps working, new ones never reach it.
    let vip: SocketAddrV4 = VIP.parse().unwrap();
    let held = ns.run(move || {
        for _ in 0..500 {
            let mut s = TcpStream::connect_timeout(&vip.into(), Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            if line == "v2-a\n" {
                s.write_all(b"x").unwrap();
                let mut one = [0u8; 1];
                s.read_exact(&mut one).unwrap();
                return Some(s);
            }
        }
        None
    });
    let mut held = held.expect("no connection reached v2 in 500 tries");
    fluxd.ok(&["select", "web", "v2", "--tag", "2", "--weight", "0"]);
    wait_traffic(&fluxd, "web", "v2=0");
    let counts = spread(&ns, VIP, 300);
    assert_eq!(
        counts.get("v2-a"),
        None,
        "a drained rule got new connections: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 300, "{counts:?}");
    held.write_all(b"still here").unwrap();
    let mut echo = [0u8; 10];
    held.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"still here", "the open connection kept working");
    drop(held);

    // One instance drained by hand, then undrained.
    fluxd.ok(&["instance", "drain", "web", "v1-a"]);
    wait_traffic(&fluxd, "web", "drained v1-a v2-a");
    let q = fluxd.json(&["query", "--service", "web"]);
    let drained: Vec<&str> = q
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["drained"] == true)
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(drained, ["v1-a"], "{q}");
    assert!(fluxd.ok(&["query", "--service", "web"]).contains("drained"));
    let counts = spread(&ns, VIP, 100);
    assert_eq!(counts.get("v1-b"), Some(&100), "{counts:?}");
    // The mark survives the agent writing the record again (a re-enrolment).
    etcd.ctl(&[
        "put",
        "/flux/instances/web/v1-a",
        &container_record("v1-a", "v1", "1", backends[0].addr),
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let counts = spread(&ns, VIP, 50);
    assert_eq!(counts.get("v1-b"), Some(&50), "{counts:?}");
    fluxd.ok(&["instance", "undrain", "web", "v1-a"]);
    wait_traffic(&fluxd, "web", "drained v2-a");
    let counts = spread(&ns, VIP, 100);
    assert!(counts.get("v1-a").copied().unwrap_or(0) > 20, "{counts:?}");

    // Unknown names: one line, exit status 2, nothing written.
    for (args, field) in [
        (["instance", "drain", "web", "nope"], "instance"),
        (["instance", "drain", "nope", "v1-a"], "service"),
    ] {
        let out = fluxd.ctl(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(field), "{err}");
    }
    let out = fluxd.ctl(&["select", "web", "v3", "--tag", "3", "--weight", "1001"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("weight"));

    // Affinity: one client IP, one instance; clients spread; a failed instance's clients move
    // to one other instance each.
    fluxd.ok(&[
        "service",
        "add",
        "sticky",
        "--address",
        STICKY_VIP,
        "--affinity",
        "client-ip",
    ]);
    let sticky: Vec<Backend> = (0..3)
        .map(|i| Backend::start(&ns, &format!("s{i}"), 9100 + i))
        .collect();
    for b in &sticky {
        fluxd.add_instance("sticky", &b.name, b.addr);
    }
    fluxd.wait_routed("sticky");
    wait_traffic(&fluxd, "sticky", "affinity client-ip");
    wait_backends(&fluxd, "sticky", 3);
    let from = |src: Ipv4Addr, n: usize| -> Vec<String> {
        let vip: SocketAddrV4 = STICKY_VIP.parse().unwrap();
        ns.run(move || {
            (0..n)
                .map(|_| {
                    let s =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                            .unwrap();
                    s.bind(&SocketAddrV4::new(src, 0).into()).unwrap();
                    s.connect_timeout(&vip.into(), Duration::from_secs(5))
                        .unwrap();
                    let s: TcpStream = s.into();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut line = String::new();
                    BufReader::new(&s).read_line(&mut line).unwrap();
                    line.trim().to_string()
                })
                .collect()
        })
    };
    let mut chosen = HashMap::new();
    for k in 1..=20u8 {
        let src = Ipv4Addr::new(127, 0, 0, k);
        let seen = from(src, 20);
        assert!(seen.iter().all(|s| *s == seen[0]), "{src}: {seen:?}");
        chosen.insert(src, seen[0].clone());
    }
    let used: std::collections::BTreeSet<&String> = chosen.values().collect();
    assert!(
        used.len() >= 2,
        "20 client IPs all on one instance: {chosen:?}"
    );
    let info = fluxd.ok(&["info", "sticky"]);
    assert!(info.contains("affinity client-ip"), "{info}");

    let (&victim_ip, victim) = chosen.iter().next().unwrap();
    let victim = victim.clone();
    let mut sticky = sticky;
    let at = sticky.iter().position(|b| b.name == victim).unwrap();
    sticky[at].kill();
    // The first connection after the kill may be the one that finds it failed; then the client
    // stays on the next-highest instance.
    let after = from(victim_ip, 20);
    assert!(
        after.iter().all(|s| *s == after[0] && *s != victim),
        "{after:?}"
    );
    for (ip, inst) in &chosen {
        if *inst != victim {
            assert_eq!(from(*ip, 3), vec![inst.clone(); 3], "{ip} moved");
        }
    }
    let debug = std::process::Command::new(env!("CARGO_BIN_EXE_fluxd"))
        .args(["debug", "--api"])
        .arg(format!("unix://{}", fluxd.socket.display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&debug.stdout);
    assert!(text.contains("TRAFFIC CONTROL"), "{text}");
}

/// The record host h2's agent writes for container `name` of `service` (rule `all`).
fn remote_record(service: &str, name: &str, addr: SocketAddrV4) -> String {
    format!(
        r#"{{"service":"{service}","name":"{name}","origin":"container","host":"h2","rule":"all","container":{{"id":"{name}0000","name":"{name}","image":"docker.io/library/app","tag":"1"}},"address":"{addr}"}}"#
    )
}

#[test]
fn locality_prefers_this_hosts_instances_and_host_only_keeps_to_them() {
    let ns = Netns::new("locality");
    let etcd = Etcd::start_in(&ns.name, Ipv4Addr::LOCALHOST);
    let store = format!(
        "--store=etcd://{}",
        etcd.endpoint.trim_start_matches("http://")
    );
    let fluxd = Fluxd::in_netns(&ns.name, "h1", &[&store]);
    let mut here = Backend::start(&ns, "here", 9201);
    let there = Backend::start(&ns, "there", 9202);
    let mut here2 = Backend::start(&ns, "here2", 9203);
    let there2 = Backend::start(&ns, "there2", 9204);
    for (service, vip, locality, local, remote) in [
        ("near", VIP, "prefer-host", &here, &there),
        ("only", STICKY_VIP, "host-only", &here2, &there2),
    ] {
        fluxd.ok(&[
            "service",
            "add",
            service,
            "--address",
            vip,
            "--locality",
            locality,
        ]);
        fluxd.ok(&["select", service, "all", "--image", "app"]);
        // A static instance on loopback runs on this host; h2's container does not.
        fluxd.add_instance(service, &local.name, local.addr);
        let key = format!("/flux/instances/{service}/{}", remote.name);
        etcd.ctl(&[
            "put",
            &key,
            &remote_record(service, &remote.name, remote.addr),
        ]);
        fluxd.wait_routed(service);
        wait_traffic(
            &fluxd,
            service,
            &format!("locality {locality} (local: {})", local.name),
        );
        let counts = spread(&ns, vip, 50);
        assert_eq!(
            counts.get(local.name.as_str()),
            Some(&50),
            "{service}: {counts:?}"
        );
    }
    let info = fluxd.ok(&["info", "near"]);
    assert!(info.contains("locality prefer-host"), "{info}");

    // No live instance here: prefer-host goes to the other host's, host-only refuses.
    here.kill();
    here2.kill();
    let counts = spread(&ns, VIP, 50);
    assert_eq!(counts.get("there"), Some(&50), "{counts:?}");
    let counts = spread(&ns, STICKY_VIP, 10);
    assert_eq!(
        counts.get("there2"),
        None,
        "host-only left the host: {counts:?}"
    );
    assert!(counts.keys().all(|k| k.starts_with("error")), "{counts:?}");

    // Kernel forwarding cannot honour locality or affinity: refused, naming the field.
    for flag in [["--locality", "host-only"], ["--affinity", "client-ip"]] {
        let mut args = vec!["service", "add", "bulk", "--address", "198.18.0.12:80"];
        args.extend(["--forward", "kernel"]);
        args.extend(flag);
        let out = fluxd.ctl(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.starts_with("fluxctl: forward: "), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let out = fluxd.ctl(&[
        "service",
        "add",
        "x",
        "--address",
        "198.18.0.13:80",
        "--locality",
        "near",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.starts_with("fluxctl: locality: "), "{err}");
    assert!(fluxd.json(&["list"]).as_array().unwrap().len() == 2);

    // Drain in a service with no other traffic control: two static instances, one drained.
    let p1 = Backend::start(&ns, "p1", 9301);
    let p2 = Backend::start(&ns, "p2", 9302);
    fluxd.ok(&["service", "add", "plain", "--address", "198.18.0.14:80"]);
    fluxd.add_instance("plain", "p1", p1.addr);
    fluxd.add_instance("plain", "p2", p2.addr);
    fluxd.wait_routed("plain");
    wait_backends(&fluxd, "plain", 2);
    fluxd.ok(&["instance", "drain", "plain", "p1"]);
    wait_traffic(&fluxd, "plain", "drained p1");
    let counts = spread(&ns, "198.18.0.14:80", 30);
    assert_eq!(counts.get("p2"), Some(&30), "{counts:?}");
    fluxd.ok(&["instance", "undrain", "plain", "p1"]);
    let back = wait_until(Duration::from_secs(10), || {
        traffic_line(&fluxd, "plain").is_empty()
    });
    assert!(back.is_some(), "{}", traffic_line(&fluxd, "plain"));
    let counts = spread(&ns, "198.18.0.14:80", 30);
    assert_eq!(counts.get("p1"), Some(&15), "round robin again: {counts:?}");
}

/// For `http` services affinity applies to each request: on one kept-alive connection (where
/// round robin would alternate per request) and across connections, one client IP gets one
/// instance.
#[test]
fn http_affinity_holds_per_request() {
    use support::http_backend::{Client, HttpBackend};
    let ns = Netns::new("affinity-http");
    let fluxd = Fluxd::dataplane(&ns.name, &[]);
    let backends: Vec<HttpBackend> = (0..3)
        .map(|i| HttpBackend::start(&ns, &format!("h{i}"), 9400 + i, 200))
        .collect();
    fluxd.ok(&[
        "service",
        "add",
        "api",
        "--address",
        VIP,
        "--protocol",
        "http",
        "--affinity",
        "client-ip",
    ]);
    for (i, b) in backends.iter().enumerate() {
        fluxd.add_instance("api", &format!("h{i}"), b.addr);
    }
    fluxd.wait_routed("api");
    wait_traffic(&fluxd, "api", "affinity client-ip");
    wait_backends(&fluxd, "api", 3);
    let vip: SocketAddrV4 = VIP.parse().unwrap();
    let seen: Vec<String> = ns.run(move || {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let mut c = Client::connect(vip).unwrap();
            for _ in 0..10 {
                let m = c.get("api").unwrap();
                assert_eq!(m.status(), 200);
                seen.push(m.header("x-backend").to_string());
            }
        }
        seen
    });
    assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
    // Without affinity the same requests spread (so the check above can fail).
    fluxd.ok(&["service", "rm", "api"]);
    fluxd.ok(&[
        "service",
        "add",
        "api",
        "--address",
        VIP,
        "--protocol",
        "http",
    ]);
    for (i, b) in backends.iter().enumerate() {
        fluxd.add_instance("api", &format!("h{i}"), b.addr);
    }
    fluxd.wait_routed("api");
    wait_backends(&fluxd, "api", 3);
    let spread: std::collections::BTreeSet<String> = ns.run(move || {
        let mut c = Client::connect(vip).unwrap();
        (0..10)
            .map(|_| c.get("api").unwrap().header("x-backend").to_string())
            .collect()
    });
    assert_eq!(spread.len(), 3, "{spread:?}");
}

/// A kernel-forwarded service honours drain: the drained instance is on standby (no DNAT rule
/// for new connections, its established connections kept), and weights other than 0 or 100
/// are refused since the kernel picks at random.
#[test]
fn kernel_forwarding_honours_drain_and_refuses_other_weights() {
    let ns = Netns::new("traffic-kernel");
    let fluxd = Fluxd::dataplane(&ns.name, &[]);
    let vip: SocketAddrV4 = "198.18.0.30:80".parse().unwrap();
    fluxd.ok(&[
        "service",
        "add",
        "bulk",
        "--address",
        &vip.to_string(),
        "--forward",
        "kernel",
    ]);
    let b0 = Backend::start(&ns, "b0", 9600);
    let b1 = Backend::start(&ns, "b1", 9601);
    fluxd.add_instance("bulk", "b0", b0.addr);
    fluxd.add_instance("bulk", "b1", b1.addr);
    let dnat_to = |port: u16| {
        ns.nat_table()
            .lines()
            .filter(|l| l.contains("DNAT") && l.contains(&format!("127.0.0.1:{port}")))
            .count()
    };
    let both = wait_until(Duration::from_secs(10), || {
        dnat_to(9600) == 1 && dnat_to(9601) == 1
    });
    assert!(both.is_some(), "{}", ns.nat_table());
    let held = ns.run(move || {
        for _ in 0..200 {
            let s = TcpStream::connect_timeout(&vip.into(), Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            if line == "b1\n" {
                return Some(s);
            }
        }
        None
    });
    let mut held = held.expect("no connection reached b1");

    fluxd.ok(&["instance", "drain", "bulk", "b1"]);
    let standby = wait_until(Duration::from_secs(10), || dnat_to(9601) == 0);
    assert!(standby.is_some(), "{}", ns.nat_table());
    let counts = spread(&ns, "198.18.0.30:80", 50);
    assert_eq!(counts.get("b0"), Some(&50), "{counts:?}");
    held.write_all(b"kept").unwrap();
    let mut echo = [0u8; 4];
    held.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"kept", "the drained instance's connection was kept");

    fluxd.ok(&["instance", "undrain", "bulk", "b1"]);
    let back = wait_until(Duration::from_secs(10), || dnat_to(9601) == 1);
    assert!(back.is_some(), "{}", ns.nat_table());

    let out = fluxd.ctl(&["select", "bulk", "v1", "--tag", "1", "--weight", "50"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.starts_with("fluxctl: weight: "), "{err}");
    fluxd.ok(&["select", "bulk", "v1", "--tag", "1", "--weight", "0"]);
}
