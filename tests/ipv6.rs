//! Issue 17, part 2: IPv6 and dual stack. fluxd inside a namespace the test creates, with
//! IPv6 enabled there by its own sysctls and unique-local addresses (`fd00::/8`, `nodad`) on
//! its loopback: an IPv6 VIP to IPv6 instances beside an IPv4 VIP on the same fluxd, on the
//! nat path (ip6tables) and on the bpf path (the program's IPv6 maps and local /128 routes, an
//! IPv6 service with no instance refused at once);
//! mixed families (an IPv4 VIP to an IPv6 instance and back); an IPv6 VIP the guard refuses;
//! bad input refused with the field named; systemd's IPv6 socket (the README's drop-in)
//! queueing IPv6 VIP connections across restarts.

mod support;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::client_loop::ClientLoop;
use support::fluxd::{wait_until, Fluxd};
use support::netns::Netns;

const VIP6: &str = "[fd00:18::a]:80";
const VIP4: &str = "198.18.0.10:80";
/// The IPv6 "VIP range" routed to lo inside the namespace, as the IPv4 one is.
const VIP6_RANGE: &str = "fd00:18::/64";
/// Addresses of the namespace's own, for backends (and one the guard must refuse).
const OWN6: [&str; 3] = ["fd00:10::10", "fd00:10::11", "fd00:10::12"];

/// A namespace with IPv6 on, `OWN6` on lo and `VIP6_RANGE` routed to lo.
fn dual_stack_netns(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    let out = ns.exec(&[
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=0",
        "net.ipv6.conf.lo.disable_ipv6=0",
    ]);
    assert!(out.status.success(), "{out:?}");
    for a in OWN6 {
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{a}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
    }
    ns.ip(&["-6", "route", "add", VIP6_RANGE, "dev", "lo", "src", "::1"]);
    ns
}

