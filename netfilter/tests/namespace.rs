//! The crate against real iptables and ipset (and real connections), each test in network
//! namespaces it creates and deletes itself. Needs root; skips otherwise.

mod support;

use std::net::{SocketAddrV4, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use netfilter::{
    annotate, annotate_empty_set, annotate_set, render, CommandRunner, Desired, Error, Netfilter,
    Redirect, Runner, VipRange,
};
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
:DOCKER-USER - [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FORWARD -j DOCKER-USER
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A OUTPUT -d 198.18.0.99/32 -p tcp -m tcp --dport 80 -m comment --comment "someone else" -j ACCEPT
-A DOCKER-USER -j RETURN
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
        ..Desired::default()
    }
}

/// `desired` refusing `rejects` (services with no instance).
fn refusing(redirects: Vec<Redirect>, rejects: Vec<Redirect>, bridges: &[&str]) -> Desired {
    Desired {
        rejects,
        reject_empty: true,
        ..desired(redirects, bridges)
    }
}

/// [`sample`] plus two services with no instance.
fn refusing_sample() -> Desired {
    Desired {
        rejects: vec![
            redirect("idle", "198.18.0.12:80"),
            redirect("Idle_2.b", "198.18.2.2:8443"),
        ],
        reject_empty: true,
        ..sample()
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
    let mut members = installed.set_members.clone();
    members.sort();
    let mut want = rs.set_members().to_vec();
    want.sort();
    assert_eq!(members, want);
    let mut hooks = installed.hooks.clone();
    let mut want = rs.hooks().to_vec();
    hooks.sort();
    want.sort();
    assert_eq!(hooks, want);
    let drift = nf.drift(&rs).expect("drift");
    assert!(drift.is_clean(), "fresh install drifted: {drift:?}");

    // The one rule serves every service; the set members name them.
    assert!(annotate(&installed).iter().all(|a| a.service.is_none()));
    let services: Vec<_> = annotate_set(&installed)
        .into_iter()
        .filter_map(|a| a.service)
        .collect();
    assert_eq!(services, ["web", "api-v2", "Billing_DB.primary", "x"]);
}

#[test]
fn apply_twice_changes_nothing() {
    let Some(ns) = Netns::new() else { return };
    let nf = ns.netfilter();
    let rs = render(&sample());

    nf.apply(&rs).expect("first apply");
    let once = (ns.save(), ns.sets());
    let (nf, programs) = counting(&ns);
    nf.apply(&rs).expect("second apply");
    assert_eq!(
        taken(&programs),
        [
            "iptables-save -t nat",
            "iptables-save -t filter",
            "ipset save flux-vips",
            "ipset save flux-empty"
        ],
        "an unchanged state is only read"
    );
    assert_eq!((ns.save(), ns.sets()), once);
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
    assert_eq!(
        installed.set_members,
        [r#"add flux-vips 198.18.0.20,tcp:8080 comment "flux:web""#]
    );
    assert_eq!(installed.hooks.len(), 2, "stale bridge hooks are gone");
}

/// Each way the rules or the set can be damaged behind flux's back is seen as drift and
/// repaired by one apply.
#[test]
fn damage_is_detected_and_repaired() {
    let output_hook = r#"-A OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES"#;
    let nat = |args: &[&'static str]| {
        let mut v = vec!["iptables", "-t", "nat"];
        v.extend_from_slice(args);
        v
    };
    let cases: Vec<(&str, Vec<Vec<&str>>, Check)> = vec![
        (
            "services chain flushed",
            vec![nat(&["-F", "FLUX-SERVICES"])],
            |d| !d.canary_missing && d.missing_rules.len() == 1 && d.missing_hooks.is_empty(),
        ),
        (
            "hook deleted",
            vec![nat(&[
                "-D",
                "OUTPUT",
                "-m",
                "comment",
                "--comment",
                "flux hook",
                "-j",
                "FLUX-SERVICES",
            ])],
            |d| {
                d.missing_hooks
                    == [r#"-A OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES"#]
                    && d.missing_rules.is_empty()
            },
        ),
        ("every nat chain flushed", vec![nat(&["-F"])], |d| {
            !d.canary_missing && d.missing_rules.len() == 1 && d.missing_hooks.len() == 4
        }),
        (
            "nat table flushed and chains deleted",
            vec![nat(&["-F"]), nat(&["-X"])],
            |d| d.canary_missing && d.services_chain_missing && d.missing_rules.len() == 1,
        ),
        (
            "foreign rule in flux's chain",
            vec![nat(&["-I", "FLUX-SERVICES", "1", "-j", "RETURN"])],
            |d| d.extra_rules == ["-A FLUX-SERVICES -j RETURN"] && d.missing_rules.is_empty(),
        ),
        (
            "set flushed",
            vec![vec!["ipset", "flush", "flux-vips"]],
            |d| d.missing_members.len() == 4 && !d.set_missing && d.missing_rules.is_empty(),
        ),
        (
            "member deleted, foreign member added, comment changed",
            vec![
                vec!["ipset", "del", "flux-vips", "198.18.0.11,tcp:443"],
                vec!["ipset", "add", "flux-vips", "198.18.0.99,tcp:22"],
                vec![
                    "ipset",
                    "add",
                    "-exist",
                    "flux-vips",
                    "198.18.0.10,tcp:80",
                    "comment",
                    "flux:evil",
                ],
            ],
            |d| {
                d.missing_members.len() == 2
                    && d.extra_members.len() == 2
                    && d.extra_members.iter().any(|m| m.contains("flux:evil"))
            },
        ),
        (
            "set destroyed",
            vec![
                nat(&["-F", "FLUX-SERVICES"]),
                vec!["ipset", "destroy", "flux-vips"],
            ],
            |d| d.set_missing && d.missing_members.len() == 4 && d.missing_rules.len() == 1,
        ),
        (
            "set replaced by one of another type",
            vec![
                nat(&["-F", "FLUX-SERVICES"]),
                vec!["ipset", "destroy", "flux-vips"],
                vec!["ipset", "create", "flux-vips", "hash:ip"],
                vec!["ipset", "add", "flux-vips", "198.18.0.10"],
            ],
            |d| d.set_incompatible && d.missing_rules.len() == 1,
        ),
    ];
    let Some(ns) = Netns::new() else { return };
    let nf = ns.netfilter();
    let rs = render(&sample());
    nf.apply(&rs).expect("apply");
    assert!(ns.save().contains(output_hook));

    damage_and_repair(&ns, &nf, &rs, cases, |_| {});

    // The whole table deleted (not only its rules), as `nft flush ruleset` would; the set
    // lives on, outside nftables.
    ns.exec(&["nft", "delete", "table", "ip", "nat"]);
    let drift = nf.drift(&rs).expect("drift");
    assert!(
        drift.canary_missing && drift.missing_hooks.len() == 4 && drift.missing_members.is_empty(),
        "{drift:?}"
    );
    nf.apply(&rs).expect("repair after table deleted");
    assert!(nf.drift(&rs).expect("drift").is_clean());
}

#[test]
fn others_rules_survive_apply_and_remove() {
    others_rules_survive(
        sample(),
        r#"-A OUTPUT -d 198.18.0.99/32 -p tcp -m tcp --dport 80 -m comment --comment "someone else" -j ACCEPT"#,
    );
}

/// The same with the filter chain, its hooks and the second set: apply and remove leave
/// everyone else's filter rules exactly as they were, and remove takes all of flux's away.
#[test]
fn others_rules_survive_a_refusing_apply_and_remove() {
    others_rules_survive(
        refusing_sample(),
        r#"-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT"#,
    );
}

/// Applies `desired` over foreign rules and sets, checks the first rule of filter's OUTPUT
/// (flux's hook goes ahead of others'), removes it, checks nothing else changed.
fn others_rules_survive(desired: Desired, first_filter_output: &str) {
    let Some(ns) = Netns::new() else { return };
    let nf = ns.netfilter();
    ns.restore(FOREIGN);
    ns.ipset(&["create", "someone-elses", "hash:ip"]);
    ns.ipset(&["add", "someone-elses", "198.18.0.10"]);
    let before = ns.save();
    let sets_before = ns.sets();
    let before_nat = normalise(&ns.exec(&["iptables-save", "-t", "nat"]));

    nf.apply(&render(&desired)).expect("apply");
    let applied = ns.save();
    assert_eq!(
        without_flux(&applied),
        before,
        "apply changed others' rules"
    );
    let nat = normalise(&ns.exec(&["iptables-save", "-t", "nat"]));
    let first_output = nat.lines().find(|l| l.starts_with("-A OUTPUT"));
    assert_eq!(
        first_output,
        Some(r#"-A OUTPUT -m comment --comment "flux hook" -j FLUX-SERVICES"#),
        "hook goes ahead of others' rules"
    );
    let filter = ns.exec(&["iptables-save", "-t", "filter"]);
    assert_eq!(
        filter.lines().find(|l| l.starts_with("-A OUTPUT")),
        Some(first_filter_output),
        "{filter}"
    );
    assert_eq!(
        filter.contains("FLUX-REJECT"),
        desired.reject_empty,
        "{filter}"
    );

    assert!(ns.sets().contains("someone-elses 198.18.0.10"));

    nf.remove().expect("remove");
    assert_eq!(ns.save(), before, "remove left something behind");
    assert_eq!(
        ns.sets(),
        sets_before,
        "remove left the set behind or touched others'"
    );
    assert_eq!(
        normalise(&ns.exec(&["iptables-save", "-t", "nat"])),
        before_nat
    );

    nf.remove().expect("remove is idempotent");
    assert_eq!(ns.save(), before);
    assert_eq!(ns.sets(), sets_before);
}

#[test]
fn remove_on_a_fresh_namespace_changes_nothing() {
    let Some(ns) = Netns::new() else { return };
    let before = (ns.save(), ns.sets());
    ns.netfilter()
        .remove()
        .expect("remove with nothing installed");
    assert_eq!((ns.save(), ns.sets()), before);
}

/// A rule of someone else's that jumps to flux's chain is not flux's to delete; remove must
/// refuse as a whole rather than leave a half-removed state.
#[test]
fn remove_blocked_by_a_foreign_jump_changes_nothing() {
    let Some(ns) = Netns::new() else { return };
    let nf = ns.netfilter();
    nf.apply(&render(&sample())).expect("apply");
    ns.nat(&["-A", "OUTPUT", "-j", "FLUX-SERVICES"]);
    let before = (ns.save(), ns.sets());

    let err = nf.remove().expect_err("chain still referenced");
    assert!(
        matches!(&err, Error::Restore { text, .. } if text == "-X FLUX-SERVICES"),
        "{err}"
    );
    assert_eq!(
        (ns.save(), ns.sets()),
        before,
        "a failed remove changed something"
    );
}

/// A set of flux's name that someone else's rule still matches cannot be destroyed: remove
/// takes away the chains and reports the set.
#[test]
fn remove_reports_a_set_still_in_use() {
    let Some(ns) = Netns::new() else { return };
    let nf = ns.netfilter();
    nf.apply(&render(&sample())).expect("apply");
    ns.nat(&[
        "-A",
        "OUTPUT",
        "-m",
        "set",
        "--match-set",
        "flux-vips",
        "dst,dst",
        "-j",
        "RETURN",
    ]);
    let err = nf.remove().expect_err("set still referenced");
    assert!(err.to_string().contains("ipset destroy"), "{err}");
    assert!(!ns.save().contains("FLUX-"));
    ns.nat(&["-F", "OUTPUT"]);
    nf.remove().expect("remove once nothing matches the set");
    assert!(!ns.sets().contains("flux-vips"));
}

/// Records the commands flux runs (program and arguments), to show what an apply costs.
struct Counting {
    inner: CommandRunner,
    programs: Arc<Mutex<Vec<String>>>,
}

impl Runner for Counting {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
        let mut line = program.to_string();
        for arg in args.iter().filter(|a| **a != "-w" && **a != "5") {
            line.push(' ');
            line.push_str(arg);
        }
        self.programs
            .lock()
            .expect("no panic while held")
            .push(line);
        self.inner.run(program, args, stdin)
    }
}

type Programs = Arc<Mutex<Vec<String>>>;

fn counting(ns: &Netns) -> (Netfilter, Programs) {
    let programs = Arc::new(Mutex::new(Vec::new()));
    let nf = Netfilter::new(Counting {
        inner: ns.runner(),
        programs: programs.clone(),
    });
    (nf, programs)
}

fn taken(programs: &Programs) -> Vec<String> {
    std::mem::take(&mut *programs.lock().expect("no panic while held"))
}

fn many(n: u32) -> Vec<Redirect> {
    (0..n)
        .map(|i| Redirect {
            service: format!("svc-{i:05}"),
            vip: SocketAddrV4::new([198, 18, (i / 250) as u8, (i % 250 + 1) as u8].into(), 80),
        })
        .collect()
}

/// 10,000 services are one rule and 10,000 set members; one more service is one `ipset
/// restore` line and no iptables write.
#[test]
fn ten_thousand_services_change_by_one_member() {
    let Some(ns) = Netns::new() else { return };
    let (nf, programs) = counting(&ns);
    let rs = render(&desired(many(10_000), &["docker0", "br-+"]));
    assert_eq!(rs.service_rules().len(), 1);
    assert_eq!(rs.set_members().len(), 10_000);

    let started = Instant::now();
    nf.apply(&rs).expect("first apply");
    let first = started.elapsed();
    assert_eq!(
        taken(&programs),
        [
            "iptables-save -t nat",
            "iptables-save -t filter",
            "ipset save flux-vips",
            "ipset save flux-empty",
            "ipset restore -exist",
            "iptables-restore --noflush"
        ]
    );

    let started = Instant::now();
    let drift = nf.drift(&rs).expect("drift");
    let check = started.elapsed();
    assert!(drift.is_clean(), "{drift}");

    let plus_one = render(&desired(many(10_001), &["docker0", "br-+"]));
    taken(&programs);
    let started = Instant::now();
    nf.apply(&plus_one).expect("one more service");
    let one = started.elapsed();
    assert_eq!(
        taken(&programs),
        [
            "iptables-save -t nat",
            "iptables-save -t filter",
            "ipset save flux-vips",
            "ipset save flux-empty",
            "ipset restore -exist"
        ]
    );
    assert!(nf.drift(&plus_one).expect("drift").is_clean());

    let started = Instant::now();
    nf.apply(&plus_one).expect("unchanged apply");
    let again = started.elapsed();

    // The controller's path: it knows what it applied last, so it sends only the delta.
    let plus_two = render(&desired(many(10_002), &["docker0", "br-+"]));
    taken(&programs);
    let started = Instant::now();
    nf.apply_change(&plus_one, &plus_two)
        .expect("one more, as a change");
    let change = started.elapsed();
    assert_eq!(taken(&programs), ["ipset restore -exist"]);
    assert!(nf.drift(&plus_two).expect("drift").is_clean());
    nf.apply_change(&plus_two, &rs)
        .expect("two fewer, as a change");
    assert!(nf.drift(&rs).expect("drift").is_clean());

    let started = Instant::now();
    nf.remove().expect("remove");
    let removed = started.elapsed();
    assert!(!ns.sets().contains("flux-vips"));

    println!(
        "10,000 services: first apply {first:?}, drift check {check:?}, one added {one:?}, \
         unchanged re-apply {again:?}, one added by apply_change {change:?}, remove {removed:?}"
    );
}

/// With VIP ranges covering every VIP the set is not used (nor created); a VIP outside them
/// brings it in, and it goes again when that VIP does.
#[test]
fn vip_ranges_use_the_set_only_for_vips_outside_them() {
    let Some(ns) = Netns::new() else { return };
    let nf = ns.netfilter();
    let ranged = |redirects| Desired {
        vip_ranges: vec![VipRange {
            addr: "198.18.0.0".parse().expect("valid"),
            prefix_len: 16,
        }],
        ..desired(redirects, &[])
    };
    let inside = render(&ranged(vec![redirect("web", "198.18.0.10:80")]));
    nf.apply(&inside).expect("apply inside");
    assert!(!ns.sets().contains("flux-vips"));
    assert!(nf.drift(&inside).expect("drift").is_clean());

    let outside = render(&ranged(vec![
        redirect("web", "198.18.0.10:80"),
        redirect("old", "10.128.0.1:80"),
    ]));
    nf.apply(&outside).expect("apply outside");
    assert!(nf.drift(&outside).expect("drift").is_clean());
    assert!(ns
        .sets()
        .contains(r#"add flux-vips 10.128.0.1,tcp:80 comment "flux:old""#));
    let rules = nf.installed().expect("installed").service_rules;
    assert!(rules[0].contains("--match-set flux-vips") && rules[1].contains("198.18.0.0/16"));

    nf.apply(&inside).expect("apply inside again");
    assert!(!ns.sets().contains("flux-vips"), "unused set destroyed");
    assert!(nf.drift(&inside).expect("drift").is_clean());
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

/// A VIP that moves to another service stays routed and names its new service.
#[test]
fn a_moved_vip_keeps_routing_and_names_the_new_service() {
    let Some(ns) = Netns::new() else { return };
    ns.exec(&["ip", "route", "add", "198.18.0.0/16", "dev", "lo"]);
    let vip: SocketAddrV4 = "198.18.0.10:80".parse().expect("valid");
    let nf = ns.netfilter();
    nf.apply(&render(&desired(
        vec![redirect("old", "198.18.0.10:80")],
        &[],
    )))
    .expect("apply");
    nf.apply(&render(&desired(
        vec![redirect("new", "198.18.0.10:80")],
        &[],
    )))
    .expect("apply moved");
    // The same move as a change from the last applied ruleset.
    let new = render(&desired(vec![redirect("new", "198.18.0.10:80")], &[]));
    let back = render(&desired(vec![redirect("old", "198.18.0.10:80")], &[]));
    nf.apply_change(&new, &back).expect("move back");
    nf.apply_change(&back, &new).expect("move again");
    assert!(nf.drift(&new).expect("drift").is_clean());
    let members = annotate_set(&nf.installed().expect("installed"));
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].service.as_deref(), Some("new"));
    let original = ns.enter(|| {
        let listener = TcpListener::bind(("0.0.0.0", PROXY_PORT)).expect("bind proxy port");
        let _client = traffic::connect(vip).expect("connect to VIP");
        traffic::accept_original_dst(&listener)
    });
    assert_eq!(original, Some(vip));
}

/// Sends one SYN to `dst` from 127.0.0.1:`port` (inside the calling thread's namespace) and
/// gives up on it, leaving its conntrack entry behind.
fn syn_from(port: u16, dst: SocketAddrV4) {
    use nix::sys::socket::{
        bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK,
        None,
    )
    .expect("socket");
    setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port)).expect("bind");
    let _ = connect(fd.as_raw_fd(), &SockaddrIn::from(dst)); // EINPROGRESS
    std::thread::sleep(std::time::Duration::from_millis(20));
}

/// Entries of connection attempts made before their VIP was routed are deleted; redirected
/// ones (here held in SYN_SENT by a drop on the proxy port) are not, and nothing outside what
/// was newly routed is touched. Both ways: a filtered delete per VIP, and a listing (ranges).
#[test]
fn clears_only_unredirected_attempts_to_newly_routed_vips() {
    let Some(ns) = Netns::new() else { return };
    if ns.runner().run("conntrack", &["-C"], None).is_err() {
        eprintln!("skipped: conntrack is not installed");
        return;
    }
    ns.exec(&[
        "ip",
        "route",
        "add",
        "198.18.0.0/16",
        "dev",
        "lo",
        "src",
        "127.0.0.1",
    ]);
    let port = PROXY_PORT.to_string();
    ns.exec(&[
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", &port, "-j", "DROP",
    ]);
    let nf = ns.netfilter();
    let routed_vip: SocketAddrV4 = "198.18.0.12:80".parse().expect("valid");
    let new_vip: SocketAddrV4 = "198.18.0.10:80".parse().expect("valid");
    let in_range: SocketAddrV4 = "198.18.5.5:443".parse().expect("valid");
    // The redirect also turns connection tracking on in the namespace.
    nf.apply(&render(&desired(
        vec![redirect("old", "198.18.0.12:80")],
        &[],
    )))
    .expect("apply");
    ns.enter(|| {
        syn_from(41001, new_vip);
        syn_from(41002, routed_vip);
        syn_from(41003, in_range);
    });
    let entries = || ns.exec(&["conntrack", "-L", "-p", "tcp"]);
    let before = entries();
    for p in ["sport=41001", "sport=41002", "sport=41003"] {
        assert!(before.contains(p), "{p} missing: {before}");
    }
    assert!(before.contains("dst=198.18.0.12 sport=41002 dport=80 [UNREPLIED] src=127.0.0.1"));

    let vips = netfilter::Routed {
        vips: vec![new_vip, routed_vip],
        ranges: vec![],
    };
    assert_eq!(nf.clear_unredirected(&vips).expect("clear"), 1);
    let after = entries();
    assert!(!after.contains("sport=41001"), "{after}");
    assert!(
        after.contains("sport=41002") && after.contains("sport=41003"),
        "{after}"
    );

    let range = netfilter::Routed {
        vips: (0..9)
            .map(|i| SocketAddrV4::new([198, 18, 9, i].into(), 80))
            .collect(),
        ranges: vec![VipRange {
            addr: "198.18.0.0".parse().expect("valid"),
            prefix_len: 16,
        }],
    };
    assert_eq!(nf.clear_unredirected(&range).expect("clear"), 1);
    let after = entries();
    assert!(!after.contains("sport=41003"), "{after}");
    assert!(
        after.contains("sport=41002"),
        "redirected entry deleted: {after}"
    );
}

/// Connects to `vip` from the calling thread (inside a namespace) with a short timeout and
/// says how it went: refused at once, connected, or anything else (a timeout, unreachable).
fn try_connect(vip: SocketAddrV4) -> Result<std::net::TcpStream, std::io::ErrorKind> {
    std::net::TcpStream::connect_timeout(&vip.into(), std::time::Duration::from_millis(500))
        .map_err(|e| e.kind())
}

/// Whether a connection is waiting on `listener` (non-blocking accept).
fn pending(listener: &TcpListener) -> bool {
    listener.set_nonblocking(true).expect("non-blocking");
    listener.accept().is_ok()
}

/// A service with no instance: its VIP is a member of flux-empty (not flux-vips), the rules
/// read back exactly, and a real connect() to it is refused at once (ECONNREFUSED) without
/// reaching the proxy port, while a routed VIP next to it is still redirected.
#[test]
fn refusing_install_reads_back_exactly_and_refuses_connections() {
    let Some(ns) = Netns::new() else { return };
    ns.exec(&[
        "ip",
        "route",
        "add",
        "198.18.0.0/16",
        "dev",
        "lo",
        "src",
        "127.0.0.1",
    ]);
    let nf = ns.netfilter();
    let rs = render(&refusing_sample());
    assert!(rs.rejected().is_empty(), "{:?}", rs.rejected());
    nf.apply(&rs).expect("apply");

    let installed = nf.installed().expect("installed");
    assert_eq!(installed.service_rules, rs.service_rules());
    assert!(installed.service_rules[0].ends_with("-j RETURN"));
    assert!(installed.reject_chain);
    assert_eq!(installed.reject_rules, rs.reject_rules());
    let mut hooks = installed.filter_hooks.clone();
    let mut want = rs.filter_hooks().to_vec();
    hooks.sort();
    want.sort();
    assert_eq!(hooks, want);
    assert_eq!(hooks.len(), 7, "OUTPUT, and INPUT and FORWARD per bridge");
    let mut members = installed.empty_members.clone();
    members.sort();
    let mut want = rs.empty_members().to_vec();
    want.sort();
    assert_eq!(members, want);
    assert!(
        !installed.set_members.iter().any(|m| m.contains("idle")),
        "a refused VIP is not in flux-vips"
    );
    assert!(nf.drift(&rs).expect("drift").is_clean());

    let empty: Vec<_> = annotate_empty_set(&installed)
        .into_iter()
        .map(|m| (m.element, m.service))
        .collect();
    assert_eq!(
        empty,
        [
            ("198.18.0.12,tcp:80".to_string(), Some("idle".to_string())),
            (
                "198.18.2.2,tcp:8443".to_string(),
                Some("Idle_2.b".to_string())
            ),
        ]
    );
    let reject = annotate(&installed)
        .into_iter()
        .find(|a| a.chain == "FLUX-REJECT")
        .expect("reject rule annotated");
    assert_eq!(reject.table, "filter");

    let idle: SocketAddrV4 = "198.18.0.12:80".parse().expect("valid");
    let web: SocketAddrV4 = "198.18.0.10:80".parse().expect("valid");
    ns.enter(|| {
        let listener = TcpListener::bind(("0.0.0.0", PROXY_PORT)).expect("bind proxy port");
        let started = Instant::now();
        let refused = try_connect(idle);
        assert_eq!(refused.err(), Some(std::io::ErrorKind::ConnectionRefused));
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
        assert!(
            !pending(&listener),
            "a refused connection reached the proxy"
        );
        listener.set_nonblocking(false).expect("blocking");
        let _client = traffic::connect(web).expect("routed VIP still redirected");
        assert_eq!(traffic::accept_original_dst(&listener), Some(web));
    });
}

/// A VIP inside a VIP range whose service has no instance is refused too: the return rule
/// ahead of the range rule keeps the range from redirecting it.
#[test]
fn a_refused_vip_inside_a_range_is_not_redirected_by_the_range() {
    let Some(ns) = Netns::new() else { return };
    ns.exec(&[
        "ip",
        "route",
        "add",
        "198.18.0.0/16",
        "dev",
        "lo",
        "src",
        "127.0.0.1",
    ]);
    let ranged = Desired {
        vip_ranges: vec![VipRange {
            addr: "198.18.0.0".parse().expect("valid"),
            prefix_len: 16,
        }],
        ..refusing(
            vec![redirect("web", "198.18.0.10:80")],
            vec![redirect("idle", "198.18.0.12:80")],
            &[],
        )
    };
    let nf = ns.netfilter();
    let rs = render(&ranged);
    nf.apply(&rs).expect("apply");
    assert!(nf.drift(&rs).expect("drift").is_clean());
    assert!(!ns.sets().contains("flux-vips"), "no VIP outside the range");
    let idle: SocketAddrV4 = "198.18.0.12:80".parse().expect("valid");
    let other: SocketAddrV4 = "198.18.0.13:80".parse().expect("valid");
    ns.enter(|| {
        let listener = TcpListener::bind(("0.0.0.0", PROXY_PORT)).expect("bind proxy port");
        assert_eq!(
            try_connect(idle).err(),
            Some(std::io::ErrorKind::ConnectionRefused)
        );
        assert!(
            !pending(&listener),
            "the range rule redirected a refused VIP"
        );
        listener.set_nonblocking(false).expect("blocking");
        // Any other VIP of the range still goes to the proxy.
        let _client = traffic::connect(other).expect("range still redirected");
        assert_eq!(traffic::accept_original_dst(&listener), Some(other));
    });
}

/// Each way the refusal's rules or set can be damaged behind flux's back is drift, and one
/// apply repairs it to the very same kernel state, refusing again.
#[test]
fn refusal_damage_is_detected_and_repaired() {
    let filter = |args: &[&'static str]| {
        let mut v = vec!["iptables", "-t", "filter"];
        v.extend_from_slice(args);
        v
    };
    let cases: Vec<(&str, Vec<Vec<&str>>, Check)> = vec![
        (
            "filter chain flushed",
            vec![filter(&["-F", "FLUX-REJECT"])],
            |d| d.missing_reject_rules.len() == 1 && d.missing_hooks.is_empty(),
        ),
        (
            "filter hook deleted",
            vec![filter(&[
                "-D",
                "OUTPUT",
                "-m",
                "conntrack",
                "--ctstate",
                "NEW",
                "-m",
                "comment",
                "--comment",
                "flux hook",
                "-j",
                "FLUX-REJECT",
            ])],
            |d| {
                d.missing_hooks
                    == [
                        r#"-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "flux hook" -j FLUX-REJECT"#,
                    ]
                    && d.missing_reject_rules.is_empty()
            },
        ),
        ("whole filter table flushed", vec![filter(&["-F"])], |d| {
            d.missing_reject_rules.len() == 1 && d.missing_hooks.len() == 1
        }),
        (
            "filter chain deleted",
            vec![filter(&["-F"]), filter(&["-X", "FLUX-REJECT"])],
            |d| d.reject_chain_missing && d.missing_hooks.len() == 1,
        ),
        (
            "foreign rule ahead of the refusal",
            vec![filter(&["-I", "FLUX-REJECT", "1", "-j", "RETURN"])],
            |d| d.extra_reject_rules == ["-A FLUX-REJECT -j RETURN"],
        ),
        (
            "return rule deleted",
            vec![vec!["iptables", "-t", "nat", "-D", "FLUX-SERVICES", "1"]],
            |d| d.missing_rules.len() == 1 && d.missing_rules[0].ends_with("-j RETURN"),
        ),
        (
            "empty set flushed",
            vec![vec!["ipset", "flush", "flux-empty"]],
            |d| d.missing_members.len() == 1 && d.missing_members[0].contains("flux-empty"),
        ),
        (
            "refused VIP added to the VIP set, foreign member in the empty set",
            vec![
                vec!["ipset", "add", "flux-vips", "198.18.0.12,tcp:80"],
                vec!["ipset", "add", "flux-empty", "198.18.0.10,tcp:80"],
            ],
            |d| d.extra_members.len() == 2 && d.missing_members.is_empty(),
        ),
        (
            "empty set destroyed",
            vec![
                filter(&["-F", "FLUX-REJECT"]),
                vec!["iptables", "-t", "nat", "-F", "FLUX-SERVICES"],
                vec!["ipset", "destroy", "flux-empty"],
            ],
            |d| d.empty_set_missing && d.missing_members.len() == 1,
        ),
        (
            "empty set replaced by one of another type",
            vec![
                filter(&["-F", "FLUX-REJECT"]),
                vec!["iptables", "-t", "nat", "-F", "FLUX-SERVICES"],
                vec!["ipset", "destroy", "flux-empty"],
                vec!["ipset", "create", "flux-empty", "hash:ip"],
                vec!["ipset", "add", "flux-empty", "198.18.0.12"],
            ],
            |d| d.empty_set_incompatible && d.missing_reject_rules.len() == 1,
        ),
    ];
    let Some(ns) = Netns::new() else { return };
    ns.exec(&[
        "ip",
        "route",
        "add",
        "198.18.0.0/16",
        "dev",
        "lo",
        "src",
        "127.0.0.1",
    ]);
    let nf = ns.netfilter();
    let rs = render(&refusing(
        vec![redirect("web", "198.18.0.10:80")],
        vec![redirect("idle", "198.18.0.12:80")],
        &[],
    ));
    nf.apply(&rs).expect("apply");
    let idle: SocketAddrV4 = "198.18.0.12:80".parse().expect("valid");
    damage_and_repair(&ns, &nf, &rs, cases, |what| {
        let refused = ns.enter(|| try_connect(idle).err());
        assert_eq!(
            refused,
            Some(std::io::ErrorKind::ConnectionRefused),
            "{what}: not refused after repair"
        );
    });
}

/// What a damage case expects of the drift it causes.
type Check = fn(&netfilter::Drift) -> bool;

/// A damage case: its name, the commands that do the damage, and the drift expected.
type DamageCase<'a> = (&'a str, Vec<Vec<&'a str>>, Check);

/// For each case: run its commands (the damage), check the drift it causes, repair with one
/// apply, and check that the kernel is back to exactly what the first apply left; `after` runs
/// once each case is repaired.
fn damage_and_repair(
    ns: &Netns,
    nf: &netfilter::Netfilter,
    rs: &netfilter::Ruleset,
    cases: Vec<DamageCase>,
    after: impl Fn(&str),
) {
    let clean = (ns.save(), ns.sets());
    for (what, commands, check) in cases {
        for args in commands {
            ns.exec(&args);
        }
        let drift = nf.drift(rs).expect("drift");
        assert!(check(&drift), "{what}: unexpected drift {drift:?}");
        nf.apply(rs).expect("repair");
        assert!(
            nf.drift(rs).expect("drift").is_clean(),
            "{what}: not repaired"
        );
        assert_eq!(
            (ns.save(), ns.sets()),
            clean,
            "{what}: repaired state differs"
        );
        after(what);
    }
}

/// A service losing its last instance and getting one back, as the controller sends it
/// (member deltas by `apply_change`): refused, then redirected, then refused again; turning
/// refusals off takes the filter chain, its hooks and the set away.
#[test]
fn a_vip_moves_between_the_sets_and_refusals_can_be_turned_off() {
    let Some(ns) = Netns::new() else { return };
    ns.exec(&[
        "ip",
        "route",
        "add",
        "198.18.0.0/16",
        "dev",
        "lo",
        "src",
        "127.0.0.1",
    ]);
    let (nf, programs) = counting(&ns);
    let vip: SocketAddrV4 = "198.18.0.10:80".parse().expect("valid");
    let routed = render(&refusing(
        vec![redirect("web", "198.18.0.10:80")],
        vec![],
        &[],
    ));
    let empty = render(&refusing(
        vec![],
        vec![redirect("web", "198.18.0.10:80")],
        &[],
    ));
    nf.apply(&routed).expect("apply");
    let listener = ns.enter(|| TcpListener::bind(("0.0.0.0", PROXY_PORT)).expect("bind"));

    taken(&programs);
    nf.apply_change(&routed, &empty).expect("no instance left");
    assert_eq!(taken(&programs), ["ipset restore -exist"]);
    assert!(nf.drift(&empty).expect("drift").is_clean());
    assert_eq!(
        ns.enter(|| try_connect(vip).err()),
        Some(std::io::ErrorKind::ConnectionRefused)
    );
    assert!(!pending(&listener));

    nf.apply_change(&empty, &routed).expect("an instance again");
    assert!(nf.drift(&routed).expect("drift").is_clean());
    listener.set_nonblocking(false).expect("blocking");
    let _client = ns
        .enter(|| traffic::connect(vip))
        .expect("redirected again");
    assert_eq!(traffic::accept_original_dst(&listener), Some(vip));

    nf.apply_change(&routed, &empty).expect("no instance again");
    let off = render(&desired(vec![redirect("web", "198.18.0.10:80")], &[]));
    nf.apply_change(&empty, &off).expect("refusals off");
    assert!(nf.drift(&off).expect("drift").is_clean());
    let save = ns.save();
    assert!(
        !save.contains("FLUX-REJECT") && !save.contains("flux-empty"),
        "{save}"
    );
    assert!(!ns.sets().contains("flux-empty"));
    let _client = ns
        .enter(|| traffic::connect(vip))
        .expect("redirected when not refusing");
    assert_eq!(traffic::accept_original_dst(&listener), Some(vip));
}

/// remove with refusals installed takes away both tables' chains and hooks and both sets;
/// someone else's jump to the filter chain stops it after nat is gone, and the rest goes
/// once that jump is deleted.
#[test]
fn remove_takes_the_filter_chain_and_set_away() {
    let Some(ns) = Netns::new() else { return };
    ns.restore(FOREIGN);
    let before = (ns.save(), ns.sets());
    let nf = ns.netfilter();
    nf.apply(&render(&refusing_sample())).expect("apply");
    ns.exec(&["iptables", "-A", "FORWARD", "-j", "FLUX-REJECT"]);
    let err = nf.remove().expect_err("filter chain still referenced");
    assert!(
        matches!(&err, Error::Restore { text, .. } if text == "-X FLUX-REJECT"),
        "{err}"
    );
    assert!(!ns.exec(&["iptables-save", "-t", "nat"]).contains("FLUX-"));
    ns.exec(&["iptables", "-D", "FORWARD", "-j", "FLUX-REJECT"]);
    nf.remove().expect("remove");
    assert_eq!((ns.save(), ns.sets()), before);
}

/// Containers on a bridge flux hooks are refused (the FORWARD hook); on a bridge it does not,
/// their connections go where the VIP routes, as with the redirect.
#[test]
fn refuses_connections_from_a_hooked_bridge_only() {
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
        // The VIP range routed onwards, as a default route would on a real host.
        &["ip", "route", "add", "198.18.0.0/16", "dev", "lo"],
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
    let vip: SocketAddrV4 = "198.18.0.12:80".parse().expect("valid");
    let nf = host.netfilter();
    nf.apply(&render(&refusing(
        vec![],
        vec![redirect("idle", "198.18.0.12:80")],
        &["docker0"],
    )))
    .expect("apply without this bridge");
    let unhooked = container.enter(|| try_connect(vip).err());
    assert_ne!(
        unhooked,
        Some(std::io::ErrorKind::ConnectionRefused),
        "traffic from an unhooked interface was refused"
    );

    nf.apply(&render(&refusing(
        vec![],
        vec![redirect("idle", "198.18.0.12:80")],
        &["br-+"],
    )))
    .expect("apply with the bridge");
    let started = Instant::now();
    let hooked = container.enter(|| try_connect(vip).err());
    assert_eq!(hooked, Some(std::io::ErrorKind::ConnectionRefused));
    assert!(started.elapsed() < std::time::Duration::from_millis(200));
}
