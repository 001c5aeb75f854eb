//! Issue 4 acceptance: containers become instances, end to end on one host. A real dockerd and
//! fluxd run inside a namespace the test creates; containers serve their own name.

mod support;

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::backend::who_serves;
use support::docker::{Dockerd, NAME_PORT};
use support::fluxd::{wait_until, Fluxd};
use support::netns::Netns;

const VIP: &str = "198.18.0.10:80";

fn vip() -> SocketAddrV4 {
    VIP.parse().unwrap()
}

/// Namespace, Docker and fluxd (data plane on, this Docker, the bridge address as host IP so
/// that published ports are reached the way other hosts reach them). Drop order: fluxd, then
/// Docker, then the namespace.
struct Host {
    fluxd: Fluxd,
    docker: Dockerd,
    ns: Netns,
}

fn host(tag: &str) -> Host {
    let ns = Netns::new(tag);
    let docker = Dockerd::new(&ns);
    for image in ["webimg:latest", "webimg:v1", "webimg:v2", "otherimg:latest"] {
        docker.import_image(image);
    }
    let fluxd = start_fluxd(&ns, &docker);
    Host { fluxd, docker, ns }
}

fn start_fluxd(ns: &Netns, docker: &Dockerd) -> Fluxd {
    let endpoint = docker.endpoint();
    let ip = docker.bridge_ip.to_string();
    Fluxd::dataplane(&ns.name, &["--docker", &endpoint, "--host-ip", &ip])
}

