//! Issue 8 acceptance for `fluxd edge`, with Debian's nginx run as root inside a network
//! namespace the test creates (its own prefix, pid file and logs in a temporary directory):
//! requests to nginx reach the current instances of a service, adding and stopping instances
//! during a request loop fails no request, a broken template or configuration leaves the last
//! good one serving, and a service with no live instance answers the 503 page.
//!
//! The instances are static ones (`fluxctl instance add`) served by the test's own HTTP
//! backends: what `fluxd edge` sees of a container is the same instance record, and a killed
//! backend behaves as a container that died (connections refused, open ones cut).

mod support;

use std::net::SocketAddrV4;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::docker::Dockerd;
use support::fluxd::{wait_until, Fluxd};
use support::http_backend::{Client, HttpBackend, Message};
use support::netns::Netns;
use support::nginx::{Edge, Nginx};

const WEB: &str = "127.0.0.1:8080";
const IDLE: &str = "127.0.0.1:8081";

/// One request on a fresh connection to nginx inside `ns`.
fn get(ns: &Netns, addr: &str) -> std::io::Result<Message> {
    let addr: SocketAddrV4 = addr.parse().unwrap();
    ns.run(move || Client::connect(addr)?.get("example.com"))
}

fn body(m: &Message) -> String {
    String::from_utf8_lossy(&m.body).into_owned()
}

fn add(fluxd: &Fluxd, service: &str, b: &HttpBackend) {
    fluxd.ok(&[
        "instance",
        "add",
        service,
        &b.name,
        "--address",
        &b.addr.to_string(),
    ]);
}

fn service(fluxd: &Fluxd, name: &str, vip: &str) {
    fluxd.ok(&[
        "service",
        "add",
        name,
        "--address",
        vip,
        "--protocol",
        "http",
    ]);
}

/// Waits until nginx answers `addr` with `status` (and `body_has` in the body).
fn wait_answer(ns: &Netns, addr: &str, status: u16, body_has: &str, edge: &Edge, nginx: &Nginx) {
    let ok = wait_until(Duration::from_secs(15), || {
        get(ns, addr).is_ok_and(|m| m.status() == status && body(&m).contains(body_has))
    });
    assert!(
        ok.is_some(),
        "nginx never answered {status} with {body_has:?} on {addr}: last {:?}\nedge log:\n{}\nnginx:\n{}",
        get(ns, addr).map(|m| (m.status(), body(&m))),
        edge.log(),
        nginx.error_log()
    );
}

/// Requests through nginx until `stop`, `limit` or 20,000 requests, one per fresh connection:
/// who answered each 200 (by `who`) and when; every other answer or error is a failure.
type Loop = std::thread::JoinHandle<(Vec<(Instant, String)>, Vec<String>)>;
fn request_loop(
    ns: &Netns,
    addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    limit: Duration,
    pause: Duration,
    who: fn(&Message) -> String,
) -> Loop {
    ns.spawn(move || {
        let start = Instant::now();
        let mut seen: Vec<(Instant, String)> = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        while !stop.load(Ordering::SeqCst)
            && start.elapsed() < limit
            && seen.len() + failures.len() < 20_000
        {
            match Client::connect(addr).and_then(|mut c| c.get("example.com")) {
                Ok(m) if m.status() == 200 => seen.push((Instant::now(), who(&m))),
                Ok(m) => failures.push(format!("{} {}", m.status(), body(&m).trim())),
                Err(e) => failures.push(e.to_string()),
            }
            std::thread::sleep(pause);
        }
        (seen, failures)
    })
}

/// Prints how often each name answered and fails on any failed request; the count by name.
fn tally(
    seen: &[(Instant, String)],
    failures: &[String],
    names: &[&str],
    nginx: &Nginx,
) -> std::collections::BTreeMap<String, usize> {
    let counts: std::collections::BTreeMap<String, usize> = names
        .iter()
        .map(|n| (n.to_string(), seen.iter().filter(|(_, b)| b == n).count()))
        .collect();
    eprintln!(
        "{} requests: {counts:?}, {} failed",
        seen.len() + failures.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failed requests, first: {:?}\nnginx:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        nginx.error_log()
    );
    counts
}

