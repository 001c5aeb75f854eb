//! Issue 5 acceptance: flux clusters on etcd. Each test builds its own cluster of host network
//! namespaces (each with its own dockerd and fluxd) joined by a bridge in a lan namespace that
//! runs etcd (see support/cluster.rs), and tears it all down on drop, also when it fails.
//!
//! Run with `integration/run` (one test at a time: the timings below assume nothing else
//! loads the machine's two cores). Hosts use `--host-ttl 5` and `--steering bpf` (fluxd's
//! default path), except `s1_nat`, which runs s1 on the nat path.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "support/cluster.rs"]
mod cluster;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cluster::{median, set, tail, web_vip, Cluster, ClusterConfig, Load, LoadReport, HTTP_PORT};
use support::browser::{self, http_get};

/// Bounds of every client loop: far more than a scenario needs, so the loop ends when told.
const LOAD_CONNS: usize = 100_000;
const LOAD_TIME: Duration = Duration::from_secs(120);

fn assert_no_failures(who: &str, r: &LoadReport, dump: impl FnOnce() -> String) {
    assert!(
        r.failures.is_empty() && r.total > 0,
        "clients on {who}: {}{}",
        r.summary(),
        dump()
    );
    eprintln!("clients on {who}: {}", r.summary());
}

/// Two hosts with two `web` containers each, converged everywhere.
fn two_by_two(c: &Cluster) -> BTreeSet<String> {
    c.add_web_service();
    for h in &c.hosts {
        for i in 1..=2 {
            h.run_web(&format!("{}-web{i}", h.letter));
        }
    }
    let want = set(&["a-web1", "a-web2", "b-web1", "b-web2"]);
    let took = c.wait_converged("web", &want, Duration::from_secs(15));
    assert!(took.is_some(), "not converged on {want:?}{}", c.dump("web"));
    want
}

/// Acceptance 1, and consistency: a client on host A reaches the instances of hosts A and B,
/// spread over all four; `fluxctl query` on either host lists every host's instances with the
/// publishing host's IP and published port (network mode `local`).
#[test]
fn s1_connections_spread_over_both_hosts() {
    connections_spread_over_both_hosts(ClusterConfig::default());
}

/// s1 with every host on the nat path, whatever the default: the scenarios run on bpf, and
/// this keeps the nat path's cross-host routing covered (`integration/run --steering nat`
/// runs them all on nat).
#[test]
fn s1_nat_connections_spread_over_both_hosts_on_the_nat_path() {
    connections_spread_over_both_hosts(ClusterConfig {
        steering: "nat".into(),
        ..Default::default()
    });
}

fn connections_spread_over_both_hosts(config: ClusterConfig) {
    let c = Cluster::new(config);
    two_by_two(&c);

    for h in &c.hosts {
        let listed = h.query("web").unwrap();
        assert_eq!(listed.len(), 4, "{}: {listed:?}", h.name);
        for l in &listed {
            let owner = c.host(l.container.chars().next().unwrap());
            assert_eq!(l.host, owner.name, "{l:?}");
            assert!(
                l.address.starts_with(&format!("{}:", owner.ip)),
                "local mode: host IP + published port: {l:?}"
            );
            assert_eq!(l.state, "live", "{l:?}");
        }
    }

    for h in &c.hosts {
        let r = h.load(web_vip(), 400, LOAD_TIME).wait();
        assert_eq!(r.total, 400);
        assert_no_failures(&h.name, &r, || c.dump("web"));
        assert_eq!(r.served.len(), 4, "from {}: {}", h.name, r.summary());
        for (name, n) in &r.served {
            // Round robin: 100 each; anything far off means the spread is broken.
            assert!(*n >= 60, "from {}: {name} got {n}: {}", h.name, r.summary());
        }
    }
}