/// Instance names (short container ids) of a service, from `fluxctl query`.
fn instances(f: &Fluxd, service: &str) -> Vec<String> {
    let mut v: Vec<String> = f
        .ok(&["query", "--service", service, "--quiet"])
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Service `web` at the VIP, port 8080 of every `webimg` container.
fn add_web_selecting_webimg(h: &Host) {
    h.fluxd.ok(&[
        "service",
        "add",
        "web",
        "--address",
        VIP,
        "--instance-port",
        "8080",
    ]);
    h.fluxd.ok(&["select", "web", "all", "--image", "webimg"]);
}

fn short(id: &str) -> String {
    id[..12].to_string()
}

/// Connects `n` times from the namespace and counts which container answered.
fn spread(h: &Host, addr: SocketAddrV4, n: usize) -> HashMap<String, usize> {
    h.ns.run(move || {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..n {
            let name = who_serves(addr).unwrap_or_else(|e| format!("error: {e}"));
            *counts.entry(name).or_default() += 1;
        }
        counts
    })
}

fn wait_instances(f: &Fluxd, service: &str, want: &[String]) -> Option<Duration> {
    let mut want = want.to_vec();
    want.sort();
    wait_until(Duration::from_secs(10), || instances(f, service) == want)
}

#[test]
fn image_selection_host_and_container_clients() {
    let h = host("ag-img");
    // Started before the rule exists: `select` must enrol running containers at once.
    let web: Vec<String> = (0..3)
        .map(|i| {
            h.docker
                .run_name_server("webimg", &format!("web{i}"), &["-p", "8080"])
        })
        .collect();
    let other = h
        .docker
        .run_name_server("otherimg", "other", &["-p", "8080"]);
    h.fluxd.ok(&[
        "service",
        "add",
        "web",
        "--address",
        VIP,
        "--instance-port",
        &NAME_PORT.to_string(),
    ]);
    h.fluxd.ok(&["select", "web", "all", "--image", "webimg"]);
    let mut want: Vec<String> = web.iter().map(|id| short(id)).collect();
    want.sort();
    assert!(
        wait_instances(&h.fluxd, "web", &want).is_some(),
        "instances {:?}, want {want:?}: {}",
        instances(&h.fluxd, "web"),
        h.fluxd.log()
    );
    let q = h.fluxd.json(&["query", "--service", "web"]);
    for i in q.as_array().unwrap() {
        assert_eq!(i["container"]["image"], "docker.io/library/webimg", "{i}");
        assert_eq!(i["container"]["tag"], "latest");
        assert_eq!(i["state"], "live");
        let addr: SocketAddrV4 = i["address"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            *addr.ip(),
            h.docker.bridge_ip,
            "local mode publishes the host IP"
        );
    }

    // Filters take what users type, as in flux 0.2: a short image name (stored canonical),
    // an image with its tag, the host's IP for its name, `-s`, `-q`, Go template fields.
    let sorted = |out: String| {
        let mut v: Vec<String> = out.lines().map(str::to_string).collect();
        v.sort();
        v
    };
    let q = |args: &[&str]| sorted(h.fluxd.ok(args));
    assert_eq!(q(&["query", "-s", "web", "--image", "webimg", "-q"]), want);
    assert_eq!(
        q(&["query", "--image", "library/webimg:latest", "-q"]),
        want
    );
    assert!(q(&["query", "--image", "webimg:v9", "-q"]).is_empty());
    let bridge_ip = h.docker.bridge_ip.to_string();
    assert_eq!(q(&["query", "--host", &bridge_ip, "-q"]), want);
    assert_eq!(q(&["query", "--host", "h1", "-q"]), want);
    assert!(q(&["query", "--host", "198.19.99.99", "-q"]).is_empty());
    let templated = q(&["query", "-s", "web", "--format", "{{.Name}} {{.Image}}"]);
    let expect: Vec<String> = want
        .iter()
        .map(|n| format!("{n} docker.io/library/webimg"))
        .collect();
    assert_eq!(templated, expect);
    let clash = h
        .fluxd
        .ctl(&["query", "--image", "webimg:v1", "--tag", "v2"]);
    assert_eq!(clash.status.code(), Some(2));
    let err = String::from_utf8_lossy(&clash.stderr);
    assert!(err.contains("tag") && err.lines().count() == 1, "{err}");

    // From a host process: all three serve, the other image never does.
    let counts = spread(&h, vip(), 150);
    for i in 0..3 {
        assert!(
            counts.get(&format!("web{i}")).copied().unwrap_or(0) > 20,
            "{counts:?}"
        );
    }
    assert_eq!(counts.values().sum::<usize>(), 150, "{counts:?}");
    assert!(!counts.contains_key("other"), "{counts:?}");

    // From another container on the bridge (the PREROUTING path).
    let out = h.docker.ok(&[
        "run",
        "--rm",
        "otherimg",
        "sh",
        "-c",
        "for i in $(seq 30); do nc 198.18.0.10 80 </dev/null; done; true",
    ]);
    let names: Vec<&str> = out.lines().collect();
    assert_eq!(names.len(), 30, "{out}");
    assert!(names.iter().all(|n| n.starts_with("web")), "{out}");

    // deselect removes at once; select brings them back at once.
    h.fluxd.ok(&["deselect", "web", "all"]);
    let gone = wait_until(Duration::from_secs(1), || {
        instances(&h.fluxd, "web").is_empty()
    });
    assert!(gone.is_some(), "deselect: {:?}", instances(&h.fluxd, "web"));
    h.fluxd.ok(&["select", "web", "all", "--image", "webimg"]);
    let back = wait_until(Duration::from_secs(1), || {
        instances(&h.fluxd, "web") == want
    });
    assert!(back.is_some(), "select: {:?}", instances(&h.fluxd, "web"));
    drop(other);
}

#[test]
fn tag_selection_routes_each_version_to_its_containers() {
    let h = host("ag-tag");
    let v1 = h.docker.run_name_server("webimg:v1", "v1", &["-p", "8080"]);
    let v2 = h.docker.run_name_server("webimg:v2", "v2", &["-p", "8080"]);
    for (svc, vip, tag) in [
        ("web1", "198.18.0.11:80", "v1"),
        ("web2", "198.18.0.12:80", "v2"),
    ] {
        h.fluxd.ok(&[
            "service",
            "add",
            svc,
            "--address",
            vip,
            "--instance-port",
            "8080",
        ]);
        h.fluxd
            .ok(&["select", svc, tag, "--image", "webimg", "--tag", tag]);
    }
    assert!(wait_instances(&h.fluxd, "web1", &[short(&v1)]).is_some());
    assert!(wait_instances(&h.fluxd, "web2", &[short(&v2)]).is_some());
    let c1 = spread(&h, "198.18.0.11:80".parse().unwrap(), 20);
    let c2 = spread(&h, "198.18.0.12:80".parse().unwrap(), 20);
    assert_eq!(c1.get("v1"), Some(&20), "{c1:?}");
    assert_eq!(c2.get("v2"), Some(&20), "{c2:?}");
}

#[test]
fn stop_start_and_restarts_keep_instances_in_step() {
    let mut h = host("ag-life");
    add_web_selecting_webimg(&h);
    let a = h.docker.run_name_server("webimg", "ca", &["-p", "8080"]);
    let b = h.docker.run_name_server("webimg", "cb", &["-p", "8080"]);
    // A container with a huge label and malformed env must not stop others being enrolled.
    let huge = format!("big={}", "x".repeat(20_000));
    let odd = h.docker.run_name_server(
        "webimg",
        "odd",
        &[
            "-p",
            "8080",
            "-l",
            &huge,
            "-l",
            "a,b=c",
            "-l",
            "ctl=\u{7}",
            "-e",
            "NOEQUALS",
            "-e",
            "K=\u{7}",
        ],
    );
    let all = [short(&a), short(&b), short(&odd)];
    assert!(
        wait_instances(&h.fluxd, "web", &all).is_some(),
        "{:?}: {}",
        instances(&h.fluxd, "web"),
        h.fluxd.log()
    );

    // docker stop under a bounded client loop: no failed connection, gone within 1 s.
    let running = Arc::new(AtomicBool::new(true));
    let flag = running.clone();
    let client = h.ns.spawn(move || {
        let mut failures = Vec::new();
        let mut n = 0;
        while flag.load(Ordering::Relaxed) && n < 5000 {
            if let Err(e) = who_serves(vip()) {
                failures.push(format!("connection {n}: {e}"));
            }
            n += 1;
        }
        (n, failures)
    });
    std::thread::sleep(Duration::from_millis(300));
    h.docker.stop(&b);
    let stopped = Instant::now();
    let gone = wait_until(Duration::from_secs(1), || {
        !instances(&h.fluxd, "web").contains(&short(&b))
    });
    std::thread::sleep(Duration::from_millis(300));
    running.store(false, Ordering::Relaxed);
    let (n, failures) = client.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {n} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(
        gone.is_some(),
        "cb still listed {:?} after docker stop returned",
        stopped.elapsed()
    );

    // docker start: routable within 1 s of the command returning.
    h.docker.start(&b);
    let started = Instant::now();
    let routable = h.ns.run(|| {
        wait_until(Duration::from_secs(3), || {
            (0..6).any(|_| who_serves(vip()).is_ok_and(|n| n == "cb"))
        })
    });
    let took = started.elapsed();
    assert!(
        routable.is_some() && took < Duration::from_secs(1),
        "cb routable after {took:?}"
    );
    eprintln!("docker start to routed: {took:?}");

    // fluxd SIGKILL and start: the same instances, no duplicates, no stale ones.
    h.fluxd.kill();
    h.docker.stop(&odd);
    h.fluxd.start();
    let want = [short(&a), short(&b)];
    assert!(
        wait_instances(&h.fluxd, "web", &want).is_some(),
        "after fluxd restart: {:?}",
        instances(&h.fluxd, "web")
    );

    // Containers started before fluxd are enrolled when it starts (covered above), and
    // Docker restarting: afterwards instances match the running containers.
    h.docker.kill_daemon();
    h.docker.restart();
    let running_ids: Vec<String> = h
        .docker
        .ok(&["ps", "-q", "--no-trunc"])
        .lines()
        .map(short)
        .collect();
    assert!(
        wait_until(Duration::from_secs(15), || {
            let mut r = running_ids.clone();
            r.sort();
            instances(&h.fluxd, "web") == r
        })
        .is_some(),
        "after dockerd restart: {:?}, running {running_ids:?}",
        instances(&h.fluxd, "web")
    );
}

#[test]
fn container_without_published_port_is_listed_as_no_address() {
    let h = host("ag-noaddr");
    add_web_selecting_webimg(&h);
    let id = h.docker.run_name_server("webimg", "hidden", &[]);
    let listed = wait_until(Duration::from_secs(5), || {
        h.fluxd
            .ok(&[
                "query",
                "--service",
                "web",
                "--state",
                "no-address",
                "--quiet",
            ])
            .contains(&short(&id))
    });
    assert!(listed.is_some(), "{}", h.fluxd.ok(&["query"]));
    // And says why.
    let q = h.fluxd.json(&["query", "--service", "web"]);
    assert_eq!(
        q[0]["container"]["address_note"], "port 8080/tcp is not published",
        "{q}"
    );
    // It gets no traffic: the VIP has no live instance, so the client is reset.
    assert!(h.ns.run(|| who_serves(vip()).is_err()));
}

#[test]
fn global_mode_uses_container_ips_and_one_container_serves_two_services() {
    let ns = Netns::new("ag-global");
    let docker = Dockerd::new(&ns);
    docker.import_image("webimg:latest");
    let endpoint = docker.endpoint();
    let ip = docker.bridge_ip.to_string();
    let fluxd = Fluxd::dataplane(
        &ns.name,
        &[
            "--docker",
            &endpoint,
            "--host-ip",
            &ip,
            "--network-mode",
            "global",
        ],
    );
    // No published port: only the container IP reaches it.
    let id = docker.run_name_server("webimg", "solo", &["-l", "team=a"]);
    let cip = docker.container_ip(&id).unwrap();
    for (svc, vip) in [("one", "198.18.0.21:80"), ("two", "198.18.0.22:80")] {
        fluxd.ok(&[
            "service",
            "add",
            svc,
            "--address",
            vip,
            "--instance-port",
            "8080",
        ]);
    }
    fluxd.ok(&["select", "one", "by-image", "--image", "webimg"]);
    fluxd.ok(&["select", "two", "by-label", "--labels", "team=a"]);
    for svc in ["one", "two"] {
        assert!(
            wait_instances(&fluxd, svc, &[short(&id)]).is_some(),
            "{svc}"
        );
        let q = fluxd.json(&["query", "--service", svc]);
        assert_eq!(q[0]["address"], format!("{cip}:8080"), "{q}");
    }
    for vip in ["198.18.0.21:80", "198.18.0.22:80"] {
        let addr: SocketAddrV4 = vip.parse().unwrap();
        let who = ns.run(move || who_serves(addr));
        assert_eq!(who.unwrap(), "solo", "{vip}");
    }
    drop(fluxd);
    drop(docker);
}

#[test]
fn a_container_that_ignores_its_stop_signal_comes_back_after_the_grace() {
    let h = host("ag-grace");
    add_web_selecting_webimg(&h);
    // Without `--init`: busybox as PID 1 has no TERM handler, so it ignores SIGTERM.
    let port = support::docker::NAME_PORT.to_string();
    let c = h.docker.run(&[
        "--name",
        "stubborn",
        "-p",
        "8080",
        "webimg",
        "nc",
        "-ll",
        "-p",
        &port,
        "-e",
        "sh",
        "-c",
        "echo stubborn; exec cat",
    ]);
    let listed = [short(&c)];
    assert!(
        wait_instances(&h.fluxd, "web", &listed).is_some(),
        "{}",
        h.fluxd.log()
    );
    let sent = Instant::now();
    h.docker.ok(&["kill", "--signal", "TERM", &c]);
    assert!(
        wait_instances(&h.fluxd, "web", &[]).is_some(),
        "still listed after its stop signal: {}",
        h.fluxd.log()
    );
    assert_eq!(h.docker.inspect(&c)["State"]["Running"], true);
    // Back after the 15 s grace, by itself: no Docker event comes, and the 30 s resync is
    // further away than this wait allows.
    let back = wait_until(Duration::from_secs(25), || {
        instances(&h.fluxd, "web") == listed
    });
    assert!(back.is_some(), "never came back: {}", h.fluxd.log());
    let after = sent.elapsed();
    assert!(
        after >= Duration::from_secs(14) && after < Duration::from_secs(20),
        "came back {after:?} after the signal"
    );
    // Listed (the store's view) and routed (the proxy's table) are one controller turn apart;
    // on a loaded machine the first connection can come in between.
    let routed = h.ns.run(|| {
        wait_until(Duration::from_secs(5), || {
            who_serves(vip()).is_ok_and(|n| n == "stubborn")
        })
    });
    assert!(
        routed.is_some(),
        "listed but never served: {}",
        h.fluxd.log()
    );
    let served = spread(&h, vip(), 3);
    assert_eq!(served.get("stubborn"), Some(&3), "{served:?}");
}