#[test]
fn requests_follow_instances_without_failures() {
    let ns = Netns::new("edge");
    let mut b1 = HttpBackend::start(&ns, "b1", 9001, 200);
    let mut b2 = HttpBackend::start(&ns, "b2", 9002, 200);
    let fluxd = Fluxd::dataplane(&ns.name, &[]);
    service(&fluxd, "web", "198.18.0.10:80");
    service(&fluxd, "idle", "198.18.0.11:80");
    add(&fluxd, "web", &b1);
    add(&fluxd, "web", &b2);
    let nginx = Nginx::start(&ns);
    let mut edge = Edge::start(
        &fluxd.socket,
        &nginx,
        &[
            "--service",
            &format!("web={WEB}"),
            "--service",
            &format!("idle={IDLE}"),
        ],
    );
    wait_answer(&ns, WEB, 200, "b", &edge, &nginx);

    // A service with no instance: the built-in 503 page, not an nginx error.
    let m = get(&ns, IDLE).unwrap();
    assert_eq!(m.status(), 503, "{}", body(&m));
    assert!(body(&m).contains("Service unavailable"), "{}", body(&m));
    assert_eq!(m.header("retry-after"), "5");

    // The request loop: one request per fresh connection, bounded by a stop flag, 30 s and
    // 20,000 requests; every answer other than 200 from a backend counts as a failure.
    let stop = Arc::new(AtomicBool::new(false));
    let addr: SocketAddrV4 = WEB.parse().unwrap();
    let looper = request_loop(
        &ns,
        addr,
        stop.clone(),
        Duration::from_secs(30),
        Duration::from_millis(2),
        |m| m.header("x-backend").to_string(),
    );
    std::thread::sleep(Duration::from_millis(500));

    // A third instance joins.
    let b3 = HttpBackend::start(&ns, "b3", 9003, 200);
    add(&fluxd, "web", &b3);
    let reached = wait_until(Duration::from_secs(10), || {
        b3.requests.load(Ordering::Relaxed) > 0
    });
    assert!(reached.is_some(), "b3 never got traffic: {}", edge.log());
    std::thread::sleep(Duration::from_millis(300));

    // b1 is removed (as a container stopped with `docker stop`), then its process goes.
    fluxd.ok(&["instance", "rm", "web", "b1"]);
    let dropped = wait_until(Duration::from_secs(10), || {
        !std::fs::read_to_string(nginx.include())
            .unwrap()
            .contains(":9001")
    });
    assert!(dropped.is_some(), "b1 never left nginx: {}", edge.log());
    std::thread::sleep(Duration::from_millis(300));
    b1.kill();
    std::thread::sleep(Duration::from_millis(300));

    // b2 dies without anyone removing it (a crashed container): nginx must try another.
    b2.kill();
    let b2_dead = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    let (seen, failures) = looper.join().unwrap();

    let counts = tally(&seen, &failures, &["b1", "b2", "b3"], &nginx);
    let count = |name: &str| counts[name];
    assert!(seen.len() >= 200, "only {} requests", seen.len());
    assert!(count("b3") > 0 && count("b1") > 0 && count("b2") > 0);
    let after: Vec<_> = seen.iter().filter(|(t, _)| *t > b2_dead).collect();
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|(_, b)| b == "b3"),
        "answers after b2 died: {after:?}"
    );
    edge.stop();
    assert!(
        edge.log().contains("nginx configuration updated"),
        "{}",
        edge.log()
    );
}

#[test]
fn broken_template_keeps_the_last_good_configuration() {
    let ns = Netns::new("edge");
    let b1 = HttpBackend::start(&ns, "b1", 9001, 200);
    let b2 = HttpBackend::start(&ns, "b2", 9002, 200);
    let fluxd = Fluxd::dataplane(&ns.name, &[]);
    service(&fluxd, "web", "198.18.0.10:80");
    add(&fluxd, "web", &b1);
    let nginx = Nginx::start(&ns);
    let tmp = tempfile::tempdir().unwrap();
    let template = tmp.path().join("flux.conf.tmpl");
    let good = "# operator's template\n{{upstreams}}\n{{servers}}\n";
    std::fs::write(&template, good).unwrap();
    let edge = Edge::start(
        &fluxd.socket,
        &nginx,
        &[
            "--service",
            &format!("web={WEB}"),
            "--template",
            template.to_str().unwrap(),
        ],
    );
    wait_answer(&ns, WEB, 200, "b1", &edge, &nginx);
    let include = nginx.include();
    let last_good = std::fs::read_to_string(&include).unwrap();
    assert!(
        last_good.starts_with("# operator's template\n"),
        "{last_good}"
    );

    // nginx refuses what the template now gives: the file stays as it was, nginx serves.
    std::fs::write(
        &template,
        "{{upstreams}}\nnot_a_directive on;\n{{servers}}\n",
    )
    .unwrap();
    let logged = wait_until(Duration::from_secs(10), || {
        edge.log().contains("nginx rejected the new configuration")
    });
    assert!(logged.is_some(), "{}", edge.log());
    assert!(
        edge.log().contains("unknown directive \"not_a_directive\""),
        "{}",
        edge.log()
    );
    assert_eq!(std::fs::read_to_string(&include).unwrap(), last_good);
    assert_eq!(get(&ns, WEB).unwrap().status(), 200);

    // A change of instances meanwhile is refused the same way: still the last good file.
    add(&fluxd, "web", &b2);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(std::fs::read_to_string(&include).unwrap(), last_good);
    assert_eq!(body(&get(&ns, WEB).unwrap()), "b1\n");

    // A template flux itself cannot fill never reaches nginx.
    std::fs::write(&template, "{{upstreams}}\n{{bogus}}\n").unwrap();
    let logged = wait_until(Duration::from_secs(10), || {
        edge.log().contains("unknown placeholder {{bogus}}")
    });
    assert!(logged.is_some(), "{}", edge.log());
    assert_eq!(std::fs::read_to_string(&include).unwrap(), last_good);
    assert_eq!(get(&ns, WEB).unwrap().status(), 200);

    // Repaired: the new instance is in, and no temporary file is left beside the include.
    std::fs::write(&template, good).unwrap();
    let both = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&include).unwrap().contains(":9002")
    });
    assert!(both.is_some(), "{}", edge.log());
    wait_answer(&ns, WEB, 200, "b2", &edge, &nginx);
    let files: Vec<_> = std::fs::read_dir(include.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
}

