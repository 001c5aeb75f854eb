//! Issue 9 (part): the VIP guard. Each fluxd refuses to redirect a VIP that is an address of one
//! of its own interfaces, its default gateway or a DNS resolver, or lies in a protected range,
//! reports it, and judges again when these change. Real kernel, in a network namespace each test creates.
//!
//! Each case runs on both steering paths (`--steering nat`, then `--steering bpf`), and checks
//! the kernel itself as well as `fluxd debug`: a refused VIP is in neither of the nat path's
//! sets, and on the bpf path has neither a map entry nor a local route (which would make it
//! an address of the host's for every interface); a VIP range the guard refuses gets no rule
//! on nat and no route on bpf.

mod support;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::time::Duration;

use support::backend::{who_serves, Backend};
use support::fluxd::{wait_until, Fluxd};
use support::netns::Netns;

/// An address the tests give an interface of the namespace, and a service the VIP of.
const OWN: &str = "198.18.5.5";
const OWN_VIP: &str = "198.18.5.5:80";
const GOOD_VIP: &str = "198.18.0.10:80";

/// Gives the namespace a second interface (no `dummy` link type here: a veth pair) holding
/// `OWN`.
fn add_own_address(ns: &Netns) {
    ns.ip(&["link", "add", "g0", "type", "veth", "peer", "name", "g1"]);
    ns.ip(&["addr", "add", &format!("{OWN}/32"), "dev", "g0"]);
    ns.ip(&["link", "set", "g0", "up"]);
}

/// A `good` service with one backend, routed and answering through flux.
fn add_good_service(ns: &Netns, fluxd: &Fluxd) -> Backend {
    let b = Backend::start(ns, "b0", 9000);
    fluxd.ok(&["service", "add", "good", "--address", GOOD_VIP]);
    fluxd.add_instance("good", "b0", b.addr);
    fluxd.wait_routed("good");
    let vip: SocketAddrV4 = GOOD_VIP.parse().unwrap();
    let ok = ns.run(move || {
        wait_until(Duration::from_secs(5), || {
            who_serves(vip).is_ok_and(|n| n == "b0")
        })
    });
    assert!(ok.is_some(), "good never answered: {}", fluxd.log());
    b
}

/// Service `name` at `vip` with a static instance (the good backend's address), so that once
/// the guard lets it through it is routed (a `flux-vips` member), not refused for want of an
/// instance (a `flux-empty` member).
fn add_backed_service(fluxd: &Fluxd, name: &str, vip: &str) {
    fluxd.ok(&["service", "add", name, "--address", vip]);
    fluxd.add_instance(name, "i0", "127.0.0.1:9000");
}

/// The two steering paths each case runs on.
const PATHS: [&str; 2] = ["nat", "bpf"];

/// Whether the kernel steers `service`'s VIP `vip` in any way (to the proxy or refused): on nat
/// a member of either of flux's sets, on bpf a local route of flux's covering it; and whether
/// `fluxd debug` says so, which must agree. A service the guard refuses must be neither
/// redirected nor refused.
fn steered(ns: &Netns, fluxd: &Fluxd, steering: &str, service: &str, vip: &str) -> bool {
    let kernel = in_kernel(ns, steering, service, vip);
    let debug = fluxd.steered_as(service).is_some();
    assert_eq!(
        kernel,
        debug,
        "kernel and fluxd debug disagree on {service}: {}\n{}",
        ns.vip_set(),
        ns.flux_routes()
    );
    kernel
}

/// Waits up to 6 s (the guard reads addresses every 2 s) until the kernel and `fluxd debug`
/// both say `service` is steered (`want`) or both say it is not.
fn wait_steered(ns: &Netns, fluxd: &Fluxd, steering: &str, service: &str, vip: &str, want: bool) {
    let done = wait_until(Duration::from_secs(6), || {
        in_kernel(ns, steering, service, vip) == want && fluxd.steered_as(service).is_some() == want
    });
    assert!(
        done.is_some(),
        "{steering}: {service} steered should be {want}: {}\n{}\n{}",
        ns.vip_set(),
        ns.flux_routes(),
        fluxd.log()
    );
}

/// The kernel's side of [`steered`].
fn in_kernel(ns: &Netns, steering: &str, service: &str, vip: &str) -> bool {
    match steering {
        "nat" => {
            let comment = format!("flux:{service}\"");
            ns.vip_set().contains(&comment) || ns.empty_set().contains(&comment)
        }
        _ => {
            let ip: Ipv4Addr = vip.split_once(':').unwrap().0.parse().unwrap();
            flux_routes(ns).iter().any(|r| r.contains(&ip))
        }
    }
}

/// flux's local routes on the bpf path.
fn flux_routes(ns: &Netns) -> Vec<ipnet::Ipv4Net> {
    ns.flux_routes()
        .lines()
        .filter_map(|l| {
            let dst = l.strip_prefix("local ")?.split_whitespace().next()?;
            match dst.contains('/') {
                true => dst.parse().ok(),
                false => format!("{dst}/32").parse().ok(),
            }
        })
        .collect()
}