/// A backend that answers each connection with its name and a newline, then closes.
struct Named {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Named {
    fn start(ns: &Netns, name: &str, addr: SocketAddr) -> Named {
        let l = ns.run(move || {
            let l = TcpListener::bind(addr).expect("bind backend");
            l.set_nonblocking(true).unwrap();
            l
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (s, name) = (stop.clone(), format!("{name}\n"));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let _ = std::io::Write::write_all(&mut c, name.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Named {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects to `vip` from the calling thread's namespace and reads the serving backend's name.
fn who_serves(vip: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut got = String::new();
    s.read_to_string(&mut got)?;
    match got.strip_suffix('\n') {
        Some(name) => Ok(name.to_string()),
        None => Err(std::io::Error::other(format!("no name: {got:?}"))),
    }
}

fn ip6tables_nat(ns: &Netns) -> String {
    let out = ns.exec(&["ip6tables-save", "-t", "nat"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// flux's IPv6 local routes (the bpf path's).
fn flux_routes6(ns: &Netns) -> String {
    let out = ns.exec(&[
        "ip", "-6", "route", "show", "table", "local", "proto", "171",
    ]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the IPv6 VIP address `ip` is steered: a local route on the bpf path, a rule in the
/// IPv6 nat table on the nat path.
fn steered6(ns: &Netns, bpf: bool, ip: &str) -> bool {
    if bpf {
        flux_routes6(ns).contains(&format!("local {ip} "))
    } else {
        ip6tables_nat(ns).contains(&format!("-d {ip}/128"))
    }
}

/// IPv6 VIP -> two IPv6 instances, IPv4 VIP -> an IPv6 instance, second IPv6 VIP -> an IPv4
/// instance, all on one fluxd with `flags` (`bpf`: the bpf steering); then a clean stop leaves
/// no IPv6 rule or route.
fn dual_stack_on(tag: &str, flags: &[&str], bpf: bool) {
    let ns = dual_stack_netns(tag);
    let mut fluxd = Fluxd::dataplane(&ns.name, flags);
    let _b = [
        Named::start(&ns, "v6a", addr(&format!("[{}]:9000", OWN6[0]))),
        Named::start(&ns, "v6b", addr(&format!("[{}]:9001", OWN6[1]))),
        Named::start(&ns, "v6c", addr(&format!("[{}]:9002", OWN6[2]))),
        Named::start(&ns, "v4a", addr("127.0.0.1:9003")),
    ];
    fluxd.ok(&["service", "add", "web6", "--address", VIP6]);
    fluxd.add_instance("web6", "a", format!("[{}]:9000", OWN6[0]));
    fluxd.add_instance("web6", "b", format!("[{}]:9001", OWN6[1]));
    fluxd.ok(&["service", "add", "web4", "--address", VIP4]);
    fluxd.add_instance("web4", "c", format!("[{}]:9002", OWN6[2]));
    fluxd.ok(&["service", "add", "mixed", "--address", "[fd00:18::b]:81"]);
    fluxd.add_instance("mixed", "d", "127.0.0.1:9003");

    let rules = wait_until(Duration::from_secs(20), || steered6(&ns, bpf, "fd00:18::b"));
    assert!(
        rules.is_some(),
        "IPv6 VIP not steered: {}\n{}\n{}",
        ip6tables_nat(&ns),
        flux_routes6(&ns),
        fluxd.log()
    );
    let nat = ip6tables_nat(&ns);
    let debug = fluxd.debug();
    if bpf {
        // In the program's maps, not in ip6tables; fluxd debug shows the entry and listener.
        assert!(!nat.contains("fd00:18"), "{nat}");
        let entries = debug["bpf"]["entries"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            entries
                .iter()
                .any(|e| e["vip"] == "[fd00:18::a]:80" && e["service"] == "web6"),
            "{debug}"
        );
        assert_eq!(debug["bpf"]["socket6"], true, "{debug}");
        assert!(
            debug["bpf"]["routes"]
                .to_string()
                .contains("fd00:18::a/128"),
            "{debug}"
        );
    } else {
        assert!(
            nat.contains("-A FLUX-SERVICES -d fd00:18::a/128 -p tcp -m tcp --dport 80 -m comment --comment \"flux:web6\" -j REDIRECT"),
            "{nat}"
        );
        assert!(nat.contains("-A OUTPUT -m comment --comment \"flux hook\" -j FLUX-SERVICES"));
        // The IPv4 VIP is not in the IPv6 table.
        assert!(!nat.contains("198.18.0.10"), "{nat}");
        // fluxd debug shows them.
        let shown = debug["ipv6_rules"].as_array().is_some_and(|r| {
            r.iter()
                .any(|l| l.as_str().unwrap_or("").contains("fd00:18::a/128"))
        });
        assert!(shown, "{debug}");
    }

    let vip6 = addr(VIP6);
    let ok = ns.run(move || wait_until(Duration::from_secs(10), || who_serves(vip6).is_ok()));
    assert!(ok.is_some(), "IPv6 VIP never answered: {}", fluxd.log());
    let served: Vec<String> = ns.run(move || (0..40).map(|_| who_serves(vip6).unwrap()).collect());
    for b in ["v6a", "v6b"] {
        assert!(
            served.iter().any(|s| s == b),
            "{b} never served: {served:?}"
        );
    }
    assert!(
        served.iter().all(|s| s == "v6a" || s == "v6b"),
        "{served:?}"
    );

    let vip4 = addr(VIP4);
    fluxd.wait_routed("web4");
    let got = ns.run(move || {
        wait_until(Duration::from_secs(10), || who_serves(vip4).is_ok());
        who_serves(vip4)
    });
    assert_eq!(got.unwrap(), "v6c", "IPv4 VIP to an IPv6 instance");
    let mixed = addr("[fd00:18::b]:81");
    assert_eq!(ns.run(move || who_serves(mixed)).unwrap(), "v4a");

    // Addresses read back as they were written.
    let list = fluxd.ok(&["list"]);
    assert!(list.contains("[fd00:18::a]:80"), "{list}");
    let q = fluxd.ok(&["query", "--service", "web6"]);
    assert!(q.contains("[fd00:10::10]:9000"), "{q}");

    // A service removed: its IPv6 rule goes.
    fluxd.ok(&["service", "rm", "mixed"]);
    let gone = wait_until(Duration::from_secs(20), || {
        !steered6(&ns, bpf, "fd00:18::b")
    });
    assert!(
        gone.is_some(),
        "{}{}",
        ip6tables_nat(&ns),
        flux_routes6(&ns)
    );

    if bpf {
        // A tcp service with no instance is refused at once (the SYN answered by a RST), as
        // IPv4 ones are; the nat path has no IPv6 refusal (the proxy accepts and resets).
        fluxd.ok(&["service", "add", "none6", "--address", "[fd00:18::c]:80"]);
        let vip = addr("[fd00:18::c]:80");
        let refused = ns.run(move || {
            wait_until(Duration::from_secs(20), || {
                let t = std::time::Instant::now();
                let r = TcpStream::connect_timeout(&vip, Duration::from_secs(2));
                matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
                    && t.elapsed() < Duration::from_millis(500)
            })
        });
        assert!(refused.is_some(), "{}", fluxd.log());
        assert_eq!(ns.run(move || who_serves(vip6)).unwrap().len(), 3);
    }

    // Someone removes what steers the IPv6 VIP: the drift check puts it back.
    let out = if bpf {
        ns.exec(&[
            "ip",
            "-6",
            "route",
            "del",
            "local",
            "fd00:18::a/128",
            "table",
            "local",
            "proto",
            "171",
        ])
    } else {
        ns.exec(&["ip6tables", "-t", "nat", "-F", "FLUX-SERVICES"])
    };
    assert!(out.status.success(), "{out:?}");
    assert!(!steered6(&ns, bpf, "fd00:18::a"));
    let back = wait_until(Duration::from_secs(30), || steered6(&ns, bpf, "fd00:18::a"));
    assert!(
        back.is_some(),
        "IPv6 steering not repaired: {}",
        fluxd.log()
    );

    fluxd.stop();
    let nat = ip6tables_nat(&ns);
    assert!(!nat.contains("FLUX") && !nat.contains("flux"), "{nat}");
    assert_eq!(flux_routes6(&ns), "");
}

#[test]
fn dual_stack_on_the_nat_path() {
    dual_stack_on("v6nat", &["--steering", "nat"], false);
}

#[test]
fn dual_stack_on_the_bpf_path() {
    dual_stack_on("v6bpf", &["--steering", "bpf"], true);
}

#[test]
fn an_own_ipv6_address_as_vip_is_refused_by_the_guard() {
    let ns = dual_stack_netns("v6guard");
    let fluxd = Fluxd::dataplane(&ns.name, &["--steering", "nat"]);
    let _b = Named::start(&ns, "b", addr(&format!("[{}]:9000", OWN6[1])));
    let own = format!("[{}]:80", OWN6[0]);
    fluxd.ok(&["service", "add", "mine", "--address", &own]);
    fluxd.add_instance("mine", "b", format!("[{}]:9000", OWN6[1]));
    fluxd.ok(&["service", "add", "good", "--address", VIP6]);
    fluxd.add_instance("good", "b", format!("[{}]:9000", OWN6[1]));
    let good = wait_until(Duration::from_secs(20), || {
        ip6tables_nat(&ns).contains("-d fd00:18::a/128")
    });
    assert!(good.is_some(), "{}", fluxd.log());
    let refused = wait_until(Duration::from_secs(10), || {
        fluxd.json(&["info", "mine"])[0]["refused"].is_string()
    });
    assert!(refused.is_some(), "{}", fluxd.json(&["info", "mine"]));
    let info = fluxd.json(&["info", "mine"]);
    let reason = info[0]["refused"].as_str().unwrap();
    assert_eq!(reason, "is fd00:10::10, an address of lo", "{info}");
    assert!(!ip6tables_nat(&ns).contains(OWN6[0]));
}

#[test]
fn bad_ipv6_input_is_refused_naming_the_field() {
    let ns = dual_stack_netns("v6bad");
    let fluxd = Fluxd::dataplane(&ns.name, &["--steering", "nat"]);
    for (args, want) in [
        (
            vec!["service", "add", "x", "--address", "fd00::1:80"],
            "address",
        ),
        (
            vec!["service", "add", "x", "--address", "[fe80::1]:80"],
            "link-local",
        ),
        (
            vec!["service", "add", "x", "--address", "[ff02::1]:80"],
            "multicast",
        ),
        (
            vec!["service", "add", "x", "--address", "[::1]:80"],
            "loopback",
        ),
        (
            vec!["service", "add", "x", "--address", "[::ffff:198.18.0.1]:80"],
            "IPv4-mapped",
        ),
        (
            vec!["service", "add", "x", "--address", "[fd00::1%lo]:80"],
            "address",
        ),
        (
            vec![
                "service",
                "add",
                "x",
                "--address",
                "[fd00:18::1]:80",
                "--forward",
                "kernel",
            ],
            "IPv4 VIPs",
        ),
    ] {
        let out = fluxd.ctl(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    fluxd.ok(&["service", "add", "y", "--address", VIP6]);
    for bad in ["[fe80::1]:80", "[ff02::1]:80", "[::]:80"] {
        let out = fluxd.ctl(&["instance", "add", "y", "i", "--address", bad]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("address"), "{bad}: {err}");
    }
    // Nothing of the refused input was stored.
    let list = fluxd.json(&["list"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

/// The active check of instance `name` of `service`, as `fluxctl query --json` shows it.
fn check_state(fluxd: &Fluxd, service: &str, name: &str) -> String {
    let q = fluxd.json(&["query", "--service", service]);
    q.as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .map(|i| {
            i["health"]["check"]["state"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

#[test]
fn ipv6_instances_are_health_checked() {
    let ns = dual_stack_netns("v6health");
    let fluxd = Fluxd::dataplane(&ns.name, &["--steering", "nat"]);
    let _up = Named::start(&ns, "up", addr(&format!("[{}]:9010", OWN6[0])));
    fluxd.ok(&[
        "service",
        "add",
        "chk",
        "--address",
        "[fd00:18::c]:80",
        "--health",
        "tcp",
        "--health-interval",
        "200ms",
        "--health-timeout",
        "100ms",
        "--health-fall",
        "1",
    ]);
    fluxd.add_instance("chk", "up", format!("[{}]:9010", OWN6[0]));
    // Nothing listens there.
    fluxd.add_instance("chk", "down", format!("[{}]:9011", OWN6[1]));
    let settled = wait_until(Duration::from_secs(15), || {
        check_state(&fluxd, "chk", "up") == "passing"
            && check_state(&fluxd, "chk", "down") == "failing"
    });
    assert!(
        settled.is_some(),
        "{}\n{}",
        fluxd.ok(&["query", "--service", "chk"]),
        fluxd.log()
    );
    // Clients reach only the passing one.
    let vip = addr("[fd00:18::c]:80");
    let ok = ns.run(move || wait_until(Duration::from_secs(10), || who_serves(vip).is_ok()));
    assert!(ok.is_some(), "{}", fluxd.log());
    let served: Vec<String> = ns.run(move || (0..10).map(|_| who_serves(vip).unwrap()).collect());
    assert!(served.iter().all(|s| s == "up"), "{served:?}");
}

#[test]
fn kept_ipv6_rules_serve_across_a_restart_and_fluxd_cleanup_removes_them() {
    let ns = dual_stack_netns("v6keep");
    let _b = Named::start(&ns, "v6a", addr(&format!("[{}]:9000", OWN6[0])));
    let mut fluxd = Fluxd::dataplane(&ns.name, &["--steering", "nat", "--keep-rules"]);
    fluxd.ok(&["service", "add", "web6", "--address", VIP6]);
    fluxd.add_instance("web6", "a", format!("[{}]:9000", OWN6[0]));
    let installed = wait_until(Duration::from_secs(20), || {
        ip6tables_nat(&ns).contains("-d fd00:18::a/128")
    });
    assert!(installed.is_some(), "{}", fluxd.log());
    fluxd.stop();
    assert!(
        ip6tables_nat(&ns).contains("-d fd00:18::a/128"),
        "kept on stop"
    );
    // The next fluxd (same store) serves through the kept rules.
    fluxd.start();
    let vip6 = addr(VIP6);
    let ok = ns.run(move || wait_until(Duration::from_secs(10), || who_serves(vip6).is_ok()));
    assert!(ok.is_some(), "{}", fluxd.log());
    fluxd.stop();
    let out = ns.exec(&[env!("CARGO_BIN_EXE_fluxd"), "cleanup"]);
    assert!(out.status.success(), "{out:?}");
    let after = ip6tables_nat(&ns);
    assert!(
        !after.contains("FLUX") && !after.contains("flux"),
        "{after}"
    );
    assert_eq!(flux_routes6(&ns), "");
}

/// A listening socket on `addr` inside `ns`, as a `ListenStream=` line of fluxd.socket makes
/// (`[::]` lines with `BindIPv6Only=ipv6-only`).
fn systemd_socket(ns: &Netns, addr: SocketAddr) -> TcpListener {
    ns.run(move || {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        if addr.is_ipv6() {
            s.set_only_v6(true).unwrap();
        }
        s.set_reuse_address(true).unwrap();
        s.bind(&addr.into()).unwrap();
        s.listen(4096).unwrap();
        s.into()
    })
}

/// README "IPv6 and dual stack", systemd: with the drop-in's `[::]:7171` socket passed beside
/// the IPv4 one, IPv6 VIP connections made while fluxd restarts wait in it and are served by
/// the next fluxd; none is refused. (Without it fluxd binds its own IPv6 listener, which goes
/// with the process: the same loop then sees refusals.)
#[test]
fn a_passed_ipv6_socket_refuses_no_ipv6_connection_across_restarts() {
    use std::os::fd::AsRawFd;

    let ns = dual_stack_netns("v6sock");
    let s4 = systemd_socket(&ns, addr("0.0.0.0:7171"));
    let s6 = systemd_socket(&ns, addr("[::]:7171"));
    let _b = [
        Named::start(&ns, "v6a", addr(&format!("[{}]:9000", OWN6[0]))),
        Named::start(&ns, "v6b", addr(&format!("[{}]:9001", OWN6[1]))),
    ];
    let mut fluxd = Fluxd::unstarted_in_netns(
        &ns.name,
        "h1",
        &["--steering", "bpf", "--drain-seconds", "5"],
    );
    let passed = [s4.as_raw_fd(), s6.as_raw_fd()];
    fluxd.start_with_sockets(&passed);
    assert!(
        fluxd
            .log()
            .contains("using the IPv6 listening socket passed by systemd"),
        "{}",
        fluxd.log()
    );
    fluxd.ok(&["service", "add", "web6", "--address", VIP6]);
    fluxd.add_instance("web6", "a", format!("[{}]:9000", OWN6[0]));
    fluxd.add_instance("web6", "b", format!("[{}]:9001", OWN6[1]));
    let vip6 = addr(VIP6);
    let ok = ns.run(move || wait_until(Duration::from_secs(20), || who_serves(vip6).is_ok()));
    assert!(ok.is_some(), "IPv6 VIP never answered: {}", fluxd.log());

    // At most 3,000 connections or 40 s, from four clients at once so that some connect while
    // no fluxd runs.
    let clients = ClientLoop::start(&ns, 4, 3000, Duration::from_secs(40), move |_| {
        who_serves(vip6).map(drop)
    });
    clients
        .progressed(0, 50)
        .unwrap_or_else(|e| panic!("no traffic before the restarts: {e}"));
    for round in 1..=2 {
        fluxd.stop();
        assert!(
            steered6(&ns, true, "fd00:18::a"),
            "round {round}: IPv6 steering removed on a stop with passed sockets: {}",
            fluxd.log()
        );
        let at_restart = clients.served();
        fluxd.start_with_sockets(&passed);
        if let Err(e) = clients.progressed(at_restart, 50) {
            panic!(
                "round {round}: no connection served after the restart: {e}\n{}",
                fluxd.log()
            );
        }
    }
    clients
        .finish()
        .assert_none_failed("IPv6 connections across two restarts", &fluxd.log());

    // A real stop (fluxd.socket's ExecStopPost): fluxd, then `fluxd cleanup`.
    fluxd.stop();
    drop((s4, s6));
    fluxd.cleanup();
    let after = ip6tables_nat(&ns);
    assert!(
        !after.contains("FLUX") && !after.contains("flux"),
        "{after}"
    );
}

/// On the bpf path, a host whose lo has IPv6 off keeps its IPv6 VIPs in ip6tables (their
/// local routes could not be added) and its IPv4 VIPs in the program, which are not held up.
#[test]
fn without_ipv6_on_lo_the_bpf_path_leaves_ipv6_vips_to_ip6tables() {
    let ns = Netns::new("v6off");
    let out = ns.exec(&["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"]);
    assert!(out.status.success(), "{out:?}");
    let _b = Named::start(&ns, "v4a", addr("127.0.0.1:9003"));
    let fluxd = Fluxd::dataplane(&ns.name, &["--steering", "bpf"]);
    fluxd.ok(&["service", "add", "web6", "--address", VIP6]);
    fluxd.add_instance("web6", "a", "127.0.0.1:9003");
    fluxd.ok(&["service", "add", "web4", "--address", VIP4]);
    fluxd.add_instance("web4", "a", "127.0.0.1:9003");
    let rule = wait_until(Duration::from_secs(20), || {
        steered6(&ns, false, "fd00:18::a")
    });
    assert!(rule.is_some(), "{}\n{}", ip6tables_nat(&ns), fluxd.log());
    assert_eq!(flux_routes6(&ns), "");
    assert!(
        fluxd.log().contains("IPv6 VIPs go through ip6tables"),
        "{}",
        fluxd.log()
    );
    fluxd.wait_routed("web4");
    let vip4 = addr(VIP4);
    let got = ns.run(move || {
        wait_until(Duration::from_secs(10), || who_serves(vip4).is_ok());
        who_serves(vip4)
    });
    assert_eq!(got.unwrap(), "v4a");
    assert!(fluxd.debug()["drift"]["clean"] == true, "{}", fluxd.debug());
}