#[test]
fn no_live_instance_answers_the_configured_503_page() {
    let ns = Netns::new("edge");
    let fluxd = Fluxd::dataplane(&ns.name, &[]);
    service(&fluxd, "web", "198.18.0.10:80");
    let nginx = Nginx::start(&ns);
    let page = nginx.dir.join("sorry.html");
    std::fs::write(&page, "<h1>Back soon</h1>\n").unwrap();
    let edge = Edge::start(
        &fluxd.socket,
        &nginx,
        &[
            "--service",
            &format!("web={WEB}"),
            "--unavailable-page",
            page.to_str().unwrap(),
        ],
    );
    wait_answer(&ns, WEB, 503, "Back soon", &edge, &nginx);
    let m = get(&ns, WEB).unwrap();
    assert_eq!(body(&m), "<h1>Back soon</h1>\n");
    assert!(
        m.header("content-type").starts_with("text/html"),
        "{:?}",
        m.headers
    );

    let b1 = HttpBackend::start(&ns, "b1", 9001, 200);
    add(&fluxd, "web", &b1);
    wait_answer(&ns, WEB, 200, "b1", &edge, &nginx);

    // Listed but dead (it crashed and nothing removed it yet): nginx's own 502 becomes the page.
    fluxd.ok(&[
        "instance",
        "add",
        "web",
        "dead",
        "--address",
        "127.0.0.1:9009",
    ]);
    fluxd.ok(&["instance", "rm", "web", "b1"]);
    let only_dead = wait_until(Duration::from_secs(10), || {
        let conf = std::fs::read_to_string(nginx.include()).unwrap();
        conf.contains("server 127.0.0.1:9009") && !conf.contains(":9001")
    });
    assert!(only_dead.is_some(), "{}", edge.log());
    // nginx's old worker may answer a last request or two after the reload.
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let m = get(&ns, WEB).unwrap();
        assert_eq!(
            (m.status(), body(&m).as_str()),
            (503, "<h1>Back soon</h1>\n")
        );
    }

    fluxd.ok(&["instance", "rm", "web", "dead"]);
    wait_answer(&ns, WEB, 503, "Back soon", &edge, &nginx);
}

