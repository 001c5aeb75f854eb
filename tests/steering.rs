//! Issue 15, item 1: the bpf steering with a real fluxd, its data plane inside a network
//! namespace the test creates (and a bpf file system of the test's own for the pins). VIP
//! connections reach the proxy with no nat rule; a service with no instance is refused at
//! once; `fluxd debug` shows the program, its map annotated by service and the routes; a
//! deleted route or map entry is repaired within the 2 s drift check; `auto` falls back to
//! nat, saying why, when bpf cannot be used; switching modes across restarts with
//! `--keep-rules` leaves nothing of the other mode; a clean stop removes everything; a VIP
//! range is one route and refuses its addresses that are no service; a stale conntrack entry
//! of an attempt made before the VIP was routed holds nothing back. About 10 s in all.

mod support;

use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use support::backend::{who_serves, Backend};
use support::fluxd::{wait_until, Fluxd};
use support::netns::Netns;

const VIP: &str = "198.18.0.10:80";
const IDLE: &str = "198.18.0.11:80";

fn addr(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn routes(ns: &Netns) -> String {
    let out = ns.exec(&["ip", "route", "show", "table", "local", "proto", "171"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the VIP answers with a backend's name.
fn served(ns: &Netns, fluxd: &Fluxd) -> String {
    let got = ns.run(|| {
        let mut name = None;
        wait_until(Duration::from_secs(5), || {
            name = who_serves(addr(VIP)).ok();
            name.is_some()
        });
        name
    });
    got.unwrap_or_else(|| panic!("VIP never answered: {}", fluxd.log()))
}

fn refused_at_once(ns: &Netns, to: &str) -> bool {
    let to = addr(to);
    ns.run(move || {
        let t = Instant::now();
        let r = TcpStream::connect_timeout(&to.into(), Duration::from_secs(2));
        let refused = matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused);
        if !refused || t.elapsed() >= Duration::from_millis(500) {
            eprintln!("{to}: {r:?} after {:?}", t.elapsed());
        }
        refused && t.elapsed() < Duration::from_millis(500)
    })
}

fn two_services(fluxd: &Fluxd) {
    fluxd.ok(&["service", "add", "web", "--address", VIP]);
    fluxd.add_instance("web", "b0", "127.0.0.1:9000");
    fluxd.ok(&["service", "add", "idle", "--address", IDLE]);
}

#[test]
fn bpf_steering_serves_refuses_repairs_and_cleans_up() {
    let ns = Netns::new("steer");
    let nat_before = ns.nat_table();
    let _b0 = Backend::start(&ns, "b0", 9000);
    let mut fluxd = Fluxd::dataplane(&ns.name, &[]);
    assert!(
        fluxd.log().contains("steering: bpf"),
        "auto picks bpf here: {}",
        fluxd.log()
    );
    two_services(&fluxd);
    assert_eq!(served(&ns, &fluxd), "b0");
    let installed = wait_until(Duration::from_secs(5), || {
        routes(&ns).contains("198.18.0.11")
    });
    assert!(installed.is_some(), "{}", fluxd.log());
    assert!(
        refused_at_once(&ns, IDLE),
        "a service with no instance is refused at once"
    );
    assert!(
        refused_at_once(&ns, "198.18.0.10:81"),
        "another port of a VIP is refused"
    );
    // No nat rule and no set on this path.
    assert_eq!(ns.nat_table(), nat_before);
    assert_eq!(ns.vip_set(), "");
    assert!(
        routes(&ns).contains("local 198.18.0.10 dev lo"),
        "{}",
        routes(&ns)
    );

    // fluxd debug: the mode, the program, each map entry with its service, no drift.
    let debug = fluxd.debug();
    assert_eq!(debug["steering"], "bpf", "{debug}");
    let bpf = &debug["bpf"];
    assert_eq!(bpf["attached"], true, "{debug}");
    assert_eq!(bpf["pinned"], true, "{debug}");
    assert_eq!(bpf["socket"], true, "{debug}");
    let entries = bpf["entries"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["vip"] == VIP && e["action"] == "proxy" && e["service"] == "web"),
        "{debug}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["vip"] == IDLE && e["action"] == "refuse" && e["service"] == "idle"),
        "{debug}"
    );
    assert_eq!(debug["drift"]["clean"], true, "{debug}");
    let text = String::from_utf8_lossy(
        &std::process::Command::new(env!("CARGO_BIN_EXE_fluxd"))
            .args(["debug", "--api"])
            .arg(format!("unix://{}", fluxd.socket.display()))
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        text.contains("steering bpf") && text.contains("SERVICES MAP"),
        "{text}"
    );

    // An instance for idle: one map update, and it is served.
    fluxd.add_instance("idle", "b0", "127.0.0.1:9000");
    let ok = ns.run(|| wait_until(Duration::from_secs(5), || who_serves(addr(IDLE)).is_ok()));
    assert!(ok.is_some(), "{}", fluxd.log());

    // Damage: a route and a map entry (web's). The drift check (2 s) repairs both.
    ns.ip(&[
        "route",
        "del",
        "local",
        "198.18.0.10/32",
        "table",
        "local",
        "proto",
        "171",
    ]);
    let pins = bpf["pins"].as_str().unwrap().to_string();
    let out = std::process::Command::new("bpftool")
        .args([
            "map",
            "delete",
            "pinned",
            &format!("{pins}/services"),
            "key",
            "hex",
        ])
        .args(["c6", "12", "00", "0b", "50", "00", "00", "00"]) // 198.18.0.11, port 80
        .output()
        .expect("bpftool (scripts/deps --test)");
    assert!(out.status.success(), "{out:?}");
    let repaired = wait_until(Duration::from_secs(6), || {
        let d = fluxd.debug();
        d["drift"]["clean"] == true && d["repairs"].as_u64() >= Some(1)
    });
    assert!(
        repaired.is_some(),
        "not repaired: {}\n{}",
        fluxd.debug(),
        fluxd.log()
    );
    assert_eq!(served(&ns, &fluxd), "b0");
    assert!(ns.run(|| who_serves(addr(IDLE)).is_ok()));

    // A clean stop removes the routes and the pins.
    fluxd.stop();
    assert_eq!(routes(&ns), "");
    assert!(!std::path::Path::new(&pins).exists(), "pins left in {pins}");
    assert_eq!(ns.nat_table(), nat_before);
}

#[test]
fn auto_falls_back_to_nat_when_bpf_cannot_be_used_and_bpf_refuses_to_start() {
    let ns = Netns::new("steer-fb");
    let _b0 = Backend::start(&ns, "b0", 9000);
    // A pin directory on no bpf file system: the program could not outlive fluxd.
    let plain = tempfile::tempdir().unwrap();
    let dir = plain.path().join("flux");
    let dir = dir.to_str().unwrap();
    let fluxd = Fluxd::dataplane(&ns.name, &["--bpf-dir", dir]);
    let log = fluxd.log();
    assert!(
        log.contains("steering: nat") && log.contains("not on a bpf file system"),
        "{log}"
    );
    two_services(&fluxd);
    assert_eq!(served(&ns, &fluxd), "b0");
    let installed = wait_until(Duration::from_secs(5), || {
        ns.empty_set().contains("198.18.0.11")
    });
    assert!(installed.is_some(), "{}", fluxd.log());
    assert!(refused_at_once(&ns, IDLE));
    assert!(ns.vip_set().contains("198.18.0.10,tcp:80"));
    let debug = fluxd.debug();
    assert_eq!(debug["steering"], "nat", "{debug}");
    assert!(
        debug["steering_fallback"]
            .as_str()
            .is_some_and(|s| s.contains("not on a bpf file system")),
        "{debug}"
    );
    assert!(
        !plain.path().join("flux").exists(),
        "nothing created off bpffs"
    );
    drop(fluxd);

    // --steering bpf does not fall back: fluxd stops with one line.
    let mut strict =
        Fluxd::unstarted_in_netns(&ns.name, "h1", &["--bpf-dir", dir, "--steering", "bpf"]);
    strict.spawn();
    let status = strict
        .wait_exit(Duration::from_secs(15))
        .expect("fluxd should stop");
    assert_eq!(status.code(), Some(1), "{}", strict.log());
    assert!(strict.log().contains("steering: bpf:"), "{}", strict.log());
}

#[test]
fn switching_modes_across_restarts_leaves_nothing_of_the_other() {
    let ns = Netns::new("steer-sw");
    let nat_before = ns.nat_table();
    let _b0 = Backend::start(&ns, "b0", 9000);
    // nat with --keep-rules, then bpf: the nat rules and set go once the steering is in.
    let mut nat = Fluxd::dataplane(&ns.name, &["--steering", "nat", "--keep-rules"]);
    two_services(&nat);
    assert_eq!(served(&ns, &nat), "b0");
    nat.stop();
    assert!(ns.vip_set().contains("flux:web"));
    // (Each fluxd here has a store of its own: the services are added again.)
    let mut bpf = Fluxd::dataplane(&ns.name, &["--keep-rules"]);
    assert!(bpf.log().contains("steering: bpf"), "{}", bpf.log());
    two_services(&bpf);
    assert_eq!(served(&ns, &bpf), "b0");
    assert_eq!(
        ns.nat_table(),
        nat_before,
        "nat rules left beside the bpf path"
    );
    assert_eq!(ns.vip_set(), "");
    assert!(
        bpf.log().contains("removed the other steering path"),
        "{}",
        bpf.log()
    );
    let pins = bpf.debug()["bpf"]["pins"].as_str().unwrap().to_string();
    let bpf_dir = std::path::Path::new(&pins)
        .parent()
        .unwrap()
        .display()
        .to_string();
    bpf.stop();
    assert!(
        routes(&ns).contains("198.18.0.10"),
        "kept on a stop with --keep-rules"
    );
    assert!(std::path::Path::new(&pins).exists());
    // Then nat again (on the same bpf file system): routes and pins go.
    let mut nat = Fluxd::dataplane(&ns.name, &["--steering", "nat", "--bpf-dir", &bpf_dir]);
    two_services(&nat);
    assert_eq!(served(&ns, &nat), "b0");
    assert_eq!(routes(&ns), "");
    assert!(!std::path::Path::new(&pins).exists());
    nat.stop();
    drop(bpf);
    // And `fluxd cleanup` with nothing left changes nothing.
    let out = ns.exec(&[
        env!("CARGO_BIN_EXE_fluxd"),
        "cleanup",
        "--bpf-dir",
        &bpf_dir,
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(ns.nat_table(), nat_before);
}

/// The bpf counterpart of dataplane.rs's VIP range test: a `--vip-range` is one local route
/// whatever the number of services (each service one map entry), a VIP of the range that is no
/// service is refused at once (the VIP is a local address here: no other socket may answer for
/// it), and a service of the range with no instance is refused until it has one.
#[test]
fn a_vip_range_is_one_route_whatever_the_number_of_services() {
    let ns = Netns::new("steer-range");
    let nat_before = ns.nat_table();
    let _b0 = Backend::start(&ns, "b0", 9000);
    let fluxd = Fluxd::dataplane(
        &ns.name,
        &["--steering", "bpf", "--vip-range", "198.18.0.0/16"],
    );
    two_services(&fluxd);
    assert_eq!(served(&ns, &fluxd), "b0");
    fluxd.wait_refusing("idle");
    let range_only = "local 198.18.0.0/16 dev lo";
    assert!(routes(&ns).contains(range_only), "{}", routes(&ns));
    assert_eq!(routes(&ns).lines().count(), 1, "{}", routes(&ns));
    for i in 0..50 {
        let name = format!("s{i}");
        fluxd.ok(&[
            "service",
            "add",
            &name,
            "--address",
            &format!("198.18.1.{i}:80"),
        ]);
        fluxd.add_instance(&name, "b0", "127.0.0.1:9000");
    }
    fluxd.wait_routed("s49");
    assert_eq!(fluxd.steered().len(), 52, "{:?}", fluxd.steered());
    assert_eq!(routes(&ns).lines().count(), 1, "{}", routes(&ns));
    assert_eq!(ns.nat_table(), nat_before, "no nat rule on this path");
    assert_eq!(
        ns.run(|| who_serves(addr("198.18.1.49:80")))
            .ok()
            .as_deref(),
        Some("b0")
    );
    assert!(refused_at_once(&ns, IDLE), "no instance: refused");
    assert!(refused_at_once(&ns, "198.18.9.9:80"), "no service: refused");
    // idle gets an instance, then loses it.
    fluxd.add_instance("idle", "b0", "127.0.0.1:9000");
    fluxd.wait_routed("idle");
    let ok = ns.run(|| wait_until(Duration::from_secs(5), || who_serves(addr(IDLE)).is_ok()));
    assert!(ok.is_some(), "{}", fluxd.log());
    fluxd.ok(&["instance", "rm", "idle", "b0"]);
    fluxd.wait_refusing("idle");
    assert!(refused_at_once(&ns, IDLE));
    assert_eq!(fluxd.debug()["drift"]["clean"], true);
}

/// The bpf counterpart of dataplane.rs's conntrack test: a connection attempt to a VIP made
/// before it was routed (its SYN went nowhere) leaves a conntrack entry when connection
/// tracking is on in the namespace (as Docker's rules turn it on); once the VIP is routed, a
/// connection from the same source port is served like any other. There is no NAT on this
/// path, so fluxd has nothing to clear.
#[test]
fn an_attempt_before_the_vip_was_routed_does_not_hold_back_its_source_port() {
    const PORT: u16 = 41235;
    let ns = Netns::new("steer-ct");
    // Connection tracking on, in the namespace only.
    let out = ns.exec(&[
        "iptables",
        "-A",
        "OUTPUT",
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-j",
        "ACCEPT",
    ]);
    assert!(out.status.success(), "{out:?}");
    let fluxd = Fluxd::dataplane(&ns.name, &["--steering", "bpf"]);
    let b = Backend::start(&ns, "b0", 9000);
    let early = ns.run(|| name_from_port(addr(VIP), PORT, Duration::from_millis(200)));
    assert!(early.is_err(), "{early:?}");
    let listed = ns.exec(&["conntrack", "-L", "-p", "tcp", "--sport", &PORT.to_string()]);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed.contains("SYN_SENT"),
        "no entry of the attempt: {listed:?}"
    );

    fluxd.ok(&["service", "add", "web", "--address", VIP]);
    fluxd.add_instance("web", &b.name, b.addr);
    fluxd.wait_routed("web");
    let again = ns.run(|| name_from_port(addr(VIP), PORT, Duration::from_secs(2)));
    assert_eq!(
        again.as_deref().ok(),
        Some("b0"),
        "{again:?}; conntrack: {}; log: {}",
        String::from_utf8_lossy(&ns.exec(&["conntrack", "-L", "-p", "tcp"]).stdout),
        fluxd.log()
    );
}

/// Connects to `vip` from 127.0.0.1:`port` (SO_REUSEADDR, so the port can be used again at
/// once) and reads the serving backend's name, giving up after `limit`.
fn name_from_port(vip: SocketAddrV4, port: u16, limit: Duration) -> std::io::Result<String> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::io::Read;
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port).into())?;
    let start = Instant::now();
    s.connect_timeout(&vip.into(), limit)?;
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(
        limit
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(1)),
    ))?;
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte)? == 1 && byte[0] != b'\n' {
        name.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&name).into_owned())
}