/// Whether the VIP range's rule (nat) or route (bpf) is installed.
fn range_installed(ns: &Netns, steering: &str) -> bool {
    match steering {
        "nat" => ns.nat_table().contains("flux vip range"),
        _ => ns.flux_routes().contains("local 198.18.0.0/16 "),
    }
}

/// A connection to `OWN:80` from the namespace reaches a listener of the namespace's own on
/// that address, not flux's proxy: the guard leaves real traffic alone.
fn own_listener_answers(ns: &Netns) -> bool {
    ns.run(|| {
        let l = TcpListener::bind(OWN_VIP).expect("bind the own address");
        l.set_nonblocking(true).unwrap();
        let c = TcpStream::connect_timeout(&OWN_VIP.parse().unwrap(), Duration::from_secs(2));
        let accepted = wait_until(Duration::from_secs(1), || l.accept().is_ok());
        c.is_ok() && accepted.is_some()
    })
}

/// The `refused` entry of `fluxd debug --json` for `service`.
fn debug_refusal(fluxd: &Fluxd, service: &str) -> Option<serde_json::Value> {
    fluxd.debug()["refused"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == service)
        .cloned()
}

/// The `refused` field of `service` in `GET /v1/services`.
fn listed_refusal(fluxd: &Fluxd, service: &str) -> serde_json::Value {
    fluxd
        .json(&["list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == service)
        .unwrap_or_else(|| panic!("{service} not listed"))["refused"]
        .clone()
}

#[test]
fn own_address_vip_is_refused_until_the_address_goes() {
    for steering in PATHS {
        own_address_vip_is_refused_until_the_address_goes_on(steering);
    }
}

fn own_address_vip_is_refused_until_the_address_goes_on(steering: &str) {
    let ns = Netns::new("guard-own");
    add_own_address(&ns);
    let fluxd = Fluxd::dataplane(&ns.name, &["--steering", steering]);
    add_backed_service(&fluxd, "mine", OWN_VIP);
    let _b = add_good_service(&ns, &fluxd);

    let set = format!("{}\n{}", ns.vip_set(), ns.empty_set());
    assert!(!set.contains("flux:mine"), "{set}");
    assert!(!set.contains("198.18.5.5,tcp:80"), "{set}");
    assert!(!steered(&ns, &fluxd, steering, "mine", OWN_VIP));
    assert!(
        own_listener_answers(&ns),
        "{steering}: the own address was captured"
    );
    let reason = format!("is {OWN}, an address of g0");
    let r = debug_refusal(&fluxd, "mine").expect("no refusal in fluxd debug");
    assert_eq!(r["vip"], OWN_VIP, "{r}");
    assert_eq!(r["reason"], reason.as_str(), "{r}");
    assert!(debug_refusal(&fluxd, "good").is_none());
    assert_eq!(listed_refusal(&fluxd, "mine"), reason.as_str());
    assert!(listed_refusal(&fluxd, "good").is_null());
    let info = fluxd.json(&["info", "mine"]);
    assert_eq!(info[0]["refused"], reason.as_str(), "{info}");
    let text = fluxd.ok(&["list"]);
    assert!(
        text.contains(&format!("mine: not routed on this host: VIP {reason}")),
        "{text}"
    );
    let debug_text = std::process::Command::new(env!("CARGO_BIN_EXE_fluxd"))
        .args([
            "debug",
            "--api",
            &format!("unix://{}", fluxd.socket.display()),
        ])
        .output()
        .unwrap();
    let debug_text = String::from_utf8_lossy(&debug_text.stdout);
    assert!(debug_text.contains("REFUSED VIPS"), "{debug_text}");
    assert!(debug_text.contains(&reason), "{debug_text}");
    // One warning, however many syncs ran since.
    std::thread::sleep(Duration::from_millis(4500));
    let log = fluxd.log();
    assert_eq!(
        log.matches("VIP guard: not routing this service").count(),
        1,
        "{log}"
    );

    // The address goes: within a few seconds the guard judges again and installs the VIP.
    ns.ip(&["addr", "del", &format!("{OWN}/32"), "dev", "g0"]);
    wait_steered(&ns, &fluxd, steering, "mine", OWN_VIP, true);
    if steering == "nat" {
        assert!(ns
            .vip_set()
            .contains(r#"198.18.5.5,tcp:80 comment "flux:mine""#));
    }
    assert!(debug_refusal(&fluxd, "mine").is_none());
    assert!(listed_refusal(&fluxd, "mine").is_null());

    // And it comes back: refused again, the good service untouched throughout.
    ns.ip(&["addr", "add", &format!("{OWN}/32"), "dev", "g0"]);
    wait_steered(&ns, &fluxd, steering, "mine", OWN_VIP, false);
    assert!(
        own_listener_answers(&ns),
        "{steering}: the own address was captured"
    );
    assert!(steered(&ns, &fluxd, steering, "good", GOOD_VIP));
    assert_eq!(fluxd.debug()["drift"]["clean"], true);
}

#[test]
fn protected_range_refuses_vips_inside() {
    for steering in PATHS {
        protected_range_refuses_vips_inside_on(steering);
    }
}

fn protected_range_refuses_vips_inside_on(steering: &str) {
    let ns = Netns::new("guard-prot");
    let fluxd = Fluxd::dataplane(
        &ns.name,
        &["--steering", steering, "--protected-range", "198.18.7.0/24"],
    );
    add_backed_service(&fluxd, "lan", "198.18.7.20:443");
    let _b = add_good_service(&ns, &fluxd);
    assert!(!steered(&ns, &fluxd, steering, "lan", "198.18.7.20:443"));
    let r = debug_refusal(&fluxd, "lan").expect("no refusal in fluxd debug");
    assert_eq!(r["reason"], "in protected range 198.18.7.0/24", "{r}");
    assert_eq!(
        listed_refusal(&fluxd, "lan"),
        "in protected range 198.18.7.0/24"
    );
}

#[test]
fn vip_range_holding_an_own_address_gets_no_rule() {
    for steering in PATHS {
        vip_range_holding_an_own_address_gets_no_rule_on(steering);
    }
}

fn vip_range_holding_an_own_address_gets_no_rule_on(steering: &str) {
    let ns = Netns::new("guard-range");
    add_own_address(&ns);
    let fluxd = Fluxd::dataplane(
        &ns.name,
        &["--steering", steering, "--vip-range", "198.18.0.0/16"],
    );
    add_backed_service(&fluxd, "mine", OWN_VIP);
    // Its safe VIPs fall back to set members (nat) or routes of their own (bpf).
    let _b = add_good_service(&ns, &fluxd);
    assert!(
        !range_installed(&ns, steering),
        "{}\n{}",
        ns.nat_table(),
        ns.flux_routes()
    );
    assert!(!steered(&ns, &fluxd, steering, "mine", OWN_VIP));
    assert!(
        own_listener_answers(&ns),
        "{steering}: the own address was captured"
    );
    let ranges = fluxd.debug()["refused_ranges"].clone();
    assert_eq!(ranges[0]["range"], "198.18.0.0/16", "{ranges}");
    assert_eq!(
        ranges[0]["reason"],
        format!("contains {OWN}, an address of g0").as_str(),
        "{ranges}"
    );
    // Without the address the range gets its rule back, and covers both VIPs.
    ns.ip(&["addr", "del", &format!("{OWN}/32"), "dev", "g0"]);
    let ruled = wait_until(Duration::from_secs(6), || range_installed(&ns, steering));
    assert!(ruled.is_some(), "{}\n{}", ns.nat_table(), fluxd.log());
    fluxd.wait_routed("mine");
    assert!(fluxd.debug()["refused_ranges"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn default_gateway_and_dns_resolver_are_refused() {
    for steering in PATHS {
        default_gateway_and_dns_resolver_are_refused_on(steering);
    }
}

fn default_gateway_and_dns_resolver_are_refused_on(steering: &str) {
    let ns = Netns::new("guard-gw");
    // A default route inside the namespace only: via a veth whose peer is in the same
    // namespace, so nothing can leave the machine.
    ns.ip(&["link", "add", "g0", "type", "veth", "peer", "name", "g1"]);
    ns.ip(&["addr", "add", "198.18.6.1/24", "dev", "g0"]);
    ns.ip(&["link", "set", "g0", "up"]);
    ns.ip(&["link", "set", "g1", "up"]);
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "198.18.6.254",
        "dev",
        "g0",
    ]);
    let fluxd = Fluxd::dataplane(&ns.name, &["--steering", steering]);
    add_backed_service(&fluxd, "gw", "198.18.6.254:80");
    // The machine's resolver (resolv.conf is not per namespace), when it is one a VIP could be.
    let resolver = std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .filter_map(|a| a.trim().parse::<std::net::Ipv4Addr>().ok())
        .find(|a| !a.is_loopback() && !a.is_link_local() && !a.is_unspecified());
    if let Some(r) = resolver {
        add_backed_service(&fluxd, "dns", &format!("{r}:53"));
    }
    let _b = add_good_service(&ns, &fluxd);

    let r = debug_refusal(&fluxd, "gw").expect("gateway VIP not refused");
    assert_eq!(
        r["reason"], "is 198.18.6.254, this host's default gateway (via g0)",
        "{r}"
    );
    assert!(!steered(&ns, &fluxd, steering, "gw", "198.18.6.254:80"));
    match resolver {
        Some(r) => {
            let why = debug_refusal(&fluxd, "dns").expect("resolver VIP not refused");
            let want = format!("is {r}, a DNS resolver in /etc/resolv.conf");
            assert_eq!(why["reason"], want.as_str(), "{why}");
            assert!(!steered(&ns, &fluxd, steering, "dns", &format!("{r}:53")));
        }
        None => eprintln!("no usable IPv4 nameserver in /etc/resolv.conf; resolver case skipped"),
    }

    // The default route goes: the guard notices within seconds and routes the VIP.
    ns.ip(&["route", "del", "default"]);
    fluxd.wait_routed("gw");
    assert!(steered(&ns, &fluxd, steering, "gw", "198.18.6.254:80"));
    assert!(debug_refusal(&fluxd, "gw").is_none());
}