#[test]
fn a_service_without_an_address_is_published_by_the_edge_alone() {
    let ns = Netns::new("edge");
    let fluxd = Fluxd::dataplane(&ns.name, &[]);
    // No VIP: it needs the port its instances listen on.
    let out = fluxd.ctl(&["service", "add", "site", "--address", "none"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("instance_port") && err.lines().count() == 1,
        "{err}"
    );
    for name in ["site", "other"] {
        fluxd.ok(&[
            "service",
            "add",
            name,
            "--address",
            "none",
            "--instance-port",
            "9001",
            "--protocol",
            "http",
        ]);
    }
    // Two services without a VIP do not clash over it, and one with a VIP still routes.
    service(&fluxd, "web", "198.18.0.10:80");
    let b1 = HttpBackend::start(&ns, "b1", 9001, 200);
    add(&fluxd, "site", &b1);
    let list = fluxd.ok(&["list"]);
    assert!(
        list.lines()
            .any(|l| l.split_whitespace().take(2).eq(["site", "none"])),
        "{list}"
    );
    assert!(fluxd.ok(&["info", "site"]).contains("address none"));
    assert_eq!(fluxd.json(&["info", "site"])[0]["address"], "none");

    let nginx = Nginx::start(&ns);
    let edge = Edge::start(
        &fluxd.socket,
        &nginx,
        &["--service", &format!("site={WEB}")],
    );
    wait_answer(&ns, WEB, 200, "b1", &edge, &nginx);

    // Nothing steered for it (no rule, set member or map entry); web's VIP is there.
    fluxd.wait_routed("web");
    let services: Vec<String> = fluxd.steered().into_iter().map(|s| s.service).collect();
    assert_eq!(services, ["web"]);
    let debug = fluxd.debug();
    assert!(!debug["rules"].to_string().contains("site"), "{debug}");
    assert!(!debug["bpf"].to_string().contains("site"), "{debug}");
    fluxd.ok(&["service", "rm", "site", "other"]);
    assert!(!fluxd.ok(&["list"]).contains("site"));
}

#[test]
fn bad_flags_are_one_line_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("flux.conf");
    for (args, want) in [
        (
            vec!["--service", "web", "--nginx-conf", conf.to_str().unwrap()],
            "--service",
        ),
        (
            vec!["--service", "web=:80", "--nginx-conf", "rel.conf"],
            "--nginx-conf",
        ),
        (
            vec![
                "--service",
                "web=:80",
                "--nginx-conf",
                conf.to_str().unwrap(),
                "--interval-ms",
                "1",
            ],
            "--interval-ms",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_fluxd"))
            .arg("edge")
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with(&format!("fluxd edge: {want}")), "{err}");
    }
    // A missing required flag is clap's usage error, also status 2.
    let out = Command::new(env!("CARGO_BIN_EXE_fluxd"))
        .args(["edge", "--service", "web=:80"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nginx-conf"));
    assert!(!conf.exists());
}

/// Runs a busybox httpd container named `name` whose page (`/path`, what the test client asks
/// for) is its name; returns its id.
fn httpd(docker: &Dockerd, name: &str) -> String {
    let script = format!("echo {name} > /www/path && exec httpd -f -p 8080 -h /www");
    docker.run(&["--init", "--name", name, IMAGE, "sh", "-c", &script])
}

const IMAGE: &str = "edge-web:1";

#[test]
fn containers_come_and_go_without_failed_requests() {
    // Declared so that they drop in reverse: edge, nginx, fluxd, then Docker, then the namespace.
    let ns = Netns::new("edgedk");
    let docker = Dockerd::new(&ns);
    docker.import_image(IMAGE);
    let endpoint = docker.endpoint();
    let fluxd = Fluxd::dataplane(
        &ns.name,
        &["--docker", &endpoint, "--network-mode", "global"],
    );
    service(&fluxd, "web", "198.18.0.10:8080");
    fluxd.ok(&["select", "web", "v1", "--image", "edge-web"]);
    let c1 = httpd(&docker, "c1");
    let c2 = httpd(&docker, "c2");
    let live = |n: usize| {
        wait_until(Duration::from_secs(20), || {
            fluxd
                .ok(&["query", "--service", "web", "--state", "live", "--quiet"])
                .lines()
                .count()
                == n
        })
    };
    assert!(live(2).is_some(), "{}", fluxd.log());
    let nginx = Nginx::start(&ns);
    let mut edge = Edge::start(&fluxd.socket, &nginx, &["--service", &format!("web={WEB}")]);
    wait_answer(&ns, WEB, 200, "c", &edge, &nginx);

    let stop = Arc::new(AtomicBool::new(false));
    let addr: SocketAddrV4 = WEB.parse().unwrap();
    let looper = request_loop(
        &ns,
        addr,
        stop.clone(),
        Duration::from_secs(45),
        Duration::from_millis(5),
        |m| body(m).trim().to_string(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let c3 = httpd(&docker, "c3");
    let ip3 = docker.container_ip(&c3).unwrap().to_string();
    let listed = wait_until(Duration::from_secs(15), || {
        std::fs::read_to_string(nginx.include())
            .unwrap()
            .contains(&ip3)
    });
    assert!(listed.is_some(), "c3 never listed: {}", edge.log());
    std::thread::sleep(Duration::from_millis(1000));
    // `docker stop`: fluxd drops the instance on SIGTERM, before the container is gone.
    docker.stop(&c1);
    std::thread::sleep(Duration::from_millis(1000));
    // A container that dies: SIGKILL, nginx finds it refused until fluxd sees it gone.
    docker.kill(&c2);
    let c2_dead = Instant::now();
    assert!(live(1).is_some(), "{}", fluxd.log());
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    let (seen, failures) = looper.join().unwrap();
    let counts = tally(&seen, &failures, &["c1", "c2", "c3"], &nginx);
    let count = |name: &str| counts[name];
    assert!(count("c1") > 0 && count("c2") > 0 && count("c3") > 0);
    let after: Vec<_> = seen.iter().filter(|(t, _)| *t > c2_dead).collect();
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|(_, b)| b == "c3"),
        "after c2 died: {after:?}"
    );
    let conf = std::fs::read_to_string(nginx.include()).unwrap();
    assert_eq!(conf.matches(" max_fails=").count(), 1, "{conf}");
    edge.stop();
}
