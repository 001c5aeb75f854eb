//! Kernel forwarding (`Desired::forwards`) against real iptables, conntrack and connections,
//! each test in network namespaces it creates and deletes itself. Needs root; skips otherwise.

// Shared with the other namespace tests, which use the parts this file does not.
#[allow(dead_code)]
mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::Duration;

use netfilter::{annotate, render, Desired, Destination, Forward, Redirect, Runner, Unforwarded};
use support::netns::Netns;

const PROXY_PORT: u16 = 15001;
const VIP: &str = "198.18.0.12:80";

fn vip() -> SocketAddrV4 {
    VIP.parse().expect("valid")
}

fn local(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)
}

fn destination(instance: &str, addr: SocketAddrV4) -> Destination {
    Destination {
        instance: instance.into(),
        addr,
        standby: false,
    }
}

/// `bulk` at [`VIP`] forwarded to `destinations`, beside a proxied service and a refused one,
/// hooked from `bridges`.
fn forwarding(destinations: Vec<Destination>, bridges: &[&str]) -> Desired {
    Desired {
        redirects: vec![Redirect {
            service: "web".into(),
            vip: "198.18.0.10:80".parse().expect("valid"),
        }],
        rejects: vec![Redirect {
            service: "idle".into(),
            vip: "198.18.0.11:80".parse().expect("valid"),
        }],
        reject_empty: true,
        forwards: vec![Forward {
            service: "bulk".into(),
            vip: vip(),
            destinations,
        }],
        proxy_port: PROXY_PORT,
        bridge_interfaces: bridges.iter().map(|s| s.to_string()).collect(),
        ..Desired::default()
    }
}

/// The VIP range routed to `lo` with `src`, the way flux's tests route it.
fn route_vips(ns: &Netns, src: &str) {
    ns.exec(&[
        "ip",
        "route",
        "replace",
        "198.18.0.0/16",
        "dev",
        "lo",
        "src",
        src,
    ]);
}

/// Listeners on 127.0.0.1 at `ports` inside `ns`, non-blocking.
fn listeners(ns: &Netns, ports: &[u16]) -> Vec<TcpListener> {
    ns.enter(|| {
        ports
            .iter()
            .map(|p| {
                let l = TcpListener::bind(local(*p)).expect("bind a backend");
                l.set_nonblocking(true).expect("non-blocking");
                l
            })
            .collect()
    })
}

/// Every connection waiting on `listener`, accepted.
fn accept_all(listener: &TcpListener) -> Vec<TcpStream> {
    let mut accepted = Vec::new();
    // Loopback handshakes complete within the connect; a short grace for the last ones.
    for _ in 0..50 {
        match listener.accept() {
            Ok((s, _)) => accepted.push(s),
            Err(e) if e.kind() == ErrorKind::WouldBlock && accepted.is_empty() => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(_) => break,
        }
    }
    accepted
}

/// Opens `n` connections to the VIP from inside `ns` and returns them, still open.
fn connect_many(ns: &Netns, n: usize) -> Vec<TcpStream> {
    ns.enter(|| {
        (0..n)
            .map(|_| {
                TcpStream::connect_timeout(&vip().into(), Duration::from_secs(2))
                    .expect("connect through the forward")
            })
            .collect()
    })
}

/// How many of `n` new connections each listener gets, opened and accepted in batches (so no
/// backlog fills up).
fn spread(ns: &Netns, listeners: &[TcpListener], n: usize) -> Vec<usize> {
    let mut counts = vec![0; listeners.len()];
    for _ in 0..n / 25 {
        let clients = connect_many(ns, 25);
        for (count, l) in counts.iter_mut().zip(listeners) {
            *count += accept_all(l).len();
        }
        drop(clients);
    }
    counts
}