/// Acceptance 2: host B's fluxd is SIGKILLed and its dockerd stopped while host A's clients
/// run: no client connection fails, and B's instances leave A's `fluxctl query` within the
/// host TTL.
#[test]
fn s2_dead_host_vanishes_within_ttl_without_client_failures() {
    let mut c = Cluster::new(ClusterConfig::default());
    two_by_two(&c);
    let ttl = c.host_ttl;
    let a_socket = c.host('a').fluxd.socket.clone();
    let load = c.host('a').load(web_vip(), LOAD_CONNS, LOAD_TIME);
    std::thread::sleep(Duration::from_secs(1));

    let killed = Instant::now();
    c.host_mut('b').fluxd.kill();
    // Watch A's view on a thread of its own while B's dockerd is being stopped.
    let watcher = std::thread::spawn(move || {
        let limit = Duration::from_secs(30);
        while killed.elapsed() < limit {
            if let Some(l) = cluster::query_socket(&a_socket, "web") {
                if l.iter().all(|i| i.host != "host-b") {
                    return Some(killed.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    });
    c.host_mut('b').stop_docker();
    eprintln!(
        "host-b's dockerd stopped {:?} after the SIGKILL",
        killed.elapsed()
    );
    let gone = watcher.join().unwrap();
    // Keep the clients going a little after B vanished: A alone serves.
    std::thread::sleep(Duration::from_secs(1));
    let r = load.finish();
    eprintln!("host-b gone from host-a's query after {gone:?} (host TTL {ttl:?})");
    assert!(
        gone.is_some_and(|g| g <= ttl),
        "host-b's instances still listed by host-a {:?} after SIGKILL, host TTL {ttl:?}{}",
        gone,
        c.dump("web")
    );
    assert_no_failures("host-a", &r, || c.dump("web"));
    assert!(
        c.wait_converged("web", &set(&["a-web1", "a-web2"]), Duration::from_secs(2))
            .is_some(),
        "host-a still routes to host-b{}",
        c.dump("web")
    );
    let after = c.host('a').load(web_vip(), 100, LOAD_TIME).wait();
    assert_no_failures("host-a", &after, || c.dump("web"));
    assert!(
        after.served.keys().all(|n| n.starts_with("a-")),
        "{after:?}"
    );
}

/// Acceptance 3: etcd stops for 20 s while clients run on both hosts. Routing goes on with no
/// failed connection; a container started on a host during the outage is routable from that
/// host at once, and (both ways: host A's from host B, host B's from host A) from the other
/// host within 5 s of etcd's return; afterwards every host lists and routes every instance
/// once, and etcd holds each record once. Each fluxd logs the outage, not a flood.
#[test]
fn s3_etcd_outage_keeps_routing_and_resyncs() {
    let mut c = Cluster::new(ClusterConfig::default());
    two_by_two(&c);
    let loads: Vec<Load> = c
        .hosts
        .iter()
        .map(|h| h.load(web_vip(), LOAD_CONNS, LOAD_TIME))
        .collect();
    std::thread::sleep(Duration::from_secs(1));

    c.etcd[0].stop();
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    // A new container on each host during the outage: routable on its own host at once.
    for h in &c.hosts {
        let name = format!("{}-new", h.letter);
        h.run_web(&name);
        let started = Instant::now();
        let local = h.first_served_by(web_vip(), &name, Duration::from_secs(5));
        eprintln!(
            "{name} routable from {} {local:?} after docker run returned (etcd down)",
            h.name
        );
        assert!(
            local.is_some_and(|t| t < Duration::from_secs(1)),
            "{name} not routable from {} at once while etcd is down: {local:?} after {:?}{}",
            h.name,
            started.elapsed(),
            c.dump("web")
        );
    }
    // The other host cannot know it yet: it only learns through etcd.
    let names = c.container_names();
    for (h, other) in [('a', "b-new"), ('b', "a-new")] {
        assert!(
            !c.host(h)
                .routed_names("web", &names)
                .unwrap_or_default()
                .contains(other),
            "host-{h} routes to {other} while etcd is down?"
        );
    }
    let rest = Duration::from_secs(20).saturating_sub(down.elapsed());
    std::thread::sleep(rest);

    c.etcd[0].restart();
    let back = Instant::now();
    eprintln!("etcd back after {:?} down", down.elapsed());
    let limit = Duration::from_secs(20);
    let b_sees_a = c.host('b').probe(back, web_vip(), "a-new", limit);
    let a_sees_b = c.host('a').probe(back, web_vip(), "b-new", limit);
    let (b_sees_a, a_sees_b) = (b_sees_a.join().unwrap(), a_sees_b.join().unwrap());
    let want = set(&["a-web1", "a-web2", "a-new", "b-web1", "b-web2", "b-new"]);
    let converged = c.wait_converged("web", &want, limit);
    let all = back.elapsed();
    eprintln!(
        "after etcd returned: a-new routable from host-b in {b_sees_a:?}, b-new from host-a in \
         {a_sees_b:?}; all hosts converged (query and routes) in {all:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let reports: Vec<LoadReport> = loads.into_iter().map(Load::finish).collect();
    for (h, r) in c.hosts.iter().zip(&reports) {
        assert_no_failures(&h.name, r, || c.dump("web"));
    }
    for (what, t) in [
        ("a-new from host-b", b_sees_a),
        ("b-new from host-a", a_sees_b),
    ] {
        assert!(
            t.is_some_and(|t| t <= Duration::from_secs(5)),
            "{what} routable {t:?} after etcd returned, want within 5 s{}",
            c.dump("web")
        );
    }
    assert!(
        converged.is_some(),
        "not converged on {want:?}{}",
        c.dump("web")
    );
    // Nothing lost or duplicated in etcd either.
    let keys = c.instance_keys("web");
    assert_eq!(keys.len(), 6, "{keys:?}");
    for h in &c.hosts {
        let log = h.fluxd.log();
        eprintln!("{} logged:\n{}", h.name, store_lines(&log));
        // Once per stream that broke (the watch, the session lease keep-alive).
        let warnings = log.matches("etcd failing").count();
        assert!(
            (1..=4).contains(&warnings),
            "{} logged the outage {warnings} times:\n{}",
            h.name,
            tail(&log, 60)
        );
    }
}

/// Acceptance 4: in a three-member etcd, stopping one member (the leader, then after it
/// rejoined, a follower) goes unnoticed: no failed client connection, every `fluxctl query`
/// answers promptly and complete, and a container started meanwhile on host B reaches host A
/// as usual.
#[test]
fn s4_losing_one_of_three_etcd_members_goes_unnoticed() {
    let mut c = Cluster::new(ClusterConfig {
        etcd_members: 3,
        ..Default::default()
    });
    let mut want = two_by_two(&c);
    let loads: Vec<Load> = c
        .hosts
        .iter()
        .map(|h| h.load(web_vip(), LOAD_CONNS, LOAD_TIME))
        .collect();
    for (round, pick) in ["leader", "follower"].iter().enumerate() {
        let victim = member_index(&c, *pick == "leader");
        eprintln!("stopping etcd member {} ({pick})", c.etcd[victim].name);
        c.etcd[victim].stop();
        let stopped = Instant::now();
        // fluxctl keeps answering, promptly and completely, on both hosts.
        let mut slowest = Duration::ZERO;
        while stopped.elapsed() < Duration::from_secs(6) {
            for h in &c.hosts {
                let t = Instant::now();
                let names = h.query_names("web");
                slowest = slowest.max(t.elapsed());
                assert_eq!(
                    names.as_ref(),
                    Some(&want),
                    "{}'s query {:?} after losing a member{}",
                    h.name,
                    stopped.elapsed(),
                    c.dump("web")
                );
            }
        }
        eprintln!("slowest fluxctl query without {pick}: {slowest:?}");
        assert!(
            slowest < Duration::from_secs(2),
            "fluxctl query took {slowest:?}"
        );
        // Changes still flow: a new container on B reaches A.
        let name = format!("b-more{round}");
        c.host('b').run_web(&name);
        want.insert(name.clone());
        let seen = c
            .host('a')
            .first_served_by(web_vip(), &name, Duration::from_secs(10));
        eprintln!("{name} routable from host-a in {seen:?} without the {pick}");
        assert!(
            seen.is_some_and(|t| t < Duration::from_secs(3)),
            "{name} not routable from host-a: {seen:?}{}",
            c.dump("web")
        );
        assert!(
            c.wait_converged("web", &want, Duration::from_secs(5))
                .is_some(),
            "not converged on {want:?}{}",
            c.dump("web")
        );
        c.etcd[victim].restart();
    }
    let reports: Vec<LoadReport> = loads.into_iter().map(Load::finish).collect();
    for (h, r) in c.hosts.iter().zip(&reports) {
        assert_no_failures(&h.name, r, || c.dump("web"));
        eprintln!("{} logged:\n{}", h.name, store_lines(&h.fluxd.log()));
    }
}

/// Warnings, errors and etcd messages from a fluxd log, without colours.
fn store_lines(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("etcd"))
        .map(|l| {
            let mut out = String::new();
            let mut esc = false;
            for ch in l.chars() {
                match (esc, ch) {
                    (false, '\u{1b}') => esc = true,
                    (true, 'm') => esc = false,
                    (true, _) => {}
                    (false, c) => out.push(c),
                }
            }
            out
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The index of the current leader (or of a follower) among running members.
fn member_index(c: &Cluster, leader: bool) -> usize {
    let endpoints = c
        .etcd
        .iter()
        .map(|m| m.endpoint.trim_start_matches("http://").to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = c.etcdctl(&[
        "--endpoints",
        &endpoints,
        "endpoint",
        "status",
        "-w",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("endpoint status");
    for s in v.as_array().unwrap() {
        let is_leader = s["Status"]["leader"] == s["Status"]["header"]["member_id"];
        if is_leader == leader {
            let ep = s["Endpoint"].as_str().unwrap();
            return c
                .etcd
                .iter()
                .position(|m| m.endpoint.ends_with(ep.trim_start_matches("http://")))
                .unwrap();
        }
    }
    panic!("no {} in {out}", if leader { "leader" } else { "follower" });
}

/// Acceptance 5, and watch compaction: host B is cut off the LAN for 30 s. Its instances leave
/// host A within the TTL and A's clients see no failure; meanwhile host A's containers change
/// and etcd compacts its history past what B has seen. After the link is restored B's
/// instances come back once each (no duplicates anywhere), and B, whose watch resumes from a
/// compacted revision, resyncs fully: it routes to A's new container and no longer to the
/// removed one.
#[test]
fn s5_partitioned_host_returns_without_duplicates() {
    let c = Cluster::new(ClusterConfig::default());
    two_by_two(&c);
    let ttl = c.host_ttl;
    let loads: Vec<Load> = c
        .hosts
        .iter()
        .map(|h| h.load(web_vip(), LOAD_CONNS, LOAD_TIME))
        .collect();
    std::thread::sleep(Duration::from_secs(1));

    c.host('b').set_link(false);
    let cut = Instant::now();
    let a_only = set(&["a-web1", "a-web2"]);
    let gone = cluster_wait(Duration::from_secs(20), || {
        c.host('a').query_names("web").as_ref() == Some(&a_only)
    });
    eprintln!("host-b gone from host-a's query {gone:?} after the cut (TTL {ttl:?})");
    // Changes host B misses: one container goes, one comes.
    let a = c.host('a');
    let web2 = a.docker().ok(&["ps", "-q", "--filter", "name=a-web2"]);
    a.docker().stop(&web2);
    a.run_web("a-web3");
    let a_new = set(&["a-web1", "a-web3"]);
    assert!(
        cluster_wait(Duration::from_secs(10), || {
            c.host('a').query_names("web").as_ref() == Some(&a_new)
        })
        .is_some(),
        "{}",
        c.dump("web")
    );
    let compacted = c.compact();
    eprintln!("etcd compacted at revision {compacted}");
    std::thread::sleep(Duration::from_secs(30).saturating_sub(cut.elapsed()));

    c.host('b').set_link(true);
    let healed = Instant::now();
    let want = set(&["a-web1", "a-web3", "b-web1", "b-web2"]);
    let converged = c.wait_converged("web", &want, Duration::from_secs(30));
    eprintln!("converged {converged:?} after the link came back");
    std::thread::sleep(Duration::from_secs(1));
    let reports: Vec<LoadReport> = loads.into_iter().map(Load::finish).collect();
    assert!(
        gone.is_some_and(|g| g <= ttl),
        "host-b's instances still listed by host-a {gone:?} after the cut, host TTL {ttl:?}{}",
        c.dump("web")
    );
    assert!(
        converged.is_some(),
        "not converged on {want:?} {:?} after the link came back{}",
        healed.elapsed(),
        c.dump("web")
    );
    let keys = c.instance_keys("web");
    assert_eq!(keys.len(), 4, "instance records in etcd: {keys:?}");
    let b_log = c.host('b').fluxd.log();
    eprintln!(
        "host-b relisted after compaction: {}",
        b_log.contains("compacted; relisting")
    );
    for (h, r) in c.hosts.iter().zip(&reports) {
        let failures = r.failures_except_in_flight_at(&[cut]);
        assert!(
            failures.is_empty() && r.total > 0,
            "clients on {}: {} failures not in flight at the cut: {}{}",
            h.name,
            failures.len(),
            r.summary(),
            c.dump("web")
        );
        eprintln!("clients on {}: {}", h.name, r.summary());
    }
}

fn cluster_wait(limit: Duration, check: impl FnMut() -> bool) -> Option<Duration> {
    support::fluxd::wait_until(limit, check)
}

/// Acceptance 6, on three hosts: each host's fluxd restarts in turn (SIGTERM, start) while
/// clients on the other hosts run: none of their connections fails, and every host ends up
/// listing and routing to every host's instances, once each.
#[test]
fn s6_rolling_fluxd_restarts_under_load() {
    let mut c = Cluster::new(ClusterConfig {
        hosts: 3,
        ..Default::default()
    });
    c.add_web_service();
    let mut want = BTreeSet::new();
    for h in &c.hosts {
        let name = format!("{}-web1", h.letter);
        h.run_web(&name);
        want.insert(name);
    }
    assert!(
        c.wait_converged("web", &want, Duration::from_secs(15))
            .is_some(),
        "{}",
        c.dump("web")
    );
    for restarting in ['a', 'b', 'c'] {
        // Two client loops on each other host.
        let loads: Vec<(String, Load)> = c
            .hosts
            .iter()
            .filter(|h| h.letter != restarting)
            .flat_map(|h| {
                (0..2).map(|_| (h.name.clone(), h.load(web_vip(), LOAD_CONNS, LOAD_TIME)))
            })
            .collect();
        std::thread::sleep(Duration::from_secs(1));
        let t = Instant::now();
        c.host_mut(restarting).restart_fluxd();
        let restarted = t.elapsed();
        let converged = c.wait_converged("web", &want, Duration::from_secs(15));
        eprintln!(
            "host-{restarting}: fluxd restarted in {restarted:?}, cluster converged {converged:?} later"
        );
        std::thread::sleep(Duration::from_secs(2));
        for (name, load) in loads {
            let r = load.finish();
            assert_no_failures(&name, &r, || c.dump("web"));
        }
        assert!(converged.is_some(), "{}", c.dump("web"));
    }
    assert_eq!(c.instance_keys("web").len(), 3);
}

/// Issue 7, the cluster view: each fluxd charts the connections its own clients made; the UI
/// on host A, asked for every host's view, gathers host B's series from B's advertised HTTP
/// API and shows both as separate lines, and names a host that does not answer.
#[test]
fn s7_ui_gathers_every_hosts_series() {
    let mut c = Cluster::new(ClusterConfig::default());
    two_by_two(&c);
    for h in &c.hosts {
        let r = h.load(web_vip(), 300, LOAD_TIME).wait();
        assert_no_failures(&h.name, &r, || c.dump("web"));
    }
    let a = c.host('a');
    let a_http = std::net::SocketAddr::from((a.ip, HTTP_PORT));
    let path = "/v1/series?service=web&group=host&scope=cluster";
    // Each host samples its series every 2 s; wait until both hosts' latest samples show.
    let mut view = serde_json::Value::Null;
    let filled = cluster_wait(Duration::from_secs(10), || {
        let Ok((200, body)) = http_get(&a.ns, a_http, path) else {
            return false;
        };
        view = serde_json::from_str(&body).unwrap_or_default();
        let from: BTreeSet<&str> = view["series"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| {
                l["connections_per_s"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|x| x.as_f64() > Some(0.0)))
            })
            .filter_map(|l| l["from_host"].as_str())
            .collect();
        from == BTreeSet::from(["host-a", "host-b"])
    });
    assert!(filled.is_some(), "cluster view: {view:#}");
    let keys: BTreeSet<&str> = view["series"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["key"].as_str())
        .collect();
    // Grouped by the instance's host, as seen from each client host: 2 x 2 lines.
    assert_eq!(
        keys,
        BTreeSet::from([
            "host-a · host-a",
            "host-a · host-b",
            "host-b · host-a",
            "host-b · host-b"
        ]),
        "{view:#}"
    );

    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("ui-test");
    std::fs::create_dir_all(&out).unwrap();
    let page = browser::load(
        &a.ns,
        &browser::Load::new(format!(
            "http://{a_http}/#/service/web?group=host&scope=cluster"
        ))
        .budget(6_000)
        .screenshot(out.join("web-cluster.png")),
    );
    std::fs::write(out.join("web-cluster.html"), &page.dom.0).unwrap();
    let legend: BTreeSet<String> = page
        .dom
        .with_attr("li", "data-series-key")
        .iter()
        .filter_map(|e| e.attr("data-series-key").map(str::to_string))
        .collect();
    assert_eq!(legend.len(), 4, "legend {legend:?}");
    assert!(
        legend.iter().any(|k| k.starts_with("host-b · ")),
        "{legend:?}"
    );
    let ok: Vec<(String, String)> = page
        .dom
        .with_attr("span", "data-host")
        .iter()
        .map(|e| {
            (
                e.attr("data-host").unwrap_or("").to_string(),
                e.attr("data-ok").unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        ok,
        [
            ("host-a".into(), "true".into()),
            ("host-b".into(), "true".into())
        ]
    );

    // Host B's fluxd gone (its host record outlives it for the TTL): named, not waited for.
    c.host_mut('b').fluxd.kill();
    let a = c.host('a');
    let (status, body) = http_get(&a.ns, a_http, path).unwrap();
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    let b = view["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "host-b")
        .cloned();
    if let Some(b) = b {
        assert_eq!(b["ok"], false, "{view:#}");
    }
    assert!(view["series"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["from_host"] == "host-a"));
}

/// Figures for BENCHMARKS.md (run by `integration/run --bench`): time from `docker start` on
/// host B to the first connection from host A served by that container (median of 10), and
/// time for each fluxd to converge after etcd returns from a 20 s outage (10 outages).
#[test]
#[ignore = "benchmark: integration/run --bench"]
fn bench_cluster_figures() {
    let mut c = Cluster::new(ClusterConfig::default());
    // A service of its own, with one container on B: a connection succeeds only through it.
    let a = &c.host('a').fluxd;
    a.ok(&[
        "service",
        "add",
        "probe",
        "--address",
        "198.18.0.20:80",
        "--instance-port",
        "8080",
    ]);
    a.ok(&["select", "probe", "all", "--labels", "probe=1"]);
    let vip: std::net::SocketAddrV4 = "198.18.0.20:80".parse().unwrap();
    let b = c.host('b');
    let id =
        b.docker()
            .run_name_server(cluster::IMAGE, "b-probe", &["-p", "8080", "-l", "probe=1"]);
    assert!(c
        .wait_converged("probe", &set(&["b-probe"]), Duration::from_secs(10))
        .is_some());
    let mut samples = Vec::new();
    let mut cli = Vec::new();
    for _ in 0..10 {
        b.docker().stop(&id);
        assert!(c
            .wait_converged("probe", &BTreeSet::new(), Duration::from_secs(10))
            .is_some());
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let probe = c.host('a').ns.spawn(move || {
            while t.elapsed() < Duration::from_secs(10) {
                if support::backend::who_serves(vip).is_ok_and(|n| n == "b-probe") {
                    return Some(t.elapsed());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            None
        });
        b.docker().start(&id);
        cli.push(t.elapsed());
        let took = probe.join().unwrap().expect("b-probe never served host-a");
        samples.push(took);
    }
    samples.sort();
    eprintln!(
        "BENCH docker start on host-b -> first connection from host-a: median {:?} (min {:?}, max {:?}; the `docker start` command itself: median {:?}) samples {samples:?}",
        median(&samples),
        samples[0],
        samples[samples.len() - 1],
        median(&cli)
    );

    // Convergence after etcd returns: during each outage a container starts on each host; a
    // fluxd has converged once its data plane routes to the other host's new container (and
    // its own is back in etcd).
    let mut conv: Vec<Duration> = Vec::new();
    let mut written: Vec<Duration> = Vec::new();
    c.add_web_service();
    for round in 0..10 {
        c.etcd[0].stop();
        std::thread::sleep(Duration::from_secs(2));
        for h in &c.hosts {
            h.run_web(&format!("{}-out{round}", h.letter));
        }
        std::thread::sleep(Duration::from_secs(18));
        c.etcd[0].restart();
        let back = Instant::now();
        let names = c.container_names();
        // (host, the other host's new container): when it routes to it.
        let mut pending: Vec<(char, String)> = vec![
            ('a', format!("b-out{round}")),
            ('b', format!("a-out{round}")),
        ];
        let mut in_etcd: Vec<String> = vec![format!("a-out{round}"), format!("b-out{round}")];
        while back.elapsed() < Duration::from_secs(30)
            && !(pending.is_empty() && in_etcd.is_empty())
        {
            pending.retain(|(h, other)| {
                let done = c
                    .host(*h)
                    .routed_names("web", &names)
                    .is_some_and(|r| r.contains(other));
                if done {
                    conv.push(back.elapsed());
                }
                !done
            });
            let keys = c.instance_keys("web");
            in_etcd.retain(|name| {
                let done = keys
                    .iter()
                    .any(|k| names.get(k.rsplit('/').next().unwrap()) == Some(name));
                if done {
                    written.push(back.elapsed());
                }
                !done
            });
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            pending.is_empty(),
            "round {round}: not converged: {pending:?}{}",
            c.dump("web")
        );
        assert!(
            in_etcd.is_empty(),
            "round {round}: never written: {in_etcd:?}"
        );
    }
    conv.sort();
    written.sort();
    eprintln!(
        "BENCH after a 20 s etcd outage: a fluxd routes to the other host's new instance after \
         median {:?} (min {:?}, max {:?}; {} samples {conv:?}); its own new instance is back in \
         etcd after median {:?} (max {:?})",
        median(&conv),
        conv[0],
        conv[conv.len() - 1],
        conv.len(),
        median(&written),
        written[written.len() - 1]
    );
}
