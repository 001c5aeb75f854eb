//! The crate against real iptables (and real connections), each test in network namespaces it
//! creates and deletes itself. Needs root; skips otherwise.

mod support;

use std::net::{SocketAddrV4, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use netfilter::{annotate, render, CommandRunner, Desired, Error, Netfilter, Redirect, Runner};
use support::netns::{normalise, Netns};
use support::traffic;

const PROXY_PORT: u16 = 15001;

/// Rules another program (Docker, a firewall) keeps in the nat and filter tables; flux must
/// leave every one of them exactly as it was.
const FOREIGN: &str = r#"*nat
:DOCKER - [0:0]
:OTHER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -i eth9 -p udp -m udp --dport 53 -j DNAT --to-destination 198.19.250.1:5353
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -d 198.18.0.99/32 -p tcp -m tcp --dport 80 -m comment --comment "someone else" -j RETURN
-A POSTROUTING -s 198.19.1.0/24 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A OTHER -j RETURN
COMMIT
*filter
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
"#;

fn redirect(service: &str, vip: &str) -> Redirect {
    Redirect {
        service: service.into(),
        vip: vip.parse().expect("test VIPs are valid"),
    }
}

fn desired(redirects: Vec<Redirect>, bridges: &[&str]) -> Desired {
    Desired {
        redirects,
        proxy_port: PROXY_PORT,
        bridge_interfaces: bridges.iter().map(|s| s.to_string()).collect(),
        vip_ranges: vec![],
    }
}

/// Service names using every character render allows, so the round trip covers them all.
fn sample() -> Desired {
    desired(
        vec![
            redirect("web", "198.18.0.10:80"),
            redirect("api-v2", "198.18.0.11:443"),
            redirect("Billing_DB.primary", "198.18.1.1:5432"),
            redirect("x", "198.18.255.254:65535"),
        ],
        &["docker0", "br-+", "eth0.100"],
    )
}

/// The lines of a save that are not flux's, to check others' rules byte for byte.
fn without_flux(save: &str) -> String {
    save.lines()
        .filter(|l| !l.contains("FLUX-"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn clean_install_reads_back_exactly() {
    let Some(ns) = Netns::new() else { return };
    let nf = ns.netfilter();
    let rs = render(&sample());
    assert!(rs.rejected().is_empty());

    nf.apply(&rs).expect("apply");

    let installed = nf.installed().expect("installed");
    assert_eq!(installed.service_rules, rs.service_rules());
    let mut hooks = installed.hooks.clone();
    let mut want = rs.hooks().to_vec();
    hooks.sort();
    want.sort();
    assert_eq!(hooks, want);
    let drift = nf.drift(&rs).expect("drift");
    assert!(drift.is_clean(), "fresh install drifted: {drift:?}");

    let services: Vec<_> = annotate(&installed)
        .into_iter()
        .filter_map(|a| a.service)
        .collect();
    assert_eq!(services, ["Billing_DB.primary", "api-v2", "web", "x"]);
}

#[test]
fn apply_twice_changes_nothing() {
    let Some(ns) = Netns::new() else { return };
    let nf = ns.netfilter();
    let rs = render(&sample());

    nf.apply(&rs).expect("first apply");
    let once = ns.save();
    nf.apply(&rs).expect("second apply");
    assert_eq!(ns.save(), once);
    assert_eq!(
        nf.installed().expect("installed").hooks.len(),
        rs.hooks().len()
    );
}

#[test]
fn a_new_state_replaces_rules_and_hooks() {
    let Some(ns) = Netns::new() else { return };
    let nf = ns.netfilter();
    nf.apply(&render(&sample())).expect("first apply");

    let next = render(&desired(
        vec![redirect("web", "198.18.0.20:8080")],
        &["br-+"],
    ));
    nf.apply(&next).expect("second apply");

    let drift = nf.drift(&next).expect("drift");
    assert!(drift.is_clean(), "{drift:?}");
    let installed = nf.installed().expect("installed");
    assert_eq!(installed.service_rules.len(), 1);
    assert_eq!(installed.hooks.len(), 2, "stale bridge hooks are gone");
}

/// Each way the rules can be damaged behind flux's back is seen as drift and repaired by one
/// apply.
#[test]
fn damage_is_detected_and_repaired() {
    let output_hook = r#"-A OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES"#;
    type Check = fn(&netfilter::Drift) -> bool;
    let cases: [(&str, &[&[&str]], Check); 5] = [
        ("services chain flushed", &[&["-F", "FLUX-SERVICES"]], |d| {
            !d.canary_missing && d.missing_rules.len() == 4 && d.missing_hooks.is_empty()
        }),
        (
            "hook deleted",
            &[&[
                "-D",
                "OUTPUT",
                "-m",
                "comment",
                "--comment",
                "flux hook",
                "-j",
                "FLUX-SERVICES",
            ]],
            |d| {
                d.missing_hooks
                    == [r#"-A OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES"#]
                    && d.missing_rules.is_empty()
            },
        ),
        ("every nat chain flushed", &[&["-F"]], |d| {
            !d.canary_missing && d.missing_rules.len() == 4 && d.missing_hooks.len() == 4
        }),
        (
            "nat table flushed and chains deleted",
            &[&["-F"], &["-X"]],
            |d| d.canary_missing && d.services_chain_missing && d.missing_rules.len() == 4,
        ),
        (
            "foreign rule in flux's chain",
            &[&["-I", "FLUX-SERVICES", "1", "-j", "RETURN"]],
            |d| d.extra_rules == ["-A FLUX-SERVICES -j RETURN"] && d.missing_rules.is_empty(),
        ),
    ];
    let Some(ns) = Netns::new() else { return };
    let nf = ns.netfilter();
    let rs = render(&sample());
    nf.apply(&rs).expect("apply");
    let clean = ns.save();
    assert!(clean.contains(output_hook));

    for (what, commands, check) in cases {
        for args in commands {
            ns.nat(args);
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

    // The whole table deleted (not only its rules), as `nft flush ruleset` would.
    ns.exec(&["nft", "delete", "table", "ip", "nat"]);
    let drift = nf.drift(&rs).expect("drift");
    assert!(
        drift.canary_missing && drift.missing_hooks.len() == 4,
        "{drift:?}"
    );
    nf.apply(&rs).expect("repair after table deleted");
    assert!(nf.drift(&rs).expect("drift").is_clean());
}

#[test]
fn others_rules_survive_apply_and_remove() {
    let Some(ns) = Netns::new() else { return };
    let nf = ns.netfilter();
    ns.restore(FOREIGN);
    let before = ns.save();
    let before_nat = normalise(&ns.exec(&["iptables-save", "-t", "nat"]));

    nf.apply(&render(&sample())).expect("apply");
    let applied = ns.save();
    assert_eq!(
        without_flux(&applied),
        before,
        "apply changed others' rules"
    );
    let first_output = applied.lines().find(|l| l.starts_with("-A OUTPUT"));
    assert_eq!(
        first_output,
        Some(r#"-A OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES"#),
        "hook goes ahead of others' rules"
    );

    nf.remove().expect("remove");
    assert_eq!(ns.save(), before, "remove left something behind");
    assert_eq!(
        normalise(&ns.exec(&["iptables-save", "-t", "nat"])),
        before_nat
    );

    nf.remove().expect("remove is idempotent");
    assert_eq!(ns.save(), before);
}

#[test]
fn remove_on_a_fresh_namespace_changes_nothing() {
    let Some(ns) = Netns::new() else { return };
    let before = ns.save();
    ns.netfilter()
        .remove()
        .expect("remove with nothing installed");
    assert_eq!(ns.save(), before);
}

/// A rule of someone else's that jumps to flux's chain is not flux's to delete; remove must
/// refuse as a whole rather than leave a half-removed state.
#[test]
fn remove_blocked_by_a_foreign_jump_changes_nothing() {
    let Some(ns) = Netns::new() else { return };
    let nf = ns.netfilter();
    nf.apply(&render(&sample())).expect("apply");
    ns.nat(&["-A", "OUTPUT", "-j", "FLUX-SERVICES"]);
    let before = ns.save();

    let err = nf.remove().expect_err("chain still referenced");
    assert!(
        matches!(&err, Error::Restore { text, .. } if text == "-X FLUX-SERVICES"),
        "{err}"
    );
    assert_eq!(ns.save(), before, "a failed remove changed the rules");
}

/// Counts the commands flux runs, to show a large ruleset still goes in one restore.
struct Counting {
    inner: CommandRunner,
    programs: Arc<Mutex<Vec<String>>>,
}

impl Runner for Counting {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
        self.programs
            .lock()
            .expect("no panic while held")
            .push(program.to_string());
        self.inner.run(program, args, stdin)
    }
}

#[test]
fn ten_thousand_services_apply_in_one_call() {
    let Some(ns) = Netns::new() else { return };
    let programs = Arc::new(Mutex::new(Vec::new()));
    let nf = Netfilter::new(Counting {
        inner: ns.runner(),
        programs: programs.clone(),
    });
    let redirects = (0..10_000u32)
        .map(|i| Redirect {
            service: format!("svc-{i:05}"),
            vip: SocketAddrV4::new([198, 18, (i / 250) as u8, (i % 250 + 1) as u8].into(), 80),
        })
        .collect();
    let rs = render(&desired(redirects, &["docker0", "br-+"]));
    assert_eq!(rs.service_rules().len(), 10_000);

    let started = Instant::now();
    nf.apply(&rs).expect("first apply");
    let first = started.elapsed();
    assert_eq!(
        *programs.lock().expect("no panic while held"),
        ["iptables-save", "iptables-restore"]
    );

    let started = Instant::now();
    let drift = nf.drift(&rs).expect("drift");
    let check = started.elapsed();
    assert!(drift.is_clean(), "{drift}");

    let started = Instant::now();
    nf.apply(&rs).expect("second apply");
    let again = started.elapsed();

    let started = Instant::now();
    nf.remove().expect("remove");
    let removed = started.elapsed();

    println!(
        "10,000 services: first apply {first:?}, drift check {check:?}, \
         re-apply {again:?}, remove {removed:?}"
    );
}

#[test]
fn redirects_connections_from_host_processes() {
    let Some(ns) = Netns::new() else { return };
    // The VIP range needs a route, or connect() fails before the OUTPUT hook runs.
    ns.exec(&["ip", "route", "add", "198.18.0.0/16", "dev", "lo"]);
    let vip: SocketAddrV4 = "198.18.0.10:80".parse().expect("valid");
    ns.netfilter()
        .apply(&render(&desired(
            vec![redirect("web", "198.18.0.10:80")],
            &[],
        )))
        .expect("apply");

    let original = ns.enter(|| {
        let listener = TcpListener::bind(("0.0.0.0", PROXY_PORT)).expect("bind proxy port");
        let _client = traffic::connect(vip).expect("connect to VIP");
        traffic::accept_original_dst(&listener)
    });
    assert_eq!(original, Some(vip));
}

/// A "container" namespace behind a bridge in the "host" namespace, as Docker sets it up.
/// Traffic is redirected only once the bridge is listed among the bridge interfaces.
#[test]
fn redirects_connections_from_a_bridge_only_when_hooked() {
    let Some(host) = Netns::new() else { return };
    let Some(container) = Netns::new() else {
        return;
    };
    for args in [
        &["ip", "link", "add", "br-flux0", "type", "bridge"][..],
        &[
            "ip", "link", "add", "veth-h", "type", "veth", "peer", "name", "veth-c",
        ],
        &["ip", "link", "set", "veth-c", "netns", container.name()],
        &["ip", "link", "set", "veth-h", "master", "br-flux0", "up"],
        &["ip", "addr", "add", "198.19.1.1/24", "dev", "br-flux0"],
        &["ip", "link", "set", "br-flux0", "up"],
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
    let vip: SocketAddrV4 = "198.18.0.10:80".parse().expect("valid");
    let nf = host.netfilter();
    let listener = host.enter(|| TcpListener::bind(("0.0.0.0", PROXY_PORT)).expect("bind"));

    nf.apply(&render(&desired(
        vec![redirect("web", "198.18.0.10:80")],
        &["docker0"],
    )))
    .expect("apply without this bridge");
    let refused = container.enter(|| traffic::connect(vip));
    assert!(refused.is_err(), "unhooked bridge traffic was redirected");

    nf.apply(&render(&desired(
        vec![redirect("web", "198.18.0.10:80")],
        &["br-+"],
    )))
    .expect("apply with the bridge");
    let _client = container
        .enter(|| traffic::connect(vip))
        .expect("connect from container");
    assert_eq!(traffic::accept_original_dst(&listener), Some(vip));
}