/// A service forwarded to three instances: its rules read back exactly (no drift), each DNAT
/// rule names its service and instance, new connections from host processes reach all three
/// about evenly, and none reaches the proxy port.
#[test]
fn forwarding_reads_back_exactly_and_spreads_connections_evenly() {
    let Some(ns) = Netns::new() else { return };
    route_vips(&ns, "127.0.0.1");
    let nf = ns.netfilter();
    let backends = listeners(&ns, &[16001, 16002, 16003]);
    let proxy = listeners(&ns, &[PROXY_PORT]);
    let rs = render(&forwarding(
        vec![
            destination("b1", local(16001)),
            destination("b2", local(16002)),
            destination("b3", local(16003)),
        ],
        &["docker0"],
    ));
    assert!(rs.rejected().is_empty(), "{:?}", rs.rejected());
    nf.apply(&rs).expect("apply");

    let installed = nf.installed().expect("installed");
    assert!(installed.forward_chain);
    assert_eq!(installed.forward_rules, rs.forward_rules());
    assert_eq!(installed.forward_chains, *rs.forward_chains());
    assert_eq!(installed.service_rules, rs.service_rules());
    let drift = nf.drift(&rs).expect("drift");
    assert!(drift.is_clean(), "fresh install drifted: {drift:?}");
    let dnat: Vec<(Option<String>, Option<String>)> = annotate(&installed)
        .into_iter()
        .filter(|a| a.rule.contains("-j DNAT"))
        .map(|a| (a.service, a.instance))
        .collect();
    assert_eq!(
        dnat,
        ["b1", "b2", "b3"].map(|i| (Some("bulk".to_string()), Some(i.to_string())))
    );
    // Not a member of the VIP set: only the proxied service is.
    assert!(!ns.sets().contains("198.18.0.12"), "{}", ns.sets());

    let counts = spread(&ns, &backends, 300);
    eprintln!("300 connections spread over three instances: {counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), 300, "{counts:?}");
    // Each expects 100 (standard deviation about 8): 60 is five deviations away.
    assert!(counts.iter().all(|c| *c >= 60), "{counts:?}");
    assert!(
        accept_all(&proxy[0]).is_empty(),
        "a connection reached the proxy"
    );
}

/// Chains of one to eight instances, reached one change at a time the way the daemon sends
/// them: each reads back without drift (the probabilities print exactly as iptables-save
/// prints them), and taking them away again leaves no chain behind.
#[test]
fn every_chain_length_reads_back_without_drift() {
    let Some(ns) = Netns::new() else { return };
    let nf = ns.netfilter();
    let with = |n: u16| {
        render(&forwarding(
            (1..=n)
                .map(|i| destination(&format!("b{i}"), local(16000 + i)))
                .collect(),
            &[],
        ))
    };
    let mut last = with(1);
    nf.apply(&last).expect("apply");
    for n in (2..=8).chain((1..8).rev()) {
        let next = with(n);
        nf.apply_change(&last, &next).expect("change");
        let drift = nf.drift(&next).expect("drift");
        assert!(drift.is_clean(), "{n} instances: {drift:?}");
        last = next;
    }
    // No instance left: refused, and its chain is gone.
    let mut none = forwarding(vec![], &[]);
    none.forwards.clear();
    none.rejects.push(Redirect {
        service: "bulk".into(),
        vip: vip(),
    });
    let none = render(&none);
    nf.apply_change(&last, &none).expect("change");
    assert!(nf.drift(&none).expect("drift").is_clean());
    let save = ns.save();
    assert!(
        !save.contains("FLUX-FORWARD") && !save.contains("FLUX-FWD-"),
        "{save}"
    );
}

/// `conntrack -L -p tcp` inside `ns`.
fn entries(ns: &Netns) -> String {
    ns.exec(&["conntrack", "-L", "-p", "tcp"])
}

/// An instance leaving the service: the conntrack entries of connections forwarded to it are
/// deleted (and only those), so such a connection is reset at the client's next packet instead
/// of going on to the instance that left; new connections all go to the instances that stay.
#[test]
fn an_instance_that_leaves_loses_its_connections_and_gets_no_new_ones() {
    let Some(ns) = Netns::new() else { return };
    if ns.runner().run("conntrack", &["-C"], None).is_err() {
        eprintln!("skipped: conntrack is not installed");
        return;
    }
    route_vips(&ns, "127.0.0.1");
    let nf = ns.netfilter();
    let backends = listeners(&ns, &[16011, 16012]);
    let both = render(&forwarding(
        vec![
            destination("a", local(16011)),
            destination("b", local(16012)),
        ],
        &[],
    ));
    let only_a = render(&forwarding(vec![destination("a", local(16011))], &[]));
    nf.apply(&both).expect("apply");

    // Forty connections, kept open; which instance holds each is told by its local port.
    let clients = connect_many(&ns, 40);
    let on_a = accept_all(&backends[0]);
    let on_b = accept_all(&backends[1]);
    assert_eq!(on_a.len() + on_b.len(), 40);
    assert!(
        !on_b.is_empty() && !on_a.is_empty(),
        "{} / {}",
        on_a.len(),
        on_b.len()
    );
    let peer_ports = |accepted: &[TcpStream]| -> Vec<u16> {
        accepted
            .iter()
            .map(|s| s.peer_addr().expect("peer").port())
            .collect()
    };
    let (ports_a, ports_b) = (peer_ports(&on_a), peer_ports(&on_b));
    let before = entries(&ns);
    assert_eq!(
        before.matches("sport=16012").count(),
        on_b.len(),
        "{before}"
    );

    nf.apply_change(&both, &only_a).expect("b leaves");
    let gone = Unforwarded::between(Some(&both), &only_a);
    assert_eq!(gone.flows, [(vip(), local(16012))]);
    assert_eq!(nf.clear_unforwarded(&gone).expect("clear"), on_b.len());
    let after = entries(&ns);
    assert!(!after.contains("sport=16012"), "{after}");
    assert_eq!(after.matches("sport=16011").count(), on_a.len(), "{after}");

    // A connection that was on b: its next packet finds no entry, is forwarded to a, which
    // knows no such connection and resets it.
    let mut stale = clients
        .iter()
        .find(|c| ports_b.contains(&c.local_addr().expect("local").port()))
        .expect("a client on b")
        .try_clone()
        .expect("clone");
    stale
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    stale.write_all(b"after b left").expect("write");
    let mut buf = [0u8; 16];
    let read = stale.read(&mut buf);
    assert!(
        matches!(&read, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{read:?}"
    );
    // One on a goes on: its entry is still there and its bytes arrive.
    let mut kept = clients
        .iter()
        .find(|c| ports_a.contains(&c.local_addr().expect("local").port()))
        .expect("a client on a")
        .try_clone()
        .expect("clone");
    kept.write_all(b"still a").expect("write");
    let mut server = on_a
        .iter()
        .find(|s| s.peer_addr().expect("peer").port() == kept.local_addr().unwrap().port())
        .expect("a's side")
        .try_clone()
        .expect("clone");
    server.set_nonblocking(false).expect("blocking");
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut got = [0u8; 7];
    server.read_exact(&mut got).expect("bytes arrive on a");
    assert_eq!(&got, b"still a");

    let counts = spread(&ns, &backends, 50);
    assert_eq!(
        counts,
        [50, 0],
        "new connections went to the instance that left"
    );
}

/// One damage case: what it is, the commands that do it, and the drift it must show.
type Case = (&'static str, Vec<String>, fn(&netfilter::Drift) -> bool);

/// Damage to the forwarding chains, and to the services chain's jump into them, is drift; one
/// apply repairs it back to exactly what the first apply installed.
#[test]
fn forwarding_damage_is_detected_and_repaired() {
    let Some(ns) = Netns::new() else { return };
    let nf = ns.netfilter();
    let rs = render(&forwarding(
        vec![
            destination("b1", local(16021)),
            destination("b2", local(16022)),
        ],
        &[],
    ));
    nf.apply(&rs).expect("apply");
    let clean = ns.save();
    let (chain, rules) = rs.forward_chains().iter().next().expect("one chain");
    let spec = |line: &str| {
        line.split_once(' ')
            .unwrap()
            .1
            .split_once(' ')
            .unwrap()
            .1
            .to_string()
    };
    let nat = |args: String| format!("iptables -t nat {args}");
    // By number: the rule's comment holds a space, which this simple splitting would break.
    let jump = 1 + rs
        .service_rules()
        .iter()
        .position(|r| r.contains("-j FLUX-FORWARD"))
        .expect("the jump");
    let cases: Vec<Case> = vec![
        (
            "service chain flushed",
            vec![nat(format!("-F {chain}"))],
            |d| d.missing_rules.len() == 2,
        ),
        (
            "forward chain flushed",
            vec![nat("-F FLUX-FORWARD".into())],
            |d| d.missing_rules.len() == 1,
        ),
        (
            "jump deleted",
            vec![nat(format!("-D FLUX-SERVICES {jump}"))],
            |d| d.missing_rules.len() == 1,
        ),
        (
            "foreign rule in a service chain",
            vec![nat(format!("-I {chain} 1 -j RETURN"))],
            |d| d.extra_rules == ["-A FLUX-FWD-C612000C-80 -j RETURN"],
        ),
        (
            "instances reordered",
            vec![
                nat(format!("-D {chain} 1")),
                // Its comment holds no space: without the quotes it is one argument.
                nat(format!("-A {chain} {}", spec(&rules[0]).replace('"', ""))),
            ],
            |d| d.misordered,
        ),
        (
            "stale service chain",
            vec![nat("-N FLUX-FWD-C6120063-80".into())],
            |d| d.extra_chains == ["FLUX-FWD-C6120063-80"],
        ),
    ];
    for (what, commands, check) in cases {
        for command in commands {
            let args: Vec<&str> = command.split(' ').collect();
            ns.exec(&args);
        }
        let drift = nf.drift(&rs).expect("drift");
        assert!(check(&drift), "{what}: unexpected drift {drift:?}");
        nf.apply(&rs).expect("repair");
        assert!(
            nf.drift(&rs).expect("drift").is_clean(),
            "{what}: not repaired"
        );
        assert_eq!(ns.save(), clean, "{what}: repaired state differs");
    }
}

/// Rules another program keeps in the nat table.
const FOREIGN: &str = r#"*nat
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 198.19.1.0/24 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
COMMIT
*filter
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
"#;

#[test]
fn remove_takes_the_forwarding_chains_away_and_nothing_else() {
    let Some(ns) = Netns::new() else { return };
    ns.restore(FOREIGN);
    let before = (ns.save(), ns.sets());
    let nf = ns.netfilter();
    nf.apply(&render(&forwarding(
        vec![destination("b1", local(16031))],
        &["docker0"],
    )))
    .expect("apply");
    assert!(ns.save().contains(":FLUX-FWD-C612000C-80"));
    nf.remove().expect("remove");
    assert_eq!((ns.save(), ns.sets()), before);
}

/// The peer address of one connection accepted on `listener` within 2 s.
fn accept_peer(listener: &TcpListener) -> Option<SocketAddrV4> {
    for _ in 0..200 {
        if let Ok((_, SocketAddr::V4(peer))) = listener.accept() {
            return Some(peer);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// What a forward to an instance on another host needs. A "host" namespace with a Docker-like
/// bridge (a "container" namespace behind it) and a LAN link to an "other host" namespace
/// whose instance listens at its LAN address, as a published port in `local` mode would:
///
/// - a container's connection is forwarded with the container's address as its source, which
///   the other host cannot answer (it has no route to this host's bridge subnet): it needs the
///   MASQUERADE rule Docker installs for its bridges (`-s SUBNET ! -o BRIDGE`), and then works,
///   the instance seeing this host's LAN address;
/// - a host process's connection takes its source address from the VIP's route: with
///   `src 127.0.0.1` (how flux's tests route VIPs) it cannot leave the host at all; with the
///   host's own address (as a default route gives it) it reaches the other host directly.
#[test]
fn clients_reach_an_instance_on_another_host() {
    let Some(host) = Netns::new() else { return };
    let Some(container) = Netns::new() else {
        return;
    };
    let Some(other) = Netns::new() else { return };
    for args in [
        &["ip", "link", "add", "br-flux0", "type", "bridge"][..],
        &[
            "ip", "link", "add", "veth-h", "type", "veth", "peer", "name", "veth-c",
        ],
        &["ip", "link", "set", "veth-c", "netns", container.name()],
        &["ip", "link", "set", "veth-h", "master", "br-flux0", "up"],
        &["ip", "addr", "add", "198.19.1.1/24", "dev", "br-flux0"],
        &["ip", "link", "set", "br-flux0", "up"],
        &[
            "ip", "link", "add", "lan-h", "type", "veth", "peer", "name", "lan-o",
        ],
        &["ip", "link", "set", "lan-o", "netns", other.name()],
        &["ip", "addr", "add", "198.19.250.1/24", "dev", "lan-h"],
        &["ip", "link", "set", "lan-h", "up"],
        &["sysctl", "-qw", "net.ipv4.ip_forward=1"],
    ] {
        host.exec(args);
    }
    for args in [
        &["ip", "addr", "add", "198.19.1.2/24", "dev", "veth-c"][..],
        &["ip", "link", "set", "veth-c", "up"],
        &["ip", "route", "add", "default", "via", "198.19.1.1"],
    ] {
        container.exec(args);
    }
    for args in [
        &["ip", "addr", "add", "198.19.250.2/24", "dev", "lan-o"][..],
        &["ip", "link", "set", "lan-o", "up"],
    ] {
        other.exec(args);
    }
    let instance = SocketAddrV4::new([198, 19, 250, 2].into(), 18080);
    let listener = other.enter(|| {
        let l = TcpListener::bind(instance).expect("bind on the other host");
        l.set_nonblocking(true).expect("non-blocking");
        l
    });
    let nf = host.netfilter();
    nf.apply(&render(&forwarding(
        vec![destination("remote", instance)],
        &["br-+"],
    )))
    .expect("apply");
    let attempt = |ns: &Netns| {
        ns.enter(|| TcpStream::connect_timeout(&vip().into(), Duration::from_millis(700)))
    };

    let unmasqueraded = attempt(&container);
    assert!(unmasqueraded.is_err(), "answered without masquerade");
    host.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        "198.19.1.0/24",
        "!",
        "-o",
        "br-flux0",
        "-j",
        "MASQUERADE",
    ]);
    // The unanswered SYN left an entry that a retry from the same port would follow.
    let _ = host.runner().run("conntrack", &["-F"], None);
    let _client = attempt(&container).expect("a container reaches the other host");
    assert_eq!(
        accept_peer(&listener).map(|p| *p.ip()),
        Some(Ipv4Addr::new(198, 19, 250, 1)),
        "the instance sees this host's LAN address"
    );

    route_vips(&host, "127.0.0.1");
    assert!(attempt(&host).is_err(), "a loopback source left the host");
    route_vips(&host, "198.19.250.1");
    let _client = attempt(&host).expect("a host process reaches the other host");
    assert_eq!(
        accept_peer(&listener).map(|p| *p.ip()),
        Some(Ipv4Addr::new(198, 19, 250, 1))
    );
}
